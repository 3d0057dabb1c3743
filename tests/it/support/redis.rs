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
}

impl Redis {
    pub fn start() -> Redis {
        let port = super::sink::free_port();
        let mut r = Redis {
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
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
        let child = Command::new(bin)
            .args(["--bind", "127.0.0.1", "--port", &self.addr.port().to_string()])
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

    fn ping(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)) else {
            return false;
        };
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
