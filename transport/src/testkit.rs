//! Test kit of the QUIC tests: a throwaway PKI, relays that shape a loopback path (delay each
//! datagram, or pace them one by one), and one bulk transfer between a server and a client
//! endpoint across such a path, for the tests that watch what quinn and our controllers do.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::quic::{client_endpoint, server_endpoint, QuicTuning};

/// A throwaway CA, a sink certificate for `localhost` and an agent certificate, as files.
pub fn pki(dir: &std::path::Path) -> (crate::tls::TlsFiles, crate::tls::TlsFiles) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    std::fs::write(dir.join("ca.pem"), ca.self_signed(&ca_key).unwrap().pem()).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    for name in ["sink", "agent"] {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_string()]).unwrap().signed_by(&key, &issuer);
        std::fs::write(dir.join(format!("{name}.pem")), cert.unwrap().pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
    let files = |name: &str| crate::tls::TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    };
    (files("sink"), files("agent"))
}

/// Forwards datagrams between one client and `upstream`, each after `delay` (a long path).
async fn delaying_relay(upstream: SocketAddr, delay: Duration) -> SocketAddr {
    let outer = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let inner = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    inner.connect(upstream).await.unwrap();
    let addr = outer.local_addr().unwrap();
    let client = Arc::new(std::sync::Mutex::new(None::<SocketAddr>));
    let (o, i, c) = (outer.clone(), inner.clone(), client.clone());
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = o.recv_from(&mut buf).await {
            *c.lock().unwrap() = Some(from);
            let (i, data) = (i.clone(), buf[..n].to_vec());
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = i.send(&data).await;
            });
        }
    });
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = inner.recv(&mut buf).await {
            let Some(to) = *client.lock().unwrap() else { continue };
            let (o, data) = (outer.clone(), buf[..n].to_vec());
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = o.send_to(&data, to).await;
            });
        }
    });
    addr
}

/// Forwards datagrams from one client to `upstream` one at a time, `gap` apart, and the
/// replies at once: a paced link, on which datagrams arrive one by one. Stops after 1 s
/// without traffic.
fn spacing_relay(upstream: SocketAddr, gap: Duration) -> SocketAddr {
    use std::net::UdpSocket as Std;
    let outer = Std::bind("127.0.0.1:0").unwrap();
    let inner = Std::bind("127.0.0.1:0").unwrap();
    inner.connect(upstream).unwrap();
    let idle = Some(Duration::from_secs(1));
    outer.set_read_timeout(idle).unwrap();
    inner.set_read_timeout(idle).unwrap();
    let addr = outer.local_addr().unwrap();
    let client = Arc::new(std::sync::Mutex::new(None::<SocketAddr>));
    let (o, i, c) = (outer.try_clone().unwrap(), inner.try_clone().unwrap(), client.clone());
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = o.recv_from(&mut buf) {
            *c.lock().unwrap() = Some(from);
            let _ = i.send(&buf[..n]);
            std::thread::sleep(gap);
        }
    });
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = inner.recv(&mut buf) {
            if let Some(to) = *client.lock().unwrap() {
                let _ = outer.send_to(&buf[..n], to);
            }
        }
    });
    addr
}

/// How the client reaches the server.
pub enum Via {
    Direct,
    /// A relay delaying each datagram by this long, each way (a long path).
    Delaying(Duration),
    /// A relay passing the client's datagrams one at a time, this far apart (a paced link).
    Spacing(Duration),
}

/// One stream of bytes on its way from a client to a server endpoint.
pub struct Transfer {
    /// The client's (sending side's) connection.
    pub conn: quinn::Connection,
    /// The server: bytes received and ACK frames sent, once the stream ended.
    receiver: tokio::task::JoinHandle<(usize, u64)>,
    writer: tokio::task::JoinHandle<()>,
    _client: quinn::Endpoint,
    _dir: tempfile::TempDir,
}

impl Transfer {
    /// Whether the server has received the whole stream.
    pub fn is_received(&self) -> bool {
        self.receiver.is_finished()
    }

    /// Waits for the server to receive the whole stream: (bytes received, ACK frames sent).
    pub async fn received(&mut self) -> (usize, u64) {
        (&mut self.writer).await.unwrap();
        (&mut self.receiver).await.unwrap()
    }
}

/// Connects a client to a server endpoint, both with `tuning`, on loopback `via` a relay, and
/// starts sending `bytes` over one stream.
pub async fn transfer(tuning: &QuicTuning, via: Via, bytes: usize) -> Transfer {
    let dir = tempfile::tempdir().unwrap();
    let (sink, agent) = pki(dir.path());
    let tls = crate::tls::server_config(&sink).unwrap();
    let server = server_endpoint("127.0.0.1:0".parse().unwrap(), tls, tuning, b"seed").unwrap();
    let upstream = server.local_addr().unwrap();
    let receiver = tokio::spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        let mut stream = conn.accept_uni().await.unwrap();
        let got = stream.read_to_end(64 << 20).await.unwrap().len();
        let acks = conn.stats().frame_tx.acks;
        conn.close(0u32.into(), b"");
        server.wait_idle().await;
        (got, acks)
    });
    let addr = match via {
        Via::Direct => upstream,
        Via::Delaying(delay) => delaying_relay(upstream, delay).await,
        Via::Spacing(gap) => spacing_relay(upstream, gap),
    };
    let client = client_endpoint(crate::tls::client_config(&agent).unwrap(), tuning, false).unwrap();
    let conn = client.connect(addr, "localhost").unwrap().await.unwrap();
    let mut stream = conn.open_uni().await.unwrap();
    let writer = tokio::spawn(async move {
        stream.write_all(&vec![7u8; bytes]).await.unwrap();
        stream.finish().unwrap();
    });
    Transfer { conn, receiver, writer, _client: client, _dir: dir }
}
