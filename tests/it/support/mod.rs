//! Test support: certificates, configs, an in-process server on ephemeral
//! ports, a raw SMTP client (plain and TLS) and a capturing sink.

pub mod client;
pub mod dns;
pub mod postfix;
pub mod redis;
pub mod sink;
pub mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use sendguard::config::Config;
use sendguard::smtp::{Enhanced, Reply};
use sendguard::submission::{MessageSink, SharedSink, Submission, SubmitFuture};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub const PASSWORD: &str = "correct horse battery staple";

/// A test CA and a server certificate for `localhost` / 127.0.0.1.
pub struct Pki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

pub fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "sendguard test CA");
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        leaf.subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        leaf.distinguished_name.push(DnType::CommonName, "localhost");
        let key = KeyPair::generate().unwrap();
        let cert = leaf.signed_by(&key, &ca_cert, &ca_key).unwrap();
        Pki {
            ca_pem: ca_cert.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    })
}

/// argon2id hash of [`PASSWORD`], computed once.
pub fn password_hash() -> &'static str {
    static H: OnceLock<String> = OnceLock::new();
    H.get_or_init(|| sendguard::server::auth::hash_password(PASSWORD).unwrap())
}

/// A temp dir holding the certificates and a config file.
pub struct Workdir {
    pub dir: tempfile::TempDir,
}

impl Workdir {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let p = pki();
        std::fs::write(dir.path().join("cert.pem"), &p.cert_pem).unwrap();
        std::fs::write(dir.path().join("key.pem"), &p.key_pem).unwrap();
        std::fs::write(dir.path().join("ca.pem"), &p.ca_pem).unwrap();
        Workdir { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn write_config(&self, text: &str) -> PathBuf {
        let p = self.path("sendguard.toml");
        std::fs::write(&p, text).unwrap();
        p
    }
}

/// The standard test config: listener 0 is STARTTLS + AUTH (587 style),
/// listener 1 implicit TLS + AUTH (465 style), listener 2 plain trusted
/// network for tenant `local`. `extra` is appended (e.g. `[limits]`).
pub fn standard_config(addrs: [&str; 3], extra: &str) -> String {
    format!(
        r#"
[server]
hostname = "sendguard.test"
shutdown_grace = "5s"

[tls]
cert = "cert.pem"
key = "key.pem"

[[listeners]]
addr = "{a0}"
tls = "starttls"
auth = "required"

[[listeners]]
addr = "{a1}"
tls = "implicit"
auth = "required"

[[listeners]]
addr = "{a2}"
tls = "none"
auth = "none"
trusted_networks = ["127.0.0.0/8", "::1/128"]
tenant = "local"

[[tenants]]
name = "acme"
sender_domains = ["acme.example"]
sender_addresses = ["agent@partner.example"]
guard = "off"
[[tenants.users]]
username = "app"
password_hash = "{hash}"

[[tenants]]
name = "local"
sender_domains = ["local.example"]
guard = "off"

{extra}
"#,
        a0 = addrs[0],
        a1 = addrs[1],
        a2 = addrs[2],
        hash = password_hash(),
    )
}

/// Records every submission and answers with a fixed reply.
pub struct CaptureSink {
    pub got: Mutex<Vec<Submission>>,
    pub reply: Reply,
}

impl CaptureSink {
    pub fn accepting() -> Arc<Self> {
        Arc::new(CaptureSink {
            got: Mutex::new(Vec::new()),
            reply: Reply::new(250, Enhanced(2, 0, 0), "queued as TEST"),
        })
    }

    pub fn messages(&self) -> Vec<Submission> {
        self.got.lock().unwrap().clone()
    }
}

impl MessageSink for CaptureSink {
    fn submit(&self, msg: Submission) -> SubmitFuture<'_> {
        self.got.lock().unwrap().push(msg);
        let reply = self.reply.clone();
        Box::pin(async move { reply })
    }
}

/// A sendguard server running in-process on ephemeral loopback ports.
pub struct TestServer {
    pub addrs: Vec<SocketAddr>,
    pub shutdown: CancellationToken,
    pub task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    pub sink: Arc<CaptureSink>,
    pub work: Workdir,
}

impl TestServer {
    /// Start with [`standard_config`] plus `extra` TOML.
    pub async fn start(extra: &str) -> TestServer {
        let sink = CaptureSink::accepting();
        Self::start_with(extra, sink.clone() as SharedSink, sink).await
    }

    pub async fn start_with(extra: &str, sink: SharedSink, capture: Arc<CaptureSink>) -> TestServer {
        let work = Workdir::new();
        let path = work.write_config(&standard_config(["127.0.0.1:0"; 3], extra));
        let cfg = Arc::new(Config::load(&path).expect("test config is valid"));
        let mut socks = Vec::new();
        for _ in 0..cfg.listeners.len() {
            socks.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
        }
        let addrs = socks.iter().map(|s| s.local_addr().unwrap()).collect();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(sendguard::server::run(
            cfg,
            socks,
            sendguard::server::Handles::new(sink, sendguard::events::Events::disabled()),
            shutdown.clone(),
        ));
        TestServer {
            addrs,
            shutdown,
            task: Some(task),
            sink: capture,
            work,
        }
    }

    /// Wait until `run` returned (after `shutdown` was cancelled).
    pub async fn finished(&mut self) {
        self.task.take().expect("not yet awaited").await.unwrap().unwrap();
    }

    pub fn submission(&self) -> SocketAddr {
        self.addrs[0]
    }
    pub fn implicit(&self) -> SocketAddr {
        self.addrs[1]
    }
    pub fn trusted(&self) -> SocketAddr {
        self.addrs[2]
    }
    pub fn ca_path(&self) -> PathBuf {
        self.work.path("ca.pem")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// True when an external tool is installed; tests that need it fail loudly
/// instead of skipping, because `.ci/run` installs them.
pub fn require_tool(name: &str) -> PathBuf {
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/usr/bin"])
    {
        let p = PathBuf::from(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("{name} is not installed: run scripts/install-deps (or see README)");
}

/// sendguard with the real store-and-forward pipeline (spool, queue,
/// relay workers, events log) in a work dir that survives restarts.
pub struct Forwarder {
    pub addrs: Vec<SocketAddr>,
    pub shutdown: CancellationToken,
    pub queue: Arc<sendguard::queue::Queue>,
    /// The admin API, when the config has `[admin]` (bound on port 0).
    pub admin: Option<SocketAddr>,
    pub suppress: Option<Arc<dyn sendguard::suppress::SuppressionStore>>,
    task: Option<tokio::task::JoinHandle<()>>,
    events_path: PathBuf,
}

/// `[spool]`, `[relay]`, `[queue]`, `[events]` and `[shaping]` for a
/// forwarder test; the retry schedule is short so tests run in seconds, and
/// recipient domains are not looked up (no test depends on the machine's
/// resolver; the shaping tests bring their own DNS server).
pub fn forward_config(relay: SocketAddr, relay_extra: &str, queue_extra: &str) -> String {
    format!(
        "[spool]\ndir = \"spool\"\n[relay]\naddr = \"{relay}\"\ntls = \"none\"\nmax_connections = 4\n{relay_extra}\n[queue]\nfirst_retry = \"200ms\"\nmax_retry = \"1s\"\n{queue_extra}\n[events]\npath = \"events.jsonl\"\n[shaping]\ngroup_by_mx = false\n"
    )
}

impl Forwarder {
    pub async fn start(work: &Workdir, sections: &str) -> Forwarder {
        Self::start_text(work, &standard_config(["127.0.0.1:0"; 3], sections)).await
    }

    /// Start from a whole config text (listener addresses are replaced by
    /// port-0 sockets).
    pub async fn start_text(work: &Workdir, text: &str) -> Forwarder {
        init_logging();
        let path = work.write_config(text);
        let cfg = Arc::new(Config::load(&path).expect("test config is valid"));
        let pipeline = sendguard::pipeline::Pipeline::start(&cfg)
            .await
            .expect("pipeline starts");
        let mut socks = Vec::new();
        for _ in 0..cfg.listeners.len() {
            socks.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
        }
        let addrs = socks.iter().map(|s| s.local_addr().unwrap()).collect();
        let shutdown = CancellationToken::new();
        let queue = pipeline.queue.clone().expect("spool configured");
        let admin = match &cfg.admin {
            Some(_) => {
                let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
                let addr = l.local_addr().unwrap();
                let state = Arc::new(sendguard::admin::AdminState::new(
                    Arc::clone(&cfg),
                    &pipeline,
                    Some(path.clone()),
                ));
                tokio::spawn(sendguard::admin::serve(l, state, shutdown.clone()));
                Some(addr)
            }
            None => None,
        };
        let suppress = pipeline.suppress.clone();
        let (handles, stop) = (pipeline.handles(), shutdown.clone());
        let task = tokio::spawn(async move {
            let grace = cfg.server.shutdown_grace;
            sendguard::server::run(cfg, socks, handles, stop).await.unwrap();
            pipeline.shutdown(grace).await;
        });
        Forwarder {
            addrs,
            shutdown,
            queue,
            admin,
            suppress,
            task: Some(task),
            events_path: work.path("events.jsonl"),
        }
    }

    pub fn trusted(&self) -> SocketAddr {
        self.addrs[2]
    }

    /// Stop accepting, drain, stop delivery, close the spool.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            tokio::time::timeout(std::time::Duration::from_secs(20), t)
                .await
                .expect("forwarder stops")
                .unwrap();
        }
    }

    pub fn events(&self) -> Vec<serde_json::Value> {
        read_events(&self.events_path)
    }

    /// Wait until `n` events match `pred`; returns them.
    pub async fn wait_events(
        &self,
        n: usize,
        timeout: std::time::Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let m: Vec<_> = self.events().into_iter().filter(|e| pred(e)).collect();
            if m.len() >= n {
                return m;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "only {} of {n} matching events after {timeout:?}; all events: {:#?}",
                m.len(),
                self.events()
            );
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub fn read_events(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad event line ({e}): {l}")))
        .collect()
}

/// Send one message over the trusted listener; returns the final reply.
pub async fn send_trusted(addr: SocketAddr, from: &str, rcpts: &[&str], body: &str) -> client::Resp {
    let (mut c, _) = client::Client::connect(addr).await;
    c.cmd("EHLO client.test").await;
    c.cmd(&format!("MAIL FROM:<{from}>")).await.expect(250, "2.1.0");
    for r in rcpts {
        c.cmd(&format!("RCPT TO:<{r}>")).await.expect(250, "2.1.5");
    }
    c.cmd("DATA").await.expect(354, "");
    c.send_raw(body.as_bytes()).await;
    c.send_raw(b".\r\n").await;
    let r = c.reply().await;
    let _ = c.cmd("QUIT").await;
    r
}

/// `SENDGUARD_TEST_LOG=debug cargo nextest run NAME --no-capture` shows the
/// server's logs in a test.
pub fn init_logging() {
    if let Ok(level) = std::env::var("SENDGUARD_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(level)
            .with_test_writer()
            .try_init();
    }
}

/// Submit one small message on a forwarder's trusted listener; it must be
/// accepted with 250.
pub async fn submit(fwd: &Forwarder, rcpts: &[&str], subject: &str) {
    send_trusted(
        fwd.trusted(),
        "a@local.example",
        rcpts,
        &format!("Subject: {subject}\r\n\r\nx\r\n"),
    )
    .await
    .expect(250, "2.0.0");
}

/// Event filter: `"event" == kind`.
pub fn is(kind: &'static str) -> impl Fn(&serde_json::Value) -> bool {
    move |e| e["event"] == kind
}

/// A forwarder relaying over verified STARTTLS (test CA) to `up`.
pub async fn starttls_forwarder(work: &Workdir, up: std::net::SocketAddr) -> Forwarder {
    let relay = format!(
        "tls = \"starttls\"\ntls_server_name = \"localhost\"\nca_file = \"{}\"",
        work.path("ca.pem").display()
    );
    let sections = forward_config(up, &relay, "").replace("tls = \"none\"\n", "");
    Forwarder::start(work, &sections).await
}
