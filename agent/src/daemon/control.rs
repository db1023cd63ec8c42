//! The daemon's local control service: gRPC (tonic) on a Unix socket that only the daemon's
//! user may open (mode 0600): `ListGroups`, `GroupStatus`, `Pause`, `Resume`, `SyncNow`. The
//! client side is what `blockship-agent status` uses.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use super::group::Command;
use super::pb;
use super::pb::agent_control_client::AgentControlClient;
use super::pb::agent_control_server::{AgentControl, AgentControlServer};
use super::status::Board;

/// The service: the status board, and a command channel per group.
pub struct Control {
    pub board: Arc<Board>,
    pub commands: HashMap<String, mpsc::Sender<Command>>,
}

impl Control {
    fn group(&self, name: &str) -> Result<pb::Group, Status> {
        self.board.get(name).ok_or_else(|| Status::not_found(format!("no group {name:?} in this daemon")))
    }

    async fn command(&self, name: &str, c: Command) -> Result<Response<pb::GroupReply>, Status> {
        let tx = self
            .commands
            .get(name)
            .ok_or_else(|| Status::not_found(format!("no group {name:?} in this daemon")))?;
        tx.send(c).await.map_err(|_| Status::unavailable("the group is stopping"))?;
        // Let the group take it before answering with its state.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        Ok(Response::new(pb::GroupReply { group: Some(self.group(name)?) }))
    }
}

#[tonic::async_trait]
impl AgentControl for Control {
    async fn list_groups(
        &self,
        _: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsReply>, Status> {
        Ok(Response::new(pb::ListGroupsReply { groups: self.board.all() }))
    }

    async fn group_status(&self, r: Request<pb::GroupRequest>) -> Result<Response<pb::GroupReply>, Status> {
        Ok(Response::new(pb::GroupReply { group: Some(self.group(&r.into_inner().name)?) }))
    }

    async fn pause(&self, r: Request<pb::GroupRequest>) -> Result<Response<pb::GroupReply>, Status> {
        self.command(&r.into_inner().name, Command::Pause).await
    }

    async fn resume(&self, r: Request<pb::GroupRequest>) -> Result<Response<pb::GroupReply>, Status> {
        self.command(&r.into_inner().name, Command::Resume).await
    }

    async fn sync_now(&self, r: Request<pb::GroupRequest>) -> Result<Response<pb::GroupReply>, Status> {
        self.command(&r.into_inner().name, Command::SyncNow).await
    }

    async fn cutover(&self, r: Request<pb::CutoverRequest>) -> Result<Response<pb::CutoverReply>, Status> {
        let req = r.into_inner();
        let tx = self
            .commands
            .get(&req.name)
            .ok_or_else(|| Status::not_found(format!("no group {:?} in this daemon", req.name)))?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        tx.send(Command::Cutover(req, reply))
            .await
            .map_err(|_| Status::unavailable("the group is stopping"))?;
        match answer.await {
            Ok(Ok(r)) => Ok(Response::new(r)),
            Ok(Err(e)) => Err(Status::failed_precondition(e)),
            Err(_) => Err(Status::aborted("the daemon stopped the group before the cutover finished")),
        }
    }
}

/// Bind the control socket (mode 0600; a stale socket of a daemon that is gone is replaced).
pub fn bind(path: &Path) -> Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "{} is in use: another blockship-agent daemon runs (or give another --control-socket)",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let listener =
        tokio::net::UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {} to its owner", path.display()))?;
    Ok(listener)
}

/// Serve `control` on `listener` until `stop` resolves.
pub async fn serve(
    listener: tokio::net::UnixListener,
    control: Control,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    tonic::transport::Server::builder()
        .add_service(AgentControlServer::new(control))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(listener), stop)
        .await
        .context("control service")
}

/// A client of the daemon at `path`.
pub async fn connect(path: &Path) -> Result<AgentControlClient<tonic::transport::Channel>> {
    let path: PathBuf = path.to_path_buf();
    let p = path.clone();
    let channel = tonic::transport::Endpoint::try_from("http://[::]:0")?
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let p = p.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await
        .with_context(|| {
            format!("cannot reach the agent daemon at {} (is `blockship-agent run` running?)", path.display())
        })?;
    Ok(AgentControlClient::new(channel))
}
