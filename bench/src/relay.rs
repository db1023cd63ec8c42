//! A userspace network impairment relay (this kernel has tbf but no netem): UDP datagrams are
//! delayed by a fixed time and dropped with a given probability, each direction independently;
//! TCP streams are delayed (loss makes no sense above TCP, which would retransmit anyway).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::image::Rng;

#[derive(Debug, Clone, Copy)]
pub struct Impairment {
    /// One-way delay added in each direction.
    pub delay: Duration,
    /// Probability of dropping a datagram.
    pub loss: f64,
}

/// Deliver `(deadline, packet)` pairs in order once their deadline passed.
fn delay_line(mut rx: mpsc::UnboundedReceiver<(Instant, Vec<u8>)>, send: impl Fn(Vec<u8>) + Send + 'static) {
    tokio::spawn(async move {
        while let Some((due, pkt)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            send(pkt);
        }
    });
}

/// Relay UDP from clients on `listen` to `upstream`.
pub async fn udp(listen: SocketAddr, upstream: SocketAddr, imp: Impairment) -> Result<()> {
    let front = Arc::new(UdpSocket::bind(listen).await?);
    println!("listening on {}", front.local_addr()?);
    let mut clients: HashMap<SocketAddr, mpsc::UnboundedSender<(Instant, Vec<u8>)>> = HashMap::new();
    let mut rng = Rng::new(7);
    let threshold = (imp.loss * u64::MAX as f64) as u64;
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, from) = front.recv_from(&mut buf).await?;
        let tx = match clients.get(&from) {
            Some(tx) => tx.clone(),
            None => {
                // One upstream socket per client, so replies find their way back.
                let up = Arc::new(UdpSocket::bind("0.0.0.0:0").await?);
                up.connect(upstream).await?;
                let (to_up, rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
                let u = up.clone();
                delay_line(rx, move |p| {
                    let _ = u.try_send(&p);
                });
                let (to_client, rx_back) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
                let f = front.clone();
                delay_line(rx_back, move |p| {
                    let _ = f.try_send_to(&p, from);
                });
                let (u, delay, thr) = (up.clone(), imp.delay, threshold);
                tokio::spawn(async move {
                    let mut rng = Rng::new(from.port() as u64);
                    let mut b = vec![0u8; 65536];
                    while let Ok(n) = u.recv(&mut b).await {
                        if thr > 0 && rng.next_u64() < thr {
                            continue;
                        }
                        let _ = to_client.send((Instant::now() + delay, b[..n].to_vec()));
                    }
                });
                clients.insert(from, to_up.clone());
                to_up
            }
        };
        if threshold > 0 && rng.next_u64() < threshold {
            continue;
        }
        let _ = tx.send((Instant::now() + imp.delay, buf[..n].to_vec()));
    }
}

async fn pipe(
    mut from: tokio::io::ReadHalf<TcpStream>,
    mut to: tokio::io::WriteHalf<TcpStream>,
    delay: Duration,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((due, data)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&data).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 256 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 || tx.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// Relay TCP connections from `listen` to `upstream`, delaying each direction.
pub async fn tcp(listen: SocketAddr, upstream: SocketAddr, imp: Impairment) -> Result<()> {
    let l = TcpListener::bind(listen).await?;
    println!("listening on {}", l.local_addr()?);
    loop {
        let (c, _) = l.accept().await?;
        let delay = imp.delay;
        tokio::spawn(async move {
            let Ok(u) = TcpStream::connect(upstream).await else { return };
            let _ = c.set_nodelay(true);
            let _ = u.set_nodelay(true);
            let (cr, cw) = tokio::io::split(c);
            let (ur, uw) = tokio::io::split(u);
            tokio::join!(pipe(cr, uw, delay), pipe(ur, cw, delay));
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn udp_relay_delays_and_drops() {
        let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let mut b = [0u8; 2048];
            while let Ok((n, from)) = echo.recv_from(&mut b).await {
                let _ = echo.send_to(&b[..n], from).await;
            }
        });
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let relay_addr: SocketAddr = {
            let p = probe.local_addr().unwrap();
            drop(probe);
            p
        };
        tokio::spawn(udp(relay_addr, echo_addr, Impairment { delay: Duration::from_millis(20), loss: 0.0 }));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        c.connect(relay_addr).await.unwrap();
        let t = std::time::Instant::now();
        c.send(b"ping").await.unwrap();
        let mut b = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(2), c.recv(&mut b)).await.unwrap().unwrap();
        assert_eq!(&b[..n], b"ping");
        assert!(t.elapsed() >= Duration::from_millis(40), "round trip took {:?}", t.elapsed());
    }
}
