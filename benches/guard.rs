//! Warm-cache cost of the guard's decision per message.
//!
//! What one message costs the guard once every DNS answer is cached:
//! `mail_from` + `rcpt` + `message` for a ~2 KB message from a healthy
//! domain (SPF passes for the relay and is aligned, so DMARC passes).
//!
//! * `guard/warm/unsigned`: no DKIM-Signature header.
//! * `guard/warm/dkim_signed`: the same message DKIM-signed (RSA-2048,
//!   relaxed/relaxed), sent with MAIL FROM at an ESP domain whose SPF passes
//!   but is not aligned, so DKIM alone decides DMARC. The guard verifies the
//!   signature: this includes the RSA verification and both hashes (tens of
//!   µs). (With an aligned SPF pass the guard skips DKIM verification.)
//!
//! DNS is real: the bench starts unbound on a loopback port (as the
//! integration tests do, with their harness tests/it/support/dns.rs) with `log-queries: yes`.
//! Before measuring it makes one call per case and asserts every verdict is
//! `Accept`; it counts the queries in unbound's log before and after the
//! measured iterations and fails if any query was sent, so the number is
//! the warm path and not a refusal path or a cache miss.
//!
//! After each case it prints a per-call profile (not a criterion result):
//! median time and heap allocations (alloc + realloc calls, bytes requested)
//! per call of `mail_from`, `rcpt`, `message` and of parts of them. The
//! counting allocator below wraps the system allocator; while it is not
//! counting (the whole criterion measurement) it costs one relaxed load per
//! allocation.
//!
//! The guard's domain verdicts are cached for `dns.min_ttl` (30 s by
//! default) and then refreshed in the background while the old one is
//! served: a run longer than that includes those refreshes, as production
//! does (they are answered from the DNS caches, so still no query).
//!
//!   cargo bench --bench guard
//!
//! Needs `unbound` and `openssl` on PATH (scripts/install-deps).

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use base64::Engine;
use criterion::{Criterion, criterion_group, criterion_main};
use mail_auth::common::crypto::{RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::DkimSigner;
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;
use sendguard::config::{Config, TenantConfig};
use sendguard::guard::{Guard, Verdict};
use sendguard::smtp::Mailbox;
use sendguard::smtp::address::parse_mailbox;

const SELECTOR: &str = "bench";
const FROM_DOMAIN: &str = "acme.example";
const RCPT_DOMAIN: &str = "dest.example";
/// An ESP bounce domain: SPF passes for the relay but is not aligned with
/// the From domain, so for the signed case DKIM alone decides DMARC (with an
/// aligned SPF pass the guard does not verify signatures at all).
const ESP_DOMAIN: &str = "esp.example";
/// Record TTL: far longer than a bench run, so nothing expires from the
/// answer caches while measuring.
const TTL: u32 = 3600;

// ---------------------------------------------------------------------------
// allocation counting (only while COUNTING is set)

struct CountingAlloc;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicU64 = AtomicU64::new(0);
static ALLOC_BYTES: AtomicU64 = AtomicU64::new(0);

fn count(bytes: usize) {
    if COUNTING.load(Relaxed) {
        ALLOCS.fetch_add(1, Relaxed);
        ALLOC_BYTES.fetch_add(bytes as u64, Relaxed);
    }
}

// SAFETY: forwards every call unchanged to the system allocator.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

// ---------------------------------------------------------------------------
// unbound: the integration tests' harness, shared.

#[allow(dead_code)]
#[path = "../tests/it/support/dns.rs"]
mod dns;
use dns::{TestDns as Unbound, zone};

/// A TXT record with its value split into 255-byte character-strings.
fn txt(owner: &str, value: &str) -> String {
    dns::txt_ttl(owner, value, TTL)
}

// ---------------------------------------------------------------------------
// DKIM key and messages

fn openssl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl is not installed");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A fresh RSA-2048 key in `dir`: (PEM path, base64 DER SubjectPublicKeyInfo for `p=`).
fn rsa_key(dir: &Path) -> (PathBuf, String) {
    let pem = dir.join("dkim.pem");
    let pem_s = pem.to_str().unwrap();
    openssl(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        pem_s,
    ]);
    let der = openssl(&["pkey", "-in", pem_s, "-pubout", "-outform", "DER"]);
    (pem, base64::engine::general_purpose::STANDARD.encode(der))
}

/// A ~2 KB plain-text message from `a@acme.example`, CRLF line ends.
fn message() -> Vec<u8> {
    let mut m = String::new();
    m.push_str("From: Acme Billing <a@acme.example>\r\n");
    m.push_str("To: Customer <rcpt@dest.example>\r\n");
    m.push_str("Subject: Your invoice 2024-0042 is ready\r\n");
    m.push_str("Date: Tue, 04 Jun 2024 10:00:00 +0000\r\n");
    m.push_str("Message-ID: <20240604100000.42@acme.example>\r\n");
    m.push_str("MIME-Version: 1.0\r\n");
    m.push_str("Content-Type: text/plain; charset=utf-8\r\n");
    m.push_str("Content-Transfer-Encoding: 7bit\r\n");
    m.push_str("\r\n");
    let line = "Thank you for your order. This line is filler text of a typical transactional mail.\r\n";
    while m.len() + line.len() <= 2048 {
        m.push_str(line);
    }
    m.into_bytes()
}

fn sign(pem: &Path, msg: &[u8]) -> Vec<u8> {
    let der = PrivateKeyDer::from_pem_file(pem).expect("pem");
    let key = RsaKey::<Sha256>::from_key_der(der).expect("rsa key");
    let sig = DkimSigner::from_key(key)
        .domain(FROM_DOMAIN)
        .selector(SELECTOR)
        .headers(["From", "To", "Subject", "Date", "Message-ID"])
        .sign(msg)
        .expect("sign");
    let mut out = sig.to_header().into_bytes();
    out.extend_from_slice(msg);
    out
}

// ---------------------------------------------------------------------------
// setup

struct Setup {
    _tmp: tempfile::TempDir,
    dns: Unbound,
    rt: tokio::runtime::Runtime,
    guard: Guard,
    tenant: TenantConfig,
    from: Mailbox,
    /// MAIL FROM for the signed case.
    esp_from: Mailbox,
    to: Mailbox,
    unsigned: Vec<u8>,
    signed: Vec<u8>,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let (pem, p) = rsa_key(tmp.path());
    let records = [
        txt(&format!("{FROM_DOMAIN}."), "v=spf1 ip4:127.0.0.1 -all"),
        format!("{FROM_DOMAIN}. {TTL} IN MX 10 mx.{FROM_DOMAIN}."),
        txt(&format!("_dmarc.{FROM_DOMAIN}."), "v=DMARC1; p=reject"),
        txt(
            &format!("{SELECTOR}._domainkey.{FROM_DOMAIN}."),
            &format!("v=DKIM1; k=rsa; p={p}"),
        ),
        format!("{RCPT_DOMAIN}. {TTL} IN MX 10 mx.{RCPT_DOMAIN}."),
        txt(&format!("{ESP_DOMAIN}."), "v=spf1 ip4:127.0.0.1 -all"),
        format!("{ESP_DOMAIN}. {TTL} IN MX 10 mx.{ESP_DOMAIN}."),
    ];
    let dns = Unbound::start(&zone(&records.iter().map(String::as_str).collect::<Vec<_>>()));

    let spool = tmp.path().join("spool");
    let text = format!(
        r#"
[server]
hostname = "relay.bench.example"

[[listeners]]
addr = "127.0.0.1:0"
tls = "none"
auth = "none"
trusted_networks = ["127.0.0.0/8"]
tenant = "acme"

[[tenants]]
name = "acme"
sender_domains = ["{FROM_DOMAIN}", "{ESP_DOMAIN}"]

[spool]
dir = "{spool}"

[relay]
addr = "127.0.0.1:25"
tls = "none"
egress_ips = ["127.0.0.1"]

[dns]
nameservers = ["127.0.0.1:{port}"]
timeout = "500ms"
attempts = 1

[[domains]]
name = "{FROM_DOMAIN}"
dkim_selectors = ["{SELECTOR}"]
"#,
        spool = spool.display(),
        port = dns.port,
    );
    let mut cfg = Config::parse(&text).expect("config parses");
    cfg.validate().expect("config is valid");
    let tenant = cfg.tenants[0].clone();
    let cfg = Arc::new(cfg);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let guard = {
        let _enter = rt.enter();
        let dns = sendguard::dns::Dns::new(&cfg.dns).expect("resolver");
        Guard::new(cfg.clone(), dns).expect("guard")
    };

    let unsigned = message();
    let signed = sign(&pem, &unsigned);
    Setup {
        from: parse_mailbox(&format!("a@{FROM_DOMAIN}")).unwrap(),
        esp_from: parse_mailbox(&format!("bounce@{ESP_DOMAIN}")).unwrap(),
        to: parse_mailbox(&format!("rcpt@{RCPT_DOMAIN}")).unwrap(),
        _tmp: tmp,
        dns,
        rt,
        guard,
        tenant,
        unsigned,
        signed,
    }
}

/// The three guard calls an accepted message goes through.
async fn decide(s: &Setup, from: &Mailbox, body: &[u8]) -> [Verdict; 3] {
    let a = s.guard.mail_from(from).await;
    let b = s.guard.rcpt(&s.to).await;
    let c = s.guard.message(&s.tenant, Some(from), body).await;
    [a, b, c]
}

fn stats(s: &Setup) -> String {
    let st = &s.guard.dns().stats;
    format!(
        "resolver queries {}, cache hits {}, stale hits {}, misses {}",
        st.queries.load(Relaxed),
        st.hits.load(Relaxed),
        st.stale_hits.load(Relaxed),
        st.misses.load(Relaxed)
    )
}

/// Time (median of 20 batches of 100 calls) and allocations (mean of 2000
/// calls) per call of `$call` (an async expression), printed as one line.
macro_rules! profile {
    ($label:expr, $call:expr) => {{
        const BATCH: u32 = 100;
        const BATCHES: u32 = 20;
        for _ in 0..BATCH {
            let _ = black_box($call.await);
        }
        let mut batches = Vec::with_capacity(BATCHES as usize);
        for _ in 0..BATCHES {
            let t0 = Instant::now();
            for _ in 0..BATCH {
                let _ = black_box($call.await);
            }
            batches.push(t0.elapsed() / BATCH);
        }
        batches.sort();
        let per_call = batches[batches.len() / 2];
        let (a0, b0) = (ALLOCS.load(Relaxed), ALLOC_BYTES.load(Relaxed));
        COUNTING.store(true, Relaxed);
        for _ in 0..BATCH * BATCHES {
            let _ = black_box($call.await);
        }
        COUNTING.store(false, Relaxed);
        let n = f64::from(BATCH * BATCHES);
        let allocs = (ALLOCS.load(Relaxed) - a0) as f64 / n;
        let bytes = (ALLOC_BYTES.load(Relaxed) - b0) as f64 / n;
        eprintln!(
            "  {:<44} {:>9.2?} {:>7.1} allocs {:>8.0} bytes",
            $label, per_call, allocs, bytes
        );
    }};
}

/// Where the time and the allocations of one message go.
fn profile(s: &Setup, name: &str, from: &Mailbox, body: &[u8]) {
    eprintln!("{name}: per call: median time, heap allocations, bytes allocated");
    let from_domain = FROM_DOMAIN.to_string();
    s.rt.block_on(async {
        profile!("whole message (mail_from + rcpt + message)", decide(s, from, body));
        profile!("guard.mail_from", s.guard.mail_from(from));
        profile!("guard.rcpt", s.guard.rcpt(&s.to));
        profile!("guard.message", s.guard.message(&s.tenant, Some(from), body));
        profile!("  part: guard.health (cache hit)", s.guard.health(&from_domain));
        profile!(
            "  part: dns.lookup MX (cache hit)",
            s.guard.dns().lookup(RCPT_DOMAIN, sendguard::dns::Rt::Mx)
        );
        profile!("  part: ascii_domain", async {
            sendguard::dns::ascii_domain(&s.from.domain)
        });
        profile!("  part: align::author (mail-parser)", async {
            sendguard::guard::align::author(body)
        });
        if sendguard::guard::align::has_dkim_signature(body) {
            profile!("  part: AuthenticatedMessage::parse", async {
                mail_auth::AuthenticatedMessage::parse(body).map(|m| m.dkim_headers.len())
            });
        }
    });
}

fn bench_case(c: &mut Criterion, s: &Setup, name: &str, from: &Mailbox, body: &[u8]) {
    // One call first: fills the caches and proves the measured path is an accept.
    let verdicts = s.rt.block_on(decide(s, from, body));
    assert_eq!(
        verdicts,
        [Verdict::Accept, Verdict::Accept, Verdict::Accept],
        "{name}: the warm-up call must accept (mail_from, rcpt, message)"
    );
    let before = s.dns.queries();
    eprintln!(
        "{name}: message {} bytes; unbound queries after warm-up call: {} ({})",
        body.len(),
        before.len(),
        stats(s)
    );

    let refused = AtomicU64::new(0);
    c.bench_function(name, |b| {
        b.iter_custom(|iters| {
            s.rt.block_on(async {
                let t0 = Instant::now();
                for _ in 0..iters {
                    let v = decide(s, from, black_box(body)).await;
                    if v.iter().any(|v| *v != Verdict::Accept) {
                        refused.fetch_add(1, Relaxed);
                    }
                    black_box(v);
                }
                t0.elapsed()
            })
        })
    });

    profile(s, name, from, body);

    let after = s.dns.queries();
    eprintln!(
        "{name}: unbound queries before/after measuring and profiling: {}/{} ({})",
        before.len(),
        after.len(),
        stats(s)
    );
    assert_eq!(
        refused.load(Relaxed),
        0,
        "{name}: some measured iterations were refused"
    );
    assert_eq!(
        after.len(),
        before.len(),
        "{name}: queries were sent while measuring or profiling (cache not warm): {:?}",
        &after[before.len()..]
    );
}

fn guard_warm(c: &mut Criterion) {
    let s = setup();
    bench_case(c, &s, "guard/warm/unsigned", &s.from, &s.unsigned);
    bench_case(c, &s, "guard/warm/dkim_signed", &s.esp_from, &s.signed);
    eprintln!("unbound query log: {:?}", s.dns.queries());
}

criterion_group!(benches, guard_warm);
criterion_main!(benches);
