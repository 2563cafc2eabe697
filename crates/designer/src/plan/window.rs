//! The training window: which steps are in flight, what each still waits
//! for, and which are complete, in order.
//!
//! The designer keeps up to `window` steps in flight (one with a kept
//! first stage, which runs each step's forward and backward itself). A
//! step is complete when every micro-batch's loss and end of backward are
//! back; completed steps are reported strictly in order, each with the
//! batch's loss: the micro-batch losses added in micro-batch order, as the
//! local trainer adds them.

use std::ops::Range;

use mixnn_model::trainer::{micro_ranges, Batch};

use crate::error::BadReply;

/// Progress of one step.
#[derive(Debug, Clone)]
struct StepProgress {
    /// Loss of each micro-batch, once known.
    losses: Vec<Option<f32>>,
    /// Micro-batches whose backward has come back.
    done: usize,
}

impl StepProgress {
    fn complete(&self) -> bool {
        self.done >= self.losses.len() && self.losses.iter().all(Option::is_some)
    }
}

/// Steps `base..base + len` of one call to train, from position `start`.
#[derive(Debug, Clone)]
pub struct Window {
    base: u64,
    window: usize,
    micro_rows: Vec<Vec<Range<usize>>>,
    progress: Vec<StepProgress>,
    next: usize,
    completed: usize,
}

impl Window {
    /// The window over `batches` (steps from `base`), cut into
    /// `micro_batches` each, the first `start` already done, at most
    /// `window` in flight.
    pub fn new(
        batches: &[Batch],
        base: u64,
        start: usize,
        micro_batches: usize,
        window: usize,
    ) -> Self {
        let micro_rows: Vec<Vec<Range<usize>>> = batches
            .iter()
            .map(|b| micro_ranges(b.rows, micro_batches))
            .collect();
        let progress = micro_rows
            .iter()
            .map(|r| StepProgress {
                losses: vec![None; r.len()],
                done: 0,
            })
            .collect();
        Window {
            base,
            window: window.max(1),
            micro_rows,
            progress,
            next: start,
            completed: start,
        }
    }

    /// Steps in the window.
    pub fn len(&self) -> usize {
        self.progress.len()
    }

    /// No steps.
    pub fn is_empty(&self) -> bool {
        self.progress.is_empty()
    }

    /// Every step is complete.
    pub fn finished(&self) -> bool {
        self.completed >= self.len()
    }

    /// No step is in flight (the place for checkpoints and audits).
    pub fn drained(&self) -> bool {
        self.next == self.completed
    }

    /// The first step not complete.
    pub fn waiting(&self) -> u64 {
        self.base + self.completed as u64
    }

    /// The position of the next step to send, if the window has room and
    /// `hold(step)` (a checkpoint or an audit due before it) does not ask
    /// to drain first; a held step is sent anyway when nothing is in
    /// flight.
    pub fn next_to_send(&self, hold: impl Fn(u64) -> bool) -> Option<usize> {
        let i = self.next;
        if i >= self.len() || i - self.completed >= self.window {
            return None;
        }
        if i > self.completed && hold(self.base + i as u64) {
            return None;
        }
        Some(i)
    }

    /// Step at position `i` was sent.
    pub fn sent(&mut self, i: usize) {
        self.next = self.next.max(i + 1);
    }

    /// The position of `step` among the window's batches.
    pub fn position(&self, step: u64) -> Result<usize, BadReply> {
        step.checked_sub(self.base)
            .map(|i| i as usize)
            .filter(|i| *i < self.len())
            .ok_or(BadReply::Step { step })
    }

    /// Micro-batches of the step at position `i`.
    pub fn micros(&self, i: usize) -> usize {
        self.micro_rows.get(i).map_or(0, Vec::len)
    }

    /// Rows of micro-batch `m` of the step at position `i`.
    pub fn rows(&self, i: usize, m: u16) -> Option<Range<usize>> {
        self.micro_rows.get(i)?.get(usize::from(m)).cloned()
    }

    /// The loss of micro-batch `m` of `step` came back.
    pub fn on_loss(&mut self, step: u64, m: u16, loss: f32) -> Result<(), BadReply> {
        let i = self.position(step)?;
        let slot = self.progress[i]
            .losses
            .get_mut(usize::from(m))
            .ok_or(BadReply::MicroBatch { step, micro: m })?;
        *slot = Some(loss);
        Ok(())
    }

    /// The end of backward of a micro-batch of `step` came back.
    pub fn on_done(&mut self, step: u64) -> Result<(), BadReply> {
        let i = self.position(step)?;
        self.progress[i].done += 1;
        Ok(())
    }

    /// The next complete step in order, with its batch loss: position and
    /// loss.
    pub fn pop_completed(&mut self) -> Option<(usize, f32)> {
        let p = self.progress.get(self.completed)?;
        if !p.complete() {
            return None;
        }
        let mut loss = 0.0f32;
        for (m, l) in p.losses.iter().flatten().enumerate() {
            loss = if m == 0 { *l } else { loss + *l };
        }
        let i = self.completed;
        self.completed += 1;
        Some((i, loss))
    }
}

/// `n` batches of `rows` four-pixel images, for the tests of the
/// training loop's plan.
#[cfg(test)]
pub(crate) fn test_batches(n: usize, rows: usize) -> Vec<Batch> {
    (0..n)
        .map(|_| Batch {
            pixels: vec![0; rows * 4],
            labels: vec![0; rows],
            rows,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    use crate::plan::window::test_batches as batches;

    #[test]
    fn steps_complete_in_order_whatever_the_reply_order() {
        let b = batches(3, 4);
        let mut w = Window::new(&b, 10, 0, 2, 4);
        for i in 0..3 {
            assert_eq!(w.next_to_send(|_| false), Some(i));
            w.sent(i);
        }
        assert_eq!(w.next_to_send(|_| false), None);
        // Step 11 completes first but is reported after step 10.
        w.on_loss(11, 1, 2.0).unwrap();
        w.on_loss(11, 0, 1.0).unwrap();
        w.on_done(11).unwrap();
        w.on_done(11).unwrap();
        assert_eq!(w.pop_completed(), None);
        w.on_loss(10, 0, 0.5).unwrap();
        w.on_done(10).unwrap();
        assert_eq!(w.pop_completed(), None, "a micro-batch is missing");
        w.on_loss(10, 1, 0.25).unwrap();
        w.on_done(10).unwrap();
        assert_eq!(w.pop_completed(), Some((0, 0.75)));
        assert_eq!(w.pop_completed(), Some((1, 3.0)));
        assert_eq!(w.pop_completed(), None);
        assert_eq!(w.waiting(), 12);
        assert!(!w.finished());
    }

    #[test]
    fn the_window_bounds_steps_in_flight_and_holds_drain_it() {
        let b = batches(5, 2);
        let mut w = Window::new(&b, 0, 0, 1, 2);
        w.sent(0);
        w.sent(1);
        assert_eq!(w.next_to_send(|_| false), None);
        w.on_loss(0, 0, 1.0).unwrap();
        w.on_done(0).unwrap();
        w.pop_completed().unwrap();
        // Room for step 2, unless a checkpoint is due before it.
        assert_eq!(w.next_to_send(|_| false), Some(2));
        assert_eq!(w.next_to_send(|s| s == 2), None);
        w.on_loss(1, 0, 1.0).unwrap();
        w.on_done(1).unwrap();
        w.pop_completed().unwrap();
        assert!(w.drained());
        // Drained: the held step goes out.
        assert_eq!(w.next_to_send(|s| s == 2), Some(2));
    }

    #[test]
    fn replies_outside_the_window_are_bad() {
        let b = batches(2, 2);
        let mut w = Window::new(&b, 5, 0, 1, 2);
        assert_eq!(w.on_done(4), Err(BadReply::Step { step: 4 }));
        assert_eq!(w.on_done(7), Err(BadReply::Step { step: 7 }));
        assert_eq!(
            w.on_loss(5, 1, 0.0),
            Err(BadReply::MicroBatch { step: 5, micro: 1 })
        );
    }
}
