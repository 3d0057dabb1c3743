//! `sendguard queue list|show`: a read-only view of the spool, usable while
//! the server runs or after it stopped (like `postqueue -p` / `postcat`).

use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use serde::Serialize;

use crate::events::rfc3339;
use crate::spool::{self, Envelope, Location, RcptStatus};

#[derive(Debug, Serialize)]
pub struct Summary {
    pub id: String,
    pub received_at: String,
    pub tenant: String,
    pub sender: String,
    pub size: usize,
    pub recipients: usize,
    pub pending: usize,
    pub next_attempt_at: Option<String>,
    pub last_reply: Option<String>,
    /// `segment` (first attempt pending) or `file` (deferred at least once).
    pub stored_in: &'static str,
}

fn ts(ms: u64) -> String {
    rfc3339(UNIX_EPOCH + Duration::from_millis(ms))
}

fn summary(env: &Envelope, loc: Location) -> Summary {
    let pending: Vec<_> = env.rcpts.iter().filter(|r| r.status == RcptStatus::Pending).collect();
    Summary {
        id: env.id.clone(),
        received_at: ts(env.received_at_ms),
        tenant: env.tenant.clone(),
        sender: env.mail_from.clone(),
        size: env.size,
        recipients: env.rcpts.len(),
        pending: pending.len(),
        next_attempt_at: pending
            .iter()
            .map(|r| r.next_attempt_ms)
            .min()
            .filter(|m| *m > 0)
            .map(ts),
        last_reply: env
            .rcpts
            .iter()
            .filter_map(|r| r.history.last())
            .max_by_key(|a| a.at_ms)
            .map(|a| {
                format!(
                    "{} {} {}",
                    a.reply.code.map(|c| c.to_string()).unwrap_or_default(),
                    a.reply.enhanced.clone().unwrap_or_default(),
                    a.reply.text
                )
                .trim()
                .to_string()
            }),
        stored_in: match loc {
            Location::Segment { .. } => "segment",
            Location::File => "file",
        },
    }
}

/// Every queued message, oldest first.
pub fn list(dir: &Path) -> std::io::Result<Vec<Summary>> {
    let mut all = spool::scan(dir)?;
    all.sort_by(|a, b| (a.env.received_at_ms, &a.env.id).cmp(&(b.env.received_at_ms, &b.env.id)));
    Ok(all.iter().map(|r| summary(&r.env, r.loc)).collect())
}

/// One message's envelope with its per-recipient state and attempt history.
pub fn show(dir: &Path, id: &str) -> std::io::Result<Option<Envelope>> {
    Ok(spool::scan(dir)?.into_iter().find(|r| r.env.id == id).map(|r| r.env))
}

pub fn render_list(items: &[Summary]) -> String {
    let mut out = String::new();
    for s in items {
        out.push_str(&format!(
            "{}  {}  {:>8}B  {:<10} <{}>  {}/{} pending  next: {}\n",
            s.id,
            s.received_at,
            s.size,
            s.tenant,
            s.sender,
            s.pending,
            s.recipients,
            s.next_attempt_at.as_deref().unwrap_or("now"),
        ));
        if let Some(r) = &s.last_reply {
            out.push_str(&format!("    last reply: {r}\n"));
        }
    }
    out.push_str(&format!("-- {} message(s) queued\n", items.len()));
    out
}

pub fn render_show(env: &Envelope) -> String {
    let mut out = format!(
        "id: {}\nreceived: {}\ntenant: {}\nuser: {}\npeer: {} (helo {}, tls {})\nsender: <{}>\nsize: {} bytes\n",
        env.id,
        ts(env.received_at_ms),
        env.tenant,
        env.user.as_deref().unwrap_or("-"),
        env.peer,
        env.helo,
        env.tls.as_deref().unwrap_or("none"),
        env.mail_from,
        env.size
    );
    for r in &env.rcpts {
        let status = format!("{:?}", r.status).to_lowercase();
        out.push_str(&format!("rcpt <{}>: {status}, {} attempt(s)", r.addr, r.attempts));
        if r.status == RcptStatus::Pending && r.next_attempt_ms > 0 {
            out.push_str(&format!(", next {}", ts(r.next_attempt_ms)));
        }
        out.push('\n');
        for a in &r.history {
            out.push_str(&format!(
                "    {} {}: {} {} {}\n",
                ts(a.at_ms),
                a.outcome,
                a.reply.code.map(|c| c.to_string()).unwrap_or_else(|| "---".into()),
                a.reply.enhanced.as_deref().unwrap_or(""),
                a.reply.text
            ));
        }
    }
    out
}
