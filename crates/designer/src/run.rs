//! A whole training run through a cascade, wired up as `mixnn train
//! --cascade` (and `--directory`, and the demo) runs it: the rule that
//! audits need one micro-batch per step, the checkpoint directory, resuming
//! from its newest usable checkpoint, replacements from spares or from the
//! directories, the test-phase check of the last epoch, and what happened,
//! reported as [`Notice`]s for the caller to print.

use std::fmt;
use std::num::NonZeroU64;
use std::path::PathBuf;

use mixnn_model::data::Dataset;
use mixnn_model::spec::ModelSpec;
use mixnn_model::trainer::{run_training_from, Observer, RunMetrics, TrainConfig};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

use crate::cascade::HopInfo;
use crate::checkpoint::CheckpointDir;
use crate::directory::{draw, Directories, DirectoryReplacements, DrawnCascade};
use crate::error::DesignerError;
use crate::options::{CascadeOptions, Checkpoints};
use crate::plan::audit::AuditStats;
use crate::plan::recovery::RecoveryEvent;
use crate::replacements::Spares;
use crate::runner::CascadeRunner;

/// Checkpoint files a run keeps in its directory.
pub const KEEP_FILES: usize = 3;

/// Where replacements for failed hops come from.
#[derive(Debug, Clone, Default)]
pub enum ReplacementSource {
    /// None: a failure ends the run.
    #[default]
    None,
    /// Spare nodes, used in order.
    Spares(Vec<HopInfo>),
    /// The directories the cascade was drawn from (failures are reported
    /// there); `seed` is the draw's.
    Directory {
        /// The directories.
        dirs: Directories,
        /// The seed of the draw.
        seed: u64,
        /// The cascade drawn.
        drawn: DrawnCascade,
    },
}

/// Checkpoints, resume and recovery of a run.
#[derive(Debug, Clone, Default)]
pub struct RunSettings {
    /// Write checkpoints to this directory (the newest [`KEEP_FILES`]).
    pub checkpoints: Option<PathBuf>,
    /// A checkpoint every this many steps (and at each epoch's end).
    pub every: Option<NonZeroU64>,
    /// Continue from the newest usable checkpoint in `checkpoints`.
    pub resume: bool,
    /// Replacements for failed hops.
    pub replacements: ReplacementSource,
}

/// Something the caller may want to tell the user.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Notice {
    /// Audits were asked for with micro-batches: they are off.
    AuditsOff,
    /// A newer checkpoint file was skipped on resume.
    ResumeWarning(String),
    /// The run resumes at a checkpoint.
    Resuming {
        /// Its step.
        step: u64,
        /// The epoch (1-based) it resumes in.
        epoch: u32,
        /// Batches of that epoch already trained.
        batch: usize,
    },
    /// A hop failed and the run recovered.
    Recovered(RecoveryEvent),
    /// What audits found.
    Audits(AuditStats),
    /// Checkpoints taken, and the median time of one.
    Checkpoints {
        /// How many.
        taken: usize,
        /// Median seconds.
        median_s: f64,
    },
}

impl fmt::Display for Notice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Notice::AuditsOff => {
                write!(f, "audits need one micro-batch per step: off for this run")
            }
            Notice::ResumeWarning(w) => write!(f, "warning: {w}"),
            Notice::Resuming { step, epoch, batch } => {
                write!(f, "resuming at step {step} (epoch {epoch}, batch {batch})")
            }
            Notice::Recovered(e) => write!(
                f,
                "recovered: {} (bound T {:.1} s, detected at unix ms {}); replaced {:?}; back at step {} in {:.2} s",
                e.cause, e.bound_s, e.detected_unix_ms, e.replaced, e.resumed_at, e.recovery_s
            ),
            Notice::Audits(a) => write!(
                f,
                "audits: {} of {} steps' commitments, {} passed, {} failed ({} fetched while steps ran){}",
                a.audits,
                a.committed_steps,
                a.passed,
                a.failures.len(),
                a.in_flight,
                if a.suspect {
                    "; cascade suspect (test accuracy dropped)"
                } else {
                    ""
                }
            ),
            Notice::Checkpoints { taken, median_s } => write!(
                f,
                "checkpoints: {taken} taken, median {:.1} ms each",
                median_s * 1000.0
            ),
        }
    }
}

/// Draws a cascade for `model` (less the stages `opts` keeps) from the
/// directories' verified view: `dummies` dummy hops, the draw seeded with
/// `seed`. Returns the cascade and how many nodes the view listed.
pub fn draw_cascade(
    dirs: &Directories,
    model: &ModelSpec,
    opts: &CascadeOptions,
    dummies: usize,
    seed: u64,
) -> Result<(DrawnCascade, usize), DesignerError> {
    let view = dirs.view()?;
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let drawn = draw(
        &view,
        opts.remote_stages(model),
        dummies,
        dirs.diversity,
        &mut rng,
    )?;
    Ok((drawn, view.nodes.len()))
}

/// Trains `model` on `train` (tested on `test`) through the cascade
/// `hops`, with checkpoints, resume and recovery as `settings` say;
/// returns the metrics and the final weights (safetensors).
#[allow(clippy::too_many_arguments)]
pub fn train(
    model: &ModelSpec,
    train: &Dataset,
    test: &Dataset,
    cfg: &TrainConfig,
    hops: Vec<HopInfo>,
    mut opts: CascadeOptions,
    settings: &RunSettings,
    observer: &mut dyn Observer,
    notice: &mut dyn FnMut(Notice),
) -> Result<(RunMetrics, Vec<u8>), DesignerError> {
    if cfg.micro_batches > 1 && opts.audit_rate.is_some() {
        notice(Notice::AuditsOff);
        opts.audit_rate = None;
    }
    let dir = match &settings.checkpoints {
        Some(d) => Some(CheckpointDir::open(d, KEEP_FILES)?),
        None => None,
    };
    let resume = match (&dir, settings.resume) {
        (Some(dir), true) => match dir.latest()? {
            Some((c, warnings)) => {
                for w in warnings {
                    notice(Notice::ResumeWarning(w));
                }
                Some(c)
            }
            None => {
                return Err(DesignerError::NoCheckpoint {
                    dir: dir.path().to_path_buf(),
                })
            }
        },
        _ => None,
    };
    let mut builder = CascadeRunner::builder(model, cfg, hops)
        .options(opts)
        .checkpoints(Checkpoints {
            dir,
            every: settings.every,
        });
    builder = match &settings.replacements {
        ReplacementSource::None => builder,
        ReplacementSource::Spares(s) => builder.replacements(Box::new(Spares::new(s.clone()))),
        ReplacementSource::Directory { dirs, seed, drawn } => {
            builder.replacements(Box::new(DirectoryReplacements::new(
                dirs.clone(),
                DirectoryReplacements::ephemeral_key(),
                *seed,
                drawn,
            )))
        }
    };
    let mut runner = builder.connect()?;
    let from = match &resume {
        Some(c) => {
            let at = runner.restore(c)?;
            notice(Notice::Resuming {
                step: c.step,
                epoch: at.epoch + 1,
                batch: at.position,
            });
            Some(at)
        }
        None => None,
    };
    let result = run_training_from(&mut runner, model, train, test, cfg, observer, from);
    for e in runner.recoveries() {
        notice(Notice::Recovered(e.clone()));
    }
    // The test-phase check of the last epoch (earlier ones are checked as
    // the next epoch starts).
    if let Ok((m, _)) = &result {
        if let Some(e) = m.epochs.last() {
            runner.check_accuracy(e.epoch, e.test_acc);
        }
    }
    let audits = runner.audit_stats();
    if audits.committed_steps > 0 {
        notice(Notice::Audits(audits.clone()));
    }
    let times = runner.checkpoint_times();
    if !times.is_empty() {
        notice(Notice::Checkpoints {
            taken: times.len(),
            median_s: median(times),
        });
    }
    // The designer closes its own session (the hops would drop it only
    // when it idles out); a cascade that no longer answers changes nothing
    // about a finished run.
    if result.is_ok() {
        if let Err(e) = runner.close() {
            tracing::warn!("closing the session: {e}");
        }
    }
    result
}

/// The median of `values` (0 for none).
fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_read_as_the_command_line_prints_them() {
        assert_eq!(
            Notice::Resuming {
                step: 40,
                epoch: 2,
                batch: 7
            }
            .to_string(),
            "resuming at step 40 (epoch 2, batch 7)"
        );
        let audits = AuditStats {
            committed_steps: 80,
            audits: 9,
            passed: 9,
            in_flight: 7,
            ..AuditStats::default()
        };
        assert_eq!(
            Notice::Audits(audits).to_string(),
            "audits: 9 of 80 steps' commitments, 9 passed, 0 failed (7 fetched while steps ran)"
        );
        assert_eq!(
            Notice::Checkpoints {
                taken: 3,
                median_s: 0.0105
            }
            .to_string(),
            "checkpoints: 3 taken, median 10.5 ms each"
        );
        assert_eq!(median(&[3.0, 1.0, 2.0, 10.0]), 2.5);
    }
}
