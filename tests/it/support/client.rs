//! A minimal SMTP test client speaking raw lines, with STARTTLS and
//! implicit TLS through rustls; used to send exactly the bytes a test needs
//! (including malformed ones) and read replies.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

pub type Stream = sendguard::stream::MaybeTls<TcpStream, TlsStream<TcpStream>>;

/// One parsed server reply.
#[derive(Debug, Clone)]
pub struct Resp {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Resp {
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }

    /// Assert the basic code and the enhanced code on the last line.
    #[track_caller]
    pub fn expect(&self, code: u16, enhanced: &str) -> &Self {
        assert_eq!(self.code, code, "unexpected reply: {self:?}");
        let last = self.lines.last().unwrap();
        assert!(
            last.starts_with(enhanced),
            "expected enhanced code {enhanced} in {self:?}"
        );
        self
    }

    #[track_caller]
    pub fn token(&self, token: &str) -> &Self {
        let want = format!("(sendguard:{token})");
        assert!(
            self.lines.last().unwrap().ends_with(&want),
            "expected {want} in {self:?}"
        );
        self
    }

    pub fn has_line(&self, l: &str) -> bool {
        self.lines.iter().any(|x| x == l)
    }
}

pub struct Client {
    pub stream: Stream,
    buf: Vec<u8>,
}

pub fn tls_connector(versions: &[&'static rustls::SupportedProtocolVersion]) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut super::pki().ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(cfg))
}

impl Client {
    pub fn from_stream(stream: Stream) -> Client {
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    /// Connect in clear and read the greeting.
    pub async fn connect(addr: SocketAddr) -> (Client, Resp) {
        Self::from_tcp(TcpStream::connect(addr).await.unwrap()).await
    }

    /// A plain client on an open connection; reads the greeting.
    pub async fn from_tcp(tcp: TcpStream) -> (Client, Resp) {
        let mut c = Client {
            stream: Stream::Plain(tcp),
            buf: Vec::new(),
        };
        let greeting = c.reply().await;
        (c, greeting)
    }

    /// Connect with implicit TLS (RFC 8314) and read the greeting.
    pub async fn connect_tls(addr: SocketAddr) -> (Client, Resp) {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let tls = tls_connector(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let mut c = Client {
            stream: Stream::Tls(Box::new(tls)),
            buf: Vec::new(),
        };
        let greeting = c.reply().await;
        (c, greeting)
    }

    /// Connect, EHLO, STARTTLS, EHLO again.
    pub async fn connect_starttls(addr: SocketAddr) -> Client {
        let (mut c, g) = Client::connect(addr).await;
        assert_eq!(g.code, 220);
        c.cmd("EHLO client.test").await.expect(250, "");
        c.cmd("STARTTLS").await.expect(220, "2.0.0");
        c.upgrade().await;
        c.cmd("EHLO client.test").await.expect(250, "");
        c
    }

    /// Connect over STARTTLS and authenticate as the standard test user.
    pub async fn connect_authed(addr: SocketAddr) -> Client {
        let mut c = Client::connect_starttls(addr).await;
        c.auth_plain("app", super::PASSWORD).await.expect(235, "2.7.0");
        c
    }

    pub async fn upgrade(&mut self) {
        assert!(self.buf.is_empty(), "server sent bytes before TLS");
        let Stream::Plain(tcp) = std::mem::replace(&mut self.stream, Stream::Closed) else {
            panic!("already TLS")
        };
        let tls = tls_connector(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        self.stream = Stream::Tls(Box::new(tls));
    }

    pub async fn auth_plain(&mut self, user: &str, pass: &str) -> Resp {
        use base64::Engine;
        let msg = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{pass}"));
        self.cmd(&format!("AUTH PLAIN {msg}")).await
    }

    /// Send without panicking; false when the connection is gone.
    pub async fn try_send_raw(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).await.is_ok() && self.stream.flush().await.is_ok()
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
        self.stream.flush().await.unwrap();
    }

    pub async fn cmd(&mut self, line: &str) -> Resp {
        self.send_raw(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }

    /// Read one (possibly multi-line) reply; panics on timeout or EOF.
    pub async fn reply(&mut self) -> Resp {
        self.try_reply(Duration::from_secs(10)).await.expect("server reply")
    }

    /// Read one reply, or `None` on EOF/timeout.
    pub async fn try_reply(&mut self, timeout: Duration) -> Option<Resp> {
        let mut lines = Vec::new();
        loop {
            let line = loop {
                if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                    let l = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                    self.buf.drain(..i + 2);
                    break l;
                }
                let mut tmp = [0u8; 4096];
                let n = match tokio::time::timeout(timeout, self.stream.read(&mut tmp)).await {
                    Ok(Ok(n)) => n,
                    _ => return None,
                };
                if n == 0 {
                    return None;
                }
                self.buf.extend_from_slice(&tmp[..n]);
            };
            assert!(line.len() >= 3, "short reply line {line:?}");
            let code: u16 = line[..3].parse().expect("numeric reply code");
            let more = line.as_bytes().get(3) == Some(&b'-');
            lines.push(line.get(4..).unwrap_or("").to_string());
            if !more {
                return Some(Resp { code, lines });
            }
        }
    }

    /// True when the server closed the connection (EOF within `timeout`).
    pub async fn closed(&mut self, timeout: Duration) -> bool {
        let mut tmp = [0u8; 64];
        matches!(
            tokio::time::timeout(timeout, self.stream.read(&mut tmp)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}
