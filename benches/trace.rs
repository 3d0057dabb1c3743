//! The trace store's memory and start-up scan (`src/trace/`): 100,000
//! synthetic messages (80 % one recipient, 20 % three; a `received` and a
//! delivery event per recipient), then a restart that rebuilds the index
//! from the files, and one selective search.
//!
//!   cargo bench --bench trace
//!
//! Prints the index's bytes per message (by capacity, and RSS growth), the
//! scan rate and the search time; figures in `docs/performance.md` and the
//! module doc of `src/trace/mod.rs`.

#[path = "support/mem.rs"]
mod mem;

use std::time::{Duration, Instant, UNIX_EPOCH};

use sendguard::events::{Event, EventKind, ReplyRecord, rfc3339};
use sendguard::trace::{Query, TraceStore};

const N: u64 = 100_000;
/// 2026-11-23T04:00:00Z
const T0: u64 = 1_795_406_400_000;
const RETENTION: Duration = Duration::from_secs(7 * 86_400);

fn event(kind: EventKind, id: &str, at: u64) -> Event {
    let mut e = Event::new(kind);
    e.message_id = Some(id.into());
    e.ts = rfc3339(UNIX_EPOCH + Duration::from_millis(at));
    e.tenant = Some("acme".into());
    e
}

fn put(s: &TraceStore, e: &Event, at: u64) {
    s.append_at(e, &serde_json::to_vec(e).unwrap(), at);
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let mut events = 0u64;
    {
        let s = TraceStore::open_at(dir.path(), RETENTION, T0).unwrap();
        for i in 0..N {
            let id = format!("19b0d5a0f3c{:05x}{i:04x}", i >> 16);
            let at = T0 + i * 20;
            let rcpts: Vec<String> = (0..if i % 5 == 0 { 3 } else { 1 })
                .map(|r| format!("user{i}.{r}@example{}.com", i % 97))
                .collect();
            let mut e = event(EventKind::Received, &id, at);
            e.user = Some("app".into());
            e.sender = Some(format!("bounce+{i}@sender.example"));
            e.rcpts = Some(rcpts.clone());
            e.size = Some(1000);
            e.peer = Some("192.0.2.1:40000".into());
            e.session_id = Some(format!("19b0d5a0f3c8{i:012x}"));
            e.header_message_id = Some(format!("{i}.{at}@mail.sender.example"));
            put(&s, &e, at);
            events += 1;
            for r in &rcpts {
                let mut d = event(EventKind::Delivered, &id, at + 5);
                d.sender = Some("news@example.com".into());
                d.rcpt = Some(r.clone());
                d.attempt = Some(1);
                d.provider = Some("gmail".into());
                d.reply = Some(ReplyRecord {
                    code: Some(250),
                    enhanced: Some("2.0.0".into()),
                    text: "OK 1700000000 x12si123456qkb.100 - gsmtp".into(),
                });
                put(&s, &d, at + 5);
                events += 1;
            }
            if i % 1000 == 0 {
                s.flush();
            }
        }
    }
    let bytes: u64 = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    mem::trim();
    let rss0 = mem::rss_kb();
    let started = Instant::now();
    let s = TraceStore::open_at(dir.path(), RETENTION, T0).unwrap();
    let scan = started.elapsed();
    mem::trim();
    let rss1 = mem::rss_kb();
    let st = s.stats();
    assert_eq!(st.messages, N as usize);
    println!(
        "trace: {N} messages, {events} events, {} MB of files; index {} bytes/message by capacity, \
         RSS +{} bytes/message; scan {:.0} MB/s ({} ms)",
        bytes >> 20,
        st.index_bytes as u64 / N,
        (rss1.saturating_sub(rss0) * 1024) / N,
        bytes as f64 / 1e6 / scan.as_secs_f64(),
        scan.as_millis()
    );
    let started = Instant::now();
    let hits = s.search(&Query {
        rcpt: Some(format!("user77777.0@example{}.com", 77777 % 97)),
        ..Query::default()
    });
    println!(
        "trace: a selective search over {N} messages took {:?}",
        started.elapsed()
    );
    assert_eq!(hits.len(), 1);
    assert!(
        st.index_bytes as u64 / N < 80,
        "the index outgrew its 80 bytes per message"
    );
}
