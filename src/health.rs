//! Liveness, readiness and drain: what load balancers, systemd and
//! Kubernetes ask a node.
//!
//! - `/healthz` (liveness): the process answers HTTP.
//! - `/readyz` (readiness): the node can take mail now: it is not draining,
//!   its spool directory takes a write, and (fleet mode) it has synchronized
//!   with the fleet since it started. A Redis outage *after* that leaves the
//!   node ready but degraded (fair-share limits, suppression from the local
//!   replica): every node sees the same outage, and a fleet whose nodes all
//!   turned unready would take no mail at all. The body says `degraded`,
//!   and so do the metrics and the dashboard.
//! - Drain (`POST /api/v1/drain`, `sendguard drain`): stop accepting SMTP
//!   connections (idle sessions are told `421 4.3.2` and closed, transactions
//!   in flight finish), report not ready, keep delivering the queue. A
//!   SIGTERM afterwards stops the node as usual.
//!
//! Trust boundary: the readiness probe writes one small file in the spool
//! directory the operator configured; nothing here reads client input.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio_util::sync::CancellationToken;

/// A node's lifecycle state, shared by the SMTP server and the admin API.
pub struct Health {
    drain: CancellationToken,
    sessions: AtomicUsize,
    spool_dir: Option<PathBuf>,
    cluster: Option<Arc<crate::cluster::Cluster>>,
}

/// Counts one SMTP session while alive.
pub struct SessionGuard(Arc<Health>);

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.0.sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Health {
    /// `spool_dir`: `None` when the node has no spool (it refuses all mail,
    /// so it is never ready).
    pub fn new(spool_dir: Option<PathBuf>, cluster: Option<Arc<crate::cluster::Cluster>>) -> Arc<Health> {
        Arc::new(Health {
            drain: CancellationToken::new(),
            sessions: AtomicUsize::new(0),
            spool_dir,
            cluster,
        })
    }

    /// Cancelled when the node drains (admin API) or shuts down (SIGTERM):
    /// the SMTP server stops accepting.
    pub fn drain_token(&self) -> CancellationToken {
        self.drain.clone()
    }

    pub fn start_drain(&self) {
        self.drain.cancel();
    }

    pub fn draining(&self) -> bool {
        self.drain.is_cancelled()
    }

    pub fn session_started(self: &Arc<Self>) -> SessionGuard {
        self.sessions.fetch_add(1, Ordering::Relaxed);
        SessionGuard(Arc::clone(self))
    }

    /// SMTP sessions open now.
    pub fn sessions(&self) -> usize {
        self.sessions.load(Ordering::Relaxed)
    }

    /// `Ok` when the node can take mail; otherwise every reason it cannot.
    pub async fn ready(&self) -> Result<(), Vec<String>> {
        let mut why = Vec::new();
        if self.draining() {
            why.push("draining: not accepting connections".to_string());
        }
        match &self.spool_dir {
            None => why.push("no [spool] and [relay] configured: every message is refused".to_string()),
            Some(dir) => {
                let dir = dir.clone();
                match tokio::task::spawn_blocking(move || probe_write(&dir)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => why.push(format!("spool.dir is not writable: {e}")),
                    Err(e) => why.push(format!("spool probe failed: {e}")),
                }
            }
        }
        if let Some(c) = &self.cluster
            && !c.is_synced()
        {
            let state = match c.ping().await {
                Ok(()) => "connected, synchronizing".to_string(),
                Err(e) => e.to_string(),
            };
            why.push(format!("cluster backend not synchronized yet: {state}"));
        }
        if why.is_empty() { Ok(()) } else { Err(why) }
    }

    /// Ready, but running on local state (fleet mode with Redis unavailable).
    pub fn degraded(&self) -> bool {
        self.cluster.as_ref().is_some_and(|c| !c.is_up())
    }
}

/// Create, write and remove a small file: catches a read-only or full
/// filesystem and a lost mount (no fsync: this is a probe, not a commit).
fn probe_write(dir: &std::path::Path) -> std::io::Result<()> {
    use std::io::Write;
    // One name per probe: the kubelet and a load balancer may probe at once.
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let path = dir.join(format!(".ready-probe-{}-{n}", std::process::id()));
    let mut f = std::fs::File::create(&path)?;
    f.write_all(b"ok\n")?;
    drop(f);
    std::fs::remove_file(&path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readiness_follows_spool_and_drain() {
        let dir = tempfile::tempdir().unwrap();
        let h = Health::new(Some(dir.path().to_path_buf()), None);
        assert_eq!(h.ready().await, Ok(()));
        {
            let _s = h.session_started();
            assert_eq!(h.sessions(), 1);
        }
        assert_eq!(h.sessions(), 0);
        h.start_drain();
        let why = h.ready().await.unwrap_err();
        assert!(why[0].starts_with("draining"), "{why:?}");
        assert!(h.drain_token().is_cancelled());

        let gone = Health::new(Some(dir.path().join("missing")), None);
        let why = gone.ready().await.unwrap_err();
        assert!(why[0].starts_with("spool.dir is not writable"), "{why:?}");

        let none = Health::new(None, None);
        assert!(none.ready().await.unwrap_err()[0].starts_with("no [spool]"));
    }
}
