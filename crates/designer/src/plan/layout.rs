//! What runs where: which model stage each hop runs (dummies hidden among
//! them), which stages the designer keeps, which hop computes the loss,
//! and how large the cascade's messages get.
//!
//! A dummy hop should not be able to tell from its init note that it is
//! one (paper §2.2: dummies "pass through the activation function"). So
//! a dummy placed after a remote stage of two or more ops takes that
//! stage's last op when it has no parameters and draws no randomness (a
//! `relu`, a pooling, `flatten`, `normalize`, `log_softmax`): the stage
//! hands over its activation, the dummy computes it, the result is the
//! same function, bit for bit. Taking only the *last* op keeps every
//! other op at its position in its stage (initialisation and dropout
//! masks derive from positions). Elsewhere — at the front, after another
//! dummy, after a stage whose last op has parameters or is the loss —
//! the dummy runs `identity`, which a hop does recognise (SECURITY.md).

use mixnn_model::spec::{ModelSpec, OpSpec, Shape, StageSpec};
use mixnn_model::stage::StageState;
use mixnn_model::tensor_bytes::f32_message_len;
use mixnn_model::trainer::TrainConfig;
use mixnn_wire::PaddingPolicy;

use crate::checkpoint::Checkpoint;
use crate::error::DesignerError;
use crate::options::{Keep, Padding};

/// The stage one hop runs.
#[derive(Debug, Clone, PartialEq)]
pub struct HopStage {
    /// The model stage's index, or `None` for a dummy hop (identity).
    pub index: Option<usize>,
    /// Its description.
    pub spec: StageSpec,
}

/// The cascade's make-up.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    /// One entry per hop, in forward order.
    pub hops: Vec<HopStage>,
    /// Stages the designer runs itself.
    pub keep: Keep,
    /// Stages of the model.
    pub stages: usize,
    /// The shape of one input sample.
    pub input: Shape,
    /// The hop that runs the loss stage, if remote.
    pub loss_hop: Option<usize>,
}

fn config(message: String) -> DesignerError {
    DesignerError::Config { message }
}

impl Layout {
    /// The layout of `model` over `hops` hops, `keep` kept and dummies at
    /// positions `dummies`; refuses counts that do not add up.
    pub fn new(
        model: &ModelSpec,
        keep: Keep,
        dummies: &[usize],
        hops: usize,
    ) -> Result<Layout, DesignerError> {
        let n = model.stages.len();
        let lo = usize::from(keep.first());
        let hi = n.saturating_sub(usize::from(keep.last()));
        if lo >= hi {
            return Err(config("no stage left to run remotely".into()));
        }
        let real: Vec<HopStage> = model
            .stages
            .iter()
            .cloned()
            .enumerate()
            .take(hi)
            .skip(lo)
            .map(|(i, spec)| HopStage {
                index: Some(i),
                spec,
            })
            .collect();
        if hops != real.len() + dummies.len() {
            return Err(config(format!(
                "{} remote stages and {} dummies but the cascade lists {hops} hops",
                real.len(),
                dummies.len()
            )));
        }
        let hops = with_dummies(real, dummies)?;
        if let Some(c) = model.classes() {
            if c > usize::from(u16::MAX) {
                return Err(config(format!("{c} classes do not fit the label encoding")));
            }
        }
        Ok(Layout {
            loss_hop: hops.iter().position(|h| h.spec.is_loss()),
            hops,
            keep,
            stages: n,
            input: model.input.clone(),
        })
    }

    /// Hops in the cascade.
    pub fn len(&self) -> usize {
        self.hops.len()
    }

    /// No hops (never, for a layout that [`Layout::new`] made).
    pub fn is_empty(&self) -> bool {
        self.hops.is_empty()
    }

    /// Whether hop `j` has parameters: only those are fetched and loaded
    /// (every hop is audited).
    pub fn has_params(&self, j: usize) -> bool {
        self.hops.get(j).is_some_and(|h| h.spec.has_params())
    }

    /// Whether hop `j` computes its input gradient on backward: every hop
    /// but the first, and the first too when the designer keeps the first
    /// stage (it needs the gradient).
    pub fn needs_input_grad(&self, j: usize) -> bool {
        j > 0 || self.keep.first()
    }

    /// The largest body of the cascade: inputs, activations and gradients
    /// of one micro-batch (batches, test ones too, travel in
    /// micro-batches), plus the commitment trailer when audits are on.
    pub fn max_body(&self, cfg: &TrainConfig, audited: bool) -> usize {
        let micro_batches = cfg.micro_batches.clamp(1, usize::from(u16::MAX));
        let b = cfg.batch.div_ceil(micro_batches).max(1);
        let tensor = |s: &Shape| f32_message_len(&s.batched(b)) as usize;
        let mut max_body = match self.hops.first() {
            Some(first) if self.keep.first() => tensor(&first.spec.input),
            // Pixels: one byte per value.
            Some(first) => {
                2 + 4 * (1 + first.spec.input.dims().len()) + b * first.spec.input.numel()
            }
            None => 0,
        };
        for (k, h) in self.hops.iter().enumerate() {
            max_body = max_body.max(tensor(&h.spec.output()));
            max_body = max_body.max(tensor(&h.spec.eval_output()));
            if k > 0 {
                max_body = max_body.max(tensor(&h.spec.input));
            }
        }
        if audited {
            max_body += mixnn_proto::audit::TRAILER_LEN;
        }
        max_body
    }

    /// The padding policy of the cascade's messages.
    pub fn policy(&self, padding: Padding, cfg: &TrainConfig, audited: bool) -> PaddingPolicy {
        match padding {
            Padding::Uniform => PaddingPolicy::Uniform {
                max_body: self.max_body(cfg, audited),
            },
            Padding::Classes => PaddingPolicy::Classes {
                max_body: self.max_body(cfg, audited),
            },
        }
    }

    /// Stages in a checkpoint of this model.
    pub fn stage_count(&self) -> usize {
        self.stages
    }

    /// What each hop loads from checkpoint `c`: its stage's state, or, for
    /// a dummy hop, only the step counter.
    pub fn hop_states(&self, c: &Checkpoint) -> Result<Vec<StageState>, DesignerError> {
        if c.stages.len() != self.stages {
            return Err(config(format!(
                "the checkpoint has {} stages, the model {}",
                c.stages.len(),
                self.stages
            )));
        }
        Ok(self
            .hops
            .iter()
            .map(|h| match h.index {
                Some(i) => c.stages[i].clone(),
                None => StageState {
                    steps: c.step,
                    tensors: Vec::new(),
                },
            })
            .collect())
    }
}

/// Whether a dummy may take `op` from the end of the stage before it: no
/// parameters, no randomness, not the loss.
fn movable(op: &OpSpec) -> bool {
    matches!(
        op,
        OpSpec::Relu
            | OpSpec::MaxPool2d { .. }
            | OpSpec::AvgPool2d { .. }
            | OpSpec::GlobalAvgPool
            | OpSpec::Flatten
            | OpSpec::Normalize { .. }
            | OpSpec::LogSoftmax
    )
}

/// Inserts dummy stages at the hop positions `dummies` among the `real`
/// remote stages: each takes the last op of the real stage before it when
/// that op is [`movable`] and the stage keeps one, else runs `identity`.
fn with_dummies(real: Vec<HopStage>, dummies: &[usize]) -> Result<Vec<HopStage>, DesignerError> {
    let n = real.len() + dummies.len();
    let mut sorted = dummies.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    if sorted.len() != dummies.len() || sorted.last().is_some_and(|d| *d >= n) {
        return Err(config(format!(
            "dummy positions {dummies:?} for a cascade of {n} hops"
        )));
    }
    let mut real = real.into_iter().peekable();
    let mut out: Vec<HopStage> = Vec::with_capacity(n);
    for k in 0..n {
        if sorted.contains(&k) {
            let taken = match out.last_mut() {
                Some(prev)
                    if prev.index.is_some()
                        && prev.spec.ops.len() >= 2
                        && prev.spec.ops.last().is_some_and(movable) =>
                {
                    prev.spec.ops.pop()
                }
                _ => None,
            };
            let input = match out.last() {
                Some(prev) => prev.spec.output(),
                None => real
                    .peek()
                    .map_or_else(|| Shape::flat(1), |h| h.spec.input.clone()),
            };
            out.push(HopStage {
                index: None,
                spec: StageSpec {
                    input,
                    ops: vec![taken.unwrap_or(OpSpec::Identity)],
                },
            });
        } else if let Some(r) = real.next() {
            out.push(r);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const MODEL: &str = r#"
name = "three"
input = 4

[[stage]]
ops = [{ op = "linear", in = 4, out = 3 }]

[[stage]]
ops = [{ op = "log_softmax" }]

[[stage]]
ops = [{ op = "nll_loss" }]
"#;

    fn model() -> ModelSpec {
        ModelSpec::parse(MODEL, "three").unwrap()
    }

    #[test]
    fn dummies_take_the_width_of_their_place() {
        let l = Layout::new(&model(), Keep::None, &[0, 2], 5).unwrap();
        let widths: Vec<(Option<usize>, usize)> = l
            .hops
            .iter()
            .map(|h| (h.index, h.spec.input.numel()))
            .collect();
        assert_eq!(
            widths,
            vec![
                (None, 4),
                (Some(0), 4),
                (None, 3),
                (Some(1), 3),
                (Some(2), 3)
            ]
        );
        assert_eq!(l.loss_hop, Some(4));
        assert!(l.has_params(1) && !l.has_params(0) && !l.has_params(4));
    }

    #[test]
    fn a_dummy_takes_the_last_parameter_free_op_of_the_stage_before_it() {
        let paper =
            ModelSpec::parse(include_str!("../../../../models/paper-mlp.toml"), "paper").unwrap();
        // Hops: dummy, stage 1, dummy, stage 2, dummy, stage 3, …
        let l = Layout::new(&paper, Keep::None, &[0, 2, 4, 6], 9).unwrap();
        let ops: Vec<(Option<usize>, Vec<&str>)> = l
            .hops
            .iter()
            .map(|h| (h.index, h.spec.ops.iter().map(OpSpec::name).collect()))
            .collect();
        assert_eq!(
            ops,
            vec![
                (None, vec!["identity"]),
                (Some(0), vec!["normalize", "linear"]),
                (None, vec!["relu"]),
                (Some(1), vec!["linear"]),
                (None, vec!["relu"]),
                (Some(2), vec!["linear"]),
                // After a stage ending with parameters: nothing to take.
                (None, vec!["identity"]),
                (Some(3), vec!["log_softmax"]),
                (Some(4), vec!["nll_loss"]),
            ]
        );
        assert_eq!(l.hops[2].spec.input, Shape::flat(128));
        assert_eq!(l.hops[2].spec.output(), Shape::flat(128));
        // The shapes still chain from hop to hop.
        for w in l.hops.windows(2) {
            assert_eq!(w[0].spec.output(), w[1].spec.input);
        }
        assert_eq!(l.loss_hop, Some(8));
    }

    #[test]
    fn counts_that_do_not_add_up_are_refused() {
        let m = model();
        assert!(Layout::new(&m, Keep::None, &[], 2).is_err());
        assert!(Layout::new(&m, Keep::None, &[1, 1], 5).is_err());
        assert!(Layout::new(&m, Keep::None, &[9], 4).is_err());
        let err = Layout::new(&m, Keep::Both, &[], 1).unwrap();
        assert_eq!(err.hops.len(), 1);
        assert!(err.needs_input_grad(0));
        let one = ModelSpec::from_stages("one".into(), Shape::flat(4), vec![m.stages[0].clone()])
            .unwrap();
        assert!(Layout::new(&one, Keep::Both, &[], 0).is_err());
    }

    #[test]
    fn the_largest_body_is_the_widest_tensor_of_a_micro_batch() {
        let l = Layout::new(&model(), Keep::None, &[], 3).unwrap();
        let cfg = TrainConfig {
            batch: 10,
            micro_batches: 2,
            ..TrainConfig::default()
        };
        // Pixels in (one byte each), then activations of 3 or 4 floats.
        assert_eq!(l.max_body(&cfg, false), 2 + 8 + 5 * 3 * 4);
        assert_eq!(
            l.max_body(&cfg, true),
            2 + 8 + 5 * 3 * 4 + mixnn_proto::audit::TRAILER_LEN
        );
        let kept = Layout::new(&model(), Keep::First, &[], 2).unwrap();
        assert_eq!(kept.max_body(&cfg, false), 2 + 8 + 5 * 3 * 4);
    }
}
