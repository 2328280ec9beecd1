//! The one format of resumable training checkpoints (the fine-tuning loop and the tiny world's
//! trainers): a safetensors file of named f32 tensors (model, EMA or teacher, optimizer state;
//! f64 and integer tensors kept exact) whose header metadata holds the step reached and, where
//! the trainer has one, a JSON state (the fine-tune's log so far). Written atomically, so a
//! crash leaves the previous checkpoint.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tch::Tensor;

use crate::models::weights::{self, FloatStorage};

const STEP_KEY: &str = "step";
const STATE_KEY: &str = "state";

#[derive(Debug, thiserror::Error)]
#[error("checkpoint {}: {reason}", path.display())]
pub struct CheckpointError {
    pub path: PathBuf,
    pub reason: String,
}

/// A training checkpoint: the step reached, named tensors and the trainer's state.
pub struct Checkpoint {
    pub step: usize,
    pub tensors: BTreeMap<String, Tensor>,
    state: Option<String>,
}

impl Checkpoint {
    /// Saves `tensors` at `step` to `path` (creating its folder).
    pub fn save(path: &Path, step: usize, tensors: &[(String, Tensor)]) -> Result<(), CheckpointError> {
        Self::write(path, step, tensors, None)
    }

    /// [`Self::save`] with the trainer's `state` beside the tensors.
    pub fn save_with_state(path: &Path, step: usize, tensors: &[(String, Tensor)], state: &impl Serialize) -> Result<(), CheckpointError> {
        let state = serde_json::to_string(state).map_err(|e| CheckpointError { path: path.to_path_buf(), reason: e.to_string() })?;
        Self::write(path, step, tensors, Some(state))
    }

    fn write(path: &Path, step: usize, tensors: &[(String, Tensor)], state: Option<String>) -> Result<(), CheckpointError> {
        let fail = |reason: String| CheckpointError { path: path.to_path_buf(), reason };
        let mut metadata = BTreeMap::from([(STEP_KEY.to_string(), step.to_string())]);
        metadata.extend(state.map(|s| (STATE_KEY.to_string(), s)));
        let bytes = weights::safetensors_bytes(tensors, FloatStorage::F32, &metadata).map_err(|e| fail(e.to_string()))?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
        }
        crate::exec::atomic_write(path, &bytes).map_err(|e| fail(e.to_string()))
    }

    /// The checkpoint at `path`, or `None` when there is none (or it cannot be read: training
    /// then starts over rather than failing).
    pub fn load(path: &Path) -> Option<Checkpoint> {
        let step = Self::saved_step(path)?;
        let state = weights::read_safetensors_metadata(path).ok()?.remove(STATE_KEY);
        let tensors = weights::read_safetensors(path).ok()?;
        Some(Checkpoint { step, tensors, state })
    }

    /// The step of the checkpoint at `path`, from its header alone.
    pub fn saved_step(path: &Path) -> Option<usize> {
        weights::read_safetensors_metadata(path).ok()?.get(STEP_KEY)?.parse().ok()
    }

    /// The trainer's state saved with the tensors (`None`: none, or not a `T`).
    pub fn state<T: DeserializeOwned>(&self) -> Option<T> {
        serde_json::from_str(self.state.as_deref()?).ok()
    }

    /// The tensors under `prefix`, without it.
    pub fn with_prefix(&self, prefix: &str) -> HashMap<String, Tensor> {
        self.tensors
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(prefix).map(|rest| (rest.to_string(), v.shallow_clone())))
            .collect()
    }
}

/// Named tensors under a prefix (for checkpoints).
pub fn prefixed(prefix: &str, named: impl IntoIterator<Item = (String, Tensor)>) -> Vec<(String, Tensor)> {
    named.into_iter().map(|(n, t)| (format!("{prefix}{n}"), t)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ckpt.safetensors");
        assert!(Checkpoint::load(&path).is_none());
        Checkpoint::save(&path, 12, &[("model.w".into(), Tensor::from_slice(&[1.5f32]))]).unwrap();
        let c = Checkpoint::load(&path).unwrap();
        assert_eq!(c.step, 12);
        assert_eq!(c.with_prefix("model.")["w"].double_value(&[0]), 1.5);
        assert_eq!(c.state::<Vec<u32>>(), None);
        Checkpoint::save_with_state(&path, 13, &[("s".into(), Tensor::from_slice(&[0.1f64]))], &vec![1u32, 2]).unwrap();
        let c = Checkpoint::load(&path).unwrap();
        assert_eq!((c.step, c.state::<Vec<u32>>()), (13, Some(vec![1, 2])));
        assert_eq!(c.tensors["s"].double_value(&[0]), 0.1, "f64 kept exact");
        assert_eq!(Checkpoint::saved_step(&path), Some(13));
    }
}
