//! Weight files: read tensors by upstream name, and copy them into a model's `VarStore` with
//! strict checks (a missing, unexpected or mis-shaped tensor is an error that names it).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use tch::nn::VarStore;
use tch::{Kind, Tensor};

use super::pickle::{self, PickleError};

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
    #[error("{path}: {source}")]
    Pickle { path: PathBuf, source: PickleError },
    #[error("{path}: no weight file in this folder (looked for {looked_for})")]
    NoWeights { path: PathBuf, looked_for: String },
    #[error("{path}: unknown weight format (expected .safetensors, .pt, .pth, .bin, .ckpt, *.index.json or a folder)")]
    UnknownFormat { path: PathBuf },
    #[error("{path}: sharded checkpoint: {reason}")]
    Shards { path: PathBuf, reason: String },
    #[error("{path}: tensor `{name}` is stored as {found:?}; the model needs floating-point weights")]
    Dtype { path: PathBuf, name: String, found: Kind },
    #[error("{path}: unexpected tensor `{name}` (not part of this model; first of {count})")]
    Unexpected { path: PathBuf, name: String, count: usize },
    #[error("cannot write tensor `{name}` as safetensors: {reason}")]
    Write { name: String, reason: String },
}

/// Storage precision of the floating-point tensors of a written weight file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatStorage {
    F32,
    /// Half precision; the loaders convert to the model's precision.
    F16,
}

/// Serialises named tensors to safetensors bytes: f32 / f16 / bf16 tensors at `floats`, f64 and
/// integer tensors as they are. The header's metadata holds `format: pt` (which transformers and
/// diffusers expect) and the entries of `metadata`.
pub fn safetensors_bytes(named: &[(String, Tensor)], floats: FloatStorage, metadata: &BTreeMap<String, String>) -> Result<Vec<u8>, WeightsError> {
    let write_err = |name: &str, reason: String| WeightsError::Write { name: name.to_string(), reason };
    let mut buffers: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::with_capacity(named.len());
    for (name, tensor) in named {
        let t = tensor.detach().to_device(tch::Device::Cpu);
        let (t, dtype) = match t.kind() {
            // f64 tensors are statistics (e.g. the FID reference) or scales, kept exact.
            Kind::Double => (t, Dtype::F64),
            Kind::Float | Kind::Half | Kind::BFloat16 => match floats {
                FloatStorage::F32 => (t.to_kind(Kind::Float), Dtype::F32),
                FloatStorage::F16 => (t.to_kind(Kind::Half), Dtype::F16),
            },
            Kind::Int64 => (t, Dtype::I64),
            Kind::Int => (t, Dtype::I32),
            other => return Err(write_err(name, format!("cannot store kind {other:?}"))),
        };
        let t = t.contiguous();
        let numel = t.numel();
        let mut bytes = vec![0u8; numel * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut bytes, numel).map_err(|e| write_err(name, e.to_string()))?;
        let shape = t.size().iter().map(|&d| d as usize).collect();
        buffers.push((name.clone(), dtype, shape, bytes));
    }
    let views = buffers
        .iter()
        .map(|(name, dtype, shape, bytes)| safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes).map(|v| (name.as_str(), v)).map_err(|e| write_err(name, e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    let mut header: std::collections::HashMap<String, String> = metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    header.insert("format".to_string(), "pt".to_string());
    safetensors::tensor::serialize(views, Some(header)).map_err(|e| write_err("(file)", e.to_string()))
}

/// The metadata of a `.safetensors` file's header (`__metadata__`), without reading its tensors.
pub fn read_safetensors_metadata(path: &Path) -> Result<BTreeMap<String, String>, WeightsError> {
    let read_err = |reason: String| WeightsError::Read { path: path.to_path_buf(), reason };
    let file = std::fs::File::open(path).map_err(|e| read_err(e.to_string()))?;
    // SAFETY: the mapping is read-only and dropped before returning.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| read_err(e.to_string()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| read_err(e.to_string()))?;
    Ok(meta.metadata().clone().map(|m| m.into_iter().collect()).unwrap_or_default())
}

/// Reads every tensor of a `.safetensors` file, keeping the stored dtype (converted on assignment).
pub fn read_safetensors(path: &Path) -> Result<TensorMap, WeightsError> {
    let read_err = |reason: String| WeightsError::Read { path: path.to_path_buf(), reason };
    let file = std::fs::File::open(path).map_err(|e| read_err(e.to_string()))?;
    // SAFETY: the mapping is read-only and dropped before returning; the tensors are copies.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| read_err(e.to_string()))?;
    let st = safetensors::SafeTensors::deserialize(&mmap).map_err(|e| read_err(e.to_string()))?;
    let mut out = TensorMap::new();
    for (name, view) in st.tensors() {
        let kind = match view.dtype() {
            Dtype::F32 => Kind::Float,
            Dtype::F16 => Kind::Half,
            Dtype::BF16 => Kind::BFloat16,
            Dtype::F64 => Kind::Double,
            Dtype::I64 => Kind::Int64,
            Dtype::I32 => Kind::Int,
            Dtype::I16 => Kind::Int16,
            Dtype::I8 => Kind::Int8,
            Dtype::U8 => Kind::Uint8,
            Dtype::BOOL => Kind::Bool,
            other => return Err(read_err(format!("tensor `{name}` has unsupported dtype {other:?}"))),
        };
        // The reader checked that the sizes match the data; a zero-sized tensor can still
        // declare dimensions beyond what libtorch takes.
        let shape: Vec<i64> = view
            .shape()
            .iter()
            .map(|&d| i64::try_from(d).map_err(|_| read_err(format!("tensor `{name}` has a dimension of {d}"))))
            .collect::<Result<_, _>>()?;
        let tensor = Tensor::f_from_data_size(view.data(), &shape, kind)
            .map_err(|e| read_err(format!("tensor `{name}`: {e}")))?;
        out.insert(name, tensor);
    }
    Ok(out)
}

/// Weight files looked up in a diffusers / transformers / open_clip component folder, in order
/// of preference (safetensors first; an `.index.json` names the shards of a split checkpoint).
const FOLDER_FILES: &[&str] = &[
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "open_clip_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
    "open_clip_pytorch_model.bin",
    "diffusion_pytorch_model.bin.index.json",
    "pytorch_model.bin.index.json",
];

/// The weight file of a component folder (the first of the usual names that exists).
pub fn find_weight_file(dir: &Path) -> Result<PathBuf, WeightsError> {
    FOLDER_FILES.iter().map(|f| dir.join(f)).find(|p| p.is_file()).ok_or_else(|| WeightsError::NoWeights {
        path: dir.to_path_buf(),
        looked_for: FOLDER_FILES.join(", "),
    })
}

/// Reads the tensors of a checkpoint: a `.safetensors` file, a PyTorch zip-pickle
/// (`.pt`, `.pth`, `.bin`, `.ckpt`; a state dict, possibly under `state_dict`), a shard index
/// (`*.index.json`), or a component folder holding one of these under its usual name.
/// Tensors keep their stored dtype.
pub fn load_weights(path: &Path) -> Result<TensorMap, WeightsError> {
    if path.is_dir() {
        return load_weights(&find_weight_file(path)?);
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if name.ends_with(".index.json") {
        return read_sharded(path);
    }
    match path.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => read_safetensors(path),
        Some("pt" | "pth" | "bin" | "ckpt") => {
            pickle::read_state_dict(path).map_err(|source| WeightsError::Pickle { path: path.to_path_buf(), source })
        }
        _ => Err(WeightsError::UnknownFormat { path: path.to_path_buf() }),
    }
}

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

/// A sharded checkpoint: `weight_map` names, for every tensor, the shard file beside the index.
fn read_sharded(index: &Path) -> Result<TensorMap, WeightsError> {
    let shard_err = |reason: String| WeightsError::Shards { path: index.to_path_buf(), reason };
    let text = std::fs::read_to_string(index).map_err(|e| shard_err(e.to_string()))?;
    let parsed: ShardIndex = serde_json::from_str(&text).map_err(|e| shard_err(e.to_string()))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut shards: Vec<&String> = parsed.weight_map.values().collect();
    shards.sort();
    shards.dedup();
    let mut out = TensorMap::new();
    for shard in shards {
        let plain = Path::new(shard).file_name().is_some_and(|f| f == shard.as_str());
        if !plain || !(shard.ends_with(".safetensors") || shard.ends_with(".bin")) {
            return Err(shard_err(format!("shard `{shard}` is not a weight file beside the index")));
        }
        for (name, tensor) in load_weights(&dir.join(shard))? {
            if parsed.weight_map.get(&name) != Some(shard) {
                return Err(shard_err(format!("tensor `{name}` found in `{shard}`, the index places it elsewhere")));
            }
            out.insert(name, tensor);
        }
    }
    if let Some(name) = parsed.weight_map.keys().find(|n| !out.contains_key(*n)) {
        return Err(shard_err(format!("tensor `{name}` is missing from shard `{}`", parsed.weight_map[name])));
    }
    Ok(out)
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
            // Integers or booleans where the model has floats are a wrong file, not a conversion.
            if var.is_floating_point() && !src.is_floating_point() {
                return Err(WeightsError::Dtype {
                    path: source.to_path_buf(),
                    name,
                    found: src.kind(),
                });
            }
            var.copy_(&src.to_device(var.device()).to_kind(var.kind()));
        }
        Ok(())
    })
}
