//! `seeds_report`: a study repeated over training seeds, summarised (see
//! [`crate::report::seeds`]): tables of mean ± std over seeds, the paper's claims with counts
//! over (seed, order) pairs, charts with error bars. Every input but `base` carries a `seed`
//! label (a matrix variable of its stage), so the labels are part of its cache key.
use crate::exec::{InputObject, StageContext, StageError, StageKind};
use crate::pipeline::params::StageParams;
use crate::pipeline::schema::{InputSpec, KindSchema};
use crate::records::{read_json, EvaluationRecord, ForgettingRecord, TrainSummary, FORGETTING_FILE, METRICS_FILE, TRAIN_SUMMARY_FILE};
use crate::report::seeds::{write_seeds_report, SeedEval, SeedRun, SeedStudy, SeedTraining};
use crate::stage_params;

pub struct SeedsReport;

/// The kind's name in pipelines.
pub const KIND: &str = "seeds_report";

stage_params! {
    /// The parameters of a `seeds_report` stage.
    pub struct SeedsReportParams {
        pub title: String = param("The study over seeds".to_string()).doc("heading of index.md"),
    }
}

fn input(name: &'static str, required: bool, doc: &'static str) -> InputSpec {
    InputSpec { name, required, many: name != "base", doc }
}

fn label<'a>(input: &'a InputObject, name: &str) -> Result<&'a str, StageError> {
    input.meta.get(name).map(String::as_str).ok_or_else(|| StageError::Failed(format!("input `{}` has no `{name}` label (put it in its stage's matrix)", input.stage_id)))
}

fn read_record<T: serde::de::DeserializeOwned>(input: &InputObject, file: &str, what: &str) -> Result<T, StageError> {
    read_json(&input.file(file)?, what).map_err(StageError::failed)
}

fn seed_eval(input: &InputObject) -> Result<SeedEval, StageError> {
    let record = EvaluationRecord::read(&input.file(METRICS_FILE)?).map_err(StageError::failed)?;
    Ok(SeedEval { seed: label(input, "seed")?.to_string(), metrics: record.metrics })
}

/// The study's records from the stage's inputs.
pub fn study_of(ctx: &StageContext) -> Result<SeedStudy, StageError> {
    let base = EvaluationRecord::read(&ctx.input("base")?.file(METRICS_FILE)?).map_err(StageError::failed)?;
    if !base.tasks.is_empty() {
        return Err(StageError::Failed("input `base` is not an evaluation of the base model".into()));
    }
    let mut rewards = base.rewards.clone();
    let mut runs = Vec::new();
    for i in ctx.input_list("forgetting") {
        let record: ForgettingRecord = read_record(i, FORGETTING_FILE, "a forgetting record")?;
        rewards.merge(&record.rewards);
        runs.push(SeedRun { seed: label(i, "seed")?.to_string(), method: label(i, "method")?.to_string(), order: label(i, "order")?.to_string(), record });
    }
    let soups = ctx.input_list("soup").iter().map(seed_eval).collect::<Result<_, _>>()?;
    let joints = ctx.input_list("joint").iter().map(seed_eval).collect::<Result<_, _>>()?;
    let mut trainings: Vec<SeedTraining> = Vec::new();
    for i in ctx.input_list("trainings") {
        if trainings.iter().any(|t| t.key == i.key) {
            continue;
        }
        let summary: TrainSummary = read_record(i, TRAIN_SUMMARY_FILE, "a training summary")?;
        let task = match summary.tasks.as_slice() {
            [one] => Some(one.clone()),
            _ => None,
        };
        trainings.push(SeedTraining { seed: label(i, "seed")?.to_string(), key: i.key.clone(), method: summary.method.clone(), task, seconds_per_epoch: summary.seconds_per_epoch });
    }
    Ok(SeedStudy { base: base.metrics, runs, soups, joints, trainings, rewards })
}

impl StageKind for SeedsReport {
    fn schema(&self) -> KindSchema {
        KindSchema {
            kind: KIND,
            version: 1,
            doc: "a study over several training seeds: Table 3 as mean ± std over seeds, each task's own gain, the paper's claims counted over (seed, order) pairs, charts with error bars",
            uses_input_labels: true,
            reads_declared_rewards: false,
            params: SeedsReportParams::specs(),
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
        let title = ctx.typed_params::<SeedsReportParams>()?.title;
        let study = study_of(ctx)?;
        ctx.log(format!("seeds report: {} seeds, {} forgetting records", study.seeds().len(), study.runs.len()));
        let files = write_seeds_report(&study, &title, ctx.out_dir()).map_err(StageError::failed)?;
        ctx.log(format!("wrote {} files", files.len()));
        Ok(())
    }
}
