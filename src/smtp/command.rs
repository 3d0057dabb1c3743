//! SMTP command parsing (RFC 5321 §4.1, RFC 3207, RFC 4954, RFC 3030,
//! RFC 1870, RFC 6152, RFC 6531).
//!
//! Pure: one framed command line in, one [`Command`] or [`ParseError`] out.
//! The session decides what is allowed in which state.
//!
//! Trust boundary: input is one raw client line (terminator removed). It may
//! contain anything; only UTF-8 without control characters gets past here.

use super::address::{AddressError, Mailbox, parse_path, parse_reverse_path};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Ehlo(String),
    Helo(String),
    Mail { from: Option<Mailbox>, params: MailParams },
    Rcpt { to: Mailbox },
    Data,
    Bdat { size: u64, last: bool },
    Rset,
    Noop,
    Quit,
    Vrfy,
    Expn,
    Help,
    StartTls,
    Auth { mechanism: String, initial: Option<String> },
}

/// Body type declared with `BODY=` (RFC 6152, RFC 3030).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BodyType {
    #[default]
    SevenBit,
    EightBitMime,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MailParams {
    /// `SIZE=` declared by the client (RFC 1870).
    pub size: Option<u64>,
    pub body: BodyType,
    /// `SMTPUTF8` (RFC 6531).
    pub smtputf8: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// Verb not known: `500 5.5.1`.
    UnknownCommand,
    /// Line is not UTF-8 or holds control characters: `500 5.5.2`.
    BadCharacters,
    /// Arguments malformed: `501 5.5.4`.
    Syntax(&'static str),
    /// MAIL FROM address malformed: `501 5.1.7`.
    BadSender(AddressError),
    /// RCPT TO address malformed: `501 5.1.3`.
    BadRecipient(AddressError),
    /// Unsupported MAIL/RCPT parameter: `555 5.5.4` (RFC 5321 §4.1.1.11).
    UnsupportedParam(String),
}

/// Parse one command line (without CRLF).
pub fn parse(line: &[u8]) -> Result<Command, ParseError> {
    let line = std::str::from_utf8(line).map_err(|_| ParseError::BadCharacters)?;
    if line.chars().any(|c| c.is_control() && c != '\t') {
        return Err(ParseError::BadCharacters);
    }
    let (verb, rest) = match line.find(' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, ""),
    };
    let verb = verb.to_ascii_uppercase();
    let no_args = |c: Command| {
        if rest.trim().is_empty() {
            Ok(c)
        } else {
            Err(ParseError::Syntax("this command takes no arguments"))
        }
    };
    match verb.as_str() {
        "EHLO" | "HELO" => {
            let domain = rest.trim();
            if domain.is_empty() || domain.contains(' ') {
                return Err(ParseError::Syntax("expected one domain or address literal"));
            }
            Ok(if verb == "EHLO" {
                Command::Ehlo(domain.to_string())
            } else {
                Command::Helo(domain.to_string())
            })
        }
        "MAIL" => parse_mail(rest),
        "RCPT" => parse_rcpt(rest),
        "DATA" => no_args(Command::Data),
        "BDAT" => parse_bdat(rest),
        "RSET" => no_args(Command::Rset),
        "NOOP" => Ok(Command::Noop),
        "QUIT" => no_args(Command::Quit),
        "VRFY" => Ok(Command::Vrfy),
        "EXPN" => Ok(Command::Expn),
        "HELP" => Ok(Command::Help),
        "STARTTLS" => no_args(Command::StartTls),
        "AUTH" => {
            let mut it = rest.split(' ').filter(|s| !s.is_empty());
            let mechanism = it
                .next()
                .ok_or(ParseError::Syntax("AUTH needs a mechanism"))?
                .to_ascii_uppercase();
            let initial = it.next().map(str::to_string);
            if it.next().is_some() {
                return Err(ParseError::Syntax(
                    "AUTH takes a mechanism and at most one initial response",
                ));
            }
            Ok(Command::Auth { mechanism, initial })
        }
        _ => Err(ParseError::UnknownCommand),
    }
}

/// Split `FROM:<path> params` after the verb. Tolerates one space after the
/// colon (`MAIL FROM: <a@b>`), as deployed clients send it.
fn split_path<'a>(rest: &'a str, keyword: &str) -> Option<(&'a str, &'a str)> {
    let head = rest.get(..keyword.len())?;
    if !head.eq_ignore_ascii_case(keyword) {
        return None;
    }
    let after = rest[keyword.len()..].trim_start_matches(' ');
    if !after.starts_with('<') {
        // Let the address parser report the missing brackets.
        return Some(match after.find(' ') {
            Some(i) => (&after[..i], &after[i + 1..]),
            None => (after, ""),
        });
    }
    // The path ends at the first '>' that is outside a quoted local part.
    let bytes = after.as_bytes();
    let (mut i, mut quoted) = (0, false);
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if quoted => i += 1,
            b'"' => quoted = !quoted,
            b'>' if !quoted => return Some((&after[..=i], after[i + 1..].trim_start_matches(' '))),
            _ => {}
        }
        i += 1;
    }
    Some((after, ""))
}

fn parse_mail(rest: &str) -> Result<Command, ParseError> {
    let (path, params_str) = split_path(rest, "FROM:").ok_or(ParseError::Syntax("expected MAIL FROM:<address>"))?;
    let from = parse_reverse_path(path).map_err(ParseError::BadSender)?;
    let mut params = MailParams::default();
    for p in params_str.split(' ').filter(|s| !s.is_empty()) {
        let (k, v) = match p.find('=') {
            Some(i) => (&p[..i], Some(&p[i + 1..])),
            None => (p, None),
        };
        match (k.to_ascii_uppercase().as_str(), v) {
            ("SIZE", Some(v)) => {
                let n = v
                    .parse::<u64>()
                    .ok()
                    .filter(|_| !v.is_empty() && v.len() <= 20 && v.bytes().all(|b| b.is_ascii_digit()))
                    .ok_or(ParseError::Syntax("SIZE needs a decimal number"))?;
                params.size = Some(n);
            }
            ("BODY", Some(v)) if v.eq_ignore_ascii_case("7BIT") => params.body = BodyType::SevenBit,
            ("BODY", Some(v)) if v.eq_ignore_ascii_case("8BITMIME") => params.body = BodyType::EightBitMime,
            ("SMTPUTF8", None) => params.smtputf8 = true,
            // RFC 4954 §5: AUTH= on MAIL is accepted and, from a client we do
            // not trust to assert identities, ignored.
            ("AUTH", Some(_)) => {}
            _ => return Err(ParseError::UnsupportedParam(p.to_string())),
        }
    }
    Ok(Command::Mail { from, params })
}

fn parse_rcpt(rest: &str) -> Result<Command, ParseError> {
    let (path, params_str) = split_path(rest, "TO:").ok_or(ParseError::Syntax("expected RCPT TO:<address>"))?;
    let to = parse_path(path).map_err(ParseError::BadRecipient)?;
    if let Some(p) = params_str.split(' ').find(|s| !s.is_empty()) {
        return Err(ParseError::UnsupportedParam(p.to_string()));
    }
    Ok(Command::Rcpt { to })
}

fn parse_bdat(rest: &str) -> Result<Command, ParseError> {
    let mut it = rest.split(' ').filter(|s| !s.is_empty());
    let size = it
        .next()
        .filter(|s| s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or(ParseError::Syntax("BDAT needs a chunk size"))?;
    let last = match it.next() {
        None => false,
        Some(s) if s.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return Err(ParseError::Syntax("expected BDAT <size> [LAST]")),
    };
    if it.next().is_some() {
        return Err(ParseError::Syntax("expected BDAT <size> [LAST]"));
    }
    Ok(Command::Bdat { size, last })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mb(local: &str, domain: &str) -> Mailbox {
        Mailbox {
            local: local.into(),
            domain: domain.into(),
        }
    }

    #[test]
    fn parses_commands() {
        let cases: Vec<(&[u8], Command)> = vec![
            (b"EHLO client.example", Command::Ehlo("client.example".into())),
            (b"ehlo [127.0.0.1]", Command::Ehlo("[127.0.0.1]".into())),
            (b"HELO x", Command::Helo("x".into())),
            (
                b"MAIL FROM:<a@b.example>",
                Command::Mail {
                    from: Some(mb("a", "b.example")),
                    params: MailParams::default(),
                },
            ),
            (
                b"mail from: <a@b.example> SIZE=1000 BODY=8BITMIME SMTPUTF8",
                Command::Mail {
                    from: Some(mb("a", "b.example")),
                    params: MailParams {
                        size: Some(1000),
                        body: BodyType::EightBitMime,
                        smtputf8: true,
                    },
                },
            ),
            (
                b"MAIL FROM:<> AUTH=<>",
                Command::Mail {
                    from: None,
                    params: MailParams::default(),
                },
            ),
            (
                b"MAIL FROM:<\"a> b\"@c.example>",
                Command::Mail {
                    from: Some(mb("\"a> b\"", "c.example")),
                    params: MailParams::default(),
                },
            ),
            (
                b"RCPT TO:<x@y.example>",
                Command::Rcpt {
                    to: mb("x", "y.example"),
                },
            ),
            (b"DATA", Command::Data),
            (b"BDAT 100", Command::Bdat { size: 100, last: false }),
            (b"BDAT 0 LAST", Command::Bdat { size: 0, last: true }),
            (b"RSET", Command::Rset),
            (b"NOOP anything", Command::Noop),
            (b"QUIT", Command::Quit),
            (b"STARTTLS", Command::StartTls),
            (
                b"AUTH PLAIN AGFwcABzZWNyZXQ=",
                Command::Auth {
                    mechanism: "PLAIN".into(),
                    initial: Some("AGFwcABzZWNyZXQ=".into()),
                },
            ),
            (
                b"auth login",
                Command::Auth {
                    mechanism: "LOGIN".into(),
                    initial: None,
                },
            ),
        ];
        for (line, want) in cases {
            assert_eq!(parse(line), Ok(want), "{}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn refuses_bad_commands() {
        let cases: Vec<(&[u8], ParseError)> = vec![
            (b"FOO", ParseError::UnknownCommand),
            (b"", ParseError::UnknownCommand),
            (b"NO\rOP", ParseError::BadCharacters),
            (b"NOOP\x00", ParseError::BadCharacters),
            (b"MAIL FROM:\xff<a@b>", ParseError::BadCharacters),
            (b"EHLO", ParseError::Syntax("expected one domain or address literal")),
            (
                b"MAIL TO:<a@b.example>",
                ParseError::Syntax("expected MAIL FROM:<address>"),
            ),
            (
                b"MAIL FROM:a@b.example",
                ParseError::BadSender(AddressError::MissingBrackets),
            ),
            (
                b"MAIL FROM:<a@b.example> SIZE=x",
                ParseError::Syntax("SIZE needs a decimal number"),
            ),
            (
                b"MAIL FROM:<a@b.example> SIZE=-1",
                ParseError::Syntax("SIZE needs a decimal number"),
            ),
            (
                b"MAIL FROM:<a@b.example> BODY=BINARYMIME",
                ParseError::UnsupportedParam("BODY=BINARYMIME".into()),
            ),
            (
                b"MAIL FROM:<a@b.example> RET=FULL",
                ParseError::UnsupportedParam("RET=FULL".into()),
            ),
            (
                b"RCPT TO:<x@y.example> NOTIFY=NEVER",
                ParseError::UnsupportedParam("NOTIFY=NEVER".into()),
            ),
            (b"RCPT TO:<x>", ParseError::BadRecipient(AddressError::Syntax)),
            (b"RCPT TO:<>", ParseError::BadRecipient(AddressError::Syntax)),
            (b"DATA x", ParseError::Syntax("this command takes no arguments")),
            (b"BDAT", ParseError::Syntax("BDAT needs a chunk size")),
            (b"BDAT 10 FIRST", ParseError::Syntax("expected BDAT <size> [LAST]")),
            (
                b"BDAT 99999999999999999999999",
                ParseError::Syntax("BDAT needs a chunk size"),
            ),
            (b"AUTH", ParseError::Syntax("AUTH needs a mechanism")),
        ];
        for (line, want) in cases {
            assert_eq!(parse(line), Err(want), "{}", String::from_utf8_lossy(line));
        }
    }
}
