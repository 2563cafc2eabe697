//! Micro-batches (one update per batch from the gradients of its slices)
//! and stage state (parameters, momentum, step counter) for checkpoints.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use mixnn_model::init::rng;
use mixnn_model::spec::ModelSpec;
use mixnn_model::stage::{Sgd, Stage};
use mixnn_model::tensor_bytes::TensorBytes;
use mixnn_model::trainer::{micro_ranges, stage_seed, LocalModel, StepRunner};
use proptest::prelude::*;
use rand::RngCore;

mod common;
use common::synthetic_batches;

const PAPER: &str = include_str!("../../../models/paper-mlp.toml");

fn flat(model: &mut LocalModel) -> Vec<f32> {
    model
        .params()
        .unwrap()
        .into_iter()
        .flatten()
        .flat_map(|p| p.values)
        .collect()
}

#[test]
fn micro_batch_updates_match_whole_batch_updates_up_to_rounding() {
    let model = ModelSpec::parse(PAPER, "paper").unwrap();
    let data = synthetic_batches(5, 64, 3);
    let mut whole = LocalModel::new(
        &model,
        &mixnn_model::seed::RunSeed::from_number(5),
        Sgd::default(),
    );
    let mut micro = LocalModel::new(
        &model,
        &mixnn_model::seed::RunSeed::from_number(5),
        Sgd::default(),
    )
    .with_micro_batches(4);
    let lw = whole.train_batches(&data, &mut |_| {}).unwrap();
    let lm = micro.train_batches(&data, &mut |_| {}).unwrap();
    for (a, b) in lw.iter().zip(&lm) {
        assert!((a - b).abs() < 1e-4, "loss {a} vs {b}");
    }
    let (a, b) = (flat(&mut whole), flat(&mut micro));
    let start = flat(&mut LocalModel::new(
        &model,
        &mixnn_model::seed::RunSeed::from_number(5),
        Sgd::default(),
    ));
    let max_diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    let max_moved = a
        .iter()
        .zip(&start)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    // The same gradient, summed in another order: far smaller than what
    // training moved.
    assert!(max_diff < 1e-5, "max difference {max_diff}");
    assert!(
        max_moved > 1e-3,
        "training moved the weights by {max_moved}"
    );
}

#[test]
fn one_micro_batch_is_the_plain_step_bit_for_bit() {
    let model = ModelSpec::parse(PAPER, "paper").unwrap();
    let data = synthetic_batches(4, 64, 8);
    let mut plain = LocalModel::new(
        &model,
        &mixnn_model::seed::RunSeed::from_number(2),
        Sgd::default(),
    );
    let mut one = LocalModel::new(
        &model,
        &mixnn_model::seed::RunSeed::from_number(2),
        Sgd::default(),
    )
    .with_micro_batches(1);
    plain.train_batches(&data, &mut |_| {}).unwrap();
    one.train_batches(&data, &mut |_| {}).unwrap();
    let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
    assert_eq!(bits(flat(&mut plain)), bits(flat(&mut one)));
}

fn hidden_stage(model: &ModelSpec) -> Stage {
    Stage::new(
        &model.stages[1],
        stage_seed(&mixnn_model::seed::RunSeed::from_number(4), 1),
        Sgd::default(),
    )
}

fn micro_inputs(n: usize, rows: usize, width: usize, seed: u64) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut r = rng(seed);
    let mut t = |rows: usize, cols: usize| {
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| (r.next_u32() % 2000) as f32 / 1000.0 - 1.0)
            .collect();
        TensorBytes::encode_f32(&[rows, cols], &v)
    };
    (0..n).map(|_| (t(rows, width), t(rows, 64))).collect()
}

#[test]
fn gradients_add_up_in_micro_batch_order_whatever_order_they_arrive_in() {
    let model = ModelSpec::parse(PAPER, "paper").unwrap();
    let width = model.stages[1].input.clone();
    let inputs = micro_inputs(3, 8, width.numel(), 11);
    let run = |order: &[usize]| {
        let mut stage = hidden_stage(&model);
        let caches: Vec<_> = inputs
            .iter()
            .map(|(x, _)| stage.forward_micro_bytes(x, None, 0).unwrap().1)
            .collect();
        let mut caches: Vec<Option<_>> = caches.into_iter().map(Some).collect();
        for &m in order {
            let c = caches[m].take().unwrap();
            stage
                .backward_micro_bytes(c, Some(&inputs[m].1), true, m as u32)
                .unwrap();
        }
        assert_eq!(stage.pending_micros(), 3);
        stage.apply();
        assert_eq!(stage.steps(), 1);
        stage
            .params()
            .into_iter()
            .flat_map(|p| p.values)
            .map(f32::to_bits)
            .collect::<Vec<_>>()
    };
    assert_eq!(run(&[0, 1, 2]), run(&[2, 0, 1]));
}

#[test]
fn a_micro_batch_twice_in_one_step_is_refused() {
    let model = ModelSpec::parse(PAPER, "paper").unwrap();
    let inputs = micro_inputs(2, 4, model.stages[1].input.numel(), 12);
    let mut stage = hidden_stage(&model);
    let (_, c0) = stage.forward_micro_bytes(&inputs[0].0, None, 0).unwrap();
    let (_, c1) = stage.forward_micro_bytes(&inputs[1].0, None, 0).unwrap();
    stage
        .backward_micro_bytes(c0, Some(&inputs[0].1), true, 0)
        .unwrap();
    let err = stage
        .backward_micro_bytes(c1, Some(&inputs[1].1), true, 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("micro-batch 0 of step 0 twice"), "{err}");
}

#[test]
fn a_restored_state_continues_bit_for_bit_and_momentum_matters() {
    let model = ModelSpec::parse(PAPER, "paper").unwrap();
    let inputs = micro_inputs(10, 16, model.stages[1].input.numel(), 13);
    let step = |stage: &mut Stage, (x, g): &(Vec<u8>, Vec<u8>)| {
        let (_, c) = stage.forward_bytes(x, None).unwrap();
        stage.backward_bytes(c, Some(g), true).unwrap();
    };
    let mut a = hidden_stage(&model);
    for i in &inputs[..5] {
        step(&mut a, i);
    }
    let saved = a.state();
    assert_eq!(saved.steps, 5);
    assert!(saved.tensors.iter().any(|t| t.name.ends_with(".velocity")));

    let mut b = Stage::new(&model.stages[1], 999, Sgd::default());
    b.load_state(&saved).unwrap();
    assert_eq!(b.steps(), 5);
    assert_eq!(b.state(), saved);
    // Parameters alone (momentum cleared) are not enough.
    let mut c = Stage::new(&model.stages[1], 999, Sgd::default());
    c.load_params(&a.params()).unwrap();
    for i in &inputs[5..] {
        step(&mut a, i);
        step(&mut b, i);
        step(&mut c, i);
    }
    assert_eq!(a.state(), b.state());
    assert_ne!(a.params(), c.params());
}

#[test]
fn a_state_for_another_stage_is_refused() {
    let model = ModelSpec::parse(PAPER, "paper").unwrap();
    let other = Stage::new(&model.stages[0], 1, Sgd::default()).state();
    let mut stage = hidden_stage(&model);
    assert!(stage.load_state(&other).is_err());
}

proptest! {
    #[test]
    fn micro_ranges_cover_the_batch_in_order(rows in 1usize..300, k in 1usize..40) {
        let r = micro_ranges(rows, k);
        prop_assert!(!r.is_empty() && r.len() <= k);
        prop_assert_eq!(r[0].start, 0);
        prop_assert_eq!(r[r.len() - 1].end, rows);
        for w in r.windows(2) {
            prop_assert_eq!(w[0].end, w[1].start);
            prop_assert!(w[0].len() >= w[1].len());
        }
        prop_assert!(r.iter().all(|x| !x.is_empty()));
    }
}
