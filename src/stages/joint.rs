//! `joint`: joint tuning (Eq. 10), one adapter on a weighted sum of the task rewards with the
//! baseline recipe; the upper-bound-style comparison of the paper's Table 6.
use serde_json::json;

use crate::exec::{StageContext, StageError, StageKind};
use crate::method::objective::Objective;
use crate::pipeline::schema::{KindSchema, ParamSpec, ParamType};

use super::finetune::model_input;
use super::precision::Precision;
use super::records::Task;
use super::reward_set::mixture;
use super::train::{check_memory, train, training_params, TrainSpec};
use super::world::ModelRecord;

pub struct Joint;

impl StageKind for Joint {
    fn schema(&self) -> KindSchema {
        let mut params = vec![ParamSpec {
            name: "weights",
            ty: ParamType::Map(Box::new(ParamType::Float)),
            default: Some(json!({"aesthetic": 0.01, "hps": 2.0, "compress": 1.0})),
            doc: "reward weights by task (Eq. 10: 0.01 R_a + 2 R_h + R_c)",
        }];
        params.extend(training_params());
        KindSchema {
            kind: "joint",
            // 2: random streams derived from the seed and the input model's place in the sequence.
            version: 2,
            doc: "joint tuning: one adapter on a weighted sum of rewards (Eq. 10)",
            uses_input_labels: false,
            params,
            inputs: vec![model_input("the model to tune (the base model, in the paper)")],
        }
    }

    fn estimate(&self, stage: &crate::pipeline::ResolvedStage, pipeline: &crate::pipeline::ResolvedPipeline) -> crate::exec::kind::Estimate {
        super::estimate::training_estimate(stage, pipeline, 750)
    }

    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let weights_param = ctx.params().get("weights").and_then(|v| v.as_object()).cloned().unwrap_or_default();
        let mut weights = Vec::new();
        for (name, w) in &weights_param {
            let task = Task::parse(name).ok_or_else(|| StageError::Failed(format!("`weights`: unknown task `{name}` (aesthetic, hps, compress)")))?;
            weights.push((task, w.as_f64().unwrap_or(0.0)));
        }
        weights.sort_by_key(|(t, _)| *t);
        if weights.is_empty() {
            return Err(StageError::Failed("`weights` names no task".into()));
        }
        let (model, adapters) = ModelRecord::of_input(ctx.input("model")?)?;
        let device = super::device::tch_device(&ctx.device);
        check_memory(ctx, &model, adapters.as_deref(), weights.iter().map(|(t, _)| *t).collect())?;
        let spec = TrainSpec {
            method: "joint".into(),
            objective: Objective::Baseline,
            ema_momentum: 0.0,
            tasks: weights.iter().map(|(t, _)| *t).collect(),
            new_adapter: true,
            reward: mixture(&weights, &model.world, device, Precision::of_params(ctx.params())?)?,
        };
        train(ctx, spec, &model, adapters.as_deref())
    }
}
