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
}

pub type SubmitFuture<'a> = Pin<Box<dyn Future<Output = Reply> + Send + 'a>>;

/// Where accepted messages go.
pub trait MessageSink: Send + Sync {
    /// Take responsibility for the message and return the reply for the
    /// client: 250 only once the message is durable.
    fn submit(&self, msg: Submission) -> SubmitFuture<'_>;
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
