//! TLS for the upstream connection: a rustls client configuration (ring provider) from the
//! bridge's CA file and/or the system's CA store, with an optional client certificate.
//! With `server_name`, the upstream's certificate is verified against that name instead of
//! the host in `address` (same verifier, another name), whichever client connects.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio_rustls::rustls;

use super::config::BridgeConfig;

/// Why a bridge's TLS client configuration cannot be built; messages name the bridge or
/// the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("{}: cannot read certificates: {source}", path.display())]
    ReadCerts {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{}: no certificate in the file", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: unusable CA certificate: {source}", path.display())]
    BadCa {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("{}: cannot read the private key: {source}", path.display())]
    ReadKey {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("bridge {bridge}: no CA certificates to verify the upstream with (set ca_file or system_roots)")]
    NoRoots { bridge: String },
    #[error("bridge {bridge}: server_name `{name}`: {reason}")]
    ServerName {
        bridge: String,
        name: String,
        reason: String,
    },
    #[error("bridge {bridge}: {what}: {reason}")]
    Setup {
        bridge: String,
        what: &'static str,
        reason: String,
    },
}

/// Builds the client configuration; errors name the bridge and the file.
pub fn client_config(cfg: &BridgeConfig) -> Result<Arc<rustls::ClientConfig>, TlsSetupError> {
    let setup = |what: &'static str, reason: String| TlsSetupError::Setup {
        bridge: cfg.name.clone(),
        what,
        reason,
    };
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = &cfg.ca_file {
        for cert in read_certs(ca)? {
            roots.add(cert).map_err(|source| TlsSetupError::BadCa {
                path: ca.clone(),
                source,
            })?;
        }
    }
    if cfg.system_roots.unwrap_or(cfg.ca_file.is_none()) {
        let found = rustls_native_certs::load_native_certs();
        for cert in found.certs {
            let _ = roots.add(cert);
        }
    }
    if roots.is_empty() {
        return Err(TlsSetupError::NoRoots {
            bridge: cfg.name.clone(),
        });
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| setup("TLS setup", e.to_string()))?;
    let builder = match &cfg.server_name {
        None => versions.with_root_certificates(roots),
        Some(name) => {
            let name =
                ServerName::try_from(name.clone()).map_err(|e| TlsSetupError::ServerName {
                    bridge: cfg.name.clone(),
                    name: name.clone(),
                    reason: e.to_string(),
                })?;
            let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| setup("TLS setup", e.to_string()))?;
            versions
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(FixedName { inner, name }))
        }
    };
    let config = match (&cfg.cert_file, &cfg.key_file) {
        (Some(cert), Some(key)) => {
            let chain = read_certs(cert)?;
            let key =
                PrivateKeyDer::from_pem_file(key).map_err(|source| TlsSetupError::ReadKey {
                    path: key.clone(),
                    source,
                })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| setup("client certificate", e.to_string()))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let read = |source| TlsSetupError::ReadCerts {
        path: path.to_path_buf(),
        source,
    };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(read)?
        .collect::<Result<_, _>>()
        .map_err(read)?;
    if certs.is_empty() {
        return Err(TlsSetupError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The standard WebPKI verification, against the configured `server_name` rather than the
/// name the connection was opened with.
#[derive(Debug)]
struct FixedName {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for FixedName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
