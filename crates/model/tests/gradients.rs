#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]
//! Every op's backward against central finite differences of its forward:
//! for a stage of one op (or a few), `L = Σ y ⊙ r` with a fixed random `r`
//! (the loss itself for a loss stage), the analytic input gradient and
//! parameter gradients must match `(L(v + h) − L(v − h)) / 2h` for every
//! input value and a sample of every parameter's values. Inputs are spread
//! so that no finite difference crosses a kink (relu at 0, a tie in a max).

use mixnn_model::arith::Matrix;
use mixnn_model::spec::{OpSpec, Shape, StageSpec};
use mixnn_model::stage::{Micro, NamedParam, Stage};

const H: f32 = 1e-3;

/// Distinct values in about [−1, 1], at least 2/n apart, shuffled, none
/// within 0.5/n of zero.
fn spread(n: usize, seed: u64) -> Vec<f32> {
    let mut idx: Vec<usize> = (0..n).collect();
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    for i in (1..n).rev() {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        idx.swap(i, (s >> 33) as usize % (i + 1));
    }
    idx.into_iter()
        .map(|k| ((k as f32 + 0.5) / n as f32) * 2.0 - 1.0)
        .collect()
}

fn weights_like(n: usize, seed: u64) -> Vec<f32> {
    spread(n, seed).into_iter().map(|v| v * 0.5).collect()
}

struct Case {
    name: &'static str,
    input: Shape,
    ops: Vec<OpSpec>,
    batch: usize,
    labels: Option<Vec<u32>>,
}

fn loss(stage: &Stage, x: &[f32], batch: usize, labels: Option<&[u32]>, r: &[f32]) -> f64 {
    let xm = Matrix::new(batch, x.len() / batch, x.to_vec()).unwrap();
    let (y, _) = stage
        .forward_step(
            xm,
            labels,
            Micro {
                index: 0,
                batch_rows: batch,
            },
        )
        .unwrap();
    if labels.is_some() {
        return f64::from(y.as_slice()[0]);
    }
    y.as_slice()
        .iter()
        .zip(r)
        .map(|(a, b)| f64::from(*a) * f64::from(*b))
        .sum()
}

fn with_param(stage: &Stage, spec: &StageSpec, name: &str, i: usize, delta: f32) -> Stage {
    let mut params: Vec<NamedParam> = stage.params();
    let p = params.iter_mut().find(|p| p.name == name).unwrap();
    p.values[i] += delta;
    let mut s = Stage::new(spec, 11, mixnn_model::stage::Sgd::default());
    s.load_params(&params).unwrap();
    s
}

fn close(num: f64, ana: f32, what: &str) {
    let ana = f64::from(ana);
    let tol = 2e-3 + 2e-2 * ana.abs().max(num.abs());
    assert!(
        (num - ana).abs() <= tol,
        "{what}: finite difference {num:.6} vs backward {ana:.6}"
    );
}

fn check(case: &Case) {
    let spec = StageSpec {
        input: case.input.clone(),
        ops: case.ops.clone(),
    };
    let last = case.labels.is_some();
    spec.check(1, last).unwrap();
    // Start from non-trivial parameters (batch norm's γ = 1, β = 0 would
    // hide half its gradient formula).
    let base = Stage::new(&spec, 11, mixnn_model::stage::Sgd::default());
    let mut params = base.params();
    for (k, p) in params.iter_mut().enumerate() {
        if !p.name.ends_with("running_mean") && !p.name.ends_with("running_var") {
            p.values = weights_like(p.values.len(), 100 + k as u64);
            if p.name.ends_with("weight") && p.shape.len() == 1 {
                for v in &mut p.values {
                    *v += 1.0;
                }
            }
        }
    }
    let mut stage = Stage::new(&spec, 11, mixnn_model::stage::Sgd::default());
    stage.load_params(&params).unwrap();
    let n = case.input.numel() * case.batch;
    let x = spread(n, 7);
    let out = spec.output().numel() * case.batch;
    let r = weights_like(out, 9);
    let labels = case.labels.as_deref();
    let xm = Matrix::new(case.batch, case.input.numel(), x.clone()).unwrap();
    let (_, cache) = stage
        .forward_step(
            xm,
            labels,
            Micro {
                index: 0,
                batch_rows: case.batch,
            },
        )
        .unwrap();
    let g = (!last).then(|| Matrix::new(case.batch, spec.output().numel(), r.clone()).unwrap());
    let dx = stage.backward_micro(cache, g, true, 0).unwrap().unwrap();
    for i in 0..n {
        let mut up = x.clone();
        up[i] += H;
        let mut down = x.clone();
        down[i] -= H;
        let num = (loss(&stage, &up, case.batch, labels, &r)
            - loss(&stage, &down, case.batch, labels, &r))
            / (2.0 * f64::from(H));
        close(num, dx.as_slice()[i], &format!("{}: dX[{i}]", case.name));
    }
    let grads = stage.pending_gradients();
    let trainable: Vec<&NamedParam> = params
        .iter()
        .filter(|p| !p.name.contains("running"))
        .collect();
    assert_eq!(
        grads.len(),
        trainable.len(),
        "{}: a gradient per parameter",
        case.name
    );
    for g in &grads {
        let len = g.values.len();
        let step = (len / 12).max(1);
        for i in (0..len).step_by(step) {
            let up = with_param(&stage, &spec, &g.name, i, H);
            let down = with_param(&stage, &spec, &g.name, i, -H);
            let num = (loss(&up, &x, case.batch, labels, &r)
                - loss(&down, &x, case.batch, labels, &r))
                / (2.0 * f64::from(H));
            close(
                num,
                g.values[i],
                &format!("{}: d{}[{i}]", case.name, g.name),
            );
        }
    }
}

fn conv(i: usize, o: usize, k: usize, s: usize, p: usize, bias: bool) -> OpSpec {
    OpSpec::Conv2d {
        in_channels: i,
        out_channels: o,
        kernel: k,
        stride: s,
        padding: p,
        bias,
    }
}

#[test]
fn conv2d_gradients_match_finite_differences() {
    for (name, op, input) in [
        (
            "conv 3x3 pad 1",
            conv(2, 3, 3, 1, 1, true),
            Shape::image(2, 5, 5),
        ),
        (
            "conv 3x3 stride 2",
            conv(2, 2, 3, 2, 1, false),
            Shape::image(2, 6, 5),
        ),
        (
            "conv 2x2 stride 2 no pad",
            conv(1, 2, 2, 2, 0, true),
            Shape::image(1, 4, 6),
        ),
        ("conv 1x1", conv(3, 2, 1, 1, 0, true), Shape::image(3, 3, 3)),
    ] {
        check(&Case {
            name,
            input,
            ops: vec![op],
            batch: 2,
            labels: None,
        });
    }
}

#[test]
fn pooling_gradients_match_finite_differences() {
    for (name, op) in [
        (
            "max pool 2",
            OpSpec::MaxPool2d {
                kernel: 2,
                stride: Some(2),
                padding: 0,
            },
        ),
        (
            "max pool 3 stride 1 pad 1",
            OpSpec::MaxPool2d {
                kernel: 3,
                stride: Some(1),
                padding: 1,
            },
        ),
        (
            "avg pool 2",
            OpSpec::AvgPool2d {
                kernel: 2,
                stride: Some(2),
                padding: 0,
            },
        ),
        (
            "avg pool 3 stride 2 pad 1",
            OpSpec::AvgPool2d {
                kernel: 3,
                stride: Some(2),
                padding: 1,
            },
        ),
        ("global average", OpSpec::GlobalAvgPool),
    ] {
        check(&Case {
            name,
            input: Shape::image(2, 4, 4),
            ops: vec![op],
            batch: 2,
            labels: None,
        });
    }
}

#[test]
fn batch_norm_gradients_match_finite_differences() {
    check(&Case {
        name: "batch norm",
        input: Shape::image(3, 3, 2),
        ops: vec![OpSpec::BatchNorm2d {
            channels: 3,
            eps: 1e-5,
            momentum: 0.1,
        }],
        batch: 3,
        labels: None,
    });
}

#[test]
fn dropout_flatten_and_residual_gradients_match_finite_differences() {
    check(&Case {
        name: "dropout",
        input: Shape::image(2, 3, 3),
        ops: vec![OpSpec::Dropout { p: 0.4 }, OpSpec::Flatten],
        batch: 2,
        labels: None,
    });
    check(&Case {
        name: "residual block (conv, relu, conv + identity)",
        input: Shape::image(2, 4, 4),
        ops: vec![
            OpSpec::Residual {
                ops: vec![
                    conv(2, 2, 3, 1, 1, true),
                    OpSpec::Relu,
                    conv(2, 2, 3, 1, 1, false),
                ],
                shortcut: vec![],
            },
            OpSpec::Relu,
        ],
        batch: 2,
        labels: None,
    });
    check(&Case {
        name: "residual block with a projection shortcut",
        input: Shape::image(2, 4, 4),
        ops: vec![OpSpec::Residual {
            ops: vec![
                conv(2, 3, 3, 2, 1, false),
                OpSpec::BatchNorm2d {
                    channels: 3,
                    eps: 1e-5,
                    momentum: 0.1,
                },
            ],
            shortcut: vec![conv(2, 3, 1, 2, 0, false)],
        }],
        batch: 2,
        labels: None,
    });
}

#[test]
fn a_small_cnn_to_the_loss_matches_finite_differences() {
    check(&Case {
        name: "cnn with loss",
        input: Shape::image(1, 4, 4),
        ops: vec![
            conv(1, 2, 3, 1, 1, true),
            OpSpec::Relu,
            OpSpec::MaxPool2d {
                kernel: 2,
                stride: Some(2),
                padding: 0,
            },
            OpSpec::Flatten,
            OpSpec::Linear {
                input: 8,
                output: 3,
            },
            OpSpec::LogSoftmax,
            OpSpec::NllLoss,
        ],
        batch: 3,
        labels: Some(vec![0, 2, 1]),
    });
}

#[test]
fn mlp_ops_gradients_match_finite_differences() {
    check(&Case {
        name: "normalize, linear, relu, identity",
        input: Shape::flat(6),
        ops: vec![
            OpSpec::Normalize {
                mean: 0.1,
                std: 0.7,
            },
            OpSpec::Linear {
                input: 6,
                output: 5,
            },
            OpSpec::Relu,
            OpSpec::Identity,
            OpSpec::Linear {
                input: 5,
                output: 4,
            },
        ],
        batch: 3,
        labels: None,
    });
    check(&Case {
        name: "log_softmax",
        input: Shape::flat(5),
        ops: vec![OpSpec::LogSoftmax],
        batch: 3,
        labels: None,
    });
    check(&Case {
        name: "linear, log_softmax, nll_loss",
        input: Shape::flat(4),
        ops: vec![
            OpSpec::Linear {
                input: 4,
                output: 3,
            },
            OpSpec::LogSoftmax,
            OpSpec::NllLoss,
        ],
        batch: 4,
        labels: Some(vec![2, 0, 1, 2]),
    });
}
