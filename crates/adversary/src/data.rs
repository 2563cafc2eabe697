//! The colluders' data, drawn from their records: tensors as rows, the
//! labels they learn (from the loss hop's notes, or from an output
//! gradient), the training images the first stage saw, and the input and
//! output pairs of the hops they do not hold.

use std::collections::BTreeMap;

use mixnn_model::tensor_bytes::TensorBytes;
use serde::{Deserialize, Serialize};

use crate::chain::Rows;
use crate::error::{AdversaryError, Result};
use crate::view::HopView;

/// A training forward's key in every hop's record: step and micro-batch.
pub type Key = (u64, u16);

/// Images (as the model reads them, `p / 255`) with labels.
#[derive(Debug, Clone, Default)]
pub struct Labeled {
    /// One row per image.
    pub x: Rows,
    /// One class per image.
    pub y: Vec<u32>,
}

impl Labeled {
    /// Appends `other`.
    pub fn extend(&mut self, other: &Labeled) {
        self.x.extend(&other.x);
        self.y.extend_from_slice(&other.y);
    }
}

/// Where the colluders' labels come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LabelSource {
    /// They learn no labels.
    None,
    /// The loss hop's forward notes carry them.
    LossHop,
    /// The gradient a hop receives for a class-wide output has exactly
    /// one negative value a row, at the label (`softmax − one-hot` for
    /// logits, `−one-hot` for log-probabilities): the hop at this
    /// position (0-based) reads them off.
    Gradient(usize),
}

/// A tensor message as rows of its values.
pub fn rows_of(msg: &[u8]) -> Result<Rows> {
    let t = TensorBytes::decode(msg)?;
    let rows = t.shape.first().copied().unwrap_or(0).max(1);
    Ok(Rows {
        dim: t.values.len() / rows,
        values: t.values,
    })
}

/// The labels a gradient for a class-wide output gives away: in every
/// row exactly one negative value, at the label; `None` when some row
/// does not look so.
pub fn labels_from_gradient(msg: &[u8], classes: usize) -> Option<Vec<u32>> {
    let g = rows_of(msg).ok()?;
    if g.dim != classes || g.is_empty() {
        return None;
    }
    g.values
        .chunks_exact(classes)
        .map(|row| {
            let mut neg = row.iter().enumerate().filter(|(_, v)| **v < 0.0);
            match (neg.next(), neg.next()) {
                (Some((i, _)), None) => Some(i as u32),
                _ => None,
            }
        })
        .collect()
}

/// The labels the colluders `held` (positions, with their records)
/// learn for their last epoch's steps, and how.
pub fn labels(
    held: &[(usize, &HopView)],
    classes: usize,
) -> (BTreeMap<Key, Vec<u32>>, LabelSource) {
    if let Some((_, v)) = held.iter().find(|(_, v)| v.sees_labels()) {
        let l = v
            .train
            .iter()
            .map(|(k, f)| (*k, f.labels.clone()))
            .collect();
        return (l, LabelSource::LossHop);
    }
    for (hop, v) in held {
        if v.spec.output().numel() != classes || v.grads.is_empty() {
            continue;
        }
        let l: Option<BTreeMap<Key, Vec<u32>>> = v
            .grads
            .iter()
            .map(|(k, g)| labels_from_gradient(g, classes).map(|l| (*k, l)))
            .collect();
        if let Some(l) = l {
            return (l, LabelSource::Gradient(*hop));
        }
    }
    (BTreeMap::new(), LabelSource::None)
}

/// The training images hop `first` received (it takes pixels), labelled
/// where `labels` has its step: the designer's own training data.
pub fn recorded_images(first: &HopView, labels: &BTreeMap<Key, Vec<u32>>) -> Result<Labeled> {
    let mut out = Labeled::default();
    for (k, f) in &first.train {
        let Some(l) = labels.get(k) else { continue };
        let x = rows_of(&f.input)?;
        if x.len() != l.len() {
            continue;
        }
        out.x.extend(&x);
        out.y.extend_from_slice(l);
    }
    Ok(out)
}

/// What hop `a` sent and hop `b` received, step by step (the last
/// epoch) and test by test (the last test phase): the input and output
/// of everything between them.
pub fn pairs(a: (usize, &HopView), b: (usize, &HopView)) -> Result<(Rows, Rows)> {
    let (mut x, mut t) = (Rows::default(), Rows::default());
    for (k, fa) in &a.1.train {
        let Some(fb) = b.1.train.get(k) else { continue };
        let (ra, rb) = (rows_of(&fa.output)?, rows_of(&fb.input)?);
        if ra.len() != rb.len() {
            return Err(AdversaryError::Mismatch {
                a: a.0,
                b: b.0,
                reason: format!(
                    "step {} has {} rows at one, {} at the other",
                    k.0,
                    ra.len(),
                    rb.len()
                ),
            });
        }
        x.extend(&ra);
        t.extend(&rb);
    }
    if a.1.tests.len() == b.1.tests.len() {
        for (ta, tb) in a.1.tests.iter().zip(&b.1.tests) {
            let (ra, rb) = (rows_of(&ta.output)?, rows_of(&tb.input)?);
            if ra.len() == rb.len() {
                x.extend(&ra);
                t.extend(&rb);
            }
        }
    }
    Ok((x, t))
}

/// What hop `h` sent in the last epoch, with the labels of those steps.
pub fn head_pairs(h: &HopView, labels: &BTreeMap<Key, Vec<u32>>) -> Result<Labeled> {
    let mut out = Labeled::default();
    for (k, f) in &h.train {
        let Some(l) = labels.get(k) else { continue };
        let x = rows_of(&f.output)?;
        if x.len() == l.len() {
            out.x.extend(&x);
            out.y.extend_from_slice(l);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_softmax_gradient_gives_its_labels_away() {
        let g = TensorBytes::encode_f32(&[2, 3], &[0.2, -0.3, 0.1, -0.5, 0.25, 0.25]);
        assert_eq!(labels_from_gradient(&g, 3), Some(vec![1, 0]));
        let nll = TensorBytes::encode_f32(&[2, 3], &[0.0, 0.0, -0.5, -0.5, 0.0, 0.0]);
        assert_eq!(labels_from_gradient(&nll, 3), Some(vec![2, 0]));
        let mixed = TensorBytes::encode_f32(&[1, 3], &[-0.1, -0.2, 0.3]);
        assert_eq!(labels_from_gradient(&mixed, 3), None);
        assert_eq!(labels_from_gradient(&g, 4), None);
    }
}
