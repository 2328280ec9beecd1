//! Weight files and checkpoints: safetensors in f32 or f16 (with the `format: pt` metadata
//! transformers and diffusers expect), JSON configs, and restoring a store from a checkpoint
//! ([`crate::method::checkpoint`]).
use std::collections::BTreeMap;
use std::path::Path;

use tch::Tensor;

use super::TrainError;
use crate::models::weights;

/// Storage precision of a written weight file (f16: the shipped weights; the loaders convert
/// to the model's precision).
pub use crate::models::weights::FloatStorage as Precision;

/// Writes named tensors as a safetensors file (creating its folder), atomically.
pub fn write_safetensors(path: &Path, named: &[(String, Tensor)], precision: Precision) -> Result<(), TrainError> {
    let bytes = weights::safetensors_bytes(named, precision, &BTreeMap::new()).map_err(TrainError::other)?;
    write_file(path, &bytes)
}

/// Reads every tensor of a safetensors file (stored precision kept).
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, Tensor>, TrainError> {
    weights::read_safetensors(path).map_err(TrainError::other)
}

/// Writes a file (creating its folder), atomically.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| TrainError::io(format!("cannot create {}", dir.display()), e))?;
    }
    crate::exec::atomic_write(path, bytes).map_err(|e| TrainError::io(format!("cannot write {}", path.display()), e))
}

/// Writes a value as pretty JSON.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<(), TrainError> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(TrainError::other)?;
    bytes.push(b'\n');
    write_file(path, &bytes)
}

/// Copies tensors named as `vs`'s variables (after stripping `prefix`) into them; false when
/// any is missing or mis-shaped.
pub fn restore_store(vs: &tch::nn::VarStore, saved: &BTreeMap<String, Tensor>, prefix: &str) -> bool {
    let vars = vs.variables();
    if vars.iter().any(|(n, v)| saved.get(&format!("{prefix}{n}")).is_none_or(|t| t.size() != v.size())) {
        return false;
    }
    tch::no_grad(|| {
        for (name, mut var) in vars {
            var.copy_(&saved[&format!("{prefix}{name}")]);
        }
    });
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn f16_files_round_to_half_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let t = Tensor::from_slice(&[1.0f32, 1.0 / 3.0, -2.5]).view([3, 1]);
        write_safetensors(&path, &[("a.weight".into(), t.shallow_clone()), ("n".into(), Tensor::from_slice(&[7i64]))], Precision::F16).unwrap();
        let back = read_safetensors(&path).unwrap();
        assert_eq!(back["a.weight"].kind(), Kind::Half);
        assert_eq!(back["a.weight"].size(), vec![3, 1]);
        let diff = (back["a.weight"].to_kind(Kind::Float) - &t).abs().max().double_value(&[]);
        assert!(diff > 0.0 && diff < 1e-3, "{diff}");
        assert_eq!(back["n"].int64_value(&[0]), 7);
        let raw = std::fs::read(&path).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&raw).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
    }
}
