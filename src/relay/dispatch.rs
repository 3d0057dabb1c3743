//! Delivery workers: `relay.max_connections` tasks, each owning at most one
//! upstream connection (reused up to `relay.max_messages_per_connection`,
//! closed after `relay.idle_timeout`). A worker takes a job, runs one
//! transaction, turns the replies into per-recipient outcomes, records them
//! in the spool, emits events and re-schedules what was deferred.
//!
//! Trust boundary: reads the spool and the queue, talks to the upstream via
//! `client`; decides nothing about policy.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::client::{RelayConn, TxReplies, Upstream};
use crate::events::{Event, EventKind, Events, ReplyRecord, rfc3339};
use crate::queue::outcome::{Outcome, outcomes};
use crate::queue::{Job, Queue, now_ms};
use crate::spool::{Attempt, RcptStatus, Spool};

pub struct Dispatcher {
    pub upstream: Arc<Upstream>,
    pub queue: Arc<Queue>,
    pub spool: Arc<Spool>,
    pub events: Events,
    pub max_per_conn: usize,
    pub idle_timeout: Duration,
    /// Bounds concurrent state writes (a move-out costs an fsync): during an
    /// upstream outage every message is deferred at once, and this keeps
    /// that from becoming hundreds of blocking threads.
    pub persist_slots: tokio::sync::Semaphore,
}

impl Dispatcher {
    /// Start `n` workers on `tracker`; they stop taking jobs when `stop` is
    /// cancelled (a transaction in progress finishes).
    pub fn spawn(self: &Arc<Self>, n: usize, tracker: &TaskTracker, stop: CancellationToken) {
        for w in 0..n {
            let me = Arc::clone(self);
            let stop = stop.clone();
            tracker.spawn(async move { me.worker(w, stop).await });
        }
    }

    async fn worker(self: Arc<Self>, w: usize, stop: CancellationToken) {
        let mut conn: Option<RelayConn> = None;
        loop {
            let job = tokio::select! {
                j = self.queue.next() => j,
                _ = tokio::time::sleep(self.idle_timeout), if conn.is_some() => {
                    if let Some(c) = conn.take() {
                        debug!(worker = w, "closing idle upstream connection");
                        c.quit(self.upstream.command_timeout).await;
                    }
                    continue;
                }
                _ = stop.cancelled() => break,
            };
            self.deliver(job, &mut conn).await;
        }
        if let Some(c) = conn.take() {
            c.quit(self.upstream.command_timeout).await;
        }
    }

    async fn deliver(&self, job: Job, conn: &mut Option<RelayConn>) {
        {
            let mut st = job.msg.state.lock().unwrap();
            if st.busy {
                // Another worker has this message: try these recipients again
                // shortly, after it recorded its outcome.
                drop(st);
                self.queue.schedule(job, now_ms() + 1000);
                return;
            }
            st.busy = true;
        }
        let (from, rcpts, smtputf8, eightbit, size, body) = {
            let st = job.msg.state.lock().unwrap();
            let e = &st.env;
            let rcpts: Vec<String> = job.rcpts.iter().map(|&i| e.rcpts[i].addr.clone()).collect();
            (
                e.mail_from.clone(),
                rcpts,
                e.smtputf8,
                e.eightbit,
                e.size,
                st.body.clone(),
            )
        };
        let body = match body {
            Some(b) => b,
            None => {
                let (spool, id, loc) = (
                    Arc::clone(&self.spool),
                    job.msg.id.clone(),
                    job.msg.state.lock().unwrap().loc,
                );
                match tokio::task::spawn_blocking(move || spool.read_body(&id, loc)).await {
                    Ok(Ok(b)) => Arc::new(b),
                    other => {
                        let why = format!("cannot read message from spool: {other:?}");
                        warn!(id = %job.msg.id, "{why}");
                        let outs = vec![Outcome::Deferred(ReplyRecord::local(why)); job.rcpts.len()];
                        self.apply(job, outs, None).await;
                        return;
                    }
                }
            }
        };
        let rcpt_refs: Vec<&str> = rcpts.iter().map(String::as_str).collect();
        let mut retried = false;
        let outs = loop {
            let reused = conn.is_some();
            if conn.is_none() {
                match self.upstream.connect().await {
                    Ok(c) => *conn = Some(c),
                    Err(e) => {
                        info!(id = %job.msg.id, error = ?e, "upstream connection failed");
                        break vec![Outcome::Deferred(e.record()); rcpts.len()];
                    }
                }
            }
            let c = conn.as_mut().expect("connected");
            if let Some(refusal) = local_refusal(c, smtputf8, eightbit, size) {
                break vec![Outcome::Bounced(refusal); rcpts.len()];
            }
            let mut params = String::new();
            if c.caps.size.is_some() {
                params.push_str(&format!(" SIZE={size}"));
            }
            if eightbit && c.caps.eightbitmime {
                params.push_str(" BODY=8BITMIME");
            }
            if smtputf8 {
                params.push_str(" SMTPUTF8");
            }
            let tx: TxReplies = c.transaction(&self.upstream, &from, &params, &rcpt_refs, &body).await;
            if tx.error.is_some() {
                *conn = None;
                if tx.stale && reused && !retried {
                    // A pooled connection the upstream had closed: reconnect once.
                    retried = true;
                    continue;
                }
            } else if c.transactions >= self.max_per_conn
                && let Some(c) = conn.take()
            {
                c.quit(self.upstream.command_timeout).await;
            }
            break outcomes(&tx, rcpts.len());
        };
        self.apply(job, outs, Some(body)).await;
    }

    /// Record outcomes: state, spool, events, re-scheduling.
    async fn apply(&self, job: Job, outs: Vec<Outcome>, body: Option<Arc<Vec<u8>>>) {
        let now = now_ms();
        let mut events = Vec::with_capacity(outs.len());
        let mut deferred: Vec<(usize, u64)> = Vec::new();
        let (env, loc, complete) = {
            let mut st = job.msg.state.lock().unwrap();
            let max_age_ms = self.queue.cfg.max_age.as_millis() as u64;
            let received = st.env.received_at_ms;
            let (tenant, user, sender) = (st.env.tenant.clone(), st.env.user.clone(), st.env.mail_from.clone());
            for (&i, out) in job.rcpts.iter().zip(outs) {
                let r = &mut st.env.rcpts[i];
                r.attempts += 1;
                let (kind, reply) = match out {
                    Outcome::Delivered(rep) => {
                        r.status = RcptStatus::Delivered;
                        (EventKind::Delivered, rep)
                    }
                    Outcome::Bounced(rep) => {
                        r.status = RcptStatus::Bounced;
                        (EventKind::Bounced, rep)
                    }
                    Outcome::Deferred(rep) => {
                        // The last attempt happens at received + max_age at the
                        // latest; deferred then, the recipient expires.
                        let deadline = received + max_age_ms;
                        let next = (now + self.queue.backoff(r.attempts, &job.msg.id).as_millis() as u64).min(deadline);
                        if now >= deadline {
                            r.status = RcptStatus::Expired;
                            (EventKind::Expired, rep)
                        } else {
                            r.next_attempt_ms = next;
                            deferred.push((i, next));
                            (EventKind::Deferred, rep)
                        }
                    }
                };
                let outcome = match kind {
                    EventKind::Delivered => "delivered",
                    EventKind::Bounced => "bounced",
                    EventKind::Expired => "expired",
                    _ => "deferred",
                };
                r.record(Attempt {
                    at_ms: now,
                    outcome: outcome.into(),
                    reply: reply.clone(),
                });
                let mut ev = Event::new(kind);
                ev.message_id = Some(job.msg.id.clone());
                ev.tenant = Some(tenant.clone());
                ev.user = user.clone();
                ev.sender = Some(sender.clone());
                ev.rcpt = Some(r.addr.clone());
                ev.reply = Some(reply);
                ev.attempt = Some(r.attempts);
                ev.received_at = Some(rfc3339(std::time::UNIX_EPOCH + Duration::from_millis(received)));
                if kind == EventKind::Deferred {
                    ev.next_attempt_at = Some(rfc3339(
                        std::time::UNIX_EPOCH + Duration::from_millis(r.next_attempt_ms),
                    ));
                }
                events.push(ev);
            }
            let complete = st.env.is_complete();
            st.busy = false;
            // The body is on disk; keep memory for fresh messages only.
            self.queue.release_body(&mut st);
            (if complete { None } else { Some(st.env.clone()) }, st.loc, complete)
        };
        if complete {
            self.spool.complete(&job.msg.id, loc);
            self.queue.remove(&job.msg.id);
        } else if let Some(env) = env {
            let _slot = self.persist_slots.acquire().await;
            match self.spool.save_state(env, loc, body).await {
                Ok(new_loc) => job.msg.state.lock().unwrap().loc = new_loc,
                Err(e) => {
                    warn!(id = %job.msg.id, error = %e, "cannot save delivery state; the message stays where it was")
                }
            }
        }
        for ev in events {
            self.events.emit(ev).await;
        }
        // Recipients deferred in this attempt share one retry time per due.
        let mut groups: Vec<(u64, Vec<usize>)> = Vec::new();
        for (i, due) in deferred {
            match groups.iter_mut().find(|(d, _)| *d == due) {
                Some((_, v)) => v.push(i),
                None => groups.push((due, vec![i])),
            }
        }
        for (due, rcpts) in groups {
            self.queue.schedule(
                Job {
                    msg: Arc::clone(&job.msg),
                    rcpts,
                },
                due,
            );
        }
    }
}

/// Refuse locally what the upstream cannot take without a downgrade.
fn local_refusal(c: &RelayConn, smtputf8: bool, eightbit: bool, size: usize) -> Option<ReplyRecord> {
    if eightbit && !c.caps.eightbitmime {
        // RFC 6152 §3: 8-bit content only to a server offering 8BITMIME.
        return Some(ReplyRecord {
            code: Some(554),
            enhanced: Some("5.6.3".into()),
            text:
                "upstream does not support 8BITMIME; 8-bit message not downgraded (sendguard:eightbitmime_unsupported)"
                    .into(),
        });
    }
    if smtputf8 && !c.caps.smtputf8 {
        return Some(ReplyRecord {
            code: Some(550),
            enhanced: Some("5.6.7".into()),
            text: "upstream does not support SMTPUTF8; message not downgraded (sendguard:smtputf8_unsupported)".into(),
        });
    }
    if c.caps.size.is_some_and(|max| size as u64 > max) {
        return Some(ReplyRecord {
            code: Some(552),
            enhanced: Some("5.3.4".into()),
            text: format!("message of {size} bytes exceeds the upstream SIZE limit (sendguard:message_too_big)"),
        });
    }
    None
}
