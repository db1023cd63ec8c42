//! The durable watermark of an epoch. Items (chunks and zero extents) are numbered densely in
//! offset order by the agent but complete out of order across streams; the watermark is the
//! longest completed prefix, and its end offset is what a resumed incremental epoch may skip.

use std::collections::BTreeMap;

/// Most completed items held beyond the prefix; more means an agent skipped a sequence number.
pub const MAX_OUT_OF_ORDER: usize = 1 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WatermarkError {
    #[error("item {0} was received twice")]
    Duplicate(u64),
    #[error("more than {MAX_OUT_OF_ORDER} items completed beyond a missing item {0}")]
    Gap(u64),
}

#[derive(Debug, Clone)]
pub struct Watermark {
    next: u64,
    offset: u64,
    ahead: BTreeMap<u64, u64>,
}

impl Watermark {
    /// A watermark for an epoch that starts (or resumes) at `resume_offset`.
    pub fn new(resume_offset: u64) -> Self {
        Watermark { next: 0, offset: resume_offset, ahead: BTreeMap::new() }
    }

    /// Record item `seq`, which ends at byte `end`, as written.
    pub fn complete(&mut self, seq: u64, end: u64) -> Result<(), WatermarkError> {
        if seq < self.next || self.ahead.contains_key(&seq) {
            return Err(WatermarkError::Duplicate(seq));
        }
        if seq != self.next {
            if self.ahead.len() >= MAX_OUT_OF_ORDER {
                return Err(WatermarkError::Gap(self.next));
            }
            self.ahead.insert(seq, end);
            return Ok(());
        }
        self.next += 1;
        self.offset = self.offset.max(end);
        while let Some(end) = self.ahead.remove(&self.next) {
            self.next += 1;
            self.offset = self.offset.max(end);
        }
        Ok(())
    }

    /// Every item below this sequence number is complete.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// End offset of the completed prefix (at least the resume offset).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Whether all of the first `items` items are complete.
    pub fn all_of(&self, items: u64) -> bool {
        self.next >= items
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_advances_over_out_of_order_completions() {
        let mut w = Watermark::new(100);
        assert_eq!((w.next(), w.offset()), (0, 100));
        w.complete(1, 300).unwrap();
        w.complete(2, 400).unwrap();
        assert_eq!((w.next(), w.offset()), (0, 100));
        w.complete(0, 200).unwrap();
        assert_eq!((w.next(), w.offset()), (3, 400));
        assert!(w.all_of(3));
        assert!(!w.all_of(4));
    }

    #[test]
    fn duplicates_are_errors() {
        let mut w = Watermark::new(0);
        w.complete(0, 10).unwrap();
        assert_eq!(w.complete(0, 10), Err(WatermarkError::Duplicate(0)));
        w.complete(5, 60).unwrap();
        assert_eq!(w.complete(5, 60), Err(WatermarkError::Duplicate(5)));
    }
}
