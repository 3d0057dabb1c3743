//! Signed webhooks with a durable outbox (issue 7).
//!
//! Every event the events writer sees is offered to each configured
//! endpoint; matching ones (`events`, `tenants`: [`filter`]) are appended
//! to that endpoint's outbox on disk ([`outbox`]) and POSTed from there by
//! the endpoint's own delivery task ([`deliver`]), retried with back-off
//! until the receiver answers 2xx. A receiver that is down or slow only
//! grows its own outbox: mail never waits for it, and other endpoints
//! never wait for it either (one outbox, one task, one connection each).
//!
//! The request (Standard Webhooks, <https://www.standardwebhooks.com/>):
//! `POST <url>` with `Content-Type: application/json`, the body exactly the
//! event's line in the events log, and the headers `webhook-id` (the
//! event's `id`, the idempotency key: delivery is at least once),
//! `webhook-timestamp` (Unix seconds of this attempt) and, when the
//! endpoint has a secret, `webhook-signature: v1,<base64 HMAC-SHA256 of
//! "{id}.{timestamp}.{body}">` ([`sign`]). A secret `whsec_<base64>` is
//! the decoded bytes; any other string is used as raw bytes. An endpoint
//! without `secret`/`secret_file` is allowed (a receiver on a private
//! network may not care) but its events go unsigned, and the start logs a
//! warning saying so.
//!
//! Only 2xx acknowledges. Everything else is retried until the event is
//! older than `max_age`, when it is dropped, logged and counted, except a
//! 4xx that refuses the event itself (anything but 408, 425 and 429): after
//! [`deliver::REFUSALS_TO_DROP`] such answers the event is dropped the same
//! way, so one event a receiver cannot take does not hold back the rest.
//! Each endpoint has up to `concurrency` POSTs in flight (default 4), each
//! on its own keep-alive connection, so events may arrive out of order
//! (receivers order by the event's `ts` and de-duplicate on its id); with
//! `concurrency = 1` they arrive in the order of the events log. The cursor
//! only moves over events done in a row from the oldest. The outbox is fsynced about once a second off the events task
//! (a power loss costs at most that second); a crash or restart resumes
//! from the saved cursor, re-sending what was not acknowledged.
//!
//! Trust boundary: URLs and secrets come from the config; receivers'
//! replies are untrusted and only their status code is used. Secrets never
//! reach a log.

mod config;
pub mod deliver;
pub mod filter;
pub mod http;
pub mod outbox;
pub mod sign;
pub mod url;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

pub use config::{EndpointConfig, WebhooksConfig};

use crate::config::Config;
use crate::events::Event;
use deliver::{Delivery, Stats};
use filter::Filter;
use outbox::Outbox;

/// How often written outbox data is fsynced.
pub const SYNC_EVERY: Duration = Duration::from_secs(1);

/// One endpoint's state, for metrics and the admin API.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EndpointStatus {
    pub name: String,
    /// Events in the outbox not yet acknowledged by the receiver.
    pub backlog: u64,
    /// Age in seconds of the oldest event waiting, if any.
    pub oldest_age_seconds: Option<f64>,
    pub delivered: u64,
    /// Failed POST attempts (each retry counts).
    pub failed_attempts: u64,
    /// Events dropped after `max_age` (or unreadable in the outbox, or lost
    /// to a failed outbox write).
    pub dropped: u64,
    /// The most recent failure; it stays after later successes.
    pub last_error: Option<String>,
    /// When `last_error` happened (RFC 3339).
    pub last_error_at: Option<String>,
}

struct Endpoint {
    name: String,
    filter: Filter,
    outbox: Arc<Outbox>,
    stats: Arc<Stats>,
    wake: Arc<Notify>,
    /// The outbox is at `max_backlog_bytes` (logged once per episode).
    full: std::sync::atomic::AtomicBool,
}

/// The running webhooks: outboxes and delivery tasks.
pub struct Webhooks {
    endpoints: Vec<Endpoint>,
}

impl Webhooks {
    /// Open every endpoint's outbox and start its delivery task in
    /// `tracker` (it stops when `stop` is cancelled). `None` when no
    /// endpoint is configured.
    pub fn start(
        cfg: &Config,
        tracker: &TaskTracker,
        stop: CancellationToken,
    ) -> anyhow::Result<Option<Arc<Webhooks>>> {
        let wc = &cfg.webhooks;
        if wc.endpoint.is_empty() {
            return Ok(None);
        }
        let dir = wc
            .outbox_dir(cfg)
            .ok_or_else(|| anyhow::anyhow!("webhooks.dir: needed for the outboxes"))?;
        let mut native = None;
        let mut endpoints = Vec::new();
        let mut deliveries = Vec::new();
        for (i, e) in wc.endpoint.iter().enumerate() {
            let key = format!("webhooks.endpoint[{i}]");
            let target = url::Target::parse(&e.url).map_err(|m| anyhow::anyhow!("{key}.url: {m}"))?;
            let secret = e.load_secret(cfg).map_err(|(k, m)| anyhow::anyhow!("{key}.{k}: {m}"))?;
            if secret.is_none() {
                warn!(endpoint = %e.name, "webhook endpoint has no secret: its events are sent unsigned");
            }
            let tls = if target.tls {
                let roots = native.get_or_insert_with(|| rustls_native_certs::load_native_certs().certs);
                let ca = e.ca_file.as_ref().map(|p| cfg.resolve(p));
                Some(http::tls_connector(roots, ca.as_deref()).map_err(|m| anyhow::anyhow!("{key}: {m}"))?)
            } else {
                None
            };
            let kinds = e
                .events
                .iter()
                .map(|n| filter::kind(n))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|m| anyhow::anyhow!("{key}.events: {m}"))?;
            let path = dir.join(&e.name);
            let opened = Outbox::open(&path, outbox::SEGMENT_BYTES)
                .map_err(|err| anyhow::anyhow!("webhook outbox {}: {err}", path.display()))?;
            opened.outbox.set_max_bytes(e.max_backlog_bytes);
            if opened.repaired > 0 {
                warn!(endpoint = %e.name, bytes = opened.repaired, "cut a torn line off the webhook outbox");
            }
            if opened.backlog > 0 {
                info!(endpoint = %e.name, backlog = opened.backlog, "resuming the webhook outbox");
            }
            let stats = Arc::new(Stats::default());
            stats.appended.store(opened.backlog, Ordering::Relaxed);
            let wake = Arc::new(Notify::new());
            deliveries.push(Delivery {
                name: e.name.clone(),
                reader: opened.reader,
                clients: (0..e.concurrency)
                    .map(|_| http::Client::new(target.clone(), tls.clone()))
                    .collect::<anyhow::Result<_>>()?,
                secret,
                stats: Arc::clone(&stats),
                wake: Arc::clone(&wake),
                timeout: e.timeout,
                first_retry: e.first_retry,
                max_retry: e.max_retry,
                max_age: e.max_age,
            });
            endpoints.push(Endpoint {
                name: e.name.clone(),
                filter: Filter::new(kinds, e.tenants.clone()),
                outbox: opened.outbox,
                stats,
                wake,
                full: std::sync::atomic::AtomicBool::new(false),
            });
        }
        for d in deliveries {
            tracker.spawn(d.run(stop.clone()));
        }
        let outboxes = endpoints.iter().map(|e| Arc::clone(&e.outbox)).collect();
        tracker.spawn(sync_loop(outboxes, stop));
        Ok(Some(Arc::new(Webhooks { endpoints })))
    }

    /// Offer one event (and its serialized JSON line, without newline) to
    /// every endpoint. Called by the events writer's tap thread (a blocking thread): no waiting
    /// on receivers.
    pub fn append(&self, ev: &Event, line: &[u8]) {
        for e in &self.endpoints {
            if e.filter.matches(ev) {
                e.outbox.push(line);
            }
        }
    }

    /// End of a batch of `append`s: write what was appended to the outbox
    /// files and wake the delivery tasks.
    pub fn flush(&self) {
        for e in &self.endpoints {
            match e.outbox.write() {
                Ok(0) => {}
                Ok(n) => {
                    e.full.store(false, Ordering::Relaxed);
                    e.stats.appended.fetch_add(n, Ordering::Relaxed);
                    e.wake.notify_one();
                }
                Err((err, lost)) => {
                    // A full outbox says so once, not every batch.
                    let full = err.kind() == std::io::ErrorKind::StorageFull;
                    if !full {
                        error!(endpoint = %e.name, error = %err, lost, "cannot write the webhook outbox; events lost");
                    } else if !e.full.swap(true, Ordering::Relaxed) {
                        error!(endpoint = %e.name, error = %err, "webhook outbox full: new events are dropped until the receiver catches up");
                    }
                    e.stats.dropped.fetch_add(lost, Ordering::Relaxed);
                    e.stats.appended.fetch_add(lost, Ordering::Relaxed);
                    e.stats.set_error(format!("outbox: {err}"));
                }
            }
        }
    }

    pub fn status(&self) -> Vec<EndpointStatus> {
        let now_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        self.endpoints
            .iter()
            .map(|e| {
                let s = &e.stats;
                let backlog = s.backlog();
                let head = s.head_ms.load(Ordering::Relaxed);
                let last = s.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone();
                EndpointStatus {
                    name: e.name.clone(),
                    backlog,
                    oldest_age_seconds: (backlog > 0 && head > 0).then(|| now_ms.saturating_sub(head) as f64 / 1000.0),
                    delivered: s.delivered.load(Ordering::Relaxed),
                    failed_attempts: s.failed_attempts.load(Ordering::Relaxed),
                    dropped: s.dropped.load(Ordering::Relaxed),
                    last_error_at: last.as_ref().map(|(_, t)| crate::events::rfc3339(*t)),
                    last_error: last.map(|(m, _)| m),
                }
            })
            .collect()
    }
}

/// fsync every outbox's new data about once a second, on a blocking thread
/// (never on the events writer). What is written after the stop is synced
/// when the outbox is dropped.
async fn sync_loop(outboxes: Vec<Arc<Outbox>>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(SYNC_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let boxes = outboxes.clone();
        let res = tokio::task::spawn_blocking(move || {
            boxes
                .iter()
                .filter_map(|o| o.sync().err().map(|e| (o.dir().to_path_buf(), e)))
                .collect::<Vec<_>>()
        })
        .await;
        for (dir, e) in res.unwrap_or_default() {
            error!(dir = %dir.display(), error = %e, "cannot sync the webhook outbox");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{EventKind, rfc3339};

    fn config(dir: &std::path::Path, port: u16) -> Config {
        let text = format!(
            "[server]\nhostname = \"h.example\"\n[[listeners]]\naddr = \"127.0.0.1:0\"\ntls = \"none\"\nauth = \"none\"\n\
             trusted_networks = [\"127.0.0.0/8\"]\ntenant = \"acme\"\n[[tenants]]\nname = \"acme\"\n\
             sender_domains = [\"acme.example\"]\nguard = \"off\"\n[webhooks]\ndir = \"{}\"\n\
             [[webhooks.endpoint]]\nname = \"down\"\nurl = \"http://127.0.0.1:{port}/\"\nevents = [\"bounced\"]\n\
             first_retry = \"50ms\"\nmax_retry = \"100ms\"\nmax_age = \"1h\"\n",
            dir.display()
        );
        let mut c = Config::parse(&text).unwrap();
        c.validate().unwrap();
        c
    }

    fn event(kind: EventKind, age: Duration) -> (Event, Vec<u8>) {
        let mut ev = Event::new(kind);
        ev.ts = rfc3339(SystemTime::now() - age);
        let line = serde_json::to_vec(&ev).unwrap();
        (ev, line)
    }

    async fn wait(w: &Webhooks, what: &str, f: impl Fn(&EndpointStatus) -> bool) -> EndpointStatus {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let s = w.status().remove(0);
            if f(&s) {
                return s;
            }
            assert!(std::time::Instant::now() < deadline, "{what}: {s:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A receiver that refuses connections: events stay (failed attempts,
    /// last error, oldest age), except those past `max_age`; after a
    /// restart the backlog is found again.
    #[tokio::test]
    async fn down_receiver_status_max_age_and_resume() {
        let d = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cfg = config(d.path(), port);
        let (tracker, stop) = (TaskTracker::new(), CancellationToken::new());
        let w = Webhooks::start(&cfg, &tracker, stop.clone()).unwrap().unwrap();
        let (old, old_line) = event(EventKind::Bounced, Duration::from_secs(7200));
        let (other, other_line) = event(EventKind::Delivered, Duration::ZERO);
        let (fresh, fresh_line) = event(EventKind::Bounced, Duration::from_secs(5));
        w.append(&old, &old_line);
        w.append(&other, &other_line);
        w.append(&fresh, &fresh_line);
        w.flush();
        let s = wait(&w, "old event dropped, fresh one retried", |s| {
            s.dropped == 1 && s.failed_attempts >= 2
        })
        .await;
        assert_eq!((s.name.as_str(), s.backlog, s.delivered), ("down", 1, 0));
        assert!(s.oldest_age_seconds.unwrap() >= 5.0, "{s:?}");
        assert!(
            s.last_error.as_deref().unwrap().contains("connect to 127.0.0.1"),
            "{s:?}"
        );
        assert!(s.last_error_at.is_some());
        stop.cancel();
        tracker.close();
        tracker.wait().await;
        drop(w);

        let (tracker, stop) = (TaskTracker::new(), CancellationToken::new());
        let w = Webhooks::start(&cfg, &tracker, stop.clone()).unwrap().unwrap();
        let s = wait(&w, "backlog resumed", |s| s.failed_attempts >= 1).await;
        assert_eq!((s.backlog, s.dropped), (1, 0));
        stop.cancel();
        tracker.close();
        tracker.wait().await;
    }
}
