//! The committed seed corpora of the protocol's fuzz targets (`fuzz/seeds/{frame_decoder,
//! chunk_decode,session}`) are built here from real messages, so they stay in step with the
//! protocol: the test fails when a committed seed differs from what the current encoder makes,
//! and `BLOCKSHIP_WRITE_FUZZ_SEEDS=1 cargo test -p blockship-proto --test fuzz_seeds` rewrites
//! them. Each seed must also decode completely, and the session seeds must be accepted step by
//! step by the session state machine, so the fuzzer starts from inputs that reach deep.

use std::path::PathBuf;

use blockship_proto::codec::{Compression, Decoder, Encoder};
use blockship_proto::session::{SinkSession, Step};
use blockship_proto::{frame, pb, version, Body, FrameDecoder};
use bytes::{Bytes, BytesMut};

fn seeds_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds").join(target)
}

fn chunk_frame(disk: u32, seq: u64, offset: u64, data: &[u8], mode: Compression) -> Bytes {
    let e = Encoder::new(mode).unwrap().encode(Bytes::copy_from_slice(data)).unwrap();
    frame::encode(&Body::Chunk(e.header(disk, seq, offset, data.len() as u32)), &e.payload)
}

fn frames(bodies: &[Body]) -> Vec<u8> {
    bodies.iter().flat_map(|b| frame::encode(b, &[]).to_vec()).collect()
}

fn open(disk: u32, target: &str) -> Body {
    Body::OpenDisk(pb::OpenDisk { disk, size: 1 << 20, target: target.into(), ..Default::default() })
}

fn begin(disk: u32, epoch: u64, group: &str) -> Body {
    Body::EpochBegin(pb::EpochBegin { disk, epoch, group: group.into(), ..Default::default() })
}

fn commit(disk: u32, epoch: u64) -> Body {
    Body::EpochCommit(pb::EpochCommit { disk, epoch, ..Default::default() })
}

/// Every seed of every target: (target, name, bytes).
fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let text: Vec<u8> = b"blockship ".iter().copied().cycle().take(64 << 10).collect();
    let noise: Vec<u8> = (0u32..4096).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let hello = Body::Hello(version::hello("seed"));
    let mut stream = frames(&[hello.clone(), open(1, "file:vm/disk0"), begin(1, 1, "")]);
    stream.extend_from_slice(&chunk_frame(1, 0, 0, &text, Compression::Zstd { level: 1 }));
    stream.extend_from_slice(&frames(&[commit(1, 1)]));
    // The session target reads only control frames; a group of two disks through a commit and
    // a cutover.
    let group = frames(&[
        hello.clone(),
        open(1, "file:vm/a"),
        open(2, "file:vm/b"),
        Body::GroupOpen(pb::GroupOpen { group: "vm".into(), disks: vec![1, 2] }),
        begin(1, 1, "vm"),
        begin(2, 1, "vm"),
        commit(1, 1),
        commit(2, 1),
        Body::GroupCommit(pb::GroupCommit { group: "vm".into(), epoch: 1 }),
        Body::GroupCutover(pb::GroupCutover { group: "vm".into(), epoch: 1 }),
    ]);
    let disks = frames(&[
        hello,
        open(1, "file:a"),
        Body::IndexRequest(pb::IndexRequest { disk: 1 }),
        begin(1, 1, ""),
        commit(1, 1),
        begin(1, 2, ""),
        commit(1, 2),
        Body::CloseDisk(pb::CloseDisk { disk: 1 }),
        open(2, "file:b"),
    ]);
    vec![
        ("frame_decoder", "one-epoch", stream),
        ("chunk_decode", "zstd-text", chunk_frame(1, 0, 0, &text, Compression::Zstd { level: 1 }).to_vec()),
        ("chunk_decode", "raw-noise", chunk_frame(1, 3, 1 << 20, &noise, Compression::None).to_vec()),
        ("session", "group-commit-cutover", group),
        ("session", "disk-epochs", disks),
    ]
}

#[test]
fn committed_seeds_are_current_and_decode() {
    let write = std::env::var_os("BLOCKSHIP_WRITE_FUZZ_SEEDS").is_some();
    for (target, name, bytes) in seeds() {
        let path = seeds_dir(target).join(name);
        if write {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        }
        let committed = std::fs::read(&path).unwrap_or_else(|e| {
            panic!("{}: {e} (BLOCKSHIP_WRITE_FUZZ_SEEDS=1 writes the seeds)", path.display())
        });
        assert!(committed == bytes, "{} is stale: BLOCKSHIP_WRITE_FUZZ_SEEDS=1 rewrites it", path.display());

        // Every seed is whole frames, nothing left over.
        let mut buf = BytesMut::from(&bytes[..]);
        let mut dec = FrameDecoder::new();
        let mut decoded = Vec::new();
        while let Some(f) = dec.decode(&mut buf).unwrap() {
            decoded.push(f);
        }
        assert!(buf.is_empty(), "{target}/{name}: {} bytes left over", buf.len());
        for f in &decoded {
            if let Body::Chunk(h) = &f.body {
                let raw = Decoder::new().unwrap().decode(h, f.payload.clone()).unwrap();
                assert_eq!(raw.len(), h.length as usize);
            }
        }
        if target == "session" {
            let mut s = SinkSession::new();
            for f in decoded {
                match s.on_message(f.body) {
                    Ok(Step::Begin { req, .. }) => s.epoch_begun(req.disk, req.epoch),
                    Ok(Step::GroupOpen(req)) => s.group_opened(&req.group, req.disks, 0),
                    Ok(Step::GroupCommit { group, epoch, .. }) => s.group_committed(&group, epoch),
                    Ok(_) => {}
                    Err(v) => panic!("{target}/{name}: the session refused a seed message: {}", v.message),
                }
            }
        }
    }
}
