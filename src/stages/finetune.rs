//! `finetune`: one task of the sequence. Adds a new LoRA adapter to the input model's group and
//! trains only it on the task's reward, by the baseline (Eq. 5) or RID (Eq. 6-9); with
//! `adapter: shared` it trains the input's newest adapter instead (the one-LoRA ablation).
use crate::exec::{StageContext, StageError, StageKind};
use crate::method::objective::{Distill, DistillSpace, Objective};
use crate::pipeline::params::StageParams;
use crate::pipeline::schema::{InputSpec, KindSchema};
use crate::stage_params;

use crate::records::Task;
use super::reward_set::task_reward;
use super::train::{check_memory, train, TrainParams, TrainSpec};
use super::world::ModelRecord;

pub struct Finetune;

/// The training method of a fine-tune.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Eq. 5: the reward alone.
    Baseline,
    /// Eq. 6-9: the reward and the distillation from the EMA teacher.
    Rid,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Baseline => "baseline",
            Method::Rid => "rid",
        }
    }
}

crate::enum_param!(Method { Baseline, Rid });

/// How RID's teacher produces its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Distillation {
    LastStep,
    FullStep,
    /// No teacher: RID without distillation trains as the baseline.
    Off,
}

impl Distillation {
    pub fn name(self) -> &'static str {
        match self {
            Distillation::LastStep => "last_step",
            Distillation::FullStep => "full_step",
            Distillation::Off => "none",
        }
    }
}

crate::enum_param!(Distillation { LastStep, FullStep, Off });

/// Which adapter a fine-tune trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adapter {
    /// A new adapter in the input's group (the paper's adapter group).
    New,
    /// The input's newest adapter (one LoRA shared by every task: the ablation).
    Shared,
}

impl Adapter {
    pub fn name(self) -> &'static str {
        match self {
            Adapter::New => "new",
            Adapter::Shared => "shared",
        }
    }
}

crate::enum_param!(Adapter { New, Shared });

stage_params! {
    /// The parameters of a `finetune` stage.
    pub struct FinetuneParams {
        pub task: Task = required().doc("the reward task: aesthetic, hps, compress, pickscore, or a reward the pipeline declares in `rewards:` (a `lower` one is trained on its negative)"),
        pub method: Method = required().doc("baseline (Eq. 5) or RID (Eq. 6-9)"),
        pub distill: Distillation = param(Distillation::LastStep).doc("RID's distillation: the teacher denoises the student's z_1 (last_step), follows its own trajectory from z_N (full_step, the Eq. 7 ablation), or is absent (none)"),
        pub distill_space: DistillSpace = param(DistillSpace::Image).doc("where RID's distance is taken: decoded images (Eq. 7: mse(D(z_0), D(z_0^T)), the teacher decoded without gradient) or latents mse(z_0, z_0^T) (the ablation)"),
        pub lambda: f64 = param(0.1).min(0).doc("weight of the distillation term (paper: 0.1)"),
        pub ema_momentum: f64 = param(0.99).min(0).max(1).doc("EMA momentum alpha of the teacher (Eq. 6)"),
        pub adapter: Adapter = param(Adapter::New).doc("new: add an adapter to the input's group and train only it (the paper's adapter group); shared: keep training the input's newest adapter, so that every task of an order shares one LoRA (the ablation; the base model gets its first)"),
        pub train: TrainParams = flatten(),
    }
}

impl FinetuneParams {
    /// What the stage minimises.
    pub fn objective(&self) -> Objective {
        let (lambda, space) = (self.lambda, self.distill_space);
        match (self.method, self.distill) {
            (Method::Baseline, _) | (Method::Rid, Distillation::Off) => Objective::Baseline,
            (Method::Rid, Distillation::LastStep) => Objective::Rid { lambda, distill: Distill::LastStep, space },
            (Method::Rid, Distillation::FullStep) => Objective::Rid { lambda, distill: Distill::FullStep, space },
        }
    }
}

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
        KindSchema {
            kind: "finetune",
            // 2: RID distils decoded images (Eq. 7) rather than latents; random streams derived
            // from the seed and the input model's place in the sequence.
            version: 2,
            doc: "fine-tune a new LoRA adapter on one reward task (baseline or RID), on top of the input model",
            uses_input_labels: false,
            reads_declared_rewards: false,
            params: FinetuneParams::specs(),
            inputs: vec![model_input("the model to continue from: a world (the base model) or an earlier finetune/soup/joint")],
        }
    }

    fn estimate(&self, stage: &crate::pipeline::ResolvedStage, pipeline: &crate::pipeline::ResolvedPipeline) -> crate::exec::kind::Estimate {
        match FinetuneParams::from_params(&stage.params) {
            Ok(p) => super::train::training_estimate(stage, pipeline, &p.train, &p.objective(), vec![p.task.clone()]),
            Err(_) => Default::default(),
        }
    }

    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let p: FinetuneParams = ctx.typed_params()?;
        let (model, adapters) = ModelRecord::of_input(ctx.input("model")?)?;
        let objective = p.objective();
        let device = super::device::tch_device(&ctx.device);
        check_memory(ctx, &model, adapters.as_deref(), &p.train, &objective, vec![p.task.clone()])?;
        let reward = task_reward(&p.task, &model.world, &ctx.stage.rewards, device, p.train.precision)?;
        let spec = TrainSpec {
            method: p.method.name().to_string(),
            objective,
            ema_momentum: p.ema_momentum,
            tasks: vec![p.task],
            new_adapter: p.adapter == Adapter::New,
            reward,
            params: p.train,
        };
        train(ctx, spec, &model, adapters.as_deref())
    }
}
