//! A userspace network impairment relay (this kernel has tbf but no netem): UDP datagrams are
//! delayed by a fixed time plus a random jitter — each datagram on its own, so they overtake one
//! another (reordering) — and dropped with a given probability, each direction independently;
//! TCP streams are delayed with the same jitter, in order, as TCP would deliver them (loss and
//! duplication make sense only below TCP: the fault tests put them on packets with iptables).
//! Every second the relay prints a `stats` line (datagrams forwarded, dropped, reordered).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// Extra delay, uniform in `0..jitter`, drawn for every datagram (TCP: every read).
    pub jitter: Duration,
}

/// What the relay did, printed every second as `stats forwarded=N dropped=N reordered=N`.
#[derive(Default)]
struct Stats {
    forwarded: AtomicU64,
    dropped: AtomicU64,
    reordered: AtomicU64,
}

impl Stats {
    fn report_every_second(self: &Arc<Self>) {
        let s = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                println!(
                    "stats forwarded={} dropped={} reordered={}",
                    s.forwarded.load(Ordering::Relaxed),
                    s.dropped.load(Ordering::Relaxed),
                    s.reordered.load(Ordering::Relaxed)
                );
            }
        });
    }
}

/// One direction's schedule: when each datagram is due, and whether it overtakes earlier ones.
struct Schedule {
    imp: Impairment,
    rng: Rng,
    latest: Instant,
}

impl Schedule {
    fn new(imp: Impairment, seed: u64) -> Self {
        Schedule { imp, rng: Rng::new(seed), latest: Instant::now() }
    }

    /// The deadline of the next piece of a byte stream: jittered, never before the one before.
    fn next_in_order(&mut self) -> Instant {
        let jitter = self.imp.jitter.as_nanos() as u64;
        let extra =
            if jitter > 0 { Duration::from_nanos(self.rng.next_u64() % jitter) } else { Duration::ZERO };
        self.latest = self.latest.max(Instant::now() + self.imp.delay + extra);
        self.latest
    }

    /// The deadline of the next datagram, or None when it is dropped.
    fn next(&mut self, stats: &Stats) -> Option<Instant> {
        let threshold = (self.imp.loss * u64::MAX as f64) as u64;
        if threshold > 0 && self.rng.next_u64() < threshold {
            stats.dropped.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let jitter = self.imp.jitter.as_nanos() as u64;
        let extra =
            if jitter > 0 { Duration::from_nanos(self.rng.next_u64() % jitter) } else { Duration::ZERO };
        let due = Instant::now() + self.imp.delay + extra;
        if due < self.latest {
            stats.reordered.fetch_add(1, Ordering::Relaxed);
        }
        self.latest = self.latest.max(due);
        stats.forwarded.fetch_add(1, Ordering::Relaxed);
        Some(due)
    }
}

/// Send `pkt` at `due`: in arrival order through `line` without jitter, on its own (so it may
/// overtake) with it.
fn deliver(
    line: &mpsc::UnboundedSender<(Instant, Vec<u8>)>,
    due: Instant,
    pkt: Vec<u8>,
    jittered: bool,
    send: &Arc<dyn Fn(Vec<u8>) + Send + Sync>,
) {
    if jittered {
        let send = send.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(due).await;
            send(pkt);
        });
    } else {
        let _ = line.send((due, pkt));
    }
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

/// Socket buffers of the UDP relay. With the kernel's default (~208 KiB, 3 ms at 500 Mbit/s) a
/// relay that waits a few ms for a core overflows its socket and drops on top of the loss it
/// was asked for: 0.5 % more on the `wan` bench's impaired path (its namespace counted 2,034
/// `RcvbufErrors` for 378k datagrams of 512 MiB).
const UDP_BUFFER: usize = 16 << 20;

/// A UDP socket of the relay, bound to `addr`, with `UDP_BUFFER` (root lifts the sysctl cap).
fn udp_socket(addr: SocketAddr) -> Result<UdpSocket> {
    let socket = blockship_transport::quic::udp_socket(addr, UDP_BUFFER)?;
    socket.set_nonblocking(true)?;
    Ok(UdpSocket::from_std(socket)?)
}

/// Relay UDP from clients on `listen` to `upstream`.
pub async fn udp(listen: SocketAddr, upstream: SocketAddr, imp: Impairment) -> Result<()> {
    let front = Arc::new(udp_socket(listen)?);
    println!("listening on {}", front.local_addr()?);
    let stats = Arc::new(Stats::default());
    stats.report_every_second();
    let jittered = !imp.jitter.is_zero();
    type Line = (mpsc::UnboundedSender<(Instant, Vec<u8>)>, Arc<dyn Fn(Vec<u8>) + Send + Sync>);
    let mut clients: HashMap<SocketAddr, Line> = HashMap::new();
    let mut schedule = Schedule::new(imp, 7);
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, from) = front.recv_from(&mut buf).await?;
        let (tx, send) = match clients.get(&from) {
            Some(line) => line.clone(),
            None => {
                // One upstream socket per client, so replies find their way back.
                let any = if upstream.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" };
                let up = Arc::new(udp_socket(any.parse()?)?);
                up.connect(upstream).await?;
                let (to_up, rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
                let u = up.clone();
                let send_up: Arc<dyn Fn(Vec<u8>) + Send + Sync> = Arc::new(move |p: Vec<u8>| {
                    let _ = u.try_send(&p);
                });
                let s = send_up.clone();
                delay_line(rx, move |p| s(p));
                let (to_client, rx_back) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
                let f = front.clone();
                let send_back: Arc<dyn Fn(Vec<u8>) + Send + Sync> = Arc::new(move |p: Vec<u8>| {
                    let _ = f.try_send_to(&p, from);
                });
                let s = send_back.clone();
                delay_line(rx_back, move |p| s(p));
                let (u, stats) = (up.clone(), stats.clone());
                tokio::spawn(async move {
                    let mut back = Schedule::new(imp, from.port() as u64);
                    let mut b = vec![0u8; 65536];
                    while let Ok(n) = u.recv(&mut b).await {
                        if let Some(due) = back.next(&stats) {
                            deliver(&to_client, due, b[..n].to_vec(), jittered, &send_back);
                        }
                    }
                });
                clients.insert(from, (to_up.clone(), send_up.clone()));
                (to_up, send_up)
            }
        };
        if let Some(due) = schedule.next(&stats) {
            deliver(&tx, due, buf[..n].to_vec(), jittered, &send);
        }
    }
}

async fn pipe(
    mut from: tokio::io::ReadHalf<TcpStream>,
    mut to: tokio::io::WriteHalf<TcpStream>,
    imp: Impairment,
    stats: Arc<Stats>,
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
    // A byte stream cannot lose or reorder: jitter delays each read, in order.
    let mut schedule = Schedule::new(imp, 11);
    let mut buf = vec![0u8; 256 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        let due = schedule.next_in_order();
        stats.forwarded.fetch_add(1, Ordering::Relaxed);
        if n == 0 || tx.send((due, buf[..n].to_vec())).is_err() {
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
    let stats = Arc::new(Stats::default());
    stats.report_every_second();
    loop {
        let (c, _) = l.accept().await?;
        let stats = stats.clone();
        tokio::spawn(async move {
            let Ok(u) = TcpStream::connect(upstream).await else { return };
            let _ = c.set_nodelay(true);
            let _ = u.set_nodelay(true);
            let (cr, cw) = tokio::io::split(c);
            let (ur, uw) = tokio::io::split(u);
            tokio::join!(pipe(cr, uw, imp, stats.clone()), pipe(ur, cw, imp, stats));
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
        tokio::spawn(udp(
            relay_addr,
            echo_addr,
            Impairment { delay: Duration::from_millis(20), loss: 0.0, jitter: Duration::ZERO },
        ));
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

    #[tokio::test]
    async fn udp_relay_jitter_reorders_datagrams() {
        let sink = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let sink_addr = sink.local_addr().unwrap();
        let relay_addr = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let imp =
            Impairment { delay: Duration::from_millis(5), loss: 0.0, jitter: Duration::from_millis(30) };
        tokio::spawn(udp(relay_addr, sink_addr, imp));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        c.connect(relay_addr).await.unwrap();
        for i in 0u32..200 {
            c.send(&i.to_be_bytes()).await.unwrap();
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        let (mut got, mut b) = (Vec::new(), [0u8; 16]);
        while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(300), sink.recv(&mut b)).await {
            got.push(u32::from_be_bytes(b[..n].try_into().unwrap()));
        }
        assert_eq!(got.len(), 200, "no loss was asked for");
        let overtaken = got.windows(2).filter(|w| w[0] > w[1]).count();
        assert!(overtaken > 10, "30 ms of jitter on 0.2 ms spacing must reorder: {overtaken}");
    }
}
