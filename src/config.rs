//! Typed, validated configuration (TOML). Every error names the key it is
//! about, e.g. `listeners[1].trusted_networks: required when auth = "none"`.
//!
//! Trust boundary: the config file is trusted operator input, but it is
//! validated fully before anything listens, so a typo never becomes an
//! open relay (`auth = "none"` without networks is refused here).

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

/// Rate policy compiled from the config (see [`Config::rate_policy`]).
pub struct RatePolicy {
    pub providers: std::sync::Arc<crate::rate::providers::ProviderTable>,
    pub shaping: std::sync::Arc<crate::rate::policy::ShapingPolicy>,
    pub budgets: std::sync::Arc<crate::rate::policy::BudgetPolicy>,
    pub warmups: std::sync::Arc<crate::rate::budget::WarmupPolicy>,
    pub breakers: crate::rate::breaker::BreakerPolicy,
    pub runaway: crate::rate::runaway::RunawayPolicy,
}

/// A configuration error that names the offending key.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

/// Largest `limits.max_message_bytes`: a spool record (envelope + body) must
/// stay under `spool::record::MAX_RECORD` (1 GiB).
pub const MAX_MESSAGE_BYTES: usize = 1_000_000_000;

fn err(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub listeners: Vec<ListenerConfig>,
    pub tls: Option<TlsConfig>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub tenants: Vec<TenantConfig>,
    /// Durable message store; with `relay`, enables store-and-forward.
    pub spool: Option<SpoolConfig>,
    /// The upstream smarthost.
    pub relay: Option<RelayConfig>,
    #[serde(default)]
    pub queue: QueueConfig,
    pub events: Option<EventsConfig>,
    #[serde(default)]
    pub dns: DnsConfig,
    #[serde(default)]
    pub guard: GuardConfig,
    /// Per-sender-domain guard settings (DKIM selectors, signing).
    #[serde(default)]
    pub domains: Vec<DomainConfig>,
    /// Reply classification rules (`config/classify.toml` is built in).
    #[serde(default)]
    pub classify: ClassifyConfig,
    /// The suppression list (embedded store).
    #[serde(default)]
    pub suppression: SuppressionConfig,
    /// The admin HTTP API; off unless configured.
    pub admin: Option<AdminConfig>,
    /// Signed webhooks (durable outbox per endpoint).
    #[serde(default)]
    pub webhooks: crate::webhook::WebhooksConfig,
    /// The per-message trace store.
    #[serde(default)]
    pub trace: crate::trace::TraceConfig,
    /// Fleet mode: state shared through Redis (default: embedded).
    #[serde(default)]
    pub cluster: crate::cluster::ClusterConfig,
    /// Delivery shaping per destination provider, and adaptive back-off.
    #[serde(default)]
    pub shaping: crate::rate::policy::ShapingConfig,
    /// Submission budgets per tenant, credential and sender domain.
    #[serde(default)]
    pub budget: Vec<crate::rate::policy::BudgetConfig>,
    /// Warm-up ramps of new sender domains (recipients per UTC day).
    #[serde(default)]
    pub warmup: Vec<crate::rate::budget::WarmupConfig>,
    /// Circuit breakers per sender domain and tenant.
    #[serde(default)]
    pub breakers: crate::rate::breaker::BreakersConfig,
    /// The runaway guard for agents.
    #[serde(default)]
    pub runaway: crate::rate::runaway::RunawayConfig,
    /// Directory of the config file; relative paths resolve against it.
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// The file it was loaded from (a fleet reload reads it again).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Name in the greeting and EHLO reply.
    pub hostname: String,
    /// How long in-flight transactions may run after SIGTERM/SIGINT.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Threads that run the SMTP sessions and delivery workers, each with
    /// its own single-threaded runtime; 0 = one per CPU.
    pub io_threads: usize,
}

/// Upper bound of `server.io_threads`: each is a thread with its own
/// runtime, and far more than the CPUs only adds switching.
pub const MAX_IO_THREADS: usize = 256;

impl ServerConfig {
    /// `io_threads`, with 0 resolved to the number of CPUs.
    pub fn io_threads(&self) -> usize {
        match self.io_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            hostname: "localhost".into(),
            shutdown_grace: Duration::from_secs(30),
            io_threads: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `sendguard=debug,info`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// RFC 3207, port 587 style.
    Starttls,
    /// RFC 8314, port 465 style.
    Implicit,
    None,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    Required,
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub addr: SocketAddr,
    pub tls: TlsMode,
    pub auth: AuthMode,
    /// Client networks allowed to connect; required with `auth = "none"`.
    #[serde(default)]
    pub trusted_networks: Vec<String>,
    /// Tenant that trusted clients act as (only with `auth = "none"`).
    pub tenant: Option<String>,
    #[serde(skip)]
    pub networks: Vec<IpNet>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest message accepted, advertised as `SIZE` (RFC 1870).
    pub max_message_bytes: usize,
    /// Recipients per message; more get `452 4.5.3`.
    pub max_recipients: usize,
    /// Longest command line, CRLF excluded (RFC 5321 §4.5.3.1.4: ≥ 512).
    pub max_command_line: usize,
    /// Concurrent connections over all listeners (taken before accept).
    pub max_connections: usize,
    /// Concurrent connections from one client: an IPv4 address or an IPv6
    /// prefix of `ipv6_prefix_length` bits.
    pub max_connections_per_ip: usize,
    /// How IPv6 clients are grouped for `max_connections_per_ip`: by this
    /// many leading bits (128: every address alone; 64: one subscriber's
    /// /64, whose addresses a host may rotate through, for listeners open
    /// to the internet).
    pub ipv6_prefix_length: u8,
    /// Longest line of message content in octets, CRLF excluded (RFC 5322
    /// §2.1.1: 998); a longer one refuses the message. 0: no limit.
    pub max_line_length: usize,
    /// Wait for the next command (RFC 5321 §4.5.3.2.7: 5 minutes).
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Wait for more message content (RFC 5321 §4.5.3.2.5: 3 minutes per block).
    #[serde(with = "humantime_serde")]
    pub data_timeout: Duration,
    /// TLS handshake deadline.
    #[serde(with = "humantime_serde")]
    pub tls_handshake_timeout: Duration,
    /// Erroneous commands before the session is ended with `421 4.7.0`.
    pub max_errors: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 10 * 1024 * 1024,
            max_recipients: 100,
            max_command_line: 2048,
            max_connections: 1000,
            max_connections_per_ip: 100,
            ipv6_prefix_length: crate::server::limits::DEFAULT_IPV6_PREFIX,
            max_line_length: 998,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(180),
            tls_handshake_timeout: Duration::from_secs(30),
            max_errors: 20,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Failed AUTH attempts from one IP within `failure_window` before the
    /// IP is refused with `421 4.7.0` for the rest of the window.
    pub max_failures: u32,
    #[serde(with = "humantime_serde")]
    pub failure_window: Duration,
    /// Delay before answering a failed AUTH (slows guessing).
    #[serde(with = "humantime_serde")]
    pub failure_delay: Duration,
    /// How long a successful AUTH is remembered, so the same username and
    /// password skip argon2 (tens of ms of CPU) on the next connection;
    /// 0 = verify every time. Failures are never remembered.
    #[serde(with = "humantime_serde")]
    pub cache_ttl: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            max_failures: 5,
            failure_window: Duration::from_secs(60),
            failure_delay: Duration::from_secs(1),
            cache_ttl: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    /// How long a group commit may wait for messages other sessions are
    /// still receiving, so one fsync covers them too (never waits when no
    /// other message is being received). `0s`: commit at once.
    #[serde(with = "humantime_serde", default = "default_commit_delay")]
    pub commit_delay: Duration,
    /// Messages still waiting in a mostly-empty segment this long after it
    /// filled (held, or shaped behind a backlog) move to files of their
    /// own, so the segment's 16 MiB can go.
    #[serde(with = "humantime_serde", default = "default_compact_after")]
    pub compact_after: Duration,
}

fn default_commit_delay() -> Duration {
    crate::spool::DEFAULT_COMMIT_DELAY
}

fn default_compact_after() -> Duration {
    Duration::from_secs(60)
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum RelayTls {
    /// Plain SMTP (only sensible on loopback or a private link).
    None,
    /// STARTTLS, required: never falls back to plaintext.
    #[default]
    Starttls,
    /// TLS from the first byte (port 465 style).
    Implicit,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// `host:port` of the smarthost.
    pub addr: String,
    #[serde(default)]
    pub tls: RelayTls,
    /// Name to verify the upstream certificate against (default: host of `addr`).
    pub tls_server_name: Option<String>,
    /// PEM CA bundle to trust instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// Accept any upstream certificate. Dangerous: anyone on the path can
    /// read and alter mail. For lab setups only.
    #[serde(default)]
    pub danger_accept_invalid_certs: bool,
    pub username: Option<String>,
    pub password: Option<String>,
    /// File whose first line is the password (instead of `password`).
    pub password_file: Option<PathBuf>,
    /// Public IPs receivers will see for mail from this relay (SPF checks).
    #[serde(default)]
    pub egress_ips: Vec<std::net::IpAddr>,
    /// EHLO name (default: `server.hostname`).
    pub helo_name: Option<String>,
    /// Concurrent upstream connections.
    #[serde(default = "d_relay_conns")]
    pub max_connections: usize,
    /// Messages per connection before it is closed and reopened.
    #[serde(default = "d_msgs_per_conn")]
    pub max_messages_per_connection: usize,
    #[serde(default = "d_30s", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Greeting, EHLO, AUTH, MAIL, RCPT, DATA (RFC 5321 §4.5.3.2: 5 minutes).
    #[serde(default = "d_5m", with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Sending content and waiting for the final reply (§4.5.3.2.6: 10 minutes).
    #[serde(default = "d_10m", with = "humantime_serde")]
    pub data_timeout: Duration,
    /// An unused pooled connection is closed after this long.
    #[serde(default = "d_30s", with = "humantime_serde")]
    pub idle_timeout: Duration,
}

fn d_relay_conns() -> usize {
    20
}
fn d_msgs_per_conn() -> usize {
    1000
}
fn d_30s() -> Duration {
    Duration::from_secs(30)
}
fn d_5m() -> Duration {
    Duration::from_secs(300)
}
fn d_10m() -> Duration {
    Duration::from_secs(600)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Delay before the first retry of a deferred recipient.
    #[serde(with = "humantime_serde")]
    pub first_retry: Duration,
    /// Cap of the exponential backoff interval.
    #[serde(with = "humantime_serde")]
    pub max_retry: Duration,
    /// A recipient still deferred this long after receipt expires.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Message bodies kept in memory for immediate delivery; beyond this
    /// they are read back from the spool when their turn comes.
    pub memory_bytes: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            first_retry: Duration::from_secs(300),
            max_retry: Duration::from_secs(3600),
            max_age: Duration::from_secs(3 * 86400),
            memory_bytes: 64 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsConfig {
    /// JSON-lines file events are appended to.
    pub path: PathBuf,
}

/// Whether `domain` (lower case) is covered by a `sender_domains` entry:
/// `example.com` exactly, `*.example.com` any subdomain (not the parent).
pub fn sender_domain_matches(pattern: &str, domain: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(parent) => {
            domain.len() > parent.len() + 1
                && domain.ends_with(parent)
                && domain[..domain.len() - parent.len()].ends_with('.')
        }
        None => pattern == domain,
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub name: String,
    /// Domains the tenant may send from; `*.example.com` covers subdomains.
    #[serde(default)]
    pub sender_domains: Vec<String>,
    /// Individual addresses the tenant may send from.
    #[serde(default)]
    pub sender_addresses: Vec<String>,
    /// Allow the null reverse-path `MAIL FROM:<>`.
    #[serde(default)]
    pub allow_null_sender: bool,
    #[serde(default)]
    pub users: Vec<UserConfig>,
    /// What the guard does with this tenant's mail.
    #[serde(default)]
    pub guard: GuardMode,
    /// Send the envelope sender a delivery status notification (RFC 3464)
    /// when accepted mail bounces or expires.
    #[serde(default = "yes")]
    pub dsn: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SuppressionConfig {
    /// Log file of the embedded store. Default: `suppressions.jsonl` in
    /// `spool.dir`; without a spool (and without this key) there is no
    /// suppression list: nothing is checked at RCPT, the API answers 503.
    pub path: Option<PathBuf>,
    /// Suppress recipients whose bounce is classified `user_unknown`,
    /// `mailbox_disabled` or `domain_not_found` (default true).
    #[serde(default = "yes")]
    pub auto_hard_bounce: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Listen address; keep it on loopback or a private network.
    #[serde(default = "default_admin_addr")]
    pub addr: SocketAddr,
    /// Bearer token every request must carry (`Authorization: Bearer ...`).
    #[serde(default)]
    pub token: String,
    /// File whose first line is the token (instead of `token`).
    pub token_file: Option<PathBuf>,
    /// Most entries one import may hold.
    #[serde(default = "default_import_entries")]
    pub max_import_entries: usize,
    /// Largest request body accepted.
    #[serde(default = "default_body_bytes")]
    pub max_body_bytes: usize,
    /// Serve `/metrics` without the bearer token (for a Prometheus that
    /// scrapes without credentials on a private network).
    #[serde(default)]
    pub public_metrics: bool,
}

impl Default for SuppressionConfig {
    fn default() -> Self {
        SuppressionConfig {
            path: None,
            auto_hard_bounce: true,
        }
    }
}

fn default_admin_addr() -> SocketAddr {
    "127.0.0.1:8025".parse().expect("valid")
}
fn default_import_entries() -> usize {
    1_000_000
}
fn default_body_bytes() -> usize {
    256 * 1024 * 1024
}

/// `enforce` refuses, `warn` accepts and reports what would have been
/// refused, `off` skips the guard (sender rights still apply).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuardMode {
    #[default]
    Enforce,
    Warn,
    Off,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// `ip` or `ip:port` (default port 53); empty = the system's resolv.conf.
    pub nameservers: Vec<String>,
    /// Per query attempt.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    pub attempts: usize,
    /// Answers are kept at least this long, whatever their TTL.
    #[serde(with = "humantime_serde")]
    pub min_ttl: Duration,
    /// And at most this long.
    #[serde(with = "humantime_serde")]
    pub max_ttl: Duration,
    /// NXDOMAIN / no-data answers without an SOA are kept this long.
    #[serde(with = "humantime_serde")]
    pub negative_ttl: Duration,
    /// After expiry an answer is still served this long while it is
    /// refreshed in the background (and while refreshing fails; RFC 8767).
    #[serde(with = "humantime_serde")]
    pub stale_ttl: Duration,
    /// Bound on cached names (per cache).
    pub cache_entries: usize,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            nameservers: Vec::new(),
            timeout: Duration::from_secs(2),
            attempts: 2,
            min_ttl: Duration::from_secs(30),
            max_ttl: Duration::from_secs(3600),
            negative_ttl: Duration::from_secs(300),
            stale_ttl: Duration::from_secs(3600),
            cache_entries: 100_000,
        }
    }
}

impl DnsConfig {
    /// Parsed `nameservers` (validated in [`Config::validate`]).
    pub fn servers(&self) -> Vec<SocketAddr> {
        self.nameservers.iter().filter_map(|s| parse_nameserver(s)).collect()
    }
}

/// `1.2.3.4`, `1.2.3.4:5353`, `::1`, `[::1]:5353`.
pub fn parse_nameserver(s: &str) -> Option<SocketAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(SocketAddr::new(ip, 53));
    }
    s.parse::<SocketAddr>().ok()
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClassifyConfig {
    /// Operator rules, tried before the built-in ones (same format as
    /// `config/classify.toml`).
    pub rules_file: Option<PathBuf>,
    /// Use only `rules_file`, not the built-in rules.
    pub replace_defaults: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuardConfig {
    /// DNSBL zones the relay's egress IPs are looked up in (e.g. `zen.spamhaus.org`).
    pub dnsbl_ip_zones: Vec<String>,
    /// Domain blocklist zones the sender domain is looked up in (e.g. `dbl.spamhaus.org`).
    pub dnsbl_domain_zones: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainConfig {
    pub name: String,
    /// DKIM selectors that must be published with a usable key.
    #[serde(default)]
    pub dkim_selectors: Vec<String>,
    /// Sign this domain's mail: `{ selector = "s1", key = "keys/d.pem" }`.
    pub dkim_sign: Option<DkimSignConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DkimSignConfig {
    pub selector: String,
    /// PEM private key: RSA (2048 bits or more) or Ed25519 (PKCS#8).
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub username: String,
    /// PHC string from `sendguard hash-password` (argon2id).
    pub password_hash: String,
}

impl Config {
    /// Read, parse and validate a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| err("config", format!("cannot read {}: {e}", path.display())))?;
        let mut cfg = Config::parse(&text)?;
        cfg.base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        cfg.source = Some(path.to_path_buf());
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parse without validation (for tests and `load`).
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let key = e
                .span()
                .map(|s| key_at(text, s.start))
                .unwrap_or_else(|| "config".to_string());
            err(key, e.message().to_string())
        })
    }

    /// Resolve a path from the config relative to the config file.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    /// Check everything that can be checked without binding sockets.
    pub fn validate(&mut self) -> Result<(), ConfigError> {
        self.read_secrets()?;
        validate_hostname(&self.server.hostname).map_err(|m| err("server.hostname", m))?;
        if self.server.io_threads > MAX_IO_THREADS {
            return Err(err(
                "server.io_threads",
                format!("must be at most {MAX_IO_THREADS} (0 = one per CPU)"),
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| err("log.level", format!("not a valid filter: {e}")))?;
        self.validate_limits()?;
        self.validate_tenants()?;
        self.validate_listeners()?;
        self.validate_delivery()?;
        self.validate_guard()?;
        if let Some(a) = &self.admin {
            if a.token.is_empty() {
                return Err(err(
                    "admin.token",
                    "required: a token of at least 16 characters, or admin.token_file",
                ));
            }
            if a.token.len() < 16 {
                return Err(err("admin.token", "must be at least 16 characters"));
            }
            if a.max_import_entries == 0 {
                return Err(err("admin.max_import_entries", "must be at least 1"));
            }
            if a.max_body_bytes < 1024 {
                return Err(err("admin.max_body_bytes", "must be at least 1024"));
            }
        }
        if self.classify.replace_defaults && self.classify.rules_file.is_none() {
            return Err(err("classify.replace_defaults", "needs classify.rules_file"));
        }
        if self.classify.rules_file.is_some() {
            self.classifier()?;
        }
        if let Some(tls) = &self.tls {
            crate::server::tls::load_server_config(&self.resolve(&tls.cert), &self.resolve(&tls.key))
                .map_err(|e| err(e.key, e.message))?;
        }
        self.rate_policy()?;
        self.webhooks.validate(self)?;
        self.trace.validate()?;
        self.cluster.validate()?;
        if self.cluster.enabled() && self.spool.is_none() && self.suppression.path.is_none() {
            return Err(err(
                "cluster.backend",
                "the redis backend needs a local suppression replica: configure [spool] or suppression.path",
            ));
        }
        Ok(())
    }

    /// The provider table: the operator's `shaping.providers_file` (if any)
    /// before the built-in `config/providers.toml`.
    pub fn provider_table(&self) -> Result<crate::rate::providers::ProviderTable, ConfigError> {
        use crate::rate::providers::ProviderTable;
        let s = &self.shaping;
        match &s.providers_file {
            Some(f) => ProviderTable::load(&self.resolve(f), s.replace_default_providers)
                .map_err(|e| err("shaping.providers_file", e.to_string())),
            None if s.replace_default_providers => {
                Err(err("shaping.replace_default_providers", "needs shaping.providers_file"))
            }
            None => Ok(ProviderTable::builtin().clone()),
        }
    }

    /// Everything rate policy needs, validated: the provider table, the
    /// shaping policy (with back-off rules) and the submission budgets.
    pub fn rate_policy(&self) -> Result<RatePolicy, ConfigError> {
        let table = self.provider_table()?;
        let known: HashSet<String> = table.names().map(str::to_string).collect();
        let s = &self.shaping;
        let backoff_text = match &s.backoff_file {
            Some(f) => {
                let p = self.resolve(f);
                Some(
                    std::fs::read_to_string(&p)
                        .map_err(|e| err("shaping.backoff_file", format!("{}: {e}", p.display())))?,
                )
            }
            None if s.replace_default_backoff && s.backoff.is_empty() => {
                return Err(err(
                    "shaping.replace_default_backoff",
                    "needs shaping.backoff_file or [[shaping.backoff]] rules",
                ));
            }
            None => None,
        };
        let shaping = s.compile(&known, backoff_text.as_deref())?;
        let budgets = crate::rate::policy::BudgetPolicy::compile(&self.budget)?;
        let warmups = crate::rate::budget::compile_warmups(&self.warmup)?;
        Ok(RatePolicy {
            providers: std::sync::Arc::new(table),
            shaping: std::sync::Arc::new(shaping),
            budgets,
            warmups,
            breakers: self.breakers.compile()?,
            runaway: self.runaway.compile()?,
        })
    }

    /// Fill `admin.token` and `relay.password` from their `*_file` keys (a
    /// secret mounted as a file, as systemd credentials and Kubernetes
    /// Secrets are). The file's first line, without the line end.
    fn read_secrets(&mut self) -> Result<(), ConfigError> {
        let read = |cfg: &Config, key: &str, path: &Path| -> Result<String, ConfigError> {
            let path = cfg.resolve(path);
            let text =
                std::fs::read_to_string(&path).map_err(|e| err(key, format!("cannot read {}: {e}", path.display())))?;
            let line = text.lines().next().unwrap_or("").trim_end_matches('\r').to_string();
            if line.is_empty() {
                return Err(err(key, format!("{} is empty", path.display())));
            }
            Ok(line)
        };
        // Idempotent: a second validation finds the value it filled in.
        if let Some(path) = self.admin.as_ref().and_then(|a| a.token_file.clone()) {
            let token = read(self, "admin.token_file", &path)?;
            let a = self.admin.as_mut().expect("checked");
            if !a.token.is_empty() && a.token != token {
                return Err(err("admin.token_file", "set admin.token or admin.token_file, not both"));
            }
            a.token = token;
        }
        if let Some(path) = self.relay.as_ref().and_then(|r| r.password_file.clone()) {
            let pw = read(self, "relay.password_file", &path)?;
            let r = self.relay.as_mut().expect("checked");
            if r.password.as_ref().is_some_and(|p| *p != pw) {
                return Err(err(
                    "relay.password_file",
                    "set relay.password or relay.password_file, not both",
                ));
            }
            r.password = Some(pw);
        }
        Ok(())
    }

    fn validate_limits(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let checks: [(&str, bool, &str); 13] = [
            (
                "limits.max_message_bytes",
                l.max_message_bytes >= 1024,
                "must be at least 1024",
            ),
            (
                "limits.max_message_bytes",
                l.max_message_bytes <= MAX_MESSAGE_BYTES,
                "must be at most 1000000000 (the spool's record limit)",
            ),
            ("limits.max_recipients", l.max_recipients >= 1, "must be at least 1"),
            (
                "limits.max_recipients",
                l.max_recipients <= 1000,
                "must be at most 1000 (the relay pipelines a transaction's RCPTs in one write; RFC 2920 §3.1 keeps that within the TCP window)",
            ),
            (
                "limits.max_command_line",
                l.max_command_line >= 512,
                "must be at least 512 (RFC 5321 §4.5.3.1.4)",
            ),
            ("limits.max_connections", l.max_connections >= 1, "must be at least 1"),
            (
                "limits.max_connections_per_ip",
                l.max_connections_per_ip >= 1,
                "must be at least 1",
            ),
            (
                "limits.ipv6_prefix_length",
                (32..=128).contains(&l.ipv6_prefix_length),
                "must be between 32 and 128 (bits of an IPv6 address)",
            ),
            (
                "limits.max_line_length",
                l.max_line_length == 0 || l.max_line_length >= 78,
                "must be 0 (no limit) or at least 78 (RFC 5322 §2.1.1)",
            ),
            (
                "limits.command_timeout",
                !l.command_timeout.is_zero(),
                "must be more than 0",
            ),
            ("limits.data_timeout", !l.data_timeout.is_zero(), "must be more than 0"),
            (
                "limits.tls_handshake_timeout",
                !l.tls_handshake_timeout.is_zero(),
                "must be more than 0",
            ),
            ("limits.max_errors", l.max_errors >= 1, "must be at least 1"),
        ];
        for (key, ok, msg) in checks {
            if !ok {
                return Err(err(key, msg));
            }
        }
        if self.auth.max_failures == 0 {
            return Err(err("auth.max_failures", "must be at least 1"));
        }
        if self.auth.failure_window.is_zero() {
            return Err(err("auth.failure_window", "must be more than 0"));
        }
        Ok(())
    }

    fn validate_delivery(&self) -> Result<(), ConfigError> {
        match (&self.spool, &self.relay) {
            (Some(_), None) => return Err(err("relay", "a [relay] section is required with [spool]")),
            (None, Some(_)) => return Err(err("spool", "a [spool] section is required with [relay]")),
            _ => {}
        }
        if let Some(s) = &self.spool
            && s.commit_delay > Duration::from_millis(100)
        {
            return Err(err(
                "spool.commit_delay",
                "must be at most 100ms (it delays the 250 reply of every message)",
            ));
        }
        if let Some(s) = &self.spool
            && s.compact_after < Duration::from_millis(100)
        {
            return Err(err("spool.compact_after", "must be at least 100ms"));
        }
        if let Some(r) = &self.relay {
            let (host, port) =
                split_host_port(&r.addr).ok_or_else(|| err("relay.addr", format!("{:?} is not host:port", r.addr)))?;
            if host.is_empty() || port == 0 {
                return Err(err("relay.addr", format!("{:?} is not host:port", r.addr)));
            }
            if r.max_connections == 0 {
                return Err(err("relay.max_connections", "must be at least 1"));
            }
            if r.max_messages_per_connection == 0 {
                return Err(err("relay.max_messages_per_connection", "must be at least 1"));
            }
            if r.username.is_some() != r.password.is_some() {
                return Err(err("relay.password", "relay.username and relay.password go together"));
            }
            if r.username.is_some() && r.tls == RelayTls::None {
                return Err(err(
                    "relay.tls",
                    "AUTH to the relay needs tls = \"starttls\" or \"implicit\"",
                ));
            }
            if let Some(ca) = &r.ca_file {
                let p = self.resolve(ca);
                let pem =
                    std::fs::read(&p).map_err(|e| err("relay.ca_file", format!("cannot read {}: {e}", p.display())))?;
                let n = rustls_pemfile::certs(&mut pem.as_slice()).filter(|c| c.is_ok()).count();
                if n == 0 {
                    return Err(err("relay.ca_file", format!("{}: no CERTIFICATE found", p.display())));
                }
            }
            for (k, d) in [
                ("relay.connect_timeout", r.connect_timeout),
                ("relay.command_timeout", r.command_timeout),
                ("relay.data_timeout", r.data_timeout),
                ("relay.idle_timeout", r.idle_timeout),
            ] {
                if d.is_zero() {
                    return Err(err(k, "must be more than 0"));
                }
            }
        }
        let q = &self.queue;
        if q.first_retry.is_zero() {
            return Err(err("queue.first_retry", "must be more than 0"));
        }
        if q.max_retry < q.first_retry {
            return Err(err("queue.max_retry", "must be at least queue.first_retry"));
        }
        if q.max_age.is_zero() {
            return Err(err("queue.max_age", "must be more than 0"));
        }
        Ok(())
    }

    fn validate_guard(&mut self) -> Result<(), ConfigError> {
        let d = &self.dns;
        for (i, ns) in d.nameservers.iter().enumerate() {
            if parse_nameserver(ns).is_none() {
                return Err(err(
                    format!("dns.nameservers[{i}]"),
                    format!("{ns:?} is not an IP address or IP:port"),
                ));
            }
        }
        if d.timeout.is_zero() {
            return Err(err("dns.timeout", "must be more than 0"));
        }
        if d.attempts == 0 {
            return Err(err("dns.attempts", "must be at least 1"));
        }
        if d.max_ttl < d.min_ttl {
            return Err(err("dns.max_ttl", "must not be less than dns.min_ttl"));
        }
        if d.cache_entries < 16 {
            return Err(err("dns.cache_entries", "must be at least 16"));
        }
        for (key, zones) in [
            ("guard.dnsbl_ip_zones", &mut self.guard.dnsbl_ip_zones),
            ("guard.dnsbl_domain_zones", &mut self.guard.dnsbl_domain_zones),
        ] {
            for (i, z) in zones.iter_mut().enumerate() {
                *z = z.trim_end_matches('.').to_ascii_lowercase();
                if !crate::smtp::address::is_domain(z) {
                    return Err(err(format!("{key}[{i}]"), format!("{z:?} is not a DNS zone")));
                }
            }
        }
        let mut names = HashSet::new();
        for (i, dom) in self.domains.iter_mut().enumerate() {
            let k = format!("domains[{i}]");
            dom.name = dom.name.trim_end_matches('.').to_ascii_lowercase();
            if !crate::smtp::address::is_domain(&dom.name) {
                return Err(err(format!("{k}.name"), format!("{:?} is not a domain", dom.name)));
            }
            if !names.insert(dom.name.clone()) {
                return Err(err(
                    format!("{k}.name"),
                    format!("domain {:?} is listed twice", dom.name),
                ));
            }
            for (j, s) in dom.dkim_selectors.iter().enumerate() {
                if !crate::smtp::address::is_domain(s) {
                    return Err(err(
                        format!("{k}.dkim_selectors[{j}]"),
                        format!("{s:?} is not a valid selector"),
                    ));
                }
            }
            if let Some(sign) = &dom.dkim_sign
                && !crate::smtp::address::is_domain(&sign.selector)
            {
                return Err(err(
                    format!("{k}.dkim_sign.selector"),
                    format!("{:?} is not a valid selector", sign.selector),
                ));
            }
        }
        for (i, dom) in self.domains.iter().enumerate() {
            if let Some(sign) = &dom.dkim_sign {
                crate::guard::sign::Signer::load(&dom.name, &sign.selector, &self.resolve(&sign.key))
                    .map_err(|m| err(format!("domains[{i}].dkim_sign.key"), m))?;
            }
        }
        Ok(())
    }

    /// The reply classifier: `classify.rules_file` (if any) before the
    /// built-in rules, or alone with `classify.replace_defaults`.
    pub fn classifier(&self) -> Result<crate::classify::Classifier, ConfigError> {
        let file = self.classify.rules_file.as_ref().map(|f| self.resolve(f));
        crate::classify::Classifier::load(file.as_deref(), self.classify.replace_defaults)
            .map_err(|e| err("classify.rules_file", e.to_string()))
    }

    /// Where the embedded suppression store lives, if on disk.
    pub fn suppression_path(&self) -> Option<PathBuf> {
        match (&self.suppression.path, &self.spool) {
            (Some(p), _) => Some(self.resolve(p)),
            (None, Some(sp)) => Some(self.resolve(&sp.dir).join("suppressions.jsonl")),
            (None, None) => None,
        }
    }

    /// Per-domain settings for `domain` (lower case), if configured.
    pub fn domain(&self, domain: &str) -> Option<&DomainConfig> {
        self.domains.iter().find(|d| d.name == domain)
    }

    fn validate_tenants(&mut self) -> Result<(), ConfigError> {
        let mut names = HashSet::new();
        let mut users = HashSet::new();
        for (i, t) in self.tenants.iter_mut().enumerate() {
            let k = format!("tenants[{i}]");
            if t.name.trim().is_empty() {
                return Err(err(format!("{k}.name"), "must not be empty"));
            }
            if !names.insert(t.name.clone()) {
                return Err(err(
                    format!("{k}.name"),
                    format!("tenant {:?} is defined twice", t.name),
                ));
            }
            for (j, d) in t.sender_domains.iter_mut().enumerate() {
                *d = d.to_ascii_lowercase();
                let bare = d.strip_prefix("*.").unwrap_or(d);
                if !crate::smtp::address::is_domain(bare) {
                    return Err(err(
                        format!("{k}.sender_domains[{j}]"),
                        format!("{d:?} is not a domain"),
                    ));
                }
            }
            for (j, a) in t.sender_addresses.iter_mut().enumerate() {
                let m = crate::smtp::address::parse_mailbox(a)
                    .map_err(|_| err(format!("{k}.sender_addresses[{j}]"), format!("{a:?} is not an address")))?;
                *a = m.normalized();
            }
            for (j, u) in t.users.iter().enumerate() {
                let uk = format!("{k}.users[{j}]");
                if u.username.is_empty() {
                    return Err(err(format!("{uk}.username"), "must not be empty"));
                }
                if !users.insert(u.username.clone()) {
                    return Err(err(
                        format!("{uk}.username"),
                        format!(
                            "user {:?} is defined twice (usernames are unique across tenants)",
                            u.username
                        ),
                    ));
                }
                crate::server::auth::check_phc(&u.password_hash).map_err(|m| err(format!("{uk}.password_hash"), m))?;
            }
        }
        Ok(())
    }

    fn validate_listeners(&mut self) -> Result<(), ConfigError> {
        if self.listeners.is_empty() {
            return Err(err("listeners", "at least one [[listeners]] entry is required"));
        }
        let mut addrs = HashSet::new();
        let tenant_names: HashSet<String> = self.tenants.iter().map(|t| t.name.clone()).collect();
        let has_tls = self.tls.is_some();
        for (i, l) in self.listeners.iter_mut().enumerate() {
            let k = format!("listeners[{i}]");
            if l.addr.port() != 0 && !addrs.insert(l.addr) {
                return Err(err(format!("{k}.addr"), format!("{} is used by two listeners", l.addr)));
            }
            if l.tls != TlsMode::None && !has_tls {
                return Err(err(format!("{k}.tls"), "needs a [tls] section with cert and key"));
            }
            l.networks = l
                .trusted_networks
                .iter()
                .enumerate()
                .map(|(j, n)| {
                    parse_net(n).ok_or_else(|| {
                        err(
                            format!("{k}.trusted_networks[{j}]"),
                            format!("{n:?} is not a CIDR or IP"),
                        )
                    })
                })
                .collect::<Result<_, _>>()?;
            match l.auth {
                AuthMode::Required => {
                    if l.tls == TlsMode::None {
                        return Err(err(
                            format!("{k}.auth"),
                            "auth = \"required\" needs tls = \"starttls\" or \"implicit\": credentials never cross in clear",
                        ));
                    }
                    if l.tenant.is_some() {
                        return Err(err(
                            format!("{k}.tenant"),
                            "only used with auth = \"none\"; authenticated clients act as their user's tenant",
                        ));
                    }
                }
                AuthMode::None => {
                    if l.networks.is_empty() {
                        return Err(err(
                            format!("{k}.trusted_networks"),
                            "required when auth = \"none\" (without it the listener would be an open relay)",
                        ));
                    }
                    match &l.tenant {
                        None => {
                            return Err(err(format!("{k}.tenant"), "required when auth = \"none\""));
                        }
                        Some(t) if !tenant_names.contains(t) => {
                            return Err(err(
                                format!("{k}.tenant"),
                                format!("no [[tenants]] entry is named {t:?}"),
                            ));
                        }
                        Some(_) => {}
                    }
                }
            }
        }
        Ok(())
    }
}

/// Split `host:port` (`[v6]:port` too).
pub fn split_host_port(s: &str) -> Option<(String, u16)> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Some((sa.ip().to_string(), sa.port()));
    }
    let (h, p) = s.rsplit_once(':')?;
    Some((
        h.trim_start_matches('[').trim_end_matches(']').to_string(),
        p.parse().ok()?,
    ))
}

fn parse_net(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<std::net::IpAddr>().ok().map(IpNet::from))
}

fn validate_hostname(h: &str) -> Result<(), String> {
    if crate::smtp::address::is_domain(h) && h.is_ascii() {
        Ok(())
    } else {
        Err(format!("{h:?} is not a host name"))
    }
}

/// Best-effort dotted key path for a byte offset in a TOML document: the
/// enclosing `[table]` / `[[array]]` header plus the key on that line.
fn key_at(text: &str, offset: usize) -> String {
    let mut table = String::new();
    let mut counts: std::collections::HashMap<String, usize> = Default::default();
    let mut key = String::new();
    let mut pos = 0;
    for line in text.split_inclusive('\n') {
        let t = line.trim();
        if pos > offset {
            break;
        }
        if let Some(name) = t.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            let n = counts.entry(name.trim().to_string()).or_insert(0);
            table = format!("{}[{}]", name.trim(), *n);
            *n += 1;
            key.clear();
        } else if let Some(name) = t.strip_prefix('[').and_then(|r| r.split(']').next()) {
            table = name.trim().to_string();
            key.clear();
        } else if let Some(eq) = t.find('=') {
            key = t[..eq].trim().to_string();
        }
        pos += line.len();
    }
    match (table.is_empty(), key.is_empty()) {
        (true, true) => "config".into(),
        (true, false) => key,
        (false, true) => table,
        (false, false) => format!("{table}.{key}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQ$RdescudvJCsgt3ub+b+dWRWJTmaaJObG";

    fn base() -> String {
        format!(
            r#"
[server]
hostname = "sendguard.example"
[[listeners]]
addr = "127.0.0.1:2525"
tls = "none"
auth = "none"
trusted_networks = ["127.0.0.0/8"]
tenant = "acme"
[[tenants]]
name = "acme"
sender_domains = ["Acme.Example", "*.acme.example"]
[[tenants.users]]
username = "app"
password_hash = "{HASH}"
"#
        )
    }

    fn validate(text: &str) -> Result<Config, ConfigError> {
        let mut c = Config::parse(text)?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn base_is_valid_and_normalized() {
        let c = validate(&base()).unwrap();
        assert_eq!(c.tenants[0].sender_domains, vec!["acme.example", "*.acme.example"]);
        assert_eq!(c.listeners[0].networks.len(), 1);
        assert_eq!(c.limits.max_message_bytes, 10 * 1024 * 1024);
    }

    #[test]
    fn errors_name_the_key() {
        let cases: Vec<(String, &str)> = vec![
            (
                base().replace("trusted_networks = [\"127.0.0.0/8\"]", ""),
                "listeners[0].trusted_networks",
            ),
            (
                base().replace("tenant = \"acme\"\n[[tenants]]", "[[tenants]]"),
                "listeners[0].tenant",
            ),
            (
                base().replace("tenant = \"acme\"", "tenant = \"nope\""),
                "listeners[0].tenant",
            ),
            (
                base().replace("\"127.0.0.0/8\"", "\"127.0.0.0/99\""),
                "listeners[0].trusted_networks[0]",
            ),
            (
                base().replace("auth = \"none\"", "auth = \"required\""),
                "listeners[0].auth",
            ),
            (
                base().replace("tls = \"none\"", "tls = \"starttls\""),
                "listeners[0].tls",
            ),
            (base().replace("tls = \"none\"", "tls = \"maybe\""), "listeners[0].tls"),
            (
                base().replace("hostname = \"sendguard.example\"", "hostname = \"bad host\""),
                "server.hostname",
            ),
            (
                base().replace(
                    "hostname = \"sendguard.example\"",
                    "hostname = \"sendguard.example\"\nio_threads = 257",
                ),
                "server.io_threads",
            ),
            (
                base().replace(
                    "hostname = \"sendguard.example\"",
                    "hostname = \"sendguard.example\"\nio_threads = -1",
                ),
                "server.io_threads",
            ),
            (base().replace(HASH, "plaintext"), "tenants[0].users[0].password_hash"),
            (
                base().replace("\"Acme.Example\"", "\"not a domain\""),
                "tenants[0].sender_domains[0]",
            ),
            (
                format!("{}\n[limits]\nmax_recipients = 0\n", base()),
                "limits.max_recipients",
            ),
            (
                format!("{}\n[limits]\nmax_recipients = 1001\n", base()),
                "limits.max_recipients",
            ),
            (
                format!("{}\n[limits]\nmax_command_line = 100\n", base()),
                "limits.max_command_line",
            ),
            (
                format!("{}\n[limits]\nmax_message_bytes = 2147483648\n", base()),
                "limits.max_message_bytes",
            ),
            (
                format!("{}\n[limits]\nipv6_prefix_length = 16\n", base()),
                "limits.ipv6_prefix_length",
            ),
            (
                format!("{}\n[limits]\nipv6_prefix_length = 129\n", base()),
                "limits.ipv6_prefix_length",
            ),
            (
                format!("{}\n[limits]\nmax_line_length = 50\n", base()),
                "limits.max_line_length",
            ),
            (
                format!("{}\n[limits]\ncommand_timeout = \"soon\"\n", base()),
                "limits.command_timeout",
            ),
            (format!("{}\n[limits]\nbogus = 1\n", base()), "limits.bogus"),
            (
                format!(
                    "{}\n[[tenants]]\nname = \"b\"\n[[tenants.users]]\nusername = \"app\"\npassword_hash = \"{HASH}\"\n",
                    base()
                ),
                "tenants[1].users[0].username",
            ),
            (
                base().replace("addr = \"127.0.0.1:2525\"", "addr = \"localhost\""),
                "listeners[0].addr",
            ),
            ("".to_string(), "listeners"),
            (format!("{}\n[spool]\ndir = \"/tmp/x\"\n", base()), "relay"),
            (format!("{}\n[relay]\naddr = \"127.0.0.1:25\"\n", base()), "spool"),
            (
                format!(
                    "{}\n[spool]\ndir = \"/tmp/x\"\ncommit_delay = \"1s\"\n[relay]\naddr = \"h:25\"\ntls = \"none\"\n",
                    base()
                ),
                "spool.commit_delay",
            ),
            (
                format!(
                    "{}\n[spool]\ndir = \"/tmp/x\"\ncompact_after = \"10ms\"\n[relay]\naddr = \"h:25\"\ntls = \"none\"\n",
                    base()
                ),
                "spool.compact_after",
            ),
            (
                format!(
                    "{}\n[spool]\ndir = \"/tmp/x\"\n[relay]\naddr = \"nohostport\"\n",
                    base()
                ),
                "relay.addr",
            ),
            (
                format!(
                    "{}\n[spool]\ndir = \"/tmp/x\"\n[relay]\naddr = \"h:25\"\ntls = \"none\"\nusername = \"u\"\npassword = \"p\"\n",
                    base()
                ),
                "relay.tls",
            ),
            (
                format!(
                    "{}\n[spool]\ndir = \"/tmp/x\"\n[relay]\naddr = \"h:25\"\nusername = \"u\"\n",
                    base()
                ),
                "relay.password",
            ),
            (
                format!(
                    "{}\n[spool]\ndir = \"/tmp/x\"\n[relay]\naddr = \"h:25\"\nca_file = \"/nonexistent.pem\"\n",
                    base()
                ),
                "relay.ca_file",
            ),
            (
                format!("{}\n[queue]\nfirst_retry = \"10m\"\nmax_retry = \"1m\"\n", base()),
                "queue.max_retry",
            ),
            (format!("{}\n[queue]\nmax_age = \"0s\"\n", base()), "queue.max_age"),
        ];
        for (text, key) in cases {
            let e = validate(&text).expect_err(key);
            assert_eq!(e.key, key, "{e}");
        }
    }

    #[test]
    fn secrets_from_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "a-token-from-a-file-0123\n").unwrap();
        std::fs::write(dir.path().join("pw"), "relay secret\r\nignored\n").unwrap();
        std::fs::write(dir.path().join("empty"), "\n").unwrap();
        let load = |extra: &str| {
            let p = dir.path().join("c.toml");
            std::fs::write(&p, format!("{}\n{extra}", base())).unwrap();
            Config::load(&p)
        };
        let relay = "[spool]\ndir = \"s\"\n[relay]\naddr = \"h:25\"\nusername = \"u\"\n";
        let c = load(&format!(
            "{relay}password_file = \"pw\"\n[admin]\ntoken_file = \"token\"\n"
        ))
        .unwrap();
        let mut again = c.clone();
        again.validate().expect("validating twice is fine");
        assert_eq!(c.admin.unwrap().token, "a-token-from-a-file-0123");
        assert_eq!(c.relay.unwrap().password.as_deref(), Some("relay secret"));
        for (extra, key) in [
            ("[admin]\ntoken_file = \"missing\"\n".to_string(), "admin.token_file"),
            ("[admin]\ntoken_file = \"empty\"\n".to_string(), "admin.token_file"),
            (
                "[admin]\ntoken = \"0123456789abcdef\"\ntoken_file = \"token\"\n".to_string(),
                "admin.token_file",
            ),
            ("[admin]\n".to_string(), "admin.token"),
            (
                format!("{relay}password = \"p\"\npassword_file = \"pw\"\n"),
                "relay.password_file",
            ),
        ] {
            let e = load(&extra).unwrap_err();
            assert_eq!(e.key, key, "{extra}: {e}");
            assert!(!e.message.contains("a-token-from"), "{e}");
        }
    }

    #[test]
    fn unknown_top_level_section() {
        let e = validate(&format!("[nope]\nx = 1\n{}", base())).unwrap_err();
        assert!(e.message.contains("unknown field"), "{e}");
    }
}
