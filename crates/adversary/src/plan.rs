//! What the colluders know of the model's make-up, and the skeleton of
//! the surrogate they build from it: their own stages where they sit,
//! and gaps in between that they must fill.
//!
//! - **Positions known** (paper §4.3 case ii): the colluders know the
//!   cascade's layout and the architecture of every stage, only not the
//!   weights of stages they do not hold. Each gap is filled with the real
//!   stages' architecture, freshly initialised.
//! - **Positions unknown** (case i; what SECURITY.md says a hop can
//!   infer): each colluder knows its own stage, the shapes it receives
//!   and sends, whether it gets pixels (the first stage) or labels (the
//!   loss stage), and when each step's messages reach it. The colluders
//!   order their hops by arrival time (a step's forward reaches earlier
//!   hops first), call two hops neighbours when one's output is the
//!   other's input byte for byte, test whether a gap is a
//!   parameter-free op (identity, ReLU, log-softmax, flatten, pooling) by
//!   evaluating it on their records, and otherwise fill it with a
//!   stand-in built from its two boundary shapes
//!   ([`filler`]): two linear layers for flat shapes, 3×3 convolutions
//!   with ReLU and max pooling for images. The class count they take
//!   from their auxiliary data.

use std::collections::BTreeMap;

use mixnn_model::optim::Optimizer;
use mixnn_model::spec::{OpSpec, Shape, StageSpec};
use serde::{Deserialize, Serialize};

use crate::chain::{Chain, Piece, FROZEN};
use crate::data::rows_of;
use crate::error::{AdversaryError, Result};
use crate::view::HopView;

/// One link of the model's chain as it ran: a hop's stage, or a stage
/// the designer kept.
#[derive(Debug, Clone, PartialEq)]
pub struct Unit {
    /// The stage (a dummy's identity or borrowed op included).
    pub spec: StageSpec,
    /// Its position in the cascade (0-based), `None` if the designer ran
    /// it.
    pub hop: Option<usize>,
}

/// The designer's model as it ran (the simulator's ground truth).
#[derive(Debug, Clone)]
pub struct Truth {
    /// Every stage in forward order: kept first stage, hops, kept last.
    pub units: Vec<Unit>,
    /// The shape of one image of the data.
    pub data_shape: Shape,
    /// Classes of the data.
    pub classes: usize,
    /// The run's optimiser (what the colluders train stand-ins with).
    pub optimizer: Optimizer,
}

impl Truth {
    /// Units up to and including the loss stage: the model's function
    /// (dummies after the loss see only the loss go by).
    pub fn function(&self) -> &[Unit] {
        let end = self
            .units
            .iter()
            .position(|u| u.spec.is_loss())
            .map_or(self.units.len(), |i| i + 1);
        &self.units[..end]
    }

    /// Hops of the cascade.
    pub fn hops(&self) -> usize {
        self.units.iter().filter(|u| u.hop.is_some()).count()
    }
}

/// What the colluders know about where they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Positions {
    /// The layout and the architecture of every stage.
    Known,
    /// Only what their own records show.
    Unknown,
}

impl std::fmt::Display for Positions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Positions::Known => "known",
            Positions::Unknown => "unknown",
        })
    }
}

/// Where a gap sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gap {
    /// Before the first stage held (from the images).
    Front,
    /// Between held hops `after` and `before`.
    Inner {
        /// The held hop before it.
        after: usize,
        /// The held hop after it.
        before: usize,
    },
    /// After the last stage held (to the loss).
    Back,
}

/// A part of the surrogate.
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    /// A stage held: hop `0` (0-based position).
    Held(usize),
    /// Stages to fill, and where their initial weights come from: the
    /// stream of the first one (the next ones follow). With positions
    /// known it is the first stage's place in the model, so a stage
    /// starts from the same weights in every plan (and in the baseline)
    /// and plans differ only in what the colluders hold.
    Gap(Gap, Vec<StageSpec>, u64),
}

/// The surrogate's plan.
#[derive(Debug, Clone)]
pub struct Skeleton {
    /// Parts in forward order.
    pub parts: Vec<Part>,
    /// Positions unknown: whether the order inferred from timing is the
    /// order the hops ran in (`None` when positions are known).
    pub order_right: Option<bool>,
}

impl Skeleton {
    /// The plan of colluders `held` (positions) that know `positions`.
    pub fn new(
        truth: &Truth,
        views: &BTreeMap<usize, HopView>,
        held: &[usize],
        positions: Positions,
    ) -> Result<Skeleton> {
        match positions {
            Positions::Known => Ok(known(truth, held)),
            Positions::Unknown => unknown(truth, views, held),
        }
    }

    /// The held hops in the order of the plan.
    pub fn held(&self) -> Vec<usize> {
        self.parts
            .iter()
            .filter_map(|p| match p {
                Part::Held(h) => Some(*h),
                Part::Gap(..) => None,
            })
            .collect()
    }

    /// Builds the chain: held stages with their final weights (frozen),
    /// gaps freshly initialised from `seed`, trained with `opt(gap)`.
    /// Returns it with each part's range of pieces.
    pub fn build(
        &self,
        views: &BTreeMap<usize, HopView>,
        seed: u64,
        opt: impl Fn(Gap) -> Optimizer,
    ) -> Result<(Chain, Vec<std::ops::Range<usize>>)> {
        let mut chain = Chain::default();
        let mut ranges = Vec::new();
        for part in &self.parts {
            let start = chain.pieces.len();
            match part {
                Part::Held(h) => {
                    let v = view(views, *h)?;
                    chain.pieces.push(Piece::held(&v.spec, &v.state.tensors)?);
                }
                Part::Gap(gap, specs, first) => {
                    for (j, s) in specs.iter().enumerate() {
                        let seed = mixnn_model::init::derive_seed(seed, first + j as u64);
                        let o = if s.has_params() { opt(*gap) } else { FROZEN };
                        chain.pieces.push(Piece::fresh(s, seed, o));
                    }
                }
            }
            ranges.push(start..chain.pieces.len());
        }
        Ok((chain, ranges))
    }
}

fn view(views: &BTreeMap<usize, HopView>, hop: usize) -> Result<&HopView> {
    views.get(&hop).ok_or_else(|| AdversaryError::Mismatch {
        a: hop,
        b: hop,
        reason: "no record of this hop".into(),
    })
}

/// Positions known: the real stages, held or to fill.
fn known(truth: &Truth, held: &[usize]) -> Skeleton {
    let f = truth.function();
    let is_held = |u: &Unit| u.hop.is_some_and(|h| held.contains(&h));
    let mut parts = Vec::new();
    let mut gap: Vec<StageSpec> = Vec::new();
    let mut gap_from = 0u64;
    let mut last_held: Option<usize> = None;
    for (i, u) in f.iter().enumerate() {
        if is_held(u) {
            let hop = u.hop.unwrap_or_default();
            if !gap.is_empty() {
                let at = match last_held {
                    None => Gap::Front,
                    Some(after) => Gap::Inner { after, before: hop },
                };
                parts.push(Part::Gap(at, std::mem::take(&mut gap), gap_from));
            }
            parts.push(Part::Held(hop));
            last_held = Some(hop);
        } else {
            if gap.is_empty() {
                gap_from = i as u64;
            }
            gap.push(u.spec.clone());
        }
    }
    if !gap.is_empty() {
        let at = if last_held.is_some() {
            Gap::Back
        } else {
            Gap::Front
        };
        parts.push(Part::Gap(at, gap, gap_from));
    }
    Skeleton {
        parts,
        order_right: None,
    }
}

/// The shape of what a hop sends in training (a loss: `[1]`).
fn out_shape(v: &HopView) -> Shape {
    v.spec.output()
}

fn in_shape(v: &HopView) -> Shape {
    v.spec.input.clone()
}

/// Whether a hop sits after the loss (it receives the `[1, 1]` loss in
/// training).
fn after_loss(v: &HopView) -> bool {
    v.train
        .values()
        .next()
        .and_then(|f| mixnn_model::tensor_bytes::peek_shape(&f.input))
        .is_some_and(|s| s == [1, 1])
        && v.spec.is_identity()
}

/// Orders hops by when a step's forward reaches them: `a` before `b`
/// when it is earlier in most steps both saw.
fn by_timing(views: &[(usize, &HopView)]) -> Vec<usize> {
    let before = |a: &HopView, b: &HopView| {
        let (mut early, mut late) = (0, 0);
        for (k, fa) in &a.train {
            if let Some(fb) = b.train.get(k) {
                if fa.at_us <= fb.at_us {
                    early += 1;
                } else {
                    late += 1;
                }
            }
        }
        early > late
    };
    let mut ranked: Vec<(usize, usize)> = views
        .iter()
        .map(|(h, a)| {
            let wins = views.iter().filter(|(g, b)| g != h && before(a, b)).count();
            (*h, wins)
        })
        .collect();
    ranked.sort_by(|x, y| y.1.cmp(&x.1).then(x.0.cmp(&y.0)));
    ranked.into_iter().map(|(h, _)| h).collect()
}

/// Whether `b` received exactly what `a` sent, in the steps both saw.
fn adjacent(a: &HopView, b: &HopView) -> bool {
    let mut common = a
        .train
        .iter()
        .filter_map(|(k, fa)| b.train.get(k).map(|fb| fa.output == fb.input))
        .take(4)
        .peekable();
    common.peek().is_some() && common.all(|same| same)
}

/// The parameter-free ops a gap from `from` to `to` could be.
fn candidates(from: &Shape, to: &Shape) -> Vec<Vec<OpSpec>> {
    let mut c = Vec::new();
    if from == to {
        c.push(vec![OpSpec::Identity]);
        c.push(vec![OpSpec::Relu]);
        if from.features().is_some() {
            c.push(vec![OpSpec::LogSoftmax]);
        }
    }
    if from.chw().is_some() && to.features() == Some(from.numel()) {
        c.push(vec![OpSpec::Flatten]);
    }
    if let (Some([c1, h1, w1]), Some([c2, h2, w2])) = (from.chw(), to.chw()) {
        if c1 == c2 && h1 == 2 * h2 && w1 == 2 * w2 {
            let pool = OpSpec::MaxPool2d {
                kernel: 2,
                stride: None,
                padding: 0,
            };
            c.push(vec![pool.clone()]);
            c.push(vec![OpSpec::Relu, pool]);
        }
    }
    c
}

/// Whether what hop `v` receives are log-probabilities (every row's
/// probabilities add up to 1): then a stand-in before it ends with a
/// log-softmax.
fn receives_log_probs(v: &HopView) -> Result<bool> {
    match v.train.values().next() {
        Some(f) => {
            Ok(crate::chain::Fit::for_target(&rows_of(&f.input)?) == crate::chain::Fit::SoftLabels)
        }
        None => Ok(false),
    }
}

/// A parameter-free op that maps what `a` sent to what `b` received in
/// the colluders' records, if there is one.
fn exact_gap(a: (usize, &HopView), b: (usize, &HopView)) -> Result<Option<StageSpec>> {
    let (from, to) = (out_shape(a.1), in_shape(b.1));
    let cands = candidates(&from, &to);
    if cands.is_empty() {
        return Ok(None);
    }
    let Some((k, fa)) = a.1.train.iter().find(|(k, _)| b.1.train.contains_key(k)) else {
        return Ok(None);
    };
    let x = rows_of(&fa.output)?;
    let t = rows_of(&b.1.train[k].input)?;
    for ops in cands {
        let spec = StageSpec {
            input: from.clone(),
            ops,
        };
        if spec.check(1, false).is_err() {
            continue;
        }
        let chain = Chain {
            pieces: vec![Piece::fresh(&spec, 0, FROZEN)],
        };
        let y = chain.eval_rows(0..1, &x)?;
        let close = y.values.len() == t.values.len()
            && y.values
                .iter()
                .zip(&t.values)
                .all(|(p, q)| (p - q).abs() <= 1e-5 * (1.0 + q.abs()));
        if close {
            return Ok(Some(spec));
        }
    }
    Ok(None)
}

/// A stand-in for unknown stages from shape `from` to shape `to`: two
/// linear layers with a ReLU between them for a flat output (after
/// flattening an image input), and for an image output 3×3 convolutions
/// (padding 1) with ReLU, each followed by 2×2 max pooling while the
/// image is to shrink by half.
pub fn filler(from: &Shape, to: &Shape) -> Result<StageSpec> {
    let none = || AdversaryError::NoFiller {
        from: from.to_string(),
        to: to.to_string(),
    };
    let mut ops = Vec::new();
    if let Some(out) = to.features() {
        let inp = from.numel();
        if from.chw().is_some() {
            ops.push(OpSpec::Flatten);
        }
        let hidden = inp.max(out).clamp(64, 256);
        ops.extend([
            OpSpec::Linear {
                input: inp,
                output: hidden,
            },
            OpSpec::Relu,
            OpSpec::Linear {
                input: hidden,
                output: out,
            },
        ]);
    } else {
        let ([c1, h1, w1], [c2, h2, w2]) =
            (from.chw().ok_or_else(none)?, to.chw().ok_or_else(none)?);
        let (mut c, mut h, mut w) = (c1, h1, w1);
        loop {
            ops.extend([
                OpSpec::Conv2d {
                    in_channels: c,
                    out_channels: c2,
                    kernel: 3,
                    stride: 1,
                    padding: 1,
                    bias: true,
                },
                OpSpec::Relu,
            ]);
            c = c2;
            if (h, w) == (h2, w2) {
                break;
            }
            if !h.is_multiple_of(2) || !w.is_multiple_of(2) || h / 2 < h2 || w / 2 < w2 {
                return Err(none());
            }
            ops.push(OpSpec::MaxPool2d {
                kernel: 2,
                stride: None,
                padding: 0,
            });
            (h, w) = (h / 2, w / 2);
        }
    }
    let spec = StageSpec {
        input: from.clone(),
        ops,
    };
    spec.check(1, false).map_err(|_| none())?;
    if spec.output() != *to {
        return Err(none());
    }
    Ok(spec)
}

/// Where the streams of stand-ins' initial weights start (positions
/// unknown): away from the model's stage indices.
const UNKNOWN_SEEDS: u64 = 1 << 20;

/// The loss the colluders put at the end: log-softmax and NLL over the
/// classes.
fn loss(classes: usize) -> StageSpec {
    StageSpec {
        input: Shape::flat(classes),
        ops: vec![OpSpec::LogSoftmax, OpSpec::NllLoss],
    }
}

/// Positions unknown: the plan the colluders can make from their records.
fn unknown(truth: &Truth, views: &BTreeMap<usize, HopView>, held: &[usize]) -> Result<Skeleton> {
    let mut mine = Vec::new();
    for h in held {
        let v = view(views, *h)?;
        if !after_loss(v) {
            mine.push((*h, v));
        }
    }
    let order = by_timing(&mine);
    let mut true_order: Vec<usize> = mine.iter().map(|(h, _)| *h).collect();
    true_order.sort_unstable();
    let order_right = Some(order == true_order);
    let ordered: Vec<(usize, &HopView)> = order
        .iter()
        .map(|h| view(views, *h).map(|v| (*h, v)))
        .collect::<Result<_>>()?;
    let mut parts = Vec::new();
    let data = truth.data_shape.clone();
    match ordered.first() {
        None => {
            parts.push(Part::Gap(
                Gap::Front,
                vec![
                    filler(&data, &Shape::flat(truth.classes))?,
                    loss(truth.classes),
                ],
                UNKNOWN_SEEDS,
            ));
            return Ok(Skeleton { parts, order_right });
        }
        Some((_, v)) if !v.sees_pixels() => {
            parts.push(Part::Gap(
                Gap::Front,
                vec![filler(&data, &in_shape(v))?],
                UNKNOWN_SEEDS,
            ));
        }
        Some(_) => {}
    }
    for (i, (h, v)) in ordered.iter().enumerate() {
        if i > 0 {
            let (g, u) = ordered[i - 1];
            if !adjacent(u, v) {
                let spec = match exact_gap((g, u), (*h, v))? {
                    Some(s) => s,
                    None => {
                        let mut f = filler(&out_shape(u), &in_shape(v))?;
                        if receives_log_probs(v)? {
                            f.ops.push(OpSpec::LogSoftmax);
                        }
                        f
                    }
                };
                parts.push(Part::Gap(
                    Gap::Inner {
                        after: g,
                        before: *h,
                    },
                    vec![spec],
                    UNKNOWN_SEEDS + 64 * i as u64,
                ));
            }
        }
        parts.push(Part::Held(*h));
        if v.spec.is_loss() {
            return Ok(Skeleton { parts, order_right });
        }
    }
    if let Some((_, v)) = ordered.last() {
        let out = out_shape(v);
        let mut back = Vec::new();
        if out != Shape::flat(truth.classes) {
            back.push(filler(&out, &Shape::flat(truth.classes))?);
        }
        back.push(loss(truth.classes));
        parts.push(Part::Gap(
            Gap::Back,
            back,
            UNKNOWN_SEEDS + 64 * ordered.len() as u64,
        ));
    }
    Ok(Skeleton { parts, order_right })
}

#[cfg(test)]
mod tests;
