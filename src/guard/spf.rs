//! SPF record checks mail-auth does not make (see docs/notes/guard-research.md §6):
//! the number of `v=spf1` records at a name (RFC 7208 §4.5: more than one is
//! a permerror, mail-auth picks one by answer order), and a walk of the
//! include/redirect tree counting DNS-querying terms (§4.6.4, limit 10) and
//! finding include loops, so the finding can say *why* SPF fails.
//!
//! Trust boundary: records are untrusted DNS data; the walk is bounded in
//! depth and in lookups.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use mail_auth::SpfResult;
use mail_auth::spf::verify::SpfParameters;

use crate::dns::{Answer, Dns, Rt, TempFail};

/// RFC 7208 §4.6.4.
pub const LOOKUP_LIMIT: usize = 10;
/// RFC 7208 §4.6.4: lookups that find no name or no records, beyond which
/// evaluation SHOULD be a permerror.
pub const VOID_LIMIT: usize = 2;

/// The `v=spf1` records among a TXT set (§4.5: "v=spf1" then a space or the end).
pub fn spf_records(txt: &[Box<[u8]>]) -> Vec<String> {
    txt.iter()
        .filter(|r| r.len() >= 6 && r[..6].eq_ignore_ascii_case(b"v=spf1") && (r.len() == 6 || r[6] == b' '))
        .map(|r| String::from_utf8_lossy(r).into_owned())
        .collect()
}

/// What the walk found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Walk {
    /// DNS-querying terms counted (include, a, mx, ptr, exists, redirect).
    pub lookups: usize,
    /// `a -> b -> a`, when an include/redirect chain comes back to a domain on it.
    pub loop_path: Option<Vec<String>>,
    /// An include/redirect target without exactly one SPF record.
    pub broken_target: Option<(String, String)>,
    /// A domain-spec that is not a valid name (RFC 7208 §4.6.1: permerror;
    /// mail-auth reports it as a temperror, which would mean endless 4xx).
    pub bad_name: Option<String>,
    /// A record with characters SPF does not allow (terms are separated by
    /// spaces only, the record is printable ASCII: RFC 7208 §4.6.1, §12).
    pub bad_syntax: bool,
    /// `a`, `mx` and `exists` terms (without macros) as written, with the
    /// kind and the name each looks up: the candidates for void lookups
    /// (§4.6.4), resolved by [`void_lookups`] where a caller wants them.
    pub lookup_terms: Vec<LookupTerm>,
}

/// A DNS-querying term of the record tree and the name it queries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LookupTerm {
    pub term: String,
    pub kind: LookupKind,
    pub host: String,
}

/// The mechanisms whose lookup can be void (`ptr` depends on the client).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupKind {
    A,
    Mx,
    Exists,
}

/// Walk `domain`'s record (already fetched as `record`).
pub async fn walk(dns: &Arc<Dns>, domain: &str, record: &str) -> Result<Walk, TempFail> {
    let mut w = Walk::default();
    let mut stack = vec![domain.to_string()];
    walk_record(dns, record, &mut stack, &mut w).await?;
    Ok(w)
}

type WalkFuture<'a> = Pin<Box<dyn Future<Output = Result<(), TempFail>> + Send + 'a>>;

fn walk_record<'a>(dns: &'a Arc<Dns>, record: &'a str, stack: &'a mut Vec<String>, w: &'a mut Walk) -> WalkFuture<'a> {
    Box::pin(async move {
        if !syntax_ok(record) {
            w.bad_syntax = true;
            return Ok(());
        }
        // RFC 7208 §6.1: redirect is ignored when the record has "all".
        let has_all = record
            .split(' ')
            .any(|t| t.trim_start_matches(['+', '-', '~', '?']).eq_ignore_ascii_case("all"));
        for term in record.split(' ').skip(1).filter(|t| !t.is_empty()) {
            if w.lookups > LOOKUP_LIMIT
                || w.loop_path.is_some()
                || w.broken_target.is_some()
                || w.bad_name.is_some()
                || w.bad_syntax
            {
                return Ok(());
            }
            let t = term.to_ascii_lowercase();
            let t = t.trim_start_matches(['+', '-', '~', '?']);
            let target = if let Some(d) = t.strip_prefix("include:") {
                w.lookups += 1;
                Some(d.to_string())
            } else if let Some(d) = t.strip_prefix("redirect=") {
                if has_all {
                    // Not followed, but still has to be a valid domain-spec.
                    let target = d.trim_end_matches('.');
                    if !target.contains('%') && !valid_name(target) {
                        w.bad_name = Some(target.to_string());
                        return Ok(());
                    }
                    continue;
                }
                w.lookups += 1;
                Some(d.to_string())
            } else {
                let name = t.split([':', '/']).next().unwrap_or("");
                if matches!(name, "a" | "mx" | "ptr" | "exists") {
                    w.lookups += 1;
                    let spec = t.strip_prefix(name).and_then(|r| r.strip_prefix(':'));
                    let spec = spec.map(|s| s.split('/').next().unwrap_or(""));
                    if let Some(spec) = spec
                        && !spec.contains('%')
                        && !valid_name(spec)
                    {
                        w.bad_name = Some(spec.to_string());
                        return Ok(());
                    }
                    // The name the term looks up: its domain-spec or the
                    // record's own domain.
                    let host = match spec {
                        Some(s) => s.trim_end_matches('.'),
                        None => stack.last().map(String::as_str).unwrap_or(""),
                    };
                    let kind = match name {
                        "a" => Some(LookupKind::A),
                        "mx" => Some(LookupKind::Mx),
                        "exists" => Some(LookupKind::Exists),
                        _ => None, // ptr: depends on the client
                    };
                    if let Some(kind) = kind
                        && !host.is_empty()
                        && !host.contains('%')
                    {
                        w.lookup_terms.push(LookupTerm {
                            term: term.to_string(),
                            kind,
                            host: host.to_string(),
                        });
                    }
                }
                None
            };
            let Some(target) = target else { continue };
            // Targets with macros depend on the message; not followed.
            if target.contains('%') {
                continue;
            }
            let target = target.trim_end_matches('.').to_string();
            if !valid_name(&target) {
                w.bad_name = Some(target);
                return Ok(());
            }
            if let Some(pos) = stack.iter().position(|d| *d == target) {
                let mut path = stack[pos..].to_vec();
                path.push(target);
                w.loop_path = Some(path);
                return Ok(());
            }
            let records = match dns.lookup(&target, Rt::Txt).await? {
                Answer::Txt(txt) => spf_records(&txt),
                _ => Vec::new(),
            };
            if records.len() != 1 {
                let why = if records.is_empty() {
                    "has no SPF record"
                } else {
                    "has more than one SPF record"
                };
                w.broken_target = Some((target, why.to_string()));
                return Ok(());
            }
            stack.push(target);
            walk_record(dns, &records[0], stack, w).await?;
            stack.pop();
        }
        Ok(())
    })
}

/// The terms of `terms` whose lookup finds no name or no records (void
/// lookups, RFC 7208 §4.6.4), as written. An `a` term asks for the address
/// family of the clients: `v4`/`v6` say which the relay's egress IPs have
/// (neither known: void only without both). A lookup that fails for now is
/// not counted: it is not known to be void. The lookups run at once, so a
/// record with several dead names costs one DNS timeout, not one each.
pub async fn void_lookups(dns: &Arc<Dns>, terms: &[LookupTerm], v4: bool, v6: bool) -> Vec<String> {
    let families: &[Rt] = match (v4, v6) {
        (true, false) => &[Rt::A],
        (false, true) => &[Rt::Aaaa],
        _ => &[Rt::A, Rt::Aaaa],
    };
    let all_families = v4 && v6;
    let checks = terms.iter().map(|t| async move {
        let types: &[Rt] = match t.kind {
            LookupKind::Mx => &[Rt::Mx],
            LookupKind::Exists => &[Rt::A],
            LookupKind::A => families,
        };
        let answers = futures_util::future::join_all(types.iter().map(|rt| dns.lookup(&t.host, *rt))).await;
        let negative = |a: &crate::dns::Lookup| matches!(a, Ok(a) if a.is_negative());
        // With IPv4 and IPv6 egress, an `a` term missing either family is
        // void for some receivers.
        let void = if t.kind == LookupKind::A && all_families {
            answers.iter().any(negative) && answers.iter().all(|a| a.is_ok())
        } else {
            answers.iter().all(negative)
        };
        void.then(|| t.term.clone())
    });
    futures_util::future::join_all(checks)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// RFC 7208 `check_host()` for (ip, MAIL FROM or HELO identity): mail-auth's
/// evaluation, corrected where it deviates from the RFC in ways that matter
/// for a verdict: several SPF records, include loops and invalid domain
/// names in the record are a permerror.
/// `sender` is the MAIL FROM address, or empty for the HELO identity.
pub async fn check_host(dns: &Arc<Dns>, ip: std::net::IpAddr, helo: &str, host: &str, sender: &str) -> SpfResult {
    let domain = match sender.rsplit_once('@') {
        Some((_, d)) => d,
        None if sender.is_empty() => helo,
        None => sender,
    };
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let record = match dns.lookup(&domain, Rt::Txt).await {
        Err(_) => return SpfResult::TempError,
        Ok(Answer::Txt(txt)) => {
            let records = spf_records(&txt);
            if records.len() > 1 {
                return SpfResult::PermError;
            }
            records.into_iter().next()
        }
        Ok(_) => None,
    };
    // Checks on the record tree mail-auth does not make: characters,
    // domain-specs that are not names (mail-auth: temperror), loops.
    if let Some(record) = &record
        && let Ok(w) = walk(dns, &domain, record).await
        && (w.bad_syntax || w.bad_name.is_some() || w.loop_path.is_some())
    {
        return SpfResult::PermError;
    }
    let params = if sender.is_empty() {
        SpfParameters::verify_ehlo(ip, helo, host)
    } else {
        SpfParameters::verify_mail_from(ip, helo, host, sender)
    };
    dns.auth().verify_spf(dns.caches.params(params)).await.result()
}

/// Printable ASCII and spaces only.
pub fn syntax_ok(record: &str) -> bool {
    record.bytes().all(|b| (0x20..0x7f).contains(&b))
}

/// A domain-spec usable as a DNS name: LDH labels of 1–63 octets (the
/// underscore is allowed: `_spf.example`), at least two labels, and a top
/// label that is not all digits (RFC 7208 §7.1 toplabel).
fn valid_name(d: &str) -> bool {
    let d = d.trim_end_matches('.');
    d.len() <= 253
        && d.contains('.')
        && !d
            .rsplit('.')
            .next()
            .is_some_and(|top| top.bytes().all(|b| b.is_ascii_digit()))
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_spf1_records() {
        let txt: Vec<Box<[u8]>> = vec![
            b"v=spf1 -all".to_vec().into(),
            b"V=SPF1 ip4:192.0.2.1 -all".to_vec().into(),
            b"v=spf10 -all".to_vec().into(),
            b"google-site-verification=x".to_vec().into(),
            b"v=spf1".to_vec().into(),
        ];
        assert_eq!(spf_records(&txt).len(), 3);
    }

    #[test]
    fn domain_specs() {
        assert!(valid_name("_spf.example.com"));
        assert!(valid_name("mail.example.com."));
        assert!(!valid_name("example.com:8080"));
        assert!(!valid_name("foo.-bar.example"));
        assert!(!valid_name("localhost"));
        assert!(!valid_name(&format!("{}.example", "a".repeat(64))));
    }
}
