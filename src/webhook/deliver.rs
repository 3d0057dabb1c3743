//! One endpoint's delivery task: reads its outbox in order and POSTs each
//! event until the receiver answers 2xx, then moves the cursor on.
//!
//! - Any other outcome (no connection, no answer within `timeout`, 3xx,
//!   4xx — 410 Gone included — or 5xx) is a failed attempt: the same event
//!   is tried again after `first_retry`, doubling up to `max_retry`, ±10%
//!   jitter. Events are never skipped, except those older than `max_age`,
//!   which are dropped with a warning and counted.
//! - Every attempt is signed afresh with its own `webhook-timestamp`
//!   (receivers refuse stale timestamps); `webhook-id` is the event's id,
//!   the same on every attempt: receivers de-duplicate on it.
//! - The cursor is saved at most every [`SAVE_EVERY`], when the outbox is
//!   drained, before waiting to retry, and on stop. An event acknowledged
//!   but not yet saved is sent again after a crash (at least once).
//!
//! Trust boundary: the receiver is untrusted (see [`super::http`]); the
//! outbox lines are our own, and a line that does not parse is skipped
//! (counted as dropped) rather than blocking the endpoint forever.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hyper::body::Bytes;
use hyper::header::{HeaderName, HeaderValue};
use serde::Deserialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::http::Client;
use super::outbox::{Entry, Reader};
use super::sign::Secret;

/// Longest time acknowledged events wait for the cursor to be saved.
pub const SAVE_EVERY: Duration = Duration::from_millis(250);

/// Wait after the outbox could not be read.
const READ_ERROR_PAUSE: Duration = Duration::from_secs(5);

/// An endpoint's counters, shared with `status()`.
#[derive(Debug, Default)]
pub struct Stats {
    /// Events in the outbox ever (including the backlog found at start).
    pub appended: AtomicU64,
    pub delivered: AtomicU64,
    pub failed_attempts: AtomicU64,
    pub dropped: AtomicU64,
    /// Unix ms of the event being delivered; 0 when none.
    pub head_ms: AtomicU64,
    /// The last failure and when it happened.
    pub last_error: Mutex<Option<(String, SystemTime)>>,
}

impl Stats {
    pub fn backlog(&self) -> u64 {
        let done = self.delivered.load(Ordering::Relaxed) + self.dropped.load(Ordering::Relaxed);
        self.appended.load(Ordering::Relaxed).saturating_sub(done)
    }

    pub fn set_error(&self, e: String) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some((e, SystemTime::now()));
    }
}

/// How many times a receiver must refuse one event with a 4xx that
/// retrying will not fix before it is dropped (counted as `dropped`).
pub const REFUSALS_TO_DROP: u32 = 5;

/// A 4xx that says the event itself is refused; 408 (timeout), 425 (too
/// early) and 429 (rate limit) are about timing and stay retried, and so
/// does every 5xx.
pub fn refuses(status: hyper::StatusCode) -> bool {
    status.is_client_error() && ![408, 425, 429].contains(&status.as_u16())
}

/// Back-off before attempt `failures + 1`: `first · 2^(failures-1)` capped
/// at `max`, scaled by `jitter` (0.9..1.1).
pub fn backoff(first: Duration, max: Duration, failures: u32, jitter: f64) -> Duration {
    let exp = failures.saturating_sub(1).min(30);
    let d = first.saturating_mul(1u32 << exp).min(max);
    d.mul_f64(jitter.clamp(0.9, 1.1))
}

fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let r = std::collections::hash_map::RandomState::new().build_hasher().finish();
    0.9 + 0.2 * (r % 10_000) as f64 / 10_000.0
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// What the task needs of an outbox line: the event's id and time.
#[derive(Debug, PartialEq)]
pub struct Meta {
    pub id: String,
    pub ts: Option<SystemTime>,
}

/// Parse an outbox line's id and time; `None` when it is not an event.
pub fn meta(line: &[u8]) -> Option<Meta> {
    #[derive(Deserialize)]
    struct Head {
        #[serde(default)]
        id: String,
        #[serde(default)]
        ts: String,
    }
    let h: Head = serde_json::from_slice(line).ok()?;
    Some(Meta {
        id: h.id,
        ts: humantime::parse_rfc3339(&h.ts).ok(),
    })
}

pub struct Delivery {
    pub name: String,
    pub reader: Reader,
    pub client: Client,
    pub secret: Option<Secret>,
    pub stats: Arc<Stats>,
    pub wake: Arc<Notify>,
    pub timeout: Duration,
    pub first_retry: Duration,
    pub max_retry: Duration,
    pub max_age: Duration,
}

static WEBHOOK_ID: HeaderName = HeaderName::from_static("webhook-id");
static WEBHOOK_TIMESTAMP: HeaderName = HeaderName::from_static("webhook-timestamp");
static WEBHOOK_SIGNATURE: HeaderName = HeaderName::from_static("webhook-signature");

impl Delivery {
    /// Deliver until `stop`.
    pub async fn run(mut self, stop: CancellationToken) {
        let mut saved_at = Instant::now();
        loop {
            let entry = match self.reader.next_entry() {
                Ok(Some(e)) => e,
                Ok(None) => {
                    self.stats.head_ms.store(0, Ordering::Relaxed);
                    self.save();
                    saved_at = Instant::now();
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = self.wake.notified() => continue,
                    }
                }
                Err(e) => {
                    error!(endpoint = %self.name, error = %e, "cannot read the webhook outbox");
                    self.stats.set_error(format!("outbox: {e}"));
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(READ_ERROR_PAUSE) => continue,
                    }
                }
            };
            if !self.deliver(entry, &stop).await {
                break;
            }
            if saved_at.elapsed() >= SAVE_EVERY {
                self.save();
                saved_at = Instant::now();
            }
        }
        self.save();
        debug!(endpoint = %self.name, "webhook delivery stopped");
    }

    fn save(&mut self) {
        if self.reader.unsaved()
            && let Err(e) = self.reader.save()
        {
            error!(endpoint = %self.name, error = %e, "cannot save the webhook cursor");
            self.stats.set_error(format!("outbox: {e}"));
        }
    }

    /// Deliver one entry (or drop it); false when stopped first.
    async fn deliver(&mut self, entry: Entry, stop: &CancellationToken) -> bool {
        let Some(meta) = meta(&entry.line) else {
            warn!(endpoint = %self.name, at = ?entry.end, "skipping an outbox line that is not an event");
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            self.reader.ack(entry.end);
            return true;
        };
        let id = if meta.id.is_empty() {
            // Events written before ids existed: a stable id from the position.
            format!("outbox-{}-{}", entry.end.segment, entry.end.offset)
        } else {
            meta.id
        };
        let Ok(id_header) = HeaderValue::from_str(&id) else {
            warn!(endpoint = %self.name, at = ?entry.end, "skipping an event with an unusable id");
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            self.reader.ack(entry.end);
            return true;
        };
        let born = meta.ts.unwrap_or_else(SystemTime::now);
        self.stats.head_ms.store(unix_ms(born).max(1), Ordering::Relaxed);
        let end = entry.end;
        let body = Bytes::from(entry.line);
        let mut failures = 0u32;
        loop {
            let age = born.elapsed().unwrap_or_default();
            if age > self.max_age {
                warn!(
                    endpoint = %self.name,
                    event_id = %id,
                    age = %humantime::format_duration(Duration::from_secs(age.as_secs())),
                    "dropping a webhook event older than max_age"
                );
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                self.reader.ack(end);
                return true;
            }
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            let mut headers = vec![
                (WEBHOOK_ID.clone(), id_header.clone()),
                (WEBHOOK_TIMESTAMP.clone(), HeaderValue::from(now)),
            ];
            if let Some(s) = &self.secret {
                let sig = s.sign(&id, now, &body);
                headers.push((
                    WEBHOOK_SIGNATURE.clone(),
                    HeaderValue::from_str(&sig).expect("base64 is a valid header"),
                ));
            }
            let res = tokio::select! {
                _ = stop.cancelled() => return false,
                r = tokio::time::timeout(self.timeout, self.client.post(&headers, body.clone())) => r,
            };
            let error = match res {
                Ok(Ok(status)) if status.is_success() => {
                    self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                    self.reader.ack(end);
                    if failures > 0 {
                        info!(endpoint = %self.name, event_id = %id, attempts = failures + 1, "webhook delivered after retries");
                    }
                    return true;
                }
                Ok(Ok(status)) if refuses(status) && failures + 1 >= REFUSALS_TO_DROP => {
                    // The receiver keeps refusing this very event (400,
                    // 413, 422, 410, ...): retrying it for max_age would
                    // hold back every later event.
                    warn!(
                        endpoint = %self.name, event_id = %id, status = %status, attempts = failures + 1,
                        "the receiver refuses this webhook event; dropping it"
                    );
                    self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                    self.stats.set_error(format!("HTTP {status}: event {id} dropped"));
                    self.reader.ack(end);
                    return true;
                }
                Ok(Ok(status)) => format!("HTTP {status}"),
                Ok(Err(e)) => e,
                Err(_) => format!("no response within {}", humantime::format_duration(self.timeout)),
            };
            failures += 1;
            self.stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
            let delay = backoff(self.first_retry, self.max_retry, failures, jitter());
            warn!(
                endpoint = %self.name,
                event_id = %id,
                attempt = failures,
                error = %error,
                retry_in_ms = delay.as_millis() as u64,
                "webhook POST failed"
            );
            self.stats.set_error(error);
            self.save();
            tokio::select! {
                _ = stop.cancelled() => return false,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }
}

#[cfg(test)]
mod refusal_tests {
    use super::refuses;
    use hyper::StatusCode;

    #[test]
    fn which_replies_refuse_the_event_itself() {
        for (code, want) in [
            (400, true),
            (410, true),
            (413, true),
            (422, true),
            (408, false),
            (429, false),
            (425, false),
            (500, false),
            (503, false),
            (302, false),
        ] {
            assert_eq!(refuses(StatusCode::from_u16(code).unwrap()), want, "{code}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap() {
        let s = Duration::from_secs;
        let table = [(1, 5), (2, 10), (3, 20), (4, 40), (7, 300), (40, 300), (u32::MAX, 300)];
        for (failures, want) in table {
            assert_eq!(backoff(s(5), s(300), failures, 1.0), s(want), "{failures}");
        }
        assert_eq!(backoff(s(10), s(300), 1, 0.5), s(9));
        assert_eq!(backoff(s(10), s(300), 1, 1.1), s(11));
        for _ in 0..100 {
            let j = jitter();
            assert!((0.9..=1.1).contains(&j), "{j}");
        }
    }

    #[test]
    fn meta_of_lines() {
        let m = meta(br#"{"id":"019a","ts":"2024-01-02T03:04:05.678Z","event":"delivered"}"#).unwrap();
        assert_eq!(m.id, "019a");
        assert_eq!(unix_ms(m.ts.unwrap()), 1704164645678);
        assert_eq!(
            meta(br#"{"event":"delivered"}"#).unwrap(),
            Meta {
                id: String::new(),
                ts: None
            }
        );
        assert!(meta(b"\0\0\0").is_none());
        assert!(meta(br#"{"id":"x","ts":"#).is_none());
    }
}
