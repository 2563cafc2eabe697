#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The cascade, process by process: `mixnn node` daemons on 127.0.0.1 and
//! `mixnn train --cascade FILE` against them, as a user would run them.
//! Results must equal `mixnn train --local` byte for byte; a dead node must
//! stop the designer with one clear line; nodes must learn only their
//! neighbours and shrug off garbage.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

mod common;
use common::*;

/// The paper's five stages with an identity (dummy) stage after the second.
const SIX_STAGES: &str = r#"
name = "paper-mlp-with-dummy"
input = 784

[[stage]]
ops = [{ op = "linear", in = 784, out = 128 }, { op = "relu" }]

[[stage]]
ops = [{ op = "linear", in = 128, out = 64 }, { op = "relu" }]

[[stage]]
ops = [{ op = "identity" }]

[[stage]]
ops = [{ op = "linear", in = 64, out = 10 }]

[[stage]]
ops = [{ op = "log_softmax" }]

[[stage]]
ops = [{ op = "nll_loss" }]
"#;

const SMALL: &[&str] = &[
    "--train-limit",
    "2000",
    "--test-limit",
    "1000",
    "--epochs",
    "1",
];

/// `train --local` and `train --cascade` through `nodes` with `extra`.
fn local_vs_cascade(nodes: &Nodes, extra: &[&str]) {
    let dir = &nodes.dir;
    let file = nodes.cascade_file("cascade.toml");
    let args: Vec<&str> = SMALL.iter().chain(extra).copied().collect();
    let local = train(dir, "local", &["--local"], &args);
    let cascade = train(
        dir,
        "cascade",
        &["--cascade", file.to_str().unwrap()],
        &args,
    );
    assert_same_run(&local, &cascade);
}

#[test]
fn cascade_run_is_byte_identical_to_local() {
    let t = tempfile::tempdir().unwrap();
    let nodes = Nodes::start(t.path(), 5);
    local_vs_cascade(&nodes, &[]);
}

#[test]
fn kept_first_and_last_is_byte_identical_to_local() {
    let t = tempfile::tempdir().unwrap();
    let nodes = Nodes::start(t.path(), 3);
    local_vs_cascade(&nodes, &["--keep", "first,last"]);
}

#[test]
fn killed_node_stops_the_designer_with_a_clear_error() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    // Recording peers: the test watches for the first node's file.
    let mut nodes = Nodes::start_with(dir, 5, &["--debug-record-peers"]);
    let file = nodes.cascade_file("cascade.toml");
    let mut designer = train_cmd(
        dir,
        "cascade",
        &["--cascade", file.to_str().unwrap()],
        &[
            "--timeout",
            "3",
            // Long enough to be still training when the node is killed:
            // 45 epochs of the fixture's 2000 images are the 90000 images
            // that 3 epochs of 30000 used to be.
            "--epochs",
            "45",
            "--test-limit",
            "1000",
        ],
    )
    .stdout(File::create(dir.join("designer.out")).unwrap())
    .stderr(File::create(dir.join("designer.err")).unwrap())
    .spawn()
    .unwrap();
    let read_err = || std::fs::read_to_string(dir.join("designer.err")).unwrap();

    // The first node writes its learned peers once the init has passed it.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !nodes.state(0).join("learned-peers.txt").exists() {
        assert!(
            designer.try_wait().unwrap().is_none(),
            "designer ended early: {}",
            read_err()
        );
        assert!(Instant::now() < deadline, "no init in 60 s: {}", read_err());
        std::thread::sleep(Duration::from_millis(50));
    }
    // Let training steps flow through the cascade.
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        designer.try_wait().unwrap().is_none(),
        "designer ended before the node was killed: {}",
        read_err()
    );
    nodes.kill_hard(3);
    let killed = Instant::now();

    let status = loop {
        if let Some(s) = designer.try_wait().unwrap() {
            break s;
        }
        if killed.elapsed() > Duration::from_secs(20) {
            let _ = designer.kill();
            let _ = designer.wait();
            panic!("designer still running 20 s after a node died");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = killed.elapsed();
    assert_eq!(status.code(), Some(1), "stderr: {}", read_err());
    let err = read_err();
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "expected one stderr line, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(lines[0].contains("no answer from the cascade"), "{err}");
    assert!(lines[0].contains("a node is down"), "{err}");
    // The bound is 3 s; allow for a loaded machine, not for hanging.
    assert!(took < Duration::from_secs(15), "took {took:?}");
    assert!(!dir.join("cascade.safetensors").exists());

    // The other nodes outlive the failed run, and the guard stops them.
    for i in [0, 1, 2, 4] {
        assert!(nodes.running(i), "node {i} died: {}", nodes.log(i));
    }
    let pids: Vec<u32> = nodes.children.iter().map(Child::id).collect();
    nodes.stop();
    for (i, c) in nodes.children.iter_mut().enumerate() {
        assert!(c.try_wait().unwrap().is_some(), "node {i} still running");
    }
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} left"
        );
    }
}

/// The addresses in `STATE/learned-peers.txt`, once the file stops changing
/// (a node writes it just after sending what made it learn an address).
fn learned(nodes: &Nodes, i: usize) -> BTreeSet<SocketAddr> {
    let path = nodes.state(i).join("learned-peers.txt");
    let read = || std::fs::read_to_string(&path).unwrap_or_default();
    let mut last = read();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = read();
        if (now == last && !now.is_empty()) || Instant::now() > deadline {
            break;
        }
        last = now;
    }
    last.lines()
        .map(|l| {
            l.trim()
                .parse()
                .unwrap_or_else(|_| panic!("node {i}: bad line {l:?}"))
        })
        .collect()
}

#[test]
fn each_node_learns_only_its_neighbours() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let model = dir.join("six.toml");
    std::fs::write(&model, SIX_STAGES).unwrap();
    let nodes = Nodes::start_with(dir, 6, &["--debug-record-peers"]);
    let file = nodes.cascade_file("cascade.toml");
    train(
        dir,
        "cascade",
        &["--cascade", file.to_str().unwrap()],
        &[
            "--model",
            model.to_str().unwrap(),
            "--train-limit",
            "500",
            "--test-limit",
            "200",
            "--epochs",
            "1",
        ],
    );
    let n = nodes.hops.len();
    let addrs: Vec<SocketAddr> = nodes.hops.iter().map(|h| h.addr).collect();
    let mut outsiders: BTreeSet<SocketAddr> = BTreeSet::new();
    for i in 0..n {
        let set = learned(&nodes, i);
        let neighbours: BTreeSet<SocketAddr> = [i.checked_sub(1), Some(i + 1)]
            .into_iter()
            .flatten()
            .filter_map(|j| addrs.get(j).copied())
            .collect();
        for (j, a) in addrs.iter().enumerate() {
            let adjacent = neighbours.contains(a);
            assert_eq!(
                set.contains(a),
                adjacent,
                "node {i} and node {j} ({a}): learned {set:?}"
            );
        }
        let others: Vec<&SocketAddr> = set.iter().filter(|a| !addrs.contains(a)).collect();
        assert!(others.len() <= 1, "node {i} learned {set:?}");
        // Only the ends talk to the designer (init ack, done, loss, and
        // every fetch, which comes back through the first hop); middle
        // hops never do, with parameters (fetched) or without.
        if i == 0 || i == n - 1 {
            assert_eq!(others.len(), 1, "node {i} learned {set:?}");
        } else {
            assert!(others.is_empty(), "middle node {i} learned {set:?}");
        }
        outsiders.extend(others.into_iter().copied());
    }
    // Two outside addresses: the designer's two ends, one per end of the
    // cascade (so the first and the last hop share no address of it).
    assert_eq!(outsiders.len(), 2, "{outsiders:?}");
}

/// Deterministic noise for garbage (splitmix64).
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) as u8
        })
        .collect()
}

/// Opens a real Noise link to `hop` with a fresh (unknown) key and sends
/// `cells`; waits a little so the node reads them before the link closes.
fn send_over_link(hop: &Hop, cells: &[u8]) {
    let info = mixnn_designer::HopInfo {
        addr: hop.addr,
        onion: hop.onion.clone(),
        link: hop.link.clone(),
        arith: mixnn_model::arith::ARITH_VERSION,
    };
    let expect = mixnn_net::PublicLinkKey::from_bytes(info.link_key().unwrap());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let key = mixnn_net::LinkKeypair::generate_os();
        let config = mixnn_net::LinkConfig::mixnn();
        let mut link = mixnn_net::Link::connect(hop.addr, &key, Some(expect), config)
            .await
            .unwrap();
        link.send_cells(cells).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    });
}

#[test]
fn node_survives_garbage_and_keeps_serving() {
    const CELL: usize = 16_384;
    let t = tempfile::tempdir().unwrap();
    let mut nodes = Nodes::start(t.path(), 5);
    let target = nodes.hops[0].clone();

    // (a) Random bytes instead of a Noise handshake.
    let mut s = TcpStream::connect(target.addr).unwrap();
    let _ = s.write_all(&noise(1, 70_000));
    drop(s);
    // (b) Connect, say nothing, close.
    drop(TcpStream::connect(target.addr).unwrap());
    // (c) A real link from a key nobody knows, carrying: a cell of an
    // unknown kind; a session cell for a session the node does not have;
    // an init cell whose onion is noise.
    let mut bad_kind = noise(2, CELL);
    bad_kind[0] = 0xee;
    send_over_link(&target, &bad_kind);
    for (kind, seed) in [(2u8, 3), (1u8, 4)] {
        let mut cell = noise(seed, CELL);
        cell[0] = kind;
        cell[1..3].copy_from_slice(&1u16.to_le_bytes());
        cell[3..7].copy_from_slice(&0u32.to_le_bytes());
        send_over_link(&target, &cell);
    }
    assert!(nodes.running(0), "node died: {}", nodes.log(0));

    // It still trains, bit for bit.
    local_vs_cascade(&nodes, &[]);
    assert!(nodes.running(0));

    let log = nodes.log(0);
    for what in [
        "link from",
        "dropping link from",
        "refused: unknown session",
        "refused: onion",
    ] {
        assert!(log.contains(what), "no {what:?} in the node's log:\n{log}");
    }
}

/// The shipped VGG model through node processes: stages 2–4 on nodes, the
/// first and last kept by the designer, a dummy hop after stage 2 (it
/// takes that stage's max pooling), audits at 0.2. Weights equal the
/// local run's byte for byte, every audit passes.
#[test]
fn the_vgg_model_through_nodes_with_audits_a_dummy_and_kept_ends_matches_local() {
    let t = tempfile::tempdir().unwrap();
    let nodes = Nodes::start_with(t.path(), 4, &["-v"]);
    let dir = &nodes.dir;
    let file = nodes.cascade_file("cascade.toml");
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/vgg-fmnist.toml");
    let args = [
        "--model",
        model,
        // 10 steps: with 4 hops at q = 0.2 no audit at all has
        // probability 0.8^40 ≈ 1e-4.
        "--train-limit",
        "640",
        "--test-limit",
        "128",
        "--epochs",
        "1",
        "--keep",
        "first,last",
        "--audit-rate",
        "0.2",
        "--dummy-at",
        "1",
    ];
    let local = train(dir, "local", &["--local"], &args);
    let out = train_cmd(
        dir,
        "cascade",
        &["--cascade", file.to_str().unwrap()],
        &args,
    )
    .output()
    .unwrap();
    let said = said_ok(&out, "VGG cascade");
    let audits = said
        .lines()
        .find(|l| l.contains("audits:"))
        .unwrap_or_else(|| panic!("no audit line: {said}"));
    assert!(audits.contains(" 0 failed"), "{audits}");
    let passed: usize = audits
        .split(", ")
        .find_map(|part| part.strip_suffix(" passed"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{audits}"));
    assert!(passed >= 1, "{audits}");
    // The dummy's init named the moved op, not an identity.
    assert!(
        nodes.log(1).contains("stage=max_pool2d(2)"),
        "{}",
        nodes.log(1)
    );
    assert_same_run(&local, &Run::load(dir, "cascade"));
}
