//! The decoders of untrusted bytes in this crate under the fuzz target
//! bodies of `mixnn_model::fuzzing`, on stable: arbitrary bytes, and
//! valid encodings (every stage of the shipped models, tensors of both
//! dtypes, both optimisers, IDX files) mutated the way a fuzzer would.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use mixnn_model::fuzzing::{self, mutate};
use mixnn_model::optim::Optimizer;
use mixnn_model::spec::ModelSpec;
use mixnn_model::tensor_bytes::TensorBytes;
use proptest::prelude::*;

fn models() -> Vec<ModelSpec> {
    [
        ("paper-mlp", include_str!("../../../models/paper-mlp.toml")),
        (
            "vgg-fmnist",
            include_str!("../../../models/vgg-fmnist.toml"),
        ),
        (
            "vgg11-cifar10",
            include_str!("../../../models/vgg11-cifar10.toml"),
        ),
    ]
    .into_iter()
    .map(|(name, text)| ModelSpec::parse(text, name).unwrap())
    .collect()
}

fn stage_samples() -> Vec<Vec<u8>> {
    models()
        .iter()
        .flat_map(|m| m.stages.iter().map(|s| s.encode()))
        .collect()
}

fn tensor_samples() -> Vec<Vec<u8>> {
    let values: Vec<f32> = (0..24).map(|i| i as f32 * 0.37 - 3.0).collect();
    vec![
        TensorBytes::encode_f32(&[2, 3, 4], &values),
        TensorBytes::encode_f32(&[4, 6], &values),
        TensorBytes::encode_pixels(&[2, 1, 3, 4], &[7; 24]),
        TensorBytes::encode_f32(&[1], &[f32::NAN]),
    ]
}

fn optimizer_samples() -> Vec<Vec<u8>> {
    vec![
        Optimizer::default().encode(),
        Optimizer::Sgd {
            lr: 0.01,
            momentum: 0.9,
            dampening: 0.0,
            weight_decay: 5e-4,
            nesterov: true,
        }
        .encode(),
        Optimizer::Adam {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
        .encode(),
        Optimizer::Adamw {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
        .encode(),
    ]
}

fn idx_samples() -> Vec<Vec<u8>> {
    let mut images = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 2];
    images.extend_from_slice(&[9; 12]);
    let mut labels = vec![0, 0, 8, 1, 0, 0, 0, 3];
    labels.extend_from_slice(&[1, 2, 3]);
    vec![images, labels, vec![5; 3073 * 2]]
}

/// Every sample is valid for its decoder, so mutations start from bytes
/// that reach past the first check.
#[test]
fn the_samples_decode() {
    for s in stage_samples() {
        let (spec, used) = mixnn_model::spec::StageSpec::decode(&s).unwrap();
        assert_eq!((spec.encode(), used), (s.clone(), s.len()));
    }
    for s in tensor_samples() {
        TensorBytes::decode(&s).unwrap();
    }
    for s in optimizer_samples() {
        assert_eq!(Optimizer::decode(&s).unwrap().1, s.len());
    }
    let idx = idx_samples();
    assert_eq!(mixnn_model::data::parse_images(&idx[0]).unwrap().3, 2);
    assert_eq!(mixnn_model::data::parse_labels(&idx[1]).unwrap(), [1, 2, 3]);
    assert!(mixnn_model::data::parse_cifar(&idx[2]).is_ok());
}

#[test]
fn the_mutator_changes_what_it_is_told_to_and_nothing_else() {
    let s = [1u8, 2, 3, 4, 5, 6];
    assert_eq!(mutate(&s, &[]), s);
    assert_eq!(mutate(&s, &[0, 1, 0x10]), [1, 2 ^ 0x11, 3, 4, 5, 6]);
    assert_eq!(mutate(&s, &[3, 2, 0]), [1, 2]);
    assert_eq!(mutate(&s, &[4, 0, 9]), [9, 1, 2, 3, 4, 5, 6]);
    assert_eq!(mutate(&s, &[5, 5, 0]), [1, 2, 3, 4, 5]);
    assert_eq!(mutate(&s, &[2, 1, 7]), [1, 0xff, 0xff, 0xff, 0xff, 6]);
    assert_eq!(mutate(&s, &[6, 4, 1]), [1, 2, 3, 4, 5, 6, 5, 6]);
    // A tail shorter than an edit is ignored.
    assert_eq!(mutate(&s, &[3, 0]), s);
}

fn edits() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 3..24)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        fuzzing::tensor_bytes(&bytes);
        fuzzing::stage_spec(&bytes);
        fuzzing::optimizer(&bytes);
        fuzzing::datasets(&bytes);
    }

    #[test]
    fn mutated_stages_never_panic(pick in any::<prop::sample::Index>(), e in edits()) {
        let samples = stage_samples();
        fuzzing::stage_spec(&mutate(pick.get::<Vec<u8>>(&samples), &e));
    }

    #[test]
    fn mutated_tensors_never_panic(pick in any::<prop::sample::Index>(), e in edits()) {
        let samples = tensor_samples();
        fuzzing::tensor_bytes(&mutate(pick.get::<Vec<u8>>(&samples), &e));
    }

    #[test]
    fn mutated_optimisers_never_panic(pick in any::<prop::sample::Index>(), e in edits()) {
        let samples = optimizer_samples();
        fuzzing::optimizer(&mutate(pick.get::<Vec<u8>>(&samples), &e));
    }

    #[test]
    fn mutated_datasets_never_panic(pick in any::<prop::sample::Index>(), e in edits()) {
        let samples = idx_samples();
        fuzzing::datasets(&mutate(pick.get::<Vec<u8>>(&samples), &e));
    }
}
