//! `[trace]`: where the message trace lives and how long it is kept.
//!
//! Trust boundary: the config file is trusted; it is checked for mistakes
//! (errors name the key, e.g. `trace.retention`), not for malice.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config::{Config, ConfigError};

/// Shortest and longest `trace.retention`.
pub const MIN_RETENTION: Duration = Duration::from_secs(3600);
pub const MAX_RETENTION: Duration = Duration::from_secs(366 * 86_400);

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TraceConfig {
    /// Directory of the trace files. Default: `<spool.dir>/trace`.
    pub dir: Option<PathBuf>,
    /// How long events are kept (whole hour files are deleted after it).
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// Keep a trace at all.
    pub enabled: bool,
}

impl Default for TraceConfig {
    fn default() -> Self {
        TraceConfig {
            dir: None,
            retention: Duration::from_secs(7 * 86_400),
            enabled: true,
        }
    }
}

impl TraceConfig {
    /// Check every key; errors name it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(MIN_RETENTION..=MAX_RETENTION).contains(&self.retention) {
            return Err(ConfigError {
                key: "trace.retention".into(),
                message: format!(
                    "must be between 1h and 366d, not {}",
                    humantime::format_duration(self.retention)
                ),
            });
        }
        Ok(())
    }

    /// The trace directory: `dir`, else `<spool.dir>/trace` (resolved
    /// against the config file's directory); `None` when disabled or when
    /// there is neither (no trace is kept then).
    pub fn trace_dir(&self, cfg: &Config) -> Option<PathBuf> {
        if !self.enabled {
            return None;
        }
        match (&self.dir, &cfg.spool) {
            (Some(d), _) => Some(cfg.resolve(d)),
            (None, Some(s)) => Some(cfg.resolve(&s.dir).join("trace")),
            (None, None) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<TraceConfig, toml::de::Error> {
        toml::from_str(text)
    }

    #[test]
    fn defaults_and_keys() {
        let c = parse("").unwrap();
        assert_eq!(c, TraceConfig::default());
        assert_eq!(c.retention, Duration::from_secs(7 * 86_400));
        assert!(c.enabled);
        c.validate().unwrap();
        let c = parse("dir = \"/var/trace\"\nretention = \"36h\"\nenabled = false\n").unwrap();
        assert_eq!(c.dir.as_deref(), Some(std::path::Path::new("/var/trace")));
        assert_eq!(c.retention, Duration::from_secs(36 * 3600));
        assert!(!c.enabled);
        assert!(parse("retension = \"1d\"").is_err());
    }

    #[test]
    fn retention_bounds() {
        for (r, ok) in [
            ("59m", false),
            ("1h", true),
            ("366d", true),
            ("367d", false),
            ("0s", false),
        ] {
            let c = parse(&format!("retention = \"{r}\"")).unwrap();
            match c.validate() {
                Ok(()) => assert!(ok, "{r}"),
                Err(e) => {
                    assert!(!ok, "{r}");
                    assert_eq!(e.key, "trace.retention");
                }
            }
        }
    }
}
