//! Submission budgets and warm-up caps: refused at RCPT with `451 4.7.1`,
//! a reason token and the time to retry; recipients already accepted in
//! the transaction still go. A SIGHUP to the real binary changes a budget
//! live, and a broken config on reload changes nothing.

use std::time::{Duration, Instant};

use crate::durability::{spawn, wait_port};
use crate::support::client::Client;
use crate::support::sink::{Sink, free_port};
use crate::support::*;

const T: Duration = Duration::from_secs(20);

async fn session(addr: std::net::SocketAddr, from: &str) -> Client {
    let (mut c, _) = Client::connect(addr).await;
    c.cmd("EHLO client.test").await.expect(250, "");
    c.cmd(&format!("MAIL FROM:<{from}>")).await.expect(250, "2.1.0");
    c
}

async fn finish(c: &mut Client) {
    c.cmd("DATA").await.expect(354, "");
    c.send_raw(b"Subject: budget\r\n\r\nx\r\n.\r\n").await;
    c.reply().await.expect(250, "2.0.0");
    let _ = c.cmd("QUIT").await;
}

#[tokio::test]
async fn over_budget_is_refused_at_rcpt_with_a_retry_time() {
    let sink = Sink::start(&[]);
    let work = Workdir::new();
    let budget = "[[budget]]\nscope = \"tenant\"\nmatch = \"local\"\nrecipients = [\"3/h\"]\n\
                  [[budget]]\nscope = \"credential\"\nmessages = [\"1/min\"]\n";
    let fwd = Forwarder::start(&work, &(forward_config(sink.addr, "", "") + budget)).await;

    // Message 1: two of the tenant's three recipients an hour.
    let mut c = session(fwd.trusted(), "a@local.example").await;
    c.cmd("RCPT TO:<r1@dest.example>").await.expect(250, "2.1.5");
    c.cmd("RCPT TO:<r2@dest.example>").await.expect(250, "2.1.5");
    finish(&mut c).await;
    // Message 2: the third recipient is the last of the hour; the fourth is
    // refused, and the message still goes to the one accepted.
    let mut c = session(fwd.trusted(), "a@local.example").await;
    c.cmd("RCPT TO:<r3@dest.example>").await.expect(250, "2.1.5");
    let over = c.cmd("RCPT TO:<r4@dest.example>").await;
    over.expect(451, "4.7.1").token("budget_exceeded");
    let text = over.text();
    assert!(text.contains("tenant \"local\""), "{text}");
    assert!(text.contains("3 recipients per"), "{text}");
    assert!(text.contains("try again in"), "{text}");
    finish(&mut c).await;
    // An agent (credential "app" of tenant acme) may send one message a
    // minute: the second is refused at its first RCPT.
    for (n, code) in [(1, 250), (2, 451)] {
        let mut c = Client::connect_authed(fwd.addrs[0]).await;
        c.cmd("MAIL FROM:<app@acme.example>").await.expect(250, "2.1.0");
        let r = c.cmd(&format!("RCPT TO:<agent{n}@dest.example>")).await;
        assert_eq!(r.code, code, "{}", r.text());
        if code == 250 {
            finish(&mut c).await;
        } else {
            r.token("budget_exceeded");
            assert!(r.text().contains("credential \"app\""), "{}", r.text());
            assert!(r.text().contains("1 message per minute"), "{}", r.text());
        }
    }

    let delivered = sink.wait_for(3, T).await;
    let mut rcpts: Vec<String> = delivered.iter().flat_map(|m| m.rcpts.clone()).collect();
    rcpts.sort();
    assert_eq!(
        rcpts,
        [
            "agent1@dest.example",
            "r1@dest.example",
            "r2@dest.example",
            "r3@dest.example"
        ]
    );
    // Each refusal is a `refused` event at stage rcpt with the reply.
    let refused = fwd.wait_events(2, T, is("refused")).await;
    assert!(
        refused
            .iter()
            .all(|e| e["stage"] == "rcpt" && e["reply"]["code"] == 451)
    );
    assert_eq!(refused[0]["rcpt"], "r4@dest.example");
    fwd.stop().await;
}

#[tokio::test]
async fn warm_up_caps_a_new_sender_domain_per_day() {
    let sink = Sink::start(&[]);
    let work = Workdir::new();
    let today = humantime::format_rfc3339(std::time::SystemTime::now()).to_string()[..10].to_string();
    let warmup = format!("[[warmup]]\nsender_domain = \"local.example\"\nstart = \"{today}\"\ndaily = [2, 10]\n");
    let fwd = Forwarder::start(&work, &(forward_config(sink.addr, "", "") + &warmup)).await;
    let mut c = session(fwd.trusted(), "a@local.example").await;
    c.cmd("RCPT TO:<w1@dest.example>").await.expect(250, "2.1.5");
    c.cmd("RCPT TO:<w2@dest.example>").await.expect(250, "2.1.5");
    let over = c.cmd("RCPT TO:<w3@dest.example>").await;
    over.expect(451, "4.7.1").token("warmup_limit");
    assert!(over.text().contains("day 1"), "{}", over.text());
    assert!(over.text().contains("local.example"), "{}", over.text());
    finish(&mut c).await;
    assert_eq!(
        sink.wait_for(1, T).await[0].rcpts,
        ["w1@dest.example", "w2@dest.example"]
    );
    fwd.stop().await;
}

/// Send one message from the trusted listener: the RCPT reply code.
async fn rcpt_code(addr: std::net::SocketAddr, rcpt: &str) -> u16 {
    let mut c = session(addr, "a@local.example").await;
    let r = c.cmd(&format!("RCPT TO:<{rcpt}>")).await;
    if r.code == 250 {
        finish(&mut c).await;
    } else {
        let _ = c.cmd("QUIT").await;
    }
    r.code
}

#[tokio::test]
async fn sighup_reloads_the_policy_and_a_bad_config_changes_nothing() {
    let sink = Sink::start(&[]);
    let work = Workdir::new();
    let port = free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let config = |budget: &str| {
        standard_config(
            ["127.0.0.1:0", "127.0.0.1:0", &format!("127.0.0.1:{port}")],
            &(forward_config(sink.addr, "", "")
                + &format!("[[budget]]\nscope = \"tenant\"\nmessages = [\"{budget}\"]\n")),
        )
    };
    let path = work.write_config(&config("1/h"));
    let mut child = spawn(&path);
    wait_port(addr).await;
    assert_eq!(rcpt_code(addr, "h1@dest.example").await, 250);
    assert_eq!(rcpt_code(addr, "h2@dest.example").await, 451, "1/h used up");

    let hup = |child: &tokio::process::Child| {
        let pid = child.id().expect("running") as i32;
        // SAFETY: signalling our own child process.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    };
    std::fs::write(&path, config("100/h")).unwrap();
    hup(&child);
    let deadline = Instant::now() + T;
    while rcpt_code(addr, "h3@dest.example").await != 250 {
        assert!(Instant::now() < deadline, "the reload did not raise the budget");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A config that does not validate: refused, the 100/h budget stays.
    std::fs::write(&path, config("0/h")).unwrap();
    hup(&child);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rcpt_code(addr, "h4@dest.example").await, 250);
    assert!(
        child.try_wait().unwrap().is_none(),
        "a bad reload must not stop the server"
    );
    // Back to one an hour: h1..h4 used it up, so the next is refused.
    std::fs::write(&path, config("1/h")).unwrap();
    hup(&child);
    let deadline = Instant::now() + T;
    while rcpt_code(addr, "h5@dest.example").await != 451 {
        assert!(Instant::now() < deadline, "the reload did not lower the budget");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    child.start_kill().unwrap();
    let _ = child.wait().await;
    assert_eq!(sink.wait_for(4, T).await.len(), 4);
}
