//! Designer loops: they come back through a healthy cascade without
//! changing the training, and a node that silently drops packets is
//! detected by loops alone (no training traffic) within the bound.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use mixnn_designer::{CascadeOptions, CascadeRunner, DesignerError, HopInfo, Rate};
use mixnn_integration::{dataset, start_node, start_node_with, PAPER};
use mixnn_model::optim::Optimizer;
use mixnn_model::spec::ModelSpec;
use mixnn_model::trainer::{run_training, LocalModel, Quiet, TrainConfig};
use mixnn_node::NodeConfig;

fn cfg() -> TrainConfig {
    TrainConfig {
        epochs: 1,
        batch: 64,
        optimizer: Optimizer::default(),
        seed: mixnn_model::seed::RunSeed::from_number(5),
        micro_batches: 1,
    }
}

#[test]
fn loops_come_back_and_change_nothing() {
    let model = ModelSpec::parse(PAPER, "paper").unwrap();
    let (train, test) = (dataset(640, 1), dataset(256, 2));
    let cfg = cfg();
    let mut local = LocalModel::new(&model, &cfg.seed, cfg.optimizer);
    let (lm, _) = run_training(&mut local, &model, &train, &test, &cfg, &mut Quiet).unwrap();

    let hops: Vec<HopInfo> = (0..5).map(|i| start_node(300 + i)).collect();
    let opts = CascadeOptions {
        loop_rate: Rate::new(20.0),
        ..CascadeOptions::default()
    };
    let mut cascade = CascadeRunner::connect(&model, hops, &cfg, opts).unwrap();
    let (cm, _) = run_training(&mut cascade, &model, &train, &test, &cfg, &mut Quiet).unwrap();
    assert_eq!(lm.weights_sha256, cm.weights_sha256);
    let during = cascade.loop_stats();
    assert!(during.sent > 0, "{during:?}");
    // Loops only, for a while: all come back but those still on their way.
    let after = cascade.run_loops(Duration::from_secs(1)).unwrap();
    assert!(after.sent >= during.sent + 5, "{after:?}");
    assert!(after.returned + 5 >= after.sent, "{after:?}");
    assert_eq!(after.lost, 0);
}

#[test]
fn loops_detect_a_node_that_drops_packets_within_the_bound() {
    let model = ModelSpec::parse(PAPER, "paper").unwrap();
    let bound = Duration::from_secs(2);
    // Hop 2 forwards the init (its first message), then drops everything.
    let hops: Vec<HopInfo> = (0..5)
        .map(|i| {
            let config = NodeConfig {
                drop_after: (i == 2).then_some(1),
                ..NodeConfig::default()
            };
            start_node_with(400 + i, config)
        })
        .collect();
    let opts = CascadeOptions {
        loop_rate: Rate::new(10.0),
        timeout: bound,
        ..CascadeOptions::default()
    };
    let mut cascade = CascadeRunner::connect(&model, hops, &cfg(), opts).unwrap();
    let started = Instant::now();
    let err = cascade.run_loops(Duration::from_secs(30)).unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, DesignerError::Timeout { .. }), "{err}");
    assert!(err.to_string().contains("loop"), "{err}");
    // The first loop leaves within a few gaps of 1/rate; detection comes
    // at most one bound after it (plus scheduling slack).
    assert!(
        took < bound + Duration::from_secs(2),
        "detected after {took:?}"
    );
    assert!(took >= bound, "detected after {took:?}");
    let s = cascade.loop_stats();
    assert_eq!(s.returned, 0, "{s:?}");
    assert_eq!(s.lost, 1, "{s:?}");
}

#[test]
fn without_loops_nothing_is_sent() {
    let model = ModelSpec::parse(PAPER, "paper").unwrap();
    let hops: Vec<HopInfo> = (0..5).map(|i| start_node(500 + i)).collect();
    let mut cascade =
        CascadeRunner::connect(&model, hops, &cfg(), CascadeOptions::default()).unwrap();
    let s = cascade.run_loops(Duration::from_millis(300)).unwrap();
    assert_eq!(s.sent, 0);
}
