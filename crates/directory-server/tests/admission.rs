//! Admission by proof, per-prefix limits, squatting and slow clients,
//! against real node listeners ([`mixnn_net::LinkListener::answer_probes`])
//! and the real prober ([`NoiseProber`]) over HTTP.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mixnn_directory::api::Registration;
use mixnn_directory::*;
use mixnn_directory_client::DirectoryClient;
use mixnn_directory_server::*;
use mixnn_net::{LinkConfig, LinkListener, NodeKeys};
use rand_chacha::rand_core::SeedableRng;

fn keys(seed: u64) -> NodeKeys {
    NodeKeys::generate(&mut rand_chacha::ChaCha20Rng::seed_from_u64(seed))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A node listener answering probes with the keys of `seed`, at `addr`.
fn node(
    rt: &tokio::runtime::Runtime,
    seed: u64,
    addr: SocketAddr,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let k = keys(seed);
    let listener = rt.block_on(async {
        LinkListener::bind(addr, k.link().clone(), LinkConfig::mixnn())
            .await
            .unwrap()
            .answer_probes(&k)
    });
    let bound = listener.local_addr().unwrap();
    let task = rt.spawn(async move {
        while let Ok(p) = listener.accept().await {
            tokio::spawn(async move {
                let _ = p.handshake().await;
            });
        }
    });
    (bound, task)
}

fn descriptor_of(k: &NodeKeys, addr: SocketAddr) -> SignedDescriptor {
    let p = k.public();
    let d = Descriptor {
        addr,
        identity: *p.identity.as_bytes(),
        onion: *p.onion.as_bytes(),
        link: *p.link.as_bytes(),
        version: PROTOCOL_VERSION,
        arith: 1,
        capabilities: Capabilities {
            cores: 1,
            memory_mb: 1,
            price_per_hour: 0.0,
            location: String::new(),
        },
        published: unix_now(),
        family: Vec::new(),
    };
    sign_descriptor(k.identity(), &d).unwrap()
}

/// A directory with the real prober, served on 127.0.0.1 by `rt`.
struct Server {
    url: String,
    state: DirectoryState,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
}

fn serve_on(rt: &tokio::runtime::Runtime, config: DirectoryConfig) -> Server {
    let state = DirectoryState::new(
        Store::open_in_memory().unwrap(),
        DirectoryKeys::from_secret([0x18; 32]),
        Arc::new(SystemClock),
        config,
    );
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let s = state.clone();
    let done = rt.spawn(async move {
        serve(listener, s, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    Server {
        url,
        state,
        stop: Some(stop),
        done: Some(done),
    }
}

/// The real limits, but the nodes are on 127.0.0.1.
fn config() -> DirectoryConfig {
    DirectoryConfig {
        probe_timeout: Duration::from_secs(2),
        addresses: Addresses::Local,
        ..DirectoryConfig::default()
    }
}

fn listed(server: &Server) -> Vec<SocketAddr> {
    let v = server
        .state
        .view()
        .unwrap()
        .verify(&[server.state.public_key()], unix_now())
        .unwrap();
    v.nodes.iter().map(|n| n.descriptor.addr).collect()
}

/// Attack: 50 descriptors from one IP with no process behind any of them.
/// Before: all 50 accepted in 0.03 s, listed at uptime 1.0. Now: none.
#[test]
fn unreachable_or_key_mismatching_descriptors_are_never_listed() {
    let rt = runtime();
    let server = serve_on(&rt, config());
    let client = DirectoryClient::new(&server.url).unwrap();
    let mut refused = 0;
    for i in 0..50u64 {
        let k = keys(1000 + i);
        // A port nobody listens on.
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = dead.local_addr().unwrap();
        drop(dead);
        match client.register(&descriptor_of(&k, addr)) {
            Err(DirectoryError::Refused {
                status: 422,
                message,
            }) => {
                assert!(message.contains("not admitted"), "{message}");
                refused += 1;
            }
            other => panic!("registered a node with nothing behind it: {other:?}"),
        }
    }
    assert_eq!(refused, 50);

    // A real node at the address, but the descriptor names other keys.
    let (addr, _node) = node(&rt, 1, "127.0.0.1:0".parse().unwrap());
    let (real, other) = (keys(1), keys(2));
    let mut d = descriptor_of(&real, addr).verify_signature().unwrap();
    d.link = *other.public().link.as_bytes();
    let wrong_link = sign_descriptor(real.identity(), &d).unwrap();
    let mut d = descriptor_of(&real, addr).verify_signature().unwrap();
    d.onion = *other.public().onion.as_bytes();
    let wrong_onion = sign_descriptor(real.identity(), &d).unwrap();
    // Somebody else's identity claiming the real node's keys and address.
    let mut d = descriptor_of(&real, addr).verify_signature().unwrap();
    d.identity = *other.public().identity.as_bytes();
    let stolen = sign_descriptor(other.identity(), &d).unwrap();
    for bad in [wrong_link, wrong_onion, stolen] {
        let err = client.register(&bad).unwrap_err();
        assert!(
            matches!(err, DirectoryError::Refused { status: 422, .. }),
            "{err}"
        );
    }
    assert!(listed(&server).is_empty());
    // The node's own descriptor passes.
    assert_eq!(
        client.register(&descriptor_of(&real, addr)).unwrap(),
        Registration::New
    );
    assert_eq!(listed(&server), vec![addr]);
}

/// Sybils beyond the per-prefix limit: all real listeners on 127.0.0.1,
/// the default limit 2 per /24.
#[test]
fn sybils_beyond_the_per_prefix_limit_are_refused() {
    let rt = runtime();
    let server = serve_on(&rt, config());
    let client = DirectoryClient::new(&server.url).unwrap();
    let mut nodes = Vec::new();
    for seed in 10..15 {
        nodes.push(node(&rt, seed, "127.0.0.1:0".parse().unwrap()));
    }
    let mut outcomes = Vec::new();
    for (i, (addr, _)) in nodes.iter().enumerate() {
        outcomes.push(client.register(&descriptor_of(&keys(10 + i as u64), *addr)));
    }
    assert!(outcomes[..2].iter().all(Result::is_ok), "{outcomes:?}");
    for o in &outcomes[2..] {
        match o {
            Err(DirectoryError::Refused {
                status: 409,
                message,
            }) => {
                assert!(
                    message.contains("127.0.0.0/24 already has 2 listed nodes"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(listed(&server).len(), 2);
    // --allow-same-subnet (local testing) lifts the limit.
    let loose = serve_on(
        &rt,
        DirectoryConfig {
            allow_same_subnet: true,
            ..config()
        },
    );
    let client = DirectoryClient::new(&loose.url).unwrap();
    for (i, (addr, _)) in nodes.iter().enumerate() {
        client
            .register(&descriptor_of(&keys(10 + i as u64), *addr))
            .unwrap();
    }
    assert_eq!(listed(&loose).len(), 5);
}

/// Attack: a descriptor for an address its sender held once. Before: the
/// real node started there later got 409 on every retry. Now: the node
/// proven at the address takes it; the squatter is unlisted at its next
/// probe too.
#[test]
fn squatting_is_undone_when_the_real_node_registers() {
    let rt = runtime();
    let server = serve_on(&rt, config());
    let client = DirectoryClient::new(&server.url).unwrap();
    let (addr, squatter) = node(&rt, 20, "127.0.0.1:0".parse().unwrap());
    client.register(&descriptor_of(&keys(20), addr)).unwrap();
    squatter.abort();
    // The squatter's re-probe fails once it is gone.
    std::thread::sleep(Duration::from_millis(100));
    let (_passed, _failed) = server.state.reprobe().unwrap();
    // The real node binds the same address and registers.
    let (addr2, _real) = node(&rt, 21, addr);
    assert_eq!(addr2, addr);
    assert_eq!(
        client.register(&descriptor_of(&keys(21), addr)).unwrap(),
        Registration::New
    );
    let v = server
        .state
        .view()
        .unwrap()
        .verify(&[server.state.public_key()], unix_now())
        .unwrap();
    assert_eq!(v.nodes.len(), 1);
    assert_eq!(
        v.nodes[0].descriptor.identity,
        *keys(21).public().identity.as_bytes()
    );
}

/// A listed node whose listener goes away is unlisted at the next probe,
/// and listed again once a probe passes.
#[test]
fn reprobes_unlist_a_node_that_went_away() {
    let rt = runtime();
    let server = serve_on(
        &rt,
        DirectoryConfig {
            reprobe_interval: 0,
            ..config()
        },
    );
    let client = DirectoryClient::new(&server.url).unwrap();
    let (addr, task) = node(&rt, 30, "127.0.0.1:0".parse().unwrap());
    client.register(&descriptor_of(&keys(30), addr)).unwrap();
    assert_eq!(listed(&server).len(), 1);
    task.abort();
    std::thread::sleep(Duration::from_millis(100));
    let (passed, failed) = server.state.reprobe().unwrap();
    assert_eq!((passed, failed), (0, 1));
    assert!(listed(&server).is_empty());
    let (_, _again) = node(&rt, 30, addr);
    assert_eq!(server.state.reprobe().unwrap(), (1, 0));
    assert_eq!(listed(&server).len(), 1);
}

/// Attack: 200 connections that send half a request head. Before: all
/// were still open after 45 s, and a SIGTERM waited for them. Now they
/// are closed after the header timeout, and shutdown does not wait on
/// idle or half-open clients.
#[test]
fn slow_clients_time_out_and_shutdown_does_not_wait_for_them() {
    let rt = runtime();
    let mut server = serve_on(
        &rt,
        DirectoryConfig {
            http: HttpLimits {
                header_timeout: Duration::from_secs(1),
                ..HttpLimits::default()
            },
            ..config()
        },
    );
    let addr = server.url.trim_start_matches("http://").to_owned();
    let mut slow: Vec<std::net::TcpStream> = (0..50)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(&addr).unwrap();
            s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
            s
        })
        .collect();
    let start = Instant::now();
    for s in &mut slow {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = Vec::new();
        // EOF (or a 408) once the server gives up on the head.
        let _ = s.read_to_end(&mut buf);
    }
    let closed_after = start.elapsed();
    eprintln!("50 half-header connections closed after {closed_after:?}");
    assert!(closed_after < Duration::from_secs(5), "{closed_after:?}");
    // The server still answers.
    DirectoryClient::new(&server.url).unwrap().health().unwrap();

    // Shutdown with idle keep-alive and half-sent clients open.
    let _idle: Vec<std::net::TcpStream> = (0..20)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(&addr).unwrap();
            s.write_all(b"GET /v1/he").unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let start = Instant::now();
    let _ = server.stop.take().unwrap().send(());
    rt.block_on(server.done.take().unwrap()).unwrap();
    let stopped_after = start.elapsed();
    eprintln!("shutdown with 20 half-open clients took {stopped_after:?}");
    assert!(stopped_after < Duration::from_secs(3), "{stopped_after:?}");
}
