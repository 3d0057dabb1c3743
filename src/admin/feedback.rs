//! `/api/v1/complaints` and `/api/v1/unsubscribes`: feedback from
//! recipients. A complaint arrives as an ARF report (RFC 5965, as mailbox
//! providers' feedback loops send it) or as JSON; an unsubscribe as JSON.
//! Both suppress the recipient and are recorded as events (with the sender
//! domain they count against, for complaint-rate accounting).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Deserialize;

use super::{AdminState, ApiError, body_bytes, content_type, json};
use crate::events::{Event, EventKind};
use crate::suppress::transfer::{MAX_SOURCE, View, clean_source};
use crate::suppress::{Entry, Reason, normalize, now_ms};

/// The JSON form of a complaint or unsubscribe.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FeedbackInput {
    address: Option<String>,
    /// Suppress for this tenant only; default: the tenant that may send
    /// from `sender_domain`, else every tenant.
    #[serde(default)]
    tenant: Option<String>,
    /// The domain the complaint counts against.
    #[serde(default)]
    sender_domain: Option<String>,
    #[serde(default)]
    source: Option<String>,
}

struct Feedback {
    address: String,
    tenant: Option<String>,
    sender_domain: Option<String>,
    source: String,
}

fn parse_json(state: &AdminState, bytes: &[u8]) -> Result<Feedback, ApiError> {
    let v: FeedbackInput = serde_json::from_slice(bytes).map_err(|e| ApiError::from_serde(&e, ""))?;
    let raw = v.address.ok_or_else(|| ApiError::bad("address", "is required"))?;
    let address = normalize(&raw).map_err(|m| ApiError::bad("address", format!("{raw:?}: {m}")))?;
    let sender_domain = match v.sender_domain.filter(|d| !d.is_empty()) {
        Some(d) => Some(
            crate::dns::ascii_domain(&d)
                .ok_or_else(|| ApiError::bad("sender_domain", format!("{d:?} is not a domain name")))?,
        ),
        None => None,
    };
    let tenant = match v.tenant.filter(|t| !t.is_empty()) {
        Some(t) if !state.tenant_known(&t) => return Err(ApiError::bad("tenant", format!("no tenant named {t:?}"))),
        Some(t) => Some(t),
        None => sender_domain.as_deref().and_then(|d| tenant_for(state, d)),
    };
    Ok(Feedback {
        address,
        tenant,
        sender_domain,
        source: v.source.unwrap_or_else(|| "admin api".into()),
    })
}

/// The first tenant allowed to send from `domain`.
fn tenant_for(state: &AdminState, domain: &str) -> Option<String> {
    let probe = crate::smtp::Mailbox {
        local: "postmaster".into(),
        domain: domain.to_string(),
    };
    state
        .cfg
        .tenants
        .iter()
        .find(|t| crate::server::session::sender_permitted(t, &probe))
        .map(|t| t.name.clone())
}

async fn record(state: &AdminState, fb: Feedback, reason: Reason, kind: EventKind) -> Result<Response, ApiError> {
    let store = state.store()?;
    let source = clean_source(&fb.source, MAX_SOURCE);
    let entry = Entry {
        address: fb.address.clone(),
        tenant: fb.tenant.clone(),
        reason,
        source,
        created_ms: now_ms(),
        expires_ms: None,
    };
    let view = View::from(&entry);
    let new = store.add(vec![entry]).await.map_err(ApiError::internal)? > 0;
    tracing::info!(rcpt = %fb.address, reason = reason.as_str(), tenant = fb.tenant.as_deref().unwrap_or("-"), new, "recipient feedback recorded");
    // A complaint counts against the sender domain's and the tenant's
    // circuit breakers (complaint rate), once per recipient: a report sent
    // again (feedback loops repeat them; anyone can replay one) would
    // otherwise open a breaker on its own.
    if kind == EventKind::Complaint
        && new
        && let Some(p) = &state.policy
    {
        let tenant = fb
            .tenant
            .clone()
            .or_else(|| fb.sender_domain.as_deref().and_then(|d| tenant_for(state, d)));
        let ts = p.breakers.record(
            crate::throttle::now_ns(),
            tenant.as_deref().unwrap_or(""),
            fb.sender_domain.as_deref(),
            crate::rate::breaker::Signal::Complaint,
        );
        p.breaker_changed(ts).await;
    }
    let mut ev = Event::new(kind);
    ev.rcpt = Some(fb.address);
    ev.tenant = fb.tenant;
    ev.sender_domain = fb.sender_domain;
    ev.reason = Some(reason.as_str().into());
    state.events.emit(ev).await;
    Ok(json(
        StatusCode::CREATED,
        &serde_json::json!({"suppressed": true, "new": new, "entry": view}),
    ))
}

/// `POST /api/v1/complaints`: an ARF report (`message/rfc822`,
/// `multipart/report`) or JSON `{"address", "tenant"?, "sender_domain"?, "source"?}`.
pub async fn complaint(
    State(state): State<Arc<AdminState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    state.store()?;
    let bytes = body_bytes(&state, body).await?;
    let ctype = content_type(&headers);
    let fb = if ctype == "application/json" {
        parse_json(&state, &bytes)?
    } else if matches!(
        ctype.as_str(),
        "message/rfc822" | "multipart/report" | "message/feedback-report" | "text/plain"
    ) {
        let report = crate::suppress::arf::parse(&bytes).map_err(|e| ApiError::bad(e.field, e.message))?;
        if !report.is_complaint() {
            return Ok(json(
                StatusCode::OK,
                &serde_json::json!({"suppressed": false, "why": format!("feedback type {:?} is not a complaint", report.feedback_type)}),
            ));
        }
        let raw = report.recipient.clone().unwrap_or_default();
        let address = normalize(&raw).map_err(|m| ApiError::bad("Original-Rcpt-To", format!("{raw:?}: {m}")))?;
        let tenant = report.sender_domain.as_deref().and_then(|d| tenant_for(&state, d));
        let mut source = format!("ARF feedback-type={}", report.feedback_type);
        if let Some(ua) = &report.user_agent {
            source.push_str(&format!(" user-agent={ua}"));
        }
        if let Some(id) = &report.original_message_id {
            source.push_str(&format!(" message-id={id}"));
        }
        Feedback {
            address,
            tenant,
            sender_domain: report.sender_domain.clone(),
            source,
        }
    } else {
        return Err(ApiError::bad(
            "Content-Type",
            format!("{ctype:?}: application/json, or an ARF report as message/rfc822 or multipart/report"),
        ));
    };
    record(&state, fb, Reason::Complaint, EventKind::Complaint).await
}

/// `POST /api/v1/unsubscribes`: JSON `{"address", "tenant"?, "sender_domain"?, "source"?}`.
pub async fn unsubscribe(
    State(state): State<Arc<AdminState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    state.store()?;
    let ctype = content_type(&headers);
    if ctype != "application/json" {
        return Err(ApiError::bad(
            "Content-Type",
            format!("{ctype:?}: application/json expected"),
        ));
    }
    let bytes = body_bytes(&state, body).await?;
    let fb = parse_json(&state, &bytes)?;
    record(&state, fb, Reason::Unsubscribe, EventKind::Unsubscribe).await
}
