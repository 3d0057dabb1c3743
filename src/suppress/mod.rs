//! The suppression list: recipients that must not be mailed (hard bounces,
//! complaints, unsubscribes, manual entries), globally or for one tenant.
//!
//! Behind the [`SuppressionStore`] trait: the embedded store
//! ([`embedded::Embedded`], an in-memory index over an fsynced append-only
//! log) is the default; a shared store for fleets implements the same trait
//! and keeps a local replica, so [`SuppressionStore::lookup`] is always a
//! memory lookup on the RCPT hot path.
//!
//! Addresses are compared as RFC 5321 §2.4 allows operators to: the domain
//! case-insensitively (and in its IDNA ASCII form), the local part
//! case-insensitively too (every large mailbox provider treats it so).
//!
//! Trust boundary: entries come from the admin API (token-authenticated),
//! from upstream replies (classified bounces) and from feedback reports;
//! every address is parsed and normalized before it is stored.

pub mod arf;
pub mod embedded;
pub mod shared;
pub mod transfer;

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Why an address is suppressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    HardBounce,
    Complaint,
    Unsubscribe,
    Manual,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::HardBounce => "hard_bounce",
            Reason::Complaint => "complaint",
            Reason::Unsubscribe => "unsubscribe",
            Reason::Manual => "manual",
        }
    }

    pub fn parse(s: &str) -> Option<Reason> {
        Some(match s {
            "hard_bounce" => Reason::HardBounce,
            "complaint" => Reason::Complaint,
            "unsubscribe" => Reason::Unsubscribe,
            "manual" => Reason::Manual,
            _ => return None,
        })
    }
}

/// One suppression.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Normalized address (see [`normalize`]).
    pub address: String,
    /// `None`: suppressed for every tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub reason: Reason,
    /// What caused it: the upstream reply, the feedback report, the operator.
    #[serde(default)]
    pub source: String,
    /// Unix ms.
    pub created_ms: u64,
    /// Unix ms after which the entry no longer applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<u64>,
}

impl Entry {
    pub fn is_live(&self, now_ms: u64) -> bool {
        self.expires_ms.is_none_or(|e| e > now_ms)
    }

    /// `global` or `tenant`.
    pub fn scope(&self) -> &'static str {
        if self.tenant.is_some() { "tenant" } else { "global" }
    }
}

pub use crate::queue::now_ms;

pub fn rfc3339_ms(ms: u64) -> String {
    crate::events::rfc3339(UNIX_EPOCH + Duration::from_millis(ms))
}

/// Normalize an address for storage and lookup: `local@domain` with the
/// domain in lower-case IDNA ASCII form and the local part lower-cased.
/// Accepts an optional `<...>`. Returns a reason on bad syntax.
pub fn normalize(addr: &str) -> Result<String, &'static str> {
    let a = addr.trim();
    let a = a.strip_prefix('<').and_then(|x| x.strip_suffix('>')).unwrap_or(a);
    if a.is_empty() {
        return Err("empty address");
    }
    let m = crate::smtp::address::parse_mailbox(a).map_err(|_| "not a valid address (local@domain)")?;
    normalize_mailbox(&m)
}

/// [`normalize`] for an address already parsed (a RCPT's).
pub fn normalize_mailbox(m: &crate::smtp::Mailbox) -> Result<String, &'static str> {
    if m.domain.starts_with('[') {
        // Address literals are never a mailbox provider's recipient.
        return Err("address literals are not accepted");
    }
    let domain = crate::dns::ascii_domain(&m.domain).ok_or("the domain is not a valid domain name")?;
    Ok(format!("{}@{}", m.local.to_lowercase(), domain))
}

/// Filter for [`SuppressionStore::list`].
#[derive(Debug, Clone, Default)]
pub struct Query {
    /// Substring of the normalized address.
    pub contains: Option<String>,
    /// Only entries of this tenant (`Some("")` never matches).
    pub tenant: Option<String>,
    /// Only global entries.
    pub global_only: bool,
    pub reason: Option<Reason>,
    /// Entries after this many matches (paging).
    pub offset: usize,
    pub limit: usize,
}

impl Query {
    pub fn matches(&self, e: &Entry) -> bool {
        self.matches_parts(&e.address, e.tenant.as_deref(), e.reason)
    }

    /// [`Query::matches`] on borrowed parts (no `Entry` built).
    pub fn matches_parts(&self, address: &str, tenant: Option<&str>, reason: Reason) -> bool {
        self.contains.as_deref().is_none_or(|c| address.contains(c))
            && self.tenant.as_deref().is_none_or(|t| tenant == Some(t))
            && (!self.global_only || tenant.is_none())
            && self.reason.is_none_or(|r| reason == r)
    }
}

pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = std::io::Result<T>> + Send + 'a>>;

/// Where suppressions live.
pub trait SuppressionStore: Send + Sync {
    /// The live entry that suppresses `address` (already normalized) for
    /// `tenant`: a tenant entry first, then a global one. A memory lookup.
    fn lookup(&self, tenant: &str, address: &str) -> Option<Entry>;

    /// Add or replace (same address and scope) entries, durably, all or
    /// none. Returns how many were new.
    fn add(&self, entries: Vec<Entry>) -> StoreFuture<'_, usize>;

    /// Remove the entry of this address and scope; `true` if there was one.
    fn remove(&self, address: String, tenant: Option<String>) -> StoreFuture<'_, bool>;

    /// Live entries matching `q`, ordered by address then scope.
    fn list(&self, q: &Query) -> Vec<Entry>;

    /// Number of entries stored (expired ones count until the store drops
    /// them, at compaction).
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalization() {
        assert_eq!(normalize("User.Name@Example.COM").unwrap(), "user.name@example.com");
        assert_eq!(normalize("<a@b.example>").unwrap(), "a@b.example");
        assert_eq!(normalize(" a@b.example ").unwrap(), "a@b.example");
        assert_eq!(normalize("Ünï@BÜCHER.example").unwrap(), "ünï@xn--bcher-kva.example");
        assert_eq!(
            normalize("ünï@xn--bcher-kva.example").unwrap(),
            "ünï@xn--bcher-kva.example"
        );
        for bad in [
            "",
            "nobody",
            "a@",
            "@b.example",
            "a b@c.example",
            "a@[192.0.2.1]",
            "a@b..c",
            "<>",
        ] {
            assert!(normalize(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn query_filters() {
        let e = Entry {
            address: "a@b.example".into(),
            tenant: Some("acme".into()),
            reason: Reason::Complaint,
            source: String::new(),
            created_ms: 1,
            expires_ms: Some(10),
        };
        assert!(e.is_live(9) && !e.is_live(10));
        let q = |f: fn(&mut Query)| {
            let mut q = Query::default();
            f(&mut q);
            q.matches(&e)
        };
        assert!(q(|_| {}));
        assert!(q(|q| q.contains = Some("b.ex".into())));
        assert!(!q(|q| q.contains = Some("zz".into())));
        assert!(q(|q| q.tenant = Some("acme".into())));
        assert!(!q(|q| q.tenant = Some("other".into())));
        assert!(!q(|q| q.global_only = true));
        assert!(!q(|q| q.reason = Some(Reason::HardBounce)));
    }
}
