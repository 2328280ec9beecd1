//! `finetune`: one task of the sequence. Adds a new LoRA adapter to the input model's group and
//! trains only it on the task's reward, by the baseline (Eq. 5) or RID (Eq. 6-9); with
//! `adapter: shared` it trains the input's newest adapter instead (the one-LoRA ablation).
use serde_json::json;

use crate::exec::{Params, StageContext, StageError, StageKind};
use crate::pipeline::schema::{InputSpec, KindSchema, ParamSpec, ParamType};

use super::precision::Precision;
use super::records::Task;
use super::reward_set::task_reward;
use super::train::{check_memory, objective_of, train, training_params, TrainSpec};
use super::world::ModelRecord;

pub struct Finetune;

pub fn model_input(doc: &'static str) -> InputSpec {
    InputSpec {
        name: "model",
        required: true,
        many: false,
        doc,
    }
}

impl StageKind for Finetune {
    fn schema(&self) -> KindSchema {
        let p = |name, ty, default: Option<serde_json::Value>, doc| ParamSpec { name, ty, default, doc };
        let mut params = vec![
            p("task", ParamType::Enum(vec!["aesthetic", "hps", "compress"]), None, "the reward task"),
            p("method", ParamType::Enum(vec!["baseline", "rid"]), None, "baseline (Eq. 5) or RID (Eq. 6-9)"),
            p("distill", ParamType::Enum(vec!["last_step", "full_step", "none"]), Some(json!("last_step")), "RID's distillation: the teacher denoises the student's z_1 (last_step), follows its own trajectory from z_N (full_step, the Eq. 7 ablation), or is absent (none)"),
            p("distill_space", ParamType::Enum(vec!["image", "latent"]), Some(json!("image")), "where RID's distance is taken: decoded images (Eq. 7: mse(D(z_0), D(z_0^T)), the teacher decoded without gradient) or latents mse(z_0, z_0^T) (the ablation)"),
            p("lambda", ParamType::Float, Some(json!(0.1)), "weight of the distillation term (paper: 0.1)"),
            p("ema_momentum", ParamType::Float, Some(json!(0.99)), "EMA momentum alpha of the teacher (Eq. 6)"),
            p("adapter", ParamType::Enum(vec!["new", "shared"]), Some(json!("new")), "new: add an adapter to the input's group and train only it (the paper's adapter group); shared: keep training the input's newest adapter, so that every task of an order shares one LoRA (the ablation; the base model gets its first)"),
        ];
        params.extend(training_params());
        KindSchema {
            kind: "finetune",
            // 2: RID distils decoded images (Eq. 7) rather than latents; random streams derived
            // from the seed and the input model's place in the sequence.
            version: 2,
            doc: "fine-tune a new LoRA adapter on one reward task (baseline or RID), on top of the input model",
            uses_input_labels: false,
            params,
            inputs: vec![model_input("the model to continue from: a world (the base model) or an earlier finetune/soup/joint")],
        }
    }

    fn estimate(&self, stage: &crate::pipeline::ResolvedStage, pipeline: &crate::pipeline::ResolvedPipeline) -> crate::exec::kind::Estimate {
        super::estimate::training_estimate(stage, pipeline, 750)
    }

    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let p = ctx.params().clone();
        let (model, adapters) = ModelRecord::of_input(ctx.input("model")?)?;
        let task = Task::parse(p.str_of("task")?).ok_or_else(|| StageError::Failed("unknown task".into()))?;
        let method = p.str_of("method")?.to_string();
        let objective = objective_of(&method, p.str_of("distill")?, p.str_of("distill_space")?, p.f64_of("lambda")?)?;
        let device = super::device::tch_device(&ctx.device);
        check_memory(ctx, &model, adapters.as_deref(), vec![task])?;
        let spec = TrainSpec {
            method,
            objective,
            ema_momentum: p.f64_of("ema_momentum")?,
            tasks: vec![task],
            new_adapter: p.str_of("adapter")? == "new",
            reward: task_reward(task, &model.world, device, Precision::of_params(&p)?)?,
        };
        train(ctx, spec, &model, adapters.as_deref())
    }
}
