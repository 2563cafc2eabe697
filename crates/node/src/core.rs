//! The node's protocol state machine: no sockets, no clocks. The I/O layer
//! hands it each message with the link key it arrived on and sends what it
//! returns.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;

use mixnn_model::stage::Stage;
use mixnn_proto::{encode_state, InitNote, SessionNote};
use mixnn_wire::{
    encode_cells, peel_init, CellKind, InitReplayCache, Message, Onion, Op, PaddingPolicy, Peeled,
    ReplyId, SessionId, SessionTable,
};
use rand_chacha::ChaCha8Rng;
use rand_core::SeedableRng;

use crate::audit::Auditor;
use crate::error::NodeError;
#[cfg(not(feature = "adversary"))]
use crate::session::NoAdversary;
use crate::session::{backward, forward, load_chunk, short, state_chunk, NodeSession, Parked};

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
