//! End-to-end syncs through the real binaries: full, incremental (DiskChangeInfo) and compare
//! mode into a file target, checked byte for byte, plus `verify`.

mod common;

use blockship_bench::image::{self, Profile};
use common::*;

const DISK: u64 = 1 << 30;

/// A DiskChangeInfo document of four pages (the second one empty) listing `changed`.
fn change_list(changed: &[(u64, u64)]) -> String {
    let quarter = DISK / 4;
    let pages: Vec<serde_json::Value> = (0..4u64)
        .map(|p| {
            let (start, end) = (p * quarter, (p + 1) * quarter);
            let areas: Vec<serde_json::Value> = if p == 1 {
                vec![]
            } else {
                changed
                    .iter()
                    .filter(|(o, _)| *o >= start && *o < end)
                    .map(|(o, l)| serde_json::json!({"start": o, "length": l}))
                    .collect()
            };
            serde_json::json!({"startOffset": start, "length": quarter, "changedArea": areas})
        })
        .collect();
    serde_json::to_string_pretty(&pages).unwrap()
}

fn full_incremental_compare_and_verify(transport: &str) {
    let lab = Lab::over(&["esx01"], transport);
    let sink = lab.sink(&["esx01=file:esx01/*"], &[]);
    let src = lab.path("src.img");
    image::generate(&src, DISK, Profile::Mixed, 1).unwrap();
    let (_zero, text, random) = image::composition(Profile::Mixed, DISK);

    // Full sync into a target that does not exist yet. zstd explicitly: the default `auto`
    // compresses only when the link is the bottleneck, and loopback never is.
    let full = lab.sync(&sink, "esx01", &src, "file:esx01/vm1", &["--compression", "zstd"]);
    assert_eq!(full["mode"], "full");
    assert_eq!(u(&full, "epoch"), 1);
    assert!(same_file(&src, &lab.target("esx01/vm1")), "target differs after the full sync");
    let nonzero = text + random;
    assert!(u(&full, "bytes_sent") < nonzero, "nothing saved: {full}");
    // The text part compresses: at least a third of it must have been saved.
    assert!(u(&full, "bytes_sent") < random + text * 2 / 3, "text did not compress: {full}");
    println!("full: {full}");

    // Incremental: 1 % of the disk changed, told through a DiskChangeInfo file. Some changed
    // areas become zeros, which must be written as zeros, not skipped.
    let mut changed = Vec::new();
    let mut rng = image::Rng::new(42);
    let mut total = 0;
    while total < DISK / 100 {
        let len = (1 + rng.next_u64() % 64) * 4096;
        let off = (rng.next_u64() % ((DISK - len) / 4096)) * 4096;
        if (DISK / 4..DISK / 2).contains(&off) || (DISK / 4..DISK / 2).contains(&(off + len)) {
            continue; // the second page stays empty
        }
        if changed.len() % 7 == 3 {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
            f.write_all_at(&vec![0u8; len as usize], off).unwrap();
        } else {
            scribble(&src, off, len as usize, off);
        }
        changed.push((off, len));
        total += len;
    }
    let list = lab.path("changes.json");
    std::fs::write(&list, change_list(&changed)).unwrap();
    let merged: u64 = {
        let mut v: Vec<(u64, u64)> = changed.clone();
        v.sort();
        let mut covered = 0;
        let mut end = 0;
        for (o, l) in v {
            let s = o.max(end);
            if o + l > s {
                covered += o + l - s;
            }
            end = end.max(o + l);
        }
        covered
    };
    let incr = lab.sync(&sink, "esx01", &src, "file:esx01/vm1", &["--changed-areas", list.to_str().unwrap()]);
    assert_eq!(incr["mode"], "incremental");
    assert_eq!(u(&incr, "epoch"), 2);
    assert!(same_file(&src, &lab.target("esx01/vm1")), "target differs after the incremental sync");
    assert_eq!(u(&incr, "bytes_read"), merged, "incremental read more than the changed bytes: {incr}");
    assert!(u(&incr, "zero_extents") > 0, "zeroed areas were not sent as zero extents: {incr}");
    println!("incremental: changed {merged} bytes: {incr}");

    // Compare mode: 100 random 4 KiB overwrites the agent is not told about.
    for i in 0..100u64 {
        let off = (image::Rng::new(1000 + i).next_u64() % (DISK / 4096)) * 4096;
        scribble(&src, off, 4096, i);
    }
    let cmp = lab.sync(&sink, "esx01", &src, "file:esx01/vm1", &[]);
    assert_eq!(cmp["mode"], "compare");
    assert_eq!(u(&cmp, "epoch"), 3);
    assert!(same_file(&src, &lab.target("esx01/vm1")), "target differs after the compare sync");
    assert!(u(&cmp, "chunks_sent") <= 100, "{cmp}");
    assert!(u(&cmp, "bytes_sent") <= 100 * MIB, "{cmp}");
    // Only the chunks holding an overwrite travel; everything else was found equal.
    assert!(u(&cmp, "bytes_equal") >= DISK - 100 * MIB, "compare sent too much: {cmp}");
    println!("compare: {cmp}");

    // verify: equal now; a change behind the sink's back is found and located.
    let v = lab.verify(&sink, "esx01", &src, "file:esx01/vm1");
    assert!(
        v.status.success(),
        "verify: {}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    scribble(&lab.target("esx01/vm1"), 700 * MIB + 5, 10, 9);
    let v = lab.verify(&sink, "esx01", &src, "file:esx01/vm1");
    assert_eq!(v.status.code(), Some(1));
    let text = String::from_utf8_lossy(&v.stdout);
    assert!(text.contains(&format!("[{}, {})", 700 * MIB, 701 * MIB)), "{text}");
}

fn sparse_source_reads_only_its_data(transport: &str) {
    let lab = Lab::over(&["esx01"], transport);
    let sink = lab.sink(&["esx01=file:**"], &[]);
    let src = lab.path("sparse.img");
    image::generate(&src, 2 * DISK, Profile::Sparse, 3).unwrap();
    let (_, text, _) = image::composition(Profile::Sparse, 2 * DISK);
    let s = lab.sync(&sink, "esx01", &src, "file:a/b/sparse", &[]);
    assert!(same_file(&src, &lab.target("a/b/sparse")));
    assert_eq!(u(&s, "bytes_read"), text, "holes were read: {s}");
    // The target keeps the holes.
    use std::os::unix::fs::MetadataExt;
    let blocks = std::fs::metadata(lab.target("a/b/sparse")).unwrap().blocks() * 512;
    assert!(blocks < 2 * text, "target is not sparse: {blocks} bytes allocated");
    assert!(matches!(s["reader"].as_str(), Some("io_uring") | Some("pread")), "{s}");
    // Compare mode over a sparse source skips the holes without reading them; reads fall back
    // to pread when io_uring is not to be used.
    let again =
        lab.sync(&sink, "esx01", &src, "file:a/b/sparse", &["--compression", "none", "--no-io-uring"]);
    assert_eq!(u(&again, "bytes_sent"), 0, "{again}");
    assert_eq!(u(&again, "bytes_read"), text, "{again}");
    assert_eq!(again["reader"], "pread", "{again}");
}

/// `--connections 3`: the disk's data crosses on three connections (two joined the first one's
/// session) and the target equals the source, after a full and after a compare epoch; a sink
/// refusing the extra connections (its per-agent cap) fails the sync with its reason.
fn a_disk_over_several_connections(transport: &str) {
    let lab = Lab::over(&["esx01"], transport);
    let sink = lab.sink(&["esx01=file:esx01/*"], &[]);
    let src = lab.path("src.img");
    image::generate(&src, DISK / 4, Profile::Mixed, 5).unwrap();
    let args = ["--connections", "3", "--streams", "2", "--compression", "zstd"];
    let full = lab.sync(&sink, "esx01", &src, "file:esx01/vm1", &args);
    assert_eq!(u(&full, "connections"), 3, "{full}");
    assert_eq!(full["mode"], "full");
    assert!(same_file(&src, &lab.target("esx01/vm1")), "target differs after the full sync");
    for (i, off) in [3 * MIB + 17, 100 * MIB, 200 * MIB + 4096].into_iter().enumerate() {
        scribble(&src, off, 2 * MIB as usize, i as u64);
    }
    let cmp = lab.sync(&sink, "esx01", &src, "file:esx01/vm1", &args);
    assert_eq!((cmp["mode"].as_str(), u(&cmp, "connections")), (Some("compare"), 3), "{cmp}");
    assert!(same_file(&src, &lab.target("esx01/vm1")), "target differs after the compare sync");
    let one = lab.sync(&sink, "esx01", &src, "file:esx01/vm1", &["--connections", "1"]);
    assert_eq!(u(&one, "connections"), 1, "{one}");
    // auto: one per two cores, at most eight, over gRPC at least two.
    let auto = lab.sync(&sink, "esx01", &src, "file:esx01/vm1", &[]);
    let cores = std::thread::available_parallelism().unwrap().get() as u64;
    let least = if transport == "grpc" { 2 } else { 1 };
    assert_eq!(u(&auto, "connections"), (cores / 2).clamp(least, 8), "{auto}");
    // The sink saw the joins (the data each carried is checked by sink/tests/joins.rs).
    let joined = lab.sink_log().matches("connection joined a session").count();
    // Two for each three-connection sync.
    assert!(joined >= 2 + 2, "the sink logged {joined} joined connections");

    drop(sink);
    let capped = lab.sink(&["esx01=file:esx01/*"], &["--max-agent-connections", "2"]);
    let out = lab.try_sync(&capped, "esx01", &src, "file:esx01/vm2", &["--connections", "3"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--max-agent-connections"), "{err}");
    // auto takes what the sink allows (the cap is per agent: one connection for one seat).
    drop(capped);
    let single = lab.sink(&["esx01=file:esx01/*"], &["--max-agent-connections", "1"]);
    let s = lab.sync(&single, "esx01", &src, "file:esx01/vm2", &[]);
    assert_eq!(u(&s, "connections"), 1, "{s}");
    assert!(same_file(&src, &lab.target("esx01/vm2")));
}

each_transport!(
    full_incremental_compare_and_verify,
    sparse_source_reads_only_its_data,
    a_disk_over_several_connections
);
