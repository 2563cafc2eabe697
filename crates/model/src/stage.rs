//! The stage engine: what one node runs.
//!
//! (Length: about 690 lines: each op's forward and backward sit side by
//! side with the state and SGD code they share; the kernels are in
//! `crate::arith`.)
//!
//! A [`Stage`] holds the parameters of its ops and their SGD momentum. Each
//! op has an explicit backward (no autodiff graph), computed with the
//! reproducible arithmetic of [`crate::arith`] (`docs/arithmetic.md`):
//!
//! | op | forward | backward |
//! |---|---|---|
//! | linear | `y = x·W + b` | `dX = dY·Wᵀ`, `dW = Xᵀ·dY`, `db = Σ_batch dY` |
//! | relu | `y = max(x, 0)` | `dX = dY ⊙ [y > 0]` |
//! | log_softmax | `y = x − m − log Σ exp(x − m)` | `dX = dY − exp(y) ⊙ Σ dY` |
//! | nll_loss | `l = −(1/N) Σ y[i, t_i]` | `dX[i, t_i] = −1/N` |
//!
//! Parameters follow PyTorch's SGD: `v = μ·v + g` (`v = g` on the first
//! step), `p = p − lr·v`; no dampening, no weight decay.

use serde::{Deserialize, Serialize};

use crate::arith::gemm::View;
use crate::arith::matrix::Matrix;
use crate::arith::ops;
use crate::error::{ModelError, Result};
use crate::init;
use crate::spec::{OpSpec, StageSpec};
use crate::tensor_bytes::TensorBytes;

/// Optimiser settings shared by every stage of a run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sgd {
    /// Learning rate.
    pub lr: f32,
    /// Momentum factor μ (0 disables the buffer).
    pub momentum: f32,
}

impl Default for Sgd {
    fn default() -> Self {
        Sgd {
            lr: 0.01,
            momentum: 0.9,
        }
    }
}

/// One parameter tensor (row-major), its momentum buffer and the
/// gradients of the current step's micro-batches.
struct Param {
    shape: Vec<usize>,
    value: Vec<f32>,
    velocity: Option<Vec<f32>>,
    /// Gradients of the micro-batches of the current step, by micro index,
    /// not yet applied.
    pending: Vec<(u32, Vec<f32>)>,
}

impl Param {
    fn new(shape: Vec<usize>, value: Vec<f32>) -> Self {
        Param {
            shape,
            value,
            velocity: None,
            pending: Vec::new(),
        }
    }

    /// Adds the gradients of the current step in micro-batch order (so the
    /// sum is the same whatever order they arrived in: `g₀ ⊕ g₁ ⊕ …`) and
    /// applies them.
    fn apply(&mut self, sgd: Sgd) {
        let mut pending = std::mem::take(&mut self.pending);
        pending.sort_by_key(|(m, _)| *m);
        let mut grads = pending.into_iter().map(|(_, g)| g);
        let Some(mut sum) = grads.next() else {
            return;
        };
        for g in grads {
            ops::add_assign(&mut sum, &g);
        }
        ops::sgd_step(
            &mut self.value,
            &mut self.velocity,
            sum,
            sgd.lr,
            sgd.momentum,
        );
    }

    fn load(&mut self, name: &str, p: &NamedParam) -> Result<()> {
        expect_shape(name, &p.shape, &self.shape)?;
        self.value = p.values.clone();
        Ok(())
    }
}

enum OpState {
    Linear {
        input: usize,
        output: usize,
        w: Param,
        b: Param,
    },
    Normalize {
        mean: f32,
        std: f32,
    },
    Relu,
    Identity,
    LogSoftmax,
    NllLoss,
}

/// What one op saved in forward for its backward.
enum Saved {
    Input(Matrix),
    Output(Matrix),
    Nothing,
    Loss {
        labels: Vec<u32>,
        classes: usize,
        /// Rows the mean is taken over: the whole batch, when this forward
        /// is one micro-batch of it.
        rows: usize,
    },
}

/// What a training forward saved for the matching backward. A node keeps
/// one per step in flight, under the step's per-hop tag.
pub struct StageCache {
    saved: Vec<Saved>,
    /// Rows of the forward's input: the backward's gradient must have as
    /// many.
    rows: usize,
}

impl StageCache {
    /// Rows of the forward this cache belongs to.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Bytes of activations the cache holds (what a node counts against
    /// its memory bound).
    pub fn bytes(&self) -> usize {
        self.saved
            .iter()
            .map(|s| match s {
                Saved::Input(m) | Saved::Output(m) => 4 * m.as_slice().len(),
                Saved::Loss { labels, .. } => 4 * labels.len(),
                Saved::Nothing => 0,
            })
            .sum()
    }
}

/// One named parameter tensor, as exported to weights files.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedParam {
    /// `"{op}.weight"` or `"{op}.bias"`, `op` the 0-based op index.
    pub name: String,
    /// Shape in the engine's layout (`linear` weights are `[in, out]`).
    pub shape: Vec<usize>,
    /// Row-major values.
    pub values: Vec<f32>,
}

/// The slice of a model one server runs, with its parameters.
pub struct Stage {
    spec: StageSpec,
    ops: Vec<OpState>,
    sgd: Sgd,
    steps: u64,
    /// Micro-batch indices whose gradients wait for [`Stage::apply`].
    pending: Vec<u32>,
}

impl Stage {
    /// Builds a stage, initialising parameters from `seed` (one seed per
    /// stage; ops draw from streams derived from it).
    pub fn new(spec: &StageSpec, seed: u64, sgd: Sgd) -> Self {
        let ops = spec
            .ops
            .iter()
            .enumerate()
            .map(|(i, op)| match *op {
                OpSpec::Linear { input, output } => {
                    let (w, b) = init::linear(init::derive_seed(seed, i as u64), input, output);
                    OpState::Linear {
                        input,
                        output,
                        w: Param::new(vec![input, output], w),
                        b: Param::new(vec![output], b),
                    }
                }
                OpSpec::Normalize { mean, std } => OpState::Normalize { mean, std },
                OpSpec::Relu => OpState::Relu,
                OpSpec::Identity => OpState::Identity,
                OpSpec::LogSoftmax => OpState::LogSoftmax,
                OpSpec::NllLoss => OpState::NllLoss,
            })
            .collect();
        Stage {
            spec: spec.clone(),
            ops,
            sgd,
            steps: 0,
            pending: Vec::new(),
        }
    }

    /// The stage's description.
    pub fn spec(&self) -> &StageSpec {
        &self.spec
    }

    /// Training steps applied so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Counts `steps` updates as applied (a stage set up to continue a run
    /// whose state is loaded afterwards, or that has no parameters).
    pub fn start_at(&mut self, steps: u64) {
        self.steps = steps;
    }

    fn check_input(&self, x: &Matrix, context: &'static str) -> Result<usize> {
        let [batch, features] = x.dims();
        // An identity stage (a dummy hop) passes anything through: after
        // the loss stage it sees the loss in training and the
        // log-probabilities in test.
        let any_width = self.ops.iter().all(|o| matches!(o, OpState::Identity));
        if (features != self.spec.input && !any_width) || batch == 0 {
            return Err(ModelError::Shape {
                context,
                expected: format!("[batch ≥ 1, {}]", self.spec.input),
                actual: format!("[{batch}, {features}]"),
            });
        }
        Ok(batch)
    }

    /// Training forward. A loss stage needs `labels` (one class per row) and
    /// returns the mean loss as a `[1, 1]` matrix.
    pub fn forward_train(&self, x: Matrix, labels: Option<&[u32]>) -> Result<(Matrix, StageCache)> {
        self.forward_micro(x, labels, 0)
    }

    /// [`Stage::forward_train`] of one micro-batch of a batch of
    /// `batch_rows` rows: a loss stage divides by `batch_rows` instead of
    /// the micro-batch's own rows (0 means those), so that the micro-batch
    /// losses and gradients add up to the whole batch's.
    pub fn forward_micro(
        &self,
        x: Matrix,
        labels: Option<&[u32]>,
        batch_rows: usize,
    ) -> Result<(Matrix, StageCache)> {
        let batch = self.check_input(&x, "stage forward")?;
        let rows = if batch_rows == 0 { batch } else { batch_rows };
        if rows < batch {
            return Err(ModelError::Misuse(format!(
                "a micro-batch of {batch} rows in a batch of {rows}"
            )));
        }
        let mut saved = Vec::with_capacity(self.ops.len());
        let mut h = x;
        for op in &self.ops {
            h = match op {
                OpState::Linear {
                    input,
                    output,
                    w,
                    b,
                } => {
                    let y = ops::linear_forward(&h, weight(&w.value, *input, *output), &b.value);
                    saved.push(Saved::Input(h));
                    y
                }
                OpState::Relu => {
                    let y = ops::relu_forward(h);
                    saved.push(Saved::Output(y.clone()));
                    y
                }
                OpState::Identity => {
                    saved.push(Saved::Nothing);
                    h
                }
                OpState::Normalize { mean, std } => {
                    saved.push(Saved::Nothing);
                    ops::normalize_forward(h, *mean, *std)
                }
                OpState::LogSoftmax => {
                    let y = ops::log_softmax_forward(h);
                    saved.push(Saved::Output(y.clone()));
                    y
                }
                OpState::NllLoss => {
                    let labels = labels
                        .ok_or_else(|| ModelError::Labels("the loss stage got no labels".into()))?;
                    let classes = h.cols();
                    check_labels(labels, batch, classes)?;
                    let loss = ops::nll_forward(&h, labels, rows);
                    saved.push(Saved::Loss {
                        labels: labels.to_vec(),
                        classes,
                        rows,
                    });
                    Matrix::scalar(loss)
                }
            };
        }
        Ok((h, StageCache { saved, rows: batch }))
    }

    /// Inference forward: no cache, no update. A loss stage passes its
    /// input through (the designer reads log-probabilities before the loss).
    pub fn forward_eval(&self, x: Matrix) -> Result<Matrix> {
        self.check_input(&x, "stage eval")?;
        let mut h = x;
        for op in &self.ops {
            h = match op {
                OpState::Linear {
                    input,
                    output,
                    w,
                    b,
                } => ops::linear_forward(&h, weight(&w.value, *input, *output), &b.value),
                OpState::Normalize { mean, std } => ops::normalize_forward(h, *mean, *std),
                OpState::Relu => ops::relu_forward(h),
                OpState::Identity | OpState::NllLoss => h,
                OpState::LogSoftmax => ops::log_softmax_forward(h),
            };
        }
        Ok(h)
    }

    /// Backward: consumes the cache of one forward, applies the SGD update
    /// and returns the gradient with respect to the stage's input (or `None`
    /// when `need_input_grad` is false, as for the first stage, which saves
    /// the largest matmul of the step). A loss stage takes no `grad_out`.
    pub fn backward(
        &mut self,
        cache: StageCache,
        grad_out: Option<Matrix>,
        need_input_grad: bool,
    ) -> Result<Option<Matrix>> {
        let dx = self.backward_micro(cache, grad_out, need_input_grad, 0)?;
        self.apply();
        Ok(dx)
    }

    /// The shape the output gradient of a backward on `cache` must have:
    /// `[rows, output]` (none for a loss stage). Checked before any math.
    fn check_grad(&self, cache: &StageCache, grad_out: Option<&Matrix>) -> Result<()> {
        if self.spec.is_loss() {
            return Ok(());
        }
        let Some(g) = grad_out else {
            return Ok(());
        };
        let any_width = self.ops.iter().all(|o| matches!(o, OpState::Identity));
        let want = self.spec.output();
        if g.rows() != cache.rows || (g.cols() != want && !any_width) {
            return Err(ModelError::Shape {
                context: "stage backward",
                expected: format!("[{}, {want}]", cache.rows),
                actual: format!("[{}, {}]", g.rows(), g.cols()),
            });
        }
        Ok(())
    }

    /// Backward of micro-batch `micro` of the current step: like
    /// [`Stage::backward`], but the parameter gradients wait until
    /// [`Stage::apply`], which adds them up in micro-batch order and makes
    /// one update (GPipe; no stale weights). A gradient whose shape does
    /// not fit the cache is refused before anything changes.
    pub fn backward_micro(
        &mut self,
        cache: StageCache,
        grad_out: Option<Matrix>,
        need_input_grad: bool,
        micro: u32,
    ) -> Result<Option<Matrix>> {
        if cache.saved.len() != self.ops.len() {
            return Err(ModelError::Misuse("cache from another stage".into()));
        }
        if self.pending.contains(&micro) {
            return Err(ModelError::Misuse(format!(
                "micro-batch {micro} of step {} twice",
                self.steps
            )));
        }
        self.check_grad(&cache, grad_out.as_ref())?;
        let mut g = grad_out;
        let last = self.ops.len() - 1;
        let first_param_op = self
            .ops
            .iter()
            .position(|op| matches!(op, OpState::Linear { .. }))
            .unwrap_or(self.ops.len());
        // Parameter gradients are kept aside until the whole backward has
        // succeeded, so a refused backward changes nothing.
        let mut grads: Vec<(usize, Vec<f32>, Vec<f32>)> = Vec::new();
        for (i, (op, saved)) in self.ops.iter().zip(cache.saved).enumerate().rev() {
            // Below the first op that has parameters, the gradient is only
            // needed if the caller wants the input gradient.
            let need_dx = need_input_grad || i > first_param_op;
            g = match (op, saved) {
                (
                    OpState::NllLoss,
                    Saved::Loss {
                        labels,
                        classes,
                        rows,
                    },
                ) => {
                    if i != last {
                        return Err(ModelError::Misuse("nll_loss not last".into()));
                    }
                    Some(ops::nll_backward(&labels, classes, rows))
                }
                (OpState::LogSoftmax, Saved::Output(y)) => {
                    Some(ops::log_softmax_backward(&y, need_grad(g)?))
                }
                (OpState::Relu, Saved::Output(y)) => Some(ops::relu_backward(&y, need_grad(g)?)),
                (OpState::Identity, Saved::Nothing) => g,
                (OpState::Normalize { std, .. }, Saved::Nothing) => {
                    // Only needed below the first parameter op if asked.
                    if need_dx {
                        Some(ops::normalize_backward(need_grad(g)?, *std))
                    } else {
                        None
                    }
                }
                (
                    OpState::Linear {
                        input, output, w, ..
                    },
                    Saved::Input(x),
                ) => {
                    let dy = need_grad(g)?;
                    let (dx, dw, db) =
                        ops::linear_backward(&x, weight(&w.value, *input, *output), &dy, need_dx);
                    grads.push((i, dw.into_vec(), db));
                    dx
                }
                _ => return Err(ModelError::Misuse("cache does not match the ops".into())),
            };
            if g.is_none() && i > 0 && need_dx {
                return Err(ModelError::Misuse("missing gradient".into()));
            }
        }
        for (i, dw, db) in grads {
            if let Some(OpState::Linear { w, b, .. }) = self.ops.get_mut(i) {
                w.pending.push((micro, dw));
                b.pending.push((micro, db));
            }
        }
        self.pending.push(micro);
        Ok(if need_input_grad { g } else { None })
    }

    /// Micro-batches of the current step whose gradients wait for
    /// [`Stage::apply`].
    pub fn pending_micros(&self) -> usize {
        self.pending.len()
    }

    /// Applies the current step's update: the gradients of its
    /// micro-batches, added in micro-batch order, one SGD step. Moves the
    /// stage to the next step.
    pub fn apply(&mut self) {
        let sgd = self.sgd;
        for op in &mut self.ops {
            if let OpState::Linear { w, b, .. } = op {
                w.apply(sgd);
                b.apply(sgd);
            }
        }
        self.pending.clear();
        self.steps += 1;
    }

    /// [`Stage::forward_train`] on a tensor message: exactly what a node
    /// serves. Returns the output message and the cache for backward.
    pub fn forward_bytes(
        &self,
        input: &[u8],
        labels: Option<&[u32]>,
    ) -> Result<(Vec<u8>, StageCache)> {
        self.forward_micro_bytes(input, labels, 0)
    }

    /// [`Stage::forward_micro`] on a tensor message.
    pub fn forward_micro_bytes(
        &self,
        input: &[u8],
        labels: Option<&[u32]>,
        batch_rows: usize,
    ) -> Result<(Vec<u8>, StageCache)> {
        let x = TensorBytes::decode(input)?.into_matrix()?;
        let (y, cache) = self.forward_micro(x, labels, batch_rows)?;
        Ok((TensorBytes::encode_matrix(&y), cache))
    }

    /// [`Stage::backward`] on tensor messages.
    pub fn backward_bytes(
        &mut self,
        cache: StageCache,
        grad_out: Option<&[u8]>,
        need_input_grad: bool,
    ) -> Result<Option<Vec<u8>>> {
        let dx = self.backward_micro_bytes(cache, grad_out, need_input_grad, 0)?;
        self.apply();
        Ok(dx)
    }

    /// [`Stage::backward_micro`] on tensor messages.
    pub fn backward_micro_bytes(
        &mut self,
        cache: StageCache,
        grad_out: Option<&[u8]>,
        need_input_grad: bool,
        micro: u32,
    ) -> Result<Option<Vec<u8>>> {
        let g = match grad_out {
            Some(b) => Some(TensorBytes::decode(b)?.into_matrix()?),
            None => None,
        };
        Ok(self
            .backward_micro(cache, g, need_input_grad, micro)?
            .map(|t| TensorBytes::encode_matrix(&t)))
    }

    /// [`Stage::forward_eval`] on tensor messages.
    pub fn eval_bytes(&self, input: &[u8]) -> Result<Vec<u8>> {
        let x = TensorBytes::decode(input)?.into_matrix()?;
        Ok(TensorBytes::encode_matrix(&self.forward_eval(x)?))
    }

    /// The stage's parameters, in op order (NaNs canonical).
    pub fn params(&self) -> Vec<NamedParam> {
        let mut out = Vec::new();
        for (i, op) in self.ops.iter().enumerate() {
            if let OpState::Linear { w, b, .. } = op {
                out.push(named(format!("{i}.weight"), &w.shape, &w.value));
                out.push(named(format!("{i}.bias"), &b.shape, &b.value));
            }
        }
        out
    }

    /// Replaces parameters (and clears momentum) from exported tensors.
    pub fn load_params(&mut self, params: &[NamedParam]) -> Result<()> {
        let find = |name: &str| {
            params
                .iter()
                .find(|p| p.name == name)
                .ok_or_else(|| ModelError::Misuse(format!("parameter {name} missing")))
        };
        // Every tensor is checked before any is replaced.
        for (i, op) in self.ops.iter().enumerate() {
            if let OpState::Linear { w, b, .. } = op {
                for (param, suffix) in [(w, "weight"), (b, "bias")] {
                    let name = format!("{i}.{suffix}");
                    expect_shape(&name, &find(&name)?.shape, &param.shape)?;
                }
            }
        }
        for (i, op) in self.ops.iter_mut().enumerate() {
            if let OpState::Linear { w, b, .. } = op {
                for (param, suffix) in [(w, "weight"), (b, "bias")] {
                    let name = format!("{i}.{suffix}");
                    param.load(&name, find(&name)?)?;
                    param.velocity = None;
                }
            }
        }
        Ok(())
    }
}

/// A `linear` weight, `[input, output]` row-major. Its length is
/// `input × output` by construction (initialisation, and loads that check
/// the shape).
fn weight(values: &[f32], input: usize, output: usize) -> View<'_> {
    View::rows_of(values, input, output)
}

/// Everything a stage needs to continue training where it stopped: its
/// parameters, their momentum buffers and its step counter (a checkpoint).
#[derive(Debug, Clone, PartialEq)]
pub struct StageState {
    /// Training steps applied.
    pub steps: u64,
    /// Parameters (as [`Stage::params`]), then momentum buffers named
    /// `"{op}.weight.velocity"` / `"{op}.bias.velocity"` (absent before the
    /// first step).
    pub tensors: Vec<NamedParam>,
}

impl Stage {
    /// The stage's state, for a checkpoint (NaNs canonical).
    pub fn state(&self) -> StageState {
        let mut tensors = self.params();
        for (i, op) in self.ops.iter().enumerate() {
            if let OpState::Linear { w, b, .. } = op {
                for (param, suffix) in [(w, "weight"), (b, "bias")] {
                    if let Some(v) = &param.velocity {
                        tensors.push(named(format!("{i}.{suffix}.velocity"), &param.shape, v));
                    }
                }
            }
        }
        StageState {
            steps: self.steps,
            tensors,
        }
    }

    /// Restores a state from [`Stage::state`]: parameters, momentum and the
    /// step counter. Gradients waiting for an update are dropped. Every
    /// tensor is checked before anything changes.
    pub fn load_state(&mut self, state: &StageState) -> Result<()> {
        let find = |name: &str| state.tensors.iter().find(|p| p.name == name);
        for (i, op) in self.ops.iter().enumerate() {
            if let OpState::Linear { w, b, .. } = op {
                for (param, suffix) in [(w, "weight"), (b, "bias")] {
                    let name = format!("{i}.{suffix}.velocity");
                    if let Some(p) = find(&name) {
                        expect_shape(&name, &p.shape, &param.shape)?;
                    }
                }
            }
        }
        self.load_params(&state.tensors)?;
        for (i, op) in self.ops.iter_mut().enumerate() {
            if let OpState::Linear { w, b, .. } = op {
                for (param, suffix) in [(w, "weight"), (b, "bias")] {
                    param.velocity =
                        find(&format!("{i}.{suffix}.velocity")).map(|p| p.values.clone());
                    param.pending.clear();
                }
            }
        }
        self.pending.clear();
        self.steps = state.steps;
        Ok(())
    }
}

fn expect_shape(name: &str, got: &[usize], want: &[usize]) -> Result<()> {
    if got != want {
        return Err(ModelError::Shape {
            context: "load parameters",
            expected: format!("{name} {want:?}"),
            actual: format!("{got:?}"),
        });
    }
    Ok(())
}

fn named(name: String, shape: &[usize], values: &[f32]) -> NamedParam {
    NamedParam {
        name,
        shape: shape.to_vec(),
        values: values.iter().copied().map(ops::canonical).collect(),
    }
}

fn need_grad(g: Option<Matrix>) -> Result<Matrix> {
    g.ok_or_else(|| ModelError::Misuse("backward needs the output gradient".into()))
}

fn check_labels(labels: &[u32], batch: usize, classes: usize) -> Result<()> {
    if labels.len() != batch {
        return Err(ModelError::Labels(format!(
            "{} labels for a batch of {batch}",
            labels.len()
        )));
    }
    if let Some(bad) = labels.iter().find(|l| **l as usize >= classes) {
        return Err(ModelError::Labels(format!(
            "label {bad} outside 0..{classes}"
        )));
    }
    Ok(())
}
