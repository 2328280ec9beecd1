//! `forgetting.json`: F of Eq. 3 over a sequence of evaluations (base model, then after each
//! task).
//!
//! `F = max_i (a^i - a^T)` when higher is better, `max_i (a^T - a^i)` when lower is better, over
//! i = 0..T. Reported for the general metrics (CLIP score, FID) always, and for a task's target
//! metrics once that task is finished and a later task has run; `None` ("-" in the paper's
//! tables) otherwise.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{DeclaredRewards, EvaluationRecord, Metric, Task};

pub const FORGETTING_FILE: &str = "forgetting.json";

/// `forgetting.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForgettingRecord {
    /// The task order the sequence followed.
    pub tasks: Vec<Task>,
    /// F per metric; `None` where the paper shows "-".
    pub forgetting: BTreeMap<Metric, Option<f64>>,
    /// a^0 .. a^T per metric.
    pub trajectory: BTreeMap<Metric, Vec<f64>>,
    /// The rewards the pipeline declared, read in their direction; absent when it declared none.
    #[serde(default, skip_serializing_if = "DeclaredRewards::is_empty")]
    pub rewards: DeclaredRewards,
}

/// F for every metric of the sequence `a^0 .. a^T` (the first element is the base model).
pub fn forgetting(sequence: &[EvaluationRecord]) -> Result<ForgettingRecord, String> {
    let Some(last) = sequence.last() else {
        return Err("forgetting needs at least the base model's evaluation".into());
    };
    let tasks = last.tasks.clone();
    for (i, record) in sequence.iter().enumerate() {
        if record.tasks.len() != i || record.tasks[..] != tasks[..i] {
            let names: Vec<&str> = record.tasks.iter().map(|t| t.name()).collect();
            return Err(format!(
                "evaluation {i} of the sequence is of a model tuned on [{}]; a sequence must go base, then one more task each step",
                names.join(", ")
            ));
        }
    }
    let mut declared = DeclaredRewards::default();
    for record in sequence {
        declared.merge(&record.rewards);
    }
    let t_final = tasks.len();
    let mut out = BTreeMap::new();
    let mut trajectory = BTreeMap::new();
    for metric in declared.metrics() {
        let values: Option<Vec<f64>> = sequence.iter().map(|r| r.metrics.get(&metric).copied()).collect();
        let Some(values) = values else { continue };
        let position = tasks.iter().position(|t| t.targets().contains(&metric));
        let reported = metric.is_general() || position.is_some_and(|p| p + 1 < t_final);
        let a_t = values[t_final];
        let f = values
            .iter()
            .map(|&a| if metric.higher_is_better(&declared) { a - a_t } else { a_t - a })
            .fold(f64::NEG_INFINITY, f64::max);
        out.insert(metric.clone(), reported.then_some(f));
        trajectory.insert(metric, values);
    }
    Ok(ForgettingRecord {
        tasks,
        forgetting: out,
        trajectory,
        rewards: declared,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(tasks: &[Task], values: [f64; 6]) -> EvaluationRecord {
        EvaluationRecord {
            tasks: tasks.to_vec(),
            origin: "finetune".into(),
            metrics: Metric::ALL.into_iter().zip(values).collect(),
            prompts: 50,
            images_per_prompt: 1,
            seed: 0,
            rewards: DeclaredRewards::default(),
        }
    }

    #[test]
    fn forgetting_follows_equation_3_and_the_dash_rule() {
        use Task::*;
        // Order A, H, C. Columns: aesthetic, hps, png, jpeg, clip, fid.
        let seq = vec![
            record(&[], [5.0, 0.25, 400.0, 50.0, 25.0, 70.0]),
            record(&[Aesthetic], [6.0, 0.24, 410.0, 52.0, 24.0, 80.0]),
            record(&[Aesthetic, Hps], [5.6, 0.30, 420.0, 53.0, 23.0, 90.0]),
            record(&[Aesthetic, Hps, Compress], [5.5, 0.27, 300.0, 40.0, 24.5, 75.0]),
        ];
        let r = forgetting(&seq).unwrap();
        let f = |m: Metric| r.forgetting[&m];
        assert!((f(Metric::Aesthetic).unwrap() - 0.5).abs() < 1e-12); // max(5,6,5.6,5.5) - 5.5
        assert!((f(Metric::Hps).unwrap() - 0.03).abs() < 1e-12);
        assert_eq!(f(Metric::PngKb), None, "compress is the last task: no later task ran");
        assert_eq!(f(Metric::JpegKb), None);
        assert!((f(Metric::ClipScore).unwrap() - 0.5).abs() < 1e-12);
        assert!((f(Metric::Fid).unwrap() - 5.0).abs() < 1e-12); // 75 - min(70, ...)
        // After two tasks only the first task's target is reported.
        let r2 = forgetting(&seq[..3]).unwrap();
        assert!(r2.forgetting[&Metric::Aesthetic].is_some());
        assert_eq!(r2.forgetting[&Metric::Hps], None);
        assert_eq!(r2.forgetting[&Metric::PngKb], None, "compress never ran");
        // Forgetting is never negative: i = T is part of the max.
        assert!(r.forgetting.values().flatten().all(|v| *v >= 0.0));
    }

    #[test]
    fn sequences_must_grow_one_task_at_a_time() {
        use Task::*;
        let seq = vec![record(&[], [0.0; 6]), record(&[Hps, Aesthetic], [0.0; 6])];
        assert!(forgetting(&seq).unwrap_err().contains("evaluation 1"));
        assert!(forgetting(&[]).is_err());
    }
}
