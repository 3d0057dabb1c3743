//! Rate policy end to end: recipient domains grouped into providers by the
//! MX records a real DNS server (unbound) serves, a real upstream (Postfix)
//! whose access map answers a provider's recipients with Gmail's
//! `421 4.7.28` or a relay refusal, and the shaper's reaction seen in the
//! events log and the queue's shaping view.

use std::time::Duration;

use crate::support::dns::{TestDns, zone};
use crate::support::postfix::Postfix;
use crate::support::sink::Sink;
use crate::support::*;

const T: Duration = Duration::from_secs(30);

const GMAIL_421: &str = "421 4.7.28 [192.0.2.1] Our system has detected an unusual rate of unsolicited mail originating from your IP address. To protect our users from spam, mail sent from your IP address has been temporarily rate limited.";

/// Recipient domains hosted at real providers' MX hosts, and one elsewhere.
fn provider_zones() -> TestDns {
    TestDns::start(&zone(&[
        "gmail-like.test. 300 IN MX 10 alt1.aspmx.l.google.com.",
        "gmail-like.test. 300 IN MX 5 aspmx.l.google.com.",
        "corp365.test. 300 IN MX 0 corp365-test.mail.protection.outlook.com.",
        "plain.test. 300 IN MX 10 mx.plain.test.",
    ]))
}

/// A forwarder to `relay` looking recipient domains up at `dns`, with
/// `shaping` added to its `[shaping]` section.
async fn shaped(work: &Workdir, relay: std::net::SocketAddr, dns: &TestDns, shaping: &str) -> Forwarder {
    // Postfix re-reads its access map in new smtpd processes only: one
    // transaction per connection, so changes apply to the next attempt.
    let sections = forward_config(relay, "max_messages_per_connection = 1", "").replace(
        "[shaping]\ngroup_by_mx = false\n",
        &format!(
            "[dns]\nnameservers = [\"{}\"]\ntimeout = \"500ms\"\nattempts = 1\n[shaping]\n{shaping}\n",
            dns.addr()
        ),
    );
    Forwarder::start(work, &sections).await
}

/// A forwarder whose upstream, a real Postfix, answers Gmail's
/// `421 4.7.28` for every recipient at gmail-like.test (MX at Google).
struct Throttled {
    fwd: Forwarder,
    pf: Postfix,
    _sink: Sink,
    _dns: TestDns,
    _work: Workdir,
}

async fn gmail_throttled(shaping: &str) -> Throttled {
    let dns = provider_zones();
    let sink = Sink::start(&[]);
    let throttle = format!("gmail-like.test {GMAIL_421}");
    let pf = Postfix::start(sink.addr, &[&throttle]);
    let work = Workdir::new();
    let fwd = shaped(&work, pf.addr, &dns, shaping).await;
    Throttled {
        fwd,
        pf,
        _sink: sink,
        _dns: dns,
        _work: work,
    }
}

fn ms(ev: &serde_json::Value) -> u64 {
    let t = humantime::parse_rfc3339(ev["ts"].as_str().unwrap()).unwrap();
    t.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

#[tokio::test]
async fn gmail_throttle_slows_google_while_other_providers_flow() {
    let Throttled {
        fwd,
        pf,
        _sink,
        _dns,
        _work,
    } = gmail_throttled("[[shaping.provider]]\nname = \"google\"\nrate = \"10/s\"\n").await;

    submit(&fwd, &["u1@gmail-like.test"], "first").await;
    // Postfix's 421 is classified as Gmail's rate limit, and the built-in
    // rule halves local.example's rate at Google.
    let d = fwd.wait_events(1, T, is("deferred")).await;
    assert_eq!(d[0]["provider"], "google", "{d:?}");
    assert_eq!(d[0]["category"], "rate_limited", "{d:?}");
    assert!(
        d[0]["reply"]["text"].as_str().unwrap().contains("unusual rate"),
        "{d:?}"
    );
    let b = fwd.wait_events(1, T, is("backoff")).await;
    assert_eq!(b[0]["rule"], "gmail_rate_limited", "{b:?}");
    assert_eq!(b[0]["action"], "slow");
    assert_eq!(b[0]["provider"], "google");
    assert_eq!(b[0]["sender_domain"], "local.example");
    assert_eq!(b[0]["tenant"], "local");
    let view = fwd.queue.shaping();
    let google = view
        .providers
        .iter()
        .find(|p| p.provider == "google")
        .expect("google in view");
    assert_eq!(google.pairs[0].sender_domain, "local.example");
    // Halved per 421: once, or more if the retry (200 ms later) was
    // throttled again before this look.
    let factor = google.pairs[0].factor;
    assert!(factor == 0.5 || factor == 0.25 || factor == 0.125, "{factor}");
    assert_eq!(google.rate.as_deref(), Some("10/s"));

    // Other providers are not held back.
    submit(&fwd, &["a@corp365.test"], "to 365").await;
    submit(&fwd, &["b@plain.test"], "elsewhere").await;
    let delivered = fwd.wait_events(2, T, is("delivered")).await;
    let provider_of = |rcpt: &str| {
        delivered
            .iter()
            .find(|e| e["rcpt"] == rcpt)
            .map(|e| e["provider"].as_str().unwrap().to_string())
    };
    assert_eq!(provider_of("a@corp365.test").as_deref(), Some("microsoft_365"));
    assert_eq!(provider_of("b@plain.test").as_deref(), Some("other"));

    // Google accepts again: the deferred message goes (once Postfix has
    // reloaded), then ten more at the slowed rate: 5/s, one per 200 ms,
    // instead of 10/s. (Delivery times include Postfix's transaction
    // time, which varies, so the bound sits between nine intervals at 5/s
    // and at 10/s.)
    pf.set_access(&[]);
    pf.reload();
    fwd.wait_events(1, T, |e| e["event"] == "delivered" && e["rcpt"] == "u1@gmail-like.test")
        .await;
    for i in 0..10 {
        submit(&fwd, &[&format!("n{i}@gmail-like.test")], "next").await;
    }
    let next = |e: &serde_json::Value| {
        e["event"] == "delivered" && e["provider"] == "google" && e["rcpt"].as_str().unwrap().starts_with('n')
    };
    let g = fwd.wait_events(10, T, next).await;
    let (first, last) = (ms(&g[0]), ms(&g[9]));
    assert!(
        last - first >= 1300,
        "10 deliveries at google within {} ms: not slowed to 5/s: {:?}",
        last - first,
        g.iter()
            .map(|e| (ms(e) - first, e["rcpt"].as_str().unwrap().to_string()))
            .collect::<Vec<_>>()
    );
    fwd.stop().await;
}

#[tokio::test]
async fn a_slowed_pair_recovers_and_suspensions_hold_only_their_pair() {
    // An operator rule before the built-in ones, short enough for a test.
    let Throttled { fwd, pf, _sink, _dns, _work } = gmail_throttled(
        "[[shaping.backoff]]\nname = \"test_gmail\"\nprovider = \"google\"\ncategory = \"rate_limited\"\naction = \"slow\"\nfactor = 0.25\nduration = \"1s\"\nrecover = \"1s\"\n",
    )
    .await;
    submit(&fwd, &["u1@gmail-like.test"], "first").await;
    let b = fwd.wait_events(1, T, is("backoff")).await;
    assert_eq!(b[0]["rule"], "test_gmail");
    let slowed = fwd.queue.shaping();
    let pair = &slowed.providers.iter().find(|p| p.provider == "google").unwrap().pairs[0];
    assert!(pair.factor <= 0.25 && pair.slowed_until_ms.is_some(), "{pair:?}");
    // Google stops throttling (each further 421 would slow the pair more).
    pf.set_access(&[]);
    pf.reload();
    // The rate climbs back: after duration + recover the pair is normal
    // again (no longer listed as slowed), and the deferred message went.
    fwd.wait_events(1, T, |e| e["event"] == "delivered" && e["rcpt"] == "u1@gmail-like.test")
        .await;
    let deadline = std::time::Instant::now() + T;
    loop {
        let v = fwd.queue.shaping();
        if v.providers.iter().all(|p| p.pairs.is_empty()) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still slowed: {v:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // An operator suspends google for local.example: plain.test still flows.
    fwd.queue.with_shaper(|s, now| {
        s.back_off(
            now,
            &sendguard::rate::shaper::Lane {
                provider: "google".into(),
                tenant: "local".into(),
                sender_domain: "local.example".into(),
            },
            &sendguard::rate::policy::BackoffRule {
                name: "operator".into(),
                provider: None,
                category: None,
                pattern: None,
                action: sendguard::rate::policy::Action::Suspend,
                factor: 1.0,
                duration: Duration::from_secs(3600),
                recover: Duration::from_secs(1),
            },
        )
    });
    submit(&fwd, &["held@gmail-like.test"], "held").await;
    submit(&fwd, &["free@plain.test"], "free").await;
    fwd.wait_events(1, T, |e| e["event"] == "delivered" && e["rcpt"] == "free@plain.test")
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !fwd.events()
            .iter()
            .any(|e| e["event"] == "delivered" && e["rcpt"] == "held@gmail-like.test"),
        "suspended pair delivered"
    );
    // Resume: the held mail goes.
    fwd.queue
        .with_shaper(|s, _| assert!(s.reset_pair("google", "local.example")));
    fwd.wait_events(1, T, |e| {
        e["event"] == "delivered" && e["rcpt"] == "held@gmail-like.test"
    })
    .await;
    fwd.stop().await;
}

#[tokio::test]
async fn relay_denied_pauses_all_delivery_and_keeps_the_mail() {
    let dns = provider_zones();
    let sink = Sink::start(&[]);
    let denied = "denied.test 554 5.7.1 <x@denied.test>: Relay access denied";
    let pf = Postfix::start(sink.addr, &[denied]);
    let work = Workdir::new();
    let fwd = shaped(&work, pf.addr, &dns, "").await;
    submit(&fwd, &["x@denied.test"], "denied").await;
    let alert = fwd.wait_events(1, T, is("delivery_paused")).await;
    assert_eq!(alert[0]["rule"], "relay_denied", "{alert:?}");
    assert_eq!(alert[0]["category"], "relay_denied");
    assert!(alert[0]["until"].is_string());
    // Not bounced: deferred, and no DSN to the sender for our own fault.
    let d = fwd.wait_events(1, T, is("deferred")).await;
    assert_eq!(d[0]["rcpt"], "x@denied.test");
    assert!(fwd.queue.shaping().paused.is_some());
    // Nothing goes while paused, to any provider.
    submit(&fwd, &["ok@plain.test"], "waits").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let evs = fwd.events();
    assert!(
        !evs.iter().any(|e| e["event"] == "delivered"),
        "delivered while paused: {evs:#?}"
    );
    assert!(
        !evs.iter()
            .any(|e| e["event"] == "bounced" || e["event"] == "dsn_queued")
    );
    // The operator fixed the credentials and resumes.
    pf.set_access(&[]);
    pf.reload();
    fwd.queue.with_shaper(|s, _| s.pause(0, "operator resume"));
    fwd.wait_events(1, T, |e| e["event"] == "delivered" && e["rcpt"] == "ok@plain.test")
        .await;
    fwd.stop().await;
}

/// A recipient domain whose MX lookup failed when its message was queued
/// goes to `other`; its retry looks again and is shaped at the real
/// provider once DNS answers (it used to stay `other` for good).
#[tokio::test]
async fn a_retry_finds_the_provider_that_dns_could_not_tell_at_queue_time() {
    use crate::support::upstream::{Act, Script, Upstream};
    // Two attempts are deferred, the third accepted: every retry looks
    // again (the first may still find the resolver starting).
    let script = Script {
        rcpt: std::sync::Arc::new(|_, n| match n {
            1 | 2 => Act::Reply("451 4.3.0 try again later".into()),
            _ => Act::Reply("250 2.1.5 Ok".into()),
        }),
        ..Script::default()
    };
    let up = Upstream::start(script).await;
    // sendguard asks a resolver that is not there yet.
    let port = crate::support::dns::free_port();
    let work = Workdir::new();
    let sections = forward_config(up.addr, "", "first_retry = \"1s\"").replace(
        "[shaping]\ngroup_by_mx = false\n",
        &format!(
            "[dns]\nnameservers = [\"127.0.0.1:{port}\"]\ntimeout = \"300ms\"\nattempts = 1\n\
             [shaping]\nmx_failure_ttl = \"200ms\"\n"
        ),
    );
    let sections = sections.replace("first_retry = \"200ms\"\n", "");
    let fwd = Forwarder::start(&work, &sections).await;
    submit(&fwd, &["u@gmail-like.test"], "dns down").await;
    let d = fwd.wait_events(1, T, is("deferred")).await;
    assert_eq!(d[0]["provider"], "other", "{d:?}");
    // DNS comes up before the retry.
    let _dns = TestDns::start_on(port, &zone(&["gmail-like.test. 300 IN MX 5 aspmx.l.google.com."]));
    let ok = fwd.wait_events(1, T, is("delivered")).await;
    assert_eq!(ok[0]["rcpt"], "u@gmail-like.test");
    assert_eq!(ok[0]["provider"], "google", "{ok:?}");
    assert_eq!(ok[0]["attempt"], 3);
    fwd.stop().await;
}
