//! The delivery queue: messages waiting now (ready, in the
//! [`Shaper`](crate::rate::shaper::Shaper) by provider, tenant and sender
//! domain) and later (scheduled by retry time), rebuilt from the spool at
//! start.
//!
//! One scheduler task sleeps until the earliest retry is due or the shaper
//! next lets a job go, whichever is first; workers wait on a notification
//! only. So a queue of deferred or rate-limited mail has one timer armed
//! and costs no CPU while it waits. Bodies of fresh messages stay in memory
//! (up to `queue.memory_bytes`) for immediate delivery; retries read them
//! back from the spool.
//!
//! Each job is one message's recipients at one provider: a message to
//! Gmail and Outlook recipients becomes two jobs, shaped separately. The
//! provider of a recipient domain comes from its MX
//! ([`Providers`](crate::rate::providers::Providers)); a domain not yet
//! known is looked up off the queue lock, then its job is scheduled.
//!
//! Trust boundary: holds only what the spool already made durable; it never
//! speaks SMTP (see `relay`).

pub mod inspect;
pub mod outcome;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::QueueConfig;
use crate::rate::policy::{BackoffRule, ShapingPolicy};
use crate::rate::providers::Providers;
use crate::rate::shaper::{Lane, Shaper, ShaperView, Take};
use crate::spool::{Envelope, Location};
use crate::throttle::{NS_PER_MS, Nanos, now_ns};

/// A message in the queue.
pub struct QueuedMsg {
    pub id: String,
    pub tenant: Arc<str>,
    /// The envelope sender's domain, lower case (`<>` for the null sender).
    pub sender_domain: Arc<str>,
    /// When it was received (ms since the epoch), for queue-age metrics.
    pub received_ms: u64,
    pub state: Mutex<MsgState>,
}

pub struct MsgState {
    pub env: Envelope,
    pub loc: Location,
    /// Kept in memory for the first attempt when there was room.
    pub body: Option<Arc<Vec<u8>>>,
    /// A worker is delivering some of its recipients right now: one job per
    /// message at a time, so spool state is never written by two at once.
    pub busy: bool,
    /// Jobs of this message (other providers) that came up while it was
    /// busy: scheduled again when the running delivery is recorded.
    pub parked: Vec<Job>,
}

/// Deliver these recipients (indices into `env.rcpts`) of this message,
/// all at `provider`.
pub struct Job {
    pub msg: Arc<QueuedMsg>,
    pub rcpts: Vec<usize>,
    pub provider: Arc<str>,
}

impl Job {
    pub fn lane(&self) -> Lane {
        Lane {
            provider: Arc::clone(&self.provider),
            tenant: Arc::clone(&self.msg.tenant),
            sender_domain: Arc::clone(&self.msg.sender_domain),
        }
    }
}

struct Scheduled {
    due_ms: u64,
    seq: u64,
    job: Job,
}

impl PartialEq for Scheduled {
    fn eq(&self, o: &Self) -> bool {
        (self.due_ms, self.seq) == (o.due_ms, o.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.due_ms, self.seq).cmp(&(o.due_ms, o.seq))
    }
}

struct Inner {
    ready: Shaper<Job>,
    /// Workers in a transaction that will take a ready job for their
    /// connection when its content goes out ([`ChainTicket`]).
    chainers: usize,
    scheduled: BinaryHeap<Reverse<Scheduled>>,
    seq: u64,
    /// Messages not yet complete, by id.
    messages: HashMap<String, Arc<QueuedMsg>>,
    /// When the shaper next lets a job go (the scheduler wakes a worker then).
    shaper_wake: Option<Nanos>,
}

/// How long ready jobs are left to workers that will chain them onto their
/// connections before an idle worker is woken for them.
pub const CHAIN_HOLD: Duration = Duration::from_millis(2);
/// Ready jobs left to each such worker (it takes one per transaction, so
/// the last waits about this many upstream round trips, or `CHAIN_HOLD`).
const CHAIN_JOBS: usize = 4;

/// A worker's promise to take a ready job when its transaction's content
/// goes out, counted while ready jobs are left to it. Take one as soon as
/// the job in hand is taken (a worker woken for a job counts before it
/// connects); dropped without [`ChainTicket::take`], the promise lapses.
pub struct ChainTicket<'a>(Option<&'a Queue>);

impl<'a> ChainTicket<'a> {
    /// A job shaping lets go now, if any (call [`Queue::finished`] for it
    /// as for [`Queue::next`]), with the promise handed on to its own
    /// transaction; `None`: the promise lapses.
    pub fn take(mut self) -> Option<(Job, ChainTicket<'a>)> {
        let q = self.0.take()?;
        let mut inner = q.inner.lock().unwrap();
        match inner.ready.take(now_ns()) {
            Take::Job(j) => {
                q.kick(&mut inner);
                Some((j, ChainTicket(Some(q))))
            }
            Take::Wait(_) => {
                inner.chainers -= 1;
                q.kick(&mut inner);
                None
            }
        }
    }
}

impl Drop for ChainTicket<'_> {
    fn drop(&mut self) {
        if let Some(q) = self.0.take() {
            let mut inner = q.inner.lock().unwrap();
            inner.chainers -= 1;
            q.kick(&mut inner);
        }
    }
}

pub struct Queue {
    inner: Mutex<Inner>,
    ready_notify: Notify,
    sched_notify: Notify,
    mem_bytes: AtomicUsize,
    pub cfg: QueueConfig,
    providers: Option<Arc<Providers>>,
}

/// One provider's queued jobs ([`Queue::provider_depths`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderDepth {
    pub provider: String,
    pub ready: usize,
    pub scheduled: usize,
    pub oldest_received_ms: Option<u64>,
}

/// The provider of recipients whose domain is not known (no provider table,
/// or a domain nothing matched).
pub const OTHER: &str = "other";

fn rcpt_domain(addr: &str) -> String {
    addr.rsplit_once('@')
        .map(|(_, d)| d)
        .unwrap_or_default()
        .to_ascii_lowercase()
}

/// Put recipient `i` in the group of (`due`, `domain`), opening one if none.
fn add_to_group(groups: &mut Vec<(u64, String, Vec<usize>)>, due: u64, domain: String, i: usize) {
    match groups.iter_mut().find(|(d, dom, _)| *d == due && *dom == domain) {
        Some((_, _, v)) => v.push(i),
        None => groups.push((due, domain, vec![i])),
    }
}

/// Milliseconds since the Unix epoch on the clock that never steps back
/// ([`crate::throttle::now_ns`]): a wall clock stepped back an hour must not
/// hold every retry for an hour.
pub fn now_ms() -> u64 {
    crate::throttle::now_ns() / crate::throttle::NS_PER_MS
}

impl Queue {
    /// A queue without shaping or provider grouping (every recipient is
    /// `other`, nothing is limited).
    pub fn new(cfg: QueueConfig) -> Arc<Queue> {
        Queue::with_policy(cfg, Arc::new(ShapingPolicy::default()), None)
    }

    pub fn with_policy(cfg: QueueConfig, policy: Arc<ShapingPolicy>, providers: Option<Arc<Providers>>) -> Arc<Queue> {
        Arc::new(Queue {
            inner: Mutex::new(Inner {
                chainers: 0,
                ready: Shaper::new(policy),
                scheduled: BinaryHeap::new(),
                seq: 0,
                messages: HashMap::new(),
                shaper_wake: None,
            }),
            ready_notify: Notify::new(),
            sched_notify: Notify::new(),
            mem_bytes: AtomicUsize::new(0),
            cfg,
            providers,
        })
    }

    /// Add a message just stored (or recovered) and schedule its pending
    /// recipients at their retry times, one job per (retry time, provider).
    pub fn add(self: &Arc<Self>, env: Envelope, loc: Location, body: Option<Vec<u8>>) {
        let body = body.and_then(|b| {
            let len = b.len();
            let prev = self.mem_bytes.fetch_add(len, Ordering::Relaxed);
            if prev + len <= self.cfg.memory_bytes {
                Some(Arc::new(b))
            } else {
                self.mem_bytes.fetch_sub(len, Ordering::Relaxed);
                None
            }
        });
        let id = env.id.clone();
        // Group pending recipients by (due time, recipient domain).
        let mut groups = Vec::new();
        for (i, r) in env.rcpts.iter().enumerate().filter(|(_, r)| !r.status.is_final()) {
            add_to_group(&mut groups, r.next_attempt_ms, rcpt_domain(&r.addr), i);
        }
        let sender_domain: Arc<str> = match env.mail_from.rsplit_once('@') {
            Some((_, d)) => d.to_ascii_lowercase().into(),
            None => "<>".into(),
        };
        let msg = Arc::new(QueuedMsg {
            id: id.clone(),
            tenant: env.tenant.as_str().into(),
            sender_domain,
            received_ms: env.received_at_ms,
            state: Mutex::new(MsgState {
                env,
                loc,
                body,
                busy: false,
                parked: Vec::new(),
            }),
        });
        self.inner.lock().unwrap().messages.insert(id, Arc::clone(&msg));
        self.insert_groups(msg, groups);
    }

    /// Schedule a message's recipient groups (due time, domain, indexes)
    /// at their providers, looking up the domains not known yet first.
    fn insert_groups(self: &Arc<Self>, msg: Arc<QueuedMsg>, groups: Vec<(u64, String, Vec<usize>)>) {
        let names: Vec<Option<Arc<str>>> = groups
            .iter()
            .map(|(_, domain, _)| match &self.providers {
                None => Some(Arc::from(OTHER)),
                Some(p) => p.cached(domain),
            })
            .collect();
        if names.iter().all(Option::is_some) {
            let known = groups
                .into_iter()
                .zip(names)
                .map(|((due, _, rcpts), name)| (due, name.expect("checked"), rcpts))
                .collect();
            self.schedule_groups(&msg, known);
            return;
        }
        let providers = Arc::clone(self.providers.as_ref().expect("a lookup is only needed with providers"));
        // A domain is not known yet: look them all up off the lock, then
        // schedule, so recipients at one provider still share a job.
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let mut resolved = Vec::with_capacity(groups.len());
            for (due, domain, rcpts) in groups {
                resolved.push((due, providers.provider(&domain).await, rcpts));
            }
            me.schedule_groups(&msg, resolved);
        });
    }

    /// A job of provider `other` came due. Its domains may be `other` only
    /// because their MX lookup failed when the message was queued (that
    /// is remembered for `shaping.mx_failure_ttl`, the job would keep it
    /// for good): ask again (a cached answer costs nothing), so the retry
    /// is shaped at the real provider.
    fn recheck_other(self: &Arc<Self>, job: Job) {
        let mut groups = Vec::new();
        {
            let st = job.msg.state.lock().unwrap();
            for &i in &job.rcpts {
                add_to_group(&mut groups, 0, rcpt_domain(&st.env.rcpts[i].addr), i);
            }
        }
        self.insert_groups(job.msg, groups);
    }

    /// One job per (retry time, provider).
    fn schedule_groups(&self, msg: &Arc<QueuedMsg>, groups: Vec<(u64, Arc<str>, Vec<usize>)>) {
        let mut jobs: Vec<(u64, Job)> = Vec::new();
        for (due, provider, rcpts) in groups {
            match jobs.iter_mut().find(|(d, j)| *d == due && j.provider == provider) {
                Some((_, j)) => j.rcpts.extend(rcpts),
                None => jobs.push((
                    due,
                    Job {
                        msg: Arc::clone(msg),
                        rcpts,
                        provider,
                    },
                )),
            }
        }
        for (due, job) in jobs {
            self.schedule(job, due);
        }
    }

    /// Run `job` at `due_ms` (now or earlier: as soon as shaping allows).
    pub fn schedule(&self, job: Job, due_ms: u64) {
        let mut inner = self.inner.lock().unwrap();
        if due_ms <= now_ms() {
            inner.ready.push(&job.lane(), job);
            self.kick(&mut inner);
        } else {
            inner.seq += 1;
            let seq = inner.seq;
            let earliest = inner.scheduled.peek().is_none_or(|Reverse(s)| due_ms < s.due_ms);
            inner.scheduled.push(Reverse(Scheduled { due_ms, seq, job }));
            drop(inner);
            if earliest {
                self.sched_notify.notify_one();
            }
        }
    }

    /// Wait for the next job shaping lets go. Call [`Queue::finished`]
    /// with its provider when its delivery is over.
    pub async fn next(&self) -> Job {
        loop {
            let notified = self.ready_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let job = {
                let mut inner = self.inner.lock().unwrap();
                let now = now_ns();
                match inner.ready.take(now) {
                    Take::Job(j) => {
                        // Pass the baton: more jobs may be able to go. (A
                        // worker that found nothing allowed does not, so
                        // workers never wake each other in a loop.)
                        self.kick(&mut inner);
                        Some(j)
                    }
                    Take::Wait(Some(t)) => {
                        // Only the scheduler keeps a timer: it wakes a worker then.
                        if inner.shaper_wake.is_none_or(|w| t < w || w <= now) {
                            inner.shaper_wake = Some(t);
                            self.sched_notify.notify_one();
                        }
                        None
                    }
                    Take::Wait(None) => None,
                }
            };
            if let Some(j) = job {
                return j;
            }
            notified.await;
        }
    }

    /// Ready jobs are waiting: wake an idle worker for them, unless the
    /// workers in a transaction can take them onto their connections
    /// (pipelined behind the content they send next: RFC 2920 §3.1), up
    /// to [`CHAIN_JOBS`] each, which saves a round trip per message and
    /// keeps connections few. Those get [`CHAIN_HOLD`] before an idle
    /// worker is woken anyway (an upstream slow to answer must not hold
    /// mail up).
    fn kick(&self, inner: &mut Inner) {
        if inner.ready.is_empty() {
            return;
        }
        if inner.ready.len() > inner.chainers * CHAIN_JOBS {
            self.ready_notify.notify_one();
            return;
        }
        let now = now_ns();
        let t = now + CHAIN_HOLD.as_nanos() as u64;
        if inner.shaper_wake.is_none_or(|w| t < w || w <= now) {
            inner.shaper_wake = Some(t);
            self.sched_notify.notify_one();
        }
    }

    /// A worker starts a transaction after which it will take a ready job
    /// for its connection ([`ChainTicket::take`]).
    pub fn chain_ticket(&self) -> ChainTicket<'_> {
        self.inner.lock().unwrap().chainers += 1;
        ChainTicket(Some(self))
    }

    /// A delivery taken with [`Queue::next`] is over: its provider's
    /// concurrency slot is free again.
    pub fn finished(&self, provider: &str) {
        let mut inner = self.inner.lock().unwrap();
        inner.ready.release(provider);
        self.kick(&mut inner);
    }

    /// Apply the back-off rule (if any) matching a reply for this job's
    /// recipients; returns the rule that acted.
    pub fn feedback(&self, job: &Job, category: Option<crate::classify::Category>, reply: &str) -> Option<BackoffRule> {
        let mut inner = self.inner.lock().unwrap();
        let rule = inner
            .ready
            .policy()
            .backoff_for(&job.provider, category, reply)
            .cloned()?;
        inner.ready.back_off(now_ns(), &job.lane(), &rule);
        drop(inner);
        // A pause or suspension changes when jobs may go: let a worker
        // recompute (it hands the time to the scheduler).
        self.ready_notify.notify_one();
        Some(rule)
    }

    /// Hold an open breaker's queued mail until it half-opens; release it
    /// when it half-opens or closes.
    pub fn apply_breakers(&self, ts: &[crate::rate::breaker::Transition]) {
        use crate::rate::breaker::BreakerScope;
        self.with_shaper(|s, _| {
            for t in ts {
                let until = if t.state == "open" { t.until.unwrap_or(0) } else { 0 };
                let reason = format!("breaker_open: {}", t.reason);
                s.breaker_hold(t.scope == BreakerScope::Tenant, &t.key, until, &reason);
            }
        });
    }

    /// Replace the shaping policy (hot reload); queued mail stays.
    pub fn set_policy(&self, policy: Arc<ShapingPolicy>) {
        self.inner.lock().unwrap().ready.set_policy(policy, now_ns());
        self.ready_notify.notify_one();
    }

    /// The shaping policy in force.
    pub fn shaping_policy(&self) -> Arc<ShapingPolicy> {
        Arc::clone(self.inner.lock().unwrap().ready.policy())
    }

    /// Providers, holds and slow-downs as they are now.
    pub fn shaping(&self) -> ShaperView {
        self.inner.lock().unwrap().ready.snapshot(now_ns())
    }

    /// Run something on the shaper (operator actions), then let workers
    /// look again.
    pub fn with_shaper<R>(&self, f: impl FnOnce(&mut Shaper<Job>, Nanos) -> R) -> R {
        let r = f(&mut self.inner.lock().unwrap().ready, now_ns());
        self.ready_notify.notify_one();
        r
    }

    /// The message is done (every recipient final) or dropped its body.
    pub fn release_body(&self, st: &mut MsgState) {
        if let Some(b) = st.body.take() {
            self.mem_bytes.fetch_sub(b.len(), Ordering::Relaxed);
        }
    }

    /// Every queued message (a snapshot; their states are not locked).
    pub fn messages(&self) -> Vec<Arc<QueuedMsg>> {
        self.inner.lock().unwrap().messages.values().cloned().collect()
    }

    pub fn remove(&self, id: &str) {
        self.inner.lock().unwrap().messages.remove(id);
    }

    /// Messages currently queued (for the admin API and tests).
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap().messages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Scheduled (waiting for a retry time) jobs per provider.
    pub fn scheduled_by_provider(&self) -> HashMap<String, usize> {
        let inner = self.inner.lock().unwrap();
        let mut out: HashMap<String, usize> = HashMap::new();
        for Reverse(s) in inner.scheduled.iter() {
            *out.entry(s.job.provider.to_string()).or_default() += 1;
        }
        out
    }

    /// Ready and scheduled jobs per provider, with the oldest message's
    /// receive time (for metrics; one pass over the queue).
    pub fn provider_depths(&self) -> Vec<ProviderDepth> {
        let inner = self.inner.lock().unwrap();
        let mut out: HashMap<String, ProviderDepth> = HashMap::new();
        let mut add = |provider: &str, job: &Job, scheduled: bool| {
            if !out.contains_key(provider) {
                let d = ProviderDepth {
                    provider: provider.to_string(),
                    ready: 0,
                    scheduled: 0,
                    oldest_received_ms: None,
                };
                out.insert(provider.to_string(), d);
            }
            let d = out.get_mut(provider).expect("inserted");
            if scheduled {
                d.scheduled += 1;
            } else {
                d.ready += 1;
            }
            let t = job.msg.received_ms;
            d.oldest_received_ms = Some(d.oldest_received_ms.map_or(t, |o| o.min(t)));
        };
        for Reverse(s) in inner.scheduled.iter() {
            add(&s.job.provider, &s.job, true);
        }
        for (provider, job) in inner.ready.jobs() {
            add(provider, job, false);
        }
        let mut v: Vec<ProviderDepth> = out.into_values().collect();
        v.sort_by(|a, b| a.provider.cmp(&b.provider));
        v
    }

    /// Retry now: scheduled jobs (of one provider and/or tenant, or all)
    /// become ready at once. Returns how many.
    pub fn retry_now(&self, provider: Option<&str>, tenant: Option<&str>) -> usize {
        let mut inner = self.inner.lock().unwrap();
        let (due, keep): (Vec<Reverse<Scheduled>>, Vec<Reverse<Scheduled>>) = std::mem::take(&mut inner.scheduled)
            .into_iter()
            .partition(|Reverse(s)| {
                provider.is_none_or(|p| *s.job.provider == *p) && tenant.is_none_or(|t| *s.job.msg.tenant == *t)
            });
        inner.scheduled = keep.into_iter().collect();
        let n = due.len();
        for Reverse(s) in due {
            inner.ready.push(&s.job.lane(), s.job);
        }
        drop(inner);
        self.sched_notify.notify_one();
        self.ready_notify.notify_one();
        n
    }

    /// Counts of (ready, scheduled) jobs: ready ones wait for shaping only.
    pub fn depth(&self) -> (usize, usize) {
        let i = self.inner.lock().unwrap();
        (i.ready.len(), i.scheduled.len())
    }

    /// Move due jobs to the ready queue and wake a worker when the shaper
    /// lets the next job go, until cancelled; sleeps until the earlier of
    /// the two otherwise.
    pub async fn run_scheduler(self: Arc<Self>, stop: CancellationToken) {
        let mut next_sweep = now_ns();
        loop {
            let notified = self.sched_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let mut recheck: Vec<Job> = Vec::new();
            let wait = {
                let mut inner = self.inner.lock().unwrap();
                let now = now_ms();
                let now_n = now_ns();
                let mut wake = false;
                let looks_up = self.providers.as_ref().is_some_and(|p| p.looks_up());
                while inner.scheduled.peek().is_some_and(|Reverse(s)| s.due_ms <= now) {
                    let Reverse(s) = inner.scheduled.pop().expect("peeked");
                    if looks_up && *s.job.provider == *OTHER {
                        recheck.push(s.job);
                        continue;
                    }
                    inner.ready.push(&s.job.lane(), s.job);
                    wake = true;
                }
                if inner.shaper_wake.is_some_and(|t| t <= now_n) {
                    inner.shaper_wake = None;
                    wake = true;
                }
                if now_n >= next_sweep {
                    inner.ready.sweep(now_n);
                    next_sweep = now_n + 60_000 * NS_PER_MS;
                }
                if wake {
                    self.ready_notify.notify_one();
                }
                let due = inner
                    .scheduled
                    .peek()
                    .map(|Reverse(s)| Duration::from_millis(s.due_ms.saturating_sub(now)));
                let shaped = inner.shaper_wake.map(|t| Duration::from_nanos(t.saturating_sub(now_n)));
                match (due, shaped) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            };
            // Off the lock. A regrouped job is due now: it goes to the ready
            // queue, never back to the schedule, so `wait` stands.
            for job in recheck {
                self.recheck_other(job);
            }
            let sleep = async {
                match wait {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = sleep => {}
                _ = &mut notified => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    /// Delay before attempt `attempts + 1` after `attempts` failures:
    /// `first_retry · 2^(attempts-1)` with ±10% jitter, never above
    /// `max_retry` (at the cap the jitter only shortens: 90–100%).
    pub fn backoff(&self, attempts: u32, id: &str) -> Duration {
        backoff(&self.cfg, attempts, id)
    }
}

pub fn backoff(cfg: &QueueConfig, attempts: u32, id: &str) -> Duration {
    let exp = attempts.saturating_sub(1).min(30);
    let base = cfg.first_retry.saturating_mul(1u32 << exp).min(cfg.max_retry);
    // Deterministic per (message, attempt): recipients deferred together
    // share one retry time (and one job), different messages spread out.
    let mut h = crc32fast::Hasher::new();
    h.update(id.as_bytes());
    h.update(&attempts.to_le_bytes());
    let unit = (h.finalize() % 2001) as f64 / 1000.0 - 1.0; // [-1, 1]
    let jittered = base.mul_f64(1.0 + 0.1 * unit);
    if jittered <= cfg.max_retry {
        jittered
    } else {
        // The cap is a promise: spread below it instead of clamping (a
        // clamp would put half the capped retries on the same instant).
        base.mul_f64(1.0 - 0.05 * (unit + 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let cfg = QueueConfig {
            first_retry: Duration::from_secs(300),
            max_retry: Duration::from_secs(3600),
            ..QueueConfig::default()
        };
        let within = |d: Duration, base: u64| {
            let b = base as f64;
            (b * 0.9..=b * 1.1).contains(&d.as_secs_f64())
        };
        for (attempts, base) in [(1, 300), (2, 600), (3, 1200), (4, 2400), (5, 3600), (40, 3600)] {
            let d = backoff(&cfg, attempts, "m");
            assert!(within(d, base), "attempt {attempts}: {d:?}");
        }
        // Never above the cap, and still spread (at least 90% of the
        // doubled delay): when the doubling lands on the cap (attempt 5:
        // 4800 s, capped to 3600 s) and when it is just under it (attempt
        // 4: 2400 s, whose +10% would pass a 2500 s cap).
        for (max, attempts, base) in [(3600, 5, 3600.0), (2500, 4, 2400.0)] {
            let capped = QueueConfig {
                max_retry: Duration::from_secs(max),
                ..cfg.clone()
            };
            let spread: std::collections::HashSet<u128> = (0..200)
                .map(|i| {
                    let d = backoff(&capped, attempts, &format!("m{i}"));
                    assert!(d <= capped.max_retry, "{d:?} over the {max} s cap");
                    assert!(d.as_secs_f64() >= base * 0.9 - 1e-6, "{d:?}");
                    d.as_millis()
                })
                .collect();
            assert!(spread.len() > 50, "capped retries bunch up: {spread:?}");
        }
        assert_eq!(
            backoff(&cfg, 1, "same"),
            backoff(&cfg, 1, "same"),
            "same message and attempt, same time"
        );
        let spread: std::collections::HashSet<u128> = (0..50)
            .map(|i| backoff(&cfg, 1, &format!("m{i}")).as_millis())
            .collect();
        assert!(spread.len() > 10, "no jitter: {spread:?}");
    }

    #[tokio::test]
    async fn scheduled_jobs_become_ready_when_due() {
        let q = Queue::new(QueueConfig::default());
        let stop = CancellationToken::new();
        tokio::spawn(Arc::clone(&q).run_scheduler(stop.clone()));
        let mut env = crate::spool::record::sample("x");
        env.rcpts[0].next_attempt_ms = now_ms() + 150;
        q.add(env, Location::File, None);
        assert_eq!(q.depth(), (0, 1));
        let job = tokio::time::timeout(Duration::from_secs(5), q.next())
            .await
            .expect("due job delivered");
        assert_eq!(job.rcpts, vec![0]);
        assert!(now_ms() >= job.msg.state.lock().unwrap().env.rcpts[0].next_attempt_ms);
        stop.cancel();
    }
}
