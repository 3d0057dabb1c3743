//! I/O shards: one single-threaded tokio runtime per thread, where the
//! SMTP sessions and the delivery workers run.
//!
//! A task on a shard is never moved to another thread, so its wake-ups,
//! timers and socket readiness stay on one core's runtime: no work
//! stealing, no cross-thread hand-off of a task between two awaits. On the
//! 2-core benchmark machine the multi-threaded scheduler cost about a fifth
//! of sendguard's user CPU per message (see `docs/performance.md`). The
//! main runtime keeps what is not per message: the accept loop, the admin
//! API, the queue scheduler, the events writer.
//!
//! Trust boundary: none; scheduling only.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;

/// The running shards; [`Shards::stop`] or dropping the last reference
/// ends their threads.
pub struct Shards {
    handles: Vec<Handle>,
    next: AtomicUsize,
    stops: Mutex<Vec<oneshot::Sender<()>>>,
}

impl Shards {
    /// Start `n` shard threads (at least one).
    pub fn start(n: usize) -> std::io::Result<Arc<Shards>> {
        let mut handles = Vec::with_capacity(n.max(1));
        let mut stops = Vec::with_capacity(n.max(1));
        for i in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            handles.push(rt.handle().clone());
            let (tx, rx) = oneshot::channel::<()>();
            std::thread::Builder::new()
                .name(format!("sendguard-io-{i}"))
                .spawn(move || {
                    // Tasks run while this blocks; it returns on `stop`
                    // (or when every `Shards` is gone), and the tasks
                    // left are dropped with the runtime.
                    let _ = rt.block_on(rx);
                })?;
            stops.push(tx);
        }
        Ok(Arc::new(Shards {
            handles,
            next: AtomicUsize::new(0),
            stops: Mutex::new(stops),
        }))
    }

    /// The next shard, round robin.
    pub fn pick(&self) -> &Handle {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        &self.handles[i]
    }

    /// Run `task` on the next shard, tracked by `tracker`.
    pub fn spawn<F>(&self, tracker: &TaskTracker, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        drop(tracker.spawn_on(task, self.pick()));
    }

    /// Tell every shard thread to end. Tasks still on a shard are dropped
    /// with it, so call this after their tracker is empty or its grace
    /// period is over.
    pub fn stop(&self) {
        for tx in std::mem::take(&mut *self.stops.lock().unwrap_or_else(|e| e.into_inner())) {
            let _ = tx.send(());
        }
    }
}
