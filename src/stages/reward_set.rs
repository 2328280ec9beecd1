//! The reward of each task, built from a world's files or a declared TorchScript module: the
//! same reward code at both scales.
use std::collections::BTreeMap;

use tch::Device;

use crate::exec::StageError;
use crate::models::precision::Precision;
use crate::pipeline::resolved::DeclaredReward;
use crate::records::{DeclaredRewards, RewardInfo, Task};
use crate::rewards::aesthetic::AestheticReward;
use crate::rewards::compressibility::Compressibility;
use crate::rewards::diff_jpeg::DiffJpeg;
use crate::rewards::hps::HpsReward;
use crate::rewards::mixture::RewardMixture;
use crate::rewards::pickscore::PickScoreReward;
use crate::rewards::torchscript::{Probe, TorchScriptReward};
use crate::rewards::Reward;

use super::world::WorldSpec;

/// The declared rewards a stage got from its pipeline, by name.
pub type Declared = BTreeMap<String, DeclaredReward>;

/// The reward model of `task`, loaded on `device` with its weights in `precision` (its scores
/// are fp32 whatever the precision), as training maximises it: a declared `lower` reward is
/// negated.
pub fn task_reward(task: &Task, world: &WorldSpec, declared: &Declared, device: Device, precision: Precision) -> Result<Box<dyn Reward>, StageError> {
    let kind = precision.kind();
    Ok(match task {
        Task::Aesthetic => Box::new(AestheticReward::load(&world.aesthetic_clip, &world.aesthetic_head, device, kind).map_err(StageError::failed)?),
        Task::Hps => Box::new(HpsReward::load(&world.hps, device, kind).map_err(StageError::failed)?),
        Task::Compress => {
            let quality = world.jpeg_quality.round().clamp(1.0, 100.0) as u8;
            Box::new(Compressibility::new(DiffJpeg::new(quality).map_err(StageError::failed)?, world.compress_reduction))
        }
        Task::PickScore => Box::new(pickscore(world, device, precision)?),
        Task::Declared(name) => {
            let reward = declared_reward(name, declared, world, device)?;
            let direction = declared.get(name).map(|d| d.direction).unwrap_or_default();
            direction.for_training(Box::new(reward))
        }
    })
}

/// The world's PickScore model (the task and metric `pickscore`).
pub fn pickscore(world: &WorldSpec, device: Device, precision: Precision) -> Result<PickScoreReward, StageError> {
    let folder = world.pickscore.as_ref().ok_or_else(|| StageError::Failed("task `pickscore`: the world names no PickScore folder (the world stage's parameter `pickscore`)".into()))?;
    PickScoreReward::load(folder, device, precision.kind()).map_err(StageError::failed)
}

/// A declared reward's TorchScript module, checked on a probe batch of the world's image size
/// before anything is computed with it (a refusal names the file and what is wrong).
pub fn declared_reward(name: &str, declared: &Declared, world: &WorldSpec, device: Device) -> Result<TorchScriptReward, StageError> {
    let d = declared.get(name).ok_or_else(|| StageError::Failed(format!("task `{name}` is not a reward the pipeline declares")))?;
    let probe = Probe { height: world.resolution, width: world.resolution, ..Probe::default() };
    TorchScriptReward::load_with(name, &d.torchscript, device, probe).map_err(StageError::failed)
}

/// Checks every declared reward of `pipeline` once, on the CPU with a probe batch of the image
/// size of the world upstream of each stage that uses it (64x64 where that world cannot be read
/// yet): a wrong file is refused before anything runs. Returns the number of checks.
pub fn check_declared(pipeline: &crate::pipeline::ResolvedPipeline) -> Result<usize, StageError> {
    let mut checked: Vec<(std::path::PathBuf, Probe)> = Vec::new();
    for stage in pipeline.stages.iter().filter(|s| !s.rewards.is_empty()) {
        let probe = match super::estimate::upstream_world(stage, pipeline) {
            Ok((world, _)) => Probe { height: world.resolution, width: world.resolution, ..Probe::default() },
            Err(_) => Probe::default(),
        };
        for (name, d) in &stage.rewards {
            if stage.missing_files.iter().any(|m| m.path == d.torchscript) || checked.contains(&(d.torchscript.clone(), probe)) {
                continue;
            }
            crate::rewards::torchscript::validate_with(&d.torchscript, Device::Cpu, probe).map_err(|e| StageError::Failed(format!("declared reward `{name}` (used by stage `{}`): {e}", stage.id)))?;
            checked.push((d.torchscript.clone(), probe));
        }
    }
    Ok(checked.len())
}

/// How records name the declared rewards (label, direction, letter).
pub fn declared_info(declared: &Declared) -> DeclaredRewards {
    DeclaredRewards(declared.iter().map(|(name, d)| (name.clone(), RewardInfo { label: d.label.clone(), direction: d.direction, letter: d.letter })).collect())
}

/// A weighted sum of task rewards (joint tuning, Eq. 10: 0.01 R_a + 2 R_h + R_c).
pub fn mixture(weights: &[(Task, f64)], world: &WorldSpec, declared: &Declared, device: Device, precision: Precision) -> Result<Box<dyn Reward>, StageError> {
    let mut terms = Vec::new();
    for (task, w) in weights {
        terms.push((*w, task_reward(task, world, declared, device, precision)?));
    }
    Ok(Box::new(RewardMixture::new(terms).map_err(StageError::failed)?))
}
