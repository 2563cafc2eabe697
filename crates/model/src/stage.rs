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
}

impl<const D: usize> Param<D> {
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
    Loss { labels: Vec<u32>, classes: usize },
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
                        w: Param {
                            value: Tensor::from_data(TensorData::new(w, [input, output]), &device),
                            velocity: None,
                        },
                        b: Param {
                            value: Tensor::from_data(TensorData::new(b, [output]), &device),
                            velocity: None,
                        },
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

    fn check_input(&self, x: &Tensor<2>, context: &'static str) -> Result<usize> {
        let [batch, features] = x.dims();
        if features != self.spec.input || batch == 0 {
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
        let batch = self.check_input(&x, "stage forward")?;
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
                        .mul_scalar(-1.0 / batch as f32)
                        .reshape([1, 1]);
                    saved.push(Saved::Loss {
                        labels: labels.to_vec(),
                        classes,
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
        if cache.saved.len() != self.ops.len() {
            return Err(ModelError::Misuse("cache from another stage".into()));
        }
        let mut g = grad_out;
        let sgd = self.sgd;
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
                (OpState::NllLoss, Saved::Loss { labels, classes }) => {
                    if i != last {
                        return Err(ModelError::Misuse("nll_loss not last".into()));
                    }
                    let n = labels.len() as f32;
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
                    w.step(dw, sgd);
                    b.step(db, sgd);
                    dx
                }
                _ => return Err(ModelError::Misuse("cache does not match the ops".into())),
            };
            if g.is_none() && i > 0 && need_dx {
                return Err(ModelError::Misuse("missing gradient".into()));
            }
        }
        self.steps += 1;
        Ok(if need_input_grad { g } else { None })
    }

    /// [`Stage::forward_train`] on a tensor message: exactly what a node
    /// serves. Returns the output message and the cache for backward.
    pub fn forward_bytes(
        &self,
        input: &[u8],
        labels: Option<&[u32]>,
    ) -> Result<(Vec<u8>, StageCache)> {
        let x = TensorBytes::decode(input)?.into_tensor(&self.device)?;
        let (y, cache) = self.forward_train(x, labels)?;
        Ok((TensorBytes::encode_tensor(&y)?, cache))
    }

    /// [`Stage::backward`] on tensor messages.
    pub fn backward_bytes(
        &mut self,
        cache: StageCache,
        grad_out: Option<&[u8]>,
        need_input_grad: bool,
    ) -> Result<Option<Vec<u8>>> {
        let g = match grad_out {
            Some(b) => Some(TensorBytes::decode(b)?.into_tensor(&self.device)?),
            None => None,
        };
        self.backward(cache, g, need_input_grad)?
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
