//! Credentials (RFC 4954 AUTH PLAIN / LOGIN) and the per-IP failure limiter.
//!
//! Trust boundary: usernames and passwords come from unauthenticated
//! clients. Password hashes are argon2id PHC strings from the config;
//! verification runs on dedicated threads, takes the same time for unknown
//! users as for known ones, and failures are counted per client IP. A
//! success is remembered for `auth.cache_ttl` (an HMAC of hash and
//! password under a per-process key); a failure always runs argon2.
//! Sessions that present the same credentials while they are being
//! verified wait for that one verification (a client pool reconnecting at
//! once costs one argon2 run, not one per connection).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString, rand_core::OsRng};
use dashmap::DashMap;

use crate::config::Config;
use crate::server::limits::client_key;

/// Who a session acts for once authenticated (or trusted by network).
#[derive(Debug, Clone)]
pub struct Identity {
    /// Index into `Config::tenants`.
    pub tenant: usize,
    pub tenant_name: Arc<str>,
    /// The credential (agent) name; `None` for trusted-network clients.
    pub username: Option<Arc<str>>,
}

/// Check that a config value is an argon2 PHC string.
pub fn check_phc(s: &str) -> Result<(), String> {
    let h =
        PasswordHash::new(s).map_err(|e| format!("not a PHC hash ({e}); make one with `sendguard hash-password`"))?;
    if !h.algorithm.as_str().starts_with("argon2") {
        return Err(format!("algorithm {} is not supported; use argon2id", h.algorithm));
    }
    Ok(())
}

/// Hash a password as argon2id with the crate's default (OWASP) parameters.
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// The credential table built from `[[tenants.users]]`.
pub struct Authenticator {
    users: HashMap<String, (usize, Arc<str>, String)>,
    /// Successful verifications (`auth.cache_ttl`), as Dovecot's
    /// `auth_cache` does: a client that connects once per message pays
    /// argon2 once per TTL, not per message. Username → (HMAC-SHA256
    /// under a key made at start of the stored hash and the password,
    /// expiry). Only successes go in; a wrong password runs argon2 (or
    /// waits for the run of the same pair under way) and counts as a
    /// failure. The cache dies with the process, and the credential table
    /// only changes with a restart. Also the verifications under way, which
    /// sessions presenting the same credentials wait for.
    memo: Arc<Memo>,
    cache_key: ring::hmac::Key,
    /// argon2 verifications run (for tests and diagnostics).
    verifications: std::sync::atomic::AtomicU64,
    /// Verified against for unknown usernames so that they cost the same.
    dummy_hash: String,
    /// argon2id needs 19 MiB and tens of ms per verification. It runs on a
    /// fixed set of threads, one per core, each with one reusable work area:
    /// an AUTH burst queues instead of taking CPU from mail, and memory stays
    /// at cores × 19 MiB (allocating per verification, glibc kept ~200 MiB
    /// after 20 parallel AUTHs).
    jobs: std::sync::mpsc::Sender<VerifyJob>,
}

struct VerifyJob {
    phc: String,
    password: Vec<u8>,
    /// Called on the verifier thread with the result.
    done: Box<dyn FnOnce(bool) + Send>,
}

/// A username and the HMAC tag of its stored hash and a password.
type Credentials = (String, [u8; 32]);

/// What the verifications of the last `auth.cache_ttl` tell, and those
/// under way.
struct Memo {
    ttl: Duration,
    /// Username → (HMAC tag of stored hash and password, expiry).
    cache: std::sync::Mutex<HashMap<String, (ring::hmac::Tag, Instant)>>,
    /// (username, tag) → the sessions waiting for the verification of
    /// exactly these credentials that is running now. Bounded by the
    /// sessions (each waits in one entry at most).
    inflight: std::sync::Mutex<HashMap<Credentials, Vec<tokio::sync::oneshot::Sender<bool>>>>,
}

impl Memo {
    /// Whether `username` proved the password behind `tag` within the
    /// TTL (compared in constant time).
    fn cached(&self, username: &str, tag: &ring::hmac::Tag, now: Instant) -> bool {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let Some((stored, until)) = cache.get(username) else {
            return false;
        };
        let (a, b) = (stored.as_ref(), tag.as_ref());
        *until > now && a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }

    /// Keyed by configured usernames only, so bounded by the table.
    fn remember(&self, username: &str, tag: ring::hmac::Tag, now: Instant) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.insert(username.to_string(), (tag, now + self.ttl));
    }

    /// The verification of `key` ended: remember a success, then tell
    /// everyone who waited for it.
    fn finish(&self, key: &Credentials, tag: ring::hmac::Tag, ok: bool) {
        if ok {
            self.remember(&key.0, tag, Instant::now());
        }
        let waiters = self
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key)
            .unwrap_or_default();
        for w in waiters {
            let _ = w.send(ok);
        }
    }
}

impl Authenticator {
    pub fn from_config(cfg: &Config) -> Self {
        let mut users = HashMap::new();
        for (i, t) in cfg.tenants.iter().enumerate() {
            for u in &t.users {
                users.insert(
                    u.username.clone(),
                    (i, Arc::from(t.name.as_str()), u.password_hash.clone()),
                );
            }
        }
        // Same parameters as real hashes, so unknown users take as long.
        let dummy_hash = hash_password("sendguard-dummy-password").expect("argon2 hashing works");
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let (jobs, rx) = std::sync::mpsc::channel();
        let rx = Arc::new(std::sync::Mutex::new(rx));
        for i in 0..cores {
            let rx = Arc::clone(&rx);
            std::thread::Builder::new()
                .name(format!("argon2-{i}"))
                .spawn(move || verifier(rx))
                .expect("spawn argon2 verifier thread");
        }
        let rng = ring::rand::SystemRandom::new();
        Authenticator {
            users,
            dummy_hash,
            jobs,
            memo: Arc::new(Memo {
                ttl: cfg.auth.cache_ttl,
                cache: std::sync::Mutex::new(HashMap::new()),
                inflight: std::sync::Mutex::new(HashMap::new()),
            }),
            cache_key: ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng).expect("system random source"),
            verifications: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// argon2 verifications run so far (cache hits do not count).
    pub fn verifications(&self) -> u64 {
        self.verifications.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The cache's proof of one (stored hash, password) pair.
    fn cache_tag(&self, phc: &str, password: &[u8]) -> ring::hmac::Tag {
        let mut ctx = ring::hmac::Context::with_key(&self.cache_key);
        ctx.update(&(phc.len() as u64).to_be_bytes());
        ctx.update(phc.as_bytes());
        ctx.update(password);
        ctx.sign()
    }

    /// Run argon2 for `password` against the user's stored hash (the dummy
    /// hash for an unknown user) on a verifier thread; `done` gets the
    /// result, false if the threads are gone.
    fn start(&self, entry: Option<&(usize, Arc<str>, String)>, password: Vec<u8>, done: Box<dyn FnOnce(bool) + Send>) {
        let phc = entry.map_or_else(|| self.dummy_hash.clone(), |e| e.2.clone());
        self.verifications.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Err(e) = self.jobs.send(VerifyJob { phc, password, done }) {
            (e.0.done)(false);
        }
    }

    /// Verify a username/password pair on the verifier threads.
    pub async fn verify(&self, username: String, password: Vec<u8>) -> Option<Identity> {
        let entry = self.users.get(&username);
        let tag = entry
            .filter(|_| !self.memo.ttl.is_zero())
            .map(|e| self.cache_tag(&e.2, &password));
        let ok = match tag {
            Some(tag) if self.memo.cached(&username, &tag, Instant::now()) => true,
            // Known user, cache on: one verification per credentials at a
            // time; the others wait for its result. It runs to the end even
            // if the session that started it goes away.
            Some(tag) => {
                let mut bytes = [0u8; 32];
                bytes.copy_from_slice(tag.as_ref());
                let key = (username.clone(), bytes);
                let (tx, rx) = tokio::sync::oneshot::channel();
                let first = {
                    let mut inflight = self.memo.inflight.lock().unwrap_or_else(|e| e.into_inner());
                    let waiters = inflight.entry(key.clone()).or_default();
                    waiters.push(tx);
                    waiters.len() == 1
                };
                if first {
                    let memo = Arc::clone(&self.memo);
                    self.start(entry, password, Box::new(move |ok| memo.finish(&key, tag, ok)));
                }
                rx.await.unwrap_or(false)
            }
            // An unknown user (the dummy hash) or the cache off.
            None => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                self.start(
                    entry,
                    password,
                    Box::new(move |ok| {
                        let _ = tx.send(ok);
                    }),
                );
                rx.await.unwrap_or(false)
            }
        };
        match entry {
            Some((tenant, name, _)) if ok => Some(Identity {
                tenant: *tenant,
                tenant_name: Arc::clone(name),
                username: Some(Arc::from(username.as_str())),
            }),
            _ => None,
        }
    }
}

/// A verifier thread: one argon2 work area, reused for every job. The
/// threads end when the `Authenticator` (the sender) is dropped.
fn verifier(jobs: Arc<std::sync::Mutex<std::sync::mpsc::Receiver<VerifyJob>>>) {
    let mut blocks: Vec<argon2::Block> = Vec::new();
    loop {
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        let ok = verify_with(&job.phc, &job.password, &mut blocks).unwrap_or(false);
        (job.done)(ok);
    }
}

/// Verify `password` against a PHC argon2 hash using `blocks` as the work
/// area. The final comparison is constant-time (`password_hash::Output`).
fn verify_with(phc: &str, password: &[u8], blocks: &mut Vec<argon2::Block>) -> Option<bool> {
    let hash = PasswordHash::new(phc).ok()?;
    let algorithm = argon2::Algorithm::try_from(hash.algorithm).ok()?;
    let version = match hash.version {
        Some(v) => argon2::Version::try_from(v).ok()?,
        None => argon2::Version::default(),
    };
    let params = argon2::Params::try_from(&hash).ok()?;
    let expected = hash.hash?;
    let mut salt_buf = [0u8; 64];
    let salt = hash.salt?.decode_b64(&mut salt_buf).ok()?;
    let n = params.block_count();
    if blocks.len() != n {
        blocks.clear();
        blocks.resize(n, argon2::Block::default());
        blocks.shrink_to_fit();
    }
    let mut out = vec![0u8; expected.len()];
    Argon2::new(algorithm, version, params)
        .hash_password_into_with_memory(password, salt, &mut out, blocks.as_mut_slice())
        .ok()?;
    Some(argon2::password_hash::Output::new(&out).ok()? == expected)
}

/// Counts AUTH failures per client IP over a sliding window. Clock is
/// passed in so tests need no sleeps.
pub struct AuthFailureLimiter {
    max: u32,
    window: Duration,
    /// Keyed by IPv4 address or IPv6 prefix (see [`client_key`]).
    failures: DashMap<IpAddr, Vec<Instant>>,
    /// Failures recorded since the last sweep of expired entries.
    since_sweep: std::sync::atomic::AtomicU32,
    v6_prefix: u8,
}

/// AUTH failures count per IPv6 /64: one subscriber's prefix, whose
/// addresses an attacker can rotate through freely.
pub const AUTH_IPV6_PREFIX: u8 = 64;

/// Sweep expired entries after this many recorded failures, so that
/// failures from many addresses that never come back do not accumulate.
const SWEEP_EVERY: u32 = 1024;

impl AuthFailureLimiter {
    /// IPv6 clients are counted per prefix of `v6_prefix` bits
    /// ([`AUTH_IPV6_PREFIX`]).
    pub fn new(max: u32, window: Duration, v6_prefix: u8) -> Self {
        AuthFailureLimiter {
            max,
            window,
            failures: DashMap::new(),
            since_sweep: std::sync::atomic::AtomicU32::new(0),
            v6_prefix,
        }
    }

    fn prune(&self, v: &mut Vec<Instant>, now: Instant) {
        v.retain(|t| now.saturating_duration_since(*t) < self.window);
    }

    /// Record a failure; true when the address (or /64) is now over the limit.
    pub fn record_failure(&self, ip: IpAddr, now: Instant) -> bool {
        if self.since_sweep.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1 >= SWEEP_EVERY {
            self.since_sweep.store(0, std::sync::atomic::Ordering::Relaxed);
            self.failures.retain(|_, v| {
                v.retain(|t| now.saturating_duration_since(*t) < self.window);
                !v.is_empty()
            });
        }
        let mut e = self.failures.entry(client_key(ip, self.v6_prefix)).or_default();
        self.prune(&mut e, now);
        e.push(now);
        // Bound memory per key: only the last `max` failures matter.
        let max = self.max as usize;
        if e.len() > max {
            let excess = e.len() - max;
            e.drain(..excess);
        }
        e.len() >= max
    }

    /// True when the address (or /64) has used up its failures within the window.
    pub fn is_locked(&self, ip: IpAddr, now: Instant) -> bool {
        let key = client_key(ip, self.v6_prefix);
        let Some(mut e) = self.failures.get_mut(&key) else {
            return false;
        };
        self.prune(&mut e, now);
        let locked = e.len() >= self.max as usize;
        let empty = e.is_empty();
        drop(e);
        if empty {
            self.failures.remove_if(&key, |_, v| v.is_empty());
        }
        locked
    }

    /// Addresses (or /64s) with failures on record.
    pub fn tracked(&self) -> usize {
        self.failures.len()
    }
}

/// Why a SASL exchange could not be decoded.
#[derive(Debug, PartialEq, Eq)]
pub enum SaslError {
    /// The client sent `*` (RFC 4954 §4).
    Cancelled,
    /// Not base64, or not the mechanism's message format.
    Malformed,
    /// PLAIN with an authorization identity other than the user (we do not
    /// let one credential act as another).
    AuthzMismatch,
}

/// Decode one base64 SASL response line; `=` is the empty response.
pub fn decode_b64(line: &str) -> Result<Vec<u8>, SaslError> {
    use base64::Engine;
    let line = line.trim();
    if line == "*" {
        return Err(SaslError::Cancelled);
    }
    if line == "=" {
        return Ok(Vec::new());
    }
    base64::engine::general_purpose::STANDARD
        .decode(line)
        .map_err(|_| SaslError::Malformed)
}

/// RFC 4616 PLAIN message: `[authzid] NUL authcid NUL passwd`.
pub fn decode_plain(msg: &[u8]) -> Result<(String, Vec<u8>), SaslError> {
    let mut parts = msg.split(|b| *b == 0);
    let (Some(authz), Some(user), Some(pass), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(SaslError::Malformed);
    };
    let user = std::str::from_utf8(user).map_err(|_| SaslError::Malformed)?;
    if user.is_empty() {
        return Err(SaslError::Malformed);
    }
    if !authz.is_empty() && authz != user.as_bytes() {
        return Err(SaslError::AuthzMismatch);
    }
    Ok((user.to_string(), pass.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authn(cache_ttl: &str) -> Authenticator {
        let hash = hash_password("right").unwrap();
        let text = format!(
            "[auth]\ncache_ttl = \"{cache_ttl}\"\n[[tenants]]\nname = \"t\"\nsender_domains = [\"t.example\"]\n[[tenants.users]]\nusername = \"app\"\npassword_hash = \"{hash}\"\n"
        );
        Authenticator::from_config(&Config::parse(&text).unwrap())
    }

    #[tokio::test]
    async fn a_success_is_remembered_for_the_ttl_and_a_failure_never() {
        async fn ok(a: &Authenticator, user: &str, pw: &str) -> Option<String> {
            let (user, pw) = (user.to_string(), pw.as_bytes().to_vec());
            a.verify(user, pw).await.map(|i| i.tenant_name.to_string())
        }
        let a = authn("5m");
        assert_eq!(ok(&a, "app", "right").await.as_deref(), Some("t"));
        assert_eq!(a.verifications(), 1);
        // The same pair again: no argon2.
        assert_eq!(ok(&a, "app", "right").await.as_deref(), Some("t"));
        assert_eq!(a.verifications(), 1);
        // A wrong password is verified (and refused) every time, even
        // while the right one is remembered.
        assert_eq!(ok(&a, "app", "wrong").await, None);
        assert_eq!(ok(&a, "app", "wrong").await, None);
        assert_eq!(a.verifications(), 3);
        assert_eq!(ok(&a, "app", "right").await.as_deref(), Some("t"));
        assert_eq!(a.verifications(), 3);
        // An unknown user with a remembered password is still refused.
        assert_eq!(ok(&a, "other", "right").await, None);
        assert_eq!(a.verifications(), 4);

        // After the TTL the pair is verified again.
        let a = authn("100ms");
        assert!(ok(&a, "app", "right").await.is_some());
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(ok(&a, "app", "right").await.is_some());
        assert_eq!(a.verifications(), 2);
        // cache_ttl = 0: every AUTH runs argon2.
        let a = authn("0s");
        assert!(ok(&a, "app", "right").await.is_some());
        assert!(ok(&a, "app", "right").await.is_some());
        assert_eq!(a.verifications(), 2);
    }

    #[tokio::test]
    async fn concurrent_auths_with_the_same_credentials_share_one_verification() {
        let a = Arc::new(authn("5m"));
        let run = |user: &str, pw: &str| {
            let (a, user, pw) = (Arc::clone(&a), user.to_string(), pw.as_bytes().to_vec());
            tokio::spawn(async move { a.verify(user, pw).await.map(|i| i.tenant_name.to_string()) })
        };
        let rights: Vec<_> = (0..20).map(|_| run("app", "right")).collect();
        let wrongs: Vec<_> = (0..5).map(|_| run("app", "wrong")).collect();
        let unknown: Vec<_> = (0..2).map(|_| run("nobody", "right")).collect();
        for r in rights {
            assert_eq!(r.await.unwrap().as_deref(), Some("t"));
        }
        for r in wrongs.into_iter().chain(unknown) {
            assert_eq!(r.await.unwrap(), None);
        }
        // One run for the 20 right ones, one for the 5 identical wrong ones
        // (each of them still fails), one per unknown-user attempt.
        assert_eq!(a.verifications(), 4);
        assert!(a.memo.inflight.lock().unwrap().is_empty());
        // A session that gives up does not strand the others.
        let first = run("app", "other-wrong");
        tokio::task::yield_now().await; // it starts the verification
        let second = run("app", "other-wrong");
        tokio::task::yield_now().await; // it waits for that one
        assert_eq!(a.memo.inflight.lock().unwrap().values().map(Vec::len).sum::<usize>(), 2);
        first.abort();
        assert_eq!(second.await.unwrap(), None);
        assert_eq!(a.verifications(), 5);
    }

    #[test]
    fn sasl_plain() {
        assert_eq!(decode_plain(b"\0app\0pw"), Ok(("app".into(), b"pw".to_vec())));
        assert_eq!(decode_plain(b"app\0app\0pw"), Ok(("app".into(), b"pw".to_vec())));
        assert_eq!(decode_plain(b"other\0app\0pw"), Err(SaslError::AuthzMismatch));
        assert_eq!(decode_plain(b"\0app"), Err(SaslError::Malformed));
        assert_eq!(decode_plain(b"\0\0pw"), Err(SaslError::Malformed));
        assert_eq!(decode_plain(b"\0a\0b\0c"), Err(SaslError::Malformed));
        assert_eq!(decode_b64("*"), Err(SaslError::Cancelled));
        assert_eq!(decode_b64("="), Ok(vec![]));
        assert_eq!(decode_b64("AGFwcABwdw=="), Ok(b"\0app\0pw".to_vec()));
        assert_eq!(decode_b64("not base64!"), Err(SaslError::Malformed));
    }

    #[test]
    fn locks_after_max_failures_and_recovers() {
        let l = AuthFailureLimiter::new(3, Duration::from_secs(60), 64);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let t0 = Instant::now();
        assert!(!l.record_failure(ip, t0));
        assert!(!l.record_failure(ip, t0 + Duration::from_secs(1)));
        assert!(!l.is_locked(ip, t0 + Duration::from_secs(2)));
        assert!(l.record_failure(ip, t0 + Duration::from_secs(2)));
        assert!(l.is_locked(ip, t0 + Duration::from_secs(3)));
        assert!(!l.is_locked(other, t0 + Duration::from_secs(3)));
        // the first failure leaves the window at t0+60s
        assert!(!l.is_locked(ip, t0 + Duration::from_secs(61)));
        // and all are gone later; the entry is dropped
        assert!(!l.is_locked(ip, t0 + Duration::from_secs(200)));
        assert!(l.failures.is_empty());
    }

    #[test]
    fn verify_with_reused_memory() {
        let mut blocks = Vec::new();
        let h = hash_password("right").unwrap();
        assert_eq!(verify_with(&h, b"right", &mut blocks), Some(true));
        assert_eq!(verify_with(&h, b"wrong", &mut blocks), Some(false));
        assert_eq!(verify_with(&h, b"right", &mut blocks), Some(true));
        // other parameters and variants resize the work area and verify
        for (alg, m) in [
            (argon2::Algorithm::Argon2id, 8),
            (argon2::Algorithm::Argon2i, 64),
            (argon2::Algorithm::Argon2d, 16),
        ] {
            let salt = SaltString::generate(&mut OsRng);
            let a = Argon2::new(alg, argon2::Version::V0x13, argon2::Params::new(m, 1, 1, None).unwrap());
            let h = a.hash_password(b"pw", &salt).unwrap().to_string();
            assert_eq!(verify_with(&h, b"pw", &mut blocks), Some(true), "{h}");
            assert_eq!(verify_with(&h, b"pW", &mut blocks), Some(false), "{h}");
            assert_eq!(blocks.len(), m as usize);
        }
        assert_eq!(verify_with("garbage", b"pw", &mut blocks), None);
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let l = AuthFailureLimiter::new(2, Duration::from_secs(60), 64);
        let t0 = Instant::now();
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(!l.record_failure(a, t0));
        assert!(l.record_failure(b, t0), "same /64, rotated address");
        assert!(l.is_locked("2001:db8:1:2::77".parse().unwrap(), t0));
        assert!(!l.is_locked(other, t0));
        let v4: IpAddr = "192.0.2.5".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.5".parse().unwrap();
        l.record_failure(v4, t0);
        assert!(l.record_failure(mapped, t0));
        assert!(l.is_locked(v4, t0));
    }

    #[test]
    fn expired_entries_are_swept() {
        let l = AuthFailureLimiter::new(5, Duration::from_secs(60), 64);
        let t0 = Instant::now();
        for i in 0..(SWEEP_EVERY - 1) {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            l.record_failure(ip, t0);
        }
        assert_eq!(l.tracked(), (SWEEP_EVERY - 1) as usize);
        // the next failure, after the window, sweeps all the expired ones
        l.record_failure("192.0.2.1".parse().unwrap(), t0 + Duration::from_secs(61));
        assert_eq!(l.tracked(), 1);
    }

    #[test]
    fn phc_check() {
        assert!(check_phc(&hash_password("pw").unwrap()).is_ok());
        assert!(check_phc("secret").is_err());
        assert!(check_phc("$2b$12$abcdefghijklmnopqrstuv").is_err());
    }
}
