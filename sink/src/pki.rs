//! Lab PKI: `blockship-sink pki init` creates a CA, a sink certificate and one client certificate
//! per agent (ECDSA P-256, via rcgen). An existing CA in the directory is reused, so agents can be
//! added later. Production deployments bring their own CA and point `--ca/--cert/--key` at it.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("bad agent name {0:?}: use letters, digits, '.', '_' and '-' only")]
    BadName(String),
    #[error("{0} exists; pass --force to replace it")]
    Exists(PathBuf),
    #[error("{cert} exists but {key} does not (or the reverse); fix or remove the pair")]
    HalfPair { cert: PathBuf, key: PathBuf },
}

/// What `pki init` wrote.
#[derive(Debug, Default)]
pub struct PkiReport {
    pub written: Vec<PathBuf>,
    pub reused_ca: bool,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && !name.starts_with('.')
}

fn write_file(path: &Path, body: &str, mode: u32) -> Result<(), PkiError> {
    let io = |source| PkiError::Io { path: path.to_path_buf(), source };
    let mut f =
        fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(path).map_err(io)?;
    f.write_all(body.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(days);
}

/// Create (or extend) a lab PKI in `dir`.
pub fn init(
    dir: &Path,
    agents: &[String],
    sink_names: &[String],
    force: bool,
) -> Result<PkiReport, PkiError> {
    for a in agents {
        if !valid_name(a) {
            return Err(PkiError::BadName(a.clone()));
        }
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PkiError::Io { path, source }
    };
    fs::create_dir_all(dir.join("agents")).map_err(io(dir))?;
    let mut report = PkiReport::default();

    let (ca_pem, ca_key_pem) = (dir.join("ca.pem"), dir.join("ca.key"));
    let ca_params = || {
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, "Blockship lab CA");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut p, 3650);
        Ok::<_, rcgen::Error>(p)
    };
    let issuer = match (ca_pem.exists(), ca_key_pem.exists()) {
        (true, true) if !force => {
            let key_pem = fs::read_to_string(&ca_key_pem).map_err(io(&ca_key_pem))?;
            let cert_pem = fs::read_to_string(&ca_pem).map_err(io(&ca_pem))?;
            report.reused_ca = true;
            Issuer::from_ca_cert_pem(&cert_pem, KeyPair::from_pem(&key_pem)?)?
        }
        (false, false) | (true, true) => {
            let key = KeyPair::generate()?;
            let params = ca_params()?;
            let cert = params.self_signed(&key)?;
            write_file(&ca_key_pem, &key.serialize_pem(), 0o600)?;
            write_file(&ca_pem, &cert.pem(), 0o644)?;
            report.written.extend([ca_pem.clone(), ca_key_pem.clone()]);
            Issuer::new(params, key)
        }
        _ => return Err(PkiError::HalfPair { cert: ca_pem, key: ca_key_pem }),
    };

    let leaf = |cn: &str,
                sans: Vec<String>,
                usage: ExtendedKeyUsagePurpose,
                cert: PathBuf,
                key_path: PathBuf,
                report: &mut PkiReport| {
        if !force && (cert.exists() || key_path.exists()) {
            return Err(PkiError::Exists(cert));
        }
        let mut p = CertificateParams::new(sans)?;
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![usage];
        validity(&mut p, 825);
        let key = KeyPair::generate()?;
        let c = p.signed_by(&key, &issuer)?;
        write_file(&key_path, &key.serialize_pem(), 0o600)?;
        write_file(&cert, &c.pem(), 0o644)?;
        report.written.extend([cert, key_path]);
        Ok(())
    };

    let (sink_pem, sink_key) = (dir.join("sink.pem"), dir.join("sink.key"));
    if force || !sink_pem.exists() {
        let mut sans: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
        if let Ok(h) = fs::read_to_string("/etc/hostname") {
            let h = h.trim();
            if !h.is_empty() {
                sans.push(h.to_string());
            }
        }
        sans.extend(sink_names.iter().cloned());
        sans.dedup();
        leaf("blockship-sink", sans, ExtendedKeyUsagePurpose::ServerAuth, sink_pem, sink_key, &mut report)?;
    }
    for a in agents {
        let (cert, key) =
            (dir.join("agents").join(format!("{a}.pem")), dir.join("agents").join(format!("{a}.key")));
        leaf(a, vec![a.clone()], ExtendedKeyUsagePurpose::ClientAuth, cert, key, &mut report)?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_documented_layout_and_reuses_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let r = init(dir.path(), &["esx01".into()], &[], false).unwrap();
        assert!(!r.reused_ca);
        for f in ["ca.pem", "ca.key", "sink.pem", "sink.key", "agents/esx01.pem", "agents/esx01.key"] {
            assert!(dir.path().join(f).exists(), "{f}");
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.path().join("agents/esx01.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "private keys must not be group/world readable");
        let ca_before = fs::read(dir.path().join("ca.pem")).unwrap();
        let r = init(dir.path(), &["esx02".into()], &[], false).unwrap();
        assert!(r.reused_ca);
        assert_eq!(fs::read(dir.path().join("ca.pem")).unwrap(), ca_before);
        assert!(matches!(init(dir.path(), &["esx01".into()], &[], false), Err(PkiError::Exists(_))));
        use rustls_pki_types::pem::PemObject;
        let der =
            rustls_pki_types::CertificateDer::from_pem_file(dir.path().join("agents/esx02.pem")).unwrap();
        assert_eq!(blockship_transport::tls::cert_identity(&der).unwrap(), "esx02");
    }

    #[test]
    fn agent_names_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["", "../x", "a/b", ".hidden", "a b"] {
            assert!(
                matches!(init(dir.path(), &[bad.into()], &[], false), Err(PkiError::BadName(_))),
                "{bad:?}"
            );
        }
    }
}
