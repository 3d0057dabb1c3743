//! The message trace end to end: a real Postfix upstream that bounces one
//! recipient, the admin API over HTTP (`/api/v1/messages`), the real
//! `sendguard trace` binary, and a restart that rebuilds the index from
//! the trace files.

use std::time::Duration;

use hyper::{Method, StatusCode};
use serde_json::Value;

use crate::support::postfix::Postfix;
use crate::support::sink::Sink;
use crate::support::*;
use crate::suppression::{TOKEN, admin_section, api, bad, call};

const T: Duration = Duration::from_secs(30);

async fn get(fwd: &Forwarder, path: &str) -> (StatusCode, Value) {
    call(&api(fwd), Method::GET, path, None, "").await
}

/// Run `sendguard trace ARGS` (async: the admin API answers on this
/// test's runtime).
async fn cli(fwd: &Forwarder, args: &[&str]) -> (Option<i32>, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_sendguard"))
        .arg("trace")
        .args(args)
        .env("SENDGUARD_ADMIN_URL", format!("http://{}", fwd.admin.unwrap()))
        .env("SENDGUARD_ADMIN_TOKEN", TOKEN)
        .output()
        .await
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn check<'a>(checks: &'a Value, stage: &str, name: &str) -> &'a Value {
    checks
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["stage"] == stage && c["check"] == name)
        .unwrap_or_else(|| panic!("no {stage}/{name} check in {checks:#}"))
}

#[tokio::test]
async fn a_message_is_traced_from_submission_to_bounce_and_dsn_and_found_by_search() {
    let sink = Sink::start(&[]);
    let pf = Postfix::start(
        sink.addr,
        &["gone@bounce.test 550 5.1.1 <gone@bounce.test>: Recipient address rejected: User unknown"],
    );
    let work = Workdir::new();
    let cfg = forward_config(pf.addr, "", "") + &admin_section("");
    let fwd = Forwarder::start(&work, &cfg).await;
    let body = "From: a@local.example\r\nMessage-ID: <trace-1@app.example>\r\nSubject: t\r\n\r\nhello\r\n";
    let r = send_trusted(
        fwd.trusted(),
        "a@local.example",
        &["ok@dest.test", "GONE@bounce.test"],
        body,
    )
    .await;
    r.expect(250, "2.0.0");
    let id = r.text().rsplit(' ').next().unwrap().to_string();
    fwd.wait_events(1, T, is("bounced")).await;
    fwd.wait_events(1, T, |e| is("delivered")(e) && e["rcpt"] == "ok@dest.test")
        .await;
    // The DSN to the sender is delivered too.
    fwd.wait_events(1, T, |e| is("delivered")(e) && e["rcpt"] == "a@local.example")
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await; // the writer's batch

    let (s, t) = get(&fwd, &format!("/api/v1/messages/{id}")).await;
    assert_eq!(s, StatusCode::OK, "{t}");
    let events = t["events"].as_array().unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(kinds[0], "received", "{kinds:?}");
    for k in ["delivered", "bounced", "suppressed", "dsn_queued"] {
        assert!(kinds.contains(&k), "{k} missing: {kinds:?}");
    }
    // The submission: session, peer, TLS, Message-ID, and what was checked.
    let rcv = &events[0];
    assert!(rcv["session_id"].as_str().is_some_and(|s| s.len() == 24), "{rcv}");
    assert_eq!(rcv["header_message_id"], "trace-1@app.example");
    assert!(rcv["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    let checks = &rcv["checks"];
    assert_eq!(check(checks, "mail", "sender_rights")["result"], "pass");
    assert_eq!(check(checks, "mail", "breakers")["result"], "pass");
    let supp = check(checks, "rcpt", "suppression");
    assert_eq!(
        (supp["result"].as_str(), supp["count"].as_u64()),
        (Some("pass"), Some(2))
    );
    assert_eq!(check(checks, "rcpt", "budgets")["count"], 2);
    // Each recipient's attempt with the upstream reply and its class.
    let bounced = events.iter().find(|e| e["event"] == "bounced").unwrap();
    assert_eq!(bounced["rcpt"], "GONE@bounce.test");
    assert_eq!(bounced["reply"]["code"], 550);
    assert_eq!(bounced["category"], "user_unknown");
    let rcpts = t["summary"]["rcpts"].as_array().unwrap();
    let state = |a: &str| rcpts.iter().find(|r| r["address"] == a).map(|r| r["status"].clone());
    assert_eq!(state("ok@dest.test"), Some("delivered".into()));
    assert_eq!(state("GONE@bounce.test"), Some("bounced".into()));
    // The DSN's own life, nested.
    let dsn = &t["dsns"][0];
    assert!(
        dsn["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["event"] == "delivered" && e["rcpt"] == "a@local.example"),
        "{dsn:#}"
    );

    // Search: recipient (any case), sender, Message-ID, time range.
    for q in [
        "rcpt=gone@BOUNCE.test".to_string(),
        "sender=a@local.example&since=1h".to_string(),
        "message_id=%3Ctrace-1%40app.example%3E".to_string(),
        "tenant=local&limit=5".to_string(),
    ] {
        let (s, v) = get(&fwd, &format!("/api/v1/messages?{q}")).await;
        assert_eq!(s, StatusCode::OK, "{q}: {v}");
        let ids: Vec<&str> = v["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["message_id"].as_str().unwrap())
            .collect();
        // Newest first: the tenant's DSN (sent later) may come before it.
        assert!(ids.contains(&id.as_str()), "{q}: {v}");
        assert!(ids.len() <= 2, "{q}: {v}");
    }
    let (_, v) = get(&fwd, "/api/v1/messages?rcpt=nobody@dest.test").await;
    assert_eq!(v["messages"], serde_json::json!([]));
    let (_, v) = get(&fwd, "/api/v1/messages?rcpt=ok@dest.test&until=1h").await;
    assert_eq!(v["messages"], serde_json::json!([]), "received within the last hour");
    bad(get(&fwd, "/api/v1/messages?colour=red").await, "colour");
    bad(get(&fwd, "/api/v1/messages?since=last-tuesday").await, "since");
    let (s, _) = get(&fwd, "/api/v1/messages/0000000000000000000").await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // The CLI: the same life as text, search lines, exit 2 when unknown.
    let (code, out, err) = cli(&fwd, &[&id]).await;
    assert_eq!(code, Some(0), "{err}");
    for want in [
        format!("message {id}"),
        "message-id  trace-1@app.example".into(),
        "rcpt  suppression            pass ×2".into(),
        "GONE@bounce.test attempt 1 via other | 550 5.1.1".into(),
        "[user_unknown]".into(),
        "delivery status notification:".into(),
    ] {
        assert!(out.contains(&want), "{want:?} not in\n{out}");
    }
    let (code, out, _) = cli(&fwd, &["--rcpt", "gone@bounce.test"]).await;
    assert_eq!(code, Some(0));
    assert!(out.starts_with(&format!("{id}\t")), "{out}");
    assert!(out.contains("GONE@bounce.test=bounced"), "{out}");
    let (code, _, err) = cli(&fwd, &["0000000000000000000"]).await;
    assert_eq!(code, Some(2), "{err}");
    let (code, _, err) = cli(&fwd, &["--since", "soonish"]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("since"), "{err}");

    // A restart rebuilds the index from the files.
    let before = t["events"].as_array().unwrap().len();
    fwd.stop().await;
    let fwd = Forwarder::start(&work, &cfg).await;
    let (s, t) = get(&fwd, &format!("/api/v1/messages/{id}")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(t["events"].as_array().unwrap().len(), before);
    fwd.stop().await;
}

#[tokio::test]
async fn the_checks_count_only_recipients_that_were_accepted() {
    use crate::support::dns::{TestDns, zone};
    // The guard checks recipient domains (MX at a real DNS server); the
    // tenant is in warn mode so its own unpublished sender domain passes.
    let dns = TestDns::start(&zone(&["dest.test. 300 IN MX 10 mx.dest.test."]));
    let sink = Sink::start(&[]);
    let work = Workdir::new();
    let budget = "[[budget]]\nscope = \"tenant\"\nmatch = \"local\"\nrecipients = [\"2/h\"]\n";
    let sections = forward_config(sink.addr, "", "")
        + budget
        + &format!(
            "[dns]\nnameservers = [\"{}\"]\ntimeout = \"500ms\"\nattempts = 1\n",
            dns.addr()
        )
        + &admin_section("");
    let text = standard_config(["127.0.0.1:0"; 3], &sections).replace(
        "name = \"local\"\nsender_domains = [\"local.example\"]\nguard = \"off\"",
        "name = \"local\"\nsender_domains = [\"local.example\"]\nguard = \"warn\"",
    );
    assert!(text.contains("guard = \"warn\""));
    let fwd = Forwarder::start_text(&work, &text).await;
    let (mut c, _) = crate::support::client::Client::connect(fwd.trusted()).await;
    c.cmd("EHLO client.test").await;
    c.cmd("MAIL FROM:<a@local.example>").await.expect(250, "2.1.0");
    for r in ["r1@dest.test", "r2@dest.test"] {
        c.cmd(&format!("RCPT TO:<{r}>")).await.expect(250, "2.1.5");
    }
    // The third passes the guard but is over the budget: refused, and not
    // counted as checked.
    c.cmd("RCPT TO:<r3@dest.test>")
        .await
        .expect(451, "4.7.1")
        .token("budget_exceeded");
    c.cmd("DATA").await.expect(354, "");
    c.send_raw(b"From: a@local.example\r\nSubject: b\r\n\r\nx\r\n.\r\n")
        .await;
    let r = c.reply().await;
    r.expect(250, "2.0.0");
    let _ = c.cmd("QUIT").await;
    let id = r.text().rsplit(' ').next().unwrap().to_string();
    fwd.wait_events(1, T, is("received")).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (s, t) = get(&fwd, &format!("/api/v1/messages/{id}")).await;
    assert_eq!(s, StatusCode::OK, "{t}");
    let checks = &t["events"][0]["checks"];
    for name in ["suppression", "recipient_domain", "budgets"] {
        let c = check(checks, "rcpt", name);
        assert_eq!(
            (c["result"].as_str(), c["count"].as_u64()),
            (Some("pass"), Some(2)),
            "{name}: {checks:#}"
        );
    }
    // The unpublished sender domain: the guard warned, the message went on.
    assert_eq!(
        check(checks, "mail", "sender_domain_health")["result"],
        "warn",
        "{checks:#}"
    );
    assert_eq!(t["summary"]["rcpts"].as_array().unwrap().len(), 2);
    fwd.stop().await;
}
