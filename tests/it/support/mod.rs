//! Test support: certificates, configs, an in-process server on ephemeral
//! ports, a raw SMTP client (plain and TLS) and a capturing sink.

pub mod client;

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
        ca.distinguished_name
            .push(DnType::CommonName, "sendguard test CA");
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        leaf.subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        leaf.distinguished_name
            .push(DnType::CommonName, "localhost");
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
[[tenants.users]]
username = "app"
password_hash = "{hash}"

[[tenants]]
name = "local"
sender_domains = ["local.example"]

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

    pub async fn start_with(
        extra: &str,
        sink: SharedSink,
        capture: Arc<CaptureSink>,
    ) -> TestServer {
        let work = Workdir::new();
        let path = work.write_config(&standard_config(["127.0.0.1:0"; 3], extra));
        let cfg = Arc::new(Config::load(&path).expect("test config is valid"));
        let mut socks = Vec::new();
        for _ in 0..cfg.listeners.len() {
            socks.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
        }
        let addrs = socks.iter().map(|s| s.local_addr().unwrap()).collect();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(sendguard::server::run(cfg, socks, sink, shutdown.clone()));
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
        self.task
            .take()
            .expect("not yet awaited")
            .await
            .unwrap()
            .unwrap();
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
    panic!("{name} is not installed: run .ci/install-deps (or see README)");
}
