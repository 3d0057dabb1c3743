//! Rate policy in the admin API: the effective policy, queues per provider
//! (depth, rate, state), holds and slow-downs; suspend, resume, retry now
//! and reload; and preflight, which tells an agent what would happen to a
//! message now without sending it or charging any budget.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{AdminState, ApiError, json};
use crate::pipeline::PolicyHandle;
use crate::smtp::Reply;
use crate::throttle::{NS_PER_MS, now_ns};

impl AdminState {
    fn policy(&self) -> Result<&PolicyHandle, ApiError> {
        self.policy.as_ref().ok_or_else(|| ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            field: None,
            message: "no delivery pipeline: configure [spool] and [relay]".into(),
        })
    }

    fn queue(&self) -> Result<&Arc<crate::queue::Queue>, ApiError> {
        self.policy()?.queue.as_ref().ok_or_else(|| ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            field: None,
            message: "no delivery queue: configure [spool] and [relay]".into(),
        })
    }
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::from_serde(&e, ""))
}

fn ms_rfc3339(ms: u64) -> String {
    crate::events::rfc3339(std::time::UNIX_EPOCH + Duration::from_millis(ms))
}

/// `GET /api/v1/policy`: the policy in force (after the last reload).
pub async fn show(State(st): State<Arc<AdminState>>) -> Result<Response, ApiError> {
    let h = st.policy()?;
    let shaping = match &h.queue {
        Some(q) => q.shaping_policy(),
        None => Arc::new(crate::rate::policy::ShapingPolicy::default()),
    };
    let limits = |l: &crate::rate::policy::ProviderLimits| {
        json!({
            "rate": l.rate.map(|r| r.rate.to_string()),
            "burst": l.rate.map(|r| r.burst),
            "max_concurrency": l.max_concurrency,
            "sender_rate": l.sender_rate.map(|r| r.rate.to_string()),
            "sender_burst": l.sender_rate.map(|r| r.burst),
        })
    };
    let mut providers: Vec<(&String, Value)> = shaping.providers.iter().map(|(k, v)| (k, limits(v))).collect();
    providers.sort_by(|a, b| a.0.cmp(b.0));
    let backoff: Vec<Value> = shaping
        .backoff
        .iter()
        .map(|r| {
            json!({
                "name": r.name,
                "provider": r.provider,
                "category": r.category,
                "match": r.pattern.as_ref().map(|p| p.as_str()),
                "action": r.action,
                "factor": (r.action == crate::rate::policy::Action::Slow).then_some(r.factor),
                "duration": humantime::format_duration(r.duration).to_string(),
                "recover": humantime::format_duration(r.recover).to_string(),
            })
        })
        .collect();
    let (budgets, warmups) = (h.budgets.budget_policy(), h.budgets.warmup_status(now_ns()));
    let budgets: Vec<Value> = budgets
        .rules
        .iter()
        .map(|b| {
            json!({
                "scope": b.scope,
                "match": b.key,
                "messages": b.messages.iter().map(|l| l.rate.to_string()).collect::<Vec<_>>(),
                "recipients": b.recipients.iter().map(|l| l.rate.to_string()).collect::<Vec<_>>(),
            })
        })
        .collect();
    let body = json!({
        "shaping": {
            "providers": providers.into_iter().map(|(k, v)| (k.clone(), v)).collect::<serde_json::Map<_, _>>(),
            "default": limits(&shaping.default),
            "relay_rate": shaping.relay.map(|r| r.rate.to_string()),
            "relay_burst": shaping.relay.map(|r| r.burst),
            "backoff_base_rate": shaping.backoff_base.rate.to_string(),
            "backoff": backoff,
        },
        "budgets": budgets,
        "warmup": warmups,
        "breakers": h.breakers.view(now_ns()),
    });
    Ok(json(StatusCode::OK, &body))
}

/// `GET /api/v1/queues`: per provider, jobs ready (waiting for shaping) and
/// scheduled (waiting for a retry), in flight, limits and slowed or
/// suspended sender domains; holds and a delivery pause.
pub async fn queues(State(st): State<Arc<AdminState>>) -> Result<Response, ApiError> {
    let q = st.queue()?;
    let view = q.shaping();
    let mut scheduled = q.scheduled_by_provider();
    let mut providers: Vec<Value> = view
        .providers
        .iter()
        .map(|p| {
            let sched = scheduled.remove(&p.provider).unwrap_or(0);
            let state = if view.paused.is_some() || view.provider_holds.iter().any(|(k, _)| *k == p.provider) {
                "suspended"
            } else if p.pairs.iter().any(|x| x.suspended_until_ms.is_some()) {
                "partly_suspended"
            } else if !p.pairs.is_empty() {
                "slowed"
            } else {
                "flowing"
            };
            json!({
                "provider": p.provider,
                "state": state,
                "ready": p.ready,
                "scheduled": sched,
                "in_flight": p.in_flight,
                "sent_last_minute": p.sent_last_minute,
                "rate": p.rate,
                "max_concurrency": p.max_concurrency,
                "sender_rate": p.sender_rate,
                "pairs": p.pairs,
            })
        })
        .collect();
    for (provider, sched) in scheduled {
        providers.push(json!({
            "provider": provider, "state": "flowing", "ready": 0, "scheduled": sched, "in_flight": 0, "pairs": [],
        }));
    }
    providers.sort_by(|a, b| a["provider"].as_str().cmp(&b["provider"].as_str()));
    let (ready, sched) = q.depth();
    let holds = |v: &[(String, crate::rate::shaper::Hold)]| {
        v.iter()
            .map(|(k, h)| json!({"key": k, "until": ms_rfc3339(h.until_ms), "reason": h.reason}))
            .collect::<Vec<_>>()
    };
    let body = json!({
        "messages": q.len(),
        "ready": ready,
        "scheduled": sched,
        "paused": view.paused.as_ref().map(|h| json!({"until": ms_rfc3339(h.until_ms), "reason": h.reason})),
        "providers": providers,
        "provider_holds": holds(&view.provider_holds),
        "tenant_holds": holds(&view.tenant_holds),
        "sender_holds": holds(&view.sender_holds),
    });
    Ok(json(StatusCode::OK, &body))
}

/// What an operator suspends or resumes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HoldRequest {
    /// `delivery` (everything), `provider`, `pair` (provider + sender
    /// domain), `sender_domain` or `tenant`.
    pub scope: String,
    pub provider: Option<String>,
    pub sender_domain: Option<String>,
    pub tenant: Option<String>,
    /// How long (humantime, e.g. `2h`); default 1 h. Suspend only.
    #[serde(rename = "for")]
    pub duration: Option<String>,
    pub reason: Option<String>,
}

fn field<'a>(v: &'a Option<String>, name: &str) -> Result<&'a str, ApiError> {
    v.as_deref()
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| ApiError::bad(name, format!("required for this scope: {name}")))
}

/// Apply (or lift, when `until` is 0) a hold here and, in a fleet, on
/// every node; returns its description.
fn apply_hold(st: &AdminState, req: &HoldRequest, until: u64, reason: &str) -> Result<Value, ApiError> {
    let h = st.policy()?;
    st.queue()?;
    match req.scope.as_str() {
        "delivery" => {}
        "provider" => {
            field(&req.provider, "provider")?;
        }
        "pair" => {
            field(&req.provider, "provider")?;
            field(&req.sender_domain, "sender_domain")?;
        }
        "sender_domain" => {
            field(&req.sender_domain, "sender_domain")?;
        }
        "tenant" => {
            let t = field(&req.tenant, "tenant")?;
            if !st.tenant_known(t) {
                return Err(ApiError::bad("tenant", format!("unknown tenant {t:?}")));
            }
        }
        other => {
            return Err(ApiError::bad(
                "scope",
                format!("unknown scope {other:?} (delivery, provider, pair, sender_domain, tenant)"),
            ));
        }
    }
    let change = crate::cluster::state::HoldChange {
        scope: req.scope.clone(),
        provider: req.provider.clone(),
        sender_domain: req.sender_domain.clone(),
        tenant: req.tenant.clone(),
        until,
        reason: reason.to_string(),
    };
    let key = h.hold(&change).map_err(ApiError::internal)?;
    h.tell_fleet(crate::cluster::state::Change::Hold(change));
    Ok(json!({"scope": req.scope, "key": key, "until": (until > 0).then(|| ms_rfc3339(until / NS_PER_MS))}))
}

/// `POST /api/v1/suspend`: hold mail for a while; queued mail stays queued.
pub async fn suspend(State(st): State<Arc<AdminState>>, body: Bytes) -> Result<Response, ApiError> {
    let req: HoldRequest = parse(&body)?;
    let d = match &req.duration {
        Some(s) => {
            humantime::parse_duration(s).map_err(|e| ApiError::bad("for", format!("{s:?} is not a duration: {e}")))?
        }
        None => Duration::from_secs(3600),
    };
    if d.is_zero() {
        return Err(ApiError::bad("for", "must be longer than zero"));
    }
    let reason = req.reason.clone().unwrap_or_else(|| "operator".into());
    if d > Duration::from_secs(366 * 86_400) {
        return Err(ApiError::bad("for", "at most 366 days"));
    }
    let until = now_ns().saturating_add(d.as_nanos() as u64);
    let out = apply_hold(&st, &req, until, &format!("suspended by an operator: {reason}"))?;
    tracing::info!(scope = %req.scope, until = %out["until"], reason = %reason, "operator suspension");
    Ok(json(StatusCode::OK, &out))
}

/// `POST /api/v1/resume`: lift a hold, a suspension or a slow-down.
pub async fn resume(State(st): State<Arc<AdminState>>, body: Bytes) -> Result<Response, ApiError> {
    let req: HoldRequest = parse(&body)?;
    if req.duration.is_some() {
        return Err(ApiError::bad("for", "only for /suspend"));
    }
    let out = apply_hold(&st, &req, 0, "")?;
    tracing::info!(scope = %req.scope, "operator resume");
    Ok(json(StatusCode::OK, &out))
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RetryRequest {
    pub provider: Option<String>,
    pub tenant: Option<String>,
}

/// `POST /api/v1/queue/retry`: deferred mail (optionally of one provider or
/// tenant) is tried now instead of at its retry time (shaping still applies).
pub async fn retry(State(st): State<Arc<AdminState>>, body: Bytes) -> Result<Response, ApiError> {
    let req: RetryRequest = if body.is_empty() {
        RetryRequest::default()
    } else {
        parse(&body)?
    };
    let n = st.queue()?.retry_now(req.provider.as_deref(), req.tenant.as_deref());
    tracing::info!(jobs = n, "operator: retry now");
    Ok(json(StatusCode::OK, &json!({"retried": n})))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerRequest {
    /// `tenant` or `sender_domain`.
    pub scope: String,
    pub key: String,
}

/// `POST /api/v1/breakers/reset`: close a breaker (its figures start over)
/// and release the mail it held.
pub async fn reset_breaker(State(st): State<Arc<AdminState>>, body: Bytes) -> Result<Response, ApiError> {
    let req: BreakerRequest = parse(&body)?;
    let h = st.policy()?;
    let scope = match req.scope.as_str() {
        "tenant" => crate::rate::breaker::BreakerScope::Tenant,
        "sender_domain" => crate::rate::breaker::BreakerScope::SenderDomain,
        other => {
            return Err(ApiError::bad(
                "scope",
                format!("unknown scope {other:?} (tenant, sender_domain)"),
            ));
        }
    };
    if !h.reset_breaker(scope, &req.key).await {
        return Err(ApiError::not_found(format!(
            "no breaker for {} {:?}",
            req.scope, req.key
        )));
    }
    tracing::info!(scope = %req.scope, key = %req.key, "operator: breaker reset");
    Ok(json(
        StatusCode::OK,
        &json!({"scope": req.scope, "key": req.key, "state": "closed"}),
    ))
}

/// `POST /api/v1/policy/reload`: read the config file again and apply its
/// rate policy (as SIGHUP does).
pub async fn reload(State(st): State<Arc<AdminState>>) -> Result<Response, ApiError> {
    let h = st.policy()?.clone();
    let Some(path) = st.config_path.clone() else {
        return Err(ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            field: None,
            message: "no config file to reload from".into(),
        });
    };
    let cfg = tokio::task::spawn_blocking(move || crate::config::Config::load(&path))
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| ApiError::bad(e.key.clone(), e.message))?;
    h.reload(&cfg).map_err(|e| ApiError::bad(e.key.clone(), e.message))?;
    h.tell_fleet(crate::cluster::state::Change::Reload);
    tracing::info!("rate policy reloaded through the admin API");
    Ok(json(StatusCode::OK, &json!({"reloaded": true})))
}

/// `POST /api/v1/preflight` input.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreflightRequest {
    pub tenant: String,
    /// The SMTP AUTH username the agent submits with, if any.
    pub credential: Option<String>,
    /// The envelope sender; `""` for `<>`.
    pub sender: String,
    pub recipients: Vec<String>,
    /// The message's header block, if the agent has it (enables the
    /// guard's From/DKIM alignment check).
    pub headers: Option<String>,
}

fn verdict(reply: Option<&Reply>) -> Value {
    match reply {
        None => json!({"verdict": "accept"}),
        Some(r) => json!({
            "verdict": if r.code >= 500 { "reject" } else { "tempfail" },
            "code": r.code,
            "enhanced": r.enhanced.map(|e| e.to_string()),
            "text": r.lines.join(" "),
            "token": r.token,
            "reply": r.to_wire().trim_end(),
        }),
    }
}

/// `POST /api/v1/preflight`: what would happen to this message now, per
/// recipient, in the order a submission meets the checks (sender rights,
/// breakers, guard, suppression, budgets and warm-up, runaway). Nothing is
/// sent, stored or charged.
pub async fn preflight(State(st): State<Arc<AdminState>>, body: Bytes) -> Result<Response, ApiError> {
    let req: PreflightRequest = parse(&body)?;
    let tenant = st
        .cfg
        .tenants
        .iter()
        .find(|t| t.name == req.tenant)
        .ok_or_else(|| ApiError::bad("tenant", format!("unknown tenant {:?}", req.tenant)))?;
    if let Some(c) = &req.credential
        && !tenant.users.iter().any(|u| &u.username == c)
    {
        return Err(ApiError::bad(
            "credential",
            format!("no user {c:?} in tenant {:?}", tenant.name),
        ));
    }
    if req.recipients.is_empty() {
        return Err(ApiError::bad("recipients", "at least one recipient"));
    }
    let from = match req.sender.as_str() {
        "" => None,
        s => Some(
            crate::smtp::address::parse_mailbox(s.trim_start_matches('<').trim_end_matches('>'))
                .map_err(|e| ApiError::bad("sender", format!("{s:?} is not an address: {e:?}")))?,
        ),
    };
    let mut rcpts = Vec::with_capacity(req.recipients.len());
    for (i, r) in req.recipients.iter().enumerate() {
        rcpts.push(
            crate::smtp::address::parse_mailbox(r.trim_start_matches('<').trim_end_matches('>'))
                .map_err(|e| ApiError::bad(format!("recipients[{i}]"), format!("{r:?} is not an address: {e:?}")))?,
        );
    }
    let now = now_ns();
    let sender_domain = from.as_ref().map(|m| m.domain_lc());
    let mode = tenant.guard;
    let guard = st.guard.as_ref().filter(|_| mode != crate::config::GuardMode::Off);
    let enforce = |v: crate::guard::Verdict| -> Option<Reply> {
        let r = v.refusal()?.clone();
        (mode == crate::config::GuardMode::Enforce).then_some(r)
    };
    // The sender (what MAIL FROM would answer).
    let mut sender: Option<Reply> = match &from {
        Some(m) if !crate::server::session::sender_permitted(tenant, m) => Some(
            crate::server::replies::sender_not_permitted(&m.to_string(), &tenant.name),
        ),
        None if !tenant.allow_null_sender => Some(crate::server::replies::null_sender_not_permitted(&tenant.name)),
        _ => None,
    };
    if sender.is_none()
        && let Some(h) = &st.policy
        && let Err(open) = h.breakers.check(now, &tenant.name, sender_domain.as_deref())
    {
        sender = Some(open.reply());
    }
    if sender.is_none()
        && let (Some(g), Some(m)) = (guard, &from)
    {
        sender = enforce(g.mail_from(m).await);
    }
    // The content, if the headers were given.
    let mut content: Option<Reply> = None;
    if sender.is_none()
        && let (Some(g), Some(h)) = (guard, &req.headers)
    {
        let mut msg = h.replace("\r\n", "\n").replace('\n', "\r\n");
        if !msg.ends_with("\r\n") {
            msg.push_str("\r\n");
        }
        msg.push_str("\r\n");
        content = enforce(g.message(tenant, from.as_ref(), msg.as_bytes()).await);
    }
    let who = crate::rate::budget::Who {
        tenant: &tenant.name,
        credential: req.credential.as_deref(),
        sender_domain: sender_domain.as_deref(),
    };
    let mut out = Vec::with_capacity(rcpts.len());
    let mut first = true;
    for (raw, to) in req.recipients.iter().zip(&rcpts) {
        let mut reply: Option<Reply> = sender.clone();
        if reply.is_none()
            && let Some(store) = &st.suppress
            && let Ok(key) = crate::suppress::normalize_mailbox(to)
            && let Some(entry) = store.lookup(&tenant.name, &key)
        {
            reply = Some(crate::server::replies::suppressed(&entry));
        }
        if reply.is_none()
            && let Some(g) = guard
        {
            reply = enforce(g.rcpt(to).await);
        }
        if reply.is_none()
            && let Some(h) = &st.policy
        {
            if let Err(r) = h.runaway.check_recipient(now, &to.normalized()) {
                reply = Some(r.reply());
            } else if let Err(over) = h.budgets.peek_recipient(now, &who, first) {
                reply = Some(over.reply());
            }
        }
        if reply.is_none() {
            reply = content.clone();
            first = false;
        }
        let mut v = verdict(reply.as_ref());
        v["recipient"] = json!(raw);
        out.push(v);
    }
    let body = json!({
        "sender": verdict(sender.as_ref()),
        "recipients": out,
        "note": "each recipient is judged against the budgets as they stand now; several recipients may together exceed what one alone would not",
    });
    Ok(json(StatusCode::OK, &body))
}
