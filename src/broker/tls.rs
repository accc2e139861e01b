//! TLS listeners (rustls with the `ring` provider).
//!
//! The server certificate and key are read from PEM files at start-up and again on SIGHUP
//! ([`TlsListener::reload`]): [`ReloadingCert`] hands each new handshake the current key,
//! so connections already established keep theirs and are not dropped.
//!
//! With `tls_client_ca` set, clients may (or with `require_client_cert` must) present a
//! certificate signed by that CA; its Common Name, or failing that its first DNS / e-mail
//! Subject Alternative Name, becomes the client's user name.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::ListenerConfig;

#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", path.display())]
pub struct TlsError {
    pub path: PathBuf,
    pub message: String,
}

fn tls_err(path: &Path, message: impl Into<String>) -> TlsError {
    TlsError {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a PEM certificate chain and key and checks that they belong together.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| tls_err(cert, format!("cannot read certificates: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_err(cert, format!("bad PEM certificate: {e}")))?;
    if chain.is_empty() {
        return Err(tls_err(cert, "no CERTIFICATE block found"));
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| tls_err(key, format!("cannot read private key: {e}")))?;
    CertifiedKey::from_der(chain, key_der, &provider())
        .map_err(|e| tls_err(key, format!("unusable key for {}: {e}", cert.display())))
}

/// Hands out the current certificate; [`ReloadingCert::set`] swaps it.
#[derive(Debug)]
pub struct ReloadingCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ReloadingCert {
    pub fn set(&self, key: CertifiedKey) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// The TLS side of one listener.
#[derive(Clone)]
pub struct TlsListener {
    pub acceptor: TlsAcceptor,
    resolver: Arc<ReloadingCert>,
    cert: PathBuf,
    key: PathBuf,
}

impl TlsListener {
    /// `None` for a plain TCP listener.
    pub fn from_config(l: &ListenerConfig) -> Result<Option<TlsListener>, TlsError> {
        let (Some(cert), Some(key)) = (&l.tls_cert, &l.tls_key) else {
            return Ok(None);
        };
        let resolver = Arc::new(ReloadingCert {
            current: RwLock::new(Arc::new(load_certified_key(cert, key)?)),
        });
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_err(cert, e.to_string()))?;
        let builder = match &l.tls_client_ca {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                let certs = CertificateDer::pem_file_iter(ca)
                    .map_err(|e| tls_err(ca, format!("cannot read CA certificates: {e}")))?;
                for c in certs {
                    let c = c.map_err(|e| tls_err(ca, format!("bad PEM certificate: {e}")))?;
                    roots
                        .add(c)
                        .map_err(|e| tls_err(ca, format!("unusable CA certificate: {e}")))?;
                }
                if roots.is_empty() {
                    return Err(tls_err(ca, "no CA certificate found"));
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
                let verifier = if l.require_client_cert {
                    verifier
                } else {
                    verifier.allow_unauthenticated()
                };
                let verifier = verifier.build().map_err(|e| tls_err(ca, e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder.with_cert_resolver(resolver.clone());
        Ok(Some(TlsListener {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            resolver,
            cert: cert.clone(),
            key: key.clone(),
        }))
    }

    /// Re-reads the certificate and key; new handshakes use them, established connections
    /// are untouched. On error the previous certificate stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let key = load_certified_key(&self.cert, &self.key)?;
        self.resolver.set(key);
        Ok(())
    }

    pub fn cert_path(&self) -> &Path {
        &self.cert
    }
}

/// The user name a client certificate stands for: its subject Common Name, or else its
/// first DNS / e-mail Subject Alternative Name. `None` if the certificate has neither (or
/// cannot be parsed; it was already verified, so that would be unusual).
pub fn certificate_name(cert: &[u8]) -> Option<String> {
    let tbs = der::tbs_certificate(cert)?;
    der::subject_cn(&tbs).or_else(|| der::first_san(&tbs))
}

/// Just enough DER to find the subject CN and SAN of an X.509 certificate.
mod der {
    /// One TLV: (tag, content, rest).
    fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = input.split_first()?;
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
            (len, &rest[n..])
        };
        if rest.len() < len {
            return None;
        }
        Some((tag, &rest[..len], &rest[len..]))
    }

    const SEQUENCE: u8 = 0x30;
    const SET: u8 = 0x31;
    const OID: u8 = 0x06;
    /// 2.5.4.3 commonName
    const CN: &[u8] = &[0x55, 0x04, 0x03];
    /// 2.5.29.17 subjectAltName
    const SAN: &[u8] = &[0x55, 0x1d, 0x11];

    pub fn tbs_certificate(cert: &[u8]) -> Option<Vec<u8>> {
        let (tag, body, _) = tlv(cert)?;
        if tag != SEQUENCE {
            return None;
        }
        let (tag, tbs, _) = tlv(body)?;
        (tag == SEQUENCE).then(|| tbs.to_vec())
    }

    /// The fields of TBSCertificate after the optional version: serial, signature, issuer,
    /// validity, subject, spki, then optional [1] [2] [3].
    fn fields(tbs: &[u8]) -> Vec<(u8, &[u8])> {
        let mut out = Vec::new();
        let mut rest = tbs;
        while let Some((tag, content, r)) = tlv(rest) {
            out.push((tag, content));
            rest = r;
        }
        if out.first().is_some_and(|(t, _)| *t == 0xa0) {
            out.remove(0);
        }
        out
    }

    fn string(tag: u8, content: &[u8]) -> Option<String> {
        match tag {
            // UTF8String, PrintableString, IA5String, TeletexString (as Latin-1-ish ASCII)
            0x0c | 0x13 | 0x16 | 0x14 => std::str::from_utf8(content).ok().map(str::to_string),
            // BMPString (UTF-16BE)
            0x1e => {
                let units: Vec<u16> = content
                    .chunks_exact(2)
                    .map(|c| u16::from_be_bytes([c[0], c[1]]))
                    .collect();
                String::from_utf16(&units).ok()
            }
            _ => None,
        }
    }

    pub fn subject_cn(tbs: &[u8]) -> Option<String> {
        let fields = fields(tbs);
        let &(tag, subject) = fields.get(4)?;
        if tag != SEQUENCE {
            return None;
        }
        let mut rdns = subject;
        while let Some((tag, set, r)) = tlv(rdns) {
            rdns = r;
            if tag != SET {
                continue;
            }
            let mut atvs = set;
            while let Some((_, atv, r)) = tlv(atvs) {
                atvs = r;
                let Some((OID, oid, value)) = tlv(atv) else {
                    continue;
                };
                if oid == CN {
                    let (vtag, v, _) = tlv(value)?;
                    return string(vtag, v).filter(|s| !s.is_empty());
                }
            }
        }
        None
    }

    pub fn first_san(tbs: &[u8]) -> Option<String> {
        let fields = fields(tbs);
        let (_, exts) = fields.iter().find(|(t, _)| *t == 0xa3)?;
        let (SEQUENCE, mut list, _) = tlv(exts)? else {
            return None;
        };
        while let Some((_, ext, r)) = tlv(list) {
            list = r;
            let Some((OID, oid, rest)) = tlv(ext) else {
                continue;
            };
            if oid != SAN {
                continue;
            }
            // Optional BOOLEAN critical, then OCTET STRING wrapping GeneralNames.
            let (mut tag, mut value, after) = tlv(rest)?;
            if tag == 0x01 {
                (tag, value, _) = tlv(after)?;
            }
            if tag != 0x04 {
                return None;
            }
            let (SEQUENCE, mut names, _) = tlv(value)? else {
                return None;
            };
            while let Some((tag, name, r)) = tlv(names) {
                names = r;
                // [1] rfc822Name, [2] dNSName (IA5String, implicit).
                if tag == 0x81 || tag == 0x82 {
                    return std::str::from_utf8(name)
                        .ok()
                        .filter(|s| !s.is_empty())
                        .map(str::to_string);
                }
            }
            return None;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_der_is_rejected_without_panicking() {
        for bad in [
            &[][..],
            &[0x30],
            &[0x30, 0x85, 1, 1, 1, 1, 1],
            &[0x30, 0x02, 0x30],
        ] {
            assert_eq!(certificate_name(bad), None);
        }
    }

    #[test]
    fn name_is_cn_else_first_san() {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(vec!["dev.example".to_string()]).expect("p");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "alice");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Holdfast");
        let cert = params.self_signed(&key).expect("cert");
        assert_eq!(certificate_name(cert.der()).as_deref(), Some("alice"));

        let mut params = rcgen::CertificateParams::new(vec!["dev.example".to_string()]).expect("p");
        params.distinguished_name = rcgen::DistinguishedName::new();
        let cert = params.self_signed(&key).expect("cert");
        assert_eq!(certificate_name(cert.der()).as_deref(), Some("dev.example"));
    }
}
