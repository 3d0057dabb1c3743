//! RFC 7208 SPF test suite run as data against the guard's SPF evaluation
//! (`sendguard::guard::spf::check_host`).
//!
//! The suite is the openspf one shipped by Debian's python3-spf
//! (installed by scripts/install-deps). tests/data/rfc7208_to_unbound.py turns
//! each YAML document into unbound `local-data` lines and a TSV of tests; each
//! document gets its own unbound ([`TestDns`]) and its own [`Dns`] (the caches
//! would mix the documents' zones otherwise). Only the result is compared, not
//! the explanation text.
//!
//! mail-auth deviates from the RFC in known ways (docs/notes/guard-research.md
//! §6); those tests are listed in [`KNOWN_DEVIATIONS`], grouped by cause. The
//! test fails on a regression (a test not on the list fails), on a list entry
//! that now passes or no longer exists (trim the list), and when fewer than
//! [`MIN_TESTS`] tests ran (the data went missing).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use mail_auth::spf::verify::SpfParameters;
use sendguard::config::DnsConfig;
use sendguard::dns::Dns;
use sendguard::guard::spf::check_host;

use crate::support::dns::TestDns;

const SUITE: &str = "/usr/share/doc/python3-spf/rfc7208-tests.yml.gz";

/// The suite has 203 tests; far fewer means the conversion lost data.
const MIN_TESTS: usize = 140;

/// The receiving host (`%{r}`), as pyspf's test driver uses it.
const RECEIVER: &str = "unknown";

/// No single check may take longer than this (the TIMEOUT cases cost the DNS
/// timeout per query).
const PER_TEST_LIMIT: Duration = Duration::from_secs(10);

/// Tests of the suite the guard is known to get wrong, by cause (measured
/// against mail-auth 0.13.3 plus check_host's corrections; the failure output
/// shows what mail-auth alone says). When one starts passing, the test fails
/// and asks for it to be removed here.
const KNOWN_DEVIATIONS: &[(&str, &[&str])] = &[
    (
        "mail-auth: a malformed identity domain (empty label, domain literal) is permerror, not none (RFC 7208 §4.3)",
        &["emptylabel", "helo-domain-literal", "domain-literal"],
    ),
    (
        "mail-auth: modifier names with '.' or '_' rejected (RFC 7208 §12 allows them), also via redirect",
        &["modifier-charset-good", "redirect-after-mechanisms2"],
    ),
    (
        "mail-auth: unknown/empty modifier names and a bad exp= not permerror (RFC 7208 §4.6.1, §12)",
        &["invalid-modifier", "empty-modifier-name", "exp-syntax-error"],
    ),
    (
        "mail-auth: a macro expanding to a name hickory cannot parse (%{p} empty, %{h} with spaces or brackets, %_, \
         long labels) is temperror instead of a lookup or permerror (RFC 7208 §7)",
        &[
            "invalid-domain-long-via-macro",
            "macro-mania-in-domain",
            "p-macro-multiple",
            "invalid-hello-macro",
            "hello-domain-literal",
        ],
    ),
    (
        "mail-auth: bad CIDR lengths (/33, /032, /129, a/24/64 with a bad ip4 part) evaluated instead of permerror \
         (RFC 7208 §5.6)",
        &[
            "a-bad-cidr4",
            "a-bad-cidr6",
            "a-dual-cidr-ip4-err",
            "mx-bad-cidr4",
            "mx-bad-cidr6",
            "cidr4-33",
            "cidr4-032",
            "cidr6-129",
        ],
    ),
    (
        "mail-auth: IPv4 clients (or IPv4-mapped IPv6) match ip6/cidr6 ranges (RFC 7208 §5.6)",
        &[
            "a-cidr6-0-ip4mapped",
            "mx-cidr6-0-ip4mapped",
            "cidr6-0-ip4",
            "cidr6-ip4",
        ],
    ),
    (
        "mail-auth: a domain-spec containing ':' or '/' (any visible char but '%' is allowed) is permerror (RFC \
         7208 §7.1)",
        &[
            "a-colon-domain",
            "a-colon-domain-ip4mapped",
            "mx-colon-domain",
            "mx-colon-domain-ip4mapped",
        ],
    ),
    (
        "mail-auth: ptr without a domain fails to match the validated name (RFC 7208 §5.5)",
        &["ptr-match-implicit", "ptr-match-ip6"],
    ),
    (
        "mail-auth: exists: also looks up AAAA (RFC 7208 §5.7: A only)",
        &["exists-ip6only"],
    ),
    (
        "mail-auth: no void-lookup limit (RFC 7208 §4.6.4)",
        &["void-over-limit"],
    ),
];

struct Case {
    doc: String,
    name: String,
    host: String,
    helo: String,
    mailfrom: String,
    expected: Vec<String>,
}

struct Outcome {
    case: Case,
    got: String,
    /// For a wrong result: what mail-auth alone says (without check_host's
    /// corrections), to tell the two apart in the report.
    mail_auth: String,
    queries: Vec<String>,
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn cases(dir: &Path, doc: &str) -> Vec<Case> {
    read(&dir.join(format!("doc{doc}.tsv")))
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split('\t').collect();
            assert_eq!(f.len(), 5, "doc{doc}.tsv: bad line {line:?}");
            Case {
                doc: doc.to_string(),
                name: f[0].to_string(),
                host: f[1].to_string(),
                helo: f[2].to_string(),
                mailfrom: f[3].to_string(),
                expected: f[4].split(',').map(str::to_string).collect(),
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc7208_suite() {
    let t0 = Instant::now();
    assert!(
        Path::new(SUITE).exists(),
        "{SUITE} is missing: run scripts/install-deps (Debian package python3-spf)"
    );
    let out = tempfile::tempdir().unwrap();
    let converter = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/rfc7208_to_unbound.py");
    // Debian's interpreter, which has python3-yaml (a pyenv python3 earlier
    // in PATH may not).
    let run = Command::new("/usr/bin/python3")
        .arg(&converter)
        .arg(out.path())
        .output()
        .expect("python3 is not installed: run scripts/install-deps");
    assert!(
        run.status.success(),
        "{} failed ({}): {}",
        converter.display(),
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );

    let mut outcomes = Vec::new();
    for line in read(&out.path().join("index.tsv")).lines() {
        let doc = line.split('\t').next().unwrap().to_string();
        let server_lines = read(&out.path().join(format!("doc{doc}.conf")));
        let dns_server = tokio::task::block_in_place(|| TestDns::start(&server_lines));
        let dns = Dns::new(&DnsConfig {
            nameservers: vec![dns_server.addr()],
            timeout: Duration::from_millis(300),
            attempts: 1,
            ..Default::default()
        })
        .unwrap();
        for case in cases(out.path(), &doc) {
            let ip: IpAddr = case
                .host
                .parse()
                .unwrap_or_else(|e| panic!("{}: host {:?}: {e}", case.name, case.host));
            let before = dns_server.queries().len();
            let got = match tokio::time::timeout(
                PER_TEST_LIMIT,
                check_host(&dns, ip, &case.helo, RECEIVER, &case.mailfrom),
            )
            .await
            {
                Ok(result) => result.to_string().to_lowercase(),
                Err(_) => format!("no result in {PER_TEST_LIMIT:?}"),
            };
            let queries = dns_server.queries().split_off(before);
            let mut mail_auth = String::new();
            if !case.expected.contains(&got) {
                let params = if case.mailfrom.is_empty() {
                    SpfParameters::verify_ehlo(ip, &case.helo, RECEIVER)
                } else {
                    SpfParameters::verify_mail_from(ip, &case.helo, RECEIVER, &case.mailfrom)
                };
                let raw = dns.auth().verify_spf(dns.caches.params(params));
                mail_auth = match tokio::time::timeout(PER_TEST_LIMIT, raw).await {
                    Ok(output) => output.result().to_string().to_lowercase(),
                    Err(_) => format!("no result in {PER_TEST_LIMIT:?}"),
                };
            }
            outcomes.push(Outcome {
                case,
                got,
                mail_auth,
                queries,
            });
        }
    }
    let elapsed = t0.elapsed();

    let known: BTreeMap<&str, &str> = KNOWN_DEVIATIONS
        .iter()
        .flat_map(|(reason, names)| names.iter().map(move |n| (*n, *reason)))
        .collect();
    let mut passed = 0;
    let mut deviations: BTreeMap<&str, usize> = BTreeMap::new();
    let mut regressions = Vec::new();
    let mut now_passing = Vec::new();
    for o in &outcomes {
        let ok = o.case.expected.contains(&o.got);
        let c = &o.case;
        let what = format!(
            "doc{} {}: ip {} helo {:?} mailfrom {:?}: expected {} got {}",
            c.doc,
            c.name,
            c.host,
            c.helo,
            c.mailfrom,
            c.expected.join("|"),
            o.got
        );
        let what = if o.mail_auth.is_empty() {
            what
        } else {
            format!("{what} (mail-auth alone: {})", o.mail_auth)
        };
        match (ok, known.get(c.name.as_str())) {
            (true, None) => passed += 1,
            (true, Some(_)) => now_passing.push(what),
            (false, Some(reason)) => {
                *deviations.entry(reason).or_default() += 1;
                println!("known deviation {what}");
            }
            (false, None) => regressions.push(format!("{what}\n      queries: {:?}", o.queries)),
        }
    }
    let ran: BTreeSet<&str> = outcomes.iter().map(|o| o.case.name.as_str()).collect();
    let missing: Vec<&str> = known.keys().copied().filter(|n| !ran.contains(n)).collect();

    println!();
    for (reason, n) in &deviations {
        println!("{n:3} known deviations: {reason}");
    }
    println!(
        "RFC 7208 suite: {passed} passed, {} known deviations ({} tests in {:.1?})",
        deviations.values().sum::<usize>(),
        outcomes.len(),
        elapsed
    );

    let mut problems = Vec::new();
    if outcomes.len() < MIN_TESTS {
        problems.push(format!(
            "only {} tests ran (expected at least {MIN_TESTS}): the suite data went missing",
            outcomes.len()
        ));
    }
    if !regressions.is_empty() {
        problems.push(format!(
            "{} tests fail that are not known deviations:\n    {}",
            regressions.len(),
            regressions.join("\n    ")
        ));
    }
    if !now_passing.is_empty() {
        problems.push(format!(
            "{} known deviations pass now: remove them from KNOWN_DEVIATIONS:\n    {}",
            now_passing.len(),
            now_passing.join("\n    ")
        ));
    }
    if !missing.is_empty() {
        problems.push(format!(
            "KNOWN_DEVIATIONS names tests that did not run: {}",
            missing.join(", ")
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
