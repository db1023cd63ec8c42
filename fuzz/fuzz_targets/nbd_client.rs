//! Arbitrary bytes as everything an NBD server says — handshake, option replies, simple and
//! structured reply chunks — to the agent's NBD client, which meanwhile reads and asks for block
//! status: every outcome is data or an error, never a panic, a hang or a read past what was
//! asked. (Request cookies count from 0, so the fuzzer can learn to answer them.)
#![no_main]

use blockship_agent::source::nbd::{NbdClient, BASE_ALLOCATION};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let (client_side, mut server) = tokio::io::duplex(1 << 20);
        let script = data.to_vec();
        let server = tokio::spawn(async move {
            let _ = server.write_all(&script).await;
            // The script is all the server ever says: the client then reads end of stream.
            let _ = server.shutdown().await;
            let mut drain = vec![0u8; 64 << 10];
            while matches!(server.read(&mut drain).await, Ok(n) if n > 0) {}
        });
        let (rd, wr) = tokio::io::split(client_side);
        if let Ok(client) = NbdClient::over(rd, wr, "fuzz", &[BASE_ALLOCATION]).await {
            let size = client.size();
            let len = size.min(64 << 10) as usize;
            let status_len = size.min(1 << 20);
            let (read, status) =
                tokio::join!(client.read(0, len), client.block_status(BASE_ALLOCATION, 0, status_len));
            if let Ok(bytes) = read {
                assert_eq!(bytes.len(), len);
            }
            if let Ok(runs) = status {
                assert_eq!(runs.iter().map(|r| r.0).sum::<u64>(), status_len);
            }
            let _ = client.disconnect().await;
        }
        server.abort();
    });
});
