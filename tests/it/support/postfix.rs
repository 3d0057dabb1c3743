//! A private Postfix instance as a real upstream: started from a config
//! directory of its own on an ephemeral loopback port, relaying what it
//! accepts to a given next hop (smtp-sink), with a recipient access map so
//! that chosen recipients get the 4xx/5xx replies Postfix really sends.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::sink::free_port;

pub struct Postfix {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
}

fn postfix(conf: &Path, args: &[&str]) -> std::process::Output {
    Command::new(super::require_tool("postfix"))
        .arg("-c")
        .arg(conf)
        .args(args)
        .output()
        .expect("run postfix")
}

impl Postfix {
    /// `access`: lines of a Postfix access map, e.g.
    /// `unknown@dest.example 550 5.1.1 <unknown@dest.example>: Recipient address rejected: User unknown`.
    pub fn start(next_hop: SocketAddr, access: &[&str]) -> Postfix {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        // Postfix daemons run as the unprivileged `postfix` user.
        std::fs::set_permissions(root, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        for d in ["conf", "queue", "data"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let _ = Command::new("chown").arg("postfix").arg(root.join("data")).status();
        let port = free_port();
        let master = std::fs::read_to_string("/etc/postfix/master.cf").expect("/etc/postfix/master.cf");
        let master: String = master
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                if l.starts_with("smtp ") && f.get(1) == Some(&"inet") {
                    format!("127.0.0.1:{port} inet n - n - - smtpd")
                } else if f.len() >= 8 && !l.starts_with('#') && !l.starts_with(' ') && f[4] == "y" {
                    // no chroot
                    let mut f = f.clone();
                    f[4] = "n";
                    f.join(" ")
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(root.join("conf/master.cf"), master + "\n").unwrap();
        let r = root.display();
        std::fs::write(
            root.join("conf/main.cf"),
            format!(
                "compatibility_level = 3.6\nqueue_directory = {r}/queue\ndata_directory = {r}/data\n\
                 maillog_file = {r}/maillog\nmaillog_file_prefixes = {r}\nmyhostname = upstream.test\n\
                 inet_interfaces = 127.0.0.1\ninet_protocols = ipv4\nmydestination =\n\
                 relayhost = [{}]:{}\nmynetworks = 127.0.0.0/8\n\
                 smtpd_relay_restrictions = permit_mynetworks, reject\n\
                 smtpd_forbid_unauth_pipelining = yes\n\
                 smtpd_recipient_restrictions = check_recipient_access texthash:{r}/conf/access, permit_mynetworks, reject\n\
                 smtpd_end_of_data_restrictions = check_sender_access texthash:{r}/conf/senders\n",
                next_hop.ip(),
                next_hop.port()
            ),
        )
        .unwrap();
        let pf = Postfix {
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            dir,
        };
        pf.set_access(access);
        pf.set_senders(&[]);
        let out = postfix(&pf.conf(), &["start"]);
        assert!(out.status.success(), "postfix start failed: {out:?}\n{}", pf.log());
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(pf.addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "postfix did not listen on {}: {}",
                pf.addr,
                pf.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        pf
    }

    pub fn conf(&self) -> PathBuf {
        self.dir.path().join("conf")
    }

    /// Replace the access map and make Postfix re-read it.
    pub fn set_access(&self, lines: &[&str]) {
        std::fs::write(self.conf().join("access"), lines.join("\n") + "\n").unwrap();
    }

    /// Lines of the access map applied to the envelope sender at the end
    /// of data (after the content), e.g. `late@local.example 451 4.7.1 Later`.
    pub fn set_senders(&self, lines: &[&str]) {
        std::fs::write(self.conf().join("senders"), lines.join("\n") + "\n").unwrap();
    }

    /// Set main.cf parameters (`name=value`) and reload.
    pub fn set_main(&self, params: &[&str]) {
        let out = Command::new(super::require_tool("postconf"))
            .arg("-c")
            .arg(self.conf())
            .arg("-e")
            .args(params)
            .output()
            .expect("run postconf");
        assert!(out.status.success(), "postconf -e {params:?}: {out:?}");
        self.reload();
    }

    pub fn reload(&self) {
        let out = postfix(&self.conf(), &["reload"]);
        assert!(out.status.success(), "postfix reload: {out:?}");
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("maillog")).unwrap_or_default()
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = postfix(&self.conf(), &["abort"]);
        let _ = postfix(&self.conf(), &["stop"]);
    }
}
