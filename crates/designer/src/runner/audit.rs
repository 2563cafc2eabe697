//! Audits of Byzantine hops (paper §4.2, with the per-step verification
//! the paper leaves to future work).
//!
//! - **Commitments.** Every hop gets a fresh commitment key in its init
//!   note (sealed to it alone) and commits to each forward (input, output,
//!   digest of the state before) and backward (gradient in and out, digest
//!   of the state after). The commitments ride back in a fixed-size
//!   trailer of the forward and backward bodies ([`mixnn_proto::audit`]);
//!   the designer keeps them for every step since the oldest checkpoint it
//!   holds.
//! - **Audits.** After a step completes, the designer's secret RNG picks
//!   each hop with parameters with probability `audit_rate`; nothing on the
//!   wire depends on the draw until the audit is sent, after the step. The
//!   pipeline drains before the opening could leave the hop's window
//!   ([`mixnn_proto::audit::KEPT`] steps), and the designer asks the hop,
//!   through a loop prefix like a fetch, to open the step. It checks the
//!   opening against both commitments, then re-executes the stage from the
//!   opened state: output, input gradient and the digest of the state after
//!   the update must all match bit for bit. It also opens the step at the
//!   audited hop's neighbours that have parameters (checked the same way):
//!   what one says it sent must be what the other says it received, both
//!   ways; hop 0's input must be the designer's own batch.
//! - **Response.** A mismatch or a refusal ([`DesignerError::Audit`]) →
//!   with replacements, the hop is reported ("audit failed: …") and
//!   replaced (both hops of a boundary that disagrees: either may lie), and the run rolls back to the last kept checkpoint before
//!   the first bad step. That step is found by re-executing the whole model
//!   locally from the oldest checkpoint of the epoch the designer holds
//!   and comparing with each later one: the first that differs is after
//!   the first bad step. Without replacements the run stops.
//! - **Test-phase check** (the paper's): a test accuracy more than
//!   [`ACCURACY_DROP`] below the best so far marks the cascade suspect.
//!
//! Limits (see `SECURITY.md`): hops without parameters (dummies, softmax,
//! loss) are neither audited nor asked as neighbours, so that they never
//! learn the designer's address: what they do is covered only by the
//! test-phase check (and, next to an audited hop, not at all); a hop that
//! overwrites another hop's commitment in the trailer gets that hop blamed
//! when it is audited (the cascade changes, training is not corrupted);
//! two colluding neighbours can agree on a lie at their boundary.

use std::collections::BTreeMap;

use mixnn_model::spec::{ModelSpec, StageSpec};
use mixnn_model::stage::Stage;
use mixnn_model::tensor_bytes::TensorBytes;
use mixnn_model::trainer::{Batch, EpochMetrics};
use mixnn_proto::audit::{slots, split, state_digest, Commitment, Opening, TRAILER_LEN};
use mixnn_proto::{decode_state, encode_state, ChunkNote, ParamChunk, SessionNote};
use mixnn_wire::{Op, ReplyId};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

use super::{Await, CascadeRunner};
use crate::checkpoint::Checkpoint;
use crate::error::DesignerError;

/// A drop in test accuracy from the best epoch so far that marks the
/// cascade suspect.
pub const ACCURACY_DROP: f64 = 0.05;

/// One failed (or refused) audit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditFailure {
    /// The hop's position.
    pub hop: usize,
    /// Its address.
    pub addr: std::net::SocketAddr,
    /// The audited step.
    pub step: u64,
    /// What did not check out.
    pub reason: String,
}

/// What audits found so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuditStats {
    /// Steps whose commitments the designer received.
    pub committed_steps: u64,
    /// Audits run (passed or not).
    pub audits: u64,
    /// Audits passed.
    pub passed: u64,
    /// Failed or refused audits, in order.
    pub failures: Vec<AuditFailure>,
    /// The test-phase check found an accuracy drop (paper §4.2).
    pub suspect: bool,
    /// Test accuracy of each epoch seen by the check.
    pub accuracies: Vec<f64>,
}

/// Commitments of one step: forward and backward, one per hop.
struct Committed {
    fwd: Vec<Option<Commitment>>,
    bwd: Vec<Option<Commitment>>,
}

/// The designer's audit state.
pub(super) struct Audits {
    rate: f64,
    rng: ChaCha8Rng,
    model: ModelSpec,
    keys: Vec<[u8; 32]>,
    ledger: BTreeMap<u64, Committed>,
    queue: Vec<(u64, usize)>,
    stats: AuditStats,
}

impl Audits {
    pub(super) fn new(
        model: &ModelSpec,
        rate: f64,
        micro_batches: usize,
        seed: u64,
    ) -> Result<Self, DesignerError> {
        if !(0.0..=1.0).contains(&rate) {
            return Err(DesignerError::Config {
                message: format!("audit rate {rate} is not a probability"),
            });
        }
        if rate > 0.0 && micro_batches > 1 {
            return Err(DesignerError::Config {
                message: format!(
                    "audits need one micro-batch per step ({micro_batches} asked): set the audit rate to 0 or use one micro-batch"
                ),
            });
        }
        Ok(Audits {
            rate,
            rng: ChaCha8Rng::seed_from_u64(seed),
            model: model.clone(),
            keys: Vec::new(),
            ledger: BTreeMap::new(),
            queue: Vec::new(),
            stats: AuditStats::default(),
        })
    }

    /// Commitments (and audits) are on.
    pub(super) fn on(&self) -> bool {
        self.rate > 0.0
    }

    /// Fresh keys for a new session of `n` hops; commitments of the old
    /// session are dropped.
    pub(super) fn new_session(&mut self, n: usize, rng: &mut impl RngCore) {
        self.ledger.clear();
        self.queue.clear();
        self.keys = (0..n)
            .map(|_| {
                let mut k = [0u8; 32];
                rng.fill_bytes(&mut k);
                k
            })
            .collect();
    }

    /// Hop `k`'s key for its init note.
    pub(super) fn key(&self, k: usize) -> Option<[u8; 32]> {
        self.on().then(|| self.keys.get(k).copied()).flatten()
    }

    /// A forward/backward body with a fresh (random) trailer.
    pub(super) fn pad(&self, body: &[u8], rng: &mut impl RngCore) -> Vec<u8> {
        let mut out = body.to_vec();
        if self.on() {
            let mut t = vec![0u8; TRAILER_LEN];
            rng.fill_bytes(&mut t);
            out.extend_from_slice(&t);
        }
        out
    }

    /// Strips the trailer of a loss or done delivery and records the
    /// commitments it carries; returns the payload.
    pub(super) fn take(
        &mut self,
        kind: Await,
        body: Vec<u8>,
        n: usize,
    ) -> Result<Vec<u8>, DesignerError> {
        let (step, forward) = match kind {
            _ if !self.on() => return Ok(body),
            Await::Output(s, _) => (s, true),
            Await::Done(s, _) => (s, false),
            _ => return Ok(body),
        };
        let (payload, trailer) = split(&body)?;
        let cs = slots(trailer, n);
        let entry = self.ledger.entry(step).or_insert_with(|| Committed {
            fwd: vec![None; n],
            bwd: vec![None; n],
        });
        // The forward path visits hops 0..n, each pushing in front: the
        // delivery holds hop n-1's first. The backward visits n-1..0.
        for (i, c) in cs.into_iter().enumerate() {
            if forward {
                entry.fwd[n - 1 - i] = Some(c);
            } else {
                entry.bwd[i] = Some(c);
            }
        }
        Ok(payload.to_vec())
    }

    /// Step `step` completed: draws which hops to audit for it.
    pub(super) fn step_done(&mut self, step: u64, remote: &[(Option<usize>, StageSpec)]) {
        if !self.on() {
            return;
        }
        self.stats.committed_steps += 1;
        // Only steps still in the hops' windows can be audited.
        let horizon = step.saturating_sub(4 * mixnn_proto::audit::KEPT as u64);
        self.ledger.retain(|s, _| *s >= horizon);
        for (j, (_, spec)) in remote.iter().enumerate() {
            // One draw per hop and step whatever the hop, so the draws do
            // not depend on the cascade's make-up.
            let draw = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            if draw < self.rate && spec.has_params() {
                self.queue.push((step, j));
            }
        }
    }

    /// Audits are waiting.
    pub(super) fn queued(&self) -> bool {
        !self.queue.is_empty()
    }

    /// Whether to drain the pipeline before sending `step`: the oldest
    /// audit waiting must run while its hops still hold the opening.
    pub(super) fn due(&self, step: u64, window: usize) -> bool {
        let Some(oldest) = self.queue.iter().map(|q| q.0).min() else {
            return false;
        };
        let slack = mixnn_proto::audit::KEPT.saturating_sub(window).max(1) as u64;
        step >= oldest + slack
    }

    /// Checks the test accuracies of the epochs done (paper §4.2).
    pub(super) fn check_epochs(&mut self, done: &[EpochMetrics]) {
        for m in done.iter().skip(self.stats.accuracies.len()) {
            let best = self
                .stats
                .accuracies
                .iter()
                .copied()
                .fold(f64::NAN, f64::max);
            if best.is_finite() && m.test_acc < best - ACCURACY_DROP {
                tracing::warn!(
                    epoch = m.epoch,
                    accuracy = m.test_acc,
                    best,
                    "cascade suspect: test accuracy dropped"
                );
                self.stats.suspect = true;
            }
            self.stats.accuracies.push(m.test_acc);
        }
    }
}

impl CascadeRunner {
    /// Seeds the designer's audit draws (tests; by default they come from
    /// the OS, so no node can predict them).
    pub fn with_audit_seed(mut self, seed: u64) -> Self {
        self.audit.rng = ChaCha8Rng::seed_from_u64(seed);
        self
    }

    /// What audits found so far.
    pub fn audit_stats(&self) -> &AuditStats {
        &self.audit.stats
    }

    /// Feeds a test accuracy to the test-phase check (for the last epoch,
    /// which no later epoch start reports); returns whether the cascade is
    /// suspect.
    pub fn check_accuracy(&mut self, epoch: u32, test_acc: f64) -> bool {
        let seen = self.audit.stats.accuracies.len();
        let mut done: Vec<EpochMetrics> = (0..seen)
            .map(|_| EpochMetrics {
                epoch: 0,
                train_s: 0.0,
                loss: 0.0,
                test_acc: 0.0,
            })
            .collect();
        done.push(EpochMetrics {
            epoch,
            train_s: 0.0,
            loss: 0.0,
            test_acc,
        });
        self.audit.check_epochs(&done);
        self.audit.stats.suspect
    }

    /// Runs the audits waiting (no step in flight). `batches` are this
    /// epoch's, from step `base`.
    pub(super) fn run_audits(&mut self, batches: &[Batch], base: u64) -> Result<(), DesignerError> {
        let queue = std::mem::take(&mut self.audit.queue);
        for (step, j) in queue {
            let batch = step
                .checked_sub(base)
                .and_then(|i| batches.get(i as usize))
                .ok_or_else(|| DesignerError::Reply(format!("an audit of step {step}")))?;
            let outcome = self.audit_one(j, step, batch)?;
            self.audit.stats.audits += 1;
            match outcome {
                None => self.audit.stats.passed += 1,
                Some((hop, reason, also)) => {
                    let addr = self.hops[hop].addr;
                    tracing::warn!(hop, %addr, step, "audit failed: {reason}");
                    self.audit.stats.failures.push(AuditFailure {
                        hop,
                        addr,
                        step,
                        reason: reason.clone(),
                    });
                    return Err(DesignerError::Audit {
                        hop,
                        addr,
                        step,
                        reason,
                        also,
                    });
                }
            }
        }
        Ok(())
    }

    /// Audits hop `j` for `step`: its opening, then the openings of its
    /// neighbours with parameters, which must agree with it at the
    /// boundaries (what one sent is what the other received). `None` if
    /// all checks out, else the hop to blame, why, and another one to
    /// replace with it (the two sides of a boundary that disagrees: either
    /// may have lied).
    #[allow(clippy::type_complexity)]
    fn audit_one(
        &mut self,
        j: usize,
        step: u64,
        batch: &Batch,
    ) -> Result<Option<(usize, String, Option<usize>)>, DesignerError> {
        let Some(o) = self.fetch_opening(j, step)? else {
            return Ok(Some((j, format!("hop refused to open step {step}"), None)));
        };
        if let Err(r) = self.verify(j, step, &o, batch) {
            return Ok(Some((j, r, None)));
        }
        if j == 0 && self.local_first.is_none() {
            let x = TensorBytes::encode_pixels(&[batch.rows, self.input_features], &batch.pixels);
            if o.x != x {
                return Ok(Some((
                    j,
                    "forward input is not what the designer sent".into(),
                    None,
                )));
            }
        }
        let n = self.hops.len();
        for k in [j.checked_sub(1), (j + 1 < n).then_some(j + 1)]
            .into_iter()
            .flatten()
        {
            // Hops without parameters never answer the designer.
            if !self.remote[k].1.has_params() {
                continue;
            }
            let Some(p) = self.fetch_opening(k, step)? else {
                return Ok(Some((k, format!("hop refused to open step {step}"), None)));
            };
            if let Err(r) = self.verify(k, step, &p, batch) {
                return Ok(Some((k, r, None)));
            }
            // `a` sends the activation to `b`, `b` the gradient to `a`.
            let ((a, oa), (b, ob)) = if k < j {
                ((k, &p), (j, &o))
            } else {
                ((j, &o), (k, &p))
            };
            if oa.y != ob.x || oa.g_in != ob.g_out {
                return Ok(Some((
                    a,
                    format!("hop {a} and hop {b} disagree on what passed between them"),
                    Some(b),
                )));
            }
        }
        Ok(None)
    }

    fn send_audit_request(&mut self, j: usize, step: u64, chunk: u32) -> Result<(), DesignerError> {
        let rid = ReplyId::random(&mut self.rng);
        let mut blocks = Vec::with_capacity(j + 1);
        let mut notes = Vec::with_capacity(j + 1);
        for k in 0..=j {
            let o = if k == j { Op::Audit } else { Op::Loop };
            blocks.push(self.block(o, k, j, rid, false));
            let note = if k == j {
                SessionNote::Audit(ChunkNote { step, chunk })
            } else {
                SessionNote::Loop { step }
            };
            notes.push(note.encode());
        }
        let path: Vec<usize> = (0..=j).collect();
        let cells = self.seal(&path, &blocks, &notes, &[])?;
        self.pending.insert(rid.0, Await::Opening(j, chunk));
        self.send_first(&cells)
    }

    /// Hop `j`'s opening of `step`, in chunks; `None` if it refuses.
    fn fetch_opening(&mut self, j: usize, step: u64) -> Result<Option<Opening>, DesignerError> {
        self.send_audit_request(j, step, 0)?;
        let mut parts: Vec<Option<Vec<u8>>> = Vec::new();
        let mut total = None;
        loop {
            let (kind, body) = self.wait(Await::Opening(j, 0), self.step)?;
            let Await::Opening(_, chunk) = kind else {
                return Err(DesignerError::Reply(format!("an unexpected {kind:?}")));
            };
            let c = ParamChunk::decode(&body)?;
            if total.is_none() {
                if c.total == 0 {
                    return Ok(None);
                }
                let chunks = (c.total as usize).div_ceil(self.chunk_room_audit()).max(1);
                parts = vec![None; chunks];
                total = Some(c.total as usize);
                for k in 1..chunks {
                    self.send_audit_request(j, step, k as u32)?;
                }
            }
            let slot = parts
                .get_mut(chunk as usize)
                .ok_or_else(|| DesignerError::Reply(format!("opening chunk {chunk}")))?;
            *slot = Some(c.bytes);
            if parts.iter().all(Option::is_some) {
                break;
            }
        }
        let all: Vec<u8> = parts.into_iter().flatten().flatten().collect();
        if Some(all.len()) != total {
            return Ok(None);
        }
        Ok(Opening::decode(&all).ok())
    }

    fn chunk_room_audit(&self) -> usize {
        self.policy.max_body().saturating_sub(4).max(1)
    }

    /// Checks hop `j`'s opening of `step` against its commitments and a
    /// re-execution of its stage.
    fn verify(&self, j: usize, step: u64, o: &Opening, batch: &Batch) -> Result<(), String> {
        let c = self
            .audit
            .ledger
            .get(&step)
            .ok_or_else(|| format!("no commitments kept for step {step}"))?;
        let (Some(fwd), Some(bwd)) = (c.fwd[j], c.bwd[j]) else {
            return Err("a commitment is missing".into());
        };
        if o.step != step {
            return Err(format!("an opening of step {} for step {step}", o.step));
        }
        let key = self.audit.keys.get(j).ok_or("no key")?;
        o.check(key, &fwd, &bwd)?;
        // Re-execution from the opened state.
        let spec = &self.remote[j].1;
        let before = decode_state(&o.before).map_err(|e| format!("opened state: {e}"))?;
        if before.steps != step {
            return Err(format!(
                "a state at step {} opened for step {step}",
                before.steps
            ));
        }
        let mut stage = Stage::new(spec, 0, self.cfg.sgd);
        stage
            .load_state(&before)
            .map_err(|e| format!("opened state: {e}"))?;
        let labels = spec.is_loss().then_some(batch.labels.as_slice());
        let (y, cache) = stage
            .forward_micro_bytes(&o.x, labels, batch.rows)
            .map_err(|e| format!("opened input: {e}"))?;
        if y != o.y {
            return Err("forward output differs from the re-execution".into());
        }
        let need = j > 0 || self.local_first.is_some();
        let g = (!o.g_in.is_empty()).then_some(o.g_in.as_slice());
        let dx = stage
            .backward_micro_bytes(cache, g, need, 0)
            .map_err(|e| format!("opened gradient: {e}"))?
            .unwrap_or_default();
        if dx != o.g_out {
            return Err("input gradient differs from the re-execution".into());
        }
        stage.apply();
        if state_digest(&encode_state(&stage.state())) != o.after {
            return Err("state after the update differs from the re-execution".into());
        }
        Ok(())
    }

    /// Recovers from a failed audit: replaces the hop and rolls back to
    /// the last checkpoint before the first bad step. `batches` are this
    /// epoch's, from step `base`.
    pub(super) fn recover_audit(
        &mut self,
        cause: DesignerError,
        batches: &[Batch],
        base: u64,
    ) -> Result<u64, DesignerError> {
        let DesignerError::Audit {
            hop,
            step,
            reason,
            also,
            ..
        } = &cause
        else {
            return self.recover(cause);
        };
        if !self.recovery.can_replace() {
            return Err(cause);
        }
        let (step, reason) = (*step, format!("audit failed: {reason}"));
        let bad: Vec<usize> = std::iter::once(*hop).chain(*also).collect();
        let c = self.rollback_point(step, batches, base)?;
        tracing::warn!(?bad, step, back_to = c.step, "{reason}; replacing");
        self.replace_and_rebuild(&bad, step, &reason, &c)?;
        Ok(c.step)
    }

    /// The last kept checkpoint of this epoch that the whole model,
    /// re-executed locally from the oldest one, reproduces, at or before
    /// `bad` (whose update is known bad).
    fn rollback_point(
        &self,
        bad: u64,
        batches: &[Batch],
        base: u64,
    ) -> Result<Checkpoint, DesignerError> {
        let candidates: Vec<&Checkpoint> = self
            .recovery
            .kept()
            .iter()
            .filter(|c| c.step >= base && c.step <= bad)
            .collect();
        let Some(first) = candidates.first() else {
            return Err(DesignerError::Recovery(format!(
                "no checkpoint of this epoch at or before the bad step {bad}"
            )));
        };
        let model = &self.audit.model;
        let mut stages: Vec<Stage> = Vec::with_capacity(model.stages.len());
        for (spec, state) in model.stages.iter().zip(&first.stages) {
            let mut s = Stage::new(spec, 0, self.cfg.sgd);
            s.load_state(state)?;
            stages.push(s);
        }
        let mut good = *first;
        let mut step = first.step;
        for c in candidates.iter().skip(1) {
            while step < c.step {
                let batch = batches
                    .get((step - base) as usize)
                    .ok_or_else(|| DesignerError::Recovery(format!("no batch for step {step}")))?;
                local_step(&mut stages, batch, model.input)?;
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
}

/// One training step of the whole model on tensor messages, as the
/// cascade computes it.
fn local_step(stages: &mut [Stage], batch: &Batch, input: usize) -> Result<(), DesignerError> {
    let mut x = TensorBytes::encode_pixels(&[batch.rows, input], &batch.pixels);
    let mut caches = Vec::with_capacity(stages.len());
    for s in stages.iter() {
        let labels = s.spec().is_loss().then_some(batch.labels.as_slice());
        let (y, c) = s.forward_micro_bytes(&x, labels, batch.rows)?;
        caches.push(c);
        x = y;
    }
    let mut g: Option<Vec<u8>> = None;
    for (i, (s, c)) in stages.iter_mut().zip(caches).enumerate().rev() {
        g = s.backward_micro_bytes(c, g.as_deref(), i > 0, 0)?;
    }
    for s in stages.iter_mut() {
        s.apply();
    }
    Ok(())
}
