//! Credentials (RFC 4954 AUTH PLAIN / LOGIN) and the per-IP failure limiter.
//!
//! Trust boundary: usernames and passwords come from unauthenticated
//! clients. Password hashes are argon2id PHC strings from the config;
//! verification runs on the blocking pool, takes the same time for unknown
//! users as for known ones, and failures are counted per client IP.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString, rand_core::OsRng};
use dashmap::DashMap;

use crate::config::Config;

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
    /// Verified against for unknown usernames so that they cost the same.
    dummy_hash: String,
    /// argon2id needs 19 MiB and tens of ms per verification: at most one
    /// per core runs at once, so an AUTH burst bounds memory and CPU.
    slots: tokio::sync::Semaphore,
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
        Authenticator {
            users,
            dummy_hash,
            slots: tokio::sync::Semaphore::new(cores),
        }
    }

    /// Verify a username/password pair. Runs argon2 on the blocking pool.
    pub async fn verify(self: &Arc<Self>, username: String, password: Vec<u8>) -> Option<Identity> {
        let _slot = self.slots.acquire().await.ok()?;
        let me = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let entry = me.users.get(&username);
            let phc = entry.map(|e| e.2.as_str()).unwrap_or(me.dummy_hash.as_str());
            let ok = PasswordHash::new(phc)
                .map(|h| Argon2::default().verify_password(&password, &h).is_ok())
                .unwrap_or(false);
            match entry {
                Some((tenant, name, _)) if ok => Some(Identity {
                    tenant: *tenant,
                    tenant_name: Arc::clone(name),
                    username: Some(Arc::from(username.as_str())),
                }),
                _ => None,
            }
        })
        .await
        .ok()
        .flatten()
    }
}

/// Counts AUTH failures per client IP over a sliding window. Clock is
/// passed in so tests need no sleeps.
pub struct AuthFailureLimiter {
    max: u32,
    window: Duration,
    failures: DashMap<IpAddr, Vec<Instant>>,
}

impl AuthFailureLimiter {
    pub fn new(max: u32, window: Duration) -> Self {
        AuthFailureLimiter {
            max,
            window,
            failures: DashMap::new(),
        }
    }

    fn prune(&self, v: &mut Vec<Instant>, now: Instant) {
        v.retain(|t| now.saturating_duration_since(*t) < self.window);
    }

    /// Record a failure; true when the IP is now over the limit.
    pub fn record_failure(&self, ip: IpAddr, now: Instant) -> bool {
        let mut e = self.failures.entry(ip).or_default();
        self.prune(&mut e, now);
        e.push(now);
        // Bound memory per IP: only the last `max` failures matter.
        let max = self.max as usize;
        if e.len() > max {
            let excess = e.len() - max;
            e.drain(..excess);
        }
        e.len() >= max
    }

    /// True when the IP has used up its failures within the window.
    pub fn is_locked(&self, ip: IpAddr, now: Instant) -> bool {
        let Some(mut e) = self.failures.get_mut(&ip) else {
            return false;
        };
        self.prune(&mut e, now);
        let locked = e.len() >= self.max as usize;
        let empty = e.is_empty();
        drop(e);
        if empty {
            self.failures.remove_if(&ip, |_, v| v.is_empty());
        }
        locked
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
        let l = AuthFailureLimiter::new(3, Duration::from_secs(60));
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
    fn phc_check() {
        assert!(check_phc(&hash_password("pw").unwrap()).is_ok());
        assert!(check_phc("secret").is_err());
        assert!(check_phc("$2b$12$abcdefghijklmnopqrstuv").is_err());
    }
}
