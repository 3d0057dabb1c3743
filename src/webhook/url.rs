//! Receiver URLs: `http://` or `https://`, a host (name, IPv4 or bracketed
//! IPv6), an optional port and an optional path and query (RFC 3986 §3).
//! Pure: no I/O.
//!
//! Trust boundary: the text comes from the config; anything this small
//! parser does not understand (user info, fragments, spaces, other
//! schemes) is refused at validation rather than guessed at.

/// A parsed receiver URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub tls: bool,
    /// Host name or IP address, without IPv6 brackets.
    pub host: String,
    pub port: u16,
    /// Origin-form request target: path and query, at least `/`.
    pub path: String,
    /// The `Host` header value (port only when not the scheme's default).
    pub authority: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, String> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| format!("{url:?} is not an http:// or https:// URL"))?;
        let tls = match scheme.to_ascii_lowercase().as_str() {
            "http" => false,
            "https" => true,
            _ => return Err(format!("{url:?}: only http:// and https:// are supported")),
        };
        if let Some(c) = url.chars().find(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("{url:?} contains {c:?}"));
        }
        if url.contains('#') {
            return Err(format!("{url:?}: a fragment (#...) is never sent; remove it"));
        }
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(split);
        if authority.contains('@') {
            return Err(format!("{url:?}: user info in the URL is not supported"));
        }
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (addr, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("{url:?}: unclosed '[' in the host"))?;
            addr.parse::<std::net::Ipv6Addr>()
                .map_err(|_| format!("{url:?}: {addr:?} is not an IPv6 address"))?;
            let port = match after {
                "" => None,
                p => Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| format!("{url:?}: unexpected {p:?} after the host"))?,
                ),
            };
            (addr.to_string(), port)
        } else {
            match authority.split_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (authority.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err(format!("{url:?} has no host"));
        }
        if !host.contains(':') && !host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)) {
            return Err(format!("{url:?}: {host:?} is not a host name or address"));
        }
        let port = match port {
            None => default_port,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => return Err(format!("{url:?}: {p:?} is not a port (1-65535)")),
            },
        };
        let path = match path {
            "" => "/".to_string(),
            p if p.starts_with('?') => format!("/{p}"),
            p => p.to_string(),
        };
        let bracketed = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.clone()
        };
        let authority = if port == default_port {
            bracketed
        } else {
            format!("{bracketed}:{port}")
        };
        Ok(Target {
            tls,
            host,
            port,
            path,
            authority,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (tls, host, port, path, authority)
    type Parts = (bool, &'static str, u16, &'static str, &'static str);

    fn ok(url: &str) -> Parts {
        let t = Target::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"));
        (t.tls, t.host.leak(), t.port, t.path.leak(), t.authority.leak())
    }

    #[test]
    fn parses() {
        let table: &[(&str, Parts)] = &[
            ("http://example.com", (false, "example.com", 80, "/", "example.com")),
            ("https://example.com/", (true, "example.com", 443, "/", "example.com")),
            (
                "HTTPS://hooks.example.com:8443/a/b?x=1&y=2",
                (
                    true,
                    "hooks.example.com",
                    8443,
                    "/a/b?x=1&y=2",
                    "hooks.example.com:8443",
                ),
            ),
            (
                "http://127.0.0.1:9000/hook",
                (false, "127.0.0.1", 9000, "/hook", "127.0.0.1:9000"),
            ),
            ("http://[::1]:8080/x", (false, "::1", 8080, "/x", "[::1]:8080")),
            (
                "https://[2001:db8::1]/",
                (true, "2001:db8::1", 443, "/", "[2001:db8::1]"),
            ),
            ("http://h:80?q", (false, "h", 80, "/?q", "h")),
            (
                "http://my_host.internal:81",
                (false, "my_host.internal", 81, "/", "my_host.internal:81"),
            ),
        ];
        for (url, want) in table {
            assert_eq!(ok(url), *want, "{url}");
        }
    }

    #[test]
    fn refuses() {
        for url in [
            "",
            "example.com/hook",
            "ftp://example.com/",
            "http://",
            "http:///path",
            "http://user:pw@example.com/",
            "http://example.com/#frag",
            "http://exa mple.com/",
            "http://example.com/a b",
            "http://example.com:0/",
            "http://example.com:65536/",
            "http://example.com:+80/",
            "http://example.com:/",
            "http://[::1/",
            "http://[nothost]/",
            "http://[::1]x/",
            "http://exa%mple.com/",
            "http://host:1:2/",
        ] {
            assert!(
                Target::parse(url).is_err(),
                "{url:?} accepted: {:?}",
                Target::parse(url)
            );
        }
    }
}
