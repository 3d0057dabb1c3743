//! Prometheus metrics: every metric is declared once, here, with its help
//! text, and served as OpenMetrics text at `/metrics` on the admin listener.
//!
//! Three ways numbers get in:
//! - **events**: [`Metrics::event`] counts every event as it is emitted
//!   (received, refused, delivered, deferred, bounced, expired, ...), so the
//!   counters and the events log can never disagree;
//! - **handles**: components that time things (spool, DNS, relay client)
//!   get a small struct of histogram handles ([`SpoolMetrics`],
//!   [`DnsMetrics`]) and record into it; the defaults are unregistered, so
//!   tests and tools that build a component alone need no registry;
//! - **scrape time**: state that already lives elsewhere (queue depth per
//!   provider, breakers, suspensions, DNS cache counters, webhook outboxes)
//!   is read when `/metrics` is scraped ([`Sources`]).
//!
//! Label sets are bounded: tenants are the configured ones, sender domains
//! the configured ones (anything else is `other`, the null sender `null`),
//! providers come from the provider table, and every label keeps at most
//! [`MAX_VALUES`] distinct values, after which new ones fold into `other`.
//!
//! Trust boundary: label values can come from clients (sender domains) and
//! upstream replies (reason tokens); the bounds above keep a hostile client
//! from growing the registry, and the encoder escapes values.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::config::Config;
use crate::events::{Event, EventKind};

/// Most distinct values one label keeps before folding new ones into `other`.
pub const MAX_VALUES: usize = 200;

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    stage: &'static str,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SenderLabels {
    tenant: String,
    sender_domain: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeliveryLabels {
    outcome: &'static str,
    tenant: String,
    sender_domain: String,
    provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    outcome: &'static str,
    category: &'static str,
    failure_stage: &'static str,
    provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    provider: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabels {
    provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScopeStateLabels {
    scope: &'static str,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScopeLabels {
    scope: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointResultLabels {
    endpoint: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: &'static str,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// Latency buckets from 1 ms to about 65 s.
fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// Timing handles for the spool's group commit.
#[derive(Clone)]
pub struct SpoolMetrics {
    /// Seconds one group commit's `fdatasync` took.
    pub fsync_seconds: Histogram,
    /// Messages made durable by one group commit.
    pub batch_size: Histogram,
}

impl Default for SpoolMetrics {
    fn default() -> Self {
        SpoolMetrics {
            fsync_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
        }
    }
}

/// Timing handle for DNS queries that went to the network.
#[derive(Clone)]
pub struct DnsMetrics {
    pub lookup_seconds: Histogram,
}

impl Default for DnsMetrics {
    fn default() -> Self {
        DnsMetrics {
            lookup_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
        }
    }
}

/// Keeps a label's distinct values bounded: known values pass, others are
/// admitted until [`MAX_VALUES`], then `other`.
struct Bounded {
    known: HashSet<String>,
    seen: Mutex<HashSet<String>>,
    /// Only `known` values are kept as they are (tenants, sender domains).
    closed: bool,
}

impl Bounded {
    fn open() -> Bounded {
        Bounded {
            known: HashSet::new(),
            seen: Mutex::new(HashSet::new()),
            closed: false,
        }
    }

    fn closed(known: impl IntoIterator<Item = String>) -> Bounded {
        Bounded {
            known: known.into_iter().collect(),
            seen: Mutex::new(HashSet::new()),
            closed: true,
        }
    }

    fn label(&self, v: &str) -> String {
        if self.known.contains(v) {
            return v.to_string();
        }
        if self.closed || v.is_empty() || v.len() > 64 {
            return "other".into();
        }
        let mut seen = self.seen.lock().unwrap();
        if seen.contains(v) {
            return v.to_string();
        }
        if seen.len() < MAX_VALUES {
            seen.insert(v.to_string());
            return v.to_string();
        }
        "other".into()
    }
}

/// The sender domains metrics name: the configured ones. `*.x` patterns
/// report as the pattern.
struct SenderDomains {
    exact: Bounded,
    /// `*.x` patterns, reported as themselves.
    wildcards: Vec<String>,
}

impl SenderDomains {
    fn new(cfg: &Config) -> SenderDomains {
        let mut exact = Vec::new();
        let mut wildcards = Vec::new();
        for t in &cfg.tenants {
            for d in &t.sender_domains {
                if d.starts_with("*.") {
                    wildcards.push(d.clone());
                } else {
                    exact.push(d.clone());
                }
            }
            for a in &t.sender_addresses {
                if let Some((_, d)) = a.rsplit_once('@') {
                    exact.push(d.to_ascii_lowercase());
                }
            }
        }
        exact.extend(cfg.domains.iter().map(|d| d.name.clone()));
        SenderDomains {
            exact: Bounded::closed(exact),
            wildcards,
        }
    }

    /// The label for a sender address (or bare domain); `null` for `<>`.
    fn label(&self, sender: &str) -> String {
        let domain = sender.rsplit_once('@').map_or(sender, |(_, d)| d);
        if domain.is_empty() || domain == "<>" {
            return "null".into();
        }
        let domain = domain.to_ascii_lowercase();
        if self.exact.known.contains(&domain) {
            return domain;
        }
        self.wildcards
            .iter()
            .find(|p| crate::config::sender_domain_matches(p, &domain))
            .cloned()
            .unwrap_or_else(|| "other".into())
    }
}

/// What `/metrics` reads at scrape time.
#[derive(Default)]
pub struct Sources<'a> {
    pub queue: Option<&'a crate::queue::Queue>,
    pub breakers: Option<&'a crate::rate::breaker::Breakers>,
    pub dns: Option<&'a crate::dns::Dns>,
    pub webhooks: Option<&'a crate::webhook::Webhooks>,
    pub cluster: Option<&'a crate::cluster::Cluster>,
    pub health: Option<&'a crate::health::Health>,
}

/// The registry and every metric in it.
pub struct Metrics {
    registry: Registry,
    tenants: Bounded,
    senders: SenderDomains,
    providers: Bounded,
    reasons: Bounded,
    listeners: Bounded,
    endpoints: Bounded,

    events: Family<EventLabels, Counter>,
    refusals: Family<RefusalLabels, Counter>,
    received: Family<SenderLabels, Counter>,
    recipients: Family<DeliveryLabels, Counter>,
    failures: Family<FailureLabels, Counter>,
    connections: Family<ListenerLabels, Counter>,
    connections_active: Gauge,
    sessions: Family<OutcomeLabels, Counter>,
    upstream: Family<PhaseLabels, Histogram, fn() -> Histogram>,
    upstream_chained: Counter,
    pub spool: SpoolMetrics,
    pub dns: DnsMetrics,
    dns_cache: Family<ResultLabels, Counter>,
    queue_jobs: Family<QueueLabels, Gauge>,
    queue_oldest: Family<ProviderLabels, FloatGauge>,
    queue_messages: Gauge,
    delivery_paused: Gauge,
    breakers: Family<ScopeStateLabels, Gauge>,
    suspensions: Family<ScopeLabels, Gauge>,
    webhook_backlog: Family<EndpointLabels, Gauge>,
    webhook_oldest: Family<EndpointLabels, FloatGauge>,
    webhook_results: Family<EndpointResultLabels, Counter>,
    draining: Gauge,
    cluster_degraded: Gauge,
    cluster_nodes: Gauge,
    cluster_ops: Family<ResultLabels, Counter>,
    /// The last exposition and when it was made: scrapes within
    /// [`RENDER_TTL`] share it, and one render runs at a time (refresh
    /// clears and refills gauge families; two at once would mix).
    rendered: Mutex<Option<(std::time::Instant, String)>>,
}

/// How long one rendering of `/metrics` is served again: a scrape loop
/// cannot make the queue walk more than once a second.
pub const RENDER_TTL: std::time::Duration = std::time::Duration::from_secs(1);

impl Metrics {
    pub fn new(cfg: &Config) -> Metrics {
        let mut r = Registry::with_prefix("sendguard");
        let info: Family<VersionLabels, Gauge> = Family::default();
        info.get_or_create(&VersionLabels {
            version: env!("CARGO_PKG_VERSION"),
        })
        .set(1);
        r.register("build_info", "sendguard's version (always 1)", info);

        let m = Metrics {
            tenants: Bounded::closed(cfg.tenants.iter().map(|t| t.name.clone())),
            senders: SenderDomains::new(cfg),
            providers: Bounded::open(),
            reasons: Bounded::open(),
            listeners: Bounded::open(),
            endpoints: Bounded::closed(cfg.webhooks.endpoint.iter().map(|e| e.name.clone())),
            events: Family::default(),
            refusals: Family::default(),
            received: Family::default(),
            recipients: Family::default(),
            failures: Family::default(),
            connections: Family::default(),
            connections_active: Gauge::default(),
            sessions: Family::default(),
            upstream: Family::new_with_constructor(latency),
            upstream_chained: Counter::default(),
            spool: SpoolMetrics::default(),
            dns: DnsMetrics::default(),
            dns_cache: Family::default(),
            queue_jobs: Family::default(),
            queue_oldest: Family::default(),
            queue_messages: Gauge::default(),
            delivery_paused: Gauge::default(),
            draining: Gauge::default(),
            cluster_degraded: Gauge::default(),
            cluster_nodes: Gauge::default(),
            cluster_ops: Family::default(),
            breakers: Family::default(),
            suspensions: Family::default(),
            webhook_backlog: Family::default(),
            webhook_oldest: Family::default(),
            webhook_results: Family::default(),
            rendered: Mutex::new(None),
            registry: Registry::default(),
        };
        r.register(
            "events",
            "Events emitted, by type (the same lines as the events log)",
            m.events.clone(),
        );
        r.register(
            "refusals",
            "Submissions refused, by SMTP stage (connect, auth, mail, rcpt, data) and reason token",
            m.refusals.clone(),
        );
        r.register(
            "messages_received",
            "Messages accepted (250 after the spool write), by tenant and sender domain",
            m.received.clone(),
        );
        r.register(
            "recipients",
            "Delivery outcomes per recipient (delivered, deferred, bounced, expired), by tenant, sender domain and provider",
            m.recipients.clone(),
        );
        r.register(
            "delivery_failures",
            "Deferred, bounced and expired recipients by failure category, failure stage and provider",
            m.failures.clone(),
        );
        r.register(
            "connections",
            "Client connections accepted, by listener (bound address)",
            m.connections.clone(),
        );
        r.register(
            "connections_active",
            "Client connections open now",
            m.connections_active.clone(),
        );
        r.register(
            "sessions",
            "Client sessions ended, by outcome: quit (the client said QUIT), closed (by the server: refusal at connect, errors, timeout, shutdown), gone (the client disconnected)",
            m.sessions.clone(),
        );
        r.register_with_unit(
            "upstream_reply",
            "Time until the upstream relay answered: connect (TCP, greeting, EHLO, TLS, AUTH) and transaction (MAIL to the reply after the data)",
            Unit::Seconds,
            m.upstream.clone(),
        );
        r.register(
            "upstream_chained_transactions",
            "Upstream transactions whose MAIL, RCPT and DATA went out in the same write as the previous message's content (RFC 2920 pipelining across messages: one round trip per message)",
            m.upstream_chained.clone(),
        );
        r.register_with_unit(
            "spool_fsync",
            "Time of one group commit's fdatasync",
            Unit::Seconds,
            m.spool.fsync_seconds.clone(),
        );
        r.register(
            "spool_commit_batch_messages",
            "Messages made durable by one group commit (one fsync)",
            m.spool.batch_size.clone(),
        );
        r.register_with_unit(
            "dns_lookup",
            "Time of DNS queries that went to the network (cache misses and refreshes)",
            Unit::Seconds,
            m.dns.lookup_seconds.clone(),
        );
        r.register(
            "dns_cache_lookups",
            "DNS answer cache lookups by result (hit, stale hit, miss)",
            m.dns_cache.clone(),
        );
        r.register(
            "queue_jobs",
            "Queued deliveries per provider: ready (waiting for shaping), scheduled (waiting for a retry time), in_flight",
            m.queue_jobs.clone(),
        );
        r.register_with_unit(
            "queue_oldest_age",
            "Age of the oldest queued message per provider",
            Unit::Seconds,
            m.queue_oldest.clone(),
        );
        r.register(
            "queue_messages",
            "Messages in the queue (not yet final for every recipient)",
            m.queue_messages.clone(),
        );
        r.register(
            "delivery_paused",
            "1 while all delivery is paused (relay refused our credentials, or an operator)",
            m.delivery_paused.clone(),
        );
        r.register(
            "draining",
            "1 once the node drains (no new SMTP connections; delivery goes on)",
            m.draining.clone(),
        );
        r.register(
            "cluster_degraded",
            "1 while the fleet backend (Redis) is configured but unavailable: limits fall back to this node's fair share, suppression to its local replica",
            m.cluster_degraded.clone(),
        );
        r.register(
            "cluster_live_nodes",
            "Nodes of the fleet that heartbeated within 10 s (last known while Redis is unavailable; 1 when embedded)",
            m.cluster_nodes.clone(),
        );
        r.register(
            "cluster_operations",
            "Fleet backend operations by result: command, error, connect, notice_in, notice_out",
            m.cluster_ops.clone(),
        );
        r.register(
            "breakers",
            "Circuit breakers not closed, by scope (tenant, sender_domain) and state (open, half_open)",
            m.breakers.clone(),
        );
        r.register(
            "suspensions",
            "Delivery holds in force, by scope (provider, pair, sender_domain, tenant)",
            m.suspensions.clone(),
        );
        r.register(
            "webhook_backlog_events",
            "Events in a webhook endpoint's outbox not yet acknowledged by the receiver",
            m.webhook_backlog.clone(),
        );
        r.register_with_unit(
            "webhook_oldest_age",
            "Age of the oldest event waiting in a webhook endpoint's outbox",
            Unit::Seconds,
            m.webhook_oldest.clone(),
        );
        r.register(
            "webhook_posts",
            "Webhook POSTs by endpoint and result (delivered, failed attempt, dropped after max_age)",
            m.webhook_results.clone(),
        );
        Metrics { registry: r, ..m }
    }

    /// Count one event.
    pub fn event(&self, ev: &Event) {
        self.events
            .get_or_create(&EventLabels {
                event: ev.event.as_str(),
            })
            .inc();
        match ev.event {
            EventKind::Refused => {
                let reason = ev
                    .reply
                    .as_ref()
                    .and_then(|r| reason_token(&r.text))
                    .map_or_else(|| "none".to_string(), |t| self.reasons.label(t));
                self.refusals
                    .get_or_create(&RefusalLabels {
                        stage: ev.stage.unwrap_or("unknown"),
                        reason,
                    })
                    .inc();
            }
            EventKind::Received => {
                self.received
                    .get_or_create(&SenderLabels {
                        tenant: self.tenant(ev),
                        sender_domain: self.senders.label(ev.sender.as_deref().unwrap_or("")),
                    })
                    .inc();
            }
            EventKind::Delivered | EventKind::Deferred | EventKind::Bounced | EventKind::Expired => {
                let outcome = ev.event.as_str();
                let provider = self.providers.label(ev.provider.as_deref().unwrap_or("other"));
                self.recipients
                    .get_or_create(&DeliveryLabels {
                        outcome,
                        tenant: self.tenant(ev),
                        sender_domain: self.senders.label(ev.sender.as_deref().unwrap_or("")),
                        provider: provider.clone(),
                    })
                    .inc();
                if ev.event != EventKind::Delivered {
                    self.failures
                        .get_or_create(&FailureLabels {
                            outcome,
                            category: ev.category.map_or("none", |c| c.as_str()),
                            failure_stage: ev.failure_stage.map_or("none", |s| s.as_str()),
                            provider,
                        })
                        .inc();
                }
            }
            _ => {}
        }
    }

    fn tenant(&self, ev: &Event) -> String {
        match ev.tenant.as_deref() {
            Some(t) => self.tenants.label(t),
            None => "none".into(),
        }
    }

    /// A client connected on `listener` (its configured address).
    pub fn connection_opened(&self, listener: &str) {
        self.connections
            .get_or_create(&ListenerLabels {
                listener: self.listeners.label(listener),
            })
            .inc();
        self.connections_active.inc();
    }

    /// The connection closed; `outcome`: `quit`, `closed`, `gone`.
    pub fn connection_closed(&self, outcome: &'static str) {
        self.connections_active.dec();
        self.sessions.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    /// A transaction's envelope went out behind the previous content.
    pub fn upstream_chained(&self) {
        self.upstream_chained.inc();
    }

    /// How long the upstream took for one `phase` (`connect`, `transaction`).
    pub fn upstream(&self, phase: &'static str, d: std::time::Duration) {
        self.upstream
            .get_or_create(&PhaseLabels { phase })
            .observe(d.as_secs_f64());
    }

    /// The OpenMetrics text, after reading the scrape-time `sources`; the
    /// same text again for scrapes within [`RENDER_TTL`].
    pub fn render(&self, sources: &Sources<'_>) -> String {
        let mut cached = self.rendered.lock().unwrap();
        if let Some((at, text)) = cached.as_ref()
            && at.elapsed() < RENDER_TTL
        {
            return text.clone();
        }
        self.refresh(sources);
        let mut out = String::with_capacity(16 * 1024);
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        *cached = Some((std::time::Instant::now(), out.clone()));
        out
    }

    fn refresh(&self, s: &Sources<'_>) {
        if let Some(q) = s.queue {
            self.queue_jobs.clear();
            self.queue_oldest.clear();
            let now = crate::queue::now_ms();
            let view = q.shaping();
            for p in q.provider_depths() {
                let provider = self.providers.label(&p.provider);
                for (state, n) in [("ready", p.ready), ("scheduled", p.scheduled)] {
                    self.queue_jobs
                        .get_or_create(&QueueLabels {
                            provider: provider.clone(),
                            state,
                        })
                        .inc_by(n as i64);
                }
                if let Some(t) = p.oldest_received_ms {
                    let age = now.saturating_sub(t) as f64 / 1000.0;
                    let g = self.queue_oldest.get_or_create(&ProviderLabels { provider });
                    g.set(g.get().max(age));
                }
            }
            for p in &view.providers {
                self.queue_jobs
                    .get_or_create(&QueueLabels {
                        provider: self.providers.label(&p.provider),
                        state: "in_flight",
                    })
                    .inc_by(i64::from(p.in_flight));
            }
            self.queue_messages.set(q.len() as i64);
            self.delivery_paused.set(i64::from(view.paused.is_some()));
            let pairs = view
                .providers
                .iter()
                .flat_map(|p| &p.pairs)
                .filter(|x| x.suspended_until_ms.is_some())
                .count();
            self.suspensions.clear();
            for (scope, n) in [
                ("provider", view.provider_holds.len()),
                ("pair", pairs),
                ("sender_domain", view.sender_holds.len()),
                ("tenant", view.tenant_holds.len()),
            ] {
                self.suspensions.get_or_create(&ScopeLabels { scope }).set(n as i64);
            }
        }
        if let Some(b) = s.breakers {
            self.breakers.clear();
            for v in b.view(crate::throttle::now_ns()) {
                if v.state != "closed" {
                    self.breakers
                        .get_or_create(&ScopeStateLabels {
                            scope: v.scope.as_str(),
                            state: v.state,
                        })
                        .inc();
                }
            }
        }
        if let Some(d) = s.dns {
            use std::sync::atomic::Ordering::Relaxed;
            let st = &d.stats;
            for (result, n) in [
                ("hit", st.hits.load(Relaxed)),
                ("stale_hit", st.stale_hits.load(Relaxed)),
                ("miss", st.misses.load(Relaxed)),
            ] {
                self.dns_cache
                    .get_or_create(&ResultLabels { result })
                    .inner()
                    .store(n, Relaxed);
            }
        }
        if let Some(h) = s.health {
            self.draining.set(i64::from(h.draining()));
        }
        match s.cluster {
            None => {
                self.cluster_nodes.set(1);
            }
            Some(c) => {
                use std::sync::atomic::Ordering::Relaxed;
                self.cluster_degraded.set(i64::from(!c.is_up()));
                self.cluster_nodes.set(c.live_nodes() as i64);
                let st = &c.stats;
                for (result, n) in [
                    ("command", &st.commands),
                    ("error", &st.errors),
                    ("connect", &st.reconnects),
                    ("notice_in", &st.notices_in),
                    ("notice_out", &st.notices_out),
                ] {
                    self.cluster_ops
                        .get_or_create(&ResultLabels { result })
                        .inner()
                        .store(n.load(Relaxed), Relaxed);
                }
            }
        }
        if let Some(w) = s.webhooks {
            use std::sync::atomic::Ordering::Relaxed;
            self.webhook_oldest.clear();
            for st in w.status() {
                let endpoint = self.endpoints.label(&st.name);
                self.webhook_backlog
                    .get_or_create(&EndpointLabels {
                        endpoint: endpoint.clone(),
                    })
                    .set(st.backlog as i64);
                if let Some(age) = st.oldest_age_seconds {
                    self.webhook_oldest
                        .get_or_create(&EndpointLabels {
                            endpoint: endpoint.clone(),
                        })
                        .set(age);
                }
                for (result, n) in [
                    ("delivered", st.delivered),
                    ("failed", st.failed_attempts),
                    ("dropped", st.dropped),
                ] {
                    self.webhook_results
                        .get_or_create(&EndpointResultLabels {
                            endpoint: endpoint.clone(),
                            result,
                        })
                        .inner()
                        .store(n, Relaxed);
                }
            }
        }
    }
}

/// The reason token at the end of a reply text: `... (sendguard:token)`.
pub fn reason_token(text: &str) -> Option<&str> {
    let start = text.rfind("(sendguard:")? + "(sendguard:".len();
    let tok = text[start..].strip_suffix(')')?;
    (!tok.is_empty()
        && tok
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'))
    .then_some(tok)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config::parse(
            r#"
[[tenants]]
name = "acme"
sender_domains = ["acme.example", "*.mail.acme.example"]
sender_addresses = ["ops@Other.Example"]
"#,
        )
        .unwrap()
    }

    #[test]
    fn reason_tokens() {
        assert_eq!(
            reason_token("Recipient suppressed (sendguard:suppressed)"),
            Some("suppressed")
        );
        assert_eq!(
            reason_token("a (sendguard:x) b (sendguard:dmarc_would_fail)"),
            Some("dmarc_would_fail")
        );
        assert_eq!(reason_token("no token here"), None);
        assert_eq!(reason_token("(sendguard:Bad Token)"), None);
        assert_eq!(reason_token("(sendguard:)"), None);
        assert_eq!(reason_token("(sendguard:tok) trailing"), None);
    }

    #[test]
    fn sender_domain_labels_are_bounded_to_the_config() {
        let s = SenderDomains::new(&cfg());
        assert_eq!(s.label("a@acme.example"), "acme.example");
        assert_eq!(s.label("a@ACME.example"), "acme.example");
        assert_eq!(s.label("a@x.mail.acme.example"), "*.mail.acme.example");
        assert_eq!(s.label("a@mail.acme.example"), "other");
        assert_eq!(s.label("a@other.example"), "other.example");
        assert_eq!(s.label("a@attacker.example"), "other");
        assert_eq!(s.label(""), "null");
    }

    #[test]
    fn open_labels_fold_into_other_after_the_cap() {
        let b = Bounded::open();
        for i in 0..MAX_VALUES {
            assert_eq!(b.label(&format!("v{i}")), format!("v{i}"));
        }
        assert_eq!(b.label("v0"), "v0");
        assert_eq!(b.label("one_too_many"), "other");
        assert_eq!(b.label(&"x".repeat(65)), "other");
    }

    #[test]
    fn events_count_into_their_families() {
        let m = Metrics::new(&cfg());
        let mut ev = Event::new(EventKind::Refused);
        ev.stage = Some("rcpt");
        ev.reply = Some(crate::events::ReplyRecord {
            code: Some(550),
            enhanced: Some("5.7.1".into()),
            text: "Recipient suppressed (sendguard:suppressed)".into(),
        });
        m.event(&ev);
        m.event(&ev);
        let mut d = Event::new(EventKind::Bounced);
        d.tenant = Some("acme".into());
        d.sender = Some("news@acme.example".into());
        d.provider = Some("google".into());
        d.category = Some(crate::classify::Category::UserUnknown);
        d.failure_stage = Some(crate::classify::Stage::Recipient);
        m.event(&d);
        let text = m.render(&Sources::default());
        assert!(
            text.contains("sendguard_refusals_total{stage=\"rcpt\",reason=\"suppressed\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("sendguard_events_total{event=\"refused\"} 2\n"), "{text}");
        assert!(
            text.contains(
                "sendguard_recipients_total{outcome=\"bounced\",tenant=\"acme\",sender_domain=\"acme.example\",provider=\"google\"} 1\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("sendguard_delivery_failures_total{outcome=\"bounced\",category=\"user_unknown\",failure_stage=\"recipient\",provider=\"google\"} 1\n"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
