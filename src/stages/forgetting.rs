//! `forgetting`: F of Eq. 3 over the evaluations of one task order ([`crate::records::forgetting`]).
use crate::exec::{StageContext, StageError, StageKind};
use crate::pipeline::schema::{InputSpec, KindSchema};
use crate::records::{forgetting, write_json, EvaluationRecord, FORGETTING_FILE, METRICS_FILE};

pub struct Forgetting;

impl StageKind for Forgetting {
    fn schema(&self) -> KindSchema {
        KindSchema {
            kind: "forgetting",
            version: 1,
            doc: "forgetting F (Eq. 3) of each metric over the evaluations of one task order",
            uses_input_labels: false,
            reads_declared_rewards: false,
            params: Vec::new(),
            inputs: vec![InputSpec {
                name: "evals",
                required: true,
                many: true,
                doc: "evaluations in order: the base model, then the model after each task",
            }],
        }
    }

    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let mut sequence = Vec::new();
        for input in ctx.input_list("evals") {
            sequence.push(EvaluationRecord::read(&input.file(METRICS_FILE)?)?);
        }
        let record = forgetting(&sequence).map_err(StageError::Failed)?;
        for (m, f) in &record.forgetting {
            ctx.log(format!("F {:<10} {}", m.key(), f.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into())));
        }
        Ok(write_json(&ctx.out_dir().join(FORGETTING_FILE), &record)?)
    }
}
