//! Joined connections (`--connections N` on the agent): one connection is driven by one task on
//! each side, so a disk's data can use more than a core per side only over several connections.
//! A session's first connection gets a random token in its `HelloReply`; further connections of
//! the same agent identity send it in `Hello.join` and then carry data streams into that
//! session's disks, under its in-flight budget, liveness and error handling, while their own
//! control stream stays silent. Each joined connection takes a connection seat like any other
//! (so `--max-agent-connections` bounds them), but only while a quarter of `--max-connections`
//! stays free for first connections (a join only speeds a session up; it must not lock other
//! agents out), and a session takes at most `MAX_JOINED`. When the session ends its joined
//! connections are closed; when a joined connection is lost or one of its data streams is
//! malformed, the whole session ends (its epoch could not complete without that data).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use blockship_proto::pb::ErrorCode;
use blockship_transport::Connection;

use crate::datastream::StreamCtx;
use crate::refusal::Refusal;

/// Connections that may join one session (besides its first).
pub const MAX_JOINED: usize = 15;

/// A session's token: a UUIDv4 from the OS generator (122 random bits), which only the agent
/// whose certificate opened the session may present.
pub type Token = [u8; 16];

/// The connections that joined a session, shared with its roster entry (which counts them).
pub type Members = Arc<Mutex<Vec<Connection>>>;

struct Joinable {
    agent: String,
    streams: StreamCtx,
    joined: Members,
}

/// The sessions that connections may join, by token.
#[derive(Default)]
pub struct Joins {
    map: Mutex<HashMap<Token, Joinable>>,
}

/// A session open to joining; dropping it (the session ended) closes what joined it.
pub struct Open<'a> {
    joins: &'a Joins,
    pub token: Token,
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        let gone = self.joins.map.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.token);
        if let Some(j) = gone {
            for conn in j.joined.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
                conn.close(0, b"the session this connection joined has ended");
            }
        }
    }
}

impl Joins {
    /// Let other connections of `agent` join the session whose data streams use `streams`;
    /// those that join are listed in `joined`.
    pub fn open(&self, agent: &str, streams: StreamCtx, joined: Members) -> Open<'_> {
        let token = *uuid::Uuid::new_v4().as_bytes();
        let entry = Joinable { agent: agent.to_string(), streams, joined };
        self.map.lock().unwrap_or_else(|p| p.into_inner()).insert(token, entry);
        Open { joins: self, token }
    }

    /// Join `conn` of `agent` to the session named by `token`: what its data streams feed, and
    /// a guard that counts the connection while it lives.
    pub fn join(&self, token: &[u8], agent: &str, conn: &Connection) -> Result<(StreamCtx, Joined), Refusal> {
        // One message for a wrong token and another agent's token: it tells nothing of
        // which sessions exist.
        let unknown = || {
            Refusal::new(
                ErrorCode::Unauthorized,
                format!(
                    "agent {agent:?} has no session to join with this token (it has ended, or the \
                     token is wrong): open a new session"
                ),
            )
        };
        let token: Token = token.try_into().map_err(|_| unknown())?;
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let entry = map.get(&token).filter(|e| e.agent == agent).ok_or_else(unknown)?;
        let mut joined = entry.joined.lock().unwrap_or_else(|p| p.into_inner());
        if joined.len() >= MAX_JOINED {
            return Err(Refusal::new(
                ErrorCode::Busy,
                format!("the session already has {MAX_JOINED} joined connections (at most {MAX_JOINED}): use fewer --connections"),
            ));
        }
        joined.push(conn.clone());
        let guard = Joined { id: conn.id(), members: entry.joined.clone() };
        Ok((entry.streams.clone(), guard))
    }
}

/// A joined connection, listed in its session's members until dropped.
pub struct Joined {
    id: u64,
    members: Members,
}

impl Drop for Joined {
    fn drop(&mut self) {
        self.members.lock().unwrap_or_else(|p| p.into_inner()).retain(|c| c.id() != self.id);
    }
}
