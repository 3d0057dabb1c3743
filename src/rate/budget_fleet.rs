//! Submission budgets and warm-up caps across a fleet.
//!
//! - `Local` (one node): the counters in [`super::budget`] are the truth.
//! - `Leased` (Redis up): each budget limit is also one GCRA in Redis, and
//!   each warm-up day one counter; a recipient is accepted only with a
//!   token of every limit it falls under. Tokens are leased in small
//!   batches (`cluster::budgets` asks, at most 5% of a budget or 2% of a
//!   warm-up day per batch) and lapse [`LEASE_TTL`] after they were
//!   granted; lapsed tokens are given back to Redis (`cluster::budgets`
//!   refunds them), so a lease costs the fleet only what was used. The
//!   local counters still run, as an upper bound per node.
//! - `FairShare` (Redis unavailable): every budget and cap at this node's
//!   share, limit ÷ last known live nodes.
//!
//! Pure state; the I/O is in `cluster::budgets`.

use std::collections::HashMap;

use super::fleet::Mode;
use crate::throttle::{Nanos, Rate};

/// How long leased budget tokens stay usable.
pub const LEASE_TTL: Nanos = 10_000_000_000;

/// Which counter a lease draws on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LeaseKey {
    /// A budget limit: scope index, key, messages (false) or recipients
    /// (true), period in seconds.
    Budget {
        scope: usize,
        key: String,
        recipients: bool,
        per_ms: u64,
    },
    /// A sender domain's warm-up day (days since the epoch).
    Warmup { domain: String, day: u64 },
}

impl LeaseKey {
    /// The Redis key (under the fleet's prefix).
    pub fn redis_name(&self) -> String {
        match self {
            LeaseKey::Budget {
                scope,
                key,
                recipients,
                per_ms,
            } => format!("budget:{scope}:{}:{per_ms}:{key}", if *recipients { "r" } else { "m" }),
            LeaseKey::Warmup { domain, day } => format!("warmup:{day}:{domain}"),
        }
    }
}

/// What Redis counts for a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseLimit {
    /// GCRA: `rate.count` per `rate.per`, all of it at once at most.
    Rate(Rate),
    /// At most `cap` in the day.
    Cap(u64),
}

/// Tokens this node needs before it may accept the recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRequest {
    pub key: LeaseKey,
    pub limit: LeaseLimit,
    /// How many to ask for.
    pub ask: u32,
}

#[derive(Debug)]
struct Lease {
    tokens: u32,
    expires: Nanos,
    /// Used since the last grant (the next batch is twice that, capped).
    used: u32,
    limit: LeaseLimit,
    /// The rate's tat in Redis (µs) right after the last grant: a refund
    /// gives back only what of it the bucket has not refilled since.
    tat_us: u64,
}

/// Tokens leased and not used: to give back to Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refund {
    pub key: LeaseKey,
    pub limit: LeaseLimit,
    pub tokens: u32,
    /// See `Lease::tat_us` (0 for caps).
    pub tat_us: u64,
}

/// Tokens a caller obtained from Redis for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub req: LeaseRequest,
    pub tokens: u32,
    /// The rate's tat after the lease (µs, Redis's clock; 0 for caps).
    pub tat_us: u64,
}

/// The budgets' fleet state.
#[derive(Debug)]
pub struct BudgetFleet {
    mode: Mode,
    leases: HashMap<LeaseKey, Lease>,
    refunds: Vec<Refund>,
}

impl Default for BudgetFleet {
    fn default() -> Self {
        BudgetFleet {
            mode: Mode::Local,
            leases: HashMap::new(),
            refunds: Vec::new(),
        }
    }
}

impl BudgetFleet {
    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn set_mode(&mut self, mode: Mode) {
        if !matches!(mode, Mode::Leased { .. }) {
            // Given back when Redis returns (the refunds wait for it).
            for (key, l) in self.leases.drain() {
                if l.tokens > 0 {
                    self.refunds.push(Refund {
                        key,
                        limit: l.limit,
                        tokens: l.tokens,
                        tat_us: l.tat_us,
                    });
                }
            }
        }
        self.mode = mode;
    }

    /// Tokens to give back to Redis (taken out: the caller sends them).
    pub fn take_refunds(&mut self) -> Vec<Refund> {
        std::mem::take(&mut self.refunds)
    }

    /// Put back refunds that could not be sent (at most 10,000 wait).
    pub fn keep_refunds(&mut self, mut r: Vec<Refund>) {
        r.truncate(10_000usize.saturating_sub(self.refunds.len()));
        self.refunds.extend(r);
    }

    pub fn leased(&self) -> bool {
        matches!(self.mode, Mode::Leased { .. })
    }

    /// This node's share of a budget: 1, or 1 / live nodes without Redis.
    pub fn share(&self) -> f64 {
        match self.mode {
            Mode::FairShare { nodes } => 1.0 / f64::from(nodes.max(1)),
            _ => 1.0,
        }
    }

    /// `None` when a live token is held for `key`; else the request for more.
    pub fn need(&mut self, key: &LeaseKey, limit: LeaseLimit, now: Nanos) -> Option<LeaseRequest> {
        self.lapse(key, now);
        let l = self.leases.get(key);
        if l.is_some_and(|l| l.tokens > 0) {
            return None;
        }
        let most = match limit {
            LeaseLimit::Rate(r) => (r.count / 20).max(1),
            LeaseLimit::Cap(c) => u32::try_from(c / 50).unwrap_or(u32::MAX).max(1),
        };
        let used = l.map_or(0, |l| l.used);
        Some(LeaseRequest {
            key: key.clone(),
            limit,
            ask: used.saturating_mul(2).clamp(1, most),
        })
    }

    /// A live token is held for `key`.
    pub fn holds(&self, key: &LeaseKey, now: Nanos) -> bool {
        self.leases.get(key).is_some_and(|l| l.tokens > 0 && l.expires > now)
    }

    /// One token of `key` used (the caller checked [`BudgetFleet::need`]).
    pub fn take(&mut self, key: &LeaseKey) {
        if let Some(l) = self.leases.get_mut(key) {
            l.tokens = l.tokens.saturating_sub(1);
            l.used = l.used.saturating_add(1);
        }
    }

    /// A lease past its time: its unused tokens become a refund.
    fn lapse(&mut self, key: &LeaseKey, now: Nanos) {
        if let Some(l) = self.leases.get_mut(key)
            && l.expires <= now
            && l.tokens > 0
        {
            self.refunds.push(Refund {
                key: key.clone(),
                limit: l.limit,
                tokens: l.tokens,
                tat_us: l.tat_us,
            });
            l.tokens = 0;
        }
    }

    /// Tokens obtained (added to any still held for the key).
    pub fn grant(&mut self, g: &Grant, now: Nanos) {
        let (key, n) = (&g.req.key, g.tokens);
        if n == 0 {
            return;
        }
        if !self.leased() {
            // Obtained just as Redis went away: give them back later.
            self.refunds.push(Refund {
                key: key.clone(),
                limit: g.req.limit,
                tokens: n,
                tat_us: g.tat_us,
            });
            return;
        }
        self.lapse(key, now);
        let l = self.leases.entry(key.clone()).or_insert(Lease {
            tokens: 0,
            expires: 0,
            used: 0,
            limit: g.req.limit,
            tat_us: 0,
        });
        l.tokens = l.tokens.saturating_add(n);
        l.expires = now + LEASE_TTL;
        l.used = 0;
        l.limit = g.req.limit;
        l.tat_us = l.tat_us.max(g.tat_us);
    }

    /// Lapse every lease past its time (their tokens become refunds),
    /// keeping what they tell about the demand.
    pub fn lapse_all(&mut self, now: Nanos) {
        let keys: Vec<LeaseKey> = self
            .leases
            .iter()
            .filter(|(_, l)| l.expires <= now && l.tokens > 0)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &keys {
            self.lapse(k, now);
        }
    }

    /// Lapse expired leases (their tokens become refunds) and forget them.
    pub fn sweep(&mut self, now: Nanos) {
        let keys: Vec<LeaseKey> = self.leases.keys().cloned().collect();
        for k in &keys {
            self.lapse(k, now);
        }
        self.leases.retain(|_, l| l.expires > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn grant(key: LeaseKey, limit: LeaseLimit, tokens: u32) -> Grant {
        Grant {
            req: LeaseRequest {
                key,
                limit,
                ask: tokens,
            },
            tokens,
            tat_us: 77,
        }
    }

    fn key() -> LeaseKey {
        LeaseKey::Budget {
            scope: 0,
            key: "acme".into(),
            recipients: true,
            per_ms: 3_600_000,
        }
    }

    #[test]
    fn leases_shares_and_names() {
        let rate = Rate {
            count: 100,
            per: Duration::from_secs(3600),
        };
        let mut f = BudgetFleet::default();
        assert!(!f.leased());
        assert_eq!(f.share(), 1.0);
        f.set_mode(Mode::FairShare { nodes: 3 });
        assert!((f.share() - 1.0 / 3.0).abs() < 1e-9);

        f.set_mode(Mode::Leased { nodes: 3 });
        let r = f.need(&key(), LeaseLimit::Rate(rate), 0).unwrap();
        assert_eq!(r.ask, 1, "nothing used yet: one");
        f.grant(&grant(key(), LeaseLimit::Rate(rate), 2), 0);
        assert_eq!(f.need(&key(), LeaseLimit::Rate(rate), 1), None);
        f.take(&key());
        f.take(&key());
        // Two used: ask for four next time (at most 5% of 100).
        assert_eq!(f.need(&key(), LeaseLimit::Rate(rate), 1).unwrap().ask, 4);
        f.grant(&grant(key(), LeaseLimit::Rate(rate), 9), 2);
        f.take(&key());
        // Lapsed tokens are not usable: they are given back.
        assert!(f.need(&key(), LeaseLimit::Rate(rate), 2 + LEASE_TTL).is_some());
        assert_eq!(
            f.take_refunds(),
            vec![Refund {
                key: key(),
                limit: LeaseLimit::Rate(rate),
                tokens: 8,
                tat_us: 77
            }]
        );
        f.sweep(2 + LEASE_TTL);
        assert!(f.leases.is_empty());
        assert!(f.take_refunds().is_empty(), "refunded once");
        let w = LeaseKey::Warmup {
            domain: "new.example".into(),
            day: 20_000,
        };
        assert_eq!(w.redis_name(), "warmup:20000:new.example");
        assert_eq!(key().redis_name(), "budget:0:r:3600000:acme");
        assert_eq!(f.need(&w, LeaseLimit::Cap(1000), 0).unwrap().ask, 1);
        // Leaving leased mode drops every lease and refunds what it held;
        // tokens that arrive after it are refunded too.
        f.grant(&grant(w.clone(), LeaseLimit::Cap(1000), 5), 0);
        f.set_mode(Mode::FairShare { nodes: 2 });
        assert!(f.leases.is_empty());
        f.grant(&grant(w.clone(), LeaseLimit::Cap(1000), 2), 0);
        let r = f.take_refunds();
        assert_eq!(r.iter().map(|r| r.tokens).collect::<Vec<_>>(), vec![5, 2]);
        f.keep_refunds(r);
        assert_eq!(f.take_refunds().len(), 2);
    }
}
