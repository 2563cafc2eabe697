//! Same seed, same bits: across runs, and between the byte API a node
//! serves and the in-memory chain of the local trainer.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use mixnn_model::seed::RunSeed;
use mixnn_model::spec::ModelSpec;
use mixnn_model::stage::{Sgd, Stage};
use mixnn_model::tensor_bytes::TensorBytes;
use mixnn_model::trainer::{stage_seed, Batch, LocalModel, StepRunner};
use mixnn_model::weights;

mod common;
use common::synthetic_batches;

const PAPER: &str = include_str!("../../../models/paper-mlp.toml");

fn train_local(seed: u64, batches: &[Batch]) -> Vec<u8> {
    let model = ModelSpec::parse(PAPER, "paper").unwrap();
    let mut local = LocalModel::new(&model, &RunSeed::from_number(seed), Sgd::default());
    local.train_batches(batches, &mut |_| {}).unwrap();
    weights::to_safetensors(&model, &local.params().unwrap()).unwrap()
}

#[test]
fn same_seed_gives_byte_identical_weight_files() {
    let batches = synthetic_batches(20, 64, 9);
    let a = train_local(7, &batches);
    let b = train_local(7, &batches);
    assert_eq!(a, b);
    let c = train_local(8, &batches);
    assert_ne!(a, c);
}

#[test]
fn byte_api_stage_by_stage_equals_chained_in_memory_after_200_steps() {
    let model = ModelSpec::parse(PAPER, "paper").unwrap();
    let sgd = Sgd::default();
    let seed = RunSeed::from_number(1234);
    // The last batch is short, as the end of an epoch is.
    let mut batches = synthetic_batches(199, 64, 5);
    batches.extend(synthetic_batches(1, 48, 6));

    let mut local = LocalModel::new(&model, &seed, sgd);
    let local_losses = local.train_batches(&batches, &mut |_| {}).unwrap();

    let mut stages: Vec<Stage> = model
        .stages
        .iter()
        .enumerate()
        .map(|(i, s)| Stage::new(s, stage_seed(&seed, i), sgd))
        .collect();
    let mut remote_losses = Vec::new();
    for b in &batches {
        let mut msg = TensorBytes::encode_pixels(&[b.rows, 784], &b.pixels);
        let mut caches = Vec::new();
        for stage in &stages {
            let labels = stage.spec().is_loss().then_some(b.labels.as_slice());
            let (out, cache) = stage.forward_bytes(&msg, labels).unwrap();
            caches.push(cache);
            msg = out;
        }
        remote_losses.push(TensorBytes::decode(&msg).unwrap().values[0]);
        let mut grad: Option<Vec<u8>> = None;
        for (i, (stage, cache)) in stages.iter_mut().zip(caches).enumerate().rev() {
            grad = stage.backward_bytes(cache, grad.as_deref(), i > 0).unwrap();
        }
    }
    let loss_bits = |v: &[f32]| v.iter().map(|l| l.to_bits()).collect::<Vec<_>>();
    assert_eq!(loss_bits(&local_losses), loss_bits(&remote_losses));
    let remote: Vec<_> = stages.iter().map(Stage::params).collect();
    assert_eq!(
        weights::to_safetensors(&model, &local.params().unwrap()).unwrap(),
        weights::to_safetensors(&model, &remote).unwrap()
    );
    // And training did move the weights and lower the loss.
    assert!(remote_losses[190..].iter().sum::<f32>() < remote_losses[..10].iter().sum::<f32>());
}

#[test]
fn exported_safetensors_have_pytorch_names_and_shapes() {
    let model = ModelSpec::parse(PAPER, "paper").unwrap();
    let local = LocalModel::new(
        &model,
        &mixnn_model::seed::RunSeed::from_number(1),
        Sgd::default(),
    );
    let bytes = weights::to_safetensors(&model, &local.stage_params()).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<(String, Vec<usize>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().to_vec()))
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            ("stage0.1.bias".to_string(), vec![128]),
            ("stage0.1.weight".to_string(), vec![128, 784]),
            ("stage1.0.bias".to_string(), vec![64]),
            ("stage1.0.weight".to_string(), vec![64, 128]),
            ("stage2.0.bias".to_string(), vec![10]),
            ("stage2.0.weight".to_string(), vec![10, 64]),
        ]
    );
    // PyTorch layout: weight[out][in] is the engine's W[in][out].
    let w = st.tensor("stage0.1.weight").unwrap();
    let engine_w = &local.stage_params()[0][0];
    let at = |o: usize, i: usize| {
        let k = (o * 784 + i) * 4;
        f32::from_le_bytes(w.data()[k..k + 4].try_into().unwrap())
    };
    assert_eq!(at(5, 700), engine_w.values[700 * 128 + 5]);
    let back = weights::from_safetensors(&bytes, 5).unwrap();
    assert!(
        back == local.stage_params(),
        "re-imported parameters differ"
    );
}
