//! Budgets and warm-up caps at RCPT, fleet-wide: obtain the leases the
//! budgets ask for (see `rate::budget_fleet`), one Redis call per lease,
//! then charge. Only a recipient whose node holds no token for one of its
//! limits waits for Redis (one round trip per limit, a few recipients per
//! round trip); the rest charge in memory.
//!
//! Trust boundary: talks to the fleet's Redis only; its answers are two
//! integers, bounded before use.

use std::sync::LazyLock;
use std::time::Duration;

use super::{Cluster, ClusterError};
use crate::rate::budget::{Budgets, Charge, Over, Who};
use crate::rate::budget_fleet::{Grant, LeaseLimit, LeaseRequest};
use crate::throttle::now_ns;

/// A day counter capped at ARGV[1]: take up to ARGV[2]. Returns {taken, used}.
static CAP: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(CAP_LUA));

const CAP_LUA: &str = r#"
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local n = math.min(tonumber(ARGV[2]), tonumber(ARGV[1]) - used)
if n <= 0 then
  return {0, used}
end
redis.call('INCRBY', KEYS[1], n)
redis.call('EXPIRE', KEYS[1], 172800)
return {n, used + n}
"#;

/// Ask Redis for one lease: (tokens, the rate's tat after the lease), or
/// (0, µs until one is due).
async fn lease(cluster: &Cluster, r: &LeaseRequest) -> Result<(u32, u64), ClusterError> {
    let key = cluster.key(&r.key.redis_name());
    let (n, extra): (i64, i64) = match r.limit {
        LeaseLimit::Rate(rate) => {
            // The provider rates' GCRA with a horizon of 0: tokens due now.
            let interval_us = (rate.interval_ns() / 1000).max(1);
            let mut inv = super::limits::GCRA.prepare_invoke();
            inv.key(key).arg(interval_us).arg(rate.count.max(1)).arg(r.ask).arg(0);
            let (n, wait_us, tat_us): (i64, i64, i64) = cluster.script(&inv).await?;
            (n, if n > 0 { tat_us } else { wait_us })
        }
        LeaseLimit::Cap(cap) => {
            let mut inv = CAP.prepare_invoke();
            inv.key(key).arg(cap).arg(r.ask);
            let (n, _used): (i64, i64) = cluster.script(&inv).await?;
            (n, 0)
        }
    };
    let n = u32::try_from(n.clamp(0, i64::from(r.ask))).unwrap_or(0);
    Ok((n, extra.max(0) as u64))
}

/// Give leased tokens that lapsed unused back: the rate's tat moves back by
/// what of the lease the bucket has not refilled since (ARGV[4]: the tat
/// right after the lease), never below a full bucket; the day counter
/// down, never below 0.
static REFUND_RATE: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(REFUND_RATE_LUA));

const REFUND_RATE_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local floor = now - (burst - 1) * interval
local still = tonumber(ARGV[4]) - floor
if still <= 0 then return 0 end
local back = tat - math.min(tonumber(ARGV[3]) * interval, still)
if back < floor then back = floor end
if back < tat then
  redis.call('SET', KEYS[1], string.format('%.0f', back), 'PX', math.ceil((back - now + (burst - 1) * interval) / 1000) + 1000)
end
return 1
"#;

static REFUND_CAP: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(REFUND_CAP_LUA));

const REFUND_CAP_LUA: &str = r#"
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local n = math.min(used, tonumber(ARGV[1]))
if n > 0 then redis.call('DECRBY', KEYS[1], n) end
return n
"#;

/// Send refunds. One refused by Redis (an error reply: the script did not
/// run) is kept for the next call; one whose answer was lost is dropped,
/// since it may have been applied (giving back too little is the safe side).
pub async fn refund(budgets: &Budgets, cluster: &Cluster) {
    let refunds = budgets.take_refunds(now_ns());
    let mut left = Vec::new();
    for (i, r) in refunds.iter().enumerate() {
        let key = cluster.key(&r.key.redis_name());
        let sent: Result<i64, ClusterError> = match r.limit {
            LeaseLimit::Rate(rate) => {
                let mut inv = REFUND_RATE.prepare_invoke();
                inv.key(key)
                    .arg((rate.interval_ns() / 1000).max(1))
                    .arg(rate.count.max(1))
                    .arg(r.tokens)
                    .arg(r.tat_us);
                cluster.script(&inv).await
            }
            LeaseLimit::Cap(_) => {
                let mut inv = REFUND_CAP.prepare_invoke();
                inv.key(key).arg(r.tokens);
                cluster.script(&inv).await
            }
        };
        match sent {
            Ok(_) => {}
            Err(ClusterError::Server(_)) => left.push(r.clone()),
            Err(ClusterError::Unavailable(_)) => {
                // This one may have run; the rest did not.
                left.extend(refunds[i + 1..].iter().cloned());
                break;
            }
        }
    }
    if !left.is_empty() {
        budgets.keep_refunds(left);
    }
}

/// Charge one recipient (and, when `first`, one message) to every budget
/// and warm-up it falls under, fleet-wide while Redis is up. A recipient
/// for which Redis does not answer is charged at this node's fair share.
pub async fn charge(budgets: &Budgets, cluster: &Cluster, who: &Who<'_>, first: bool) -> Result<(), Over> {
    let nodes = || u32::try_from(cluster.live_nodes()).unwrap_or(u32::MAX);
    let mut grants: Vec<Grant> = Vec::new();
    // The tokens obtained go to this caller first (see `try_charge`); a few
    // rounds cover limits whose tokens lapsed meanwhile.
    for round in 0..4 {
        let reqs = match budgets.try_charge(now_ns(), who, first, &grants) {
            Ok(()) => return Ok(()),
            Err(Charge::Over(o)) => return Err(o),
            Err(Charge::Need(reqs)) => reqs,
        };
        grants.clear();
        if round == 3 {
            // Still short: ask the client to come back shortly rather than
            // accept without the fleet's token.
            let r = &reqs[0];
            return Err(budgets.fleet_over(r, Duration::from_secs(1), now_ns(), Some(Duration::from_secs(1))));
        }
        for r in reqs {
            // One lease per key in flight on this node; a session that waited
            // for another's finds the pool filled and asks for nothing.
            let _one = cluster.lease_locks.lock(r.key.redis_name()).await;
            if budgets.holds(&r.key, now_ns()) {
                continue;
            }
            match lease(cluster, &r).await {
                Ok((n, tat_us)) if n > 0 => grants.push(Grant {
                    req: r,
                    tokens: n,
                    tat_us,
                }),
                Ok((_, wait_us)) => {
                    budgets.pool(&grants, now_ns());
                    return Err(budgets.fleet_over(&r, Duration::from_micros(wait_us), now_ns(), None));
                }
                Err(_) => {
                    budgets.pool(&grants, now_ns());
                    return budgets.charge_at_share(now_ns(), who, first, nodes());
                }
            }
        }
    }
    unreachable!("the fourth round returns")
}
