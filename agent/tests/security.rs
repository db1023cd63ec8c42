//! The certificate rows of the security matrix, on both transports: a client without a
//! certificate, client certificates that are expired, not yet valid or not meant for client use,
//! and a sink whose own certificate has expired. Each is refused during the TLS handshake with a
//! message on the agent's side that says what to fix and a log line on the sink's side, nothing
//! is written, and the sink goes on serving a well-behaved agent. (The other rows live beside
//! the code they test: another CA, `--allow` escapes and second names in refusals.rs, the control
//! API's admins in metrics.rs, slow handshakes, stream floods and oversized frames in the sink's
//! attacks.rs, slow clients in its limits.rs; the README's Security section lists them all.)

mod common;

use std::path::Path;
use std::sync::Arc;

use blockship_bench::image::{self, Profile};
use blockship_proto::{version, Body};
use blockship_transport::{ClientOptions, FrameReader, FrameWriter, QuicTuning, TlsFiles, Transport};
use common::*;
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose};

const DISK: u64 = 8 << 20;

/// What is wrong with a certificate the test issues from the lab's CA.
#[derive(Clone, Copy)]
enum Flaw {
    Expired,
    NotYetValid,
    /// A server certificate (extended key usage serverAuth) presented as a client's.
    ServerUse,
}

/// Issue `NAME.pem`/`NAME.key` into `dir`, signed by the CA of `pki`, with `flaw`.
fn issue(
    pki: &Path,
    dir: &Path,
    name: &str,
    sans: &[&str],
    flaw: Flaw,
    usage: ExtendedKeyUsagePurpose,
) -> TlsFiles {
    let ca_cert = std::fs::read_to_string(pki.join("ca.pem")).unwrap();
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(pki.join("ca.key")).unwrap()).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&ca_cert, ca_key).unwrap();
    let mut p = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![usage];
    (p.not_before, p.not_after) = match flaw {
        Flaw::Expired => (rcgen::date_time_ymd(2020, 1, 1), rcgen::date_time_ymd(2021, 1, 1)),
        Flaw::NotYetValid => (rcgen::date_time_ymd(2090, 1, 1), rcgen::date_time_ymd(2091, 1, 1)),
        Flaw::ServerUse => (rcgen::date_time_ymd(2020, 1, 1), rcgen::date_time_ymd(2090, 1, 1)),
    };
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &issuer).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let files = TlsFiles {
        ca: pki.join("ca.pem"),
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    };
    std::fs::write(&files.cert, cert.pem()).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();
    files
}

/// `blockship-agent sync` of a small image with explicit TLS files; its output.
fn sync_with(lab: &Lab, sink: &Sink, files: &TlsFiles, target: &str) -> std::process::Output {
    let src = lab.path("src.img");
    if !src.exists() {
        image::generate(&src, DISK, Profile::Mixed, 1).unwrap();
    }
    std::process::Command::new(bin("blockship-agent"))
        .args(["sync", "--sink", &sink.addr, "--transport", &lab.transport, "--no-progress"])
        .args(["--target", target, "--idle-timeout", "5s"])
        .arg("--source")
        .arg(&src)
        .arg("--ca")
        .arg(&files.ca)
        .arg("--cert")
        .arg(&files.cert)
        .arg("--key")
        .arg(&files.key)
        .output()
        .unwrap()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The sink's log, once it holds `what` (a client may learn of a refusal before the sink logs it).
fn sink_logged(lab: &Lab, what: &str) -> String {
    wait_until(std::time::Duration::from_secs(5), || lab.sink_log().contains(what));
    lab.sink_log()
}

fn client_certificates_out_of_date_or_for_the_wrong_use_are_refused(transport: &str) {
    let lab = Lab::over(&["esx01"], transport);
    let sink = lab.sink(&["esx01=file:*"], &[]);
    let rows = [
        (Flaw::Expired, &["certificate expired"][..], "expired or not yet valid"),
        (Flaw::NotYetValid, &["certificate not valid yet"][..], "expired or not yet valid"),
        (
            Flaw::ServerUse,
            &["extended key usage", "InvalidPurpose"][..],
            "not meant for client authentication",
        ),
    ];
    let usage = |flaw| match flaw {
        Flaw::ServerUse => ExtendedKeyUsagePurpose::ServerAuth,
        _ => ExtendedKeyUsagePurpose::ClientAuth,
    };
    for (i, (flaw, sink_says, agent_says)) in rows.into_iter().enumerate() {
        let files = issue(&lab.pki(), &lab.path(&format!("bad{i}")), "esx01", &["esx01"], flaw, usage(flaw));
        let out = sync_with(&lab, &sink, &files, &format!("file:bad{i}"));
        assert!(!out.status.success(), "row {i}: a flawed certificate was accepted");
        assert!(stderr(&out).contains(agent_says), "row {i}: {}", stderr(&out));
        let log = sink_logged(&lab, sink_says[0]);
        assert!(
            log.contains("handshake failed") && sink_says.iter().any(|w| log.contains(w)),
            "row {i}: the sink's log does not say {sink_says:?}: {log}"
        );
        assert!(!lab.target(&format!("bad{i}")).exists(), "row {i}: a refused agent wrote");
    }
    // The sink still serves the agent's real certificate.
    let good = TlsFiles::agent_in_pki(&lab.pki(), "esx01");
    let out = sync_with(&lab, &sink, &good, "file:good");
    assert!(out.status.success(), "{}\n{}", stderr(&out), lab.sink_log());
    assert!(same_file(&lab.path("src.img"), &lab.target("good")), "the good copy differs");
}

fn a_sink_with_an_expired_certificate_is_refused(transport: &str) {
    let lab = Lab::over(&["esx01"], transport);
    let pki = lab.pki();
    // The sink's certificate replaced by an expired one for the same names, from the same CA.
    let expired = issue(
        &pki,
        &lab.path("expired"),
        "blockship-sink",
        &["localhost", "127.0.0.1"],
        Flaw::Expired,
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    std::fs::copy(&expired.cert, pki.join("sink.pem")).unwrap();
    std::fs::copy(&expired.key, pki.join("sink.key")).unwrap();
    let sink = lab.sink(&["esx01=file:*"], &[]);
    let out = sync_with(&lab, &sink, &TlsFiles::agent_in_pki(&pki, "esx01"), "file:vm");
    assert!(!out.status.success(), "an expired sink certificate was trusted");
    assert!(stderr(&out).contains("the sink's certificate is expired or not yet valid"), "{}", stderr(&out));
    assert!(!lab.target("vm").exists());
}

/// A raw client with no certificate at all (the agent always sends one).
fn a_client_without_a_certificate_is_refused(transport: &str) {
    let lab = Lab::over(&["esx01"], transport);
    let sink = lab.sink(&["esx01=file:*"], &[]);
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for c in rustls::pki_types::CertificateDer::pem_file_iter(lab.pki().join("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let mut config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![blockship_transport::ALPN.to_vec()];
    let opts = ClientOptions {
        transport: transport.parse::<Transport>().unwrap(),
        tuning: QuicTuning::default(),
        server_name: None,
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let err = rt
        .block_on(async {
            let conn = blockship_transport::conn::connect(config, &sink.addr, &opts).await?;
            // Over QUIC the client finishes its side of the handshake before the sink has
            // judged the certificate: the refusal arrives on first use.
            let (send, recv) = conn.open_bi().await?;
            let (mut w, mut r) = (FrameWriter::new(send), FrameReader::new(recv));
            w.send(&Body::Hello(version::hello("no-cert"))).await?;
            r.next_body("HelloReply").await
        })
        .expect_err("a client without a certificate got a session");
    let explained = blockship_agent::link::explain(&sink.addr, err).to_string();
    assert!(explained.contains("the sink requires a client certificate"), "{explained}");
    let log = sink_logged(&lab, "handshake failed");
    assert!(log.contains("handshake failed"), "{log}");
    assert!(!lab.path("state/targets").exists());
}

each_transport!(
    client_certificates_out_of_date_or_for_the_wrong_use_are_refused,
    a_sink_with_an_expired_certificate_is_refused,
    a_client_without_a_certificate_is_refused
);
