//! The commitment trailer, in onion layers: how each hop's commitment of a
//! step travels back to the designer without revealing order or distance,
//! and without another hop being able to forge, move or read it.
//!
//! A forward or backward body of an audited session ends in [`TRAILER_LEN`]
//! bytes. A hop strips them, computes its output and its [`Slot`] (the
//! digest of its state and its commitment, [`crate::audit`]), and sends on
//!
//! ```text
//! trailer_out = S_hop ⊕ (slot ‖ tag ‖ trailer_in[.. TRAILER_LEN − SLOT_LEN])
//! ```
//!
//! where `tag` authenticates the slot under a key only the hop and the
//! designer hold, bound to the step, direction and micro-batch, and `S_hop`
//! is a keystream under another such key, fresh per message. So every hop
//! receives bytes that look random (the layer of the hop before it), no
//! two hops see a common string, and the position of a slot tells nothing.
//! The designer, who knows every hop's keys, peels the layers from the last
//! hop back to the first ([`open`]).
//!
//! A hop can still overwrite bytes it cannot read: the designer then finds
//! an invalid tag ([`SlotError::Forged`]) and knows the trailer was damaged
//! by that hop or one after it — never a valid-looking slot that the hop it
//! names did not write, so no honest hop is blamed for another's damage.

use crate::audit::{Commitment, COMMIT_LEN};
use crate::ProtoError;

/// Bytes of a slot's tag.
pub const TAG_LEN: usize = 16;
/// Bytes of one hop's slot on the wire: digest ‖ commitment ‖ tag.
pub const SLOT_LEN: usize = 32 + COMMIT_LEN + TAG_LEN;
/// Slots in a trailer: the longest cascade (wire's `MAX_HOPS`).
pub const SLOTS: usize = 32;
/// Bytes of the trailer at the end of audited forward and backward bodies.
pub const TRAILER_LEN: usize = SLOT_LEN * SLOTS;

const CTX_MAC: &str = "mixnn-proto v2 2026 trailer slot tag key";
const CTX_STREAM: &str = "mixnn-proto v2 2026 trailer layer stream key";

/// The direction of a message through the cascade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Activations, first hop to last.
    Forward,
    /// Gradients, last hop to first.
    Backward,
}

impl Direction {
    fn byte(self) -> u8 {
        match self {
            Direction::Forward => 1,
            Direction::Backward => 2,
        }
    }
}

/// Which message of a session a slot belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SlotContext {
    /// The training step.
    pub step: u64,
    /// Forward or backward.
    pub direction: Direction,
    /// The micro-batch.
    pub micro: u16,
}

impl SlotContext {
    fn bytes(&self) -> [u8; 11] {
        let mut b = [0u8; 11];
        b[..8].copy_from_slice(&self.step.to_le_bytes());
        b[8] = self.direction.byte();
        b[9..].copy_from_slice(&self.micro.to_le_bytes());
        b
    }
}

/// What a hop states about one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// Digest of the hop's state ([`crate::audit::digest_state`]): the state
    /// a forward ran on, or the state a backward left (after the update).
    pub digest: [u8; 32],
    /// The hop's commitment to the message ([`crate::audit`]).
    pub commitment: Commitment,
}

/// Why the designer could not take a hop's slot from a trailer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SlotError {
    /// The slot's tag does not verify: the hop did not write it for this
    /// message, or a later hop damaged the trailer.
    #[error("the slot's tag does not verify (damaged by this hop or a later one)")]
    Forged,
}

/// A hop's two trailer keys, derived from its audit key.
#[derive(Clone)]
pub struct TrailerKeys {
    mac: [u8; 32],
    stream: [u8; 32],
}

impl std::fmt::Debug for TrailerKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TrailerKeys(..)")
    }
}

impl TrailerKeys {
    /// The keys of the hop whose audit key is `audit_key`.
    pub fn new(audit_key: &[u8; 32]) -> Self {
        TrailerKeys {
            mac: blake3::derive_key(CTX_MAC, audit_key),
            stream: blake3::derive_key(CTX_STREAM, audit_key),
        }
    }

    fn tag(&self, ctx: &SlotContext, digest: &[u8], commitment: &[u8]) -> [u8; TAG_LEN] {
        let mut h = blake3::Hasher::new_keyed(&self.mac);
        h.update(&ctx.bytes());
        h.update(digest);
        h.update(commitment);
        let mut out = [0u8; TAG_LEN];
        h.finalize_xof().fill(&mut out);
        out
    }

    /// XORs this hop's keystream for `ctx` into `bytes` (from its start).
    fn apply_stream(&self, ctx: &SlotContext, bytes: &mut [u8]) {
        let mut h = blake3::Hasher::new_keyed(&self.stream);
        h.update(&ctx.bytes());
        let mut reader = h.finalize_xof();
        let mut block = [0u8; 64];
        for chunk in bytes.chunks_mut(64) {
            reader.fill(&mut block[..chunk.len()]);
            for (b, k) in chunk.iter_mut().zip(&block) {
                *b ^= k;
            }
        }
    }
}

/// Hop side: the trailer to send on, given the one received (exactly
/// [`TRAILER_LEN`] bytes) and this hop's slot for the message.
pub fn add_layer(
    keys: &TrailerKeys,
    ctx: &SlotContext,
    slot: &Slot,
    trailer_in: &[u8],
) -> Result<Vec<u8>, ProtoError> {
    if trailer_in.len() != TRAILER_LEN {
        return Err(ProtoError::Invalid {
            what: "commitment trailer",
            reason: format!("{} bytes, not {TRAILER_LEN}", trailer_in.len()),
        });
    }
    let mut out = Vec::with_capacity(TRAILER_LEN);
    out.extend_from_slice(&slot.digest);
    out.extend_from_slice(&slot.commitment);
    out.extend_from_slice(&keys.tag(ctx, &slot.digest, &slot.commitment));
    out.extend_from_slice(&trailer_in[..TRAILER_LEN - SLOT_LEN]);
    keys.apply_stream(ctx, &mut out);
    Ok(out)
}

/// Designer side: the slots of the hops a message visited, from the
/// trailer it came back with. `visited` holds their keys in the order the
/// message visited them (at most [`SLOTS`]); the result is in the same
/// order.
pub fn open(
    visited: &[&TrailerKeys],
    ctx: &SlotContext,
    trailer: &[u8],
) -> Result<Vec<Result<Slot, SlotError>>, ProtoError> {
    if trailer.len() != TRAILER_LEN {
        return Err(ProtoError::Invalid {
            what: "commitment trailer",
            reason: format!("{} bytes, not {TRAILER_LEN}", trailer.len()),
        });
    }
    if visited.len() > SLOTS {
        return Err(ProtoError::Invalid {
            what: "commitment trailer",
            reason: format!("{} hops, at most {SLOTS}", visited.len()),
        });
    }
    let mut rest = trailer.to_vec();
    let mut slots = Vec::with_capacity(visited.len());
    for keys in visited.iter().rev() {
        keys.apply_stream(ctx, &mut rest);
        let (digest, more) = rest.split_at(32);
        let (commitment, more) = more.split_at(COMMIT_LEN);
        let (tag, more) = more.split_at(TAG_LEN);
        let valid = subtle_eq(&keys.tag(ctx, digest, commitment), tag);
        slots.push(if valid {
            let mut s = Slot {
                digest: [0; 32],
                commitment: [0; COMMIT_LEN],
            };
            s.digest.copy_from_slice(digest);
            s.commitment.copy_from_slice(commitment);
            Ok(s)
        } else {
            Err(SlotError::Forged)
        });
        rest = more.to_vec();
    }
    slots.reverse();
    Ok(slots)
}

/// Constant-time equality of two tags.
fn subtle_eq(a: &[u8; TAG_LEN], b: &[u8]) -> bool {
    b.len() == TAG_LEN && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn keys(n: usize) -> Vec<TrailerKeys> {
        (0..n)
            .map(|i| TrailerKeys::new(&[i as u8 + 1; 32]))
            .collect()
    }

    fn slot(i: usize) -> Slot {
        Slot {
            digest: [0x40 + i as u8; 32],
            commitment: [0x80 + i as u8; COMMIT_LEN],
        }
    }

    const CTX: SlotContext = SlotContext {
        step: 7,
        direction: Direction::Forward,
        micro: 0,
    };

    fn random_trailer(seed: u8) -> Vec<u8> {
        let mut h = blake3::Hasher::new();
        h.update(&[seed]);
        let mut t = vec![0u8; TRAILER_LEN];
        h.finalize_xof().fill(&mut t);
        t
    }

    /// Runs a trailer through the hops; returns what each hop received.
    fn through(keys: &[TrailerKeys], mut t: Vec<u8>) -> (Vec<u8>, Vec<Vec<u8>>) {
        let mut received = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            received.push(t.clone());
            t = add_layer(k, &CTX, &slot(i), &t).unwrap();
        }
        (t, received)
    }

    #[test]
    fn the_designer_gets_every_hops_slot_in_visit_order() {
        for n in [1, 2, 5, SLOTS] {
            let k = keys(n);
            let (t, _) = through(&k, random_trailer(1));
            assert_eq!(t.len(), TRAILER_LEN);
            let refs: Vec<&TrailerKeys> = k.iter().collect();
            let got = open(&refs, &CTX, &t).unwrap();
            let want: Vec<Result<Slot, SlotError>> = (0..n).map(|i| Ok(slot(i))).collect();
            assert_eq!(got, want, "{n} hops");
        }
    }

    #[test]
    fn hops_see_no_common_8_byte_string_and_no_slot() {
        let k = keys(5);
        let (_, received) = through(&k, random_trailer(2));
        let windows = |b: &[u8]| -> HashSet<[u8; 8]> {
            b.windows(8).map(|w| w.try_into().unwrap()).collect()
        };
        for a in 0..5 {
            for b in a + 1..5 {
                let common = windows(&received[a])
                    .intersection(&windows(&received[b]))
                    .count();
                assert_eq!(common, 0, "hops {a} and {b}");
            }
            // No hop finds an earlier hop's slot bytes in what it receives.
            for earlier in 0..a {
                let s = slot(earlier);
                let probe: [u8; 8] = s.digest[..8].try_into().unwrap();
                assert!(!windows(&received[a]).contains(&probe));
            }
        }
    }

    #[test]
    fn a_later_hop_cannot_forge_or_move_a_slot() {
        let k = keys(4);
        let refs: Vec<&TrailerKeys> = k.iter().collect();
        // Hop 3 flips bits where hop 1's slot lies (two layers in).
        let mut t = random_trailer(3);
        for (i, key) in k.iter().enumerate() {
            if i == 3 {
                t[SLOT_LEN + 5] ^= 0x10;
            }
            t = add_layer(key, &CTX, &slot(i), &t).unwrap();
        }
        let got = open(&refs, &CTX, &t).unwrap();
        assert_eq!(got[1], Err(SlotError::Forged));
        for i in [0, 2, 3] {
            assert_eq!(got[i], Ok(slot(i)), "hop {i}");
        }
        // A slot of another step, or of another hop, does not verify.
        let (t, _) = through(&k, random_trailer(4));
        let other = SlotContext { step: 8, ..CTX };
        assert!(open(&refs, &other, &t).unwrap().iter().all(|s| s.is_err()));
        let backward = SlotContext {
            direction: Direction::Backward,
            ..CTX
        };
        assert!(open(&refs, &backward, &t)
            .unwrap()
            .iter()
            .all(|s| s.is_err()));
        let swapped: Vec<&TrailerKeys> = vec![&k[1], &k[0], &k[2], &k[3]];
        let got = open(&swapped, &CTX, &t).unwrap();
        assert!(got[0].is_err() && got[1].is_err());
    }

    #[test]
    fn wrong_lengths_are_refused() {
        let k = keys(1);
        assert!(add_layer(&k[0], &CTX, &slot(0), &[0; 10]).is_err());
        assert!(open(&[&k[0]], &CTX, &[0; TRAILER_LEN + 1]).is_err());
        let many: Vec<&TrailerKeys> = std::iter::repeat_n(&k[0], SLOTS + 1).collect();
        assert!(open(&many, &CTX, &[0; TRAILER_LEN]).is_err());
    }
}
