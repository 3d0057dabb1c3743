//! Trace files: naming (`YYYYMMDDHH.jsonl`, one per UTC hour), the framed
//! line (`{"prev":[YYYYMMDDHH,offset]|null,"ev":<event>}`), where a line
//! is ([`Loc`]), and the three ways to touch a file: scan it line by line,
//! read one line at an offset, open it for appending after cutting a torn
//! tail.
//!
//! Trust boundary: the files are our own but may be damaged (a crash
//! mid-write, a power loss leaving zeros). Nothing here panics on their
//! content: a line that does not parse is the caller's to skip, a line
//! without its newline is torn, a line longer than [`MAX_LINE`] is not
//! read. File names come only from [`file_name`] of an hour number, never
//! from event or request text.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::Deserialize;

use super::clock::{from_stem, stem};

/// Longest framed line written or read back (a `received` event with a
/// thousand long recipients is well under it).
pub const MAX_LINE: usize = 4 << 20;

/// Where a line starts: the file's hour and the byte offset in it, packed
/// in 64 bits (24 + 40), ordered as the lines were written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Loc(u64);

impl Loc {
    pub const MAX_OFFSET: u64 = (1 << 40) - 1;

    /// `None` past year 3800 or past a terabyte in one file.
    pub fn new(hour: u32, offset: u64) -> Option<Loc> {
        (hour < 1 << 24 && offset <= Self::MAX_OFFSET).then_some(Loc((u64::from(hour) << 40) | offset))
    }
    pub fn hour(self) -> u32 {
        (self.0 >> 40) as u32
    }
    pub fn offset(self) -> u64 {
        self.0 & Self::MAX_OFFSET
    }
    pub fn to_bits(self) -> u64 {
        self.0
    }
    pub fn from_bits(b: u64) -> Loc {
        Loc(b)
    }
}

/// The file of an hour: `2026112304.jsonl`.
pub fn file_name(hour: u32) -> String {
    format!("{:010}.jsonl", stem(hour))
}

/// The hour of a trace file name; `None` for any other name.
pub fn parse_file_name(name: &str) -> Option<u32> {
    let s = name.strip_suffix(".jsonl")?;
    if s.len() != 10 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    from_stem(s.parse().ok()?)
}

/// Append the framed line for `event` (one JSON object, no newline) to
/// `out`: `{"prev":[2026112304,1234],"ev":{...}}\n`, `prev` being the
/// message's previous line (`null` for its first).
pub fn frame(out: &mut Vec<u8>, prev: Option<Loc>, event: &[u8]) {
    match prev {
        Some(p) => {
            use std::io::Write;
            let _ = write!(out, "{{\"prev\":[{},{}],\"ev\":", stem(p.hour()), p.offset());
        }
        None => out.extend_from_slice(b"{\"prev\":null,\"ev\":"),
    }
    out.extend_from_slice(event);
    out.extend_from_slice(b"}\n");
}

#[derive(Deserialize)]
struct Framed {
    prev: Option<(u64, u64)>,
    ev: serde_json::Value,
}

/// A framed line read back: the previous line of the message (`None` at
/// its first, or when the pointer is not a valid place) and the event.
pub fn unframe(line: &[u8]) -> Option<(Option<Loc>, serde_json::Value)> {
    let f: Framed = serde_json::from_slice(line).ok()?;
    let prev = f.prev.and_then(|(s, off)| Loc::new(from_stem(s)?, off));
    Some((prev, f.ev))
}

/// The line starting at `offset` (without its newline); `None` when the
/// file ends before a newline or the line is longer than [`MAX_LINE`].
pub fn read_line_at(file: &File, offset: u64) -> io::Result<Option<Vec<u8>>> {
    let mut out = Vec::new();
    let mut chunk = vec![0u8; 2048];
    let mut pos = offset;
    loop {
        let n = file.read_at(&mut chunk, pos)?;
        if n == 0 {
            return Ok(None);
        }
        if let Some(i) = memchr::memchr(b'\n', &chunk[..n]) {
            if out.len() + i > MAX_LINE {
                return Ok(None);
            }
            out.extend_from_slice(&chunk[..i]);
            return Ok(Some(out));
        }
        out.extend_from_slice(&chunk[..n]);
        pos += n as u64;
        if out.len() > MAX_LINE {
            return Ok(None);
        }
        if chunk.len() < 64 * 1024 {
            chunk.resize(chunk.len() * 4, 0);
        }
    }
}

/// Call `each(offset, line)` for every whole line of `path` (newline cut
/// off; lines longer than [`MAX_LINE`] skipped) and return the length of
/// the whole-line prefix: a last line without a newline is torn and not
/// passed on.
pub fn scan(path: &Path, mut each: impl FnMut(u64, &[u8])) -> io::Result<u64> {
    let mut r = BufReader::with_capacity(1 << 20, File::open(path)?);
    let mut line = Vec::with_capacity(4096);
    let mut offset = 0u64;
    loop {
        line.clear();
        let n = (&mut r).take(MAX_LINE as u64 + 1).read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(offset);
        }
        if line.last() != Some(&b'\n') {
            if n > MAX_LINE {
                // Too long to keep: skip to its end.
                let rest = skip_line(&mut r)?;
                if let Some(rest) = rest {
                    offset += n as u64 + rest;
                    continue;
                }
            }
            return Ok(offset);
        }
        each(offset, &line[..n - 1]);
        offset += n as u64;
    }
}

/// Skip to just past the next newline: the bytes skipped, `None` at end of file.
fn skip_line(r: &mut impl BufRead) -> io::Result<Option<u64>> {
    let mut skipped = 0u64;
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Ok(None);
        }
        if let Some(i) = memchr::memchr(b'\n', buf) {
            r.consume(i + 1);
            return Ok(Some(skipped + i as u64 + 1));
        }
        let n = buf.len();
        r.consume(n);
        skipped += n as u64;
    }
}

/// Open (creating) `path` to append to, after cutting anything after its
/// last newline (a torn line would otherwise swallow the next one).
/// Returns the file and its length.
pub fn open_for_append(path: &Path) -> io::Result<(File, u64)> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)?;
    let len = file.metadata()?.len();
    let mut end = len;
    let mut chunk = vec![0u8; 64 * 1024];
    let keep = loop {
        if end == 0 {
            break 0;
        }
        let start = end.saturating_sub(chunk.len() as u64);
        let n = (end - start) as usize;
        let mut f = &file;
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(&mut chunk[..n])?;
        if let Some(i) = memchr::memrchr(b'\n', &chunk[..n]) {
            break start + i as u64 + 1;
        }
        end = start;
    };
    if keep < len {
        file.set_len(keep)?;
    }
    Ok((file, keep))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loc_packs_and_orders() {
        let a = Loc::new(500_000, 12).unwrap();
        assert_eq!((a.hour(), a.offset()), (500_000, 12));
        assert_eq!(Loc::from_bits(a.to_bits()), a);
        assert!(Loc::new(500_000, 13).unwrap() > a);
        assert!(Loc::new(500_001, 0).unwrap() > a);
        assert!(Loc::new(1 << 24, 0).is_none());
        assert!(Loc::new(1, Loc::MAX_OFFSET + 1).is_none());
        assert_eq!(Loc::new(1, Loc::MAX_OFFSET).unwrap().offset(), Loc::MAX_OFFSET);
    }

    #[test]
    fn names() {
        let h = from_stem(2026112304).unwrap();
        assert_eq!(file_name(h), "2026112304.jsonl");
        assert_eq!(parse_file_name("2026112304.jsonl"), Some(h));
        for bad in [
            "2026112304.json",
            "202611230.jsonl",
            "2026112324.jsonl",
            "lock",
            "../2026112304.jsonl",
            "+026112304.jsonl",
        ] {
            assert_eq!(parse_file_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn frame_roundtrip() {
        let ev = br#"{"id":"e1","event":"received","message_id":"m1"}"#;
        let mut out = Vec::new();
        frame(&mut out, None, ev);
        let prev = Loc::new(from_stem(2026112304).unwrap(), 77).unwrap();
        frame(&mut out, Some(prev), ev);
        let text = String::from_utf8(out.clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            r#"{"prev":null,"ev":{"id":"e1","event":"received","message_id":"m1"}}"#
        );
        assert_eq!(
            lines[1],
            r#"{"prev":[2026112304,77],"ev":{"id":"e1","event":"received","message_id":"m1"}}"#
        );
        let (p, v) = unframe(lines[1].as_bytes()).unwrap();
        assert_eq!(p, Some(prev));
        assert_eq!(v["message_id"], "m1");
        assert_eq!(unframe(lines[0].as_bytes()).unwrap().0, None);
        // A pointer to a place that cannot exist ends the chain.
        assert_eq!(unframe(br#"{"prev":[2026023012,5],"ev":{}}"#).unwrap().0, None);
        assert!(unframe(b"\0\0\0{").is_none());
    }

    #[test]
    fn scan_read_and_repair() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.jsonl");
        std::fs::write(&path, b"one\n\ntwo two\nthr").unwrap();
        let mut seen = Vec::new();
        let whole = scan(&path, |off, l| {
            seen.push((off, String::from_utf8_lossy(l).into_owned()))
        })
        .unwrap();
        assert_eq!(whole, 13);
        assert_eq!(seen, vec![(0, "one".into()), (4, "".into()), (5, "two two".into())]);
        let f = File::open(&path).unwrap();
        assert_eq!(read_line_at(&f, 5).unwrap().unwrap(), b"two two");
        assert_eq!(read_line_at(&f, 13).unwrap(), None);
        let (_, len) = open_for_append(&path).unwrap();
        assert_eq!(len, 13);
        assert_eq!(std::fs::read(&path).unwrap(), b"one\n\ntwo two\n");
        let (_, len) = open_for_append(&dir.path().join("new.jsonl")).unwrap();
        assert_eq!(len, 0);
        std::fs::write(&path, b"no newline at all").unwrap();
        assert_eq!(open_for_append(&path).unwrap().1, 0);
    }

    #[test]
    fn long_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.jsonl");
        let mut data = vec![b'a'; 100_000];
        data.push(b'\n');
        data.extend(vec![b'b'; MAX_LINE + 10]);
        data.extend_from_slice(b"\nc\n");
        std::fs::write(&path, &data).unwrap();
        let mut seen = Vec::new();
        let whole = scan(&path, |off, l| seen.push((off, l.len()))).unwrap();
        assert_eq!(whole, data.len() as u64);
        assert_eq!(seen, vec![(0, 100_000), (data.len() as u64 - 2, 1)]);
        let f = File::open(&path).unwrap();
        assert_eq!(read_line_at(&f, 0).unwrap().unwrap().len(), 100_000);
        assert!(read_line_at(&f, 100_001).unwrap().is_none());
    }
}
