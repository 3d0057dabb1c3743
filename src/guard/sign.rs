//! DKIM signing per sender domain (RFC 6376) with mail-auth: keys are
//! loaded at start (RSA of 2048 bits or more, or Ed25519), a message whose
//! header From is in a signing domain gets a `DKIM-Signature` prepended
//! after the guard accepted it. The health check compares the published
//! selector key with the private key ([`Signer::public_key`]).
//!
//! Trust boundary: key files are operator data, read once; the message is
//! client data, only hashed.

use std::path::Path;

use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256, SigningKey};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{DkimSigner, Done};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

/// Headers signed when present (RFC 6376 §5.4.1's recommendations plus
/// the one-click unsubscribe headers of RFC 8058).
const SIGNED_HEADERS: [&str; 14] = [
    "From",
    "Reply-To",
    "Subject",
    "Date",
    "To",
    "Cc",
    "Message-ID",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
];

enum Key {
    Rsa(DkimSigner<RsaKey<Sha256>, Done>),
    Ed25519(DkimSigner<Ed25519Key, Done>),
}

pub struct Signer {
    pub domain: String,
    pub selector: String,
    key: Key,
    public_key: Vec<u8>,
}

impl Signer {
    /// Load a PEM private key: PKCS#1 or PKCS#8 RSA, or PKCS#8 Ed25519.
    pub fn load(domain: &str, selector: &str, path: &Path) -> Result<Signer, String> {
        let der = PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
            rustls_pki_types::pem::Error::NoItemsFound => format!("{}: no PEM private key in the file", path.display()),
            other => format!("cannot read {}: {other}", path.display()),
        })?;
        let (key, public_key) = match RsaKey::<Sha256>::from_key_der(der.clone_key()) {
            Ok(k) => {
                let public = k.public_key();
                (Key::Rsa(dkim_signer(k, domain, selector)), public)
            }
            Err(rsa_err) => {
                let PrivateKeyDer::Pkcs8(pk8) = &der else {
                    return Err(format!("{}: not a usable RSA key ({rsa_err})", path.display()));
                };
                let pk8: &PrivatePkcs8KeyDer = pk8;
                match Ed25519Key::from_pkcs8_maybe_unchecked_der(pk8.secret_pkcs8_der()) {
                    Ok(k) => {
                        let public = k.public_key();
                        (Key::Ed25519(dkim_signer(k, domain, selector)), public)
                    }
                    Err(_) => {
                        return Err(format!(
                            "{}: neither an RSA key of 2048 bits or more nor an Ed25519 key ({rsa_err})",
                            path.display()
                        ));
                    }
                }
            }
        };
        Ok(Signer {
            domain: domain.to_string(),
            selector: selector.to_string(),
            key,
            public_key,
        })
    }

    /// The public key: PKCS#1 RSAPublicKey DER for RSA (the tail of the
    /// SubjectPublicKeyInfo usually published in `p=`), raw 32 bytes for Ed25519.
    pub fn public_key(&self) -> &[u8] {
        &self.public_key
    }

    /// `DKIM-Signature: …\r\n` for `message` (relaxed/relaxed, `d=` the domain).
    pub fn sign(&self, message: &[u8]) -> Result<String, String> {
        let sig = match &self.key {
            Key::Rsa(s) => s.sign(message),
            Key::Ed25519(s) => s.sign(message),
        };
        sig.map(|s| s.to_header()).map_err(|e| e.to_string())
    }
}

fn dkim_signer<K: SigningKey>(key: K, domain: &str, selector: &str) -> DkimSigner<K, Done> {
    DkimSigner::from_key(key)
        .domain(domain)
        .selector(selector)
        .headers(SIGNED_HEADERS)
}

/// Does the `p=` of a DKIM key record hold `public_key`? (Equal, or an
/// SPKI whose tail is the PKCS#1 key.)
pub fn record_has_key(record: &[u8], public_key: &[u8]) -> bool {
    let text = String::from_utf8_lossy(record);
    let Some(p) = text.split(';').find_map(|tag| {
        let (name, value) = tag.split_once('=')?;
        (name.trim() == "p").then(|| value.chars().filter(|c| !c.is_whitespace()).collect::<String>())
    }) else {
        return false;
    };
    use base64::Engine;
    match base64::engine::general_purpose::STANDARD.decode(p) {
        Ok(der) => !public_key.is_empty() && (der == public_key || der.ends_with(public_key)),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p_tag_matching() {
        use base64::Engine;
        let key = [1u8, 2, 3, 4];
        let spki = [9u8, 9, 1, 2, 3, 4];
        let b = |v: &[u8]| base64::engine::general_purpose::STANDARD.encode(v);
        assert!(record_has_key(
            format!("v=DKIM1; k=rsa; p={}", b(&spki)).as_bytes(),
            &key
        ));
        assert!(record_has_key(format!("v=DKIM1; p = {} ", b(&key)).as_bytes(), &key));
        assert!(!record_has_key(
            format!("v=DKIM1; p={}", b(&[1, 2, 3, 5])).as_bytes(),
            &key
        ));
        assert!(!record_has_key(b"v=DKIM1; p=", &key));
    }
}
