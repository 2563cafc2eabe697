//! Optimisers, as sequences of binary32 operations (`docs/arithmetic.md`,
//! "Optimisers"): PyTorch's SGD (momentum, dampening, weight decay,
//! Nesterov) and Adam / AdamW. An optimiser's buffers (momentum, first and
//! second moments) are part of a stage's state: checkpoints, audits, state
//! digests and exports carry them.

use serde::{Deserialize, Serialize};

use crate::arith::ops;

/// Optimiser settings shared by every stage of a run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Optimizer {
    /// PyTorch's `torch.optim.SGD`.
    Sgd {
        /// Learning rate.
        lr: f32,
        /// Momentum factor μ (0: no buffer).
        #[serde(default)]
        momentum: f32,
        /// Dampening τ of the gradient in the momentum buffer.
        #[serde(default)]
        dampening: f32,
        /// L2 penalty λ added to the gradient (`g ⊕ λ ⊗ p`).
        #[serde(default)]
        weight_decay: f32,
        /// Nesterov momentum.
        #[serde(default)]
        nesterov: bool,
    },
    /// PyTorch's `torch.optim.Adam` (L2 penalty in the gradient).
    Adam {
        /// Learning rate.
        lr: f32,
        /// β₁.
        #[serde(default = "beta1")]
        beta1: f32,
        /// β₂.
        #[serde(default = "beta2")]
        beta2: f32,
        /// ε.
        #[serde(default = "adam_eps")]
        eps: f32,
        /// L2 penalty λ added to the gradient.
        #[serde(default)]
        weight_decay: f32,
    },
    /// PyTorch's `torch.optim.AdamW` (decoupled weight decay).
    Adamw {
        /// Learning rate.
        lr: f32,
        /// β₁.
        #[serde(default = "beta1")]
        beta1: f32,
        /// β₂.
        #[serde(default = "beta2")]
        beta2: f32,
        /// ε.
        #[serde(default = "adam_eps")]
        eps: f32,
        /// Decoupled weight decay λ (`p ⊗ (1 ⊖ η ⊗ λ)`), 0.01 by default.
        #[serde(default = "adamw_decay")]
        weight_decay: f32,
    },
}

fn beta1() -> f32 {
    0.9
}
fn beta2() -> f32 {
    0.999
}
fn adam_eps() -> f32 {
    1e-8
}
fn adamw_decay() -> f32 {
    0.01
}

/// The paper's optimiser, PyTorch's SGD with momentum and nothing else:
/// the form the command line's `--lr` / `--momentum` give.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sgd {
    /// Learning rate.
    pub lr: f32,
    /// Momentum factor μ (0 disables the buffer).
    pub momentum: f32,
}

impl Default for Sgd {
    fn default() -> Self {
        Sgd {
            lr: 0.01,
            momentum: 0.9,
        }
    }
}

impl From<Sgd> for Optimizer {
    fn from(s: Sgd) -> Self {
        Optimizer::Sgd {
            lr: s.lr,
            momentum: s.momentum,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
        }
    }
}

impl Default for Optimizer {
    fn default() -> Self {
        Sgd::default().into()
    }
}

/// Names of an optimiser's buffers per parameter, in state order.
pub const SGD_BUFFERS: &[&str] = &["velocity"];
/// Adam's buffers per parameter.
pub const ADAM_BUFFERS: &[&str] = &["exp_avg", "exp_avg_sq"];

impl Optimizer {
    /// Parses the model file's `[optimizer]` table.
    pub fn from_toml(value: &toml::Value) -> std::result::Result<Self, String> {
        let opt: Optimizer = value
            .clone()
            .try_into()
            .map_err(|e: toml::de::Error| e.message().replace('\n', " "))?;
        opt.check()?;
        Ok(opt)
    }

    /// The settings as the model file's `[optimizer]` table (without the
    /// header).
    pub fn to_toml(&self) -> String {
        match *self {
            Optimizer::Sgd {
                lr,
                momentum,
                dampening,
                weight_decay,
                nesterov,
            } => format!(
                "kind = \"sgd\"\nlr = {lr:?}\nmomentum = {momentum:?}\ndampening = {dampening:?}\n\
                 weight_decay = {weight_decay:?}\nnesterov = {nesterov}\n"
            ),
            Optimizer::Adam {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
            }
            | Optimizer::Adamw {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
            } => format!(
                "kind = \"{}\"\nlr = {lr:?}\nbeta1 = {beta1:?}\nbeta2 = {beta2:?}\neps = {eps:?}\n\
                 weight_decay = {weight_decay:?}\n",
                self.name()
            ),
        }
    }

    /// `sgd`, `adam` or `adamw`.
    pub fn name(&self) -> &'static str {
        match self {
            Optimizer::Sgd { .. } => "sgd",
            Optimizer::Adam { .. } => "adam",
            Optimizer::Adamw { .. } => "adamw",
        }
    }

    /// The learning rate.
    pub fn lr(&self) -> f32 {
        match *self {
            Optimizer::Sgd { lr, .. }
            | Optimizer::Adam { lr, .. }
            | Optimizer::Adamw { lr, .. } => lr,
        }
    }

    /// The buffers it keeps per parameter tensor (none for SGD without
    /// momentum).
    pub fn buffers(&self) -> &'static [&'static str] {
        match *self {
            Optimizer::Sgd { momentum: 0.0, .. } => &[],
            Optimizer::Sgd { .. } => SGD_BUFFERS,
            Optimizer::Adam { .. } | Optimizer::Adamw { .. } => ADAM_BUFFERS,
        }
    }

    /// Checks the settings: finite, learning rate ≥ 0, factors in range
    /// (PyTorch's own checks).
    pub fn check(&self) -> std::result::Result<(), String> {
        let finite = |name: &str, v: f32| {
            if v.is_finite() {
                Ok(())
            } else {
                Err(format!("{name} must be finite, got {v}"))
            }
        };
        match *self {
            Optimizer::Sgd {
                lr,
                momentum,
                dampening,
                weight_decay,
                nesterov,
            } => {
                for (n, v) in [
                    ("lr", lr),
                    ("momentum", momentum),
                    ("dampening", dampening),
                    ("weight_decay", weight_decay),
                ] {
                    finite(n, v)?;
                    if v < 0.0 {
                        return Err(format!("{n} must be ≥ 0, got {v}"));
                    }
                }
                if nesterov && (momentum == 0.0 || dampening != 0.0) {
                    return Err("Nesterov momentum needs a momentum and zero dampening".into());
                }
                Ok(())
            }
            Optimizer::Adam {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
            }
            | Optimizer::Adamw {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
            } => {
                for (n, v) in [("lr", lr), ("eps", eps), ("weight_decay", weight_decay)] {
                    finite(n, v)?;
                    if v < 0.0 {
                        return Err(format!("{n} must be ≥ 0, got {v}"));
                    }
                }
                for (n, v) in [("beta1", beta1), ("beta2", beta2)] {
                    if !(0.0..1.0).contains(&v) {
                        return Err(format!("{n} must be in [0, 1), got {v}"));
                    }
                }
                Ok(())
            }
        }
    }

    /// One update of one parameter tensor `p` with gradient `g` (the sum
    /// of the step's micro-batch gradients). `buffers` holds the
    /// optimiser's buffers of this tensor ([`Optimizer::buffers`], absent
    /// before its first update); `t` is the update's number, from 1.
    pub fn step(
        &self,
        p: &mut [f32],
        buffers: &mut Option<Vec<Vec<f32>>>,
        mut g: Vec<f32>,
        t: u64,
    ) {
        match *self {
            Optimizer::Sgd {
                lr,
                momentum,
                dampening,
                weight_decay,
                nesterov,
            } => {
                if weight_decay != 0.0 {
                    for (gi, pi) in g.iter_mut().zip(p.iter()) {
                        *gi += weight_decay * *pi;
                    }
                }
                if momentum == 0.0 {
                    ops::sgd_step(p, &mut None, g, lr, 0.0);
                    return;
                }
                let mut v = match buffers.take().and_then(|mut b| b.pop()) {
                    Some(mut v) => {
                        let keep = 1.0 - dampening;
                        for (vi, gi) in v.iter_mut().zip(&g) {
                            *vi = momentum * *vi + keep * *gi;
                        }
                        v
                    }
                    None => g.clone(),
                };
                if nesterov {
                    for ((pi, gi), vi) in p.iter_mut().zip(&g).zip(&v) {
                        *pi -= lr * (*gi + momentum * *vi);
                    }
                } else {
                    for (pi, vi) in p.iter_mut().zip(&v) {
                        *pi -= lr * *vi;
                    }
                }
                *buffers = Some(vec![std::mem::take(&mut v)]);
            }
            Optimizer::Adam {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
            }
            | Optimizer::Adamw {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
            } => {
                let decoupled = matches!(self, Optimizer::Adamw { .. });
                if weight_decay != 0.0 {
                    if decoupled {
                        let keep = 1.0 - lr * weight_decay;
                        for pi in p.iter_mut() {
                            *pi *= keep;
                        }
                    } else {
                        for (gi, pi) in g.iter_mut().zip(p.iter()) {
                            *gi += weight_decay * *pi;
                        }
                    }
                }
                let (mut m, mut v) = match buffers.take() {
                    Some(mut b) if b.len() == 2 => {
                        let v = b.pop().unwrap_or_default();
                        let m = b.pop().unwrap_or_default();
                        (m, v)
                    }
                    _ => (vec![0.0f32; p.len()], vec![0.0f32; p.len()]),
                };
                let (one_b1, one_b2) = (1.0 - beta1, 1.0 - beta2);
                for ((mi, vi), gi) in m.iter_mut().zip(v.iter_mut()).zip(&g) {
                    *mi = beta1 * *mi + one_b1 * *gi;
                    *vi = beta2 * *vi + one_b2 * (*gi * *gi);
                }
                let bc1 = 1.0 - power(beta1, t);
                let bc2 = 1.0 - power(beta2, t);
                let step_size = lr / bc1;
                let bc2_sqrt = bc2.sqrt();
                for ((pi, mi), vi) in p.iter_mut().zip(&m).zip(&v) {
                    let denom = vi.sqrt() / bc2_sqrt + eps;
                    *pi -= step_size * (*mi / denom);
                }
                *buffers = Some(vec![m, v]);
            }
        }
    }
}

const KIND_SGD: u8 = 1;
const KIND_ADAM: u8 = 2;
const KIND_ADAMW: u8 = 3;

impl Optimizer {
    /// The binary form (init notes, checkpoints): a kind byte, then the
    /// settings as little-endian binary32 bit patterns (and Nesterov's
    /// flag).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(24);
        let floats: &[f32] = match self {
            Optimizer::Sgd {
                lr,
                momentum,
                dampening,
                weight_decay,
                nesterov,
            } => {
                out.push(KIND_SGD);
                out.push(u8::from(*nesterov));
                &[*lr, *momentum, *dampening, *weight_decay]
            }
            Optimizer::Adam {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
            } => {
                out.push(KIND_ADAM);
                &[*lr, *beta1, *beta2, *eps, *weight_decay]
            }
            Optimizer::Adamw {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
            } => {
                out.push(KIND_ADAMW);
                &[*lr, *beta1, *beta2, *eps, *weight_decay]
            }
        };
        for f in floats {
            out.extend_from_slice(&f.to_bits().to_le_bytes());
        }
        out
    }

    /// Decodes the binary form from the front of `bytes`, with the bytes
    /// used; the settings are checked ([`Optimizer::check`]).
    pub fn decode(bytes: &[u8]) -> std::result::Result<(Self, usize), String> {
        let f = |i: usize, at: usize| -> std::result::Result<f32, String> {
            let s = at + 4 * i;
            bytes
                .get(s..s + 4)
                .map(|b| f32::from_bits(u32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                .ok_or_else(|| "truncated optimiser settings".to_string())
        };
        let kind = *bytes.first().ok_or("no optimiser settings")?;
        let (opt, used) = match kind {
            KIND_SGD => {
                let nesterov = match bytes.get(1) {
                    Some(0) => false,
                    Some(1) => true,
                    Some(other) => return Err(format!("Nesterov flag {other}")),
                    None => return Err("truncated optimiser settings".into()),
                };
                (
                    Optimizer::Sgd {
                        lr: f(0, 2)?,
                        momentum: f(1, 2)?,
                        dampening: f(2, 2)?,
                        weight_decay: f(3, 2)?,
                        nesterov,
                    },
                    2 + 16,
                )
            }
            KIND_ADAM | KIND_ADAMW => {
                let (lr, beta1, beta2, eps, weight_decay) =
                    (f(0, 1)?, f(1, 1)?, f(2, 1)?, f(3, 1)?, f(4, 1)?);
                let opt = if kind == KIND_ADAM {
                    Optimizer::Adam {
                        lr,
                        beta1,
                        beta2,
                        eps,
                        weight_decay,
                    }
                } else {
                    Optimizer::Adamw {
                        lr,
                        beta1,
                        beta2,
                        eps,
                        weight_decay,
                    }
                };
                (opt, 1 + 20)
            }
            other => return Err(format!("unknown optimiser kind {other}")),
        };
        opt.check()?;
        Ok((opt, used))
    }
}

/// `β^t` rounded to binary32: computed in binary64 by square-and-multiply
/// over the bits of `t` from the highest, then rounded once.
pub fn power(beta: f32, t: u64) -> f32 {
    let b = f64::from(beta);
    let mut r = 1.0f64;
    for i in (0..64).rev() {
        r *= r;
        if (t >> i) & 1 == 1 {
            r *= b;
        }
    }
    r as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_sgd_keeps_the_paper_rule() {
        let opt: Optimizer = Sgd::default().into();
        let mut p = vec![1.0f32, 2.0];
        let mut b = None;
        opt.step(&mut p, &mut b, vec![0.5, -0.5], 1);
        assert_eq!(p, vec![1.0 - 0.01 * 0.5, 2.0 + 0.01 * 0.5]);
        opt.step(&mut p, &mut b, vec![1.0, 1.0], 2);
        let v = b.unwrap().pop().unwrap();
        assert_eq!(v, vec![0.9 * 0.5 + 1.0, 0.9 * -0.5 + 1.0]);
    }

    #[test]
    fn power_is_exact_for_small_exponents_and_bounded() {
        assert_eq!(power(0.5, 3), 0.125);
        assert_eq!(power(0.9, 0), 1.0);
        assert_eq!(power(0.9, 1), 0.9);
        let direct = (0..10).fold(1.0f64, |r, _| r * f64::from(0.999f32)) as f32;
        assert_eq!(power(0.999, 10), direct);
        assert_eq!(power(0.9, u64::MAX), 0.0);
    }

    #[test]
    fn adam_first_step_moves_each_value_by_about_lr() {
        // With m = (1−β1)g, v = (1−β2)g², bias corrections make the step
        // g/|g| · lr (up to ε).
        let opt = Optimizer::Adam {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let mut p = vec![1.0f32, -1.0, 0.0];
        let mut b = None;
        opt.step(&mut p, &mut b, vec![3.0, -0.002, 0.0], 1);
        assert!((p[0] - 0.9).abs() < 1e-5, "{p:?}");
        assert!((p[1] - (-0.9)).abs() < 1e-4, "{p:?}");
        assert_eq!(p[2], 0.0);
        assert_eq!(b.as_ref().map(Vec::len), Some(2));
    }

    #[test]
    fn the_binary_form_round_trips_and_refuses_bad_settings() {
        for opt in [
            Optimizer::default(),
            Optimizer::Sgd {
                lr: 0.1,
                momentum: 0.9,
                dampening: 0.0,
                weight_decay: 5e-4,
                nesterov: true,
            },
            Optimizer::Adamw {
                lr: 1e-3,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.01,
            },
        ] {
            let b = opt.encode();
            assert_eq!(Optimizer::decode(&b).unwrap(), (opt, b.len()));
            for cut in 0..b.len() {
                assert!(Optimizer::decode(&b[..cut]).is_err());
            }
        }
        let mut b = Optimizer::default().encode();
        b[2..6].copy_from_slice(&f32::NAN.to_bits().to_le_bytes());
        assert!(Optimizer::decode(&b).unwrap_err().contains("finite"));
        assert!(Optimizer::decode(&[9]).unwrap_err().contains("unknown"));
    }

    #[test]
    fn settings_are_checked_and_round_trip() {
        for text in [
            "kind = \"sgd\"\nlr = 0.1\nmomentum = 0.9\nnesterov = true\nweight_decay = 0.0005\n",
            "kind = \"adam\"\nlr = 0.001\n",
            "kind = \"adamw\"\nlr = 0.001\nbeta2 = 0.99\n",
        ] {
            let v: toml::Value = toml::from_str(text).unwrap();
            let opt = Optimizer::from_toml(&v).unwrap();
            let again: toml::Value = toml::from_str(&opt.to_toml()).unwrap();
            assert_eq!(Optimizer::from_toml(&again).unwrap(), opt);
        }
        for bad in [
            "kind = \"sgd\"\nlr = -1.0\n",
            "kind = \"sgd\"\nlr = 0.1\nnesterov = true\n",
            "kind = \"adam\"\nlr = 0.1\nbeta1 = 1.0\n",
            "kind = \"rmsprop\"\nlr = 0.1\n",
            "kind = \"sgd\"\nlr = 0.1\nmomentun = 0.9\n",
        ] {
            let v: toml::Value = toml::from_str(bad).unwrap();
            assert!(Optimizer::from_toml(&v).is_err(), "{bad}");
        }
    }
}
