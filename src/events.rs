//! Delivery events as JSON lines: one line per transition (received,
//! refused, deferred, delivered, bounced, expired).
//!
//! The writer is a dedicated task behind a bounded channel; emitters await
//! a slot (back-pressure, never loss) and the task batches writes, flushing
//! when the channel runs dry. Trust boundary: event fields may hold
//! client-supplied addresses and upstream reply texts; they are JSON-escaped
//! by serde, so a line can never be split or forged.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::trace::TraceStore;
use crate::webhook::Webhooks;

/// An SMTP reply as recorded in events and in the spool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyRecord {
    /// Basic code; `None` for failures without a reply (connect refused, timeout).
    pub code: Option<u16>,
    /// Enhanced status code, e.g. `5.1.1`, when the reply had one.
    pub enhanced: Option<String>,
    pub text: String,
}

impl ReplyRecord {
    /// A local failure without an upstream reply (connection, timeout, TLS).
    pub fn local(text: impl Into<String>) -> Self {
        ReplyRecord {
            code: None,
            enhanced: None,
            text: text.into(),
        }
    }

    pub fn from_reply(r: &crate::smtp::Reply) -> Self {
        ReplyRecord {
            code: Some(r.code),
            enhanced: r.enhanced.map(|e| e.to_string()),
            text: {
                let mut t = r.lines.join(" ");
                if let Some(tok) = r.token {
                    t.push_str(&format!(" (sendguard:{tok})"));
                }
                t
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Received,
    Refused,
    Deferred,
    Delivered,
    Bounced,
    Expired,
    /// The guard would have refused (tenant in `warn` mode); the message went on.
    #[serde(rename = "guard_warning")]
    GuardWarning,
    /// A hard-bounced recipient was added to the suppression list
    /// (complaints and unsubscribes have events of their own; operator
    /// changes through the API are logged, not evented).
    Suppressed,
    /// A feedback report (complaint) arrived for a recipient.
    Complaint,
    /// An unsubscribe arrived for a recipient.
    Unsubscribe,
    /// A delivery status notification was queued for the envelope sender.
    #[serde(rename = "dsn_queued")]
    DsnQueued,
    /// A back-off rule slowed or suspended a (provider, sender domain) pair
    /// or suspended a tenant after an upstream reply.
    Backoff,
    /// Alert: all delivery is paused (the relay refused our own
    /// credentials or permissions).
    #[serde(rename = "delivery_paused")]
    DeliveryPaused,
    /// A circuit breaker opened, half-opened or closed (`action`), with
    /// `reason` (the figures) and `until`.
    Breaker,
}

impl EventKind {
    pub const ALL: [EventKind; 14] = [
        EventKind::Received,
        EventKind::Refused,
        EventKind::Deferred,
        EventKind::Delivered,
        EventKind::Bounced,
        EventKind::Expired,
        EventKind::GuardWarning,
        EventKind::Suppressed,
        EventKind::Complaint,
        EventKind::Unsubscribe,
        EventKind::DsnQueued,
        EventKind::Backoff,
        EventKind::DeliveryPaused,
        EventKind::Breaker,
    ];

    /// The name in the JSON (`"event"`), without serializing.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Received => "received",
            EventKind::Refused => "refused",
            EventKind::Deferred => "deferred",
            EventKind::Delivered => "delivered",
            EventKind::Bounced => "bounced",
            EventKind::Expired => "expired",
            EventKind::GuardWarning => "guard_warning",
            EventKind::Suppressed => "suppressed",
            EventKind::Complaint => "complaint",
            EventKind::Unsubscribe => "unsubscribe",
            EventKind::DsnQueued => "dsn_queued",
            EventKind::Backoff => "backoff",
            EventKind::DeliveryPaused => "delivery_paused",
            EventKind::Breaker => "breaker",
        }
    }
}

/// One check the session made before accepting a message (on `received`):
/// recipient-stage checks are counted over the accepted recipients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// `mail`, `rcpt` or `data`.
    pub stage: Cow<'static, str>,
    /// `sender_rights`, `breakers`, `sender_domain_health`, `suppression`,
    /// `recipient_domain`, `runaway`, `budgets`, `content_alignment`,
    /// `runaway_body`, `dkim_sign`.
    pub check: Cow<'static, str>,
    /// `pass`, or `warn` (a tenant in `guard = "warn"` mode: the guard
    /// would have refused with `detail`).
    pub result: Cow<'static, str>,
    /// How many times it ran (recipients, for `rcpt` checks).
    pub count: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// The event for a breaker's state change: `tenant` or `sender_domain`
/// names it, `action` is the new state.
pub fn breaker_event(t: &crate::rate::breaker::Transition) -> Event {
    let mut ev = Event::new(EventKind::Breaker);
    match t.scope {
        crate::rate::breaker::BreakerScope::Tenant => ev.tenant = Some(t.key.clone()),
        crate::rate::breaker::BreakerScope::SenderDomain => ev.sender_domain = Some(t.key.clone()),
    }
    ev.action = Some(t.state.to_string());
    ev.reason = Some(t.reason.clone());
    ev.until = t
        .until
        .map(|ns| rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns)));
    ev
}

/// One event line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    /// Unique id of this event (webhooks send it as `webhook-id`, the
    /// receiver's idempotency key).
    #[serde(default)]
    pub id: String,
    /// RFC 3339 time of the event.
    pub ts: String,
    pub event: EventKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// The SMTP session (on `refused`, `guard_warning`, `received`); log
    /// lines of that session carry the same `session_id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Envelope sender; empty string for `<>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sender: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rcpt: Option<String>,
    /// All recipients (on `received`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rcpts: Option<Vec<String>>,
    /// The message's `Message-ID` header without angle brackets (on `received`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header_message_id: Option<String>,
    /// Negotiated TLS version of the session (on `received`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<String>,
    /// What the session checked before accepting it (on `received`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checks: Option<Vec<Check>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply: Option<ReplyRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// Where a refusal happened: connect, auth, mail, rcpt, data.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// When the message was received (for delivery events).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub received_at: Option<String>,
    /// Next attempt (on `deferred`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<String>,
    /// Failure category of the upstream reply (docs/reasons.md), on
    /// `deferred`, `bounced`, `expired`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub category: Option<crate::classify::Category>,
    /// Failure stage: connection, authentication, recipient, policy,
    /// content, throttling.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_stage: Option<crate::classify::Stage>,
    /// The classification rule that matched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// Suppression reason (on `suppressed`, `complaint`, `unsubscribe`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Sender domain a complaint or unsubscribe counts against.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sender_domain: Option<String>,
    /// Id of the queued DSN (on `dsn_queued`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dsn_id: Option<String>,
    /// The recipient's mailbox provider (on delivery events and `backoff`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// What a back-off rule did (`slow`, `suspend`, `suspend_tenant`,
    /// `pause_delivery`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// RFC 3339 time an action lasts until.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
}

impl Event {
    pub fn new(event: EventKind) -> Self {
        let now = SystemTime::now();
        Event {
            id: new_id(now),
            ts: rfc3339(now),
            event,
            message_id: None,
            session_id: None,
            tenant: None,
            user: None,
            sender: None,
            rcpt: None,
            rcpts: None,
            header_message_id: None,
            tls: None,
            checks: None,
            reply: None,
            attempt: None,
            stage: None,
            size: None,
            peer: None,
            received_at: None,
            next_attempt_at: None,
            category: None,
            failure_stage: None,
            rule: None,
            reason: None,
            sender_domain: None,
            dsn_id: None,
            provider: None,
            action: None,
            until: None,
        }
    }
}

/// Unique, sortable ids for events and sessions: ms timestamp, a
/// per-start random node part and a counter (24 hex digits).
pub fn new_id(now: SystemTime) -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static NODE: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let node = *NODE.get_or_init(|| std::collections::hash_map::RandomState::new().build_hasher().finish() & 0xff_ffff);
    let ms = now
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    let c = COUNTER.fetch_add(1, Ordering::Relaxed) & 0xff_ffff;
    // = format!("{ms:012x}{node:06x}{c:06x}") without the formatting
    // machinery (two ids per message).
    let mut id = String::with_capacity(24);
    push_hex(&mut id, ms, 12);
    push_hex(&mut id, node, 6);
    push_hex(&mut id, c, 6);
    id
}

/// Append `v` in lower-case hex, zero-padded to at least `width` digits
/// (as `{v:0width$x}`).
fn push_hex(out: &mut String, v: u64, width: usize) {
    let digits = (16 - v.leading_zeros() as usize / 4).max(width).max(1);
    for i in (0..digits).rev() {
        let nibble = if i < 16 { (v >> (4 * i)) & 0xf } else { 0 };
        out.push(char::from(b"0123456789abcdef"[nibble as usize]));
    }
}

/// RFC 3339 UTC with milliseconds, e.g. `2026-11-23T10:04:05.120Z` (as
/// `humantime::format_rfc3339_millis`, which panics outside 1970..=9999;
/// here such times are clamped to those years).
pub fn rfc3339(t: SystemTime) -> String {
    const LAST: u64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let d = if d.as_secs() > LAST {
        std::time::Duration::new(LAST, 999_000_000)
    } else {
        d
    };
    let secs = d.as_secs() as i64;
    let (year, month, day) = crate::throttle::civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400) as u32;
    let mut out = String::with_capacity(24);
    let mut num = |v: u32, width: u32, sep: char| {
        for p in (0..width).rev() {
            out.push(char::from(b'0' + (v / 10u32.pow(p) % 10) as u8));
        }
        out.push(sep);
    };
    num(year as u32, 4, '-');
    num(month, 2, '-');
    num(day, 2, 'T');
    num(rem / 3600, 2, ':');
    num(rem % 3600 / 60, 2, ':');
    num(rem % 60, 2, '.');
    num(d.subsec_millis(), 3, 'Z');
    out
}

/// Handle for emitting events; cheap to clone. Every event is counted in
/// the metrics (when given) as it is emitted; the writer task appends it to
/// the events log and offers it to the webhooks and the trace store.
#[derive(Clone)]
pub struct Events {
    tx: Option<mpsc::Sender<Item>>,
    metrics: Option<Arc<Metrics>>,
    /// Cuts the writer's linger short (`emit_written`).
    wake: Arc<tokio::sync::Notify>,
}

impl Events {
    /// Drops every event.
    pub fn disabled() -> Self {
        Events {
            tx: None,
            metrics: None,
            wake: Default::default(),
        }
    }

    /// Open (append) the events file and start the writer task. Returns the
    /// handle and the writer's join handle (finishes when every handle is
    /// dropped and the backlog is written).
    pub async fn open(path: &Path) -> std::io::Result<(Events, tokio::task::JoinHandle<()>)> {
        let (ev, task) = Events::start(Some(path), Taps::default(), None, CancellationToken::new()).await?;
        Ok((ev, task.expect("a writer for a file")))
    }

    /// Start the events fan-out: the log file (if any) and the webhooks (if
    /// any) get every event from one writer task; the metrics count them as
    /// they are emitted. No writer task when there is neither a file nor a
    /// webhook. The writer ends when every handle is gone or, after
    /// writing what is queued, when `close` is cancelled.
    pub async fn start(
        path: Option<&Path>,
        taps: Taps,
        metrics: Option<Arc<Metrics>>,
        close: CancellationToken,
    ) -> std::io::Result<(Events, Option<tokio::task::JoinHandle<()>>)> {
        Self::start_with(path, taps, metrics, close, LINGER).await
    }

    async fn start_with(
        path: Option<&Path>,
        taps: Taps,
        metrics: Option<Arc<Metrics>>,
        close: CancellationToken,
        linger: std::time::Duration,
    ) -> std::io::Result<(Events, Option<tokio::task::JoinHandle<()>>)> {
        let file = match path {
            Some(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    tokio::fs::create_dir_all(dir).await?;
                }
                let f = tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .await?;
                Some((f, path.to_path_buf()))
            }
            None => None,
        };
        if file.is_none() && taps.webhooks.is_none() && taps.trace.is_none() {
            return Ok((
                Events {
                    tx: None,
                    metrics,
                    wake: Default::default(),
                },
                None,
            ));
        }
        let (tx, rx) = mpsc::channel(65536);
        let wake = Arc::new(tokio::sync::Notify::new());
        let task = tokio::spawn(writer(file, taps, rx, close, Arc::clone(&wake), linger));
        Ok((
            Events {
                tx: Some(tx),
                metrics,
                wake,
            },
            Some(task),
        ))
    }

    pub async fn emit(&self, ev: Event) {
        if let Some(m) = &self.metrics {
            m.event(&ev);
        }
        if let Some(tx) = &self.tx {
            let _ = tx.send(Item::One(ev)).await;
        }
    }

    /// Emit `evs` and return once they are written to the events file
    /// (handed to the kernel: they survive a `kill -9`, not a power loss;
    /// a failed write is logged, not returned), cutting the writer's linger
    /// short. For events that account for mail about to leave the spool (a
    /// bounce, an expiry): once the spool forgets the message, they are the
    /// only record. Webhooks and the trace get them after the file.
    pub async fn emit_written(&self, evs: Vec<Event>) {
        if let Some(m) = &self.metrics {
            for ev in &evs {
                m.event(ev);
            }
        }
        if let Some(tx) = &self.tx {
            let (done, written) = tokio::sync::oneshot::channel();
            if tx.send(Item::Written(evs, done)).await.is_ok() {
                self.wake.notify_one();
                let _ = written.await;
            }
        }
    }

    /// Whether emitting does anything (callers skip building events otherwise).
    pub fn is_enabled(&self) -> bool {
        self.tx.is_some() || self.metrics.is_some()
    }

    /// The metrics registry events are counted in.
    pub fn metrics(&self) -> Option<&Arc<Metrics>> {
        self.metrics.as_ref()
    }
}

/// What the writer offers every event to besides the log file.
#[derive(Default)]
pub struct Taps {
    pub webhooks: Option<Arc<Webhooks>>,
    pub trace: Option<Arc<TraceStore>>,
}

/// What emitters hand the writer. `One` is nearly every item and was the
/// channel's element before: boxing it would allocate per event.
#[allow(clippy::large_enum_variant)]
enum Item {
    One(Event),
    /// Events to write at once; the sender hears when they are written.
    Written(Vec<Event>, tokio::sync::oneshot::Sender<()>),
}

/// After the first event of a burst the writer waits this long, then
/// writes everything that arrived in one go: emitters rarely have to wake it.
const LINGER: std::time::Duration = std::time::Duration::from_millis(20);

/// Most events the writer takes in one round: bounds the batch handed to
/// the taps (and their buffers) during a burst.
const MAX_BATCH: usize = 4096;

async fn writer(
    file: Option<(tokio::fs::File, PathBuf)>,
    taps: Taps,
    mut rx: mpsc::Receiver<Item>,
    close: CancellationToken,
    wake: Arc<tokio::sync::Notify>,
    linger: std::time::Duration,
) {
    let (mut out, path) = match file {
        Some((f, p)) => (Some(tokio::io::BufWriter::with_capacity(256 * 1024, f)), p),
        None => (None, PathBuf::new()),
    };
    // The taps write files synchronously (outbox segments, trace files):
    // on a blocking thread of their own, never on a runtime worker, fed
    // batch by batch (back-pressure when they fall behind).
    let (tap_tx, tap_thread) = if taps.webhooks.is_some() || taps.trace.is_some() {
        let (tx, rx) = mpsc::channel::<Vec<(Event, Vec<u8>)>>(4);
        (Some(tx), Some(tokio::task::spawn_blocking(move || run_taps(taps, rx))))
    } else {
        (None, None)
    };
    let mut line = Vec::with_capacity(512);
    loop {
        let first = tokio::select! {
            ev = rx.recv() => ev,
            // Shutdown: write what is queued, then stop (handles may live on).
            _ = close.cancelled() => rx.try_recv().ok(),
        };
        let Some(first) = first else { break };
        // Someone waits for written events: no linger (or cut short when
        // they arrive during it).
        if !close.is_cancelled() && matches!(first, Item::One(_)) {
            tokio::select! {
                _ = tokio::time::sleep(linger) => {}
                _ = wake.notified() => {}
            }
        }
        let mut batch = Vec::new();
        let mut acks = Vec::new();
        let mut next = Some(first);
        let mut n = 0;
        while let Some(item) = next.take() {
            match item {
                Item::One(ev) => {
                    n += 1;
                    put(&mut line, ev, &mut out, &path, tap_tx.is_some(), &mut batch).await;
                }
                Item::Written(evs, done) => {
                    for ev in evs {
                        n += 1;
                        put(&mut line, ev, &mut out, &path, tap_tx.is_some(), &mut batch).await;
                    }
                    acks.push(done);
                }
            }
            if n < MAX_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if let Some(out) = &mut out
            && let Err(e) = out.flush().await
        {
            tracing::error!(path = %path.display(), error = %e, "cannot flush events");
        }
        // Those waiting for the file go on before the taps (which may push
        // back when the outbox or the trace store lag).
        for done in acks {
            let _ = done.send(());
        }
        if let Some(tx) = &tap_tx
            && !batch.is_empty()
        {
            let _ = tx.send(batch).await;
        }
    }
    if let Some(out) = &mut out {
        let _ = out.flush().await;
    }
    drop(tap_tx);
    if let Some(t) = tap_thread {
        let _ = t.await;
    }
}

/// Write one event's line to the file's buffer, and keep it for the taps.
async fn put(
    line: &mut Vec<u8>,
    ev: Event,
    out: &mut Option<tokio::io::BufWriter<tokio::fs::File>>,
    path: &Path,
    tapped: bool,
    batch: &mut Vec<(Event, Vec<u8>)>,
) {
    line.clear();
    if serde_json::to_writer(&mut *line, &ev).is_ok() {
        line.push(b'\n');
        if let Some(out) = out
            && let Err(e) = out.write_all(line).await
        {
            tracing::error!(path = %path.display(), error = %e, "cannot write events");
        }
        if tapped {
            batch.push((ev, line[..line.len() - 1].to_vec()));
        }
    }
}

/// Offer each batch to the webhooks and the trace store, then flush them.
fn run_taps(taps: Taps, mut rx: mpsc::Receiver<Vec<(Event, Vec<u8>)>>) {
    while let Some(batch) = rx.blocking_recv() {
        for (ev, line) in &batch {
            if let Some(w) = &taps.webhooks {
                w.append(ev, line);
            }
            if let Some(t) = &taps.trace {
                t.append(ev, line);
            }
        }
        if let Some(w) = &taps.webhooks {
            w.flush();
        }
        if let Some(t) = &taps.trace {
            t.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Event, EventKind, Events};

    /// `emit_written` returns once its events (and those emitted before
    /// them) are in the file, in order, cutting short the writer's linger
    /// (here 10 minutes) even when a plain emit started it.
    #[tokio::test]
    async fn written_events_are_in_the_file_when_emit_written_returns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        // A linger far longer than the test may take: only a cut-short
        // linger lets emit_written return.
        let (events, writer) = Events::start_with(
            Some(&path),
            super::Taps::default(),
            None,
            tokio_util::sync::CancellationToken::new(),
            std::time::Duration::from_secs(600),
        )
        .await
        .unwrap();
        let writer = writer.unwrap();
        let ev = |rcpt: &str, kind| {
            let mut e = Event::new(kind);
            e.rcpt = Some(rcpt.into());
            e
        };
        let rcpts = |path: &std::path::Path| -> Vec<String> {
            std::fs::read_to_string(path)
                .unwrap()
                .lines()
                .map(|l| {
                    serde_json::from_str::<serde_json::Value>(l).unwrap()["rcpt"]
                        .as_str()
                        .unwrap()
                        .to_string()
                })
                .collect()
        };
        for round in 0..20 {
            let before = format!("d{round}");
            events.emit(ev(&before, EventKind::Delivered)).await;
            let failed = [format!("b{round}"), format!("e{round}")];
            let written = events.emit_written(vec![
                ev(&failed[0], EventKind::Bounced),
                ev(&failed[1], EventKind::Expired),
            ]);
            tokio::time::timeout(std::time::Duration::from_secs(60), written)
                .await
                .expect("written without waiting out the linger");
            let got = rcpts(&path);
            assert_eq!(
                got[got.len() - 3..],
                [before, failed[0].clone(), failed[1].clone()],
                "round {round}"
            );
        }
        drop(events);
        writer.await.unwrap();
    }

    #[test]
    fn kind_names_match_serde() {
        for k in EventKind::ALL {
            assert_eq!(serde_json::to_value(k).unwrap(), serde_json::json!(k.as_str()));
        }
    }

    #[test]
    fn hex_matches_format() {
        let values = [
            0,
            1,
            0xf,
            0x10,
            0xff_ffff,
            0x100_0000,
            0x019a_b8c4_d5e6,
            0x1_0000_0000_0000,
            u64::MAX,
        ];
        for v in values {
            for width in [0, 1, 6, 12, 17] {
                let mut s = String::new();
                super::push_hex(&mut s, v, width);
                assert_eq!(s, format!("{v:0width$x}"), "{v:#x} width {width}");
            }
        }
    }

    #[test]
    fn ids_are_24_hex_digits_and_sort_by_time() {
        use std::time::{Duration, UNIX_EPOCH};
        let t = UNIX_EPOCH + Duration::from_millis(1_795_389_748_250);
        let (a, b) = (super::new_id(t), super::new_id(t + Duration::from_millis(1)));
        for id in [&a, &b] {
            assert_eq!(id.len(), 24, "{id}");
            assert!(
                id.bytes().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()),
                "{id}"
            );
        }
        assert_eq!(&a[..12], "01a20591741a");
        assert!(a < b);
    }

    #[test]
    fn rfc3339_matches_humantime() {
        use std::time::{Duration, UNIX_EPOCH};
        // Epoch, leap days, month and year ends, 2026, the last second of 9999.
        let secs: [u64; 8] = [
            0,
            1,
            951_782_400,
            951_868_799,
            1_795_389_748,
            4_107_542_399,
            1_798_761_599,
            253_402_300_799,
        ];
        for s in secs {
            for ms in [0, 7, 120, 999] {
                let t = UNIX_EPOCH + Duration::from_millis(s * 1000 + ms);
                assert_eq!(
                    super::rfc3339(t),
                    humantime::format_rfc3339_millis(t).to_string(),
                    "{s}.{ms}"
                );
            }
        }
        assert_eq!(
            super::rfc3339(UNIX_EPOCH + Duration::from_millis(1_795_389_748_250)),
            "2026-11-22T23:22:28.250Z"
        );
        // Outside what RFC 3339 can write: clamped (humantime panics).
        assert_eq!(
            super::rfc3339(UNIX_EPOCH - Duration::from_secs(86_400)),
            "1970-01-01T00:00:00.000Z"
        );
        assert_eq!(
            super::rfc3339(UNIX_EPOCH + Duration::from_secs(253_402_300_800)),
            "9999-12-31T23:59:59.999Z"
        );
    }
}
