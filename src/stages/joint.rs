//! `joint`: joint tuning (Eq. 10), one adapter on a weighted sum of the task rewards with the
//! baseline recipe; the upper-bound-style comparison of the paper's Table 6.
use std::collections::BTreeMap;

use crate::exec::{StageContext, StageError, StageKind};
use crate::method::objective::Objective;
use crate::pipeline::params::StageParams;
use crate::pipeline::schema::KindSchema;
use crate::stage_params;

use super::finetune::model_input;
use crate::records::Task;
use super::reward_set::mixture;
use super::train::{check_memory, train, TrainParams, TrainSpec};
use super::world::ModelRecord;

pub struct Joint;

stage_params! {
    /// The parameters of a `joint` stage.
    pub struct JointParams {
        pub weights: BTreeMap<Task, f64> = param(BTreeMap::from([(Task::Aesthetic, 0.01), (Task::Hps, 2.0), (Task::Compress, 1.0)]))
            .min(0)
            .doc("reward weights by task (Eq. 10: 0.01 R_a + 2 R_h + R_c), over built-in tasks and rewards the pipeline declares"),
        pub train: TrainParams = flatten(),
    }
}

impl JointParams {
    /// The weighted tasks in task order.
    pub fn tasks(&self) -> Result<Vec<(Task, f64)>, StageError> {
        let weights: Vec<(Task, f64)> = self.weights.iter().map(|(t, w)| (t.clone(), *w)).collect();
        if weights.is_empty() {
            return Err(StageError::Failed("`weights` names no task".into()));
        }
        Ok(weights)
    }
}

impl StageKind for Joint {
    fn schema(&self) -> KindSchema {
        KindSchema {
            kind: "joint",
            // 2: random streams derived from the seed and the input model's place in the sequence.
            version: 2,
            doc: "joint tuning: one adapter on a weighted sum of rewards (Eq. 10)",
            uses_input_labels: false,
            reads_declared_rewards: false,
            params: JointParams::specs(),
            inputs: vec![model_input("the model to tune (the base model, in the paper)")],
        }
    }

    fn estimate(&self, stage: &crate::pipeline::ResolvedStage, pipeline: &crate::pipeline::ResolvedPipeline) -> crate::exec::kind::Estimate {
        match JointParams::from_params(&stage.params) {
            Ok(p) => {
                let tasks: Vec<Task> = p.weights.keys().cloned().collect();
                super::train::training_estimate(stage, pipeline, &p.train, &Objective::Baseline, tasks)
            }
            Err(_) => Default::default(),
        }
    }

    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let p: JointParams = ctx.typed_params()?;
        let weights = p.tasks()?;
        let (model, adapters) = ModelRecord::of_input(ctx.input("model")?)?;
        let device = super::device::tch_device(&ctx.device);
        let tasks: Vec<Task> = weights.iter().map(|(t, _)| t.clone()).collect();
        let reward = mixture(&weights, &model.world, &ctx.stage.rewards, device, p.train.precision)?;
        check_memory(ctx, &model, adapters.as_deref(), &p.train, &Objective::Baseline, tasks.clone())?;
        let spec = TrainSpec {
            method: "joint".into(),
            objective: Objective::Baseline,
            ema_momentum: 0.0,
            tasks,
            new_adapter: true,
            reward,
            params: p.train,
        };
        train(ctx, spec, &model, adapters.as_deref())
    }
}
