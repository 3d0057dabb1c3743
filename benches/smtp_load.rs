//! SMTP load generator for the throughput benchmark (`benches/throughput.sh`).
//!
//! Sends N messages of a given size over S concurrent sessions (optionally
//! STARTTLS + AUTH), pipelining MAIL/RCPT/DATA, then waits until an
//! smtp-sink counter file (`smtp-sink -c` output) shows every message
//! arrived, and prints one JSON line: messages per second end to end.
//!
//!   cargo bench --bench smtp_load -- --addr 127.0.0.1:2525 --messages 20000 \
//!       --size 2048 --sessions 20 --sink-counter /tmp/sink.out

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[derive(Parser, Clone)]
struct Args {
    #[arg(long)]
    addr: String,
    #[arg(long, default_value_t = 10000)]
    messages: usize,
    /// Approximate message size in bytes.
    #[arg(long, default_value_t = 2048)]
    size: usize,
    #[arg(long, default_value_t = 20)]
    sessions: usize,
    /// Messages per session before reconnecting (0 = one session for all).
    #[arg(long, default_value_t = 0)]
    per_session: usize,
    #[arg(long)]
    starttls: bool,
    /// `user:password` for AUTH PLAIN (after STARTTLS).
    #[arg(long)]
    auth: Option<String>,
    #[arg(long, default_value = "load@local.example")]
    from: String,
    #[arg(long, default_value = "rcpt@dest.example")]
    to: String,
    /// smtp-sink `-c` output file: wait until its mesg counter grew by N.
    #[arg(long)]
    sink_counter: Option<String>,
    /// Label for the JSON line.
    #[arg(long, default_value = "run")]
    label: String,
    /// Wait at most this many seconds for the sink to see every message.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
}

fn sink_count(path: &str) -> usize {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.rsplit(['\r', '\n'])
        .find_map(|rec| {
            rec.split_whitespace()
                .find_map(|kv| kv.strip_prefix("mesg="))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

async fn reply(r: &mut BufReader<Box<dyn Io>>) -> std::io::Result<u16> {
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 {
            return Err(std::io::Error::other("server closed"));
        }
        if line.as_bytes().get(3) != Some(&b'-') {
            return line
                .get(..3)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| std::io::Error::other(format!("bad reply {line:?}")));
        }
    }
}

async fn expect(r: &mut BufReader<Box<dyn Io>>, want: u16) -> std::io::Result<()> {
    let c = reply(r).await?;
    if c / 100 != want / 100 {
        return Err(std::io::Error::other(format!("expected {want}, got {c}")));
    }
    Ok(())
}

async fn session(
    args: Arc<Args>,
    tls: Option<tokio_rustls::TlsConnector>,
    next: Arc<AtomicUsize>,
    body: Arc<Vec<u8>>,
) -> std::io::Result<usize> {
    let mut sent = 0;
    'outer: loop {
        if next.load(Ordering::Relaxed) >= args.messages {
            return Ok(sent);
        }
        let tcp = TcpStream::connect(&args.addr).await?;
        tcp.set_nodelay(true)?;
        let mut r: BufReader<Box<dyn Io>> = BufReader::new(Box::new(tcp));
        expect(&mut r, 220).await?;
        r.get_mut().write_all(b"EHLO load.test\r\n").await?;
        expect(&mut r, 250).await?;
        if let Some(tls) = &tls {
            r.get_mut().write_all(b"STARTTLS\r\n").await?;
            expect(&mut r, 220).await?;
            let plain = r.into_inner();
            // Re-wrap: the boxed stream is the TCP socket we created.
            let tcp: Box<dyn Io> = plain;
            let stream = tls
                .connect(rustls::pki_types::ServerName::try_from("localhost").unwrap(), tcp)
                .await?;
            r = BufReader::new(Box::new(stream));
            r.get_mut().write_all(b"EHLO load.test\r\n").await?;
            expect(&mut r, 250).await?;
        }
        if let Some(a) = &args.auth {
            use base64::Engine;
            let (u, p) = a.split_once(':').expect("--auth user:password");
            let m = base64::engine::general_purpose::STANDARD.encode(format!("\0{u}\0{p}"));
            r.get_mut().write_all(format!("AUTH PLAIN {m}\r\n").as_bytes()).await?;
            expect(&mut r, 235).await?;
        }
        let envelope = format!("MAIL FROM:<{}>\r\nRCPT TO:<{}>\r\nDATA\r\n", args.from, args.to);
        let mut in_session = 0;
        loop {
            let n = next.fetch_add(1, Ordering::Relaxed);
            if n >= args.messages {
                let _ = r.get_mut().write_all(b"QUIT\r\n").await;
                return Ok(sent);
            }
            r.get_mut().write_all(envelope.as_bytes()).await?;
            expect(&mut r, 250).await?;
            expect(&mut r, 250).await?;
            expect(&mut r, 354).await?;
            let mut msg = format!("Message-ID: <{n}.load@local.example>\r\n").into_bytes();
            msg.extend_from_slice(&body);
            msg.extend_from_slice(b".\r\n");
            r.get_mut().write_all(&msg).await?;
            expect(&mut r, 250).await?;
            sent += 1;
            in_session += 1;
            if args.per_session > 0 && in_session >= args.per_session {
                r.get_mut().write_all(b"QUIT\r\n").await?;
                let _ = reply(&mut r).await;
                continue 'outer;
            }
        }
    }
}

fn main() {
    // `cargo bench` passes --bench; ignore it.
    let argv: Vec<String> = std::env::args().filter(|a| a != "--bench").collect();
    let args = Arc::new(Args::parse_from(argv));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut body = format!("From: <{}>\r\nTo: <{}>\r\nSubject: load test\r\n\r\n", args.from, args.to).into_bytes();
        let line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcd\r\n";
        while body.len() + line.len() <= args.size {
            body.extend_from_slice(line);
        }
        let body = Arc::new(body);
        let tls = args.starttls.then(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let cfg = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerify(rustls::crypto::ring::default_provider())))
                .with_no_client_auth();
            tokio_rustls::TlsConnector::from(Arc::new(cfg))
        });
        let before = args.sink_counter.as_deref().map(sink_count).unwrap_or(0);
        let next = Arc::new(AtomicUsize::new(0));
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..args.sessions {
            tasks.push(tokio::spawn(session(Arc::clone(&args), tls.clone(), Arc::clone(&next), Arc::clone(&body))));
        }
        let mut sent = 0;
        let mut errors = Vec::new();
        for t in tasks {
            match t.await.unwrap() {
                Ok(n) => sent += n,
                Err(e) => errors.push(e.to_string()),
            }
        }
        let submitted = t0.elapsed();
        let cpu = cpu_seconds();
        let mut end = submitted;
        if let Some(path) = &args.sink_counter {
            let deadline = Instant::now() + Duration::from_secs(args.timeout);
            while sink_count(path) < before + sent {
                if Instant::now() > deadline {
                    eprintln!("sink saw {} of {sent}", sink_count(path) - before);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            end = t0.elapsed();
        }
        println!(
            "{{\"label\":\"{}\",\"messages\":{sent},\"size\":{},\"sessions\":{},\"errors\":{},\"submit_s\":{:.3},\"end_to_end_s\":{:.3},\"msg_per_s\":{:.0},\"load_cpu_us_per_msg\":{}}}",
            args.label,
            body.len(),
            args.sessions,
            errors.len(),
            submitted.as_secs_f64(),
            end.as_secs_f64(),
            sent as f64 / end.as_secs_f64(),
            cpu.map_or("null".to_string(), |c| format!("{:.1}", c * 1e6 / sent.max(1) as f64))
        );
        if !errors.is_empty() {
            eprintln!("session errors: {:?}", &errors[..errors.len().min(5)]);
        }
    });
}

/// CPU time (user + system) this process has used so far, in seconds.
fn cpu_seconds() -> Option<f64> {
    // SAFETY: getrusage only writes the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return None;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Some(secs(ru.ru_utime) + secs(ru.ru_stime))
}

#[derive(Debug)]
struct NoVerify(rustls::crypto::CryptoProvider);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
