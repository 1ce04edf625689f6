//! TLS termination with rustls from PEM files.

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_rustls::TlsAcceptor;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("server.tls_cert: cannot read certificates from {path}: {message}")]
    Cert { path: PathBuf, message: String },
    #[error("server.tls_key: cannot read a private key from {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("server.tls_cert/tls_key: {0}")]
    Mismatch(String),
}

/// Builds an acceptor offering h2 and http/1.1 by ALPN.
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Cert { path: cert.to_path_buf(), message: e.to_string() })?;
    if chain.is_empty() {
        return Err(TlsError::Cert { path: cert.to_path_buf(), message: "no PEM certificate found".into() });
    }
    // The key's contents never reach the message: only the file name and what kind of problem it was.
    let private_key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| TlsError::Key { path: key.to_path_buf(), message: e.to_string() })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Mismatch(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, private_key)
        .map_err(|e| TlsError::Mismatch(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
