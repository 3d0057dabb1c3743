//! One endpoint's durable outbox: append-only segment files of JSON lines
//! (`<n>.jsonl`, one event per line, exactly the body that is POSTed) and a
//! `cursor` file (`{"segment":n,"offset":bytes}`) saying how far the
//! receiver has acknowledged. Everything before the cursor is done; a
//! segment wholly before it is deleted.
//!
//! - The events writer [`push`](Outbox::push)es lines into memory and
//!   [`write`](Outbox::write)s each batch with one `write(2)`; a segment
//!   past its size limit is sealed and the next one started. Only whole
//!   batches are published to the reader, so it never sees half a line.
//! - [`sync`](Outbox::sync) (about once a second, on a blocking thread)
//!   fdatasyncs what was written since, and the directory after a new
//!   segment: a power loss costs at most the last second of events.
//! - The [`Reader`] is the delivery task's view: lines in order, `ack` as
//!   the receiver confirms them, `save` the cursor (temp file + rename; not
//!   fsynced: a cursor that went back re-sends, never loses).
//! - [`Outbox::open`] resumes from the cursor. A torn last line (crash
//!   mid-write) is cut off; a cursor past the end of its segment (the data
//!   was not synced) is clamped; a missing or unreadable cursor means
//!   "send everything still here" (at least once, never lost).
//!
//! Trust boundary: the files are our own. A line that does not parse is
//! the caller's to skip; this module only frames bytes. A lock file keeps
//! a second process from sharing (and repairing) a live outbox.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

/// Segment size after which the next segment is started.
pub const SEGMENT_BYTES: u64 = 32 << 20;

/// Bytes read from a segment at a time.
const READ_CHUNK: usize = 64 * 1024;

/// A place in the outbox: everything before `offset` in `segment`, and in
/// every earlier segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Position {
    pub segment: u64,
    pub offset: u64,
}

/// The writing side, shared by the events writer, the syncer and readers.
pub struct Outbox {
    dir: PathBuf,
    segment_bytes: u64,
    state: Mutex<WriteState>,
    /// Most unacknowledged bytes kept ([`Outbox::set_max_bytes`]).
    max_bytes: std::sync::atomic::AtomicU64,
    /// What the reader acknowledged (kept here for the size cap).
    acked: Mutex<Position>,
    /// Held (flock) while the outbox is open.
    _lock: File,
}

struct WriteState {
    /// The segment being appended to.
    file: Arc<File>,
    segment: u64,
    /// Bytes written to it (always whole lines): what readers may read.
    len: u64,
    /// Lines pushed since the last write.
    buf: Vec<u8>,
    lines: u64,
    /// Written since the last sync.
    dirty: bool,
    /// Sealed segments not yet synced.
    sealed: Vec<Arc<File>>,
    /// A segment was created since the last directory sync.
    dir_dirty: bool,
}

/// What [`Outbox::open`] found.
pub struct Opened {
    pub outbox: Arc<Outbox>,
    pub reader: Reader,
    /// Lines not yet acknowledged.
    pub backlog: u64,
    /// Bytes cut off a torn last line.
    pub repaired: u64,
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:012}.jsonl"))
}

/// Segment numbers present in `dir`, ascending.
fn segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut v = Vec::new();
    for e in fs::read_dir(dir)? {
        let name = e?.file_name();
        let name = name.to_string_lossy();
        if let Some(n) = name.strip_suffix(".jsonl").and_then(|s| s.parse::<u64>().ok()) {
            v.push(n);
        }
    }
    v.sort_unstable();
    Ok(v)
}

fn read_cursor(dir: &Path) -> Option<Position> {
    let text = match fs::read(dir.join("cursor")) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot read the webhook cursor; sending the whole outbox again");
            return None;
        }
    };
    match serde_json::from_slice(&text) {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "unreadable webhook cursor; sending the whole outbox again");
            None
        }
    }
}

/// Cut `file` after its last newline; returns the bytes removed.
fn repair_tail(file: &File) -> io::Result<u64> {
    let len = file.metadata()?.len();
    let mut end = len;
    let mut chunk = vec![0u8; READ_CHUNK];
    while end > 0 {
        let start = end.saturating_sub(READ_CHUNK as u64);
        let n = (end - start) as usize;
        let mut f = file;
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(&mut chunk[..n])?;
        if let Some(i) = memchr::memrchr(b'\n', &chunk[..n]) {
            let keep = start + i as u64 + 1;
            if keep < len {
                file.set_len(keep)?;
            }
            return Ok(len - keep);
        }
        end = start;
    }
    if len > 0 {
        file.set_len(0)?;
    }
    Ok(len)
}

/// Newlines in `path` from `from` on.
fn count_lines(path: &Path, from: u64) -> io::Result<u64> {
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(from))?;
    let mut chunk = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let got = f.read(&mut chunk)?;
        if got == 0 {
            return Ok(n);
        }
        n += memchr::memchr_iter(b'\n', &chunk[..got]).count() as u64;
    }
}

/// Whether `offset` is a line start in `path` (0, or just after a newline).
fn at_line_start(path: &Path, offset: u64) -> io::Result<bool> {
    if offset == 0 {
        return Ok(true);
    }
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(offset - 1))?;
    let mut b = [0u8];
    f.read_exact(&mut b)?;
    Ok(b[0] == b'\n')
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).read(true).append(true).open(path)
}

impl Outbox {
    /// Open (creating) the outbox in `dir`, repair it and resume from its
    /// cursor.
    pub fn open(dir: &Path, segment_bytes: u64) -> io::Result<Opened> {
        fs::create_dir_all(dir)?;
        let lock = crate::spool::lock_dir(dir)?;
        let mut segs = segments(dir)?;
        let mut cursor = read_cursor(dir).unwrap_or(Position {
            segment: segs.first().copied().unwrap_or(1),
            offset: 0,
        });
        // Segments wholly acknowledged (a crash between saving the cursor
        // and deleting them) go now.
        for &n in segs.iter().filter(|&&n| n < cursor.segment) {
            fs::remove_file(segment_path(dir, n))?;
        }
        segs.retain(|&n| n >= cursor.segment);
        if segs.first() != Some(&cursor.segment) {
            // The cursor's segment is gone (deleted once fully acknowledged):
            // the next one starts from its beginning.
            cursor = Position {
                segment: segs.first().copied().unwrap_or(cursor.segment.max(1)),
                offset: 0,
            };
        }
        let last = segs.last().copied().unwrap_or(cursor.segment);
        let file = open_append(&segment_path(dir, last))?;
        let repaired = repair_tail(&file)?;
        let len = file.metadata()?.len();
        let first_path = segment_path(dir, cursor.segment);
        let first_len = fs::metadata(&first_path)?.len();
        if cursor.offset > first_len {
            // Acknowledged bytes that were never synced (power loss): the
            // rest of the segment is what is left to send.
            tracing::warn!(dir = %dir.display(), ?cursor, len = first_len, "webhook cursor past the end of its segment");
            cursor.offset = first_len;
        } else if !at_line_start(&first_path, cursor.offset)? {
            // Not a cursor we wrote: resend the segment rather than guess.
            tracing::warn!(dir = %dir.display(), ?cursor, "webhook cursor is not at a line start; resending its segment");
            cursor.offset = 0;
        }
        let mut backlog = 0;
        for &n in &segs {
            let from = if n == cursor.segment { cursor.offset } else { 0 };
            backlog += count_lines(&segment_path(dir, n), from)?;
        }
        let outbox = Arc::new(Outbox {
            dir: dir.to_path_buf(),
            segment_bytes,
            state: Mutex::new(WriteState {
                file: Arc::new(file),
                segment: last,
                len,
                buf: Vec::new(),
                lines: 0,
                dirty: repaired > 0,
                sealed: Vec::new(),
                dir_dirty: segs.is_empty(),
            }),
            max_bytes: std::sync::atomic::AtomicU64::new(u64::MAX),
            acked: Mutex::new(cursor),
            _lock: lock,
        });
        let reader = Reader {
            outbox: Arc::clone(&outbox),
            segment: cursor.segment,
            file: None,
            buf: Vec::new(),
            start: 0,
            buf_offset: cursor.offset,
            returned: cursor,
            acked: cursor,
            saved: cursor,
            first_segment: cursor.segment,
            torn: 0,
        };
        Ok(Opened {
            outbox,
            reader,
            backlog,
            repaired,
        })
    }

    fn state(&self) -> MutexGuard<'_, WriteState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Add one line (without its newline) to the next write.
    pub fn push(&self, line: &[u8]) {
        let mut st = self.state();
        st.buf.extend_from_slice(line);
        st.buf.push(b'\n');
        st.lines += 1;
    }

    /// Cap the unacknowledged bytes: a batch that would take the backlog
    /// past `n` is not written (see [`Outbox::write`]).
    pub fn set_max_bytes(&self, n: u64) {
        self.max_bytes.store(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Bytes written but not acknowledged (sealed segments count as full).
    fn backlog_bytes(&self, st: &WriteState) -> u64 {
        let acked = *self.acked.lock().unwrap_or_else(|p| p.into_inner());
        if acked.segment >= st.segment {
            return st.len.saturating_sub(acked.offset);
        }
        let between = (st.segment - acked.segment - 1).saturating_mul(self.segment_bytes);
        self.segment_bytes.saturating_sub(acked.offset) + between + st.len
    }

    /// Write what was pushed (one `write(2)`); returns the number of lines
    /// now readable. On an error nothing of the batch is kept (the segment
    /// is cut back to its last whole line) and the error says how many
    /// lines were lost; a batch that would take the backlog past the cap
    /// is dropped with an error of kind `StorageFull` (the disk is shared
    /// with the spool: a receiver down for long must not fill it).
    pub fn write(&self) -> Result<u64, (io::Error, u64)> {
        let mut st = self.state();
        if st.buf.is_empty() {
            return Ok(0);
        }
        let max = self.max_bytes.load(std::sync::atomic::Ordering::Relaxed);
        if self.backlog_bytes(&st).saturating_add(st.buf.len() as u64) > max {
            let lines = std::mem::take(&mut st.lines);
            st.buf.clear();
            return Err((
                io::Error::new(
                    io::ErrorKind::StorageFull,
                    format!("outbox holds max_backlog_bytes ({max}) not yet acknowledged"),
                ),
                lines,
            ));
        }
        if st.len >= self.segment_bytes {
            let next = st.segment + 1;
            match open_append(&segment_path(&self.dir, next)) {
                Ok(f) => {
                    let old = std::mem::replace(&mut st.file, Arc::new(f));
                    st.sealed.push(old);
                    st.segment = next;
                    st.len = 0;
                    st.dir_dirty = true;
                }
                Err(e) => {
                    // Keep appending to the full segment rather than lose events.
                    tracing::error!(dir = %self.dir.display(), error = %e, "cannot start a new webhook outbox segment");
                }
            }
        }
        let mut buf = std::mem::take(&mut st.buf);
        let lines = std::mem::take(&mut st.lines);
        let res = (&*st.file).write_all(&buf);
        let n = buf.len() as u64;
        buf.clear();
        st.buf = buf; // keeps its capacity for the next batch
        match res {
            Ok(()) => {
                st.len += n;
                st.dirty = true;
                Ok(lines)
            }
            Err(e) => {
                let _ = st.file.set_len(st.len);
                Err((e, lines))
            }
        }
    }

    /// The end of what was written: readers stop there.
    fn end(&self) -> Position {
        let st = self.state();
        Position {
            segment: st.segment,
            offset: st.len,
        }
    }

    /// fdatasync what was written since the last sync (blocking).
    pub fn sync(&self) -> io::Result<()> {
        let (files, dir) = {
            let mut st = self.state();
            let mut files = std::mem::take(&mut st.sealed);
            if std::mem::take(&mut st.dirty) {
                files.push(Arc::clone(&st.file));
            }
            (files, std::mem::take(&mut st.dir_dirty))
        };
        for f in files {
            f.sync_data()?;
        }
        if dir {
            File::open(&self.dir)?.sync_all()?;
        }
        Ok(())
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        if let Err((e, n)) = self.write() {
            tracing::error!(dir = %self.dir.display(), error = %e, lost = n, "cannot write the webhook outbox");
        }
        if let Err(e) = self.sync() {
            tracing::error!(dir = %self.dir.display(), error = %e, "cannot sync the webhook outbox");
        }
    }
}

/// One line read from the outbox.
#[derive(Debug)]
pub struct Entry {
    /// The line, without its newline.
    pub line: Vec<u8>,
    /// Where the next line starts: acknowledging this entry moves the
    /// cursor here.
    pub end: Position,
}

/// The delivery task's side: lines in order from the cursor on.
pub struct Reader {
    outbox: Arc<Outbox>,
    segment: u64,
    file: Option<File>,
    /// Bytes read from `segment`, from `buf_offset` on; `start` is the next
    /// unreturned byte in it.
    buf: Vec<u8>,
    start: usize,
    buf_offset: u64,
    /// End of the last returned entry.
    returned: Position,
    acked: Position,
    /// The cursor as last saved.
    saved: Position,
    /// Lowest segment that may still exist.
    first_segment: u64,
    /// Bytes of torn lines skipped at the end of sealed segments.
    torn: u64,
}

impl Reader {
    /// The next line, if one was written; `None` when the reader is at the
    /// end of what was written so far.
    pub fn next_entry(&mut self) -> io::Result<Option<Entry>> {
        loop {
            if let Some(i) = memchr::memchr(b'\n', &self.buf[self.start..]) {
                let line = self.buf[self.start..self.start + i].to_vec();
                self.start += i + 1;
                let end = Position {
                    segment: self.segment,
                    offset: self.buf_offset + self.start as u64,
                };
                self.returned = end;
                return Ok(Some(Entry { line, end }));
            }
            let end = self.outbox.end();
            if self.read_more(end)? > 0 {
                continue;
            }
            if self.segment >= end.segment {
                return Ok(None);
            }
            // End of a sealed segment: on to the next one.
            let rest = (self.buf.len() - self.start) as u64;
            if rest > 0 {
                self.torn += rest;
                tracing::warn!(
                    dir = %self.outbox.dir.display(),
                    segment = self.segment,
                    bytes = rest,
                    "skipping a torn line at the end of a webhook outbox segment"
                );
            }
            self.segment += 1;
            while self.segment < end.segment && !segment_path(&self.outbox.dir, self.segment).exists() {
                self.segment += 1;
            }
            self.file = None;
            self.buf.clear();
            self.start = 0;
            self.buf_offset = 0;
            let next = Position {
                segment: self.segment,
                offset: 0,
            };
            // Everything returned so far acknowledged: so is the sealed segment.
            if self.acked >= self.returned {
                self.acked = next;
            }
            self.returned = next;
        }
    }

    /// Read more of the current segment, up to what was written; returns
    /// the bytes read.
    fn read_more(&mut self, end: Position) -> io::Result<usize> {
        if self.start > 0 && self.start * 2 >= self.buf.len() {
            self.buf.drain(..self.start);
            self.buf_offset += self.start as u64;
            self.start = 0;
        }
        let pos = self.buf_offset + self.buf.len() as u64;
        let want = if self.segment == end.segment {
            end.offset.saturating_sub(pos).min(READ_CHUNK as u64) as usize
        } else {
            READ_CHUNK
        };
        if want == 0 {
            return Ok(0);
        }
        if self.file.is_none() {
            let mut f = File::open(segment_path(&self.outbox.dir, self.segment))?;
            f.seek(SeekFrom::Start(pos))?;
            self.file = Some(f);
        }
        let f = self.file.as_mut().expect("opened above");
        let old = self.buf.len();
        self.buf.resize(old + want, 0);
        let n = f.read(&mut self.buf[old..])?;
        self.buf.truncate(old + n);
        Ok(n)
    }

    /// The receiver has everything before `end` (an [`Entry::end`]).
    pub fn ack(&mut self, end: Position) {
        if end > self.acked {
            self.acked = end;
            *self.outbox.acked.lock().unwrap_or_else(|p| p.into_inner()) = end;
        }
    }

    pub fn acked(&self) -> Position {
        self.acked
    }

    /// Whether the cursor moved since it was last saved.
    pub fn unsaved(&self) -> bool {
        self.acked != self.saved
    }

    /// Bytes of torn lines skipped so far.
    pub fn torn_bytes(&self) -> u64 {
        self.torn
    }

    /// Save the cursor (temp file + rename) and delete the segments it has
    /// passed.
    pub fn save(&mut self) -> io::Result<()> {
        if self.acked == self.saved {
            return Ok(());
        }
        let dir = &self.outbox.dir;
        let tmp = dir.join("cursor.tmp");
        fs::write(&tmp, serde_json::to_vec(&self.acked).expect("serializable"))?;
        fs::rename(&tmp, dir.join("cursor"))?;
        self.saved = self.acked;
        while self.first_segment < self.acked.segment {
            match fs::remove_file(segment_path(dir, self.first_segment)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            self.first_segment += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path, seg: u64) -> Opened {
        Outbox::open(dir, seg).unwrap()
    }

    fn line(i: usize) -> Vec<u8> {
        format!(r#"{{"id":"{i:024}","event":"delivered"}}"#).into_bytes()
    }

    fn write(o: &Outbox, range: std::ops::Range<usize>) {
        for i in range.clone() {
            o.push(&line(i));
        }
        assert_eq!(o.write().unwrap(), range.len() as u64);
    }

    /// Read everything available, acknowledging each line.
    fn drain(r: &mut Reader) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(e) = r.next_entry().unwrap() {
            r.ack(e.end);
            out.push(e.line);
        }
        out
    }

    fn lines(range: std::ops::Range<usize>) -> Vec<Vec<u8>> {
        range.map(line).collect()
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut v: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn append_read_ack() {
        let d = tempfile::tempdir().unwrap();
        let Opened {
            outbox,
            mut reader,
            backlog,
            repaired,
        } = open(d.path(), SEGMENT_BYTES);
        assert_eq!((backlog, repaired), (0, 0));
        assert!(reader.next_entry().unwrap().is_none());
        outbox.push(&line(0));
        // pushed but not written: not readable yet
        assert!(reader.next_entry().unwrap().is_none());
        assert_eq!(outbox.write().unwrap(), 1);
        assert_eq!(outbox.write().unwrap(), 0);
        write(&outbox, 1..3);
        let e = reader.next_entry().unwrap().unwrap();
        assert_eq!(e.line, line(0));
        assert_eq!(
            e.end,
            Position {
                segment: 1,
                offset: line(0).len() as u64 + 1
            }
        );
        assert!(!reader.unsaved());
        reader.ack(e.end);
        assert!(reader.unsaved());
        assert_eq!(drain(&mut reader), lines(1..3));
        reader.save().unwrap();
        assert!(!reader.unsaved());
        let cursor: Position = serde_json::from_slice(&fs::read(d.path().join("cursor")).unwrap()).unwrap();
        assert_eq!(cursor, reader.acked());
        assert_eq!(cursor.offset, fs::metadata(segment_path(d.path(), 1)).unwrap().len());
        outbox.sync().unwrap();
        assert_eq!(files(d.path()), ["000000000001.jsonl", "cursor", "lock"]);
    }

    #[test]
    fn rotation_deletes_acknowledged_segments() {
        let d = tempfile::tempdir().unwrap();
        let Opened { outbox, mut reader, .. } = open(d.path(), 100);
        // each line is 54 bytes and a batch goes whole into one segment: a
        // segment past 100 bytes is sealed before the next batch.
        for b in 0..5 {
            write(&outbox, b * 3..b * 3 + 3);
        }
        assert_eq!(
            files(d.path()),
            [
                "000000000001.jsonl",
                "000000000002.jsonl",
                "000000000003.jsonl",
                "000000000004.jsonl",
                "000000000005.jsonl",
                "lock"
            ]
        );
        // read the first segment and a half, acknowledge, save
        for want in lines(0..4) {
            let e = reader.next_entry().unwrap().unwrap();
            assert_eq!(e.line, want);
            reader.ack(e.end);
        }
        reader.save().unwrap();
        assert_eq!(reader.acked().segment, 2);
        assert!(!files(d.path()).contains(&"000000000001.jsonl".to_string()));
        assert_eq!(drain(&mut reader), lines(4..15));
        reader.save().unwrap();
        assert_eq!(files(d.path()), ["000000000005.jsonl", "cursor", "lock"]);
        // more after the reader caught up
        write(&outbox, 15..17);
        assert_eq!(drain(&mut reader), lines(15..17));
        reader.save().unwrap();
        assert_eq!(files(d.path()), ["000000000006.jsonl", "cursor", "lock"]);
    }

    #[test]
    fn restart_resumes_from_the_saved_cursor() {
        let d = tempfile::tempdir().unwrap();
        {
            let Opened { outbox, mut reader, .. } = open(d.path(), 100);
            write(&outbox, 0..3);
            write(&outbox, 3..6);
            for _ in 0..2 {
                let e = reader.next_entry().unwrap().unwrap();
                reader.ack(e.end);
            }
            reader.save().unwrap();
            // acknowledged but not saved: sent again after the restart
            let e = reader.next_entry().unwrap().unwrap();
            reader.ack(e.end);
            // a second process is kept out while this one runs
            let second = Outbox::open(d.path(), 100).err().expect("locked");
            assert!(second.to_string().contains("in use"), "{second}");
        }
        let Opened {
            outbox,
            mut reader,
            backlog,
            ..
        } = open(d.path(), 100);
        assert_eq!(backlog, 4);
        write(&outbox, 6..7);
        assert_eq!(drain(&mut reader), lines(2..7));
    }

    #[test]
    fn the_backlog_cap_drops_new_batches_until_the_reader_catches_up() {
        let d = tempfile::tempdir().unwrap();
        let Opened { outbox, mut reader, .. } = open(d.path(), 64);
        let line = vec![b'x'; 39]; // 40 bytes with its newline
        outbox.set_max_bytes(100);
        outbox.push(&line);
        outbox.push(&line);
        assert_eq!(outbox.write().unwrap(), 2);
        // 80 written and unread: one more line would make 120.
        outbox.push(&line);
        let (e, lost) = outbox.write().unwrap_err();
        assert_eq!((e.kind(), lost), (io::ErrorKind::StorageFull, 1));
        // The reader acknowledges one: room again (the dropped line is gone).
        let first = reader.next_entry().unwrap().unwrap();
        reader.ack(first.end);
        outbox.push(&line);
        assert_eq!(outbox.write().unwrap(), 1);
        // Across a segment boundary (64 bytes): the second segment starts.
        let second = reader.next_entry().unwrap().unwrap();
        reader.ack(second.end);
        let third = reader.next_entry().unwrap().unwrap();
        reader.ack(third.end);
        assert!(reader.next_entry().unwrap().is_none());
        for _ in 0..2 {
            outbox.push(&line);
        }
        assert_eq!(outbox.write().unwrap(), 2);
        outbox.push(&line);
        assert_eq!(outbox.write().unwrap_err().0.kind(), io::ErrorKind::StorageFull);
    }

    #[test]
    fn torn_last_line_is_cut_off() {
        let d = tempfile::tempdir().unwrap();
        {
            let Opened { outbox, .. } = open(d.path(), SEGMENT_BYTES);
            write(&outbox, 0..2);
        }
        // a crash in the middle of a write
        let seg = segment_path(d.path(), 1);
        let whole = fs::metadata(&seg).unwrap().len();
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(br#"{"id":"0000000000000000000002","ev"#).unwrap();
        drop(f);
        let Opened {
            outbox,
            mut reader,
            backlog,
            repaired,
        } = open(d.path(), SEGMENT_BYTES);
        assert_eq!((backlog, repaired), (2, 34));
        assert_eq!(fs::metadata(&seg).unwrap().len(), whole);
        write(&outbox, 2..3);
        assert_eq!(drain(&mut reader), lines(0..3));
        drop((outbox, reader));
        // nothing but garbage (zeros after a power loss): emptied
        fs::write(&seg, [0u8; 300]).unwrap();
        fs::remove_file(d.path().join("cursor")).ok();
        let Opened {
            mut reader,
            backlog,
            repaired,
            ..
        } = open(d.path(), SEGMENT_BYTES);
        assert_eq!((backlog, repaired), (0, 300));
        assert!(reader.next_entry().unwrap().is_none());
    }

    #[test]
    fn torn_line_in_a_sealed_segment_is_skipped() {
        let d = tempfile::tempdir().unwrap();
        {
            let Opened { outbox, .. } = open(d.path(), 100);
            write(&outbox, 0..3);
            write(&outbox, 3..4);
        }
        let mut f = OpenOptions::new().append(true).open(segment_path(d.path(), 1)).unwrap();
        f.write_all(b"{\"torn").unwrap();
        drop(f);
        let Opened {
            mut reader, backlog, ..
        } = open(d.path(), 100);
        assert_eq!(backlog, 4);
        assert_eq!(drain(&mut reader), lines(0..4));
        assert_eq!(reader.torn_bytes(), 6);
    }

    #[test]
    fn bad_cursors_resend_rather_than_lose() {
        let d = tempfile::tempdir().unwrap();
        {
            let Opened { outbox, .. } = open(d.path(), 100);
            write(&outbox, 0..3);
            write(&outbox, 3..5);
        }
        let set = |c: &str| fs::write(d.path().join("cursor"), c).unwrap();
        let len1 = fs::metadata(segment_path(d.path(), 1)).unwrap().len();
        let table: &[(String, std::ops::Range<usize>)] = &[
            // past the end of its segment (the data was never synced)
            (format!(r#"{{"segment":1,"offset":{}}}"#, len1 + 10), 3..5),
            // not at a line start
            (r#"{"segment":1,"offset":7}"#.to_string(), 0..5),
            // unreadable
            ("garbage".to_string(), 0..5),
            // a valid one
            (format!(r#"{{"segment":1,"offset":{}}}"#, line(0).len() + 1), 1..5),
            // at the end of segment 1
            (format!(r#"{{"segment":1,"offset":{len1}}}"#), 3..5),
        ];
        for (cursor, want) in table {
            set(cursor);
            let Opened {
                mut reader, backlog, ..
            } = open(d.path(), 100);
            assert_eq!(backlog, want.len() as u64, "{cursor}");
            assert_eq!(drain(&mut reader), lines(want.clone()), "{cursor}");
        }
        // the cursor's segment was deleted (acknowledged) but the cursor not
        // saved: the next segment from its start
        fs::remove_file(segment_path(d.path(), 1)).unwrap();
        set(r#"{"segment":1,"offset":50}"#);
        let Opened { mut reader, .. } = open(d.path(), 100);
        assert_eq!(drain(&mut reader), lines(3..5));
        reader.save().unwrap();
        drop(reader);
        // a segment older than the cursor (deleted after the crash) goes
        fs::write(segment_path(d.path(), 1), line(99)).unwrap();
        let Opened {
            mut reader, backlog, ..
        } = open(d.path(), 100);
        assert_eq!(backlog, 0);
        assert!(reader.next_entry().unwrap().is_none());
        assert!(!segment_path(d.path(), 1).exists());
    }
}
