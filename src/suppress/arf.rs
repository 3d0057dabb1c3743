//! Feedback reports (complaints) in the Abuse Reporting Format.
//!
//! [`parse`] reads an RFC 5965 report: a `multipart/report;
//! report-type=feedback-report` message (RFC 6522 §3) whose parts are a
//! human-readable explanation, the machine-readable `message/feedback-report`
//! (RFC 5965 §3.1–3.3: `Feedback-Type`, `User-Agent`, `Version`,
//! `Original-Mail-From`, `Original-Rcpt-To`, `Arrival-Date`, `Source-IP`,
//! `Reported-Domain`, …; the field syntax is that of RFC 5322 header fields,
//! folding included) and the reported message, either whole as
//! `message/rfc822` (or `message/global`, RFC 6532) or only its header
//! section as `text/rfc822-headers` (RFC 6522 §4; RFC 5965 §2 allows either).
//! Feedback types are those of the IANA registry (RFC 5965 §7.3: `abuse`,
//! `fraud`, `virus`, `other`; RFC 6430: `not-spam`; RFC 6591:
//! `auth-failure`).
//!
//! Real feedback loops bend the format, and the parser is lenient where they
//! do: a missing `report-type` parameter is accepted when a
//! `message/feedback-report` part is present; `Received-Date` (the pre-RFC
//! draft name, sent by Yahoo-style generators) stands in for `Arrival-Date`;
//! when `Original-Rcpt-To`
//! is absent (Microsoft JMRP, AOL and others only return the message) the
//! recipient comes from the returned message: `X-HmXmrOriginalRecipient`
//! (JMRP), else the bottom-most `Delivered-To` (the first delivery, i.e. the
//! address that was mailed), else the first `To` address. A recipient must
//! contain `@`; anything else about it (a redacted local part such as
//! `xxxxxxxx@example.net`) is kept as it is.
//!
//! Trust boundary: reports arrive from the Internet and anyone can send one;
//! this parser proves nothing about who sent it. The caller decides whether a
//! report is trusted (authenticated admin API upload, DKIM/SPF-verified FBL
//! sender) before it suppresses anything, and normalizes the recipient
//! address itself. Here every value is bounded (at most 998 octets, addresses
//! at most 320), loses control characters and surrounding space, and the
//! parse never panics on malformed MIME (mail-parser is best-effort and
//! total). Pure: no I/O.

use mail_parser::{Message, MessageParser, MessagePart, MimeHeaders, PartType};

/// What a feedback report says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Feedback {
    /// Lowercased: abuse, fraud, virus, other, not-spam, auth-failure, …
    pub feedback_type: String,
    /// The complaining recipient: `Original-Rcpt-To`, else from the returned
    /// message (`X-HmXmrOriginalRecipient`, `Delivered-To`, `To`). Never `None`
    /// in a successful parse (see [`ArfError`]); optional for callers that build
    /// a `Feedback` themselves.
    pub recipient: Option<String>,
    /// `Original-Mail-From` without `<>`; `None` when absent or null.
    pub original_mail_from: Option<String>,
    /// Domain of the original sender, lowercased: from `Original-Mail-From`,
    /// else the `From` of the returned message, else `Reported-Domain`.
    pub sender_domain: Option<String>,
    /// `Message-ID` of the returned message, without `<>`.
    pub original_message_id: Option<String>,
    /// `Arrival-Date` (or `Received-Date`), as written.
    pub arrival_date: Option<String>,
    pub user_agent: Option<String>,
    pub source_ip: Option<String>,
}

impl Feedback {
    /// True for the feedback types that mean "the recipient did not want this":
    /// abuse, fraud, virus, other. False for not-spam (RFC 6430), auth-failure
    /// (RFC 6591, an authentication report, not a complaint) and any
    /// unregistered type (left to the caller to log and review).
    pub fn is_complaint(&self) -> bool {
        matches!(self.feedback_type.as_str(), "abuse" | "fraud" | "virus" | "other")
    }
}

/// Why a message is not a usable feedback report; `field` names the missing
/// or malformed field or part.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {message}")]
pub struct ArfError {
    pub field: &'static str,
    pub message: String,
}

fn err(field: &'static str, message: impl Into<String>) -> ArfError {
    ArfError {
        field,
        message: message.into(),
    }
}

/// Longest value kept (RFC 5322 §2.1.1 line limit); longer ones are cut.
const MAX_VALUE: usize = 998;
/// Longest address accepted (64 local + `@` + 255 domain).
const MAX_ADDRESS: usize = 320;

/// Parse an RFC 5965 feedback report.
///
/// Errors: not a `multipart/report` (or a report of another type) →
/// `content-type`; no `message/feedback-report` part → that name; no
/// `Feedback-Type` field → `Feedback-Type`; no recipient anywhere →
/// `Original-Rcpt-To`.
pub fn parse(raw: &[u8]) -> Result<Feedback, ArfError> {
    let msg = MessageParser::default()
        .parse(raw)
        .ok_or_else(|| err("content-type", "not a MIME message (no header section)"))?;
    let ct = msg
        .content_type()
        .ok_or_else(|| err("content-type", "no Content-Type; expected multipart/report"))?;
    let (ctype, subtype) = (ct.ctype(), ct.subtype().unwrap_or(""));
    if !ctype.eq_ignore_ascii_case("multipart") || !subtype.eq_ignore_ascii_case("report") {
        return Err(err(
            "content-type",
            format!("{ctype}/{subtype} is not multipart/report"),
        ));
    }
    if let Some(rt) = ct.attribute("report-type")
        && !rt.trim().eq_ignore_ascii_case("feedback-report")
    {
        return Err(err(
            "content-type",
            format!("report-type={} is not feedback-report", clean(rt).unwrap_or_default()),
        ));
    }

    // The top-level message's parts (a returned message's own parts live
    // inside its PartType::Message and are not searched).
    let report_part = msg
        .parts
        .iter()
        .find(|p| p.is_content_type("message", "feedback-report"))
        .ok_or_else(|| err("message/feedback-report", "no message/feedback-report part"))?;
    let fields = report_fields(report_part);
    let get = |name: &str| {
        fields
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };

    let feedback_type = get("Feedback-Type")
        .and_then(|v| v.split(|c: char| c.is_whitespace() || c == ';' || c == '(').next())
        .filter(|t| !t.is_empty())
        .map(str::to_ascii_lowercase)
        .ok_or_else(|| err("Feedback-Type", "missing from the message/feedback-report part"))?;

    let original = returned_message(&msg);
    let original = original.as_ref();

    let recipient = fields
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("Original-Rcpt-To"))
        .find_map(|(_, v)| address(v))
        .or_else(|| original.and_then(|o| o.recipient.clone()))
        .ok_or_else(|| {
            err(
                "Original-Rcpt-To",
                "no recipient: no Original-Rcpt-To field and none in the returned message",
            )
        })?;

    let original_mail_from = get("Original-Mail-From").and_then(address);
    let sender_domain = original_mail_from
        .as_deref()
        .and_then(domain_of)
        .or_else(|| original.and_then(|o| o.from_domain.clone()))
        .or_else(|| get("Reported-Domain").and_then(|d| domain(d.split([',', ' ']).next().unwrap_or(""))));

    Ok(Feedback {
        feedback_type,
        recipient: Some(recipient),
        original_mail_from,
        sender_domain,
        original_message_id: original.and_then(|o| o.message_id.clone()),
        arrival_date: get("Arrival-Date").or_else(|| get("Received-Date")).and_then(clean),
        user_agent: get("User-Agent").and_then(clean),
        source_ip: get("Source-IP").and_then(clean),
    })
}

/// The fields of the `message/feedback-report` part, unfolded, in order.
fn report_fields(part: &MessagePart) -> Vec<(String, String)> {
    match &part.body {
        // Not what mail-parser 0.11 does for this type, but if a part were
        // parsed as a nested message its fields would be that message's headers.
        PartType::Message(m) => m.headers_raw().map(|(n, v)| (n.to_string(), unfold(v))).collect(),
        _ => header_fields(&String::from_utf8_lossy(part.contents())),
    }
}

/// RFC 5322 style fields of `text` (CRLF or LF), continuation lines joined.
/// Lines that are not fields are skipped; blank lines do not end the block
/// (some generators put one before the last fields).
fn header_fields(text: &str) -> Vec<(String, String)> {
    let mut fields: Vec<(String, String)> = Vec::new();
    let mut last_was_field = false;
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            last_was_field = false;
            continue;
        }
        if line.starts_with([' ', '\t']) {
            if last_was_field && let Some(last) = fields.last_mut() {
                last.1.push(' ');
                last.1.push_str(line.trim());
            }
            continue;
        }
        match line.split_once(':') {
            Some((name, value)) if is_field_name(name) => {
                fields.push((name.to_string(), value.trim().to_string()));
                last_was_field = true;
            }
            _ => last_was_field = false,
        }
    }
    fields
}

fn is_field_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
}

/// A raw (possibly folded) header value, unfolded and trimmed.
fn unfold(v: &str) -> String {
    v.split(['\r', '\n'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// What the returned original message tells.
#[derive(Debug, Default)]
struct Original {
    recipient: Option<String>,
    from_domain: Option<String>,
    message_id: Option<String>,
}

/// The returned message: the first `message/rfc822` / `message/global` part,
/// else the first `text/rfc822-headers` (or `message/global-headers`, or the
/// common mislabel `message/rfc822-headers`) part.
fn returned_message(msg: &Message) -> Option<Original> {
    let parser = MessageParser::default();
    let is_whole = |p: &&MessagePart| p.is_content_type("message", "rfc822") || p.is_content_type("message", "global");
    if let Some(part) = msg.parts.iter().skip(1).find(is_whole) {
        match &part.body {
            PartType::Message(m) => return Some(original_info(m)),
            // mail-parser could not parse it as a message: try its text as headers.
            other => {
                let bytes = match other {
                    PartType::Text(t) | PartType::Html(t) => t.as_bytes(),
                    PartType::Binary(b) | PartType::InlineBinary(b) => b.as_ref(),
                    _ => &[],
                };
                if let Some(m) = parser.parse_headers(bytes) {
                    return Some(original_info(&m));
                }
            }
        }
    }
    let is_headers = |p: &&MessagePart| {
        p.is_content_type("text", "rfc822-headers")
            || p.is_content_type("message", "global-headers")
            || p.is_content_type("message", "rfc822-headers")
    };
    let part = msg.parts.iter().skip(1).find(is_headers)?;
    let m = parser.parse_headers(part.contents())?;
    Some(original_info(&m))
}

fn original_info(m: &Message) -> Original {
    let raw = |name: &str| -> Vec<String> {
        m.headers_raw()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| unfold(v))
            .collect()
    };
    let jmrp = raw("X-HmXmrOriginalRecipient").into_iter().find_map(|v| address(&v));
    let delivered_to = raw("Delivered-To").into_iter().rev().find_map(|v| address(&v));
    let to = || {
        m.to()
            .and_then(|a| a.first())
            .and_then(|a| a.address())
            .and_then(address)
            .or_else(|| raw("To").into_iter().find_map(|v| address(&v)))
    };
    let from_domain = m
        .from()
        .and_then(|a| a.first())
        .and_then(|a| a.address())
        .and_then(domain_of)
        .or_else(|| {
            raw("From")
                .into_iter()
                .find_map(|v| address(&v).as_deref().and_then(domain_of))
        });
    let message_id = m.message_id().and_then(clean).or_else(|| {
        raw("Message-ID")
            .into_iter()
            .find_map(|v| clean(v.trim().trim_start_matches('<').trim_end_matches('>')))
    });
    Original {
        recipient: jmrp.or(delivered_to).or_else(to),
        from_domain,
        message_id,
    }
}

/// The first address in a field value: inside the first `<…>` if there is
/// one, else the first comma-separated item; an `rfc822;` type prefix is
/// dropped. `None` unless it contains `@` and fits [`MAX_ADDRESS`].
fn address(v: &str) -> Option<String> {
    let v = v.trim();
    let v = match v.split_once(';') {
        Some((ty, rest)) if ty.trim().eq_ignore_ascii_case("rfc822") => rest.trim(),
        _ => v,
    };
    let a = match v.find('<') {
        Some(start) => {
            let rest = &v[start + 1..];
            &rest[..rest.find('>').unwrap_or(rest.len())]
        }
        None => v.split(',').next().unwrap_or(""),
    };
    let a = clean(a)?;
    (a.contains('@') && a.len() <= MAX_ADDRESS && !a.contains(char::is_whitespace)).then_some(a)
}

/// Lowercased domain of an address (after the last `@`).
fn domain_of(addr: &str) -> Option<String> {
    domain(addr.rsplit_once('@')?.1)
}

fn domain(d: &str) -> Option<String> {
    let d = d.trim().trim_end_matches(['>', '.']).to_lowercase();
    (!d.is_empty() && !d.contains(char::is_whitespace) && d.len() <= 255).then_some(d)
}

/// Trim, drop control characters, cut to [`MAX_VALUE`] octets; `None` if empty.
fn clean(s: &str) -> Option<String> {
    let mut c: String = s.chars().filter(|c| !c.is_control()).collect();
    if c.len() > MAX_VALUE {
        let mut end = MAX_VALUE;
        while !c.is_char_boundary(end) {
            end -= 1;
        }
        c.truncate(end);
    }
    let c = c.trim();
    (!c.is_empty()).then(|| c.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Modelled on RFC 5965 Appendix B.2 ("optional fields" example).
    const RFC5965_B2: &str = "From: <abusedesk@example.com>\r
Date: Thu, 8 Mar 2005 17:40:36 EDT\r
Subject: FW: Earn money\r
To: <abuse@example.net>\r
MIME-Version: 1.0\r
Content-Type: multipart/report; report-type=feedback-report;\r
     boundary=\"part1_13d.2e68ed54_boundary\"\r
\r
--part1_13d.2e68ed54_boundary\r
Content-Type: text/plain; charset=\"US-ASCII\"\r
Content-Transfer-Encoding: 7bit\r
\r
This is an email abuse report for an email message received from IP\r
192.0.2.1 on Thu, 8 Mar 2005 14:00:00 EDT.  For more information\r
about this format please see http://www.mipassoc.org/arf/.\r
\r
--part1_13d.2e68ed54_boundary\r
Content-Type: message/feedback-report\r
\r
Feedback-Type: abuse\r
User-Agent: SomeGenerator/1.0\r
Version: 1\r
Original-Mail-From: <somespammer@example.net>\r
Original-Rcpt-To: <user@example.com>\r
Arrival-Date: Thu, 8 Mar 2005 14:00:00 EDT\r
Reporting-MTA: dns; mail.example.com\r
Source-IP: 192.0.2.1\r
Authentication-Results: mail.example.com;\r
               spf=fail smtp.mail=somespammer@example.com\r
Reported-Domain: example.net\r
Reported-Uri: http://example.net/earn_money.html\r
Reported-Uri: mailto:user@example.com\r
\r
--part1_13d.2e68ed54_boundary\r
Content-Type: message/rfc822\r
Content-Disposition: inline\r
\r
From: <somespammer@example.net>\r
Received: from mailserver.example.net (mailserver.example.net\r
        [192.0.2.1]) by example.com with ESMTP id M63d4137594e46;\r
        Thu, 08 Mar 2005 14:00:00 -0400\r
To: <Undisclosed Recipients>\r
Subject: Earn money\r
MIME-Version: 1.0\r
Content-type: text/plain\r
Message-ID: 8787KJKJ3K4J3K4J3K4J3.mail@example.net\r
Date: Thu, 02 Sep 2004 12:31:03 -0500\r
\r
Spam Spam Spam\r
Spam Spam Spam\r
--part1_13d.2e68ed54_boundary--\r
";

    /// Yahoo CFL style: draft-era field names (Received-Date, Version 0.1),
    /// the original returned whole as message/rfc822.
    const YAHOO: &str = "Return-Path: <feedback@arf.mail.yahoo.com>\r
From: Yahoo! Mail AntiSpam Feedback <feedback@arf.mail.yahoo.com>\r
To: fbl@sender.example\r
Subject: FW: Spring sale\r
MIME-Version: 1.0\r
Content-Type: multipart/report; boundary=\"----=_Part_1_2.3\"; report-type=feedback-report\r
\r
------=_Part_1_2.3\r
Content-Type: text/plain; charset=us-ascii\r
Content-Transfer-Encoding: 7bit\r
\r
This is an email abuse report for an email message from sender.example on Mon, 11 Mar 2024 10:00:00 +0000\r
\r
------=_Part_1_2.3\r
Content-Type: message/feedback-report\r
Content-Transfer-Encoding: 7bit\r
\r
Feedback-Type: abuse\r
User-Agent: Yahoo!-Mail-Feedback/2.0\r
Version: 0.1\r
Original-Mail-From: <bounce-77-alice=yahoo.com@mailer.sender.example>\r
Original-Rcpt-To: alice@yahoo.com\r
Received-Date: Mon, 11 Mar 2024 10:00:00 +0000\r
Reported-Domain: sender.example\r
Authentication-Results: mta1000.mail.gq1.yahoo.com  from=sender.example; domainkeys=neutral (no sig);  from=sender.example; dkim=pass (ok)\r
\r
------=_Part_1_2.3\r
Content-Type: message/rfc822\r
Content-Disposition: inline\r
\r
Received: from 203.0.113.9 (EHLO out.sender.example) by mta1000.mail.gq1.yahoo.com with SMTP; Mon, 11 Mar 2024 10:00:00 +0000\r
From: \"Sender Shop\" <news@Sender.Example>\r
To: alice@yahoo.com\r
Subject: Spring sale\r
Message-ID: <sale.77@sender.example>\r
X-Sendguard-Queue-ID: Q77\r
MIME-Version: 1.0\r
Content-Type: text/plain\r
\r
Buy now.\r
------=_Part_1_2.3--\r
";

    /// AOL style: headers only (text/rfc822-headers), LF line endings, no
    /// Original-Rcpt-To, recipient redacted in To, folded report fields.
    const HEADERS_ONLY_LF: &str = "From: scomp@aol.net
To: fbl@sender.example
Subject: Email Feedback Report for IP 203.0.113.9
MIME-Version: 1.0
Content-Type: multipart/report;
\treport-type=\"feedback-report\";
\tboundary=\"boundary-1\"

--boundary-1
Content-Type: text/plain

This is an email abuse report.

--boundary-1
Content-Type: message/feedback-report

Feedback-Type: Abuse
User-Agent: AOL SComp
  Feedback/3.0
Version: 1
Original-Mail-From:
 <bounces@mailer.sender.example>
Source-IP: 203.0.113.9
Arrival-Date: Mon, 11 Mar 2024
\t10:00:00 +0000

--boundary-1
Content-Type: text/rfc822-headers

Received: from out.sender.example (out.sender.example [203.0.113.9])
\tby mx.aol.com; Mon, 11 Mar 2024 10:00:00 +0000
From: Shop <news@sender.example>
To: redacted@aol.com
Subject: Spring sale
Message-ID: <sale.88@sender.example>

--boundary-1--
";

    fn report(feedback_fields: &str, original: &str) -> String {
        format!(
            "From: fbl@provider.example\r\nTo: fbl@sender.example\r\nSubject: report\r\nMIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type=feedback-report; boundary=\"b1\"\r\n\r\n\
--b1\r\nContent-Type: text/plain\r\n\r\nA complaint.\r\n\r\n\
--b1\r\nContent-Type: message/feedback-report\r\n\r\n{feedback_fields}\r\n\
--b1\r\nContent-Type: message/rfc822\r\n\r\n{original}\r\n--b1--\r\n"
        )
    }

    #[test]
    fn rfc5965_example() {
        let f = parse(RFC5965_B2.as_bytes()).expect("parses");
        assert_eq!(
            f,
            Feedback {
                feedback_type: "abuse".into(),
                recipient: Some("user@example.com".into()),
                original_mail_from: Some("somespammer@example.net".into()),
                sender_domain: Some("example.net".into()),
                original_message_id: Some("8787KJKJ3K4J3K4J3K4J3.mail@example.net".into()),
                arrival_date: Some("Thu, 8 Mar 2005 14:00:00 EDT".into()),
                user_agent: Some("SomeGenerator/1.0".into()),
                source_ip: Some("192.0.2.1".into()),
            }
        );
        assert!(f.is_complaint());
        // LF line endings parse the same.
        assert_eq!(parse(RFC5965_B2.replace("\r\n", "\n").as_bytes()), Ok(f));
    }

    #[test]
    fn rfc5965_minimal_example_has_no_recipient() {
        // Appendix B.1 has only the three required fields and a returned
        // message addressed to "<Undisclosed Recipients>": nothing to suppress.
        let b1 = RFC5965_B2
            .lines()
            .filter(|l| {
                ![
                    "Original-",
                    "Arrival-",
                    "Reporting-",
                    "Source-",
                    "Authentication-",
                    "Reported-",
                    "               spf=",
                ]
                .iter()
                .any(|p| l.starts_with(p))
            })
            .collect::<Vec<_>>()
            .join("\r\n");
        let e = parse(b1.as_bytes()).unwrap_err();
        assert_eq!(e.field, "Original-Rcpt-To");
    }

    #[test]
    fn yahoo_style_with_message_rfc822() {
        let f = parse(YAHOO.as_bytes()).expect("parses");
        assert_eq!(f.feedback_type, "abuse");
        assert_eq!(f.recipient.as_deref(), Some("alice@yahoo.com"));
        assert_eq!(
            f.original_mail_from.as_deref(),
            Some("bounce-77-alice=yahoo.com@mailer.sender.example")
        );
        assert_eq!(f.sender_domain.as_deref(), Some("mailer.sender.example"));
        assert_eq!(f.original_message_id.as_deref(), Some("sale.77@sender.example"));
        assert_eq!(
            f.arrival_date.as_deref(),
            Some("Mon, 11 Mar 2024 10:00:00 +0000"),
            "Received-Date"
        );
        assert_eq!(f.user_agent.as_deref(), Some("Yahoo!-Mail-Feedback/2.0"));
        assert_eq!(f.source_ip, None);
        assert!(f.is_complaint());
    }

    #[test]
    fn headers_only_lf_folded_and_redacted() {
        let f = parse(HEADERS_ONLY_LF.as_bytes()).expect("parses");
        assert_eq!(f.feedback_type, "abuse", "lowercased");
        assert_eq!(
            f.recipient.as_deref(),
            Some("redacted@aol.com"),
            "from the returned To, kept as is"
        );
        assert_eq!(
            f.original_mail_from.as_deref(),
            Some("bounces@mailer.sender.example"),
            "folded value"
        );
        assert_eq!(f.user_agent.as_deref(), Some("AOL SComp Feedback/3.0"), "unfolded");
        assert_eq!(f.arrival_date.as_deref(), Some("Mon, 11 Mar 2024 10:00:00 +0000"));
        assert_eq!(f.original_message_id.as_deref(), Some("sale.88@sender.example"));
        assert_eq!(f.source_ip.as_deref(), Some("203.0.113.9"));
        // CRLF version parses the same.
        assert_eq!(parse(HEADERS_ONLY_LF.replace('\n', "\r\n").as_bytes()), Ok(f));
    }

    #[test]
    fn recipient_from_the_returned_message() {
        let fields = "Feedback-Type: abuse\r\nUser-Agent: x/1\r\nVersion: 1\r\n";
        // To only.
        let orig = "From: Shop <news@Sender.Example>\r\nTo: \"Doe, Jane\" <jane@example.net>, bob@example.net\r\nSubject: s\r\n\r\nb";
        let f = parse(report(fields, orig).as_bytes()).unwrap();
        assert_eq!(f.recipient.as_deref(), Some("jane@example.net"));
        assert_eq!(
            f.sender_domain.as_deref(),
            Some("sender.example"),
            "from the returned From"
        );
        assert_eq!(f.original_mail_from, None);

        // Delivered-To wins over To; the bottom-most one is the address that was mailed.
        let orig = "Delivered-To: final@forward.example\r\nDelivered-To: list@example.net\r\nFrom: a@sender.example\r\n\
To: everyone@example.net\r\n\r\nb";
        let f = parse(report(fields, orig).as_bytes()).unwrap();
        assert_eq!(f.recipient.as_deref(), Some("list@example.net"));

        // Microsoft JMRP puts the recipient in X-HmXmrOriginalRecipient.
        let orig = "X-HmXmrOriginalRecipient: <carol@outlook.example>\r\nFrom: a@sender.example\r\nTo: undisclosed-recipients:;\r\n\r\nb";
        let f = parse(report(fields, orig).as_bytes()).unwrap();
        assert_eq!(f.recipient.as_deref(), Some("carol@outlook.example"));

        // Original-Rcpt-To wins over all of them; "rfc822;" prefix tolerated.
        let with = format!("{fields}Original-Rcpt-To: rfc822; <dave@example.net>\r\n");
        let f = parse(report(&with, orig).as_bytes()).unwrap();
        assert_eq!(f.recipient.as_deref(), Some("dave@example.net"));

        // A non-address Original-Rcpt-To falls through to the returned message.
        let with = format!("{fields}Original-Rcpt-To: redacted\r\n");
        let f = parse(report(&with, orig).as_bytes()).unwrap();
        assert_eq!(f.recipient.as_deref(), Some("carol@outlook.example"));
    }

    #[test]
    fn sender_domain_falls_back_to_reported_domain() {
        let fields = "Feedback-Type: fraud\r\nOriginal-Rcpt-To: u@example.net\r\nReported-Domain: Phish.Example.\r\n";
        let orig = "Subject: no from\r\n\r\nb";
        let f = parse(report(fields, orig).as_bytes()).unwrap();
        assert_eq!(f.sender_domain.as_deref(), Some("phish.example"));
        assert_eq!(f.original_message_id, None);
        assert!(f.is_complaint());

        // Null Original-Mail-From is None and does not give a domain.
        let fields = "Feedback-Type: virus\r\nOriginal-Rcpt-To: u@example.net\r\nOriginal-Mail-From: <>\r\n";
        let f = parse(report(fields, "From: x@Virus.Example\r\n\r\nb").as_bytes()).unwrap();
        assert_eq!(f.original_mail_from, None);
        assert_eq!(f.sender_domain.as_deref(), Some("virus.example"));
    }

    #[test]
    fn not_spam_and_auth_failure_are_not_complaints() {
        for (ty, complaint) in [
            ("not-spam", false),
            ("auth-failure", false),
            ("NOT-SPAM", false),
            ("abuse", true),
            ("other", true),
            ("opt-out", false),
        ] {
            let fields = format!("Feedback-Type: {ty}\r\nOriginal-Rcpt-To: u@example.net\r\n");
            let f = parse(report(&fields, "From: a@b.example\r\n\r\nb").as_bytes()).unwrap();
            assert_eq!(f.feedback_type, ty.to_ascii_lowercase());
            assert_eq!(f.is_complaint(), complaint, "{ty}");
        }
    }

    #[test]
    fn base64_feedback_part_and_control_characters() {
        use base64::Engine as _;
        let fields = "Feedback-Type: abuse\r\nOriginal-Rcpt-To: u@example.net\r\nUser-Agent: evil\u{7}\u{1b}[31m/1\r\n";
        let b64 = base64::engine::general_purpose::STANDARD.encode(fields);
        let raw = format!(
            "Content-Type: multipart/report; report-type=feedback-report; boundary=b\r\n\r\n\
--b\r\nContent-Type: message/feedback-report\r\nContent-Transfer-Encoding: base64\r\n\r\n{b64}\r\n--b--\r\n"
        );
        let f = parse(raw.as_bytes()).unwrap();
        assert_eq!(f.recipient.as_deref(), Some("u@example.net"));
        assert_eq!(f.user_agent.as_deref(), Some("evil[31m/1"));
        assert_eq!(f.original_message_id, None);

        // Over-long values are cut; over-long addresses are not addresses.
        let long = format!(
            "Feedback-Type: abuse\r\nUser-Agent: {}\r\nOriginal-Rcpt-To: {}@example.net\r\n",
            "u".repeat(5000),
            "l".repeat(400)
        );
        let e = parse(report(&long, "Subject: x\r\n\r\nb").as_bytes()).unwrap_err();
        assert_eq!(e.field, "Original-Rcpt-To");
        let long = format!(
            "Feedback-Type: abuse\r\nUser-Agent: {}\r\nOriginal-Rcpt-To: u@example.net\r\n",
            "u".repeat(5000)
        );
        assert_eq!(
            parse(report(&long, "Subject: x\r\n\r\nb").as_bytes())
                .unwrap()
                .user_agent
                .unwrap()
                .len(),
            MAX_VALUE
        );
    }

    #[test]
    fn errors_name_the_field() {
        let field = |raw: &[u8]| parse(raw).unwrap_err().field;
        assert_eq!(field(b"Subject: hi\r\n\r\njust text\r\n"), "content-type");
        assert_eq!(field(b""), "content-type");
        assert_eq!(
            field(b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\nx\r\n--b--\r\n"),
            "content-type"
        );
        let dsn = "Content-Type: multipart/report; report-type=delivery-status; boundary=b\r\n\r\n\
--b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; x\r\n\r\n--b--\r\n";
        let e = parse(dsn.as_bytes()).unwrap_err();
        assert_eq!(
            e,
            err("content-type", "report-type=delivery-status is not feedback-report")
        );
        assert_eq!(
            e.to_string(),
            "content-type: report-type=delivery-status is not feedback-report"
        );

        let no_part = "Content-Type: multipart/report; report-type=feedback-report; boundary=b\r\n\r\n\
--b\r\nContent-Type: text/plain\r\n\r\nFeedback-Type: abuse\r\n--b--\r\n";
        assert_eq!(field(no_part.as_bytes()), "message/feedback-report");

        let no_type = report(
            "User-Agent: x/1\r\nVersion: 1\r\nOriginal-Rcpt-To: u@example.net\r\n",
            "Subject: x\r\n\r\nb",
        );
        assert_eq!(field(no_type.as_bytes()), "Feedback-Type");

        let no_rcpt = report("Feedback-Type: abuse\r\n", "From: a@b.example\r\nSubject: x\r\n\r\nb");
        assert_eq!(field(no_rcpt.as_bytes()), "Original-Rcpt-To");
    }

    #[test]
    fn truncated_and_mangled_input_never_panics() {
        for sample in [RFC5965_B2, YAHOO, HEADERS_ONLY_LF] {
            let bytes = sample.as_bytes();
            for end in 0..bytes.len() {
                let _ = parse(&bytes[..end]);
            }
            let mut mangled = bytes.to_vec();
            for (i, b) in mangled.iter_mut().enumerate() {
                if i % 7 == 3 {
                    *b = (i % 256) as u8;
                }
            }
            let _ = parse(&mangled);
        }
    }

    #[test]
    fn missing_report_type_is_tolerated() {
        let raw = "Content-Type: multipart/report; boundary=b\r\n\r\n\
--b\r\nContent-Type: message/feedback-report\r\n\r\nFeedback-Type: abuse\r\nOriginal-Rcpt-To: <u@example.net>\r\n\r\n--b--\r\n";
        let f = parse(raw.as_bytes()).unwrap();
        assert_eq!(
            (f.feedback_type.as_str(), f.recipient.as_deref()),
            ("abuse", Some("u@example.net"))
        );
    }
}
