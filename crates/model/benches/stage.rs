//! Criterion benches: forward and backward of each stage of the paper's MLP
//! (`models/paper-mlp.toml`) on a batch of 64, on tensor messages exactly
//! as a node serves them ([`Stage::forward_bytes`], [`Stage::backward_bytes`]),
//! and one whole local training step for reference.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use mixnn_model::arith::dispatch::with_path;
use mixnn_model::arith::gemm::View;
use mixnn_model::arith::{ops, KernelPath, Matrix};
use mixnn_model::spec::ModelSpec;
use mixnn_model::stage::{Sgd, Stage};
use mixnn_model::tensor_bytes::TensorBytes;
use mixnn_model::trainer::{stage_seed, Batch, LocalModel};

const PAPER_MLP: &str = include_str!("../../../models/paper-mlp.toml");
const BATCH: usize = 64;

fn model() -> ModelSpec {
    ModelSpec::parse(PAPER_MLP, "paper-mlp.toml").unwrap()
}

fn pixels() -> Vec<u8> {
    (0..BATCH * 784).map(|i| (i * 37 % 256) as u8).collect()
}

fn labels() -> Vec<u32> {
    (0..BATCH as u32).map(|i| i % 10).collect()
}

/// Each stage's input message, as the stage before it would send it.
fn inputs(model: &ModelSpec) -> Vec<Vec<u8>> {
    let mut stages: Vec<Stage> = model
        .stages
        .iter()
        .enumerate()
        .map(|(i, s)| {
            Stage::new(
                s,
                stage_seed(&mixnn_model::seed::RunSeed::from_number(1), i),
                Sgd::default(),
            )
        })
        .collect();
    let last = stages.len() - 1;
    let mut msg = TensorBytes::encode_pixels(&[BATCH, 784], &pixels());
    let mut out = Vec::new();
    for (i, stage) in stages.iter_mut().enumerate() {
        out.push(msg.clone());
        if i < last {
            msg = stage.forward_bytes(&msg, None).unwrap().0;
        }
    }
    out
}

fn stages(c: &mut Criterion) {
    let model = model();
    let inputs = inputs(&model);
    let labels = labels();
    let last = model.stages.len() - 1;
    let mut forward = c.benchmark_group("stage_forward");
    for (i, spec) in model.stages.iter().enumerate() {
        let stage = Stage::new(
            spec,
            stage_seed(&mixnn_model::seed::RunSeed::from_number(1), i),
            Sgd::default(),
        );
        let lab = (i == last).then_some(labels.as_slice());
        forward.bench_function(format!("stage{}", i + 1), |b| {
            b.iter(|| black_box(stage.forward_bytes(black_box(&inputs[i]), lab).unwrap()))
        });
    }
    forward.finish();

    // Backward (with the SGD update) of one forward's cache; the forward
    // itself is not timed.
    let mut backward = c.benchmark_group("stage_backward");
    for (i, spec) in model.stages.iter().enumerate() {
        let mut stage = Stage::new(
            spec,
            stage_seed(&mixnn_model::seed::RunSeed::from_number(1), i),
            Sgd::default(),
        );
        let lab = (i == last).then_some(labels.as_slice());
        let out = stage.forward_bytes(&inputs[i], lab).unwrap().0;
        let grad = (i < last).then(|| {
            let shape = TensorBytes::decode(&out).unwrap().shape;
            let n = shape.iter().product::<usize>();
            let values: Vec<f32> = (0..n).map(|k| (k % 7) as f32 * 1e-3).collect();
            TensorBytes::encode_f32(&shape, &values)
        });
        // The first stage computes no input gradient (nobody needs it).
        let need_input_grad = i > 0;
        backward.bench_function(format!("stage{}", i + 1), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (_, cache) = stage.forward_bytes(&inputs[i], lab).unwrap();
                    let start = Instant::now();
                    black_box(
                        stage
                            .backward_bytes(cache, grad.as_deref(), need_input_grad)
                            .unwrap(),
                    );
                    total += start.elapsed();
                }
                total
            })
        });
    }
    backward.finish();
}

fn local_step(c: &mut Criterion) {
    let model = model();
    let mut local = LocalModel::new(
        &model,
        &mixnn_model::seed::RunSeed::from_number(1),
        Sgd::default(),
    );
    let batch = Batch {
        pixels: pixels(),
        labels: labels(),
        rows: BATCH,
    };
    c.bench_function("local_train_step", |b| {
        b.iter(|| black_box(local.train_step(black_box(&batch)).unwrap()))
    });
}

/// Every kernel path this machine supports, forced: the paper's largest
/// product (stage 1 forward, 64 × 784 · 784 × 128), its weight gradient
/// (784 × 64 · 64 × 128) and one whole local training step.
fn kernel_paths(c: &mut Criterion) {
    let model = model();
    let x = Matrix::new(
        BATCH,
        784,
        (0..BATCH * 784).map(|i| (i % 255) as f32 / 255.0).collect(),
    )
    .unwrap();
    let w = Matrix::new(
        784,
        128,
        (0..784 * 128).map(|i| (i % 97) as f32 * 1e-3).collect(),
    )
    .unwrap();
    let dy = Matrix::new(
        BATCH,
        128,
        (0..BATCH * 128).map(|i| (i % 13) as f32 * 1e-2).collect(),
    )
    .unwrap();
    let batch = Batch {
        pixels: pixels(),
        labels: labels(),
        rows: BATCH,
    };
    let mut group = c.benchmark_group("kernel_path");
    for path in KernelPath::supported_paths() {
        with_path(path, || {
            group.bench_function(format!("forward_64x784x128/{path}"), |b| {
                b.iter(|| black_box(ops::matmul(View::of(&x), View::of(&w))))
            });
            group.bench_function(format!("weight_grad_784x64x128/{path}"), |b| {
                b.iter(|| black_box(ops::matmul(View::of(&x).t(), View::of(&dy))))
            });
            let mut local = LocalModel::new(
                &model,
                &mixnn_model::seed::RunSeed::from_number(1),
                Sgd::default(),
            );
            group.bench_function(format!("local_train_step/{path}"), |b| {
                b.iter(|| black_box(local.train_step(black_box(&batch)).unwrap()))
            });
        })
        .unwrap();
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = stages, local_step, kernel_paths
}
criterion_main!(benches);
