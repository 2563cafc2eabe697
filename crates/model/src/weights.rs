//! Final weights as safetensors, named by stage and op, in PyTorch layout.
//!
//! Tensor `stage{s}.{o}.weight` is the weight of op `o` (0-based) of stage
//! `s` (0-based), shaped `[out, in]` as `torch.nn.Linear` stores it;
//! `stage{s}.{o}.bias` its bias. The file's metadata holds the model
//! description under `mixnn.model` (TOML). For the paper's MLP,
//! `stage0.1` (after the `normalize` op 0), `stage1.0`, `stage2.0` are the three
//! `nn.Linear` layers.

use std::collections::HashMap;

use safetensors::tensor::{Dtype, TensorView};
use sha2::{Digest, Sha256};

use crate::error::{ModelError, Result};
use crate::spec::ModelSpec;
use crate::stage::NamedParam;

/// The parameters of one stage.
pub type StageParams = Vec<NamedParam>;

/// Serialises every stage's parameters (engine layout in, PyTorch layout out).
pub fn to_safetensors(model: &ModelSpec, stages: &[StageParams]) -> Result<Vec<u8>> {
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (s, params) in stages.iter().enumerate() {
        for p in params {
            let (shape, values) = if p.name.ends_with(".weight") && p.shape.len() == 2 {
                transpose(p.shape[0], p.shape[1], &p.values)
            } else {
                (p.shape.clone(), p.values.clone())
            };
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            owned.push((format!("stage{s}.{}", p.name), shape, bytes));
        }
    }
    let views = owned
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| ModelError::Misuse(format!("tensor {name}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    // One metadata key only: safetensors writes its metadata map in hash
    // order, and a single key keeps the file byte-identical run to run.
    let meta: HashMap<String, String> = HashMap::from([("mixnn.model".into(), model.to_toml())]);
    safetensors::serialize(views, &Some(meta))
        .map_err(|e| ModelError::Misuse(format!("safetensors: {e}")))
}

/// The final weights as a PyTorch state dict (safetensors), for the
/// `torch.nn.Sequential` of every stage's ops in order, the loss left out
/// (`bench/pytorch_model.py`'s `build`): tensor `"{i}.weight"` of op `i`
/// of that sequence, `"{i}.ops.{j}.…"` / `"{i}.shortcut.{j}.…"` inside a
/// residual block; `linear` weights `[out, in]`, `conv2d` weights
/// `[out, in, k, k]`; batch norms' `running_mean`, `running_var` and
/// `num_batches_tracked` (the stage's training steps, `i64`). Loads with
/// `load_state_dict` (strict).
pub fn to_torch_safetensors(
    model: &ModelSpec,
    stages: &[StageParams],
    steps: u64,
) -> Result<Vec<u8>> {
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut offset = 0usize;
    for (spec, params) in model.stages.iter().zip(stages) {
        let kept = spec
            .ops
            .iter()
            .filter(|op| !matches!(op, crate::spec::OpSpec::NllLoss))
            .count();
        for p in params {
            let (op, rest) = p
                .name
                .split_once('.')
                .ok_or_else(|| ModelError::Misuse(format!("parameter {} has no op", p.name)))?;
            let op: usize = op
                .parse()
                .map_err(|_| ModelError::Misuse(format!("parameter {} has no op", p.name)))?;
            let name = format!("{}.{rest}", offset + op);
            let (shape, values) = if rest.ends_with("weight") && p.shape.len() == 2 {
                transpose(p.shape[0], p.shape[1], &p.values)
            } else {
                (p.shape.clone(), p.values.clone())
            };
            if let Some(prefix) = name.strip_suffix(".running_var") {
                owned.push((
                    format!("{prefix}.num_batches_tracked"),
                    Dtype::I64,
                    Vec::new(),
                    (steps as i64).to_le_bytes().to_vec(),
                ));
            }
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            owned.push((name, Dtype::F32, shape, bytes));
        }
        offset += kept;
    }
    let views = owned
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| ModelError::Misuse(format!("tensor {name}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta: HashMap<String, String> = HashMap::from([("mixnn.model".into(), model.to_toml())]);
    safetensors::serialize(views, &Some(meta))
        .map_err(|e| ModelError::Misuse(format!("safetensors: {e}")))
}

/// Parses a weights file back into per-stage parameters (engine layout).
pub fn from_safetensors(bytes: &[u8], stages: usize) -> Result<Vec<StageParams>> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| ModelError::Misuse(format!("safetensors: {e}")))?;
    let mut out: Vec<StageParams> = vec![Vec::new(); stages];
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    for name in names {
        let view = st
            .tensor(&name)
            .map_err(|e| ModelError::Misuse(format!("{name}: {e}")))?;
        let rest = name
            .strip_prefix("stage")
            .ok_or_else(|| ModelError::Misuse(format!("unexpected tensor {name}")))?;
        let (s, pname) = rest
            .split_once('.')
            .ok_or_else(|| ModelError::Misuse(format!("unexpected tensor {name}")))?;
        let s: usize = s
            .parse()
            .ok()
            .filter(|s| *s < stages)
            .ok_or_else(|| ModelError::Misuse(format!("tensor {name}: no such stage")))?;
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let shape = view.shape().to_vec();
        let (shape, values) = if pname.ends_with(".weight") && shape.len() == 2 {
            transpose(shape[0], shape[1], &values)
        } else {
            (shape, values)
        };
        out[s].push(NamedParam {
            name: pname.to_string(),
            shape,
            values,
        });
    }
    // Stage::params order: by op index, weight before bias.
    for params in &mut out {
        params.sort_by_key(|p| {
            let (op, kind) = p.name.split_once('.').unwrap_or((&p.name, ""));
            (op.parse::<usize>().unwrap_or(usize::MAX), kind != "weight")
        });
    }
    Ok(out)
}

/// A row-major `rows × cols` matrix as its `cols × rows` transpose (engine
/// keeps `linear` weights `[in, out]`, PyTorch `[out, in]`).
fn transpose(rows: usize, cols: usize, values: &[f32]) -> (Vec<usize>, Vec<f32>) {
    let mut t = vec![0.0f32; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = values[r * cols + c];
        }
    }
    (vec![cols, rows], t)
}

/// Lower-case hex SHA-256 of bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}
