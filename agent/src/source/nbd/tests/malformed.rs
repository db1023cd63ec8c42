//! A scripted server answers the handshake, then sends one crafted reply to the first request:
//! every malformed reply must end in an error that says what was wrong.

use std::time::Duration;

use bytes::BufMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::super::wire::*;
use super::*;

/// Malformed replies from a scripted server end in errors, never in a panic or a hang.
#[tokio::test]
async fn malformed_replies_are_errors() {
    type Script = fn(u64) -> Vec<u8>;
    fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.put_u32(STRUCTURED_REPLY_MAGIC);
        b.put_u16(flags);
        b.put_u16(kind);
        b.put_u64(cookie);
        b.put_u32(payload.len() as u32);
        b.put_slice(payload);
        b
    }
    fn data(offset: u64, len: usize) -> Vec<u8> {
        let mut p = offset.to_be_bytes().to_vec();
        p.resize(8 + len, 7);
        p
    }
    const DONE: u16 = REPLY_FLAG_DONE;
    // (case, what the error says or "" for success, reply script, close after the reply)
    let cases: Vec<(&str, &str, Script, bool)> = vec![
        ("ok", "", |c| chunk(DONE, REPLY_OFFSET_DATA, c, &data(0, 4096)), false),
        ("bad magic", "bad magic", |_| vec![0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0], false),
        (
            "unknown cookie",
            "unknown cookie",
            |c| chunk(DONE, REPLY_OFFSET_DATA, c + 1, &data(0, 4096)),
            false,
        ),
        ("data outside", "outside the read", |c| chunk(DONE, REPLY_OFFSET_DATA, c, &data(4000, 200)), false),
        ("data too short", "payload length 8", |c| chunk(DONE, REPLY_OFFSET_DATA, c, &[0; 8]), false),
        (
            "overlap",
            "overlapping",
            |c| {
                let mut b = chunk(0, REPLY_OFFSET_DATA, c, &data(0, 2048));
                b.extend(chunk(DONE, REPLY_OFFSET_DATA, c, &data(1024, 2048)));
                b
            },
            false,
        ),
        (
            "short success",
            "success after 2048 bytes",
            |c| chunk(DONE, REPLY_OFFSET_DATA, c, &data(0, 2048)),
            false,
        ),
        ("empty hole", "empty hole", |c| chunk(DONE, REPLY_OFFSET_HOLE, c, &[0; 12]), false),
        ("hole of bad size", "payload length 16", |c| chunk(DONE, REPLY_OFFSET_HOLE, c, &[0; 16]), false),
        (
            "status to a read",
            "unexpected reply chunk type 5",
            |c| chunk(DONE, REPLY_BLOCK_STATUS, c, &[0, 0, 0, 1, 0, 0, 16, 0, 0, 0, 0, 0]),
            false,
        ),
        (
            "huge error",
            "payload length 4294967295",
            |c| {
                let mut b = chunk(DONE, 0x8001, c, &[]);
                b[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
                b
            },
            false,
        ),
        (
            "error text too long",
            "longer than its chunk",
            |c| chunk(DONE, 0x8001, c, &[0, 0, 0, 5, 0, 9, b'x']),
            false,
        ),
        (
            "server error",
            "EIO (input/output error): disk on fire",
            |c| chunk(DONE, 0x8001, c, b"\0\0\0\x05\0\x0cdisk on fire"),
            false,
        ),
        ("unknown type", "unexpected reply chunk type 77", |c| chunk(DONE, 77, c, &[]), false),
        (
            "eof mid-reply",
            "early eof",
            |c| chunk(DONE, REPLY_OFFSET_DATA, c, &data(0, 4096))[..100].to_vec(),
            true,
        ),
        ("eof", "closed the connection", |_| vec![], true),
        (
            "simple reply with data",
            "simple reply with data",
            |c| {
                let mut b = vec![];
                b.put_u32(SIMPLE_REPLY_MAGIC);
                b.put_u32(0);
                b.put_u64(c);
                b.extend([0; 4096]);
                b
            },
            false,
        ),
    ];
    for (name, expect, script, close) in cases {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("fake.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(fake_server(listener, script, close));
        let uri = format!("nbd+unix:///?socket={}", sock.display());
        let c = connect(&uri, &[]).await;
        let r = tokio::time::timeout(Duration::from_secs(5), c.read(0, 4096)).await.expect(name);
        match r {
            Ok(b) => assert!(expect.is_empty() && b.iter().all(|&x| x == 7), "{name}: succeeded"),
            Err(e) => assert!(!expect.is_empty() && e.to_string().contains(expect), "{name}: {e}"),
        }
        drop(c);
        server.abort();
    }
}

/// Answers the handshake for a 1 MiB export, then replies to the first request by `script`.
async fn fake_server(
    listener: tokio::net::UnixListener,
    script: fn(u64) -> Vec<u8>,
    close: bool,
) -> std::io::Result<()> {
    let (mut s, _) = listener.accept().await?;
    let mut hello = Vec::new();
    hello.put_u64(NBDMAGIC);
    hello.put_u64(IHAVEOPT);
    hello.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    s.write_all(&hello).await?;
    s.read_u32().await?;
    let reply = |option: u32, kind: u32, data: &[u8]| {
        let mut b = Vec::new();
        b.put_u64(OPTION_REPLY_MAGIC);
        b.put_u32(option);
        b.put_u32(kind);
        b.put_u32(data.len() as u32);
        b.put_slice(data);
        b
    };
    loop {
        s.read_u64().await?;
        let option = s.read_u32().await?;
        let len = s.read_u32().await?;
        let mut data = vec![0; len as usize];
        s.read_exact(&mut data).await?;
        if option == OPT_GO {
            let mut info = vec![0, 0];
            info.put_u64(1 << 20);
            info.put_u16(1);
            s.write_all(&reply(option, REP_INFO, &info)).await?;
            s.write_all(&reply(option, REP_ACK, &[])).await?;
            break;
        }
        s.write_all(&reply(option, REP_ACK, &[])).await?;
    }
    let mut request = [0u8; 28];
    s.read_exact(&mut request).await?;
    let cookie = u64::from_be_bytes(request[8..16].try_into().unwrap());
    s.write_all(&script(cookie)).await?;
    if close {
        return Ok(());
    }
    // Hold the connection open until the client goes away.
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest).await;
    Ok(())
}
