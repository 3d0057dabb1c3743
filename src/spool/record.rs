//! What the spool stores: the envelope with per-recipient delivery state,
//! and the on-disk record framing.
//!
//! Segment: a [`SEGMENT_HEADER`]-byte header block (`SGS1` | u64 LE tag |
//! u32 LE CRC-32 of the 12 bytes before it | zeros), then records. The tag
//! is random, drawn each time a file is put in place as a segment, and
//! written and fsynced before the file enters `seg/`.
//!
//! Record (`SGR2`): `SGR2` | u32 LE payload length | u32 LE CRC-32 of
//! payload | u64 LE tag | u32 LE CRC-32 of the 20 bytes before it |
//! payload; payload: u32 LE header length | header (JSON [`Envelope`]) |
//! body. A record belongs to a segment only if it carries the segment's
//! tag: records left over from an earlier use of the same file (a recycled
//! segment) carry an older one, and a record-shaped string inside a
//! message body cannot carry it (the tag is random and never leaves the
//! spool). Records in files of their own carry 0. The header CRC is
//! separate so that the writer can stamp the tag on a record encoded before
//! the segment was known without hashing the payload again.
//!
//! Segments of an older sendguard have no header and hold `SGR1` records
//! (12-byte header, no tag); they are still read. A record whose magic,
//! length or CRCs do not match is never delivered (torn write at a crash,
//! or corruption).

use serde::{Deserialize, Serialize};

use crate::events::ReplyRecord;

pub const MAGIC: &[u8; 4] = b"SGR2";
pub const RECORD_HEADER: usize = 24;
pub const SEGMENT_MAGIC: &[u8; 4] = b"SGS1";
/// Records of a segment start here.
pub const SEGMENT_HEADER: u64 = 4096;
/// The framing written before tags (read, never written).
const MAGIC_V1: &[u8; 4] = b"SGR1";
const RECORD_HEADER_V1: usize = 12;
/// Upper bound on one record, so a corrupt length cannot make us allocate
/// gigabytes during recovery.
pub const MAX_RECORD: usize = 1 << 30;
/// Attempts kept per recipient in the spool (the events log has them all).
pub const MAX_HISTORY: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RcptStatus {
    /// Not yet delivered; `attempts > 0` means it was deferred.
    Pending,
    Delivered,
    Bounced,
    Expired,
}

impl RcptStatus {
    pub fn is_final(self) -> bool {
        self != RcptStatus::Pending
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub at_ms: u64,
    /// `delivered`, `deferred`, `bounced` or `expired`.
    pub outcome: String,
    pub reply: ReplyRecord,
    /// Failure category of the reply (absent for delivered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<crate::classify::Category>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RcptState {
    pub addr: String,
    pub status: RcptStatus,
    pub attempts: u32,
    /// Unix ms of the next attempt (0 = as soon as possible).
    pub next_attempt_ms: u64,
    #[serde(default)]
    pub history: Vec<Attempt>,
}

impl RcptState {
    pub fn new(addr: String) -> Self {
        RcptState {
            addr,
            status: RcptStatus::Pending,
            attempts: 0,
            next_attempt_ms: 0,
            history: Vec::new(),
        }
    }

    pub fn record(&mut self, a: Attempt) {
        if self.history.len() >= MAX_HISTORY {
            self.history.remove(0);
        }
        self.history.push(a);
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub id: String,
    pub received_at_ms: u64,
    pub tenant: String,
    #[serde(default)]
    pub user: Option<String>,
    pub peer: String,
    pub helo: String,
    #[serde(default)]
    pub tls: Option<String>,
    /// Envelope sender; empty for the null reverse-path.
    pub mail_from: String,
    pub smtputf8: bool,
    /// Body has octets above 127 (needs 8BITMIME upstream).
    pub eightbit: bool,
    pub size: usize,
    pub rcpts: Vec<RcptState>,
}

impl Envelope {
    pub fn is_complete(&self) -> bool {
        self.rcpts.iter().all(|r| r.status.is_final())
    }
}

/// Frame an envelope and body as one record (tag 0; see [`set_tag`]).
pub fn encode(env: &Envelope, body: &[u8]) -> Vec<u8> {
    frame(&serde_json::to_vec(env).expect("envelope serializes"), body)
}

/// A record of this header (JSON envelope) and body, tag 0.
fn frame(header: &[u8], body: &[u8]) -> Vec<u8> {
    let payload_len = 4 + header.len() + body.len();
    let mut out = Vec::with_capacity(RECORD_HEADER + payload_len);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(payload_len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 16]);
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(header);
    out.extend_from_slice(body);
    let crc = crc32fast::hash(&out[RECORD_HEADER..]);
    out[8..12].copy_from_slice(&crc.to_le_bytes());
    set_tag(&mut out, 0);
    out
}

/// Stamp the tag of the segment a record is written into.
pub fn set_tag(record: &mut [u8], tag: u64) {
    record[12..20].copy_from_slice(&tag.to_le_bytes());
    let hcrc = crc32fast::hash(&record[..20]);
    record[20..24].copy_from_slice(&hcrc.to_le_bytes());
}

#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than the record claims: a torn tail.
    Truncated,
    /// Bad magic, CRC, lengths or header.
    Corrupt(&'static str),
}

impl DecodeError {
    /// The payload does not match its checksum (what a write cut short
    /// leaves, unlike a payload that matches but does not parse).
    pub fn checksum_failed(&self) -> bool {
        *self == DecodeError::Corrupt(CHECKSUM_MISMATCH)
    }
}

const CHECKSUM_MISMATCH: &str = "checksum mismatch";

/// A record header: its own length, the payload's length and CRC, and the
/// tag (`None` in the older framing, which has none).
struct Header {
    size: usize,
    len: usize,
    crc: u32,
    tag: Option<u64>,
}

fn parse_header(buf: &[u8]) -> Result<Header, DecodeError> {
    if buf.len() < 4 {
        return Err(DecodeError::Truncated);
    }
    let size = match &buf[..4] {
        m if m == MAGIC => RECORD_HEADER,
        m if m == MAGIC_V1 => RECORD_HEADER_V1,
        _ => return Err(DecodeError::Corrupt("bad magic")),
    };
    if buf.len() < size {
        return Err(DecodeError::Truncated);
    }
    let tag = if size == RECORD_HEADER {
        let hcrc = u32::from_le_bytes(buf[20..24].try_into().unwrap());
        if crc32fast::hash(&buf[..20]) != hcrc {
            return Err(DecodeError::Corrupt("header checksum mismatch"));
        }
        Some(u64::from_le_bytes(buf[12..20].try_into().unwrap()))
    } else {
        None
    };
    let len = u32::from_le_bytes(buf[4..8].try_into().unwrap()) as usize;
    if len > MAX_RECORD {
        return Err(DecodeError::Corrupt("record length out of range"));
    }
    let crc = u32::from_le_bytes(buf[8..12].try_into().unwrap());
    Ok(Header { size, len, crc, tag })
}

/// A decoded record.
#[derive(Debug)]
pub struct Decoded {
    pub env: Envelope,
    pub body: Vec<u8>,
    /// Bytes the record takes, header included.
    pub len: usize,
    /// The tag of the segment it was written into (`None`: older framing).
    pub tag: Option<u64>,
}

/// Decode one whole record at the front of `buf`.
pub fn decode(buf: &[u8]) -> Result<Decoded, DecodeError> {
    let h = parse_header(buf)?;
    let end = h.size + h.len;
    if buf.len() < end {
        return Err(DecodeError::Truncated);
    }
    let payload = &buf[h.size..end];
    if crc32fast::hash(payload) != h.crc {
        return Err(DecodeError::Corrupt(CHECKSUM_MISMATCH));
    }
    if payload.len() < 4 {
        return Err(DecodeError::Corrupt("short payload"));
    }
    let hlen = u32::from_le_bytes(payload[..4].try_into().unwrap()) as usize;
    if 4 + hlen > payload.len() {
        return Err(DecodeError::Corrupt("header length out of range"));
    }
    let env: Envelope =
        serde_json::from_slice(&payload[4..4 + hlen]).map_err(|_| DecodeError::Corrupt("bad header"))?;
    Ok(Decoded {
        env,
        body: payload[4 + hlen..].to_vec(),
        len: end,
        tag: h.tag,
    })
}

/// Where the next whole record tagged `tag` starts in `buf`, after its
/// first byte. Recovery asks this past a record that does not decode: if
/// there is one, the bad record is damage in the middle of the segment and
/// the scan goes on from there; if not, it was the last record written.
pub fn next_record_of(buf: &[u8], tag: u64) -> Option<usize> {
    memchr::memmem::find_iter(buf.get(1..)?, MAGIC)
        .map(|i| i + 1)
        .find(|&i| record_tag(&buf[i..]) == Some(tag) && decode(&buf[i..]).is_ok())
}

/// The tag of the record header at the front of `buf`, if there is a whole
/// and intact one of the current framing (the payload is not checked).
pub fn record_tag(buf: &[u8]) -> Option<u64> {
    parse_header(buf).ok().and_then(|h| h.tag)
}

/// The header block of a segment with this tag.
pub fn segment_header(tag: u64) -> Vec<u8> {
    let mut h = vec![0u8; SEGMENT_HEADER as usize];
    h[..4].copy_from_slice(SEGMENT_MAGIC);
    h[4..12].copy_from_slice(&tag.to_le_bytes());
    let crc = crc32fast::hash(&h[..12]);
    h[12..16].copy_from_slice(&crc.to_le_bytes());
    h
}

/// How a segment file starts.
#[derive(Debug, PartialEq, Eq)]
pub enum SegmentStart {
    /// A header: records start at [`SEGMENT_HEADER`] and carry this tag.
    Tagged(u64),
    /// An older sendguard's segment: `SGR1` records from offset 0.
    Untagged,
    /// Nothing written (empty or zeros): no records.
    Empty,
}

pub fn parse_segment_start(buf: &[u8]) -> Result<SegmentStart, DecodeError> {
    if buf.starts_with(SEGMENT_MAGIC) {
        if buf.len() < 16 {
            return Err(DecodeError::Truncated);
        }
        if crc32fast::hash(&buf[..12]) != u32::from_le_bytes(buf[12..16].try_into().unwrap()) {
            return Err(DecodeError::Corrupt("segment header checksum mismatch"));
        }
        Ok(SegmentStart::Tagged(u64::from_le_bytes(buf[4..12].try_into().unwrap())))
    } else if buf.starts_with(MAGIC_V1) {
        Ok(SegmentStart::Untagged)
    } else if buf.iter().take(SEGMENT_HEADER as usize).all(|&b| b == 0) {
        Ok(SegmentStart::Empty)
    } else {
        Err(DecodeError::Corrupt("bad segment header"))
    }
}

/// The framing before tags, as an older sendguard wrote it.
#[cfg(test)]
pub(crate) fn encode_v1(env: &Envelope, body: &[u8]) -> Vec<u8> {
    let header = serde_json::to_vec(env).unwrap();
    let mut payload = (header.len() as u32).to_le_bytes().to_vec();
    payload.extend_from_slice(&header);
    payload.extend_from_slice(body);
    let mut out = MAGIC_V1.to_vec();
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// A record with tag `tag` whose checksums pass but whose envelope is not
/// valid JSON.
#[cfg(test)]
pub(crate) fn encode_unparsable(tag: u64) -> Vec<u8> {
    let mut out = frame(b"{not json", b"");
    set_tag(&mut out, tag);
    out
}

#[cfg(test)]
pub(crate) fn sample(id: &str) -> Envelope {
    Envelope {
        id: id.into(),
        received_at_ms: 1,
        tenant: "t".into(),
        user: Some("u".into()),
        peer: "127.0.0.1:1".into(),
        helo: "h".into(),
        tls: None,
        mail_from: "a@b.example".into(),
        smtputf8: false,
        eightbit: false,
        size: 5,
        rcpts: vec![RcptState::new("r@d.example".into())],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_damage() {
        let env = sample("m1");
        let mut rec = encode(&env, b"hello");
        let d = decode(&rec).unwrap();
        assert_eq!(
            (d.env, d.body.as_slice(), d.len, d.tag),
            (env.clone(), &b"hello"[..], rec.len(), Some(0))
        );
        set_tag(&mut rec, 0x1234);
        let d = decode(&rec).unwrap();
        assert_eq!((d.env.id.as_str(), d.tag), ("m1", Some(0x1234)));
        // every truncation is detected as such
        for cut in 0..rec.len() {
            assert_eq!(decode(&rec[..cut]).unwrap_err(), DecodeError::Truncated, "cut {cut}");
        }
        // every single-byte flip after the magic, header included, is
        // caught by one of the CRCs
        for i in 4..rec.len() {
            let mut bad = rec.clone();
            bad[i] ^= 0x40;
            assert!(matches!(decode(&bad), Err(DecodeError::Corrupt(_))), "flip at {i}");
        }
        let mut bad = rec.clone();
        bad[0] = b'X';
        assert_eq!(decode(&bad).unwrap_err(), DecodeError::Corrupt("bad magic"));
    }

    #[test]
    fn older_framing_is_read() {
        let rec = encode_v1(&sample("old"), b"body");
        let d = decode(&rec).unwrap();
        assert_eq!(
            (d.env.id.as_str(), d.body.as_slice(), d.len, d.tag),
            ("old", &b"body"[..], rec.len(), None)
        );
        let mut bad = rec.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(decode(&bad).unwrap_err(), DecodeError::Corrupt("checksum mismatch"));
    }

    #[test]
    fn next_record_is_found_by_tag() {
        let mut a = encode(&sample("a"), b"x");
        let mut b = encode(&sample("b"), b"y");
        set_tag(&mut a, 7);
        set_tag(&mut b, 7);
        let mut buf = a.clone();
        buf[30] ^= 1; // damage a
        buf.extend_from_slice(&b);
        assert_eq!(next_record_of(&buf, 7), Some(a.len()));
        // b from an earlier use of the file does not count
        assert_eq!(next_record_of(&buf, 8), None);
        // nor do zeros, nor a torn copy of b
        let mut torn = a.clone();
        torn.extend_from_slice(&b[..b.len() - 1]);
        torn.extend_from_slice(&[0; 100]);
        assert_eq!(next_record_of(&torn, 7), None);
        // nor a record of the older framing
        let mut old = a;
        old.extend_from_slice(&encode_v1(&sample("c"), b"z"));
        assert_eq!(next_record_of(&old, 7), None);
    }

    #[test]
    fn segment_start() {
        let h = segment_header(0xfeed);
        assert_eq!(h.len() as u64, SEGMENT_HEADER);
        assert_eq!(parse_segment_start(&h), Ok(SegmentStart::Tagged(0xfeed)));
        let mut bad = h.clone();
        bad[5] ^= 1;
        assert!(matches!(parse_segment_start(&bad), Err(DecodeError::Corrupt(_))));
        assert_eq!(parse_segment_start(&h[..10]), Err(DecodeError::Truncated));
        assert_eq!(
            parse_segment_start(&encode_v1(&sample("c"), b"z")),
            Ok(SegmentStart::Untagged)
        );
        assert_eq!(parse_segment_start(&[]), Ok(SegmentStart::Empty));
        assert_eq!(parse_segment_start(&[0; 8192]), Ok(SegmentStart::Empty));
        assert!(parse_segment_start(b"garbage").is_err());
    }
}
