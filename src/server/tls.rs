//! Server-side TLS (rustls, ring provider). TLS 1.2 and 1.3 only.
//!
//! Trust boundary: reads the operator's certificate chain and private key
//! from disk; the handshake itself is rustls's.

use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A TLS loading error naming the config key it concerns.
#[derive(Debug)]
pub struct TlsError {
    pub key: &'static str,
    pub message: String,
}

/// Load `cert` (PEM chain) and `key` (PEM, PKCS#8/PKCS#1/SEC1) into a rustls
/// server config restricted to TLS 1.2 and 1.3.
pub fn load_server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = read_certs(cert)?;
    let key_der = read_key(key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError {
            key: "tls",
            message: e.to_string(),
        })?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| TlsError {
            key: "tls.key",
            message: format!("does not match tls.cert or is unusable: {e}"),
        })?;
    Ok(Arc::new(cfg))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let e = |m: String| TlsError {
        key: "tls.cert",
        message: m,
    };
    let data = std::fs::read(path).map_err(|err| e(format!("cannot read {}: {err}", path.display())))?;
    let certs = rustls_pemfile::certs(&mut data.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| e(format!("{}: bad PEM: {err}", path.display())))?;
    if certs.is_empty() {
        return Err(e(format!("{}: no CERTIFICATE block found", path.display())));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let e = |m: String| TlsError {
        key: "tls.key",
        message: m,
    };
    let data = std::fs::read(path).map_err(|err| e(format!("cannot read {}: {err}", path.display())))?;
    rustls_pemfile::private_key(&mut data.as_slice())
        .map_err(|err| e(format!("{}: bad PEM: {err}", path.display())))?
        .ok_or_else(|| e(format!("{}: no PRIVATE KEY block found", path.display())))
}
