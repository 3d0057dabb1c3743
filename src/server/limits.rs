//! Per-IP connection counting (Postfix anvil's connection count).
//!
//! Trust boundary: keyed by the peer address the kernel reports; entries are
//! removed when the count drops to zero, so memory follows live connections.

use std::net::IpAddr;
use std::sync::Arc;

use dashmap::DashMap;

#[derive(Default)]
pub struct ConnCounter {
    counts: DashMap<IpAddr, usize>,
}

/// Held for the life of a connection; decrements on drop.
pub struct ConnSlot {
    counter: Arc<ConnCounter>,
    ip: IpAddr,
}

impl ConnCounter {
    /// Take a slot for `ip`, or `None` when it already has `max`.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<ConnSlot> {
        let mut e = self.counts.entry(ip).or_insert(0);
        if *e >= max {
            return None;
        }
        *e += 1;
        Some(ConnSlot {
            counter: Arc::clone(self),
            ip,
        })
    }

    pub fn count(&self, ip: IpAddr) -> usize {
        self.counts.get(&ip).map(|c| *c).unwrap_or(0)
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        if let Some(mut c) = self.counter.counts.get_mut(&self.ip) {
            *c -= 1;
        }
        self.counter.counts.remove_if(&self.ip, |_, c| *c == 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_releases() {
        let c = Arc::new(ConnCounter::default());
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        let a = c.try_acquire(ip, 2).unwrap();
        let b = c.try_acquire(ip, 2).unwrap();
        assert!(c.try_acquire(ip, 2).is_none());
        drop(a);
        assert_eq!(c.count(ip), 1);
        let _c2 = c.try_acquire(ip, 2).unwrap();
        drop(b);
        drop(_c2);
        assert!(c.counts.is_empty());
    }
}
