//! Runaway guard for agents: an AI agent or script stuck in a loop sends the
//! same message over and over, or mails one person again and again. Two
//! limits catch that before a mailbox provider does:
//!
//! - **same body**: at most `same_body_recipients` (N) distinct recipients
//!   of one message body per credential within `same_body_window`;
//! - **recipient per day**: one recipient receives at most
//!   `recipient_daily` (K) messages per UTC day, across all tenants.
//!
//! Both answer with a temporary `451 4.7.1` (RFC 3463 §3.8): the limits are
//! time-bound, so a client that retries later may pass.
//!
//! Flow: the session asks [`Runaway::check_recipient`] at RCPT (reads only),
//! [`Runaway::check_body`] once the body is in (reads only), and calls
//! [`Runaway::commit`] after the message was accepted, which counts it.
//!
//! The credential key is the caller's choice: the SMTP AUTH username, or,
//! on a trusted listener without authentication, the tenant name (all of the
//! tenant's unauthenticated mail then shares one same-body limit).
//!
//! Body identity ([`body_hash`]): the message body after the blank line
//! that ends the header (the whole input when there is none), ASCII
//! lowercased, every run of whitespace (CR and LF included) collapsed to one
//! space, trimmed, and MIME boundaries (`boundary=` values of 8 characters
//! or more, which mail libraries pick at random per message) left out; then
//! FNV-1a 64. Headers (Date, Message-ID, To) never count.
//!
//! Memory bounds:
//! - recipient counts are keyed by a 64-bit hash of the recipient (keyed
//!   per process, not the string; ~40 B each), the whole map is dropped at
//!   the UTC day change, and at most [`MAX_RECIPIENTS_PER_DAY`] recipients
//!   are counted a day (beyond that new recipients are not counted and
//!   pass: [`RunawayStats::untracked_recipients`]);
//! - per credential, at most [`MAX_BODIES_PER_CREDENTIAL`] body hashes
//!   (the least recently committed dropped first), each with at most N+1
//!   recipient hashes and their last-seen times (16 B each), expired after
//!   the window by [`Runaway::sweep`] (run it every minute or so) and on
//!   commit; credentials without bodies are dropped.
//!
//! Trust boundary: pure decisions over an injected clock (no I/O). The body
//! and recipients are client input: only hashed here; recipients and
//! credential keys are quoted, shortened and stripped of non-ASCII and
//! control characters before they appear in a reply.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;
use crate::rate::quote_key;
use crate::smtp::reply::{Enhanced, Reply};
use crate::throttle::{DayCounter, NS_PER_SEC, Nanos, day_of};

/// Reason token: the same body to too many recipients (`docs/reasons.md`).
pub const TOKEN_SAME_BODY: &str = "runaway_same_body";
/// Reason token: one recipient mailed too often today (`docs/reasons.md`).
pub const TOKEN_RECIPIENT: &str = "runaway_recipient";

/// Body hashes tracked per credential.
pub const MAX_BODIES_PER_CREDENTIAL: usize = 10_000;
/// Recipients counted per UTC day.
pub const MAX_RECIPIENTS_PER_DAY: usize = 2_000_000;
/// Largest `same_body_recipients` (bounds the recipients kept per body).
pub const MAX_SAME_BODY_RECIPIENTS: u32 = 10_000;
/// Longest `same_body_window`.
pub const MAX_WINDOW: Duration = Duration::from_secs(7 * 86_400);

/// Shortest `boundary=` value left out of the body hash.
const MIN_BOUNDARY: usize = 8;
/// At most this many boundaries are left out (nested multiparts).
const MAX_BOUNDARIES: usize = 8;
const MAX_BOUNDARY_LEN: usize = 200;

fn err(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        message: message.into(),
    }
}

/// `[runaway]` as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunawayConfig {
    pub enabled: bool,
    /// N: distinct recipients of one body per credential within the window.
    pub same_body_recipients: u32,
    #[serde(with = "humantime_serde")]
    pub same_body_window: Duration,
    /// K: messages one recipient may receive per UTC day, all tenants together.
    pub recipient_daily: u32,
}

impl Default for RunawayConfig {
    /// Off unless configured: a newsletter is the same body to many
    /// recipients, and an ops inbox gets many messages a day. Turn it on
    /// where agents send (the thresholds below are its defaults then).
    fn default() -> Self {
        RunawayConfig {
            enabled: false,
            same_body_recipients: 50,
            same_body_window: Duration::from_secs(3600),
            recipient_daily: 20,
        }
    }
}

/// The validated `[runaway]` section. Replaced whole on reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunawayPolicy {
    pub enabled: bool,
    pub same_body_recipients: u32,
    pub same_body_window: Duration,
    pub recipient_daily: u32,
}

impl Default for RunawayPolicy {
    fn default() -> Self {
        RunawayConfig::default().compile().expect("the defaults are valid")
    }
}

impl RunawayConfig {
    /// Validate; every error names its key (`runaway.same_body_window`, …).
    pub fn compile(&self) -> Result<RunawayPolicy, ConfigError> {
        if self.same_body_recipients == 0 {
            return Err(err("runaway.same_body_recipients", "must be at least 1"));
        }
        if self.same_body_recipients > MAX_SAME_BODY_RECIPIENTS {
            return Err(err(
                "runaway.same_body_recipients",
                format!("must be at most {MAX_SAME_BODY_RECIPIENTS}"),
            ));
        }
        if self.same_body_window.is_zero() {
            return Err(err("runaway.same_body_window", "must be longer than zero"));
        }
        if self.same_body_window > MAX_WINDOW {
            return Err(err(
                "runaway.same_body_window",
                format!("must be at most {}", humantime::format_duration(MAX_WINDOW)),
            ));
        }
        if self.recipient_daily == 0 {
            return Err(err("runaway.recipient_daily", "must be at least 1"));
        }
        Ok(RunawayPolicy {
            enabled: self.enabled,
            same_body_recipients: self.same_body_recipients,
            same_body_window: self.same_body_window,
            recipient_daily: self.recipient_daily,
        })
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv_step(h: u64, b: u8) -> u64 {
    (h ^ u64::from(b)).wrapping_mul(FNV_PRIME)
}

/// Where the body starts: after the first empty line (`\n` or `\r\n`); 0
/// when there is none (the whole input is hashed).
fn body_start(message: &[u8]) -> usize {
    let mut pos = 0;
    while let Some(nl) = memchr::memchr(b'\n', &message[pos..]) {
        let line = &message[pos..pos + nl];
        if line.is_empty() || line == b"\r" {
            return pos + nl + 1;
        }
        pos += nl + 1;
    }
    0
}

/// ASCII-lowercase `input`, collapse whitespace runs to one space, trim.
fn normalize_into(input: &[u8], out: &mut Vec<u8>) {
    let mut space = false;
    for &b in input {
        if b.is_ascii_whitespace() || b == b'\x0b' {
            space = true;
        } else {
            if space && !out.is_empty() {
                out.push(b' ');
            }
            space = false;
            out.push(b.to_ascii_lowercase());
        }
    }
}

/// The normalized `boundary=` values in the message (header and nested
/// parts), at least [`MIN_BOUNDARY`] long.
fn boundaries(message: &[u8]) -> Vec<Vec<u8>> {
    const KEY: &[u8] = b"boundary=";
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut pos = 0;
    while out.len() < MAX_BOUNDARIES {
        let Some(i) = memchr::memchr2(b'b', b'B', &message[pos..]) else {
            break;
        };
        let at = pos + i;
        pos = at + 1;
        if !message[at..]
            .get(..KEY.len())
            .is_some_and(|k| k.eq_ignore_ascii_case(KEY))
        {
            continue;
        }
        let rest = &message[at + KEY.len()..];
        let raw = match rest.first() {
            Some(b'"') => {
                let v = &rest[1..];
                &v[..memchr::memchr(b'"', v).unwrap_or(v.len())]
            }
            _ => {
                let end = rest
                    .iter()
                    .position(|&c| c == b';' || c.is_ascii_whitespace())
                    .unwrap_or(rest.len());
                &rest[..end]
            }
        };
        let raw = &raw[..raw.len().min(MAX_BOUNDARY_LEN)];
        let mut b = Vec::with_capacity(raw.len());
        normalize_into(raw, &mut b);
        if b.len() >= MIN_BOUNDARY && !out.contains(&b) {
            out.push(b);
        }
        pos = at + KEY.len();
    }
    out
}

/// The identity of a message body for the same-body limit (see the module
/// doc): normalized body, MIME boundaries left out, FNV-1a 64. Stable across
/// processes and versions of sendguard that keep this normalization.
pub fn body_hash(message: &[u8]) -> u64 {
    let body = &message[body_start(message)..];
    let mut norm = Vec::with_capacity(body.len());
    normalize_into(body, &mut norm);
    let bounds = boundaries(message);
    let mut h = FNV_OFFSET;
    let mut i = 0;
    'bytes: while i < norm.len() {
        for b in &bounds {
            if norm[i] == b[0] && norm[i..].starts_with(b) {
                i += b.len();
                continue 'bytes;
            }
        }
        h = fnv_step(h, norm[i]);
        i += 1;
    }
    h
}

/// Which limit refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunawayKind {
    SameBody,
    Recipient,
}

impl RunawayKind {
    pub fn token(self) -> &'static str {
        match self {
            RunawayKind::SameBody => TOKEN_SAME_BODY,
            RunawayKind::Recipient => TOKEN_RECIPIENT,
        }
    }
}

/// A refusal by the runaway guard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub kind: RunawayKind,
    /// The reply text (without code and token), sanitized.
    pub detail: String,
    /// When the same submission could pass (for the same body when one
    /// message alone has more than N recipients: the window, though it
    /// never will).
    pub retry_after: Duration,
}

impl Refusal {
    /// `451 4.7.1 <detail> (sendguard:runaway_same_body|runaway_recipient)`,
    /// one line under 500 bytes.
    pub fn reply(&self) -> Reply {
        Reply::new(451, Enhanced(4, 7, 1), self.detail.clone()).with_token(self.kind.token())
    }

    /// The wait in whole seconds, rounded up (at least 1).
    pub fn retry_after_secs(&self) -> u64 {
        (self.retry_after.as_nanos().div_ceil(u128::from(NS_PER_SEC)) as u64).max(1)
    }
}

fn messages(n: u64) -> String {
    if n == 1 {
        "1 message".into()
    } else {
        format!("{n} messages")
    }
}

/// Counts for metrics and the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct RunawayStats {
    pub credentials: usize,
    pub bodies: usize,
    pub body_recipients: usize,
    pub recipients_today: usize,
    /// New recipients not counted today because the cap was reached.
    pub untracked_recipients: u64,
}

/// One body's recent recipients for one credential.
struct BodyRecord {
    /// Position in the credential's recency order.
    seq: u64,
    /// (recipient hash, last seen), at most N+1.
    rcpts: Vec<(u64, Nanos)>,
}

#[derive(Default)]
struct Credential {
    bodies: HashMap<u64, BodyRecord>,
    /// seq → body hash, oldest commit first.
    recency: BTreeMap<u64, u64>,
}

struct State {
    policy: RunawayPolicy,
    /// The UTC day `recipients` counts.
    day: u64,
    recipients: HashMap<u64, u32>,
    untracked: u64,
    credentials: HashMap<String, Credential>,
    seq: u64,
    max_bodies: usize,
    max_recipients: usize,
}

impl State {
    fn roll_day(&mut self, now: Nanos) -> usize {
        let today = day_of(now);
        if self.day == today {
            return 0;
        }
        let n = self.recipients.len();
        self.recipients = HashMap::new();
        self.untracked = 0;
        self.day = today;
        n
    }
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The runaway guard's counters. One lock per call; share it behind an `Arc`.
pub struct Runaway {
    state: Mutex<State>,
    /// Keys the recipient hashes (per process).
    hasher: RandomState,
}

impl Runaway {
    pub fn new(policy: RunawayPolicy) -> Runaway {
        Runaway::with_caps(policy, MAX_BODIES_PER_CREDENTIAL, MAX_RECIPIENTS_PER_DAY)
    }

    fn with_caps(policy: RunawayPolicy, max_bodies: usize, max_recipients: usize) -> Runaway {
        Runaway {
            state: Mutex::new(State {
                policy,
                day: 0,
                recipients: HashMap::new(),
                untracked: 0,
                credentials: HashMap::new(),
                seq: 0,
                max_bodies,
                max_recipients,
            }),
            hasher: RandomState::new(),
        }
    }

    /// Replace the policy (hot reload); counters are kept (a smaller N
    /// trims the recipients kept per body at their next commit).
    pub fn set_policy(&self, policy: RunawayPolicy) {
        self.lock().policy = policy;
    }

    /// Whether the guard is on (so callers can skip hashing bodies).
    pub fn enabled(&self) -> bool {
        self.lock().policy.enabled
    }

    pub fn policy(&self) -> RunawayPolicy {
        self.lock().policy.clone()
    }

    fn rcpt_hash(&self, rcpt: &str) -> u64 {
        if rcpt.bytes().any(|b| b.is_ascii_uppercase()) {
            self.hasher.hash_one(rcpt.to_ascii_lowercase())
        } else {
            self.hasher.hash_one(rcpt)
        }
    }

    /// Distinct recipient hashes of one message.
    fn rcpt_hashes(&self, rcpts: &[&str]) -> Vec<u64> {
        let mut v: Vec<u64> = rcpts.iter().map(|r| self.rcpt_hash(r)).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// May this recipient get one more message today? Reads only. `rcpt` is
    /// the normalized address (compared ASCII-case-insensitively).
    pub fn check_recipient(&self, now: Nanos, rcpt: &str) -> Result<(), Refusal> {
        let h = self.rcpt_hash(rcpt);
        let st = self.lock();
        let limit = st.policy.recipient_daily;
        if !st.policy.enabled || st.day != day_of(now) {
            return Ok(());
        }
        let count = st.recipients.get(&h).copied().unwrap_or(0);
        if count < limit {
            return Ok(());
        }
        Err(Refusal {
            kind: RunawayKind::Recipient,
            detail: format!(
                "Recipient {} already received {} today (limit {limit} per day across all tenants); try again \
                 after 00:00 UTC",
                quote_key(rcpt),
                messages(u64::from(count)),
            ),
            retry_after: Duration::from_nanos(DayCounter::until_reset(now)),
        })
    }

    /// Would sending this body to `rcpts` make more than N distinct
    /// recipients of it for this credential within the window? Reads only.
    /// Recipients it already reached in the window, and duplicates, count
    /// once.
    pub fn check_body(&self, now: Nanos, credential_key: &str, body_hash: u64, rcpts: &[&str]) -> Result<(), Refusal> {
        let new = self.rcpt_hashes(rcpts);
        let st = self.lock();
        let p = &st.policy;
        if !p.enabled {
            return Ok(());
        }
        let window = ns(p.same_body_window);
        let limit = p.same_body_recipients as usize;
        let mut live: Vec<(u64, Nanos)> = st
            .credentials
            .get(credential_key)
            .and_then(|c| c.bodies.get(&body_hash))
            .map(|b| {
                b.rcpts
                    .iter()
                    .copied()
                    .filter(|(_, seen)| seen.saturating_add(window) > now)
                    .collect()
            })
            .unwrap_or_default();
        let known: HashSet<u64> = live.iter().map(|(h, _)| *h).collect();
        let fresh = new.iter().filter(|h| !known.contains(h)).count();
        let total = live.len() + fresh;
        if total <= limit {
            return Ok(());
        }
        // The wait until enough of the oldest recipients left the window
        // (those this message goes to again stay: they are refreshed).
        let retry_after = if fresh > limit {
            window
        } else {
            let new: HashSet<u64> = new.into_iter().collect();
            live.retain(|(h, _)| !new.contains(h));
            live.sort_unstable_by_key(|(_, seen)| *seen);
            live.get(total - limit - 1)
                .map_or(window, |(_, seen)| seen.saturating_add(window).saturating_sub(now))
        };
        let retry_after = Duration::from_nanos(retry_after);
        let secs = (retry_after.as_nanos().div_ceil(u128::from(NS_PER_SEC)) as u64).max(1);
        Err(Refusal {
            kind: RunawayKind::SameBody,
            detail: format!(
                "Runaway guard: same message body to {total} distinct recipients within {} from credential {} \
                 (limit {limit}); looks like a loop; try again in {secs} s",
                humantime::format_duration(p.same_body_window),
                quote_key(credential_key),
            ),
            retry_after,
        })
    }

    /// Count an accepted message: one message for each distinct recipient
    /// today, and (body, recipients) for the credential.
    pub fn commit(&self, now: Nanos, credential_key: &str, body_hash: u64, rcpts: &[&str]) {
        let hashes = self.rcpt_hashes(rcpts);
        let mut st = self.lock();
        if !st.policy.enabled {
            return;
        }
        st.roll_day(now);
        let State {
            policy,
            recipients,
            untracked,
            credentials,
            seq,
            max_bodies,
            max_recipients,
            ..
        } = &mut *st;
        for h in &hashes {
            if let Some(c) = recipients.get_mut(h) {
                *c = c.saturating_add(1);
            } else if recipients.len() < *max_recipients {
                recipients.insert(*h, 1);
            } else {
                *untracked += 1;
            }
        }

        let window = ns(policy.same_body_window);
        let keep = policy.same_body_recipients as usize + 1;
        if !credentials.contains_key(credential_key) {
            credentials.insert(credential_key.to_owned(), Credential::default());
        }
        let cred = credentials.get_mut(credential_key).expect("inserted above");
        *seq += 1;
        let rec = cred.bodies.entry(body_hash).or_insert_with(|| BodyRecord {
            seq: 0,
            rcpts: Vec::new(),
        });
        cred.recency.remove(&rec.seq);
        rec.seq = *seq;
        cred.recency.insert(*seq, body_hash);
        rec.rcpts.retain(|(_, seen)| seen.saturating_add(window) > now);
        let index: HashMap<u64, usize> = rec.rcpts.iter().enumerate().map(|(i, (h, _))| (*h, i)).collect();
        for h in hashes {
            match index.get(&h) {
                Some(&i) => rec.rcpts[i].1 = now,
                None => rec.rcpts.push((h, now)),
            }
        }
        if rec.rcpts.len() > keep {
            // Keep the most recently seen.
            rec.rcpts.sort_unstable_by_key(|(_, seen)| std::cmp::Reverse(*seen));
            rec.rcpts.truncate(keep);
        }
        while cred.bodies.len() > *max_bodies {
            let Some((_, oldest)) = cred.recency.pop_first() else {
                break;
            };
            cred.bodies.remove(&oldest);
        }
    }

    /// Drop what no longer counts: recipients of bodies past the window,
    /// bodies and credentials left empty, and the recipient counts of a past
    /// day. Returns how many entries were dropped.
    pub fn sweep(&self, now: Nanos) -> usize {
        let mut st = self.lock();
        let mut dropped = st.roll_day(now);
        let window = ns(st.policy.same_body_window);
        st.credentials.retain(|_, cred| {
            let Credential { bodies, recency } = cred;
            bodies.retain(|_, rec| {
                let before = rec.rcpts.len();
                rec.rcpts.retain(|(_, seen)| seen.saturating_add(window) > now);
                dropped += before - rec.rcpts.len();
                if rec.rcpts.is_empty() {
                    recency.remove(&rec.seq);
                    dropped += 1;
                    false
                } else {
                    true
                }
            });
            !bodies.is_empty()
        });
        dropped
    }

    pub fn stats(&self) -> RunawayStats {
        let st = self.lock();
        RunawayStats {
            credentials: st.credentials.len(),
            bodies: st.credentials.values().map(|c| c.bodies.len()).sum(),
            body_recipients: st
                .credentials
                .values()
                .flat_map(|c| c.bodies.values())
                .map(|b| b.rcpts.len())
                .sum(),
            recipients_today: st.recipients.len(),
            untracked_recipients: st.untracked,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic (plain counters).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::throttle::NS_PER_DAY;

    const MIN: u64 = 60 * NS_PER_SEC;

    use crate::throttle::test_time as at;

    fn policy(n: u32, window_min: u64, k: u32) -> RunawayPolicy {
        RunawayConfig {
            enabled: true,
            same_body_recipients: n,
            same_body_window: Duration::from_secs(window_min * 60),
            recipient_daily: k,
        }
        .compile()
        .unwrap()
    }

    fn addrs(prefix: &str, n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{prefix}{i}@example.com")).collect()
    }

    fn refs(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }

    #[test]
    fn config_parses_and_validates_with_keys() {
        let c: RunawayConfig = toml::from_str(
            "enabled = false\nsame_body_recipients = 10\nsame_body_window = \"30m\"\nrecipient_daily = 5\n",
        )
        .unwrap();
        let p = c.compile().unwrap();
        assert_eq!(
            p,
            RunawayPolicy {
                enabled: false,
                ..policy(10, 30, 5)
            }
        );
        assert_eq!(toml::from_str::<RunawayConfig>("").unwrap(), RunawayConfig::default());
        assert!(toml::from_str::<RunawayConfig>("same_body = 3").is_err());
        for (text, key) in [
            ("same_body_recipients = 0", "runaway.same_body_recipients"),
            ("same_body_recipients = 10001", "runaway.same_body_recipients"),
            ("same_body_window = \"0s\"", "runaway.same_body_window"),
            ("same_body_window = \"8d\"", "runaway.same_body_window"),
            ("recipient_daily = 0", "runaway.recipient_daily"),
        ] {
            let c: RunawayConfig = toml::from_str(text).unwrap();
            assert_eq!(c.compile().unwrap_err().key, key, "{text}");
        }
    }

    #[test]
    fn body_hash_ignores_headers_case_and_whitespace() {
        let a = body_hash(b"From: a@x\r\nMessage-ID: <1@x>\r\nDate: Mon\r\n\r\nHello  World,\r\nthis is   me.\r\n");
        let same = [
            &b"From: b@y\nTo: z@z\nSubject: other\n\nhello world, this is me."[..],
            b"Subject: x\r\n\r\n\r\n  HELLO\tWORLD,\r\n\r\nTHIS IS ME.   \r\n\r\n",
            b"X: y\r\n\r\nhello world,\nthis\n is\r\n me.",
            // No header at all: an empty first line.
            b"\r\nHello World, this is me.",
        ];
        for m in same {
            assert_eq!(body_hash(m), a, "{:?}", String::from_utf8_lossy(m));
        }
        for m in [
            &b"From: a@x\r\n\r\nHello World, this is you."[..],
            b"From: a@x\r\n\r\nHelloWorld, this is me.",
            b"From: a@x\r\n\r\n",
            // No blank line: the whole input, header included.
            b"Subject: x\r\nHello World, this is me.\r\n",
        ] {
            assert_ne!(body_hash(m), a, "{:?}", String::from_utf8_lossy(m));
        }
        // Empty and header-only inputs hash to the empty body.
        assert_eq!(body_hash(b""), body_hash(b"A: b\r\n\r\n"));
        assert_eq!(body_hash(b""), FNV_OFFSET);
        // Known FNV-1a 64 value of "a".
        assert_eq!(body_hash(b"\na"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn body_hash_ignores_random_mime_boundaries() {
        let msg = |b: &str, inner: &str, text: &str| {
            format!(
                "Content-Type: multipart/mixed; boundary=\"{b}\"\r\n\r\n--{b}\r\nContent-Type: multipart/alternative; \
                 boundary={inner}\r\n\r\n--{inner}\r\nContent-Type: text/plain\r\n\r\n{text}\r\n--{inner}--\r\n--{b}--\r\n"
            )
        };
        let a = body_hash(msg("==_Part_123456789", "Alt_AAAAAAAAAA", "Hi there").as_bytes());
        let b = body_hash(msg("==_Part_987654321", "Alt_bbbbbbbbbb", "hi  THERE").as_bytes());
        let c = body_hash(msg("==_Part_987654321", "Alt_bbbbbbbbbb", "bye").as_bytes());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            boundaries(b"Content-Type: multipart/mixed;\r\n BOUNDARY=\"A  b  C d e f\"; x=y\r\n"),
            [b"a b c d e f".to_vec()]
        );
        // Short ones stay in.
        assert!(boundaries(b"boundary=abc\r\n").is_empty());
    }

    #[test]
    fn same_body_limit_per_credential() {
        let g = Runaway::new(policy(3, 60, 1000));
        let t = at(10, 0, 0);
        let h = body_hash(b"\r\nsame text");
        let r = addrs("r", 6);
        assert_eq!(g.check_body(t, "agent-7", h, &refs(&r[..3])), Ok(()));
        g.commit(t, "agent-7", h, &refs(&r[..3]));
        // Again to the same three, duplicates and case included: fine.
        assert_eq!(
            g.check_body(t, "agent-7", h, &["r0@example.com", "R0@Example.com", "r2@example.com"]),
            Ok(())
        );
        // A fourth distinct recipient is one too many.
        let e = g.check_body(t + MIN, "agent-7", h, &[r[3].as_str()]).unwrap_err();
        assert_eq!(e.kind, RunawayKind::SameBody);
        assert_eq!(e.retry_after, Duration::from_secs(59 * 60));
        assert_eq!(
            e.reply().to_wire(),
            "451 4.7.1 Runaway guard: same message body to 4 distinct recipients within 1h from credential \
             \"agent-7\" (limit 3); looks like a loop; try again in 3540 s (sendguard:runaway_same_body)\r\n"
        );
        // Other credentials and other bodies are independent.
        assert_eq!(g.check_body(t, "agent-8", h, &[r[3].as_str()]), Ok(()));
        assert_eq!(g.check_body(t, "agent-7", h ^ 1, &[r[3].as_str()]), Ok(()));
        // Checks did not count.
        assert_eq!(g.stats().body_recipients, 3);
        // Refreshing r0 and r1 at +30 min: only r2 leaves at +60 min.
        g.commit(t + 30 * MIN, "agent-7", h, &refs(&r[..2]));
        let e = g.check_body(t + 40 * MIN, "agent-7", h, &refs(&r[3..5])).unwrap_err();
        assert!(e.detail.contains("to 5 distinct"), "{}", e.detail);
        // Two must leave: r2 at +60, then r0/r1 at +90 min.
        assert_eq!(e.retry_after, Duration::from_secs(50 * 60));
        assert_eq!(g.check_body(t + 60 * MIN, "agent-7", h, &[r[3].as_str()]), Ok(()));
        assert_eq!(g.check_body(t + 90 * MIN, "agent-7", h, &refs(&r[3..6])), Ok(()));
        // One message alone over the limit: the whole window (it never fits).
        let e = g.check_body(t, "agent-9", h, &refs(&r[..4])).unwrap_err();
        assert_eq!(e.retry_after, Duration::from_secs(3600));
        // Default limits (enabled), as in docs/reasons.md.
        let g = Runaway::new(
            RunawayConfig {
                enabled: true,
                ..RunawayConfig::default()
            }
            .compile()
            .unwrap(),
        );
        let many = addrs("m", 50);
        g.commit(t, "agent-7", h, &refs(&many));
        let e = g.check_body(t, "agent-7", h, &["late@example.com"]).unwrap_err();
        assert_eq!(
            e.reply().to_string(),
            "451 4.7.1 Runaway guard: same message body to 51 distinct recipients within 1h from credential \
             \"agent-7\" (limit 50); looks like a loop; try again in 3600 s (sendguard:runaway_same_body)"
        );
    }

    #[test]
    fn recipient_daily_limit_across_tenants_resets_at_midnight() {
        let g = Runaway::new(policy(50, 60, 3));
        let t = at(22, 0, 0);
        // Checks alone never count.
        for _ in 0..10 {
            assert_eq!(g.check_recipient(t, "x@y.example"), Ok(()));
        }
        g.commit(t, "agent-1", 1, &["x@y.example", "X@Y.example"]);
        g.commit(t, "tenant-b", 2, &["x@y.example"]);
        assert_eq!(g.check_recipient(t, "x@y.example"), Ok(()));
        g.commit(t, "agent-3", 3, &["x@y.example", "other@y.example"]);
        let e = g.check_recipient(t, "X@y.example").unwrap_err();
        assert_eq!(e.kind, RunawayKind::Recipient);
        assert_eq!(e.retry_after, Duration::from_secs(2 * 3600));
        assert_eq!(
            e.reply().to_wire(),
            "451 4.7.1 Recipient \"X@y.example\" already received 3 messages today (limit 3 per day across all \
             tenants); try again after 00:00 UTC (sendguard:runaway_recipient)\r\n"
        );
        assert_eq!(g.check_recipient(t, "other@y.example"), Ok(()));
        // The next UTC day starts again; the map is dropped.
        let midnight = (t / NS_PER_DAY + 1) * NS_PER_DAY;
        assert!(g.check_recipient(midnight - 1, "x@y.example").is_err());
        assert_eq!(g.check_recipient(midnight, "x@y.example"), Ok(()));
        assert_eq!(g.stats().recipients_today, 2);
        // Yesterday's 2 recipients; 3 bodies with 1, 1 and 2 recipients.
        assert_eq!(g.sweep(midnight), 2 + (1 + 1) + (1 + 1) + (2 + 1));
        assert_eq!(g.stats().recipients_today, 0);
        g.commit(midnight, "agent-1", 1, &["x@y.example"]);
        assert_eq!(g.stats().recipients_today, 1);
        // Singular.
        let g = Runaway::new(policy(50, 60, 1));
        g.commit(t, "a", 1, &["x@y.example"]);
        assert!(
            g.check_recipient(t, "x@y.example")
                .unwrap_err()
                .detail
                .contains("received 1 message today")
        );
    }

    #[test]
    fn memory_is_capped_and_swept() {
        // At most 2 bodies per credential, 3 recipients a day.
        let g = Runaway::with_caps(policy(2, 60, 100), 2, 3);
        let t = at(10, 0, 0);
        g.commit(t, "a", 1, &["p@x"]);
        g.commit(t, "a", 2, &["p@x"]);
        g.commit(t, "a", 1, &["q@x"]); // body 1 is now the most recent
        g.commit(t, "a", 3, &["p@x"]); // drops body 2
        let st = g.lock();
        let bodies: HashSet<u64> = st.credentials["a"].bodies.keys().copied().collect();
        assert_eq!(bodies, HashSet::from([1, 3]));
        assert_eq!(st.credentials["a"].recency.len(), 2);
        drop(st);
        // N+1 recipients kept per body.
        g.commit(t + MIN, "b", 9, &["r1@x", "r2@x", "r3@x", "r4@x", "r5@x"]);
        let st = g.lock();
        assert_eq!(st.credentials["b"].bodies[&9].rcpts.len(), 3);
        // The day's recipient cap: p, q, then one of r1..r5; the rest untracked.
        assert_eq!(st.recipients.len(), 3);
        assert_eq!(st.untracked, 4);
        drop(st);
        assert_eq!(g.stats().untracked_recipients, 4);
        // Sweep after the window drops everything but the recipient counts.
        assert_eq!(g.sweep(t + 30 * MIN), 0);
        let dropped = g.sweep(t + 61 * MIN + MIN);
        // Body 1 (p, q), body 3 (p), body 9 (three kept): recipients and bodies.
        assert_eq!(dropped, (2 + 1) + (1 + 1) + (3 + 1));
        let s = g.stats();
        assert_eq!(
            (s.credentials, s.bodies, s.body_recipients, s.recipients_today),
            (0, 0, 0, 3)
        );
    }

    #[test]
    fn disabled_guard_passes_and_counts_nothing() {
        let g = Runaway::new(policy(1, 60, 1));
        let t = at(10, 0, 0);
        g.set_policy(RunawayPolicy {
            enabled: false,
            ..g.policy()
        });
        g.commit(t, "a", 1, &["x@y", "z@y"]);
        g.commit(t, "a", 1, &["x@y", "z@y"]);
        assert_eq!(g.check_recipient(t, "x@y"), Ok(()));
        assert_eq!(g.check_body(t, "a", 1, &["x@y", "z@y", "w@y"]), Ok(()));
        assert_eq!(g.stats(), RunawayStats::default());
    }

    #[test]
    fn replies_are_one_short_sanitized_line() {
        let g = Runaway::new(policy(1, 60, 1));
        let t = at(10, 0, 0);
        let evil = format!("\"x\"\r\n250 ok é{}@y", "a".repeat(400));
        let cred = format!("agent\r\n{}", "c".repeat(400));
        g.commit(t, &cred, 7, &[evil.as_str()]);
        for e in [
            g.check_recipient(t, &evil).unwrap_err(),
            g.check_body(t, &cred, 7, &["other@y"]).unwrap_err(),
        ] {
            let w = e.reply().to_wire();
            assert!(w.len() < 500, "{} bytes: {w}", w.len());
            assert!(w.is_ascii());
            assert_eq!(w.matches("\r\n").count(), 1, "{w}");
            assert!(w.starts_with("451 4.7.1 "));
            assert!(w.contains("...\""), "{w}");
        }
        let w = g.check_recipient(t, &evil).unwrap_err().reply().to_wire();
        assert!(w.starts_with("451 4.7.1 Recipient \"\\\"x\\\"??250 ok ?aaa"), "{w}");
    }
}
