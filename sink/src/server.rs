//! The sink server: a QUIC endpoint with mutual TLS that hands each agent connection to a
//! session, sharing the authorisation rules, target roots, state directory and target leases.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use blockship_transport::{quic, tls, QuicTuning, TlsFiles, TransportError};

use crate::auth::Authorizer;
use crate::lease::Leases;
use crate::target::TargetRoots;
use crate::writer::CheckpointPolicy;

/// Everything sessions share.
pub struct SinkContext {
    pub roots: TargetRoots,
    pub state_root: PathBuf,
    pub auth: Authorizer,
    pub leases: Arc<Leases>,
    pub checkpoint: CheckpointPolicy,
    /// A session that shows no progress for this long is dropped (and its leases released).
    pub idle_timeout: std::time::Duration,
    /// Keep an undo journal per file target so a failed epoch can be rolled back.
    pub file_rollback: bool,
}

pub struct Server {
    endpoint: quinn::Endpoint,
    ctx: Arc<SinkContext>,
}

impl Server {
    pub fn bind(
        listen: SocketAddr,
        tls_files: &TlsFiles,
        tuning: &QuicTuning,
        ctx: SinkContext,
    ) -> Result<Self, TransportError> {
        let tls = tls::server_config(tls_files)?;
        let endpoint = quic::server_endpoint(listen, tls, tuning)?;
        Ok(Server { endpoint, ctx: Arc::new(ctx) })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Accept connections until the endpoint is closed.
    pub async fn run(self) {
        while let Some(incoming) = self.endpoint.accept().await {
            tokio::spawn(crate::session::handle(self.ctx.clone(), incoming));
        }
    }
}
