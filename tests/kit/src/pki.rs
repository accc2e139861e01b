//! Test PKI: a CA made with rcgen, server and client certificates signed by it, and rustls
//! client configurations trusting it (tests/broker/tls.rs, tests/broker/websocket.rs).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsConnector;

pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
    pub key_der: Vec<u8>,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer =
            CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA");
        Ca { issuer }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    pub fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// A leaf certificate; `server` selects the server or client extended key usage.
    pub fn leaf(&self, cn: &str, sans: &[&str], server: bool) -> Leaf {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
            key_der: key.serialize_der(),
        }
    }
}

pub fn server_leaf(ca: &Ca, cn: &str) -> Leaf {
    ca.leaf(cn, &["localhost", "127.0.0.1"], true)
}

/// Writes the server's files and returns (cert, key, client CA) paths.
pub fn write_server_files(dir: &Path, ca: &Ca, leaf: &Leaf) -> (PathBuf, PathBuf, PathBuf) {
    let cert = dir.join("server.crt");
    let key = dir.join("server.key");
    let client_ca = dir.join("clients-ca.crt");
    std::fs::write(&cert, &leaf.cert_pem).expect("write");
    std::fs::write(&key, &leaf.key_pem).expect("write");
    std::fs::write(&client_ca, ca.pem()).expect("write");
    (cert, key, client_ca)
}

/// A rustls client configuration (ring) trusting `ca`, presenting `client` if given.
pub fn client_config(ca: &Ca, client: Option<&Leaf>) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der()).expect("root");
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots);
    match client {
        Some(l) => builder
            .with_client_auth_cert(
                vec![l.der.clone()],
                PrivateKeyDer::try_from(l.key_der.clone()).expect("key"),
            )
            .expect("client cert"),
        None => builder.with_no_client_auth(),
    }
}

pub fn connector(ca: &Ca, client: Option<&Leaf>) -> TlsConnector {
    TlsConnector::from(Arc::new(client_config(ca, client)))
}
