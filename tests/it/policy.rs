//! Circuit breakers, the runaway guard and the rate-policy admin API, end
//! to end: a real Postfix upstream that bounces chosen recipients, the
//! admin API over real HTTP, SMTP sessions for what a client sees.

use std::time::Duration;

use hyper::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::client::Client;
use crate::support::postfix::Postfix;
use crate::support::sink::Sink;
use crate::support::*;
use crate::suppression::{admin_section, api, bad, call};

const T: Duration = Duration::from_secs(20);

/// A Postfix access rule: every recipient at `bounce.test` is unknown.
pub(crate) const UNKNOWN_USER: &str = "bounce.test 550 5.1.1 Recipient address rejected: User unknown";
/// Breakers that open after 5 sends with a 20% bounce rate, for an hour.
pub(crate) const BREAKERS: &str = "[breakers]\nmin_sends = 5\nbounce_rate = 0.2\nwindow = \"1h\"\ncool_down = \"1h\"\n";

pub(crate) async fn mail_reply(addr: std::net::SocketAddr, from: &str) -> client::Resp {
    let (mut c, _) = Client::connect(addr).await;
    c.cmd("EHLO client.test").await;
    let r = c.cmd(&format!("MAIL FROM:<{from}>")).await;
    let _ = c.cmd("QUIT").await;
    r
}

pub(crate) async fn post(fwd: &Forwarder, path: &str, body: Value) -> (StatusCode, Value) {
    call(
        &api(fwd),
        Method::POST,
        path,
        Some("application/json"),
        &body.to_string(),
    )
    .await
}

pub(crate) async fn get(fwd: &Forwarder, path: &str) -> (StatusCode, Value) {
    call(&api(fwd), Method::GET, path, None, "").await
}

/// An operator resets the breakers of the standard tenant `local` and of
/// its sender domain `local.example`.
pub(crate) async fn reset_local_breakers(fwd: &Forwarder) {
    for (scope, key) in [("sender_domain", "local.example"), ("tenant", "local")] {
        let (s, v) = post(fwd, "/api/v1/breakers/reset", json!({"scope": scope, "key": key})).await;
        assert_eq!(s, StatusCode::OK, "{v:?}");
    }
}

/// MAIL from `from` is told to wait, with the figures of the breaker the
/// tests open (3 hard bounces in 5 sends); returns the reply.
pub(crate) async fn refused_by_breaker(addr: std::net::SocketAddr, from: &str) -> client::Resp {
    let r = mail_reply(addr, from).await;
    r.expect(451, "4.7.1").token("breaker_open");
    assert!(
        r.text().contains("bounce rate 60.0% > 20.0% over 5 sends"),
        "{}",
        r.text()
    );
    r
}

/// An operator lifts the suspension of `provider`.
async fn resume_provider(fwd: &Forwarder, provider: &str) {
    let (s, v) = post(
        fwd,
        "/api/v1/resume",
        json!({"scope": "provider", "provider": provider}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v:?}");
}

#[tokio::test]
async fn bounces_open_the_breaker_and_the_next_submission_gets_a_tempfail() {
    let sink = Sink::start(&[]);
    let pf = Postfix::start(sink.addr, &[UNKNOWN_USER]);
    let work = Workdir::new();
    let fwd = Forwarder::start(
        &work,
        &(forward_config(pf.addr, "", "") + BREAKERS + &admin_section("")),
    )
    .await;
    for i in 0..2 {
        submit(&fwd, &[&format!("ok{i}@ok.test")], "fine").await;
    }
    for i in 0..3 {
        submit(&fwd, &[&format!("gone{i}@bounce.test")], "bad list").await;
    }
    // 3 hard bounces in 5 sends: the sender domain's and the tenant's
    // breakers open.
    let open = fwd
        .wait_events(2, T, |e| e["event"] == "breaker" && e["action"] == "open")
        .await;
    let by_domain = open
        .iter()
        .find(|e| e["sender_domain"] == "local.example")
        .expect("domain breaker");
    assert_eq!(
        by_domain["reason"], "bounce rate 60.0% > 20.0% over 5 sends in the last 1h",
        "{by_domain:?}"
    );
    assert!(by_domain["until"].is_string());
    assert!(open.iter().any(|e| e["tenant"] == "local"), "{open:?}");
    // The next submission from it is told to wait, with the figures.
    refused_by_breaker(fwd.trusted(), "a@local.example").await;
    // The admin API shows it, with the window's figures.
    let (s, policy) = get(&fwd, "/api/v1/policy").await;
    assert_eq!(s, StatusCode::OK);
    let b = policy["breakers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["key"] == "local.example")
        .cloned()
        .expect("breaker listed");
    assert_eq!(b["state"], "open", "{b:?}");
    assert_eq!(b["hard_bounces"], 3, "{b:?}");
    // So do the metrics.
    let (s, body) = api(&fwd).call(Method::GET, "/metrics", None, Vec::new()).await.unwrap();
    assert_eq!(s, StatusCode::OK);
    let text = String::from_utf8(body).unwrap();
    for scope in ["sender_domain", "tenant"] {
        let line = format!("sendguard_breakers{{scope=\"{scope}\",state=\"open\"}} 1\n");
        assert!(text.contains(&line), "{line}{text}");
    }
    // An operator resets both: mail is accepted again.
    reset_local_breakers(&fwd).await;
    mail_reply(fwd.trusted(), "a@local.example").await.expect(250, "2.1.0");
    fwd.wait_events(2, T, |e| e["event"] == "breaker" && e["action"] == "closed")
        .await;
    let (s, _) = post(
        &fwd,
        "/api/v1/breakers/reset",
        json!({"scope": "tenant", "key": "nobody"}),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    bad(
        post(&fwd, "/api/v1/breakers/reset", json!({"scope": "planet", "key": "x"})).await,
        "scope",
    );
    fwd.stop().await;
}

/// A restart keeps what a breaker or an operator decided: an open breaker
/// still refuses, a suspension still holds its (recovered) mail; what was
/// reset or resumed before the restart stays lifted.
#[tokio::test]
async fn a_restart_keeps_open_breakers_and_suspensions() {
    let sink = Sink::start(&[]);
    let pf = Postfix::start(sink.addr, &[UNKNOWN_USER]);
    let work = Workdir::new();
    let config = forward_config(pf.addr, "", "") + BREAKERS + &admin_section("");
    let fwd = Forwarder::start(&work, &config).await;
    let suspend = |provider: &str, reason: &str| json!({"scope": "provider", "provider": provider, "for": "1h", "reason": reason});
    assert_eq!(
        post(&fwd, "/api/v1/suspend", suspend("google", "incident 42")).await.0,
        StatusCode::OK
    );
    assert_eq!(
        post(&fwd, "/api/v1/suspend", suspend("yahoo", "false alarm")).await.0,
        StatusCode::OK
    );
    resume_provider(&fwd, "yahoo").await;
    submit(&fwd, &["held@gmail.com"], "held").await;
    for i in 0..2 {
        submit(&fwd, &[&format!("ok{i}@ok.test")], "fine").await;
    }
    for i in 0..3 {
        submit(&fwd, &[&format!("gone{i}@bounce.test")], "bad list").await;
    }
    fwd.wait_events(2, T, |e| e["event"] == "breaker" && e["action"] == "open")
        .await;
    mail_reply(fwd.trusted(), "a@local.example").await.expect(451, "4.7.1");
    fwd.stop().await;

    let fwd = Forwarder::start(&work, &config).await;
    // Both breakers are open again, with their reason ...
    refused_by_breaker(fwd.trusted(), "a@local.example").await;
    let (_, p) = get(&fwd, "/api/v1/policy").await;
    let open: Vec<_> = p["breakers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["state"] == "open")
        .map(|b| b["key"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(open.len(), 2, "{p:#}");
    // ... the suspension holds the recovered message; the lifted one is not back.
    let (_, q) = get(&fwd, "/api/v1/queues").await;
    let holds = q["provider_holds"].as_array().unwrap();
    assert_eq!(holds.len(), 1, "{q:#}");
    assert_eq!(holds[0]["key"], "google", "{q:#}");
    assert!(holds[0]["reason"].as_str().unwrap().contains("incident 42"), "{q:#}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !sink
            .messages()
            .iter()
            .any(|m| m.rcpts.iter().any(|r| r == "held@gmail.com")),
        "the suspension was lifted by the restart"
    );
    // Lift everything; that outlives a restart too.
    reset_local_breakers(&fwd).await;
    resume_provider(&fwd, "google").await;
    fwd.wait_events(1, T, |e| e["event"] == "delivered" && e["rcpt"] == "held@gmail.com")
        .await;
    fwd.stop().await;

    let fwd = Forwarder::start(&work, &config).await;
    mail_reply(fwd.trusted(), "a@local.example").await.expect(250, "2.1.0");
    let (_, q) = get(&fwd, "/api/v1/queues").await;
    assert_eq!(q["provider_holds"].as_array().map_or(0, Vec::len), 0, "{q:#}");
    fwd.stop().await;
}

#[tokio::test]
async fn the_runaway_guard_stops_a_looping_agent() {
    let sink = Sink::start(&[]);
    let work = Workdir::new();
    let runaway =
        "[runaway]\nenabled = true\nsame_body_recipients = 3\nsame_body_window = \"1h\"\nrecipient_daily = 2\n";
    let fwd = Forwarder::start(&work, &(forward_config(sink.addr, "", "") + runaway)).await;
    // One recipient, mailed a third time today: refused at RCPT.
    for _ in 0..2 {
        submit(&fwd, &["same@dest.example"], "again").await;
    }
    let (mut c, _) = Client::connect(fwd.trusted()).await;
    c.cmd("EHLO client.test").await;
    c.cmd("MAIL FROM:<a@local.example>").await.expect(250, "2.1.0");
    let r = c.cmd("RCPT TO:<Same@dest.example>").await;
    r.expect(451, "4.7.1").token("runaway_recipient");
    let _ = c.cmd("QUIT").await;
    // The same body to a fourth distinct recipient within the hour: the
    // message is refused at the end of DATA.
    let body = "Subject: Hi\r\n\r\nThe very same text.\r\n";
    send_trusted(
        fwd.trusted(),
        "a@local.example",
        &["p1@dest.example", "p2@dest.example"],
        body,
    )
    .await
    .expect(250, "2.0.0");
    send_trusted(fwd.trusted(), "a@local.example", &["p3@dest.example"], body)
        .await
        .expect(250, "2.0.0");
    let r = send_trusted(
        fwd.trusted(),
        "a@local.example",
        &["p4@dest.example"],
        "Subject: Hi again\r\n\r\n  the VERY same   text.\r\n",
    )
    .await;
    r.expect(451, "4.7.1").token("runaway_same_body");
    // A different body goes.
    send_trusted(
        fwd.trusted(),
        "a@local.example",
        &["p4@dest.example"],
        "Subject: x\r\n\r\nother\r\n",
    )
    .await
    .expect(250, "2.0.0");
    fwd.stop().await;
}

#[tokio::test]
async fn admin_api_shows_policy_and_queues_and_suspends_resumes_retries() {
    let sink = Sink::start(&[]);
    let work = Workdir::new();
    let shaping = "[[shaping.provider]]\nname = \"google\"\nrate = \"300/min\"\nmax_concurrency = 4\n\
                   [[budget]]\nscope = \"tenant\"\nmessages = [\"100/min\"]\n";
    let text = forward_config(sink.addr, "", "").replace(
        "[shaping]\ngroup_by_mx = false\n",
        &format!("[shaping]\ngroup_by_mx = false\n{shaping}"),
    );
    let fwd = Forwarder::start(&work, &(text + &admin_section(""))).await;

    let (s, p) = get(&fwd, "/api/v1/policy").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(p["shaping"]["providers"]["google"]["rate"], "300/min", "{p:#}");
    assert_eq!(p["shaping"]["providers"]["google"]["max_concurrency"], 4);
    assert!(
        p["shaping"]["backoff"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "gmail_rate_limited"),
        "{p:#}"
    );
    assert_eq!(p["budgets"][0]["messages"][0], "100/min");

    // Suspend gmail.com (a listed domain: provider google without DNS).
    let (s, v) = post(
        &fwd,
        "/api/v1/suspend",
        json!({"scope": "provider", "provider": "google", "for": "1h", "reason": "incident 42"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v:?}");
    submit(&fwd, &["someone@gmail.com"], "held").await;
    submit(&fwd, &["someone@dest.example"], "flows").await;
    fwd.wait_events(1, T, |e| {
        e["event"] == "delivered" && e["rcpt"] == "someone@dest.example"
    })
    .await;
    let (_, q) = get(&fwd, "/api/v1/queues").await;
    let google = q["providers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["provider"] == "google")
        .cloned()
        .unwrap_or_else(|| panic!("{q:#}"));
    assert_eq!(google["state"], "suspended", "{q:#}");
    assert_eq!(google["ready"], 1, "{q:#}");
    let other = q["providers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["provider"] == "other")
        .cloned()
        .unwrap_or_else(|| panic!("{q:#}"));
    assert_eq!(other["sent_last_minute"], 1, "the message to dest.example went: {q:#}");
    assert!(
        q["provider_holds"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("incident 42")
    );
    resume_provider(&fwd, "google").await;
    fwd.wait_events(1, T, |e| e["event"] == "delivered" && e["rcpt"] == "someone@gmail.com")
        .await;

    // Every route is in the OpenAPI document.
    let (_, doc) = get(&fwd, "/api/v1/openapi.json").await;
    for path in [
        "/api/v1/policy",
        "/api/v1/policy/reload",
        "/api/v1/queues",
        "/api/v1/suspend",
        "/api/v1/resume",
        "/api/v1/queue/retry",
        "/api/v1/breakers/reset",
        "/api/v1/preflight",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} missing from openapi.json");
    }

    // One message to two providers is two jobs (two transactions); the
    // second waits for the first without spending anything, then goes.
    submit(&fwd, &["split1@gmail.com", "split2@dest.example"], "split").await;
    for rcpt in ["split1@gmail.com", "split2@dest.example"] {
        fwd.wait_events(1, T, |e| e["event"] == "delivered" && e["rcpt"] == rcpt)
            .await;
    }
    let split: Vec<_> = sink
        .wait_for(4, T)
        .await
        .into_iter()
        .filter(|m| m.rcpts.iter().any(|r| r.starts_with("split")))
        .map(|m| m.rcpts)
        .collect();
    assert_eq!(split.len(), 2, "{split:?}");

    // Retry now.
    let (s, v) = post(&fwd, "/api/v1/queue/retry", json!({})).await;
    assert_eq!((s, &v["retried"]), (StatusCode::OK, &json!(0)));

    // Bad input names the field and changes nothing.
    bad(post(&fwd, "/api/v1/suspend", json!({"scope": "galaxy"})).await, "scope");
    bad(
        post(&fwd, "/api/v1/suspend", json!({"scope": "provider"})).await,
        "provider",
    );
    bad(
        post(&fwd, "/api/v1/suspend", json!({"scope": "tenant", "tenant": "nobody"})).await,
        "tenant",
    );
    bad(
        post(&fwd, "/api/v1/suspend", json!({"scope": "delivery", "for": "soon"})).await,
        "for",
    );
    bad(
        post(&fwd, "/api/v1/suspend", json!({"scope": "delivery", "colour": 1})).await,
        "colour",
    );
    let (_, q) = get(&fwd, "/api/v1/queues").await;
    assert!(q["paused"].is_null(), "{q:#}");

    // Reload through the API: a broken file is refused with its key; a good
    // one changes the rate live.
    let path = work.path("sendguard.toml");
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, good.replace("rate = \"300/min\"", "rate = \"0/min\"")).unwrap();
    let (s, v) = post(&fwd, "/api/v1/policy/reload", json!({})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v:?}");
    assert!(v["field"].as_str().unwrap().starts_with("shaping"), "{v:?}");
    std::fs::write(&path, good.replace("rate = \"300/min\"", "rate = \"5/s\"")).unwrap();
    let (s, v) = post(&fwd, "/api/v1/policy/reload", json!({})).await;
    assert_eq!(s, StatusCode::OK, "{v:?}");
    let (_, p) = get(&fwd, "/api/v1/policy").await;
    assert_eq!(p["shaping"]["providers"]["google"]["rate"], "5/s");
    fwd.stop().await;
}

#[tokio::test]
async fn preflight_answers_per_recipient_without_charging() {
    let sink = Sink::start(&[]);
    let work = Workdir::new();
    let budget = "[[budget]]\nscope = \"tenant\"\nmatch = \"local\"\nrecipients = [\"1/h\"]\n";
    let fwd = Forwarder::start(
        &work,
        &(forward_config(sink.addr, "", "") + budget + &admin_section("")),
    )
    .await;
    let (s, _) = call(
        &api(&fwd),
        Method::POST,
        "/api/v1/suppressions",
        Some("application/json"),
        r#"{"address": "gone@dest.example", "reason": "hard_bounce"}"#,
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    let ask = json!({"tenant": "local", "sender": "a@local.example",
                     "recipients": ["ok@dest.example", "gone@dest.example"]});
    for _ in 0..3 {
        let (s, v) = post(&fwd, "/api/v1/preflight", ask.clone()).await;
        assert_eq!(s, StatusCode::OK, "{v:?}");
        assert_eq!(v["sender"]["verdict"], "accept");
        assert_eq!(v["recipients"][0]["recipient"], "ok@dest.example");
        assert_eq!(
            v["recipients"][0]["verdict"], "accept",
            "preflight must not charge: {v:#}"
        );
        let gone = &v["recipients"][1];
        assert_eq!(gone["verdict"], "reject");
        assert_eq!(
            (gone["code"].as_u64(), gone["enhanced"].as_str()),
            (Some(550), Some("5.7.1"))
        );
        assert_eq!(gone["token"], "suppressed");
    }
    // A sender the tenant may not use.
    let (_, v) = post(
        &fwd,
        "/api/v1/preflight",
        json!({"tenant": "local", "sender": "x@elsewhere.example", "recipients": ["ok@dest.example"]}),
    )
    .await;
    assert_eq!(v["sender"]["token"], "sender_not_permitted", "{v:#}");
    assert_eq!(v["recipients"][0]["verdict"], "reject");
    // Now use the budget for real: preflight says tempfail with the token.
    submit(&fwd, &["ok@dest.example"], "uses the budget").await;
    let (_, v) = post(&fwd, "/api/v1/preflight", ask).await;
    assert_eq!(v["recipients"][0]["verdict"], "tempfail", "{v:#}");
    assert_eq!(v["recipients"][0]["token"], "budget_exceeded");
    // Bad input.
    bad(
        post(
            &fwd,
            "/api/v1/preflight",
            json!({"tenant": "nobody", "sender": "", "recipients": ["a@b.example"]}),
        )
        .await,
        "tenant",
    );
    bad(
        post(
            &fwd,
            "/api/v1/preflight",
            json!({"tenant": "local", "sender": "a@local.example", "recipients": []}),
        )
        .await,
        "recipients",
    );
    bad(
        post(
            &fwd,
            "/api/v1/preflight",
            json!({"tenant": "local", "sender": "a@local.example", "recipients": ["not an address"]}),
        )
        .await,
        "recipients[0]",
    );
    fwd.stop().await;
}
