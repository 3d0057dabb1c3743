//! The embedded suppression store at 1,000,000 entries: how long the log
//! takes to load at start, how many lookups per second one thread does
//! (hits and misses, as RCPT checks do them), how much memory the
//! index holds, and what a page of the admin listing costs.
//!
//!   cargo bench --bench suppression            # 1,000,000 entries
//!   SUPPRESSION_ENTRIES=200000 cargo bench --bench suppression
//!
//! The log is written through the store's own bulk path (batches of
//! 100,000, one fsync each), then the store is dropped and opened again:
//! the load time is a cold start from that file (page cache warm, as after
//! a restart). Memory is the process's resident set before and after the
//! open (glibc malloc, so it includes allocator overhead). Lookups use
//! addresses normalized as the session normalizes them; the miss set has
//! the same shape (same domains, different local parts).

use std::hint::black_box;
use std::time::Instant;

use sendguard::suppress::embedded::Embedded;
use sendguard::suppress::{Entry, Query, Reason, SuppressionStore};

#[path = "support/mem.rs"]
mod mem;
use mem::{rss_kb, trim};

const DOMAINS: [&str; 8] = [
    "gmail.com",
    "outlook.com",
    "yahoo.com",
    "icloud.com",
    "hotmail.com",
    "example.org",
    "mail.example.net",
    "corp.example.com",
];

fn address(i: usize, prefix: &str) -> String {
    format!("{prefix}user.{i:07}@{}", DOMAINS[i % DOMAINS.len()])
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing:
    // run a small size then, as a smoke test.
    let bench = std::env::args().any(|a| a == "--bench");
    let n: usize = std::env::var("SUPPRESSION_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if bench { 1_000_000 } else { 10_000 });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("suppressions.jsonl");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    {
        let store = Embedded::open(&path).unwrap();
        let t = Instant::now();
        let batch = 100_000;
        for start in (0..n).step_by(batch) {
            let entries: Vec<Entry> = (start..(start + batch).min(n))
                .map(|i| Entry {
                    address: address(i, ""),
                    tenant: (i % 10 == 0).then(|| "acme".to_string()),
                    reason: if i % 3 == 0 {
                        Reason::HardBounce
                    } else {
                        Reason::Unsubscribe
                    },
                    source: if i % 3 == 0 {
                        "550 5.1.1 The email account that you tried to reach does not exist".into()
                    } else {
                        String::new()
                    },
                    created_ms: 1_795_000_000_000 + i as u64,
                    expires_ms: None,
                })
                .collect();
            rt.block_on(store.add(entries)).unwrap();
        }
        println!(
            "write: {n} entries in {:.2} s ({:.0} entries/s, batches of {batch})",
            t.elapsed().as_secs_f64(),
            n as f64 / t.elapsed().as_secs_f64()
        );
    }
    let size = std::fs::metadata(&path).unwrap().len();
    trim();
    let before = rss_kb();
    let t = Instant::now();
    let store = Embedded::open(&path).unwrap();
    let load = t.elapsed();
    let after = rss_kb();
    // What stays once the allocator returns the load's garbage (the
    // server's memory trimmer does this every 30 s).
    trim();
    let trimmed = rss_kb();
    assert_eq!(store.len(), n, "every entry loaded");
    println!(
        "load: {n} entries ({:.1} MB log) in {:.2} s; resident +{:.1} MB after load, +{:.1} MB after trim ({:.0} bytes/entry)",
        size as f64 / 1e6,
        load.as_secs_f64(),
        (after - before) as f64 / 1024.0,
        (trimmed.saturating_sub(before)) as f64 / 1024.0,
        (trimmed.saturating_sub(before)) as f64 * 1024.0 / n as f64
    );

    // Lookups: tenant "other" (global entries apply, tenant "acme" ones do not).
    let probes = n.min(1_000_000);
    let hits: Vec<String> = (0..probes).map(|i| address((i * 7919) % n, "")).collect();
    let misses: Vec<String> = (0..probes).map(|i| address(i, "nobody.")).collect();
    for (name, set, want_hit) in [("hit", &hits, true), ("miss", &misses, false)] {
        // warm-up pass, checked
        let found = set.iter().filter(|a| store.lookup("acme", a).is_some()).count();
        if want_hit {
            assert_eq!(found, set.len(), "every stored address is found for its tenant");
        } else {
            assert_eq!(found, 0);
        }
        let rounds = 3;
        let t = Instant::now();
        for _ in 0..rounds {
            for a in set.iter() {
                black_box(store.lookup(black_box("acme"), black_box(a)));
            }
        }
        let per = t.elapsed().as_secs_f64() / (rounds * set.len()) as f64;
        println!(
            "lookup ({name}): {:.0} ns each, {:.2} M lookups/s on one thread",
            per * 1e9,
            1e-6 / per
        );
    }

    // The admin listing: a page of 100 from the start, one deep in, a
    // filtered page, and the whole store (what an export copies). All but
    // the last hold the index's read lock only to pick and copy the page.
    for (name, q) in [
        (
            "page 1",
            Query {
                limit: 100,
                ..Default::default()
            },
        ),
        (
            "page at offset 10,000",
            Query {
                offset: 10_000,
                limit: 100,
                ..Default::default()
            },
        ),
        (
            "tenant page",
            Query {
                tenant: Some("acme".into()),
                limit: 100,
                ..Default::default()
            },
        ),
        (
            "whole store",
            Query {
                limit: usize::MAX,
                ..Default::default()
            },
        ),
    ] {
        let t = Instant::now();
        let page = store.list(&q);
        let took = t.elapsed();
        // Every tenth entry is tenant acme's.
        let matching = if q.tenant.is_some() { n.div_ceil(10) } else { n };
        assert_eq!(
            page.len(),
            q.limit.min(matching.saturating_sub(q.offset)),
            "{name}: a full page"
        );
        assert!(
            page.windows(2)
                .all(|w| (&w[0].address, &w[0].tenant) < (&w[1].address, &w[1].tenant))
        );
        println!(
            "list ({name}): {} entries in {:.1} ms",
            page.len(),
            took.as_secs_f64() * 1e3
        );
    }
}
