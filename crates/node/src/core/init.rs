//! Setting up a session: every check of an init runs before the node
//! spends anything on it, and its replay tag is recorded last. Also the
//! replay tags the I/O layer persists.

use std::collections::HashMap;

use mixnn_model::arith::ARITH_VERSION;
use mixnn_model::stage::Stage;
use mixnn_proto::InitNote;
use mixnn_wire::{encode_cells, peel_init, CellKind, InitTag, Message, Op, Peeled, WireError};

use super::{describe, short, Core, NodeSession, Now, Outbound};
use crate::adversary::Hooks;
use crate::audit::{Auditor, KEPT};
use crate::error::NodeError;
use crate::limits::stage_params;
use crate::routes::Routes;

impl Core {
    /// Remembers inits accepted before (by an earlier run of this node,
    /// persisted by the I/O layer), so that their replays are refused.
    /// Tags issued before the window are skipped; tags past the capacity
    /// (a cache made smaller since) too, with a warning.
    pub fn remember_inits(&mut self, tags: impl IntoIterator<Item = (InitTag, u64)>, now: Now) {
        let from = now.unix.saturating_sub(self.limits.init_window.as_secs());
        let mut over = 0usize;
        for (tag, at) in tags {
            if at >= from && self.init_seen.insert(tag, at).is_err() {
                over += 1;
            }
        }
        if over > 0 {
            tracing::warn!(
                "{over} remembered init tags do not fit the replay cache of {}: their inits could be replayed",
                self.init_seen.capacity()
            );
        }
    }

    /// The inits accepted since the last call, with their issue times:
    /// the I/O layer persists them before sending what the core returned.
    pub fn take_accepted_inits(&mut self) -> Vec<(InitTag, u64)> {
        std::mem::take(&mut self.accepted)
    }

    /// Every init tag remembered (to rewrite the persisted list).
    pub fn init_tags(&self) -> Vec<(InitTag, u64)> {
        self.init_seen.tags().collect()
    }

    /// Sets up a session. Every check runs before the node spends memory
    /// on it, and the init's replay tag is recorded last, once all passed.
    pub(super) fn handle_init(
        &mut self,
        from: [u8; 32],
        msg: Message,
        now: Now,
    ) -> Result<Vec<Outbound>, NodeError> {
        self.expire(now);
        let l = self.limits;
        if self.sessions.len() >= l.max_sessions {
            return Err(NodeError::Limit(format!(
                "{} sessions already",
                self.sessions.len()
            )));
        }
        let from_key = self
            .sessions
            .values()
            .filter(|s| s.opened_by == from)
            .count();
        if from_key >= l.max_sessions_per_key {
            return Err(NodeError::Limit(format!(
                "{from_key} sessions already set up over links with key {}…",
                short(&from)
            )));
        }
        let (peeled, hop) = peel_init(
            &self.onion,
            &self.init_seen,
            &msg.onion.header,
            &msg.onion.notes,
        )?;
        self.record(peeled.note());
        let note = InitNote::decode(peeled.note())?;
        if note.arith != ARITH_VERSION {
            return Err(NodeError::Refused(format!(
                "init asks for arith {}, this node computes arith {ARITH_VERSION} (docs/arithmetic.md)",
                note.arith
            )));
        }
        if note.prev_link != from {
            return Err(NodeError::Refused(
                "init arrived from a link other than the one it names as previous".into(),
            ));
        }
        let window = l.init_window.as_secs();
        if note.issued_at.saturating_add(window) < now.unix
            || note.issued_at > now.unix.saturating_add(window)
        {
            return Err(NodeError::Refused(format!(
                "init issued at {} s, this node's clock says {} s: more than the window of {window} s apart",
                note.issued_at, now.unix
            )));
        }
        let policy = note.padding;
        if !msg.body.is_empty() {
            return Err(NodeError::Refused("an init with a body".into()));
        }
        policy.for_init().check(msg.cells, msg.body.len())?;
        let params = stage_params(&note.stage);
        if params > l.max_stage_params {
            return Err(NodeError::Limit(format!(
                "a stage of {params} parameters, above the limit of {}",
                l.max_stage_params
            )));
        }
        let copies = if note.audit_key.is_some() {
            // The live stage, a copy of its state now, and the state
            // before each of its last KEPT steps.
            2 + KEPT as u64
        } else {
            1
        };
        let weight = params.saturating_mul(copies);
        let held: u64 = self.sessions.values().map(|s| s.weight).sum();
        if held.saturating_add(weight) > l.max_node_params {
            return Err(NodeError::Limit(format!(
                "a session counting {weight} parameters on top of {held}, above the node's limit of {}",
                l.max_node_params
            )));
        }
        let routes = Routes::from_note(&note)?;
        let id = hop.id();
        if self.table.contains(&id) {
            return Err(WireError::DuplicateSession.into());
        }
        let out = match &peeled {
            Peeled::Forward(f) => Outbound {
                addr: f.next.0,
                expect: routes.pass_on(Op::Init, f.next.0)?,
                cells: encode_cells(CellKind::Init, &f.onion, &[], &policy.for_init())?,
                session: Some(id),
                sizes_cover: false,
            },
            Peeled::Deliver(d) => Outbound {
                addr: d.addr.0,
                expect: routes.deliver(d.addr.0)?,
                cells: self.reply(d.reply_id, &[], &policy)?,
                session: Some(id),
                sizes_cover: false,
            },
        };
        // What the session will hold at least (its stage, and with audits
        // the states it keeps) must fit the node's memory budget.
        self.check_memory_for_session(weight.saturating_mul(8))?;
        // Every check passed: build the stage, then record the init.
        let mut stage = Stage::new(&note.stage, note.seed, note.optimizer);
        stage.start_at(note.start_step);
        let mut auditor = note.audit_key.map(|k| Auditor::new(k, &stage));
        self.adversary().after_init(&mut stage, auditor.as_mut());
        let tag = hop.init_tag();
        self.init_seen.insert(tag, note.issued_at)?;
        self.accepted.push((tag, note.issued_at));
        self.table.insert(hop)?;
        self.sessions.insert(
            id,
            NodeSession {
                stage,
                policy,
                routes,
                opened_by: from,
                last_active: now.mono,
                params,
                weight,
                caches: HashMap::new(),
                cached_bytes: 0,
                parked: Vec::new(),
                parked_bytes: 0,
                loading: Vec::new(),
                fetched: None,
                auditor,
                reply_key: mixnn_proto::reply::ReplyKey(note.reply_key),
                init_cells: msg.cells as u64,
                received: msg.cells as u64,
                sent: (out.cells.len() / mixnn_wire::CELL_SIZE) as u64,
                heard: vec![from],
            },
        );
        self.learned.insert(out.addr);
        self.observe(|| mixnn_proto::observed::Observation::Stage {
            spec: note.stage.clone(),
            first: note.prev_addr.is_none(),
            last: note.next_addr.is_none(),
        });
        tracing::info!(
            session = %short(&id.0),
            stage = %describe(&note.stage),
            "session set up"
        );
        Ok(vec![out])
    }
}
