//! Header From extraction, identifier alignment (RFC 7489 §3.1) and the
//! predicted DMARC result. Pure: DNS-derived inputs come in as values.
//!
//! Trust boundary: the message headers are client data; the From header is
//! parsed by mail-parser and only its address is used.

use mail_parser::{Address, HeaderName, HeaderValue, MessageParser};

use super::health::org_domain;
use super::report::{DmarcInfo, Policy};

/// The single author address of a message, or why there is none.
#[derive(Debug, PartialEq, Eq)]
pub enum Author {
    One(String),
    Missing,
    /// Several From fields or several addresses in one.
    Multiple(usize),
}

/// RFC 5322 §3.6: exactly one From field; DMARC (RFC 7489 §6.6.1) needs
/// exactly one address in it.
pub fn author(message: &[u8]) -> Author {
    let Some(parsed) = MessageParser::new().parse_headers(message) else {
        return Author::Missing;
    };
    let mut fields = 0;
    let mut addrs = Vec::new();
    for value in parsed.header_values(HeaderName::From) {
        fields += 1;
        if let HeaderValue::Address(a) = value {
            match a {
                Address::List(list) => addrs.extend(list.iter().filter_map(|a| a.address.clone())),
                Address::Group(groups) => addrs.extend(
                    groups
                        .iter()
                        .flat_map(|g| g.addresses.iter().filter_map(|a| a.address.clone())),
                ),
            }
        }
    }
    match (fields, addrs.len()) {
        (0, _) | (1, 0) => Author::Missing,
        (1, 1) => {
            let a = addrs.pop().unwrap().into_owned();
            // mail-parser reads a bare quoted local part (`"john doe"@x`,
            // RFC 5322 §3.4.1) as a display name and `@x`: then the raw
            // field, if it is exactly one such address, is the author.
            if crate::smtp::address::parse_mailbox(&a).is_err()
                && let Some(raw) = parsed.header_raw(HeaderName::From)
            {
                let raw = raw.trim();
                if crate::smtp::address::parse_mailbox(raw).is_ok() {
                    return Author::One(raw.to_string());
                }
            }
            Author::One(a)
        }
        (f, n) => Author::Multiple(f.max(n)),
    }
}

/// Does the message carry any DKIM-Signature header? (Cheap pre-check
/// before handing the message to mail-auth.)
pub fn has_dkim_signature(message: &[u8]) -> bool {
    let end = memchr::memmem::find(message, b"\r\n\r\n").map_or(message.len(), |e| e + 2);
    message[..end]
        .split(|&b| b == b'\n')
        .any(|line| line.len() >= 15 && line[..15].eq_ignore_ascii_case(b"DKIM-Signature:"))
}

/// RFC 7489 §3.1: strict = identical; relaxed = same organizational domain.
pub fn aligned(a: &str, b: &str, strict: bool) -> bool {
    if a.eq_ignore_ascii_case(b) {
        return true;
    }
    !strict && org_domain(a).eq_ignore_ascii_case(org_domain(b))
}

/// The SPF side of the prediction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpfSide {
    /// MAIL FROM domain and whether SPF passes for the relay with it.
    MailFrom { domain: String, passes: bool },
    /// `MAIL FROM:<>`: receivers check the relay's HELO name, not aligned.
    NullSender,
}

/// One DKIM signature's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DkimSide {
    pub d: String,
    /// `None` = verified; `Some(why)` otherwise.
    pub failure: Option<String>,
}

/// The predicted DMARC evaluation.
#[derive(Debug, PartialEq, Eq)]
pub enum Prediction {
    Pass,
    /// Fails, and the policy says what receivers do about it.
    Fail {
        policy: Policy,
        reasons: Vec<String>,
    },
}

/// RFC 7489 §4.2: DMARC passes if SPF passes with an aligned MAIL FROM
/// domain, or a DKIM signature verifies with an aligned `d=`.
pub fn predict(from_domain: &str, dmarc: &DmarcInfo, spf: &SpfSide, dkim: &[DkimSide]) -> Prediction {
    let mut reasons = Vec::new();
    match spf {
        SpfSide::MailFrom { domain, passes } => {
            let is_aligned = aligned(domain, from_domain, dmarc.aspf_strict);
            if is_aligned && *passes {
                return Prediction::Pass;
            }
            if !is_aligned {
                let mode = if dmarc.aspf_strict { "strict" } else { "relaxed" };
                reasons.push(format!("SPF not aligned (MAIL FROM {domain}, aspf={mode})"));
            } else {
                reasons.push(format!("SPF does not pass for the relay (MAIL FROM {domain})"));
            }
        }
        SpfSide::NullSender => reasons.push("SPF not aligned (null MAIL FROM)".to_string()),
    }
    if dkim.is_empty() {
        reasons.push("no DKIM signature".to_string());
    }
    for sig in dkim {
        let is_aligned = aligned(&sig.d, from_domain, dmarc.adkim_strict);
        match (&sig.failure, is_aligned) {
            (None, true) => return Prediction::Pass,
            (None, false) => {
                let mode = if dmarc.adkim_strict { "strict" } else { "relaxed" };
                reasons.push(format!("DKIM d={} not aligned (adkim={mode})", sig.d));
            }
            (Some(why), _) => reasons.push(format!("DKIM d={} fails: {why}", sig.d)),
        }
    }
    Prediction::Fail {
        policy: dmarc.policy_for(from_domain),
        reasons,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dmarc(p: Policy, strict: bool) -> DmarcInfo {
        DmarcInfo {
            record_domain: "acme.example".into(),
            p,
            sp: p,
            adkim_strict: strict,
            aspf_strict: strict,
        }
    }

    fn mf(d: &str, passes: bool) -> SpfSide {
        SpfSide::MailFrom {
            domain: d.into(),
            passes,
        }
    }

    #[test]
    fn authors() {
        let one = b"From: \"A, B\" <A@Acme.Example>\r\nTo: x@y\r\n\r\nbody";
        assert_eq!(author(one), Author::One("A@Acme.Example".into()));
        assert_eq!(author(b"To: x@y\r\n\r\nbody"), Author::Missing);
        assert_eq!(author(b"From: undisclosed\r\n\r\n"), Author::Missing);
        assert_eq!(author(b"From: a@x.example, b@y.example\r\n\r\n"), Author::Multiple(2));
        assert_eq!(
            author(b"From: a@x.example\r\nFrom: b@y.example\r\n\r\n"),
            Author::Multiple(2)
        );
        // Folded header.
        assert_eq!(
            author(b"From: Someone\r\n <s@x.example>\r\n\r\n"),
            Author::One("s@x.example".into())
        );
        // A quoted local part (RFC 5322 §3.4.1), bare or in brackets: the
        // address must still parse as a mailbox of that domain.
        for from in [
            &b"From: \"john doe\"@acme.example\r\n\r\n"[..],
            &b"From: John <\"john doe\"@acme.example>\r\n\r\n"[..],
        ] {
            let Author::One(a) = author(from) else {
                panic!("{:?}", author(from))
            };
            let m = crate::smtp::address::parse_mailbox(&a)
                .unwrap_or_else(|e| panic!("{}: {a:?} {e:?}", String::from_utf8_lossy(from)));
            assert_eq!(m.domain, "acme.example", "{a}");
        }
    }

    #[test]
    fn dkim_signature_detection_only_looks_at_headers() {
        assert!(has_dkim_signature(b"DKIM-Signature: v=1\r\nFrom: a@b\r\n\r\n"));
        assert!(has_dkim_signature(b"From: a@b\r\ndkim-signature: v=1\r\n\r\n"));
        assert!(!has_dkim_signature(b"From: a@b\r\n\r\nDKIM-Signature: in the body\r\n"));
    }

    #[test]
    fn alignment_modes() {
        assert!(aligned("acme.example", "ACME.example", true));
        assert!(aligned("bounce.acme.example", "acme.example", false));
        assert!(!aligned("bounce.acme.example", "acme.example", true));
        assert!(!aligned("acme.example", "other.example", false));
        // Public suffix: two registrations under co.uk are not aligned.
        assert!(!aligned("a.co.uk", "b.co.uk", false));
        assert!(aligned("mail.a.co.uk", "a.co.uk", false));
    }

    #[test]
    fn predictions() {
        let d = dmarc(Policy::Reject, false);
        // Aligned SPF pass.
        assert_eq!(
            predict("acme.example", &d, &mf("bounce.acme.example", true), &[]),
            Prediction::Pass
        );
        // Relaxed alignment only.
        let strict = dmarc(Policy::Reject, true);
        let Prediction::Fail { policy, reasons } =
            predict("acme.example", &strict, &mf("bounce.acme.example", true), &[])
        else {
            panic!("strict must fail")
        };
        assert_eq!(policy, Policy::Reject);
        assert_eq!(
            reasons,
            [
                "SPF not aligned (MAIL FROM bounce.acme.example, aspf=strict)",
                "no DKIM signature"
            ]
        );
        // Unaligned SPF, aligned valid DKIM.
        let good = DkimSide {
            d: "acme.example".into(),
            failure: None,
        };
        assert_eq!(
            predict("acme.example", &d, &mf("esp.example", true), &[good]),
            Prediction::Pass
        );
        // Tampered DKIM.
        let bad = DkimSide {
            d: "acme.example".into(),
            failure: Some("body hash mismatch".into()),
        };
        let Prediction::Fail { reasons, .. } = predict("acme.example", &d, &mf("esp.example", true), &[bad]) else {
            panic!()
        };
        assert_eq!(
            reasons,
            [
                "SPF not aligned (MAIL FROM esp.example, aspf=relaxed)",
                "DKIM d=acme.example fails: body hash mismatch"
            ]
        );
        // Aligned but SPF does not pass; null sender.
        let Prediction::Fail { reasons, .. } = predict("acme.example", &d, &mf("acme.example", false), &[]) else {
            panic!()
        };
        assert_eq!(reasons[0], "SPF does not pass for the relay (MAIL FROM acme.example)");
        assert!(matches!(
            predict("acme.example", &d, &SpfSide::NullSender, &[]),
            Prediction::Fail { .. }
        ));
        // Subdomain policy applies to subdomains when the record is the org's.
        let mut sub = dmarc(Policy::Reject, false);
        sub.sp = Policy::None;
        let Prediction::Fail { policy, .. } = predict("news.acme.example", &sub, &SpfSide::NullSender, &[]) else {
            panic!()
        };
        assert_eq!(policy, Policy::None);
    }
}
