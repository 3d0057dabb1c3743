//! The appending side of the trace files: the current hour's file, the
//! framed lines not yet written to it, and where the next line will start.
//!
//! Lines are collected in memory and written with one positional write per
//! batch (`flush`, or when the buffer passes [`WRITE_AT`]). Nothing is
//! fsynced: the trace is diagnostic, and a crash loses at most the batch
//! in flight (the page cache survives a process crash; a power loss may
//! take more). A failed write keeps its bytes for the next try, up to
//! [`KEEP_ON_ERROR`]; past that they are dropped and the lines they held
//! are lost (a later line may then take their place, which readers catch
//! by checking the message id of every line they follow).
//!
//! Trust boundary: writes only files named by [`file_name`] in its own
//! directory; the bytes are framed event lines from the events writer.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use super::segment::{Loc, file_name, frame, open_for_append};

/// Buffered bytes that trigger a write without waiting for `flush`.
pub const WRITE_AT: usize = 1 << 20;

/// Unwritten bytes kept across failed writes before they are dropped.
pub const KEEP_ON_ERROR: usize = 8 << 20;

pub struct Appender {
    dir: PathBuf,
    hour: Option<u32>,
    file: Option<File>,
    /// Bytes in the file: the next write goes there.
    written: u64,
    buf: Vec<u8>,
    /// The last write failed (errors are logged once per failing spell).
    failing: bool,
}

impl Appender {
    pub fn new(dir: PathBuf) -> Self {
        Appender {
            dir,
            hour: None,
            file: None,
            written: 0,
            buf: Vec::new(),
            failing: false,
        }
    }

    /// The hour whose file is current.
    pub fn hour(&self) -> Option<u32> {
        self.hour
    }

    /// Make `hour`'s file the current one (written out first). Callers
    /// never go back in time: they pass the latest hour they have seen.
    pub fn roll(&mut self, hour: u32) -> io::Result<()> {
        if self.hour == Some(hour) && self.file.is_some() {
            return Ok(());
        }
        if let Err(e) = self.write_out() {
            tracing::error!(dir = %self.dir.display(), error = %e, "cannot write trace events; dropping them");
        }
        self.buf.clear();
        self.file = None;
        self.hour = Some(hour);
        let (file, len) = open_for_append(&self.dir.join(file_name(hour)))?;
        self.file = Some(file);
        self.written = len;
        Ok(())
    }

    /// Where the next pushed line will start; `None` without a file.
    pub fn next_loc(&self) -> Option<Loc> {
        self.file.as_ref()?;
        Loc::new(self.hour?, self.written + self.buf.len() as u64)
    }

    /// Queue one framed line (see [`frame`]).
    pub fn push(&mut self, prev: Option<Loc>, event: &[u8]) {
        frame(&mut self.buf, prev, event);
    }

    /// Bytes waiting for a write.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Write what is buffered to the current file.
    pub fn write_out(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let Some(file) = &self.file else {
            self.buf.clear();
            return Ok(());
        };
        match file.write_all_at(&self.buf, self.written) {
            Ok(()) => {
                self.written += self.buf.len() as u64;
                self.buf.clear();
                if self.buf.capacity() > 2 * WRITE_AT {
                    self.buf.shrink_to(WRITE_AT);
                }
                if self.failing {
                    self.failing = false;
                    tracing::info!(dir = %self.dir.display(), "trace events are written again");
                }
                Ok(())
            }
            Err(e) => {
                if self.buf.len() > KEEP_ON_ERROR {
                    self.buf.clear();
                }
                if !self.failing {
                    self.failing = true;
                    tracing::error!(dir = %self.dir.display(), error = %e, "cannot write trace events");
                }
                Err(e)
            }
        }
    }

    /// The line at `loc` if it is still in the buffer (not yet written).
    /// `None` when it is in a file (read it there) or nowhere.
    pub fn buffered_line(&self, loc: Loc) -> Option<Vec<u8>> {
        if Some(loc.hour()) != self.hour || loc.offset() < self.written {
            return None;
        }
        let start = usize::try_from(loc.offset() - self.written).ok()?;
        let rest = self.buf.get(start..)?;
        let end = memchr::memchr(b'\n', rest)?;
        Some(rest[..end].to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_readable_before_and_after_the_write() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Appender::new(dir.path().to_path_buf());
        assert!(a.next_loc().is_none());
        a.roll(500_000).unwrap();
        let l1 = a.next_loc().unwrap();
        a.push(None, br#"{"a":1}"#);
        let l2 = a.next_loc().unwrap();
        a.push(Some(l1), br#"{"a":2}"#);
        assert_eq!(l1.offset(), 0);
        let want = format!(
            r#"{{"prev":[{},0],"ev":{{"a":2}}}}"#,
            super::super::clock::stem(500_000)
        )
        .into_bytes();
        assert!(a.buffered_line(l2).unwrap() == want);
        a.write_out().unwrap();
        assert!(a.buffered_line(l2).is_none());
        let path = dir.path().join(file_name(500_000));
        let f = File::open(&path).unwrap();
        assert!(super::super::segment::read_line_at(&f, l2.offset()).unwrap().unwrap() == want);
        // Reopening continues after what is there.
        let mut b = Appender::new(dir.path().to_path_buf());
        b.roll(500_000).unwrap();
        assert!(b.next_loc().unwrap().offset() > l2.offset());
    }
}
