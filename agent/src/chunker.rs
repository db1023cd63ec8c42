//! The chunker turns what must be looked at into work on the chunk grid: whole chunks for a
//! fresh target (only those holding allocated data) and for compare mode (every chunk, with
//! chunks that lie entirely in a source hole marked as known zeros), and exact pieces of the
//! changed extents for incremental epochs. Work is generated lazily; memory stays flat.

use crate::extents::{normalize, pieces, Extent, Piece};

/// One unit of work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Read this piece from the source.
    Read(Piece),
    /// This piece lies in a hole of the source: it is zeros, nothing to read.
    Hole(Piece),
}

impl Work {
    pub fn piece(&self) -> Piece {
        match self {
            Work::Read(p) | Work::Hole(p) => *p,
        }
    }
}

/// Extents widened to whole chunks (the last chunk may be short), merged.
pub fn align_out(extents: &[Extent], chunk_size: u32, size: u64) -> Vec<Extent> {
    let cs = u64::from(chunk_size);
    normalize(
        extents
            .iter()
            .map(|e| {
                let start = e.offset / cs * cs;
                let end = e.end().div_ceil(cs).saturating_mul(cs).min(size);
                Extent::new(start, end - start)
            })
            .collect(),
    )
}

/// A new (all-zero) target: every chunk that holds allocated data, whole.
pub fn fresh(allocated: &[Extent], chunk_size: u32, size: u64) -> (u64, impl Iterator<Item = Work>) {
    let aligned = align_out(allocated, chunk_size, size);
    let planned = crate::extents::total(&aligned);
    (planned, pieces(aligned, chunk_size).map(Work::Read))
}

/// Compare mode: every chunk of the disk.
pub fn compare(allocated: Vec<Extent>, chunk_size: u32, size: u64) -> (u64, impl Iterator<Item = Work>) {
    let cs = u64::from(chunk_size);
    let chunks = blockship_proto::chunk_count(size, chunk_size);
    let mut next = 0usize;
    let iter = (0..chunks).map(move |chunk| {
        let offset = chunk * cs;
        let len = cs.min(size - offset);
        while next < allocated.len() && allocated[next].end() <= offset {
            next += 1;
        }
        let piece = Piece { chunk, offset, len };
        if next < allocated.len() && allocated[next].offset < offset + len {
            Work::Read(piece)
        } else {
            Work::Hole(piece)
        }
    });
    (size, iter)
}

/// Incremental: the changed extents, piece by piece, skipping what a resumed epoch already made
/// durable (everything ending at or before `resume_offset`).
pub fn incremental(
    changed: Vec<Extent>,
    chunk_size: u32,
    resume_offset: u64,
) -> (u64, impl Iterator<Item = Work>) {
    let planned = changed
        .iter()
        .map(|e| if e.end() <= resume_offset { 0 } else { e.end() - e.offset.max(resume_offset) })
        .sum();
    let iter = pieces(changed, chunk_size).filter(move |p| p.offset + p.len > resume_offset).map(Work::Read);
    (planned, iter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_reads_whole_chunks_with_data() {
        let (planned, w) = fresh(&[Extent::new(100, 10), Extent::new(1000, 300)], 256, 1100);
        let w: Vec<Work> = w.collect();
        assert_eq!(
            w,
            vec![
                Work::Read(Piece { chunk: 0, offset: 0, len: 256 }),
                Work::Read(Piece { chunk: 3, offset: 768, len: 256 }),
                Work::Read(Piece { chunk: 4, offset: 1024, len: 76 }),
            ]
        );
        assert_eq!(planned, 256 + 256 + 76);
    }

    #[test]
    fn compare_marks_chunks_in_holes() {
        let (planned, w) = compare(vec![Extent::new(300, 10)], 256, 1000);
        let w: Vec<Work> = w.collect();
        assert_eq!(planned, 1000);
        assert_eq!(w.len(), 4);
        assert!(matches!(w[0], Work::Hole(_)));
        assert!(matches!(w[1], Work::Read(Piece { chunk: 1, .. })));
        assert!(matches!(w[2], Work::Hole(_)));
        assert_eq!(w[3].piece(), Piece { chunk: 3, offset: 768, len: 232 });
    }

    #[test]
    fn incremental_skips_the_resumed_prefix() {
        let ext = vec![Extent::new(0, 100), Extent::new(300, 200)];
        let (planned, w) = incremental(ext.clone(), 256, 0);
        assert_eq!(planned, 300);
        // [0, 100) in chunk 0; [300, 500) lies inside chunk 1 = [256, 512).
        assert_eq!(w.count(), 2);
        let (planned, w) = incremental(ext, 256, 256);
        let w: Vec<Work> = w.collect();
        assert_eq!(planned, 200);
        assert_eq!(w, vec![Work::Read(Piece { chunk: 1, offset: 300, len: 200 })]);
    }
}
