#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The node's state machine without sockets: a designer built from the wire
//! crate talks to one `Core` (a one-hop cascade) message by message.
//!
//! Over 600 lines: one message-by-message test per rule of the core,
//! sharing the in-test designer at the top.

use std::net::SocketAddr;

use mixnn_model::optim::Optimizer;
use mixnn_model::spec::{OpSpec, StageSpec};
use mixnn_model::stage::Stage;
use mixnn_model::tensor_bytes::TensorBytes;
use std::time::{Duration, Instant};

use mixnn_node::{Core, Limits, NodeError, Now, Outbound};
use mixnn_proto::{BackwardNote, ForwardNote, InitNote, Micro, SessionNote};
use mixnn_wire::{
    decode_cells, encode_cells, wrap_init, CellKind, DesignerSession, HopLayer, HopTag, Message,
    Next, OnionSecret, Op, PaddingPolicy, ReplyId, RoutingBlock, CELL_SIZE, FIRST_CELL_BODY,
};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

/// Link keys of the hop's neighbours in these tests.
const PREV: [u8; 32] = [1; 32];
const NEXT: [u8; 32] = [2; 32];
const DESIGNER: [u8; 32] = [3; 32];
const STRANGER: [u8; 32] = [9; 32];
const SEED: u64 = 42;
const POLICY: PaddingPolicy = PaddingPolicy::Classes {
    max_body: FIRST_CELL_BODY + CELL_SIZE,
};
/// The designer's clock when the tests' inits are issued.
const ISSUED_AT: u64 = 1_700_000_000;

fn designer_addr() -> SocketAddr {
    "127.0.0.1:9999".parse().unwrap()
}

/// A whole small model in one stage: linear 4→3, log-softmax, NLL loss.
fn stage_spec() -> StageSpec {
    StageSpec {
        input: mixnn_model::spec::Shape::flat(4),
        ops: vec![
            OpSpec::Linear {
                input: 4,
                output: 3,
            },
            OpSpec::LogSoftmax,
            OpSpec::NllLoss,
        ],
    }
}

fn init_note(stage: StageSpec) -> InitNote {
    InitNote {
        arith: mixnn_model::arith::ARITH_VERSION,
        stage,
        optimizer: Optimizer::default(),
        seed: SEED,
        start_step: 0,
        padding: POLICY,
        issued_at: ISSUED_AT,
        prev_link: PREV,
        next_link: NEXT,
        designer_link: DESIGNER,
        prev_addr: None,
        next_addr: None,
        designer_addr: Some(designer_addr()),
        reply_key: [0x5e; 32],
        audit_key: None,
    }
}

fn message(kind: CellKind, onion: &mixnn_wire::Onion, body: &[u8]) -> Message {
    let cells = encode_cells(kind, onion, body, &POLICY).unwrap();
    decode_cells(&cells, &POLICY).unwrap()
}

/// Reply id and body of a message the node sent to the designer.
fn delivered(o: &Outbound) -> ([u8; 16], Vec<u8>) {
    assert_eq!(o.addr, designer_addr());
    assert_eq!(o.expect, DESIGNER);
    let m = decode_cells(&o.cells, &POLICY).unwrap();
    (m.onion.header.reply_id().0, m.body)
}

/// A designer and one node, with the node's clock.
struct Rig {
    core: Core,
    onion: mixnn_wire::OnionPublic,
    rng: ChaCha20Rng,
    session: Option<DesignerSession>,
    now: Now,
}

impl Rig {
    fn new() -> Rig {
        Rig::with_limits(Limits::default())
    }

    fn with_limits(limits: Limits) -> Rig {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let secret = OnionSecret::generate(&mut rng);
        let onion = secret.public();
        Rig {
            core: Core::new(secret, [5; 32], limits),
            onion,
            rng,
            session: None,
            now: Now {
                mono: Instant::now(),
                unix: ISSUED_AT + 1,
            },
        }
    }

    /// The node handles `msg` from `from` at the rig's time.
    fn handle(&mut self, from: [u8; 32], msg: Message) -> Result<Vec<Outbound>, NodeError> {
        self.core.handle(from, msg, self.now)
    }

    /// Time passes for the node.
    fn wait(&mut self, d: Duration) {
        self.now.mono += d;
        self.now.unix += d.as_secs();
    }

    /// An init message carrying `note` (raw bytes); keeps its session.
    fn init_msg(&mut self, note: &[u8]) -> (Message, ReplyId) {
        let rid = ReplyId::random(&mut self.rng);
        let block = RoutingBlock {
            op: Op::Init,
            next: Next::Deliver {
                addr: mixnn_wire::HopAddr(designer_addr()),
                reply_id: rid,
            },
            tag: HopTag::random(&mut self.rng),
        };
        let (onion, session) =
            wrap_init(&[self.onion], &[HopLayer { block, note }], &mut self.rng).unwrap();
        self.session = Some(session);
        let cells = encode_cells(CellKind::Init, &onion, &[], &POLICY.for_init()).unwrap();
        (decode_cells(&cells, &POLICY.for_init()).unwrap(), rid)
    }

    /// Sets up a valid session; asserts the acknowledgement.
    fn init(&mut self) {
        let before = self.core.sessions();
        let (msg, rid) = self.init_msg(&init_note(stage_spec()).encode());
        let out = self.handle(PREV, msg).unwrap();
        assert_eq!(out.len(), 1);
        let (got, body) = delivered(&out[0]);
        assert_eq!(got, rid.0);
        assert!(body.is_empty());
        assert_eq!(self.core.sessions(), before + 1);
    }

    /// A session message with `op` for `step`; returns it and its reply id.
    fn session_msg(
        &mut self,
        op: Op,
        tag: HopTag,
        note: SessionNote,
        body: &[u8],
    ) -> (Message, [u8; 16]) {
        let rid = ReplyId::random(&mut self.rng);
        let next = Next::Deliver {
            addr: mixnn_wire::HopAddr(designer_addr()),
            reply_id: rid,
        };
        (self.session_msg_to(op, tag, note, body, next), rid.0)
    }

    /// A session message routed to `next` (when that is a hop, a second
    /// layer for the same hop follows, as the format wants a path to end
    /// with a delivery).
    fn session_msg_to(
        &mut self,
        op: Op,
        tag: HopTag,
        note: SessionNote,
        body: &[u8],
        next: Next,
    ) -> Message {
        let note = note.encode();
        let mut layers = vec![HopLayer {
            block: RoutingBlock { op, next, tag },
            note: &note,
        }];
        if matches!(next, Next::Hop(_)) {
            layers.push(HopLayer {
                block: RoutingBlock {
                    op,
                    next: Next::Deliver {
                        addr: mixnn_wire::HopAddr(designer_addr()),
                        reply_id: ReplyId([0; 16]),
                    },
                    tag,
                },
                note: &note,
            });
        }
        let path = vec![0; layers.len()];
        let onion = self
            .session
            .as_mut()
            .unwrap()
            .wrap(&path, &layers, &mut self.rng)
            .unwrap();
        message(CellKind::Session, &onion, body)
    }

    fn tag(&mut self) -> HopTag {
        HopTag::random(&mut self.rng)
    }

    fn forward(&mut self, step: u64, tag: HopTag) -> (Message, [u8; 16]) {
        self.session_msg(Op::Forward, tag, forward_note(step), &input(step))
    }

    fn backward(&mut self, step: u64, tag: HopTag) -> (Message, [u8; 16]) {
        let note = SessionNote::Backward(BackwardNote {
            step,
            micro: Micro::WHOLE,
            need_input_grad: false,
        });
        self.session_msg(Op::Backward, tag, note, &[])
    }
}

/// The note of step `step`'s forward, with its labels.
fn forward_note(step: u64) -> SessionNote {
    SessionNote::Forward(ForwardNote {
        step,
        micro: Micro::WHOLE,
        batch_rows: 0,
        labels: labels(step),
    })
}

/// Two samples of 4 features, different per step.
fn input(step: u64) -> Vec<u8> {
    let s = step as f32;
    let values: Vec<f32> = (0..8).map(|i| (i as f32 - 3.5) * 0.25 + s * 0.1).collect();
    TensorBytes::encode_f32(&[2, 4], &values)
}

fn labels(step: u64) -> Vec<u32> {
    vec![(step % 3) as u32, ((step + 1) % 3) as u32]
}

/// The losses the stage computes locally for steps 0, 1, …, n-1.
fn local_losses(n: u64) -> Vec<Vec<u8>> {
    let mut stage = Stage::new(&stage_spec(), SEED, Optimizer::default());
    (0..n)
        .map(|step| {
            let (loss, cache) = stage
                .forward_bytes(&input(step), Some(&labels(step)))
                .unwrap();
            stage.backward_bytes(cache, None, false).unwrap();
            loss
        })
        .collect()
}

#[test]
fn invalid_init_note_is_refused_and_creates_no_session() {
    let mut rig = Rig::new();
    // Linear dimensions that do not chain: 4→3 then 5→2.
    let broken = StageSpec {
        input: mixnn_model::spec::Shape::flat(4),
        ops: vec![
            OpSpec::Linear {
                input: 4,
                output: 3,
            },
            OpSpec::Linear {
                input: 5,
                output: 2,
            },
        ],
    };
    let (msg, _) = rig.init_msg(&init_note(broken).encode());
    let err = rig.handle(PREV, msg).unwrap_err();
    assert!(matches!(err, NodeError::Proto(_)), "{err:?}");
    assert!(err.to_string().contains("init note"), "{err}");
    assert_eq!(rig.core.sessions(), 0);

    // Garbage instead of a note.
    let (msg, _) = rig.init_msg(&[0xa5; 100]);
    let err = rig.handle(PREV, msg).unwrap_err();
    assert!(matches!(err, NodeError::Proto(_)), "{err:?}");
    assert!(err.to_string().starts_with("protocol: "), "{err}");
    assert_eq!(rig.core.sessions(), 0);

    // A valid note from a link other than the one it names as previous.
    let (msg, _) = rig.init_msg(&init_note(stage_spec()).encode());
    let err = rig.handle(STRANGER, msg).unwrap_err();
    assert!(matches!(err, NodeError::Refused(_)), "{err:?}");
    assert_eq!(rig.core.sessions(), 0);

    // A designer of another arithmetic: refused, naming both.
    let other = mixnn_proto::InitNote {
        arith: mixnn_model::arith::ARITH_VERSION + 1,
        ..init_note(stage_spec())
    };
    let (msg, _) = rig.init_msg(&other.encode());
    let err = rig.handle(PREV, msg).unwrap_err();
    assert!(matches!(err, NodeError::Refused(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "refused: init asks for arith {}, this node computes arith {} (docs/arithmetic.md)",
            mixnn_model::arith::ARITH_VERSION + 1,
            mixnn_model::arith::ARITH_VERSION
        )
    );
    assert_eq!(rig.core.sessions(), 0);
    assert!(rig.core.take_accepted_inits().is_empty());

    // The node is unharmed: a valid init works.
    rig.init();
    assert_eq!(
        rig.core
            .learned_addresses()
            .iter()
            .copied()
            .collect::<Vec<_>>(),
        vec![designer_addr()]
    );
}

#[test]
fn session_message_from_a_non_neighbour_is_refused() {
    let mut rig = Rig::new();
    rig.init();
    let tag = rig.tag();
    let (msg, rid) = rig.forward(0, tag);
    let err = rig.handle(STRANGER, msg.clone()).unwrap_err();
    assert!(
        matches!(err, NodeError::UnknownPeer { .. }),
        "expected UnknownPeer, got {err:?}"
    );
    // Refusing it did not use up the packet: from the previous hop it runs.
    let out = rig.handle(PREV, msg).unwrap();
    assert_eq!(out.len(), 1);
    let (got, loss) = delivered(&out[0]);
    assert_eq!(got, rid);
    assert_eq!(loss, local_losses(1)[0]);
}

#[test]
fn early_forward_is_parked_until_the_step_before_is_applied() {
    let mut rig = Rig::new();
    rig.init();
    let tags = [rig.tag(), rig.tag()];
    let (f0, f0_id) = rig.forward(0, tags[0]);
    let (f1, f1_id) = rig.forward(1, tags[1]);
    let (b0, b0_id) = rig.backward(0, tags[0]);
    let (b1, b1_id) = rig.backward(1, tags[1]);
    let want = local_losses(2);

    // Step 1 before step 0: parked, nothing sent.
    assert!(rig.handle(PREV, f1).unwrap().is_empty());
    // Step 0's forward runs; step 1 stays parked (no update applied yet).
    let out = rig.handle(PREV, f0).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(delivered(&out[0]), (f0_id, want[0].clone()));
    // Step 0's backward applies the update, then releases step 1: its
    // output comes after the backward's, computed on the updated weights.
    let out = rig.handle(NEXT, b0).unwrap();
    assert_eq!(out.len(), 2);
    assert_eq!(delivered(&out[0]), (b0_id, Vec::new()));
    assert_eq!(delivered(&out[1]), (f1_id, want[1].clone()));
    let out = rig.handle(NEXT, b1).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(delivered(&out[0]), (b1_id, Vec::new()));
}

#[test]
fn early_backward_is_parked_until_its_forward() {
    let mut rig = Rig::new();
    rig.init();
    let tag = rig.tag();
    let (f0, f0_id) = rig.forward(0, tag);
    let (b0, b0_id) = rig.backward(0, tag);
    assert!(rig.handle(NEXT, b0).unwrap().is_empty());
    let out = rig.handle(PREV, f0).unwrap();
    let got: Vec<_> = out.iter().map(delivered).collect();
    assert_eq!(
        got,
        vec![(f0_id, local_losses(1)[0].clone()), (b0_id, Vec::new())]
    );
}

#[test]
fn stale_forward_is_refused() {
    let mut rig = Rig::new();
    rig.init();
    let tag = rig.tag();
    let (f0, _) = rig.forward(0, tag);
    let (b0, _) = rig.backward(0, tag);
    assert_eq!(rig.handle(PREV, f0).unwrap().len(), 1);
    assert_eq!(rig.handle(NEXT, b0).unwrap().len(), 1);
    // A new packet (fresh counter) for step 0, which the stage has passed.
    let t = rig.tag();
    let (again, _) = rig.forward(0, t);
    let err = rig.handle(PREV, again).unwrap_err();
    assert!(
        matches!(err, NodeError::Stale { step: 0, at: 1, .. }),
        "expected Stale, got {err:?}"
    );
    // The stage is still at step 1.
    let t = rig.tag();
    let (f1, f1_id) = rig.forward(1, t);
    let out = rig.handle(PREV, f1).unwrap();
    assert_eq!(delivered(&out[0]), (f1_id, local_losses(2)[1].clone()));
}

#[test]
fn replayed_messages_are_refused() {
    let mut rig = Rig::new();
    let (init, _) = rig.init_msg(&init_note(stage_spec()).encode());
    assert_eq!(rig.handle(PREV, init.clone()).unwrap().len(), 1);
    let err = rig.handle(PREV, init).unwrap_err();
    assert!(matches!(err, NodeError::Wire(_)), "{err:?}");
    assert_eq!(rig.core.sessions(), 1);

    let tag = rig.tag();
    let (f0, _) = rig.forward(0, tag);
    assert_eq!(rig.handle(PREV, f0.clone()).unwrap().len(), 1);
    let err = rig.handle(PREV, f0).unwrap_err();
    assert!(matches!(err, NodeError::Wire(_)), "{err:?}");

    // A parked message replayed before it runs is refused too.
    let t = rig.tag();
    let (f1, _) = rig.forward(1, t);
    assert!(rig.handle(PREV, f1.clone()).unwrap().is_empty());
    assert!(rig.handle(PREV, f1).is_err());

    // The session still works: backward 0 runs, and releases step 1 once.
    let (b0, _) = rig.backward(0, tag);
    assert_eq!(rig.handle(NEXT, b0).unwrap().len(), 2);
}

#[test]
fn a_released_message_that_fails_does_not_swallow_the_output_before_it() {
    let mut rig = Rig::new();
    rig.init();
    let t0 = rig.tag();
    let (f0, _) = rig.forward(0, t0);
    let (b0, b0_id) = rig.backward(0, t0);
    // Step 1's forward with a body of the wrong shape: parked, and it can
    // only fail once released.
    let t1 = rig.tag();
    let note = forward_note(1);
    let bad = TensorBytes::encode_f32(&[2, 5], &[0.0; 10]);
    let (f1, _) = rig.session_msg(Op::Forward, t1, note, &bad);
    assert!(rig.handle(PREV, f1).unwrap().is_empty());
    assert_eq!(rig.handle(PREV, f0).unwrap().len(), 1);
    // b0 applies the update; its "done" must still reach the designer.
    let out = rig
        .handle(NEXT, b0)
        .expect("b0's done lost because a released message failed");
    assert_eq!(out.len(), 1);
    assert_eq!(delivered(&out[0]), (b0_id, Vec::new()));
    // The session goes on: a good forward for step 1 runs.
    let t = rig.tag();
    let (f1, f1_id) = rig.forward(1, t);
    let out = rig.handle(PREV, f1).unwrap();
    assert_eq!(delivered(&out[0]), (f1_id, local_losses(2)[1].clone()));
}

/// What a refused message left behind: nothing, in sessions or bytes.
fn assert_nothing_kept(rig: &Rig, sessions: usize) {
    assert_eq!(rig.core.sessions(), sessions);
    assert_eq!(rig.core.held_bytes(), 0);
}

#[test]
fn stages_above_the_parameter_limits_are_refused_before_they_are_built() {
    // linear(2^20, 2^20): 2^40 parameters; refused at once (no allocation).
    let mut rig = Rig::new();
    let huge = StageSpec {
        input: mixnn_model::spec::Shape::flat(1 << 20),
        ops: vec![OpSpec::Linear {
            input: 1 << 20,
            output: 1 << 20,
        }],
    };
    let (msg, _) = rig.init_msg(&init_note(huge).encode());
    let started = Instant::now();
    let err = rig.handle(PREV, msg).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(matches!(err, NodeError::Limit(_)), "{err:?}");
    assert!(
        err.to_string().contains("1099512676352 parameters"),
        "{err}"
    );
    assert_nothing_kept(&rig, 0);

    // Per node: the stage has 15 parameters; two fit in 30, three do not,
    // and an audited one counts 2 + KEPT times.
    let mut rig = Rig::with_limits(Limits {
        max_node_params: 30,
        ..Limits::default()
    });
    rig.init();
    rig.init();
    let (msg, _) = rig.init_msg(&init_note(stage_spec()).encode());
    let err = rig.handle(PREV, msg).unwrap_err().to_string();
    assert!(err.contains("above the node's limit of 30"), "{err}");
    let mut rig = Rig::with_limits(Limits {
        max_node_params: 15 * mixnn_node::audit::KEPT as u64,
        ..Limits::default()
    });
    let audited = mixnn_proto::InitNote {
        audit_key: Some([8; 32]),
        ..init_note(stage_spec())
    };
    let (msg, _) = rig.init_msg(&audited.encode());
    assert!(rig.handle(PREV, msg).is_err());
    assert_nothing_kept(&rig, 0);
}

#[test]
fn sessions_per_link_key_are_capped_idle_ones_expire_and_close_ends_one() {
    let mut rig = Rig::with_limits(Limits {
        max_sessions_per_key: 2,
        session_idle: Duration::from_secs(60),
        ..Limits::default()
    });
    rig.init();
    rig.init();
    let second = rig.session.take();
    let (third, _) = rig.init_msg(&init_note(stage_spec()).encode());
    let err = rig.handle(PREV, third).unwrap_err().to_string();
    assert!(
        err.contains("2 sessions already set up over links with key"),
        "{err}"
    );
    assert_eq!(rig.core.sessions(), 2);
    rig.session = second;

    // The designer closes its (latest) session: acknowledged, gone.
    let tag = rig.tag();
    let (close, rid) = rig.session_msg(Op::Close, tag, SessionNote::Close { step: 0 }, &[]);
    let out = rig.handle(PREV, close).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(delivered(&out[0]), (rid, Vec::new()));
    assert_eq!(rig.core.sessions(), 1);
    let (f0, _) = rig.forward(0, tag);
    assert!(matches!(
        rig.handle(PREV, f0),
        Err(NodeError::UnknownSession(_))
    ));

    // A session in use does not expire; an idle one does.
    rig.init();
    rig.wait(Duration::from_secs(40));
    let tag = rig.tag();
    let (f0, _) = rig.forward(0, tag);
    assert_eq!(rig.handle(PREV, f0).unwrap().len(), 1);
    rig.wait(Duration::from_secs(40));
    assert_eq!(rig.core.expire(rig.now), 1, "the session idle for 80 s");
    assert_eq!(rig.core.sessions(), 1);
    rig.wait(Duration::from_secs(30));
    assert_eq!(rig.core.expire(rig.now), 1);
    assert_nothing_kept(&rig, 0);
}

#[test]
fn inits_outside_the_window_replayed_or_past_the_cache_are_refused_and_refused_ones_take_no_room() {
    let mut rig = Rig::with_limits(Limits {
        init_replay_capacity: 2,
        ..Limits::default()
    });
    let window = Limits::default().init_window.as_secs();
    for issued_at in [ISSUED_AT - window, ISSUED_AT + window + 2] {
        let note = mixnn_proto::InitNote {
            issued_at,
            ..init_note(stage_spec())
        };
        let (msg, _) = rig.init_msg(&note.encode());
        let err = rig.handle(PREV, msg).unwrap_err().to_string();
        assert!(err.contains("window of 600 s"), "{err}");
    }
    // Inits refused for any reason (a bad note, the wrong link, a stage
    // too big) take no room in the replay cache of two.
    for _ in 0..5 {
        let (msg, _) = rig.init_msg(&[0xa5; 100]);
        assert!(rig.handle(PREV, msg).is_err());
        let (msg, _) = rig.init_msg(&init_note(stage_spec()).encode());
        assert!(rig.handle(STRANGER, msg).is_err());
    }
    assert!(rig.core.take_accepted_inits().is_empty());
    rig.init();
    let (second, _) = rig.init_msg(&init_note(stage_spec()).encode());
    assert_eq!(rig.handle(PREV, second.clone()).unwrap().len(), 1);
    assert_eq!(rig.core.take_accepted_inits().len(), 2);
    // Its replay is refused (even once the session is closed), and with
    // two inits in the window the cache takes no new one…
    let tag = rig.tag();
    let (close, _) = rig.session_msg(Op::Close, tag, SessionNote::Close { step: 0 }, &[]);
    rig.handle(PREV, close).unwrap();
    let err = rig.handle(PREV, second.clone()).unwrap_err().to_string();
    assert!(err.contains("replayed"), "{err}");
    let (third, _) = rig.init_msg(&init_note(stage_spec()).encode());
    let err = rig.handle(PREV, third).unwrap_err().to_string();
    assert!(err.contains("replay cache full"), "{err}");
    // …until they leave the window: then the replay is refused by it.
    rig.wait(Duration::from_secs(window + 2));
    rig.core.expire(rig.now);
    let err = rig.handle(PREV, second).unwrap_err().to_string();
    assert!(err.contains("window"), "{err}");
    let fresh = mixnn_proto::InitNote {
        issued_at: rig.now.unix,
        ..init_note(stage_spec())
    };
    let (msg, _) = rig.init_msg(&fresh.encode());
    assert_eq!(rig.handle(PREV, msg).unwrap().len(), 1);
}

#[test]
fn init_tags_remembered_from_an_earlier_run_refuse_their_inits() {
    let mut rig = Rig::new();
    let (init, _) = rig.init_msg(&init_note(stage_spec()).encode());
    assert_eq!(rig.handle(PREV, init.clone()).unwrap().len(), 1);
    let tags = rig.core.take_accepted_inits();
    assert_eq!(tags.len(), 1);
    // The same node (same onion key) after a restart, with its tags…
    let mut restarted = Rig::new();
    restarted.core.remember_inits(tags, restarted.now);
    let err = restarted
        .handle(PREV, init.clone())
        .unwrap_err()
        .to_string();
    assert!(err.contains("replayed"), "{err}");
    assert_nothing_kept(&restarted, 0);
    // …and without them, which would accept it.
    let mut forgetful = Rig::new();
    assert!(forgetful.handle(PREV, init).is_ok());
}

#[test]
fn forwards_are_checked_against_the_answer_size_and_the_byte_budgets_before_any_math() {
    // A forward whose answer could not be sent: refused, nothing cached.
    let mut rig = Rig::new();
    let wide = StageSpec {
        input: mixnn_model::spec::Shape::flat(4),
        ops: vec![OpSpec::Linear {
            input: 4,
            output: 1 << 16,
        }],
    };
    let (msg, _) = rig.init_msg(&init_note(wide).encode());
    rig.handle(PREV, msg).unwrap();
    let t = rig.tag();
    let (f0, _) = rig.session_msg(
        Op::Forward,
        t,
        SessionNote::Forward(ForwardNote {
            step: 0,
            micro: Micro::WHOLE,
            batch_rows: 0,
            labels: Vec::new(),
        }),
        &input(0),
    );
    let err = rig.handle(PREV, f0).unwrap_err().to_string();
    assert!(err.contains("above the session's largest body"), "{err}");
    assert_nothing_kept(&rig, 1);

    // Activations per message.
    let mut rig = Rig::with_limits(Limits {
        max_forward_bytes: 80,
        ..Limits::default()
    });
    rig.init();
    let t = rig.tag();
    let (f0, _) = rig.forward(0, t);
    let err = rig.handle(PREV, f0).unwrap_err().to_string();
    assert!(err.contains("88 bytes of activations"), "{err}");

    // Bytes held per session: one forward's cache fits, two do not, and
    // the backward frees it.
    let mut rig = Rig::with_limits(Limits {
        max_session_bytes: 100,
        ..Limits::default()
    });
    rig.init();
    let tags = [rig.tag(), rig.tag()];
    let (f0, _) = rig.forward(0, tags[0]);
    assert_eq!(rig.handle(PREV, f0).unwrap().len(), 1);
    assert!(rig.core.held_bytes() > 0);
    let (f0b, _) = rig.forward(0, tags[1]);
    let err = rig.handle(PREV, f0b).unwrap_err().to_string();
    assert!(err.contains("above its budget of 100"), "{err}");
    let (b0, _) = rig.backward(0, tags[0]);
    assert_eq!(rig.handle(NEXT, b0).unwrap().len(), 1);
    assert_nothing_kept(&rig, 1);
}

#[test]
fn a_routing_block_must_name_where_the_init_said() {
    let mut rig = Rig::new();
    rig.init();
    let elsewhere = mixnn_wire::HopAddr("127.0.0.1:22".parse().unwrap());
    let tag = rig.tag();
    let to_other_designer = Next::Deliver {
        addr: elsewhere,
        reply_id: ReplyId([1; 16]),
    };
    let msg = rig.session_msg_to(
        Op::Loop,
        tag,
        SessionNote::Loop { step: 0 },
        &[],
        to_other_designer,
    );
    let err = rig.handle(PREV, msg).unwrap_err().to_string();
    assert!(err.contains("other than the designer's"), "{err}");
    // The note names no next hop: nothing may go on.
    let msg = rig.session_msg_to(
        Op::Loop,
        tag,
        SessionNote::Loop { step: 0 },
        &[],
        Next::Hop(elsewhere),
    );
    let err = rig.handle(PREV, msg).unwrap_err().to_string();
    assert!(err.contains("neighbour hop other than"), "{err}");
    assert!(rig
        .core
        .learned_addresses()
        .iter()
        .all(|a| *a == designer_addr()));
    // The session is fine.
    let (f0, _) = rig.forward(0, tag);
    assert_eq!(rig.handle(PREV, f0).unwrap().len(), 1);
}
