//! The guard against a real DNS server (unbound serving zones written here):
//! sender-domain health at MAIL FROM, recipient domains at RCPT, header
//! From alignment and DMARC prediction at end of data, DKIM signatures made
//! by an independent signer (dkimpy), DNS failures as 4xx, caching, modes.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use sendguard::config::Config;
use sendguard::submission::SharedSink;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::support::client::{Client, Resp};
use crate::support::dns::{TestDns, txt, zone};
use crate::support::{CaptureSink, Workdir, read_events, require_tool};

/// The IP receivers see for mail from the relay.
const RELAY_IP: &str = "192.0.2.10";

/// Every domain the tests use. `acme.example` is healthy; the others each
/// have one thing wrong (or are there to be aligned with).
fn records(dkim_key_b64: &str) -> Vec<String> {
    let spf_ok = "v=spf1 ip4:192.0.2.10 -all";
    let mut r: Vec<String> = vec![
        // Healthy, p=reject, relaxed alignment.
        txt("acme.example.", spf_ok),
        "acme.example. 300 IN MX 10 mx.acme.example.".into(),
        "mx.acme.example. 300 IN A 192.0.2.25".into(),
        txt("_dmarc.acme.example.", "v=DMARC1; p=reject; rua=mailto:d@acme.example"),
        txt("bounce.acme.example.", spf_ok),
        "bounce.acme.example. 300 IN MX 10 mx.acme.example.".into(),
        // The header From domain's own SPF does not authorize the relay;
        // its bounce subdomain's does (the usual return-path setup).
        txt("ownspf.example.", "v=spf1 ip4:198.51.100.1 -all"),
        "ownspf.example. 300 IN MX 10 mx.acme.example.".into(),
        txt("_dmarc.ownspf.example.", "v=DMARC1; p=reject"),
        txt("bounce.ownspf.example.", spf_ok),
        "bounce.ownspf.example. 300 IN MX 10 mx.acme.example.".into(),
        // SPF softfails for one egress IP and fails for the other.
        txt("half.example.", "v=spf1 ~ip4:192.0.2.11 -all"),
        "half.example. 300 IN MX 10 mx.acme.example.".into(),
        // DKIM keys that cannot be looked up for now (their _domainkey
        // subtree's queries are dropped, see `start_with`).
        txt("dkimtemp.example.", spf_ok),
        "dkimtemp.example. 300 IN MX 10 mx.acme.example.".into(),
        txt("_dmarc.dkimtemp.example.", "v=DMARC1; p=reject"),
        // Strict alignment.
        txt("strict.example.", spf_ok),
        "strict.example. 300 IN MX 10 mx.acme.example.".into(),
        txt("_dmarc.strict.example.", "v=DMARC1; p=reject; adkim=s; aspf=s"),
        txt("bounce.strict.example.", spf_ok),
        "bounce.strict.example. 300 IN MX 10 mx.acme.example.".into(),
        // An ESP's bounce domain: SPF passes for the relay, not aligned with anyone.
        txt("esp.example.", spf_ok),
        "esp.example. 300 IN MX 10 mx.acme.example.".into(),
        // p=none: degraded, never refused for DMARC.
        txt("relaxed-none.example.", spf_ok),
        "relaxed-none.example. 300 IN MX 10 mx.acme.example.".into(),
        txt("_dmarc.relaxed-none.example.", "v=DMARC1; p=none"),
        // Broken ones.
        txt("twospf.example.", spf_ok),
        txt("twospf.example.", "v=spf1 include:esp.example -all"),
        "twospf.example. 300 IN MX 10 mx.acme.example.".into(),
        txt("norelay.example.", "v=spf1 ip4:198.51.100.1 -all"),
        "norelay.example. 300 IN MX 10 mx.acme.example.".into(),
        txt("loop.example.", "v=spf1 include:loop2.example ip4:192.0.2.10 -all"),
        txt("loop2.example.", "v=spf1 include:loop.example -all"),
        "loop.example. 300 IN MX 10 mx.acme.example.".into(),
        txt("nodkim.example.", spf_ok),
        "nodkim.example. 300 IN MX 10 mx.acme.example.".into(),
        txt("_dmarc.nodkim.example.", "v=DMARC1; p=quarantine"),
        txt("baddmarc.example.", spf_ok),
        "baddmarc.example. 300 IN MX 10 mx.acme.example.".into(),
        txt("_dmarc.baddmarc.example.", "v=DMARC1; p=rejected; adkim=x"),
        txt("badname.example.", "v=spf1 a:mail.example.com:8080 ip4:192.0.2.10 -all"),
        "badname.example. 300 IN MX 10 mx.acme.example.".into(),
        "nullmx.example. 300 IN MX 0 .".into(),
        // Stale terms: three names without records (void lookups, RFC 7208
        // §4.6.4 allows two), and a record with two.
        txt(
            "voids.example.",
            "v=spf1 a:gone1.voids.example mx:gone2.voids.example ip4:192.0.2.10 a:gone3.voids.example a:up.voids.example -all",
        ),
        "voids.example. 300 IN MX 10 mx.acme.example.".into(),
        "up.voids.example. 300 IN A 192.0.2.25".into(),
        txt("_dmarc.voids.example.", "v=DMARC1; p=reject"),
        txt(
            "twovoids.example.",
            "v=spf1 a:gone1.voids.example mx ip4:192.0.2.10 -all",
        ),
        txt("_dmarc.twovoids.example.", "v=DMARC1; p=reject"),
        // For an IPv4 relay a host with only an AAAA record is void too
        // (receivers ask for the client's family); in an included record.
        txt(
            "v6only.example.",
            "v=spf1 include:inc.v6only.example ip4:192.0.2.10 -all",
        ),
        txt(
            "inc.v6only.example.",
            "v=spf1 a:only6.v6only.example a:gone1.voids.example mx:gone2.voids.example -all",
        ),
        "only6.v6only.example. 300 IN AAAA 2001:db8::25".into(),
        // Blocklists (only consulted where a test configures the zones):
        // signed.example is listed, 192.0.2.10 is listed, esp.example gets
        // the list's "query refused" code, which is not a listing.
        "signed.example.dbl.test. 300 IN A 127.0.1.2".into(),
        "esp.example.dbl.test. 300 IN A 127.255.255.254".into(),
        "10.2.0.192.bl.test. 300 IN A 127.0.0.2".into(),
        txt("nullmx.example.", "v=spf1 -all"),
        // DKIM-signed mail: SPF passes for the relay, DMARC p=reject.
        txt("signed.example.", spf_ok),
        "signed.example. 300 IN MX 10 mx.acme.example.".into(),
        txt("_dmarc.signed.example.", "v=DMARC1; p=reject"),
        txt(
            "sel._domainkey.signed.example.",
            &format!("v=DKIM1; k=rsa; p={dkim_key_b64}"),
        ),
        // sendguard signs for own.example (same key, selector sg).
        txt("own.example.", "v=spf1 ip4:192.0.2.10 -all"),
        "own.example. 300 IN MX 10 mx.acme.example.".into(),
        txt("_dmarc.own.example.", "v=DMARC1; p=reject"),
        txt(
            "sg._domainkey.own.example.",
            &format!("v=DKIM1; k=rsa; p={dkim_key_b64}"),
        ),
        // Recipient domains.
        "rcpt.example. 300 IN MX 10 mx.rcpt.example.".into(),
        "mx.rcpt.example. 300 IN A 192.0.2.26".into(),
        "implicit.example. 300 IN A 192.0.2.27".into(),
        "nullrcpt.example. 300 IN MX 0 .".into(),
        txt("nomail.example.", "just a TXT record"),
    ];
    // Eleven DNS-querying terms: one over the limit.
    let many: Vec<String> = (1..=11).map(|i| format!("a:h{i}.many.example")).collect();
    r.push(txt(
        "many.example.",
        &format!("v=spf1 {} ip4:192.0.2.10 -all", many.join(" ")),
    ));
    r.push("many.example. 300 IN MX 10 mx.acme.example.".into());
    for i in 1..=11 {
        r.push(format!("h{i}.many.example. 300 IN A 198.51.100.{i}"));
    }
    r
}

const SENDER_DOMAINS: &str = r#"["acme.example", "*.acme.example", "strict.example", "*.strict.example", "esp.example",
  "relaxed-none.example", "twospf.example", "norelay.example", "loop.example", "nodkim.example", "baddmarc.example",
  "nullmx.example", "signed.example", "ownspf.example", "*.ownspf.example", "dkimtemp.example", "many.example", "own.example", "wrongkey.example", "badname.example", "*.servfail.test", "*.timeout.test", "nope.example"]"#;

/// An RSA-2048 key made by openssl: (PEM path, base64 SubjectPublicKeyInfo).
fn dkim_key(work: &Workdir) -> (std::path::PathBuf, String) {
    require_tool("openssl");
    let key = work.path("dkim.pem");
    let ok = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&key)
        .status()
        .unwrap()
        .success();
    assert!(ok, "openssl genpkey failed");
    let der = Command::new("openssl")
        .args(["pkey", "-pubout", "-outform", "DER", "-in"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(der.status.success());
    use base64::Engine;
    (key, base64::engine::general_purpose::STANDARD.encode(der.stdout))
}

/// Sign `msg` with dkimpy (an independent DKIM implementation).
fn dkimpy_sign(key: &std::path::Path, domain: &str, selector: &str, msg: &str) -> String {
    dkimpy_sign_with(key, domain, selector, msg, "rsa-sha256")
}

/// [`dkimpy_sign`] with the signature algorithm `a=` given.
fn dkimpy_sign_with(key: &std::path::Path, domain: &str, selector: &str, msg: &str, algorithm: &str) -> String {
    let script = r#"
import dkim, sys
msg = sys.stdin.buffer.read()
key = open(sys.argv[1], 'rb').read()
sig = dkim.sign(msg, sys.argv[3].encode(), sys.argv[2].encode(), key,
                include_headers=[b'from', b'to', b'subject'], linesep=b'\r\n',
                signature_algorithm=sys.argv[4].encode())
sys.stdout.buffer.write(sig + msg)
"#;
    // Debian's interpreter: python3-dkim is a Debian package (a pyenv
    // python3 earlier in PATH would not see it).
    let mut child = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(script)
        .arg(key)
        .arg(domain)
        .arg(selector)
        .arg(algorithm)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(msg.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "dkimpy failed (python3-dkim installed?)");
    String::from_utf8(out.stdout).unwrap()
}

struct Guarded {
    addr: SocketAddr,
    sink: Arc<CaptureSink>,
    shutdown: CancellationToken,
    events: std::path::PathBuf,
    dns: TestDns,
    dkim_key: std::path::PathBuf,
    _work: Workdir,
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// sendguard (capturing sink) with one trusted listener for tenant `acme`
/// in `mode`, resolving through a fresh unbound.
async fn start(mode: &str, extra: &str) -> Guarded {
    start_with(mode, extra, |_| Vec::new()).await
}

/// [`start`] with more records, made from the work dir (e.g. other keys).
async fn start_with(mode: &str, extra: &str, more: impl FnOnce(&Workdir) -> Vec<String>) -> Guarded {
    crate::support::init_logging();
    let work = Workdir::new();
    let (key, pubkey) = dkim_key(&work);
    let mut recs = records(&pubkey);
    recs.extend(more(&work));
    let mut server = zone(&recs.iter().map(String::as_str).collect::<Vec<_>>());
    server.push_str("    local-zone: \"_domainkey.dkimtemp.example.\" deny\n");
    let dns = TestDns::start(&server);
    let text = format!(
        r#"
[server]
hostname = "sendguard.test"
shutdown_grace = "2s"
[[listeners]]
addr = "127.0.0.1:0"
tls = "none"
auth = "none"
trusted_networks = ["127.0.0.0/8"]
tenant = "acme"
[[tenants]]
name = "acme"
sender_domains = {SENDER_DOMAINS}
allow_null_sender = true
guard = "{mode}"
[dns]
nameservers = ["{dns}"]
timeout = "300ms"
attempts = 1
[spool]
dir = "spool"
[relay]
addr = "127.0.0.1:1"
tls = "none"
egress_ips = ["{RELAY_IP}"]
[events]
path = "events.jsonl"
[[domains]]
name = "nodkim.example"
dkim_selectors = ["s1"]
[[domains]]
name = "signed.example"
dkim_selectors = ["sel"]
[[domains]]
name = "own.example"
dkim_sign = {{ selector = "sg", key = "dkim.pem" }}
{extra}
"#,
        dns = dns.addr()
    );
    let path = work.write_config(&text);
    let cfg = Arc::new(Config::load(&path).expect("guard test config is valid"));
    let sock = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    let sink = CaptureSink::accepting();
    let (events, _writer) = sendguard::events::Events::open(&work.path("events.jsonl"))
        .await
        .unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(sendguard::server::run(
        cfg,
        vec![sock],
        sendguard::server::Handles::new(sink.clone() as SharedSink, events),
        shutdown.clone(),
    ));
    Guarded {
        addr,
        sink,
        shutdown,
        events: work.path("events.jsonl"),
        dns,
        dkim_key: key,
        _work: work,
    }
}

impl Guarded {
    async fn client(&self) -> Client {
        let (mut c, _) = Client::connect(self.addr).await;
        c.cmd("EHLO client.test").await.expect(250, "");
        c
    }

    async fn mail(&self, from: &str) -> Resp {
        let mut c = self.client().await;
        c.cmd(&format!("MAIL FROM:<{from}>")).await
    }

    async fn rcpt(&self, to: &str) -> Resp {
        let mut c = self.client().await;
        c.cmd("MAIL FROM:<a@acme.example>").await.expect(250, "2.1.0");
        c.cmd(&format!("RCPT TO:<{to}>")).await
    }

    /// A whole transaction; returns the reply to the end of data.
    async fn send(&self, mail_from: &str, body: &str) -> Resp {
        let mut c = self.client().await;
        c.cmd(&format!("MAIL FROM:<{mail_from}>")).await.expect(250, "2.1.0");
        c.cmd("RCPT TO:<user@rcpt.example>").await.expect(250, "2.1.5");
        c.cmd("DATA").await.expect(354, "");
        c.send_raw(body.as_bytes()).await;
        c.send_raw(b".\r\n").await;
        c.reply().await
    }

    /// Events of kind `kind`, waiting up to a second for them to be written.
    async fn events(&self, kind: &str) -> Vec<serde_json::Value> {
        for _ in 0..40 {
            let e: Vec<_> = read_events(&self.events)
                .into_iter()
                .filter(|e| e["event"] == kind)
                .collect();
            if !e.is_empty() {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Vec::new()
    }
}

fn message(from: &str) -> String {
    format!("From: Sender <{from}>\r\nTo: user@rcpt.example\r\nSubject: guard test\r\n\r\nHello.\r\n")
}

#[tokio::test]
async fn healthy_domain_is_accepted_at_every_stage() {
    let g = start("enforce", "").await;
    g.send("a@acme.example", &message("a@acme.example"))
        .await
        .expect(250, "2.0.0");
    // Relaxed alignment: MAIL FROM in a subdomain, From in the parent.
    g.send("b@bounce.acme.example", &message("a@acme.example"))
        .await
        .expect(250, "2.0.0");
    // Recipient domain without MX but with an A record (implicit MX, RFC 5321 §5.1).
    g.rcpt("u@implicit.example").await.expect(250, "2.1.5");
    assert_eq!(g.sink.messages().len(), 2);
}

#[tokio::test]
async fn broken_sender_domains_are_refused_at_mail_from_with_a_precise_reason() {
    let g = start("enforce", "").await;
    let r = g.mail("a@twospf.example").await;
    r.expect(550, "5.7.24").token("spf_multiple_records");
    assert!(r.text().contains("2 SPF records"), "{r:?}");

    let r = g.mail("a@norelay.example").await;
    r.expect(550, "5.7.23").token("spf_relay_not_authorized");
    assert!(
        r.text().contains("192.0.2.10") && r.text().contains("Fix: add ip4:192.0.2.10"),
        "{r:?}"
    );

    let r = g.mail("a@many.example").await;
    r.expect(550, "5.7.24").token("spf_too_many_lookups");

    let r = g.mail("a@loop.example").await;
    r.expect(550, "5.7.24").token("spf_include_loop");
    assert!(
        r.text().contains("loop.example -> loop2.example -> loop.example"),
        "{r:?}"
    );

    // An invalid name in the record: a permanent error, not endless 4xx.
    g.mail("a@badname.example")
        .await
        .expect(550, "5.7.24")
        .token("spf_syntax");
    g.mail("a@nodkim.example")
        .await
        .expect(550, "5.7.20")
        .token("dkim_key_missing");
    g.mail("a@baddmarc.example")
        .await
        .expect(550, "5.7.1")
        .token("dmarc_malformed");
    g.mail("a@nullmx.example")
        .await
        .expect(550, "5.7.27")
        .token("sender_null_mx");
    g.mail("a@nope.example")
        .await
        .expect(550, "5.1.8")
        .token("sender_domain_not_found");
    assert!(g.sink.messages().is_empty());
    // Each refusal is an event with its stage.
    let refused = g.events("refused").await;
    assert!(
        refused
            .iter()
            .any(|e| e["stage"] == "mail" && e["sender"] == "a@twospf.example")
    );
}

#[tokio::test]
async fn recipient_domains_that_cannot_receive_are_refused_at_rcpt() {
    let g = start("enforce", "").await;
    g.rcpt("u@rcpt.example").await.expect(250, "2.1.5");
    g.rcpt("u@nullrcpt.example")
        .await
        .expect(556, "5.1.10")
        .token("rcpt_null_mx");
    g.rcpt("u@nxdomain.example")
        .await
        .expect(550, "5.1.2")
        .token("rcpt_domain_not_found");
    let r = g.rcpt("u@nomail.example").await;
    r.expect(550, "5.1.2").token("rcpt_domain_not_found");
    assert!(r.text().contains("no MX and no address record"), "{r:?}");
}

#[tokio::test]
async fn dmarc_reject_with_unaligned_mail_from_and_no_dkim_is_refused_at_end_of_data() {
    let g = start("enforce", "").await;
    let r = g.send("bounce@esp.example", &message("a@acme.example")).await;
    r.expect(550, "5.7.26").token("dmarc_would_fail");
    let text = r.text();
    assert!(
        text.contains("DMARC would fail at receivers: acme.example p=reject")
            && text.contains("SPF not aligned (MAIL FROM esp.example")
            && text.contains("no DKIM signature"),
        "{text}"
    );
    assert!(g.sink.messages().is_empty(), "nothing was handed on");
    let refused = g.events("refused").await;
    let ev = refused
        .iter()
        .find(|e| e["stage"] == "data")
        .expect("a refused event at end of data");
    assert_eq!(ev["sender"], "bounce@esp.example");
    assert_eq!(ev["reply"]["code"], 550);
    assert!(
        ev["reply"]["text"]
            .as_str()
            .unwrap()
            .ends_with("(sendguard:dmarc_would_fail)")
    );
    // p=none: the prediction fails but receivers do nothing: accepted.
    g.send("bounce@esp.example", &message("x@relaxed-none.example"))
        .await
        .expect(250, "2.0.0");
}

/// SPF belongs to the MAIL FROM domain (RFC 7208 §2.4, RFC 7489 §4.1):
/// a From domain whose own SPF does not list the relay is fine when the
/// return path is an aligned subdomain whose SPF does.
#[tokio::test]
async fn the_from_domains_own_spf_does_not_decide() {
    let g = start("enforce", "").await;
    g.send("b@bounce.ownspf.example", &message("a@ownspf.example"))
        .await
        .expect(250, "2.0.0");
    // As MAIL FROM itself, its SPF does decide.
    g.mail("a@ownspf.example")
        .await
        .expect(550, "5.7.23")
        .token("spf_relay_not_authorized");
    assert_eq!(g.sink.messages().len(), 1);
}

#[tokio::test]
async fn strict_alignment_refuses_what_relaxed_accepts() {
    let g = start("enforce", "").await;
    // acme.example is relaxed: a subdomain MAIL FROM aligns (accepted above).
    g.send("b@bounce.acme.example", &message("a@acme.example"))
        .await
        .expect(250, "2.0.0");
    // strict.example has aspf=s: the same shape fails.
    let r = g.send("b@bounce.strict.example", &message("a@strict.example")).await;
    r.expect(550, "5.7.26").token("dmarc_would_fail");
    assert!(r.text().contains("aspf=strict"), "{r:?}");
    g.send("b@strict.example", &message("a@strict.example"))
        .await
        .expect(250, "2.0.0");
}

#[tokio::test]
async fn a_valid_dkim_signature_passes_and_a_tampered_one_does_not() {
    let g = start("enforce", "").await;
    let signed = dkimpy_sign(&g.dkim_key, "signed.example", "sel", &message("a@signed.example"));
    assert!(signed.starts_with("DKIM-Signature:"), "{signed}");
    // MAIL FROM at the ESP: SPF is not aligned, so DKIM alone decides.
    g.send("bounce@esp.example", &signed).await.expect(250, "2.0.0");
    let tampered = signed.replace("Hello.", "Hello, changed.");
    let r = g.send("bounce@esp.example", &tampered).await;
    r.expect(550, "5.7.26").token("dmarc_would_fail");
    assert!(
        r.text().contains("DKIM d=signed.example fails: body hash mismatch"),
        "{r:?}"
    );
    let headers_changed = signed.replace("Subject: guard test", "Subject: guard test!");
    let r = g.send("bounce@esp.example", &headers_changed).await;
    r.expect(550, "5.7.26");
    assert!(r.text().contains("signature does not verify"), "{r:?}");
    // A valid rsa-sha1 signature: receivers do not count it (RFC 8301).
    let sha1 = dkimpy_sign_with(
        &g.dkim_key,
        "signed.example",
        "sel",
        &message("a@signed.example"),
        "rsa-sha1",
    );
    assert!(sha1.contains("a=rsa-sha1"), "{sha1}");
    let r = g.send("bounce@esp.example", &sha1).await;
    r.expect(550, "5.7.26").token("dmarc_would_fail");
    assert!(r.text().contains("rsa-sha1"), "{r:?}");
    assert_eq!(g.sink.messages().len(), 1);
}

#[tokio::test]
async fn header_from_must_be_one_permitted_address() {
    let g = start("enforce", "").await;
    let no_from = "To: user@rcpt.example\r\nSubject: x\r\n\r\nbody\r\n";
    g.send("a@acme.example", no_from)
        .await
        .expect(550, "5.6.0")
        .token("from_header_missing");
    let two = "From: a@acme.example, b@acme.example\r\nSubject: x\r\n\r\nbody\r\n";
    g.send("a@acme.example", two)
        .await
        .expect(550, "5.6.0")
        .token("from_header_multiple");
    let r = g.send("a@acme.example", &message("ceo@victim.example")).await;
    r.expect(550, "5.7.1").token("from_not_permitted");
    assert!(g.sink.messages().is_empty());
}

#[tokio::test]
async fn dns_servfail_and_timeout_are_temporary() {
    let g = start("enforce", "").await;
    g.mail("a@x.servfail.test")
        .await
        .expect(451, "4.4.3")
        .token("dns_temporary");
    g.rcpt("u@y.servfail.test")
        .await
        .expect(451, "4.4.3")
        .token("dns_temporary");
    let r = g.mail("a@x.timeout.test").await;
    r.expect(451, "4.4.3").token("dns_temporary");
    assert!(r.text().contains("timeout"), "{r:?}");
}

/// A DKIM key lookup that times out makes the verdict a 4xx only when that
/// signature could decide it (aligned with From); another signature that
/// passes but does not align does not turn it into a 550.
#[tokio::test]
async fn a_dkim_key_timeout_is_temporary_only_when_it_could_decide() {
    let g = start("enforce", "").await;
    // Aligned signature, key lookup times out, plus an unaligned one that
    // passes (d=signed.example): receivers' DMARC depends on the first.
    let once = dkimpy_sign(&g.dkim_key, "dkimtemp.example", "sel", &message("a@dkimtemp.example"));
    let twice = dkimpy_sign(&g.dkim_key, "signed.example", "sel", &once);
    let r = g.send("bounce@esp.example", &twice).await;
    r.expect(451, "4.4.3").token("dns_temporary");
    assert!(r.text().contains("DKIM"), "{r:?}");
    // The same timeout on a signature that cannot align with From
    // (acme.example) changes nothing: DMARC fails either way.
    let unaligned = dkimpy_sign(&g.dkim_key, "dkimtemp.example", "sel", &message("a@acme.example"));
    g.send("bounce@esp.example", &unaligned)
        .await
        .expect(550, "5.7.26")
        .token("dmarc_would_fail");
    assert!(g.sink.messages().is_empty());
}

#[tokio::test]
async fn a_warm_cache_sends_no_queries() {
    let g = start("enforce", "").await;
    g.send("a@acme.example", &message("a@acme.example"))
        .await
        .expect(250, "2.0.0");
    let after_first = g.dns.query_count();
    assert!(after_first > 0, "the first message was checked against DNS");
    for i in 0..3 {
        g.send(&format!("n{i}@acme.example"), &message("other@acme.example"))
            .await
            .expect(250, "2.0.0");
    }
    assert_eq!(
        g.dns.query_count(),
        after_first,
        "warm domains cost no query: {:?}",
        g.dns.queries()
    );
    // NXDOMAIN is cached too.
    g.rcpt("u@nxdomain.example").await.expect(550, "5.1.2");
    let n = g.dns.query_count();
    g.rcpt("u@nxdomain.example").await.expect(550, "5.1.2");
    assert_eq!(g.dns.query_count(), n, "negative answers are cached");
}

#[tokio::test]
async fn warn_mode_accepts_and_reports_what_would_have_been_refused() {
    let g = start("warn", "").await;
    let mut c = g.client().await;
    c.cmd("MAIL FROM:<a@twospf.example>").await.expect(250, "2.1.0");
    c.cmd("RCPT TO:<u@nullrcpt.example>").await.expect(250, "2.1.5");
    c.cmd("DATA").await.expect(354, "");
    c.send_raw(message("a@twospf.example").as_bytes()).await;
    c.send_raw(b".\r\n").await;
    c.reply().await.expect(250, "2.0.0");
    assert_eq!(g.sink.messages().len(), 1);
    let warnings = g.events("guard_warning").await;
    let stages: Vec<_> = warnings
        .iter()
        .map(|e| e["stage"].as_str().unwrap().to_string())
        .collect();
    assert!(
        stages.contains(&"mail".to_string()) && stages.contains(&"rcpt".to_string()),
        "{warnings:#?}"
    );
    let mail = warnings.iter().find(|e| e["stage"] == "mail").unwrap();
    assert_eq!(mail["reply"]["code"], 550);
    assert!(
        mail["reply"]["text"]
            .as_str()
            .unwrap()
            .contains("(sendguard:spf_multiple_records)")
    );
}

#[tokio::test]
async fn guard_off_skips_dns_entirely() {
    let g = start("off", "").await;
    g.send("a@twospf.example", &message("a@twospf.example"))
        .await
        .expect(250, "2.0.0");
    assert_eq!(g.dns.query_count(), 0);
}

/// `sendguard check-domain` against the same zones: exit codes and JSON.
#[tokio::test]
async fn check_domain_cli_reports_in_triage_order() {
    let work = Workdir::new();
    let (_, pubkey) = dkim_key(&work);
    let recs = records(&pubkey);
    let dns = TestDns::start(&zone(&recs.iter().map(String::as_str).collect::<Vec<_>>()));
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_sendguard"))
            .arg("check-domain")
            .args(args)
            .args(["--dns", &dns.addr(), "--relay-ip", RELAY_IP])
            .output()
            .unwrap();
        (
            out.status.code().unwrap(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = run(&["signed.example", "--selector", "sel"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("signed.example: healthy"), "{out}");

    let (code, out) = run(&["relaxed-none.example", "--json"]);
    assert_eq!(code, 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["status"], "degraded");
    assert!(
        v["findings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["token"] == "dmarc_policy_none")
    );

    let (code, out) = run(&["nodkim.example", "--selector", "s1", "--json"]);
    assert_eq!(code, 2, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let f = &v["findings"][0];
    assert_eq!(
        (f["check"].as_str(), f["token"].as_str()),
        (Some("dkim"), Some("dkim_key_missing"))
    );
    assert!(f["fix"].as_str().unwrap().contains("s1._domainkey.nodkim.example"));

    // Several egress IPs: the worst result counts (a softfail for the
    // first one does not hide a fail for the second).
    let (code, out) = run(&["half.example", "--relay-ip", "192.0.2.11", "--json"]);
    assert_eq!(code, 2, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let f = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["token"] == "spf_relay_not_authorized")
        .unwrap_or_else(|| panic!("{out}"));
    assert!(f["message"].as_str().unwrap().contains(RELAY_IP), "{out}");

    // Void lookups over the limit: a warning naming the terms (the mail
    // still goes), not at two; for an IPv4 relay an AAAA-only host is void,
    // and terms inside included records count.
    // The SPF findings' (token, message).
    let spf_findings = |out: &str| -> Vec<(String, String)> {
        let v: serde_json::Value = serde_json::from_str(out).unwrap();
        v["findings"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["check"] == "spf")
            .map(|f| {
                (
                    f["token"].as_str().unwrap().into(),
                    f["message"].as_str().unwrap().into(),
                )
            })
            .collect()
    };
    let void_warning = |out: &str| -> String {
        let spf = spf_findings(out);
        let found = spf.into_iter().find(|(t, _)| t == "spf_void_lookups");
        found.unwrap_or_else(|| panic!("{out}")).1
    };
    let (code, out) = run(&["voids.example", "--json"]);
    assert_ne!(code, 2, "{out}");
    let msg = void_warning(&out);
    assert!(
        msg.contains("a:gone1.voids.example, mx:gone2.voids.example, a:gone3.voids.example (3 void lookups"),
        "{msg}"
    );
    let (_, out) = run(&["twovoids.example", "--json"]);
    assert!(spf_findings(&out).is_empty(), "{out}");
    let (_, out) = run(&["v6only.example", "--json"]);
    let msg = void_warning(&out);
    assert!(
        msg.contains("a:only6.v6only.example, a:gone1.voids.example, mx:gone2.voids.example (3 void"),
        "{msg}"
    );

    // Triage order: SPF findings before DKIM before DMARC before MX.
    let (code, out) = run(&["twospf.example", "--selector", "nope", "--json"]);
    assert_eq!(code, 2);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let checks: Vec<&str> = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["check"].as_str().unwrap())
        .collect();
    let order = |c: &str| {
        ["spf", "dkim", "dmarc", "mx", "blocklist"]
            .iter()
            .position(|x| *x == c)
            .unwrap()
    };
    assert!(checks.windows(2).all(|w| order(w[0]) <= order(w[1])), "{checks:?}");

    // Blocklists: a listed domain is broken, a listed relay IP degrades.
    let zones = [
        "--dnsbl-domain-zone",
        "dbl.test",
        "--dnsbl-ip-zone",
        "bl.test",
        "--json",
    ];
    let (code, out) = run(&[&["signed.example", "--selector", "sel"][..], &zones[..]].concat());
    assert_eq!(code, 2, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let tokens: Vec<&str> = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["token"].as_str().unwrap())
        .collect();
    assert!(
        tokens.contains(&"domain_blocklisted") && tokens.contains(&"relay_ip_blocklisted"),
        "{tokens:?}"
    );
    let (code, out) = run(&[&["esp.example"][..], &zones[..]].concat());
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        !v["findings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["token"] == "domain_blocklisted"),
        "127.255.255.254 is an error code, not a listing: {out}"
    );
    assert_eq!(
        code, 1,
        "degraded (no DMARC record, relay IP listed), not broken: {out}"
    );

    let (code, out) = run(&["x.servfail.test"]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("could not check"), "{out}");
}

/// Verify a message with dkimpy, the key record given directly.
fn dkimpy_verify(msg: &[u8], key_record: &str) -> bool {
    let script = r#"
import dkim, sys
msg = sys.stdin.buffer.read()
rec = sys.argv[1].encode()
sys.stdout.write(str(dkim.verify(msg, dnsfunc=lambda name, timeout=5: rec)))
"#;
    let mut child = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(script)
        .arg(key_record)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(msg).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout) == "True"
}

#[tokio::test]
async fn sendguard_signs_for_its_domains_and_checks_the_published_key() {
    let g = start_with(
        "enforce",
        "[[domains]]\nname = \"wrongkey.example\"\ndkim_sign = { selector = \"sg\", key = \"dkim.pem\" }\n",
        |_work| {
            // wrongkey.example publishes some other key at the selector.
            let other = Workdir::new();
            let (_, other_pub) = dkim_key(&other);
            vec![
                txt("wrongkey.example.", "v=spf1 ip4:192.0.2.10 -all"),
                "wrongkey.example. 300 IN MX 10 mx.acme.example.".into(),
                txt(
                    "sg._domainkey.wrongkey.example.",
                    &format!("v=DKIM1; k=rsa; p={other_pub}"),
                ),
            ]
        },
    )
    .await;
    // MAIL FROM at the ESP (SPF not aligned): only sendguard's own
    // signature can make DMARC pass, and it does.
    g.send("bounce@esp.example", &message("a@own.example"))
        .await
        .expect(250, "2.0.0");
    let got = g.sink.messages();
    let body = &got[0].body;
    assert!(
        body.starts_with(b"DKIM-Signature:"),
        "{}",
        String::from_utf8_lossy(body)
    );
    let text = String::from_utf8_lossy(body);
    assert!(text.contains("d=own.example") && text.contains("s=sg"), "{text}");
    // An independent verifier agrees.
    let der = Command::new("openssl")
        .args(["pkey", "-pubout", "-outform", "DER", "-in"])
        .arg(&g.dkim_key)
        .output()
        .unwrap()
        .stdout;
    use base64::Engine;
    let record = format!(
        "v=DKIM1; k=rsa; p={}",
        base64::engine::general_purpose::STANDARD.encode(der)
    );
    assert!(dkimpy_verify(body, &record), "dkimpy verifies sendguard's signature");
    // Mail that is not from a signing domain is not signed.
    g.send("a@acme.example", &message("a@acme.example"))
        .await
        .expect(250, "2.0.0");
    assert!(!g.sink.messages()[1].body.starts_with(b"DKIM-Signature:"));
    // The published key is not the signing key: refused before anything is signed.
    g.mail("a@wrongkey.example")
        .await
        .expect(550, "5.7.20")
        .token("dkim_sign_key_mismatch");
}
