//! The hand-off between the SMTP session and whatever stores the message.
//!
//! The session never writes the spool itself (DESIGN §2): when a message is
//! fully received and valid it calls [`MessageSink::submit`], and sends the
//! reply it gets back. The sink decides 250 (durably stored) or a refusal.
//!
//! Trust boundary: everything in a [`Submission`] came from an authenticated
//! (or network-trusted) client and passed the session's syntax and limit
//! checks; nothing else about it is trusted.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use crate::smtp::{Enhanced, Mailbox, Reply};

/// One message as received.
#[derive(Debug, Clone)]
pub struct Submission {
    /// The SMTP session it came in on (logs and events carry it).
    pub session_id: Arc<str>,
    pub tenant: Arc<str>,
    /// Credential used (the agent); `None` for trusted-network clients.
    pub username: Option<Arc<str>>,
    pub peer: SocketAddr,
    pub helo: String,
    /// Negotiated TLS protocol, e.g. `TLSv1_3`, if any.
    pub tls: Option<String>,
    /// `None` is the null reverse-path `<>`.
    pub mail_from: Option<Mailbox>,
    pub smtputf8: bool,
    pub rcpts: Vec<Mailbox>,
    /// Content with CRLF line endings, dot-unstuffed.
    pub body: Vec<u8>,
    /// What the session checked before accepting it (for the trace).
    pub checks: Vec<crate::events::Check>,
    /// The announcement made when the content began ([`MessageSink::expect`]).
    pub expected: Option<Arc<crate::spool::Expected>>,
}

pub type SubmitFuture<'a> = Pin<Box<dyn Future<Output = Reply> + Send + 'a>>;

/// Where accepted messages go.
pub trait MessageSink: Send + Sync {
    /// Take responsibility for the message and return the reply for the
    /// client: 250 only once the message is durable.
    fn submit(&self, msg: Submission) -> SubmitFuture<'_>;

    /// A message's content has begun (`354` sent, or a first `BDAT` chunk):
    /// the store may wait briefly for it to batch durability work. Keep the
    /// result until the message is submitted or the transaction ends.
    fn expect(&self) -> Option<Arc<crate::spool::Expected>> {
        None
    }
}

/// The `Message-ID` header's value without angle brackets (RFC 5322
/// §3.6.4), if the header section has one: first occurrence, unfolded,
/// printable ASCII only, at most 998 octets.
pub fn header_message_id(body: &[u8]) -> Option<String> {
    let mut rest = body;
    while !rest.is_empty() {
        let end = memchr::memchr(b'\n', rest).map_or(rest.len(), |i| i + 1);
        let line = &rest[..end];
        if line == b"\r\n" || line == b"\n" {
            return None; // end of the header section
        }
        if line.len() > 11 && line[..11].eq_ignore_ascii_case(b"message-id:") {
            let mut value = line[11..].to_vec();
            // Unfold continuation lines.
            let mut next = &rest[end..];
            while let Some(&c) = next.first()
                && (c == b' ' || c == b'\t')
            {
                let e = memchr::memchr(b'\n', next).map_or(next.len(), |i| i + 1);
                value.extend_from_slice(&next[..e]);
                next = &next[e..];
            }
            let v: String = value
                .iter()
                .filter(|b| b.is_ascii_graphic())
                .map(|&b| b as char)
                .take(998)
                .collect();
            let v = v.trim_start_matches('<').trim_end_matches('>');
            return (!v.is_empty()).then(|| v.to_string());
        }
        rest = &rest[end..];
    }
    None
}

/// `d=... s=...` of a DKIM-Signature header sendguard added.
pub fn dkim_tags(header: &str) -> Option<String> {
    let tag = |name: &str| {
        header
            .split(';')
            .map(str::trim)
            .find_map(|t| t.strip_prefix(name))
            .map(|v| v.split_whitespace().collect::<String>())
    };
    Some(format!("d={} s={}", tag("d=")?, tag("s=")?))
}

/// The sink used while no spool is configured: refuses every message with
/// a temporary error, so that nothing is ever acknowledged and then lost.
pub struct NoSpool;

impl MessageSink for NoSpool {
    fn submit(&self, _msg: Submission) -> SubmitFuture<'_> {
        Box::pin(async {
            Reply::new(
                451,
                Enhanced(4, 3, 0),
                "Message not accepted: no spool is configured on this server",
            )
            .with_token("spool_unavailable")
        })
    }
}

/// Convenience for sharing.
pub type SharedSink = Arc<dyn MessageSink>;

#[cfg(test)]
mod tests {
    use super::{dkim_tags, header_message_id};

    #[test]
    fn dkim_header_tags() {
        let h = "DKIM-Signature: v=1; a=rsa-sha256; s=s1; d=example.com;\r\n\tc=relaxed/relaxed; h=From; bh=x; b=y\r\n";
        assert_eq!(dkim_tags(h).as_deref(), Some("d=example.com s=s1"));
        assert_eq!(dkim_tags("DKIM-Signature: v=1; a=rsa-sha256"), None);
    }

    #[test]
    fn message_id_header() {
        let cases: [(&[u8], Option<&str>); 7] = [
            (
                b"From: a@b\r\nMessage-ID: <x1@host.example>\r\n\r\nbody",
                Some("x1@host.example"),
            ),
            (b"message-id:<x2@h>\r\n\r\n", Some("x2@h")),
            (b"Message-ID:\r\n <folded@h>\r\nSubject: s\r\n\r\n", Some("folded@h")),
            (b"Subject: s\r\n\r\nMessage-ID: <in-body@h>\r\n", None),
            (b"X-Message-ID: <no@h>\r\n\r\n", None),
            (b"Message-ID: <a@h>\r\nMessage-ID: <b@h>\r\n\r\n", Some("a@h")),
            (b"Message-ID: <\x01ctl\x7f@h>\nX: y\n\n", Some("ctl@h")),
        ];
        for (body, want) in cases {
            assert_eq!(
                header_message_id(body).as_deref(),
                want,
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
