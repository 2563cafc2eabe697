//! An in-process cascade on 127.0.0.1: real links, real onions, nodes on
//! their own threads; results must equal the local trainer's bit for bit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use mixnn_designer::{CascadeOptions, CascadeRunner, HopInfo};
use mixnn_model::data::Dataset;
use mixnn_model::init::rng;
use mixnn_model::spec::ModelSpec;
use mixnn_model::stage::Sgd;
use mixnn_model::trainer::{run_training, LocalModel, Quiet, TrainConfig};
use mixnn_net::{LinkListener, NodeKeys};
use mixnn_node::{NodeConfig, NodeError};
use rand_core::RngCore;

const PAPER: &str = include_str!("../../../models/paper-mlp.toml");

fn dataset(n: usize, seed: u64) -> Dataset {
    let mut r = rng(seed);
    let labels: Vec<u8> = (0..n).map(|_| (r.next_u32() % 10) as u8).collect();
    let pixels = labels
        .iter()
        .flat_map(|l| (0..784).map(move |i| if i % 10 == *l as usize { 180u8 } else { 30 }))
        .map(|p| p.wrapping_add((r.next_u32() % 60) as u8))
        .collect();
    Dataset {
        pixels,
        labels,
        rows: 28,
        cols: 28,
    }
}

/// Starts a node on its own thread; returns its address and keys.
pub fn start_node(seed: u64, learned: Option<std::path::PathBuf>) -> HopInfo {
    let keys = NodeKeys::generate(&mut rand_chacha::ChaCha20Rng::seed_from_u64_compat(seed));
    let public = keys.public();
    let (tx, rx) = std::sync::mpsc::channel::<SocketAddr>();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = LinkListener::bind(
                "127.0.0.1:0".parse().unwrap(),
                keys.link().clone(),
                mixnn_node::link_config().unwrap(),
            )
            .await
            .unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            let config = NodeConfig {
                learned_file: learned,
                ..NodeConfig::default()
            };
            let r: Result<(), NodeError> =
                mixnn_node::run(listener, &keys, config, std::future::pending()).await;
            r.unwrap();
        });
    });
    let addr = rx.recv().unwrap();
    HopInfo {
        addr,
        onion: public.onion.to_string(),
        link: public.link.to_string(),
    }
}

trait SeedCompat {
    fn seed_from_u64_compat(seed: u64) -> Self;
}
impl SeedCompat for rand_chacha::ChaCha20Rng {
    fn seed_from_u64_compat(seed: u64) -> Self {
        <Self as rand_core::SeedableRng>::seed_from_u64(seed)
    }
}

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
        sgd: Sgd::default(),
        seed: 77,
        micro_batches,
    };
    let mut local = LocalModel::new(&model, cfg.seed, cfg.sgd).with_micro_batches(micro_batches);
    let (lm, lw) = run_training(&mut local, &model, &train, &test, &cfg, &mut Quiet).unwrap();

    let remote = 5 - usize::from(keep_first) - usize::from(keep_last) + dummies.len();
    let hops: Vec<HopInfo> = (0..remote)
        .map(|i| start_node(100 + i as u64, None))
        .collect();
    let opts = CascadeOptions {
        keep_first,
        keep_last,
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
