//! Command framing and parsing on arbitrary client bytes.
//!
//! The input is a raw client byte stream. It is split into command lines
//! exactly as `server::session::read_line` does (`line::frame`, and
//! `line::skip_past_lf` to discard an over-long line), and every line goes
//! through `command::parse`. Nothing may panic, and:
//!
//! - framing: a `Line` lies within the buffer, is at most `max` bytes, holds
//!   no LF and is followed by its LF terminator (optionally after a CR);
//! - every parsed MAIL FROM / RCPT TO mailbox displays as `local@domain`
//!   with an '@', no control characters, and parses back to itself;
//! - a reply quoting the raw line (`550 5.1.1 bad <line>`) is exactly one
//!   wire line: client bytes can never inject CR/LF into a reply.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sendguard::smtp::address::parse_path;
use sendguard::smtp::command::{self, Command};
use sendguard::smtp::line::{self, Framed};
use sendguard::smtp::{Enhanced, Mailbox, Reply};

fuzz_target!(|data: &[u8]| {
    // 512 is the RFC 5321 §4.5.3.1.4 minimum the config enforces; 16 makes
    // the over-long-line path easy to reach with short inputs.
    for max in [512, 16] {
        split_and_parse(data, max);
    }
});

fn split_and_parse(data: &[u8], max: usize) {
    let mut buf = data;
    while !buf.is_empty() {
        match line::frame(buf, max) {
            Framed::Line { len, consumed } => {
                assert!(len <= max, "line of {len} bytes over max {max}");
                assert!(consumed <= buf.len() && consumed > len);
                assert_eq!(buf[consumed - 1], b'\n');
                assert!(consumed == len + 1 || (consumed == len + 2 && buf[len] == b'\r'));
                let l = &buf[..len];
                assert!(!l.contains(&b'\n'));
                check_line(l);
                buf = &buf[consumed..];
            }
            Framed::TooLong => {
                let (n, found) = line::skip_past_lf(buf);
                assert!(n > 0 && n <= buf.len());
                assert_eq!(found, buf[n - 1] == b'\n');
                assert!(!buf[..n - 1].contains(&b'\n'));
                buf = &buf[n..];
            }
            Framed::NeedMore => {
                // The session would wait for more bytes. The partial line
                // cannot hold an LF; parse it anyway for coverage.
                assert!(buf.len() <= max + 1 && !buf.contains(&b'\n'));
                check_line(buf);
                break;
            }
        }
    }
}

fn check_line(l: &[u8]) {
    match command::parse(l) {
        Ok(Command::Mail { from: Some(m), .. }) | Ok(Command::Rcpt { to: m }) => check_mailbox(&m),
        _ => {}
    }

    let text = format!("bad {}", String::from_utf8_lossy(l));
    let wire = Reply::new(550, Enhanced(5, 1, 1), text).to_wire();
    assert_eq!(wire.matches("\r\n").count(), 1, "reply {wire:?}");
    assert!(wire.ends_with("\r\n"), "reply {wire:?}");
    let head = &wire[..wire.len() - 2];
    assert!(!head.contains(['\r', '\n']), "reply {wire:?}");
}

fn check_mailbox(m: &Mailbox) {
    let s = m.to_string();
    assert!(s.contains('@'), "mailbox without '@': {s:?}");
    assert!(!s.chars().any(char::is_control), "control char in {s:?}");
    // What later stages see (`local@domain`) is itself a valid path that
    // parses back to the same mailbox.
    assert_eq!(
        parse_path(&format!("<{s}>")).as_ref(),
        Ok(m),
        "mailbox {s:?} does not round-trip"
    );
}
