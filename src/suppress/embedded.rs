//! The embedded suppression store: every entry in memory (a hash map by
//! address, so a lookup is one hash probe), made durable by an append-only
//! log of JSON lines that is fsynced before a change is acknowledged.
//!
//! Log lines: `{"op":"a",...entry}` adds or replaces, `{"op":"d","a":..,"t":..}`
//! removes, `{"op":"b","n":N}` announces that the next N lines are one
//! batch (a bulk import): a batch cut short by a crash is dropped whole at
//! load, so an import is never half-applied. A torn last line (crash in the
//! middle of a write) is cut off; a damaged line anywhere else stops the
//! start with its line number, because skipping it could un-suppress an
//! address. When the log holds many more lines than live entries it is
//! compacted: snapshot to a temp file, fsync, rename, directory fsync.
//!
//! Trust boundary: trusts only its own file, and checks even that.

use std::collections::{BinaryHeap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{Entry, Query, Reason, StoreFuture, SuppressionStore, now_ms};

/// One stored suppression of an address (the address is the map key).
#[derive(Debug, Clone)]
struct Slot {
    tenant: Option<Box<str>>,
    reason: Reason,
    source: Box<str>,
    created_ms: u64,
    expires_ms: Option<u64>,
}

/// A listing's order, borrowed from the index: address, then scope
/// (global first).
struct Key<'a> {
    addr: &'a str,
    slot: &'a Slot,
}

impl Key<'_> {
    fn parts(&self) -> (&str, Option<&str>) {
        (self.addr, self.slot.tenant.as_deref())
    }
}

impl PartialEq for Key<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for Key<'_> {}

impl PartialOrd for Key<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Key<'_> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.parts().cmp(&other.parts())
    }
}

impl Slot {
    fn from_entry(e: Entry) -> (String, Slot) {
        (
            e.address,
            Slot {
                tenant: e.tenant.map(String::into_boxed_str),
                reason: e.reason,
                source: e.source.into_boxed_str(),
                created_ms: e.created_ms,
                expires_ms: e.expires_ms,
            },
        )
    }

    fn entry(&self, address: &str) -> Entry {
        Entry {
            address: address.to_string(),
            tenant: self.tenant.as_deref().map(str::to_string),
            reason: self.reason,
            source: self.source.to_string(),
            created_ms: self.created_ms,
            expires_ms: self.expires_ms,
        }
    }

    fn live(&self, now: u64) -> bool {
        self.expires_ms.is_none_or(|e| e > now)
    }
}

/// One log line; short field names keep a million-entry log small and
/// quick to load.
#[derive(Debug, Serialize, Deserialize)]
struct Line<'a> {
    op: char,
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    a: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    t: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    r: Option<Reason>,
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    s: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    c: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    x: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    n: Option<usize>,
}

impl<'a> Line<'a> {
    fn add(address: &'a str, s: &'a Slot) -> Line<'a> {
        Line {
            op: 'a',
            a: Some(address.into()),
            t: s.tenant.as_deref().map(Into::into),
            r: Some(s.reason),
            s: (!s.source.is_empty()).then(|| (&*s.source).into()),
            c: Some(s.created_ms),
            x: s.expires_ms,
            n: None,
        }
    }

    fn del(address: &'a str, tenant: Option<&'a str>) -> Line<'a> {
        Line {
            op: 'd',
            a: Some(address.into()),
            t: tenant.map(Into::into),
            r: None,
            s: None,
            c: None,
            x: None,
            n: None,
        }
    }

    fn batch(n: usize) -> Line<'static> {
        Line {
            op: 'b',
            a: None,
            t: None,
            r: None,
            s: None,
            c: None,
            x: None,
            n: Some(n),
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        serde_json::to_writer(&mut *out, self).expect("log line serializes");
        out.push(b'\n');
    }
}

type Index = HashMap<Box<str>, Vec<Slot>>;

fn apply_add(index: &mut Index, address: &str, slot: Slot) -> bool {
    // Nearly every address has one entry: room for exactly one (a default
    // Vec would grow to 4 on the first push, 4x the memory).
    let slots = index.entry(address.into()).or_insert_with(|| Vec::with_capacity(1));
    match slots.iter_mut().find(|s| s.tenant == slot.tenant) {
        Some(s) => {
            *s = slot;
            false
        }
        None => {
            slots.push(slot);
            true
        }
    }
}

fn apply_del(index: &mut Index, address: &str, tenant: Option<&str>) -> bool {
    let Some(slots) = index.get_mut(address) else {
        return false;
    };
    let before = slots.len();
    slots.retain(|s| s.tenant.as_deref() != tenant);
    let removed = slots.len() != before;
    if slots.is_empty() {
        index.remove(address);
    }
    removed
}

struct Writer {
    file: File,
    /// Lines in the log (for the compaction decision).
    lines: usize,
}

struct Inner {
    path: PathBuf,
    index: RwLock<Index>,
    /// Stored entries (expired ones included until compaction).
    count: std::sync::atomic::AtomicUsize,
    writer: Mutex<Writer>,
    /// Held (flock) for the store's lifetime.
    _lock: File,
}

/// The embedded store. Cheap to clone.
#[derive(Clone)]
pub struct Embedded {
    inner: Arc<Inner>,
}

/// Compact when the log has more than this many lines beyond twice the
/// live entries.
const COMPACT_SLACK: usize = 10_000;

impl Embedded {
    /// Open (or create) the store at `path`, replaying its log.
    pub fn open(path: &Path) -> io::Result<Embedded> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        // One process per store: a second writer would interleave the log.
        let lock_path = path.with_extension("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)?;
        lock.try_lock().map_err(|_| {
            io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("{} is in use by another sendguard process", path.display()),
            )
        })?;
        let mut file = OpenOptions::new().create(true).read(true).append(true).open(path)?;
        let started = std::time::Instant::now();
        let (index, lines, good_len) = load(&mut file, path)?;
        let file_len = file.metadata()?.len();
        if good_len < file_len {
            warn!(
                path = %path.display(),
                dropped_bytes = file_len - good_len,
                "suppression log ends in an incomplete write (crash); cutting it off"
            );
            file.set_len(good_len)?;
            file.sync_data()?;
        }
        let count = index.values().map(Vec::len).sum();
        info!(path = %path.display(), entries = count, ms = started.elapsed().as_millis() as u64, "suppression list loaded");
        let store = Embedded {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                index: RwLock::new(index),
                count: std::sync::atomic::AtomicUsize::new(count),
                writer: Mutex::new(Writer { file, lines }),
                _lock: lock,
            }),
        };
        store.maybe_compact(&mut store.inner.writer.lock().unwrap())?;
        Ok(store)
    }

    fn maybe_compact(&self, w: &mut Writer) -> io::Result<()> {
        let live = self.inner.count.load(std::sync::atomic::Ordering::Relaxed);
        if w.lines <= 2 * live + COMPACT_SLACK {
            return Ok(());
        }
        let now = now_ms();
        let tmp = self.inner.path.with_extension("compact.tmp");
        let mut kept = 0usize;
        {
            let index = self.inner.index.read().unwrap();
            let mut out = io::BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
            let mut buf = Vec::with_capacity(256);
            for (addr, slots) in index.iter() {
                for s in slots.iter().filter(|s| s.live(now)) {
                    buf.clear();
                    Line::add(addr, s).write(&mut buf);
                    out.write_all(&buf)?;
                    kept += 1;
                }
            }
            out.flush()?;
            out.get_ref().sync_all()?;
        }
        std::fs::rename(&tmp, &self.inner.path)?;
        if let Some(dir) = self.inner.path.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            File::open(dir)?.sync_all()?;
        }
        info!(path = %self.inner.path.display(), before = w.lines, after = kept, "suppression log compacted");
        w.file = OpenOptions::new().read(true).append(true).open(&self.inner.path)?;
        w.lines = kept;
        Ok(())
    }

    /// Append `buf` (holding `n` lines) durably; on failure the log is cut
    /// back to where it was, so nothing of a failed write is ever loaded.
    fn append(w: &mut Writer, buf: &[u8], n: usize) -> io::Result<()> {
        let before = w.file.seek(SeekFrom::End(0))?;
        let r = w.file.write_all(buf).and_then(|()| w.file.sync_data());
        if let Err(e) = r {
            let _ = w.file.set_len(before);
            return Err(e);
        }
        w.lines += n;
        Ok(())
    }

    fn add_blocking(&self, entries: Vec<Entry>) -> io::Result<usize> {
        if entries.is_empty() {
            return Ok(0);
        }
        let slots: Vec<(String, Slot)> = entries.into_iter().map(Slot::from_entry).collect();
        let mut buf = Vec::with_capacity(slots.len() * 128 + 32);
        let mut n = slots.len();
        if slots.len() > 1 {
            Line::batch(slots.len()).write(&mut buf);
            n += 1;
        }
        for (a, s) in &slots {
            Line::add(a, s).write(&mut buf);
        }
        let mut w = self.inner.writer.lock().unwrap();
        Self::append(&mut w, &buf, n)?;
        let mut new = 0;
        {
            let mut index = self.inner.index.write().unwrap();
            for (a, s) in slots {
                new += usize::from(apply_add(&mut index, &a, s));
            }
        }
        self.inner.count.fetch_add(new, std::sync::atomic::Ordering::Relaxed);
        if let Err(e) = self.maybe_compact(&mut w) {
            warn!(error = %e, "suppression log compaction failed; the log stays as it is");
        }
        Ok(new)
    }

    fn remove_blocking(&self, address: &str, tenant: Option<&str>) -> io::Result<bool> {
        let mut w = self.inner.writer.lock().unwrap();
        let present = self
            .inner
            .index
            .read()
            .unwrap()
            .get(address)
            .is_some_and(|v| v.iter().any(|s| s.tenant.as_deref() == tenant));
        if !present {
            return Ok(false);
        }
        let mut buf = Vec::with_capacity(128);
        Line::del(address, tenant).write(&mut buf);
        Self::append(&mut w, &buf, 1)?;
        let removed = apply_del(&mut self.inner.index.write().unwrap(), address, tenant);
        if removed {
            self.inner.count.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(removed)
    }
}

/// Replay the log. Returns the index, the number of lines, and the length
/// of the part that holds whole lines and whole batches.
fn load(file: &mut File, path: &Path) -> io::Result<(Index, usize, u64)> {
    file.seek(SeekFrom::Start(0))?;
    let mut rd = BufReader::with_capacity(1 << 20, &*file);
    let mut index = Index::new();
    let mut buf = Vec::with_capacity(256);
    let (mut pos, mut good, mut lines, mut lineno) = (0u64, 0u64, 0usize, 0usize);
    // An open batch: lines expected, and the lines held back (raw; they
    // parsed once already) until the batch is whole.
    let mut batch: Option<(usize, Vec<Vec<u8>>)> = None;
    loop {
        buf.clear();
        let n = rd.read_until(b'\n', &mut buf)?;
        if n == 0 {
            break;
        }
        lineno += 1;
        pos += n as u64;
        if buf.last() != Some(&b'\n') {
            // torn last write
            break;
        }
        let bad = |why: String| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: line {lineno}: {why}", path.display()),
            )
        };
        let line: Line = serde_json::from_slice(&buf[..n - 1]).map_err(|e| bad(e.to_string()))?;
        lines += 1;
        if line.op == 'b' {
            if batch.is_some() {
                return Err(bad("batch inside a batch".into()));
            }
            batch = Some((line.n.unwrap_or(0), Vec::new()));
        } else {
            match &mut batch {
                Some((_, held)) => held.push(buf[..n - 1].to_vec()),
                None => replay(&mut index, line).map_err(|w| bad(w.into()))?,
            }
        }
        if let Some((want, held)) = &mut batch
            && held.len() >= *want
        {
            for raw in std::mem::take(held) {
                let l: Line = serde_json::from_slice(&raw).map_err(|e| bad(e.to_string()))?;
                replay(&mut index, l).map_err(|w| bad(w.into()))?;
            }
            batch = None;
        }
        if batch.is_none() {
            good = pos;
        }
    }
    Ok((index, lines, good))
}

fn replay(index: &mut Index, l: Line<'_>) -> Result<(), &'static str> {
    let address = l.a.ok_or("line without an address")?;
    match l.op {
        'a' => {
            let slot = Slot {
                tenant: l.t.map(|t| t.into_owned().into_boxed_str()),
                reason: l.r.ok_or("add without a reason")?,
                source: l.s.map(|s| s.into_owned().into_boxed_str()).unwrap_or_default(),
                created_ms: l.c.unwrap_or(0),
                expires_ms: l.x,
            };
            apply_add(index, &address, slot);
        }
        'd' => {
            apply_del(index, &address, l.t.as_deref());
        }
        _ => return Err("unknown op"),
    }
    Ok(())
}

impl SuppressionStore for Embedded {
    fn lookup(&self, tenant: &str, address: &str) -> Option<Entry> {
        let index = self.inner.index.read().unwrap();
        let slots = index.get(address)?;
        let now = now_ms();
        slots
            .iter()
            .filter(|s| s.live(now))
            .find(|s| s.tenant.as_deref() == Some(tenant))
            .or_else(|| slots.iter().filter(|s| s.live(now)).find(|s| s.tenant.is_none()))
            .map(|s| s.entry(address))
    }

    fn add(&self, entries: Vec<Entry>) -> StoreFuture<'_, usize> {
        let me = self.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || me.add_blocking(entries))
                .await
                .map_err(io::Error::other)?
        })
    }

    fn remove(&self, address: String, tenant: Option<String>) -> StoreFuture<'_, bool> {
        let me = self.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || me.remove_blocking(&address, tenant.as_deref()))
                .await
                .map_err(io::Error::other)?
        })
    }

    fn list(&self, q: &Query) -> Vec<Entry> {
        let now = now_ms();
        // A page needs only the first offset + limit in order, not all.
        let end = q.offset.saturating_add(q.limit.max(1));
        let mut out: Vec<Entry> = Vec::new();
        {
            // A writer waiting for this read lock (a bounce's suppression)
            // holds up the RCPT lookups queued behind it, so little happens
            // under it: a page keeps the `end` smallest keys in a bounded
            // heap and copies only those; a listing as large as the store
            // (an export) copies every match and is ordered after.
            let index = self.inner.index.read().unwrap();
            let matches = |addr: &str, s: &Slot| s.live(now) && q.matches_parts(addr, s.tenant.as_deref(), s.reason);
            let all = index.iter().flat_map(|(a, slots)| slots.iter().map(move |s| (&**a, s)));
            if end >= self.len() {
                out.extend(all.filter(|(a, s)| matches(a, s)).map(|(a, s)| s.entry(a)));
            } else {
                let mut top: BinaryHeap<Key<'_>> = BinaryHeap::with_capacity(end + 1);
                for (addr, slot) in all.filter(|(a, s)| matches(a, s)) {
                    let key = Key { addr, slot };
                    if top.len() < end {
                        top.push(key);
                    } else if top.peek().is_some_and(|max| key < *max) {
                        top.pop();
                        top.push(key);
                    }
                }
                out.extend(top.into_iter().map(|k| k.slot.entry(k.addr)));
            }
        }
        out.sort_unstable_by(|a, b| (&a.address, &a.tenant).cmp(&(&b.address, &b.tenant)));
        out.truncate(end);
        out.into_iter().skip(q.offset).collect()
    }

    fn len(&self) -> usize {
        self.inner.count.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(addr: &str, tenant: Option<&str>, reason: Reason) -> Entry {
        Entry {
            address: addr.into(),
            tenant: tenant.map(Into::into),
            reason,
            source: format!("test {addr}"),
            created_ms: 1000,
            expires_ms: None,
        }
    }

    fn all(s: &Embedded) -> Vec<Entry> {
        s.list(&Query {
            limit: usize::MAX,
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn pages_follow_the_address_then_tenant_order() {
        let dir = tempfile::tempdir().unwrap();
        let s = Embedded::open(&dir.path().join("s.jsonl")).unwrap();
        let mut entries = Vec::new();
        for i in 0..40u32 {
            // Inserted out of order; every third address also per tenant.
            let addr = format!("u{:02}@x.example", (i * 17) % 40);
            entries.push(entry(&addr, None, Reason::HardBounce));
            if i % 3 == 0 {
                entries.push(entry(&addr, Some("acme"), Reason::Complaint));
            }
        }
        s.add(entries).await.unwrap();
        let whole = all(&s);
        assert_eq!(whole.len(), 54);
        let keys: Vec<_> = whole.iter().map(|e| (e.address.clone(), e.tenant.clone())).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        for limit in [1, 7, 54, 100] {
            let mut paged = Vec::new();
            let mut offset = 0;
            loop {
                let page = s.list(&Query {
                    offset,
                    limit,
                    ..Default::default()
                });
                assert!(page.len() <= limit);
                if page.is_empty() {
                    break;
                }
                offset += page.len();
                paged.extend(page);
            }
            assert_eq!(paged, whole, "limit {limit}");
        }
        let page = s.list(&Query {
            offset: 5,
            limit: 3,
            contains: Some("u1".into()),
            ..Default::default()
        });
        let want: Vec<_> = whole
            .iter()
            .filter(|e| e.address.contains("u1"))
            .skip(5)
            .take(3)
            .cloned()
            .collect();
        assert_eq!(page, want);
        // Filters on scope and reason, through the bounded page and the
        // whole listing alike.
        for (q, keep) in [
            (
                Query {
                    tenant: Some("acme".into()),
                    ..Default::default()
                },
                (|e: &Entry| e.tenant.as_deref() == Some("acme")) as fn(&Entry) -> bool,
            ),
            (
                Query {
                    global_only: true,
                    ..Default::default()
                },
                |e: &Entry| e.tenant.is_none(),
            ),
            (
                Query {
                    reason: Some(Reason::Complaint),
                    ..Default::default()
                },
                |e: &Entry| e.reason == Reason::Complaint,
            ),
        ] {
            let want: Vec<_> = whole.iter().filter(|e| keep(e)).cloned().collect();
            for (offset, limit) in [(0, 2), (3, 4), (0, 100)] {
                let page = s.list(&Query {
                    offset,
                    limit,
                    ..q.clone()
                });
                let expect: Vec<_> = want.iter().skip(offset).take(limit).cloned().collect();
                assert_eq!(page, expect, "{q:?} offset {offset} limit {limit}");
            }
        }
    }

    #[tokio::test]
    async fn add_lookup_remove_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.jsonl");
        let s = Embedded::open(&path).unwrap();
        assert_eq!(
            s.add(vec![entry("a@x.example", None, Reason::HardBounce)])
                .await
                .unwrap(),
            1
        );
        assert_eq!(
            s.add(vec![
                entry("b@x.example", Some("acme"), Reason::Unsubscribe),
                entry("a@x.example", Some("acme"), Reason::Complaint),
            ])
            .await
            .unwrap(),
            2
        );
        // replacing is not new
        assert_eq!(
            s.add(vec![entry("a@x.example", None, Reason::Manual)]).await.unwrap(),
            0
        );
        // tenant entry wins over the global one for that tenant
        assert_eq!(s.lookup("acme", "a@x.example").unwrap().reason, Reason::Complaint);
        assert_eq!(s.lookup("other", "a@x.example").unwrap().reason, Reason::Manual);
        assert!(s.lookup("other", "b@x.example").is_none());
        assert_eq!(s.len(), 3);
        assert!(s.remove("a@x.example".into(), None).await.unwrap());
        assert!(!s.remove("a@x.example".into(), None).await.unwrap());
        assert!(s.lookup("other", "a@x.example").is_none());
        let before = all(&s);
        drop(s);
        let s = Embedded::open(&path).unwrap();
        assert_eq!(all(&s), before);
        assert_eq!(s.len(), 2);
    }

    #[tokio::test]
    async fn expired_entries_do_not_apply() {
        let dir = tempfile::tempdir().unwrap();
        let s = Embedded::open(&dir.path().join("s.jsonl")).unwrap();
        let mut e = entry("a@x.example", None, Reason::Manual);
        e.expires_ms = Some(now_ms() - 1);
        let mut f = entry("b@x.example", None, Reason::Manual);
        f.expires_ms = Some(now_ms() + 60_000);
        s.add(vec![e, f]).await.unwrap();
        assert!(s.lookup("t", "a@x.example").is_none());
        assert!(s.lookup("t", "b@x.example").is_some());
        assert_eq!(all(&s).len(), 1);
    }

    #[tokio::test]
    async fn torn_tail_and_cut_batches_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.jsonl");
        let s = Embedded::open(&path).unwrap();
        s.add(vec![entry("a@x.example", None, Reason::HardBounce)])
            .await
            .unwrap();
        drop(s);
        let good = std::fs::read(&path).unwrap();
        // a batch of 3 of which 2 lines were written, the second torn
        let mut text = good.clone();
        text.extend_from_slice(b"{\"op\":\"b\",\"n\":3}\n");
        text.extend_from_slice(b"{\"op\":\"a\",\"a\":\"b@x.example\",\"r\":\"manual\",\"c\":1}\n");
        text.extend_from_slice(b"{\"op\":\"a\",\"a\":\"c@x.exa");
        std::fs::write(&path, &text).unwrap();
        let s = Embedded::open(&path).unwrap();
        assert!(s.lookup("t", "a@x.example").is_some());
        assert!(s.lookup("t", "b@x.example").is_none(), "half a batch must not apply");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            good,
            "the log is cut back to its last whole batch"
        );
        // and writing goes on from there
        s.add(vec![entry("d@x.example", None, Reason::Manual)]).await.unwrap();
        drop(s);
        let s = Embedded::open(&path).unwrap();
        assert_eq!(all(&s).len(), 2);
    }

    #[test]
    fn one_process_per_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.jsonl");
        let first = Embedded::open(&path).unwrap();
        let e = Embedded::open(&path).err().expect("second open refused");
        assert!(e.to_string().contains("in use"), "{e}");
        drop(first);
        Embedded::open(&path).unwrap();
    }

    #[test]
    fn damaged_middle_line_stops_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.jsonl");
        std::fs::write(
            &path,
            "{\"op\":\"a\",\"a\":\"a@x.example\",\"r\":\"manual\",\"c\":1}\nnot json\n{\"op\":\"a\",\"a\":\"b@x.example\",\"r\":\"manual\",\"c\":1}\n",
        )
        .unwrap();
        let e = Embedded::open(&path).err().expect("refuses to start");
        assert!(e.to_string().contains("line 2"), "{e}");
    }

    #[tokio::test]
    async fn compaction_keeps_the_live_set() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.jsonl");
        let s = Embedded::open(&path).unwrap();
        // churn: add and remove many times so the log outgrows the live set
        for round in 0..3 {
            let batch: Vec<Entry> = (0..5000)
                .map(|i| entry(&format!("u{i}@x.example"), None, Reason::Manual))
                .collect();
            s.add(batch).await.unwrap();
            if round < 2 {
                for i in 0..5000 {
                    if i % 2 == 0 {
                        s.remove_blocking(&format!("u{i}@x.example"), None).unwrap();
                    }
                }
            }
        }
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert!(lines < 25_000, "compacted: {lines} lines");
        let want = all(&s);
        assert_eq!(want.len(), 5000);
        drop(s);
        let s = Embedded::open(&path).unwrap();
        assert_eq!(all(&s), want);
    }
}
