//! What one colluding hop recorded, read back ([`HopView`]).
//!
//! A hop records everything it sees of the model
//! ([`mixnn_proto::observed`]); the attacks use only part of it, so the
//! reader keeps only that part in memory:
//!
//! - its stage and the stage's final state;
//! - the training forwards of the **last epoch** (tensors in and out,
//!   labels, arrival times): the steps between the last two test phases,
//!   which a hop sees as test messages (a test's note carries the step,
//!   the number of updates so far). Those steps hold every training image
//!   once, and weights closest to the final ones;
//! - the output gradients of those steps where the output is narrow (at
//!   most [`MAX_GRAD_VALUES`] values a sample): what label inference
//!   reads;
//! - the **last test phase** (tensors in and out, in arrival order), run
//!   on the final weights.
//!
//! Files are read twice, streaming: once for the test phases' steps, once
//! to keep what falls in the window.

use std::collections::BTreeMap;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use mixnn_model::spec::StageSpec;
use mixnn_model::stage::StageState;
use mixnn_proto::observed::{test_step, Observation};

use crate::error::{AdversaryError, Result};

/// Output gradients of samples with more values than this are not kept
/// (only label inference reads gradients, at the model's class width).
pub const MAX_GRAD_VALUES: usize = 4096;

/// One training forward a hop ran.
#[derive(Debug, Clone)]
pub struct SeenForward {
    /// Arrival at the stage, µs since the Unix epoch.
    pub at_us: u64,
    /// The note's labels (the loss hop's only).
    pub labels: Vec<u32>,
    /// Tensor message received.
    pub input: Vec<u8>,
    /// Tensor message sent.
    pub output: Vec<u8>,
}

/// One test forward a hop ran.
#[derive(Debug, Clone)]
pub struct SeenTest {
    /// Tensor message received.
    pub input: Vec<u8>,
    /// Tensor message sent.
    pub output: Vec<u8>,
}

/// What one hop recorded that the attacks use.
#[derive(Debug, Clone)]
pub struct HopView {
    /// The stage it ran.
    pub spec: StageSpec,
    /// Its init named the designer as its previous hop.
    pub first: bool,
    /// Its init named the designer as its next hop.
    pub last: bool,
    /// Its stage's state when the session ended.
    pub state: StageState,
    /// The last epoch's training forwards, by (step, micro-batch).
    pub train: BTreeMap<(u64, u16), SeenForward>,
    /// Output gradients received in the same steps (narrow outputs only).
    pub grads: BTreeMap<(u64, u16), Vec<u8>>,
    /// The last test phase, in arrival order.
    pub tests: Vec<SeenTest>,
    /// The steps of every test phase seen (sorted).
    pub test_steps: Vec<u64>,
}

/// Reads `len u32 LE ‖ record` records one at a time.
fn each_record(path: &Path, mut f: impl FnMut(&[u8]) -> Result<()>) -> Result<()> {
    let io = |source| AdversaryError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut buf = Vec::new();
    loop {
        let mut len = [0u8; 4];
        match r.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(io(e)),
        }
        buf.resize(u32::from_le_bytes(len) as usize, 0);
        r.read_exact(&mut buf).map_err(io)?;
        f(&buf)?;
    }
}

impl HopView {
    /// Reads a hop's record file (`mixnn node --record-tensors`).
    pub fn load(path: &Path) -> Result<HopView> {
        let mut test_steps: Vec<u64> = Vec::new();
        each_record(path, |r| {
            if let Some(s) = test_step(r) {
                if test_steps.last() != Some(&s) {
                    test_steps.push(s);
                }
            }
            Ok(())
        })?;
        test_steps.sort_unstable();
        test_steps.dedup();
        let (lo, hi) = match test_steps.as_slice() {
            [] => (0, u64::MAX),
            [one] => (0, *one),
            [.., a, b] => (*a, *b),
        };
        let last_test = test_steps.last().copied();
        let mut stage = None;
        let mut state = None;
        let mut train = BTreeMap::new();
        let mut grads = BTreeMap::new();
        let mut tests = Vec::new();
        let bad = |source| AdversaryError::Record {
            path: path.to_path_buf(),
            source,
        };
        each_record(path, |r| {
            match Observation::decode(r).map_err(bad)? {
                Observation::Stage { spec, first, last } => stage = Some((spec, first, last)),
                Observation::Final(s) => state = Some(s),
                Observation::Forward {
                    step,
                    micro,
                    at_us,
                    labels,
                    input,
                    output,
                } if (lo..hi).contains(&step) => {
                    train.insert(
                        (step, micro),
                        SeenForward {
                            at_us,
                            labels,
                            input,
                            output,
                        },
                    );
                }
                Observation::Backward {
                    step, micro, grad, ..
                } if (lo..hi).contains(&step) => {
                    let narrow = mixnn_model::tensor_bytes::peek_shape(&grad)
                        .is_some_and(|s| s.iter().skip(1).product::<usize>() <= MAX_GRAD_VALUES);
                    if narrow {
                        grads.insert((step, micro), grad);
                    }
                }
                Observation::Test {
                    step,
                    input,
                    output,
                    ..
                } if Some(step) == last_test => tests.push(SeenTest { input, output }),
                _ => {}
            }
            Ok(())
        })?;
        let incomplete = |reason: &str| AdversaryError::Incomplete {
            path: PathBuf::from(path),
            reason: reason.into(),
        };
        let (spec, first, last) = stage.ok_or_else(|| incomplete("no stage (init) recorded"))?;
        let state = state.ok_or_else(|| {
            incomplete("no final state recorded (the session was not closed, or the file was cut)")
        })?;
        Ok(HopView {
            spec,
            first,
            last,
            state,
            train,
            grads,
            tests,
            test_steps,
        })
    }

    /// Whether the hop received pixels (it is the first stage of the
    /// model, not just the first hop).
    pub fn sees_pixels(&self) -> bool {
        self.train.values().next().is_some_and(|f| {
            f.input.first() == Some(&(mixnn_model::tensor_bytes::DType::Pixel as u8))
        })
    }

    /// Whether the hop computes the loss (its forwards carry labels).
    pub fn sees_labels(&self) -> bool {
        self.spec.is_loss()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use mixnn_model::spec::{OpSpec, Shape};
    use mixnn_model::tensor_bytes::TensorBytes;

    fn write(path: &Path, obs: &[Observation]) {
        let mut file = Vec::new();
        for o in obs {
            let b = o.encode();
            file.extend_from_slice(&(b.len() as u32).to_le_bytes());
            file.extend_from_slice(&b);
        }
        std::fs::write(path, file).unwrap();
    }

    fn forward(step: u64) -> Observation {
        Observation::Forward {
            step,
            micro: 0,
            at_us: step,
            labels: vec![1],
            input: TensorBytes::encode_pixels(&[1, 2], &[0, 255]),
            output: TensorBytes::encode_f32(&[1, 2], &[step as f32, 0.0]),
        }
    }

    #[test]
    fn a_view_keeps_the_last_epoch_and_the_last_test_phase() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hop.bin");
        let test = |step: u64, v: u8| Observation::Test {
            step,
            at_us: 0,
            input: vec![v],
            output: vec![v],
        };
        let mut obs = vec![Observation::Stage {
            spec: StageSpec {
                input: Shape::flat(2),
                ops: vec![OpSpec::Relu],
            },
            first: true,
            last: false,
        }];
        obs.extend((0..3).map(forward));
        obs.extend([test(3, 1), test(3, 2)]);
        obs.extend((3..6).map(forward));
        obs.push(Observation::Backward {
            step: 4,
            micro: 0,
            at_us: 0,
            grad: TensorBytes::encode_f32(&[1, 2], &[1.0, -1.0]),
            input_grad: Vec::new(),
        });
        obs.extend([test(6, 3), test(6, 4)]);
        obs.push(Observation::Final(StageState {
            steps: 6,
            tensors: Vec::new(),
        }));
        write(&path, &obs);
        let v = HopView::load(&path).unwrap();
        assert_eq!(v.test_steps, vec![3, 6]);
        assert_eq!(
            v.train.keys().map(|k| k.0).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        assert_eq!(v.grads.len(), 1);
        assert_eq!(
            v.tests.iter().map(|t| t.input[0]).collect::<Vec<_>>(),
            vec![3, 4]
        );
        assert!(v.first && !v.last && v.sees_pixels() && !v.sees_labels());
        assert_eq!(v.state.steps, 6);
    }

    #[test]
    fn a_record_without_its_final_state_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hop.bin");
        write(
            &path,
            &[Observation::Stage {
                spec: StageSpec {
                    input: Shape::flat(2),
                    ops: vec![OpSpec::Relu],
                },
                first: false,
                last: false,
            }],
        );
        let e = HopView::load(&path).unwrap_err().to_string();
        assert!(e.contains("no final state"), "{e}");
    }
}
