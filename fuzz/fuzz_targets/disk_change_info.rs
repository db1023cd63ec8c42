//! Arbitrary text as a DiskChangeInfo change list (`--changes FILE`) for a disk whose size the
//! first eight bytes pick: refused with a message, or extents that are sorted, disjoint and
//! inside the disk.
#![no_main]

use blockship_agent::changes::cbt_file;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let size = u64::from_le_bytes(data[..8].try_into().expect("8 bytes")) >> (data[0] % 64);
    let Ok(text) = std::str::from_utf8(&data[8..]) else { return };
    if let Ok(extents) = cbt_file::parse(text, size) {
        let mut end = 0;
        for e in &extents {
            assert!(e.len > 0 && e.offset >= end && e.end() <= size, "{e:?} of {extents:?}, disk {size}");
            end = e.end();
        }
    }
});
