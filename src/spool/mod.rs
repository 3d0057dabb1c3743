//! The durable message store. A message is on disk, fsynced, before the
//! client gets 250; nothing is acknowledged that a crash could lose.
//!
//! Layout under `spool.dir`:
//! - `seg/<n>.seg`: append-only segments. New messages are group-committed
//!   here by one writer thread: every record waiting is written, then one
//!   `fdatasync` covers the whole batch (one fsync for many sessions).
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

/// Segments roll over at this size.
const SEGMENT_BYTES: u64 = 16 * 1024 * 1024;
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
    sealed: bool,
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
        for (seg, live) in &scan.live_per_segment {
            segs.info.insert(
                *seg,
                SegInfo {
                    live: *live,
                    sealed: true,
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
            batches: AtomicU64::new(0),
            segs: Mutex::new(segs),
            _lock: lock,
            metrics,
        });
        // Segments whose messages are all final can go now.
        let empty: Vec<u64> = scan
            .live_per_segment
            .iter()
            .filter(|(_, l)| **l == 0)
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
        let mut file: Option<(File, u64)> = None;
        while let Some(mut batch) = Self::next_batch(intake) {
            if file.as_ref().is_some_and(|(_, size)| *size >= SEGMENT_BYTES) {
                self.seal(seg);
                seg += 1;
                file = None;
            }
            let result = (|| -> io::Result<Vec<Location>> {
                if file.is_none() {
                    file = Some((self.create_segment(seg)?, 0));
                }
                let (f, size) = file.as_mut().expect("segment open");
                let mut locs = Vec::with_capacity(batch.len());
                for c in &batch {
                    locs.push(Location::Segment {
                        seg,
                        offset: *size,
                        len: c.record.len() as u32,
                    });
                    *size += c.record.len() as u64;
                }
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
                    self.segs.lock().unwrap().info.entry(seg).or_default().live += locs.len();
                    for (c, loc) in batch.drain(..).zip(locs) {
                        let _ = c.reply.send(Ok(loc));
                    }
                }
                Err(e) => {
                    // After a failed write or fsync the segment's state is
                    // unknown: nothing in this batch is acknowledged, and the
                    // next batch starts a fresh segment.
                    error!(error = %e, segment = seg, "spool write failed");
                    self.seal(seg);
                    seg += 1;
                    file = None;
                    for c in batch.drain(..) {
                        let _ = c.reply.send(Err(io::Error::new(e.kind(), e.to_string())));
                    }
                }
            }
        }
        self.seal(seg);
    }

    fn create_segment(&self, seg: u64) -> io::Result<File> {
        let f = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(self.seg_path(seg, "seg"))?;
        sync_dir(&self.dir.join("seg"))?;
        Ok(f)
    }

    /// No more records go to `seg`; delete it when its last message is done.
    fn seal(&self, seg: u64) {
        let mut segs = self.segs.lock().unwrap();
        let info = segs.info.entry(seg).or_default();
        info.sealed = true;
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
        for ext in ["seg", "done"] {
            remove_if_exists(&self.seg_path(seg, ext));
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
        let done_path = self.seg_path(seg, "done");
        let line = format!("{id}\n");
        let logged = match segs.done_logs.entry(seg) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut().write_all(line.as_bytes()),
            std::collections::hash_map::Entry::Vacant(v) => OpenOptions::new()
                .create(true)
                .append(true)
                .open(&done_path)
                .and_then(|f| v.insert(f).write_all(line.as_bytes())),
        };
        if let Err(e) = logged {
            warn!(path = %done_path.display(), error = %e, "cannot append to done log");
        }
        let Some(info) = segs.info.get_mut(&seg) else { return };
        info.live = info.live.saturating_sub(1);
        if info.live == 0 && info.sealed {
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
        let (env, body, _) = record::decode(&buf)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("message {id}: {e:?}")))?;
        if env.id != id {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("message {id}: record holds {}", env.id),
            ));
        }
        Ok(body)
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

    /// Two move-outs of one message (two jobs racing with a stale segment
    /// location) must not release its segment entry twice: the segment
    /// would be deleted while another acknowledged message lives only there.
    #[tokio::test]
    async fn double_release_keeps_the_other_message() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path()).unwrap();
        let mut a = record::sample("a");
        let b = record::sample("b");
        let la = spool.store(&a, b"body a\r\n").await.unwrap();
        spool.store(&b, b"body b\r\n").await.unwrap();
        a.rcpts[0].attempts = 1;
        spool.save_state(a.clone(), la, None).await.unwrap();
        spool.save_state(a.clone(), la, None).await.unwrap();
        spool.complete("a", la);
        drop(spool);
        let (_spool, rec) = Spool::open(dir.path()).unwrap();
        let mut ids: Vec<_> = rec.iter().map(|r| r.env.id.clone()).collect();
        ids.sort();
        assert_eq!(ids, ["a", "b"], "b must survive; a lives in its own file");
    }

    #[tokio::test]
    async fn second_process_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_a, _) = Spool::open(dir.path()).unwrap();
        let err = Spool::open(dir.path()).err().expect("locked");
        assert!(err.to_string().contains("in use"), "{err}");
    }

    #[tokio::test]
    async fn torn_tail_is_not_recovered() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path()).unwrap();
        spool.store(&record::sample("whole"), b"x\r\n").await.unwrap();
        spool.store(&record::sample("torn"), b"y\r\n").await.unwrap();
        drop(spool);
        // cut the last record in half, as a crash mid-write would
        let seg = std::fs::read_dir(dir.path().join("seg"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let len = std::fs::metadata(&seg).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len - 10)
            .unwrap();
        let (_spool, rec) = Spool::open(dir.path()).unwrap();
        let ids: Vec<_> = rec.iter().map(|r| r.env.id.as_str()).collect();
        assert_eq!(ids, ["whole"]);
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
