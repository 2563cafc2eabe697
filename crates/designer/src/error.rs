//! The designer crate's error type.

use std::net::SocketAddr;

use crate::checkpoint::CheckpointError;
use crate::misbehaviour::Misbehaviour;
use crate::plan::pending::{Await, Expected};

/// Why a cascade run failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DesignerError {
    /// The cascade description or options are wrong.
    #[error("cascade config: {message}")]
    Config {
        /// What is wrong.
        message: String,
    },
    /// A hop computes another arithmetic than this designer.
    #[error("hop {addr} computes arith {got}, this designer arith {expected} (docs/arithmetic.md): its results could not equal ours; use a node of the same arithmetic")]
    Arith {
        /// The hop.
        addr: SocketAddr,
        /// The arithmetic it announced.
        got: u32,
        /// This build's ([`mixnn_model::arith::ARITH_VERSION`]).
        expected: u32,
    },
    /// A link to a hop could not be opened or broke.
    #[error("link to hop {addr}: {source}")]
    Link {
        /// The hop.
        addr: SocketAddr,
        /// The link error.
        source: mixnn_net::NetError,
    },
    /// A hop did not accept a link in time.
    #[error("cascade answered with no link to {addr} in {secs} s")]
    NoLink {
        /// The hop.
        addr: SocketAddr,
        /// The bound.
        secs: u64,
    },
    /// A paced link's task stopped (its error is in the log).
    #[error("cascade answered with the paced link to hop {addr} failed (its error is in the log)")]
    PacedLinkFailed {
        /// The hop.
        addr: SocketAddr,
    },
    /// Every link that delivers to the designer closed.
    #[error("cascade answered with its links closed")]
    LinksClosed,
    /// The designer's own listener failed.
    #[error("designer listener: {0}")]
    Listen(mixnn_net::NetError),
    /// The cascade did not answer in time: a node crashed, hangs or drops
    /// packets.
    #[error("no answer from the cascade within {secs:.1} s while waiting for {what} of step {step}: a node is down or dropping packets")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// The step.
        step: u64,
        /// The bound.
        secs: f64,
    },
    /// Building an onion failed.
    #[error("onion: {0}")]
    Wire(#[from] mixnn_wire::WireError),
    /// A reply does not parse.
    #[error("reply: {0}")]
    Proto(#[from] mixnn_proto::ProtoError),
    /// Local compute (kept stages, argmax) failed.
    #[error("{0}")]
    Model(#[from] mixnn_model::ModelError),
    /// A reply came for something other than what the designer waits for.
    #[error("cascade answered with an unexpected {got} while waiting for {expected}")]
    UnexpectedReply {
        /// What the designer was waiting for.
        expected: Expected,
        /// What the reply answers.
        got: Await,
    },
    /// A reply's content makes no sense.
    #[error("cascade answered with {0}")]
    BadReply(#[from] BadReply),
    /// A checkpoint could not be written or read (the error names the
    /// file or directory).
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A run to resume has no checkpoint in its directory.
    #[error("no checkpoint in {}", dir.display())]
    NoCheckpoint {
        /// The checkpoint directory.
        dir: std::path::PathBuf,
    },
    /// A directory could not be reached or its view does not check out.
    #[error("directory: {0}")]
    Directory(#[from] mixnn_directory::DirectoryError),
    /// Too few directories answered.
    #[error("directory: {answered} of {asked} directories answered, {needed} needed: {errors}")]
    Quorum {
        /// Directories that answered.
        answered: usize,
        /// Directories asked.
        asked: usize,
        /// The quorum.
        needed: usize,
        /// Why the others did not, `; `-joined.
        errors: String,
    },
    /// No replacement node for a failed hop.
    #[error("no replacement for {addr}: {reason}")]
    NoReplacement {
        /// The failed hop.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// Recovery from a failed hop did not succeed.
    #[error("recovery: {0}")]
    Recovery(#[from] RecoveryError),
    /// A hop (or one of two, or one on a transfer's route) sent what the
    /// designer's checks prove wrong: a failed or refused audit, state
    /// digests that do not chain, a false state, two sides of a boundary
    /// that disagree, a spoiled trailer layer, a malformed answer
    /// ([`Misbehaviour`], whose [`crate::Culprit`] says whom it is pinned on).
    #[error("{0}")]
    Misbehaved(Misbehaviour),
}

/// What was wrong with a reply's content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BadReply {
    /// A reply for a step outside the batches being trained.
    #[error("a reply for step {step}")]
    Step {
        /// The step it names.
        step: u64,
    },
    /// A reply for a micro-batch the step does not have.
    #[error("micro-batch {micro} of step {step}")]
    MicroBatch {
        /// The step.
        step: u64,
        /// The micro-batch.
        micro: u16,
    },
    /// A loss that holds no value.
    #[error("an empty loss")]
    EmptyLoss,
    /// A test output that is not a matrix.
    #[error("test output of shape {shape:?}")]
    TestShape {
        /// Its shape.
        shape: Vec<usize>,
    },
    /// A test output for a batch or micro-batch not sent.
    #[error("test output {batch}.{micro}")]
    TestOutput {
        /// The batch.
        batch: usize,
        /// The micro-batch.
        micro: u16,
    },
    /// A chunk beyond the announced total.
    #[error("chunk {chunk} of a transfer from hop {hop}")]
    Chunk {
        /// The hop.
        hop: usize,
        /// The chunk.
        chunk: u32,
    },
    /// Chunks that do not add up to the announced length.
    #[error("a transfer of the wrong length from hop {hop}")]
    Length {
        /// The hop.
        hop: usize,
    },
    /// A sealed transfer chunk that does not open: changed by the hop or
    /// by one of the hops that relayed it.
    #[error("chunk {chunk} of a transfer from hop {hop} does not open (changed on its way)")]
    Sealed {
        /// The hop.
        hop: usize,
        /// The chunk.
        chunk: u32,
    },
}

/// Why recovery could not go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecoveryError {
    /// Every attempt failed.
    #[error("gave up after {attempts} attempts; last: {last}")]
    GaveUp {
        /// Attempts made.
        attempts: usize,
        /// The last attempt's error.
        last: String,
    },
    /// The cascade failed again and again after resuming from the same
    /// checkpoint while every hop answered: a fault no replacement can
    /// fix is not retried for ever.
    #[error("no progress: the cascade failed {times} times after resuming at step {step} while every hop answered; last: {last}")]
    NoProgress {
        /// The checkpoint's step.
        step: u64,
        /// Recoveries from it without a replacement.
        times: usize,
        /// The last failure.
        last: String,
    },
    /// Replacing a hop was asked for without replacements.
    #[error("no replacements configured")]
    NoReplacements,
    /// No checkpoint of this epoch to roll an audit failure back to.
    #[error("no checkpoint of this epoch at or before the bad step {bad}")]
    NoRollbackPoint {
        /// The first step known bad.
        bad: u64,
    },
    /// The local re-execution had no batch for a step.
    #[error("no batch for step {step}")]
    NoBatch {
        /// The step.
        step: u64,
    },
    /// The checkpoint to go back to is older than the batches at hand.
    #[error("a checkpoint at step {checkpoint}, before this epoch's step {base}")]
    BeforeEpoch {
        /// The checkpoint's step.
        checkpoint: u64,
        /// The first step of the batches.
        base: u64,
    },
    /// A test or a fetch failed and no checkpoint of the current step
    /// exists to set the cascade up again at that step.
    #[error("no checkpoint at step {step} to {purpose} from")]
    NoCheckpointAt {
        /// The step.
        step: u64,
        /// "test", "fetch".
        purpose: &'static str,
    },
}
