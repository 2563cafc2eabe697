//! The HTTP/JSON front of the directory (axum). Every route is documented
//! in `docs/directory-api.md`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    listing_prefix, parse_key_hex, DirectoryError, NodeRecord, Result, SignedDescriptor,
    SignedDrawReceipt, SignedDrawRequest, SignedFailureReport, SignedHeartbeat, SignedView,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinSet};
use tower_service::Service;

use crate::config::HttpLimits;
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

/// A connection younger than this never gives its slot to a new one.
const EVICTABLE: Duration = Duration::from_secs(1);

/// One served connection, as the accept loop sees it.
struct Conn {
    prefix: String,
    since: Instant,
    /// A request is being answered.
    busy: Arc<AtomicBool>,
    /// Requests answered so far.
    served: Arc<AtomicU64>,
    task: Option<AbortHandle>,
}

/// The connections served, and which gives way to a new one.
#[derive(Default)]
struct Conns {
    next: u64,
    open: HashMap<u64, Conn>,
}

impl Conns {
    /// The connection a new one from `prefix` takes the place of, if
    /// any must give way (`Err` if none can): past the per-prefix limit,
    /// that prefix's oldest connection not answering a request; past the
    /// total, the oldest that has not sent a whole request yet, else the
    /// oldest idle one. A connection in the middle of a request, or younger
    /// than a second, is never closed for another.
    fn make_room(&self, prefix: &str, limits: &HttpLimits) -> std::result::Result<Option<u64>, ()> {
        let of_prefix = self.open.values().filter(|c| c.prefix == prefix).count();
        // An honest client sends its request as soon as it connects: only
        // a connection that has waited a while may give way.
        let idle = |c: &&Conn| !c.busy.load(Ordering::SeqCst) && c.since.elapsed() >= EVICTABLE;
        if of_prefix >= limits.max_connections_per_prefix.max(1) {
            return self
                .open
                .iter()
                .filter(|(_, c)| c.prefix == prefix)
                .filter(|(_, c)| idle(c))
                .min_by_key(|(_, c)| (c.served.load(Ordering::SeqCst) > 0, c.since))
                .map(|(id, _)| Some(*id))
                .ok_or(());
        }
        if self.open.len() >= limits.max_connections.max(1) {
            return self
                .open
                .iter()
                .filter(|(_, c)| idle(c))
                .min_by_key(|(_, c)| (c.served.load(Ordering::SeqCst) > 0, c.since))
                .map(|(id, _)| Some(*id))
                .ok_or(());
        }
        Ok(None)
    }
}

/// Serves the directory on `listener` until `shutdown` completes.
///
/// Each connection must send a whole request head within
/// `http.header_timeout` (also while idle between requests), and each
/// request must be answered within `http.request_timeout` (408
/// otherwise). At most `http.max_connections` are served at once, at most
/// `http.max_connections_per_prefix` from one IPv4 /24 or IPv6 /29; a new
/// connection past a limit takes the place of the oldest that has not sent
/// a whole request (then of the oldest idle one), so clients that connect
/// and never finish a request cannot lock others out; a connection in the
/// middle of a request is never closed for another. Nodes due for a probe
/// are probed again every `reprobe_interval / 4` seconds. At shutdown the
/// listener closes, idle connections are closed at once and requests in
/// flight get `http.shutdown_grace`.
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
    let conns = Arc::new(Mutex::new(Conns::default()));
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
                let prefix = listing_prefix(peer.ip());
                let (busy, served) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
                let id = {
                    let mut c = conns.lock().unwrap_or_else(|e| e.into_inner());
                    match c.make_room(&prefix, &limits) {
                        Err(()) => {
                            refused += 1;
                            if refused.is_power_of_two() {
                                tracing::warn!(
                                    "no connection slot for {peer} (every one answering a request): closed {refused} so far",
                                );
                            }
                            continue;
                        }
                        Ok(Some(victim)) => {
                            if let Some(task) = c.open.remove(&victim).and_then(|v| v.task) {
                                task.abort();
                            }
                        }
                        Ok(None) => {}
                    }
                    let id = c.next;
                    c.next += 1;
                    c.open.insert(id, Conn {
                        prefix,
                        since: Instant::now(),
                        busy: Arc::clone(&busy),
                        served: Arc::clone(&served),
                        task: None,
                    });
                    id
                };
                let app = app.clone();
                let mut closed = closed.clone();
                let gone = Arc::clone(&conns);
                let task = connections.spawn(async move {
                    // Out of the table when the connection ends.
                    struct Leave(Arc<Mutex<Conns>>, u64);
                    impl Drop for Leave {
                        fn drop(&mut self) {
                            self.0.lock().unwrap_or_else(|e| e.into_inner()).open.remove(&self.1);
                        }
                    }
                    let _leave = Leave(gone, id);
                    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                        req.extensions_mut().insert(ConnectInfo(peer));
                        let mut app = app.clone();
                        let (busy, served) = (Arc::clone(&busy), Arc::clone(&served));
                        busy.store(true, Ordering::SeqCst);
                        async move {
                            struct Done(Arc<AtomicBool>, Arc<AtomicU64>);
                            impl Drop for Done {
                                fn drop(&mut self) {
                                    self.1.fetch_add(1, Ordering::SeqCst);
                                    self.0.store(false, Ordering::SeqCst);
                                }
                            }
                            let _done = Done(busy, served);
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
                if let Some(c) = conns.lock().unwrap_or_else(|e| e.into_inner()).open.get_mut(&id) {
                    c.task = Some(task);
                }
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
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let signed = match parse::<SignedDescriptor>("descriptor", body) {
        Ok(s) => s,
        Err(e) => return respond::<RegisterResponse>(Err(e)),
    };
    // The probe blocks (up to probe_timeout): off the async threads.
    let reply = tokio::task::spawn_blocking(move || {
        let status = state.register_from(&signed, Some(peer.ip()))?;
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
    let reply = parse::<SignedHeartbeat>("heartbeat", body).and_then(|hb| state.heartbeat(&hb));
    // A node whose proof is due is probed now, in the background: its
    // heartbeats keep it listed however long the reprobe round takes.
    if let Ok(identity) = &reply {
        if let Ok(Some(d)) = state.proof_due(identity) {
            let s = state.clone();
            tokio::task::spawn_blocking(move || {
                if let Err(e) = s.refresh_proof(&d) {
                    tracing::error!("probing a node that heartbeat: {e}");
                }
            });
        }
    }
    respond(reply.map(|_| serde_json::json!({ "status": "ok" })))
}

async fn failure(
    State(state): State<DirectoryState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let reply = parse::<SignedFailureReport>("failure report", body)
        .and_then(|r| state.report_failure_from(&r, Some(peer.ip())))
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
