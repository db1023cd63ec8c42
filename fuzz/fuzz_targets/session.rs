//! Arbitrary bytes as a sequence of control frames into the sink's session state machine, the
//! sink reporting every step as done: no panic, and the steps it accepts keep the rules (disk
//! handles grow, group epochs commit in sequence, a cutover only at the committed epoch).
#![no_main]

use std::collections::HashMap;

use blockship_proto::session::{Scope, SinkSession, Step};
use blockship_proto::FrameDecoder;
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    let mut dec = FrameDecoder::new();
    let mut s = SinkSession::new();
    let mut committed: HashMap<String, u64> = HashMap::new();
    let mut last_handle = 0;
    while let Ok(Some(frame)) = dec.decode(&mut buf) {
        match s.on_message(frame.body) {
            Err(v) => match v.scope {
                Scope::Connection => return,
                Scope::Disk(h) => s.disk_failed(h),
                Scope::Group(_) => {}
            },
            Ok(Step::OpenDisk(req)) => {
                assert!(req.disk > last_handle);
                last_handle = req.disk;
            }
            Ok(Step::Begin { req, .. }) => s.epoch_begun(req.disk, req.epoch),
            Ok(Step::GroupOpen(req)) => {
                let c = committed.get(&req.group).copied().unwrap_or(0);
                s.group_opened(&req.group, req.disks, c);
            }
            Ok(Step::GroupCommit { group, epoch, .. }) => {
                let c = committed.entry(group.clone()).or_insert(0);
                assert_eq!(epoch, *c + 1);
                *c = epoch;
                s.group_committed(&group, epoch);
            }
            Ok(Step::GroupCutover { group, epoch, .. }) => {
                assert!(epoch > 0);
                assert_eq!(Some(epoch), committed.get(&group).copied());
            }
            Ok(_) => {}
        }
    }
});
