//! Command-line framing (RFC 5321 §2.3.8, §4.5.3.1.4).
//!
//! Pure: takes the bytes buffered so far and says whether a whole command
//! line is there. Commands may end in CRLF or, leniently as most MTAs allow,
//! a bare LF; a CR anywhere else in a command line is a syntax error decided
//! by the parser. DATA content never goes through here (see `data.rs`),
//! which is where bare line endings matter for smuggling.
//!
//! Trust boundary: input is raw client bytes; nothing here allocates more
//! than `max` bytes' worth of scanning per call.

/// Result of looking for one line at the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Framed {
    /// A line of `len` bytes (without the terminator) ends within the buffer;
    /// `consumed` includes the terminator.
    Line { len: usize, consumed: usize },
    /// No terminator yet and the buffer is still within the limit.
    NeedMore,
    /// No terminator within `max` bytes: the caller discards up to the next
    /// LF (see [`skip_past_lf`]) and answers `500 5.5.2`.
    TooLong,
}

/// Find the first command line in `buf`. `max` is the longest line accepted,
/// terminator excluded (RFC 5321 §4.5.3.1.4 says at least 512 octets).
pub fn frame(buf: &[u8], max: usize) -> Framed {
    let window = &buf[..buf.len().min(max + 2)];
    match memchr::memchr(b'\n', window) {
        Some(lf) => {
            let len = if lf > 0 && buf[lf - 1] == b'\r' { lf - 1 } else { lf };
            if len > max {
                Framed::TooLong
            } else {
                Framed::Line { len, consumed: lf + 1 }
            }
        }
        None if buf.len() > max + 1 => Framed::TooLong,
        None => Framed::NeedMore,
    }
}

/// While discarding an over-long line: how many bytes of `buf` to drop, and
/// whether the LF ending the line was found.
pub fn skip_past_lf(buf: &[u8]) -> (usize, bool) {
    match memchr::memchr(b'\n', buf) {
        Some(i) => (i + 1, true),
        None => (buf.len(), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let cases: &[(&[u8], usize, Framed)] = &[
            (b"NOOP\r\n", 10, Framed::Line { len: 4, consumed: 6 }),
            (b"NOOP\n", 10, Framed::Line { len: 4, consumed: 5 }),
            (b"NOOP\r\nQUIT\r\n", 10, Framed::Line { len: 4, consumed: 6 }),
            (b"NOOP\r", 10, Framed::NeedMore),
            (b"NOOP", 10, Framed::NeedMore),
            (b"", 10, Framed::NeedMore),
            (b"\r\n", 10, Framed::Line { len: 0, consumed: 2 }),
            (b"0123456789\r\n", 10, Framed::Line { len: 10, consumed: 12 }),
            (b"0123456789A\r\n", 10, Framed::TooLong),
            (b"0123456789AB", 10, Framed::TooLong),
            (b"0123456789\r", 10, Framed::NeedMore),
            // bare CR inside a line is left for the parser to refuse
            (b"NO\rOP\r\n", 10, Framed::Line { len: 5, consumed: 7 }),
        ];
        for (input, max, want) in cases {
            assert_eq!(&frame(input, *max), want, "input {:?}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn skip() {
        assert_eq!(skip_past_lf(b"xxxx\r\nNOOP"), (6, true));
        assert_eq!(skip_past_lf(b"xxxx"), (4, false));
    }
}
