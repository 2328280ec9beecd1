//! Paper-style reports of a study: the tables (polars DataFrames rendered as Markdown, CSV and
//! LaTeX), the charts (plotters, PNG and SVG with an embedded font), a flat `metrics.json` for
//! the regression gate, and an `index.md` that links everything.
//!
//! - [`inputs`]: the records a report reads (evaluations, forgetting, training logs), with the
//!   labels of the stages that wrote them.
//! - [`frames`]: those records as long-form DataFrames, one row per (stage, metric).
//! - [`tables`]: the analogs of the paper's Tables 2, 3, 4 and 6 cut from the frames.
//! - [`render`]: Markdown, CSV and LaTeX (booktabs) writers.
//! - [`charts`] and [`montage`]: trajectories, forgetting bars, training curves, sample grids.
//! - [`check`]: comparison of a run's metrics with a committed baseline file.
//! - [`seeds`]: a study over several training seeds (mean ± std, claims counted, error bars).
//!
//! A report is a pure function of the study's records to files; the report stage gathers the
//! records, and publishing to `reports/<name>/` is the runner's copy of the stage's object.
pub mod charts;
pub mod check;
pub mod frames;
pub mod inputs;
pub mod montage;
pub mod render;
pub mod seeds;
pub mod tables;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::records::Metric;

pub use inputs::{Evaluation, ForgettingRun, StudyInputs, Training};

/// Why a report could not be made, checked or published.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The I/O error is part of the message (not a `source`), so that it survives being turned
    /// into a stage failure and is not printed twice in an error chain.
    #[error("{context}: {error}")]
    Io { context: String, error: std::io::Error },
    #[error("table computation failed: {0}")]
    Frame(#[from] polars::error::PolarsError),
    #[error("chart {path}: {reason}")]
    Chart { path: PathBuf, reason: String },
    /// The inputs do not fit together (labels, task sequences, missing files).
    #[error("{0}")]
    Input(String),
}

impl ReportError {
    pub fn io(context: impl Into<String>, error: std::io::Error) -> Self {
        ReportError::Io {
            context: context.into(),
            error,
        }
    }
}

/// What a report shows beyond its inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportOptions {
    pub title: String,
    /// The task order of the Table 2 analog, as letters (`AHC`).
    pub table2_order: String,
    /// Show the paper's own numbers (SPEC.md) beside ours.
    pub paper_numbers: bool,
}

impl Default for ReportOptions {
    fn default() -> Self {
        ReportOptions {
            title: "Reward incremental learning: report".into(),
            table2_order: "AHC".into(),
            paper_numbers: false,
        }
    }
}

/// The flat metrics file that `ril-pipe check` reads.
pub const REPORT_METRICS_FILE: &str = "metrics.json";
pub const INDEX_FILE: &str = "index.md";

/// Everything a report wrote, relative to its output folder.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReportFiles {
    pub tables: Vec<String>,
    pub charts: Vec<String>,
    /// Tables or charts left out, and why (missing inputs).
    pub notes: Vec<String>,
}

/// Writes the whole report into `out`: `tables/`, `charts/`, `metrics.json`, `index.md`.
pub fn write_report(inputs: &StudyInputs, options: &ReportOptions, out: &Path) -> Result<ReportFiles, ReportError> {
    inputs.check()?;
    let frames = frames::Frames::build(inputs)?;
    let mut files = ReportFiles::default();
    let tables_dir = out.join("tables");
    let charts_dir = out.join("charts");
    for dir in [&tables_dir, &charts_dir] {
        std::fs::create_dir_all(dir).map_err(|e| ReportError::io(format!("cannot create {}", dir.display()), e))?;
    }

    let built = tables::build_all(inputs, &frames, options)?;
    for table in &built.tables {
        for written in render::write_table(table, &tables_dir)? {
            files.tables.push(format!("tables/{written}"));
        }
    }
    files.notes.extend(built.notes.iter().cloned());

    let chart_set = charts::write_all(inputs, &frames, &charts_dir)?;
    files.charts.extend(chart_set.files.iter().map(|f| format!("charts/{f}")));
    files.notes.extend(chart_set.notes.iter().cloned());
    let montages = montage::write_all(inputs, options, &charts_dir)?;
    files.charts.extend(montages.files.iter().map(|f| format!("charts/{f}")));
    files.notes.extend(montages.notes.iter().cloned());

    let metrics = flat_metrics(inputs, &built);
    let bytes = serde_json::to_vec_pretty(&metrics).map_err(|e| ReportError::Input(e.to_string()))?;
    write_file(&out.join(REPORT_METRICS_FILE), &bytes)?;

    let index = index_markdown(options, inputs, &built, &chart_set, &montages, &files.notes);
    write_file(&out.join(INDEX_FILE), index.as_bytes())?;
    Ok(files)
}

pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> Result<(), ReportError> {
    std::fs::write(path, bytes).map_err(|e| ReportError::io(format!("cannot write {}", path.display()), e))
}

/// `<stage id>/<metric>` -> value for every evaluation and forgetting value, plus
/// `<training stage id>/seconds_per_epoch` and the Table 3 averages as
/// `average/<method>/<metric>` and `average/<method>/forgetting/<metric>`. Metric names never
/// contain `/`, so the key splits at its last `/`. Non-finite values are left out.
pub fn flat_metrics(inputs: &StudyInputs, built: &tables::BuiltTables) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let mut put = |key: String, v: f64| {
        if v.is_finite() {
            out.insert(key, v);
        }
    };
    for eval in inputs.all_evaluations() {
        for (m, v) in &eval.record.metrics {
            put(format!("{}/{}", eval.stage_id, m.key()), *v);
        }
    }
    for run in &inputs.forgetting {
        for (m, f) in &run.record.forgetting {
            if let Some(f) = f {
                put(format!("{}/{}", run.stage_id, m.key()), *f);
            }
        }
    }
    for t in &inputs.trainings {
        put(format!("{}/seconds_per_epoch", t.stage_id), t.summary.seconds_per_epoch);
        put(format!("{}/reward_last_epoch", t.stage_id), t.summary.reward_last_epoch);
    }
    for ((method, metric), avg) in &built.averages {
        if let Some(v) = avg.value {
            put(format!("average/{method}/{}", metric.key()), v);
        }
        if let Some(f) = avg.forgetting {
            put(format!("average/{method}/forgetting/{}", metric.key()), f);
        }
    }
    out
}

fn index_markdown(
    options: &ReportOptions,
    inputs: &StudyInputs,
    built: &tables::BuiltTables,
    charts: &charts::ChartSet,
    montages: &montage::Montages,
    notes: &[String],
) -> String {
    let declared = inputs.rewards();
    let mut s = format!("# {}\n\n", options.title);
    s.push_str(&format!(
        "Inputs: base model `{}`, {} evaluation(s) after tasks, {} forgetting record(s), {} training stage(s){}{}.\n\n",
        inputs.base.stage_id,
        inputs.evals.len(),
        inputs.forgetting.len(),
        inputs.trainings.len(),
        inputs.soup.as_ref().map(|e| format!(", model soup `{}`", e.stage_id)).unwrap_or_default(),
        inputs.joint.as_ref().map(|e| format!(", joint tuning `{}`", e.stage_id)).unwrap_or_default(),
    ));
    s.push_str(
        "Arrows give the direction of each metric (↑ higher is better, ↓ lower is better). Numbers in \
         parentheses are the forgetting F of Eq. 3; \"-\" where the paper does not report it (a task's \
         own metric before a later task has run).\n\n",
    );
    if options.paper_numbers {
        s.push_str("Rows marked *(paper)* are the numbers of the paper (SD v1.5), for comparison.\n\n");
    }
    s.push_str("The flat metrics for `ril-pipe check` are in [metrics.json](metrics.json).\n\n");
    for table in &built.tables {
        s.push_str(&format!("## {}\n\n{}\n\n", table.caption, table.note));
        s.push_str(&render::markdown(table));
        s.push_str(&format!(
            "\n[CSV](tables/{0}.csv) · [LaTeX](tables/{0}.tex) · [Markdown](tables/{0}.md)\n\n",
            table.name
        ));
    }
    if !charts.trajectories.is_empty() {
        s.push_str("## Metrics over the task sequence\n\n");
        for (metric, stem) in &charts.trajectories {
            s.push_str(&format!("### {}\n\n![{} after each task](charts/{stem}.png)\n\n[SVG](charts/{stem}.svg)\n\n", metric.title(&declared), metric.title(&declared)));
        }
    }
    if let Some(stem) = &charts.forgetting {
        s.push_str(&format!("## Forgetting\n\n![forgetting per metric](charts/{stem}.png)\n\n[SVG](charts/{stem}.svg)\n\n"));
    }
    if !montages.files.is_empty() {
        s.push_str("## Samples\n\nThe same prompts and seeds for every model; rows are models, columns prompts.\n\n");
        for (caption, file) in &montages.captioned {
            s.push_str(&format!("### {caption}\n\n![{caption}](charts/{file})\n\n"));
        }
    }
    if !charts.trainings.is_empty() {
        s.push_str("## Training curves\n\nReward and distillation loss per optimizer step.\n\n");
        for (label, stem) in &charts.trainings {
            s.push_str(&format!("### {label}\n\n![training curve of {label}](charts/{stem}.png)\n\n[SVG](charts/{stem}.svg)\n\n"));
        }
    }
    if !notes.is_empty() {
        s.push_str("## Left out\n\n");
        for n in notes {
            s.push_str(&format!("- {n}\n"));
        }
        s.push('\n');
    }
    s
}

/// Digits shown for a metric (and its forgetting) in the tables.
pub fn precision(metric: &Metric) -> usize {
    match metric {
        Metric::Hps => 3,
        // A declared reward's scale is unknown: enough digits for scores below 1.
        Metric::Declared(_) => 4,
        _ => 2,
    }
}
