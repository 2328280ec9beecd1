//! The analogs of the paper's Tables 2, 3, 4 and 6, in the paper's row and column order.
//!
//! Each table is two DataFrames: `data`, the numbers (written as CSV; forgetting in its own
//! `<metric>_forgetting` columns), and `display`, the cells as shown (Markdown, LaTeX): values
//! with the forgetting in parentheses, "-" where it is not reported, arrows in the headers.
use std::collections::BTreeMap;

use polars::prelude::*;

use crate::records::{DeclaredRewards, Metric, Task};

use super::frames::{self, Frames};
use super::inputs::{method_title, parse_order, task_title, StudyInputs};
use super::{precision, ReportError, ReportOptions};

/// One rendered table.
#[derive(Debug, Clone)]
pub struct Table {
    /// File stem (`table3` -> `table3.md`, `.csv`, `.tex`).
    pub name: String,
    pub caption: String,
    /// One sentence under the caption: what the numbers are.
    pub note: String,
    /// The numbers, for CSV.
    pub data: DataFrame,
    /// The cells as shown; column names are the headers.
    pub display: DataFrame,
    /// Leading display columns that are labels (left-aligned); the rest are numbers.
    pub label_columns: usize,
    /// Display rows that start a new group (a rule above them in LaTeX).
    pub rules_before: Vec<usize>,
}

/// F beside a value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Forgetting {
    /// No forgetting for this row (base model, soup, the paper's rows): no parentheses.
    NotApplicable,
    /// Not reported (a target metric before a later task ran): "(-)".
    NotReported,
    Value(f64),
}

impl Forgetting {
    fn from_option(f: Option<f64>) -> Self {
        f.map_or(Forgetting::NotReported, Forgetting::Value)
    }
}

/// One row of a metric table.
#[derive(Debug, Clone)]
struct MetricRow {
    labels: Vec<String>,
    /// The paper's numbers (SPEC.md) rather than ours.
    paper: bool,
    cells: BTreeMap<Metric, (f64, Forgetting)>,
}

impl MetricRow {
    fn ours(labels: &[&str]) -> Self {
        MetricRow {
            labels: labels.iter().map(|s| s.to_string()).collect(),
            paper: false,
            cells: BTreeMap::new(),
        }
    }

    fn paper(labels: &[&str], values: &[f64; 6]) -> Self {
        MetricRow {
            labels: labels.iter().map(|s| s.to_string()).collect(),
            paper: true,
            cells: Metric::ALL.into_iter().zip(values.iter().map(|&v| (v, Forgetting::NotApplicable))).collect(),
        }
    }
}

/// The paper's Table 3 (and Table 6) rows, SD v1.5, in [`Metric::ALL`] order.
pub mod paper {
    pub const BASE: [f64; 6] = [5.23, 0.259, 425.13, 50.40, 25.77, 71.54];
    pub const BASELINE_AVERAGE: [f64; 6] = [5.62, 0.258, 370.26, 47.53, 19.76, 130.92];
    pub const RID_AVERAGE: [f64; 6] = [5.55, 0.277, 354.96, 41.45, 24.42, 85.95];
    pub const SOUP: [f64; 6] = [5.56, 0.275, 399.15, 47.36, 25.23, 86.24];
    pub const JOINT: [f64; 6] = [5.43, 0.263, 378.99, 49.20, 20.00, 82.52];
    /// Table 4: training minutes per epoch on 2x A100, aesthetic / HPS / compress.
    pub const BASELINE_MINUTES_PER_EPOCH: [f64; 3] = [10.05, 9.93, 10.04];
    pub const RID_MINUTES_PER_EPOCH: [f64; 3] = [10.10, 10.02, 10.17];

    /// The paper's averages of a method, where it has them.
    pub fn average(method: &str) -> Option<&'static [f64; 6]> {
        match method {
            "baseline" => Some(&BASELINE_AVERAGE),
            "rid" => Some(&RID_AVERAGE),
            _ => None,
        }
    }
}

/// The mean over the task orders of one method and metric (Table 3).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Average {
    pub value: Option<f64>,
    /// Mean of the reported forgetting values; `None` when no order reports it.
    pub forgetting: Option<f64>,
    pub orders: usize,
}

pub struct BuiltTables {
    pub tables: Vec<Table>,
    /// (method, metric) -> Table 3 average.
    pub averages: BTreeMap<(String, Metric), Average>,
    /// Tables left out for lack of inputs.
    pub notes: Vec<String>,
}

fn header(metric: &Metric, declared: &DeclaredRewards) -> String {
    format!("{} {}", metric.title(declared), if metric.higher_is_better(declared) { "↑" } else { "↓" })
}

fn format_value(metric: &Metric, v: f64) -> String {
    format!("{v:.*}", precision(metric))
}

fn cell_text(metric: &Metric, cell: Option<&(f64, Forgetting)>, with_forgetting: bool) -> String {
    let Some((v, f)) = cell else { return "n/a".into() };
    let value = format_value(metric, *v);
    match (with_forgetting, f) {
        (false, _) | (_, Forgetting::NotApplicable) => value,
        (true, Forgetting::NotReported) => format!("{value} (-)"),
        (true, Forgetting::Value(f)) => format!("{value} ({})", format_value(metric, *f)),
    }
}

/// The metrics of the paper's column order (then the declared rewards) that any of our rows has.
fn present_metrics(rows: &[MetricRow], declared: &DeclaredRewards) -> Vec<Metric> {
    declared.metrics().into_iter().filter(|m| rows.iter().any(|r| !r.paper && r.cells.contains_key(m))).collect()
}

struct MetricTableSpec<'a> {
    name: &'a str,
    caption: String,
    note: String,
    /// (CSV column, display header) of the label columns.
    labels: &'a [(&'a str, &'a str)],
    with_forgetting: bool,
    declared: &'a DeclaredRewards,
}

fn metric_table(spec: MetricTableSpec, rows: &[MetricRow], rules_before: Vec<usize>) -> PolarsResult<Table> {
    let metrics = present_metrics(rows, spec.declared);
    let mut data = Vec::new();
    let mut display = Vec::new();
    for (i, (csv_name, title)) in spec.labels.iter().enumerate() {
        let values: Vec<String> = rows.iter().map(|r| r.labels.get(i).cloned().unwrap_or_default()).collect();
        // Shown once per group, as in the paper; the CSV repeats it on every row.
        let shown: Vec<String> = values
            .iter()
            .enumerate()
            .map(|(j, v)| if i == 0 && j > 0 && values[j - 1] == *v && !rules_before.contains(&j) { String::new() } else { v.clone() })
            .collect();
        data.push(Column::new((*csv_name).into(), values));
        display.push(Column::new((*title).into(), shown));
    }
    data.push(Column::new("source".into(), rows.iter().map(|r| if r.paper { "paper" } else { "ours" }).collect::<Vec<_>>()));
    for m in &metrics {
        data.push(Column::new(m.key().into(), rows.iter().map(|r| r.cells.get(m).map(|c| c.0)).collect::<Vec<_>>()));
        if spec.with_forgetting {
            let f: Vec<Option<f64>> = rows
                .iter()
                .map(|r| match r.cells.get(m) {
                    Some((_, Forgetting::Value(f))) => Some(*f),
                    _ => None,
                })
                .collect();
            data.push(Column::new(format!("{}_forgetting", m.key()).into(), f));
        }
        let shown: Vec<String> = rows.iter().map(|r| cell_text(m, r.cells.get(m), spec.with_forgetting)).collect();
        display.push(Column::new(header(m, spec.declared).into(), shown));
    }
    Ok(Table {
        name: spec.name.to_string(),
        caption: spec.caption,
        note: spec.note,
        data: DataFrame::new_infer_height(data)?,
        display: DataFrame::new_infer_height(display)?,
        label_columns: spec.labels.len(),
        rules_before,
    })
}

/// Builds every table the inputs allow.
pub fn build_all(inputs: &StudyInputs, frames: &Frames, options: &ReportOptions) -> Result<BuiltTables, ReportError> {
    let mut tables = Vec::new();
    let mut notes = Vec::new();
    let methods = inputs.methods();

    if inputs.evals.is_empty() {
        notes.push("Table 2 analog: no evaluations after tasks (input `evals`).".into());
    } else {
        tables.push(table2(inputs, frames, &options.table2_order, &methods)?);
    }

    let averages = averages(frames)?;
    if inputs.forgetting.is_empty() {
        notes.push("Table 3 analog: no forgetting records (input `forgetting`).".into());
    } else {
        tables.push(table3(inputs, frames, options, &methods, &averages)?);
    }

    match &inputs.joint {
        None => notes.push("Table 6 analog: no joint-tuning evaluation (input `joint`).".into()),
        Some(_) => tables.push(table6(inputs, options, &averages)?),
    }

    match table4(frames, options, &inputs.rewards())? {
        Some(t) => tables.push(t),
        None => notes.push("Table 4 analog: no baseline or RID training summaries of a single task (input `trainings`).".into()),
    }
    // The paper's numbering.
    tables.sort_by_key(|t| t.name.trim_start_matches("table").parse::<u32>().unwrap_or(u32::MAX));
    Ok(BuiltTables { tables, averages, notes })
}

fn averages(frames: &Frames) -> Result<BTreeMap<(String, Metric), Average>, ReportError> {
    let df = frames::averages_by_method(&frames.finals)?;
    let methods = frames::strings(&df, "method")?;
    let metrics = frames::strings(&df, "metric")?;
    let values = frames::floats(&df, "value")?;
    let forgetting = frames::floats(&df, "forgetting")?;
    let orders = frames::ints(&df, "orders")?;
    let mut out = BTreeMap::new();
    for i in 0..df.height() {
        let (Some(method), Some(metric)) = (methods[i].clone(), metrics[i].as_deref().map(Metric::from_key)) else { continue };
        out.insert(
            (method, metric),
            Average {
                value: values[i],
                forgetting: forgetting[i],
                orders: orders[i].unwrap_or(0) as usize,
            },
        );
    }
    Ok(out)
}

fn base_row(frames: &Frames, label: &[&str]) -> Result<MetricRow, ReportError> {
    let base = frames::cells(&frames::evaluations_of(frames, frames::ROLE_BASE, None)?, &[])?;
    let mut row = MetricRow::ours(label);
    for ((_, m), (v, _)) in base {
        if let Some(v) = v {
            row.cells.insert(m, (v, Forgetting::NotApplicable));
        }
    }
    Ok(row)
}

/// Table 2: metrics after each task of one order, each method; forgetting so far in parentheses.
fn table2(inputs: &StudyInputs, frames: &Frames, order: &str, methods: &[String]) -> Result<Table, ReportError> {
    let declared = inputs.rewards();
    let tasks = parse_order(order, &declared)?;
    let steps = frames::evaluations_of(frames, frames::ROLE_STEP, Some(order))?;
    if steps.height() == 0 {
        let available = inputs.orders().join(", ");
        return Err(ReportError::Input(format!(
            "table2_order {order}: no evaluations of that order (the evaluations cover: {available})"
        )));
    }
    let step_of = frames::ints(&steps, "step")?;
    let method_of = frames::strings(&steps, "method")?;
    let mut rows = vec![base_row(frames, &["Base model", ""])?];
    let mut rules = vec![];
    for method in methods {
        let max_step = (0..steps.height())
            .filter(|&i| method_of[i].as_deref() == Some(method))
            .filter_map(|i| step_of[i])
            .max()
            .unwrap_or(0) as usize;
        if max_step == 0 {
            continue;
        }
        rules.push(rows.len());
        for (step, task) in tasks.iter().enumerate().take(max_step) {
            let label = format!("{}. {}", step + 1, task_title(task, &declared));
            let mut row = MetricRow::ours(&[&method_title(method), &label]);
            let at_step = steps
                .clone()
                .lazy()
                .filter(col("method").eq(lit(method.as_str())).and(col("step").eq(lit((step + 1) as i64))))
                .collect()?;
            for ((_, m), (v, f)) in frames::cells(&at_step, &["method"])? {
                if let Some(v) = v {
                    row.cells.insert(m, (v, Forgetting::from_option(f)));
                }
            }
            rows.push(row);
        }
    }
    let names: Vec<String> = tasks.iter().map(|t| task_title(t, &declared)).collect();
    metric_table(
        MetricTableSpec {
            name: "table2",
            caption: format!("Table 2 analog: metrics after each task of the order {order} ({})", names.join(" → ")),
            note: "Each row is the model after the task named, evaluated on the held-out prompts; forgetting F so far in parentheses.".into(),
            labels: &[("method", "Method"), ("after_task", "After task")],
            with_forgetting: true,
            declared: &declared,
        },
        &rows,
        rules,
    )
    .map_err(Into::into)
}

/// Table 3: final metrics of every order and method, their averages, the base model and the
/// model soup.
fn table3(
    inputs: &StudyInputs,
    frames: &Frames,
    options: &ReportOptions,
    methods: &[String],
    averages: &BTreeMap<(String, Metric), Average>,
) -> Result<Table, ReportError> {
    let finals = frames::cells(&frames.finals, &["method", "order"])?;
    let declared = inputs.rewards();
    let orders = inputs.orders();
    let mut rows = vec![base_row(frames, &["Base model", ""])?];
    if options.paper_numbers {
        rows.push(MetricRow::paper(&["SD v1.5 (paper)", ""], &paper::BASE));
    }
    let mut rules = vec![];
    for method in methods {
        let title = method_title(method);
        let method_orders: Vec<&String> = orders.iter().filter(|o| inputs.forgetting.iter().any(|f| &f.method == method && &f.order == *o)).collect();
        if method_orders.is_empty() {
            continue;
        }
        rules.push(rows.len());
        for order in method_orders {
            let mut row = MetricRow::ours(&[&title, order]);
            for m in declared.metrics() {
                if let Some((Some(v), f)) = finals.get(&(vec![method.clone(), order.clone()], m.clone())) {
                    row.cells.insert(m, (*v, Forgetting::from_option(*f)));
                }
            }
            rows.push(row);
        }
        let mut row = MetricRow::ours(&[&title, "Average"]);
        for m in declared.metrics() {
            if let Some(Average { value: Some(v), forgetting, .. }) = averages.get(&(method.clone(), m.clone())) {
                row.cells.insert(m, (*v, Forgetting::from_option(*forgetting)));
            }
        }
        rows.push(row);
        if options.paper_numbers {
            if let Some(values) = paper::average(method) {
                rows.push(MetricRow::paper(&[&title, "Average (paper)"], values));
            }
        }
    }
    if let Some(soup) = &inputs.soup {
        rules.push(rows.len());
        let mut row = MetricRow::ours(&["Model soup", ""]);
        for (m, v) in &soup.record.metrics {
            row.cells.insert(m.clone(), (*v, Forgetting::NotApplicable));
        }
        rows.push(row);
        if options.paper_numbers {
            rows.push(MetricRow::paper(&["Model soup (paper)", ""], &paper::SOUP));
        }
    }
    metric_table(
        MetricTableSpec {
            name: "table3",
            caption: "Table 3 analog: final metrics after all tasks, every task order".into(),
            note: "Each order row is the model after its last task; forgetting F over the whole sequence in parentheses; averages over the orders (F averaged where reported).".into(),
            labels: &[("method", "Method"), ("order", "Order")],
            with_forgetting: true,
            declared: &declared,
        },
        &rows,
        rules,
    )
    .map_err(Into::into)
}

/// Table 6: joint tuning (one adapter on the reward mixture) against RID's average.
fn table6(inputs: &StudyInputs, options: &ReportOptions, averages: &BTreeMap<(String, Metric), Average>) -> Result<Table, ReportError> {
    let declared = inputs.rewards();
    let mut rows = Vec::new();
    if let Some(joint) = &inputs.joint {
        let mut row = MetricRow::ours(&["Joint tuning"]);
        for (m, v) in &joint.record.metrics {
            row.cells.insert(m.clone(), (*v, Forgetting::NotApplicable));
        }
        rows.push(row);
        if options.paper_numbers {
            rows.push(MetricRow::paper(&["Joint tuning (paper)"], &paper::JOINT));
        }
    }
    let mut rules = vec![];
    let mut rid = MetricRow::ours(&["RID, average"]);
    for m in declared.metrics() {
        if let Some(Average { value: Some(v), .. }) = averages.get(&("rid".to_string(), m.clone())) {
            rid.cells.insert(m, (*v, Forgetting::NotApplicable));
        }
    }
    if !rid.cells.is_empty() {
        rules.push(rows.len());
        rows.push(rid);
        if options.paper_numbers {
            rows.push(MetricRow::paper(&["RID, average (paper)"], &paper::RID_AVERAGE));
        }
    }
    metric_table(
        MetricTableSpec {
            name: "table6",
            caption: "Table 6 analog: joint tuning on the reward mixture vs. RID".into(),
            note: "Joint tuning trains one adapter on a weighted sum of the rewards (the paper: 0.01 R_a + 2 R_h + R_c; the weights are the `joint` stage's); RID is the average over the task orders.".into(),
            labels: &[("model", "Model")],
            with_forgetting: false,
            declared: &declared,
        },
        &rows,
        rules,
    )
    .map_err(Into::into)
}

/// Table 4: training seconds per epoch per method and task, RID's overhead over the baseline.
fn table4(frames: &Frames, options: &ReportOptions, declared: &DeclaredRewards) -> Result<Option<Table>, ReportError> {
    let df = frames::seconds_per_epoch(&frames.trainings)?;
    let methods = frames::strings(&df, "method")?;
    let tasks = frames::strings(&df, "task")?;
    let spe = frames::floats(&df, "seconds_per_epoch")?;
    let mut by: BTreeMap<(String, Task), f64> = BTreeMap::new();
    for i in 0..df.height() {
        if let (Some(m), Some(t), Some(v)) = (&methods[i], tasks[i].as_deref().map(Task::from_name), spe[i]) {
            if m == "baseline" || m == "rid" {
                by.insert((m.clone(), t), v);
            }
        }
    }
    if by.is_empty() {
        return Ok(None);
    }
    let mut task_cols: Vec<Task> = by.keys().map(|(_, t)| t.clone()).collect();
    task_cols.sort();
    task_cols.dedup();
    // (label, source, unit, values per task)
    let mut rows: Vec<(String, &str, &str, Vec<Option<f64>>)> = Vec::new();
    let mut rules = vec![];
    for method in ["baseline", "rid"] {
        let values: Vec<Option<f64>> = task_cols.iter().map(|t| by.get(&(method.to_string(), t.clone())).copied()).collect();
        if values.iter().all(Option::is_none) {
            continue;
        }
        rows.push((method_title(method), "ours", "s/epoch", values));
        if options.paper_numbers {
            let minutes = if method == "baseline" { paper::BASELINE_MINUTES_PER_EPOCH } else { paper::RID_MINUTES_PER_EPOCH };
            let values = task_cols.iter().map(|t| Task::ALL.iter().position(|x| x == t).map(|i| minutes[i] * 60.0)).collect();
            rows.push((format!("{} (paper)", method_title(method)), "paper", "s/epoch", values));
        }
    }
    let overhead = |b: &[Option<f64>], r: &[Option<f64>]| -> Vec<Option<f64>> {
        b.iter().zip(r).map(|(b, r)| match (b, r) {
            (Some(b), Some(r)) if *b > 0.0 => Some((r / b - 1.0) * 100.0),
            _ => None,
        }).collect()
    };
    let find = |label: &str, source: &str| rows.iter().find(|r| r.0 == label && r.1 == source).map(|r| r.3.clone());
    let mut extra = Vec::new();
    if let (Some(b), Some(r)) = (find("Baseline", "ours"), find("RID", "ours")) {
        extra.push(("RID overhead".to_string(), "ours", "%", overhead(&b, &r)));
    }
    if let (Some(b), Some(r)) = (find("Baseline (paper)", "paper"), find("RID (paper)", "paper")) {
        extra.push(("RID overhead (paper)".to_string(), "paper", "%", overhead(&b, &r)));
    }
    if !extra.is_empty() {
        rules.push(rows.len());
        rows.extend(extra);
    }

    let mut data = vec![
        Column::new("method".into(), rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>()),
        Column::new("source".into(), rows.iter().map(|r| r.1).collect::<Vec<_>>()),
        Column::new("unit".into(), rows.iter().map(|r| r.2).collect::<Vec<_>>()),
    ];
    let mut display = vec![Column::new("Method".into(), rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>())];
    for (j, t) in task_cols.iter().enumerate() {
        data.push(Column::new(t.name().into(), rows.iter().map(|r| r.3[j]).collect::<Vec<_>>()));
        let shown: Vec<String> = rows
            .iter()
            .map(|r| match (r.3[j], r.2) {
                (None, _) => "n/a".into(),
                (Some(v), "%") => format!("{v:+.1} %"),
                (Some(v), _) => format!("{v:.2}"),
            })
            .collect();
        display.push(Column::new(format!("{} (s/epoch) ↓", task_title(t, declared)).into(), shown));
    }
    Ok(Some(Table {
        name: "table4".into(),
        caption: "Table 4 analog: training time per epoch".into(),
        note: "Mean wall-clock seconds per epoch over the fine-tunes of each method and task (stages shared by several orders count once); the overhead row is RID's extra time over the baseline.".into(),
        data: DataFrame::new_infer_height(data)?,
        display: DataFrame::new_infer_height(display)?,
        label_columns: 1,
        rules_before: rules,
    }))
}
