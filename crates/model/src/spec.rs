//! The model description: a model is a list of stages, a stage a list of ops.
//!
//! ```toml
//! name = "paper-mlp"
//! input = 784            # features per sample entering stage 1
//!
//! [[stage]]
//! ops = [{ op = "linear", in = 784, out = 128 }, { op = "relu" }]
//!
//! [[stage]]
//! ops = [{ op = "nll_loss" }]
//! ```
//!
//! Ops take and give `[batch, features]` activations today. The `op` key
//! selects the kind; further kinds (`conv2d`, `max_pool`, `flatten`,
//! `dropout`) slot in as new [`OpSpec`] variants with their own keys.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// One operation inside a stage, with its dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
#[non_exhaustive]
pub enum OpSpec {
    /// `y = x·W + b`, `W` of shape `[in, out]`.
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
    /// Identity: what a dummy hop runs (forwards activations unchanged).
    Identity,
    /// `x − log Σ exp(x)` over the feature axis.
    LogSoftmax,
    /// Mean negative log-likelihood of the labelled class; ends a model.
    NllLoss,
}

/// The names accepted in the `op` key, for error messages.
pub const KNOWN_OPS: &[&str] = &[
    "linear",
    "normalize",
    "relu",
    "identity",
    "log_softmax",
    "nll_loss",
];

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
        }
    }

    /// Whether the op holds trainable parameters.
    pub fn has_params(&self) -> bool {
        matches!(self, OpSpec::Linear { .. })
    }
}

impl fmt::Display for OpSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpSpec::Linear { input, output } => write!(f, "linear({input}, {output})"),
            OpSpec::Normalize { mean, std } => write!(f, "normalize({mean:?}, {std:?})"),
            other => f.write_str(other.name()),
        }
    }
}

/// The slice of a model that one server runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageSpec {
    /// Features per sample entering the stage.
    pub input: usize,
    /// The ops, applied in order.
    pub ops: Vec<OpSpec>,
}

impl StageSpec {
    /// Features per sample leaving the stage (1 for a loss stage).
    pub fn output(&self) -> usize {
        self.ops.iter().fold(self.input, |dim, op| match op {
            OpSpec::Linear { output, .. } => *output,
            OpSpec::NllLoss => 1,
            _ => dim,
        })
    }

    /// Whether this stage ends with the loss and so needs labels.
    pub fn is_loss(&self) -> bool {
        matches!(self.ops.last(), Some(OpSpec::NllLoss))
    }

    /// Whether the stage holds trainable parameters.
    pub fn has_params(&self) -> bool {
        self.ops.iter().any(OpSpec::has_params)
    }

    /// A stage that changes nothing: what a dummy hop runs.
    pub fn identity(features: usize) -> Self {
        StageSpec {
            input: features,
            ops: vec![OpSpec::Identity],
        }
    }
}

/// A whole model: validated, so dimensions chain and only the last op of
/// the last stage is a loss.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelSpec {
    /// A human name for the model.
    pub name: String,
    /// Features per sample entering the model.
    pub input: usize,
    /// The stages, in cascade order.
    pub stages: Vec<StageSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    name: Option<String>,
    input: Option<usize>,
    #[serde(default)]
    stage: Vec<RawStage>,
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
        let input = raw
            .input
            .ok_or_else(|| spec_err("missing `input` (features per sample)".into()))?;
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
            stages.push(StageSpec { input: 0, ops });
        }
        Self::from_stages(raw.name.unwrap_or_else(|| "model".into()), input, stages)
    }

    /// Builds a model from stages, filling in each stage's input width and
    /// checking that dimensions chain and that the loss comes last.
    pub fn from_stages(name: String, input: usize, mut stages: Vec<StageSpec>) -> Result<Self> {
        if stages.is_empty() {
            return Err(ModelError::Spec {
                source_name: name,
                message: "the model has no stages".into(),
            });
        }
        let n = stages.len();
        let mut dim = input;
        for (si, stage) in stages.iter_mut().enumerate() {
            stage.input = dim;
            let m = stage.ops.len();
            for (oi, op) in stage.ops.iter().enumerate() {
                let fail = |message: String| ModelError::Op {
                    stage: si + 1,
                    op: oi + 1,
                    op_name: op.name().to_string(),
                    message,
                };
                match *op {
                    OpSpec::Linear { input, output } => {
                        if input != dim {
                            return Err(fail(format!(
                                "expects {input} input features but the previous op gives {dim}"
                            )));
                        }
                        if output == 0 {
                            return Err(fail("`out` must be at least 1".into()));
                        }
                        dim = output;
                    }
                    OpSpec::NllLoss => {
                        if si + 1 != n || oi + 1 != m {
                            return Err(fail(
                                "nll_loss must be the last op of the last stage".into(),
                            ));
                        }
                        if dim < 2 {
                            return Err(fail(format!("needs at least 2 classes, got {dim}")));
                        }
                    }
                    OpSpec::Normalize { mean, std } => {
                        if !mean.is_finite() || !std.is_finite() || std == 0.0 {
                            return Err(fail(format!(
                                "needs a finite mean and a finite, non-zero std, got {mean} and {std}"
                            )));
                        }
                    }
                    OpSpec::Relu | OpSpec::Identity | OpSpec::LogSoftmax => {}
                }
            }
        }
        Ok(ModelSpec {
            name,
            input,
            stages,
        })
    }

    /// Number of classes the loss expects (the width entering `nll_loss`).
    pub fn classes(&self) -> Option<usize> {
        self.stages.last().filter(|s| s.is_loss()).map(|s| {
            s.ops[..s.ops.len() - 1]
                .iter()
                .fold(s.input, |d, op| match op {
                    OpSpec::Linear { output, .. } => *output,
                    _ => d,
                })
        })
    }

    /// The model as TOML, parseable by [`ModelSpec::parse`].
    pub fn to_toml(&self) -> String {
        let mut out = format!("name = {:?}\ninput = {}\n", self.name, self.input);
        for stage in &self.stages {
            out.push_str("\n[[stage]]\nops = [");
            let ops: Vec<String> = stage
                .ops
                .iter()
                .map(|op| match op {
                    OpSpec::Linear { input, output } => {
                        format!("{{ op = \"linear\", in = {input}, out = {output} }}")
                    }
                    OpSpec::Normalize { mean, std } => {
                        format!("{{ op = \"normalize\", mean = {mean:?}, std = {std:?} }}")
                    }
                    other => format!("{{ op = \"{}\" }}", other.name()),
                })
                .collect();
            out.push_str(&ops.join(", "));
            out.push_str("]\n");
        }
        out
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
    value
        .clone()
        .try_into::<OpSpec>()
        .map_err(|e| fail(e.message().to_string().replace('\n', " ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAPER: &str = include_str!("../../../models/paper-mlp.toml");

    #[test]
    fn paper_model_parses_into_five_stages() {
        let m = ModelSpec::parse(PAPER, "paper").unwrap();
        assert_eq!(m.stages.len(), 5);
        assert_eq!(m.stages[0].output(), 128);
        assert_eq!(m.stages[2].output(), 10);
        assert_eq!(m.stages[3].input, 10);
        assert!(m.stages[4].is_loss());
        assert_eq!(m.classes(), Some(10));
    }

    #[test]
    fn toml_round_trips() {
        let m = ModelSpec::parse(PAPER, "paper").unwrap();
        assert_eq!(ModelSpec::parse(&m.to_toml(), "again").unwrap(), m);
    }

    #[test]
    fn unknown_op_names_stage_and_op() {
        let text = "input = 4\n[[stage]]\nops = [{ op = \"relu\" }, { op = \"conv9d\" }]\n";
        let err = ModelSpec::parse(text, "t").unwrap_err().to_string();
        assert_eq!(
            err,
            "stage 1, op 2 (conv9d): unknown op (known: linear, normalize, relu, identity, log_softmax, nll_loss)"
        );
        assert!(!err.contains('\n'));
    }

    #[test]
    fn broken_dimension_chain_is_one_line() {
        let text = "input = 784\n[[stage]]\nops = [{ op = \"linear\", in = 784, out = 128 }]\n\
                    [[stage]]\nops = [{ op = \"linear\", in = 100, out = 10 }]\n";
        let err = ModelSpec::parse(text, "t").unwrap_err().to_string();
        assert_eq!(
            err,
            "stage 2, op 1 (linear): expects 100 input features but the previous op gives 128"
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
