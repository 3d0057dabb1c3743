//! `/api/v1/suppressions`: list, show, add, remove, import, export.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query as UrlQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::{AdminState, ApiError, body_bytes, content_type, json};
use crate::suppress::transfer::{self, CSV_HEADER, Input, View};
use crate::suppress::{Query, Reason, normalize, now_ms};

type Params = UrlQuery<HashMap<String, String>>;

/// Most entries one list page returns.
const MAX_PAGE: usize = 10_000;

fn number(p: &HashMap<String, String>, key: &str, default: usize) -> Result<usize, ApiError> {
    match p.get(key) {
        None => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|_| ApiError::bad(key, format!("{v:?} is not a non-negative integer"))),
    }
}

fn allowed(p: &HashMap<String, String>, keys: &[&str]) -> Result<(), ApiError> {
    match p.keys().find(|k| !keys.contains(&k.as_str())) {
        Some(k) => Err(ApiError::bad(
            k.as_str(),
            format!("unknown parameter (allowed: {})", keys.join(", ")),
        )),
        None => Ok(()),
    }
}

/// The filter parameters shared by list and export.
fn query(state: &AdminState, p: &HashMap<String, String>) -> Result<Query, ApiError> {
    let mut q = Query {
        contains: p
            .get("address")
            .map(|a| a.trim().to_lowercase())
            .filter(|a| !a.is_empty()),
        ..Default::default()
    };
    if let Some(t) = p.get("tenant").filter(|t| !t.is_empty()) {
        if !state.tenant_known(t) {
            return Err(ApiError::bad("tenant", format!("no tenant named {t:?}")));
        }
        q.tenant = Some(t.clone());
    }
    match p.get("scope").map(String::as_str) {
        None | Some("") | Some("any") => {}
        Some("global") => q.global_only = true,
        Some("tenant") if q.tenant.is_some() => {}
        Some("tenant") => return Err(ApiError::bad("scope", "scope=tenant needs tenant=NAME")),
        Some(s) => return Err(ApiError::bad("scope", format!("{s:?}: global, tenant or any"))),
    }
    if let Some(r) = p.get("reason").filter(|r| !r.is_empty()) {
        q.reason = Some(Reason::parse(r).ok_or_else(|| {
            ApiError::bad(
                "reason",
                format!("unknown reason {r:?} (hard_bounce, complaint, unsubscribe, manual)"),
            )
        })?);
    }
    Ok(q)
}

/// `GET /api/v1/suppressions?address=&tenant=&scope=&reason=&limit=&offset=`
pub async fn list(State(state): State<Arc<AdminState>>, UrlQuery(p): Params) -> Result<Response, ApiError> {
    allowed(&p, &["address", "tenant", "scope", "reason", "limit", "offset"])?;
    let store = state.store()?;
    let mut q = query(&state, &p)?;
    q.limit = number(&p, "limit", 100)?;
    if q.limit == 0 || q.limit > MAX_PAGE {
        return Err(ApiError::bad("limit", format!("must be 1..={MAX_PAGE}")));
    }
    q.offset = number(&p, "offset", 0)?;
    let entries: Vec<View> = store.list(&q).iter().map(View::from).collect();
    let next = (entries.len() == q.limit).then(|| q.offset.saturating_add(q.limit));
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"entries": entries, "count": entries.len(), "offset": q.offset, "next_offset": next, "total": store.len()}),
    ))
}

fn path_address(raw: &str) -> Result<String, ApiError> {
    normalize(raw).map_err(|m| ApiError::bad("address", format!("{raw:?}: {m}")))
}

fn scope_tenant(state: &AdminState, p: &HashMap<String, String>) -> Result<Option<String>, ApiError> {
    match p.get("tenant").filter(|t| !t.is_empty()) {
        Some(t) if !state.tenant_known(t) => Err(ApiError::bad("tenant", format!("no tenant named {t:?}"))),
        t => Ok(t.cloned()),
    }
}

/// `GET /api/v1/suppressions/{address}`: every live entry for the address.
pub async fn show(
    State(state): State<Arc<AdminState>>,
    Path(address): Path<String>,
    UrlQuery(p): Params,
) -> Result<Response, ApiError> {
    allowed(&p, &[])?;
    let store = state.store()?;
    let address = path_address(&address)?;
    let entries: Vec<View> = store
        .list(&Query {
            contains: Some(address.clone()),
            limit: usize::MAX,
            ..Default::default()
        })
        .iter()
        .filter(|e| e.address == address)
        .map(View::from)
        .collect();
    if entries.is_empty() {
        return Err(ApiError::not_found(format!("{address} is not suppressed")));
    }
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"address": address, "entries": entries}),
    ))
}

/// `DELETE /api/v1/suppressions/{address}?tenant=`: lifts the global entry,
/// or the tenant's with `tenant=`. Takes effect for the next RCPT.
pub async fn remove(
    State(state): State<Arc<AdminState>>,
    Path(address): Path<String>,
    UrlQuery(p): Params,
) -> Result<Response, ApiError> {
    allowed(&p, &["tenant"])?;
    let store = state.store()?;
    let address = path_address(&address)?;
    let tenant = scope_tenant(&state, &p)?;
    if !store
        .remove(address.clone(), tenant.clone())
        .await
        .map_err(|e| match e.kind() {
            // Fleet mode with Redis down: a removal here alone would be undone.
            std::io::ErrorKind::NotConnected => ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                field: None,
                message: format!("cannot remove while the cluster backend is unavailable ({e}); retry later"),
            },
            _ => ApiError::internal(e),
        })?
    {
        let scope = tenant
            .as_deref()
            .map(|t| format!("tenant {t}"))
            .unwrap_or("global scope".into());
        return Err(ApiError::not_found(format!("{address} is not suppressed in {scope}")));
    }
    tracing::info!(%address, tenant = tenant.as_deref().unwrap_or("-"), "suppression removed via admin API");
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"removed": true, "address": address, "tenant": tenant}),
    ))
}

/// Parse a JSON object or array of objects into inputs; errors name the field.
pub(super) fn inputs(body: &[u8]) -> Result<Vec<Input>, ApiError> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| ApiError::bad("body", format!("not JSON: {e}")))?;
    let (items, array) = match v {
        serde_json::Value::Array(a) => (a, true),
        o @ serde_json::Value::Object(_) => (vec![o], false),
        _ => return Err(ApiError::bad("body", "expected an object or an array of objects")),
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let prefix = if array { format!("[{i}].") } else { String::new() };
            serde_json::from_value::<Input>(item).map_err(|e| ApiError::from_serde(&e, &prefix))
        })
        .collect()
}

/// `POST /api/v1/suppressions`: one object or an array; all or nothing.
pub async fn add(State(state): State<Arc<AdminState>>, body: Body) -> Result<Response, ApiError> {
    let store = state.store()?;
    let bytes = body_bytes(&state, body).await?;
    let items = inputs(&bytes)?;
    let max = state.admin().max_import_entries;
    if items.len() > max {
        return Err(ApiError::bad(
            "entries",
            format!("more than {max} entries (admin.max_import_entries)"),
        ));
    }
    let array = items.len() != 1 || bytes.trim_ascii_start().starts_with(b"[");
    let now = now_ms();
    let known = |t: &str| state.tenant_known(t);
    let entries = items
        .into_iter()
        .enumerate()
        .map(|(i, inp)| {
            transfer::entry(inp, now, &known).map_err(|e| {
                let field = if array { format!("[{i}].{}", e.field) } else { e.field };
                ApiError::bad(field, e.message)
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let views: Vec<View> = entries.iter().map(View::from).collect();
    let new = store.add(entries).await.map_err(ApiError::internal)?;
    Ok(json(
        StatusCode::CREATED,
        &serde_json::json!({"added": new, "entries": views}),
    ))
}

fn format_of(p: &HashMap<String, String>, headers: Option<&HeaderMap>) -> Result<&'static str, ApiError> {
    match p.get("format").map(String::as_str) {
        Some("csv") => Ok("csv"),
        Some("jsonl") | Some("ndjson") => Ok("jsonl"),
        Some(f) => Err(ApiError::bad("format", format!("{f:?}: csv or jsonl"))),
        None => Ok(match headers.map(content_type).as_deref() {
            Some("text/csv") => "csv",
            _ => "jsonl",
        }),
    }
}

/// `POST /api/v1/suppressions/import?format=csv|jsonl`: validated whole,
/// then stored as one batch: one bad line imports nothing.
pub async fn import(
    State(state): State<Arc<AdminState>>,
    UrlQuery(p): Params,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    allowed(&p, &["format"])?;
    let store = state.store()?;
    let format = format_of(&p, Some(&headers))?;
    let bytes = body_bytes(&state, body).await?;
    let text = std::str::from_utf8(&bytes).map_err(|e| ApiError::bad("body", format!("not UTF-8: {e}")))?;
    let known = |t: &str| state.tenant_known(t);
    let max = state.admin().max_import_entries;
    let now = now_ms();
    let entries = match format {
        "csv" => transfer::parse_csv(text, now, max, &known)?,
        _ => transfer::parse_jsonl(text, now, max, &known)?,
    };
    let n = entries.len();
    let new = store.add(entries).await.map_err(ApiError::internal)?;
    tracing::info!(entries = n, new, "suppressions imported via admin API");
    Ok(json(StatusCode::OK, &serde_json::json!({"imported": n, "new": new})))
}

/// `GET /api/v1/suppressions/export?format=csv|jsonl` (+ list filters).
pub async fn export(State(state): State<Arc<AdminState>>, UrlQuery(p): Params) -> Result<Response, ApiError> {
    allowed(&p, &["format", "address", "tenant", "scope", "reason"])?;
    let store = state.store()?;
    let format = format_of(&p, None)?;
    let mut q = query(&state, &p)?;
    q.limit = usize::MAX;
    let entries = store.list(&q);
    let (ctype, body) = if format == "csv" {
        let mut out = String::with_capacity(entries.len() * 100 + 64);
        out.push_str(CSV_HEADER);
        out.push_str("\r\n");
        for e in &entries {
            transfer::csv_row(e, &mut out);
        }
        ("text/csv; charset=utf-8", out)
    } else {
        let mut out = String::with_capacity(entries.len() * 160);
        for e in &entries {
            out.push_str(&serde_json::to_string(&View::from(e)).expect("serializable"));
            out.push('\n');
        }
        ("application/x-ndjson", out)
    };
    Ok(([(header::CONTENT_TYPE, ctype)], body).into_response())
}
