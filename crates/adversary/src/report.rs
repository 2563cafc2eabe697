//! The extraction report: which colluding sets a sweep measures, every
//! outcome, the curve (the strongest set of each size), and its tables.

use serde::{Deserialize, Serialize};

use crate::attack::{Budgets, Outcome, Score};
use crate::plan::Positions;

/// How a colluding set was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SetKind {
    /// k neighbouring hops.
    Contiguous,
    /// Every second hop from the second, never an end (paper Figure 4:
    /// hops 2, 4, 6).
    Alternating,
    /// The first and the last hop (paper §5.1).
    Ends,
    /// Named on the command line.
    Chosen,
}

impl SetKind {
    /// Its name in tables.
    pub fn name(self) -> &'static str {
        match self {
            SetKind::Contiguous => "contiguous",
            SetKind::Alternating => "alternating",
            SetKind::Ends => "ends",
            SetKind::Chosen => "chosen",
        }
    }
}

/// The sets a sweep over a cascade of `n` hops measures (0-based
/// positions): every contiguous set of 1 … n − 1 hops, the alternating
/// set (when it has two hops or more) and both ends.
pub fn sweep_sets(n: usize) -> Vec<(SetKind, Vec<usize>)> {
    let mut out = Vec::new();
    for k in 1..n {
        for start in 0..=n - k {
            out.push((SetKind::Contiguous, (start..start + k).collect()));
        }
    }
    let alternating: Vec<usize> = (1..n.saturating_sub(1)).step_by(2).collect();
    if alternating.len() >= 2 {
        out.push((SetKind::Alternating, alternating));
    }
    if n >= 3 {
        out.push((SetKind::Ends, vec![0, n - 1]));
    }
    out
}

/// One measured set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// The cascade's options, in words (`plain`, `--keep first,last`,
    /// `2 dummies`).
    pub cascade: String,
    /// Hops in that cascade.
    pub n: usize,
    /// How the set was chosen.
    pub kind: SetKind,
    /// What it got.
    pub outcome: Outcome,
}

/// The baseline for one auxiliary size.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    /// Auxiliary images.
    pub aux: usize,
    /// The architecture trained from scratch on them.
    pub score: Score,
}

/// A whole measurement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The model's name.
    pub model: String,
    /// The command that reproduces it.
    pub command: String,
    /// Images the designer trained on, epochs, and the images scored
    /// (never sent through the cascade).
    pub train_images: usize,
    /// Designer's epochs.
    pub epochs: u32,
    /// Images the surrogates are scored on.
    pub eval_images: usize,
    /// Whether the auxiliary images came with labels.
    pub aux_labeled: bool,
    /// The designer's model's accuracy on the scored images.
    pub designer_accuracy: f64,
    /// Training budgets of the attacks.
    pub budgets: Budgets,
    /// Baselines.
    pub baselines: Vec<Baseline>,
    /// Every set measured.
    pub rows: Vec<Row>,
    /// Wall-clock seconds of the whole run (cascades and attacks).
    pub seconds: f64,
}

/// One point of the curve.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// Colluding hops.
    pub k: usize,
    /// The strongest contiguous set of k hops (by agreement).
    pub score: Score,
}

impl Report {
    /// The cascades measured, in order.
    pub fn cascades(&self) -> Vec<(String, usize)> {
        let mut out: Vec<(String, usize)> = Vec::new();
        for r in &self.rows {
            if !out.iter().any(|(c, _)| *c == r.cascade) {
                out.push((r.cascade.clone(), r.n));
            }
        }
        out
    }

    /// Auxiliary sizes measured, ascending.
    pub fn aux_sizes(&self) -> Vec<usize> {
        let mut a: Vec<usize> = self.baselines.iter().map(|b| b.aux).collect();
        a.sort_unstable();
        a.dedup();
        a
    }

    /// The baseline of `aux` images.
    pub fn baseline(&self, aux: usize) -> Option<Score> {
        self.baselines
            .iter()
            .find(|b| b.aux == aux)
            .map(|b| b.score)
    }

    fn rows_of<'a>(
        &'a self,
        cascade: &str,
        positions: Positions,
        aux: usize,
    ) -> impl Iterator<Item = &'a Row> + 'a {
        let cascade = cascade.to_string();
        self.rows.iter().filter(move |r| {
            r.cascade == cascade && r.outcome.positions == positions && r.outcome.aux == aux
        })
    }

    /// The curve: for each k, the strongest contiguous set of k hops.
    pub fn curve(&self, cascade: &str, positions: Positions, aux: usize) -> Vec<Point> {
        let mut pts: Vec<Point> = Vec::new();
        for r in self.rows_of(cascade, positions, aux) {
            if r.kind != SetKind::Contiguous {
                continue;
            }
            let (k, s) = (r.outcome.hops.len(), r.outcome.best());
            match pts.iter_mut().find(|p| p.k == k) {
                Some(p) if p.score.agreement >= s.agreement => {}
                Some(p) => p.score = s,
                None => pts.push(Point { k, score: s }),
            }
        }
        pts.sort_by_key(|p| p.k);
        pts
    }

    /// The strongest outcome of `kind` sets (alternating, ends).
    pub fn of_kind(
        &self,
        cascade: &str,
        positions: Positions,
        aux: usize,
        kind: SetKind,
    ) -> Option<&Row> {
        self.rows_of(cascade, positions, aux)
            .find(|r| r.kind == kind)
    }

    /// The summary table: accuracy / agreement of the strongest set of
    /// each size, positions `positions`, for every cascade and auxiliary
    /// size.
    pub fn summary(&self, positions: Positions) -> String {
        let aux = self.aux_sizes();
        let mut t = String::from("| cascade | colluding hops |");
        for a in &aux {
            t.push_str(&format!(" aux {} |", thousands(*a)));
        }
        t.push_str("\n|---|---|");
        t.push_str(&"---|".repeat(aux.len()));
        t.push('\n');
        t.push_str("| — | none (baseline: from scratch) |");
        for a in &aux {
            t.push_str(&format!(" {} |", cell(self.baseline(*a))));
        }
        t.push('\n');
        for (c, n) in self.cascades() {
            let curves: Vec<Vec<Point>> =
                aux.iter().map(|a| self.curve(&c, positions, *a)).collect();
            for k in (1..n).filter(|k| curves.iter().any(|c| c.iter().any(|p| p.k == *k))) {
                t.push_str(&format!(
                    "| {c} ({n} hops) | k = {k} (strongest contiguous) |"
                ));
                for pts in &curves {
                    t.push_str(&format!(
                        " {} |",
                        cell(pts.iter().find(|p| p.k == k).map(|p| p.score))
                    ));
                }
                t.push('\n');
            }
            let mut named: Vec<(SetKind, Vec<usize>)> = Vec::new();
            for r in self
                .rows
                .iter()
                .filter(|r| r.cascade == c && r.kind != SetKind::Contiguous)
            {
                if !named
                    .iter()
                    .any(|(k, h)| *k == r.kind && *h == r.outcome.hops)
                {
                    named.push((r.kind, r.outcome.hops.clone()));
                }
            }
            for (kind, set) in named {
                t.push_str(&format!(
                    "| {c} ({n} hops) | {} {} |",
                    kind.name(),
                    hops(&set)
                ));
                for a in &aux {
                    let r = self
                        .rows_of(&c, positions, *a)
                        .find(|r| r.kind == kind && r.outcome.hops == set);
                    t.push_str(&format!(" {} |", cell(r.map(|r| r.outcome.best()))));
                }
                t.push('\n');
            }
        }
        t
    }

    /// Every row: set, knowledge, auxiliary size, what the colluders see,
    /// and every attack's score.
    pub fn full(&self) -> String {
        let mut t = String::from(
            "| cascade | set | hops | positions | aux | sees | order right | warm start | regression | head | best | inversion PSNR: descent / decoder (prior) | s |\n|---|---|---|---|---:|---|---|---|---|---|---|---|---:|\n",
        );
        for r in &self.rows {
            let o = &r.outcome;
            let sees = match (o.sees_images, o.labels) {
                (true, crate::data::LabelSource::None) => "images".to_string(),
                (false, crate::data::LabelSource::None) => "—".to_string(),
                (i, l) => format!(
                    "{}labels ({})",
                    if i { "images, " } else { "" },
                    match l {
                        crate::data::LabelSource::LossHop => "loss hop".to_string(),
                        crate::data::LabelSource::Gradient(h) =>
                            format!("gradient at hop {}", h + 1),
                        crate::data::LabelSource::None => String::new(),
                    }
                ),
            };
            t.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} |\n",
                r.cascade,
                r.kind.name(),
                hops(&o.hops),
                o.positions,
                o.aux,
                sees,
                o.order_right.map_or("—", |b| if b { "yes" } else { "no" }),
                cell(Some(o.warm)),
                cell(o.regress),
                cell(o.head),
                cell(Some(o.best())),
                o.inversion.map_or("—".into(), |i| format!(
                    "{:.1} / {:.1} dB ({:.1} dB), {} images",
                    i.psnr_db, i.decoder_psnr_db, i.prior_psnr_db, i.images
                )),
                o.seconds
            ));
        }
        t
    }
}

/// `accuracy / agreement`, or a dash.
fn cell(s: Option<Score>) -> String {
    s.map_or("—".into(), |s| {
        format!("{:.3} / {:.3}", s.accuracy, s.agreement)
    })
}

/// `{2, 4}`, 1-based.
fn hops(h: &[usize]) -> String {
    let v: Vec<String> = h.iter().map(ToString::to_string).collect();
    format!("{{{}}}", v.join(", "))
}

/// `10,000`.
pub fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_sweep_of_five_hops_has_fourteen_contiguous_sets_the_alternating_one_and_the_ends() {
        let s = sweep_sets(5);
        let contiguous = s.iter().filter(|(k, _)| *k == SetKind::Contiguous).count();
        assert_eq!(contiguous, 5 + 4 + 3 + 2);
        assert!(s.contains(&(SetKind::Alternating, vec![1, 3])));
        assert!(s.contains(&(SetKind::Ends, vec![0, 4])));
        let seven = sweep_sets(7);
        assert!(seven.contains(&(SetKind::Alternating, vec![1, 3, 5])));
        assert!(!sweep_sets(3)
            .iter()
            .any(|(k, _)| *k == SetKind::Alternating));
    }

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(100), "100");
        assert_eq!(thousands(10_000), "10,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
