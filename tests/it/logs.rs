//! JSON logs carry the ids events carry: the real binary with `--log-json`,
//! one accepted and one refused submission, and the log lines found by the
//! ids in the events log.

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::process::Command;

use crate::durability::wait_port;
use crate::support::sink::{Sink, free_port};
use crate::support::*;

/// The real binary serving `config` (log filter `log`, stderr piped),
/// once `addr` accepts connections.
async fn serve(
    config: &std::path::Path,
    args: &[&str],
    log: &str,
    addr: std::net::SocketAddr,
) -> tokio::process::Child {
    let child = Command::new(env!("CARGO_BIN_EXE_sendguard"))
        .arg("serve")
        .args(args)
        .arg("--config")
        .arg(config)
        .env("SENDGUARD_LOG", log)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_port(addr).await;
    child
}

#[tokio::test]
async fn json_log_lines_carry_the_session_message_and_recipient_ids_of_the_events() {
    let sink = Sink::start(&[]);
    let work = Workdir::new();
    let port = free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let path = work.write_config(&standard_config(
        ["127.0.0.1:0", "127.0.0.1:0", &format!("127.0.0.1:{port}")],
        &forward_config(sink.addr, "", ""),
    ));
    let mut child = serve(&path, &["--log-json"], "info,sendguard::relay=debug", addr).await;
    send_trusted(
        addr,
        "a@local.example",
        &["to@dest.example"],
        "Subject: x\r\n\r\nhi\r\n",
    )
    .await
    .expect(250, "2.0.0");
    let (mut c, _) = crate::support::client::Client::connect(addr).await;
    c.cmd("EHLO client.test").await;
    c.cmd("MAIL FROM:<boss@not-ours.example>").await.expect(550, "5.7.1");
    c.cmd("QUIT").await;
    let events_path = work.path("events.jsonl");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !read_events(&events_path).iter().any(is("delivered")) {
        assert!(Instant::now() < deadline, "not delivered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // SIGTERM: the server drains and exits, closing stderr.
    // SAFETY: signalling our own child process.
    assert_eq!(unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) }, 0);
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).await.unwrap();
    let _ = child.wait().await;
    let lines: Vec<Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}")))
        .collect();
    let events = read_events(&events_path);
    let received = events.iter().find(|e| is("received")(e)).expect("received event");
    let refused = events.iter().find(|e| is("refused")(e)).expect("refused event");
    let delivered = events.iter().find(|e| is("delivered")(e)).expect("delivered event");
    let (msg_id, session) = (
        received["message_id"].as_str().unwrap(),
        received["session_id"].as_str().unwrap(),
    );
    assert_eq!(delivered["message_id"], msg_id);
    let span_field = |l: &Value, k: &str| l["span"][k].as_str().map(str::to_string);
    let field = |l: &Value, k: &str| l["fields"][k].as_str().map(str::to_string);
    // The session's lines, found by the session id of its events.
    let queued = lines
        .iter()
        .find(|l| field(l, "message") == Some("message queued".into()))
        .expect("a 'message queued' line");
    assert_eq!(span_field(queued, "session_id").as_deref(), Some(session), "{queued}");
    assert_eq!(field(queued, "message_id").as_deref(), Some(msg_id), "{queued}");
    let refused_session = refused["session_id"].as_str().unwrap();
    assert_ne!(refused_session, session);
    assert!(
        lines
            .iter()
            .any(|l| span_field(l, "session_id").as_deref() == Some(refused_session)
                && field(l, "message") == Some("sender not permitted".into())),
        "no log line of the refused session {refused_session}:\n{err}"
    );
    // The delivery line, found by the message id and recipient.
    assert!(
        lines.iter().any(|l| field(l, "message_id").as_deref() == Some(msg_id)
            && field(l, "rcpt").as_deref() == Some("to@dest.example")
            && field(l, "message") == Some("delivered".into())),
        "no delivery line for {msg_id}:\n{err}"
    );
}

/// The AUTH username is client-chosen text that reaches the log before
/// authentication: a newline in it must not start a forged log line.
#[tokio::test]
async fn a_client_chosen_username_cannot_forge_log_lines() {
    let work = Workdir::new();
    let port = free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let path = work.write_config(&standard_config(
        [&format!("127.0.0.1:{port}"), "127.0.0.1:0", "127.0.0.1:0"],
        "",
    ));
    let mut child = serve(&path, &[], "info", addr).await;
    let mut c = crate::support::client::Client::connect_starttls(addr).await;
    let forged = "x\nFORGED INFO sendguard: authenticated user=admin";
    c.auth_plain(forged, "wrong").await.expect(535, "5.7.8");
    c.cmd("QUIT").await;
    // SAFETY: signalling our own child process.
    assert_eq!(unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) }, 0);
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).await.unwrap();
    let _ = child.wait().await;
    assert!(err.contains("authentication failed"), "{err}");
    assert!(
        !err.lines().any(|l| l.starts_with("FORGED")),
        "a log line was forged:\n{err}"
    );
    assert!(err.contains(r"x\nFORGED"), "the username is logged escaped:\n{err}");
}
