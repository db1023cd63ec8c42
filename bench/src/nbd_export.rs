//! The NBD peers' server: a read-only `qemu-nbd` TCP export of an image on 127.0.0.1, as a
//! hypervisor's NBD server would serve it, in plain text or — for a like-for-like comparison with
//! Blockship's mutual TLS — with x509 TLS that requires a client certificate (`nbds://`, the
//! same security: TLS 1.3, AES-256-GCM, both ends authenticated by one CA). The TLS material
//! is made with `openssl` in the layout QEMU and libnbd read (`ca-cert.pem`,
//! `server-cert.pem`/`server-key.pem`, `client-cert.pem`/`client-key.pem` in one directory).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::lab::{free_port, wait_tcp, Bins};
use crate::proc::{self, Server};

pub struct NbdExport {
    pub server: Server,
    /// What `nbdcopy` and the agent open: `nbd://…` or `nbds://…?tls-certificates=DIR`.
    pub uri: String,
}

/// How to export.
#[derive(Default, Clone, Copy)]
pub struct ExportOptions<'a> {
    /// Serve over TLS with the material in this directory (see [`tls_dir`]).
    pub tls: Option<&'a Path>,
    /// Run `qemu-nbd` on this CPU only.
    pub cpu: Option<usize>,
}

/// Export `image` read-only on a free port of 127.0.0.1.
pub fn export(bins: &Bins, image: &str, opts: ExportOptions) -> Result<NbdExport> {
    let qemu_nbd = bins.peer("qemu-nbd")?;
    let port = free_port()?;
    let mut cmd = Command::new(qemu_nbd);
    cmd.args(["-t", "-r", "-f", "raw", "-x", "img", "--shared", "32", "--bind", "127.0.0.1", "--port"])
        .arg(port.to_string());
    if let Some(dir) = opts.tls {
        cmd.arg("--object")
            .arg(format!("tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=on", dir.display()))
            .args(["--tls-creds", "tls0"]);
    }
    cmd.arg(image);
    if let Some(cpu) = opts.cpu {
        proc::pin(&mut cmd, cpu);
    }
    let server = Server::start_detached(&mut cmd)?;
    wait_tcp(port, Duration::from_secs(10))?;
    let uri = match opts.tls {
        Some(dir) => format!("nbds://127.0.0.1:{port}/img?tls-certificates={}", dir.display()),
        None => format!("nbd://127.0.0.1:{port}/img"),
    };
    Ok(NbdExport { server, uri })
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate (ECDSA P-256, as
/// Blockship's `pki init` makes), written once into `dir`.
pub fn tls_dir(dir: &Path) -> Result<PathBuf> {
    if dir.join("client-key.pem").exists() {
        return Ok(dir.to_path_buf());
    }
    std::fs::create_dir_all(dir)?;
    let openssl = |args: &[&str]| -> Result<()> {
        proc::run_ok(Command::new("openssl").current_dir(dir).args(args))
            .map(|_| ())
            .context("openssl (Debian's openssl package) is needed for the NBD-TLS peer")
    };
    let key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    openssl(
        &[
            &["req", "-x509"][..],
            &key,
            &["-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-days", "30", "-subj", "/CN=bench-nbd-ca"],
            &[
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        ]
        .concat(),
    )?;
    for (who, ext) in [
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"),
        ("client", "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n"),
    ] {
        let (k, csr, cert, extf) =
            (format!("{who}-key.pem"), format!("{who}.csr"), format!("{who}-cert.pem"), format!("{who}.ext"));
        std::fs::write(dir.join(&extf), ext)?;
        openssl(&[&["req"][..], &key, &["-keyout", &k, "-out", &csr, "-subj", &format!("/CN={who}")]].concat())?;
        openssl(&[
            "x509", "-req", "-in", &csr, "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem", "-CAcreateserial", "-days",
            "30", "-out", &cert, "-extfile", &extf,
        ])?;
    }
    Ok(dir.to_path_buf())
}
