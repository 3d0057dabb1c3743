//! The `sendguard` binary: check-config, hash-password, and serve with the
//! built-in (no spool yet) sink, JSON logs and SIGTERM drain.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::support::client::Client;
use crate::support::{Workdir, standard_config};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sendguard"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `check-config` on `text` exits 1 naming `key` (and saying `detail`).
async fn config_error(w: &Workdir, text: &str, key: &str, detail: &str) {
    let p = w.write_config(text);
    let out = bin().args(["check-config", "--config"]).arg(&p).output().await.unwrap();
    assert_eq!(out.status.code(), Some(1), "{key}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{key}: ")) && err.contains(detail),
        "expected {key} ({detail}) in {err}"
    );
}

#[tokio::test]
async fn check_config_accepts_valid_and_names_bad_keys() {
    let w = Workdir::new();
    let good = w.write_config(&standard_config(
        ["127.0.0.1:2587", "127.0.0.1:2465", "127.0.0.1:2525"],
        "",
    ));
    let out = bin()
        .args(["check-config", "--config"])
        .arg(&good)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK (3 listeners, 2 tenants, 1 users)"));

    let cases = [
        (
            "trusted_networks = [\"127.0.0.0/8\", \"::1/128\"]",
            "",
            "listeners[2].trusted_networks",
        ),
        ("cert = \"cert.pem\"", "cert = \"missing.pem\"", "tls.cert"),
        ("tls = \"implicit\"", "tls = \"sometimes\"", "listeners[1].tls"),
        (
            "sender_domains = [\"acme.example\"]",
            "sender_domains = [\"acme example\"]",
            "tenants[0].sender_domains[0]",
        ),
        ("guard = \"off\"", "guard = \"sometimes\"", "tenants[0].guard"),
    ];
    for (from, to, key) in cases {
        let text = standard_config(["127.0.0.1:2587", "127.0.0.1:2465", "127.0.0.1:2525"], "").replace(from, to);
        config_error(&w, &text, key, "").await;
    }
    // Guard settings: the resolver, modes, DKIM signing keys (a 1024-bit
    // RSA key is refused: receivers ignore such signatures).
    let weak = w.path("weak.pem");
    let made = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:1024",
            "-out",
        ])
        .arg(&weak)
        .status()
        .unwrap();
    assert!(made.success());
    let sign = |key: &str| {
        format!("[[domains]]\nname = \"acme.example\"\ndkim_sign = {{ selector = \"s1\", key = \"{key}\" }}\n")
    };
    let extras = [
        (
            "[dns]\nnameservers = [\"resolver.example\"]\n".to_string(),
            "dns.nameservers[0]",
            "",
        ),
        (sign("cert.pem"), "domains[0].dkim_sign.key", "no PEM private key"),
        (sign("weak.pem"), "domains[0].dkim_sign.key", "2048"),
        (sign("missing.pem"), "domains[0].dkim_sign.key", "cannot read"),
        (
            "[guard]\ndnsbl_ip_zones = [\"not a zone\"]\n".to_string(),
            "guard.dnsbl_ip_zones[0]",
            "",
        ),
    ];
    for (extra, key, detail) in extras {
        let text = standard_config(["127.0.0.1:2587", "127.0.0.1:2465", "127.0.0.1:2525"], &extra);
        config_error(&w, &text, key, detail).await;
    }
}

/// The configs shipped in the repository stay valid.
#[tokio::test]
async fn shipped_configs_are_valid() {
    for f in ["config/dev.toml", "config/sendguard.example.toml"] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(f);
        let out = bin()
            .args(["check-config", "--config"])
            .arg(&path)
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "{f}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[tokio::test]
async fn hash_password_prints_a_verifiable_argon2id_hash() {
    let mut child = bin()
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"s3cret pass\n").await.unwrap();
    let out = child.wait_with_output().await.unwrap();
    assert!(out.status.success());
    let hash = String::from_utf8(out.stdout).unwrap();
    let hash = hash.trim();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    use argon2::PasswordVerifier;
    let parsed = argon2::PasswordHash::new(hash).unwrap();
    assert!(
        argon2::Argon2::default()
            .verify_password(b"s3cret pass", &parsed)
            .is_ok()
    );
    assert!(
        argon2::Argon2::default()
            .verify_password(b"s3cret pass\n", &parsed)
            .is_err()
    );
    // empty input is an error
    let mut child = bin()
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdin.take());
    let out = child.wait_with_output().await.unwrap();
    assert_eq!(out.status.code(), Some(1));
}

/// Without a spool the binary never acknowledges a message (451 4.3.0),
/// logs JSON with the session's peer and tenant, and drains on SIGTERM.
#[tokio::test]
async fn serve_refuses_without_spool_logs_json_and_stops_on_sigterm() {
    let w = Workdir::new();
    let (p0, p1, p2) = (free_port(), free_port(), free_port());
    let a = |p: u16| format!("127.0.0.1:{p}");
    let cfg = w.write_config(&standard_config([&a(p0), &a(p1), &a(p2)], ""));
    let child = bin()
        .args(["serve", "--log-json", "--config"])
        .arg(&cfg)
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = a(p2).parse().unwrap();
    let mut up = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up, "server did not start");
    let (mut c, g) = Client::connect(addr).await;
    assert_eq!(g.code, 220);
    c.cmd("EHLO x").await;
    c.cmd("MAIL FROM:<a@local.example>").await.expect(250, "2.1.0");
    c.cmd("RCPT TO:<r@dest.example>").await.expect(250, "2.1.5");
    c.cmd("DATA").await.expect(354, "");
    c.send_raw(b"Subject: x\r\n\r\nbody\r\n.\r\n").await;
    c.reply().await.expect(451, "4.3.0").token("spool_unavailable");
    c.cmd("QUIT").await.expect(221, "2.0.0");

    let pid = child.id().unwrap().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .unwrap()
            .success()
    );
    let out = tokio::time::timeout(Duration::from_secs(15), child.wait_with_output())
        .await
        .expect("exits")
        .unwrap();
    assert!(out.status.success(), "exit status {:?}", out.status);
    let logs = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let msg = lines
        .iter()
        .find(|v| v["fields"]["message"] == "message refused")
        .unwrap_or_else(|| panic!("no message log line in {logs}"));
    assert_eq!(msg["span"]["tenant"], "local");
    assert!(msg["span"]["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(msg["fields"]["reply"].as_str().unwrap().starts_with("451 4.3.0"));
    assert!(
        lines.iter().any(|v| v["fields"]["message"] == "shutdown complete"),
        "{logs}"
    );
}
