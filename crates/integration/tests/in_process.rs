//! An in-process cascade on 127.0.0.1: real links, real onions, nodes on
//! their own threads; results must equal the local trainer's bit for bit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use mixnn_designer::{CascadeOptions, CascadeRunner, HopInfo, Keep};
use mixnn_model::optim::Optimizer;
use mixnn_model::spec::ModelSpec;
use mixnn_model::trainer::{run_training, LocalModel, Quiet, TrainConfig};

use mixnn_integration::{dataset, start_node, PAPER};

fn run_both(keep_first: bool, keep_last: bool, window: usize) {
    run_both_micro(keep_first, keep_last, window, 1);
}

fn run_both_micro(keep_first: bool, keep_last: bool, window: usize, micro_batches: usize) {
    run_both_with(keep_first, keep_last, window, micro_batches, &[]);
}

fn run_both_with(
    keep_first: bool,
    keep_last: bool,
    window: usize,
    micro_batches: usize,
    dummies: &[usize],
) {
    let model = ModelSpec::parse(PAPER, "paper").unwrap();
    let train = dataset(700, 1);
    let test = dataset(300, 2);
    let cfg = TrainConfig {
        epochs: 2,
        batch: 64,
        optimizer: Optimizer::default(),
        seed: mixnn_model::seed::RunSeed::from_number(77),
        micro_batches,
    };
    let mut local =
        LocalModel::new(&model, &cfg.seed, cfg.optimizer).with_micro_batches(micro_batches);
    let (lm, lw) = run_training(&mut local, &model, &train, &test, &cfg, &mut Quiet).unwrap();

    let remote = 5 - usize::from(keep_first) - usize::from(keep_last) + dummies.len();
    let hops: Vec<HopInfo> = (0..remote).map(|i| start_node(100 + i as u64)).collect();
    let opts = CascadeOptions {
        keep: Keep::from_flags(keep_first, keep_last),
        window,
        timeout: Duration::from_secs(20),
        dummies: dummies.to_vec(),
        ..CascadeOptions::default()
    };
    let mut cascade = CascadeRunner::connect(&model, hops, &cfg, opts).unwrap();
    let (cm, cw) = run_training(&mut cascade, &model, &train, &test, &cfg, &mut Quiet).unwrap();
    for (l, c) in lm.epochs.iter().zip(&cm.epochs) {
        assert_eq!(l.loss.to_bits(), c.loss.to_bits(), "epoch {} loss", l.epoch);
        assert_eq!(
            l.test_acc.to_bits(),
            c.test_acc.to_bits(),
            "epoch {} acc",
            l.epoch
        );
    }
    assert_eq!(lm.weights_sha256, cm.weights_sha256);
    assert!(lw == cw, "weights files differ");
    assert!(lm.epochs[1].test_acc > 0.3, "{:?}", lm.epochs);
    // The designer ends its session: the close passes every hop (dummies
    // and kept stages' neighbours included) and the last acknowledges.
    cascade.close().unwrap();
}

#[test]
fn cascade_equals_local_bit_for_bit() {
    run_both(false, false, 4);
}

#[test]
fn cascade_with_kept_first_and_last_equals_local() {
    run_both(true, true, 4);
}

#[test]
fn micro_batched_cascade_equals_micro_batched_local_for_every_k() {
    // 700 images: the last batch has 60 rows, which 8 does not divide.
    for k in [2, 3, 8] {
        run_both_micro(false, false, 4, k);
    }
}

#[test]
fn micro_batched_cascade_with_kept_stages_equals_local() {
    run_both_micro(true, true, 2, 4);
}

#[test]
fn dummy_hops_anywhere_change_nothing() {
    // First, in the middle and last (after the loss stage).
    run_both_with(false, false, 4, 1, &[0, 3, 7]);
    run_both_with(true, false, 2, 2, &[1, 5]);
}

/// Size classes with checkpoints and audits: a hop answers a session with
/// at most 4 × the cells the session sent it (plus 16 inits), so the
/// designer pads its fetch and audit requests to the class of their
/// answers; the run stays identical to the local one.
#[test]
fn cascade_with_size_classes_checkpoints_and_audits_equals_local() {
    let model = ModelSpec::parse(PAPER, "paper").unwrap();
    let train = dataset(700, 1);
    let test = dataset(300, 2);
    let cfg = TrainConfig {
        epochs: 2,
        batch: 64,
        optimizer: Optimizer::default(),
        seed: mixnn_model::seed::RunSeed::from_number(78),
        micro_batches: 1,
    };
    let mut local = LocalModel::new(&model, &cfg.seed, cfg.optimizer);
    let (lm, lw) = run_training(&mut local, &model, &train, &test, &cfg, &mut Quiet).unwrap();
    let hops: Vec<HopInfo> = (0..5).map(|i| start_node(120 + i as u64)).collect();
    let opts = CascadeOptions {
        padding: mixnn_designer::Padding::Classes,
        audit_rate: mixnn_designer::AuditRate::new(0.3),
        audit_seed: Some(5),
        timeout: Duration::from_secs(20),
        ..CascadeOptions::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let checkpoints = mixnn_designer::Checkpoints {
        dir: Some(mixnn_designer::checkpoint::CheckpointDir::open(dir.path(), 3).unwrap()),
        every: std::num::NonZeroU64::new(3),
    };
    let mut cascade = CascadeRunner::builder(&model, &cfg, hops)
        .options(opts)
        .checkpoints(checkpoints)
        .connect()
        .unwrap();
    let (cm, cw) = run_training(&mut cascade, &model, &train, &test, &cfg, &mut Quiet).unwrap();
    assert_eq!(lm.weights_sha256, cm.weights_sha256);
    assert!(lw == cw, "weights files differ");
    assert!(cascade.audit_stats().audits > 0);
    assert!(cascade.checkpoint_times().len() >= 4);
    assert!(cascade.recoveries().is_empty());
}
