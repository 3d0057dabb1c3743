//! BDAT content receiver on arbitrary chunk contents.
//!
//! Input layout: bytes 0-1 = size limit `max` (u16, little endian), byte 2 =
//! number of cuts `n` (modulo 8), the next `n` bytes = lengths of the first
//! `n` pieces (each clamped to what is left), the rest = the message content.
//! The line limit is the low 5 bits of byte 0 (0: none).
//! The content is fed to `BdatReceiver` in one call, in the fuzzer-chosen
//! pieces (which stand for BDAT chunks and for partial reads within a chunk;
//! empty pieces included), and one byte per call. Nothing may panic, and:
//!
//! - all three runs agree on `failed()` after the last feed and on the
//!   `finish()` result (chunking must never change the outcome);
//! - `failed()` never goes from `Some` back to `None`;
//! - the result equals a simple reference model: content refused for its
//!   first bare LF / bare CR / NUL, else for exceeding `max`, else for its
//!   first line (CRLF excluded; a last line without one too) longer than the
//!   line limit, else accepted as is, with CRLF appended when missing;
//! - an `Ok` body has no bare LF, no bare CR, no NUL, is at most `max` + 2
//!   bytes, and when non-empty ends with CRLF.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use sendguard::smtp::data::{BdatReceiver, ContentError};

type Outcome = (Option<ContentError>, Result<Vec<u8>, ContentError>);

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let max = u16::from_le_bytes([data[0], data[1]]) as usize;
    let max_line = (data[0] & 0x1f) as usize;
    let n = (data[2] % 8) as usize;
    let Some(lens) = data.get(3..3 + n) else {
        return;
    };
    let content = &data[3 + n..];

    let mut pieces = Vec::with_capacity(n + 1);
    let mut rest = content;
    for &len in lens {
        let (piece, r) = rest.split_at((len as usize).min(rest.len()));
        pieces.push(piece);
        rest = r;
    }
    pieces.push(rest);

    let whole = run(max, max_line, [content]);
    let chunked = run(max, max_line, pieces.iter().copied());
    let bytes = run(max, max_line, content.chunks(1));
    assert_eq!(whole, chunked, "one call vs pieces {pieces:?}");
    assert_eq!(whole, bytes, "one call vs byte by byte");

    let (_, result) = whole;
    let want = reference(content, max, max_line);
    assert_eq!(
        result,
        want.clone().map_err(|(e, _)| e),
        "content {content:?}: reference {want:?}"
    );

    if let Ok(body) = result {
        let len = body.len();
        assert!(len <= max + 2, "body of {len} bytes, max {max}");
        common::assert_crlf_clean(&body);
        if !body.is_empty() {
            assert!(body.ends_with(b"\r\n"));
        }
    }
});

fn run<'a>(max: usize, max_line: usize, chunks: impl IntoIterator<Item = &'a [u8]>) -> Outcome {
    let mut r = BdatReceiver::new(max).with_max_line(max_line);
    for chunk in chunks {
        let before = r.failed();
        r.feed(chunk);
        if before.is_some() {
            assert!(r.failed().is_some(), "failure {before:?} was forgotten");
        }
    }
    (r.failed(), r.finish())
}

/// Refused for the first bare LF, bare CR or NUL (with its offset); else
/// refused when over `max`; else for its first line over `max_line` (when
/// not 0); else accepted with CRLF appended if the content does not end so.
fn reference(content: &[u8], max: usize, max_line: usize) -> Result<Vec<u8>, (ContentError, usize)> {
    for (i, &c) in content.iter().enumerate() {
        match c {
            0 => return Err((ContentError::Nul, i)),
            b'\n' if i == 0 || content[i - 1] != b'\r' => return Err((ContentError::BareLf, i)),
            b'\r' if content.get(i + 1) != Some(&b'\n') => return Err((ContentError::BareCr, i)),
            _ => {}
        }
    }
    if content.len() > max {
        return Err((ContentError::TooBig, content.len()));
    }
    if let Some(line) = common::first_long_line(content, max_line) {
        return Err((ContentError::LineTooLong { line }, 0));
    }
    let mut body = content.to_vec();
    if !body.is_empty() && !body.ends_with(b"\r\n") {
        body.extend_from_slice(b"\r\n");
    }
    Ok(body)
}
