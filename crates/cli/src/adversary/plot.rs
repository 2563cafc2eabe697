//! The extraction curve as one PNG: accuracy (top row) and agreement
//! with the designer's model (bottom row) against the number k of
//! colluding hops, one column per cascade; one colour per auxiliary
//! size, solid for positions known, dashed for unknown, a dotted
//! horizontal line for the from-scratch baseline, a cross for the
//! alternating set (paper Figure 4).

use std::path::Path;

use anyhow::anyhow;
use mixnn_adversary::report::{Report, SetKind};
use mixnn_adversary::{Positions, Score};
use plotters::prelude::*;

use crate::plot::{register_font, FONT_FAMILY};

const COLORS: [RGBColor; 5] = [
    RGBColor(127, 127, 127),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
];

/// Draws `report`'s curve to `out`.
pub fn extraction(report: &Report, out: &Path) -> anyhow::Result<()> {
    register_font()?;
    let cascades = report.cascades();
    let cols = cascades.len().max(1) as u32;
    let size = (560 * cols, 900);
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", out.display());
    let root = BitMapBackend::new(out, size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root
        .titled(
            &format!(
                "What k colluding hops can steal: {} ({} training images, {} epochs)",
                report.model, report.train_images, report.epochs
            ),
            (FONT_FAMILY, 22),
        )
        .map_err(|e| err(&e))?;
    let panels = root.split_evenly((2, cols as usize));
    for (c, (cascade, n)) in cascades.iter().enumerate() {
        for (row, (what, pick)) in [
            ("accuracy", (|s: Score| s.accuracy) as fn(Score) -> f64),
            ("agreement", |s: Score| s.agreement),
        ]
        .into_iter()
        .enumerate()
        {
            let area = &panels[row * cols as usize + c];
            draw(report, area, cascade, *n, what, pick, c == 0 && row == 0).map_err(|e| err(&e))?;
        }
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;
type DrawResult =
    Result<(), DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>>;

fn draw(
    report: &Report,
    area: &Area<'_>,
    cascade: &str,
    n: usize,
    what: &str,
    pick: fn(Score) -> f64,
    legend: bool,
) -> DrawResult {
    let xmax = n.max(2) as f64 - 0.5;
    let mut chart = ChartBuilder::on(area)
        .caption(format!("{cascade} ({n} hops): {what}"), (FONT_FAMILY, 17))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0.5f64..xmax, 0.0f64..1.02)?;
    chart
        .configure_mesh()
        .x_desc("colluding hops k")
        .y_desc(what)
        .x_labels(n.max(2))
        .x_label_formatter(&|x| {
            if (x.fract()).abs() < 1e-6 && *x >= 1.0 {
                format!("{x:.0}")
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|v| format!("{v:.1}"))
        .label_style((FONT_FAMILY, 13))
        .axis_desc_style((FONT_FAMILY, 14))
        .bold_line_style(RGBColor(215, 215, 215))
        .light_line_style(RGBColor(245, 245, 245))
        .draw()?;
    for (i, aux) in report.aux_sizes().into_iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        if let Some(b) = report.baseline(aux) {
            let y = pick(b);
            chart.draw_series(DashedLineSeries::new(
                vec![(0.5, y), (xmax, y)],
                2,
                4,
                color.stroke_width(1),
            ))?;
        }
        for pos in [Positions::Known, Positions::Unknown] {
            let pts: Vec<(f64, f64)> = report
                .curve(cascade, pos, aux)
                .iter()
                .map(|p| (p.k as f64, pick(p.score)))
                .collect();
            if pts.is_empty() {
                continue;
            }
            let line = color.stroke_width(if pos == Positions::Known { 3 } else { 2 });
            let label = format!(
                "aux {} ({})",
                mixnn_adversary::report::thousands(aux),
                if pos == Positions::Known {
                    "positions known"
                } else {
                    "unknown"
                }
            );
            let key = move |(x, y): (i32, i32)| PathElement::new(vec![(x, y), (x + 22, y)], line);
            if pos == Positions::Known {
                let s = chart.draw_series(LineSeries::new(pts.clone(), line))?;
                if legend {
                    s.label(label).legend(key);
                }
                chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
            } else {
                let s = chart.draw_series(DashedLineSeries::new(pts.clone(), 7, 4, line))?;
                if legend {
                    s.label(label).legend(key);
                }
                chart.draw_series(
                    pts.iter()
                        .map(|&p| TriangleMarker::new(p, 4, color.filled())),
                )?;
            }
            if let Some(r) = report.of_kind(cascade, pos, aux, SetKind::Alternating) {
                let p = (r.outcome.hops.len() as f64, pick(r.outcome.best()));
                chart.draw_series(std::iter::once(Cross::new(p, 6, color.stroke_width(2))))?;
            }
        }
    }
    if legend {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font((FONT_FAMILY, 12))
            .draw()?;
    }
    Ok(())
}
