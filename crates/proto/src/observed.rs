//! What a curious hop sees of the model, written down: the records of a
//! node built with the `adversary` feature (`mixnn node --record-tensors
//! FILE`, `NodeConfig::observe`), read back by the adversary simulator
//! (`mixnn-adversary`, `mixnn adversary`). No message of the protocol
//! carries these; they live here because both ends (the node that writes
//! them, the simulator that reads them) depend on this crate.
//!
//! One [`Observation`] per event, each encoded as
//!
//! ```text
//! stage     0 ‖ first u8 ‖ last u8 ‖ StageSpec::encode
//! forward   1 ‖ step u64 ‖ micro u16 ‖ at_us u64 ‖ n u32 ‖ labels u32 × n ‖ input bytes ‖ output bytes
//! backward  2 ‖ step u64 ‖ micro u16 ‖ at_us u64 ‖ grad bytes ‖ input_grad bytes
//! test      3 ‖ step u64 ‖ at_us u64 ‖ input bytes ‖ output bytes
//! final     4 ‖ encode_state
//! ```
//!
//! where `bytes` is `len u32 ‖ bytes` and tensors are tensor messages
//! ([`mixnn_model::tensor_bytes`]) exactly as the hop received or sent
//! them (commitment trailers taken off). `at_us` is the hop's wall clock
//! (microseconds since the Unix epoch) when the message reached its
//! stage: what colluders compare to order their hops by timing.

use mixnn_model::spec::StageSpec;
use mixnn_model::stage::StageState;

use crate::{decode_state, encode_state, ProtoError, Reader, Result};

/// One thing a hop saw of the model.
#[derive(Debug, Clone, PartialEq)]
pub enum Observation {
    /// The stage its init note gave it, and whether the init named the
    /// designer as its previous hop (`first`) or its next (`last`).
    Stage {
        /// The stage it runs.
        spec: StageSpec,
        /// Its previous hop is the designer.
        first: bool,
        /// Its next hop is the designer.
        last: bool,
    },
    /// A training forward: what came in, the labels of its note (the loss
    /// stage's only), what went out.
    Forward {
        /// The step of its note.
        step: u64,
        /// Which micro-batch of the step.
        micro: u16,
        /// Arrival at the stage, µs since the Unix epoch.
        at_us: u64,
        /// The note's labels (empty unless the hop computes the loss).
        labels: Vec<u32>,
        /// The activation (or pixels) received.
        input: Vec<u8>,
        /// The activation (or loss) sent.
        output: Vec<u8>,
    },
    /// A backward: the gradient received and the one sent.
    Backward {
        /// The step of its note.
        step: u64,
        /// Which micro-batch of the step.
        micro: u16,
        /// Arrival at the stage, µs since the Unix epoch.
        at_us: u64,
        /// The gradient of the stage's output (empty at the loss stage).
        grad: Vec<u8>,
        /// The gradient of its input sent on (empty when not asked for).
        input_grad: Vec<u8>,
    },
    /// A test forward (no labels, no update).
    Test {
        /// The step of its note (updates applied so far).
        step: u64,
        /// Arrival at the stage, µs since the Unix epoch.
        at_us: u64,
        /// What came in.
        input: Vec<u8>,
        /// What went out.
        output: Vec<u8>,
    },
    /// The stage's state when its session ended (closed or expired).
    Final(StageState),
}

const STAGE: u8 = 0;
const FORWARD: u8 = 1;
const BACKWARD: u8 = 2;
const TEST: u8 = 3;
const FINAL: u8 = 4;

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn take_bytes(r: &mut Reader<'_>) -> Result<Vec<u8>> {
    let n = r.u32()? as usize;
    Ok(r.take(n)?.to_vec())
}

impl Observation {
    /// The record's bytes (see the module documentation).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Observation::Stage { spec, first, last } => {
                out.extend_from_slice(&[STAGE, u8::from(*first), u8::from(*last)]);
                out.extend_from_slice(&spec.encode());
            }
            Observation::Forward {
                step,
                micro,
                at_us,
                labels,
                input,
                output,
            } => {
                out.push(FORWARD);
                out.extend_from_slice(&step.to_le_bytes());
                out.extend_from_slice(&micro.to_le_bytes());
                out.extend_from_slice(&at_us.to_le_bytes());
                out.extend_from_slice(&(labels.len() as u32).to_le_bytes());
                for l in labels {
                    out.extend_from_slice(&l.to_le_bytes());
                }
                put_bytes(&mut out, input);
                put_bytes(&mut out, output);
            }
            Observation::Backward {
                step,
                micro,
                at_us,
                grad,
                input_grad,
            } => {
                out.push(BACKWARD);
                out.extend_from_slice(&step.to_le_bytes());
                out.extend_from_slice(&micro.to_le_bytes());
                out.extend_from_slice(&at_us.to_le_bytes());
                put_bytes(&mut out, grad);
                put_bytes(&mut out, input_grad);
            }
            Observation::Test {
                step,
                at_us,
                input,
                output,
            } => {
                out.push(TEST);
                out.extend_from_slice(&step.to_le_bytes());
                out.extend_from_slice(&at_us.to_le_bytes());
                put_bytes(&mut out, input);
                put_bytes(&mut out, output);
            }
            Observation::Final(state) => {
                out.push(FINAL);
                out.extend_from_slice(&encode_state(state));
            }
        }
        out
    }

    /// Parses [`Observation::encode`] output.
    pub fn decode(bytes: &[u8]) -> Result<Observation> {
        let mut r = Reader::new(bytes, "observation");
        let o = match r.u8()? {
            STAGE => {
                let first = r.u8()? != 0;
                let last = r.u8()? != 0;
                let (spec, used) =
                    StageSpec::decode(r.rest()).map_err(|reason| ProtoError::Invalid {
                        what: "observation",
                        reason,
                    })?;
                r.skip(used)?;
                Observation::Stage { spec, first, last }
            }
            FORWARD => {
                let step = r.u64()?;
                let micro = r.u16()?;
                let at_us = r.u64()?;
                let n = r.u32()? as usize;
                let raw = r.take(n.saturating_mul(4))?;
                let labels = raw
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                Observation::Forward {
                    step,
                    micro,
                    at_us,
                    labels,
                    input: take_bytes(&mut r)?,
                    output: take_bytes(&mut r)?,
                }
            }
            BACKWARD => Observation::Backward {
                step: r.u64()?,
                micro: r.u16()?,
                at_us: r.u64()?,
                grad: take_bytes(&mut r)?,
                input_grad: take_bytes(&mut r)?,
            },
            TEST => Observation::Test {
                step: r.u64()?,
                at_us: r.u64()?,
                input: take_bytes(&mut r)?,
                output: take_bytes(&mut r)?,
            },
            FINAL => {
                let state = decode_state(r.rest())?;
                r.skip(r.rest().len())?;
                Observation::Final(state)
            }
            other => {
                return Err(ProtoError::Invalid {
                    what: "observation",
                    reason: format!("unknown kind {other}"),
                })
            }
        };
        r.end()?;
        Ok(o)
    }
}

/// The step of a test observation read from its first bytes only, `None`
/// for every other kind: how a reader finds the test phases without
/// decoding any tensor.
pub fn test_step(record: &[u8]) -> Option<u64> {
    (record.first() == Some(&TEST))
        .then(|| record.get(1..9))
        .flatten()
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
}

/// Splits a record file (`len u32 LE ‖ record` each, as `mixnn node
/// --record-tensors` writes it) into its records.
pub fn split_records(file: &[u8]) -> Result<Vec<&[u8]>> {
    let mut r = Reader::new(file, "record file");
    let mut out = Vec::new();
    while !r.rest().is_empty() {
        let n = r.u32()? as usize;
        out.push(r.take(n)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn all() -> Vec<Observation> {
        crate::fuzzing::observation_samples()
    }

    #[test]
    fn every_observation_decodes_to_itself() {
        for o in all() {
            assert_eq!(Observation::decode(&o.encode()).unwrap(), o);
        }
    }

    #[test]
    fn truncated_or_extended_observations_are_refused() {
        for o in all() {
            let b = o.encode();
            assert!(Observation::decode(&b[..b.len() - 1]).is_err(), "{o:?}");
            let mut longer = b.clone();
            longer.push(0);
            assert!(Observation::decode(&longer).is_err(), "{o:?}");
        }
        assert!(Observation::decode(&[9]).is_err());
    }

    #[test]
    fn the_step_of_a_test_is_read_without_decoding() {
        let steps: Vec<Option<u64>> = all().iter().map(|o| test_step(&o.encode())).collect();
        assert_eq!(steps, vec![None, None, None, Some(9), None]);
    }

    #[test]
    fn a_record_file_splits_into_its_records() {
        let mut file = Vec::new();
        for o in all() {
            let b = o.encode();
            file.extend_from_slice(&(b.len() as u32).to_le_bytes());
            file.extend_from_slice(&b);
        }
        let records = split_records(&file).unwrap();
        assert_eq!(records.len(), 5);
        assert_eq!(Observation::decode(records[1]).unwrap(), all()[1]);
        assert!(split_records(&file[..file.len() - 1]).is_err());
    }
}
