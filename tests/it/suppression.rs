//! Suppression list, bounce classification and DSNs, end to end: a real
//! Postfix upstream, smtp-sink as the sender's mailbox, the admin API over
//! real HTTP and the `sendguard suppress` CLI.

use std::time::Duration;

use hyper::{Method, StatusCode};
use sendguard::admin::client::AdminClient;
use serde_json::Value;

use crate::support::sink::Sink;
use crate::support::*;

const T: Duration = Duration::from_secs(20);
pub(crate) const TOKEN: &str = "test-admin-token-0123456789";

pub(crate) fn admin_section(extra: &str) -> String {
    format!("[admin]\ntoken = \"{TOKEN}\"\n{extra}\n")
}

pub(crate) fn api(fwd: &Forwarder) -> AdminClient {
    AdminClient::new(
        &format!("http://{}", fwd.admin.expect("admin configured")),
        TOKEN.into(),
    )
    .unwrap()
}

pub(crate) async fn call(c: &AdminClient, m: Method, path: &str, ct: Option<&str>, body: &str) -> (StatusCode, Value) {
    let (status, bytes) = c.call(m, path, ct, body.as_bytes().to_vec()).await.unwrap();
    let v = serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
    (status, v)
}

/// A 400 naming `field`.
pub(crate) fn bad(r: (StatusCode, Value), field: &str) {
    assert_eq!(r.0, StatusCode::BAD_REQUEST, "{:?}", r.1);
    assert_eq!(r.1["field"], field, "{:?}", r.1);
    assert!(!r.1["error"].as_str().unwrap_or("").is_empty(), "{:?}", r.1);
}

/// Only a recipient's own reply says its address is bad. "User unknown" or
/// "account suspended" in the reply to MAIL FROM is about the sender or our
/// account (RFC 5321 §3.3), and at the end of data of a transaction with
/// several recipients it is about the message: neither suppresses anyone
/// nor counts as a hard bounce. With one recipient, the end-of-data reply
/// is that recipient's. Scripted upstream: Postfix prefixes its MAIL
/// refusals with "Sender address rejected", which the classifier already
/// reads as the sender's; other smarthosts do not.
#[tokio::test]
async fn only_a_recipients_own_reply_suppresses_it() {
    use std::sync::Arc;

    use crate::support::upstream::{Act, Script, Upstream};
    let script = Script {
        mail: Arc::new(|from, _| match from.split('@').next() {
            Some("nosender") => Act::Reply("550 5.1.1 <nosender@local.example>: Sender address unknown".into()),
            Some("suspended") => Act::Reply("554 5.7.1 Account has been suspended".into()),
            _ => Act::Reply("250 2.1.0 Ok".into()),
        }),
        // Transactions in order: message 1, its DSN, message 2, its DSN, ...
        data_end: Arc::new(|n| match n {
            1 => Act::Reply("550 5.1.1 <u1@dest.example>: Recipient address rejected: User unknown".into()),
            3 => Act::Reply("550 5.1.1 <solo@dest.example>: Recipient address rejected: User unknown".into()),
            _ => Act::Reply("250 2.0.0 Ok: queued".into()),
        }),
        ..Script::default()
    };
    let up = Upstream::start(script).await;
    let work = Workdir::new();
    let fwd = Forwarder::start(
        &work,
        &(forward_config(up.addr, "", "max_age = \"1h\"") + &admin_section("")),
    )
    .await;
    let send = |from: &'static str, rcpts: &'static [&'static str]| {
        let addr = fwd.trusted();
        async move {
            send_trusted(
                addr,
                from,
                rcpts,
                "From: x@local.example\r\nSubject: s\r\n\r\nhello\r\n",
            )
            .await
            .expect(250, "2.0.0");
        }
    };
    let of = |rcpt: &'static str| move |e: &Value| e["rcpt"] == rcpt;

    // End of data, three recipients: the message is refused, no one is
    // suppressed; then its DSN goes (transaction 2).
    send(
        "a@local.example",
        &["u1@dest.example", "u2@dest.example", "u3@dest.example"],
    )
    .await;
    let b = fwd.wait_events(3, T, is("bounced")).await;
    assert!(b.iter().all(|e| e["reply"]["code"] == 550), "{b:?}");
    fwd.wait_events(1, T, is("delivered")).await;
    // End of data, one recipient: that recipient's own reply.
    send("a@local.example", &["solo@dest.example"]).await;
    fwd.wait_events(1, T, of("solo@dest.example")).await;
    let s = fwd.wait_events(1, T, is("suppressed")).await;
    assert_eq!(s[0]["rcpt"], "solo@dest.example");
    fwd.wait_events(2, T, is("delivered")).await;
    // MAIL refused, the sender's address: bounced (the sender is told),
    // classified as policy, not user_unknown.
    send("nosender@local.example", &["c1@dest.example", "c2@dest.example"]).await;
    for rcpt in ["c1@dest.example", "c2@dest.example"] {
        let e = fwd.wait_events(1, T, of(rcpt)).await;
        assert_eq!(
            (&e[0]["event"], &e[0]["category"], &e[0]["failure_stage"]),
            (&"bounced".into(), &"policy".into(), &"policy".into()),
            "{e:?}"
        );
    }
    let dsn = fwd
        .wait_events(1, T, |e| {
            e["event"] == "dsn_queued" && e["sender"] == "nosender@local.example"
        })
        .await;
    assert_eq!(
        dsn[0]["rcpts"],
        serde_json::json!(["c1@dest.example", "c2@dest.example"])
    );
    // MAIL refused, "account suspended": the sender's account at the relay
    // (our own account's texts have relay_denied rules of their own). One
    // sender's problem: bounced to it, and nobody else's mail pauses.
    send("suspended@local.example", &["d1@dest.example", "d2@dest.example"]).await;
    for rcpt in ["d1@dest.example", "d2@dest.example"] {
        let e = fwd.wait_events(1, T, of(rcpt)).await;
        assert_eq!(
            (&e[0]["event"], &e[0]["category"]),
            (&"bounced".into(), &"policy".into()),
            "{e:?}"
        );
    }
    fwd.wait_events(1, T, |e| {
        e["event"] == "dsn_queued" && e["sender"] == "suspended@local.example"
    })
    .await;
    // and mail of other senders still goes
    send("a@local.example", &["after@dest.example"]).await;
    let e = fwd.wait_events(1, T, of("after@dest.example")).await;
    assert_eq!(e[0]["event"], "delivered", "{e:?}");

    let events = fwd.events();
    let suppressed: Vec<_> = events.iter().filter(|e| e["event"] == "suppressed").collect();
    assert_eq!(suppressed.len(), 1, "{suppressed:?}");
    let store = fwd.suppress.clone().unwrap();
    for rcpt in ["u1", "u2", "u3", "c1", "c2", "d1", "d2"] {
        assert!(
            store.lookup("local", &format!("{rcpt}@dest.example")).is_none(),
            "{rcpt}"
        );
    }
    assert!(!events.iter().any(|e| e["event"] == "delivery_paused"), "{events:?}");
    fwd.stop().await;
}

pub(crate) async fn rcpt_reply(fwd: &Forwarder, rcpt: &str) -> client::Resp {
    let (mut c, _) = client::Client::connect(fwd.trusted()).await;
    c.cmd("EHLO client.test").await;
    c.cmd("MAIL FROM:<a@local.example>").await.expect(250, "2.1.0");
    let r = c.cmd(&format!("RCPT TO:<{rcpt}>")).await;
    let _ = c.cmd("QUIT").await;
    r
}

#[tokio::test]
async fn postfix_user_unknown_is_bounced_suppressed_and_reported_to_the_sender() {
    use crate::support::postfix::Postfix;
    let sink = Sink::start(&[]);
    let full = "full@dest.example 452 4.2.2 Mailbox full";
    let unknown = "Gone@dest.example 550 5.1.1 <gone@dest.example>: Recipient address rejected: User unknown";
    let pf = Postfix::start(sink.addr, &[full, unknown]);
    let work = Workdir::new();
    let fwd = Forwarder::start(&work, &(forward_config(pf.addr, "", "") + &admin_section(""))).await;
    send_trusted(
        fwd.trusted(),
        "a@local.example",
        &["Gone@dest.example", "full@dest.example", "ok@dest.example"],
        "From: a@local.example\r\nSubject: quarterly report\r\nMessage-ID: <orig-1@local.example>\r\n\r\nhello\r\n",
    )
    .await
    .expect(250, "2.0.0");

    // bounced with its category, and suppressed
    let b = fwd.wait_events(1, T, is("bounced")).await;
    assert_eq!(b[0]["rcpt"], "Gone@dest.example");
    assert_eq!(b[0]["category"], "user_unknown", "{b:?}");
    assert_eq!(b[0]["failure_stage"], "recipient");
    let s = fwd.wait_events(1, T, is("suppressed")).await;
    assert_eq!(s[0]["rcpt"], "gone@dest.example");
    assert_eq!(s[0]["reason"], "hard_bounce");

    // the DSN reaches the sender's mailbox: null sender, multipart/report,
    // the failed recipient with Postfix's reply, the original headers
    let dsn_ev = fwd.wait_events(1, T, is("dsn_queued")).await;
    assert_eq!(dsn_ev[0]["sender"], "a@local.example");
    let deadline = std::time::Instant::now() + T;
    let dsn = loop {
        let found = sink.messages().into_iter().find(|m| m.mail_from.is_empty());
        if let Some(m) = found {
            break m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no DSN at the sink: {:?}",
            sink.messages()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(dsn.rcpts, ["a@local.example"]);
    let body = &dsn.body;
    assert!(body.contains("multipart/report"), "{body}");
    assert!(body.contains("report-type=delivery-status"), "{body}");
    assert!(body.contains("Final-Recipient: rfc822; Gone@dest.example"), "{body}");
    assert!(body.contains("Action: failed"), "{body}");
    assert!(body.contains("Status: 5.1.1"), "{body}");
    assert!(body.contains("Diagnostic-Code: smtp; 550 5.1.1"), "{body}");
    assert!(
        body.contains("Subject: quarterly report"),
        "original headers attached: {body}"
    );
    assert!(
        !body.contains("full@dest.example\nAction"),
        "a deferred recipient is not reported as failed"
    );

    // the next RCPT to it is refused with the reason and date, whatever the case
    let r = rcpt_reply(&fwd, "GONE@Dest.Example").await;
    r.expect(550, "5.7.1").token("suppressed");
    assert!(r.text().contains("hard_bounce since 20"), "{}", r.text());
    assert!(r.text().contains("5.1.1"), "the source reply is quoted: {}", r.text());

    // 452 4.2.2 is retried, classified mailbox_full, never suppressed
    let d = fwd
        .wait_events(2, T, |e| e["event"] == "deferred" && e["rcpt"] == "full@dest.example")
        .await;
    assert_eq!(d[0]["category"], "mailbox_full");
    let store = fwd.suppress.clone().unwrap();
    assert!(store.lookup("local", "full@dest.example").is_none());
    rcpt_reply(&fwd, "full@dest.example").await.expect(250, "2.1.5");
    assert!(
        !fwd.events()
            .iter()
            .any(|e| e["event"] == "suppressed" && e["rcpt"] == "full@dest.example"),
        "a mailbox-full deferral never suppresses"
    );

    // unsuppressing takes effect at once
    let c = api(&fwd);
    let (st, v) = call(&c, Method::DELETE, "/api/v1/suppressions/gone%40dest.example", None, "").await;
    assert_eq!(st, StatusCode::OK, "{v}");
    rcpt_reply(&fwd, "gone@dest.example").await.expect(250, "2.1.5");
    fwd.stop().await;
}

#[tokio::test]
async fn dsns_never_loop_and_a_tenant_can_turn_them_off() {
    // smtp-sink -f RCPT: every RCPT gets a 5xx, the DSN's too
    let sink = Sink::start(&["-f", "RCPT"]);
    let work = Workdir::new();
    let fwd = Forwarder::start(&work, &forward_config(sink.addr, "", "")).await;
    submit(&fwd, &["x@dest.example"], "bounces").await;
    let q = fwd.wait_events(1, T, is("dsn_queued")).await;
    let dsn_id = q[0]["dsn_id"].as_str().unwrap().to_string();
    // the DSN (null sender) bounces in turn, and gets no DSN of its own
    let b = fwd
        .wait_events(1, T, |e| e["event"] == "bounced" && e["message_id"] == dsn_id.as_str())
        .await;
    assert_eq!(b[0]["sender"], "");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(fwd.events().iter().filter(|e| e["event"] == "dsn_queued").count(), 1);
    fwd.stop().await;

    // tenant "local" with dsn = false: the bounce event is the only signal
    let work = Workdir::new();
    let text = standard_config(["127.0.0.1:0"; 3], &forward_config(sink.addr, "", ""))
        .replace("name = \"local\"\n", "name = \"local\"\ndsn = false\n");
    assert!(text.contains("dsn = false"));
    let fwd = Forwarder::start_text(&work, &text).await;
    submit(&fwd, &["x@dest.example"], "no dsn").await;
    fwd.wait_events(1, T, is("bounced")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !fwd.events().iter().any(|e| e["event"] == "dsn_queued"),
        "{:?}",
        fwd.events()
    );
    fwd.stop().await;
}

#[tokio::test]
async fn admin_api_endpoints_and_bad_input() {
    let sink = Sink::start(&[]);
    let work = Workdir::new();
    let fwd = Forwarder::start(
        &work,
        &(forward_config(sink.addr, "", "") + &admin_section("max_import_entries = 5\nmax_body_bytes = 4096")),
    )
    .await;
    let c = api(&fwd);

    // auth
    let nobody = AdminClient::new(
        &format!("http://{}", fwd.admin.unwrap()),
        "wrong-token-wrong-token".into(),
    )
    .unwrap();
    let (st, v) = call(&nobody, Method::GET, "/api/v1/suppressions", None, "").await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{v}");
    // the OpenAPI document is public and parses
    let (st, v) = call(&nobody, Method::GET, "/api/v1/openapi.json", None, "").await;
    assert_eq!(st, StatusCode::OK);
    assert!(v["paths"]["/api/v1/suppressions"]["post"].is_object());

    // add one, then an array; both refuse at RCPT at once
    let (st, v) = call(
        &c,
        Method::POST,
        "/api/v1/suppressions",
        Some("application/json"),
        r#"{"address":"One@Dest.Example","reason":"manual","source":"ticket 42"}"#,
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["entries"][0]["address"], "one@dest.example");
    assert_eq!(v["entries"][0]["scope"], "global");
    let (st, v) = call(
        &c,
        Method::POST,
        "/api/v1/suppressions",
        Some("application/json"),
        r#"[{"address":"two@dest.example","tenant":"local","reason":"unsubscribe"},{"address":"three@dest.example","tenant":"acme"}]"#,
    )
    .await;
    assert_eq!((st, v["added"].as_u64()), (StatusCode::CREATED, Some(2)), "{v}");
    let r = rcpt_reply(&fwd, "one@dest.example").await;
    r.expect(550, "5.7.1").token("suppressed");
    assert!(
        r.text().contains("manual since") && r.text().contains("ticket 42"),
        "{}",
        r.text()
    );
    rcpt_reply(&fwd, "two@dest.example")
        .await
        .expect(550, "5.7.1")
        .token("suppressed");
    // Quoting the local part names the same mailbox (RFC 5322 §3.2.4):
    // no way around the list.
    for quoted in [
        r#""one"@dest.example"#,
        r#""o\ne"@DEST.example"#,
        r#""One"@dest.example"#,
    ] {
        rcpt_reply(&fwd, quoted).await.expect(550, "5.7.1").token("suppressed");
    }
    // acme's suppression does not apply to tenant "local"
    rcpt_reply(&fwd, "three@dest.example").await.expect(250, "2.1.5");

    // bad input: 400 naming the field, nothing stored
    let post = |body: &'static str| {
        let c = &c;
        async move { call(c, Method::POST, "/api/v1/suppressions", Some("application/json"), body).await }
    };
    bad(post(r#"{"address":"not-an-address"}"#).await, "address");
    bad(post(r#"{"reason":"manual"}"#).await, "address");
    bad(post(r#"{"address":"a@b.example","reason":"spam"}"#).await, "reason");
    bad(post(r#"{"address":"a@b.example","tenant":"ghost"}"#).await, "tenant");
    bad(post(r#"{"address":"a@b.example","colour":"red"}"#).await, "colour");
    bad(
        post(r#"{"address":"a@b.example","expires_at":"soon"}"#).await,
        "expires_at",
    );
    // An expiry in the past would replace the live entry and lift it.
    bad(
        post(r#"{"address":"one@dest.example","expires_at":"2001-01-01T00:00:00Z"}"#).await,
        "expires_at",
    );
    rcpt_reply(&fwd, "one@dest.example")
        .await
        .expect(550, "5.7.1")
        .token("suppressed");
    bad(
        post(r#"[{"address":"ok@b.example"},{"address":"bad"}]"#).await,
        "[1].address",
    );
    bad(post("not json").await, "body");
    let (_, v) = call(&c, Method::GET, "/api/v1/suppressions?limit=100", None, "").await;
    assert_eq!(v["count"], 3, "nothing of the bad requests was stored: {v}");

    // list filters and bad parameters
    let (st, v) = call(&c, Method::GET, "/api/v1/suppressions?tenant=local", None, "").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["entries"].as_array().unwrap().len(), 1);
    assert_eq!(v["entries"][0]["reason"], "unsubscribe");
    let (_, v) = call(&c, Method::GET, "/api/v1/suppressions?scope=global", None, "").await;
    assert_eq!(v["count"], 1);
    let (_, v) = call(&c, Method::GET, "/api/v1/suppressions?limit=1&offset=1", None, "").await;
    assert_eq!((v["count"].as_u64(), v["next_offset"].as_u64()), (Some(1), Some(2)));
    // The largest offset is past the end, not an overflow.
    let (st, v) = call(
        &c,
        Method::GET,
        &format!("/api/v1/suppressions?offset={}", u64::MAX),
        None,
        "",
    )
    .await;
    assert_eq!((st, v["count"].as_u64()), (StatusCode::OK, Some(0)), "{v}");
    bad(
        call(&c, Method::GET, "/api/v1/suppressions?reason=nope", None, "").await,
        "reason",
    );
    bad(
        call(&c, Method::GET, "/api/v1/suppressions?limit=0", None, "").await,
        "limit",
    );
    bad(
        call(&c, Method::GET, "/api/v1/suppressions?limit=x", None, "").await,
        "limit",
    );
    bad(
        call(&c, Method::GET, "/api/v1/suppressions?sort=up", None, "").await,
        "sort",
    );

    // show and remove
    let (st, v) = call(&c, Method::GET, "/api/v1/suppressions/ONE%40dest.example", None, "").await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["entries"][0]["source"], "ticket 42");
    bad(
        call(&c, Method::GET, "/api/v1/suppressions/nonsense", None, "").await,
        "address",
    );
    let (st, _) = call(&c, Method::GET, "/api/v1/suppressions/nobody%40dest.example", None, "").await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    // the tenant entry needs ?tenant= to be removed
    let (st, _) = call(&c, Method::DELETE, "/api/v1/suppressions/two%40dest.example", None, "").await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, _) = call(
        &c,
        Method::DELETE,
        "/api/v1/suppressions/two%40dest.example?tenant=local",
        None,
        "",
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    rcpt_reply(&fwd, "two@dest.example").await.expect(250, "2.1.5");
    bad(
        call(
            &c,
            Method::DELETE,
            "/api/v1/suppressions/two%40dest.example?tenant=ghost",
            None,
            "",
        )
        .await,
        "tenant",
    );

    // import: all or nothing, with line numbers; limits
    let csv = "address,reason,tenant\r\nc1@dest.example,hard_bounce,\r\nc2@dest.example,complaint,acme\r\n";
    let (st, v) = call(
        &c,
        Method::POST,
        "/api/v1/suppressions/import?format=csv",
        Some("text/csv"),
        csv,
    )
    .await;
    assert_eq!((st, v["imported"].as_u64()), (StatusCode::OK, Some(2)), "{v}");
    let jsonl = "{\"address\":\"j1@dest.example\"}\n{\"address\":\"j2@dest.example\",\"reason\":\"bogus\"}\n";
    bad(
        call(
            &c,
            Method::POST,
            "/api/v1/suppressions/import",
            Some("application/x-ndjson"),
            jsonl,
        )
        .await,
        "line 2: reason",
    );
    let (_, v) = call(&c, Method::GET, "/api/v1/suppressions/j1%40dest.example", None, "").await;
    assert_eq!(v["entries"], Value::Null, "half an import was stored: {v}");
    let six: String = (0..6)
        .map(|i| format!("{{\"address\":\"m{i}@dest.example\"}}\n"))
        .collect();
    bad(
        call(&c, Method::POST, "/api/v1/suppressions/import?format=jsonl", None, &six).await,
        "entries",
    );
    let huge = format!("address\n{}", "x@dest.example\n".repeat(400));
    bad(
        call(&c, Method::POST, "/api/v1/suppressions/import?format=csv", None, &huge).await,
        "body",
    );
    bad(
        call(&c, Method::POST, "/api/v1/suppressions/import?format=xml", None, "").await,
        "format",
    );
    bad(
        call(
            &c,
            Method::POST,
            "/api/v1/suppressions/import?format=csv",
            None,
            "address,colour\nq@dest.example,red\n",
        )
        .await,
        "line 1: header",
    );

    // export in both formats; the export imports back unchanged
    let (st, bytes) = c
        .call(Method::GET, "/api/v1/suppressions/export?format=csv", None, vec![])
        .await
        .unwrap();
    assert_eq!(st, StatusCode::OK);
    let csv_out = String::from_utf8(bytes).unwrap();
    assert!(
        csv_out.starts_with("address,tenant,reason,source,created_at,expires_at\r\n"),
        "{csv_out}"
    );
    assert!(csv_out.contains("c2@dest.example,acme,complaint,"), "{csv_out}");
    let (_, bytes) = c
        .call(Method::GET, "/api/v1/suppressions/export?format=jsonl", None, vec![])
        .await
        .unwrap();
    let lines: Vec<Value> = String::from_utf8(bytes)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "{lines:?}"); // one, three(acme), c1, c2
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    let (st, v) = call(
        &c,
        Method::POST,
        "/api/v1/suppressions/import?format=jsonl",
        None,
        &text,
    )
    .await;
    assert_eq!(
        (st, v["new"].as_u64()),
        (StatusCode::OK, Some(0)),
        "re-import changes nothing: {v}"
    );
    let (_, again) = c
        .call(Method::GET, "/api/v1/suppressions/export?format=csv", None, vec![])
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8(again).unwrap(),
        csv_out,
        "created times and sources survive the round trip"
    );

    // unsubscribes and JSON complaints
    let (st, v) = call(
        &c,
        Method::POST,
        "/api/v1/unsubscribes",
        Some("application/json"),
        r#"{"address":"u@dest.example","sender_domain":"local.example"}"#,
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["entry"]["tenant"], "local", "tenant derived from the sender domain");
    assert_eq!(v["entry"]["reason"], "unsubscribe");
    rcpt_reply(&fwd, "u@dest.example")
        .await
        .expect(550, "5.7.1")
        .token("suppressed");
    bad(
        call(
            &c,
            Method::POST,
            "/api/v1/unsubscribes",
            Some("text/plain"),
            "u@dest.example",
        )
        .await,
        "Content-Type",
    );
    bad(
        call(
            &c,
            Method::POST,
            "/api/v1/unsubscribes",
            Some("application/json"),
            r#"{"address":"@@"}"#,
        )
        .await,
        "address",
    );
    let (st, v) = call(
        &c,
        Method::POST,
        "/api/v1/complaints",
        Some("application/json"),
        r#"{"address":"angry@dest.example","tenant":"acme","source":"fbl"}"#,
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["entry"]["reason"], "complaint");
    bad(
        call(
            &c,
            Method::POST,
            "/api/v1/complaints",
            Some("application/json"),
            r#"{"address":"a@b.example","sender_domain":"-bad-"}"#,
        )
        .await,
        "sender_domain",
    );

    // an ARF report from a feedback loop
    let arf = "From: feedback@fbl.example\r\nTo: abuse@local.example\r\nSubject: FW: report\r\nMIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type=feedback-report; boundary=\"part\"\r\n\r\n\
--part\r\nContent-Type: text/plain\r\n\r\nThis is an email abuse report.\r\n\r\n\
--part\r\nContent-Type: message/feedback-report\r\n\r\nFeedback-Type: abuse\r\nUser-Agent: ExampleFBL/1.0\r\nVersion: 1\r\n\
Original-Mail-From: <a@local.example>\r\nOriginal-Rcpt-To: <Reporter@Dest.Example>\r\nArrival-Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n\r\n\
--part\r\nContent-Type: message/rfc822\r\n\r\nFrom: a@local.example\r\nTo: reporter@dest.example\r\nSubject: offer\r\nMessage-ID: <m1@local.example>\r\n\r\nbuy\r\n\
--part--\r\n";
    let (st, v) = call(&c, Method::POST, "/api/v1/complaints", Some("message/rfc822"), arf).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["entry"]["address"], "reporter@dest.example");
    assert_eq!(v["entry"]["tenant"], "local");
    rcpt_reply(&fwd, "reporter@dest.example")
        .await
        .expect(550, "5.7.1")
        .token("suppressed");
    let ev = fwd.wait_events(2, T, is("complaint")).await;
    let arf_ev = ev
        .iter()
        .find(|e| e["rcpt"] == "reporter@dest.example")
        .expect("complaint event");
    assert_eq!(
        arf_ev["sender_domain"], "local.example",
        "counts against the sender domain"
    );
    // The same report again: still suppressed, but the complaint counts
    // against the sender domain's breaker once.
    submit(&fwd, &["ok@dest.example"], "a send, so the breaker is listed").await;
    fwd.wait_events(1, T, |e| e["event"] == "delivered" && e["rcpt"] == "ok@dest.example")
        .await;
    let (st, v) = call(&c, Method::POST, "/api/v1/complaints", Some("message/rfc822"), arf).await;
    assert_eq!((st, &v["new"]), (StatusCode::CREATED, &Value::Bool(false)), "{v}");
    let (_, policy) = call(&c, Method::GET, "/api/v1/policy", None, "").await;
    let b = policy["breakers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["scope"] == "sender_domain" && b["key"] == "local.example")
        .unwrap_or_else(|| panic!("{policy:#}"));
    assert_eq!(b["complaints"], 1, "{b}");
    bad(
        call(
            &c,
            Method::POST,
            "/api/v1/complaints",
            Some("message/rfc822"),
            "Subject: hi\r\n\r\nnot a report\r\n",
        )
        .await,
        "content-type",
    );
    bad(
        call(&c, Method::POST, "/api/v1/complaints", Some("application/pdf"), "%PDF").await,
        "Content-Type",
    );
    let (st, _) = call(&c, Method::GET, "/api/v1/nothing", None, "").await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    fwd.stop().await;
}

#[tokio::test]
async fn suppressions_survive_a_restart() {
    let sink = Sink::start(&[]);
    let work = Workdir::new();
    let cfg = forward_config(sink.addr, "", "") + &admin_section("");
    let fwd = Forwarder::start(&work, &cfg).await;
    let (st, _) = call(
        &api(&fwd),
        Method::POST,
        "/api/v1/suppressions",
        Some("application/json"),
        r#"[{"address":"kept@dest.example"},{"address":"lifted@dest.example"}]"#,
    )
    .await;
    assert_eq!(st, StatusCode::CREATED);
    let (st, _) = call(
        &api(&fwd),
        Method::DELETE,
        "/api/v1/suppressions/lifted%40dest.example",
        None,
        "",
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    fwd.stop().await;
    assert!(work.path("spool/suppressions.jsonl").is_file());

    let fwd = Forwarder::start(&work, &cfg).await;
    rcpt_reply(&fwd, "kept@dest.example")
        .await
        .expect(550, "5.7.1")
        .token("suppressed");
    rcpt_reply(&fwd, "lifted@dest.example").await.expect(250, "2.1.5");
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_suppress_commands_talk_to_the_api() {
    let sink = Sink::start(&[]);
    let work = Workdir::new();
    let fwd = Forwarder::start(&work, &(forward_config(sink.addr, "", "") + &admin_section(""))).await;
    let url = format!("http://{}", fwd.admin.unwrap());
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sendguard"))
            .arg("suppress")
            .args(args)
            .env("SENDGUARD_ADMIN_URL", &url)
            .env("SENDGUARD_ADMIN_TOKEN", TOKEN)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, _, err) = tokio::task::block_in_place(|| run(&["add", "cli@dest.example", "--reason", "complaint"]));
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = tokio::task::block_in_place(|| run(&["add", "x@dest.example", "--reason", "nope"]));
    assert_eq!(code, Some(1));
    assert!(err.contains("reason"), "{err}");
    rcpt_reply(&fwd, "cli@dest.example")
        .await
        .expect(550, "5.7.1")
        .token("suppressed");
    let (code, out, _) = tokio::task::block_in_place(|| run(&["list"]));
    assert_eq!(code, Some(0));
    assert!(out.starts_with("cli@dest.example\t*\tcomplaint\t"), "{out}");
    let file = work.path("import.csv");
    std::fs::write(&file, "address,reason\nimp@dest.example,manual\n").unwrap();
    let (code, out, err) = tokio::task::block_in_place(|| run(&["import", file.to_str().unwrap()]));
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("\"imported\":1"), "{out}");
    let export = work.path("export.jsonl");
    let (code, _, err) = tokio::task::block_in_place(|| run(&["export", "--output", export.to_str().unwrap()]));
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(std::fs::read_to_string(&export).unwrap().lines().count(), 2);
    let (code, _, err) = tokio::task::block_in_place(|| run(&["remove", "cli@dest.example"]));
    assert_eq!(code, Some(0), "{err}");
    rcpt_reply(&fwd, "cli@dest.example").await.expect(250, "2.1.5");
    let (code, _, err) = tokio::task::block_in_place(|| run(&["remove", "cli@dest.example"]));
    assert_eq!(code, Some(2), "not found: {err}");
    fwd.stop().await;
}
