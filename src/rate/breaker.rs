//! Circuit breakers per sender domain and per tenant: stop a sender before
//! mailbox providers stop it. Their guidance is a hard-bounce rate under 2%
//! and a complaint rate under 0.1%; a breaker watches each sender domain and
//! each tenant over a rolling window and opens when one of them is crossed
//! (after a minimum sample), or at once on a burst of `reputation_blocked` /
//! `auth_failed` replies. While it is open, submission is refused with a
//! temporary `451 4.7.1` (RFC 3463 §3.8) carrying the figures, and the caller
//! holds the queued mail of that tenant or sender domain.
//!
//! States: `Closed` → `Open { until }` → (cool-down over) `HalfOpen` →
//! `Closed` after `min_sends` clean sends or one full window without a trip;
//! a trip in half-open opens it again with the cool-down doubled (at most
//! [`MAX_COOL_DOWN`]). The doubling is forgotten after a full window in
//! `Closed`, and by an operator's [`Breakers::reset`].
//!
//! Counting ([`Signal`]): a *send* is a recipient whose delivery reached a
//! final answer (delivered or bounced); a hard bounce (a bounce the
//! classifier would suppress: user_unknown, mailbox_disabled,
//! domain_not_found) counts as one send and one hard bounce; a complaint
//! counts alone (it concerns mail sent earlier); a reputation_blocked or
//! auth_failed reply, deferred or bounced, counts towards the burst. Every
//! signal counts for both the sender domain's and the tenant's breaker.
//! Rates are hard bounces / sends and complaints / sends over the window,
//! decided only when the window holds at least `min_sends` sends, and a
//! breaker opens when a rate is strictly over its limit.
//!
//! Windows are [`Rolling`] counters of 12 slots (the burst window 10): the
//! window slides one slot at a time, so what it covers is between 11/12 of
//! the window and the window.
//!
//! Time-driven transitions (open → half-open, half-open → closed by time)
//! happen in [`Breakers::tick`] (run it about once a second) and, for the
//! breakers a signal touches, in [`Breakers::record`]; both return the
//! [`Transition`]s so the caller can hold or release mail and emit events.
//! [`Breakers::check`] only reads: an open breaker whose cool-down is over
//! already passes there, before the tick reports it.
//!
//! Memory: one entry (under 1 KiB: two rolling counters of at most 13 and 11
//! slots) per tenant and sender domain with a signal in the last window;
//! `tick` drops closed entries whose windows are empty. At most
//! [`MAX_BREAKERS`] entries are held; signals for new keys beyond that are
//! not tracked (counted in [`Breakers::untracked`]), so a flood of sender
//! domains cannot grow memory.
//!
//! Reason figures: `bounce rate 3.4% > 2.0% over 812 sends in the last 1h`
//! (one decimal), `complaint rate 0.15% > 0.10% over 2000 sends in the last
//! 1h` (two decimals), with more decimals (up to four) only when the rounded
//! rate would read the same as the limit; `12 reputation_blocked/auth_failed
//! replies in 10m`. Durations are humantime's (`1h`, `10m`, `1h 30m`).
//!
//! Trust boundary: pure decisions over an injected clock (no I/O). Keys come
//! from config (tenants) and MAIL FROM (sender domains, client input): they
//! are only map keys here, compared in lowercase for sender domains, and
//! quoted, shortened and stripped of non-ASCII and control characters before
//! they appear in a reply. Operator reasons ([`Breakers::trip`]) are treated
//! the same way.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{clean_text, format_time, quote_key};
use crate::classify::{Category, Outcome};
use crate::config::ConfigError;
use crate::smtp::reply::{Enhanced, Reply};
use crate::throttle::{NS_PER_MS, Nanos, Rolling};

/// Reason token of a refusal by an open breaker (`docs/reasons.md`).
pub const TOKEN_BREAKER: &str = "breaker_open";

/// The longest cool-down doubling reaches.
pub const MAX_COOL_DOWN: Duration = Duration::from_secs(24 * 3600);

/// The longest `window` accepted.
pub const MAX_WINDOW: Duration = Duration::from_secs(7 * 86_400);

/// Most breakers held at once (tenants and sender domains together).
pub const MAX_BREAKERS: usize = 50_000;

/// Slots of the rate window and of the burst window.
const SLOTS: usize = 12;
const BURST_SLOTS: usize = 10;

/// Longest reason shown in a reply, in characters.
const MAX_REASON_SHOWN: usize = 200;

// Counter indices of the rate window.
const SENDS: usize = 0;
const HARD: usize = 1;
const COMPLAINTS: usize = 2;
const REPUTATION: usize = 3;

fn err(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        message: message.into(),
    }
}

/// `[breakers]` as written.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakersConfig {
    pub enabled: bool,
    /// The rolling window the rates are computed over.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// No rate decision on fewer sends in the window.
    pub min_sends: u64,
    /// Hard bounces / sends above which the breaker opens, in (0, 1).
    pub bounce_rate: f64,
    /// Complaints / sends above which the breaker opens, in (0, 1).
    pub complaint_rate: f64,
    /// This many reputation_blocked / auth_failed replies within
    /// `burst_window` open the breaker regardless of `min_sends`.
    pub burst_count: u64,
    #[serde(with = "humantime_serde")]
    pub burst_window: Duration,
    /// How long a breaker stays open before it lets mail through again
    /// (half-open).
    #[serde(with = "humantime_serde")]
    pub cool_down: Duration,
}

impl Default for BreakersConfig {
    fn default() -> Self {
        BreakersConfig {
            enabled: true,
            window: Duration::from_secs(3600),
            min_sends: 100,
            bounce_rate: 0.02,
            complaint_rate: 0.001,
            burst_count: 10,
            burst_window: Duration::from_secs(600),
            cool_down: Duration::from_secs(1800),
        }
    }
}

/// The validated `[breakers]` section the breakers run on. Replaced whole on
/// reload ([`Breakers::set_policy`]).
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerPolicy {
    pub enabled: bool,
    pub window: Duration,
    pub min_sends: u64,
    pub bounce_rate: f64,
    pub complaint_rate: f64,
    pub burst_count: u64,
    pub burst_window: Duration,
    pub cool_down: Duration,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakersConfig::default().compile().expect("the defaults are valid")
    }
}

impl BreakersConfig {
    /// Validate; every error names its key (`breakers.window`, …).
    pub fn compile(&self) -> Result<BreakerPolicy, ConfigError> {
        let duration = |key: &str, d: Duration, max: Duration| {
            if d.is_zero() {
                Err(err(format!("breakers.{key}"), "must be longer than zero"))
            } else if d > max {
                Err(err(
                    format!("breakers.{key}"),
                    format!("must be at most {}", humantime::format_duration(max)),
                ))
            } else {
                Ok(())
            }
        };
        duration("window", self.window, MAX_WINDOW)?;
        duration("burst_window", self.burst_window, MAX_WINDOW)?;
        duration("cool_down", self.cool_down, MAX_COOL_DOWN)?;
        if self.burst_window > self.window {
            return Err(err(
                "breakers.burst_window",
                format!(
                    "must not be longer than breakers.window ({})",
                    humantime::format_duration(self.window)
                ),
            ));
        }
        for (key, r) in [
            ("bounce_rate", self.bounce_rate),
            ("complaint_rate", self.complaint_rate),
        ] {
            if !(r > 0.0 && r < 1.0) {
                return Err(err(
                    format!("breakers.{key}"),
                    format!("{r} is not between 0 and 1 (a fraction: 0.02 is 2%)"),
                ));
            }
        }
        for (key, n) in [("min_sends", self.min_sends), ("burst_count", self.burst_count)] {
            if n == 0 {
                return Err(err(format!("breakers.{key}"), "must be at least 1"));
            }
        }
        Ok(BreakerPolicy {
            enabled: self.enabled,
            window: self.window,
            min_sends: self.min_sends,
            bounce_rate: self.bounce_rate,
            complaint_rate: self.complaint_rate,
            burst_count: self.burst_count,
            burst_window: self.burst_window,
            cool_down: self.cool_down,
        })
    }
}

/// What a breaker watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerScope {
    SenderDomain,
    Tenant,
}

impl BreakerScope {
    pub const ALL: [BreakerScope; 2] = [BreakerScope::SenderDomain, BreakerScope::Tenant];

    pub fn as_str(self) -> &'static str {
        match self {
            BreakerScope::SenderDomain => "sender_domain",
            BreakerScope::Tenant => "tenant",
        }
    }

    /// `"tenant"` or `"sender_domain"` (as in the admin API's paths).
    pub fn parse(s: &str) -> Option<BreakerScope> {
        BreakerScope::ALL.into_iter().find(|b| b.as_str() == s)
    }

    fn words(self) -> &'static str {
        match self {
            BreakerScope::SenderDomain => "sender domain",
            BreakerScope::Tenant => "tenant",
        }
    }

    fn index(self) -> usize {
        match self {
            BreakerScope::SenderDomain => 0,
            BreakerScope::Tenant => 1,
        }
    }

    /// The map key: sender domains in lowercase.
    fn key(self, key: &str) -> String {
        match self {
            BreakerScope::SenderDomain => key.to_ascii_lowercase(),
            BreakerScope::Tenant => key.to_owned(),
        }
    }
}

/// One observation about mail of a tenant and sender domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// A recipient's delivery reached a final answer (delivered, or bounced
    /// for a reason that is not a hard bounce).
    Sent,
    /// A hard bounce (a category that suppresses); counts as one send too.
    HardBounce,
    /// A complaint (feedback loop, ARF); not a send.
    Complaint,
    /// A reputation_blocked or auth_failed reply, deferred or bounced; not a
    /// send (a bounced one comes with [`Signal::Sent`]).
    Reputation,
}

/// The signals of one recipient's delivery outcome, so the dispatcher makes
/// one call per recipient ([`Breakers::record_all`]):
///
/// | outcome | category | signals |
/// |---|---|---|
/// | delivered | any | `Sent` |
/// | bounced, the recipient's own reply | user_unknown, mailbox_disabled, domain_not_found | `HardBounce` |
/// | bounced | reputation_blocked, auth_failed | `Sent`, `Reputation` |
/// | bounced | other | `Sent` |
/// | deferred | reputation_blocked, auth_failed | `Reputation` |
/// | deferred | other | none |
///
/// `about_recipient`: the reply was the recipient's own (its RCPT reply,
/// or the end of data of a one-recipient transaction). A MAIL or
/// end-of-data refusal shared by several recipients that reads like an
/// unknown user is one message refused, not hard bounces.
pub fn signals_for(outcome: Outcome, category: Option<Category>, about_recipient: bool) -> &'static [Signal] {
    let reputation = matches!(category, Some(Category::ReputationBlocked | Category::AuthFailed));
    match outcome {
        Outcome::Delivered => &[Signal::Sent],
        Outcome::Bounced if about_recipient && category.is_some_and(Category::suppresses) => &[Signal::HardBounce],
        Outcome::Bounced if reputation => &[Signal::Sent, Signal::Reputation],
        Outcome::Bounced => &[Signal::Sent],
        Outcome::Deferred if reputation => &[Signal::Reputation],
        Outcome::Deferred => &[],
    }
}

/// A breaker's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    /// Submission refused and queued mail held until `until`.
    Open {
        since: Nanos,
        until: Nanos,
        reason: String,
    },
    /// Mail flows again on probation, with counters cleared at `since`.
    HalfOpen {
        since: Nanos,
    },
}

impl BreakerState {
    pub fn as_str(&self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open { .. } => "open",
            BreakerState::HalfOpen { .. } => "half_open",
        }
    }
}

/// A state change, for the caller to hold (`open`: until `until`) or
/// release (`half_open`, `closed`) the key's queued mail and to emit an
/// event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Transition {
    pub scope: BreakerScope,
    pub key: String,
    /// `"open"`, `"half_open"` or `"closed"`.
    pub state: &'static str,
    /// For `open`: when it becomes half-open.
    pub until: Option<Nanos>,
    pub reason: String,
}

/// A refusal by an open breaker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    pub scope: BreakerScope,
    /// The tenant or (lowercase) sender domain.
    pub key: String,
    pub reason: String,
    pub until: Nanos,
}

impl Open {
    /// `451 4.7.1 Circuit breaker open for sender domain "x.example": bounce
    /// rate 3.4% > 2.0% over 812 sends in the last 1h; held until
    /// 2026-11-23T03:30:00Z (sendguard:breaker_open)`: one line under 500
    /// bytes.
    pub fn reply(&self) -> Reply {
        let text = format!(
            "Circuit breaker open for {} {}: {}; held until {}",
            self.scope.words(),
            quote_key(&self.key),
            clean_text(&self.reason, MAX_REASON_SHOWN),
            format_time(self.until),
        );
        Reply::new(451, Enhanced(4, 7, 1), text).with_token(TOKEN_BREAKER)
    }

    /// Time left until the breaker lets mail through again.
    pub fn retry_after(&self, now: Nanos) -> Duration {
        Duration::from_nanos(self.until.saturating_sub(now))
    }
}

/// One breaker as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BreakerView {
    pub scope: BreakerScope,
    pub key: String,
    /// `"open"`, `"half_open"` or `"closed"`.
    pub state: &'static str,
    pub reason: Option<String>,
    pub opened_at_ms: Option<u64>,
    pub until_ms: Option<u64>,
    pub half_open_since_ms: Option<u64>,
    /// The cool-down the next opening gets (doubled after a trip in half-open).
    pub cool_down_secs: u64,
    /// Figures of the current window.
    pub sends: u64,
    pub hard_bounces: u64,
    pub complaints: u64,
    pub reputation: u64,
    /// reputation_blocked / auth_failed replies in the burst window.
    pub burst: u64,
    /// Fractions (0.034 is 3.4%); 0 without sends.
    pub bounce_rate: f64,
    pub complaint_rate: f64,
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// `rate` and `limit` as percentages with `decimals` decimals, more (up to
/// four) while they would read the same.
fn percentages(rate: f64, limit: f64, decimals: usize) -> (String, String) {
    let mut d = decimals;
    loop {
        let a = format!("{:.*}", d, rate * 100.0);
        let b = format!("{:.*}", d, limit * 100.0);
        if a != b || d >= 4 {
            return (a, b);
        }
        d += 1;
    }
}

struct Entry {
    /// The windows `counts` and `burst` were built with.
    window: Duration,
    burst_window: Duration,
    /// Sends, hard bounces, complaints, reputation replies.
    counts: Rolling<4>,
    /// Reputation replies over the burst window.
    burst: Rolling<1>,
    state: BreakerState,
    /// How often the cool-down is doubled (trips in half-open).
    level: u32,
    /// When the breaker last closed (or was first seen).
    closed_at: Nanos,
}

impl Entry {
    fn new(now: Nanos, p: &BreakerPolicy) -> Entry {
        Entry {
            window: p.window,
            burst_window: p.burst_window,
            counts: Rolling::new(p.window, SLOTS),
            burst: Rolling::new(p.burst_window, BURST_SLOTS),
            state: BreakerState::Closed,
            level: 0,
            closed_at: now,
        }
    }

    /// After a reload changed a window: the counts so far move into the
    /// current slot of a window of the new length (they stay counted, and
    /// expire at most one window late).
    fn sync(&mut self, now: Nanos, p: &BreakerPolicy) {
        if self.window != p.window {
            let sums = self.counts.sum(now);
            self.counts = Rolling::new(p.window, SLOTS);
            for (i, n) in sums.into_iter().enumerate().filter(|(_, n)| *n > 0) {
                self.counts.add(now, i, n);
            }
            self.window = p.window;
        }
        if self.burst_window != p.burst_window {
            let [n] = self.burst.sum(now);
            self.burst = Rolling::new(p.burst_window, BURST_SLOTS);
            if n > 0 {
                self.burst.add(now, 0, n);
            }
            self.burst_window = p.burst_window;
        }
    }

    fn clear(&mut self) {
        self.counts.clear();
        self.burst.clear();
    }

    fn is_idle(&self, now: Nanos) -> bool {
        self.state == BreakerState::Closed
            && self.level == 0
            && self.counts.sum(now) == [0; 4]
            && self.burst.sum(now) == [0]
    }

    fn add(&mut self, now: Nanos, s: Signal) {
        match s {
            Signal::Sent => self.counts.add(now, SENDS, 1),
            Signal::HardBounce => {
                self.counts.add(now, SENDS, 1);
                self.counts.add(now, HARD, 1);
            }
            Signal::Complaint => self.counts.add(now, COMPLAINTS, 1),
            Signal::Reputation => {
                self.counts.add(now, REPUTATION, 1);
                self.burst.add(now, 0, 1);
            }
        }
    }

    /// Why the breaker should open now, if it should.
    fn tripped(&self, now: Nanos, p: &BreakerPolicy) -> Option<String> {
        let [burst] = self.burst.sum(now);
        if burst >= p.burst_count {
            return Some(format!(
                "{burst} reputation_blocked/auth_failed replies in {}",
                humantime::format_duration(p.burst_window)
            ));
        }
        let c = self.counts.sum(now);
        let sends = c[SENDS];
        if sends == 0 || sends < p.min_sends {
            return None;
        }
        let window = humantime::format_duration(p.window);
        let bounce = c[HARD] as f64 / sends as f64;
        if bounce > p.bounce_rate {
            let (r, l) = percentages(bounce, p.bounce_rate, 1);
            return Some(format!(
                "bounce rate {r}% > {l}% over {sends} sends in the last {window}"
            ));
        }
        let complaint = c[COMPLAINTS] as f64 / sends as f64;
        if complaint > p.complaint_rate {
            let (r, l) = percentages(complaint, p.complaint_rate, 2);
            return Some(format!(
                "complaint rate {r}% > {l}% over {sends} sends in the last {window}"
            ));
        }
        None
    }

    fn cool_down(&self, p: &BreakerPolicy) -> Duration {
        let cap = MAX_COOL_DOWN.max(p.cool_down);
        p.cool_down
            .checked_mul(1u32.checked_shl(self.level).unwrap_or(u32::MAX))
            .map_or(cap, |d| d.min(cap))
    }

    fn open(&mut self, now: Nanos, p: &BreakerPolicy, reason: String) -> (Nanos, String) {
        let until = now.saturating_add(ns(self.cool_down(p)));
        self.state = BreakerState::Open {
            since: now,
            until,
            reason: reason.clone(),
        };
        (until, reason)
    }

    fn close(&mut self, now: Nanos) {
        self.state = BreakerState::Closed;
        self.closed_at = now;
    }

    /// Time-driven transitions up to `now`.
    fn advance(&mut self, now: Nanos, p: &BreakerPolicy, mut emit: impl FnMut(&'static str, Option<Nanos>, String)) {
        self.sync(now, p);
        if let BreakerState::Open { until, .. } = self.state
            && until <= now
        {
            // Half-open from the moment the cool-down ended.
            self.state = BreakerState::HalfOpen { since: until };
            self.clear();
            emit("half_open", None, "cool-down over".into());
        }
        if let BreakerState::HalfOpen { since } = self.state
            && since.saturating_add(ns(p.window)) <= now
        {
            self.close(now);
            emit(
                "closed",
                None,
                format!("no trip in {} of half-open", humantime::format_duration(p.window)),
            );
        }
        if self.state == BreakerState::Closed && self.level > 0 && self.closed_at.saturating_add(ns(p.window)) <= now {
            self.level = 0;
        }
    }

    /// Decide after a signal.
    fn decide(&mut self, now: Nanos, p: &BreakerPolicy, mut emit: impl FnMut(&'static str, Option<Nanos>, String)) {
        let half_open = match self.state {
            BreakerState::Open { .. } => return,
            BreakerState::HalfOpen { .. } => true,
            BreakerState::Closed => false,
        };
        if let Some(reason) = self.tripped(now, p) {
            if half_open {
                self.level = self.level.saturating_add(1).min(31);
            }
            let (until, reason) = self.open(now, p, reason);
            emit("open", Some(until), reason);
        } else if half_open {
            let sends = self.counts.sum(now)[SENDS];
            if sends >= p.min_sends {
                self.close(now);
                emit("closed", None, format!("{sends} clean sends in half-open"));
            }
        }
    }
}

struct State {
    policy: BreakerPolicy,
    /// Per scope (by [`BreakerScope::index`]): key → breaker.
    entries: [HashMap<String, Entry>; 2],
    max_entries: usize,
    untracked: u64,
}

impl State {
    fn len(&self) -> usize {
        self.entries.iter().map(HashMap::len).sum()
    }
}

/// The breakers of all tenants and sender domains. One lock per call; share
/// it behind an `Arc`.
pub struct Breakers {
    state: Mutex<State>,
}

impl Breakers {
    pub fn new(policy: BreakerPolicy) -> Breakers {
        Breakers::with_max_entries(policy, MAX_BREAKERS)
    }

    fn with_max_entries(policy: BreakerPolicy, max_entries: usize) -> Breakers {
        Breakers {
            state: Mutex::new(State {
                policy,
                entries: Default::default(),
                max_entries,
                untracked: 0,
            }),
        }
    }

    /// Replace the policy (hot reload). States and counters are kept; an
    /// open breaker keeps its `until`; a changed window carries the counts
    /// so far into the current slot of the new one (they stay counted and
    /// expire at most one window late).
    pub fn set_policy(&self, policy: BreakerPolicy) {
        self.lock().policy = policy;
    }

    pub fn policy(&self) -> BreakerPolicy {
        self.lock().policy.clone()
    }

    /// Record one signal for the sender domain's breaker (`None` or empty:
    /// the null sender, no sender-domain breaker) and the tenant's breaker.
    /// Returns the transitions it caused (sender domain first).
    pub fn record(&self, now: Nanos, tenant: &str, sender_domain: Option<&str>, signal: Signal) -> Vec<Transition> {
        self.record_all(now, tenant, sender_domain, &[signal])
    }

    /// Record several signals at once (one recipient's outcome, see
    /// [`signals_for`]) under one lock.
    pub fn record_all(
        &self,
        now: Nanos,
        tenant: &str,
        sender_domain: Option<&str>,
        signals: &[Signal],
    ) -> Vec<Transition> {
        let mut out = Vec::new();
        if signals.is_empty() {
            return out;
        }
        let mut st = self.lock();
        let State {
            policy,
            entries,
            max_entries,
            untracked,
        } = &mut *st;
        if !policy.enabled {
            return out;
        }
        let mut total: usize = entries.iter().map(HashMap::len).sum();
        for (scope, key) in [
            (BreakerScope::SenderDomain, sender_domain.unwrap_or("")),
            (BreakerScope::Tenant, tenant),
        ] {
            if key.is_empty() {
                continue;
            }
            let key = scope.key(key);
            let map = &mut entries[scope.index()];
            if !map.contains_key(&key) {
                if total >= *max_entries {
                    *untracked += 1;
                    continue;
                }
                total += 1;
                map.insert(key.clone(), Entry::new(now, policy));
            }
            let e = map.get_mut(&key).expect("inserted above");
            let mut emit = |state: &'static str, until: Option<Nanos>, reason: String| {
                out.push(Transition {
                    scope,
                    key: key.clone(),
                    state,
                    until,
                    reason,
                })
            };
            e.advance(now, policy, &mut emit);
            for s in signals {
                e.add(now, *s);
                e.decide(now, policy, &mut emit);
            }
        }
        out
    }

    /// May the tenant submit (from this sender domain)? Reads only: an open
    /// breaker whose cool-down is over passes (the next [`Breakers::tick`]
    /// reports it half-open). When both are open, the one held longer is
    /// reported.
    pub fn check(&self, now: Nanos, tenant: &str, sender_domain: Option<&str>) -> Result<(), Open> {
        let st = self.lock();
        if !st.policy.enabled {
            return Ok(());
        }
        let mut worst: Option<Open> = None;
        for (scope, key) in [
            (BreakerScope::SenderDomain, sender_domain.unwrap_or("")),
            (BreakerScope::Tenant, tenant),
        ] {
            if key.is_empty() {
                continue;
            }
            let map = &st.entries[scope.index()];
            let entry = if scope == BreakerScope::SenderDomain && key.bytes().any(|b| b.is_ascii_uppercase()) {
                map.get(&key.to_ascii_lowercase())
            } else {
                map.get(key)
            };
            if let Some(Entry {
                state: BreakerState::Open { until, reason, .. },
                ..
            }) = entry
                && *until > now
                && worst.as_ref().is_none_or(|w| *until > w.until)
            {
                worst = Some(Open {
                    scope,
                    key: scope.key(key),
                    reason: reason.clone(),
                    until: *until,
                });
            }
        }
        worst.map_or(Ok(()), Err)
    }

    /// Time-driven transitions (open → half-open after the cool-down,
    /// half-open → closed after a window without a trip) and memory upkeep
    /// (closed breakers with empty windows are dropped). Run it about once a
    /// second. Transitions are sorted by scope and key. While breakers are
    /// disabled, every breaker not closed is reported closed and all are
    /// dropped.
    pub fn tick(&self, now: Nanos) -> Vec<Transition> {
        let mut out = Vec::new();
        let mut st = self.lock();
        let State { policy, entries, .. } = &mut *st;
        for (scope, map) in BreakerScope::ALL.into_iter().zip(entries.iter_mut()) {
            if !policy.enabled {
                for (key, e) in map.drain() {
                    if e.state != BreakerState::Closed {
                        out.push(Transition {
                            scope,
                            key,
                            state: "closed",
                            until: None,
                            reason: "breakers disabled".into(),
                        });
                    }
                }
                continue;
            }
            map.retain(|key, e| {
                e.advance(now, policy, |state, until, reason| {
                    out.push(Transition {
                        scope,
                        key: key.clone(),
                        state,
                        until,
                        reason,
                    })
                });
                !e.is_idle(now)
            });
        }
        out.sort_by(|a, b| (a.scope, &a.key).cmp(&(b.scope, &b.key)));
        out
    }

    /// An operator closes a breaker: counters cleared, cool-down back to the
    /// configured one. Returns the transition when there was a breaker (a
    /// closed one too: its figures start over); `None` when none is tracked.
    pub fn reset(&self, scope: BreakerScope, key: &str) -> Option<Transition> {
        self.close_as(scope, key, "reset by operator".into())
    }

    /// Close a breaker another node of the fleet closed (its figures start
    /// over here too); `None` when none is tracked.
    pub fn close_as(&self, scope: BreakerScope, key: &str, reason: String) -> Option<Transition> {
        let key = scope.key(key);
        self.lock().entries[scope.index()].remove(&key)?;
        Some(Transition {
            scope,
            key,
            state: "closed",
            until: None,
            reason,
        })
    }

    /// An operator opens a breaker by hand until `until` (then it goes
    /// half-open like any other). `None` while breakers are disabled.
    pub fn trip(&self, now: Nanos, scope: BreakerScope, key: &str, until: Nanos, reason: &str) -> Option<Transition> {
        let reason = match reason.trim() {
            "" => "opened by operator".to_string(),
            r => format!("opened by operator: {r}"),
        };
        self.open_as(now, scope, key, until, reason)
    }

    /// Open a breaker another node of the fleet opened, with its reason and
    /// cool-down. `None` while breakers are disabled here.
    pub fn open_as(
        &self,
        now: Nanos,
        scope: BreakerScope,
        key: &str,
        until: Nanos,
        reason: String,
    ) -> Option<Transition> {
        let key = scope.key(key);
        let mut st = self.lock();
        let State { policy, entries, .. } = &mut *st;
        if !policy.enabled || key.is_empty() {
            return None;
        }
        let e = entries[scope.index()]
            .entry(key.clone())
            .or_insert_with(|| Entry::new(now, policy));
        e.state = BreakerState::Open {
            since: now,
            until,
            reason: reason.clone(),
        };
        Some(Transition {
            scope,
            key,
            state: "open",
            until: Some(until),
            reason,
        })
    }

    /// One breaker's state (as of the last record or tick).
    pub fn state(&self, scope: BreakerScope, key: &str) -> BreakerState {
        self.lock().entries[scope.index()]
            .get(&scope.key(key))
            .map_or(BreakerState::Closed, |e| e.state.clone())
    }

    /// Breakers not closed, and closed ones with sends in the window, sorted
    /// by scope and key; states as of the last record or tick.
    pub fn view(&self, now: Nanos) -> Vec<BreakerView> {
        let st = self.lock();
        let p = &st.policy;
        let mut out = Vec::new();
        for (scope, map) in BreakerScope::ALL.into_iter().zip(st.entries.iter()) {
            for (key, e) in map {
                // Figures over the current windows, even right after a reload.
                let (c, [burst]) = if e.window == p.window && e.burst_window == p.burst_window {
                    (e.counts.sum(now), e.burst.sum(now))
                } else {
                    let mut e2 = Entry {
                        counts: e.counts.clone(),
                        burst: e.burst.clone(),
                        state: BreakerState::Closed,
                        ..*e
                    };
                    e2.sync(now, p);
                    (e2.counts.sum(now), e2.burst.sum(now))
                };
                if e.state == BreakerState::Closed && c[SENDS] == 0 {
                    continue;
                }
                let rate = |n: u64| if c[SENDS] == 0 { 0.0 } else { n as f64 / c[SENDS] as f64 };
                let (reason, opened, until, half) = match &e.state {
                    BreakerState::Closed => (None, None, None, None),
                    BreakerState::Open { since, until, reason } => (
                        Some(reason.clone()),
                        Some(since / NS_PER_MS),
                        Some(until / NS_PER_MS),
                        None,
                    ),
                    BreakerState::HalfOpen { since } => (None, None, None, Some(since / NS_PER_MS)),
                };
                out.push(BreakerView {
                    scope,
                    key: key.clone(),
                    state: e.state.as_str(),
                    reason,
                    opened_at_ms: opened,
                    until_ms: until,
                    half_open_since_ms: half,
                    cool_down_secs: e.cool_down(p).as_secs(),
                    sends: c[SENDS],
                    hard_bounces: c[HARD],
                    complaints: c[COMPLAINTS],
                    reputation: c[REPUTATION],
                    burst,
                    bounce_rate: rate(c[HARD]),
                    complaint_rate: rate(c[COMPLAINTS]),
                });
            }
        }
        out.sort_by(|a, b| (a.scope, &a.key).cmp(&(b.scope, &b.key)));
        out
    }

    /// Breakers held (for metrics and tests).
    pub fn tracked(&self) -> usize {
        self.lock().len()
    }

    /// Signals for new keys not tracked because [`MAX_BREAKERS`] were held.
    pub fn untracked(&self) -> u64 {
        self.lock().untracked
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic (plain counters).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60 * NS_PER_SEC;

    use crate::throttle::{NS_PER_SEC, test_time as at};

    fn breakers() -> Breakers {
        Breakers::new(BreakerPolicy::default())
    }

    fn with(f: impl FnOnce(&mut BreakersConfig)) -> BreakerPolicy {
        let mut c = BreakersConfig::default();
        f(&mut c);
        c.compile().unwrap()
    }

    /// Record `n` times; all transitions.
    fn rec(b: &Breakers, now: Nanos, tenant: &str, domain: &str, s: Signal, n: usize) -> Vec<Transition> {
        (0..n).flat_map(|_| b.record(now, tenant, Some(domain), s)).collect()
    }

    fn states(ts: &[Transition]) -> Vec<(BreakerScope, &str, &str)> {
        ts.iter().map(|t| (t.scope, t.key.as_str(), t.state)).collect()
    }

    #[test]
    fn config_parses_and_validates_with_keys() {
        let c: BreakersConfig = toml::from_str(
            "enabled = true\nwindow = \"2h\"\nmin_sends = 50\nbounce_rate = 0.05\ncomplaint_rate = 0.003\n\
             burst_count = 5\nburst_window = \"5m\"\ncool_down = \"1h\"\n",
        )
        .unwrap();
        let p = c.compile().unwrap();
        assert_eq!(p.window, Duration::from_secs(7200));
        assert_eq!((p.min_sends, p.burst_count), (50, 5));
        assert_eq!(p.cool_down, Duration::from_secs(3600));
        let d: BreakersConfig = toml::from_str("").unwrap();
        assert_eq!(d, BreakersConfig::default());
        assert!(toml::from_str::<BreakersConfig>("bounce = 0.1").is_err());
        let cases: Vec<(&str, &str)> = vec![
            ("window = \"0s\"", "breakers.window"),
            ("window = \"30d\"", "breakers.window"),
            ("min_sends = 0", "breakers.min_sends"),
            ("bounce_rate = 0.0", "breakers.bounce_rate"),
            ("bounce_rate = 1.0", "breakers.bounce_rate"),
            ("complaint_rate = -0.1", "breakers.complaint_rate"),
            ("complaint_rate = nan", "breakers.complaint_rate"),
            ("burst_count = 0", "breakers.burst_count"),
            ("burst_window = \"0s\"", "breakers.burst_window"),
            ("burst_window = \"2h\"", "breakers.burst_window"),
            ("cool_down = \"0s\"", "breakers.cool_down"),
            ("cool_down = \"25h\"", "breakers.cool_down"),
        ];
        for (text, key) in cases {
            let c: BreakersConfig = toml::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(c.compile().unwrap_err().key, key, "{text}");
        }
    }

    #[test]
    fn signals_per_outcome() {
        use Category::*;
        use Signal::*;
        let cases: Vec<(Outcome, Option<Category>, &[Signal])> = vec![
            (Outcome::Delivered, None, &[Sent]),
            (Outcome::Bounced, Some(UserUnknown), &[HardBounce]),
            (Outcome::Bounced, Some(MailboxDisabled), &[HardBounce]),
            (Outcome::Bounced, Some(DomainNotFound), &[HardBounce]),
            (Outcome::Bounced, Some(MailboxFull), &[Sent]),
            (Outcome::Bounced, None, &[Sent]),
            (Outcome::Bounced, Some(ReputationBlocked), &[Sent, Reputation]),
            (Outcome::Bounced, Some(AuthFailed), &[Sent, Reputation]),
            (Outcome::Deferred, Some(ReputationBlocked), &[Reputation]),
            (Outcome::Deferred, Some(AuthFailed), &[Reputation]),
            (Outcome::Deferred, Some(Greylisted), &[]),
            (Outcome::Deferred, None, &[]),
        ];
        for (o, c, want) in cases {
            assert_eq!(signals_for(o, c, true), want, "{o:?} {c:?}");
        }
        // Not the recipient's own reply: never a hard bounce.
        assert_eq!(signals_for(Outcome::Bounced, Some(UserUnknown), false), &[Sent]);
        assert_eq!(
            signals_for(Outcome::Bounced, Some(ReputationBlocked), false),
            &[Sent, Reputation]
        );
    }

    #[test]
    fn min_sends_is_respected() {
        let b = breakers();
        let t = at(3, 0, 0);
        assert!(rec(&b, t, "acme", "x.example", Signal::Sent, 9).is_empty());
        assert!(rec(&b, t, "acme", "x.example", Signal::HardBounce, 1).is_empty());
        // 50% of 10 sends, but 10 < min_sends.
        assert!(rec(&b, t, "acme", "x.example", Signal::HardBounce, 40).is_empty());
        assert_eq!(b.check(t, "acme", Some("x.example")), Ok(()));
        assert_eq!(b.state(BreakerScope::SenderDomain, "x.example"), BreakerState::Closed);
    }

    #[test]
    fn opens_on_bounce_rate_with_the_figures() {
        let b = breakers();
        let t = at(3, 0, 0);
        rec(&b, t, "acme", "X.Example", Signal::Sent, 98);
        // 2 of 100 is 2.0%: not over.
        assert!(rec(&b, t, "acme", "x.example", Signal::HardBounce, 2).is_empty());
        let ts = b.record(t, "acme", Some("x.EXAMPLE"), Signal::HardBounce);
        assert_eq!(
            states(&ts),
            [
                (BreakerScope::SenderDomain, "x.example", "open"),
                (BreakerScope::Tenant, "acme", "open")
            ]
        );
        assert_eq!(ts[0].reason, "bounce rate 3.0% > 2.0% over 101 sends in the last 1h");
        assert_eq!(ts[0].until, Some(at(3, 30, 0)));

        // The brief's example: opens at exactly 812 sends with 28 bounces.
        let b = Breakers::new(with(|c| c.min_sends = 812));
        rec(&b, t, "acme", "x.example", Signal::Sent, 784);
        let ts = rec(&b, t, "acme", "x.example", Signal::HardBounce, 28);
        assert_eq!(ts.len(), 2);
        let open = b.check(t, "acme", Some("X.example")).unwrap_err();
        assert_eq!(open.scope, BreakerScope::SenderDomain);
        assert_eq!(open.key, "x.example");
        assert_eq!(open.reason, "bounce rate 3.4% > 2.0% over 812 sends in the last 1h");
        assert_eq!(
            open.reply().to_wire(),
            "451 4.7.1 Circuit breaker open for sender domain \"x.example\": bounce rate 3.4% > 2.0% over 812 \
             sends in the last 1h; held until 2026-11-23T03:30:00Z (sendguard:breaker_open)\r\n"
        );
        assert_eq!(open.retry_after(t), Duration::from_secs(1800));
        // Other tenants and domains pass.
        assert_eq!(b.check(t, "other", Some("y.example")), Ok(()));
        assert_eq!(b.check(t, "other", None), Ok(()));
    }

    #[test]
    fn rates_near_the_limit_get_more_decimals() {
        assert_eq!(percentages(0.0204, 0.02, 1), ("2.04".into(), "2.00".into()));
        assert_eq!(percentages(0.034, 0.02, 1), ("3.4".into(), "2.0".into()));
        assert_eq!(percentages(0.0015, 0.001, 2), ("0.15".into(), "0.10".into()));
    }

    #[test]
    fn opens_on_complaint_rate() {
        let b = breakers();
        let t = at(3, 0, 0);
        rec(&b, t, "acme", "x.example", Signal::Sent, 2000);
        // 2 of 2000 is exactly 0.1%: not over.
        assert!(rec(&b, t, "acme", "x.example", Signal::Complaint, 2).is_empty());
        let ts = b.record(t, "acme", Some("x.example"), Signal::Complaint);
        assert_eq!(ts.len(), 2);
        assert_eq!(
            ts[0].reason,
            "complaint rate 0.15% > 0.10% over 2000 sends in the last 1h"
        );
    }

    #[test]
    fn burst_of_reputation_replies_opens_without_min_sends() {
        let b = breakers();
        let t = at(3, 0, 0);
        // 5 now, 5 fifteen minutes later: never 10 within 10 minutes.
        assert!(rec(&b, t, "acme", "x.example", Signal::Reputation, 5).is_empty());
        assert!(rec(&b, t + 15 * MIN, "acme", "x.example", Signal::Reputation, 5).is_empty());
        let ts = rec(&b, t + 16 * MIN, "acme", "x.example", Signal::Reputation, 5);
        assert_eq!(states(&ts)[0], (BreakerScope::SenderDomain, "x.example", "open"));
        assert_eq!(ts[0].reason, "10 reputation_blocked/auth_failed replies in 10m");
    }

    #[test]
    fn tenant_breaker_opens_from_several_sender_domains() {
        let b = breakers();
        let t = at(3, 0, 0);
        for d in ["a.example", "b.example", "c.example"] {
            rec(&b, t, "acme", d, Signal::Sent, 40);
        }
        assert!(b.record(t, "acme", Some("a.example"), Signal::HardBounce).is_empty());
        assert!(b.record(t, "acme", Some("b.example"), Signal::HardBounce).is_empty());
        let ts = b.record(t, "acme", Some("c.example"), Signal::HardBounce);
        assert_eq!(states(&ts), [(BreakerScope::Tenant, "acme", "open")]);
        assert_eq!(ts[0].reason, "bounce rate 2.4% > 2.0% over 123 sends in the last 1h");
        let open = b.check(t, "acme", Some("a.example")).unwrap_err();
        assert_eq!((open.scope, open.key.as_str()), (BreakerScope::Tenant, "acme"));
        assert!(
            open.reply()
                .to_string()
                .contains("for tenant \"acme\": bounce rate 2.4%")
        );
        // Another tenant on the same sender domains passes.
        assert_eq!(b.check(t, "other", Some("a.example")), Ok(()));
    }

    #[test]
    fn old_bounces_age_out_of_the_window() {
        let b = breakers();
        let t = at(3, 0, 0);
        rec(&b, t, "acme", "x.example", Signal::Sent, 50);
        rec(&b, t, "acme", "x.example", Signal::HardBounce, 2);
        // 70 minutes later the first batch is out: 2 of 100 is not over
        // (with it, 4 of 152 would be).
        let t2 = t + 70 * MIN;
        rec(&b, t2, "acme", "x.example", Signal::Sent, 98);
        assert!(rec(&b, t2, "acme", "x.example", Signal::HardBounce, 2).is_empty());
        let v = b.view(t2);
        assert_eq!((v[0].sends, v[0].hard_bounces), (100, 2));
    }

    /// Opens x.example (and the tenant) at `t`.
    fn trip_by_bounces(b: &Breakers, t: Nanos) -> Vec<Transition> {
        rec(b, t, "acme", "x.example", Signal::Sent, 97);
        rec(b, t, "acme", "x.example", Signal::HardBounce, 3)
    }

    #[test]
    fn open_goes_half_open_after_the_cool_down_and_closes_after_clean_sends() {
        let b = breakers();
        let t = at(3, 0, 0);
        assert_eq!(trip_by_bounces(&b, t).len(), 2);
        assert!(b.tick(t + 29 * MIN).is_empty());
        assert!(b.check(t + 29 * MIN, "acme", Some("x.example")).is_err());
        // check passes as soon as the cool-down is over, before the tick.
        assert_eq!(b.check(t + 30 * MIN, "acme", Some("x.example")), Ok(()));
        let ts = b.tick(t + 30 * MIN + NS_PER_SEC);
        assert_eq!(
            states(&ts),
            [
                (BreakerScope::SenderDomain, "x.example", "half_open"),
                (BreakerScope::Tenant, "acme", "half_open")
            ]
        );
        assert_eq!(ts[0].until, None);
        assert_eq!(
            b.state(BreakerScope::SenderDomain, "x.example"),
            BreakerState::HalfOpen { since: t + 30 * MIN }
        );
        // Counters were cleared.
        let v = b.view(t + 31 * MIN);
        assert_eq!(v.len(), 2);
        assert_eq!(
            (v[0].state, v[0].sends, v[0].half_open_since_ms),
            ("half_open", 0, Some((t + 30 * MIN) / NS_PER_MS))
        );
        // 99 clean sends: still half-open; the 100th closes both.
        let t2 = t + 40 * MIN;
        assert!(rec(&b, t2, "acme", "x.example", Signal::Sent, 99).is_empty());
        let ts = b.record(t2, "acme", Some("x.example"), Signal::Sent);
        assert_eq!(
            states(&ts),
            [
                (BreakerScope::SenderDomain, "x.example", "closed"),
                (BreakerScope::Tenant, "acme", "closed")
            ]
        );
        assert_eq!(ts[0].reason, "100 clean sends in half-open");
    }

    #[test]
    fn half_open_closes_after_a_quiet_window() {
        let b = breakers();
        let t = at(3, 0, 0);
        trip_by_bounces(&b, t);
        let half = t + 30 * MIN;
        assert_eq!(b.tick(half).len(), 2);
        assert!(b.tick(half + 59 * MIN).is_empty());
        let ts = b.tick(half + 60 * MIN);
        assert_eq!(ts.len(), 2);
        assert_eq!(
            (ts[0].state, ts[0].reason.as_str()),
            ("closed", "no trip in 1h of half-open")
        );
        // A late tick goes through both transitions at once.
        let b = breakers();
        trip_by_bounces(&b, t);
        let ts = b.tick(t + 5 * 3600 * NS_PER_SEC);
        assert_eq!(
            ts.iter().map(|t| t.state).collect::<Vec<_>>(),
            ["half_open", "closed", "half_open", "closed"]
        );
    }

    #[test]
    fn half_open_trip_doubles_the_cool_down_up_to_a_day() {
        let b = breakers();
        let mut t = at(3, 0, 0);
        trip_by_bounces(&b, t);
        let mut cool = 30 * MIN;
        for _ in 0..8 {
            t += cool;
            assert_eq!(b.tick(t).len(), 2, "half-open at {t}");
            let ts = trip_by_bounces(&b, t);
            cool = (cool * 2).min(24 * 60 * MIN);
            assert_eq!(ts[0].state, "open");
            assert_eq!(ts[0].until, Some(t + cool));
        }
        assert_eq!(cool, 24 * 60 * MIN);
        assert_eq!(b.view(t)[0].cool_down_secs, 24 * 3600);
        // A burst in half-open re-opens too.
        t += cool;
        b.tick(t);
        let ts = rec(&b, t, "acme", "x.example", Signal::Reputation, 10);
        assert_eq!(ts[0].until, Some(t + cool));
    }

    #[test]
    fn doubling_is_forgotten_after_a_closed_window() {
        let b = breakers();
        let t = at(3, 0, 0);
        trip_by_bounces(&b, t);
        let half = t + 30 * MIN;
        b.tick(half);
        trip_by_bounces(&b, half); // open for 1 h
        let half2 = half + 60 * MIN;
        b.tick(half2);
        assert_eq!(
            rec(&b, half2, "acme", "x.example", Signal::Sent, 100)[0].state,
            "closed"
        );
        // Soon after closing the next opening still gets 1 h.
        let t3 = half2 + 10 * MIN;
        assert_eq!(b.view(t3)[0].cool_down_secs, 3600);
        // A full window after closing, back to 30 min.
        let t4 = half2 + 61 * MIN;
        b.tick(t4);
        assert_eq!(trip_by_bounces(&b, t4)[0].until, Some(t4 + 30 * MIN));
    }

    #[test]
    fn reset_and_trip_by_an_operator() {
        let b = breakers();
        let t = at(3, 0, 0);
        let tr = b
            .trip(t, BreakerScope::SenderDomain, "Y.Example", at(5, 0, 0), "spam run")
            .unwrap();
        assert_eq!(
            (tr.key.as_str(), tr.state, tr.until),
            ("y.example", "open", Some(at(5, 0, 0)))
        );
        let open = b.check(t, "acme", Some("y.example")).unwrap_err();
        assert_eq!(open.reason, "opened by operator: spam run");
        assert!(b.check(at(4, 59, 59), "acme", Some("y.example")).is_err());
        let tr = b.reset(BreakerScope::SenderDomain, "y.EXAMPLE").unwrap();
        assert_eq!((tr.state, tr.reason.as_str()), ("closed", "reset by operator"));
        assert_eq!(b.check(t, "acme", Some("y.example")), Ok(()));
        assert_eq!(b.reset(BreakerScope::SenderDomain, "y.example"), None);

        // Reset forgets the doubling and the counters.
        trip_by_bounces(&b, t);
        b.tick(t + 30 * MIN);
        trip_by_bounces(&b, t + 30 * MIN);
        assert_eq!(b.view(t + 30 * MIN)[0].cool_down_secs, 3600);
        assert!(b.reset(BreakerScope::SenderDomain, "x.example").is_some());
        assert!(b.reset(BreakerScope::Tenant, "acme").is_some());
        assert!(b.view(t + 30 * MIN).is_empty());
        let t2 = t + 31 * MIN;
        assert_eq!(trip_by_bounces(&b, t2)[0].until, Some(t2 + 30 * MIN));
        // A tripped tenant breaker refuses every sender domain of it.
        b.trip(t, BreakerScope::Tenant, "beta", at(4, 0, 0), " ").unwrap();
        let open = b.check(t, "beta", None).unwrap_err();
        assert_eq!(
            (open.scope, open.reason.as_str()),
            (BreakerScope::Tenant, "opened by operator")
        );
        // ... and goes half-open like any other.
        let ts = b.tick(at(4, 0, 0));
        assert!(ts.iter().any(|t| t.key == "beta" && t.state == "half_open"));
    }

    #[test]
    fn set_policy_keeps_states_and_counters() {
        let b = breakers();
        let t = at(3, 0, 0);
        trip_by_bounces(&b, t);
        rec(&b, t, "acme", "z.example", Signal::Sent, 7);
        b.set_policy(with(|c| {
            c.bounce_rate = 0.5;
            c.window = Duration::from_secs(7200);
            c.cool_down = Duration::from_secs(60);
        }));
        assert!(
            b.check(t + MIN, "acme", Some("x.example")).is_err(),
            "still open until the old until"
        );
        let v = b.view(t + MIN);
        let z = v.iter().find(|v| v.key == "z.example").unwrap();
        assert_eq!(z.sends, 7);
        rec(&b, t + 2 * MIN, "acme", "z.example", Signal::Sent, 1);
        let v = b.view(t + 2 * MIN);
        assert_eq!(v.iter().find(|v| v.key == "z.example").unwrap().sends, 8);
        assert_eq!(b.policy().bounce_rate, 0.5);
    }

    #[test]
    fn view_lists_figures_sorted_and_tick_drops_idle_breakers() {
        let b = breakers();
        let t = at(3, 0, 0);
        rec(&b, t, "acme", "b.example", Signal::Sent, 40);
        rec(&b, t, "acme", "b.example", Signal::HardBounce, 1);
        rec(&b, t, "acme", "b.example", Signal::Complaint, 2);
        rec(&b, t, "acme", "b.example", Signal::Reputation, 3);
        rec(&b, t, "acme", "a.example", Signal::Sent, 1);
        // Only complaints: closed without sends, not listed (but held).
        rec(&b, t, "zeta", "c.example", Signal::Complaint, 1);
        let v = b.view(t);
        let keys: Vec<_> = v.iter().map(|v| (v.scope.as_str(), v.key.as_str())).collect();
        assert_eq!(
            keys,
            [
                ("sender_domain", "a.example"),
                ("sender_domain", "b.example"),
                ("tenant", "acme")
            ]
        );
        let bv = &v[1];
        assert_eq!(bv.state, "closed");
        assert_eq!(
            (bv.sends, bv.hard_bounces, bv.complaints, bv.reputation, bv.burst),
            (41, 1, 2, 3, 3)
        );
        assert!((bv.bounce_rate - 1.0 / 41.0).abs() < 1e-12);
        assert!((bv.complaint_rate - 2.0 / 41.0).abs() < 1e-12);
        assert_eq!(bv.cool_down_secs, 1800);
        let json = serde_json::to_value(bv).unwrap();
        assert_eq!(json["scope"], "sender_domain");
        assert_eq!(json["until_ms"], serde_json::Value::Null);
        assert_eq!(b.tracked(), 5);
        // Nothing is dropped while windows hold counts ...
        assert!(b.tick(t + 30 * MIN).is_empty());
        assert_eq!(b.tracked(), 5);
        // ... and everything after the window.
        assert!(b.tick(t + 61 * MIN).is_empty());
        assert_eq!(b.tracked(), 0);
        // Open ones show why and until when.
        trip_by_bounces(&b, t);
        let v = b.view(t);
        assert_eq!(v[0].state, "open");
        assert_eq!(v[0].opened_at_ms, Some(t / NS_PER_MS));
        assert_eq!(v[0].until_ms, Some((t + 30 * MIN) / NS_PER_MS));
        assert!(v[0].reason.as_deref().unwrap().starts_with("bounce rate 3.0%"));
    }

    #[test]
    fn memory_is_capped() {
        let b = Breakers::with_max_entries(BreakerPolicy::default(), 3);
        let t = at(3, 0, 0);
        for d in ["a.example", "b.example", "c.example", "d.example"] {
            b.record(t, "acme", Some(d), Signal::Sent);
        }
        assert_eq!(b.tracked(), 3);
        assert_eq!(b.untracked(), 2);
        // Existing keys still count.
        b.record(t, "acme", Some("a.example"), Signal::Sent);
        assert_eq!(b.view(t)[0].sends, 2);
    }

    #[test]
    fn disabled_breakers_pass_and_release() {
        let b = breakers();
        let t = at(3, 0, 0);
        trip_by_bounces(&b, t);
        b.set_policy(with(|c| c.enabled = false));
        assert_eq!(b.check(t, "acme", Some("x.example")), Ok(()));
        assert!(b.record(t, "acme", Some("x.example"), Signal::HardBounce).is_empty());
        assert!(b.trip(t, BreakerScope::Tenant, "acme", at(5, 0, 0), "x").is_none());
        let ts = b.tick(t);
        assert_eq!(
            states(&ts),
            [
                (BreakerScope::SenderDomain, "x.example", "closed"),
                (BreakerScope::Tenant, "acme", "closed")
            ]
        );
        assert_eq!(b.tracked(), 0);
    }

    #[test]
    fn reply_is_one_short_sanitized_line() {
        let o = Open {
            scope: BreakerScope::SenderDomain,
            key: format!("\"é\r\n{}", "a".repeat(300)),
            reason: format!("opened by operator: {}\r\n250 ok", "z".repeat(400)),
            until: at(3, 30, 0) + 1,
        };
        let w = o.reply().to_wire();
        assert!(w.len() < 500, "{} bytes", w.len());
        assert_eq!(w.matches("\r\n").count(), 1);
        assert!(w.is_ascii());
        assert!(
            w.starts_with("451 4.7.1 Circuit breaker open for sender domain \"\\\"???aaa"),
            "{w}"
        );
        assert!(w.contains("aaa...\": opened by operator: zzz"), "{w}");
        // Rounded up to the second.
        assert!(
            w.ends_with("zzz...; held until 2026-11-23T03:30:01Z (sendguard:breaker_open)\r\n"),
            "{w}"
        );
        assert!(!w.contains("250 ok"));
    }
}
