//! The reward of each task, built from a world's files: the same reward code at both scales.
use tch::Device;

use crate::exec::StageError;
use crate::rewards::aesthetic::AestheticReward;
use crate::rewards::compressibility::Compressibility;
use crate::rewards::diff_jpeg::DiffJpeg;
use crate::rewards::hps::HpsReward;
use crate::rewards::mixture::RewardMixture;
use crate::rewards::Reward;
use crate::models::precision::Precision;
use crate::records::Task;

use super::world::WorldSpec;

/// The reward model of `task`, loaded on `device` with its weights in `precision` (its scores
/// are fp32 whatever the precision).
pub fn task_reward(task: Task, world: &WorldSpec, device: Device, precision: Precision) -> Result<Box<dyn Reward>, StageError> {
    let kind = precision.kind();
    Ok(match task {
        Task::Aesthetic => Box::new(AestheticReward::load(&world.aesthetic_clip, &world.aesthetic_head, device, kind).map_err(StageError::failed)?),
        Task::Hps => Box::new(HpsReward::load(&world.hps, device, kind).map_err(StageError::failed)?),
        Task::Compress => {
            let quality = world.jpeg_quality.round().clamp(1.0, 100.0) as u8;
            Box::new(Compressibility::new(DiffJpeg::new(quality).map_err(StageError::failed)?, world.compress_reduction))
        }
    })
}

/// A weighted sum of task rewards (joint tuning, Eq. 10: 0.01 R_a + 2 R_h + R_c).
pub fn mixture(weights: &[(Task, f64)], world: &WorldSpec, device: Device, precision: Precision) -> Result<Box<dyn Reward>, StageError> {
    let mut terms = Vec::new();
    for &(task, w) in weights {
        terms.push((w, task_reward(task, world, device, precision)?));
    }
    Ok(Box::new(RewardMixture::new(terms).map_err(StageError::failed)?))
}
