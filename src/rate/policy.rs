//! Rate policy as data: the `[shaping]`, `[[shaping.provider]]`,
//! `[[budget]]` and `[[backoff]]` config sections, their validation (every
//! error names its key) and the compiled form the shaper and the budgets
//! use. The default back-off rules are `config/backoff.toml`, built in.
//!
//! Trust boundary: operator config; validated in full before it replaces a
//! running policy, so a bad reload changes nothing.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use regex::Regex;
use serde::Deserialize;

use crate::classify::Category;
use crate::config::ConfigError;
use crate::throttle::{Limit, Rate};

const DEFAULT_BACKOFF: &str = include_str!("../../config/backoff.toml");

fn err(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        message: message.into(),
    }
}

/// `[shaping]`: how fast mail is handed to the relay, per destination
/// provider. Mail over a rate waits in its queue; nobody is refused.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShapingConfig {
    /// Look up each recipient domain's MX to find its provider; off: only
    /// the provider table's `domains` are known, everything else is `other`.
    pub group_by_mx: bool,
    /// How long a recipient domain whose MX lookup failed (timeout,
    /// SERVFAIL) counts as `other` before it is looked up again. A queued
    /// job of `other` looks again when it comes due.
    #[serde(with = "humantime_serde")]
    pub mx_failure_ttl: Duration,
    /// An operator provider table, tried before the built-in one.
    pub providers_file: Option<PathBuf>,
    pub replace_default_providers: bool,
    /// A cap on everything handed to the relay (SES account limit,
    /// Microsoft 365's 30 messages a minute).
    pub relay_rate: Option<Rate>,
    pub relay_burst: u32,
    /// The rate adaptive back-off slows from when neither the pair nor the
    /// provider has one configured.
    pub backoff_base_rate: Rate,
    /// Back-off rules tried before the built-in ones (`config/backoff.toml`).
    pub backoff_file: Option<PathBuf>,
    pub replace_default_backoff: bool,
    /// Back-off rules written inline; tried first.
    pub backoff: Vec<BackoffRuleConfig>,
    pub provider: Vec<ProviderShaping>,
}

impl Default for ShapingConfig {
    fn default() -> Self {
        ShapingConfig {
            group_by_mx: true,
            mx_failure_ttl: Duration::from_secs(60),
            providers_file: None,
            replace_default_providers: false,
            relay_rate: None,
            relay_burst: 1,
            backoff_base_rate: Rate {
                count: 600,
                per: Duration::from_secs(60),
            },
            backoff_file: None,
            replace_default_backoff: false,
            backoff: Vec::new(),
            provider: Vec::new(),
        }
    }
}

/// `[[shaping.provider]]`: limits for one provider (or `other`, or `*` for
/// each provider without an entry of its own).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderShaping {
    pub name: String,
    /// Messages (transactions) per period handed to the relay for this provider.
    pub rate: Option<Rate>,
    #[serde(default = "one")]
    pub burst: u32,
    /// Deliveries to this provider in flight at once.
    pub max_concurrency: Option<u32>,
    /// The same, per sender domain at this provider.
    pub sender_rate: Option<Rate>,
    #[serde(default = "one")]
    pub sender_burst: u32,
}

fn one() -> u32 {
    1
}

/// What a back-off rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Slow the (provider, sender domain) pair to `factor` of its rate.
    Slow,
    /// Hold the (provider, sender domain) pair's mail.
    Suspend,
    /// Hold all of the tenant's mail.
    SuspendTenant,
    /// Hold all delivery (our own relay credentials were refused).
    PauseDelivery,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Slow => "slow",
            Action::Suspend => "suspend",
            Action::SuspendTenant => "suspend_tenant",
            Action::PauseDelivery => "pause_delivery",
        }
    }
}

/// `[[backoff]]` / `[[shaping.backoff]]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackoffRuleConfig {
    pub name: String,
    /// Only replies for recipients at this provider.
    pub provider: Option<String>,
    /// Only replies the classifier put in this category.
    pub category: Option<Category>,
    /// A regex over `code enhanced text` of the reply (case-insensitive).
    #[serde(rename = "match")]
    pub pattern: Option<String>,
    pub action: Action,
    /// For `slow`: the fraction of the rate left, in (0, 1).
    pub factor: Option<f64>,
    /// How long the action lasts.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// For `slow`: after `duration`, the rate climbs back to normal over
    /// this long (default: `duration`).
    #[serde(default, with = "humantime_serde")]
    pub recover: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackoffFile {
    #[serde(default)]
    backoff: Vec<BackoffRuleConfig>,
}

/// A compiled back-off rule.
#[derive(Debug, Clone)]
pub struct BackoffRule {
    pub name: String,
    pub provider: Option<String>,
    pub category: Option<Category>,
    pub pattern: Option<Regex>,
    pub action: Action,
    pub factor: f64,
    pub duration: Duration,
    pub recover: Duration,
}

impl BackoffRule {
    /// Does this rule apply to a reply (as `code enhanced text`) for a
    /// recipient at `provider` that the classifier put in `category`?
    pub fn matches(&self, provider: &str, category: Option<Category>, reply: &str) -> bool {
        self.provider.as_deref().is_none_or(|p| p == provider)
            && self.category.is_none_or(|c| Some(c) == category)
            && self.pattern.as_ref().is_none_or(|re| re.is_match(reply))
    }
}

/// `[[budget]]`: what one tenant, credential or sender domain may submit.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    pub scope: Scope,
    /// The tenant name, username or sender domain this budget is for;
    /// absent: every one of the scope, each counted on its own.
    #[serde(rename = "match")]
    pub key: Option<String>,
    /// Messages per period, e.g. `["100/min", "5000/day"]`.
    #[serde(default)]
    pub messages: Vec<Rate>,
    /// Recipients per period.
    #[serde(default)]
    pub recipients: Vec<Rate>,
}

/// What a budget counts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    Tenant,
    /// A SMTP AUTH username: one agent.
    Credential,
    SenderDomain,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Tenant => "tenant",
            Scope::Credential => "credential",
            Scope::SenderDomain => "sender_domain",
        }
    }
}

/// Limits of one provider, compiled.
#[derive(Debug, Clone, Default)]
pub struct ProviderLimits {
    pub rate: Option<Limit>,
    pub max_concurrency: Option<u32>,
    pub sender_rate: Option<Limit>,
}

/// The policy the shaper runs on. Replaced whole on reload.
#[derive(Debug, Clone)]
pub struct ShapingPolicy {
    pub providers: HashMap<String, ProviderLimits>,
    /// For providers without an entry (`name = "*"`).
    pub default: ProviderLimits,
    pub relay: Option<Limit>,
    pub backoff_base: Limit,
    pub backoff: Vec<BackoffRule>,
}

impl Default for ShapingPolicy {
    fn default() -> Self {
        ShapingPolicy {
            providers: HashMap::new(),
            default: ProviderLimits::default(),
            relay: None,
            backoff_base: Limit::new(ShapingConfig::default().backoff_base_rate, 1),
            backoff: Vec::new(),
        }
    }
}

impl ShapingPolicy {
    pub fn limits(&self, provider: &str) -> &ProviderLimits {
        self.providers.get(provider).unwrap_or(&self.default)
    }

    /// The first back-off rule that applies to a reply.
    pub fn backoff_for(&self, provider: &str, category: Option<Category>, reply: &str) -> Option<&BackoffRule> {
        self.backoff.iter().find(|r| r.matches(provider, category, reply))
    }
}

impl ShapingConfig {
    /// Validate and compile. `known` are the provider names of the provider
    /// table; `backoff_file` is the operator's rules file text, if any.
    pub fn compile(&self, known: &HashSet<String>, backoff_file: Option<&str>) -> Result<ShapingPolicy, ConfigError> {
        let mut p = ShapingPolicy {
            relay: self.relay_rate.map(|r| Limit::new(r, self.relay_burst)),
            backoff_base: Limit::new(self.backoff_base_rate, 1),
            ..ShapingPolicy::default()
        };
        if self.relay_burst == 0 {
            return Err(err("shaping.relay_burst", "must be at least 1"));
        }
        for (i, ps) in self.provider.iter().enumerate() {
            let k = format!("shaping.provider[{i}]");
            if ps.name != "*" && ps.name != "other" && !known.contains(&ps.name) {
                let mut names: Vec<&String> = known.iter().collect();
                names.sort();
                return Err(err(
                    format!("{k}.name"),
                    format!(
                        "unknown provider {:?} (known: {}, other, *)",
                        ps.name,
                        names.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
            if ps.burst == 0 {
                return Err(err(format!("{k}.burst"), "must be at least 1"));
            }
            if ps.sender_burst == 0 {
                return Err(err(format!("{k}.sender_burst"), "must be at least 1"));
            }
            if ps.max_concurrency == Some(0) {
                return Err(err(format!("{k}.max_concurrency"), "must be at least 1"));
            }
            let limits = ProviderLimits {
                rate: ps.rate.map(|r| Limit::new(r, ps.burst)),
                max_concurrency: ps.max_concurrency,
                sender_rate: ps.sender_rate.map(|r| Limit::new(r, ps.sender_burst)),
            };
            if ps.name == "*" {
                p.default = limits;
            } else if p.providers.insert(ps.name.clone(), limits).is_some() {
                return Err(err(
                    format!("{k}.name"),
                    format!("provider {:?} is listed twice", ps.name),
                ));
            }
        }
        let mut sources: Vec<(String, Vec<BackoffRuleConfig>)> = vec![("shaping.backoff".into(), self.backoff.clone())];
        if let Some(text) = backoff_file {
            let f: BackoffFile = toml::from_str(text).map_err(|e| err("shaping.backoff_file", e.message()))?;
            sources.push(("shaping.backoff_file: backoff".into(), f.backoff));
        }
        if !self.replace_default_backoff {
            let f: BackoffFile = toml::from_str(DEFAULT_BACKOFF).expect("built-in config/backoff.toml parses");
            sources.push(("config/backoff.toml: backoff".into(), f.backoff));
        }
        for (src, rules) in sources {
            for (i, r) in rules.into_iter().enumerate() {
                p.backoff.push(compile_rule(&format!("{src}[{i}]"), r, known)?);
            }
        }
        Ok(p)
    }
}

fn compile_rule(k: &str, r: BackoffRuleConfig, known: &HashSet<String>) -> Result<BackoffRule, ConfigError> {
    if r.name.trim().is_empty() {
        return Err(err(format!("{k}.name"), "must not be empty"));
    }
    if let Some(pv) = &r.provider
        && pv != "other"
        && !known.contains(pv)
    {
        return Err(err(format!("{k}.provider"), format!("unknown provider {pv:?}")));
    }
    let pattern = match &r.pattern {
        Some(s) => Some(
            regex::RegexBuilder::new(s)
                .case_insensitive(true)
                .size_limit(1 << 20)
                .build()
                .map_err(|e| err(format!("{k}.match"), e.to_string()))?,
        ),
        None => None,
    };
    if r.provider.is_none() && r.category.is_none() && pattern.is_none() && r.action != Action::PauseDelivery {
        return Err(err(k, "a rule needs at least one of provider, category or match"));
    }
    let factor = match (r.action, r.factor) {
        (Action::Slow, Some(f)) if f > 0.0 && f < 1.0 => f,
        (Action::Slow, Some(f)) => return Err(err(format!("{k}.factor"), format!("{f} is not between 0 and 1"))),
        (Action::Slow, None) => return Err(err(format!("{k}.factor"), "required for action = \"slow\"")),
        (_, Some(_)) => return Err(err(format!("{k}.factor"), "only for action = \"slow\"")),
        (_, None) => 1.0,
    };
    const MAX: Duration = Duration::from_secs(30 * 86_400);
    if r.duration.is_zero() || r.duration > MAX {
        return Err(err(
            format!("{k}.duration"),
            "must be longer than zero and at most 30 days",
        ));
    }
    if r.recover.is_some_and(|d| d > MAX) {
        return Err(err(format!("{k}.recover"), "at most 30 days"));
    }
    Ok(BackoffRule {
        name: r.name,
        provider: r.provider,
        category: r.category,
        pattern,
        action: r.action,
        factor,
        duration: r.duration,
        recover: r.recover.unwrap_or(r.duration),
    })
}

/// The submission budgets, compiled: (scope, key or `None` for each) →
/// message and recipient limits.
#[derive(Debug, Clone, Default)]
pub struct BudgetPolicy {
    pub rules: Vec<BudgetRule>,
}

#[derive(Debug, Clone)]
pub struct BudgetRule {
    pub scope: Scope,
    pub key: Option<String>,
    pub messages: Vec<Limit>,
    pub recipients: Vec<Limit>,
}

impl BudgetPolicy {
    pub fn compile(budgets: &[BudgetConfig]) -> Result<Arc<BudgetPolicy>, ConfigError> {
        let mut seen = HashSet::new();
        let mut rules = Vec::new();
        for (i, b) in budgets.iter().enumerate() {
            let k = format!("budget[{i}]");
            if b.messages.is_empty() && b.recipients.is_empty() {
                return Err(err(k, "a budget needs messages or recipients"));
            }
            let key = match &b.key {
                Some(s) if s.trim().is_empty() || s == "*" => None,
                Some(s) if b.scope == Scope::SenderDomain => Some(s.to_ascii_lowercase()),
                Some(s) => Some(s.clone()),
                None => None,
            };
            if !seen.insert((b.scope, key.clone())) {
                return Err(err(
                    format!("{k}.match"),
                    format!(
                        "a {} budget for {} is already defined",
                        b.scope.as_str(),
                        key.as_deref().unwrap_or("every key")
                    ),
                ));
            }
            for (field, rates) in [("messages", &b.messages), ("recipients", &b.recipients)] {
                let mut periods = HashSet::new();
                for (j, r) in rates.iter().enumerate() {
                    if !periods.insert(r.per) {
                        return Err(err(
                            format!("{k}.{field}[{j}]"),
                            format!("a second rate per {:?}", r.per),
                        ));
                    }
                }
            }
            rules.push(BudgetRule {
                scope: b.scope,
                key,
                messages: b.messages.iter().map(|r| Limit::budget(*r)).collect(),
                recipients: b.recipients.iter().map(|r| Limit::budget(*r)).collect(),
            });
        }
        Ok(Arc::new(BudgetPolicy { rules }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known() -> HashSet<String> {
        ["google", "yahoo", "microsoft_365", "microsoft_consumer"]
            .into_iter()
            .map(String::from)
            .collect()
    }

    fn compile(text: &str) -> Result<ShapingPolicy, ConfigError> {
        let c: ShapingConfig = toml::from_str(text).map_err(|e| err("toml", e.to_string()))?;
        c.compile(&known(), None)
    }

    #[test]
    fn builtin_backoff_rules_compile_and_match_the_field_replies() {
        let p = compile("").unwrap();
        assert!(p.backoff.len() >= 5);
        let cases = [
            (
                "google",
                Some(Category::RateLimited),
                "421 4.7.28 Our system has detected an unusual rate of unsolicited mail originating from your IP address. To protect our users from spam, mail sent from your IP address has been temporarily rate limited.",
                Action::Slow,
            ),
            (
                "yahoo",
                Some(Category::RateLimited),
                "421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user complaints",
                Action::Slow,
            ),
            (
                "microsoft_consumer",
                Some(Category::ReputationBlocked),
                "451 4.7.650 The mail server [192.0.2.1] has been temporarily rate limited due to IP reputation.",
                Action::Slow,
            ),
            (
                "other",
                Some(Category::RateLimited),
                "454 Throttling failure: Maximum sending rate exceeded.",
                Action::Slow,
            ),
            (
                "other",
                Some(Category::RelayDenied),
                "535 5.7.8 Authentication credentials invalid",
                Action::PauseDelivery,
            ),
        ];
        let classifier = crate::classify::Classifier::builtin();
        for (provider, cat, reply, action) in cases {
            let class = classifier.classify(&crate::classify::parse_reply(reply));
            assert_eq!(class.category, cat, "{reply}: classified by {}", class.rule);
            let r = p
                .backoff_for(provider, cat, reply)
                .unwrap_or_else(|| panic!("no rule for {reply}"));
            assert_eq!(r.action, action, "{reply}: rule {}", r.name);
        }
        // A mailbox-full deferral at Gmail is not a throttle.
        assert!(
            p.backoff_for(
                "google",
                Some(Category::MailboxFull),
                "452 4.2.2 The email account is over quota"
            )
            .is_none()
        );
    }

    #[test]
    fn providers_compile() {
        let p = compile(
            r#"
relay_rate = "30/min"
[[provider]]
name = "google"
rate = "300/min"
burst = 5
max_concurrency = 3
sender_rate = "100/min"
[[provider]]
name = "*"
rate = "60/min"
"#,
        )
        .unwrap();
        let g = p.limits("google");
        assert_eq!(g.rate.unwrap().burst, 5);
        assert_eq!(g.max_concurrency, Some(3));
        assert_eq!(g.sender_rate.unwrap().rate.count, 100);
        assert_eq!(p.limits("yahoo").rate.unwrap().rate.count, 60, "the * entry");
        assert_eq!(p.relay.unwrap().rate.count, 30);
    }

    #[test]
    fn errors_name_the_key() {
        for (text, key, what) in [
            (
                "[[provider]]\nname = \"gmial\"\n",
                "shaping.provider[0].name",
                "unknown provider",
            ),
            (
                "[[provider]]\nname = \"google\"\n[[provider]]\nname = \"google\"\n",
                "shaping.provider[1].name",
                "twice",
            ),
            (
                "[[provider]]\nname = \"google\"\nburst = 0\n",
                "shaping.provider[0].burst",
                "at least 1",
            ),
            (
                "[[provider]]\nname = \"google\"\nmax_concurrency = 0\n",
                "shaping.provider[0].max_concurrency",
                "at least 1",
            ),
            (
                "[[backoff]]\nname = \"x\"\nmatch = \"(\"\naction = \"slow\"\nfactor = 0.5\nduration = \"1m\"\n",
                "shaping.backoff[0].match",
                "regex",
            ),
            (
                "[[backoff]]\nname = \"x\"\nmatch = \"a\"\naction = \"slow\"\nduration = \"1m\"\n",
                "shaping.backoff[0].factor",
                "required",
            ),
            (
                "[[backoff]]\nname = \"x\"\nmatch = \"a\"\naction = \"slow\"\nfactor = 1.5\nduration = \"1m\"\n",
                "shaping.backoff[0].factor",
                "between",
            ),
            (
                "[[backoff]]\nname = \"x\"\nmatch = \"a\"\naction = \"suspend\"\nfactor = 0.5\nduration = \"1m\"\n",
                "shaping.backoff[0].factor",
                "only for",
            ),
            (
                "[[backoff]]\nname = \"x\"\naction = \"suspend\"\nduration = \"1m\"\n",
                "shaping.backoff[0]",
                "at least one",
            ),
            (
                "[[backoff]]\nname = \"x\"\nprovider = \"aol\"\naction = \"suspend\"\nduration = \"1m\"\n",
                "shaping.backoff[0].provider",
                "unknown provider",
            ),
        ] {
            let e = compile(text).unwrap_err();
            assert_eq!(e.key, key, "{text}: {e}");
            assert!(e.message.contains(what), "{text}: {e}");
        }
    }

    #[test]
    fn operator_rules_come_first_and_can_replace_the_defaults() {
        let text = "[[backoff]]\nname = \"mine\"\nprovider = \"google\"\naction = \"suspend\"\nduration = \"5m\"\n";
        let p = compile(text).unwrap();
        let gmail = "421 4.7.28 unusual rate of unsolicited mail";
        assert_eq!(
            p.backoff_for("google", Some(Category::RateLimited), gmail)
                .unwrap()
                .name,
            "mine"
        );
        let c: ShapingConfig = toml::from_str("replace_default_backoff = true").unwrap();
        let file = "[[backoff]]\nname = \"f\"\ncategory = \"rate_limited\"\naction = \"slow\"\nfactor = 0.5\nduration = \"1m\"\n";
        let p = c.compile(&known(), Some(file)).unwrap();
        assert_eq!(p.backoff.len(), 1);
        assert_eq!(
            p.backoff[0].recover,
            Duration::from_secs(60),
            "recover defaults to duration"
        );
    }

    #[test]
    fn budgets_compile_and_refuse_duplicates() {
        let b: Vec<BudgetConfig> = toml::from_str::<toml::Table>(
            r#"
[[budget]]
scope = "tenant"
messages = ["100/min", "5000/day"]
[[budget]]
scope = "credential"
match = "agent-7"
recipients = ["50/h"]
"#,
        )
        .unwrap()["budget"]
            .clone()
            .try_into()
            .unwrap();
        let p = BudgetPolicy::compile(&b).unwrap();
        assert_eq!(p.rules.len(), 2);
        assert_eq!(p.rules[0].messages[0].burst, 100, "a budget's burst is its count");
        assert_eq!(p.rules[1].key.as_deref(), Some("agent-7"));
        let mut dup = b.clone();
        dup.push(b[0].clone());
        assert_eq!(BudgetPolicy::compile(&dup).unwrap_err().key, "budget[2].match");
        let mut twice = b[0].clone();
        twice.messages.push("7/min".parse().unwrap());
        assert_eq!(
            BudgetPolicy::compile(&[twice]).unwrap_err().key,
            "budget[0].messages[2]"
        );
        let empty = BudgetConfig {
            scope: Scope::Tenant,
            key: None,
            messages: vec![],
            recipients: vec![],
        };
        assert_eq!(BudgetPolicy::compile(&[empty]).unwrap_err().key, "budget[0]");
    }
}
