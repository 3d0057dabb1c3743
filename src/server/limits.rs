//! Per-client connection counting (Postfix anvil's connection count).
//!
//! Trust boundary: keyed by the peer address the kernel reports (an IPv4
//! address, or the IPv6 prefix of `limits.ipv6_prefix_length`); entries are
//! removed when the count drops to zero, so memory follows live connections.

use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;

use dashmap::DashMap;

/// Default of `limits.ipv6_prefix_length`: every IPv6 address counts on its
/// own, as in Postfix's anvil. A submission proxy's clients are mostly the
/// operator's own hosts, and a Kubernetes node's pods or a VLAN's hosts
/// often share one /64; a listener open to the internet should use 64.
pub const DEFAULT_IPV6_PREFIX: u8 = 128;

/// The key a client is counted under: its IPv4 address (IPv4-mapped IPv6
/// counts as IPv4), or its IPv6 address cut to `v6_prefix` bits, so that a
/// client rotating addresses within its prefix (every host of a /64 may)
/// does not get a fresh count with each one.
pub fn client_key(ip: IpAddr, v6_prefix: u8) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let mask = match v6_prefix.min(128) {
                0 => 0,
                n => u128::MAX << (128 - u32::from(n)),
            };
            IpAddr::V6(Ipv6Addr::from(bits & mask))
        }
        v4 => v4,
    }
}

pub struct ConnCounter {
    counts: DashMap<IpAddr, usize>,
    v6_prefix: u8,
}

impl Default for ConnCounter {
    fn default() -> Self {
        ConnCounter::new(DEFAULT_IPV6_PREFIX)
    }
}

/// Held for the life of a connection; decrements on drop.
pub struct ConnSlot {
    counter: Arc<ConnCounter>,
    ip: IpAddr,
}

impl ConnCounter {
    /// Counts IPv6 clients per prefix of `v6_prefix` bits.
    pub fn new(v6_prefix: u8) -> Self {
        ConnCounter {
            counts: DashMap::new(),
            v6_prefix,
        }
    }

    /// Take a slot for `ip` (its IPv4 address or IPv6 prefix), or `None`
    /// when that already has `max`.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<ConnSlot> {
        let ip = client_key(ip, self.v6_prefix);
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
        self.counts
            .get(&client_key(ip, self.v6_prefix))
            .map(|c| *c)
            .unwrap_or(0)
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

    #[test]
    fn ipv6_clients_count_per_prefix_and_mapped_ipv4_as_ipv4() {
        let c = Arc::new(ConnCounter::new(64));
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let rotated: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let _a = c.try_acquire(a, 2).unwrap();
        let _b = c.try_acquire(rotated, 2).unwrap();
        assert!(
            c.try_acquire("2001:db8:1:2::77".parse().unwrap(), 2).is_none(),
            "same /64"
        );
        assert_eq!(c.count(a), 2);
        let _o = c.try_acquire(other, 2).expect("another /64 has its own count");

        let v4: IpAddr = "192.0.2.5".parse().unwrap();
        let _v = c.try_acquire(v4, 1).unwrap();
        assert!(c.try_acquire("::ffff:192.0.2.5".parse().unwrap(), 1).is_none());
        assert!(c.try_acquire("192.0.2.6".parse().unwrap(), 1).is_some());

        // A /128 counts every address on its own.
        let exact = Arc::new(ConnCounter::new(128));
        let _x = exact.try_acquire(a, 1).unwrap();
        assert!(exact.try_acquire(rotated, 1).is_some());
        assert!(exact.try_acquire(a, 1).is_none());
    }

    #[test]
    fn client_keys_cut_ipv6_at_the_prefix_length() {
        let ip: IpAddr = "2001:db8:abcd:1234:5678:9abc:def0:1234".parse().unwrap();
        let key = |n| client_key(ip, n).to_string();
        assert_eq!(key(64), "2001:db8:abcd:1234::");
        assert_eq!(key(56), "2001:db8:abcd:1200::");
        assert_eq!(key(48), "2001:db8:abcd::");
        assert_eq!(key(128), ip.to_string());
        assert_eq!(key(0), "::");
        assert_eq!(client_key("10.1.2.3".parse().unwrap(), 48).to_string(), "10.1.2.3");
    }
}
