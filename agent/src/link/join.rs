//! Further connections of a link (`--connections N`). One connection is driven by one task on
//! each side (quinn's connection driver, or one HTTP/2 connection), so a disk's data crosses on
//! about one core per side however many streams it has. A link therefore dials N-1 more
//! connections that join the first one's session with its token (`Hello.join`): they carry
//! data streams only, from the same queue, and the sink treats their items as the session's.
//! `auto` opens one connection per two usable cores (one for the connection's driver, one for
//! the hashing and compression it feeds), at most 8, and over gRPC at least 2: even where both
//! sides share two cores a second connection made gRPC 13–31 % faster, while QUIC gained
//! nothing on loopback and lost link utilisation on a 500 Mbit/s link (two congestion
//! controllers competing; measured, docs/performance.md). With `auto` a sink that refuses a joined
//! connection (its connection caps) leaves the link with those it has, with a warning; a number
//! asked for explicitly fails the link instead. A joined connection that is lost ends the
//! session: the items it carried can never arrive, so nobody may wait for them.

use std::net::SocketAddr;
use std::time::Duration;

use blockship_proto::pb::{ErrorCode, Hello, HelloReply};
use blockship_proto::{version, Body, Frame};
use blockship_transport::conn::RecvStream;
use blockship_transport::framed::unexpected;
use blockship_transport::{
    ClientOptions, Closed, Connection, FrameReader, FrameWriter, Transport, TransportError,
};
use bytes::Bytes;
use serde::Deserialize;
use tokio::task::JoinHandle;

use super::{explain, transport, LinkConfig};
use crate::AgentError;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The most connections a link opens (the sink lets a session have 16).
pub const MAX_CONNECTIONS: usize = 16;

/// How many connections a link opens: `auto` or a number (1..=16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(try_from = "Raw")]
pub enum Connections {
    #[default]
    Auto,
    Fixed(usize),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Raw {
    Number(usize),
    Text(String),
}

impl TryFrom<Raw> for Connections {
    type Error = String;
    fn try_from(r: Raw) -> Result<Self, String> {
        match r {
            Raw::Number(n) => Connections::checked(n),
            Raw::Text(t) => t.parse(),
        }
    }
}

impl std::str::FromStr for Connections {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Connections::Auto),
            n => Connections::checked(
                n.parse().map_err(|_| format!("--connections {n:?}: use auto or a number"))?,
            ),
        }
    }
}

impl Connections {
    fn checked(n: usize) -> Result<Self, String> {
        if (1..=MAX_CONNECTIONS).contains(&n) {
            Ok(Connections::Fixed(n))
        } else {
            Err(format!("--connections {n}: must be auto or between 1 and {MAX_CONNECTIONS}"))
        }
    }

    /// The number to open over `transport` on a host with `cores` usable cores.
    pub fn count(self, cores: usize, transport: Transport) -> usize {
        // gRPC gains from a second connection even on one or two cores; QUIC does not, and on
        // a paced link two QUIC connections compete (each with its own congestion control).
        let least = if transport == Transport::Grpc { 2 } else { 1 };
        match self {
            Connections::Auto => (cores / 2).clamp(least, 8),
            Connections::Fixed(n) => n,
        }
    }
}

/// Dial the sink (mutual TLS) within the connect timeout, explaining a failure. Joined
/// connections dial `at`, the first one's address, so that a name resolving to several sinks
/// (round-robin DNS, a load balancer) cannot send them to another sink; the certificate is
/// still checked against the name the operator gave.
pub(super) async fn dial(
    cfg: &LinkConfig,
    tls: blockship_transport::tls::ClientConfig,
    at: Option<SocketAddr>,
) -> Result<Connection, AgentError> {
    let named = blockship_transport::quic::split_host_port(&cfg.sink).ok().map(|(host, _)| host);
    let opts = ClientOptions {
        transport: cfg.transport,
        tuning: cfg.tuning.clone(),
        server_name: cfg.server_name.clone().or_else(|| at.and(named)),
    };
    let sink = cfg.sink.as_str();
    let target = at.map_or_else(|| sink.to_string(), |a| a.to_string());
    tokio::time::timeout(CONNECT_TIMEOUT, blockship_transport::conn::connect(tls, &target, &opts))
        .await
        .map_err(|_| AgentError::Connect {
            sink: sink.to_string(),
            reason: format!(
                "no answer within {CONNECT_TIMEOUT:?} over {} (is the sink running and its {} port reachable?)",
                cfg.transport,
                if cfg.transport == Transport::Quic { "UDP" } else { "TCP" }
            ),
        })?
        .map_err(|e| explain(sink, e))
}

/// Say Hello on a new connection's control stream (joining the session of `join` if it is not
/// empty) and read the sink's answer: the control stream and the reply.
pub(super) async fn hello(
    sink: &str,
    conn: &Connection,
    join: Bytes,
) -> Result<(FrameWriter, FrameReader<RecvStream>, HelloReply), AgentError> {
    // With TLS 1.3 the sink judges our certificate after our side of the handshake is done, so
    // a refusal shows up as a closed connection: report the close reason, not the pipe.
    let why = |e: TransportError| match conn.close_reason() {
        Some(reason) => explain(sink, TransportError::Closed(reason)),
        None => explain(sink, e),
    };
    let (send, recv) = conn.open_bi().await.map_err(why)?;
    let (mut w, mut r) = (FrameWriter::new(send), FrameReader::new(recv));
    let software = format!("blockship-agent {}", env!("CARGO_PKG_VERSION"));
    w.send(&Body::Hello(Hello { join, ..version::hello(&software) })).await.map_err(why)?;
    match r.next_body("HelloReply").await.map_err(why)? {
        Body::HelloReply(reply) => Ok((w, r, reply)),
        other => Err(transport(unexpected("HelloReply", &other))),
    }
}

/// Open `n` connections that join the session of `token` on `first` (with `best_effort`, as
/// many as the sink takes). They are dialled at once, not one after another: each costs a
/// handshake round trip, which on a WAN link would otherwise add up before the first byte.
/// Each keeps its control stream open in a task (returned) that ends the session if the
/// connection is lost.
pub(super) async fn join(
    cfg: &LinkConfig,
    tls: &blockship_transport::tls::ClientConfig,
    first: &Connection,
    token: &Bytes,
    n: usize,
    best_effort: bool,
) -> Result<(Vec<Connection>, Vec<JoinHandle<()>>), AgentError> {
    let dials = (0..n).map(|_| join_one(cfg, tls, first, token));
    let (mut joined, mut refused) = (Vec::with_capacity(n), None);
    for (k, result) in futures::future::join_all(dials).await.into_iter().enumerate() {
        match result {
            Ok(pair) => joined.push(pair),
            // The first refusal is the one reported; the others say the same.
            Err(e) => {
                refused.get_or_insert((k, e));
            }
        }
    }
    let Some((k, e)) = refused else {
        return Ok(joined.into_iter().unzip());
    };
    if best_effort {
        let using = joined.len() + 1;
        tracing::warn!(sink = %cfg.sink, "using {using} connection(s): the sink refused another one: {e}");
        return Ok(joined.into_iter().unzip());
    }
    for (c, t) in &joined {
        t.abort();
        c.close(0, b"done");
    }
    Err(AgentError::Connect {
        sink: cfg.sink.clone(),
        reason: format!("joining connection {} of {}: {e} (lower --connections)", k + 2, n + 1),
    })
}

async fn join_one(
    cfg: &LinkConfig,
    tls: &blockship_transport::tls::ClientConfig,
    first: &Connection,
    token: &Bytes,
) -> Result<(Connection, JoinHandle<()>), AgentError> {
    let conn = dial(cfg, tls.clone(), Some(first.remote())).await?;
    let (w, mut r, _) = hello(&cfg.sink, &conn, token.clone()).await?;
    let (sink, first, this) = (cfg.sink.clone(), first.clone(), conn.clone());
    let task = tokio::spawn(async move {
        // The writer lives as long as the task: finishing the control stream would end the
        // joined connection.
        let _w = w;
        let why = match r.next().await {
            Ok(Some(Frame { body: Body::Error(e), .. })) => e.message,
            Ok(_) => "its control stream ended".to_string(),
            Err(e) => e.to_string(),
        };
        // Closed on purpose (our close, or the sink ending the session): nothing to do.
        if matches!(this.close_reason(), Some(Closed::Application { code: 0, .. })) {
            return;
        }
        // Items it carried can never reach the sink: end the session, so that every waiter
        // learns it now instead of waiting for an ack that cannot come.
        tracing::warn!(%sink, "a joined connection was lost ({why}): ending the session");
        let reason = format!("a joined connection was lost: {why}");
        first.close(ErrorCode::Unspecified as i32 as u32, reason.as_bytes());
    });
    Ok((conn, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_parse_and_resolve() {
        assert_eq!("auto".parse::<Connections>(), Ok(Connections::Auto));
        assert_eq!("3".parse::<Connections>(), Ok(Connections::Fixed(3)));
        assert!("0".parse::<Connections>().unwrap_err().contains("between 1 and 16"));
        assert!("17".parse::<Connections>().is_err());
        assert!("many".parse::<Connections>().unwrap_err().contains("auto or a number"));
        // One per two cores, at most eight; at least two over gRPC, one over QUIC.
        let (q, g) = (Transport::Quic, Transport::Grpc);
        assert_eq!((Connections::Auto.count(1, q), Connections::Auto.count(1, g)), (1, 2));
        assert_eq!((Connections::Auto.count(2, q), Connections::Auto.count(2, g)), (1, 2));
        assert_eq!((Connections::Auto.count(8, q), Connections::Auto.count(8, g)), (4, 4));
        assert_eq!(Connections::Auto.count(64, q), 8);
        assert_eq!(Connections::Fixed(5).count(2, q), 5);
        #[derive(Deserialize)]
        struct T {
            c: Connections,
        }
        assert_eq!(toml::from_str::<T>("c = 4").unwrap().c, Connections::Fixed(4));
        assert_eq!(toml::from_str::<T>("c = \"auto\"").unwrap().c, Connections::Auto);
        assert!(toml::from_str::<T>("c = 40").is_err());
    }
}
