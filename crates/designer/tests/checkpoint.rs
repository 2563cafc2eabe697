#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Checkpoint files and directories: bit-exact round trips, detection of
//! every truncation and flipped byte, fallback to the previous file, pruning
//! and atomic writes.
//!
//! Over 600 lines: one test per way a checkpoint file can be wrong (and the
//! fuzz body's property tests), sharing the awkward-float samples at the
//! top.

use mixnn_model::seed::RunSeed;
use std::fs;
use std::path::Path;

use mixnn_designer::checkpoint::{
    file_name, model_digest, Checkpoint, CheckpointDir, CheckpointError, Defect, MAGIC,
};
use mixnn_model::optim::Optimizer;
use mixnn_model::stage::{NamedParam, Sgd, StageState};
use mixnn_model::trainer::{EpochMetrics, TrainConfig};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn param(name: &str, shape: Vec<usize>, values: Vec<f32>) -> NamedParam {
    NamedParam {
        name: name.into(),
        shape,
        values,
    }
}

/// A small checkpoint with awkward floats (negative zero, subnormals, the
/// extremes) in losses, metrics, settings, parameters and velocities.
fn sample(step: u64) -> Checkpoint {
    let odd = [
        -0.0f32,
        f32::MIN_POSITIVE / 3.0,
        f32::MAX,
        f32::MIN,
        0.1,
        1.0 / 3.0,
    ];
    Checkpoint {
        step,
        epoch: 1,
        position: 3,
        epoch_losses: vec![2.301_7, -0.0, f32::MIN_POSITIVE / 7.0],
        done_epochs: vec![EpochMetrics {
            epoch: 1,
            train_s: 0.1 + 0.2,
            loss: 1.0 / 3.0,
            test_acc: 5e-324,
        }],
        config: TrainConfig {
            epochs: 3,
            batch: 64,
            optimizer: Sgd {
                lr: 0.01,
                momentum: 0.9,
            }
            .into(),
            seed: RunSeed::from_bytes([0xfe; 32]),
            micro_batches: 4,
        },
        model: "paper-mlp".into(),
        model_digest: model_digest(b"[model]\nname = \"paper-mlp\"\n"),
        stages: vec![
            StageState {
                steps: step,
                tensors: vec![
                    param("0.weight", vec![2, 3], odd.to_vec()),
                    param("0.bias", vec![2], vec![0.5, -1.5]),
                    param(
                        "0.weight.velocity",
                        vec![2, 3],
                        odd.iter().map(|v| -v).collect(),
                    ),
                    param("0.bias.velocity", vec![2], vec![1e-40, -1e-40]),
                ],
            },
            StageState {
                steps: step,
                tensors: vec![],
            },
        ],
    }
}

/// A random checkpoint: every float drawn from all bit patterns but NaN.
fn random(seed: u64) -> Checkpoint {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let f32_ = |rng: &mut ChaCha8Rng| loop {
        let v = f32::from_bits(rng.next_u32());
        if !v.is_nan() {
            return v;
        }
    };
    let f64_ = |rng: &mut ChaCha8Rng| loop {
        let v = f64::from_bits(rng.next_u64());
        if !v.is_nan() {
            return v;
        }
    };
    let epoch = rng.next_u32() % 4;
    let position = (rng.next_u32() % 20) as usize;
    let epoch_losses = (0..position).map(|_| f32_(&mut rng)).collect();
    let done_epochs = (0..epoch)
        .map(|e| EpochMetrics {
            epoch: e + 1,
            train_s: f64_(&mut rng),
            loss: f64_(&mut rng),
            test_acc: f64_(&mut rng),
        })
        .collect();
    let stages = (0..1 + rng.next_u32() % 4)
        .map(|s| StageState {
            steps: rng.next_u64(),
            tensors: (0..rng.next_u32() % 5)
                .map(|t| {
                    let shape = vec![
                        1 + (rng.next_u32() % 4) as usize,
                        1 + (rng.next_u32() % 5) as usize,
                    ];
                    let values = (0..shape[0] * shape[1]).map(|_| f32_(&mut rng)).collect();
                    param(&format!("{s}.{t}.weight"), shape, values)
                })
                .collect(),
        })
        .collect();
    Checkpoint {
        step: rng.next_u64(),
        epoch,
        position,
        epoch_losses,
        done_epochs,
        config: TrainConfig {
            epochs: rng.next_u32(),
            batch: rng.next_u32() as usize,
            optimizer: match rng.next_u32() % 3 {
                0 => Sgd {
                    lr: (rng.next_u32() % 1000) as f32 / 997.0,
                    momentum: (rng.next_u32() % 1000) as f32 / 1000.0,
                }
                .into(),
                1 => Optimizer::Adam {
                    lr: (rng.next_u32() % 1000) as f32 / 997.0,
                    beta1: 0.9,
                    beta2: (rng.next_u32() % 1000) as f32 / 1001.0,
                    eps: 1e-8,
                    weight_decay: 0.0,
                },
                _ => Optimizer::Adamw {
                    lr: 1e-3,
                    beta1: (rng.next_u32() % 1000) as f32 / 1001.0,
                    beta2: 0.999,
                    eps: (rng.next_u32() % 1000) as f32 * 1e-9,
                    weight_decay: 0.01,
                },
            },
            seed: RunSeed::from_number(rng.next_u64()),
            micro_batches: rng.next_u32() as usize,
        },
        model: format!("model-{seed} ✓"),
        model_digest: model_digest(&seed.to_le_bytes()),
        stages,
    }
}

/// Every float of a checkpoint as bits, so `-0.0` and `0.0` differ.
fn float_bits(c: &Checkpoint) -> Vec<u64> {
    let mut out: Vec<u64> = c
        .epoch_losses
        .iter()
        .map(|v| u64::from(v.to_bits()))
        .collect();
    for m in &c.done_epochs {
        out.extend([m.train_s.to_bits(), m.loss.to_bits(), m.test_acc.to_bits()]);
    }
    out.extend(c.config.optimizer.encode().into_iter().map(u64::from));
    for s in &c.stages {
        for t in &s.tensors {
            out.extend(t.values.iter().map(|v| u64::from(v.to_bits())));
        }
    }
    out
}

fn assert_bit_exact(a: &Checkpoint, b: &Checkpoint) {
    assert_eq!(a, b);
    assert_eq!(float_bits(a), float_bits(b));
    assert_eq!(a.encode(), b.encode());
}

fn defect(e: CheckpointError) -> Defect {
    match e {
        CheckpointError::Corrupt { defect, .. } => defect,
        other => panic!("expected a corrupt-file error, got {other}"),
    }
}

/// Replaces the SHA-256 trailer so a hand-made change passes the checksum.
fn resign(bytes: &mut [u8]) {
    use sha2::{Digest, Sha256};
    let n = bytes.len() - 32;
    let sum = Sha256::digest(&bytes[..n]);
    bytes[n..].copy_from_slice(&sum);
}

#[test]
fn round_trip_is_bit_exact() {
    let c = sample(123);
    let d = Checkpoint::decode(&c.encode()).unwrap();
    assert_bit_exact(&c, &d);
    assert!(d.epoch_losses[1].is_sign_negative());
}

#[test]
fn random_checkpoints_round_trip_bit_exact() {
    for seed in 0..200 {
        let c = random(seed);
        let d = Checkpoint::decode(&c.encode()).unwrap();
        assert_bit_exact(&c, &d);
    }
}

#[test]
fn every_truncation_is_reported_as_truncated() {
    let bytes = sample(7).encode();
    for len in 0..bytes.len() {
        let d = defect(Checkpoint::decode(&bytes[..len]).unwrap_err());
        assert_eq!(d, Defect::Truncated { len }, "cut at {len}");
    }
}

#[test]
fn every_flipped_byte_is_detected() {
    let bytes = sample(7).encode();
    for at in 0..bytes.len() {
        for mask in [0x01u8, 0x80, 0xff] {
            let mut bad = bytes.clone();
            bad[at] ^= mask;
            assert!(
                Checkpoint::decode(&bad).is_err(),
                "flip {mask:#x} at {at} went unnoticed"
            );
        }
    }
}

#[test]
fn a_flipped_payload_byte_is_a_checksum_mismatch() {
    let mut bytes = sample(7).encode();
    // Inside the first stage's velocities: the second stage is 18 bytes.
    let at = bytes.len() - 32 - 18 - 5;
    bytes[at] ^= 0x10;
    let e = Checkpoint::decode(&bytes).unwrap_err();
    assert_eq!(e.to_string(), "checkpoint <memory>: checksum mismatch");
}

#[test]
fn appended_bytes_are_a_checksum_mismatch() {
    let mut bytes = sample(7).encode();
    bytes.extend_from_slice(b"junk");
    assert_eq!(
        defect(Checkpoint::decode(&bytes).unwrap_err()),
        Defect::ChecksumMismatch
    );
}

#[test]
fn resigned_mutations_never_panic() {
    // A file whose checksum holds but whose contents were changed (made by
    // hand, or by a bug): decode must error or succeed, never panic or
    // allocate from a forged length.
    let bytes = sample(7).encode();
    for at in 0..bytes.len() - 32 {
        for mask in [0x01u8, 0x80, 0xff] {
            let mut bad = bytes.clone();
            bad[at] ^= mask;
            resign(&mut bad);
            let _ = Checkpoint::decode(&bad);
        }
    }
}

#[test]
fn forged_lengths_are_malformed_not_allocated() {
    let c = sample(7);
    let bytes = c.encode();
    let header_len = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    let count_at = 16 + header_len;
    for forged in [u32::MAX, 3] {
        let mut bad = bytes.clone();
        bad[count_at..count_at + 4].copy_from_slice(&forged.to_le_bytes());
        resign(&mut bad);
        match defect(Checkpoint::decode(&bad).unwrap_err()) {
            Defect::Malformed(reason) => assert!(reason.contains("past the end"), "{reason}"),
            other => panic!("{other}"),
        }
    }
    let mut bad = bytes.clone();
    bad[count_at + 12..count_at + 20].copy_from_slice(&u64::MAX.to_le_bytes());
    resign(&mut bad);
    assert!(matches!(
        defect(Checkpoint::decode(&bad).unwrap_err()),
        Defect::Malformed(_)
    ));
}

#[test]
fn bad_magic_is_reported() {
    let mut bytes = sample(7).encode();
    bytes[0] = b'X';
    let e = Checkpoint::decode(&bytes).unwrap_err();
    assert_eq!(
        e.to_string(),
        "checkpoint <memory>: bad magic (not a MixNN checkpoint)"
    );
    assert_eq!(
        defect(Checkpoint::decode(b"{\"json\": true}").unwrap_err()),
        Defect::BadMagic
    );
}

#[test]
fn other_versions_are_refused_by_number() {
    let mut bytes = sample(7).encode();
    // Version 1: written before the arithmetic was versioned.
    bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
    let e = Checkpoint::decode(&bytes).unwrap_err();
    assert_eq!(
        e.to_string(),
        "checkpoint <memory>: unsupported version 1 (this build reads 2)"
    );
}

#[test]
fn a_checkpoint_of_another_arithmetic_is_refused_naming_it() {
    let mut bytes = sample(7).encode();
    let at = bytes
        .windows(10)
        .position(|w| w == b"\"arith\":2,")
        .expect("the header names its arithmetic");
    bytes[at + 8] = b'1';
    resign(&mut bytes);
    let e = Checkpoint::decode(&bytes).unwrap_err();
    assert_eq!(defect(e), Defect::OtherArith(1));
    let mut bytes = sample(7).encode();
    bytes[at + 8] = b'3';
    resign(&mut bytes);
    assert_eq!(
        Checkpoint::decode(&bytes).unwrap_err().to_string(),
        "checkpoint <memory>: computed with arith 3, this build computes arith 2 (docs/arithmetic.md)"
    );
}

#[test]
fn inconsistent_counters_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cd = CheckpointDir::open(dir.path(), 2).unwrap();
    let mut c = sample(7);
    c.position = 4;
    let e = cd.write(&c).unwrap_err();
    assert!(matches!(e, CheckpointError::Inconsistent { .. }), "{e}");
    assert!(e.to_string().contains("3 losses for position 4"), "{e}");
    assert!(matches!(
        defect(Checkpoint::decode(&c.encode()).unwrap_err()),
        Defect::Malformed(_)
    ));
    let mut c = sample(7);
    c.done_epochs.clear();
    assert!(cd.write(&c).is_err());
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn model_and_config_mismatches_are_refused() {
    let c = sample(7);
    c.ensure_model(&c.model_digest).unwrap();
    c.ensure_config(&c.config).unwrap();
    let e = c.ensure_model(&model_digest(b"other")).unwrap_err();
    assert!(matches!(e, CheckpointError::Mismatch { .. }));
    assert!(e.to_string().contains("paper-mlp"), "{e}");
    let mut config = c.config;
    config.seed = RunSeed::from_number(1);
    assert!(c.ensure_config(&config).is_err());
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

#[test]
fn write_then_latest_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let cd = CheckpointDir::open(&dir.path().join("a/b"), 3).unwrap();
    assert_eq!(cd.path(), dir.path().join("a/b"));
    assert!(cd.latest().unwrap().is_none());
    let path = cd.write(&sample(100)).unwrap();
    assert_eq!(path, cd.path().join("step-0000000100.ckpt"));
    assert_eq!(fs::read(&path).unwrap(), sample(100).encode());
    assert_eq!(Checkpoint::read(&path).unwrap(), sample(100));
    cd.write(&sample(200)).unwrap();
    let (c, warnings) = cd.latest().unwrap().unwrap();
    assert_bit_exact(&c, &sample(200));
    assert!(warnings.is_empty());
    assert_eq!(
        names(cd.path()),
        ["step-0000000100.ckpt", "step-0000000200.ckpt"]
    );
}

#[test]
fn newest_is_chosen_by_step_not_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let cd = CheckpointDir::open(dir.path(), 3).unwrap();
    cd.write(&sample(9_999_999_999)).unwrap();
    cd.write(&sample(10_000_000_000)).unwrap();
    assert_eq!(file_name(10_000_000_000), "step-10000000000.ckpt");
    let (c, _) = cd.latest().unwrap().unwrap();
    assert_eq!(c.step, 10_000_000_000);
}

#[test]
fn latest_falls_back_when_newest_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let cd = CheckpointDir::open(dir.path(), 2).unwrap();
    cd.write(&sample(100)).unwrap();
    let newest = cd.write(&sample(200)).unwrap();
    let mut bytes = fs::read(&newest).unwrap();
    let at = bytes.len() - 50;
    bytes[at] ^= 1;
    fs::write(&newest, bytes).unwrap();
    let (c, warnings) = cd.latest().unwrap().unwrap();
    assert_eq!(c, sample(100));
    assert_eq!(
        warnings,
        ["step-0000000200.ckpt: checksum mismatch; using step-0000000100.ckpt"]
    );
}

#[test]
fn latest_falls_back_when_newest_is_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let cd = CheckpointDir::open(dir.path(), 3).unwrap();
    cd.write(&sample(100)).unwrap();
    cd.write(&sample(200)).unwrap();
    let newest = cd.write(&sample(300)).unwrap();
    let bytes = fs::read(&newest).unwrap();
    fs::write(&newest, &bytes[..bytes.len() / 2]).unwrap();
    fs::write(cd.path().join("step-0000000200.ckpt"), b"").unwrap();
    let (c, warnings) = cd.latest().unwrap().unwrap();
    assert_eq!(c.step, 100);
    assert_eq!(
        warnings,
        [
            format!(
                "step-0000000300.ckpt: truncated ({} bytes); using step-0000000100.ckpt",
                bytes.len() / 2
            ),
            "step-0000000200.ckpt: truncated (0 bytes); using step-0000000100.ckpt".into(),
        ]
    );
}

#[test]
fn a_renamed_file_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let cd = CheckpointDir::open(dir.path(), 2).unwrap();
    cd.write(&sample(100)).unwrap();
    fs::write(cd.path().join(file_name(500)), sample(50).encode()).unwrap();
    let (c, warnings) = cd.latest().unwrap().unwrap();
    assert_eq!(c.step, 100);
    assert_eq!(
        warnings,
        ["step-0000000500.ckpt: holds step 50, not the step of its name; using step-0000000100.ckpt"]
    );
}

#[test]
fn no_usable_checkpoint_is_an_error_not_a_fresh_start() {
    let dir = tempfile::tempdir().unwrap();
    let cd = CheckpointDir::open(dir.path(), 2).unwrap();
    fs::write(cd.path().join(file_name(100)), b"MIXNNCKP").unwrap();
    fs::write(cd.path().join(file_name(200)), b"garbage!").unwrap();
    let e = cd.latest().unwrap_err();
    assert!(matches!(e, CheckpointError::NoneUsable { .. }));
    let msg = e.to_string();
    assert!(
        msg.ends_with(
            "step-0000000200.ckpt: bad magic (not a MixNN checkpoint); step-0000000100.ckpt: truncated (8 bytes)"
        ),
        "{msg}"
    );
}

#[test]
fn keep_two_deletes_older_files() {
    let dir = tempfile::tempdir().unwrap();
    let cd = CheckpointDir::open(dir.path(), 2).unwrap();
    for step in 1..=5 {
        cd.write(&sample(step)).unwrap();
    }
    assert_eq!(
        names(cd.path()),
        ["step-0000000004.ckpt", "step-0000000005.ckpt"]
    );
}

#[test]
fn write_removes_files_of_an_abandoned_timeline() {
    let dir = tempfile::tempdir().unwrap();
    let cd = CheckpointDir::open(dir.path(), 3).unwrap();
    cd.write(&sample(100)).unwrap();
    cd.write(&sample(200)).unwrap();
    // The run went back to step 100 and reached 150.
    cd.write(&sample(150)).unwrap();
    assert_eq!(
        names(cd.path()),
        ["step-0000000100.ckpt", "step-0000000150.ckpt"]
    );
}

#[test]
fn leftover_temp_files_are_ignored_then_removed() {
    let dir = tempfile::tempdir().unwrap();
    let cd = CheckpointDir::open(dir.path(), 2).unwrap();
    cd.write(&sample(100)).unwrap();
    // A crash between create and rename leaves a partial temp file.
    let partial = sample(200).encode();
    let tmp = cd.path().join("step-0000000200.ckpt.tmp");
    fs::write(&tmp, &partial[..partial.len() / 3]).unwrap();
    fs::write(cd.path().join("notes.txt"), b"not a checkpoint").unwrap();
    fs::write(cd.path().join("step-12x.ckpt"), b"not a checkpoint").unwrap();
    let (c, warnings) = cd.latest().unwrap().unwrap();
    assert_eq!(c.step, 100);
    assert!(warnings.is_empty(), "{warnings:?}");
    cd.write(&sample(110)).unwrap();
    assert!(!tmp.exists());
    assert_eq!(
        names(cd.path()),
        [
            "notes.txt",
            "step-0000000100.ckpt",
            "step-0000000110.ckpt",
            "step-12x.ckpt"
        ]
    );
}

#[test]
fn write_leaves_no_temp_file_and_replaces_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let cd = CheckpointDir::open(dir.path(), 2).unwrap();
    cd.write(&sample(100)).unwrap();
    let mut again = sample(100);
    again.epoch_losses[0] = 1.0;
    cd.write(&again).unwrap();
    assert_eq!(names(cd.path()), ["step-0000000100.ckpt"]);
    assert_eq!(cd.latest().unwrap().unwrap().0, again);
}

#[test]
fn a_failed_write_leaves_no_checkpoint_file() {
    let dir = tempfile::tempdir().unwrap();
    let cd = CheckpointDir::open(&dir.path().join("ckpt"), 2).unwrap();
    fs::remove_dir(cd.path()).unwrap();
    let e = cd.write(&sample(100)).unwrap_err();
    assert!(matches!(e, CheckpointError::Io { .. }), "{e}");
    assert!(e.to_string().contains("create temp file"), "{e}");
    assert!(!cd.path().exists());
}

#[test]
fn an_uncreatable_directory_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    fs::write(&file, b"").unwrap();
    let target = file.join("ckpt");
    let e = CheckpointDir::open(&target, 2).unwrap_err();
    assert!(matches!(e, CheckpointError::Io { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.starts_with(&format!(
            "{}: create checkpoint directory: ",
            target.display()
        )),
        "{msg}"
    );
}

#[test]
fn keep_below_two_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let e = CheckpointDir::open(dir.path(), 1).unwrap_err();
    assert!(matches!(e, CheckpointError::Keep { keep: 1, .. }), "{e}");
}

#[test]
fn files_start_with_the_magic() {
    assert!(sample(1).encode().starts_with(MAGIC));
}

/// The fuzz target body (`mixnn_designer::checkpoint::fuzzing`) on a
/// valid file's contents, which it signs, and on arbitrary bytes.
#[test]
fn the_fuzz_body_accepts_a_valid_file() {
    let bytes = sample(7).encode();
    let contents = &bytes[..bytes.len() - 32];
    // The body signs what it is given: the valid file decodes again.
    mixnn_designer::checkpoint::fuzzing::checkpoint(contents);
    mixnn_designer::checkpoint::fuzzing::checkpoint(&bytes);
}

mod props {
    use super::*;
    use mixnn_designer::checkpoint::fuzzing;
    use mixnn_model::fuzzing::mutate;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            fuzzing::checkpoint(&bytes);
        }

        /// A file changed behind a checksum that still holds: every
        /// mutation a fuzzer makes, not only one flipped byte.
        #[test]
        fn mutated_signed_files_never_panic(e in proptest::collection::vec(any::<u8>(), 3..24)) {
            let bytes = sample(7).encode();
            fuzzing::checkpoint(&mutate(&bytes[..bytes.len() - 32], &e));
        }
    }
}
