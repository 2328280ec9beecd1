//! `report`: the paper's tables and figures from a study's evaluations, forgetting records and
//! training logs (see [`crate::report`]). Its outputs depend on the input stages' labels
//! (method, order, step, task), so those are part of its cache key.
use crate::exec::{InputObject, StageContext, StageError, StageKind};
use crate::pipeline::params::StageParams;
use crate::pipeline::schema::{InputSpec, KindSchema};
use crate::records::{read_json, read_train_log, EvaluationRecord, ForgettingRecord, Task, TrainSummary, FORGETTING_FILE, GRID_FILE, METRICS_FILE, TRAIN_LOG_FILE, TRAIN_SUMMARY_FILE};
use crate::report::inputs::{order_string, parse_order};
use crate::report::{write_report, Evaluation, ForgettingRun, ReportOptions, StudyInputs, Training};
use crate::stage_params;

pub struct Report;

/// The kind's name in pipelines.
pub const KIND: &str = "report";

stage_params! {
    /// The parameters of a `report` stage (defaults: [`ReportOptions::default`]).
    pub struct ReportParams {
        pub title: String = param(ReportOptions::default().title).doc("heading of index.md"),
        pub table2_order: String = param(ReportOptions::default().table2_order).doc("the task order (letters A, H, C) whose steps the Table 2 analog and the sample montages show"),
        pub paper_numbers: bool = param(ReportOptions::default().paper_numbers).doc("show the paper's numbers (SD v1.5) beside ours; for paper-scale pipelines"),
    }
}

fn input(name: &'static str, required: bool, many: bool, doc: &'static str) -> InputSpec {
    InputSpec { name, required, many, doc }
}

impl StageKind for Report {
    fn schema(&self) -> KindSchema {
        KindSchema {
            kind: KIND,
            version: 3,
            doc: "tables (Markdown, CSV, LaTeX) and charts (PNG, SVG) of a study, and metrics.json for `ril-pipe check`",
            uses_input_labels: true,
            reads_declared_rewards: false,
            params: ReportParams::specs(),
            inputs: vec![
                input("base", true, false, "evaluation of the base model"),
                input("evals", false, true, "evaluations after each task, labelled method, order, step"),
                input("forgetting", false, true, "forgetting records, labelled method, order"),
                input("soup", false, false, "evaluation of the model soup"),
                input("joint", false, false, "evaluation of joint tuning"),
                input("trainings", false, true, "fine-tunes (train_log.jsonl, train_summary.json), labelled method, task"),
            ],
        }
    }

    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let p: ReportParams = ctx.typed_params()?;
        let options = ReportOptions { title: p.title, table2_order: p.table2_order, paper_numbers: p.paper_numbers };
        let inputs = study_inputs(ctx)?;
        parse_order(&options.table2_order, &inputs.rewards()).map_err(StageError::failed)?;
        ctx.log(format!(
            "report: {} evaluations after tasks, {} forgetting records, {} trainings",
            inputs.evals.len(),
            inputs.forgetting.len(),
            inputs.trainings.len()
        ));
        let files = write_report(&inputs, &options, ctx.out_dir()).map_err(StageError::failed)?;
        ctx.log(format!("wrote {} table files and {} charts", files.tables.len(), files.charts.len()));
        for note in &files.notes {
            ctx.log(format!("left out: {note}"));
        }
        Ok(())
    }
}

fn label<'a>(input: &'a InputObject, name: &str) -> Option<&'a str> {
    input.meta.get(name).map(String::as_str)
}

fn read_evaluation(input: &InputObject) -> Result<Evaluation, StageError> {
    let record = EvaluationRecord::read(&input.file(METRICS_FILE)?)?;
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

/// The study's records from the report stage's inputs, with the labels of their stages.
fn study_inputs(ctx: &StageContext) -> Result<StudyInputs, StageError> {
    let base = read_evaluation(ctx.input("base")?)?;
    let evals = ctx.input_list("evals").iter().map(read_evaluation).collect::<Result<Vec<_>, _>>()?;
    let mut declared = base.record.rewards.clone();
    for e in &evals {
        declared.merge(&e.record.rewards);
    }
    let mut forgetting = Vec::new();
    for input in ctx.input_list("forgetting") {
        let record: ForgettingRecord = read_json(&input.file(FORGETTING_FILE)?, "a forgetting record")?;
        let method = label(input, "method").ok_or_else(|| StageError::Failed(format!("forgetting input `{}` has no `method` label (put the method in its matrix)", input.stage_id)))?;
        forgetting.push(ForgettingRun {
            stage_id: input.stage_id.clone(),
            method: method.to_string(),
            order: label(input, "order").map(str::to_string).unwrap_or_else(|| order_string(&record.tasks, &declared)),
            record,
        });
    }
    let optional = |name: &str| -> Result<Option<Evaluation>, StageError> {
        match ctx.input_list(name) {
            [] => Ok(None),
            [one] => read_evaluation(one).map(Some),
            many => Err(StageError::Failed(format!("input `{name}` takes one stage, got {}", many.len()))),
        }
    };
    let soup = optional("soup")?;
    let joint = optional("joint")?;
    let mut trainings = Vec::new();
    for input in ctx.input_list("trainings") {
        let summary: TrainSummary = read_json(&input.file(TRAIN_SUMMARY_FILE)?, "a training summary")?;
        let log = read_train_log(&input.file(TRAIN_LOG_FILE)?)?;
        let task = match label(input, "task") {
            Some(t) => {
                let by_letter = || t.chars().next().filter(|_| t.chars().count() == 1).and_then(|c| declared.task_of_letter(c));
                let by_name = || declared.get(t).map(|_| Task::Declared(t.to_string()));
                Some(Task::parse(t).or_else(by_letter).or_else(by_name).ok_or_else(|| StageError::Failed(format!("training `{}`: label task={t} is not a task", input.stage_id)))?)
            }
            None => match summary.tasks.as_slice() {
                [one] => Some(one.clone()),
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
    Ok(StudyInputs { base, evals, forgetting, soup, joint, trainings })
}
