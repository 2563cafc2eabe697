//! Checkpoints and crash recovery (paper §4.1, without its loss of work).
//!
//! - **Checkpoints.** Every `every` steps, at the end of each epoch's
//!   training and once before the first step, the designer drains the
//!   steps in flight and fetches every remote stage's state (parameters,
//!   momentum, step counter) in chunks, sent back to it alone over its own
//!   Noise links. With a checkpoint directory it writes them to disk
//!   atomically, with the data-order state (epoch, position, losses).
//! - **Detection.** While replacements are configured, an answer that
//!   takes longer than the bound T fails the step, with T = 20 × the
//!   slowest answer seen so far, at least 1 s and at most the configured
//!   timeout (the paper's T ≫ nδ + (n−1)t, measured instead of guessed).
//!   Without replacements a failure ends the run, so T is the timeout.
//! - **Recovery.** The designer probes the cascade with loops through its
//!   first 1, 2, … n hops; the first prefix that does not come back ends at
//!   the failed hop. It asks its [`Replacements`] for a new node, sets up a
//!   fresh session over the new cascade, loads the checkpoint into every
//!   stage (so survivors roll back to the same step) and trains on from
//!   there. Stages are deterministic, so the run ends bit-identical to one
//!   without a failure.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use mixnn_model::spec::ModelSpec;
use mixnn_model::stage::{NamedParam, StageState};
use mixnn_model::trainer::{EpochMetrics, ResumePoint, TrainConfig};
use mixnn_model::weights::sha256_hex;
use mixnn_proto::{decode_state, encode_state, ChunkNote, ParamChunk, SessionNote};
use mixnn_wire::{Op, ReplyId};

use super::{Await, CascadeRunner};
use crate::cascade::HopInfo;
use crate::checkpoint::{Checkpoint, CheckpointDir};
use crate::error::DesignerError;

/// Where replacement nodes come from when a hop fails.
pub trait Replacements: Send {
    /// One new node for each of `failed`, none of them in `in_use` (the
    /// rest of the cascade) nor one that failed before.
    fn replace(
        &mut self,
        failed: &[HopInfo],
        in_use: &[HopInfo],
    ) -> Result<Vec<HopInfo>, DesignerError>;

    /// A failure the designer observed (a directory records it against the
    /// node). Nothing by default.
    fn report(&mut self, _failed: &HopInfo, _step: u64, _reason: &str) {}
}

/// Replacements from a fixed list of spare nodes, used in order.
#[derive(Debug, Clone)]
pub struct Spares {
    spares: VecDeque<HopInfo>,
}

impl Spares {
    /// Spare nodes, in the order they are to be used.
    pub fn new(spares: Vec<HopInfo>) -> Self {
        Spares {
            spares: spares.into(),
        }
    }
}

impl Replacements for Spares {
    fn replace(
        &mut self,
        failed: &[HopInfo],
        in_use: &[HopInfo],
    ) -> Result<Vec<HopInfo>, DesignerError> {
        let mut out = Vec::with_capacity(failed.len());
        for f in failed {
            loop {
                let Some(s) = self.spares.pop_front() else {
                    return Err(DesignerError::Config {
                        message: format!("no spare node left to replace {}", f.addr),
                    });
                };
                if !in_use.contains(&s) && !failed.contains(&s) {
                    out.push(s);
                    break;
                }
            }
        }
        Ok(out)
    }
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

/// The runner's checkpoint and recovery state.
pub(super) struct State {
    dir: Option<CheckpointDir>,
    every: u64,
    replacements: Option<Box<dyn Replacements>>,
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
    slowest: Duration,
    max_attempts: usize,
    events: Vec<RecoveryEvent>,
    checkpoint_s: Vec<f64>,
}

impl State {
    pub(super) fn new(model: &ModelSpec) -> Self {
        State {
            dir: None,
            every: 0,
            replacements: None,
            last: None,
            kept: VecDeque::new(),
            epoch: 0,
            epoch_start: 0,
            done_epochs: Vec::new(),
            prefix: Vec::new(),
            model: model.name.clone(),
            model_digest: model_digest(model),
            slowest: Duration::ZERO,
            max_attempts: 4,
            events: Vec::new(),
            checkpoint_s: Vec::new(),
        }
    }

    /// Checkpoints or recovery are on.
    pub(super) fn enabled(&self) -> bool {
        self.dir.is_some() || self.replacements.is_some()
    }

    /// Whether a checkpoint is due before step `step` runs.
    pub(super) fn wants_checkpoint(&self, step: u64) -> bool {
        if !self.enabled() || self.last.as_ref().is_some_and(|c| c.step == step) {
            return false;
        }
        self.last.is_none() || (self.every > 0 && step.is_multiple_of(self.every))
    }

    pub(super) fn begin_epoch(
        &mut self,
        epoch: u32,
        done: &[EpochMetrics],
        prefix: &[f32],
        step: u64,
    ) {
        self.epoch = epoch;
        self.done_epochs = done.to_vec();
        self.prefix = prefix.to_vec();
        self.epoch_start = step - prefix.len() as u64;
    }

    /// The checkpoints kept in memory, oldest first.
    pub(super) fn kept(&self) -> &VecDeque<Checkpoint> {
        &self.kept
    }

    /// Whether replacements are configured.
    pub(super) fn can_replace(&self) -> bool {
        self.replacements.is_some()
    }

    fn keep(&mut self, c: Checkpoint) {
        self.kept.retain(|k| k.step < c.step);
        self.kept.push_back(c.clone());
        while self.kept.len() > KEPT_CHECKPOINTS {
            self.kept.pop_front();
        }
        self.last = Some(c);
    }

    /// Records how long an answer took (for the detection bound).
    pub(super) fn observe(&mut self, took: Duration) {
        self.slowest = self.slowest.max(took);
    }
}

/// Hex SHA-256 of a model's description: a checkpoint of another model is
/// refused.
pub fn model_digest(model: &ModelSpec) -> String {
    sha256_hex(model.to_toml().as_bytes())
}

/// The parameters among a state's tensors (momentum buffers left out).
pub(super) fn params_only(tensors: Vec<NamedParam>) -> Vec<NamedParam> {
    tensors
        .into_iter()
        .filter(|t| !t.name.ends_with(".velocity"))
        .collect()
}

/// Checkpoints kept in memory.
const KEPT_CHECKPOINTS: usize = 8;

fn recoverable(e: &DesignerError) -> bool {
    matches!(
        e,
        DesignerError::Timeout { .. } | DesignerError::Link { .. } | DesignerError::Reply(_)
    )
}

impl CascadeRunner {
    /// Takes a checkpoint every `every` steps (and at the end of each
    /// epoch's training), written to `dir` when given.
    pub fn with_checkpoints(mut self, dir: Option<CheckpointDir>, every: u64) -> Self {
        self.recovery.dir = dir;
        self.recovery.every = every;
        self
    }

    /// Replaces failed hops from `replacements` and continues from the
    /// last checkpoint, instead of stopping at the first failure.
    pub fn with_replacements(mut self, replacements: Box<dyn Replacements>) -> Self {
        self.recovery.replacements = Some(replacements);
        self
    }

    /// The recoveries so far.
    pub fn recoveries(&self) -> &[RecoveryEvent] {
        &self.recovery.events
    }

    /// Seconds each checkpoint took (fetch and write).
    pub fn checkpoint_times(&self) -> &[f64] {
        &self.recovery.checkpoint_s
    }

    /// The hops of the cascade now (after replacements).
    pub fn hops(&self) -> &[HopInfo] {
        &self.hops
    }

    /// The detection bound T on training and test answers.
    pub(super) fn detection_bound(&self) -> Duration {
        // Only worth a tight bound when a failure can be repaired: without
        // replacements a timeout ends the run, so wait the full timeout.
        if self.recovery.replacements.is_none() {
            return self.opts.timeout;
        }
        (self.recovery.slowest * 20).clamp(
            Duration::from_secs(1),
            self.opts.timeout.max(Duration::from_secs(1)),
        )
    }

    /// Loads `c` (a checkpoint of this model and run) into every stage and
    /// returns where training resumes.
    pub fn restore(&mut self, c: &Checkpoint) -> Result<ResumePoint, DesignerError> {
        if c.model_digest != self.recovery.model_digest {
            return Err(DesignerError::Config {
                message: format!("the checkpoint is of another model ({})", c.model),
            });
        }
        // More (or fewer) epochs than first planned is fine.
        let theirs = TrainConfig {
            epochs: self.cfg.epochs,
            ..c.config
        };
        if theirs != self.cfg {
            return Err(DesignerError::Config {
                message: "the checkpoint was taken with other training settings (seed, batch, optimiser, micro-batches or epochs)".into(),
            });
        }
        // A fresh session whose init notes start every stage at the
        // checkpoint's step, then the states.
        self.rebuild(c)?;
        self.recovery.keep(c.clone());
        Ok(ResumePoint {
            epoch: c.epoch,
            position: c.position,
            epoch_losses: c.epoch_losses.clone(),
            done_epochs: c.done_epochs.clone(),
        })
    }

    fn load_checkpoint(&mut self, c: &Checkpoint) -> Result<(), DesignerError> {
        let n = self.cfg_stage_count();
        if c.stages.len() != n {
            return Err(DesignerError::Config {
                message: format!(
                    "the checkpoint has {} stages, the model {n}",
                    c.stages.len()
                ),
            });
        }
        // A dummy hop's identity stage only has its step counter.
        let remote: Vec<StageState> = self
            .remote
            .iter()
            .map(|(i, _)| match i {
                Some(i) => c.stages[*i].clone(),
                None => StageState {
                    steps: c.step,
                    tensors: Vec::new(),
                },
            })
            .collect();
        self.load_states(&remote)?;
        if let Some(first) = self.local_first.as_mut() {
            first.load_state(&c.stages[0])?;
        }
        if let Some(last) = self.local_last.as_mut() {
            last.load_state(&c.stages[n - 1])?;
        }
        self.step = c.step;
        Ok(())
    }

    fn cfg_stage_count(&self) -> usize {
        self.remote.iter().filter(|(i, _)| i.is_some()).count()
            + usize::from(self.local_first.is_some())
            + usize::from(self.local_last.is_some())
    }

    /// Fetches, records and (with a directory) writes a checkpoint of the
    /// current step. `losses` are this call's losses since the epoch's
    /// resumed prefix.
    pub(super) fn checkpoint(&mut self, losses: &[f32]) -> Result<(), DesignerError> {
        let started = Instant::now();
        let remote = self.fetch_states()?;
        let n = self.cfg_stage_count();
        let mut stages = Vec::with_capacity(n);
        if let Some(first) = &self.local_first {
            stages.push(first.state());
        }
        stages.extend(
            remote
                .into_iter()
                .zip(&self.remote)
                .filter(|(_, (i, _))| i.is_some())
                .map(|(s, _)| s),
        );
        if let Some(last) = &self.local_last {
            stages.push(last.state());
        }
        let r = &self.recovery;
        let mut epoch_losses = r.prefix.clone();
        epoch_losses.extend_from_slice(losses);
        let c = Checkpoint {
            step: self.step,
            epoch: r.epoch,
            position: (self.step - r.epoch_start) as usize,
            epoch_losses,
            done_epochs: r.done_epochs.clone(),
            config: self.cfg,
            model: r.model.clone(),
            model_digest: r.model_digest.clone(),
            stages,
        };
        if let Some(dir) = &self.recovery.dir {
            let path = dir
                .write(&c)
                .map_err(|e| DesignerError::Checkpoint(e.to_string()))?;
            tracing::info!(step = c.step, path = %path.display(), "checkpoint written");
        }
        self.recovery.keep(c);
        self.recovery
            .checkpoint_s
            .push(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Every remote stage's state, fetched in chunks (all hops at once).
    /// Stages without parameters are not asked (so that they never learn
    /// the designer's address): their state is their step counter.
    pub(super) fn fetch_states(&mut self) -> Result<Vec<StageState>, DesignerError> {
        let n = self.hops.len();
        let mut bytes: Vec<Vec<Option<Vec<u8>>>> = vec![Vec::new(); n];
        let mut totals: Vec<Option<usize>> = vec![None; n];
        let asked: Vec<bool> = self.remote.iter().map(|(_, s)| s.has_params()).collect();
        for j in (0..n).filter(|j| asked[*j]) {
            self.send_chunk_request(j, 0, Op::Fetch, &[])?;
        }
        let mut missing = asked.iter().filter(|a| **a).count();
        while missing > 0 {
            let (kind, body) = self.wait(Await::Chunk(0, 0), self.step)?;
            let Await::Chunk(j, chunk) = kind else {
                return Err(DesignerError::Reply(format!("an unexpected {kind:?}")));
            };
            let c = ParamChunk::decode(&body)?;
            let total = c.total as usize;
            if totals[j].is_none() {
                let room = self.chunk_room();
                let chunks = total.div_ceil(room).max(1);
                totals[j] = Some(total);
                bytes[j] = vec![None; chunks];
                for k in 1..chunks {
                    self.send_chunk_request(j, k as u32, Op::Fetch, &[])?;
                }
            }
            let slot = bytes[j]
                .get_mut(chunk as usize)
                .ok_or_else(|| DesignerError::Reply(format!("state chunk {chunk} of hop {j}")))?;
            *slot = Some(c.bytes);
            if bytes[j].iter().all(Option::is_some) {
                missing -= 1;
            }
        }
        bytes
            .into_iter()
            .zip(totals)
            .enumerate()
            .map(|(j, (chunks, total))| {
                if !asked[j] {
                    return Ok(StageState {
                        steps: self.step,
                        tensors: Vec::new(),
                    });
                }
                let all: Vec<u8> = chunks.into_iter().flatten().flatten().collect();
                if Some(all.len()) != total {
                    return Err(DesignerError::Reply(format!(
                        "a state of the wrong length from hop {j}"
                    )));
                }
                Ok(decode_state(&all)?)
            })
            .collect()
    }

    /// Loads `states` (one per remote hop) into the stages, in chunks.
    fn load_states(&mut self, states: &[StageState]) -> Result<(), DesignerError> {
        let room = self.chunk_room();
        let mut expected = 0usize;
        // Stages without parameters start at the right step from their
        // init note; only stages with parameters are loaded.
        for (j, state) in states.iter().enumerate() {
            if !self.remote[j].1.has_params() {
                continue;
            }
            let all = encode_state(state);
            let total = all.len() as u32;
            for (k, part) in all.chunks(room).enumerate() {
                let body = ParamChunk {
                    total,
                    bytes: part.to_vec(),
                }
                .encode();
                self.send_chunk_request(j, k as u32, Op::Load, &body)?;
                expected += 1;
            }
        }
        for _ in 0..expected {
            let (kind, _) = self.wait(Await::Loaded(0, 0), self.step)?;
            if !matches!(kind, Await::Loaded(..)) {
                return Err(DesignerError::Reply(format!("an unexpected {kind:?}")));
            }
        }
        Ok(())
    }

    /// Bytes of state per chunk message.
    fn chunk_room(&self) -> usize {
        self.policy.max_body().saturating_sub(4).max(1)
    }

    /// A loop through hops `0..j` and `op` at hop `j`, which answers the
    /// designer.
    fn send_chunk_request(
        &mut self,
        j: usize,
        chunk: u32,
        op: Op,
        body: &[u8],
    ) -> Result<(), DesignerError> {
        let rid = ReplyId::random(&mut self.rng);
        let mut blocks = Vec::with_capacity(j + 1);
        let mut notes = Vec::with_capacity(j + 1);
        for k in 0..=j {
            let o = if k == j { op } else { Op::Loop };
            blocks.push(self.block(o, k, j, rid, false));
            let step = self.step;
            let note = match o {
                Op::Load => SessionNote::Load(ChunkNote { step, chunk }),
                Op::Fetch => SessionNote::Fetch(ChunkNote { step, chunk }),
                _ => SessionNote::Loop { step },
            };
            notes.push(note.encode());
        }
        let path: Vec<usize> = (0..=j).collect();
        let cells = self.seal(&path, &blocks, &notes, body)?;
        let what = if op == Op::Load {
            Await::Loaded(j, chunk)
        } else {
            Await::Chunk(j, chunk)
        };
        self.pending.insert(rid.0, what);
        self.send_first(&cells)
    }

    /// Which hop failed: loops through the first 1, 2, … n hops; the first
    /// that does not come back within the bound ends at it. `None` if all
    /// come back (a transient failure).
    fn probe(&mut self) -> Option<usize> {
        let n = self.hops.len();
        self.pending.clear();
        self.loops.pause();
        let mut back = vec![false; n];
        for j in 0..n {
            let rid = ReplyId::random(&mut self.rng);
            let blocks: Vec<_> = (0..=j)
                .map(|k| self.block(Op::Loop, k, j, rid, false))
                .collect();
            let notes = vec![SessionNote::Loop { step: self.step }.encode(); j + 1];
            let path: Vec<usize> = (0..=j).collect();
            let sent = self
                .seal(&path, &blocks, &notes, &[])
                .and_then(|cells| self.send_first(&cells));
            if sent.is_err() {
                return Some(0);
            }
            self.pending.insert(rid.0, Await::Probe(j));
        }
        let deadline = Instant::now() + self.detection_bound();
        while back.iter().any(|b| !b) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left) {
                Ok(Some((Await::Probe(j), _))) => back[j] = true,
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        back.iter().position(|b| !b)
    }

    /// Recovers from `cause`: finds the failed hop, replaces it, sets up a
    /// new session and loads the last checkpoint. Returns the step training
    /// resumes at, or `cause` when recovery is off or impossible.
    pub(super) fn recover(&mut self, cause: DesignerError) -> Result<u64, DesignerError> {
        if self.recovery.replacements.is_none() || !recoverable(&cause) {
            return Err(cause);
        }
        let Some(c) = self.recovery.last.clone() else {
            return Err(cause);
        };
        let detected = Instant::now();
        let detected_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let bound = self.detection_bound().as_secs_f64();
        let mut last_error = cause.to_string();
        for attempt in 1..=self.recovery.max_attempts {
            let failed = self.probe();
            let mut replaced = Vec::new();
            if let Some(j) = failed {
                let bad = self.hops[j].clone();
                tracing::warn!(hop = j, addr = %bad.addr, "hop failed ({last_error}); replacing it");
                let in_use: Vec<HopInfo> =
                    self.hops.iter().filter(|h| **h != bad).cloned().collect();
                let Some(r) = self.recovery.replacements.as_mut() else {
                    return Err(cause);
                };
                r.report(&bad, self.step, &last_error);
                let new = r.replace(std::slice::from_ref(&bad), &in_use)?;
                let Some(h) = new.into_iter().next() else {
                    return Err(DesignerError::Config {
                        message: format!("no replacement for {}", bad.addr),
                    });
                };
                replaced.push(bad.addr);
                self.hops[j] = h;
            } else {
                tracing::warn!("every hop answers ({last_error}); setting the cascade up again");
            }
            match self.rebuild(&c) {
                Ok(()) => {
                    let event = RecoveryEvent {
                        cause: cause.to_string(),
                        bound_s: bound,
                        replaced,
                        resumed_at: c.step,
                        recovery_s: detected.elapsed().as_secs_f64(),
                        detected_unix_ms,
                    };
                    tracing::warn!(
                        step = c.step,
                        seconds = event.recovery_s,
                        "recovered from the checkpoint (attempt {attempt})"
                    );
                    self.recovery.events.push(event);
                    return Ok(c.step);
                }
                Err(e) => last_error = e.to_string(),
            }
        }
        Err(DesignerError::Recovery(format!(
            "gave up after {} attempts; last: {last_error}",
            self.recovery.max_attempts
        )))
    }

    /// Replaces hops `bad` after misbehaviour `reason` at `step` (reported
    /// to the directory), sets up a new session and loads `c`.
    pub(super) fn replace_and_rebuild(
        &mut self,
        bad: &[usize],
        step: u64,
        reason: &str,
        c: &Checkpoint,
    ) -> Result<(), DesignerError> {
        let detected = Instant::now();
        let detected_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let failed: Vec<HopInfo> = bad.iter().map(|j| self.hops[*j].clone()).collect();
        let in_use: Vec<HopInfo> = self
            .hops
            .iter()
            .filter(|h| !failed.contains(h))
            .cloned()
            .collect();
        let r = self
            .recovery
            .replacements
            .as_mut()
            .ok_or_else(|| DesignerError::Recovery("no replacements configured".into()))?;
        for f in &failed {
            r.report(f, step, reason);
        }
        let new = r.replace(&failed, &in_use)?;
        if new.len() != failed.len() {
            return Err(DesignerError::Config {
                message: format!("{} replacements for {} hops", new.len(), failed.len()),
            });
        }
        for (j, h) in bad.iter().zip(new) {
            self.hops[*j] = h;
        }
        self.rebuild(c)?;
        self.recovery.kept.retain(|k| k.step <= c.step);
        self.recovery.last = Some(c.clone());
        self.recovery.events.push(RecoveryEvent {
            cause: reason.to_string(),
            bound_s: self.detection_bound().as_secs_f64(),
            replaced: failed.iter().map(|h| h.addr).collect(),
            resumed_at: c.step,
            recovery_s: detected.elapsed().as_secs_f64(),
            detected_unix_ms,
        });
        Ok(())
    }

    /// A fresh session over `self.hops`, with the state of `c`.
    fn rebuild(&mut self, c: &Checkpoint) -> Result<(), DesignerError> {
        self.pending.clear();
        self.tags.clear();
        let pace = mixnn_net::pacing::LinkPace::new(self.opts.link_rate, self.opts.link_jitter);
        let (first, last) = Self::open_links(
            &self.rt,
            &self.key,
            self.link_config,
            &self.allowed,
            &self.hops,
            pace,
            &mut self.rng,
        )?;
        self.first_link = first;
        self.last_link = last;
        // The init note tells every stage the step it starts at.
        self.step = c.step;
        self.init()?;
        self.load_checkpoint(c)
    }
}
