//! Delivery status notifications (bounces) for mail sendguard accepted with
//! 250 and later could not deliver: a permanent failure, an expired queue
//! lifetime, or a delay warning.
//!
//! [`build`] renders one RFC 3464 report for one message and any number of
//! its recipients:
//!
//! * RFC 6522 §3 `multipart/report; report-type=delivery-status` with three
//!   parts: a human-readable `text/plain` explanation, the machine-readable
//!   `message/delivery-status` (RFC 3464 §2: per-message fields §2.2,
//!   per-recipient fields §2.3), and the returned header section as
//!   `text/rfc822-headers` (RFC 6522 §4, formerly RFC 3462). The body of the
//!   original message is never returned.
//! * Status codes are RFC 3463 enhanced codes, see [`status_for`].
//! * `Auto-Submitted: auto-replied` (RFC 3834 §5) so that auto-responders do
//!   not answer the bounce.
//! * When the envelope sender or a recipient address is non-ASCII the report
//!   is the internationalized variant of RFC 6533 §6
//!   (`report-type=global-delivery-status`, `message/global-delivery-status`,
//!   `message/global-headers`, `Final-Recipient: utf-8; …` per RFC 6533 §3)
//!   and [`Dsn::smtputf8`] tells the caller to send it with SMTPUTF8.
//! * Lines are CRLF-terminated and at most 998 octets (RFC 5322 §2.1.1);
//!   long fields are folded at whitespace (RFC 5322 §2.2.3) and, where a
//!   single word is longer than a line, split with a folding space inserted.
//!
//! The caller must send the result with a null reverse-path (`MAIL FROM:<>`,
//! RFC 5321 §4.5.5, RFC 3464 §2) and must never build a DSN for a message
//! whose own reverse-path was null.
//!
//! Trust boundary: pure formatting, no I/O. The original header section comes
//! from the submitting client and is returned verbatim (8-bit octets kept),
//! except that line endings are normalized to CRLF, bare CR and NUL become
//! spaces, blank lines are dropped (they would end the part's header block)
//! and over-long lines are folded; the MIME boundary is checked against all
//! content, so the original cannot forge or close a part. Upstream reply text
//! is untrusted: it is reduced to printable ASCII (control characters,
//! including CR and LF, become spaces; other octets become `?`) before it is
//! written anywhere, so it cannot add header fields or report fields.
//! Envelope addresses lose any control characters.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::events::ReplyRecord;
use crate::pipeline::rfc5322_date;

/// RFC 5322 §2.1.1 hard limit, excluding CRLF.
const MAX_LINE: usize = 998;
/// Preferred width of folded header fields and wrapped text.
const WRAP: usize = 76;
/// Longest piece a single overlong word is split into (leaves room for the
/// field name and the folding space on the same line).
const CHUNK: usize = 900;
/// Fixed boundary prefix. `=_` cannot start a line of base64 nor appear in a
/// quoted-printable encoded line, and the whole boundary is checked anyway.
const BOUNDARY_PREFIX: &str = "=_sendguard-dsn_";

/// The RFC 3464 §2.3.3 action reported for a recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Permanently undeliverable (refused with 5xx, or the queue lifetime ran out).
    Failed,
    /// Not yet delivered; still being retried.
    Delayed,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Failed => "failed",
            Action::Delayed => "delayed",
        }
    }
}

/// One recipient to report on.
#[derive(Debug, Clone)]
pub struct DsnRecipient {
    /// Final recipient, as given in the envelope (RCPT TO).
    pub address: String,
    pub action: Action,
    /// The upstream reply, if there was one (`None`, or a reply without a
    /// code, means a local failure such as connection refused, or expiry
    /// without any reply).
    pub reply: Option<ReplyRecord>,
    /// True when the recipient failed because the queue lifetime (max_age) ran out.
    pub expired: bool,
    pub last_attempt: SystemTime,
}

/// Everything a DSN is built from.
#[derive(Debug, Clone, Copy)]
pub struct DsnInput<'a> {
    /// Our hostname, e.g. `sendguard.example` (Reporting-MTA, From, Message-ID).
    pub reporting_mta: &'a str,
    /// Our message id (reported as `X-Sendguard-Queue-ID`; it is not an RFC
    /// 3461 ENVID, so no `Original-Envelope-Id` is emitted).
    pub queue_id: &'a str,
    /// Envelope MAIL FROM of the original message (non-empty); the DSN goes there.
    pub original_sender: &'a str,
    pub arrival: SystemTime,
    /// The relay host the replies came from (`Remote-MTA: dns; host`).
    pub upstream: Option<&'a str>,
    pub recipients: &'a [DsnRecipient],
    /// The original message; only its header section (up to the first blank
    /// line, or all of it if there is none) is returned.
    pub original: &'a [u8],
    pub now: SystemTime,
}

/// A rendered DSN, ready to be spooled and sent from `<>` to the original sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dsn {
    /// The complete message (header and body), CRLF line endings.
    pub message: Vec<u8>,
    /// The message contains 8-bit octets: send with `BODY=8BITMIME`.
    pub eightbit: bool,
    /// An address in it is non-ASCII: send with `SMTPUTF8` (implies `eightbit`).
    pub smtputf8: bool,
}

/// The RFC 3463 status reported for a recipient.
///
/// * The reply's enhanced code when its class matches the action: `5.x.x`
///   for [`Action::Failed`], `4.x.x` for [`Action::Delayed`].
/// * Failed because the queue lifetime ran out (`expired`), without a 5.x.x
///   reply: `4.4.7` (RFC 3463 §3.5 "Delivery time expired", a persistent
///   transient failure, as Postfix and Exim report it). The last reply (say
///   `451 4.4.1`) still appears in `Diagnostic-Code`; the status says why we
///   gave up, which is the time limit, not the last transient error.
/// * Reply whose basic code and enhanced code disagree in class (e.g.
///   `550 4.4.7`): the basic code decides the SMTP outcome (RFC 5321 §4.2.1),
///   so the class is taken from it and subject/detail from the enhanced code:
///   `550 4.4.7` failed → `5.4.7`; `451 5.7.1` delayed → `4.7.1`.
/// * Failed (not expired) after a 4xx reply, e.g. when retries were given up:
///   the 4.x.x enhanced code if there is one, else `4.0.0`.
/// * Otherwise failed → `5.0.0` (5xx without an enhanced code, or a local
///   failure without a reply), delayed → `4.0.0`.
///
/// Malformed enhanced codes (not `class.subject.detail` with class 2, 4 or 5
/// and 1–3 digit numbers) are ignored.
pub fn status_for(r: &DsnRecipient) -> String {
    let reply = r.reply.as_ref();
    let enhanced = reply.and_then(|x| x.enhanced.as_deref()).and_then(parse_enhanced);
    let basic_class = reply
        .and_then(|x| x.code)
        .filter(|c| (200..600).contains(c))
        .map(|c| (c / 100) as u8);
    let wanted = match r.action {
        Action::Failed => 5,
        Action::Delayed => 4,
    };
    if let Some((class, subject, detail)) = enhanced
        && class == wanted
    {
        return format!("{class}.{subject}.{detail}");
    }
    if r.action == Action::Failed && r.expired {
        return "4.4.7".to_string();
    }
    match (basic_class, enhanced) {
        // Basic code agrees with the action; the enhanced class does not: keep subject.detail.
        (Some(b), Some((_, subject, detail))) if b == wanted => format!("{b}.{subject}.{detail}"),
        (Some(b), None) if b == wanted => format!("{b}.0.0"),
        // Failed after a transient reply (retries given up): a persistent transient failure.
        (Some(4), Some((4, subject, detail))) => format!("4.{subject}.{detail}"),
        (Some(4), _) => "4.0.0".to_string(),
        _ => format!("{wanted}.0.0"),
    }
}

/// Build the DSN for `input`. Never fails: every input yields a well-formed message.
pub fn build(input: &DsnInput) -> Dsn {
    let host = sanitize_host(input.reporting_mta);
    let upstream = input.upstream.map(sanitize_host).filter(|h| !h.is_empty());
    let sender = sanitize_addr(input.original_sender);
    let recipients: Vec<String> = input.recipients.iter().map(|r| sanitize_addr(&r.address)).collect();
    let smtputf8 = !sender.is_ascii() || recipients.iter().any(|a| !a.is_ascii());

    let section = normalize_header_section(header_section(input.original));
    let headers_8bit = section.iter().any(|&b| b >= 0x80);
    // SMTPUTF8 content (addresses in the text and report parts) is 8-bit too.
    let eightbit = headers_8bit || smtputf8;

    let text = human_part(input, &host, upstream.as_deref(), &recipients);
    let status = status_part(input, &host, upstream.as_deref(), &recipients);

    let boundary = choose_boundary(input.queue_id, &[text.as_bytes(), status.as_bytes(), &section]);
    let all_delayed = !input.recipients.is_empty() && input.recipients.iter().all(|r| r.action == Action::Delayed);
    let subject = if all_delayed {
        "Delayed Mail (still being retried)"
    } else {
        "Undelivered Mail Returned to Sender"
    };
    let now_ms = input.now.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
    let (report_type, status_type, headers_type, charset) = if smtputf8 {
        (
            "global-delivery-status",
            "message/global-delivery-status",
            "message/global-headers",
            "utf-8",
        )
    } else {
        (
            "delivery-status",
            "message/delivery-status",
            "text/rfc822-headers",
            "us-ascii",
        )
    };

    let mut head = String::with_capacity(1024);
    push_field(
        &mut head,
        "From",
        &format!("Mail Delivery System <MAILER-DAEMON@{host}>"),
    );
    push_field(&mut head, "To", &format!("<{sender}>"));
    push_field(&mut head, "Subject", subject);
    push_field(&mut head, "Date", &rfc5322_date(input.now));
    push_field(
        &mut head,
        "Message-ID",
        &format!(
            "<{}.dsn.{now_ms}.{:08x}@{host}>",
            msgid_atom(input.queue_id),
            recipients_hash(&recipients)
        ),
    );
    push_field(&mut head, "Auto-Submitted", "auto-replied");
    push_field(&mut head, "MIME-Version", "1.0");
    head.push_str(&format!(
        "Content-Type: multipart/report; report-type={report_type};\r\n\tboundary=\"{boundary}\"\r\n"
    ));
    if eightbit {
        head.push_str("Content-Transfer-Encoding: 8bit\r\n");
    }
    head.push_str("\r\nThis is a MIME-encapsulated delivery status notification.\r\n");

    let mut out = head.into_bytes();
    let cte = if smtputf8 {
        "Content-Transfer-Encoding: 8bit\r\n"
    } else {
        ""
    };
    push_part(
        &mut out,
        &boundary,
        &format!("Content-Type: text/plain; charset={charset}\r\nContent-Description: Notification\r\n{cte}"),
        text.as_bytes(),
    );
    push_part(
        &mut out,
        &boundary,
        &format!("Content-Type: {status_type}\r\nContent-Description: Delivery report\r\n{cte}"),
        status.as_bytes(),
    );
    let headers_cte = if headers_8bit {
        "Content-Transfer-Encoding: 8bit\r\n"
    } else {
        ""
    };
    push_part(
        &mut out,
        &boundary,
        &format!("Content-Type: {headers_type}\r\nContent-Description: Undelivered Message Headers\r\n{headers_cte}"),
        &section,
    );
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());

    Dsn {
        message: out,
        eightbit,
        smtputf8,
    }
}

/// One body part: the delimiter line, its header fields, a blank line, the
/// content (CRLF-terminated lines) and a trailing blank line, so that the CRLF
/// that belongs to the next delimiter (RFC 2046 §5.1.1) is not taken from the
/// content.
fn push_part(out: &mut Vec<u8>, boundary: &str, headers: &str, content: &[u8]) {
    out.extend_from_slice(format!("--{boundary}\r\n{headers}\r\n").as_bytes());
    out.extend_from_slice(content);
    out.extend_from_slice(b"\r\n");
}

fn human_part(input: &DsnInput, host: &str, upstream: Option<&str>, addrs: &[String]) -> String {
    let mut t = String::with_capacity(1024);
    wrap_into(&mut t, "", &format!("This is the mail delivery system at {host}."));
    t.push_str("\r\n");
    let failed: Vec<usize> = (0..input.recipients.len())
        .filter(|&i| input.recipients[i].action == Action::Failed)
        .collect();
    let delayed: Vec<usize> = (0..input.recipients.len())
        .filter(|&i| input.recipients[i].action == Action::Delayed)
        .collect();
    if !failed.is_empty() {
        wrap_into(
            &mut t,
            "",
            "Your message could not be delivered to the recipients listed below, and no further \
             attempts will be made. A delivery report and the header of your message are attached.",
        );
        t.push_str("\r\n");
        for &i in &failed {
            describe(&mut t, &input.recipients[i], &addrs[i], upstream);
        }
    }
    if !delayed.is_empty() {
        wrap_into(
            &mut t,
            "",
            "Your message has not yet been delivered to the recipients listed below. Delivery is \
             still being retried; you do not need to send it again. You will be notified if it \
             finally fails.",
        );
        t.push_str("\r\n");
        for &i in &delayed {
            describe(&mut t, &input.recipients[i], &addrs[i], upstream);
        }
    }
    t
}

fn describe(t: &mut String, r: &DsnRecipient, addr: &str, upstream: Option<&str>) {
    let what = match (r.action, r.expired) {
        (Action::Failed, true) => "delivery time expired",
        (Action::Failed, false) => "delivery failed",
        (Action::Delayed, _) => "delivery delayed",
    };
    wrap_into(t, "", &format!("<{addr}>: {what} (status {})", status_for(r)));
    match r.reply.as_ref() {
        Some(reply) if reply.code.is_some() => {
            let server = upstream.unwrap_or("the remote server");
            wrap_into(t, "    ", &format!("{server} replied: {}", smtp_diagnostic(reply)));
        }
        Some(reply) if !sanitize_text(&reply.text).is_empty() => {
            wrap_into(t, "    ", &format!("Reason: {}", sanitize_text(&reply.text)));
        }
        _ if r.expired => wrap_into(
            t,
            "    ",
            "Reason: the message could not be delivered within the queue lifetime.",
        ),
        _ => {}
    }
    t.push_str("\r\n");
}

fn status_part(input: &DsnInput, host: &str, upstream: Option<&str>, addrs: &[String]) -> String {
    let mut s = String::with_capacity(512);
    push_field(&mut s, "Reporting-MTA", &format!("dns; {host}"));
    push_field(&mut s, "X-Sendguard-Queue-ID", &sanitize_text(input.queue_id));
    push_field(&mut s, "Arrival-Date", &rfc5322_date(input.arrival));
    for (r, addr) in input.recipients.iter().zip(addrs) {
        s.push_str("\r\n");
        let final_recipient = if addr.is_ascii() {
            format!("rfc822; {addr}")
        } else {
            // RFC 6533 §3 utf-8-address form, valid in message/global-delivery-status.
            format!("utf-8; {addr}")
        };
        push_field(&mut s, "Final-Recipient", &final_recipient);
        push_field(&mut s, "Action", r.action.as_str());
        push_field(&mut s, "Status", &status_for(r));
        match r.reply.as_ref() {
            Some(reply) if reply.code.is_some() => {
                if let Some(up) = upstream {
                    push_field(&mut s, "Remote-MTA", &format!("dns; {up}"));
                }
                push_field(&mut s, "Diagnostic-Code", &format!("smtp; {}", smtp_diagnostic(reply)));
            }
            other => {
                let text = other.map(|x| sanitize_text(&x.text)).unwrap_or_default();
                let text = match (text.is_empty(), r.action, r.expired) {
                    (false, ..) => text,
                    (true, Action::Delayed, _) => "not yet delivered; no reply from the upstream relay".into(),
                    (true, Action::Failed, true) => {
                        "delivery time expired without a reply from the upstream relay".into()
                    }
                    (true, Action::Failed, false) => "delivery failed without a reply from the upstream relay".into(),
                };
                push_field(&mut s, "Diagnostic-Code", &format!("X-Sendguard; {text}"));
            }
        }
        push_field(&mut s, "Last-Attempt-Date", &rfc5322_date(r.last_attempt));
    }
    s
}

/// `550 5.1.1 text`, all sanitized.
fn smtp_diagnostic(reply: &ReplyRecord) -> String {
    let mut d = String::new();
    if let Some(code) = reply.code {
        d.push_str(&code.to_string());
    }
    if let Some(e) = reply.enhanced.as_deref().and_then(parse_enhanced) {
        d.push_str(&format!(" {}.{}.{}", e.0, e.1, e.2));
    }
    let text = sanitize_text(&reply.text);
    if !text.is_empty() {
        d.push(' ');
        d.push_str(&text);
    }
    d.trim_start().to_string()
}

fn parse_enhanced(s: &str) -> Option<(u8, u16, u16)> {
    fn num(x: &str) -> Option<u16> {
        if (1..=3).contains(&x.len()) && x.bytes().all(|b| b.is_ascii_digit()) {
            x.parse().ok()
        } else {
            None
        }
    }
    let mut it = s.trim().split('.');
    let class = match it.next()? {
        "2" => 2,
        "4" => 4,
        "5" => 5,
        _ => return None,
    };
    let subject = num(it.next()?)?;
    let detail = num(it.next()?)?;
    if it.next().is_some() {
        return None;
    }
    Some((class, subject, detail))
}

/// Untrusted text (upstream replies) → printable ASCII, single spaces.
fn sanitize_text(s: &str) -> String {
    let mapped: String = s
        .chars()
        .map(|c| match c {
            ' '..='~' => c,
            c if c.is_control() => ' ',
            _ => '?',
        })
        .collect();
    mapped.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Envelope addresses: no control characters, no surrounding space or brackets.
fn sanitize_addr(s: &str) -> String {
    let s: String = s.chars().filter(|c| !c.is_control()).collect();
    let s = s.trim();
    let s = s.strip_prefix('<').and_then(|x| x.strip_suffix('>')).unwrap_or(s);
    s.trim().to_string()
}

/// Host names: visible ASCII only.
fn sanitize_host(s: &str) -> String {
    let h: String = s.chars().filter(|c| c.is_ascii_graphic()).collect();
    if h.is_empty() { "localhost".to_string() } else { h }
}

/// FNV-1a over the reported recipients, for the Message-ID: two DSNs for
/// one message (its recipients at two providers, failing in the same
/// millisecond) get different ids, so a receiver that drops duplicate
/// Message-IDs (Gmail does) shows both.
fn recipients_hash(recipients: &[String]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for r in recipients {
        for &b in r.as_bytes().iter().chain(b"\n") {
            h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
        }
    }
    h
}

/// The queue id as a dot-atom-text fragment for the Message-ID.
fn msgid_atom(queue_id: &str) -> String {
    let a: String = queue_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        .take(64)
        .collect();
    if a.is_empty() { "unknown".to_string() } else { a }
}

/// A boundary derived from the queue id that occurs in none of `contents`.
fn choose_boundary(queue_id: &str, contents: &[&[u8]]) -> String {
    let id: String = queue_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(40)
        .collect();
    let base = format!("{BOUNDARY_PREFIX}{id}");
    let mut n = 0u32;
    loop {
        let candidate = if n == 0 { base.clone() } else { format!("{base}_{n}") };
        if contents
            .iter()
            .all(|c| memchr::memmem::find(c, candidate.as_bytes()).is_none())
        {
            return candidate;
        }
        n += 1;
    }
}

/// Header section of `original`: up to and including the CRLF that ends the
/// last header line before the first empty line; all of it if there is none.
fn header_section(original: &[u8]) -> &[u8] {
    if original.starts_with(b"\r\n") || original.starts_with(b"\n") {
        return &[];
    }
    if let Some(i) = memchr::memmem::find(original, b"\r\n\r\n") {
        &original[..i + 2]
    } else if let Some(i) = memchr::memmem::find(original, b"\n\n") {
        &original[..i + 1]
    } else {
        original
    }
}

/// Re-emit a header section with CRLF line endings, no empty lines, no bare
/// CR or NUL, and no line longer than [`MAX_LINE`]. Other octets (8-bit
/// included) are kept as they are.
fn normalize_header_section(section: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(section.len() + 16);
    for line in section.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(|&b| b == b'\r' || b == b' ' || b == b'\t') {
            continue;
        }
        let line: Vec<u8> = line
            .iter()
            .map(|&b| if b == b'\r' || b == 0 { b' ' } else { b })
            .collect();
        push_long_line(&mut out, &line);
    }
    out
}

/// Write `line` + CRLF, folding it into continuation lines of at most
/// [`MAX_LINE`] octets: at whitespace when possible, otherwise by inserting a
/// folding space (never inside a UTF-8 sequence).
fn push_long_line(out: &mut Vec<u8>, mut line: &[u8]) {
    let mut lead_space = false;
    loop {
        let lead = usize::from(lead_space);
        if line.len() + lead <= MAX_LINE {
            if lead_space {
                out.push(b' ');
            }
            out.extend_from_slice(line);
            out.extend_from_slice(b"\r\n");
            return;
        }
        let limit = MAX_LINE - 8 - lead;
        let (cut, next_needs_space) = match line[1..limit].iter().rposition(|&b| b == b' ' || b == b'\t') {
            Some(p) => (p + 1, false),
            None => {
                let mut q = limit;
                let mut back = 0;
                while back < 3 && (line[q] & 0xC0) == 0x80 {
                    q -= 1;
                    back += 1;
                }
                (q, true)
            }
        };
        if lead_space {
            out.push(b' ');
        }
        out.extend_from_slice(&line[..cut]);
        out.extend_from_slice(b"\r\n");
        line = &line[cut..];
        lead_space = next_needs_space;
    }
}

/// Append `Name: value` CRLF, folded at spaces to about [`WRAP`] columns; a
/// word longer than [`CHUNK`] is split (unfolding then shows a space there).
/// `value` must not contain CR or LF.
fn push_field(out: &mut String, name: &str, value: &str) {
    out.push_str(name);
    out.push(':');
    let mut line_len = name.len() + 1;
    let mut words_on_line = 0;
    for word in value.split(' ').filter(|w| !w.is_empty()) {
        for chunk in chunks(word, CHUNK) {
            if words_on_line > 0 && line_len + 1 + chunk.len() > WRAP {
                out.push_str("\r\n");
                line_len = 0;
                words_on_line = 0;
            }
            out.push(' ');
            out.push_str(chunk);
            line_len += 1 + chunk.len();
            words_on_line += 1;
        }
    }
    out.push_str("\r\n");
}

/// Append `text` word-wrapped to [`WRAP`] columns, each line prefixed by `indent`.
fn wrap_into(out: &mut String, indent: &str, text: &str) {
    let mut line = String::new();
    for word in text.split(' ').filter(|w| !w.is_empty()) {
        for chunk in chunks(word, CHUNK) {
            if !line.is_empty() && indent.len() + line.len() + 1 + chunk.len() > WRAP {
                out.push_str(indent);
                out.push_str(&line);
                out.push_str("\r\n");
                line.clear();
            }
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(chunk);
        }
    }
    if !line.is_empty() {
        out.push_str(indent);
        out.push_str(&line);
        out.push_str("\r\n");
    }
}

/// Split `s` into pieces of at most `max` bytes at char boundaries.
fn chunks(s: &str, max: usize) -> impl Iterator<Item = &str> {
    let mut rest = s;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut end = rest.len().min(max);
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        let (head, tail) = rest.split_at(end);
        rest = tail;
        Some(head)
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use mail_parser::{MessageParser, MimeHeaders, PartType};

    use super::*;

    const ORIGINAL: &[u8] =
        b"From: App <app@sender.example>\r\nTo: <alice@example.net>\r\nSubject: Your invoice 42\r\n\
Message-ID: <inv42@sender.example>\r\n\r\nBody line that must not be returned.\r\n";

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn reply(code: u16, enhanced: Option<&str>, text: &str) -> Option<ReplyRecord> {
        Some(ReplyRecord {
            code: Some(code),
            enhanced: enhanced.map(str::to_string),
            text: text.to_string(),
        })
    }

    fn rcpt(address: &str, action: Action, reply: Option<ReplyRecord>, expired: bool) -> DsnRecipient {
        DsnRecipient {
            address: address.to_string(),
            action,
            reply,
            expired,
            last_attempt: t(1_700_000_600),
        }
    }

    fn input<'a>(recipients: &'a [DsnRecipient], original: &'a [u8]) -> DsnInput<'a> {
        DsnInput {
            reporting_mta: "sendguard.example",
            queue_id: "Q1A2B3",
            original_sender: "app@sender.example",
            arrival: t(1_700_000_000),
            upstream: Some("relay.upstream.example"),
            recipients,
            original,
            now: t(1_700_000_700),
        }
    }

    /// Unfolded `(name, value)` fields of each blank-line-separated block.
    fn blocks(body: &str) -> Vec<Vec<(String, String)>> {
        let mut out = Vec::new();
        for block in body.split("\r\n\r\n") {
            let mut fields: Vec<(String, String)> = Vec::new();
            for line in block.split("\r\n").filter(|l| !l.is_empty()) {
                if line.starts_with([' ', '\t']) {
                    fields.last_mut().expect("continuation after a field").1.push_str(line);
                } else {
                    let (n, v) = line.split_once(':').expect("a field");
                    fields.push((n.to_string(), v.trim().to_string()));
                }
            }
            if !fields.is_empty() {
                out.push(fields);
            }
        }
        out
    }

    fn field<'a>(block: &'a [(String, String)], name: &str) -> Option<&'a str> {
        block
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every line ends in CRLF, no bare CR or LF, no line over 998 octets.
    /// Top-level MIME parts of a built DSN, as mail-parser reads them.
    fn part_count(msg: &[u8]) -> usize {
        MessageParser::default()
            .parse(msg)
            .unwrap()
            .root_part()
            .sub_parts()
            .unwrap()
            .len()
    }

    fn assert_lines_ok(msg: &[u8]) {
        assert!(msg.ends_with(b"\r\n"));
        for (i, &b) in msg.iter().enumerate() {
            if b == b'\n' {
                assert!(i > 0 && msg[i - 1] == b'\r', "bare LF at {i}");
            }
            if b == b'\r' {
                assert_eq!(msg.get(i + 1), Some(&b'\n'), "bare CR at {i}");
            }
        }
        for line in msg.split(|&b| b == b'\n') {
            assert!(line.len() <= MAX_LINE + 1, "line of {} octets", line.len() - 1);
        }
    }

    /// The delivery-status body of a parsed DSN (third part of the parse tree).
    fn status_body(msg: &[u8]) -> String {
        let m = MessageParser::default().parse(msg).expect("parses");
        String::from_utf8(m.parts[2].contents().to_vec()).unwrap()
    }

    #[test]
    fn structure_parses_back() {
        let rcpts = [
            rcpt(
                "bob@example.net",
                Action::Failed,
                reply(550, Some("5.1.1"), "No such user"),
                false,
            ),
            rcpt("carol@example.org", Action::Failed, None, true),
        ];
        let dsn = build(&input(&rcpts, ORIGINAL));
        assert!(!dsn.eightbit && !dsn.smtputf8);
        assert_lines_ok(&dsn.message);
        assert!(dsn.message.is_ascii());

        let m = MessageParser::default().parse(&dsn.message).expect("parses");
        let ct = m.content_type().expect("content type");
        assert_eq!((ct.ctype(), ct.subtype()), ("multipart", Some("report")));
        assert_eq!(ct.attribute("report-type"), Some("delivery-status"));
        assert_eq!(m.subject(), Some("Undelivered Mail Returned to Sender"));
        assert_eq!(
            m.from().and_then(|a| a.first()).and_then(|a| a.address()),
            Some("MAILER-DAEMON@sendguard.example")
        );
        assert_eq!(
            m.to().and_then(|a| a.first()).and_then(|a| a.address()),
            Some("app@sender.example")
        );
        assert_eq!(m.header_raw("Auto-Submitted").map(str::trim), Some("auto-replied"));
        let id = m.message_id().expect("Message-ID");
        assert!(
            id.starts_with("Q1A2B3.dsn.1700000700000.") && id.ends_with("@sendguard.example"),
            "{id}"
        );
        // Another DSN for the same message in the same millisecond, for
        // other recipients: another Message-ID.
        let other = [DsnRecipient {
            address: "someone-else@example.org".into(),
            ..rcpts[0].clone()
        }];
        let again = build(&input(&other, ORIGINAL));
        let m2 = MessageParser::default().parse(&again.message).expect("parses");
        assert_ne!(m2.message_id(), Some(id));
        assert_eq!(
            m.header_raw("Date").map(str::trim),
            Some("Tue, 14 Nov 2023 22:25:00 +0000")
        );

        let sub = m.root_part().sub_parts().expect("multipart");
        assert_eq!(sub.len(), 3);
        let types: Vec<String> = sub
            .iter()
            .map(|&i| {
                let ct = m.parts[i as usize].content_type().unwrap();
                format!("{}/{}", ct.ctype(), ct.subtype().unwrap_or(""))
            })
            .collect();
        assert_eq!(types, ["text/plain", "message/delivery-status", "text/rfc822-headers"]);

        let human = m.parts[sub[0] as usize].text_contents().unwrap();
        assert!(
            human.contains("<bob@example.net>: delivery failed (status 5.1.1)"),
            "{human}"
        );
        assert!(
            human.contains("relay.upstream.example replied: 550 5.1.1 No such user"),
            "{human}"
        );
        assert!(
            human.contains("<carol@example.org>: delivery time expired (status 4.4.7)"),
            "{human}"
        );

        let report = String::from_utf8(m.parts[sub[1] as usize].contents().to_vec()).unwrap();
        let b = blocks(&report);
        assert_eq!(b.len(), 3, "{report}");
        assert_eq!(field(&b[0], "Reporting-MTA"), Some("dns; sendguard.example"));
        assert_eq!(field(&b[0], "X-Sendguard-Queue-ID"), Some("Q1A2B3"));
        assert_eq!(field(&b[0], "Arrival-Date"), Some("Tue, 14 Nov 2023 22:13:20 +0000"));
        assert_eq!(field(&b[1], "Final-Recipient"), Some("rfc822; bob@example.net"));
        assert_eq!(field(&b[1], "Action"), Some("failed"));
        assert_eq!(field(&b[1], "Status"), Some("5.1.1"));
        assert_eq!(field(&b[1], "Remote-MTA"), Some("dns; relay.upstream.example"));
        assert_eq!(field(&b[1], "Diagnostic-Code"), Some("smtp; 550 5.1.1 No such user"));
        assert_eq!(
            field(&b[1], "Last-Attempt-Date"),
            Some("Tue, 14 Nov 2023 22:23:20 +0000")
        );
        assert_eq!(field(&b[2], "Final-Recipient"), Some("rfc822; carol@example.org"));
        assert_eq!(field(&b[2], "Status"), Some("4.4.7"));
        assert_eq!(field(&b[2], "Remote-MTA"), None, "no reply, so no remote MTA");
        assert!(field(&b[2], "Diagnostic-Code").unwrap().starts_with("X-Sendguard; "));

        let headers = m.parts[sub[2] as usize].text_contents().unwrap();
        assert!(headers.contains("Subject: Your invoice 42\r\n"), "{headers}");
        assert!(headers.contains("Message-ID: <inv42@sender.example>\r\n"));
        assert!(!String::from_utf8_lossy(&dsn.message).contains("must not be returned"));
    }

    #[test]
    fn delayed_only_subject_and_fields() {
        let rcpts = [rcpt(
            "bob@example.net",
            Action::Delayed,
            reply(451, Some("4.7.1"), "Try again later"),
            false,
        )];
        let dsn = build(&input(&rcpts, ORIGINAL));
        let m = MessageParser::default().parse(&dsn.message).unwrap();
        assert_eq!(m.subject(), Some("Delayed Mail (still being retried)"));
        let b = blocks(&status_body(&dsn.message));
        assert_eq!(field(&b[1], "Action"), Some("delayed"));
        assert_eq!(field(&b[1], "Status"), Some("4.7.1"));
        let human = m.parts[1].text_contents().unwrap();
        assert!(human.contains("still being retried"), "{human}");

        // Mixed failed and delayed: a failure subject.
        let rcpts = [
            rcpt("bob@example.net", Action::Delayed, None, false),
            rcpt("carol@example.net", Action::Failed, reply(550, None, "no"), false),
        ];
        let m2 = build(&input(&rcpts, ORIGINAL));
        let m2 = MessageParser::default().parse(&m2.message).unwrap();
        assert_eq!(m2.subject(), Some("Undelivered Mail Returned to Sender"));
        let b = blocks(&status_body(&build(&input(&rcpts, ORIGINAL)).message));
        assert_eq!(field(&b[1], "Action"), Some("delayed"));
        assert_eq!(field(&b[1], "Status"), Some("4.0.0"));
        assert_eq!(
            field(&b[1], "Diagnostic-Code"),
            Some("X-Sendguard; not yet delivered; no reply from the upstream relay")
        );
        assert_eq!(field(&b[2], "Action"), Some("failed"));
        assert_eq!(field(&b[2], "Status"), Some("5.0.0"));
    }

    #[test]
    fn long_reply_text_is_folded_within_998() {
        let long_word = "x".repeat(5000);
        let long_words = "word ".repeat(1000);
        for text in [long_word.as_str(), long_words.as_str()] {
            let rcpts = [rcpt(
                "bob@example.net",
                Action::Failed,
                reply(550, Some("5.7.1"), text),
                false,
            )];
            let dsn = build(&input(&rcpts, ORIGINAL));
            assert_lines_ok(&dsn.message);
            let b = blocks(&status_body(&dsn.message));
            let diag = field(&b[1], "Diagnostic-Code").unwrap();
            assert!(diag.starts_with("smtp; 550 5.7.1 "));
            // Nothing is lost: folding only adds whitespace.
            let squeezed: String = diag.chars().filter(|c| *c != ' ').collect();
            assert_eq!(
                squeezed.matches('x').count() + squeezed.matches("word").count() * 4,
                text.trim().replace(' ', "").len()
            );
            assert_eq!(
                field(&b[1], "Status"),
                Some("5.7.1"),
                "fields after the long one survive"
            );
            assert!(field(&b[1], "Last-Attempt-Date").is_some());
        }
    }

    #[test]
    fn reply_text_cannot_inject_fields_or_headers() {
        let evil = "User unknown\r\nBcc: victim@example.com\r\n\r\nX-Injected: yes\rAction: delivered\nStatus: 2.0.0\u{0}\u{7f}";
        let rcpts = [rcpt(
            "bob@example.net",
            Action::Failed,
            reply(550, Some("5.1.1"), evil),
            false,
        )];
        let dsn = build(&input(&rcpts, ORIGINAL));
        assert_lines_ok(&dsn.message);
        let text = String::from_utf8(dsn.message.clone()).unwrap();
        for line in text.split("\r\n") {
            assert!(!line.starts_with("Bcc:") && !line.starts_with("X-Injected:"), "{line}");
            assert!(
                !line.starts_with("Status: 2.0.0") && !line.starts_with("Action: delivered"),
                "{line}"
            );
            assert!(!line.contains('\0') && !line.contains('\u{7f}'));
        }
        let m = MessageParser::default().parse(&dsn.message).unwrap();
        assert!(m.header_raw("Bcc").is_none() && m.header_raw("X-Injected").is_none());
        let b = blocks(&status_body(&dsn.message));
        assert_eq!(b.len(), 2);
        assert_eq!(field(&b[1], "Action"), Some("failed"));
        assert_eq!(
            field(&b[1], "Diagnostic-Code"),
            Some(
                "smtp; 550 5.1.1 User unknown Bcc: victim@example.com X-Injected: yes Action: delivered Status: 2.0.0"
            )
        );
    }

    #[test]
    fn status_table() {
        let s = |action, reply, expired| status_for(&rcpt("a@b.example", action, reply, expired));
        use Action::{Delayed, Failed};
        // The reply's enhanced code when its class matches the action.
        assert_eq!(s(Failed, reply(550, Some("5.1.1"), "x"), false), "5.1.1");
        assert_eq!(
            s(Failed, reply(554, Some("5.7.1"), "x"), true),
            "5.7.1",
            "a 5.x.x refusal wins over expiry"
        );
        assert_eq!(s(Delayed, reply(451, Some("4.7.1"), "x"), false), "4.7.1");
        // Basic code without an enhanced code.
        assert_eq!(s(Failed, reply(550, None, "x"), false), "5.0.0");
        assert_eq!(s(Delayed, reply(421, None, "x"), false), "4.0.0");
        // Class mismatch between basic and enhanced: class from the basic code.
        assert_eq!(s(Failed, reply(550, Some("4.4.7"), "x"), false), "5.4.7");
        assert_eq!(s(Delayed, reply(451, Some("5.7.1"), "x"), false), "4.7.1");
        // Queue lifetime ran out: 4.4.7 whatever the last transient reply said.
        assert_eq!(s(Failed, reply(451, Some("4.4.1"), "x"), true), "4.4.7");
        assert_eq!(s(Failed, reply(421, None, "x"), true), "4.4.7");
        assert_eq!(s(Failed, None, true), "4.4.7");
        // Given up after a transient reply, not expired: a persistent transient failure.
        assert_eq!(s(Failed, reply(451, Some("4.3.0"), "x"), false), "4.3.0");
        assert_eq!(s(Failed, reply(452, None, "x"), false), "4.0.0");
        // Local failures without a reply.
        assert_eq!(s(Failed, None, false), "5.0.0");
        assert_eq!(
            s(Failed, Some(ReplyRecord::local("connection refused")), false),
            "5.0.0"
        );
        assert_eq!(s(Delayed, None, false), "4.0.0");
        // Malformed enhanced codes are ignored.
        assert_eq!(s(Failed, reply(550, Some("5.1"), "x"), false), "5.0.0");
        assert_eq!(s(Failed, reply(550, Some("5.1.1.1"), "x"), false), "5.0.0");
        assert_eq!(s(Failed, reply(550, Some("7.1.1"), "x"), false), "5.0.0");
        assert_eq!(s(Failed, reply(550, Some("5.1000.1"), "x"), false), "5.0.0");
        // Delayed with a contradictory permanent reply still says 4.
        assert_eq!(s(Delayed, reply(550, None, "x"), false), "4.0.0");
    }

    #[test]
    fn local_failure_uses_private_diagnostic_type() {
        let rcpts = [rcpt(
            "bob@example.net",
            Action::Failed,
            Some(ReplyRecord::local("connection refused")),
            false,
        )];
        let dsn = build(&input(&rcpts, ORIGINAL));
        let b = blocks(&status_body(&dsn.message));
        assert_eq!(field(&b[1], "Diagnostic-Code"), Some("X-Sendguard; connection refused"));
        assert_eq!(field(&b[1], "Remote-MTA"), None);
        assert_eq!(field(&b[1], "Status"), Some("5.0.0"));

        // Unknown upstream: no Remote-MTA even with a reply.
        let rcpts = [rcpt(
            "bob@example.net",
            Action::Failed,
            reply(550, Some("5.1.1"), "unknown"),
            false,
        )];
        let mut i = input(&rcpts, ORIGINAL);
        i.upstream = None;
        let b = blocks(&status_body(&build(&i).message));
        assert_eq!(field(&b[1], "Remote-MTA"), None);
        assert_eq!(field(&b[1], "Diagnostic-Code"), Some("smtp; 550 5.1.1 unknown"));
    }

    #[test]
    fn eight_bit_headers_are_kept_verbatim() {
        let original = "From: J\u{fc}rgen <j@sender.example>\r\nSubject: Gr\u{fc}\u{df}e\r\n\r\nbody\r\n";
        let mut latin1 = b"Subject: caf".to_vec();
        latin1.extend_from_slice(&[0xE9, b'\r', b'\n', b'\r', b'\n']);
        for orig in [original.as_bytes(), &latin1] {
            let rcpts = [rcpt(
                "bob@example.net",
                Action::Failed,
                reply(550, Some("5.1.1"), "no"),
                false,
            )];
            let dsn = build(&input(&rcpts, orig));
            assert!(dsn.eightbit && !dsn.smtputf8);
            assert_lines_ok(&dsn.message);
            let section = &orig[..memchr::memmem::find(orig, b"\r\n\r\n").unwrap() + 2];
            assert!(
                memchr::memmem::find(&dsn.message, section).is_some(),
                "header section returned verbatim"
            );
            let text = String::from_utf8_lossy(&dsn.message);
            assert!(text.contains("Content-Type: text/rfc822-headers\r\n"));
            assert!(text.contains("Content-Transfer-Encoding: 8bit\r\n"));
            assert!(text.contains("report-type=delivery-status;"));
        }
    }

    #[test]
    fn non_ascii_addresses_make_a_global_report() {
        let rcpts = [
            rcpt(
                "j\u{fc}rgen@b\u{fc}cher.example",
                Action::Failed,
                reply(550, Some("5.1.1"), "no"),
                false,
            ),
            rcpt(
                "bob@example.net",
                Action::Failed,
                reply(550, Some("5.1.1"), "no"),
                false,
            ),
        ];
        let mut i = input(&rcpts, ORIGINAL);
        let sender = "\u{7528}\u{6237}@sender.example";
        i.original_sender = sender;
        let dsn = build(&i);
        assert!(dsn.smtputf8 && dsn.eightbit);
        assert_lines_ok(&dsn.message);
        let m = MessageParser::default().parse(&dsn.message).unwrap();
        assert_eq!(
            m.content_type().unwrap().attribute("report-type"),
            Some("global-delivery-status")
        );
        assert!(m.parts[2].is_content_type("message", "global-delivery-status"));
        assert!(m.parts[3].is_content_type("message", "global-headers"));
        assert!(m.parts[1].content_type().unwrap().attribute("charset") == Some("utf-8"));
        let b = blocks(&status_body(&dsn.message));
        assert_eq!(
            field(&b[1], "Final-Recipient"),
            Some("utf-8; j\u{fc}rgen@b\u{fc}cher.example")
        );
        assert_eq!(field(&b[2], "Final-Recipient"), Some("rfc822; bob@example.net"));
        let text = String::from_utf8(dsn.message).unwrap();
        assert!(text.contains(&format!("To: <{sender}>\r\n")));
    }

    #[test]
    fn boundary_never_occurs_in_content() {
        let original =
            b"Subject: trap\r\nX-Trap: --=_sendguard-dsn_Q1A2B3\r\nX-Trap2: =_sendguard-dsn_Q1A2B3_1\r\n\r\n";
        let rcpts = [rcpt(
            "bob@example.net",
            Action::Failed,
            reply(550, Some("5.1.1"), "=_sendguard-dsn_Q1A2B3_2"),
            false,
        )];
        let dsn = build(&input(&rcpts, original));
        let m = MessageParser::default().parse(&dsn.message).unwrap();
        let boundary = m.content_type().unwrap().attribute("boundary").unwrap().to_string();
        assert_eq!(boundary, "=_sendguard-dsn_Q1A2B3_3");
        let text = String::from_utf8(dsn.message.clone()).unwrap();
        assert_eq!(text.matches(&boundary).count(), 5, "header + three delimiters + close");
        assert_eq!(m.root_part().sub_parts().unwrap().len(), 3);
        assert!(
            m.parts[3]
                .text_contents()
                .unwrap()
                .contains("X-Trap: --=_sendguard-dsn_Q1A2B3")
        );
    }

    #[test]
    fn header_section_edge_cases() {
        // LF-only original: normalized to CRLF, body not included.
        let lf = b"Subject: lf only\nX-A: 1\n\nbody\n";
        let rcpts = [rcpt("bob@example.net", Action::Failed, None, false)];
        let dsn = build(&input(&rcpts, lf));
        assert_lines_ok(&dsn.message);
        let m = MessageParser::default().parse(&dsn.message).unwrap();
        assert_eq!(m.parts[3].text_contents().unwrap(), "Subject: lf only\r\nX-A: 1\r\n");

        // No blank line: all of it is the header section; bare CR and NUL neutralized.
        let all = b"Subject: no body\r\nX-B: a\rb\0c";
        let dsn = build(&input(&rcpts, all));
        assert_lines_ok(&dsn.message);
        let m = MessageParser::default().parse(&dsn.message).unwrap();
        assert_eq!(
            m.parts[3].text_contents().unwrap(),
            "Subject: no body\r\nX-B: a b c\r\n"
        );

        // Over-long lines are folded, at whitespace or by inserting one.
        let mut long = b"X-Long: ".to_vec();
        long.extend(std::iter::repeat_n(b'a', 3000));
        long.extend_from_slice(b"\r\nX-Spaced:");
        for _ in 0..400 {
            long.extend_from_slice(b" word");
        }
        long.extend_from_slice("\r\nX-Utf8: ".as_bytes());
        long.extend("\u{e9}".repeat(1500).as_bytes());
        long.extend_from_slice(b"\r\n\r\n");
        let dsn = build(&input(&rcpts, &long));
        assert_lines_ok(&dsn.message);
        let m = MessageParser::default().parse(&dsn.message).unwrap();
        let h = m.parts[3]
            .text_contents()
            .expect("still valid UTF-8: no sequence split");
        // Folded at whitespace: removing the inserted CRLFs restores the line exactly.
        assert!(
            h.replace("\r\n", "")
                .contains(&format!("X-Spaced:{}X-Utf8", " word".repeat(400)))
        );
        // Hard-split: only whitespace was added.
        let squeezed: String = h.chars().filter(|c| !c.is_whitespace()).collect();
        assert!(squeezed.contains(&format!("X-Long:{}X-Spaced", "a".repeat(3000))));
        assert!(squeezed.ends_with(&format!("X-Utf8:{}", "\u{e9}".repeat(1500))));

        // Empty header section.
        let dsn = build(&input(&rcpts, b"\r\nbody only\r\n"));
        assert_lines_ok(&dsn.message);
        assert_eq!(part_count(&dsn.message), 3);
    }

    #[test]
    fn arbitrary_original_bytes_give_valid_lines() {
        let rcpts = [rcpt("bob@example.net", Action::Failed, None, false)];
        let mut original: Vec<u8> = Vec::new();
        for round in 0..12u32 {
            original.extend_from_slice(b"X-Bytes: ");
            original.extend(
                (0..=255u8)
                    .cycle()
                    .skip(round as usize * 13)
                    .take(1500 + round as usize * 37),
            );
            original.extend_from_slice(b"\r\n");
        }
        for end in [0, 1, 2, 500, 999, 1000, 4000, original.len()] {
            let dsn = build(&input(&rcpts, &original[..end.min(original.len())]));
            assert_lines_ok(&dsn.message);
            assert_eq!(part_count(&dsn.message), 3);
        }
    }

    #[test]
    fn hostile_envelope_values_stay_on_their_line() {
        let rcpts = [rcpt("bob@example.net\r\nBcc: x@y.example", Action::Failed, None, false)];
        let mut i = input(&rcpts, ORIGINAL);
        i.original_sender = "<app@sender.example>\r\nBcc: z@y.example";
        i.queue_id = "Q1\r\nX: y";
        let dsn = build(&i);
        assert_lines_ok(&dsn.message);
        let text = String::from_utf8(dsn.message).unwrap();
        assert!(
            !text
                .split("\r\n")
                .any(|l| l.starts_with("Bcc:") || l.starts_with("X: y")),
            "{text}"
        );
    }

    #[test]
    fn parts_types_match_mail_parser_body_kinds() {
        let rcpts = [rcpt("bob@example.net", Action::Failed, None, false)];
        let dsn = build(&input(&rcpts, ORIGINAL));
        let m = MessageParser::default().parse(&dsn.message).unwrap();
        assert!(matches!(m.parts[1].body, PartType::Text(_)));
        assert!(matches!(m.parts[2].body, PartType::Binary(_)));
        assert!(matches!(m.parts[3].body, PartType::Text(_)));
    }
}
