//! DATA content receiver on arbitrary client bytes.
//!
//! Input layout: bytes 0-1 = size limit `max` (u16, little endian), bytes 2-3
//! = split point (u16 LE, taken modulo len+1), the rest = bytes the client
//! sends after `354`. The line limit is the low 5 bits of byte 0 (0: none),
//! so that short inputs reach it. The same bytes are fed to `DataReceiver` in one call,
//! in two calls split at the chosen point, and one byte per call. Nothing may
//! panic, and:
//!
//! - all three runs agree on `consumed`, `done` and the `finish()` result
//!   (TCP segmentation must never change the outcome);
//! - when `done`, the consumed bytes end with the only terminator there is,
//!   `<CRLF>.<CRLF>` (or are exactly `.<CRLF>`); otherwise all is consumed;
//! - the result equals a simple reference model: content refused for its
//!   first bare LF / bare CR / NUL, else for exceeding `max`, else for its
//!   first line (unstuffed, CRLF excluded) longer than the line limit, else
//!   accepted dot-unstuffed;
//! - an `Ok` body has no bare LF, no bare CR, no NUL, is at most `max` bytes
//!   and, when complete and non-empty, ends with CRLF.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use sendguard::smtp::data::{ContentError, DataReceiver};

type Outcome = (usize, bool, Result<Vec<u8>, ContentError>);

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let max = u16::from_le_bytes([data[0], data[1]]) as usize;
    let max_line = (data[0] & 0x1f) as usize;
    let input = &data[4..];
    let split = u16::from_le_bytes([data[2], data[3]]) as usize % (input.len() + 1);

    let whole = run(max, max_line, [input]);
    let (a, b) = input.split_at(split);
    let halves = run(max, max_line, [a, b]);
    let bytes = run(max, max_line, input.chunks(1));
    assert_eq!(whole, halves, "one call vs split at {split}");
    assert_eq!(whole, bytes, "one call vs byte by byte");

    let (consumed, done, result) = whole;
    assert!(consumed <= input.len());
    if done {
        let got = &input[..consumed];
        assert!(
            got == b".\r\n" || got.ends_with(b"\r\n.\r\n"),
            "data ended without <CRLF>.<CRLF>: {got:?}"
        );
        let content = &input[..consumed - 3];
        assert_eq!(result, reference(content, max, max_line), "content {content:?}");
    } else {
        assert_eq!(consumed, input.len());
    }

    if let Ok(body) = result {
        assert!(body.len() <= max, "body of {} bytes over {max}", body.len());
        // (DATA: also before `done`, a CR is only ever stored with its LF.)
        common::assert_crlf_clean(&body);
        if done && !body.is_empty() {
            assert!(body.ends_with(b"\r\n"));
        }
    }
});

/// Feed `chunks` in order, stopping once the receiver reports `done`.
fn run<'a>(max: usize, max_line: usize, chunks: impl IntoIterator<Item = &'a [u8]>) -> Outcome {
    let mut r = DataReceiver::new(max).with_max_line(max_line);
    let (mut consumed, mut done) = (0, false);
    for chunk in chunks {
        let fed = r.feed(chunk);
        assert!(fed.consumed <= chunk.len());
        assert!(fed.done || fed.consumed == chunk.len());
        consumed += fed.consumed;
        done = fed.done;
        if done {
            break;
        }
    }
    (consumed, done, r.finish())
}

/// The content before the final `.<CRLF>` (including the CRLF ending its
/// last line): refused for the first bare LF, bare CR or NUL; else refused
/// when its dot-unstuffed size exceeds `max`; else for its first line over
/// `max_line` (when not 0); else accepted unstuffed.
fn reference(content: &[u8], max: usize, max_line: usize) -> Result<Vec<u8>, ContentError> {
    let mut body = Vec::new();
    let mut line_start = true;
    for (i, &c) in content.iter().enumerate() {
        match c {
            0 => return Err(ContentError::Nul),
            b'\n' if i == 0 || content[i - 1] != b'\r' => return Err(ContentError::BareLf),
            b'\r' if content.get(i + 1) != Some(&b'\n') => return Err(ContentError::BareCr),
            _ => {}
        }
        if line_start && c == b'.' {
            line_start = false;
            continue;
        }
        body.push(c);
        line_start = c == b'\n';
    }
    if body.len() > max {
        return Err(ContentError::TooBig);
    }
    if let Some(line) = common::first_long_line(&body, max_line) {
        return Err(ContentError::LineTooLong { line });
    }
    Ok(body)
}
