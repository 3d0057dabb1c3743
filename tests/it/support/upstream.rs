//! A scripted upstream SMTP server, only for what real servers do not do on
//! demand: replies chosen per recipient and per attempt, 421 at greeting,
//! dropping the connection mid-DATA, hanging, trickling a reply, a missing
//! extension, and a STARTTLS/AUTH endpoint with the test certificate.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// What to do at a step.
#[derive(Clone, Debug, PartialEq)]
pub enum Act {
    Reply(String),
    /// Close the connection without replying.
    Drop,
    /// Never answer.
    Hang,
    /// Send this reply one byte every 150 ms.
    Trickle(String),
}

pub type RcptFn = dyn Fn(&str, usize) -> Act + Send + Sync;

#[derive(Clone)]
pub struct Script {
    pub greeting: Act,
    pub smtputf8: bool,
    pub starttls: bool,
    /// Require AUTH PLAIN with these credentials before MAIL.
    pub auth: Option<(String, String)>,
    /// Reply to MAIL FROM: (reverse-path, attempt number of this sender
    /// from 1). After a refusal, RCPT gets 503 and DATA 554, as Postfix.
    pub mail: Arc<RcptFn>,
    /// Reply to each RCPT: (address, attempt number of this address from 1).
    pub rcpt: Arc<RcptFn>,
    /// After DATA content, per transaction number (from 1).
    pub data_end: Arc<dyn Fn(usize) -> Act + Send + Sync>,
    /// Plaintext appended to the STARTTLS 220 in the same write (an attacker
    /// on the path injecting replies).
    pub starttls_inject: Option<String>,
    /// After this long without a command, say 421 and close (as Postfix does).
    pub idle_421: Option<std::time::Duration>,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            greeting: Act::Reply("220 upstream.test ESMTP scripted".into()),
            smtputf8: true,
            starttls: false,
            auth: None,
            mail: Arc::new(|_, _| Act::Reply("250 2.1.0 Ok".into())),
            rcpt: Arc::new(|_, _| Act::Reply("250 2.1.5 Ok".into())),
            data_end: Arc::new(|_| Act::Reply("250 2.0.0 Ok: queued".into())),
            starttls_inject: None,
            idle_421: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Received {
    pub mail: String,
    pub rcpts: Vec<String>,
    pub body: Vec<u8>,
}

pub struct Upstream {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<Received>>>,
    pub connections: Arc<AtomicUsize>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

impl Upstream {
    pub async fn start(script: Script) -> Upstream {
        Self::start_on(TcpListener::bind("127.0.0.1:0").await.unwrap(), script)
    }

    pub fn start_on(listener: TcpListener, script: Script) -> Upstream {
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let attempts: Arc<Mutex<std::collections::HashMap<String, usize>>> = Default::default();
        let txns = Arc::new(AtomicUsize::new(0));
        let (r, c) = (Arc::clone(&received), Arc::clone(&connections));
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                c.fetch_add(1, Ordering::SeqCst);
                let (script, r, attempts, txns) =
                    (script.clone(), Arc::clone(&r), Arc::clone(&attempts), Arc::clone(&txns));
                tokio::spawn(async move {
                    let _ = serve(tcp, script, r, attempts, txns).await;
                });
            }
        });
        Upstream {
            addr,
            received,
            connections,
            task: Some(task),
        }
    }

    /// Stop listening (the port is free when this returns).
    pub async fn stop(mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }

    pub fn messages(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

enum Io<S> {
    Plain(BufReader<S>),
    Tls(Box<BufReader<tokio_rustls::server::TlsStream<S>>>),
}

async fn serve(
    tcp: tokio::net::TcpStream,
    script: Script,
    received: Arc<Mutex<Vec<Received>>>,
    attempts: Arc<Mutex<std::collections::HashMap<String, usize>>>,
    txns: Arc<AtomicUsize>,
) -> std::io::Result<()> {
    let mut io = Io::Plain(BufReader::new(tcp));
    match &script.greeting {
        Act::Reply(t) => send(&mut io, t).await?,
        Act::Drop => return Ok(()),
        Act::Hang => return hang().await,
        Act::Trickle(t) => trickle(&mut io, t).await?,
    }
    let mut authed = script.auth.is_none();
    let (mut mail, mut rcpts) = (String::new(), Vec::new());
    let mut in_transaction = false;
    let mut senders: std::collections::HashMap<String, usize> = Default::default();
    loop {
        let line = match script.idle_421 {
            Some(d) => match tokio::time::timeout(d, read_line(&mut io)).await {
                Ok(l) => l?,
                Err(_) => {
                    send(&mut io, "421 4.4.2 upstream.test Error: timeout exceeded").await?;
                    return Ok(());
                }
            },
            None => read_line(&mut io).await?,
        };
        if line.is_empty() {
            return Ok(());
        }
        let upper = line.to_ascii_uppercase();
        if upper.starts_with("EHLO") {
            let mut ext = vec![
                "250-upstream.test",
                "250-PIPELINING",
                "250-SIZE 52428800",
                "250-8BITMIME",
            ];
            if script.smtputf8 {
                ext.push("250-SMTPUTF8");
            }
            if script.starttls && matches!(io, Io::Plain(_)) {
                ext.push("250-STARTTLS");
            }
            if script.auth.is_some() && matches!(io, Io::Tls(_)) {
                ext.push("250-AUTH PLAIN");
            }
            ext.push("250 ENHANCEDSTATUSCODES");
            send(&mut io, &ext.join("\r\n")).await?;
        } else if upper == "STARTTLS" {
            match &script.starttls_inject {
                Some(inj) => send(&mut io, &format!("220 2.0.0 go ahead\r\n{inj}")).await?,
                None => send(&mut io, "220 2.0.0 go ahead").await?,
            }
            let Io::Plain(b) = io else { return Ok(()) };
            let p = super::pki();
            let certs = rustls_pemfile::certs(&mut p.cert_pem.as_bytes())
                .map(|c| c.unwrap())
                .collect();
            let key = rustls_pemfile::private_key(&mut p.key_pem.as_bytes()).unwrap().unwrap();
            let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .unwrap();
            let tls = tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
                .accept(b.into_inner())
                .await?;
            io = Io::Tls(Box::new(BufReader::new(tls)));
        } else if upper.starts_with("AUTH PLAIN ") {
            use base64::Engine;
            let (u, p) = script.auth.clone().unwrap();
            let want = base64::engine::general_purpose::STANDARD.encode(format!("\0{u}\0{p}"));
            if line[11..] == want {
                authed = true;
                send(&mut io, "235 2.7.0 Authentication successful").await?;
            } else {
                send(&mut io, "535 5.7.8 Error: authentication failed").await?;
            }
        } else if upper.starts_with("MAIL FROM:") {
            if !authed {
                send(&mut io, "530 5.7.0 Authentication required").await?;
                continue;
            }
            mail = line[10..].to_string();
            rcpts.clear();
            let from = mail.trim().trim_matches(['<', '>']).to_string();
            let n = {
                let e = senders.entry(from.clone()).or_insert(0);
                *e += 1;
                *e
            };
            match (script.mail)(&from, n) {
                Act::Reply(t) => {
                    in_transaction = t.starts_with('2');
                    send(&mut io, &t).await?
                }
                Act::Drop => return Ok(()),
                Act::Hang => return hang().await,
                Act::Trickle(t) => trickle(&mut io, &t).await?,
            }
        } else if upper.starts_with("RCPT TO:") && !in_transaction {
            send(&mut io, "503 5.5.1 Error: need MAIL command").await?;
        } else if upper.starts_with("RCPT TO:") {
            let addr = line[8..].trim().trim_matches(['<', '>']).to_string();
            let n = {
                let mut a = attempts.lock().unwrap();
                let e = a.entry(addr.clone()).or_insert(0);
                *e += 1;
                *e
            };
            match (script.rcpt)(&addr, n) {
                Act::Reply(t) => {
                    if t.starts_with('2') {
                        rcpts.push(addr);
                    }
                    send(&mut io, &t).await?
                }
                Act::Drop => return Ok(()),
                Act::Hang => return hang().await,
                Act::Trickle(t) => trickle(&mut io, &t).await?,
            }
        } else if upper == "DATA" {
            if rcpts.is_empty() {
                send(&mut io, "554 5.5.1 Error: no valid recipients").await?;
                continue;
            }
            send(&mut io, "354 End data with <CR><LF>.<CR><LF>").await?;
            let n = txns.fetch_add(1, Ordering::SeqCst) + 1;
            let act = (script.data_end)(n);
            let mut body = Vec::new();
            loop {
                let l = read_raw_line(&mut io).await?;
                if l.is_empty() {
                    return Ok(());
                }
                if act == Act::Drop && body.len() > 10 {
                    return Ok(()); // drop mid-DATA
                }
                if l == b".\r\n" {
                    break;
                }
                let l = if l.starts_with(b"..") { &l[1..] } else { &l[..] };
                body.extend_from_slice(l);
            }
            match act {
                Act::Reply(t) => {
                    if t.starts_with('2') {
                        received.lock().unwrap().push(Received {
                            mail: mail.clone(),
                            rcpts: rcpts.clone(),
                            body,
                        });
                    }
                    send(&mut io, &t).await?;
                }
                Act::Drop => return Ok(()),
                Act::Hang => return hang().await,
                Act::Trickle(t) => trickle(&mut io, &t).await?,
            }
            in_transaction = false;
        } else if upper == "RSET" || upper == "NOOP" {
            in_transaction &= upper == "NOOP";
            send(&mut io, "250 2.0.0 Ok").await?;
        } else if upper == "QUIT" {
            send(&mut io, "221 2.0.0 Bye").await?;
            return Ok(());
        } else {
            send(&mut io, "502 5.5.2 Error: command not recognized").await?;
        }
    }
}

async fn hang() -> std::io::Result<()> {
    tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
    Ok(())
}

async fn send<S: AsyncRead + AsyncWrite + Unpin>(io: &mut Io<S>, text: &str) -> std::io::Result<()> {
    let data = format!("{text}\r\n");
    match io {
        Io::Plain(b) => b.get_mut().write_all(data.as_bytes()).await,
        Io::Tls(b) => b.get_mut().write_all(data.as_bytes()).await,
    }
}

async fn trickle<S: AsyncRead + AsyncWrite + Unpin>(io: &mut Io<S>, text: &str) -> std::io::Result<()> {
    for b in format!("{text}\r\n").bytes() {
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        match io {
            Io::Plain(s) => s.get_mut().write_all(&[b]).await?,
            Io::Tls(s) => s.get_mut().write_all(&[b]).await?,
        }
    }
    Ok(())
}

async fn read_raw_line<S: AsyncRead + AsyncWrite + Unpin>(io: &mut Io<S>) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::new();
    match io {
        Io::Plain(b) => b.read_until(b'\n', &mut v).await?,
        Io::Tls(b) => b.read_until(b'\n', &mut v).await?,
    };
    Ok(v)
}

async fn read_line<S: AsyncRead + AsyncWrite + Unpin>(io: &mut Io<S>) -> std::io::Result<String> {
    let v = read_raw_line(io).await?;
    Ok(String::from_utf8_lossy(&v).trim_end_matches(['\r', '\n']).to_string())
}
