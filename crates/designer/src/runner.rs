//! [`CascadeRunner`]: a training run over a cascade, plugged into the same
//! training loop as the single-process trainer
//! (`mixnn_model::trainer::run_training`). It owns the session and
//! what outlives a session: the checkpoints, the replacements
//! and the recoveries so far. When a session fails it decides what to do
//! ([`crate::plan::recovery`]): probe for the failed hop, replace it, set
//! up a new session from the last checkpoint, or, after a failed audit,
//! from the last checkpoint a local re-execution reproduces.
//!
//! Over 600 lines: the builder, the training-loop adapter and the recovery
//! loop all act on the runner's one state (session, checkpoints,
//! replacements); the decisions are in `plan::recovery`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mixnn_model::spec::ModelSpec;
use mixnn_model::stage::Stage;
use mixnn_model::trainer::{stage_seed, Batch, EpochMetrics, ResumePoint, StepRunner, TrainConfig};
use mixnn_model::weights::StageParams;
use mixnn_wire::PaddingPolicy;
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

use crate::cascade::HopInfo;
use crate::checkpoint::Checkpoint;
use crate::driver::Driver;
use crate::error::{DesignerError, RecoveryError};
use crate::exchange::Exchange;
use crate::misbehaviour::Culprit;
use crate::options::{CascadeOptions, Checkpoints, LinkPacing};
use crate::plan::audit::{AuditStats, Audits};
use crate::plan::layout::Layout;
use crate::plan::loops::{LoopSchedule, LoopStats};
use crate::plan::recovery::{
    self, recoverable, rollback_point, DetectionBound, ProbeVerdict, RecoveryEvent, MAX_ATTEMPTS,
};
use crate::plan::route::Router;
use crate::replacements::Replacements;
use crate::saver::Saver;
use crate::session::{KeptStages, Session};

/// What a [`CascadeRunner`] is built from; [`CascadeBuilder::connect`]
/// connects to the hops and sets up the first session.
pub struct CascadeBuilder<'a> {
    model: &'a ModelSpec,
    cfg: TrainConfig,
    hops: Vec<HopInfo>,
    opts: CascadeOptions,
    checkpoints: Option<Checkpoints>,
    replacements: Option<Box<dyn Replacements>>,
}

impl CascadeBuilder<'_> {
    /// How to run the cascade (default: [`CascadeOptions::default`]).
    pub fn options(mut self, opts: CascadeOptions) -> Self {
        self.opts = opts;
        self
    }

    /// Takes checkpoints as `checkpoints` says. Checkpoints are taken when
    /// a directory or replacements are configured.
    pub fn checkpoints(mut self, checkpoints: Checkpoints) -> Self {
        self.checkpoints = Some(checkpoints);
        self
    }

    /// Replaces failed hops from `replacements` and continues from the
    /// last checkpoint, instead of stopping at the first failure.
    pub fn replacements(mut self, replacements: Box<dyn Replacements>) -> Self {
        self.replacements = Some(replacements);
        self
    }

    /// Connects to the hops, initialises their stages and returns the
    /// runner. The hops must be one per remote stage of the model plus the
    /// dummies.
    pub fn connect(self) -> Result<CascadeRunner, DesignerError> {
        let CascadeBuilder {
            model,
            cfg,
            hops,
            opts,
            checkpoints,
            replacements,
        } = self;
        for h in &hops {
            h.check_arith()?;
        }
        let layout = Layout::new(model, opts.keep, &opts.dummies, hops.len())?;
        let mut rng = ChaCha8Rng::from_seed({
            let mut s = [0u8; 32];
            rand_core::OsRng.fill_bytes(&mut s);
            s
        });
        let (driver_seed, router_seed) = (seed32(&mut rng), seed32(&mut rng));
        let loop_seed = rng.next_u64();
        let audit_seed = opts.audit_seed.unwrap_or_else(|| rng.next_u64());
        let audits = Audits::new(opts.audit_rate, cfg.micro_batches, audit_seed)?;
        // With the first stage kept, one step is in flight whatever the
        // window.
        if !opts.keep.first() {
            audits.check_window(opts.window)?;
        }
        let policy = layout.policy(opts.padding, &cfg, audits.on());
        let driver = Driver::start(
            opts.listen,
            opts.link_pacing.and_then(LinkPacing::pace),
            driver_seed,
        )?;
        let router = Router::new(
            hops.iter().map(|h| h.addr).collect(),
            driver.ends().map(|(addr, _)| addr),
            policy,
            ChaCha8Rng::from_seed(router_seed),
        );
        let loops = LoopSchedule::new(opts.loop_rate, loop_seed);
        let bound = DetectionBound::new(opts.timeout, replacements.is_some());
        let ex = Exchange::new(driver, router, loops, bound);
        let n = model.stages.len();
        let kept = KeptStages {
            first: opts
                .keep
                .first()
                .then(|| Stage::new(&model.stages[0], stage_seed(&cfg.seed, 0), cfg.optimizer)),
            last: opts.keep.last().then(|| {
                Stage::new(
                    &model.stages[n - 1],
                    stage_seed(&cfg.seed, n - 1),
                    cfg.optimizer,
                )
            }),
        };
        let session = Session::new(ex, layout, hops, kept, audits, cfg, opts.window);
        let (dir, every) = match checkpoints {
            Some(c) => (c.dir, c.every),
            None => (None, None),
        };
        let enabled = dir.is_some() || replacements.is_some();
        let mut runner = CascadeRunner {
            session,
            saver: Saver::new(recovery::Checkpoints::new(model, enabled, every), dir),
            replacements,
            events: Vec::new(),
            stalled: None,
            suspected: HashMap::new(),
            model: model.clone(),
            cfg,
        };
        runner.set_up()?;
        tracing::info!(hops = runner.session.hops().len(), "cascade initialised");
        Ok(runner)
    }
}

/// Drives a cascade of remote stages (and optionally kept local ones).
pub struct CascadeRunner {
    session: Session,
    saver: Saver,
    replacements: Option<Box<dyn Replacements>>,
    events: Vec<RecoveryEvent>,
    /// The checkpoint step of the last recoveries that replaced no hop,
    /// and how many there were in a row ([`RecoveryError::NoProgress`]).
    stalled: Option<(u64, usize)>,
    /// Misbehaviours pinned on no single hop found so far, by suspects:
    /// the second time the same ones are found, the run stops.
    suspected: HashMap<Culprit, usize>,
    model: ModelSpec,
    cfg: TrainConfig,
}

impl CascadeRunner {
    /// A runner for `model` over `hops`, trained as `cfg` says; set the
    /// options, checkpoints and replacements, then
    /// [`CascadeBuilder::connect`].
    pub fn builder<'a>(
        model: &'a ModelSpec,
        cfg: &TrainConfig,
        hops: Vec<HopInfo>,
    ) -> CascadeBuilder<'a> {
        CascadeBuilder {
            model,
            cfg: *cfg,
            hops,
            opts: CascadeOptions::default(),
            checkpoints: None,
            replacements: None,
        }
    }

    /// Connects with `opts` and nothing else (no checkpoints, no
    /// replacements): `builder(model, cfg, hops).options(opts).connect()`.
    pub fn connect(
        model: &ModelSpec,
        hops: Vec<HopInfo>,
        cfg: &TrainConfig,
        opts: CascadeOptions,
    ) -> Result<Self, DesignerError> {
        Self::builder(model, cfg, hops).options(opts).connect()
    }

    /// The address the designer listens on for the first hop.
    pub fn listen_addr(&self) -> SocketAddr {
        self.session.exchange_ref().driver().listen_addr()
    }

    /// Both addresses the designer listens on: the first hop delivers to
    /// the first, the last hop to the second.
    pub fn listen_addrs(&self) -> [SocketAddr; 2] {
        self.session
            .exchange_ref()
            .driver()
            .ends()
            .map(|(addr, _)| addr)
    }

    /// The padding policy in force.
    pub fn policy(&self) -> PaddingPolicy {
        self.session.exchange_ref().policy()
    }

    /// Ends the session on every hop (they drop its state at once rather
    /// than when it idles out); the runner sends nothing more.
    pub fn close(&mut self) -> Result<(), DesignerError> {
        let (n, step) = (self.session.hops().len(), self.session.step());
        self.session.exchange().close(n, step)
    }

    /// The hops of the cascade now (after replacements).
    pub fn hops(&self) -> &[HopInfo] {
        self.session.hops()
    }

    /// Loops sent, returned and lost so far.
    pub fn loop_stats(&self) -> LoopStats {
        self.session.exchange_ref().loop_stats()
    }

    /// What audits found so far.
    pub fn audit_stats(&self) -> &AuditStats {
        self.session.audits_ref().stats()
    }

    /// The recoveries so far.
    pub fn recoveries(&self) -> &[RecoveryEvent] {
        &self.events
    }

    /// Seconds each checkpoint took (fetch and write).
    pub fn checkpoint_times(&self) -> &[f64] {
        self.saver.seconds()
    }

    /// Feeds a test accuracy to the test-phase check (for the last epoch,
    /// which no later epoch start reports); returns whether the cascade is
    /// suspect.
    pub fn check_accuracy(&mut self, epoch: u32, test_acc: f64) -> bool {
        self.session.audits().check_accuracy(epoch, test_acc)
    }

    /// Keeps only loops going for `duration` (no training traffic): the
    /// cascade's health check between runs. Fails as soon as a loop is not
    /// back within the detection bound.
    pub fn run_loops(&mut self, duration: Duration) -> Result<LoopStats, DesignerError> {
        let step = self.session.step();
        self.session.exchange().run_loops(duration, step)
    }

    /// Opens the links and sends the init loop. A hop that fails meanwhile
    /// (it cannot be reached, or the init loop does not come back within
    /// its bound) is found and replaced like one that fails mid-training,
    /// when replacements are configured: the run sets up a new session
    /// from step 0, whose states the designer knows from the seeds
    /// ([`CascadeRunner::start_checkpoint`]).
    fn set_up(&mut self) -> Result<(), DesignerError> {
        let hops = self.session.hops().to_vec();
        match self
            .session
            .exchange()
            .connect(&hops)
            .and_then(|()| self.session.init())
        {
            Ok(()) => Ok(()),
            Err(e) => self.recover(e).map(|_| ()),
        }
    }

    /// The checkpoint of step 0 of a fresh run, made here: every stage as
    /// its seed initialises it (what a hop builds from its init note).
    /// What a failure before the first checkpoint recovers from; `None`
    /// once the run is past step 0.
    fn start_checkpoint(&self) -> Option<Checkpoint> {
        if self.session.step() != 0 {
            return None;
        }
        let stages = self
            .model
            .stages
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                Stage::new(spec, stage_seed(&self.cfg.seed, i), self.cfg.optimizer).state()
            })
            .collect();
        Some(self.saver.policy.make(0, stages, &[], &self.cfg))
    }

    /// Loads `c` (a checkpoint of this model and run) into every stage and
    /// returns where training resumes.
    pub fn restore(&mut self, c: &Checkpoint) -> Result<ResumePoint, DesignerError> {
        if c.model_digest != self.saver.policy.model_digest() {
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
        let hops = self.session.hops().to_vec();
        self.saver.policy.keep(c.clone());
        if let Err(e) = self.session.rebuild(hops, c) {
            // A hop that fails while the run resumes is replaced too.
            if self.recover(e)? != c.step {
                return Err(RecoveryError::NoCheckpointAt {
                    step: c.step,
                    purpose: "resume",
                }
                .into());
            }
        }
        Ok(ResumePoint {
            epoch: c.epoch,
            position: c.position,
            epoch_losses: c.epoch_losses.clone(),
            done_epochs: c.done_epochs.clone(),
        })
    }

    /// Recovers from `cause`: finds the failed hop, replaces it, sets up a
    /// new session and loads the last checkpoint. Returns the step training
    /// resumes at, or `cause` when recovery is off or impossible.
    fn recover(&mut self, cause: DesignerError) -> Result<u64, DesignerError> {
        if self.replacements.is_none() || !recoverable(&cause) {
            return Err(cause);
        }
        let Some(c) = self
            .saver
            .policy
            .last()
            .cloned()
            .or_else(|| self.start_checkpoint())
        else {
            return Err(cause);
        };
        let detected = Instant::now();
        let detected_unix_ms = unix_ms();
        let bound = self.session.exchange_ref().bound().as_secs_f64();
        let mut last_error = cause.to_string();
        let mut unreachable = unreachable_hop(&cause);
        for attempt in 1..=MAX_ATTEMPTS {
            let (n, step) = (self.session.hops().len(), self.session.step());
            let mut hops = self.session.hops().to_vec();
            // A hop the designer could not reach (or whose link broke) is
            // the failed one; otherwise loops through the prefixes find it.
            let verdict = match unreachable.and_then(|a| hops.iter().position(|h| h.addr == a)) {
                Some(j) => ProbeVerdict::Dead(j),
                None => self.session.exchange().probe(n, step),
            };
            let mut replaced = Vec::new();
            if let ProbeVerdict::Link(a, b) = verdict {
                tracing::warn!(
                    "hop {a} or hop {b} drops what passes between them ({last_error}); neither is replaced"
                );
            }
            if let ProbeVerdict::Dead(j) = verdict {
                let bad = hops[j].clone();
                tracing::warn!(hop = j, addr = %mixnn_net::alias::peer(&bad.addr), "hop failed ({last_error}); replacing it");
                let in_use: Vec<HopInfo> = hops.iter().filter(|h| **h != bad).cloned().collect();
                let Some(r) = self.replacements.as_mut() else {
                    return Err(cause);
                };
                r.report(&bad, step, &last_error);
                let new = r.replace(std::slice::from_ref(&bad), &in_use)?;
                let Some(h) = new.into_iter().next() else {
                    return Err(DesignerError::NoReplacement {
                        addr: bad.addr,
                        reason: "none offered".into(),
                    });
                };
                h.check_arith()?;
                replaced.push(bad.addr);
                hops[j] = h;
            } else {
                tracing::warn!("every hop answers ({last_error}); setting the cascade up again");
            }
            match self.session.rebuild(hops, &c) {
                Ok(()) => {
                    self.note_progress(&replaced, c.step, &cause)?;
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
                    self.events.push(event);
                    return Ok(c.step);
                }
                Err(e) => {
                    unreachable = unreachable_hop(&e);
                    last_error = e.to_string();
                }
            }
        }
        Err(RecoveryError::GaveUp {
            attempts: MAX_ATTEMPTS,
            last: last_error,
        }
        .into())
    }

    /// After a recovery that resumed at `step` having replaced
    /// `replaced`: a failure that keeps coming back after resuming from
    /// the same checkpoint while every hop answers (a bad reply no probe
    /// pins on a hop) ends the run after [`MAX_ATTEMPTS`] such recoveries
    /// instead of looping for ever.
    fn note_progress(
        &mut self,
        replaced: &[std::net::SocketAddr],
        step: u64,
        cause: &DesignerError,
    ) -> Result<(), DesignerError> {
        if !replaced.is_empty() {
            self.stalled = None;
            return Ok(());
        }
        let times = match self.stalled {
            Some((at, n)) if at == step => n + 1,
            _ => 1,
        };
        self.stalled = Some((step, times));
        if times > MAX_ATTEMPTS {
            return Err(RecoveryError::NoProgress {
                step,
                times,
                last: cause.to_string(),
            }
            .into());
        }
        Ok(())
    }

    /// Recovers from a misbehaviour. One pinned on a hop gets the hop
    /// reported and replaced; one that can only be pinned on two hops or
    /// on a transfer's route replaces and reports nobody, and ends the run
    /// if the same suspects are found again. Either way the run goes back
    /// to the last checkpoint before the first bad step (`epoch`: this
    /// epoch's batches, from `base`, which a local re-execution checks it
    /// against), or, without them (a test, a fetch), to the last
    /// checkpoint. Returns the step training resumes at.
    fn recover_misbehaviour(
        &mut self,
        cause: DesignerError,
        epoch: Option<(&[Batch], u64)>,
    ) -> Result<u64, DesignerError> {
        let DesignerError::Misbehaved(m) = &cause else {
            return self.recover(cause);
        };
        if self.replacements.is_none() {
            return Err(cause);
        }
        let (culprit, step) = (m.culprit, m.step);
        let reason = format!("{}: {}", m.kind, m.reason);
        let c = match epoch {
            Some((batches, base)) => rollback_point(
                self.saver.policy.kept(),
                step,
                batches,
                base,
                &self.model,
                self.cfg.optimizer,
                &self.cfg.seed,
            )?,
            None => match self.saver.policy.last() {
                Some(c) => c.clone(),
                None => return Err(cause),
            },
        };
        match culprit {
            Culprit::Hop(j) => {
                tracing::warn!(hop = j, step, back_to = c.step, "{reason}; replacing it");
                self.replace_and_rebuild(&[j], step, &reason, &c)?;
            }
            Culprit::Pair(..) | Culprit::Route { .. } => {
                let seen = self.suspected.entry(culprit).or_insert(0);
                *seen += 1;
                if *seen > 1 {
                    // The same suspects again: stop, naming them.
                    return Err(cause);
                }
                tracing::warn!(%culprit, step, back_to = c.step, "{reason}; replacing neither, going back");
                self.replace_and_rebuild(&[], step, &reason, &c)?;
            }
        }
        Ok(c.step)
    }

    /// Replaces hops `bad` after misbehaviour `reason` at `step` (reported
    /// to the replacements' source), sets up a new session and loads `c`.
    fn replace_and_rebuild(
        &mut self,
        bad: &[usize],
        step: u64,
        reason: &str,
        c: &Checkpoint,
    ) -> Result<(), DesignerError> {
        let detected = Instant::now();
        let detected_unix_ms = unix_ms();
        let mut hops = self.session.hops().to_vec();
        let failed: Vec<HopInfo> = bad.iter().map(|j| hops[*j].clone()).collect();
        let in_use: Vec<HopInfo> = hops
            .iter()
            .filter(|h| !failed.contains(h))
            .cloned()
            .collect();
        let r = self
            .replacements
            .as_mut()
            .ok_or(RecoveryError::NoReplacements)?;
        for f in &failed {
            r.report(f, step, reason);
        }
        let new = if failed.is_empty() {
            Vec::new()
        } else {
            r.replace(&failed, &in_use)?
        };
        if new.len() != failed.len() {
            return Err(DesignerError::Config {
                message: format!("{} replacements for {} hops", new.len(), failed.len()),
            });
        }
        for (j, h) in bad.iter().zip(new) {
            h.check_arith()?;
            hops[*j] = h;
        }
        self.session.rebuild(hops, c)?;
        self.saver.policy.rolled_back_to(c);
        self.stalled = None;
        self.events.push(RecoveryEvent {
            cause: reason.to_string(),
            bound_s: self.session.exchange_ref().bound().as_secs_f64(),
            replaced: failed.iter().map(|h| h.addr).collect(),
            resumed_at: c.step,
            recovery_s: detected.elapsed().as_secs_f64(),
            detected_unix_ms,
        });
        Ok(())
    }

    /// Recovers from `e` where the session must come back at the step it
    /// was at (a test, a fetch): no checkpoint of that step, no recovery.
    fn recover_in_place(
        &mut self,
        e: DesignerError,
        purpose: &'static str,
    ) -> Result<(), DesignerError> {
        let at = self.session.step();
        let back = match e {
            DesignerError::Misbehaved(_) => self.recover_misbehaviour(e, None)?,
            e => self.recover(e)?,
        };
        if back != at {
            return Err(RecoveryError::NoCheckpointAt { step: at, purpose }.into());
        }
        Ok(())
    }
}

/// The hop whose link failed, when `e` says which: the designer could not
/// open it, or it broke.
fn unreachable_hop(e: &DesignerError) -> Option<SocketAddr> {
    match e {
        DesignerError::NoLink { addr, .. }
        | DesignerError::Link { addr, .. }
        | DesignerError::PacedLinkFailed { addr } => Some(*addr),
        _ => None,
    }
}

/// 32 bytes from `rng`.
fn seed32(rng: &mut ChaCha8Rng) -> [u8; 32] {
    let mut s = [0u8; 32];
    rng.fill_bytes(&mut s);
    s
}

/// Now, in Unix milliseconds (0 before 1970).
fn unix_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

impl StepRunner for CascadeRunner {
    type Error = DesignerError;

    fn begin_epoch(&mut self, epoch: u32, done: &[EpochMetrics], losses_so_far: &[f32]) {
        self.session.audits().check_epochs(done);
        let step = self.session.step();
        self.saver
            .policy
            .begin_epoch(epoch, done, losses_so_far, step);
    }

    fn train_batches(
        &mut self,
        batches: &[Batch],
        on_step: &mut dyn FnMut(f32),
    ) -> Result<Vec<f32>, DesignerError> {
        let base = self.session.step();
        let mut losses = Vec::with_capacity(batches.len());
        // After a recovery, steps since the checkpoint run again; the
        // progress callback hears of each step once.
        let mut reported = 0usize;
        loop {
            let mut tick = |i: usize, l: f32| {
                if i >= reported {
                    on_step(l);
                    reported = i + 1;
                }
            };
            match self
                .session
                .train(batches, base, &mut losses, &mut self.saver, &mut tick)
            {
                Ok(()) => return Ok(losses),
                Err(e) => {
                    let step = match e {
                        DesignerError::Misbehaved(_) => {
                            self.recover_misbehaviour(e, Some((batches, base)))?
                        }
                        e => self.recover(e)?,
                    };
                    let back = step.checked_sub(base).ok_or(RecoveryError::BeforeEpoch {
                        checkpoint: step,
                        base,
                    })?;
                    losses.truncate(back as usize);
                }
            }
        }
    }

    fn predict_batches(
        &mut self,
        batches: &[Batch],
        on_batch: &mut dyn FnMut(),
    ) -> Result<Vec<u32>, DesignerError> {
        let mut reported = 0usize;
        tracing::info!(batches = batches.len(), "testing");
        loop {
            let mut tick = |i: usize| {
                if i >= reported {
                    on_batch();
                    reported = i + 1;
                }
            };
            match self.session.predict(batches, &mut tick) {
                Ok(out) => return Ok(out),
                Err(e) => self.recover_in_place(e, "test")?,
            }
        }
    }

    fn params(&mut self) -> Result<Vec<StageParams>, DesignerError> {
        tracing::info!("fetching the final weights");
        let states = loop {
            match self.session.fetch_states() {
                Ok(s) => break s,
                Err(e) => self.recover_in_place(e, "fetch")?,
            }
        };
        Ok(self.session.params(states))
    }
}
