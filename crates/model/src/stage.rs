//! The stage engine: what one node runs.
//!
//! A [`Stage`] holds the layers of its ops (`crate::layer`: parameters,
//! running statistics) and the optimiser's buffers. Each op has an
//! explicit backward (no autodiff graph), computed with the reproducible
//! arithmetic of [`crate::arith`] (`docs/arithmetic.md`). Activations are
//! `[batch, values]` matrices whose values are one sample of the op's
//! [`Shape`] in row-major order (`[c, h, w]` images, flat features);
//! tensor messages carry the whole shape (`[batch, c, h, w]`) and a stage
//! checks it against its own.
//!
//! A step's micro-batches each run a forward and a backward; their
//! parameter gradients, and batch norms' batch statistics, wait until
//! [`Stage::apply`], which adds them up in micro-batch order and makes one
//! optimiser update (GPipe; no stale weights).
//!
//! Over 600 lines: the stage's forward, backward, micro-batch accumulation,
//! apply and state (checkpoint) form one life cycle over the same fields;
//! the per-op code is in `layer.rs`.

use crate::arith::matrix::Matrix;
use crate::arith::norm;
use crate::arith::ops;
use crate::error::{ModelError, Result};
use crate::layer::{self, Ctx, Grad, Layer, Saved};
use crate::spec::{Shape, StageSpec};
use crate::tensor_bytes::TensorBytes;

pub use crate::optim::{Optimizer, Sgd};

/// What a training forward saved for the matching backward. A node keeps
/// one per step in flight, under the step's per-hop tag.
pub struct StageCache {
    saved: Vec<Saved>,
    /// Rows of the forward's input: the backward's gradient must have as
    /// many.
    rows: usize,
    /// The micro-batch it belongs to.
    micro: u32,
}

impl StageCache {
    /// Rows of the forward this cache belongs to.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Bytes of activations the cache holds (what a node counts against
    /// its memory bound).
    pub fn bytes(&self) -> usize {
        self.saved.iter().map(Saved::bytes).sum()
    }
}

/// One named tensor, as exported to weights files and states.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedParam {
    /// `"{op}.weight"`, `"{op}.bias"`, `"{op}.running_mean"`, … with `op`
    /// the 0-based op index (`"{op}.ops.{i}"` inside a residual block);
    /// optimiser buffers add `.velocity`, `.exp_avg`, `.exp_avg_sq`.
    pub name: String,
    /// Shape in the engine's layout (`linear` weights are `[in, out]`,
    /// `conv2d` weights `[out, in, k, k]`).
    pub shape: Vec<usize>,
    /// Row-major values.
    pub values: Vec<f32>,
}

/// How a training forward is placed in its step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Micro {
    /// Which micro-batch of the step (0 without micro-batches).
    pub index: u32,
    /// Rows of the whole batch the loss divides by (0: this forward's own).
    pub batch_rows: usize,
}

/// The slice of a model one server runs, with its parameters.
pub struct Stage {
    spec: StageSpec,
    layers: Vec<Layer>,
    opt: Optimizer,
    seed: u64,
    steps: u64,
    /// Micro-batch indices whose gradients wait for [`Stage::apply`].
    pending: Vec<u32>,
}

impl Stage {
    /// Builds a stage, initialising parameters from `seed` (one seed per
    /// stage; ops draw from streams derived from it). The spec must have
    /// been checked ([`StageSpec::check`], or as part of a model).
    pub fn new(spec: &StageSpec, seed: u64, opt: impl Into<Optimizer>) -> Self {
        let (mut ids, mut params) = (0, 0);
        let layers = layer::build(&spec.ops, &spec.input, seed, "", &mut ids, &mut params);
        Stage {
            spec: spec.clone(),
            layers,
            opt: opt.into(),
            seed,
            steps: 0,
            pending: Vec::new(),
        }
    }

    /// The stage's description.
    pub fn spec(&self) -> &StageSpec {
        &self.spec
    }

    /// The optimiser.
    pub fn optimizer(&self) -> &Optimizer {
        &self.opt
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
        let [batch, values] = x.dims();
        // An identity stage (a dummy hop) passes anything through: after
        // the loss stage it sees the loss in training and the
        // log-probabilities in test.
        if (values != self.spec.input.numel() && !self.spec.is_identity()) || batch == 0 {
            return Err(ModelError::Shape {
                context,
                expected: format!(
                    "[batch ≥ 1, {} values per sample {}]",
                    self.spec.input.numel(),
                    self.spec.input
                ),
                actual: format!("[{batch}, {values}]"),
            });
        }
        Ok(batch)
    }

    /// Training forward. A loss stage needs `labels` (one class per row) and
    /// returns the mean loss as a `[1, 1]` matrix.
    pub fn forward_train(&self, x: Matrix, labels: Option<&[u32]>) -> Result<(Matrix, StageCache)> {
        self.forward_step(x, labels, Micro::default())
    }

    /// [`Stage::forward_step`] of micro-batch 0 of a batch of `batch_rows`
    /// rows.
    pub fn forward_micro(
        &self,
        x: Matrix,
        labels: Option<&[u32]>,
        batch_rows: usize,
    ) -> Result<(Matrix, StageCache)> {
        self.forward_step(
            x,
            labels,
            Micro {
                index: 0,
                batch_rows,
            },
        )
    }

    /// Training forward of one micro-batch of the current step: a loss
    /// stage divides by `micro.batch_rows` instead of the micro-batch's
    /// own rows (0 means those), so that the micro-batch losses and
    /// gradients add up to the whole batch's; dropout masks depend on the
    /// step and `micro.index`.
    pub fn forward_step(
        &self,
        x: Matrix,
        labels: Option<&[u32]>,
        micro: Micro,
    ) -> Result<(Matrix, StageCache)> {
        let batch = self.check_input(&x, "stage forward")?;
        let rows = if micro.batch_rows == 0 {
            batch
        } else {
            micro.batch_rows
        };
        if rows < batch {
            return Err(ModelError::Misuse(format!(
                "a micro-batch of {batch} rows in a batch of {rows}"
            )));
        }
        let ctx = Ctx {
            train: true,
            labels,
            batch_rows: rows,
            seed: self.seed,
            step: self.steps,
            micro: micro.index,
        };
        let mut saved = Vec::with_capacity(self.layers.len());
        let y = layer::forward_seq(&self.layers, x, &ctx, Some(&mut saved))?;
        Ok((
            y,
            StageCache {
                saved,
                rows: batch,
                micro: micro.index,
            },
        ))
    }

    /// Inference forward: no cache, no update. A loss stage passes its
    /// input through (the designer reads log-probabilities before the loss).
    pub fn forward_eval(&self, x: Matrix) -> Result<Matrix> {
        self.check_input(&x, "stage eval")?;
        let ctx = Ctx {
            train: false,
            labels: None,
            batch_rows: x.rows(),
            seed: self.seed,
            step: self.steps,
            micro: 0,
        };
        layer::forward_seq(&self.layers, x, &ctx, None)
    }

    /// Backward: consumes the cache of one forward, applies the update and
    /// returns the gradient with respect to the stage's input (or `None`
    /// when `need_input_grad` is false, as for the first stage, which saves
    /// the largest product of the step). A loss stage takes no `grad_out`.
    pub fn backward(
        &mut self,
        cache: StageCache,
        grad_out: Option<Matrix>,
        need_input_grad: bool,
    ) -> Result<Option<Matrix>> {
        let micro = cache.micro;
        let dx = self.backward_micro(cache, grad_out, need_input_grad, micro)?;
        self.apply();
        Ok(dx)
    }

    /// The shape the output gradient of a backward on `cache` must have:
    /// `[rows, output values]` (none for a loss stage). Checked before any
    /// math.
    fn check_grad(&self, cache: &StageCache, grad_out: Option<&Matrix>) -> Result<()> {
        if self.spec.is_loss() {
            return Ok(());
        }
        let Some(g) = grad_out else {
            return Ok(());
        };
        let want = self.spec.output().numel();
        if g.rows() != cache.rows || (g.cols() != want && !self.spec.is_identity()) {
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
    /// one update. A gradient whose shape does not fit the cache is
    /// refused before anything changes.
    pub fn backward_micro(
        &mut self,
        cache: StageCache,
        grad_out: Option<Matrix>,
        need_input_grad: bool,
        micro: u32,
    ) -> Result<Option<Matrix>> {
        if cache.saved.len() != self.layers.len() {
            return Err(ModelError::Misuse("cache from another stage".into()));
        }
        if self.pending.contains(&micro) {
            return Err(ModelError::Misuse(format!(
                "micro-batch {micro} of step {} twice",
                self.steps
            )));
        }
        self.check_grad(&cache, grad_out.as_ref())?;
        // Gradients are kept aside until the whole backward has
        // succeeded, so a refused backward changes nothing.
        let mut grads = Vec::new();
        let dx = layer::backward_seq(
            &self.layers,
            cache.saved,
            grad_out,
            need_input_grad,
            &mut grads,
        )?;
        let mut params = Vec::new();
        layer::params_of_mut(&mut self.layers, &mut params);
        let mut grads_by_id: Vec<Option<Vec<f32>>> = Vec::new();
        let mut stats = Vec::new();
        for g in grads {
            match g {
                Grad::Param(id, v) => {
                    if grads_by_id.len() <= id {
                        grads_by_id.resize(id + 1, None);
                    }
                    grads_by_id[id] = Some(v);
                }
                Grad::Stats(id, mean, var) => stats.push((id, mean, var)),
            }
        }
        for (_, p) in params {
            if let Some(g) = grads_by_id.get_mut(p.id).and_then(Option::take) {
                p.pending.push((micro, g));
            }
        }
        let mut running = Vec::new();
        layer::running_of_mut(&mut self.layers, &mut running);
        for (id, mean, var) in stats {
            if let Some((_, _, r)) = running.iter_mut().find(|(_, lid, _)| *lid == id) {
                r.pending.push((micro, mean, var));
            }
        }
        self.pending.push(micro);
        Ok(dx)
    }

    /// The gradients waiting for [`Stage::apply`], each parameter's added
    /// in micro-batch order (what the update will use), named as in
    /// [`Stage::params`]; parameters without one are left out.
    pub fn pending_gradients(&self) -> Vec<NamedParam> {
        let mut params = Vec::new();
        layer::params_of(&self.layers, &mut params);
        let mut out = Vec::new();
        for (name, p) in params {
            let mut pending: Vec<&(u32, Vec<f32>)> = p.pending.iter().collect();
            pending.sort_by_key(|(m, _)| *m);
            let mut grads = pending.into_iter().map(|(_, g)| g);
            if let Some(first) = grads.next() {
                let mut sum = first.clone();
                for g in grads {
                    ops::add_assign(&mut sum, g);
                }
                out.push(named(name, &p.shape, &sum));
            }
        }
        out
    }

    /// Micro-batches of the current step whose gradients wait for
    /// [`Stage::apply`].
    pub fn pending_micros(&self) -> usize {
        self.pending.len()
    }

    /// Applies the current step's update: the gradients of its
    /// micro-batches, added in micro-batch order, one optimiser step; the
    /// running statistics take each micro-batch's batch statistics in
    /// micro-batch order. Moves the stage to the next step.
    pub fn apply(&mut self) {
        let opt = self.opt;
        let t = self.steps + 1;
        let mut params = Vec::new();
        layer::params_of_mut(&mut self.layers, &mut params);
        for (_, p) in params {
            let mut pending = std::mem::take(&mut p.pending);
            pending.sort_by_key(|(m, _)| *m);
            let mut grads = pending.into_iter().map(|(_, g)| g);
            let Some(mut sum) = grads.next() else {
                continue;
            };
            for g in grads {
                ops::add_assign(&mut sum, &g);
            }
            opt.step(&mut p.value, &mut p.buffers, sum, t);
        }
        let mut running = Vec::new();
        layer::running_of_mut(&mut self.layers, &mut running);
        for (_, _, r) in running {
            let mut pending = std::mem::take(&mut r.pending);
            pending.sort_by_key(|(m, _, _)| *m);
            for (_, mean, var) in pending {
                norm::update_running(&mut r.mean, &mean, r.momentum);
                norm::update_running(&mut r.var, &var, r.momentum);
            }
        }
        self.pending.clear();
        self.steps += 1;
    }

    /// The shape a tensor message entering this stage must have after its
    /// batch axis (an identity stage takes any).
    fn decode_input(&self, input: &[u8]) -> Result<(Matrix, Vec<usize>)> {
        let t = TensorBytes::decode(input)?;
        let shape = t.shape.clone();
        let m = if self.spec.is_identity() {
            t.into_rows()?
        } else {
            t.into_batch(&self.spec.input)?
        };
        Ok((m, shape))
    }

    /// Encodes an output: `[batch, output shape…]`, or the input's shape
    /// for an identity stage, `[1, 1]` for a loss.
    fn encode_output(&self, y: &Matrix, input_shape: &[usize], loss: bool) -> Vec<u8> {
        if loss {
            return TensorBytes::encode_f32(&[1, 1], y.as_slice());
        }
        if self.spec.is_identity() {
            return TensorBytes::encode_f32(input_shape, y.as_slice());
        }
        TensorBytes::encode_f32(&self.spec.output().batched(y.rows()), y.as_slice())
    }

    /// [`Stage::forward_train`] on a tensor message: exactly what a node
    /// serves. Returns the output message and the cache for backward.
    pub fn forward_bytes(
        &self,
        input: &[u8],
        labels: Option<&[u32]>,
    ) -> Result<(Vec<u8>, StageCache)> {
        self.forward_step_bytes(input, labels, Micro::default())
    }

    /// [`Stage::forward_micro`] on a tensor message (micro-batch 0).
    pub fn forward_micro_bytes(
        &self,
        input: &[u8],
        labels: Option<&[u32]>,
        batch_rows: usize,
    ) -> Result<(Vec<u8>, StageCache)> {
        self.forward_step_bytes(
            input,
            labels,
            Micro {
                index: 0,
                batch_rows,
            },
        )
    }

    /// [`Stage::forward_step`] on a tensor message.
    pub fn forward_step_bytes(
        &self,
        input: &[u8],
        labels: Option<&[u32]>,
        micro: Micro,
    ) -> Result<(Vec<u8>, StageCache)> {
        let (x, shape) = self.decode_input(input)?;
        let (y, cache) = self.forward_step(x, labels, micro)?;
        let loss = self.spec.is_loss();
        Ok((self.encode_output(&y, &shape, loss), cache))
    }

    /// [`Stage::backward`] on tensor messages.
    pub fn backward_bytes(
        &mut self,
        cache: StageCache,
        grad_out: Option<&[u8]>,
        need_input_grad: bool,
    ) -> Result<Option<Vec<u8>>> {
        let micro = cache.micro;
        let dx = self.backward_micro_bytes(cache, grad_out, need_input_grad, micro)?;
        self.apply();
        Ok(dx)
    }

    /// [`Stage::backward_micro`] on tensor messages: the gradient message
    /// must have the stage's output shape, the result has its input shape.
    pub fn backward_micro_bytes(
        &mut self,
        cache: StageCache,
        grad_out: Option<&[u8]>,
        need_input_grad: bool,
        micro: u32,
    ) -> Result<Option<Vec<u8>>> {
        let (g, shape) = match grad_out {
            Some(b) => {
                let t = TensorBytes::decode(b)?;
                let shape = t.shape.clone();
                let m = if self.spec.is_identity() {
                    t.into_rows()?
                } else {
                    t.into_batch(&self.spec.output())?
                };
                (Some(m), shape)
            }
            None => (None, Vec::new()),
        };
        let rows = cache.rows;
        Ok(self
            .backward_micro(cache, g, need_input_grad, micro)?
            .map(|t| {
                if self.spec.is_identity() {
                    TensorBytes::encode_f32(&shape, t.as_slice())
                } else {
                    TensorBytes::encode_f32(&self.spec.input.batched(rows), t.as_slice())
                }
            }))
    }

    /// [`Stage::forward_eval`] on tensor messages.
    pub fn eval_bytes(&self, input: &[u8]) -> Result<Vec<u8>> {
        let (x, shape) = self.decode_input(input)?;
        let y = self.forward_eval(x)?;
        if self.spec.is_identity() {
            return Ok(TensorBytes::encode_f32(&shape, y.as_slice()));
        }
        // A loss stage passes its input (the log-probabilities) through.
        let out: Shape = if self.spec.is_loss() {
            let shapes = self.spec.shapes();
            shapes[shapes.len() - 2].clone()
        } else {
            self.spec.output()
        };
        Ok(TensorBytes::encode_f32(
            &out.batched(y.rows()),
            y.as_slice(),
        ))
    }

    /// The stage's weights, in op order (NaNs canonical): trainable
    /// parameters, and batch norms' running statistics after each one's
    /// weight and bias.
    pub fn params(&self) -> Vec<NamedParam> {
        let mut params = Vec::new();
        layer::params_of(&self.layers, &mut params);
        let mut running = Vec::new();
        layer::running_of(&self.layers, &mut running);
        let mut out = Vec::new();
        for (name, p) in params {
            out.push(named(name.clone(), &p.shape, &p.value));
            // A batch norm's statistics follow its bias.
            if let Some(path) = name.strip_suffix(".bias") {
                if let Some((_, r)) = running.iter().find(|(rp, _)| rp == path) {
                    out.push(named(
                        format!("{path}.running_mean"),
                        &[r.mean.len()],
                        &r.mean,
                    ));
                    out.push(named(format!("{path}.running_var"), &[r.var.len()], &r.var));
                }
            }
        }
        out
    }

    /// Replaces the weights (and clears the optimiser's buffers) from
    /// exported tensors. Every tensor is checked before any is replaced.
    pub fn load_params(&mut self, params: &[NamedParam]) -> Result<()> {
        let find = |name: &str| {
            params
                .iter()
                .find(|p| p.name == name)
                .ok_or_else(|| ModelError::Misuse(format!("parameter {name} missing")))
        };
        for want in self.params() {
            let got = find(&want.name)?;
            expect_shape(&want.name, &got.shape, &want.shape)?;
            expect_len(&want.name, got.values.len(), &want.shape)?;
        }
        let mut ps = Vec::new();
        layer::params_of_mut(&mut self.layers, &mut ps);
        for (name, p) in ps {
            p.value = find(&name)?.values.clone();
            p.buffers = None;
        }
        let mut running = Vec::new();
        layer::running_of_mut(&mut self.layers, &mut running);
        for (path, _, r) in running {
            r.mean = find(&format!("{path}.running_mean"))?.values.clone();
            r.var = find(&format!("{path}.running_var"))?.values.clone();
        }
        Ok(())
    }
}

/// Everything a stage needs to continue training where it stopped: its
/// weights, the optimiser's buffers and its step counter (a checkpoint).
#[derive(Debug, Clone, PartialEq)]
pub struct StageState {
    /// Training steps applied.
    pub steps: u64,
    /// The weights (as [`Stage::params`]), then the optimiser's buffers of
    /// each parameter, named `"{param}.velocity"` (SGD) or
    /// `"{param}.exp_avg"` and `"{param}.exp_avg_sq"` (Adam), absent before
    /// the first update.
    pub tensors: Vec<NamedParam>,
}

impl Stage {
    /// The stage's state, for a checkpoint (NaNs canonical).
    pub fn state(&self) -> StageState {
        let mut tensors = self.params();
        let mut params = Vec::new();
        layer::params_of(&self.layers, &mut params);
        let names = self.opt.buffers();
        for (name, p) in params {
            if let Some(bufs) = &p.buffers {
                for (suffix, b) in names.iter().zip(bufs) {
                    tensors.push(named(format!("{name}.{suffix}"), &p.shape, b));
                }
            }
        }
        StageState {
            steps: self.steps,
            tensors,
        }
    }

    /// Restores a state from [`Stage::state`]: weights, optimiser buffers
    /// and the step counter. Gradients waiting for an update are dropped.
    /// Every tensor is checked (shapes, no unknown names, buffers all or
    /// none) before anything changes.
    pub fn load_state(&mut self, state: &StageState) -> Result<()> {
        let find = |name: &str| state.tensors.iter().find(|p| p.name == name);
        let names = self.opt.buffers();
        let mut known: Vec<String> = self.params().into_iter().map(|p| p.name).collect();
        {
            let mut params = Vec::new();
            layer::params_of(&self.layers, &mut params);
            for (name, p) in &params {
                let present: Vec<bool> = names
                    .iter()
                    .map(|suffix| {
                        let n = format!("{name}.{suffix}");
                        let found = find(&n);
                        known.push(n.clone());
                        found.is_some()
                    })
                    .collect();
                if present.iter().any(|b| *b) && !present.iter().all(|b| *b) {
                    return Err(ModelError::Misuse(format!(
                        "state of {name}: some optimiser buffers missing"
                    )));
                }
                for suffix in names {
                    let n = format!("{name}.{suffix}");
                    if let Some(b) = find(&n) {
                        expect_shape(&n, &b.shape, &p.shape)?;
                        expect_len(&n, b.values.len(), &p.shape)?;
                    }
                }
            }
        }
        if let Some(extra) = state.tensors.iter().find(|t| !known.contains(&t.name)) {
            return Err(ModelError::Misuse(format!(
                "state holds an unknown tensor {}",
                extra.name
            )));
        }
        self.load_params(&state.tensors)?;
        let mut params = Vec::new();
        layer::params_of_mut(&mut self.layers, &mut params);
        for (name, p) in params {
            let bufs: Option<Vec<Vec<f32>>> = names
                .iter()
                .map(|suffix| find(&format!("{name}.{suffix}")).map(|b| b.values.clone()))
                .collect();
            p.buffers = bufs.filter(|b| !b.is_empty());
            p.pending.clear();
        }
        let mut running = Vec::new();
        layer::running_of_mut(&mut self.layers, &mut running);
        for (_, _, r) in running {
            r.pending.clear();
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

fn expect_len(name: &str, len: usize, shape: &[usize]) -> Result<()> {
    let want: usize = shape.iter().product();
    if len != want {
        return Err(ModelError::Shape {
            context: "load parameters",
            expected: format!("{name}: {want} values"),
            actual: format!("{len} values"),
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
