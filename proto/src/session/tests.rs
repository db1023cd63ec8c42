//! The session state machine without sockets: every ordering rule, malformed and out-of-order
//! sequences, and random sequences (which must never panic and whose accepted steps must keep
//! the rules).

use proptest::prelude::*;

use super::*;

fn hello() -> Body {
    Body::Hello(pb::Hello { min_version: 1, max_version: 9, ..Default::default() })
}

fn open(disk: u32) -> Body {
    Body::OpenDisk(pb::OpenDisk { disk, size: 1 << 20, target: "file:t".into(), ..Default::default() })
}

fn begin(disk: u32, epoch: u64, group: &str) -> Body {
    Body::EpochBegin(pb::EpochBegin { disk, epoch, group: group.into(), ..Default::default() })
}

fn commit(disk: u32, epoch: u64) -> Body {
    Body::EpochCommit(pb::EpochCommit { disk, epoch, ..Default::default() })
}

fn group_open(group: &str, disks: &[u32]) -> Body {
    Body::GroupOpen(pb::GroupOpen { group: group.into(), disks: disks.to_vec() })
}

fn group_commit(group: &str, epoch: u64) -> Body {
    Body::GroupCommit(pb::GroupCommit { group: group.into(), epoch })
}

fn cutover(group: &str, epoch: u64) -> Body {
    Body::GroupCutover(pb::GroupCutover { group: group.into(), epoch })
}

/// A session past Hello with these disks open.
fn ready(disks: &[u32]) -> SinkSession {
    let mut s = SinkSession::new();
    assert!(matches!(s.on_message(hello()), Ok(Step::Hello(_))));
    for &d in disks {
        assert!(matches!(s.on_message(open(d)), Ok(Step::OpenDisk(_))));
    }
    s
}

fn scope_of(r: Result<Step, Violation>) -> Scope {
    match r {
        Err(v) => v.scope,
        Ok(step) => panic!("accepted: {step:?}"),
    }
}

/// Begin and commit `epoch` on `disk` as the sink would, reporting success.
fn run_epoch(s: &mut SinkSession, disk: u32, epoch: u64, group: &str) {
    match s.on_message(begin(disk, epoch, group)) {
        Ok(Step::Begin { .. }) => s.epoch_begun(disk, epoch),
        other => panic!("{other:?}"),
    }
    assert!(matches!(s.on_message(commit(disk, epoch)), Ok(Step::Commit(_))));
}

#[test]
fn hello_comes_first_and_once() {
    for first in [open(1), commit(1, 1), Body::Progress(pb::Progress::default()), group_commit("g", 1)] {
        let mut s = SinkSession::new();
        let v = s.on_message(first).unwrap_err();
        assert_eq!(v.scope, Scope::Connection);
        assert!(v.message.contains("expected Hello first"), "{}", v.message);
    }
    let mut s = ready(&[]);
    assert_eq!(scope_of(s.on_message(hello())), Scope::Connection);
}

#[test]
fn disk_handles_only_grow() {
    let mut s = ready(&[2]);
    for stale in [2, 1, 0] {
        let v = s.on_message(open(stale)).unwrap_err();
        assert_eq!(v.scope, Scope::Connection, "handle {stale}");
        assert!(v.message.contains("only grow"));
    }
    assert!(s.on_message(open(7)).is_ok());
}

#[test]
fn a_disk_is_used_only_while_open() {
    let mut s = ready(&[1]);
    for msg in [
        begin(2, 1, ""),
        commit(2, 1),
        Body::IndexRequest(pb::IndexRequest { disk: 2 }),
        Body::VerifyRequest(pb::VerifyRequest { disk: 2 }),
    ] {
        assert_eq!(scope_of(s.on_message(msg)), Scope::Disk(2));
    }
    // A failed or closed disk is gone: its handle refuses everything and cannot be reopened.
    s.disk_failed(1);
    assert_eq!(scope_of(s.on_message(begin(1, 1, ""))), Scope::Disk(1));
    assert_eq!(scope_of(s.on_message(open(1))), Scope::Connection);
    let mut s = ready(&[3]);
    assert_eq!(s.on_message(Body::CloseDisk(pb::CloseDisk { disk: 3 })), Ok(Step::CloseDisk(3)));
    assert_eq!(scope_of(s.on_message(commit(3, 1))), Scope::Disk(3));
    assert_eq!(s.open_disks(), 0);
}

#[test]
fn one_epoch_per_disk_committed_under_its_own_number() {
    let mut s = ready(&[1]);
    // Commit before any begin.
    let v = s.on_message(commit(1, 1)).unwrap_err();
    assert!(v.message.contains("no epoch is open"), "{}", v.message);
    let mut s = ready(&[1]);
    assert!(s.on_message(begin(1, 1, "")).is_ok());
    s.epoch_begun(1, 1);
    // A second begin, an index request during the epoch, a commit of another epoch: refused.
    assert!(s.clone_probe(begin(1, 2, "")).contains("while epoch 1 is open"));
    assert!(s.clone_probe(Body::IndexRequest(pb::IndexRequest { disk: 1 })).contains("during an epoch"));
    assert!(s.clone_probe(commit(1, 2)).contains("while epoch 1 is open"));
    // The right commit is accepted once; the epoch is then closed.
    assert!(matches!(s.on_message(commit(1, 1)), Ok(Step::Commit(_))));
    assert!(s.on_message(commit(1, 1)).unwrap_err().message.contains("no epoch is open"));
    // Verification is allowed at any time (it needs no write lease).
    assert_eq!(s.on_message(Body::VerifyRequest(pb::VerifyRequest { disk: 1 })), Ok(Step::Verify(1)));
}

#[test]
fn a_begin_the_sink_refused_leaves_no_epoch_open() {
    // The sink refuses the begin (e.g. a wrong epoch number against the durable state): the
    // machine never saw `epoch_begun`, and the disk scope closes the handle.
    let mut s = ready(&[1]);
    assert!(s.on_message(begin(1, 5, "")).is_ok());
    s.disk_failed(1);
    assert_eq!(scope_of(s.on_message(commit(1, 5))), Scope::Disk(1));
}

#[test]
fn groups_commit_in_sequence_after_every_member() {
    let mut s = ready(&[1, 2]);
    // Not open yet.
    assert_eq!(scope_of(s.on_message(group_commit("vm", 1))), Scope::Group("vm".into()));
    assert_eq!(scope_of(s.on_message(begin(1, 1, "vm"))), Scope::Disk(1));
    // A member that is not an open disk of this session.
    assert!(s.clone_probe(group_open("vm", &[1, 9])).contains("disk handle 9 is not open"));
    assert!(matches!(s.on_message(group_open("vm", &[1, 2])), Ok(Step::GroupOpen(_))));
    s.group_opened("vm", vec![1, 2], 0);
    // Not a member of that group.
    let mut t = ready(&[1, 2, 3]);
    t.group_opened("vm", vec![1, 2], 0);
    assert!(t.on_message(begin(3, 1, "vm")).unwrap_err().message.contains("not a member"));

    // Out of order: the group commit before the members committed, or before the second one.
    assert!(s.clone_probe(group_commit("vm", 1)).contains("before member disk 1"));
    match s.on_message(begin(1, 1, "vm")) {
        Ok(Step::Begin { group_committed: Some(0), .. }) => s.epoch_begun(1, 1),
        other => panic!("{other:?}"),
    }
    assert!(s.on_message(commit(1, 1)).is_ok());
    assert!(s.clone_probe(group_commit("vm", 1)).contains("before member disk 2"));
    run_epoch(&mut s, 2, 1, "vm");
    // Skipping ahead or repeating the committed epoch is refused.
    assert!(s.clone_probe(group_commit("vm", 2)).contains("in sequence"));
    assert_eq!(
        s.on_message(group_commit("vm", 1)),
        Ok(Step::GroupCommit { group: "vm".into(), epoch: 1, members: vec![1, 2] })
    );
    s.group_committed("vm", 1);
    assert!(s.clone_probe(group_commit("vm", 1)).contains("in sequence"));
    // Epoch 2: a member that failed mid-epoch makes the group commit refuse.
    run_epoch(&mut s, 1, 2, "vm");
    run_epoch(&mut s, 2, 2, "vm");
    let mut failed = s.snapshot();
    failed.disk_failed(2);
    assert!(failed.on_message(group_commit("vm", 2)).unwrap_err().message.contains("no longer open"));
    assert!(s.on_message(group_commit("vm", 2)).is_ok());
}

#[test]
fn a_cutover_finalises_the_committed_epoch_only() {
    let mut s = ready(&[1]);
    s.group_opened("vm", vec![1], 0);
    // Nothing committed yet: nothing to cut over.
    assert!(s.clone_probe(cutover("vm", 0)).contains("finalises the committed epoch"));
    run_epoch(&mut s, 1, 1, "vm");
    assert!(s.on_message(group_commit("vm", 1)).is_ok());
    s.group_committed("vm", 1);
    for wrong in [0, 2] {
        assert!(s.clone_probe(cutover("vm", wrong)).contains("finalises the committed epoch"));
    }
    assert_eq!(
        s.on_message(cutover("vm", 1)),
        Ok(Step::GroupCutover { group: "vm".into(), epoch: 1, members: vec![1] })
    );
    assert!(scope_of(s.on_message(cutover("other", 1))) == Scope::Group("other".into()));
}

#[test]
fn data_and_reply_messages_on_the_control_stream_end_the_connection() {
    for msg in [
        Body::Chunk(pb::ChunkHeader::default()),
        Body::Zero(pb::ZeroExtent::default()),
        Body::Ack(pb::Ack::default()),
        Body::HelloReply(pb::HelloReply::default()),
        Body::GroupCommitted(pb::GroupCommitted::default()),
    ] {
        let mut s = ready(&[1]);
        let v = s.on_message(msg).unwrap_err();
        assert_eq!(v.scope, Scope::Connection);
        assert!(v.message.contains("expected a control message"), "{}", v.message);
    }
}

impl SinkSession {
    /// A copy to try a message on without changing this session.
    fn snapshot(&self) -> SinkSession {
        SinkSession {
            said_hello: self.said_hello,
            last_handle: self.last_handle,
            disks: self.disks.clone(),
            groups: self.groups.clone(),
        }
    }

    /// The refusal `msg` would get (panics if it would be accepted); this session is unchanged.
    fn clone_probe(&self, msg: Body) -> String {
        match self.snapshot().on_message(msg) {
            Err(v) => v.message,
            Ok(step) => panic!("accepted: {step:?}"),
        }
    }
}

/// Any control-ish message over a few handles, groups and epochs.
fn any_message() -> impl Strategy<Value = Body> {
    let d = 0u32..5;
    let e = 0u64..4;
    let g = prop_oneof![Just(String::new()), Just("a".to_string()), Just("b".to_string())];
    prop_oneof![
        Just(hello()),
        d.clone().prop_map(open),
        d.clone().prop_map(|disk| Body::CloseDisk(pb::CloseDisk { disk })),
        d.clone().prop_map(|disk| Body::IndexRequest(pb::IndexRequest { disk })),
        (d.clone(), e.clone(), g.clone()).prop_map(|(d, e, g)| begin(d, e, &g)),
        (d.clone(), e.clone()).prop_map(|(d, e)| commit(d, e)),
        (g.clone(), proptest::collection::vec(d, 0..4)).prop_map(|(g, v)| group_open(&g, &v)),
        (g.clone(), e.clone()).prop_map(|(g, e)| group_commit(&g, e)),
        (g, e).prop_map(|(g, e)| cutover(&g, e)),
        Just(Body::Chunk(pb::ChunkHeader::default())),
    ]
}

proptest! {
    /// Random sequences, with the sink reporting every step as successful: nothing panics, a
    /// connection-scope refusal is final, and every accepted step keeps the rules.
    #[test]
    fn random_sequences_keep_the_rules(msgs in proptest::collection::vec(any_message(), 0..60)) {
        let mut s = SinkSession::new();
        let mut committed: HashMap<String, u64> = HashMap::new();
        let mut max_handle = 0;
        for msg in msgs {
            match s.on_message(msg) {
                Err(v) => {
                    match v.scope {
                        Scope::Connection => break,
                        Scope::Disk(h) => s.disk_failed(h),
                        Scope::Group(_) => {}
                    }
                }
                Ok(Step::OpenDisk(req)) => {
                    prop_assert!(req.disk > max_handle);
                    max_handle = req.disk;
                }
                Ok(Step::Begin { req, .. }) => s.epoch_begun(req.disk, req.epoch),
                Ok(Step::GroupOpen(req)) => {
                    let c = committed.get(&req.group).copied().unwrap_or(0);
                    s.group_opened(&req.group, req.disks, c);
                }
                Ok(Step::GroupCommit { group, epoch, members }) => {
                    let c = committed.entry(group.clone()).or_insert(0);
                    prop_assert_eq!(epoch, *c + 1);
                    prop_assert!(!members.is_empty());
                    *c = epoch;
                    s.group_committed(&group, epoch);
                }
                Ok(Step::GroupCutover { group, epoch, .. }) => {
                    prop_assert!(epoch > 0);
                    prop_assert_eq!(Some(epoch), committed.get(&group).copied());
                }
                Ok(_) => {}
            }
        }
    }
}
