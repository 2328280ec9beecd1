//! `soup`: a model mixed from several fine-tuned models, `sum_k c_k theta_k` (default c_k = 1/n).
//! With LoRA this is computed on the effective weights: one adapter group holding every member's
//! adapters, each scaled by its member's coefficient, so the merged layer computes
//! `W + sum_k c_k sum_i s_ki B_ki A_ki` (not an average of the A and B matrices).
use crate::exec::{StageContext, StageError, StageKind};
use crate::models::lora::LoraGroup;
use crate::pipeline::params::StageParams;
use crate::pipeline::schema::{InputSpec, KindSchema};
use crate::stage_params;

use super::world::{ModelRecord, ADAPTERS_FILE};

pub struct Soup;

stage_params! {
    /// The parameters of a `soup` stage.
    pub struct SoupParams {
        pub coefficients: Vec<f64> = param(Vec::new()).min(0).max(1).doc("one coefficient per model, in input order (paper: 1/3 each); empty = equal weights"),
    }
}

impl StageKind for Soup {
    fn schema(&self) -> KindSchema {
        KindSchema {
            kind: "soup",
            version: 1,
            doc: "model soup: a weighted merge of fine-tuned models on their effective LoRA weights",
            uses_input_labels: false,
            reads_declared_rewards: false,
            params: SoupParams::specs(),
            inputs: vec![InputSpec {
                name: "models",
                required: true,
                many: true,
                doc: "the fine-tuned models to mix (paper: the three single-task baseline models)",
            }],
        }
    }

    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let inputs = ctx.input_list("models").to_vec();
        if inputs.len() < 2 {
            return Err(StageError::Failed(format!("a soup needs at least two models, got {}", inputs.len())));
        }
        let coefficients = ctx.typed_params::<SoupParams>()?.coefficients;
        let coefficients = if coefficients.is_empty() { vec![1.0 / inputs.len() as f64; inputs.len()] } else { coefficients };
        if coefficients.len() != inputs.len() {
            return Err(StageError::Failed(format!("{} coefficients for {} models", coefficients.len(), inputs.len())));
        }
        let mut records = Vec::new();
        let mut groups = Vec::new();
        for input in &inputs {
            let (record, adapters) = ModelRecord::of_input(input)?;
            let adapters = adapters.ok_or_else(|| StageError::Failed(format!("`{}` is a base model without adapters: nothing to mix", input.stage_id)))?;
            let group = LoraGroup::new(record.lora_targets.clone());
            group.load(&adapters).map_err(|e| StageError::Failed(format!("adapters of `{}`: {e}", input.stage_id)))?;
            if let Some(first) = records.first() {
                let first: &ModelRecord = first;
                if first.world != record.world || first.lora_targets != record.lora_targets {
                    return Err(StageError::Failed(format!("`{}` comes from another base model than `{}`: only models of one base can be mixed", input.stage_id, inputs[0].stage_id)));
                }
            }
            records.push(record);
            groups.push(group);
        }
        let members: Vec<(&LoraGroup, f64)> = groups.iter().zip(&coefficients).map(|(g, c)| (g, *c)).collect();
        let soup = LoraGroup::soup(&members).map_err(StageError::failed)?;
        soup.save(&ctx.out_dir().join(ADAPTERS_FILE)).map_err(StageError::failed)?;
        let mut tasks = Vec::new();
        for r in &records {
            for t in &r.tasks {
                if !tasks.contains(t) {
                    tasks.push(t.clone());
                }
            }
        }
        ctx.log(format!("mixed {} models with coefficients {coefficients:?}", inputs.len()));
        ModelRecord {
            world: records[0].world.clone(),
            tasks,
            origin: "soup".into(),
            adapters: Some(ADAPTERS_FILE.into()),
            lora_targets: records[0].lora_targets.clone(),
        }
        .write(ctx.out_dir())
    }
}
