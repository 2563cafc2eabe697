//! What one node may spend, and what a message would make it spend.
//!
//! Anyone who holds a node's public onion key can set up a session with
//! any stage, padding and neighbours, so every cost a session can cause is
//! bounded here and checked *before* the node pays it: parameters at init
//! (before the stage is allocated), activations and reply sizes per message
//! (before any math), bytes held per session and per node (caches, parked
//! messages, gradients waiting for their update), and what a session may
//! make the node send ([`answer_allowance`]). All of it draws from one
//! memory budget ([`Limits::max_memory`], [`crate::memory`]). Defaults are
//! stated, with the reasons, in `SECURITY.md` ("Node limits").

use std::time::Duration;

use mixnn_model::spec::{OpSpec, StageSpec};
use mixnn_wire::DEFAULT_INIT_REPLAY_CAPACITY;

/// Bounds on what one node keeps and does. Every field is a hard limit: a
/// message that would pass one is refused (one log line) before the node
/// spends anything on it.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Forward caches kept per session (steps in flight).
    pub max_cached: usize,
    /// Early messages parked per session.
    pub max_parked: usize,
    /// Sessions (cascades) served at once.
    pub max_sessions: usize,
    /// Sessions whose init arrived over links with one key (its previous
    /// hop, or the designer for a first hop).
    pub max_sessions_per_key: usize,
    /// A session no message has reached for this long is dropped.
    pub session_idle: Duration,
    /// Parameters (weights and biases) of one stage.
    pub max_stage_params: u64,
    /// Parameters of all sessions together; an audited session counts
    /// `2 + KEPT` times (the live stage, a copy of its state, and its
    /// state before each of
    /// its last [`crate::audit::KEPT`] steps).
    pub max_node_params: u64,
    /// Bytes of activations one message may make a stage compute: its
    /// input and every op's output, as `f32`.
    pub max_forward_bytes: u64,
    /// Bytes one session may hold: forward caches, parked messages and
    /// the gradients of micro-batches waiting for their update.
    pub max_session_bytes: u64,
    /// The same over all sessions.
    pub max_node_bytes: u64,
    /// An init must have been issued at most this long before (or after)
    /// the node's clock.
    pub init_window: Duration,
    /// Inits remembered within the window (to refuse replays); when full,
    /// new inits are refused until old ones leave the window.
    pub init_replay_capacity: usize,
    /// The node's memory budget ([`crate::memory`]): what the sessions
    /// hold, the messages being read and the messages queued for links
    /// together may take three quarters of it (the rest is the process's
    /// own). The limits above are parts of it.
    pub max_memory: u64,
}

/// A session may make the node send at most this many times the cells it
/// sent the node ([`answer_allowance`]).
pub const ANSWER_RATIO: u64 = 4;

/// ... plus this many times the cells of its init, which its client paid
/// once ([`answer_allowance`]).
pub const ANSWER_INITS: u64 = 16;

/// The cells a session may have made the node send, having sent it
/// `received` cells with an init of `init` cells: a one-cell request
/// cannot buy a large answer without limit.
pub fn answer_allowance(received: u64, init: u64) -> u64 {
    received
        .saturating_mul(ANSWER_RATIO)
        .saturating_add(init.saturating_mul(ANSWER_INITS))
}

const MIB: u64 = 1 << 20;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_cached: 64,
            max_parked: 256,
            max_sessions: 64,
            max_sessions_per_key: 16,
            session_idle: Duration::from_secs(600),
            max_stage_params: 16 << 20,
            max_node_params: 128 << 20,
            max_forward_bytes: 64 * MIB,
            max_session_bytes: 256 * MIB,
            max_node_bytes: 1024 * MIB,
            init_window: Duration::from_secs(600),
            init_replay_capacity: DEFAULT_INIT_REPLAY_CAPACITY,
            max_memory: 3072 * MIB,
        }
    }
}

/// Parameters of `spec`: `(in + 1) · out` per linear op.
pub fn stage_params(spec: &StageSpec) -> u64 {
    spec.ops
        .iter()
        .map(|op| match *op {
            OpSpec::Linear { input, output } => (input as u64 + 1).saturating_mul(output as u64),
            _ => 0,
        })
        .fold(0, u64::saturating_add)
}

/// Bytes of activations a forward of `rows` rows of `cols` features makes
/// `spec` compute: the input and every op's output, as `f32`. An upper
/// bound of its cache and of the peak of its computation.
pub fn forward_bytes(spec: &StageSpec, rows: usize, cols: usize) -> u64 {
    let mut width = cols as u64;
    let mut values = width;
    for op in &spec.ops {
        width = match *op {
            OpSpec::Linear { output, .. } => output as u64,
            OpSpec::NllLoss => 1,
            _ => width,
        };
        values = values.saturating_add(width);
    }
    values.saturating_mul(rows as u64).saturating_mul(4)
}

/// Bytes of the tensor message (`f32`, rank 2) of `rows` × `cols`.
pub fn tensor_bytes(rows: usize, cols: usize) -> u64 {
    (rows as u64)
        .saturating_mul(cols as u64)
        .saturating_mul(4)
        .saturating_add(2 + 8)
}

/// Rows and columns a rank-2 tensor message announces, read from its
/// header only (the body is checked when it is decoded).
pub fn tensor_shape(body: &[u8]) -> Option<(usize, usize)> {
    if body.get(1) != Some(&2) {
        return None;
    }
    let dim = |at: usize| {
        let b = body.get(at..at + 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    Some((dim(2)?, dim(6)?))
}

/// The width of `spec`'s output for an input of `cols` features (an
/// identity stage passes any width through).
pub fn output_width(spec: &StageSpec, cols: usize) -> usize {
    spec.ops.iter().fold(cols, |w, op| match *op {
        OpSpec::Linear { output, .. } => output,
        _ => w,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mixnn_model::tensor_bytes::TensorBytes;

    fn paper_first() -> StageSpec {
        StageSpec {
            input: 784,
            ops: vec![
                OpSpec::Linear {
                    input: 784,
                    output: 128,
                },
                OpSpec::Relu,
            ],
        }
    }

    #[test]
    fn costs_of_the_paper_stage_and_of_an_enormous_one() {
        assert_eq!(stage_params(&paper_first()), 785 * 128);
        // 64 rows: input, linear output, relu output.
        assert_eq!(
            forward_bytes(&paper_first(), 64, 784),
            64 * (784 + 128 + 128) * 4
        );
        let huge = StageSpec {
            input: 1 << 20,
            ops: vec![OpSpec::Linear {
                input: 1 << 20,
                output: 1 << 20,
            }],
        };
        assert!(stage_params(&huge) > Limits::default().max_stage_params);
        // The paper stage fits the defaults many times over.
        assert!(stage_params(&paper_first()) * 100 < Limits::default().max_stage_params);
    }

    #[test]
    fn tensor_shape_reads_the_header_of_what_tensor_bytes_encodes() {
        let t = TensorBytes::encode_f32(&[3, 5], &[0.0; 15]);
        assert_eq!(tensor_shape(&t), Some((3, 5)));
        assert_eq!(tensor_bytes(3, 5), t.len() as u64);
        let p = TensorBytes::encode_pixels(&[2, 784], &[0; 1568]);
        assert_eq!(tensor_shape(&p), Some((2, 784)));
        assert_eq!(
            tensor_shape(&TensorBytes::encode_f32(&[4], &[0.0; 4])),
            None
        );
        assert_eq!(tensor_shape(&[0, 2, 1]), None);
        assert_eq!(output_width(&paper_first(), 784), 128);
    }
}
