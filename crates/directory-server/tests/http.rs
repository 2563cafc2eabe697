//! The directory over real HTTP: `serve` on 127.0.0.1:0, the blocking
//! client, status codes and error bodies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::thread::JoinHandle;

use common::*;
use mixnn_directory::api::*;
use mixnn_directory::ed25519_dalek::SigningKey;
use mixnn_directory::*;
use mixnn_directory_client::*;
use mixnn_directory_server::*;
use tokio::sync::oneshot;

/// A directory served on its own thread; stops and joins on drop.
struct TestServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl TestServer {
    fn start(state: DirectoryState) -> Self {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                serve(listener, state, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
            });
        });
        let addr = addr_rx.recv().unwrap();
        Self {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn client(&self) -> DirectoryClient {
        DirectoryClient::new(&self.url()).unwrap()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

/// Expects `result` to be refused with `status` and a message starting with `prefix`.
fn refused<T: std::fmt::Debug>(result: Result<T, DirectoryError>, status: u16, prefix: &str) {
    match result {
        Err(DirectoryError::Refused { status: s, message }) => {
            assert_eq!(s, status, "{message}");
            assert!(
                message.starts_with(prefix),
                "{message:?} does not start with {prefix:?}"
            );
            assert!(!message.contains('\n'));
        }
        other => panic!("expected a refusal with {status}, got {other:?}"),
    }
}

/// Sends `body` raw and returns (status, body).
fn raw(method: &str, url: &str, body: &str) -> (u16, String) {
    let reply = ureq::request(method, url).send_string(body);
    match reply {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn nodes_register_heartbeat_and_designers_get_a_verified_view() {
    let (state, clock) = directory();
    let public = state.public_key();
    let server = TestServer::start(state);
    let client = server.client();
    for i in 0..5 {
        assert_eq!(client.register(&signed(i, T0)).unwrap(), Registration::New);
    }
    assert_eq!(
        client.register(&signed(0, T0)).unwrap(),
        Registration::Unchanged
    );
    let key = node_key(0);
    clock.advance(10);
    client
        .heartbeat(&sign_heartbeat(&key, clock.now()).unwrap())
        .unwrap();
    refused(
        client.heartbeat(&sign_heartbeat(&key, clock.now()).unwrap()),
        409,
        "heartbeat stamped",
    );

    let designer = SigningKey::from_bytes(&[0x55; 32]);
    let drawn = node_key(1).verifying_key().to_bytes();
    let receipt = client
        .draw(&sign_draw_request(&designer, &[drawn], clock.now()).unwrap())
        .unwrap()
        .verify(&[public])
        .unwrap();
    assert_eq!(receipt.nodes, vec![drawn]);
    let report = sign_failure_report(
        &designer,
        node_key(1).verifying_key().to_bytes(),
        7,
        "timeout",
        clock.now(),
    )
    .unwrap();
    assert_eq!(
        client.report_failure(&report).unwrap(),
        FailureOutcome::Recorded
    );
    assert_eq!(
        client.report_failure(&report).unwrap(),
        FailureOutcome::Duplicate
    );

    let view = client
        .view()
        .unwrap()
        .verify(&[public], clock.now())
        .unwrap();
    assert_eq!(view.nodes.len(), 5);
    let failed = view
        .nodes
        .iter()
        .find(|n| n.descriptor.identity == node_key(1).verifying_key().to_bytes());
    assert_eq!(failed.unwrap().recent_failures, 1);
    refused(
        client
            .view()
            .unwrap()
            .verify(&[[1; 32]], clock.now())
            .map_err(|e| DirectoryError::Refused {
                status: e.http_status(),
                message: e.to_string(),
            }),
        403,
        "view signed by unpinned directory key",
    );

    let record = client.node(&key.verifying_key().to_bytes()).unwrap();
    assert_eq!(record.history.heartbeats, 1);
    assert_eq!(record.descriptor, signed(0, T0));
    refused(client.node(&[3; 32]), 404, "unknown node");

    let health = client.health().unwrap();
    assert_eq!(
        (
            health.status.as_str(),
            health.directory,
            health.nodes,
            health.now
        ),
        ("ok", public, 5, T0 + 10)
    );
}

#[test]
fn bad_descriptors_are_refused_with_status_and_error_body() {
    let (state, _clock) = directory();
    let server = TestServer::start(state);
    let client = server.client();
    client.register(&signed(1, T0)).unwrap();

    // Forged: signed by another key than the identity it claims.
    let attacker = node_key(9);
    let forged = tamper(
        &sign_descriptor(&attacker, &descriptor(&attacker, 7009, T0)).unwrap(),
        &hex::encode(attacker.verifying_key().to_bytes()),
        &hex::encode(node_key(2).verifying_key().to_bytes()),
    );
    refused(client.register(&forged), 401, "bad signature on descriptor");
    // Tampered: the address changed after signing.
    refused(
        client.register(&tamper(&signed(2, T0), "127.0.0.1:7002", "127.0.0.1:7999")),
        401,
        "bad signature on descriptor",
    );
    // Stale and future.
    refused(
        client.register(&signed(2, T0 - 601)),
        422,
        "stale descriptor",
    );
    refused(
        client.register(&signed(2, T0 + 61)),
        422,
        "descriptor is from the future",
    );
    // Older re-registration.
    client.register(&signed(1, T0 + 5)).unwrap();
    refused(
        client.register(&signed(1, T0 + 4)),
        409,
        "descriptor published",
    );

    // Unsigned and malformed bodies, straight over HTTP.
    let url = format!("{}/v1/descriptors", server.url());
    let (status, body) = raw("POST", &url, "not json");
    assert_eq!(status, 400);
    let body: ErrorBody = serde_json::from_str(&body).unwrap();
    assert!(
        body.error.starts_with("malformed descriptor"),
        "{}",
        body.error
    );
    let unsigned = serde_json::to_string(&descriptor(&node_key(4), 7004, T0)).unwrap();
    let (status, body) = raw("POST", &url, &format!(r#"{{"descriptor":{unsigned}}}"#));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("missing field `signature`"), "{body}");
}

#[test]
fn heartbeats_and_failures_from_strangers_are_refused() {
    let (state, clock) = directory();
    let server = TestServer::start(state);
    let client = server.client();
    let stranger = SigningKey::from_bytes(&[0x42; 32]);
    refused(
        client.heartbeat(&sign_heartbeat(&stranger, clock.now()).unwrap()),
        404,
        "unknown node",
    );
    refused(
        client.heartbeat(&sign_heartbeat(&stranger, clock.now() - 3600).unwrap()),
        422,
        "stale heartbeat",
    );
    client.register(&signed(1, T0)).unwrap();
    let hb = tamper(
        &sign_heartbeat(&node_key(1), clock.now()).unwrap(),
        &format!("{}", T0),
        &format!("{}", T0 + 1),
    );
    refused(client.heartbeat(&hb), 401, "bad signature on heartbeat");
    let report = sign_failure_report(&stranger, [8; 32], 1, "x", clock.now()).unwrap();
    refused(client.report_failure(&report), 404, "unknown node");
}

#[test]
fn unknown_routes_bad_keys_and_wrong_methods_get_json_errors() {
    let (state, _clock) = directory();
    let server = TestServer::start(state);
    let base = server.url();
    let (status, body) = raw("GET", &format!("{base}/v1/nodes/zz"), "");
    assert_eq!(status, 400);
    assert!(body.contains("malformed identity key"), "{body}");
    let (status, body) = raw("GET", &format!("{base}/v2/whatever"), "");
    assert_eq!(
        (status, body.as_str()),
        (404, r#"{"error":"no such route"}"#)
    );
    let (status, body) = raw("DELETE", &format!("{base}/v1/view"), "");
    assert_eq!(status, 405, "{body}");
    assert!(body.contains("method not allowed"));
    let huge = "x".repeat(MAX_BODY + 1);
    let (status, _) = raw("POST", &format!("{base}/v1/heartbeats"), &huge);
    assert!(status == 400 || status == 413, "{status}");
}

#[test]
fn client_reports_an_unreachable_directory_in_one_line() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let client = DirectoryClient::new(&format!("http://127.0.0.1:{port}/")).unwrap();
    let err = client.view().unwrap_err();
    assert!(matches!(err, DirectoryError::Transport { .. }), "{err}");
    assert!(
        err.to_string().starts_with(&format!(
            "cannot reach directory at http://127.0.0.1:{port}/v1/view"
        )),
        "{err}"
    );
    assert!(!err.to_string().contains('\n'));
    assert!(DirectoryClient::new("127.0.0.1:80").is_err());
}
