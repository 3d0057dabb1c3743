//! The ready queue with shaping: jobs wait here until every limit they
//! fall under lets them go — the provider's rate and concurrency, the
//! (sender domain, provider) pair's rate, the relay's cap — and holds
//! (suspensions, a delivery pause) are over.
//!
//! Fairness: per provider, tenants take turns (round robin), and within a
//! tenant its sender domains take turns, so one tenant's burst of 50,000
//! messages to Gmail delays another tenant's message to Gmail by at most
//! one turn, not by 50,000 messages.
//!
//! [`Shaper::take`] never blocks: it returns a job, or the time the next
//! one can go (or "when something is released"), so the caller sleeps
//! exactly that long and a queue of waiting mail costs no CPU.
//!
//! Trust boundary: pure; the caller passes the clock.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use serde::Serialize;

use super::policy::{Action, BackoffRule, ProviderLimits, ShapingPolicy};
use crate::throttle::{Denied, Gcra, Limit, Nanos, Rolling};

/// Where a job belongs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Lane {
    pub provider: Arc<str>,
    pub tenant: Arc<str>,
    pub sender_domain: Arc<str>,
}

/// What [`Shaper::take`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Take<J> {
    Job(J),
    /// Nothing may go before this time (`None`: until a job is added or a
    /// delivery finishes).
    Wait(Option<Nanos>),
}

/// Slow-down and suspension of one (provider, sender domain) pair.
#[derive(Debug, Clone, Default)]
struct Adapt {
    factor: f64,
    slow_until: Nanos,
    recover_ns: u64,
    suspended_until: Nanos,
    /// The rule that acted last (for the admin view).
    rule: Option<String>,
}

impl Adapt {
    /// The share of the rate allowed now: `factor` until `slow_until`, then
    /// a straight climb back to 1 over `recover_ns`.
    fn factor(&self, now: Nanos) -> f64 {
        if self.factor <= 0.0 || self.factor >= 1.0 {
            return 1.0;
        }
        if now < self.slow_until {
            return self.factor;
        }
        let since = now - self.slow_until;
        if since >= self.recover_ns {
            return 1.0;
        }
        self.factor + (1.0 - self.factor) * (since as f64 / self.recover_ns as f64)
    }

    fn idle(&self, now: Nanos) -> bool {
        self.suspended_until <= now && self.factor(now) >= 1.0
    }
}

#[derive(Debug, Default)]
struct Pair {
    gcra: Gcra,
    adapt: Adapt,
}

/// One tenant's jobs at a provider. A sender domain is in `order` exactly
/// when it is a key of `jobs`; one whose queue ran empty is dropped when
/// its turn comes (O(1), instead of searching `order` on every take).
#[derive(Debug)]
struct TenantQ<J> {
    /// Sender domains with (or lately with) jobs, in turn order.
    order: VecDeque<Arc<str>>,
    jobs: HashMap<Arc<str>, VecDeque<J>>,
    len: usize,
}

#[derive(Debug)]
struct Prov<J> {
    gcra: Gcra,
    in_flight: u32,
    /// Tenants with (or lately with) jobs, in turn order; a tenant is here
    /// exactly when it is a key of `tenants` (emptied ones are dropped
    /// when their turn comes).
    order: VecDeque<Arc<str>>,
    tenants: HashMap<Arc<str>, TenantQ<J>>,
    pairs: HashMap<Arc<str>, Pair>,
    len: usize,
    /// Jobs handed out over the last minute (the observed rate).
    sent: Rolling<1>,
}

impl<J> Default for Prov<J> {
    fn default() -> Self {
        Prov {
            gcra: Gcra::default(),
            in_flight: 0,
            order: VecDeque::new(),
            tenants: HashMap::new(),
            pairs: HashMap::new(),
            len: 0,
            sent: Rolling::new(std::time::Duration::from_secs(60), 6),
        }
    }
}

/// A hold on delivery, with why.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Hold {
    pub until_ms: u64,
    pub reason: String,
}

pub struct Shaper<J> {
    policy: Arc<ShapingPolicy>,
    providers: HashMap<Arc<str>, Prov<J>>,
    /// Providers with jobs, in turn order.
    order: VecDeque<Arc<str>>,
    relay: Gcra,
    pause: Option<(Nanos, Hold)>,
    holds: HoldMaps,
    provider_holds: HashMap<Arc<str>, (Nanos, Hold)>,
    len: usize,
    /// Fleet mode: leased provider rates, fair shares.
    pub fleet: super::fleet::FleetShare,
}

/// The slowest a pair gets from repeated slow-downs.
const MIN_FACTOR: f64 = 1.0 / 64.0;

fn sooner(a: Option<Nanos>, b: Nanos) -> Option<Nanos> {
    Some(a.map_or(b, |a| a.min(b)))
}

fn denied_until(now: Nanos, d: Denied) -> Option<Nanos> {
    match d {
        Denied::Wait(w) => Some(now + w),
        // More than the burst at once cannot happen (one job is one event).
        Denied::Never => None,
    }
}

impl<J> Shaper<J> {
    pub fn new(policy: Arc<ShapingPolicy>) -> Self {
        Shaper {
            policy,
            providers: HashMap::new(),
            order: VecDeque::new(),
            relay: Gcra::default(),
            pause: None,
            holds: HoldMaps::default(),
            provider_holds: HashMap::new(),
            len: 0,
            fleet: super::fleet::FleetShare::default(),
        }
    }

    /// Replace the policy (a reload): queued jobs, rate state and holds
    /// stay; a limiter that is owed more time than its new rate would ever
    /// charge is cut back to it, so a raised rate applies at once.
    pub fn set_policy(&mut self, policy: Arc<ShapingPolicy>, now: Nanos) {
        self.policy = policy;
        let p = &self.policy;
        // Clamped to what `take` would let each limiter owe: at this node's
        // share (rate and burst), not the whole limit's.
        let (share, pf) = (self.fleet.share(), self.fleet.provider_factor());
        if let Some(l) = &p.relay {
            self.relay.clamp(now, &l.burst_at_share(share), share);
        }
        for (name, prov) in &mut self.providers {
            let limits = p.limits(name);
            if let Some(l) = &limits.rate {
                prov.gcra.clamp(now, &l.burst_at_share(pf), pf);
            }
            for pair in prov.pairs.values_mut() {
                let f = pair.adapt.factor(now);
                if let Some(l) = pair_limit(limits, &p.backoff_base, f) {
                    pair.gcra.clamp(now, &l.burst_at_share(share), f * share);
                }
            }
        }
    }

    pub fn policy(&self) -> &Arc<ShapingPolicy> {
        &self.policy
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn push(&mut self, lane: &Lane, job: J) {
        let prov = match self.providers.get_mut(&lane.provider) {
            Some(p) => p,
            None => self.providers.entry(Arc::clone(&lane.provider)).or_default(),
        };
        if prov.len == 0 {
            self.order.push_back(Arc::clone(&lane.provider));
        }
        if !prov.tenants.contains_key(&lane.tenant) {
            prov.order.push_back(Arc::clone(&lane.tenant));
        }
        let tq = prov.tenants.entry(Arc::clone(&lane.tenant)).or_insert_with(|| TenantQ {
            order: VecDeque::new(),
            jobs: HashMap::new(),
            len: 0,
        });
        if !tq.jobs.contains_key(&lane.sender_domain) {
            tq.order.push_back(Arc::clone(&lane.sender_domain));
        }
        tq.jobs
            .entry(Arc::clone(&lane.sender_domain))
            .or_default()
            .push_back(job);
        tq.len += 1;
        prov.len += 1;
        self.len += 1;
    }

    /// A delivery to `provider` taken from here has finished.
    pub fn release(&mut self, provider: &str) {
        if let Some(p) = self.providers.get_mut(provider) {
            p.in_flight = p.in_flight.saturating_sub(1);
        }
        self.gc(provider);
    }

    /// The next job allowed to go now, charged to every limit it is under.
    pub fn take(&mut self, now: Nanos) -> Take<J> {
        if self.len == 0 {
            return Take::Wait(None);
        }
        if let Some((until, _)) = &self.pause {
            if *until > now {
                return Take::Wait(Some(*until));
            }
            self.pause = None;
        }
        let policy = Arc::clone(&self.policy);
        let share = self.fleet.share();
        if let Some(l) = &policy.relay
            && let Err(d) = self.relay.check(now, &l.burst_at_share(share), share, 1)
        {
            return Take::Wait(denied_until(now, d));
        }
        let mut wake: Option<Nanos> = None;
        for _ in 0..self.order.len() {
            let Some(name) = self.order.pop_front() else { break };
            self.order.push_back(Arc::clone(&name));
            if let Some((until, _)) = self.provider_holds.get(&name) {
                if *until > now {
                    wake = sooner(wake, *until);
                    continue;
                }
                self.provider_holds.remove(&name);
            }
            let limits = policy.limits(&name);
            let prov = self.providers.get_mut(&name).expect("ordered provider exists");
            if limits
                .max_concurrency
                .is_some_and(|m| prov.in_flight >= self.fleet.concurrency(m))
            {
                continue; // woken by a release
            }
            let pf = self.fleet.provider_factor();
            if let Some(l) = &limits.rate
                && let Err(d) = prov.gcra.check(now, &l.burst_at_share(pf), pf, 1)
            {
                wake = denied_until(now, d).map_or(wake, |t| sooner(wake, t));
                continue;
            }
            // Fleet tokens: wait for one that is due without touching the
            // lanes' turns; with none held, ask only if a job could go (held
            // or slowed lanes must not draw on the fleet's rate).
            let leased = limits.rate.is_some();
            let token = if leased { self.fleet.due(&name, now) } else { Ok(()) };
            if let Err(Some(t)) = token {
                wake = sooner(wake, t);
                continue;
            }
            let base = &policy.backoff_base;
            if let Some((tenant, sender)) = pick(prov, now, limits, base, share, &mut self.holds, &mut wake) {
                if token.is_err() {
                    // Woken when the tokens arrive.
                    self.fleet.want(&name, 1);
                    continue;
                }
                let tq = prov.tenants.get_mut(&tenant).expect("picked tenant");
                let job = tq
                    .jobs
                    .get_mut(&sender)
                    .and_then(VecDeque::pop_front)
                    .expect("picked lane has a job");
                tq.len -= 1;
                if let Some(l) = &limits.rate {
                    prov.gcra.charge(now, l, pf, 1);
                    self.fleet.consume(&name, prov.len - 1);
                }
                // Pair state only where a pair limit applies (a sender rate
                // or a slow-down), so idle pairs cost nothing.
                let adapt = prov.pairs.get(&sender).map_or(1.0, |p| p.adapt.factor(now));
                if let Some(l) = pair_limit(limits, &policy.backoff_base, adapt) {
                    let factor = adapt * share;
                    prov.pairs.entry(sender).or_default().gcra.charge(now, l, factor, 1);
                }
                prov.in_flight += 1;
                prov.sent.add(now, 0, 1);
                prov.len -= 1;
                self.len -= 1;
                if prov.len == 0 {
                    self.order.retain(|p| p != &name);
                }
                if let Some(l) = &policy.relay {
                    self.relay.charge(now, l, share, 1);
                }
                return Take::Job(job);
            }
        }
        Take::Wait(wake)
    }

    /// Apply a back-off rule's action to a lane (after a reply for it).
    pub fn back_off(&mut self, now: Nanos, lane: &Lane, rule: &BackoffRule) {
        let until = now.saturating_add(rule.duration.as_nanos() as u64);
        let hold = |reason: String| {
            (
                until,
                Hold {
                    until_ms: until / 1_000_000,
                    reason,
                },
            )
        };
        match rule.action {
            Action::Slow | Action::Suspend => {
                let prov = self.providers.entry(Arc::clone(&lane.provider)).or_default();
                let pair = prov.pairs.entry(Arc::clone(&lane.sender_domain)).or_default();
                let a = &mut pair.adapt;
                if rule.action == Action::Slow {
                    // Slowed again while slowed (or recovering): go lower.
                    let current = a.factor(now);
                    a.factor = (current * rule.factor).max(MIN_FACTOR);
                    a.slow_until = a.slow_until.max(until);
                    a.recover_ns = rule.recover.as_nanos() as u64;
                } else {
                    a.suspended_until = a.suspended_until.max(until);
                }
                a.rule = Some(rule.name.clone());
            }
            Action::SuspendTenant => {
                let h = hold(format!("backoff rule {}", rule.name));
                let e = self
                    .holds
                    .tenant
                    .entry(Arc::clone(&lane.tenant))
                    .or_insert_with(|| h.clone());
                if e.0 < until {
                    *e = h;
                }
            }
            Action::PauseDelivery => {
                if self.pause.as_ref().is_none_or(|(u, _)| *u < until) {
                    self.pause = Some(hold(format!("backoff rule {}", rule.name)));
                }
            }
        }
    }

    /// Hold or release (`until` 0) a tenant's or sender domain's mail (an
    /// operator's suspension).
    pub fn hold_tenant(&mut self, tenant: &str, until: Nanos, reason: &str) {
        set_hold(&mut self.holds.tenant, tenant, until, reason);
    }

    pub fn hold_sender(&mut self, sender_domain: &str, until: Nanos, reason: &str) {
        set_hold(&mut self.holds.sender, sender_domain, until, reason);
    }

    /// The same for a circuit breaker: kept apart from operators' and
    /// back-off holds, so a breaker closing never lifts those.
    pub fn breaker_hold(&mut self, tenant_scope: bool, key: &str, until: Nanos, reason: &str) {
        let map = if tenant_scope {
            &mut self.holds.breaker_tenant
        } else {
            &mut self.holds.breaker_sender
        };
        set_hold(map, key, until, reason);
    }

    /// Hold or release all mail to a provider (an operator's suspension).
    pub fn hold_provider(&mut self, provider: &str, until: Nanos, reason: &str) {
        set_hold(&mut self.provider_holds, provider, until, reason);
    }

    /// Suspend a (provider, sender domain) pair until `until` (0: lift the
    /// suspension and any slow-down).
    pub fn suspend_pair(&mut self, provider: &str, sender_domain: &str, until: Nanos, reason: &str) {
        if until == 0 {
            self.reset_pair(provider, sender_domain);
            return;
        }
        let prov = self.providers.entry(Arc::from(provider)).or_default();
        let pair = prov.pairs.entry(Arc::from(sender_domain)).or_default();
        pair.adapt.suspended_until = until;
        pair.adapt.rule = Some(reason.into());
    }

    /// Pause all delivery until `until` (0: resume now).
    pub fn pause(&mut self, until: Nanos, reason: &str) {
        self.pause = (until > 0).then(|| {
            (
                until,
                Hold {
                    until_ms: until / 1_000_000,
                    reason: reason.into(),
                },
            )
        });
    }

    /// Lift a pair's slow-down and suspension (an operator's resume).
    pub fn reset_pair(&mut self, provider: &str, sender_domain: &str) -> bool {
        self.providers
            .get_mut(provider)
            .and_then(|p| p.pairs.get_mut(sender_domain))
            .map(|pair| pair.adapt = Adapt::default())
            .is_some()
    }

    /// Every waiting job with its provider (for metrics; O(jobs)).
    pub fn jobs(&self) -> impl Iterator<Item = (&str, &J)> {
        self.providers.iter().flat_map(|(name, p)| {
            p.tenants
                .values()
                .flat_map(|t| t.jobs.values().flatten())
                .map(move |j| (&**name, j))
        })
    }

    /// Per-provider state for the admin API and metrics.
    pub fn snapshot(&self, now: Nanos) -> ShaperView {
        let mut providers: Vec<ProviderView> = self
            .providers
            .iter()
            .map(|(name, p)| {
                let limits = self.policy.limits(name);
                let mut pairs: Vec<PairView> = p
                    .pairs
                    .iter()
                    .filter(|(_, pair)| !pair.adapt.idle(now))
                    .map(|(sender, pair)| PairView {
                        sender_domain: sender.to_string(),
                        factor: pair.adapt.factor(now),
                        slowed_until_ms: (pair.adapt.slow_until > now).then_some(pair.adapt.slow_until / 1_000_000),
                        suspended_until_ms: (pair.adapt.suspended_until > now)
                            .then_some(pair.adapt.suspended_until / 1_000_000),
                        rule: pair.adapt.rule.clone(),
                    })
                    .collect();
                pairs.sort_by(|a, b| a.sender_domain.cmp(&b.sender_domain));
                ProviderView {
                    provider: name.to_string(),
                    ready: p.len,
                    in_flight: p.in_flight,
                    sent_last_minute: p.sent.sum(now)[0],
                    rate: limits.rate.map(|l| l.rate.to_string()),
                    max_concurrency: limits.max_concurrency,
                    sender_rate: limits.sender_rate.map(|l| l.rate.to_string()),
                    pairs,
                }
            })
            .filter(|v| v.ready > 0 || v.in_flight > 0 || v.sent_last_minute > 0 || !v.pairs.is_empty())
            .collect();
        providers.sort_by(|a, b| a.provider.cmp(&b.provider));
        let holds = |m: &HashMap<Arc<str>, (Nanos, Hold)>| {
            let mut v: Vec<(String, Hold)> = m
                .iter()
                .filter(|(_, (u, _))| *u > now)
                .map(|(k, (_, h))| (k.to_string(), h.clone()))
                .collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        ShaperView {
            paused: self.pause.as_ref().filter(|(u, _)| *u > now).map(|(_, h)| h.clone()),
            providers,
            tenant_holds: [holds(&self.holds.tenant), holds(&self.holds.breaker_tenant)].concat(),
            sender_holds: [holds(&self.holds.sender), holds(&self.holds.breaker_sender)].concat(),
            provider_holds: holds(&self.provider_holds),
        }
    }

    /// Drop state that carries no information (an idle provider).
    fn gc(&mut self, provider: &str) {
        if let Some(p) = self.providers.get(provider)
            && p.len == 0
            && p.in_flight == 0
            && p.pairs.is_empty()
            && p.gcra.tat == 0
            && p.sent.is_empty()
        {
            self.providers.remove(provider);
        }
    }

    /// Forget pair and provider state that has run out (call now and then).
    pub fn sweep(&mut self, now: Nanos) {
        for p in self.providers.values_mut() {
            p.pairs
                .retain(|_, pair| !(pair.gcra.is_idle(now) && pair.adapt.idle(now)));
        }
        self.providers.retain(|_, p| {
            p.len > 0 || p.in_flight > 0 || !p.pairs.is_empty() || !p.gcra.is_idle(now) || p.sent.sum(now)[0] > 0
        });
        for m in [
            &mut self.holds.tenant,
            &mut self.holds.sender,
            &mut self.holds.breaker_tenant,
            &mut self.holds.breaker_sender,
        ] {
            m.retain(|_, (u, _)| *u > now);
        }
        self.provider_holds.retain(|_, (u, _)| *u > now);
        self.fleet.sweep(now);
    }
}

/// Holds on tenants and sender domains, by who set them.
#[derive(Default)]
struct HoldMaps {
    /// Operators and back-off rules.
    tenant: HashMap<Arc<str>, (Nanos, Hold)>,
    sender: HashMap<Arc<str>, (Nanos, Hold)>,
    /// Circuit breakers.
    breaker_tenant: HashMap<Arc<str>, (Nanos, Hold)>,
    breaker_sender: HashMap<Arc<str>, (Nanos, Hold)>,
}

/// Is `key` held in `map` now? A hold that ended is dropped; one that
/// lasts moves `wake` up to its end.
fn held(map: &mut HashMap<Arc<str>, (Nanos, Hold)>, key: &str, now: Nanos, wake: &mut Option<Nanos>) -> bool {
    match map.get(key) {
        Some((until, _)) if *until > now => {
            *wake = sooner(*wake, *until);
            true
        }
        Some(_) => {
            map.remove(key);
            false
        }
        None => false,
    }
}

fn set_hold(map: &mut HashMap<Arc<str>, (Nanos, Hold)>, key: &str, until: Nanos, reason: &str) {
    if until == 0 {
        map.remove(key);
    } else {
        map.insert(
            Arc::from(key),
            (
                until,
                Hold {
                    until_ms: until / 1_000_000,
                    reason: reason.into(),
                },
            ),
        );
    }
}

/// The limit a (provider, sender domain) pair runs under: its own
/// `sender_rate`, or when slowed by back-off, the provider's rate (or the
/// back-off base rate) times the factor.
fn pair_limit<'a>(limits: &'a ProviderLimits, base: &'a Limit, factor: f64) -> Option<&'a Limit> {
    match &limits.sender_rate {
        Some(l) => Some(l),
        None if factor < 1.0 => Some(limits.rate.as_ref().unwrap_or(base)),
        None => None,
    }
}

/// The next (tenant, sender domain) lane of `prov` whose head may go now,
/// taking turns; updates `wake` with the earliest time a blocked lane frees.
fn pick<J>(
    prov: &mut Prov<J>,
    now: Nanos,
    limits: &ProviderLimits,
    base: &Limit,
    share: f64,
    holds: &mut HoldMaps,
    wake: &mut Option<Nanos>,
) -> Option<(Arc<str>, Arc<str>)> {
    for _ in 0..prov.order.len() {
        let tenant = prov.order.pop_front()?;
        if prov.tenants.get(&tenant).is_none_or(|tq| tq.len == 0) {
            prov.tenants.remove(&tenant); // ran empty: its turn ends here
            continue;
        }
        prov.order.push_back(Arc::clone(&tenant));
        if held(&mut holds.tenant, &tenant, now, wake) | held(&mut holds.breaker_tenant, &tenant, now, wake) {
            continue;
        }
        let tq = prov.tenants.get_mut(&tenant).expect("ordered tenant exists");
        for _ in 0..tq.order.len() {
            let sender = tq.order.pop_front()?;
            if tq.jobs.get(&sender).is_none_or(VecDeque::is_empty) {
                tq.jobs.remove(&sender);
                continue;
            }
            tq.order.push_back(Arc::clone(&sender));
            if held(&mut holds.sender, &sender, now, wake) | held(&mut holds.breaker_sender, &sender, now, wake) {
                continue;
            }
            if let Some(pair) = prov.pairs.get(&sender) {
                if pair.adapt.suspended_until > now {
                    *wake = sooner(*wake, pair.adapt.suspended_until);
                    continue;
                }
                let adapt = pair.adapt.factor(now);
                if let Some(l) = pair_limit(limits, base, adapt)
                    && let Err(d) = pair.gcra.check(now, &l.burst_at_share(share), adapt * share, 1)
                {
                    if let Some(t) = denied_until(now, d) {
                        *wake = sooner(*wake, t);
                    }
                    continue;
                }
            }
            return Some((tenant, sender));
        }
    }
    None
}

/// The shaper as the admin API shows it.
#[derive(Debug, Serialize)]
pub struct ShaperView {
    pub paused: Option<Hold>,
    pub providers: Vec<ProviderView>,
    pub tenant_holds: Vec<(String, Hold)>,
    pub sender_holds: Vec<(String, Hold)>,
    pub provider_holds: Vec<(String, Hold)>,
}

#[derive(Debug, Serialize)]
pub struct ProviderView {
    pub provider: String,
    /// Jobs ready to go (rate or concurrency permitting).
    pub ready: usize,
    pub in_flight: u32,
    /// Jobs handed to the relay over the last minute (10 s steps).
    pub sent_last_minute: u64,
    pub rate: Option<String>,
    pub max_concurrency: Option<u32>,
    pub sender_rate: Option<String>,
    /// Sender domains slowed or suspended at this provider.
    pub pairs: Vec<PairView>,
}

#[derive(Debug, Serialize)]
pub struct PairView {
    pub sender_domain: String,
    pub factor: f64,
    pub slowed_until_ms: Option<u64>,
    pub suspended_until_ms: Option<u64>,
    pub rule: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigError;
    use crate::rate::policy::ShapingConfig;
    use crate::throttle::{NS_PER_MS, NS_PER_SEC};
    use std::collections::HashSet;
    use std::time::Duration;

    const T0: Nanos = 1_800_000_000 * NS_PER_SEC;

    fn policy(text: &str) -> Arc<ShapingPolicy> {
        let c: ShapingConfig = toml::from_str(text).unwrap();
        let known: HashSet<String> = ["google", "yahoo"].into_iter().map(String::from).collect();
        let p: Result<ShapingPolicy, ConfigError> = c.compile(&known, None);
        Arc::new(p.unwrap())
    }

    fn lane(p: &str, t: &str, s: &str) -> Lane {
        Lane {
            provider: p.into(),
            tenant: t.into(),
            sender_domain: s.into(),
        }
    }

    fn rule(action: Action, factor: f64, secs: u64, recover: u64) -> BackoffRule {
        BackoffRule {
            name: "test".into(),
            provider: None,
            category: None,
            pattern: None,
            action,
            factor,
            duration: Duration::from_secs(secs),
            recover: Duration::from_secs(recover),
        }
    }

    /// Take whatever may go at `now` (releasing each at once).
    fn drain(s: &mut Shaper<&'static str>, now: Nanos) -> Vec<&'static str> {
        let mut out = Vec::new();
        while let Take::Job(j) = s.take(now) {
            out.push(j);
            s.release(if j.starts_with('y') { "yahoo" } else { "google" });
        }
        out
    }

    #[test]
    fn empty_and_unlimited() {
        let mut s: Shaper<&str> = Shaper::new(policy(""));
        assert_eq!(s.take(T0), Take::Wait(None));
        for j in ["g1", "g2", "g3"] {
            s.push(&lane("google", "a", "a.example"), j);
        }
        assert_eq!(s.len(), 3);
        assert_eq!(drain(&mut s, T0), ["g1", "g2", "g3"], "no limits: FIFO, all at once");
        assert!(s.is_empty());
    }

    #[test]
    fn provider_rate_spaces_jobs_and_says_when() {
        let mut s = Shaper::new(policy("[[provider]]\nname = \"google\"\nrate = \"10/s\"\n"));
        for j in ["g1", "g2", "g3"] {
            s.push(&lane("google", "a", "a.example"), j);
        }
        s.push(&lane("yahoo", "a", "a.example"), "y1");
        assert_eq!(drain(&mut s, T0), ["g1", "y1"], "yahoo is not limited by google's rate");
        assert_eq!(s.take(T0 + 50 * NS_PER_MS), Take::Wait(Some(T0 + 100 * NS_PER_MS)));
        assert_eq!(drain(&mut s, T0 + 100 * NS_PER_MS), ["g2"]);
        assert_eq!(drain(&mut s, T0 + 200 * NS_PER_MS), ["g3"]);
        assert_eq!(s.take(T0 + 200 * NS_PER_MS), Take::Wait(None));
        // The observed rate: three to google, one to yahoo, in the last minute.
        let v = s.snapshot(T0 + 30 * NS_PER_SEC);
        let sent: Vec<(&str, u64)> = v
            .providers
            .iter()
            .map(|p| (p.provider.as_str(), p.sent_last_minute))
            .collect();
        assert_eq!(sent, [("google", 3), ("yahoo", 1)]);
        assert!(
            s.snapshot(T0 + 120 * NS_PER_SEC).providers.is_empty(),
            "a minute later: nothing to show"
        );
    }

    #[test]
    fn concurrency_cap_waits_for_a_release() {
        let mut s = Shaper::new(policy("[[provider]]\nname = \"google\"\nmax_concurrency = 2\n"));
        for j in ["g1", "g2", "g3"] {
            s.push(&lane("google", "a", "a.example"), j);
        }
        assert_eq!(s.take(T0), Take::Job("g1"));
        assert_eq!(s.take(T0), Take::Job("g2"));
        assert_eq!(
            s.take(T0),
            Take::Wait(None),
            "two in flight: wait for a release, no timer"
        );
        s.release("google");
        assert_eq!(s.take(T0), Take::Job("g3"));
    }

    #[test]
    fn tenants_take_turns_at_a_provider() {
        let mut s = Shaper::new(policy("[[provider]]\nname = \"google\"\nrate = \"1/s\"\n"));
        let bulk: Vec<&'static str> = (0..1000).map(|i| &*format!("a{i}").leak()).collect();
        for j in &bulk {
            s.push(&lane("google", "bulk", "bulk.example"), *j);
        }
        s.push(&lane("google", "small", "small.example"), "b0");
        s.push(&lane("google", "small", "small.example"), "b1");
        let mut got = Vec::new();
        for i in 0..6 {
            got.extend(drain(&mut s, T0 + i * NS_PER_SEC));
        }
        assert_eq!(got, ["a0", "b0", "a1", "b1", "a2", "a3"]);
        // Sender domains of one tenant take turns too.
        let mut s: Shaper<&str> = Shaper::new(policy(""));
        for j in ["x1", "x2", "x3"] {
            s.push(&lane("google", "t", "x.example"), j);
        }
        s.push(&lane("google", "t", "z.example"), "z1");
        assert_eq!(drain(&mut s, T0), ["x1", "z1", "x2", "x3"]);
    }

    #[test]
    fn an_emptied_lane_refills_without_a_second_turn() {
        let mut s: Shaper<&str> = Shaper::new(policy(""));
        let a = lane("google", "a", "a.example");
        let b = lane("google", "b", "b.example");
        s.push(&a, "a1");
        assert_eq!(drain(&mut s, T0), ["a1"]);
        // a's queue ran empty but keeps its place until its turn; refilled,
        // it must still get one turn per round.
        s.push(&a, "a2");
        s.push(&b, "b1");
        s.push(&a, "a3");
        s.push(&lane("google", "a", "z.example"), "z1");
        assert_eq!(drain(&mut s, T0), ["a2", "b1", "z1", "a3"]);
        assert!(s.is_empty());
        // Many one-message tenants drain in order.
        for i in 0..1000 {
            s.push(&lane("google", &format!("t{i}"), "x.example"), "m");
        }
        assert_eq!(drain(&mut s, T0).len(), 1000);
        assert_eq!(s.take(T0), Take::Wait(None));
    }

    #[test]
    fn sender_rate_limits_a_pair_not_the_provider() {
        let mut s = Shaper::new(policy("[[provider]]\nname = \"google\"\nsender_rate = \"1/s\"\n"));
        for j in ["x1", "x2"] {
            s.push(&lane("google", "t", "x.example"), j);
        }
        for j in ["z1", "z2"] {
            s.push(&lane("google", "u", "z.example"), j);
        }
        assert_eq!(drain(&mut s, T0), ["x1", "z1"]);
        assert_eq!(s.take(T0), Take::Wait(Some(T0 + NS_PER_SEC)));
        assert_eq!(drain(&mut s, T0 + NS_PER_SEC), ["x2", "z2"]);
    }

    /// Redis away: each of 4 nodes runs a quarter of every limit, its burst
    /// included (a factor on the rate alone left each node the whole burst,
    /// the fleet four times it).
    #[test]
    fn a_fair_share_cuts_the_burst_too() {
        use crate::rate::fleet::Mode;
        let jobs: [&'static str; 10] = ["j0", "j1", "j2", "j3", "j4", "j5", "j6", "j7", "j8", "j9"];
        let mut s = Shaper::new(policy("[[provider]]\nname = \"google\"\nrate = \"10/s\"\nburst = 8\n"));
        s.fleet.set_mode(Mode::FairShare { nodes: 4 });
        for j in jobs {
            s.push(&lane("google", "t", "x.example"), j);
        }
        assert_eq!(drain(&mut s, T0), ["j0", "j1"], "8 / 4 at once");
        // Then the shared rate: 10/s / 4 = one per 400 ms.
        assert_eq!(s.take(T0), Take::Wait(Some(T0 + 400 * NS_PER_MS)));

        let mut s = Shaper::new(policy("relay_rate = \"4/s\"\nrelay_burst = 4\n"));
        s.fleet.set_mode(Mode::FairShare { nodes: 2 });
        for j in jobs {
            s.push(&lane("yahoo", "t", "x.example"), j);
        }
        assert_eq!(drain(&mut s, T0), ["j0", "j1"]);

        let mut s = Shaper::new(policy(
            "[[provider]]\nname = \"google\"\nsender_rate = \"6/s\"\nsender_burst = 6\n",
        ));
        s.fleet.set_mode(Mode::FairShare { nodes: 3 });
        for j in jobs {
            s.push(&lane("google", "t", "x.example"), j);
        }
        assert_eq!(drain(&mut s, T0), ["j0", "j1"]);
        // Alone, the whole burst.
        s.fleet.set_mode(Mode::Local);
        assert_eq!(drain(&mut s, T0 + 10 * NS_PER_SEC).len(), 6);
    }

    #[test]
    fn relay_cap_covers_every_provider() {
        let mut s = Shaper::new(policy("relay_rate = \"2/s\"\nrelay_burst = 2\n"));
        for j in ["g1", "g2"] {
            s.push(&lane("google", "t", "x.example"), j);
        }
        for j in ["y1", "y2"] {
            s.push(&lane("yahoo", "t", "x.example"), j);
        }
        assert_eq!(
            drain(&mut s, T0),
            ["g1", "y1"],
            "providers take turns under the relay cap"
        );
        assert_eq!(s.take(T0), Take::Wait(Some(T0 + 500 * NS_PER_MS)));
        assert_eq!(drain(&mut s, T0 + 500 * NS_PER_MS), ["g2"]);
    }

    #[test]
    fn slow_down_then_gradual_recovery() {
        // google at 10/s; back-off halves x.example's share for 60 s, then
        // it climbs back over 60 s. z.example is not slowed.
        let mut s = Shaper::new(policy("[[provider]]\nname = \"google\"\nrate = \"10/s\"\nburst = 10\n"));
        let x = lane("google", "t", "x.example");
        s.back_off(T0, &x, &rule(Action::Slow, 0.5, 60, 60));
        let count = |s: &mut Shaper<&'static str>, l: &Lane, from: Nanos, secs: u64| {
            for _ in 0..(secs * 20) {
                s.push(l, "j");
            }
            let mut n = 0;
            let mut now = from;
            while now < from + secs * NS_PER_SEC {
                match s.take(now) {
                    Take::Job(_) => {
                        n += 1;
                        s.release(&l.provider);
                    }
                    Take::Wait(Some(t)) => now = t,
                    Take::Wait(None) => panic!("jobs left but no wake-up time"),
                }
            }
            // Let the rest go, at the pace the limits allow.
            loop {
                match s.take(now) {
                    Take::Job(_) => s.release(&l.provider),
                    Take::Wait(Some(t)) => now = t,
                    Take::Wait(None) => break,
                }
            }
            assert!(s.is_empty());
            n
        };
        // Slowed: 5/s over 10 s (the pair's limit, burst 10, starts full).
        let slowed = count(&mut s, &x, T0, 10);
        assert!((50..=60).contains(&slowed), "slowed: {slowed}");
        let view = s.snapshot(T0 + NS_PER_SEC);
        assert_eq!(view.providers[0].pairs[0].sender_domain, "x.example");
        assert_eq!(view.providers[0].pairs[0].factor, 0.5);
        // Recovering, half way: 0.75 of the rate.
        let mut s2 = Shaper::new(policy("[[provider]]\nname = \"google\"\nrate = \"10/s\"\nburst = 10\n"));
        s2.back_off(T0, &x, &rule(Action::Slow, 0.5, 60, 60));
        assert_eq!(s2.snapshot(T0 + 90 * NS_PER_SEC).providers[0].pairs[0].factor, 0.75);
        // Recovered: the full rate, and the pair state is forgotten.
        let full = count(&mut s2, &x, T0 + 120 * NS_PER_SEC, 10);
        assert!((100..=110).contains(&full), "recovered: {full}");
        s2.sweep(T0 + 200 * NS_PER_SEC);
        assert!(s2.snapshot(T0 + 200 * NS_PER_SEC).providers.is_empty());
        // Another sender at the same provider was never slowed.
        let mut s3 = Shaper::new(policy("[[provider]]\nname = \"google\"\nrate = \"10/s\"\nburst = 10\n"));
        s3.back_off(T0, &x, &rule(Action::Slow, 0.5, 60, 60));
        let z = lane("google", "t", "z.example");
        let other = count(&mut s3, &z, T0, 10);
        assert!((100..=110).contains(&other), "unslowed pair: {other}");
    }

    #[test]
    fn slow_down_without_any_rate_uses_the_base_rate_and_compounds() {
        let mut s = Shaper::new(policy("backoff_base_rate = \"4/s\"\n"));
        let x = lane("google", "t", "x.example");
        s.back_off(T0, &x, &rule(Action::Slow, 0.5, 60, 60));
        for j in ["x1", "x2"] {
            s.push(&x, j);
        }
        assert_eq!(drain(&mut s, T0), ["x1"]);
        assert_eq!(s.take(T0), Take::Wait(Some(T0 + 500 * NS_PER_MS)), "4/s halved");
        // Slowed again: a quarter, and never below 1/64.
        s.back_off(T0, &x, &rule(Action::Slow, 0.5, 60, 60));
        assert_eq!(s.snapshot(T0).providers[0].pairs[0].factor, 0.25);
        for _ in 0..10 {
            s.back_off(T0, &x, &rule(Action::Slow, 0.5, 60, 60));
        }
        assert_eq!(s.snapshot(T0).providers[0].pairs[0].factor, MIN_FACTOR);
    }

    #[test]
    fn suspensions_and_pause_hold_mail_until_they_end() {
        let mut s: Shaper<&str> = Shaper::new(policy(""));
        let x = lane("google", "t", "x.example");
        let z = lane("google", "u", "z.example");
        s.back_off(T0, &x, &rule(Action::Suspend, 1.0, 60, 60));
        s.push(&x, "x1");
        s.push(&z, "z1");
        assert_eq!(drain(&mut s, T0), ["z1"]);
        assert_eq!(s.take(T0), Take::Wait(Some(T0 + 60 * NS_PER_SEC)));
        assert_eq!(drain(&mut s, T0 + 60 * NS_PER_SEC), ["x1"]);
        // A tenant suspension holds that tenant at every provider.
        s.back_off(T0 + 60 * NS_PER_SEC, &z, &rule(Action::SuspendTenant, 1.0, 30, 30));
        s.push(&z, "z2");
        s.push(&lane("yahoo", "u", "z.example"), "y-z");
        s.push(&x, "x2");
        assert_eq!(drain(&mut s, T0 + 61 * NS_PER_SEC), ["x2"]);
        assert_eq!(s.snapshot(T0).tenant_holds[0].0, "u");
        assert_eq!(drain(&mut s, T0 + 90 * NS_PER_SEC).len(), 2);
        // Pause: nothing at all, then everything.
        let t1 = T0 + 100 * NS_PER_SEC;
        s.back_off(t1, &x, &rule(Action::PauseDelivery, 1.0, 900, 900));
        s.push(&x, "x3");
        assert_eq!(s.take(t1 + NS_PER_SEC), Take::Wait(Some(t1 + 900 * NS_PER_SEC)));
        assert!(s.snapshot(t1).paused.is_some());
        s.pause(0, "operator resume");
        assert_eq!(drain(&mut s, t1 + NS_PER_SEC), ["x3"]);
        // Operators hold a provider.
        s.hold_provider("google", t1 + 5 * NS_PER_SEC, "operator");
        s.push(&x, "x3b");
        s.push(&lane("yahoo", "t", "x.example"), "y3");
        assert_eq!(drain(&mut s, t1), ["y3"]);
        assert_eq!(s.snapshot(t1).provider_holds[0].0, "google");
        s.hold_provider("google", 0, "");
        assert_eq!(drain(&mut s, t1), ["x3b"]);
        // An operator suspends a pair, then lifts it.
        s.suspend_pair("google", "x.example", t1 + 5 * NS_PER_SEC, "operator");
        s.push(&x, "x3c");
        assert_eq!(s.take(t1), Take::Wait(Some(t1 + 5 * NS_PER_SEC)));
        s.suspend_pair("google", "x.example", 0, "");
        assert_eq!(drain(&mut s, t1), ["x3c"]);
        // A breaker's hold and an operator's are apart: the breaker
        // closing does not lift the operator's suspension.
        s.hold_tenant("t", t1 + 100 * NS_PER_SEC, "operator");
        s.breaker_hold(true, "t", t1 + 10 * NS_PER_SEC, "breaker_open");
        s.breaker_hold(true, "t", 0, "");
        s.push(&x, "held");
        assert_eq!(s.take(t1), Take::Wait(Some(t1 + 100 * NS_PER_SEC)));
        assert_eq!(s.snapshot(t1).tenant_holds.len(), 1);
        s.hold_tenant("t", 0, "");
        assert_eq!(drain(&mut s, t1), ["held"]);
        // Breakers and operators hold a sender domain.
        s.hold_sender("x.example", t1 + 10 * NS_PER_SEC, "breaker_open");
        s.push(&x, "x4");
        assert_eq!(s.take(t1), Take::Wait(Some(t1 + 10 * NS_PER_SEC)));
        s.hold_sender("x.example", 0, "");
        assert_eq!(drain(&mut s, t1), ["x4"]);
    }

    #[test]
    fn a_reload_keeps_jobs_and_changes_rates() {
        let mut s = Shaper::new(policy("[[provider]]\nname = \"google\"\nrate = \"1/min\"\n"));
        for j in ["g1", "g2"] {
            s.push(&lane("google", "t", "x.example"), j);
        }
        assert_eq!(drain(&mut s, T0), ["g1"]);
        assert_eq!(s.take(T0), Take::Wait(Some(T0 + 60 * NS_PER_SEC)));
        s.set_policy(policy("[[provider]]\nname = \"google\"\nrate = \"10/s\"\n"), T0);
        assert_eq!(drain(&mut s, T0 + 100 * NS_PER_MS), ["g2"]);
    }

    /// At a fair share, a reload forgives debt only down to what the new
    /// rate's share would owe (not the whole rate's: that let a node send
    /// early right after a reload).
    #[test]
    fn a_reload_at_a_fair_share_keeps_the_share() {
        use crate::rate::fleet::Mode;
        let mut s = Shaper::new(policy("[[provider]]\nname = \"google\"\nrate = \"1/min\"\n"));
        s.fleet.set_mode(Mode::FairShare { nodes: 4 });
        for j in ["g1", "g2", "g3"] {
            s.push(&lane("google", "t", "x.example"), j);
        }
        assert_eq!(drain(&mut s, T0), ["g1"]);
        // 4/s for the fleet: one per second for each of 4 nodes.
        s.set_policy(policy("[[provider]]\nname = \"google\"\nrate = \"4/s\"\n"), T0);
        assert!(drain(&mut s, T0 + 500 * NS_PER_MS).is_empty());
        assert_eq!(drain(&mut s, T0 + NS_PER_SEC), ["g2"]);
    }

    #[test]
    fn waiting_never_asks_for_now() {
        // Whatever blocks, a wait is for a later time or a release, so the
        // caller never spins.
        let mut s = Shaper::new(policy(
            "relay_rate = \"100/s\"\n[[provider]]\nname = \"google\"\nrate = \"3/s\"\nsender_rate = \"2/s\"\nmax_concurrency = 5\n[[provider]]\nname = \"yahoo\"\nrate = \"5/s\"\n",
        ));
        for i in 0..50u64 {
            let p = if i % 3 == 0 { "yahoo" } else { "google" };
            s.push(&lane(p, &format!("t{}", i % 4), &format!("s{}.example", i % 5)), "j");
        }
        let mut now = T0;
        let mut taken = 0;
        let mut steps = 0;
        while taken < 50 {
            steps += 1;
            assert!(steps < 1000, "too many wake-ups");
            match s.take(now) {
                Take::Job(_) => {
                    taken += 1;
                    s.release("google");
                    s.release("yahoo");
                }
                Take::Wait(Some(t)) => {
                    assert!(t > now, "asked to wait until {t} at {now}");
                    now = t;
                }
                Take::Wait(None) => panic!("jobs waiting with nothing in flight"),
            }
        }
    }
}
