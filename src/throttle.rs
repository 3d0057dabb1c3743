//! Rate arithmetic with an injected clock: rates (`300/min`), the generic
//! cell rate algorithm (GCRA), rolling-window counters and per-day counters.
//! Everything here is a pure value: callers pass `now` (nanoseconds since
//! the Unix epoch) and get decisions back, so limiters, ramps and breakers
//! are tested without sleeping.
//!
//! Why not the `governor` crate: shaping needs to *ask* several limiters
//! whether a message may pass and then charge all of them or none (a
//! provider's rate, a sender domain's rate at that provider, the relay's
//! cap), preflight must answer without consuming, and adaptive back-off
//! changes a limiter's rate while it runs. governor's `check` always
//! consumes and its quota is fixed at construction. A GCRA is one number
//! per key (the theoretical arrival time), which is also what a Redis Lua
//! GCRA keeps for the fleet.
//!
//! Trust boundary: no I/O; inputs come from validated config.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Nanoseconds since the Unix epoch.
pub type Nanos = u64;

pub const NS_PER_MS: u64 = 1_000_000;
pub const NS_PER_SEC: u64 = 1_000_000_000;
pub const NS_PER_DAY: u64 = 86_400 * NS_PER_SEC;

/// The clock limiters, breakers, budgets and the retry schedule read: the
/// wall clock as [`Nanos`], except that it never runs backwards (see
/// [`StepSafe`]). A GCRA keeps a time, not a count: read from a clock that
/// stepped back an hour, every limiter would refuse for that hour.
pub fn now_ns() -> Nanos {
    static CLOCK: std::sync::LazyLock<StepSafe> = std::sync::LazyLock::new(StepSafe::new);
    CLOCK.now()
}

/// The wall clock, kept from stepping backwards with the monotonic clock.
///
/// It reads `offset + monotonic`, where `offset` is the largest
/// `wall - monotonic` seen so far. While the wall clock runs normally
/// (including NTP slewing, which moves both clocks alike) that is the wall
/// clock. When the wall clock steps forward it follows at once; when it
/// steps back, this clock keeps counting forward from where it was, ahead
/// of the wall clock by the step, until the process restarts. Rates stay
/// rates either way; only day boundaries (per-day budgets) shift by the
/// step. Timestamps in events and logs are the wall clock's own.
pub struct StepSafe {
    start: std::time::Instant,
    offset: std::sync::atomic::AtomicU64,
}

impl StepSafe {
    pub fn new() -> StepSafe {
        StepSafe {
            start: std::time::Instant::now(),
            offset: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub fn now(&self) -> Nanos {
        let mono = self.start.elapsed().as_nanos() as u64;
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        self.at(wall, mono)
    }

    /// The reading for a wall clock reading and nanoseconds of monotonic
    /// time since `start` (separate from [`StepSafe::now`] for tests).
    pub fn at(&self, wall: Nanos, mono: u64) -> Nanos {
        use std::sync::atomic::Ordering::Relaxed;
        let want = wall.saturating_sub(mono);
        let mut offset = self.offset.load(Relaxed);
        if want > offset {
            offset = self.offset.fetch_max(want, Relaxed).max(want);
        }
        offset.saturating_add(mono)
    }
}

impl Default for StepSafe {
    fn default() -> Self {
        StepSafe::new()
    }
}

/// `count` events per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

impl Rate {
    /// The time between two events at this rate, in nanoseconds (at least 1).
    pub fn interval_ns(&self) -> u64 {
        (self.per.as_nanos() / u128::from(self.count.max(1))).max(1) as u64
    }

    /// Events per second, for display.
    pub fn per_second(&self) -> f64 {
        f64::from(self.count) / self.per.as_secs_f64()
    }
}

impl FromStr for Rate {
    type Err = String;

    /// `N/s`, `N/min`, `N/h`, `N/day` (also `second`, `minute`, `hour`,
    /// `d`, `m`) or `N/<duration>` such as `100/10m`.
    fn from_str(s: &str) -> Result<Rate, String> {
        let (n, per) = s
            .split_once('/')
            .ok_or_else(|| format!("expected a rate like \"300/min\", got {s:?}"))?;
        let count: u32 = n
            .trim()
            .parse()
            .map_err(|_| format!("{s:?}: {n:?} is not a whole number"))?;
        if count == 0 {
            return Err(format!("{s:?}: the count must be at least 1"));
        }
        let per = match per.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            "d" | "day" => Duration::from_secs(86_400),
            other => humantime::parse_duration(other)
                .map_err(|_| format!("{s:?}: unknown period {other:?} (use s, min, h, day or a duration like 10m)"))?,
        };
        if per.is_zero() || per > Duration::from_secs(366 * 86_400) {
            return Err(format!(
                "{s:?}: the period must be longer than zero and at most 366 days"
            ));
        }
        Ok(Rate { count, per })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per.as_secs() {
            1 if self.per.subsec_nanos() == 0 => "s".to_string(),
            60 if self.per.subsec_nanos() == 0 => "min".to_string(),
            3600 if self.per.subsec_nanos() == 0 => "h".to_string(),
            86_400 if self.per.subsec_nanos() == 0 => "day".to_string(),
            _ => humantime::format_duration(self.per).to_string(),
        };
        write!(f, "{}/{unit}", self.count)
    }
}

impl<'de> serde::Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Rate, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for Rate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A rate with a burst: at most `burst` events back to back, then one per
/// interval. A budget ("500 per hour") is a limit whose burst is its count;
/// shaping uses a small burst so a provider sees a steady stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub rate: Rate,
    pub burst: u32,
}

impl Limit {
    pub fn new(rate: Rate, burst: u32) -> Limit {
        Limit {
            rate,
            burst: burst.max(1),
        }
    }

    /// A budget: `count` per period, all of it usable at once.
    pub fn budget(rate: Rate) -> Limit {
        Limit::new(rate, rate.count)
    }

    /// This limit with its burst cut to a `share` of it (0 < share < 1; at
    /// least 1): a node running a fleet's limit at its fair share slows the
    /// rate with the GCRA's factor, but the burst is events at once, which
    /// a factor does not shrink, so N nodes would burst N times over.
    pub fn burst_at_share(&self, share: f64) -> Limit {
        Limit::new(self.rate, at_share(self.burst, share))
    }
}

/// `n` at a `share` of it, rounded up, at least 1; `n` itself unless
/// 0 < share < 1.
pub fn at_share(n: u32, share: f64) -> u32 {
    if share >= 1.0 || share <= 0.0 || share.is_nan() {
        return n;
    }
    ((f64::from(n) * share).ceil() as u32).max(1)
}

/// The answer of a limiter that said no.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// Try again in this many nanoseconds.
    Wait(u64),
    /// More events than the burst at once: never.
    Never,
}

/// GCRA state: the theoretical arrival time of the next event.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gcra {
    pub tat: Nanos,
}

impl Gcra {
    /// Would `n` events pass now at `limit` slowed to `factor` (0 < factor ≤ 1)?
    pub fn check(&self, now: Nanos, limit: &Limit, factor: f64, n: u32) -> Result<(), Denied> {
        self.next(now, limit, factor, n).map(|_| ())
    }

    /// Charge `n` events if they pass (all or nothing).
    pub fn take(&mut self, now: Nanos, limit: &Limit, factor: f64, n: u32) -> Result<(), Denied> {
        self.tat = self.next(now, limit, factor, n)?;
        Ok(())
    }

    /// Charge `n` events even over the limit (the caller already decided;
    /// later events wait longer).
    pub fn charge(&mut self, now: Nanos, limit: &Limit, factor: f64, n: u32) {
        let t = interval(limit, factor);
        self.tat = self.tat.max(now).saturating_add(t.saturating_mul(u64::from(n)));
    }

    /// Forget debt beyond what `limit` could charge (after a rate change):
    /// the next event waits at most one interval.
    pub fn clamp(&mut self, now: Nanos, limit: &Limit, factor: f64) {
        let max = now.saturating_add(interval(limit, factor).saturating_mul(u64::from(limit.burst)));
        self.tat = self.tat.min(max);
    }

    /// Events still available now without waiting.
    pub fn remaining(&self, now: Nanos, limit: &Limit, factor: f64) -> u32 {
        let t = interval(limit, factor);
        let used = self.tat.saturating_sub(now).div_ceil(t);
        u64::from(limit.burst).saturating_sub(used) as u32
    }

    /// The state carries no information any more (the limiter is full
    /// again): it can be dropped from a keyed map.
    pub fn is_idle(&self, now: Nanos) -> bool {
        self.tat <= now
    }

    fn next(&self, now: Nanos, limit: &Limit, factor: f64, n: u32) -> Result<Nanos, Denied> {
        if n > limit.burst {
            return Err(Denied::Never);
        }
        let t = interval(limit, factor);
        let tat = self.tat.max(now);
        let new_tat = tat.saturating_add(t.saturating_mul(u64::from(n)));
        // Allowed when new_tat - now <= burst · T (RFC-style "tau + T").
        let allow_at = new_tat.saturating_sub(t.saturating_mul(u64::from(limit.burst)));
        if allow_at <= now {
            Ok(new_tat)
        } else {
            Err(Denied::Wait(allow_at - now))
        }
    }
}

fn interval(limit: &Limit, factor: f64) -> u64 {
    let t = limit.rate.interval_ns();
    if factor >= 1.0 || factor <= 0.0 || factor.is_nan() {
        t
    } else {
        ((t as f64) / factor).min(u64::MAX as f64 / 2.0) as u64
    }
}

/// Counts of `N` kinds of events over a rolling window, kept in `slots`
/// buckets (the window slides one bucket at a time).
#[derive(Debug, Clone)]
pub struct Rolling<const N: usize> {
    bucket_ns: u64,
    /// (bucket number, counts), oldest first.
    buckets: std::collections::VecDeque<(u64, [u64; N])>,
    slots: usize,
}

impl<const N: usize> Rolling<N> {
    pub fn new(window: Duration, slots: usize) -> Self {
        let slots = slots.max(1);
        Rolling {
            bucket_ns: (window.as_nanos() as u64 / slots as u64).max(1),
            buckets: std::collections::VecDeque::with_capacity(slots + 1),
            slots,
        }
    }

    pub fn add(&mut self, now: Nanos, kind: usize, n: u64) {
        let b = now / self.bucket_ns;
        self.expire(b);
        match self.buckets.back_mut() {
            Some((nb, counts)) if *nb == b => counts[kind] += n,
            _ => {
                let mut counts = [0; N];
                counts[kind] = n;
                self.buckets.push_back((b, counts));
            }
        }
    }

    /// Totals over the window ending now.
    pub fn sum(&self, now: Nanos) -> [u64; N] {
        let b = now / self.bucket_ns;
        let mut out = [0; N];
        for (nb, counts) in &self.buckets {
            if nb + (self.slots as u64) > b {
                for (o, c) in out.iter_mut().zip(counts) {
                    *o += c;
                }
            }
        }
        out
    }

    pub fn clear(&mut self) {
        self.buckets.clear();
    }

    /// Nothing was ever counted (or everything was cleared).
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    fn expire(&mut self, b: u64) {
        while self
            .buckets
            .front()
            .is_some_and(|(nb, _)| nb + (self.slots as u64) <= b)
        {
            self.buckets.pop_front();
        }
    }
}

/// Days since the Unix epoch (UTC).
pub fn day_of(now: Nanos) -> u64 {
    now / NS_PER_DAY
}

/// A count that starts again at 00:00 UTC each day.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DayCounter {
    pub day: u64,
    pub count: u64,
}

impl DayCounter {
    pub fn get(&self, now: Nanos) -> u64 {
        if self.day == day_of(now) { self.count } else { 0 }
    }

    pub fn add(&mut self, now: Nanos, n: u64) {
        let d = day_of(now);
        if self.day != d {
            *self = DayCounter { day: d, count: 0 };
        }
        self.count += n;
    }

    /// Nanoseconds until the count starts again.
    pub fn until_reset(now: Nanos) -> u64 {
        NS_PER_DAY - now % NS_PER_DAY
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (UTC; H. Hinnant's
/// days-from-civil).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// (year, month, day) of a day number since 1970-01-01 (H. Hinnant's
/// civil-from-days).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// 2026-11-23 at `h:m:s` UTC, for tests of the rate cores.
#[cfg(test)]
pub(crate) fn test_time(h: u64, m: u64, s: u64) -> Nanos {
    let base = days_from_civil(2026, 11, 23) as u64 * 86_400;
    (base + h * 3600 + m * 60 + s) * NS_PER_SEC
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Nanos = 1_800_000_000 * NS_PER_SEC;

    fn lim(s: &str, burst: u32) -> Limit {
        Limit::new(s.parse().unwrap(), burst)
    }

    #[test]
    fn rates_parse_and_print() {
        for (text, count, secs, shown) in [
            ("300/min", 300, 60, "300/min"),
            ("5/s", 5, 1, "5/s"),
            ("5/second", 5, 1, "5/s"),
            ("30/minute", 30, 60, "30/min"),
            ("1000/h", 1000, 3600, "1000/h"),
            ("50000/day", 50000, 86_400, "50000/day"),
            (" 7 / d ", 7, 86_400, "7/day"),
            ("100/10m", 100, 600, "100/10m"),
        ] {
            let r: Rate = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!((r.count, r.per), (count, Duration::from_secs(secs)), "{text}");
            assert_eq!(r.to_string(), shown);
        }
        for bad in [
            "",
            "300",
            "0/min",
            "-1/min",
            "x/min",
            "5/fortnight",
            "5/0s",
            "1.5/s",
            "1/1000y",
        ] {
            assert!(bad.parse::<Rate>().is_err(), "{bad:?} accepted");
        }
        let e = "5/fortnight".parse::<Rate>().unwrap_err();
        assert!(e.contains("fortnight"), "{e}");
    }

    #[test]
    fn the_clock_never_steps_back_and_follows_forward_steps() {
        const H: u64 = 3600 * NS_PER_SEC;
        let c = StepSafe::new();
        // Normal running: the wall clock itself.
        assert_eq!(c.at(T0, 0), T0);
        assert_eq!(c.at(T0 + NS_PER_SEC, NS_PER_SEC), T0 + NS_PER_SEC);
        // The wall clock steps back an hour: time keeps counting forward
        // from where it was, at the monotonic rate.
        assert_eq!(c.at(T0 + 2 * NS_PER_SEC - H, 2 * NS_PER_SEC), T0 + 2 * NS_PER_SEC);
        assert_eq!(c.at(T0 + 3 * NS_PER_SEC - H, 3 * NS_PER_SEC), T0 + 3 * NS_PER_SEC);
        // A forward step is followed at once.
        assert_eq!(c.at(T0 + 4 * NS_PER_SEC + H, 4 * NS_PER_SEC), T0 + 4 * NS_PER_SEC + H);
        assert_eq!(c.at(T0 + 5 * NS_PER_SEC + H, 5 * NS_PER_SEC), T0 + 5 * NS_PER_SEC + H);
        // The real clock, read twice, never goes back.
        let a = now_ns();
        assert!(now_ns() >= a);

        // What this is for: a limiter at 1/s, its last event just before
        // the wall clock stepped back an hour, admits the next one a second
        // later, not an hour later.
        let l = lim("1/s", 1);
        let c = StepSafe::new();
        let mut g = Gcra::default();
        assert_eq!(g.take(c.at(T0, 0), &l, 1.0, 1), Ok(()));
        let later = c.at(T0 + NS_PER_SEC - H, NS_PER_SEC);
        assert_eq!(g.take(later, &l, 1.0, 1), Ok(()));
        // (the wall clock as it was would have said: wait an hour)
        let mut g = Gcra::default();
        g.take(T0, &l, 1.0, 1).unwrap();
        assert_eq!(g.take(T0 + NS_PER_SEC - H, &l, 1.0, 1), Err(Denied::Wait(H)));
    }

    #[test]
    fn gcra_spaces_events_at_the_rate() {
        // 10/s, burst 1: one every 100 ms.
        let l = lim("10/s", 1);
        let mut g = Gcra::default();
        assert_eq!(g.take(T0, &l, 1.0, 1), Ok(()));
        assert_eq!(g.take(T0, &l, 1.0, 1), Err(Denied::Wait(100 * NS_PER_MS)));
        assert_eq!(
            g.take(T0 + 60 * NS_PER_MS, &l, 1.0, 1),
            Err(Denied::Wait(40 * NS_PER_MS))
        );
        assert_eq!(g.take(T0 + 100 * NS_PER_MS, &l, 1.0, 1), Ok(()));
        // A refusal charges nothing.
        assert_eq!(g.tat, T0 + 200 * NS_PER_MS);
        // 100 events over 10 s at exactly the interval all pass.
        let mut g = Gcra::default();
        for i in 0..100 {
            assert_eq!(g.take(T0 + i * 100 * NS_PER_MS, &l, 1.0, 1), Ok(()), "event {i}");
        }
    }

    #[test]
    fn gcra_burst_then_steady() {
        // A budget of 5 per minute: five at once, then one every 12 s.
        let l = Limit::budget("5/min".parse().unwrap());
        let mut g = Gcra::default();
        for _ in 0..5 {
            assert_eq!(g.take(T0, &l, 1.0, 1), Ok(()));
        }
        assert_eq!(g.remaining(T0, &l, 1.0), 0);
        assert_eq!(g.take(T0, &l, 1.0, 1), Err(Denied::Wait(12 * NS_PER_SEC)));
        assert_eq!(g.remaining(T0 + 24 * NS_PER_SEC, &l, 1.0), 2);
        assert_eq!(g.take(T0 + 12 * NS_PER_SEC, &l, 1.0, 1), Ok(()));
        assert!(!g.is_idle(T0 + 59 * NS_PER_SEC));
        assert!(g.is_idle(T0 + 72 * NS_PER_SEC));
        // n events at once: all or nothing, never more than the burst.
        let mut g = Gcra::default();
        assert_eq!(g.take(T0, &l, 1.0, 3), Ok(()));
        assert_eq!(g.take(T0, &l, 1.0, 3), Err(Denied::Wait(12 * NS_PER_SEC)));
        assert_eq!(g.take(T0, &l, 1.0, 2), Ok(()));
        assert_eq!(g.check(T0, &l, 1.0, 6), Err(Denied::Never));
    }

    #[test]
    fn gcra_check_does_not_consume_and_charge_goes_over() {
        let l = lim("1/s", 1);
        let mut g = Gcra::default();
        for _ in 0..3 {
            assert_eq!(g.check(T0, &l, 1.0, 1), Ok(()));
        }
        g.charge(T0, &l, 1.0, 1);
        g.charge(T0, &l, 1.0, 1);
        assert_eq!(g.check(T0, &l, 1.0, 1), Err(Denied::Wait(2 * NS_PER_SEC)));
        // A faster rate after a reload: the debt is cut to one new interval.
        let fast = lim("10/s", 1);
        g.clamp(T0, &fast, 1.0);
        assert_eq!(g.check(T0, &fast, 1.0, 1), Err(Denied::Wait(100 * NS_PER_MS)));
        // A slower one keeps it.
        let mut h = Gcra::default();
        h.charge(T0, &l, 1.0, 1);
        h.clamp(T0, &lim("1/min", 1), 1.0);
        assert_eq!(h.check(T0, &lim("1/min", 1), 1.0, 1), Err(Denied::Wait(NS_PER_SEC)));
    }

    #[test]
    fn gcra_factor_slows_the_rate() {
        // 10/s slowed to a quarter: one every 400 ms.
        let l = lim("10/s", 1);
        let mut g = Gcra::default();
        assert_eq!(g.take(T0, &l, 0.25, 1), Ok(()));
        assert_eq!(g.check(T0, &l, 0.25, 1), Err(Denied::Wait(400 * NS_PER_MS)));
        // Nonsense factors mean "not slowed".
        for f in [0.0, -1.0, f64::NAN, 2.0] {
            let mut g = Gcra::default();
            g.take(T0, &l, f, 1).unwrap();
            assert_eq!(g.check(T0, &l, f, 1), Err(Denied::Wait(100 * NS_PER_MS)), "{f}");
        }
    }

    #[test]
    fn gcra_rate_over_a_long_run() {
        // Taking whenever allowed during [0 s, 60 s) at 300/min with burst
        // 10 lets through the burst at 0 s, then one every 200 ms from
        // 0.2 s to 59.8 s: 10 + 299.
        let l = lim("300/min", 10);
        let mut g = Gcra::default();
        let mut now = T0;
        let mut passed = 0;
        while now < T0 + 60 * NS_PER_SEC {
            match g.take(now, &l, 1.0, 1) {
                Ok(()) => passed += 1,
                Err(Denied::Wait(w)) => now += w,
                Err(Denied::Never) => unreachable!(),
            }
        }
        assert_eq!(passed, 309);
    }

    #[test]
    fn rolling_window_slides() {
        let mut r: Rolling<2> = Rolling::new(Duration::from_secs(60), 6);
        r.add(T0, 0, 5);
        r.add(T0 + 5 * NS_PER_SEC, 1, 1);
        r.add(T0 + 30 * NS_PER_SEC, 0, 10);
        assert_eq!(r.sum(T0 + 30 * NS_PER_SEC), [15, 1]);
        // 60 s after the first bucket, it has slid out (10 s buckets).
        let first_bucket_end = (T0 / (10 * NS_PER_SEC) + 6) * 10 * NS_PER_SEC;
        assert_eq!(r.sum(first_bucket_end), [10, 0]);
        assert_eq!(r.sum(T0 + 200 * NS_PER_SEC), [0, 0]);
        r.add(T0 + 200 * NS_PER_SEC, 1, 2);
        assert_eq!(r.buckets.len(), 1, "old buckets dropped on add");
        r.clear();
        assert_eq!(r.sum(T0 + 200 * NS_PER_SEC), [0, 0]);
    }

    #[test]
    fn day_counter_resets_at_midnight_utc() {
        let midnight = (T0 / NS_PER_DAY + 1) * NS_PER_DAY;
        let mut c = DayCounter::default();
        c.add(midnight - NS_PER_SEC, 3);
        assert_eq!(c.get(midnight - 1), 3);
        assert_eq!(DayCounter::until_reset(midnight - NS_PER_SEC), NS_PER_SEC);
        assert_eq!(c.get(midnight), 0);
        c.add(midnight + 5, 1);
        assert_eq!(c.get(midnight + 10), 1);
        assert_eq!(day_of(midnight), day_of(midnight + NS_PER_DAY - 1));
    }
}
