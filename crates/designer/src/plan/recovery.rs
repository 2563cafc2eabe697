//! Checkpoints and crash recovery (paper §4.1, without its loss of work):
//! the decisions, with no I/O.
//!
//! - **Checkpoints** ([`Checkpoints`]). Every `every` steps, at the end of
//!   each epoch's training and once before the first step, the designer
//!   drains the steps in flight and fetches every remote stage's state
//!   (parameters, momentum, step counter) in chunks. The last few are kept
//!   in memory, with the data-order state (epoch, position, losses); with
//!   a checkpoint directory the runner writes them to disk as well.
//! - **Detection** ([`DetectionBound`]). While replacements are
//!   configured, an answer that takes longer than the bound T fails the
//!   step, with T = 20 × the slowest answer seen so far, at least 1 s and
//!   at most the configured timeout (the paper's T ≫ nδ + (n−1)t, measured
//!   instead of guessed). Without replacements a failure ends the run, so
//!   T is the timeout.
//! - **Which hop** ([`Probe`]). The designer probes the cascade with loops
//!   from each end: from the first hop through its first 1, 2, … n hops,
//!   and from the last hop through its last 1, 2, … n; a hop that neither
//!   end reaches, while both reach its neighbours, has failed. One that
//!   one end reaches and the other not is not replaced (a neighbour may be
//!   dropping what passes it).
//! - **Recovery** (in the runner): it asks its
//!   [`Replacements`](crate::Replacements) for a new node, sets up a fresh
//!   session over the new cascade, loads the checkpoint into every stage
//!   (so survivors roll back to the same step) and trains on from there.
//!   Stages are deterministic, so the run ends bit-identical to one
//!   without a failure. After a failed audit it goes back to
//!   [`rollback_point`]: the last kept checkpoint that a local
//!   re-execution of the whole model reproduces.

use std::collections::VecDeque;
use std::num::NonZeroU64;
use std::time::Duration;

use mixnn_model::optim::Optimizer;
use mixnn_model::seed::RunSeed;
use mixnn_model::spec::ModelSpec;
use mixnn_model::stage::{NamedParam, Stage, StageState};
use mixnn_model::trainer::stage_seed;
use mixnn_model::trainer::{Batch, EpochMetrics, TrainConfig};
use mixnn_model::weights::sha256_hex;
use mixnn_proto::encode_state;

use crate::checkpoint::Checkpoint;
use crate::error::{DesignerError, RecoveryError};
use crate::plan::opening::local_step;

/// Checkpoints kept in memory.
pub const KEPT_CHECKPOINTS: usize = 8;

/// Attempts at rebuilding the cascade after one failure.
pub const MAX_ATTEMPTS: usize = 4;

/// Hex SHA-256 of a model's description: a checkpoint of another model is
/// refused.
pub fn model_digest(model: &ModelSpec) -> String {
    sha256_hex(model.to_toml().as_bytes())
}

/// The parameters among a state's tensors (momentum buffers left out).
pub fn params_only(tensors: Vec<NamedParam>) -> Vec<NamedParam> {
    tensors
        .into_iter()
        .filter(|t| !t.name.ends_with(".velocity"))
        .collect()
}

/// Whether the designer recovers from `e` by replacing a hop: a timeout,
/// a broken link or a reply that makes no sense. Audits have their own
/// recovery; configuration errors end the run.
pub fn recoverable(e: &DesignerError) -> bool {
    matches!(
        e,
        DesignerError::Timeout { .. }
            | DesignerError::Link { .. }
            | DesignerError::NoLink { .. }
            | DesignerError::PacedLinkFailed { .. }
            | DesignerError::LinksClosed
            | DesignerError::UnexpectedReply { .. }
            | DesignerError::BadReply(_)
    )
}

/// One recovery, as the designer saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct RecoveryEvent {
    /// The error that triggered it.
    pub cause: String,
    /// The detection bound in force when it was detected.
    pub bound_s: f64,
    /// The hops replaced (addresses).
    pub replaced: Vec<std::net::SocketAddr>,
    /// The step training went back to.
    pub resumed_at: u64,
    /// Seconds from detection to training again.
    pub recovery_s: f64,
    /// When the failure was detected (Unix time, milliseconds).
    pub detected_unix_ms: u128,
}

/// The detection bound T.
#[derive(Debug, Clone, Copy)]
pub struct DetectionBound {
    timeout: Duration,
    slowest: Duration,
    tight: bool,
}

impl DetectionBound {
    /// The bound under the configured `timeout`; `tight` when failures
    /// can be repaired (replacements configured).
    pub fn new(timeout: Duration, tight: bool) -> Self {
        DetectionBound {
            timeout,
            slowest: Duration::ZERO,
            tight,
        }
    }

    /// Records how long an answer took.
    pub fn observe(&mut self, took: Duration) {
        self.slowest = self.slowest.max(took);
    }

    /// T: 20 × the slowest answer, within [1 s, timeout] when tight; the
    /// timeout otherwise (a timeout then ends the run: wait it out).
    pub fn bound(&self) -> Duration {
        if !self.tight {
            return self.timeout;
        }
        (self.slowest * 20).clamp(
            Duration::from_secs(1),
            self.timeout.max(Duration::from_secs(1)),
        )
    }

    /// The configured timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The bound on the init loop through `hops` hops, when tight: each
    /// hop builds its stage and opens its link to the next as the loop
    /// passes, so it is 20 × `hops` × the slowest link set-up the designer
    /// measured (`connect`), at least T and 2 s, at most the timeout. A
    /// node that dies during set-up is then found (and replaced) as soon
    /// as one that dies mid-training, not after the whole timeout.
    pub fn init_bound(&self, hops: usize, connect: Duration) -> Duration {
        if !self.tight {
            return self.timeout;
        }
        let scaled = connect.saturating_mul(20 * hops.max(1) as u32);
        scaled
            .max(self.bound())
            .max(Duration::from_secs(2))
            .min(self.timeout.max(Duration::from_secs(1)))
    }
}

/// Which hop failed: loops from the first hop through hops 0..=j, and
/// from the last hop through hops j..n, for every j, were sent.
///
/// A hop is found dead only if neither end reaches it while both reach
/// its neighbours: the shortest loop from the first hop that does not
/// come back ends at it, and so does the shortest one from the last hop.
/// A neighbour that drops only the loops going past it makes the loops
/// of one end fail beyond it while the other end still reaches the hop
/// behind it; that is no dead hop but a link that fails, and either of
/// its two hops may be the one dropping: nobody is replaced.
#[derive(Debug, Clone)]
pub struct Probe {
    from_first: Vec<bool>,
    from_last: Vec<bool>,
}

/// What a probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeVerdict {
    /// Every loop came back (a transient failure).
    AllBack,
    /// Neither end reaches this hop.
    Dead(usize),
    /// The ends disagree: the loops fail between these two adjacent
    /// hops, one of which drops what passes to the other.
    Link(usize, usize),
    /// The loops fail in a way no single dead hop or failing link
    /// explains (several failures at once, or the designer's own links).
    Unclear,
}

impl Probe {
    /// A probe of `n` hops (all loops sent).
    pub fn new(n: usize) -> Self {
        Probe {
            from_first: vec![false; n],
            from_last: vec![false; n],
        }
    }

    /// The loop from the first hop through hops `0..=j` came back.
    pub fn back(&mut self, j: usize) {
        if let Some(b) = self.from_first.get_mut(j) {
            *b = true;
        }
    }

    /// The loop from the last hop through hops `j..n` came back.
    pub fn back_from_last(&mut self, j: usize) {
        if let Some(b) = self.from_last.get_mut(j) {
            *b = true;
        }
    }

    /// Every loop came back.
    pub fn all_back(&self) -> bool {
        self.from_first.iter().chain(&self.from_last).all(|b| *b)
    }

    /// What the loops back say.
    pub fn verdict(&self) -> ProbeVerdict {
        let n = self.from_first.len();
        let first = self.from_first.iter().position(|b| !b);
        let last = self.from_last.iter().rposition(|b| !b);
        match (first, last) {
            (None, None) => ProbeVerdict::AllBack,
            (Some(a), Some(b)) if a == b => ProbeVerdict::Dead(a),
            // A one-hop cascade has nothing to tell apart.
            (Some(a), _) | (_, Some(a)) if n == 1 => ProbeVerdict::Dead(a),
            (Some(a), Some(b)) if a.abs_diff(b) == 1 => ProbeVerdict::Link(a.min(b), a.max(b)),
            _ => ProbeVerdict::Unclear,
        }
    }

    /// What the loops from the first hop alone say (before the session is
    /// set up, or in a one-hop cascade): the first hop they do not pass.
    pub fn verdict_from_first(&self) -> ProbeVerdict {
        match self.from_first.iter().position(|b| !b) {
            Some(a) => ProbeVerdict::Dead(a),
            None => ProbeVerdict::AllBack,
        }
    }

    /// The failed hop, `None` if none is found dead.
    pub fn failed(&self) -> Option<usize> {
        match self.verdict() {
            ProbeVerdict::Dead(j) => Some(j),
            _ => None,
        }
    }
}

/// The checkpoint policy and the checkpoints kept.
#[derive(Debug)]
pub struct Checkpoints {
    enabled: bool,
    every: Option<NonZeroU64>,
    last: Option<Checkpoint>,
    /// The last few checkpoints, oldest first (audits roll back to the
    /// last one before the first bad step).
    kept: VecDeque<Checkpoint>,
    epoch: u32,
    epoch_start: u64,
    done_epochs: Vec<EpochMetrics>,
    prefix: Vec<f32>,
    model: String,
    model_digest: String,
}

impl Checkpoints {
    /// Checkpoints of `model` when `enabled` (a checkpoint directory or
    /// replacements are configured), every `every` steps besides the
    /// start and each epoch's end.
    pub fn new(model: &ModelSpec, enabled: bool, every: Option<NonZeroU64>) -> Self {
        Checkpoints {
            enabled,
            every,
            last: None,
            kept: VecDeque::new(),
            epoch: 0,
            epoch_start: 0,
            done_epochs: Vec::new(),
            prefix: Vec::new(),
            model: model.name.clone(),
            model_digest: model_digest(model),
        }
    }

    /// Checkpoints are taken.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether a checkpoint is due before step `step` runs.
    pub fn wanted(&self, step: u64) -> bool {
        if !self.enabled || self.last.as_ref().is_some_and(|c| c.step == step) {
            return false;
        }
        self.last.is_none() || self.every.is_some_and(|e| step.is_multiple_of(e.get()))
    }

    /// An epoch begins (0-based `epoch`) after the epochs `done`, with
    /// `prefix` its losses so far, at global step `step`.
    pub fn begin_epoch(&mut self, epoch: u32, done: &[EpochMetrics], prefix: &[f32], step: u64) {
        self.epoch = epoch;
        self.done_epochs = done.to_vec();
        self.prefix = prefix.to_vec();
        self.epoch_start = step.saturating_sub(prefix.len() as u64);
    }

    /// The checkpoint of `step` with `stages` (model order), `losses`
    /// this call's losses since the epoch's resumed prefix.
    pub fn make(
        &self,
        step: u64,
        stages: Vec<StageState>,
        losses: &[f32],
        config: &TrainConfig,
    ) -> Checkpoint {
        let mut epoch_losses = self.prefix.clone();
        epoch_losses.extend_from_slice(losses);
        Checkpoint {
            step,
            epoch: self.epoch,
            position: step.saturating_sub(self.epoch_start) as usize,
            epoch_losses,
            done_epochs: self.done_epochs.clone(),
            config: *config,
            model: self.model.clone(),
            model_digest: self.model_digest.clone(),
            stages,
        }
    }

    /// Keeps `c` as the newest checkpoint.
    pub fn keep(&mut self, c: Checkpoint) {
        self.kept.retain(|k| k.step < c.step);
        self.kept.push_back(c.clone());
        while self.kept.len() > KEPT_CHECKPOINTS {
            self.kept.pop_front();
        }
        self.last = Some(c);
    }

    /// The run went back to `c`: later checkpoints are of an abandoned
    /// timeline.
    pub fn rolled_back_to(&mut self, c: &Checkpoint) {
        self.kept.retain(|k| k.step <= c.step);
        self.last = Some(c.clone());
    }

    /// The newest checkpoint, the one a crash goes back to.
    pub fn last(&self) -> Option<&Checkpoint> {
        self.last.as_ref()
    }

    /// The checkpoints kept in memory, oldest first.
    pub fn kept(&self) -> &VecDeque<Checkpoint> {
        &self.kept
    }

    /// The digest of the model these checkpoints are of.
    pub fn model_digest(&self) -> &str {
        &self.model_digest
    }
}

/// The last kept checkpoint of the epoch (from step `base`, `batches` its
/// batches) that the whole model, re-executed locally from the oldest one,
/// reproduces, at or before `bad` (whose update is known bad).
pub fn rollback_point(
    kept: &VecDeque<Checkpoint>,
    bad: u64,
    batches: &[Batch],
    base: u64,
    model: &ModelSpec,
    optimizer: Optimizer,
    seed: &RunSeed,
) -> Result<Checkpoint, DesignerError> {
    let candidates: Vec<&Checkpoint> = kept
        .iter()
        .filter(|c| c.step >= base && c.step <= bad)
        .collect();
    let Some(first) = candidates.first() else {
        return Err(RecoveryError::NoRollbackPoint { bad }.into());
    };
    let mut stages: Vec<Stage> = Vec::with_capacity(model.stages.len());
    for (i, (spec, state)) in model.stages.iter().zip(&first.stages).enumerate() {
        let mut s = Stage::new(spec, stage_seed(seed, i), optimizer);
        s.load_state(state)?;
        stages.push(s);
    }
    let mut good = *first;
    let mut step = first.step;
    for c in candidates.iter().skip(1) {
        while step < c.step {
            let batch = batches
                .get((step - base) as usize)
                .ok_or(RecoveryError::NoBatch { step })?;
            local_step(&mut stages, batch, model)?;
            step += 1;
        }
        let same = stages
            .iter()
            .zip(&c.stages)
            .all(|(s, k)| encode_state(&s.state()) == encode_state(k));
        if !same {
            tracing::warn!(step = c.step, "checkpoint differs from the re-execution");
            break;
        }
        good = c;
    }
    Ok(good.clone())
}

#[cfg(test)]
mod tests;
