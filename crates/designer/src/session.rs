//! One designer session over the cascade: set up by the init loop, then
//! training steps (pipelined forward and backward per micro-batch), test
//! batches, state fetches and loads, and audits, until it fails or a
//! recovery replaces it ([`Session::rebuild`]).
//!
//! (Over 600 lines: it is the one layer that holds a session's mutable
//! state — step, tags, kept stages, audits — and every operation on it;
//! the decisions it takes are in the pure `plan` modules, the messaging in
//! `exchange`; the order of a call's training loop is the step core's,
//! `plan::steps`.)
//!
//! Per step the session sends two onions per micro-batch: a forward
//! through the hops in order (the last delivers the loss to the designer)
//! and a backward in reverse order (the first hop tells the designer the
//! step is done), the backward sent to the last hop right away, so the
//! loss stage starts backward as soon as its forward is done. It keeps up
//! to `window` steps in flight (`plan::steps`, `plan::window`): hops act on a step only after
//! applying the one before, so pipelining changes timing, never results.
//! Audit openings of a completed step are fetched while later steps are
//! in flight (a [`Prefetch`]: their chunks answer the same wait as the
//! steps' replies) and checked as soon as they are in.
//! Kept stages run here, in the designer process.

use std::collections::HashMap;
use std::time::Instant;

use mixnn_model::arith::ARITH_VERSION;
use mixnn_model::seed::Purpose;
use mixnn_model::stage::{Stage, StageCache, StageState};
use mixnn_model::tensor_bytes::TensorBytes;
use mixnn_model::trainer::{stage_seed, Batch, TrainConfig};
use mixnn_model::weights::StageParams;
use mixnn_proto::audit::{digest_state, state_digest, Opening};
use mixnn_proto::trailer::Pass;
use mixnn_proto::{decode_state, encode_state, InitNote, Micro};
use mixnn_wire::{HopTag, OnionPublic};
use rand_core::RngCore;

use crate::cascade::HopInfo;
use crate::checkpoint::Checkpoint;
use crate::error::{BadReply, DesignerError};
use crate::exchange::{Exchange, Fetch, Transfer};
use crate::misbehaviour::{Culprit, Misbehaviour, MisbehaviourKind};
use crate::plan::audit::Audits;
use crate::plan::layout::Layout;
use crate::plan::opening::{AuditCase, AuditContext, Verdict};
use crate::plan::pending::{Await, Expected};
use crate::plan::recovery::{params_only, Checkpoints};
use crate::plan::route::Route;
use crate::plan::steps::{Command, Gates, PrefetchProgress, Reply, StepLoop};
use crate::plan::transfer::state_bound;
use crate::saver::Saver;

mod predict;

/// The stages the designer runs itself.
#[derive(Default)]
pub struct KeptStages {
    /// The first stage, if kept.
    pub first: Option<Stage>,
    /// The last stage, if kept.
    pub last: Option<Stage>,
}

/// A session over the cascade's hops.
pub struct Session {
    ex: Exchange,
    layout: Layout,
    hops: Vec<HopInfo>,
    kept: KeptStages,
    audits: Audits,
    cfg: TrainConfig,
    /// Micro-batches per step (the configured count, within 1..=u16::MAX).
    micro_batches: usize,
    window: usize,
    step: u64,
    /// Per-hop tags of each micro-batch in flight, shared by its forward
    /// and backward.
    tags: HashMap<(u64, u16), Vec<HopTag>>,
}

impl Session {
    /// A session over `hops` laid out as `layout`, not yet set up
    /// ([`Session::init`]).
    pub fn new(
        ex: Exchange,
        layout: Layout,
        hops: Vec<HopInfo>,
        kept: KeptStages,
        audits: Audits,
        cfg: TrainConfig,
        window: usize,
    ) -> Self {
        Session {
            ex,
            layout,
            hops,
            kept,
            audits,
            micro_batches: cfg.micro_batches.clamp(1, usize::from(u16::MAX)),
            cfg,
            window: window.max(1),
            step: 0,
            tags: HashMap::new(),
        }
    }

    /// Updates applied so far (the step the cascade is at).
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The cascade's hops.
    pub fn hops(&self) -> &[HopInfo] {
        &self.hops
    }

    /// The messaging layer.
    pub fn exchange(&mut self) -> &mut Exchange {
        &mut self.ex
    }

    /// The messaging layer, to read.
    pub fn exchange_ref(&self) -> &Exchange {
        &self.ex
    }

    /// The audit state.
    pub fn audits(&mut self) -> &mut Audits {
        &mut self.audits
    }

    /// The audit state, to read.
    pub fn audits_ref(&self) -> &Audits {
        &self.audits
    }

    /// Sends the init loop through every hop (each builds its stage from
    /// its note, starting at the session's step) and waits for it.
    pub fn init(&mut self) -> Result<(), DesignerError> {
        // The designer faces the first and the last hop with a key and an
        // address of its own each.
        let [(_, first_key), (_, last_key)] = self.ex.driver().ends();
        let publics: Vec<OnionPublic> = self
            .hops
            .iter()
            .map(|h| h.onion_key().map(OnionPublic))
            .collect::<Result<_, _>>()?;
        let links: Vec<[u8; 32]> = self
            .hops
            .iter()
            .map(HopInfo::link_key)
            .collect::<Result<_, _>>()?;
        let padding = self.ex.policy();
        // The nodes refuse inits issued far from their clock.
        let issued_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let addrs: Vec<std::net::SocketAddr> = self.hops.iter().map(|h| h.addr).collect();
        // Fresh commitment keys for every session.
        self.audits
            .new_session(self.hops.len(), self.ex.router().rng());
        let reply_keys = self.ex.router().fresh_reply_keys();
        let me: Vec<Option<std::net::SocketAddr>> = (0..self.hops.len())
            .map(|k| self.ex.router().me(k))
            .collect();
        let early: Vec<u64> = (0..self.hops.len())
            .map(|_| self.ex.router().rng().next_u64() % 32)
            .collect();
        let last = self.hops.len().saturating_sub(1);
        let notes: Vec<InitNote> = self
            .layout
            .hops
            .iter()
            .enumerate()
            .map(|(k, h)| InitNote {
                arith: ARITH_VERSION,
                stage: h.spec.clone(),
                optimizer: self.cfg.optimizer,
                seed: self.hop_seed(k),
                start_step: self.step,
                padding,
                // Each hop's own issue time, up to 31 s early: hops check
                // it against their window, and no two see the same value.
                issued_at: issued_at.saturating_sub(early[k]),
                prev_link: if k == 0 { first_key } else { links[k - 1] },
                next_link: links.get(k + 1).copied().unwrap_or(last_key),
                // Only the ends deliver to the designer (every route to a
                // middle hop comes back through the first): a middle hop
                // learns neither the designer's address nor its key.
                designer_link: if k == 0 {
                    first_key
                } else if k == last {
                    last_key
                } else {
                    [0; 32]
                },
                // Where the hop may send: its neighbours and, at the ends,
                // the designer.
                prev_addr: k.checked_sub(1).map(|j| addrs[j]),
                next_addr: addrs.get(k + 1).copied(),
                designer_addr: me[k],
                reply_key: reply_keys[k],
                audit_key: self.audits.key(k),
            })
            .collect();
        // The designer knows the state each hop builds from its note: the
        // first step's forward must run on it (a load replaces it).
        if self.audits.on() {
            for (k, n) in notes.iter().enumerate() {
                let mut stage = Stage::new(&n.stage, n.seed, n.optimizer);
                stage.start_at(n.start_step);
                self.audits
                    .know(k, n.start_step, digest_state(&stage.state()));
            }
        }
        self.ex
            .init(|router| router.init(&publics, &notes), self.step)
    }

    /// The seed hop `k`'s stage is built with.
    fn hop_seed(&self, k: usize) -> u64 {
        match self.layout.hops.get(k).and_then(|h| h.index) {
            Some(i) => stage_seed(&self.cfg.seed, i),
            // A dummy's seed initialises nothing; it is drawn like a
            // stage's so that it does not stand out.
            None => self.cfg.seed.derive(Purpose::Dummy(k as u64)),
        }
    }

    /// Every hop's state as its init note builds it at step 0: what the
    /// designer knows without asking (the seeds are its own).
    fn initial_states(&self) -> Vec<StageState> {
        (0..self.layout.len())
            .map(|k| {
                Stage::new(
                    &self.layout.hops[k].spec,
                    self.hop_seed(k),
                    self.cfg.optimizer,
                )
                .state()
            })
            .collect()
    }

    /// A fresh session over `hops` with the state of `c`: new links, the
    /// init loop (every stage starts at the checkpoint's step), then the
    /// states.
    pub fn rebuild(&mut self, hops: Vec<HopInfo>, c: &Checkpoint) -> Result<(), DesignerError> {
        self.tags.clear();
        self.hops = hops;
        self.ex.connect(&self.hops)?;
        self.step = c.step;
        self.init()?;
        self.load_checkpoint(c)
    }

    /// Trains `batches` (steps from `base`) from where `losses` (the
    /// losses of the batches done) leaves off, taking checkpoints and
    /// running audits on the way, and a checkpoint at the end.
    /// `on_step(position, loss)` hears of each completed step.
    pub fn train(
        &mut self,
        batches: &[Batch],
        base: u64,
        losses: &mut Vec<f32>,
        saver: &mut Saver,
        on_step: &mut dyn FnMut(usize, f32),
    ) -> Result<(), DesignerError> {
        self.train_steps(batches, base, losses, saver, on_step)
            .map_err(|e| self.found(e))
    }

    fn train_steps(
        &mut self,
        batches: &[Batch],
        base: u64,
        losses: &mut Vec<f32>,
        saver: &mut Saver,
        on_step: &mut dyn FnMut(usize, f32),
    ) -> Result<(), DesignerError> {
        let window = if self.kept.first.is_some() {
            1
        } else {
            self.window
        };
        let start = losses.len();
        debug_assert_eq!(self.step, base + start as u64);
        // The order of things is the core's (`plan::steps`); this loop
        // carries its commands out.
        let mut core = StepLoop::new(
            batches,
            base,
            start,
            self.micro_batches,
            window,
            self.audits.on(),
        );
        let mut first_caches: HashMap<(u64, u16), StageCache> = HashMap::new();
        // The openings of the oldest audited step, fetched while later
        // steps run.
        let mut prefetch: Option<Prefetch> = None;
        loop {
            let gates = SessionGates {
                policy: &saver.policy,
                audits: &self.audits,
                window,
            };
            match core.poll(&gates) {
                Command::Checkpoint { step } => {
                    self.step = step;
                    self.checkpoint(saver, losses)?;
                }
                Command::FinishPrefetch { waiting, .. } => {
                    self.finish_prefetch(&mut prefetch, batches, base, waiting)?;
                }
                Command::RunAudits { step } => {
                    self.step = step;
                    self.run_audits(batches, base)?;
                }
                Command::Send { index, step } => {
                    for (m, c) in self
                        .send_step(&batches[index], step)?
                        .into_iter()
                        .enumerate()
                    {
                        first_caches.insert((step, m as u16), c);
                    }
                }
                Command::Wait { expected, step } => {
                    let (kind, body) = self.ex.wait(expected, step)?;
                    let body = self.audits.take(kind, body, self.layout.len())?;
                    match core.on_reply(kind)? {
                        Reply::Output {
                            step,
                            micro,
                            index,
                            micros,
                        } => {
                            let rows = core.window().rows(index, micro);
                            let loss =
                                self.on_output(&batches[index], rows, micros, step, micro, &body)?;
                            core.on_loss(step, micro, loss)?;
                        }
                        Reply::Done {
                            step,
                            micro,
                            micros,
                        } => {
                            if let Some(first) = self.kept.first.as_mut() {
                                let c = first_caches
                                    .remove(&(step, micro))
                                    .ok_or(BadReply::MicroBatch { step, micro })?;
                                first
                                    .backward_micro_bytes(c, Some(&body), false, u32::from(micro))
                                    .map_err(|e| {
                                        malformed(0, step, format!("its gradient: {e}"))
                                    })?;
                                if first.pending_micros() == micros {
                                    first.apply();
                                }
                            }
                            core.on_done(step)?;
                        }
                        Reply::Opening => {
                            let Some(mut p) = prefetch.take() else {
                                return Err(DesignerError::UnexpectedReply {
                                    expected,
                                    got: kind,
                                });
                            };
                            let progress =
                                match self.ex.on_transfer_reply(&mut p.transfer, kind, &body) {
                                    Ok(()) if p.transfer.complete() => {
                                        self.audit_prefetched(p, batches, base, true)?;
                                        PrefetchProgress::Complete
                                    }
                                    Ok(()) => {
                                        prefetch = Some(p);
                                        PrefetchProgress::Pending
                                    }
                                    Err(e) if route_fault(&e) => {
                                        // Left to the audits between steps,
                                        // which fetch each opening on its
                                        // own and so pin a failure to its hop.
                                        self.ex.forget(|a| p.transfer.what().answered_by(a));
                                        PrefetchProgress::Failed
                                    }
                                    Err(e) => return Err(e),
                                };
                            core.on_prefetch(progress);
                        }
                    }
                }
                Command::Completed { index, step, loss } => {
                    losses.push(loss);
                    self.audits.step_done(step, &self.layout);
                    on_step(index, loss);
                }
                Command::StartPrefetch { step } => {
                    prefetch = Some(self.start_prefetch(step)?);
                    core.prefetch_started(step);
                }
                Command::Reached { step } => self.step = step,
                Command::Finished => return Ok(()),
            }
        }
    }

    /// The loss of micro-batch `micro` of `step` from its output `body`:
    /// as delivered, or computed here by the kept last stage (which then
    /// sends the backward).
    fn on_output(
        &mut self,
        batch: &Batch,
        rows: Option<std::ops::Range<usize>>,
        micros: usize,
        step: u64,
        micro: u16,
        body: &[u8],
    ) -> Result<f32, DesignerError> {
        // Only the last hop delivers outputs: one that does not parse is
        // its doing.
        let end = self.layout.len().saturating_sub(1);
        let loss = match self.kept.last.as_mut() {
            Some(last) => {
                let rows = rows.ok_or(BadReply::MicroBatch { step, micro })?;
                let labels = batch.slice(rows).labels;
                let place = mixnn_model::stage::Micro {
                    index: u32::from(micro),
                    batch_rows: batch.rows,
                };
                let (l, c) = last
                    .forward_step_bytes(body, Some(&labels), place)
                    .map_err(|e| malformed(end, step, format!("its output: {e}")))?;
                let g = last
                    .backward_micro_bytes(c, None, true, u32::from(micro))?
                    .unwrap_or_default();
                if last.pending_micros() == micros {
                    last.apply();
                }
                self.send_backward(step, micro, micros as u16, &g)?;
                TensorBytes::decode(&l)?.values.first().copied()
            }
            None => TensorBytes::decode(body)
                .map_err(|e| malformed(end, step, format!("its loss: {e}")))?
                .values
                .first()
                .copied(),
        };
        loss.ok_or_else(|| malformed(end, step, "an empty loss"))
    }

    /// Sends the forward (and, without a kept last stage, the backward)
    /// onions of every micro-batch of `step`; returns the kept first
    /// stage's caches, one per micro-batch.
    fn send_step(&mut self, batch: &Batch, step: u64) -> Result<Vec<StageCache>, DesignerError> {
        let micros = batch.micro_batches(self.micro_batches);
        let count = micros.len() as u16;
        let mut caches = Vec::new();
        for (m, micro) in micros.iter().enumerate() {
            let m = m as u16;
            let x =
                TensorBytes::encode_pixels(&self.layout.input.batched(micro.rows), &micro.pixels);
            let body = match &self.kept.first {
                Some(first) => {
                    let place = mixnn_model::stage::Micro {
                        index: u32::from(m),
                        batch_rows: batch.rows,
                    };
                    let (y, c) = first.forward_step_bytes(&x, None, place)?;
                    caches.push(c);
                    y
                }
                None => x,
            };
            self.send_forward(step, m, count, batch.rows, &micro.labels, &body)?;
            if self.kept.last.is_none() {
                self.send_backward(step, m, count, &[])?;
            }
        }
        Ok(caches)
    }

    fn send_forward(
        &mut self,
        step: u64,
        micro: u16,
        micros: u16,
        batch_rows: usize,
        labels: &[u32],
        body: &[u8],
    ) -> Result<(), DesignerError> {
        let tags = self.ex.router().tags();
        let m = Micro::new(micro, micros)?;
        let route = Route::forward(
            &self.layout,
            step,
            m,
            batch_rows as u32,
            labels,
            tags.clone(),
        );
        let n = self.layout.len();
        let body = self
            .audits
            .pad(Pass::Forward, step, u32::from(micro), n, body)?;
        self.ex.send(&route, &body, Await::Output { step, micro })?;
        self.tags.insert((step, micro), tags);
        Ok(())
    }

    fn send_backward(
        &mut self,
        step: u64,
        micro: u16,
        micros: u16,
        grad: &[u8],
    ) -> Result<(), DesignerError> {
        let tags = self
            .tags
            .remove(&(step, micro))
            .ok_or(BadReply::MicroBatch { step, micro })?;
        let route = Route::backward(&self.layout, step, Micro::new(micro, micros)?, tags);
        let n = self.layout.len();
        let grad = self
            .audits
            .pad(Pass::Backward, step, u32::from(micro), n, grad)?;
        self.ex.send(&route, &grad, Await::Done { step, micro })
    }

    /// Every hop's state, fetched in chunks (all hops at once). Stages
    /// without parameters are not asked (so that they never learn the
    /// designer's address): their state is their step counter.
    pub fn fetch_states(&mut self) -> Result<Vec<StageState>, DesignerError> {
        self.fetch_states_checked().map_err(|e| self.found(e))
    }

    fn fetch_states_checked(&mut self) -> Result<Vec<StageState>, DesignerError> {
        let asked: Vec<usize> = (0..self.layout.len())
            .filter(|j| self.layout.has_params(*j))
            .collect();
        let bounds: Vec<usize> = asked
            .iter()
            .map(|&j| state_bound(&self.layout.hops[j].spec, &self.cfg.optimizer))
            .collect();
        let fetched =
            self.ex
                .download(&asked, &bounds, Fetch::State { step: self.step }, self.step)?;
        // A fetched state must be the one the hop committed to leaving
        // after the last step, or the one the designer loaded into it or
        // built it with: anything else is that hop's lie (the state is
        // sealed by it).
        if self.audits.on() {
            for (&j, bytes) in asked.iter().zip(&fetched) {
                let Some(want) = self.audits.expected_state(j, self.step) else {
                    return Err(DesignerError::Config {
                        message: format!(
                            "no state of hop {j} known at step {} to check its fetched state against",
                            self.step
                        ),
                    });
                };
                if state_digest(bytes) != want {
                    let last = self.step.saturating_sub(1);
                    return Err(DesignerError::Misbehaved(Misbehaviour::new(
                        Culprit::Hop(j),
                        last,
                        MisbehaviourKind::FalseState,
                        format!(
                            "the state it sent at step {} is not the state it committed to (or was loaded with)",
                            self.step
                        ),
                    )));
                }
            }
        }
        let mut fetched: HashMap<usize, Vec<u8>> = asked.into_iter().zip(fetched).collect();
        (0..self.layout.len())
            .map(|j| match fetched.remove(&j) {
                Some(bytes) => decode_state(&bytes)
                    .map_err(|e| malformed(j, self.step, format!("its state: {e}"))),
                None => Ok(StageState {
                    steps: self.step,
                    tensors: Vec::new(),
                }),
            })
            .collect()
    }

    /// Loads checkpoint `c` into every stage, remote and kept, and moves
    /// the session to its step.
    pub fn load_checkpoint(&mut self, c: &Checkpoint) -> Result<(), DesignerError> {
        let states = self.layout.hop_states(c)?;
        // Stages without parameters start at the right step from their
        // init note; only stages with parameters are loaded.
        let loads: Vec<(usize, Vec<u8>)> = states
            .iter()
            .enumerate()
            .filter(|(j, _)| self.layout.has_params(*j))
            .map(|(j, s)| (j, encode_state(s)))
            .collect();
        self.ex.upload(&loads, self.step)?;
        // The designer knows what it loaded: the first step after the load
        // (and a fetch before it) must name these states.
        for (j, bytes) in &loads {
            self.audits.know(*j, c.step, state_digest(bytes));
        }
        if let Some(first) = self.kept.first.as_mut() {
            first.load_state(&c.stages[0])?;
        }
        if let Some(last) = self.kept.last.as_mut() {
            last.load_state(&c.stages[c.stages.len() - 1])?;
        }
        self.step = c.step;
        Ok(())
    }

    /// Fetches the current step's checkpoint and hands it to `saver`.
    /// `losses` are this call's losses since the epoch's resumed prefix.
    pub fn checkpoint(&mut self, saver: &mut Saver, losses: &[f32]) -> Result<(), DesignerError> {
        let started = Instant::now();
        // At step 0 every stage is what its seed builds: the designer
        // builds the checkpoint itself (a hop built otherwise is caught by
        // the state chain of its first step).
        let remote = if self.step == 0 {
            self.initial_states()
        } else {
            self.fetch_states()?
        };
        let mut stages = Vec::with_capacity(self.layout.stage_count());
        if let Some(first) = &self.kept.first {
            stages.push(first.state());
        }
        stages.extend(
            remote
                .into_iter()
                .zip(&self.layout.hops)
                .filter(|(_, h)| h.index.is_some())
                .map(|(s, _)| s),
        );
        if let Some(last) = &self.kept.last {
            stages.push(last.state());
        }
        let c = saver.policy.make(self.step, stages, losses, &self.cfg);
        saver.save(c, started)
    }

    /// Every stage's parameters in model order, the remote ones from
    /// `states` ([`Session::fetch_states`]).
    pub fn params(&self, states: Vec<StageState>) -> Vec<StageParams> {
        let mut out = Vec::new();
        if let Some(first) = &self.kept.first {
            out.push(first.params());
        }
        for (s, h) in states.into_iter().zip(&self.layout.hops) {
            if h.index.is_some() {
                out.push(params_only(s.tensors));
            }
        }
        if let Some(last) = &self.kept.last {
            out.push(last.params());
        }
        out
    }

    /// An error of the session as its caller sees it: a misbehaviour found
    /// is logged, recorded in the audit stats, and given the suspects'
    /// addresses.
    fn found(&mut self, e: DesignerError) -> DesignerError {
        let DesignerError::Misbehaved(m) = e else {
            return e;
        };
        if !m.addrs.is_empty() {
            // Found and recorded already (by a call within this one).
            return DesignerError::Misbehaved(m);
        }
        let addrs: Vec<std::net::SocketAddr> = self.hops.iter().map(|h| h.addr).collect();
        let m = m.at(&addrs);
        let suspects: Vec<String> = m
            .addrs
            .iter()
            .map(|a| mixnn_net::alias::peer(a).to_string())
            .collect();
        tracing::warn!(culprit = %m.culprit, ?suspects, step = m.step, kind = %m.kind, "{}", m.reason);
        self.audits.record(Some(m.clone()));
        DesignerError::Misbehaved(m)
    }

    /// Runs the audits waiting (no step in flight). `batches` are this
    /// epoch's, from step `base`.
    fn run_audits(&mut self, batches: &[Batch], base: u64) -> Result<(), DesignerError> {
        let queue = self.audits.take_queue();
        let mut steps: Vec<u64> = queue.iter().map(|q| q.0).collect();
        steps.sort_unstable();
        steps.dedup();
        for step in steps {
            let hops: Vec<usize> = queue.iter().filter(|q| q.0 == step).map(|q| q.1).collect();
            // The openings every audit of the step needs, fetched at once
            // (one round trip for all of them); after a bad reply each
            // audit fetches its own, so a failure is pinned to its hop.
            let asks = self.asks(step, &hops);
            let pre: Option<HashMap<usize, Option<Opening>>> =
                match self.fetch_openings(&asks, step) {
                    Ok(all) => Some(asks.into_iter().zip(all).collect()),
                    Err(e) if route_fault(&e) => None,
                    Err(e) => return Err(e),
                };
            self.audit_step(step, &hops, batches, base, pre.as_ref())?;
        }
        Ok(())
    }

    /// Every hop whose opening the audits of `step` at `hops` ask for,
    /// once each.
    fn asks(&self, step: u64, hops: &[usize]) -> Vec<usize> {
        let mut asks: Vec<usize> = hops
            .iter()
            .flat_map(|&j| AuditCase::new(j, step, &self.layout).asks().to_vec())
            .collect();
        asks.sort_unstable();
        asks.dedup();
        asks
    }

    /// Starts fetching the openings of `step`, the oldest with audits
    /// waiting, while later steps run.
    fn start_prefetch(&mut self, step: u64) -> Result<Prefetch, DesignerError> {
        let asks = self.asks(step, &self.audits.queued_at(step));
        let max: Vec<usize> = asks.iter().map(|&k| self.opening_bound(k)).collect();
        let transfer = self
            .ex
            .start_transfer(&asks, &max, Fetch::Opening { step })?;
        Ok(Prefetch { step, transfer })
    }

    /// Waits for the rest of `prefetch` (no step in flight) and runs its
    /// audits; after a bad reply its audits stay queued for
    /// [`Session::run_audits`].
    fn finish_prefetch(
        &mut self,
        prefetch: &mut Option<Prefetch>,
        batches: &[Batch],
        base: u64,
        step: u64,
    ) -> Result<(), DesignerError> {
        let Some(mut p) = prefetch.take() else {
            return Ok(());
        };
        while !p.transfer.complete() {
            let (got, body) = self.ex.wait(Expected::Opening, step)?;
            match self.ex.on_transfer_reply(&mut p.transfer, got, &body) {
                Ok(()) => {}
                Err(e) if route_fault(&e) => {
                    self.ex.forget(|a| p.transfer.what().answered_by(a));
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
        self.audit_prefetched(p, batches, base, false)
    }

    /// Runs the audits of a prefetched step with its openings (which came
    /// while later steps ran: `in_flight`).
    fn audit_prefetched(
        &mut self,
        p: Prefetch,
        batches: &[Batch],
        base: u64,
        in_flight: bool,
    ) -> Result<(), DesignerError> {
        let hops = self.audits.take_step(p.step);
        let asks = p.transfer.hops().to_vec();
        let pre: HashMap<usize, Option<Opening>> = asks
            .into_iter()
            .zip(p.transfer.into_bytes().iter().map(|b| decode_opening(b)))
            .collect();
        self.audit_step(p.step, &hops, batches, base, Some(&pre))?;
        if in_flight {
            self.audits.ran_in_flight(hops.len());
        }
        Ok(())
    }

    /// Runs the audits of `step` at `hops`, with the openings in `pre`
    /// (fetching any other); the first failure ends them.
    fn audit_step(
        &mut self,
        step: u64,
        hops: &[usize],
        batches: &[Batch],
        base: u64,
        pre: Option<&HashMap<usize, Option<Opening>>>,
    ) -> Result<(), DesignerError> {
        let batch = step
            .checked_sub(base)
            .and_then(|i| batches.get(i as usize))
            .ok_or(BadReply::Step { step })?;
        for &j in hops {
            match self.audit(j, step, batch, pre)? {
                Verdict::Pass => self.audits.record(None),
                Verdict::Fail(m) => return Err(DesignerError::Misbehaved(m)),
            }
        }
        Ok(())
    }

    /// Audits hop `j` for `step` ([`AuditCase`]), with the openings in
    /// `pre` (fetched for all of the step's audits at once), fetching any
    /// other it asks for.
    fn audit(
        &mut self,
        j: usize,
        step: u64,
        batch: &Batch,
        pre: Option<&HashMap<usize, Option<Opening>>>,
    ) -> Result<Verdict, DesignerError> {
        let mut case = AuditCase::new(j, step, &self.layout);
        while let Some(k) = case.next() {
            let opening = match pre.and_then(|p| p.get(&k)) {
                Some(o) => o.clone(),
                None => self.fetch_opening(k, step)?,
            };
            let ctx = AuditContext {
                layout: &self.layout,
                optimizer: self.cfg.optimizer,
                seed: &self.cfg.seed,
                batch,
            };
            if let Some(v) = case.on_opening(&self.audits, &ctx, opening) {
                return Ok(v);
            }
        }
        Ok(Verdict::Pass)
    }

    /// The openings of `step` of every hop in `hops`, fetched at once;
    /// `None` for a hop that refused (an empty or malformed opening).
    fn fetch_openings(
        &mut self,
        hops: &[usize],
        step: u64,
    ) -> Result<Vec<Option<Opening>>, DesignerError> {
        let max: Vec<usize> = hops.iter().map(|&k| self.opening_bound(k)).collect();
        let all = self
            .ex
            .download(hops, &max, Fetch::Opening { step }, self.step)?;
        Ok(all.iter().map(|b| decode_opening(b)).collect())
    }

    /// The most bytes hop `k`'s opening can take: the state before, four
    /// tensors of at most one body each, and the fixed fields.
    fn opening_bound(&self, k: usize) -> usize {
        state_bound(&self.layout.hops[k].spec, &self.cfg.optimizer)
            + 4 * (4 + self.ex.policy().max_body())
            + 64
    }

    /// Hop `j`'s opening of `step`, in chunks; `None` if it refuses (an
    /// empty or malformed opening counts as a refusal).
    fn fetch_opening(&mut self, j: usize, step: u64) -> Result<Option<Opening>, DesignerError> {
        let max = self.opening_bound(j);
        let mut all = self
            .ex
            .download(&[j], &[max], Fetch::Opening { step }, self.step)?;
        Ok(decode_opening(&all.pop().unwrap_or_default()))
    }
}

/// The openings of one audited step, on their way while later steps run
/// ([`Session::train`]).
struct Prefetch {
    step: u64,
    transfer: Transfer,
}

/// The checkpoint policy and the audit queue, as the core asks them.
struct SessionGates<'a> {
    policy: &'a Checkpoints,
    audits: &'a Audits,
    window: usize,
}

impl Gates for SessionGates<'_> {
    fn checkpoint_wanted(&self, step: u64) -> bool {
        self.policy.wanted(step)
    }

    fn checkpoints_on(&self) -> bool {
        self.policy.enabled()
    }

    fn audit_due(&self, step: u64) -> bool {
        self.audits.due(step, self.window)
    }

    fn audits_queued(&self) -> bool {
        self.audits.queued()
    }

    fn oldest_audit(&self) -> Option<u64> {
        self.audits.oldest_queued()
    }
}

/// A misbehaviour of hop `hop` at `step`: what it delivered does not
/// parse.
fn malformed(hop: usize, step: u64, what: impl std::fmt::Display) -> DesignerError {
    DesignerError::Misbehaved(Misbehaviour::new(
        Culprit::Hop(hop),
        step,
        MisbehaviourKind::Malformed,
        what.to_string(),
    ))
}

/// Whether `e` is a transfer that did not open: changed by its hop or by
/// one that relayed it, so pinned on no hop.
fn route_fault(e: &DesignerError) -> bool {
    matches!(e, DesignerError::Misbehaved(m) if matches!(m.culprit, Culprit::Route { .. }))
}

/// An opening as a hop sent it; `None` for a refusal (empty, or not an
/// opening).
fn decode_opening(bytes: &[u8]) -> Option<Opening> {
    (!bytes.is_empty())
        .then(|| Opening::decode(bytes).ok())
        .flatten()
}
