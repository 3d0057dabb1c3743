//! Signed webhooks end to end (issue 7): a real forwarder, smtp-sink as the
//! upstream and a real HTTP receiver (`support/webhook_receiver.py`) that is
//! down, slow, hung or up. Signatures are checked here with ring against
//! the configured secret; every expected event id must arrive at least once.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::Value;

use crate::support::client::Client;
use crate::support::sink::{Sink, free_port};
use crate::support::{Forwarder, Workdir, forward_config, is, submit};

const T: Duration = Duration::from_secs(25);
const SECRET: &[u8] = b"sendguard webhook test secret 32";

fn secret() -> String {
    format!("whsec_{}", STANDARD.encode(SECRET))
}

/// One `[[webhooks.endpoint]]` with short retries; `extra` adds keys.
fn endpoint(name: &str, port: u16, path: &str, extra: &str) -> String {
    format!(
        "[[webhooks.endpoint]]\nname = \"{name}\"\nurl = \"http://127.0.0.1:{port}{path}\"\nsecret = \"{s}\"\ntimeout = \"2s\"\nfirst_retry = \"100ms\"\nmax_retry = \"500ms\"\n{extra}\n",
        s = secret()
    )
}

/// One request as the receiver recorded it.
#[derive(Debug, Clone, serde::Deserialize)]
struct Record {
    path: String,
    headers: HashMap<String, String>,
    body: String,
}

/// The Python receiver, killed on drop.
struct Receiver {
    child: Child,
    out: PathBuf,
}

impl Receiver {
    /// Listen on `port`; the first requests sleep `delays` seconds
    /// ("3,1,1"); requests to a path in `hang` are never answered.
    fn start(port: u16, out: PathBuf, delays: &str, hang: &[&str]) -> Receiver {
        Self::start_with(port, out, delays, hang, "")
    }

    /// [`Receiver::start`] answering the first requests with `statuses`
    /// ("503,400"), the rest with 200.
    fn start_with(port: u16, out: PathBuf, delays: &str, hang: &[&str], statuses: &str) -> Receiver {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/support/webhook_receiver.py");
        let mut cmd = Command::new("/usr/bin/python3");
        cmd.arg(script)
            .arg("--port")
            .arg(port.to_string())
            .arg("--out")
            .arg(&out)
            .arg("--delays")
            .arg(delays)
            .arg("--statuses")
            .arg(statuses);
        for h in hang {
            cmd.arg("--hang").arg(h);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the webhook receiver");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "webhook receiver did not start on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Receiver { child, out }
    }

    /// Every request so far (complete lines only).
    fn records(&self) -> Vec<Record> {
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        text.split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad record ({e}): {l}")))
            .collect()
    }

    fn on(&self, path: &str) -> Vec<Record> {
        self.records().into_iter().filter(|r| r.path == path).collect()
    }

    /// Wait until every id in `want` arrived on `path`; returns its records.
    async fn wait_ids(&self, path: &str, want: &HashSet<String>) -> Vec<Record> {
        let deadline = Instant::now() + T;
        loop {
            let recs = self.on(path);
            let got: HashSet<String> = recs.iter().map(|r| r.headers["webhook-id"].clone()).collect();
            if want.is_subset(&got) {
                return recs;
            }
            assert!(
                Instant::now() < deadline,
                "{path}: {} of {} events after {T:?}; missing {:?}",
                want.intersection(&got).count(),
                want.len(),
                want.difference(&got).take(5).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Check one request as a receiver would (Standard Webhooks); returns its
/// body as JSON.
fn verify(r: &Record) -> Value {
    let h = &r.headers;
    assert_eq!(h["content-type"], "application/json", "{r:?}");
    assert!(h["user-agent"].starts_with("sendguard/"), "{r:?}");
    let id = &h["webhook-id"];
    let ts: u64 = h["webhook-timestamp"].parse().expect("numeric timestamp");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(ts.abs_diff(now) < 300, "timestamp {ts} vs now {now}");
    let sig = h["webhook-signature"].strip_prefix("v1,").expect("v1 signature");
    let raw = STANDARD.decode(sig).expect("base64 signature");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET);
    ring::hmac::verify(&key, format!("{id}.{ts}.{}", r.body).as_bytes(), &raw)
        .unwrap_or_else(|_| panic!("signature does not verify: {r:?}"));
    let v: Value = serde_json::from_str(&r.body).expect("JSON body");
    assert_eq!(&v["id"], id.as_str());
    v
}

/// The events log's events matching `pred`, in order.
fn expected(fwd: &Forwarder, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
    fwd.events().into_iter().filter(|e| pred(e)).collect()
}

fn ids(evs: &[Value]) -> HashSet<String> {
    evs.iter().map(|e| e["id"].as_str().unwrap().to_string()).collect()
}

fn outbox(work: &Workdir, name: &str) -> PathBuf {
    work.path("spool").join("webhooks").join(name)
}

/// Lines in an outbox's segments.
fn outbox_lines(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
                .map(|p| std::fs::read_to_string(p).unwrap().lines().count())
                .sum()
        })
        .unwrap_or(0)
}

/// Whether the outbox's saved cursor is at the end of its last segment.
fn outbox_acknowledged(dir: &Path) -> bool {
    let Ok(c) = std::fs::read(dir.join("cursor")) else {
        return false;
    };
    let c: Value = serde_json::from_slice(&c).unwrap();
    let seg = dir.join(format!("{:012}.jsonl", c["segment"].as_u64().unwrap()));
    std::fs::metadata(seg).is_ok_and(|m| m.len() == c["offset"].as_u64().unwrap())
}

async fn wait_until(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + T;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not after {T:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn received_or_delivered_of_local(e: &Value) -> bool {
    (e["event"] == "received" || e["event"] == "delivered") && e["tenant"] == "local"
}

#[tokio::test]
async fn receiver_down_then_slow_then_up_gets_every_event_signed() {
    let sink = Sink::start(&[]);
    let work = Workdir::new();
    let port = free_port();
    let path = "/hooks/sendguard?src=test";
    let sections = forward_config(sink.addr, "", "")
        + &endpoint(
            "ops",
            port,
            path,
            // One POST at a time: events arrive in the events log's order.
            "events = [\"received\", \"delivered\"]\ntenants = [\"local\"]\nconcurrency = 1",
        );
    let fwd = Forwarder::start(&work, &sections).await;

    // Receiver down: mail flows as usual, the events wait in the outbox.
    let started = Instant::now();
    for i in 0..30 {
        submit(&fwd, &["r@dest.example"], &format!("m{i}")).await;
    }
    sink.wait_for(30, T).await;
    fwd.wait_events(30, T, is("delivered")).await;
    let mail = started.elapsed();
    assert!(mail < Duration::from_secs(15), "30 messages took {mail:?}");
    let want = expected(&fwd, received_or_delivered_of_local);
    assert_eq!(want.len(), 60);
    let dir = outbox(&work, "ops");
    wait_until("60 events in the outbox", || outbox_lines(&dir) == 60).await;
    assert!(!outbox_acknowledged(&dir));

    // Up, but slow: the first answer comes after the 2 s timeout (so that
    // event is sent again), the next two after 1 s; then at once.
    let rx = Receiver::start(port, work.path("hooks.jsonl"), "3,1,1", &[]);
    let recs = rx.wait_ids(path, &ids(&want)).await;
    let by_id: HashMap<&str, &Value> = want.iter().map(|e| (e["id"].as_str().unwrap(), e)).collect();
    for r in &recs {
        let body = verify(r);
        assert_eq!(&body, by_id[body["id"].as_str().unwrap()], "body is the event's line");
    }
    assert!(recs.len() > want.len(), "the timed-out POST was retried");
    // in order: first arrivals follow the events log
    let mut seen = HashSet::new();
    let order: Vec<&str> = recs
        .iter()
        .map(|r| r.headers["webhook-id"].as_str())
        .filter(|id| seen.insert(*id))
        .collect();
    let log_order: Vec<&str> = want.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(order, log_order);
    wait_until("outbox acknowledged", || outbox_acknowledged(&dir)).await;
    fwd.stop().await;
}

/// An event is dropped after REFUSALS_TO_DROP refusing 4xx answers, not
/// after one 4xx that follows retries of an unavailable receiver.
#[tokio::test]
async fn one_refusal_after_an_outage_does_not_drop_the_event() {
    let sink = Sink::start(&[]);
    let work = Workdir::new();
    let port = free_port();
    let path = "/hooks";
    let sections =
        forward_config(sink.addr, "", "") + &endpoint("ops", port, path, "events = [\"received\"]\nconcurrency = 1");
    // Unavailable four times (503), then a 400 while it redeploys, then up.
    let rx = Receiver::start_with(port, work.path("hooks.jsonl"), "", &[], "503,503,503,503,400");
    let fwd = Forwarder::start(&work, &sections).await;
    submit(&fwd, &["r@dest.example"], "one").await;
    fwd.wait_events(1, T, is("received")).await;
    let want = expected(&fwd, is("received"));
    assert_eq!(want.len(), 1);
    let recs = rx.wait_ids(path, &ids(&want)).await;
    let id = recs[0].headers["webhook-id"].clone();
    wait_until("the event is sent a sixth time, after the 400", || {
        rx.on(path).iter().filter(|r| r.headers["webhook-id"] == id).count() >= 6
    })
    .await;
    wait_until("outbox acknowledged", || outbox_acknowledged(&outbox(&work, "ops"))).await;
    fwd.stop().await;
}

type Pred = fn(&Value) -> bool;

#[tokio::test]
async fn filters_send_each_endpoint_its_events_only() {
    let sink = Sink::start(&[]);
    let work = Workdir::new();
    let port = free_port();
    let rx = Receiver::start(port, work.path("hooks.jsonl"), "", &[]);
    let sections = forward_config(sink.addr, "", "")
        + &endpoint(
            "local-delivered",
            port,
            "/a",
            "events = [\"delivered\"]\ntenants = [\"local\"]",
        )
        + &endpoint("acme", port, "/b", "tenants = [\"acme\"]")
        + &endpoint("received", port, "/c", "events = [\"received\"]");
    let fwd = Forwarder::start(&work, &sections).await;
    for i in 0..3 {
        submit(&fwd, &["r@dest.example"], &format!("local {i}")).await;
    }
    for i in 0..2 {
        let mut c = Client::connect_authed(fwd.addrs[0]).await;
        c.cmd("MAIL FROM:<app@acme.example>").await.expect(250, "2.1.0");
        c.cmd("RCPT TO:<r@dest.example>").await.expect(250, "2.1.5");
        c.cmd("DATA").await.expect(354, "");
        c.send_raw(format!("Subject: acme {i}\r\n\r\nx\r\n.\r\n").as_bytes())
            .await;
        c.reply().await.expect(250, "2.0.0");
    }
    sink.wait_for(5, T).await;
    fwd.wait_events(5, T, is("delivered")).await;
    let cases: [(&str, Pred, usize); 3] = [
        ("/a", |e| e["event"] == "delivered" && e["tenant"] == "local", 3),
        ("/b", |e| e["tenant"] == "acme", 4),
        ("/c", |e| e["event"] == "received", 5),
    ];
    for (path, pred, n) in cases {
        let want = ids(&expected(&fwd, pred));
        assert!(want.len() >= n, "{path}: {want:?}");
        rx.wait_ids(path, &want).await;
    }
    // nothing else arrives later either
    tokio::time::sleep(Duration::from_millis(700)).await;
    for (path, pred, _) in cases {
        let want = ids(&expected(&fwd, pred));
        let recs = rx.on(path);
        let got: HashSet<String> = recs
            .iter()
            .map(|r| verify(r)["id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(got, want, "{path}");
    }
    fwd.stop().await;
}

#[tokio::test]
async fn backlog_survives_a_restart() {
    let sink = Sink::start(&[]);
    let work = Workdir::new();
    let port = free_port();
    let sections =
        forward_config(sink.addr, "", "") + &endpoint("ops", port, "/h", "events = [\"received\", \"delivered\"]");
    let fwd = Forwarder::start(&work, &sections).await;
    for i in 0..10 {
        submit(&fwd, &["r@dest.example"], &format!("before {i}")).await;
    }
    fwd.wait_events(10, T, is("delivered")).await;
    let dir = outbox(&work, "ops");
    wait_until("20 events in the outbox", || outbox_lines(&dir) == 20).await;
    fwd.stop().await;

    // Same work dir (spool, outbox), receiver up this time.
    let fwd = Forwarder::start(&work, &sections).await;
    let rx = Receiver::start(port, work.path("hooks.jsonl"), "", &[]);
    submit(&fwd, &["r@dest.example"], "after").await;
    fwd.wait_events(11, T, is("delivered")).await;
    let want = expected(&fwd, |e| e["event"] == "received" || e["event"] == "delivered");
    assert_eq!(want.len(), 22);
    for r in rx.wait_ids("/h", &ids(&want)).await {
        verify(&r);
    }
    wait_until("outbox acknowledged", || outbox_acknowledged(&dir)).await;
    fwd.stop().await;
}

#[tokio::test]
async fn a_hung_receiver_delays_only_its_own_endpoint() {
    let sink = Sink::start(&[]);
    let work = Workdir::new();
    let port = free_port();
    let rx = Receiver::start(port, work.path("hooks.jsonl"), "", &["/stuck"]);
    let sections = forward_config(sink.addr, "", "")
        + &endpoint("stuck", port, "/stuck", "events = [\"delivered\"]")
        + &endpoint("fine", port, "/fine", "events = [\"delivered\"]");
    let fwd = Forwarder::start(&work, &sections).await;
    let started = Instant::now();
    for i in 0..20 {
        submit(&fwd, &["r@dest.example"], &format!("m{i}")).await;
    }
    sink.wait_for(20, T).await;
    let delivered = fwd.wait_events(20, T, is("delivered")).await;
    let recs = rx.wait_ids("/fine", &ids(&delivered)).await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(15),
        "mail and the healthy endpoint took {took:?}"
    );
    for r in &recs {
        verify(r);
    }
    // The hung endpoint has its first 4 events in flight (concurrency 4,
    // one connection each) and keeps (re)trying them, never skipping on.
    let first4: HashSet<&str> = delivered[..4].iter().map(|e| e["id"].as_str().unwrap()).collect();
    wait_until("the hung endpoint has 4 POSTs in flight and retried", || {
        let stuck = rx.on("/stuck");
        let distinct: HashSet<String> = stuck.iter().map(|r| r.headers["webhook-id"].clone()).collect();
        distinct.len() == 4 && stuck.len() >= 5
    })
    .await;
    let stuck = rx.on("/stuck");
    assert!(
        stuck.iter().all(|r| first4.contains(r.headers["webhook-id"].as_str())),
        "{stuck:?}"
    );
    assert!(!outbox_acknowledged(&outbox(&work, "stuck")));
    fwd.stop().await;
}
