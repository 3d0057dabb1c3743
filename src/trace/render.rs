//! Text views of traces for `sendguard trace`: one message's life, and a
//! search result table. Pure (JSON in, text out).
//!
//! Trust boundary: the values came from our own API but hold client- and
//! upstream-supplied text; control characters are replaced so a crafted
//! reply cannot move the terminal's cursor.

use std::fmt::Write;

use serde_json::Value;

use super::summary::{MessageSummary, MessageTrace};

fn clean(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { '?' } else { c }).collect()
}

fn field<'a>(v: &'a Value, k: &str) -> Option<&'a str> {
    v[k].as_str()
}

fn reply(v: &Value) -> String {
    let r = &v["reply"];
    if r.is_null() {
        return String::new();
    }
    let mut s = String::new();
    if let Some(c) = r["code"].as_u64() {
        let _ = write!(s, "{c} ");
    }
    if let Some(e) = r["enhanced"].as_str() {
        let _ = write!(s, "{e} ");
    }
    s.push_str(r["text"].as_str().unwrap_or(""));
    clean(&s)
}

/// One message: summary, submission details with the session's checks,
/// recipients' states, every event; then each DSN the same way.
pub fn message(t: &MessageTrace) -> String {
    let mut out = String::new();
    render(t, &mut out, "");
    out
}

fn render(t: &MessageTrace, out: &mut String, indent: &str) {
    let s = &t.summary;
    let _ = writeln!(out, "{indent}message {}", clean(&t.message_id));
    let line = |out: &mut String, k: &str, v: Option<&str>| {
        if let Some(v) = v {
            let _ = writeln!(out, "{indent}  {k:<11} {}", clean(v));
        }
    };
    line(out, "received", s.received_at.as_deref());
    line(out, "tenant", s.tenant.as_deref());
    line(out, "credential", s.user.as_deref());
    line(
        out,
        "sender",
        s.sender.as_deref().map(|x| if x.is_empty() { "<>" } else { x }),
    );
    line(out, "message-id", s.header_message_id.as_deref());
    if let Some(size) = s.size {
        let _ = writeln!(out, "{indent}  {:<11} {size} bytes", "size");
    }
    if let Some(rcv) = t.events.iter().find(|e| e["event"] == "received") {
        line(out, "session", field(rcv, "session_id"));
        line(out, "peer", field(rcv, "peer"));
        line(out, "tls", Some(field(rcv, "tls").unwrap_or("none")));
        if let Some(checks) = rcv["checks"].as_array() {
            let _ = writeln!(out, "{indent}  checks");
            for c in checks {
                let count = c["count"].as_u64().unwrap_or(1);
                let _ = writeln!(
                    out,
                    "{indent}    {:<5} {:<22} {}{}{}",
                    clean(c["stage"].as_str().unwrap_or("")),
                    clean(c["check"].as_str().unwrap_or("")),
                    clean(c["result"].as_str().unwrap_or("")),
                    if count > 1 {
                        format!(" ×{count}")
                    } else {
                        String::new()
                    },
                    c["detail"]
                        .as_str()
                        .map(|d| format!(": {}", clean(d)))
                        .unwrap_or_default(),
                );
            }
        }
    }
    if !s.rcpts.is_empty() {
        let _ = writeln!(out, "{indent}  recipients");
        for r in &s.rcpts {
            let status = serde_json::to_value(r.status).ok();
            let _ = writeln!(
                out,
                "{indent}    {:<32} {:<9} {} attempt{}",
                clean(&r.address),
                status.as_ref().and_then(Value::as_str).unwrap_or(""),
                r.attempts,
                if r.attempts == 1 { "" } else { "s" }
            );
        }
    }
    let _ = writeln!(out, "{indent}  events");
    for e in &t.events {
        let mut l = format!(
            "{indent}    {} {:<12}",
            clean(field(e, "ts").unwrap_or("")),
            clean(field(e, "event").unwrap_or(""))
        );
        if let Some(r) = field(e, "rcpt") {
            let _ = write!(l, " {}", clean(r));
        }
        if let Some(a) = e["attempt"].as_u64() {
            let _ = write!(l, " attempt {a}");
        }
        if let Some(p) = field(e, "provider") {
            let _ = write!(l, " via {}", clean(p));
        }
        let r = reply(e);
        if !r.is_empty() {
            let _ = write!(l, " | {r}");
        }
        if let Some(c) = field(e, "category") {
            let _ = write!(l, " [{}]", clean(c));
        }
        if let Some(n) = field(e, "next_attempt_at") {
            let _ = write!(l, " next {}", clean(n));
        }
        if let Some(d) = field(e, "dsn_id") {
            let _ = write!(l, " dsn {}", clean(d));
        }
        out.push_str(l.trim_end());
        out.push('\n');
    }
    for d in &t.dsns {
        let _ = writeln!(out, "{indent}  delivery status notification:");
        render(d, out, &format!("{indent}    "));
    }
}

/// Search results, one line each: id, received, sender, recipients with states.
pub fn summaries(list: &[MessageSummary]) -> String {
    let mut out = String::new();
    for s in list {
        let rcpts: Vec<String> = s
            .rcpts
            .iter()
            .map(|r| {
                let st = serde_json::to_value(r.status).ok();
                format!(
                    "{}={}",
                    clean(&r.address),
                    st.as_ref().and_then(Value::as_str).unwrap_or("")
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "{}\t{}\t{}\t{}",
            clean(&s.message_id),
            clean(s.received_at.as_deref().unwrap_or("")),
            clean(
                s.sender
                    .as_deref()
                    .map(|x| if x.is_empty() { "<>" } else { x })
                    .unwrap_or("")
            ),
            rcpts.join(" ")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{RcptStatus, RcptSummary};

    #[test]
    fn a_trace_reads_top_to_bottom() {
        let events: Vec<Value> = serde_json::from_str(
            r#"[
 {"ts":"2026-11-23T04:00:00.000Z","event":"received","message_id":"m1","session_id":"s1","peer":"192.0.2.1:1234","tls":"TLSv1_3",
  "checks":[{"stage":"mail","check":"sender_rights","result":"pass","count":1},
            {"stage":"rcpt","check":"recipient_domain","result":"warn","count":2,"detail":"550 5.1.2 no\u001b[2J"}]},
 {"ts":"2026-11-23T04:00:01.000Z","event":"bounced","message_id":"m1","rcpt":"b@x.example","attempt":1,"provider":"google",
  "reply":{"code":550,"enhanced":"5.1.1","text":"User unknown"},"category":"user_unknown"}
]"#,
        )
        .unwrap();
        let t = MessageTrace {
            message_id: "m1".into(),
            summary: MessageSummary {
                message_id: "m1".into(),
                received_at: Some("2026-11-23T04:00:00.000Z".into()),
                tenant: Some("acme".into()),
                user: Some("app".into()),
                sender: Some(String::new()),
                header_message_id: Some("abc@host".into()),
                size: Some(1234),
                rcpts: vec![RcptSummary {
                    address: "b@x.example".into(),
                    status: RcptStatus::Bounced,
                    attempts: 1,
                    updated_at: None,
                }],
                events: 2,
                last_event_at: None,
                dsn_ids: vec![],
            },
            events,
            dsns: vec![],
        };
        let text = message(&t);
        for want in [
            "message m1\n",
            "  sender      <>\n",
            "  tls         TLSv1_3\n",
            "    mail  sender_rights          pass\n",
            "    rcpt  recipient_domain       warn ×2: 550 5.1.2 no?[2J\n",
            "    b@x.example                      bounced   1 attempt\n",
            "    2026-11-23T04:00:01.000Z bounced      b@x.example attempt 1 via google | 550 5.1.1 User unknown [user_unknown]\n",
        ] {
            assert!(text.contains(want), "{want:?} not in\n{text}");
        }
        assert!(!text.contains('\u{1b}'));
        assert_eq!(
            summaries(std::slice::from_ref(&t.summary)),
            "m1\t2026-11-23T04:00:00.000Z\t<>\tb@x.example=bounced\n"
        );
    }
}
