//! `report`: the paper's tables and figures from a study's evaluations, forgetting records and
//! training logs (see [`crate::report`]). Its outputs depend on the input stages' labels
//! (method, order, step, task), so those are part of its cache key.
use serde_json::json;

use crate::exec::{Params, StageContext, StageError, StageKind};
use crate::pipeline::schema::{InputSpec, KindSchema, ParamSpec, ParamType};
use crate::report::{inputs::parse_order, write_report, ReportOptions, StudyInputs};

pub struct Report;

fn input(name: &'static str, required: bool, many: bool, doc: &'static str) -> InputSpec {
    InputSpec { name, required, many, doc }
}

impl StageKind for Report {
    fn schema(&self) -> KindSchema {
        let defaults = ReportOptions::default();
        KindSchema {
            kind: "report",
            version: 3,
            doc: "tables (Markdown, CSV, LaTeX) and charts (PNG, SVG) of a study, and metrics.json for `ril-pipe check`",
            uses_input_labels: true,
            params: vec![
                ParamSpec {
                    name: "title",
                    ty: ParamType::String,
                    default: Some(json!(defaults.title)),
                    doc: "heading of index.md",
                },
                ParamSpec {
                    name: "table2_order",
                    ty: ParamType::String,
                    default: Some(json!(defaults.table2_order)),
                    doc: "the task order (letters A, H, C) whose steps the Table 2 analog and the sample montages show",
                },
                ParamSpec {
                    name: "paper_numbers",
                    ty: ParamType::Bool,
                    default: Some(json!(defaults.paper_numbers)),
                    doc: "show the paper's numbers (SD v1.5) beside ours; for paper-scale pipelines",
                },
            ],
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
        let params = ctx.params().clone();
        let options = ReportOptions {
            title: params.str_of("title")?.to_string(),
            table2_order: params.str_of("table2_order")?.to_string(),
            paper_numbers: params.bool_of("paper_numbers")?,
        };
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
