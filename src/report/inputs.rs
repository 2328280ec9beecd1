//! The records a report reads, with the labels (`meta`) of the stages that wrote them (the
//! report stage gathers them from its inputs).
use std::path::PathBuf;

use crate::records::{DeclaredRewards, EvaluationRecord, ForgettingRecord, Task, TrainLogLine, TrainSummary};

use super::ReportError;

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

/// Task letters of an order string (`AHC` -> aesthetic, hps, compress; a declared reward by the
/// letter of its declaration).
pub fn parse_order(order: &str, declared: &DeclaredRewards) -> Result<Vec<Task>, ReportError> {
    order
        .chars()
        .map(|c| {
            declared.task_of_letter(c).ok_or_else(|| {
                let letters: Vec<String> = Task::BUILTIN.iter().filter_map(Task::builtin_letter).chain(declared.0.values().map(|r| r.letter)).map(String::from).collect();
                ReportError::Input(format!("`{order}` is not a task order (letters {})", letters.join(", ")))
            })
        })
        .collect()
}

/// The letters of a task sequence.
pub fn order_string(tasks: &[Task], declared: &DeclaredRewards) -> String {
    tasks.iter().map(|t| t.letter(declared)).collect()
}

impl StudyInputs {
    /// The base model, the evaluations after tasks, the soup and the joint model.
    pub fn all_evaluations(&self) -> impl Iterator<Item = &Evaluation> {
        std::iter::once(&self.base).chain(&self.evals).chain(&self.soup).chain(&self.joint)
    }

    /// The rewards the study's pipeline declared, as its evaluation records name them.
    pub fn rewards(&self) -> DeclaredRewards {
        let mut declared = DeclaredRewards::default();
        for e in self.all_evaluations() {
            declared.merge(&e.record.rewards);
        }
        declared
    }

    /// Checks that labels and records agree: every evaluation after a task names its method
    /// and order, and its record's tasks are the first `step` tasks of that order.
    pub fn check(&self) -> Result<(), ReportError> {
        let declared = self.rewards();
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
            let tasks = parse_order(order, &declared)?;
            if e.step == 0 || e.step > tasks.len() || e.record.tasks[..] != tasks[..e.step] {
                return Err(ReportError::Input(format!(
                    "evaluation `{}` is labelled order {order} but its model was tuned on [{}]",
                    e.stage_id,
                    order_string(&e.record.tasks, &declared)
                )));
            }
        }
        for f in &self.forgetting {
            if order_string(&f.record.tasks, &declared) != f.order {
                return Err(ReportError::Input(format!(
                    "forgetting `{}` is labelled order {} but covers [{}]",
                    f.stage_id,
                    f.order,
                    order_string(&f.record.tasks, &declared)
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

/// How a task is named in tables (a declared reward by its label).
pub fn task_title(task: &Task, declared: &DeclaredRewards) -> String {
    match task {
        Task::Aesthetic => "Aesthetic".into(),
        Task::Hps => "HPS".into(),
        Task::Compress => "Compress".into(),
        Task::PickScore => "PickScore".into(),
        Task::Declared(name) => declared.get(name).map_or_else(|| name.clone(), |r| r.label.clone()),
    }
}
