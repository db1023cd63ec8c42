//! `null:NAME` targets, for `blockship-agent bench`: every chunk is received, decoded and
//! BLAKE3-verified like any other, then discarded, so a link and both sides' CPU can be measured
//! without a disk in the way. Only agents whose `--allow` rule names `null:` may use one (the
//! rule's type is matched literally). The replication state is kept in the state dir as for
//! files, so epochs, resume and acks behave as for a real target; the data reads back as zeros.

use bytes::Bytes;

use super::{Access, Opened, TargetError, TargetName};

pub struct NullTarget {
    size: u64,
}

impl NullTarget {
    pub fn open(name: &TargetName, size: u64, access: Access) -> Result<(NullTarget, Opened), TargetError> {
        if matches!(access, Access::ReadOnly | Access::Repair) {
            return Err(TargetError::BadName {
                name: name.to_string(),
                reason: "a null target discards what it receives: there is nothing to verify or repair"
                    .into(),
            });
        }
        Ok((NullTarget { size }, Opened::Existing))
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn read(&self, len: usize) -> Bytes {
        Bytes::from(vec![0u8; len])
    }
}
