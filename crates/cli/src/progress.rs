//! Progress bars and the printed per-epoch lines, for every training mode.
//!
//! Bars go to stderr and only when stderr is a terminal; the per-epoch
//! lines and the summary go to stdout, so `mixnn train … > log` keeps
//! exactly the figures.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use mixnn_model::trainer::{EpochMetrics, Observer, RunMetrics};

/// An [`Observer`] that draws one bar per phase per epoch
/// (`epoch 1 train [=====>   ] 234/469 loss 0.53`) and prints one line
/// per finished epoch.
pub struct Progress {
    label: String,
    draw: bool,
    bar: Option<ProgressBar>,
    loss_sum: f64,
    loss_steps: u64,
}

impl Progress {
    /// Bars on stderr if it is a terminal; epoch lines on stdout.
    pub fn new() -> Self {
        Self::with_label("")
    }

    /// As [`Progress::new`], prefixing bars and lines with `label`
    /// (e.g. `"cascade"`).
    pub fn with_label(label: &str) -> Self {
        Self::build(label, std::io::stderr().is_terminal())
    }

    fn build(label: &str, draw: bool) -> Self {
        Progress {
            label: if label.is_empty() {
                String::new()
            } else {
                format!("{label} ")
            },
            draw,
            bar: None,
            loss_sum: 0.0,
            loss_steps: 0,
        }
    }

    fn clear(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.clear();
    }
}

impl Observer for Progress {
    fn phase(&mut self, epoch: u32, what: &str, steps: usize) {
        self.clear();
        self.loss_sum = 0.0;
        self.loss_steps = 0;
        if !self.draw {
            return;
        }
        let bar = ProgressBar::with_draw_target(Some(steps as u64), ProgressDrawTarget::stderr());
        // The template is a constant known to parse; fall back to the
        // default style rather than fail a run over a progress bar.
        if let Ok(style) = ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg}") {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_prefix(format!("{}epoch {epoch} {what}", self.label));
        self.bar = Some(bar);
    }

    fn tick(&mut self, loss: Option<f32>) {
        let Some(bar) = &self.bar else { return };
        if let Some(l) = loss {
            self.loss_sum += f64::from(l);
            self.loss_steps += 1;
            bar.set_message(format!(
                "loss {:.2}",
                self.loss_sum / self.loss_steps as f64
            ));
        }
        bar.inc(1);
    }

    fn epoch_done(&mut self, metrics: &EpochMetrics) {
        self.clear();
        say(&format!("{}{}", self.label, epoch_line(metrics)));
    }
}

/// Prints a line on stdout. A closed stdout (`mixnn … | head`) is not an
/// error worth failing a training run over, so write errors are ignored.
pub fn say(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
}

/// `epoch 1  train 0.41 s  loss 0.6123  test acc 0.8012`.
pub fn epoch_line(m: &EpochMetrics) -> String {
    format!(
        "epoch {}  train {:.2} s  loss {:.4}  test acc {:.4}",
        m.epoch, m.train_s, m.loss, m.test_acc
    )
}

/// Median of `values` (mean of the middle two for an even count; 0 if empty).
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// One line after a run: final accuracy, median epoch time, weights hash.
pub fn summary(m: &RunMetrics) -> String {
    let times: Vec<f64> = m.epochs.iter().map(|e| e.train_s).collect();
    let acc = m.epochs.last().map_or(0.0, |e| e.test_acc);
    format!(
        "done: {} epochs  test acc {:.4}  median train {:.2} s/epoch  weights sha256 {}",
        m.epochs.len(),
        acc,
        median(&times),
        m.weights_sha256
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epoch(epoch: u32, train_s: f64) -> EpochMetrics {
        EpochMetrics {
            epoch,
            train_s,
            loss: 0.61234,
            test_acc: 0.80125,
        }
    }

    #[test]
    fn epoch_line_has_the_documented_shape() {
        assert_eq!(
            epoch_line(&epoch(1, 0.414)),
            "epoch 1  train 0.41 s  loss 0.6123  test acc 0.8013"
        );
    }

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn summary_names_final_accuracy_and_hash() {
        let m = RunMetrics {
            epochs: vec![epoch(1, 0.5), epoch(2, 0.3), epoch(3, 0.4)],
            weights_sha256: "ab".repeat(32),
        };
        let s = summary(&m);
        assert!(s.contains("3 epochs  test acc 0.8013  median train 0.40 s/epoch"));
        assert!(s.ends_with(&"ab".repeat(32)));
    }

    #[test]
    fn hidden_progress_observes_without_a_terminal() {
        let mut p = Progress::build("", false);
        p.phase(1, "train", 3);
        p.tick(Some(0.5));
        assert!(p.bar.is_none());
    }
}
