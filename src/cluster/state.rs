//! Fleet-wide operator and breaker state: breakers that open or close,
//! suspensions and resumes, and policy reloads made on one node reach every
//! node within a second (a [`Notice`] on the bus), and a node that joins or
//! reconnects adopts the ones still in force (the `state` hash).
//!
//! Redis layout: `state` hash, field `breaker|<scope>|<key>` or
//! `hold|<scope>|<key>` → the change as JSON, removed when the breaker
//! closes or the hold is lifted; entries past their `until` are ignored and
//! dropped.
//!
//! A change made while Redis is unavailable applies on this node at once
//! and is sent when Redis returns (in order).
//!
//! Trust boundary: notices come from the fleet's Redis (trusted); their
//! fields are checked as the admin API checks them, unknown topics ignored.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Cluster, ClusterError, Notice};
use crate::pipeline::PolicyHandle;
use crate::rate::breaker::{BreakerScope, Transition};
use crate::throttle::{Nanos, now_ns};

/// A suspension (`until` > 0) or resume (`until` = 0), as the admin API
/// validated it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldChange {
    /// `delivery`, `provider`, `pair`, `sender_domain` or `tenant`.
    pub scope: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender_domain: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Unix ns; 0 lifts the hold.
    pub until: Nanos,
    #[serde(default)]
    pub reason: String,
}

impl HoldChange {
    fn field(&self) -> String {
        let key = match self.scope.as_str() {
            "delivery" => String::new(),
            "provider" => self.provider.clone().unwrap_or_default(),
            "pair" => format!(
                "{}/{}",
                self.provider.as_deref().unwrap_or(""),
                self.sender_domain.as_deref().unwrap_or("")
            ),
            "sender_domain" => self.sender_domain.clone().unwrap_or_default(),
            _ => self.tenant.clone().unwrap_or_default(),
        };
        // Domains in any case name one hold (a resume in lower case lifts a
        // suspension written in upper case).
        let key = match self.scope.as_str() {
            "pair" | "sender_domain" => key.to_ascii_lowercase(),
            _ => key,
        };
        format!("hold|{}|{key}", self.scope)
    }
}

/// A breaker change on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakerChange {
    pub scope: BreakerScope,
    pub key: String,
    /// `open` or `closed`.
    pub state: String,
    #[serde(default)]
    pub until: Option<Nanos>,
    pub reason: String,
}

impl BreakerChange {
    fn field(&self) -> String {
        format!("breaker|{}|{}", self.scope.as_str(), self.key)
    }
}

/// What this node tells the fleet.
#[derive(Debug, Clone)]
pub enum Change {
    Breaker(BreakerChange),
    Hold(HoldChange),
    Reload,
}

/// The sending end, held by the policy handle.
#[derive(Clone)]
pub struct Link {
    tx: mpsc::UnboundedSender<Change>,
}

impl Link {
    pub fn send(&self, c: Change) {
        let _ = self.tx.send(c);
    }

    /// Breaker transitions made here: opens and closes travel (each node
    /// reaches half-open by itself at the shared `until`).
    pub fn breakers(&self, ts: &[Transition]) {
        for t in ts.iter().filter(|t| t.state == "open" || t.state == "closed") {
            self.send(Change::Breaker(BreakerChange {
                scope: t.scope,
                key: t.key.clone(),
                state: t.state.to_string(),
                until: t.until,
                reason: t.reason.clone(),
            }));
        }
    }
}

pub fn link() -> (Link, mpsc::UnboundedReceiver<Change>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Link { tx }, rx)
}

/// Send this node's changes, apply the others', until `stop`. Also keeps
/// the budgets' fleet mode current (leases while Redis is up, fair shares
/// while it is not).
pub async fn run(
    cluster: Arc<Cluster>,
    policy: PolicyHandle,
    mut changes: mpsc::UnboundedReceiver<Change>,
    stop: CancellationToken,
) {
    let mut epochs = cluster.epochs();
    // Connected before this task first ran: adopt now, not at the next epoch.
    epochs.mark_changed();
    let mut notices = cluster.subscribe();
    let mut pending: std::collections::VecDeque<Change> = std::collections::VecDeque::new();
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = epochs.changed() => {
                if changed.is_err() { return; }
                flush(&cluster, &mut pending).await;
                if cluster.is_up() {
                    match adopt(&cluster, &policy).await {
                        Ok(n) if n > 0 => info!(changes = n, "cluster: adopted the fleet's breakers and holds"),
                        Ok(_) => {}
                        Err(e) => debug!(error = %e, "cluster: could not read the fleet's state"),
                    }
                }
            }
            c = changes.recv() => {
                let Some(c) = c else { return };
                pending.push_back(c);
                flush(&cluster, &mut pending).await;
            }
            n = notices.recv() => match n {
                Ok(n) => apply(&policy, &n).await,
                Err(RecvError::Lagged(k)) => {
                    warn!(missed = k, "cluster: notices lagged; reading the fleet's state again");
                    let _ = adopt(&cluster, &policy).await;
                }
                Err(RecvError::Closed) => return,
            },
            _ = tick.tick() => {
                ticks += 1;
                let nodes = u32::try_from(cluster.live_nodes()).unwrap_or(u32::MAX);
                policy.budgets.set_fleet_mode(if cluster.is_up() {
                    crate::rate::fleet::Mode::Leased { nodes }
                } else {
                    crate::rate::fleet::Mode::FairShare { nodes }
                });
                // Budget tokens that lapsed unused go back to the fleet.
                if cluster.is_up() {
                    super::budgets::refund(&policy.budgets, &cluster).await;
                }
                // Changes an error reply held back: try again every 5 s.
                if !pending.is_empty() && cluster.is_up() && ticks.is_multiple_of(20) {
                    flush(&cluster, &mut pending).await;
                }
            }
        }
    }
}

/// Send waiting changes in order; stop at the first that fails (it and the
/// rest wait for the next try).
async fn flush(cluster: &Cluster, pending: &mut std::collections::VecDeque<Change>) {
    while let Some(c) = pending.front() {
        match send(cluster, c).await {
            Ok(()) => {
                pending.pop_front();
            }
            Err(e) => {
                if pending.len() > 10_000 {
                    warn!("cluster: too many changes waiting for Redis; dropping the oldest");
                    pending.pop_front();
                }
                if matches!(e, ClusterError::Server(_)) {
                    warn!(error = %e, waiting = pending.len(), "cluster: Redis refused a change; retrying");
                }
                return;
            }
        }
    }
}

/// Store and announce one change.
async fn send(cluster: &Cluster, c: &Change) -> Result<(), ClusterError> {
    // What stays in force is kept in the `state` hash (for nodes that join
    // later), what ends is removed from it; then every node is told.
    let (topic, field, in_force, body) = match c {
        Change::Breaker(b) => ("breaker", b.field(), b.state == "open", serde_json::to_value(b)),
        Change::Hold(h) => ("hold", h.field(), h.until > 0, serde_json::to_value(h)),
        Change::Reload => return cluster.publish("reload", serde_json::Value::Null).await,
    };
    let body = body.expect("serializable");
    let state = cluster.key("state");
    let _: i64 = if in_force {
        cluster
            .query(redis::cmd("HSET").arg(&state).arg(field).arg(body.to_string()))
            .await?
    } else {
        cluster.query(redis::cmd("HDEL").arg(&state).arg(field)).await?
    };
    cluster.publish(topic, body).await
}

/// Apply the breakers and holds in force in the fleet; returns how many.
async fn adopt(cluster: &Cluster, policy: &PolicyHandle) -> Result<usize, ClusterError> {
    let all: Vec<(String, String)> = cluster.query(redis::cmd("HGETALL").arg(cluster.key("state"))).await?;
    let now = now_ns();
    let mut stale = Vec::new();
    let mut n = 0;
    for (field, json) in all {
        let topic = field.split('|').next().unwrap_or("");
        let Ok(body) = serde_json::from_str::<serde_json::Value>(&json) else {
            stale.push(field);
            continue;
        };
        let until = body["until"].as_u64().unwrap_or(0);
        if until <= now {
            stale.push(field);
            continue;
        }
        let notice = Notice {
            from: "fleet".into(),
            instance: String::new(),
            topic: topic.to_string(),
            body,
        };
        apply(policy, &notice).await;
        n += 1;
    }
    if !stale.is_empty() {
        let _: i64 = cluster
            .query(redis::cmd("HDEL").arg(cluster.key("state")).arg(stale))
            .await?;
    }
    Ok(n)
}

/// Apply another node's change here, without sending it on.
pub async fn apply(policy: &PolicyHandle, n: &Notice) {
    match n.topic.as_str() {
        "breaker" => {
            let Ok(b) = serde_json::from_value::<BreakerChange>(n.body.clone()) else {
                warn!(from = %n.from, "cluster: malformed breaker notice ignored");
                return;
            };
            let t = match (b.state.as_str(), b.until) {
                ("open", Some(until)) => {
                    let reason = format!("{} (on node {})", b.reason, n.from);
                    policy.breakers.open_as(now_ns(), b.scope, &b.key, until, reason)
                }
                ("closed", _) => {
                    policy
                        .breakers
                        .close_as(b.scope, &b.key, format!("{} (on node {})", b.reason, n.from))
                }
                _ => None,
            };
            if let Some(t) = t {
                policy.apply_transitions(vec![t]).await;
            }
        }
        "hold" => match serde_json::from_value::<HoldChange>(n.body.clone()) {
            Ok(h) => {
                if let Err(e) = policy.hold(&h) {
                    warn!(from = %n.from, error = %e, "cluster: hold notice not applied");
                } else {
                    info!(from = %n.from, scope = %h.scope, lifted = h.until == 0, "cluster: hold from the fleet");
                }
            }
            Err(e) => warn!(from = %n.from, error = %e, "cluster: malformed hold notice ignored"),
        },
        "reload" => match policy.reload_from_source().await {
            Ok(()) => info!(from = %n.from, "cluster: rate policy reloaded (asked by the fleet)"),
            Err(e) => warn!(from = %n.from, "cluster: fleet reload refused, policy unchanged: {e}"),
        },
        _ => {}
    }
}

/// A single node keeps the breakers and holds in force in a file of the
/// spool (`policy-state.json`), as the fleet keeps them in Redis's `state`
/// hash, so a restart does not lift an operator's suspension or close a
/// breaker early. Same fields, same rules: what stays in force is written,
/// what ends is removed, entries past their `until` are dropped on reading.
pub struct LocalState {
    path: std::path::PathBuf,
    map: std::collections::BTreeMap<String, serde_json::Value>,
}

/// The file's name in `spool.dir`.
pub const LOCAL_STATE_FILE: &str = "policy-state.json";

impl LocalState {
    /// Read the file; a missing file is an empty state. A file that cannot
    /// be read as the state is renamed `<name>.corrupt` (kept for
    /// inspection) and the node starts without it: mail must flow.
    pub fn load(spool_dir: &std::path::Path) -> LocalState {
        let path = spool_dir.join(LOCAL_STATE_FILE);
        let map = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(map) => map,
                Err(e) => {
                    let aside = path.with_extension("json.corrupt");
                    warn!(path = %path.display(), error = %e, moved_to = %aside.display(),
                        "breakers and holds of the last run could not be read; starting without them");
                    let _ = std::fs::rename(&path, &aside);
                    Default::default()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Default::default(),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "breakers and holds of the last run could not be read; starting without them");
                Default::default()
            }
        };
        LocalState { path, map }
    }

    /// Apply what is still in force (before delivery starts); returns how
    /// many. Entries past their `until` are dropped.
    pub async fn restore(&mut self, policy: &PolicyHandle) -> usize {
        let now = now_ns();
        self.map
            .retain(|_, body| body["until"].as_u64().is_some_and(|until| until > now));
        let mut n = 0;
        for (field, body) in &self.map {
            if field.starts_with("breaker|") {
                let Ok(b) = serde_json::from_value::<BreakerChange>(body.clone()) else {
                    continue;
                };
                let until = b.until.unwrap_or(0);
                if let Some(t) = policy.breakers.open_as(now, b.scope, &b.key, until, b.reason) {
                    policy.apply_transitions(vec![t]).await;
                    n += 1;
                }
            } else if let Ok(h) = serde_json::from_value::<HoldChange>(body.clone()) {
                match policy.hold(&h) {
                    Ok(_) => n += 1,
                    Err(e) => warn!(field = %field, error = %e, "a hold of the last run was not restored"),
                }
            }
        }
        if n > 0 {
            info!(restored = n, path = %self.path.display(), "breakers and holds of the last run restored");
        }
        n
    }

    /// Take in one change; true when what is in force changed.
    fn record(&mut self, c: &Change) -> bool {
        let (field, in_force, body) = match c {
            Change::Breaker(b) => (b.field(), b.state == "open", serde_json::to_value(b)),
            Change::Hold(h) => (h.field(), h.until > 0, serde_json::to_value(h)),
            Change::Reload => return false,
        };
        if in_force {
            let body = body.expect("serializable");
            self.map.insert(field, body.clone()) != Some(body)
        } else {
            self.map.remove(&field).is_some()
        }
    }

    /// Write the file: temp file, fsync, rename, directory fsync.
    fn save(&self) -> std::io::Result<()> {
        use std::io::Write;
        let tmp = self.path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(&self.map).expect("serializable"))?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// Single node: write each breaker and hold change made here to the file,
/// until `stop` (changes sent before it are written first).
pub async fn run_local(mut state: LocalState, mut changes: mpsc::UnboundedReceiver<Change>, stop: CancellationToken) {
    loop {
        let (mut changed, stopping) = tokio::select! {
            biased;
            c = changes.recv() => match c {
                Some(c) => (state.record(&c), false),
                None => return,
            },
            _ = stop.cancelled() => (false, true),
        };
        // A burst (a breaker opening for a domain and its tenant) is one
        // write; so is what is left at the stop.
        while let Ok(c) = changes.try_recv() {
            changed |= state.record(&c);
        }
        if changed {
            state = save(state).await;
        }
        if stopping {
            return;
        }
    }
}

async fn save(state: LocalState) -> LocalState {
    tokio::task::spawn_blocking(move || {
        if let Err(e) = state.save() {
            warn!(path = %state.path.display(), error = %e,
                "cannot write the breakers and holds in force; a restart would lose the latest change");
        }
        state
    })
    .await
    .expect("the state writer does not panic")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(state: &str, until: Option<Nanos>) -> Change {
        Change::Breaker(BreakerChange {
            scope: BreakerScope::Tenant,
            key: "acme".into(),
            state: state.into(),
            until,
            reason: "bounce rate".into(),
        })
    }

    fn hold(provider: &str, until: Nanos) -> Change {
        Change::Hold(HoldChange {
            scope: "provider".into(),
            provider: Some(provider.into()),
            sender_domain: None,
            tenant: None,
            until,
            reason: "incident".into(),
        })
    }

    #[test]
    fn the_local_state_keeps_what_is_in_force_and_sets_a_bad_file_aside() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = LocalState::load(dir.path());
        assert!(s.map.is_empty());
        let until = now_ns() + 3_600_000_000_000;
        assert!(s.record(&breaker("open", Some(until))));
        assert!(
            !s.record(&breaker("open", Some(until))),
            "the same change again changes nothing"
        );
        assert!(s.record(&hold("google", until)));
        assert!(s.record(&hold("yahoo", until)));
        assert!(s.record(&hold("yahoo", 0)), "a resume removes the hold");
        assert!(!s.record(&hold("outlook", 0)), "nothing to resume");
        assert!(!s.record(&Change::Reload));
        s.save().unwrap();
        let again = LocalState::load(dir.path());
        let fields: Vec<&str> = again.map.keys().map(String::as_str).collect();
        assert_eq!(fields, ["breaker|tenant|acme", "hold|provider|google"]);
        assert_eq!(again.map, s.map);
        assert!(s.record(&breaker("closed", None)), "a close removes the breaker");
        assert_eq!(s.map.len(), 1);

        std::fs::write(dir.path().join(LOCAL_STATE_FILE), b"{ not json").unwrap();
        let bad = LocalState::load(dir.path());
        assert!(bad.map.is_empty());
        assert!(!dir.path().join(LOCAL_STATE_FILE).exists());
        assert_eq!(
            std::fs::read(dir.path().join("policy-state.json.corrupt")).unwrap(),
            b"{ not json"
        );
    }
}
