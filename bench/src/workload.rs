//! The live writer and its verifier (crucible's idea): `SeqWriter` writes sequence-numbered
//! blocks round-robin over a VM's disks through interactive `qemu-io` processes on their
//! writable NBD exports, one write at a time, and logs every completed write; `consistent_cut`
//! checks that disk images taken at one point in time are explained by a single prefix of that
//! log — the property every committed group epoch must have. Used by the daemon tests and by
//! `blockship-bench chaos`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Bytes of a block the writer writes.
pub const BLOCK: u64 = 64 << 10;

/// The content of write `seq`: the sequence number, then a pattern derived from it.
pub fn block(seq: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK as usize];
    b[..8].copy_from_slice(&(seq + 1).to_le_bytes());
    let mut x = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for v in b[8..].iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *v = x as u8;
    }
    b
}

/// The sequence number a block holds (None: never written), checking its whole content.
pub fn read_block(data: &[u8]) -> Result<Option<u64>, String> {
    let stamp = u64::from_le_bytes(data[..8].try_into().unwrap());
    if stamp == 0 {
        return if data.iter().all(|&b| b == 0) {
            Ok(None)
        } else {
            Err("a block neither written nor zero".into())
        };
    }
    let seq = stamp - 1;
    if data != block(seq).as_slice() {
        return Err(format!("block of write {seq} is torn"));
    }
    Ok(Some(seq))
}

/// One write of the log: (seq, disk, block index).
pub type Logged = (u64, usize, u64);

/// Writes sequence-numbered blocks round-robin over the VM's disks, one at a time, through
/// interactive qemu-io processes on the writable exports; logs every completed write.
pub struct SeqWriter {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub log: Arc<Mutex<Vec<Logged>>>,
}

struct Io {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl SeqWriter {
    /// Start writing to disks `uris` (each `blocks` blocks long), staging block data in `dir`.
    pub fn start(uris: Vec<String>, blocks: u64, dir: &Path) -> SeqWriter {
        Self::start_until(uris, blocks, dir, None)
    }

    /// `start`, and stop on its own once `stop_file` exists (a cutover's pre-freeze hook
    /// creates it); `stop_file` + ".done" appears when the last write completed and the
    /// writer's connections are closed, so the hook can wait for a quiet source.
    pub fn start_until(uris: Vec<String>, blocks: u64, dir: &Path, stop_file: Option<PathBuf>) -> SeqWriter {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (s, l, dir) = (stop.clone(), log.clone(), dir.to_path_buf());
        let thread = std::thread::spawn(move || {
            let mut ios: Vec<Io> = uris
                .iter()
                .map(|u| {
                    let mut child = Command::new("qemu-io")
                        .args(["-f", "raw", u])
                        .stdin(Stdio::piped())
                        .stdout(Stdio::piped())
                        .stderr(Stdio::null())
                        .spawn()
                        .unwrap();
                    let stdin = child.stdin.take().unwrap();
                    let stdout = BufReader::new(child.stdout.take().unwrap());
                    Io { child, stdin, stdout }
                })
                .collect();
            let staged = dir.join("block.bin");
            let mut seq = 0u64;
            let stopped = || stop_file.as_ref().is_some_and(|f| f.exists());
            while !s.load(Ordering::Relaxed) && !stopped() {
                let disk = (seq % ios.len() as u64) as usize;
                let index = (seq / ios.len() as u64 * 7919) % blocks;
                std::fs::write(&staged, block(seq)).unwrap();
                let io = &mut ios[disk];
                writeln!(io.stdin, "write -s {} {} {BLOCK}", staged.display(), index * BLOCK).unwrap();
                io.stdin.flush().unwrap();
                loop {
                    let mut line = String::new();
                    if io.stdout.read_line(&mut line).unwrap() == 0 {
                        panic!("qemu-io ended");
                    }
                    if line.contains("wrote") {
                        break;
                    }
                    assert!(!line.contains("error") && !line.contains("failed"), "qemu-io: {line}");
                }
                l.lock().unwrap().push((seq, disk, index));
                seq += 1;
            }
            for mut io in ios {
                drop(io.stdin);
                let _ = io.child.wait();
            }
            if let Some(f) = &stop_file {
                let mut done = f.clone().into_os_string();
                done.push(".done");
                std::fs::write(done, seq.to_string()).unwrap();
            }
        });
        SeqWriter { stop, thread: Some(thread), log }
    }

    pub fn writes(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// Stop writing; returns the log.
    pub fn finish(mut self) -> Vec<Logged> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.log.lock().unwrap().clone()
    }
}

/// Check that `images` (the disks' contents at one point in time) are one consistent cut of
/// `log`: a single prefix of the writes explains every block of every disk. Returns the prefix
/// length.
pub fn consistent_cut(log: &[Logged], images: &[Vec<u8>]) -> Result<usize, String> {
    let mut seen: Vec<Vec<Option<u64>>> = Vec::new();
    for (d, img) in images.iter().enumerate() {
        let mut blocks = Vec::new();
        for (b, data) in img.chunks(BLOCK as usize).enumerate() {
            blocks.push(read_block(data).map_err(|e| format!("disk {d} block {b}: {e}"))?);
        }
        seen.push(blocks);
    }
    let max = seen.iter().flatten().flatten().max().copied();
    let prefix = max.map_or(0, |m| m as usize + 1);
    if prefix > log.len() {
        return Err(format!("write {} seen but the log has {} writes", prefix - 1, log.len()));
    }
    // What each block must hold after the first `prefix` writes.
    let mut expect: Vec<Vec<Option<u64>>> = seen.iter().map(|d| vec![None; d.len()]).collect();
    for &(seq, disk, index) in &log[..prefix] {
        expect[disk][index as usize] = Some(seq);
    }
    for (d, (s, e)) in seen.iter().zip(&expect).enumerate() {
        for (b, (got, want)) in s.iter().zip(e).enumerate() {
            if got != want {
                return Err(format!(
                    "disk {d} block {b} holds write {got:?} but the prefix of {prefix} writes (the newest write seen on any disk) says {want:?}: the disks were not frozen at one instant"
                ));
            }
        }
    }
    Ok(prefix)
}
