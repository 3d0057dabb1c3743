//! The durable message store. A message is on disk, fsynced, before the
//! client gets 250; nothing is acknowledged that a crash could lose.
//!
//! Layout under `spool.dir`:
//! - `seg/<n>.seg`: segments. New messages are group-committed here by one
//!   writer thread: every record waiting is written, then one `fdatasync`
//!   covers the whole batch (one fsync for many sessions). A segment file
//!   has its full size on disk before it is renamed into place (zero-filled
//!   by a helper thread, or a finished segment recycled), so records
//!   overwrite blocks that are already allocated and the group commit's
//!   `fdatasync` flushes data only, with no journal commit for a grown file
//!   (see [`zero_filled`]). Its header carries a random tag that every
//!   record of the segment carries too; recovery reads records while they
//!   do (see `record`).
//! - `seg/<n>.done`: ids of messages of segment n that are final or moved
//!   out; a segment is deleted once every message in it is.
//! - `msg/<id>.msg`: a message that was deferred moves out of its segment
//!   into a file of its own (temp file → fsync → rename → directory fsync),
//!   so segments free quickly; `msg/<id>.state` holds its latest
//!   per-recipient state (rewritten by rename).
//! - `tmp/`: temp files; emptied at start. `corrupt/`: records or files that
//!   failed their checksum, kept for inspection, never delivered.
//!
//! Trust boundary: the spool trusts only its own files, and even those are
//! CRC-checked; it does not schedule or deliver (see `queue`, `relay`).

pub mod record;
mod recover;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

pub use record::{Attempt, Envelope, RcptState, RcptStatus};
pub use recover::scan;

/// Size of a preallocated segment; a segment rolls over when the next batch
/// would not fit (a batch larger than a whole segment grows it).
const SEGMENT_BYTES: u64 = 16 * 1024 * 1024;
/// The first segment of a process is smaller: a spool that takes a few
/// messages (or none) writes 1 MiB of zeros, not 16.
const FIRST_SEGMENT_BYTES: u64 = 1024 * 1024;
/// Segments kept for reuse at most (each holds `SEGMENT_BYTES` of disk).
const RECYCLE_KEEP: usize = 2;
/// A group commit that already holds this many bytes stops waiting for
/// expected records.
const BATCH_BYTES: usize = 8 * 1024 * 1024;
/// Default for `spool.commit_delay`.
pub const DEFAULT_COMMIT_DELAY: Duration = Duration::from_micros(1000);

/// Where a message's record lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    Segment { seg: u64, offset: u64, len: u32 },
    File,
}

/// A message found at start-up.
#[derive(Debug)]
pub struct Recovered {
    pub env: Envelope,
    pub loc: Location,
}

struct Commit {
    record: Vec<u8>,
    reply: oneshot::Sender<io::Result<Location>>,
}

#[derive(Default)]
struct SegInfo {
    live: usize,
    /// Records ever stored in it (this process), or found in it at start.
    records: usize,
    /// Since when no more records go to it (`None`: still written); it
    /// is deleted once sealed with no message left in it.
    sealed_at: Option<Instant>,
    /// Ids already released: a second release of the same message (two
    /// jobs racing, a retried move-out) must not count twice, or the
    /// segment would be deleted under another message.
    released: std::collections::HashSet<String>,
}

#[derive(Default)]
struct Segs {
    info: HashMap<u64, SegInfo>,
    done_logs: HashMap<u64, File>,
}

/// Records waiting for the group-commit writer, and how many messages are
/// being received that will be stored soon (PostgreSQL's `commit_siblings`
/// idea): the writer waits for those, up to `spool.commit_delay`, so that
/// one fdatasync covers them all, and never waits when none is expected
/// (a lone client gets its 250 after one fsync, no delay).
struct Intake {
    st: Mutex<IntakeState>,
    cv: Condvar,
    /// Messages being received (from the `354` or first `BDAT` chunk until
    /// they reach [`Spool::store`] or the transaction ends).
    expected: AtomicUsize,
    /// How long the writer may wait for expected messages, in µs.
    delay_us: AtomicU64,
}

#[derive(Default)]
struct IntakeState {
    queue: Vec<Commit>,
    bytes: usize,
    closed: bool,
    /// The writer sleeps until a first record arrives.
    idle: bool,
    /// The writer holds a batch and waits for expected records.
    lingering: bool,
}

impl Intake {
    /// One expected message arrived or will not come; wake a lingering
    /// writer when it was the last.
    fn arrived(&self, st: &IntakeState) -> bool {
        let left = self.expected.fetch_sub(1, Ordering::AcqRel) - 1;
        st.lingering && left == 0
    }
}

/// A message being received: while it lives, a group commit may wait
/// (briefly) for it. Hand it to [`Spool::store`] with the message; dropped
/// without storing (the transaction failed), it stops counting.
pub struct Expected {
    intake: Arc<Intake>,
    armed: AtomicBool,
}

impl Expected {
    /// Stop counting; true if a lingering writer should be woken.
    fn disarm(&self, st: &IntakeState) -> bool {
        self.armed.swap(false, Ordering::AcqRel) && self.intake.arrived(st)
    }
}

impl Drop for Expected {
    fn drop(&mut self) {
        if self.armed.load(Ordering::Acquire) {
            let st = self.intake.st.lock().unwrap();
            if self.disarm(&st) {
                self.intake.cv.notify_one();
            }
        }
    }
}

impl std::fmt::Debug for Expected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Expected")
    }
}

pub struct Spool {
    core: Arc<Core>,
    intake: Arc<Intake>,
    writer: Option<std::thread::JoinHandle<()>>,
    moves: Option<mpsc::Sender<MoveOut>>,
    mover: Option<std::thread::JoinHandle<()>>,
}

/// A deferred message leaving its segment for a file of its own.
struct MoveOut {
    env: Envelope,
    seg: u64,
    loc: Location,
    body: Option<Arc<Vec<u8>>>,
    reply: oneshot::Sender<io::Result<()>>,
}

/// The part shared with the group-commit thread.
pub struct Core {
    dir: PathBuf,
    /// Names the temp files of segments being prepared.
    preparations: AtomicU64,
    /// Segments from this number on were written by this process (every
    /// record stamped with its segment's tag): only those are recycled.
    own_from: u64,
    /// Segments whose messages are all done, kept in `tmp/` for reuse as
    /// the next segments instead of zero-filling new ones.
    recycled: Mutex<Recycled>,
    /// Group commits done (fsyncs of new records).
    batches: AtomicU64,
    segs: Mutex<Segs>,
    _lock: File,
    metrics: crate::metrics::SpoolMetrics,
}

impl Drop for Spool {
    /// Stop the writer (after it finished the batches already queued) so
    /// that the spool lock is released when the last handle goes.
    fn drop(&mut self) {
        self.intake.st.lock().unwrap().closed = true;
        self.intake.cv.notify_one();
        self.moves.take();
        for t in [self.writer.take(), self.mover.take()].into_iter().flatten() {
            let _ = t.join();
        }
    }
}

impl std::ops::Deref for Spool {
    type Target = Core;
    fn deref(&self) -> &Core {
        &self.core
    }
}

/// Take `dir/lock` for this process (released when the file is closed):
/// a second sendguard on the same directory (spool, outbox, trace) fails
/// instead of sharing and repairing live files.
pub fn lock_dir(dir: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))?;
    f.try_lock().map_err(|_| {
        io::Error::new(
            io::ErrorKind::WouldBlock,
            format!("{} is in use by another sendguard process", dir.display()),
        )
    })?;
    Ok(f)
}

impl Spool {
    /// Open (creating) the spool, lock it against a second process, recover
    /// every message it holds, and start the group-commit writer.
    pub fn open(dir: &Path) -> io::Result<(Arc<Spool>, Vec<Recovered>)> {
        Spool::open_with(dir, crate::metrics::SpoolMetrics::default())
    }

    /// [`Spool::open`], timing group commits into `metrics`.
    pub fn open_with(dir: &Path, metrics: crate::metrics::SpoolMetrics) -> io::Result<(Arc<Spool>, Vec<Recovered>)> {
        for sub in ["seg", "msg", "tmp", "corrupt"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let lock = lock_dir(dir)?;
        for e in std::fs::read_dir(dir.join("tmp"))? {
            let _ = std::fs::remove_file(e?.path());
        }
        let scan = recover::scan_for_recovery(dir)?;
        let mut segs = Segs::default();
        let opened = Instant::now();
        for (seg, &(live, records)) in &scan.live_per_segment {
            segs.info.insert(
                *seg,
                SegInfo {
                    live,
                    records,
                    sealed_at: Some(opened),
                    released: Default::default(),
                },
            );
        }
        let next_seg = scan.max_segment.map_or(1, |m| m + 1);
        let intake = Arc::new(Intake {
            st: Mutex::new(IntakeState::default()),
            cv: Condvar::new(),
            expected: AtomicUsize::new(0),
            delay_us: AtomicU64::new(DEFAULT_COMMIT_DELAY.as_micros() as u64),
        });
        let core = Arc::new(Core {
            dir: dir.to_path_buf(),
            preparations: AtomicU64::new(0),
            own_from: next_seg,
            recycled: Mutex::new(Recycled::default()),
            batches: AtomicU64::new(0),
            segs: Mutex::new(segs),
            _lock: lock,
            metrics,
        });
        // Segments whose messages are all final can go now.
        let empty: Vec<u64> = scan
            .live_per_segment
            .iter()
            .filter(|(_, (live, _))| *live == 0)
            .map(|(s, _)| *s)
            .collect();
        for seg in empty.into_iter().chain(scan.dead_segments.iter().copied()) {
            core.delete_segment(seg);
        }
        let (writer_core, writer_intake) = (Arc::clone(&core), Arc::clone(&intake));
        let writer = std::thread::Builder::new()
            .name("spool-commit".into())
            .spawn(move || writer_core.commit_loop(&writer_intake, next_seg))?;
        let (moves, move_rx) = mpsc::channel(4096);
        let mover_core = Arc::clone(&core);
        let mover = std::thread::Builder::new()
            .name("spool-move".into())
            .spawn(move || mover_core.move_loop(move_rx))?;
        info!(dir = %dir.display(), messages = scan.messages.len(), "spool opened");
        let spool = Spool {
            core,
            intake,
            writer: Some(writer),
            moves: Some(moves),
            mover: Some(mover),
        };
        Ok((Arc::new(spool), scan.messages))
    }

    /// How long a group commit may wait for messages still being received
    /// (`spool.commit_delay`; zero: never waits).
    pub fn set_commit_delay(&self, d: Duration) {
        self.intake.delay_us.store(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Segments kept only by a few messages that have waited there for
    /// `min_sealed` since the segment filled up: mail held (a suspension,
    /// an open breaker, a warm-up cap) or shaped behind a backlog is never
    /// attempted, so nothing moves it out, and each such message would keep
    /// a whole segment (16 MiB) on disk. Moving their messages to files of
    /// their own ([`Spool::save_state`]) frees it. "A few": at most a
    /// quarter of the segment's records, so moving costs at most a quarter
    /// of rewriting it and a backlog that simply waits its turn stays put.
    /// Returns each such segment with its count of messages still in it.
    pub fn pinned_segments(&self, min_sealed: Duration) -> Vec<(u64, usize)> {
        let segs = self.core.segs.lock().unwrap();
        let mut out: Vec<(u64, usize)> = segs
            .info
            .iter()
            .filter(|(_, i)| {
                i.live > 0 && i.live * 4 <= i.records && i.sealed_at.is_some_and(|t| t.elapsed() >= min_sealed)
            })
            .map(|(s, i)| (*s, i.live))
            .collect();
        out.sort_unstable();
        out
    }

    /// A message is being received and will be stored soon (see [`Expected`]).
    pub fn expect(&self) -> Expected {
        self.intake.expected.fetch_add(1, Ordering::AcqRel);
        Expected {
            intake: Arc::clone(&self.intake),
            armed: AtomicBool::new(true),
        }
    }

    /// Store a new message durably. Returns once its bytes are fsynced.
    pub async fn store(&self, env: &Envelope, body: &[u8]) -> io::Result<Location> {
        self.store_expected(env, body, None).await
    }

    /// [`Spool::store`] for a message announced with [`Spool::expect`].
    pub async fn store_expected(
        &self,
        env: &Envelope,
        body: &[u8],
        expected: Option<&Expected>,
    ) -> io::Result<Location> {
        let record = record::encode(env, body);
        let (reply, rx) = oneshot::channel();
        {
            let mut st = self.intake.st.lock().unwrap();
            // An announcement from another spool (a reload) is not ours to count.
            let last = expected.is_some_and(|e| Arc::ptr_eq(&e.intake, &self.intake) && e.disarm(&st));
            if st.closed {
                return Err(io::Error::other("spool writer stopped"));
            }
            st.bytes += record.len();
            st.queue.push(Commit { record, reply });
            if st.idle || last || (st.lingering && st.bytes >= BATCH_BYTES) {
                self.intake.cv.notify_one();
            }
        }
        rx.await.map_err(|_| io::Error::other("spool writer stopped"))?
    }

    /// Record new per-recipient state. A message still in its segment moves
    /// out to its own durable file first (batched with other move-outs: one
    /// filesystem sync per batch); one already in its own file gets its state
    /// file rewritten. Returns the message's location afterwards.
    pub async fn save_state(
        self: &Arc<Self>,
        env: Envelope,
        loc: Location,
        body: Option<Arc<Vec<u8>>>,
    ) -> io::Result<Location> {
        match loc {
            Location::Segment { seg, .. } => {
                let (reply, rx) = oneshot::channel();
                let moves = self.moves.as_ref().expect("open spool has a mover");
                moves
                    .send(MoveOut {
                        env,
                        seg,
                        loc,
                        body,
                        reply,
                    })
                    .await
                    .map_err(|_| io::Error::other("spool mover stopped"))?;
                rx.await.map_err(|_| io::Error::other("spool mover stopped"))??;
                Ok(Location::File)
            }
            Location::File => {
                let core = Arc::clone(&self.core);
                tokio::task::spawn_blocking(move || core.write_state(&env))
                    .await
                    .map_err(io::Error::other)??;
                Ok(Location::File)
            }
        }
    }
}

impl Core {
    fn seg_path(&self, seg: u64, ext: &str) -> PathBuf {
        self.dir.join("seg").join(format!("{seg:016x}.{ext}"))
    }

    fn msg_path(&self, id: &str, ext: &str) -> PathBuf {
        self.dir.join("msg").join(format!("{id}.{ext}"))
    }

    /// Take the next batch: wait for a first record, then, while messages
    /// being received are expected, up to the commit delay for them.
    /// `None` once the spool is closed and drained.
    fn next_batch(intake: &Intake) -> Option<Vec<Commit>> {
        let mut st = intake.st.lock().unwrap();
        while st.queue.is_empty() {
            if st.closed {
                return None;
            }
            st.idle = true;
            st = intake.cv.wait(st).unwrap();
            st.idle = false;
        }
        let delay = Duration::from_micros(intake.delay_us.load(Ordering::Relaxed));
        if !delay.is_zero() {
            let deadline = Instant::now() + delay;
            st.lingering = true;
            while intake.expected.load(Ordering::Acquire) > 0 && st.bytes < BATCH_BYTES && !st.closed {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                st = intake.cv.wait_timeout(st, deadline - now).unwrap().0;
            }
            st.lingering = false;
        }
        // At most BATCH_BYTES (at least one record) per fsync; the rest
        // goes in the next batch.
        let (mut n, mut bytes) = (0, 0);
        while n < st.queue.len() && (n == 0 || bytes + st.queue[n].record.len() <= BATCH_BYTES) {
            bytes += st.queue[n].record.len();
            n += 1;
        }
        let rest = st.queue.split_off(n);
        st.bytes -= bytes;
        Some(std::mem::replace(&mut st.queue, rest))
    }

    fn commit_loop(self: Arc<Self>, intake: &Intake, mut seg: u64) {
        /// However the writer ends (even by a panic), the spool takes no
        /// more records, and those waiting are answered with an error
        /// (their senders dropped) instead of hanging their sessions.
        struct CloseOnExit<'a>(&'a Intake);
        impl Drop for CloseOnExit<'_> {
            fn drop(&mut self) {
                let mut st = self.0.st.lock().unwrap_or_else(|e| e.into_inner());
                st.closed = true;
                st.queue.clear();
            }
        }
        let _close = CloseOnExit(intake);
        // The open segment: file, bytes used, preallocated size, tag.
        let mut file: Option<(File, u64, u64, u64)> = None;
        let mut next = self.prepare(FIRST_SEGMENT_BYTES);
        while let Some(mut batch) = Self::next_batch(intake) {
            let bytes: u64 = batch.iter().map(|c| c.record.len() as u64).sum();
            if file
                .as_ref()
                .is_some_and(|(_, size, cap, _)| *size > record::SEGMENT_HEADER && size + bytes > *cap)
            {
                self.seal(seg);
                seg += 1;
                file = None;
            }
            // Where this batch's records go (to invalidate them if it fails).
            let mut offsets: Vec<u64> = Vec::new();
            let result = (|| -> io::Result<Vec<Location>> {
                if file.is_none() {
                    file = Some(self.open_segment(seg, next.take())?);
                }
                let (f, size, _, tag) = file.as_mut().expect("segment open");
                let mut locs = Vec::with_capacity(batch.len());
                for c in &mut batch {
                    record::set_tag(&mut c.record, *tag);
                    offsets.push(*size);
                    locs.push(Location::Segment {
                        seg,
                        offset: *size,
                        len: c.record.len() as u32,
                    });
                    *size += c.record.len() as u64;
                }
                #[cfg(test)]
                fault::write(&self.dir, f, &batch)?;
                write_all_vectored(f, &batch)?;
                let started = std::time::Instant::now();
                f.sync_data()?;
                self.batches.fetch_add(1, Ordering::Relaxed);
                self.metrics.fsync_seconds.observe(started.elapsed().as_secs_f64());
                self.metrics.batch_size.observe(locs.len() as f64);
                Ok(locs)
            })();
            match result {
                Ok(locs) => {
                    // Half full: get the next segment ready in the background.
                    if next.is_none() && file.as_ref().is_some_and(|(_, size, cap, _)| size * 2 >= *cap) {
                        next = self.prepare(SEGMENT_BYTES);
                    }
                    let mut segs = self.segs.lock().unwrap();
                    let info = segs.info.entry(seg).or_default();
                    info.live += locs.len();
                    info.records += locs.len();
                    drop(segs);
                    for (c, loc) in batch.drain(..).zip(locs) {
                        let _ = c.reply.send(Ok(loc));
                    }
                }
                Err(e) => {
                    // After a failed write or fsync the segment's state is
                    // unknown: nothing in this batch is acknowledged, and the
                    // next batch starts a fresh segment.
                    error!(error = %e, segment = seg, "spool write failed");
                    // Whatever of it reached the disk must not be delivered
                    // after a restart: its senders were told 451 and send
                    // again. Zero every record header of the batch (recovery
                    // ends a segment at a header that is not its own).
                    if let Some((f, ..)) = file.as_ref()
                        && !offsets.is_empty()
                        && let Err(e) = invalidate(f, &offsets)
                    {
                        error!(error = %e, segment = seg, records = offsets.len(), "cannot invalidate the records of the failed batch; a restart may deliver them");
                    }
                    self.seal(seg);
                    seg += 1;
                    file = None;
                    for c in batch.drain(..) {
                        let _ = c.reply.send(Err(io::Error::new(e.kind(), e.to_string())));
                    }
                }
            }
        }
        // Don't leave a helper writing into tmp/, or segments kept for
        // reuse there, after the spool closed.
        let kept = {
            let mut pool = self.recycled.lock().unwrap();
            pool.closing = true;
            std::mem::take(&mut pool.files)
        };
        self.seal(seg);
        if let Some(p) = next
            && let Some(ready) = p.finish()
        {
            remove_if_exists(&ready.path);
        }
        for p in kept {
            remove_if_exists(&p);
        }
    }

    /// Get the next segment ready on a helper thread: a recycled one
    /// restamped with a new tag if there is one, else a new one of `cap`
    /// bytes zero-filled in `tmp/`. `None` if the thread cannot start (the
    /// writer then falls back to a growing segment).
    fn prepare(&self, cap: u64) -> Option<Preparing> {
        let recycled = self.recycled.lock().unwrap().files.pop();
        let reuse = recycled.is_some();
        let path = recycled.unwrap_or_else(|| self.new_tmp_segment("prep"));
        let prep_path = path.clone();
        let spawned = std::thread::Builder::new().name("spool-prep".into()).spawn(move || {
            let tag = random_tag();
            let r = if reuse {
                restamped(&path, tag)
            } else {
                zero_filled(&path, cap, tag).map(|f| (f, cap))
            };
            if r.is_err() {
                remove_if_exists(&path);
            }
            r.map(|(file, cap)| Ready { file, path, cap, tag })
        });
        match spawned {
            Ok(handle) => Some(Preparing(handle)),
            Err(e) => {
                warn!(error = %e, "cannot start the segment preparation thread");
                // A recycled file taken from the pool is not left behind.
                remove_if_exists(&prep_path);
                None
            }
        }
    }

    /// A fresh path in `tmp/` for a segment file being made.
    fn new_tmp_segment(&self, ext: &str) -> PathBuf {
        let n = self.preparations.fetch_add(1, Ordering::Relaxed);
        self.dir.join("tmp").join(format!("segment-{n}.{ext}"))
    }

    /// Put segment `seg` in place: the prepared file if there is one (it
    /// is renamed in and the directory fsynced), else a new file with just
    /// the header that grows as records are appended (correct, only slower
    /// to fsync). Returns the file, the bytes used (the header), the
    /// preallocated size and the segment's tag.
    fn open_segment(&self, seg: u64, prepared: Option<Preparing>) -> io::Result<(File, u64, u64, u64)> {
        let path = self.seg_path(seg, "seg");
        let seg_dir = self.dir.join("seg");
        if let Some(r) = prepared.and_then(Preparing::finish) {
            match std::fs::rename(&r.path, &path) {
                Ok(()) => {
                    sync_dir(&seg_dir)?;
                    return Ok((r.file, record::SEGMENT_HEADER, r.cap, r.tag));
                }
                Err(e) => {
                    warn!(error = %e, "cannot rename a prepared segment into place; using a growing one");
                    remove_if_exists(&r.path);
                }
            }
        }
        // Like a prepared one, the file enters seg/ with its header durable:
        // prepared with nothing after the header.
        let tag = random_tag();
        let tmp = self.new_tmp_segment("new");
        let placed =
            zero_filled(&tmp, record::SEGMENT_HEADER, tag).and_then(|f| std::fs::rename(&tmp, &path).map(|()| f));
        let f = match placed {
            Ok(f) => f,
            Err(e) => {
                remove_if_exists(&tmp);
                return Err(e);
            }
        };
        sync_dir(&seg_dir)?;
        Ok((f, record::SEGMENT_HEADER, SEGMENT_BYTES, tag))
    }

    /// No more records go to `seg`; delete it when its last message is done.
    fn seal(&self, seg: u64) {
        let mut segs = self.segs.lock().unwrap();
        let info = segs.info.entry(seg).or_default();
        info.sealed_at = Some(Instant::now());
        if info.live == 0 {
            drop(segs);
            self.delete_segment(seg);
        }
    }

    fn delete_segment(&self, seg: u64) {
        let mut segs = self.segs.lock().unwrap();
        segs.info.remove(&seg);
        segs.done_logs.remove(&seg);
        drop(segs);
        if !self.recycle(seg) {
            remove_if_exists(&self.seg_path(seg, "seg"));
        }
        remove_if_exists(&self.seg_path(seg, "done"));
    }

    /// Keep a deleted segment in `tmp/` to be written over as a later
    /// segment: its blocks are allocated and written, so it is as fast to
    /// commit into as a zero-filled one without writing the zeros again.
    /// Its old records stay in it, stamped with its old tag, and recovery
    /// stops at the first one (see `record`). Only segments of
    /// this process (stamped), of a whole segment's size, up to
    /// [`RECYCLE_KEEP`], while the writer runs. A crash before the rename
    /// is durable brings the segment back, as a crash before an unlink
    /// would.
    fn recycle(&self, seg: u64) -> bool {
        if seg < self.own_from {
            return false;
        }
        let path = self.seg_path(seg, "seg");
        let fits = std::fs::metadata(&path).is_ok_and(|m| (SEGMENT_BYTES..=2 * SEGMENT_BYTES).contains(&m.len()));
        let mut pool = self.recycled.lock().unwrap();
        if !fits || pool.files.len() >= RECYCLE_KEEP || pool.closing {
            return false;
        }
        let to = self.dir.join("tmp").join(format!("recycled-{seg:016x}.prep"));
        match std::fs::rename(&path, &to) {
            Ok(()) => {
                pool.files.push(to);
                true
            }
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot keep a segment for reuse");
                false
            }
        }
    }

    /// Mark a segment message as no longer needing its segment record.
    fn release_segment_message(&self, id: &str, seg: u64) {
        let mut segs = self.segs.lock().unwrap();
        // Unknown segment: already deleted, nothing to release. Known id:
        // released before, don't count it twice.
        let Some(info) = segs.info.get_mut(&seg) else { return };
        if !info.released.insert(id.to_string()) {
            return;
        }
        // The whole line in one write (`O_APPEND` keeps it in one piece);
        // the log's path is built only to open it or to name it in a warning.
        let mut line = Vec::with_capacity(id.len() + 1);
        line.extend_from_slice(id.as_bytes());
        line.push(b'\n');
        let logged = match segs.done_logs.entry(seg) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut().write_all(&line),
            std::collections::hash_map::Entry::Vacant(v) => OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.seg_path(seg, "done"))
                .and_then(|f| v.insert(f).write_all(&line)),
        };
        if let Err(e) = logged {
            warn!(path = %self.seg_path(seg, "done").display(), error = %e, "cannot append to done log");
        }
        let Some(info) = segs.info.get_mut(&seg) else { return };
        info.live = info.live.saturating_sub(1);
        if info.live == 0 && info.sealed_at.is_some() {
            drop(segs);
            self.delete_segment(seg);
        }
    }

    /// Every recipient is final: forget the message.
    pub fn complete(&self, id: &str, loc: Location) {
        match loc {
            Location::Segment { seg, .. } => self.release_segment_message(id, seg),
            Location::File => {
                for ext in ["msg", "state"] {
                    remove_if_exists(&self.msg_path(id, ext));
                }
            }
        }
    }

    /// Rewrite the state file of a message that has its own file (no fsync:
    /// a lost update only repeats an attempt).
    fn write_state(&self, env: &Envelope) -> io::Result<()> {
        let tmp = self.dir.join("tmp").join(format!("{}.state", env.id));
        std::fs::write(&tmp, serde_json::to_vec(&env.rcpts).expect("state serializes"))?;
        std::fs::rename(&tmp, self.msg_path(&env.id, "state"))
    }

    /// Move-outs in batches: write every file, make them durable with one
    /// filesystem sync, rename them into `msg/`, sync the directory once,
    /// and only then release their segment entries. A message is durable in
    /// at least one place at every step.
    fn move_loop(self: Arc<Self>, mut rx: mpsc::Receiver<MoveOut>) {
        let mut batch: Vec<MoveOut> = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            batch.push(first);
            while batch.len() < 1024 {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            // Opened before the writes: syncfs reports writeback errors that
            // happened after the descriptor was opened (Linux >= 5.8).
            let sync_handle = File::open(&self.dir);
            let mut results: Vec<io::Result<PathBuf>> = batch.iter().map(|m| self.write_temp(m)).collect();
            let synced = sync_handle.and_then(|h| self.sync_files(&h, results.iter().filter_map(|r| r.as_ref().ok())));
            if let Err(e) = synced {
                results = results
                    .into_iter()
                    .map(|r| r.and(Err(io::Error::new(e.kind(), e.to_string()))))
                    .collect();
            }
            let results: Vec<io::Result<()>> = batch
                .iter()
                .zip(results)
                .map(|(m, r)| r.and_then(|tmp| std::fs::rename(tmp, self.msg_path(&m.env.id, "msg"))))
                .collect();
            let dir_synced = sync_dir(&self.dir.join("msg"));
            for (m, r) in batch.drain(..).zip(results) {
                let r = r.and_then(|()| {
                    dir_synced
                        .as_ref()
                        .map(|_| ())
                        .map_err(|e| io::Error::new(e.kind(), e.to_string()))
                });
                if r.is_ok() {
                    self.release_segment_message(&m.env.id, m.seg);
                }
                let _ = m.reply.send(r);
            }
        }
    }

    fn write_temp(&self, m: &MoveOut) -> io::Result<PathBuf> {
        let body = match &m.body {
            Some(b) => std::borrow::Cow::Borrowed(b.as_slice()),
            None => std::borrow::Cow::Owned(self.read_body(&m.env.id, m.loc)?),
        };
        let tmp = self.dir.join("tmp").join(format!("{}.msg", m.env.id));
        let mut f = File::create(&tmp)?;
        f.write_all(&record::encode(&m.env, &body))?;
        Ok(tmp)
    }

    /// Make the given files' data durable: one `syncfs` on Linux (a single
    /// journal commit for the whole batch), else one fsync per file.
    fn sync_files<'a>(&self, dir: &File, files: impl Iterator<Item = &'a PathBuf>) -> io::Result<()> {
        #[cfg(target_os = "linux")]
        {
            let _ = files;
            use std::os::fd::AsRawFd;
            // SAFETY: syncfs takes a valid open file descriptor, which `dir` holds.
            if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = dir;
            for f in files {
                File::open(f)?.sync_all()?;
            }
            Ok(())
        }
    }

    /// Read a message's body back (blocking).
    pub fn read_body(&self, id: &str, loc: Location) -> io::Result<Vec<u8>> {
        let buf = match loc {
            Location::Segment { seg, offset, len } => {
                let mut f = File::open(self.seg_path(seg, "seg"))?;
                f.seek(SeekFrom::Start(offset))?;
                let mut buf = vec![0; len as usize];
                f.read_exact(&mut buf)?;
                buf
            }
            Location::File => std::fs::read(self.msg_path(id, "msg"))?,
        };
        let d = record::decode(&buf)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("message {id}: {e:?}")))?;
        if d.env.id != id {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("message {id}: record holds {}", d.env.id),
            ));
        }
        Ok(d.body)
    }
}

/// Remove a spool file; a missing one is fine, other errors are logged.
fn remove_if_exists(p: &Path) {
    if let Err(e) = std::fs::remove_file(p)
        && e.kind() != io::ErrorKind::NotFound
    {
        warn!(path = %p.display(), error = %e, "cannot remove spool file");
    }
}

/// Zero the record headers at `offsets` and make that durable. Every
/// offset is tried even after an error (each header zeroed hides its
/// record), and the sync always runs; the first error is returned.
fn invalidate(f: &File, offsets: &[u64]) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut first_err = None;
    for &off in offsets {
        if let Err(e) = f.write_all_at(&[0u8; record::RECORD_HEADER], off) {
            first_err.get_or_insert(e);
        }
    }
    let synced = f.sync_data();
    match first_err {
        Some(e) => Err(e),
        None => synced,
    }
}

/// Test-only write failures for the next batch written into a spool under
/// a given directory: its first record written, then ENOSPC (a disk that
/// fills up mid-write), or every record written, then EIO (a failed
/// fsync).
#[cfg(test)]
mod fault {
    use std::io::{self, Write};
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    #[derive(Clone, Copy, PartialEq)]
    pub enum Fault {
        FirstRecordThenFull,
        AllThenIoError,
    }

    static FAIL: Mutex<Vec<(PathBuf, Fault)>> = Mutex::new(Vec::new());

    pub fn fail_next_write(dir: &Path, how: Fault) {
        FAIL.lock().unwrap().push((dir.to_path_buf(), how));
    }

    pub fn write(dir: &Path, f: &mut std::fs::File, batch: &[super::Commit]) -> io::Result<()> {
        let mut fail = FAIL.lock().unwrap();
        let Some(i) = fail.iter().position(|(d, _)| d == dir) else {
            return Ok(());
        };
        let (_, how) = fail.remove(i);
        match how {
            Fault::FirstRecordThenFull => {
                f.write_all(&batch[0].record)?;
                Err(io::Error::from_raw_os_error(libc::ENOSPC))
            }
            Fault::AllThenIoError => {
                super::write_all_vectored(f, batch)?;
                Err(io::Error::from_raw_os_error(libc::EIO))
            }
        }
    }
}

/// Every record of a batch in as few `writev` calls as the kernel allows.
fn write_all_vectored(f: &mut File, batch: &[Commit]) -> io::Result<()> {
    // IOV_MAX is 1024 on Linux.
    for chunk in batch.chunks(1024) {
        let mut slices: Vec<io::IoSlice<'_>> = chunk.iter().map(|c| io::IoSlice::new(&c.record)).collect();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            let n = match f.write_vectored(rest) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => r?,
            };
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            io::IoSlice::advance_slices(&mut rest, n);
        }
    }
    Ok(())
}

/// Segments kept for reuse, and whether the writer has stopped (then
/// segments are deleted, not kept: nothing is left in `tmp/` after it
/// emptied the pool).
#[derive(Default)]
struct Recycled {
    files: Vec<PathBuf>,
    closing: bool,
}

/// The next segment, being made ready by a helper thread.
struct Preparing(std::thread::JoinHandle<io::Result<Ready>>);

/// A segment file ready in `tmp/`: header durable, position after it.
struct Ready {
    file: File,
    path: PathBuf,
    cap: u64,
    tag: u64,
}

impl Preparing {
    /// Wait for it; `None` (logged) if it failed.
    fn finish(self) -> Option<Ready> {
        match self.0.join() {
            Ok(Ok(r)) => Some(r),
            Ok(Err(e)) => {
                warn!(error = %e, "cannot prepare a segment; using a growing one");
                None
            }
            Err(_) => {
                warn!("the segment preparation thread panicked; using a growing one");
                None
            }
        }
    }
}

/// A segment tag: random, so that neither an earlier use of the file nor a
/// message body can hold a record that passes for one of this segment.
fn random_tag() -> u64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .expect("the system random number generator works");
    // 0 is the tag of records in files of their own.
    u64::from_le_bytes(b).max(1)
}

/// Write a new header (tag) over a recycled segment and make it durable;
/// the file, positioned after the header, and its size.
fn restamped(path: &Path, tag: u64) -> io::Result<(File, u64)> {
    use std::os::unix::fs::FileExt;
    let mut f = OpenOptions::new().write(true).open(path)?;
    f.write_all_at(&record::segment_header(tag), 0)?;
    f.sync_data()?;
    let cap = f.metadata()?.len();
    f.seek(SeekFrom::Start(record::SEGMENT_HEADER))?;
    Ok((f, cap))
}

/// Create `path` holding `cap` bytes: the segment header with `tag`, then
/// zeros; durable (data and size), positioned after the header. Records
/// written over it later change no metadata that `fdatasync` must commit:
/// on ext4 an append that grows a file makes each group commit wait for a
/// journal commit as well as the data flush, while overwriting written
/// blocks does not (`fallocate` would not do: its unwritten extents are
/// converted, in the journal, on first write). Measured on the project
/// machine: 2 KB write + fdatasync 332 µs appending vs 208 µs overwriting
/// (docs/performance.md).
fn zero_filled(path: &Path, cap: u64, tag: u64) -> io::Result<File> {
    let mut f = OpenOptions::new().create_new(true).write(true).open(path)?;
    let zeros = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < cap {
        let n = (cap - off).min(zeros.len() as u64) as usize;
        f.write_all(&zeros[..n])?;
        // Write back each chunk as it is produced instead of leaving 16 MiB
        // of dirty pages for the final sync: one large writeback burst sits
        // in front of the commit loop's fdatasync and stalls acknowledgements.
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let flags =
                libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
            // SAFETY: sync_file_range takes a valid open descriptor, which `f` holds; the range is in the file.
            if unsafe { libc::sync_file_range(f.as_raw_fd(), off as i64, n as i64, flags) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        off += n as u64;
    }
    {
        use std::os::unix::fs::FileExt;
        f.write_all_at(&record::segment_header(tag), 0)?;
    }
    f.sync_all()?;
    f.seek(SeekFrom::Start(record::SEGMENT_HEADER))?;
    Ok(f)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn store_recover_move_out_and_complete() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, rec) = Spool::open(dir.path()).unwrap();
        assert!(rec.is_empty());
        let mut a = record::sample("a");
        let b = record::sample("b");
        let la = spool.store(&a, b"body a\r\n").await.unwrap();
        let lb = spool.store(&b, b"body b\r\n").await.unwrap();
        assert!(matches!(la, Location::Segment { .. }));
        assert_eq!(spool.read_body("a", la).unwrap(), b"body a\r\n");
        // a is deferred: it moves out to its own file
        a.rcpts[0].attempts = 1;
        let la = spool.save_state(a.clone(), la, None).await.unwrap();
        assert_eq!(la, Location::File);
        assert_eq!(spool.read_body("a", la).unwrap(), b"body a\r\n");
        assert!(dir.path().join("msg/a.msg").exists());
        assert!(!dir.path().join("tmp/a.msg").exists());
        a.rcpts[0].attempts = 2;
        spool.save_state(a.clone(), la, None).await.unwrap();
        drop(spool);

        // restart: both come back, a with its latest state, b from the segment
        let (spool, mut rec) = Spool::open(dir.path()).unwrap();
        rec.sort_by(|x, y| x.env.id.cmp(&y.env.id));
        assert_eq!(rec.len(), 2);
        assert_eq!(rec[0].env.rcpts[0].attempts, 2);
        assert_eq!(rec[0].loc, Location::File);
        assert!(matches!(rec[1].loc, Location::Segment { .. }));
        assert_eq!(spool.read_body("b", rec[1].loc).unwrap(), b"body b\r\n");
        spool.complete("a", rec[0].loc);
        spool.complete("b", rec[1].loc);
        let _ = lb;
        drop(spool);
        let (_spool, rec) = Spool::open(dir.path()).unwrap();
        assert!(rec.is_empty(), "{rec:?}");
        // the old segment was deleted once all its messages were done
        let segs: Vec<_> = std::fs::read_dir(dir.path().join("seg")).unwrap().collect();
        assert!(segs.is_empty(), "{segs:?}");
    }

    /// Store messages a and b in one segment, then defer a: it moves out to
    /// its own file. Returns a's envelope and its old (segment) location.
    async fn store_two_move_out_a(dir: &Path) -> (Arc<Spool>, Envelope, Location) {
        let (spool, _) = Spool::open(dir).unwrap();
        let mut a = record::sample("a");
        let la = spool.store(&a, b"body a\r\n").await.unwrap();
        spool.store(&record::sample("b"), b"body b\r\n").await.unwrap();
        a.rcpts[0].attempts = 1;
        assert_eq!(spool.save_state(a.clone(), la, None).await.unwrap(), Location::File);
        (spool, a, la)
    }

    /// Two move-outs of one message (two jobs racing with a stale segment
    /// location) must not release its segment entry twice: the segment
    /// would be deleted while another acknowledged message lives only there.
    #[tokio::test]
    async fn double_release_keeps_the_other_message() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, a, la) = store_two_move_out_a(dir.path()).await;
        spool.save_state(a.clone(), la, None).await.unwrap();
        spool.complete("a", la);
        drop(spool);
        let (_spool, rec) = Spool::open(dir.path()).unwrap();
        let mut ids: Vec<_> = rec.iter().map(|r| r.env.id.clone()).collect();
        ids.sort();
        assert_eq!(ids, ["a", "b"], "b must survive; a lives in its own file");
    }

    /// A batch whose write fails (here: its first record written, then
    /// ENOSPC) is answered with an error, so its senders send again; what
    /// of it reached the disk must not be delivered after a restart too.
    #[tokio::test]
    async fn records_of_a_failed_write_are_not_recovered() {
        use fault::Fault;
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path()).unwrap();
        spool.store(&record::sample("a"), b"body a\r\n").await.unwrap();
        fault::fail_next_write(dir.path(), Fault::FirstRecordThenFull);
        let e = spool.store(&record::sample("b"), b"body b\r\n").await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::StorageFull, "{e}");
        // the next batch goes to a fresh segment
        spool.store(&record::sample("c"), b"body c\r\n").await.unwrap();
        // A batch of three written whole, then the fsync fails: none of
        // them comes back (zeroing only the first header would let
        // recovery skip it as damage and read the others).
        spool.set_commit_delay(Duration::from_secs(30));
        fault::fail_next_write(dir.path(), Fault::AllThenIoError);
        let (e_coming, f_coming) = (spool.expect(), spool.expect());
        let s2 = Arc::clone(&spool);
        let d = tokio::spawn(async move { s2.store(&record::sample("d"), b"body\r\n").await });
        let s2 = Arc::clone(&spool);
        let e = tokio::spawn(async move {
            s2.store_expected(&record::sample("e"), b"body\r\n", Some(&e_coming))
                .await
        });
        let s2 = Arc::clone(&spool);
        let f = tokio::spawn(async move {
            s2.store_expected(&record::sample("f"), b"body\r\n", Some(&f_coming))
                .await
        });
        for t in [d, e, f] {
            let err = t.await.unwrap().unwrap_err();
            assert!(err.to_string().contains("Input/output error"), "{err}");
        }
        drop(spool);
        let (_spool, rec) = Spool::open(dir.path()).unwrap();
        let mut ids = recovered_ids(&rec);
        ids.sort();
        assert_eq!(ids, ["a", "c"]);
    }

    /// kill -9 between a move-out (the message's own file durable in msg/)
    /// and its line in the segment's done log: the start takes the message
    /// from its file and records the missing line, so that once the file is
    /// delivered and deleted, a later start does not bring back the
    /// segment's old copy (every recipient pending: a second delivery).
    #[tokio::test]
    async fn a_moved_out_message_without_its_done_line_never_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _, la) = store_two_move_out_a(dir.path()).await;
        drop(spool);
        // the done line never reached the file
        let Location::Segment { seg, .. } = la else {
            unreachable!()
        };
        let done = dir.path().join("seg").join(format!("{seg:016x}.done"));
        std::fs::write(&done, "").unwrap();

        let (spool, rec) = Spool::open(dir.path()).unwrap();
        let mut ids = recovered_ids(&rec);
        ids.sort();
        assert_eq!(ids, ["a", "b"]);
        let a_loc = rec.iter().find(|r| r.env.id == "a").unwrap().loc;
        assert_eq!(a_loc, Location::File);
        assert_eq!(std::fs::read_to_string(&done).unwrap(), "a\n");
        spool.complete("a", a_loc);
        drop(spool);
        let (_spool, rec) = Spool::open(dir.path()).unwrap();
        assert_eq!(recovered_ids(&rec), ["b"]);
    }

    /// `sendguard queue` reads the spool while the server runs: a message
    /// delivered (its file deleted) between the listing and the read is
    /// skipped, not an error. A start removes a state file left without
    /// its message (a crash between the two deletions of `complete`).
    #[tokio::test]
    async fn files_that_vanish_or_are_left_over() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path()).unwrap();
        let a = record::sample("a");
        spool.store(&a, b"body a\r\n").await.unwrap();
        drop(spool);
        // what a read between readdir and read sees
        std::os::unix::fs::symlink("/nonexistent", dir.path().join("msg/gone.msg")).unwrap();
        let listed = recover::scan(dir.path()).unwrap();
        assert_eq!(recovered_ids(&listed), ["a"]);
        std::fs::remove_file(dir.path().join("msg/gone.msg")).unwrap();
        std::fs::write(dir.path().join("msg/orphan.state"), "[]").unwrap();
        let (_spool, rec) = Spool::open(dir.path()).unwrap();
        assert_eq!(recovered_ids(&rec), ["a"]);
        assert!(!dir.path().join("msg/orphan.state").exists());
    }

    #[tokio::test]
    async fn second_process_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_a, _) = Spool::open(dir.path()).unwrap();
        let err = Spool::open(dir.path()).err().expect("locked");
        assert!(err.to_string().contains("in use"), "{err}");
    }

    fn only_segment(dir: &Path) -> PathBuf {
        let segs: Vec<PathBuf> = std::fs::read_dir(dir.join("seg"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "seg"))
            .collect();
        assert_eq!(segs.len(), 1, "{segs:?}");
        segs.into_iter().next().unwrap()
    }

    fn dir_is_empty(p: &Path) -> bool {
        std::fs::read_dir(p).unwrap().next().is_none()
    }

    /// The ids of recovered messages, in order.
    fn recovered_ids(rec: &[Recovered]) -> Vec<&str> {
        rec.iter().map(|r| r.env.id.as_str()).collect()
    }

    /// The tag in a segment file's header (panics if it has none).
    fn segment_tag(path: &Path) -> u64 {
        match record::parse_segment_start(&std::fs::read(path).unwrap()) {
            Ok(record::SegmentStart::Tagged(t)) => t,
            other => panic!("{}: {other:?}", path.display()),
        }
    }

    /// A crash mid-write leaves the last record cut short: in a
    /// preallocated segment its unwritten part is still zero, in a grown
    /// one the file is short. Either way it is not recovered, the records
    /// before it are, and a torn tail is not reported as corruption.
    #[tokio::test]
    async fn torn_tail_is_not_recovered() {
        for zeroed in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let (spool, _) = Spool::open(dir.path()).unwrap();
            spool.store(&record::sample("whole"), b"x\r\n").await.unwrap();
            let torn = spool.store(&record::sample("torn"), b"y\r\n").await.unwrap();
            drop(spool);
            let Location::Segment { offset, len, .. } = torn else {
                panic!("{torn:?}")
            };
            let end = offset + len as u64;
            let seg = only_segment(dir.path());
            let f = OpenOptions::new().write(true).open(&seg).unwrap();
            if zeroed {
                use std::os::unix::fs::FileExt;
                f.write_all_at(&[0; 10], end - 10).unwrap();
            } else {
                f.set_len(end - 10).unwrap();
            }
            drop(f);
            let (spool, rec) = Spool::open(dir.path()).unwrap();
            let ids = recovered_ids(&rec);
            assert_eq!(ids, ["whole"], "zeroed: {zeroed}");
            assert!(dir_is_empty(&dir.path().join("corrupt")), "zeroed: {zeroed}");
            // the start cut the torn record off: once a newer segment
            // exists, the old one still ends cleanly
            assert_eq!(std::fs::metadata(&seg).unwrap().len(), offset, "zeroed: {zeroed}");
            spool.store(&record::sample("later"), b"z\r\n").await.unwrap();
            drop(spool);
            let (_spool, rec) = Spool::open(dir.path()).unwrap();
            let ids = recovered_ids(&rec);
            assert_eq!(ids, ["whole", "later"], "zeroed: {zeroed}");
            assert!(dir_is_empty(&dir.path().join("corrupt")), "zeroed: {zeroed}");
        }
    }

    /// A damaged record in the middle of a segment (not a torn tail) is
    /// reported and copied to corrupt/; the records after it come back,
    /// whether the damage hit the record's payload or its header.
    #[tokio::test]
    async fn damaged_record_is_skipped() {
        for in_header in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let (spool, _) = Spool::open(dir.path()).unwrap();
            let mut locs = Vec::new();
            for id in ["a", "b", "c"] {
                locs.push(spool.store(&record::sample(id), b"body\r\n").await.unwrap());
            }
            drop(spool);
            let Location::Segment { offset, len, .. } = locs[1] else {
                panic!("{:?}", locs[1])
            };
            let at = if in_header { offset + 5 } else { offset + len as u64 - 3 };
            {
                use std::os::unix::fs::FileExt;
                let f = OpenOptions::new().write(true).open(only_segment(dir.path())).unwrap();
                f.write_all_at(b"X", at).unwrap();
            }
            let (_spool, rec) = Spool::open(dir.path()).unwrap();
            let ids = recovered_ids(&rec);
            assert_eq!(ids, ["a", "c"], "in header: {in_header}");
            assert!(!dir_is_empty(&dir.path().join("corrupt")), "in header: {in_header}");
        }
    }

    /// Bytes that follow a segment's last record are never read as one of
    /// its records unless they carry its tag: a forged record (as a message
    /// body could hold) exactly at the end, tagged with anything a sender
    /// could guess, is not recovered. And a record at the end whose
    /// checksums pass but whose envelope does not parse is damage, not a
    /// torn write: it is not cut off.
    #[tokio::test]
    async fn records_after_the_end_are_not_read() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path()).unwrap();
        let real = spool.store(&record::sample("real"), b"r\r\n").await.unwrap();
        drop(spool);
        let Location::Segment { seg, offset, len } = real else {
            panic!("{real:?}")
        };
        let end = offset + len as u64;
        let path = dir.path().join("seg").join(format!("{seg:016x}.seg"));
        let tag = segment_tag(&path);
        assert!(tag > 1 << 20, "tag {tag:#x} looks guessable");
        for guess in [0, 1, seg, seg + 1, u64::MAX] {
            let mut forged = record::sample(&format!("forged{guess}"));
            forged.rcpts[0].addr = "victim@elsewhere.example".into();
            let mut r = record::encode(&forged, b"spam\r\n");
            record::set_tag(&mut r, guess);
            OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .write_all_at(&r, end)
                .unwrap();
            let (spool, rec) = Spool::open(dir.path()).unwrap();
            let ids = recovered_ids(&rec);
            assert_eq!(ids, ["real"], "guess {guess}");
            drop(spool);
        }
        assert!(dir_is_empty(&dir.path().join("corrupt")));

        let bad = record::encode_unparsable(tag);
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(&bad, end)
            .unwrap();
        let (_spool, rec) = Spool::open(dir.path()).unwrap();
        let ids = recovered_ids(&rec);
        assert_eq!(ids, ["real"]);
        assert!(!dir_is_empty(&dir.path().join("corrupt")));
        assert!(std::fs::metadata(&path).unwrap().len() > end, "cut off");
    }

    /// Segments whose messages are all done are kept and written over as
    /// later segments, under a new random tag. Their old records, and
    /// record-shaped bytes in message bodies tagged with anything a sender
    /// could guess (segment numbers, 0), never come back after a restart.
    #[tokio::test]
    async fn recycled_segments_hide_their_old_records() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path()).unwrap();
        // a body full of forged records, each tagged with a guess
        let mut body = Vec::new();
        for guess in (0..64).chain([u64::MAX]) {
            let mut forged = record::sample(&format!("forged{guess}"));
            forged.rcpts[0].addr = "victim@elsewhere.example".into();
            let mut r = record::encode(&forged, b"spam\r\n");
            record::set_tag(&mut r, guess);
            body.extend_from_slice(&r);
        }
        body.resize(512 * 1024, b'.');
        let mut stored: Vec<(String, Location)> = Vec::new();
        let mut n = 0;
        let mut store = async |stored: &mut Vec<(String, Location)>| {
            n += 1;
            let id = format!("m{n}");
            let loc = spool.store(&record::sample(&id), &body).await.unwrap();
            stored.push((id, loc));
            match loc {
                Location::Segment { seg, .. } => seg,
                l => panic!("{l:?}"),
            }
        };
        // fill the 1 MiB first segment and a whole 16 MiB one (B); stop
        // at the first record of the third (C)
        let first = store(&mut stored).await;
        while store(&mut stored).await != first + 2 {}
        let b = first + 1;
        let b_inode = std::fs::metadata(spool.seg_path(b, "seg")).unwrap().ino();
        let tag_of = |seg: u64| segment_tag(&spool.seg_path(seg, "seg"));
        let b_tag = tag_of(b);
        // everything in the first two is delivered: B is kept for reuse
        for (id, loc) in stored.drain(..stored.len() - 1) {
            spool.complete(&id, loc);
        }
        assert!(!spool.seg_path(b, "seg").exists());
        assert_eq!(spool.recycled.lock().unwrap().files.len(), 1);
        // fill C; the next segment (D) is B's file
        while store(&mut stored).await != first + 3 {}
        let d = first + 3;
        assert_eq!(std::fs::metadata(spool.seg_path(d, "seg")).unwrap().ino(), b_inode);
        assert_ne!(tag_of(d), b_tag);
        store(&mut stored).await;
        let live: Vec<String> = stored.iter().map(|(id, _)| id.clone()).collect();
        drop(spool);
        assert!(dir_is_empty(&dir.path().join("tmp")));

        let (_spool, rec) = Spool::open(dir.path()).unwrap();
        let ids = recovered_ids(&rec);
        assert_eq!(ids, live);
        assert!(dir_is_empty(&dir.path().join("corrupt")));
    }

    /// Without a prepared file (the helper thread failed), a segment still
    /// enters seg/ only with its header durable, and is written as it grows.
    #[tokio::test]
    async fn unprepared_segment_has_its_header() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path()).unwrap();
        let (mut f, used, cap, tag) = spool.open_segment(0x99, None).unwrap();
        assert_eq!((used, cap), (record::SEGMENT_HEADER, SEGMENT_BYTES));
        let path = spool.seg_path(0x99, "seg");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), record::SEGMENT_HEADER);
        assert_eq!(segment_tag(&path), tag);
        let mut rec = record::encode(&record::sample("grown"), b"g\r\n");
        record::set_tag(&mut rec, tag);
        f.write_all(&rec).unwrap();
        drop(f);
        assert!(std::fs::read_dir(dir.path().join("tmp")).unwrap().all(|e| {
            let name = e.unwrap().file_name();
            !name.to_string_lossy().ends_with(".new")
        }));
        drop(spool);
        let (_spool, rec) = Spool::open(dir.path()).unwrap();
        let ids = recovered_ids(&rec);
        assert_eq!(ids, ["grown"]);
    }

    /// A segment of an older sendguard (no header, `SGR1` records) is read.
    #[tokio::test]
    async fn older_segments_are_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("seg")).unwrap();
        let mut seg = record::encode_v1(&record::sample("old1"), b"a\r\n");
        seg.extend_from_slice(&record::encode_v1(&record::sample("old2"), b"b\r\n"));
        std::fs::write(dir.path().join("seg").join(format!("{:016x}.seg", 5)), &seg).unwrap();
        let (spool, rec) = Spool::open(dir.path()).unwrap();
        let ids = recovered_ids(&rec);
        assert_eq!(ids, ["old1", "old2"]);
        assert_eq!(spool.read_body("old2", rec[1].loc).unwrap(), b"b\r\n");
        assert!(dir_is_empty(&dir.path().join("corrupt")));
    }

    /// Segments are zero-filled ahead of use and written in place: the
    /// first is 1 MiB and does not grow, the next is prepared while it
    /// fills; a batch that does not fit rolls over, one larger than a whole
    /// segment grows it. Everything comes back after a restart, the zeros
    /// read as a clean end (nothing in corrupt/), and no preparation is
    /// left in tmp/.
    #[tokio::test]
    async fn segments_are_preallocated_and_roll_over() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path()).unwrap();
        let body = vec![b'a'; 100 * 1024];
        let mut segs = Vec::new();
        for i in 0..12 {
            match spool.store(&record::sample(&format!("m{i}")), &body).await.unwrap() {
                Location::Segment { seg, .. } => segs.push(seg),
                l => panic!("{l:?}"),
            }
        }
        // ten 100 KiB records fill the 1 MiB segment; the eleventh rolls over
        assert!(segs[..10].iter().all(|s| *s == segs[0]), "{segs:?}");
        assert!(segs[10..].iter().all(|s| *s == segs[0] + 1), "{segs:?}");
        let first = spool.seg_path(segs[0], "seg");
        assert_eq!(std::fs::metadata(&first).unwrap().len(), FIRST_SEGMENT_BYTES);
        assert_eq!(
            std::fs::metadata(spool.seg_path(segs[0] + 1, "seg")).unwrap().len(),
            SEGMENT_BYTES
        );
        // bigger than a whole segment: written anyway, the file grows
        let big = vec![b'b'; SEGMENT_BYTES as usize + 1024];
        let l = spool.store(&record::sample("big"), &big).await.unwrap();
        let Location::Segment { seg: big_seg, .. } = l else {
            panic!("{l:?}")
        };
        assert_eq!(big_seg, segs[0] + 2);
        assert_eq!(spool.read_body("big", l).unwrap(), big);
        drop(spool);
        assert!(dir_is_empty(&dir.path().join("tmp")));

        let (_spool, rec) = Spool::open(dir.path()).unwrap();
        let ids = recovered_ids(&rec);
        let want: Vec<String> = (0..12).map(|i| format!("m{i}")).chain(["big".to_string()]).collect();
        assert_eq!(ids, want);
        assert!(dir_is_empty(&dir.path().join("corrupt")));
    }

    /// A group commit waits for a message another session is still
    /// receiving (one fsync for both), is woken the moment it arrives (not
    /// at the end of the delay), and never waits when nothing is expected.
    #[tokio::test]
    async fn group_commit_waits_for_expected_messages_only() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path()).unwrap();
        spool.set_commit_delay(Duration::from_secs(30));
        // nothing expected: no wait
        let t0 = Instant::now();
        spool.store(&record::sample("alone"), b"x\r\n").await.unwrap();
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());

        // b is being received: a's commit waits for it (and for c, which
        // arrives first: not the last expected, the writer keeps waiting)
        let b_coming = spool.expect();
        let c_coming = spool.expect();
        let s2 = Arc::clone(&spool);
        let a = tokio::spawn(async move { s2.store(&record::sample("a"), b"a\r\n").await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!a.is_finished(), "a was committed without waiting for b");
        let s2 = Arc::clone(&spool);
        let c = tokio::spawn(async move { s2.store_expected(&record::sample("c"), b"c\r\n", Some(&c_coming)).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!a.is_finished() && !c.is_finished(), "committed before b arrived");
        let t0 = Instant::now();
        let lb = spool
            .store_expected(&record::sample("b"), b"b\r\n", Some(&b_coming))
            .await
            .unwrap();
        let la = a.await.unwrap().unwrap();
        c.await.unwrap().unwrap();
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        // one batch: one fsync for a, c and b, in one segment
        assert_eq!(spool.batches.load(Ordering::Relaxed), 2, "alone, then a + c + b");
        let seg = |l: Location| match l {
            Location::Segment { seg, .. } => seg,
            Location::File => panic!("{l:?}"),
        };
        assert_eq!(seg(la), seg(lb));
        drop(b_coming); // already arrived: counts once

        // an expected message whose transaction fails releases the writer
        let e_coming = spool.expect();
        let s2 = Arc::clone(&spool);
        let d = tokio::spawn(async move { s2.store(&record::sample("d"), b"d\r\n").await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!d.is_finished());
        drop(e_coming);
        let t0 = Instant::now();
        d.await.unwrap().unwrap();
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert_eq!(spool.intake.expected.load(Ordering::Relaxed), 0);
        assert_eq!(spool.batches.load(Ordering::Relaxed), 3);
    }
}
