//! The init note: what a hop learns when a session is set up.

use mixnn_model::spec::{OpSpec, StageSpec};
use mixnn_model::stage::Sgd;

use crate::{ProtoError, Reader, Result};

/// What a hop learns at init, besides its routing block.
#[derive(Debug, Clone, PartialEq)]
pub struct InitNote {
    /// The stage it runs (an identity stage for a dummy hop).
    pub stage: StageSpec,
    /// Optimiser settings.
    pub sgd: Sgd,
    /// Seed of the stage's parameter initialisation.
    pub seed: u64,
    /// Training steps the stage counts as applied when it starts (0 for a
    /// new run; a checkpoint's step when the designer rebuilds a cascade).
    pub start_step: u64,
    /// Uniform padding target of the cascade (largest body), or 0 for
    /// size classes.
    pub max_body: u32,
    /// Link key of whoever sends it forward traffic (previous hop or designer).
    pub prev_link: [u8; 32],
    /// Link key of whoever it sends forward traffic to (next hop or designer).
    pub next_link: [u8; 32],
    /// Link key of the designer (deliveries).
    pub designer_link: [u8; 32],
    /// Key of this hop's audit commitments ([`crate::audit`]), fresh per hop and
    /// session; `None`: the hop commits to nothing and carries no
    /// commitment trailer. Encoded only when present.
    pub audit_key: Option<[u8; 32]>,
}

const OP_LINEAR: u8 = 1;
const OP_RELU: u8 = 2;
const OP_IDENTITY: u8 = 3;
const OP_LOG_SOFTMAX: u8 = 4;
const OP_NLL_LOSS: u8 = 5;
const OP_NORMALIZE: u8 = 6;
/// Largest stage input/width accepted from a note.
pub const MAX_WIDTH: u32 = 1 << 20;
/// Most ops in one stage.
pub const MAX_OPS: usize = 64;

impl InitNote {
    /// Encodes the note.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(160);
        out.extend_from_slice(&(self.stage.input as u32).to_le_bytes());
        // At most MAX_OPS ops (checked when stages are built by the designer).
        out.push(self.stage.ops.len().min(255) as u8);
        for op in &self.stage.ops {
            match *op {
                OpSpec::Linear { input, output } => {
                    out.push(OP_LINEAR);
                    out.extend_from_slice(&(input as u32).to_le_bytes());
                    out.extend_from_slice(&(output as u32).to_le_bytes());
                }
                OpSpec::Normalize { mean, std } => {
                    out.push(OP_NORMALIZE);
                    out.extend_from_slice(&mean.to_bits().to_le_bytes());
                    out.extend_from_slice(&std.to_bits().to_le_bytes());
                }
                OpSpec::Relu => out.push(OP_RELU),
                OpSpec::LogSoftmax => out.push(OP_LOG_SOFTMAX),
                OpSpec::NllLoss => out.push(OP_NLL_LOSS),
                // Identity and any op added later without a wire code.
                _ => out.push(OP_IDENTITY),
            }
        }
        out.extend_from_slice(&self.sgd.lr.to_bits().to_le_bytes());
        out.extend_from_slice(&self.sgd.momentum.to_bits().to_le_bytes());
        out.extend_from_slice(&self.seed.to_le_bytes());
        out.extend_from_slice(&self.start_step.to_le_bytes());
        out.extend_from_slice(&self.max_body.to_le_bytes());
        out.extend_from_slice(&self.prev_link);
        out.extend_from_slice(&self.next_link);
        out.extend_from_slice(&self.designer_link);
        if let Some(k) = &self.audit_key {
            out.extend_from_slice(k);
        }
        out
    }

    /// Decodes and checks a note (the stage spec must chain).
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let what = "init note";
        let mut r = Reader::new(bytes, what);
        let input = r.u32()?;
        let n = usize::from(r.u8()?);
        let invalid = |reason: String| ProtoError::Invalid { what, reason };
        if input == 0 || input > MAX_WIDTH || n == 0 || n > MAX_OPS {
            return Err(invalid(format!("stage input {input} with {n} ops")));
        }
        let mut ops = Vec::with_capacity(n);
        for _ in 0..n {
            ops.push(match r.u8()? {
                OP_LINEAR => {
                    let (i, o) = (r.u32()?, r.u32()?);
                    if i == 0 || o == 0 || i > MAX_WIDTH || o > MAX_WIDTH {
                        return Err(invalid(format!("linear({i}, {o})")));
                    }
                    OpSpec::Linear {
                        input: i as usize,
                        output: o as usize,
                    }
                }
                OP_NORMALIZE => OpSpec::Normalize {
                    mean: r.f32()?,
                    std: r.f32()?,
                },
                OP_RELU => OpSpec::Relu,
                OP_IDENTITY => OpSpec::Identity,
                OP_LOG_SOFTMAX => OpSpec::LogSoftmax,
                OP_NLL_LOSS => OpSpec::NllLoss,
                other => return Err(invalid(format!("unknown op code {other}"))),
            });
        }
        let stage = StageSpec {
            input: input as usize,
            ops,
        };
        // The same checks as a model file: dimensions chain, loss last.
        mixnn_model::spec::ModelSpec::from_stages("stage".into(), stage.input, vec![stage.clone()])
            .map_err(|e| invalid(e.to_string()))?;
        let sgd = Sgd {
            lr: r.f32()?,
            momentum: r.f32()?,
        };
        if !sgd.lr.is_finite() || !sgd.momentum.is_finite() {
            return Err(invalid("non-finite optimiser settings".into()));
        }
        let note = InitNote {
            stage,
            sgd,
            seed: r.u64()?,
            start_step: r.u64()?,
            max_body: r.u32()?,
            prev_link: r.key()?,
            next_link: r.key()?,
            designer_link: r.key()?,
            audit_key: None,
        };
        let note = if r.at < r.bytes.len() {
            InitNote {
                audit_key: Some(r.key()?),
                ..note
            }
        } else {
            note
        };
        r.end()?;
        Ok(note)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn note() -> InitNote {
        InitNote {
            stage: StageSpec {
                input: 784,
                ops: vec![
                    OpSpec::Linear {
                        input: 784,
                        output: 128,
                    },
                    OpSpec::Relu,
                ],
            },
            sgd: Sgd::default(),
            seed: 99,
            start_step: 7,
            max_body: 50_000,
            prev_link: [1; 32],
            next_link: [2; 32],
            designer_link: [3; 32],
            audit_key: None,
        }
    }

    #[test]
    fn init_note_round_trips_and_is_compact() {
        let n = note();
        let b = n.encode();
        assert_eq!(InitNote::decode(&b).unwrap(), n);
        assert!(b.len() < 160, "{}", b.len());
    }

    #[test]
    fn init_note_rejects_a_broken_stage() {
        let mut n = note();
        n.stage.ops.push(OpSpec::Linear {
            input: 64,
            output: 10,
        });
        let err = InitNote::decode(&n.encode()).unwrap_err().to_string();
        assert!(
            err.contains("expects 64 input features but the previous op gives 128"),
            "{err}"
        );
        let mut b = note().encode();
        b[5] = 77;
        assert!(InitNote::decode(&b)
            .unwrap_err()
            .to_string()
            .contains("unknown op code 77"));
    }

    proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = InitNote::decode(&bytes);
        }
    }
}
