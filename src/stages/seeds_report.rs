//! `seeds_report`: a study repeated over training seeds, summarised (see
//! [`crate::report::seeds`]): tables of mean ± std over seeds, the paper's claims with counts
//! over (seed, order) pairs, charts with error bars. Every input but `base` carries a `seed`
//! label (a matrix variable of its stage), so the labels are part of its cache key.
use serde_json::json;

use crate::exec::{InputObject, Params, StageContext, StageError, StageKind};
use crate::pipeline::schema::{InputSpec, KindSchema, ParamSpec, ParamType};
use crate::report::seeds::{write_seeds_report, SeedEval, SeedRun, SeedStudy, SeedTraining};
use crate::stages::forgetting::{ForgettingRecord, FORGETTING_FILE};
use crate::stages::records::{EvaluationRecord, TrainSummary, METRICS_FILE, TRAIN_SUMMARY_FILE};

pub struct SeedsReport;

fn input(name: &'static str, required: bool, doc: &'static str) -> InputSpec {
    InputSpec { name, required, many: name != "base", doc }
}

fn label<'a>(input: &'a InputObject, name: &str) -> Result<&'a str, StageError> {
    input.meta.get(name).map(String::as_str).ok_or_else(|| StageError::Failed(format!("input `{}` has no `{name}` label (put it in its stage's matrix)", input.stage_id)))
}

fn read_json<T: serde::de::DeserializeOwned>(input: &InputObject, file: &str) -> Result<T, StageError> {
    let path = input.file(file)?;
    let bytes = std::fs::read(&path).map_err(|e| StageError::io(format!("cannot read {}", path.display()), e))?;
    serde_json::from_slice(&bytes).map_err(|e| StageError::Failed(format!("{}: {e}", path.display())))
}

fn seed_eval(input: &InputObject) -> Result<SeedEval, StageError> {
    let record = EvaluationRecord::read(&input.file(METRICS_FILE)?)?;
    Ok(SeedEval { seed: label(input, "seed")?.to_string(), metrics: record.metrics })
}

/// The study's records from the stage's inputs.
pub fn study_of(ctx: &StageContext) -> Result<SeedStudy, StageError> {
    let base = EvaluationRecord::read(&ctx.input("base")?.file(METRICS_FILE)?)?;
    if !base.tasks.is_empty() {
        return Err(StageError::Failed("input `base` is not an evaluation of the base model".into()));
    }
    let mut runs = Vec::new();
    for i in ctx.input_list("forgetting") {
        let record: ForgettingRecord = read_json(i, FORGETTING_FILE)?;
        runs.push(SeedRun { seed: label(i, "seed")?.to_string(), method: label(i, "method")?.to_string(), order: label(i, "order")?.to_string(), record });
    }
    let soups = ctx.input_list("soup").iter().map(seed_eval).collect::<Result<_, _>>()?;
    let joints = ctx.input_list("joint").iter().map(seed_eval).collect::<Result<_, _>>()?;
    let mut trainings: Vec<SeedTraining> = Vec::new();
    for i in ctx.input_list("trainings") {
        if trainings.iter().any(|t| t.key == i.key) {
            continue;
        }
        let summary: TrainSummary = read_json(i, TRAIN_SUMMARY_FILE)?;
        let task = match summary.tasks.as_slice() {
            [one] => Some(*one),
            _ => None,
        };
        trainings.push(SeedTraining { seed: label(i, "seed")?.to_string(), key: i.key.clone(), method: summary.method.clone(), task, seconds_per_epoch: summary.seconds_per_epoch });
    }
    Ok(SeedStudy { base: base.metrics, runs, soups, joints, trainings })
}

impl StageKind for SeedsReport {
    fn schema(&self) -> KindSchema {
        KindSchema {
            kind: "seeds_report",
            version: 1,
            doc: "a study over several training seeds: Table 3 as mean ± std over seeds, each task's own gain, the paper's claims counted over (seed, order) pairs, charts with error bars",
            uses_input_labels: true,
            params: vec![ParamSpec { name: "title", ty: ParamType::String, default: Some(json!("The study over seeds")), doc: "heading of index.md" }],
            inputs: vec![
                input("base", true, "evaluation of the base model (shared by the seeds)"),
                input("forgetting", true, "forgetting records, labelled method, order, seed"),
                input("soup", false, "evaluations of the model soup, labelled seed"),
                input("joint", false, "evaluations of joint tuning, labelled seed"),
                input("trainings", false, "fine-tunes and joint tunings (train_summary.json), labelled seed"),
            ],
        }
    }

    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let title = ctx.params().str_of("title")?.to_string();
        let study = study_of(ctx)?;
        ctx.log(format!("seeds report: {} seeds, {} forgetting records", study.seeds().len(), study.runs.len()));
        let files = write_seeds_report(&study, &title, ctx.out_dir()).map_err(StageError::failed)?;
        ctx.log(format!("wrote {} files", files.len()));
        Ok(())
    }
}
