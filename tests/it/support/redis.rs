//! A real `redis-server` (Debian package) on an ephemeral loopback port,
//! without persistence, that a test can kill and start again on the same
//! port.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Redis {
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Extra server arguments (password, TLS).
    args: Vec<String>,
    tls: bool,
}

impl Redis {
    pub fn start() -> Redis {
        Self::start_with(&[], false)
    }

    /// With `requirepass`.
    pub fn with_password(password: &str) -> Redis {
        Self::start_with(&["--requirepass", password], false)
    }

    /// TLS only, with the test PKI's `localhost` certificate (clients need
    /// not present one).
    pub fn with_tls() -> Redis {
        let dir = tempfile::tempdir().unwrap();
        let p = super::pki();
        for (name, pem) in [
            ("cert.pem", &p.cert_pem),
            ("key.pem", &p.key_pem),
            ("ca.pem", &p.ca_pem),
        ] {
            std::fs::write(dir.path().join(name), pem).unwrap();
        }
        let path = |n: &str| dir.path().join(n).display().to_string();
        let args = [
            "--tls-cert-file".to_string(),
            path("cert.pem"),
            "--tls-key-file".into(),
            path("key.pem"),
            "--tls-ca-cert-file".into(),
            path("ca.pem"),
            "--tls-auth-clients".into(),
            "no".into(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = Self::start_with(&args, true);
        drop(dir); // redis-server read its files at start
        r
    }

    fn start_with(args: &[&str], tls: bool) -> Redis {
        let port = super::sink::free_port();
        let mut r = Redis {
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
            args: args.iter().map(|a| a.to_string()).collect(),
            tls,
        };
        r.restart();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    /// Start (again) on the same port, with an empty data set.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "redis-server already running");
        let bin = super::require_tool("redis-server");
        let port = self.addr.port().to_string();
        let ports: [&str; 4] = if self.tls {
            ["--port", "0", "--tls-port", &port]
        } else {
            ["--port", &port, "--tls-port", "0"]
        };
        let child = Command::new(bin)
            .args(["--bind", "127.0.0.1"])
            .args(ports)
            .args(&self.args)
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.ping() {
            assert!(Instant::now() < deadline, "redis-server did not start on {}", self.addr);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `kill -9`: what an outage looks like to the nodes.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Answers PING (or, with TLS or a password, accepts connections).
    fn ping(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)) else {
            return false;
        };
        if self.tls || !self.args.is_empty() {
            return true;
        }
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut buf = [0u8; 16];
        s.write_all(b"PING\r\n").is_ok() && s.read(&mut buf).is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
    }

    /// One command through `redis-cli`, its output trimmed.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(super::require_tool("redis-cli"))
            .args(["-h", "127.0.0.1", "-p", &self.addr.port().to_string()])
            .args(args)
            .output()
            .expect("run redis-cli");
        assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}
