//! Fleet mode on a real `redis-server`: two sendguard nodes (each with its
//! own spool, suppression replica and admin API) share suppression,
//! breakers and holds; Redis is killed and restarted empty under load.
//! Also readiness and drain on one node.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use serde_json::json;

use crate::policy::{BREAKERS, UNKNOWN_USER, get, mail_reply, post};
use crate::support::postfix::Postfix;
use crate::support::redis::Redis;
use crate::support::sink::Sink;
use crate::support::*;
use crate::suppression::{admin_section, api, call, rcpt_reply};

const T: Duration = Duration::from_secs(20);

fn cluster_section(redis: &Redis, node: &str) -> String {
    format!(
        "[cluster]\nbackend = \"redis\"\nurl = \"{}\"\nnode_id = \"{node}\"\nkey_prefix = \"sgtest\"\ntimeout = \"300ms\"\n",
        redis.url()
    )
}

async fn node(work: &Workdir, upstream: std::net::SocketAddr, redis: &Redis, id: &str, extra: &str) -> Forwarder {
    let text = forward_config(upstream, "", "") + &admin_section("") + &cluster_section(redis, id) + extra;
    Forwarder::start(work, &text).await
}

/// Nodes `a` and `b` on `redis` with `extra` config, joined; keep the
/// work dirs as long as the nodes.
async fn two_nodes(redis: &Redis, upstream: std::net::SocketAddr, extra: &str) -> (Forwarder, Forwarder, [Workdir; 2]) {
    let work = [Workdir::new(), Workdir::new()];
    let a = node(&work[0], upstream, redis, "a", extra).await;
    let b = node(&work[1], upstream, redis, "b", extra).await;
    joined(&[&a, &b]).await;
    (a, b, work)
}

/// Poll `check` every 20 ms until it holds; returns how long it took.
async fn within<F, Fut>(limit: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Both nodes connected and counting each other.
async fn joined(nodes: &[&Forwarder]) {
    for n in nodes {
        within(T, "node joins the fleet", || async {
            let (_, v) = get(n, "/api/v1/cluster").await;
            // Connected, every node seen, and the shaper on the fleet's
            // leases (until then it runs at a fair share of local limits).
            v["connected"] == true && v["live_nodes"] == nodes.len() && v["shaping"] == "leased"
        })
        .await;
    }
}

async fn refuses(fwd: &Forwarder, rcpt: &str) -> bool {
    rcpt_reply(fwd, rcpt).await.code == 550
}

async fn readyz(fwd: &Forwarder) -> (StatusCode, String) {
    let (s, body) = api(fwd).call(Method::GET, "/readyz", None, Vec::new()).await.unwrap();
    (s, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn a_suppression_added_on_one_node_refuses_on_the_other_within_a_second() {
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let (a, b, _work) = two_nodes(&redis, sink.addr, "").await;
    assert!(!refuses(&b, "gone@dest.example").await);

    let (s, v) = post(
        &a,
        "/api/v1/suppressions",
        json!({"address": "Gone@Dest.Example", "reason": "manual", "source": "ticket 7"}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let took = within(Duration::from_secs(1), "suppression reaches node b", || {
        refuses(&b, "gone@dest.example")
    })
    .await;
    eprintln!("suppression propagated in {took:?}");
    let r = rcpt_reply(&b, "gone@dest.example").await;
    r.expect(550, "5.7.1").token("suppressed");
    // It is in Redis, and in b's own list (its replica) with a's source.
    assert!(
        redis
            .cli(&["HGET", "sgtest:supp", "*|gone@dest.example"])
            .contains("ticket 7"),
        "{}",
        redis.cli(&["HGETALL", "sgtest:supp"])
    );
    let (_, v) = get(&b, "/api/v1/suppressions/gone@dest.example").await;
    assert_eq!(v["entries"][0]["source"], "ticket 7", "{v}");

    // A removal on b reaches a just as fast, and leaves a tombstone.
    let (s, v) = call(
        &api(&b),
        Method::DELETE,
        "/api/v1/suppressions/gone@dest.example",
        None,
        "",
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    within(Duration::from_secs(1), "removal reaches node a", || async {
        !refuses(&a, "gone@dest.example").await
    })
    .await;
    assert_ne!(redis.cli(&["HGET", "sgtest:supp:tomb", "*|gone@dest.example"]), "");

    // A burst of suppressions from many clients at once (as bounces
    // arrive) reaches the other node whole.
    let mut posts = Vec::new();
    for i in 0..40 {
        let api = api(&a);
        posts.push(tokio::spawn(async move {
            let body = json!({"address": format!("burst{i}@dest.example"), "reason": "hard_bounce"}).to_string();
            call(
                &api,
                Method::POST,
                "/api/v1/suppressions",
                Some("application/json"),
                &body,
            )
            .await
            .0
        }));
    }
    for p in posts {
        assert_eq!(p.await.unwrap(), StatusCode::CREATED);
    }
    within(Duration::from_secs(2), "the burst reaches node b", || async {
        let (_, v) = get(&b, "/api/v1/suppressions?address=burst&limit=100").await;
        v["count"] == 40
    })
    .await;

    // A node that starts later loads the list at once.
    post(&a, "/api/v1/suppressions", json!({"address": "late@dest.example"})).await;
    let wc = Workdir::new();
    let c = node(&wc, sink.addr, &redis, "c", "").await;
    within(Duration::from_secs(5), "a new node loads the list", || {
        refuses(&c, "late@dest.example")
    })
    .await;
    assert!(!refuses(&c, "gone@dest.example").await);
    for n in [a, b, c] {
        n.stop().await;
    }
}

#[tokio::test]
async fn a_breaker_opened_by_bounces_on_one_node_refuses_on_the_other() {
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let pf = Postfix::start(sink.addr, &[UNKNOWN_USER]);
    let (wa, wb) = (Workdir::new(), Workdir::new());
    let a = node(&wa, pf.addr, &redis, "a", BREAKERS).await;
    let b = node(&wb, sink.addr, &redis, "b", BREAKERS).await;
    joined(&[&a, &b]).await;
    for i in 0..2 {
        submit(&a, &[&format!("ok{i}@ok.test")], "fine").await;
    }
    for i in 0..3 {
        submit(&a, &[&format!("gone{i}@bounce.test")], "bad list").await;
    }
    a.wait_events(1, T, |e| {
        e["event"] == "breaker" && e["action"] == "open" && e["sender_domain"] == "local.example"
    })
    .await;
    // b sent nothing, yet refuses the sender domain, with a's figures.
    within(Duration::from_secs(1), "breaker reaches node b", || async {
        mail_reply(b.trusted(), "x@local.example").await.code == 451
    })
    .await;
    let r = crate::policy::refused_by_breaker(b.trusted(), "x@local.example").await;
    assert!(r.text().contains("on node a"), "{}", r.text());
    let ev = b
        .wait_events(1, T, |e| e["event"] == "breaker" && e["action"] == "open")
        .await;
    assert!(ev.iter().any(|e| e["sender_domain"] == "local.example"), "{ev:?}");

    // An operator resets both breakers on b: a accepts again.
    crate::policy::reset_local_breakers(&b).await;
    within(Duration::from_secs(1), "reset reaches node a", || async {
        mail_reply(a.trusted(), "x@local.example").await.code == 250
    })
    .await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_suspension_on_one_node_holds_mail_on_every_node() {
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let (a, b, _work) = two_nodes(&redis, sink.addr, "").await;
    let (s, v) = post(
        &a,
        "/api/v1/suspend",
        json!({"scope": "tenant", "tenant": "local", "for": "1h", "reason": "incident 12"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    within(Duration::from_secs(1), "hold reaches node b", || async {
        let (_, q) = get(&b, "/api/v1/queues").await;
        q["tenant_holds"]
            .as_array()
            .is_some_and(|h| h.iter().any(|x| x["key"] == "local"))
    })
    .await;
    // A node that joins now adopts the hold.
    let wc = Workdir::new();
    let c = node(&wc, sink.addr, &redis, "c", "").await;
    within(Duration::from_secs(5), "a new node adopts the hold", || async {
        let (_, q) = get(&c, "/api/v1/queues").await;
        q["tenant_holds"]
            .as_array()
            .is_some_and(|h| h.iter().any(|x| x["key"] == "local"))
    })
    .await;
    submit(&c, &["held-c@dest.example"], "held on c").await;
    submit(&b, &["held@dest.example"], "held").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(sink.messages().is_empty(), "mail went out during the hold");
    let (_, q) = get(&b, "/api/v1/queues").await;
    assert_eq!(q["messages"], 1, "{q}");
    assert_eq!(get(&c, "/api/v1/queues").await.1["messages"], 1);
    assert!(
        q["tenant_holds"][0]["reason"].as_str().unwrap().contains("incident 12"),
        "{q}"
    );

    // Resumed on b: a's hold is gone too, and b's held message goes.
    let (s, v) = post(&b, "/api/v1/resume", json!({"scope": "tenant", "tenant": "local"})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    sink.wait_for(2, T).await;
    within(Duration::from_secs(1), "resume reaches node a", || async {
        let (_, q) = get(&a, "/api/v1/queues").await;
        q["tenant_holds"].as_array().is_some_and(|h| h.is_empty())
    })
    .await;
    assert_eq!(redis.cli(&["HLEN", "sgtest:state"]), "0");
    for n in [a, b, c] {
        n.stop().await;
    }
}

/// Sends through `fwd` until `stop`, each message to `load@dest.example`
/// and to the address suppressed before the outage (refused at RCPT, or
/// the test fails below); returns the subjects answered 250.
async fn load(fwd_addr: std::net::SocketAddr, tag: &'static str, stop: Arc<AtomicBool>) -> Vec<String> {
    let mut accepted = Vec::new();
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        let subject = format!("{tag}-{i}");
        let (mut c, _) = client::Client::connect(fwd_addr).await;
        c.cmd("EHLO client.test").await;
        c.cmd("MAIL FROM:<a@local.example>").await.expect(250, "2.1.0");
        let ok = c.cmd("RCPT TO:<load@dest.example>").await.code == 250;
        let _ = c.cmd("RCPT TO:<before@dest.example>").await;
        if ok && c.cmd("DATA").await.code == 354 {
            c.send_raw(format!("Subject: {subject}\r\n\r\nx\r\n.\r\n").as_bytes())
                .await;
            if c.reply().await.code == 250 {
                accepted.push(subject);
            }
        }
        let _ = c.cmd("QUIT").await;
        i += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    accepted
}

#[tokio::test]
async fn killing_redis_under_load_loses_no_mail_and_mails_no_suppressed_address() {
    let mut redis = Redis::start();
    let sink = Sink::start(&[]);
    let (a, b, _work) = two_nodes(&redis, sink.addr, "").await;
    post(&a, "/api/v1/suppressions", json!({"address": "before@dest.example"})).await;
    within(Duration::from_secs(1), "suppression reaches b", || {
        refuses(&b, "before@dest.example")
    })
    .await;
    assert_eq!(readyz(&a).await.0, StatusCode::OK);

    let stop = Arc::new(AtomicBool::new(false));
    let la = tokio::spawn(load(a.trusted(), "a", Arc::clone(&stop)));
    let lb = tokio::spawn(load(b.trusted(), "b", Arc::clone(&stop)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.kill();

    // Degraded, visibly, but still ready (every node sees the outage; all
    // unready would be a total one): readiness, metrics and the cluster
    // view say so.
    for n in [&a, &b] {
        within(Duration::from_secs(5), "node notices the outage", || async {
            let (s, body) = readyz(n).await;
            s == StatusCode::OK && body.contains("degraded: cluster backend unavailable")
        })
        .await;
        let (_, v) = get(n, "/api/v1/cluster").await;
        assert_eq!(v["degraded"], true, "{v}");
        within(Duration::from_secs(2), "the shaper runs at fair shares", || async {
            get(n, "/api/v1/cluster").await.1["shaping"] == "fair_share"
        })
        .await;
        let (_, body) = api(n).call(Method::GET, "/metrics", None, Vec::new()).await.unwrap();
        let text = String::from_utf8(body).unwrap();
        assert!(text.contains("sendguard_cluster_degraded 1\n"), "{text}");
    }
    // The replica still refuses what was suppressed before the outage.
    assert!(refuses(&a, "before@dest.example").await);
    assert!(refuses(&b, "before@dest.example").await);
    // A suppression added during the outage holds on its node at once...
    let (s, v) = post(&a, "/api/v1/suppressions", json!({"address": "during@dest.example"})).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert!(refuses(&a, "during@dest.example").await);
    // ...but a removal is refused: it could not reach the other node.
    let (s, v) = call(
        &api(&b),
        Method::DELETE,
        "/api/v1/suppressions/before@dest.example",
        None,
        "",
    )
    .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Redis returns with nothing in it: the nodes rebuild the shared list
    // from their replicas.
    redis.restart();
    joined(&[&a, &b]).await;
    within(Duration::from_secs(5), "b learns a's outage suppression", || {
        refuses(&b, "during@dest.example")
    })
    .await;
    assert!(refuses(&b, "before@dest.example").await);
    assert_eq!(redis.cli(&["HLEN", "sgtest:supp"]), "2");
    for n in [&a, &b] {
        within(Duration::from_secs(5), "node no longer degraded", || async {
            readyz(n).await == (StatusCode::OK, "ready\n".to_string())
        })
        .await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut accepted = la.await.unwrap();
    accepted.extend(lb.await.unwrap());
    assert!(accepted.len() >= 20, "only {} messages accepted", accepted.len());

    // Every message answered 250 reached the upstream; nothing suppressed did.
    let got = sink.wait_for(accepted.len(), T).await;
    let subjects: std::collections::HashSet<String> = got
        .iter()
        .filter_map(|m| {
            m.body
                .lines()
                .find_map(|l| l.strip_prefix("Subject: ").map(str::to_string))
        })
        .collect();
    for s in &accepted {
        assert!(subjects.contains(s), "{s} was accepted but not delivered");
    }
    assert!(
        got.iter().all(|m| m.rcpts.iter().all(|r| !r.contains("before@"))),
        "a suppressed address was mailed"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn drain_stops_accepting_and_reports_not_ready_while_delivery_goes_on() {
    let sink = Sink::start(&[]);
    let work = Workdir::new();
    let fwd = Forwarder::start(&work, &(forward_config(sink.addr, "", "") + &admin_section(""))).await;
    assert_eq!(readyz(&fwd).await, (StatusCode::OK, "ready\n".to_string()));
    // /readyz and /healthz need no token (probes carry none).
    let anon =
        sendguard::admin::client::AdminClient::new(&format!("http://{}", fwd.admin.unwrap()), String::new()).unwrap();
    let (s, _) = anon.call(Method::GET, "/readyz", None, Vec::new()).await.unwrap();
    assert_eq!(s, StatusCode::OK);
    let (s, _) = anon.call(Method::GET, "/api/v1/drain", None, Vec::new()).await.unwrap();
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    // A message waits in the queue (its tenant is held) across the drain.
    let hold = json!({"scope": "tenant", "tenant": "local", "for": "1h"});
    assert_eq!(post(&fwd, "/api/v1/suspend", hold).await.0, StatusCode::OK);
    submit(&fwd, &["queued@dest.example"], "queued before the drain").await;
    let (mut idle, _) = client::Client::connect(fwd.trusted()).await;
    idle.cmd("EHLO client.test").await.expect(250, "");
    // The submitting session ends on its I/O thread just after its 221.
    within(Duration::from_secs(5), "one session left", || async {
        get(&fwd, "/api/v1/drain").await.1 == json!({"draining": false, "sessions": 1})
    })
    .await;

    // The real CLI drains it (as a preStop hook would) and waits for the
    // idle session to be closed.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_sendguard"))
        .args(["drain", "--url", &format!("http://{}", fwd.admin.unwrap())])
        .args(["--token", crate::suppression::TOKEN, "--wait", "10s"])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("drained: no SMTP session open"), "{stderr}");
    let r = idle.reply().await;
    r.expect(421, "4.3.2");

    let (s, body) = readyz(&fwd).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("draining"), "{body}");
    assert!(
        tokio::net::TcpStream::connect(fwd.trusted()).await.is_err(),
        "a draining node still accepts connections"
    );
    let (_, body) = api(&fwd).call(Method::GET, "/metrics", None, Vec::new()).await.unwrap();
    assert!(String::from_utf8(body).unwrap().contains("sendguard_draining 1\n"));
    // Delivery goes on while draining.
    assert!(sink.messages().is_empty());
    let resume = json!({"scope": "tenant", "tenant": "local"});
    assert_eq!(post(&fwd, "/api/v1/resume", resume).await.0, StatusCode::OK);
    let got = sink.wait_for(1, T).await;
    assert!(got[0].body.contains("queued before the drain"));
    fwd.stop().await;
}

#[tokio::test]
async fn readiness_fails_when_the_spool_is_not_writable() {
    let sink = Sink::start(&[]);
    let work = Workdir::new();
    let fwd = Forwarder::start(&work, &(forward_config(sink.addr, "", "") + &admin_section(""))).await;
    assert_eq!(readyz(&fwd).await.0, StatusCode::OK);
    // The spool's directory goes away (a lost mount looks like this).
    let spool = work.path("spool");
    let moved = work.path("spool.gone");
    std::fs::rename(&spool, &moved).unwrap();
    let (s, body) = readyz(&fwd).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("spool.dir is not writable"), "{body}");
    std::fs::rename(&moved, &spool).unwrap();
    assert_eq!(readyz(&fwd).await.0, StatusCode::OK);
    fwd.stop().await;
}

/// Delivered events of all `nodes` with their times (unix seconds).
fn delivered_times(nodes: &[&Forwarder]) -> Vec<f64> {
    let mut out: Vec<f64> = nodes
        .iter()
        .flat_map(|n| n.events())
        .filter(|e| e["event"] == "delivered")
        .map(|e| {
            let t = humantime::parse_rfc3339(e["ts"].as_str().unwrap()).unwrap();
            t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
        })
        .collect();
    out.sort_by(f64::total_cmp);
    out
}

/// Deliveries per second from `from` (unix seconds) over `secs`.
fn rate_over(times: &[f64], from: f64, secs: f64) -> f64 {
    times.iter().filter(|t| **t >= from && **t < from + secs).count() as f64 / secs
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[tokio::test]
async fn a_provider_rate_is_the_fleets_and_falls_back_to_fair_shares_without_redis() {
    let mut redis = Redis::start();
    let sink = Sink::start(&[]);
    // 40 messages a second to the provider, for the whole fleet.
    let shaping = "[[shaping.provider]]\nname = \"other\"\nrate = \"40/s\"\n";
    let (a, b, _work) = two_nodes(&redis, sink.addr, shaping).await;
    // A backlog on both nodes: delivery paused (fleet-wide) while it builds.
    let pause = json!({"scope": "delivery", "for": "1h"});
    assert_eq!(post(&a, "/api/v1/suspend", pause).await.0, StatusCode::OK);
    within(Duration::from_secs(1), "pause reaches b", || async {
        get(&b, "/api/v1/queues").await.1["paused"].is_object()
    })
    .await;
    let per_node = 300;
    let fill = |n: &Forwarder, tag: &'static str| {
        let addr = n.trusted();
        async move {
            for i in 0..per_node {
                let body = format!("Subject: {tag}{i}\r\n\r\nx\r\n");
                send_trusted(addr, "a@local.example", &[&format!("r{i}@dest.example")], &body)
                    .await
                    .expect(250, "2.0.0");
            }
        }
    };
    tokio::join!(fill(&a, "a"), fill(&b, "b"));
    assert!(sink.messages().is_empty());
    let (s, _) = post(&b, "/api/v1/resume", json!({"scope": "delivery"})).await;
    assert_eq!(s, StatusCode::OK);
    let start = unix_now();

    // Both nodes deliver, and together at the fleet's rate (not 2 × 40).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let times = delivered_times(&[&a, &b]);
    let leased = rate_over(&times, start + 1.0, 4.0);
    let from_a = a.events().iter().filter(|e| e["event"] == "delivered").count();
    let from_b = b.events().iter().filter(|e| e["event"] == "delivered").count();
    eprintln!("leased: {leased:.1}/s combined; a {from_a}, b {from_b} delivered");
    assert!(
        (38.0..=42.0).contains(&leased),
        "combined rate {leased:.1}/s, limit 40/s"
    );
    assert!(from_a > 40 && from_b > 40, "a {from_a}, b {from_b}: one node starved");
    let (_, q) = get(&a, "/api/v1/queues").await;
    assert!(
        q["messages"].as_u64().unwrap() > 0,
        "backlog ran out before the window ended"
    );

    // Redis goes away: each node falls back to half the rate (2 live nodes).
    redis.kill();
    for n in [&a, &b] {
        within(Duration::from_secs(5), "node notices the outage", || async {
            get(n, "/api/v1/cluster").await.1["connected"] == false
        })
        .await;
    }
    let start = unix_now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let times = delivered_times(&[&a, &b]);
    let fair = rate_over(&times, start + 0.5, 4.0);
    eprintln!("fair share: {fair:.1}/s combined");
    for n in [&a, &b] {
        let (_, q) = get(n, "/api/v1/queues").await;
        assert!(
            q["messages"].as_u64().unwrap() > 0,
            "a backlog ran out during the window: {q}"
        );
    }
    assert!(
        (36.0..=42.0).contains(&fair),
        "combined rate {fair:.1}/s without Redis, limit 40/s"
    );
    a.stop().await;
    b.stop().await;
}

async fn connected(n: &Forwarder) -> bool {
    get(n, "/api/v1/cluster").await.1["connected"] == true
}

/// A node with this `[cluster]` text (a node that cannot connect still
/// starts, and takes mail on its local state).
async fn node_with(work: &Workdir, upstream: std::net::SocketAddr, cluster: &str) -> Forwarder {
    let text = forward_config(upstream, "", "") + &admin_section("") + cluster;
    Forwarder::start(work, &text).await
}

#[tokio::test]
async fn redis_with_a_password_and_over_verified_tls() {
    let sink = Sink::start(&[]);
    let redis = Redis::with_password("s3cret-pw");
    let work = Workdir::new();
    std::fs::write(work.path("redis.pw"), "s3cret-pw\n").unwrap();
    let base = format!(
        "[cluster]\nbackend = \"redis\"\nurl = \"redis://{}/\"\ntimeout = \"300ms\"\n",
        redis.addr
    );
    let good = node_with(&work, sink.addr, &format!("{base}password_file = \"redis.pw\"\n")).await;
    within(T, "connects with the password file", || connected(&good)).await;
    good.stop().await;
    let work = Workdir::new();
    let url = format!("redis://:wrong-pw@{}/", redis.addr);
    let bad = node_with(
        &work,
        sink.addr,
        &base.replace(&format!("redis://{}/", redis.addr), &url),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!connected(&bad).await);
    // Never synchronized with the fleet: not ready (its replica may miss
    // suppressions), and the reason does not quote the password.
    let (s, body) = readyz(&bad).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("cluster backend not synchronized yet"), "{body}");
    assert!(!body.contains("wrong-pw"), "{body}");
    // Not connected is not down: mail is still taken and delivered.
    submit(&bad, &["x@dest.example"], "no fleet").await;
    sink.wait_for(1, T).await;
    bad.stop().await;

    // TLS: verified against the configured CA; the system roots do not
    // know the test CA, so without ca_file the node never connects.
    let tls = Redis::with_tls();
    let base = format!(
        "[cluster]\nbackend = \"redis\"\nurl = \"rediss://localhost:{}/\"\ntimeout = \"300ms\"\n",
        tls.addr.port()
    );
    let work = Workdir::new();
    let verified = node_with(&work, sink.addr, &format!("{base}ca_file = \"ca.pem\"\n")).await;
    within(T, "connects over TLS", || connected(&verified)).await;
    verified.stop().await;
    let work = Workdir::new();
    let untrusted = node_with(&work, sink.addr, &base).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!connected(&untrusted).await, "connected to a server it cannot verify");
    untrusted.stop().await;
}

#[tokio::test]
async fn a_provider_with_a_burst_sends_a_single_message_at_once() {
    // The shipped example's shape: 300/min with a burst of 10, one message.
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let shaping = "[[shaping.provider]]\nname = \"other\"\nrate = \"300/min\"\nburst = 10\n";
    let work = Workdir::new();
    let a = node(&work, sink.addr, &redis, "a", shaping).await;
    joined(&[&a]).await;
    for i in 0..3 {
        submit(&a, &[&format!("one{i}@dest.example")], "trickle").await;
        sink.wait_for(i + 1, Duration::from_secs(2)).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    a.stop().await;
}

/// A fleet rate slower than one per 10 s: the token another node reserves
/// after the first message is used at its time, one interval later, not
/// earlier (the lease's offset was capped at 10 s; each node's own GCRA
/// did not hold the second node back).
#[tokio::test]
async fn a_slow_fleet_rate_holds_across_nodes() {
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let shaping = "[[shaping.provider]]\nname = \"other\"\nrate = \"4/min\"\nburst = 1\n";
    let (a, b, _work) = two_nodes(&redis, sink.addr, shaping).await;
    // The first token's time is after t0, so the next one's is after t0 + 15 s.
    let t0 = std::time::Instant::now();
    submit(&a, &["slow1@dest.example"], "slow").await;
    sink.wait_for(1, Duration::from_secs(3)).await;
    submit(&b, &["slow2@dest.example"], "slow").await;
    tokio::time::sleep(Duration::from_secs(13).saturating_sub(t0.elapsed())).await;
    assert_eq!(
        sink.messages().len(),
        1,
        "the second node sent before the fleet's next token"
    );
    sink.wait_for(2, Duration::from_secs(8)).await;
    a.stop().await;
    b.stop().await;
}

/// RCPT replies for `n` recipients of one transaction through `fwd`.
async fn rcpt_codes(fwd: &Forwarder, from: &str, n: usize, tag: &str) -> Vec<client::Resp> {
    let (mut c, _) = client::Client::connect(fwd.trusted()).await;
    c.cmd("EHLO client.test").await;
    c.cmd(&format!("MAIL FROM:<{from}>")).await.expect(250, "2.1.0");
    let mut out = Vec::new();
    for i in 0..n {
        out.push(c.cmd(&format!("RCPT TO:<{tag}{i}@dest.example>")).await);
    }
    let _ = c.cmd("RSET").await;
    let _ = c.cmd("QUIT").await;
    out
}

#[tokio::test]
async fn a_budget_and_a_warmup_cap_hold_for_the_fleet_and_split_without_redis() {
    let mut redis = Redis::start();
    let sink = Sink::start(&[]);
    let today = {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let (y, m, d) = sendguard::throttle::civil_from_days((secs / 86_400) as i64);
        format!("{y:04}-{m:02}-{d:02}")
    };
    let policy = "[[budget]]\nscope = \"tenant\"\nmatch = \"local\"\nrecipients = [\"10/h\"]\n";
    let (a, b, _work) = two_nodes(&redis, sink.addr, policy).await;
    // The fleet task switches the budgets to leases within 250 ms.
    tokio::time::sleep(Duration::from_millis(400)).await;
    // The tenant's 10 recipients an hour are the fleet's: 6 through a, then
    // 4 through b, then b and a refuse.
    let ra = rcpt_codes(&a, "x@local.example", 6, "a").await;
    assert!(ra.iter().all(|r| r.code == 250), "{ra:?}");
    let rb = rcpt_codes(&b, "x@local.example", 6, "b").await;
    let ok = rb.iter().filter(|r| r.code == 250).count();
    assert_eq!(ok, 4, "{rb:?}");
    rb.last().unwrap().expect(451, "4.7.1").token("budget_exceeded");
    rcpt_codes(&a, "x@local.example", 1, "a-again").await[0]
        .expect(451, "4.7.1")
        .token("budget_exceeded");

    // Redis goes away: each node has half of a fresh budget (5 of 10).
    redis.kill();
    for n in [&a, &b] {
        within(Duration::from_secs(5), "node notices the outage", || async {
            get(n, "/api/v1/cluster").await.1["connected"] == false
        })
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The counters this node kept (6 here, 4 there) still count locally:
    // a is over its share of 5, b has 1 left.
    rcpt_codes(&a, "x@local.example", 1, "a-down").await[0].expect(451, "4.7.1");
    let rb = rcpt_codes(&b, "x@local.example", 3, "b-down").await;
    assert_eq!(rb.iter().filter(|r| r.code == 250).count(), 1, "{rb:?}");
    a.stop().await;
    b.stop().await;

    // Warm-up: a new domain's 6 recipients today are the fleet's.
    let mut redis = Redis::start();
    let warm = format!("[[warmup]]\nsender_domain = \"local.example\"\nstart = \"{today}\"\ndaily = [6]\n");
    let (a, b, _work) = two_nodes(&redis, sink.addr, &warm).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let ra = rcpt_codes(&a, "x@local.example", 4, "wa").await;
    assert!(ra.iter().all(|r| r.code == 250), "{ra:?}");
    let rb = rcpt_codes(&b, "x@local.example", 4, "wb").await;
    assert_eq!(rb.iter().filter(|r| r.code == 250).count(), 2, "{rb:?}");
    rb.last().unwrap().expect(451, "4.7.1").token("warmup_limit");
    redis.kill();
    a.stop().await;
    b.stop().await;
}

/// 16 sessions at once, 8 per node, 5 recipients each; returns how many
/// recipients were accepted.
async fn concurrent_rcpts(a: &Forwarder, b: &Forwarder, tag: &'static str) -> usize {
    let mut tasks = Vec::new();
    for i in 0..16 {
        let fwd = if i % 2 == 0 { a.trusted() } else { b.trusted() };
        tasks.push(tokio::spawn(async move {
            let (mut c, _) = client::Client::connect(fwd).await;
            c.cmd("EHLO client.test").await;
            c.cmd("MAIL FROM:<x@local.example>").await.expect(250, "2.1.0");
            let mut ok = 0;
            for j in 0..5 {
                if c.cmd(&format!("RCPT TO:<{tag}{i}-{j}@dest.example>")).await.code == 250 {
                    ok += 1;
                }
            }
            let _ = c.cmd("QUIT").await;
            ok
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total
}

#[tokio::test]
async fn concurrent_sessions_never_exceed_a_fleet_budget() {
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let policy = "[[budget]]\nscope = \"tenant\"\nmatch = \"local\"\nrecipients = [\"100/h\"]\n";
    let (a, b, _work) = two_nodes(&redis, sink.addr, policy).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    // 80 asked at once under 100: all taken (one lease in flight per key
    // and node, so concurrent sessions do not over-lease).
    let first = concurrent_rcpts(&a, &b, "p").await;
    assert_eq!(first, 80);
    // 80 more at once: never over the fleet's 100.
    let second = concurrent_rcpts(&a, &b, "q").await;
    assert!(second <= 20, "{second} accepted with 20 left in the fleet's budget");
    rcpt_codes(&b, "x@local.example", 1, "over").await[0]
        .expect(451, "4.7.1")
        .token("budget_exceeded");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn budget_tokens_a_node_leased_and_did_not_use_go_back_to_the_fleet() {
    let redis = Redis::start();
    let sink = Sink::start(&[]);
    let policy = "[[budget]]\nscope = \"tenant\"\nmatch = \"local\"\nrecipients = [\"100/h\"]\n";
    let (a, b, _work) = two_nodes(&redis, sink.addr, policy).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Four recipients on a: batches of 1, 2 and 4 tokens, so a holds 3.
    let ra = rcpt_codes(&a, "x@local.example", 4, "a").await;
    assert!(ra.iter().all(|r| r.code == 250), "{ra:?}");
    // b gets the rest of the fleet's 100: 100 - 7 leased by a.
    let rb = rcpt_codes(&b, "x@local.example", 100, "b").await;
    assert_eq!(rb.iter().filter(|r| r.code == 250).count(), 93);
    // a's 3 lapse after 10 s and go back to Redis; b gets them.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let rb = rcpt_codes(&b, "x@local.example", 5, "late").await;
    assert_eq!(rb.iter().filter(|r| r.code == 250).count(), 3, "{rb:?}");
    a.stop().await;
    b.stop().await;
}
