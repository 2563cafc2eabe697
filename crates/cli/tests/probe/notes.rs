//! Notes and bodies as an honest designer would write them, for the
//! probe's sessions (the probe itself builds the onions).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use mixnn_model::optim::Optimizer;
use mixnn_model::spec::{OpSpec, StageSpec};
use mixnn_model::tensor_bytes::TensorBytes;
use mixnn_proto::{BackwardNote, ChunkNote, ForwardNote, InitNote, Micro, SessionNote};
use mixnn_wire::{Op, PaddingPolicy, FIRST_CELL_BODY};

use super::Probe;

pub fn linear(input: usize, output: usize) -> OpSpec {
    OpSpec::Linear { input, output }
}

pub fn stage(input: usize, ops: Vec<OpSpec>) -> StageSpec {
    StageSpec {
        input: mixnn_model::spec::Shape::flat(input),
        ops,
    }
}

/// Seconds since the Unix epoch (an init's issue time).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An init note for a one-hop session of the probe: the probe's link
/// `prev` sends it forward traffic, and it delivers to the probe.
pub fn init_note(
    stage: StageSpec,
    policy: PaddingPolicy,
    prev: [u8; 32],
    probe: &Probe,
) -> InitNote {
    let me = *probe.key.public().as_bytes();
    InitNote {
        arith: mixnn_model::arith::ARITH_VERSION,
        stage,
        optimizer: Optimizer::default(),
        seed: 1,
        start_step: 0,
        padding: policy,
        issued_at: unix_now(),
        prev_link: prev,
        next_link: me,
        designer_link: me,
        prev_addr: None,
        next_addr: None,
        designer_addr: Some(probe.addr),
        reply_key: [0x5e; 32],
        audit_key: None,
    }
}

pub fn note(stage: StageSpec, policy: PaddingPolicy, prev: [u8; 32], probe: &Probe) -> Vec<u8> {
    init_note(stage, policy, prev, probe).encode()
}

pub const ONE_CELL: PaddingPolicy = PaddingPolicy::Uniform {
    max_body: FIRST_CELL_BODY,
};

pub fn rows(rows: usize, cols: usize) -> Vec<u8> {
    TensorBytes::encode_f32(&[rows, cols], &vec![0.5; rows * cols])
}

/// The note of step 0 for `op`, as an honest designer would write it
/// (backwards ask for the input gradient).
pub fn note_for(op: Op) -> SessionNote {
    match op {
        Op::Forward => SessionNote::Forward(ForwardNote {
            step: 0,
            micro: Micro::WHOLE,
            batch_rows: 0,
            labels: Vec::new(),
        }),
        Op::Backward => SessionNote::Backward(BackwardNote {
            step: 0,
            micro: Micro::WHOLE,
            need_input_grad: true,
        }),
        Op::Fetch => SessionNote::Fetch(ChunkNote { step: 0, chunk: 0 }),
        Op::Close => SessionNote::Close { step: 0 },
        _ => SessionNote::Loop { step: 0 },
    }
}

/// `payload` with the commitment trailer a designer holding `audit_key`
/// fills for a one-hop session's message `pass` of `step` (micro-batch
/// 0): what an audited node takes before any math.
pub fn audited_body(
    audit_key: &[u8; 32],
    payload: Vec<u8>,
    step: u64,
    pass: mixnn_proto::trailer::Pass,
) -> Vec<u8> {
    use mixnn_proto::trailer::{fill, SlotContext, TrailerKeys};
    let keys = TrailerKeys::new(audit_key);
    let ctx = SlotContext {
        step,
        pass,
        index: 0,
    };
    [payload, fill(&[&keys], &ctx, &[0x3c; 32]).unwrap()].concat()
}
