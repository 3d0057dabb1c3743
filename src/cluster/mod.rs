//! Fleet mode: several nodes share state through one Redis primary.
//!
//! [`Cluster`] owns the connection and keeps it alive: a supervisor task
//! connects (command connection plus a pub/sub subscription), heartbeats the
//! node into the fleet's member set every second (so every node knows how
//! many are live, for fair-share fallback), and reconnects with back-off
//! when Redis goes away. Each successful (re)connect starts a new *epoch*
//! ([`Cluster::epochs`]): components holding a local replica resynchronize
//! then. State changes travel on one channel as [`Notice`]s (`<prefix>:bus`);
//! Redis pub/sub delivers them in well under a second.
//!
//! What lives where is documented in `docs/scaling.md`; in short: Redis
//! holds the shared truth, every node keeps what it needs on its hot path
//! in memory (and the suppression list on local disk), so a Redis outage
//! degrades limits to each node's fair share but never loses mail or mails
//! a suppressed address.
//!
//! Trust boundary: Redis is trusted infrastructure (authenticated by
//! password or ACL user, optionally over TLS); notices from it are parsed as
//! JSON and applied only through the same validated paths the admin API
//! uses. Nodes of one fleet trust each other.

pub mod budgets;
pub mod config;
pub mod limits;
pub mod state;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, broadcast, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use config::{Backend, ClusterConfig};

/// A node missing heartbeats this long is no longer counted live.
pub const NODE_TTL: Duration = Duration::from_secs(10);
const HEARTBEAT: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// A subscription that has not heard this node's own ping this long is lost.
const PUBSUB_SILENCE: Duration = Duration::from_secs(5);

/// One state change, sent to every other node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notice {
    /// The node that made the change.
    pub from: String,
    /// That node's process (a random id per start): notices of this
    /// process are skipped, those of another process with the same
    /// `node_id` (a misconfiguration) are not.
    #[serde(default)]
    pub instance: String,
    /// What changed, e.g. `supp.add`, `breaker`, `hold`, `reload`.
    pub topic: String,
    #[serde(default)]
    pub body: serde_json::Value,
}

/// Why a Redis operation did not happen.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClusterError {
    /// Not connected, connection lost or timed out: fall back.
    #[error("Redis unavailable: {0}")]
    Unavailable(String),
    /// Redis answered with an error (a bug or a misconfigured server).
    #[error("Redis error: {0}")]
    Server(String),
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct ClusterStats {
    pub commands: AtomicU64,
    pub errors: AtomicU64,
    pub reconnects: AtomicU64,
    pub notices_in: AtomicU64,
    pub notices_out: AtomicU64,
}

/// The fleet's shared backend.
pub struct Cluster {
    client: redis::Client,
    node: String,
    prefix: String,
    timeout: Duration,
    /// The connection and the signal its commands raise when it fails (one
    /// per connection, so a late failure of an old one cannot end a new one).
    conn: std::sync::RwLock<Option<(MultiplexedConnection, Arc<Notify>)>>,
    instance: String,
    up: AtomicBool,
    /// The fleet's shared state has reached this node once (its suppression
    /// replica synchronized): from then on it may take mail.
    synced: AtomicBool,
    live: AtomicUsize,
    epoch: watch::Sender<u64>,
    bus: broadcast::Sender<Arc<Notice>>,
    pub stats: ClusterStats,
    /// One lease request in flight per budget key on this node: sessions
    /// that need the same key wait for it instead of each leasing a batch.
    pub(crate) lease_locks: KeyedLocks,
}

/// One async lock per name, held only while someone holds or waits for it:
/// names come and go (a warm-up counter per day, a budget per credential),
/// so an entry is removed when its last holder lets go.
#[derive(Default)]
pub(crate) struct KeyedLocks {
    locks: dashmap::DashMap<String, Arc<tokio::sync::Mutex<()>>>,
}

/// Held while the lock of one name is; releasing it forgets the name when
/// nobody else holds or waits for it.
pub(crate) struct KeyedGuard<'a> {
    locks: &'a KeyedLocks,
    name: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl KeyedLocks {
    pub(crate) async fn lock(&self, name: String) -> KeyedGuard<'_> {
        // Declared before the wait: if this future is dropped while waiting
        // (a cancelled session), the wait (and its reference) goes first,
        // then this guard's drop forgets the name when nobody else has it,
        // whether the holder let go before or after.
        let mut held = KeyedGuard {
            locks: self,
            name,
            guard: None,
        };
        let lock = Arc::clone(self.locks.entry(held.name.clone()).or_default().value());
        held.guard = Some(lock.lock_owned().await);
        held
    }

    /// Names with a holder or a waiter.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.locks.len()
    }
}

impl Drop for KeyedGuard<'_> {
    fn drop(&mut self) {
        self.guard.take();
        // Under the shard's write lock nobody can clone the entry, so one
        // reference (the map's) means no holder and no waiter.
        self.locks.locks.remove_if(&self.name, |_, l| Arc::strong_count(l) == 1);
    }
}

impl Cluster {
    /// The backend `[cluster]` asks for; `None` for the embedded one. Does
    /// not connect: [`Cluster::run`] does, and keeps trying.
    pub fn from_config(cfg: &crate::config::Config) -> anyhow::Result<Option<Arc<Cluster>>> {
        let c = &cfg.cluster;
        if !c.enabled() {
            return Ok(None);
        }
        let url = c.url.as_deref().expect("validated");
        let mut info = redis::IntoConnectionInfo::into_connection_info(url)
            .map_err(|e| anyhow::anyhow!("cluster.url: not a valid Redis URL: {}", e.category()))?;
        if let Some(p) = &c.password_file {
            let path = cfg.resolve(p);
            let text = std::fs::read_to_string(&path)
                .map_err(|e| anyhow::anyhow!("cluster.password_file: {}: {e}", path.display()))?;
            let pw = text.lines().next().unwrap_or("").trim_end();
            anyhow::ensure!(!pw.is_empty(), "cluster.password_file: {}: empty", path.display());
            let settings = info.redis_settings().clone().set_password(pw);
            info = info.set_redis_settings(settings);
        }
        let client = match &c.ca_file {
            None => redis::Client::open(info),
            Some(ca) => {
                let path = cfg.resolve(ca);
                let pem =
                    std::fs::read(&path).map_err(|e| anyhow::anyhow!("cluster.ca_file: {}: {e}", path.display()))?;
                redis::Client::build_with_tls(
                    info,
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem),
                    },
                )
            }
        }
        .map_err(|e| anyhow::anyhow!("cluster.url: {}", e.category()))?;
        // rediss:// builds its rustls config from the process default provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        Ok(Some(Arc::new(Cluster::new(
            client,
            c.node_name(),
            &c.key_prefix,
            c.timeout,
        ))))
    }

    pub fn new(client: redis::Client, node: String, prefix: &str, timeout: Duration) -> Cluster {
        Cluster {
            client,
            node,
            prefix: prefix.to_string(),
            timeout,
            conn: std::sync::RwLock::new(None),
            instance: format!("{:016x}", {
                use std::hash::{BuildHasher, Hasher};
                std::collections::hash_map::RandomState::new().build_hasher().finish()
            }),
            up: AtomicBool::new(false),
            synced: AtomicBool::new(false),
            live: AtomicUsize::new(1),
            epoch: watch::Sender::new(0),
            bus: broadcast::Sender::new(4096),
            stats: ClusterStats::default(),
            lease_locks: KeyedLocks::default(),
        }
    }

    pub fn node_id(&self) -> &str {
        &self.node
    }

    /// `<prefix>:<name>`: every key and channel of this fleet.
    pub fn key(&self, name: &str) -> String {
        format!("{}:{name}", self.prefix)
    }

    /// Connected now.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// The node's replicas synchronized with the fleet at least once.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    pub fn mark_synced(&self) {
        self.synced.store(true, Ordering::Relaxed);
    }

    /// Nodes that heartbeated within [`NODE_TTL`], this one included; the
    /// last known figure while Redis is unavailable. At least 1.
    pub fn live_nodes(&self) -> usize {
        self.live.load(Ordering::Relaxed).max(1)
    }

    /// Increments on every successful (re)connect: resynchronize then.
    pub fn epochs(&self) -> watch::Receiver<u64> {
        self.epoch.subscribe()
    }

    /// Notices from the other nodes.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Notice>> {
        self.bus.subscribe()
    }

    /// Round trip to Redis (readiness).
    pub async fn ping(&self) -> Result<(), ClusterError> {
        let pong: String = self.query(&redis::cmd("PING")).await?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(ClusterError::Server(format!("PING answered {pong:?}")))
        }
    }

    fn connection(&self) -> Result<(MultiplexedConnection, Arc<Notify>), ClusterError> {
        self.conn
            .read()
            .expect("lock")
            .clone()
            .ok_or_else(|| ClusterError::Unavailable("not connected".into()))
    }

    /// Run one request on the connection within `cluster.timeout`. I/O
    /// errors and timeouts end the connection (the supervisor reconnects);
    /// an error reply from Redis does not.
    async fn call<T, F>(&self, f: F) -> Result<T, ClusterError>
    where
        F: AsyncFnOnce(&mut MultiplexedConnection) -> redis::RedisResult<T>,
    {
        let (mut conn, lost) = self.connection()?;
        self.stats.commands.fetch_add(1, Ordering::Relaxed);
        let r = tokio::time::timeout(self.timeout, f(&mut conn)).await;
        match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_unrecoverable_error() {
                    lost.notify_one();
                    Err(ClusterError::Unavailable(e.to_string()))
                } else {
                    Err(ClusterError::Server(e.to_string()))
                }
            }
            Err(_) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                lost.notify_one();
                Err(ClusterError::Unavailable(format!(
                    "no answer within {:?}",
                    self.timeout
                )))
            }
        }
    }

    /// One command, within `cluster.timeout`.
    pub async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, ClusterError> {
        self.call(async |c| cmd.query_async(c).await).await
    }

    /// A pipeline (atomic when built with `.atomic()`), within `cluster.timeout`.
    pub async fn pipeline<T: redis::FromRedisValue>(&self, pipe: &redis::Pipeline) -> Result<T, ClusterError> {
        self.call(async |c| pipe.query_async(c).await).await
    }

    /// A Lua script (EVALSHA, loading it on first use), within `cluster.timeout`.
    pub async fn script<T: redis::FromRedisValue>(&self, inv: &redis::ScriptInvocation<'_>) -> Result<T, ClusterError> {
        self.call(async |c| inv.invoke_async(c).await).await
    }

    /// Send a notice to every other node.
    pub async fn publish(&self, topic: &str, body: serde_json::Value) -> Result<(), ClusterError> {
        let notice = Notice {
            from: self.node.clone(),
            instance: self.instance.clone(),
            topic: topic.to_string(),
            body,
        };
        let payload = serde_json::to_string(&notice).expect("serializable");
        let _: i64 = self
            .query(redis::cmd("PUBLISH").arg(self.key("bus")).arg(payload))
            .await?;
        self.stats.notices_out.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Keep connected until `stop`: connect, subscribe, heartbeat; on loss,
    /// fall back and retry with back-off.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        let mut was_up = false;
        let mut last_warn: Option<std::time::Instant> = None;
        loop {
            let session = tokio::select! {
                _ = stop.cancelled() => break,
                s = self.connect() => s,
            };
            // Up only once the first heartbeat went through: a server that
            // accepts connections but answers errors (LOADING, READONLY,
            // OOM, NOPERM) is not up, and is retried with back-off.
            let session = match session {
                Ok((conn, pubsub)) => {
                    let lost = Arc::new(Notify::new());
                    *self.conn.write().expect("lock") = Some((conn, Arc::clone(&lost)));
                    match self.heartbeat().await {
                        Ok(()) => Ok((pubsub, lost)),
                        Err(e) => {
                            *self.conn.write().expect("lock") = None;
                            Err(e.to_string())
                        }
                    }
                }
                Err(e) => Err(e),
            };
            match session {
                Err(e) => {
                    if was_up {
                        warn!(error = %e, "cluster: Redis unavailable, falling back to local state");
                        was_up = false;
                        last_warn = Some(std::time::Instant::now());
                    } else if last_warn.is_none_or(|t| t.elapsed() >= Duration::from_secs(30)) {
                        warn!(error = %e, "cluster: cannot use Redis; retrying");
                        last_warn = Some(std::time::Instant::now());
                    } else {
                        debug!(error = %e, "cluster: connect failed");
                    }
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Ok((pubsub, lost)) => {
                    self.up.store(true, Ordering::Relaxed);
                    was_up = true;
                    self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    self.epoch.send_modify(|e| *e += 1);
                    info!(node = %self.node, live_nodes = self.live_nodes(), "cluster: connected to Redis");
                    let started = std::time::Instant::now();
                    let stopped = self.serve(pubsub, &lost, &stop).await;
                    self.up.store(false, Ordering::Relaxed);
                    *self.conn.write().expect("lock") = None;
                    if stopped {
                        break;
                    }
                    warn!("cluster: Redis connection lost, falling back to local state until it returns");
                    // A connection that keeps failing soon after it was made
                    // backs off like a failed connect.
                    if started.elapsed() < Duration::from_secs(10) {
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    } else {
                        backoff = Duration::from_millis(100);
                    }
                }
            }
        }
        self.up.store(false, Ordering::Relaxed);
    }

    async fn connect(&self) -> Result<(MultiplexedConnection, redis::aio::PubSub), String> {
        let cfg = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let conn = self
            .client
            .get_multiplexed_async_connection_with_config(&cfg)
            .await
            .map_err(|e| e.to_string())?;
        let mut pubsub = tokio::time::timeout(self.timeout, self.client.get_async_pubsub())
            .await
            .map_err(|_| "pub/sub connect timed out".to_string())?
            .map_err(|e| e.to_string())?;
        for channel in [self.key("bus"), self.ping_channel()] {
            tokio::time::timeout(self.timeout, pubsub.subscribe(channel))
                .await
                .map_err(|_| "SUBSCRIBE timed out".to_string())?
                .map_err(|e| e.to_string())?;
        }
        Ok((conn, pubsub))
    }

    /// This process's own channel: its pings go there, not to every node.
    fn ping_channel(&self) -> String {
        self.key(&format!("ping:{}", self.instance))
    }

    /// Heartbeat and relay notices until the connection fails (`false`) or
    /// `stop` (`true`, after leaving the member set). Each heartbeat also
    /// publishes a ping on this process's own channel; a subscription that
    /// no longer hears them (dropped silently by a NAT or proxy) counts as
    /// lost.
    async fn serve(&self, pubsub: redis::aio::PubSub, lost: &Notify, stop: &CancellationToken) -> bool {
        let mut messages = pubsub.into_on_message();
        let mut tick = tokio::time::interval(HEARTBEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heard = std::time::Instant::now();
        let silence = PUBSUB_SILENCE.max(self.timeout * 3);
        loop {
            tokio::select! {
                _ = stop.cancelled() => {
                    let _: Result<i64, _> = self.query(redis::cmd("ZREM").arg(self.key("nodes")).arg(&self.node)).await;
                    return true;
                }
                _ = lost.notified() => return false,
                _ = tick.tick() => {
                    if heard.elapsed() > silence {
                        warn!("cluster: the pub/sub subscription went silent");
                        return false;
                    }
                    if let Err(e) = self.heartbeat().await {
                        debug!(error = %e, "cluster: heartbeat failed");
                        return false;
                    }
                    let ping: Result<i64, _> = self.query(redis::cmd("PUBLISH").arg(self.ping_channel()).arg("ping")).await;
                    match ping {
                        Ok(_) => {}
                        Err(ClusterError::Unavailable(e)) => {
                            debug!(error = %e, "cluster: ping failed");
                            return false;
                        }
                        // Refused (an ACL without PUBLISH on it): no liveness
                        // check, but no reconnect loop either.
                        Err(ClusterError::Server(_)) => heard = std::time::Instant::now(),
                    }
                }
                m = messages.next() => {
                    let Some(m) = m else { return false };
                    if m.get_channel_name() != self.key("bus") {
                        heard = std::time::Instant::now();
                        continue;
                    }
                    match serde_json::from_slice::<Notice>(m.get_payload_bytes()) {
                        Ok(n) if n.instance == self.instance => {}
                        Ok(n) => {
                            self.stats.notices_in.fetch_add(1, Ordering::Relaxed);
                            let _ = self.bus.send(Arc::new(n));
                        }
                        Err(e) => warn!(error = %e, "cluster: ignoring a malformed notice"),
                    }
                }
            }
        }
    }

    /// Announce this node and count the live ones, on Redis's clock (node
    /// clocks need not agree).
    async fn heartbeat(&self) -> Result<(), ClusterError> {
        const BEAT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. string.format('%.0f', now - tonumber(ARGV[2])))
return redis.call('ZCARD', KEYS[1])
"#;
        static SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| redis::Script::new(BEAT));
        let mut inv = SCRIPT.prepare_invoke();
        inv.key(self.key("nodes"))
            .arg(&self.node)
            .arg(NODE_TTL.as_millis() as u64);
        let live: usize = self.script(&inv).await?;
        self.live.store(live.max(1), Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unavailable_until_connected() {
        let client = redis::Client::open("redis://127.0.0.1:1/").unwrap();
        let c = Cluster::new(client, "n1".into(), "sg", Duration::from_millis(200));
        assert!(!c.is_up());
        assert_eq!(c.live_nodes(), 1);
        assert_eq!(c.key("bus"), "sg:bus");
        assert!(matches!(c.ping().await, Err(ClusterError::Unavailable(_))));
        assert!(matches!(
            c.publish("x", serde_json::Value::Null).await,
            Err(ClusterError::Unavailable(_))
        ));
    }

    #[tokio::test]
    async fn keyed_locks_exclude_per_name_and_forget_released_names() {
        let locks = Arc::new(KeyedLocks::default());
        let a = locks.lock("warmup:a:20261124".into()).await;
        // Another name is not held up.
        drop(locks.lock("warmup:b:20261124".into()).await);
        assert_eq!(locks.len(), 1);
        // The same name waits for the holder.
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let l2 = Arc::clone(&locks);
        let waiter = tokio::spawn(async move {
            let _g = l2.lock("warmup:a:20261124".into()).await;
            tx.send(()).unwrap();
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(rx.try_recv().is_err(), "the second holder waits");
        // Releasing with a waiter keeps the name for it.
        drop(a);
        assert_eq!(locks.len(), 1);
        waiter.await.unwrap();
        rx.await.unwrap();
        // Nobody holds or waits: the map is empty again, however many
        // names went through it.
        for day in 0..100 {
            drop(locks.lock(format!("warmup:a:{day}")).await);
        }
        assert_eq!(locks.len(), 0);
        // A waiter cancelled while waiting leaves no entry behind once the
        // holder lets go...
        let held = locks.lock("k".into()).await;
        let l3 = Arc::clone(&locks);
        let cancelled = tokio::spawn(async move { drop(l3.lock("k".into()).await) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        cancelled.abort();
        let _ = cancelled.await;
        drop(held);
        assert_eq!(locks.len(), 0);
        // ...nor when it is cancelled after the holder let go but before it
        // ran (this test's runtime has one thread: the waiter cannot run
        // between the release and the abort).
        let held = locks.lock("k2".into()).await;
        let l4 = Arc::clone(&locks);
        let cancelled = tokio::spawn(async move { drop(l4.lock("k2".into()).await) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(held);
        assert_eq!(locks.len(), 1, "kept for the waiter");
        cancelled.abort();
        let _ = cancelled.await;
        assert_eq!(locks.len(), 0);
    }
}
