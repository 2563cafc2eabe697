//! Designer loops (paper §2.2): at Poisson times the designer sends a loop
//! onion through the whole cascade and back to itself. On the wire a loop
//! is a session message like any other (same cells, same padding); every
//! hop forwards its body unchanged. Loops blur the timing of real traffic
//! and double as health probes: a loop not back within the detection bound
//! T means a hop drops packets (or is down), and fails the run like a late
//! answer does (the recovery then replaces the hop, if it can).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use mixnn_net::pacing::poisson_gap;
use mixnn_proto::SessionNote;
use mixnn_wire::{Op, ReplyId};
use rand_chacha::ChaCha8Rng;
use rand_core::SeedableRng;

use super::CascadeRunner;
use crate::error::DesignerError;

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

/// The runner's loop schedule and the loops out.
pub(super) struct Loops {
    rate: f64,
    rng: ChaCha8Rng,
    next: Option<Instant>,
    out: HashMap<[u8; 16], Instant>,
    stats: LoopStats,
    /// Off while the session is set up (init) and while probing.
    active: bool,
}

impl Loops {
    /// Loops at `rate` per second (0: none), times drawn from `seed`.
    pub(super) fn new(rate: f64, seed: u64) -> Self {
        Loops {
            rate,
            rng: ChaCha8Rng::seed_from_u64(seed),
            next: None,
            out: HashMap::new(),
            stats: LoopStats::default(),
            active: false,
        }
    }

    /// When the next loop is due (and the schedule started), if loops are on.
    pub(super) fn next_due(&mut self, now: Instant) -> Option<Instant> {
        if self.next.is_none() {
            self.next = poisson_gap(self.rate, &mut self.rng).map(|g| now + g);
        }
        self.next
    }

    /// Takes `rid` if it is a loop's reply.
    pub(super) fn back(&mut self, rid: &[u8; 16]) -> bool {
        if self.out.remove(rid).is_some() {
            self.stats.returned += 1;
            true
        } else {
            false
        }
    }

    /// Forgets the loops out (a new session after a recovery).
    pub(super) fn forget(&mut self) {
        self.out.clear();
    }

    /// Stops sending loops and forgets those out (before an init or a probe).
    pub(super) fn pause(&mut self) {
        self.active = false;
        self.next = None;
        self.out.clear();
    }

    /// Sends loops again (once a session is set up).
    pub(super) fn resume(&mut self) {
        self.active = true;
    }

    /// When the oldest loop out was sent.
    fn oldest(&self) -> Option<Instant> {
        self.out.values().min().copied()
    }
}

impl CascadeRunner {
    /// Loops sent, returned and lost so far.
    pub fn loop_stats(&self) -> LoopStats {
        self.loops.stats
    }

    /// Sends the loops that are due and fails if one is overdue (not back
    /// within the detection bound). Called by the send loops and while
    /// waiting for replies; does nothing before the session is set up.
    pub(super) fn loop_tick(&mut self) -> Result<(), DesignerError> {
        if !self.loops.active {
            return Ok(());
        }
        let now = Instant::now();
        let bound = self.detection_bound();
        if let Some(oldest) = self.loops.oldest() {
            if now.duration_since(oldest) > bound {
                self.loops.stats.lost += 1;
                self.loops.forget();
                return Err(DesignerError::Timeout {
                    what: "a loop through the whole cascade",
                    step: self.step,
                    secs: bound.as_secs_f64(),
                });
            }
        }
        while let Some(due) = self.loops.next_due(now) {
            if due > now {
                break;
            }
            self.loops.next = None;
            // Schedule from the due time, not from now, to keep the rate.
            self.loops.next = poisson_gap(self.loops.rate, &mut self.loops.rng).map(|g| due + g);
            self.send_loop()?;
        }
        Ok(())
    }

    /// The earliest time [`CascadeRunner::loop_tick`] has something to do.
    pub(super) fn loop_wake(&mut self) -> Option<Instant> {
        if !self.loops.active {
            return None;
        }
        let bound = self.detection_bound();
        let overdue = self.loops.oldest().map(|t| t + bound);
        let due = self.loops.next_due(Instant::now());
        match (overdue, due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// One loop through every hop, back to the designer.
    fn send_loop(&mut self) -> Result<(), DesignerError> {
        let n = self.hops.len();
        let rid = ReplyId::random(&mut self.rng);
        let blocks: Vec<_> = (0..n)
            .map(|k| self.block(Op::Loop, k, n - 1, rid, false))
            .collect();
        let notes = vec![SessionNote::Loop { step: self.step }.encode(); n];
        let path: Vec<usize> = (0..n).collect();
        let cells = self.seal(&path, &blocks, &notes, &[])?;
        self.loops.out.insert(rid.0, Instant::now());
        self.loops.stats.sent += 1;
        self.send_first(&cells)
    }

    /// Keeps only loops going for `duration` (no training traffic): the
    /// cascade's health check between runs. Fails as soon as a loop is not
    /// back within the detection bound.
    pub fn run_loops(&mut self, duration: Duration) -> Result<LoopStats, DesignerError> {
        let end = Instant::now() + duration;
        loop {
            self.loop_tick()?;
            let now = Instant::now();
            if now >= end {
                return Ok(self.loops.stats);
            }
            // recv wakes for loop times itself.
            if let Some((kind, _)) = self.recv(end - now)? {
                tracing::debug!("a late {kind:?} while only loops run");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn loop_schedule_is_off_at_rate_zero() {
        let mut l = Loops::new(0.0, 1);
        assert!(l.next_due(Instant::now()).is_none());
        let mut l = Loops::new(5.0, 1);
        l.resume();
        let now = Instant::now();
        let due = l.next_due(now).unwrap();
        assert!(due > now);
        // The schedule stays put until a loop is sent.
        assert_eq!(l.next_due(now), Some(due));
    }

    #[test]
    fn only_loop_replies_are_taken() {
        let mut l = Loops::new(5.0, 1);
        l.out.insert([1; 16], Instant::now());
        assert!(!l.back(&[2; 16]));
        assert!(l.back(&[1; 16]));
        assert!(!l.back(&[1; 16]));
        assert_eq!(l.stats.returned, 1);
    }
}
