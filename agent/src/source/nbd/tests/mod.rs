//! The client against real servers (qemu-nbd, nbdkit, over Unix sockets and TCP): handshakes,
//! reads checked against the file, block sizes, allocation, dirty bitmaps, server errors and a
//! disconnect with reads in flight. Malformed replies come from a scripted server (`malformed`).

mod malformed;
mod throughput;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;

use super::*;

/// Whether the NBD tools are here; missing tools fail the test when BLOCKSHIP_REQUIRE_NBD is set.
fn have(tools: &[&str]) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| !std::env::split_paths(&path).any(|d| d.join(t).is_file()))
        .collect();
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var_os("BLOCKSHIP_REQUIRE_NBD").is_none(),
        "BLOCKSHIP_REQUIRE_NBD is set but {missing:?} missing"
    );
    eprintln!("skipping: {missing:?} not installed (apt-get install qemu-utils nbdkit)");
    false
}

#[derive(Clone, Copy, Debug)]
enum Via {
    Unix,
    Tcp,
}

/// A server process, killed when the test ends however it ends.
struct Server {
    child: Child,
    uri: String,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

impl Server {
    /// `program` serving over `via`; `listen` turns a socket path or a port into arguments.
    fn start(dir: &Path, program: &str, via: Via, export: &str, args: &[&str]) -> Server {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let pid = dir.join(format!("{program}-{n}.pid"));
        let log = dir.join(format!("{program}-{n}.log"));
        let mut cmd = Command::new(program);
        let uri = match (program, via) {
            ("qemu-nbd", _) => {
                cmd.args(["--persistent", "--shared=32", "-x", export])
                    .arg(format!("--pid-file={}", pid.display()));
                listen(&mut cmd, dir, n, via, ("--socket=", "--bind=", "--port="), export)
            }
            _ => {
                cmd.args(["-f", "--exit-with-parent", "-P"]).arg(&pid);
                listen(&mut cmd, dir, n, via, ("--unix=", "--ipaddr=", "--port="), export)
            }
        };
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::null());
        cmd.stderr(std::fs::File::create(&log).unwrap());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        // Both servers write their pid file once they accept connections.
        while !std::fs::metadata(&pid).is_ok_and(|m| m.len() > 0) {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "{program} exited with {status}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "{program} did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        Server { child, uri, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

fn listen(
    cmd: &mut Command,
    dir: &Path,
    n: usize,
    via: Via,
    flags: (&str, &str, &str),
    export: &str,
) -> String {
    match via {
        Via::Unix => {
            let sock = dir.join(format!("s{n}.sock"));
            cmd.arg(format!("{}{}", flags.0, sock.display()));
            format!("nbd+unix:///{export}?socket={}", sock.display())
        }
        Via::Tcp => {
            // An ephemeral port picked by the kernel; the tiny window until the server binds
            // it again is acceptable in tests.
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            cmd.arg(format!("{}127.0.0.1", flags.1)).arg(format!("{}{port}", flags.2));
            format!("nbd://127.0.0.1:{port}/{export}")
        }
    }
}

fn qemu_nbd(dir: &Path, via: Via, args: &[&str]) -> Server {
    Server::start(dir, "qemu-nbd", via, "test", args)
}

fn nbdkit(dir: &Path, via: Via, args: &[&str]) -> Server {
    Server::start(dir, "nbdkit", via, "", args)
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn random_bytes(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

async fn connect(uri: &str, contexts: &[&str]) -> NbdClient {
    NbdClient::connect(&NbdUri::parse(uri).unwrap(), contexts).await.unwrap()
}

fn tcp(host: &str, port: u16, export: &str) -> NbdUri {
    NbdUri { addr: NbdAddr::Tcp { host: host.into(), port }, export: export.into() }
}

#[test]
fn uri_parsing() {
    let ok = |s: &str| NbdUri::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
    assert_eq!(ok("nbd://example.com:1234/disk"), tcp("example.com", 1234, "disk"));
    assert_eq!(ok("nbd://example.com/disk"), tcp("example.com", 10809, "disk"));
    assert_eq!(ok("nbd://example.com/"), tcp("example.com", 10809, ""));
    assert_eq!(ok("nbd://example.com"), tcp("example.com", 10809, ""));
    assert_eq!(ok("nbd://example.com//disk"), tcp("example.com", 10809, "/disk"));
    assert_eq!(ok("NBD://h/hello%20world"), tcp("h", 10809, "hello world"));
    assert_eq!(ok("nbd://[::1]:99/x"), tcp("::1", 99, "x"));
    assert_eq!(ok("nbd://[fe80::1]/x"), tcp("fe80::1", 10809, "x"));
    let unix = ok("nbd+unix:///vm?socket=/run/qsd%20x.sock");
    assert_eq!(unix, NbdUri { addr: NbdAddr::Unix("/run/qsd x.sock".into()), export: "vm".into() });
    assert_eq!(unix.disk_id(), "nbd+unix:///vm");
    assert_eq!(unix.to_string(), "nbd+unix:///vm?socket=/run/qsd x.sock");
    assert_eq!(ok("nbd+unix:///?socket=s").export, "");
    assert_eq!(ok("nbd://[::1]:99/x").to_string(), "nbd://[::1]:99/x");
    assert_eq!(ok("nbd://h/e").disk_id(), "nbd://h:10809/e");

    for (bad, why) in [
        ("/dev/sda", "expected nbd://"),
        ("file:///x", "unknown scheme"),
        ("nbds://h/x", "TLS"),
        ("nbds+unix:///x?socket=s", "TLS"),
        ("nbd+unix:///x", "missing ?socket"),
        ("nbd+unix:///x?socket=", "empty socket"),
        ("nbd+unix://host/x?socket=s", "no host"),
        ("nbd+unix:///x?socket=a&socket=b", "twice"),
        ("nbd+unix:///x?socket=%00abs", "abstract"),
        ("nbd://h/x?socket=s", "unsupported query parameter \"socket\""),
        ("nbd://h/x?tls-type=x509", "unsupported query parameter"),
        ("nbd://h:0/x", "bad port"),
        ("nbd://h:99999/x", "bad port"),
        ("nbd://h:ab/x", "bad port"),
        ("nbd://:10809/x", "missing host"),
        ("nbd:///x", "missing host"),
        ("nbd://::1/x", "brackets"),
        ("nbd://[::1/x", "unclosed"),
        ("nbd://user@h/x", "user info"),
        ("nbd://h/x#frag", "fragment"),
        ("nbd://h/x%zz", "percent"),
        ("nbd://h/x%ff", "percent"),
        (&format!("nbd://h/{}", "x".repeat(4097)), "longer than 4096"),
    ] {
        let err = NbdUri::parse(bad).expect_err(bad).to_string();
        assert!(err.contains(why) && err.contains(bad), "{bad}: {err}");
    }
}

#[tokio::test]
async fn handshake_and_reads_match_the_file() {
    if !have(&["qemu-nbd"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    // Not a multiple of 512: qemu-nbd rounds the export up to 512 bytes, the tail reads as zeros.
    let mut data = random_bytes((48 << 20) + 1000, 1);
    std::fs::write(&img, &data).unwrap();
    data.resize((48 << 20) + 1024, 0);
    let size = data.len() as u64;
    for via in [Via::Unix, Via::Tcp] {
        let srv = qemu_nbd(dir.path(), via, &["--read-only", "--format=raw", img.to_str().unwrap()]);
        let c = connect(&srv.uri, &[BASE_ALLOCATION]).await;
        let info = c.info();
        assert_eq!(c.size(), size, "{via:?}");
        assert!(info.structured_replies && c.has_context(BASE_ALLOCATION), "{info:?}");
        assert_eq!(info.max_block, 32 << 20, "{info:?}");
        let cases: &[(u64, usize)] = &[
            (0, 4096),
            (1, 100),
            (12345, 1 << 20),
            (3, (40 << 20) + 5), // more than the server's maximum request: split
            (size - 100, 100),
            (size - (33 << 20) - 7, (33 << 20) + 7), // split, the last piece at the end
            (size - 1, 1),
            (0, size as usize),
        ];
        for &(off, len) in cases {
            let got = c.read(off, len).await.unwrap();
            assert!(got[..] == data[off as usize..off as usize + len], "{via:?}: read {len} at {off}");
        }
        assert!(c.read(size, 0).await.unwrap().is_empty());
        let err = c.read(size - 10, 11).await.unwrap_err();
        assert!(matches!(err, NbdError::OutOfRange { .. }), "{err}");
        // Past the end on the wire: the server's error, and the connection lives on.
        let err = c.read_request(size - 10, BytesMut::zeroed(4096)).await.unwrap_err();
        assert!(matches!(err, NbdError::Server { errno: 22, command: "read", .. }), "{err}");
        assert!(err.to_string().contains("EINVAL"), "{err}");
        let err = c.block_status(BASE_ALLOCATION, size - 10, 11).await.unwrap_err();
        assert!(matches!(err, NbdError::OutOfRange { .. }), "{err}");
        assert_eq!(c.read(5, 5).await.unwrap()[..], data[5..10]);
        // The padding is reported as a zero hole.
        let map = c.block_status(BASE_ALLOCATION, 0, size).await.unwrap();
        assert_eq!(map, vec![(size - 24, 0), (24, STATE_ZERO | 1)]);
        c.disconnect().await.unwrap();
        assert!(matches!(c.read(0, 1).await, Err(NbdError::Closed)));
        c.disconnect().await.unwrap();
    }
}

#[tokio::test]
async fn many_concurrent_reads() {
    if !have(&["qemu-nbd"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let data = Arc::new(random_bytes(64 << 20, 2));
    std::fs::write(&img, &data[..]).unwrap();
    let srv = qemu_nbd(dir.path(), Via::Unix, &["--read-only", "--format=raw", img.to_str().unwrap()]);
    let c = Arc::new(connect(&srv.uri, &[]).await);
    let mut tasks = Vec::new();
    for i in 0..200u64 {
        let (c, data) = (c.clone(), data.clone());
        tasks.push(tokio::spawn(async move {
            let r = random_bytes(16, i + 100);
            let off = u64::from_le_bytes(r[..8].try_into().unwrap()) % (60 << 20);
            let len = (u64::from_le_bytes(r[8..].try_into().unwrap()) % (4 << 20)) as usize + 1;
            let got = c.read(off, len).await.unwrap();
            assert!(got[..] == data[off as usize..off as usize + len], "read {len} at {off}");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    c.disconnect().await.unwrap();
}

#[tokio::test]
async fn block_size_constraints_are_obeyed() {
    if !have(&["nbdkit"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The server refuses unaligned and oversized requests outright.
    let policy = ["blocksize-minimum=512", "blocksize-maximum=65536", "blocksize-error-policy=error"];
    let mut args = vec!["--filter=blocksize-policy", "pattern", "size=8M"];
    args.extend(policy);
    let srv = nbdkit(dir.path(), Via::Tcp, &args);
    let c = connect(&srv.uri, &[]).await;
    assert_eq!((c.info().min_block, c.info().max_block), (512, 65536));
    let pattern = |off: u64, len: usize| -> Vec<u8> {
        (off..off + len as u64).map(|i| (i & !7).to_be_bytes()[(i & 7) as usize]).collect()
    };
    for (off, len) in [(0u64, 512usize), (1000, 200_000), (3, 1 << 20), ((8 << 20) - 513, 513)] {
        assert_eq!(c.read(off, len).await.unwrap()[..], pattern(off, len)[..], "read {len} at {off}");
    }
    let err = c.read_request(100, BytesMut::zeroed(100)).await.unwrap_err();
    assert!(matches!(err, NbdError::Server { errno: 22, .. }), "{err}");
    c.disconnect().await.unwrap();
}

#[tokio::test]
async fn allocation_of_a_sparse_file() {
    if !have(&["qemu-nbd"]) {
        return;
    }
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("sparse.raw");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(64 << 20).unwrap();
    let written = [(8u64 << 20, 65536usize), (40 << 20 | 4096, 4096), (60 << 20, 8192)];
    for &(off, len) in &written {
        f.write_all_at(&random_bytes(len, off), off).unwrap();
    }
    // Zeros written as data stay allocated: base:allocation reports storage, not content.
    f.write_all_at(&[0u8; 65536], 20 << 20).unwrap();
    f.sync_all().unwrap();
    let srv = qemu_nbd(dir.path(), Via::Unix, &["--read-only", "--format=raw", img.to_str().unwrap()]);
    let s = NbdSource::connect(&srv.uri, None).await.unwrap();
    let mut expected: Vec<Extent> = written.iter().map(|&(o, l)| Extent::new(o, l as u64)).collect();
    expected.push(Extent::new(20 << 20, 65536));
    assert_eq!(s.allocated().await.unwrap(), normalize(expected));
    let hole = s.read((30 << 20) + 1, 70_000).await.unwrap();
    assert!(hole.iter().all(|&b| b == 0));
    assert_eq!(s.read(60 << 20, 8192).await.unwrap()[..], random_bytes(8192, 60 << 20)[..]);
    assert!(s.disk_id().starts_with("nbd+unix:///test") && !s.disk_id().contains("sock"), "{}", s.disk_id());
    s.disconnect().await.unwrap();

    // The same through nbdkit, whose file plugin maps holes too.
    let srv = nbdkit(dir.path(), Via::Unix, &["--readonly", "file", img.to_str().unwrap()]);
    let s = NbdSource::connect(&srv.uri, None).await.unwrap();
    let ext = s.allocated().await.unwrap();
    assert!(crate::extents::total(&ext) < 1 << 20, "{ext:?}");
    for &(off, len) in &written {
        assert!(ext.iter().any(|e| e.offset <= off && e.end() >= off + len as u64), "{off}: {ext:?}");
    }
    s.disconnect().await.unwrap();
}

/// A qcow2 image with a baseline, then `cbt0` enabled and the writes it must record.
fn image_with_bitmap(dir: &Path) -> PathBuf {
    let img = dir.join("disk.qcow2");
    let p = img.to_str().unwrap();
    run("qemu-img", &["create", "-q", "-f", "qcow2", p, "64M"]);
    run("qemu-io", &["-f", "qcow2", "-c", "write -q -P 0xaa 0 1M", p]);
    run("qemu-img", &["bitmap", "--add", "--enable", p, "cbt0"]);
    let writes = ["write -q -P 0x11 4M 4k", "write -q -P 0x22 10M 128k", "write -q -P 0x33 20M 1M"];
    for w in writes.iter().chain(&["write -q -z 40M 64k", "write -q -P 0x44 30000000 1000"]) {
        run("qemu-io", &["-f", "qcow2", "-c", w, p]);
    }
    img
}

#[tokio::test]
async fn dirty_bitmap_of_a_qcow2_image() {
    if !have(&["qemu-nbd", "qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image_with_bitmap(dir.path());
    let args = ["--read-only", "--format=qcow2", "--bitmap=cbt0", img.to_str().unwrap()];
    let srv = qemu_nbd(dir.path(), Via::Tcp, &args);
    let s = NbdSource::connect(&srv.uri, Some("cbt0")).await.unwrap();
    const G: u64 = 64 << 10; // the bitmap's granularity
    let expected = vec![
        Extent::new(4 << 20, G),
        Extent::new(10 << 20, 128 << 10),
        Extent::new(20 << 20, 1 << 20),
        Extent::new(30_000_000 / G * G, G), // 1000 bytes at 30000000 lie in one granule
        Extent::new(40 << 20, G),           // write-zeroes counts as a change
    ];
    assert_eq!(s.dirty("cbt0").await.unwrap(), expected);
    assert!(matches!(s.dirty("other").await, Err(NbdError::ContextUnavailable { .. })));
    // The zeroed range reads as zeros and base:allocation says so.
    let alloc = s.allocated().await.unwrap();
    assert!(!alloc.iter().any(|e| e.offset < (40 << 20) + G && e.end() > 40 << 20), "{alloc:?}");
    assert!(alloc.iter().any(|e| e.offset <= 10 << 20 && e.end() >= (10 << 20) + (128 << 10)), "{alloc:?}");
    assert!(s.read(4 << 20, 4096).await.unwrap().iter().all(|&b| b == 0x11));
    assert!(s.read(30_000_000, 1000).await.unwrap().iter().all(|&b| b == 0x44));
    s.disconnect().await.unwrap();
}

#[tokio::test]
async fn missing_bitmap_is_context_unavailable() {
    if !have(&["qemu-nbd", "qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image_with_bitmap(dir.path());
    let exported =
        qemu_nbd(dir.path(), Via::Unix, &["-r", "-f", "qcow2", "-B", "cbt0", img.to_str().unwrap()]);
    let plain = qemu_nbd(dir.path(), Via::Unix, &["-r", "-f", "qcow2", img.to_str().unwrap()]);
    for (srv, bitmap) in [(&exported, "nope"), (&plain, "cbt0")] {
        let err = NbdSource::connect(&srv.uri, Some(bitmap)).await.err().unwrap();
        let NbdError::ContextUnavailable { name } = &err else { panic!("{err}") };
        assert_eq!(name, &format!("qemu:dirty-bitmap:{bitmap}"));
        assert!(err.to_string().contains("full or compare resync"), "{err}");
    }
    // Without a bitmap the export still serves data and allocation.
    let s = NbdSource::connect(&plain.uri, None).await.unwrap();
    assert!(matches!(s.dirty("cbt0").await, Err(NbdError::ContextUnavailable { .. })));
    assert!(!s.allocated().await.unwrap().is_empty());
    s.disconnect().await.unwrap();
    let err = NbdSource::connect(&plain.uri.replace("///test", "///nope"), None).await.err().unwrap();
    assert!(matches!(&err, NbdError::UnknownExport { export, .. } if export == "nope"), "{err}");
}

#[tokio::test]
async fn in_use_bitmap_is_refused() {
    if !have(&["qemu-nbd", "qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image_with_bitmap(dir.path());
    let p = img.to_str().unwrap();
    // A writer that dies without closing the image leaves its enabled bitmaps marked in-use.
    let mut writer = qemu_nbd(dir.path(), Via::Unix, &["--format=qcow2", p]);
    let c = connect(&writer.uri, &[]).await;
    c.disconnect().await.unwrap();
    run("qemu-io", &["-f", "raw", "-c", "write -q -P 0x55 50M 64k", &writer.uri]);
    writer.child.kill().unwrap(); // SIGKILL
    writer.wait_exit(Duration::from_secs(5)).unwrap();
    let info = Command::new("qemu-img").args(["info", p]).output().unwrap();
    assert!(String::from_utf8_lossy(&info.stdout).contains("in-use"), "{info:?}");

    // qemu-nbd refuses to export it at all ...
    let sock = dir.path().join("refused.sock");
    let out = Command::new("qemu-nbd")
        .args(["-r", "-f", "qcow2", "-B", "cbt0", "-x", "test"])
        .arg(format!("--socket={}", sock.display()))
        .arg(p)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("inconsistent"), "{stderr}");
    let uri = format!("nbd+unix:///test?socket={}", sock.display());
    let err = NbdSource::connect(&uri, Some("cbt0")).await.err().unwrap();
    assert!(matches!(err, NbdError::Connect { .. }) && err.to_string().contains("refused.sock"), "{err}");
    // ... and exported without it, the bitmap context is simply not there.
    let srv = qemu_nbd(dir.path(), Via::Unix, &["-r", "-f", "qcow2", p]);
    let err = NbdSource::connect(&srv.uri, Some("cbt0")).await.err().unwrap();
    assert!(matches!(err, NbdError::ContextUnavailable { .. }), "{err}");
}

#[tokio::test]
async fn server_errors_are_errors() {
    if !have(&["nbdkit"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let args = ["--filter=error", "pattern", "size=64M", "error=EIO", "error-pread-rate=100%"];
    let srv = nbdkit(dir.path(), Via::Unix, &args);
    let s = NbdSource::connect(&srv.uri, None).await.unwrap();
    for len in [4096, 3 << 20, 40 << 20] {
        let err = s.read(4096, len).await.unwrap_err();
        assert!(matches!(err, NbdError::Server { errno: 5, command: "read", .. }), "{err}");
        assert!(err.to_string().contains("EIO"), "{err}");
    }
    // Block status is not a read: still fine.
    assert_eq!(s.allocated().await.unwrap(), vec![Extent::new(0, 64 << 20)]);
    s.disconnect().await.unwrap();

    // A server that insists on TLS says so during the handshake.
    let psk = dir.path().join("psk");
    std::fs::write(&psk, format!("agent:{}\n", "ab".repeat(32))).unwrap();
    let tls = format!("--tls-psk={}", psk.display());
    let srv = nbdkit(dir.path(), Via::Unix, &["--tls=require", &tls, "memory", "1M"]);
    let err = NbdSource::connect(&srv.uri, None).await.err().unwrap();
    assert!(matches!(err, NbdError::Refused { .. }) && err.to_string().contains("requires TLS"), "{err}");
}

#[tokio::test]
async fn disconnect_waits_for_reads_in_flight() {
    if !have(&["nbdkit"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let data = Arc::new(random_bytes(16 << 20, 3));
    std::fs::write(&img, &data[..]).unwrap();
    // exitlast: nbdkit exits when its last client leaves, so its exit status tells whether it
    // survived (1.32's file plugin aborts when a client leaves with reads in flight, and an
    // early NBD_CMD_DISC makes it drop them).
    let file = format!("file={}", img.display());
    let args = ["--filter=exitlast", "--filter=delay", "file", &file, "rdelay=300ms"];
    let mut srv = nbdkit(dir.path(), Via::Unix, &args);
    let c = Arc::new(connect(&srv.uri, &[]).await);
    let reads: Vec<_> = (0..8u64)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move { c.read(i << 20, 1 << 20).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    c.disconnect().await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(200), "disconnect did not wait for the reads");
    for (i, r) in reads.into_iter().enumerate() {
        assert!(r.await.unwrap().unwrap()[..] == data[i << 20..(i + 1) << 20], "read {i}");
    }
    assert!(matches!(c.read(0, 1).await, Err(NbdError::Closed)));
    let status = srv.wait_exit(Duration::from_secs(10)).expect("nbdkit did not exit after the disconnect");
    assert!(status.success(), "nbdkit: {status}: {}", srv.log());
}
