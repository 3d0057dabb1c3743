//! Message trace (issue 7): every event of a message — submission, guard
//! checks, spool write, each delivery attempt per recipient, DSNs — kept
//! for `trace.retention` and found by message id or searched by
//! recipient, sender, Message-ID header, tenant and time.
//!
//! **Files.** `<dir>/YYYYMMDDHH.jsonl`, one per UTC hour of writing (the
//! clock of the writer, never going back), append-only. Each line is
//! `{"prev":[YYYYMMDDHH,offset],"ev":<event>}` where `ev` is the event
//! exactly as in the events log and `prev` points at the line of the
//! message's previous event (`null` on its first): a message's lines
//! form a chain back from its latest one. Retention deletes whole files
//! once the end of their hour is `retention` ago ([`TraceStore::sweep`]),
//! never the current one. (Because the hour never goes back, a clock that
//! jumped ahead keeps lines in that later file until time catches up.)
//!
//! **What is kept.** Every event that has a `message_id`, of any kind;
//! events without one (refusals at submission, breakers, …) are not
//! traced. A DSN is a message of its own; its parent's `dsn_queued`
//! event names it (`dsn_id`) and [`TraceStore::message`] nests its trace.
//!
//! **Memory.** The index holds one 40-byte record per message (no event
//! bodies, no addresses: where its latest line is, when it was received,
//! its tenant, and 31-bit hashes of sender, recipients and Message-ID
//! header), 4.6–9 bytes of id table and 4 of creation list; a message with
//! several recipients adds 16 + 4 per recipient. Measured
//! (`cargo bench --bench trace`: 100,000 messages, 80 % with one recipient,
//! 20 % with three): 59 bytes per message by capacity, 57 by RSS; about
//! 50 for one-recipient mail at scale. A million messages a day kept 7
//! days: 350–400 MB. Events are read back from the files:
//! [`TraceStore::message`] follows the chain, [`TraceStore::search`]
//! picks candidates in memory and confirms each against its events.
//!
//! **Durability.** None promised: the trace is diagnostic. Lines are
//! buffered and written at each [`TraceStore::flush`] (the events
//! writer's batch) and never fsynced. A crash may tear the last line,
//! which the start-up scan skips and the next append cuts off.
//! [`TraceStore::open`] rebuilds the index by scanning the files kept, at
//! about 190 MB/s (release build, warm cache; ~350 bytes per event line):
//! the 7-million-message case, some 6 GB, takes about half a minute. A
//! message whose first lines are past retention keeps its later ones;
//! after a restart its received time is that of its oldest kept event.
//!
//! **Concurrency.** One mutex over the index and the buffer. `append`
//! and `flush` hold it for an index update and a buffer copy (a write of
//! the batch at `flush`); `search` holds it for blocks of
//! [`SEARCH_BLOCK`] records; file reads happen outside it.
//!
//! Trust boundary: event fields carry client-supplied addresses,
//! Message-IDs and upstream replies; they are stored as serde wrote them
//! (a line cannot be split) and only hashed in memory. Ids and search
//! strings come from API requests: they are compared and hashed, never
//! used to build a path (file names come only from hour numbers). The
//! files are our own but are read as possibly damaged: every line is
//! parsed defensively and every chain step checked (same message id,
//! strictly backwards), so damage shortens a trace instead of mixing
//! messages. A lock file keeps a second process out of the directory.

mod clock;
mod config;
mod facts;
mod ids;
mod index;
pub mod render;
mod segment;
mod summary;
#[cfg(test)]
mod tests;
mod writer;

use std::collections::hash_map::RandomState;
use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File};
use std::hash::BuildHasher;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde_json::Value;

pub use config::TraceConfig;
pub use summary::{MAX_LIMIT, MessageSummary, MessageTrace, Query, RcptStatus, RcptSummary};

use crate::events::Event;
use clock::{HOUR_MS, hour_of};
use index::{Cursor, Filter, Index, TopK};
use segment::{Loc, MAX_LINE, file_name, parse_file_name, read_line_at, unframe};
use summary::{confirm, norm_addr, norm_msgid, summarize};
use writer::{Appender, WRITE_AT};

/// Records examined per lock hold during a search.
pub const SEARCH_BLOCK: usize = 65_536;

/// Most events followed back for one message.
const MAX_CHAIN: usize = 100_000;

/// Figures for metrics and the memory check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TraceStats {
    pub messages: usize,
    pub files: usize,
    /// Heap held by the index (from capacities, allocator overhead aside).
    pub index_bytes: usize,
}

/// The message trace: hour files plus the in-memory index over them.
pub struct TraceStore {
    dir: PathBuf,
    retention_ms: u64,
    hasher: RandomState,
    state: Mutex<State>,
    _lock: File,
}

struct State {
    index: Index,
    out: Appender,
    /// Hours of the files present (the current one included).
    files: BTreeSet<u32>,
    /// Opening the current file failed (logged once per spell).
    open_failing: bool,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

impl TraceStore {
    /// Open (create) the store in `dir`: delete files past `retention`,
    /// then rebuild the index by scanning the rest (blocking; run it on a
    /// blocking thread). Damaged lines are skipped, never fatal.
    pub fn open(dir: &Path, retention: Duration) -> io::Result<Arc<TraceStore>> {
        Self::open_at(dir, retention, now_ms())
    }

    /// [`open`](Self::open) at a given time (ms since the epoch).
    pub fn open_at(dir: &Path, retention: Duration, now_ms: u64) -> io::Result<Arc<TraceStore>> {
        fs::create_dir_all(dir)?;
        let lock = crate::spool::lock_dir(dir)?;
        let retention_ms = u64::try_from(retention.as_millis()).unwrap_or(u64::MAX);
        let hasher = RandomState::new();
        let mut index = Index::new(hasher.hash_one("trace index"));
        let mut files = BTreeSet::new();
        for e in fs::read_dir(dir)? {
            let e = e?;
            if let Some(h) = parse_file_name(&e.file_name().to_string_lossy()) {
                files.insert(h);
            }
        }
        let expired: Vec<u32> = files
            .iter()
            .copied()
            .filter(|&h| Self::expired(h, retention_ms, now_ms))
            .collect();
        for h in expired {
            files.remove(&h);
            remove(dir, h);
        }
        let started = std::time::Instant::now();
        let (mut lines, mut skipped, mut bytes) = (0u64, 0u64, 0u64);
        for &h in &files {
            let res = segment::scan(&dir.join(file_name(h)), |off, line| {
                bytes += line.len() as u64 + 1;
                let Some(loc) = Loc::new(h, off) else { return };
                let parsed = serde_json::from_slice::<facts::ScannedLine<'_>>(line);
                match parsed.as_ref().ok().and_then(|l| facts::from_scanned(&hasher, &l.ev)) {
                    Some(f) => {
                        index.apply(&f, loc);
                        lines += 1;
                    }
                    None => skipped += 1,
                }
            });
            if let Err(e) = res {
                tracing::warn!(file = %dir.join(file_name(h)).display(), error = %e, "cannot read a trace file; its events are not indexed");
            }
        }
        if !files.is_empty() {
            tracing::info!(
                dir = %dir.display(),
                files = files.len(),
                messages = index.len(),
                events = lines,
                skipped,
                mb = bytes >> 20,
                ms = started.elapsed().as_millis() as u64,
                "trace index rebuilt"
            );
        }
        Ok(Arc::new(TraceStore {
            dir: dir.to_path_buf(),
            retention_ms,
            hasher,
            state: Mutex::new(State {
                index,
                out: Appender::new(dir.to_path_buf()),
                files,
                open_failing: false,
            }),
            _lock: lock,
        }))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether hour `h`'s file is past retention at `now`.
    fn expired(h: u32, retention_ms: u64, now: u64) -> bool {
        (u64::from(h) + 1).saturating_mul(HOUR_MS).saturating_add(retention_ms) <= now
    }

    /// Store one event (`line`: its JSON, no newline). Events without a
    /// message id are ignored. Cheap: an index update and a buffer copy.
    pub fn append(&self, ev: &Event, line: &[u8]) {
        self.append_at(ev, line, now_ms());
    }

    /// [`append`](Self::append) at a given time (ms since the epoch),
    /// which picks the file.
    pub fn append_at(&self, ev: &Event, line: &[u8], now_ms: u64) {
        if line.len() > MAX_LINE - 64 || memchr::memchr(b'\n', line).is_some() {
            return;
        }
        let Some(f) = facts::from_event(&self.hasher, ev) else {
            return;
        };
        let mut guard = self.lock();
        let st = &mut *guard;
        let latest = st.files.last().copied().unwrap_or(0).max(st.out.hour().unwrap_or(0));
        let hour = hour_of(now_ms).max(latest);
        if st.out.next_loc().is_none() || st.out.hour() != Some(hour) {
            match st.out.roll(hour) {
                Ok(()) => {
                    st.files.insert(hour);
                    st.open_failing = false;
                }
                Err(e) => {
                    if !st.open_failing {
                        st.open_failing = true;
                        tracing::error!(dir = %self.dir.display(), error = %e, "cannot open a trace file; events are not traced");
                    }
                    return;
                }
            }
        }
        let Some(loc) = st.out.next_loc() else { return };
        let prev = st.index.apply(&f, loc);
        st.out.push(prev, line);
        if st.out.pending() >= WRITE_AT {
            let _ = st.out.write_out();
        }
    }

    /// Write what was appended to the file (not fsynced).
    pub fn flush(&self) {
        let _ = self.lock().out.write_out();
    }

    /// Every stored event of the message, oldest first, with its summary
    /// and the traces of its DSNs; `None` if unknown.
    pub fn message(&self, id: &str) -> Option<MessageTrace> {
        self.trace(id, true)
    }

    fn trace(&self, id: &str, with_dsns: bool) -> Option<MessageTrace> {
        let last = self.lock().index.last(id)?;
        let events = self.chain(id, last);
        if events.is_empty() {
            return None;
        }
        let summary = summarize(id, &events);
        let dsns = if with_dsns {
            summary.dsn_ids.iter().filter_map(|d| self.trace(d, false)).collect()
        } else {
            Vec::new()
        };
        Some(MessageTrace {
            message_id: id.to_string(),
            summary,
            events,
            dsns,
        })
    }

    /// The events of `id` following the chain back from `last`, oldest
    /// first; stops at a missing file, a damaged line, a line of another
    /// message or a pointer that does not go back.
    fn chain(&self, id: &str, last: Loc) -> Vec<Value> {
        let mut files: HashMap<u32, Option<File>> = HashMap::new();
        let mut out = Vec::new();
        let mut next = Some(last);
        while let Some(loc) = next {
            if out.len() >= MAX_CHAIN {
                break;
            }
            let Some((prev, ev)) = self.read_line(loc, &mut files).and_then(|l| unframe(&l)) else {
                break;
            };
            if ev.get("message_id").and_then(Value::as_str) != Some(id) {
                break;
            }
            out.push(ev);
            next = prev.filter(|p| *p < loc);
        }
        out.reverse();
        out
    }

    fn read_line(&self, loc: Loc, files: &mut HashMap<u32, Option<File>>) -> Option<Vec<u8>> {
        if let Some(line) = self.lock().out.buffered_line(loc) {
            return Some(line);
        }
        let file = files
            .entry(loc.hour())
            .or_insert_with(|| File::open(self.dir.join(file_name(loc.hour()))).ok())
            .as_ref()?;
        read_line_at(file, loc.offset()).ok().flatten()
    }

    /// Messages matching every filter of `q`, newest first (by received
    /// time), at most `q.limit` (capped at [`MAX_LIMIT`]).
    pub fn search(&self, q: &Query) -> Vec<MessageSummary> {
        let limit = q.limit.min(MAX_LIMIT);
        if limit == 0 {
            return Vec::new();
        }
        let mut filter = Filter {
            tenant: None,
            sender: q.sender.as_deref().map(|s| facts::hash31(&self.hasher, &norm_addr(s))),
            rcpt: q.rcpt.as_deref().map(|s| facts::hash31(&self.hasher, &norm_addr(s))),
            hmid: q
                .header_message_id
                .as_deref()
                .map(|s| facts::hash31(&self.hasher, norm_msgid(s))),
            since: q.since_ms.unwrap_or(0),
            until: q.until_ms.unwrap_or(u64::MAX),
        };
        if let Some(t) = &q.tenant {
            match self.lock().index.tenant_number(t) {
                Some(n) => filter.tenant = Some(n),
                None => return Vec::new(),
            }
        }
        // A few spare candidates for those the exact check turns down.
        let mut top = TopK::new(limit + limit / 8 + 4);
        let mut cur = Cursor::default();
        while !cur.done {
            self.lock().index.search_step(&filter, &mut cur, &mut top, SEARCH_BLOCK);
        }
        let mut out = Vec::new();
        for c in top.into_sorted() {
            if out.len() >= limit {
                break;
            }
            let events = self.chain(&c.id, c.last);
            if events.is_empty() {
                continue;
            }
            let s = summarize(&c.id, &events);
            if confirm(q, &events, &s) {
                out.push(s);
            }
        }
        out
    }

    /// Delete the files past retention and forget the messages whose
    /// latest event was in them. Call it every minute or so.
    pub fn sweep(&self) {
        self.sweep_at(now_ms());
    }

    /// [`sweep`](Self::sweep) at a given time (ms since the epoch).
    pub fn sweep_at(&self, now_ms: u64) {
        let doomed: Vec<u32> = {
            let mut st = self.lock();
            let current = st.out.hour();
            let doomed: Vec<u32> = st
                .files
                .iter()
                .copied()
                .filter(|&h| Some(h) != current && Self::expired(h, self.retention_ms, now_ms))
                .collect();
            for h in &doomed {
                st.files.remove(h);
            }
            doomed
        };
        let Some(&max) = doomed.iter().max() else { return };
        // One chunk of the index per lock hold.
        let mut from = Some(0);
        while let Some(f) = from {
            from = self.lock().index.drop_step(max, f);
        }
        for h in doomed {
            remove(&self.dir, h);
        }
    }

    pub fn stats(&self) -> TraceStats {
        let st = self.lock();
        TraceStats {
            messages: st.index.len(),
            files: st.files.len(),
            index_bytes: st.index.heap_bytes(),
        }
    }
}

fn remove(dir: &Path, hour: u32) {
    let path = dir.join(file_name(hour));
    match fs::remove_file(&path) {
        Ok(()) => tracing::debug!(file = %path.display(), "trace file past retention deleted"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(file = %path.display(), error = %e, "cannot delete a trace file past retention"),
    }
}

impl Drop for TraceStore {
    fn drop(&mut self) {
        self.flush();
    }
}
