//! A hop's side of audits (Byzantine hops): it commits to every forward and
//! backward it runs ([`mixnn_proto::audit`]) and keeps the openings of its
//! last [`KEPT`] steps, so the designer can audit any of them after the
//! fact. An audit of an older step is refused (and the designer treats a
//! refusal as a failed audit).
//!
//! With the `adversary` feature (tests only), `crate::adversary` makes the
//! node misbehave.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use mixnn_model::stage::{Stage, StageState};
use mixnn_proto::audit::{commit_backward, commit_forward, digest_state, Opening};
use mixnn_proto::encode_state;
use mixnn_proto::trailer::{Slot, TrailerKeys};
use mixnn_wire::HopTag;

pub use mixnn_proto::audit::KEPT;

/// The commitments and openings of one session's stage.
pub(crate) struct Auditor {
    key: [u8; 32],
    /// The keys of this hop's trailer layer (its slot's tag and stream).
    trailer: TrailerKeys,
    /// The stage's state now (shared with the openings that start from
    /// it) and its digest.
    state: Arc<StageState>,
    digest: [u8; 32],
    /// Forwards waiting for their backward: step, state before, x, y.
    forwards: HashMap<HopTag, Kept>,
    openings: VecDeque<Kept>,
    /// The opening last encoded, with its step.
    encoded: Option<(u64, Vec<u8>)>,
}

/// An opening, with its state not yet encoded.
struct Kept {
    before: Arc<StageState>,
    opening: Opening,
}

impl Auditor {
    pub(crate) fn new(key: [u8; 32], stage: &Stage) -> Self {
        let mut a = Auditor {
            key,
            trailer: TrailerKeys::new(&key),
            state: Arc::new(StageState {
                steps: 0,
                tensors: Vec::new(),
            }),
            digest: [0; 32],
            forwards: HashMap::new(),
            openings: VecDeque::new(),
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
        self.encoded = None;
    }

    /// This hop's trailer keys.
    pub(crate) fn trailer_keys(&self) -> &TrailerKeys {
        &self.trailer
    }

    /// Records a forward of `step` (tag `tag`) and returns its slot: the
    /// digest of the state it ran on and its commitment.
    pub(crate) fn forward(&mut self, tag: HopTag, step: u64, x: &[u8], y: &[u8]) -> Slot {
        let c = commit_forward(&self.key, step, x, y, &self.digest);
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
            commitment: c,
        }
    }

    /// Records the backward of the forward under `tag`, after the stage
    /// applied (`applied`) or kept (micro-batches) its update; returns its
    /// commitment.
    pub(crate) fn backward(
        &mut self,
        tag: HopTag,
        step: u64,
        g_in: &[u8],
        g_out: &[u8],
        stage: &Stage,
        applied: bool,
    ) -> Slot {
        if applied {
            self.state = Arc::new(stage.state());
            self.digest = digest_state(&self.state);
        }
        let c = commit_backward(&self.key, step, g_in, g_out, &self.digest);
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
            commitment: c,
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
        if self.encoded.as_ref().is_none_or(|(at, _)| *at != step) {
            let k = self.openings.iter().find(|k| k.opening.step == step)?;
            let bytes = Opening {
                before: encode_state(&k.before),
                ..k.opening.clone()
            }
            .encode();
            self.encoded = Some((step, bytes));
        }
        self.encoded.as_ref().map(|(_, b)| b.as_slice())
    }
}
