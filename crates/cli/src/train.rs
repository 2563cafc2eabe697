//! `mixnn train`: the arguments every training mode shares, the local
//! (single-process) mode, and writing the metrics and weights files.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use mixnn_designer::{AuditRate, CascadeOptions, Keep, LinkPacing, Padding, Rate};
use mixnn_model::data::{self, Split};
use mixnn_model::seed::RunSeed;
use mixnn_model::spec::ModelSpec;
use mixnn_model::stage::Sgd;
use mixnn_model::trainer::{run_training, LocalModel, Observer, RunMetrics, TrainConfig};
use mixnn_model::ModelError;

use crate::fetch::{self, DataArgs};
pub use crate::prepared::Prepared;
use crate::progress::{self, say, Progress};

/// Where the paper's model description lives in the repository.
pub const PAPER_MODEL_PATH: &str = "models/paper-mlp.toml";
/// The same file, built into the binary so `mixnn` works from any directory.
pub const PAPER_MODEL_TOML: &str = include_str!("../../../models/paper-mlp.toml");

/// `mixnn train`: a mode (exactly one) and the shared [`TrainArgs`].
#[derive(Debug, Args)]
pub struct TrainCmd {
    #[command(flatten)]
    pub mode: Mode,
    #[command(flatten)]
    pub args: TrainArgs,
    #[command(flatten)]
    pub cascade: CascadeArgs,
    #[command(flatten)]
    pub recovery: crate::cascade::RecoveryArgs,
    #[command(flatten)]
    pub selection: crate::cascade::SelectionArgs,
}

/// How the model is trained. Exactly one mode must be given; a cascade mode
/// (`--cascade FILE`) joins this group.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct Mode {
    /// Train every stage in this process (the single-process baseline).
    #[arg(long)]
    pub local: bool,

    /// Train through the cascade listed in FILE (TOML: `[[hop]]` entries
    /// with `addr`, `onion` and `link` keys, one per remote stage).
    #[arg(long, value_name = "FILE")]
    pub cascade: Option<PathBuf>,

    /// Draw the cascade at random from the directory authority at URL
    /// (repeat for several; see --directory-key, --quorum, --dummies).
    #[arg(long, value_name = "URL")]
    pub directory: Vec<String>,
}

/// How the designer drives a cascade.
#[derive(Debug, Clone, Args)]
pub struct CascadeArgs {
    /// Run these stages in the designer process: `first`, `last` or
    /// `first,last` (paper §5.1–5.2).
    #[arg(long, value_name = "STAGES")]
    pub keep: Option<String>,

    /// With `--cascade FILE`: the hop at this position (0-based, in the
    /// file's order) is a dummy, hiding where the stages are (repeat for
    /// several). A dummy takes the last parameter-free op of the stage
    /// before it where it can, so its init note names a real op.
    /// (`--directory` draws its dummies itself: `--dummies`.)
    #[arg(long, value_name = "K")]
    pub dummy_at: Vec<usize>,

    /// Training steps in flight at once.
    #[arg(long, default_value_t = 4)]
    pub window: usize,

    /// Time bound T (seconds) on any answer from the cascade.
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,

    /// Padding: `uniform` (every message as large as the largest, the
    /// paper's rule) or `classes` (power-of-two size classes).
    #[arg(long, default_value = "uniform")]
    pub padding: String,

    /// Loops per second (Poisson) sent through the whole cascade and back,
    /// as cover and as health probes; 0 sends none.
    #[arg(long, default_value_t = 0.0, value_name = "R")]
    pub loop_rate: f64,

    /// Probability that the designer audits a given hop for a given step
    /// (commitments, re-execution; 0 turns both off) [default: 0.02].
    /// Audits need one micro-batch per step: with more they are off.
    #[arg(long, value_name = "Q")]
    pub audit_rate: Option<f64>,

    /// Constant-rate links: messages per second on each of the designer's
    /// links into the cascade, one per tick, cover when idle (pair it with
    /// `mixnn node --link-rate`; `mixnn demo` passes it to its nodes); 0
    /// sends each message at once.
    #[arg(long, default_value_t = 0.0, value_name = "R")]
    pub link_rate: f64,

    /// Random offset of each paced message within its slot, as a fraction
    /// of the period (0: on the tick; 1: anywhere in the slot).
    #[arg(long, default_value_t = 1.0, value_name = "F")]
    pub link_jitter: f64,

    /// Seed of the audit draws (tests of audits only; by default the OS
    /// seeds them, so no node can predict them).
    #[cfg(feature = "adversary")]
    #[arg(long, hide = true, value_name = "N")]
    pub audit_seed: Option<u64>,
}

/// Audit rate of `mixnn train --cascade` when `--audit-rate` is not given.
pub const DEFAULT_AUDIT_RATE: f64 = 0.02;

impl CascadeArgs {
    /// The designer's options.
    pub fn options(&self) -> anyhow::Result<CascadeOptions> {
        let keep: Keep = self
            .keep
            .as_deref()
            .unwrap_or("")
            .parse()
            .map_err(anyhow::Error::msg)?;
        let padding: Padding = self.padding.parse().map_err(anyhow::Error::msg)?;
        if !(self.timeout > 0.0 && self.timeout.is_finite()) {
            anyhow::bail!("--timeout must be a positive number of seconds");
        }
        let loop_rate = Rate::or_off(self.loop_rate).map_err(|_| {
            anyhow::anyhow!("--loop-rate must be a number of loops per second, 0 or more")
        })?;
        let link_rate = Rate::or_off(self.link_rate).map_err(|_| {
            anyhow::anyhow!("--link-rate must be a number of messages per second, 0 or more")
        })?;
        if !(0.0..=1.0).contains(&self.link_jitter) {
            anyhow::bail!("--link-jitter must be a fraction of the period, from 0 to 1");
        }
        let audit_rate = AuditRate::or_off(self.audit_rate.unwrap_or(DEFAULT_AUDIT_RATE))
            .map_err(|_| anyhow::anyhow!("--audit-rate must be a probability, from 0 to 1"))?;
        Ok(CascadeOptions {
            keep,
            window: self.window.max(1),
            timeout: std::time::Duration::from_secs_f64(self.timeout),
            padding,
            loop_rate,
            audit_rate,
            #[cfg(feature = "adversary")]
            audit_seed: self.audit_seed,
            link_pacing: link_rate.map(|rate| LinkPacing {
                rate,
                jitter: self.link_jitter,
            }),
            dummies: self.dummy_at.clone(),
            ..CascadeOptions::default()
        })
    }
}

/// Settings shared by every training mode. Defaults are the paper's protocol.
#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    /// Model description (TOML) [default: models/paper-mlp.toml if it
    /// exists, else the built-in copy of it]
    #[arg(long, value_name = "FILE")]
    pub model: Option<PathBuf>,

    #[command(flatten)]
    pub data: DataArgs,

    /// Epochs to train.
    #[arg(long, default_value_t = 3, value_name = "E")]
    pub epochs: u32,

    /// Use the first N training images.
    #[arg(long, default_value_t = 30_000, value_name = "N")]
    pub train_limit: usize,

    /// Use the first N test images [default: all]
    #[arg(long, value_name = "N")]
    pub test_limit: Option<usize>,

    /// Images per batch.
    #[arg(long, default_value_t = 64, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub batch: u32,

    /// Cut each batch into K micro-batches that flow through the stages
    /// back to back, with one update per batch (GPipe pipelining; the
    /// result is the same for the local trainer and the cascade).
    #[arg(long, default_value_t = 1, value_name = "K",
          value_parser = clap::value_parser!(u16).range(1..))]
    pub micro_batches: u16,

    /// SGD learning rate.
    #[arg(long, default_value_t = 0.01)]
    pub lr: f32,

    /// SGD momentum (0 disables it).
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f32,

    /// The run's secret seed, from which weight initialisation, batch
    /// order and the cascade draw derive (no hop can invert it): 64 hex
    /// digits, or a number for experiments (hops can guess small numbers).
    /// Default: a fresh random seed, printed at the start so the run can be
    /// repeated.
    #[arg(long, value_name = "SEED")]
    pub seed: Option<RunSeed>,

    /// Write the run's metrics (JSON) to FILE.
    #[arg(long, value_name = "FILE")]
    pub metrics: Option<PathBuf>,

    /// Write the final weights (safetensors) to FILE.
    #[arg(long, value_name = "FILE")]
    pub weights: Option<PathBuf>,

    /// Write the final weights as a PyTorch state dict (safetensors) to
    /// FILE: names and layouts of the `torch.nn.Sequential` of the model's
    /// ops (`bench/pytorch_model.py`), for `load_state_dict`.
    #[arg(long, value_name = "FILE")]
    pub export_torch: Option<PathBuf>,
}

impl TrainArgs {
    /// The training settings these arguments ask for `model`: its
    /// optimiser, else SGD with `--lr` and `--momentum`.
    pub fn config(&self, model: &ModelSpec) -> TrainConfig {
        TrainConfig {
            epochs: self.epochs,
            batch: self.batch as usize,
            optimizer: model.optimizer_or(Sgd {
                lr: self.lr,
                momentum: self.momentum,
            }),
            seed: self.seed.unwrap_or_else(|| {
                let seed = RunSeed::random();
                println!("seed {seed} (random; --seed {seed} repeats this run)");
                seed
            }),
            micro_batches: usize::from(self.micro_batches),
        }
    }

    /// Loads the model and the data (fetching the data if needed) and
    /// checks that they fit each other.
    pub fn prepare(&self) -> anyhow::Result<Prepared> {
        // The designer re-runs audited steps and computes kept stages: its
        // arithmetic must be the protocol's too.
        crate::selftest::check_active()?;
        let model = load_model(self.model.as_deref())?;
        let dir = fetch::data_dir(&self.data)?;
        let split = data::load_dir(&dir)?;
        let train = split.train.truncate(self.train_limit);
        let test = match self.test_limit {
            Some(n) => split.test.truncate(n),
            None => split.test,
        };
        if !train.fits(&model.input) {
            anyhow::bail!(
                "model {} takes samples of shape {} but the images in {} are {}",
                model.name,
                model.input,
                dir.display(),
                train.shape(),
            );
        }
        if train.is_empty() || test.is_empty() {
            anyhow::bail!(
                "no images to use from {} (train {}, test {})",
                dir.display(),
                train.len(),
                test.len()
            );
        }
        tracing::info!(
            data = %dir.display(),
            train = train.len(),
            test = test.len(),
            model = %model.name,
            stages = model.stages.len(),
            "prepared training run"
        );
        Ok(Prepared {
            split: Split { train, test, dir },
            cfg: self.config(&model),
            model,
        })
    }
}

/// Reads a model description: `path`, else the paper's model (from the
/// repository if run inside it, else the built-in copy).
pub fn load_model(path: Option<&Path>) -> anyhow::Result<ModelSpec> {
    let path = match path {
        Some(p) => p.to_path_buf(),
        None => {
            let default = PathBuf::from(PAPER_MODEL_PATH);
            if !default.is_file() {
                tracing::debug!("{PAPER_MODEL_PATH} not found, using the built-in copy");
                return Ok(ModelSpec::parse(
                    PAPER_MODEL_TOML,
                    "<built-in paper-mlp.toml>",
                )?);
            }
            default
        }
    };
    ModelSpec::from_file(&path).map_err(|e| match e {
        // These already name the file.
        ModelError::Spec { .. } | ModelError::Io { .. } => anyhow::Error::new(e),
        other => anyhow::Error::new(other).context(format!("model {}", path.display())),
    })
}

/// Trains every stage in this process; returns the metrics and the final
/// weights (safetensors bytes).
pub fn run_local(
    prepared: &Prepared,
    observer: &mut dyn Observer,
) -> anyhow::Result<(RunMetrics, Vec<u8>)> {
    let Prepared { model, split, cfg } = prepared;
    let mut local =
        LocalModel::new(model, &cfg.seed, cfg.optimizer).with_micro_batches(cfg.micro_batches);
    Ok(run_training(
        &mut local,
        model,
        &split.train,
        &split.test,
        cfg,
        observer,
    )?)
}

/// Writes `--metrics` (pretty JSON), `--weights` (safetensors) and
/// `--export-torch` (a PyTorch state dict) if asked.
pub fn write_outputs(
    args: &TrainArgs,
    prepared: &Prepared,
    metrics: &RunMetrics,
    weights: &[u8],
) -> anyhow::Result<()> {
    if let Some(path) = &args.export_torch {
        let model = &prepared.model;
        let stages = mixnn_model::weights::from_safetensors(weights, model.stages.len())?;
        let per_epoch = prepared
            .split
            .train
            .len()
            .div_ceil(prepared.cfg.batch.max(1)) as u64;
        let steps = per_epoch * u64::from(prepared.cfg.epochs);
        let torch = mixnn_model::weights::to_torch_safetensors(model, &stages, steps)?;
        std::fs::write(path, torch)
            .with_context(|| format!("writing the PyTorch export {}", path.display()))?;
    }
    if let Some(path) = &args.metrics {
        write_json(path, metrics)?;
    }
    if let Some(path) = &args.weights {
        std::fs::write(path, weights)
            .with_context(|| format!("writing weights {}", path.display()))?;
    }
    Ok(())
}

/// Writes `value` as pretty JSON with a final newline.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// `mixnn train`.
pub fn run(cmd: &TrainCmd) -> anyhow::Result<()> {
    let prepared = cmd.args.prepare()?;
    let mut observer = Progress::new();
    let (metrics, weights) = match &cmd.mode.cascade {
        Some(file) => {
            let hops = crate::cascade::load_cascade(file)?;
            let opts = cmd.cascade.options()?;
            let recovery = cmd.recovery.setup()?;
            crate::cascade::run_cascade_with(&prepared, hops, opts, &recovery, &mut observer)?
        }
        None if !cmd.mode.directory.is_empty() => {
            let mut opts = cmd.cascade.options()?;
            let mut recovery = cmd.recovery.setup()?;
            let hops = crate::cascade::from_directory(
                &cmd.mode.directory,
                &cmd.selection,
                &prepared,
                &mut opts,
                &mut recovery,
            )?;
            crate::cascade::run_cascade_with(&prepared, hops, opts, &recovery, &mut observer)?
        }
        None => {
            cmd.recovery.local_only()?;
            run_local(&prepared, &mut observer)?
        }
    };
    drop(observer);
    say(&progress::summary(&metrics));
    write_outputs(&cmd.args, &prepared, &metrics, &weights)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_model_is_the_papers_five_stages() {
        let m = ModelSpec::parse(PAPER_MODEL_TOML, "built-in").unwrap();
        assert_eq!(m.stages.len(), 5);
        assert_eq!(m.input, mixnn_model::spec::Shape::flat(784));
    }

    #[test]
    fn missing_model_file_names_the_file() {
        let err = load_model(Some(Path::new("/nonexistent/m.toml"))).unwrap_err();
        assert!(
            format!("{err:#}").contains("/nonexistent/m.toml"),
            "{err:#}"
        );
    }
}
