//! `[webhooks]` and `[[webhooks.endpoint]]`: the typed config and its
//! validation (errors name the key, e.g. `webhooks.endpoint[0].url`).
//!
//! Trust boundary: the config file is trusted; it is checked for mistakes,
//! not for malice. Secret files are read here only to check them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::filter;
use super::sign::Secret;
use super::url::Target;
use crate::config::{Config, ConfigError};

/// `[webhooks]`: where outboxes live, and the endpoints.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhooksConfig {
    /// Directory of the durable outboxes (one subdirectory per endpoint).
    /// Default: `<spool.dir>/webhooks`.
    pub dir: Option<PathBuf>,
    #[serde(default)]
    pub endpoint: Vec<EndpointConfig>,
}

/// `[[webhooks.endpoint]]` (its `Debug` leaves the secret out)
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// Unique name: outbox directory, metrics label, API key.
    pub name: String,
    /// `http://` or `https://` URL events are POSTed to.
    pub url: String,
    /// Signing secret (`whsec_` + base64, or any string used as raw bytes).
    pub secret: Option<String>,
    /// File holding the secret instead of `secret`.
    pub secret_file: Option<PathBuf>,
    /// Event types sent (`bounced`, `refused`, ...); empty: all.
    #[serde(default)]
    pub events: Vec<String>,
    /// Only events of these tenants; empty: all (including events without a tenant).
    #[serde(default)]
    pub tenants: Vec<String>,
    /// Time allowed for one POST, connect to response.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// First retry delay after a failed POST; doubles up to `max_retry`.
    #[serde(default = "default_first_retry", with = "humantime_serde")]
    pub first_retry: Duration,
    #[serde(default = "default_max_retry", with = "humantime_serde")]
    pub max_retry: Duration,
    /// Events older than this are dropped from the outbox (logged, counted).
    #[serde(default = "default_max_age", with = "humantime_serde")]
    pub max_age: Duration,
    /// POSTs in flight at once (each on its own connection); 1 keeps the
    /// events log's order.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Most bytes of unacknowledged events the outbox keeps; beyond it new
    /// events are dropped (logged, counted) so that a receiver down for
    /// long cannot fill the disk the spool shares. Default 1 GiB.
    #[serde(default = "default_max_backlog_bytes")]
    pub max_backlog_bytes: u64,
    /// Extra CA certificates (PEM) for an `https` receiver.
    pub ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for EndpointConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointConfig")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("secret_file", &self.secret_file)
            .field("events", &self.events)
            .field("tenants", &self.tenants)
            .field("timeout", &self.timeout)
            .field("first_retry", &self.first_retry)
            .field("max_retry", &self.max_retry)
            .field("max_age", &self.max_age)
            .field("concurrency", &self.concurrency)
            .field("max_backlog_bytes", &self.max_backlog_bytes)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_first_retry() -> Duration {
    Duration::from_secs(5)
}
fn default_max_retry() -> Duration {
    Duration::from_secs(300)
}
fn default_concurrency() -> usize {
    4
}

fn default_max_backlog_bytes() -> u64 {
    1 << 30
}

fn default_max_age() -> Duration {
    Duration::from_secs(3 * 86400)
}

fn err(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        message: message.into(),
    }
}

impl WebhooksConfig {
    /// The outbox directory: `dir`, else `<spool.dir>/webhooks` (resolved
    /// against the config file's directory).
    pub fn outbox_dir(&self, cfg: &Config) -> Option<PathBuf> {
        match (&self.dir, &cfg.spool) {
            (Some(d), _) => Some(cfg.resolve(d)),
            (None, Some(s)) => Some(cfg.resolve(&s.dir).join("webhooks")),
            (None, None) => None,
        }
    }

    /// Check every key; errors name it (`webhooks.endpoint[0].url`).
    pub fn validate(&self, cfg: &Config) -> Result<(), ConfigError> {
        if self.endpoint.is_empty() {
            return Ok(());
        }
        if self.outbox_dir(cfg).is_none() {
            return Err(err(
                "webhooks.dir",
                "webhook endpoints need a durable outbox: set webhooks.dir (or spool.dir)",
            ));
        }
        for (i, e) in self.endpoint.iter().enumerate() {
            let key = |k: &str| format!("webhooks.endpoint[{i}].{k}");
            if e.name.is_empty()
                || e.name.starts_with('.')
                || !e.name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                return Err(err(
                    key("name"),
                    format!("{:?}: use letters, digits, '-', '_' and '.' (not first)", e.name),
                ));
            }
            if self.endpoint[..i].iter().any(|o| o.name == e.name) {
                return Err(err(key("name"), format!("{:?} is used by two endpoints", e.name)));
            }
            Target::parse(&e.url).map_err(|m| err(key("url"), m))?;
            e.load_secret(cfg).map_err(|(k, m)| err(key(k), m))?;
            for name in &e.events {
                filter::kind(name).map_err(|m| err(key("events"), m))?;
            }
            for t in &e.tenants {
                if !cfg.tenants.iter().any(|c| &c.name == t) {
                    return Err(err(key("tenants"), format!("{t:?} is not a configured tenant")));
                }
            }
            for (k, d) in [
                ("timeout", e.timeout),
                ("first_retry", e.first_retry),
                ("max_retry", e.max_retry),
                ("max_age", e.max_age),
            ] {
                if d.is_zero() {
                    return Err(err(key(k), "must be more than 0"));
                }
            }
            if e.first_retry > e.max_retry {
                return Err(err(key("first_retry"), "must not be more than max_retry"));
            }
            if !(1..=64).contains(&e.concurrency) {
                return Err(err(key("concurrency"), "must be from 1 to 64"));
            }
            if e.max_backlog_bytes < 1 << 20 {
                return Err(err(key("max_backlog_bytes"), "must be at least 1048576 (1 MiB)"));
            }
            if let Some(ca) = &e.ca_file {
                let p = cfg.resolve(ca);
                let pem =
                    std::fs::read(&p).map_err(|x| err(key("ca_file"), format!("cannot read {}: {x}", p.display())))?;
                if rustls_pemfile::certs(&mut pem.as_slice()).filter(|c| c.is_ok()).count() == 0 {
                    return Err(err(key("ca_file"), format!("{}: no CERTIFICATE found", p.display())));
                }
            }
        }
        Ok(())
    }
}

impl EndpointConfig {
    /// The signing key from `secret` or `secret_file` (`None`: events are
    /// sent unsigned). Errors name the sub-key.
    pub fn load_secret(&self, cfg: &Config) -> Result<Option<Secret>, (&'static str, String)> {
        match (&self.secret, &self.secret_file) {
            (Some(_), Some(_)) => Err(("secret_file", "set secret or secret_file, not both".into())),
            (Some(s), None) => Secret::parse(s).map(Some).map_err(|m| ("secret", m)),
            (None, Some(f)) => {
                let p = cfg.resolve(f);
                let text = read_secret(&p).map_err(|m| ("secret_file", m))?;
                Secret::parse(&text)
                    .map(Some)
                    .map_err(|m| ("secret_file", format!("{}: {m}", p.display())))
            }
            (None, None) => Ok(None),
        }
    }
}

fn read_secret(p: &Path) -> Result<String, String> {
    std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(extra: &str) -> String {
        format!(
            "[server]\nhostname = \"h.example\"\n[[listeners]]\naddr = \"127.0.0.1:0\"\ntls = \"none\"\nauth = \"none\"\ntrusted_networks = [\"127.0.0.0/8\"]\ntenant = \"acme\"\n[[tenants]]\nname = \"acme\"\nsender_domains = [\"acme.example\"]\nguard = \"off\"\n{extra}"
        )
    }

    fn check(extra: &str) -> Result<Config, ConfigError> {
        let mut c = Config::parse(&base(extra))?;
        c.validate()?;
        Ok(c)
    }

    const EP: &str = "[[webhooks.endpoint]]\nname = \"ops\"\nurl = \"https://hooks.example/x\"\n";

    #[test]
    fn defaults_and_dir() {
        let c = check(&format!(
            "[spool]\ndir = \"/var/spool/sg\"\n[relay]\naddr = \"h:25\"\n{EP}"
        ))
        .unwrap();
        let e = &c.webhooks.endpoint[0];
        assert_eq!(e.timeout, Duration::from_secs(10));
        assert_eq!(e.first_retry, Duration::from_secs(5));
        assert_eq!(e.max_retry, Duration::from_secs(300));
        assert_eq!(e.max_age, Duration::from_secs(3 * 86400));
        assert_eq!(c.webhooks.outbox_dir(&c), Some(PathBuf::from("/var/spool/sg/webhooks")));
        let c = check(&format!("[webhooks]\ndir = \"/x/hooks\"\n{EP}")).unwrap();
        assert_eq!(c.webhooks.outbox_dir(&c), Some(PathBuf::from("/x/hooks")));
        // no endpoints: nothing needed
        check("").unwrap();
    }

    #[test]
    fn errors_name_the_key() {
        let dir = "[webhooks]\ndir = \"/x\"\n";
        let table: &[(String, &str)] = &[
            (EP.to_string(), "webhooks.dir"),
            (
                format!("{dir}{}", EP.replace("https://hooks.example/x", "ftp://h/")),
                "webhooks.endpoint[0].url",
            ),
            (
                format!("{dir}{}", EP.replace("ops", "a/b")),
                "webhooks.endpoint[0].name",
            ),
            (format!("{dir}{}", EP.replace("ops", "..")), "webhooks.endpoint[0].name"),
            (
                format!("{dir}{EP}{}", EP.replace("/x", "/y")),
                "webhooks.endpoint[1].name",
            ),
            (
                format!("{dir}{EP}events = [\"delivered\", \"bounce\"]\n"),
                "webhooks.endpoint[0].events",
            ),
            (
                format!("{dir}{EP}tenants = [\"nobody\"]\n"),
                "webhooks.endpoint[0].tenants",
            ),
            (
                format!("{dir}{EP}secret = \"whsec_!!\"\n"),
                "webhooks.endpoint[0].secret",
            ),
            (
                format!("{dir}{EP}secret = \"a\"\nsecret_file = \"/s\"\n"),
                "webhooks.endpoint[0].secret_file",
            ),
            (
                format!("{dir}{EP}secret_file = \"/nonexistent/secret\"\n"),
                "webhooks.endpoint[0].secret_file",
            ),
            (format!("{dir}{EP}timeout = \"0s\"\n"), "webhooks.endpoint[0].timeout"),
            (
                format!("{dir}{EP}first_retry = \"10m\"\nmax_retry = \"1m\"\n"),
                "webhooks.endpoint[0].first_retry",
            ),
            (
                format!("{dir}{EP}ca_file = \"/nonexistent.pem\"\n"),
                "webhooks.endpoint[0].ca_file",
            ),
        ];
        for (extra, key) in table {
            match check(extra) {
                Ok(_) => panic!("accepted: {extra}"),
                Err(e) => assert_eq!(e.key, *key, "{extra}: {}", e.message),
            }
        }
        let ok = format!(
            "{dir}{EP}events = [\"bounced\", \"complaint\"]\ntenants = [\"acme\"]\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n"
        );
        let c = check(&ok).unwrap();
        let debug = format!("{:?}", c.webhooks);
        assert!(!debug.contains("MfKQ9r8G") && debug.contains("<redacted>"), "{debug}");
    }

    #[test]
    fn secret_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s");
        std::fs::write(&p, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n").unwrap();
        let c = check(&format!(
            "[webhooks]\ndir = \"/x\"\n{EP}secret_file = \"{}\"\n",
            p.display()
        ))
        .unwrap();
        let s = c.webhooks.endpoint[0].load_secret(&c).unwrap().unwrap();
        assert_eq!(
            s.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, br#"{"test": 2432232314}"#),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }
}
