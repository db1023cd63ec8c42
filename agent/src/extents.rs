//! Byte extents of a disk: normalising (sort + merge) and splitting them on the chunk grid, so
//! that no piece crosses a chunk boundary and each piece maps to exactly one hash-index entry.

/// A byte range `[offset, offset + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
}

impl Extent {
    pub fn new(offset: u64, len: u64) -> Self {
        Extent { offset, len }
    }

    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// Sort, drop empty extents, and merge overlapping or adjacent ones.
pub fn normalize(mut extents: Vec<Extent>) -> Vec<Extent> {
    extents.retain(|e| e.len > 0);
    extents.sort_unstable();
    let mut out: Vec<Extent> = Vec::with_capacity(extents.len());
    for e in extents {
        match out.last_mut() {
            Some(last) if e.offset <= last.end() => {
                let end = last.end().max(e.end());
                last.len = end - last.offset;
            }
            _ => out.push(e),
        }
    }
    out
}

/// Total bytes of normalised extents.
pub fn total(extents: &[Extent]) -> u64 {
    extents.iter().map(|e| e.len).sum()
}

/// The complement of normalised `data` within `[0, size)`.
pub fn holes(data: &[Extent], size: u64) -> Vec<Extent> {
    let mut out = Vec::new();
    let mut pos = 0;
    for e in data {
        if e.offset > pos {
            out.push(Extent::new(pos, e.offset - pos));
        }
        pos = pos.max(e.end());
    }
    if pos < size {
        out.push(Extent::new(pos, size - pos));
    }
    out
}

/// A piece of an extent that lies within one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub chunk: u64,
    pub offset: u64,
    pub len: u64,
}

/// Split normalised extents on the chunk grid, lazily (a 1 TiB disk is a million pieces).
pub fn pieces(extents: Vec<Extent>, chunk_size: u32) -> impl Iterator<Item = Piece> {
    let cs = u64::from(chunk_size);
    extents.into_iter().flat_map(move |e| {
        let mut pos = e.offset;
        std::iter::from_fn(move || {
            if pos >= e.end() {
                return None;
            }
            let chunk = pos / cs;
            let end = ((chunk + 1) * cs).min(e.end());
            let piece = Piece { chunk, offset: pos, len: end - pos };
            pos = end;
            Some(piece)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn normalize_merges_overlaps_and_neighbours() {
        let e = normalize(vec![
            Extent::new(10, 5),
            Extent::new(0, 10),
            Extent::new(30, 0),
            Extent::new(12, 10),
            Extent::new(40, 1),
        ]);
        assert_eq!(e, vec![Extent::new(0, 22), Extent::new(40, 1)]);
    }

    #[test]
    fn holes_complement() {
        let data = vec![Extent::new(10, 10), Extent::new(30, 5)];
        assert_eq!(holes(&data, 40), vec![Extent::new(0, 10), Extent::new(20, 10), Extent::new(35, 5)]);
        assert_eq!(holes(&[], 7), vec![Extent::new(0, 7)]);
        assert_eq!(holes(&[Extent::new(0, 7)], 7), vec![]);
    }

    #[test]
    fn pieces_follow_the_grid() {
        let p: Vec<Piece> = pieces(vec![Extent::new(100, 250), Extent::new(1000, 10)], 128).collect();
        assert_eq!(
            p,
            vec![
                Piece { chunk: 0, offset: 100, len: 28 },
                Piece { chunk: 1, offset: 128, len: 128 },
                Piece { chunk: 2, offset: 256, len: 94 },
                Piece { chunk: 7, offset: 1000, len: 10 },
            ]
        );
    }

    proptest! {
        #[test]
        fn pieces_cover_exactly_the_extents(raw in proptest::collection::vec((0u64..10_000, 0u64..3_000), 0..20),
                                            shift in 6u32..12) {
            let cs = 1u32 << shift;
            let ext = normalize(raw.into_iter().map(|(o, l)| Extent::new(o, l)).collect());
            let ps: Vec<Piece> = pieces(ext.clone(), cs).collect();
            prop_assert_eq!(ps.iter().map(|p| p.len).sum::<u64>(), total(&ext));
            for p in &ps {
                prop_assert!(p.len > 0);
                prop_assert_eq!(p.offset / u64::from(cs), p.chunk);
                prop_assert_eq!((p.offset + p.len - 1) / u64::from(cs), p.chunk);
            }
            prop_assert_eq!(normalize(ps.iter().map(|p| Extent::new(p.offset, p.len)).collect()), ext);
        }
    }
}
