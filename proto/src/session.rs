//! The sink's side of a session's control stream as a state machine without I/O (the
//! `quinn-proto` way): it takes each control message the agent sends and either refuses it, with
//! the scope the refusal ends (a disk, a group's epoch, or the connection), or says which step
//! the sink must now carry out. The sink's session code (over QUIC or gRPC alike) drives it and
//! reports the outcome of each step back (`disk_failed`, `epoch_begun`, `group_opened`, ...), so
//! ordering rules live here and are tested without sockets: Hello first and once; disk handles
//! only grow; a disk is used only while open; one epoch per disk at a time, committed under its
//! own number; a group's members are open disks, its epochs are committed in sequence, only
//! after every member asked for the same epoch's commit, and a cutover finalises the committed
//! epoch. What needs the targets (sizes, leases, epoch numbers against the durable state) stays
//! with the sink.

use std::collections::{BTreeMap, HashMap};

use crate::pb::{self, ErrorCode};
use crate::Body;

/// Which part of the session a refusal ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// The disk's handle is closed (its epoch ends uncommitted); the session goes on.
    Disk(u32),
    /// The group's current epoch fails; the session goes on.
    Group(String),
    /// The whole connection ends.
    Connection,
}

/// A control message the session refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub scope: Scope,
    pub code: ErrorCode,
    pub message: String,
}

impl Violation {
    fn new(scope: Scope, message: impl Into<String>) -> Self {
        Violation { scope, code: ErrorCode::BadRequest, message: message.into() }
    }
}

/// What the sink must do for an accepted control message.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Negotiate the version, check the agent and seat the session.
    Hello(pb::Hello),
    /// Open the target; report `disk_failed` if that fails.
    OpenDisk(pb::OpenDisk),
    /// Close the disk (its open epoch ends uncommitted).
    CloseDisk(u32),
    /// Send the disk's hash index.
    Index(u32),
    /// Send the target's freshly read hashes.
    Verify(u32),
    /// Begin the epoch; for a group member, with the group's committed epoch. Report
    /// `epoch_begun` on success.
    Begin { req: pb::EpochBegin, group_committed: Option<u64> },
    /// Ask the disk's writer to commit.
    Commit(pb::EpochCommit),
    /// Open the group over these member handles; report `group_opened`.
    GroupOpen(pb::GroupOpen),
    /// Commit the group's epoch on every member; report `group_committed`.
    GroupCommit { group: String, epoch: u64, members: Vec<u32> },
    /// Cut the group over at its committed epoch.
    GroupCutover { group: String, epoch: u64, members: Vec<u32> },
    /// Nothing but liveness.
    Progress,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DiskPhase {
    Open,
    /// An epoch is open (begun, its commit not yet asked for).
    InEpoch(u64),
}

#[derive(Debug, Clone)]
struct DiskState {
    phase: DiskPhase,
    /// The last epoch whose commit the agent asked for.
    commit_asked: Option<u64>,
}

#[derive(Debug, Clone)]
struct GroupState {
    members: Vec<u32>,
    committed: u64,
}

/// The control-stream state of one session (see the module comment).
#[derive(Debug, Default)]
pub struct SinkSession {
    said_hello: bool,
    last_handle: u32,
    disks: BTreeMap<u32, DiskState>,
    groups: HashMap<String, GroupState>,
}

impl SinkSession {
    pub fn new() -> Self {
        Self::default()
    }

    /// Handles of the disks open on this session.
    pub fn open_disks(&self) -> usize {
        self.disks.len()
    }

    /// Take one control message from the agent.
    pub fn on_message(&mut self, body: Body) -> Result<Step, Violation> {
        if !self.said_hello {
            return match body {
                Body::Hello(h) => {
                    self.said_hello = true;
                    Ok(Step::Hello(h))
                }
                other => Err(Violation::new(
                    Scope::Connection,
                    format!("expected Hello first, got {}", name(&other)),
                )),
            };
        }
        match body {
            Body::OpenDisk(req) => {
                if req.disk <= self.last_handle {
                    return Err(Violation::new(
                        Scope::Connection,
                        format!(
                            "disk handle {} is not new (handles only grow on a connection; last {})",
                            req.disk, self.last_handle
                        ),
                    ));
                }
                self.last_handle = req.disk;
                self.disks.insert(req.disk, DiskState { phase: DiskPhase::Open, commit_asked: None });
                Ok(Step::OpenDisk(req))
            }
            Body::CloseDisk(req) => {
                self.forget(req.disk);
                Ok(Step::CloseDisk(req.disk))
            }
            Body::IndexRequest(req) => match self.disk(req.disk)?.phase {
                DiskPhase::Open => Ok(Step::Index(req.disk)),
                DiskPhase::InEpoch(_) => {
                    Err(Violation::new(Scope::Disk(req.disk), "index requested during an epoch"))
                }
            },
            Body::VerifyRequest(req) => {
                self.disk(req.disk)?;
                Ok(Step::Verify(req.disk))
            }
            Body::EpochBegin(req) => {
                let d = self.disk(req.disk)?;
                if let DiskPhase::InEpoch(open) = d.phase {
                    return Err(Violation::new(
                        Scope::Disk(req.disk),
                        format!("epoch {} begun while epoch {open} is open on this disk", req.epoch),
                    ));
                }
                let group_committed = if req.group.is_empty() {
                    None
                } else {
                    match self.groups.get(&req.group) {
                        Some(g) if g.members.contains(&req.disk) => Some(g.committed),
                        _ => {
                            return Err(Violation::new(
                                Scope::Disk(req.disk),
                                format!(
                                    "disk {} is not a member of an open group {:?} (send GroupOpen first)",
                                    req.disk, req.group
                                ),
                            ))
                        }
                    }
                };
                Ok(Step::Begin { req, group_committed })
            }
            Body::EpochCommit(req) => {
                let d = self.disk(req.disk)?;
                match d.phase {
                    DiskPhase::InEpoch(open) if open == req.epoch => {
                        let d = self.disks.get_mut(&req.disk).expect("checked above");
                        d.phase = DiskPhase::Open;
                        d.commit_asked = Some(req.epoch);
                        Ok(Step::Commit(req))
                    }
                    DiskPhase::InEpoch(open) => Err(Violation::new(
                        Scope::Disk(req.disk),
                        format!("commit of epoch {} while epoch {open} is open", req.epoch),
                    )),
                    DiskPhase::Open => Err(Violation::new(
                        Scope::Disk(req.disk),
                        format!("commit of epoch {} but no epoch is open on this disk", req.epoch),
                    )),
                }
            }
            Body::GroupOpen(req) => {
                // Names and duplicates are the group registry's to judge; the members must be
                // disks of this session, and there must be some (a group of none commits nothing).
                if req.disks.is_empty() {
                    return Err(Violation::new(
                        Scope::Group(req.group.clone()),
                        format!("group {:?} names no member disks", req.group),
                    ));
                }
                if let Some(h) = req.disks.iter().find(|h| !self.disks.contains_key(h)) {
                    return Err(Violation::new(
                        Scope::Group(req.group.clone()),
                        format!("disk handle {h} is not open"),
                    ));
                }
                Ok(Step::GroupOpen(req))
            }
            Body::GroupCommit(req) => {
                let g = self.group(&req.group)?;
                if req.epoch != g.committed + 1 {
                    return Err(Violation::new(
                        Scope::Group(req.group.clone()),
                        format!(
                            "group {:?}: commit of epoch {} but its committed epoch is {} (epochs commit in sequence)",
                            req.group, req.epoch, g.committed
                        ),
                    ));
                }
                self.members_open(&req.group, &g.members)?;
                if let Some(m) = g.members.iter().find(|m| self.disks[m].commit_asked != Some(req.epoch)) {
                    return Err(Violation::new(
                        Scope::Group(req.group.clone()),
                        format!(
                            "group {:?}: commit of epoch {} before member disk {m} committed it",
                            req.group, req.epoch
                        ),
                    ));
                }
                Ok(Step::GroupCommit { group: req.group, epoch: req.epoch, members: g.members })
            }
            Body::GroupCutover(req) => {
                let g = self.group(&req.group)?;
                if req.epoch != g.committed || g.committed == 0 {
                    return Err(Violation::new(
                        Scope::Group(req.group.clone()),
                        format!(
                            "cutover of group {:?} at epoch {}, but its committed epoch is {}; a cutover finalises the committed epoch",
                            req.group, req.epoch, g.committed
                        ),
                    ));
                }
                self.members_open(&req.group, &g.members)?;
                Ok(Step::GroupCutover { group: req.group, epoch: req.epoch, members: g.members })
            }
            Body::Progress(_) => Ok(Step::Progress),
            Body::Hello(_) => Err(Violation::new(Scope::Connection, "a second Hello on one session")),
            other => Err(Violation::new(
                Scope::Connection,
                format!("expected a control message, got {}", name(&other)),
            )),
        }
    }

    /// A step for this disk failed, or the sink refused it: its handle is closed.
    pub fn disk_failed(&mut self, handle: u32) {
        self.forget(handle);
    }

    /// The disk's epoch began.
    pub fn epoch_begun(&mut self, handle: u32, epoch: u64) {
        if let Some(d) = self.disks.get_mut(&handle) {
            d.phase = DiskPhase::InEpoch(epoch);
        }
    }

    /// The group was opened with this committed epoch.
    pub fn group_opened(&mut self, group: &str, members: Vec<u32>, committed: u64) {
        self.groups.insert(group.to_string(), GroupState { members, committed });
    }

    /// The group's epoch is committed on every member.
    pub fn group_committed(&mut self, group: &str, epoch: u64) {
        if let Some(g) = self.groups.get_mut(group) {
            g.committed = epoch;
        }
    }

    fn forget(&mut self, handle: u32) {
        self.disks.remove(&handle);
    }

    fn disk(&self, handle: u32) -> Result<&DiskState, Violation> {
        self.disks.get(&handle).ok_or_else(|| {
            Violation::new(
                Scope::Disk(handle),
                format!("disk handle {handle} is not open on this connection"),
            )
        })
    }

    fn group(&self, group: &str) -> Result<GroupState, Violation> {
        self.groups.get(group).cloned().ok_or_else(|| {
            Violation::new(Scope::Group(group.to_string()), format!("group {group:?} is not open"))
        })
    }

    fn members_open(&self, group: &str, members: &[u32]) -> Result<(), Violation> {
        match members.iter().find(|m| !self.disks.contains_key(m)) {
            Some(m) => Err(Violation::new(
                Scope::Group(group.to_string()),
                format!("group {group:?}: member disk {m} is no longer open (reopen the group)"),
            )),
            None => Ok(()),
        }
    }
}

/// A message's name for error texts.
pub fn name(body: &Body) -> String {
    let debug = format!("{body:?}");
    debug.split('(').next().unwrap_or("?").to_string()
}

#[cfg(test)]
mod tests;
