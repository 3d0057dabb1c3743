//! The client connection of a session: plain, or TLS from the start
//! (RFC 8314) or after STARTTLS (RFC 3207). See [`crate::stream`].

use tokio_rustls::server::TlsStream;

use crate::stream::MaybeTls;

pub type Conn<S> = MaybeTls<S, TlsStream<S>>;

/// Negotiated protocol version, e.g. `TLSv1_3`.
pub fn tls_version<S>(conn: &Conn<S>) -> Option<String> {
    match conn {
        MaybeTls::Tls(t) => t.get_ref().1.protocol_version().map(|v| format!("{v:?}")),
        _ => None,
    }
}
