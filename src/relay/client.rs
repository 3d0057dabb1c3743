//! Upstream SMTP client (RFC 5321 client side, RFC 3207 STARTTLS, RFC 8314
//! implicit TLS, RFC 4954 AUTH, RFC 2920 PIPELINING, RFC 1870 SIZE,
//! RFC 6152 8BITMIME, RFC 6531 SMTPUTF8).
//!
//! One [`RelayConn`] carries many transactions; each transaction returns
//! every reply it got, so each recipient's fate is decided on its own.
//!
//! Trust boundary: talks only to the configured smarthost. Its certificate
//! is verified (system roots or `relay.ca_file`) unless the operator set the
//! dangerous opt-out; STARTTLS is never skipped when configured (no
//! downgrade to plaintext). Reply texts from upstream are data, only parsed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::stream::ClientStream;
use crate::config::{Config, RelayTls, split_host_port};
use crate::events::ReplyRecord;

/// Settings resolved from `[relay]` once at start.
pub struct Upstream {
    pub addr: String,
    pub tls: RelayTls,
    pub server_name: ServerName<'static>,
    pub connector: Option<TlsConnector>,
    pub helo: String,
    pub credentials: Option<(String, String)>,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    pub data_timeout: Duration,
}

/// What the upstream advertised in EHLO.
#[derive(Debug, Default, Clone)]
pub struct Caps {
    pub pipelining: bool,
    pub size: Option<u64>,
    pub eightbitmime: bool,
    pub smtputf8: bool,
    pub starttls: bool,
    pub auth_plain: bool,
    pub auth_login: bool,
}

/// Why a connection or transaction failed as a whole.
#[derive(Debug, Clone)]
pub enum RelayError {
    /// No SMTP reply: refused, reset, timeout, TLS failure.
    Io(String),
    /// The upstream answered an error at a session stage (greeting, EHLO,
    /// STARTTLS, AUTH).
    Reply { stage: &'static str, reply: ReplyRecord },
}

impl RelayError {
    pub fn record(&self) -> ReplyRecord {
        match self {
            RelayError::Io(t) => ReplyRecord::local(t.clone()),
            RelayError::Reply { reply, .. } => reply.clone(),
        }
    }
}

/// Asked, with the connection's capabilities, for the envelope commands of
/// a transaction to chain behind the content about to go out.
pub type NextEnvelope<'a> = dyn FnMut(&Caps) -> Option<Vec<u8>> + Send + 'a;

/// Every reply of one transaction, in order.
#[derive(Debug, Default)]
pub struct TxReplies {
    pub mail: Option<ReplyRecord>,
    /// One per recipient sent, same order.
    pub rcpts: Vec<ReplyRecord>,
    pub data: Option<ReplyRecord>,
    /// Reply to the end of data.
    pub done: Option<ReplyRecord>,
    /// The transaction broke off (connection lost or timeout).
    pub error: Option<String>,
    /// Failed before the upstream sent any reply in this transaction (a
    /// stale pooled connection): safe to retry on a fresh connection.
    pub stale: bool,
}

pub struct RelayConn {
    stream: ClientStream,
    rbuf: Vec<u8>,
    write_timeout: Duration,
    pub caps: Caps,
    pub transactions: usize,
}

impl Upstream {
    pub fn from_config(cfg: &Config) -> anyhow::Result<Option<Upstream>> {
        let Some(r) = &cfg.relay else { return Ok(None) };
        let (host, _) = split_host_port(&r.addr).ok_or_else(|| anyhow::anyhow!("relay.addr: not host:port"))?;
        let name = r.tls_server_name.clone().unwrap_or(host);
        let server_name =
            ServerName::try_from(name.clone()).map_err(|e| anyhow::anyhow!("relay.tls_server_name: {name:?}: {e}"))?;
        let connector = match r.tls {
            RelayTls::None => None,
            _ => Some(super::stream::connector(
                r.ca_file.as_ref().map(|p| cfg.resolve(p)).as_deref(),
                r.danger_accept_invalid_certs,
            )?),
        };
        Ok(Some(Upstream {
            addr: r.addr.clone(),
            tls: r.tls,
            server_name,
            connector,
            helo: r.helo_name.clone().unwrap_or_else(|| cfg.server.hostname.clone()),
            credentials: r.username.clone().zip(r.password.clone()),
            connect_timeout: r.connect_timeout,
            command_timeout: r.command_timeout,
            data_timeout: r.data_timeout,
        }))
    }

    /// Connect, read the greeting, EHLO, STARTTLS and AUTH as configured.
    pub async fn connect(self: &Arc<Self>) -> Result<RelayConn, RelayError> {
        let addrs: Vec<SocketAddr> = tokio::time::timeout(self.connect_timeout, tokio::net::lookup_host(&self.addr))
            .await
            .map_err(|_| RelayError::Io(format!("resolve {}: timed out", self.addr)))?
            .map_err(|e| RelayError::Io(format!("resolve {}: {e}", self.addr)))?
            .collect();
        let tcp = connect_any(&addrs, self.connect_timeout)
            .await
            .map_err(|e| RelayError::Io(format!("connect to {}: {e}", self.addr)))?;
        let _ = tcp.set_nodelay(true);
        let stream = match self.tls {
            RelayTls::Implicit => self.handshake(tcp).await?,
            _ => ClientStream::Plain(tcp),
        };
        let mut c = RelayConn {
            stream,
            rbuf: Vec::with_capacity(4096),
            write_timeout: self.command_timeout,
            caps: Caps::default(),
            transactions: 0,
        };
        let greeting = c.read_reply(self.command_timeout).await.map_err(RelayError::Io)?;
        if greeting.code != Some(220) {
            return Err(RelayError::Reply {
                stage: "greeting",
                reply: greeting,
            });
        }
        c.ehlo(self).await?;
        if self.tls == RelayTls::Starttls {
            if !c.caps.starttls {
                return Err(RelayError::Io(format!(
                    "{} does not offer STARTTLS (relay.tls = \"starttls\")",
                    self.addr
                )));
            }
            let r = c
                .command("STARTTLS", self.command_timeout)
                .await
                .map_err(RelayError::Io)?;
            if r.code != Some(220) {
                return Err(RelayError::Reply {
                    stage: "starttls",
                    reply: r,
                });
            }
            // RFC 3207 §6 (client side of CVE-2011-0411): anything after the
            // 220 arrived in clear and must not be read as a TLS reply.
            if !c.rbuf.is_empty() {
                tracing::warn!(
                    bytes = c.rbuf.len(),
                    "discarding plaintext the upstream sent after its STARTTLS reply"
                );
                c.rbuf.clear();
            }
            let ClientStream::Plain(tcp) = std::mem::replace(&mut c.stream, ClientStream::Closed) else {
                return Err(RelayError::Io("STARTTLS on a TLS stream".into()));
            };
            c.stream = self.handshake(tcp).await?;
            c.ehlo(self).await?;
        }
        if let Some((user, pass)) = &self.credentials {
            c.auth(user, pass, self.command_timeout).await?;
        }
        Ok(c)
    }

    async fn handshake(&self, tcp: TcpStream) -> Result<ClientStream, RelayError> {
        let connector = self.connector.clone().expect("TLS relay has a connector");
        let tls = tokio::time::timeout(self.connect_timeout, connector.connect(self.server_name.clone(), tcp))
            .await
            .map_err(|_| RelayError::Io("TLS handshake timed out".into()))?
            .map_err(|e| RelayError::Io(format!("TLS handshake with {}: {e}", self.addr)))?;
        Ok(ClientStream::Tls(Box::new(tls)))
    }
}

/// The most addresses of the smarthost one connection attempt tries
/// (Postfix's `smtp_mx_address_limit` default): with every one dropping
/// packets, an attempt costs at most this many connect timeouts.
pub const MAX_ADDRESSES: usize = 5;

/// Connect to the first of `addrs` (up to [`MAX_ADDRESSES`]) that answers,
/// each with its own `timeout` (RFC 5321 §5.1: a host's other addresses
/// are tried): an address that drops packets (often the IPv6 one) costs
/// one timeout, not the whole attempt. The error names every address tried
/// and why it failed.
pub async fn connect_any(addrs: &[SocketAddr], timeout: Duration) -> Result<TcpStream, String> {
    let addrs = &addrs[..addrs.len().min(MAX_ADDRESSES)];
    let mut failures = Vec::new();
    for a in addrs {
        let why = match tokio::time::timeout(timeout, TcpStream::connect(a)).await {
            Ok(Ok(tcp)) => return Ok(tcp),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".to_string(),
        };
        // One address: the caller's "connect to host:port" names it.
        failures.push(if addrs.len() > 1 { format!("{a}: {why}") } else { why });
    }
    if failures.is_empty() {
        return Err("the name has no address".into());
    }
    Err(failures.join("; "))
}

impl RelayConn {
    async fn ehlo(&mut self, up: &Upstream) -> Result<(), RelayError> {
        let r = self
            .command_lines(&format!("EHLO {}", up.helo), up.command_timeout)
            .await
            .map_err(RelayError::Io)?;
        if r.0.code != Some(250) {
            return Err(RelayError::Reply {
                stage: "ehlo",
                reply: r.0,
            });
        }
        let mut caps = Caps::default();
        for line in r.1.iter().skip(1) {
            let mut words = line.split_whitespace();
            let kw = words.next().unwrap_or("").to_ascii_uppercase();
            match kw.as_str() {
                "PIPELINING" => caps.pipelining = true,
                "SIZE" => caps.size = words.next().and_then(|n| n.parse().ok()).filter(|n| *n > 0),
                "8BITMIME" => caps.eightbitmime = true,
                "SMTPUTF8" => caps.smtputf8 = true,
                "STARTTLS" => caps.starttls = true,
                "AUTH" => {
                    for m in words {
                        match m.to_ascii_uppercase().as_str() {
                            "PLAIN" => caps.auth_plain = true,
                            "LOGIN" => caps.auth_login = true,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        self.caps = caps;
        Ok(())
    }

    async fn auth(&mut self, user: &str, pass: &str, timeout: Duration) -> Result<(), RelayError> {
        use base64::Engine;
        let b64 = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
        let r = if self.caps.auth_plain {
            self.command(
                &format!("AUTH PLAIN {}", b64(format!("\0{user}\0{pass}").as_bytes())),
                timeout,
            )
            .await
            .map_err(RelayError::Io)?
        } else if self.caps.auth_login {
            let r = self.command("AUTH LOGIN", timeout).await.map_err(RelayError::Io)?;
            if r.code != Some(334) {
                return Err(RelayError::Reply {
                    stage: "auth",
                    reply: r,
                });
            }
            let r = self
                .command(&b64(user.as_bytes()), timeout)
                .await
                .map_err(RelayError::Io)?;
            if r.code != Some(334) {
                return Err(RelayError::Reply {
                    stage: "auth",
                    reply: r,
                });
            }
            self.command(&b64(pass.as_bytes()), timeout)
                .await
                .map_err(RelayError::Io)?
        } else {
            return Err(RelayError::Io(
                "relay credentials configured but the upstream offers no AUTH PLAIN or LOGIN".into(),
            ));
        };
        if r.code != Some(235) {
            return Err(RelayError::Reply {
                stage: "auth",
                reply: r,
            });
        }
        Ok(())
    }

    /// Run one transaction. `params` are appended to MAIL FROM (SIZE=,
    /// BODY=, SMTPUTF8), chosen by the caller from [`Caps`]. It is chained
    /// with its neighbours on a PIPELINING connection (RFC 2920 §3.1: message content may be the
    /// first "command" of a group): `sent` says the previous transaction
    /// already wrote this one's envelope (after an RSET) behind its content;
    /// `next` is asked, just before the content goes out, for the envelope of
    /// a following transaction ([`envelope_commands`]), written with an RSET
    /// ahead of it in the same write as the content. Returns whether that envelope went out
    /// and the connection is fit to read its replies; when it is false the
    /// caller sends that transaction afresh (on a new connection if this one
    /// broke): no reply to it was read, so nothing of it happened.
    #[allow(clippy::too_many_arguments)]
    pub async fn transaction(
        &mut self,
        up: &Upstream,
        from: &str,
        params: &str,
        rcpts: &[&str],
        body: &[u8],
        sent: bool,
        next: Option<&mut NextEnvelope<'_>>,
    ) -> (TxReplies, bool) {
        let mut tx = TxReplies::default();
        let reused = self.transactions > 0;
        let t = up.command_timeout;
        let mut got_any = false;
        let mut chained = false;
        let pipelining = self.caps.pipelining;
        let result: Result<(), String> = async {
            if pipelining {
                if !sent {
                    self.write(&envelope_commands(from, params, rcpts)).await?;
                } else {
                    // The RSET chained ahead of this envelope (see below).
                    let r = self.read_reply(t).await?;
                    if !is_2xx(&r) {
                        return Err(format!("RSET refused: {}", r.text));
                    }
                }
                let m = self.read_reply(t).await?;
                got_any = true;
                tx.mail = Some(m);
                for _ in rcpts {
                    tx.rcpts.push(self.read_reply(t).await?);
                }
                tx.data = Some(self.read_reply(t).await?);
            } else {
                self.write(format!("MAIL FROM:<{from}>{params}\r\n").as_bytes()).await?;
                let m = self.read_reply(t).await?;
                got_any = true;
                let ok = is_2xx(&m);
                tx.mail = Some(m);
                if !ok {
                    return Ok(());
                }
                for r in rcpts {
                    self.write(format!("RCPT TO:<{r}>\r\n").as_bytes()).await?;
                    tx.rcpts.push(self.read_reply(t).await?);
                }
                if !tx.rcpts.iter().any(is_2xx) {
                    return Ok(());
                }
                self.write(b"DATA\r\n").await?;
                tx.data = Some(self.read_reply(t).await?);
            }
            if tx.data.as_ref().and_then(|d| d.code) != Some(354) {
                return Ok(());
            }
            // RFC 2920 §3.1: DATA was accepted although no recipient was: send
            // an empty message end so the upstream discards the transaction.
            if !tx.rcpts.iter().any(is_2xx) || !tx.mail.as_ref().is_some_and(is_2xx) {
                self.write(b".\r\n").await?;
                let _ = self.read_reply(up.data_timeout).await?;
                return Ok(());
            }
            // The next envelope goes behind an RSET: this content's reply is
            // not known yet, and after a refused end of data some servers
            // keep the transaction open (Postfix after an
            // smtpd_end_of_data_restrictions refusal answers the next MAIL
            // with "503 nested MAIL command"), as after any failed
            // transaction before reuse (RFC 5321 §4.1.1.5; RFC 2920 allows
            // RSET anywhere in a group).
            let next = match next {
                Some(f) if pipelining => f(&self.caps).map(|env| [b"RSET\r\n".as_slice(), &env].concat()),
                _ => None,
            };
            self.write_body(body, next.as_deref(), up.data_timeout).await?;
            let done = self.read_reply(up.data_timeout).await?;
            chained = next.is_some() && done.code != Some(421);
            tx.done = Some(done);
            Ok(())
        }
        .await;
        if reused && tx.mail.as_ref().and_then(|m| m.code) == Some(421) {
            // The upstream closed the idle pooled connection with a 421
            // (Postfix does after smtpd_timeout; the pipelined commands then
            // fail to read): not this message's fault, the caller retries
            // on a new connection.
            tx.stale = true;
            tx.error = Some("pooled connection closed by the upstream (421)".into());
            return (tx, false);
        }
        match result {
            Ok(()) => {
                self.transactions += 1;
                match &tx.done {
                    Some(d) if d.code == Some(421) => tx.error = Some("upstream closing the connection (421)".into()),
                    Some(d) if is_2xx(d) => {}
                    // Failed: reset so the connection can be reused (a chained
                    // envelope already has its RSET ahead of it).
                    _ if chained => {}
                    _ => {
                        if let Err(e) = self.reset(t).await {
                            tx.error = Some(e);
                        }
                    }
                }
            }
            Err(e) => {
                tx.stale = !got_any;
                tx.error = Some(e);
                chained = false;
            }
        }
        (tx, chained)
    }

    async fn reset(&mut self, t: Duration) -> Result<(), String> {
        let r = self.command("RSET", t).await?;
        if is_2xx(&r) {
            Ok(())
        } else {
            Err(format!("RSET refused: {}", r.text))
        }
    }

    /// Say goodbye (best effort).
    pub async fn quit(mut self, t: Duration) {
        let _ = tokio::time::timeout(t.min(Duration::from_secs(5)), async {
            let _ = self.command("QUIT", t).await;
            let _ = self.stream.shutdown().await;
        })
        .await;
    }

    /// Send content with dot-stuffing (RFC 5321 §4.5.2) and the terminator,
    /// and the next transaction's envelope if any, in one write.
    async fn write_body(&mut self, body: &[u8], next: Option<&[u8]>, t: Duration) -> Result<(), String> {
        let next = next.unwrap_or_default();
        let mut out = Vec::with_capacity(body.len() + 8 + next.len());
        stuff_into(&mut out, body);
        out.extend_from_slice(next);
        let fut = async {
            self.stream.write_all(&out).await?;
            self.stream.flush().await
        };
        tokio::time::timeout(t, fut)
            .await
            .map_err(|_| "timeout sending message content".to_string())?
            .map_err(|e| format!("sending message content: {e}"))
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        let fut = async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        };
        tokio::time::timeout(self.write_timeout, fut)
            .await
            .map_err(|_| "timeout writing to the upstream".to_string())?
            .map_err(|e| format!("write: {e}"))
    }

    async fn command(&mut self, line: &str, t: Duration) -> Result<ReplyRecord, String> {
        self.write(format!("{line}\r\n").as_bytes()).await?;
        self.read_reply(t).await
    }

    async fn command_lines(&mut self, line: &str, t: Duration) -> Result<(ReplyRecord, Vec<String>), String> {
        self.write(format!("{line}\r\n").as_bytes()).await?;
        let (end, code) = self.read_reply_end(t).await?;
        let text = String::from_utf8_lossy(&self.rbuf[..end]);
        let lines: Vec<String> = reply_lines(&text).map(str::to_string).collect();
        drop(text);
        self.rbuf.drain(..end);
        Ok((parse_reply(code, &lines), lines))
    }

    /// Read one possibly multi-line reply (RFC 5321 §4.2.1) into a record.
    /// Runs for every reply of every transaction, so a one-line reply (the
    /// usual case) allocates only its text.
    async fn read_reply(&mut self, t: Duration) -> Result<ReplyRecord, String> {
        let (end, code) = self.read_reply_end(t).await?;
        let text = String::from_utf8_lossy(&self.rbuf[..end]);
        let mut one = [""];
        let many: Vec<&str>;
        let lines: &[&str] = if text.len() == text.find('\n').map_or(0, |i| i + 1) {
            one[0] = reply_lines(&text).next().unwrap_or("");
            &one
        } else {
            many = reply_lines(&text).collect();
            &many
        };
        let r = parse_reply(code, lines);
        drop(text);
        self.rbuf.drain(..end);
        Ok(r)
    }

    /// Wait until `rbuf` starts with one whole reply, check every line's
    /// code, and return the reply's length in bytes (CRLFs included) and
    /// its code. `t` bounds the whole reply, not each read: an upstream
    /// trickling a byte at a time cannot hold the connection (and its
    /// worker) longer. Replies are capped at 64 KiB.
    async fn read_reply_end(&mut self, t: Duration) -> Result<(usize, u16), String> {
        let deadline = tokio::time::Instant::now() + t;
        let mut scanned = 0usize;
        let mut code = 0u16;
        loop {
            while let Some(i) = memchr::memchr(b'\n', &self.rbuf[scanned..]) {
                let nl = scanned + i;
                let end = if nl > scanned && self.rbuf[nl - 1] == b'\r' {
                    nl - 1
                } else {
                    nl
                };
                let line = &self.rbuf[scanned..end];
                let c: u16 = std::str::from_utf8(line.get(..3).unwrap_or(b""))
                    .ok()
                    .and_then(|c| c.parse().ok())
                    .filter(|c| (200..600).contains(c))
                    .ok_or_else(|| format!("malformed upstream reply {:?}", String::from_utf8_lossy(line)))?;
                if scanned == 0 {
                    code = c;
                }
                let more = line.get(3) == Some(&b'-');
                scanned = nl + 1;
                if scanned > 64 * 1024 {
                    return Err("upstream reply too long".into());
                }
                if !more {
                    return Ok((scanned, code));
                }
            }
            if self.rbuf.len() > 64 * 1024 {
                return Err("upstream reply line too long".into());
            }
            self.rbuf.reserve(4096);
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.rbuf)).await {
                Err(_) => return Err("timeout waiting for upstream reply".into()),
                Ok(Err(e)) => return Err(format!("read: {e}")),
                Ok(Ok(0)) => return Err("upstream closed the connection".into()),
                Ok(Ok(_)) => {}
            }
        }
    }
}

/// The text of each line of a whole reply (as `read_reply_end` found it):
/// after the code and its separator, without the line end.
fn reply_lines(reply: &str) -> impl Iterator<Item = &str> {
    reply
        .split_terminator('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l).get(4..).unwrap_or(""))
}

/// A pipelined transaction's opening group: MAIL FROM with `params`, one
/// RCPT TO per recipient, DATA (RFC 2920: DATA ends the group).
pub fn envelope_commands(from: &str, params: &str, rcpts: &[&str]) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(32 + from.len() + params.len() + rcpts.iter().map(|r| r.len() + 14).sum::<usize>());
    out.extend_from_slice(b"MAIL FROM:<");
    out.extend_from_slice(from.as_bytes());
    out.push(b'>');
    out.extend_from_slice(params.as_bytes());
    out.extend_from_slice(b"\r\n");
    for r in rcpts {
        out.extend_from_slice(b"RCPT TO:<");
        out.extend_from_slice(r.as_bytes());
        out.extend_from_slice(b">\r\n");
    }
    out.extend_from_slice(b"DATA\r\n");
    out
}

/// The DATA payload: content with every line starting with "." doubled
/// (RFC 5321 §4.5.2), a final CRLF if missing, and the `.` terminator.
pub fn stuffed(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 8);
    stuff_into(&mut out, body);
    out
}

/// [`stuffed`], appended to `out`.
fn stuff_into(out: &mut Vec<u8>, body: &[u8]) {
    // A dot that starts a line is doubled; the content between such dots
    // is copied in one piece. (The content has no bare LF: the front end
    // refuses it, so "\n." marks every line that starts with a dot.)
    if body.first() == Some(&b'.') {
        out.push(b'.');
    }
    let mut from = 0;
    for nl in memchr::memmem::find_iter(body, b"\n.") {
        out.extend_from_slice(&body[from..=nl]);
        out.push(b'.');
        from = nl + 1;
    }
    out.extend_from_slice(&body[from..]);
    if !body.is_empty() && !body.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
}

fn is_2xx(r: &ReplyRecord) -> bool {
    r.code.is_some_and(|c| (200..300).contains(&c))
}

/// The most of an upstream reply's text kept. RFC 5321 §4.5.3.1.5 allows
/// 512 octets per line; the whole reply (up to 64 KiB) goes into every
/// recipient's attempt history, the envelope rewritten on each deferral
/// and the events, so a server sending kilobytes of text is cut here.
pub const REPLY_TEXT_MAX: usize = 2048;

/// Build a reply record: enhanced code taken from the first line when it
/// is well-formed (RFC 3463 §2; RFC 2034 §4), whatever its class: a 5xx
/// with a 4.x.x code is kept as it is, for the classifier to judge. The
/// text is cut at [`REPLY_TEXT_MAX`] bytes (on a character boundary).
pub fn parse_reply<L: AsRef<str>>(code: u16, lines: &[L]) -> ReplyRecord {
    let first = lines.first().map_or("", AsRef::as_ref);
    let enhanced = first.split(' ').next().filter(|tok| is_enhanced(tok, code));
    // One allocation for the text (this runs for every reply of every
    // transaction): lines without the enhanced code, joined by spaces.
    let mut text = String::with_capacity(lines.iter().map(|l| l.as_ref().len() + 1).sum());
    for (i, l) in lines.iter().map(AsRef::as_ref).enumerate() {
        if i > 0 {
            text.push(' ');
        }
        let l = match enhanced {
            Some(e) => l.strip_prefix(e).map_or(l, str::trim_start),
            None => l,
        };
        text.push_str(l);
        if text.len() > REPLY_TEXT_MAX {
            break;
        }
    }
    if text.len() > REPLY_TEXT_MAX {
        text.truncate(text.floor_char_boundary(REPLY_TEXT_MAX));
        text.push_str(" [...]");
    }
    ReplyRecord {
        code: Some(code),
        enhanced: enhanced.map(str::to_string),
        text,
    }
}

/// `class.subject.detail` (RFC 3463): three parts of 1–3 digits, class 2,
/// 4 or 5 (a 5xx with a 4.x.x code is kept: the classifier treats that trap).
fn is_enhanced(tok: &str, code: u16) -> bool {
    let mut parts = 0;
    for p in tok.split('.') {
        parts += 1;
        if parts > 3 || p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
    }
    parts == 3 && matches!(tok.as_bytes()[0], b'2' | b'4' | b'5') && tok.as_bytes()[1] == b'.' && code >= 200
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_stuffing() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"", b".\r\n"),
            (b"a\r\n", b"a\r\n.\r\n"),
            (b".a\r\n", b"..a\r\n.\r\n"),
            (b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
            (b"a\r\n..x\r\n", b"a\r\n...x\r\n.\r\n"),
            (b"no crlf", b"no crlf\r\n.\r\n"),
            (b"x.y\r\n", b"x.y\r\n.\r\n"),
            (b".\r\n.\r\n", b"..\r\n..\r\n.\r\n"),
            (b"a\r\n.b\r\nc\r\n.d", b"a\r\n..b\r\nc\r\n..d\r\n.\r\n"),
            (b"a\r\n.", b"a\r\n..\r\n.\r\n"),
        ];
        for (body, want) in cases {
            assert_eq!(stuffed(body), *want, "{:?}", String::from_utf8_lossy(body));
        }
    }

    #[tokio::test]
    async fn connect_tries_the_next_address_after_a_timeout() {
        // An address that drops SYNs: a listener whose accept queue is
        // full (Linux drops new SYNs then, as a filtered address does).
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let hole = socket.listen(0).unwrap();
        let hole_addr = hole.local_addr().unwrap();
        let mut queued = Vec::new();
        let black_hole = loop {
            match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(hole_addr)).await {
                Ok(Ok(s)) => queued.push(s),
                Ok(Err(e)) => panic!("{e}"),
                Err(_) => break true,
            }
            assert!(queued.len() < 64, "the accept queue never filled");
        };
        assert!(black_hole);
        let good = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good_addr = good.local_addr().unwrap();
        let refused = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let t = Duration::from_millis(500);
        let started = std::time::Instant::now();
        let tcp = connect_any(&[hole_addr, refused, good_addr], t)
            .await
            .expect("third address");
        assert_eq!(tcp.peer_addr().unwrap(), good_addr);
        // one timeout, not one per address, and not the whole budget
        assert!(started.elapsed() < t * 2, "{:?}", started.elapsed());
        let e = connect_any(&[hole_addr, refused], t).await.unwrap_err();
        assert!(e.contains(&format!("{hole_addr}: timed out")), "{e}");
        assert!(e.contains(&format!("{refused}: ")), "{e}");
        assert_eq!(connect_any(&[hole_addr], t).await.unwrap_err(), "timed out");
        // Only the first MAX_ADDRESSES are tried.
        let mut many = vec![refused; MAX_ADDRESSES];
        many.push(good_addr);
        let e = connect_any(&many, t).await.unwrap_err();
        assert_eq!(e.matches("; ").count(), MAX_ADDRESSES - 1, "{e}");
        many.swap(0, MAX_ADDRESSES);
        assert_eq!(connect_any(&many, t).await.unwrap().peer_addr().unwrap(), good_addr);
        assert_eq!(connect_any(&[], t).await.unwrap_err(), "the name has no address");
        drop(queued);
    }

    #[test]
    fn reply_lines_of_a_whole_reply() {
        let lines: Vec<&str> = reply_lines("250-mx.example\r\n250-SIZE 10\n250 8BITMIME\r\n").collect();
        assert_eq!(lines, ["mx.example", "SIZE 10", "8BITMIME"]);
        // A bare code, with or without its separator, has empty text.
        assert_eq!(reply_lines("354\r\n").collect::<Vec<_>>(), [""]);
        assert_eq!(reply_lines("250 \r\n").collect::<Vec<_>>(), [""]);
        let r = parse_reply(
            550,
            &reply_lines("550-5.7.1 first\r\n550 5.7.1 second\r\n").collect::<Vec<_>>(),
        );
        assert_eq!(
            (r.enhanced.as_deref(), r.text.as_str()),
            (Some("5.7.1"), "first second")
        );
    }

    #[test]
    fn reply_parsing() {
        let r = parse_reply(550, &["5.1.1 <x@y>: Recipient address rejected"]);
        assert_eq!(r.enhanced.as_deref(), Some("5.1.1"));
        assert_eq!(r.text, "<x@y>: Recipient address rejected");
        let r = parse_reply(550, &["5.7.1 first", "5.7.1 second"]);
        assert_eq!(r.text, "first second");
        let r = parse_reply(250, &["Ok"]);
        assert_eq!((r.enhanced, r.text.as_str()), (None, "Ok"));
        let r = parse_reply(421, &["4.7.0 Try again later, closing connection. (EHLO) 5si"]);
        assert_eq!(r.enhanced.as_deref(), Some("4.7.0"));
        let r = parse_reply(550, &["1.2.3 not enhanced"]);
        assert_eq!(r.enhanced, None);
        for not in ["5.1.1234 x", "5..1 x", "5.1.1.1 x", "a.b.c x", "5.1 x", "5.1.x y"] {
            let r = parse_reply(550, &[not]);
            assert_eq!((r.enhanced, r.text.as_str()), (None, not));
        }
        assert_eq!(parse_reply(150, &["5.1.1 x"]).enhanced, None);
        let r = parse_reply(250, &["2.0.0"]);
        assert_eq!((r.enhanced.as_deref(), r.text.as_str()), (Some("2.0.0"), ""));
        // continuation lines without the code are kept as they are
        let r = parse_reply(550, &["5.7.1 first", "more", "5.7.1  third"]);
        assert_eq!(r.text, "first more third");
        let r = parse_reply::<&str>(554, &[]);
        assert_eq!((r.code, r.enhanced, r.text.as_str()), (Some(554), None, ""));
        // A long reply is cut, on a character boundary, and says so.
        let line = format!("5.7.1 {}", "é".repeat(700));
        let r = parse_reply(550, &[line.as_str(), line.as_str()]);
        let kept = r.text.strip_suffix(" [...]").expect("marked as cut");
        assert!(
            (REPLY_TEXT_MAX - 1..=REPLY_TEXT_MAX).contains(&kept.len()),
            "{}",
            kept.len()
        );
        assert!(kept.ends_with("éé"));
        let r = parse_reply(550, &vec!["x"; 10_000]);
        assert_eq!(r.text.len(), REPLY_TEXT_MAX + " [...]".len());
    }
}
