//! Colluding hops learn only what the model shows them.
//!
//! Every node of a real cascade (in-process nodes, real links and onions,
//! a real designer with audits at 0.2 and checkpoints every 4 steps, so
//! commitment trailers, openings and state fetches all flow) records every
//! byte string it receives outside the model's tensors: raw headers and
//! notes, the link key of the sender, its peeled notes and tags, trailers,
//! relayed and transferred bodies (the `adversary` feature's `record`).
//! For colluders at positions {1, 3}, {2, 4}, {1, 5} and both ends, with and without
//! dummy hops, no 8-byte string is common to two colluders' records beyond
//! what every participant knows anyway ([`mixnn_integration::collusion`]).
//! The same check with `mixnn node` processes: `crates/cli/tests/collusion.rs`.
//! Failed before the designer faced
//! the two ends with keys of their own: the first and the last hop shared
//! its 32-byte link key (25 common windows).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::num::NonZeroU64;
use std::sync::{Arc, Mutex};

use mixnn_designer::{AuditRate, CascadeOptions, CascadeRunner, Checkpoints, HopInfo};
use mixnn_integration::collusion::{assert_nothing_common, Colluders};
use mixnn_integration::{dataset, start_node_with};
use mixnn_model::optim::Optimizer;
use mixnn_model::seed::RunSeed;
use mixnn_model::spec::ModelSpec;
use mixnn_model::trainer::{run_training, Quiet, TrainConfig};
use mixnn_node::NodeConfig;

use mixnn_integration::NARROW as MODEL;

const STEPS: u64 = 24;
const BATCH: u32 = 16;

type Record = Arc<Mutex<Vec<Vec<u8>>>>;

/// Runs a cascade of 5 stages and `dummies` (positions) on recording
/// nodes and checks what colluders among them have in common.
fn run_and_check(base: u64, dummies: &[usize], label: &str) {
    let model = ModelSpec::parse(MODEL, "narrow").unwrap();
    let cfg = TrainConfig {
        epochs: 1,
        batch: BATCH as usize,
        optimizer: Optimizer::default(),
        seed: RunSeed::random(),
        micro_batches: 1,
    };
    let (train, test) = (dataset(STEPS as usize * BATCH as usize, 1), dataset(64, 2));
    let n = 5 + dummies.len();
    let records: Vec<Record> = (0..n).map(|_| Arc::default()).collect();
    let hops: Vec<HopInfo> = records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            start_node_with(
                base + i as u64,
                NodeConfig {
                    record: Some(r.clone()),
                    ..NodeConfig::default()
                },
            )
        })
        .collect();
    let t0 = now();
    let mut runner = CascadeRunner::builder(&model, &cfg, hops.clone())
        .options(CascadeOptions {
            audit_rate: AuditRate::new(0.2),
            dummies: dummies.to_vec(),
            ..CascadeOptions::default()
        })
        .checkpoints(Checkpoints {
            dir: None,
            every: NonZeroU64::new(4),
        })
        .connect()
        .unwrap();
    run_training(&mut runner, &model, &train, &test, &cfg, &mut Quiet).unwrap();
    let padding = runner.policy();
    let stats = runner.audit_stats().clone();
    assert!(stats.audits > 0 && stats.failures.is_empty(), "{stats:?}");
    runner.close().unwrap();
    drop(runner);
    let colluders = Colluders {
        records: records.iter().map(|r| r.lock().unwrap().clone()).collect(),
        hops: hops
            .iter()
            .map(|h| {
                let key: [u8; 32] = hex::decode(&h.link).unwrap().try_into().unwrap();
                (h.addr, key)
            })
            .collect(),
        model: &model,
        optimizer: cfg.optimizer,
        padding,
        steps: STEPS,
        time: (t0, now()),
    };
    assert_nothing_common(&colluders, label);
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn colluding_hops_share_no_byte_string_but_public_ones() {
    run_and_check(700, &[], "five hops");
}

#[test]
fn colluding_hops_share_no_byte_string_but_public_ones_with_dummies() {
    run_and_check(720, &[1, 4], "five hops and two dummies");
}
