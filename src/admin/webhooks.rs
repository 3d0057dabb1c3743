//! `GET /api/v1/webhooks`: every webhook endpoint's outbox and delivery
//! state (backlog, oldest waiting event, counters, last error).
//!
//! Trust boundary: read-only; the caller passed the admin token check.
//! Secrets and URLs are not part of the status.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;

use super::{AdminState, json};

/// `{"endpoints": [...]}`; empty when no endpoint is configured.
pub async fn list(State(st): State<Arc<AdminState>>) -> Response {
    let endpoints = st.webhooks.as_ref().map(|w| w.status()).unwrap_or_default();
    json(StatusCode::OK, &serde_json::json!({ "endpoints": endpoints }))
}
