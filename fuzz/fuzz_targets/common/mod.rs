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
