//! What the domain-health checks produce: findings with a severity, a
//! stable reason token, the SMTP code used when the finding decides a
//! refusal, and the fix in one sentence.

use serde::Serialize;

use crate::smtp::{Enhanced, Reply};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    /// Degrades deliverability; mail still goes.
    Warning,
    /// Mail from this domain would fail authentication: refused.
    Error,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Healthy,
    Degraded,
    Broken,
}

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// `spf`, `dkim`, `dmarc`, `mx` or `blocklist`.
    pub check: &'static str,
    pub severity: Severity,
    pub token: &'static str,
    pub message: String,
    pub fix: String,
    /// Refusal code when this finding decides (errors only).
    #[serde(skip)]
    pub code: Enhanced,
}

impl Finding {
    pub fn new(check: &'static str, severity: Severity, token: &'static str, message: impl Into<String>) -> Self {
        Finding {
            check,
            severity,
            token,
            message: message.into(),
            fix: String::new(),
            code: Enhanced(5, 7, 1),
        }
    }

    pub fn fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = fix.into();
        self
    }

    pub fn code(mut self, code: Enhanced) -> Self {
        self.code = code;
        self
    }

    /// The 550 reply a refusal on this finding sends.
    pub fn reply(&self, domain: &str) -> Reply {
        let mut text = format!("Sender domain {domain}: {}", self.message);
        if !self.fix.is_empty() {
            text.push_str(". Fix: ");
            text.push_str(&self.fix);
        }
        Reply::new(550, self.code, text).with_token(self.token)
    }
}

/// DMARC policy values (RFC 7489 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    None,
    Quarantine,
    Reject,
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Policy::None => "none",
            Policy::Quarantine => "quarantine",
            Policy::Reject => "reject",
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DmarcInfo {
    /// Where the record was found: the domain itself or its organizational domain.
    pub record_domain: String,
    pub p: Policy,
    pub sp: Policy,
    /// `adkim=s`
    pub adkim_strict: bool,
    /// `aspf=s`
    pub aspf_strict: bool,
}

impl DmarcInfo {
    /// The policy receivers apply to mail from `domain` (RFC 7489 §6.6.3:
    /// `sp` when the record came from the organizational domain).
    pub fn policy_for(&self, domain: &str) -> Policy {
        if domain == self.record_domain { self.p } else { self.sp }
    }
}

/// Does SPF pass for mail this relay sends with a MAIL FROM in the domain?
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "result")]
pub enum RelaySpf {
    /// `spf=pass` for every egress IP.
    Pass,
    /// Some egress IP gets this result (`fail`, `softfail`, `neutral`, `none`, `permerror`).
    NotPass(String),
    /// `relay.egress_ips` is empty; a valid record is assumed to cover the relay.
    Unchecked,
}

/// The health of one sender domain.
#[derive(Debug, Clone, Serialize)]
pub struct Health {
    pub domain: String,
    pub status: Status,
    pub findings: Vec<Finding>,
    /// The single `v=spf1` record, if there is exactly one.
    pub spf_record: Option<String>,
    pub relay_spf: RelaySpf,
    pub dmarc: Option<DmarcInfo>,
}

impl Health {
    pub fn new(
        domain: &str,
        findings: Vec<Finding>,
        spf_record: Option<String>,
        relay_spf: RelaySpf,
        dmarc: Option<DmarcInfo>,
    ) -> Self {
        let status = match findings.iter().map(|f| f.severity).max() {
            Some(Severity::Error) => Status::Broken,
            Some(Severity::Warning) => Status::Degraded,
            _ => Status::Healthy,
        };
        Health {
            domain: domain.to_string(),
            status,
            findings,
            spf_record,
            relay_spf,
            dmarc,
        }
    }

    /// The first error, which decides a refusal.
    pub fn first_error(&self) -> Option<&Finding> {
        self.first_error_where(|_| true)
    }

    /// Would receivers see an SPF pass for this domain as MAIL FROM?
    pub fn spf_passes_for_relay(&self) -> bool {
        match &self.relay_spf {
            RelaySpf::Pass => true,
            RelaySpf::Unchecked => self.spf_record.is_some() && self.first_error_of("spf").is_none(),
            RelaySpf::NotPass(_) => false,
        }
    }

    /// The first error of any check but `check`.
    pub fn first_error_except(&self, check: &str) -> Option<&Finding> {
        self.first_error_where(|c| c != check)
    }

    fn first_error_of(&self, check: &str) -> Option<&Finding> {
        self.first_error_where(|c| c == check)
    }

    /// The first error whose check passes `keep`.
    fn first_error_where(&self, keep: impl Fn(&str) -> bool) -> Option<&Finding> {
        self.findings
            .iter()
            .find(|f| f.severity == Severity::Error && keep(f.check))
    }
}

/// The human-readable triage report (`sendguard check-domain`).
pub fn render(h: &Health) -> String {
    use std::fmt::Write;
    let status = match h.status {
        Status::Healthy => "healthy",
        Status::Degraded => "degraded",
        Status::Broken => "broken",
    };
    let mut out = format!("{}: {status}\n", h.domain);
    if let Some(r) = &h.spf_record {
        let _ = writeln!(out, "  SPF record: {r}");
    }
    if let Some(d) = &h.dmarc {
        let _ = writeln!(
            out,
            "  DMARC: p={} sp={} adkim={} aspf={} (record at _dmarc.{})",
            d.p,
            d.sp,
            if d.adkim_strict { "s" } else { "r" },
            if d.aspf_strict { "s" } else { "r" },
            d.record_domain
        );
    }
    for f in &h.findings {
        let sev = match f.severity {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
        };
        let _ = writeln!(out, "  [{sev}] {}: {} ({})", f.check, f.message, f.token);
        if !f.fix.is_empty() {
            let _ = writeln!(out, "      fix: {}", f.fix);
        }
    }
    if h.findings.iter().all(|f| f.severity == Severity::Info) {
        let _ = writeln!(out, "  no problems found");
    }
    out
}
