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

use mixnn_model::spec::StageSpec;
use mixnn_model::tensor_bytes::f32_message_len;
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
    /// Bytes one session may hold: forward caches, parked messages, the
    /// gradients of micro-batches waiting for their update and, audited,
    /// the openings of its last [`mixnn_proto::audit::KEPT`] steps.
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
            // An audited VGG-size session (batch 64, 6.4 MB activations)
            // keeps 16 steps of openings: about 300 MiB at a hop that
            // takes a stage's pooling (256 MiB stalled it at step 16).
            max_session_bytes: 1024 * MIB,
            max_node_bytes: 2048 * MIB,
            init_window: Duration::from_secs(600),
            init_replay_capacity: DEFAULT_INIT_REPLAY_CAPACITY,
            max_memory: 3072 * MIB,
        }
    }
}

/// Values a stage of `spec` holds: its parameters and buffers (batch
/// norms' running statistics), from the description
/// ([`StageSpec::param_count`]).
pub fn stage_params(spec: &StageSpec) -> u64 {
    (spec.param_count() as u64).saturating_add(spec.buffer_count() as u64)
}

/// Bytes of activations a forward of a message of `shape` (`[rows, …]`)
/// makes `spec` compute, as `f32` ([`StageSpec::forward_values`]): an
/// upper bound of its cache and of the peak of its computation. An
/// identity stage keeps nothing and copies its input once.
pub fn forward_bytes(spec: &StageSpec, shape: &[usize]) -> u64 {
    let rows = shape.first().copied().unwrap_or(0);
    let values = if spec.is_identity() {
        shape.iter().fold(2u64, |n, d| n.saturating_mul(*d as u64))
    } else {
        spec.forward_values(rows)
    };
    values.saturating_mul(4)
}

/// Whether a message of `shape` (`[rows, …]`) fits the input of `spec`:
/// its sample dimensions are the stage's (an identity stage takes any).
pub fn fits_input(spec: &StageSpec, shape: &[usize]) -> bool {
    match shape.split_first() {
        Some((rows, dims)) => *rows > 0 && (spec.is_identity() || dims == spec.input.dims()),
        None => false,
    }
}

/// Bytes of the answer to a training forward (`test` false) or a test of
/// a message of `shape`: the loss `[1, 1]`, the stage's output (its
/// evaluation output for a test), or the input's shape for an identity
/// stage.
pub fn answer_bytes(spec: &StageSpec, shape: &[usize], test: bool) -> u64 {
    let rows = shape.first().copied().unwrap_or(0);
    if spec.is_identity() {
        f32_message_len(shape)
    } else if !test && spec.is_loss() {
        f32_message_len(&[1, 1])
    } else if test {
        f32_message_len(&spec.eval_output().batched(rows))
    } else {
        f32_message_len(&spec.output().batched(rows))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mixnn_model::spec::{OpSpec, Shape};
    use mixnn_model::tensor_bytes::TensorBytes;

    fn paper_first() -> StageSpec {
        StageSpec {
            input: Shape::flat(784),
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
            forward_bytes(&paper_first(), &[64, 784]),
            64 * (784 + 128 + 128) * 4
        );
        let huge = StageSpec {
            input: Shape::flat(1 << 20),
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
    fn answers_and_inputs_are_sized_from_the_description() {
        let t = TensorBytes::encode_f32(&[3, 128], &[0.0; 384]);
        assert_eq!(
            answer_bytes(&paper_first(), &[3, 784], false),
            t.len() as u64
        );
        assert!(fits_input(&paper_first(), &[3, 784]));
        assert!(!fits_input(&paper_first(), &[3, 1, 28, 28]));
        assert!(!fits_input(&paper_first(), &[0, 784]));
        let conv = StageSpec {
            input: Shape::image(1, 28, 28),
            ops: vec![OpSpec::Conv2d {
                in_channels: 1,
                out_channels: 8,
                kernel: 3,
                stride: 1,
                padding: 1,
                bias: true,
            }],
        };
        assert!(fits_input(&conv, &[2, 1, 28, 28]));
        assert!(!fits_input(&conv, &[2, 784]));
        let out = TensorBytes::encode_f32(&[2, 8, 28, 28], &vec![0.0; 2 * 8 * 784]);
        assert_eq!(
            answer_bytes(&conv, &[2, 1, 28, 28], false),
            out.len() as u64
        );
        // input, output and one image's columns.
        assert_eq!(
            forward_bytes(&conv, &[2, 1, 28, 28]),
            4 * (2 * 784 + 2 * 8 * 784 + 9 * 784)
        );
    }

    /// What an audited session of `spec` holds at most, by the node's own
    /// counts, with messages of `rows` rows: the openings of the last
    /// [`mixnn_proto::audit::KEPT`] steps (input, output and both
    /// gradients each) and the forward caches of the designer's default
    /// window of 4 steps in flight.
    fn audited_session_bytes(spec: &StageSpec, rows: usize) -> u64 {
        let input = f32_message_len(&spec.input.batched(rows));
        let output = answer_bytes(spec, &spec.input.batched(rows), false);
        let kept = mixnn_proto::audit::KEPT as u64;
        let openings = kept * 2 * (input + output);
        let caches = 4 * forward_bytes(spec, &spec.input.batched(rows));
        openings + caches
    }

    /// The default limits admit an audited session of every stage of the
    /// shipped models at batch 64, and of both halves of every split a
    /// dummy can make (a dummy takes the last op of the stage before it).
    /// With 256 MiB a session, the VGG cascade's dummy after stage 1
    /// (taking its pooling: 6.4 MB inputs) was refused at step 16 and the
    /// run stalled.
    #[test]
    fn default_limits_admit_audited_sessions_of_the_shipped_models() {
        let limits = Limits::default();
        for (name, text) in [
            ("paper-mlp", include_str!("../../../models/paper-mlp.toml")),
            (
                "vgg-fmnist",
                include_str!("../../../models/vgg-fmnist.toml"),
            ),
        ] {
            let model = mixnn_model::spec::ModelSpec::parse(text, name).unwrap();
            let mut stages = Vec::new();
            for stage in &model.stages {
                stages.push(stage.clone());
                if stage.ops.len() >= 2 {
                    let mut kept = stage.clone();
                    let last = kept.ops.pop().unwrap();
                    stages.push(StageSpec {
                        input: kept.output(),
                        ops: vec![last],
                    });
                    stages.push(kept);
                }
            }
            for spec in &stages {
                let need = audited_session_bytes(spec, 64);
                assert!(
                    need <= limits.max_session_bytes,
                    "{name}: a stage of {:?} holds up to {} MiB audited, above the default {} MiB",
                    spec.ops,
                    need >> 20,
                    limits.max_session_bytes >> 20
                );
                assert!(need <= limits.max_node_bytes);
            }
        }
    }
}
