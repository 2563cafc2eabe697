//! Colluding hops learn only what the model shows them, with real
//! processes (`--features adversary`): five `mixnn node --record-received
//! FILE` processes (curious hops that write down every byte string they
//! receive outside the model's tensors), and seven drawn from a `mixnn
//! directory` with two dummies, trained through by `mixnn train` with
//! audits at 0.2 and a checkpoint every 4 steps, so trailers, openings and
//! state fetches all flow. For colluders at positions {1, 3}, {2, 4},
//! {1, 5} and both ends no 8-byte string is common to their records
//! beyond what every participant knows ([`mixnn_integration::collusion`];
//! the in-process twin is `crates/integration/tests/collusion.rs`).
#![cfg(feature = "adversary")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use mixnn_designer::plan::layout::Layout;
use mixnn_designer::{Keep, Padding};
use mixnn_directory::{parse_key_hex, unix_now};
use mixnn_directory_client::DirectoryClient;
use mixnn_integration::collusion::{assert_nothing_common, parse_record_file, Colluders};
use mixnn_model::optim::Optimizer;
use mixnn_model::seed::RunSeed;
use mixnn_model::spec::ModelSpec;
use mixnn_model::trainer::TrainConfig;

mod common;
use common::*;

/// 384 images in batches of 16: 24 steps.
const STEPS: u64 = 24;
const BATCH: usize = 16;

/// The run's flags: a fresh secret seed (as by default), audits at 0.2,
/// a checkpoint every 4 steps.
fn run_flags(seed: &str) -> Vec<String> {
    [
        "--train-limit",
        "384",
        "--test-limit",
        "64",
        "--batch",
        "16",
        "--epochs",
        "1",
        "--audit-rate",
        "0.2",
        "--checkpoint-every",
        "4",
        "--seed",
        seed,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Trains through the cascade `mode` names (`--cascade F` or a
/// directory) with [`run_flags`] and a fresh seed; what it printed, every
/// audit passed.
fn train_through(dir: &Path, mode: &[&str]) -> String {
    let flags = run_flags(&fresh_seed());
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let out = train_cmd(dir, "cascade", mode, &flags).output().unwrap();
    let said = said_ok(&out, "the cascade run");
    assert!(said.contains("0 failed"), "{said}");
    said
}

/// A fresh secret seed, in hex.
fn fresh_seed() -> String {
    RunSeed::random().to_string()
}

/// Starts `n` recording nodes (with `extra` arguments), node `i`
/// recording to `DIR/received-i.bin`.
fn recording_nodes(dir: &Path, n: usize, extra: &[&str]) -> Nodes {
    let mut nodes = Nodes::start(dir, 0);
    for i in 0..n {
        let file = dir.join(format!("received-{i}.bin"));
        let mut args = extra.to_vec();
        args.extend(["--record-received", file.to_str().unwrap()]);
        nodes.start_one(&args);
    }
    nodes
}

/// Checks what colluders among `order` (node indices by position) have
/// in common, the cascade having dummies at `dummies`.
fn check(
    dir: &Path,
    nodes: &Nodes,
    order: &[usize],
    dummies: &[usize],
    time: (u64, u64),
    label: &str,
) {
    // The nodes write what they receive within 50 ms.
    std::thread::sleep(Duration::from_millis(500));
    let model = ModelSpec::parse(mixnn_integration::PAPER, "paper").unwrap();
    let cfg = TrainConfig {
        epochs: 1,
        batch: BATCH,
        optimizer: Optimizer::default(),
        seed: RunSeed::random(),
        micro_batches: 1,
    };
    let layout = Layout::new(&model, Keep::None, dummies, order.len()).unwrap();
    let records = order
        .iter()
        .map(|&i| {
            let bytes = std::fs::read(dir.join(format!("received-{i}.bin"))).unwrap();
            parse_record_file(&bytes)
        })
        .collect();
    let hops: Vec<(SocketAddr, [u8; 32])> = order
        .iter()
        .map(|&i| {
            let h = &nodes.hops[i];
            (h.addr, hex::decode(&h.link).unwrap().try_into().unwrap())
        })
        .collect();
    let c = Colluders {
        records,
        hops,
        model: &model,
        optimizer: cfg.optimizer,
        padding: layout.policy(Padding::Uniform, &cfg, true),
        steps: STEPS,
        time,
    };
    assert_nothing_common(&c, label);
}

#[test]
fn colluding_node_processes_share_no_byte_string_but_public_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut nodes = recording_nodes(dir, 5, &[]);
    let cascade = nodes.cascade_file("cascade.toml");
    let t0 = unix_now();
    train_through(dir, &["--cascade", cascade.to_str().unwrap()]);
    check(
        dir,
        &nodes,
        &[0, 1, 2, 3, 4],
        &[],
        (t0, unix_now()),
        "five node processes",
    );
    nodes.stop();
}

#[test]
fn colluding_node_processes_with_dummies_share_no_byte_string_but_public_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let directory = Directory::start(dir);
    let mut nodes = recording_nodes(dir, 7, &["--directory", &directory.url, "--heartbeat", "1"]);
    let client = DirectoryClient::new(&directory.url).unwrap();
    let key = parse_key_hex("key", &directory.key).unwrap();
    wait_until(
        20,
        || "7 nodes in the view".into(),
        || {
            client
                .view()
                .ok()
                .and_then(|v| v.verify(&[key], unix_now()).ok())
                .is_some_and(|v| v.nodes.len() == 7)
        },
    );
    let t0 = unix_now();
    let said = train_through(
        dir,
        &[
            "--directory",
            &directory.url,
            "--directory-key",
            &directory.key,
            "--dummies",
            "2",
            "--allow-same-subnet",
        ],
    );
    // The designer names the hops it drew, in order, and the dummies.
    let mut order = Vec::new();
    let mut dummies = Vec::new();
    for line in said.lines().filter(|l| l.trim_start().starts_with("hop ")) {
        let addr: SocketAddr = line.split_whitespace().nth(3).unwrap().parse().unwrap();
        if line.contains(", dummy") {
            dummies.push(order.len());
        }
        order.push(nodes.hops.iter().position(|h| h.addr == addr).unwrap());
    }
    assert_eq!((order.len(), dummies.len()), (7, 2), "{said}");
    check(
        dir,
        &nodes,
        &order,
        &dummies,
        (t0, unix_now()),
        "seven node processes, two dummies",
    );
    nodes.stop();
}
