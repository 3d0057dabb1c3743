//! Memory helpers shared by the benchmarks (included with `#[path]`).

/// Give freed heap memory back to the OS, so RSS shows what is live.
pub fn trim() {
    // SAFETY: malloc_trim only touches glibc's own heap bookkeeping.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Resident set size in KiB (from /proc/self/statm, 4 KiB pages).
pub fn rss_kb() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = s.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4
}
