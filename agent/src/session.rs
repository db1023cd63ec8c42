//! The agent's side of the protocol: connect with mutual TLS, negotiate the version, and the
//! request/reply exchanges on the control stream (open disk, fetch the hash index, begin and
//! commit epochs). Data streams are driven by the pipeline; acks are read by the sync task.

use std::sync::Arc;
use std::time::Duration;

use blockship_proto::pb::{self, DiskOpened, HelloReply, OpenDisk};
use blockship_proto::{version, Body, HASH_LEN};
use blockship_transport::framed::unexpected;
use blockship_transport::{quic, tls, FrameReader, FrameWriter, QuicTuning, TlsFiles, TransportError};

use crate::AgentError;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Session {
    pub endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
    /// The control stream's writer, shared by requests and progress heartbeats.
    pub writer: Arc<tokio::sync::Mutex<FrameWriter>>,
    pub reader: FrameReader<quinn::RecvStream>,
    pub hello: HelloReply,
    pub sink: String,
}

/// Explain a connection failure in terms of what the operator can fix.
pub fn explain(sink: &str, e: TransportError) -> AgentError {
    let text = e.to_string();
    let by_peer = text.contains("by peer");
    let hint = if by_peer && text.contains("cryptographic handshake failed") {
        Some("the sink rejected our certificate: is it signed by the CA the sink trusts, and still valid?")
    } else if text.contains("UnknownIssuer") || text.contains("invalid peer certificate") {
        Some(
            "the sink's certificate is not signed by our --ca (or does not name the host; see --server-name)",
        )
    } else if text.contains("certificate required") || text.contains("CertificateRequired") {
        Some("the sink requires a client certificate")
    } else if text.contains("unknown ca")
        || text.contains("UnknownCa")
        || text.contains("bad certificate")
        || text.contains("BadCertificate")
        || text.contains("fatal alert")
    {
        Some("the sink rejected our certificate: is it signed by the CA the sink trusts?")
    } else if text.contains("timed out") {
        Some("no answer: is the sink running and is its UDP port reachable?")
    } else {
        None
    };
    match (e, hint) {
        (TransportError::Connection(quinn::ConnectionError::ApplicationClosed(c)), _) => {
            AgentError::Closed(String::from_utf8_lossy(&c.reason).into_owned())
        }
        (TransportError::Remote { code, message }, _) => AgentError::Refused { code, message },
        (e, Some(h)) => AgentError::Connect { sink: sink.to_string(), reason: format!("{e} ({h})") },
        (e, None) => AgentError::Connect { sink: sink.to_string(), reason: e.to_string() },
    }
}

/// Map a transport error during a session: the sink's stated reason wins over a broken pipe.
pub fn transport(e: TransportError) -> AgentError {
    match e {
        TransportError::Remote { code, message } => AgentError::Refused { code, message },
        TransportError::Connection(quinn::ConnectionError::ApplicationClosed(c))
        | TransportError::Write(quinn::WriteError::ConnectionLost(
            quinn::ConnectionError::ApplicationClosed(c),
        ))
        | TransportError::Read(quinn::ReadError::ConnectionLost(
            quinn::ConnectionError::ApplicationClosed(c),
        )) => AgentError::Closed(String::from_utf8_lossy(&c.reason).into_owned()),
        other => AgentError::Transport(other),
    }
}

impl Session {
    pub async fn connect(
        sink: &str,
        tls_files: &TlsFiles,
        server_name: Option<&str>,
        tuning: &QuicTuning,
    ) -> Result<Session, AgentError> {
        let tls = tls::client_config(tls_files).map_err(|e| AgentError::Tls(e.to_string()))?;
        let (endpoint, conn) =
            tokio::time::timeout(CONNECT_TIMEOUT, quic::connect(tls, tuning, sink, server_name))
                .await
                .map_err(|_| AgentError::Connect {
                    sink: sink.to_string(),
                    reason: format!(
                "no answer within {CONNECT_TIMEOUT:?} (is the sink running and its UDP port reachable?)"
            ),
                })?
                .map_err(|e| explain(sink, e))?;
        // With TLS 1.3 the sink judges our certificate after our side of the handshake is done,
        // so a refusal shows up as a closed connection: report the close reason, not the pipe.
        let why = |e: TransportError| match conn.close_reason() {
            Some(reason) => explain(sink, reason.into()),
            None => explain(sink, e),
        };
        let (send, recv) = conn.open_bi().await.map_err(|e| why(e.into()))?;
        let mut writer = FrameWriter::new(send);
        let mut reader = FrameReader::new(recv);
        let software = format!("blockship-agent {}", env!("CARGO_PKG_VERSION"));
        writer.send(&Body::Hello(version::hello(&software))).await.map_err(why)?;
        let hello = match reader.next_body("HelloReply").await.map_err(why)? {
            Body::HelloReply(r) => r,
            other => return Err(transport(unexpected("HelloReply", &other))),
        };
        tracing::info!(sink, version = hello.version, identity = %hello.identity, peer = %hello.software, "connected");
        let writer = Arc::new(tokio::sync::Mutex::new(writer));
        Ok(Session { endpoint, conn, writer, reader, hello, sink: sink.to_string() })
    }

    /// The sink's reason, if it closed the connection: it says more than the broken stream
    /// (`connection lost`) that surfaced `e` in the first place.
    pub fn reason(&self, e: AgentError) -> AgentError {
        match (self.conn.close_reason(), e) {
            (_, e @ (AgentError::Refused { .. } | AgentError::Closed(_))) => e,
            (Some(quinn::ConnectionError::ApplicationClosed(c)), _) => {
                AgentError::Closed(String::from_utf8_lossy(&c.reason).into_owned())
            }
            (Some(quinn::ConnectionError::TimedOut), _) => AgentError::Closed(
                "the sink stopped answering (no packet within --idle-timeout): is it still running?".into(),
            ),
            (_, e) => e,
        }
    }

    /// Send one frame on the control stream.
    pub async fn send(&self, body: &Body) -> Result<(), AgentError> {
        self.writer.lock().await.send(body).await.map_err(transport)
    }

    /// How often to tell the sink the epoch progresses while no data flows: a third of the
    /// sink's idle timeout (it drops sessions that show no progress for that long).
    pub fn heartbeat(&self) -> Duration {
        let ms = if self.hello.idle_timeout_ms == 0 { 30_000 } else { self.hello.idle_timeout_ms };
        (Duration::from_millis(u64::from(ms)) / 3).clamp(Duration::from_millis(200), Duration::from_secs(10))
    }

    async fn request(&mut self, body: Body, waiting_for: &'static str) -> Result<Body, AgentError> {
        self.send(&body).await?;
        self.reader.next_body(waiting_for).await.map_err(transport)
    }

    pub async fn open_disk(&mut self, req: OpenDisk) -> Result<DiskOpened, AgentError> {
        match self.request(Body::OpenDisk(req), "DiskOpened").await? {
            Body::DiskOpened(d) => Ok(d),
            other => Err(transport(unexpected("DiskOpened", &other))),
        }
    }

    /// The target's hash index, one entry per chunk.
    pub async fn fetch_index(&mut self, disk: u32, chunks: u64) -> Result<Vec<[u8; HASH_LEN]>, AgentError> {
        self.send(&Body::IndexRequest(pb::IndexRequest { disk })).await?;
        let mut index = Vec::with_capacity(chunks as usize);
        loop {
            let list = self.next_hash_list().await?;
            if list.first_chunk != index.len() as u64 || list.hashes.len() % HASH_LEN != 0 {
                return Err(AgentError::Protocol(format!(
                    "index frame for chunk {} with {} bytes, expected chunk {}",
                    list.first_chunk,
                    list.hashes.len(),
                    index.len()
                )));
            }
            index.extend(
                list.hashes
                    .chunks_exact(HASH_LEN)
                    .map(|h| <[u8; HASH_LEN]>::try_from(h).expect("exact chunk")),
            );
            if list.last {
                break;
            }
        }
        if index.len() as u64 != chunks {
            return Err(AgentError::Protocol(format!(
                "index has {} entries, expected {chunks}",
                index.len()
            )));
        }
        Ok(index)
    }

    pub async fn next_hash_list(&mut self) -> Result<pb::HashList, AgentError> {
        match self.reader.next_body("HashList").await.map_err(transport)? {
            Body::HashList(l) => Ok(l),
            other => Err(transport(unexpected("HashList", &other))),
        }
    }

    pub async fn begin_epoch(&mut self, req: pb::EpochBegin) -> Result<(), AgentError> {
        match self.request(Body::EpochBegin(req), "EpochStarted").await? {
            Body::EpochStarted(_) => Ok(()),
            other => Err(transport(unexpected("EpochStarted", &other))),
        }
    }

    /// Close the connection and give the CONNECTION_CLOSE a moment to leave. Waiting for the
    /// whole draining period (three probe timeouts, ~80 ms even on loopback) would add to every
    /// epoch; everything the sink must know is already durable and acknowledged, and a lost
    /// close only leaves the sink to time the connection out.
    pub async fn close(self) {
        let Session { endpoint, conn, writer, .. } = self;
        writer.lock().await.close();
        conn.close(0u32.into(), b"done");
        let _ = tokio::time::timeout(Duration::from_millis(20), endpoint.wait_idle()).await;
    }
}
