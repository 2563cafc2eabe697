//! Audit commitments and openings (Byzantine hops, paper §4.2).
//!
//! In every forward, backward and test message each hop of an audited
//! session commits to what it did: its [`Slot`] names the digest of its
//! state (before a forward or test, after a backward's update:
//! [`digest_state`]), the hash of the tensor it received and the hash of
//! the tensor it sends ([`hash_tensor`]). Slots travel back to the
//! designer in a fixed-size **trailer** at the end of every such body
//! ([`TRAILER_LEN`] bytes), in onion layers under keys only the hop and
//! the designer hold ([`crate::trailer`]): each hop strips the trailer
//! before decoding the tensor, puts its slot and a tag over the slot and
//! everything it wraps in front, and encrypts the whole under its own
//! stream. So every hop receives random-looking bytes, no two hops see a
//! common string, and no hop can forge, move or spoil another's slot
//! without the damage showing at the layer of the hop before it.
//!
//! The designer checks at every delivery what needs no opening: what one
//! hop says it sent is what the next says it received (and what the
//! designer sent or received at the ends), and each state digest chains
//! from the one before. An [`Opening`] of a step is what a hop reveals
//! when audited: the state before it, the forward input and output, the
//! backward gradient in and out, and the digest of the state after it
//! claims; [`Opening::check`] ties every field to the hop's slots, and the
//! designer re-executes the stage from it.

use mixnn_model::stage::StageState;

use crate::trailer::Slot;
use crate::{ProtoError, Reader};

/// The audit window: steps whose openings a hop keeps after running them,
/// so that the designer can still audit any of them. The designer drains
/// its pipeline before an audit it has drawn would leave this window; a
/// hop refuses (with an empty opening) an audit of an older step.
pub const KEPT: usize = 16;

/// Bytes of the commitment trailer at the end of forward, backward and
/// test bodies ([`crate::trailer`]).
pub const TRAILER_LEN: usize = crate::trailer::TRAILER_LEN;

/// The hash of a tensor message (as sent, [`mixnn_model::tensor_bytes`])
/// that slots name.
pub fn hash_tensor(bytes: &[u8]) -> [u8; 32] {
    *blake3::hash(bytes).as_bytes()
}

/// Digest of an encoded stage state ([`crate::encode_state`]).
pub fn state_digest(encoded_state: &[u8]) -> [u8; 32] {
    *blake3::hash(encoded_state).as_bytes()
}

/// [`state_digest`] of [`crate::encode_state`]`(state)`, without building
/// the encoding (the same bytes, hashed as they are produced).
pub fn digest_state(state: &StageState) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&state.steps.to_le_bytes());
    h.update(&(state.tensors.len() as u16).to_le_bytes());
    let mut buf = [0u8; 4096];
    for p in &state.tensors {
        h.update(&(p.name.len() as u16).to_le_bytes());
        h.update(p.name.as_bytes());
        h.update(&[p.shape.len() as u8]);
        for d in &p.shape {
            h.update(&(*d as u32).to_le_bytes());
        }
        // In memory, f32s are their little-endian encoding on
        // little-endian targets.
        if cfg!(target_endian = "little") {
            h.update(bytemuck::cast_slice::<f32, u8>(&p.values));
            continue;
        }
        for chunk in p.values.chunks(buf.len() / 4) {
            for (b, v) in buf.chunks_exact_mut(4).zip(chunk) {
                b.copy_from_slice(&v.to_le_bytes());
            }
            h.update(&buf[..4 * chunk.len()]);
        }
    }
    *h.finalize().as_bytes()
}

/// Splits a forward, backward or test body into its payload and its
/// trailer.
pub fn split(body: &[u8]) -> Result<(&[u8], &[u8]), ProtoError> {
    let at = body
        .len()
        .checked_sub(TRAILER_LEN)
        .ok_or(ProtoError::Truncated {
            what: "commitment trailer",
            at: body.len(),
        })?;
    Ok(body.split_at(at))
}

/// What a hop reveals about one step when audited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opening {
    /// The step.
    pub step: u64,
    /// The state the forward ran on ([`crate::encode_state`]).
    pub before: Vec<u8>,
    /// Forward input (tensor message).
    pub x: Vec<u8>,
    /// Forward output.
    pub y: Vec<u8>,
    /// Backward gradient in (empty at the loss stage).
    pub g_in: Vec<u8>,
    /// Backward gradient out (empty when none was asked for).
    pub g_out: Vec<u8>,
    /// Digest of the state after the update, as the hop claims it.
    pub after: [u8; 32],
}

impl Opening {
    /// `step ‖ after ‖ (len u32 ‖ bytes) × 5`.
    pub fn encode(&self) -> Vec<u8> {
        let parts = [&self.before, &self.x, &self.y, &self.g_in, &self.g_out];
        let mut out = Vec::with_capacity(40 + parts.iter().map(|p| 4 + p.len()).sum::<usize>());
        out.extend_from_slice(&self.step.to_le_bytes());
        out.extend_from_slice(&self.after);
        for p in parts {
            // Bodies and states are far below 4 GiB (bounded by the cells).
            out.extend_from_slice(&(p.len() as u32).to_le_bytes());
            out.extend_from_slice(p);
        }
        out
    }

    /// Parses [`Opening::encode`] output.
    pub fn decode(bytes: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(bytes, "audit opening");
        let step = r.u64()?;
        let after = r.key()?;
        let mut part = || -> Result<Vec<u8>, ProtoError> {
            let n = r.u32()? as usize;
            Ok(r.take(n)?.to_vec())
        };
        let (before, x, y, g_in, g_out) = (part()?, part()?, part()?, part()?, part()?);
        r.end()?;
        Ok(Opening {
            step,
            before,
            x,
            y,
            g_in,
            g_out,
            after,
        })
    }

    /// Whether this opening of a training step is what the hop's forward
    /// slot `fwd` and backward slot `bwd` of the step said: `Err` names
    /// the first field that is not.
    pub fn check(&self, fwd: &Slot, bwd: &Slot) -> Result<(), &'static str> {
        if state_digest(&self.before) != fwd.digest {
            return Err("the opened state is not the state its forward slot named");
        }
        if hash_tensor(&self.x) != fwd.input {
            return Err("the opened input is not the input its forward slot named");
        }
        if hash_tensor(&self.y) != fwd.output {
            return Err("the opened output is not the output its forward slot named");
        }
        if hash_tensor(&self.g_in) != bwd.input {
            return Err("the opened gradient in is not the one its backward slot named");
        }
        if hash_tensor(&self.g_out) != bwd.output {
            return Err("the opened gradient out is not the one its backward slot named");
        }
        if self.after != bwd.digest {
            return Err("the opened state after is not the state its backward slot named");
        }
        Ok(())
    }

    /// Whether this opening of a test batch is what the hop's test slot
    /// said (a test opening carries no gradients, and `after` is the
    /// digest of `before`: no update).
    pub fn check_test(&self, slot: &Slot) -> Result<(), &'static str> {
        if !self.g_in.is_empty() || !self.g_out.is_empty() {
            return Err("a test opening with gradients");
        }
        let before = state_digest(&self.before);
        if before != slot.digest || self.after != before {
            return Err("the opened state is not the state its test slot named");
        }
        if hash_tensor(&self.x) != slot.input {
            return Err("the opened input is not the input its test slot named");
        }
        if hash_tensor(&self.y) != slot.output {
            return Err("the opened output is not the output its test slot named");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opening() -> Opening {
        Opening {
            step: 9,
            before: vec![1, 2, 3],
            x: vec![4; 10],
            y: vec![5; 7],
            g_in: Vec::new(),
            g_out: vec![6; 3],
            after: [7; 32],
        }
    }

    fn slots(o: &Opening) -> (Slot, Slot) {
        (
            Slot {
                digest: state_digest(&o.before),
                input: hash_tensor(&o.x),
                output: hash_tensor(&o.y),
            },
            Slot {
                digest: o.after,
                input: hash_tensor(&o.g_in),
                output: hash_tensor(&o.g_out),
            },
        )
    }

    #[test]
    fn opening_round_trips_and_matches_its_slots() {
        let o = opening();
        assert_eq!(Opening::decode(&o.encode()).unwrap(), o);
        let (f, b) = slots(&o);
        assert_eq!(o.check(&f, &b), Ok(()));
    }

    #[test]
    fn every_field_of_an_opening_is_tied_to_a_slot() {
        let o = opening();
        let (f, b) = slots(&o);
        type Lie = (&'static str, fn(&mut Opening));
        let changed: [Lie; 6] = [
            ("state", |t| t.before.push(0)),
            ("input", |t| t.x[0] ^= 1),
            ("output", |t| t.y[0] ^= 1),
            ("gradient in", |t| t.g_in.push(1)),
            ("gradient out", |t| t.g_out[2] ^= 0x80),
            ("state after", |t| t.after[0] ^= 1),
        ];
        for (what, change) in changed {
            let mut t = o.clone();
            change(&mut t);
            let err = t.check(&f, &b).unwrap_err();
            assert!(err.contains(what), "{what}: {err}");
        }
        // A test opening: no gradients, no update.
        let test = Opening {
            g_out: Vec::new(),
            after: state_digest(&o.before),
            ..o.clone()
        };
        let (slot, _) = slots(&test);
        assert_eq!(test.check_test(&slot), Ok(()));
        let mut t = test.clone();
        t.after[0] ^= 1;
        assert!(t.check_test(&slot).is_err());
        let mut t = test.clone();
        t.y[1] ^= 1;
        assert!(t.check_test(&slot).unwrap_err().contains("output"));
        assert!(o.check_test(&slot).is_err(), "gradients in a test opening");
    }

    #[test]
    fn split_takes_the_trailer_off_the_end() {
        let mut body = vec![9u8; 5];
        body.extend_from_slice(&[0xEE; TRAILER_LEN]);
        let (p, t) = split(&body).unwrap();
        assert_eq!(p, &[9u8; 5][..]);
        assert_eq!(t.len(), TRAILER_LEN);
        assert!(split(&[0; 10]).is_err());
    }

    #[test]
    fn streamed_state_digest_is_the_digest_of_the_encoding() {
        let state = StageState {
            steps: 3,
            tensors: vec![
                mixnn_model::stage::NamedParam {
                    name: "0.weight".into(),
                    shape: vec![3, 1500],
                    values: (0..4500).map(|i| i as f32 * 0.5).collect(),
                },
                mixnn_model::stage::NamedParam {
                    name: "0.bias".into(),
                    shape: vec![1500],
                    values: vec![-1.0; 1500],
                },
            ],
        };
        assert_eq!(
            digest_state(&state),
            state_digest(&crate::encode_state(&state))
        );
    }

    #[test]
    fn truncated_opening_is_refused() {
        let bytes = opening().encode();
        assert!(Opening::decode(&bytes[..bytes.len() - 1]).is_err());
    }
}
