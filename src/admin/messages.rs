//! `/api/v1/messages`: the per-message trace (`/messages/{id}`) and search
//! by recipient, sender, Message-ID header, tenant and time range.
//!
//! Trust boundary: query parameters are untrusted; they only filter the
//! trace store's in-memory index (no path or file name is built from
//! them). Unknown parameters and bad values get `400` naming the field.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query as UrlQuery, State};
use axum::http::StatusCode;
use axum::response::Response;

use super::{AdminState, ApiError, json};
use crate::trace::{MAX_LIMIT, Query, TraceStore};

type Params = UrlQuery<HashMap<String, String>>;

const PARAMS: &[&str] = &["rcpt", "sender", "message_id", "tenant", "since", "until", "limit"];

fn store(st: &AdminState) -> Result<&Arc<TraceStore>, ApiError> {
    st.trace.as_ref().ok_or_else(|| ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        field: None,
        message: "no trace store: configure [spool] (or trace.dir) and leave trace.enabled on".into(),
    })
}

/// A time parameter: RFC 3339 (`2026-11-23T04:00:00Z`) or a duration ago
/// (`90m`, `2d`). Milliseconds since the epoch.
pub fn time_param(key: &str, v: &str, now_ms: u64) -> Result<u64, ApiError> {
    if let Ok(t) = humantime::parse_rfc3339_weak(v) {
        return Ok(t
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|_| ApiError::bad(key, "before 1970"))?
            .as_millis() as u64);
    }
    match humantime::parse_duration(v) {
        Ok(d) => Ok(now_ms.saturating_sub(d.as_millis() as u64)),
        Err(_) => Err(ApiError::bad(
            key,
            format!("{v:?} is neither an RFC 3339 time nor a duration ago such as 90m"),
        )),
    }
}

/// The search a request asks for.
pub fn query(p: &HashMap<String, String>, now_ms: u64) -> Result<Query, ApiError> {
    if let Some(k) = p.keys().find(|k| !PARAMS.contains(&k.as_str())) {
        return Err(ApiError::bad(
            k.as_str(),
            format!("unknown parameter (allowed: {})", PARAMS.join(", ")),
        ));
    }
    let text = |k: &str| p.get(k).map(|v| v.trim().to_string());
    let limit = match p.get("limit") {
        None => 100,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
            _ => return Err(ApiError::bad("limit", format!("{v:?}: a number from 1 to {MAX_LIMIT}"))),
        },
    };
    let since_ms = p.get("since").map(|v| time_param("since", v, now_ms)).transpose()?;
    let until_ms = p.get("until").map(|v| time_param("until", v, now_ms)).transpose()?;
    if let (Some(s), Some(u)) = (since_ms, until_ms)
        && s > u
    {
        return Err(ApiError::bad("until", "is before since"));
    }
    Ok(Query {
        rcpt: text("rcpt").filter(|v| !v.is_empty()),
        // An empty sender is the null sender `<>`.
        sender: text("sender"),
        header_message_id: text("message_id").filter(|v| !v.is_empty()),
        tenant: text("tenant").filter(|v| !v.is_empty()),
        since_ms,
        until_ms,
        limit,
    })
}

/// `GET /api/v1/messages?rcpt=&sender=&message_id=&tenant=&since=&until=&limit=`:
/// newest first.
pub async fn search(State(st): State<Arc<AdminState>>, UrlQuery(p): Params) -> Result<Response, ApiError> {
    let store = Arc::clone(store(&st)?);
    let q = query(&p, crate::queue::now_ms())?;
    let found = tokio::task::spawn_blocking(move || store.search(&q))
        .await
        .map_err(ApiError::internal)?;
    Ok(json(StatusCode::OK, &serde_json::json!({ "messages": found })))
}

/// `GET /api/v1/messages/{id}`: every event of the message (submission
/// with its checks, deliveries per recipient, DSNs), oldest first.
pub async fn show(State(st): State<Arc<AdminState>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let store = Arc::clone(store(&st)?);
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(ApiError::bad("id", "a message id is up to 64 letters and digits"));
    }
    let lookup = id.clone();
    match tokio::task::spawn_blocking(move || store.message(&lookup))
        .await
        .map_err(ApiError::internal)?
    {
        Some(t) => Ok(json(StatusCode::OK, &t)),
        None => Err(ApiError::not_found(format!(
            "no message {id} in the trace (unknown, or older than trace.retention)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn queries_and_their_errors() {
        let now = 1_800_000_000_000;
        let q = query(
            &params(&[("rcpt", " A@B.example "), ("since", "2h"), ("limit", "5")]),
            now,
        )
        .unwrap();
        assert_eq!(q.rcpt.as_deref(), Some("A@B.example"));
        assert_eq!(q.since_ms, Some(now - 7_200_000));
        assert_eq!(q.limit, 5);
        let q = query(&params(&[("until", "2026-11-23T04:00:00Z"), ("sender", "")]), now).unwrap();
        assert_eq!(q.until_ms, Some(1_795_406_400_000));
        assert_eq!(q.sender.as_deref(), Some(""), "empty sender is the null sender");
        for (kv, field) in [
            (("colour", "red"), "colour"),
            (("limit", "0"), "limit"),
            (("limit", "many"), "limit"),
            (("since", "yesterday-ish"), "since"),
        ] {
            let e = query(&params(&[kv]), now).unwrap_err();
            assert_eq!(e.field.as_deref(), Some(field));
        }
        let e = query(&params(&[("since", "1h"), ("until", "2h")]), now).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("until"));
    }
}
