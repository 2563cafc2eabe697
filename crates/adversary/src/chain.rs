//! The surrogate: a chain of stages the colluders assemble, some held
//! (the designer's own stages with their final weights, frozen), some
//! stand-ins they train, on the model crate's stage engine.
//!
//! Training runs forward through every piece and backward down to the
//! first piece that trains; frozen pieces between trainable ones pass the
//! gradient through and are updated with a learning rate of 0 (SGD, no
//! momentum: `p − 0·g = p`), then get their weights back at the end, so a
//! held stage leaves the chain exactly as it came in. Pieces in front of
//! the first trainable one run once over the whole data set
//! ([`Stage::forward_eval`]) and their outputs are reused.

use std::ops::Range;

use mixnn_model::arith::Matrix;
use mixnn_model::init::{derive_seed, rng};
use mixnn_model::optim::Optimizer;
use mixnn_model::spec::{ModelSpec, StageSpec};
use mixnn_model::stage::{Micro, NamedParam, Stage, StageCache};
use mixnn_model::trainer::argmax_rows;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// The optimiser of a frozen piece: its update changes nothing.
pub const FROZEN: Optimizer = Optimizer::Sgd {
    lr: 0.0,
    momentum: 0.0,
    dampening: 0.0,
    weight_decay: 0.0,
    nesterov: false,
};

/// The optimiser of regressions (mean squared error on activations).
pub const REGRESSION: Optimizer = Optimizer::Adam {
    lr: 1e-3,
    beta1: 0.9,
    beta2: 0.999,
    eps: 1e-8,
    weight_decay: 0.0,
};

/// Samples as rows of `dim` values.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rows {
    /// Values per sample.
    pub dim: usize,
    /// `len × dim` values, row-major.
    pub values: Vec<f32>,
}

impl Rows {
    /// No rows of `dim` values.
    pub fn empty(dim: usize) -> Rows {
        Rows {
            dim,
            values: Vec::new(),
        }
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.values.len().checked_div(self.dim).unwrap_or(0)
    }

    /// No samples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends the rows of `other` (of the same width).
    pub fn extend(&mut self, other: &Rows) {
        if self.values.is_empty() {
            self.dim = other.dim;
        }
        self.values.extend_from_slice(&other.values);
    }

    /// The samples at `idx`, as a matrix.
    pub fn gather(&self, idx: &[usize]) -> Result<Matrix> {
        let mut v = Vec::with_capacity(idx.len() * self.dim);
        for &i in idx {
            v.extend_from_slice(&self.values[i * self.dim..(i + 1) * self.dim]);
        }
        Ok(Matrix::new(idx.len(), self.dim, v)?)
    }

    /// Samples `range`, as a matrix.
    pub fn slice(&self, range: Range<usize>) -> Result<Matrix> {
        Ok(Matrix::new(
            range.len(),
            self.dim,
            self.values[range.start * self.dim..range.end * self.dim].to_vec(),
        )?)
    }
}

/// What a regression minimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fit {
    /// Mean squared error on the values.
    Squared,
    /// Outputs and targets are log-probabilities: cross-entropy with the
    /// target's probabilities as soft labels (distillation; the argmax
    /// is what matters, and squared error on log-probabilities spends
    /// itself on the unlikely classes).
    SoftLabels,
}

impl Fit {
    /// The gradient of the loss with respect to output `y` (target `t`).
    fn gradient(self, y: &Matrix, t: &Matrix) -> Result<Matrix> {
        let n = (y.rows() * y.cols()).max(1) as f32;
        let g: Vec<f32> = match self {
            Fit::Squared => y
                .as_slice()
                .iter()
                .zip(t.as_slice())
                .map(|(a, b)| 2.0 * (a - b) / n)
                .collect(),
            Fit::SoftLabels => {
                let rows = y.rows().max(1) as f32;
                t.as_slice().iter().map(|b| -b.exp() / rows).collect()
            }
        };
        Ok(Matrix::new(y.rows(), y.cols(), g)?)
    }

    /// [`Fit::SoftLabels`] when every row of `t` is a log-probability
    /// distribution (its probabilities add up to 1), else
    /// [`Fit::Squared`].
    pub fn for_target(t: &Rows) -> Fit {
        let soft = t.dim >= 2
            && !t.is_empty()
            && t.values.chunks_exact(t.dim).all(|row| {
                let total: f32 = row.iter().map(|v| v.exp()).sum();
                row.iter().all(|v| *v <= 1e-6) && (total - 1.0).abs() < 1e-3
            });
        if soft {
            Fit::SoftLabels
        } else {
            Fit::Squared
        }
    }
}

/// How long one training phase runs: `epochs` passes over the data, at
/// least `min_steps` and at most `max_steps` batches.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    /// Samples per batch.
    pub batch: usize,
    /// Passes over the data.
    pub epochs: usize,
    /// Fewest batches (small data sets are passed over more often).
    pub min_steps: usize,
    /// Most batches.
    pub max_steps: usize,
}

impl Budget {
    /// Batches for `n` samples.
    pub fn steps(&self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        (self.epochs * n.div_ceil(self.batch.max(1)))
            .max(self.min_steps)
            .min(self.max_steps)
    }
}

/// One stage of a surrogate.
pub struct Piece {
    stage: Stage,
    seed: u64,
    frozen: bool,
    /// The weights a frozen piece gets back after training.
    weights: Option<Vec<NamedParam>>,
}

impl Piece {
    /// A stage the colluders hold: the designer's stage `spec` with its
    /// final weights, frozen.
    pub fn held(spec: &StageSpec, params: &[NamedParam]) -> Result<Piece> {
        let mut stage = Stage::new(spec, 0, FROZEN);
        stage.load_params(params)?;
        Ok(Piece {
            weights: Some(stage.params()),
            stage,
            seed: 0,
            frozen: true,
        })
    }

    /// A stand-in, freshly initialised from `seed`, trained with `opt`.
    pub fn fresh(spec: &StageSpec, seed: u64, opt: Optimizer) -> Piece {
        Piece {
            stage: Stage::new(spec, seed, opt),
            seed,
            frozen: false,
            weights: None,
        }
    }

    /// Its description.
    pub fn spec(&self) -> &StageSpec {
        self.stage.spec()
    }

    /// Whether training changes it.
    pub fn trains(&self) -> bool {
        !self.frozen && self.stage.spec().has_params()
    }

    /// Its weights now.
    pub fn params(&self) -> Vec<NamedParam> {
        self.stage.params()
    }

    /// Keeps its weights as they are from now on.
    pub fn freeze(&mut self) -> Result<()> {
        if self.frozen {
            return Ok(());
        }
        let weights = self.stage.params();
        let mut stage = Stage::new(self.stage.spec(), self.seed, FROZEN);
        stage.load_params(&weights)?;
        self.stage = stage;
        self.weights = Some(weights);
        self.frozen = true;
        Ok(())
    }

    /// Trains it from now on with `opt`, from its current weights.
    pub fn thaw(&mut self, opt: Optimizer) -> Result<()> {
        let weights = self.stage.params();
        let mut stage = Stage::new(self.stage.spec(), self.seed, opt);
        stage.load_params(&weights)?;
        self.stage = stage;
        self.weights = None;
        self.frozen = false;
        Ok(())
    }
}

/// A surrogate: pieces in forward order; a complete one ends with the
/// loss stage.
#[derive(Default)]
pub struct Chain {
    /// The pieces.
    pub pieces: Vec<Piece>,
}

/// Rows per batch of evaluation passes.
const EVAL_BATCH: usize = 256;

impl Chain {
    /// The designer's model itself: every stage of `model` with its
    /// weights `params` (one list per stage), frozen.
    pub fn of_model(model: &ModelSpec, params: &[Vec<NamedParam>]) -> Result<Chain> {
        let pieces = model
            .stages
            .iter()
            .zip(params)
            .map(|(s, p)| Piece::held(s, p))
            .collect::<Result<Vec<_>>>()?;
        Ok(Chain { pieces })
    }

    /// The chain's output for `x` through pieces `range` (inference).
    pub fn eval(&self, range: Range<usize>, x: Matrix) -> Result<Matrix> {
        let mut h = x;
        for p in &self.pieces[range] {
            h = p.stage.forward_eval(h)?;
        }
        Ok(h)
    }

    /// [`Chain::eval`] over every row of `x`, in batches.
    pub fn eval_rows(&self, range: Range<usize>, x: &Rows) -> Result<Rows> {
        if range.is_empty() {
            return Ok(x.clone());
        }
        let mut out = Rows::default();
        for start in (0..x.len()).step_by(EVAL_BATCH) {
            let end = (start + EVAL_BATCH).min(x.len());
            let y = self.eval(range.clone(), x.slice(start..end)?)?;
            out.dim = y.cols();
            out.values.extend_from_slice(y.as_slice());
        }
        Ok(out)
    }

    /// Predicted class of every row (argmax of what the last piece
    /// passes through in inference: log-probabilities).
    pub fn predict(&self, x: &Rows) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(x.len());
        for start in (0..x.len()).step_by(EVAL_BATCH) {
            let end = (start + EVAL_BATCH).min(x.len());
            let y = self.eval(0..self.pieces.len(), x.slice(start..end)?)?;
            out.extend(argmax_rows(&y)?);
        }
        Ok(out)
    }

    fn first_trainable(&self, range: Range<usize>) -> Option<usize> {
        range.into_iter().find(|&i| self.pieces[i].trains())
    }

    /// Forward (training) through `range`, labels to the loss stage.
    fn forward(
        &self,
        range: Range<usize>,
        x: Matrix,
        labels: Option<&[u32]>,
    ) -> Result<(Matrix, Vec<StageCache>)> {
        let rows = x.rows();
        let mut h = x;
        let mut caches = Vec::with_capacity(range.len());
        for p in &self.pieces[range] {
            let l = labels.filter(|_| p.spec().is_loss());
            let (y, c) = p.stage.forward_step(
                h,
                l,
                Micro {
                    index: 0,
                    batch_rows: rows,
                },
            )?;
            caches.push(c);
            h = y;
        }
        Ok((h, caches))
    }

    /// Backward through `range` (its caches), gradient `grad` at its
    /// end, then one update of each of its pieces.
    fn backward(
        &mut self,
        range: Range<usize>,
        caches: Vec<StageCache>,
        grad: Option<Matrix>,
    ) -> Result<()> {
        let lo = range.start;
        let mut g = grad;
        for (i, c) in range.clone().zip(caches).rev() {
            g = self.pieces[i].stage.backward_micro(c, g, i > lo, 0)?;
        }
        for p in &mut self.pieces[range] {
            p.stage.apply();
        }
        Ok(())
    }

    /// Gives frozen pieces their weights back (batch-norm statistics
    /// move in training even at a learning rate of 0).
    fn restore(&mut self) -> Result<()> {
        for p in &mut self.pieces {
            if let Some(w) = &p.weights {
                p.stage.load_params(w)?;
            }
        }
        Ok(())
    }

    /// Trains every trainable piece on labelled samples `x`, `y` (the
    /// chain must end with the loss stage).
    pub fn train_labels(&mut self, x: &Rows, y: &[u32], budget: &Budget, seed: u64) -> Result<()> {
        self.train_labels_range(0..self.pieces.len(), x, y, budget, seed)
    }

    /// Trains the trainable pieces of `range` (which must end with the
    /// loss stage) on samples `x` that enter it, labels `y`.
    pub fn train_labels_range(
        &mut self,
        range: Range<usize>,
        x: &Rows,
        y: &[u32],
        budget: &Budget,
        seed: u64,
    ) -> Result<()> {
        let Some(lo) = self.first_trainable(range.clone()) else {
            return Ok(());
        };
        if x.is_empty() {
            return Ok(());
        }
        let prefix = self.eval_rows(range.start..lo, x)?;
        let mut order = Order::new(x.len(), budget.batch, seed);
        for _ in 0..budget.steps(x.len()) {
            let idx = order.next();
            let labels: Vec<u32> = idx.iter().map(|&i| y[i]).collect();
            let (_, caches) = self.forward(lo..range.end, prefix.gather(&idx)?, Some(&labels))?;
            self.backward(lo..range.end, caches, None)?;
        }
        self.restore()
    }

    /// Fits pieces `range` (no loss stage) so that they map `x` to
    /// `target`, by `fit`.
    pub fn regress(
        &mut self,
        range: Range<usize>,
        x: &Rows,
        target: &Rows,
        fit: Fit,
        budget: &Budget,
        seed: u64,
    ) -> Result<()> {
        let Some(lo) = self.first_trainable(range.clone()) else {
            return Ok(());
        };
        if x.is_empty() {
            return Ok(());
        }
        let prefix = self.eval_rows(range.start..lo, x)?;
        let mut order = Order::new(x.len(), budget.batch, seed);
        for _ in 0..budget.steps(x.len()) {
            let idx = order.next();
            let (y, caches) = self.forward(lo..range.end, prefix.gather(&idx)?, None)?;
            let t = target.gather(&idx)?;
            let g = fit.gradient(&y, &t)?;
            self.backward(lo..range.end, caches, Some(g))?;
        }
        self.restore()
    }

    /// Finds inputs that pieces `range` (frozen) map to `target`: gradient
    /// descent on the inputs (Adam, `steps` updates, values kept in
    /// `[0, 1]`: pixels), starting from `start` for every row.
    pub fn invert(
        &mut self,
        range: Range<usize>,
        target: &Rows,
        start: &[f32],
        steps: usize,
    ) -> Result<Rows> {
        let dim = start.len();
        let mut out = Rows::empty(dim);
        for s in (0..target.len()).step_by(EVAL_BATCH) {
            let e = (s + EVAL_BATCH).min(target.len());
            let rows = e - s;
            let t = target.slice(s..e)?;
            let mut x: Vec<f32> = start.repeat(rows);
            let (mut m, mut v) = (vec![0f32; x.len()], vec![0f32; x.len()]);
            let (b1, b2, lr) = (0.9f32, 0.999f32, 0.01f32);
            for k in 1..=steps {
                let (y, caches) =
                    self.forward(range.clone(), Matrix::new(rows, dim, x.clone())?, None)?;
                let scale = 2.0 / (y.rows() * y.cols()).max(1) as f32;
                let g: Vec<f32> = y
                    .as_slice()
                    .iter()
                    .zip(t.as_slice())
                    .map(|(a, b)| scale * (a - b))
                    .collect();
                let mut g = Some(Matrix::new(y.rows(), y.cols(), g)?);
                for (i, c) in range.clone().zip(caches).rev() {
                    g = self.pieces[i].stage.backward_micro(c, g, true, 0)?;
                }
                for p in &mut self.pieces[range.clone()] {
                    p.stage.apply();
                }
                let Some(gx) = g else { break };
                let (c1, c2) = (1.0 - b1.powi(k as i32), 1.0 - b2.powi(k as i32));
                for (((xi, gi), mi), vi) in x.iter_mut().zip(gx.as_slice()).zip(&mut m).zip(&mut v)
                {
                    *mi = b1 * *mi + (1.0 - b1) * gi;
                    *vi = b2 * *vi + (1.0 - b2) * gi * gi;
                    *xi = (*xi - lr * (*mi / c1) / ((*vi / c2).sqrt() + 1e-8)).clamp(0.0, 1.0);
                }
            }
            out.values.extend_from_slice(&x);
        }
        self.restore()?;
        Ok(out)
    }
}

/// Batches of a shuffled order, reshuffled after each pass.
struct Order {
    perm: Vec<usize>,
    at: usize,
    batch: usize,
    rng: rand_chacha::ChaCha8Rng,
}

impl Order {
    fn new(n: usize, batch: usize, seed: u64) -> Order {
        let mut rng = rng(derive_seed(seed, 0x0de2));
        let mut perm: Vec<usize> = (0..n).collect();
        perm.shuffle(&mut rng);
        Order {
            perm,
            at: 0,
            batch: batch.clamp(1, n.max(1)),
            rng,
        }
    }

    fn next(&mut self) -> Vec<usize> {
        if self.at + self.batch > self.perm.len() {
            self.perm.shuffle(&mut self.rng);
            self.at = 0;
        }
        let b = self.perm[self.at..self.at + self.batch].to_vec();
        self.at += self.batch;
        b
    }
}

#[cfg(test)]
mod tests;
