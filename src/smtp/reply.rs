//! SMTP replies with RFC 3463 enhanced status codes and sendguard reason tokens.
//!
//! Every reply sendguard sends carries an enhanced status code (RFC 2034 /
//! RFC 3463, advertised as ENHANCEDSTATUSCODES) and, when it refuses something,
//! a stable machine-readable reason token `(sendguard:<token>)` at the end of
//! the last line. The tokens are documented in `docs/reasons.md`.
//!
//! Trust boundary: pure formatting; the texts passed in are ours, but may embed
//! client-supplied fragments (addresses), which are sanitised here so that a
//! client can never inject CR/LF into a reply.

use std::fmt;

/// An RFC 3463 enhanced status code `class.subject.detail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enhanced(pub u8, pub u16, pub u16);

impl fmt::Display for Enhanced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// One SMTP reply (possibly multi-line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub enhanced: Option<Enhanced>,
    pub lines: Vec<String>,
    pub token: Option<&'static str>,
}

impl Reply {
    /// A single-line reply with an enhanced code.
    pub fn new(code: u16, enhanced: Enhanced, text: impl Into<String>) -> Self {
        Reply {
            code,
            enhanced: Some(enhanced),
            lines: vec![sanitize(text.into())],
            token: None,
        }
    }

    /// A reply without an enhanced code: only for the greeting (220), the
    /// AUTH challenge (334) and DATA's 354, where RFC 2034 §3 does not use one.
    pub fn bare(code: u16, text: impl Into<String>) -> Self {
        Reply {
            code,
            enhanced: None,
            lines: vec![sanitize(text.into())],
            token: None,
        }
    }

    /// Attach the machine-readable reason token (see `docs/reasons.md`).
    pub fn with_token(mut self, token: &'static str) -> Self {
        self.token = Some(token);
        self
    }

    /// Append a line (multi-line replies such as EHLO).
    pub fn line(mut self, text: impl Into<String>) -> Self {
        self.lines.push(sanitize(text.into()));
        self
    }

    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// Serialise onto the wire (RFC 5321 §4.2.1: `code-text` for all but the
    /// last line, `code text` for the last).
    pub fn write_to(&self, out: &mut Vec<u8>) {
        use std::io::Write;
        let n = self.lines.len().max(1);
        for i in 0..n {
            let sep = if i + 1 == n { ' ' } else { '-' };
            let text = self.lines.get(i).map(String::as_str).unwrap_or("");
            let _ = write!(out, "{}{}", self.code, sep);
            if let Some(e) = self.enhanced {
                let _ = write!(out, "{e} ");
            }
            out.extend_from_slice(text.as_bytes());
            if let (true, Some(t)) = (i + 1 == n, self.token) {
                let _ = write!(out, " (sendguard:{t})");
            }
            out.extend_from_slice(b"\r\n");
        }
    }

    pub fn to_wire(&self) -> String {
        let mut v = Vec::new();
        self.write_to(&mut v);
        String::from_utf8_lossy(&v).into_owned()
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.to_wire().trim_end())
    }
}

/// Replace control characters (CR, LF, NUL, …) so that text derived from
/// client input can never end a reply line early or forge a second reply.
fn sanitize(s: String) -> String {
    if s.chars().any(|c| c.is_control()) {
        s.chars().map(|c| if c.is_control() { '?' } else { c }).collect()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_line_with_token() {
        let r = Reply::new(550, Enhanced(5, 7, 1), "Sender not allowed").with_token("sender_not_permitted");
        assert_eq!(
            r.to_wire(),
            "550 5.7.1 Sender not allowed (sendguard:sender_not_permitted)\r\n"
        );
    }

    #[test]
    fn multi_line_uses_dash_then_space() {
        let r = Reply::new(250, Enhanced(2, 0, 0), "host")
            .line("PIPELINING")
            .line("SIZE 10");
        assert_eq!(
            r.to_wire(),
            "250-2.0.0 host\r\n250-2.0.0 PIPELINING\r\n250 2.0.0 SIZE 10\r\n"
        );
    }

    #[test]
    fn client_text_cannot_inject_lines() {
        let r = Reply::new(550, Enhanced(5, 1, 1), "bad <a\r\n250 ok@x>");
        assert_eq!(r.to_wire(), "550 5.1.1 bad <a??250 ok@x>\r\n");
    }

    #[test]
    fn bare_has_no_enhanced_code() {
        assert_eq!(Reply::bare(354, "go ahead").to_wire(), "354 go ahead\r\n");
    }
}
