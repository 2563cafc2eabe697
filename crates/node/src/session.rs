//! One cascade's session at a node: the stage it runs, the forward caches
//! waiting for their backward, the messages parked until their step, a
//! state being loaded, the last fetched state, the audit state, what it
//! holds against the node's budgets, and the ops that run on them
//! (forward, backward, load; chunks of fetches and openings).
//! [`crate::core::Core`] routes messages to these and checks the node-wide
//! limits first.

use std::collections::HashMap;
use std::time::Instant;

use mixnn_model::stage::{Stage, StageCache};
use mixnn_proto::trailer::{add_layer, check_received, SlotContext};
use mixnn_proto::ProtoError;
use mixnn_proto::{decode_state, BackwardNote, ChunkNote, ForwardNote, ParamChunk, SessionNote};
use mixnn_wire::{HopTag, PaddingPolicy, Peeled};

use crate::adversary::{Hooks, Pass};
use crate::audit::Auditor;
use crate::error::NodeError;
use crate::routes::Routes;

/// A message that came before its step (or its forward): run once the
/// stage gets there.
pub(crate) struct Parked {
    pub(crate) step: u64,
    pub(crate) peeled: Peeled,
    pub(crate) note: SessionNote,
    pub(crate) body: Vec<u8>,
}

/// A forward's cache, with its step and what it weighs.
pub(crate) struct Cached {
    pub(crate) step: u64,
    pub(crate) cache: StageCache,
    pub(crate) bytes: u64,
}

/// One cascade's session at this node.
pub(crate) struct NodeSession {
    pub(crate) stage: Stage,
    pub(crate) policy: PaddingPolicy,
    /// Where its messages may go, and who may send them.
    pub(crate) routes: Routes,
    /// The link key its init arrived over.
    pub(crate) opened_by: [u8; 32],
    /// When a message of it last arrived.
    pub(crate) last_active: Instant,
    /// The stage's parameters, and what they count against the node's
    /// parameter budget (more when audited).
    pub(crate) params: u64,
    pub(crate) weight: u64,
    pub(crate) caches: HashMap<HopTag, Cached>,
    /// Bytes of `caches`.
    pub(crate) cached_bytes: u64,
    pub(crate) parked: Vec<Parked>,
    /// Body bytes of `parked`.
    pub(crate) parked_bytes: u64,
    /// Chunks of a state being loaded (crash recovery).
    pub(crate) loading: Vec<u8>,
    /// The encoded state last fetched and the step it is of: a fetch asks
    /// for it chunk by chunk, and the state changes only with the step (or
    /// a load, which clears this).
    pub(crate) fetched: Option<(u64, Vec<u8>)>,
    /// Commitments and openings, when the designer audits this session.
    pub(crate) auditor: Option<Auditor>,
    /// Seals fetch and audit answers and opens loads
    /// ([`mixnn_proto::reply`]).
    pub(crate) reply_key: mixnn_proto::reply::ReplyKey,
    /// Cells of its init, and cells received and sent for it since: what
    /// it may make the node send ([`crate::limits::answer_allowance`]).
    pub(crate) init_cells: u64,
    pub(crate) received: u64,
    pub(crate) sent: u64,
    /// The link keys a message of it has come from: its messages to a
    /// neighbour count for that link's cover size only once the neighbour
    /// has shown it holds the session too ([`crate::cover`]).
    pub(crate) heard: Vec<[u8; 32]>,
}

impl NodeSession {
    /// Bytes this session holds beyond its parameters: caches, parked
    /// bodies and the gradients of micro-batches not yet applied.
    pub(crate) fn held(&self) -> u64 {
        let grads = (self.stage.pending_micros() as u64)
            .saturating_mul(self.params)
            .saturating_mul(4);
        let audit = self.auditor.as_ref().map_or(0, Auditor::bytes);
        self.cached_bytes
            .saturating_add(self.parked_bytes)
            .saturating_add(grads)
            .saturating_add(audit)
    }

    /// Everything this session makes the node hold: its stage (parameters
    /// and momentum, and with audits the states of its last steps, as its
    /// weight counts them), what [`NodeSession::held`] counts, and a state
    /// fetched or being loaded.
    pub(crate) fn footprint(&self) -> u64 {
        let fetched = self.fetched.as_ref().map_or(0, |(_, b)| b.len() as u64);
        self.weight
            .saturating_mul(8)
            .saturating_add(self.held())
            .saturating_add(fetched)
            .saturating_add(self.loading.len() as u64)
    }

    /// Records a message of `cells` cells from the link with key `from`.
    pub(crate) fn heard_from(&mut self, from: [u8; 32], cells: usize) {
        self.received = self.received.saturating_add(cells as u64);
        if !self.heard.contains(&from) {
            self.heard.push(from);
        }
    }

    /// Counts a message of `cells` cells this session makes the node
    /// send, if its allowance has room for it.
    pub(crate) fn spend(&mut self, cells: usize) -> Result<(), NodeError> {
        self.affords(cells)?;
        self.sent = self.sent.saturating_add(cells as u64);
        Ok(())
    }

    /// Whether this session's allowance has room for a message of
    /// `cells` cells.
    pub(crate) fn affords(&self, cells: usize) -> Result<(), NodeError> {
        let allowed = crate::limits::answer_allowance(self.received, self.init_cells);
        let after = self.sent.saturating_add(cells as u64);
        if after > allowed {
            return Err(NodeError::Limit(format!(
                "the session would send {after} cells, having sent {} (and an init of {}): at most {} × what it sent plus {} × its init",
                self.received,
                self.init_cells,
                crate::limits::ANSWER_RATIO,
                crate::limits::ANSWER_INITS
            )));
        }
        Ok(())
    }

    /// After the stage moved to a new step: forward caches (and audit
    /// records) of steps before it can never get their backward (a
    /// backward of a past step is refused), so they go.
    pub(crate) fn drop_past_forwards(&mut self) {
        let at = self.stage.steps();
        let mut freed = 0u64;
        self.caches.retain(|_, c| {
            let keep = c.step >= at;
            if !keep {
                freed = freed.saturating_add(c.bytes);
            }
            keep
        });
        self.cached_bytes = self.cached_bytes.saturating_sub(freed);
        if let Some(a) = self.auditor.as_mut() {
            a.drop_forwards_before(at);
        }
    }
}

/// An id (a session id, a link key) as logs and errors show it: its
/// per-process alias (`#c01d77`, [`mixnn_net::alias`]), never its bytes,
/// so that no log line can be joined with another process's on it.
pub(crate) fn short(bytes: &[u8]) -> String {
    mixnn_net::alias::id(bytes).tag().to_string()
}

/// The test adversary, if any (feature `adversary`), as the hooks see it.
#[cfg(feature = "adversary")]
pub(crate) type MaybeAdversary = Option<crate::adversary::Adversary>;
/// No test adversary (builds without the `adversary` feature).
#[cfg(not(feature = "adversary"))]
pub(crate) type MaybeAdversary = crate::adversary::NoAdversary;

/// Runs a training forward (admitted by the core), with its commitment
/// when audited; returns the answer and the cache to keep once the answer
/// is on its way.
pub(crate) fn forward(
    s: &mut NodeSession,
    tag: HopTag,
    note: &ForwardNote,
    body: &[u8],
    trailer: &[u8],
    adversary: &MaybeAdversary,
) -> Result<(Vec<u8>, Cached), NodeError> {
    let step = note.step;
    let ctx = SlotContext {
        step,
        pass: Pass::Forward,
        index: u32::from(note.micro.index()),
    };
    // A trailer changed on its way is refused before any math.
    if let Some(a) = &s.auditor {
        check_received(a.trailer_keys(), &ctx, trailer).map_err(ProtoError::from)?;
    }
    let body = adversary.input(step, Pass::Forward, body.to_vec());
    let loss = s.stage.spec().is_loss();
    let labels = loss.then_some(note.labels.as_slice());
    let micro = mixnn_model::stage::Micro {
        index: u32::from(note.micro.index()),
        batch_rows: note.batch_rows as usize,
    };
    let (y, cache) = s.stage.forward_step_bytes(&body, labels, micro)?;
    let y = adversary.computed(step, Pass::Forward, y);
    let cached = Cached {
        step,
        bytes: cache.bytes() as u64,
        cache,
    };
    let y = match s.auditor.as_mut() {
        Some(a) => {
            let mut slot = a.forward(tag, step, &body, &y);
            adversary.slot(step, Pass::Forward, &mut slot);
            let mut trailer = trailer.to_vec();
            adversary.received_trailer(step, Pass::Forward, &mut trailer);
            let layer =
                add_layer(a.trailer_keys(), &ctx, &slot, &trailer).map_err(ProtoError::from)?;
            let y = adversary.sent(step, Pass::Forward, y, loss);
            with_layer(y, layer)
        }
        None => adversary.sent(step, Pass::Forward, y, loss),
    };
    let y = adversary.body_out(step, Pass::Forward, y, loss);
    Ok((y, cached))
}

/// Runs a backward (admitted by the core) on the cache of its forward;
/// applies the update once the step's last micro-batch is in; returns the
/// body to send on.
pub(crate) fn backward(
    s: &mut NodeSession,
    tag: HopTag,
    cache: StageCache,
    note: &BackwardNote,
    body: &[u8],
    trailer: &[u8],
    adversary: &MaybeAdversary,
) -> Result<Vec<u8>, NodeError> {
    let step = note.step;
    let ctx = SlotContext {
        step,
        pass: Pass::Backward,
        index: u32::from(note.micro.index()),
    };
    if let Some(a) = &s.auditor {
        check_received(a.trailer_keys(), &ctx, trailer).map_err(ProtoError::from)?;
    }
    let body = adversary.input(step, Pass::Backward, body.to_vec());
    let grad = (!body.is_empty()).then_some(body.as_slice());
    let dx = s
        .stage
        .backward_micro_bytes(
            cache,
            grad,
            note.need_input_grad,
            u32::from(note.micro.index()),
        )?
        .unwrap_or_default();
    let dx = adversary.computed(step, Pass::Backward, dx);
    // The update waits for the gradients of every micro-batch of the step.
    let applied = s.stage.pending_micros() >= usize::from(note.micro.count());
    if applied {
        adversary.apply(step, &mut s.stage);
    }
    let out = match s.auditor.as_mut() {
        Some(a) => {
            let mut slot = a.backward(tag, &body, &dx, &s.stage, applied);
            adversary.slot(step, Pass::Backward, &mut slot);
            let mut trailer = trailer.to_vec();
            adversary.received_trailer(step, Pass::Backward, &mut trailer);
            let layer =
                add_layer(a.trailer_keys(), &ctx, &slot, &trailer).map_err(ProtoError::from)?;
            let out = with_layer(adversary.sent(step, Pass::Backward, dx, false), layer);
            if applied {
                adversary.between_steps(step, &mut s.stage, a);
            }
            out
        }
        None => adversary.sent(step, Pass::Backward, dx, false),
    };
    if applied {
        s.drop_past_forwards();
    }
    Ok(adversary.body_out(step, Pass::Backward, out, false))
}

/// Runs a test forward (admitted by the core), with its commitment when
/// audited; returns the body to send on.
pub(crate) fn test(
    s: &mut NodeSession,
    step: u64,
    batch: u32,
    body: &[u8],
    trailer: &[u8],
    adversary: &MaybeAdversary,
) -> Result<Vec<u8>, NodeError> {
    let ctx = SlotContext {
        step,
        pass: Pass::Test,
        index: batch,
    };
    if let Some(a) = &s.auditor {
        check_received(a.trailer_keys(), &ctx, trailer).map_err(ProtoError::from)?;
    }
    adversary.before_test(step, &mut s.stage, s.auditor.as_mut());
    let body = adversary.input(step, Pass::Test, body.to_vec());
    let y = adversary.computed(step, Pass::Test, s.stage.eval_bytes(&body)?);
    let out = match s.auditor.as_mut() {
        Some(a) => {
            let mut slot = a.test(step, batch, &body, &y);
            adversary.slot(step, Pass::Test, &mut slot);
            let mut trailer = trailer.to_vec();
            adversary.received_trailer(step, Pass::Test, &mut trailer);
            let layer =
                add_layer(a.trailer_keys(), &ctx, &slot, &trailer).map_err(ProtoError::from)?;
            with_layer(adversary.sent(step, Pass::Test, y, false), layer)
        }
        None => adversary.sent(step, Pass::Test, y, false),
    };
    Ok(adversary.body_out(step, Pass::Test, out, false))
}

/// `payload ‖ trailer`: what an audited hop sends on.
fn with_layer(mut payload: Vec<u8>, trailer: Vec<u8>) -> Vec<u8> {
    payload.extend_from_slice(&trailer);
    payload
}

/// Chunk `chunk` of `all` (a state or an opening), as big as a message
/// under `policy` carries, with the total length.
pub(crate) fn state_chunk(all: &[u8], chunk: u32, policy: &PaddingPolicy) -> Vec<u8> {
    let room = mixnn_proto::chunk_room(policy.max_body());
    let start = (chunk as usize).saturating_mul(room).min(all.len());
    let end = start.saturating_add(room).min(all.len());
    ParamChunk {
        total: all.len() as u32,
        bytes: all[start..end].to_vec(),
    }
    .encode()
}

/// Adds one chunk of a state to load; loads it once complete. The designer
/// sends the chunks in order, while no step is in flight.
pub(crate) fn load_chunk(
    s: &mut NodeSession,
    note: &ChunkNote,
    body: &[u8],
    adversary: &MaybeAdversary,
) -> Result<(), NodeError> {
    let chunk = ParamChunk::decode(body)?;
    // Weights and optimiser buffers (f32 each), with room for names and
    // shapes; from the stage's description, without encoding anything.
    let bound = mixnn_proto::state_bound(s.stage.spec(), s.stage.optimizer());
    if chunk.total as usize > bound {
        return Err(NodeError::Refused(format!(
            "a state of {} bytes for a stage of at most {bound}",
            chunk.total
        )));
    }
    if note.chunk == 0 {
        s.loading.clear();
    } else if s.loading.is_empty() {
        return Err(NodeError::Refused(format!(
            "state chunk {} without chunk 0",
            note.chunk
        )));
    }
    s.loading.extend_from_slice(&chunk.bytes);
    if s.loading.len() > chunk.total as usize {
        s.loading.clear();
        return Err(NodeError::Refused(
            "state chunks longer than announced".into(),
        ));
    }
    if s.loading.len() == chunk.total as usize {
        let state = decode_state(&std::mem::take(&mut s.loading))?;
        s.stage.load_state(&state)?;
        if let Some(a) = s.auditor.as_mut() {
            a.reset(&s.stage);
        }
        adversary.after_load(&mut s.stage, s.auditor.as_mut());
        s.caches.clear();
        s.cached_bytes = 0;
        s.parked.clear();
        s.parked_bytes = 0;
        s.fetched = None;
        tracing::info!(step = state.steps, "stage state loaded");
    }
    Ok(())
}
