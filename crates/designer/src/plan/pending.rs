//! Replies the designer waits for: every message it sends that is answered
//! carries a fresh [`ReplyId`] in its last routing block, and the answer
//! comes back with it ([`mixnn_wire::Header::reply_id`]).

use std::collections::HashMap;
use std::fmt;

use mixnn_wire::ReplyId;

/// What a reply answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Await {
    /// The init loop came back: every hop has the session.
    Init,
    /// The loss (or, with a kept last stage, the output) of a micro-batch.
    Output {
        /// The step.
        step: u64,
        /// The micro-batch.
        micro: u16,
    },
    /// The end of backward of a micro-batch.
    Done {
        /// The step.
        step: u64,
        /// The micro-batch.
        micro: u16,
    },
    /// The output of a micro-batch of a test batch.
    Test {
        /// The step the test runs at.
        step: u64,
        /// The test batch.
        batch: usize,
        /// The micro-batch.
        micro: u16,
    },
    /// A chunk of a hop's state.
    Chunk {
        /// The hop.
        hop: usize,
        /// The chunk.
        chunk: u32,
    },
    /// A hop loaded a chunk of a state.
    Loaded {
        /// The hop.
        hop: usize,
        /// The chunk.
        chunk: u32,
    },
    /// A loop from the first hop through the hops up to this one came
    /// back.
    Probe(usize),
    /// A loop from the last hop through the hops down to this one came
    /// back.
    ProbeFromLast(usize),
    /// A chunk of an audit opening.
    Opening {
        /// The hop.
        hop: usize,
        /// The chunk.
        chunk: u32,
    },
    /// The close passed every hop (the last acknowledges).
    Closed,
}

impl fmt::Display for Await {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Await::Init => write!(f, "init reply"),
            Await::Output { step, micro } => write!(f, "output of step {step}.{micro}"),
            Await::Done { step, micro } => write!(f, "end of backward of step {step}.{micro}"),
            Await::Test { batch, micro, .. } => write!(f, "test output {batch}.{micro}"),
            Await::Chunk { hop, chunk } => write!(f, "state chunk {chunk} of hop {hop}"),
            Await::Loaded { hop, chunk } => write!(f, "load of chunk {chunk} at hop {hop}"),
            Await::Probe(hop) => write!(f, "probe through hop {hop}"),
            Await::ProbeFromLast(hop) => write!(f, "probe from the last hop through hop {hop}"),
            Await::Opening { hop, chunk } => write!(f, "opening chunk {chunk} of hop {hop}"),
            Await::Closed => write!(f, "close acknowledgement"),
        }
    }
}

/// What the designer is waiting for when it waits for a reply: names the
/// wait in timeouts and unexpected replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    /// The init loop.
    Init,
    /// The losses and ends of backward of training steps.
    Step,
    /// The same, or a chunk of an audit opening fetched while steps are
    /// in flight.
    StepOrOpening,
    /// Test outputs.
    Test,
    /// State chunks (a fetch).
    State,
    /// Load acknowledgements.
    Load,
    /// Probes.
    Probe,
    /// Audit openings.
    Opening,
    /// The acknowledgement of a close.
    Close,
}

impl Expected {
    /// Words for the timeout error ("… while waiting for {what}").
    pub fn what(self) -> &'static str {
        match self {
            Expected::Init => "the init loop",
            Expected::Step => "the loss",
            Expected::StepOrOpening => "the loss or an audit opening",
            Expected::Test => "a test output",
            Expected::State => "the parameters",
            Expected::Load => "a state load",
            Expected::Probe => "a probe",
            Expected::Opening => "an audit opening",
            Expected::Close => "the close acknowledgement",
        }
    }

    /// Whether `got` answers this wait.
    pub fn matches(self, got: Await) -> bool {
        matches!(
            (self, got),
            (Expected::Init, Await::Init)
                | (Expected::Step, Await::Output { .. } | Await::Done { .. })
                | (
                    Expected::StepOrOpening,
                    Await::Output { .. } | Await::Done { .. } | Await::Opening { .. }
                )
                | (Expected::Test, Await::Test { .. })
                | (Expected::State, Await::Chunk { .. })
                | (Expected::Load, Await::Loaded { .. })
                | (Expected::Probe, Await::Probe(_) | Await::ProbeFromLast(_))
                | (Expected::Opening, Await::Opening { .. })
                | (Expected::Close, Await::Closed)
        )
    }
}

impl fmt::Display for Expected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.what())
    }
}

/// The replies the designer still waits for, by reply id. A reply whose id
/// is not here (a late answer of an abandoned session, of a probe that
/// already timed out, or a forgery) is dropped.
#[derive(Debug, Default)]
pub struct Pending(HashMap<ReplyId, Await>);

impl Pending {
    /// Expects a reply `rid` answering `what`.
    pub fn expect(&mut self, rid: ReplyId, what: Await) {
        self.0.insert(rid, what);
    }

    /// What `rid` answers, once: the id is forgotten.
    pub fn take(&mut self, rid: &ReplyId) -> Option<Await> {
        self.0.remove(rid)
    }

    /// Forgets the replies `abandoned` names; their ids.
    pub fn forget(&mut self, abandoned: impl Fn(Await) -> bool) -> Vec<ReplyId> {
        let ids: Vec<ReplyId> = self
            .0
            .iter()
            .filter(|(_, what)| abandoned(**what))
            .map(|(rid, _)| *rid)
            .collect();
        for rid in &ids {
            self.0.remove(rid);
        }
        ids
    }

    /// Forgets every reply (a new session).
    pub fn clear(&mut self) {
        self.0.clear();
    }

    /// Replies still awaited.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// No reply awaited.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_is_taken_once() {
        let mut p = Pending::default();
        p.expect(ReplyId([1; 16]), Await::Probe(3));
        assert_eq!(p.take(&ReplyId([2; 16])), None);
        assert_eq!(p.take(&ReplyId([1; 16])), Some(Await::Probe(3)));
        assert_eq!(p.take(&ReplyId([1; 16])), None);
    }

    #[test]
    fn waits_match_only_their_replies() {
        let out = Await::Output { step: 1, micro: 0 };
        assert!(Expected::Step.matches(out));
        assert!(Expected::Step.matches(Await::Done { step: 1, micro: 0 }));
        assert!(!Expected::Test.matches(out));
        assert!(!Expected::State.matches(Await::Opening { hop: 0, chunk: 0 }));
        assert!(!Expected::Step.matches(Await::Opening { hop: 0, chunk: 0 }));
        assert!(Expected::StepOrOpening.matches(Await::Opening { hop: 0, chunk: 0 }));
        assert!(Expected::StepOrOpening.matches(out));
        assert!(!Expected::StepOrOpening.matches(Await::Chunk { hop: 0, chunk: 0 }));
    }
}
