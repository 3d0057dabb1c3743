//! Regression tests from the code review: each of these failed before its fix.
use std::time::Duration;

use crate::support::upstream::{Script, Upstream};
use crate::support::{Forwarder, Workdir, forward_config, is, starttls_forwarder, submit};

const T: Duration = Duration::from_secs(20);

/// Relay one message over STARTTLS to an upstream that appends `inject` in
/// clear to its 220; returns the upstream, the forwarder and the first
/// outcome event (bounced, delivered or deferred).
async fn first_outcome_with_injection(inject: String) -> (Upstream, Forwarder, serde_json::Value) {
    let script = Script {
        starttls: true,
        starttls_inject: Some(inject),
        ..Script::default()
    };
    let up = Upstream::start(script).await;
    let work = Workdir::new();
    let fwd = starttls_forwarder(&work, up.addr).await;
    submit(&fwd, &["r@dest.example"], "tls").await;
    let ev = fwd
        .wait_events(1, T, |e| {
            e["event"] == "bounced" || e["event"] == "delivered" || e["event"] == "deferred"
        })
        .await;
    (up, fwd, ev.into_iter().next().expect("one event"))
}

/// A man in the middle appends a plaintext "EHLO reply" to the upstream's
/// STARTTLS 220. It must be discarded, not read after the handshake as if it
/// came over TLS (a forged `SIZE 1` would bounce every message).
#[tokio::test]
async fn relay_discards_plaintext_injected_after_starttls() {
    let (_up, fwd, ev) = first_outcome_with_injection("250-injected\r\n250 SIZE 1".into()).await;
    assert_eq!(
        ev["event"], "delivered",
        "plaintext injected before TLS decided the outcome: {:#}",
        ev
    );
    fwd.stop().await;
}

/// An upstream that closes idle connections with a 421 (Postfix's smtpd
/// does, after its timeout): the next message is retried on a fresh
/// connection, not deferred.
#[tokio::test]
async fn pooled_connection_closed_with_421_is_retried_on_a_new_one() {
    let script = Script {
        idle_421: Some(Duration::from_millis(300)),
        ..Script::default()
    };
    let up = Upstream::start(script).await;
    let work = Workdir::new();
    let fwd = Forwarder::start(
        &work,
        &forward_config(up.addr, "max_connections = 1", "").replace("max_connections = 4\n", ""),
    )
    .await;
    submit(&fwd, &["r1@dest.example"], "one").await;
    fwd.wait_events(1, T, is("delivered")).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    submit(&fwd, &["r2@dest.example"], "two").await;
    let ev = fwd
        .wait_events(2, T, |e| e["event"] == "delivered" || e["event"] == "deferred")
        .await;
    assert_eq!(ev[1]["event"], "delivered", "second message: {:#}", ev[1]);
    fwd.stop().await;
}

/// A client that pipelines commands and never reads the replies must not
/// keep its session (and connection slots) beyond `limits.command_timeout`.
#[tokio::test]
async fn non_reading_client_loses_its_session_after_command_timeout() {
    use tokio::io::AsyncWriteExt;
    let server =
        crate::support::TestServer::start("[limits]\ncommand_timeout = \"1s\"\nmax_connections_per_ip = 1\n").await;
    let addr = server.submission();
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let chunk = b"EHLO x\r\n".repeat(8192);
    let writer = tokio::spawn(async move {
        // write until the server stops reading; never read a reply
        let _ = tokio::time::timeout(Duration::from_secs(4), async {
            loop {
                if tcp.write_all(&chunk).await.is_err() {
                    break;
                }
            }
        })
        .await;
        tcp
    });
    let _tcp = writer.await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await; // well past command_timeout
    let (_c, greeting) = crate::support::client::Client::connect(addr).await;
    assert_eq!(
        greeting.code,
        220,
        "first session still holds its per-IP slot: {:?}",
        greeting.text()
    );
}

/// One injected plaintext line after the STARTTLS 220 would shift every
/// later reply by one, so that DATA's reply is the RCPT 250: a recipient
/// must never be counted delivered when no content was sent.
#[tokio::test]
async fn injected_reply_never_marks_undelivered_mail_delivered() {
    let (up, fwd, ev) = first_outcome_with_injection("250 injected".into()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = up.messages().len();
    assert!(
        !(ev["event"] == "delivered" && got == 0),
        "event {:#} but upstream received {got} messages",
        ev
    );
    fwd.stop().await;
}
