//! How a node's shaper shares limits with the rest of a fleet.
//!
//! - [`Mode::Local`] (one node, the default): every limit is this node's.
//! - [`Mode::Leased`] (Redis up): a provider's `rate` is the fleet's. The
//!   node takes a job for a rate-limited provider only with a *lease* token,
//!   which `cluster::limits` obtains in batches from one GCRA per provider
//!   in Redis (one round trip per batch, not per message). Tokens expire
//!   after [`LEASE_TTL`] so a node cannot hoard them. The other per-provider
//!   limits (`sender_rate`, `max_concurrency`) and `relay_rate` run at this
//!   node's fair share (limit ÷ live nodes).
//! - [`Mode::FairShare`] (Redis unavailable): every limit runs at this
//!   node's fair share, from the last known number of live nodes.
//!
//! Pure state over a clock, like the shaper; the I/O is in
//! `cluster::limits`.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::Notify;

use crate::throttle::Nanos;

/// How long leased tokens stay usable.
pub const LEASE_TTL: Nanos = 1_000_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Local,
    /// Provider rates leased from the fleet; `nodes` live.
    Leased {
        nodes: u32,
    },
    /// Redis unavailable: limits ÷ `nodes`.
    FairShare {
        nodes: u32,
    },
}

/// Tokens reserved in the fleet's GCRA: `tokens` of them, the next usable
/// at `next_at`, one per `interval` after it.
#[derive(Debug, Default)]
struct Lease {
    tokens: u32,
    next_at: Nanos,
    interval: Nanos,
    /// Jobs waiting for tokens (what to ask for), 0 when none.
    wanted: u32,
    /// Tokens used since the last grant: a node that used a whole batch
    /// asks for twice as many next time (fewer round trips at high rates).
    used: u32,
}

/// The shaper's fleet state.
#[derive(Debug)]
pub struct FleetShare {
    mode: Mode,
    leases: HashMap<Arc<str>, Lease>,
    want: Arc<Notify>,
}

impl Default for FleetShare {
    fn default() -> Self {
        FleetShare {
            mode: Mode::Local,
            leases: HashMap::new(),
            want: Arc::new(Notify::new()),
        }
    }
}

impl FleetShare {
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Switch mode (leases are dropped when leaving `Leased`).
    pub fn set_mode(&mut self, mode: Mode) {
        if !matches!(mode, Mode::Leased { .. }) {
            self.leases.clear();
        }
        self.mode = mode;
    }

    /// Notified when a provider needs tokens.
    pub fn wants_signal(&self) -> Arc<Notify> {
        Arc::clone(&self.want)
    }

    /// This node's share of a per-node limit: 1 alone, 1 / live nodes in a fleet.
    pub fn share(&self) -> f64 {
        match self.mode {
            Mode::Local => 1.0,
            Mode::Leased { nodes } | Mode::FairShare { nodes } => 1.0 / f64::from(nodes.max(1)),
        }
    }

    /// The factor for a provider's own `rate` (the lease does the sharing
    /// while leased).
    pub fn provider_factor(&self) -> f64 {
        match self.mode {
            Mode::FairShare { .. } => self.share(),
            _ => 1.0,
        }
    }

    /// This node's part of `max_concurrency` (at least 1).
    pub fn concurrency(&self, max: u32) -> u32 {
        match self.mode {
            Mode::Local => max,
            Mode::Leased { nodes } | Mode::FairShare { nodes } => max.div_ceil(nodes.max(1)).max(1),
        }
    }

    /// Is a token for rate-limited `provider` due now? `Err(Some(t))`: the
    /// next is due at `t`; `Err(None)`: none held (see
    /// [`FleetShare::want`]). Always `Ok` unless leased. No side effects
    /// beyond dropping tokens that lapsed.
    pub fn due(&mut self, provider: &str, now: Nanos) -> Result<(), Option<Nanos>> {
        if !matches!(self.mode, Mode::Leased { .. }) {
            return Ok(());
        }
        let Some(lease) = self.leases.get_mut(provider) else {
            return Err(None);
        };
        if lease.tokens > 0 && now > lease.next_at.saturating_add(LEASE_TTL) {
            lease.tokens = 0; // reserved long ago and not used: gone
        }
        match lease.tokens {
            0 => Err(None),
            _ if now >= lease.next_at => Ok(()),
            _ => Err(Some(lease.next_at)),
        }
    }

    /// Record that `provider` needs tokens for `ready` jobs that could go,
    /// and wake the lease task (it wakes the shaper back).
    pub fn want(&mut self, provider: &Arc<str>, ready: usize) {
        let lease = match self.leases.get_mut(provider) {
            Some(l) => l,
            None => self.leases.entry(Arc::clone(provider)).or_default(),
        };
        if lease.wanted == 0 {
            self.want.notify_one();
        }
        lease.wanted = u32::try_from(ready).unwrap_or(u32::MAX).max(1);
    }

    /// [`FleetShare::due`], recording the demand when no token is held.
    pub fn admit(&mut self, provider: &Arc<str>, now: Nanos, ready: usize) -> Result<(), Option<Nanos>> {
        let r = self.due(provider, now);
        if r == Err(None) {
            self.want(provider, ready);
        }
        r
    }

    /// A job for `provider` went: one token used. With one token or none
    /// left and `ready` more jobs waiting, the next batch is asked for now,
    /// so it arrives before this one runs out.
    pub fn consume(&mut self, provider: &str, ready: usize) {
        let Some(l) = self.leases.get_mut(provider) else { return };
        l.tokens = l.tokens.saturating_sub(1);
        l.used = l.used.saturating_add(1);
        l.next_at = l.next_at.saturating_add(l.interval);
        // The ask is sized by `used` (see `wanted`), not by `ready`, which
        // counts held and slowed lanes too.
        if l.tokens <= 1 && ready > l.tokens as usize && l.wanted == 0 {
            l.wanted = 1;
            self.want.notify_one();
        }
    }

    /// Providers waiting for tokens, and how many to ask for: the jobs
    /// waiting, or twice what the last batch served if more (the caller
    /// caps it at what the rate allows within its horizon).
    pub fn wanted(&self) -> Vec<(Arc<str>, u32)> {
        self.leases
            .iter()
            .filter(|(_, l)| l.wanted > 0)
            .map(|(p, l)| (Arc::clone(p), l.wanted.max(l.used.saturating_mul(2))))
            .collect()
    }

    /// `n` tokens reserved for `provider`, the first usable `offset` from
    /// `now`, then one per `interval` (0 tokens: the fleet's limit is
    /// reserved ahead; the want stays and the lease task asks again later).
    /// They follow any tokens still held.
    pub fn grant(&mut self, provider: &str, n: u32, offset: Nanos, interval: Nanos, now: Nanos) {
        let Some(l) = self.leases.get_mut(provider) else { return };
        if n == 0 {
            return;
        }
        let first = now.saturating_add(offset);
        if l.tokens > 0 && now > l.next_at.saturating_add(LEASE_TTL) {
            l.tokens = 0; // stale: the fresh batch must not inherit their times
        }
        if l.tokens == 0 {
            l.next_at = first;
        }
        l.tokens = l.tokens.saturating_add(n);
        l.interval = interval;
        l.wanted = 0;
        l.used = 0;
    }

    /// Forget providers with nothing wanted and no live tokens.
    pub fn sweep(&mut self, now: Nanos) {
        self.leases
            .retain(|_, l| l.wanted > 0 || (l.tokens > 0 && now <= l.next_at.saturating_add(LEASE_TTL)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_and_leases() {
        let p: Arc<str> = Arc::from("google");
        let mut f = FleetShare::default();
        assert_eq!(f.admit(&p, 0, 5), Ok(()));
        assert_eq!((f.share(), f.provider_factor(), f.concurrency(10)), (1.0, 1.0, 10));

        f.set_mode(Mode::FairShare { nodes: 3 });
        assert_eq!(f.admit(&p, 0, 5), Ok(()));
        assert!((f.share() - 1.0 / 3.0).abs() < 1e-9);
        assert_eq!(f.provider_factor(), f.share());
        assert_eq!(f.concurrency(10), 4);
        assert_eq!(f.concurrency(1), 1);

        f.set_mode(Mode::Leased { nodes: 2 });
        assert_eq!(f.provider_factor(), 1.0);
        assert_eq!(f.concurrency(10), 5);
        // No token: refused, demand recorded, lease task signalled.
        let signal = f.wants_signal();
        assert_eq!(f.admit(&p, 0, 5), Err(None));
        assert_eq!(f.wanted(), vec![(Arc::clone(&p), 5)]);
        assert!(
            futures_util::FutureExt::now_or_never(signal.notified()).is_some(),
            "lease task woken"
        );
        // An empty grant keeps the want.
        f.grant("google", 0, 0, 10, 0);
        assert_eq!(f.admit(&p, 0, 5), Err(None));
        // Three tokens: the first 5 from now, then one every 10.
        f.grant("google", 3, 5, 10, 100);
        assert!(f.wanted().is_empty());
        assert_eq!(f.admit(&p, 100, 5), Err(Some(105)), "not before its time");
        assert_eq!(f.admit(&p, 105, 5), Ok(()));
        f.consume("google", 4);
        assert!(f.wanted().is_empty(), "two left");
        assert_eq!(f.admit(&p, 110, 4), Err(Some(115)));
        assert_eq!(f.admit(&p, 115, 4), Ok(()));
        f.consume("google", 3);
        // One left and three jobs: the next batch is asked for already,
        // twice what this one served (2 used).
        assert_eq!(f.wanted(), vec![(Arc::clone(&p), 4)]);
        // It queues behind the token still held.
        f.grant("google", 2, 0, 10, 116);
        assert_eq!(f.admit(&p, 125, 3), Ok(()));
        f.consume("google", 2);
        assert_eq!(f.admit(&p, 130, 2), Err(Some(135)));
        // Tokens not used for LEASE_TTL after their time are gone.
        assert_eq!(f.admit(&p, 135 + LEASE_TTL + 1, 1), Err(None));
        // Leaving Leased drops the leases.
        f.set_mode(Mode::FairShare { nodes: 2 });
        assert!(f.wanted().is_empty());
        f.sweep(0);
    }
}
