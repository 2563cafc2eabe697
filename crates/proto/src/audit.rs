//! Audit commitments and openings (Byzantine hops, paper §4.2).
//!
//! In every training step each hop commits to what it did, with a key only
//! it and the designer hold (sent in its [`crate::InitNote`]):
//!
//! ```text
//! forward  c_f = BLAKE3_key("mixnn audit fwd" ‖ step ‖ H(x) ‖ H(y) ‖ D(state before))
//! backward c_b = BLAKE3_key("mixnn audit bwd" ‖ step ‖ H(g_in) ‖ H(g_out) ‖ D(state after))
//! ```
//!
//! (`H` = BLAKE3 of the bytes, `D` = BLAKE3 of [`crate::encode_state`]).
//! Commitments travel back to the designer in a fixed-size **trailer** at
//! the end of every forward and backward body ([`TRAILER_LEN`] bytes), in
//! onion layers ([`crate::trailer`]): each hop strips the trailer before
//! decoding the tensor, puts its slot (state digest, commitment, tag) in
//! front and encrypts the whole under a stream only it and the designer
//! can compute. So every hop receives random-looking bytes, no two hops
//! see a common string, and no hop can forge or move another's slot.
//!
//! An [`Opening`] of a step is what a hop reveals when audited: the state
//! before it, the forward input and output, the backward gradient in and
//! out, and the digest of the state after it claims.

use mixnn_model::stage::StageState;

use crate::{ProtoError, Reader};

/// The audit window: steps whose openings a hop keeps after running them,
/// so that the designer can still audit any of them. The designer drains
/// its pipeline before an audit it has drawn would leave this window; a
/// hop refuses (with an empty opening) an audit of an older step.
pub const KEPT: usize = 16;

/// Bytes of one commitment.
pub const COMMIT_LEN: usize = 32;
/// Bytes of the commitment trailer at the end of forward/backward bodies
/// ([`crate::trailer`]).
pub const TRAILER_LEN: usize = crate::trailer::TRAILER_LEN;

/// One hop's commitment to one direction of one step.
pub type Commitment = [u8; COMMIT_LEN];

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

fn commit(key: &[u8; 32], label: &[u8], step: u64, a: &[u8], b: &[u8], d: &[u8; 32]) -> Commitment {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(label);
    h.update(&step.to_le_bytes());
    h.update(blake3::hash(a).as_bytes());
    h.update(blake3::hash(b).as_bytes());
    h.update(d);
    *h.finalize().as_bytes()
}

/// The forward commitment of `step`: input `x`, output `y`, and the digest
/// of the state the forward ran on.
pub fn commit_forward(
    key: &[u8; 32],
    step: u64,
    x: &[u8],
    y: &[u8],
    before: &[u8; 32],
) -> Commitment {
    commit(key, b"mixnn audit fwd", step, x, y, before)
}

/// The backward commitment of `step`: gradient in and out, and the digest
/// of the state after the update.
pub fn commit_backward(
    key: &[u8; 32],
    step: u64,
    g_in: &[u8],
    g_out: &[u8],
    after: &[u8; 32],
) -> Commitment {
    commit(key, b"mixnn audit bwd", step, g_in, g_out, after)
}

/// Splits a forward/backward body into its payload and its trailer.
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

    /// Whether this opening matches commitments `fwd` and `bwd` under
    /// `key`: `Err` names the first that does not.
    pub fn check(
        &self,
        key: &[u8; 32],
        fwd: &Commitment,
        bwd: &Commitment,
    ) -> Result<(), &'static str> {
        let d = state_digest(&self.before);
        if commit_forward(key, self.step, &self.x, &self.y, &d) != *fwd {
            return Err("the opening does not match the forward commitment");
        }
        if commit_backward(key, self.step, &self.g_in, &self.g_out, &self.after) != *bwd {
            return Err("the opening does not match the backward commitment");
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

    fn commitments(o: &Opening, key: &[u8; 32]) -> (Commitment, Commitment) {
        let d = state_digest(&o.before);
        (
            commit_forward(key, o.step, &o.x, &o.y, &d),
            commit_backward(key, o.step, &o.g_in, &o.g_out, &o.after),
        )
    }

    #[test]
    fn opening_round_trips_and_matches_its_commitments() {
        let o = opening();
        assert_eq!(Opening::decode(&o.encode()).unwrap(), o);
        let (f, b) = commitments(&o, &[1; 32]);
        assert_eq!(o.check(&[1; 32], &f, &b), Ok(()));
    }

    #[test]
    fn tampered_opening_is_detected() {
        let o = opening();
        let key = [1; 32];
        let (f, b) = commitments(&o, &key);
        let mut t = o.clone();
        t.y[0] ^= 1;
        assert!(t.check(&key, &f, &b).unwrap_err().contains("forward"));
        let mut t = o.clone();
        t.before.push(0);
        assert!(t.check(&key, &f, &b).is_err());
        let mut t = o.clone();
        t.g_out[2] ^= 0x80;
        assert!(t.check(&key, &f, &b).unwrap_err().contains("backward"));
        let mut t = o.clone();
        t.after[0] ^= 1;
        assert!(t.check(&key, &f, &b).is_err());
        // Another step, another key: no match either.
        let mut t = o.clone();
        t.step += 1;
        assert!(t.check(&key, &f, &b).is_err());
        assert!(o.check(&[2; 32], &f, &b).is_err());
    }

    #[test]
    fn commitment_mismatch_is_detected() {
        let o = opening();
        let (f, mut b) = commitments(&o, &[1; 32]);
        b[31] ^= 1;
        assert!(o.check(&[1; 32], &f, &b).is_err());
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
