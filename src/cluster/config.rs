//! `[cluster]`: embedded (one node, the default) or a fleet sharing state
//! through Redis.
//!
//! Trust boundary: the config file is trusted; it is checked for mistakes
//! (errors name the key, e.g. `cluster.url`), not for malice.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config::ConfigError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// State lives in this process (suppression on local disk).
    #[default]
    Embedded,
    /// State is shared through one Redis primary.
    Redis,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    pub backend: Backend,
    /// `redis://[user[:password]@]host[:port][/db]` or `rediss://...` (TLS,
    /// certificate verified against the system roots or `ca_file`).
    pub url: Option<String>,
    /// File holding the Redis password (first line); overrides one in `url`.
    pub password_file: Option<PathBuf>,
    /// PEM CA bundle for `rediss://` when the server's certificate is not
    /// signed by a public CA.
    pub ca_file: Option<PathBuf>,
    /// This node's name in the fleet. Default: the host name.
    pub node_id: Option<String>,
    /// Prefix of every Redis key and channel, so fleets can share a Redis.
    pub key_prefix: String,
    /// Connect timeout, and how long one command may take before the node
    /// counts Redis as unavailable and falls back.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            backend: Backend::Embedded,
            url: None,
            password_file: None,
            ca_file: None,
            node_id: None,
            key_prefix: "sendguard".into(),
            timeout: Duration::from_secs(1),
        }
    }
}

fn err(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        message: message.into(),
    }
}

/// Letters, digits and `-_.:`, 1 to 64 characters.
fn is_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

impl ClusterConfig {
    pub fn enabled(&self) -> bool {
        self.backend == Backend::Redis
    }

    /// Check every key; errors name it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !is_name(&self.key_prefix) {
            return Err(err(
                "cluster.key_prefix",
                "must be 1 to 64 letters, digits or -_.: characters",
            ));
        }
        if let Some(n) = &self.node_id
            && !is_name(n)
        {
            return Err(err(
                "cluster.node_id",
                "must be 1 to 64 letters, digits or -_.: characters",
            ));
        }
        if !(Duration::from_millis(10)..=Duration::from_secs(30)).contains(&self.timeout) {
            return Err(err("cluster.timeout", "must be between 10ms and 30s"));
        }
        match self.backend {
            Backend::Embedded => {
                for (set, key) in [
                    (self.url.is_some(), "cluster.url"),
                    (self.password_file.is_some(), "cluster.password_file"),
                    (self.ca_file.is_some(), "cluster.ca_file"),
                ] {
                    if set {
                        return Err(err(key, "only applies with cluster.backend = \"redis\""));
                    }
                }
            }
            Backend::Redis => {
                let Some(url) = &self.url else {
                    return Err(err(
                        "cluster.url",
                        "required with backend = \"redis\" (redis://host:port)",
                    ));
                };
                let tls = if url.starts_with("rediss://") {
                    true
                } else if url.starts_with("redis://") {
                    false
                } else {
                    return Err(err("cluster.url", "must start with redis:// or rediss://"));
                };
                if let Err(e) = redis::Client::open(url.as_str()) {
                    // The URL itself is not quoted: it may hold a password.
                    return Err(err("cluster.url", format!("not a valid Redis URL: {}", e.category())));
                }
                if url.contains('#') {
                    // redis-rs reads "#insecure" as: do not verify the certificate.
                    return Err(err(
                        "cluster.url",
                        "must not have a #fragment (certificate verification cannot be turned off)",
                    ));
                }
                if self.ca_file.is_some() && !tls {
                    return Err(err("cluster.ca_file", "only applies to a rediss:// (TLS) url"));
                }
            }
        }
        Ok(())
    }

    /// The node id in force: `node_id`, else the host name.
    pub fn node_name(&self) -> String {
        if let Some(n) = &self.node_id {
            return n.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| is_name(h));
        host.unwrap_or_else(|| format!("node-{}", std::process::id()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> ClusterConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn keys_are_checked_and_named() {
        assert!(parse("").validate().is_ok());
        assert!(!parse("").enabled());
        let ok = parse("backend = \"redis\"\nurl = \"redis://127.0.0.1:6379/2\"\nnode_id = \"a-1\"");
        assert!(ok.validate().is_ok());
        assert!(ok.enabled());
        assert_eq!(ok.node_name(), "a-1");
        for (text, key) in [
            ("backend = \"redis\"", "cluster.url"),
            ("backend = \"redis\"\nurl = \"http://x\"", "cluster.url"),
            ("backend = \"redis\"\nurl = \"redis://:secret@[::1\"", "cluster.url"),
            ("url = \"redis://x\"", "cluster.url"),
            (
                "backend = \"redis\"\nurl = \"redis://x\"\nca_file = \"ca.pem\"",
                "cluster.ca_file",
            ),
            (
                "backend = \"redis\"\nurl = \"rediss://x:6380/#insecure\"",
                "cluster.url",
            ),
            ("key_prefix = \"a b\"", "cluster.key_prefix"),
            ("node_id = \"\"", "cluster.node_id"),
            ("timeout = \"1ms\"", "cluster.timeout"),
        ] {
            let e = parse(text).validate().unwrap_err();
            assert_eq!(e.key, key, "{text}");
            assert!(!e.message.contains("secret"), "{e:?}");
        }
        assert!(toml::from_str::<ClusterConfig>("backend = \"etcd\"").is_err());
        assert!(toml::from_str::<ClusterConfig>("urls = []").is_err());
    }
}
