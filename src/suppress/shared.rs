//! The fleet's suppression list: Redis holds the shared list, every node
//! keeps a full local replica (the [`Embedded`] store on its own disk), so
//! RCPT lookups stay memory lookups and keep working while Redis is down.
//!
//! Redis layout (under `cluster.key_prefix`):
//! - `supp` hash: `<tenant or *>|<address>` → the entry as JSON;
//! - `supp:tomb` hash: the same field → unix ms of its removal (kept
//!   [`TOMBSTONE_TTL_MS`], so a node that was away learns of removals);
//! - `supp:ver`: incremented by every change; notices carry it.
//!
//! Changes: an add writes the replica (durable), then Redis, then tells the
//! other nodes (`supp.add` notice) which apply it to their replicas. While Redis
//! is unavailable an add goes to the replica only (a hard bounce is never
//! forgotten) and is pushed at the next synchronization; a removal is
//! refused (it could not reach the other nodes, and a later sync would undo
//! it). Synchronization runs on every (re)connect, when a node notices it
//! missed a change (version check every few seconds, or a lagging notice
//! queue), and merges last-writer-wins: the newer of an entry and a
//! tombstone wins; an entry only the replica has is pushed.
//!
//! Trust boundary: entries from Redis and notices are parsed and their
//! addresses normalized again before they reach the replica.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::embedded::Embedded;
use super::{Entry, Query, StoreFuture, SuppressionStore, normalize};
use crate::cluster::{Cluster, ClusterError, Notice};
use crate::queue::now_ms;

/// How long a removal is remembered in Redis.
pub const TOMBSTONE_TTL_MS: u64 = 30 * 86_400_000;
/// How often a node compares its version with the fleet's.
const VERSION_CHECK: Duration = Duration::from_secs(5);
/// Entries per Redis command when pushing or scanning.
const BATCH: usize = 1000;

/// The shared store.
#[derive(Clone)]
pub struct Shared {
    local: Embedded,
    cluster: Arc<Cluster>,
    /// Highest `supp:ver` this replica is known to reflect.
    seen: Arc<AtomicU64>,
    /// Entries were added while Redis was unavailable: push at next sync.
    dirty: Arc<AtomicBool>,
    /// A sync holds it exclusively; adds and removals share it, so none
    /// lands between a sync's read of Redis and its read of the replica.
    gate: Arc<tokio::sync::RwLock<()>>,
}

fn field(e: &Entry) -> String {
    format!("{}|{}", e.tenant.as_deref().unwrap_or("*"), e.address)
}

fn field_of(address: &str, tenant: Option<&str>) -> String {
    format!("{}|{address}", tenant.unwrap_or("*"))
}

/// An entry from Redis or a notice, with its address normalized again.
fn checked(e: Entry) -> Option<Entry> {
    match normalize(&e.address) {
        Ok(a) if a == e.address => Some(e),
        _ => {
            warn!("cluster: ignoring a suppression with a malformed address");
            None
        }
    }
}

fn io_err(e: ClusterError) -> io::Error {
    match e {
        ClusterError::Unavailable(m) => io::Error::new(io::ErrorKind::NotConnected, m),
        ClusterError::Server(m) => io::Error::other(m),
    }
}

impl Shared {
    pub fn new(local: Embedded, cluster: Arc<Cluster>) -> Shared {
        Shared {
            local,
            cluster,
            seen: Arc::new(AtomicU64::new(0)),
            // Entries from before fleet mode (or from a stop while Redis was
            // down) are pushed at the first sync anyway; this asks for it.
            dirty: Arc::new(AtomicBool::new(true)),
            gate: Arc::new(tokio::sync::RwLock::new(())),
        }
    }

    /// Write entries to Redis; returns the new version.
    async fn push(&self, entries: &[Entry]) -> Result<u64, ClusterError> {
        let mut ver = 0;
        for chunk in entries.chunks(BATCH) {
            let mut pipe = redis::pipe();
            pipe.atomic();
            let mut hset = redis::cmd("HSET");
            hset.arg(self.cluster.key("supp"));
            let mut hdel = redis::cmd("HDEL");
            hdel.arg(self.cluster.key("supp:tomb"));
            for e in chunk {
                let f = field(e);
                hset.arg(&f).arg(serde_json::to_string(e).expect("serializable"));
                hdel.arg(f);
            }
            pipe.add_command(hset).ignore();
            pipe.add_command(hdel).ignore();
            pipe.cmd("INCR").arg(self.cluster.key("supp:ver"));
            let (v,): (u64,) = self.cluster.pipeline(&pipe).await?;
            ver = v;
            let body = serde_json::json!({"ver": v, "entries": chunk});
            self.cluster.publish("supp.add", body).await?;
        }
        Ok(ver)
    }

    fn saw(&self, ver: u64) {
        self.seen.fetch_max(ver, Ordering::Relaxed);
    }

    /// Apply another node's change to the replica. (Notices from several
    /// writers may arrive out of version order; one lost with a dropped
    /// connection is covered by the sync of the new epoch, the last ones
    /// before a quiet period by the version check.)
    ///
    /// `notices` in order; consecutive adds are written to the replica in
    /// one append (one fsync), so a burst of bounces across the fleet costs
    /// each node one fsync per batch, not per notice.
    async fn apply(&self, notices: &[Arc<Notice>]) -> io::Result<()> {
        let mut adds: Vec<Entry> = Vec::new();
        let mut vers: u64 = 0;
        for n in notices {
            let ver = n.body["ver"].as_u64().unwrap_or(0);
            if n.topic == "supp.add" {
                let entries: Vec<Entry> = serde_json::from_value(n.body["entries"].clone()).unwrap_or_default();
                adds.extend(entries.into_iter().filter_map(checked));
                vers = vers.max(ver);
                continue;
            }
            if !adds.is_empty() {
                self.local.add(std::mem::take(&mut adds)).await?;
            }
            self.saw(vers);
            self.apply_one(n).await?;
            self.saw(ver);
        }
        if !adds.is_empty() {
            self.local.add(adds).await?;
        }
        self.saw(vers);
        Ok(())
    }

    /// A removal notice (other topics change nothing here).
    async fn apply_one(&self, n: &Notice) -> io::Result<()> {
        if n.topic != "supp.remove" {
            return Ok(());
        }
        let address = n.body["address"].as_str().unwrap_or_default().to_string();
        let tenant = n.body["tenant"].as_str().map(str::to_string);
        let removed_ms = n.body["removed_ms"].as_u64().unwrap_or(u64::MAX);
        // Last writer wins: a removal older than the entry held (its notice
        // overtaken by a later add's) changes nothing.
        let held = self.local.lookup(tenant.as_deref().unwrap_or(""), &address);
        let newer = held.is_some_and(|e| e.tenant == tenant && e.created_ms > removed_ms);
        if normalize(&address).is_ok_and(|a| a == address) && !newer {
            self.local.remove(address, tenant).await?;
        }
        Ok(())
    }

    /// Merge the replica with Redis (see the module docs). Returns entries
    /// (pulled, pushed, removed).
    pub async fn sync(&self) -> Result<(usize, usize, usize), ClusterError> {
        let _excl = self.gate.write().await;
        // Cleared first: an add that fails to push from now on sets it again.
        let was_dirty = self.dirty.swap(false, Ordering::Relaxed);
        let r = self.sync_locked().await;
        if r.is_err() && was_dirty {
            self.dirty.store(true, Ordering::Relaxed);
        }
        r
    }

    async fn sync_locked(&self) -> Result<(usize, usize, usize), ClusterError> {
        let ver: Option<u64> = self
            .cluster
            .query(redis::cmd("GET").arg(self.cluster.key("supp:ver")))
            .await?;
        let mut remote: HashMap<String, Entry> = HashMap::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, items): (u64, Vec<(String, String)>) = self
                .cluster
                .query(
                    redis::cmd("HSCAN")
                        .arg(self.cluster.key("supp"))
                        .arg(cursor)
                        .arg("COUNT")
                        .arg(BATCH),
                )
                .await?;
            for (f, json) in items {
                match serde_json::from_str::<Entry>(&json).ok().and_then(checked) {
                    Some(e) => {
                        remote.insert(f, e);
                    }
                    None => warn!(field = %f, "cluster: malformed suppression in Redis, ignored"),
                }
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        let tombs: HashMap<String, u64> = self
            .cluster
            .query(redis::cmd("HGETALL").arg(self.cluster.key("supp:tomb")))
            .await?;
        let now = now_ms();
        let stale: Vec<&String> = tombs
            .iter()
            .filter(|(_, t)| now.saturating_sub(**t) > TOMBSTONE_TTL_MS)
            .map(|(f, _)| f)
            .collect();
        if !stale.is_empty() {
            let _: i64 = self
                .cluster
                .query(redis::cmd("HDEL").arg(self.cluster.key("supp:tomb")).arg(stale))
                .await?;
        }
        let local = self.local.list(&Query {
            limit: usize::MAX,
            ..Default::default()
        });
        let mut push = Vec::new();
        let mut pull = Vec::new();
        let mut drop = Vec::new();
        let mut local_fields = std::collections::HashSet::with_capacity(local.len());
        for l in local {
            let f = field(&l);
            match remote.get(&f) {
                Some(r) if *r == l => {}
                Some(r) if l.created_ms > r.created_ms => push.push(l),
                Some(r) => pull.push(r.clone()),
                None => match tombs.get(&f) {
                    Some(t) if *t >= l.created_ms => drop.push(l),
                    _ => push.push(l),
                },
            }
            local_fields.insert(f);
        }
        for (f, r) in remote {
            if !local_fields.contains(&f) && r.is_live(now) {
                pull.push(r);
            }
        }
        let counts = (pull.len(), push.len(), drop.len());
        if !pull.is_empty() {
            self.local
                .add(pull)
                .await
                .map_err(|e| ClusterError::Server(e.to_string()))?;
        }
        for l in drop {
            self.local
                .remove(l.address, l.tenant)
                .await
                .map_err(|e| ClusterError::Server(e.to_string()))?;
        }
        // The replica now holds everything the fleet does: ready.
        self.cluster.mark_synced();
        // A plain store: after a Redis restart the version starts over.
        self.seen.store(ver.unwrap_or(0), Ordering::Relaxed);
        if !push.is_empty() {
            if let Err(e) = self.push(&push).await {
                self.dirty.store(true, Ordering::Relaxed);
                return Err(e);
            }
            self.seen.store(self.remote_version().await?, Ordering::Relaxed);
        }
        Ok(counts)
    }

    async fn remote_version(&self) -> Result<u64, ClusterError> {
        let v: Option<u64> = self
            .cluster
            .query(redis::cmd("GET").arg(self.cluster.key("supp:ver")))
            .await?;
        Ok(v.unwrap_or(0))
    }

    /// Keep the replica in step with the fleet until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let mut epochs = self.cluster.epochs();
        epochs.mark_changed();
        let mut notices = self.cluster.subscribe();
        let mut retry_at = tokio::time::Instant::now();
        let mut failures = 0u32;
        let mut check = tokio::time::interval(VERSION_CHECK);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut due = false;
        loop {
            if due && self.cluster.is_up() && tokio::time::Instant::now() >= retry_at {
                match self.sync().await {
                    Ok((pulled, pushed, removed)) => {
                        due = false;
                        failures = 0;
                        info!(pulled, pushed, removed, "cluster: suppression list synchronized");
                    }
                    Err(e) => {
                        failures += 1;
                        let wait = Duration::from_secs(1 << failures.min(5));
                        retry_at = tokio::time::Instant::now() + wait;
                        if failures == 1 || failures.is_multiple_of(10) {
                            warn!(error = %e, failures, retry_in = ?wait, "cluster: suppression sync failed");
                        }
                    }
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = epochs.changed() => {
                    if changed.is_err() { return; }
                    due = true;
                }
                n = notices.recv() => match n {
                    Ok(n) => {
                        // This notice and whatever else is already waiting.
                        let mut batch = vec![n];
                        while batch.len() < 1000 {
                            match notices.try_recv() {
                                Ok(n) => batch.push(n),
                                Err(TryRecvError::Lagged(_)) => due = true,
                                Err(_) => break,
                            }
                        }
                        batch.retain(|n| n.topic.starts_with("supp."));
                        if let Err(e) = self.apply(&batch).await {
                            warn!(error = %e, "cluster: could not apply a suppression change; resynchronizing");
                            due = true;
                        }
                    }
                    Err(RecvError::Lagged(_)) => due = true,
                    Err(RecvError::Closed) => return,
                },
                _ = check.tick() => {
                    if self.dirty.load(Ordering::Relaxed) {
                        due = true;
                    } else if self.cluster.is_up() {
                        let v: Result<Option<u64>, _> =
                            self.cluster.query(redis::cmd("GET").arg(self.cluster.key("supp:ver"))).await;
                        if let Ok(v) = v && v.unwrap_or(0) > self.seen.load(Ordering::Relaxed) {
                            due = true;
                        }
                    }
                }
            }
        }
    }
}

impl SuppressionStore for Shared {
    fn lookup(&self, tenant: &str, address: &str) -> Option<Entry> {
        self.local.lookup(tenant, address)
    }

    fn add(&self, entries: Vec<Entry>) -> StoreFuture<'_, usize> {
        Box::pin(async move {
            let _shared = self.gate.read().await;
            // The replica first (durable): this node never mails the address
            // again, whatever happens to the push.
            let new = self.local.add(entries.clone()).await?;
            match self.push(&entries).await {
                Ok(v) => self.saw(v),
                Err(e) => {
                    warn!(error = %e, entries = entries.len(), "cluster: suppression kept locally until Redis returns");
                    self.dirty.store(true, Ordering::Relaxed);
                }
            }
            Ok(new)
        })
    }

    fn remove(&self, address: String, tenant: Option<String>) -> StoreFuture<'_, bool> {
        Box::pin(async move {
            let _shared = self.gate.read().await;
            let removed_ms = now_ms();
            let f = field_of(&address, tenant.as_deref());
            let mut pipe = redis::pipe();
            pipe.atomic()
                .cmd("HDEL")
                .arg(self.cluster.key("supp"))
                .arg(&f)
                .cmd("HSET")
                .arg(self.cluster.key("supp:tomb"))
                .arg(&f)
                .arg(removed_ms)
                .ignore()
                .cmd("INCR")
                .arg(self.cluster.key("supp:ver"));
            let (removed, v): (i64, u64) = self.cluster.pipeline(&pipe).await.map_err(io_err)?;
            self.saw(v);
            let body = serde_json::json!({"ver": v, "address": address, "tenant": tenant, "removed_ms": removed_ms});
            if let Err(e) = self.cluster.publish("supp.remove", body).await {
                // The others find the tombstone at their next version check.
                debug!(error = %e, "cluster: removal notice not sent");
            }
            let here = self.local.remove(address, tenant).await?;
            Ok(removed > 0 || here)
        })
    }

    fn list(&self, q: &Query) -> Vec<Entry> {
        self.local.list(q)
    }

    fn len(&self) -> usize {
        self.local.len()
    }
}
