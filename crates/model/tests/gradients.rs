//! Every op's explicit backward against central finite differences.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use mixnn_model::arith::Matrix;
use mixnn_model::init::{rng, uniform};
use mixnn_model::spec::{OpSpec, StageSpec};
use mixnn_model::stage::{Sgd, Stage};

const EPS: f32 = 1e-2;

fn tensor(v: &[f32], rows: usize, cols: usize) -> Matrix {
    Matrix::new(rows, cols, v.to_vec()).unwrap()
}

fn values(t: Matrix) -> Vec<f32> {
    t.into_vec()
}

fn random(n: usize, seed: u64, away_from_zero: bool) -> Vec<f32> {
    let mut r = rng(seed);
    (0..n)
        .map(|_| {
            let v = uniform(&mut r, 1.0);
            if away_from_zero && v.abs() < 0.1 {
                v + 0.2f32.copysign(v)
            } else {
                v
            }
        })
        .collect()
}

/// L(x) = Σ R ⊙ stage(x), in f64.
fn objective(stage: &Stage, x: &[f32], r: &[f32], rows: usize, cols: usize) -> f64 {
    let y = values(stage.forward_eval(tensor(x, rows, cols)).unwrap());
    y.iter()
        .zip(r)
        .map(|(a, b)| f64::from(*a) * f64::from(*b))
        .sum()
}

fn assert_close(what: &str, analytic: &[f32], numeric: &[f64]) {
    assert_eq!(analytic.len(), numeric.len());
    for (i, (a, n)) in analytic.iter().zip(numeric).enumerate() {
        let a = f64::from(*a);
        let tol = 2e-3 + 1e-2 * a.abs().max(n.abs());
        assert!(
            (a - n).abs() <= tol,
            "{what}[{i}]: analytic {a} vs numeric {n}"
        );
    }
}

fn check_input_grad(ops: Vec<OpSpec>, rows: usize, cols: usize, out_cols: usize) {
    let spec = StageSpec { input: cols, ops };
    let mut stage = Stage::new(
        &spec,
        3,
        Sgd {
            lr: 0.0,
            momentum: 0.0,
        },
    );
    let x = random(rows * cols, 11, true);
    let r = random(rows * out_cols, 12, false);
    let (_, cache) = stage.forward_train(tensor(&x, rows, cols), None).unwrap();
    let dx = stage
        .backward(cache, Some(tensor(&r, rows, out_cols)), true)
        .unwrap()
        .unwrap();
    let analytic = values(dx);
    let numeric: Vec<f64> = (0..x.len())
        .map(|i| {
            let mut plus = x.clone();
            plus[i] += EPS;
            let mut minus = x.clone();
            minus[i] -= EPS;
            (objective(&stage, &plus, &r, rows, cols) - objective(&stage, &minus, &r, rows, cols))
                / (2.0 * f64::from(EPS))
        })
        .collect();
    assert_close("dX", &analytic, &numeric);
}

#[test]
fn relu_input_gradient_matches_finite_differences() {
    check_input_grad(vec![OpSpec::Relu], 4, 6, 6);
}

#[test]
fn log_softmax_input_gradient_matches_finite_differences() {
    check_input_grad(vec![OpSpec::LogSoftmax], 3, 5, 5);
}

#[test]
fn normalize_input_gradient_matches_finite_differences() {
    check_input_grad(
        vec![OpSpec::Normalize {
            mean: 0.3,
            std: 0.7,
        }],
        3,
        4,
        4,
    );
}

#[test]
fn identity_input_gradient_is_the_output_gradient() {
    check_input_grad(vec![OpSpec::Identity], 2, 3, 3);
}

#[test]
fn linear_input_gradient_matches_finite_differences() {
    check_input_grad(
        vec![OpSpec::Linear {
            input: 5,
            output: 3,
        }],
        4,
        5,
        3,
    );
}

#[test]
fn linear_parameter_gradients_match_finite_differences() {
    let (rows, cols, out) = (4, 5, 3);
    let spec = StageSpec {
        input: cols,
        ops: vec![OpSpec::Linear {
            input: cols,
            output: out,
        }],
    };
    let x = random(rows * cols, 21, false);
    let r = random(rows * out, 22, false);
    // With lr = 1 and no momentum, one step moves each parameter by −grad.
    let mut stage = Stage::new(
        &spec,
        5,
        Sgd {
            lr: 1.0,
            momentum: 0.0,
        },
    );
    let before = stage.params();
    let (_, cache) = stage.forward_train(tensor(&x, rows, cols), None).unwrap();
    stage
        .backward(cache, Some(tensor(&r, rows, out)), false)
        .unwrap();
    let after = stage.params();
    for (pi, (b, a)) in before.iter().zip(&after).enumerate() {
        let analytic: Vec<f32> = b.values.iter().zip(&a.values).map(|(b, a)| b - a).collect();
        let numeric: Vec<f64> = (0..b.values.len())
            .map(|i| {
                let eval = |delta: f32| {
                    let mut probe = Stage::new(&spec, 5, Sgd::default());
                    let mut params = before.clone();
                    params[pi].values[i] += delta;
                    probe.load_params(&params).unwrap();
                    objective(&probe, &x, &r, rows, cols)
                };
                (eval(EPS) - eval(-EPS)) / (2.0 * f64::from(EPS))
            })
            .collect();
        assert_close(&b.name, &analytic, &numeric);
    }
}

#[test]
fn nll_loss_gradient_matches_finite_differences() {
    let (rows, classes) = (4, 5);
    let spec = StageSpec {
        input: classes,
        ops: vec![OpSpec::LogSoftmax, OpSpec::NllLoss],
    };
    let labels = [0u32, 4, 2, 2];
    let mut stage = Stage::new(&spec, 1, Sgd::default());
    let x = random(rows * classes, 31, false);
    let loss = |x: &[f32]| -> f64 {
        let (l, _) = stage_forward(
            &Stage::new(&spec, 1, Sgd::default()),
            x,
            &labels,
            rows,
            classes,
        );
        f64::from(l)
    };
    let (_, cache) = stage
        .forward_train(tensor(&x, rows, classes), Some(&labels))
        .unwrap();
    let analytic = values(stage.backward(cache, None, true).unwrap().unwrap());
    let numeric: Vec<f64> = (0..x.len())
        .map(|i| {
            let mut plus = x.clone();
            plus[i] += EPS;
            let mut minus = x.clone();
            minus[i] -= EPS;
            (loss(&plus) - loss(&minus)) / (2.0 * f64::from(EPS))
        })
        .collect();
    assert_close("d loss / dX", &analytic, &numeric);
}

fn stage_forward(stage: &Stage, x: &[f32], labels: &[u32], rows: usize, cols: usize) -> (f32, ()) {
    let (y, _) = stage
        .forward_train(tensor(x, rows, cols), Some(labels))
        .unwrap();
    (y.first().unwrap(), ())
}

#[test]
fn nll_loss_is_mean_negative_log_likelihood() {
    let spec = StageSpec {
        input: 3,
        ops: vec![OpSpec::NllLoss],
    };
    let stage = Stage::new(&spec, 1, Sgd::default());
    let x = [-1.0f32, -2.0, -3.0, -0.5, -0.25, -4.0];
    let (l, _) = stage_forward(&stage, &x, &[2, 1], 2, 3);
    assert!((l - (3.0 + 0.25) / 2.0).abs() < 1e-6, "{l}");
}
