//! Checks shared by the content-receiver targets.

/// An accepted body has no NUL, no bare LF and no bare CR: every CR is
/// followed by LF and every LF preceded by CR.
pub fn assert_crlf_clean(body: &[u8]) {
    assert!(!body.contains(&0), "NUL in body");
    for (i, &c) in body.iter().enumerate() {
        if c == b'\n' {
            assert!(i > 0 && body[i - 1] == b'\r', "bare LF at {i}");
        }
        if c == b'\r' {
            assert!(body.get(i + 1) == Some(&b'\n'), "bare CR at {i}");
        }
    }
}

/// The 1-based number of the first line of `body` (CRLF-separated, no bare
/// CR or LF in it; a last line without CRLF counts) longer than `max_line`
/// octets, CRLF excluded; `None` when there is none or `max_line` is 0.
pub fn first_long_line(body: &[u8], max_line: usize) -> Option<u64> {
    if max_line == 0 {
        return None;
    }
    let mut lines = body.split(|&c| c == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    lines.position(|l| l.len() > max_line).map(|i| i as u64 + 1)
}
