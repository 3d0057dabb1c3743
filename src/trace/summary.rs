//! What the API shows of a traced message: its [`MessageSummary`] (built
//! from its events, oldest first) and the full [`MessageTrace`]; the
//! search [`Query`] and the exact check of a summary against it. Pure.
//!
//! Trust boundary: events are our own lines read back, handled as
//! generic JSON (a field missing or of another type is simply absent);
//! query strings come from API requests and are only compared.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Most results one search returns.
pub const MAX_LIMIT: usize = 10_000;

/// Latest state of one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RcptStatus {
    /// Received, no delivery attempt recorded yet.
    Queued,
    Deferred,
    Delivered,
    Bounced,
    Expired,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RcptSummary {
    pub address: String,
    pub status: RcptStatus,
    /// Attempts so far (the `attempt` of its latest delivery event).
    pub attempts: u32,
    /// Time of its latest delivery event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
}

/// One message at a glance (a search result, the head of a trace).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageSummary {
    pub message_id: String,
    /// `ts` of its `received` event; of its oldest stored event when there
    /// is none (a DSN, or a message whose start is past retention).
    pub received_at: Option<String>,
    pub tenant: Option<String>,
    pub user: Option<String>,
    /// Envelope sender; `""` for the null sender.
    pub sender: Option<String>,
    /// The Message-ID header, without angle brackets.
    pub header_message_id: Option<String>,
    pub size: Option<u64>,
    /// Every recipient, in the order first seen, with its latest state.
    pub rcpts: Vec<RcptSummary>,
    /// Events stored for it.
    pub events: usize,
    pub last_event_at: Option<String>,
    /// Ids of the DSN messages it caused (`dsn_queued`).
    pub dsn_ids: Vec<String>,
}

/// The whole stored life of one message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MessageTrace {
    pub message_id: String,
    pub summary: MessageSummary,
    /// Its events, oldest first, exactly as they were emitted.
    pub events: Vec<Value>,
    /// The traces of its DSN messages (in `dsn_ids` order; a DSN past
    /// retention is left out).
    pub dsns: Vec<MessageTrace>,
}

/// Search filters (all given ones must match). Addresses compare
/// case-insensitively on the whole address, one pair of angle brackets
/// ignored (`sender = ""` or `"<>"` is the null sender); the Message-ID
/// header compares exactly, without its angle brackets; the time range
/// (inclusive, ms since the epoch) applies to the received time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub rcpt: Option<String>,
    pub sender: Option<String>,
    pub header_message_id: Option<String>,
    pub tenant: Option<String>,
    pub since_ms: Option<u64>,
    pub until_ms: Option<u64>,
    /// At most this many results (capped at [`MAX_LIMIT`]).
    pub limit: usize,
}

impl Default for Query {
    fn default() -> Self {
        Query {
            rcpt: None,
            sender: None,
            header_message_id: None,
            tenant: None,
            since_ms: None,
            until_ms: None,
            limit: 100,
        }
    }
}

/// An address as compared: trimmed, one pair of `<>` removed, lowercase.
pub fn norm_addr(s: &str) -> String {
    let s = s.trim();
    let s = s.strip_prefix('<').and_then(|r| r.strip_suffix('>')).unwrap_or(s);
    s.to_lowercase()
}

/// A Message-ID as compared: trimmed, one pair of `<>` removed.
pub fn norm_msgid(s: &str) -> &str {
    let s = s.trim();
    s.strip_prefix('<').and_then(|r| r.strip_suffix('>')).unwrap_or(s)
}

fn text(v: &Value, key: &str) -> Option<String> {
    v.get(key)?.as_str().map(str::to_string)
}

/// Every address in an event's `rcpt` and `rcpts`.
pub fn event_rcpts(ev: &Value) -> impl Iterator<Item = &str> {
    let one = ev.get("rcpt").and_then(Value::as_str);
    let many = ev
        .get("rcpts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str);
    one.into_iter().chain(many)
}

/// The summary of a message from its events, oldest first.
pub fn summarize(message_id: &str, events: &[Value]) -> MessageSummary {
    let mut s = MessageSummary {
        message_id: message_id.to_string(),
        received_at: None,
        tenant: None,
        user: None,
        sender: None,
        header_message_id: None,
        size: None,
        rcpts: Vec::new(),
        events: events.len(),
        last_event_at: events.last().and_then(|e| text(e, "ts")),
        dsn_ids: Vec::new(),
    };
    for ev in events {
        let kind = ev.get("event").and_then(Value::as_str).unwrap_or_default();
        if kind == "received" && s.received_at.is_none() {
            s.received_at = text(ev, "ts");
            s.size = ev.get("size").and_then(Value::as_u64);
        }
        s.tenant = s.tenant.take().or_else(|| text(ev, "tenant"));
        s.user = s.user.take().or_else(|| text(ev, "user"));
        s.sender = s.sender.take().or_else(|| text(ev, "sender"));
        if let Some(h) = text(ev, "header_message_id") {
            s.header_message_id = Some(h);
        }
        // Recipients come from the envelope and delivery events; others
        // name them in another form (`suppressed`: normalized) or again
        // (`dsn_queued`).
        let envelope = matches!(kind, "received" | "deferred" | "delivered" | "bounced" | "expired");
        for a in event_rcpts(ev).filter(|_| envelope) {
            if !s.rcpts.iter().any(|r| r.address == a) {
                s.rcpts.push(RcptSummary {
                    address: a.to_string(),
                    status: RcptStatus::Queued,
                    attempts: 0,
                    updated_at: None,
                });
            }
        }
        let status = match kind {
            "deferred" => Some(RcptStatus::Deferred),
            "delivered" => Some(RcptStatus::Delivered),
            "bounced" => Some(RcptStatus::Bounced),
            "expired" => Some(RcptStatus::Expired),
            _ => None,
        };
        if let (Some(status), Some(a)) = (status, ev.get("rcpt").and_then(Value::as_str))
            && let Some(r) = s.rcpts.iter_mut().find(|r| r.address == a)
        {
            r.status = status;
            r.updated_at = text(ev, "ts");
            if let Some(n) = ev.get("attempt").and_then(Value::as_u64) {
                r.attempts = u32::try_from(n).unwrap_or(u32::MAX);
            }
        }
        if kind == "dsn_queued"
            && let Some(d) = text(ev, "dsn_id")
            && !s.dsn_ids.contains(&d)
        {
            s.dsn_ids.push(d);
        }
    }
    if s.received_at.is_none() {
        s.received_at = events.first().and_then(|e| text(e, "ts"));
    }
    s
}

/// Whether the events of a message really match the string filters of
/// `q` (the index matched hashes; the time range was checked there).
pub fn confirm(q: &Query, events: &[Value], s: &MessageSummary) -> bool {
    if let Some(want) = &q.rcpt {
        let want = norm_addr(want);
        if !events.iter().flat_map(event_rcpts).any(|a| a.to_lowercase() == want) {
            return false;
        }
    }
    if let Some(want) = &q.sender
        && s.sender.as_deref().map(str::to_lowercase) != Some(norm_addr(want))
    {
        return false;
    }
    if let Some(want) = &q.header_message_id
        && !events
            .iter()
            .filter_map(|e| e.get("header_message_id").and_then(Value::as_str))
            .any(|h| h == norm_msgid(want))
    {
        return false;
    }
    if let Some(want) = &q.tenant
        && s.tenant.as_deref() != Some(want.as_str())
    {
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn life() -> Vec<Value> {
        vec![
            json!({"ts":"2026-11-23T04:00:00.000Z","event":"received","message_id":"m1","tenant":"acme","user":"app",
                   "sender":"News@Example.com","rcpts":["a@x.org","B@y.org"],"size":1234,"header_message_id":"abc@example.com"}),
            json!({"ts":"2026-11-23T04:00:01.000Z","event":"delivered","message_id":"m1","rcpt":"a@x.org","attempt":1}),
            json!({"ts":"2026-11-23T04:00:02.000Z","event":"deferred","message_id":"m1","rcpt":"B@y.org","attempt":1}),
            json!({"ts":"2026-11-23T05:00:02.000Z","event":"bounced","message_id":"m1","rcpt":"B@y.org","attempt":2}),
            json!({"ts":"2026-11-23T05:00:03.000Z","event":"suppressed","message_id":"m1","rcpt":"b@y.org"}),
            json!({"ts":"2026-11-23T05:00:03.000Z","event":"dsn_queued","message_id":"m1","rcpts":["B@y.org"],"dsn_id":"d1"}),
        ]
    }

    #[test]
    fn summary_of_a_life() {
        let s = summarize("m1", &life());
        assert_eq!(s.received_at.as_deref(), Some("2026-11-23T04:00:00.000Z"));
        assert_eq!(s.tenant.as_deref(), Some("acme"));
        assert_eq!(s.user.as_deref(), Some("app"));
        assert_eq!(s.sender.as_deref(), Some("News@Example.com"));
        assert_eq!(s.header_message_id.as_deref(), Some("abc@example.com"));
        assert_eq!(s.size, Some(1234));
        assert_eq!(s.events, 6);
        assert_eq!(s.last_event_at.as_deref(), Some("2026-11-23T05:00:03.000Z"));
        assert_eq!(s.dsn_ids, vec!["d1"]);
        let states: Vec<(&str, RcptStatus, u32)> = s
            .rcpts
            .iter()
            .map(|r| (r.address.as_str(), r.status, r.attempts))
            .collect();
        assert_eq!(
            states,
            vec![
                ("a@x.org", RcptStatus::Delivered, 1),
                ("B@y.org", RcptStatus::Bounced, 2)
            ]
        );
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["rcpts"][1]["status"], "bounced");
    }

    #[test]
    fn summary_without_received() {
        let evs = vec![
            json!({"ts":"2026-11-23T06:00:00.000Z","event":"deferred","message_id":"d1","sender":"","rcpt":"news@example.com","attempt":1}),
        ];
        let s = summarize("d1", &evs);
        assert_eq!(s.received_at.as_deref(), Some("2026-11-23T06:00:00.000Z"));
        assert_eq!(s.sender.as_deref(), Some(""));
        assert_eq!(s.rcpts[0].status, RcptStatus::Deferred);
        assert_eq!(summarize("x", &[]).received_at, None);
    }

    #[test]
    fn confirming_filters() {
        let evs = life();
        let s = summarize("m1", &evs);
        let q = |f: fn(&mut Query)| {
            let mut q = Query::default();
            f(&mut q);
            confirm(&q, &evs, &s)
        };
        assert!(q(|_| ()));
        assert!(q(|q| q.rcpt = Some("b@Y.ORG".into())));
        assert!(q(|q| q.rcpt = Some("<a@x.org>".into())));
        assert!(!q(|q| q.rcpt = Some("c@x.org".into())));
        assert!(!q(|q| q.rcpt = Some("a@x.or".into())));
        assert!(q(|q| q.sender = Some("news@example.com".into())));
        assert!(!q(|q| q.sender = Some("".into())));
        assert!(q(|q| q.header_message_id = Some("<abc@example.com>".into())));
        assert!(!q(|q| q.header_message_id = Some("ABC@example.com".into())));
        assert!(q(|q| q.tenant = Some("acme".into())));
        assert!(!q(|q| q.tenant = Some("other".into())));
        assert_eq!(norm_addr(" <> "), "");
    }
}
