//! The guard: decides whether a message *should* go, before anything is
//! forwarded (DESIGN §1). It answers three questions with a [`Verdict`]:
//!
//! * at MAIL FROM: is the envelope sender's domain healthy enough that
//!   receivers will authenticate mail from it? ([`Guard::mail_from`])
//! * at RCPT TO: can the recipient's domain receive mail at all?
//!   ([`Guard::rcpt`])
//! * at end of data: does the header From align with what receivers will
//!   authenticate, i.e. would DMARC pass? ([`Guard::message`])
//!
//! DNS failures are values: they become `451 4.4.3`, never a 5xx.
//! Domain verdicts are cached per domain (stale-while-revalidate), so a warm
//! domain costs no DNS query on the hot path.
//!
//! Trust boundary: answers from DNS and the message content are untrusted;
//! the guard owns no sockets besides the resolver's and writes nothing.

pub mod align;
pub mod health;
pub mod report;
pub mod sign;
pub mod spf;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use mail_auth::{AuthenticatedMessage, DkimResult};

use crate::config::{Config, GuardMode, TenantConfig};
use crate::dns::{Answer, Dns, Fetched, Rt, SwrCache, TempFail, ascii_domain};
use crate::smtp::{Enhanced, Mailbox, Reply};
use align::{Author, DkimSide, Prediction, SpfSide};
use health::Inputs;
use report::{Health, Policy};
use sign::Signer;

/// What the guard decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    /// Try again later (DNS trouble).
    TempFail(Reply),
    Reject(Reply),
}

impl Verdict {
    pub fn refusal(&self) -> Option<&Reply> {
        match self {
            Verdict::Accept => None,
            Verdict::TempFail(r) | Verdict::Reject(r) => Some(r),
        }
    }
}

type HealthResult = Result<Arc<Health>, TempFail>;

pub struct Guard {
    dns: Arc<Dns>,
    health: Arc<SwrCache<HealthResult>>,
    cfg: Arc<Config>,
    relay_ips: Vec<IpAddr>,
    helo: String,
    /// DKIM signers by (lower-case) domain.
    signers: HashMap<String, Arc<Signer>>,
}

pub fn dns_temporary(what: &str, e: &TempFail) -> Reply {
    Reply::new(
        451,
        Enhanced(4, 4, 3),
        format!("Cannot check {what} now (DNS: {e}); try again later"),
    )
    .with_token("dns_temporary")
}

impl Guard {
    /// A guard for `cfg` (on `dns`, or a resolver of its own), or `None`
    /// when every tenant has `guard = "off"` and no domain is signed.
    pub fn from_config(cfg: &Arc<Config>, dns: Option<Arc<Dns>>) -> anyhow::Result<Option<Arc<Guard>>> {
        if cfg.tenants.iter().all(|t| t.guard == GuardMode::Off) && cfg.domains.iter().all(|d| d.dkim_sign.is_none()) {
            return Ok(None);
        }
        let dns = match dns {
            Some(d) => d,
            None => Dns::new(&cfg.dns)?,
        };
        Ok(Some(Arc::new(Guard::new(cfg.clone(), dns)?)))
    }

    pub fn new(cfg: Arc<Config>, dns: Arc<Dns>) -> anyhow::Result<Guard> {
        let mut signers = HashMap::new();
        for (i, d) in cfg.domains.iter().enumerate() {
            if let Some(s) = &d.dkim_sign {
                let signer = Signer::load(&d.name, &s.selector, &cfg.resolve(&s.key))
                    .map_err(|e| anyhow::anyhow!("domains[{i}].dkim_sign.key: {e}"))?;
                signers.insert(d.name.clone(), Arc::new(signer));
            }
        }
        let relay_ips = cfg.relay.as_ref().map(|r| r.egress_ips.clone()).unwrap_or_default();
        let helo = cfg
            .relay
            .as_ref()
            .and_then(|r| r.helo_name.clone())
            .unwrap_or_else(|| cfg.server.hostname.clone());
        let health = Arc::new(SwrCache::new(
            cfg.dns.cache_entries,
            cfg.dns.stale_ttl,
            dns.stats.clone(),
        ));
        Ok(Guard {
            dns,
            health,
            cfg,
            relay_ips,
            helo,
            signers,
        })
    }

    pub fn dns(&self) -> &Arc<Dns> {
        &self.dns
    }

    /// The inputs the health checks of `domain` use.
    pub fn inputs(&self, domain: &str) -> Inputs {
        let mut selectors = Vec::new();
        if let Some(d) = self.cfg.domain(domain) {
            selectors.extend(d.dkim_selectors.iter().cloned());
            if let Some(s) = &d.dkim_sign
                && !selectors.contains(&s.selector)
            {
                selectors.push(s.selector.clone());
            }
        }
        let signing_key = self
            .signers
            .get(domain)
            .map(|s| (s.selector.clone(), s.public_key().to_vec()));
        Inputs {
            signing_key,
            relay_ips: self.relay_ips.clone(),
            helo: self.helo.clone(),
            selectors,
            dnsbl_ip_zones: self.cfg.guard.dnsbl_ip_zones.clone(),
            dnsbl_domain_zones: self.cfg.guard.dnsbl_domain_zones.clone(),
        }
    }

    /// Health of `domain` (lower-case A-labels), cached for `dns.min_ttl`
    /// and refreshed in the background after that.
    pub async fn health(&self, domain: &str) -> HealthResult {
        self.health
            .get_or_fetch(domain, || {
                let (dns, inputs, owned) = (self.dns.clone(), self.inputs(domain), domain.to_string());
                let ttl = self.cfg.dns.min_ttl;
                move || async move {
                    match health::evaluate(&dns, &owned, &inputs).await {
                        Ok(h) => Fetched::keep(Ok(Arc::new(h)), ttl),
                        Err(e) => Fetched::temporary(Err(e)),
                    }
                }
            })
            .await
    }

    /// The envelope sender's domain must not be broken.
    pub async fn mail_from(&self, from: &Mailbox) -> Verdict {
        let Some(domain) = ascii_domain(&from.domain) else {
            return Verdict::Accept; // address literal: nothing to look up
        };
        match self.health(&domain).await {
            Err(e) => Verdict::TempFail(dns_temporary(&format!("sender domain {domain}"), &e)),
            Ok(h) => match h.first_error() {
                Some(f) => Verdict::Reject(f.reply(&domain)),
                None => Verdict::Accept,
            },
        }
    }

    /// The recipient's domain must be able to receive mail (RFC 5321 §5.1,
    /// RFC 7505).
    pub async fn rcpt(&self, to: &Mailbox) -> Verdict {
        let Some(domain) = ascii_domain(&to.domain) else {
            return Verdict::Accept;
        };
        let temp = |e: &TempFail| Verdict::TempFail(dns_temporary(&format!("recipient domain {domain}"), e));
        let no_mail = |why: &str| {
            Verdict::Reject(
                Reply::new(550, Enhanced(5, 1, 2), format!("Recipient domain {domain} {why}"))
                    .with_token("rcpt_domain_not_found"),
            )
        };
        match self.dns.lookup(&domain, Rt::Mx).await {
            Err(e) => temp(&e),
            Ok(Answer::Mx(mx)) if health::is_null_mx(&mx) => Verdict::Reject(
                Reply::new(
                    556,
                    Enhanced(5, 1, 10),
                    format!("Recipient domain {domain} does not accept mail (null MX, RFC 7505)"),
                )
                .with_token("rcpt_null_mx"),
            ),
            Ok(Answer::Mx(_)) => Verdict::Accept,
            Ok(Answer::NxDomain | Answer::BadName) => no_mail("does not exist (NXDOMAIN)"),
            Ok(_) => match health::has_address(&self.dns, &domain).await {
                Err(e) => temp(&e),
                Ok(true) => Verdict::Accept,
                Ok(false) => no_mail("has no MX and no address record: it cannot receive mail"),
            },
        }
    }

    /// End of data: one author, within the tenant's rights, and a DMARC
    /// pass predicted for receivers.
    pub async fn message(&self, tenant: &TenantConfig, mail_from: Option<&Mailbox>, body: &[u8]) -> Verdict {
        let addr = match align::author(body) {
            Author::One(a) => a,
            Author::Missing => {
                return Verdict::Reject(
                    Reply::new(
                        550,
                        Enhanced(5, 6, 0),
                        "Message has no From header address (RFC 5322 §3.6)",
                    )
                    .with_token("from_header_missing"),
                );
            }
            Author::Multiple(n) => {
                return Verdict::Reject(
                    Reply::new(
                        550,
                        Enhanced(5, 6, 0),
                        format!("Message has {n} From addresses; receivers need exactly one to apply DMARC"),
                    )
                    .with_token("from_header_multiple"),
                );
            }
        };
        let Ok(author) = crate::smtp::address::parse_mailbox(&addr) else {
            return Verdict::Reject(
                Reply::new(550, Enhanced(5, 6, 0), "The From header address is not valid")
                    .with_token("from_header_invalid"),
            );
        };
        if !crate::server::session::sender_permitted(tenant, &author) {
            return Verdict::Reject(
                Reply::new(
                    550,
                    Enhanced(5, 7, 1),
                    format!("Header From {} is not permitted for tenant {}", author, tenant.name),
                )
                .with_token("from_not_permitted"),
            );
        }
        let Some(from_domain) = ascii_domain(&author.domain) else {
            return Verdict::Accept;
        };
        let health = match self.health(&from_domain).await {
            Err(e) => return Verdict::TempFail(dns_temporary(&format!("From domain {from_domain}"), &e)),
            Ok(h) => h,
        };
        // SPF is the MAIL FROM domain's business (RFC 7208 §2.4; DMARC
        // uses SPF only for that identity, RFC 7489 §4.1), checked at MAIL
        // and below: the author's own SPF does not decide here.
        if let Some(f) = health.first_error_except("spf") {
            return Verdict::Reject(f.reply(&from_domain));
        }
        let Some(dmarc) = &health.dmarc else {
            return Verdict::Accept; // no DMARC policy: receivers have nothing to enforce
        };
        let spf = match mail_from.and_then(|m| ascii_domain(&m.domain)) {
            None => SpfSide::NullSender,
            Some(d) if d == from_domain => SpfSide::MailFrom {
                passes: health.spf_passes_for_relay(),
                domain: d,
            },
            Some(d) => match self.health(&d).await {
                Err(e) => return Verdict::TempFail(dns_temporary(&format!("sender domain {d}"), &e)),
                Ok(h) => SpfSide::MailFrom {
                    passes: h.spf_passes_for_relay(),
                    domain: d,
                },
            },
        };
        // An aligned SPF pass decides alone: no need to verify signatures
        // (nor to fail on a DKIM key lookup that times out).
        if align::predict(&from_domain, dmarc, &spf, &[]) == Prediction::Pass {
            return Verdict::Accept;
        }
        let (mut dkim, dkim_temp) = if align::has_dkim_signature(body) {
            self.verify_dkim(body).await
        } else {
            (Vec::new(), Vec::new())
        };
        if self.signers.contains_key(&from_domain) {
            // sendguard signs it (after this check), with a key the health
            // check found published.
            dkim.push(DkimSide {
                d: from_domain.clone(),
                failure: None,
            });
        }
        match align::predict(&from_domain, dmarc, &spf, &dkim) {
            Prediction::Pass => Verdict::Accept,
            Prediction::Fail {
                policy: Policy::None, ..
            } => Verdict::Accept,
            // A signature whose key lookup failed for now and that would
            // align could still make DMARC pass: DNS trouble is a 4xx,
            // never a 5xx.
            Prediction::Fail { .. }
                if let Some((_, e)) = dkim_temp
                    .iter()
                    .find(|(d, _)| align::aligned(d, &from_domain, dmarc.adkim_strict)) =>
            {
                Verdict::TempFail(dns_temporary("the DKIM signature", e))
            }
            Prediction::Fail { policy, reasons } => Verdict::Reject(
                Reply::new(
                    550,
                    Enhanced(5, 7, 26),
                    format!(
                        "DMARC would fail at receivers: {from_domain} p={policy}; {}",
                        reasons.join("; ")
                    ),
                )
                .with_token("dmarc_would_fail"),
            ),
        }
    }

    /// Is any domain signed?
    pub fn signs(&self) -> bool {
        !self.signers.is_empty()
    }

    /// The `DKIM-Signature` header to prepend, when the message's author
    /// domain is a signing domain the tenant may send as.
    pub async fn sign(&self, tenant: &TenantConfig, body: &Arc<Vec<u8>>) -> Option<String> {
        if self.signers.is_empty() {
            return None;
        }
        let Author::One(addr) = align::author(body) else {
            return None;
        };
        let author = crate::smtp::address::parse_mailbox(&addr).ok()?;
        if !crate::server::session::sender_permitted(tenant, &author) {
            return None;
        }
        let signer = self.signers.get(&ascii_domain(&author.domain)?)?.clone();
        let body = body.clone();
        // RSA signing takes about a millisecond: off the runtime threads.
        match tokio::task::spawn_blocking(move || signer.sign(&body)).await {
            Ok(Ok(header)) => Some(header),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "DKIM signing failed; message not signed");
                None
            }
            Err(_) => None,
        }
    }

    /// Verify every DKIM signature: each one's outcome, and the `d=` and
    /// error of those whose key lookup failed temporarily.
    async fn verify_dkim(&self, body: &[u8]) -> (Vec<DkimSide>, Vec<(String, TempFail)>) {
        let Some(msg) = AuthenticatedMessage::parse(body) else {
            return (Vec::new(), Vec::new());
        };
        let outs = self.dns.auth().verify_dkim(self.dns.caches.params(&msg)).await;
        let mut sides = Vec::new();
        let mut temp = Vec::new();
        for out in &outs {
            let d = out.signature().map(|s| s.d.to_ascii_lowercase()).unwrap_or_default();
            let sha1 = out
                .signature()
                .is_some_and(|s| s.a == mail_auth::common::crypto::Algorithm::RsaSha1);
            let failure = match out.result() {
                // RFC 8301 §3.1: rsa-sha1 MUST NOT be used for verifying;
                // receivers that follow it do not count such a signature.
                DkimResult::Pass if sha1 => {
                    Some("signed with rsa-sha1, which receivers do not accept (RFC 8301)".into())
                }
                DkimResult::Pass => None,
                DkimResult::TempError(e) => {
                    temp.push((d.clone(), TempFail(e.to_string())));
                    Some(format!("temporary error ({e})"))
                }
                DkimResult::Neutral(e) | DkimResult::Fail(e) | DkimResult::PermError(e) => Some(dkim_failure(e)),
                DkimResult::None => Some("no result".to_string()),
            };
            sides.push(DkimSide { d, failure });
        }
        (sides, temp)
    }
}

fn dkim_failure(e: &mail_auth::Error) -> String {
    use mail_auth::common::crypto::CryptoError;
    use mail_auth::dkim::DkimError;
    use mail_auth::{DnsError, Error};
    match e {
        Error::Dkim(DkimError::FailedBodyHashMatch) => "body hash mismatch (the body changed after signing)".into(),
        Error::Crypto(CryptoError::FailedVerification) => {
            "signature does not verify (headers changed after signing, or wrong key)".into()
        }
        Error::Dkim(DkimError::RevokedPublicKey) => "the key is revoked".into(),
        Error::Dkim(DkimError::SignatureExpired) => "the signature expired".into(),
        Error::Dns(DnsError::RecordNotFound(_)) => "no key published for the selector".into(),
        other => other.to_string(),
    }
}
