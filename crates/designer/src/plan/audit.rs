//! Audits of Byzantine hops (paper §4.2, with the per-step verification
//! the paper leaves to future work).
//!
//! - **Commitments.** Every hop gets a fresh commitment key in its init
//!   note (sealed to it alone) and commits to each forward (input, output,
//!   digest of the state before) and backward (gradient in and out, digest
//!   of the state after). The slots (digest, commitment, keyed tag) ride
//!   back in onion layers of a fixed-size trailer of the forward and
//!   backward bodies ([`mixnn_proto::trailer`]); [`Audits::take`] peels
//!   them and keeps them for every step in the hops' windows.
//! - **Checked at every delivery, for every hop, without an audit:** each
//!   slot's tag (a slot that does not verify was spoiled by its writer or
//!   the next hop on the path: both are blamed), and the chain of state
//!   digests: the state a hop's forward of step s ran on must be the state
//!   its backward of s − 1 left (a [`Misbehaviour`] of kind [`MisbehaviourKind::Chain`]).
//! - **Draws.** After a step completes, the designer's secret RNG picks
//!   each hop with parameters with probability `audit_rate`
//!   ([`Audits::step_done`]); nothing on the wire depends on the draw until
//!   the audit is sent, after the step. The openings of the oldest audited
//!   step are asked for at once, while later steps run (the session's
//!   prefetch: the pipeline does not stop for them); only audits the
//!   prefetch did not take (after a bad reply, or a backlog) make the
//!   pipeline drain before an opening could leave the hop's window
//!   ([`mixnn_proto::audit::KEPT`] steps; [`Audits::due`]).
//! - **One audit** ([`crate::plan::opening::AuditCase`]): the designer asks the hop, through a
//!   route out and back like a fetch, to open the step, checks the opening against
//!   both commitments and re-executes the stage from the opened state
//!   ([`crate::plan::opening::verify`]): output, input gradient and the digest of the state after
//!   the update must all match bit for bit. It then opens the step at the
//!   audited hop's two neighbours, of any kind (checked the same way):
//!   what one says it sent must be what the other says it received, both
//!   ways; hop 0's input must be the designer's own batch.
//! - **Response** (in the runner): a failed audit is
//!   [`crate::DesignerError::Misbehaved`]; with
//!   replacements the hop is reported and replaced (both hops of a boundary
//!   that disagrees: either may lie), and the run rolls back to the last
//!   kept checkpoint before the first bad step
//!   ([`crate::plan::recovery::rollback_point`]). Without replacements the
//!   run stops.
//! - **Test-phase check** (the paper's): a test accuracy more than
//!   [`ACCURACY_DROP`] below the best so far marks the cascade suspect.
//!
//! Limits (see `SECURITY.md`): every hop is drawn and opened, with
//! parameters or not (their answers come back through the first hop, so
//! no middle hop learns the designer's address); two colluding neighbours
//! can still agree on a lie at their shared boundary, which then surfaces
//! only where it meets an honest hop's re-execution.

use std::collections::BTreeMap;

use mixnn_model::trainer::EpochMetrics;
use mixnn_proto::audit::{split, Commitment, KEPT, TRAILER_LEN};
use mixnn_proto::trailer::{
    open as open_trailer, Direction as TrailerDirection, Slot, SlotContext, TrailerKeys,
};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

use crate::error::DesignerError;
use crate::misbehaviour::{Culprit, Misbehaviour, MisbehaviourKind};
use crate::options::AuditRate;
use crate::plan::layout::Layout;
use crate::plan::pending::Await;

/// A drop in test accuracy from the best epoch so far that marks the
/// cascade suspect.
pub const ACCURACY_DROP: f64 = 0.05;

/// What audits found so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuditStats {
    /// Steps whose commitments the designer received.
    pub committed_steps: u64,
    /// Audits run (passed or not).
    pub audits: u64,
    /// Audits passed.
    pub passed: u64,
    /// Audits whose openings came while later steps ran (the pipeline
    /// did not stop for them).
    pub in_flight: u64,
    /// Misbehaviours found (failed or refused audits, broken chains,
    /// false states, boundaries, trailers, malformed answers), in order.
    pub failures: Vec<Misbehaviour>,
    /// The test-phase check found an accuracy drop (paper §4.2).
    pub suspect: bool,
    /// Test accuracy of each epoch seen by the check.
    pub accuracies: Vec<f64>,
}

/// Which pass of a step a commitment is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Input, output, state before.
    Forward,
    /// Gradients in and out, state after.
    Backward,
}

/// Slots of one step: forward and backward, one per hop.
#[derive(Debug, Clone)]
struct Committed {
    fwd: Vec<Option<Slot>>,
    bwd: Vec<Option<Slot>>,
}

/// The designer's audit state: keys, commitments, draws, the queue of
/// audits to run, and what they found.
#[derive(Debug)]
pub struct Audits {
    rate: Option<AuditRate>,
    rng: ChaCha8Rng,
    keys: Vec<[u8; 32]>,
    trailer_keys: Vec<TrailerKeys>,
    ledger: BTreeMap<u64, Committed>,
    queue: Vec<(u64, usize)>,
    stats: AuditStats,
}

impl Audits {
    /// Audits at `rate` (none if `None`), drawn from `seed`; refused with
    /// more than one micro-batch per step.
    pub fn new(
        rate: Option<AuditRate>,
        micro_batches: usize,
        seed: u64,
    ) -> Result<Self, DesignerError> {
        if rate.is_some() && micro_batches > 1 {
            return Err(DesignerError::Config {
                message: format!(
                    "audits need one micro-batch per step ({micro_batches} asked): set the audit rate to 0 or use one micro-batch"
                ),
            });
        }
        Ok(Audits {
            rate,
            rng: ChaCha8Rng::seed_from_u64(seed),
            keys: Vec::new(),
            trailer_keys: Vec::new(),
            ledger: BTreeMap::new(),
            queue: Vec::new(),
            stats: AuditStats::default(),
        })
    }

    /// Refuses a window of `window` steps in flight if audits are on and
    /// it is as wide as the hops' audit window: a hop keeps the openings
    /// of its last [`KEPT`] steps, and with that many steps sent after a
    /// step it could drop the step's opening before the designer's
    /// request came, and an honest hop would fail its audit.
    pub fn check_window(&self, window: usize) -> Result<(), DesignerError> {
        if self.on() && window >= KEPT {
            return Err(DesignerError::Config {
                message: format!(
                    "a window of {window} steps in flight is too wide for audits: hops keep the openings of their last {KEPT} steps; use a window of at most {} or set the audit rate to 0",
                    KEPT - 1
                ),
            });
        }
        Ok(())
    }

    /// Commitments (and audits) are on.
    pub fn on(&self) -> bool {
        self.rate.is_some()
    }

    /// What audits found so far.
    pub fn stats(&self) -> &AuditStats {
        &self.stats
    }

    /// Fresh keys for a new session of `n` hops; commitments and audits
    /// waiting of the old session are dropped.
    pub fn new_session(&mut self, n: usize, rng: &mut impl RngCore) {
        self.ledger.clear();
        self.queue.clear();
        self.keys = (0..n)
            .map(|_| {
                let mut k = [0u8; 32];
                rng.fill_bytes(&mut k);
                k
            })
            .collect();
        self.trailer_keys = self.keys.iter().map(TrailerKeys::new).collect();
    }

    /// Hop `k`'s key for its init note.
    pub fn key(&self, k: usize) -> Option<[u8; 32]> {
        self.on().then(|| self.keys.get(k).copied()).flatten()
    }

    /// A forward/backward body with a fresh (random) trailer.
    pub fn pad(&self, body: &[u8], rng: &mut impl RngCore) -> Vec<u8> {
        let mut out = body.to_vec();
        if self.on() {
            let mut t = vec![0u8; TRAILER_LEN];
            rng.fill_bytes(&mut t);
            out.extend_from_slice(&t);
        }
        out
    }

    /// Strips the trailer of a loss or done delivery (`kind`) of a cascade
    /// of `n` hops, peels its layers and records the slots it carries;
    /// returns the payload and, if the trailer shows one, the hop to blame
    /// (a [`Misbehaviour`] of kind [`MisbehaviourKind::Chain`]): slots that do not verify, or state digests that do
    /// not chain. Other replies pass unchanged.
    pub fn take(
        &mut self,
        kind: Await,
        body: Vec<u8>,
        n: usize,
    ) -> Result<(Vec<u8>, Option<Misbehaviour>), DesignerError> {
        let (step, direction, micro) = match kind {
            _ if !self.on() => return Ok((body, None)),
            Await::Output { step, micro } => (step, TrailerDirection::Forward, micro),
            Await::Done { step, micro } => (step, TrailerDirection::Backward, micro),
            _ => return Ok((body, None)),
        };
        let (payload, trailer) = split(&body)?;
        // The forward visits hops 0..n, the backward n-1..0.
        let order: Vec<usize> = match direction {
            TrailerDirection::Forward => (0..n).collect(),
            TrailerDirection::Backward => (0..n).rev().collect(),
        };
        let visited: Vec<&TrailerKeys> = order
            .iter()
            .map(|&h| self.trailer_keys.get(h))
            .collect::<Option<_>>()
            .ok_or(DesignerError::Config {
                message: "no trailer keys for this cascade".into(),
            })?;
        let ctx = SlotContext {
            step,
            direction,
            micro,
        };
        let slots = open_trailer(&visited, &ctx, trailer)?;
        let entry = self.ledger.entry(step).or_insert_with(|| Committed {
            fwd: vec![None; n],
            bwd: vec![None; n],
        });
        // A hop that garbles the trailer it received spoils the slots of
        // every hop before it on the path, and only those: its own slot
        // and the later ones still verify. So the last spoiled slot on the
        // path is its writer's or the next hop's doing; both are blamed.
        if let Some(last_bad) = slots.iter().rposition(Result::is_err) {
            let hop = order[last_bad];
            let culprit = match order.get(last_bad + 1) {
                Some(&next) => Culprit::Pair(hop, next),
                None => Culprit::Hop(hop),
            };
            return Ok((
                payload.to_vec(),
                Some(Misbehaviour::new(
                    culprit,
                    step,
                    MisbehaviourKind::Trailer,
                    format!(
                        "hop {hop}'s slot in the {} trailer of step {step} does not verify (damaged by it or by the next hop on the path)",
                        if direction == TrailerDirection::Forward { "forward" } else { "backward" }
                    ),
                )),
            ));
        }
        for (&hop, slot) in order.iter().zip(slots.into_iter().flatten()) {
            match direction {
                TrailerDirection::Forward => entry.fwd[hop] = Some(slot),
                TrailerDirection::Backward => entry.bwd[hop] = Some(slot),
            }
        }
        Ok((payload.to_vec(), self.chain_break(step, n)))
    }

    /// The first hop whose state changed between the backward of `step − 1`
    /// and the forward of `step` (or of `step` and `step + 1`), as far as
    /// both slots are in.
    fn chain_break(&self, step: u64, n: usize) -> Option<Misbehaviour> {
        let pairs = [
            step.checked_sub(1).map(|p| (p, step)),
            Some((step, step + 1)),
        ];
        for (prev, next) in pairs.into_iter().flatten() {
            let (Some(a), Some(b)) = (self.ledger.get(&prev), self.ledger.get(&next)) else {
                continue;
            };
            for hop in 0..n {
                if let (Some(Some(after)), Some(Some(before))) = (a.bwd.get(hop), b.fwd.get(hop)) {
                    if after.digest != before.digest {
                        return Some(Misbehaviour::new(
                            Culprit::Hop(hop),
                            next,
                            MisbehaviourKind::Chain,
                            format!(
                                "the state its step {next} ran on is not the state its step {prev} left (committed digests do not chain)"
                            ),
                        ));
                    }
                }
            }
        }
        None
    }

    /// Step `step` completed: draws which hops of `layout` to audit for it.
    pub fn step_done(&mut self, step: u64, layout: &Layout) {
        let Some(rate) = self.rate else {
            return;
        };
        self.stats.committed_steps += 1;
        // Only steps still in the hops' windows can be audited.
        let horizon = step.saturating_sub(4 * KEPT as u64);
        self.ledger.retain(|s, _| *s >= horizon);
        for j in 0..layout.len() {
            // One draw per hop and step whatever the hop, so the draws do
            // not depend on the cascade's make-up.
            let draw = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            // Every hop, with parameters or not: all of them commit, and
            // any of them can lie about what passed through it.
            if draw < rate.probability() {
                self.queue.push((step, j));
            }
        }
    }

    /// Audits are waiting.
    pub fn queued(&self) -> bool {
        !self.queue.is_empty()
    }

    /// The oldest step with audits waiting.
    pub fn oldest_queued(&self) -> Option<u64> {
        self.queue.iter().map(|q| q.0).min()
    }

    /// The hops whose audits of `step` wait, in the order drawn.
    pub fn queued_at(&self, step: u64) -> Vec<usize> {
        self.queue
            .iter()
            .filter(|q| q.0 == step)
            .map(|q| q.1)
            .collect()
    }

    /// The hops whose audits of `step` wait, in the order drawn; they
    /// leave the queue.
    pub fn take_step(&mut self, step: u64) -> Vec<usize> {
        let (of_step, rest): (Vec<_>, Vec<_>) = self.queue.iter().partition(|q| q.0 == step);
        self.queue = rest;
        of_step.into_iter().map(|q| q.1).collect()
    }

    /// The audits waiting (step, hop), in the order drawn; the queue is
    /// emptied.
    pub fn take_queue(&mut self) -> Vec<(u64, usize)> {
        std::mem::take(&mut self.queue)
    }

    /// Whether to drain the pipeline before sending `step`: the oldest
    /// audit waiting must run while its hops still hold the opening.
    pub fn due(&self, step: u64, window: usize) -> bool {
        let Some(oldest) = self.queue.iter().map(|q| q.0).min() else {
            return false;
        };
        let slack = KEPT.saturating_sub(window).max(1) as u64;
        step >= oldest + slack
    }

    /// Records an audit's verdict.
    pub fn record(&mut self, failure: Option<Misbehaviour>) {
        self.stats.audits += 1;
        match failure {
            None => self.stats.passed += 1,
            Some(f) => self.stats.failures.push(f),
        }
    }

    /// `n` audits just recorded had their openings fetched while later
    /// steps ran.
    pub fn ran_in_flight(&mut self, n: usize) {
        self.stats.in_flight += n as u64;
    }

    /// Checks the test accuracies of the epochs done (paper §4.2).
    pub fn check_epochs(&mut self, done: &[EpochMetrics]) {
        for m in done.iter().skip(self.stats.accuracies.len()) {
            self.check_accuracy(m.epoch, m.test_acc);
        }
    }

    /// Feeds one epoch's test accuracy to the test-phase check; returns
    /// whether the cascade is suspect.
    pub fn check_accuracy(&mut self, epoch: u32, test_acc: f64) -> bool {
        let best = self
            .stats
            .accuracies
            .iter()
            .copied()
            .fold(f64::NAN, f64::max);
        if best.is_finite() && test_acc < best - ACCURACY_DROP {
            tracing::warn!(
                epoch,
                accuracy = test_acc,
                best,
                "cascade suspect: test accuracy dropped"
            );
            self.stats.suspect = true;
        }
        self.stats.accuracies.push(test_acc);
        self.stats.suspect
    }

    /// The digest of the state hop `j` committed to leaving after `step`,
    /// if its slot is still kept.
    pub fn committed_after(&self, j: usize, step: u64) -> Option<[u8; 32]> {
        self.ledger
            .get(&step)
            .and_then(|c| c.bwd.get(j).copied().flatten())
            .map(|slot| slot.digest)
    }

    /// The commitments and key to check hop `j`'s opening of `step` with.
    pub fn evidence(
        &self,
        j: usize,
        step: u64,
    ) -> Result<(Commitment, Commitment, [u8; 32]), String> {
        let c = self
            .ledger
            .get(&step)
            .ok_or_else(|| format!("no commitments kept for step {step}"))?;
        let (Some(fwd), Some(bwd)) = (
            c.fwd.get(j).copied().flatten(),
            c.bwd.get(j).copied().flatten(),
        ) else {
            return Err("a commitment is missing".into());
        };
        let key = self.keys.get(j).ok_or("no key")?;
        Ok((fwd.commitment, bwd.commitment, *key))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use mixnn_model::spec::ModelSpec;

    use super::*;
    use crate::options::Keep;

    fn layout() -> Layout {
        let model = ModelSpec::parse(
            "input = 4\n[[stage]]\nops = [{ op = \"linear\", in = 4, out = 3 }]\n\
             [[stage]]\nops = [{ op = \"linear\", in = 3, out = 3 }]\n\
             [[stage]]\nops = [{ op = \"log_softmax\" }, { op = \"nll_loss\" }]\n",
            "tiny",
        )
        .unwrap();
        Layout::new(&model, Keep::None, &[], 3).unwrap()
    }

    #[test]
    fn every_hop_is_drawn_at_rate_one_and_due_before_its_window_ends() {
        let mut a = Audits::new(AuditRate::new(1.0), 1, 3).unwrap();
        a.step_done(5, &layout());
        assert_eq!(a.stats().committed_steps, 1);
        assert!(a.queued());
        // A window of 4 leaves KEPT - 4 steps of slack.
        let slack = (KEPT - 4) as u64;
        assert!(!a.due(5 + slack - 1, 4));
        assert!(a.due(5 + slack, 4));
        // The loss hop (no parameters) too.
        assert_eq!(a.take_queue(), vec![(5, 0), (5, 1), (5, 2)]);
        assert!(!a.queued() && !a.due(1000, 4));
    }

    #[test]
    fn without_audits_nothing_is_drawn_or_stripped() {
        let mut a = Audits::new(None, 4, 3).unwrap();
        a.step_done(0, &layout());
        assert!(!a.queued());
        assert_eq!(a.stats().committed_steps, 0);
        let body = vec![1, 2, 3];
        let kind = Await::Output { step: 0, micro: 0 };
        assert_eq!(a.take(kind, body.clone(), 3).unwrap(), (body.clone(), None));
        assert_eq!(a.key(0), None);
        assert!(Audits::new(AuditRate::new(0.5), 2, 3).is_err());
        let a = Audits::new(AuditRate::new(0.5), 1, 3).unwrap();
        assert!(a.check_window(KEPT - 1).is_ok());
        let e = a.check_window(KEPT).unwrap_err().to_string();
        assert!(
            e.contains("window of 16") && e.contains("at most 15"),
            "{e}"
        );
        assert!(Audits::new(None, 1, 3).unwrap().check_window(1000).is_ok());
    }

    #[test]
    fn the_draws_depend_on_the_seed_alone() {
        let draws = |seed| {
            let mut a = Audits::new(AuditRate::new(0.3), 1, seed).unwrap();
            for step in 0..50 {
                a.step_done(step, &layout());
            }
            a.take_queue()
        };
        assert_eq!(draws(11), draws(11));
        assert_ne!(draws(11), draws(12));
        let n = draws(11).len();
        // 150 draws (three hops) at 0.3.
        assert!((25..=65).contains(&n), "{n} audits drawn");
    }

    /// The detection rates of SECURITY.md, measured on the draws: a hop's
    /// step is examined when it or a neighbour is drawn (1 − (1 − Q)³ for
    /// a middle hop), a boundary when either side is (1 − (1 − Q)²).
    #[test]
    fn measured_detection_rates_match_the_formulas() {
        let q = 0.02;
        let mut a = Audits::new(AuditRate::new(q), 1, 77).unwrap();
        let l = layout();
        let steps = 200_000u64;
        let (mut examined, mut boundary) = (0u64, 0u64);
        for step in 0..steps {
            a.step_done(step, &l);
            let drawn: Vec<usize> = a.take_queue().into_iter().map(|(_, j)| j).collect();
            // Hop 1 of 3 is a middle hop; its boundary with hop 2.
            examined += u64::from(drawn.iter().any(|j| (0..=2).contains(j)));
            boundary += u64::from(drawn.iter().any(|j| (1..=2).contains(j)));
            a.ledger.clear();
        }
        let (e, b) = (
            examined as f64 / steps as f64,
            boundary as f64 / steps as f64,
        );
        let (fe, fb) = (1.0 - (1.0 - q).powi(3), 1.0 - (1.0 - q).powi(2));
        eprintln!("Q = {q}: examined {e:.4} (formula {fe:.4}), boundary {b:.4} (formula {fb:.4})");
        // 5 sigma of a binomial over 200,000 steps is about 0.0026.
        assert!((e - fe).abs() < 0.0026, "examined {e}, formula {fe}");
        assert!((b - fb).abs() < 0.0026, "boundary {b}, formula {fb}");
    }

    #[test]
    fn an_accuracy_drop_marks_the_cascade_suspect() {
        let mut a = Audits::new(None, 1, 0).unwrap();
        assert!(!a.check_accuracy(1, 0.80));
        assert!(!a.check_accuracy(2, 0.76));
        assert!(a.check_accuracy(3, 0.74));
        assert_eq!(a.stats().accuracies, vec![0.80, 0.76, 0.74]);
    }
}
