//! Submission budgets and sender-domain warm-up: what a tenant, a
//! credential (one agent) or a sender domain may submit per period, and how
//! many recipients a new sender domain may reach on each UTC day of its
//! ramp. Checked at RCPT time, so a client learns early that it must slow
//! down: the answer is a temporary `451 4.7.1` (RFC 3463 §3.8: "delivery not
//! authorized, message refused", in the persistent-transient class) that
//! says which budget, its size and when to try again.
//!
//! Every applicable limit is a GCRA budget (burst = count, see
//! [`crate::throttle`]); one recipient is charged on each recipients
//! limit, and on the first accepted RCPT of a transaction one message on
//! each messages limit, all or nothing. Warm-up caps count recipients per
//! UTC day in a [`DayCounter`].
//!
//! Counters are keyed by (scope, key, messages|recipients, period), not by
//! rule, so they survive a reload ([`Budgets::set_policy`]). When a reload
//! changes the count for the same period, the counter's debt is rescaled so
//! that what was used stays used (4 of `4/min` used → 4 of `8/min` used); a
//! changed period starts a fresh counter. Memory is bounded by
//! [`Budgets::sweep`], which drops counters that are full again.
//!
//! Trust boundary: pure decisions over an injected clock. The keys come from
//! the session (tenant from config, credential from SMTP AUTH, sender
//! domain from MAIL FROM, i.e. client input): they are only map keys here,
//! and are quoted, shortened and stripped of non-ASCII and control
//! characters before they appear in a reply.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;
use crate::rate::budget_fleet::{BudgetFleet, Grant, LeaseKey, LeaseLimit, LeaseRequest, Refund};
use crate::rate::policy::{BudgetPolicy, Scope};
use crate::smtp::reply::{Enhanced, Reply};
use crate::throttle::{DayCounter, Denied, Gcra, Limit, NS_PER_SEC, Nanos, Rate, day_of};

/// Reason token of a submission budget refusal (`docs/reasons.md`).
pub const TOKEN_BUDGET: &str = "budget_exceeded";
/// Reason token of a warm-up cap refusal (`docs/reasons.md`).
pub const TOKEN_WARMUP: &str = "warmup_limit";

const SCOPES: [Scope; 3] = [Scope::Tenant, Scope::Credential, Scope::SenderDomain];

fn scope_index(s: Scope) -> usize {
    match s {
        Scope::Tenant => 0,
        Scope::Credential => 1,
        Scope::SenderDomain => 2,
    }
}

/// Who is submitting: the keys the budgets count by.
#[derive(Debug, Clone, Copy)]
pub struct Who<'a> {
    pub tenant: &'a str,
    /// The SMTP AUTH username, if the client authenticated.
    pub credential: Option<&'a str>,
    /// The MAIL FROM domain (any case), if there is one (not for `<>`).
    pub sender_domain: Option<&'a str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum What {
    Messages,
    Recipients,
}

impl What {
    fn as_str(self) -> &'static str {
        match self {
            What::Messages => "messages",
            What::Recipients => "recipients",
        }
    }
}

/// Why a budget refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverKind {
    /// A `[[budget]]` limit.
    Budget,
    /// The sender domain's warm-up cap for today. `day` is the 1-based day of
    /// the ramp (0: the ramp starts later; day 1's cap applies until then).
    Warmup { day: u64, cap: u64 },
}

/// A refusal: the limit that needs the longest wait.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Over {
    pub scope: Scope,
    /// The tenant, credential or (lowercase) sender domain.
    pub key: String,
    /// `"messages"` or `"recipients"`.
    pub what: &'static str,
    /// The limit (for warm-up: today's cap per day).
    pub limit: Rate,
    pub retry_after: Duration,
    pub kind: OverKind,
    /// When the decision was made; `retry_at` counts from here.
    pub decided_at: Nanos,
}

impl Over {
    /// The reason token for the reply.
    pub fn token(&self) -> &'static str {
        match self.kind {
            OverKind::Budget => TOKEN_BUDGET,
            OverKind::Warmup { .. } => TOKEN_WARMUP,
        }
    }

    /// The wait in whole seconds, rounded up (at least 1).
    pub fn retry_after_secs(&self) -> u64 {
        (self.retry_after.as_nanos().div_ceil(u128::from(NS_PER_SEC)) as u64).max(1)
    }

    /// The first whole second at which the refused submission would pass.
    pub fn retry_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.retry_at_secs())
    }

    fn retry_at_secs(&self) -> u64 {
        let at = u128::from(self.decided_at) + self.retry_after.as_nanos();
        at.div_ceil(u128::from(NS_PER_SEC)) as u64
    }

    /// `451 4.7.1 … (sendguard:budget_exceeded|warmup_limit)`, one line.
    pub fn reply(&self) -> Reply {
        let secs = self.retry_after_secs();
        let at = super::format_time(self.retry_at_secs() * crate::throttle::NS_PER_SEC);
        let key = super::quote_key(&self.key);
        let text = match self.kind {
            OverKind::Budget => format!(
                "Submission budget exceeded: {} {key} may submit {} per {}; try again in {secs} s (at {at})",
                scope_words(self.scope),
                count_of(u64::from(self.limit.count), self.what),
                period_words(self.limit.per),
            ),
            OverKind::Warmup { day: 0, cap } => format!(
                "Sender domain {key} is warming up: its ramp has not started, so the day 1 cap of {} applies \
                 today; try again in {secs} s (at {at})",
                count_of(cap, self.what),
            ),
            OverKind::Warmup { day, cap } => format!(
                "Sender domain {key} is warming up: day {day} of its ramp allows {} today; try again in {secs} s \
                 (at {at})",
                count_of(cap, self.what),
            ),
        };
        Reply::new(451, Enhanced(4, 7, 1), text).with_token(self.token())
    }
}

fn scope_words(s: Scope) -> &'static str {
    match s {
        Scope::Tenant => "tenant",
        Scope::Credential => "credential",
        Scope::SenderDomain => "sender domain",
    }
}

fn count_of(n: u64, what: &str) -> String {
    if n == 1 {
        format!("1 {}", what.trim_end_matches('s'))
    } else {
        format!("{n} {what}")
    }
}

fn period_words(per: Duration) -> String {
    match (per.as_secs(), per.subsec_nanos()) {
        (1, 0) => "second".into(),
        (60, 0) => "minute".into(),
        (3600, 0) => "hour".into(),
        (86_400, 0) => "day".into(),
        _ => humantime::format_duration(per).to_string(),
    }
}

/// One counter: a budget limit's GCRA for one key.
#[derive(Debug, Clone, Copy)]
struct Slot {
    what: What,
    per: Duration,
    /// The interval `gcra` was last charged at (the count may change on reload).
    interval: u64,
    gcra: Gcra,
}

impl Slot {
    /// The state under `limit`: debt charged at another interval (a reload
    /// changed the count) is rescaled so the number of events used stays.
    fn current(&self, now: Nanos, limit: &Limit) -> Gcra {
        let t = limit.rate.interval_ns();
        if self.interval == t || self.gcra.tat <= now {
            return self.gcra;
        }
        let debt = u128::from(self.gcra.tat - now) * u128::from(t) / u128::from(self.interval.max(1));
        Gcra {
            tat: now.saturating_add(u64::try_from(debt).unwrap_or(u64::MAX)),
        }
    }
}

/// The policies with a lookup index, replaced whole on reload.
struct Compiled {
    budgets: Arc<BudgetPolicy>,
    warmups: Arc<WarmupPolicy>,
    /// Per scope: key → rule index of the rule for exactly that key.
    specific: [HashMap<String, usize>; 3],
    /// Per scope: the rule for each key without a rule of its own.
    generic: [Option<usize>; 3],
}

impl Compiled {
    fn new(budgets: Arc<BudgetPolicy>, warmups: Arc<WarmupPolicy>) -> Compiled {
        let mut specific: [HashMap<String, usize>; 3] = Default::default();
        let mut generic = [None; 3];
        for (i, r) in budgets.rules.iter().enumerate() {
            let s = scope_index(r.scope);
            match &r.key {
                Some(k) => {
                    let k = if r.scope == Scope::SenderDomain {
                        k.to_ascii_lowercase()
                    } else {
                        k.clone()
                    };
                    specific[s].entry(k).or_insert(i);
                }
                None => {
                    generic[s].get_or_insert(i);
                }
            }
        }
        Compiled {
            budgets,
            warmups,
            specific,
            generic,
        }
    }

    /// Every limit that applies to `keys` (per scope), in a fixed order:
    /// scopes as in [`SCOPES`], recipients before messages, rules' order.
    fn each_limit<'k>(
        &self,
        keys: &[Option<&'k str>; 3],
        first: bool,
        mut f: impl FnMut(usize, &'k str, What, &Limit),
    ) {
        for (s, key) in keys.iter().enumerate() {
            let Some(key) = *key else { continue };
            let Some(i) = self.specific[s].get(key).copied().or(self.generic[s]) else {
                continue;
            };
            let rule = &self.budgets.rules[i];
            for l in &rule.recipients {
                f(s, key, What::Recipients, l);
            }
            if first {
                for l in &rule.messages {
                    f(s, key, What::Messages, l);
                }
            }
        }
    }
}

struct State {
    policy: Compiled,
    /// Per scope: key → its counters.
    slots: [HashMap<String, Vec<Slot>>; 3],
    /// Warm-up domain → recipients today.
    days: HashMap<String, DayCounter>,
    /// Fleet mode: leases from Redis, or fair shares.
    fleet: BudgetFleet,
}

fn find(slots: &[Slot], what: What, per: Duration) -> Option<&Slot> {
    slots.iter().find(|s| s.what == what && s.per == per)
}

fn slot_mut<'m>(map: &'m mut HashMap<String, Vec<Slot>>, key: &str, what: What, per: Duration) -> &'m mut Slot {
    if !map.contains_key(key) {
        map.insert(key.to_owned(), Vec::with_capacity(2));
    }
    let v = map.get_mut(key).expect("inserted above");
    let i = match v.iter().position(|s| s.what == what && s.per == per) {
        Some(i) => i,
        None => {
            v.push(Slot {
                what,
                per,
                interval: 1,
                gcra: Gcra::default(),
            });
            v.len() - 1
        }
    };
    &mut v[i]
}

/// The refusal with the longest wait so far (built into an [`Over`] at the end).
struct Worst<'k> {
    wait: u64,
    scope: Scope,
    key: &'k str,
    what: What,
    limit: Rate,
    kind: OverKind,
}

fn keep_worst<'k>(worst: &mut Option<Worst<'k>>, w: Worst<'k>) {
    if worst.as_ref().is_none_or(|cur| w.wait > cur.wait) {
        *worst = Some(w);
    }
}

fn lowercase(s: &str) -> Cow<'_, str> {
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(s.to_ascii_lowercase())
    } else {
        Cow::Borrowed(s)
    }
}

/// Submission budgets and warm-up caps, with their counters. One lock per
/// call; share it behind an `Arc`.
pub struct Budgets {
    state: Mutex<State>,
}

impl Budgets {
    pub fn new(budgets: Arc<BudgetPolicy>, warmups: Arc<WarmupPolicy>) -> Budgets {
        Budgets {
            state: Mutex::new(State {
                policy: Compiled::new(budgets, warmups),
                slots: Default::default(),
                days: HashMap::new(),
                fleet: BudgetFleet::default(),
            }),
        }
    }

    /// Replace the policies (hot reload); counters are kept.
    pub fn set_policy(&self, budgets: Arc<BudgetPolicy>, warmups: Arc<WarmupPolicy>) {
        let compiled = Compiled::new(budgets, warmups);
        self.lock().policy = compiled;
    }

    pub fn budget_policy(&self) -> Arc<BudgetPolicy> {
        self.lock().policy.budgets.clone()
    }

    pub fn warmup_policy(&self) -> Arc<WarmupPolicy> {
        self.lock().policy.warmups.clone()
    }

    /// May one more recipient be accepted? Charges one recipient on every
    /// recipients limit and, when `first_of_message` (the first accepted RCPT
    /// of the transaction), one message on every messages limit, and one
    /// recipient on the sender domain's warm-up day, all or nothing. On
    /// refusal nothing is charged and the [`Over`] names the limit that
    /// needs the longest wait.
    /// In a fleet this charges the local counters only; see
    /// [`Budgets::try_charge`].
    pub fn charge_recipient(&self, now: Nanos, who: &Who, first_of_message: bool) -> Result<(), Over> {
        decide(&mut self.lock(), now, who, first_of_message, Commit::Local, None).map_err(|c| match c {
            Charge::Over(o) => o,
            Charge::Need(_) => unreachable!("local charges need no lease"),
        })
    }

    /// [`Budgets::charge_recipient`] with the fleet's leases (fleet mode),
    /// after adding `grants` (tokens this caller just obtained) to the
    /// pool under the same lock, so no other session takes them first.
    /// `Charge::Need` lists the leases to obtain (nothing is charged then);
    /// `cluster::budgets::charge` drives it.
    pub fn try_charge(&self, now: Nanos, who: &Who, first_of_message: bool, grants: &[Grant]) -> Result<(), Charge> {
        let mut st = self.lock();
        for g in grants {
            st.fleet.grant(g, now);
        }
        decide(&mut st, now, who, first_of_message, Commit::Leased, None)
    }

    /// A live leased token is held for `key` (another session just
    /// obtained some).
    pub fn holds(&self, key: &LeaseKey, now: Nanos) -> bool {
        self.lock().fleet.holds(key, now)
    }

    /// Tokens obtained but not used by their caller: into the pool.
    pub fn pool(&self, grants: &[Grant], now: Nanos) {
        let mut st = self.lock();
        for g in grants {
            st.fleet.grant(g, now);
        }
    }

    /// Charge locally at this node's share of every budget (`nodes` live):
    /// the fleet's Redis did not answer for this recipient.
    pub fn charge_at_share(&self, now: Nanos, who: &Who, first_of_message: bool, nodes: u32) -> Result<(), Over> {
        let share = 1.0 / f64::from(nodes.max(1));
        decide(&mut self.lock(), now, who, first_of_message, Commit::Local, Some(share)).map_err(|c| match c {
            Charge::Over(o) => o,
            Charge::Need(_) => unreachable!("local charges need no lease"),
        })
    }

    /// Leased tokens that lapsed unused (by `now`), to give back to Redis.
    pub fn take_refunds(&self, now: Nanos) -> Vec<Refund> {
        let mut st = self.lock();
        st.fleet.lapse_all(now);
        st.fleet.take_refunds()
    }

    /// Refunds that could not be sent, for the next try.
    pub fn keep_refunds(&self, r: Vec<Refund>) {
        self.lock().fleet.keep_refunds(r);
    }

    /// The same answer as [`Budgets::charge_recipient`], charging nothing
    /// (in a fleet: as far as this node's own counters tell; the fleet's
    /// tokens are not consulted).
    pub fn peek_recipient(&self, now: Nanos, who: &Who, first_of_message: bool) -> Result<(), Over> {
        decide(&mut self.lock(), now, who, first_of_message, Commit::No, None).map_err(|c| match c {
            Charge::Over(o) => o,
            Charge::Need(_) => unreachable!("a peek needs no lease"),
        })
    }

    /// Fleet mode of the budgets (set by the cluster task).
    pub fn set_fleet_mode(&self, mode: super::fleet::Mode) {
        let mut st = self.lock();
        if st.fleet.mode() != mode {
            st.fleet.set_mode(mode);
        }
    }

    pub fn fleet_mode(&self) -> super::fleet::Mode {
        self.lock().fleet.mode()
    }

    /// The refusal when the fleet has no token left for `r` (`wait`: until
    /// the next is due, for a rate).
    /// `retry`: a shorter wait to state instead (contention on this node's
    /// own tokens, not an exhausted limit).
    pub fn fleet_over(&self, r: &LeaseRequest, wait: Duration, now: Nanos, retry: Option<Duration>) -> Over {
        let st = self.lock();
        let (scope, key, what, limit, kind, retry_after) = match (&r.key, r.limit) {
            (
                LeaseKey::Budget {
                    scope, key, recipients, ..
                },
                LeaseLimit::Rate(rate),
            ) => (
                SCOPES[*scope],
                key.clone(),
                if *recipients { What::Recipients } else { What::Messages },
                rate,
                OverKind::Budget,
                wait,
            ),
            (LeaseKey::Warmup { domain, .. }, LeaseLimit::Cap(cap)) => {
                let day = st.policy.warmups.ramps.get(domain).map_or(0, |ramp| ramp.today(now).0);
                (
                    Scope::SenderDomain,
                    domain.clone(),
                    What::Recipients,
                    Rate {
                        count: u32::try_from(cap).unwrap_or(u32::MAX),
                        per: Duration::from_secs(86_400),
                    },
                    OverKind::Warmup { day, cap },
                    Duration::from_nanos(DayCounter::until_reset(now)),
                )
            }
            _ => unreachable!("a lease key and its limit are built together"),
        };
        Over {
            scope,
            key,
            what: what.as_str(),
            limit,
            retry_after: retry.unwrap_or(retry_after),
            kind,
            decided_at: now,
        }
    }

    /// Drop counters that carry no information any more (budgets full again,
    /// warm-up days past or no longer configured). Returns how many were
    /// dropped. Call it every minute or so.
    pub fn sweep(&self, now: Nanos) -> usize {
        let mut st = self.lock();
        let State {
            policy,
            slots,
            days,
            fleet,
        } = &mut *st;
        fleet.sweep(now);
        let mut dropped = 0;
        for map in slots.iter_mut() {
            map.retain(|_, v| {
                let before = v.len();
                v.retain(|s| !s.gcra.is_idle(now));
                dropped += before - v.len();
                !v.is_empty()
            });
        }
        let today = day_of(now);
        let before = days.len();
        days.retain(|d, c| c.day == today && policy.warmups.ramps.contains_key(d));
        dropped + before - days.len()
    }

    /// How many counters are held (for metrics and tests).
    pub fn counters(&self) -> usize {
        let st = self.lock();
        st.slots.iter().flat_map(|m| m.values()).map(Vec::len).sum::<usize>() + st.days.len()
    }

    /// Every warm-up ramp, by sender domain, for the admin API.
    pub fn warmup_status(&self, now: Nanos) -> Vec<WarmupView> {
        let st = self.lock();
        let mut out: Vec<WarmupView> = st
            .policy
            .warmups
            .ramps
            .iter()
            .map(|(d, ramp)| {
                let (day, cap) = ramp.today(now);
                WarmupView {
                    sender_domain: d.clone(),
                    start: format_date(ramp.start_day),
                    day,
                    cap_today: cap,
                    sent_today: st.days.get(d).map_or(0, |c| c.get(now)),
                    ramp_over: cap.is_none(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.sender_domain.cmp(&b.sender_domain));
        out
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic (plain counters).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What [`decide`] does once every limit has room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Commit {
    /// Charge nothing (a peek).
    No,
    /// Charge the local counters.
    Local,
    /// In a fleet with Redis: also take a leased token of every limit, or
    /// report the leases missing.
    Leased,
}

/// Why a fleet charge did not happen.
#[derive(Debug)]
pub enum Charge {
    Over(Over),
    /// Obtain these leases, then try again.
    Need(Vec<LeaseRequest>),
}

fn decide(
    st: &mut State,
    now: Nanos,
    who: &Who,
    first: bool,
    commit: Commit,
    share: Option<f64>,
) -> Result<(), Charge> {
    let State {
        policy,
        slots,
        days,
        fleet,
    } = st;
    let share = share.unwrap_or_else(|| fleet.share());
    // At a fair share a budget is smaller, all of it: its count and the
    // burst (a factor on the GCRA alone would still allow the whole burst).
    let eff = |l: &Limit| -> Limit {
        if share >= 1.0 {
            return *l;
        }
        let scale = |n: u32| crate::throttle::at_share(n, share);
        Limit::new(
            Rate {
                count: scale(l.rate.count),
                per: l.rate.per,
            },
            scale(l.burst),
        )
    };
    let domain = who.sender_domain.map(lowercase);
    let keys: [Option<&str>; 3] = [Some(who.tenant), who.credential, domain.as_deref()];
    let mut worst: Option<Worst> = None;
    policy.each_limit(&keys, first, |s, key, what, limit| {
        let limit = &eff(limit);
        let gcra = slots[s]
            .get(key)
            .and_then(|v| find(v, what, limit.rate.per))
            .map(|sl| sl.current(now, limit))
            .unwrap_or_default();
        if let Err(d) = gcra.check(now, limit, 1.0, 1) {
            let wait = match d {
                Denied::Wait(w) => w,
                Denied::Never => limit.rate.per.as_nanos() as u64,
            };
            keep_worst(
                &mut worst,
                Worst {
                    wait,
                    scope: SCOPES[s],
                    key,
                    what,
                    limit: limit.rate,
                    kind: OverKind::Budget,
                },
            );
        }
    });
    let ramp = keys[2].and_then(|d| policy.warmups.ramps.get(d).map(|r| (d, r)));
    if let Some((d, ramp)) = ramp
        && let (day, Some(cap)) = ramp.today(now)
        && days.get(d).map_or(0, |c| c.get(now)) >= at_share(cap, share)
    {
        keep_worst(
            &mut worst,
            Worst {
                wait: DayCounter::until_reset(now),
                scope: Scope::SenderDomain,
                key: d,
                what: What::Recipients,
                limit: Rate {
                    count: u32::try_from(cap).unwrap_or(u32::MAX),
                    per: Duration::from_secs(86_400),
                },
                kind: OverKind::Warmup { day, cap },
            },
        );
    }
    if let Some(w) = worst {
        return Err(Charge::Over(Over {
            scope: w.scope,
            key: w.key.to_owned(),
            what: w.what.as_str(),
            limit: w.limit,
            retry_after: Duration::from_nanos(w.wait),
            kind: w.kind,
            decided_at: now,
        }));
    }
    if commit == Commit::No {
        return Ok(());
    }
    let mut leases = Vec::new();
    if commit == Commit::Leased && fleet.leased() {
        let lease_key = |s: usize, key: &str, what: What, per: Duration| LeaseKey::Budget {
            scope: s,
            key: key.to_owned(),
            recipients: what == What::Recipients,
            per_ms: u64::try_from(per.as_millis()).unwrap_or(u64::MAX),
        };
        let mut need = Vec::new();
        policy.each_limit(&keys, first, |s, key, what, limit| {
            let k = lease_key(s, key, what, limit.rate.per);
            match fleet.need(&k, LeaseLimit::Rate(limit.rate), now) {
                Some(r) => need.push(r),
                None => leases.push(k),
            }
        });
        if let Some((d, ramp)) = ramp
            && let (_, Some(cap)) = ramp.today(now)
        {
            let k = LeaseKey::Warmup {
                domain: d.to_owned(),
                day: day_of(now),
            };
            match fleet.need(&k, LeaseLimit::Cap(cap), now) {
                Some(r) => need.push(r),
                None => leases.push(k),
            }
        }
        if !need.is_empty() {
            return Err(Charge::Need(need));
        }
    }
    for k in &leases {
        fleet.take(k);
    }
    {
        policy.each_limit(&keys, first, |s, key, what, limit| {
            let limit = &eff(limit);
            let slot = slot_mut(&mut slots[s], key, what, limit.rate.per);
            slot.gcra = slot.current(now, limit);
            slot.interval = limit.rate.interval_ns();
            slot.gcra.charge(now, limit, 1.0, 1);
        });
        if let Some((d, _)) = ramp {
            match days.get_mut(d) {
                Some(c) => c.add(now, 1),
                None => {
                    let mut c = DayCounter::default();
                    c.add(now, 1);
                    days.insert(d.to_owned(), c);
                }
            }
        }
    }
    Ok(())
}

/// A day cap at a share of it (at least 1 while the cap is).
fn at_share(cap: u64, share: f64) -> u64 {
    if share >= 1.0 || cap == 0 {
        cap
    } else {
        ((cap as f64 * share).ceil() as u64).max(1)
    }
}

// ---------------------------------------------------------------------------
// Warm-up

/// `[[warmup]]`: a new sender domain's ramp, as recipients per UTC day.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmupConfig {
    pub sender_domain: String,
    /// The first day of the ramp, `YYYY-MM-DD` (UTC). Before it, day 1's cap
    /// applies.
    pub start: String,
    /// Caps for day 1, 2, …; after the list ends the ramp is over.
    #[serde(default)]
    pub daily: Vec<u64>,
    /// Instead of `daily`: day n's cap is `first · growth^(n-1)` (rounded
    /// down) until it reaches `until`, when the ramp is over.
    pub growth: Option<f64>,
    pub first: Option<u64>,
    pub until: Option<u64>,
}

/// The caps of a ramp, by day.
#[derive(Debug, Clone, PartialEq)]
pub enum Schedule {
    Daily(Vec<u64>),
    Growth { first: u64, growth: f64, until: u64 },
}

/// One sender domain's ramp, compiled.
#[derive(Debug, Clone, PartialEq)]
pub struct Ramp {
    /// The first day, in days since the Unix epoch (UTC).
    pub start_day: u64,
    pub schedule: Schedule,
}

impl Ramp {
    /// The cap on day `day_index` of the ramp (0 = day 1); `None`: the ramp
    /// is over, no cap.
    pub fn cap(&self, day_index: u64) -> Option<u64> {
        match &self.schedule {
            Schedule::Daily(caps) => usize::try_from(day_index).ok().and_then(|i| caps.get(i).copied()),
            Schedule::Growth { first, growth, until } => {
                let c = *first as f64 * growth.powf(day_index as f64);
                // A hair over, so that 100 · 1.1² = 120.999… counts as 121.
                let c = (c + 1e-6).floor();
                if !c.is_finite() || c >= *until as f64 {
                    None
                } else {
                    Some(c as u64)
                }
            }
        }
    }

    /// Today's 1-based day of the ramp (0 before the start) and its cap
    /// (day 1's before the start; `None` once the ramp is over).
    pub fn today(&self, now: Nanos) -> (u64, Option<u64>) {
        let today = day_of(now);
        let cap = self.cap(today.saturating_sub(self.start_day));
        let day = if today < self.start_day {
            0
        } else {
            today - self.start_day + 1
        };
        (day, cap)
    }
}

/// All warm-up ramps, by lowercase sender domain. Replaced whole on reload.
#[derive(Debug, Clone, Default)]
pub struct WarmupPolicy {
    pub ramps: HashMap<String, Ramp>,
}

/// One ramp's state for the admin API.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WarmupView {
    pub sender_domain: String,
    /// `YYYY-MM-DD`.
    pub start: String,
    /// 1-based day of the ramp; 0 before the start (day 1's cap applies).
    pub day: u64,
    /// `None` once the ramp is over.
    pub cap_today: Option<u64>,
    /// Recipients accepted today (UTC) for the domain.
    pub sent_today: u64,
    pub ramp_over: bool,
}

fn cfg_err(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        message: message.into(),
    }
}

/// Validate and compile `[[warmup]]`; every error names its key.
pub fn compile_warmups(list: &[WarmupConfig]) -> Result<Arc<WarmupPolicy>, ConfigError> {
    let mut ramps = HashMap::new();
    let mut seen = HashSet::new();
    for (i, w) in list.iter().enumerate() {
        let k = format!("warmup[{i}]");
        let domain = w.sender_domain.trim().trim_end_matches('.').to_ascii_lowercase();
        if domain.is_empty()
            || !domain.contains('.')
            || domain.contains('@')
            || domain.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(cfg_err(
                format!("{k}.sender_domain"),
                format!("{:?} is not a domain name", w.sender_domain),
            ));
        }
        if !seen.insert(domain.clone()) {
            return Err(cfg_err(
                format!("{k}.sender_domain"),
                format!("a warm-up for {domain:?} is already defined"),
            ));
        }
        let start_day = parse_date(&w.start).map_err(|m| cfg_err(format!("{k}.start"), m))?;
        let schedule = if !w.daily.is_empty() {
            for (field, set) in [
                ("growth", w.growth.is_some()),
                ("first", w.first.is_some()),
                ("until", w.until.is_some()),
            ] {
                if set {
                    return Err(cfg_err(
                        format!("{k}.{field}"),
                        "give either daily or growth, first and until",
                    ));
                }
            }
            if let Some(j) = w.daily.iter().position(|&c| c == 0) {
                return Err(cfg_err(format!("{k}.daily[{j}]"), "a daily cap must be at least 1"));
            }
            Schedule::Daily(w.daily.clone())
        } else {
            let Some(growth) = w.growth else {
                return Err(cfg_err(
                    format!("{k}.daily"),
                    "required: a non-empty list of daily caps, or growth with first and until",
                ));
            };
            if !growth.is_finite() || growth <= 1.0 {
                return Err(cfg_err(
                    format!("{k}.growth"),
                    format!("{growth} is not a number above 1"),
                ));
            }
            let first = match w.first {
                Some(f) if f >= 1 => f,
                Some(_) => return Err(cfg_err(format!("{k}.first"), "must be at least 1")),
                None => return Err(cfg_err(format!("{k}.first"), "required with growth")),
            };
            let until = match w.until {
                Some(u) if u > first => u,
                Some(u) => {
                    return Err(cfg_err(
                        format!("{k}.until"),
                        format!("{u} is not above first ({first})"),
                    ));
                }
                None => return Err(cfg_err(format!("{k}.until"), "required with growth")),
            };
            Schedule::Growth { first, growth, until }
        };
        ramps.insert(domain, Ramp { start_day, schedule });
    }
    Ok(Arc::new(WarmupPolicy { ramps }))
}

/// `YYYY-MM-DD` → days since 1970-01-01.
fn parse_date(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a date like \"2026-03-01\" (YYYY-MM-DD, UTC)");
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| -> Result<u32, String> {
        let part = &s[r];
        if part.bytes().all(|c| c.is_ascii_digit()) {
            part.parse().map_err(|_| bad())
        } else {
            Err(bad())
        }
    };
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if y < 1970 {
        return Err(format!("{s:?}: the year must be 1970 or later"));
    }
    if !(1..=12).contains(&m) {
        return Err(format!("{s:?}: there is no month {m}"));
    }
    let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
    let len = match m {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    if !(1..=len).contains(&d) {
        return Err(format!("{s:?}: month {m} of {y} has no day {d}"));
    }
    Ok(crate::throttle::days_from_civil(i64::from(y), m, d) as u64)
}

fn format_date(day: u64) -> String {
    let (y, m, d) = crate::throttle::civil_from_days(day as i64);
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rate::policy::{BudgetConfig, BudgetRule};
    use crate::throttle::NS_PER_DAY;

    /// 2026-11-23 at `h:m:s` UTC.
    fn at(h: u64, m: u64, s: u64) -> Nanos {
        (parse_date("2026-11-23").unwrap() * 86_400 + h * 3600 + m * 60 + s) * NS_PER_SEC
    }

    fn secs(n: u64) -> Nanos {
        n * NS_PER_SEC
    }

    fn rule(scope: Scope, key: Option<&str>, messages: &[&str], recipients: &[&str]) -> BudgetRule {
        let l = |v: &[&str]| v.iter().map(|r| Limit::budget(r.parse().unwrap())).collect();
        BudgetRule {
            scope,
            key: key.map(String::from),
            messages: l(messages),
            recipients: l(recipients),
        }
    }

    fn budgets(rules: Vec<BudgetRule>) -> Budgets {
        Budgets::new(Arc::new(BudgetPolicy { rules }), Arc::default())
    }

    fn who<'a>(tenant: &'a str, credential: Option<&'a str>, domain: Option<&'a str>) -> Who<'a> {
        Who {
            tenant,
            credential,
            sender_domain: domain,
        }
    }

    /// Charge `n` single-recipient messages; all must pass.
    fn send(b: &Budgets, now: Nanos, w: &Who, n: usize) {
        for i in 0..n {
            b.charge_recipient(now, w, true)
                .unwrap_or_else(|o| panic!("message {i} refused: {}", o.reply()));
        }
    }

    #[test]
    fn tenant_budget_and_retry_after() {
        let b = budgets(vec![rule(Scope::Tenant, Some("acme"), &["5/min"], &[])]);
        let w = who("acme", None, None);
        let t = at(2, 29, 0);
        send(&b, t, &w, 5);
        let o = b.charge_recipient(t, &w, true).unwrap_err();
        assert_eq!((o.scope, o.key.as_str(), o.what), (Scope::Tenant, "acme", "messages"));
        assert_eq!(o.limit.to_string(), "5/min");
        assert_eq!(o.retry_after, Duration::from_secs(12));
        assert_eq!(o.kind, OverKind::Budget);
        assert_eq!(o.retry_at(), UNIX_EPOCH + Duration::from_nanos(t + secs(12)));
        // Further recipients of an accepted message charge no message.
        b.charge_recipient(t, &w, false).unwrap();
        // Another tenant is not limited.
        send(&b, t, &who("other", None, None), 50);
        // Refill: one message per 12 s.
        assert!(b.peek_recipient(t + secs(11), &w, true).is_err());
        send(&b, t + secs(12), &w, 1);
        assert!(b.peek_recipient(t + secs(12), &w, true).is_err());
        send(&b, t + secs(60), &w, 4);
        assert!(b.peek_recipient(t + secs(60), &w, true).is_err());
    }

    #[test]
    fn credential_and_sender_domain_scopes() {
        let b = budgets(vec![
            rule(Scope::Credential, Some("agent-1"), &["2/h"], &[]),
            rule(Scope::SenderDomain, Some("Example.COM"), &[], &["3/day"]),
        ]);
        let t = at(10, 0, 0);
        // Credential scope only with a credential.
        send(&b, t, &who("acme", None, None), 10);
        let w = who("acme", Some("agent-1"), None);
        send(&b, t, &w, 2);
        let o = b.charge_recipient(t, &w, true).unwrap_err();
        assert_eq!((o.scope, o.key.as_str()), (Scope::Credential, "agent-1"));
        assert_eq!(o.retry_after, Duration::from_secs(1800));
        send(&b, t, &who("acme", Some("agent-2"), None), 3);
        // Sender domain, any case; not without a sender domain.
        let d = who("acme", None, Some("EXAMPLE.com"));
        send(&b, t, &d, 3);
        let o = b
            .charge_recipient(t, &who("beta", None, Some("example.com")), true)
            .unwrap_err();
        assert_eq!(
            (o.scope, o.key.as_str(), o.what),
            (Scope::SenderDomain, "example.com", "recipients")
        );
        assert_eq!(o.retry_after, Duration::from_secs(28_800));
        send(&b, t, &who("acme", None, Some("example.org")), 5);
    }

    #[test]
    fn generic_counts_each_key_and_specific_overrides() {
        let b = budgets(vec![
            rule(Scope::Tenant, None, &["2/min"], &[]),
            rule(Scope::Tenant, Some("big"), &["10/min"], &[]),
        ]);
        let t = at(3, 0, 0);
        for tenant in ["a", "b", "c"] {
            let w = who(tenant, None, None);
            send(&b, t, &w, 2);
            assert!(b.peek_recipient(t, &w, true).is_err(), "{tenant}");
        }
        // "big" has its own rule only: 10, not 10 and 2.
        let w = who("big", None, None);
        send(&b, t, &w, 10);
        let o = b.peek_recipient(t, &w, true).unwrap_err();
        assert_eq!(o.limit.count, 10);
    }

    #[test]
    fn all_or_nothing_across_limits() {
        // Recipients run out first; the refused first RCPT must not charge
        // the messages limit.
        let b = budgets(vec![rule(Scope::Tenant, None, &["3/min"], &["4/min"])]);
        let w = who("acme", None, None);
        let t = at(4, 0, 0);
        b.charge_recipient(t, &w, true).unwrap();
        b.charge_recipient(t, &w, false).unwrap();
        b.charge_recipient(t, &w, false).unwrap();
        b.charge_recipient(t, &w, true).unwrap();
        let o = b.charge_recipient(t, &w, true).unwrap_err();
        assert_eq!(o.what, "recipients");
        // Two messages used so far; the refusal took none. After one
        // recipient interval (15 s) one more message passes; a fourth would
        // not have passed if the refusal had charged the third.
        b.charge_recipient(t + secs(15), &w, true).unwrap();
        // Both limits are now in the way; the recipients one is the longer wait.
        let o = b.peek_recipient(t + secs(15), &w, true).unwrap_err();
        assert_eq!((o.what, o.retry_after), ("recipients", Duration::from_secs(15)));

        // The other way round: the message limit refuses, recipients untouched.
        let b = budgets(vec![rule(Scope::Tenant, None, &["1/min"], &["2/min"])]);
        b.charge_recipient(t, &w, true).unwrap();
        assert_eq!(b.charge_recipient(t, &w, true).unwrap_err().what, "messages");
        b.charge_recipient(t, &w, false).unwrap();
        assert_eq!(b.charge_recipient(t, &w, false).unwrap_err().what, "recipients");
    }

    #[test]
    fn all_or_nothing_across_scopes() {
        let b = budgets(vec![
            rule(Scope::Tenant, None, &["3/min"], &[]),
            rule(Scope::Credential, None, &["1/min"], &[]),
        ]);
        let t = at(5, 0, 0);
        send(&b, t, &who("acme", Some("a1"), None), 1);
        // a1 is over: the tenant budget is not charged by the refusal.
        for _ in 0..3 {
            assert_eq!(
                b.charge_recipient(t, &who("acme", Some("a1"), None), true)
                    .unwrap_err()
                    .scope,
                Scope::Credential
            );
        }
        send(&b, t, &who("acme", Some("a2"), None), 1);
        send(&b, t, &who("acme", Some("a3"), None), 1);
        let o = b.charge_recipient(t, &who("acme", Some("a4"), None), true).unwrap_err();
        assert_eq!(o.scope, Scope::Tenant);
    }

    #[test]
    fn first_of_message_charges_messages_once() {
        let b = budgets(vec![rule(Scope::Tenant, None, &["2/h"], &["100/h"])]);
        let w = who("acme", None, None);
        let t = at(6, 0, 0);
        for first in [true, false, false, false, true, false] {
            b.charge_recipient(t, &w, first).unwrap();
        }
        assert_eq!(b.peek_recipient(t, &w, true).unwrap_err().what, "messages");
        b.peek_recipient(t, &w, false).unwrap();
    }

    #[test]
    fn peek_does_not_consume() {
        let b = budgets(vec![rule(Scope::Tenant, None, &["1/min"], &["1/min"])]);
        let w = who("acme", None, None);
        let t = at(7, 0, 0);
        for _ in 0..10 {
            b.peek_recipient(t, &w, true).unwrap();
        }
        assert_eq!(b.counters(), 0);
        b.charge_recipient(t, &w, true).unwrap();
        let a = b.peek_recipient(t, &w, true).unwrap_err();
        let c = b.charge_recipient(t, &w, true).unwrap_err();
        assert_eq!(a, c);
    }

    #[test]
    fn over_names_the_longest_wait() {
        let b = budgets(vec![
            rule(Scope::Tenant, None, &["10/min"], &["1/s"]),
            rule(Scope::SenderDomain, None, &["1/h"], &[]),
        ]);
        let w = who("acme", None, Some("example.com"));
        let t = at(8, 0, 0);
        b.charge_recipient(t, &w, true).unwrap();
        let o = b.charge_recipient(t, &w, true).unwrap_err();
        assert_eq!((o.scope, o.what), (Scope::SenderDomain, "messages"));
        assert_eq!(o.retry_after, Duration::from_secs(3600));
        // A later recipient of the same message: only the 1/s is in the way.
        let o = b.charge_recipient(t, &w, false).unwrap_err();
        assert_eq!(
            (o.scope, o.what, o.retry_after),
            (Scope::Tenant, "recipients", Duration::from_secs(1))
        );
    }

    #[test]
    fn reload_keeps_counters_and_sweep_drops_idle() {
        let b = budgets(vec![rule(Scope::Tenant, None, &["4/min"], &[])]);
        let w = who("acme", None, None);
        let t = at(9, 0, 0);
        send(&b, t, &w, 4);
        // Doubling the count for the same period: half of it is used.
        b.set_policy(
            Arc::new(BudgetPolicy {
                rules: vec![rule(Scope::Tenant, None, &["8/min"], &[])],
            }),
            Arc::default(),
        );
        send(&b, t, &w, 4);
        assert!(b.peek_recipient(t, &w, true).is_err());
        send(&b, t, &who("other", None, None), 1);
        assert_eq!(b.counters(), 2);
        assert_eq!(b.sweep(t + secs(30)), 1, "other is full again after 7.5 s");
        assert_eq!(b.sweep(t + secs(60)), 1);
        assert_eq!(b.counters(), 0);
        b.peek_recipient(t + secs(60), &w, true).unwrap();
    }

    fn warm(domain: &str, start: &str, daily: &[u64]) -> WarmupConfig {
        WarmupConfig {
            sender_domain: domain.into(),
            start: start.into(),
            daily: daily.to_vec(),
            growth: None,
            first: None,
            until: None,
        }
    }

    fn growth(g: f64, first: u64, until: u64) -> WarmupConfig {
        WarmupConfig {
            daily: vec![],
            growth: Some(g),
            first: Some(first),
            until: Some(until),
            ..warm("example.com", "2026-11-21", &[])
        }
    }

    #[test]
    fn ramp_caps_table() {
        let p = compile_warmups(&[warm("a.example", "2026-11-21", &[50, 100, 200])]).unwrap();
        let daily = &p.ramps["a.example"];
        for (day, cap) in [
            (0, Some(50)),
            (1, Some(100)),
            (2, Some(200)),
            (3, None),
            (u64::MAX, None),
        ] {
            assert_eq!(daily.cap(day), cap, "daily day index {day}");
        }
        let p = compile_warmups(&[growth(2.0, 50, 1000)]).unwrap();
        let g = &p.ramps["example.com"];
        for (day, cap) in [
            (0, Some(50)),
            (1, Some(100)),
            (2, Some(200)),
            (3, Some(400)),
            (4, Some(800)),
            (5, None),
            (10_000, None),
        ] {
            assert_eq!(g.cap(day), cap, "growth day index {day}");
        }
        let p = compile_warmups(&[growth(1.1, 100, 200)]).unwrap();
        let g = &p.ramps["example.com"];
        for (day, cap) in [
            (1, Some(110)),
            (2, Some(121)),
            (3, Some(133)),
            (7, Some(194)),
            (8, None),
        ] {
            assert_eq!(g.cap(day), cap, "growth 1.1 day index {day}");
        }
        // Start 2026-11-21: 2026-11-23 is day 3; before the start, day 1's cap.
        assert_eq!(daily.today(at(12, 0, 0)), (3, Some(200)));
        assert_eq!(daily.today(at(12, 0, 0) - 3 * NS_PER_DAY), (0, Some(50)));
        assert_eq!(daily.today(at(12, 0, 0) - 2 * NS_PER_DAY), (1, Some(50)));
        assert_eq!(daily.today(at(12, 0, 0) + NS_PER_DAY), (4, None));
    }

    fn warm_budgets(list: &[WarmupConfig]) -> Budgets {
        Budgets::new(Arc::default(), compile_warmups(list).unwrap())
    }

    #[test]
    fn warmup_caps_recipients_per_day() {
        let b = warm_budgets(&[warm("Example.com", "2026-11-22", &[2, 3])]);
        let w = who("acme", None, Some("example.COM"));
        let t = at(23, 59, 0);
        b.charge_recipient(t, &w, true).unwrap();
        b.charge_recipient(t, &w, false).unwrap();
        b.charge_recipient(t, &w, false).unwrap();
        b.peek_recipient(t, &w, true).unwrap_err();
        let o = b.charge_recipient(t, &w, true).unwrap_err();
        assert_eq!(o.kind, OverKind::Warmup { day: 2, cap: 3 });
        assert_eq!(
            (o.scope, o.key.as_str(), o.what),
            (Scope::SenderDomain, "example.com", "recipients")
        );
        assert_eq!(o.retry_after, Duration::from_secs(60));
        assert_eq!(
            o.retry_at(),
            UNIX_EPOCH + Duration::from_nanos(at(0, 0, 0) + NS_PER_DAY)
        );
        // Other domains are not ramped.
        send(&b, t, &who("acme", None, Some("other.example")), 20);
        assert_eq!(
            b.warmup_status(t),
            vec![WarmupView {
                sender_domain: "example.com".into(),
                start: "2026-11-22".into(),
                day: 2,
                cap_today: Some(3),
                sent_today: 3,
                ramp_over: false,
            }]
        );
        // Midnight: day 3, the list is over.
        let next = at(0, 0, 0) + NS_PER_DAY;
        send(&b, next, &w, 100);
        let v = &b.warmup_status(next)[0];
        assert_eq!((v.day, v.cap_today, v.sent_today, v.ramp_over), (3, None, 100, true));
        assert_eq!(b.sweep(next + NS_PER_DAY), 1);
    }

    #[test]
    fn warmup_before_start_and_midnight_reset() {
        let b = warm_budgets(&[growth(2.0, 2, 100)]);
        let w = who("acme", None, Some("example.com"));
        // Start 2026-11-21, three days before: day 1's cap.
        let t = at(12, 0, 0) - 5 * NS_PER_DAY;
        send(&b, t, &w, 2);
        let o = b.charge_recipient(t, &w, true).unwrap_err();
        assert_eq!(o.kind, OverKind::Warmup { day: 0, cap: 2 });
        assert_eq!(o.retry_after, Duration::from_secs(12 * 3600));
        let r = o.reply().to_wire();
        assert!(r.contains("has not started"), "{r}");
        // Next day (still before the start): the count starts again.
        send(&b, t + NS_PER_DAY, &w, 2);
        // 2026-11-23 is day 3: 2·2² = 8.
        let t = at(1, 0, 0);
        send(&b, t, &w, 8);
        assert_eq!(
            b.peek_recipient(t, &w, false).unwrap_err().kind,
            OverKind::Warmup { day: 3, cap: 8 }
        );
    }

    #[test]
    fn warmup_and_budget_together_all_or_nothing() {
        let b = Budgets::new(
            Arc::new(BudgetPolicy {
                rules: vec![rule(Scope::Tenant, None, &[], &["2/min"])],
            }),
            compile_warmups(&[warm("example.com", "2026-11-23", &[3])]).unwrap(),
        );
        let w = who("acme", None, Some("example.com"));
        let t = at(10, 0, 0);
        send(&b, t, &w, 2);
        // The tenant budget refuses: the warm-up day is not charged.
        assert_eq!(b.charge_recipient(t, &w, true).unwrap_err().kind, OverKind::Budget);
        assert_eq!(b.warmup_status(t)[0].sent_today, 2);
        // The warm-up cap is the longer wait once it is reached.
        send(&b, t + secs(60), &w, 1);
        let o = b.charge_recipient(t + secs(60), &w, true).unwrap_err();
        assert_eq!(o.kind, OverKind::Warmup { day: 1, cap: 3 });
        assert_eq!(o.token(), TOKEN_WARMUP);
    }

    #[test]
    fn reply_shape() {
        let b = budgets(vec![rule(Scope::Tenant, None, &["100/min"], &[])]);
        let w = who("acme", None, None);
        let t = at(2, 29, 23) + 500 * crate::throttle::NS_PER_MS;
        send(&b, t, &w, 100);
        let o = b.charge_recipient(t, &w, true).unwrap_err();
        assert_eq!(o.retry_after, Duration::from_millis(600));
        assert_eq!(o.retry_after_secs(), 1);
        let r = o.reply();
        assert_eq!((r.code, r.token), (451, Some(TOKEN_BUDGET)));
        assert_eq!(
            r.to_wire(),
            "451 4.7.1 Submission budget exceeded: tenant \"acme\" may submit 100 messages per minute; \
             try again in 1 s (at 2026-11-23T02:29:25Z) (sendguard:budget_exceeded)\r\n"
        );

        let b = warm_budgets(&[warm("example.com", "2026-11-21", &[1, 5, 200])]);
        let w = who("acme", None, Some("example.com"));
        send(&b, at(23, 0, 0), &w, 200);
        let r = b
            .charge_recipient(at(23, 0, 0), &w, true)
            .unwrap_err()
            .reply()
            .to_wire();
        assert_eq!(
            r,
            "451 4.7.1 Sender domain \"example.com\" is warming up: day 3 of its ramp allows 200 recipients \
             today; try again in 3600 s (at 2026-11-24T00:00:00Z) (sendguard:warmup_limit)\r\n"
        );

        // Long, hostile keys: one line, printable, under 500 bytes.
        let key = format!("{}\r\n250 ok\u{e9}\"", "x".repeat(400));
        let b = budgets(vec![rule(Scope::Credential, None, &[], &["1/90s"])]);
        let w = who("acme", Some(&key), None);
        send(&b, t, &w, 1);
        let o = b.charge_recipient(t, &w, true).unwrap_err();
        assert_eq!(o.key, key);
        let wire = o.reply().to_wire();
        assert!(
            wire.starts_with("451 4.7.1 Submission budget exceeded: credential \"xxx"),
            "{wire}"
        );
        assert!(wire.contains("may submit 1 recipient per 1m 30s"), "{wire}");
        assert!(wire.ends_with(" (sendguard:budget_exceeded)\r\n"), "{wire}");
        assert!(wire.len() < 500, "{} bytes", wire.len());
        assert_eq!(wire.matches("\r\n").count(), 1);
        assert!(wire.trim_end().bytes().all(|c| (b' '..=b'~').contains(&c)), "{wire}");
    }

    #[test]
    fn dates() {
        for (s, day) in [
            ("1970-01-01", 0),
            ("2000-02-29", 11_016),
            ("2026-11-23", 20_780),
            ("2024-12-31", 20_088),
        ] {
            assert_eq!(parse_date(s), Ok(day), "{s}");
            assert_eq!(format_date(day), s);
        }
        assert_eq!(
            super::super::format_time(1_795_400_963 * NS_PER_SEC),
            "2026-11-23T02:29:23Z"
        );
        for bad in [
            "",
            "2026-1-01",
            "2026/11/23",
            "2026-13-01",
            "2026-00-10",
            "2026-02-29",
            "2100-02-29",
            "2026-04-31",
            "1969-12-31",
            "+026-11-23",
            "2026-11-2x",
            "2026-11-23T00:00",
        ] {
            assert!(parse_date(bad).is_err(), "{bad:?} accepted");
        }
        parse_date("2024-02-29").unwrap();
    }

    #[test]
    fn warmup_config_errors_name_the_key() {
        let cases: Vec<(Vec<WarmupConfig>, &str)> = vec![
            (vec![warm("", "2026-11-23", &[1])], "warmup[0].sender_domain"),
            (
                vec![warm("user@example.com", "2026-11-23", &[1])],
                "warmup[0].sender_domain",
            ),
            (
                vec![
                    warm("a.example", "2026-11-23", &[1]),
                    warm("A.example.", "2026-11-23", &[1]),
                ],
                "warmup[1].sender_domain",
            ),
            (
                vec![
                    warm("a.example", "2026-11-23", &[1]),
                    warm("b.example", "23.11.2026", &[1]),
                ],
                "warmup[1].start",
            ),
            (vec![warm("a.example", "2026-11-23", &[])], "warmup[0].daily"),
            (vec![warm("a.example", "2026-11-23", &[5, 0])], "warmup[0].daily[1]"),
            (
                vec![WarmupConfig {
                    growth: Some(2.0),
                    ..warm("a.example", "2026-11-23", &[5])
                }],
                "warmup[0].growth",
            ),
            (
                vec![WarmupConfig {
                    until: Some(9),
                    ..warm("a.example", "2026-11-23", &[5])
                }],
                "warmup[0].until",
            ),
            (vec![growth(1.0, 10, 100)], "warmup[0].growth"),
            (vec![growth(f64::NAN, 10, 100)], "warmup[0].growth"),
            (vec![growth(f64::INFINITY, 10, 100)], "warmup[0].growth"),
            (vec![growth(1.5, 0, 100)], "warmup[0].first"),
            (vec![growth(1.5, 100, 100)], "warmup[0].until"),
            (
                vec![WarmupConfig {
                    first: None,
                    ..growth(1.5, 10, 100)
                }],
                "warmup[0].first",
            ),
            (
                vec![WarmupConfig {
                    until: None,
                    ..growth(1.5, 10, 100)
                }],
                "warmup[0].until",
            ),
            (
                vec![WarmupConfig {
                    growth: None,
                    ..growth(1.5, 10, 100)
                }],
                "warmup[0].daily",
            ),
        ];
        for (list, key) in cases {
            let e = compile_warmups(&list).unwrap_err();
            assert_eq!(e.key, key, "{}", e.message);
            assert!(!e.message.is_empty());
        }
    }

    #[test]
    fn warmup_toml_shape() {
        #[derive(Deserialize)]
        struct Top {
            warmup: Vec<WarmupConfig>,
        }
        let top: Top = toml::from_str(
            r#"
            [[warmup]]
            sender_domain = "News.Example.com"
            start = "2026-11-20"
            daily = [50, 100, 250, 500, 1000]

            [[warmup]]
            sender_domain = "mail.example.org"
            start = "2026-12-01"
            growth = 1.5
            first = 100
            until = 20000
            "#,
        )
        .unwrap();
        let p = compile_warmups(&top.warmup).unwrap();
        assert_eq!(p.ramps["news.example.com"].cap(4), Some(1000));
        assert_eq!(p.ramps["mail.example.org"].cap(1), Some(150));
        let e = toml::from_str::<Top>("[[warmup]]\nsender_domain = \"a.b\"\nstart = \"2026-11-20\"\ncap = 5\n");
        assert!(e.is_err(), "unknown keys refused");
        // And the budgets' own config compiles into what Budgets runs on.
        let c: BudgetConfig = toml::from_str("scope = \"tenant\"\nmatch = \"acme\"\nmessages = [\"1/min\"]").unwrap();
        let b = Budgets::new(BudgetPolicy::compile(&[c]).unwrap(), p);
        let w = who("acme", None, None);
        send(&b, at(1, 0, 0), &w, 1);
        assert!(b.peek_recipient(at(1, 0, 0), &w, true).is_err());
    }
}
