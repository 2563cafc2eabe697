//! A hop's side of audits (Byzantine hops): it commits to every forward,
//! backward and test it runs ([`mixnn_proto::audit`]: the digest of its
//! state and the hashes of what it received and sends) and keeps the
//! openings of its last [`KEPT`] steps and test batches, so the designer
//! can audit any of them after the fact. An audit of an older one is
//! refused (and the designer treats a refusal as a failed audit).
//!
//! With the `adversary` feature (tests only), `crate::adversary` makes the
//! node misbehave.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use mixnn_model::stage::{Stage, StageState};
use mixnn_proto::audit::{digest_state, hash_tensor, Opening};
use mixnn_proto::encode_state;
use mixnn_proto::trailer::{Slot, TrailerKeys};
use mixnn_wire::HopTag;

pub use mixnn_proto::audit::KEPT;

/// What an opening is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Of {
    Step(u64),
    Test(u64, u32),
}

/// The commitments and openings of one session's stage.
pub(crate) struct Auditor {
    /// The keys of this hop's trailer layer (its slot's tag, stream and
    /// tail).
    trailer: TrailerKeys,
    /// The stage's state now (shared with the openings that start from
    /// it) and its digest.
    state: Arc<StageState>,
    digest: [u8; 32],
    /// Forwards waiting for their backward: step, state before, x, y.
    forwards: HashMap<HopTag, Kept>,
    openings: VecDeque<Kept>,
    /// Openings of test batches, the last [`KEPT`].
    tests: VecDeque<(u32, Kept)>,
    /// The opening last encoded.
    encoded: Option<(Of, Vec<u8>)>,
}

/// An opening, with its state not yet encoded.
struct Kept {
    before: Arc<StageState>,
    opening: Opening,
}

impl Kept {
    fn encode(&self) -> Vec<u8> {
        Opening {
            before: encode_state(&self.before),
            ..self.opening.clone()
        }
        .encode()
    }
}

impl Auditor {
    pub(crate) fn new(key: [u8; 32], stage: &Stage) -> Self {
        let mut a = Auditor {
            trailer: TrailerKeys::new(&key),
            state: Arc::new(StageState {
                steps: 0,
                tensors: Vec::new(),
            }),
            digest: [0; 32],
            forwards: HashMap::new(),
            openings: VecDeque::new(),
            tests: VecDeque::new(),
            encoded: None,
        };
        a.reset(stage);
        a
    }

    /// After a state load: the state is new, past steps are gone.
    pub(crate) fn reset(&mut self, stage: &Stage) {
        self.state = Arc::new(stage.state());
        self.digest = digest_state(&self.state);
        self.forwards.clear();
        self.openings.clear();
        self.tests.clear();
        self.encoded = None;
    }

    /// This hop's trailer keys.
    pub(crate) fn trailer_keys(&self) -> &TrailerKeys {
        &self.trailer
    }

    /// Records a forward of `step` (tag `tag`) and returns its slot: the
    /// digest of the state it ran on and the hashes of `x` and `y`.
    pub(crate) fn forward(&mut self, tag: HopTag, step: u64, x: &[u8], y: &[u8]) -> Slot {
        // The designer keeps few steps in flight; a forward whose backward
        // never comes is dropped with the oldest.
        if self.forwards.len() >= 4 * KEPT {
            self.forwards.clear();
        }
        self.forwards.insert(
            tag,
            Kept {
                before: Arc::clone(&self.state),
                opening: Opening {
                    step,
                    before: Vec::new(),
                    x: x.to_vec(),
                    y: y.to_vec(),
                    g_in: Vec::new(),
                    g_out: Vec::new(),
                    after: [0; 32],
                },
            },
        );
        Slot {
            digest: self.digest,
            input: hash_tensor(x),
            output: hash_tensor(y),
        }
    }

    /// Records the backward of the forward under `tag`, after the stage
    /// applied (`applied`) or kept (micro-batches) its update; returns its
    /// slot: the digest of the state it left, the hashes of the gradients.
    pub(crate) fn backward(
        &mut self,
        tag: HopTag,
        g_in: &[u8],
        g_out: &[u8],
        stage: &Stage,
        applied: bool,
    ) -> Slot {
        if applied {
            self.state = Arc::new(stage.state());
            self.digest = digest_state(&self.state);
        }
        if let Some(mut k) = self.forwards.remove(&tag) {
            k.opening.g_in = g_in.to_vec();
            k.opening.g_out = g_out.to_vec();
            k.opening.after = self.digest;
            self.openings.push_back(k);
            while self.openings.len() > KEPT {
                self.openings.pop_front();
            }
        }
        Slot {
            digest: self.digest,
            input: hash_tensor(g_in),
            output: hash_tensor(g_out),
        }
    }

    /// Forgets the forwards of steps before `step`: their backward can no
    /// longer come, and each would pin the state it ran on (before, an
    /// audited session that sent forwards without their backward pinned up
    /// to 64 states while the budget counted 17).
    pub(crate) fn drop_forwards_before(&mut self, step: u64) {
        self.forwards.retain(|_, k| k.opening.step >= step);
    }

    /// Bytes of the tensors it keeps (forwards waiting for their backward,
    /// openings, the opening last encoded); the states they start from are
    /// counted in the session's weight (`2 + KEPT` states: the live stage,
    /// its state now and the one before each kept step).
    pub(crate) fn bytes(&self) -> u64 {
        let fwd: usize = self
            .forwards
            .values()
            .map(|k| k.opening.x.len() + k.opening.y.len())
            .sum();
        let kept: usize = self
            .openings
            .iter()
            .map(|k| {
                let o = &k.opening;
                o.x.len() + o.y.len() + o.g_in.len() + o.g_out.len()
            })
            .sum();
        let tests: usize = self
            .tests
            .iter()
            .map(|(_, k)| k.opening.x.len() + k.opening.y.len())
            .sum();
        let encoded = self.encoded.as_ref().map_or(0, |(_, b)| b.len());
        (fwd + kept + tests + encoded) as u64
    }

    /// Records test batch `batch` at `step` (input `x`, output `y`) and
    /// returns its slot.
    pub(crate) fn test(&mut self, step: u64, batch: u32, x: &[u8], y: &[u8]) -> Slot {
        self.tests
            .retain(|(b, k)| !(*b == batch && k.opening.step == step));
        self.tests.push_back((
            batch,
            Kept {
                before: Arc::clone(&self.state),
                opening: Opening {
                    step,
                    before: Vec::new(),
                    x: x.to_vec(),
                    y: y.to_vec(),
                    g_in: Vec::new(),
                    g_out: Vec::new(),
                    after: self.digest,
                },
            },
        ));
        while self.tests.len() > KEPT {
            self.tests.pop_front();
        }
        Slot {
            digest: self.digest,
            input: hash_tensor(x),
            output: hash_tensor(y),
        }
    }
    /// The digest of the state now (a test adversary).
    #[cfg(feature = "adversary")]
    pub(crate) fn digest(&self) -> [u8; 32] {
        self.digest
    }

    /// The stage's state changed outside a step (a test adversary): what
    /// the next forward runs on, and commits to, is the stage as it is now.
    #[cfg(feature = "adversary")]
    pub(crate) fn resync(&mut self, stage: &Stage) {
        self.state = Arc::new(stage.state());
        self.digest = digest_state(&self.state);
    }

    /// The encoded opening of `step`, if still kept. The designer asks for
    /// it chunk by chunk, so the last one encoded is kept too.
    pub(crate) fn opening(&mut self, step: u64) -> Option<&[u8]> {
        if self
            .encoded
            .as_ref()
            .is_none_or(|(of, _)| *of != Of::Step(step))
        {
            let k = self.openings.iter().find(|k| k.opening.step == step)?;
            self.encoded = Some((Of::Step(step), k.encode()));
        }
        self.encoded.as_ref().map(|(_, b)| b.as_slice())
    }

    /// The encoded opening of test batch `batch` at `step`, if still kept.
    pub(crate) fn test_opening(&mut self, step: u64, batch: u32) -> Option<&[u8]> {
        let of = Of::Test(step, batch);
        if self.encoded.as_ref().is_none_or(|(o, _)| *o != of) {
            let (_, k) = self
                .tests
                .iter()
                .find(|(b, k)| *b == batch && k.opening.step == step)?;
            self.encoded = Some((of, k.encode()));
        }
        self.encoded.as_ref().map(|(_, b)| b.as_slice())
    }
}
