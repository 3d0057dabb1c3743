//! What the spool stores: the envelope with per-recipient delivery state,
//! and the on-disk record framing.
//!
//! Record: `SGR1` | u32 LE payload length | u32 LE CRC-32 of payload | payload,
//! payload: u32 LE header length | header (JSON [`Envelope`]) | body.
//! A record whose magic, length or CRC does not match is never delivered
//! (torn write at a crash, or corruption).

use serde::{Deserialize, Serialize};

use crate::events::ReplyRecord;

pub const MAGIC: &[u8; 4] = b"SGR1";
pub const RECORD_HEADER: usize = 12;
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

/// Frame an envelope and body as one record.
pub fn encode(env: &Envelope, body: &[u8]) -> Vec<u8> {
    let header = serde_json::to_vec(env).expect("envelope serializes");
    let payload_len = 4 + header.len() + body.len();
    let mut out = Vec::with_capacity(RECORD_HEADER + payload_len);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(payload_len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(body);
    let crc = crc32fast::hash(&out[RECORD_HEADER..]);
    out[8..12].copy_from_slice(&crc.to_le_bytes());
    out
}

#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than the record claims: a torn tail.
    Truncated,
    /// Bad magic, CRC, lengths or header.
    Corrupt(&'static str),
}

/// Parse the record header at the front of `buf`: payload length and CRC.
pub fn parse_header(buf: &[u8]) -> Result<(usize, u32), DecodeError> {
    if buf.len() < RECORD_HEADER {
        return Err(DecodeError::Truncated);
    }
    if &buf[..4] != MAGIC {
        return Err(DecodeError::Corrupt("bad magic"));
    }
    let len = u32::from_le_bytes(buf[4..8].try_into().unwrap()) as usize;
    if len > MAX_RECORD {
        return Err(DecodeError::Corrupt("record length out of range"));
    }
    let crc = u32::from_le_bytes(buf[8..12].try_into().unwrap());
    Ok((len, crc))
}

/// Decode one whole record; returns the envelope, the body and the record length.
pub fn decode(buf: &[u8]) -> Result<(Envelope, Vec<u8>, usize), DecodeError> {
    let (len, crc) = parse_header(buf)?;
    let end = RECORD_HEADER + len;
    if buf.len() < end {
        return Err(DecodeError::Truncated);
    }
    let payload = &buf[RECORD_HEADER..end];
    if crc32fast::hash(payload) != crc {
        return Err(DecodeError::Corrupt("checksum mismatch"));
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
    Ok((env, payload[4 + hlen..].to_vec(), end))
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
        let rec = encode(&env, b"hello");
        let (e, body, n) = decode(&rec).unwrap();
        assert_eq!((e, body.as_slice(), n), (env, &b"hello"[..], rec.len()));
        // every truncation is detected as such
        for cut in 0..rec.len() {
            assert_eq!(decode(&rec[..cut]).unwrap_err(), DecodeError::Truncated, "cut {cut}");
        }
        // every single-byte flip in the payload is caught by the CRC
        for i in RECORD_HEADER..rec.len() {
            let mut bad = rec.clone();
            bad[i] ^= 0x40;
            assert!(matches!(decode(&bad), Err(DecodeError::Corrupt(_))), "flip at {i}");
        }
        let mut bad = rec.clone();
        bad[0] = b'X';
        assert_eq!(decode(&bad).unwrap_err(), DecodeError::Corrupt("bad magic"));
    }
}
