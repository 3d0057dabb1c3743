//! SMTP smuggling (CVE-2023-51764 family) against the real listener: every
//! variant of a fake end-of-data is refused with `550 5.5.2`, the commands
//! smuggled behind it are never executed, and nothing reaches the sink.

use crate::support::TestServer;
use crate::support::client::Client;

const VARIANTS: &[(&str, &[u8], &str)] = &[
    ("LF.LF", b"\n.\n", "bare_lf"),
    ("LF.CRLF", b"\n.\r\n", "bare_lf"),
    ("CR.CRLF", b"\r.\r\n", "bare_cr"),
    ("CRLF.CR", b"\r\n.\r", "bare_cr"),
    ("CRLF.LF", b"\r\n.\n", "bare_lf"),
    ("CR.LF", b"\r.\n", "bare_cr"),
    ("CR.CR", b"\r.\r", "bare_cr"),
    ("LF.CR", b"\n.\r", "bare_lf"),
    ("CRLF NUL.CRLF", b"\r\n\x00.\r\n", "nul_byte"),
    ("CRLF.NUL CRLF", b"\r\n.\x00\r\n", "nul_byte"),
    ("LFLF.LFLF", b"\n\n.\n\n", "bare_lf"),
    ("CRCRLF.CRCRLF", b"\r\r\n.\r\r\n", "bare_cr"),
];

async fn smuggle(c: &mut Client, end: &[u8]) -> crate::support::client::Resp {
    c.cmd("MAIL FROM:<a@local.example>").await.expect(250, "2.1.0");
    c.cmd("RCPT TO:<r@dest.example>").await.expect(250, "2.1.5");
    c.cmd("DATA").await.expect(354, "");
    let mut payload = b"From: a@local.example\r\nSubject: outer\r\n\r\nouter body".to_vec();
    payload.extend_from_slice(end);
    payload.extend_from_slice(
        b"MAIL FROM:<ceo@local.example>\r\nRCPT TO:<victim@dest.example>\r\nDATA\r\nFrom: ceo@local.example\r\nSubject: smuggled\r\n\r\nsmuggled\r\n.\r\n",
    );
    c.send_raw(&payload).await;
    c.reply().await
}

#[tokio::test]
async fn every_variant_is_refused_and_nothing_is_smuggled() {
    let srv = TestServer::start("").await;
    for (name, end, token) in VARIANTS {
        let (mut c, _) = Client::connect(srv.trusted()).await;
        c.cmd("EHLO attacker.test").await;
        let reply = smuggle(&mut c, end).await;
        assert_eq!(reply.code, 550, "{name}: {reply:?}");
        reply.expect(550, "5.5.2").token(token);
        // The next reply is for our NOOP: no smuggled MAIL/RCPT/DATA reply
        // was ever produced.
        let next = c.cmd("NOOP").await;
        assert_eq!(next.code, 250, "{name}: smuggled command executed? {next:?}");
        assert!(srv.sink.messages().is_empty(), "{name}: a message reached the sink");
    }
}

#[tokio::test]
async fn smuggling_over_bdat_is_refused() {
    let srv = TestServer::start("").await;
    let (mut c, _) = Client::connect(srv.trusted()).await;
    c.cmd("EHLO attacker.test").await;
    c.cmd("MAIL FROM:<a@local.example>").await.expect(250, "2.1.0");
    c.cmd("RCPT TO:<r@dest.example>").await.expect(250, "2.1.5");
    let chunk = b"Subject: x\r\n\r\nbody\n.\nMAIL FROM:<ceo@local.example>\r\n";
    c.send_raw(format!("BDAT {} LAST\r\n", chunk.len()).as_bytes()).await;
    c.send_raw(chunk).await;
    c.reply().await.expect(550, "5.5.2").token("bare_lf");
    c.cmd("NOOP").await.expect(250, "2.0.0");
    assert!(srv.sink.messages().is_empty());
}

/// A correct message after a refused one goes through on the same session.
#[tokio::test]
async fn session_recovers_after_refusal() {
    let srv = TestServer::start("").await;
    let (mut c, _) = Client::connect(srv.trusted()).await;
    c.cmd("EHLO x").await;
    smuggle(&mut c, b"\n.\n").await.expect(550, "5.5.2");
    c.cmd("MAIL FROM:<a@local.example>").await.expect(250, "2.1.0");
    c.cmd("RCPT TO:<r@dest.example>").await.expect(250, "2.1.5");
    c.cmd("DATA").await.expect(354, "");
    c.send_raw(b"Subject: fine\r\n\r\nok\r\n.\r\n").await;
    c.reply().await.expect(250, "2.0.0");
    let got = srv.sink.messages();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body, b"Subject: fine\r\n\r\nok\r\n");
}
