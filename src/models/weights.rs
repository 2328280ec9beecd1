//! Weight files: read tensors by upstream name, and copy them into a model's `VarStore` with
//! strict checks (a missing, unexpected or mis-shaped tensor is an error that names it).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tch::nn::VarStore;
use tch::Tensor;

/// Tensors of a checkpoint, by name.
pub type TensorMap = BTreeMap<String, Tensor>;

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{path}: cannot read weights: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{path}: missing tensor `{name}` (expected shape {expected:?})")]
    Missing { path: PathBuf, name: String, expected: Vec<i64> },
    #[error("{path}: tensor `{name}` has shape {found:?}, the model expects {expected:?}")]
    Shape { path: PathBuf, name: String, found: Vec<i64>, expected: Vec<i64> },
    #[error("{path}: unexpected tensor `{name}` (not part of this model; first of {count})")]
    Unexpected { path: PathBuf, name: String, count: usize },
}

/// Reads every tensor of a `.safetensors` file (any float dtype; converted on assignment).
pub fn read_safetensors(path: &Path) -> Result<TensorMap, WeightsError> {
    let named = Tensor::read_safetensors(path).map_err(|e| WeightsError::Read {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(named.into_iter().collect())
}

/// How strictly [`assign`] treats tensors of the file that the model does not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extra {
    Reject,
    Ignore,
}

/// Copies `tensors` into the variables of `vs`, converting dtype and device to the variable's.
/// Every variable must be present with the same shape. `source` names the file in errors.
pub fn assign(vs: &VarStore, tensors: &TensorMap, extra: Extra, source: &Path) -> Result<(), WeightsError> {
    let variables = vs.variables();
    let mut missing: Vec<&String> = variables.keys().filter(|k| !tensors.contains_key(*k)).collect();
    missing.sort();
    if let Some(name) = missing.first() {
        return Err(WeightsError::Missing {
            path: source.to_path_buf(),
            name: (*name).clone(),
            expected: variables[*name].size(),
        });
    }
    if extra == Extra::Reject {
        let unexpected: Vec<&String> = tensors.keys().filter(|k| !variables.contains_key(*k)).collect();
        if let Some(name) = unexpected.first() {
            return Err(WeightsError::Unexpected {
                path: source.to_path_buf(),
                name: (*name).clone(),
                count: unexpected.len(),
            });
        }
    }
    tch::no_grad(|| {
        for (name, mut var) in variables {
            let src = &tensors[&name];
            if src.size() != var.size() {
                return Err(WeightsError::Shape {
                    path: source.to_path_buf(),
                    name,
                    found: src.size(),
                    expected: var.size(),
                });
            }
            var.copy_(&src.to_device(var.device()).to_kind(var.kind()));
        }
        Ok(())
    })
}
