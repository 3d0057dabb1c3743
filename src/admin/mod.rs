//! The admin HTTP API (`/api/v1/...`, JSON), served on its own listener
//! (`[admin] addr`, loopback by default).
//!
//! Trust boundary: every `/api/v1` route except the OpenAPI document needs
//! `Authorization: Bearer <admin.token>` (compared in constant time).
//! Request bodies are read up to `admin.max_body_bytes` and parsed as
//! untrusted input; bad input gets `400` with `{"error", "field"}` and
//! changes nothing. The API reaches the rest of the system only through
//! handles (the suppression store, the events log): it never touches spool
//! files.

pub mod client;
mod dashboard;
mod domains;
mod feedback;
pub mod messages;
mod policy;
mod suppressions;
mod webhooks;

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::Config;
use crate::events::Events;
use crate::suppress::SuppressionStore;

/// The OpenAPI 3.1 description of this API.
pub const OPENAPI: &str = include_str!("openapi.json");

/// What the API works with.
pub struct AdminState {
    pub cfg: Arc<Config>,
    pub suppress: Option<Arc<dyn SuppressionStore>>,
    pub events: Events,
    /// The running rate policy (queue shaping, budgets, breakers).
    pub policy: Option<crate::pipeline::PolicyHandle>,
    /// For preflight.
    pub guard: Option<Arc<crate::guard::Guard>>,
    /// The config file `POST /api/v1/policy/reload` reads.
    pub config_path: Option<std::path::PathBuf>,
    /// Webhook endpoints (`GET /api/v1/webhooks`).
    pub webhooks: Option<Arc<crate::webhook::Webhooks>>,
    /// The registry `/metrics` serves.
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
    /// The shared resolver (its cache counters are metrics).
    pub dns: Option<Arc<crate::dns::Dns>>,
    /// The message trace (`/api/v1/messages`).
    pub trace: Option<Arc<crate::trace::TraceStore>>,
    /// Readiness and drain (`/readyz`, `/api/v1/drain`).
    pub health: Option<Arc<crate::health::Health>>,
    /// The fleet backend, for `/metrics` and the dashboard.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

impl AdminState {
    /// The API over a running pipeline.
    pub fn new(
        cfg: Arc<Config>,
        pipeline: &crate::pipeline::Pipeline,
        config_path: Option<std::path::PathBuf>,
    ) -> AdminState {
        AdminState {
            cfg,
            suppress: pipeline.suppress.clone(),
            events: pipeline.events.clone(),
            policy: Some(pipeline.policy_handle()),
            guard: pipeline.guard.clone(),
            config_path,
            webhooks: pipeline.webhooks.clone(),
            metrics: Some(Arc::clone(&pipeline.metrics)),
            dns: pipeline.dns.clone(),
            trace: pipeline.trace.clone(),
            health: Some(Arc::clone(&pipeline.health)),
            cluster: pipeline.cluster.clone(),
        }
    }

    fn admin(&self) -> &crate::config::AdminConfig {
        self.cfg.admin.as_ref().expect("admin configured")
    }

    fn store(&self) -> Result<&Arc<dyn SuppressionStore>, ApiError> {
        self.suppress.as_ref().ok_or_else(|| ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            field: None,
            message: "no suppression store: configure [spool] or suppression.path".into(),
        })
    }

    fn tenant_known(&self, t: &str) -> bool {
        self.cfg.tenants.iter().any(|x| x.name == t)
    }
}

/// An error response: `{"error": message, "field": field}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub field: Option<String>,
    pub message: String,
}

impl ApiError {
    pub fn bad(field: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            field: Some(field.into()),
            message: message.into(),
        }
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            field: None,
            message: message.into(),
        }
    }

    pub fn internal(e: impl std::fmt::Display) -> ApiError {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            field: None,
            message: e.to_string(),
        }
    }
}

impl From<crate::suppress::transfer::FieldError> for ApiError {
    fn from(e: crate::suppress::transfer::FieldError) -> ApiError {
        ApiError::bad(e.field, e.message)
    }
}

impl ApiError {
    /// A body that did not deserialize: name the field serde names, else `body`.
    pub fn from_serde(e: &serde_json::Error, prefix: &str) -> ApiError {
        let msg = e.to_string();
        let field = crate::suppress::transfer::unknown_field(&msg).unwrap_or_else(|| "body".into());
        ApiError::bad(format!("{prefix}{field}"), msg)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": self.message, "field": self.field});
        json(self.status, &body)
    }
}

pub fn json(status: StatusCode, v: &impl serde::Serialize) -> Response {
    let mut body = serde_json::to_vec(v).expect("serializable");
    body.push(b'\n');
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// The router; exposed for tests.
pub fn router(state: Arc<AdminState>) -> Router {
    let api = Router::new()
        .route("/suppressions", get(suppressions::list).post(suppressions::add))
        .route("/suppressions/import", post(suppressions::import))
        .route("/suppressions/export", get(suppressions::export))
        .route(
            "/suppressions/{address}",
            get(suppressions::show).delete(suppressions::remove),
        )
        .route("/complaints", post(feedback::complaint))
        .route("/unsubscribes", post(feedback::unsubscribe))
        .route("/policy", get(policy::show))
        .route("/policy/reload", post(policy::reload))
        .route("/queues", get(policy::queues))
        .route("/queue/retry", post(policy::retry))
        .route("/suspend", post(policy::suspend))
        .route("/resume", post(policy::resume))
        .route("/breakers/reset", post(policy::reset_breaker))
        .route("/preflight", post(policy::preflight))
        .route("/messages", get(messages::search))
        .route("/messages/{id}", get(messages::show))
        .route("/webhooks", get(webhooks::list))
        .route("/domains", get(domains::list))
        .route("/drain", get(drain_status).post(drain))
        .route("/cluster", get(cluster_status))
        .layer(middleware::from_fn_with_state(Arc::clone(&state), require_token));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route(
            "/api/v1/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }),
        )
        .nest("/api/v1", api)
        .merge(dashboard::routes())
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .with_state(state)
}

/// `GET /metrics`: OpenMetrics text. Needs the bearer token unless
/// `admin.public_metrics`.
/// `GET /readyz`: 200 `ready` when the node can take mail (`ready,
/// degraded: ...` on local state while Redis is away); 503 with one reason
/// per line otherwise (draining, spool not writable, not yet synchronized
/// with the fleet).
async fn readyz(State(state): State<Arc<AdminState>>) -> Response {
    let Some(h) = &state.health else {
        return (StatusCode::OK, "ready\n").into_response();
    };
    match h.ready().await {
        Ok(()) if h.degraded() => (
            StatusCode::OK,
            "ready, degraded: cluster backend unavailable (fair-share limits, local suppression replica)\n",
        )
            .into_response(),
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready\n{}\n", why.join("\n")),
        )
            .into_response(),
    }
}

fn health(state: &AdminState) -> Result<&Arc<crate::health::Health>, ApiError> {
    state.health.as_ref().ok_or_else(|| ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        field: None,
        message: "no SMTP server on this admin listener".into(),
    })
}

/// `GET /api/v1/drain`: whether the node drains, and its open sessions.
async fn drain_status(State(state): State<Arc<AdminState>>) -> Result<Response, ApiError> {
    let h = health(&state)?;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"draining": h.draining(), "sessions": h.sessions()}),
    ))
}

/// `POST /api/v1/drain`: stop accepting SMTP connections (idle sessions get
/// 421 and close, transactions in flight finish) and report not ready;
/// delivery goes on. There is no undo: restart the node.
async fn drain(State(state): State<Arc<AdminState>>) -> Result<Response, ApiError> {
    let h = health(&state)?;
    if !h.draining() {
        tracing::warn!(sessions = h.sessions(), "drain requested: no new SMTP connections");
    }
    h.start_drain();
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"draining": true, "sessions": h.sessions()}),
    ))
}

/// `GET /api/v1/cluster`: the fleet backend's state as this node sees it.
async fn cluster_status(State(state): State<Arc<AdminState>>) -> Response {
    // How the shaper runs provider rates: `leased` from the fleet's GCRA,
    // `fair_share` of them while Redis is away, `local` alone.
    let shaping =
        state
            .policy
            .as_ref()
            .and_then(|p| p.queue.as_deref())
            .map(|q| match q.with_shaper(|s, _| s.fleet.mode()) {
                crate::rate::fleet::Mode::Local => "local",
                crate::rate::fleet::Mode::Leased { .. } => "leased",
                crate::rate::fleet::Mode::FairShare { .. } => "fair_share",
            });
    let body = match &state.cluster {
        None => serde_json::json!({"backend": "embedded", "shaping": shaping}),
        Some(c) => serde_json::json!({
            "backend": "redis",
            "node": c.node_id(),
            "connected": c.is_up(),
            "live_nodes": c.live_nodes(),
            "degraded": !c.is_up(),
            "shaping": shaping,
        }),
    };
    json(StatusCode::OK, &body)
}

async fn metrics(State(state): State<Arc<AdminState>>, headers: HeaderMap) -> Response {
    if !state.admin().public_metrics && !token_ok(&state, &headers) {
        return unauthorized();
    }
    let Some(m) = &state.metrics else {
        return ApiError::not_found("no metrics registry").into_response();
    };
    let policy = state.policy.as_ref();
    let text = m.render(&crate::metrics::Sources {
        queue: policy.and_then(|p| p.queue.as_deref()),
        breakers: policy.map(|p| &*p.breakers),
        dns: state.dns.as_deref(),
        webhooks: state.webhooks.as_deref(),
        cluster: state.cluster.as_deref(),
        health: state.health.as_deref(),
    });
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response()
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_token(State(state): State<Arc<AdminState>>, req: Request, next: Next) -> Response {
    if !token_ok(&state, req.headers()) {
        return unauthorized();
    }
    next.run(req).await
}

fn token_ok(state: &AdminState, headers: &HeaderMap) -> bool {
    let want = state.admin().token.as_bytes();
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| ct_eq(t.trim().as_bytes(), want))
}

fn unauthorized() -> Response {
    let mut r = ApiError {
        status: StatusCode::UNAUTHORIZED,
        field: Some("Authorization".into()),
        message: "missing or wrong bearer token".into(),
    }
    .into_response();
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"sendguard\""),
    );
    r
}

/// Read a request body of at most `admin.max_body_bytes`.
async fn body_bytes(state: &AdminState, body: axum::body::Body) -> Result<axum::body::Bytes, ApiError> {
    let max = state.admin().max_body_bytes;
    axum::body::to_bytes(body, max)
        .await
        .map_err(|_| ApiError::bad("body", format!("larger than admin.max_body_bytes ({max} bytes)")))
}

fn content_type(h: &HeaderMap) -> String {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
        .unwrap_or_default()
}

/// Serve the API on an already-bound listener until `shutdown`.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, shutdown: CancellationToken) -> std::io::Result<()> {
    info!(addr = %listener.local_addr()?, "admin API listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

#[cfg(test)]
mod tests {
    #[test]
    fn constant_time_compare() {
        assert!(super::ct_eq(b"abc", b"abc"));
        assert!(!super::ct_eq(b"abc", b"abd"));
        assert!(!super::ct_eq(b"abc", b"abcd"));
    }

    #[test]
    fn openapi_lists_every_route() {
        let doc: serde_json::Value = serde_json::from_str(super::OPENAPI).expect("openapi.json parses");
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        let paths = doc["paths"].as_object().unwrap();
        for (p, methods) in [
            ("/api/v1/suppressions", &["get", "post"][..]),
            ("/api/v1/suppressions/import", &["post"]),
            ("/api/v1/suppressions/export", &["get"]),
            ("/api/v1/suppressions/{address}", &["get", "delete"]),
            ("/api/v1/complaints", &["post"]),
            ("/api/v1/unsubscribes", &["post"]),
            ("/api/v1/openapi.json", &["get"]),
            ("/healthz", &["get"]),
            ("/readyz", &["get"]),
            ("/api/v1/drain", &["get", "post"]),
            ("/api/v1/cluster", &["get"]),
        ] {
            for m in methods {
                assert!(
                    paths.get(p).and_then(|x| x.get(*m)).is_some(),
                    "{m} {p} missing from openapi.json"
                );
            }
        }
    }
}
