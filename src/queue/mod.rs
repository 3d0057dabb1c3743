//! The delivery queue: messages waiting now (ready) and later (scheduled by
//! retry time), rebuilt from the spool at start.
//!
//! One scheduler task sleeps until the earliest retry is due, so a queue of
//! deferred mail costs no CPU while it waits. Bodies of fresh messages stay
//! in memory (up to `queue.memory_bytes`) for immediate delivery; retries
//! read them back from the spool.
//!
//! Trust boundary: holds only what the spool already made durable; it never
//! speaks SMTP (see `relay`).

pub mod inspect;
pub mod outcome;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::QueueConfig;
use crate::spool::{Envelope, Location};

/// A message in the queue.
pub struct QueuedMsg {
    pub id: String,
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
}

/// Deliver these recipients (indices into `env.rcpts`) of this message.
pub struct Job {
    pub msg: Arc<QueuedMsg>,
    pub rcpts: Vec<usize>,
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

#[derive(Default)]
struct Inner {
    ready: VecDeque<Job>,
    scheduled: BinaryHeap<Reverse<Scheduled>>,
    seq: u64,
    /// Messages not yet complete, by id.
    messages: HashMap<String, Arc<QueuedMsg>>,
}

pub struct Queue {
    inner: Mutex<Inner>,
    ready_notify: Notify,
    sched_notify: Notify,
    mem_bytes: AtomicUsize,
    pub cfg: QueueConfig,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

impl Queue {
    pub fn new(cfg: QueueConfig) -> Arc<Queue> {
        Arc::new(Queue {
            inner: Mutex::new(Inner::default()),
            ready_notify: Notify::new(),
            sched_notify: Notify::new(),
            mem_bytes: AtomicUsize::new(0),
            cfg,
        })
    }

    /// Add a message just stored (or recovered) and schedule its pending
    /// recipients at their retry times.
    pub fn add(&self, env: Envelope, loc: Location, body: Option<Vec<u8>>) {
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
        // Group pending recipients by due time.
        let mut by_due: Vec<(u64, Vec<usize>)> = Vec::new();
        for (i, r) in env.rcpts.iter().enumerate().filter(|(_, r)| !r.status.is_final()) {
            match by_due.iter_mut().find(|(d, _)| *d == r.next_attempt_ms) {
                Some((_, v)) => v.push(i),
                None => by_due.push((r.next_attempt_ms, vec![i])),
            }
        }
        let msg = Arc::new(QueuedMsg {
            id: id.clone(),
            state: Mutex::new(MsgState {
                env,
                loc,
                body,
                busy: false,
            }),
        });
        self.inner.lock().unwrap().messages.insert(id, Arc::clone(&msg));
        for (due, rcpts) in by_due {
            self.schedule(
                Job {
                    msg: Arc::clone(&msg),
                    rcpts,
                },
                due,
            );
        }
    }

    /// Run `job` at `due_ms` (now or earlier: immediately).
    pub fn schedule(&self, job: Job, due_ms: u64) {
        let mut inner = self.inner.lock().unwrap();
        if due_ms <= now_ms() {
            inner.ready.push_back(job);
            drop(inner);
            self.ready_notify.notify_one();
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

    /// Wait for the next ready job.
    pub async fn next(&self) -> Job {
        loop {
            let notified = self.ready_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (job, more) = {
                let mut inner = self.inner.lock().unwrap();
                let job = inner.ready.pop_front();
                (job, !inner.ready.is_empty())
            };
            if more {
                // Pass the baton: more jobs are waiting for other workers.
                self.ready_notify.notify_one();
            }
            if let Some(j) = job {
                return j;
            }
            notified.await;
        }
    }

    /// The message is done (every recipient final) or dropped its body.
    pub fn release_body(&self, st: &mut MsgState) {
        if let Some(b) = st.body.take() {
            self.mem_bytes.fetch_sub(b.len(), Ordering::Relaxed);
        }
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

    /// Counts of (ready, scheduled) jobs.
    pub fn depth(&self) -> (usize, usize) {
        let i = self.inner.lock().unwrap();
        (i.ready.len(), i.scheduled.len())
    }

    /// Move due jobs to the ready queue until cancelled; sleeps until the
    /// earliest due time otherwise.
    pub async fn run_scheduler(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let notified = self.sched_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let wait = {
                let mut inner = self.inner.lock().unwrap();
                let now = now_ms();
                let mut moved = 0;
                while inner.scheduled.peek().is_some_and(|Reverse(s)| s.due_ms <= now) {
                    let Reverse(s) = inner.scheduled.pop().expect("peeked");
                    inner.ready.push_back(s.job);
                    moved += 1;
                }
                if moved > 0 {
                    self.ready_notify.notify_one();
                }
                inner
                    .scheduled
                    .peek()
                    .map(|Reverse(s)| Duration::from_millis(s.due_ms.saturating_sub(now)))
            };
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
    /// `first_retry · 2^(attempts-1)`, capped at `max_retry`, ±10% jitter.
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
    base.mul_f64(1.0 + 0.1 * unit)
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
