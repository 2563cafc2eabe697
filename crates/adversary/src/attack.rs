//! The attacks, strongest first (docs/threat-model/extraction.md):
//!
//! 1. **warm start** — the held stages' final weights, frozen; every gap
//!    trained on the auxiliary data (and on the designer's own training
//!    images where the colluders see them and learn their labels);
//! 2. **regression** (paper Figure 4) — each gap between two held hops
//!    fitted to what the colluders recorded on both sides of it (mean
//!    squared error), then frozen; the rest as in 1;
//! 3. **head** — where the colluders learn labels (the loss hop's notes,
//!    or an output gradient), the gap after their last stage trained on
//!    what that stage sent with those labels, then frozen; the rest as
//!    in 2;
//! 4. **input inversion** — where the images do not reach them, the
//!    colluders invert their stand-in for the front (trained by 1–3) on
//!    what their first hop received, and get pictures of the designer's
//!    training images; measured as PSNR against the real ones.
//!
//! Each surrogate is scored on images that never went through the
//! cascade: its accuracy, and its agreement with the designer's model
//! (the fraction of images both classify alike). The **baseline** is the
//! model's architecture trained from scratch on the same auxiliary data:
//! attack 1 with nothing held, positions known.

use std::collections::BTreeMap;
use std::time::Instant;

use mixnn_model::spec::{OpSpec, Shape, StageSpec};
use serde::{Deserialize, Serialize};

use crate::chain::{Budget, Chain, Fit, Piece, Rows, REGRESSION};
use crate::data::{self, Key, LabelSource, Labeled};
use crate::error::Result;
use crate::plan::{Gap, Part, Positions, Skeleton, Truth};
use crate::view::HopView;

/// Accuracy and agreement of a surrogate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Score {
    /// Fraction of the evaluation images it classifies right.
    pub accuracy: f64,
    /// Fraction it classifies as the designer's model does.
    pub agreement: f64,
}

/// What inverting the front gave.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Inversion {
    /// Images inverted.
    pub images: usize,
    /// PSNR (dB, pixels in [0, 1]) against the designer's images of the
    /// images found by gradient descent through the stand-in front
    /// (UnSplit-style, from the mean auxiliary image).
    pub psnr_db: f64,
    /// PSNR of the learned inverse: a linear decoder trained on the
    /// auxiliary images from the stand-in front's outputs.
    pub decoder_psnr_db: f64,
    /// PSNR of the colluders' prior alone (the mean auxiliary image).
    pub prior_psnr_db: f64,
}

/// Everything one colluding set got, for one kind of knowledge and one
/// auxiliary data size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// The colluding hops, 1-based positions.
    pub hops: Vec<usize>,
    /// What they know of positions.
    pub positions: Positions,
    /// Auxiliary images.
    pub aux: usize,
    /// Whether they see the designer's training images.
    pub sees_images: bool,
    /// Where their labels come from.
    pub labels: LabelSource,
    /// Positions unknown: whether timing gave them the right order.
    pub order_right: Option<bool>,
    /// Attack 1.
    pub warm: Score,
    /// Attack 2, where a gap lies between two held hops.
    pub regress: Option<Score>,
    /// Attack 3, where labels are known and the back gap has weights.
    pub head: Option<Score>,
    /// Attack 4, where the front gap has weights.
    pub inversion: Option<Inversion>,
    /// Seconds the attacks took.
    pub seconds: f64,
}

impl Outcome {
    /// The strongest of the surrogates (highest agreement).
    pub fn best(&self) -> Score {
        [Some(self.warm), self.regress, self.head]
            .into_iter()
            .flatten()
            .fold(
                self.warm,
                |b, s| if s.agreement > b.agreement { s } else { b },
            )
    }
}

/// How long each phase trains.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Budgets {
    /// Training on labels (warm start, head).
    pub train: Budget,
    /// Regressions of gaps.
    pub regress: Budget,
    /// Images inverted (the first of the last epoch's steps).
    pub invert_images: usize,
    /// Updates per inverted batch.
    pub invert_steps: usize,
}

/// The run the colluders attack, and how the attacks are scored.
pub struct Scene<'a> {
    /// The model as it ran.
    pub truth: &'a Truth,
    /// Every hop's record (an attack reads only its colluders').
    pub views: &'a BTreeMap<usize, HopView>,
    /// Images that never went through the cascade, labelled.
    pub eval: &'a Labeled,
    /// The designer's model's predictions for them.
    pub reference: &'a [u32],
    /// Training budgets.
    pub budgets: Budgets,
    /// Seed of every stand-in's initialisation and data order.
    pub seed: u64,
    /// The designer's training images of some of the last epoch's steps
    /// (pixels), to score inversions (the colluders never see them).
    pub truth_pixels: &'a BTreeMap<Key, Vec<u8>>,
}

/// The auxiliary data the colluders have.
pub struct Aux<'a> {
    /// Images, with labels.
    pub data: &'a Labeled,
    /// Whether the colluders know the labels.
    pub labeled: bool,
}

impl Scene<'_> {
    fn score(&self, chain: &Chain) -> Result<Score> {
        let p = chain.predict(&self.eval.x)?;
        let n = p.len().max(1) as f64;
        let right = p.iter().zip(&self.eval.y).filter(|(a, b)| a == b).count();
        let same = p.iter().zip(self.reference).filter(|(a, b)| a == b).count();
        Ok(Score {
            accuracy: right as f64 / n,
            agreement: same as f64 / n,
        })
    }

    /// The from-scratch baseline: the model's architecture trained on
    /// the auxiliary data alone.
    pub fn baseline(&self, aux: &Aux<'_>) -> Result<Score> {
        Ok(self.attack(&[], Positions::Known, aux)?.warm)
    }

    /// Every attack of the colluders `hops` (0-based positions).
    pub fn attack(&self, hops: &[usize], positions: Positions, aux: &Aux<'_>) -> Result<Outcome> {
        let start = Instant::now();
        let skeleton = Skeleton::new(self.truth, self.views, hops, positions)?;
        let held: Vec<(usize, &HopView)> = skeleton
            .held()
            .into_iter()
            .filter_map(|h| self.views.get(&h).map(|v| (h, v)))
            .collect();
        let (labels, source) = data::labels(&held, self.truth.classes);
        let first = held.first().filter(|(_, v)| v.sees_pixels());
        let mut train = Labeled::default();
        if aux.labeled {
            train.extend(aux.data);
        }
        if let Some((_, v)) = first {
            train.extend(&data::recorded_images(v, &labels)?);
        }
        // One seed for every plan: a stage the colluders fill starts from
        // the same weights and sees the data in the same order whichever
        // set they are, so plans differ only in what is held.
        let seed = self.seed;
        let opt = self.truth.optimizer;
        let b = &self.budgets;

        // 1. Warm start.
        let (mut chain, ranges) = skeleton.build(self.views, seed, |_| opt)?;
        chain.train_labels(&train.x, &train.y, &b.train, seed)?;
        let warm = self.score(&chain)?;
        let mut best = chain;

        // 2. Regression of the inner gaps.
        let inner: Vec<usize> = gaps(&skeleton, |g| matches!(g, Gap::Inner { .. }));
        let regress = if inner.is_empty() {
            None
        } else {
            let (mut chain, _) = skeleton.build(self.views, seed, |g| match g {
                Gap::Inner { .. } => REGRESSION,
                _ => opt,
            })?;
            self.fit_inner(&skeleton, &mut chain, &ranges, seed)?;
            chain.train_labels(&train.x, &train.y, &b.train, seed)?;
            let s = self.score(&chain)?;
            best = chain;
            Some(s)
        };

        // 3. A head on the last held stage's outputs, with labels.
        let back = gaps(&skeleton, |g| g == Gap::Back);
        let head = match (back.first(), held.last()) {
            (Some(&p), Some((_, last))) if source != LabelSource::None => {
                let (mut chain, _) = skeleton.build(self.views, seed, |g| match g {
                    Gap::Inner { .. } => REGRESSION,
                    _ => opt,
                })?;
                self.fit_inner(&skeleton, &mut chain, &ranges, seed)?;
                let pairs = data::head_pairs(last, &labels)?;
                let r = ranges[p].clone();
                chain.train_labels_range(r.clone(), &pairs.x, &pairs.y, &b.train, seed)?;
                for piece in &mut chain.pieces[r] {
                    piece.freeze()?;
                }
                chain.train_labels(&train.x, &train.y, &b.train, seed)?;
                let s = self.score(&chain)?;
                best = chain;
                Some(s)
            }
            _ => None,
        };

        // 4. Inverting the front.
        let inversion = match (skeleton.parts.first(), held.first()) {
            (Some(Part::Gap(Gap::Front, specs, _)), Some((_, v)))
                if specs.iter().any(|s| s.has_params()) && !aux.data.y.is_empty() =>
            {
                self.invert(&mut best, ranges[0].clone(), v, aux.data)?
            }
            _ => None,
        };

        Ok(Outcome {
            hops: hops.iter().map(|h| h + 1).collect(),
            positions,
            aux: aux.data.y.len(),
            sees_images: first.is_some(),
            labels: source,
            order_right: skeleton.order_right,
            warm,
            regress,
            head,
            inversion,
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// Regresses every inner gap of `chain` on its neighbours' records,
    /// then freezes it.
    fn fit_inner(
        &self,
        skeleton: &Skeleton,
        chain: &mut Chain,
        ranges: &[std::ops::Range<usize>],
        seed: u64,
    ) -> Result<()> {
        for (p, part) in skeleton.parts.iter().enumerate() {
            let Part::Gap(Gap::Inner { after, before }, specs, _) = part else {
                continue;
            };
            if !specs.iter().any(|s| s.has_params()) {
                continue;
            }
            let (Some(a), Some(b)) = (self.views.get(after), self.views.get(before)) else {
                continue;
            };
            let (x, t) = data::pairs((*after, a), (*before, b))?;
            let r = ranges[p].clone();
            let ends_in_log_softmax = specs
                .last()
                .and_then(|s| s.ops.last())
                .is_some_and(|op| matches!(op, OpSpec::LogSoftmax));
            let fit = match Fit::for_target(&t) {
                Fit::SoftLabels if ends_in_log_softmax => Fit::SoftLabels,
                _ => Fit::Squared,
            };
            chain.regress(r.clone(), &x, &t, fit, &self.budgets.regress, seed)?;
            for piece in &mut chain.pieces[r] {
                piece.freeze()?;
            }
        }
        Ok(())
    }

    /// Inverts the front of `chain` on what hop `first` received in the
    /// steps of [`Scene::truth_pixels`].
    fn invert(
        &self,
        chain: &mut Chain,
        front: std::ops::Range<usize>,
        first: &HopView,
        aux: &Labeled,
    ) -> Result<Option<Inversion>> {
        let (mut target, mut truth) = (Rows::default(), Rows::default());
        for (k, px) in self.truth_pixels {
            if target.len() >= self.budgets.invert_images {
                break;
            }
            let Some(f) = first.train.get(k) else {
                continue;
            };
            let a = data::rows_of(&f.input)?;
            let t = Rows {
                dim: px.len() / a.len().max(1),
                values: px
                    .iter()
                    .map(|p| mixnn_model::tensor_bytes::pixel_to_f32(*p))
                    .collect(),
            };
            if t.len() == a.len() {
                target.extend(&a);
                truth.extend(&t);
            }
        }
        if front.is_empty() || target.is_empty() {
            return Ok(None);
        }
        for p in &mut chain.pieces[front.clone()] {
            p.freeze()?;
        }
        let mut mean = vec![0f32; aux.x.dim];
        for row in aux.x.values.chunks_exact(aux.x.dim.max(1)) {
            for (m, v) in mean.iter_mut().zip(row) {
                *m += v / aux.x.len() as f32;
            }
        }
        let x = chain.invert(front.clone(), &target, &mean, self.budgets.invert_steps)?;
        // The learned inverse: a linear decoder from the stand-in front's
        // outputs on the auxiliary images back to those images, applied
        // to what the hop received.
        let seen = chain.eval_rows(front, &aux.x)?;
        let decoder = StageSpec {
            input: Shape::flat(seen.dim),
            ops: vec![OpSpec::Linear {
                input: seen.dim,
                output: aux.x.dim,
            }],
        };
        let mut d = Chain {
            pieces: vec![Piece::fresh(&decoder, self.seed, REGRESSION)],
        };
        d.regress(
            0..1,
            &seen,
            &aux.x,
            Fit::Squared,
            &self.budgets.regress,
            self.seed,
        )?;
        let flat = Rows {
            dim: target.dim,
            values: target.values.clone(),
        };
        let mut decoded = d.eval_rows(0..1, &flat)?;
        for v in &mut decoded.values {
            *v = v.clamp(0.0, 1.0);
        }
        let psnr = |a: &[f32]| {
            let mse = a
                .iter()
                .zip(&truth.values)
                .map(|(p, q)| f64::from(p - q).powi(2))
                .sum::<f64>()
                / truth.values.len().max(1) as f64;
            -10.0 * mse.max(1e-12).log10()
        };
        let prior: Vec<f32> = mean.repeat(truth.len());
        Ok(Some(Inversion {
            images: truth.len(),
            psnr_db: psnr(&x.values),
            decoder_psnr_db: psnr(&decoded.values),
            prior_psnr_db: psnr(&prior),
        }))
    }
}

/// Indices of the parts that are gaps `which` selects.
fn gaps(s: &Skeleton, which: impl Fn(Gap) -> bool) -> Vec<usize> {
    s.parts
        .iter()
        .enumerate()
        .filter_map(|(i, p)| match p {
            Part::Gap(g, specs, _) if which(*g) && specs.iter().any(|s| s.has_params()) => Some(i),
            _ => None,
        })
        .collect()
}
