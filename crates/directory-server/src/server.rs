//! The HTTP/JSON front of the directory (axum). Every route is documented
//! in `docs/directory-api.md`.

use std::future::Future;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use mixnn_directory::api::{ErrorBody, FailureResponse, Health, RegisterResponse};
use mixnn_directory::{
    parse_key_hex, DirectoryError, NodeRecord, Result, SignedDescriptor, SignedFailureReport,
    SignedHeartbeat, SignedView,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpListener;

use crate::state::DirectoryState;

/// Largest accepted request body (bytes).
pub const MAX_BODY: usize = 64 * 1024;

/// The directory's routes over `state` (for embedding or tests; [`serve`]
/// is the usual entry point).
pub fn router(state: DirectoryState) -> Router {
    Router::new()
        .route("/v1/descriptors", post(register))
        .route("/v1/heartbeats", post(heartbeat))
        .route("/v1/failures", post(failure))
        .route("/v1/view", get(view))
        .route("/v1/nodes/{identity}", get(node))
        .route("/v1/health", get(health))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route".into()) })
        .method_not_allowed_fallback(|| async {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this route".into(),
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// Serves the directory on `listener` until `shutdown` completes, then
/// finishes the requests in flight and returns.
pub async fn serve(
    listener: TcpListener,
    state: DirectoryState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, directory = %hex::encode(state.public_key()), "directory listening");
    }
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| DirectoryError::Server {
            reason: e.to_string(),
        })
}

async fn register(
    State(state): State<DirectoryState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let reply = parse::<SignedDescriptor>("descriptor", body).and_then(|signed| {
        let status = state.register(&signed)?;
        let identity = signed.verify_signature()?.identity;
        Ok(RegisterResponse { status, identity })
    });
    respond(reply)
}

async fn heartbeat(
    State(state): State<DirectoryState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let reply = parse::<SignedHeartbeat>("heartbeat", body)
        .and_then(|hb| state.heartbeat(&hb))
        .map(|()| serde_json::json!({ "status": "ok" }));
    respond(reply)
}

async fn failure(
    State(state): State<DirectoryState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let reply = parse::<SignedFailureReport>("failure report", body)
        .and_then(|r| state.report_failure(&r))
        .map(|status| FailureResponse { status });
    respond(reply)
}

async fn view(State(state): State<DirectoryState>) -> Response {
    respond::<SignedView>(state.view())
}

async fn node(State(state): State<DirectoryState>, Path(identity): Path<String>) -> Response {
    let reply = parse_key_hex("identity key", &identity).and_then(|id| state.node(&id));
    respond::<NodeRecord>(reply)
}

async fn health(State(state): State<DirectoryState>) -> Response {
    let reply = state.node_count().map(|nodes| Health {
        status: "ok".into(),
        directory: state.public_key(),
        nodes,
        now: state.now(),
    });
    respond(reply)
}

fn parse<T: DeserializeOwned>(
    what: &'static str,
    body: Result<Bytes, BytesRejection>,
) -> Result<T> {
    let body = body.map_err(|e| DirectoryError::malformed(what, e.body_text()))?;
    serde_json::from_slice(&body).map_err(|e| DirectoryError::malformed(what, e))
}

fn respond<T: Serialize>(reply: Result<T>) -> Response {
    match reply {
        Ok(value) => Json(value).into_response(),
        Err(e) => {
            let status =
                StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            if status.is_server_error() {
                tracing::error!(error = %e, "directory request failed");
            } else {
                tracing::debug!(error = %e, "directory request refused");
            }
            error(status, e.to_string())
        }
    }
}

fn error(status: StatusCode, error: String) -> Response {
    (status, Json(ErrorBody { error })).into_response()
}
