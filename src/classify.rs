//! Upstream reply → outcome (delivered / deferred / bounced), failure
//! category and stage. Table-driven: the rules are data
//! (`config/classify.toml`, built in; an operator's file is tried first),
//! compiled once into one [`RegexSet`], so a reply costs one pass over its
//! text however many rules there are.
//!
//! Rule order matters: provider-specific texts come first (Gmail `4.7.28`,
//! Yahoo `[TSS04]`, Microsoft `S3150`), then generic texts ("blocked using",
//! "mailbox full"), then enhanced codes (RFC 3463), then the basic code.
//! The enhanced code decides where the text is vague; the text decides
//! where a provider is specific (a `550 5.7.1` that names a blocklist is
//! `reputation_blocked`, not `policy`).
//!
//! Outcome: the basic code's class (RFC 5321 §4.2.1), except that a rule
//! may say otherwise (a `552 5.2.2` mailbox full is retried: RFC 3463 §3.3
//! calls X.2.2 "useful for both permanent and persistent transient
//! errors", and quotas free up; an upstream's own "message expired" 4xx is
//! final) and a 5xx reply whose enhanced code is transient (`4.x.x`) is
//! deferred: the server's detailed status says it may pass later, and a
//! wrong retry costs less than a lost recipient. The dispatcher never
//! turns a local failure (no reply) into a bounce.
//!
//! Trust boundary: the input is upstream reply text (untrusted, any bytes
//! the upstream chose); it is only matched, never interpreted further.
//! Pure: no I/O beyond reading the rules file at start.

use std::path::Path;

use regex::{RegexSet, RegexSetBuilder};
use serde::{Deserialize, Serialize};

use crate::events::ReplyRecord;

/// The built-in rules.
pub const DEFAULT_RULES: &str = include_str!("../config/classify.toml");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Delivered,
    Deferred,
    Bounced,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Deferred => "deferred",
            Outcome::Bounced => "bounced",
        }
    }
}

/// Failure category: a stable token (docs/reasons.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    UserUnknown,
    MailboxFull,
    MailboxDisabled,
    DomainNotFound,
    /// SPF/DKIM/DMARC failed at the receiver.
    AuthFailed,
    ReputationBlocked,
    SpamContent,
    Policy,
    RateLimited,
    Greylisted,
    MessageTooBig,
    /// Our own upstream credentials or permissions.
    RelayDenied,
    TlsRequired,
    Connection,
    Syntax,
    Expired,
    Other,
}

impl Category {
    pub const ALL: [Category; 17] = [
        Category::UserUnknown,
        Category::MailboxFull,
        Category::MailboxDisabled,
        Category::DomainNotFound,
        Category::AuthFailed,
        Category::ReputationBlocked,
        Category::SpamContent,
        Category::Policy,
        Category::RateLimited,
        Category::Greylisted,
        Category::MessageTooBig,
        Category::RelayDenied,
        Category::TlsRequired,
        Category::Connection,
        Category::Syntax,
        Category::Expired,
        Category::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Category::UserUnknown => "user_unknown",
            Category::MailboxFull => "mailbox_full",
            Category::MailboxDisabled => "mailbox_disabled",
            Category::DomainNotFound => "domain_not_found",
            Category::AuthFailed => "auth_failed",
            Category::ReputationBlocked => "reputation_blocked",
            Category::SpamContent => "spam_content",
            Category::Policy => "policy",
            Category::RateLimited => "rate_limited",
            Category::Greylisted => "greylisted",
            Category::MessageTooBig => "message_too_big",
            Category::RelayDenied => "relay_denied",
            Category::TlsRequired => "tls_required",
            Category::Connection => "connection",
            Category::Syntax => "syntax",
            Category::Expired => "expired",
            Category::Other => "other",
        }
    }

    /// A bounce in this category means the *recipient* address is bad, so
    /// it is suppressed. Everything else is the sender's or the path's
    /// problem and never suppresses a recipient.
    pub fn suppresses(self) -> bool {
        matches!(
            self,
            Category::UserUnknown | Category::MailboxDisabled | Category::DomainNotFound
        )
    }

    /// The stage a category belongs to when a rule does not say.
    fn default_stage(self, code: Option<u16>, enhanced: Option<&str>) -> Stage {
        match self {
            Category::UserUnknown | Category::MailboxFull | Category::MailboxDisabled | Category::DomainNotFound => {
                Stage::Recipient
            }
            Category::AuthFailed | Category::RelayDenied => Stage::Authentication,
            Category::ReputationBlocked | Category::Policy => Stage::Policy,
            Category::SpamContent | Category::MessageTooBig => Stage::Content,
            Category::RateLimited | Category::Greylisted => Stage::Throttling,
            Category::TlsRequired | Category::Connection | Category::Expired => Stage::Connection,
            Category::Syntax | Category::Other => stage_of_subject(code, enhanced),
        }
    }
}

impl std::fmt::Display for Category {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where in the path the failure belongs (the product's failure taxonomy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Connection,
    Authentication,
    Recipient,
    Policy,
    Content,
    Throttling,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Connection => "connection",
            Stage::Authentication => "authentication",
            Stage::Recipient => "recipient",
            Stage::Policy => "policy",
            Stage::Content => "content",
            Stage::Throttling => "throttling",
        }
    }
}

/// RFC 3463 §4 subjects: 1 addressing, 2 mailbox, 3 mail system, 4 network
/// and routing, 5 protocol, 6 content, 7 security or policy.
/// Without an enhanced code, the basic code's meaning (RFC 5321 §4.2.2):
/// 450/550/551/553 are about the mailbox, 452/552/554 about the message.
fn stage_of_subject(code: Option<u16>, enhanced: Option<&str>) -> Stage {
    match enhanced.and_then(|e| e.split('.').nth(1)) {
        Some("1") | Some("2") => Stage::Recipient,
        Some("3") | Some("6") => Stage::Content,
        Some("7") => Stage::Policy,
        Some(_) => Stage::Connection,
        None => match code {
            Some(450 | 550 | 551 | 553) => Stage::Recipient,
            Some(452 | 552 | 554) => Stage::Content,
            _ => Stage::Connection,
        },
    }
}

/// What the classifier decided, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Classification {
    pub outcome: Outcome,
    /// `None` for delivered.
    pub category: Option<Category>,
    pub stage: Option<Stage>,
    /// Name of the rule that matched.
    pub rule: String,
}

impl Classification {
    /// The same reply given to MAIL FROM (RFC 5321 §3.3): it is about the
    /// reverse-path or the session, never about a recipient. A category
    /// that names the recipient's address or mailbox (unknown, not found,
    /// disabled or suspended, full) is the sender's there: `policy`, with
    /// the outcome the reply code says (`code`: 5xx bounced, else
    /// deferred). It suppresses no recipient. Replies that name our relay
    /// account ("your account has been suspended", SES identities) are
    /// `relay_denied` by their own rules before this, and pause delivery;
    /// a disabled sender mailbox at the relay is one sender's problem, not
    /// a reason to pause everyone's mail.
    pub fn at_mail(mut self, code: Option<u16>) -> Classification {
        // The recipient categories: those whose own stage is the recipient's.
        if !self
            .category
            .is_some_and(|c| c.default_stage(None, None) == Stage::Recipient)
        {
            return self;
        }
        self.category = Some(Category::Policy);
        self.stage = Some(Stage::Policy);
        self.outcome = if code.is_some_and(|c| (500..600).contains(&c)) {
            Outcome::Bounced
        } else {
            Outcome::Deferred
        };
        self
    }
}

// ---- rules file -------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default)]
    rule: Vec<RuleSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    name: String,
    /// `550`, `5xx`, `55x`, or `none` (no reply: connection, timeout, TLS).
    code: Option<OneOrMany>,
    /// `5.1.1`, `x.1.1`, `5.7`, `x.7.x`: a prefix with `x` as wildcard.
    enhanced: Option<OneOrMany>,
    /// Regex over the reply text (case-insensitive).
    text: Option<String>,
    category: Category,
    stage: Option<Stage>,
    outcome: Option<Outcome>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum CodePat {
    None,
    /// Digits with `None` as `x`.
    Digits([Option<u8>; 3]),
}

impl CodePat {
    fn parse(s: &str) -> Option<CodePat> {
        let s = s.trim().to_ascii_lowercase();
        if s == "none" {
            return Some(CodePat::None);
        }
        let b = s.as_bytes();
        if b.len() != 3 || !(b'2'..=b'5').contains(&b[0]) {
            return None;
        }
        let mut d = [None; 3];
        for (i, &c) in b.iter().enumerate() {
            d[i] = match c {
                b'0'..=b'9' => Some(c - b'0'),
                b'x' if i > 0 => None,
                _ => return None,
            };
        }
        Some(CodePat::Digits(d))
    }

    fn matches(&self, code: Option<u16>) -> bool {
        match (self, code) {
            (CodePat::None, None) => true,
            (CodePat::Digits(d), Some(c)) => {
                let got = [(c / 100) as u8, (c / 10 % 10) as u8, (c % 10) as u8];
                d.iter().zip(got).all(|(p, g)| p.is_none_or(|p| p == g))
            }
            _ => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct EnhPat(Vec<Option<u16>>);

impl EnhPat {
    fn parse(s: &str) -> Option<EnhPat> {
        let parts: Vec<&str> = s.trim().split('.').collect();
        if parts.is_empty() || parts.len() > 3 {
            return None;
        }
        let mut out = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            out.push(match *p {
                "x" | "X" | "*" => None,
                _ => {
                    let n: u16 = p.parse().ok()?;
                    if i == 0 && !(2..=5).contains(&n) || n > 999 {
                        return None;
                    }
                    Some(n)
                }
            });
        }
        Some(EnhPat(out))
    }

    fn matches(&self, enhanced: Option<&str>) -> bool {
        let Some(e) = enhanced else { return false };
        let got: Vec<&str> = e.split('.').collect();
        self.0.len() <= got.len()
            && self
                .0
                .iter()
                .zip(&got)
                .all(|(p, g)| p.is_none_or(|p| g.parse::<u16>().ok() == Some(p)))
    }
}

#[derive(Debug)]
struct Rule {
    name: String,
    codes: Vec<CodePat>,
    enhanced: Vec<EnhPat>,
    /// Index into the regex set.
    text: Option<usize>,
    category: Category,
    stage: Option<Stage>,
    outcome: Option<Outcome>,
}

/// Compiled rules.
#[derive(Debug)]
pub struct Classifier {
    rules: Vec<Rule>,
    set: RegexSet,
}

/// A rules file that does not load; `key` names the rule and field.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct RulesError {
    pub key: String,
    pub message: String,
}

impl Classifier {
    /// The built-in rules.
    pub fn builtin() -> Classifier {
        Classifier::from_sources(&[("built-in classify.toml", DEFAULT_RULES)]).expect("built-in rules compile")
    }

    /// The operator's rules (tried first), then the built-in ones unless
    /// `replace` is set.
    pub fn load(path: Option<&Path>, replace: bool) -> Result<Classifier, RulesError> {
        let Some(path) = path else {
            return Ok(Classifier::builtin());
        };
        let text = std::fs::read_to_string(path).map_err(|e| RulesError {
            key: path.display().to_string(),
            message: e.to_string(),
        })?;
        let label = path.display().to_string();
        if replace {
            Classifier::from_sources(&[(&label, &text)])
        } else {
            Classifier::from_sources(&[(&label, &text), ("built-in classify.toml", DEFAULT_RULES)])
        }
    }

    /// Rules from several TOML texts, in order.
    pub fn from_sources(sources: &[(&str, &str)]) -> Result<Classifier, RulesError> {
        let mut rules = Vec::new();
        let mut patterns: Vec<String> = Vec::new();
        for (label, text) in sources {
            let file: RulesFile = toml::from_str(text).map_err(|e| RulesError {
                key: label.to_string(),
                message: e.to_string(),
            })?;
            for (i, spec) in file.rule.into_iter().enumerate() {
                let key = |field: &str| format!("{label}: rule[{i}] ({}).{field}", spec.name);
                let codes = spec
                    .code
                    .map(OneOrMany::into_vec)
                    .unwrap_or_default()
                    .iter()
                    .map(|c| {
                        CodePat::parse(c).ok_or_else(|| RulesError {
                            key: key("code"),
                            message: format!("{c:?} is not a code pattern (550, 5xx, 55x or none)"),
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let enhanced = spec
                    .enhanced
                    .map(OneOrMany::into_vec)
                    .unwrap_or_default()
                    .iter()
                    .map(|c| {
                        EnhPat::parse(c).ok_or_else(|| RulesError {
                            key: key("enhanced"),
                            message: format!("{c:?} is not an enhanced-code pattern (5.1.1, x.7.1, 5.7)"),
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let text = match spec.text {
                    Some(t) => {
                        // Check each pattern alone so the error names its rule.
                        regex::RegexBuilder::new(&t)
                            .case_insensitive(true)
                            .size_limit(1 << 20)
                            .build()
                            .map_err(|e| RulesError {
                                key: key("text"),
                                message: e.to_string(),
                            })?;
                        patterns.push(t);
                        Some(patterns.len() - 1)
                    }
                    None => None,
                };
                if spec.name.is_empty() {
                    return Err(RulesError {
                        key: key("name"),
                        message: "must not be empty".into(),
                    });
                }
                rules.push(Rule {
                    name: spec.name,
                    codes,
                    enhanced,
                    text,
                    category: spec.category,
                    stage: spec.stage,
                    outcome: spec.outcome,
                });
            }
        }
        let set = RegexSetBuilder::new(&patterns)
            .case_insensitive(true)
            .size_limit(64 << 20)
            .build()
            .map_err(|e| RulesError {
                key: "classify rules".into(),
                message: e.to_string(),
            })?;
        Ok(Classifier { rules, set })
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Classify one reply (or local failure: `code == None`).
    pub fn classify(&self, r: &ReplyRecord) -> Classification {
        if r.code.is_some_and(|c| (200..300).contains(&c)) {
            return Classification {
                outcome: Outcome::Delivered,
                category: None,
                stage: None,
                rule: "2xx".into(),
            };
        }
        let enhanced = r.enhanced.as_deref();
        let hits = self.set.matches(&r.text);
        let by_code = match r.code {
            Some(c) if c >= 500 => {
                if enhanced.is_some_and(|e| e.starts_with("4.")) {
                    Outcome::Deferred
                } else {
                    Outcome::Bounced
                }
            }
            _ => Outcome::Deferred,
        };
        for rule in &self.rules {
            if !rule.codes.is_empty() && !rule.codes.iter().any(|p| p.matches(r.code)) {
                continue;
            }
            if !rule.enhanced.is_empty() && !rule.enhanced.iter().any(|p| p.matches(enhanced)) {
                continue;
            }
            if rule.text.is_some_and(|i| !hits.matched(i)) {
                continue;
            }
            // A rule may call a text without a code final (an MTA's own
            // "retry timeout exceeded" in a DSN); live delivery still
            // retries every failure without a reply (see relay::dispatch).
            return Classification {
                outcome: rule.outcome.unwrap_or(by_code),
                category: Some(rule.category),
                stage: Some(
                    rule.stage
                        .unwrap_or_else(|| rule.category.default_stage(r.code, enhanced)),
                ),
                rule: rule.name.clone(),
            };
        }
        let category = if r.code.is_none() {
            Category::Connection
        } else {
            Category::Other
        };
        Classification {
            outcome: by_code,
            category: Some(category),
            stage: Some(category.default_stage(r.code, enhanced)),
            rule: "default".into(),
        }
    }
}

// ---- reply text parsing -----------------------------------------------

/// Parse a reply as people paste it: `550-5.1.1 text`, a multi-line reply
/// (`550-5.1.1 a` / `550 5.1.1 b`), a DSN `Diagnostic-Code: smtp; 550 ...`,
/// or a bounce line `host mx.example[192.0.2.1] said: 550 ...`. Text that
/// holds no reply code is a local failure (`code = None`).
pub fn parse_reply(input: &str) -> ReplyRecord {
    let mut s = input.trim();
    if let Some(rest) = strip_prefix_ci(s, "diagnostic-code:") {
        s = rest.trim_start();
    }
    if let Some(rest) = strip_prefix_ci(s, "smtp;") {
        s = rest.trim_start();
    }
    if !starts_with_code(s)
        && let Some(p) = embedded_code(s)
    {
        s = &s[p..];
    }
    if !starts_with_code(s) {
        return ReplyRecord::local(s.to_string());
    }
    let code: u16 = s[..3].parse().expect("three digits");
    let mut enhanced: Option<String> = None;
    let mut parts: Vec<&str> = Vec::new();
    // Reply lines; a pasted reply may have lost its line breaks, so also
    // split where `550-` / `550 ` repeats.
    for line in s.split(['\n', '\r']).filter(|l| !l.trim().is_empty()) {
        for seg in split_repeated(line.trim(), &s[..3]) {
            let mut t = seg;
            if t.len() >= 3
                && t.as_bytes()[..3] == s.as_bytes()[..3]
                && matches!(t.as_bytes().get(3), Some(b' ' | b'-') | None)
            {
                t = t.get(4..).unwrap_or("");
            }
            let t = t.trim_start();
            let (enh, rest) = split_enhanced(t);
            if let Some(e) = enh {
                enhanced.get_or_insert_with(|| e.to_string());
            }
            let rest = rest.trim();
            if !rest.is_empty() {
                parts.push(rest);
            }
        }
    }
    ReplyRecord {
        code: Some(code),
        enhanced,
        text: parts.join(" "),
    }
}

/// Where a reply starts inside a bounce text: after `said: ` (Postfix),
/// `...: ` (Exim's `SMTP error from remote mail server after RCPT TO:<x>: 550 ...`),
/// a quote (Exchange's `Remote Server returned '550 5.1.1 ...'`), or
/// anywhere a code is followed by an enhanced code.
fn embedded_code(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    (1..b.len()).find(|&i| {
        if !matches!(b[i - 1], b' ' | b'\'' | b'"') || !s.is_char_boundary(i) || !starts_with_code(&s[i..]) {
            return false;
        }
        let rest = s.get(i + 4..).unwrap_or("");
        split_enhanced(rest.trim_start()).0.is_some() || s[..i].ends_with(": ") || b[i - 1] != b' '
    })
}

fn strip_prefix_ci<'a>(s: &'a str, p: &str) -> Option<&'a str> {
    (s.len() >= p.len() && s.is_char_boundary(p.len()) && s[..p.len()].eq_ignore_ascii_case(p)).then(|| &s[p.len()..])
}

fn starts_with_code(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 3
        && (b'2'..=b'5').contains(&b[0])
        && b[1].is_ascii_digit()
        && b[2].is_ascii_digit()
        && matches!(b.get(3), None | Some(b' ' | b'-' | b'\t'))
}

/// Split `550-5.1.1 a 550-5.1.1 b 550 5.1.1 c` at each repeated `550-`/`550 `
/// that follows a space (a reply pasted on one line).
fn split_repeated<'a>(line: &'a str, code: &str) -> Vec<&'a str> {
    let mut out = Vec::new();
    let mut start = 0;
    let b = line.as_bytes();
    let mut i = 1;
    while i + 4 <= b.len() {
        if b[i - 1] == b' ' && &b[i..i + 3] == code.as_bytes() && matches!(b[i + 3], b'-' | b' ') {
            // only if an enhanced code or the text follows as in the first line
            out.push(&line[start..i - 1]);
            start = i;
            i += 4;
            continue;
        }
        i += 1;
    }
    out.push(&line[start..]);
    // Keep a split only when the pieces after the first repeat the code
    // with the same separator style as a real continuation (`550-`/`550 `
    // followed by an enhanced code); otherwise the number was just text.
    if out.len() > 1 {
        let genuine = out[1..].iter().all(|p| {
            let rest = p.get(4..).unwrap_or("");
            split_enhanced(rest.trim_start()).0.is_some()
        });
        if !genuine {
            return vec![line];
        }
    }
    out
}

/// `5.1.1 rest` → (`5.1.1`, `rest`); RFC 3463 §2: class.subject.detail,
/// subject and detail 1-3 digits.
fn split_enhanced(s: &str) -> (Option<&str>, &str) {
    let end = s.find([' ', '\t']).unwrap_or(s.len());
    let tok = &s[..end];
    let parts: Vec<&str> = tok.split('.').collect();
    let ok = parts.len() == 3
        && matches!(parts[0], "2" | "4" | "5")
        && parts[1..]
            .iter()
            .all(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()));
    if ok { (Some(tok), &s[end..]) } else { (None, s) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_forms() {
        let r = parse_reply("550-5.1.1 The email account that you tried to reach does not exist.");
        assert_eq!(r.code, Some(550));
        assert_eq!(r.enhanced.as_deref(), Some("5.1.1"));
        assert_eq!(r.text, "The email account that you tried to reach does not exist.");

        let r = parse_reply(
            "550-5.1.1 The email account that you tried to reach does not exist. Please try\r\n550-5.1.1 double-checking the recipient's email address for typos or\r\n550 5.1.1 unnecessary spaces. https://support.google.com/mail/?p=NoSuchUser",
        );
        assert_eq!(r.enhanced.as_deref(), Some("5.1.1"));
        assert!(
            r.text
                .starts_with("The email account that you tried to reach does not exist. Please try double-checking"),
            "{}",
            r.text
        );
        assert!(!r.text.contains("550"), "{}", r.text);

        // the same pasted on one line
        let r = parse_reply("550-5.1.1 a b 550-5.1.1 c 550 5.1.1 d");
        assert_eq!(r.text, "a b c d");
        // a number in the text is not a continuation
        let r = parse_reply("552 5.3.4 Message size exceeds 550 bytes");
        assert_eq!(r.text, "Message size exceeds 550 bytes");

        let r = parse_reply("Diagnostic-Code: smtp; 550 5.1.1 <x@y.example>: Recipient address rejected: User unknown");
        assert_eq!((r.code, r.enhanced.as_deref()), (Some(550), Some("5.1.1")));
        assert_eq!(r.text, "<x@y.example>: Recipient address rejected: User unknown");

        let r = parse_reply("host mx.example[192.0.2.1] said: 452 4.2.2 Mailbox full (in reply to RCPT TO command)");
        assert_eq!((r.code, r.enhanced.as_deref()), (Some(452), Some("4.2.2")));

        let r =
            parse_reply("SMTP error from remote mail server after RCPT TO:<bob@example.org>: 550 Unrouteable address");
        assert_eq!((r.code, r.text.as_str()), (Some(550), "Unrouteable address"));
        let r = parse_reply("Remote Server returned '550 5.1.1 RESOLVER.ADR.RecipNotFound; not found'");
        assert_eq!((r.code, r.enhanced.as_deref()), (Some(550), Some("5.1.1")));
        let r = parse_reply("delivery failed: 421 4.7.0 [TSS04] Messages temporarily deferred");
        assert_eq!((r.code, r.enhanced.as_deref()), (Some(421), Some("4.7.0")));
        // Non-ASCII text (byte positions inside a character are never cut).
        let r = parse_reply("550 5.1.1 Адрес не существует 550 5.1.1 второй");
        assert_eq!((r.code, r.enhanced.as_deref()), (Some(550), Some("5.1.1")));
        assert!(r.text.starts_with("Адрес"), "{r:?}");
        let r = parse_reply("550 Пользователь 550-неизвестен");
        assert_eq!(r.code, Some(550));
        // numbers in local failure texts are not replies
        for local in [
            "connect to 127.0.0.1:2525: Connection refused",
            "timed out after 300 seconds waiting for greeting",
            "read 250 bytes then the connection closed",
        ] {
            assert_eq!(parse_reply(local).code, None, "{local}");
        }

        let r = parse_reply("454 Throttling failure: Maximum sending rate exceeded.");
        assert_eq!((r.code, r.enhanced), (Some(454), None));
        assert_eq!(r.text, "Throttling failure: Maximum sending rate exceeded.");

        let r = parse_reply("connection refused");
        assert_eq!((r.code, r.text.as_str()), (None, "connection refused"));
        let r = parse_reply("421");
        assert_eq!((r.code, r.text.as_str()), (Some(421), ""));
    }

    #[test]
    fn patterns() {
        assert!(CodePat::parse("5xx").unwrap().matches(Some(554)));
        assert!(!CodePat::parse("5xx").unwrap().matches(Some(454)));
        assert!(CodePat::parse("55x").unwrap().matches(Some(552)));
        assert!(CodePat::parse("none").unwrap().matches(None));
        assert!(!CodePat::parse("none").unwrap().matches(Some(421)));
        for bad in ["xxx", "650", "5x", "5555", ""] {
            assert!(CodePat::parse(bad).is_none(), "{bad}");
        }
        assert!(EnhPat::parse("x.1.1").unwrap().matches(Some("4.1.1")));
        assert!(EnhPat::parse("5.7").unwrap().matches(Some("5.7.26")));
        assert!(!EnhPat::parse("5.7.2").unwrap().matches(Some("5.7.26")));
        assert!(!EnhPat::parse("5.1.1").unwrap().matches(None));
        for bad in ["1.1.1", "5.a.1", "5.1.1.1", "5.1000"] {
            assert!(EnhPat::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn outcome_by_code_and_traps() {
        let c = Classifier::from_sources(&[("t", "")]).unwrap();
        let out = |s: &str| c.classify(&parse_reply(s)).outcome;
        assert_eq!(out("250 ok"), Outcome::Delivered);
        assert_eq!(out("450 later"), Outcome::Deferred);
        assert_eq!(out("550 no"), Outcome::Bounced);
        // a 5xx with a transient enhanced code is retried
        assert_eq!(out("550 4.7.0 try later"), Outcome::Deferred);
        // a 4xx with a permanent enhanced code: the basic code decides
        assert_eq!(out("450 5.7.1 hmm"), Outcome::Deferred);
        assert_eq!(out("timed out"), Outcome::Deferred);
        let d = c.classify(&parse_reply("timed out"));
        assert_eq!((d.category, d.rule.as_str()), (Some(Category::Connection), "default"));
    }

    #[test]
    fn rules_apply_in_order_and_errors_name_the_rule() {
        let rules = r#"
[[rule]]
name = "first"
code = "55x"
text = "full"
category = "mailbox_full"
outcome = "deferred"

[[rule]]
name = "second"
enhanced = "x.2.2"
category = "mailbox_full"

[[rule]]
name = "catch"
code = ["550", "551"]
category = "policy"
"#;
        let c = Classifier::from_sources(&[("t", rules)]).unwrap();
        let r = c.classify(&parse_reply("552 5.2.2 Mailbox FULL"));
        assert_eq!((r.rule.as_str(), r.outcome), ("first", Outcome::Deferred));
        assert_eq!(r.stage, Some(Stage::Recipient));
        let r = c.classify(&parse_reply("452 4.2.2 over quota"));
        assert_eq!((r.rule.as_str(), r.outcome), ("second", Outcome::Deferred));
        let r = c.classify(&parse_reply("551 5.2.2 over quota"));
        assert_eq!((r.rule.as_str(), r.outcome), ("second", Outcome::Bounced));
        let r = c.classify(&parse_reply("550 nope"));
        assert_eq!((r.rule.as_str(), r.category), ("catch", Some(Category::Policy)));

        let bad = "[[rule]]\nname = \"r\"\ntext = \"(unclosed\"\ncategory = \"policy\"\n";
        let e = Classifier::from_sources(&[("f.toml", bad)]).unwrap_err();
        assert_eq!(e.key, "f.toml: rule[0] (r).text");
        let bad = "[[rule]]\nname = \"r\"\ncode = \"6xx\"\ncategory = \"policy\"\n";
        assert_eq!(
            Classifier::from_sources(&[("f", bad)]).unwrap_err().key,
            "f: rule[0] (r).code"
        );
        let bad = "[[rule]]\nname = \"r\"\ncategory = \"nonsense\"\n";
        assert!(
            Classifier::from_sources(&[("f", bad)])
                .unwrap_err()
                .message
                .contains("nonsense")
        );
    }

    #[test]
    fn builtin_rules_compile() {
        let c = Classifier::builtin();
        assert!(c.len() > 20);
    }
}
