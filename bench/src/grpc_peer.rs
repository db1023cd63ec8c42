//! The gRPC transport's ceiling: a bare bulk transfer through tonic with exactly Blockship's gRPC
//! settings (the same `Replication` service and `WireFrame` messages, mutual TLS, HTTP/2 windows,
//! frame and message limits), moving bytes from memory to nowhere — no session, disk, hashing or
//! compression. Each stream is one `Data` call carrying 1 MiB payloads, as the agent's chunks do.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use blockship_proto::pb::{DataEnd, WireFrame};
use blockship_transport::grpc::service::replication_client::ReplicationClient;
use blockship_transport::grpc::service::replication_server::{Replication, ReplicationServer};
use blockship_transport::grpc::{GrpcTuning, MAX_MESSAGE};
use blockship_transport::tcp_tls::{channel, tls_incoming, H2};
use blockship_transport::{tls, QuicTuning, TlsFiles};
use bytes::Bytes;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// Counts what `Data` calls carry; has no control stream.
struct Discard;

#[tonic::async_trait]
impl Replication for Discard {
    type ControlStream = ReceiverStream<Result<WireFrame, Status>>;

    async fn control(
        &self,
        _req: Request<Streaming<WireFrame>>,
    ) -> Result<Response<Self::ControlStream>, Status> {
        Err(Status::unimplemented("the bare peer takes data calls only"))
    }

    async fn data(&self, req: Request<Streaming<WireFrame>>) -> Result<Response<DataEnd>, Status> {
        let mut frames = req.into_inner();
        while let Some(f) = frames.message().await? {
            std::hint::black_box(f.payload.len() + f.header.len());
        }
        Ok(Response::new(DataEnd {}))
    }
}

/// Serve `Data` calls until stopped (SIGTERM); the bench reads the process's CPU time.
pub async fn serve(listen: SocketAddr, pki: &Path) -> Result<()> {
    let mut tls = tls::server_config(&TlsFiles::sink_in_pki(pki))?;
    tls.alpn_protocols = vec![H2.to_vec()];
    let tuning = GrpcTuning::from_quic(&QuicTuning::default());
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("listening on {}", listener.local_addr()?);
    tonic::transport::Server::builder()
        .initial_stream_window_size(tuning.stream_window)
        .initial_connection_window_size(tuning.connection_window)
        .max_frame_size(Some(1 << 20))
        .tcp_nodelay(true)
        .add_service(
            ReplicationServer::new(Discard)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .serve_with_incoming(tls_incoming(listener, tls, Default::default()))
        .await
        .context("gRPC server")
}

/// Send `bytes` over `streams` concurrent `Data` calls to a `serve`r; print the throughput.
pub async fn send(addr: &str, pki: &Path, bytes: u64, streams: usize) -> Result<()> {
    let tls = tls::client_config(&TlsFiles::agent_in_pki(pki, "bench"))?;
    let tuning = GrpcTuning::from_quic(&QuicTuning::default());
    let ch = channel(tls, addr, None, &tuning).await?;
    let client = ReplicationClient::new(ch.channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let chunk = Bytes::from(vec![0x5au8; 1 << 20]);
    let started = Instant::now();
    let per = bytes / streams as u64;
    let mut tasks = Vec::new();
    for i in 0..streams {
        let mine = if i == streams - 1 { bytes - per * (streams as u64 - 1) } else { per };
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let chunk = chunk.clone();
        tokio::spawn(async move {
            let mut left = mine;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                if tx.send(WireFrame { header: Bytes::new(), payload: chunk.slice(..n) }).await.is_err() {
                    break;
                }
                left -= n as u64;
            }
        });
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move { client.data(ReceiverStream::new(rx)).await }));
    }
    for t in tasks {
        t.await?.map_err(|s| anyhow::anyhow!("data call: {s}"))?;
    }
    let secs = started.elapsed().as_secs_f64();
    println!("{{\"bytes\":{bytes},\"seconds\":{secs}}}");
    Ok(())
}
