//! A node announcing itself to a real directory server (in process, over
//! HTTP on 127.0.0.1): registration, heartbeats, cover peers from the
//! verified view, re-registration after the directory forgot it. Here
//! rather than in the node crate, so that the node does not depend on the
//! server (axum, SQLite), not even for its tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use mixnn_directory::{sign_descriptor, Capabilities, DirectoryKeys, ManualClock, SystemClock};
use mixnn_directory_client::DirectoryClient;
use mixnn_directory_server::{serve, DirectoryConfig, DirectoryState, Store};
use mixnn_net::NodeKeys;
use mixnn_node::announce::{spawn, AnnounceConfig, Announcement, Announcer, CoverView};
use mixnn_node::cover::CoverPeer;
use rand_chacha::rand_core::SeedableRng;
use tokio::sync::watch;

fn keys(seed: u64) -> NodeKeys {
    NodeKeys::generate(&mut rand_chacha::ChaCha20Rng::seed_from_u64(seed))
}

fn capabilities() -> Capabilities {
    Capabilities {
        cores: 2,
        memory_mb: 1024,
        price_per_hour: 0.5,
        location: "test".into(),
    }
}

/// A listener of node `k` at 127.0.0.1:`port` that answers the
/// directory's probes (admission by proof), on its own thread for the
/// rest of the test process.
fn answer_probes(k: &NodeKeys, port: u16) {
    let k = keys_clone(k);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            let listener = mixnn_net::LinkListener::bind(
                addr,
                k.link().clone(),
                mixnn_net::LinkConfig::mixnn(),
            )
            .await
            .unwrap_or_else(|e| panic!("port {port} for a test node: {e}"))
            .answer_probes(&k);
            tx.send(()).unwrap();
            while let Ok(p) = listener.accept().await {
                tokio::spawn(async move {
                    let _ = p.handshake().await;
                });
            }
        });
    });
    rx.recv().unwrap();
}

/// The same keys again (NodeKeys is not Clone; tests derive keys from seeds).
fn keys_clone(k: &NodeKeys) -> NodeKeys {
    for seed in 0..1000 {
        let c = keys(seed);
        if c.public().identity == k.public().identity {
            return c;
        }
    }
    unreachable!("test keys come from seeds below 1000")
}

/// A directory served on `addr` by a background thread until dropped.
struct Served {
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Served {
    fn start(state: DirectoryState, addr: &str) -> Served {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let listener = rt.block_on(tokio::net::TcpListener::bind(addr)).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            rt.block_on(serve(listener, state, async {
                let _ = stopped.await;
            }))
            .unwrap();
        });
        Served {
            url,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn registers_heartbeats_and_stops_on_request() {
    let state = DirectoryState::new(
        Store::open_in_memory().unwrap(),
        DirectoryKeys::from_secret([3; 32]),
        Arc::new(SystemClock),
        // Every test node is on 127.0.0.1 (local testing only).
        DirectoryConfig {
            allow_same_subnet: true,
            addresses: mixnn_directory_server::Addresses::Local,
            ..DirectoryConfig::default()
        },
    );
    let served = Served::start(state.clone(), "127.0.0.1:0");
    let k = keys(2);
    answer_probes(&k, 7100);
    let node = Announcement::new(&k, "127.0.0.1:7100".parse().unwrap(), capabilities());
    let config = AnnounceConfig {
        heartbeat: Duration::from_millis(200),
        ..AnnounceConfig::default()
    };
    let client = DirectoryClient::new(&served.url).unwrap();
    let announcer = spawn(
        k.identity(),
        node,
        client,
        Arc::new(SystemClock),
        config,
        None,
    )
    .unwrap();
    let identity = *k.public().identity.as_bytes();
    let deadline = Instant::now() + Duration::from_secs(10);
    // Heartbeats carry whole seconds and must increase: two take >= 1 s.
    while state
        .node(&identity)
        .map_or(true, |r| r.history.heartbeats < 2)
    {
        assert!(Instant::now() < deadline, "no heartbeats in 10 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let record = state.node(&identity).unwrap();
    assert_eq!(
        record.descriptor.verify_signature().unwrap().addr,
        "127.0.0.1:7100".parse().unwrap()
    );
    let started = Instant::now();
    let stats = announcer.stop(Duration::from_secs(5)).unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(stats.registrations, 1);
    assert!(stats.heartbeats >= 2, "{stats:?}");
}

/// Registers node `seed` at 127.0.0.1:`port` with `state` directly.
fn register_other(state: &DirectoryState, seed: u64, port: u16) -> [u8; 32] {
    let k = keys(seed);
    answer_probes(&k, port);
    let a = Announcement::new(&k, ([127, 0, 0, 1], port).into(), capabilities());
    let d = a.descriptor(k.identity(), mixnn_directory::unix_now());
    state
        .register(&sign_descriptor(k.identity(), &d).unwrap())
        .unwrap();
    a.link
}

/// A directory (key from `secret`) with node `other` registered at
/// 127.0.0.1:`other_port`, and node `seed` announcing itself there at
/// 127.0.0.1:`port` every `heartbeat`, taking cover peers from views
/// it verifies with `trusted` (the directory's own key if `None`).
struct CoverSetup {
    state: DirectoryState,
    _served: Served,
    node: NodeKeys,
    other_link: [u8; 32],
    announcer: Announcer,
    peers: watch::Receiver<Vec<CoverPeer>>,
}

fn cover_setup(
    secret: u8,
    (other, other_port): (u64, u16),
    (seed, port): (u64, u16),
    heartbeat: Duration,
    trusted: Option<[u8; 32]>,
) -> CoverSetup {
    let state = DirectoryState::new(
        Store::open_in_memory().unwrap(),
        DirectoryKeys::from_secret([secret; 32]),
        Arc::new(SystemClock),
        // Every test node is on 127.0.0.1 (local testing only).
        DirectoryConfig {
            allow_same_subnet: true,
            addresses: mixnn_directory_server::Addresses::Local,
            ..DirectoryConfig::default()
        },
    );
    let served = Served::start(state.clone(), "127.0.0.1:0");
    let other_link = register_other(&state, other, other_port);
    let k = keys(seed);
    answer_probes(&k, port);
    let node = Announcement::new(&k, ([127, 0, 0, 1], port).into(), capabilities());
    let (cover, peers) = CoverView::new(vec![trusted.unwrap_or_else(|| state.public_key())]);
    let config = AnnounceConfig {
        heartbeat,
        ..AnnounceConfig::default()
    };
    let client = DirectoryClient::new(&served.url).unwrap();
    let announcer = spawn(
        k.identity(),
        node,
        client,
        Arc::new(SystemClock),
        config,
        Some(cover),
    )
    .unwrap();
    CoverSetup {
        state,
        _served: served,
        node: k,
        other_link,
        announcer,
        peers,
    }
}

#[test]
fn cover_peers_follow_the_verified_view() {
    let CoverSetup {
        state,
        _served,
        other_link: link_a,
        announcer,
        mut peers,
        ..
    } = cover_setup(6, (20, 7201), (21, 7200), Duration::from_millis(100), None);
    let wait_for = |peers: &mut watch::Receiver<Vec<CoverPeer>>, n: usize| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while peers.borrow_and_update().len() != n {
            assert!(Instant::now() < deadline, "not {n} cover peers within 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        peers.borrow().clone()
    };
    // The view lists the node itself and node A: A is its only peer.
    assert_eq!(
        wait_for(&mut peers, 1),
        vec![("127.0.0.1:7201".parse().unwrap(), link_a)]
    );
    // A node that comes later is picked up at a later heartbeat.
    let link_b = register_other(&state, 22, 7202);
    let got = wait_for(&mut peers, 2);
    assert!(got.contains(&("127.0.0.1:7202".parse().unwrap(), link_b)));
    let stats = announcer.stop(Duration::from_secs(5)).unwrap();
    assert!(stats.views >= 2 && stats.view_failures == 0, "{stats:?}");
}

#[test]
fn a_view_signed_by_another_key_is_not_used() {
    let other = DirectoryKeys::from_secret([8; 32]).public();
    let CoverSetup {
        state,
        _served,
        node: k,
        announcer,
        peers,
        ..
    } = cover_setup(
        7,
        (30, 7301),
        (31, 7300),
        Duration::from_millis(50),
        Some(other),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while state.node(&identity_of(&k)).is_err() {
        assert!(Instant::now() < deadline, "not registered within 10 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let stats = announcer.stop(Duration::from_secs(5)).unwrap();
    assert!(peers.borrow().is_empty());
    assert_eq!(stats.views, 0, "{stats:?}");
    assert!(stats.view_failures >= 1, "{stats:?}");
}

fn identity_of(k: &NodeKeys) -> [u8; 32] {
    *k.public().identity.as_bytes()
}

#[test]
fn forgotten_node_registers_again() {
    let clock = ManualClock::new(mixnn_directory::unix_now());
    let state = |secret| {
        DirectoryState::new(
            Store::open_in_memory().unwrap(),
            DirectoryKeys::from_secret([secret; 32]),
            Arc::new(clock.clone()),
            // Every test node is on 127.0.0.1 (local testing only).
            DirectoryConfig {
                allow_same_subnet: true,
                addresses: mixnn_directory_server::Addresses::Local,
                ..DirectoryConfig::default()
            },
        )
    };
    let first = state(4);
    let served = Served::start(first.clone(), "127.0.0.1:0");
    let addr = served.url.trim_start_matches("http://").to_owned();
    let k = keys(4);
    let identity = *k.public().identity.as_bytes();
    answer_probes(&k, 7102);
    let node = Announcement::new(&k, "127.0.0.1:7102".parse().unwrap(), capabilities());
    let config = AnnounceConfig {
        heartbeat: Duration::from_millis(20),
        retry_min: Duration::from_millis(20),
        retry_max: Duration::from_millis(20),
    };
    let client = DirectoryClient::new(&served.url).unwrap();
    let announcer = spawn(
        k.identity(),
        node,
        client,
        Arc::new(clock.clone()),
        config,
        None,
    )
    .unwrap();
    let wait_for = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "{what}: not within 10 s");
            clock.advance(1);
            std::thread::sleep(Duration::from_millis(30));
        }
    };
    wait_for("heartbeat", &|| {
        first
            .node(&identity)
            .is_ok_and(|r| r.history.heartbeats >= 1)
    });
    // The directory comes back on the same address with an empty
    // database: the next heartbeat is refused as unknown, and the loop
    // registers again.
    drop(served);
    let second = state(5);
    let _served = Served::start(second.clone(), &addr);
    wait_for("registration again", &|| second.node(&identity).is_ok());
    let stats = announcer.stop(Duration::from_secs(5)).unwrap();
    assert_eq!(stats.registrations, 2, "{stats:?}");
    assert!(stats.failures >= 1, "{stats:?}");
}
