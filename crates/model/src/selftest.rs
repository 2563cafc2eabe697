//! The arithmetic self-test: fixed inputs through every op, forward and
//! backward, micro-batches and two SGD steps with momentum, plus `exp`,
//! `ln` and products over edge cases (subnormals, signed zeros, overflow,
//! tile edges), hashed and compared with [`EXPECTED_SHA256`], the digest
//! of the specification (`docs/arithmetic.md`, computed by the scalar
//! path). A node runs it at start and refuses to serve if it differs: a
//! miscompiled build, flush-to-zero set by a library, an unusual CPU.

use std::hint::black_box;

use sha2::{Digest, Sha256};

use crate::arith::dispatch::{self, KernelPath};
use crate::arith::gemm::View;
use crate::arith::{math, ops, Matrix, ARITH_VERSION};
use crate::error::{ModelError, Result};
use crate::init::{rng, uniform};
use crate::spec::{OpSpec, StageSpec};
use crate::stage::{Sgd, Stage};

/// SHA-256 of the self-test's outputs under arithmetic version 2.
pub const EXPECTED_SHA256: &str =
    "db8e09a8c2f920f4b8e4309559cc4f249f93e9dc8bff08e984b8c32590ac3775";

/// What one run of the self-test found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelfTest {
    /// The kernel path it ran on.
    pub path: KernelPath,
    /// SHA-256 (hex) of its outputs.
    pub digest: String,
}

impl SelfTest {
    /// Whether the outputs are those of the specification.
    pub fn passed(&self) -> bool {
        self.digest == EXPECTED_SHA256
    }
}

/// Runs the self-test on the thread's active path.
pub fn run() -> Result<SelfTest> {
    let mut h = Hasher(Sha256::new());
    h.u32(ARITH_VERSION);
    environment(&mut h);
    functions(&mut h);
    products(&mut h)?;
    training(&mut h)?;
    convolutions(&mut h)?;
    Ok(SelfTest {
        path: dispatch::active(),
        digest: hex::encode(h.0.finalize()),
    })
}

/// Runs the self-test on `path`.
pub fn run_on(path: KernelPath) -> Result<SelfTest> {
    dispatch::with_path(path, run)?
}

/// Runs the self-test on the active path and fails, naming the path and
/// both digests, unless it passes.
pub fn check() -> Result<SelfTest> {
    let t = run()?;
    if !t.passed() {
        return Err(ModelError::Kernels(format!(
            "arithmetic self-test failed on the {} path: outputs hash to {}, \
             arith {ARITH_VERSION} gives {EXPECTED_SHA256} (miscompiled build, \
             flush-to-zero or another rounding mode set in this process, or an \
             unusual CPU)",
            t.path, t.digest
        )));
    }
    Ok(t)
}

struct Hasher(Sha256);

impl Hasher {
    fn u32(&mut self, v: u32) {
        self.0.update(v.to_le_bytes());
    }

    fn f32s(&mut self, values: &[f32]) {
        for v in values {
            self.u32(ops::canonical(*v).to_bits());
        }
    }
}

fn inputs(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut r = rng(seed);
    (0..n).map(|_| uniform(&mut r, scale)).collect()
}

/// Subnormals must be kept (no denormals-are-zero) and produced (no
/// flush-to-zero), and rounding must be to nearest even.
fn environment(h: &mut Hasher) {
    let tiny = black_box(f32::MIN_POSITIVE);
    let sub = black_box(1.0e-40f32);
    h.f32s(&[
        tiny * black_box(0.5),
        sub * black_box(1.0),
        sub + sub,
        black_box(1.0f32) + black_box(f32::EPSILON / 2.0),
        black_box(1.0f32) + black_box(f32::EPSILON * 0.75),
        black_box(-0.0f32) + black_box(0.0),
        black_box(1.0f32) / black_box(3.0),
    ]);
}

fn functions(h: &mut Hasher) {
    let mut xs = vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        88.72,
        88.73,
        -87.3,
        -100.0,
        -103.9,
        -104.0,
        1.0e-40,
        f32::MIN_POSITIVE,
        f32::MAX,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        0.5,
        std::f32::consts::SQRT_2,
        std::f32::consts::FRAC_1_SQRT_2,
    ];
    xs.extend(inputs(256, 1, 30.0));
    let e: Vec<f32> = xs.iter().map(|x| math::exp(*x)).collect();
    let l: Vec<f32> = xs.iter().map(|x| math::ln(x.abs())).collect();
    h.f32s(&e);
    h.f32s(&l);
}

fn products(h: &mut Hasher) -> Result<()> {
    // Shapes that leave partial tiles on every path, values that span
    // subnormal to large magnitudes.
    for (m, k, n) in [(13, 37, 19), (64, 70, 33), (1, 5, 1)] {
        let mut a = inputs(m * k, 2, 4.0);
        a[0] = 1.0e-39;
        a[1] = -0.0;
        let b = inputs(k * n, 3, 1.0e3);
        let a = Matrix::new(m, k, a)?;
        let b = Matrix::new(k, n, b)?;
        h.f32s(ops::matmul(View::of(&a), View::of(&b)).as_slice());
        h.f32s(ops::matmul(View::of(&a).t().t(), View::of(&b)).as_slice());
        let bt = Matrix::new(n, k, inputs(n * k, 4, 1.0))?;
        h.f32s(ops::matmul(View::of(&a), View::of(&bt).t()).as_slice());
    }
    Ok(())
}

/// Two steps of a stage with every op, in two micro-batches each.
fn training(h: &mut Hasher) -> Result<()> {
    let spec = StageSpec {
        input: crate::spec::Shape::flat(37),
        ops: vec![
            OpSpec::Normalize {
                mean: 0.1,
                std: 0.7,
            },
            OpSpec::Linear {
                input: 37,
                output: 19,
            },
            OpSpec::Relu,
            OpSpec::Identity,
            OpSpec::Linear {
                input: 19,
                output: 11,
            },
            OpSpec::LogSoftmax,
            OpSpec::NllLoss,
        ],
    };
    let mut stage = Stage::new(
        &spec,
        7,
        Sgd {
            lr: 0.05,
            momentum: 0.9,
        },
    );
    let rows = 13;
    let labels: Vec<u32> = (0..rows as u32).map(|i| (i * 7) % 11).collect();
    for step in 0..2u64 {
        let x = inputs(rows * 37, 10 + step, 3.0);
        for (micro, range) in [(0u32, 0..7), (1, 7..rows)] {
            let part = Matrix::new(
                range.len(),
                37,
                x[range.start * 37..range.end * 37].to_vec(),
            )?;
            let (loss, cache) = stage.forward_micro(part, Some(&labels[range]), rows)?;
            h.f32s(loss.as_slice());
            let dx = stage.backward_micro(cache, None, true, micro)?;
            if let Some(dx) = dx {
                h.f32s(dx.as_slice());
            }
        }
        stage.apply();
        for p in stage.state().tensors {
            h.f32s(&p.values);
        }
    }
    let eval = stage.forward_eval(Matrix::new(rows, 37, inputs(rows * 37, 20, 3.0))?)?;
    h.f32s(eval.as_slice());
    Ok(())
}

/// Two steps of a convolutional stage with every image op (strided and
/// padded convolutions, batch norm, both poolings with padding, a
/// residual block with a projection, dropout, flatten, global pooling) to
/// the loss, in two micro-batches each, with AdamW; then its evaluation.
fn convolutions(h: &mut Hasher) -> Result<()> {
    use crate::optim::Optimizer;
    use crate::spec::{ModelSpec, Shape};
    use crate::stage::Micro;
    let text = r#"
input = [2, 7, 6]
[optimizer]
kind = "adamw"
lr = 0.01
weight_decay = 0.1

[[stage]]
ops = [{ op = "conv2d", in = 2, out = 5, kernel = 3, padding = 1 }, { op = "batch_norm2d", channels = 5 }, { op = "relu" }, { op = "max_pool2d", kernel = 3, stride = 2, padding = 1 }, { op = "residual", ops = [{ op = "conv2d", in = 5, out = 6, kernel = 3, stride = 2, padding = 1, bias = false }, { op = "relu" }], shortcut = [{ op = "conv2d", in = 5, out = 6, kernel = 1, stride = 2 }] }, { op = "avg_pool2d", kernel = 2, stride = 1, padding = 1 }, { op = "dropout", p = 0.3 }, { op = "global_avg_pool" }, { op = "flatten" }, { op = "linear", in = 6, out = 4 }, { op = "log_softmax" }, { op = "nll_loss" }]
"#;
    let model = ModelSpec::parse(text, "self-test")?;
    let opt: Optimizer = model.optimizer_or(Sgd::default());
    let spec = &model.stages[0];
    let mut stage = Stage::new(spec, 9, opt);
    let rows = 6;
    let n = spec.input.numel();
    let labels: Vec<u32> = (0..rows as u32).map(|i| (i * 3) % 4).collect();
    for step in 0..2u64 {
        let mut x = inputs(rows * n, 30 + step, 2.0);
        x[3] = 1.0e-39;
        x[5] = -0.0;
        for (micro, range) in [(0u32, 0..4), (1, 4..rows)] {
            let part = Matrix::new(range.len(), n, x[range.start * n..range.end * n].to_vec())?;
            let place = Micro {
                index: micro,
                batch_rows: rows,
            };
            let (loss, cache) = stage.forward_step(part, Some(&labels[range]), place)?;
            h.f32s(loss.as_slice());
            if let Some(dx) = stage.backward_micro(cache, None, true, micro)? {
                h.f32s(dx.as_slice());
            }
        }
        stage.apply();
        for p in stage.state().tensors {
            h.f32s(&p.values);
        }
    }
    debug_assert_eq!(spec.input, Shape::image(2, 7, 6));
    let eval = stage.forward_eval(Matrix::new(rows, n, inputs(rows * n, 40, 2.0))?)?;
    h.f32s(eval.as_slice());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_supported_path_gives_the_specified_digest() {
        for path in KernelPath::supported_paths() {
            let t = run_on(path).unwrap();
            assert_eq!(t.path, path);
            assert_eq!(t.digest, EXPECTED_SHA256, "path {path}");
            assert!(t.passed());
        }
    }

    #[test]
    fn the_digest_changes_when_one_output_bit_does() {
        let mut a = Hasher(Sha256::new());
        a.f32s(&[1.0, 2.0]);
        let mut b = Hasher(Sha256::new());
        b.f32s(&[1.0, f32::from_bits(2.0f32.to_bits() ^ 1)]);
        assert_ne!(a.0.finalize(), b.0.finalize());
    }
}
