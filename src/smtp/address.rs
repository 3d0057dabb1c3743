//! Envelope addresses (RFC 5321 §4.1.2, RFC 6531 §3.3 for SMTPUTF8).
//!
//! Trust boundary: input is a client-supplied path such as `<a@b.example>`;
//! the parser accepts exactly the RFC grammar (plus a space after the colon,
//! which every MTA tolerates) and refuses everything else, so later stages
//! can rely on a well-formed `local@domain`.

use std::fmt;

/// A syntactically valid mailbox `local@domain`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Mailbox {
    /// Local part in its canonical spelling (see `canonical_local`): quoted
    /// only when it has to be, then with its quotes.
    pub local: String,
    /// Domain as sent (address literals keep their brackets).
    pub domain: String,
}

impl Mailbox {
    /// Lower-cased domain, for comparisons and policy lookups.
    pub fn domain_lc(&self) -> String {
        self.domain.to_ascii_lowercase()
    }

    /// True when the address needs SMTPUTF8 (RFC 6531).
    pub fn is_utf8(&self) -> bool {
        !self.local.is_ascii() || !self.domain.is_ascii()
    }

    /// Normalized form for identity checks: ASCII letters lower-cased in both
    /// parts (RFC 5321 §2.4 lets local parts be case-sensitive, but sender
    /// rights and suppression compare them case-insensitively). Non-ASCII is
    /// compared exactly: Unicode folding would let U+212A KELVIN SIGN pass
    /// as "k".
    pub fn normalized(&self) -> String {
        format!("{}@{}", self.local.to_ascii_lowercase(), self.domain_lc())
    }
}

impl fmt::Display for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Three plain writes: this runs for every address of every
        // message, and `write!` with arguments costs several times more.
        f.write_str(&self.local)?;
        f.write_str("@")?;
        f.write_str(&self.domain)
    }
}

/// Why an address was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressError {
    /// Not of the form `<...>`.
    MissingBrackets,
    /// The local part, domain or route does not follow the grammar.
    Syntax,
    /// Local part over 64 octets or domain over 255 (RFC 5321 §4.5.3.1).
    TooLong,
}

/// Parse a reverse-path: `<>` (null sender) or a path. Returns `None` for `<>`.
pub fn parse_reverse_path(s: &str) -> Result<Option<Mailbox>, AddressError> {
    if s == "<>" {
        return Ok(None);
    }
    parse_path(s).map(Some)
}

/// Parse a forward-path `<[@route,...:]local@domain>`.
pub fn parse_path(s: &str) -> Result<Mailbox, AddressError> {
    let inner = s
        .strip_prefix('<')
        .and_then(|r| r.strip_suffix('>'))
        .ok_or(AddressError::MissingBrackets)?;
    // RFC 5321 §4.1.2 / appendix C: source routes MUST be accepted and
    // SHOULD be ignored.
    let inner = if inner.starts_with('@') {
        let colon = inner.find(':').ok_or(AddressError::Syntax)?;
        for hop in inner[..colon].split(',') {
            let d = hop.strip_prefix('@').ok_or(AddressError::Syntax)?;
            if !is_domain(d) {
                return Err(AddressError::Syntax);
            }
        }
        &inner[colon + 1..]
    } else {
        inner
    };
    parse_mailbox(inner)
}

/// Parse a bare mailbox `local@domain`.
pub fn parse_mailbox(s: &str) -> Result<Mailbox, AddressError> {
    let at = local_part_end(s).ok_or(AddressError::Syntax)?;
    let (local, rest) = s.split_at(at);
    let domain = rest.strip_prefix('@').ok_or(AddressError::Syntax)?;
    if local.len() > 64 || domain.len() > 255 {
        return Err(AddressError::TooLong);
    }
    if !(is_domain(domain) || is_address_literal(domain)) {
        return Err(AddressError::Syntax);
    }
    Ok(Mailbox {
        local: canonical_local(local),
        domain: domain.to_string(),
    })
}

/// The canonical spelling of a valid local part: a Quoted-string whose
/// content is a valid Dot-string loses its quotes (`"bounced"` and
/// `"b\ounced"` are `bounced`: RFC 5322 §3.2.4 gives the quotes no meaning,
/// RFC 5321 §4.1.2 says not to use them then); any other keeps them, with
/// only `"` and `\` escaped. So one mailbox has one spelling for suppression,
/// sender rights and de-duplication, and goes upstream in that spelling.
fn canonical_local(local: &str) -> String {
    let Some(inner) = local.strip_prefix('"').and_then(|r| r.strip_suffix('"')) else {
        return local.to_string();
    };
    let mut content = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        // The parser checked that a backslash is followed by a character.
        content.push(if c == '\\' { chars.next().unwrap_or(c) } else { c });
    }
    if is_dot_string(&content) {
        return content;
    }
    let mut quoted = String::with_capacity(content.len() + 2);
    quoted.push('"');
    for c in content.chars() {
        if c == '"' || c == '\\' {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('"');
    quoted
}

/// Index just past a valid local part (Dot-string or Quoted-string).
fn local_part_end(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    if b.first() == Some(&b'"') {
        // Quoted-string: qtextSMTP = %d32-33 / %d35-91 / %d93-126,
        // quoted-pairSMTP = "\" %d32-126; UTF-8 allowed (RFC 6531).
        let mut i = 1;
        while i < b.len() {
            match b[i] {
                b'"' => return if i > 1 { Some(i + 1) } else { None },
                b'\\' => {
                    let next = *b.get(i + 1)?;
                    if !(32..=126).contains(&next) {
                        return None;
                    }
                    i += 2;
                }
                32..=126 => i += 1,
                c if c >= 0x80 => i += 1,
                _ => return None,
            }
        }
        None
    } else {
        let end = s.find('@')?;
        let local = &s[..end];
        if !is_dot_string(local) {
            return None;
        }
        Some(end)
    }
}

/// RFC 5321 Dot-string: atoms of atext joined by single dots.
fn is_dot_string(s: &str) -> bool {
    !s.is_empty() && s.split('.').all(|atom| !atom.is_empty() && atom.chars().all(is_atext))
}

/// RFC 5322 atext, extended with UTF-8 by RFC 6531 §3.3.
fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || (!c.is_ascii() && !c.is_control())
}

/// RFC 5321 Domain: dot-separated labels of letters, digits and inner
/// hyphens (U-labels allowed for SMTPUTF8). One trailing dot is refused.
pub fn is_domain(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= 255
        && d.split('.').all(|label| {
            let lb = label.as_bytes();
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || (!c.is_ascii() && c.is_alphanumeric()))
                && lb[0] != b'-'
                && lb[lb.len() - 1] != b'-'
        })
}

/// `[IPv4]`, `[IPv6:...]` or a General-address-literal `[tag:content]`.
fn is_address_literal(d: &str) -> bool {
    let Some(inner) = d.strip_prefix('[').and_then(|r| r.strip_suffix(']')) else {
        return false;
    };
    if let Some(v6) = inner.strip_prefix("IPv6:").or_else(|| inner.strip_prefix("ipv6:")) {
        return v6.parse::<std::net::Ipv6Addr>().is_ok();
    }
    inner.parse::<std::net::Ipv4Addr>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_paths() {
        let cases = [
            ("<a@b.example>", "a", "b.example"),
            ("<first.last@Example.COM>", "first.last", "Example.COM"),
            ("<\"quoted name\"@x.example>", "\"quoted name\"", "x.example"),
            ("<\"q\\\"x\"@x.example>", "\"q\\\"x\"", "x.example"),
            // Quotes that carry nothing are dropped; needless escapes too.
            ("<\"bounced\"@x.example>", "bounced", "x.example"),
            ("<\"b\\ounced\"@x.example>", "bounced", "x.example"),
            ("<\"first.last\"@x.example>", "first.last", "x.example"),
            ("<\"john\\ doe\"@x.example>", "\"john doe\"", "x.example"),
            ("<\"a..b\"@x.example>", "\"a..b\"", "x.example"),
            ("<\".a\"@x.example>", "\".a\"", "x.example"),
            ("<\"a\\\\b\"@x.example>", "\"a\\\\b\"", "x.example"),
            ("<@relay.example,@r2.example:u@d.example>", "u", "d.example"),
            ("<u@[192.0.2.1]>", "u", "[192.0.2.1]"),
            ("<u@[IPv6:2001:db8::1]>", "u", "[IPv6:2001:db8::1]"),
            ("<user+tag@sub-domain.example>", "user+tag", "sub-domain.example"),
            ("<δοκιμή@παράδειγμα.δοκιμή>", "δοκιμή", "παράδειγμα.δοκιμή"),
        ];
        for (input, local, domain) in cases {
            let m = parse_path(input).unwrap_or_else(|e| panic!("{input}: {e:?}"));
            assert_eq!((m.local.as_str(), m.domain.as_str()), (local, domain), "{input}");
        }
    }

    #[test]
    fn invalid_paths() {
        let cases = [
            ("a@b.example", AddressError::MissingBrackets),
            ("<a@b.example", AddressError::MissingBrackets),
            ("<>", AddressError::Syntax),
            ("<a>", AddressError::Syntax),
            ("<@b.example>", AddressError::Syntax),
            ("<a..b@c.example>", AddressError::Syntax),
            ("<.a@c.example>", AddressError::Syntax),
            ("<a@-c.example>", AddressError::Syntax),
            ("<a@c.example.>", AddressError::Syntax),
            ("<a@c..example>", AddressError::Syntax),
            ("<a b@c.example>", AddressError::Syntax),
            ("<a@b@c.example>", AddressError::Syntax),
            ("<\"unterminated@c.example>", AddressError::Syntax),
            ("<a@[300.1.1.1]>", AddressError::Syntax),
            ("<a@c_d.example>", AddressError::Syntax),
            ("<a\r@c.example>", AddressError::Syntax),
        ];
        for (input, want) in cases {
            assert_eq!(parse_path(input), Err(want), "{input:?}");
        }
        let long_local = format!("<{}@x.example>", "a".repeat(65));
        assert_eq!(parse_path(&long_local), Err(AddressError::TooLong));
    }

    #[test]
    fn null_reverse_path() {
        assert_eq!(parse_reverse_path("<>"), Ok(None));
        assert!(parse_reverse_path("<a@b.example>").unwrap().is_some());
    }
}
