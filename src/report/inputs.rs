//! The records a report reads, with the labels (`meta`) of the stages that wrote them.
use std::path::{Path, PathBuf};

use crate::exec::{InputObject, StageContext};
use crate::stages::forgetting::{ForgettingRecord, FORGETTING_FILE};
use crate::stages::records::{EvaluationRecord, Task, TrainLogLine, TrainSummary, METRICS_FILE, TRAIN_LOG_FILE, TRAIN_SUMMARY_FILE};

use super::ReportError;

/// The optional sample grid an evaluation may write (one row, one column per prompt).
pub const GRID_FILE: &str = "grid.png";

/// One evaluation of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    pub stage_id: String,
    /// `baseline`, `rid`, ... (evaluations after a task only).
    pub method: Option<String>,
    /// The task order as letters (`AHC`; evaluations after a task only).
    pub order: Option<String>,
    /// Tasks done so far (0 for the base model).
    pub step: usize,
    pub record: EvaluationRecord,
    pub grid: Option<PathBuf>,
}

/// The forgetting record of one method and order.
#[derive(Debug, Clone, PartialEq)]
pub struct ForgettingRun {
    pub stage_id: String,
    pub method: String,
    pub order: String,
    pub record: ForgettingRecord,
}

/// One fine-tune (or joint tuning) with its log.
#[derive(Debug, Clone, PartialEq)]
pub struct Training {
    pub stage_id: String,
    /// The cache key: stages merged into one object have the same key and count once.
    pub key: String,
    pub method: String,
    /// The task trained on; `None` for a mixture (joint tuning).
    pub task: Option<Task>,
    pub summary: TrainSummary,
    pub log: Vec<TrainLogLine>,
}

/// Everything one report reads.
#[derive(Debug, Clone, PartialEq)]
pub struct StudyInputs {
    pub base: Evaluation,
    /// Evaluations after each task, labelled method / order / step.
    pub evals: Vec<Evaluation>,
    pub forgetting: Vec<ForgettingRun>,
    pub soup: Option<Evaluation>,
    pub joint: Option<Evaluation>,
    pub trainings: Vec<Training>,
}

/// Task letters of an order string (`AHC` -> aesthetic, hps, compress).
pub fn parse_order(order: &str) -> Result<Vec<Task>, ReportError> {
    order
        .chars()
        .map(|c| Task::parse(&c.to_string()).ok_or_else(|| ReportError::Input(format!("`{order}` is not a task order (letters A, H, C)"))))
        .collect()
}

/// The letters of a task sequence.
pub fn order_string(tasks: &[Task]) -> String {
    tasks.iter().map(|t| t.letter()).collect()
}

fn label<'a>(input: &'a InputObject, name: &str) -> Option<&'a str> {
    input.meta.get(name).map(String::as_str)
}

fn read_evaluation(input: &InputObject) -> Result<Evaluation, ReportError> {
    let record = EvaluationRecord::read(&input.file(METRICS_FILE).map_err(stage_err)?).map_err(stage_err)?;
    let grid = input.manifest.files.contains_key(GRID_FILE).then(|| input.dir.join(GRID_FILE));
    Ok(Evaluation {
        stage_id: input.stage_id.clone(),
        method: label(input, "method").map(str::to_string),
        order: label(input, "order").map(str::to_string),
        step: record.tasks.len(),
        record,
        grid,
    })
}

fn stage_err(e: crate::exec::StageError) -> ReportError {
    ReportError::Input(e.to_string())
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<T, ReportError> {
    let bytes = std::fs::read(path).map_err(|e| ReportError::io(format!("cannot read {}", path.display()), e))?;
    serde_json::from_slice(&bytes).map_err(|e| ReportError::Input(format!("{} is not {what}: {e}", path.display())))
}

/// Reads `train_log.jsonl`; a line that is not a log record is an error naming the line.
pub fn read_train_log(path: &Path) -> Result<Vec<TrainLogLine>, ReportError> {
    let text = std::fs::read_to_string(path).map_err(|e| ReportError::io(format!("cannot read {}", path.display()), e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| ReportError::Input(format!("{}:{}: not a training log line: {e}", path.display(), i + 1))))
        .collect()
}

impl StudyInputs {
    /// Reads the report stage's inputs from the cache.
    pub fn from_context(ctx: &StageContext) -> Result<Self, ReportError> {
        let base = ctx.input("base").map_err(stage_err).and_then(read_evaluation)?;
        let evals = ctx.input_list("evals").iter().map(read_evaluation).collect::<Result<Vec<_>, _>>()?;
        let mut forgetting = Vec::new();
        for input in ctx.input_list("forgetting") {
            let record: ForgettingRecord = read_json(&input.file(FORGETTING_FILE).map_err(stage_err)?, "a forgetting record")?;
            let method = label(input, "method")
                .ok_or_else(|| ReportError::Input(format!("forgetting input `{}` has no `method` label (put the method in its matrix)", input.stage_id)))?;
            forgetting.push(ForgettingRun {
                stage_id: input.stage_id.clone(),
                method: method.to_string(),
                order: label(input, "order").map(str::to_string).unwrap_or_else(|| order_string(&record.tasks)),
                record,
            });
        }
        let optional = |name: &str| -> Result<Option<Evaluation>, ReportError> {
            match ctx.input_list(name) {
                [] => Ok(None),
                [one] => read_evaluation(one).map(Some),
                many => Err(ReportError::Input(format!("input `{name}` takes one stage, got {}", many.len()))),
            }
        };
        let soup = optional("soup")?;
        let joint = optional("joint")?;
        let mut trainings = Vec::new();
        for input in ctx.input_list("trainings") {
            let summary: TrainSummary = read_json(&input.file(TRAIN_SUMMARY_FILE).map_err(stage_err)?, "a training summary")?;
            let log = read_train_log(&input.file(TRAIN_LOG_FILE).map_err(stage_err)?)?;
            let task = match label(input, "task") {
                Some(t) => Some(Task::parse(t).ok_or_else(|| ReportError::Input(format!("training `{}`: label task={t} is not a task", input.stage_id)))?),
                None => match summary.tasks.as_slice() {
                    [one] => Some(*one),
                    _ => None,
                },
            };
            trainings.push(Training {
                stage_id: input.stage_id.clone(),
                key: input.key.clone(),
                method: label(input, "method").map(str::to_string).unwrap_or_else(|| summary.method.clone()),
                task,
                summary,
                log,
            });
        }
        Ok(StudyInputs {
            base,
            evals,
            forgetting,
            soup,
            joint,
            trainings,
        })
    }

    /// The base model, the evaluations after tasks, the soup and the joint model.
    pub fn all_evaluations(&self) -> impl Iterator<Item = &Evaluation> {
        std::iter::once(&self.base).chain(&self.evals).chain(&self.soup).chain(&self.joint)
    }

    /// Checks that labels and records agree: every evaluation after a task names its method
    /// and order, and its record's tasks are the first `step` tasks of that order.
    pub fn check(&self) -> Result<(), ReportError> {
        if !self.base.record.tasks.is_empty() {
            return Err(ReportError::Input(format!(
                "input `base` ({}) is of a model tuned on {} task(s), not the base model",
                self.base.stage_id,
                self.base.record.tasks.len()
            )));
        }
        for e in &self.evals {
            let (Some(_), Some(order)) = (&e.method, &e.order) else {
                return Err(ReportError::Input(format!(
                    "evaluation `{}` needs `method` and `order` labels (matrix variables of its stage)",
                    e.stage_id
                )));
            };
            let tasks = parse_order(order)?;
            if e.step == 0 || e.step > tasks.len() || e.record.tasks[..] != tasks[..e.step] {
                return Err(ReportError::Input(format!(
                    "evaluation `{}` is labelled order {order} but its model was tuned on [{}]",
                    e.stage_id,
                    order_string(&e.record.tasks)
                )));
            }
        }
        for f in &self.forgetting {
            if order_string(&f.record.tasks) != f.order {
                return Err(ReportError::Input(format!(
                    "forgetting `{}` is labelled order {} but covers [{}]",
                    f.stage_id,
                    f.order,
                    order_string(&f.record.tasks)
                )));
            }
        }
        Ok(())
    }

    /// Methods in the paper's order (baseline, RID), then any others as they first appear.
    pub fn methods(&self) -> Vec<String> {
        let mut seen: Vec<String> = Vec::new();
        let found = self.evals.iter().filter_map(|e| e.method.clone()).chain(self.forgetting.iter().map(|f| f.method.clone()));
        for m in found {
            if !seen.contains(&m) {
                seen.push(m);
            }
        }
        seen.sort_by_key(|m| method_rank(m));
        seen
    }

    /// Orders as they first appear in the pipeline (the `forgetting`, then the `evals` input).
    pub fn orders(&self) -> Vec<String> {
        let mut seen: Vec<String> = Vec::new();
        let found = self.forgetting.iter().map(|f| f.order.clone()).chain(self.evals.iter().filter_map(|e| e.order.clone()));
        for o in found {
            if !seen.contains(&o) {
                seen.push(o);
            }
        }
        seen
    }
}

/// Baseline first, RID second, others after (stable among themselves).
pub fn method_rank(method: &str) -> usize {
    match method {
        "baseline" => 0,
        "rid" => 1,
        _ => 2,
    }
}

/// How a method is named in tables and legends.
pub fn method_title(method: &str) -> String {
    match method {
        "baseline" => "Baseline".into(),
        "rid" => "RID".into(),
        "joint" => "Joint tuning".into(),
        other => other.to_string(),
    }
}

/// How a task is named in tables.
pub fn task_title(task: Task) -> &'static str {
    match task {
        Task::Aesthetic => "Aesthetic",
        Task::Hps => "HPS",
        Task::Compress => "Compress",
    }
}
