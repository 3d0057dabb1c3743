//! Delivery events as JSON lines: one line per transition (received,
//! refused, deferred, delivered, bounced, expired).
//!
//! The writer is a dedicated task behind a bounded channel; emitters await
//! a slot (back-pressure, never loss) and the task batches writes, flushing
//! when the channel runs dry. Trust boundary: event fields may hold
//! client-supplied addresses and upstream reply texts; they are JSON-escaped
//! by serde, so a line can never be split or forged.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

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
    /// RFC 3339 time of the event.
    pub ts: String,
    pub event: EventKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
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
        Event {
            ts: rfc3339(SystemTime::now()),
            event,
            message_id: None,
            tenant: None,
            user: None,
            sender: None,
            rcpt: None,
            rcpts: None,
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

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Handle for emitting events; cheap to clone. A disabled handle drops them.
#[derive(Clone)]
pub struct Events {
    tx: Option<mpsc::Sender<Event>>,
}

impl Events {
    pub fn disabled() -> Self {
        Events { tx: None }
    }

    /// Open (append) the events file and start the writer task. Returns the
    /// handle and the writer's join handle (finishes when every handle is
    /// dropped and the backlog is written).
    pub async fn open(path: &Path) -> std::io::Result<(Events, tokio::task::JoinHandle<()>)> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(dir).await?;
        }
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await?;
        let (tx, rx) = mpsc::channel(65536);
        let task = tokio::spawn(writer(file, rx, path.to_path_buf()));
        Ok((Events { tx: Some(tx) }, task))
    }

    pub async fn emit(&self, ev: Event) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(ev).await;
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.tx.is_some()
    }
}

/// After the first event of a burst the writer waits this long, then
/// writes everything that arrived in one go: emitters rarely have to wake it.
const LINGER: std::time::Duration = std::time::Duration::from_millis(20);

async fn writer(file: tokio::fs::File, mut rx: mpsc::Receiver<Event>, path: PathBuf) {
    let mut out = tokio::io::BufWriter::with_capacity(256 * 1024, file);
    let mut line = Vec::with_capacity(512);
    while let Some(first) = rx.recv().await {
        tokio::time::sleep(LINGER).await;
        let mut next = Some(first);
        while let Some(ev) = next.take() {
            line.clear();
            if serde_json::to_writer(&mut line, &ev).is_ok() {
                line.push(b'\n');
                if let Err(e) = out.write_all(&line).await {
                    tracing::error!(path = %path.display(), error = %e, "cannot write events");
                }
            }
            next = rx.try_recv().ok();
        }
        if let Err(e) = out.flush().await {
            tracing::error!(path = %path.display(), error = %e, "cannot flush events");
        }
    }
    let _ = out.flush().await;
}
