//! The transport's ceiling: a bare bulk transfer over one QUIC connection with exactly
//! Blockship's transport settings (same crate, TLS, windows, MTU, GSO), moving bytes from memory
//! to nowhere — no disk, no hashing, no compression.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use blockship_transport::{quic, tls, QuicTuning, TlsFiles};
use bytes::Bytes;

/// Accept one connection, read every unidirectional stream to its end, print the byte count.
pub async fn serve(listen: SocketAddr, pki: &Path) -> Result<()> {
    let files = TlsFiles::sink_in_pki(pki);
    let tls = tls::server_config(&files)?;
    let seed = std::fs::read(&files.key)?;
    let endpoint = quic::server_endpoint(listen, tls, &QuicTuning::default(), &seed)?;
    println!("listening on {}", endpoint.local_addr()?);
    let conn = endpoint.accept().await.context("endpoint closed")?.await?;
    let mut tasks = Vec::new();
    while let Ok(mut recv) = conn.accept_uni().await {
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while let Ok(Some(chunk)) = recv.read_chunk(1 << 20, false).await {
                n += chunk.bytes.len() as u64;
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await?;
    }
    println!("received {total} bytes");
    Ok(())
}

/// Send `bytes` over `streams` streams to a `serve`r; print the throughput.
pub async fn send(addr: &str, pki: &Path, bytes: u64, streams: usize) -> Result<()> {
    let tls = tls::client_config(&TlsFiles::agent_in_pki(pki, "bench"))?;
    let (endpoint, conn) = quic::connect(tls, &QuicTuning::default(), addr, None).await?;
    let chunk = Bytes::from(vec![0x5au8; 1 << 20]);
    let started = Instant::now();
    let per = bytes / streams as u64;
    let mut tasks = Vec::new();
    for i in 0..streams {
        let mut s = conn.open_uni().await?;
        let chunk = chunk.clone();
        let mine = if i == streams - 1 { bytes - per * (streams as u64 - 1) } else { per };
        tasks.push(tokio::spawn(async move {
            let mut left = mine;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                s.write_chunk(chunk.slice(..n)).await?;
                left -= n as u64;
            }
            s.finish()?;
            let _ = s.stopped().await;
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    println!("{{\"bytes\":{bytes},\"seconds\":{secs}}}");
    Ok(())
}
