//! The local control socket (`DATA_DIR/control.sock`, mode 0600): while
//! `deskgrid serve` runs, every CLI command on that data directory goes
//! through it instead of touching the files the server owns.
//!
//! One request per connection: a JSON line in, a JSON line out. Requests carry
//! a protocol version so an old CLI talking to a new server gets a clear error.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::appliance::data_dir::DataDir;
use crate::model::{
    EntitlementSubject, ImageDigest, ImageVersionId, SiteLabel, Template, TemplateName, UserName,
};
use crate::service::desktops::{DesktopAccess, LogoffReport, Password, Reservation};
use crate::service::images::ImageSummary;
use crate::service::templates::{StoredTemplate, TemplateChange};
use crate::service::users::{EntitlementChange, NewUser, SessionSummary, UserSummary};
use crate::service::{GridService, StateSummary, StatusReport};

/// The protocol version this build speaks.
pub const CONTROL_PROTOCOL_VERSION: u32 = 1;
/// A request or response longer than this is refused: real ones are tiny.
const MAX_LINE_BYTES: usize = 1 << 20;
/// A client that sends nothing for this long is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlRequest {
    pub version: u32,
    pub command: ControlCommand,
}

/// What the CLI can ask a running server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ControlCommand {
    Status,
    /// The plan this server computes now; `run_now` also wakes its policy
    /// loop so that its own steps start at once.
    Plan {
        run_now: bool,
    },
    CompactState,
    CreateJoinToken {
        ttl_seconds: u64,
        uses: u32,
    },
    RemoveServer {
        id: crate::model::ServerId,
    },
    /// Stores a new template; refused when the name is taken.
    CreateTemplate {
        template: Template,
    },
    /// The grid's policy.
    ShowPolicy,
    /// Changes the given policy settings.
    UpdatePolicy {
        change: crate::service::grid_policy::PolicyChange,
    },
    /// Changes the given settings of an existing template.
    UpdateTemplate {
        name: TemplateName,
        change: TemplateChange,
    },
    /// Deletes an existing template.
    DeleteTemplate {
        name: TemplateName,
    },
    ListTemplates,
    /// Records a base image version imported on this server (by
    /// `deskgrid image import`): its volume is in the pool and its manifest
    /// in this server's store, and must match `digest` and `virtual_size`.
    RegisterImage {
        version: ImageVersionId,
        digest: ImageDigest,
        virtual_size: u64,
        /// The version a published difference disk derives from; it must
        /// be in the grid.
        #[serde(default)]
        parent: Option<ImageVersionId>,
    },
    ListImages,
    /// Creates a user; the password comes hashed (argon2id).
    AddUser {
        user: NewUser,
    },
    ListUsers,
    DeleteUser {
        name: UserName,
    },
    /// Grants `subject` desktops of `template`, or with `remove` withdraws it.
    Entitle {
        subject: EntitlementSubject,
        template: TemplateName,
        #[serde(default)]
        remove: bool,
    },
    /// Every session and reservation in the grid.
    ListSessions,
    /// Asks the servers hosting `user`'s sessions to end them.
    LogOff {
        user: UserName,
    },
    /// Logs a user in and reserves a desktop anywhere in the grid.
    Connect {
        user: UserName,
        password: Password,
        #[serde(default)]
        template: Option<TemplateName>,
        #[serde(default)]
        client_site: Option<SiteLabel>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ControlReply {
    Status(Box<StatusReport>),
    Plan(Box<crate::service::plan::PlanReport>),
    Compacted(StateSummary),
    JoinToken {
        token: String,
        expires_at_ms: u64,
    },
    ServerRemoved {
        id: crate::model::ServerId,
    },
    /// A template as created or changed, with warnings for the admin.
    TemplateStored(StoredTemplate),
    TemplateDeleted {
        name: TemplateName,
    },
    /// Every template, sorted by name.
    Templates(Vec<Template>),
    /// The version as registered.
    ImageRegistered(ImageSummary),
    /// Every base image version, sorted, with the servers that hold it.
    Images(Vec<ImageSummary>),
    UserAdded(UserSummary),
    /// Every user, sorted by name.
    Users(Vec<UserSummary>),
    UserDeleted {
        name: UserName,
    },
    Entitlement(EntitlementChange),
    Sessions(Vec<SessionSummary>),
    LoggedOff(LogoffReport),
    /// The desktop reserved, with its one-time display ticket.
    Connected(Box<Reservation>),
    /// The grid's policy (after the change, for `UpdatePolicy`).
    Policy(crate::model::Policy),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ControlResponse {
    Ok(ControlReply),
    Error(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no deskgrid server is running on {data_dir} (start one with `deskgrid serve --data-dir {data_dir}`)")]
    NoServer { data_dir: String },
    #[error("cannot talk to the server at {}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the server's answer is not understood: {0}")]
    Protocol(String),
    #[error("the server refused: {0}")]
    Refused(String),
    #[error("cannot listen on {}", .path.display())]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Sends one command to the server whose socket is `path`.
pub fn call(
    path: &Path,
    data_dir: &Path,
    command: ControlCommand,
) -> Result<ControlReply, ControlError> {
    let io_error = |source| ControlError::Io {
        path: path.to_owned(),
        source,
    };
    let stream = match std::os::unix::net::UnixStream::connect(path) {
        Ok(stream) => stream,
        Err(error)
            if matches!(
                error.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(ControlError::NoServer {
                data_dir: data_dir.display().to_string(),
            })
        }
        Err(error) => return Err(io_error(error)),
    };
    // Compaction of a large state can take a while; anything longer is a hang.
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(io_error)?;
    let request = ControlRequest {
        version: CONTROL_PROTOCOL_VERSION,
        command,
    };
    let mut line =
        serde_json::to_vec(&request).map_err(|error| ControlError::Protocol(error.to_string()))?;
    line.push(b'\n');
    (&stream).write_all(&line).map_err(io_error)?;
    let mut reader = BufReader::new(&stream).take(MAX_LINE_BYTES as u64);
    let mut answer = String::new();
    reader.read_line(&mut answer).map_err(io_error)?;
    match serde_json::from_str::<ControlResponse>(&answer) {
        Ok(ControlResponse::Ok(reply)) => Ok(reply),
        Ok(ControlResponse::Error(message)) => Err(ControlError::Refused(message)),
        Err(error) => Err(ControlError::Protocol(error.to_string())),
    }
}

/// Binds the socket (replacing a stale one: the caller holds the data
/// directory's lock, so no other server can be using it).
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let listen_error = |source| ControlError::Listen {
        path: path.to_owned(),
        source,
    };
    match std::fs::remove_file(path) {
        Ok(()) => tracing::info!(path = %path.display(), "removed a stale control socket"),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(listen_error(error)),
    }
    let listener = UnixListener::bind(path).map_err(listen_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(listen_error)?;
    Ok(listener)
}

/// Answers requests until `shutdown` turns true. `data_dir` is the
/// server's own (where the manifests an import registers are).
pub async fn serve(
    listener: UnixListener,
    service: Arc<Mutex<GridService>>,
    desktops: Arc<DesktopAccess>,
    data_dir: DataDir,
    mut shutdown: watch::Receiver<bool>,
) {
    let data_dir = Arc::new(data_dir);
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let service = Arc::clone(&service);
                    let desktops = Arc::clone(&desktops);
                    let data_dir = Arc::clone(&data_dir);
                    tokio::spawn(async move {
                        if let Err(error) = handle_connection(stream, service, desktops, data_dir).await {
                            tracing::warn!(error = %error, "control connection failed");
                        }
                    });
                }
                Err(error) => {
                    tracing::warn!(error = %error, "cannot accept on the control socket");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

async fn handle_connection(
    stream: UnixStream,
    service: Arc<Mutex<GridService>>,
    desktops: Arc<DesktopAccess>,
    data_dir: Arc<DataDir>,
) -> std::io::Result<()> {
    // The socket's mode already keeps other users out; the peer's uid is
    // checked too, so a socket copied or re-permissioned stays private.
    let peer = stream.peer_cred()?;
    let own_uid = nix::unistd::geteuid().as_raw();
    if peer.uid() != own_uid && peer.uid() != 0 {
        tracing::warn!(
            uid = peer.uid(),
            "control connection from another user refused"
        );
        return Ok(());
    }
    let (reader, mut writer) = stream.into_split();
    let mut reader = tokio::io::BufReader::new(reader.take(MAX_LINE_BYTES as u64));
    let mut line = String::new();
    let read = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await;
    let response = match read {
        Err(_) => ControlResponse::Error("no request received in time".to_owned()),
        Ok(Err(error)) => ControlResponse::Error(format!("cannot read the request: {error}")),
        Ok(Ok(_)) => match serde_json::from_str::<ControlRequest>(&line) {
            Err(error) => ControlResponse::Error(format!("malformed request: {error}")),
            Ok(request) if request.version != CONTROL_PROTOCOL_VERSION => ControlResponse::Error(format!(
                "control protocol version {} is not supported (this server speaks {CONTROL_PROTOCOL_VERSION}): use the deskgrid CLI of the same release",
                request.version
            )),
            Ok(request) if is_desktop_command(&request.command) => {
                execute_desktop(&desktops, request.command).await
            }
            Ok(request) => {
                let service = Arc::clone(&service);
                // State changes fsync: keep them off the async workers.
                tokio::task::spawn_blocking(move || {
                    execute(&service, &data_dir, request.command)
                })
                    .await
                    .unwrap_or_else(|error| ControlResponse::Error(format!("request failed: {error}")))
            }
        },
    };
    let mut bytes = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    writer.write_all(&bytes).await?;
    writer.shutdown().await
}

fn is_desktop_command(command: &ControlCommand) -> bool {
    matches!(
        command,
        ControlCommand::Connect { .. } | ControlCommand::LogOff { .. }
    )
}

/// Commands that ask other servers (peer RPC with deadlines): awaited here,
/// never with the state's lock held.
async fn execute_desktop(desktops: &DesktopAccess, command: ControlCommand) -> ControlResponse {
    match command {
        ControlCommand::Connect {
            user,
            password,
            template,
            client_site,
        } => {
            // Only the server's own user (or root) reaches the socket.
            let source = "control-socket".to_owned();
            match desktops
                .connect(user, password, template, client_site, source)
                .await
            {
                Ok(reservation) => {
                    ControlResponse::Ok(ControlReply::Connected(Box::new(reservation)))
                }
                Err(error) => ControlResponse::Error(crate::error_chain(&error)),
            }
        }
        ControlCommand::LogOff { user } => match desktops.log_off(&user).await {
            Ok(report) => ControlResponse::Ok(ControlReply::LoggedOff(report)),
            Err(error) => ControlResponse::Error(crate::error_chain(&error)),
        },
        _ => ControlResponse::Error("not a desktop command".to_owned()),
    }
}

fn execute(
    service: &Mutex<GridService>,
    data_dir: &DataDir,
    command: ControlCommand,
) -> ControlResponse {
    let mut service = match service.lock() {
        Ok(service) => service,
        // A panic while holding the lock left the state as it was on disk at
        // worst; keep serving reads rather than wedge the CLI.
        Err(poisoned) => poisoned.into_inner(),
    };
    match command {
        ControlCommand::Plan { run_now } => {
            if run_now {
                service.wake_policy();
            }
            ControlResponse::Ok(ControlReply::Plan(Box::new(service.plan_report())))
        }
        ControlCommand::Status => {
            ControlResponse::Ok(ControlReply::Status(Box::new(service.status())))
        }
        ControlCommand::CreateJoinToken { ttl_seconds, uses } => {
            match service.create_join_token(Duration::from_secs(ttl_seconds), uses) {
                Ok((token, expires_at_ms)) => ControlResponse::Ok(ControlReply::JoinToken {
                    token: token.to_string(),
                    expires_at_ms,
                }),
                Err(error) => ControlResponse::Error(crate::error_chain(&error)),
            }
        }
        ControlCommand::RemoveServer { id } => match service.remove_server(id) {
            Ok(()) => ControlResponse::Ok(ControlReply::ServerRemoved { id }),
            Err(error) => ControlResponse::Error(crate::error_chain(&error)),
        },
        ControlCommand::CompactState => match service.compact() {
            Ok(summary) => ControlResponse::Ok(ControlReply::Compacted(summary)),
            Err(error) => ControlResponse::Error(crate::error_chain(&error)),
        },
        ControlCommand::CreateTemplate { template } => match service.create_template(template) {
            Ok(stored) => ControlResponse::Ok(ControlReply::TemplateStored(stored)),
            Err(error) => ControlResponse::Error(crate::error_chain(&error)),
        },
        ControlCommand::UpdateTemplate { name, change } => {
            match service.update_template(&name, &change) {
                Ok(stored) => ControlResponse::Ok(ControlReply::TemplateStored(stored)),
                Err(error) => ControlResponse::Error(crate::error_chain(&error)),
            }
        }
        ControlCommand::ShowPolicy => ControlResponse::Ok(ControlReply::Policy(service.policy())),
        ControlCommand::UpdatePolicy { change } => match service.update_policy(&change) {
            Ok(policy) => ControlResponse::Ok(ControlReply::Policy(policy)),
            Err(error) => ControlResponse::Error(crate::error_chain(&error)),
        },
        ControlCommand::DeleteTemplate { name } => match service.delete_template(&name) {
            Ok(()) => ControlResponse::Ok(ControlReply::TemplateDeleted { name }),
            Err(error) => ControlResponse::Error(crate::error_chain(&error)),
        },
        ControlCommand::ListTemplates => {
            ControlResponse::Ok(ControlReply::Templates(service.templates()))
        }
        ControlCommand::RegisterImage {
            version,
            digest,
            virtual_size,
            parent,
        } => {
            match service.register_image(data_dir, &version, &digest, virtual_size, parent.as_ref())
            {
                Ok(summary) => ControlResponse::Ok(ControlReply::ImageRegistered(summary)),
                Err(error) => ControlResponse::Error(crate::error_chain(&error)),
            }
        }
        ControlCommand::ListImages => ControlResponse::Ok(ControlReply::Images(service.images())),
        ControlCommand::AddUser { user } => match service.add_user(user) {
            Ok(summary) => ControlResponse::Ok(ControlReply::UserAdded(summary)),
            Err(error) => ControlResponse::Error(crate::error_chain(&error)),
        },
        ControlCommand::ListUsers => ControlResponse::Ok(ControlReply::Users(service.users())),
        ControlCommand::DeleteUser { name } => match service.delete_user(&name) {
            Ok(()) => ControlResponse::Ok(ControlReply::UserDeleted { name }),
            Err(error) => ControlResponse::Error(crate::error_chain(&error)),
        },
        ControlCommand::Entitle {
            subject,
            template,
            remove,
        } => match service.entitle(subject, template, remove) {
            Ok(change) => ControlResponse::Ok(ControlReply::Entitlement(change)),
            Err(error) => ControlResponse::Error(crate::error_chain(&error)),
        },
        ControlCommand::ListSessions => {
            ControlResponse::Ok(ControlReply::Sessions(service.sessions()))
        }
        ControlCommand::Connect { .. } | ControlCommand::LogOff { .. } => {
            ControlResponse::Error("desktop commands are not run under the state's lock".to_owned())
        }
    }
}
