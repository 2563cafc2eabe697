//! The training loop of one call to train, as a core in the node's image:
//! it takes events (a reply's kind, a loss, the state of the openings
//! fetched while steps run) and returns commands (send a step, wait, run
//! the audits or take a checkpoint with nothing in flight, report a
//! completed step), and owns no socket, clock or stage. The session
//! (`crate::session`) carries the commands out: it sends the onions,
//! waits on the exchange, runs the kept stages and the audits.
//!
//! The order it gives them in, per call:
//!
//! 1. a checkpoint of the state it starts from, if one is wanted there;
//! 2. while steps remain: with nothing in flight (after the first step),
//!    the openings fetched while steps ran are finished and audited, the
//!    audits waiting are run and a checkpoint taken, each if there is
//!    one; then as many steps are sent as the window allows (a step
//!    before which a checkpoint or an audit is due waits until nothing is
//!    in flight); then one reply is awaited and handled; completed steps
//!    are reported in order; and the openings of the oldest audited step
//!    start to be fetched while later steps run, unless a fetch of them
//!    failed in this call;
//! 3. at the end the same as with nothing in flight, the checkpoint
//!    whenever checkpoints are on.
//!
//! [`Gates`] answers what the core asks of the policies it does not own
//! (the checkpoint policy, the audit queue), each at the moment the
//! decision is taken, so a checkpoint or an audit run changes what comes
//! next.

use mixnn_model::trainer::Batch;

use crate::error::{BadReply, DesignerError};
use crate::plan::pending::{Await, Expected};
use crate::plan::window::Window;

/// What the core asks of the checkpoint policy and the audit queue.
pub trait Gates {
    /// A checkpoint is wanted of the state after `step` steps.
    fn checkpoint_wanted(&self, step: u64) -> bool;
    /// Checkpoints are on (the end of a call takes one).
    fn checkpoints_on(&self) -> bool;
    /// An audit is due at `step`: drain before sending it.
    fn audit_due(&self, step: u64) -> bool;
    /// Audits are waiting to run.
    fn audits_queued(&self) -> bool;
    /// The oldest step with audits waiting, whose openings can be fetched
    /// while later steps run.
    fn oldest_audit(&self) -> Option<u64>;
}

/// What to do next.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Command {
    /// Finish fetching the openings of `step` that started while steps
    /// ran (nothing is in flight now), then run their audits.
    FinishPrefetch {
        /// The step whose openings are fetched.
        step: u64,
        /// The first step not complete (what a timeout names).
        waiting: u64,
    },
    /// Run the audits waiting; nothing is in flight and the session is
    /// at `step`.
    RunAudits {
        /// Steps applied.
        step: u64,
    },
    /// Take a checkpoint; nothing is in flight and the session is at
    /// `step`.
    Checkpoint {
        /// Steps applied.
        step: u64,
    },
    /// Send the step at position `index` of the call's batches.
    Send {
        /// Position among the call's batches.
        index: usize,
        /// Its step number.
        step: u64,
    },
    /// Wait for one reply and hand its kind to [`StepLoop::on_reply`].
    Wait {
        /// What answers the wait.
        expected: Expected,
        /// The first step not complete.
        step: u64,
    },
    /// The step at position `index` is complete with the batch's loss.
    Completed {
        /// Position among the call's batches.
        index: usize,
        /// Its step number.
        step: u64,
        /// The batch's loss.
        loss: f32,
    },
    /// Start fetching the openings of `step` while later steps run; tell
    /// the core with [`StepLoop::prefetch_started`].
    StartPrefetch {
        /// The oldest step with audits waiting.
        step: u64,
    },
    /// Every step of the call is complete: the session is at `step`.
    Reached {
        /// Steps applied.
        step: u64,
    },
    /// The call is done.
    Finished,
}

/// What a reply is, for the session to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// The output (the loss, or the last remote stage's output) of a
    /// micro-batch: compute the loss if the last stage is kept, then
    /// [`StepLoop::on_loss`].
    Output {
        /// The step.
        step: u64,
        /// The micro-batch.
        micro: u16,
        /// The step's position among the call's batches.
        index: usize,
        /// Micro-batches of the step.
        micros: usize,
    },
    /// A micro-batch's backward reached the first hop: run the kept
    /// first stage's backward if there is one, then
    /// [`StepLoop::on_done`].
    Done {
        /// The step.
        step: u64,
        /// The micro-batch.
        micro: u16,
        /// Micro-batches of the step.
        micros: usize,
    },
    /// A chunk of the openings being fetched while steps run: hand it to
    /// the transfer, then [`StepLoop::on_prefetch`].
    Opening,
}

/// How the fetch of openings while steps run stands after a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefetchProgress {
    /// More chunks to come.
    Pending,
    /// All in, and audited.
    Complete,
    /// A chunk did not come back right: its audits wait for the runs
    /// between steps, which fetch each opening alone, and no more
    /// openings are fetched while steps run in this call.
    Failed,
}

/// Where the core is in its order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    Begin,
    Top,
    Between(Phase, u64),
    Send,
    Wait,
    Pop,
    Prefetch,
    Reached,
    End(Phase),
    Done,
}

/// The three things done with nothing in flight, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Prefetch,
    Audits,
    Checkpoint,
}

/// One call to train: steps `base..base + batches.len()`, from position
/// `start`.
#[derive(Debug, Clone)]
pub struct StepLoop {
    w: Window,
    base: u64,
    first: u64,
    last: u64,
    at: At,
    /// The step whose openings are being fetched while steps run.
    prefetch: Option<u64>,
    /// Fetching openings while steps run is allowed (audits on, and no
    /// such fetch failed in this call).
    prefetching: bool,
}

impl StepLoop {
    /// The loop over `batches` (steps from `base`, the first `start`
    /// done), cut into `micro_batches`, at most `window` in flight;
    /// `prefetch` allows fetching openings while steps run (audits on).
    pub fn new(
        batches: &[Batch],
        base: u64,
        start: usize,
        micro_batches: usize,
        window: usize,
        prefetch: bool,
    ) -> Self {
        StepLoop {
            w: Window::new(batches, base, start, micro_batches, window),
            base,
            first: base + start as u64,
            last: base + batches.len() as u64,
            at: At::Begin,
            prefetch: None,
            prefetching: prefetch,
        }
    }

    /// The window (micro-batch rows and counts of each step).
    pub fn window(&self) -> &Window {
        &self.w
    }

    /// The next command. After [`Command::Wait`] it waits for
    /// [`StepLoop::on_reply`]: asked again, it says to wait again.
    pub fn poll(&mut self, g: &impl Gates) -> Command {
        loop {
            match self.at {
                At::Begin => {
                    self.at = At::Top;
                    if g.checkpoint_wanted(self.first) {
                        return Command::Checkpoint { step: self.first };
                    }
                }
                At::Top => {
                    self.at = if self.w.finished() {
                        At::Reached
                    } else if self.w.drained() && self.w.waiting() > self.first {
                        At::Between(Phase::Prefetch, self.w.waiting())
                    } else {
                        At::Send
                    };
                }
                At::Between(phase, step) => {
                    let (next, command) = self.quiet(phase, step, g, false);
                    self.at = next.map_or(At::Send, |p| At::Between(p, step));
                    if let Some(c) = command {
                        return c;
                    }
                }
                At::Send => {
                    let hold = |s: u64| g.checkpoint_wanted(s) || g.audit_due(s);
                    if let Some(index) = self.w.next_to_send(hold) {
                        self.w.sent(index);
                        let step = self.step_at(index);
                        return Command::Send { index, step };
                    }
                    self.at = At::Wait;
                }
                At::Wait => {
                    return Command::Wait {
                        expected: self.expected(),
                        step: self.w.waiting(),
                    };
                }
                At::Pop => {
                    if let Some((index, loss)) = self.w.pop_completed() {
                        let step = self.step_at(index);
                        return Command::Completed { index, step, loss };
                    }
                    self.at = At::Prefetch;
                }
                At::Prefetch => {
                    self.at = At::Top;
                    if self.prefetching && self.prefetch.is_none() {
                        if let Some(step) = g.oldest_audit() {
                            return Command::StartPrefetch { step };
                        }
                    }
                }
                At::Reached => {
                    self.at = At::End(Phase::Prefetch);
                    return Command::Reached { step: self.last };
                }
                At::End(phase) => {
                    let (next, command) = self.quiet(phase, self.last, g, true);
                    self.at = next.map_or(At::Done, At::End);
                    if let Some(c) = command {
                        return c;
                    }
                }
                At::Done => return Command::Finished,
            }
        }
    }

    /// One of the things done with nothing in flight at `step`: the
    /// phase after it and the command, if any. At the end the checkpoint
    /// is taken whenever checkpoints are on.
    fn quiet(
        &mut self,
        phase: Phase,
        step: u64,
        g: &impl Gates,
        end: bool,
    ) -> (Option<Phase>, Option<Command>) {
        match phase {
            Phase::Prefetch => (
                Some(Phase::Audits),
                self.prefetch.take().map(|p| Command::FinishPrefetch {
                    step: p,
                    waiting: step,
                }),
            ),
            Phase::Audits => (
                Some(Phase::Checkpoint),
                g.audits_queued().then_some(Command::RunAudits { step }),
            ),
            Phase::Checkpoint => {
                let take = if end {
                    g.checkpoints_on()
                } else {
                    g.checkpoint_wanted(step)
                };
                (None, take.then_some(Command::Checkpoint { step }))
            }
        }
    }

    fn step_at(&self, index: usize) -> u64 {
        self.base + index as u64
    }

    /// What reply `got` (to the last [`Command::Wait`]) is; a reply the
    /// wait did not ask for, or one for a step or micro-batch outside the
    /// call, is an error.
    pub fn on_reply(&mut self, got: Await) -> Result<Reply, DesignerError> {
        let expected = self.expected();
        let reply = match got {
            Await::Output { step, micro } => {
                let index = self.w.position(step)?;
                Reply::Output {
                    step,
                    micro,
                    index,
                    micros: self.w.micros(index),
                }
            }
            Await::Done { step, micro } => {
                let index = self.w.position(step)?;
                Reply::Done {
                    step,
                    micro,
                    micros: self.w.micros(index),
                }
            }
            Await::Opening { .. } if self.prefetch.is_some() => Reply::Opening,
            got => return Err(DesignerError::UnexpectedReply { expected, got }),
        };
        self.at = At::Pop;
        Ok(reply)
    }

    /// What a wait expects now.
    fn expected(&self) -> Expected {
        if self.prefetch.is_some() {
            Expected::StepOrOpening
        } else {
            Expected::Step
        }
    }

    /// The loss of micro-batch `micro` of `step`.
    pub fn on_loss(&mut self, step: u64, micro: u16, loss: f32) -> Result<(), BadReply> {
        self.w.on_loss(step, micro, loss)
    }

    /// The end of backward of a micro-batch of `step`.
    pub fn on_done(&mut self, step: u64) -> Result<(), BadReply> {
        self.w.on_done(step)
    }

    /// The fetch [`Command::StartPrefetch`] asked for started.
    pub fn prefetch_started(&mut self, step: u64) {
        self.prefetch = Some(step);
    }

    /// How the fetch of openings while steps run stands after a chunk.
    pub fn on_prefetch(&mut self, progress: PrefetchProgress) {
        match progress {
            PrefetchProgress::Pending => {}
            PrefetchProgress::Complete => self.prefetch = None,
            PrefetchProgress::Failed => {
                self.prefetch = None;
                self.prefetching = false;
            }
        }
    }
}

#[cfg(test)]
mod tests;
