//! The one error type of the wire crate.

use crate::block::Op;

/// Everything that can go wrong building, encoding, decoding or peeling.
///
/// Every byte a hop receives may come from an attacker: each malformed,
/// tampered, truncated or replayed input maps to one of these variants, never
/// to a panic. Variants carry sizes and positions, never keys or routes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// A buffer had the wrong length.
    #[error("{what}: expected {expected} bytes, got {actual}")]
    Length {
        /// Which buffer.
        what: &'static str,
        /// Bytes required.
        expected: usize,
        /// Bytes given.
        actual: usize,
    },
    /// A path was empty or longer than [`crate::MAX_HOPS`].
    #[error("path of {hops} hops (must be 1..={max})")]
    PathLength {
        /// Hops asked for.
        hops: usize,
        /// Largest path the format carries.
        max: usize,
    },
    /// The designer gave a number of layers that does not match the path.
    #[error("{layers} layers for a path of {hops} hops")]
    LayerCount {
        /// Hops in the path.
        hops: usize,
        /// Layers given.
        layers: usize,
    },
    /// A path names a hop that is not in the session.
    #[error("hop index {index} not in a session of {hops} hops")]
    UnknownHop {
        /// Index given.
        index: usize,
        /// Hops in the session.
        hops: usize,
    },
    /// A layer's `next` does not fit its position (only the last one delivers).
    #[error("layer {index}: {reason}")]
    BadPath {
        /// Position in the path.
        index: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// The notes for a path do not fit in [`crate::NOTES_LEN`] bytes.
    #[error("notes need {needed} bytes, room for {capacity}")]
    NotesTooLong {
        /// Bytes needed, length prefixes included.
        needed: usize,
        /// Bytes available.
        capacity: usize,
    },
    /// An op does not fit the message kind (init ops only in init messages).
    #[error("op {op:?} not allowed in {context}")]
    OpMismatch {
        /// The op found.
        op: Op,
        /// Where it was found.
        context: &'static str,
    },
    /// A routing block carried an op byte this version does not know.
    #[error("unknown op byte {byte}")]
    UnknownOp {
        /// The byte.
        byte: u8,
    },
    /// A routing block or address did not parse.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// Which structure.
        what: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// The per-hop MAC did not verify: tampered header or notes, or wrong key.
    #[error("MAC mismatch: tampered header or notes, or wrong key")]
    MacMismatch,
    /// Diffie–Hellman gave the all-zero secret (low-order point).
    #[error("degenerate X25519 shared secret")]
    WeakSharedSecret,
    /// This hop has already processed this packet.
    #[error("replayed packet")]
    Replay,
    /// The init replay cache holds as many inits as it may: no new init
    /// until old ones leave the window.
    #[error("init replay cache full ({capacity} inits within the window)")]
    ReplayCacheFull {
        /// Inits it holds.
        capacity: usize,
    },
    /// The packet's counter is older than the hop's replay window.
    #[error("counter {counter} is behind the replay window (highest {highest})")]
    Stale {
        /// Counter of the packet.
        counter: u64,
        /// Highest counter seen.
        highest: u64,
    },
    /// The encrypted counter field did not decrypt to a counter.
    #[error("malformed counter field")]
    BadCounter,
    /// The designer's counter for a hop ran out.
    #[error("session counter exhausted")]
    CounterExhausted,
    /// No session with the header's session id.
    #[error("unknown session")]
    UnknownSession,
    /// A session with this id already exists at this hop.
    #[error("duplicate session id")]
    DuplicateSession,
    /// A first cell carried a kind byte this version does not know.
    #[error("unknown cell kind {byte}")]
    UnknownKind {
        /// The byte.
        byte: u8,
    },
    /// A body is longer than the padding policy or the cap allows.
    #[error("body of {len} bytes exceeds {max}")]
    BodyTooLong {
        /// Body length.
        len: usize,
        /// Largest allowed.
        max: usize,
    },
    /// A padding policy is unusable.
    #[error("bad padding policy: {reason}")]
    BadPolicy {
        /// What is wrong.
        reason: &'static str,
    },
    /// Cells arrived after the message was complete, or too few arrived.
    #[error("expected {expected} cells, got {actual}")]
    CellCount {
        /// Cells the first cell announced.
        expected: usize,
        /// Cells given.
        actual: usize,
    },
}
