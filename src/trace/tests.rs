//! Store-level tests: append and read back, DSN nesting, search, restart,
//! torn and damaged lines, retention, hour buckets, memory.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::clock::{HOUR_MS, from_stem};
use super::*;
use crate::events::{Event, EventKind};

const DAY: Duration = Duration::from_secs(86_400);

/// Milliseconds of an RFC 3339 time.
fn ms(s: &str) -> u64 {
    humantime::parse_rfc3339(s)
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn ts(ms: u64) -> String {
    crate::events::rfc3339(std::time::UNIX_EPOCH + Duration::from_millis(ms))
}

fn ev(kind: EventKind, id: &str, at: u64) -> Event {
    let mut e = Event::new(kind);
    e.message_id = Some(id.into());
    e.ts = ts(at);
    e
}

fn received(id: &str, at: u64, sender: &str, rcpts: &[&str]) -> Event {
    let mut e = ev(EventKind::Received, id, at);
    e.tenant = Some("acme".into());
    e.user = Some("app".into());
    e.sender = Some(sender.into());
    e.rcpts = Some(rcpts.iter().map(|r| r.to_string()).collect());
    e.size = Some(1000);
    e
}

fn attempt(kind: EventKind, id: &str, at: u64, rcpt: &str, n: u32) -> Event {
    let mut e = ev(kind, id, at);
    e.tenant = Some("acme".into());
    e.sender = Some("news@example.com".into());
    e.rcpt = Some(rcpt.into());
    e.attempt = Some(n);
    e
}

/// Append `e` (with its `header_message_id` set when given) at its own time.
fn put(s: &TraceStore, e: &Event, hmid: Option<&str>) {
    let mut e = e.clone();
    if let Some(h) = hmid {
        e.header_message_id = Some(h.into());
    }
    let line = serde_json::to_vec(&e).unwrap();
    s.append_at(&e, &line, clock::parse_ts_ms(&e.ts).unwrap());
}

fn open(dir: &Path, now: u64) -> Arc<TraceStore> {
    TraceStore::open_at(dir, 7 * DAY, now).unwrap()
}

fn kinds(t: &MessageTrace) -> Vec<String> {
    t.events
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_string())
        .collect()
}

fn ids(v: &[MessageSummary]) -> Vec<&str> {
    v.iter().map(|s| s.message_id.as_str()).collect()
}

fn search(s: &TraceStore, f: impl FnOnce(&mut Query)) -> Vec<String> {
    let mut q = Query::default();
    f(&mut q);
    ids(&s.search(&q)).into_iter().map(str::to_string).collect()
}

const T0: &str = "2026-11-23T04:10:00Z";

/// m1 (two recipients, one bounces, a DSN d1 follows), m2, m3 an hour apart.
fn populate(s: &TraceStore) {
    let t = ms(T0);
    put(
        s,
        &received("19b0d5a0f3c80001", t, "News@Example.com", &["a@x.org", "B@y.org"]),
        Some("abc@example.com"),
    );
    put(
        s,
        &attempt(EventKind::Delivered, "19b0d5a0f3c80001", t + 1000, "a@x.org", 1),
        None,
    );
    put(
        s,
        &attempt(EventKind::Deferred, "19b0d5a0f3c80001", t + 2000, "B@y.org", 1),
        None,
    );
    put(s, &received("m-2", t + 5000, "", &["c@z.org"]), Some("m2@host"));
    put(
        s,
        &received("19b0d5a0f3c80003", t + HOUR_MS, "other@example.com", &["a@x.org"]),
        None,
    );
    put(
        s,
        &attempt(EventKind::Bounced, "19b0d5a0f3c80001", t + HOUR_MS + 1000, "B@y.org", 2),
        None,
    );
    let mut dsn = ev(EventKind::DsnQueued, "19b0d5a0f3c80001", t + HOUR_MS + 2000);
    dsn.rcpts = Some(vec!["B@y.org".into()]);
    dsn.dsn_id = Some("19b0d5a0f3c80004".into());
    put(s, &dsn, None);
    let mut d = attempt(
        EventKind::Delivered,
        "19b0d5a0f3c80004",
        t + HOUR_MS + 3000,
        "News@Example.com",
        1,
    );
    d.sender = Some(String::new());
    put(s, &d, None);
}

#[test]
fn message_events_in_order_with_dsn() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), ms(T0));
    populate(&s);
    // Read back from the buffer, then from the files.
    for _ in 0..2 {
        let t = s.message("19b0d5a0f3c80001").unwrap();
        assert_eq!(
            kinds(&t),
            vec!["received", "delivered", "deferred", "bounced", "dsn_queued"]
        );
        assert_eq!(t.events[0]["header_message_id"], "abc@example.com");
        assert_eq!(t.summary.received_at.as_deref(), Some("2026-11-23T04:10:00.000Z"));
        let st: Vec<_> = t.summary.rcpts.iter().map(|r| (r.address.as_str(), r.status)).collect();
        assert_eq!(
            st,
            vec![("a@x.org", RcptStatus::Delivered), ("B@y.org", RcptStatus::Bounced)]
        );
        assert_eq!(t.dsns.len(), 1);
        assert_eq!(t.dsns[0].message_id, "19b0d5a0f3c80004");
        assert_eq!(kinds(&t.dsns[0]), vec!["delivered"]);
        assert_eq!(t.dsns[0].summary.sender.as_deref(), Some(""));
        assert!(t.dsns[0].dsns.is_empty());
        s.flush();
    }
    assert_eq!(kinds(&s.message("m-2").unwrap()), vec!["received"]);
    assert!(s.message("19b0d5a0f3c80002").is_none());
    assert!(s.message("../../etc/passwd").is_none());
    let json = serde_json::to_value(s.message("19b0d5a0f3c80001").unwrap()).unwrap();
    assert_eq!(json["dsns"][0]["events"][0]["event"], "delivered");
    assert_eq!(json["summary"]["rcpts"][1]["status"], "bounced");
    // Two hour files, chained across them.
    let st = s.stats();
    assert_eq!((st.messages, st.files), (4, 2));
    assert!(dir.path().join("2026112304.jsonl").exists());
    assert!(dir.path().join("2026112305.jsonl").exists());
}

#[test]
fn events_without_message_id_are_not_kept() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), ms(T0));
    let mut e = Event::new(EventKind::Refused);
    e.rcpt = Some("a@x.org".into());
    e.session_id = Some("s1".into());
    put(&s, &e, None);
    s.flush();
    assert_eq!(s.stats().messages, 0);
    assert!(search(&s, |_| ()).is_empty());
}

#[test]
fn search_filters() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), ms(T0));
    populate(&s);
    let all = vec!["19b0d5a0f3c80004", "19b0d5a0f3c80003", "m-2", "19b0d5a0f3c80001"];
    assert_eq!(search(&s, |_| ()), all);
    assert_eq!(search(&s, |q| q.limit = 2), all[..2]);
    assert!(search(&s, |q| q.limit = 0).is_empty());
    assert_eq!(
        search(&s, |q| q.rcpt = Some("A@X.ORG".into())),
        vec!["19b0d5a0f3c80003", "19b0d5a0f3c80001"]
    );
    assert_eq!(
        search(&s, |q| q.rcpt = Some("<b@y.org>".into())),
        vec!["19b0d5a0f3c80001"]
    );
    assert!(search(&s, |q| q.rcpt = Some("nobody@x.org".into())).is_empty());
    assert_eq!(
        search(&s, |q| q.sender = Some("news@example.com".into())),
        vec!["19b0d5a0f3c80001"]
    );
    // The null sender: m-2 and the DSN.
    assert_eq!(
        search(&s, |q| q.sender = Some("".into())),
        vec!["19b0d5a0f3c80004", "m-2"]
    );
    assert_eq!(
        search(&s, |q| q.sender = Some("<>".into())),
        vec!["19b0d5a0f3c80004", "m-2"]
    );
    assert_eq!(
        search(&s, |q| q.header_message_id = Some("<m2@host>".into())),
        vec!["m-2"]
    );
    assert!(search(&s, |q| q.header_message_id = Some("M2@host".into())).is_empty());
    let t = ms(T0);
    assert_eq!(
        search(&s, |q| {
            q.since_ms = Some(t + 1);
            q.until_ms = Some(t + HOUR_MS);
        }),
        vec!["19b0d5a0f3c80003", "m-2"]
    );
    assert_eq!(
        search(&s, |q| {
            q.rcpt = Some("a@x.org".into());
            q.until_ms = Some(t);
        }),
        vec!["19b0d5a0f3c80001"]
    );
    assert_eq!(search(&s, |q| q.tenant = Some("acme".into())), all);
    assert!(search(&s, |q| q.tenant = Some("other".into())).is_empty());
    let r = s.search(&Query {
        rcpt: Some("c@z.org".into()),
        ..Query::default()
    });
    assert_eq!(r[0].rcpts[0].status, RcptStatus::Queued);
    assert_eq!(r[0].header_message_id.as_deref(), Some("m2@host"));
    assert_eq!(r[0].tenant.as_deref(), Some("acme"));
}

#[test]
fn newest_first_over_many_hours() {
    let dir = tempfile::tempdir().unwrap();
    let t = ms(T0);
    let s = open(dir.path(), t);
    for i in 0..300u64 {
        let at = t + i * 60_000;
        let id = format!("{i:04x}");
        put(
            &s,
            &received(
                &id,
                at,
                "s@example.com",
                &[if i % 2 == 0 { "even@x.org" } else { "odd@x.org" }],
            ),
            None,
        );
    }
    let got = search(&s, |q| {
        q.rcpt = Some("even@x.org".into());
        q.limit = 3;
    });
    assert_eq!(got, vec!["012a", "0128", "0126"]);
    assert_eq!(s.stats().files, 6);
}

#[test]
fn restart_rebuilds_the_same_index() {
    let dir = tempfile::tempdir().unwrap();
    let t = ms(T0);
    let (before, found) = {
        let s = open(dir.path(), t);
        populate(&s);
        // A second process is kept out while it is open.
        assert!(TraceStore::open_at(dir.path(), 7 * DAY, t).is_err());
        let m = serde_json::to_value(s.message("19b0d5a0f3c80001").unwrap()).unwrap();
        (m, search(&s, |q| q.rcpt = Some("a@x.org".into())))
        // Dropped: flushed.
    };
    let s = open(dir.path(), t + 2 * HOUR_MS);
    assert_eq!(
        serde_json::to_value(s.message("19b0d5a0f3c80001").unwrap()).unwrap(),
        before
    );
    assert_eq!(search(&s, |q| q.rcpt = Some("a@x.org".into())), found);
    assert_eq!(
        search(&s, |q| q.header_message_id = Some("abc@example.com".into())),
        vec!["19b0d5a0f3c80001"]
    );
    assert_eq!(s.stats().messages, 4);
    // Appending after the restart continues the chains.
    put(
        &s,
        &attempt(EventKind::Delivered, "m-2", t + 2 * HOUR_MS, "c@z.org", 1),
        None,
    );
    let m = s.message("m-2").unwrap();
    assert_eq!(kinds(&m), vec!["received", "delivered"]);
    assert_eq!(m.summary.rcpts[0].status, RcptStatus::Delivered);
}

#[test]
fn torn_and_damaged_lines_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let t = ms(T0);
    {
        let s = open(dir.path(), t);
        put(&s, &received("01", t, "s@example.com", &["a@x.org"]), None);
        put(&s, &received("02", t + 1, "s@example.com", &["b@x.org"]), None);
    }
    let path = dir.path().join("2026112304.jsonl");
    let mut data = std::fs::read(&path).unwrap();
    // Garbage between lines (a power loss) and a torn last line (a crash).
    let first_end = data.iter().position(|&b| b == b'\n').unwrap() + 1;
    data.splice(first_end..first_end, b"\0\0\0\0{\"prev\":nu\n".iter().copied());
    data.extend_from_slice(b"{\"prev\":null,\"ev\":{\"id\":\"x\",\"message_id\":\"03\"");
    std::fs::write(&path, &data).unwrap();
    let s = open(dir.path(), t);
    assert_eq!(s.stats().messages, 2);
    assert!(s.message("03").is_none());
    // 02's only line moved with the garbage; the scan finds it there.
    assert_eq!(kinds(&s.message("02").unwrap()), vec!["received"]);
    put(&s, &attempt(EventKind::Delivered, "02", t + 2, "b@x.org", 1), None);
    s.flush();
    assert_eq!(kinds(&s.message("02").unwrap()), vec!["received", "delivered"]);
    // The torn tail was cut off before appending: every line is whole.
    let text = std::fs::read(&path).unwrap();
    assert!(text.ends_with(b"\n"));
    assert!(!text.windows(5).any(|w| w == b"\"03\"{"));
    drop(s);
    let s = open(dir.path(), t);
    assert_eq!(kinds(&s.message("02").unwrap()), vec!["received", "delivered"]);
}

#[test]
fn a_pointer_into_another_message_ends_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let t = ms(T0);
    {
        let s = open(dir.path(), t);
        put(&s, &received("01", t, "s@example.com", &["a@x.org"]), None);
        put(&s, &received("02", t + 1, "s@example.com", &["b@x.org"]), None);
    }
    let path = dir.path().join("2026112304.jsonl");
    let second = std::fs::read(&path).unwrap().iter().position(|&b| b == b'\n').unwrap() + 1;
    let line = format!(
        "{{\"prev\":[2026112304,{second}],\"ev\":{{\"ts\":\"2026-11-23T04:10:00.002Z\",\"event\":\"delivered\",\"message_id\":\"01\"}}}}\n"
    );
    let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
    std::io::Write::write_all(&mut f, line.as_bytes()).unwrap();
    let s = open(dir.path(), t);
    assert_eq!(kinds(&s.message("01").unwrap()), vec!["delivered"]);
}

#[test]
fn retention_sweep() {
    let dir = tempfile::tempdir().unwrap();
    let t = ms(T0); // 04:10, hour file 04
    let s = TraceStore::open_at(dir.path(), Duration::from_secs(2 * 3600), t).unwrap();
    put(&s, &received("01", t, "s@example.com", &["a@x.org"]), None);
    put(&s, &received("02", t + 1, "s@example.com", &["a@x.org"]), None);
    put(&s, &received("03", t + HOUR_MS, "s@example.com", &["a@x.org"]), None);
    // 02 goes on in hour 06.
    put(
        &s,
        &attempt(EventKind::Deferred, "02", t + 2 * HOUR_MS, "a@x.org", 1),
        None,
    );
    s.flush();
    // Hour 04 ends at 05:00; with 2 h retention it goes at 07:00.
    s.sweep_at(ms("2026-11-23T06:59:59.999Z"));
    assert_eq!(s.stats().files, 3);
    s.sweep_at(ms("2026-11-23T07:00:00Z"));
    assert_eq!(s.stats().files, 2);
    assert!(!dir.path().join("2026112304.jsonl").exists());
    assert!(s.message("01").is_none());
    assert_eq!(kinds(&s.message("02").unwrap()), vec!["deferred"]);
    assert_eq!(search(&s, |q| q.rcpt = Some("a@x.org".into())), vec!["03", "02"]);
    // The current file is never deleted, however old.
    s.sweep_at(ms("2026-12-31T00:00:00Z"));
    assert_eq!(s.stats().files, 1);
    assert!(dir.path().join("2026112306.jsonl").exists());
    assert_eq!(s.stats().messages, 1);
    drop(s);
    // Opening deletes what is past retention before scanning.
    let s = TraceStore::open_at(dir.path(), Duration::from_secs(2 * 3600), ms("2026-12-31T00:00:00Z")).unwrap();
    assert_eq!(
        s.stats(),
        TraceStats {
            messages: 0,
            files: 0,
            index_bytes: s.stats().index_bytes
        }
    );
    // Other files in the directory are left alone.
    assert!(dir.path().join("lock").exists());
}

#[test]
fn hour_buckets() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), ms(T0));
    let a = ms("2026-11-23T10:59:59.999Z");
    let b = a + 1;
    let e1 = received("01", a, "s@example.com", &["a@x.org"]);
    s.append_at(&e1, &serde_json::to_vec(&e1).unwrap(), a);
    let e2 = attempt(EventKind::Delivered, "01", b, "a@x.org", 1);
    s.append_at(&e2, &serde_json::to_vec(&e2).unwrap(), b);
    // The writer's clock going back does not reopen an older file.
    let e3 = attempt(EventKind::Delivered, "01", a, "b@x.org", 1);
    s.append_at(&e3, &serde_json::to_vec(&e3).unwrap(), a - HOUR_MS);
    s.flush();
    let f10 = std::fs::read_to_string(dir.path().join("2026112310.jsonl")).unwrap();
    let f11 = std::fs::read_to_string(dir.path().join("2026112311.jsonl")).unwrap();
    assert_eq!(f10.lines().count(), 1);
    assert!(f10.starts_with("{\"prev\":null,\"ev\":{"));
    assert_eq!(f11.lines().count(), 2);
    assert!(f11.starts_with("{\"prev\":[2026112310,0],\"ev\":{"));
    assert_eq!(
        kinds(&s.message("01").unwrap()),
        vec!["received", "delivered", "delivered"]
    );
    assert_eq!(super::clock::stem(from_stem(2026112311).unwrap()), 2026112311);
}

#[test]
fn unknown_fields_and_kinds_are_kept_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let t = ms(T0);
    let s = open(dir.path(), t);
    let e = received("01", t, "s@example.com", &["a@x.org"]);
    let mut v = serde_json::to_value(&e).unwrap();
    v["checks"] = serde_json::json!([{"check": "dmarc", "result": "pass"}]);
    s.append_at(&e, &serde_json::to_vec(&v).unwrap(), t);
    assert_eq!(s.message("01").unwrap().events[0]["checks"][0]["check"], "dmarc");
}
