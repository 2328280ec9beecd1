//! A study repeated over several training seeds: the Table 3 analog as mean ± standard
//! deviation over seeds (each seed's value the average over the task orders, as one seed's
//! report has it), each task's own gain on its target after the first task, the paper's claims
//! stated with counts over (seed, order) pairs, and charts with error bars.
//!
//! A pure function of its records: the base model's evaluation (one, shared: the seeds differ
//! in training only), and per seed the forgetting records of every method and order (their
//! trajectories a^0 .. a^T hold every value the tables need), the soup's and the joint model's
//! evaluations and the training summaries.
use std::collections::BTreeMap;
use std::path::Path;

use plotters::coord::ranged1d::SegmentValue;
use plotters::coord::Shift;
use plotters::prelude::*;
use serde::Serialize;

use crate::records::{DeclaredRewards, ForgettingRecord, Metric, Task};

use super::charts::{fail, method_color, save, trajectory_panel, Figure, FONT};
use super::inputs::{method_rank, method_title, parse_order, task_title};
use super::{precision, write_file, ReportError};

/// One method and order of one seed.
#[derive(Debug, Clone, PartialEq)]
pub struct SeedRun {
    pub seed: String,
    pub method: String,
    pub order: String,
    pub record: ForgettingRecord,
}

/// An evaluation of one seed's model (soup, joint tuning).
#[derive(Debug, Clone, PartialEq)]
pub struct SeedEval {
    pub seed: String,
    pub metrics: BTreeMap<Metric, f64>,
}

/// One training object of one seed (stages merged into one object count once: same `key`).
#[derive(Debug, Clone, PartialEq)]
pub struct SeedTraining {
    pub seed: String,
    pub key: String,
    pub method: String,
    pub task: Option<Task>,
    pub seconds_per_epoch: f64,
}

/// Everything a seeds report reads.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SeedStudy {
    pub base: BTreeMap<Metric, f64>,
    pub runs: Vec<SeedRun>,
    pub soups: Vec<SeedEval>,
    pub joints: Vec<SeedEval>,
    pub trainings: Vec<SeedTraining>,
    /// The rewards the pipeline declared, as its records name them (titles, directions, letters).
    pub rewards: DeclaredRewards,
}

/// Mean and sample standard deviation (n - 1; 0 for one value) of `n` values.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stat {
    pub mean: f64,
    pub std: f64,
    pub n: usize,
}

impl Stat {
    pub fn of(values: &[f64]) -> Option<Stat> {
        let n = values.len();
        if n == 0 {
            return None;
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        let var = if n > 1 { values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64 } else { 0.0 };
        Some(Stat { mean, std: var.sqrt(), n })
    }

    fn text(&self, digits: usize) -> String {
        format!("{:.*} ± {:.*}", digits, self.mean, digits, self.std)
    }
}

/// A claim of the paper, counted over the cases where it can be checked.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Claim {
    /// Short stable name (`metrics.json` key).
    pub id: String,
    pub text: String,
    /// Cases where it holds, of `of` cases.
    pub holds: usize,
    pub of: usize,
    /// What a case is (`(seed, order) pairs`, `seeds`, ...).
    pub unit: String,
    /// Mean difference behind the claim (the sign in the claim's favour is positive).
    pub mean_margin: Option<f64>,
}

/// A method's own-task gain: the target after the first task minus the base model's.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Gain {
    pub method: String,
    pub task: Task,
    pub metric: Metric,
    /// Over seeds; for PNG size the relative change in percent.
    pub change: Stat,
    pub relative_percent: bool,
}

/// The metric a task optimises (its first target: PNG size for compressibility).
pub fn target_metric(task: &Task) -> Metric {
    task.targets().swap_remove(0)
}

impl SeedStudy {
    /// Seeds in their numeric order when they are numbers, else as text.
    pub fn seeds(&self) -> Vec<String> {
        let mut seeds: Vec<String> = Vec::new();
        for s in self.runs.iter().map(|r| &r.seed).chain(self.soups.iter().map(|e| &e.seed)).chain(self.joints.iter().map(|e| &e.seed)) {
            if !seeds.contains(s) {
                seeds.push(s.clone());
            }
        }
        seeds.sort_by(|a, b| match (a.parse::<i64>(), b.parse::<i64>()) {
            (Ok(x), Ok(y)) => x.cmp(&y),
            _ => a.cmp(b),
        });
        seeds
    }

    pub fn methods(&self) -> Vec<String> {
        let mut methods: Vec<String> = Vec::new();
        for r in &self.runs {
            if !methods.contains(&r.method) {
                methods.push(r.method.clone());
            }
        }
        methods.sort_by_key(|m| method_rank(m));
        methods
    }

    /// Orders as they first appear.
    pub fn orders(&self) -> Vec<String> {
        let mut orders: Vec<String> = Vec::new();
        for r in &self.runs {
            if !orders.contains(&r.order) {
                orders.push(r.order.clone());
            }
        }
        orders
    }

    fn run(&self, seed: &str, method: &str, order: &str) -> Option<&SeedRun> {
        self.runs.iter().find(|r| r.seed == seed && r.method == method && r.order == order)
    }

    /// Checks that every record covers its order and that no (seed, method, order) repeats.
    pub fn check(&self) -> Result<(), ReportError> {
        for (i, r) in self.runs.iter().enumerate() {
            let tasks = parse_order(&r.order, &self.rewards)?;
            if r.record.tasks != tasks {
                return Err(ReportError::Input(format!("forgetting record of seed {} {} is labelled order {} but covers other tasks", r.seed, r.method, r.order)));
            }
            if self.runs[..i].iter().any(|o| o.seed == r.seed && o.method == r.method && o.order == r.order) {
                return Err(ReportError::Input(format!("two forgetting records of seed {}, {}, order {}", r.seed, r.method, r.order)));
            }
        }
        if self.runs.is_empty() {
            return Err(ReportError::Input("no forgetting records (input `forgetting`)".into()));
        }
        Ok(())
    }

    /// Per seed, the average over the orders of the final value and of the reported F.
    fn seed_average(&self, seed: &str, method: &str, metric: &Metric) -> (Option<f64>, Option<f64>) {
        let runs: Vec<&SeedRun> = self.runs.iter().filter(|r| r.seed == seed && r.method == method).collect();
        let finals: Vec<f64> = runs.iter().filter_map(|r| final_value(r, metric)).collect();
        let forgetting: Vec<f64> = runs.iter().filter_map(|r| r.record.forgetting.get(metric).copied().flatten()).collect();
        (Stat::of(&finals).map(|s| s.mean), Stat::of(&forgetting).map(|s| s.mean))
    }

    /// Over seeds, the per-seed averages over the orders: (value, F).
    pub fn average(&self, method: &str, metric: &Metric) -> (Option<Stat>, Option<Stat>) {
        let (mut values, mut forgetting) = (Vec::new(), Vec::new());
        for seed in self.seeds() {
            let (v, f) = self.seed_average(&seed, method, metric);
            values.extend(v);
            forgetting.extend(f);
        }
        (Stat::of(&values), Stat::of(&forgetting))
    }

    /// Over seeds, the trajectory of `metric` along `order`: one statistic per step (0 = base).
    pub fn trajectory(&self, method: &str, order: &str, metric: &Metric) -> Vec<Stat> {
        let series: Vec<&Vec<f64>> = self.runs.iter().filter(|r| r.method == method && r.order == order).filter_map(|r| r.record.trajectory.get(metric)).collect();
        let steps = series.iter().map(|s| s.len()).min().unwrap_or(0);
        (0..steps).filter_map(|i| Stat::of(&series.iter().map(|s| s[i]).collect::<Vec<_>>())).collect()
    }

    /// Each method's own-task gain, over seeds: the first task's target after it minus the base
    /// model's (PNG size: relative change in percent), from an order that starts with the task.
    pub fn gains(&self) -> Vec<Gain> {
        let mut out = Vec::new();
        for method in self.methods() {
            for task in Task::ALL {
                let metric = target_metric(&task);
                let relative = metric == Metric::PngKb;
                let mut changes = Vec::new();
                for seed in self.seeds() {
                    let first = self.runs.iter().find(|r| r.seed == seed && r.method == method && r.record.tasks.first() == Some(&task));
                    if let Some(t) = first.and_then(|r| r.record.trajectory.get(&metric)).filter(|t| t.len() >= 2) {
                        changes.push(if relative { 100.0 * (t[1] - t[0]) / t[0] } else { t[1] - t[0] });
                    }
                }
                if let Some(change) = Stat::of(&changes) {
                    out.push(Gain { method: method.clone(), task, metric, change, relative_percent: relative });
                }
            }
        }
        out
    }

    /// The paper's claims with counts; comparisons are strict (a tie does not hold).
    pub fn claims(&self) -> Vec<Claim> {
        let mut out = Vec::new();
        let seeds = self.seeds();
        let orders = self.orders();
        let pairs: Vec<(String, String)> = seeds.iter().flat_map(|s| orders.iter().map(move |o| (s.clone(), o.clone()))).collect();
        // Baseline vs RID, per (seed, order): `better(rid, baseline)` the margin in RID's favour.
        let mut compare = |id: &str, text: String, value: &dyn Fn(&SeedRun) -> Option<f64>, rid_better_when_lower: bool| {
            let margins: Vec<f64> = pairs
                .iter()
                .filter_map(|(s, o)| {
                    let (b, r) = (self.run(s, "baseline", o)?, self.run(s, "rid", o)?);
                    let (vb, vr) = (value(b)?, value(r)?);
                    Some(if rid_better_when_lower { vb - vr } else { vr - vb })
                })
                .collect();
            if !margins.is_empty() {
                out.push(Claim {
                    id: id.to_string(),
                    text,
                    holds: margins.iter().filter(|&&m| m > 0.0).count(),
                    of: margins.len(),
                    unit: "(seed, order) pairs".into(),
                    mean_margin: Stat::of(&margins).map(|s| s.mean),
                });
            }
        };
        let declared = &self.rewards;
        for metric in Metric::ALL {
            let f = |r: &SeedRun| r.record.forgetting.get(&metric).copied().flatten();
            compare(&format!("forgetting_{}", metric.key()), format!("RID's {} forgetting F is below the baseline's", metric.title(declared)), &f, true);
        }
        for metric in Metric::ALL {
            let v = |r: &SeedRun| final_value(r, &metric);
            let lower = !metric.higher_is_better(declared);
            compare(&format!("final_{}", metric.key()), format!("RID's final {} is {} the baseline's", metric.title(declared), if lower { "below" } else { "above" }), &v, lower);
        }
        // The soup against a compressibility model (the baseline's single-task C model).
        let soup_margins: Vec<f64> = seeds
            .iter()
            .filter_map(|s| {
                let soup = self.soups.iter().find(|e| &e.seed == s)?.metrics.get(&Metric::PngKb)?;
                let c = self.runs.iter().find(|r| &r.seed == s && r.method == "baseline" && r.record.tasks.first() == Some(&Task::Compress))?;
                let c_png = c.record.trajectory.get(&Metric::PngKb)?.get(1)?;
                Some(soup - c_png)
            })
            .collect();
        if !soup_margins.is_empty() {
            out.push(Claim {
                id: "soup_png_above_compress_model".into(),
                text: "the model soup's PNG size is above that of the baseline's compressibility model".into(),
                holds: soup_margins.iter().filter(|&&m| m > 0.0).count(),
                of: soup_margins.len(),
                unit: "seeds".into(),
                mean_margin: Stat::of(&soup_margins).map(|s| s.mean),
            });
        }
        // Joint tuning against RID's average over the orders, per seed and target.
        for task in Task::ALL {
            let metric = target_metric(&task);
            let margins: Vec<f64> = seeds
                .iter()
                .filter_map(|s| {
                    let joint = *self.joints.iter().find(|e| &e.seed == s)?.metrics.get(&metric)?;
                    let rid = self.seed_average(s, "rid", &metric).0?;
                    Some(if metric.higher_is_better(declared) { rid - joint } else { joint - rid })
                })
                .collect();
            if !margins.is_empty() {
                out.push(Claim {
                    id: format!("joint_below_rid_{}", metric.key()),
                    text: format!("joint tuning ends worse than RID's average on {}", metric.title(declared)),
                    holds: margins.iter().filter(|&&m| m > 0.0).count(),
                    of: margins.len(),
                    unit: "seeds".into(),
                    mean_margin: Stat::of(&margins).map(|s| s.mean),
                });
            }
        }
        // RID's overhead per epoch: at most 1% over the baseline's, per (seed, task).
        let mut ratios = Vec::new();
        for s in &seeds {
            for task in Task::ALL {
                let spe = |method: &str| {
                    let v: Vec<f64> = self.trainings.iter().filter(|t| &t.seed == s && t.method == method && t.task.as_ref() == Some(&task)).map(|t| t.seconds_per_epoch).collect();
                    Stat::of(&v).map(|st| st.mean)
                };
                if let (Some(b), Some(r)) = (spe("baseline"), spe("rid")) {
                    ratios.push(r / b);
                }
            }
        }
        if !ratios.is_empty() {
            out.push(Claim {
                id: "rid_overhead_under_1_percent".into(),
                text: "RID's training time per epoch is at most 1% above the baseline's".into(),
                holds: ratios.iter().filter(|&&q| q <= 1.01).count(),
                of: ratios.len(),
                unit: "(seed, task) pairs".into(),
                mean_margin: Stat::of(&ratios).map(|s| 1.0 - s.mean),
            });
        }
        out
    }
}

fn final_value(run: &SeedRun, metric: &Metric) -> Option<f64> {
    run.record.trajectory.get(metric).and_then(|t| t.last()).copied()
}

fn header(metric: &Metric, declared: &DeclaredRewards) -> String {
    format!("{} {}", metric.title(declared), if metric.higher_is_better(declared) { "↑" } else { "↓" })
}

fn stat_cell(metric: &Metric, value: Option<Stat>, forgetting: Option<Option<Stat>>) -> String {
    let digits = precision(metric);
    let Some(v) = value else { return "n/a".into() };
    match forgetting {
        None => v.text(digits),
        Some(None) => format!("{} (-)", v.text(digits)),
        Some(Some(f)) => format!("{} ({})", v.text(digits), f.text(digits)),
    }
}

fn markdown_table(headers: &[String], rows: &[Vec<String>], label_columns: usize) -> String {
    let mut s = format!("| {} |\n|", headers.join(" | "));
    for i in 0..headers.len() {
        s.push_str(if i < label_columns { ":---|" } else { "---:|" });
    }
    s.push('\n');
    for row in rows {
        s.push_str(&format!("| {} |\n", row.join(" | ")));
    }
    s
}

/// The Table 3 analog over seeds: header and rows (base, each method's average, soup, joint).
pub fn table3(study: &SeedStudy) -> (Vec<String>, Vec<Vec<String>>) {
    let mut headers = vec!["Model".to_string()];
    headers.extend(Metric::ALL.iter().map(|m| header(m, &study.rewards)));
    let mut rows = Vec::new();
    let mut base = vec!["Base model".to_string()];
    base.extend(Metric::ALL.iter().map(|m| study.base.get(m).map_or("n/a".into(), |v| format!("{v:.*}", precision(m)))));
    rows.push(base);
    for method in study.methods() {
        let mut row = vec![format!("{}, average", method_title(&method))];
        for m in Metric::ALL {
            let (v, f) = study.average(&method, &m);
            row.push(stat_cell(&m, v, Some(f)));
        }
        rows.push(row);
    }
    for (title, evals) in [("Model soup", &study.soups), ("Joint tuning", &study.joints)] {
        if evals.is_empty() {
            continue;
        }
        let mut row = vec![title.to_string()];
        for m in Metric::ALL {
            let v: Vec<f64> = evals.iter().filter_map(|e| e.metrics.get(&m).copied()).collect();
            row.push(stat_cell(&m, Stat::of(&v), None));
        }
        rows.push(row);
    }
    (headers, rows)
}

/// The own-task gains as a table: header and rows.
pub fn gains_table(study: &SeedStudy) -> (Vec<String>, Vec<Vec<String>>) {
    let headers = vec!["Method".to_string(), "Task".to_string(), "Target".to_string(), "Base model".to_string(), "Change after the task".to_string()];
    let rows = study
        .gains()
        .iter()
        .map(|g| {
            let digits = precision(&g.metric);
            let change = if g.relative_percent { format!("{:+.1}% ± {:.1}%", g.change.mean, g.change.std) } else { format!("{:+.*} ± {:.*}", digits + 1, g.change.mean, digits + 1, g.change.std) };
            let base = study.base.get(&g.metric).map_or("n/a".into(), |v| format!("{v:.*}", digits));
            vec![method_title(&g.method), task_title(&g.task, &study.rewards), header(&g.metric, &study.rewards), base, change]
        })
        .collect();
    (headers, rows)
}

fn csv(headers: &[String], rows: &[Vec<String>]) -> String {
    let quote = |s: &String| if s.contains(',') || s.contains('"') { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.clone() };
    let mut out = headers.iter().map(quote).collect::<Vec<_>>().join(",") + "\n";
    for r in rows {
        out.push_str(&(r.iter().map(quote).collect::<Vec<_>>().join(",") + "\n"));
    }
    out
}

/// The claims as Markdown bullet points.
pub fn claims_markdown(claims: &[Claim]) -> String {
    claims
        .iter()
        .map(|c| {
            let margin = c.mean_margin.map(|m| format!(" (mean margin {m:+.4})")).unwrap_or_default();
            format!("- {}: in **{} of {}** {}{margin}\n", c.text, c.holds, c.of, c.unit)
        })
        .collect()
}

/// The flat metrics (`metrics.json`): `seeds/<method>/<metric>/{mean,std}`,
/// `seeds/<method>/forgetting/<metric>/{mean,std}`, `seeds/gain/<method>/<task>/{mean,std}`,
/// `seeds/claim/<id>/{holds,of}`.
pub fn flat_metrics(study: &SeedStudy) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let mut put = |k: String, s: Stat| {
        if s.mean.is_finite() && s.std.is_finite() {
            out.insert(format!("{k}/mean"), s.mean);
            out.insert(format!("{k}/std"), s.std);
        }
    };
    for method in study.methods() {
        for m in Metric::ALL {
            let (v, f) = study.average(&method, &m);
            if let Some(v) = v {
                put(format!("seeds/{method}/{}", m.key()), v);
            }
            if let Some(f) = f {
                put(format!("seeds/{method}/forgetting/{}", m.key()), f);
            }
        }
    }
    for g in study.gains() {
        put(format!("seeds/gain/{}/{}", g.method, g.task.name()), g.change);
    }
    for c in study.claims() {
        out.insert(format!("seeds/claim/{}/holds", c.id), c.holds as f64);
        out.insert(format!("seeds/claim/{}/of", c.id), c.of as f64);
    }
    out
}

fn padded_range(lo: f64, hi: f64) -> std::ops::Range<f64> {
    let pad = ((hi - lo) * 0.08).max(1e-9 + hi.abs() * 1e-3);
    (lo - pad)..(hi + pad)
}

/// A metric along each order, mean over seeds with ± std error bars, one line per method.
struct TrajectoryBars {
    /// The metric's column title.
    title: String,
    /// For the tasks' titles.
    declared: DeclaredRewards,
    /// (order, tasks, method -> stats per step).
    panels: Vec<(String, Vec<Task>, BTreeMap<String, Vec<Stat>>)>,
    methods: Vec<String>,
    seeds: usize,
}

impl Figure for TrajectoryBars {
    fn size(&self) -> (u32, u32) {
        let cols = self.panels.len().clamp(1, 3) as u32;
        let rows = self.panels.len().div_ceil(cols as usize).max(1) as u32;
        (420 * cols + 40, 340 * rows + 80)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        root.fill(&WHITE).map_err(fail)?;
        let legend: Vec<String> = self.methods.iter().map(|m| method_title(m)).collect();
        let title = format!("{} after each task: mean ± std over {} seeds ({})", self.title, self.seeds, legend.join(" / "));
        let area = root.titled(&title, (FONT, 20)).map_err(fail)?;
        let cols = self.panels.len().clamp(1, 3);
        let rows = self.panels.len().div_ceil(cols).max(1);
        let all: Vec<f64> = self.panels.iter().flat_map(|p| p.2.values().flatten().flat_map(|s| [s.mean - s.std, s.mean + s.std])).collect();
        let (lo, hi) = all.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
        let y = if lo.is_finite() { padded_range(lo, hi) } else { 0.0..1.0 };
        for (panel, (order, tasks, lines)) in area.split_evenly((rows, cols)).iter().zip(&self.panels) {
            let labels: Vec<String> = std::iter::once("base".to_string()).chain(tasks.iter().map(|t| format!("+{}", task_title(t, &self.declared)))).collect();
            let mut chart = trajectory_panel(panel, order, &labels, y.clone(), &self.title)?;
            for method in &self.methods {
                let Some(stats) = lines.get(method) else { continue };
                let color = method_color(method);
                let pts: Vec<(SegmentValue<i32>, f64)> = stats.iter().enumerate().map(|(i, s)| (SegmentValue::CenterOf(i as i32), s.mean)).collect();
                chart.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2))).map_err(fail)?;
                chart
                    .draw_series(stats.iter().enumerate().map(|(i, s)| ErrorBar::new_vertical(SegmentValue::CenterOf(i as i32), s.mean - s.std, s.mean, s.mean + s.std, color.stroke_width(2), 10)))
                    .map_err(fail)?;
            }
        }
        Ok(())
    }
}

/// Forgetting per metric: per method, the per-seed average over orders, mean ± std over seeds.
struct ForgettingBars {
    /// metric title -> method -> F over seeds.
    panels: Vec<(String, BTreeMap<String, Stat>)>,
    methods: Vec<String>,
    seeds: usize,
}

impl Figure for ForgettingBars {
    fn size(&self) -> (u32, u32) {
        let cols = self.panels.len().clamp(1, 3) as u32;
        let rows = self.panels.len().div_ceil(cols as usize).max(1) as u32;
        (380 * cols + 40, 320 * rows + 80)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        root.fill(&WHITE).map_err(fail)?;
        let legend: Vec<String> = self.methods.iter().map(|m| method_title(m)).collect();
        let title = format!("Forgetting F (average over orders), mean ± std over {} seeds ({})", self.seeds, legend.join(" / "));
        let area = root.titled(&title, (FONT, 20)).map_err(fail)?;
        let cols = self.panels.len().clamp(1, 3);
        let rows = self.panels.len().div_ceil(cols).max(1);
        for (panel, (metric, bars)) in area.split_evenly((rows, cols)).iter().zip(&self.panels) {
            let top = bars.values().map(|s| s.mean + s.std).fold(0.0f64, f64::max);
            let top = if top > 0.0 { top * 1.15 } else { 1.0 };
            let n = self.methods.len();
            let names: Vec<String> = self.methods.iter().map(|m| method_title(m)).collect();
            let mut chart = ChartBuilder::on(panel)
                .caption(metric.as_str(), (FONT, 18))
                .margin(12)
                .x_label_area_size(30)
                .y_label_area_size(64)
                .build_cartesian_2d(-0.5..n as f64 - 0.5, 0.0..top)
                .map_err(fail)?;
            chart
                .configure_mesh()
                .x_labels(n)
                .x_label_formatter(&|x| {
                    let i = x.round();
                    if (x - i).abs() < 1e-6 && i >= 0.0 { names.get(i as usize).cloned().unwrap_or_default() } else { String::new() }
                })
                .label_style((FONT, 13))
                .disable_x_mesh()
                .light_line_style(RGBColor(245, 245, 245))
                .bold_line_style(RGBColor(225, 225, 225))
                .draw()
                .map_err(fail)?;
            for (i, method) in self.methods.iter().enumerate() {
                let Some(s) = bars.get(method) else { continue };
                let color = method_color(method);
                let x = i as f64;
                chart.draw_series(std::iter::once(Rectangle::new([(x - 0.3, 0.0), (x + 0.3, s.mean.max(0.0))], color.mix(0.8).filled()))).map_err(fail)?;
                chart.draw_series(std::iter::once(ErrorBar::new_vertical(x, (s.mean - s.std).max(0.0), s.mean, s.mean + s.std, BLACK.stroke_width(2), 12))).map_err(fail)?;
            }
        }
        Ok(())
    }
}

/// Writes the seeds report into `out`: `index.md`, `tables/seeds_table3.{md,csv}`,
/// `tables/seeds_gains.{md,csv}`, `claims.json`, `metrics.json` and the charts.
pub fn write_seeds_report(study: &SeedStudy, title: &str, out: &Path) -> Result<Vec<String>, ReportError> {
    study.check()?;
    let (tables, charts) = (out.join("tables"), out.join("charts"));
    for dir in [&tables, &charts] {
        std::fs::create_dir_all(dir).map_err(|e| ReportError::io(format!("cannot create {}", dir.display()), e))?;
    }
    let seeds = study.seeds();
    let methods = study.methods();
    let mut files = Vec::new();
    let (h3, r3) = table3(study);
    let (hg, rg) = gains_table(study);
    for (name, h, r) in [("seeds_table3", &h3, &r3), ("seeds_gains", &hg, &rg)] {
        write_file(&tables.join(format!("{name}.md")), markdown_table(h, r, 1).as_bytes())?;
        write_file(&tables.join(format!("{name}.csv")), csv(h, r).as_bytes())?;
        files.extend([format!("tables/{name}.md"), format!("tables/{name}.csv")]);
    }
    let claims = study.claims();
    let json = |v: &dyn erased_json::Json| v.to_vec().map_err(|e| ReportError::Input(e.to_string()));
    write_file(&out.join("claims.json"), &json(&claims)?)?;
    write_file(&out.join(super::REPORT_METRICS_FILE), &json(&flat_metrics(study))?)?;
    files.extend(["claims.json".to_string(), super::REPORT_METRICS_FILE.to_string()]);

    let mut chart_stems = Vec::new();
    for metric in Metric::ALL {
        let mut panels = Vec::new();
        for order in study.orders() {
            let lines: BTreeMap<String, Vec<Stat>> = methods.iter().map(|m| (m.clone(), study.trajectory(m, &order, &metric))).filter(|(_, t)| !t.is_empty()).collect();
            if !lines.is_empty() {
                panels.push((order.clone(), parse_order(&order, &study.rewards)?, lines));
            }
        }
        if panels.is_empty() {
            continue;
        }
        let stem = format!("seeds_trajectory_{}", metric.key());
        let title = metric.title(&study.rewards);
        chart_stems.push((format!("{title} after each task"), stem.clone()));
        files.extend(save(&TrajectoryBars { title, panels, methods: methods.clone(), seeds: seeds.len(), declared: study.rewards.clone() }, &charts, &stem)?.map(|f| format!("charts/{f}")));
    }
    let forgetting: Vec<(String, BTreeMap<String, Stat>)> = Metric::ALL
        .into_iter()
        .map(|m| (m.title(&study.rewards), methods.iter().filter_map(|method| study.average(method, &m).1.map(|s| (method.clone(), s))).collect::<BTreeMap<_, _>>()))
        .filter(|(_, b)| !b.is_empty())
        .collect();
    if !forgetting.is_empty() {
        files.extend(save(&ForgettingBars { panels: forgetting, methods: methods.clone(), seeds: seeds.len() }, &charts, "seeds_forgetting")?.map(|f| format!("charts/{f}")));
        chart_stems.push(("Forgetting".to_string(), "seeds_forgetting".to_string()));
    }

    let mut index = format!("# {title}\n\n");
    index.push_str(&format!(
        "{} seeds ({}), {} methods, {} task orders. Each seed's value is the average over the orders (as one seed's Table 3 has it); the tables give the mean ± the standard deviation over the seeds (n - 1). Forgetting F in parentheses, \"-\" where the paper does not report it.\n\n",
        seeds.len(),
        seeds.join(", "),
        methods.len(),
        study.orders().len()
    ));
    index.push_str("## Table 3 analog over seeds\n\n");
    index.push_str(&markdown_table(&h3, &r3, 1));
    index.push_str("\n## Each task's own gain (first task of an order, from the base model)\n\n");
    index.push_str(&markdown_table(&hg, &rg, 1));
    index.push_str("\n## The paper's claims, counted\n\nStrict comparisons (a tie does not count); the margin is in the claim's favour when positive.\n\n");
    index.push_str(&claims_markdown(&claims));
    index.push_str("\n## Charts\n\n");
    for (caption, stem) in &chart_stems {
        index.push_str(&format!("### {caption}\n\n![{caption}](charts/{stem}.png)\n\n"));
    }
    write_file(&out.join(super::INDEX_FILE), index.as_bytes())?;
    files.push(super::INDEX_FILE.to_string());
    Ok(files)
}

mod erased_json {
    /// Pretty JSON of any serialisable value, behind a trait object.
    pub trait Json {
        fn to_vec(&self) -> serde_json::Result<Vec<u8>>;
    }

    impl<T: serde::Serialize> Json for T {
        fn to_vec(&self) -> serde_json::Result<Vec<u8>> {
            serde_json::to_vec_pretty(self)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(tasks: &str, clip: &[f64], png: &[f64], f_clip: f64) -> ForgettingRecord {
        let tasks = parse_order(tasks, &DeclaredRewards::default()).unwrap();
        let mut forgetting = BTreeMap::new();
        forgetting.insert(Metric::ClipScore, Some(f_clip));
        forgetting.insert(Metric::PngKb, None);
        let mut trajectory = BTreeMap::new();
        trajectory.insert(Metric::ClipScore, clip.to_vec());
        trajectory.insert(Metric::PngKb, png.to_vec());
        ForgettingRecord { tasks, forgetting, trajectory, rewards: DeclaredRewards::default() }
    }

    fn study() -> SeedStudy {
        let mut runs = Vec::new();
        // Two seeds x two orders; RID forgets less CLIP score except in seed 1, order CA.
        for (seed, rid_f) in [("0", [1.0, 2.0]), ("1", [1.5, 9.0])] {
            for (i, order) in ["AC", "CA"].iter().enumerate() {
                runs.push(SeedRun { seed: seed.into(), method: "baseline".into(), order: order.to_string(), record: record(order, &[70.0, 66.0, 64.0], &[1.0, 0.9, 0.95], 6.0) });
                let clip_end = 70.0 - rid_f[i];
                runs.push(SeedRun { seed: seed.into(), method: "rid".into(), order: order.to_string(), record: record(order, &[70.0, 69.0, clip_end], &[1.0, 0.95, 0.97], rid_f[i]) });
            }
        }
        let mut base = BTreeMap::new();
        base.insert(Metric::ClipScore, 70.0);
        base.insert(Metric::PngKb, 1.0);
        let soup = |seed: &str, png: f64| SeedEval { seed: seed.into(), metrics: [(Metric::PngKb, png)].into_iter().collect() };
        SeedStudy { base, runs, soups: vec![soup("0", 0.99), soup("1", 0.85)], joints: Vec::new(), trainings: Vec::new(), rewards: DeclaredRewards::default() }
    }

    #[test]
    fn stats_are_mean_and_sample_std() {
        let s = Stat::of(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert_eq!(s.mean, 2.5);
        assert!((s.std - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!(Stat::of(&[7.0]).unwrap().std, 0.0);
        assert!(Stat::of(&[]).is_none());
    }

    #[test]
    fn claims_count_the_pairs_where_they_hold() {
        let s = study();
        s.check().unwrap();
        let claims = s.claims();
        let clip = claims.iter().find(|c| c.id == "forgetting_clip_score").unwrap();
        assert_eq!((clip.holds, clip.of), (3, 4), "{clip:?}");
        assert_eq!(clip.unit, "(seed, order) pairs");
        // Margins 5, 4, 4.5, -3: mean 2.625.
        assert!((clip.mean_margin.unwrap() - 2.625).abs() < 1e-12);
        // PNG forgetting is not reported in any pair: no claim.
        assert!(!claims.iter().any(|c| c.id == "forgetting_png_kb"));
        // Final PNG: RID 0.97 vs the baseline's 0.95, lower is better: holds nowhere.
        let png = claims.iter().find(|c| c.id == "final_png_kb").unwrap();
        assert_eq!((png.holds, png.of), (0, 4));
        // Soup vs the baseline's compressibility model (order CA, step 1: 0.9): 0.99 > 0.9 holds, 0.85 does not.
        let soup = claims.iter().find(|c| c.id == "soup_png_above_compress_model").unwrap();
        assert_eq!((soup.holds, soup.of), (1, 2));
    }

    #[test]
    fn averages_gains_and_tables_are_over_seeds() {
        let s = study();
        // Seed 0: RID's final CLIP 69 and 68, average 68.5; seed 1: 68.5 and 61, average 64.75.
        let (v, f) = s.average("rid", &Metric::ClipScore);
        let v = v.unwrap();
        assert!((v.mean - (68.5 + 64.75) / 2.0).abs() < 1e-12 && v.n == 2);
        assert!((f.unwrap().mean - (1.5 + 5.25) / 2.0).abs() < 1e-12);
        let gains = s.gains();
        let png = gains.iter().find(|g| g.method == "baseline" && g.task == Task::Compress).unwrap();
        assert!(png.relative_percent && (png.change.mean + 10.0).abs() < 1e-9 && png.change.std < 1e-9);
        let (headers, rows) = table3(&s);
        assert_eq!(headers.len(), 7);
        assert_eq!(rows.len(), 4, "base, baseline, RID, soup");
        assert!(rows[2][5].starts_with("66.62 ± "), "{:?}", rows[2]);
        let traj = s.trajectory("rid", "CA", &Metric::ClipScore);
        assert_eq!(traj.len(), 3);
        assert!((traj[2].mean - (68.0 + 61.0) / 2.0).abs() < 1e-12);
    }

    #[test]
    fn the_report_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_seeds_report(&study(), "test", dir.path()).unwrap();
        for f in ["index.md", "claims.json", "metrics.json", "tables/seeds_table3.csv", "charts/seeds_trajectory_clip_score.png", "charts/seeds_forgetting.svg"] {
            assert!(files.contains(&f.to_string()) && dir.path().join(f).is_file(), "{f}");
        }
        let index = std::fs::read_to_string(dir.path().join("index.md")).unwrap();
        assert!(index.contains("in **3 of 4** (seed, order) pairs"), "{index}");
        let metrics: BTreeMap<String, f64> = serde_json::from_slice(&std::fs::read(dir.path().join("metrics.json")).unwrap()).unwrap();
        assert_eq!(metrics["seeds/claim/forgetting_clip_score/holds"], 3.0);
    }

    #[test]
    fn a_record_of_another_order_is_refused() {
        let mut s = study();
        s.runs[0].order = "CA".into();
        assert!(s.check().is_err());
    }
}
