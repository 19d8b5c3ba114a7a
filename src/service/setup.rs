//! Setting a server up, for `deskgrid init` and `deskgrid join`: the data
//! directory, the grid's identity, the first admin, and the join handshake.
//! Both run before any server runs on the data directory.

use std::net::SocketAddr;
use std::time::Duration;

use super::{now_ms, GridService, ServiceError};
use crate::appliance::config::{Config, NoPeerAddress};
use crate::appliance::data_dir::{DataDir, DataDirError};
use crate::federation::identity::{GridCa, IdentityError, ServerKey, TlsFiles};
use crate::federation::join_token::{JoinTokenError, JoinTokenText};
use crate::federation::protocol::{self, JoinRequest, PeerRequest, PeerResponse, ProtocolError};
use crate::federation::transport::{PeerEndpoint, TransportError};
use crate::model::{GridId, ServerId, ServerRecord, UserName};

/// How long the seed may take to answer the QUIC handshake: a seed that is
/// not a deskgrid server (or not reachable) is reported after this.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// How long the join itself may take: certifying plus the whole grid state.
const JOIN_DEADLINE: Duration = Duration::from_secs(60);

/// Why a server could not be set up. Nothing usable was left half-written:
/// the data directory counts as initialised only once `config.toml` exists.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error("grid identity")]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error(transparent)]
    NoPeerAddress(#[from] NoPeerAddress),
    #[error("the join token is not valid")]
    Token(#[from] JoinTokenError),
    #[error("cannot join through {seed}")]
    Transport {
        seed: SocketAddr,
        #[source]
        source: Box<TransportError>,
    },
    #[error("{seed} answered the join with something else than a grid")]
    Protocol {
        seed: SocketAddr,
        #[source]
        source: ProtocolError,
    },
    #[error("{seed} refused the join: {reason}")]
    Refused { seed: SocketAddr, reason: String },
    #[error("{seed} answered the join with {what}")]
    Unexpected { seed: SocketAddr, what: String },
    #[error("the answer carries another grid's certificate authority than the token pins; nothing was written")]
    WrongCa,
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
}

/// The first admin of a new grid.
#[derive(Debug, Clone)]
pub struct NewGrid {
    pub admin: UserName,
    /// Argon2id PHC string (see `accounts::hash_password`).
    pub admin_password_hash: String,
}

/// Creates the data directory and state of a server; with `new_grid`, also
/// a new grid: its CA, this server's certificate and the first admin. A
/// server of a grid needs an address the others can dial
/// ([`SetupError::NoPeerAddress`] otherwise, before anything is written).
pub fn create_server(
    data_dir: &DataDir,
    config: &Config,
    new_grid: Option<NewGrid>,
) -> Result<(ServerId, Option<GridId>), SetupError> {
    if new_grid.is_some() {
        config.server.peer_address()?;
    }
    let server_id = data_dir.create(&config.to_commented_toml())?;
    let (mut service, _) = GridService::open(server_id, &data_dir.state_dir())?;
    service.publish_own_record(config)?;
    let Some(new_grid) = new_grid else {
        return Ok((server_id, None));
    };
    let ca = GridCa::create(GridId::random())?;
    let (key, certificate) = ca.issue_for_self(server_id)?;
    let tls = TlsFiles::new(data_dir.tls_dir());
    tls.save_ca(&ca)?;
    tls.save_server(&certificate.pem, &key)?;
    let grid_id = ca.grid_id();
    service.set_grid_ca(ca);
    service.create_admin(new_grid.admin, new_grid.admin_password_hash)?;
    Ok((server_id, Some(grid_id)))
}

/// Joins the grid `seed` belongs to with `token`, then creates this
/// server's data directory with what the grid granted.
pub fn join_grid(
    data_dir: &DataDir,
    config: &Config,
    token: &str,
    seed: SocketAddr,
) -> Result<(ServerId, GridId), SetupError> {
    data_dir.require_uninitialised()?;
    let peer_address = config.server.peer_address()?;
    let token: JoinTokenText = token.parse()?;
    let server_id = ServerId::random();
    let key = ServerKey::generate()?;
    let csr_pem = key.certificate_request(server_id)?;
    let record = ServerRecord::new(
        config.server.name.clone(),
        vec![peer_address.to_string()],
        config.server.site.clone(),
        now_ms(),
    );
    let request = PeerRequest::Join(Box::new(JoinRequest {
        secret_hex: token.secret_hex(),
        server_id,
        csr_pem,
        record,
    }));

    let runtime = tokio::runtime::Runtime::new().map_err(SetupError::Runtime)?;
    let transport = |source| SetupError::Transport {
        seed,
        source: Box::new(source),
    };
    let answer = runtime.block_on(async {
        // The seed's CA is checked against the token's pin before the secret
        // leaves this machine.
        let connection =
            PeerEndpoint::connect_for_join(seed, *token.ca_pin.as_bytes(), HANDSHAKE_DEADLINE)
                .await
                .map_err(transport)?;
        connection
            .request(&protocol::encode(&request), JOIN_DEADLINE)
            .await
            .map_err(transport)
    })?;
    let grant = match protocol::decode::<PeerResponse>(&answer)
        .map_err(|source| SetupError::Protocol { seed, source })?
    {
        PeerResponse::Joined(grant) => grant,
        PeerResponse::Refused { reason } => return Err(SetupError::Refused { seed, reason }),
        other => {
            return Err(SetupError::Unexpected {
                seed,
                what: format!("{other:?}"),
            })
        }
    };
    let ca = GridCa::from_pem(&grant.ca_certificate_pem, &grant.ca_key_pem)?;
    if ca.pin() != token.ca_pin {
        return Err(SetupError::WrongCa);
    }

    // Only now, with everything checked, is the data directory written.
    data_dir.create_with_id(&config.to_commented_toml(), server_id)?;
    let tls = TlsFiles::new(data_dir.tls_dir());
    tls.save_ca(&ca)?;
    tls.save_server(&grant.certificate_pem, &key)?;
    let (mut service, _) = GridService::open(server_id, &data_dir.state_dir())?;
    service.apply_remote(server_id, &grant.state)?;
    service.publish_own_record(config)?;
    Ok((server_id, grant.grid_id))
}
