//! A manual benchmark of this client's reads against `nbdcopy` (ignored by default).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;

/// Read throughput of this client against `nbdcopy URI null:` on a 2 GiB random raw file
/// (BLOCKSHIP_BENCH_FILE reuses an existing one):
/// `cargo test --release -p blockship-agent nbd::tests::throughput -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn throughput_vs_nbdcopy() {
    if !have(&["qemu-nbd", "nbdcopy"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = match std::env::var_os("BLOCKSHIP_BENCH_FILE") {
        Some(f) => PathBuf::from(f),
        None => {
            use std::io::Write;
            let img = dir.path().join("bench.raw");
            let mut f = std::io::BufWriter::new(std::fs::File::create(&img).unwrap());
            for i in 0..128 {
                f.write_all(&random_bytes(16 << 20, i + 1)).unwrap();
            }
            img
        }
    };
    let args = ["--read-only", "--format=raw", img.to_str().unwrap()];
    for via in [Via::Unix, Via::Tcp] {
        let srv = qemu_nbd(dir.path(), via, &args);
        let size = connect(&srv.uri, &[]).await.size();
        let mb_s = |t: Duration| format!("{:5.0} MB/s", size as f64 / t.as_secs_f64() / 1e6);
        for round in 0..3 {
            // (connections, requests in flight per connection, request size)
            for (conns, depth, piece) in [(1, 16u64, 2u64 << 20), (1, 64, 256 << 10), (4, 16, 256 << 10)] {
                let mut clients = Vec::new();
                for _ in 0..conns {
                    clients.push(Arc::new(connect(&srv.uri, &[]).await));
                }
                let started = Instant::now();
                let workers: Vec<_> = (0..conns * depth)
                    .map(|w| {
                        let c = clients[(w % conns) as usize].clone();
                        tokio::spawn(async move {
                            let mut off = w * piece;
                            while off < size {
                                std::hint::black_box(c.read(off, piece as usize).await.unwrap());
                                off += conns * depth * piece;
                            }
                        })
                    })
                    .collect();
                for w in workers {
                    w.await.unwrap();
                }
                let t = started.elapsed();
                for c in clients {
                    c.disconnect().await.unwrap();
                }
                println!(
                    "{via:?} {round}: blockship {conns} conn x {depth} x {} KiB: {}",
                    piece >> 10,
                    mb_s(t)
                );
            }
            for conns in ["1", "4"] {
                let started = Instant::now();
                run("nbdcopy", &["--connections", conns, &srv.uri, "null:"]);
                println!(
                    "{via:?} {round}: nbdcopy {conns} conn (64 x 256 KiB each): {}",
                    mb_s(started.elapsed())
                );
            }
        }
    }
}
