//! Submission budgets and warm-up caps across a fleet.
//!
//! - `Local` (one node): the counters in [`super::budget`] are the truth.
//! - `Leased` (Redis up): each budget limit is also one GCRA in Redis, and
//!   each warm-up day one counter; a recipient is accepted only with a
//!   token of every limit it falls under. Tokens are leased in small
//!   batches (`cluster::budgets` asks, at most 5% of a budget or 2% of a
//!   warm-up day per batch) and expire after [`LEASE_TTL`] unused, so the
//!   fleet as a whole stays within each budget. The local counters still
//!   run, as an upper bound per node.
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
        per_secs: u64,
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
                per_secs,
            } => format!(
                "budget:{scope}:{}:{per_secs}:{key}",
                if *recipients { "r" } else { "m" }
            ),
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

#[derive(Debug, Default)]
struct Lease {
    tokens: u32,
    expires: Nanos,
    /// Used since the last grant (the next batch is twice that, capped).
    used: u32,
}

/// The budgets' fleet state.
#[derive(Debug)]
pub struct BudgetFleet {
    mode: Mode,
    leases: HashMap<LeaseKey, Lease>,
}

impl Default for BudgetFleet {
    fn default() -> Self {
        BudgetFleet {
            mode: Mode::Local,
            leases: HashMap::new(),
        }
    }
}

impl BudgetFleet {
    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn set_mode(&mut self, mode: Mode) {
        if !matches!(mode, Mode::Leased { .. }) {
            self.leases.clear();
        }
        self.mode = mode;
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

    /// A day cap at this node's share (at least 1 while the cap is).
    pub fn cap(&self, cap: u64) -> u64 {
        match self.mode {
            Mode::FairShare { nodes } if cap > 0 => cap.div_ceil(u64::from(nodes.max(1))),
            _ => cap,
        }
    }

    /// `None` when a live token is held for `key`; else the request for more.
    pub fn need(&self, key: &LeaseKey, limit: LeaseLimit, now: Nanos) -> Option<LeaseRequest> {
        let l = self.leases.get(key);
        if l.is_some_and(|l| l.tokens > 0 && l.expires > now) {
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

    /// One token of `key` used (the caller checked [`BudgetFleet::need`]).
    pub fn take(&mut self, key: &LeaseKey) {
        if let Some(l) = self.leases.get_mut(key) {
            l.tokens = l.tokens.saturating_sub(1);
            l.used = l.used.saturating_add(1);
        }
    }

    /// `n` tokens obtained for `key` (added to any still held).
    pub fn grant(&mut self, key: &LeaseKey, n: u32, now: Nanos) {
        if n == 0 || !self.leased() {
            return;
        }
        let l = self.leases.entry(key.clone()).or_default();
        if l.expires <= now {
            l.tokens = 0;
        }
        l.tokens = l.tokens.saturating_add(n);
        l.expires = now + LEASE_TTL;
        l.used = 0;
    }

    /// Forget expired leases.
    pub fn sweep(&mut self, now: Nanos) {
        self.leases.retain(|_, l| l.expires > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn key() -> LeaseKey {
        LeaseKey::Budget {
            scope: 0,
            key: "acme".into(),
            recipients: true,
            per_secs: 3600,
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
        assert_eq!((f.share(), f.cap(7)), (1.0, 7));
        f.set_mode(Mode::FairShare { nodes: 3 });
        assert!((f.share() - 1.0 / 3.0).abs() < 1e-9);
        assert_eq!(f.cap(7), 3);
        assert_eq!(f.cap(0), 0);

        f.set_mode(Mode::Leased { nodes: 3 });
        assert_eq!(f.cap(7), 7);
        let r = f.need(&key(), LeaseLimit::Rate(rate), 0).unwrap();
        assert_eq!(r.ask, 1, "nothing used yet: one");
        f.grant(&key(), 2, 0);
        assert_eq!(f.need(&key(), LeaseLimit::Rate(rate), 1), None);
        f.take(&key());
        f.take(&key());
        // Two used: ask for four next time (at most 5% of 100).
        assert_eq!(f.need(&key(), LeaseLimit::Rate(rate), 1).unwrap().ask, 4);
        f.grant(&key(), 9, 2);
        // Expired tokens are not usable.
        assert!(f.need(&key(), LeaseLimit::Rate(rate), 2 + LEASE_TTL).is_some());
        f.sweep(2 + LEASE_TTL);
        assert!(f.leases.is_empty());
        let w = LeaseKey::Warmup {
            domain: "new.example".into(),
            day: 20_000,
        };
        assert_eq!(w.redis_name(), "warmup:20000:new.example");
        assert_eq!(key().redis_name(), "budget:0:r:3600:acme");
        assert_eq!(f.need(&w, LeaseLimit::Cap(1000), 0).unwrap().ask, 1);
        // Leaving leased mode drops every lease.
        f.grant(&w, 5, 0);
        f.set_mode(Mode::FairShare { nodes: 2 });
        assert!(f.leases.is_empty());
    }
}
