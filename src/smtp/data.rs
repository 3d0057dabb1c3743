//! Message content receivers: DATA (RFC 5321 §4.1.1.4, §4.5.2) and BDAT
//! (RFC 3030).
//!
//! SMTP smuggling (CVE-2023-51764/51765/51766 family): the only end of DATA
//! is `<CRLF>.<CRLF>`. Any bare LF, bare CR or NUL in the content makes the
//! message refused (`550 5.5.2`) instead of normalized, so an upstream that
//! parses line endings differently can never see a second message inside
//! ours. The receiver keeps reading until the real end so that smuggled
//! commands are swallowed as content, never executed.
//!
//! Lines longer than `limits.max_line_length` (RFC 5322 §2.1.1: 998
//! octets) are refused too: relays on the way fold or split them, which
//! breaks DKIM signatures and the content itself.
//!
//! Trust boundary: raw client bytes. Memory is bounded by the size limit:
//! once exceeded, content is scanned but no longer stored.

/// Why received content is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentError {
    /// Over the configured size limit: `552 5.3.4`.
    TooBig,
    /// LF not preceded by CR.
    BareLf,
    /// CR not followed by LF.
    BareCr,
    /// NUL octet (not allowed without BINARYMIME, which we do not offer).
    Nul,
    /// Line `line` (1-based, of the unstuffed content) is longer than the
    /// limit, CRLF excluded.
    LineTooLong { line: u64 },
}

/// Tracks line-ending validity and line length across chunk boundaries.
#[derive(Debug, Default)]
struct EndingCheck {
    pending_cr: bool,
    error: Option<ContentError>,
    /// Longest line allowed, CRLF excluded; 0: no limit.
    max_line: usize,
    /// Octets of the current line so far.
    line_len: usize,
    /// Lines completed so far.
    lines: u64,
}

impl EndingCheck {
    /// Record `e` unless an error that matters more is already recorded:
    /// the smuggling defences (bare CR/LF, NUL) first, then the size, then
    /// line length; among equals the first one found.
    fn flag(&mut self, e: ContentError) {
        fn rank(e: ContentError) -> u8 {
            match e {
                ContentError::LineTooLong { .. } => 0,
                ContentError::TooBig => 1,
                ContentError::BareLf | ContentError::BareCr | ContentError::Nul => 2,
            }
        }
        if self.error.is_none_or(|old| rank(e) > rank(old)) {
            self.error = Some(e);
        }
    }

    /// `n` octets of text were added to the current line.
    fn text(&mut self, n: usize) {
        self.line_len = self.line_len.saturating_add(n);
        if self.max_line != 0 && self.line_len > self.max_line {
            self.flag(ContentError::LineTooLong { line: self.lines + 1 });
        }
    }

    /// The current line ended with CRLF.
    fn end_of_line(&mut self) {
        self.line_len = 0;
        self.lines += 1;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a line (after CRLF, or at the very beginning).
    LineStart,
    /// A line that began with '.'.
    Dot,
    /// `.` then CR at line start: LF completes the terminator.
    DotCr,
    /// Inside a line.
    Mid,
    /// CR seen inside a line.
    Cr,
    Done,
}

/// Incremental DATA receiver: feed it bytes, it stores the dot-unstuffed
/// content and reports where `<CRLF>.<CRLF>` ended.
#[derive(Debug)]
pub struct DataReceiver {
    state: State,
    body: Vec<u8>,
    max: usize,
    size: u64,
    check: EndingCheck,
}

/// What one call to [`DataReceiver::feed`] found.
#[derive(Debug, PartialEq, Eq)]
pub struct Fed {
    /// Bytes of the input that belong to the DATA content (including the
    /// terminator when `done`); anything after is the next command.
    pub consumed: usize,
    pub done: bool,
}

impl DataReceiver {
    pub fn new(max: usize) -> Self {
        DataReceiver {
            state: State::LineStart,
            body: Vec::with_capacity(max.min(8 * 1024)),
            max,
            size: 0,
            check: EndingCheck::default(),
        }
    }

    /// Refuse content with a line longer than `max_line` octets (CRLF
    /// excluded; after dot-unstuffing); 0: no limit.
    pub fn with_max_line(mut self, max_line: usize) -> Self {
        self.check.max_line = max_line;
        self
    }

    fn push(&mut self, bytes: &[u8]) {
        self.size += bytes.len() as u64;
        if self.size > self.max as u64 {
            self.check.flag(ContentError::TooBig);
            // Keep scanning, stop storing: memory stays bounded.
            self.body = Vec::new();
        } else if self.check.error.is_none() {
            self.body.extend_from_slice(bytes);
        }
    }

    pub fn feed(&mut self, input: &[u8]) -> Fed {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::Done => break,
                State::Mid => {
                    // Fast path: copy the run up to the next CR, LF or NUL.
                    let run = memchr::memchr3(b'\r', b'\n', 0, &input[i..]).unwrap_or(input.len() - i);
                    if run > 0 {
                        self.push(&input[i..i + run]);
                        self.check.text(run);
                        i += run;
                        continue;
                    }
                    match b {
                        b'\r' => self.state = State::Cr,
                        b'\n' => self.check.flag(ContentError::BareLf),
                        _ => self.check.flag(ContentError::Nul),
                    }
                    i += 1;
                }
                State::Cr => {
                    if b == b'\n' {
                        self.push(b"\r\n");
                        self.check.end_of_line();
                        self.state = State::LineStart;
                        i += 1;
                    } else {
                        // Bare CR; re-examine this byte inside the line.
                        self.check.flag(ContentError::BareCr);
                        self.state = State::Mid;
                    }
                }
                State::LineStart => {
                    if b == b'.' {
                        self.state = State::Dot;
                        i += 1;
                    } else {
                        self.state = State::Mid;
                    }
                }
                State::Dot => {
                    if b == b'\r' {
                        self.state = State::DotCr;
                        i += 1;
                    } else {
                        // Transparency (§4.5.2): the leading dot is removed.
                        self.state = State::Mid;
                    }
                }
                State::DotCr => {
                    if b == b'\n' {
                        self.state = State::Done;
                        i += 1;
                    } else {
                        // `<CRLF>.<CR>x`: the CR is bare; the dot was a
                        // stuffed dot. Continue inside the line.
                        self.check.flag(ContentError::BareCr);
                        self.state = State::Mid;
                    }
                }
            }
        }
        Fed {
            consumed: i,
            done: self.state == State::Done,
        }
    }

    /// The received content (with the CRLF that ends its last line), or why
    /// it is refused. Call after `feed` reported `done`.
    pub fn finish(mut self) -> Result<Vec<u8>, ContentError> {
        match self.check.error {
            Some(e) => Err(e),
            None => {
                // The body may stay queued in memory: don't keep slack.
                self.body.shrink_to_fit();
                Ok(self.body)
            }
        }
    }
}

/// BDAT content (RFC 3030): chunks arrive with explicit sizes and no dot
/// stuffing, but the line endings inside must obey the same rules as DATA,
/// because the relay forwards them with DATA upstream.
#[derive(Debug)]
pub struct BdatReceiver {
    body: Vec<u8>,
    max: usize,
    size: u64,
    check: EndingCheck,
}

impl BdatReceiver {
    pub fn new(max: usize) -> Self {
        BdatReceiver {
            body: Vec::new(),
            max,
            size: 0,
            check: EndingCheck::default(),
        }
    }

    /// Refuse content with a line longer than `max_line` octets (CRLF
    /// excluded); 0: no limit.
    pub fn with_max_line(mut self, max_line: usize) -> Self {
        self.check.max_line = max_line;
        self
    }

    /// Add the bytes of a chunk (may be called several times per chunk).
    pub fn feed(&mut self, input: &[u8]) {
        let mut rest = input;
        while let Some(i) = memchr::memchr3(b'\r', b'\n', 0, rest) {
            if self.check.pending_cr && i > 0 {
                self.check.flag(ContentError::BareCr);
            }
            self.check.text(i);
            match rest[i] {
                b'\r' => {
                    if self.check.pending_cr && i == 0 {
                        self.check.flag(ContentError::BareCr);
                    }
                    self.check.pending_cr = true;
                }
                b'\n' => {
                    if !self.check.pending_cr || (i > 0 && rest[i - 1] != b'\r') {
                        self.check.flag(ContentError::BareLf);
                    }
                    self.check.pending_cr = false;
                    self.check.end_of_line();
                }
                _ => {
                    // `\r\0`: the CR is the first offending byte (as in DATA).
                    if self.check.pending_cr && i == 0 {
                        self.check.flag(ContentError::BareCr);
                    }
                    self.check.flag(ContentError::Nul);
                    self.check.pending_cr = false;
                }
            }
            rest = &rest[i + 1..];
        }
        if self.check.pending_cr && !rest.is_empty() {
            self.check.flag(ContentError::BareCr);
            self.check.pending_cr = false;
        }
        self.check.text(rest.len());
        self.size += input.len() as u64;
        if self.size > self.max as u64 {
            self.check.flag(ContentError::TooBig);
            self.body = Vec::new();
        } else if self.check.error.is_none() {
            self.body.extend_from_slice(input);
        }
    }

    /// True once the content can no longer be accepted.
    pub fn failed(&self) -> Option<ContentError> {
        self.check.error
    }

    /// The whole content after the LAST chunk. A message that does not end
    /// with CRLF gets one, since DATA upstream needs it (RFC 3030 §2 allows
    /// any octets, RFC 5322 wants lines).
    pub fn finish(mut self) -> Result<Vec<u8>, ContentError> {
        if self.check.pending_cr {
            self.check.flag(ContentError::BareCr);
        }
        match self.check.error {
            Some(e) => Err(e),
            None => {
                if !self.body.is_empty() && !self.body.ends_with(b"\r\n") {
                    self.body.extend_from_slice(b"\r\n");
                }
                self.body.shrink_to_fit();
                Ok(self.body)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feed the input split at every possible point, plus byte by byte, and
    /// check that the outcome never depends on how TCP segmented it.
    /// (bytes consumed, outcome if the terminator was seen)
    type Outcome = (usize, Option<Result<Vec<u8>, ContentError>>);

    fn run_split(input: &[u8], max: usize) -> Vec<Outcome> {
        let mut outcomes = Vec::new();
        let mut splits: Vec<Vec<usize>> = (0..=input.len()).map(|s| vec![s]).collect();
        splits.push((1..input.len()).collect());
        for cuts in splits {
            let mut r = DataReceiver::new(max);
            let mut consumed = 0;
            let mut done = false;
            let mut start = 0;
            for end in cuts.iter().copied().chain(std::iter::once(input.len())) {
                if end < start || done {
                    continue;
                }
                let f = r.feed(&input[start..end]);
                consumed += f.consumed;
                done = f.done;
                start = end;
            }
            outcomes.push((consumed, if done { Some(r.finish()) } else { None }));
        }
        outcomes
    }

    fn check(input: &[u8], want_consumed: usize, want: Option<Result<&[u8], ContentError>>) {
        for (consumed, got) in run_split(input, 1000) {
            let got = got.as_ref().map(|r| r.as_ref().map(|v| v.as_slice()).map_err(|e| *e));
            assert_eq!(got, want, "input {:?}", String::from_utf8_lossy(input));
            if want.is_some() {
                assert_eq!(consumed, want_consumed, "input {:?}", String::from_utf8_lossy(input));
            }
        }
    }

    #[test]
    fn normal_messages() {
        check(
            b"Subject: x\r\n\r\nbody\r\n.\r\n",
            23,
            Some(Ok(b"Subject: x\r\n\r\nbody\r\n")),
        );
        check(b".\r\n", 3, Some(Ok(b"")));
        check(b"a\r\n.\r\nQUIT\r\n", 6, Some(Ok(b"a\r\n")));
        // dot-unstuffing
        check(b"..x\r\n..\r\n.\r\n", 12, Some(Ok(b".x\r\n.\r\n")));
        check(b"a\r\n.b\r\n.\r\n", 10, Some(Ok(b"a\r\nb\r\n")));
        // 8-bit and UTF-8 content passes
        check("é\r\n.\r\n".as_bytes(), 7, Some(Ok("é\r\n".as_bytes())));
        // not finished yet
        check(b"a\r\n.\r", 0, None);
        check(b"a\r\n", 0, None);
    }

    /// The CVE-2023-51764 family: none of these sequences ends the data, and
    /// each makes the message refused once the real end arrives.
    #[test]
    fn smuggling_variants_are_refused() {
        let smuggled = b"MAIL FROM:<x@evil.example>\r\nRCPT TO:<v@victim.example>\r\nDATA\r\nevil\r\n";
        let variants: &[(&[u8], ContentError)] = &[
            (b"\n.\n", ContentError::BareLf),
            (b"\n.\r\n", ContentError::BareLf),
            (b"\r.\r\n", ContentError::BareCr),
            (b"\r\n.\r", ContentError::BareCr),
            (b"\r\n.\n", ContentError::BareLf),
            (b"\r.\n", ContentError::BareCr),
            (b"\r\n\x00.\r\n", ContentError::Nul),
            (b"\r\n.\x00\r\n", ContentError::Nul),
            (b"\n\n.\n\n", ContentError::BareLf),
            (b"\r\r\n.\r\r\n", ContentError::BareCr),
        ];
        for (seq, want) in variants {
            let mut input = b"Subject: hi\r\n\r\nbody".to_vec();
            input.extend_from_slice(seq);
            input.extend_from_slice(smuggled);
            input.extend_from_slice(b".\r\n");
            let total = input.len();
            check(&input, total, Some(Err(*want)));
        }
    }

    #[test]
    fn bare_endings_inside_body() {
        check(b"a\nb\r\n.\r\n", 8, Some(Err(ContentError::BareLf)));
        check(b"a\rb\r\n.\r\n", 8, Some(Err(ContentError::BareCr)));
        check(b"a\x00b\r\n.\r\n", 8, Some(Err(ContentError::Nul)));
    }

    #[test]
    fn size_limit_keeps_scanning() {
        let mut input = vec![b'x'; 50];
        input.extend_from_slice(b"\r\n.\r\nNOOP\r\n");
        let mut r = DataReceiver::new(10);
        let f = r.feed(&input);
        assert_eq!(
            f,
            Fed {
                consumed: 55,
                done: true
            }
        );
        assert_eq!(r.finish(), Err(ContentError::TooBig));
        // exactly at the limit is fine
        let mut r = DataReceiver::new(10);
        assert!(r.feed(b"12345678\r\n.\r\n").done);
        assert_eq!(r.finish().unwrap(), b"12345678\r\n");
    }

    #[test]
    fn bare_lf_wins_over_too_big() {
        let mut r = DataReceiver::new(4);
        assert!(r.feed(b"123456\nx\r\n.\r\n").done);
        assert_eq!(r.finish(), Err(ContentError::BareLf));
    }

    #[test]
    fn lines_over_the_limit_are_refused_wherever_the_input_is_cut() {
        let line = |n| vec![b'x'; n];
        let msg = |lines: &[Vec<u8>]| {
            let mut m = Vec::new();
            for l in lines {
                m.extend_from_slice(l);
                m.extend_from_slice(b"\r\n");
            }
            m
        };
        let data = |content: &[u8]| [content, b".\r\n"].concat();
        let limit = 10;
        let run = |input: &[u8]| {
            let mut outs = Vec::new();
            for cut in 0..=input.len() {
                let mut r = DataReceiver::new(1000).with_max_line(limit);
                let a = r.feed(&input[..cut]);
                let b = if a.done { a } else { r.feed(&input[cut..]) };
                assert!(b.done);
                outs.push(r.finish());
            }
            outs
        };
        let ok = msg(&[line(10), line(3), line(10)]);
        assert!(run(&data(&ok)).iter().all(|o| o.as_deref() == Ok(&ok[..])));
        let long = msg(&[line(3), line(10), line(11), line(2)]);
        for o in run(&data(&long)) {
            assert_eq!(o, Err(ContentError::LineTooLong { line: 3 }));
        }
        // A stuffed dot is not part of the line; an unstuffed one is.
        let stuffed = [b"..".as_slice(), &line(9), b"\r\n.\r\n"].concat();
        assert!(run(&stuffed).iter().all(|o| o.is_ok()));
        let stuffed = [b"..".as_slice(), &line(10), b"\r\n.\r\n"].concat();
        assert!(
            run(&stuffed)
                .iter()
                .all(|o| *o == Err(ContentError::LineTooLong { line: 1 }))
        );
        // A bare LF is reported before or after a long line; so is size.
        let both = [b"a\nb\r\n".as_slice(), &msg(&[line(20)]), b".\r\n"].concat();
        assert!(run(&both).iter().all(|o| *o == Err(ContentError::BareLf)));
        let both = [msg(&[line(20)]), b"a\nb\r\n.\r\n".to_vec()].concat();
        assert!(run(&both).iter().all(|o| *o == Err(ContentError::BareLf)));
        let mut r = DataReceiver::new(15).with_max_line(limit);
        assert!(r.feed(&data(&msg(&[line(11), line(11)]))).done);
        assert_eq!(r.finish(), Err(ContentError::TooBig));
        // No limit: any length.
        let mut r = DataReceiver::new(100_000);
        assert!(r.feed(&data(&msg(&[line(5000)]))).done);
        assert!(r.finish().is_ok());

        // BDAT: the same rule across chunks.
        for cut in 0..=long.len() {
            let mut r = BdatReceiver::new(1000).with_max_line(limit);
            r.feed(&long[..cut]);
            r.feed(&long[cut..]);
            assert_eq!(r.finish(), Err(ContentError::LineTooLong { line: 3 }), "cut {cut}");
            let mut r = BdatReceiver::new(1000).with_max_line(limit);
            r.feed(&ok[..cut.min(ok.len())]);
            r.feed(&ok[cut.min(ok.len())..]);
            assert!(r.finish().is_ok(), "cut {cut}");
        }
        // A last line without CRLF counts too.
        let mut r = BdatReceiver::new(1000).with_max_line(limit);
        r.feed(&[msg(&[line(2)]), line(11)].concat());
        assert_eq!(r.finish(), Err(ContentError::LineTooLong { line: 2 }));
    }

    #[test]
    fn bdat_checks_across_chunks() {
        type Case<'a> = (&'a [&'a [u8]], Result<&'a [u8], ContentError>);
        let cases: &[Case] = &[
            (&[b"a\r\nb\r\n"], Ok(b"a\r\nb\r\n")),
            (&[b"a\r", b"\nb\r\n"], Ok(b"a\r\nb\r\n")),
            (&[b"a\r\nb"], Ok(b"a\r\nb\r\n")),
            (&[b"a\nb\r\n"], Err(ContentError::BareLf)),
            (&[b"a\r", b"b\r\n"], Err(ContentError::BareCr)),
            (&[b"a\r"], Err(ContentError::BareCr)),
            (&[b"a\r\r\n"], Err(ContentError::BareCr)),
            (&[b"a", b"\n"], Err(ContentError::BareLf)),
            (&[b"\x00\r\n"], Err(ContentError::Nul)),
            (&[b"a\r\x00\r\n"], Err(ContentError::BareCr)),
            (&[b"a\r", b"\x00\r\n"], Err(ContentError::BareCr)),
            (
                &[b"\r\n.\r\n", b"MAIL FROM:<x@y>\r\n"],
                Ok(b"\r\n.\r\nMAIL FROM:<x@y>\r\n"),
            ),
            (&[b"0123456789012345678901234567", b"x\r\n"], Err(ContentError::TooBig)),
        ];
        for (chunks, want) in cases {
            let mut r = BdatReceiver::new(30);
            for c in chunks.iter() {
                r.feed(c);
            }
            assert_eq!(r.finish().as_deref().map_err(|e| *e), *want, "{chunks:?}");
        }
    }
}
