//! The stage engine: what one node runs.
//!
//! A [`Stage`] holds the parameters of its ops and their SGD momentum. Each
//! op has an explicit backward written on burn tensors (no autodiff graph):
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

use burn::tensor::{activation::relu, Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

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

/// The device every stage computes on: burn's Flex CPU backend. Nodes and
/// the local trainer must all use it, or results stop being bit-identical.
pub fn device() -> Device {
    Device::flex()
}

struct Param<const D: usize> {
    value: Tensor<D>,
    velocity: Option<Tensor<D>>,
    /// Gradients of the micro-batches of the current step, by micro index,
    /// not yet applied.
    pending: Vec<(u32, Tensor<D>)>,
}

impl<const D: usize> Param<D> {
    fn new(value: Tensor<D>) -> Self {
        Param {
            value,
            velocity: None,
            pending: Vec::new(),
        }
    }

    /// Adds the gradients of the current step in micro-batch order (so the
    /// sum is the same whatever order they arrived in) and applies them.
    fn apply(&mut self, sgd: Sgd) {
        let mut pending = std::mem::take(&mut self.pending);
        pending.sort_by_key(|(m, _)| *m);
        let mut sum: Option<Tensor<D>> = None;
        for (_, g) in pending {
            sum = Some(match sum {
                Some(s) => s.add(g),
                None => g,
            });
        }
        if let Some(g) = sum {
            self.step(g, sgd);
        }
    }

    fn step(&mut self, grad: Tensor<D>, sgd: Sgd) {
        let update = if sgd.momentum != 0.0 {
            let v = match self.velocity.take() {
                Some(v) => v.mul_scalar(sgd.momentum).add(grad),
                None => grad,
            };
            self.velocity = Some(v.clone());
            v
        } else {
            grad
        };
        self.value = self.value.clone().sub(update.mul_scalar(sgd.lr));
    }
}

#[allow(clippy::large_enum_variant)] // one per op, built once per stage
enum OpState {
    Linear { w: Param<2>, b: Param<1> },
    Normalize { mean: f32, std: f32 },
    Relu,
    Identity,
    LogSoftmax,
    NllLoss,
}

/// What one op saved in forward for its backward.
enum Saved {
    Input(Tensor<2>),
    Output(Tensor<2>),
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
}

/// One named parameter tensor, as exported to weights files.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedParam {
    /// `"{op}.weight"` or `"{op}.bias"`, `op` the 0-based op index.
    pub name: String,
    /// Shape in burn's layout (`linear` weights are `[in, out]`).
    pub shape: Vec<usize>,
    /// Row-major values.
    pub values: Vec<f32>,
}

/// The slice of a model one server runs, with its parameters.
pub struct Stage {
    spec: StageSpec,
    ops: Vec<OpState>,
    sgd: Sgd,
    device: Device,
    steps: u64,
    /// Micro-batch indices whose gradients wait for [`Stage::apply`].
    pending: Vec<u32>,
}

impl Stage {
    /// Builds a stage, initialising parameters from `seed` (one seed per
    /// stage; ops draw from streams derived from it).
    pub fn new(spec: &StageSpec, seed: u64, sgd: Sgd) -> Self {
        let device = device();
        let ops = spec
            .ops
            .iter()
            .enumerate()
            .map(|(i, op)| match *op {
                OpSpec::Linear { input, output } => {
                    let (w, b) = init::linear(init::derive_seed(seed, i as u64), input, output);
                    OpState::Linear {
                        w: Param::new(Tensor::from_data(
                            TensorData::new(w, [input, output]),
                            &device,
                        )),
                        b: Param::new(Tensor::from_data(TensorData::new(b, [output]), &device)),
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
            device,
            steps: 0,
            pending: Vec::new(),
        }
    }

    /// The stage's description.
    pub fn spec(&self) -> &StageSpec {
        &self.spec
    }

    /// The device its tensors live on.
    pub fn device(&self) -> &Device {
        &self.device
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

    fn check_input(&self, x: &Tensor<2>, context: &'static str) -> Result<usize> {
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
    /// returns the mean loss as a `[1, 1]` tensor.
    pub fn forward_train(
        &self,
        x: Tensor<2>,
        labels: Option<&[u32]>,
    ) -> Result<(Tensor<2>, StageCache)> {
        self.forward_micro(x, labels, 0)
    }

    /// [`Stage::forward_train`] of one micro-batch of a batch of
    /// `batch_rows` rows: a loss stage divides by `batch_rows` instead of
    /// the micro-batch's own rows (0 means those), so that the micro-batch
    /// losses and gradients add up to the whole batch's.
    pub fn forward_micro(
        &self,
        x: Tensor<2>,
        labels: Option<&[u32]>,
        batch_rows: usize,
    ) -> Result<(Tensor<2>, StageCache)> {
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
                OpState::Linear { w, b } => {
                    saved.push(Saved::Input(h.clone()));
                    linear(h, &w.value, &b.value)
                }
                OpState::Relu => {
                    let y = relu(h);
                    saved.push(Saved::Output(y.clone()));
                    y
                }
                OpState::Identity => {
                    saved.push(Saved::Nothing);
                    h
                }
                OpState::Normalize { mean, std } => {
                    saved.push(Saved::Nothing);
                    h.sub_scalar(*mean).div_scalar(*std)
                }
                OpState::LogSoftmax => {
                    let y = log_softmax(h);
                    saved.push(Saved::Output(y.clone()));
                    y
                }
                OpState::NllLoss => {
                    let labels = labels
                        .ok_or_else(|| ModelError::Labels("the loss stage got no labels".into()))?;
                    let classes = h.dims()[1];
                    check_labels(labels, batch, classes)?;
                    let mask = one_hot_scaled(labels, classes, 1.0, &self.device);
                    let loss = h
                        .mul(mask)
                        .sum()
                        .mul_scalar(-1.0 / rows as f32)
                        .reshape([1, 1]);
                    saved.push(Saved::Loss {
                        labels: labels.to_vec(),
                        classes,
                        rows,
                    });
                    loss
                }
            };
        }
        Ok((h, StageCache { saved }))
    }

    /// Inference forward: no cache, no update. A loss stage passes its
    /// input through (the designer reads log-probabilities before the loss).
    pub fn forward_eval(&self, x: Tensor<2>) -> Result<Tensor<2>> {
        self.check_input(&x, "stage eval")?;
        let mut h = x;
        for op in &self.ops {
            h = match op {
                OpState::Linear { w, b } => linear(h, &w.value, &b.value),
                OpState::Normalize { mean, std } => h.sub_scalar(*mean).div_scalar(*std),
                OpState::Relu => relu(h),
                OpState::Identity | OpState::NllLoss => h,
                OpState::LogSoftmax => log_softmax(h),
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
        grad_out: Option<Tensor<2>>,
        need_input_grad: bool,
    ) -> Result<Option<Tensor<2>>> {
        let dx = self.backward_micro(cache, grad_out, need_input_grad, 0)?;
        self.apply();
        Ok(dx)
    }

    /// Backward of micro-batch `micro` of the current step: like
    /// [`Stage::backward`], but the parameter gradients wait until
    /// [`Stage::apply`], which adds them up in micro-batch order and makes
    /// one update (GPipe; no stale weights).
    pub fn backward_micro(
        &mut self,
        cache: StageCache,
        grad_out: Option<Tensor<2>>,
        need_input_grad: bool,
        micro: u32,
    ) -> Result<Option<Tensor<2>>> {
        if cache.saved.len() != self.ops.len() {
            return Err(ModelError::Misuse("cache from another stage".into()));
        }
        if self.pending.contains(&micro) {
            return Err(ModelError::Misuse(format!(
                "micro-batch {micro} of step {} twice",
                self.steps
            )));
        }
        let mut g = grad_out;
        let last = self.ops.len() - 1;
        let mut first_param_op = self.ops.len();
        for (i, op) in self.ops.iter().enumerate() {
            if matches!(op, OpState::Linear { .. }) {
                first_param_op = first_param_op.min(i);
            }
        }
        for (i, (op, saved)) in self.ops.iter_mut().zip(cache.saved).enumerate().rev() {
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
                    let n = rows as f32;
                    Some(one_hot_scaled(&labels, classes, -1.0 / n, &self.device))
                }
                (OpState::LogSoftmax, Saved::Output(y)) => {
                    let dy = need_grad(g)?;
                    let sum = dy.clone().sum_dim(1);
                    Some(dy.sub(y.exp().mul(sum)))
                }
                (OpState::Relu, Saved::Output(y)) => {
                    let dy = need_grad(g)?;
                    Some(dy.mask_fill(y.lower_equal_elem(0.0), 0.0))
                }
                (OpState::Identity, Saved::Nothing) => g,
                (OpState::Normalize { std, .. }, Saved::Nothing) => {
                    // Only needed below the first parameter op if asked.
                    if need_dx {
                        Some(need_grad(g)?.div_scalar(*std))
                    } else {
                        None
                    }
                }
                (OpState::Linear { w, b }, Saved::Input(x)) => {
                    let dy = need_grad(g)?;
                    let dx = need_dx.then(|| dy.clone().matmul(w.value.clone().transpose()));
                    let dw = x.transpose().matmul(dy.clone());
                    let db = dy.sum_dim(0).squeeze::<1>();
                    w.pending.push((micro, dw));
                    b.pending.push((micro, db));
                    dx
                }
                _ => return Err(ModelError::Misuse("cache does not match the ops".into())),
            };
            if g.is_none() && i > 0 && need_dx {
                return Err(ModelError::Misuse("missing gradient".into()));
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
            if let OpState::Linear { w, b } = op {
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
        let x = TensorBytes::decode(input)?.into_tensor(&self.device)?;
        let (y, cache) = self.forward_micro(x, labels, batch_rows)?;
        Ok((TensorBytes::encode_tensor(&y)?, cache))
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
            Some(b) => Some(TensorBytes::decode(b)?.into_tensor(&self.device)?),
            None => None,
        };
        self.backward_micro(cache, g, need_input_grad, micro)?
            .map(|t| TensorBytes::encode_tensor(&t))
            .transpose()
    }

    /// [`Stage::forward_eval`] on tensor messages.
    pub fn eval_bytes(&self, input: &[u8]) -> Result<Vec<u8>> {
        let x = TensorBytes::decode(input)?.into_tensor(&self.device)?;
        TensorBytes::encode_tensor(&self.forward_eval(x)?)
    }

    /// The stage's parameters, in op order.
    pub fn params(&self) -> Vec<NamedParam> {
        let mut out = Vec::new();
        for (i, op) in self.ops.iter().enumerate() {
            if let OpState::Linear { w, b } = op {
                out.push(named(format!("{i}.weight"), &w.value.to_data()));
                out.push(named(format!("{i}.bias"), &b.value.to_data()));
            }
        }
        out
    }

    /// Replaces parameters (and clears momentum) from exported tensors.
    pub fn load_params(&mut self, params: &[NamedParam]) -> Result<()> {
        for (i, op) in self.ops.iter_mut().enumerate() {
            if let OpState::Linear { w, b } = op {
                for (slot, suffix) in [(0, "weight"), (1, "bias")] {
                    let name = format!("{i}.{suffix}");
                    let p = params
                        .iter()
                        .find(|p| p.name == name)
                        .ok_or_else(|| ModelError::Misuse(format!("parameter {name} missing")))?;
                    if slot == 0 {
                        expect_shape(&name, &p.shape, &w.value.dims())?;
                        w.value = Tensor::from_data(
                            TensorData::new(p.values.clone(), [p.shape[0], p.shape[1]]),
                            &self.device,
                        );
                        w.velocity = None;
                    } else {
                        expect_shape(&name, &p.shape, &b.value.dims())?;
                        b.value = Tensor::from_data(
                            TensorData::new(p.values.clone(), [p.shape[0]]),
                            &self.device,
                        );
                        b.velocity = None;
                    }
                }
            }
        }
        Ok(())
    }
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
    /// The stage's state, for a checkpoint.
    pub fn state(&self) -> StageState {
        let mut tensors = self.params();
        for (i, op) in self.ops.iter().enumerate() {
            if let OpState::Linear { w, b } = op {
                if let Some(v) = &w.velocity {
                    tensors.push(named(format!("{i}.weight.velocity"), &v.to_data()));
                }
                if let Some(v) = &b.velocity {
                    tensors.push(named(format!("{i}.bias.velocity"), &v.to_data()));
                }
            }
        }
        StageState {
            steps: self.steps,
            tensors,
        }
    }

    /// Restores a state from [`Stage::state`]: parameters, momentum and the
    /// step counter. Gradients waiting for an update are dropped.
    pub fn load_state(&mut self, state: &StageState) -> Result<()> {
        self.load_params(&state.tensors)?;
        let device = self.device.clone();
        let find = |name: &str| state.tensors.iter().find(|p| p.name == name);
        for (i, op) in self.ops.iter_mut().enumerate() {
            if let OpState::Linear { w, b } = op {
                let name = format!("{i}.weight.velocity");
                w.velocity = match find(&name) {
                    Some(p) => {
                        expect_shape(&name, &p.shape, &w.value.dims())?;
                        Some(Tensor::from_data(
                            TensorData::new(p.values.clone(), [p.shape[0], p.shape[1]]),
                            &device,
                        ))
                    }
                    None => None,
                };
                let name = format!("{i}.bias.velocity");
                b.velocity = match find(&name) {
                    Some(p) => {
                        expect_shape(&name, &p.shape, &b.value.dims())?;
                        Some(Tensor::from_data(
                            TensorData::new(p.values.clone(), [p.shape[0]]),
                            &device,
                        ))
                    }
                    None => None,
                };
                w.pending.clear();
                b.pending.clear();
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

fn named(name: String, data: &TensorData) -> NamedParam {
    NamedParam {
        name,
        shape: data.shape().to_vec(),
        values: data
            .as_slice::<f32>()
            .map(<[f32]>::to_vec)
            .unwrap_or_default(),
    }
}

fn need_grad(g: Option<Tensor<2>>) -> Result<Tensor<2>> {
    g.ok_or_else(|| ModelError::Misuse("backward needs the output gradient".into()))
}

fn linear(x: Tensor<2>, w: &Tensor<2>, b: &Tensor<1>) -> Tensor<2> {
    x.matmul(w.clone()).add(b.clone().unsqueeze::<2>())
}

fn log_softmax(x: Tensor<2>) -> Tensor<2> {
    let shifted = x.clone().sub(x.max_dim(1));
    let lse = shifted.clone().exp().sum_dim(1).log();
    shifted.sub(lse)
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

fn one_hot_scaled(labels: &[u32], classes: usize, value: f32, device: &Device) -> Tensor<2> {
    let mut m = vec![0.0f32; labels.len() * classes];
    for (row, l) in labels.iter().enumerate() {
        m[row * classes + *l as usize] = value;
    }
    Tensor::from_data(TensorData::new(m, [labels.len(), classes]), device)
}
