//! A real DNS server for the guard tests: unbound (Debian), started on a
//! free loopback port from a config the test writes, serving `local-data`
//! records and NXDOMAIN for every other name (`local-zone: "." static`, so it
//! never recurses). Two zones are always there for failure cases:
//! `servfail.test` (forwarded to a closed TCP port: SERVFAIL in ~2 ms) and
//! `timeout.test` (queries dropped: the client times out).
//!
//! Queries are counted from unbound's query log (`log-queries: yes`), which
//! is how the tests prove that a warm cache sends nothing.

use std::io::Write;
use std::net::{TcpListener, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct TestDns {
    pub port: u16,
    pub dir: PathBuf,
    child: Child,
}

/// A port free for both UDP and TCP.
pub fn free_port() -> u16 {
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A raw query for `probe.invalid. A`: answered at all means ready.
fn probe(port: u16) -> bool {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in ["probe", "invalid"] {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let _ = sock.send_to(&q, ("127.0.0.1", port));
    let mut buf = [0u8; 512];
    matches!(sock.recv_from(&mut buf), Ok((n, _)) if n >= 12 && buf[0] == 0x12 && buf[1] == 0x34)
}

/// Zone-file style records (`name. TTL IN TYPE data`) → unbound lines.
/// Each owner name gets its own `static` zone so that names below it that
/// are not listed are NXDOMAIN and listed names without the asked type are
/// NODATA, as on a real authoritative server.
pub fn zone(records: &[&str]) -> String {
    let mut out = String::new();
    let mut zones = std::collections::BTreeSet::new();
    for r in records {
        let owner = r.split_whitespace().next().expect("record has an owner");
        zones.insert(owner.to_string());
    }
    for z in &zones {
        out.push_str(&format!("    local-zone: \"{z}\" static\n"));
    }
    for r in records {
        out.push_str(&format!("    local-data: '{}'\n", r.replace('\'', "\\'")));
    }
    out
}

/// A TXT record value split into 255-byte character-strings (TTL 300).
pub fn txt(owner: &str, value: &str) -> String {
    txt_ttl(owner, value, 300)
}

/// [`txt`] with a given TTL.
pub fn txt_ttl(owner: &str, value: &str, ttl: u32) -> String {
    let parts: Vec<String> = value
        .as_bytes()
        .chunks(255)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c).replace('"', "\\\"")))
        .collect();
    format!("{owner} {ttl} IN TXT {}", parts.join(" "))
}

impl TestDns {
    /// Start unbound with `server_lines` (from [`zone`]) added to its
    /// `server:` section.
    pub fn start(server_lines: &str) -> TestDns {
        Self::start_at(None, server_lines)
    }

    /// Start on `port` (one a test reserved with `free_port` and pointed
    /// sendguard at before any server answered there).
    pub fn start_on(port: u16, server_lines: &str) -> TestDns {
        Self::start_at(Some(port), server_lines)
    }

    fn start_at(fixed: Option<u16>, server_lines: &str) -> TestDns {
        for attempt in 0..5 {
            let port = fixed.unwrap_or_else(free_port);
            let dir = std::env::temp_dir().join(format!("sendguard-dns-{}-{port}-{attempt}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let conf = format!(
                r#"server:
    interface: 127.0.0.1
    port: {port}
    do-ip6: no
    username: ""
    chroot: ""
    directory: "{dir}"
    pidfile: ""
    use-syslog: no
    logfile: "{dir}/unbound.log"
    log-queries: yes
    verbosity: 1
    do-daemonize: no
    module-config: "iterator"
    num-threads: 1
    access-control: 127.0.0.0/8 allow
    do-not-query-localhost: no
    local-zone: "." static
    local-zone: "servfail.test." transparent
    local-zone: "timeout.test." deny
{server_lines}
forward-zone:
    name: "servfail.test."
    forward-addr: 127.0.0.1@1
    forward-tcp-upstream: yes
"#,
                dir = dir.display()
            );
            std::fs::File::create(dir.join("unbound.conf"))
                .unwrap()
                .write_all(conf.as_bytes())
                .unwrap();
            let mut child = Command::new("unbound")
                .args(["-d", "-c"])
                .arg(dir.join("unbound.conf"))
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("unbound is not installed: run scripts/install-deps");
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = child.try_wait() {
                    let mut err = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        let _ = std::io::Read::read_to_string(&mut e, &mut err);
                    }
                    let log = std::fs::read_to_string(dir.join("unbound.log")).unwrap_or_default();
                    if log.contains("error") && !log.contains("bind") && !err.contains("bind") {
                        panic!("unbound rejected the config:\n{err}\n{log}\n{conf}");
                    }
                    break; // port taken: retry
                }
                if probe(port) {
                    return TestDns { port, dir, child };
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("unbound did not start");
    }

    /// `127.0.0.1:port`, for `dns.nameservers`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Queries received so far (readiness probes excluded).
    pub fn query_count(&self) -> usize {
        self.queries().len()
    }

    /// The logged queries, e.g. `acme.example. TXT IN`.
    pub fn queries(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("unbound.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(" info: 127.0.0.1 ") && !l.contains("probe.invalid."))
            .map(|l| l.split(" info: 127.0.0.1 ").nth(1).unwrap_or("").to_string())
            .collect()
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
