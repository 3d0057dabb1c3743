//! UTC calendar arithmetic for the trace: hour buckets named `YYYYMMDDHH`
//! and the milliseconds of an event's RFC 3339 `ts`, without a time zone
//! database (UTC only, proleptic Gregorian calendar; the day conversions
//! are H. Hinnant's `days_from_civil` / `civil_from_days`, from
//! `crate::throttle`).
//!
//! Trust boundary: pure functions. `parse_ts_ms` takes event text (our own
//! serialization, read back from files that may be damaged) and answers
//! `None` for anything that is not exactly `YYYY-MM-DDTHH:MM:SS[.frac]Z`;
//! a stem is accepted only in its canonical form.

use crate::throttle::{civil_from_days, days_from_civil};

/// One hour in milliseconds: the span of one trace file.
pub const HOUR_MS: u64 = 3_600_000;

/// The hour (since the Unix epoch) holding `ms`.
pub fn hour_of(ms: u64) -> u32 {
    u32::try_from(ms / HOUR_MS).unwrap_or(u32::MAX)
}

/// The `YYYYMMDDHH` number of an hour (since the Unix epoch), e.g. 2026112304.
pub fn stem(hour: u32) -> u64 {
    let days = i64::from(hour / 24);
    let (y, m, d) = civil_from_days(days);
    (y as u64) * 1_000_000 + u64::from(m) * 10_000 + u64::from(d) * 100 + u64::from(hour % 24)
}

/// The hour named by a `YYYYMMDDHH` number; `None` unless it is a real
/// date and hour at or after 1970 (and the canonical spelling of it).
pub fn from_stem(n: u64) -> Option<u32> {
    let h = (n % 100) as u32;
    let d = ((n / 100) % 100) as u32;
    let m = ((n / 10_000) % 100) as u32;
    let y = (n / 1_000_000) as i64;
    if !(1970..=9999).contains(&y) || !(1..=12).contains(&m) || !(1..=31).contains(&d) || h > 23 {
        return None;
    }
    let days = days_from_civil(y, m, d);
    // 31 February and the like come back as another date.
    if civil_from_days(days) != (y, m, d) {
        return None;
    }
    u32::try_from(days * 24 + i64::from(h)).ok()
}

/// Milliseconds since the epoch of `2026-11-23T04:23:59.615Z` (any number
/// of fraction digits, or none; only `Z`, the form events are written in).
pub fn parse_ts_ms(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let mut v = 0u32;
        for &c in &b[r] {
            if !c.is_ascii_digit() {
                return None;
            }
            v = v * 10 + u32::from(c - b'0');
        }
        Some(v)
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &b[19..];
    let mut ms = 0u32;
    if let Some(frac) = rest.strip_prefix(b".") {
        let n = frac.iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 {
            return None;
        }
        for (i, &c) in frac[..n].iter().take(3).enumerate() {
            ms += u32::from(c - b'0') * [100, 10, 1][i];
        }
        rest = &frac[n..];
    }
    if rest != b"Z" || y < 1970 || !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let days = days_from_civil(i64::from(y), mo, d);
    let secs = days * 86_400 + i64::from(h * 3600 + mi * 60 + sec);
    u64::try_from(secs).ok().map(|s| s * 1000 + u64::from(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> u64 {
        let t = humantime::parse_rfc3339(s).unwrap();
        t.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
    }

    #[test]
    fn stems_roundtrip_and_agree_with_humantime() {
        for s in [
            "1970-01-01T00:00:00Z",
            "2000-02-29T23:00:00Z",
            "2024-12-31T23:59:59Z",
            "2026-11-23T04:23:59Z",
            "2100-03-01T12:00:00Z",
        ] {
            let hour = hour_of(ms(s));
            let want: u64 = s[..13].replace(['-', 'T'], "").parse().unwrap();
            assert_eq!(stem(hour), want, "{s}");
            assert_eq!(from_stem(want), Some(hour), "{s}");
        }
    }

    #[test]
    fn stems_that_are_not_hours() {
        for n in [
            2026022900,
            2026023012,
            2026111324 + 1,
            2026130101,
            1969123123,
            2026110000,
            0,
            99,
        ] {
            assert_eq!(from_stem(n), None, "{n}");
        }
        assert!(from_stem(2024022900).is_some());
    }

    #[test]
    fn timestamps() {
        let cases = [
            ("2026-11-23T04:23:59.615Z", Some(ms("2026-11-23T04:23:59.615Z"))),
            ("2026-11-23T04:23:59Z", Some(ms("2026-11-23T04:23:59Z"))),
            ("2026-11-23T04:23:59.6Z", Some(ms("2026-11-23T04:23:59.600Z"))),
            ("2026-11-23T04:23:59.615999Z", Some(ms("2026-11-23T04:23:59.615Z"))),
            ("1970-01-01T00:00:00.000Z", Some(0)),
            ("2026-11-23T04:23:59.615+01:00", None),
            ("2026-11-23 04:23:59.615Z", None),
            ("2026-11-23T04:23:59.Z", None),
            ("2026-13-23T04:23:59Z", None),
            ("1969-12-31T23:59:59Z", None),
            ("", None),
            ("2026-11-23T04:2x:59Z", None),
        ];
        for (s, want) in cases {
            assert_eq!(parse_ts_ms(s), want, "{s}");
        }
    }

    #[test]
    fn hour_boundaries() {
        let h = hour_of(ms("2026-11-23T10:59:59.999Z"));
        assert_eq!(stem(h), 2026112310);
        assert_eq!(stem(hour_of(ms("2026-11-23T11:00:00.000Z"))), 2026112311);
        assert_eq!(stem(hour_of(ms("2026-11-23T23:59:59.999Z")) + 1), 2026112400);
    }
}
