//! What the index learns from one event ([`Facts`]), the same way from a
//! live [`Event`] and from a line scanned at start-up, so the index
//! rebuilt after a restart is the one that was lost.
//!
//! An event is read generically: only `message_id`, `ts`, `tenant`,
//! `sender`, `rcpt`, `rcpts` and `header_message_id` matter, whatever its
//! kind, and any other field is ignored. Addresses are hashed lowercase,
//! the Message-ID header as is, with the process's keyed hasher.
//!
//! Trust boundary: addresses and the Message-ID header are client-supplied
//! text; they are only hashed (keyed SipHash, so they cannot be chosen to
//! collide). Scanned lines may be damaged: a line that does not parse as
//! a framed event is skipped.

use std::borrow::Cow;
use std::hash::BuildHasher;

use serde::{Deserialize, Deserializer};

use super::clock::parse_ts_ms;
use super::index::Facts;
use crate::events::Event;

/// A 31-bit hash that is never 0 (0 means "absent" in the index).
pub fn hash31(h: &impl BuildHasher, s: &str) -> u32 {
    ((h.hash_one(s) as u32) & 0x7fff_ffff) | 1
}

/// The hash of an address as compared (lowercase).
pub fn addr_hash(h: &impl BuildHasher, s: &str) -> u32 {
    if s.bytes().any(|b| b.is_ascii_uppercase() || !b.is_ascii()) {
        hash31(h, &s.to_lowercase())
    } else {
        hash31(h, s)
    }
}

/// A JSON string, borrowed from the line when it has no escapes.
pub struct Text<'a>(pub Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(s.to_string())))
            }
            fn visit_string<E>(self, s: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(s)))
            }
        }
        d.deserialize_str(V)
    }
}

/// The event fields the index reads.
#[derive(Deserialize)]
pub struct Indexed<'a> {
    #[serde(borrow, default)]
    message_id: Option<Text<'a>>,
    #[serde(borrow, default)]
    ts: Option<Text<'a>>,
    #[serde(borrow, default)]
    tenant: Option<Text<'a>>,
    #[serde(borrow, default)]
    sender: Option<Text<'a>>,
    #[serde(borrow, default)]
    rcpt: Option<Text<'a>>,
    #[serde(borrow, default)]
    rcpts: Option<Vec<Text<'a>>>,
    #[serde(borrow, default)]
    header_message_id: Option<Text<'a>>,
}

/// A framed line (`{"prev":…,"ev":{…}}`) as the start-up scan reads it.
#[derive(Deserialize)]
pub struct ScannedLine<'a> {
    #[serde(borrow)]
    pub ev: Indexed<'a>,
}

fn build<'a>(
    h: &impl BuildHasher,
    id: &'a str,
    ts: Option<&str>,
    tenant: Option<&'a str>,
    sender: Option<&str>,
    rcpts: impl Iterator<Item = &'a str>,
    hmid: Option<&str>,
) -> Facts<'a> {
    Facts {
        id,
        ts_ms: ts.and_then(parse_ts_ms),
        tenant,
        sender: sender.map_or(0, |s| addr_hash(h, s)),
        hmid: hmid.map_or(0, |s| hash31(h, s)),
        rcpts: rcpts.map(|a| addr_hash(h, a)).collect(),
    }
}

/// The facts of a scanned event; `None` without a message id.
pub fn from_scanned<'a>(h: &impl BuildHasher, ev: &'a Indexed<'a>) -> Option<Facts<'a>> {
    let id = ev
        .message_id
        .as_ref()
        .map(|t| t.0.as_ref())
        .filter(|id| !id.is_empty())?;
    let rcpts = ev.rcpt.iter().chain(ev.rcpts.iter().flatten()).map(|t| t.0.as_ref());
    Some(build(
        h,
        id,
        ev.ts.as_ref().map(|t| t.0.as_ref()),
        ev.tenant.as_ref().map(|t| t.0.as_ref()),
        ev.sender.as_ref().map(|t| t.0.as_ref()),
        rcpts,
        ev.header_message_id.as_ref().map(|t| t.0.as_ref()),
    ))
}

/// The facts of a live event; `None` without a message id.
pub fn from_event<'a>(h: &impl BuildHasher, ev: &'a Event) -> Option<Facts<'a>> {
    let id = ev.message_id.as_deref().filter(|id| !id.is_empty())?;
    let rcpts = ev.rcpt.iter().chain(ev.rcpts.iter().flatten()).map(String::as_str);
    Some(build(
        h,
        id,
        Some(&ev.ts),
        ev.tenant.as_deref(),
        ev.sender.as_deref(),
        rcpts,
        ev.header_message_id.as_deref(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::EventKind;
    use std::collections::hash_map::RandomState;

    fn same(a: &Facts<'_>, b: &Facts<'_>) {
        assert_eq!(
            (a.id, a.ts_ms, a.tenant, a.sender, a.hmid, &a.rcpts),
            (b.id, b.ts_ms, b.tenant, b.sender, b.hmid, &b.rcpts)
        );
    }

    #[test]
    fn live_and_scanned_agree() {
        let h = RandomState::new();
        let mut ev = Event::new(EventKind::Received);
        ev.message_id = Some("19b0d5a0f3c8d1e2f0a0".into());
        ev.tenant = Some("acme".into());
        ev.sender = Some("News@Example.com".into());
        ev.rcpts = Some(vec![
            "a@x.org".into(),
            "Zoë@Ünïcode.example".into(),
            "q\"uote@x.org".into(),
        ]);
        ev.header_message_id = Some("abc@example.com".into());
        let line = serde_json::to_vec(&ev).unwrap();
        let live = from_event(&h, &ev).unwrap();
        assert_eq!(live.hmid, hash31(&h, "abc@example.com"));
        assert_eq!(live.sender, addr_hash(&h, "news@example.com"));
        assert_eq!(live.rcpts[1], hash31(&h, "zoë@ünïcode.example"));
        assert!(live.ts_ms.is_some());
        let mut framed = Vec::new();
        super::super::segment::frame(&mut framed, None, &line);
        let scanned: ScannedLine<'_> = serde_json::from_slice(&framed[..framed.len() - 1]).unwrap();
        same(&live, &from_scanned(&h, &scanned.ev).unwrap());

        let mut d = Event::new(EventKind::Delivered);
        d.message_id = Some("m-1".into());
        d.rcpt = Some("B@y.org".into());
        let line = serde_json::to_vec(&d).unwrap();
        let live = from_event(&h, &d).unwrap();
        assert_eq!((live.hmid, live.sender, live.tenant), (0, 0, None));
        let mut framed = Vec::new();
        super::super::segment::frame(&mut framed, None, &line);
        let scanned: ScannedLine<'_> = serde_json::from_slice(&framed[..framed.len() - 1]).unwrap();
        same(&live, &from_scanned(&h, &scanned.ev).unwrap());

        let r = Event::new(EventKind::Refused);
        assert!(from_event(&h, &r).is_none());
    }

    #[test]
    fn hashes_are_never_zero() {
        let h = RandomState::new();
        for s in ["", "a", "b@c"] {
            assert_ne!(hash31(&h, s), 0);
            assert_eq!(hash31(&h, s) & 0x8000_0000, 0);
        }
        assert_eq!(addr_hash(&h, "A@B.C"), addr_hash(&h, "a@b.c"));
    }
}
