//! Changed extents: where the data that must be sent this epoch is. `--changes` picks how they
//! are found: a VMware DiskChangeInfo file, a QEMU dirty bitmap over NBD, vSphere Changed Block
//! Tracking, RBD snapshot diffs, or none (a compare or full sync); `auto` uses the platform's
//! tracking when the target's change point is valid for it and falls back to compare otherwise.

pub mod cbt_file;

use std::path::PathBuf;

use crate::extents::Extent;

/// How changed extents are found (`--changes`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changes {
    /// The platform's tracking when a valid change point exists, else compare.
    Auto,
    /// Rewrite every chunk (zeros as zero extents), ignoring the target's hash index.
    Full,
    /// Send what differs from the target's hash index.
    Compare,
    /// A VMware DiskChangeInfo JSON file.
    CbtFile(PathBuf),
    /// QEMU dirty bitmap NAME of the NBD export (changes since the target's change point NAME).
    NbdBitmap(String),
    /// vSphere Changed Block Tracking.
    Vmware,
    /// RBD snapshot diff against the last replicated snapshot.
    RbdSnap,
}

impl std::str::FromStr for Changes {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "auto" => Changes::Auto,
            "full" => Changes::Full,
            "compare" => Changes::Compare,
            "vmware" => Changes::Vmware,
            "rbd-snap" => Changes::RbdSnap,
            _ => match s.split_once(':') {
                Some(("cbt-file", f)) if !f.is_empty() => Changes::CbtFile(f.into()),
                Some(("nbd-bitmap", b)) if !b.is_empty() => Changes::NbdBitmap(b.into()),
                _ => {
                    return Err(format!(
                        "--changes {s:?}: use auto, full, compare, cbt-file:FILE, nbd-bitmap:NAME, vmware or rbd-snap"
                    ))
                }
            },
        })
    }
}

impl Changes {
    /// Whether this choice can only update an existing replica.
    pub fn needs_existing_target(&self) -> bool {
        matches!(self, Changes::CbtFile(_) | Changes::NbdBitmap(_))
    }
}

/// Digest of a plan: the same digest on a re-run means the same items read from the same frozen
/// view of the source, so an interrupted incremental epoch may resume after its durable offset.
/// The view is part of it: the same extents read from a later point in time are another plan.
pub fn plan_digest(mode: i32, chunk_size: u32, size: u64, view: &str, extents: &[Extent]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"blockship-plan-v2");
    h.update(&mode.to_le_bytes()).update(&chunk_size.to_le_bytes()).update(&size.to_le_bytes());
    h.update(&(view.len() as u64).to_le_bytes()).update(view.as_bytes());
    for e in extents {
        h.update(&e.offset.to_le_bytes()).update(&e.len.to_le_bytes());
    }
    *h.finalize().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_choices() {
        assert_eq!("auto".parse::<Changes>().unwrap(), Changes::Auto);
        assert_eq!("cbt-file:/x.json".parse::<Changes>().unwrap(), Changes::CbtFile("/x.json".into()));
        assert_eq!("nbd-bitmap:cbt3".parse::<Changes>().unwrap(), Changes::NbdBitmap("cbt3".into()));
        for bad in ["", "cbt-file:", "bitmap:x", "nbd-bitmap:", "VMware"] {
            assert!(bad.parse::<Changes>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_view_is_part_of_the_plan() {
        let e = [Extent::new(0, 1 << 20)];
        let a = plan_digest(3, 1 << 20, 1 << 30, "rbd:p/i@blockship-src-2#4", &e);
        assert_eq!(a, plan_digest(3, 1 << 20, 1 << 30, "rbd:p/i@blockship-src-2#4", &e));
        assert_ne!(a, plan_digest(3, 1 << 20, 1 << 30, "rbd:p/i@blockship-src-2#5", &e));
        assert_ne!(a, plan_digest(3, 1 << 20, 1 << 30, "", &e));
    }
}
