//! The HTTP/1.1 client of one endpoint: POSTs over one kept-alive
//! connection (hyper 1), plain or TLS (rustls; system roots plus the
//! endpoint's `ca_file`).
//!
//! Trust boundary: the receiver is untrusted. Only its status code is
//! used; its body is read (at most [`MAX_RESPONSE`] bytes, so the
//! connection can be reused) and thrown away. The caller bounds each POST
//! with the endpoint's `timeout`; a POST cut short drops its connection.

use std::path::Path;
use std::sync::Arc;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{CONTENT_TYPE, HOST, HeaderName, HeaderValue, USER_AGENT};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::url::Target;

/// Largest response body read; a longer one closes the connection.
pub const MAX_RESPONSE: usize = 64 * 1024;

type Stream = crate::stream::MaybeTls<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>;

/// A TLS connector trusting `native` (the system roots) and the
/// certificates in `ca_file`.
pub fn tls_connector(native: &[CertificateDer<'static>], ca_file: Option<&Path>) -> anyhow::Result<TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for c in native {
        let _ = roots.add(c.clone());
    }
    if let Some(p) = ca_file {
        let pem = std::fs::read(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
        for c in rustls_pemfile::certs(&mut pem.as_slice()) {
            roots.add(c?).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
        }
    }
    anyhow::ensure!(!roots.is_empty(), "no system CA certificates found; set ca_file");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(cfg)))
}

/// One endpoint's connection.
pub struct Client {
    target: Target,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    user_agent: HeaderValue,
    host: HeaderValue,
    sender: Option<SendRequest<Full<Bytes>>>,
}

/// `Display` of an error with its sources (hyper's own text is terse).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

impl Client {
    /// `tls` is required for an `https` target.
    pub fn new(target: Target, tls: Option<TlsConnector>) -> anyhow::Result<Client> {
        let tls = match (target.tls, tls) {
            (true, Some(c)) => Some((c, ServerName::try_from(target.host.clone())?)),
            (true, None) => anyhow::bail!("https needs a TLS connector"),
            (false, _) => None,
        };
        Ok(Client {
            host: HeaderValue::from_str(&target.authority)?,
            user_agent: HeaderValue::from_static(concat!("sendguard/", env!("CARGO_PKG_VERSION"))),
            target,
            tls,
            sender: None,
        })
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, String> {
        let addr = format!("{}:{}", self.target.authority_host(), self.target.port);
        let tcp = TcpStream::connect((self.target.host.as_str(), self.target.port))
            .await
            .map_err(|e| format!("connect to {addr}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let io: Stream = match &self.tls {
            Some((c, name)) => crate::stream::MaybeTls::Tls(Box::new(
                c.connect(name.clone(), tcp)
                    .await
                    .map_err(|e| format!("TLS with {addr}: {}", chain(&e)))?,
            )),
            None => crate::stream::MaybeTls::Plain(tcp),
        };
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| format!("HTTP with {addr}: {}", chain(&e)))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    fn request(&self, headers: &[(HeaderName, HeaderValue)], body: Bytes) -> Request<Full<Bytes>> {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(self.target.path.as_str())
            .header(HOST, self.host.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(USER_AGENT, self.user_agent.clone());
        for (k, v) in headers {
            req = req.header(k, v);
        }
        req.body(Full::new(body)).expect("valid request parts")
    }

    /// POST `body`; the status of the response, or why there was none. A
    /// kept-alive connection the receiver has closed meanwhile is replaced
    /// once, at once.
    pub async fn post(&mut self, headers: &[(HeaderName, HeaderValue)], body: Bytes) -> Result<StatusCode, String> {
        // Taken out: a POST cancelled by the caller's timeout leaves no
        // connection behind in an unknown state.
        if let Some(mut s) = self.sender.take()
            && s.ready().await.is_ok()
            && let Ok(resp) = s.send_request(self.request(headers, body.clone())).await
        {
            return Ok(self.finish(s, resp).await);
        }
        let mut s = self.connect().await?;
        s.ready().await.map_err(|e| format!("HTTP: {}", chain(&e)))?;
        let resp = s
            .send_request(self.request(headers, body))
            .await
            .map_err(|e| format!("HTTP: {}", chain(&e)))?;
        Ok(self.finish(s, resp).await)
    }

    /// Read (and drop) the response body; keep the connection when that
    /// worked and the receiver did not close it.
    async fn finish(
        &mut self,
        s: SendRequest<Full<Bytes>>,
        resp: hyper::Response<hyper::body::Incoming>,
    ) -> StatusCode {
        let status = resp.status();
        let drained = Limited::new(resp.into_body(), MAX_RESPONSE).collect().await.is_ok();
        if drained && !s.is_closed() {
            self.sender = Some(s);
        }
        status
    }
}

impl Target {
    /// The host as written in an address (IPv6 in brackets).
    fn authority_host(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        }
    }
}
