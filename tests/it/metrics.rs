//! `/metrics` after known traffic: a real Postfix upstream that bounces and
//! defers chosen recipients, SMTP sessions over TCP, the exposition scraped
//! over real HTTP and parsed by the Python `prometheus_client` OpenMetrics
//! parser (a strict, independent implementation of the format).

use std::collections::BTreeMap;
use std::time::Duration;

use hyper::{Method, StatusCode};
use sendguard::admin::client::AdminClient;

use crate::support::client::Client;
use crate::support::postfix::Postfix;
use crate::support::sink::Sink;
use crate::support::*;
use crate::suppression::{TOKEN, admin_section, api};

const T: Duration = Duration::from_secs(30);

/// One parsed sample: metric family type and value.
#[derive(Debug, Clone)]
struct Sample {
    kind: String,
    value: f64,
}

/// Samples keyed by `name{label="v",...}` with labels sorted.
struct Scrape(BTreeMap<String, Sample>);

impl Scrape {
    /// Parse `text` with prometheus_client's OpenMetrics parser; panics
    /// with the parser's error when the exposition is not valid.
    fn parse(text: &str) -> Scrape {
        let script = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        out.append({"name": s.name, "labels": s.labels, "value": s.value, "type": fam.type})
print(json.dumps(out))
"#;
        let mut child = std::process::Command::new("/usr/bin/python3")
            .args(["-c", script])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("python3 runs");
        use std::io::Write;
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "the OpenMetrics parser rejected the exposition: {}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        let mut m = BTreeMap::new();
        for s in v {
            let mut labels: Vec<(String, String)> = s["labels"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect();
            labels.sort();
            let key = format!(
                "{}{{{}}}",
                s["name"].as_str().unwrap(),
                labels
                    .iter()
                    .map(|(k, v)| format!("{k}=\"{v}\""))
                    .collect::<Vec<_>>()
                    .join(",")
            );
            m.insert(
                key,
                Sample {
                    kind: s["type"].as_str().unwrap().to_string(),
                    value: s["value"].as_f64().unwrap(),
                },
            );
        }
        Scrape(m)
    }

    /// The value of `name{labels}` (labels in any order), or 0 when absent.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut l: Vec<_> = labels.to_vec();
        l.sort();
        let key = format!(
            "{name}{{{}}}",
            l.iter()
                .map(|(k, v)| format!("{k}=\"{v}\""))
                .collect::<Vec<_>>()
                .join(",")
        );
        self.0.get(&key).map_or(0.0, |s| s.value)
    }

    /// Sum of every sample of `name` whose labels include `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{name}{{")))
            .filter(|(k, _)| labels.iter().all(|(n, v)| k.contains(&format!("{n}=\"{v}\""))))
            .map(|(_, s)| s.value)
            .sum()
    }

    /// The family type of `name` (its samples may have a suffix such as
    /// `_bucket` or `_count`).
    fn kind(&self, name: &str) -> Option<String> {
        self.0
            .iter()
            .find(|(k, _)| {
                k.strip_prefix(name).is_some_and(|rest| {
                    ["{", "_total{", "_bucket{", "_count{", "_sum{"]
                        .iter()
                        .any(|s| rest.starts_with(s))
                })
            })
            .map(|(_, s)| s.kind.clone())
    }
}

async fn scrape(c: &AdminClient) -> (StatusCode, String, Option<Scrape>) {
    let (status, body) = c.call(Method::GET, "/metrics", None, Vec::new()).await.unwrap();
    let text = String::from_utf8(body).unwrap();
    let parsed = (status == StatusCode::OK).then(|| Scrape::parse(&text));
    (status, text, parsed)
}

async fn refused_sender(addr: std::net::SocketAddr) {
    let (mut c, _) = Client::connect(addr).await;
    c.cmd("EHLO client.test").await;
    c.cmd("MAIL FROM:<boss@not-ours.example>")
        .await
        .expect(550, "5.7.1")
        .token("sender_not_permitted");
    c.cmd("QUIT").await;
}

#[tokio::test]
async fn metrics_count_known_traffic_and_parse_as_openmetrics() {
    let sink = Sink::start(&[]);
    let pf = Postfix::start(
        sink.addr,
        &[
            "bounce.test 550 5.1.1 Recipient address rejected: User unknown",
            "later.test 451 4.7.1 Try again later",
        ],
    );
    let work = Workdir::new();
    let cfg = forward_config(pf.addr, "", "max_age = \"2s\"") + &admin_section("");
    let fwd = Forwarder::start(&work, &cfg).await;
    for i in 0..3 {
        submit(&fwd, &[&format!("ok{i}@ok.test")], "fine").await;
    }
    submit(&fwd, &["gone1@bounce.test", "gone2@bounce.test"], "bad list").await;
    submit(&fwd, &["slow@later.test"], "deferred").await;
    refused_sender(fwd.trusted()).await;
    refused_sender(fwd.trusted()).await;
    fwd.wait_events(2, T, is("bounced")).await;
    fwd.wait_events(1, T, is("expired")).await;
    // Sends by our own tenant: the 3 + 2 + 1 recipients above (DSNs to the
    // sender have the null sender and are counted apart).
    let ours = |e: &serde_json::Value| e["sender"] == "a@local.example" || e["event"] == "received";
    let delivered = fwd.wait_events(3, T, |e| is("delivered")(e) && ours(e)).await.len();
    let deferred = fwd.events().iter().filter(|e| is("deferred")(e) && ours(e)).count();
    assert!(deferred >= 1);

    let c = api(&fwd);
    let (status, text, m) = scrape(&c).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let m = m.unwrap();
    let local = [("tenant", "local"), ("sender_domain", "local.example")];
    assert_eq!(m.get("sendguard_messages_received_total", &local), 5.0, "{text}");
    let outcome = |o: &'static str| {
        let mut l = vec![("outcome", o), ("provider", "other")];
        l.extend_from_slice(&local);
        m.get("sendguard_recipients_total", &l)
    };
    assert_eq!(outcome("delivered"), delivered as f64, "{text}");
    assert_eq!(outcome("bounced"), 2.0, "{text}");
    assert_eq!(outcome("expired"), 1.0, "{text}");
    assert!(outcome("deferred") >= deferred as f64, "{text}");
    assert_eq!(
        m.get(
            "sendguard_delivery_failures_total",
            &[
                ("outcome", "bounced"),
                ("category", "user_unknown"),
                ("failure_stage", "recipient"),
                ("provider", "other")
            ]
        ),
        2.0,
        "{text}"
    );
    assert_eq!(
        m.get(
            "sendguard_refusals_total",
            &[("stage", "mail"), ("reason", "sender_not_permitted")]
        ),
        2.0,
        "{text}"
    );
    // Every event type is counted the way the events log has it.
    let events = fwd.events();
    for kind in ["received", "refused", "bounced", "expired", "dsn_queued"] {
        let n = events.iter().filter(|e| e["event"] == kind).count() as f64;
        assert!(n > 0.0, "{kind}");
        assert_eq!(m.get("sendguard_events_total", &[("event", kind)]), n, "{kind}: {text}");
    }
    // 5 submissions + 2 refused sessions; all said QUIT.
    assert!(m.sum("sendguard_connections_total", &[]) >= 7.0, "{text}");
    assert!(
        m.get("sendguard_sessions_total", &[("outcome", "quit")]) >= 7.0,
        "{text}"
    );
    assert_eq!(m.kind("sendguard_connections_active").as_deref(), Some("gauge"));
    // Histograms: the spool synced, the upstream answered.
    assert_eq!(m.kind("sendguard_spool_fsync_seconds").as_deref(), Some("histogram"));
    assert!(m.get("sendguard_spool_fsync_seconds_count", &[]) >= 1.0, "{text}");
    assert!(m.get("sendguard_spool_commit_batch_messages_sum", &[]) >= 5.0, "{text}");
    assert!(
        m.get("sendguard_upstream_reply_seconds_count", &[("phase", "transaction")]) >= 6.0,
        "{text}"
    );
    assert!(m.get("sendguard_upstream_reply_seconds_count", &[("phase", "connect")]) >= 1.0);
    assert_eq!(m.get("sendguard_delivery_paused", &[]), 0.0);
    assert_eq!(
        m.get("sendguard_build_info", &[("version", env!("CARGO_PKG_VERSION"))]),
        1.0
    );
    // Each metric is declared once, with help text.
    for line in text.lines().filter(|l| l.starts_with("# HELP ")) {
        let name = line.split(' ').nth(2).unwrap();
        assert_eq!(
            text.matches(&format!("# HELP {name} ")).count(),
            1,
            "{name} declared twice"
        );
        assert!(line.len() > format!("# HELP {name} ").len() + 10, "{line}");
    }

    // The token is required unless `admin.public_metrics`.
    let anon = AdminClient::new(&format!("http://{}", fwd.admin.unwrap()), "wrong".into()).unwrap();
    let (status, _, _) = scrape(&anon).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // So do the other observability routes.
    for path in ["/api/v1/messages?rcpt=ok0@ok.test", "/api/v1/webhooks"] {
        let (s, _) = anon.call(Method::GET, path, None, Vec::new()).await.unwrap();
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{path}");
        let (s, body) = c.call(Method::GET, path, None, Vec::new()).await.unwrap();
        assert_eq!(s, StatusCode::OK, "{path}: {}", String::from_utf8_lossy(&body));
    }
    let _ = TOKEN;
    fwd.stop().await;
}

#[tokio::test]
async fn queue_depth_and_age_per_provider_while_delivery_is_paused() {
    let sink = Sink::start(&[]);
    let work = Workdir::new();
    let cfg = forward_config(sink.addr, "", "") + &admin_section("public_metrics = true");
    let fwd = Forwarder::start(&work, &cfg).await;
    let c = api(&fwd);
    let (s, v) = crate::suppression::call(
        &c,
        Method::POST,
        "/api/v1/suspend",
        Some("application/json"),
        r#"{"scope": "delivery", "for": "1h"}"#,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v:?}");
    for i in 0..4 {
        submit(&fwd, &[&format!("r{i}@dest.test")], "held").await;
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // public_metrics: no token needed.
    let anon = AdminClient::new(&format!("http://{}", fwd.admin.unwrap()), "wrong".into()).unwrap();
    let (status, text, m) = scrape(&anon).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let m = m.unwrap();
    assert_eq!(m.get("sendguard_delivery_paused", &[]), 1.0, "{text}");
    assert_eq!(m.get("sendguard_queue_messages", &[]), 4.0, "{text}");
    assert_eq!(
        m.get("sendguard_queue_jobs", &[("provider", "other"), ("state", "ready")]),
        4.0,
        "{text}"
    );
    let age = m.get("sendguard_queue_oldest_age_seconds", &[("provider", "other")]);
    assert!((1.0..60.0).contains(&age), "{age}: {text}");
    assert!(sink.messages().is_empty());
    fwd.stop().await;
}

#[tokio::test]
async fn providers_and_dns_cache_show_in_the_metrics() {
    use crate::support::dns::{TestDns, zone};
    let dns = TestDns::start(&zone(&[
        "gmail-like.test. 300 IN MX 5 aspmx.l.google.com.",
        "corp365.test. 300 IN MX 0 corp365-test.mail.protection.outlook.com.",
    ]));
    let sink = Sink::start(&[]);
    let work = Workdir::new();
    let cfg = forward_config(sink.addr, "", "").replace(
        "[shaping]\ngroup_by_mx = false\n",
        &format!(
            "[dns]\nnameservers = [\"{}\"]\ntimeout = \"500ms\"\nattempts = 1\n",
            dns.addr()
        ),
    ) + &admin_section("");
    let fwd = Forwarder::start(&work, &cfg).await;
    for i in 0..3 {
        submit(
            &fwd,
            &[&format!("u{i}@gmail-like.test"), &format!("u{i}@corp365.test")],
            "hi",
        )
        .await;
    }
    fwd.wait_events(6, T, is("delivered")).await;
    let (status, text, m) = scrape(&api(&fwd)).await;
    assert_eq!(status, StatusCode::OK);
    let m = m.unwrap();
    let local = [
        ("tenant", "local"),
        ("sender_domain", "local.example"),
        ("outcome", "delivered"),
    ];
    for provider in ["google", "microsoft_365"] {
        let mut l = local.to_vec();
        l.push(("provider", provider));
        assert_eq!(m.get("sendguard_recipients_total", &l), 3.0, "{provider}: {text}");
    }
    // Two domains looked up once each over the network; later messages
    // were grouped from the provider cache without asking again.
    assert_eq!(
        m.get("sendguard_dns_cache_lookups_total", &[("result", "miss")]),
        2.0,
        "{text}"
    );
    assert_eq!(m.kind("sendguard_dns_cache_lookups").as_deref(), Some("counter"));
    assert_eq!(m.get("sendguard_dns_lookup_seconds_count", &[]), 2.0, "{text}");
    fwd.stop().await;
}
