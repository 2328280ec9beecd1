//! `report`: the paper's tables and figures from a study's evaluations, forgetting records and
//! training logs (see [`crate::report`]). Its outputs depend on the input stages' labels
//! (method, order, step, task), so those are part of its cache key.
use crate::exec::{StageContext, StageError, StageKind};
use crate::pipeline::params::StageParams;
use crate::pipeline::schema::{InputSpec, KindSchema};
use crate::report::{inputs::parse_order, write_report, ReportOptions, StudyInputs};
use crate::stage_params;

pub struct Report;

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
            kind: "report",
            version: 3,
            doc: "tables (Markdown, CSV, LaTeX) and charts (PNG, SVG) of a study, and metrics.json for `ril-pipe check`",
            uses_input_labels: true,
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
        parse_order(&options.table2_order).map_err(StageError::failed)?;
        let inputs = StudyInputs::from_context(ctx).map_err(StageError::failed)?;
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
