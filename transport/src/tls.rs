//! Mutual TLS: both sides present certificates from one CA (TLS 1.3 only). The sink refuses
//! clients without a certificate or with one from another CA, and takes the agent's identity
//! from the certificate (subject CN, else the first DNS subject alternative name) — never from
//! anything the agent says.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;

/// Why TLS material could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} from {path}: {source}")]
    Pem { what: &'static str, path: PathBuf, source: rustls::pki_types::pem::Error },
    #[error("{path} holds no certificate")]
    NoCert { path: PathBuf },
    #[error("CA certificate in {path} is not usable: {source}")]
    BadCa { path: PathBuf, source: rustls::Error },
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("peer presented no client certificate")]
    NoPeerCert,
    #[error("cannot parse the peer certificate: {0}")]
    BadPeerCert(String),
    #[error("peer certificate names no identity (no subject CN and no DNS subject alternative name)")]
    NoIdentity,
}

/// Where a side's CA, certificate and key are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// An agent's files in a directory written by `blockship-sink pki init`.
    pub fn agent_in_pki(pki: &Path, name: &str) -> Self {
        TlsFiles {
            ca: pki.join("ca.pem"),
            cert: pki.join("agents").join(format!("{name}.pem")),
            key: pki.join("agents").join(format!("{name}.key")),
        }
    }

    /// The sink's files in a directory written by `blockship-sink pki init`.
    pub fn sink_in_pki(pki: &Path) -> Self {
        TlsFiles { ca: pki.join("ca.pem"), cert: pki.join("sink.pem"), key: pki.join("sink.key") }
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, TlsError> {
        let mut roots = RootCertStore::empty();
        for cert in certs(&self.ca, "CA certificate")? {
            roots.add(cert).map_err(|source| TlsError::BadCa { path: self.ca.clone(), source })?;
        }
        Ok(Arc::new(roots))
    }

    fn chain_and_key(&self) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
        let chain = certs(&self.cert, "certificate")?;
        let key = PrivateKeyDer::from_pem_file(&self.key).map_err(|source| TlsError::Pem {
            what: "private key",
            path: self.key.clone(),
            source,
        })?;
        Ok((chain, key))
    }
}

fn certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Pem { what, path: path.to_path_buf(), source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCert { path: path.to_path_buf() });
    }
    Ok(certs)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Server side: present the sink certificate, require a client certificate signed by the CA.
pub fn server_config(files: &TlsFiles) -> Result<rustls::ServerConfig, TlsError> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(files.roots()?, provider())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let (chain, key) = files.chain_and_key()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(format!("sink certificate/key {}: {e}", files.cert.display())))?;
    config.alpn_protocols = vec![crate::ALPN.to_vec()];
    Ok(config)
}

/// The client side of mutual TLS, as `client_config` builds it (callers pass it to `connect`).
pub use rustls::ClientConfig;

/// Client side: trust only the CA, present the agent certificate.
pub fn client_config(files: &TlsFiles) -> Result<rustls::ClientConfig, TlsError> {
    let (chain, key) = files.chain_and_key()?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(files.roots()?)
        .with_client_auth_cert(chain, key)
        .map_err(|e| TlsError::Config(format!("agent certificate/key {}: {e}", files.cert.display())))?;
    config.alpn_protocols = vec![crate::ALPN.to_vec()];
    Ok(config)
}

/// Identity named by a DER certificate: subject CN, else the first DNS subject alternative name.
pub fn cert_identity(der: &[u8]) -> Result<String, TlsError> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| TlsError::BadPeerCert(e.to_string()))?;
    if let Some(cn) = cert.subject().iter_common_name().next() {
        let cn = cn.as_str().map_err(|e| TlsError::BadPeerCert(e.to_string()))?;
        if !cn.is_empty() {
            return Ok(cn.to_string());
        }
    }
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(dns) = name {
                return Ok(dns.to_string());
            }
        }
    }
    Err(TlsError::NoIdentity)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_prefers_common_name() {
        let mut params = rcgen::CertificateParams::new(vec!["dns-name".to_string()]).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, "esx01");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(cert_identity(cert.der()).unwrap(), "esx01");
    }

    #[test]
    fn identity_falls_back_to_dns_san() {
        let mut params = rcgen::CertificateParams::new(vec!["esx02.lab".to_string()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(cert_identity(cert.der()).unwrap(), "esx02.lab");
    }

    #[test]
    fn missing_files_name_the_path() {
        let files = TlsFiles::agent_in_pki(Path::new("/nonexistent/pki"), "a1");
        let err = client_config(&files).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/pki/agents/a1.pem"), "{err}");
    }
}
