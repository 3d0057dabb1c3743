//! DNS for the guard: one hickory resolver (mail-auth's re-export, so the
//! tree holds one hickory version), answer caches that respect TTLs, cache
//! NXDOMAIN/no-data answers, serve stale answers while refreshing them
//! (RFC 8767), and collapse concurrent misses for a name into one query.
//!
//! Results are values: a lookup returns an [`Answer`] (records, NXDOMAIN,
//! no data) or a [`TempFail`] (timeout, SERVFAIL, refused, I/O). The guard
//! turns `TempFail` into `451 4.4.3`, never into a 5xx.
//!
//! Two cache layers exist because mail-auth evaluates SPF and fetches DKIM
//! keys itself: [`AuthCaches`] are the TTL caches handed to mail-auth
//! (positive answers only, that is all it stores), [`SwrCache`] is ours, for
//! the lookups the guard makes directly and for whole domain verdicts.
//!
//! Trust boundary: answers come from the configured resolvers and are
//! untrusted data; names are validated before they are queried.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mail_auth::hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use mail_auth::hickory_resolver::net::{DnsError, NetError};
use mail_auth::hickory_resolver::proto::op::ResponseCode;
use mail_auth::hickory_resolver::proto::rr::{Name, RData, RecordType};
use mail_auth::{MX, MessageAuthenticator, Parameters, RecordSet, ResolverCache, Txt};
use tokio::sync::OnceCell;

use crate::config::DnsConfig;

/// Record types the guard asks for directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rt {
    Mx,
    Txt,
    A,
    Aaaa,
}

impl Rt {
    fn record_type(self) -> RecordType {
        match self {
            Rt::Mx => RecordType::MX,
            Rt::Txt => RecordType::TXT,
            Rt::A => RecordType::A,
            Rt::Aaaa => RecordType::AAAA,
        }
    }
}

/// A definitive answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// (preference, exchange without the trailing dot; "" is the root, i.e. a
    /// null MX when it is the only one, RFC 7505).
    Mx(Arc<[(u16, Box<str>)]>),
    /// One entry per TXT record, its character-strings joined.
    Txt(Arc<[Box<[u8]>]>),
    Ip(Arc<[IpAddr]>),
    NxDomain,
    /// The name exists but has no record of this type.
    NoData,
    /// Not a name DNS can carry (label too long, bad characters).
    BadName,
}

impl Answer {
    pub fn is_negative(&self) -> bool {
        matches!(self, Answer::NxDomain | Answer::NoData | Answer::BadName)
    }
}

/// Timeout, SERVFAIL, REFUSED, network error: try again later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TempFail(pub String);

impl std::fmt::Display for TempFail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

pub type Lookup = Result<Answer, TempFail>;

/// Counters (exported as metrics later).
#[derive(Debug, Default)]
pub struct DnsStats {
    /// Queries actually sent to a resolver.
    pub queries: AtomicU64,
    pub hits: AtomicU64,
    pub stale_hits: AtomicU64,
    pub misses: AtomicU64,
}

pub struct Dns {
    auth: MessageAuthenticator,
    pub caches: AuthCaches,
    /// One cache per [`Rt`], indexed by `rt as usize`.
    answers: [Arc<SwrCache<Lookup>>; 4],
    cfg: DnsConfig,
    pub stats: Arc<DnsStats>,
    metrics: crate::metrics::DnsMetrics,
}

impl Dns {
    /// A resolver for `cfg.nameservers` (or the system's), with hickory's own
    /// cache off: ours is the only one, so TTL policy and counters are in one place.
    pub fn new(cfg: &DnsConfig) -> anyhow::Result<Arc<Dns>> {
        Dns::with_metrics(cfg, crate::metrics::DnsMetrics::default())
    }

    /// [`Dns::new`], timing network queries into `metrics`.
    pub fn with_metrics(cfg: &DnsConfig, metrics: crate::metrics::DnsMetrics) -> anyhow::Result<Arc<Dns>> {
        let (config, mut opts) = if cfg.nameservers.is_empty() {
            mail_auth::hickory_resolver::system_conf::read_system_conf()
                .map_err(|e| anyhow::anyhow!("dns.nameservers: cannot read the system resolver config: {e}"))?
        } else {
            let servers = cfg
                .servers()
                .into_iter()
                .map(|addr| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = addr.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = addr.port();
                    NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
                })
                .collect();
            (ResolverConfig::from_name_servers(servers), ResolverOpts::default())
        };
        opts.timeout = cfg.timeout;
        opts.attempts = cfg.attempts;
        opts.cache_size = 0;
        opts.use_hosts_file = ResolveHosts::Never;
        let auth = MessageAuthenticator::new(config, opts).map_err(|e| anyhow::anyhow!("dns: {e}"))?;
        let stats = Arc::new(DnsStats::default());
        let answers = std::array::from_fn(|_| Arc::new(SwrCache::new(cfg.cache_entries, cfg.stale_ttl, stats.clone())));
        Ok(Arc::new(Dns {
            auth,
            caches: AuthCaches::new(cfg.cache_entries),
            answers,
            cfg: cfg.clone(),
            stats,
            metrics,
        }))
    }

    pub fn auth(&self) -> &MessageAuthenticator {
        &self.auth
    }

    pub fn config(&self) -> &DnsConfig {
        &self.cfg
    }

    /// Cached lookup of `name` (lower-case A-labels, no trailing dot).
    pub async fn lookup(self: &Arc<Self>, name: &str, rt: Rt) -> Lookup {
        let cache = &self.answers[rt as usize];
        cache
            .get_or_fetch(name, || {
                let (dns, owned): (Arc<Dns>, Box<str>) = (self.clone(), name.into());
                move || async move { dns.query(&owned, rt).await }
            })
            .await
    }

    /// One uncached query, with the TTL the answer may be kept for.
    async fn query(&self, name: &str, rt: Rt) -> Fetched<Lookup> {
        let Ok(fqdn) = Name::from_ascii(format!("{name}.")) else {
            return Fetched::keep(Ok(Answer::BadName), self.cfg.max_ttl);
        };
        self.stats.queries.fetch_add(1, Relaxed);
        let started = Instant::now();
        let result = self.auth.resolver().lookup(fqdn, rt.record_type()).await;
        self.metrics.lookup_seconds.observe(started.elapsed().as_secs_f64());
        match result {
            Ok(lookup) => {
                let ttl = lookup.valid_until().saturating_duration_since(Instant::now());
                let answer = match rt {
                    Rt::Mx => Answer::Mx(
                        lookup
                            .answers()
                            .iter()
                            .filter_map(|r| match &r.data {
                                RData::MX(mx) => {
                                    let ex = mx.exchange.to_ascii().to_ascii_lowercase();
                                    Some((mx.preference, ex.trim_end_matches('.').into()))
                                }
                                _ => None,
                            })
                            .collect(),
                    ),
                    Rt::Txt => Answer::Txt(
                        lookup
                            .answers()
                            .iter()
                            .filter_map(|r| match &r.data {
                                RData::TXT(t) => Some(t.txt_data.concat().into_boxed_slice()),
                                _ => None,
                            })
                            .collect(),
                    ),
                    Rt::A | Rt::Aaaa => Answer::Ip(
                        lookup
                            .answers()
                            .iter()
                            .filter_map(|r| match &r.data {
                                RData::A(a) => Some(IpAddr::V4(a.0)),
                                RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                                _ => None,
                            })
                            .collect(),
                    ),
                };
                let empty = match &answer {
                    Answer::Mx(v) => v.is_empty(),
                    Answer::Txt(v) => v.is_empty(),
                    Answer::Ip(v) => v.is_empty(),
                    _ => false,
                };
                let answer = if empty { Answer::NoData } else { answer };
                Fetched::keep(Ok(answer), self.clamp(ttl))
            }
            Err(NetError::Dns(DnsError::NoRecordsFound(nr))) => {
                let ttl = nr
                    .negative_ttl
                    .map(|s| Duration::from_secs(s.into()))
                    .unwrap_or(self.cfg.negative_ttl);
                let answer = if nr.response_code == ResponseCode::NXDomain {
                    Answer::NxDomain
                } else {
                    Answer::NoData
                };
                Fetched::keep(Ok(answer), self.clamp(ttl))
            }
            Err(e) => Fetched::temporary(Err(TempFail(describe(&e)))),
        }
    }

    fn clamp(&self, ttl: Duration) -> Duration {
        ttl.clamp(self.cfg.min_ttl, self.cfg.max_ttl)
    }
}

fn describe(e: &NetError) -> String {
    match e {
        NetError::Timeout => "timeout".to_string(),
        NetError::Dns(DnsError::ResponseCode(rc)) => format!("{rc}").to_ascii_uppercase(),
        other => other.to_string(),
    }
}

/// What a fetch produced, and how long it may be kept (`None`: not at all).
pub struct Fetched<V> {
    pub value: V,
    pub ttl: Option<Duration>,
}

impl<V> Fetched<V> {
    pub fn keep(value: V, ttl: Duration) -> Self {
        Fetched { value, ttl: Some(ttl) }
    }
    pub fn temporary(value: V) -> Self {
        Fetched { value, ttl: None }
    }
}

struct Entry<V> {
    value: V,
    fresh_until: Instant,
    stale_until: Instant,
    refreshing: bool,
}

/// After a failed refresh of a stale entry, wait this long before the next try.
const REFRESH_RETRY: Duration = Duration::from_secs(10);

/// A bounded cache keyed by name with per-entry TTLs,
/// stale-while-revalidate and single-flight misses.
pub struct SwrCache<V> {
    map: Mutex<HashMap<Box<str>, Entry<V>>>,
    inflight: Mutex<HashMap<Box<str>, Arc<OnceCell<V>>>>,
    capacity: usize,
    stale: Duration,
    stats: Arc<DnsStats>,
}

impl<V: Clone + Send + Sync + 'static> SwrCache<V> {
    pub fn new(capacity: usize, stale: Duration, stats: Arc<DnsStats>) -> Self {
        SwrCache {
            map: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            capacity,
            stale,
            stats,
        }
    }

    /// The cached value for `key`, fetching it when missing (one fetch per
    /// key at a time) or refreshing it in the background when stale.
    /// `make` builds the fetch and is only called when one is needed, so a
    /// fresh hit allocates nothing.
    pub async fn get_or_fetch<M, F, Fut>(self: &Arc<Self>, key: &str, make: M) -> V
    where
        M: FnOnce() -> F,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Fetched<V>> + Send + 'static,
    {
        let now = Instant::now();
        {
            let mut map = self.map.lock().unwrap();
            if let Some(e) = map.get_mut(key) {
                if now < e.fresh_until {
                    self.stats.hits.fetch_add(1, Relaxed);
                    return e.value.clone();
                }
                if now < e.stale_until {
                    self.stats.stale_hits.fetch_add(1, Relaxed);
                    if !e.refreshing {
                        e.refreshing = true;
                        let me = self.clone();
                        let key: Box<str> = key.into();
                        let fetch = make();
                        tokio::spawn(async move {
                            let f = fetch().await;
                            me.refreshed(key, f);
                        });
                    }
                    return e.value.clone();
                }
            }
        }
        self.stats.misses.fetch_add(1, Relaxed);
        let cell = self
            .inflight
            .lock()
            .unwrap()
            .entry(key.into())
            .or_insert_with(|| Arc::new(OnceCell::new()))
            .clone();
        let me = self.clone();
        let owned: Box<str> = key.into();
        let fetch = make();
        cell.get_or_init(|| async move {
            let f = fetch().await;
            let value = f.value.clone();
            me.store(owned.clone(), f);
            me.inflight.lock().unwrap().remove(&owned);
            value
        })
        .await
        .clone()
    }

    /// The entry if present and fresh (no fetch, no counters).
    pub fn peek(&self, key: &str) -> Option<V> {
        let map = self.map.lock().unwrap();
        map.get(key)
            .filter(|e| Instant::now() < e.fresh_until)
            .map(|e| e.value.clone())
    }

    pub fn remove(&self, key: &str) {
        self.map.lock().unwrap().remove(key);
    }

    pub fn len(&self) -> usize {
        self.map.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn store(&self, key: Box<str>, f: Fetched<V>) {
        let Some(ttl) = f.ttl else { return };
        let now = Instant::now();
        let mut map = self.map.lock().unwrap();
        self.make_room(&mut map, now);
        map.insert(
            key,
            Entry {
                value: f.value,
                fresh_until: now + ttl,
                stale_until: now + ttl + self.stale,
                refreshing: false,
            },
        );
    }

    /// A background refresh finished: replace the entry, or on a temporary
    /// failure keep serving the stale value until its stale deadline.
    fn refreshed(&self, key: Box<str>, f: Fetched<V>) {
        if f.ttl.is_some() {
            return self.store(key, f);
        }
        let mut map = self.map.lock().unwrap();
        if let Some(e) = map.get_mut(&key) {
            e.refreshing = false;
            e.fresh_until = (Instant::now() + REFRESH_RETRY).min(e.stale_until);
        }
    }

    fn make_room(&self, map: &mut HashMap<Box<str>, Entry<V>>, now: Instant) {
        if map.len() < self.capacity {
            return;
        }
        map.retain(|_, e| e.stale_until > now);
        if map.len() >= self.capacity {
            // Still full of live entries: drop an arbitrary eighth.
            let drop: Vec<Box<str>> = map.keys().take(self.capacity / 8 + 1).cloned().collect();
            for k in drop {
                map.remove(&k);
            }
        }
    }
}

/// A bounded TTL map implementing mail-auth's cache trait.
pub struct TtlCache<K, V> {
    map: Mutex<HashMap<K, (V, Instant)>>,
    capacity: usize,
}

impl<K: Hash + Eq, V: Clone> TtlCache<K, V> {
    fn new(capacity: usize) -> Self {
        TtlCache {
            map: Mutex::new(HashMap::new()),
            capacity,
        }
    }
}

impl<K: Hash + Eq, V: Clone> ResolverCache<K, V> for TtlCache<K, V> {
    fn get<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let map = self.map.lock().unwrap();
        match map.get(name) {
            Some((v, until)) if *until > Instant::now() => Some(v.clone()),
            _ => None,
        }
    }

    fn remove<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.lock().unwrap().remove(name).map(|(v, _)| v)
    }

    fn insert(&self, key: K, value: V, valid_until: Instant) {
        let mut map = self.map.lock().unwrap();
        if map.len() >= self.capacity {
            let now = Instant::now();
            map.retain(|_, (_, u)| *u > now);
        }
        if map.len() < self.capacity {
            map.insert(key, (value, valid_until));
        }
    }
}

/// The caches mail-auth uses for the lookups it makes itself (SPF terms,
/// DKIM keys).
pub struct AuthCaches {
    pub txt: TtlCache<Box<str>, Txt>,
    pub mx: TtlCache<Box<str>, RecordSet<MX>>,
    pub v4: TtlCache<Box<str>, RecordSet<Ipv4Addr>>,
    pub v6: TtlCache<Box<str>, RecordSet<Ipv6Addr>>,
    pub ptr: TtlCache<IpAddr, RecordSet<Box<str>>>,
}

pub type AuthParams<'x, P> = Parameters<
    'x,
    P,
    TtlCache<Box<str>, Txt>,
    TtlCache<Box<str>, RecordSet<MX>>,
    TtlCache<Box<str>, RecordSet<Ipv4Addr>>,
    TtlCache<Box<str>, RecordSet<Ipv6Addr>>,
    TtlCache<IpAddr, RecordSet<Box<str>>>,
>;

impl AuthCaches {
    fn new(capacity: usize) -> Self {
        AuthCaches {
            txt: TtlCache::new(capacity),
            mx: TtlCache::new(capacity),
            v4: TtlCache::new(capacity),
            v6: TtlCache::new(capacity),
            ptr: TtlCache::new(capacity),
        }
    }

    /// mail-auth parameters that use these caches.
    pub fn params<P>(&self, p: P) -> AuthParams<'_, P> {
        Parameters::new(p)
            .with_txt_cache(&self.txt)
            .with_mx_cache(&self.mx)
            .with_ipv4_cache(&self.v4)
            .with_ipv6_cache(&self.v6)
            .with_ptr_cache(&self.ptr)
    }
}

/// `domain` as lower-case A-labels without a trailing dot, or `None` if it
/// is not a valid domain name (IDNA conversion included).
pub fn ascii_domain(domain: &str) -> Option<String> {
    let d = domain.trim_end_matches('.');
    let ascii = if d.is_ascii() {
        d.to_ascii_lowercase()
    } else {
        idna::domain_to_ascii(d).ok()?
    };
    crate::smtp::address::is_domain(&ascii).then_some(ascii)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn cache(stale: Duration) -> Arc<SwrCache<u32>> {
        Arc::new(SwrCache::new(64, stale, Arc::new(DnsStats::default())))
    }

    #[tokio::test]
    async fn fresh_hit_does_not_fetch_and_concurrent_misses_fetch_once() {
        let c = cache(Duration::ZERO);
        let calls = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (c, calls) = (c.clone(), calls.clone());
            tasks.push(tokio::spawn(async move {
                c.get_or_fetch("a.example", || {
                    move || async move {
                        calls.fetch_add(1, Relaxed);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        Fetched::keep(7, Duration::from_secs(60))
                    }
                })
                .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), 7);
        }
        assert_eq!(calls.load(Relaxed), 1);
        let v = c
            .get_or_fetch("a.example", || || async { Fetched::keep(8, Duration::from_secs(60)) })
            .await;
        assert_eq!(v, 7, "fresh entry served from cache");
    }

    #[tokio::test]
    async fn temporary_results_are_not_cached() {
        let c = cache(Duration::ZERO);
        assert_eq!(c.get_or_fetch("t", || || async { Fetched::temporary(1) }).await, 1);
        assert_eq!(c.get_or_fetch("t", || || async { Fetched::temporary(2) }).await, 2);
        assert!(c.peek("t").is_none());
    }

    #[tokio::test]
    async fn stale_entry_is_served_while_refreshing_and_kept_when_refresh_fails() {
        let c = cache(Duration::from_secs(60));
        c.get_or_fetch("s", || || async { Fetched::keep(1, Duration::ZERO) })
            .await;
        // Expired, within the stale window: old value now, refresh behind.
        let v = c
            .get_or_fetch("s", || || async { Fetched::keep(2, Duration::from_secs(60)) })
            .await;
        assert_eq!(v, 1);
        for _ in 0..100 {
            if c.peek("s") == Some(2) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(c.peek("s"), Some(2), "background refresh replaced the value");

        let c = cache(Duration::from_secs(60));
        c.get_or_fetch("f", || || async { Fetched::keep(1, Duration::ZERO) })
            .await;
        assert_eq!(c.get_or_fetch("f", || || async { Fetched::temporary(9) }).await, 1);
        for _ in 0..100 {
            if c.peek("f").is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(c.peek("f"), Some(1), "failed refresh keeps serving the old value");
    }

    #[test]
    fn capacity_is_bounded() {
        let c: SwrCache<u32> = SwrCache::new(16, Duration::ZERO, Arc::new(DnsStats::default()));
        for i in 0..100 {
            c.store(format!("n{i}").into(), Fetched::keep(i, Duration::from_secs(60)));
        }
        assert!(c.len() <= 16, "{}", c.len());
    }

    #[test]
    fn ascii_domains() {
        assert_eq!(ascii_domain("Example.COM.").as_deref(), Some("example.com"));
        assert_eq!(ascii_domain("bücher.example").as_deref(), Some("xn--bcher-kva.example"));
        assert_eq!(ascii_domain("bad..example"), None);
        assert_eq!(ascii_domain("-x.example"), None);
    }
}
