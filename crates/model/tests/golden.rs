#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]
//! Every op's forward and backward, batch norm's running statistics and
//! evaluation, and every optimiser against golden vectors computed with
//! PyTorch (`tests/golden/make_golden.py`, which wrote `ops.json`), within
//! float tolerance: MixNN's sums run in their own fixed order, PyTorch's in
//! another, so the bits differ but not the values.

use serde_json::Value;

use mixnn_model::arith::Matrix;
use mixnn_model::optim::Optimizer;
use mixnn_model::spec::{ModelSpec, Shape};
use mixnn_model::stage::{Micro, NamedParam, Sgd, Stage};

const GOLDEN: &str = include_str!("golden/ops.json");

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let tol = 1e-5 + 1e-4 * w.abs();
        assert!(
            (g - w).abs() <= tol,
            "{what}[{i}]: MixNN {g} vs PyTorch {w}"
        );
    }
}

/// `[out, in]` (PyTorch's linear weight) to `[in, out]` (MixNN's).
fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; v.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = v[r * cols + c];
        }
    }
    t
}

fn engine_layout(shape: &[usize], values: Vec<f32>) -> Vec<f32> {
    if shape.len() == 2 {
        transpose(&values, shape[0], shape[1])
    } else {
        values
    }
}

#[test]
fn ops_match_pytorch() {
    let golden: Value = serde_json::from_str(GOLDEN).unwrap();
    let cases = golden["ops"].as_array().unwrap();
    assert!(cases.len() >= 14);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let input = Shape(
            case["input"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect(),
        );
        let ops = case["ops"].to_string();
        let labels: Option<Vec<u32>> = case.get("labels").map(|l| {
            l.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect()
        });
        // A model of one stage, parsed from the case's ops (JSON is TOML's
        // inline-table syntax with `:` for `=`).
        let toml_ops = json_to_toml(&case["ops"]);
        let text = format!("input = {}\n[[stage]]\nops = {toml_ops}\n", input);
        let model = ModelSpec::parse(&text, name).unwrap_or_else(|e| panic!("{name}: {e} ({ops})"));
        let spec = &model.stages[0];
        let mut stage = Stage::new(
            spec,
            1,
            Sgd {
                lr: 0.0,
                momentum: 0.0,
            },
        );
        let mut params: Vec<NamedParam> = stage.params();
        for p in &mut params {
            if let Some(src) = case["params"].get(&p.name) {
                let shape: Vec<usize> = src["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize)
                    .collect();
                p.values = engine_layout(&shape, floats(&src["values"]));
            } else {
                assert!(
                    p.name.contains("running"),
                    "{name}: no golden value for {}",
                    p.name
                );
            }
        }
        stage.load_params(&params).unwrap();
        let batch = case["batch"].as_u64().unwrap() as usize;
        let x = Matrix::new(batch, input.numel(), floats(&case["x"])).unwrap();
        let (y, cache) = stage
            .forward_step(
                x.clone(),
                labels.as_deref(),
                Micro {
                    index: 0,
                    batch_rows: batch,
                },
            )
            .unwrap();
        close(&format!("{name}: y"), y.as_slice(), &floats(&case["y"]));
        let g = case
            .get("r")
            .map(|r| Matrix::new(batch, spec.output().numel(), floats(r)).unwrap());
        let dx = stage.backward_micro(cache, g, true, 0).unwrap().unwrap();
        close(&format!("{name}: dx"), dx.as_slice(), &floats(&case["dx"]));
        let grads = stage.pending_gradients();
        let want = case["grads"].as_object().unwrap();
        assert_eq!(grads.len(), want.len(), "{name}: gradients");
        for g in &grads {
            let src = &case["params"][&g.name];
            let shape: Vec<usize> = src["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            close(
                &format!("{name}: d{}", g.name),
                &g.values,
                &engine_layout(&shape, floats(&want[&g.name])),
            );
        }
        if let Some(after) = case.get("buffers_after").and_then(Value::as_object) {
            if after.is_empty() {
                continue;
            }
            stage.apply();
            let now = stage.params();
            for (bname, values) in after {
                let p = now.iter().find(|p| &p.name == bname).unwrap();
                close(&format!("{name}: {bname}"), &p.values, &floats(values));
            }
            let y = stage.forward_eval(x).unwrap();
            close(
                &format!("{name}: eval"),
                y.as_slice(),
                &floats(&case["y_eval"]),
            );
        }
    }
}

#[test]
fn optimisers_match_pytorch() {
    let golden: Value = serde_json::from_str(GOLDEN).unwrap();
    let cases = golden["optimizers"].as_array().unwrap();
    assert_eq!(cases.len(), 6);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let spec: toml::Value = toml::from_str(&json_table_to_toml(&case["optimizer"])).unwrap();
        let opt = Optimizer::from_toml(&spec).unwrap();
        let mut p = floats(&case["start"]);
        let mut buffers = None;
        for (t, (g, after)) in case["grads"]
            .as_array()
            .unwrap()
            .iter()
            .zip(case["after"].as_array().unwrap())
            .enumerate()
        {
            opt.step(&mut p, &mut buffers, floats(g), t as u64 + 1);
            close(&format!("{name}: step {}", t + 1), &p, &floats(after));
        }
    }
}

/// A JSON value as TOML (inline tables and arrays).
fn json_to_toml(v: &Value) -> String {
    match v {
        Value::Array(a) => format!(
            "[{}]",
            a.iter().map(json_to_toml).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(o) => format!(
            "{{ {} }}",
            o.iter()
                .map(|(k, v)| format!("{k} = {}", json_to_toml(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Value::Number(n) if n.is_f64() => format!("{:?}", n.as_f64().unwrap()),
        other => other.to_string(),
    }
}

fn json_table_to_toml(v: &Value) -> String {
    v.as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| format!("{k} = {}\n", json_to_toml(v)))
        .collect()
}
