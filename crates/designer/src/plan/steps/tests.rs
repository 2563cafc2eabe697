#![allow(clippy::unwrap_used)]

use std::collections::{BTreeSet, VecDeque};

use super::*;

use crate::plan::window::test_batches as batches;

/// The checkpoint policy and the audit queue, as plain data a test sets.
#[derive(Default)]
struct Fake {
    /// A checkpoint is wanted every K steps.
    every: Option<u64>,
    /// The step of the last checkpoint taken (none is wanted twice).
    taken: Option<u64>,
    /// Steps before which an audit is due.
    due: BTreeSet<u64>,
    /// Steps with audits waiting.
    queued: BTreeSet<u64>,
    /// Completing step S queues an audit of S.
    audit_steps: BTreeSet<u64>,
}

impl Gates for Fake {
    fn checkpoint_wanted(&self, step: u64) -> bool {
        self.every.is_some_and(|k| step.is_multiple_of(k)) && self.taken != Some(step)
    }
    fn checkpoints_on(&self) -> bool {
        self.every.is_some()
    }
    fn audit_due(&self, step: u64) -> bool {
        self.due.contains(&step)
    }
    fn audits_queued(&self) -> bool {
        !self.queued.is_empty()
    }
    fn oldest_audit(&self) -> Option<u64> {
        self.queued.first().copied()
    }
}

/// An honest cascade and session around the core: sends queue each
/// micro-batch's output and end of backward, waits answer the oldest
/// reply (or the prefetched openings, `opening_chunks` of them, first),
/// and every quiet command checks that nothing is in flight.
struct Harness {
    core: StepLoop,
    fake: Fake,
    replies: VecDeque<Await>,
    in_flight: usize,
    opening_chunks: usize,
    chunks_left: usize,
    fail_prefetch: bool,
    /// Waits answer opening chunks before step replies (else only when
    /// no step reply is left).
    openings_first: bool,
    trace: Vec<Command>,
}

impl Harness {
    fn new(core: StepLoop, fake: Fake) -> Self {
        Harness {
            core,
            fake,
            replies: VecDeque::new(),
            in_flight: 0,
            opening_chunks: 1,
            chunks_left: 0,
            fail_prefetch: false,
            openings_first: true,
            trace: Vec::new(),
        }
    }

    /// Runs to the end; the commands, in order.
    fn run(mut self) -> (Vec<Command>, Fake) {
        for _ in 0..10_000 {
            let c = self.core.poll(&self.fake);
            self.trace.push(c);
            match c {
                Command::Checkpoint { step } => {
                    assert_eq!(
                        self.in_flight, 0,
                        "checkpoint at {step} with steps in flight"
                    );
                    self.fake.taken = Some(step);
                }
                Command::RunAudits { step } => {
                    assert_eq!(self.in_flight, 0, "audits at {step} with steps in flight");
                    self.fake.queued.clear();
                }
                Command::FinishPrefetch { step, .. } => {
                    assert_eq!(
                        self.in_flight, 0,
                        "finishing a prefetch with steps in flight"
                    );
                    self.fake.queued.remove(&step);
                    self.chunks_left = 0;
                }
                Command::Send { index, step } => {
                    self.in_flight += 1;
                    for micro in 0..self.core.window().micros(index) as u16 {
                        self.replies.push_back(Await::Output { step, micro });
                        self.replies.push_back(Await::Done { step, micro });
                    }
                }
                Command::Wait { expected, .. } => {
                    let opening =
                        self.chunks_left > 0 && (self.openings_first || self.replies.is_empty());
                    let got = if opening {
                        assert_eq!(expected, Expected::StepOrOpening);
                        self.chunks_left -= 1;
                        Await::Opening { hop: 0, chunk: 0 }
                    } else {
                        self.replies
                            .pop_front()
                            .expect("a wait with nothing to come")
                    };
                    match self.core.on_reply(got).unwrap() {
                        Reply::Output { step, micro, .. } => {
                            self.core.on_loss(step, micro, 1.0).unwrap();
                        }
                        Reply::Done { step, .. } => self.core.on_done(step).unwrap(),
                        Reply::Opening => {
                            let progress = if self.fail_prefetch {
                                self.chunks_left = 0;
                                PrefetchProgress::Failed
                            } else if self.chunks_left == 0 {
                                PrefetchProgress::Complete
                            } else {
                                PrefetchProgress::Pending
                            };
                            if progress == PrefetchProgress::Complete {
                                self.fake.queued.pop_first();
                            }
                            self.core.on_prefetch(progress);
                        }
                    }
                }
                Command::Completed { step, .. } => {
                    self.in_flight -= 1;
                    if self.fake.audit_steps.contains(&step) {
                        self.fake.queued.insert(step);
                    }
                }
                Command::StartPrefetch { step } => {
                    assert_eq!(self.fake.oldest_audit(), Some(step));
                    self.core.prefetch_started(step);
                    self.chunks_left = self.opening_chunks;
                }
                Command::Reached { .. } => assert_eq!(self.in_flight, 0),
                Command::Finished => return (self.trace, self.fake),
            }
        }
        panic!("the loop did not finish: {:?}", &self.trace[..40]);
    }
}

fn sends(trace: &[Command]) -> Vec<u64> {
    trace
        .iter()
        .filter_map(|c| match c {
            Command::Send { step, .. } => Some(*step),
            _ => None,
        })
        .collect()
}

fn completed(trace: &[Command]) -> Vec<(usize, u64, f32)> {
    trace
        .iter()
        .filter_map(|c| match c {
            Command::Completed { index, step, loss } => Some((*index, *step, *loss)),
            _ => None,
        })
        .collect()
}

fn quiet(trace: &[Command]) -> Vec<Command> {
    trace
        .iter()
        .filter(|c| {
            matches!(
                c,
                Command::Checkpoint { .. }
                    | Command::RunAudits { .. }
                    | Command::FinishPrefetch { .. }
                    | Command::StartPrefetch { .. }
            )
        })
        .copied()
        .collect()
}

#[test]
fn a_plain_call_fills_the_window_and_reports_every_step_in_order() {
    let b = batches(4, 4);
    let core = StepLoop::new(&b, 10, 0, 2, 3, false);
    let (trace, _) = Harness::new(core, Fake::default()).run();
    // Three go out before the first wait; the fourth when the first is back.
    assert!(matches!(
        trace[3],
        Command::Wait {
            step: 10,
            expected: Expected::Step
        }
    ));
    assert_eq!(sends(&trace[..3]), [10, 11, 12]);
    assert_eq!(sends(&trace), [10, 11, 12, 13]);
    // Two micro-batches of loss 1.0 each: the batch loss is their sum.
    assert_eq!(
        completed(&trace),
        [(0, 10, 2.0), (1, 11, 2.0), (2, 12, 2.0), (3, 13, 2.0)]
    );
    assert!(quiet(&trace).is_empty(), "{trace:?}");
    assert_eq!(
        trace[trace.len() - 2..],
        [Command::Reached { step: 14 }, Command::Finished]
    );
}

#[test]
fn checkpoints_are_taken_with_nothing_in_flight_and_at_the_end() {
    let b = batches(5, 2);
    let core = StepLoop::new(&b, 0, 0, 1, 4, false);
    let fake = Fake {
        every: Some(2),
        ..Fake::default()
    };
    let (trace, _) = Harness::new(core, fake).run();
    assert_eq!(
        quiet(&trace),
        [
            Command::Checkpoint { step: 0 },
            Command::Checkpoint { step: 2 },
            Command::Checkpoint { step: 4 },
            Command::Checkpoint { step: 5 },
        ]
    );
    // Step 2 waits for steps 0 and 1 (a checkpoint is due before it).
    let at = trace
        .iter()
        .position(|c| *c == Command::Checkpoint { step: 2 })
        .unwrap();
    assert_eq!(sends(&trace[..at]), [0, 1]);
    assert_eq!(completed(&trace).len(), 5);
}

#[test]
fn a_resumed_call_starts_at_its_position() {
    let b = batches(4, 2);
    let core = StepLoop::new(&b, 10, 2, 1, 4, false);
    let fake = Fake {
        every: Some(2),
        taken: Some(12),
        ..Fake::default()
    };
    let (trace, _) = Harness::new(core, fake).run();
    assert_eq!(sends(&trace), [12, 13]);
    assert_eq!(completed(&trace), [(2, 12, 1.0), (3, 13, 1.0)]);
    // The checkpoint it resumed from is not taken again; the end's is.
    assert_eq!(quiet(&trace), [Command::Checkpoint { step: 14 }]);
}

#[test]
fn an_audit_due_drains_the_window_and_the_audits_run_between_steps() {
    let b = batches(4, 2);
    let core = StepLoop::new(&b, 0, 0, 1, 4, false);
    let fake = Fake {
        due: [2].into(),
        audit_steps: [1].into(),
        ..Fake::default()
    };
    let (trace, fake) = Harness::new(core, fake).run();
    let at = trace
        .iter()
        .position(|c| *c == Command::RunAudits { step: 2 })
        .unwrap();
    assert_eq!(sends(&trace[..at]), [0, 1], "step 2 waits for the audit");
    assert_eq!(completed(&trace[..at]).len(), 2);
    assert_eq!(quiet(&trace), [Command::RunAudits { step: 2 }]);
    assert!(fake.queued.is_empty());
}

#[test]
fn openings_are_fetched_while_steps_run_and_finished_with_nothing_in_flight() {
    let b = batches(6, 2);
    let core = StepLoop::new(&b, 0, 0, 1, 3, true);
    let fake = Fake {
        audit_steps: [0].into(),
        ..Fake::default()
    };
    let mut h = Harness::new(core, fake);
    h.opening_chunks = 2;
    let (trace, fake) = h.run();
    // Fetched while steps 1.. run, as soon as step 0 completed.
    let start = trace
        .iter()
        .position(|c| *c == Command::StartPrefetch { step: 0 })
        .unwrap();
    assert_eq!(completed(&trace[..start]), [(0, 0, 1.0)]);
    // The next wait also takes openings.
    assert!(trace[start..].iter().any(|c| matches!(
        c,
        Command::Wait {
            expected: Expected::StepOrOpening,
            ..
        }
    )));
    assert_eq!(quiet(&trace), [Command::StartPrefetch { step: 0 }]);
    assert!(fake.queued.is_empty(), "the prefetched audits ran");
}

#[test]
fn a_prefetch_still_running_when_steps_drain_is_finished_then() {
    let b = batches(3, 2);
    let core = StepLoop::new(&b, 0, 0, 1, 2, true);
    let fake = Fake {
        audit_steps: [0].into(),
        ..Fake::default()
    };
    let mut h = Harness::new(core, fake);
    // Step replies come first: the fetch outlives the steps.
    h.openings_first = false;
    let (trace, _) = h.run();
    let reached = trace
        .iter()
        .position(|c| *c == Command::Reached { step: 3 })
        .unwrap();
    assert_eq!(
        trace[reached + 1],
        Command::FinishPrefetch {
            step: 0,
            waiting: 3
        }
    );
}

#[test]
fn a_failed_prefetch_is_not_tried_again_in_the_call() {
    let b = batches(6, 2);
    let core = StepLoop::new(&b, 0, 0, 1, 3, true);
    let fake = Fake {
        audit_steps: [0, 3].into(),
        ..Fake::default()
    };
    let mut h = Harness::new(core, fake);
    h.fail_prefetch = true;
    let (trace, fake) = h.run();
    let starts: Vec<&Command> = trace
        .iter()
        .filter(|c| matches!(c, Command::StartPrefetch { .. }))
        .collect();
    assert_eq!(starts, [&Command::StartPrefetch { step: 0 }]);
    // The audits wait for a quiet moment instead.
    assert!(
        quiet(&trace).contains(&Command::RunAudits { step: 6 }),
        "{trace:?}"
    );
    assert!(fake.queued.is_empty());
}

#[test]
fn an_opening_nobody_fetched_is_an_unexpected_reply() {
    let b = batches(2, 2);
    let mut core = StepLoop::new(&b, 0, 0, 1, 2, true);
    let fake = Fake::default();
    assert_eq!(core.poll(&fake), Command::Send { index: 0, step: 0 });
    assert_eq!(core.poll(&fake), Command::Send { index: 1, step: 1 });
    assert_eq!(
        core.poll(&fake),
        Command::Wait {
            expected: Expected::Step,
            step: 0
        }
    );
    let got = Await::Opening { hop: 1, chunk: 0 };
    assert!(matches!(
        core.on_reply(got),
        Err(DesignerError::UnexpectedReply {
            expected: Expected::Step,
            got: Await::Opening { hop: 1, chunk: 0 }
        })
    ));
    // Asked again, it still waits.
    assert!(matches!(core.poll(&fake), Command::Wait { .. }));
}

#[test]
fn replies_for_steps_outside_the_call_are_bad() {
    let b = batches(2, 2);
    let mut core = StepLoop::new(&b, 5, 0, 1, 2, false);
    let fake = Fake::default();
    while !matches!(core.poll(&fake), Command::Wait { .. }) {}
    for step in [4, 7] {
        assert!(matches!(
            core.on_reply(Await::Output { step, micro: 0 }),
            Err(DesignerError::BadReply(BadReply::Step { step: s })) if s == step
        ));
    }
    assert!(matches!(
        core.on_reply(Await::Test {
            step: 5,
            batch: 0,
            micro: 0
        }),
        Err(DesignerError::UnexpectedReply { .. })
    ));
    assert_eq!(
        core.on_loss(5, 3, 1.0),
        Err(BadReply::MicroBatch { step: 5, micro: 3 })
    );
}
