#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The node's state machine without sockets: a designer built from the wire
//! crate talks to one `Core` (a one-hop cascade) message by message.

use std::net::SocketAddr;

use mixnn_model::spec::{OpSpec, StageSpec};
use mixnn_model::stage::{Sgd, Stage};
use mixnn_model::tensor_bytes::TensorBytes;
use mixnn_node::{Core, Limits, NodeError, Outbound};
use mixnn_proto::{BackwardNote, ForwardNote, InitNote, Micro, SessionNote};
use mixnn_wire::{
    decode_cells, encode_cells, wrap_init, CellKind, DesignerSession, HopLayer, HopTag, Message,
    Next, OnionSecret, Op, PaddingPolicy, ReplyId, RoutingBlock,
};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

/// Link keys of the hop's neighbours in these tests.
const PREV: [u8; 32] = [1; 32];
const NEXT: [u8; 32] = [2; 32];
const DESIGNER: [u8; 32] = [3; 32];
const STRANGER: [u8; 32] = [9; 32];
const SEED: u64 = 42;
const POLICY: PaddingPolicy = PaddingPolicy::Classes;

fn designer_addr() -> SocketAddr {
    "127.0.0.1:9999".parse().unwrap()
}

/// A whole small model in one stage: linear 4→3, log-softmax, NLL loss.
fn stage_spec() -> StageSpec {
    StageSpec {
        input: 4,
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
        stage,
        sgd: Sgd::default(),
        seed: SEED,
        start_step: 0,
        max_body: 0,
        prev_link: PREV,
        next_link: NEXT,
        designer_link: DESIGNER,
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

/// A designer and one node.
struct Rig {
    core: Core,
    onion: mixnn_wire::OnionPublic,
    rng: ChaCha20Rng,
    session: Option<DesignerSession>,
}

impl Rig {
    fn new() -> Rig {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let secret = OnionSecret::generate(&mut rng);
        let onion = secret.public();
        Rig {
            core: Core::new(secret, [5; 32], Limits::default()),
            onion,
            rng,
            session: None,
        }
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
        (message(CellKind::Init, &onion, &[]), rid)
    }

    /// Sets up a valid session; asserts the acknowledgement.
    fn init(&mut self) {
        let (msg, rid) = self.init_msg(&init_note(stage_spec()).encode());
        let out = self.core.handle(PREV, msg).unwrap();
        assert_eq!(out.len(), 1);
        let (got, body) = delivered(&out[0]);
        assert_eq!(got, rid.0);
        assert!(body.is_empty());
        assert_eq!(self.core.sessions(), 1);
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
        let block = RoutingBlock {
            op,
            next: Next::Deliver {
                addr: mixnn_wire::HopAddr(designer_addr()),
                reply_id: rid,
            },
            tag,
        };
        let note = note.encode();
        let onion = self
            .session
            .as_mut()
            .unwrap()
            .wrap(&[0], &[HopLayer { block, note: &note }], &mut self.rng)
            .unwrap();
        (message(CellKind::Session, &onion, body), rid.0)
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
    let mut stage = Stage::new(&stage_spec(), SEED, Sgd::default());
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
        input: 4,
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
    let err = rig.core.handle(PREV, msg).unwrap_err();
    assert!(matches!(err, NodeError::Proto(_)), "{err:?}");
    assert!(err.to_string().contains("init note"), "{err}");
    assert_eq!(rig.core.sessions(), 0);

    // Garbage instead of a note.
    let (msg, _) = rig.init_msg(&[0xa5; 100]);
    let err = rig.core.handle(PREV, msg).unwrap_err();
    assert!(matches!(err, NodeError::Proto(_)), "{err:?}");
    assert!(err.to_string().starts_with("protocol: "), "{err}");
    assert_eq!(rig.core.sessions(), 0);

    // A valid note from a link other than the one it names as previous.
    let (msg, _) = rig.init_msg(&init_note(stage_spec()).encode());
    let err = rig.core.handle(STRANGER, msg).unwrap_err();
    assert!(matches!(err, NodeError::Refused(_)), "{err:?}");
    assert_eq!(rig.core.sessions(), 0);

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
    let err = rig.core.handle(STRANGER, msg.clone()).unwrap_err();
    assert!(
        matches!(err, NodeError::UnknownPeer { .. }),
        "expected UnknownPeer, got {err:?}"
    );
    // Refusing it did not use up the packet: from the previous hop it runs.
    let out = rig.core.handle(PREV, msg).unwrap();
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
    assert!(rig.core.handle(PREV, f1).unwrap().is_empty());
    // Step 0's forward runs; step 1 stays parked (no update applied yet).
    let out = rig.core.handle(PREV, f0).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(delivered(&out[0]), (f0_id, want[0].clone()));
    // Step 0's backward applies the update, then releases step 1: its
    // output comes after the backward's, computed on the updated weights.
    let out = rig.core.handle(NEXT, b0).unwrap();
    assert_eq!(out.len(), 2);
    assert_eq!(delivered(&out[0]), (b0_id, Vec::new()));
    assert_eq!(delivered(&out[1]), (f1_id, want[1].clone()));
    let out = rig.core.handle(NEXT, b1).unwrap();
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
    assert!(rig.core.handle(NEXT, b0).unwrap().is_empty());
    let out = rig.core.handle(PREV, f0).unwrap();
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
    assert_eq!(rig.core.handle(PREV, f0).unwrap().len(), 1);
    assert_eq!(rig.core.handle(NEXT, b0).unwrap().len(), 1);
    // A new packet (fresh counter) for step 0, which the stage has passed.
    let t = rig.tag();
    let (again, _) = rig.forward(0, t);
    let err = rig.core.handle(PREV, again).unwrap_err();
    assert!(
        matches!(err, NodeError::Stale { step: 0, at: 1, .. }),
        "expected Stale, got {err:?}"
    );
    // The stage is still at step 1.
    let t = rig.tag();
    let (f1, f1_id) = rig.forward(1, t);
    let out = rig.core.handle(PREV, f1).unwrap();
    assert_eq!(delivered(&out[0]), (f1_id, local_losses(2)[1].clone()));
}

#[test]
fn replayed_messages_are_refused() {
    let mut rig = Rig::new();
    let (init, _) = rig.init_msg(&init_note(stage_spec()).encode());
    assert_eq!(rig.core.handle(PREV, init.clone()).unwrap().len(), 1);
    let err = rig.core.handle(PREV, init).unwrap_err();
    assert!(matches!(err, NodeError::Wire(_)), "{err:?}");
    assert_eq!(rig.core.sessions(), 1);

    let tag = rig.tag();
    let (f0, _) = rig.forward(0, tag);
    assert_eq!(rig.core.handle(PREV, f0.clone()).unwrap().len(), 1);
    let err = rig.core.handle(PREV, f0).unwrap_err();
    assert!(matches!(err, NodeError::Wire(_)), "{err:?}");

    // A parked message replayed before it runs is refused too.
    let t = rig.tag();
    let (f1, _) = rig.forward(1, t);
    assert!(rig.core.handle(PREV, f1.clone()).unwrap().is_empty());
    assert!(rig.core.handle(PREV, f1).is_err());

    // The session still works: backward 0 runs, and releases step 1 once.
    let (b0, _) = rig.backward(0, tag);
    assert_eq!(rig.core.handle(NEXT, b0).unwrap().len(), 2);
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
    assert!(rig.core.handle(PREV, f1).unwrap().is_empty());
    assert_eq!(rig.core.handle(PREV, f0).unwrap().len(), 1);
    // b0 applies the update; its "done" must still reach the designer.
    let out = rig
        .core
        .handle(NEXT, b0)
        .expect("b0's done lost because a released message failed");
    assert_eq!(out.len(), 1);
    assert_eq!(delivered(&out[0]), (b0_id, Vec::new()));
    // The session goes on: a good forward for step 1 runs.
    let t = rig.tag();
    let (f1, f1_id) = rig.forward(1, t);
    let out = rig.core.handle(PREV, f1).unwrap();
    assert_eq!(delivered(&out[0]), (f1_id, local_losses(2)[1].clone()));
}
