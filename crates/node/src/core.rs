//! The node's protocol state machine: no sockets, no clocks. The I/O layer
//! hands it each message with the link key it arrived on and sends what it
//! returns.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;

use mixnn_model::stage::{Stage, StageCache};
use mixnn_proto::{
    decode_state, encode_state, BackwardNote, ChunkNote, ForwardNote, InitNote, ParamChunk,
    SessionNote,
};
use mixnn_wire::{
    encode_cells, peel_init, CellKind, HopTag, InitReplayCache, Message, Onion, Op, PaddingPolicy,
    Peeled, ReplyId, SessionId, SessionTable,
};
use rand_chacha::ChaCha8Rng;
use rand_core::SeedableRng;

use crate::audit::Auditor;
use crate::error::NodeError;

/// Bounds on what one node keeps in memory.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Forward caches kept per session (steps in flight).
    pub max_cached: usize,
    /// Early messages parked per session.
    pub max_parked: usize,
    /// Sessions (cascades) served at once.
    pub max_sessions: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_cached: 64,
            max_parked: 256,
            max_sessions: 64,
        }
    }
}

/// Something to send: cells for the link to `addr`, whose peer must prove
/// link key `expect`.
#[derive(Debug)]
pub struct Outbound {
    /// Destination.
    pub addr: SocketAddr,
    /// The link key the destination must hold.
    pub expect: [u8; 32],
    /// Whole cells.
    pub cells: Vec<u8>,
}

struct Parked {
    step: u64,
    peeled: Peeled,
    note: SessionNote,
    body: Vec<u8>,
}

struct NodeSession {
    stage: Stage,
    policy: PaddingPolicy,
    prev: [u8; 32],
    next: [u8; 32],
    designer: [u8; 32],
    caches: HashMap<HopTag, (u64, StageCache)>,
    parked: Vec<Parked>,
    /// Chunks of a state being loaded (crash recovery).
    loading: Vec<u8>,
    /// The encoded state last fetched and the step it is of: a fetch asks
    /// for it chunk by chunk, and the state changes only with the step (or
    /// a load, which clears this).
    fetched: Option<(u64, Vec<u8>)>,
    /// Commitments and openings, when the designer audits this session.
    auditor: Option<Auditor>,
}

/// A node's state: its onion key, sessions and stages.
pub struct Core {
    onion: mixnn_wire::OnionSecret,
    init_seen: InitReplayCache,
    table: SessionTable,
    sessions: HashMap<SessionId, NodeSession>,
    rng: ChaCha8Rng,
    limits: Limits,
    learned: BTreeSet<SocketAddr>,
    #[cfg(feature = "adversary")]
    adversary: Option<crate::audit::Adversary>,
}

fn short(bytes: &[u8]) -> String {
    bytes.iter().take(4).map(|b| format!("{b:02x}")).collect()
}

impl Core {
    /// A node with onion secret `onion`; `seed` seeds padding randomness
    /// (take it from the OS in production).
    pub fn new(onion: mixnn_wire::OnionSecret, seed: [u8; 32], limits: Limits) -> Self {
        Core {
            onion,
            init_seen: InitReplayCache::default(),
            table: SessionTable::new(),
            sessions: HashMap::new(),
            rng: ChaCha8Rng::from_seed(seed),
            limits,
            learned: BTreeSet::new(),
            #[cfg(feature = "adversary")]
            adversary: None,
        }
    }

    /// Makes this node misbehave (tests of audits only).
    #[cfg(feature = "adversary")]
    pub fn set_adversary(&mut self, adversary: Option<crate::audit::Adversary>) {
        self.adversary = adversary;
    }

    /// Every address this node has learned from routing blocks: its
    /// neighbours (and the designer), nothing else.
    pub fn learned_addresses(&self) -> &BTreeSet<SocketAddr> {
        &self.learned
    }

    /// Sessions currently set up.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Handles one message that arrived over a link with key `from`.
    pub fn handle(&mut self, from: [u8; 32], msg: Message) -> Result<Vec<Outbound>, NodeError> {
        match msg.kind {
            CellKind::Init => self.handle_init(from, msg),
            CellKind::Session => self.handle_session(from, msg),
            // Cover cells are dropped on arrival.
            CellKind::Cover => {
                tracing::debug!(from = %mixnn_net::PublicLinkKey::from_bytes(from), "cover message dropped");
                Ok(Vec::new())
            }
            _ => Ok(Vec::new()),
        }
    }

    fn handle_init(&mut self, from: [u8; 32], msg: Message) -> Result<Vec<Outbound>, NodeError> {
        if self.sessions.len() >= self.limits.max_sessions {
            return Err(NodeError::Limit(format!(
                "{} sessions already",
                self.sessions.len()
            )));
        }
        let (peeled, hop) = peel_init(
            &self.onion,
            &mut self.init_seen,
            &msg.onion.header,
            &msg.onion.notes,
        )?;
        let note = InitNote::decode(peeled.note())?;
        if note.prev_link != from {
            return Err(NodeError::Refused(
                "init arrived from a link other than the one it names as previous".into(),
            ));
        }
        let policy = match note.max_body {
            0 => PaddingPolicy::Classes,
            m => PaddingPolicy::Uniform {
                max_body: m as usize,
            },
        };
        policy.check(msg.cells, msg.body.len())?;
        let id = hop.id();
        let mut stage = Stage::new(&note.stage, note.seed, note.sgd);
        stage.start_at(note.start_step);
        self.table.insert(hop)?;
        let auditor = note.audit_key.map(|k| Auditor::new(k, &stage));
        self.sessions.insert(
            id,
            NodeSession {
                stage,
                policy,
                prev: note.prev_link,
                next: note.next_link,
                designer: note.designer_link,
                caches: HashMap::new(),
                parked: Vec::new(),
                loading: Vec::new(),
                fetched: None,
                auditor,
            },
        );
        tracing::info!(
            session = %short(&id.0),
            stage = %describe(&note.stage),
            "session set up"
        );
        let out = match peeled {
            Peeled::Forward(f) => {
                self.learned.insert(f.next.0);
                Outbound {
                    addr: f.next.0,
                    expect: note.next_link,
                    cells: encode_cells(CellKind::Init, &f.onion, &[], &policy)?,
                }
            }
            Peeled::Deliver(d) => {
                self.learned.insert(d.addr.0);
                self.reply(d.addr.0, note.designer_link, d.reply_id, &[], &policy)?
            }
        };
        Ok(vec![out])
    }

    fn reply(
        &mut self,
        addr: SocketAddr,
        expect: [u8; 32],
        reply_id: ReplyId,
        body: &[u8],
        policy: &PaddingPolicy,
    ) -> Result<Outbound, NodeError> {
        let onion = Onion::reply(reply_id, &mut self.rng);
        Ok(Outbound {
            addr,
            expect,
            cells: encode_cells(CellKind::Session, &onion, body, policy)?,
        })
    }

    fn handle_session(&mut self, from: [u8; 32], msg: Message) -> Result<Vec<Outbound>, NodeError> {
        // The header's lookup token names the session (and the packet's
        // counter). Who sent it is checked before the packet is peeled
        // (which uses up its counter); the MAC is checked with the
        // session's keys before anything else is read.
        let id = self
            .table
            .session_of(&msg.onion.header)
            .ok_or_else(|| NodeError::UnknownSession("no session has this token".into()))?;
        let session = self
            .sessions
            .get(&id)
            .ok_or_else(|| NodeError::UnknownSession(short(&id.0)))?;
        if from != session.prev && from != session.next && from != session.designer {
            return Err(NodeError::UnknownPeer {
                session: short(&id.0),
                peer: short(&from),
            });
        }
        session.policy.check(msg.cells, msg.body.len())?;
        let (peeled_id, peeled) = self.table.peel(&msg.onion.header, &msg.onion.notes)?;
        debug_assert_eq!(peeled_id, id);
        let op = peeled.op();
        if matches!(op, Op::Init | Op::Cover) {
            return Err(NodeError::Refused(format!(
                "op {} in a session message",
                op_name(op)
            )));
        }
        let note = SessionNote::decode(op, peeled.note())?;
        let mut out = Vec::new();
        self.dispatch(id, peeled, note, msg.body, &mut out)?;
        Ok(out)
    }

    fn dispatch(
        &mut self,
        id: SessionId,
        peeled: Peeled,
        note: SessionNote,
        body: Vec<u8>,
        out: &mut Vec<Outbound>,
    ) -> Result<(), NodeError> {
        let limits = self.limits;
        let s = self.session_mut(id)?;
        let at = s.stage.steps();
        let step = note.step();
        let op = peeled.op();
        let gated = matches!(op, Op::Forward | Op::Test | Op::Fetch);
        let early = match op {
            _ if gated => step > at,
            Op::Backward => !s.caches.contains_key(&peeled.tag()),
            _ => false,
        };
        if (gated || op == Op::Backward) && step < at {
            return Err(NodeError::Stale {
                session: short(&id.0),
                op: op_name(op),
                step,
                at,
            });
        }
        if early {
            if s.parked.len() >= limits.max_parked {
                return Err(NodeError::Limit(format!(
                    "{} messages parked for session {}",
                    s.parked.len(),
                    short(&id.0)
                )));
            }
            s.parked.push(Parked {
                step,
                peeled,
                note,
                body,
            });
            return Ok(());
        }
        self.run(id, peeled, note, body, out)?;
        // Running may have released parked messages: a backward moves the
        // stage to the next step, a forward creates the cache a parked
        // backward waits for.
        // A released message that fails must not swallow the outputs
        // already produced (the update above has been applied).
        while let Some(p) = self.take_ready(id) {
            if let Err(e) = self.run(id, p.peeled, p.note, p.body, out) {
                tracing::warn!(session = %short(&id.0), "parked message refused: {e}");
            }
        }
        // Messages to the next hop first, answers to the designer last:
        // the loss and "done" replies are off the step's critical path,
        // the forward or backward they came with is on it.
        if let Some(s) = self.sessions.get(&id) {
            let designer = s.designer;
            out.sort_by_key(|o| o.expect == designer);
        }
        Ok(())
    }

    fn session_mut(&mut self, id: SessionId) -> Result<&mut NodeSession, NodeError> {
        self.sessions
            .get_mut(&id)
            .ok_or_else(|| NodeError::UnknownSession(short(&id.0)))
    }

    fn take_ready(&mut self, id: SessionId) -> Option<Parked> {
        let s = self.sessions.get_mut(&id)?;
        let at = s.stage.steps();
        let i = s.parked.iter().position(|p| match p.peeled.op() {
            Op::Backward => s.caches.contains_key(&p.peeled.tag()),
            _ => p.step == at,
        })?;
        Some(s.parked.remove(i))
    }

    fn run(
        &mut self,
        id: SessionId,
        peeled: Peeled,
        note: SessionNote,
        body: Vec<u8>,
        out: &mut Vec<Outbound>,
    ) -> Result<(), NodeError> {
        let limits = self.limits;
        #[cfg(feature = "adversary")]
        let adversary = self.adversary;
        #[cfg(not(feature = "adversary"))]
        let adversary = NoAdversary;
        let s = self.session_mut(id)?;
        let op = peeled.op();
        let tag = peeled.tag();
        let result: Vec<u8> = match &note {
            SessionNote::Forward(n) => {
                if s.caches.len() >= limits.max_cached {
                    return Err(NodeError::Limit(format!(
                        "{} cached steps in session {}",
                        s.caches.len(),
                        short(&id.0)
                    )));
                }
                forward(s, tag, n, body, adversary)?
            }
            SessionNote::Backward(n) => backward(s, id, tag, n, body, adversary)?,
            SessionNote::Test { .. } => s.stage.eval_bytes(&body)?,
            SessionNote::Loop { .. } => body,
            SessionNote::Load(n) => {
                load_chunk(s, n, &body)?;
                Vec::new()
            }
            SessionNote::Fetch(n) => {
                let step = s.stage.steps();
                if s.fetched.as_ref().is_none_or(|(at, _)| *at != step) {
                    s.fetched = Some((step, encode_state(&s.stage.state())));
                }
                let all = s.fetched.as_ref().map_or(&[][..], |(_, b)| b);
                state_chunk(all, n.chunk, &s.policy)
            }
            SessionNote::Audit(n) => {
                // A step no longer kept (or never run) is refused with an
                // empty opening.
                let all = s
                    .auditor
                    .as_mut()
                    .and_then(|a| a.opening(n.step))
                    .unwrap_or_default();
                state_chunk(all, n.chunk, &s.policy)
            }
        };
        let policy = s.policy;
        let (prev, next, designer) = (s.prev, s.next, s.designer);
        let o = match peeled {
            Peeled::Forward(f) => {
                let expect = if op == Op::Backward { prev } else { next };
                self.learned.insert(f.next.0);
                Outbound {
                    addr: f.next.0,
                    expect,
                    cells: encode_cells(CellKind::Session, &f.onion, &result, &policy)?,
                }
            }
            Peeled::Deliver(d) => {
                self.learned.insert(d.addr.0);
                self.reply(d.addr.0, designer, d.reply_id, &result, &policy)?
            }
        };
        out.push(o);
        Ok(())
    }
}

/// No test adversary (builds without the `adversary` feature).
#[cfg(not(feature = "adversary"))]
#[derive(Clone, Copy)]
struct NoAdversary;

#[cfg(feature = "adversary")]
type MaybeAdversary = Option<crate::audit::Adversary>;
#[cfg(not(feature = "adversary"))]
type MaybeAdversary = NoAdversary;

/// Splits the commitment trailer off a forward or backward body when the
/// session is audited.
fn strip_trailer(s: &NodeSession, body: Vec<u8>) -> Result<(Vec<u8>, Vec<u8>), NodeError> {
    if s.auditor.is_none() {
        return Ok((body, Vec::new()));
    }
    let (p, t) = mixnn_proto::audit::split(&body)?;
    Ok((p.to_vec(), t.to_vec()))
}

/// Runs a forward: caches its input under `tag`, commits to it when
/// audited; returns the body to send on.
#[cfg_attr(not(feature = "adversary"), allow(unused_variables))]
fn forward(
    s: &mut NodeSession,
    tag: HopTag,
    note: &ForwardNote,
    body: Vec<u8>,
    adversary: MaybeAdversary,
) -> Result<Vec<u8>, NodeError> {
    let (body, trailer) = strip_trailer(s, body)?;
    let labels = s.stage.spec().is_loss().then_some(note.labels.as_slice());
    let (y, cache) = s
        .stage
        .forward_micro_bytes(&body, labels, note.batch_rows as usize)?;
    #[cfg(feature = "adversary")]
    let y = match adversary {
        Some(a) => a.forward(note.step, y),
        None => y,
    };
    s.caches.insert(tag, (note.step, cache));
    Ok(match s.auditor.as_mut() {
        Some(a) => {
            let c = a.forward(tag, note.step, &body, &y);
            #[cfg(feature = "adversary")]
            let y = match adversary {
                Some(adv) => adv.hidden(note.step, y),
                None => y,
            };
            mixnn_proto::audit::push(&y, &trailer, &c)
        }
        None => y,
    })
}

/// Runs a backward on the forward cached under `tag`; applies the update
/// once the step's last micro-batch is in; returns the body to send on.
#[cfg_attr(not(feature = "adversary"), allow(unused_variables))]
fn backward(
    s: &mut NodeSession,
    id: SessionId,
    tag: HopTag,
    note: &BackwardNote,
    body: Vec<u8>,
    adversary: MaybeAdversary,
) -> Result<Vec<u8>, NodeError> {
    let (body, trailer) = strip_trailer(s, body)?;
    let (step, cache) = s
        .caches
        .remove(&tag)
        .ok_or_else(|| NodeError::Refused("backward without forward".into()))?;
    if step != note.step || step != s.stage.steps() {
        return Err(NodeError::Stale {
            session: short(&id.0),
            op: "backward",
            step: note.step,
            at: s.stage.steps(),
        });
    }
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
    #[cfg(feature = "adversary")]
    let dx = match adversary {
        Some(a) => a.backward(note.step, dx),
        None => dx,
    };
    // The update waits for the gradients of every micro-batch of the step.
    let applied = s.stage.pending_micros() >= usize::from(note.micro.count());
    if applied {
        #[cfg(feature = "adversary")]
        match adversary {
            Some(a) => a.apply(note.step, &mut s.stage),
            None => s.stage.apply(),
        }
        #[cfg(not(feature = "adversary"))]
        s.stage.apply();
    }
    Ok(match s.auditor.as_mut() {
        Some(a) => {
            let c = a.backward(tag, note.step, &body, &dx, &s.stage, applied);
            mixnn_proto::audit::push(&dx, &trailer, &c)
        }
        None => dx,
    })
}

/// Chunk `chunk` of `all` (a state or an opening), as big as a message
/// under `policy` carries, with the total length.
fn state_chunk(all: &[u8], chunk: u32, policy: &PaddingPolicy) -> Vec<u8> {
    let room = policy.max_body().saturating_sub(4).max(1);
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
fn load_chunk(s: &mut NodeSession, note: &ChunkNote, body: &[u8]) -> Result<(), NodeError> {
    let chunk = ParamChunk::decode(body)?;
    // Parameters and momentum (f32 each), with room for names and shapes;
    // from the stage's description, without encoding the parameters.
    let values: usize = s
        .stage
        .spec()
        .ops
        .iter()
        .map(|op| match *op {
            mixnn_model::spec::OpSpec::Linear { input, output } => (input + 1) * output,
            _ => 0,
        })
        .sum();
    let bound = 2 * 4 * values + 64 * s.stage.spec().ops.len() * 4 + 4096;
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
        s.caches.clear();
        s.parked.clear();
        s.fetched = None;
        tracing::info!(step = state.steps, "stage state loaded");
    }
    Ok(())
}

fn op_name(op: Op) -> &'static str {
    match op {
        Op::Init => "init",
        Op::Forward => "forward",
        Op::Backward => "backward",
        Op::Test => "test",
        Op::Loop => "loop",
        Op::Fetch => "fetch",
        Op::Cover => "cover",
        Op::Load => "load",
        Op::Audit => "audit",
        _ => "unknown op",
    }
}

fn describe(stage: &mixnn_model::spec::StageSpec) -> String {
    stage
        .ops
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" → ")
}
