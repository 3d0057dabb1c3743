//! Fleet-wide provider rates: one GCRA per provider in Redis, leased to the
//! nodes in batches (see `rate::fleet` for how the shaper uses them).
//!
//! The lease task watches the connection: while Redis is up the shaper
//! runs [`Mode::Leased`] and this task asks Redis for tokens for every
//! provider with mail waiting (one `EVALSHA` per batch: at most the jobs
//! waiting, at most a tenth of a second of the rate, at least one); while it
//! is down the shaper runs [`Mode::FairShare`] with the last known number of
//! live nodes, and no round trip is made.
//!
//! The script reads Redis's own clock (`TIME`), so node clocks need not
//! agree. Tokens are charged in Redis when reserved: the fleet never
//! exceeds `rate` (plus `burst`); tokens a node cannot use expire.
//!
//! Trust boundary: talks to the fleet's Redis only; its answers are two
//! integers, bounded before use.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Cluster, ClusterError};
use crate::queue::Queue;
use crate::rate::fleet::Mode;

/// GCRA with reservations over the tat (µs, Redis's clock) in KEYS[1]: one
/// token per ARGV[1] µs, a burst of ARGV[2]; reserve up to ARGV[3] tokens
/// whose times fall within ARGV[4] µs from now. Returns {reserved, µs from
/// now to the first one's time (negative: usable at once), the tat after},
/// or {0, µs until a token falls within the horizon, the tat}. With a
/// horizon of 0 it takes only tokens due now: the budgets use it so.
pub(crate) static GCRA: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| redis::Script::new(GCRA_LUA));

const GCRA_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local horizon = tonumber(ARGV[4])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local earliest = now - (burst - 1) * interval
if tat < earliest then tat = earliest end
local n = 0
if tat <= now + horizon then
  n = math.min(want, math.floor((now + horizon - tat) / interval) + 1)
end
if n <= 0 then
  return {0, tat - horizon - now, tat}
end
local first = tat
tat = tat + n * interval
-- Kept until the bucket is full again (the tat may lie in the past by
-- up to the burst): always at least one interval.
local ttl = math.ceil((tat - now + (burst - 1) * interval) / 1000) + 1000
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', ttl)
return {n, first - now, tat}
"#;

/// How far ahead tokens are reserved: enough to cover a round trip and a
/// wake-up, little enough that a node which stops needing them wastes few.
const HORIZON_US: u64 = 100_000;

/// Longest pause between checks of the connection and of the demand.
const IDLE: Duration = Duration::from_millis(250);

/// Keep the shaper's fleet mode and leases current until `stop`.
pub async fn run(cluster: Arc<Cluster>, queue: Arc<Queue>, stop: CancellationToken) {
    let want = queue.with_shaper(|s, _| s.fleet.wants_signal());
    let mut current: Option<Mode> = None;
    // Error replies in a row (an ACL without EVALSHA, a full Redis): after a
    // few, run at fair shares as if Redis were down, and try again later.
    let mut errors = 0u32;
    loop {
        let nodes = u32::try_from(cluster.live_nodes()).unwrap_or(u32::MAX);
        let mode = if cluster.is_up() && errors < 3 {
            Mode::Leased { nodes }
        } else {
            Mode::FairShare { nodes }
        };
        if current != Some(mode) {
            queue.with_shaper(|s, _| s.fleet.set_mode(mode));
            match mode {
                Mode::FairShare { nodes } => warn!(nodes, "shaping: fleet limits at this node's fair share"),
                _ if matches!(current, Some(Mode::FairShare { .. }) | None) => {
                    info!(nodes, "shaping: provider rates leased from the fleet")
                }
                _ => {}
            }
            current = Some(mode);
        }
        let mut pause = IDLE;
        if errors >= 3 {
            // Probe again every 10 s.
            errors = if matches!(current, Some(Mode::FairShare { .. })) {
                2
            } else {
                errors
            };
            pause = Duration::from_secs(10);
        }
        if matches!(mode, Mode::Leased { .. }) {
            let wanted = queue.with_shaper(|s, _| {
                let policy = Arc::clone(s.policy());
                s.fleet
                    .wanted()
                    .into_iter()
                    .filter_map(|(p, n)| policy.limits(&p).rate.map(|l| (p, n, l)))
                    .collect::<Vec<_>>()
            });
            for (provider, n, limit) in wanted {
                let interval_us = (limit.rate.interval_ns() / 1000).max(1);
                let burst = u64::from(limit.burst.max(1));
                let ask = u64::from(n).min(HORIZON_US / interval_us + burst);
                // A rate slower than the horizon reserves its next token up
                // to one interval ahead.
                let horizon_us = HORIZON_US.max(interval_us);
                let mut inv = GCRA.prepare_invoke();
                inv.key(cluster.key(&format!("rate:{provider}")))
                    .arg(interval_us)
                    .arg(burst)
                    .arg(ask)
                    .arg(horizon_us);
                match cluster.script::<(u64, i64, i64)>(&inv).await {
                    Ok((granted, offset_us, _tat)) => {
                        errors = 0;
                        let granted = u32::try_from(granted.min(ask)).unwrap_or(0);
                        if granted == 0 {
                            let wait = Duration::from_micros(offset_us.clamp(100, 1_000_000) as u64);
                            pause = pause.min(wait);
                        } else {
                            // The script grants only tokens within the
                            // horizon; a token is never used before its time
                            // (a fixed cap here let a 1/min rate use its
                            // next token 50 s early).
                            let offset = offset_us.clamp(0, horizon_us as i64) as u64 * 1000;
                            let interval = interval_us * 1000;
                            queue.with_shaper(|s, now| s.fleet.grant(&provider, granted, offset, interval, now));
                        }
                    }
                    Err(ClusterError::Unavailable(_)) => {
                        pause = Duration::from_millis(10); // fair share once the supervisor sees it
                        break;
                    }
                    Err(e) => {
                        errors += 1;
                        warn!(error = %e, provider = %provider, errors, "shaping: lease script failed");
                        pause = pause.min(Duration::from_secs(1));
                    }
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = want.notified() => {}
            _ = tokio::time::sleep(pause) => {}
        }
    }
}
