#![allow(clippy::unwrap_used)]

use super::*;
use mixnn_model::spec::{OpSpec, Shape};

fn linear(i: usize, o: usize) -> StageSpec {
    StageSpec {
        input: Shape::flat(i),
        ops: vec![OpSpec::Linear {
            input: i,
            output: o,
        }],
    }
}

#[test]
fn a_regression_recovers_a_linear_map() {
    let truth = Piece::fresh(&linear(3, 2), 7, FROZEN);
    let x = Rows {
        dim: 3,
        values: (0..600)
            .map(|i| ((i * 37 % 101) as f32) / 50.0 - 1.0)
            .collect(),
    };
    let t = Chain {
        pieces: vec![truth],
    }
    .eval_rows(0..1, &x)
    .unwrap();
    let mut c = Chain {
        pieces: vec![Piece::fresh(&linear(3, 2), 8, REGRESSION)],
    };
    let budget = Budget {
        batch: 32,
        epochs: 1,
        min_steps: 3000,
        max_steps: 3000,
    };
    assert_eq!(Fit::for_target(&t), Fit::Squared);
    c.regress(0..1, &x, &t, Fit::Squared, &budget, 1).unwrap();
    let y = c.eval_rows(0..1, &x).unwrap();
    let err = y
        .values
        .iter()
        .zip(&t.values)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(err < 0.05, "max error {err}");
}

#[test]
fn a_held_piece_leaves_training_unchanged() {
    let spec = linear(3, 3);
    let params = Piece::fresh(&spec, 3, FROZEN).params();
    let loss = StageSpec {
        input: Shape::flat(2),
        ops: vec![OpSpec::LogSoftmax, OpSpec::NllLoss],
    };
    let mut c = Chain {
        pieces: vec![
            Piece::fresh(&linear(3, 3), 1, mixnn_model::optim::Optimizer::default()),
            Piece::held(&spec, &params).unwrap(),
            Piece::fresh(&linear(3, 2), 2, mixnn_model::optim::Optimizer::default()),
            Piece::fresh(&loss, 0, FROZEN),
        ],
    };
    let before = c.pieces[0].params();
    let x = Rows {
        dim: 3,
        values: (0..300).map(|i| (i % 7) as f32 / 7.0).collect(),
    };
    let y: Vec<u32> = (0..100).map(|i| (i % 2) as u32).collect();
    let budget = Budget {
        batch: 16,
        epochs: 1,
        min_steps: 20,
        max_steps: 20,
    };
    c.train_labels(&x, &y, &budget, 5).unwrap();
    assert_eq!(c.pieces[1].params(), params);
    assert_ne!(c.pieces[0].params(), before);
    assert_eq!(c.predict(&x).unwrap().len(), 100);
}

#[test]
fn budgets_count_passes_within_bounds() {
    let b = Budget {
        batch: 64,
        epochs: 3,
        min_steps: 100,
        max_steps: 1000,
    };
    assert_eq!(b.steps(0), 0);
    assert_eq!(b.steps(64), 100);
    assert_eq!(b.steps(64 * 50), 150);
    assert_eq!(b.steps(64 * 1000), 1000);
}
