//! The model description: a model is a list of stages, a stage a list of ops.
//!
//! ```toml
//! name = "tiny-cnn"
//! input = [1, 28, 28]    # the shape of one sample (a plain number: flat features)
//!
//! [optimizer]            # optional: SGD lr 0.01 momentum 0.9 by default
//! kind = "sgd"
//! lr = 0.01
//! momentum = 0.9
//!
//! [[stage]]
//! ops = [{ op = "conv2d", in = 1, out = 8, kernel = 3, padding = 1 }, { op = "relu" },
//!        { op = "max_pool2d", kernel = 2 }]
//!
//! [[stage]]
//! ops = [{ op = "flatten" }, { op = "linear", in = 1568, out = 10 },
//!        { op = "log_softmax" }, { op = "nll_loss" }]
//! ```
//!
//! Every op derives its output [`Shape`] from its input's
//! ([`OpSpec::output_shape`]); [`ModelSpec::from_stages`] checks the whole
//! chain and fails in one line that names the stage, the op and both shapes.
//! The binary form a hop receives in its init note is here too
//! ([`StageSpec::encode`] / [`StageSpec::decode`]), next to the ops it
//! encodes, so an op without a wire code does not compile.
//!
//! Over 600 lines: the model-file language: every op's TOML form, its
//! checks, its shape rule and its binary form (init notes) in one match
//! each, so that adding an op touches one file; the tests are at the end.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::optim::Optimizer;

/// The shape of one sample (the batch axis is not part of it): `[784]` for
/// flat features, `[channels, height, width]` for images.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Shape(pub Vec<usize>);

/// Most dimensions of a sample's shape (a tensor message adds the batch).
pub const MAX_SAMPLE_RANK: usize = 4;

impl Shape {
    /// Flat features.
    pub fn flat(features: usize) -> Self {
        Shape(vec![features])
    }

    /// `[channels, height, width]`.
    pub fn image(channels: usize, height: usize, width: usize) -> Self {
        Shape(vec![channels, height, width])
    }

    /// Values per sample (the product of the dimensions).
    pub fn numel(&self) -> usize {
        self.0.iter().product()
    }

    /// The dimensions.
    pub fn dims(&self) -> &[usize] {
        &self.0
    }

    /// `[c, h, w]` of an image shape.
    pub fn chw(&self) -> Option<[usize; 3]> {
        match self.0.as_slice() {
            [c, h, w] => Some([*c, *h, *w]),
            _ => None,
        }
    }

    /// The features of a flat shape.
    pub fn features(&self) -> Option<usize> {
        match self.0.as_slice() {
            [f] => Some(*f),
            _ => None,
        }
    }

    /// `[batch, dims…]`: the shape of a tensor message of `batch` samples.
    pub fn batched(&self, batch: usize) -> Vec<usize> {
        let mut v = Vec::with_capacity(self.0.len() + 1);
        v.push(batch);
        v.extend_from_slice(&self.0);
        v
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dims: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        write!(f, "[{}]", dims.join(", "))
    }
}

fn one() -> usize {
    1
}
fn yes() -> bool {
    true
}
fn bn_eps() -> f32 {
    1e-5
}
fn bn_momentum() -> f32 {
    0.1
}

/// One operation inside a stage, with its dimensions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum OpSpec {
    /// `y = x·W + b`, `W` of shape `[in, out]`, on flat inputs.
    Linear {
        /// Input features.
        #[serde(rename = "in")]
        input: usize,
        /// Output features.
        #[serde(rename = "out")]
        output: usize,
    },
    /// `(x − mean) / std`, elementwise: torchvision's `Normalize` as an op,
    /// so the first stage sees what a PyTorch pipeline feeds its model.
    Normalize {
        /// Subtracted from every input.
        mean: f32,
        /// Divides every input (finite, non-zero).
        std: f32,
    },
    /// `max(x, 0)`, elementwise.
    Relu,
    /// Identity: forwards activations unchanged.
    Identity,
    /// `x − log Σ exp(x)` over the feature axis (flat inputs).
    LogSoftmax,
    /// Mean negative log-likelihood of the labelled class; ends a model.
    NllLoss,
    /// 2-D convolution (PyTorch's `Conv2d` with square kernel, stride and
    /// zero padding), weight `[out, in, kernel, kernel]`.
    Conv2d {
        /// Input channels.
        #[serde(rename = "in")]
        in_channels: usize,
        /// Output channels.
        #[serde(rename = "out")]
        out_channels: usize,
        /// Kernel height and width.
        kernel: usize,
        /// Step between windows (1 by default).
        #[serde(default = "one")]
        stride: usize,
        /// Zeros added on each side (0 by default; less than `kernel`).
        #[serde(default)]
        padding: usize,
        /// Whether the op adds a bias per output channel (yes by default).
        #[serde(default = "yes")]
        bias: bool,
    },
    /// Maximum over square windows (padding counts as −∞).
    MaxPool2d {
        /// Window height and width.
        kernel: usize,
        /// Step between windows (the kernel by default).
        stride: Option<usize>,
        /// −∞ added on each side (0 by default; at most half the kernel).
        #[serde(default)]
        padding: usize,
    },
    /// Mean over square windows (zero padding counted, PyTorch's
    /// `count_include_pad=True`).
    AvgPool2d {
        /// Window height and width.
        kernel: usize,
        /// Step between windows (the kernel by default).
        stride: Option<usize>,
        /// Zeros added on each side (0 by default; at most half the kernel).
        #[serde(default)]
        padding: usize,
    },
    /// Mean over each channel's plane: `[c, h, w]` to `[c, 1, 1]`
    /// (PyTorch's `AdaptiveAvgPool2d(1)`).
    GlobalAvgPool,
    /// Batch normalisation over `[n, h, w]` per channel: batch statistics
    /// in training (which also update the running ones), running statistics
    /// in evaluation.
    BatchNorm2d {
        /// Channels.
        channels: usize,
        /// Added to the variance (1e-5 by default).
        #[serde(default = "bn_eps")]
        eps: f32,
        /// Weight of a batch's statistics in the running ones (0.1 by default).
        #[serde(default = "bn_momentum")]
        momentum: f32,
    },
    /// Zeroes each value with probability `p` in training and scales the
    /// rest by `1 / (1 − p)`; the identity in evaluation. The mask comes
    /// from the stage's seed, the step, the micro-batch and the op.
    Dropout {
        /// Probability of zeroing a value, in `[0, 1)`.
        p: f32,
    },
    /// `[c, h, w]` (or any shape) to flat features, in row-major order.
    Flatten,
    /// `y = f(x) + s(x)`: `f` the ops of `ops`, `s` those of `shortcut`
    /// (the identity when empty), both inside one stage (a ResNet block).
    Residual {
        /// The residual branch.
        ops: Vec<OpSpec>,
        /// The shortcut branch (empty: `x` itself).
        #[serde(default)]
        shortcut: Vec<OpSpec>,
    },
}

/// The names accepted in the `op` key, for error messages.
pub const KNOWN_OPS: &[&str] = &[
    "linear",
    "normalize",
    "relu",
    "identity",
    "log_softmax",
    "nll_loss",
    "conv2d",
    "max_pool2d",
    "avg_pool2d",
    "global_avg_pool",
    "batch_norm2d",
    "dropout",
    "flatten",
    "residual",
];

/// Largest dimension (features, channels, kernel, image side) a model may
/// name: bounds what a hop builds from an init note.
pub const MAX_DIM: usize = 1 << 20;
/// Most ops in a stage, nested ops included.
pub const MAX_OPS: usize = 64;
/// Deepest nesting of residual blocks.
pub const MAX_NESTING: usize = 2;

impl OpSpec {
    /// The name written in the `op` key.
    pub fn name(&self) -> &'static str {
        match self {
            OpSpec::Linear { .. } => "linear",
            OpSpec::Normalize { .. } => "normalize",
            OpSpec::Relu => "relu",
            OpSpec::Identity => "identity",
            OpSpec::LogSoftmax => "log_softmax",
            OpSpec::NllLoss => "nll_loss",
            OpSpec::Conv2d { .. } => "conv2d",
            OpSpec::MaxPool2d { .. } => "max_pool2d",
            OpSpec::AvgPool2d { .. } => "avg_pool2d",
            OpSpec::GlobalAvgPool => "global_avg_pool",
            OpSpec::BatchNorm2d { .. } => "batch_norm2d",
            OpSpec::Dropout { .. } => "dropout",
            OpSpec::Flatten => "flatten",
            OpSpec::Residual { .. } => "residual",
        }
    }

    /// Whether the op (or an op nested in it) holds trainable parameters.
    pub fn has_params(&self) -> bool {
        match self {
            OpSpec::Linear { .. } | OpSpec::Conv2d { .. } | OpSpec::BatchNorm2d { .. } => true,
            OpSpec::Residual { ops, shortcut } => {
                ops.iter().chain(shortcut).any(OpSpec::has_params)
            }
            _ => false,
        }
    }

    /// Whether the op keeps state a step changes besides its parameters'
    /// gradients (batch norm's running statistics), or nests one that does.
    pub fn has_buffers(&self) -> bool {
        match self {
            OpSpec::BatchNorm2d { .. } => true,
            OpSpec::Residual { ops, shortcut } => {
                ops.iter().chain(shortcut).any(OpSpec::has_buffers)
            }
            _ => false,
        }
    }

    /// Trainable values of the op (and the ops nested in it).
    pub fn param_count(&self) -> usize {
        match *self {
            OpSpec::Linear { input, output } => (input + 1) * output,
            OpSpec::Conv2d {
                in_channels,
                out_channels,
                kernel,
                bias,
                ..
            } => out_channels * in_channels * kernel * kernel + if bias { out_channels } else { 0 },
            OpSpec::BatchNorm2d { channels, .. } => 2 * channels,
            OpSpec::Residual {
                ref ops,
                ref shortcut,
            } => ops.iter().chain(shortcut).map(OpSpec::param_count).sum(),
            _ => 0,
        }
    }

    /// Values of the op's buffers (batch norm's running mean and variance).
    pub fn buffer_count(&self) -> usize {
        match self {
            OpSpec::BatchNorm2d { channels, .. } => 2 * channels,
            OpSpec::Residual { ops, shortcut } => {
                ops.iter().chain(shortcut).map(OpSpec::buffer_count).sum()
            }
            _ => 0,
        }
    }

    /// Whether the op changes nothing about its input, in training and
    /// evaluation, forward and backward (what a dummy hop may run without
    /// changing the result).
    pub fn is_identity(&self) -> bool {
        matches!(self, OpSpec::Identity)
    }

    /// Ops nested in this one (a residual block's branches), in order.
    pub fn nested(&self) -> impl Iterator<Item = &OpSpec> {
        let (a, b): (&[OpSpec], &[OpSpec]) = match self {
            OpSpec::Residual { ops, shortcut } => (ops, shortcut),
            _ => (&[], &[]),
        };
        a.iter().chain(b)
    }

    /// The output shape for an input of shape `input`, or why the op
    /// cannot take it.
    pub fn output_shape(&self, input: &Shape) -> std::result::Result<Shape, String> {
        let need_image = || {
            input
                .chw()
                .ok_or_else(|| format!("needs an image input [c, h, w], got {input}"))
        };
        let need_flat = || {
            input
                .features()
                .ok_or_else(|| format!("needs flat features, got {input} (add a flatten op)"))
        };
        let window = |side: usize, kernel: usize, stride: usize, padding: usize| {
            let padded = side + 2 * padding;
            if padded < kernel {
                Err(format!(
                    "a {kernel}×{kernel} window does not fit an input of {input} with padding {padding}"
                ))
            } else {
                Ok((padded - kernel) / stride + 1)
            }
        };
        match *self {
            OpSpec::Linear { input: i, output } => {
                let f = need_flat()?;
                if f != i {
                    return Err(format!("expects {i} input features but gets {input}"));
                }
                check_dim("out", output)?;
                Ok(Shape::flat(output))
            }
            OpSpec::Normalize { mean, std } => {
                if !mean.is_finite() || !std.is_finite() || std == 0.0 {
                    return Err(format!(
                        "needs a finite mean and a finite, non-zero std, got {mean} and {std}"
                    ));
                }
                Ok(input.clone())
            }
            OpSpec::Relu | OpSpec::Identity => Ok(input.clone()),
            OpSpec::LogSoftmax => {
                need_flat()?;
                Ok(input.clone())
            }
            OpSpec::NllLoss => {
                let classes = need_flat()?;
                if classes < 2 {
                    return Err(format!("needs at least 2 classes, got {input}"));
                }
                Ok(Shape::flat(1))
            }
            OpSpec::Conv2d {
                in_channels,
                out_channels,
                kernel,
                stride,
                padding,
                ..
            } => {
                let [c, h, w] = need_image()?;
                for (name, v) in [
                    ("in", in_channels),
                    ("out", out_channels),
                    ("kernel", kernel),
                    ("stride", stride),
                ] {
                    check_dim(name, v)?;
                }
                if c != in_channels {
                    return Err(format!(
                        "expects {in_channels} input channels but gets {input}"
                    ));
                }
                if padding >= kernel {
                    return Err(format!(
                        "padding {padding} must be less than the kernel {kernel}"
                    ));
                }
                Ok(Shape::image(
                    out_channels,
                    window(h, kernel, stride, padding)?,
                    window(w, kernel, stride, padding)?,
                ))
            }
            OpSpec::MaxPool2d {
                kernel,
                stride,
                padding,
            }
            | OpSpec::AvgPool2d {
                kernel,
                stride,
                padding,
            } => {
                let [c, h, w] = need_image()?;
                let stride = stride.unwrap_or(kernel);
                check_dim("kernel", kernel)?;
                check_dim("stride", stride)?;
                if 2 * padding > kernel {
                    return Err(format!(
                        "padding {padding} must be at most half the kernel {kernel}"
                    ));
                }
                Ok(Shape::image(
                    c,
                    window(h, kernel, stride, padding)?,
                    window(w, kernel, stride, padding)?,
                ))
            }
            OpSpec::GlobalAvgPool => {
                let [c, _, _] = need_image()?;
                Ok(Shape::image(c, 1, 1))
            }
            OpSpec::BatchNorm2d {
                channels,
                eps,
                momentum,
            } => {
                let [c, _, _] = need_image()?;
                if c != channels {
                    return Err(format!("expects {channels} channels but gets {input}"));
                }
                if !(eps > 0.0 && eps.is_finite() && (0.0..=1.0).contains(&momentum)) {
                    return Err(format!(
                        "needs eps > 0 and momentum in [0, 1], got {eps} and {momentum}"
                    ));
                }
                Ok(input.clone())
            }
            OpSpec::Dropout { p } => {
                if !(0.0..1.0).contains(&p) {
                    return Err(format!("p must be in [0, 1), got {p}"));
                }
                Ok(input.clone())
            }
            OpSpec::Flatten => Ok(Shape::flat(input.numel())),
            OpSpec::Residual {
                ref ops,
                ref shortcut,
            } => {
                if ops.is_empty() {
                    return Err("the residual branch has no ops".into());
                }
                let mut f = input.clone();
                for op in ops {
                    if matches!(op, OpSpec::NllLoss) {
                        return Err("nll_loss cannot be inside a residual block".into());
                    }
                    f = op
                        .output_shape(&f)
                        .map_err(|e| format!("inside, {}: {e}", op.name()))?;
                }
                let mut s = input.clone();
                for op in shortcut {
                    if matches!(op, OpSpec::NllLoss) {
                        return Err("nll_loss cannot be inside a residual block".into());
                    }
                    s = op
                        .output_shape(&s)
                        .map_err(|e| format!("shortcut, {}: {e}", op.name()))?;
                }
                if f != s {
                    return Err(format!(
                        "the branch gives {f} but the shortcut gives {s}: they must match"
                    ));
                }
                Ok(f)
            }
        }
    }
}

fn check_dim(name: &str, v: usize) -> std::result::Result<(), String> {
    if v == 0 || v > MAX_DIM {
        return Err(format!("`{name}` must be in 1..={MAX_DIM}, got {v}"));
    }
    Ok(())
}

impl fmt::Display for OpSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpSpec::Linear { input, output } => write!(f, "linear({input}, {output})"),
            OpSpec::Normalize { mean, std } => write!(f, "normalize({mean:?}, {std:?})"),
            OpSpec::Conv2d {
                in_channels,
                out_channels,
                kernel,
                stride,
                padding,
                ..
            } => write!(
                f,
                "conv2d({in_channels}, {out_channels}, {kernel}×{kernel}, stride {stride}, padding {padding})"
            ),
            OpSpec::MaxPool2d { kernel, .. } => write!(f, "max_pool2d({kernel})"),
            OpSpec::AvgPool2d { kernel, .. } => write!(f, "avg_pool2d({kernel})"),
            OpSpec::BatchNorm2d { channels, .. } => write!(f, "batch_norm2d({channels})"),
            OpSpec::Dropout { p } => write!(f, "dropout({p})"),
            OpSpec::Residual { ops, shortcut } => {
                let list = |ops: &[OpSpec]| {
                    ops.iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                write!(f, "residual[{}]", list(ops))?;
                if !shortcut.is_empty() {
                    write!(f, "+[{}]", list(shortcut))?;
                }
                Ok(())
            }
            other => f.write_str(other.name()),
        }
    }
}

/// The slice of a model that one server runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageSpec {
    /// The shape of one sample entering the stage.
    pub input: Shape,
    /// The ops, applied in order.
    pub ops: Vec<OpSpec>,
}

impl StageSpec {
    /// The shape of one sample leaving the stage (`[1]` for a loss stage).
    /// The ops are assumed to chain (as in a [`ModelSpec`] or a decoded
    /// init note); one that does not leaves the shape as it was.
    pub fn output(&self) -> Shape {
        self.ops
            .iter()
            .fold(self.input.clone(), |s, op| op.output_shape(&s).unwrap_or(s))
    }

    /// The shape entering each op, and after the last: `ops.len() + 1`
    /// shapes.
    pub fn shapes(&self) -> Vec<Shape> {
        let mut out = vec![self.input.clone()];
        for op in &self.ops {
            let next = op
                .output_shape(out.last().unwrap_or(&self.input))
                .unwrap_or_else(|_| out.last().cloned().unwrap_or_else(|| self.input.clone()));
            out.push(next);
        }
        out
    }

    /// The shape of one sample leaving the stage in evaluation (a test):
    /// a loss stage passes the log-probabilities entering its loss through.
    pub fn eval_output(&self) -> Shape {
        if self.is_loss() {
            let shapes = self.shapes();
            shapes[shapes.len().saturating_sub(2)].clone()
        } else {
            self.output()
        }
    }

    /// Values a training forward of `rows` samples computes and may keep
    /// (its input, every op's output, nested ops' too, and one image's
    /// scratch per convolution: columns or a padded copy): an upper bound
    /// of its cache and of the peak of its computation, from the
    /// description alone.
    pub fn forward_values(&self, rows: usize) -> u64 {
        fn walk(ops: &[OpSpec], input: &Shape, rows: u64) -> u64 {
            let mut shape = input.clone();
            let mut total = 0u64;
            for op in ops {
                let out = op.output_shape(&shape).unwrap_or_else(|_| shape.clone());
                total = total.saturating_add((out.numel() as u64).saturating_mul(rows));
                match op {
                    OpSpec::Conv2d {
                        in_channels,
                        kernel,
                        ..
                    } => {
                        // One image's columns (the most a convolution's
                        // scratch takes) at a time per kernel thread.
                        let [_, ho, wo] = out.chw().unwrap_or([0, 0, 0]);
                        let cols = (in_channels * kernel * kernel * ho * wo) as u64;
                        total = total.saturating_add(cols);
                    }
                    OpSpec::Residual { ops, shortcut } => {
                        total = total
                            .saturating_add(walk(ops, &shape, rows))
                            .saturating_add(walk(shortcut, &shape, rows));
                    }
                    _ => {}
                }
                shape = out;
            }
            total
        }
        let rows = rows as u64;
        (self.input.numel() as u64)
            .saturating_mul(rows)
            .saturating_add(walk(&self.ops, &self.input, rows))
    }

    /// Ops of the stage, nested ones included.
    pub fn op_count(&self) -> usize {
        self.ops.iter().map(count_ops).sum()
    }

    /// Whether this stage ends with the loss and so needs labels.
    pub fn is_loss(&self) -> bool {
        matches!(self.ops.last(), Some(OpSpec::NllLoss))
    }

    /// Whether the stage holds trainable parameters.
    pub fn has_params(&self) -> bool {
        self.ops.iter().any(OpSpec::has_params)
    }

    /// Trainable values of the stage.
    pub fn param_count(&self) -> usize {
        self.ops.iter().map(OpSpec::param_count).sum()
    }

    /// Values of the stage's buffers (running statistics).
    pub fn buffer_count(&self) -> usize {
        self.ops.iter().map(OpSpec::buffer_count).sum()
    }

    /// Whether every op is the identity: what a dummy hop with nothing
    /// moved onto it runs. Such a stage passes any shape through.
    pub fn is_identity(&self) -> bool {
        self.ops.iter().all(OpSpec::is_identity)
    }

    /// A stage that changes nothing: what a dummy hop runs when no op can
    /// be moved onto it.
    pub fn identity(input: Shape) -> Self {
        StageSpec {
            input,
            ops: vec![OpSpec::Identity],
        }
    }

    /// Checks the stage alone (as a hop does with its init note): the ops
    /// chain from its input, the loss only last, sizes within bounds.
    pub fn check(&self, stage_no: usize, last_stage: bool) -> Result<()> {
        check_shape(&self.input).map_err(|message| ModelError::Op {
            stage: stage_no,
            op: 0,
            op_name: "input".into(),
            message,
        })?;
        let count: usize = self.ops.iter().map(count_ops).sum();
        if self.ops.is_empty() || count > MAX_OPS {
            return Err(ModelError::Op {
                stage: stage_no,
                op: 0,
                op_name: "stage".into(),
                message: format!("needs 1..={MAX_OPS} ops, got {count}"),
            });
        }
        let mut shape = self.input.clone();
        let n = self.ops.len();
        for (oi, op) in self.ops.iter().enumerate() {
            let fail = |message: String| ModelError::Op {
                stage: stage_no,
                op: oi + 1,
                op_name: op.name().to_string(),
                message,
            };
            if matches!(op, OpSpec::NllLoss) && (!last_stage || oi + 1 != n) {
                return Err(fail(
                    "nll_loss must be the last op of the last stage".into(),
                ));
            }
            if nesting(op) > MAX_NESTING {
                return Err(fail(format!(
                    "residual blocks nest at most {MAX_NESTING} deep"
                )));
            }
            let out = op
                .output_shape(&shape)
                .map_err(|e| fail(format!("{e} (input {shape})")))?;
            check_shape(&out).map_err(|e| fail(format!("output {out}: {e}")))?;
            shape = out;
        }
        Ok(())
    }
}

fn count_ops(op: &OpSpec) -> usize {
    1 + op.nested().map(count_ops).sum::<usize>()
}

fn nesting(op: &OpSpec) -> usize {
    match op {
        OpSpec::Residual { .. } => 1 + op.nested().map(nesting).max().unwrap_or(0),
        _ => 0,
    }
}

fn check_shape(s: &Shape) -> std::result::Result<(), String> {
    if s.0.is_empty() || s.0.len() > MAX_SAMPLE_RANK {
        return Err(format!(
            "a sample shape has 1..={MAX_SAMPLE_RANK} dimensions, got {s}"
        ));
    }
    if s.0.contains(&0) {
        return Err(format!("a dimension is 0 in {s}"));
    }
    match s.0.iter().try_fold(1usize, |acc, d| acc.checked_mul(*d)) {
        Some(n) if n <= MAX_DIM * 16 => Ok(()),
        _ => Err(format!(
            "{s} has more than {} values per sample",
            MAX_DIM * 16
        )),
    }
}

/// A whole model: validated, so shapes chain and only the last op of the
/// last stage is a loss.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelSpec {
    /// A human name for the model.
    pub name: String,
    /// The shape of one sample entering the model.
    pub input: Shape,
    /// The stages, in cascade order.
    pub stages: Vec<StageSpec>,
    /// The optimiser the model file asks for (`None`: the command line's,
    /// SGD lr 0.01 momentum 0.9 by default).
    pub optimizer: Option<Optimizer>,
    /// The training images' augmentation the model file asks for
    /// (`[augment]`: random crops and flips), if any.
    pub augment: Option<crate::data::Augment>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    name: Option<String>,
    input: Option<RawShape>,
    #[serde(default)]
    stage: Vec<RawStage>,
    optimizer: Option<toml::Value>,
    augment: Option<crate::data::Augment>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawShape {
    Flat(usize),
    Dims(Vec<usize>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStage {
    #[serde(default)]
    ops: Vec<toml::Value>,
}

impl ModelSpec {
    /// Reads and validates a model description file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates a model description; `source_name` names it in
    /// errors.
    pub fn parse(text: &str, source_name: &str) -> Result<Self> {
        let spec_err = |message: String| ModelError::Spec {
            source_name: source_name.to_string(),
            message,
        };
        let raw: RawModel = toml::from_str(text)
            .map_err(|e| spec_err(e.message().to_string().replace('\n', " ")))?;
        let input = match raw.input {
            None => return Err(spec_err("missing `input` (the shape of one sample)".into())),
            Some(RawShape::Flat(f)) => Shape::flat(f),
            Some(RawShape::Dims(d)) => Shape(d),
        };
        check_shape(&input).map_err(|e| spec_err(format!("`input`: {e}")))?;
        if raw.stage.is_empty() {
            return Err(spec_err("the model has no [[stage]]".into()));
        }
        let mut stages = Vec::with_capacity(raw.stage.len());
        for (si, raw_stage) in raw.stage.iter().enumerate() {
            if raw_stage.ops.is_empty() {
                return Err(spec_err(format!("stage {} has no ops", si + 1)));
            }
            let mut ops = Vec::with_capacity(raw_stage.ops.len());
            for (oi, value) in raw_stage.ops.iter().enumerate() {
                ops.push(parse_op(value, si, oi)?);
            }
            stages.push(StageSpec {
                input: input.clone(),
                ops,
            });
        }
        let optimizer = raw
            .optimizer
            .map(|v| Optimizer::from_toml(&v).map_err(|e| spec_err(format!("[optimizer]: {e}"))))
            .transpose()?;
        let mut model =
            Self::from_stages(raw.name.unwrap_or_else(|| "model".into()), input, stages)?;
        model.optimizer = optimizer;
        model.augment = raw.augment;
        match (model.augment, model.input.chw()) {
            (Some(a), Some([_, h, w])) if a.crop >= h.min(w) => {
                return Err(spec_err(format!(
                    "[augment]: a crop padding of {} for images of {h}x{w}",
                    a.crop
                )));
            }
            (Some(_), None) => {
                return Err(spec_err("[augment] needs an image input [c, h, w]".into()));
            }
            _ => {}
        }
        Ok(model)
    }

    /// Builds a model from stages, filling in each stage's input shape and
    /// checking that shapes chain and that the loss comes last.
    pub fn from_stages(name: String, input: Shape, mut stages: Vec<StageSpec>) -> Result<Self> {
        if stages.is_empty() {
            return Err(ModelError::Spec {
                source_name: name,
                message: "the model has no stages".into(),
            });
        }
        let n = stages.len();
        let mut shape = input.clone();
        for (si, stage) in stages.iter_mut().enumerate() {
            stage.input = shape;
            stage.check(si + 1, si + 1 == n)?;
            shape = stage.output();
        }
        Ok(ModelSpec {
            name,
            input,
            stages,
            optimizer: None,
            augment: None,
        })
    }

    /// The optimiser of a run of this model: the model file's, else `sgd`
    /// (the command line's).
    pub fn optimizer_or(&self, sgd: crate::optim::Sgd) -> Optimizer {
        self.optimizer.unwrap_or_else(|| sgd.into())
    }

    /// Number of classes the loss expects (the width entering `nll_loss`).
    pub fn classes(&self) -> Option<usize> {
        let last = self.stages.last().filter(|s| s.is_loss())?;
        let shapes = last.shapes();
        shapes.get(shapes.len().checked_sub(2)?)?.features()
    }

    /// The model as TOML, parseable by [`ModelSpec::parse`].
    pub fn to_toml(&self) -> String {
        let input = match self.input.features() {
            Some(f) => f.to_string(),
            None => self.input.to_string(),
        };
        let mut out = format!("name = {:?}\ninput = {input}\n", self.name);
        if let Some(opt) = &self.optimizer {
            out.push_str("\n[optimizer]\n");
            out.push_str(&opt.to_toml());
        }
        if let Some(a) = &self.augment {
            out.push_str(&format!(
                "\n[augment]\ncrop = {}\nflip = {}\n",
                a.crop, a.flip
            ));
        }
        for stage in &self.stages {
            out.push_str("\n[[stage]]\nops = [");
            let ops: Vec<String> = stage.ops.iter().map(op_toml).collect();
            out.push_str(&ops.join(", "));
            out.push_str("]\n");
        }
        out
    }
}

fn op_toml(op: &OpSpec) -> String {
    let name = op.name();
    match op {
        OpSpec::Linear { input, output } => {
            format!("{{ op = \"linear\", in = {input}, out = {output} }}")
        }
        OpSpec::Normalize { mean, std } => {
            format!("{{ op = \"normalize\", mean = {mean:?}, std = {std:?} }}")
        }
        OpSpec::Conv2d {
            in_channels,
            out_channels,
            kernel,
            stride,
            padding,
            bias,
        } => format!(
            "{{ op = \"conv2d\", in = {in_channels}, out = {out_channels}, kernel = {kernel}, \
             stride = {stride}, padding = {padding}, bias = {bias} }}"
        ),
        OpSpec::MaxPool2d {
            kernel,
            stride,
            padding,
        }
        | OpSpec::AvgPool2d {
            kernel,
            stride,
            padding,
        } => format!(
            "{{ op = \"{name}\", kernel = {kernel}, stride = {}, padding = {padding} }}",
            stride.unwrap_or(*kernel)
        ),
        OpSpec::BatchNorm2d {
            channels,
            eps,
            momentum,
        } => format!(
            "{{ op = \"batch_norm2d\", channels = {channels}, eps = {eps:?}, momentum = {momentum:?} }}"
        ),
        OpSpec::Dropout { p } => format!("{{ op = \"dropout\", p = {p:?} }}"),
        OpSpec::Residual { ops, shortcut } => {
            let list = |ops: &[OpSpec]| ops.iter().map(op_toml).collect::<Vec<_>>().join(", ");
            if shortcut.is_empty() {
                format!("{{ op = \"residual\", ops = [{}] }}", list(ops))
            } else {
                format!(
                    "{{ op = \"residual\", ops = [{}], shortcut = [{}] }}",
                    list(ops),
                    list(shortcut)
                )
            }
        }
        other => format!("{{ op = \"{}\" }}", other.name()),
    }
}

fn parse_op(value: &toml::Value, si: usize, oi: usize) -> Result<OpSpec> {
    let name = value
        .get("op")
        .and_then(toml::Value::as_str)
        .unwrap_or("<missing>")
        .to_string();
    let fail = |message: String| ModelError::Op {
        stage: si + 1,
        op: oi + 1,
        op_name: name.clone(),
        message,
    };
    if !KNOWN_OPS.contains(&name.as_str()) {
        return Err(fail(format!(
            "unknown op (known: {})",
            KNOWN_OPS.join(", ")
        )));
    }
    check_names(value).map_err(fail)?;
    value
        .clone()
        .try_into::<OpSpec>()
        .map(canonical)
        .map_err(|e| fail(e.message().to_string().replace('\n', " ")))
}

/// A pooling op's stride written out (the kernel when left out), so a
/// model equals itself after a round trip through TOML or an init note.
fn canonical(op: OpSpec) -> OpSpec {
    match op {
        OpSpec::MaxPool2d {
            kernel,
            stride,
            padding,
        } => OpSpec::MaxPool2d {
            kernel,
            stride: Some(stride.unwrap_or(kernel)),
            padding,
        },
        OpSpec::AvgPool2d {
            kernel,
            stride,
            padding,
        } => OpSpec::AvgPool2d {
            kernel,
            stride: Some(stride.unwrap_or(kernel)),
            padding,
        },
        OpSpec::Residual { ops, shortcut } => OpSpec::Residual {
            ops: ops.into_iter().map(canonical).collect(),
            shortcut: shortcut.into_iter().map(canonical).collect(),
        },
        other => other,
    }
}

/// Every nested op names a known kind (the error names the unknown one).
fn check_names(value: &toml::Value) -> std::result::Result<(), String> {
    for key in ["ops", "shortcut"] {
        if let Some(list) = value.get(key).and_then(toml::Value::as_array) {
            for v in list {
                let name = v
                    .get("op")
                    .and_then(toml::Value::as_str)
                    .unwrap_or("<missing>");
                if !KNOWN_OPS.contains(&name) {
                    return Err(format!(
                        "unknown op {name:?} in `{key}` (known: {})",
                        KNOWN_OPS.join(", ")
                    ));
                }
                check_names(v)?;
            }
        }
    }
    Ok(())
}

// The binary form of a stage (init notes): input shape, then the ops, each
// a code byte and its fields, little-endian. Every op has a code: the
// matches below have no wildcard, so a new op without one does not
// compile.
const OP_LINEAR: u8 = 1;
const OP_RELU: u8 = 2;
const OP_IDENTITY: u8 = 3;
const OP_LOG_SOFTMAX: u8 = 4;
const OP_NLL_LOSS: u8 = 5;
const OP_NORMALIZE: u8 = 6;
const OP_CONV2D: u8 = 7;
const OP_MAX_POOL2D: u8 = 8;
const OP_AVG_POOL2D: u8 = 9;
const OP_GLOBAL_AVG_POOL: u8 = 10;
const OP_BATCH_NORM2D: u8 = 11;
const OP_DROPOUT: u8 = 12;
const OP_FLATTEN: u8 = 13;
const OP_RESIDUAL: u8 = 14;

fn put_u32(out: &mut Vec<u8>, v: usize) {
    // Dimensions are at most MAX_DIM (checked when a spec is built).
    out.extend_from_slice(&(v.min(u32::MAX as usize) as u32).to_le_bytes());
}

fn encode_ops(ops: &[OpSpec], out: &mut Vec<u8>) {
    // At most MAX_OPS (checked when a spec is built).
    out.push(ops.len().min(255) as u8);
    for op in ops {
        match op {
            OpSpec::Linear { input, output } => {
                out.push(OP_LINEAR);
                put_u32(out, *input);
                put_u32(out, *output);
            }
            OpSpec::Normalize { mean, std } => {
                out.push(OP_NORMALIZE);
                out.extend_from_slice(&mean.to_bits().to_le_bytes());
                out.extend_from_slice(&std.to_bits().to_le_bytes());
            }
            OpSpec::Relu => out.push(OP_RELU),
            OpSpec::Identity => out.push(OP_IDENTITY),
            OpSpec::LogSoftmax => out.push(OP_LOG_SOFTMAX),
            OpSpec::NllLoss => out.push(OP_NLL_LOSS),
            OpSpec::Conv2d {
                in_channels,
                out_channels,
                kernel,
                stride,
                padding,
                bias,
            } => {
                out.push(OP_CONV2D);
                for v in [*in_channels, *out_channels, *kernel, *stride, *padding] {
                    put_u32(out, v);
                }
                out.push(u8::from(*bias));
            }
            OpSpec::MaxPool2d {
                kernel,
                stride,
                padding,
            } => {
                out.push(OP_MAX_POOL2D);
                for v in [*kernel, stride.unwrap_or(*kernel), *padding] {
                    put_u32(out, v);
                }
            }
            OpSpec::AvgPool2d {
                kernel,
                stride,
                padding,
            } => {
                out.push(OP_AVG_POOL2D);
                for v in [*kernel, stride.unwrap_or(*kernel), *padding] {
                    put_u32(out, v);
                }
            }
            OpSpec::GlobalAvgPool => out.push(OP_GLOBAL_AVG_POOL),
            OpSpec::BatchNorm2d {
                channels,
                eps,
                momentum,
            } => {
                out.push(OP_BATCH_NORM2D);
                put_u32(out, *channels);
                out.extend_from_slice(&eps.to_bits().to_le_bytes());
                out.extend_from_slice(&momentum.to_bits().to_le_bytes());
            }
            OpSpec::Dropout { p } => {
                out.push(OP_DROPOUT);
                out.extend_from_slice(&p.to_bits().to_le_bytes());
            }
            OpSpec::Flatten => out.push(OP_FLATTEN),
            OpSpec::Residual { ops, shortcut } => {
                out.push(OP_RESIDUAL);
                encode_ops(ops, out);
                encode_ops(shortcut, out);
            }
        }
    }
}

/// Reads a stage's binary form; every byte may come from an attacker.
struct Bytes<'a> {
    data: &'a [u8],
    at: usize,
}

impl Bytes<'_> {
    fn take<const N: usize>(&mut self) -> std::result::Result<[u8; N], String> {
        let end = self.at.checked_add(N).filter(|e| *e <= self.data.len());
        let Some(end) = end else {
            return Err(format!("truncated after {} bytes", self.at));
        };
        let mut out = [0u8; N];
        out.copy_from_slice(&self.data[self.at..end]);
        self.at = end;
        Ok(out)
    }
    fn u8(&mut self) -> std::result::Result<u8, String> {
        Ok(self.take::<1>()?[0])
    }
    fn dim(&mut self) -> std::result::Result<usize, String> {
        let v = u32::from_le_bytes(self.take::<4>()?) as usize;
        if v > MAX_DIM {
            return Err(format!("dimension {v} above {MAX_DIM}"));
        }
        Ok(v)
    }
    fn f32(&mut self) -> std::result::Result<f32, String> {
        Ok(f32::from_bits(u32::from_le_bytes(self.take::<4>()?)))
    }
}

fn decode_ops(
    r: &mut Bytes<'_>,
    depth: usize,
    budget: &mut usize,
) -> std::result::Result<Vec<OpSpec>, String> {
    let n = usize::from(r.u8()?);
    if n > *budget {
        return Err(format!("more than {MAX_OPS} ops"));
    }
    *budget -= n;
    let mut ops = Vec::with_capacity(n);
    for _ in 0..n {
        let op = match r.u8()? {
            OP_LINEAR => OpSpec::Linear {
                input: r.dim()?,
                output: r.dim()?,
            },
            OP_NORMALIZE => OpSpec::Normalize {
                mean: r.f32()?,
                std: r.f32()?,
            },
            OP_RELU => OpSpec::Relu,
            OP_IDENTITY => OpSpec::Identity,
            OP_LOG_SOFTMAX => OpSpec::LogSoftmax,
            OP_NLL_LOSS => OpSpec::NllLoss,
            OP_CONV2D => OpSpec::Conv2d {
                in_channels: r.dim()?,
                out_channels: r.dim()?,
                kernel: r.dim()?,
                stride: r.dim()?,
                padding: r.dim()?,
                bias: match r.u8()? {
                    0 => false,
                    1 => true,
                    other => return Err(format!("bias flag {other}")),
                },
            },
            code @ (OP_MAX_POOL2D | OP_AVG_POOL2D) => {
                let (kernel, stride, padding) = (r.dim()?, r.dim()?, r.dim()?);
                let stride = Some(stride);
                if code == OP_MAX_POOL2D {
                    OpSpec::MaxPool2d {
                        kernel,
                        stride,
                        padding,
                    }
                } else {
                    OpSpec::AvgPool2d {
                        kernel,
                        stride,
                        padding,
                    }
                }
            }
            OP_GLOBAL_AVG_POOL => OpSpec::GlobalAvgPool,
            OP_BATCH_NORM2D => OpSpec::BatchNorm2d {
                channels: r.dim()?,
                eps: r.f32()?,
                momentum: r.f32()?,
            },
            OP_DROPOUT => OpSpec::Dropout { p: r.f32()? },
            OP_FLATTEN => OpSpec::Flatten,
            OP_RESIDUAL => {
                if depth >= MAX_NESTING {
                    return Err(format!("residual blocks nested deeper than {MAX_NESTING}"));
                }
                OpSpec::Residual {
                    ops: decode_ops(r, depth + 1, budget)?,
                    shortcut: decode_ops(r, depth + 1, budget)?,
                }
            }
            other => return Err(format!("unknown op code {other}")),
        };
        ops.push(op);
    }
    Ok(ops)
}

impl StageSpec {
    /// The stage's binary form (in init notes): rank, dimensions, ops.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        // At most MAX_SAMPLE_RANK dimensions (checked when built).
        out.push(self.input.0.len().min(255) as u8);
        for d in &self.input.0 {
            put_u32(&mut out, *d);
        }
        encode_ops(&self.ops, &mut out);
        out
    }

    /// Decodes a stage's binary form from the front of `bytes` and returns
    /// it with the bytes it used. Only the form is checked here: a hop
    /// then checks the stage with [`StageSpec::check`].
    pub fn decode(bytes: &[u8]) -> std::result::Result<(Self, usize), String> {
        let mut r = Bytes { data: bytes, at: 0 };
        let rank = usize::from(r.u8()?);
        if rank == 0 || rank > MAX_SAMPLE_RANK {
            return Err(format!("input rank {rank} outside 1..={MAX_SAMPLE_RANK}"));
        }
        let mut dims = Vec::with_capacity(rank);
        for _ in 0..rank {
            dims.push(r.dim()?);
        }
        let mut budget = MAX_OPS;
        let ops = decode_ops(&mut r, 0, &mut budget)?;
        Ok((
            StageSpec {
                input: Shape(dims),
                ops,
            },
            r.at,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAPER: &str = include_str!("../../../models/paper-mlp.toml");

    #[test]
    fn paper_model_parses_into_five_stages() {
        let m = ModelSpec::parse(PAPER, "paper").unwrap();
        assert_eq!(m.stages.len(), 5);
        assert_eq!(m.stages[0].output(), Shape::flat(128));
        assert_eq!(m.stages[2].output(), Shape::flat(10));
        assert_eq!(m.stages[3].input, Shape::flat(10));
        assert!(m.stages[4].is_loss());
        assert_eq!(m.classes(), Some(10));
        assert_eq!(m.optimizer, None);
    }

    #[test]
    fn the_shipped_cnn_models_parse_and_fit_a_node() {
        for (text, name, stages, input) in [
            (
                include_str!("../../../models/vgg-fmnist.toml"),
                "vgg-fmnist",
                5,
                Shape::image(1, 28, 28),
            ),
            (
                include_str!("../../../models/vgg11-cifar10.toml"),
                "vgg11-cifar10",
                6,
                Shape::image(3, 32, 32),
            ),
        ] {
            let m = ModelSpec::parse(text, name).unwrap();
            assert_eq!(m.stages.len(), stages, "{name}");
            assert_eq!(m.input, input);
            assert_eq!(m.classes(), Some(10));
            // Every stage fits a node's default parameter limit.
            assert!(m.stages.iter().all(|s| s.param_count() < 16 << 20));
            assert_eq!(ModelSpec::parse(&m.to_toml(), "again").unwrap(), m);
        }
    }

    #[test]
    fn toml_round_trips() {
        let m = ModelSpec::parse(PAPER, "paper").unwrap();
        assert_eq!(ModelSpec::parse(&m.to_toml(), "again").unwrap(), m);
        // The flat form is written as a number (weights files of MLP runs
        // keep their bytes).
        assert!(m.to_toml().contains("\ninput = 784\n"), "{}", m.to_toml());
    }

    const CNN: &str = r#"
name = "cnn"
input = [1, 8, 8]

[optimizer]
kind = "adamw"
lr = 0.001
weight_decay = 0.01

[[stage]]
ops = [{ op = "conv2d", in = 1, out = 4, kernel = 3, padding = 1 }, { op = "batch_norm2d", channels = 4 }, { op = "relu" }, { op = "max_pool2d", kernel = 2 }]

[[stage]]
ops = [{ op = "residual", ops = [{ op = "conv2d", in = 4, out = 4, kernel = 3, padding = 1, bias = false }, { op = "relu" }] }, { op = "avg_pool2d", kernel = 2 }, { op = "dropout", p = 0.25 }]

[[stage]]
ops = [{ op = "global_avg_pool" }, { op = "flatten" }, { op = "linear", in = 4, out = 3 }, { op = "log_softmax" }, { op = "nll_loss" }]
"#;

    #[test]
    fn image_models_derive_every_shape() {
        let m = ModelSpec::parse(CNN, "cnn").unwrap();
        assert_eq!(m.input, Shape::image(1, 8, 8));
        assert_eq!(m.stages[0].output(), Shape::image(4, 4, 4));
        assert_eq!(m.stages[1].output(), Shape::image(4, 2, 2));
        assert_eq!(
            m.stages[2].shapes(),
            vec![
                Shape::image(4, 2, 2),
                Shape::image(4, 1, 1),
                Shape::flat(4),
                Shape::flat(3),
                Shape::flat(3),
                Shape::flat(1)
            ]
        );
        assert_eq!(m.classes(), Some(3));
        assert!(m.optimizer.is_some());
        assert_eq!(ModelSpec::parse(&m.to_toml(), "again").unwrap(), m);
        assert_eq!(m.stages[0].param_count(), 4 * 9 + 4 + 8);
        assert_eq!(m.stages[0].buffer_count(), 8);
        assert_eq!(m.stages[1].param_count(), 4 * 4 * 9);
    }

    #[test]
    fn a_shape_mismatch_names_the_stage_the_op_and_both_shapes() {
        let text = "input = [1, 28, 28]\n[[stage]]\nops = [{ op = \"conv2d\", in = 1, out = 8, kernel = 3 }]\n\
                    [[stage]]\nops = [{ op = \"flatten\" }, { op = \"linear\", in = 6272, out = 10 }]\n";
        let err = ModelSpec::parse(text, "t").unwrap_err().to_string();
        assert_eq!(
            err,
            "stage 2, op 2 (linear): expects 6272 input features but gets [5408] (input [5408])"
        );
        let text =
            "input = 784\n[[stage]]\nops = [{ op = \"conv2d\", in = 1, out = 8, kernel = 3 }]\n";
        let err = ModelSpec::parse(text, "t").unwrap_err().to_string();
        assert!(
            err.starts_with("stage 1, op 1 (conv2d): needs an image input [c, h, w], got [784]"),
            "{err}"
        );
        assert!(!err.contains('\n'));
    }

    #[test]
    fn stages_round_trip_through_their_binary_form() {
        let m = ModelSpec::parse(CNN, "cnn").unwrap();
        for s in &m.stages {
            let bytes = s.encode();
            let (back, used) = StageSpec::decode(&bytes).unwrap();
            assert_eq!(&back, s);
            assert_eq!(used, bytes.len());
            for cut in 0..bytes.len() {
                assert!(StageSpec::decode(&bytes[..cut]).is_err(), "cut {cut}");
            }
        }
    }

    #[test]
    fn decoding_refuses_unknown_codes_and_deep_nesting() {
        let mut bytes = vec![1, 4, 0, 0, 0, 1, 99];
        assert!(StageSpec::decode(&bytes)
            .unwrap_err()
            .contains("unknown op code 99"));
        // residual in residual in residual: deeper than MAX_NESTING.
        bytes = vec![1, 4, 0, 0, 0];
        for _ in 0..3 {
            bytes.extend([1, OP_RESIDUAL]);
        }
        bytes.extend([1, OP_RELU, 0, 0, 0]);
        assert!(StageSpec::decode(&bytes).unwrap_err().contains("nested"));
    }

    #[test]
    fn unknown_op_names_stage_and_op() {
        let text = "input = 4\n[[stage]]\nops = [{ op = \"relu\" }, { op = \"conv9d\" }]\n";
        let err = ModelSpec::parse(text, "t").unwrap_err().to_string();
        assert!(
            err.starts_with("stage 1, op 2 (conv9d): unknown op (known: linear, normalize, relu"),
            "{err}"
        );
        assert!(!err.contains('\n'));
        let text = "input = [1, 4, 4]\n[[stage]]\nops = [{ op = \"residual\", ops = [{ op = \"conv9d\" }] }]\n";
        let err = ModelSpec::parse(text, "t").unwrap_err().to_string();
        assert!(err.contains("unknown op \"conv9d\" in `ops`"), "{err}");
    }

    #[test]
    fn broken_dimension_chain_is_one_line() {
        let text = "input = 784\n[[stage]]\nops = [{ op = \"linear\", in = 784, out = 128 }]\n\
                    [[stage]]\nops = [{ op = \"linear\", in = 100, out = 10 }]\n";
        let err = ModelSpec::parse(text, "t").unwrap_err().to_string();
        assert_eq!(
            err,
            "stage 2, op 1 (linear): expects 100 input features but gets [128] (input [128])"
        );
    }

    #[test]
    fn empty_model_and_bad_toml_are_rejected() {
        let err = ModelSpec::parse("input = 3\n", "m.toml")
            .unwrap_err()
            .to_string();
        assert_eq!(err, "model description m.toml: the model has no [[stage]]");
        let err = ModelSpec::parse("input = [", "m.toml")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("model description m.toml:"), "{err}");
        assert!(!err.contains('\n'));
        let err = ModelSpec::parse("input = 3\n[[stage]]\nops = []\n", "m")
            .unwrap_err()
            .to_string();
        assert_eq!(err, "model description m: stage 1 has no ops");
    }

    #[test]
    fn loss_must_come_last() {
        let text = "input = 4\n[[stage]]\nops = [{ op = \"nll_loss\" }]\n[[stage]]\nops = [{ op = \"relu\" }]\n";
        let err = ModelSpec::parse(text, "t").unwrap_err().to_string();
        assert!(err.starts_with("stage 1, op 1 (nll_loss): "), "{err}");
    }

    #[test]
    fn missing_linear_dimension_is_reported() {
        let text = "input = 4\n[[stage]]\nops = [{ op = \"linear\", in = 4 }]\n";
        let err = ModelSpec::parse(text, "t").unwrap_err().to_string();
        assert!(
            err.starts_with("stage 1, op 1 (linear): missing field `out`"),
            "{err}"
        );
    }
}
