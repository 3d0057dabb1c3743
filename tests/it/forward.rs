//! Store-and-forward end to end: sessions → spool → queue → relay → a real
//! upstream (Postfix's smtp-sink), plus a scripted upstream for faults.
//! Every acknowledged message is delivered or accounted for by an event.

use std::sync::Arc;
use std::time::Duration;

use crate::support::sink::{Sink, free_port};
use crate::support::upstream::{Act, Script, Upstream};
use crate::support::{Forwarder, Workdir, forward_config, is, send_trusted, submit};

const T: Duration = Duration::from_secs(20);

#[tokio::test]
async fn delivers_to_smtp_sink_with_content_intact() {
    let sink = Sink::start(&[]);
    let work = Workdir::new();
    let fwd = Forwarder::start(&work, &forward_config(sink.addr, "", "")).await;
    let body = "From: a@local.example\r\nSubject: one\r\n\r\nline 1\r\n..dot line\r\nnaïve 8-bit\r\n";
    let r = send_trusted(
        fwd.trusted(),
        "a@local.example",
        &["r1@dest.example", "r2@dest.example"],
        body,
    )
    .await;
    r.expect(250, "2.0.0");
    let id = r.text().rsplit(' ').next().unwrap().to_string();
    assert!(r.text().contains("queued as"), "{r:?}");
    let msgs = sink.wait_for(1, T).await;
    assert_eq!(msgs.len(), 1, "one transaction for both recipients");
    assert_eq!(msgs[0].mail_from, "a@local.example");
    assert_eq!(msgs[0].rcpts, ["r1@dest.example", "r2@dest.example"]);
    assert!(msgs[0].body.contains("Subject: one\n"), "{:?}", msgs[0].body);
    assert!(
        msgs[0].body.contains("\n.dot line\nnaïve 8-bit\n"),
        "{:?}",
        msgs[0].body
    );
    let delivered = fwd.wait_events(2, T, is("delivered")).await;
    for e in &delivered {
        assert_eq!(e["message_id"], id.as_str());
        assert_eq!(e["tenant"], "local");
        assert_eq!(e["sender"], "a@local.example");
        assert_eq!(e["attempt"], 1);
        assert_eq!(e["reply"]["code"], 250);
    }
    let received = fwd
        .events()
        .into_iter()
        .filter(|e| e["event"] == "received")
        .collect::<Vec<_>>();
    assert_eq!(received.len(), 1);
    assert_eq!(
        received[0]["rcpts"],
        serde_json::json!(["r1@dest.example", "r2@dest.example"])
    );
    // nothing left in the queue or the spool
    wait_until(|| fwd.queue.is_empty()).await;
    fwd.stop().await;
    assert!(sendguard::spool::scan(&work.path("spool")).unwrap().is_empty());
}

/// `server.io_threads`: that many I/O threads run the sessions and the
/// delivery workers, and mail from concurrent sessions spread over them
/// is delivered whole.
#[tokio::test]
async fn sessions_and_workers_run_on_the_configured_io_threads() {
    let sink = Sink::start(&[]);
    let work = Workdir::new();
    let text = crate::support::standard_config(["127.0.0.1:0"; 3], &forward_config(sink.addr, "", ""))
        .replace("[server]\n", "[server]\nio_threads = 3\n");
    let fwd = Forwarder::start_text(&work, &text).await;
    // This process's I/O threads: nextest (`scripts/test`) runs every test
    // in a process of its own, so they are this forwarder's.
    let io_threads = || {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).ok())
            .filter(|c| c.starts_with("sendguard-io-"))
            .count()
    };
    assert_eq!(io_threads(), 3);
    let sends = (0..9).map(|i| {
        let addr = fwd.trusted();
        tokio::spawn(async move {
            let body = format!("From: a@local.example\r\nSubject: n{i}\r\n\r\nbody {i}\r\n");
            send_trusted(addr, "a@local.example", &[&format!("r{i}@dest.example")], &body)
                .await
                .expect(250, "2.0.0");
        })
    });
    for s in sends.collect::<Vec<_>>() {
        s.await.unwrap();
    }
    let msgs = sink.wait_for(9, T).await;
    let mut got: Vec<(String, String)> = msgs.iter().map(|m| (m.rcpts.join(","), m.body.clone())).collect();
    got.sort();
    for (i, (rcpt, body)) in got.iter().enumerate() {
        assert_eq!(rcpt, &format!("r{i}@dest.example"));
        assert!(
            body.contains(&format!("Subject: n{i}\n")) && body.contains(&format!("body {i}\n")),
            "{body:?}"
        );
    }
    fwd.stop().await;
    // The threads end with the pipeline.
    wait_until(|| io_threads() == 0).await;
}

/// With sessions and workers on several I/O threads, the events log still
/// tells each message's story in order: `received` first, a recipient's
/// `bounced` before the `dsn_queued` that reports it, and that before
/// anything about the DSN itself (which a worker on another thread may
/// deliver at once). Both used to be emitted after the message they explain
/// was queued; under load, CI saw a DSN's `delivered` ahead of its parent's
/// `bounced`.
#[tokio::test]
async fn events_of_a_message_come_in_causal_order() {
    let script = Script {
        rcpt: Arc::new(|addr, _| match addr.split('-').next() {
            Some("gone") => Act::Reply("550 5.1.1 user unknown".into()),
            // deferred: the parent's state is saved (a group-commit fsync)
            // between queuing the DSN and the old event emission
            Some("full") => Act::Reply("452 4.2.2 Mailbox full".into()),
            _ => Act::Reply("250 2.1.5 Ok".into()),
        }),
        ..Script::default()
    };
    let up = Upstream::start(script).await;
    let work = Workdir::new();
    let text = crate::support::standard_config(
        ["127.0.0.1:0"; 3],
        &forward_config(
            up.addr,
            "max_connections = 8",
            "first_retry = \"1h\"\nmax_retry = \"1h\"",
        ),
    )
    .replace("[server]\n", "[server]\nio_threads = 4\n")
    .replace("first_retry = \"200ms\"\nmax_retry = \"1s\"\n", "")
    .replace("max_connections = 4\n", "");
    let fwd = Forwarder::start_text(&work, &text).await;
    const CLIENTS: usize = 8;
    const EACH: usize = 6;
    let sends = (0..CLIENTS).map(|c| {
        let addr = fwd.trusted();
        tokio::spawn(async move {
            for m in 0..EACH {
                let n = c * EACH + m;
                let rcpts = [
                    format!("ok-{n}@dest.example"),
                    format!("gone-{n}@dest.example"),
                    format!("full-{n}@dest.example"),
                ];
                let rcpts: Vec<&str> = rcpts.iter().map(String::as_str).collect();
                let body = format!("From: a@local.example\r\nSubject: n{n}\r\n\r\nbody\r\n");
                send_trusted(addr, "a@local.example", &rcpts, &body)
                    .await
                    .expect(250, "2.0.0");
            }
        })
    });
    for s in sends.collect::<Vec<_>>() {
        s.await.unwrap();
    }
    let n = CLIENTS * EACH;
    // each message's ok-N, and the DSN for its gone-N
    fwd.wait_events(2 * n, T, is("delivered")).await;
    let events = fwd.events();
    let id = |e: &serde_json::Value| e["message_id"].as_str().unwrap().to_string();
    let mut first_seen = std::collections::HashMap::new();
    for (i, e) in events.iter().enumerate() {
        first_seen.entry(id(e)).or_insert(i);
    }
    let mut checked = 0;
    for (i, e) in events.iter().enumerate() {
        match e["event"].as_str().unwrap() {
            "received" => assert_eq!(first_seen[&id(e)], i, "an event of {} before its `received`", id(e)),
            "dsn_queued" => {
                let dsn = e["dsn_id"].as_str().unwrap();
                assert!(
                    first_seen[dsn] > i,
                    "an event of DSN {dsn} before its parent's `dsn_queued`"
                );
                let bounced = events
                    .iter()
                    .position(|b| b["event"] == "bounced" && id(b) == id(e))
                    .expect("a bounced event for a DSN's parent");
                assert!(bounced < i, "`dsn_queued` of {} before its `bounced`", id(e));
                checked += 1;
            }
            _ => {}
        }
    }
    assert_eq!(checked, n, "one DSN per message");
    assert_eq!(events.iter().filter(|e| e["event"] == "received").count(), n);
    fwd.stop().await;
}

async fn wait_until(f: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + T;
    while !f() {
        assert!(std::time::Instant::now() < deadline, "condition not met in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn upstream_down_at_start_then_up() {
    let port = free_port();
    let work = Workdir::new();
    let relay = format!("127.0.0.1:{port}").parse().unwrap();
    let fwd = Forwarder::start(&work, &forward_config(relay, "", "")).await;
    submit(&fwd, &["r@dest.example"], "wait").await;
    let deferred = fwd.wait_events(1, T, is("deferred")).await;
    assert!(deferred[0]["reply"]["code"].is_null(), "{deferred:?}");
    assert!(
        deferred[0]["reply"]["text"].as_str().unwrap().contains("connect"),
        "{deferred:?}"
    );
    assert!(deferred[0]["next_attempt_at"].is_string());
    let sink = Sink::start_on(port, &[]);
    let msgs = sink.wait_for(1, T).await;
    assert!(msgs[0].body.contains("Subject: wait"));
    let delivered = fwd.wait_events(1, T, is("delivered")).await;
    assert!(delivered[0]["attempt"].as_u64().unwrap() >= 2);
    fwd.stop().await;
}

/// A real 4xx from smtp-sink, then 2xx once it behaves: retried on the
/// backoff schedule and delivered; a 4xx is never final.
#[tokio::test]
async fn four_xx_is_retried_then_delivered() {
    let port = free_port();
    let mut sink = Sink::start_on(port, &["-r", "RCPT"]);
    let work = Workdir::new();
    let fwd = Forwarder::start(&work, &forward_config(sink.addr, "", "")).await;
    let t0 = std::time::Instant::now();
    submit(&fwd, &["r@dest.example"], "retry").await;
    let d = fwd.wait_events(2, T, is("deferred")).await;
    assert_eq!(d[0]["reply"]["code"].as_u64().unwrap() / 100, 4, "{d:?}");
    assert_eq!((d[0]["attempt"].as_u64(), d[1]["attempt"].as_u64()), (Some(1), Some(2)));
    // the second attempt waited for the first retry delay (200ms ± 10%)
    assert!(t0.elapsed() >= Duration::from_millis(180));
    sink.stop();
    let sink = Sink::start_on(port, &[]);
    sink.wait_for(1, T).await;
    let delivered = fwd.wait_events(1, T, is("delivered")).await;
    assert!(delivered[0]["attempt"].as_u64().unwrap() >= 3);
    assert!(fwd.events().iter().all(|e| e["event"] != "bounced"));
    fwd.stop().await;
}

#[tokio::test]
async fn five_xx_bounces_and_is_not_retried() {
    let sink = Sink::start(&["-f", "RCPT"]);
    let work = Workdir::new();
    let fwd = Forwarder::start(&work, &forward_config(sink.addr, "", "")).await;
    submit(&fwd, &["gone@dest.example"], "b").await;
    let b = fwd.wait_events(1, T, is("bounced")).await;
    assert_eq!(b[0]["reply"]["code"].as_u64().unwrap() / 100, 5);
    assert_eq!(b[0]["rcpt"], "gone@dest.example");
    // not retried: no further attempt within several retry intervals
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let attempts: Vec<_> = fwd
        .events()
        .into_iter()
        .filter(|e| e["rcpt"] == "gone@dest.example")
        .collect();
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    assert!(fwd.queue.is_empty());
    assert!(sink.messages().is_empty());
    fwd.stop().await;
}

#[tokio::test]
async fn expires_after_max_age() {
    let sink = Sink::start(&["-r", "RCPT"]);
    let work = Workdir::new();
    let fwd = Forwarder::start(&work, &forward_config(sink.addr, "", "max_age = \"1s\"")).await;
    submit(&fwd, &["slow@dest.example"], "e").await;
    let e = fwd.wait_events(1, T, is("expired")).await;
    assert_eq!(e[0]["reply"]["code"].as_u64().unwrap() / 100, 4);
    let received_at = humantime::parse_rfc3339(e[0]["received_at"].as_str().unwrap()).unwrap();
    let ts = humantime::parse_rfc3339(e[0]["ts"].as_str().unwrap()).unwrap();
    assert!(
        ts.duration_since(received_at).unwrap() >= Duration::from_millis(990),
        "expired early"
    );
    wait_until(|| fwd.queue.is_empty()).await;
    fwd.stop().await;
    assert!(sendguard::spool::scan(&work.path("spool")).unwrap().is_empty());
}

/// One transaction, three fates: 550 bounced, 452 deferred (then accepted
/// on retry), 250 delivered.
#[tokio::test]
async fn mixed_recipient_replies_in_one_transaction() {
    let script = Script {
        rcpt: Arc::new(|addr, n| match (addr, n) {
            ("unknown@dest.example", _) => Act::Reply("550 5.1.1 <unknown@dest.example>: user unknown".into()),
            ("full@dest.example", 1) => Act::Reply("452 4.2.2 Mailbox full".into()),
            _ => Act::Reply("250 2.1.5 Ok".into()),
        }),
        ..Script::default()
    };
    let up = Upstream::start(script).await;
    let work = Workdir::new();
    let fwd = Forwarder::start(&work, &forward_config(up.addr, "", "")).await;
    let rcpts = ["ok@dest.example", "unknown@dest.example", "full@dest.example"];
    submit(&fwd, &rcpts, "mixed").await;
    let b = fwd.wait_events(1, T, is("bounced")).await;
    assert_eq!(
        (b[0]["rcpt"].as_str(), b[0]["reply"]["enhanced"].as_str()),
        (Some("unknown@dest.example"), Some("5.1.1"))
    );
    let d = fwd.wait_events(1, T, is("deferred")).await;
    assert_eq!(
        (d[0]["rcpt"].as_str(), d[0]["reply"]["code"].as_u64()),
        (Some("full@dest.example"), Some(452))
    );
    // ok, full (on retry) and the DSN for unknown to the sender
    let delivered = fwd.wait_events(3, T, is("delivered")).await;
    let mut who: Vec<_> = delivered
        .iter()
        .map(|e| e["rcpt"].as_str().unwrap().to_string())
        .collect();
    who.sort();
    assert_eq!(who, ["a@local.example", "full@dest.example", "ok@dest.example"]);
    let got: Vec<_> = up.messages().into_iter().filter(|m| !m.mail.contains("<>")).collect();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].rcpts, ["ok@dest.example"]);
    assert_eq!(
        got[1].rcpts,
        ["full@dest.example"],
        "only the deferred recipient is retried"
    );
    for g in &got {
        assert!(g.mail.starts_with("<a@local.example>"), "{:?}", g.mail);
        // our Received trace header (RFC 5321 §4.4), then the content as sent
        let body = String::from_utf8(g.body.clone()).unwrap();
        assert!(
            body.starts_with(
                "Received: from client.test (127.0.0.1)\r\n\tby sendguard.test (sendguard) with ESMTP id "
            ),
            "{body}"
        );
        assert!(body.ends_with(" +0000\r\nSubject: mixed\r\n\r\nx\r\n"), "{body}");
    }
    fwd.stop().await;
}

#[tokio::test]
async fn faults_defer_and_recover() {
    // 421 at greeting, connection dropped mid-DATA, a hang: all deferred,
    // and the message goes through once the upstream behaves.
    for (name, greeting, data_end) in [
        ("421 greeting", Some("421 4.3.2 Service shutting down"), None),
        ("drop mid-DATA", None, Some(Act::Drop)),
        ("hang at end of data", None, Some(Act::Hang)),
        // A byte at a time, each within command_timeout: the reply as a
        // whole is still bounded by it.
        (
            "trickled reply",
            None,
            Some(Act::Trickle("250 2.0.0 Ok: queued as 0123456789ABCDEF".into())),
        ),
    ] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let first = data_end.clone();
        let script = Script {
            greeting: Act::Reply(greeting.unwrap_or("220 upstream.test ESMTP").to_string()),
            data_end: Arc::new(move |n| match (&first, n) {
                (Some(a), 1) => a.clone(),
                _ => Act::Reply("250 2.0.0 Ok".into()),
            }),
            ..Script::default()
        };
        let up = Upstream::start_on(listener, script);
        let work = Workdir::new();
        let fwd = Forwarder::start(
            &work,
            &forward_config(addr, "command_timeout = \"1s\"\ndata_timeout = \"1s\"", ""),
        )
        .await;
        send_trusted(
            fwd.trusted(),
            "a@local.example",
            &["r@dest.example"],
            "Subject: f\r\n\r\nsome content here\r\n",
        )
        .await
        .expect(250, "2.0.0");
        let d = fwd.wait_events(1, T, is("deferred")).await;
        if greeting.is_some() {
            assert_eq!(d[0]["reply"]["code"], 421, "{name}: {d:?}");
            // still refusing: upstream keeps saying 421; switch it to a good one
            up.stop().await;
            let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
            let up = Upstream::start_on(listener, Script::default());
            fwd.wait_events(1, T, is("delivered")).await;
            assert_eq!(up.messages().len(), 1, "{name}");
        } else {
            assert!(d[0]["reply"]["code"].is_null(), "{name}: {d:?}");
            fwd.wait_events(1, T, is("delivered")).await;
            assert_eq!(up.messages().len(), 1, "{name}");
            // the broken connection was not reused
            assert!(up.connections.load(std::sync::atomic::Ordering::SeqCst) >= 2, "{name}");
        }
        fwd.stop().await;
    }
}

/// A 5xx before any transaction (greeting, AUTH) is the relay refusing
/// *us*: every message stays queued (deferred, no bounce, no DSN) and goes
/// once the relay takes us again.
#[tokio::test]
async fn relay_refusing_us_at_greeting_or_auth_defers() {
    for (name, greeting, password, code) in [
        (
            "554 greeting",
            "554 5.7.1 upstream.test: Access denied",
            "relaypass",
            554,
        ),
        ("535 to AUTH", "220 upstream.test ESMTP", "wrong", 535),
    ] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Upstream::start_on(
            listener,
            Script {
                greeting: Act::Reply(greeting.into()),
                starttls: true,
                auth: Some(("relayuser".into(), "relaypass".into())),
                ..Script::default()
            },
        );
        let work = Workdir::new();
        let relay = format!(
            "tls = \"starttls\"\ntls_server_name = \"localhost\"\nca_file = \"{}\"\nusername = \"relayuser\"\npassword = \"{password}\"",
            work.path("ca.pem").display()
        );
        let sections = forward_config(addr, &relay, "").replace("tls = \"none\"\n", "");
        let fwd = Forwarder::start(&work, &sections).await;
        submit(&fwd, &["r@dest.example"], "refused").await;
        let d = fwd.wait_events(1, T, is("deferred")).await;
        assert_eq!(d[0]["reply"]["code"], code, "{name}: {d:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let evs = fwd.events();
        assert!(
            !evs.iter()
                .any(|e| e["event"] == "bounced" || e["event"] == "dsn_queued" || e["event"] == "expired"),
            "{name}: {evs:#?}"
        );
        let queued = sendguard::queue::inspect::list(&work.path("spool")).unwrap();
        assert_eq!(queued.len(), 1, "{name}: still queued");
        if code == 535 {
            // Our credentials: delivery pauses with an alert.
            let p = fwd.wait_events(1, T, is("delivery_paused")).await;
            assert_eq!(p[0]["category"], "relay_denied", "{name}: {p:?}");
        } else {
            // The relay takes us again: the same message goes.
            up.stop().await;
            let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
            let good = Upstream::start_on(
                listener,
                Script {
                    starttls: true,
                    auth: Some(("relayuser".into(), "relaypass".into())),
                    ..Script::default()
                },
            );
            fwd.wait_events(1, T, is("delivered")).await;
            assert_eq!(good.messages().len(), 1, "{name}");
        }
        fwd.stop().await;
    }
}

#[tokio::test]
async fn smtputf8_is_not_downgraded() {
    let up = Upstream::start(Script {
        smtputf8: false,
        ..Script::default()
    })
    .await;
    let work = Workdir::new();
    let fwd = Forwarder::start(&work, &forward_config(up.addr, "", "")).await;
    let (mut c, _) = crate::support::client::Client::connect(fwd.trusted()).await;
    c.cmd("EHLO x").await;
    c.cmd("MAIL FROM:<a@local.example> SMTPUTF8").await.expect(250, "2.1.0");
    c.cmd("RCPT TO:<δοκιμή@παράδειγμα.δοκιμή>").await.expect(250, "2.1.5");
    c.cmd("DATA").await;
    c.send_raw("Subject: π\r\n\r\nx\r\n.\r\n".as_bytes()).await;
    c.reply().await.expect(250, "2.0.0");
    let b = fwd.wait_events(1, T, is("bounced")).await;
    assert_eq!(b[0]["reply"]["enhanced"], "5.6.7");
    assert!(up.messages().is_empty());
    fwd.stop().await;
}

#[tokio::test]
async fn relay_starttls_verifies_certificate_and_authenticates() {
    let script = Script {
        starttls: true,
        auth: Some(("relayuser".into(), "relaypass".into())),
        ..Script::default()
    };
    let up = Upstream::start(script).await;
    let work = Workdir::new();
    let ca = work.path("ca.pem");
    let relay = format!(
        "tls = \"starttls\"\ntls_server_name = \"localhost\"\nca_file = \"{}\"\nusername = \"relayuser\"\npassword = \"relaypass\"",
        ca.display()
    );
    let sections = forward_config(up.addr, &relay, "").replace("tls = \"none\"\n", "");
    let fwd = Forwarder::start(&work, &sections).await;
    submit(&fwd, &["r@dest.example"], "tls").await;
    fwd.wait_events(1, T, is("delivered")).await;
    assert_eq!(up.messages().len(), 1);
    fwd.stop().await;

    // Without the CA (system roots only) the self-signed upstream is refused:
    // deferred with a certificate error, nothing sent in clear.
    let work = Workdir::new();
    let relay =
        "tls = \"starttls\"\ntls_server_name = \"localhost\"\nusername = \"relayuser\"\npassword = \"relaypass\"";
    let sections = forward_config(up.addr, relay, "").replace("tls = \"none\"\n", "");
    let fwd = Forwarder::start(&work, &sections).await;
    submit(&fwd, &["r@dest.example"], "tls").await;
    let d = fwd.wait_events(1, T, is("deferred")).await;
    let text = d[0]["reply"]["text"].as_str().unwrap();
    assert!(
        text.contains("TLS") && text.to_lowercase().contains("certificate"),
        "{text}"
    );
    assert_eq!(up.messages().len(), 1, "nothing more delivered");
    fwd.stop().await;
}

/// Messages queued when the server stops are delivered after a restart
/// from the same spool.
#[tokio::test]
async fn restart_recovers_the_queue() {
    let port = free_port();
    let work = Workdir::new();
    let relay = format!("127.0.0.1:{port}").parse().unwrap();
    let fwd = Forwarder::start(&work, &forward_config(relay, "", "")).await;
    for i in 0..5 {
        send_trusted(
            fwd.trusted(),
            "a@local.example",
            &[&format!("r{i}@dest.example")],
            &format!("Subject: m{i}\r\n\r\nx\r\n"),
        )
        .await
        .expect(250, "2.0.0");
    }
    // Every message's first attempt (a quick retry of one message must not
    // stand in for another's first).
    fwd.wait_events(5, T, |e| e["event"] == "deferred" && e["attempt"] == 1)
        .await;
    fwd.stop().await;
    let queued = sendguard::queue::inspect::list(&work.path("spool")).unwrap();
    assert_eq!(queued.len(), 5);
    assert!(
        queued.iter().all(|q| q.pending == 1 && q.last_reply.is_some()),
        "{queued:?}"
    );
    // the CLI shows the same queue, and one message in detail
    let bin = env!("CARGO_BIN_EXE_sendguard");
    let cfg = work.path("sendguard.toml");
    let out = std::process::Command::new(bin)
        .args(["queue", "list", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("-- 5 message(s) queued"),
        "{text}"
    );
    assert!(text.contains("last reply: connect to 127.0.0.1"), "{text}");
    let id = &queued[0].id;
    let out = std::process::Command::new(bin)
        .args(["queue", "show", id, "--json", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let env: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(env["id"], id.as_str());
    assert_eq!(env["rcpts"][0]["status"], "pending");
    assert!(env["rcpts"][0]["attempts"].as_u64().unwrap() >= 1);
    assert_eq!(env["rcpts"][0]["history"][0]["outcome"], "deferred");
    let out = std::process::Command::new(bin)
        .args(["queue", "show", "nope", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));

    let sink = Sink::start_on(port, &[]);
    let fwd = Forwarder::start(&work, &forward_config(relay, "", "")).await;
    let msgs = sink.wait_for(5, T).await;
    let mut subjects: Vec<_> = msgs
        .iter()
        .map(|m| m.body.lines().find(|l| l.starts_with("Subject:")).unwrap().to_string())
        .collect();
    subjects.sort();
    assert_eq!(
        subjects,
        [
            "Subject: m0",
            "Subject: m1",
            "Subject: m2",
            "Subject: m3",
            "Subject: m4"
        ]
    );
    wait_until(|| fwd.queue.is_empty()).await;
    fwd.stop().await;
    assert!(sendguard::spool::scan(&work.path("spool")).unwrap().is_empty());
}

/// A real Postfix upstream (access map): one transaction, 550 5.1.1 for one
/// recipient (bounced), 452 4.2.2 for another (deferred, never bounced),
/// 250 for the third (delivered through Postfix to smtp-sink). Once the
/// map no longer refuses, the deferred recipient is delivered on retry.
#[tokio::test]
async fn postfix_upstream_per_recipient_replies() {
    use crate::support::postfix::Postfix;
    let sink = Sink::start(&[]);
    let full = "full@dest.example 452 4.2.2 Mailbox full";
    let unknown = "unknown@dest.example 550 5.1.1 <unknown@dest.example>: Recipient address rejected: User unknown";
    let pf = Postfix::start(sink.addr, &[full, unknown]);
    let work = Workdir::new();
    // Postfix re-reads its access map in new smtpd processes only: one
    // transaction per connection, so the retry after the change sees it.
    let fwd = Forwarder::start(&work, &forward_config(pf.addr, "max_messages_per_connection = 1", "")).await;
    let rcpts = ["ok@dest.example", "unknown@dest.example", "full@dest.example"];
    send_trusted(
        fwd.trusted(),
        "a@local.example",
        &rcpts,
        "Subject: via postfix\r\n\r\nhello\r\n",
    )
    .await
    .expect(250, "2.0.0");

    let b = fwd.wait_events(1, T, is("bounced")).await;
    assert_eq!(b[0]["rcpt"], "unknown@dest.example");
    assert_eq!(
        (b[0]["reply"]["code"].as_u64(), b[0]["reply"]["enhanced"].as_str()),
        (Some(550), Some("5.1.1"))
    );
    assert!(
        b[0]["reply"]["text"].as_str().unwrap().contains("User unknown"),
        "{b:?}"
    );
    let d = fwd.wait_events(1, T, is("deferred")).await;
    assert_eq!(d[0]["rcpt"], "full@dest.example");
    assert_eq!(
        (d[0]["reply"]["code"].as_u64(), d[0]["reply"]["enhanced"].as_str()),
        (Some(452), Some("4.2.2"))
    );
    let ok = fwd.wait_events(1, T, is("delivered")).await;
    assert_eq!(ok[0]["rcpt"], "ok@dest.example");
    // the sink also gets the DSN for the bounced recipient (null sender)
    let first: Vec<_> = sink
        .wait_for(2, T)
        .await
        .into_iter()
        .filter(|m| !m.mail_from.is_empty())
        .collect();
    assert_eq!(first[0].rcpts, ["ok@dest.example"]);
    assert!(first[0].body.contains("Subject: via postfix"));

    // 452 keeps being retried, never bounced; then the mailbox has room
    fwd.wait_events(2, T, |e| e["event"] == "deferred" && e["rcpt"] == "full@dest.example")
        .await;
    pf.set_access(&[unknown]);
    pf.reload();
    let later = fwd.wait_events(3, T, is("delivered")).await;
    assert!(later.iter().any(|e| e["rcpt"] == "full@dest.example"), "{later:?}");
    assert!(
        fwd.events()
            .iter()
            .all(|e| !(e["event"] == "bounced" && e["rcpt"] == "full@dest.example"))
    );
    let all = sink.wait_for(3, T).await;
    assert!(all.iter().any(|m| m.rcpts == ["full@dest.example"]));
    assert_eq!(all.iter().filter(|m| m.mail_from.is_empty()).count(), 1, "one DSN");
    // only the unknown recipient was refused: once
    assert_eq!(fwd.events().iter().filter(|e| e["event"] == "bounced").count(), 1);
    fwd.stop().await;
}

/// Messages waiting for the upstream go out chained on one connection
/// (RFC 2920 §3.1: each message's MAIL, RCPT and DATA in the same write as
/// the previous message's content), through a real Postfix that refuses
/// clients breaking pipelining rules (`smtpd_forbid_unauth_pipelining`).
/// Every message's replies stay its own whatever its place in the chain:
/// 250 delivered with its own content; 550 at RCPT bounced and 452 at RCPT
/// deferred (no content sent); 554 and 451 after the content (the next
/// envelope already behind it) bounced and deferred.
#[tokio::test]
async fn chained_transactions_keep_each_messages_replies() {
    use crate::support::postfix::Postfix;
    use crate::suppression::{admin_section, api};
    let sink = Sink::start(&[]);
    let pf = Postfix::start(
        sink.addr,
        &[
            "full@dest.example 452 4.2.2 Mailbox full",
            "unknown@dest.example 550 5.1.1 <unknown@dest.example>: Recipient address rejected: User unknown",
        ],
    );
    pf.set_senders(&[
        "late5@local.example 554 5.7.1 Message content rejected",
        "late4@local.example 451 4.3.0 Content scanner unavailable",
    ]);
    let work = Workdir::new();
    // One connection, so the backlog builds up behind it.
    let cfg = forward_config(pf.addr, "", "max_age = \"1h\"").replace("max_connections = 4", "max_connections = 1")
        + &admin_section("");
    let fwd = Forwarder::start(&work, &cfg).await;
    // Held while they are submitted, so they are all waiting at once.
    let tenant = serde_json::json!({"scope": "tenant", "tenant": "local"});
    let mut hold = tenant.clone();
    hold["for"] = "1h".into();
    let (s, v) = crate::policy::post(&fwd, "/api/v1/suspend", hold).await;
    assert_eq!(s, hyper::StatusCode::OK, "{v}");
    let kinds = ["ok", "unknown", "ok", "late5", "ok", "full", "late4", "ok"];
    let n = 32;
    let kind = |i: usize| kinds[i % kinds.len()];
    // (sender, recipient) of message i
    let env = |i: usize| match kind(i) {
        "ok" => ("a@local.example".to_string(), format!("ok{i}@dest.example")),
        "late5" | "late4" => (format!("{}@local.example", kind(i)), format!("l{i}@dest.example")),
        k => ("a@local.example".to_string(), format!("{k}@dest.example")),
    };
    let mut sends = Vec::new();
    for i in 0..n {
        let (addr, (from, rcpt)) = (fwd.trusted(), env(i));
        sends.push(tokio::spawn(async move {
            send_trusted(addr, &from, &[&rcpt], &format!("Subject: m{i}\r\n\r\nbody {i}\r\n"))
                .await
                .expect(250, "2.0.0");
        }));
    }
    for s in sends {
        s.await.unwrap();
    }
    assert!(sink.messages().is_empty(), "held mail was delivered");
    let (s, v) = crate::policy::post(&fwd, "/api/v1/resume", tenant).await;
    assert_eq!(s, hyper::StatusCode::OK, "{v}");
    let count = |k: &str| (0..n).filter(|&i| kind(i) == k).count();
    let oks: Vec<usize> = (0..n).filter(|&i| kind(i) == "ok").collect();
    let bounces = count("unknown") + count("late5");
    let bounced = fwd.wait_events(bounces, T, is("bounced")).await;
    for b in &bounced {
        let i = (0..n).find(|&i| env(i).1 == b["rcpt"]).unwrap();
        let want = if kind(i) == "unknown" {
            (550, "5.1.1")
        } else {
            (554, "5.7.1")
        };
        assert_eq!(
            (b["reply"]["code"].as_u64(), b["reply"]["enhanced"].as_str()),
            (Some(want.0), Some(want.1)),
            "{b}"
        );
    }
    let deferred = fwd.wait_events(count("full") + count("late4"), T, is("deferred")).await;
    for d in &deferred {
        let i = (0..n).find(|&i| env(i).1 == d["rcpt"]).unwrap();
        let want = if kind(i) == "full" { 452 } else { 451 };
        assert!(["full", "late4"].contains(&kind(i)), "{d}");
        assert_eq!(d["reply"]["code"], want, "{d}");
    }
    // each delivered message reached the sink with its own envelope and
    // content; a DSN per bounce
    let msgs = sink.wait_for(oks.len() + bounces, T).await;
    assert_eq!(msgs.iter().filter(|m| m.mail_from.is_empty()).count(), bounces);
    for i in &oks {
        let m = msgs
            .iter()
            .find(|m| m.rcpts == [env(*i).1])
            .unwrap_or_else(|| panic!("ok{i} not delivered: {msgs:?}"));
        assert_eq!(m.mail_from, "a@local.example");
        assert!(m.body.contains(&format!("Subject: m{i}\n")), "{:?}", m.body);
        assert!(m.body.contains(&format!("body {i}\n")), "{:?}", m.body);
    }
    let delivered: Vec<_> = fwd.events().into_iter().filter(|e| e["event"] == "delivered").collect();
    for e in &delivered {
        let rcpt = e["rcpt"].as_str().unwrap();
        assert!(rcpt.starts_with("ok") || rcpt.ends_with("@local.example"), "{e}");
    }
    // ... and they went out chained: each transaction after one whose
    // content went out (24 of the 32 send content)
    let (_, body) = api(&fwd)
        .call(hyper::Method::GET, "/metrics", None, Vec::new())
        .await
        .unwrap();
    let text = String::from_utf8(body).unwrap();
    let chained: usize = text
        .lines()
        .find_map(|l| l.strip_prefix("sendguard_upstream_chained_transactions_total "))
        .unwrap_or_else(|| panic!("no chained counter in {text}"))
        .parse()
        .unwrap();
    eprintln!("chained transactions: {chained}");
    assert!(chained >= 16, "only {chained} chained transactions");
    let log = pf.log();
    assert!(log.contains("smtpd"), "no Postfix log to check: {log:?}");
    assert!(
        !log.contains("synchronization") && !log.contains("improper command pipelining"),
        "Postfix saw a pipelining violation: {log}"
    );
    fwd.stop().await;
}

/// RFC 5321 §4.5.3.1.10: a real Postfix with `smtpd_recipient_limit = 2`
/// answers the third RCPT of a transaction `452 4.5.3 Error: too many
/// recipients`. Those recipients go in the next transaction at once (not
/// after `queue.first_retry`, an hour here), without a back-off, and none
/// is bounced: five recipients arrive in three transactions.
#[tokio::test]
async fn recipients_over_the_upstreams_limit_go_in_the_next_transaction() {
    use crate::support::postfix::Postfix;
    let sink = Sink::start(&[]);
    let pf = Postfix::start(sink.addr, &[]);
    pf.set_main(&["smtpd_recipient_limit=2"]);
    let work = Workdir::new();
    let cfg = forward_config(pf.addr, "", "").replace(
        "first_retry = \"200ms\"\nmax_retry = \"1s\"",
        "first_retry = \"1h\"\nmax_retry = \"1h\"",
    );
    let fwd = Forwarder::start(&work, &cfg).await;
    let rcpts: Vec<String> = (1..=5).map(|i| format!("r{i}@dest.example")).collect();
    let refs: Vec<&str> = rcpts.iter().map(String::as_str).collect();
    send_trusted(
        fwd.trusted(),
        "a@local.example",
        &refs,
        "Subject: many\r\n\r\nhello\r\n",
    )
    .await
    .expect(250, "2.0.0");
    fwd.wait_events(5, T, is("delivered")).await;
    let msgs = sink.wait_for(3, T).await;
    let mut got: Vec<String> = msgs.iter().flat_map(|m| m.rcpts.clone()).collect();
    got.sort();
    assert_eq!(got, rcpts);
    assert!(msgs.iter().all(|m| m.rcpts.len() <= 2), "{msgs:?}");
    let events = fwd.events();
    let deferred: Vec<_> = events.iter().filter(|e| e["event"] == "deferred").collect();
    // r3, r4, r5 in the first transaction; r5 again in the second
    assert_eq!(deferred.len(), 4, "{deferred:?}");
    for d in &deferred {
        assert_eq!(
            (
                &d["reply"]["code"],
                &d["reply"]["enhanced"],
                &d["category"],
                &d["failure_stage"]
            ),
            (&452.into(), &"4.5.3".into(), &"other".into(), &"throttling".into()),
            "{d}"
        );
    }
    assert!(
        !events
            .iter()
            .any(|e| e["event"] == "bounced" || e["event"] == "backoff"),
        "{events:?}"
    );
    fwd.stop().await;
}

/// Our smarthost account over its daily quota (Gmail's `550 5.4.5 Daily
/// user sending quota exceeded`, the reply to MAIL FROM): the mail is kept,
/// not bounced to its sender, and its pair waits (back-off `suspend`)
/// instead of spending retries on a quota that resets tomorrow.
#[tokio::test]
async fn our_accounts_daily_quota_keeps_the_mail() {
    let script = Script {
        mail: Arc::new(|_, _| {
            Act::Reply(
                "550 5.4.5 Daily user sending quota exceeded. 98e67ed59e1d1-2e1a2b3c4d5sm1234567a91.1 - gsmtp".into(),
            )
        }),
        ..Script::default()
    };
    let up = Upstream::start(script).await;
    let work = Workdir::new();
    let fwd = Forwarder::start(&work, &forward_config(up.addr, "", "max_age = \"1h\"")).await;
    send_trusted(
        fwd.trusted(),
        "a@local.example",
        &["x@dest.example", "y@dest.example"],
        "Subject: s\r\n\r\nhello\r\n",
    )
    .await
    .expect(250, "2.0.0");
    let d = fwd.wait_events(2, T, is("deferred")).await;
    for e in &d {
        assert_eq!(
            (&e["reply"]["code"], &e["category"]),
            (&550.into(), &"rate_limited".into()),
            "{e}"
        );
    }
    let b = fwd.wait_events(1, T, is("backoff")).await;
    assert_eq!(
        (&b[0]["rule"], &b[0]["action"]),
        (&"own_account_daily_quota".into(), &"suspend".into())
    );
    let events = fwd.events();
    assert!(
        !events
            .iter()
            .any(|e| e["event"] == "bounced" || e["event"] == "dsn_queued"),
        "{events:?}"
    );
    assert!(up.messages().is_empty());
    fwd.stop().await;
}

/// Mail that waits (a suspended provider here; an open breaker or a
/// warm-up cap alike) is never attempted, so nothing moved it out of its
/// spool segment: each such message kept a whole segment (16 MiB) on disk.
/// Once a segment has filled and `spool.compact_after` has passed, the few
/// messages still in it move to files of their own and the segment goes;
/// they are delivered intact when the hold ends.
#[tokio::test]
async fn waiting_mail_does_not_pin_spool_segments() {
    use crate::suppression::admin_section;
    let sink = Sink::start(&[]);
    let work = Workdir::new();
    let cfg = forward_config(sink.addr, "", "max_age = \"1h\"").replace(
        "[spool]\ndir = \"spool\"\n",
        "[spool]\ndir = \"spool\"\ncompact_after = \"300ms\"\n",
    ) + &admin_section("");
    let fwd = Forwarder::start(&work, &cfg).await;
    let google = serde_json::json!({"scope": "provider", "provider": "google"});
    let mut hold = google.clone();
    hold["for"] = "1h".into();
    let (s, v) = crate::policy::post(&fwd, "/api/v1/suspend", hold).await;
    assert_eq!(s, hyper::StatusCode::OK, "{v}");
    // ~230 KB each: the 1 MiB first segment and two 16 MiB ones fill up,
    // and every tenth message waits.
    let line = format!("{}\r\n", "x".repeat(76));
    let filler = line.repeat(3000);
    let n = 150;
    let rcpt = |i: usize| {
        if i.is_multiple_of(10) {
            format!("held{i}@gmail.com")
        } else {
            format!("r{i}@dest.example")
        }
    };
    for i in 0..n {
        let body = format!("Subject: m{i}\r\n\r\n{filler}end {i}\r\n");
        send_trusted(fwd.trusted(), "a@local.example", &[&rcpt(i)], &body)
            .await
            .expect(250, "2.0.0");
    }
    let held = (0..n).filter(|i| i.is_multiple_of(10)).count();
    fwd.wait_events(n - held, T, is("delivered")).await;
    let segments = || {
        std::fs::read_dir(work.path("spool/seg"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "seg"))
            .count()
    };
    // Only the segment still being written is left.
    let deadline = std::time::Instant::now() + T;
    while segments() > 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} segments kept by {held} waiting messages",
            segments()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        fwd.events()
            .iter()
            .all(|e| e["event"] != "delivered" || !e["rcpt"].as_str().unwrap().starts_with("held"))
    );
    let (s, v) = crate::policy::post(&fwd, "/api/v1/resume", google).await;
    assert_eq!(s, hyper::StatusCode::OK, "{v}");
    fwd.wait_events(n, T, is("delivered")).await;
    let msgs = sink.wait_for(n, T).await;
    for i in (0..n).step_by(10) {
        let m = msgs
            .iter()
            .find(|m| m.rcpts == [rcpt(i)])
            .unwrap_or_else(|| panic!("held{i} not delivered"));
        assert!(m.body.contains(&format!("Subject: m{i}\n")));
        assert!(m.body.contains(&format!("x\nend {i}\n")), "held{i}: content cut");
        assert_eq!(m.body.matches(&"x".repeat(76)).count(), 3000);
    }
    fwd.stop().await;
}
