//! Every reply the submission session sends, in one place, so that codes
//! and reason tokens stay consistent with `docs/reasons.md`.
//!
//! Codes: RFC 5321 §4.2, enhanced codes RFC 3463 and the IANA registry,
//! AUTH codes RFC 4954 §6, TLS RFC 3207, SMTPUTF8 RFC 6531 §3.5.

use crate::smtp::{Enhanced as E, Reply};

pub fn greeting(host: &str) -> Reply {
    Reply::bare(220, format!("{host} ESMTP sendguard"))
}
pub fn closing(host: &str) -> Reply {
    Reply::new(221, E(2, 0, 0), format!("{host} closing connection"))
}
pub fn ok() -> Reply {
    Reply::new(250, E(2, 0, 0), "OK")
}
pub fn sender_ok() -> Reply {
    Reply::new(250, E(2, 1, 0), "Sender OK")
}
pub fn rcpt_ok() -> Reply {
    Reply::new(250, E(2, 1, 5), "Recipient OK")
}
pub fn chunk_ok(n: u64) -> Reply {
    Reply::new(250, E(2, 0, 0), format!("{n} octets received"))
}
pub fn start_data() -> Reply {
    Reply::bare(354, "End data with <CR><LF>.<CR><LF>")
}
pub fn start_tls() -> Reply {
    Reply::new(220, E(2, 0, 0), "Ready to start TLS")
}
pub fn auth_ok() -> Reply {
    Reply::new(235, E(2, 7, 0), "Authentication successful")
}
pub fn vrfy() -> Reply {
    Reply::new(252, E(2, 5, 0), "Cannot VRFY user; send mail and it will be attempted")
}
pub fn help() -> Reply {
    Reply::new(214, E(2, 0, 0), "See RFC 5321 and https://sendguard.example/docs")
}

// --- protocol errors (counted toward limits.max_errors) ---
pub fn unknown_command() -> Reply {
    Reply::new(500, E(5, 5, 1), "Command unrecognized").with_token("unknown_command")
}
pub fn line_too_long() -> Reply {
    Reply::new(500, E(5, 5, 2), "Line too long").with_token("line_too_long")
}
pub fn bad_characters() -> Reply {
    Reply::new(500, E(5, 5, 2), "Command contains invalid characters").with_token("syntax_error")
}
pub fn syntax(detail: &str) -> Reply {
    Reply::new(501, E(5, 5, 4), format!("Syntax error: {detail}")).with_token("syntax_error")
}
pub fn bad_sender_syntax() -> Reply {
    Reply::new(501, E(5, 1, 7), "Bad sender address syntax").with_token("bad_address")
}
pub fn bad_rcpt_syntax() -> Reply {
    Reply::new(501, E(5, 1, 3), "Bad recipient address syntax").with_token("bad_address")
}
pub fn unsupported_param(p: &str) -> Reply {
    Reply::new(555, E(5, 5, 4), format!("Unsupported parameter {p}")).with_token("unsupported_parameter")
}
pub fn not_implemented(what: &str) -> Reply {
    Reply::new(502, E(5, 5, 1), format!("{what} not implemented")).with_token("not_implemented")
}
pub fn bad_sequence(text: &str) -> Reply {
    Reply::new(503, E(5, 5, 1), text.to_string()).with_token("bad_sequence")
}
pub fn need_helo() -> Reply {
    bad_sequence("Send EHLO or HELO first")
}
pub fn no_valid_recipients() -> Reply {
    Reply::new(554, E(5, 5, 1), "No valid recipients").with_token("no_valid_recipients")
}

// --- TLS and authentication ---
pub fn need_starttls() -> Reply {
    Reply::new(530, E(5, 7, 0), "Must issue a STARTTLS command first").with_token("tls_required")
}
pub fn auth_needs_tls() -> Reply {
    Reply::new(
        538,
        E(5, 7, 11),
        "Encryption required for requested authentication mechanism",
    )
    .with_token("tls_required")
}
pub fn need_auth() -> Reply {
    Reply::new(530, E(5, 7, 0), "Authentication required").with_token("auth_required")
}
pub fn auth_failed() -> Reply {
    Reply::new(535, E(5, 7, 8), "Authentication credentials invalid").with_token("auth_failed")
}
pub fn auth_locked() -> Reply {
    Reply::new(
        421,
        E(4, 7, 0),
        "Too many authentication failures from your address; try again later",
    )
    .with_token("auth_rate_limited")
}
pub fn auth_cancelled() -> Reply {
    Reply::new(501, E(5, 0, 0), "Authentication cancelled").with_token("auth_cancelled")
}
pub fn auth_bad_encoding() -> Reply {
    Reply::new(501, E(5, 5, 2), "Invalid base64 or SASL message").with_token("syntax_error")
}
pub fn auth_mechanism() -> Reply {
    Reply::new(
        504,
        E(5, 5, 4),
        "Unrecognized authentication mechanism; use PLAIN or LOGIN",
    )
    .with_token("auth_mechanism")
}

// --- envelope policy ---
pub fn message_too_big(max: usize) -> Reply {
    Reply::new(
        552,
        E(5, 3, 4),
        format!("Message size exceeds fixed limit of {max} bytes"),
    )
    .with_token("message_too_big")
}
pub fn too_many_recipients(max: usize) -> Reply {
    Reply::new(
        452,
        E(4, 5, 3),
        format!("Too many recipients (at most {max} per message)"),
    )
    .with_token("too_many_recipients")
}
pub fn sender_not_permitted(addr: &str, tenant: &str) -> Reply {
    Reply::new(
        550,
        E(5, 7, 1),
        format!("Sender address {addr} is not permitted for tenant {tenant}"),
    )
    .with_token("sender_not_permitted")
}
pub fn null_sender_not_permitted(tenant: &str) -> Reply {
    Reply::new(
        550,
        E(5, 7, 1),
        format!("Null sender <> is not permitted for tenant {tenant}"),
    )
    .with_token("sender_not_permitted")
}
pub fn smtputf8_required() -> Reply {
    Reply::new(
        553,
        E(5, 6, 7),
        "Non-ASCII address requires the SMTPUTF8 parameter on MAIL",
    )
    .with_token("smtputf8_required")
}

// --- content (SMTP smuggling defence) ---
pub fn bare_lf() -> Reply {
    Reply::new(
        550,
        E(5, 5, 2),
        "Message refused: bare LF in content; lines must end with CRLF",
    )
    .with_token("bare_lf")
}
pub fn bare_cr() -> Reply {
    Reply::new(
        550,
        E(5, 5, 2),
        "Message refused: bare CR in content; lines must end with CRLF",
    )
    .with_token("bare_cr")
}
pub fn content_line_too_long(line: u64, max: usize) -> Reply {
    Reply::new(
        550,
        E(5, 6, 0),
        format!(
            "Message refused: line {line} of the content is longer than {max} octets (RFC 5322 2.1.1); \
             wrap long lines or use quoted-printable or base64"
        ),
    )
    .with_token("content_line_too_long")
}
pub fn nul_byte() -> Reply {
    Reply::new(550, E(5, 5, 2), "Message refused: NUL octet in content").with_token("nul_byte")
}

// --- connection level ---
pub fn client_not_allowed() -> Reply {
    Reply::new(
        554,
        E(5, 7, 1),
        "Access denied: your address is not in this listener's trusted networks",
    )
    .with_token("client_not_allowed")
}
pub fn too_many_connections() -> Reply {
    Reply::new(
        421,
        E(4, 7, 0),
        "Too many connections from your address; try again later",
    )
    .with_token("too_many_connections")
}
pub fn timeout() -> Reply {
    Reply::new(421, E(4, 4, 2), "Timeout exceeded; closing connection").with_token("timeout")
}
pub fn too_many_errors() -> Reply {
    Reply::new(421, E(4, 7, 0), "Too many errors; closing connection").with_token("too_many_errors")
}
pub fn shutting_down() -> Reply {
    Reply::new(421, E(4, 3, 2), "Service shutting down; try again later").with_token("shutting_down")
}

// --- suppression ---
/// RCPT to a suppressed address: permanent for this message; the text says
/// why and since when, so an agent can decide (drop the address, or ask an
/// operator to lift a mistaken entry).
pub fn suppressed(e: &crate::suppress::Entry) -> Reply {
    let mut chars = e.source.chars().filter(|c| !c.is_control());
    let mut source: String = chars.by_ref().take(160).collect();
    if chars.next().is_some() {
        source.push_str("...");
    }
    let scope = match &e.tenant {
        Some(_) => "for this tenant",
        None => "for all tenants",
    };
    let mut text = format!(
        "Recipient <{}> is suppressed {scope}: {} since {}",
        e.address,
        e.reason.as_str(),
        crate::suppress::rfc3339_ms(e.created_ms)
    );
    if !source.is_empty() {
        text.push_str(&format!(" ({source})"));
    }
    Reply::new(550, E(5, 7, 1), text).with_token("suppressed")
}
