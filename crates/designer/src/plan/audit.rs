//! Audits of Byzantine hops (paper §4.2, with the per-step verification
//! the paper leaves to future work).
//!
//! - **Commitments.** Every hop gets a fresh key in its init note (sealed
//!   to it alone) and commits to each forward, backward and test message
//!   it runs: its slot names the digest of its state and the hashes of the
//!   tensors it received and sends. The slots ride back in onion layers of
//!   a fixed-size trailer ([`mixnn_proto::trailer`]); [`Audits::take`]
//!   peels them at each delivery.
//! - **Checked at every delivery, for every hop, without an audit**
//!   ([`crate::plan::ledger`]): each layer's tag, what each hop says it
//!   sent against what the next says it received (and the designer's own
//!   ends: what it sent, what it received), and the chain of state
//!   digests, from the state the designer built or loaded onwards.
//! - **Draws.** After a step completes (and after each test batch), the
//!   designer's secret RNG picks each hop with probability `audit_rate`
//!   ([`Audits::step_done`], [`Audits::test_done`]); nothing on the wire
//!   depends on the draw until the audit is sent, after the step. The
//!   openings of the oldest audited step are asked for at once, while
//!   later steps run (the session's prefetch: the pipeline does not stop
//!   for them); only audits the prefetch did not take (after a bad reply,
//!   or a backlog) make the pipeline drain before an opening could leave
//!   the hop's window ([`mixnn_proto::audit::KEPT`] steps; [`Audits::due`]).
//! - **One audit** ([`crate::plan::opening::AuditCase`]): the designer asks
//!   the hop, through a route out and back like a fetch, to open the step
//!   or test batch, checks every field of the opening against its slots
//!   and re-executes the stage from it ([`crate::plan::opening::verify`]):
//!   output, input gradient and the digest of the state after the update
//!   must all match bit for bit. It opens the audited hop's two
//!   neighbours too, checked the same way.
//! - **Response** (in the runner): a misbehaviour is
//!   [`crate::DesignerError::Misbehaved`]; one pinned on a hop gets it
//!   reported and replaced, and the run rolls back to the last kept
//!   checkpoint before the first bad step
//!   ([`crate::plan::recovery::rollback_point`]). One that can only be
//!   pinned on two hops, or on a transfer's route, replaces nobody: the
//!   run rolls back and tries again, and stops if it comes back. Without
//!   replacements the run stops.
//! - **Test-phase check** (the paper's): a test accuracy more than
//!   [`ACCURACY_DROP`] below the best so far marks the cascade suspect.
//!
//! Limits (see `SECURITY.md`): two colluding neighbours can agree on a
//! lie at their shared boundary, which then surfaces only where it meets
//! an honest hop's re-execution.

use mixnn_model::trainer::EpochMetrics;
use mixnn_proto::audit::KEPT;
use mixnn_proto::trailer::{Pass, Slot, SlotContext, TrailerKeys};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

use crate::error::DesignerError;
use crate::misbehaviour::Misbehaviour;
use crate::options::AuditRate;
use crate::plan::layout::Layout;
use crate::plan::ledger::Ledger;
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

/// The designer's audit state: keys, commitments, draws, the queue of
/// audits to run, and what they found.
#[derive(Debug)]
pub struct Audits {
    rate: Option<AuditRate>,
    rng: ChaCha8Rng,
    keys: Vec<[u8; 32]>,
    ledger: Ledger,
    queue: Vec<(u64, usize)>,
    /// Test audits waiting: (step, test batch), hop.
    test_queue: Vec<((u64, u32), usize)>,
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
            ledger: Ledger::new(Vec::new(), [0; 32]),
            queue: Vec::new(),
            test_queue: Vec::new(),
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
    /// waiting of the old session are dropped (the states the designer
    /// loads or builds are told by [`Audits::know`]).
    pub fn new_session(&mut self, n: usize, rng: &mut impl RngCore) {
        self.queue.clear();
        self.test_queue.clear();
        self.keys = (0..n)
            .map(|_| {
                let mut k = [0u8; 32];
                rng.fill_bytes(&mut k);
                k
            })
            .collect();
        let mut fill_seed = [0u8; 32];
        rng.fill_bytes(&mut fill_seed);
        self.ledger = Ledger::new(self.keys.iter().map(TrailerKeys::new).collect(), fill_seed);
    }

    /// Hop `hop` holds the state of digest `digest` at the start of
    /// `step`: the designer built it (from the stage's seed) or loaded it.
    pub fn know(&mut self, hop: usize, step: u64, digest: [u8; 32]) {
        if self.on() {
            self.ledger.know(hop, step, digest);
        }
    }

    /// The digest of the state hop `hop` holds at the start of `step`, as
    /// far as the designer knows (its last backward's slot, or what the
    /// designer built or loaded); `None` without audits.
    pub fn expected_state(&self, hop: usize, step: u64) -> Option<[u8; 32]> {
        self.ledger.expected_state(hop, step)
    }

    /// Hop `k`'s key for its init note.
    pub fn key(&self, k: usize) -> Option<[u8; 32]> {
        self.on().then(|| self.keys.get(k).copied()).flatten()
    }

    /// `payload` with the trailer of message `index` of `pass` at `step`
    /// through `n` hops appended (unchanged without audits).
    pub fn pad(
        &mut self,
        pass: Pass,
        step: u64,
        index: u32,
        n: usize,
        payload: &[u8],
    ) -> Result<Vec<u8>, DesignerError> {
        let mut out = payload.to_vec();
        if self.on() {
            let ctx = SlotContext { step, pass, index };
            out.extend_from_slice(&self.ledger.trailer(ctx, n, payload)?);
        }
        Ok(out)
    }

    /// Checks a delivery of a cascade of `n` hops (`kind`: a loss or
    /// output, an end of backward, a test output) against the slots its
    /// trailer carries and records them ([`Ledger::deliver`]); returns the
    /// payload. Other replies, and every reply without audits, pass
    /// unchanged. A misbehaviour found is [`DesignerError::Misbehaved`].
    pub fn take(&mut self, kind: Await, body: Vec<u8>, n: usize) -> Result<Vec<u8>, DesignerError> {
        let ctx = match kind {
            _ if !self.on() => return Ok(body),
            Await::Output { step, micro } => SlotContext {
                step,
                pass: Pass::Forward,
                index: u32::from(micro),
            },
            Await::Done { step, micro } => SlotContext {
                step,
                pass: Pass::Backward,
                index: u32::from(micro),
            },
            Await::Test { step, batch, .. } => SlotContext {
                step,
                pass: Pass::Test,
                index: batch as u32,
            },
            _ => return Ok(body),
        };
        self.ledger.deliver(ctx, n, &body)
    }

    /// Step `step` completed: draws which hops of `layout` to audit for it.
    pub fn step_done(&mut self, step: u64, layout: &Layout) {
        let Some(rate) = self.rate else {
            return;
        };
        self.stats.committed_steps += 1;
        // Only steps still in the hops' windows can be audited.
        self.ledger
            .retain_from(step.saturating_sub(4 * KEPT as u64));
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

    /// Test batch `batch` (run at `step`) came back: draws which of the
    /// `n` hops to audit for it, as for a training step.
    pub fn test_done(&mut self, step: u64, batch: u32, n: usize) {
        let Some(rate) = self.rate else {
            return;
        };
        for j in 0..n {
            let draw = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            if draw < rate.probability() {
                self.test_queue.push(((step, batch), j));
            }
        }
    }

    /// Test audits are waiting.
    pub fn test_queued(&self) -> bool {
        !self.test_queue.is_empty()
    }

    /// The test audits waiting ((step, batch), hop), in the order drawn;
    /// the queue is emptied.
    pub fn take_test_queue(&mut self) -> Vec<((u64, u32), usize)> {
        std::mem::take(&mut self.test_queue)
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

    /// Hop `j`'s forward and backward slots of `step`, to check its
    /// opening against.
    pub fn evidence(&self, j: usize, step: u64) -> Result<(Slot, Slot), String> {
        self.ledger.slots(j, step)
    }

    /// Hop `j`'s slot of test batch `batch` at `step`.
    pub fn test_evidence(&self, j: usize, step: u64, batch: u32) -> Result<Slot, String> {
        self.ledger.test_slot(j, step, batch)
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
        assert_eq!(a.take(kind, body.clone(), 3).unwrap(), body);
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

    #[test]
    fn an_accuracy_drop_marks_the_cascade_suspect() {
        let mut a = Audits::new(None, 1, 0).unwrap();
        assert!(!a.check_accuracy(1, 0.80));
        assert!(!a.check_accuracy(2, 0.76));
        assert!(a.check_accuracy(3, 0.74));
        assert_eq!(a.stats().accuracies, vec![0.80, 0.76, 0.74]);
    }
}
