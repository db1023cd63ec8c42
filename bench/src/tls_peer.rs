//! The floor of a TLS transport over TCP: one TLS 1.3 connection (rustls with Blockship's own
//! mutual-TLS configuration, so the same AES-256-GCM records and certificates) carrying bytes
//! from memory to nowhere in 1 MiB writes — what any TCP-based tool with real security pays
//! before it does anything with the data. Beside bare tonic it shows what HTTP/2 and gRPC add.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use blockship_transport::{tls, TlsFiles};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Accept one connection, read it to its end, print the byte count.
pub async fn serve(listen: SocketAddr, pki: &Path) -> Result<()> {
    let config = tls::server_config(&TlsFiles::sink_in_pki(pki))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("listening on {}", listener.local_addr()?);
    let (tcp, _) = listener.accept().await?;
    tcp.set_nodelay(true)?;
    let mut conn = acceptor.accept(tcp).await.context("TLS handshake")?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = conn.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    println!("received {total} bytes");
    Ok(())
}

/// Send `bytes` to a `serve`r at `addr` (IP:PORT) as the bench agent; print the throughput.
pub async fn send(addr: &str, pki: &Path, bytes: u64) -> Result<()> {
    let config = tls::client_config(&TlsFiles::agent_in_pki(pki, "bench"))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let remote: SocketAddr = addr.parse().with_context(|| format!("{addr}: not IP:PORT"))?;
    let tcp = tokio::net::TcpStream::connect(remote).await?;
    tcp.set_nodelay(true)?;
    let name = rustls_pki_types::ServerName::from(remote.ip());
    let mut conn = connector.connect(name, tcp).await.context("TLS handshake")?;
    let chunk = vec![0x5au8; 1 << 20];
    let started = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        conn.write_all(&chunk[..n]).await?;
        left -= n as u64;
    }
    conn.shutdown().await?;
    let secs = started.elapsed().as_secs_f64();
    println!("{{\"bytes\":{bytes},\"seconds\":{secs}}}");
    Ok(())
}
