//! `GET /api/v1/domains`: the health of every configured sender domain, as
//! the guard sees it (cached lookups), for the dashboard.
//!
//! Domains are the exact `tenants[].sender_domains` (wildcards skipped) and
//! `domains[].name`. Without a guard every domain is `unchecked`. Lookups
//! run concurrently, at most [`CONCURRENCY`] at a time, each bounded by
//! [`LOOKUP_TIMEOUT`]: a slow resolver gives `unchecked` with a finding, not
//! a hanging page.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{Value, json};

use super::{AdminState, json};

const CONCURRENCY: usize = 8;
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);

/// The exact sender domains of the config, lowercased and sorted.
fn configured(cfg: &crate::config::Config) -> Vec<String> {
    let mut set = BTreeSet::new();
    for t in &cfg.tenants {
        for d in &t.sender_domains {
            if !d.starts_with("*.") && !d.is_empty() {
                set.insert(d.to_ascii_lowercase());
            }
        }
    }
    for d in &cfg.domains {
        if !d.name.is_empty() {
            set.insert(d.name.to_ascii_lowercase());
        }
    }
    set.into_iter().collect()
}

fn unchecked(domain: &str, why: Option<String>) -> Value {
    let findings: Vec<Value> = why
        .into_iter()
        .map(|m| json!({"check": "dns", "severity": "info", "token": "unchecked", "message": m}))
        .collect();
    json!({"domain": domain, "status": "unchecked", "findings": findings})
}

async fn one(guard: Arc<crate::guard::Guard>, domain: String) -> Value {
    match tokio::time::timeout(LOOKUP_TIMEOUT, guard.health(&domain)).await {
        Ok(Ok(h)) => json!({"domain": domain, "status": h.status, "findings": h.findings}),
        Ok(Err(e)) => unchecked(&domain, Some(format!("temporary DNS failure: {e}"))),
        Err(_) => unchecked(
            &domain,
            Some(format!("lookup took longer than {}s", LOOKUP_TIMEOUT.as_secs())),
        ),
    }
}

/// `GET /api/v1/domains`: `{"domains": [{domain, status, findings}]}`.
pub async fn list(State(st): State<Arc<AdminState>>) -> Response {
    let domains = configured(&st.cfg);
    let out: Vec<Value> = match &st.guard {
        None => domains.iter().map(|d| unchecked(d, None)).collect(),
        Some(g) => {
            let permits = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
            let mut set = tokio::task::JoinSet::new();
            for (i, d) in domains.iter().enumerate() {
                let (g, d, permits) = (Arc::clone(g), d.clone(), Arc::clone(&permits));
                set.spawn(async move {
                    let _permit = permits.acquire_owned().await;
                    (i, one(g, d).await)
                });
            }
            let mut out: Vec<Value> = domains.iter().map(|d| unchecked(d, None)).collect();
            while let Some(r) = set.join_next().await {
                if let Ok((i, v)) = r {
                    out[i] = v;
                }
            }
            out
        }
    };
    json(StatusCode::OK, &json!({ "domains": out }))
}
