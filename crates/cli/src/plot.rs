//! The paper's Figure 3 as one PNG with two panels: (a) test accuracy per
//! epoch and (b) training time per epoch, one line per run.
//!
//! Text is drawn with DejaVu Sans, shipped in `assets/` and built into the
//! binary, so plots need no system fonts (see `assets/DejaVuSans-LICENSE.txt`).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, Context};
use clap::Args;
use mixnn_model::trainer::RunMetrics;
use plotters::prelude::*;
use plotters::style::FontStyle;
use serde::Deserialize;

use crate::progress::say;

/// DejaVu Sans (Bitstream Vera licence; see `assets/DejaVuSans-LICENSE.txt`).
const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
/// The family the built-in font is registered under ([`register_font`]).
pub const FONT_FAMILY: &str = "sans-serif";
/// Size of the PNG, in pixels.
pub const SIZE: (u32, u32) = (1200, 500);

/// `mixnn plot`.
#[derive(Debug, Args)]
pub struct PlotArgs {
    /// JSON file `{"local": RunMetrics, "cascade": RunMetrics}` ("cascade"
    /// may be left out).
    #[arg(long, value_name = "FILE")]
    pub metrics: PathBuf,
    /// PNG to write.
    #[arg(long, value_name = "PNG")]
    pub out: PathBuf,
}

/// The input of `mixnn plot`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Figure3Input {
    /// The single-process run.
    pub local: RunMetrics,
    /// The cascade run.
    pub cascade: Option<RunMetrics>,
}

/// Label of the single-process run in the legend.
pub const LOCAL_LABEL: &str = "single process";
/// Label of the cascade run in the legend.
pub const CASCADE_LABEL: &str = "MixNN cascade";

/// `mixnn plot`: reads the JSON file and draws Figure 3.
pub fn run(args: &PlotArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.metrics)
        .with_context(|| format!("reading {}", args.metrics.display()))?;
    let input: Figure3Input = serde_json::from_str(&text)
        .with_context(|| format!("parsing {}", args.metrics.display()))?;
    match &input.cascade {
        Some(cascade) => figure3(&input.local, cascade, &args.out)?,
        None => draw_runs(&[(LOCAL_LABEL, &input.local)], &args.out)?,
    }
    say(&format!("wrote {}", args.out.display()));
    Ok(())
}

/// Draws the paper's Figure 3 for a single-process and a cascade run.
pub fn figure3(local: &RunMetrics, cascade: &RunMetrics, out: &Path) -> anyhow::Result<()> {
    draw_runs(&[(LOCAL_LABEL, local), (CASCADE_LABEL, cascade)], out)
}

/// Registers the built-in font under [`FONT_FAMILY`] (once per process).
pub fn register_font() -> anyhow::Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, FONT).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(anyhow!("the built-in font does not parse"))
    }
}

/// Draws accuracy and time per epoch for any number of labelled runs.
pub fn draw_runs(runs: &[(&str, &RunMetrics)], out: &Path) -> anyhow::Result<()> {
    register_font()?;
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", out.display());
    let root = BitMapBackend::new(out, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root
        .titled(
            "Figure 3: single process vs. MixNN cascade (Fashion-MNIST MLP)",
            (FONT_FAMILY, 22),
        )
        .map_err(|e| err(&e))?;
    let (left, right) = root.split_horizontally(SIZE.0 / 2);

    let epochs = runs
        .iter()
        .map(|(_, m)| m.epochs.len())
        .max()
        .unwrap_or(0)
        .max(1) as u32;
    let acc: Vec<f64> = runs
        .iter()
        .flat_map(|(_, m)| m.epochs.iter().map(|e| e.test_acc))
        .collect();
    let lo = acc.iter().copied().fold(1.0f64, f64::min);
    let hi = acc.iter().copied().fold(0.0f64, f64::max);
    // Headroom above the lines for the legend (upper right).
    let (lo, hi) = if lo <= hi {
        let span = (hi - lo).max(0.02);
        ((lo - 0.1 * span).max(0.0), (hi + 0.45 * span).min(1.0))
    } else {
        (0.0, 1.0)
    };
    let t_max = runs
        .iter()
        .flat_map(|(_, m)| m.epochs.iter().map(|e| e.train_s))
        .fold(0.0f64, f64::max);
    let t_max = if t_max > 0.0 { t_max * 1.4 } else { 1.0 };

    panel(
        &left,
        "(a) test accuracy after each epoch",
        "test accuracy",
        lo..hi,
        epochs,
        runs,
        |e| e.test_acc,
    )
    .map_err(|e| err(&e))?;
    panel(
        &right,
        "(b) training time per epoch",
        "seconds",
        0.0..t_max,
        epochs,
        runs,
        |e| e.train_s,
    )
    .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

const COLORS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;
type DrawResult =
    Result<(), DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>>;

fn panel(
    area: &Area<'_>,
    caption: &str,
    y_desc: &str,
    y: std::ops::Range<f64>,
    epochs: u32,
    runs: &[(&str, &RunMetrics)],
    value: impl Fn(&mixnn_model::trainer::EpochMetrics) -> f64,
) -> DrawResult {
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT_FAMILY, 18))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(0u32..epochs + 1, y)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc(y_desc)
        .x_labels(epochs as usize + 2)
        .x_label_formatter(&|x| {
            if (1..=epochs).contains(x) {
                x.to_string()
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|v| format!("{v:.2}"))
        .label_style((FONT_FAMILY, 14))
        .axis_desc_style((FONT_FAMILY, 15))
        .disable_x_mesh()
        .bold_line_style(RGBColor(210, 210, 210))
        .light_line_style(RGBColor(245, 245, 245))
        .draw()?;
    // Runs are expected to coincide (the cascade computes the same bits),
    // so the first run is drawn wide and solid, later ones thin and dashed
    // on top of it: both stay visible where they overlap.
    for (i, (label, m)) in runs.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points: Vec<(u32, f64)> = m.epochs.iter().map(|e| (e.epoch, value(e))).collect();
        let width = if i == 0 { 5 } else { 2 };
        let line = color.stroke_width(width);
        let legend = move |(x, y): (i32, i32)| PathElement::new(vec![(x, y), (x + 24, y)], line);
        if i == 0 {
            chart
                .draw_series(LineSeries::new(points.clone(), line))?
                .label(*label)
                .legend(legend);
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 7, color.filled())))?;
        } else {
            chart
                .draw_series(DashedLineSeries::new(points.clone(), 8, 5, line))?
                .label(*label)
                .legend(legend);
            chart.draw_series(
                points
                    .iter()
                    .map(|&p| TriangleMarker::new(p, 6, color.filled())),
            )?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT_FAMILY, 14))
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mixnn_model::trainer::EpochMetrics;

    fn run(acc: [f64; 3], secs: [f64; 3]) -> RunMetrics {
        RunMetrics {
            epochs: (0..3)
                .map(|i| EpochMetrics {
                    epoch: i as u32 + 1,
                    train_s: secs[i],
                    loss: 0.5,
                    test_acc: acc[i],
                })
                .collect(),
            weights_sha256: String::new(),
        }
    }

    #[test]
    fn figure3_writes_a_png() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("fig3.png");
        let local = run([0.80, 0.83, 0.85], [0.4, 0.41, 0.39]);
        let cascade = run([0.80, 0.83, 0.85], [2.0, 2.1, 1.9]);
        figure3(&local, &cascade, &out).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
        // A second figure in the same process reuses the registered font.
        figure3(&local, &cascade, &out).unwrap();
    }

    #[test]
    fn empty_runs_still_draw() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("empty.png");
        let empty = RunMetrics {
            epochs: vec![],
            weights_sha256: String::new(),
        };
        draw_runs(&[("x", &empty)], &out).unwrap();
        assert!(out.is_file());
    }
}
