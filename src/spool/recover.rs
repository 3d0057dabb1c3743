//! Start-up scan of the spool: every message with a recipient not yet final
//! comes back; torn or corrupt records never do.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::Path;

use tracing::{error, warn};

use super::record::{self, DecodeError, SegmentStart};
use super::{Location, Recovered};

pub(super) struct Scan {
    pub messages: Vec<Recovered>,
    /// Per segment: messages still needing it, records in it.
    pub live_per_segment: HashMap<u64, (usize, usize)>,
    pub dead_segments: Vec<u64>,
    pub max_segment: Option<u64>,
}

/// Read-only scan (for `sendguard queue`): changes nothing on disk.
pub fn scan(dir: &Path) -> io::Result<Vec<Recovered>> {
    Ok(scan_inner(dir, false)?.messages)
}

/// Scan for start-up: also moves corrupt files aside and removes files of
/// completed messages.
pub(super) fn scan_for_recovery(dir: &Path) -> io::Result<Scan> {
    scan_inner(dir, true)
}

fn scan_inner(dir: &Path, repair: bool) -> io::Result<Scan> {
    let mut messages = Vec::new();
    let mut in_files = HashSet::new();
    let msg_dir = dir.join("msg");
    if msg_dir.is_dir() {
        for e in std::fs::read_dir(&msg_dir)? {
            let path = e?.path();
            if path.extension().and_then(|x| x.to_str()) != Some("msg") {
                continue;
            }
            let Some(id) = path.file_stem().and_then(|s| s.to_str()).map(str::to_string) else {
                continue;
            };
            let Some(bytes) = read_unless_gone(&path, repair)? else {
                continue;
            };
            let mut env = match record::decode(&bytes) {
                Ok(d) if d.env.id == id => d.env,
                other => {
                    error!(path = %path.display(), result = ?other.map(|_| ()), "corrupt spool file; moved to corrupt/");
                    if repair {
                        let _ = std::fs::rename(&path, dir.join("corrupt").join(path.file_name().unwrap()));
                    }
                    continue;
                }
            };
            let state_path = path.with_extension("state");
            if let Ok(state) = std::fs::read(&state_path) {
                match serde_json::from_slice::<Vec<record::RcptState>>(&state) {
                    Ok(s) if s.len() == env.rcpts.len() => env.rcpts = s,
                    _ => {
                        warn!(path = %state_path.display(), "unreadable state file; using the state stored with the message")
                    }
                }
            }
            in_files.insert(id.clone());
            if env.is_complete() {
                if repair {
                    let _ = std::fs::remove_file(&path);
                    let _ = std::fs::remove_file(&state_path);
                }
                continue;
            }
            messages.push(Recovered {
                env,
                loc: Location::File,
            });
        }
    }

    // A state file whose message file is gone: left by a crash between the
    // two deletions of a completed message.
    if repair && msg_dir.is_dir() {
        for e in std::fs::read_dir(&msg_dir)? {
            let path = e?.path();
            if path.extension().and_then(|x| x.to_str()) == Some("state") && !path.with_extension("msg").exists() {
                let _ = std::fs::remove_file(&path);
            }
        }
    }

    let mut live_per_segment = HashMap::new();
    let mut dead_segments = Vec::new();
    let mut max_segment = None;
    let seg_dir = dir.join("seg");
    let mut segs: Vec<(u64, bool)> = Vec::new();
    if seg_dir.is_dir() {
        for e in std::fs::read_dir(&seg_dir)? {
            let path = e?.path();
            let (Some(stem), Some(ext)) = (
                path.file_stem().and_then(|s| s.to_str()),
                path.extension().and_then(|x| x.to_str()),
            ) else {
                continue;
            };
            let Ok(seq) = u64::from_str_radix(stem, 16) else {
                continue;
            };
            max_segment = max_segment.max(Some(seq));
            segs.push((seq, ext == "seg"));
        }
    }
    let with_data: HashSet<u64> = segs.iter().filter(|(_, d)| *d).map(|(s, _)| *s).collect();
    // A done log without its segment is left over from a deletion.
    for (seq, is_data) in &segs {
        if !is_data && !with_data.contains(seq) {
            dead_segments.push(*seq);
        }
    }
    let mut data_segs: Vec<u64> = with_data.into_iter().collect();
    data_segs.sort_unstable();
    let last_data_seg = data_segs.last().copied();
    for seq in data_segs {
        let seg_path = seg_dir.join(format!("{seq:016x}.seg"));
        let done: HashSet<String> = std::fs::read_to_string(seg_dir.join(format!("{seq:016x}.done")))
            .map(|s| s.lines().map(str::to_string).collect())
            .unwrap_or_default();
        let Some(bytes) = read_unless_gone(&seg_path, repair)? else {
            continue;
        };
        let newest = Some(seq) == last_data_seg;
        // Damage found: the segment is copied to corrupt/ (and kept if the
        // copy fails).
        let mut damaged = false;
        let (tag, mut offset) = match record::parse_segment_start(&bytes) {
            Ok(SegmentStart::Tagged(t)) => (Some(t), record::SEGMENT_HEADER as usize),
            Ok(SegmentStart::Untagged) => (None, 0),
            Ok(SegmentStart::Empty) => (None, bytes.len()),
            Err(e) => {
                // Never expected: the header is durable before the file
                // enters seg/ and never written again. Without the tag no
                // record can be told from what an earlier use of the file
                // left, so none is delivered.
                error!(segment = %seg_path.display(), error = ?e, "damaged segment header; none of its records is delivered and the segment is copied to corrupt/");
                damaged = true;
                (None, bytes.len())
            }
        };
        let mut live = 0usize;
        let mut records = 0usize;
        // Records whose message has its own file in msg/ but whose done
        // line is missing (a crash between the move-out and that line).
        let mut moved_out: Vec<String> = Vec::new();
        while offset < bytes.len() {
            let rest = &bytes[offset..];
            match record::decode(rest) {
                Ok(d) if d.tag == tag => {
                    records += 1;
                    let env = d.env;
                    if in_files.contains(&env.id) && !done.contains(&env.id) {
                        moved_out.push(env.id.clone());
                    }
                    if !done.contains(&env.id) && !in_files.contains(&env.id) && !env.is_complete() {
                        live += 1;
                        messages.push(Recovered {
                            env,
                            loc: Location::Segment {
                                seg: seq,
                                offset: offset as u64,
                                len: d.len as u32,
                            },
                        });
                    }
                    offset += d.len;
                }
                // A record from an earlier use of this file (a recycled
                // segment): the records of this segment end here.
                Ok(_) => break,
                // Only this segment's life writes records with its tag: if
                // one follows, this is damage in the middle (whatever part
                // of the record it hit); skip it and keep the ones after.
                Err(e) if let Some(skip) = tag.and_then(|t| record::next_record_of(rest, t)) => {
                    error!(segment = %seg_path.display(), offset, error = ?e, skipped_bytes = skip, "damaged record skipped; the segment is copied to corrupt/");
                    damaged = true;
                    offset += skip;
                }
                // Zeros (preallocated, never written), what an earlier use
                // of the file left, or a record whose header did not reach
                // the disk before a crash (never acknowledged): the end.
                Err(_) if tag.is_some() && record::record_tag(rest) != tag => break,
                // The last record written, cut short by a crash: only in the
                // newest segment (in an older-framing one only a short
                // record, followed by the end of the file).
                Err(e) if newest && (e == DecodeError::Truncated || (tag.is_some() && e.checksum_failed())) => {
                    warn!(segment = %seg_path.display(), offset, "torn record at the tail of the newest segment (crash during write); it was never acknowledged");
                    if repair {
                        // Cut it off, so that a later start, when this is
                        // no longer the newest segment, finds a clean end.
                        if let Err(e) = truncate_durably(&seg_path, offset as u64) {
                            warn!(segment = %seg_path.display(), error = %e, "cannot cut off the torn record");
                        }
                    }
                    break;
                }
                Err(e) => {
                    error!(segment = %seg_path.display(), offset, error = ?e, "damaged record; the rest of this segment is skipped and the segment copied to corrupt/");
                    damaged = true;
                    break;
                }
            }
        }
        // Their done lines, durable before the start goes on: once the file
        // in msg/ is delivered and deleted, nothing else would stop a later
        // start from bringing the segment's old copy back.
        if repair && !moved_out.is_empty() {
            let log = seg_dir.join(format!("{seq:016x}.done"));
            // Failing that (a full disk), start anyway: the queue drains and
            // frees space; only a later start could bring those copies back.
            if let Err(e) = append_durably(&log, &moved_out) {
                error!(path = %log.display(), error = %e, messages = moved_out.len(), "cannot record moved-out messages in the done log; a later start may deliver them again");
            }
        }
        if damaged && repair {
            let copy = dir.join("corrupt").join(format!("{seq:016x}.seg"));
            if let Err(e) = std::fs::copy(&seg_path, &copy) {
                // Not deleted when its messages are done: it is the only copy.
                error!(segment = %seg_path.display(), error = %e, "cannot copy a damaged segment to corrupt/; it stays in seg/");
                live += 1;
            }
        }
        live_per_segment.insert(seq, (live, records));
    }
    Ok(Scan {
        messages,
        live_per_segment,
        dead_segments,
        max_segment,
    })
}

/// Read a spool file. Only a read-only scan (`sendguard queue` while the
/// server runs) skips one that is gone since the listing (`None`): a
/// message delivered, a segment deleted or recycled meanwhile.
fn read_unless_gone(path: &Path, repair: bool) -> io::Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if !repair && e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn append_durably(path: &Path, ids: &[String]) -> io::Result<()> {
    use std::io::Write;
    let mut text = String::new();
    for id in ids {
        text.push_str(id);
        text.push('\n');
    }
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    if let Some(parent) = path.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

fn truncate_durably(path: &Path, len: u64) -> io::Result<()> {
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.set_len(len)?;
    f.sync_all()
}
