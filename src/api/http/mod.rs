//! The HTTPS API for users and portals: `POST /api/v1/login` (a password,
//! checked once, for a session token), `POST /api/v1/connect` (a desktop
//! anywhere in the grid, as JSON or as a remote-viewer `.vv` file) and
//! `POST /api/v1/logout`.
//!
//! JSON in and out; every error is `{"error": "...", "code": "..."}` with
//! the broker's own message. Passwords and tokens never reach a log. The
//! client's IP address is the "source" of the broker's login rate limit.
//! TLS and the certificate are in `tls.rs`, the tokens in `sessions.rs`.

pub mod sessions;
pub mod tls;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::model::{SiteLabel, TemplateName, UserName};
use crate::service::desktops::{
    viewer_file_text, ConnectError, DesktopAccess, Password, Reservation,
};
use sessions::{SessionStore, SessionToken, TOKEN_BYTES};
pub use tls::{ApiCertificate, TlsListener, TlsSetupError};

/// Request bodies larger than this are refused (413): a login or connect
/// request is a few hundred bytes.
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// `Retry-After` when no desktop is free: a pooled desktop being prepared
/// or refreshed is usually ready within tens of seconds.
pub const NO_DESKTOP_RETRY_AFTER_S: u64 = 15;
/// The media type of a remote-viewer connection file.
pub const VIEWER_FILE_MEDIA_TYPE: &str = "application/x-virt-viewer";

/// `POST /api/v1/login`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub user: UserName,
    pub password: Password,
}

/// The answer to a login: the token goes in `Authorization: Bearer`.
#[derive(Debug, Serialize, Deserialize)]
pub struct LoginResponse {
    pub token: String,
    pub user: UserName,
    pub expires_at_ms: u64,
}

/// `POST /api/v1/connect`: with a bearer token the body may be empty or
/// name only the template and site; without one it carries the user and
/// password (one password check, as `deskgrid connect` does).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectRequestBody {
    #[serde(default)]
    pub user: Option<UserName>,
    #[serde(default)]
    pub password: Option<Password>,
    #[serde(default)]
    pub template: Option<TemplateName>,
    #[serde(default)]
    pub client_site: Option<SiteLabel>,
}

/// The answer to a connect (JSON form): the same reservation
/// `deskgrid connect --output json` prints.
#[derive(Debug, Serialize, Deserialize)]
pub struct ConnectResponse {
    pub reservation: Reservation,
}

/// An error as the API answers it.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub code: String,
    /// The templates to choose from (`choose-template`) or the user is
    /// entitled to (`template-not-entitled`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub templates: Option<Vec<TemplateName>>,
}

/// An error response: status, code, message, and what goes with them.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after_s: Option<u64>,
    templates: Option<Vec<TemplateName>>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after_s: None,
            templates: None,
        }
    }

    fn bad_token() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "bad-token",
            "the session token is unknown or expired; log in again (POST /api/v1/login)",
        )
    }

    fn malformed(problem: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "malformed-request",
            format!("malformed request: {problem}"),
        )
    }
}

impl From<ConnectError> for ApiError {
    fn from(error: ConnectError) -> Self {
        let message = error.to_string();
        match error {
            ConnectError::TooManyAttempts { retry_in_s } => Self {
                retry_after_s: Some(retry_in_s.max(1)),
                ..Self::new(StatusCode::TOO_MANY_REQUESTS, "too-many-attempts", message)
            },
            ConnectError::BadCredentials => {
                Self::new(StatusCode::UNAUTHORIZED, "bad-credentials", message)
            }
            ConnectError::NotEntitled { .. } => {
                Self::new(StatusCode::FORBIDDEN, "not-entitled", message)
            }
            ConnectError::TemplateNotEntitled { entitled, .. } => Self {
                templates: Some(entitled),
                ..Self::new(StatusCode::FORBIDDEN, "template-not-entitled", message)
            },
            ConnectError::ChooseTemplate { user, templates } => Self {
                // The broker's message names the CLI's flag; here it is a field.
                message: format!(
                    "user {user} is entitled to several templates; choose one with \"template\": {}",
                    templates
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                templates: Some(templates),
                ..Self::new(StatusCode::CONFLICT, "choose-template", String::new())
            },
            ConnectError::NoneFree { .. } => Self {
                retry_after_s: Some(NO_DESKTOP_RETRY_AFTER_S),
                ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "none-free", message)
            },
            ConnectError::NoDesktop { .. } => Self {
                retry_after_s: Some(NO_DESKTOP_RETRY_AFTER_S),
                ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "no-desktop", message)
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.message,
            code: self.code.to_owned(),
            templates: self.templates,
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        if let Some(seconds) = self.retry_after_s {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// The client's address, as the TLS listener accepted it.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddress(pub SocketAddr);

impl Connected<axum::serve::IncomingStream<'_, TlsListener>> for ClientAddress {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        Self(*stream.remote_addr())
    }
}

/// What every handler shares.
#[derive(Debug, Clone)]
struct ApiState {
    desktops: Arc<DesktopAccess>,
    sessions: Arc<Mutex<SessionStore>>,
}

impl ApiState {
    fn sessions(&self) -> std::sync::MutexGuard<'_, SessionStore> {
        // Plain maps: a panic elsewhere leaves them usable.
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The API's routes over `desktops`, with fresh session storage.
pub fn router(desktops: Arc<DesktopAccess>) -> Router {
    let state = ApiState {
        desktops,
        sessions: Arc::new(Mutex::new(SessionStore::default())),
    };
    Router::new()
        .route("/api/v1/login", post(login))
        .route("/api/v1/connect", post(connect))
        .route("/api/v1/logout", post(logout))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Serves the API on `listener` until `shutdown` turns true; requests in
/// progress then finish, idle connections close.
pub async fn serve(
    listener: TlsListener,
    desktops: Arc<DesktopAccess>,
    mut shutdown: watch::Receiver<bool>,
) {
    let service = router(desktops).into_make_service_with_connect_info::<ClientAddress>();
    let stopping = async move {
        // A dropped sender means the server is going away too.
        let _ = shutdown.wait_for(|stop| *stop).await;
    };
    if let Err(error) = axum::serve(listener, service)
        .with_graceful_shutdown(stopping)
        .await
    {
        tracing::error!(error = %error, "the HTTPS API stopped");
    }
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not-found",
        "no such API path (there are POST /api/v1/login, /api/v1/connect and /api/v1/logout)",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "this path takes POST only",
    )
}

async fn login(
    ConnectInfo(client): ConnectInfo<ClientAddress>,
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: LoginRequest = json_body(&headers, body)?.ok_or_else(|| {
        ApiError::malformed("the body must be a JSON object with \"user\" and \"password\"")
    })?;
    let source = client.0.ip().to_string();
    state
        .desktops
        .authenticate(&request.user, &request.password, &source)
        .await?;
    let mut random = [0u8; TOKEN_BYTES];
    rand::Rng::fill(&mut rand::rng(), &mut random[..]);
    let token = SessionToken::from_random(random);
    let expires_at_ms =
        state
            .sessions()
            .issue(&token, request.user.clone(), crate::service::now_ms());
    tracing::info!(user = %request.user, client = %source, "API login; session token issued");
    Ok(private_json(&LoginResponse {
        token: token.expose().to_owned(),
        user: request.user,
        expires_at_ms,
    }))
}

async fn connect(
    ConnectInfo(client): ConnectInfo<ClientAddress>,
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let token = bearer_token(&headers)?;
    let request: ConnectRequestBody = json_body(&headers, body)?.unwrap_or_default();
    let source = client.0.ip().to_string();
    let reservation = match (token, request.user, request.password) {
        (Some(token), None, None) => {
            let user = state
                .sessions()
                .user(&token, crate::service::now_ms())
                .ok_or_else(ApiError::bad_token)?;
            let connected = state
                .desktops
                .connect_authenticated(&user, request.template, request.client_site)
                .await;
            if matches!(connected, Err(ConnectError::BadCredentials)) {
                // The user was deleted: the token is of no use any more.
                state.sessions().revoke(&token);
            }
            connected?
        }
        (Some(_), _, _) => {
            return Err(ApiError::malformed(
                "give a bearer token or \"user\" and \"password\", not both",
            ))
        }
        (None, Some(user), Some(password)) => {
            state
                .desktops
                .connect(user, password, request.template, request.client_site, source.clone())
                .await?
        }
        (None, _, _) => {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "no-credentials",
                "give a session token (Authorization: Bearer, from POST /api/v1/login) or \"user\" and \"password\"",
            ))
        }
    };
    tracing::info!(client = %source, vm = %reservation.vm, server = %reservation.server, "API connect: desktop reserved");
    if wants_viewer_file(&headers) {
        let text = viewer_file_text(&reservation).map_err(|error| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "bad-reservation",
                error.to_string(),
            )
        })?;
        return Ok((
            [
                (header::CONTENT_TYPE, VIEWER_FILE_MEDIA_TYPE),
                (header::CACHE_CONTROL, "no-store"),
                (
                    header::CONTENT_DISPOSITION,
                    "attachment; filename=\"deskgrid.vv\"",
                ),
            ],
            text,
        )
            .into_response());
    }
    Ok(private_json(&ConnectResponse { reservation }))
}

async fn logout(State(state): State<ApiState>, headers: HeaderMap) -> Result<StatusCode, ApiError> {
    let token = bearer_token(&headers)?.ok_or_else(ApiError::bad_token)?;
    if state.sessions().revoke(&token) {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::bad_token())
    }
}

/// The body as `T`; `None` for an empty body. Refuses a body that is not
/// `application/json`, too large or not the expected JSON.
fn json_body<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Option<T>, ApiError> {
    let bytes = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body-too-large",
                format!("the request body is over {MAX_BODY_BYTES} bytes"),
            )
        } else {
            ApiError::malformed(rejection.body_text())
        }
    })?;
    if bytes.is_empty() {
        return Ok(None);
    }
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "not-json",
            "send the body as Content-Type: application/json",
        ));
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(ApiError::malformed)
}

/// The token of `Authorization: Bearer TOKEN`, if the header is there.
fn bearer_token(headers: &HeaderMap) -> Result<Option<SessionToken>, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|value| {
            let (scheme, token) = value.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .filter(|token| !token.is_empty())
        .ok_or_else(ApiError::bad_token)?;
    Ok(Some(SessionToken::from_client(token)))
}

/// Whether the client asked for the `.vv` file rather than JSON.
fn wants_viewer_file(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|media| media.split(';').next())
        .any(|media| media.trim().eq_ignore_ascii_case(VIEWER_FILE_MEDIA_TYPE))
}

/// JSON that holds a credential (a token, a display ticket): never cached.
fn private_json<T: Serialize>(value: &T) -> Response {
    ([(header::CACHE_CONTROL, "no-store")], axum::Json(value)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_and_accept_headers_are_read_leniently() {
        let mut headers = HeaderMap::new();
        assert!(bearer_token(&headers).expect("no header").is_none());
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(
            bearer_token(&headers)
                .expect("a token")
                .map(|token| token.expose().to_owned()),
            Some("abc".to_owned())
        );
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert!(bearer_token(&headers).is_err());

        assert!(!wants_viewer_file(&headers));
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static("text/plain, application/x-virt-viewer;q=0.9"),
        );
        assert!(wants_viewer_file(&headers));
    }

    #[test]
    fn broker_refusals_map_to_statuses_with_their_messages() {
        let user = UserName::new("carol").expect("valid");
        let office = TemplateName::new("office").expect("valid");
        let cad = TemplateName::new("cad").expect("valid");
        let choose = ApiError::from(ConnectError::ChooseTemplate {
            user: user.clone(),
            templates: vec![cad.clone(), office.clone()],
        });
        assert_eq!(choose.status, StatusCode::CONFLICT);
        assert_eq!(
            choose.message,
            "user carol is entitled to several templates; choose one with \"template\": cad, office"
        );
        assert_eq!(choose.templates, Some(vec![cad, office.clone()]));
        let limited = ApiError::from(ConnectError::TooManyAttempts { retry_in_s: 0 });
        assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(limited.retry_after_s, Some(1), "never Retry-After: 0");
        let busy = ApiError::from(ConnectError::NoneFree {
            template: office,
            preparing: 2,
        });
        assert_eq!(busy.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(busy.code, "none-free");
        assert_eq!(
            ApiError::from(ConnectError::NotEntitled { user }).status,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            ApiError::from(ConnectError::BadCredentials).status,
            StatusCode::UNAUTHORIZED
        );
    }
}
