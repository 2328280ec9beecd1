//! The report's records as long-form polars DataFrames: one row per (stage, metric). Tables and
//! charts are cut from these with lazy queries.
use std::collections::{BTreeMap, HashMap};

use polars::prelude::*;

use crate::records::forgetting;
use crate::records::{EvaluationRecord, Metric};

use super::inputs::{Evaluation, StudyInputs};
use super::ReportError;

/// Row roles in [`Frames::evaluations`].
pub const ROLE_BASE: &str = "base";
pub const ROLE_STEP: &str = "step";
pub const ROLE_SOUP: &str = "soup";
pub const ROLE_JOINT: &str = "joint";

pub struct Frames {
    /// `stage_id, role, method, order, step, metric, value, forgetting`: every evaluation and
    /// metric; for the steps of a sequence, `forgetting` is F (Eq. 3) over the base model and the
    /// steps so far, null where the paper shows "-" (and for base, soup and joint).
    pub evaluations: DataFrame,
    /// `stage_id, method, order, metric, value, forgetting`: per forgetting record and metric, the
    /// final value (last point of the trajectory) and F, null where not reported.
    pub finals: DataFrame,
    /// `stage_id, method, task, seconds_per_epoch, steps`: one row per training object (stages
    /// merged into one cached object count once); `task` null for mixtures.
    pub trainings: DataFrame,
}

#[derive(Default)]
struct EvalRows {
    stage_id: Vec<String>,
    role: Vec<&'static str>,
    method: Vec<Option<String>>,
    order: Vec<Option<String>>,
    step: Vec<i64>,
    metric: Vec<String>,
    value: Vec<f64>,
    forgetting: Vec<Option<f64>>,
}

impl EvalRows {
    fn push(&mut self, e: &Evaluation, role: &'static str, forgetting: &BTreeMap<Metric, Option<f64>>) {
        for (m, v) in &e.record.metrics {
            self.stage_id.push(e.stage_id.clone());
            self.role.push(role);
            self.method.push(e.method.clone());
            self.order.push(e.order.clone());
            self.step.push(e.step as i64);
            self.metric.push(m.key().to_string());
            self.value.push(*v);
            self.forgetting.push(forgetting.get(m).copied().flatten());
        }
    }

    fn frame(self) -> PolarsResult<DataFrame> {
        DataFrame::new_infer_height(vec![
            Column::new("stage_id".into(), self.stage_id),
            Column::new("role".into(), self.role),
            Column::new("method".into(), self.method),
            Column::new("order".into(), self.order),
            Column::new("step".into(), self.step),
            Column::new("metric".into(), self.metric),
            Column::new("value".into(), self.value),
            Column::new("forgetting".into(), self.forgetting),
        ])
    }
}

/// The evaluations of one method and order, in step order, checked to be complete from step 1.
pub fn sequences(inputs: &StudyInputs) -> Result<BTreeMap<(String, String), Vec<&Evaluation>>, ReportError> {
    let mut by_run: BTreeMap<(String, String), Vec<&Evaluation>> = BTreeMap::new();
    for e in &inputs.evals {
        let (Some(method), Some(order)) = (&e.method, &e.order) else { continue };
        by_run.entry((method.clone(), order.clone())).or_default().push(e);
    }
    for ((method, order), list) in &mut by_run {
        list.sort_by_key(|e| e.step);
        for (i, e) in list.iter().enumerate() {
            if e.step != i + 1 {
                let what = if e.step == i { "twice" } else { "without the step before it" };
                return Err(ReportError::Input(format!(
                    "evaluations of {method}/{order}: step {} appears {what} (`{}`)",
                    e.step, e.stage_id
                )));
            }
        }
    }
    Ok(by_run)
}

impl Frames {
    pub fn build(inputs: &StudyInputs) -> Result<Self, ReportError> {
        let mut rows = EvalRows::default();
        let none = BTreeMap::new();
        rows.push(&inputs.base, ROLE_BASE, &none);
        for list in sequences(inputs)?.values() {
            let mut sequence: Vec<EvaluationRecord> = vec![inputs.base.record.clone()];
            for e in list {
                sequence.push(e.record.clone());
                let f = forgetting(&sequence).map_err(|m| ReportError::Input(format!("`{}`: {m}", e.stage_id)))?;
                rows.push(e, ROLE_STEP, &f.forgetting);
            }
        }
        if let Some(soup) = &inputs.soup {
            rows.push(soup, ROLE_SOUP, &none);
        }
        if let Some(joint) = &inputs.joint {
            rows.push(joint, ROLE_JOINT, &none);
        }
        let evaluations = rows.frame()?;

        let (mut id, mut method, mut order, mut metric, mut value, mut forget) = (vec![], vec![], vec![], vec![], vec![], vec![]);
        for run in &inputs.forgetting {
            for (m, trajectory) in &run.record.trajectory {
                let Some(last) = trajectory.last() else { continue };
                id.push(run.stage_id.clone());
                method.push(run.method.clone());
                order.push(run.order.clone());
                metric.push(m.key().to_string());
                value.push(*last);
                forget.push(run.record.forgetting.get(m).copied().flatten());
            }
        }
        let finals = DataFrame::new_infer_height(vec![
            Column::new("stage_id".into(), id),
            Column::new("method".into(), method),
            Column::new("order".into(), order),
            Column::new("metric".into(), metric),
            Column::new("value".into(), value),
            Column::new("forgetting".into(), forget),
        ])?;

        let mut seen = HashMap::new();
        let (mut id, mut method, mut task, mut spe, mut steps) = (vec![], vec![], vec![], vec![], vec![]);
        for t in &inputs.trainings {
            if seen.insert(t.key.clone(), ()).is_some() {
                continue;
            }
            id.push(t.stage_id.clone());
            method.push(t.method.clone());
            task.push(t.task.as_ref().map(|t| t.name().to_string()));
            spe.push(t.summary.seconds_per_epoch);
            steps.push(t.summary.steps as i64);
        }
        let trainings = DataFrame::new_infer_height(vec![
            Column::new("stage_id".into(), id),
            Column::new("method".into(), method),
            Column::new("task".into(), task),
            Column::new("seconds_per_epoch".into(), spe),
            Column::new("steps".into(), steps),
        ])?;
        Ok(Frames {
            evaluations,
            finals,
            trainings,
        })
    }
}

/// A string column as owned values.
pub fn strings(df: &DataFrame, name: &str) -> PolarsResult<Vec<Option<String>>> {
    Ok(df.column(name)?.str()?.iter().map(|s| s.map(str::to_string)).collect())
}

pub fn floats(df: &DataFrame, name: &str) -> PolarsResult<Vec<Option<f64>>> {
    Ok(df.column(name)?.f64()?.iter().collect())
}

pub fn ints(df: &DataFrame, name: &str) -> PolarsResult<Vec<Option<i64>>> {
    Ok(df.column(name)?.i64()?.iter().collect())
}

/// Value and forgetting of a long frame (`value`, `forgetting`, `metric` and the `keys`
/// columns), by (key values, metric).
pub type Cells = HashMap<(Vec<String>, Metric), (Option<f64>, Option<f64>)>;

pub fn cells(df: &DataFrame, keys: &[&str]) -> PolarsResult<Cells> {
    let key_cols: Vec<Vec<Option<String>>> = keys.iter().map(|k| strings(df, k)).collect::<PolarsResult<_>>()?;
    let metrics = strings(df, "metric")?;
    let values = floats(df, "value")?;
    let forgetting = floats(df, "forgetting")?;
    let mut out = HashMap::new();
    for i in 0..df.height() {
        let Some(metric) = metrics[i].as_deref().map(Metric::from_key) else { continue };
        let key = key_cols.iter().map(|c| c[i].clone().unwrap_or_default()).collect();
        out.insert((key, metric), (values[i], forgetting[i]));
    }
    Ok(out)
}

/// Mean value and mean forgetting per method and metric over the orders (nulls, "-", are left
/// out of the forgetting mean), with the number of orders.
pub fn averages_by_method(finals: &DataFrame) -> PolarsResult<DataFrame> {
    finals
        .clone()
        .lazy()
        .group_by_stable([col("method"), col("metric")])
        .agg([
            col("value").mean().alias("value"),
            col("forgetting").mean().alias("forgetting"),
            col("order").n_unique().cast(DataType::Int64).alias("orders"),
        ])
        .collect()
}

/// Mean seconds per epoch per method and task.
pub fn seconds_per_epoch(trainings: &DataFrame) -> PolarsResult<DataFrame> {
    trainings
        .clone()
        .lazy()
        .filter(col("task").is_not_null())
        .group_by_stable([col("method"), col("task")])
        .agg([
            col("seconds_per_epoch").mean().alias("seconds_per_epoch"),
            col("stage_id").count().cast(DataType::Int64).alias("stages"),
        ])
        .collect()
}

/// The rows of one role (and, when given, one order) of the evaluations frame.
pub fn evaluations_of(frames: &Frames, role: &str, order: Option<&str>) -> PolarsResult<DataFrame> {
    let mut filter = col("role").eq(lit(role));
    if let Some(order) = order {
        filter = filter.and(col("order").eq(lit(order)));
    }
    frames.evaluations.clone().lazy().filter(filter).collect()
}
