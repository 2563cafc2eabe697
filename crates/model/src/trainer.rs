//! The training loop shared by the local trainer and the cascade designer,
//! and the in-memory [`LocalModel`].
//!
//! The loop owns everything that must be equal between a single-process run
//! and a cascade run: which images form each batch, in which order, and how
//! loss and accuracy are averaged. What runs a step is a [`StepRunner`].

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::arith::matrix::Matrix;
use crate::data::{epoch_order, Dataset};
use crate::error::{ModelError, Result};
use crate::optim::Optimizer;
use crate::seed::{Purpose, RunSeed};
use crate::spec::ModelSpec;
use crate::stage::{Micro, Stage, StageCache};
use crate::tensor_bytes::pixel_to_f32;
use crate::weights::{self, StageParams};

/// Settings of a training run (the paper's protocol by default).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Epochs to train.
    pub epochs: u32,
    /// Images per batch.
    pub batch: usize,
    /// The optimiser: the model file's, else the command line's (SGD lr
    /// 0.01 momentum 0.9 by default; [`ModelSpec::optimizer_or`]).
    pub optimizer: Optimizer,
    /// The run's secret seed: initialisation and shuffling derive from it
    /// ([`crate::seed`]).
    pub seed: RunSeed,
    /// Micro-batches per batch (GPipe): each batch is cut into this many
    /// slices that flow through the stages back to back; their gradients
    /// add up to one update per batch. 1 trains on whole batches.
    #[serde(default = "one")]
    pub micro_batches: usize,
}

fn one() -> usize {
    1
}

/// Row ranges of the micro-batches of a batch of `rows` rows cut into `k`:
/// slices of `⌈rows / k⌉` rows, the last one shorter (so fewer than `k`
/// when `rows` is small). Every runner cuts batches with this function.
pub fn micro_ranges(rows: usize, k: usize) -> Vec<std::ops::Range<usize>> {
    let size = rows.div_ceil(k.max(1)).max(1);
    (0..rows)
        .step_by(size)
        .map(|start| start..(start + size).min(rows))
        .collect()
}

impl Batch {
    /// The rows `range` of this batch.
    pub fn slice(&self, range: std::ops::Range<usize>) -> Batch {
        let features = self.pixels.len() / self.rows.max(1);
        Batch {
            pixels: self.pixels[range.start * features..range.end * features].to_vec(),
            labels: self.labels[range.clone()].to_vec(),
            rows: range.len(),
        }
    }

    /// The batch cut into micro-batches (see [`micro_ranges`]).
    pub fn micro_batches(&self, k: usize) -> Vec<Batch> {
        if k <= 1 {
            return vec![self.clone()];
        }
        micro_ranges(self.rows, k)
            .into_iter()
            .map(|r| self.slice(r))
            .collect()
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 3,
            batch: 64,
            optimizer: Optimizer::default(),
            seed: RunSeed::from_number(1),
            micro_batches: 1,
        }
    }
}

/// One batch: raw pixels (decoded as `p / 255`) and labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// `rows × features` pixels.
    pub pixels: Vec<u8>,
    /// One label per row.
    pub labels: Vec<u32>,
    /// Number of images.
    pub rows: usize,
}

/// Splits `indices` of `data` into batches of at most `size` (the last may
/// be smaller, as PyTorch's `DataLoader` without `drop_last`).
pub fn batches(data: &Dataset, indices: &[u32], size: usize) -> Vec<Batch> {
    indices
        .chunks(size.max(1))
        .map(|chunk| Batch {
            pixels: data.gather_pixels(chunk),
            labels: data.gather_labels(chunk),
            rows: chunk.len(),
        })
        .collect()
}

/// Per-epoch figures written to the metrics file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// 1-based epoch number.
    pub epoch: u32,
    /// Wall-clock seconds of the training steps (test phase excluded).
    pub train_s: f64,
    /// Mean of the batch losses of the epoch.
    pub loss: f64,
    /// Fraction of test images classified correctly after the epoch.
    pub test_acc: f64,
}

/// What a run reports: one entry per epoch and the hash of the final weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunMetrics {
    /// Per-epoch figures.
    pub epochs: Vec<EpochMetrics>,
    /// SHA-256 (hex) of the final weights file's bytes.
    pub weights_sha256: String,
}

/// Something that can run training steps and predictions: the in-memory
/// model, or a cascade of remote stages.
pub trait StepRunner {
    /// The runner's error type.
    type Error: From<ModelError>;

    /// Runs one training step per batch, in order, calling `on_step` with
    /// each batch's loss as it completes. Returns the losses.
    fn train_batches(
        &mut self,
        batches: &[Batch],
        on_step: &mut dyn FnMut(f32),
    ) -> std::result::Result<Vec<f32>, Self::Error>;

    /// Predicted class per image, for every batch (no parameter change).
    fn predict_batches(
        &mut self,
        batches: &[Batch],
        on_batch: &mut dyn FnMut(),
    ) -> std::result::Result<Vec<u32>, Self::Error>;

    /// The parameters of every stage, in cascade order.
    fn params(&mut self) -> std::result::Result<Vec<StageParams>, Self::Error>;

    /// An epoch's training begins (0-based `epoch`), after the epochs
    /// `done`, with `losses_so_far` of its batches already trained (a
    /// resumed run). Runners that take checkpoints record this.
    fn begin_epoch(&mut self, _epoch: u32, _done: &[EpochMetrics], _losses_so_far: &[f32]) {}
}

/// Where a resumed run starts: what a checkpoint recorded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResumePoint {
    /// The epoch (0-based) the next step belongs to.
    pub epoch: u32,
    /// Batches of that epoch already trained.
    pub position: usize,
    /// Their losses, in order.
    pub epoch_losses: Vec<f32>,
    /// Metrics of the finished epochs.
    pub done_epochs: Vec<EpochMetrics>,
}

/// Progress callbacks of [`run_training`] (progress bars live in the CLI).
pub trait Observer {
    /// A phase begins: `what` is `"train"` or `"test"`, `steps` its length.
    fn phase(&mut self, epoch: u32, what: &str, steps: usize);
    /// One step of the current phase is done (`loss` for training steps).
    fn tick(&mut self, loss: Option<f32>);
    /// An epoch is done.
    fn epoch_done(&mut self, metrics: &EpochMetrics);
}

/// An observer that ignores everything.
pub struct Quiet;

impl Observer for Quiet {
    fn phase(&mut self, _: u32, _: &str, _: usize) {}
    fn tick(&mut self, _: Option<f32>) {}
    fn epoch_done(&mut self, _: &EpochMetrics) {}
}

/// Trains for `cfg.epochs` epochs on `train`, testing on `test` after each,
/// and returns the metrics with the final weights (safetensors bytes).
pub fn run_training<R: StepRunner>(
    runner: &mut R,
    model: &ModelSpec,
    train: &Dataset,
    test: &Dataset,
    cfg: &TrainConfig,
    observer: &mut dyn Observer,
) -> std::result::Result<(RunMetrics, Vec<u8>), R::Error> {
    run_training_from(runner, model, train, test, cfg, observer, None)
}

/// [`run_training`], resuming at `from` when given (the runner must
/// already hold the state of that point). The resumed epoch's `train_s`
/// counts only the part trained after resuming.
pub fn run_training_from<R: StepRunner>(
    runner: &mut R,
    model: &ModelSpec,
    train: &Dataset,
    test: &Dataset,
    cfg: &TrainConfig,
    observer: &mut dyn Observer,
    from: Option<ResumePoint>,
) -> std::result::Result<(RunMetrics, Vec<u8>), R::Error> {
    let test_indices: Vec<u32> = (0..test.len() as u32).collect();
    let test_batches = batches(test, &test_indices, cfg.batch);
    let from = from.unwrap_or_default();
    let mut epochs = from.done_epochs.clone();
    for epoch in from.epoch..cfg.epochs {
        let order = epoch_order(&cfg.seed, epoch, train.len());
        let mut train_batches = batches(train, &order, cfg.batch);
        if let Some(aug) = model.augment {
            // Every batch of the epoch, skipped ones too, so that a
            // resumed run draws the same crops and flips.
            let mut r = crate::init::rng(cfg.seed.derive(Purpose::Augment(u64::from(epoch))));
            let shape = [train.channels, train.rows, train.cols];
            for b in &mut train_batches {
                aug.apply(&mut r, shape, &mut b.pixels);
            }
        }
        let (skip, mut losses) = if epoch == from.epoch {
            (
                from.position.min(train_batches.len()),
                from.epoch_losses.clone(),
            )
        } else {
            (0, Vec::new())
        };
        runner.begin_epoch(epoch, &epochs, &losses);
        observer.phase(epoch + 1, "train", train_batches.len() - skip);
        let start = Instant::now();
        losses
            .extend(runner.train_batches(&train_batches[skip..], &mut |l| observer.tick(Some(l)))?);
        let train_s = start.elapsed().as_secs_f64();
        observer.phase(epoch + 1, "test", test_batches.len());
        let predicted = runner.predict_batches(&test_batches, &mut || observer.tick(None))?;
        let correct = predicted
            .iter()
            .zip(&test.labels)
            .filter(|(p, l)| **p == u32::from(**l))
            .count();
        let m = EpochMetrics {
            epoch: epoch + 1,
            train_s,
            loss: losses.iter().map(|l| f64::from(*l)).sum::<f64>() / losses.len().max(1) as f64,
            test_acc: correct as f64 / test.len().max(1) as f64,
        };
        observer.epoch_done(&m);
        epochs.push(m);
    }
    let params = runner.params()?;
    let file = weights::to_safetensors(model, &params).map_err(R::Error::from)?;
    Ok((
        RunMetrics {
            epochs,
            weights_sha256: weights::sha256_hex(&file),
        },
        file,
    ))
}

/// All stages of a model in one process, chained in memory.
pub struct LocalModel {
    stages: Vec<Stage>,
    micro_batches: usize,
}

/// The per-stage seed the designer hands stage `index` (0-based): a keyed
/// hash of the run seed ([`RunSeed::derive`]), from which a hop learns
/// neither the run seed nor its index.
pub fn stage_seed(seed: &RunSeed, index: usize) -> u64 {
    seed.derive(Purpose::Stage(index as u64))
}

impl LocalModel {
    /// Builds every stage of `model` from `seed`, each with the optimiser
    /// `opt` (a run's [`TrainConfig::optimizer`]).
    pub fn new(model: &ModelSpec, seed: &RunSeed, opt: impl Into<Optimizer>) -> Self {
        let opt = opt.into();
        let stages = model
            .stages
            .iter()
            .enumerate()
            .map(|(i, s)| Stage::new(s, stage_seed(seed, i), opt))
            .collect();
        LocalModel {
            stages,
            micro_batches: 1,
        }
    }

    /// Cuts every batch into `k` micro-batches (GPipe), as
    /// [`TrainConfig::micro_batches`].
    pub fn with_micro_batches(mut self, k: usize) -> Self {
        self.micro_batches = k.max(1);
        self
    }

    /// The stages, in order.
    pub fn stages(&self) -> &[Stage] {
        &self.stages
    }

    fn input(&self, batch: &Batch) -> Result<Matrix> {
        let first = self
            .stages
            .first()
            .ok_or_else(|| ModelError::Misuse("model without stages".into()))?;
        let features = first.spec().input.numel();
        if batch.pixels.len() != batch.rows * features {
            return Err(ModelError::Shape {
                context: "batch",
                expected: format!("{} × {features} pixels", batch.rows),
                actual: format!("{} pixels", batch.pixels.len()),
            });
        }
        let values: Vec<f32> = batch.pixels.iter().copied().map(pixel_to_f32).collect();
        Matrix::new(batch.rows, features, values)
    }

    /// One training step: forward and backward through all stages, one
    /// update; returns the loss. With micro-batches: the forwards of every
    /// micro-batch, then their backwards in order, then one update per
    /// stage; the loss is the sum of the micro-batch losses in order (each
    /// already divided by the whole batch's rows).
    pub fn train_step(&mut self, batch: &Batch) -> Result<f32> {
        let micros = batch.micro_batches(self.micro_batches);
        let mut all_caches = Vec::with_capacity(micros.len());
        let mut loss = 0.0f32;
        for (m, micro) in micros.iter().enumerate() {
            let mut h = self.input(micro)?;
            let mut caches: Vec<StageCache> = Vec::with_capacity(self.stages.len());
            for stage in &self.stages {
                let labels = stage.spec().is_loss().then_some(micro.labels.as_slice());
                let micro = Micro {
                    index: m as u32,
                    batch_rows: batch.rows,
                };
                let (out, cache) = stage.forward_step(h, labels, micro)?;
                caches.push(cache);
                h = out;
            }
            let l = h
                .first()
                .ok_or_else(|| ModelError::Misuse("the last stage is not a loss".into()))?;
            loss = if m == 0 { l } else { loss + l };
            all_caches.push(caches);
        }
        for (m, caches) in all_caches.into_iter().enumerate() {
            let mut g = None;
            for (i, (stage, cache)) in self.stages.iter_mut().zip(caches).enumerate().rev() {
                g = stage.backward_micro(cache, g, i > 0, m as u32)?;
            }
        }
        for stage in &mut self.stages {
            stage.apply();
        }
        Ok(loss)
    }

    /// Predicted classes of a batch (argmax of the last non-loss output).
    pub fn predict(&self, batch: &Batch) -> Result<Vec<u32>> {
        let mut h = self.input(batch)?;
        for stage in &self.stages {
            h = stage.forward_eval(h)?;
        }
        argmax_rows(&h)
    }

    /// The parameters of every stage.
    pub fn stage_params(&self) -> Vec<StageParams> {
        self.stages.iter().map(Stage::params).collect()
    }
}

/// Argmax over the feature axis of a `[batch, classes]` matrix (first
/// maximum wins, as `torch.argmax`).
pub fn argmax_rows(t: &Matrix) -> Result<Vec<u32>> {
    let [rows, cols] = t.dims();
    Ok(argmax_slice(t.as_slice(), rows, cols))
}

/// Argmax per row of a row-major `rows × cols` slice.
pub fn argmax_slice(v: &[f32], rows: usize, cols: usize) -> Vec<u32> {
    (0..rows)
        .map(|r| {
            let row = &v[r * cols..(r + 1) * cols];
            let mut best = 0;
            for (i, x) in row.iter().enumerate() {
                if *x > row[best] {
                    best = i;
                }
            }
            best as u32
        })
        .collect()
}

impl StepRunner for LocalModel {
    type Error = ModelError;

    fn train_batches(
        &mut self,
        batches: &[Batch],
        on_step: &mut dyn FnMut(f32),
    ) -> Result<Vec<f32>> {
        let mut losses = Vec::with_capacity(batches.len());
        for b in batches {
            let l = self.train_step(b)?;
            on_step(l);
            losses.push(l);
        }
        Ok(losses)
    }

    fn predict_batches(
        &mut self,
        batches: &[Batch],
        on_batch: &mut dyn FnMut(),
    ) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        for b in batches {
            out.extend(self.predict(b)?);
            on_batch();
        }
        Ok(out)
    }

    fn params(&mut self) -> Result<Vec<StageParams>> {
        Ok(self.stage_params())
    }
}
