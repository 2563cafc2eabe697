//! The HTTP/JSON front of the directory (axum). Every route is documented
//! in `docs/directory-api.md`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, State};
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use mixnn_directory::api::{ErrorBody, FailureResponse, Health, RegisterResponse};
use mixnn_directory::{
    parse_key_hex, DirectoryError, NodeRecord, Result, SignedDescriptor, SignedDrawReceipt,
    SignedDrawRequest, SignedFailureReport, SignedHeartbeat, SignedView,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tower_service::Service;

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
        .route("/v1/draws", post(draw))
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

/// Serves the directory on `listener` until `shutdown` completes.
///
/// Each connection must send a whole request head within
/// `http.header_timeout` (also while idle between requests), and each
/// request must be answered within `http.request_timeout` (408
/// otherwise); at most `http.max_connections` are served at once (more
/// are closed at accept). Nodes due for a probe are probed again every
/// `reprobe_interval / 4` seconds. At shutdown the listener closes, idle
/// connections are closed at once and requests in flight get
/// `http.shutdown_grace`.
pub async fn serve(
    listener: TcpListener,
    state: DirectoryState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, directory = %hex::encode(state.public_key()), "directory listening");
    }
    let limits = state.config().http;
    let reprobe = tokio::spawn(reprobe_loop(state.clone()));
    let app = router(state);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (closing, closed) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut refused = 0u64;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::error!("accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                    refused += 1;
                    if refused.is_power_of_two() {
                        tracing::warn!(
                            "{} connections open (the limit): closed {refused} so far, the latest from {peer}",
                            limits.max_connections
                        );
                    }
                    continue;
                };
                let app = app.clone();
                let mut closed = closed.clone();
                connections.spawn(async move {
                    let _permit = permit;
                    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                        req.extensions_mut().insert(ConnectInfo(peer));
                        let mut app = app.clone();
                        async move {
                            let reply = tokio::time::timeout(
                                limits.request_timeout,
                                app.call(req.map(Body::new)),
                            )
                            .await;
                            Ok::<_, Infallible>(match reply {
                                Ok(Ok(response)) => response,
                                Ok(Err(never)) => match never {},
                                Err(_) => error(
                                    StatusCode::REQUEST_TIMEOUT,
                                    format!(
                                        "request not complete within {} s",
                                        limits.request_timeout.as_secs_f64()
                                    ),
                                ),
                            })
                        }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(limits.header_timeout)
                        .serve_connection(TokioIo::new(stream), service);
                    tokio::pin!(conn);
                    let outcome = tokio::select! {
                        r = conn.as_mut() => r,
                        _ = closed.changed() => {
                            conn.as_mut().graceful_shutdown();
                            conn.await
                        }
                    };
                    if let Err(e) = outcome {
                        tracing::debug!(%peer, "connection ended: {e}");
                    }
                });
            }
        }
    }
    drop(listener);
    let _ = closing.send(true);
    let open = connections.len();
    let finished = tokio::time::timeout(limits.shutdown_grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        tracing::warn!(
            "{} of {open} connections still open after {} s; closed",
            connections.len(),
            limits.shutdown_grace.as_secs_f64()
        );
    }
    connections.abort_all();
    reprobe.abort();
    Ok(())
}

/// Probes the nodes that are due, every quarter of `reprobe_interval`.
async fn reprobe_loop(state: DirectoryState) {
    let period = Duration::from_secs((state.config().reprobe_interval / 4).max(1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let s = state.clone();
        match tokio::task::spawn_blocking(move || s.reprobe()).await {
            Ok(Ok((passed, failed))) if passed + failed > 0 => {
                tracing::info!(passed, failed, "nodes probed again");
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!("probing nodes again: {e}"),
            Err(e) => tracing::error!("probe task: {e}"),
        }
    }
}

async fn register(
    State(state): State<DirectoryState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let signed = match parse::<SignedDescriptor>("descriptor", body) {
        Ok(s) => s,
        Err(e) => return respond::<RegisterResponse>(Err(e)),
    };
    // The probe blocks (up to probe_timeout): off the async threads.
    let reply = tokio::task::spawn_blocking(move || {
        let status = state.register(&signed)?;
        let identity = signed.verify_signature()?.identity;
        Ok(RegisterResponse { status, identity })
    })
    .await
    .unwrap_or_else(|e| {
        Err(DirectoryError::Server {
            reason: format!("registration task: {e}"),
        })
    });
    respond(reply)
}

async fn draw(
    State(state): State<DirectoryState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let reply =
        parse::<SignedDrawRequest>("draw request", body).and_then(|r| state.draw(&r, peer.ip()));
    respond::<SignedDrawReceipt>(reply)
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
