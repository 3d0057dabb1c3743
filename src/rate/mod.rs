//! Rate policy: provider grouping, delivery shaping, submission budgets,
//! adaptive back-off.
//!
//! Trust boundary: pure decisions over a clock and inputs (see
//! `crate::throttle`); the only I/O is the MX lookup behind
//! [`providers::Providers`], through the guard's cached resolver.

pub mod breaker;
pub mod budget;
pub mod budget_fleet;
pub mod fleet;
pub mod policy;
pub mod providers;
pub mod runaway;
pub mod shaper;

use std::time::{Duration, UNIX_EPOCH};

use crate::throttle::{NS_PER_SEC, Nanos};

/// Longest key (tenant, credential, domain, address) shown in a reply, in characters.
pub(crate) const MAX_KEY_SHOWN: usize = 100;

/// `"key"`, at most 100 characters, printable ASCII only (others become `?`,
/// `"` and `\` are escaped). Shared by every refusal of rate policy.
pub(crate) fn quote_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len().min(MAX_KEY_SHOWN) + 5);
    out.push('"');
    for (i, c) in key.chars().enumerate() {
        if i == MAX_KEY_SHOWN {
            out.push_str("...");
            break;
        }
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => out.push('?'),
        }
    }
    out.push('"');
    out
}

/// Printable ASCII only, at most `max` characters.
pub(crate) fn clean_text(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max) + 3);
    for (i, c) in s.chars().enumerate() {
        if i == max {
            out.push_str("...");
            break;
        }
        out.push(if (' '..='~').contains(&c) { c } else { '?' });
    }
    out
}

/// `YYYY-MM-DDTHH:MM:SSZ`, rounded up to the whole second.
pub(crate) fn format_time(at: Nanos) -> String {
    let secs = at.div_ceil(NS_PER_SEC);
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}
