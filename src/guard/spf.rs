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
        for term in record.split_ascii_whitespace().skip(1) {
            if w.lookups > LOOKUP_LIMIT || w.loop_path.is_some() || w.broken_target.is_some() {
                return Ok(());
            }
            let t = term.to_ascii_lowercase();
            let t = t.trim_start_matches(['+', '-', '~', '?']);
            let target = if let Some(d) = t.strip_prefix("include:") {
                w.lookups += 1;
                Some(d.to_string())
            } else if let Some(d) = t.strip_prefix("redirect=") {
                w.lookups += 1;
                Some(d.to_string())
            } else {
                let name = t.split([':', '/']).next().unwrap_or("");
                if matches!(name, "a" | "mx" | "ptr" | "exists") {
                    w.lookups += 1;
                }
                None
            };
            let Some(target) = target else { continue };
            // Targets with macros depend on the message; not followed.
            if target.contains('%') {
                continue;
            }
            let target = target.trim_end_matches('.').to_string();
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

/// RFC 7208 `check_host()` for (ip, MAIL FROM or HELO identity): mail-auth's
/// evaluation, corrected where it deviates from the RFC in ways that matter
/// for a verdict: several SPF records and include loops are a permerror.
/// `sender` is the MAIL FROM address, or empty for the HELO identity.
pub async fn check_host(dns: &Arc<Dns>, ip: std::net::IpAddr, helo: &str, host: &str, sender: &str) -> SpfResult {
    let domain = match sender.rsplit_once('@') {
        Some((_, d)) => d,
        None if sender.is_empty() => helo,
        None => sender,
    };
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    if let Ok(Answer::Txt(txt)) = dns.lookup(&domain, Rt::Txt).await {
        let records = spf_records(&txt);
        if records.len() > 1 {
            return SpfResult::PermError;
        }
        if let [record] = records.as_slice()
            && let Ok(w) = walk(dns, &domain, record).await
            && w.loop_path.is_some()
        {
            return SpfResult::PermError;
        }
    }
    let params = if sender.is_empty() {
        SpfParameters::verify_ehlo(ip, helo, host)
    } else {
        SpfParameters::verify_mail_from(ip, helo, host, sender)
    };
    dns.auth().verify_spf(dns.caches.params(params)).await.result()
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
}
