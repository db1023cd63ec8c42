//! A fleet against one sink: four agent daemons (four ESXi hosts, say), each with four groups of
//! two disks changing every second, replicate into RBD at a 5 s interval at the same time. Every
//! group converges to its sources, no group's RPO runs away from the others' (at most 3 × the
//! median), and the sink's memory stays bounded (its peak RSS is reported).

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::ceph::*;
use common::daemon::*;
use common::*;

const AGENTS: usize = 4;
const GROUPS: usize = 4;
const DISKS: usize = 2;
const DISK: u64 = 2 << 20;

struct Member<'a> {
    source: PathBuf,
    image: TestImage<'a>,
}

/// Peak resident set of a process (VmHWM), in MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kib| kib.parse::<f64>().ok())
        .map(|kib| kib / 1024.0)
        .unwrap_or(f64::NAN)
}

#[test]
fn sixteen_groups_from_four_agents_converge_with_even_rpo_and_bounded_sink_memory() {
    let Some(ceph) = ceph() else { return };
    let names: Vec<String> = (1..=AGENTS).map(|a| format!("esx{a:02}")).collect();
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let lab = Lab::new(&name_refs);
    let allow: Vec<String> = names.iter().map(|n| format!("{n}=rbd:rbd/*")).collect();
    let allow_refs: Vec<&str> = allow.iter().map(String::as_str).collect();
    let sink = ceph.sink(&lab, &allow_refs, &[]);

    // Every agent names its groups vm0..vm3: the sink keeps them apart by agent.
    let mut members: Vec<Vec<Vec<Member>>> = Vec::new();
    let mut daemons = Vec::new();
    for (a, name) in names.iter().enumerate() {
        let mut config = String::new();
        let mut groups = Vec::new();
        for g in 0..GROUPS {
            let mut disks = Vec::new();
            let mut group = Vec::new();
            for d in 0..DISKS {
                let source = lab.path(&format!("a{a}g{g}d{d}.img"));
                std::fs::File::create(&source).unwrap().set_len(DISK).unwrap();
                scribble(&source, 0, DISK as usize, (a * 100 + g * 10 + d) as u64);
                let image = TestImage::new(&ceph, &format!("fleet{a}{g}{d}"));
                disks.push(format!(
                    "{{ source = \"{}\", target = \"{}\" }}",
                    source.display(),
                    image.target()
                ));
                group.push(Member { source, image });
            }
            config += &format!(
                "[[group]]\nname = \"vm{g}\"\nkind = \"file\"\ninterval = \"5s\"\ndisks = [{}]\n",
                disks.join(", ")
            );
            groups.push(group);
        }
        members.push(groups);
        daemons.push(Daemon::start(&lab, &sink, name, "", &config, &[]));
    }
    for d in &daemons {
        for g in 0..GROUPS {
            d.wait_epoch(&format!("vm{g}"), 1, Duration::from_secs(120));
        }
    }

    // 30 s of changes every second on every disk; each group's worst RPO is recorded.
    let mut worst = vec![vec![0f64; GROUPS]; AGENTS];
    let mut max_cycle = 0f64;
    let started = Instant::now();
    let mut tick = 0u64;
    while started.elapsed() < Duration::from_secs(30) {
        tick += 1;
        for (a, groups) in members.iter().enumerate() {
            for (g, group) in groups.iter().enumerate() {
                for (d, m) in group.iter().enumerate() {
                    let at = (tick * 7 * 65536 + d as u64 * 65536) % (DISK - 65536);
                    scribble(&m.source, at, 65536, tick * 1000 + (a * 100 + g * 10 + d) as u64);
                }
            }
        }
        for (a, d) in daemons.iter().enumerate() {
            for s in d.status().as_array().unwrap() {
                let g: usize = s["name"].as_str().unwrap()[2..].parse().unwrap();
                assert_eq!(s["failures"], 0, "{} failed: {s}", names[a]);
                worst[a][g] = worst[a][g].max(s["rpo_seconds"].as_f64().unwrap_or(0.0));
                max_cycle = max_cycle.max(s["last_cycle_seconds"].as_f64().unwrap_or(0.0));
            }
        }
        std::thread::sleep(Duration::from_millis(1000));
    }

    // Changes stop; every group commits an epoch that began after the last change.
    let after: Vec<Vec<u64>> = daemons
        .iter()
        .map(|d| (0..GROUPS).map(|g| u(&d.group(&format!("vm{g}")), "committed_epoch")).collect())
        .collect();
    let mut committed = vec![vec![0u64; GROUPS]; AGENTS];
    for (a, d) in daemons.iter().enumerate() {
        for g in 0..GROUPS {
            let s = d.wait_epoch(&format!("vm{g}"), after[a][g] + 2, Duration::from_secs(60));
            committed[a][g] = u(&s, "committed_epoch");
        }
    }
    let sink_peak = peak_rss_mib(sink.pid());
    for d in &mut daemons {
        assert!(d.stop().success(), "a daemon did not exit 0 on SIGTERM: {}", d.log_text());
    }

    // Convergence: each group's last committed snapshots equal its sources, byte for byte.
    // The epoch is read from the image once the daemons are stopped: while the test waited for
    // the other groups, a group could commit more epochs and the sink prune the snapshot of the
    // one seen first (CI saw "blockship-11 … No such file or directory").
    for (a, groups) in members.iter().enumerate() {
        for (g, group) in groups.iter().enumerate() {
            for m in group {
                let last = ceph.committed_epoch(&m.image.spec());
                assert!(last >= committed[a][g], "{}'s vm{g}: the image says epoch {last}", names[a]);
                let snap = format!("{}@blockship-{last}", m.image.spec());
                assert_eq!(
                    ceph.export_hash(&snap, lab.dir.path()),
                    sha(&m.source),
                    "{}'s vm{g}: {snap} differs from {}",
                    names[a],
                    m.source.display()
                );
            }
        }
    }

    let mut rpos: Vec<f64> = worst.iter().flatten().copied().collect();
    rpos.sort_by(f64::total_cmp);
    let median = (rpos[rpos.len() / 2 - 1] + rpos[rpos.len() / 2]) / 2.0;
    let epochs: u64 = committed.iter().flatten().sum();
    println!(
        "fleet: {} groups, {epochs} group epochs; worst RPO per group {:.2}..{:.2} s (median {median:.2} s), cycle at most {max_cycle:.2} s; sink peak RSS {sink_peak:.0} MiB",
        AGENTS * GROUPS,
        rpos[0],
        rpos[rpos.len() - 1]
    );
    assert!(rpos[rpos.len() - 1] <= 3.0 * median, "a group's RPO ran away: {rpos:?}");
    assert!(sink_peak < 512.0, "the sink's peak RSS was {sink_peak:.0} MiB");
}
