//! Domain health of one sender domain, in the order the field's triage
//! guides use: SPF → DKIM → DMARC → MX → blocklists.
//!
//! Every check reads DNS through [`Dns`] (cached). A temporary DNS failure
//! in SPF, DKIM, DMARC or MX makes the whole evaluation temporary (the
//! caller answers `451 4.4.3`); blocklist lookups that fail are reported as
//! "not checked" instead, since a DNSBL outage must not stop mail.
//!
//! Trust boundary: all records are untrusted DNS data, parsed by mail-auth.

use std::net::IpAddr;
use std::sync::Arc;

use mail_auth::SpfResult;
use mail_auth::common::parse::TxtRecordParser;
use mail_auth::common::verify::DomainKey;
use mail_auth::dkim::DkimError;
use mail_auth::dmarc::{Alignment, Dmarc};
use mail_auth::spf::verify::SpfParameters;

use super::report::{DmarcInfo, Finding, Health, Policy, RelaySpf, Severity};
use super::spf::{self, LOOKUP_LIMIT, VOID_LIMIT};
use crate::dns::{Answer, Dns, Rt, TempFail};
use crate::smtp::Enhanced;

/// What the checks need besides the domain.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    /// The IPs receivers see for mail from the relay (`relay.egress_ips`).
    pub relay_ips: Vec<IpAddr>,
    /// The relay's EHLO name (SPF `%{h}`), also our host name for `%{r}`.
    pub helo: String,
    /// Selectors that must be published for the domain.
    pub selectors: Vec<String>,
    pub dnsbl_ip_zones: Vec<String>,
    pub dnsbl_domain_zones: Vec<String>,
    /// (selector, public key) when sendguard signs for the domain: the
    /// published key must be this one.
    pub signing_key: Option<(String, Vec<u8>)>,
}

/// The organizational domain (RFC 7489 §3.2, public suffix list).
pub fn org_domain(domain: &str) -> &str {
    psl::domain_str(domain).unwrap_or(domain)
}

/// Evaluate `domain` (lower-case A-labels).
pub async fn evaluate(dns: &Arc<Dns>, domain: &str, inp: &Inputs) -> Result<Health, TempFail> {
    let mut f = Vec::new();
    let txt = dns.lookup(domain, Rt::Txt).await?;
    let mx = dns.lookup(domain, Rt::Mx).await?;
    // Two answers decide alone: the domain does not exist (neither TXT nor
    // MX: a domain with only an MX exists), or it publishes a null MX
    // (RFC 7505: it sends and receives no mail, whatever its SPF says).
    let gone = |a: &Answer| matches!(a, Answer::NxDomain | Answer::BadName);
    let decisive = if gone(&txt) && gone(&mx) {
        Some(
            Finding::new(
                "mx",
                Severity::Error,
                "sender_domain_not_found",
                "the domain does not exist (NXDOMAIN)",
            )
            .fix("send from a registered domain, or check the sender address for typos")
            .code(Enhanced(5, 1, 8)),
        )
    } else if matches!(&mx, Answer::Mx(m) if is_null_mx(m)) {
        Some(
            Finding::new(
                "mx",
                Severity::Error,
                "sender_null_mx",
                "the domain publishes a null MX (RFC 7505): it declares it sends and receives no mail",
            )
            .fix("send from a domain that accepts mail, or replace the null MX with real MX records")
            .code(Enhanced(5, 7, 27)),
        )
    } else {
        None
    };
    if let Some(finding) = decisive {
        return Ok(Health::new(
            domain,
            vec![finding],
            None,
            RelaySpf::NotPass("none".into()),
            None,
        ));
    }

    // SPF
    let records = match &txt {
        Answer::Txt(t) => spf::spf_records(t),
        _ => Vec::new(),
    };
    let relay_list = ip_list(&inp.relay_ips);
    let mut spf_record = None;
    let mut relay_spf = RelaySpf::NotPass("none".into());
    match records.len() {
        0 => f.push(
            Finding::new(
                "spf",
                Severity::Warning,
                "spf_missing",
                "no SPF record: receivers see spf=none",
            )
            .fix(format!(
                "publish one TXT record \"v=spf1 {} -all\"",
                spf_mechanisms(&inp.relay_ips)
            )),
        ),
        1 => {
            let record = records[0].clone();
            spf_checks(dns, domain, &record, inp, &relay_list, &mut f, &mut relay_spf).await?;
            spf_record = Some(record);
        }
        n => f.push(
            Finding::new(
                "spf",
                Severity::Error,
                "spf_multiple_records",
                format!("{n} SPF records are published; receivers treat this as a permanent error (RFC 7208 §4.5)"),
            )
            .fix("merge them into a single v=spf1 TXT record")
            .code(Enhanced(5, 7, 24)),
        ),
    }

    // DKIM
    if inp.selectors.is_empty() {
        f.push(Finding::new(
            "dkim",
            Severity::Info,
            "dkim_unchecked",
            "no DKIM selectors are configured for this domain; keys not checked",
        ));
    }
    for sel in &inp.selectors {
        let key = inp
            .signing_key
            .as_ref()
            .filter(|(s, _)| s == sel)
            .map(|(_, k)| k.as_slice());
        if let Some(finding) = dkim_check(dns, domain, sel, key).await? {
            f.push(finding);
        }
    }

    // DMARC
    let dmarc = dmarc_check(dns, domain, &mut f).await?;

    // MX
    mx_check(dns, domain, &mx, &mut f).await?;

    // Blocklists
    blocklist_checks(dns, domain, inp, &mut f).await;

    Ok(Health::new(domain, f, spf_record, relay_spf, dmarc))
}

fn ip_list(ips: &[IpAddr]) -> String {
    ips.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
}

/// How bad a non-pass SPF result is for the mail: fail (receivers may
/// reject, RFC 7208 §8.4) over permerror over softfail over neutral/none.
fn spf_rank(r: SpfResult) -> u8 {
    match r {
        SpfResult::Fail => 4,
        SpfResult::PermError => 3,
        SpfResult::SoftFail => 2,
        SpfResult::Neutral => 1,
        _ => 0,
    }
}

fn spf_mechanisms(ips: &[IpAddr]) -> String {
    if ips.is_empty() {
        return "<your relay's mechanisms>".to_string();
    }
    ips.iter()
        .map(|ip| match ip {
            IpAddr::V4(v4) => format!("ip4:{v4}"),
            IpAddr::V6(v6) => format!("ip6:{v6}"),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

async fn spf_checks(
    dns: &Arc<Dns>,
    domain: &str,
    record: &str,
    inp: &Inputs,
    relay_list: &str,
    f: &mut Vec<Finding>,
    relay_spf: &mut RelaySpf,
) -> Result<(), TempFail> {
    if mail_auth::spf::Spf::parse(record.as_bytes()).is_err() {
        f.push(
            Finding::new(
                "spf",
                Severity::Error,
                "spf_syntax",
                format!("the SPF record does not parse: \"{record}\""),
            )
            .fix("correct the record's syntax (RFC 7208 §12)")
            .code(Enhanced(5, 7, 24)),
        );
        return Ok(());
    }
    let walk = spf::walk(dns, domain, record).await?;
    if let Some(path) = &walk.loop_path {
        f.push(
            Finding::new(
                "spf",
                Severity::Error,
                "spf_include_loop",
                format!("SPF include loop: {}", path.join(" -> ")),
            )
            .fix("remove the include or redirect that points back into the chain")
            .code(Enhanced(5, 7, 24)),
        );
    } else if walk.lookups > LOOKUP_LIMIT {
        f.push(
            Finding::new(
                "spf",
                Severity::Error,
                "spf_too_many_lookups",
                format!(
                    "SPF needs more than {LOOKUP_LIMIT} DNS lookups (counted {} before stopping); receivers return permerror (RFC 7208 §4.6.4)",
                    walk.lookups
                ),
            )
            .fix("flatten includes or replace a/mx mechanisms with ip4/ip6 ranges")
            .code(Enhanced(5, 7, 24)),
        );
    } else if walk.bad_syntax {
        f.push(
            Finding::new(
                "spf",
                Severity::Error,
                "spf_syntax",
                "an SPF record in the include chain has characters SPF does not allow (control or non-ASCII)",
            )
            .fix("publish the record as printable ASCII with single spaces between terms (RFC 7208 §12)")
            .code(Enhanced(5, 7, 24)),
        );
        return Ok(());
    } else if let Some(name) = &walk.bad_name {
        f.push(
            Finding::new(
                "spf",
                Severity::Error,
                "spf_syntax",
                format!("the SPF record names \"{name}\", which is not a valid domain; receivers return permerror"),
            )
            .fix("correct the domain in the record (RFC 7208 §4.6.1)")
            .code(Enhanced(5, 7, 24)),
        );
        return Ok(());
    } else if let Some((target, why)) = &walk.broken_target {
        f.push(
            Finding::new(
                "spf",
                Severity::Error,
                "spf_permerror",
                format!("SPF include/redirect target {target} {why}; receivers return permerror"),
            )
            .fix(format!("fix the SPF record of {target} or stop including it"))
            .code(Enhanced(5, 7, 24)),
        );
    }
    let (v4, v6) = (
        inp.relay_ips.iter().any(IpAddr::is_ipv4),
        inp.relay_ips.iter().any(IpAddr::is_ipv6),
    );
    let void = spf::void_lookups(dns, &walk.lookup_terms, v4, v6).await;
    if void.len() > VOID_LIMIT {
        // A warning, not an error: the count is static (terms an evaluation
        // reaches only after a match are counted too), and receivers differ
        // in applying this SHOULD; those that do return permerror.
        f.push(
            Finding::new(
                "spf",
                Severity::Warning,
                "spf_void_lookups",
                format!(
                    "SPF terms look up names with no records: {} ({} void lookups; RFC 7208 §4.6.4 allows {VOID_LIMIT}, receivers that enforce it return permerror)",
                    void.join(", "),
                    void.len()
                ),
            )
            .fix("remove the stale a/mx/exists terms, or publish the records they name"),
        );
    }
    if inp.relay_ips.is_empty() {
        *relay_spf = RelaySpf::Unchecked;
        f.push(Finding::new(
            "spf",
            Severity::Info,
            "spf_relay_unchecked",
            "relay.egress_ips is not configured; SPF authorization of the relay not checked",
        ));
        return Ok(());
    }
    let sender = format!("postmaster@{domain}");
    let mut worst: Option<(IpAddr, SpfResult)> = None;
    for ip in &inp.relay_ips {
        let params = SpfParameters::verify_mail_from(*ip, &inp.helo, &inp.helo, &sender);
        let out = dns.auth().verify_spf(dns.caches.params(params)).await;
        match out.result() {
            SpfResult::Pass => {}
            SpfResult::TempError => return Err(TempFail(format!("SPF evaluation for {ip}: temporary DNS error"))),
            // The worst result over all egress IPs: mail may leave from any.
            other => {
                if worst.as_ref().is_none_or(|(_, w)| spf_rank(other) > spf_rank(*w)) {
                    worst = Some((*ip, other));
                }
            }
        }
    }
    let Some((ip, result)) = worst else {
        *relay_spf = RelaySpf::Pass;
        return Ok(());
    };
    let name = result.to_string().to_ascii_lowercase();
    *relay_spf = RelaySpf::NotPass(name.clone());
    let already_explained = f.iter().any(|x| x.check == "spf" && x.severity == Severity::Error);
    let fix = format!("add {} to the SPF record", spf_mechanisms(&inp.relay_ips));
    match result {
        SpfResult::Fail => f.push(
            Finding::new(
                "spf",
                Severity::Error,
                "spf_relay_not_authorized",
                format!("SPF fails for the relay IP {ip} (record \"{record}\"); receivers see spf=fail"),
            )
            .fix(fix)
            .code(Enhanced(5, 7, 23)),
        ),
        SpfResult::PermError if !already_explained => f.push(
            Finding::new(
                "spf",
                Severity::Error,
                "spf_permerror",
                format!("SPF evaluation ends in permerror (record \"{record}\")"),
            )
            .fix("correct the record (RFC 7208): check syntax, includes and the number of lookups")
            .code(Enhanced(5, 7, 24)),
        ),
        SpfResult::PermError => {}
        _ => f.push(
            Finding::new(
                "spf",
                Severity::Warning,
                "spf_relay_not_passing",
                format!("SPF gives {name} for the relay IP {ip} (relay IPs: {relay_list}); DMARC needs a pass or an aligned DKIM signature"),
            )
            .fix(fix),
        ),
    }
    Ok(())
}

async fn dkim_check(
    dns: &Arc<Dns>,
    domain: &str,
    sel: &str,
    signing_key: Option<&[u8]>,
) -> Result<Option<Finding>, TempFail> {
    let name = format!("{sel}._domainkey.{domain}");
    let publish = format!("publish the selector's public key as TXT at {name}");
    let answer = dns.lookup(&name, Rt::Txt).await?;
    let Answer::Txt(records) = answer else {
        return Ok(Some(
            Finding::new(
                "dkim",
                Severity::Error,
                "dkim_key_missing",
                format!("DKIM selector {sel}: no key record at {name}"),
            )
            .fix(publish)
            .code(Enhanced(5, 7, 20)),
        ));
    };
    let mut last_err = None;
    for r in records.iter() {
        match DomainKey::parse(r) {
            Ok(key) => {
                let bits = key.p.public_key_bits();
                let f = if let Some(k) = signing_key
                    && !super::sign::record_has_key(r, k)
                {
                    Some(
                        Finding::new(
                            "dkim",
                            Severity::Error,
                            "dkim_sign_key_mismatch",
                            format!(
                                "DKIM selector {sel}: the key published at {name} is not the public half of the signing key"
                            ),
                        )
                        .fix("publish the signing key's public key at the selector, or point dkim_sign at the right key file")
                        .code(Enhanced(5, 7, 20)),
                    )
                } else if bits == 0 {
                    Some(
                        Finding::new(
                            "dkim",
                            Severity::Error,
                            "dkim_key_invalid",
                            format!("DKIM selector {sel}: the p= key is not a valid public key"),
                        )
                        .fix(publish)
                        .code(Enhanced(5, 7, 20)),
                    )
                } else if bits < 1024 {
                    Some(
                        Finding::new(
                            "dkim",
                            Severity::Error,
                            "dkim_key_weak",
                            format!("DKIM selector {sel}: {bits}-bit RSA key; receivers ignore keys under 1024 bits"),
                        )
                        .fix("rotate to a 2048-bit RSA or an Ed25519 key")
                        .code(Enhanced(5, 7, 21)),
                    )
                } else if bits < 2048 {
                    Some(
                        Finding::new(
                            "dkim",
                            Severity::Warning,
                            "dkim_key_short",
                            format!("DKIM selector {sel}: {bits}-bit RSA key; 2048 bits is the current recommendation"),
                        )
                        .fix("rotate to a 2048-bit RSA key"),
                    )
                } else {
                    None
                };
                return Ok(f);
            }
            Err(e) => last_err = Some(e),
        }
    }
    let revoked = matches!(last_err, Some(mail_auth::Error::Dkim(DkimError::RevokedPublicKey)));
    Ok(Some(if revoked {
        Finding::new(
            "dkim",
            Severity::Error,
            "dkim_key_revoked",
            format!("DKIM selector {sel}: the key is revoked (empty p=)"),
        )
        .fix(publish)
        .code(Enhanced(5, 7, 20))
    } else {
        Finding::new(
            "dkim",
            Severity::Error,
            "dkim_key_invalid",
            format!("DKIM selector {sel}: the record at {name} is not a valid DKIM key record"),
        )
        .fix(publish)
        .code(Enhanced(5, 7, 20))
    }))
}

/// The DMARC records among a TXT set (RFC 7489 §6.6.3: "v=DMARC1").
fn dmarc_records(txt: &[Box<[u8]>]) -> Vec<&[u8]> {
    txt.iter()
        .filter(|r| {
            let s = r.strip_prefix(b"v").unwrap_or(b"");
            let s = s.trim_ascii_start();
            let s = s.strip_prefix(b"=").map(|s| s.trim_ascii_start()).unwrap_or(b"");
            s.len() >= 6 && s[..6].eq_ignore_ascii_case(b"DMARC1")
        })
        .map(|r| &r[..])
        .collect()
}

async fn dmarc_check(dns: &Arc<Dns>, domain: &str, f: &mut Vec<Finding>) -> Result<Option<DmarcInfo>, TempFail> {
    let org = org_domain(domain);
    let mut candidates = vec![domain];
    if org != domain {
        candidates.push(org);
    }
    for at in candidates {
        let name = format!("_dmarc.{at}");
        let records: Vec<Vec<u8>> = match dns.lookup(&name, Rt::Txt).await? {
            Answer::Txt(t) => dmarc_records(&t).into_iter().map(<[u8]>::to_vec).collect(),
            _ => Vec::new(),
        };
        match records.len() {
            0 => continue,
            1 => {}
            n => {
                f.push(
                    Finding::new(
                        "dmarc",
                        Severity::Error,
                        "dmarc_multiple_records",
                        format!("{n} DMARC records at {name}; receivers ignore them all (RFC 7489 §6.6.3)"),
                    )
                    .fix("keep exactly one v=DMARC1 record"),
                );
                return Ok(None);
            }
        }
        let raw = String::from_utf8_lossy(&records[0]).into_owned();
        let Ok(rec) = Dmarc::parse(&records[0]) else {
            f.push(
                Finding::new(
                    "dmarc",
                    Severity::Error,
                    "dmarc_malformed",
                    format!("the DMARC record at {name} does not parse: \"{raw}\""),
                )
                .fix("correct it, e.g. \"v=DMARC1; p=quarantine; rua=mailto:dmarc@<domain>\""),
            );
            return Ok(None);
        };
        let conv = |p: mail_auth::dmarc::Policy| match p {
            mail_auth::dmarc::Policy::Reject => Policy::Reject,
            mail_auth::dmarc::Policy::Quarantine => Policy::Quarantine,
            _ => Policy::None,
        };
        let info = DmarcInfo {
            record_domain: at.to_string(),
            p: conv(rec.p),
            sp: conv(rec.sp),
            adkim_strict: rec.adkim == Alignment::Strict,
            aspf_strict: rec.aspf == Alignment::Strict,
        };
        if info.policy_for(domain) == Policy::None {
            f.push(
                Finding::new(
                    "dmarc",
                    Severity::Warning,
                    "dmarc_policy_none",
                    format!("DMARC policy is p=none at {name}: receivers take no action on spoofed mail"),
                )
                .fix("move to p=quarantine, then p=reject, once reports show your mail aligned"),
            );
        }
        return Ok(Some(info));
    }
    f.push(
        Finding::new(
            "dmarc",
            Severity::Warning,
            "dmarc_missing",
            if org == domain {
                format!("no DMARC record at _dmarc.{domain}; Gmail and Yahoo require one from bulk senders")
            } else {
                format!(
                    "no DMARC record at _dmarc.{domain} or _dmarc.{org}; Gmail and Yahoo require one from bulk senders"
                )
            },
        )
        .fix(format!(
            "publish TXT at _dmarc.{org}: \"v=DMARC1; p=none; rua=mailto:dmarc@{org}\""
        )),
    );
    Ok(None)
}

async fn mx_check(dns: &Arc<Dns>, domain: &str, mx: &Answer, f: &mut Vec<Finding>) -> Result<(), TempFail> {
    match mx {
        Answer::Mx(_) => {}
        _ => {
            let has_address = has_address(dns, domain).await?;
            if !has_address {
                f.push(
                    Finding::new(
                        "mx",
                        Severity::Warning,
                        "sender_no_mx",
                        "the domain has no MX and no address record: replies and bounces cannot reach it",
                    )
                    .fix("publish an MX record for the domain"),
                );
            }
        }
    }
    Ok(())
}

/// RFC 7505 §3: a single MX with preference 0 and the root as exchange.
pub fn is_null_mx(mx: &[(u16, Box<str>)]) -> bool {
    mx.len() == 1 && mx[0].1.is_empty()
}

/// Has the name an A or AAAA record (RFC 5321 §5.1 implicit MX)?
pub async fn has_address(dns: &Arc<Dns>, domain: &str) -> Result<bool, TempFail> {
    if matches!(dns.lookup(domain, Rt::A).await?, Answer::Ip(_)) {
        return Ok(true);
    }
    Ok(matches!(dns.lookup(domain, Rt::Aaaa).await?, Answer::Ip(_)))
}

/// Is `name` listed? A DNSBL answers 127.0.0.0/8; 127.255.255.0/24 are
/// the lists' own error codes (query refused, typing error), not listings.
async fn listed(dns: &Arc<Dns>, name: &str) -> Result<bool, TempFail> {
    Ok(match dns.lookup(name, Rt::A).await? {
        Answer::Ip(ips) => ips.iter().any(|ip| match ip {
            IpAddr::V4(v4) => {
                let o = v4.octets();
                o[0] == 127 && !(o[1] == 255 && o[2] == 255)
            }
            IpAddr::V6(_) => false,
        }),
        _ => false,
    })
}

fn reversed(ip: &IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => v6
            .octets()
            .iter()
            .rev()
            .flat_map(|b| [b & 0xf, b >> 4])
            .map(|n| format!("{n:x}"))
            .collect::<Vec<_>>()
            .join("."),
    }
}

async fn blocklist_checks(dns: &Arc<Dns>, domain: &str, inp: &Inputs, f: &mut Vec<Finding>) {
    for zone in &inp.dnsbl_domain_zones {
        match listed(dns, &format!("{domain}.{zone}")).await {
            Ok(true) => f.push(
                Finding::new(
                    "blocklist",
                    Severity::Error,
                    "domain_blocklisted",
                    format!("the domain is listed on {zone}; receivers using it reject the mail"),
                )
                .fix(format!("find out why at the operator of {zone} and request delisting")),
            ),
            Ok(false) => {}
            Err(e) => f.push(Finding::new(
                "blocklist",
                Severity::Info,
                "blocklist_unchecked",
                format!("{zone} could not be queried ({e})"),
            )),
        }
    }
    for zone in &inp.dnsbl_ip_zones {
        for ip in &inp.relay_ips {
            match listed(dns, &format!("{}.{zone}", reversed(ip))).await {
                Ok(true) => f.push(
                    Finding::new(
                        "blocklist",
                        Severity::Warning,
                        "relay_ip_blocklisted",
                        format!("the relay IP {ip} is listed on {zone}"),
                    )
                    .fix(format!("ask the relay's operator to investigate and delist {ip}")),
                ),
                Ok(false) => {}
                Err(e) => f.push(Finding::new(
                    "blocklist",
                    Severity::Info,
                    "blocklist_unchecked",
                    format!("{zone} could not be queried for {ip} ({e})"),
                )),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reversed_names() {
        assert_eq!(reversed(&"192.0.2.1".parse().unwrap()), "1.2.0.192");
        let v6 = reversed(&"2001:db8::1".parse().unwrap());
        assert!(v6.starts_with("1.0.0.0.0.0.0.0."), "{v6}");
        assert!(v6.ends_with("8.b.d.0.1.0.0.2"), "{v6}");
    }

    #[test]
    fn org_domains_from_the_psl() {
        assert_eq!(org_domain("mail.example.co.uk"), "example.co.uk");
        assert_eq!(org_domain("a.b.acme.example"), "acme.example");
        assert_eq!(org_domain("acme.example"), "acme.example");
    }

    #[test]
    fn dmarc_record_selection() {
        let txt: Vec<Box<[u8]>> = vec![
            b"v=DMARC1; p=none".to_vec().into(),
            b"v = dmarc1; p=reject".to_vec().into(),
            b"something else".to_vec().into(),
        ];
        assert_eq!(dmarc_records(&txt).len(), 2);
    }

    #[test]
    fn null_mx() {
        assert!(is_null_mx(&[(0, "".into())]));
        assert!(!is_null_mx(&[(10, "mx.example".into())]));
        assert!(!is_null_mx(&[(0, "".into()), (10, "mx.example".into())]));
    }
}
