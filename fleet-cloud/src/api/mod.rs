//! The management HTTP API: things, groups, certificates, provisioning,
//! shadows, jobs, releases, campaigns, commands and tokens, as JSON over
//! HTTPS, for operators and application backends in any language.
//!
//! - `GET /livez` (the process answers) and `GET /readyz` (the store
//!   answers and the broker connection is up; 503 with the reason of each
//!   failed check otherwise, [`Readiness`](crate::Readiness)) are open, as
//!   is `GET /health` (the same as `/livez`).
//! - Every other endpoint needs a bearer token
//!   ([`Registry::create_token`]): `read` may read everything, `operator`
//!   may also change the fleet, `admin` may also manage certificates, claim
//!   identities and tokens. Tokens are stored as SHA-256 hashes.
//! - Errors are `{"error": {"code": "...", "message": "..."}}` with a stable
//!   `code` ([`ErrorCode`]); a refused request changes nothing.
//! - Lists are paged: `?limit=` (at most 1,000) and `?after=` the last item
//!   of the previous page, which the response gives as `next`.
//! - The OpenAPI 3.1 document is served at `GET /openapi.json`; it is
//!   generated from the same declarations that route the requests, so no
//!   route can be missing from it.
//!
//! ```no_run
//! # async fn f(services: fleet_cloud::api::ApiServices) -> Result<(), Box<dyn std::error::Error>> {
//! use fleet_cloud::api::{ApiConfig, ApiLimits, serve_api};
//! let api = serve_api(
//!     ApiConfig {
//!         bind: "127.0.0.1:8443".parse()?,
//!         cert_pem: std::fs::read_to_string("fleet-data/server.pem")?,
//!         key_pem: std::fs::read_to_string("fleet-data/server.key")?,
//!         limits: ApiLimits::default(),
//!     },
//!     services,
//! )
//! .await?;
//! println!("management API on https://{}", api.local_addr());
//! # Ok(()) }
//! ```

mod handlers;
pub mod types;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequest, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tokio::task::JoinHandle;
use utoipa::ToSchema;

use crate::pki::Pki;
use crate::{
    CommandCenter, JobsError, JobsService, ProvisioningTemplate, Publisher, Registry,
    RegistryError, Scope, ShadowService, StreamService,
};

/// What a hook answers with; the change is answered (to the API's caller,
/// to the device that registered) only once it is done, so that what the
/// caller does next finds the broker told.
pub type HookFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Called with a certificate's id after the API revoked it.
pub type RevocationHook = Arc<dyn Fn(&str) -> HookFuture + Send + Sync>;

/// Called with a thing's name after the API created, enabled, disabled or
/// deleted it (or provisioning registered it), and whether it may connect
/// now.
pub type ThingHook = Arc<dyn Fn(&str, bool) -> HookFuture + Send + Sync>;

/// What the API serves.
#[derive(Clone)]
pub struct ApiServices {
    /// Things, groups, certificates, tokens.
    pub registry: Registry,
    /// Shadows.
    pub shadows: ShadowService,
    /// Jobs, rollouts and campaigns.
    pub jobs: JobsService,
    /// Release images.
    pub streams: StreamService,
    /// Commands to things.
    pub commands: CommandCenter,
    /// Publishes what a change tells devices (a delta, a job notice).
    pub publisher: Publisher,
    /// The CA that issues claim identities (`None`: not offered).
    pub claim_ca: Option<Arc<Pki>>,
    /// The claim identities the broker admits (certificates are issued for
    /// these names only).
    pub claim_identities: Vec<String>,
    /// Called with a certificate's id after it was revoked (to tell the
    /// broker).
    pub on_revoke: Option<RevocationHook>,
    /// Called with a thing's name after it was created, enabled, disabled
    /// or deleted: to cut a denied thing's connections at once
    /// ([`Revoker::disconnect_identity`](crate::Revoker::disconnect_identity)),
    /// or to rewrite an external broker's ACL.
    pub on_standing_changed: Option<ThingHook>,
    /// The provisioning templates served.
    pub templates: Vec<ProvisioningTemplate>,
    /// What `GET /readyz` checks (`None`: it answers ready whenever the
    /// API answers).
    pub readiness: Option<crate::Readiness>,
    /// Search over the fleet index (`None`: `GET /v1/things?q=` and the
    /// statistics are not served).
    pub inventory: Option<crate::Inventory>,
}

impl fmt::Debug for ApiServices {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiServices").finish_non_exhaustive()
    }
}

/// Where and how the API listens.
#[derive(Clone)]
pub struct ApiConfig {
    /// The address to listen on.
    pub bind: SocketAddr,
    /// The server certificate (chain), PEM.
    pub cert_pem: String,
    /// Its private key, PEM.
    pub key_pem: String,
    /// Body sizes, timeouts and connections ([`ApiLimits::default`]).
    pub limits: ApiLimits,
}

impl fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiConfig")
            .field("bind", &self.bind)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// What one client of the API may hold: bodies, time and connections. A
/// body declared larger than its route allows is answered 413 at once
/// (and the connection closed, unread); one that grows past it while it
/// is read is refused 413 too.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ApiLimits {
    /// The largest body of every route but the release upload (1 MiB).
    pub max_body: usize,
    /// The largest body of `POST /v1/releases` ([`MAX_BODY`]).
    pub max_upload: usize,
    /// Time to send a request's headers, and the longest an idle
    /// keep-alive connection stays open (10 s).
    pub header_read_timeout: Duration,
    /// Time to send the body and be answered, per request (30 s; 408
    /// after it).
    pub request_timeout: Duration,
    /// The same for the release upload (10 min).
    pub upload_timeout: Duration,
    /// Connections open at once; more are closed as they arrive (512),
    /// apart from the broker's, so the API cannot take its descriptors.
    pub max_connections: usize,
}

impl Default for ApiLimits {
    fn default() -> Self {
        Self {
            max_body: 1024 * 1024,
            max_upload: MAX_BODY,
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            upload_timeout: Duration::from_secs(600),
            max_connections: 512,
        }
    }
}

impl ApiLimits {
    /// The body limit and time limit of a request.
    fn of(&self, method: &Method, path: &str) -> (usize, Duration) {
        if method == Method::POST && path.trim_end_matches('/') == "/v1/releases" {
            (self.max_upload, self.upload_timeout)
        } else {
            (self.max_body, self.request_timeout)
        }
    }
}

/// Refuses a body larger than its route allows (at once when its length
/// is declared; while it is read otherwise) and a request that takes
/// longer than its time.
async fn limit(State(limits): State<Arc<ApiLimits>>, req: Request, next: Next) -> Response {
    let (max, time) = limits.of(req.method(), req.uri().path());
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        let mut response = ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::TooLarge,
            format!("the body may have {max} bytes at most"),
        )
        .into_response();
        // Do not read what was declared: close instead.
        response.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
        return response;
    }
    let req = req.map(|body| axum::body::Body::new(http_body_util::Limited::new(body, max)));
    match tokio::time::timeout(time, next.run(req)).await {
        Ok(response) => response,
        Err(_) => {
            let mut response = ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                ErrorCode::TooSlow,
                format!("the request took longer than {time:?}"),
            )
            .into_response();
            response.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
            response
        }
    }
}

/// A stable, machine-readable error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// No token, or not a valid one (401).
    Unauthenticated,
    /// The token's scope does not allow this (403).
    Forbidden,
    /// Malformed or invalid input (400).
    InvalidRequest,
    /// No such resource (404).
    NotFound,
    /// It exists already (409).
    AlreadyExists,
    /// The resource changed meanwhile, or is in a state that refuses this
    /// (409).
    Conflict,
    /// The device did not answer in time (504).
    Timeout,
    /// The body is larger than the route allows (413).
    TooLarge,
    /// The request was not sent (or answered) in time (408).
    TooSlow,
    /// A failure on the service's side (500).
    Internal,
}

/// An error response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    status: StatusCode,
    code: ErrorCode,
    message: String,
}

/// The body of an error response.
#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable code.
    pub code: ErrorCode,
    /// For people.
    pub message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorCode::InvalidRequest, message)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, message)
    }

    pub(crate) fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, ErrorCode::Conflict, message)
    }

    pub(crate) fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            message,
        )
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The stable code.
    pub fn code(&self) -> ErrorCode {
        self.code
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            axum::Json(ErrorBody {
                error: ErrorDetail {
                    code: self.code,
                    message: self.message,
                },
            }),
        )
            .into_response()
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::NotFound(_) => Self::not_found(e.to_string()),
            RegistryError::AlreadyExists(_) => Self::new(
                StatusCode::CONFLICT,
                ErrorCode::AlreadyExists,
                e.to_string(),
            ),
            RegistryError::InvalidName(_) | RegistryError::InvalidQuery(_) => {
                Self::invalid(e.to_string())
            }
            _ => Self::internal(e.to_string()),
        }
    }
}

impl From<JobsError> for ApiError {
    fn from(e: JobsError) -> Self {
        match e {
            JobsError::NotFound(_) => Self::not_found(e.to_string()),
            JobsError::AlreadyExists(_) => Self::new(
                StatusCode::CONFLICT,
                ErrorCode::AlreadyExists,
                e.to_string(),
            ),
            JobsError::Invalid(_) => Self::invalid(e.to_string()),
            JobsError::Store(crate::StoreError::Conflict) => Self::conflict(e.to_string()),
            _ => Self::internal(e.to_string()),
        }
    }
}

/// A JSON body whose rejection is a typed [`ApiError`].
pub(crate) struct ApiJson<T>(pub(crate) T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Self(v)),
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    ErrorCode::TooLarge,
                    rejection.body_text(),
                ))
            }
            Err(rejection) => Err(ApiError::invalid(rejection.body_text())),
        }
    }
}

/// The state handlers share.
pub(crate) type Api = Arc<ApiServices>;

/// The scope a request needs: reads need `read`; certificates, claim
/// identities and tokens need `admin`, and so do changes to provisioning
/// templates (a template decides what a claimant becomes); every other
/// change `operator`.
fn required_scope(method: &Method, path: &str) -> Scope {
    let reads = method == Method::GET || method == Method::HEAD;
    if !reads && path.starts_with("/v1/provisioning/templates") {
        return Scope::Admin;
    }
    let admin = [
        "/v1/certificates",
        "/v1/provisioning/claims",
        "/v1/tokens",
        "/v1/audit",
    ]
    .iter()
    .any(|p| path.starts_with(p));
    if admin {
        Scope::Admin
    } else if method == Method::GET || method == Method::HEAD {
        Scope::Read
    } else {
        Scope::Operator
    }
}

/// What a handler tells the audit log its change replaced (a response
/// extension; kept only when small).
#[derive(Clone, Debug)]
pub(crate) struct AuditBefore(pub(crate) serde_json::Value);

/// The id of the token a request came with (a response extension, for the
/// request log).
#[derive(Clone, Debug)]
struct TokenId(String);

/// Bodies and `before` documents larger than this are summarized in the
/// audit log (`{"bytes": n}`), not kept.
const AUDIT_MAX: usize = 4096;

/// Masks what looks like a secret in a JSON document for the audit log.
fn redact(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                let k = k.to_ascii_lowercase();
                let secret = ["secret", "password", "private", "passphrase"]
                    .iter()
                    .any(|s| k.contains(s))
                    || matches!(k.as_str(), "token" | "key" | "pin");
                if secret {
                    *v = serde_json::Value::String("<redacted>".into());
                } else {
                    redact(v);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

/// What the audit log keeps of a document: itself (secrets masked) when
/// it is small JSON, its size otherwise.
fn audit_document(bytes: &[u8]) -> serde_json::Value {
    match serde_json::from_slice::<serde_json::Value>(bytes) {
        Ok(mut v) if bytes.len() <= AUDIT_MAX => {
            redact(&mut v);
            v
        }
        _ => serde_json::json!({ "bytes": bytes.len() }),
    }
}

/// The request's body for the audit log, and the request to run with it:
/// read when small (and given back to the handler), summarized otherwise
/// (a release image streams on, unread).
async fn audit_body(req: Request) -> Result<(Request, Option<serde_json::Value>), ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    match declared {
        Some(0) => return Ok((req, None)),
        Some(n) if n > AUDIT_MAX => return Ok((req, Some(serde_json::json!({ "bytes": n })))),
        _ => {}
    }
    let (parts, body) = req.into_parts();
    // At most the route's limit (`limit` wrapped the body), and only
    // bodies declared small or not declared come here.
    let bytes = axum::body::to_bytes(body, usize::MAX).await.map_err(|e| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::TooLarge,
            format!("the body could not be read: {e}"),
        )
    })?;
    let document = (!bytes.is_empty()).then(|| audit_document(&bytes));
    Ok((
        Request::from_parts(parts, axum::body::Body::from(bytes)),
        document,
    ))
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// One log line per request (method, path, status, duration, the token's
/// id; never the token), and the API's metrics.
async fn observe(req: Request, next: Next) -> Response {
    use tracing::Instrument as _;
    let started = std::time::Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    // One span per request (exported as a trace with the `otlp` feature).
    let span = tracing::info_span!(
        "api_request",
        http.request.method = %method,
        url.path = path,
        http.response.status_code = tracing::field::Empty,
    );
    let response = next.run(req).instrument(span.clone()).await;
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    span.record("http.response.status_code", status);
    let token = response
        .extensions()
        .get::<TokenId>()
        .map_or("-", |t| t.0.as_str());
    tracing::info!(
        target: "fleet::api",
        method = %method,
        path,
        status,
        duration_ms = elapsed.as_secs_f64() * 1000.0,
        token,
        "API request"
    );
    metrics::counter!(
        "fleet_api_requests_total",
        "method" => method.to_string(),
        "status" => status.to_string()
    )
    .increment(1);
    metrics::histogram!("fleet_api_request_seconds", "method" => method.to_string())
        .record(elapsed.as_secs_f64());
    response
}

/// Checks the token and its scope; records every change (and every
/// refused attempt at one) in the audit log with the token's id.
async fn authenticate(State(api): State<Api>, req: Request, next: Next) -> Response {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .map(String::from);
    let Some(token) = token else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthenticated,
            "an `Authorization: Bearer <token>` header is required",
        )
        .into_response();
    };
    let record = match api.registry.verify_token(&token).await {
        Ok(Some(r)) => r,
        Ok(None) => {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthenticated,
                "unknown or revoked token",
            )
            .into_response();
        }
        Err(e) => return ApiError::from(e).into_response(),
    };
    let needed = required_scope(req.method(), req.uri().path());
    let changes = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    let (method, path) = (req.method().to_string(), req.uri().path().to_string());
    let (mut response, request) = if record.scope < needed {
        let refused = ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            format!(
                "this needs the `{}` scope; token {} has `{}`",
                needed.as_str(),
                record.id,
                record.scope.as_str()
            ),
        )
        .into_response();
        (refused, None)
    } else if changes {
        match audit_body(req).await {
            Ok((req, request)) => (next.run(req).await, request),
            Err(e) => (e.into_response(), None),
        }
    } else {
        (next.run(req).await, None)
    };
    if changes {
        let before = response.extensions_mut().remove::<AuditBefore>().map(|b| {
            let bytes = serde_json::to_vec(&b.0).unwrap_or_default();
            audit_document(&bytes)
        });
        let entry = crate::AuditEntry {
            id: 0,
            at_ms: now_ms(),
            token_id: record.id.clone(),
            token_name: record.name.clone(),
            method,
            path,
            status: response.status().as_u16(),
            request,
            before,
        };
        // Answered once it is recorded; a log that cannot be written is
        // an error an operator must see.
        if let Err(e) = api.registry.record_audit(&entry).await {
            tracing::error!(
                token = record.id,
                path = entry.path,
                "the audit log could not be written: {e}"
            );
        }
    }
    response.extensions_mut().insert(TokenId(record.id));
    response
}

/// The router of the API (without TLS; [`serve_api`] serves it over
/// HTTPS) and its OpenAPI document.
pub fn router(services: ApiServices) -> (axum::Router, utoipa::openapi::OpenApi) {
    router_with(services, ApiLimits::default())
}

/// [`router`] with its limits.
fn router_with(
    services: ApiServices,
    limits: ApiLimits,
) -> (axum::Router, utoipa::openapi::OpenApi) {
    let api: Api = Arc::new(services);
    let (protected, mut doc) = handlers::routes().split_for_parts();
    let (open, open_doc) = handlers::open_routes().split_for_parts();
    doc.merge(open_doc);
    let protected = protected.layer(axum::middleware::from_fn_with_state(
        api.clone(),
        authenticate,
    ));
    let router = open
        .merge(protected)
        .with_state(api)
        .layer(axum::Extension(handlers::Document(Arc::new(doc.clone()))))
        // Each route's own limit is applied by `limit`, outermost, before
        // authentication reads anything.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(limits),
            limit,
        ))
        // Outermost: every request is logged and counted, the refused too.
        .layer(axum::middleware::from_fn(observe));
    (router, doc)
}

/// The largest request body: a release image of 192 MiB, base64.
pub const MAX_BODY: usize = 256 * 1024 * 1024;

/// A running API server; stops when dropped.
#[derive(Debug)]
pub struct RunningApi {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl RunningApi {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for RunningApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Why the API could not start.
#[derive(Debug)]
pub struct ApiStartError(String);

impl fmt::Display for ApiStartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "management API: {}", self.0)
    }
}

impl std::error::Error for ApiStartError {}

/// Serves the API over HTTPS (TLS 1.2 and 1.3, rustls with ring).
pub async fn serve_api(
    config: ApiConfig,
    services: ApiServices,
) -> Result<RunningApi, ApiStartError> {
    let err = |e: &dyn fmt::Display| ApiStartError(e.to_string());
    let mut tls =
        crate::tls::server_config(&config.cert_pem, &config.key_pem, None).map_err(|e| err(&e))?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind(config.bind)
        .await
        .map_err(|e| err(&e))?;
    let addr = listener.local_addr().map_err(|e| err(&e))?;
    let limits = config.limits.clone();
    let (router, _) = router_with(services, limits.clone());
    let connections = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, peer)) = listener.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            };
            let Ok(permit) = connections.clone().try_acquire_owned() else {
                tracing::warn!(%peer, "API connection limit reached; closed");
                continue;
            };
            let acceptor = acceptor.clone();
            let router = router.clone();
            let header_read_timeout = limits.header_read_timeout;
            tokio::spawn(async move {
                let _permit = permit;
                let handshake =
                    tokio::time::timeout(header_read_timeout, acceptor.accept(tcp)).await;
                let stream = match handshake {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        crate::tls::count_handshake_failure("api", &e);
                        tracing::debug!(%peer, "API TLS handshake failed: {e}");
                        return;
                    }
                    Err(_) => {
                        metrics::counter!(
                            "fleet_tls_handshake_failures_total",
                            "listener" => "api",
                            "reason" => "timeout"
                        )
                        .increment(1);
                        return;
                    }
                };
                let service = hyper_util::service::TowerToHyperService::new(router);
                // The header timeout also closes an idle keep-alive
                // connection: hyper arms it whenever it waits for a head.
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(header_read_timeout)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(%peer, "API connection: {e}");
                }
            });
        }
    });
    Ok(RunningApi { addr, task })
}
