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
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::coord::types::RangedCoordf64;
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

/// At most this many labelled ticks on a y axis.
const Y_TICKS: usize = 8;

/// The ticks of an axis: their spacing and the precision of their labels
/// are chosen together, so no two labels read the same. The spacing is 1,
/// 2 or 5 times a power of ten, the smallest that gives at most `max`
/// ticks; labels have as many decimals as the spacing needs (0.005 → 3,
/// 0.02 → 2, 5 → 0).
#[derive(Debug, Clone, PartialEq)]
pub struct Ticks {
    /// Where the ticks are, ascending, all inside the range.
    pub values: Vec<f64>,
    /// The spacing.
    pub step: f64,
    /// Decimals of each label.
    pub decimals: usize,
}

impl Ticks {
    /// Ticks for `range`, at most `max` (at least 2) of them.
    pub fn new(range: std::ops::Range<f64>, max: usize) -> Self {
        let max = max.max(2);
        let span = range.end - range.start;
        if !(span > 0.0 && span.is_finite() && range.start.is_finite()) {
            return Ticks {
                values: vec![range.start],
                step: 0.0,
                decimals: 2,
            };
        }
        let magnitude = 10f64.powf((span / max as f64).log10().floor());
        // The multiples of `step` inside the range; a little slack so a
        // bound that is a multiple up to rounding gets its tick.
        let multiples = |step: f64| {
            let first = (range.start / step - 1e-9).ceil() as i64;
            let last = (range.end / step + 1e-9).floor() as i64;
            first..=last
        };
        let (m, step) = [1.0, 2.0, 5.0, 10.0]
            .into_iter()
            .map(|m| (m, m * magnitude))
            .find(|&(_, step)| multiples(step).count() <= max)
            .unwrap_or((10.0, 10.0 * magnitude));
        // step = m × 10^k with m in {1, 2, 5, 10}: -k decimals write it
        // exactly (1e-3 is not quite 10^-3 in binary, hence the rounding).
        let k = (step / m).log10().round() + if m == 10.0 { 1.0 } else { 0.0 };
        let decimals = if k < 0.0 { (-k) as usize } else { 0 };
        let values = multiples(step).map(|i| i as f64 * step).collect();
        Ticks {
            values,
            step,
            decimals,
        }
    }

    /// The label of a value on this axis.
    pub fn label(&self, v: f64) -> String {
        format!("{v:.*}", self.decimals)
    }

    /// The label of each tick.
    #[cfg(test)]
    pub fn labels(&self) -> Vec<String> {
        self.values.iter().map(|&v| self.label(v)).collect()
    }
}

/// A linear f64 axis whose bold mesh lines and labels sit at given ticks
/// (and light lines halfway between them). plotters' `with_key_points`
/// does the same but loses the axis' label formatting.
struct TickedAxis {
    linear: RangedCoordf64,
    bold: Vec<f64>,
    light: Vec<f64>,
}

impl TickedAxis {
    fn new(range: std::ops::Range<f64>, ticks: &Ticks) -> Self {
        let half = ticks.step / 2.0;
        let light = ticks
            .values
            .iter()
            .flat_map(|v| [v - half, v + half])
            .filter(|v| range.contains(v))
            .collect();
        TickedAxis {
            linear: range.into(),
            bold: ticks.values.clone(),
            light,
        }
    }
}

impl Ranged for TickedAxis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn range(&self) -> std::ops::Range<f64> {
        self.linear.range()
    }

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.linear.map(value, limit)
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            self.light.clone()
        } else {
            self.bold.clone()
        }
    }
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
    let ticks = Ticks::new(y.clone(), Y_TICKS);
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT_FAMILY, 18))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(0u32..epochs + 1, TickedAxis::new(y, &ticks))?;
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
        .y_label_formatter(&|v| ticks.label(*v))
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
    fn tick_labels_are_distinct_and_exact() {
        let mut ranges = vec![
            (0.0, 1.0),
            (0.0, 0.37),
            (0.0, 14.0),
            (0.0, 2.6),
            (0.0, 250.0),
        ];
        // Accuracy panels as draw_runs makes them: spans from its minimum
        // (0.02 plus headroom) up, anywhere in [0, 1].
        for lo in 0..100 {
            for span in [0.0001, 0.011, 0.027, 0.055, 0.07, 0.1, 0.13, 0.31, 0.6] {
                let lo = f64::from(lo) / 100.0;
                ranges.push((lo, (lo + span).min(1.0)));
            }
        }
        for (lo, hi) in ranges {
            let t = Ticks::new(lo..hi, 8);
            let labels = t.labels();
            assert!((2..=8).contains(&labels.len()), "{lo}..{hi}: {labels:?}");
            let mut unique = labels.clone();
            unique.dedup();
            assert_eq!(unique, labels, "{lo}..{hi}: equal labels");
            for (v, label) in t.values.iter().zip(&labels) {
                assert!(*v >= lo - 1e-9 && *v <= hi + 1e-9, "{lo}..{hi}: {v}");
                // The label is the tick's value, not a rounding of it.
                let read: f64 = label.parse().unwrap();
                assert!((read - v).abs() < t.step * 1e-6, "{lo}..{hi}: {v} {label}");
            }
        }
    }

    #[test]
    fn ticks_of_the_issue_range_read_cleanly() {
        // The demo's accuracy panel used to label 0.005 steps with two
        // decimals: 0.85, 0.85, 0.84, 0.84, …
        let t = Ticks::new(0.826..0.862, 8);
        assert_eq!(
            t.labels(),
            ["0.830", "0.835", "0.840", "0.845", "0.850", "0.855", "0.860"]
        );
        let t = Ticks::new(0.79..0.87, 8);
        assert_eq!(t.labels(), ["0.80", "0.82", "0.84", "0.86"]);
        let t = Ticks::new(0.0..2.8, 8);
        assert_eq!(t.labels(), ["0.0", "0.5", "1.0", "1.5", "2.0", "2.5"]);
        let t = Ticks::new(0.0..14.0, 8);
        assert_eq!(t.labels(), ["0", "2", "4", "6", "8", "10", "12", "14"]);
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
