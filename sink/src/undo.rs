//! The undo journal of a file target: the point in time of its last committed epoch. Before an
//! epoch overwrites a byte range of the file for the first time, the committed contents of that
//! range are appended to the journal (a hole or all-zero range as a bare zero record) and the
//! journal is made durable; only then is the range overwritten. Rolling back applies the
//! journal in reverse and truncates the file to its committed size, so a failed or abandoned
//! epoch can always be undone, as an RBD target returns to its snapshot. The journal is dropped
//! once the epoch's commit is recorded. Cost: every byte an epoch overwrites is read and written
//! once more (holes and zeros only as 41-byte records); a fresh target (no committed epoch) has
//! nothing to undo and keeps no journal.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rustix::fs::{FallocateFlags, SeekFrom};
use rustix::io::Errno;

const MAGIC: &[u8; 8] = b"BSUNDO01";
const HEADER_LEN: u64 = 64;
const RECORD_MAGIC: u32 = 0x5552_4543;
const RECORD_HEADER: usize = 4 + 8 + 8 + 1 + 32;
/// Largest data record; longer ranges are split.
const MAX_RECORD: u64 = 16 << 20;

const KIND_DATA: u8 = 0;
const KIND_ZERO: u8 = 1;

/// Byte ranges already saved, merged (start -> end).
#[derive(Debug, Default)]
struct Ranges(BTreeMap<u64, u64>);

impl Ranges {
    /// The parts of `[start, end)` not covered yet.
    fn missing(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut pos = start;
        // A range starting before `start` may cover its beginning.
        if let Some((_, &e)) = self.0.range(..=start).next_back() {
            pos = pos.max(e);
        }
        for (&s, &e) in self.0.range(start..end) {
            if s > pos {
                out.push((pos, s.min(end)));
            }
            pos = pos.max(e);
            if pos >= end {
                break;
            }
        }
        if pos < end {
            out.push((pos, end));
        }
        out
    }

    fn insert(&mut self, start: u64, end: u64) {
        let (mut s, mut e) = (start, end);
        if let Some((&ps, &pe)) = self.0.range(..=s).next_back() {
            if pe >= s {
                s = ps;
                e = e.max(pe);
            }
        }
        let overlapping: Vec<u64> = self.0.range(s..=e).map(|(&k, _)| k).collect();
        for k in overlapping {
            if let Some(v) = self.0.remove(&k) {
                e = e.max(v);
            }
        }
        self.0.insert(s, e);
    }
}

/// One saved range.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    offset: u64,
    len: u64,
    /// None: the range was all zeros.
    data: Option<Vec<u8>>,
}

fn digest(offset: u64, len: u64, kind: u8, data: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&offset.to_le_bytes()).update(&len.to_le_bytes()).update(&[kind]).update(data);
    *h.finalize().as_bytes()
}

/// A journal as read back.
struct Contents {
    base_epoch: u64,
    base_size: u64,
    records: Vec<Record>,
    /// Length of the valid part.
    end: u64,
}

/// Read the header and every intact record (a record torn by a crash ends the journal: its
/// range was never overwritten, since data is written only after the record is durable).
fn read_journal(file: &File) -> io::Result<Option<Contents>> {
    let mut h = [0u8; HEADER_LEN as usize];
    if file.read_exact_at(&mut h, 0).is_err() || &h[..8] != MAGIC {
        return Ok(None);
    }
    let base_epoch = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
    let base_size = u64::from_le_bytes(h[16..24].try_into().expect("8 bytes"));
    let len = file.metadata()?.len();
    let mut records = Vec::new();
    let mut pos = HEADER_LEN;
    while pos + RECORD_HEADER as u64 <= len {
        let mut rh = [0u8; RECORD_HEADER];
        file.read_exact_at(&mut rh, pos)?;
        let magic = u32::from_le_bytes(rh[0..4].try_into().expect("4 bytes"));
        let offset = u64::from_le_bytes(rh[4..12].try_into().expect("8 bytes"));
        let rlen = u64::from_le_bytes(rh[12..20].try_into().expect("8 bytes"));
        let kind = rh[20];
        if magic != RECORD_MAGIC || (kind == KIND_DATA && rlen > MAX_RECORD) || kind > KIND_ZERO {
            break;
        }
        let payload = if kind == KIND_DATA { rlen } else { 0 };
        if pos + RECORD_HEADER as u64 + payload > len {
            break;
        }
        let mut data = vec![0u8; payload as usize];
        file.read_exact_at(&mut data, pos + RECORD_HEADER as u64)?;
        if rh[21..53] != digest(offset, rlen, kind, &data) {
            break;
        }
        records.push(Record { offset, len: rlen, data: (kind == KIND_DATA).then_some(data) });
        pos += RECORD_HEADER as u64 + payload;
    }
    Ok(Some(Contents { base_epoch, base_size, records, end: pos }))
}

/// The undo journal of an epoch: created at the epoch's first write, unless it had to exist from
/// the start (an earlier attempt's journal to continue, or a file whose size already differs
/// from its committed size, which a rollback must truncate).
pub enum Undo {
    Pending { path: PathBuf, committed: u64, base_size: u64 },
    Open(UndoJournal),
}

impl Undo {
    /// The journal for the epoch after `committed` (see `UndoJournal::open`); `size` is the
    /// file's size now.
    pub fn prepare(path: &Path, committed: u64, base_size: u64, size: u64) -> io::Result<Undo> {
        if size != base_size || path.exists() {
            return UndoJournal::open(path, committed, base_size).map(Undo::Open);
        }
        Ok(Undo::Pending { path: path.to_path_buf(), committed, base_size })
    }

    /// The journal, created (durably) now if it was pending.
    pub fn journal(&mut self) -> io::Result<&mut UndoJournal> {
        if let Undo::Pending { path, committed, base_size } = self {
            *self = Undo::Open(UndoJournal::open(path, *committed, *base_size)?);
        }
        match self {
            Undo::Open(j) => Ok(j),
            Undo::Pending { .. } => unreachable!("opened above"),
        }
    }
}

pub struct UndoJournal {
    file: File,
    base_size: u64,
    saved: Ranges,
    end: u64,
}

impl UndoJournal {
    /// The journal at `path` for the epoch after `committed` (the file being `base_size` bytes
    /// at that commit): an existing one for the same committed epoch is continued (a retry of
    /// the epoch: it already holds what earlier attempts overwrote); anything else is replaced.
    pub fn open(path: &Path, committed: u64, base_size: u64) -> io::Result<UndoJournal> {
        if let Ok(file) = OpenOptions::new().read(true).write(true).open(path) {
            if let Some(c) = read_journal(&file)? {
                if c.base_epoch == committed {
                    let mut saved = Ranges::default();
                    for r in &c.records {
                        saved.insert(r.offset, r.offset + r.len);
                    }
                    file.set_len(c.end)?;
                    return Ok(UndoJournal { file, base_size: c.base_size, saved, end: c.end });
                }
            }
        }
        let tmp = path.with_extension("tmp");
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&tmp)?;
        let mut h = [0u8; HEADER_LEN as usize];
        h[..8].copy_from_slice(MAGIC);
        h[8..16].copy_from_slice(&committed.to_le_bytes());
        h[16..24].copy_from_slice(&base_size.to_le_bytes());
        file.write_all_at(&h, 0)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_parent(path)?;
        Ok(UndoJournal { file, base_size, saved: Ranges::default(), end: HEADER_LEN })
    }

    /// Save the committed contents of `ranges` of `target` that are not saved yet, durably.
    /// Returns the bytes of data journaled.
    pub fn save(&mut self, target: &File, ranges: &[(u64, u64)]) -> io::Result<u64> {
        let mut pieces = Vec::new();
        let mut batch = Ranges::default();
        for &(offset, len) in ranges {
            // Beyond the committed size there is nothing to restore: rollback truncates.
            let end = (offset + len).min(self.base_size);
            if offset < end {
                for (s, e) in self.saved.missing(offset, end) {
                    for q in batch.missing(s, e) {
                        batch.insert(q.0, q.1);
                        pieces.push(q);
                    }
                }
            }
        }
        if pieces.is_empty() {
            return Ok(0);
        }
        let mut journaled = 0;
        for &(start, end) in &pieces {
            let mut pos = start;
            while pos < end {
                let n = (end - pos).min(MAX_RECORD);
                journaled += self.append(target, pos, n)?;
                pos += n;
            }
        }
        self.file.sync_data()?;
        for (start, end) in pieces {
            self.saved.insert(start, end);
        }
        Ok(journaled)
    }

    fn append(&mut self, target: &File, offset: u64, len: u64) -> io::Result<u64> {
        let data = if is_hole(target, offset, len)? {
            None
        } else {
            let mut buf = vec![0u8; len as usize];
            target.read_exact_at(&mut buf, offset)?;
            (!buf.iter().all(|&b| b == 0)).then_some(buf)
        };
        let (kind, payload) = match &data {
            Some(d) => (KIND_DATA, d.as_slice()),
            None => (KIND_ZERO, &[][..]),
        };
        let mut rec = Vec::with_capacity(RECORD_HEADER + payload.len());
        rec.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
        rec.extend_from_slice(&offset.to_le_bytes());
        rec.extend_from_slice(&len.to_le_bytes());
        rec.push(kind);
        rec.extend_from_slice(&digest(offset, len, kind, payload));
        rec.extend_from_slice(payload);
        self.file.write_all_at(&rec, self.end)?;
        self.end += rec.len() as u64;
        Ok(payload.len() as u64)
    }
}

/// Whether `[offset, offset+len)` of `f` is entirely a hole (never read then).
fn is_hole(f: &File, offset: u64, len: u64) -> io::Result<bool> {
    match rustix::fs::seek(f, SeekFrom::Data(offset)) {
        Ok(data) => Ok(data >= offset + len),
        Err(Errno::NXIO) => Ok(true),
        Err(Errno::INVAL) | Err(Errno::OPNOTSUPP) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// Remove the journal (after the commit it guarded is recorded).
pub fn discard(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => sync_parent(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// What a rollback restored.
#[derive(Debug, Default)]
pub struct Restored {
    /// Byte ranges rewritten with their committed contents.
    pub ranges: Vec<(u64, u64)>,
    /// The size the file was truncated to, if it had grown.
    pub truncated_to: Option<u64>,
}

/// Return `target` to the committed epoch `committed` with the journal at `path`; the journal
/// must belong to that epoch. The file is durable when this returns; the journal is left for
/// the caller to discard once the state says so too.
pub fn roll_back(path: &Path, target: &File, committed: u64) -> io::Result<Option<Restored>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let Some(Contents { base_epoch, base_size, records, .. }) = read_journal(&file)? else {
        return Ok(None);
    };
    if base_epoch != committed {
        return Ok(None);
    }
    let mut restored = Restored::default();
    for r in records.iter().rev() {
        match &r.data {
            Some(d) => target.write_all_at(d, r.offset)?,
            None => write_zeroes(target, r.offset, r.len)?,
        }
        restored.ranges.push((r.offset, r.len));
    }
    if base_size > 0 && target.metadata()?.len() > base_size {
        target.set_len(base_size)?;
        restored.truncated_to = Some(base_size);
    }
    target.sync_all()?;
    Ok(Some(restored))
}

fn write_zeroes(f: &File, offset: u64, len: u64) -> io::Result<()> {
    match rustix::fs::fallocate(f, FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE, offset, len) {
        Ok(()) => return Ok(()),
        Err(Errno::OPNOTSUPP) | Err(Errno::NOSYS) => {}
        Err(e) => return Err(e.into()),
    }
    let zeros = vec![0u8; 1 << 20];
    let mut pos = offset;
    while pos < offset + len {
        let n = (offset + len - pos).min(zeros.len() as u64) as usize;
        f.write_all_at(&zeros[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

/// Where a target's journal lives in its state dir.
pub fn path_in(state_dir: &Path) -> PathBuf {
    state_dir.join("undo.bin")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1).collect()
    }

    #[test]
    fn a_journal_is_created_at_the_first_write_unless_it_must_exist_before() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("undo.bin");
        // Same size as committed, no journal yet: nothing on disk until the first write.
        let mut u = Undo::prepare(&path, 4, 4096, 4096).unwrap();
        assert!(matches!(u, Undo::Pending { .. }) && !path.exists());
        u.journal().unwrap();
        assert!(path.exists());
        // An earlier attempt's journal is continued at once.
        assert!(matches!(Undo::prepare(&path, 4, 4096, 4096).unwrap(), Undo::Open(_)));
        std::fs::remove_file(&path).unwrap();
        // A file grown since the commit needs the journal (its committed size) from the start.
        assert!(matches!(Undo::prepare(&path, 4, 4096, 8192).unwrap(), Undo::Open(_)));
        assert!(path.exists());
    }

    #[test]
    fn ranges_merge_and_report_what_is_missing() {
        let mut r = Ranges::default();
        r.insert(10, 20);
        r.insert(30, 40);
        assert_eq!(r.missing(0, 50), vec![(0, 10), (20, 30), (40, 50)]);
        assert_eq!(r.missing(12, 18), vec![]);
        assert_eq!(r.missing(15, 35), vec![(20, 30)]);
        r.insert(20, 30);
        assert_eq!(r.0.len(), 1);
        assert_eq!(r.missing(0, 50), vec![(0, 10), (40, 50)]);
        r.insert(5, 45);
        assert_eq!(r.0.iter().map(|(a, b)| (*a, *b)).collect::<Vec<_>>(), vec![(5, 45)]);
    }

    #[test]
    fn overwrites_are_undone_and_growth_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let (tp, jp) = (dir.path().join("disk"), dir.path().join("undo.bin"));
        let size = 8u64 << 20;
        let t = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&tp).unwrap();
        t.set_len(size).unwrap();
        t.write_all_at(&pattern(1, 3 << 20), 1 << 20).unwrap(); // data in 1..4 MiB, holes elsewhere
        let committed = std::fs::read(&tp).unwrap();

        let mut j = UndoJournal::open(&jp, 5, size).unwrap();
        // An overwrite of data, of a hole, a second overwrite of the same range, and growth.
        let w = [(512 << 10, 1 << 20), (6 << 20, 1 << 20), (1 << 20, 4096)];
        assert!(j.save(&t, &w).unwrap() > 0);
        for (i, &(o, l)) in w.iter().enumerate() {
            t.write_all_at(&pattern(10 + i as u8, l as usize), o).unwrap();
        }
        assert_eq!(j.save(&t, &[(1 << 20, 4096)]).unwrap(), 0, "a range is journaled only once");
        t.set_len(size + (4 << 20)).unwrap();
        drop(j);
        // A crash and a retry continue the same journal; another committed epoch replaces it.
        let mut j = UndoJournal::open(&jp, 5, size).unwrap();
        assert_eq!(j.save(&t, &[(512 << 10, 4096)]).unwrap(), 0);
        drop(j);
        assert!(roll_back(&jp, &t, 4).unwrap().is_none(), "a journal of another epoch was applied");
        let r = roll_back(&jp, &t, 5).unwrap().unwrap();
        assert_eq!(r.truncated_to, Some(size));
        assert_eq!(std::fs::read(&tp).unwrap(), committed);
        discard(&jp).unwrap();
        assert!(!jp.exists());
    }

    #[test]
    fn a_torn_record_ends_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let (tp, jp) = (dir.path().join("disk"), dir.path().join("undo.bin"));
        let t = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&tp).unwrap();
        t.write_all_at(&pattern(3, 2 << 20), 0).unwrap();
        let mut j = UndoJournal::open(&jp, 1, 2 << 20).unwrap();
        j.save(&t, &[(0, 4096)]).unwrap();
        j.save(&t, &[(1 << 20, 4096)]).unwrap();
        drop(j);
        // Tear the second record's payload.
        let jf = OpenOptions::new().write(true).open(&jp).unwrap();
        let len = jf.metadata().unwrap().len();
        jf.set_len(len - 100).unwrap();
        let c = read_journal(&File::open(&jp).unwrap()).unwrap().unwrap();
        assert_eq!(c.records.len(), 1);
        // Reopening for the retry drops the torn tail and saves that range again.
        let mut j = UndoJournal::open(&jp, 1, 2 << 20).unwrap();
        assert_eq!(j.save(&t, &[(1 << 20, 4096)]).unwrap(), 4096);
    }
}
