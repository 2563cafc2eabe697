//! Designer loops (paper §2.2): at Poisson times the designer sends a loop
//! onion through the whole cascade and back to itself. On the wire a loop
//! is a session message like any other (same cells, same padding); every
//! hop forwards its body unchanged. Loops blur the timing of real traffic
//! and double as health probes: a loop not back within the detection bound
//! T means a hop drops packets (or is down), and fails the run like a late
//! answer does (the recovery then replaces the hop, if it can).
//!
//! [`LoopSchedule`] decides; it reads no clock: the driver passes `now` to
//! [`LoopSchedule::poll`] and sends the loops it says are due.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use mixnn_net::pacing::poisson_gap;
use mixnn_wire::ReplyId;
use rand_chacha::ChaCha8Rng;
use rand_core::SeedableRng;

use crate::options::Rate;

/// Loops sent and returned so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoopStats {
    /// Loops sent.
    pub sent: u64,
    /// Loops back at the designer.
    pub returned: u64,
    /// Loops not back within the bound.
    pub lost: u64,
}

/// A loop was not back within the detection bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoopLost;

/// When loops are due, and which are out.
#[derive(Debug)]
pub struct LoopSchedule {
    rate: Option<Rate>,
    rng: ChaCha8Rng,
    next: Option<Instant>,
    out: HashMap<ReplyId, Instant>,
    stats: LoopStats,
    phase: Phase,
}

/// Whether loops may go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// While a session is set up (init), probed, or abandoned.
    Paused,
    /// Once every hop has the session.
    Running,
}

impl LoopSchedule {
    /// Loops at `rate` (none if `None`), their times drawn from `seed`.
    pub fn new(rate: Option<Rate>, seed: u64) -> Self {
        LoopSchedule {
            rate,
            rng: ChaCha8Rng::seed_from_u64(seed),
            next: None,
            out: HashMap::new(),
            stats: LoopStats::default(),
            phase: Phase::Paused,
        }
    }

    /// Loops sent, returned and lost so far.
    pub fn stats(&self) -> LoopStats {
        self.stats
    }

    fn gap(&mut self) -> Option<Duration> {
        poisson_gap(self.rate?.per_second(), &mut self.rng)
    }

    /// When the next loop is due (starting the schedule at `now`), if
    /// loops are on.
    fn next_due(&mut self, now: Instant) -> Option<Instant> {
        if self.next.is_none() {
            self.next = self.gap().map(|g| now + g);
        }
        self.next
    }

    /// At `now`: how many loops are due (each sent one is then reported
    /// with [`LoopSchedule::sent`]), or [`LoopLost`] if the oldest loop out
    /// has been out longer than `bound` (it counts as lost and the loops
    /// out are forgotten). Nothing before [`LoopSchedule::resume`].
    pub fn poll(&mut self, now: Instant, bound: Duration) -> Result<usize, LoopLost> {
        if self.phase == Phase::Paused {
            return Ok(0);
        }
        if let Some(oldest) = self.oldest() {
            if now.saturating_duration_since(oldest) > bound {
                self.stats.lost += 1;
                self.out.clear();
                return Err(LoopLost);
            }
        }
        let mut due = 0;
        while let Some(at) = self.next_due(now) {
            if at > now {
                break;
            }
            // Scheduled from the due time, not from now, to keep the rate.
            self.next = self.gap().map(|g| at + g);
            due += 1;
        }
        Ok(due)
    }

    /// The earliest time after `now` that [`LoopSchedule::poll`] has
    /// something to do: the next loop due, or the oldest loop out
    /// becoming overdue.
    pub fn wake(&mut self, now: Instant, bound: Duration) -> Option<Instant> {
        if self.phase == Phase::Paused {
            return None;
        }
        let overdue = self.oldest().map(|t| t + bound);
        let due = self.next_due(now);
        match (overdue, due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// A loop with reply id `rid` left at `now`.
    pub fn sent(&mut self, rid: ReplyId, now: Instant) {
        self.out.insert(rid, now);
        self.stats.sent += 1;
    }

    /// Takes `rid` if it is a loop's reply.
    pub fn back(&mut self, rid: &ReplyId) -> bool {
        if self.out.remove(rid).is_some() {
            self.stats.returned += 1;
            true
        } else {
            false
        }
    }

    /// Stops sending loops and forgets those out (before an init or a
    /// probe, and when a session is abandoned).
    pub fn pause(&mut self) {
        self.phase = Phase::Paused;
        self.next = None;
        self.out.clear();
    }

    /// Sends loops again (once a session is set up).
    pub fn resume(&mut self) {
        self.phase = Phase::Running;
    }

    /// When the oldest loop out was sent.
    fn oldest(&self) -> Option<Instant> {
        self.out.values().min().copied()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    const BOUND: Duration = Duration::from_secs(2);

    fn schedule(rate: f64) -> LoopSchedule {
        let mut l = LoopSchedule::new(Rate::new(rate), 1);
        l.resume();
        l
    }

    #[test]
    fn loop_schedule_is_off_without_a_rate() {
        let mut l = LoopSchedule::new(None, 1);
        l.resume();
        let now = Instant::now();
        assert_eq!(l.wake(now, BOUND), None);
        assert_eq!(l.poll(now + Duration::from_secs(60), BOUND), Ok(0));
    }

    #[test]
    fn nothing_is_due_before_the_session_is_up() {
        let mut l = LoopSchedule::new(Rate::new(50.0), 1);
        let now = Instant::now();
        assert_eq!(l.poll(now + Duration::from_secs(10), BOUND), Ok(0));
        assert_eq!(l.wake(now, BOUND), None);
    }

    #[test]
    fn loops_fall_due_at_the_rate_and_stay_put_until_then() {
        let mut l = schedule(10.0);
        let t0 = Instant::now();
        let due = l.wake(t0, BOUND).unwrap();
        assert!(due > t0);
        assert_eq!(l.wake(t0, BOUND), Some(due));
        assert_eq!(l.poll(t0, BOUND), Ok(0));
        // Over 100 s at 10/s, about 1000 are due (Poisson: sd ~32).
        let mut total = 0;
        for s in 1..=100 {
            total += l.poll(t0 + Duration::from_secs(s), Duration::MAX).unwrap();
        }
        assert!((850..1150).contains(&total), "{total} loops in 100 s");
    }

    #[test]
    fn a_loop_out_longer_than_the_bound_is_lost_once() {
        let mut l = schedule(0.001);
        let t0 = Instant::now();
        l.sent(ReplyId([1; 16]), t0);
        l.sent(ReplyId([2; 16]), t0 + Duration::from_secs(1));
        assert_eq!(l.wake(t0, BOUND).map(|w| w <= t0 + BOUND), Some(true));
        assert_eq!(l.poll(t0 + BOUND, BOUND), Ok(0));
        assert_eq!(
            l.poll(t0 + BOUND + Duration::from_millis(1), BOUND),
            Err(LoopLost)
        );
        // The others out were forgotten with it: one loss, not two.
        assert_eq!(l.poll(t0 + 3 * BOUND, BOUND), Ok(0));
        assert!(!l.back(&ReplyId([2; 16])));
        assert_eq!(l.stats().lost, 1);
        assert_eq!(l.stats().sent, 2);
    }

    #[test]
    fn only_loop_replies_are_taken() {
        let mut l = schedule(5.0);
        l.sent(ReplyId([1; 16]), Instant::now());
        assert!(!l.back(&ReplyId([2; 16])));
        assert!(l.back(&ReplyId([1; 16])));
        assert!(!l.back(&ReplyId([1; 16])));
        assert_eq!(l.stats().returned, 1);
    }

    #[test]
    fn pausing_forgets_the_loops_out() {
        let mut l = schedule(5.0);
        let t0 = Instant::now();
        l.sent(ReplyId([1; 16]), t0);
        l.pause();
        assert_eq!(l.poll(t0 + 10 * BOUND, BOUND), Ok(0));
        l.resume();
        assert_eq!(l.poll(t0 + 10 * BOUND, BOUND).ok().map(|_| ()), Some(()));
        assert_eq!(l.stats().lost, 0);
    }
}
