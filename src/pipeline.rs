//! Wires store-and-forward together: spool (with recovery) → queue →
//! dispatcher, and the [`MessageSink`] the sessions submit to.
//!
//! Trust boundary: glue only; see the modules it assembles.

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::events::{Event, EventKind, Events};
use crate::metrics::Metrics;
use crate::queue::{Queue, now_ms};
use crate::rate::breaker::{BreakerScope, Breakers, Transition};
use crate::rate::budget::Budgets;
use crate::rate::providers::{Providers, ProvidersCfg};
use crate::rate::runaway::Runaway;
use crate::relay::client::Upstream;
use crate::relay::dispatch::{Dispatcher, DsnPolicy};
use crate::shards::Shards;
use crate::smtp::{Enhanced, Reply};
use crate::spool::{Envelope, RcptState, Spool};
use crate::submission::{MessageSink, NoSpool, SharedSink, Submission, SubmitFuture};
use crate::suppress::SuppressionStore;
use crate::suppress::embedded::Embedded;
use crate::trace::TraceStore;
use crate::webhook::Webhooks;

/// The running delivery side.
pub struct Pipeline {
    pub sink: SharedSink,
    pub events: Events,
    pub queue: Option<Arc<Queue>>,
    /// The suppression list (`None` without a spool or `suppression.path`).
    pub suppress: Option<Arc<dyn SuppressionStore>>,
    /// The resolver shared by the guard and provider grouping.
    pub dns: Option<Arc<crate::dns::Dns>>,
    /// The rate policy in force (budgets, breakers, runaway, shaping).
    pub policy: PolicyHandle,
    /// The guard, when a tenant uses it or a domain is signed.
    pub guard: Option<Arc<crate::guard::Guard>>,
    /// The metrics registry (always on; served by the admin listener).
    pub metrics: Arc<Metrics>,
    /// Webhook endpoints, when configured.
    pub webhooks: Option<Arc<Webhooks>>,
    /// The message trace store (with a spool, unless `trace.enabled = false`).
    pub trace: Option<Arc<TraceStore>>,
    /// The fleet backend (`[cluster] backend = "redis"`).
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// Liveness, readiness and drain.
    pub health: Arc<crate::health::Health>,
    /// Where sessions and delivery workers run.
    pub shards: Arc<Shards>,
    stop: CancellationToken,
    tracker: TaskTracker,
    events_task: Option<tokio::task::JoinHandle<()>>,
    /// Tells the events writer to finish (handles outlive the pipeline).
    events_close: CancellationToken,
}

impl Pipeline {
    /// Open the events log and, when `[spool]`/`[relay]` are configured, the
    /// spool (recovering its messages) and the delivery workers.
    pub async fn start(cfg: &Arc<Config>) -> anyhow::Result<Pipeline> {
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let shards = Shards::start(cfg.server.io_threads())
            .map_err(|e| anyhow::anyhow!("server.io_threads: cannot start threads: {e}"))?;
        let metrics = Arc::new(Metrics::new(cfg));
        let webhooks = Webhooks::start(cfg, &tracker, stop.clone())?;
        let events_path = cfg.events.as_ref().map(|e| cfg.resolve(&e.path));
        let trace = match cfg.trace.trace_dir(cfg) {
            Some(dir) => {
                let (d, retention) = (dir.clone(), cfg.trace.retention);
                let store = tokio::task::spawn_blocking(move || TraceStore::open(&d, retention))
                    .await?
                    .map_err(|e| anyhow::anyhow!("trace.dir: {}: {e}", dir.display()))?;
                tracker.spawn(sweep_trace(Arc::clone(&store), stop.clone()));
                Some(store)
            }
            None => None,
        };
        let events_close = CancellationToken::new();
        let taps = crate::events::Taps {
            webhooks: webhooks.clone(),
            trace: trace.clone(),
        };
        let (events, events_task) = Events::start(
            events_path.as_deref(),
            taps,
            Some(Arc::clone(&metrics)),
            events_close.clone(),
        )
        .await
        .map_err(|err| anyhow::anyhow!("events.path: {}: {err}", events_path.unwrap_or_default().display()))?;
        let cluster = crate::cluster::Cluster::from_config(cfg)?;
        if let Some(c) = &cluster {
            tracker.spawn(Arc::clone(c).run(stop.clone()));
        }
        let suppress: Option<Arc<dyn SuppressionStore>> = match cfg.suppression_path() {
            Some(path) => {
                let p = path.clone();
                let store = tokio::task::spawn_blocking(move || Embedded::open(&p))
                    .await?
                    .map_err(|e| anyhow::anyhow!("suppression.path: {}: {e}", path.display()))?;
                match &cluster {
                    Some(c) => {
                        let shared = crate::suppress::shared::Shared::new(store, Arc::clone(c));
                        tracker.spawn(shared.clone().run(stop.clone()));
                        Some(Arc::new(shared))
                    }
                    None => Some(Arc::new(store)),
                }
            }
            None => None,
        };
        let dns = crate::dns::Dns::with_metrics(&cfg.dns, metrics.dns.clone())?;
        let guard = crate::guard::Guard::from_config(cfg, Some(Arc::clone(&dns)))?;
        let rate = cfg.rate_policy()?;
        // Breaker and hold changes go to the fleet's Redis, or, on a single
        // node that delivers, to a file of its spool: either way they
        // outlive a restart.
        let (fleet, fleet_changes) = if cluster.is_some() || (cfg.spool.is_some() && cfg.relay.is_some()) {
            let (link, rx) = crate::cluster::state::link();
            (Some(link), Some(rx))
        } else {
            (None, None)
        };
        let mut policy = PolicyHandle {
            queue: None,
            budgets: Arc::new(Budgets::new(Arc::clone(&rate.budgets), Arc::clone(&rate.warmups))),
            breakers: Arc::new(Breakers::new(rate.breakers.clone())),
            runaway: Arc::new(Runaway::new(rate.runaway.clone())),
            events: events.clone(),
            fleet,
            cluster: cluster.clone(),
            config_source: cfg.source.clone(),
        };
        let delivery = match (&cfg.spool, &cfg.relay) {
            (Some(spool_cfg), Some(relay_cfg)) => {
                let parts = (&dns, &metrics, &events, &suppress);
                Some(start_delivery(cfg, spool_cfg, relay_cfg, rate, parts, &mut policy).await?)
            }
            _ => {
                warn!("no [spool] and [relay] configured: every message is refused with 451 4.3.0");
                None
            }
        };
        match (&cluster, fleet_changes, &delivery) {
            (Some(c), Some(rx), _) => {
                tracker.spawn(crate::cluster::state::run(
                    Arc::clone(c),
                    policy.clone(),
                    rx,
                    stop.clone(),
                ));
            }
            (None, Some(rx), Some(d)) => {
                // Before any mail moves: a suspension of the last run holds
                // the recovered mail too.
                let mut state = crate::cluster::state::LocalState::load(&d.dir);
                state.restore(&policy).await;
                tracker.spawn(crate::cluster::state::run_local(state, rx, stop.clone()));
            }
            _ => {}
        }
        tracker.spawn(policy.clone().run(stop.clone()));
        let (sink, queue, spool_dir): (SharedSink, _, _) = match delivery {
            Some(d) => {
                let recovered = d.recovered;
                for r in recovered {
                    d.queue.add(r.env, r.loc, None);
                }
                if let Some(c) = &cluster {
                    let (c, q) = (Arc::clone(c), Arc::clone(&d.queue));
                    tracker.spawn(crate::cluster::limits::run(c, q, stop.clone()));
                }
                d.dispatcher.spawn(d.max_connections, &shards, &tracker, stop.clone());
                tracker.spawn(Arc::clone(&d.dispatcher).compact_loop(d.compact_after, stop.clone()));
                tracker.spawn(Arc::clone(&d.queue).run_scheduler(stop.clone()));
                tracker.spawn(trim_memory(stop.clone()));
                (d.sink, Some(d.queue), Some(d.dir))
            }
            None => (Arc::new(NoSpool), None, None),
        };
        let health = crate::health::Health::new(spool_dir, cluster.clone());
        Ok(Pipeline {
            sink,
            events,
            queue,
            suppress,
            dns: Some(dns),
            policy,
            guard,
            metrics,
            webhooks,
            trace,
            cluster,
            health,
            shards,
            stop,
            tracker,
            events_task,
            events_close,
        })
    }

    /// What a policy reload (SIGHUP, admin API) changes.
    pub fn policy_handle(&self) -> PolicyHandle {
        self.policy.clone()
    }

    /// What the SMTP server needs from the pipeline.
    pub fn handles(&self) -> crate::server::Handles {
        crate::server::Handles {
            sink: Arc::clone(&self.sink),
            events: self.events.clone(),
            suppress: self.suppress.clone(),
            dns: self.dns.clone(),
            policy: Some(self.policy.clone()),
            guard: self.guard.clone(),
            health: Some(Arc::clone(&self.health)),
            shards: Some(Arc::clone(&self.shards)),
        }
    }

    /// Stop delivering (transactions in progress finish within `grace`),
    /// close the spool and flush the events log. Call after the server
    /// stopped accepting mail.
    pub async fn shutdown(mut self, grace: Duration) {
        self.stop.cancel();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait()).await.is_err() {
            warn!("delivery workers still busy after the grace period; their messages stay spooled");
        }
        // Workers still busy after the grace period are dropped with
        // their shard; their messages stay spooled.
        self.shards.stop();
        let task = self.events_task.take();
        self.events_close.cancel();
        drop(self);
        if let Some(t) = task {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }
}

/// The running rate policy: shaping in the queue, budgets and warm-up,
/// circuit breakers and the runaway guard at submission.
#[derive(Clone)]
pub struct PolicyHandle {
    pub queue: Option<Arc<Queue>>,
    pub budgets: Arc<Budgets>,
    pub breakers: Arc<Breakers>,
    pub runaway: Arc<Runaway>,
    pub events: Events,
    /// Where this node's breaker, hold and reload changes go: the fleet
    /// (Redis), or on a single node the spool's `policy-state.json`.
    pub fleet: Option<crate::cluster::state::Link>,
    /// Fleet mode: the shared backend (budgets lease from it at RCPT).
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// The config file (a reload asked by the fleet reads it again).
    pub config_source: Option<std::path::PathBuf>,
}

impl PolicyHandle {
    /// Apply the rate policy of a freshly loaded (validated) config:
    /// shaping rates, back-off rules, budgets, warm-up ramps, breaker and
    /// runaway thresholds. Queued mail, open connections, counters,
    /// breaker states, slow-downs and suspensions stay. The provider table
    /// is read at start only.
    pub fn reload(&self, cfg: &Config) -> Result<(), crate::config::ConfigError> {
        let rate = cfg.rate_policy()?;
        if let Some(q) = &self.queue {
            q.set_policy(rate.shaping);
        }
        self.budgets.set_policy(rate.budgets, rate.warmups);
        self.breakers.set_policy(rate.breakers);
        self.runaway.set_policy(rate.runaway);
        Ok(())
    }

    /// Breaker state changes made here: applied (see
    /// [`PolicyHandle::apply_transitions`]) and, in a fleet, sent to the
    /// other nodes.
    pub async fn breaker_changed(&self, ts: Vec<Transition>) {
        if let Some(f) = &self.fleet {
            f.breakers(&ts);
        }
        self.apply_transitions(ts).await;
    }

    /// Hold (open) or release (half-open, closed) the key's queued mail,
    /// log and emit a `breaker` event each.
    pub async fn apply_transitions(&self, ts: Vec<Transition>) {
        if ts.is_empty() {
            return;
        }
        if let Some(q) = &self.queue {
            q.apply_breakers(&ts);
        }
        for t in ts {
            if t.state == "open" {
                warn!(scope = t.scope.as_str(), key = %t.key, reason = %t.reason, "circuit breaker open");
            } else {
                info!(scope = t.scope.as_str(), key = %t.key, state = t.state, reason = %t.reason, "circuit breaker");
            }
            self.events.emit(crate::events::breaker_event(&t)).await;
        }
    }

    /// Apply (or lift, when `until` is 0) a suspension; the change has been
    /// validated (admin API). Returns the held key as JSON. In a fleet the
    /// caller sends it on with [`PolicyHandle::tell_fleet`].
    pub fn hold(&self, h: &crate::cluster::state::HoldChange) -> Result<serde_json::Value, String> {
        use serde_json::json;
        let q = self.queue.as_ref().ok_or("no delivery queue on this node")?;
        let (until, reason) = (h.until, h.reason.as_str());
        let need = |v: &Option<String>, name: &str| {
            v.clone()
                .filter(|s| !s.trim().is_empty())
                .ok_or(format!("{name} is required for scope {}", h.scope))
        };
        Ok(match h.scope.as_str() {
            "delivery" => {
                q.with_shaper(|s, _| s.pause(until, reason));
                serde_json::Value::Null
            }
            "provider" => {
                let p = need(&h.provider, "provider")?;
                q.with_shaper(|s, _| s.hold_provider(&p, until, reason));
                json!(p)
            }
            "pair" => {
                let p = need(&h.provider, "provider")?;
                let d = need(&h.sender_domain, "sender_domain")?.to_ascii_lowercase();
                q.with_shaper(|s, _| s.suspend_pair(&p, &d, until, reason));
                json!({"provider": p, "sender_domain": d})
            }
            "sender_domain" => {
                let d = need(&h.sender_domain, "sender_domain")?.to_ascii_lowercase();
                q.with_shaper(|s, _| s.hold_sender(&d, until, reason));
                json!(d)
            }
            "tenant" => {
                let t = need(&h.tenant, "tenant")?;
                q.with_shaper(|s, _| s.hold_tenant(&t, until, reason));
                json!(t)
            }
            other => return Err(format!("unknown scope {other:?}")),
        })
    }

    /// Charge a recipient to the budgets and warm-up caps: fleet-wide when
    /// this node is in a fleet whose Redis answers (leases), else locally.
    pub async fn charge_budgets(
        &self,
        who: &crate::rate::budget::Who<'_>,
        first: bool,
    ) -> Result<(), crate::rate::budget::Over> {
        match &self.cluster {
            Some(c) => crate::cluster::budgets::charge(&self.budgets, c, who, first).await,
            None => self.budgets.charge_recipient(crate::throttle::now_ns(), who, first),
        }
    }

    /// Send a change made here on: to the other nodes in a fleet, to the
    /// spool's state file on a single node.
    pub fn tell_fleet(&self, c: crate::cluster::state::Change) {
        if let Some(f) = &self.fleet {
            f.send(c);
        }
    }

    /// Read the config file again and apply its rate policy (a reload the
    /// fleet asked for).
    pub async fn reload_from_source(&self) -> Result<(), String> {
        let path = self.config_source.clone().ok_or("no config file to reload from")?;
        let cfg = tokio::task::spawn_blocking(move || Config::load(&path))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        self.reload(&cfg).map_err(|e| e.to_string())
    }

    /// An operator closed a breaker; false when there was none.
    pub async fn reset_breaker(&self, scope: BreakerScope, key: &str) -> bool {
        match self.breakers.reset(scope, key) {
            Some(t) => {
                self.breaker_changed(vec![t]).await;
                true
            }
            None => false,
        }
    }

    /// Breaker cool-downs every second; counters that carry no information
    /// any more dropped every minute.
    async fn run(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut n: u64 = 0;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            let now = crate::throttle::now_ns();
            self.breaker_changed(self.breakers.tick(now)).await;
            n += 1;
            if n.is_multiple_of(60) {
                self.budgets.sweep(now);
                self.runaway.sweep(now);
            }
        }
    }
}

/// The delivery side, opened but not yet running.
struct Delivery {
    sink: Arc<SpoolSink>,
    queue: Arc<Queue>,
    dispatcher: Arc<Dispatcher>,
    recovered: Vec<crate::spool::Recovered>,
    max_connections: usize,
    dir: std::path::PathBuf,
    compact_after: Duration,
}

type Parts<'a> = (
    &'a Arc<crate::dns::Dns>,
    &'a Arc<Metrics>,
    &'a Events,
    &'a Option<Arc<dyn SuppressionStore>>,
);

/// Open the spool (recovering its messages), the queue with its shaping
/// (set in `policy`) and the dispatcher; [`Pipeline::start`] starts them.
async fn start_delivery(
    cfg: &Arc<Config>,
    spool_cfg: &crate::config::SpoolConfig,
    relay_cfg: &crate::config::RelayConfig,
    rate: crate::config::RatePolicy,
    (dns, metrics, events, suppress): Parts<'_>,
    policy: &mut PolicyHandle,
) -> anyhow::Result<Delivery> {
    let dir = cfg.resolve(&spool_cfg.dir);
    let (spool, recovered) = {
        let (d, m) = (dir.clone(), metrics.spool.clone());
        tokio::task::spawn_blocking(move || Spool::open_with(&d, m))
            .await?
            .map_err(|e| anyhow::anyhow!("spool.dir: {}: {e}", dir.display()))?
    };
    spool.set_commit_delay(spool_cfg.commit_delay);
    if !recovered.is_empty() {
        info!(messages = recovered.len(), "re-queued messages from the spool");
    }
    let providers = Arc::new(Providers::new(
        rate.providers,
        cfg.shaping.group_by_mx.then(|| Arc::clone(dns)),
        ProvidersCfg {
            negative_ttl: cfg.shaping.mx_failure_ttl,
            ..ProvidersCfg::default()
        },
    ));
    let queue = Queue::with_policy(cfg.queue.clone(), rate.shaping, Some(providers));
    policy.queue = Some(Arc::clone(&queue));
    let upstream = Arc::new(Upstream::from_config(cfg)?.expect("relay configured"));
    let classifier = Arc::new(cfg.classifier()?);
    let sink = Arc::new(SpoolSink {
        spool: Arc::clone(&spool),
        queue: Arc::clone(&queue),
        events: events.clone(),
        ids: IdGen::new(),
        hostname: cfg.server.hostname.clone(),
    });
    Ok(Delivery {
        dispatcher: Arc::new(Dispatcher {
            upstream,
            queue: Arc::clone(&queue),
            spool,
            events: events.clone(),
            classifier,
            suppress: suppress.clone().filter(|_| cfg.suppression.auto_hard_bounce),
            dsn: Some(DsnPolicy {
                sink: Arc::clone(&sink),
                off: cfg.tenants.iter().filter(|t| !t.dsn).map(|t| t.name.clone()).collect(),
                hostname: cfg.server.hostname.clone(),
                upstream: relay_cfg.addr.clone(),
            }),
            max_per_conn: relay_cfg.max_messages_per_connection,
            idle_timeout: relay_cfg.idle_timeout,
            persist_slots: tokio::sync::Semaphore::new(64),
            policy: policy.clone(),
            compact_idle: Default::default(),
        }),
        sink,
        queue,
        recovered,
        max_connections: relay_cfg.max_connections,
        dir,
        compact_after: spool_cfg.compact_after,
    })
}

/// Drop trace files past `trace.retention` every minute.
async fn sweep_trace(store: Arc<TraceStore>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let s = Arc::clone(&store);
        let _ = tokio::task::spawn_blocking(move || s.sweep()).await;
    }
}

/// Give memory freed after a burst back to the OS every 30 s. glibc keeps
/// freed heap memory in its arenas: after 50,000 deferrals RSS was 202 MB
/// while 93 MB was live (docs/performance.md).
async fn trim_memory(stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // It walks and locks the allocator's arenas: not on a runtime thread.
        // SAFETY: malloc_trim only touches glibc's own heap bookkeeping.
        let _ = tokio::task::spawn_blocking(|| unsafe { libc::malloc_trim(0) }).await;
    }
}

/// Unique, sortable message ids: ms timestamp, a per-start random node
/// part and a counter.
struct IdGen {
    node: u64,
    counter: AtomicU64,
}

impl IdGen {
    fn new() -> Self {
        let node = std::collections::hash_map::RandomState::new().build_hasher().finish() & 0xffff;
        IdGen {
            node,
            counter: AtomicU64::new(0),
        }
    }

    fn next(&self, ms: u64) -> String {
        let c = self.counter.fetch_add(1, Ordering::Relaxed) & 0xfffff;
        format!("{ms:011x}{:04x}{c:05x}", self.node)
    }
}

/// Spools a submission durably, queues it, then answers 250.
pub struct SpoolSink {
    spool: Arc<Spool>,
    queue: Arc<Queue>,
    events: Events,
    ids: IdGen,
    hostname: String,
}

/// The trace header a relay MUST add (RFC 5321 §4.4), with the protocol
/// type of RFC 3848 (ESMTP, ESMTPS with TLS, ESMTPSA with TLS and AUTH),
/// or of RFC 6531 §4.3 when the transaction used SMTPUTF8 (UTF8SMTP...).
pub fn received_header(msg: &Submission, hostname: &str, id: &str, now: std::time::SystemTime) -> String {
    let proto = match (msg.smtputf8, msg.tls.is_some(), msg.username.is_some()) {
        (false, true, true) => "ESMTPSA",
        (false, true, false) => "ESMTPS",
        (false, false, true) => "ESMTPA",
        (false, false, false) => "ESMTP",
        (true, true, true) => "UTF8SMTPSA",
        (true, true, false) => "UTF8SMTPS",
        (true, false, true) => "UTF8SMTPA",
        (true, false, false) => "UTF8SMTP",
    };
    let helo: String = msg.helo.chars().filter(|c| c.is_ascii_graphic()).take(255).collect();
    format!(
        "Received: from {helo} ({ip})\r\n\tby {hostname} (sendguard) with {proto} id {id};\r\n\t{}\r\n",
        rfc5322_date(now),
        ip = msg.peer.ip().to_canonical(),
    )
}

/// RFC 5322 §3.3 date-time in UTC, e.g. `Sun, 22 Nov 2026 23:22:28 +0000`.
pub fn rfc5322_date(t: std::time::SystemTime) -> String {
    use std::cell::RefCell;
    // Every message's Received: header asks for the current second again and
    // again: keep the last one formatted, per thread.
    thread_local!(static LAST: RefCell<(i64, String)> = const { RefCell::new((i64::MIN, String::new())) });
    let secs = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    LAST.with_borrow_mut(|(at, text)| {
        if *at != secs {
            *text = format_rfc5322_date(secs);
            *at = secs;
        }
        text.clone()
    })
}

fn format_rfc5322_date(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    let (year, month, day) = crate::throttle::civil_from_days(days);
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} +0000",
        DAYS[days.rem_euclid(7) as usize],
        MONTHS[(month - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A message sendguard wrote itself, durable in the spool but not yet queued
/// for delivery ([`SpoolSink::store_own`], then [`SpoolSink::enqueue`]).
pub struct Stored {
    pub id: String,
    env: Envelope,
    loc: crate::spool::Location,
    body: Vec<u8>,
}

impl SpoolSink {
    /// Store a message sendguard wrote itself (a DSN): null sender, one
    /// recipient, no session. It is durable when this returns, and goes to
    /// the queue only with [`SpoolSink::enqueue`], so the caller can first
    /// write the events that explain it (a worker on another I/O thread
    /// could otherwise deliver it, and log that, before them). A crash in
    /// between loses nothing: the start-up scan queues what the spool holds.
    pub async fn store_own(&self, tenant: &str, rcpt: &str, body: Vec<u8>, smtputf8: bool) -> std::io::Result<Stored> {
        let now = now_ms();
        let id = self.ids.next(now);
        let env = Envelope {
            id: id.clone(),
            received_at_ms: now,
            tenant: tenant.to_string(),
            user: None,
            peer: "local".into(),
            helo: self.hostname.clone(),
            tls: None,
            mail_from: String::new(),
            smtputf8: smtputf8 || !rcpt.is_ascii(),
            eightbit: !body.is_ascii(),
            size: body.len(),
            rcpts: vec![RcptState::new(rcpt.to_string())],
        };
        let loc = self.spool.store(&env, &body).await?;
        Ok(Stored { id, env, loc, body })
    }

    /// Hand a stored message to the queue.
    pub fn enqueue(&self, stored: Stored) {
        self.queue.add(stored.env, stored.loc, Some(stored.body));
    }
}

impl MessageSink for SpoolSink {
    fn expect(&self) -> Option<Arc<crate::spool::Expected>> {
        Some(Arc::new(self.spool.expect()))
    }

    fn submit(&self, msg: Submission) -> SubmitFuture<'_> {
        Box::pin(async move {
            let now = now_ms();
            let mail_from = msg.mail_from.as_ref().map(|m| m.to_string()).unwrap_or_default();
            let smtputf8 = msg.smtputf8 || !mail_from.is_ascii() || msg.rcpts.iter().any(|r| r.is_utf8());
            let id = self.ids.next(now);
            let mut body = received_header(&msg, &self.hostname, &id, std::time::SystemTime::now()).into_bytes();
            body.extend_from_slice(&msg.body);
            let env = Envelope {
                id,
                received_at_ms: now,
                tenant: msg.tenant.to_string(),
                user: msg.username.as_deref().map(str::to_string),
                peer: msg.peer.to_string(),
                helo: msg.helo.clone(),
                tls: msg.tls.clone(),
                mail_from,
                smtputf8,
                eightbit: !body.is_ascii(),
                size: body.len(),
                rcpts: msg.rcpts.iter().map(|r| RcptState::new(r.to_string())).collect(),
            };
            match self.spool.store_expected(&env, &body, msg.expected.as_deref()).await {
                Ok(loc) => {
                    let mut ev = Event::new(EventKind::Received);
                    ev.message_id = Some(env.id.clone());
                    ev.session_id = Some(msg.session_id.to_string());
                    ev.tenant = Some(env.tenant.clone());
                    ev.user = env.user.clone();
                    ev.sender = Some(env.mail_from.clone());
                    ev.rcpts = Some(env.rcpts.iter().map(|r| r.addr.clone()).collect());
                    ev.size = Some(env.size);
                    ev.peer = Some(env.peer.clone());
                    ev.tls = env.tls.clone();
                    ev.header_message_id = crate::submission::header_message_id(&msg.body);
                    ev.checks = Some(msg.checks);
                    let id = env.id.clone();
                    info!(message_id = %id, rcpts = env.rcpts.len(), size = env.size, "message queued");
                    // The event first: with sessions and delivery workers on
                    // several I/O threads, a message queued first could be
                    // delivered, and its `delivered` logged, before its
                    // `received`. The session waits for the event either way.
                    self.events.emit(ev).await;
                    self.queue.add(env, loc, Some(body));
                    Reply::new(250, Enhanced(2, 0, 0), format!("Ok: queued as {id}"))
                }
                Err(e) => {
                    error!(error = %e, "cannot spool message");
                    Reply::new(
                        451,
                        Enhanced(4, 3, 0),
                        "Temporary local problem: message could not be stored; try again later",
                    )
                    .with_token("spool_unavailable")
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn dates() {
        // expected values from Python's email.utils.formatdate
        let cases = [
            (0, "Thu, 01 Jan 1970 00:00:00 +0000"),
            (951_782_400, "Tue, 29 Feb 2000 00:00:00 +0000"),
            (1_795_389_748, "Sun, 22 Nov 2026 23:22:28 +0000"),
            (4_107_542_399, "Sun, 28 Feb 2100 23:59:59 +0000"),
        ];
        for (secs, want) in cases {
            assert_eq!(rfc5322_date(UNIX_EPOCH + Duration::from_secs(secs)), want);
        }
        // The per-thread cache: the same second again (sub-second parts
        // differ), then another second, then back.
        let t = UNIX_EPOCH + Duration::from_millis(1_795_389_748_250);
        assert_eq!(rfc5322_date(t), "Sun, 22 Nov 2026 23:22:28 +0000");
        assert_eq!(
            rfc5322_date(t + Duration::from_millis(700)),
            "Sun, 22 Nov 2026 23:22:28 +0000"
        );
        assert_eq!(
            rfc5322_date(t + Duration::from_millis(750)),
            "Sun, 22 Nov 2026 23:22:29 +0000"
        );
        assert_eq!(rfc5322_date(t), "Sun, 22 Nov 2026 23:22:28 +0000");
    }

    #[test]
    fn received_header_shape() {
        let msg = Submission {
            session_id: "s".into(),
            tenant: "t".into(),
            username: Some("u".into()),
            peer: "[::ffff:192.0.2.7]:2525".parse().unwrap(),
            helo: "client.example\r\nX-Injected: yes".into(),
            tls: Some("TLSv1_3".into()),
            mail_from: None,
            smtputf8: false,
            rcpts: vec![],
            body: vec![],
            checks: vec![],
            expected: None,
        };
        let h = received_header(&msg, "sendguard.example", "ID1", UNIX_EPOCH);
        assert_eq!(
            h,
            "Received: from client.exampleX-Injected:yes (192.0.2.7)\r\n\tby sendguard.example (sendguard) with ESMTPSA id ID1;\r\n\tThu, 01 Jan 1970 00:00:00 +0000\r\n"
        );
        // RFC 6531 §4.3 protocol types for SMTPUTF8 transactions.
        for (utf8, tls, user, want) in [
            (true, true, true, " with UTF8SMTPSA id"),
            (true, true, false, " with UTF8SMTPS id"),
            (true, false, false, " with UTF8SMTP id"),
            (false, false, false, " with ESMTP id"),
        ] {
            let m = Submission {
                smtputf8: utf8,
                tls: tls.then(|| "TLSv1_3".into()),
                username: user.then(|| "u".into()),
                ..msg.clone()
            };
            let h = received_header(&m, "sendguard.example", "ID1", UNIX_EPOCH);
            assert!(h.contains(want), "{h}");
        }
    }
}
