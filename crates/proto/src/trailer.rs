//! The commitment trailer, in onion layers: how each hop's commitment of a
//! message travels back to the designer without revealing order or
//! distance, and so that whatever a hop does to what it passes on shows
//! at the hop before it.
//!
//! A forward, backward or test body of an audited session ends in
//! [`TRAILER_LEN`] bytes. A hop strips them, computes its output and its
//! [`Slot`] (the digest of its state, and the hashes of the tensor it
//! received and of the tensor it sends: [`crate::audit`]), and sends on
//!
//! ```text
//! trailer_out = S_hop ⊕ (slot ‖ tag ‖ trailer_in[.. TRAILER_LEN − SLOT_LEN])
//! tag         = BLAKE3_mac(context ‖ slot ‖ trailer_in[.. COVERED])
//! ```
//!
//! under two keys only the hop and the designer hold (its audit key),
//! bound to the step, the pass (forward, backward, test) and the
//! micro-batch or test batch; `S_hop` is a keystream under the other key.
//! So every hop receives bytes that look random (the layer of the hop
//! before it), no two hops see a common string, and the position of a
//! slot tells nothing. The designer, who knows every hop's keys, peels
//! the layers from the last hop back to the first ([`open`]).
//!
//! **Each tag covers what its layer wraps**, everything the hop received
//! but the last [`SLOT_LEN`] bytes, which it drops (its *tail*). A hop
//! can still change bytes it cannot read; whatever it changes in what it
//! received lies inside the layer of the hop before it, whose tag then
//! fails, while its own tag covers the changed bytes and verifies. So the
//! last spoiled layer on the path is the one of the hop before the
//! culprit, or the culprit's own: the damage is pinned to one pair of
//! adjacent hops (to one hop if it is the last on the path, which hands
//! the trailer to the designer itself), never to hops further back.
//!
//! For the designer to check a tag it must know every byte it covers,
//! also those later hops dropped. It can: the bytes a hop drops were
//! filler when the designer sent the trailer, and the designer chooses
//! its filler (as Sphinx does its header's) so that each hop's tail is a
//! value the hop computes from its own key ([`TrailerKeys::tail`]); a hop
//! refuses a message whose tail is not that value ([`add_layer`]). So
//! the bytes a hop drops are known to the designer unless a hop before
//! changed them, and then the honest hop that would drop them refuses
//! (a lost message, not a verdict), or a hop that takes them anyway is
//! among the pair blamed.
//!
//! ```text
//! first hop receives      fill(hops, context)                 (designer)
//! hop k checks            trailer_in[TRAILER_LEN − SLOT_LEN ..] = tail_k
//! hop k's tag             BLAKE3_mac(context ‖ slot ‖ trailer_in[.. TRAILER_LEN − SLOT_LEN])
//! ```

use crate::ProtoError;

/// Bytes of a hash or digest in a slot.
pub const HASH_LEN: usize = 32;
/// Bytes of a slot's tag.
pub const TAG_LEN: usize = 16;
/// Bytes of one hop's slot on the wire: state digest ‖ input hash ‖
/// output hash ‖ tag.
pub const SLOT_LEN: usize = 3 * HASH_LEN + TAG_LEN;
/// Slots in a trailer: the longest cascade (wire's `MAX_HOPS`).
pub const SLOTS: usize = 32;
/// Bytes of the trailer at the end of audited forward, backward and test
/// bodies.
pub const TRAILER_LEN: usize = SLOTS * SLOT_LEN;
/// Bytes of a received trailer a hop keeps (and its tag covers).
const KEEP_LEN: usize = TRAILER_LEN - SLOT_LEN;

const CTX_MAC: &str = "mixnn-proto v3 2026 trailer slot tag key";
const CTX_STREAM: &str = "mixnn-proto v3 2026 trailer layer stream key";
const CTX_TAIL: &str = "mixnn-proto v3 2026 trailer tail key";
const CTX_FILL: &str = "mixnn-proto v3 2026 trailer filler key";

/// Which pass a message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pass {
    /// Training activations, first hop to last.
    Forward,
    /// Training gradients, last hop to first.
    Backward,
    /// Test activations, first hop to last (no update).
    Test,
}

impl Pass {
    fn byte(self) -> u8 {
        match self {
            Pass::Forward => 1,
            Pass::Backward => 2,
            Pass::Test => 3,
        }
    }
}

/// Which message of a session a slot belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SlotContext {
    /// The training step (a test: the step it ran at).
    pub step: u64,
    /// Forward, backward or test.
    pub pass: Pass,
    /// The micro-batch (training) or the test batch.
    pub index: u32,
}

impl SlotContext {
    fn bytes(&self) -> [u8; 13] {
        let mut b = [0u8; 13];
        b[..8].copy_from_slice(&self.step.to_le_bytes());
        b[8] = self.pass.byte();
        b[9..].copy_from_slice(&self.index.to_le_bytes());
        b
    }
}

/// What a hop states about one message: its commitment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// Digest of the hop's state ([`crate::audit::digest_state`]): the
    /// state a forward or test ran on, or the state a backward left
    /// (after the update).
    pub digest: [u8; HASH_LEN],
    /// Hash of the tensor it received ([`crate::audit::hash_tensor`]).
    pub input: [u8; HASH_LEN],
    /// Hash of the tensor it sends on.
    pub output: [u8; HASH_LEN],
}

/// Why the designer could not take a hop's slot from a trailer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SlotError {
    /// The slot's tag does not verify: the hop did not write this layer
    /// for this message, or the next hop changed it.
    #[error("the layer's tag does not verify (damaged by this hop or by the next one)")]
    Forged,
}

/// A hop's refusal of a received trailer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TrailerError {
    /// Not [`TRAILER_LEN`] bytes.
    #[error("a commitment trailer of {0} bytes, not {TRAILER_LEN}")]
    Length(usize),
    /// The bytes the hop would drop are not its tail: a hop before it
    /// changed the trailer.
    #[error("the commitment trailer's tail is not this hop's: changed on its way")]
    Tail,
}

impl From<TrailerError> for ProtoError {
    fn from(e: TrailerError) -> Self {
        ProtoError::Invalid {
            what: "commitment trailer",
            reason: e.to_string(),
        }
    }
}

/// A hop's trailer keys, derived from its audit key.
#[derive(Clone)]
pub struct TrailerKeys {
    mac: [u8; 32],
    stream: [u8; 32],
    tail: [u8; 32],
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
            tail: blake3::derive_key(CTX_TAIL, audit_key),
        }
    }

    /// The tail this hop must find at the end of a trailer it receives
    /// for `ctx` (the designer's filler puts it there).
    pub fn tail(&self, ctx: &SlotContext) -> [u8; SLOT_LEN] {
        let mut h = blake3::Hasher::new_keyed(&self.tail);
        h.update(&ctx.bytes());
        let mut out = [0u8; SLOT_LEN];
        h.finalize_xof().fill(&mut out);
        out
    }

    fn tag(&self, ctx: &SlotContext, slot: &[u8], wrapped: &[u8]) -> [u8; TAG_LEN] {
        let mut h = blake3::Hasher::new_keyed(&self.mac);
        h.update(&ctx.bytes());
        h.update(slot);
        h.update(wrapped);
        let mut out = [0u8; TAG_LEN];
        h.finalize_xof().fill(&mut out);
        out
    }

    /// XORs this hop's keystream for `ctx` into `bytes`, which start at
    /// byte `at` of the trailer.
    fn apply_stream_at(&self, ctx: &SlotContext, at: usize, bytes: &mut [u8]) {
        let mut h = blake3::Hasher::new_keyed(&self.stream);
        h.update(&ctx.bytes());
        let mut reader = h.finalize_xof();
        reader.set_position(at as u64);
        crate::reply::xor_xof(&mut reader, bytes);
    }

    /// XORs this hop's keystream for `ctx` into `bytes` (from its start).
    fn apply_stream(&self, ctx: &SlotContext, bytes: &mut [u8]) {
        self.apply_stream_at(ctx, 0, bytes);
    }
}

fn length(trailer: &[u8]) -> Result<(), TrailerError> {
    if trailer.len() != TRAILER_LEN {
        return Err(TrailerError::Length(trailer.len()));
    }
    Ok(())
}

/// The filler of trailer position `k + 1` onwards after `visited[..k]`
/// added their layers: `filler[k][p − k·SLOT_LEN]` is byte `p` of what
/// the hop visited `k`-th receives, for `p ≥ k·SLOT_LEN` (no slot lies
/// there, whatever the hops wrote). `filler[0]` is the trailer sent.
fn fillers(visited: &[&TrailerKeys], ctx: &SlotContext, sent: &[u8]) -> Vec<Vec<u8>> {
    let mut out = vec![sent.to_vec()];
    for (k, keys) in visited.iter().enumerate() {
        let prev = &out[k];
        // Byte p of hop k+1's input (p ≥ (k+1)·S) is stream_k[p] ⊕ byte
        // p − S of hop k's, which is prev[p − S − k·S].
        let mut next = prev[..prev.len().saturating_sub(SLOT_LEN)].to_vec();
        keys.apply_stream_at(ctx, (k + 1) * SLOT_LEN, &mut next);
        out.push(next);
    }
    out
}

/// Designer side: the trailer to send with a message that will visit the
/// hops of `visited` in this order (at most [`SLOTS`]): random bytes
/// (from `seed` and `ctx`, so [`open`] can make them again) in which each
/// hop will find its own tail ([`TrailerKeys::tail`]) where it drops one.
pub fn fill(
    visited: &[&TrailerKeys],
    ctx: &SlotContext,
    seed: &[u8; 32],
) -> Result<Vec<u8>, ProtoError> {
    if visited.len() > SLOTS {
        return Err(ProtoError::Invalid {
            what: "commitment trailer",
            reason: format!("{} hops, at most {SLOTS}", visited.len()),
        });
    }
    let mut sent = vec![0u8; TRAILER_LEN];
    let mut h = blake3::Hasher::new_keyed(&blake3::derive_key(CTX_FILL, seed));
    h.update(&ctx.bytes());
    h.finalize_xof().fill(&mut sent);
    // Hop k drops bytes [L − S, L) of its input: the sent bytes
    // [L − (k+1)·S, L − k·S) under the streams of hops 0..k, hop j's at
    // offset L − (k − j)·S. Set each block so that they come out as hop
    // k's tail.
    for (k, keys) in visited.iter().enumerate() {
        let mut block = keys.tail(ctx);
        for (j, before) in visited[..k].iter().enumerate() {
            before.apply_stream_at(ctx, TRAILER_LEN - (k - j) * SLOT_LEN, &mut block);
        }
        let at = TRAILER_LEN - (k + 1) * SLOT_LEN;
        sent[at..at + SLOT_LEN].copy_from_slice(&block);
    }
    Ok(sent)
}

/// Hop side: checks a received trailer (exactly [`TRAILER_LEN`] bytes
/// ending in this hop's tail) before the hop spends anything on its
/// message.
pub fn check_received(
    keys: &TrailerKeys,
    ctx: &SlotContext,
    trailer_in: &[u8],
) -> Result<(), TrailerError> {
    length(trailer_in)?;
    if !subtle_eq_slot(&keys.tail(ctx), &trailer_in[KEEP_LEN..]) {
        return Err(TrailerError::Tail);
    }
    Ok(())
}

/// Hop side: the trailer to send on, given the one received (checked by
/// [`check_received`]) and this hop's slot for the message.
pub fn add_layer(
    keys: &TrailerKeys,
    ctx: &SlotContext,
    slot: &Slot,
    trailer_in: &[u8],
) -> Result<Vec<u8>, TrailerError> {
    check_received(keys, ctx, trailer_in)?;
    let mut out = Vec::with_capacity(TRAILER_LEN);
    out.extend_from_slice(&slot.digest);
    out.extend_from_slice(&slot.input);
    out.extend_from_slice(&slot.output);
    let tag = keys.tag(ctx, &out, &trailer_in[..KEEP_LEN]);
    out.extend_from_slice(&tag);
    out.extend_from_slice(&trailer_in[..KEEP_LEN]);
    keys.apply_stream(ctx, &mut out);
    Ok(out)
}

/// What the designer peels off a trailer ([`open`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// The slots of the hops visited, in the order visited. (What the
    /// first hop wrapped, the designer's filler, carries nothing and is
    /// not checked.)
    pub slots: Vec<Result<Slot, SlotError>>,
}

/// Designer side: the slots of the hops a message visited, from the
/// trailer it came back with; `sent` is the trailer the message left with
/// ([`fill`]). `visited` holds the hops' keys in the order the message
/// visited them (at most [`SLOTS`]); the slots are in the same order. A
/// layer whose tag does not verify gives [`SlotError::Forged`] (and so,
/// as a rule, do the layers it wraps).
pub fn open(
    visited: &[&TrailerKeys],
    ctx: &SlotContext,
    trailer: &[u8],
    sent: &[u8],
) -> Result<Opened, ProtoError> {
    length(trailer)?;
    length(sent)?;
    let n = visited.len();
    if n > SLOTS {
        return Err(ProtoError::Invalid {
            what: "commitment trailer",
            reason: format!("{n} hops, at most {SLOTS}"),
        });
    }
    let fillers = fillers(visited, ctx, sent);
    let mut rest = trailer.to_vec();
    let mut slots = Vec::with_capacity(n);
    for (k, keys) in visited.iter().enumerate().rev() {
        keys.apply_stream(ctx, &mut rest);
        let (slot, more) = rest.split_at(3 * HASH_LEN);
        let (tag, seen) = more.split_at(TAG_LEN);
        // What hop k kept: the part that reached the designer, and the
        // part later hops dropped, which was filler (hop k·S onwards).
        let mut kept = seen.to_vec();
        kept.extend_from_slice(&fillers[k][seen.len() - k * SLOT_LEN..KEEP_LEN - k * SLOT_LEN]);
        let valid = subtle_eq(&keys.tag(ctx, slot, &kept), tag);
        slots.push(if valid {
            let mut s = Slot {
                digest: [0; HASH_LEN],
                input: [0; HASH_LEN],
                output: [0; HASH_LEN],
            };
            s.digest.copy_from_slice(&slot[..HASH_LEN]);
            s.input.copy_from_slice(&slot[HASH_LEN..2 * HASH_LEN]);
            s.output.copy_from_slice(&slot[2 * HASH_LEN..]);
            Ok(s)
        } else {
            Err(SlotError::Forged)
        });
        rest = seen.to_vec();
    }
    slots.reverse();
    Ok(Opened { slots })
}

/// Constant-time equality of two tags.
fn subtle_eq(a: &[u8; TAG_LEN], b: &[u8]) -> bool {
    b.len() == TAG_LEN && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Constant-time equality of a tail.
fn subtle_eq_slot(a: &[u8; SLOT_LEN], b: &[u8]) -> bool {
    b.len() == SLOT_LEN && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests;
