//! The node's protocol state machine: no sockets, no clocks. The I/O layer
//! hands it each message with the link key it arrived on and sends what it
//! returns.
//!
//! (Over 600 lines: about 980 before its tests. Every op's admission checks
//! and dispatch stay in this one file on purpose, so the order in which a
//! message is checked — neighbour, padding, limits, step, shape — can be
//! read top to bottom; the init path is in `core/init.rs`, the per-op math
//! in `session.rs`.)

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::time::Instant;

use mixnn_proto::observed::Observation;
use mixnn_proto::reply::Sealed;
use mixnn_proto::{encode_state, BackwardNote, ForwardNote, Opens, SessionNote};
use mixnn_wire::{
    encode_cells, CellKind, InitReplayCache, InitTag, Message, Onion, Op, PaddingPolicy, Peeled,
    ReplyId, SessionId, SessionTable,
};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

use crate::adversary::Hooks;
use crate::error::NodeError;
pub use crate::limits::Limits;
use crate::limits::{answer_bytes, fits_input, forward_bytes};
use crate::memory::Memory;
use crate::routes::Routes;
use crate::session::{
    self, load_chunk, short, state_chunk, Cached, MaybeAdversary, NodeSession, Parked,
};
use mixnn_model::tensor_bytes::{f32_message_len, peek_shape};

mod init;

/// The time, as the I/O layer tells it to the core (which reads no clock).
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// Monotonic time: sessions expire when idle by it.
    pub mono: Instant,
    /// Wall-clock seconds since the Unix epoch: inits are issued in it.
    pub unix: u64,
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
    /// The session it is for (`None`: cover): its bytes are charged to it
    /// while queued ([`crate::memory`]).
    pub session: Option<SessionId>,
    /// Whether it counts for the link's cover size: the destination has
    /// itself sent a message of the session, so the session really uses
    /// that link ([`crate::cover::LinkSizes`]).
    pub sizes_cover: bool,
}

/// What the first cell of a message says the rest will cost, once the core
/// has looked at it ([`Core::admit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admitted {
    /// An init: its body must be empty, so nothing of the rest is kept.
    Init,
    /// A message of this session, whose body the node keeps.
    Session(SessionId),
    /// Cover: nothing of it is kept.
    Cover,
}

/// A node's state: its onion key, sessions and stages.
pub struct Core {
    onion: mixnn_wire::OnionSecret,
    init_seen: InitReplayCache,
    /// Inits accepted since [`Core::take_accepted_inits`] last ran.
    accepted: Vec<(InitTag, u64)>,
    table: SessionTable,
    sessions: HashMap<SessionId, NodeSession>,
    rng: ChaCha8Rng,
    limits: Limits,
    /// The node's memory budget: the core reports what its sessions hold
    /// and checks what a message would add against what is left.
    memory: std::sync::Arc<Memory>,
    learned: BTreeSet<SocketAddr>,
    #[cfg(feature = "adversary")]
    adversary: Option<crate::adversary::Adversary>,
    #[cfg(feature = "adversary")]
    record: Option<Record>,
    /// Where a curious hop writes down the model's tensors it sees
    /// ([`mixnn_proto::observed`]).
    #[cfg(feature = "adversary")]
    observe: Option<Record>,
    /// Makes the stage code panic on this op (tests of panic isolation).
    #[cfg(test)]
    panic_on: Option<Op>,
}

/// Where a recording node appends what it receives.
#[cfg(feature = "adversary")]
pub type Record = std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>;

impl Core {
    /// A node with onion secret `onion`; `seed` seeds padding randomness
    /// (take it from the OS in production).
    pub fn new(onion: mixnn_wire::OnionSecret, seed: [u8; 32], limits: Limits) -> Self {
        Core {
            onion,
            init_seen: InitReplayCache::new(limits.init_replay_capacity),
            accepted: Vec::new(),
            table: SessionTable::new(),
            sessions: HashMap::new(),
            rng: ChaCha8Rng::from_seed(seed),
            memory: Memory::for_budget(limits.max_memory),
            limits,
            learned: BTreeSet::new(),
            #[cfg(feature = "adversary")]
            adversary: None,
            #[cfg(feature = "adversary")]
            record: None,
            #[cfg(feature = "adversary")]
            observe: None,
            #[cfg(test)]
            panic_on: None,
        }
    }

    /// Shares `memory` with the I/O layer: the core reports what its
    /// sessions hold there, and refuses what would not fit beside what the
    /// I/O layer has queued.
    pub fn set_memory(&mut self, memory: std::sync::Arc<Memory>) {
        self.memory = memory;
        self.report();
    }

    /// The node's memory budget.
    pub fn memory(&self) -> &std::sync::Arc<Memory> {
        &self.memory
    }

    /// Bytes all sessions hold, everything counted
    /// ([`crate::memory`]).
    pub fn footprint(&self) -> u64 {
        self.sessions
            .values()
            .map(NodeSession::footprint)
            .fold(0, u64::saturating_add)
    }

    fn report(&self) {
        self.memory.set_core(self.footprint());
    }

    /// Sheds session `id` (the I/O layer's out-of-memory handler: it holds
    /// the oldest queued data); returns whether there was one.
    pub fn shed(&mut self, id: &SessionId) -> bool {
        let had = self.sessions.contains_key(id);
        self.drop_session(id);
        self.report();
        had
    }

    /// Looks at the first cell of a message before the rest is read: a
    /// session message must name a session this node has, come over a link
    /// of one of its neighbours and have the cell count its padding says,
    /// and an init must have no body. Nothing is peeled or changed.
    pub fn admit(
        &self,
        from: &[u8; 32],
        kind: CellKind,
        header: &mixnn_wire::Header,
        cells: usize,
        body_len: usize,
    ) -> Result<Admitted, NodeError> {
        match kind {
            CellKind::Init => {
                if body_len != 0 {
                    return Err(NodeError::Refused("an init with a body".into()));
                }
                Ok(Admitted::Init)
            }
            CellKind::Session => {
                let id = self
                    .table
                    .session_of(header)
                    .ok_or_else(|| NodeError::UnknownSession("no session has this token".into()))?;
                let session = self
                    .sessions
                    .get(&id)
                    .ok_or_else(|| NodeError::UnknownSession(short(&id.0)))?;
                if !session.routes.is_neighbour(from) {
                    return Err(NodeError::UnknownPeer {
                        session: short(&id.0),
                        peer: short(from),
                    });
                }
                session.policy.check(cells, body_len)?;
                Ok(Admitted::Session(id))
            }
            _ => Ok(Admitted::Cover),
        }
    }

    /// Drops every session idle for longer than the limit and forgets
    /// init tags older than the window; returns the sessions dropped.
    pub fn expire(&mut self, now: Now) -> usize {
        let idle = self.limits.session_idle;
        let old: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| now.mono.saturating_duration_since(s.last_active) > idle)
            .map(|(id, _)| *id)
            .collect();
        for id in &old {
            self.drop_session(id);
            tracing::info!(session = %short(&id.0), "session expired: idle for more than {} s", idle.as_secs());
        }
        self.init_seen
            .forget_before(now.unix.saturating_sub(self.limits.init_window.as_secs()));
        if !old.is_empty() {
            self.report();
        }
        old.len()
    }

    fn drop_session(&mut self, id: &SessionId) {
        self.table.remove(id);
        if let Some(s) = self.sessions.remove(id) {
            self.observe(|| Observation::Final(s.stage.state()));
        }
    }

    /// Bytes all sessions hold beyond their parameters.
    pub fn held_bytes(&self) -> u64 {
        self.sessions
            .values()
            .map(NodeSession::held)
            .fold(0, u64::saturating_add)
    }

    /// Refuses to take `more` bytes for session `id` past the session's
    /// or the node's budget.
    fn check_held(&self, id: &SessionId, more: u64) -> Result<(), NodeError> {
        let s = self.sessions.get(id).map_or(0, NodeSession::held);
        let l = &self.limits;
        if s.saturating_add(more) > l.max_session_bytes {
            return Err(NodeError::Limit(format!(
                "session {} would hold {} bytes, above its budget of {}",
                short(&id.0),
                s.saturating_add(more),
                l.max_session_bytes
            )));
        }
        let all = self.held_bytes();
        if all.saturating_add(more) > l.max_node_bytes {
            return Err(NodeError::Limit(format!(
                "sessions would hold {} bytes, above the node's budget of {}",
                all.saturating_add(more),
                l.max_node_bytes
            )));
        }
        self.check_memory(more)
    }

    /// Refuses to take `more` bytes past the node's memory budget (what
    /// the sessions hold now, as counted, and what is queued and read).
    fn check_memory(&self, more: u64) -> Result<(), NodeError> {
        self.check_memory_within(more, self.memory.core_limit())
    }

    /// [`Core::check_memory`] for a new session's state: the sessions set
    /// up may take only three quarters of the sessions' share, so that
    /// those running always have room for what a step makes them hold
    /// (caches, parked messages, gradients) and are never refused for it
    /// because new sessions took the rest.
    pub(crate) fn check_memory_for_session(&self, more: u64) -> Result<(), NodeError> {
        let share = self.memory.core_limit();
        self.check_memory_within(more, share - share / 4)
    }

    fn check_memory_within(&self, more: u64, core_limit: u64) -> Result<(), NodeError> {
        let core = self.footprint();
        let used = core.saturating_add(self.memory.io());
        let over = |used: u64, limit: u64| {
            NodeError::Limit(
                crate::memory::Over {
                    asked: more,
                    used,
                    limit,
                }
                .to_string(),
            )
        };
        // The sessions' state within its share, and everything within the
        // budget.
        if core.saturating_add(more) > core_limit {
            return Err(over(core, core_limit));
        }
        if used.saturating_add(more) > self.memory.limit() {
            return Err(over(used, self.memory.limit()));
        }
        Ok(())
    }

    /// Makes this node misbehave (tests of audits only).
    #[cfg(feature = "adversary")]
    pub fn set_adversary(&mut self, adversary: Option<crate::adversary::Adversary>) {
        self.adversary = adversary;
    }

    /// Records what this node receives (a curious hop, collusion tests).
    #[cfg(feature = "adversary")]
    pub fn set_record(&mut self, record: Option<Record>) {
        self.record = record;
    }

    /// Writes down the model's tensors this node sees (a curious hop, the
    /// adversary simulator): each an encoded
    /// [`mixnn_proto::observed::Observation`].
    #[cfg(feature = "adversary")]
    pub fn set_observe(&mut self, observe: Option<Record>) {
        self.observe = observe;
    }

    /// Appends what `what` makes to the tensor record, if recording (the
    /// closure runs only then).
    #[cfg_attr(not(feature = "adversary"), allow(unused_variables))]
    pub(crate) fn observe(&self, what: impl FnOnce() -> Observation) {
        #[cfg(feature = "adversary")]
        if let Some(r) = &self.observe {
            let bytes = what().encode();
            if let Ok(mut r) = r.lock() {
                r.push(bytes);
            }
        }
    }

    /// Appends `bytes` to the record, if recording.
    #[cfg_attr(not(feature = "adversary"), allow(unused_variables))]
    pub(crate) fn record(&self, bytes: &[u8]) {
        #[cfg(feature = "adversary")]
        if let Some(r) = &self.record {
            if let Ok(mut r) = r.lock() {
                r.push(bytes.to_vec());
            }
        }
    }

    /// Every address this node has learned from routing blocks: its
    /// neighbours (and the designer), nothing else.
    pub fn learned_addresses(&self) -> &BTreeSet<SocketAddr> {
        &self.learned
    }

    /// The link keys the live sessions name (neighbours and designers):
    /// links with them are not given up for new ones.
    pub fn session_keys(&self) -> std::collections::HashSet<[u8; 32]> {
        self.sessions
            .values()
            .flat_map(|s| s.routes.keys())
            .collect()
    }

    /// Sessions currently set up.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Handles one message that arrived over a link with key `from` at
    /// time `now`.
    pub fn handle(
        &mut self,
        from: [u8; 32],
        msg: Message,
        now: Now,
    ) -> Result<Vec<Outbound>, NodeError> {
        let out = self.handle_kind(from, msg, now);
        self.report();
        out
    }

    fn handle_kind(
        &mut self,
        from: [u8; 32],
        msg: Message,
        now: Now,
    ) -> Result<Vec<Outbound>, NodeError> {
        if matches!(msg.kind, CellKind::Init | CellKind::Session) {
            self.record(msg.onion.header.as_bytes());
            self.record(msg.onion.notes.as_bytes());
            self.record(&from);
        }
        // A test adversary's held messages go out after this one's.
        let held = self.adversary().release();
        let r = match msg.kind {
            CellKind::Init => self.handle_init(from, msg, now),
            CellKind::Session => self.handle_session(from, msg, now),
            // Cover cells are dropped on arrival.
            CellKind::Cover => {
                tracing::debug!(from = %mixnn_net::alias::key(&from), cells = msg.cells, "cover message dropped");
                Ok(Vec::new())
            }
            _ => Ok(Vec::new()),
        };
        r.map(|mut out| {
            out.extend(held);
            out
        })
    }

    /// The cells of a delivery to the designer with reply id `reply_id`.
    fn reply(
        &mut self,
        reply_id: ReplyId,
        body: &[u8],
        policy: &PaddingPolicy,
    ) -> Result<Vec<u8>, NodeError> {
        let onion = Onion::reply(reply_id, &mut self.rng);
        Ok(encode_cells(CellKind::Session, &onion, body, policy)?)
    }

    fn handle_session(
        &mut self,
        from: [u8; 32],
        msg: Message,
        now: Now,
    ) -> Result<Vec<Outbound>, NodeError> {
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
        if !session.routes.is_neighbour(&from) {
            return Err(NodeError::UnknownPeer {
                session: short(&id.0),
                peer: short(&from),
            });
        }
        session.policy.check(msg.cells, msg.body.len())?;
        let (peeled_id, peeled) = self.table.peel(&msg.onion.header, &msg.onion.notes)?;
        debug_assert_eq!(peeled_id, id);
        let s = self.session_mut(id)?;
        s.last_active = now.mono;
        s.heard_from(from, msg.cells);
        // Where the result would go is checked before any work on it.
        destination(&s.routes, &peeled)?;
        let op = peeled.op();
        if matches!(op, Op::Init | Op::Cover) {
            return Err(NodeError::Refused(format!(
                "op {} in a session message",
                op_name(op)
            )));
        }
        let note = SessionNote::decode(op, peeled.note())?;
        if op == Op::Close {
            let o = self.outbound(id, &peeled, &[])?;
            self.drop_session(&id);
            tracing::info!(session = %short(&id.0), "session closed by its designer");
            return Ok(vec![o]);
        }
        // A panic in the stage code fails this message alone: the session
        // it was for is dropped (its state may be half updated), every
        // other session and the node go on.
        let mut out = Vec::new();
        let ran = std::panic::catch_unwind(AssertUnwindSafe(|| {
            self.dispatch(id, peeled, note, msg.body, &mut out)
        }));
        match ran {
            Ok(r) => r.map(|()| out),
            Err(_) => {
                self.drop_session(&id);
                Err(NodeError::Panicked {
                    session: short(&id.0),
                })
            }
        }
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
            let bytes = body.len() as u64;
            self.check_held(&id, bytes)?;
            let s = self.session_mut(id)?;
            s.parked_bytes += bytes;
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
            let designer = s.routes.designer_key();
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
        let p = s.parked.remove(i);
        s.parked_bytes = s.parked_bytes.saturating_sub(p.body.len() as u64);
        Some(p)
    }

    fn run(
        &mut self,
        id: SessionId,
        peeled: Peeled,
        note: SessionNote,
        body: Vec<u8>,
        out: &mut Vec<Outbound>,
    ) -> Result<(), NodeError> {
        #[cfg(test)]
        if self.panic_on == Some(peeled.op()) {
            panic!("stage code panicked (test)");
        }
        let op = peeled.op();
        #[cfg(feature = "adversary")]
        let at_us = observed_at();
        // An answer is paid for before it is computed: the session must be
        // able to afford the largest message its padding allows.
        let s = self.session_mut(id)?;
        let largest = s.policy.cells_for(s.policy.max_body())?;
        s.affords(largest)?;
        // Forward and backward bodies end with the commitment trailer
        // when the session is audited.
        let audited = s.auditor.is_some();
        let trailed = audited && matches!(op, Op::Forward | Op::Backward | Op::Test);
        let (body, trailer) = if trailed {
            let (p, t) = mixnn_proto::audit::split(&body)?;
            (p.to_vec(), t.to_vec())
        } else {
            (body, Vec::new())
        };
        // A curious hop keeps what it was given to compute on.
        #[cfg(feature = "adversary")]
        let seen = (self.observe.is_some() && matches!(op, Op::Forward | Op::Backward | Op::Test))
            .then(|| body.clone());
        self.record(&note.encode());
        self.record(&peeled.tag().0);
        self.record(&trailer);
        if !matches!(op, Op::Forward | Op::Backward | Op::Test) {
            self.record(&body);
        }
        let trailer_len = if trailed {
            mixnn_proto::audit::TRAILER_LEN as u64
        } else {
            0
        };
        let (result, keep) = match &note {
            SessionNote::Forward(n) => {
                let (rows, bytes) = self.admit_forward(id, op, &body, trailer_len)?;
                if rows == 0 {
                    return Err(NodeError::Refused("a forward of no rows".into()));
                }
                self.check_held(&id, bytes)?;
                let (y, cached) = self.forward(id, &peeled, n, &body, &trailer)?;
                (y, Some(cached))
            }
            SessionNote::Test { step, batch } => {
                self.admit_forward(id, op, &body, trailer_len)?;
                let adversary = self.adversary();
                let s = self.session_mut(id)?;
                (
                    session::test(s, *step, *batch, &body, &trailer, &adversary)?,
                    None,
                )
            }
            SessionNote::Backward(n) => (
                self.backward(id, &peeled, n, &body, &trailer, trailer_len)?,
                None,
            ),
            // A relay adds its layer to what it passes on (a transfer's
            // sealed body), so no two hops see the same bytes.
            SessionNote::Loop { step } => {
                let mut body = body;
                if !body.is_empty() {
                    let adversary = self.adversary();
                    let s = self.session_mut(id)?;
                    mixnn_proto::reply::relay_layer(&s.reply_key, &peeled.tag().0, &mut body);
                    adversary.relayed(*step, &mut body);
                }
                (body, None)
            }
            // Transfers travel through other hops: their bodies are sealed
            // between the designer and this hop (mixnn_proto::reply).
            SessionNote::Load(n) => {
                let adversary = self.adversary();
                let s = self.session_mut(id)?;
                let plain = s.reply_key.open(Sealed::Load, n.step, n.chunk, &body)?;
                load_chunk(s, n, &plain, &adversary)?;
                (Vec::new(), None)
            }
            SessionNote::Fetch(n) => {
                let nonce = self.nonce();
                let adversary = self.adversary();
                let s = self.session_mut(id)?;
                let step = s.stage.steps();
                if adversary.refetch(step, n.chunk) {
                    s.fetched = None;
                }
                if s.fetched.as_ref().is_none_or(|(at, _)| *at != step) {
                    let state = adversary.fetched(step, s.stage.state());
                    s.fetched = Some((step, encode_state(&state)));
                }
                let all = s.fetched.as_ref().map_or(&[][..], |(_, b)| b);
                let chunk =
                    adversary.fetch_plain(step, n.chunk, state_chunk(all, n.chunk, &s.policy));
                let sealed = s
                    .reply_key
                    .seal(Sealed::Fetch, n.step, n.chunk, &chunk, nonce);
                (adversary.fetch_chunk(step, n.chunk, sealed), None)
            }
            SessionNote::Audit(n) => {
                // A step no longer kept (or never run) is refused with an
                // empty opening.
                let nonce = self.nonce();
                let adversary = self.adversary();
                let s = self.session_mut(id)?;
                let (all, kind) = match (s.auditor.as_mut(), n.opens) {
                    (Some(a), Opens::Step) => (a.opening(n.step), Sealed::Audit),
                    (Some(a), Opens::Test { batch }) => {
                        (a.test_opening(n.step, batch), Sealed::AuditTest { batch })
                    }
                    (None, _) => (None, Sealed::Audit),
                };
                let chunk = adversary.opening_plain(
                    n.step,
                    n.chunk,
                    state_chunk(all.unwrap_or_default(), n.chunk, &s.policy),
                );
                let sealed = s.reply_key.seal(kind, n.step, n.chunk, &chunk, nonce);
                (adversary.opening_chunk(n.step, n.chunk, sealed), None)
            }
            SessionNote::Close { .. } => {
                return Err(NodeError::Refused(
                    "a close reached the stage (closes end the session first)".into(),
                ))
            }
        };
        #[cfg(feature = "adversary")]
        if let Some(body) = seen {
            self.observe(|| observation(&note, at_us, &body, &result, trailed));
        }
        // The message goes out before its cache is kept: a forward whose
        // answer cannot be sent leaves nothing behind.
        let o = self.outbound(id, &peeled, &result)?;
        if let Some(c) = keep {
            let s = self.session_mut(id)?;
            s.cached_bytes = s.cached_bytes.saturating_add(c.bytes);
            s.caches.insert(peeled.tag(), c);
        }
        let onward = self
            .sessions
            .get(&id)
            .is_some_and(|s| s.routes.is_next(&o.expect));
        out.extend(self.adversary().outbound(op, note.step(), onward, o));
        Ok(())
    }

    /// A fresh nonce for a sealed body.
    fn nonce(&mut self) -> [u8; 24] {
        let mut n = [0u8; 24];
        self.rng.fill_bytes(&mut n);
        n
    }

    fn adversary(&self) -> MaybeAdversary {
        #[cfg(feature = "adversary")]
        return self.adversary.clone();
        #[cfg(not(feature = "adversary"))]
        crate::adversary::NoAdversary
    }

    /// Checks a forward or test of `body` before any math: a matrix, the
    /// activations it would make the stage compute, and the size of its
    /// answer under the session's padding. Returns its rows and its
    /// activation bytes.
    fn admit_forward(
        &mut self,
        id: SessionId,
        op: Op,
        body: &[u8],
        trailer_len: u64,
    ) -> Result<(usize, u64), NodeError> {
        let limits = self.limits;
        let s = self.session_mut(id)?;
        if op == Op::Forward && s.caches.len() >= limits.max_cached {
            return Err(NodeError::Limit(format!(
                "{} cached steps in session {}",
                s.caches.len(),
                short(&id.0)
            )));
        }
        let shape = peek_shape(body)
            .ok_or_else(|| NodeError::Refused(format!("{} body is not a tensor", op_name(op))))?;
        let spec = s.stage.spec();
        if !fits_input(spec, &shape) {
            return Err(NodeError::Refused(format!(
                "a {} of shape {shape:?} for a stage that takes [batch, {}]",
                op_name(op),
                spec.input
            )));
        }
        let rows = shape[0];
        let bytes = forward_bytes(spec, &shape);
        if bytes > limits.max_forward_bytes {
            return Err(NodeError::Limit(format!(
                "a {} of shape {shape:?} would compute {bytes} bytes of activations, above the limit of {}",
                op_name(op),
                limits.max_forward_bytes
            )));
        }
        let answer = answer_bytes(spec, &shape, op == Op::Test).saturating_add(trailer_len);
        let max = s.policy.max_body() as u64;
        if answer > max {
            return Err(NodeError::Limit(format!(
                "a {} of {rows} rows would answer {answer} bytes, above the session's largest body of {max}",
                op_name(op)
            )));
        }
        Ok((rows, bytes))
    }

    /// A training forward, with its commitment when audited; returns the
    /// answer and the cache to keep once the answer is on its way.
    fn forward(
        &mut self,
        id: SessionId,
        peeled: &Peeled,
        note: &ForwardNote,
        body: &[u8],
        trailer: &[u8],
    ) -> Result<(Vec<u8>, Cached), NodeError> {
        let adversary = self.adversary();
        let s = self.session_mut(id)?;
        session::forward(s, peeled.tag(), note, body, trailer, &adversary)
    }

    /// A backward on the cache of its forward: its gradient's shape is
    /// checked against the cache, and the size of its answer and of the
    /// gradients it keeps for the update against the limits, before any
    /// math.
    fn backward(
        &mut self,
        id: SessionId,
        peeled: &Peeled,
        note: &BackwardNote,
        body: &[u8],
        trailer: &[u8],
        trailer_len: u64,
    ) -> Result<Vec<u8>, NodeError> {
        let adversary = self.adversary();
        let s = self.session_mut(id)?;
        let Cached { step, cache, bytes } = s
            .caches
            .remove(&peeled.tag())
            .ok_or_else(|| NodeError::Refused("backward without forward".into()))?;
        s.cached_bytes = s.cached_bytes.saturating_sub(bytes);
        if step != note.step || step != s.stage.steps() {
            return Err(NodeError::Stale {
                session: short(&id.0),
                op: "backward",
                step: note.step,
                at: s.stage.steps(),
            });
        }
        let spec = s.stage.spec();
        let input_shape = match peek_shape(body) {
            Some(shape) if spec.is_identity() => shape,
            _ => spec.input.batched(cache.rows()),
        };
        let answer = if note.need_input_grad {
            f32_message_len(&input_shape)
        } else {
            0
        }
        .saturating_add(trailer_len);
        let max = s.policy.max_body() as u64;
        if answer > max {
            return Err(NodeError::Limit(format!(
                "a backward would answer {answer} bytes, above the session's largest body of {max}"
            )));
        }
        let grads = s.params.saturating_mul(4);
        self.check_held(&id, grads)?;
        let s = self.session_mut(id)?;
        session::backward(s, peeled.tag(), cache, note, body, trailer, &adversary)
    }

    /// The message carrying `body` where `peeled` routes it, if its init
    /// said the session may send there.
    fn outbound(
        &mut self,
        id: SessionId,
        peeled: &Peeled,
        body: &[u8],
    ) -> Result<Outbound, NodeError> {
        let s = self.session_mut(id)?;
        let (policy, expect) = (s.policy, destination(&s.routes, peeled)?);
        // What it may send is checked before the message is built.
        let cells = policy.cells_for(body.len())?;
        s.spend(cells)?;
        let sizes_cover = s.heard.contains(&expect);
        let (addr, cells) = match peeled {
            Peeled::Forward(f) => (
                f.next.0,
                encode_cells(CellKind::Session, &f.onion, body, &policy)?,
            ),
            Peeled::Deliver(d) => (d.addr.0, self.reply(d.reply_id, body, &policy)?),
        };
        self.learned.insert(addr);
        Ok(Outbound {
            addr,
            expect,
            cells,
            session: Some(id),
            sizes_cover,
        })
    }
}

/// The link key of where `peeled` routes its result, if the session's
/// init named that place.
fn destination(routes: &Routes, peeled: &Peeled) -> Result<[u8; 32], NodeError> {
    match peeled {
        Peeled::Forward(f) => routes.pass_on(f.op, f.next.0),
        Peeled::Deliver(d) => routes.deliver(d.addr.0),
    }
}

/// When a message reaches the stage, for the tensor record: µs since the
/// Unix epoch. The core reads no clock for the protocol; this one is only
/// written down by a curious hop (feature `adversary`), whose colluders
/// order their hops by it.
#[cfg(feature = "adversary")]
fn observed_at() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// What a curious hop writes down of a forward, backward or test it ran:
/// the tensors in and out (without commitment trailers), step,
/// micro-batch, labels (called for those three ops only).
#[cfg(feature = "adversary")]
fn observation(
    note: &SessionNote,
    at_us: u64,
    body: &[u8],
    result: &[u8],
    trailed: bool,
) -> Observation {
    let sent = if trailed {
        mixnn_proto::audit::split(result).map_or(result, |(p, _)| p)
    } else {
        result
    };
    match note {
        SessionNote::Forward(n) => Observation::Forward {
            step: n.step,
            micro: n.micro.index(),
            at_us,
            labels: n.labels.clone(),
            input: body.to_vec(),
            output: sent.to_vec(),
        },
        SessionNote::Backward(n) => Observation::Backward {
            step: n.step,
            micro: n.micro.index(),
            at_us,
            grad: body.to_vec(),
            input_grad: sent.to_vec(),
        },
        other => Observation::Test {
            step: other.step(),
            at_us,
            input: body.to_vec(),
            output: sent.to_vec(),
        },
    }
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
        Op::Close => "close",
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

#[cfg(test)]
mod tests {
    use mixnn_model::spec::{OpSpec, StageSpec};
    use mixnn_model::stage::Sgd;
    use mixnn_model::tensor_bytes::TensorBytes;
    use mixnn_proto::InitNote;
    use mixnn_wire::{
        decode_cells, wrap_init, DesignerSession, HopAddr, HopLayer, HopTag, Next, OnionSecret,
        ReplyId, RoutingBlock, FIRST_CELL_BODY,
    };
    use rand_chacha::ChaCha20Rng;

    use super::*;

    const PREV: [u8; 32] = [1; 32];
    const POLICY: PaddingPolicy = PaddingPolicy::Uniform {
        max_body: FIRST_CELL_BODY,
    };

    fn designer() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9))
    }

    fn deliver(rng: &mut ChaCha20Rng) -> Next {
        Next::Deliver {
            addr: HopAddr(designer()),
            reply_id: ReplyId::random(rng),
        }
    }

    fn msg(kind: CellKind, onion: &Onion, body: &[u8]) -> Message {
        decode_cells(&encode_cells(kind, onion, body, &POLICY).unwrap(), &POLICY).unwrap()
    }

    /// Sets up a session of a linear(4, 3) stage at `core`.
    fn session(core: &mut Core, rng: &mut ChaCha20Rng, now: Now) -> DesignerSession {
        let note = InitNote {
            arith: mixnn_model::arith::ARITH_VERSION,
            stage: StageSpec {
                input: mixnn_model::spec::Shape::flat(4),
                ops: vec![OpSpec::Linear {
                    input: 4,
                    output: 3,
                }],
            },
            optimizer: Sgd::default().into(),
            seed: 1,
            start_step: 0,
            padding: POLICY,
            issued_at: now.unix,
            prev_link: PREV,
            next_link: [2; 32],
            designer_link: [3; 32],
            prev_addr: None,
            next_addr: None,
            designer_addr: Some(designer()),
            reply_key: [0x5e; 32],
            audit_key: None,
        }
        .encode();
        let block = RoutingBlock {
            op: Op::Init,
            next: deliver(rng),
            tag: HopTag::random(rng),
        };
        let (onion, s) = wrap_init(
            &[core.onion.public()],
            &[HopLayer { block, note: &note }],
            rng,
        )
        .unwrap();
        core.handle(PREV, msg(CellKind::Init, &onion, &[]), now)
            .unwrap();
        s
    }

    fn forward(s: &mut DesignerSession, rng: &mut ChaCha20Rng, op: Op) -> Message {
        let block = RoutingBlock {
            op,
            next: deliver(rng),
            tag: HopTag::random(rng),
        };
        let note = match op {
            Op::Test => SessionNote::Test { step: 0, batch: 0 },
            _ => SessionNote::Forward(ForwardNote {
                step: 0,
                micro: mixnn_proto::Micro::WHOLE,
                batch_rows: 0,
                labels: Vec::new(),
            }),
        }
        .encode();
        let onion = s
            .wrap(&[0], &[HopLayer { block, note: &note }], rng)
            .unwrap();
        let body = TensorBytes::encode_f32(&[1, 4], &[0.5; 4]);
        msg(CellKind::Session, &onion, &body)
    }

    #[test]
    fn a_panic_in_the_stage_code_drops_its_session_only() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let mut core = Core::new(OnionSecret::generate(&mut rng), [0; 32], Limits::default());
        let now = Now {
            mono: Instant::now(),
            unix: 1_700_000_000,
        };
        let mut a = session(&mut core, &mut rng, now);
        let mut b = session(&mut core, &mut rng, now);
        assert_eq!(core.sessions(), 2);
        core.panic_on = Some(Op::Forward);
        let err = core.handle(PREV, forward(&mut a, &mut rng, Op::Forward), now);
        assert!(matches!(err, Err(NodeError::Panicked { .. })), "{err:?}");
        assert_eq!(core.sessions(), 1);
        // The other session and the node go on.
        let out = core
            .handle(PREV, forward(&mut b, &mut rng, Op::Test), now)
            .unwrap();
        assert_eq!(out.len(), 1);
        core.panic_on = None;
        let out = core
            .handle(PREV, forward(&mut b, &mut rng, Op::Forward), now)
            .unwrap();
        assert_eq!(out.len(), 1);
        let err = core.handle(PREV, forward(&mut a, &mut rng, Op::Forward), now);
        assert!(matches!(err, Err(NodeError::UnknownSession(_))), "{err:?}");
    }
}
