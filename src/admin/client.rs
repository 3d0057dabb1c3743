//! A small HTTP/1.1 client for the CLI's `sendguard suppress ...`, which
//! talks to a running server's admin API (plain HTTP: the API is meant for
//! loopback or a private network).

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;

/// An admin API endpoint and its token.
pub struct AdminClient {
    /// `host:port`
    pub authority: String,
    pub token: String,
}

impl AdminClient {
    /// From `http://host:port` (a trailing `/` is ignored).
    pub fn new(url: &str, token: String) -> anyhow::Result<AdminClient> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| anyhow::anyhow!("{url:?}: only http://host:port URLs are supported"))?;
        let authority = rest.trim_end_matches('/').to_string();
        anyhow::ensure!(
            !authority.is_empty() && !authority.contains('/'),
            "{url:?}: expected http://host:port"
        );
        Ok(AdminClient { authority, token })
    }

    /// One request; returns the status and the body.
    pub async fn call(
        &self,
        method: Method,
        path_and_query: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> anyhow::Result<(StatusCode, Vec<u8>)> {
        let tcp = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to the admin API at {}: {e}", self.authority))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        let driver = tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(hyper::header::HOST, &self.authority)
            .header(hyper::header::AUTHORIZATION, format!("Bearer {}", self.token));
        if let Some(ct) = content_type {
            req = req.header(hyper::header::CONTENT_TYPE, ct);
        }
        let resp = sender.send_request(req.body(Full::new(Bytes::from(body)))?).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes().to_vec();
        drop(sender);
        let _ = driver.await;
        Ok((status, bytes))
    }
}

/// Percent-encode a path segment or query value (RFC 3986 unreserved kept).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
