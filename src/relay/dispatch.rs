//! Delivery workers: `relay.max_connections` tasks, each owning at most one
//! upstream connection (reused up to `relay.max_messages_per_connection`,
//! closed after `relay.idle_timeout`). A worker takes a job, runs one
//! transaction, turns the replies into per-recipient outcomes, records them
//! in the spool, emits events and re-schedules what was deferred.
//!
//! Trust boundary: reads the spool and the queue, talks to the upstream via
//! `client`; decides nothing about policy.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use super::client::{Caps, RelayConn, TxReplies, Upstream, envelope_commands};
use crate::classify::{Category, Classification, Classifier};
use crate::events::{Event, EventKind, Events, ReplyRecord, rfc3339};
use crate::pipeline::SpoolSink;
use crate::queue::outcome::{Outcome, Scope, outcomes, too_many_recipients};
use crate::queue::{ChainTicket, Job, Queue, now_ms};
use crate::shards::Shards;
use crate::spool::{Attempt, Envelope, Location, RcptStatus, Spool};
use crate::suppress::{Entry, Reason, SuppressionStore};

pub struct Dispatcher {
    pub upstream: Arc<Upstream>,
    pub queue: Arc<Queue>,
    pub spool: Arc<Spool>,
    pub events: Events,
    pub classifier: Arc<Classifier>,
    /// Where hard bounces are suppressed (`None`: not at all).
    pub suppress: Option<Arc<dyn SuppressionStore>>,
    /// Queues DSNs to envelope senders (`None`: no DSNs at all).
    pub dsn: Option<DsnPolicy>,
    pub max_per_conn: usize,
    pub idle_timeout: Duration,
    /// Bounds concurrent state writes (a move-out costs an fsync): during an
    /// upstream outage every message is deferred at once, and this keeps
    /// that from becoming hundreds of blocking threads.
    pub persist_slots: tokio::sync::Semaphore,
    /// Delivery outcomes feed the circuit breakers (their changes hold or
    /// release queued mail through it).
    pub policy: crate::pipeline::PolicyHandle,
    /// Pinned segments where compaction found nothing to move, with their
    /// count of messages then ([`Dispatcher::compact_spool`]).
    pub compact_idle: std::sync::Mutex<HashMap<u64, usize>>,
}

impl Dispatcher {
    /// Start `n` workers on `tracker`, spread over `shards`; they stop
    /// taking jobs when `stop` is cancelled (a transaction in progress
    /// finishes).
    pub fn spawn(self: &Arc<Self>, n: usize, shards: &Shards, tracker: &TaskTracker, stop: CancellationToken) {
        for w in 0..n {
            let me = Arc::clone(self);
            let stop = stop.clone();
            shards.spawn(tracker, async move { me.worker(w, stop).await });
        }
    }

    async fn worker(self: Arc<Self>, w: usize, stop: CancellationToken) {
        let mut conn: Option<RelayConn> = None;
        // A job taken while the previous one's content went out (its
        // envelope possibly written behind that content).
        let mut carried: Option<Carried<'_>> = None;
        loop {
            let (ready, _slot, sent, ticket) = match carried.take() {
                Some(Carried {
                    job: Taken::Ready(r),
                    slot,
                    sent,
                    ticket,
                }) => (r, slot, sent, ticket),
                Some(Carried {
                    job: Taken::Job(job),
                    slot,
                    ticket,
                    ..
                }) => match self.prepare(job).await {
                    Some(r) => (r, slot, false, ticket),
                    None => continue,
                },
                None => {
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
                    // Released when the delivery is over, even if it panicked.
                    let slot = Slot(&self.queue, Arc::clone(&job.provider));
                    let ticket = self.queue.chain_ticket();
                    match self.prepare(job).await {
                        Some(r) => (r, slot, false, ticket),
                        None => continue,
                    }
                }
            };
            // Once stopping, no further job is chained (one whose envelope
            // already went out is still delivered, above).
            let ticket = (!stop.is_cancelled()).then_some(ticket);
            carried = self.deliver(ready, &mut conn, sent, ticket).await;
        }
        if let Some(c) = conn.take() {
            c.quit(self.upstream.command_timeout).await;
        }
    }

    /// Move the messages keeping mostly-empty segments alive out to files
    /// of their own ([`Spool::pinned_segments`]), so the segments can go.
    /// A message being delivered (or already complete) is skipped: its
    /// outcome moves or completes it. The moves run together, so the
    /// spool's mover batches them (one sync per batch); a job of a moving
    /// message that comes up parks and goes after. A segment where nothing
    /// could be moved is not looked at again until its count changes (one
    /// whose damaged copy is kept on purpose never empties). At most 4,096
    /// messages per call. Returns how many were moved.
    pub async fn compact_spool(&self, min_sealed: Duration) -> usize {
        let pinned = self.spool.pinned_segments(min_sealed);
        let segs: Vec<u64> = {
            let mut idle = self.compact_idle.lock().unwrap();
            idle.retain(|s, _| pinned.iter().any(|(p, _)| p == s));
            pinned
                .iter()
                .filter(|(s, live)| idle.get(s) != Some(live))
                .map(|(s, _)| *s)
                .collect()
        };
        if segs.is_empty() {
            return 0;
        }
        let mut found: HashMap<u64, usize> = HashMap::new();
        let mut claimed = Vec::new();
        let mut scanned_all = true;
        for msg in self.queue.messages() {
            if claimed.len() >= 4096 {
                scanned_all = false;
                break;
            }
            let mut st = msg.state.lock().unwrap();
            let Location::Segment { seg, .. } = st.loc else {
                continue;
            };
            if !segs.contains(&seg) {
                continue;
            }
            *found.entry(seg).or_default() += 1;
            if st.busy || st.env.is_complete() {
                continue;
            }
            st.busy = true;
            let (env, loc, body) = (st.env.clone(), st.loc, st.body.clone());
            drop(st);
            claimed.push((msg, env, loc, body));
        }
        // Only a scan of the whole queue can tell that a segment has
        // nothing movable.
        if scanned_all {
            let mut idle = self.compact_idle.lock().unwrap();
            for (seg, live) in &pinned {
                if segs.contains(seg) && !found.contains_key(seg) {
                    idle.insert(*seg, *live);
                }
            }
        }
        let moves = claimed.into_iter().map(|(msg, env, loc, body)| async move {
            let saved = self.spool.save_state(env, loc, body).await;
            (msg, saved)
        });
        let mut moved = 0;
        for (msg, saved) in futures_util::future::join_all(moves).await {
            let parked = {
                let mut st = msg.state.lock().unwrap();
                match saved {
                    Ok(new_loc) => {
                        st.loc = new_loc;
                        moved += 1;
                    }
                    Err(e) => warn!(message_id = %msg.id, error = %e, "cannot move a message out of its segment"),
                }
                st.busy = false;
                std::mem::take(&mut st.parked)
            };
            for j in parked {
                self.queue.schedule(j, now_ms());
            }
        }
        if moved > 0 {
            info!(
                messages = moved,
                segments = segs.len(),
                "moved waiting messages out of mostly-empty spool segments"
            );
        }
        moved
    }

    /// Run [`Dispatcher::compact_spool`] every `after / 2` (at most every
    /// 30 s) until `stop`.
    pub async fn compact_loop(self: Arc<Self>, after: Duration, stop: CancellationToken) {
        let mut tick = tokio::time::interval((after / 2).min(Duration::from_secs(30)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            self.compact_spool(after).await;
        }
    }

    /// Claim the job's message and get its content (read back from the
    /// spool if it is not in memory). `None`: another worker has the
    /// message (the job is parked with it) or the content could not be
    /// read (the job is deferred).
    async fn prepare(&self, job: Job) -> Option<Ready> {
        let job = match self.claim(job, false) {
            Claimed::Ready(r) => return Some(r),
            Claimed::Parked => return None,
            Claimed::NoBody(job) => job,
        };
        let (spool, id, loc) = (
            Arc::clone(&self.spool),
            job.msg.id.clone(),
            job.msg.state.lock().unwrap().loc,
        );
        match tokio::task::spawn_blocking(move || spool.read_body(&id, loc)).await {
            Ok(Ok(b)) => Some(Ready::new(job, Arc::new(b))),
            other => {
                let why = format!("cannot read message from spool: {other:?}");
                warn!(message_id = %job.msg.id, "{why}");
                let outs = vec![(Outcome::Deferred(ReplyRecord::local(why)), Scope::Path); job.rcpts.len()];
                self.apply(job, outs, None).await;
                None
            }
        }
    }

    /// Mark the job's message busy (or park the job if another worker has
    /// it). With `need_body`, a message whose content is not in memory is
    /// left unclaimed ([`Claimed::NoBody`]).
    fn claim(&self, job: Job, need_body: bool) -> Claimed {
        let body = {
            let msg = Arc::clone(&job.msg);
            let mut st = msg.state.lock().unwrap();
            if st.busy {
                // Another worker has this message (its recipients at another
                // provider): these go again once it recorded its outcome.
                st.parked.push(job);
                return Claimed::Parked;
            }
            if need_body && st.body.is_none() {
                drop(st);
                return Claimed::NoBody(job);
            }
            st.busy = true;
            st.body.clone()
        };
        match body {
            Some(b) => Claimed::Ready(Ready::new(job, b)),
            None => Claimed::NoBody(job),
        }
    }

    /// Take a job that can go now, to chain behind content being sent on
    /// `caps`'s connection; its envelope commands if it can be chained.
    fn chain_next<'q>(
        &'q self,
        caps: &Caps,
        ticket: ChainTicket<'q>,
        carried: &mut Option<Carried<'q>>,
    ) -> Option<Vec<u8>> {
        let (job, ticket) = ticket.take()?;
        let slot = Slot(&self.queue, Arc::clone(&job.provider));
        match self.claim(job, true) {
            Claimed::Parked => None,
            Claimed::NoBody(job) => {
                *carried = Some(Carried {
                    job: Taken::Job(job),
                    slot,
                    sent: false,
                    ticket,
                });
                None
            }
            Claimed::Ready(r) => {
                let commands = local_refusal(caps, r.smtputf8, r.eightbit, r.size).is_none().then(|| {
                    let rcpts: Vec<&str> = r.rcpts.iter().map(String::as_str).collect();
                    envelope_commands(&r.from, &mail_params(caps, &r), &rcpts)
                });
                *carried = Some(Carried {
                    job: Taken::Ready(r),
                    slot,
                    sent: commands.is_some(),
                    ticket,
                });
                commands
            }
        }
    }

    /// Run one transaction for `r` (its envelope already on `conn` if
    /// `sent`), chaining the next job behind its content when one is ready;
    /// record the outcomes. Returns the job taken for the chain, if any.
    async fn deliver<'q>(
        &'q self,
        r: Ready,
        conn: &mut Option<RelayConn>,
        mut sent: bool,
        mut ticket: Option<ChainTicket<'q>>,
    ) -> Option<Carried<'q>> {
        let rcpt_refs: Vec<&str> = r.rcpts.iter().map(String::as_str).collect();
        let mut retried = false;
        let mut carried: Option<Carried<'q>> = None;
        let outs = loop {
            let reused = conn.is_some();
            if conn.is_none() {
                sent = false;
                let started = std::time::Instant::now();
                let connected = self.upstream.connect().await;
                if let Some(m) = self.events.metrics() {
                    m.upstream("connect", started.elapsed());
                }
                match connected {
                    Ok(c) => *conn = Some(c),
                    Err(e) => {
                        info!(message_id = %r.job.msg.id, error = ?e, "upstream connection failed");
                        break vec![(Outcome::Deferred(e.record()), Scope::Path); r.rcpts.len()];
                    }
                }
            }
            let c = conn.as_mut().expect("connected");
            if let Some(refusal) = local_refusal(&c.caps, r.smtputf8, r.eightbit, r.size) {
                // (Never `sent`: a chained envelope passed this check.)
                break vec![(Outcome::Bounced(refusal), Scope::Path); r.rcpts.len()];
            }
            let params = mail_params(&c.caps, &r);
            if !(c.caps.pipelining && c.transactions + 1 < self.max_per_conn) {
                ticket = None;
            }
            let mut next = |caps: &Caps| self.chain_next(caps, ticket.take()?, &mut carried);
            let started = std::time::Instant::now();
            let (tx, chained): (TxReplies, bool) = c
                .transaction(
                    &self.upstream,
                    &r.from,
                    &params,
                    &rcpt_refs,
                    &r.body,
                    sent,
                    Some(&mut next),
                )
                .await;
            // Not taken by now: the promise lapses (this worker records
            // outcomes next, ready jobs must not wait for it).
            ticket = None;
            if let Some(m) = self.events.metrics() {
                m.upstream("transaction", started.elapsed());
            }
            match carried.as_mut() {
                Some(next) if !chained => next.sent = false,
                Some(next) if next.sent => {
                    if let Some(m) = self.events.metrics() {
                        m.upstream_chained();
                    }
                }
                _ => {}
            }
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
            break outcomes(&tx, r.rcpts.len());
        };
        self.apply(r.job, outs, Some(r.body)).await;
        carried
    }

    /// Classify an outcome's reply; the classifier may turn a bounce into a
    /// deferral (`552 5.2.2` mailbox full, a 5xx with a `4.x.x` code,
    /// `relay_denied`) or a coded 4xx into a bounce (see below). A reply to
    /// MAIL FROM is about the sender or the session, whatever its words say
    /// about an account or a mailbox ([`Classification::at_mail`]).
    fn judge(&self, out: Outcome, scope: Scope) -> (Outcome, Option<Classification>) {
        let reply = match &out {
            Outcome::Delivered(_) => return (out, None),
            Outcome::Deferred(r) | Outcome::Bounced(r) => r,
        };
        let c = self.classifier.classify(reply);
        let c = if scope == Scope::Sender {
            c.at_mail(reply.code)
        } else {
            c
        };
        let out = match (out, c.outcome) {
            (Outcome::Bounced(r), crate::classify::Outcome::Deferred) => Outcome::Deferred(r),
            // The relay refused *our* credentials or permissions: the
            // recipient is not at fault. Keep the mail (delivery pauses,
            // see `back_off`) instead of bouncing it to the sender.
            (Outcome::Bounced(r), _) if c.category == Some(Category::RelayDenied) => Outcome::Deferred(r),
            // A rule may call a 4xx final (an upstream's own expiry, Yahoo's
            // "[TS03] ... Retrying will NOT succeed"); never a local failure
            // (no reply), which is about our path to the relay, and never a
            // 5xx deferred as a whole: only a refusal at greeting, EHLO,
            // STARTTLS or AUTH comes here with a 5xx (`deliver`), and that
            // is the relay refusing *us* (RFC 5321 §3.1, RFC 4954 §6), not
            // the recipient. Postfix defers these too (`smtp_skip_5xx_greeting`).
            (Outcome::Deferred(r), crate::classify::Outcome::Bounced)
                if r.code.is_some_and(|c| (400..500).contains(&c)) =>
            {
                Outcome::Bounced(r)
            }
            (o, _) => o,
        };
        (out, Some(c))
    }

    /// Record outcomes: state, spool, events, re-scheduling, suppression
    /// of hard-bounced recipients, DSNs for final failures.
    async fn apply(&self, job: Job, outs: Vec<(Outcome, Scope)>, body: Option<Arc<Vec<u8>>>) {
        let now = now_ms();
        // Recipients the upstream accepted at RCPT in this transaction. With
        // exactly one, the reply to the end of data is about that address
        // too; with more, it is about the message and names no one for sure.
        let accepted = outs.iter().filter(|(_, s)| *s == Scope::Message).count();
        let outs: Vec<(Outcome, Scope, Option<Classification>)> = outs
            .into_iter()
            .map(|(o, scope)| {
                let (o, c) = self.judge(o, scope);
                (o, scope, c)
            })
            .collect();
        let mut events = Vec::with_capacity(outs.len());
        let mut deferred: Vec<(usize, u64)> = Vec::new();
        let mut to_suppress: Vec<Entry> = Vec::new();
        let mut failed: Vec<crate::dsn::DsnRecipient> = Vec::new();
        let mut dsn_env: Option<Envelope> = None;
        let mut throttle_replies: Vec<(Option<Category>, ReplyRecord)> = Vec::new();
        let mut reputation_counted = false;
        let mut transitions = Vec::new();
        let now_ns = crate::throttle::now_ns();
        let sender_domain = (&*job.msg.sender_domain != "<>").then_some(&*job.msg.sender_domain);
        let (env, loc, complete) = {
            let mut st = job.msg.state.lock().unwrap();
            let max_age_ms = self.queue.cfg.max_age.as_millis() as u64;
            let received = st.env.received_at_ms;
            let (tenant, user, sender) = (st.env.tenant.clone(), st.env.user.clone(), st.env.mail_from.clone());
            for (&i, (out, scope, class)) in job.rcpts.iter().zip(outs) {
                let r = &mut st.env.rcpts[i];
                r.attempts += 1;
                let about_rcpt = scope == Scope::Recipient || (scope == Scope::Message && accepted == 1);
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
                        // RFC 5321 §4.5.3.1.10: recipients over the upstream's
                        // per-transaction limit go again in the next
                        // transaction, not after a back-off, as long as the
                        // upstream took some of this one (no busy loop).
                        let next = if scope == Scope::Recipient && accepted > 0 && too_many_recipients(&rep) {
                            now
                        } else {
                            (now + self.queue.backoff(r.attempts, &job.msg.id).as_millis() as u64).min(deadline)
                        };
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
                let category = match (kind, &class) {
                    (EventKind::Expired, _) => Some(Category::Expired),
                    (_, Some(c)) => c.category,
                    _ => None,
                };
                // One line per recipient outcome, with the event's ids
                // (successes at debug: the events log has every one).
                if kind == EventKind::Delivered {
                    debug!(message_id = %job.msg.id, rcpt = %r.addr, provider = %job.provider, attempt = r.attempts, "delivered");
                } else {
                    info!(
                        message_id = %job.msg.id, rcpt = %r.addr, provider = %job.provider, attempt = r.attempts,
                        category = category.map_or("", |c| c.as_str()), reply = %reply_line(&reply), "{outcome}"
                    );
                }
                r.record(Attempt {
                    at_ms: now,
                    outcome: outcome.into(),
                    reply: reply.clone(),
                    category,
                });
                if kind == EventKind::Bounced
                    && about_rcpt
                    && self.suppress.is_some()
                    && class
                        .as_ref()
                        .and_then(|c| c.category)
                        .is_some_and(Category::suppresses)
                    && let Ok(address) = crate::suppress::normalize(&r.addr)
                {
                    to_suppress.push(Entry {
                        address,
                        tenant: None,
                        reason: Reason::HardBounce,
                        source: reply_line(&reply),
                        created_ms: now,
                        expires_ms: None,
                    });
                }
                let outcome_class = match kind {
                    EventKind::Delivered => crate::classify::Outcome::Delivered,
                    EventKind::Bounced => crate::classify::Outcome::Bounced,
                    _ => crate::classify::Outcome::Deferred,
                };
                // Null-sender mail (DSNs sendguard writes) says nothing about
                // a tenant's list or content: it does not feed the breakers.
                // A reputation reply to the whole transaction (at MAIL or
                // end of data) is one signal, not one per recipient.
                if sender_domain.is_some() {
                    use crate::rate::breaker::{Signal, signals_for};
                    let signals: Vec<Signal> = signals_for(outcome_class, category, about_rcpt)
                        .iter()
                        .copied()
                        .filter(|s| *s != Signal::Reputation || !reputation_counted)
                        .collect();
                    reputation_counted |= signals.contains(&Signal::Reputation);
                    transitions.extend(self.policy.breakers.record_all(
                        now_ns,
                        &job.msg.tenant,
                        sender_domain,
                        &signals,
                    ));
                }
                if reply.code.is_some()
                    && kind != EventKind::Delivered
                    && !throttle_replies
                        .iter()
                        .any(|(_, r)| r.text == reply.text && r.code == reply.code)
                {
                    throttle_replies.push((class.as_ref().and_then(|c| c.category), reply.clone()));
                }
                if matches!(kind, EventKind::Bounced | EventKind::Expired) {
                    failed.push(crate::dsn::DsnRecipient {
                        address: r.addr.clone(),
                        action: crate::dsn::Action::Failed,
                        reply: reply.code.is_some().then(|| reply.clone()),
                        expired: kind == EventKind::Expired,
                        last_attempt: std::time::UNIX_EPOCH + Duration::from_millis(now),
                    });
                }
                let mut ev = Event::new(kind);
                ev.message_id = Some(job.msg.id.clone());
                ev.tenant = Some(tenant.clone());
                ev.user = user.clone();
                ev.sender = Some(sender.clone());
                ev.rcpt = Some(r.addr.clone());
                ev.provider = Some(job.provider.to_string());
                ev.reply = Some(reply);
                ev.attempt = Some(r.attempts);
                ev.category = category;
                if let Some(c) = &class {
                    ev.failure_stage = c.stage;
                    ev.rule = Some(c.rule.clone());
                }
                ev.received_at = Some(rfc3339(std::time::UNIX_EPOCH + Duration::from_millis(received)));
                if kind == EventKind::Deferred {
                    ev.next_attempt_at = Some(rfc3339(
                        std::time::UNIX_EPOCH + Duration::from_millis(r.next_attempt_ms),
                    ));
                }
                events.push(ev);
            }
            let complete = st.env.is_complete();
            if !failed.is_empty() && self.dsn.as_ref().is_some_and(|d| d.wants(&st.env)) {
                dsn_env = Some(st.env.clone());
            }
            // The body is on disk; keep memory for fresh messages only.
            self.queue.release_body(&mut st);
            (if complete { None } else { Some(st.env.clone()) }, st.loc, complete)
        };
        // The DSN is stored before the failure it reports is final on disk:
        // a crash in between costs a second attempt (and a second DSN), never
        // a lost one. A DSN that cannot be stored leaves its recipients
        // pending, retried on the backoff schedule (RFC 5321 §6.1: accepted
        // mail is delivered or its sender told).
        let mut dsn = None;
        let (env, complete) = match (dsn_env, &self.dsn) {
            (Some(dsn_env), Some(policy)) => match policy
                .store(&dsn_env, &failed, body.as_deref().map(Vec::as_slice))
                .await
            {
                Some(stored) => {
                    dsn = Some((policy, dsn_env, stored));
                    (env, complete)
                }
                None => (
                    Some(self.retry_unreported(&job, &failed, &mut events, &mut deferred, now)),
                    false,
                ),
            },
            _ => (env, complete),
        };
        // A bounce or an expiry is in the events log before the spool
        // forgets it or saves the recipient as final: after a kill -9 in
        // between, nothing would bring the recipient back to report it
        // again, and the event is the only record when its sender gets no
        // DSN (a null sender, a tenant without DSNs). Other outcomes are
        // written on the writer's usual linger.
        if !failed.is_empty() {
            self.events.emit_written(std::mem::take(&mut events)).await;
        }
        if complete {
            self.spool.complete(&job.msg.id, loc);
            self.queue.remove(&job.msg.id);
        } else if let Some(env) = env {
            let _slot = self.persist_slots.acquire().await;
            match self.spool.save_state(env, loc, body.clone()).await {
                Ok(new_loc) => job.msg.state.lock().unwrap().loc = new_loc,
                Err(e) => {
                    warn!(message_id = %job.msg.id, error = %e, "cannot save delivery state; the message stays where it was")
                }
            }
        }
        // Only now may another worker take the message: its state on disk is
        // written by one worker at a time, and never from a stale location.
        let parked = {
            let mut st = job.msg.state.lock().unwrap();
            st.busy = false;
            std::mem::take(&mut st.parked)
        };
        for ev in events {
            self.events.emit(ev).await;
        }
        // The DSN goes to the queue after the events that explain it: a
        // worker on another I/O thread may deliver it at once.
        if let Some((policy, env, stored)) = dsn {
            policy.queued(&env, &failed, stored, &self.events).await;
        }
        if !to_suppress.is_empty()
            && let Some(store) = &self.suppress
        {
            let added: Vec<(String, String)> = to_suppress
                .iter()
                .map(|e| (e.address.clone(), e.source.clone()))
                .collect();
            match store.add(to_suppress).await {
                Ok(_) => {
                    for (address, source) in added {
                        info!(message_id = %job.msg.id, rcpt = %address, "hard bounce: recipient suppressed");
                        let mut ev = Event::new(EventKind::Suppressed);
                        ev.message_id = Some(job.msg.id.clone());
                        ev.rcpt = Some(address);
                        ev.reason = Some(Reason::HardBounce.as_str().into());
                        ev.reply = Some(ReplyRecord::local(source));
                        self.events.emit(ev).await;
                    }
                }
                Err(e) => warn!(message_id = %job.msg.id, error = %e, "cannot store suppressions"),
            }
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
                    provider: Arc::clone(&job.provider),
                },
                due,
            );
        }
        for (category, reply) in throttle_replies {
            if self.back_off(&job, category, &reply).await {
                break;
            }
        }
        for j in parked {
            self.queue.schedule(j, now_ms());
        }
        self.policy.breaker_changed(transitions).await;
    }

    /// The DSN for `failed` could not be stored: its recipients go back to
    /// pending, retried on the backoff schedule, and their events and
    /// attempt records say so. Returns the envelope to save.
    fn retry_unreported(
        &self,
        job: &Job,
        failed: &[crate::dsn::DsnRecipient],
        events: &mut [Event],
        deferred: &mut Vec<(usize, u64)>,
        now: u64,
    ) -> Envelope {
        let mut st = job.msg.state.lock().unwrap();
        for f in failed {
            let Some(i) = st
                .env
                .rcpts
                .iter()
                .position(|r| r.addr == f.address && matches!(r.status, RcptStatus::Bounced | RcptStatus::Expired))
            else {
                continue;
            };
            let r = &mut st.env.rcpts[i];
            let next = now + self.queue.backoff(r.attempts, &job.msg.id).as_millis() as u64;
            r.status = RcptStatus::Pending;
            r.next_attempt_ms = next;
            deferred.push((i, next));
            if let Some(ev) = events.iter_mut().find(|e| e.rcpt.as_deref() == Some(&*f.address)) {
                ev.event = EventKind::Deferred;
                ev.next_attempt_at = Some(rfc3339(std::time::UNIX_EPOCH + Duration::from_millis(next)));
            }
            if let Some(a) = r.history.last_mut() {
                a.outcome = "deferred".into();
            }
        }
        st.env.clone()
    }

    /// Let the shaper react to a failure reply; the caller stops at the
    /// first reply a rule acted on, so one transaction slows a pair once,
    /// however many recipients it had. True when a rule acted.
    async fn back_off(&self, job: &Job, category: Option<Category>, reply: &ReplyRecord) -> bool {
        let line = reply_line(reply);
        let Some(rule) = self.queue.feedback(job, category, &line) else {
            return false;
        };
        let until = rfc3339(std::time::SystemTime::now() + rule.duration);
        let kind = if rule.action == crate::rate::policy::Action::PauseDelivery {
            error!(
                message_id = %job.msg.id, rule = %rule.name, reply = %line, until = %until,
                "ALERT: the relay refused our own credentials or permissions; all delivery is paused"
            );
            EventKind::DeliveryPaused
        } else {
            info!(
                message_id = %job.msg.id, provider = %job.provider, sender_domain = %job.msg.sender_domain,
                tenant = %job.msg.tenant, rule = %rule.name, action = rule.action.as_str(), until = %until,
                "back-off"
            );
            EventKind::Backoff
        };
        let mut ev = Event::new(kind);
        ev.message_id = Some(job.msg.id.clone());
        ev.tenant = Some(job.msg.tenant.to_string());
        ev.sender_domain = Some(job.msg.sender_domain.to_string());
        ev.provider = Some(job.provider.to_string());
        ev.rule = Some(rule.name.clone());
        ev.action = Some(rule.action.as_str().into());
        ev.until = Some(until);
        ev.category = category;
        ev.reply = Some(reply.clone());
        self.events.emit(ev).await;
        true
    }
}

/// A provider's concurrency slot, given back when the delivery is over.
struct Slot<'a>(&'a Queue, Arc<str>);

/// A job whose message is claimed and whose content is at hand.
struct Ready {
    job: Job,
    from: String,
    rcpts: Vec<String>,
    smtputf8: bool,
    eightbit: bool,
    size: usize,
    body: Arc<Vec<u8>>,
}

impl Ready {
    fn new(job: Job, body: Arc<Vec<u8>>) -> Ready {
        let st = job.msg.state.lock().unwrap();
        let e = &st.env;
        let rcpts = job.rcpts.iter().map(|&i| e.rcpts[i].addr.clone()).collect();
        let (from, smtputf8, eightbit, size) = (e.mail_from.clone(), e.smtputf8, e.eightbit, e.size);
        drop(st);
        Ready {
            job,
            from,
            rcpts,
            smtputf8,
            eightbit,
            size,
            body,
        }
    }
}

enum Claimed {
    Ready(Ready),
    Parked,
    /// Not claimed: its content is not in memory.
    NoBody(Job),
}

enum Taken {
    Ready(Ready),
    Job(Job),
}

/// A job a worker took to chain behind the content it was sending.
struct Carried<'a> {
    job: Taken,
    slot: Slot<'a>,
    /// Its envelope went out behind that content.
    sent: bool,
    ticket: ChainTicket<'a>,
}

/// MAIL FROM parameters for a message on a connection with `caps`.
fn mail_params(caps: &Caps, r: &Ready) -> String {
    let mut params = String::new();
    if caps.size.is_some() {
        params.push_str(&format!(" SIZE={}", r.size));
    }
    if r.eightbit && caps.eightbitmime {
        params.push_str(" BODY=8BITMIME");
    }
    if r.smtputf8 {
        params.push_str(" SMTPUTF8");
    }
    params
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.finished(&self.1);
    }
}

/// `550 5.1.1 text` as one line, for a suppression's source.
fn reply_line(r: &ReplyRecord) -> String {
    let mut s = String::new();
    if let Some(c) = r.code {
        s.push_str(&c.to_string());
        s.push(' ');
    }
    if let Some(e) = &r.enhanced {
        s.push_str(e);
        s.push(' ');
    }
    s.push_str(&r.text);
    crate::suppress::transfer::clean_source(&s, 500)
}

/// Who gets delivery status notifications, and how they are queued.
pub struct DsnPolicy {
    pub sink: Arc<SpoolSink>,
    /// Tenants that turned DSNs off.
    pub off: std::collections::HashSet<String>,
    pub hostname: String,
    /// For `Remote-MTA`.
    pub upstream: String,
}

impl DsnPolicy {
    /// A DSN goes to a non-null envelope sender (RFC 3464 §2: never for
    /// `<>`, so DSNs never loop) of a tenant that did not turn them off.
    pub fn wants(&self, env: &Envelope) -> bool {
        !env.mail_from.is_empty() && !self.off.contains(&env.tenant)
    }

    /// Build and store the DSN (durable, not yet queued); None when it
    /// could not be stored.
    async fn store(
        &self,
        env: &Envelope,
        failed: &[crate::dsn::DsnRecipient],
        body: Option<&[u8]>,
    ) -> Option<crate::pipeline::Stored> {
        let input = crate::dsn::DsnInput {
            reporting_mta: &self.hostname,
            queue_id: &env.id,
            original_sender: &env.mail_from,
            arrival: std::time::UNIX_EPOCH + Duration::from_millis(env.received_at_ms),
            upstream: Some(&self.upstream),
            recipients: failed,
            original: body.unwrap_or_default(),
            now: std::time::SystemTime::now(),
        };
        let dsn = crate::dsn::build(&input);
        match self
            .sink
            .store_own(&env.tenant, &env.mail_from, dsn.message, dsn.smtputf8)
            .await
        {
            Ok(stored) => Some(stored),
            Err(e) => {
                warn!(message_id = %env.id, error = %e, "cannot store DSN; the failed recipients stay queued");
                None
            }
        }
    }

    /// Log the stored DSN (`dsn_queued`), then queue it.
    async fn queued(
        &self,
        env: &Envelope,
        failed: &[crate::dsn::DsnRecipient],
        stored: crate::pipeline::Stored,
        events: &Events,
    ) {
        info!(message_id = %env.id, dsn = %stored.id, to = %env.mail_from, "DSN queued");
        let mut ev = Event::new(EventKind::DsnQueued);
        ev.message_id = Some(env.id.clone());
        ev.tenant = Some(env.tenant.clone());
        ev.sender = Some(env.mail_from.clone());
        ev.rcpts = Some(failed.iter().map(|f| f.address.clone()).collect());
        ev.dsn_id = Some(stored.id.clone());
        events.emit(ev).await;
        self.sink.enqueue(stored);
    }
}

/// Refuse locally what the upstream cannot take without a downgrade.
fn local_refusal(caps: &Caps, smtputf8: bool, eightbit: bool, size: usize) -> Option<ReplyRecord> {
    if eightbit && !caps.eightbitmime {
        // RFC 6152 §3: 8-bit content only to a server offering 8BITMIME.
        return Some(ReplyRecord {
            code: Some(554),
            enhanced: Some("5.6.3".into()),
            text:
                "upstream does not support 8BITMIME; 8-bit message not downgraded (sendguard:eightbitmime_unsupported)"
                    .into(),
        });
    }
    if smtputf8 && !caps.smtputf8 {
        return Some(ReplyRecord {
            code: Some(550),
            enhanced: Some("5.6.7".into()),
            text: "upstream does not support SMTPUTF8; message not downgraded (sendguard:smtputf8_unsupported)".into(),
        });
    }
    if caps.size.is_some_and(|max| size as u64 > max) {
        return Some(ReplyRecord {
            code: Some(552),
            enhanced: Some("5.3.4".into()),
            text: format!("message of {size} bytes exceeds the upstream SIZE limit (sendguard:message_too_big)"),
        });
    }
    None
}
