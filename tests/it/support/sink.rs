//! Postfix's `smtp-sink` as the upstream: started on an ephemeral loopback
//! port, dumping every transaction to a file we parse back.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Sink {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    child: Child,
}

/// One dumped transaction.
#[derive(Debug, Clone)]
pub struct SinkMsg {
    pub mail_from: String,
    pub rcpts: Vec<String>,
    /// Content as dumped (smtp-sink writes LF line endings).
    pub body: String,
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Sink {
    /// Start smtp-sink on a new port; `extra` are smtp-sink options such as
    /// `["-r", "RCPT"]` (4xx every RCPT) or `["-f", "RCPT"]` (5xx).
    pub fn start(extra: &[&str]) -> Sink {
        Self::start_on(free_port(), extra)
    }

    pub fn start_on(port: u16, extra: &[&str]) -> Sink {
        let bin = super::require_tool("smtp-sink");
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut cmd = Command::new(bin);
        if is_root() {
            cmd.args(["-u", "root"]);
        }
        cmd.args(extra)
            .arg("-d")
            .arg(dir.path().join("m."))
            .arg(addr.to_string())
            .arg("256")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().expect("start smtp-sink");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "smtp-sink did not start on {addr}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Sink { addr, dir, child }
    }

    pub fn files(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    }

    /// Every transaction received so far.
    pub fn messages(&self) -> Vec<SinkMsg> {
        let mut out = Vec::new();
        for p in self.files() {
            let Ok(text) = std::fs::read_to_string(&p) else {
                continue;
            };
            let mut m = SinkMsg {
                mail_from: String::new(),
                rcpts: Vec::new(),
                body: String::new(),
            };
            let mut lines = text.split_inclusive('\n');
            for l in lines.by_ref() {
                if let Some(v) = l.strip_prefix("X-Mail-Args: ") {
                    m.mail_from = v
                        .trim()
                        .split(' ')
                        .next()
                        .unwrap_or("")
                        .trim_matches(['<', '>'])
                        .to_string();
                } else if let Some(v) = l.strip_prefix("X-Rcpt-Args: ") {
                    m.rcpts.push(
                        v.trim()
                            .split(' ')
                            .next()
                            .unwrap_or("")
                            .trim_matches(['<', '>'])
                            .to_string(),
                    );
                } else if l.starts_with("Received: ") {
                    // smtp-sink's own Received header (2 continuation lines) ends its prefix
                    lines.next();
                    lines.next();
                    break;
                }
            }
            m.body = lines.collect();
            out.push(m);
        }
        out
    }

    /// Wait until at least `n` transactions arrived and their dump files
    /// stopped changing (smtp-sink writes them while data arrives).
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<SinkMsg> {
        let deadline = Instant::now() + timeout;
        let snapshot = || -> Vec<(PathBuf, u64)> {
            let mut v: Vec<_> = self
                .files()
                .into_iter()
                .map(|p| (p.clone(), p.metadata().map(|m| m.len()).unwrap_or(0)))
                .collect();
            v.sort();
            v
        };
        loop {
            let before = snapshot();
            if before.len() >= n {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if snapshot() == before {
                    return self.messages();
                }
            }
            assert!(
                Instant::now() < deadline,
                "sink has {} of {n} messages after {timeout:?}",
                before.len()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop();
    }
}
