//! One endpoint's delivery task: reads its outbox in order and hands each
//! event to one of `concurrency` slots (a connection each), which POSTs it
//! until the receiver answers 2xx; the cursor moves over the events done
//! in a row from the oldest, so nothing unacknowledged is ever passed.
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
//!   drained, and on stop. An event acknowledged
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
use super::outbox::{Entry, Position, Reader};
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
    /// One per POST that may be in flight at once (`concurrency`).
    pub clients: Vec<Client>,
    pub secret: Option<Secret>,
    pub stats: Arc<Stats>,
    pub wake: Arc<Notify>,
    pub timeout: Duration,
    pub first_retry: Duration,
    pub max_retry: Duration,
    pub max_age: Duration,
}

/// What one POST loop needs (shared by the endpoint's slots).
struct Ctx {
    name: String,
    secret: Option<Secret>,
    stats: Arc<Stats>,
    timeout: Duration,
    first_retry: Duration,
    max_retry: Duration,
    max_age: Duration,
}

static WEBHOOK_ID: HeaderName = HeaderName::from_static("webhook-id");
static WEBHOOK_TIMESTAMP: HeaderName = HeaderName::from_static("webhook-timestamp");
static WEBHOOK_SIGNATURE: HeaderName = HeaderName::from_static("webhook-signature");

/// A slot's result: its client back, the entry's sequence number, and
/// where the cursor may move once every earlier entry is done (`None`:
/// stopped first).
type Done = (Client, u64, Option<Position>);

impl Delivery {
    /// Deliver until `stop`: up to one POST per client at once, each entry
    /// retried on its own; the cursor moves over the entries done in a row
    /// from the oldest, so a restart re-sends anything not acknowledged.
    pub async fn run(mut self, stop: CancellationToken) {
        let ctx = Arc::new(Ctx {
            name: self.name.clone(),
            secret: self.secret.take(),
            stats: Arc::clone(&self.stats),
            timeout: self.timeout,
            first_retry: self.first_retry,
            max_retry: self.max_retry,
            max_age: self.max_age,
        });
        let mut idle = std::mem::take(&mut self.clients);
        let mut slots: tokio::task::JoinSet<Done> = tokio::task::JoinSet::new();
        let (mut next_seq, mut ack_seq) = (0u64, 0u64);
        let mut done: std::collections::BTreeMap<u64, Position> = std::collections::BTreeMap::new();
        let mut saved_at = Instant::now();
        loop {
            let mut read_error = false;
            while let Some(client) = idle.pop() {
                match self.reader.next_entry() {
                    Ok(Some(entry)) => {
                        let (ctx, stop, seq) = (Arc::clone(&ctx), stop.clone(), next_seq);
                        next_seq += 1;
                        slots.spawn(async move {
                            let mut client = client;
                            let end = deliver(&ctx, &mut client, entry, &stop).await;
                            (client, seq, end)
                        });
                    }
                    Ok(None) => {
                        idle.push(client);
                        break;
                    }
                    Err(e) => {
                        idle.push(client);
                        error!(endpoint = %self.name, error = %e, "cannot read the webhook outbox");
                        self.stats.set_error(format!("outbox: {e}"));
                        read_error = true;
                        break;
                    }
                }
            }
            if slots.is_empty() {
                if !read_error {
                    self.stats.head_ms.store(0, Ordering::Relaxed);
                }
                self.save();
                saved_at = Instant::now();
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = self.wake.notified(), if !read_error => continue,
                    _ = tokio::time::sleep(READ_ERROR_PAUSE), if read_error => continue,
                }
            }
            tokio::select! {
                r = slots.join_next() => match r {
                    Some(Ok((client, seq, Some(end)))) => {
                        idle.push(client);
                        done.insert(seq, end);
                        while let Some(end) = done.remove(&ack_seq) {
                            self.reader.ack(end);
                            ack_seq += 1;
                        }
                    }
                    Some(Ok((_, _, None))) => break,
                    Some(Err(e)) => {
                        // A panicked slot: stop here; the cursor has not
                        // passed its entry, so a restart sends it again.
                        error!(endpoint = %self.name, error = %e, "webhook delivery slot failed; delivery stopped");
                        break;
                    }
                    None => {}
                },
                _ = self.wake.notified(), if !idle.is_empty() => {}
                _ = stop.cancelled() => break,
            }
            if saved_at.elapsed() >= SAVE_EVERY {
                self.save();
                saved_at = Instant::now();
            }
        }
        slots.abort_all();
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
}

/// Deliver one entry (or drop it): where the cursor may move after it, or
/// `None` when stopped first.
async fn deliver(ctx: &Ctx, client: &mut Client, entry: Entry, stop: &CancellationToken) -> Option<Position> {
    let end = entry.end;
    let Some(meta) = meta(&entry.line) else {
        warn!(endpoint = %ctx.name, at = ?entry.end, "skipping an outbox line that is not an event");
        ctx.stats.dropped.fetch_add(1, Ordering::Relaxed);
        return Some(end);
    };
    let id = if meta.id.is_empty() {
        // Events written before ids existed: a stable id from the position.
        format!("outbox-{}-{}", entry.end.segment, entry.end.offset)
    } else {
        meta.id
    };
    let Ok(id_header) = HeaderValue::from_str(&id) else {
        warn!(endpoint = %ctx.name, at = ?entry.end, "skipping an event with an unusable id");
        ctx.stats.dropped.fetch_add(1, Ordering::Relaxed);
        return Some(end);
    };
    let born = meta.ts.unwrap_or_else(SystemTime::now);
    ctx.stats.head_ms.store(unix_ms(born).max(1), Ordering::Relaxed);
    let body = Bytes::from(entry.line);
    let mut failures = 0u32;
    // Refusing answers only (a 4xx about this event): timeouts, refused
    // connections and 5xx while the receiver is down do not count.
    let mut refusals = 0u32;
    loop {
        let age = born.elapsed().unwrap_or_default();
        if age > ctx.max_age {
            warn!(
                endpoint = %ctx.name,
                event_id = %id,
                age = %humantime::format_duration(Duration::from_secs(age.as_secs())),
                "dropping a webhook event older than max_age"
            );
            ctx.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return Some(end);
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut headers = vec![
            (WEBHOOK_ID.clone(), id_header.clone()),
            (WEBHOOK_TIMESTAMP.clone(), HeaderValue::from(now)),
        ];
        if let Some(s) = &ctx.secret {
            let sig = s.sign(&id, now, &body);
            headers.push((
                WEBHOOK_SIGNATURE.clone(),
                HeaderValue::from_str(&sig).expect("base64 is a valid header"),
            ));
        }
        let res = tokio::select! {
            _ = stop.cancelled() => return None,
            r = tokio::time::timeout(ctx.timeout, client.post(&headers, body.clone())) => r,
        };
        let error = match res {
            Ok(Ok(status)) if status.is_success() => {
                ctx.stats.delivered.fetch_add(1, Ordering::Relaxed);
                if failures > 0 {
                    info!(endpoint = %ctx.name, event_id = %id, attempts = failures + 1, "webhook delivered after retries");
                }
                return Some(end);
            }
            Ok(Ok(status)) if refuses(status) && refusals + 1 >= REFUSALS_TO_DROP => {
                // The receiver keeps refusing this very event (400, 413,
                // 422, 410, ...): retrying it for max_age would hold back
                // the cursor for every later event.
                warn!(
                    endpoint = %ctx.name, event_id = %id, status = %status, attempts = failures + 1,
                    "the receiver refuses this webhook event; dropping it"
                );
                ctx.stats.dropped.fetch_add(1, Ordering::Relaxed);
                ctx.stats.set_error(format!("HTTP {status}: event {id} dropped"));
                return Some(end);
            }
            Ok(Ok(status)) => {
                refusals += u32::from(refuses(status));
                format!("HTTP {status}")
            }
            Ok(Err(e)) => e,
            Err(_) => format!("no response within {}", humantime::format_duration(ctx.timeout)),
        };
        failures += 1;
        ctx.stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
        let delay = backoff(ctx.first_retry, ctx.max_retry, failures, jitter());
        warn!(
            endpoint = %ctx.name,
            event_id = %id,
            attempt = failures,
            error = %error,
            retry_in_ms = delay.as_millis() as u64,
            "webhook POST failed"
        );
        ctx.stats.set_error(error);
        tokio::select! {
            _ = stop.cancelled() => return None,
            _ = tokio::time::sleep(delay) => {}
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
