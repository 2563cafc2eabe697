//! Every onion the designer sends is built here, and only here.
//!
//! A [`Route`] says which hops a message visits, in order, and what each
//! one is told: one [`SessionNote`] per visited hop, whose op becomes that
//! hop's routing-block op. The last hop visited delivers to the designer
//! with a fresh reply id; every other hop forwards to the next one on the
//! route. The constructors below are the only routes there are:
//!
//! | route | visits | notes |
//! |---|---|---|
//! | [`Route::forward`] | 0, 1, …, n−1 | a forward note each; the labels to the loss hop |
//! | [`Route::backward`] | n−1, …, 0 | a backward note each, `need_input_grad` per hop |
//! | [`Route::test`] | 0, …, n−1 | a test note each |
//! | [`Route::whole_loop`] | 0, …, n−1 | a loop note each |
//! | [`Route::close`] | 0, …, n−1 | a close note each (each hop drops the session) |
//! | [`Route::probe`] | 0, …, j, j−1, …, 0 | a loop note each |
//! | [`Route::probe_from_last`] | n−1, …, j, j+1, …, n−1 | a loop note each (enters at the last hop) |
//! | [`Route::chunk`] | 0, …, j, j−1, …, 0 | loops, and a fetch, load or audit note at j (its body sealed, [`mixnn_proto::reply`]) |
//!
//! So only the first and the last hop ever deliver to the designer: the
//! middle hops' init notes name no designer address.
//!
//! Kept stages change only the notes ([`Layout::needs_input_grad`], the
//! loss hop) and which entry link a route uses; dummy hops are hops like
//! any other. The [`Router`] turns a route and a body into cells for one
//! of the designer's two links ([`Entry`]), with the session's onion keys.

use std::net::SocketAddr;

use mixnn_proto::reply::{relay_layer, ReplyKey, Sealed as SealedKind};
use mixnn_proto::{
    AuditNote, BackwardNote, ChunkNote, ForwardNote, InitNote, Micro, Opens, SessionNote,
};
use mixnn_wire::{
    encode_cells, wrap_init, CellKind, DesignerSession, HopAddr, HopLayer, HopTag, Next,
    OnionPublic, Op, PaddingPolicy, ReplyId, RoutingBlock,
};
use rand_chacha::ChaCha8Rng;
use rand_core::RngCore;

use crate::error::{BadReply, DesignerError};
use crate::plan::layout::Layout;

/// Which of the designer's links a message leaves on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// The link to the first hop (forward, test, loops, transfers).
    First,
    /// The link to the last hop (backward).
    Last,
}

/// One message to build: the hops it visits and each one's note.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// Hop positions, in the order visited.
    visits: Vec<usize>,
    /// One note per visit.
    notes: Vec<SessionNote>,
    /// Per-hop tags (indexed by hop position), shared by a micro-batch's
    /// forward and backward; `None` draws fresh ones.
    tags: Option<Vec<HopTag>>,
    /// The link it leaves on.
    entry: Entry,
}

impl Route {
    /// The forward of micro-batch `micro` of `step` through every hop of
    /// `layout`, with `tags` (one per hop); the loss hop gets `labels`.
    pub fn forward(
        layout: &Layout,
        step: u64,
        micro: Micro,
        batch_rows: u32,
        labels: &[u32],
        tags: Vec<HopTag>,
    ) -> Route {
        let n = layout.len();
        let note = |with_labels: bool| {
            SessionNote::Forward(ForwardNote {
                step,
                micro,
                batch_rows,
                labels: if with_labels {
                    labels.to_vec()
                } else {
                    Vec::new()
                },
            })
        };
        Route {
            visits: (0..n).collect(),
            notes: (0..n).map(|k| note(Some(k) == layout.loss_hop)).collect(),
            tags: Some(tags),
            entry: Entry::First,
        }
    }

    /// The backward of micro-batch `micro` of `step`, from the last hop to
    /// the first, with the forward's `tags`.
    pub fn backward(layout: &Layout, step: u64, micro: Micro, tags: Vec<HopTag>) -> Route {
        let n = layout.len();
        Route {
            visits: (0..n).rev().collect(),
            notes: (0..n)
                .rev()
                .map(|j| {
                    SessionNote::Backward(BackwardNote {
                        step,
                        micro,
                        need_input_grad: layout.needs_input_grad(j),
                    })
                })
                .collect(),
            tags: Some(tags),
            entry: Entry::Last,
        }
    }

    /// Test batch `batch`'s forward through all `n` hops at `step`.
    pub fn test(n: usize, step: u64, batch: u32) -> Route {
        Route::through(n, SessionNote::Test { step, batch })
    }

    /// A loop through all `n` hops and back (cover and health probe).
    pub fn whole_loop(n: usize, step: u64) -> Route {
        Route::through(n, SessionNote::Loop { step })
    }

    /// A loop out to hop `j` and back to the first hop, which delivers:
    /// does the cascade answer up to `j`?
    pub fn probe(j: usize, step: u64) -> Route {
        Route::out_and_back(j, SessionNote::Loop { step })
    }

    /// A loop from the last of `n` hops down to hop `j` and back to the
    /// last, which delivers: does the cascade answer from the other end
    /// down to `j`? (A hop is dead only if neither end reaches it; one
    /// reached from one end but not the other is cut off by a neighbour
    /// or cuts itself off from one.)
    pub fn probe_from_last(j: usize, n: usize, step: u64) -> Route {
        let last = n.saturating_sub(1);
        let visits: Vec<usize> = (j..=last).rev().chain(j + 1..=last).collect();
        Route {
            notes: vec![SessionNote::Loop { step }; visits.len()],
            visits,
            tags: None,
            entry: Entry::Last,
        }
    }

    /// `note` (a fetch, load or audit) for hop `j`: out through hops
    /// `0..j` and back through `j-1..=0` as loops (their notes carry
    /// `note`'s step), the first hop delivers. Only the ends of a cascade
    /// ever talk to the designer; the body is sealed between the designer
    /// and hop `j` ([`mixnn_proto::reply`]).
    pub fn chunk(j: usize, note: SessionNote) -> Route {
        Route::out_and_back(j, note)
    }

    fn out_and_back(j: usize, note: SessionNote) -> Route {
        let step = note.step();
        let visits: Vec<usize> = (0..=j).chain((0..j).rev()).collect();
        let mut notes = vec![SessionNote::Loop { step }; visits.len()];
        notes[j] = note;
        Route {
            visits,
            notes,
            tags: None,
            entry: Entry::First,
        }
    }

    /// A fetch of chunk `chunk` of hop `j`'s state, at `step`.
    pub fn fetch(j: usize, step: u64, chunk: u32) -> Route {
        Route::chunk(j, SessionNote::Fetch(ChunkNote { step, chunk }))
    }

    /// Chunk `chunk` of a state for hop `j` to load, at `step`.
    pub fn load(j: usize, step: u64, chunk: u32) -> Route {
        Route::chunk(j, SessionNote::Load(ChunkNote { step, chunk }))
    }

    /// Chunk `chunk` of hop `j`'s opening of `step`.
    pub fn audit(j: usize, step: u64, chunk: u32) -> Route {
        Route::chunk(
            j,
            SessionNote::Audit(AuditNote {
                step,
                chunk,
                opens: Opens::Step,
            }),
        )
    }

    /// Chunk `chunk` of hop `j`'s opening of test batch `batch`, run at
    /// `step`.
    pub fn audit_test(j: usize, step: u64, batch: u32, chunk: u32) -> Route {
        Route::chunk(
            j,
            SessionNote::Audit(AuditNote {
                step,
                chunk,
                opens: Opens::Test { batch },
            }),
        )
    }

    /// The end of the session at `step`: through every hop, each drops
    /// its session, the last acknowledges.
    pub fn close(n: usize, step: u64) -> Route {
        Route::through(n, SessionNote::Close { step })
    }

    fn through(n: usize, note: SessionNote) -> Route {
        Route {
            visits: (0..n).collect(),
            notes: vec![note; n],
            tags: None,
            entry: Entry::First,
        }
    }

    /// The hops visited, in order.
    pub fn visits(&self) -> &[usize] {
        &self.visits
    }

    /// The notes, one per visit.
    pub fn notes(&self) -> &[SessionNote] {
        &self.notes
    }

    /// The link the message leaves on: backward routes start at the last
    /// hop, every other route at the first.
    pub fn entry(&self) -> Entry {
        self.entry
    }
}

/// A message ready for a link.
#[derive(Debug)]
pub struct Sealed {
    /// The link it leaves on.
    pub entry: Entry,
    /// The id its answer will carry.
    pub reply: ReplyId,
    /// Whole cells.
    pub cells: Vec<u8>,
    /// The relay layers ([`mixnn_proto::reply::relay_layer`]) the answer
    /// will carry, by hop and tag: the hops that relay it back.
    pub unmask: Vec<(usize, HopTag)>,
}

/// Builds onions for the cascade's hops with the session's keys.
pub struct Router {
    hops: Vec<SocketAddr>,
    /// Where the first and the last hop deliver.
    me: [HopAddr; 2],
    session: Option<DesignerSession>,
    /// Per hop, the key of its sealed bodies in this session.
    reply_keys: Vec<ReplyKey>,
    policy: PaddingPolicy,
    rng: ChaCha8Rng,
}

impl Router {
    /// A router for hops at `hops` (in order), answers to `me` (the first
    /// hop's deliveries to `me[0]`, the last hop's to `me[1]`), padding
    /// with `policy`; `rng` draws tags, reply ids and onion randomness.
    pub fn new(
        hops: Vec<SocketAddr>,
        me: [SocketAddr; 2],
        policy: PaddingPolicy,
        rng: ChaCha8Rng,
    ) -> Self {
        Router {
            hops,
            me: me.map(HopAddr),
            session: None,
            reply_keys: Vec::new(),
            policy,
            rng,
        }
    }

    /// Hops in the cascade.
    pub fn hops(&self) -> usize {
        self.hops.len()
    }

    /// The padding policy in force.
    pub fn policy(&self) -> PaddingPolicy {
        self.policy
    }

    /// Where hop `k` may deliver to: the first hop to the designer's
    /// first end, the last to its second; `None` for a middle hop.
    pub fn me(&self, k: usize) -> Option<SocketAddr> {
        if k == 0 {
            Some(self.me[0].0)
        } else if k + 1 == self.hops.len() {
            Some(self.me[1].0)
        } else {
            None
        }
    }

    /// The address of hop `k`, if there is one.
    pub fn hop_addr(&self, k: usize) -> Option<SocketAddr> {
        self.hops.get(k).copied()
    }

    /// The router's randomness (tags, keys of a new session).
    pub fn rng(&mut self) -> &mut ChaCha8Rng {
        &mut self.rng
    }

    /// Fresh tags, one per hop, for a micro-batch's forward and backward.
    pub fn tags(&mut self) -> Vec<HopTag> {
        (0..self.hops.len())
            .map(|_| HopTag::random(&mut self.rng))
            .collect()
    }

    /// The hops changed (a replacement): the next init sets up a session
    /// over these.
    pub fn set_hops(&mut self, hops: Vec<SocketAddr>) {
        self.hops = hops;
        self.session = None;
        self.reply_keys.clear();
    }

    /// Fresh reply keys for a new session, one per hop (they go into the
    /// init notes); kept to seal loads and open fetches and openings.
    pub fn fresh_reply_keys(&mut self) -> Vec<[u8; 32]> {
        self.reply_keys = (0..self.hops.len())
            .map(|_| {
                let mut k = [0u8; 32];
                self.rng.fill_bytes(&mut k);
                ReplyKey(k)
            })
            .collect();
        self.reply_keys.iter().map(|k| k.0).collect()
    }

    /// `plain` sealed for hop `hop` ([`mixnn_proto::reply`]).
    pub fn seal_body(
        &mut self,
        hop: usize,
        kind: SealedKind,
        step: u64,
        chunk: u32,
        plain: &[u8],
    ) -> Result<Vec<u8>, DesignerError> {
        let key = self.reply_key(hop)?;
        let mut nonce = [0u8; 24];
        self.rng.fill_bytes(&mut nonce);
        Ok(key.seal(kind, step, chunk, plain, nonce))
    }

    /// Opens what hop `hop` sealed; a body that does not open is that
    /// hop's bad reply (or a relay's tampering: both are caught here).
    pub fn open_body(
        &self,
        hop: usize,
        kind: SealedKind,
        step: u64,
        chunk: u32,
        sealed: &[u8],
    ) -> Result<Vec<u8>, DesignerError> {
        self.reply_key(hop)?
            .open(kind, step, chunk, sealed)
            .map_err(|_| BadReply::Sealed { hop, chunk }.into())
    }

    fn reply_key(&self, hop: usize) -> Result<ReplyKey, DesignerError> {
        self.reply_keys
            .get(hop)
            .copied()
            .ok_or_else(|| DesignerError::Config {
                message: format!("no reply key for hop {hop}: no session set up"),
            })
    }

    /// The init onion through every hop (each reads its [`InitNote`]),
    /// which comes back to the designer; sets up the session's keys.
    pub fn init(
        &mut self,
        onion_keys: &[OnionPublic],
        notes: &[InitNote],
    ) -> Result<Sealed, DesignerError> {
        let notes: Vec<Vec<u8>> = notes.iter().map(InitNote::encode).collect();
        let reply = ReplyId::random(&mut self.rng);
        let n = self.hops.len();
        let blocks: Vec<RoutingBlock> = (0..n)
            .map(|k| RoutingBlock {
                op: Op::Init,
                next: self.next(k, k + 1 < n, self.hops.get(k + 1).copied(), reply),
                tag: HopTag::random(&mut self.rng),
            })
            .collect();
        let layers: Vec<HopLayer<'_>> = blocks
            .iter()
            .zip(&notes)
            .map(|(block, note)| HopLayer {
                block: *block,
                note,
            })
            .collect();
        let (onion, session) = wrap_init(onion_keys, &layers, &mut self.rng)?;
        // Every init is padded to the cascade's largest body, so a hop
        // learns the session's size class from its init alone.
        let cells = encode_cells(CellKind::Init, &onion, &[], &self.policy.for_init())?;
        self.session = Some(session);
        Ok(Sealed {
            entry: Entry::First,
            reply,
            cells,
            unmask: Vec::new(),
        })
    }

    /// Wraps `route` with `body` into cells.
    pub fn seal(&mut self, route: &Route, body: &[u8]) -> Result<Sealed, DesignerError> {
        let reply = ReplyId::random(&mut self.rng);
        let v = &route.visits;
        let mut blocks = Vec::with_capacity(v.len());
        for (k, &hop) in v.iter().enumerate() {
            let next = v.get(k + 1).map(|&h| self.hops[h]);
            let tag = match &route.tags {
                Some(tags) => tags[hop],
                None => HopTag::random(&mut self.rng),
            };
            blocks.push(RoutingBlock {
                op: route.notes[k].op(),
                next: self.next(hop, next.is_some(), next, reply),
                tag,
            });
        }
        let notes: Vec<Vec<u8>> = route.notes.iter().map(SessionNote::encode).collect();
        let layers: Vec<HopLayer<'_>> = blocks
            .iter()
            .zip(&notes)
            .map(|(block, note)| HopLayer {
                block: *block,
                note,
            })
            .collect();
        // A transfer's relays each add a layer to its body: the designer
        // puts on in advance the layers of the hops before the transfer's
        // hop, and takes off those of the hops that bring the answer back.
        let target = route.notes.iter().position(|n| n.op() != Op::Loop);
        let mut body = body.to_vec();
        let mut unmask = Vec::new();
        if let Some(t) = target {
            for (k, &hop) in v.iter().enumerate() {
                if route.notes[k].op() != Op::Loop {
                    continue;
                }
                if k < t {
                    if !body.is_empty() {
                        relay_layer(&self.reply_key(hop)?, &blocks[k].tag.0, &mut body);
                    }
                } else {
                    unmask.push((hop, blocks[k].tag));
                }
            }
        }
        let session = self.session.as_mut().ok_or(DesignerError::Config {
            message: "no session set up".into(),
        })?;
        let onion = session.wrap(v, &layers, &mut self.rng)?;
        Ok(Sealed {
            entry: route.entry(),
            reply,
            cells: encode_cells(CellKind::Session, &onion, &body, &self.policy)?,
            unmask,
        })
    }

    /// Takes the relay layers `unmask` off an answer's body.
    pub fn unmask(&self, unmask: &[(usize, HopTag)], body: &mut [u8]) -> Result<(), DesignerError> {
        if body.is_empty() {
            return Ok(());
        }
        for (hop, tag) in unmask {
            relay_layer(&self.reply_key(*hop)?, &tag.0, body);
        }
        Ok(())
    }

    /// Hop `hop`'s next place: `to`, or (at the end of a route) the
    /// designer's end facing it.
    fn next(&self, hop: usize, forward: bool, to: Option<SocketAddr>, reply: ReplyId) -> Next {
        match to {
            Some(addr) if forward => Next::Hop(HopAddr(addr)),
            _ => Next::Deliver {
                addr: if hop == 0 { self.me[0] } else { self.me[1] },
                reply_id: reply,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use mixnn_model::spec::ModelSpec;

    use super::*;
    use crate::options::Keep;

    const MODEL: &str = r#"
name = "three"
input = 4

[[stage]]
ops = [{ op = "linear", in = 4, out = 3 }]

[[stage]]
ops = [{ op = "log_softmax" }]

[[stage]]
ops = [{ op = "nll_loss" }]
"#;

    fn layout(keep: Keep, dummies: &[usize], hops: usize) -> Layout {
        Layout::new(
            &ModelSpec::parse(MODEL, "three").unwrap(),
            keep,
            dummies,
            hops,
        )
        .unwrap()
    }

    #[test]
    fn only_the_loss_hop_reads_the_labels() {
        let l = layout(Keep::None, &[1], 4);
        let tags = vec![HopTag([0; 16]); 4];
        let r = Route::forward(&l, 3, Micro::WHOLE, 64, &[1, 2], tags);
        assert_eq!(r.visits(), &[0, 1, 2, 3]);
        let labelled: Vec<bool> = r
            .notes()
            .iter()
            .map(|n| matches!(n, SessionNote::Forward(f) if !f.labels.is_empty()))
            .collect();
        assert_eq!(labelled, vec![false, false, false, true]);
        assert_eq!(r.entry(), Entry::First);
    }

    #[test]
    fn backward_runs_from_the_last_hop_and_asks_the_first_for_no_gradient() {
        for (keep, want) in [(Keep::None, false), (Keep::First, true)] {
            let hops = 3 - keep.count();
            let l = layout(keep, &[], hops);
            let r = Route::backward(&l, 0, Micro::WHOLE, vec![HopTag([0; 16]); hops]);
            assert_eq!(r.entry(), Entry::Last);
            assert_eq!(r.visits().first(), Some(&(hops - 1)));
            let SessionNote::Backward(first) = r.notes().last().unwrap() else {
                panic!("not a backward note")
            };
            assert_eq!(first.need_input_grad, want);
        }
    }

    #[test]
    fn a_chunk_route_goes_out_to_its_hop_and_back_to_the_first() {
        let r = Route::fetch(2, 7, 1);
        assert_eq!(r.visits(), &[0, 1, 2, 1, 0]);
        let ops: Vec<Op> = r.notes().iter().map(SessionNote::op).collect();
        assert_eq!(ops, vec![Op::Loop, Op::Loop, Op::Fetch, Op::Loop, Op::Loop]);
        assert!(r.notes().iter().all(|n| n.step() == 7));
        assert_eq!(Route::audit(0, 7, 0).visits(), &[0]);
        assert_eq!(Route::audit(0, 7, 0).entry(), Entry::First);
        assert_eq!(Route::probe(1, 0).visits(), &[0, 1, 0]);
        // Every route that is not a training pass ends at the first hop:
        // only the ends ever deliver.
        for j in 0..6 {
            for r in [
                Route::fetch(j, 1, 0),
                Route::load(j, 1, 0),
                Route::audit(j, 1, 0),
                Route::probe(j, 1),
            ] {
                assert_eq!(r.visits().last(), Some(&0));
            }
        }
    }
}
