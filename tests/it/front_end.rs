//! The submission front end over real TCP/TLS: EHLO, STARTTLS, AUTH,
//! sender rights, limits, pipelining, BDAT and shutdown — each refusal with
//! its exact basic and enhanced code.

use std::time::Duration;

use crate::support::client::{Client, tls_connector};
use crate::support::{PASSWORD, TestServer};

#[tokio::test]
async fn ehlo_advertises_what_is_implemented() {
    let srv = TestServer::start("").await;
    let (mut c, greeting) = Client::connect(srv.submission()).await;
    assert_eq!(greeting.code, 220);
    assert!(greeting.text().contains("sendguard.test"), "{greeting:?}");
    let ehlo = c.cmd("EHLO client.test").await;
    assert_eq!(ehlo.code, 250);
    for ext in [
        "PIPELINING",
        "SIZE 10485760",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
        "STARTTLS",
    ] {
        assert!(ehlo.has_line(ext), "{ext} missing: {ehlo:?}");
    }
    assert!(
        !ehlo.lines.iter().any(|l| l.starts_with("AUTH")),
        "AUTH before TLS: {ehlo:?}"
    );
    c.cmd("STARTTLS").await.expect(220, "2.0.0");
    c.upgrade().await;
    let ehlo = c.cmd("EHLO client.test").await;
    assert!(ehlo.has_line("AUTH PLAIN LOGIN"), "{ehlo:?}");
    assert!(!ehlo.has_line("STARTTLS"), "STARTTLS offered twice: {ehlo:?}");
    c.auth_plain("app", PASSWORD).await.expect(235, "2.7.0");
    let ehlo = c.cmd("EHLO client.test").await;
    assert!(
        !ehlo.lines.iter().any(|l| l.starts_with("AUTH")),
        "AUTH after auth: {ehlo:?}"
    );
    c.cmd("QUIT").await.expect(221, "2.0.0");
}

#[tokio::test]
async fn helo_is_accepted() {
    let srv = TestServer::start("").await;
    let (mut c, _) = Client::connect(srv.trusted()).await;
    let r = c.cmd("HELO client.test").await;
    // RFC 2034 §3: no enhanced status code on the HELO reply
    assert_eq!((r.code, r.text()), (250, "sendguard.test".to_string()));
    c.cmd("MAIL FROM:<a@local.example>").await.expect(250, "2.1.0");
}

#[tokio::test]
async fn auth_before_tls_is_refused() {
    let srv = TestServer::start("").await;
    let (mut c, _) = Client::connect(srv.submission()).await;
    c.cmd("EHLO client.test").await;
    c.auth_plain("app", PASSWORD)
        .await
        .expect(538, "5.7.11")
        .token("tls_required");
    c.cmd("AUTH LOGIN").await.expect(538, "5.7.11");
    c.cmd("MAIL FROM:<a@acme.example>")
        .await
        .expect(530, "5.7.0")
        .token("tls_required");
}

/// No open relay: without authentication nothing gets past MAIL, and the
/// sink never sees a message.
#[tokio::test]
async fn unauthenticated_client_cannot_send() {
    let srv = TestServer::start("").await;
    let mut c = Client::connect_starttls(srv.submission()).await;
    c.cmd("MAIL FROM:<a@acme.example>")
        .await
        .expect(530, "5.7.0")
        .token("auth_required");
    c.cmd("RCPT TO:<victim@elsewhere.example>").await.expect(503, "5.5.1");
    c.cmd("DATA").await.expect(503, "5.5.1");
    c.send_raw(b"BDAT 5 LAST\r\nhello").await;
    c.reply().await.expect(503, "5.5.1");
    // pipelined attempt: everything refused in order
    c.send_raw(b"MAIL FROM:<>\r\nRCPT TO:<v@x.example>\r\nDATA\r\n").await;
    c.reply().await.expect(530, "5.7.0");
    c.reply().await.expect(503, "5.5.1");
    c.reply().await.expect(503, "5.5.1");
    // implicit-TLS listener: same rule
    let (mut c, _) = Client::connect_tls(srv.implicit()).await;
    c.cmd("EHLO client.test").await;
    c.cmd("MAIL FROM:<a@acme.example>").await.expect(530, "5.7.0");
    assert!(srv.sink.messages().is_empty());
}

#[tokio::test]
async fn wrong_credentials_then_lockout() {
    let srv = TestServer::start("[auth]\nmax_failures = 3\nfailure_delay = \"10ms\"\n").await;
    let mut c = Client::connect_starttls(srv.submission()).await;
    c.auth_plain("app", "wrong")
        .await
        .expect(535, "5.7.8")
        .token("auth_failed");
    c.auth_plain("nobody", PASSWORD).await.expect(535, "5.7.8");
    // third failure reaches the limit: 421 and disconnect
    c.auth_plain("app", "wrong again")
        .await
        .expect(421, "4.7.0")
        .token("auth_rate_limited");
    assert!(c.closed(Duration::from_secs(5)).await);
    // the IP stays refused for the window, even with the right password
    let (mut c, greeting) = Client::connect(srv.submission()).await;
    greeting.expect(421, "4.7.0").token("auth_rate_limited");
    assert!(c.closed(Duration::from_secs(5)).await);
    // trusted-network listener (no AUTH) is not affected
    let (_c, greeting) = Client::connect(srv.trusted()).await;
    assert_eq!(greeting.code, 220);
}

#[tokio::test]
async fn auth_login_and_sasl_errors() {
    let srv = TestServer::start("").await;
    let mut c = Client::connect_starttls(srv.submission()).await;
    c.cmd("AUTH CRAM-MD5").await.expect(504, "5.5.4");
    c.cmd("AUTH PLAIN !!!").await.expect(501, "5.5.2");
    let ch = c.cmd("AUTH PLAIN").await;
    assert_eq!((ch.code, ch.text()), (334, String::new()));
    c.cmd("*").await.expect(501, "5.0.0").token("auth_cancelled");
    // authorization identity other than the user is refused
    {
        use base64::Engine;
        let m = base64::engine::general_purpose::STANDARD.encode(format!("admin\0app\0{PASSWORD}"));
        c.cmd(&format!("AUTH PLAIN {m}")).await.expect(535, "5.7.8");
    }
    let ch = c.cmd("AUTH LOGIN").await;
    assert_eq!((ch.code, ch.text()), (334, "VXNlcm5hbWU6".to_string()));
    let ch = c.cmd("YXBw").await; // "app"
    assert_eq!((ch.code, ch.text()), (334, "UGFzc3dvcmQ6".to_string()));
    {
        use base64::Engine;
        c.cmd(&base64::engine::general_purpose::STANDARD.encode(PASSWORD))
            .await
            .expect(235, "2.7.0");
    }
    c.auth_plain("app", PASSWORD).await.expect(503, "5.5.1");
}

#[tokio::test]
async fn sender_rights_are_enforced() {
    let srv = TestServer::start("").await;
    let mut c = Client::connect_authed(srv.submission()).await;
    c.cmd("MAIL FROM:<ceo@other.example>")
        .await
        .expect(550, "5.7.1")
        .token("sender_not_permitted");
    c.cmd("MAIL FROM:<a@sub.acme.example>").await.expect(550, "5.7.1");
    c.cmd("MAIL FROM:<>")
        .await
        .expect(550, "5.7.1")
        .token("sender_not_permitted");
    c.cmd("MAIL FROM:<Agent@Partner.example>").await.expect(250, "2.1.0");
    c.cmd("RSET").await.expect(250, "2.0.0");
    c.cmd("MAIL FROM:<news@ACME.example>").await.expect(250, "2.1.0");
    // trusted listener acts as tenant "local": acme's domain is not its own
    let (mut c, _) = Client::connect(srv.trusted()).await;
    c.cmd("EHLO x").await;
    c.cmd("MAIL FROM:<a@acme.example>").await.expect(550, "5.7.1");
    c.cmd("MAIL FROM:<a@local.example>").await.expect(250, "2.1.0");
}

#[tokio::test]
async fn trusted_networks_gate_the_listener() {
    let extra = r#"
[[listeners]]
addr = "127.0.0.1:0"
tls = "none"
auth = "none"
trusted_networks = ["10.0.0.0/8"]
tenant = "local"
"#;
    let srv = TestServer::start(extra).await;
    let (mut c, greeting) = Client::connect(srv.addrs[3]).await;
    greeting.expect(554, "5.7.1").token("client_not_allowed");
    assert!(c.closed(Duration::from_secs(5)).await);
    assert!(srv.sink.messages().is_empty());
}

#[tokio::test]
async fn size_limits() {
    let srv = TestServer::start("[limits]\nmax_message_bytes = 2048\n").await;
    let mut c = Client::connect_authed(srv.submission()).await;
    c.cmd("MAIL FROM:<a@acme.example> SIZE=4096")
        .await
        .expect(552, "5.3.4")
        .token("message_too_big");
    // client lies in SIZE=: refused at end of data, session continues
    c.cmd("MAIL FROM:<a@acme.example> SIZE=100").await.expect(250, "2.1.0");
    c.cmd("RCPT TO:<r@dest.example>").await.expect(250, "2.1.5");
    c.cmd("DATA").await.expect(354, "");
    let line = format!("{}\r\n", "x".repeat(70));
    c.send_raw(line.repeat(100).as_bytes()).await;
    c.cmd(".").await.expect(552, "5.3.4").token("message_too_big");
    c.cmd("NOOP").await.expect(250, "2.0.0");
    // the same over BDAT
    c.cmd("MAIL FROM:<a@acme.example>").await.expect(250, "2.1.0");
    c.cmd("RCPT TO:<r@dest.example>").await.expect(250, "2.1.5");
    c.send_raw(b"BDAT 3000 LAST\r\n").await;
    c.send_raw(&vec![b'y'; 3000]).await;
    c.reply().await.expect(552, "5.3.4");
    c.cmd("NOOP").await.expect(250, "2.0.0");
    assert!(srv.sink.messages().is_empty());
}

/// RFC 5322 §2.1.1: at most 998 octets per line. A longer one is refused
/// at the end of the content (relays fold it, breaking DKIM and the text),
/// the line named; over DATA and BDAT alike; the session goes on.
#[tokio::test]
async fn content_lines_over_998_octets_are_refused() {
    let srv = TestServer::start("").await;
    let mut c = Client::connect_authed(srv.submission()).await;
    let body = |n: usize| format!("Subject: t\r\n\r\n{}\r\nend\r\n", "x".repeat(n));
    c.cmd("MAIL FROM:<a@acme.example>").await.expect(250, "2.1.0");
    c.cmd("RCPT TO:<r@dest.example>").await.expect(250, "2.1.5");
    c.cmd("DATA").await.expect(354, "");
    c.send_raw(body(998).as_bytes()).await;
    c.cmd(".").await.expect(250, "2.0.0");

    c.cmd("MAIL FROM:<a@acme.example>").await.expect(250, "2.1.0");
    c.cmd("RCPT TO:<r@dest.example>").await.expect(250, "2.1.5");
    c.cmd("DATA").await.expect(354, "");
    c.send_raw(body(999).as_bytes()).await;
    let r = c.cmd(".").await;
    r.expect(550, "5.6.0").token("content_line_too_long");
    let text = r.lines.join(" ");
    assert!(text.contains("line 3 ") && text.contains("998 octets"), "{r:?}");
    c.cmd("NOOP").await.expect(250, "2.0.0");

    // BDAT, the long line split over two chunks.
    c.cmd("MAIL FROM:<a@acme.example>").await.expect(250, "2.1.0");
    c.cmd("RCPT TO:<r@dest.example>").await.expect(250, "2.1.5");
    let b = body(1500);
    let (one, two) = b.as_bytes().split_at(700);
    c.send_raw(format!("BDAT {}\r\n", one.len()).as_bytes()).await;
    c.send_raw(one).await;
    c.reply().await.expect(250, "2.0.0");
    c.send_raw(format!("BDAT {} LAST\r\n", two.len()).as_bytes()).await;
    c.send_raw(two).await;
    c.reply().await.expect(550, "5.6.0").token("content_line_too_long");
    c.cmd("NOOP").await.expect(250, "2.0.0");

    let got = srv.sink.messages();
    assert_eq!(got.len(), 1, "only the 998-octet message was taken");
    assert_eq!(got[0].body, body(998).into_bytes());

    // `max_line_length = 0` turns the check off.
    let srv = TestServer::start("[limits]\nmax_line_length = 0\n").await;
    let mut c = Client::connect_authed(srv.submission()).await;
    c.cmd("MAIL FROM:<a@acme.example>").await.expect(250, "2.1.0");
    c.cmd("RCPT TO:<r@dest.example>").await.expect(250, "2.1.5");
    c.cmd("DATA").await.expect(354, "");
    c.send_raw(body(5000).as_bytes()).await;
    c.cmd(".").await.expect(250, "2.0.0");
    assert_eq!(srv.sink.messages().len(), 1);
}

#[tokio::test]
async fn recipient_limit() {
    let srv = TestServer::start("[limits]\nmax_recipients = 2\n").await;
    let mut c = Client::connect_authed(srv.submission()).await;
    c.cmd("MAIL FROM:<a@acme.example>").await.expect(250, "2.1.0");
    c.cmd("RCPT TO:<r1@dest.example>").await.expect(250, "2.1.5");
    c.cmd("RCPT TO:<r2@dest.example>").await.expect(250, "2.1.5");
    c.cmd("RCPT TO:<r3@dest.example>")
        .await
        .expect(452, "4.5.3")
        .token("too_many_recipients");
    c.cmd("DATA").await.expect(354, "");
    c.send_raw(b"Subject: t\r\n\r\nhi\r\n.\r\n").await;
    c.reply().await.expect(250, "2.0.0");
    let got = srv.sink.messages();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].rcpts.len(), 2);
}

#[tokio::test]
async fn command_syntax_errors_and_limits() {
    let srv = TestServer::start("[limits]\nmax_command_line = 512\nmax_errors = 6\n").await;
    let mut c = Client::connect_authed(srv.submission()).await;
    c.cmd(&format!("NOOP {}", "x".repeat(600)))
        .await
        .expect(500, "5.5.2")
        .token("line_too_long");
    c.cmd("NOOP").await.expect(250, "2.0.0");
    c.cmd("FROBNICATE").await.expect(500, "5.5.1").token("unknown_command");
    c.cmd("MAIL FROM:a@acme.example").await.expect(501, "5.1.7");
    c.cmd("MAIL FROM:<a@acme.example> RET=HDRS").await.expect(555, "5.5.4");
    c.cmd("RCPT TO:<x@y.example>").await.expect(503, "5.5.1");
    // sixth protocol error ends the session
    c.cmd("MAIL FROM:<a@acme.example> BODY=BINARYMIME")
        .await
        .expect(555, "5.5.4");
    c.reply().await.expect(421, "4.7.0").token("too_many_errors");
    assert!(c.closed(Duration::from_secs(5)).await);
}

/// RCPTs and DATA pipelined behind a MAIL refused by policy (RFC 2920
/// §3.1) get 503 but are not the client's protocol errors; without a
/// refused MAIL before them they are.
#[tokio::test]
async fn pipelined_commands_after_a_refused_mail_are_not_counted_as_errors() {
    let srv = TestServer::start("[limits]\nmax_errors = 3\n").await;
    let mut c = Client::connect_authed(srv.submission()).await;
    let mut batch = String::from("MAIL FROM:<boss@not-ours.example>\r\n");
    for i in 0..5 {
        batch.push_str(&format!("RCPT TO:<r{i}@dest.example>\r\n"));
    }
    batch.push_str("DATA\r\n");
    c.send_raw(batch.as_bytes()).await;
    c.reply().await.expect(550, "5.7.1").token("sender_not_permitted");
    for _ in 0..6 {
        c.reply().await.expect(503, "5.5.1");
    }
    c.cmd("NOOP").await.expect(250, "2.0.0");
    // After RSET, a RCPT without MAIL is the client's error again.
    c.cmd("RSET").await.expect(250, "2.0.0");
    c.cmd("RCPT TO:<x@dest.example>").await.expect(503, "5.5.1");
    c.cmd("RCPT TO:<x@dest.example>").await.expect(503, "5.5.1");
    c.cmd("RCPT TO:<x@dest.example>").await.expect(503, "5.5.1");
    c.reply().await.expect(421, "4.7.0").token("too_many_errors");
    assert!(srv.sink.messages().is_empty());
}

#[tokio::test]
async fn smtputf8_addresses_need_the_parameter() {
    let srv =
        TestServer::start("[[tenants]]\nname = \"intl\"\nsender_domains = [\"пример.испытание\"]\nguard = \"off\"\n")
            .await;
    let (mut c, _) = Client::connect(srv.trusted()).await;
    c.cmd("EHLO x").await;
    c.cmd("MAIL FROM:<a@local.example>").await.expect(250, "2.1.0");
    c.cmd("RCPT TO:<δοκιμή@παράδειγμα.δοκιμή>")
        .await
        .expect(553, "5.6.7")
        .token("smtputf8_required");
    c.cmd("RSET").await;
    c.cmd("MAIL FROM:<a@local.example> SMTPUTF8").await.expect(250, "2.1.0");
    c.cmd("RCPT TO:<δοκιμή@παράδειγμα.δοκιμή>").await.expect(250, "2.1.5");
    c.cmd("DATA").await.expect(354, "");
    c.send_raw("Subject: ünïcödé\r\n\r\nπ\r\n.\r\n".as_bytes()).await;
    c.reply().await.expect(250, "2.0.0");
    let m = &srv.sink.messages()[0];
    assert!(m.smtputf8);
    assert_eq!(m.rcpts[0].domain, "παράδειγμα.δοκιμή");
    assert_eq!(m.body, "Subject: ünïcödé\r\n\r\nπ\r\n".as_bytes());
}

#[tokio::test]
async fn pipelined_transaction_and_dot_unstuffing() {
    let srv = TestServer::start("").await;
    let mut c = Client::connect_authed(srv.submission()).await;
    c.send_raw(
        b"MAIL FROM:<a@acme.example>\r\nRCPT TO:<r1@dest.example>\r\nRCPT TO:<bad>\r\nRCPT TO:<r2@dest.example>\r\nDATA\r\n",
    )
    .await;
    c.reply().await.expect(250, "2.1.0");
    c.reply().await.expect(250, "2.1.5");
    c.reply().await.expect(501, "5.1.3");
    c.reply().await.expect(250, "2.1.5");
    assert_eq!(c.reply().await.code, 354);
    c.send_raw(b"Subject: dots\r\n\r\n..leading dot\r\n.\r\nNOOP\r\n").await;
    c.reply().await.expect(250, "2.0.0");
    c.reply().await.expect(250, "2.0.0");
    let m = &srv.sink.messages()[0];
    assert_eq!(m.body, b"Subject: dots\r\n\r\n.leading dot\r\n");
    assert_eq!(m.tenant.as_ref(), "acme");
    assert_eq!(m.username.as_deref(), Some("app"));
    assert_eq!(m.tls.as_deref(), Some("TLSv1_3"));
    let rcpts: Vec<String> = m.rcpts.iter().map(|r| r.to_string()).collect();
    assert_eq!(rcpts, ["r1@dest.example", "r2@dest.example"]);
}

#[tokio::test]
async fn bdat_chunks_are_assembled() {
    let srv = TestServer::start("").await;
    let mut c = Client::connect_authed(srv.submission()).await;
    c.cmd("MAIL FROM:<a@acme.example>").await.expect(250, "2.1.0");
    c.cmd("RCPT TO:<r@dest.example>").await.expect(250, "2.1.5");
    c.send_raw(b"BDAT 14\r\nSubject: b\r\n\r\n").await;
    c.reply().await.expect(250, "2.0.0");
    c.send_raw(b"DATA\r\n").await;
    c.reply().await.expect(503, "5.5.1");
    c.send_raw(b"BDAT 9 LAST\r\n.body\r\n\r\n").await;
    c.reply().await.expect(250, "2.0.0");
    assert_eq!(srv.sink.messages()[0].body, b"Subject: b\r\n\r\n.body\r\n\r\n");
    // BDAT without a transaction: the chunk is consumed, not executed
    c.send_raw(b"BDAT 12 LAST\r\nNOOP\r\nNOOP\r\n").await;
    c.reply().await.expect(503, "5.5.1");
    c.cmd("NOOP").await.expect(250, "2.0.0");
}

#[tokio::test]
async fn per_ip_connection_limit() {
    let srv = TestServer::start("[limits]\nmax_connections_per_ip = 2\n").await;
    let (_a, g) = Client::connect(srv.trusted()).await;
    assert_eq!(g.code, 220);
    let (_b, g) = Client::connect(srv.submission()).await;
    assert_eq!(g.code, 220);
    let (mut c, g) = Client::connect(srv.trusted()).await;
    g.expect(421, "4.7.0").token("too_many_connections");
    assert!(c.closed(Duration::from_secs(5)).await);
    drop(_a);
    // the slot is released when the connection ends
    let mut ok = false;
    for _ in 0..50 {
        let (_d, g) = Client::connect(srv.trusted()).await;
        if g.code == 220 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "slot not released");
}

/// On the implicit-TLS listener the per-address limit holds before the
/// handshake: connections that never send a ClientHello cannot take every
/// connection permit (other clients, other listeners keep being served).
#[tokio::test]
async fn implicit_tls_per_ip_limit_holds_before_the_handshake() {
    use tokio::io::AsyncReadExt;
    let srv = TestServer::start("[limits]\nmax_connections = 4\nmax_connections_per_ip = 2\n").await;
    // Two silent connections take 127.0.0.1's slots and wait in the handshake.
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(tokio::net::TcpStream::connect(srv.implicit()).await.unwrap());
    }
    // Further ones from that address are closed at once, without a
    // handshake (before: each waited up to tls_handshake_timeout, 30 s,
    // holding one of the four permits).
    for i in 0..4 {
        let mut t = tokio::net::TcpStream::connect(srv.implicit()).await.unwrap();
        let mut b = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), t.read(&mut b))
            .await
            .unwrap_or_else(|_| panic!("connection {i} over the limit was kept open"));
        assert!(matches!(n, Ok(0) | Err(_)), "connection {i}: {n:?}");
    }
    // Another address is served on the other listeners at once.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let tcp = sock.connect(srv.trusted()).await.unwrap();
    let (mut c, g) = tokio::time::timeout(Duration::from_secs(5), Client::from_tcp(tcp))
        .await
        .expect("greeting while silent TLS clients wait");
    assert_eq!(g.code, 220, "{g:?}");
    c.cmd("QUIT").await.expect(221, "2.0.0");
    drop(held);
}

#[tokio::test]
async fn idle_client_times_out() {
    let srv = TestServer::start("[limits]\ncommand_timeout = \"300ms\"\n").await;
    let (mut c, _) = Client::connect(srv.trusted()).await;
    c.reply().await.expect(421, "4.4.2").token("timeout");
    assert!(c.closed(Duration::from_secs(5)).await);
}

#[tokio::test]
async fn tls_12_and_13_work_on_implicit_listener() {
    let srv = TestServer::start("").await;
    for (v, name) in [
        (&rustls::version::TLS12, "TLSv1_2"),
        (&rustls::version::TLS13, "TLSv1_3"),
    ] {
        let tcp = tokio::net::TcpStream::connect(srv.implicit()).await.unwrap();
        let tls = tls_connector(&[v])
            .connect(rustls::pki_types::ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        assert_eq!(format!("{:?}", tls.get_ref().1.protocol_version().unwrap()), name);
        let mut c = Client::from_stream(crate::support::client::Stream::Tls(Box::new(tls)));
        assert_eq!(c.reply().await.code, 220);
        c.cmd("EHLO x").await;
        c.auth_plain("app", PASSWORD).await.expect(235, "2.7.0");
    }
}

#[tokio::test]
async fn starttls_discards_pipelined_plaintext() {
    let srv = TestServer::start("").await;
    let (mut c, _) = Client::connect(srv.trusted()).await;
    // the trusted listener offers no STARTTLS
    c.cmd("EHLO x").await;
    c.cmd("STARTTLS").await.expect(502, "5.5.1");
    let (mut c, _) = Client::connect(srv.submission()).await;
    c.cmd("EHLO x").await;
    // CVE-2011-0411: commands injected after STARTTLS in the same packet
    c.send_raw(b"STARTTLS\r\nMAIL FROM:<a@acme.example>\r\nRCPT TO:<v@x.example>\r\n")
        .await;
    c.reply().await.expect(220, "2.0.0");
    c.upgrade().await;
    // After TLS the state is fresh: no injected MAIL, and EHLO is needed again.
    c.cmd("RCPT TO:<v@x.example>").await.expect(503, "5.5.1");
    c.cmd("MAIL FROM:<a@acme.example>").await.expect(503, "5.5.1");
    c.cmd("EHLO x").await.expect(250, "");
    c.cmd("STARTTLS").await.expect(503, "5.5.1");
}

#[tokio::test]
async fn graceful_shutdown_lets_transactions_finish() {
    let srv = TestServer::start("").await;
    let mut busy = Client::connect_authed(srv.submission()).await;
    busy.cmd("MAIL FROM:<a@acme.example>").await.expect(250, "2.1.0");
    busy.cmd("RCPT TO:<r@dest.example>").await.expect(250, "2.1.5");
    busy.cmd("DATA").await;
    busy.send_raw(b"Subject: in flight\r\n\r\n").await;
    let (mut idle, _) = Client::connect(srv.trusted()).await;
    idle.cmd("EHLO x").await;
    srv.shutdown.cancel();
    // the idle session is told and closed
    idle.reply().await.expect(421, "4.3.2").token("shutting_down");
    // no new connections: the listeners are closed
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(tokio::net::TcpStream::connect(srv.trusted()).await.is_err());
    // the transaction in flight completes, then the session is closed
    busy.send_raw(b"finishing\r\n.\r\n").await;
    busy.reply().await.expect(250, "2.0.0");
    busy.reply().await.expect(421, "4.3.2");
    assert_eq!(srv.sink.messages().len(), 1);
    assert_eq!(srv.sink.messages()[0].body, b"Subject: in flight\r\n\r\nfinishing\r\n");
    let mut srv = srv;
    tokio::time::timeout(Duration::from_secs(10), srv.finished())
        .await
        .unwrap();
}

/// No TLS below 1.2, checked with a real OpenSSL client on both the
/// STARTTLS and the implicit-TLS listener; TLS 1.2 is the control.
#[tokio::test]
async fn tls_below_1_2_is_refused_by_openssl_client() {
    let srv = TestServer::start("").await;
    let openssl = crate::support::require_tool("openssl");
    for (addr, starttls) in [(srv.implicit(), false), (srv.submission(), true)] {
        for (flag, want_ok) in [("-tls1", false), ("-tls1_1", false), ("-tls1_2", true)] {
            let mut cmd = tokio::process::Command::new(&openssl);
            cmd.args([
                "s_client",
                "-connect",
                &addr.to_string(),
                flag,
                "-cipher",
                "DEFAULT:@SECLEVEL=0",
            ]);
            if starttls {
                cmd.args(["-starttls", "smtp"]);
            }
            let out = cmd
                .arg("-CAfile")
                .arg(srv.ca_path())
                .stdin(std::process::Stdio::null())
                .output()
                .await
                .unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let negotiated = text.contains("Protocol  : TLSv1") || text.contains("Protocol: TLSv1");
            if want_ok {
                assert!(text.contains("TLSv1.2") && negotiated, "{flag} on {addr}: {text}");
            } else {
                assert!(
                    !negotiated || text.contains("(NONE)"),
                    "{flag} on {addr} negotiated: {text}"
                );
                assert!(text.contains("alert"), "{flag} on {addr}: expected a TLS alert: {text}");
            }
        }
    }
}

/// `limits.max_connections` is a permit taken before accept: a client over
/// the limit waits in the kernel backlog without a greeting, and is served
/// as soon as another connection ends.
#[tokio::test]
async fn total_connections_wait_for_a_permit() {
    let srv = TestServer::start("[limits]\nmax_connections = 2\n").await;
    let (_a, g) = Client::connect(srv.trusted()).await;
    assert_eq!(g.code, 220);
    let (b, g) = Client::connect(srv.submission()).await;
    assert_eq!(g.code, 220);
    let tcp = tokio::net::TcpStream::connect(srv.trusted())
        .await
        .expect("backlog accepts the TCP connection");
    let mut third = Client::from_stream(crate::support::client::Stream::Plain(tcp));
    assert!(
        third.try_reply(Duration::from_millis(500)).await.is_none(),
        "greeted over the limit"
    );
    drop(b);
    let g = third
        .try_reply(Duration::from_secs(5))
        .await
        .expect("greeting once a permit is free");
    assert_eq!(g.code, 220);
}

#[tokio::test]
async fn stalled_data_times_out() {
    let srv = TestServer::start("[limits]\ndata_timeout = \"300ms\"\n").await;
    let (mut c, _) = Client::connect(srv.trusted()).await;
    c.cmd("EHLO x").await;
    c.cmd("MAIL FROM:<a@local.example>").await.expect(250, "2.1.0");
    c.cmd("RCPT TO:<r@dest.example>").await.expect(250, "2.1.5");
    c.cmd("DATA").await.expect(354, "");
    c.send_raw(b"Subject: half a message\r\n").await;
    c.reply().await.expect(421, "4.4.2").token("timeout");
    assert!(c.closed(Duration::from_secs(5)).await);
    assert!(srv.sink.messages().is_empty());
}
