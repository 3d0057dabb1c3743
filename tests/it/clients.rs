//! Real SMTP clients against the submission listeners: swaks (Perl),
//! Python's smtplib and lettre (Rust), over STARTTLS and implicit TLS with
//! AUTH PLAIN and LOGIN. Each message must arrive byte-correct at the sink.

use tokio::process::Command;

use crate::support::{PASSWORD, TestServer, require_tool};

/// Run swaks against 127.0.0.1:`port` with the standard envelope plus `args`.
async fn swaks(port: u16, args: &[&str]) -> (i32, String) {
    let port = port.to_string();
    let out = Command::new(require_tool("swaks"))
        .args(["--server", "127.0.0.1", "--port", &port])
        .args([
            "--timeout",
            "20",
            "--ehlo",
            "client.test",
            "--from",
            "a@acme.example",
            "--to",
            "r@dest.example",
        ])
        .args(args)
        .output()
        .await
        .expect("run swaks");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test]
async fn swaks_starttls_auth_plain_and_login() {
    let srv = TestServer::start("").await;
    let port = srv.submission().port();
    for (i, mech) in ["PLAIN", "LOGIN"].iter().enumerate() {
        let subject = format!("Subject: swaks {mech}");
        let (code, log) = swaks(
            port,
            &[
                "--tls",
                "--auth",
                mech,
                "--auth-user",
                "app",
                "--auth-password",
                PASSWORD,
                "--header",
                &subject,
                "--body",
                "hello from swaks\n.leading dot",
            ],
        )
        .await;
        assert_eq!(code, 0, "swaks {mech} failed:\n{log}");
        assert!(log.contains("235 2.7.0"), "{log}");
        let got = srv.sink.messages();
        assert_eq!(got.len(), i + 1);
        let body = String::from_utf8(got[i].body.clone()).unwrap();
        assert!(body.contains(&subject), "{body}");
        assert!(body.contains("hello from swaks\r\n.leading dot\r\n"), "{body:?}");
        assert_eq!(got[i].mail_from.as_ref().unwrap().to_string(), "a@acme.example");
    }
}

#[tokio::test]
async fn swaks_implicit_tls() {
    let srv = TestServer::start("").await;
    let port = srv.implicit().port();
    let (code, log) = swaks(
        port,
        &[
            "--tls-on-connect",
            "--auth",
            "PLAIN",
            "--auth-user",
            "app",
            "--auth-password",
            PASSWORD,
            "--body",
            "implicit tls",
        ],
    )
    .await;
    assert_eq!(code, 0, "{log}");
    assert_eq!(srv.sink.messages().len(), 1);
    assert_eq!(srv.sink.messages()[0].tls.as_deref(), Some("TLSv1_3"));
}

#[tokio::test]
async fn swaks_refusals_are_reported() {
    let srv = TestServer::start("[auth]\nfailure_delay = \"10ms\"\n").await;
    let port = srv.submission().port();
    // wrong password
    let (code, log) = swaks(
        port,
        &[
            "--tls",
            "--auth",
            "PLAIN",
            "--auth-user",
            "app",
            "--auth-password",
            "nope",
        ],
    )
    .await;
    assert_ne!(code, 0);
    assert!(log.contains("535 5.7.8"), "{log}");
    // no AUTH at all: refused at MAIL
    let (code, log) = swaks(port, &["--tls"]).await;
    assert_ne!(code, 0);
    assert!(log.contains("530 5.7.0 Authentication required"), "{log}");
    // sender outside the tenant's rights
    let (code, log) = swaks(
        port,
        &[
            "--tls",
            "--auth",
            "LOGIN",
            "--auth-user",
            "app",
            "--auth-password",
            PASSWORD,
            "--from",
            "boss@elsewhere.example",
        ],
    )
    .await;
    assert_ne!(code, 0);
    assert!(log.contains("550 5.7.1"), "{log}");
    assert!(log.contains("sendguard:sender_not_permitted"), "{log}");
    assert!(srv.sink.messages().is_empty());
}

const SMTPLIB: &str = r#"
import os, smtplib, ssl, sys
mode, port, ca, user, pw = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
ctx = ssl.create_default_context(cafile=ca)
msg = "From: a@acme.example\r\nTo: r@dest.example\r\nSubject: smtplib " + mode + "\r\n\r\nhello from smtplib\r\n.dot line\r\n"
try:
    if mode.startswith("implicit"):
        s = smtplib.SMTP_SSL("127.0.0.1", port, context=ctx, timeout=20)
    else:
        s = smtplib.SMTP("127.0.0.1", port, timeout=20)
        s.ehlo("client.test")
        s.starttls(context=ctx)
    s.ehlo("client.test")
    if mode.endswith("login"):
        s.esmtp_features["auth"] = "LOGIN"
    s.login(user, pw)
    print("VERSION", s.sock.version())
    s.sendmail("a@acme.example", ["r@dest.example", "r2@dest.example"], msg)
    s.quit()
    print("OK")
except smtplib.SMTPResponseException as e:
    print("ERR", e.smtp_code, e.smtp_error.decode())
"#;

async fn smtplib(mode: &str, port: u16, ca: &std::path::Path, user: &str, pw: &str) -> String {
    let out = Command::new("python3")
        .args(["-c", SMTPLIB, mode, &port.to_string(), ca.to_str().unwrap(), user, pw])
        .output()
        .await
        .expect("python3");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test]
async fn python_smtplib_starttls_and_implicit() {
    let srv = TestServer::start("").await;
    let cases = [
        ("starttls", srv.submission().port()),
        ("starttls-login", srv.submission().port()),
        ("implicit", srv.implicit().port()),
    ];
    for (i, (mode, port)) in cases.iter().enumerate() {
        let out = smtplib(mode, *port, &srv.ca_path(), "app", PASSWORD).await;
        assert!(out.contains("\nOK") || out.starts_with("VERSION"), "{mode}: {out}");
        assert!(out.trim_end().ends_with("OK"), "{mode}: {out}");
        let got = srv.sink.messages();
        assert_eq!(got.len(), i + 1, "{mode}");
        let body = String::from_utf8(got[i].body.clone()).unwrap();
        assert!(body.contains(&format!("Subject: smtplib {mode}\r\n")), "{body:?}");
        assert!(body.ends_with("hello from smtplib\r\n.dot line\r\n"), "{body:?}");
        assert_eq!(got[i].rcpts.len(), 2);
    }
    let out = smtplib("starttls", srv.submission().port(), &srv.ca_path(), "app", "bad").await;
    assert!(out.contains("ERR 535 5.7.8"), "{out}");
}

#[tokio::test]
async fn lettre_starttls_and_implicit() {
    use lettre::transport::smtp::authentication::{Credentials, Mechanism};
    use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
    use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

    let srv = TestServer::start("").await;
    let cert = Certificate::from_pem(crate::support::pki().ca_pem.as_bytes()).unwrap();
    let params = TlsParameters::builder("localhost".into())
        .add_root_certificate(cert)
        .build_rustls()
        .unwrap();
    let cases = [
        (srv.submission().port(), Tls::Required(params.clone()), Mechanism::Plain),
        (srv.implicit().port(), Tls::Wrapper(params.clone()), Mechanism::Login),
    ];
    for (i, (port, tls, mech)) in cases.into_iter().enumerate() {
        let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
            .port(port)
            .tls(tls)
            .credentials(Credentials::new("app".into(), PASSWORD.into()))
            .authentication(vec![mech])
            .build();
        let email = Message::builder()
            .from("Acme <a@acme.example>".parse().unwrap())
            .to("r@dest.example".parse().unwrap())
            .subject(format!("lettre {i}"))
            .body(String::from("hello from lettre\n"))
            .unwrap();
        let resp = transport.send(email).await.expect("lettre send");
        assert_eq!(u16::from(resp.code()), 250);
        let got = srv.sink.messages();
        assert_eq!(got.len(), i + 1);
        let body = String::from_utf8(got[i].body.clone()).unwrap();
        assert!(body.contains(&format!("Subject: lettre {i}\r\n")), "{body}");
        assert!(body.contains("hello from lettre\r\n"), "{body}");
    }
}
