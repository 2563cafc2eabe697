//! The ops of a stage at run time: their parameters and buffers, and one
//! forward and one backward per op kind over the kernels of
//! [`crate::arith`]. A residual block holds two lists of layers; the
//! forward and backward of a list ([`forward_seq`], [`backward_seq`])
//! serve a stage and a block alike.
//!
//! Every layer has an id, its position in the stage's ops counted in
//! pre-order (a block before its branch's ops, the branch before the
//! shortcut): parameter initialisation and dropout masks draw from
//! streams derived from the stage's seed and that id, and parameter names
//! follow the nesting (`"3.weight"`, `"2.ops.0.weight"`,
//! `"2.shortcut.1.running_mean"`).
//!
//! Over 600 lines: one forward and one backward per op kind, side by side,
//! so that a new op is added in one place (ARCHITECTURE.md, how to add an
//! op).

use crate::arith::conv::{self, ConvGeom};
use crate::arith::gemm::View;
use crate::arith::matrix::Matrix;
use crate::arith::norm;
use crate::arith::ops;
use crate::arith::pool::{self, PoolGeom};
use crate::error::{ModelError, Result};
use crate::init;
use crate::spec::{OpSpec, Shape};

/// One parameter tensor (row-major), its optimiser buffers and the
/// gradients of the current step's micro-batches.
pub(crate) struct Param {
    pub(crate) shape: Vec<usize>,
    pub(crate) value: Vec<f32>,
    /// The optimiser's buffers (momentum, moments), absent before the
    /// first update.
    pub(crate) buffers: Option<Vec<Vec<f32>>>,
    /// Gradients of the micro-batches of the current step, by micro
    /// index, not yet applied.
    pub(crate) pending: Vec<(u32, Vec<f32>)>,
    /// Unique within the stage: where a backward's gradient goes.
    pub(crate) id: usize,
}

impl Param {
    fn new(shape: Vec<usize>, value: Vec<f32>, ids: &mut usize) -> Self {
        *ids += 1;
        Param {
            shape,
            value,
            buffers: None,
            pending: Vec::new(),
            id: *ids - 1,
        }
    }
}

/// A batch norm's running statistics and the batch statistics waiting
/// for the step's update.
pub(crate) struct Running {
    pub(crate) mean: Vec<f32>,
    pub(crate) var: Vec<f32>,
    pub(crate) momentum: f32,
    /// `(micro, batch mean, unbiased batch variance)`.
    pub(crate) pending: Vec<(u32, Vec<f32>, Vec<f32>)>,
}

pub(crate) enum Kind {
    Linear {
        input: usize,
        output: usize,
        w: Param,
        b: Param,
    },
    Conv {
        geom: ConvGeom,
        w: Param,
        b: Option<Param>,
    },
    BatchNorm {
        c: usize,
        hw: usize,
        eps: f32,
        gamma: Param,
        beta: Param,
        running: Running,
    },
    Normalize {
        mean: f32,
        std: f32,
    },
    Relu,
    Identity,
    LogSoftmax,
    NllLoss,
    MaxPool(PoolGeom),
    AvgPool(PoolGeom),
    GlobalAvg {
        c: usize,
        hw: usize,
    },
    Dropout {
        p: f32,
    },
    Flatten,
    Residual {
        f: Vec<Layer>,
        s: Vec<Layer>,
    },
}

/// One op of a stage with its state.
pub(crate) struct Layer {
    pub(crate) kind: Kind,
    /// Pre-order position in the stage (see the module's description).
    pub(crate) id: usize,
    /// The op's name path in parameter names (`"3"`, `"2.ops.0"`).
    pub(crate) path: String,
}

/// What one op saved in a training forward for its backward.
pub(crate) enum Saved {
    Input(Matrix),
    Output(Matrix),
    Nothing,
    Loss {
        labels: Vec<u32>,
        classes: usize,
        rows: usize,
    },
    Arg(Vec<u32>),
    Bn {
        xhat: Matrix,
        inv: Vec<f32>,
        mean: Vec<f32>,
        var_unbiased: Vec<f32>,
    },
    Mask(Vec<f32>),
    Bits(Vec<u64>),
    Residual {
        f: Vec<Saved>,
        s: Vec<Saved>,
    },
}

impl Saved {
    pub(crate) fn bytes(&self) -> usize {
        match self {
            Saved::Input(m) | Saved::Output(m) => 4 * m.as_slice().len(),
            Saved::Loss { labels, .. } => 4 * labels.len(),
            Saved::Arg(a) => 4 * a.len(),
            Saved::Bn {
                xhat,
                inv,
                mean,
                var_unbiased,
            } => 4 * (xhat.as_slice().len() + inv.len() + mean.len() + var_unbiased.len()),
            Saved::Mask(m) => 4 * m.len(),
            Saved::Bits(b) => 8 * b.len(),
            Saved::Nothing => 0,
            Saved::Residual { f, s } => f.iter().chain(s).map(Saved::bytes).sum(),
        }
    }
}

/// Builds the layers of `ops` for inputs of shape `input` (the shapes
/// chain: the spec was checked), numbering layers from `*next_id` and
/// parameters from `*param_ids`.
pub(crate) fn build(
    ops: &[OpSpec],
    input: &Shape,
    seed: u64,
    prefix: &str,
    next_id: &mut usize,
    param_ids: &mut usize,
) -> Vec<Layer> {
    let mut shape = input.clone();
    let mut out = Vec::with_capacity(ops.len());
    for (i, op) in ops.iter().enumerate() {
        let id = *next_id;
        *next_id += 1;
        let path = if prefix.is_empty() {
            i.to_string()
        } else {
            format!("{prefix}.{i}")
        };
        let op_seed = init::derive_seed(seed, id as u64);
        let chw = shape.chw().unwrap_or([shape.numel(), 1, 1]);
        let kind = match op.clone() {
            OpSpec::Linear { input, output } => {
                let (w, b) = init::linear(op_seed, input, output);
                Kind::Linear {
                    input,
                    output,
                    w: Param::new(vec![input, output], w, param_ids),
                    b: Param::new(vec![output], b, param_ids),
                }
            }
            OpSpec::Conv2d {
                in_channels,
                out_channels,
                kernel,
                stride,
                padding,
                bias,
            } => {
                let [c, h, w] = chw;
                let geom = ConvGeom::new(c, h, w, out_channels, kernel, stride, padding).unwrap_or(
                    ConvGeom {
                        c,
                        h,
                        w,
                        o: out_channels,
                        k: kernel,
                        s: stride.max(1),
                        p: padding,
                        ho: 0,
                        wo: 0,
                    },
                );
                let (wv, bv) = init::conv(op_seed, in_channels * kernel * kernel, out_channels);
                Kind::Conv {
                    geom,
                    w: Param::new(
                        vec![out_channels, in_channels, kernel, kernel],
                        wv,
                        param_ids,
                    ),
                    b: bias.then(|| Param::new(vec![out_channels], bv, param_ids)),
                }
            }
            OpSpec::BatchNorm2d {
                channels,
                eps,
                momentum,
            } => Kind::BatchNorm {
                c: channels,
                hw: chw[1] * chw[2],
                eps,
                gamma: Param::new(vec![channels], vec![1.0; channels], param_ids),
                beta: Param::new(vec![channels], vec![0.0; channels], param_ids),
                running: Running {
                    mean: vec![0.0; channels],
                    var: vec![1.0; channels],
                    momentum,
                    pending: Vec::new(),
                },
            },
            OpSpec::Normalize { mean, std } => Kind::Normalize { mean, std },
            OpSpec::Relu => Kind::Relu,
            OpSpec::Identity => Kind::Identity,
            OpSpec::LogSoftmax => Kind::LogSoftmax,
            OpSpec::NllLoss => Kind::NllLoss,
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
                let [c, h, w] = chw;
                let s = stride.unwrap_or(kernel);
                let g = PoolGeom::new(c, h, w, kernel, s, padding).unwrap_or(PoolGeom {
                    c,
                    h,
                    w,
                    k: kernel,
                    s: s.max(1),
                    p: padding,
                    ho: 0,
                    wo: 0,
                });
                if matches!(op, OpSpec::MaxPool2d { .. }) {
                    Kind::MaxPool(g)
                } else {
                    Kind::AvgPool(g)
                }
            }
            OpSpec::GlobalAvgPool => Kind::GlobalAvg {
                c: chw[0],
                hw: chw[1] * chw[2],
            },
            OpSpec::Dropout { p } => Kind::Dropout { p },
            OpSpec::Flatten => Kind::Flatten,
            OpSpec::Residual { ops, shortcut } => {
                let f = build(
                    &ops,
                    &shape,
                    seed,
                    &format!("{path}.ops"),
                    next_id,
                    param_ids,
                );
                let s = build(
                    &shortcut,
                    &shape,
                    seed,
                    &format!("{path}.shortcut"),
                    next_id,
                    param_ids,
                );
                Kind::Residual { f, s }
            }
        };
        shape = op.output_shape(&shape).unwrap_or(shape);
        out.push(Layer { kind, id, path });
    }
    out
}

/// What a forward knows besides its input.
pub(crate) struct Ctx<'a> {
    /// Training (batch statistics, dropout, caches) or evaluation.
    pub(crate) train: bool,
    /// The labels, for the loss.
    pub(crate) labels: Option<&'a [u32]>,
    /// Rows of the whole batch (the loss's mean).
    pub(crate) batch_rows: usize,
    /// The stage's seed (dropout masks).
    pub(crate) seed: u64,
    /// The step (dropout masks).
    pub(crate) step: u64,
    /// The micro-batch (dropout masks).
    pub(crate) micro: u32,
}

/// The seed of a dropout mask: from the stage's seed, the step, the
/// micro-batch and the op's id.
pub fn dropout_seed(stage_seed: u64, step: u64, micro: u32, op_id: usize) -> u64 {
    let s = init::derive_seed(stage_seed ^ 0x6472_6f70_6f75_7421, step);
    init::derive_seed(init::derive_seed(s, u64::from(micro)), op_id as u64)
}

fn misuse(m: &str) -> ModelError {
    ModelError::Misuse(m.into())
}

/// Runs `layers` on `x`; in training, pushes what each saved to `saved`.
pub(crate) fn forward_seq(
    layers: &[Layer],
    x: Matrix,
    ctx: &Ctx<'_>,
    mut saved: Option<&mut Vec<Saved>>,
) -> Result<Matrix> {
    let mut h = x;
    for layer in layers {
        let (y, s) = forward_one(layer, h, ctx)?;
        if let Some(saved) = saved.as_deref_mut() {
            saved.push(s);
        }
        h = y;
    }
    Ok(h)
}

fn forward_one(layer: &Layer, h: Matrix, ctx: &Ctx<'_>) -> Result<(Matrix, Saved)> {
    let train = ctx.train;
    Ok(match &layer.kind {
        Kind::Linear {
            input,
            output,
            w,
            b,
        } => {
            let y = ops::linear_forward(&h, View::rows_of(&w.value, *input, *output), &b.value);
            (
                y,
                if train {
                    Saved::Input(h)
                } else {
                    Saved::Nothing
                },
            )
        }
        Kind::Conv { geom, w, b } => {
            let y =
                conv::conv2d_forward(&h, &w.value, b.as_ref().map(|b| b.value.as_slice()), geom);
            (
                y,
                if train {
                    Saved::Input(h)
                } else {
                    Saved::Nothing
                },
            )
        }
        Kind::BatchNorm {
            c,
            hw,
            eps,
            gamma,
            beta,
            running,
        } => {
            if train {
                if h.rows() * hw < 2 {
                    return Err(ModelError::Shape {
                        context: "batch_norm2d",
                        expected: "more than one value per channel in training".into(),
                        actual: format!("{} rows of {hw} values per channel", h.rows()),
                    });
                }
                let f = norm::forward_train(h, *c, *hw, &gamma.value, &beta.value, *eps);
                (
                    f.y,
                    Saved::Bn {
                        xhat: f.xhat,
                        inv: f.inv,
                        mean: f.mean,
                        var_unbiased: f.var_unbiased,
                    },
                )
            } else {
                let y = norm::forward_eval(
                    h,
                    *c,
                    *hw,
                    &gamma.value,
                    &beta.value,
                    &running.mean,
                    &running.var,
                    *eps,
                );
                (y, Saved::Nothing)
            }
        }
        Kind::Normalize { mean, std } => (ops::normalize_forward(h, *mean, *std), Saved::Nothing),
        Kind::Relu => {
            let y = ops::relu_forward(h);
            let s = if train {
                Saved::Bits(ops::relu_mask(&y))
            } else {
                Saved::Nothing
            };
            (y, s)
        }
        Kind::Identity | Kind::Flatten => (h, Saved::Nothing),
        Kind::LogSoftmax => {
            let y = ops::log_softmax_forward(h);
            let s = if train {
                Saved::Output(y.clone())
            } else {
                Saved::Nothing
            };
            (y, s)
        }
        Kind::NllLoss => {
            if !train {
                // Evaluation passes the log-probabilities through.
                return Ok((h, Saved::Nothing));
            }
            let labels = ctx
                .labels
                .ok_or_else(|| ModelError::Labels("the loss stage got no labels".into()))?;
            let classes = h.cols();
            check_labels(labels, h.rows(), classes)?;
            let loss = ops::nll_forward(&h, labels, ctx.batch_rows);
            (
                Matrix::scalar(loss),
                Saved::Loss {
                    labels: labels.to_vec(),
                    classes,
                    rows: ctx.batch_rows,
                },
            )
        }
        Kind::MaxPool(g) => {
            let (y, arg) = pool::max_pool_forward(&h, g);
            (
                y,
                if train {
                    Saved::Arg(arg)
                } else {
                    Saved::Nothing
                },
            )
        }
        Kind::AvgPool(g) => (pool::avg_pool_forward(&h, g), Saved::Nothing),
        Kind::GlobalAvg { c, hw } => (pool::global_avg_forward(&h, *c, *hw), Saved::Nothing),
        Kind::Dropout { p } => {
            if !train || *p == 0.0 {
                (h, Saved::Nothing)
            } else {
                let mask = ops::dropout_mask(
                    dropout_seed(ctx.seed, ctx.step, ctx.micro, layer.id),
                    h.as_slice().len(),
                    *p,
                );
                let mut y = h;
                ops::mul_assign(y.as_mut_slice(), &mask);
                (y, Saved::Mask(mask))
            }
        }
        Kind::Residual { f, s } => {
            let mut fs = Vec::new();
            let mut ss = Vec::new();
            let fy = forward_seq(f, h.clone(), ctx, train.then_some(&mut fs))?;
            let sy = forward_seq(s, h, ctx, train.then_some(&mut ss))?;
            if fy.dims() != sy.dims() {
                return Err(misuse("residual branches of different shapes"));
            }
            let mut y = fy;
            ops::add_assign(y.as_mut_slice(), sy.as_slice());
            (y, Saved::Residual { f: fs, s: ss })
        }
    })
}

/// A gradient computed by a backward, not yet handed to its parameter or
/// running statistics.
pub(crate) enum Grad {
    /// A parameter's gradient, by parameter id.
    Param(usize, Vec<f32>),
    /// A batch norm's batch statistics, by layer id.
    Stats(usize, Vec<f32>, Vec<f32>),
}

/// Whether any layer in `layers` holds parameters.
fn has_params(layer: &Layer) -> bool {
    match &layer.kind {
        Kind::Linear { .. } | Kind::Conv { .. } | Kind::BatchNorm { .. } => true,
        Kind::Residual { f, s } => f.iter().chain(s).any(has_params),
        _ => false,
    }
}

/// The backward of `layers` given the output gradient `g` (none for a
/// loss), pushing parameter gradients to `grads`; returns the input
/// gradient when `need_input_grad`. Below the first layer with parameters
/// no gradient is computed unless it is needed (values never computed are
/// never observed, so this changes no bit).
pub(crate) fn backward_seq(
    layers: &[Layer],
    saved: Vec<Saved>,
    g: Option<Matrix>,
    need_input_grad: bool,
    grads: &mut Vec<Grad>,
) -> Result<Option<Matrix>> {
    if saved.len() != layers.len() {
        return Err(misuse("cache from another stage"));
    }
    let first_param = layers.iter().position(has_params).unwrap_or(layers.len());
    let mut g = g;
    for (i, (layer, s)) in layers.iter().zip(saved).enumerate().rev() {
        let need_dx = need_input_grad || i > first_param;
        g = backward_one(layer, s, g, need_dx, grads)?;
        if g.is_none() && i > 0 && need_dx {
            return Err(misuse("missing gradient"));
        }
    }
    Ok(if need_input_grad { g } else { None })
}

fn need(g: Option<Matrix>) -> Result<Matrix> {
    g.ok_or_else(|| misuse("backward needs the output gradient"))
}

fn backward_one(
    layer: &Layer,
    saved: Saved,
    g: Option<Matrix>,
    need_dx: bool,
    grads: &mut Vec<Grad>,
) -> Result<Option<Matrix>> {
    Ok(match (&layer.kind, saved) {
        (
            Kind::NllLoss,
            Saved::Loss {
                labels,
                classes,
                rows,
            },
        ) => Some(ops::nll_backward(&labels, classes, rows)),
        (
            Kind::Linear {
                input,
                output,
                w,
                b,
            },
            Saved::Input(x),
        ) => {
            let dy = need(g)?;
            let (dx, dw, db) =
                ops::linear_backward(&x, View::rows_of(&w.value, *input, *output), &dy, need_dx);
            grads.push(Grad::Param(w.id, dw.into_vec()));
            grads.push(Grad::Param(b.id, db));
            dx
        }
        (Kind::Conv { geom, w, b }, Saved::Input(x)) => {
            let dy = need(g)?;
            let (dw, db) = conv::conv2d_backward_weight(&x, &dy, geom, b.is_some());
            let dx = need_dx.then(|| conv::conv2d_backward_input(&dy, &w.value, geom));
            grads.push(Grad::Param(w.id, dw));
            if let (Some(b), Some(db)) = (b, db) {
                grads.push(Grad::Param(b.id, db));
            }
            dx
        }
        (
            Kind::BatchNorm {
                c, hw, gamma, beta, ..
            },
            Saved::Bn {
                xhat,
                inv,
                mean,
                var_unbiased,
            },
        ) => {
            let dy = need(g)?;
            let (dx, dgamma, dbeta) =
                norm::backward(dy, &xhat, &inv, &gamma.value, *c, *hw, need_dx);
            grads.push(Grad::Param(gamma.id, dgamma));
            grads.push(Grad::Param(beta.id, dbeta));
            grads.push(Grad::Stats(layer.id, mean, var_unbiased));
            dx
        }
        (Kind::Residual { f, s }, Saved::Residual { f: fs, s: ss }) => {
            let dy = need(g)?;
            let df = backward_seq(f, fs, Some(dy.clone()), need_dx, grads)?;
            let ds = if s.is_empty() {
                Some(dy)
            } else {
                backward_seq(s, ss, Some(dy), need_dx, grads)?
            };
            match (df, ds) {
                (Some(mut a), Some(b)) if need_dx => {
                    ops::add_assign(a.as_mut_slice(), b.as_slice());
                    Some(a)
                }
                _ => None,
            }
        }
        (_, _) if !need_dx => None,
        (Kind::Normalize { std, .. }, Saved::Nothing) => {
            Some(ops::normalize_backward(need(g)?, *std))
        }
        (Kind::Relu, Saved::Bits(mask)) => Some(ops::relu_backward_masked(&mask, need(g)?)),
        (Kind::Identity | Kind::Flatten, Saved::Nothing) => g,
        (Kind::LogSoftmax, Saved::Output(y)) => Some(ops::log_softmax_backward(&y, need(g)?)),
        (Kind::MaxPool(pg), Saved::Arg(arg)) => Some(pool::max_pool_backward(&need(g)?, &arg, pg)),
        (Kind::AvgPool(pg), Saved::Nothing) => Some(pool::avg_pool_backward(&need(g)?, pg)),
        (Kind::GlobalAvg { c, hw }, Saved::Nothing) => {
            Some(pool::global_avg_backward(&need(g)?, *c, *hw))
        }
        (Kind::Dropout { .. }, Saved::Nothing) => g,
        (Kind::Dropout { .. }, Saved::Mask(mask)) => {
            let mut dx = need(g)?;
            ops::mul_assign(dx.as_mut_slice(), &mask);
            Some(dx)
        }
        _ => return Err(misuse("cache does not match the ops")),
    })
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

/// Every parameter of `layers`, in pre-order, with its name.
pub(crate) fn params_of<'a>(layers: &'a [Layer], out: &mut Vec<(String, &'a Param)>) {
    for layer in layers {
        match &layer.kind {
            Kind::Linear { w, b, .. } => {
                out.push((format!("{}.weight", layer.path), w));
                out.push((format!("{}.bias", layer.path), b));
            }
            Kind::Conv { w, b, .. } => {
                out.push((format!("{}.weight", layer.path), w));
                if let Some(b) = b {
                    out.push((format!("{}.bias", layer.path), b));
                }
            }
            Kind::BatchNorm { gamma, beta, .. } => {
                out.push((format!("{}.weight", layer.path), gamma));
                out.push((format!("{}.bias", layer.path), beta));
            }
            Kind::Residual { f, s } => {
                params_of(f, out);
                params_of(s, out);
            }
            _ => {}
        }
    }
}

/// [`params_of`], mutable.
pub(crate) fn params_of_mut<'a>(layers: &'a mut [Layer], out: &mut Vec<(String, &'a mut Param)>) {
    for layer in layers {
        let path = layer.path.clone();
        match &mut layer.kind {
            Kind::Linear { w, b, .. } => {
                out.push((format!("{path}.weight"), w));
                out.push((format!("{path}.bias"), b));
            }
            Kind::Conv { w, b, .. } => {
                out.push((format!("{path}.weight"), w));
                if let Some(b) = b {
                    out.push((format!("{path}.bias"), b));
                }
            }
            Kind::BatchNorm { gamma, beta, .. } => {
                out.push((format!("{path}.weight"), gamma));
                out.push((format!("{path}.bias"), beta));
            }
            Kind::Residual { f, s } => {
                params_of_mut(f, out);
                params_of_mut(s, out);
            }
            _ => {}
        }
    }
}

/// Every batch norm's running statistics, in pre-order, with the layer's
/// path and id.
pub(crate) fn running_of_mut<'a>(
    layers: &'a mut [Layer],
    out: &mut Vec<(String, usize, &'a mut Running)>,
) {
    for layer in layers {
        let (path, id) = (layer.path.clone(), layer.id);
        match &mut layer.kind {
            Kind::BatchNorm { running, .. } => out.push((path, id, running)),
            Kind::Residual { f, s } => {
                running_of_mut(f, out);
                running_of_mut(s, out);
            }
            _ => {}
        }
    }
}

/// [`running_of_mut`], shared.
pub(crate) fn running_of<'a>(layers: &'a [Layer], out: &mut Vec<(String, &'a Running)>) {
    for layer in layers {
        match &layer.kind {
            Kind::BatchNorm { running, .. } => out.push((layer.path.clone(), running)),
            Kind::Residual { f, s } => {
                running_of(f, out);
                running_of(s, out);
            }
            _ => {}
        }
    }
}
