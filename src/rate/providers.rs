//! Recipient domain → mailbox provider ("google", "microsoft_365", …), so
//! mail can be queued and shaped per provider although everything leaves
//! through one smarthost.
//!
//! The provider table is data (`config/providers.toml`, built in; an
//! operator's file is read first). A domain is mapped by, in order:
//! 1. the provider's `domains` list (no lookup: the fast path, and the
//!    answer for big freemail domains even while DNS fails);
//! 2. its MX records: the most preferred exchange (lowest preference,
//!    RFC 5321 §5.1) whose host name ends, on a label boundary, in one of a
//!    provider's `mx` suffixes decides; the longest matching suffix wins
//!    (`olc.protection.outlook.com` is consumer Outlook,
//!    `mail.protection.outlook.com` is Microsoft 365). A domain without MX
//!    records uses its own name as the implicit MX (RFC 5321 §5.1); a null
//!    MX (RFC 7505: a single exchange ".") matches nothing;
//! 3. otherwise [`OTHER`].
//!
//! [`Providers`] is the async front: it keeps its own bounded map
//! domain → (provider, expiry), so the hot path ([`Providers::cached`]) is
//! a synchronous map hit. A temporary DNS failure maps to [`OTHER`] for a
//! short time only, so the next message tries again.
//!
//! Trust boundary: the table is trusted operator input (or compiled in),
//! validated fully at load. MX answers come from the configured resolvers
//! through [`crate::dns::Dns`] and are untrusted: exchange names are only
//! compared with the table's suffixes, never connected to (all mail goes to
//! the smarthost). A recipient domain can therefore choose, through its own
//! MX records, only which provider's shaping bucket mail to that domain
//! joins. Recipient domains are validated (IDNA included) before they are
//! looked up, and the cache is bounded, so a flood of distinct domains
//! costs lookups, not memory.

use std::borrow::Cow;
use std::collections::hash_map::Entry as MapEntry;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::dns::{Answer, Dns, Rt};

/// The built-in table.
pub const DEFAULT_PROVIDERS: &str = include_str!("../../config/providers.toml");

/// The provider of a domain that no table entry claims (reserved name).
pub const OTHER: &str = "other";

const BUILTIN_LABEL: &str = "built-in providers.toml";

/// A provider table that does not load; `key` names the entry and field,
/// e.g. `provider[3].mx[1]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ProvidersError {
    pub key: String,
    pub message: String,
}

fn err(key: impl Into<String>, message: impl Into<String>) -> ProvidersError {
    ProvidersError {
        key: key.into(),
        message: message.into(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TableFile {
    #[serde(default)]
    provider: Vec<ProviderSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProviderSpec {
    name: String,
    mx: Vec<String>,
    domains: Option<Vec<String>>,
}

/// One validated provider.
#[derive(Debug, Clone)]
struct Provider {
    /// Interned: [`Providers`] hands out clones of this one `Arc`.
    name: Arc<str>,
    mx: Vec<Box<str>>,
    domains: Vec<Box<str>>,
}

/// Validated provider table: MX host suffixes and known domains → provider.
#[derive(Debug, Clone)]
pub struct ProviderTable {
    providers: Vec<Provider>,
    /// MX host suffix → index into `providers`.
    suffixes: HashMap<Box<str>, usize>,
    /// Recipient domain → index into `providers`.
    domains: HashMap<Box<str>, usize>,
}

static BUILTIN: LazyLock<ProviderTable> = LazyLock::new(|| {
    ProviderTable::from_sources(&[(BUILTIN_LABEL, DEFAULT_PROVIDERS)]).expect("built-in providers.toml is valid")
});

impl ProviderTable {
    /// The built-in table, parsed once.
    pub fn builtin() -> &'static ProviderTable {
        &BUILTIN
    }

    /// One table from TOML text; errors name `provider[i].field[j]`.
    pub fn parse(text: &str) -> Result<ProviderTable, ProvidersError> {
        let providers = parse_source(text)?;
        Ok(ProviderTable::merge(vec![providers]))
    }

    /// The operator's file (its entries first), then the built-in table
    /// unless `replace_defaults`. An operator entry replaces the built-in
    /// entry of the same name, and an operator's suffix or domain is taken
    /// away from the built-in provider that also claims it. Errors are
    /// prefixed with the file's path.
    pub fn load(path: &Path, replace_defaults: bool) -> Result<ProviderTable, ProvidersError> {
        let label = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| err(&label, e.to_string()))?;
        if replace_defaults {
            ProviderTable::from_sources(&[(&label, &text)])
        } else {
            ProviderTable::from_sources(&[(&label, &text), (BUILTIN_LABEL, DEFAULT_PROVIDERS)])
        }
    }

    /// Tables from several TOML texts, earlier sources first (see
    /// [`ProviderTable::load`]); each source must be valid on its own.
    pub fn from_sources(sources: &[(&str, &str)]) -> Result<ProviderTable, ProvidersError> {
        let parsed = sources
            .iter()
            .map(|(label, text)| parse_source(text).map_err(|e| err(format!("{label}: {}", e.key), e.message)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ProviderTable::merge(parsed))
    }

    /// Sources in priority order, each already valid on its own: the first
    /// claim on a name, suffix or domain wins.
    fn merge(sources: Vec<Vec<Provider>>) -> ProviderTable {
        let mut table = ProviderTable {
            providers: Vec::new(),
            suffixes: HashMap::new(),
            domains: HashMap::new(),
        };
        let mut names = HashSet::new();
        for source in sources {
            for mut p in source {
                if !names.insert(p.name.clone()) {
                    continue;
                }
                let i = table.providers.len();
                p.mx.retain(|s| claim(&mut table.suffixes, s, i));
                p.domains.retain(|d| claim(&mut table.domains, d, i));
                table.providers.push(p);
            }
        }
        table
    }

    /// Provider names, in table order (operator entries first).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.providers.iter().map(|p| &*p.name)
    }

    pub fn len(&self) -> usize {
        self.providers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.providers.is_empty()
    }

    /// The provider that lists `domain` (any case, trailing dot allowed,
    /// U-labels converted) among its `domains`.
    pub fn by_domain(&self, domain: &str) -> Option<&str> {
        let d = normalize_domain(domain)?;
        self.domain_index(&d).map(|i| &*self.providers[i].name)
    }

    /// The provider of the most preferred exchange that matches any
    /// provider (RFC 5321 §5.1: lowest preference first; among equal
    /// preferences the first listed). Host names are compared without case
    /// and trailing dot; the longest matching suffix decides. A null MX
    /// (RFC 7505) matches nothing.
    pub fn by_mx(&self, mx: &[(u16, Box<str>)]) -> Option<&str> {
        self.mx_index(mx).map(|i| &*self.providers[i].name)
    }

    fn domain_index(&self, ascii_domain: &str) -> Option<usize> {
        self.domains.get(ascii_domain).copied()
    }

    fn mx_index(&self, mx: &[(u16, Box<str>)]) -> Option<usize> {
        if is_null_mx(mx) {
            return None;
        }
        let mut best: Option<(u16, usize)> = None;
        for (pref, host) in mx {
            if best.is_some_and(|(p, _)| *pref >= p) {
                continue;
            }
            if let Some(i) = self.host_index(host) {
                best = Some((*pref, i));
            }
        }
        best.map(|(_, i)| i)
    }

    /// The provider whose longest suffix matches `host` on a label boundary.
    fn host_index(&self, host: &str) -> Option<usize> {
        let host = host.strip_suffix('.').unwrap_or(host);
        let host: Cow<str> = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(host.to_ascii_lowercase())
        } else {
            Cow::Borrowed(host)
        };
        // From the whole name down to its last label: the first hit is the
        // longest suffix.
        let mut rest: &str = &host;
        loop {
            if rest.is_empty() {
                return None;
            }
            if let Some(&i) = self.suffixes.get(rest) {
                return Some(i);
            }
            rest = &rest[rest.find('.')? + 1..];
        }
    }
}

/// Adds `key` → `i` unless another provider claimed it first.
fn claim(map: &mut HashMap<Box<str>, usize>, key: &str, i: usize) -> bool {
    match map.entry(key.into()) {
        MapEntry::Vacant(v) => {
            v.insert(i);
            true
        }
        MapEntry::Occupied(_) => false,
    }
}

/// RFC 7505 §3: a single MX record whose exchange is the root.
fn is_null_mx(mx: &[(u16, Box<str>)]) -> bool {
    matches!(mx, [(_, host)] if host.is_empty() || &**host == ".")
}

/// One TOML text → validated providers; keys are `provider[i].field[j]`.
fn parse_source(text: &str) -> Result<Vec<Provider>, ProvidersError> {
    let file: TableFile = toml::from_str(text).map_err(|e| {
        let key = e
            .span()
            .map(|s| key_at(text, s.start))
            .unwrap_or_else(|| "providers".into());
        err(key, e.message())
    })?;
    let mut names: HashMap<String, usize> = HashMap::new();
    // Suffix / domain → (provider index, key of the first claim).
    let mut suffixes: HashMap<Box<str>, (usize, String)> = HashMap::new();
    let mut domains: HashMap<Box<str>, (usize, String)> = HashMap::new();
    let mut out = Vec::with_capacity(file.provider.len());
    for (i, spec) in file.provider.into_iter().enumerate() {
        let at = |field: &str| format!("provider[{i}].{field}");
        if !is_token(&spec.name) {
            return Err(err(
                at("name"),
                format!("{:?} is not a token: lowercase letters, digits, '_' and '-'", spec.name),
            ));
        }
        if spec.name == OTHER {
            return Err(err(
                at("name"),
                format!("{OTHER:?} is reserved for domains no provider claims"),
            ));
        }
        if let Some(first) = names.insert(spec.name.clone(), i) {
            return Err(err(
                at("name"),
                format!("{:?} is also the name of provider[{first}]", spec.name),
            ));
        }
        if spec.mx.is_empty() {
            return Err(err(at("mx"), "empty list: give at least one MX host suffix"));
        }
        let mut mx = Vec::with_capacity(spec.mx.len());
        for (j, s) in spec.mx.iter().enumerate() {
            let key = at(&format!("mx[{j}]"));
            let host = hostname(s).map_err(|m| err(&key, m))?;
            if let Some((p, first)) = suffixes.get(host.as_str()) {
                return Err(err(
                    key,
                    format!("{host:?} is already claimed by {first} ({:?})", name_of(&names, *p)),
                ));
            }
            suffixes.insert(host.as_str().into(), (i, key));
            mx.push(host.into_boxed_str());
        }
        let mut ds = Vec::new();
        if let Some(list) = &spec.domains {
            if list.is_empty() {
                return Err(err(at("domains"), "empty list: leave the key out instead"));
            }
            for (j, d) in list.iter().enumerate() {
                let key = at(&format!("domains[{j}]"));
                let domain = hostname(d).map_err(|m| err(&key, m))?;
                if let Some((p, first)) = domains.get(domain.as_str()) {
                    return Err(err(
                        key,
                        format!("{domain:?} is already claimed by {first} ({:?})", name_of(&names, *p)),
                    ));
                }
                domains.insert(domain.as_str().into(), (i, key));
                ds.push(domain.into_boxed_str());
            }
        }
        out.push(Provider {
            name: spec.name.into(),
            mx,
            domains: ds,
        });
    }
    Ok(out)
}

fn name_of(names: &HashMap<String, usize>, i: usize) -> &str {
    names.iter().find(|(_, j)| **j == i).map_or("?", |(n, _)| n.as_str())
}

/// `[a-z0-9_-]+`.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// A table suffix or domain: lower-case A-labels, at least two labels, no
/// leading dot (a trailing dot is dropped).
fn hostname(s: &str) -> Result<String, String> {
    if s.starts_with('.') {
        return Err(format!(
            "{s:?}: no leading dot (suffixes always match on a label boundary)"
        ));
    }
    if s.chars().any(char::is_whitespace) {
        return Err(format!("{s:?} contains white space"));
    }
    let host = crate::dns::ascii_domain(s).ok_or_else(|| format!("{s:?} is not a host name"))?;
    if !host.contains('.') {
        return Err(format!("{s:?} needs at least two labels"));
    }
    Ok(host)
}

/// The `provider[i].key` a TOML error at byte `offset` is about.
fn key_at(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let Some(before) = text.get(..offset) else {
        return "providers".into();
    };
    let line_start = before.rfind('\n').map_or(0, |p| p + 1);
    let line_end = text[offset..].find('\n').map_or(text.len(), |p| offset + p);
    // `[[provider]]` headers up to and including this line.
    let tables = text[..line_end]
        .lines()
        .filter(|l| l.trim_start().starts_with("[["))
        .count();
    let line = text[line_start..line_end].trim();
    let key = if line.starts_with('[') {
        ""
    } else {
        line.split('=').next().unwrap_or("").trim()
    };
    match (tables, key.is_empty()) {
        (0, true) => "providers".into(),
        (0, false) => key.into(),
        (n, true) => format!("provider[{}]", n - 1),
        (n, false) => format!("provider[{}].{key}", n - 1),
    }
}

/// `domain` as the lower-case A-label key without trailing dot; borrowed
/// when it already is one, so the hot path does not allocate.
fn normalize_domain(domain: &str) -> Option<Cow<'_, str>> {
    let d = domain.strip_suffix('.').unwrap_or(domain);
    let plain = d
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if plain && crate::smtp::address::is_domain(d) {
        Some(Cow::Borrowed(d))
    } else {
        crate::dns::ascii_domain(domain).map(Cow::Owned)
    }
}

/// Cache settings of [`Providers`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvidersCfg {
    /// How long a definitive mapping (a provider, or [`OTHER`] after a
    /// definitive DNS answer) is kept. The DNS layer has its own TTL cache;
    /// this one only saves the async call.
    pub positive_ttl: Duration,
    /// How long [`OTHER`] after a temporary DNS failure is kept, so the
    /// next message tries the lookup again.
    pub negative_ttl: Duration,
    /// Most cached domains; when full, expired entries and then an
    /// arbitrary eighth are dropped.
    pub max_entries: usize,
}

impl Default for ProvidersCfg {
    fn default() -> Self {
        ProvidersCfg {
            positive_ttl: Duration::from_secs(3600),
            negative_ttl: Duration::from_secs(60),
            max_entries: 100_000,
        }
    }
}

/// Domain → (provider, expiry).
type Cache = HashMap<Box<str>, (Arc<str>, Instant)>;

/// Recipient domain → provider name, with DNS MX lookups and a bounded
/// cache. Names are interned: every answer is a clone of one `Arc` per
/// provider.
pub struct Providers {
    table: Arc<ProviderTable>,
    dns: Option<Arc<Dns>>,
    cfg: ProvidersCfg,
    other: Arc<str>,
    cache: Mutex<Cache>,
}

impl std::fmt::Debug for Providers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Providers")
            .field("providers", &self.table.len())
            .field("dns", &self.dns.is_some())
            .field("cfg", &self.cfg)
            .field("cached", &self.lock().len())
            .finish()
    }
}

impl Providers {
    /// Without `dns`, domains not in the table's `domains` lists are
    /// [`OTHER`].
    pub fn new(table: Arc<ProviderTable>, dns: Option<Arc<Dns>>, cfg: ProvidersCfg) -> Providers {
        Providers {
            table,
            dns,
            cfg,
            other: Arc::from(OTHER),
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub fn table(&self) -> &ProviderTable {
        &self.table
    }

    /// The provider of `domain` without waiting: a `domains` entry, a live
    /// cache entry, or [`OTHER`] for an invalid domain or without DNS;
    /// `None` means [`Providers::provider`] must look it up.
    pub fn cached(&self, domain: &str) -> Option<Arc<str>> {
        let Some(key) = normalize_domain(domain) else {
            return Some(self.other.clone());
        };
        if let Some(p) = self.known(&key, Instant::now()) {
            return Some(p);
        }
        // Without DNS there is nothing to wait for.
        self.dns.is_none().then(|| self.other.clone())
    }

    /// The provider of `domain`: its `domains` entry, else by MX (cached),
    /// else [`OTHER`]. An invalid domain is [`OTHER`] (and not cached). A
    /// temporary DNS failure is [`OTHER`] for `negative_ttl` only.
    pub async fn provider(&self, domain: &str) -> Arc<str> {
        let Some(key) = normalize_domain(domain) else {
            return self.other.clone();
        };
        if let Some(p) = self.known(&key, Instant::now()) {
            return p;
        }
        let Some(dns) = &self.dns else {
            return self.other.clone();
        };
        let (index, ttl) = match dns.lookup(&key, Rt::Mx).await {
            Ok(Answer::Mx(mx)) => (self.table.mx_index(&mx), self.cfg.positive_ttl),
            // RFC 5321 §5.1: no MX records, the domain is its own exchange.
            Ok(Answer::NoData) => (self.table.host_index(&key), self.cfg.positive_ttl),
            Ok(_) => (None, self.cfg.positive_ttl),
            Err(e) => {
                tracing::debug!(domain = %key, error = %e, "MX lookup failed; provider \"other\" for now");
                (None, self.cfg.negative_ttl)
            }
        };
        let provider = self.name(index);
        self.remember(&key, provider.clone(), ttl);
        provider
    }

    /// Whether domains are looked up by MX (else only the table's
    /// `domains` are known).
    pub fn looks_up(&self) -> bool {
        self.dns.is_some()
    }

    fn name(&self, index: Option<usize>) -> Arc<str> {
        match index {
            Some(i) => self.table.providers[i].name.clone(),
            None => self.other.clone(),
        }
    }

    fn known(&self, key: &str, now: Instant) -> Option<Arc<str>> {
        if let Some(i) = self.table.domain_index(key) {
            return Some(self.table.providers[i].name.clone());
        }
        let cache = self.lock();
        let (p, expires) = cache.get(key)?;
        (*expires > now).then(|| p.clone())
    }

    fn remember(&self, key: &str, provider: Arc<str>, ttl: Duration) {
        if ttl.is_zero() || self.cfg.max_entries == 0 {
            return;
        }
        let now = Instant::now();
        let mut cache = self.lock();
        if cache.len() >= self.cfg.max_entries && !cache.contains_key(key) {
            cache.retain(|_, (_, expires)| *expires > now);
            if cache.len() >= self.cfg.max_entries {
                // Arbitrary (hash order) eighth: cheap and good enough.
                let mut n = 0usize;
                cache.retain(|_, _| {
                    n += 1;
                    !n.is_multiple_of(8)
                });
            }
            if cache.len() >= self.cfg.max_entries {
                cache.clear();
            }
        }
        cache.insert(key.into(), (provider, now + ttl));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[cfg(test)]
    fn cache_len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mx(hosts: &[(u16, &str)]) -> Vec<(u16, Box<str>)> {
        hosts.iter().map(|(p, h)| (*p, Box::from(*h))).collect()
    }

    fn one(host: &str) -> Option<&'static str> {
        ProviderTable::builtin().by_mx(&mx(&[(10, host)]))
    }

    #[test]
    fn builtin_parses_and_covers_the_big_providers() {
        let t = ProviderTable::builtin();
        let names: Vec<&str> = t.names().collect();
        for want in [
            "google",
            "microsoft_consumer",
            "microsoft_365",
            "yahoo",
            "apple",
            "comcast",
            "gmx",
            "yandex",
            "mailru",
            "zoho",
            "proton",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        // Every built-in suffix and domain survived the merge.
        let total: usize = t.providers.iter().map(|p| p.mx.len()).sum();
        assert_eq!(total, t.suffixes.len());
        let total: usize = t.providers.iter().map(|p| p.domains.len()).sum();
        assert_eq!(total, t.domains.len());
    }

    #[test]
    fn real_mx_hosts_map_to_their_provider() {
        let cases: &[(&str, Option<&str>)] = &[
            ("aspmx.l.google.com", Some("google")),
            ("alt1.aspmx.l.google.com", Some("google")),
            ("gmail-smtp-in.l.google.com", Some("google")),
            ("smtp.google.com", Some("google")),
            ("aspmx2.googlemail.com", Some("google")),
            ("contoso-com.mail.protection.outlook.com", Some("microsoft_365")),
            ("contoso-com.a-v1.mx.microsoft", Some("microsoft_365")),
            ("hotmail-com.olc.protection.outlook.com", Some("microsoft_consumer")),
            ("outlook-com.olc.protection.outlook.com", Some("microsoft_consumer")),
            ("mta5.am0.yahoodns.net", Some("yahoo")),
            ("mx-aol.mail.gm0.yahoodns.net", Some("yahoo")),
            ("mx01.mail.icloud.com", Some("apple")),
            ("mx1.comcast.net", Some("comcast")),
            ("mx00.emig.gmx.net", Some("gmx")),
            ("mx00.gmx.net", Some("gmx")),
            ("mx-ha03.web.de", Some("gmx")),
            ("mx.yandex.ru", Some("yandex")),
            ("mx.yandex.net", Some("yandex")),
            ("mxs.mail.ru", Some("mailru")),
            ("mx.zoho.com", Some("zoho")),
            ("mx.zoho.eu", Some("zoho")),
            ("mail.protonmail.ch", Some("proton")),
            ("mailsec.protonmail.ch", Some("proton")),
            ("in1-smtp.messagingengine.com", Some("fastmail")),
            // Label boundary, case, trailing dot.
            ("notgoogle.com", None),
            ("evilgoogle.com", None),
            ("google.com.evil.example", None),
            ("outlook.com", None),
            ("ASPMX.L.GOOGLE.COM.", Some("google")),
            ("mx01.mail.icloud.com.", Some("apple")),
            ("Contoso-Com.Mail.Protection.Outlook.Com", Some("microsoft_365")),
            ("mx.example.net", None),
            ("com", None),
        ];
        for (host, want) in cases {
            assert_eq!(one(host), *want, "{host}");
        }
    }

    #[test]
    fn most_preferred_matching_exchange_wins() {
        let t = ProviderTable::builtin();
        type Case<'a> = (&'a [(u16, &'a str)], Option<&'a str>);
        let cases: &[Case] = &[
            // Listed later but preferred.
            (&[(20, "mx.zoho.com"), (5, "aspmx.l.google.com")], Some("google")),
            (&[(5, "aspmx.l.google.com"), (20, "mx.zoho.com")], Some("google")),
            // A non-matching preferred host is skipped (e.g. own backup MX).
            (&[(0, "mx.example.org"), (10, "mxs.mail.ru")], Some("mailru")),
            // Equal preference: the first listed.
            (&[(10, "mx.yandex.ru"), (10, "mxs.mail.ru")], Some("yandex")),
            (&[], None),
            // Null MX (RFC 7505).
            (&[(0, "")], None),
            (&[(0, ".")], None),
        ];
        for (list, want) in cases {
            assert_eq!(t.by_mx(&mx(list)), *want, "{list:?}");
        }
    }

    #[test]
    fn known_domains_need_no_lookup() {
        let t = ProviderTable::builtin();
        let cases: &[(&str, Option<&str>)] = &[
            ("gmail.com", Some("google")),
            ("GMail.COM.", Some("google")),
            ("hotmail.com", Some("microsoft_consumer")),
            ("aol.com", Some("yahoo")),
            ("me.com", Some("apple")),
            ("web.de", Some("gmx")),
            ("proton.me", Some("proton")),
            ("mail.gmail.com", None),
            ("example.com", None),
            ("", None),
            ("[192.0.2.1]", None),
        ];
        for (d, want) in cases {
            assert_eq!(t.by_domain(d), *want, "{d}");
        }
    }

    fn parse_err(text: &str) -> String {
        ProviderTable::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn validation_errors_name_the_field() {
        let cases: &[(&str, &str)] = &[
            (
                "[[provider]]\nname = \"a\"\nmx = [\"a.example\"]\n[[provider]]\nname = \"a\"\nmx = [\"b.example\"]\n",
                "provider[1].name: \"a\" is also the name of provider[0]",
            ),
            (
                "[[provider]]\nname = \"a\"\nmx = [\"a.example\"]\n[[provider]]\nname = \"b\"\nmx = [\"b.example\", \"A.Example\"]\n",
                "provider[1].mx[1]: \"a.example\" is already claimed by provider[0].mx[0] (\"a\")",
            ),
            (
                "[[provider]]\nname = \"a\"\nmx = [\"a.example\"]\ndomains = [\"x.example\", \"x.example\"]\n",
                "provider[0].domains[1]: \"x.example\" is already claimed by provider[0].domains[0] (\"a\")",
            ),
            (
                "[[provider]]\nname = \"Google\"\nmx = [\"a.example\"]\n",
                "provider[0].name: \"Google\" is not a token",
            ),
            (
                "[[provider]]\nname = \"other\"\nmx = [\"a.example\"]\n",
                "provider[0].name: \"other\" is reserved",
            ),
            ("[[provider]]\nname = \"a\"\nmx = []\n", "provider[0].mx: empty list"),
            (
                "[[provider]]\nname = \"a\"\nmx = [\"a.example\"]\ndomains = []\n",
                "provider[0].domains: empty list",
            ),
            (
                "[[provider]]\nname = \"a\"\nmx = [\".a.example\"]\n",
                "provider[0].mx[0]: \".a.example\": no leading dot",
            ),
            (
                "[[provider]]\nname = \"a\"\nmx = [\"a example\"]\n",
                "provider[0].mx[0]: \"a example\" contains white space",
            ),
            (
                "[[provider]]\nname = \"a\"\nmx = [\"localhost\"]\n",
                "provider[0].mx[0]: \"localhost\" needs at least two",
            ),
            (
                "[[provider]]\nname = \"a\"\nmx = [\"a..example\"]\n",
                "provider[0].mx[0]: \"a..example\" is not a host",
            ),
            (
                "[[provider]]\nname = \"a\"\nmx = [\"a.example\"]\n[[provider]]\nname = \"b\"\nmxs = [\"b.example\"]\n",
                "provider[1].mxs: unknown field `mxs`",
            ),
            ("[[provider]]\nname = \"a\"\n", "provider[0]: missing field `mx`"),
            (
                "[[provider]]\nname = \"a\"\nmx = \"a.example\"\n",
                "provider[0].mx: invalid type",
            ),
            ("[providers]\n", "providers: unknown field `providers`"),
        ];
        for (text, want) in cases {
            let got = parse_err(text);
            assert!(got.starts_with(want), "got {got:?}, want {want:?}");
        }
    }

    #[test]
    fn suffixes_are_lowercased_and_idna_converted() {
        let t = ProviderTable::parse(
            "[[provider]]\nname = \"a\"\nmx = [\"MX.Example.NET.\"]\ndomains = [\"Bücher.example\"]\n",
        )
        .unwrap();
        assert_eq!(t.by_mx(&mx(&[(1, "in.mx.example.net")])), Some("a"));
        assert_eq!(t.by_domain("xn--bcher-kva.example"), Some("a"));
        assert_eq!(t.by_domain("BÜCHER.example"), Some("a"));
    }

    #[test]
    fn an_empty_file_is_an_empty_table() {
        assert!(ProviderTable::parse("# nothing\n").unwrap().is_empty());
    }

    #[test]
    fn load_merges_with_builtin_or_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("providers.toml");
        std::fs::write(
            &path,
            r#"
# Our Workspace MX gets its own bucket; "google.com" stays Google's.
[[provider]]
name = "google_workspace"
mx = ["aspmx.l.google.com"]

# Replaces the built-in "yahoo" entry: AOL only.
[[provider]]
name = "yahoo"
mx = ["mx.aol.com"]
domains = ["aol.com"]

# Takes a built-in domain away from its provider.
[[provider]]
name = "corp"
mx = ["mail.corp.example"]
domains = ["corp.example", "me.com"]
"#,
        )
        .unwrap();

        let merged = ProviderTable::load(&path, false).unwrap();
        let names: Vec<&str> = merged.names().collect();
        assert_eq!(&names[..3], &["google_workspace", "yahoo", "corp"]);
        assert_eq!(names.iter().filter(|n| **n == "yahoo").count(), 1);
        assert!(names.contains(&"microsoft_365"));
        let cases: &[(&str, Option<&str>)] = &[
            ("alt2.aspmx.l.google.com", Some("google_workspace")),
            ("gmail-smtp-in.l.google.com", Some("google")),
            ("mx-aol.mail.gm0.yahoodns.net", None),
            ("mailin-01.mx.aol.com", Some("yahoo")),
            ("mx.mail.corp.example", Some("corp")),
        ];
        for (host, want) in cases {
            assert_eq!(merged.by_mx(&mx(&[(1, host)])), *want, "{host}");
        }
        assert_eq!(merged.by_domain("yahoo.com"), None);
        assert_eq!(merged.by_domain("me.com"), Some("corp"));
        assert_eq!(merged.by_domain("icloud.com"), Some("apple"));

        let replaced = ProviderTable::load(&path, true).unwrap();
        assert_eq!(
            replaced.names().collect::<Vec<_>>(),
            ["google_workspace", "yahoo", "corp"]
        );
        assert_eq!(replaced.by_mx(&mx(&[(1, "gmail-smtp-in.l.google.com")])), None);

        std::fs::write(&path, "[[provider]]\nname = \"a\"\nmx = [\"x\"]\n").unwrap();
        let e = ProviderTable::load(&path, false).unwrap_err();
        assert_eq!(e.key, format!("{}: provider[0].mx[0]", path.display()));
        assert!(ProviderTable::load(&dir.path().join("missing.toml"), false).is_err());
    }

    #[tokio::test]
    async fn providers_without_dns_use_the_fast_path_else_other() {
        let p = Providers::new(
            Arc::new(ProviderTable::builtin().clone()),
            None,
            ProvidersCfg::default(),
        );
        assert_eq!(&*p.provider("gmail.com").await, "google");
        assert_eq!(&*p.provider("Hotmail.COM.").await, "microsoft_consumer");
        assert_eq!(&*p.provider("example.com").await, OTHER);
        assert_eq!(&*p.provider("not a domain").await, OTHER);
        assert_eq!(p.cached("gmail.com").as_deref(), Some("google"));
        // Without DNS there is nothing to look up: other, at once.
        assert_eq!(p.cached("example.com").as_deref(), Some(OTHER));
        // Interned: the same allocation every time.
        let (a, b) = (p.provider("gmail.com").await, p.provider("googlemail.com").await);
        assert!(Arc::ptr_eq(&a, &b));
        let (a, b) = (p.provider("a.example").await, p.provider("b.example").await);
        assert!(Arc::ptr_eq(&a, &b));
    }

    #[test]
    fn cache_expires_and_stays_bounded() {
        let cfg = ProvidersCfg {
            max_entries: 16,
            ..ProvidersCfg::default()
        };
        let p = Providers::new(Arc::new(ProviderTable::builtin().clone()), None, cfg);
        let google = p.name(Some(0));
        for i in 0..100 {
            p.remember(&format!("d{i}.example"), google.clone(), Duration::from_secs(60));
            assert!(p.cache_len() <= 16);
        }
        assert_eq!(p.known("d99.example", Instant::now()).as_deref(), Some("google"));
        p.remember("gone.example", google.clone(), Duration::from_nanos(1));
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(p.known("gone.example", Instant::now()), None);
        p.remember("never.example", google, Duration::ZERO);
        assert_eq!(p.known("never.example", Instant::now()), None);
    }
}
