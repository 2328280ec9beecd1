//! Checking checkpoints before a run (`ril-pipe model inspect`): what a file or folder holds (a
//! diffusers pipeline folder, a component folder, a weights file), recognised from its config
//! (`_class_name`, `model_type`, open_clip's model config) and its tensor names; then the model
//! built from the config and compared with the checkpoint, naming every missing, unexpected and
//! mis-shaped tensor. Nothing here panics on a bad file: every problem lands in the report.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{json, Map, Value};
use tch::Kind;

use super::clip::{ClipConfig, Layout, TextPooling};
use super::component::{self, ComponentKind, ModelConfig};
use super::ddim::{BetaSchedule, DdimConfig, PredictionType, TimestepSpacing};
use super::tokenizer::ClipTokenizer;
use super::weights::{self, Extra, WeightsError};

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("{0}: no such file or folder")]
    NotFound(PathBuf),
    #[error("{0}: --config applies to a single component, not to a pipeline folder")]
    ConfigWithPipeline(PathBuf),
}

/// Dtype and shape of one checkpoint tensor.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TensorInfo {
    pub dtype: String,
    pub shape: Vec<i64>,
}

/// What a checkpoint holds, in sum.
#[derive(Debug, Clone, Serialize)]
pub struct WeightsSummary {
    /// The file read (for a folder, the one `load_weights` picks).
    pub file: PathBuf,
    pub tensors: usize,
    /// Tensor count per dtype (safetensors names: F32, F16, BF16, ...).
    pub dtypes: BTreeMap<String, usize>,
    /// Elements of all tensors.
    pub parameters: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NamedShape {
    pub name: String,
    pub shape: Vec<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShapeMismatch {
    pub name: String,
    pub found: Vec<i64>,
    pub expected: Vec<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DtypeMismatch {
    pub name: String,
    pub dtype: String,
}

/// The checkpoint against the model built from its config.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TensorCheck {
    /// Variables of the model.
    pub expected: usize,
    /// Variables found with the right shape and a floating-point dtype.
    pub matched: usize,
    pub missing: Vec<NamedShape>,
    pub unexpected: Vec<NamedShape>,
    pub wrong_shape: Vec<ShapeMismatch>,
    /// Tensors the model needs as floats stored as integers or booleans.
    pub wrong_dtype: Vec<DtypeMismatch>,
    /// Whether the loader ignores unexpected tensors (ril-pipe's CLIP loaders do).
    pub unexpected_ignored: bool,
    /// Tensors that are not weights and that the loader skips (classifier, counters, buffers).
    pub set_aside: Vec<String>,
}

impl TensorCheck {
    /// Whether the checkpoint loads into the model.
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty()
            && self.wrong_shape.is_empty()
            && self.wrong_dtype.is_empty()
            && (self.unexpected.is_empty() || self.unexpected_ignored)
    }
}

fn is_float_dtype(dtype: &str) -> bool {
    matches!(dtype, "F16" | "BF16" | "F32" | "F64")
}

/// Compares a checkpoint (`found`, after the loader's renames) with the model's variables.
pub fn check_tensors(expected: &BTreeMap<String, Vec<i64>>, found: &BTreeMap<String, TensorInfo>, extra: Extra) -> TensorCheck {
    let mut check = TensorCheck { expected: expected.len(), unexpected_ignored: extra == Extra::Ignore, ..TensorCheck::default() };
    for (name, shape) in expected {
        match found.get(name) {
            None => check.missing.push(NamedShape { name: name.clone(), shape: shape.clone() }),
            Some(info) if &info.shape != shape => {
                check.wrong_shape.push(ShapeMismatch { name: name.clone(), found: info.shape.clone(), expected: shape.clone() })
            }
            Some(info) if !is_float_dtype(&info.dtype) => {
                check.wrong_dtype.push(DtypeMismatch { name: name.clone(), dtype: info.dtype.clone() })
            }
            Some(_) => check.matched += 1,
        }
    }
    check.unexpected = found
        .iter()
        .filter(|(name, _)| !expected.contains_key(*name))
        .map(|(name, info)| NamedShape { name: name.clone(), shape: info.shape.clone() })
        .collect();
    check
}

fn kind_dtype(kind: Kind) -> String {
    match kind {
        Kind::Float => "F32",
        Kind::Half => "F16",
        Kind::BFloat16 => "BF16",
        Kind::Double => "F64",
        Kind::Int64 => "I64",
        Kind::Int => "I32",
        Kind::Int16 => "I16",
        Kind::Int8 => "I8",
        Kind::Uint8 => "U8",
        Kind::Bool => "BOOL",
        other => return format!("{other:?}"),
    }
    .to_string()
}

/// The tensor names, dtypes and shapes of a checkpoint (a file or a component folder). A
/// `.safetensors` file is read from its header (validated) without loading the data; other
/// formats are loaded.
pub fn read_tensor_infos(path: &Path) -> Result<(PathBuf, BTreeMap<String, TensorInfo>), WeightsError> {
    let file = if path.is_dir() { weights::find_weight_file(path)? } else { path.to_path_buf() };
    if file.extension().is_some_and(|e| e == "safetensors") {
        let read_err = |reason: String| WeightsError::Read { path: file.clone(), reason };
        let handle = std::fs::File::open(&file).map_err(|e| read_err(e.to_string()))?;
        // SAFETY: read-only mapping, dropped before returning; only the header is read.
        let mmap = unsafe { memmap2::Mmap::map(&handle) }.map_err(|e| read_err(e.to_string()))?;
        let st = safetensors::SafeTensors::deserialize(&mmap).map_err(|e| read_err(e.to_string()))?;
        let mut infos = BTreeMap::new();
        for (name, view) in st.iter() {
            // Only an empty tensor can declare a dimension this large; it still is no checkpoint.
            let shape = view
                .shape()
                .iter()
                .map(|&d| i64::try_from(d).map_err(|_| read_err(format!("tensor `{name}` has a dimension of {d}"))))
                .collect::<Result<_, _>>()?;
            infos.insert(name.to_string(), TensorInfo { dtype: format!("{:?}", view.dtype()), shape });
        }
        return Ok((file, infos));
    }
    let infos = weights::load_weights(&file)?
        .into_iter()
        .map(|(name, t)| (name, TensorInfo { dtype: kind_dtype(t.kind()), shape: t.size() }))
        .collect();
    Ok((file, infos))
}

pub fn summarise(file: PathBuf, infos: &BTreeMap<String, TensorInfo>) -> WeightsSummary {
    let mut dtypes = BTreeMap::new();
    for info in infos.values() {
        *dtypes.entry(info.dtype.clone()).or_insert(0) += 1;
    }
    let parameters = infos.values().map(|i| i.shape.iter().product::<i64>()).sum();
    WeightsSummary { file, tensors: infos.len(), dtypes, parameters }
}

/// What tensor names alone say a checkpoint is, and the names that say so.
pub fn recognise_tensors(names: &[&str]) -> Result<(ComponentKind, &'static str), String> {
    let has = |n: &str| names.contains(&n);
    let any_prefix = |p: &str| names.iter().any(|n| n.starts_with(p));
    if any_prefix("model.diffusion_model.") || any_prefix("first_stage_model.") || any_prefix("cond_stage_model.") {
        return Err("an original (CompVis / LDM) single-file Stable Diffusion checkpoint (`model.diffusion_model.*`): \
                    ril-pipe reads the diffusers folder layout; convert it first, e.g. with diffusers' \
                    `StableDiffusionPipeline.from_single_file(FILE).save_pretrained(DIR)`"
            .to_string());
    }
    if any_prefix("Conv2d_1a_3x3.") || any_prefix("Mixed_5b.") {
        return Ok((ComponentKind::InceptionFid, "tensor names `Conv2d_1a_3x3.*`, `Mixed_*`"));
    }
    let aesthetic = |n: &&str| {
        n.strip_prefix("layers.")
            .and_then(|r| r.split_once('.'))
            .is_some_and(|(i, p)| i.parse::<usize>().is_ok() && (p == "weight" || p == "bias"))
    };
    if !names.is_empty() && names.iter().all(aesthetic) {
        return Ok((ComponentKind::AestheticHead, "tensor names `layers.N.weight` / `layers.N.bias` only"));
    }
    if has("time_embedding.linear_1.weight") || (has("conv_in.weight") && any_prefix("down_blocks.")) {
        return Ok((ComponentKind::Unet, "tensor names `conv_in.*`, `time_embedding.*`, `down_blocks.*`"));
    }
    if any_prefix("encoder.down_blocks.") && any_prefix("decoder.up_blocks.") {
        return Ok((ComponentKind::Vae, "tensor names `encoder.down_blocks.*`, `decoder.up_blocks.*`"));
    }
    if has("token_embedding.weight") || any_prefix("visual.conv1.") || any_prefix("transformer.resblocks.") {
        return Ok((ComponentKind::OpenClip, "tensor names `token_embedding.*`, `transformer.resblocks.*`, `visual.*`"));
    }
    match (any_prefix("text_model."), any_prefix("vision_model.")) {
        (true, true) => return Ok((ComponentKind::ClipModel, "tensor names `text_model.*` and `vision_model.*`")),
        (true, false) => return Ok((ComponentKind::ClipTextEncoder, "tensor names `text_model.*`")),
        (false, true) => return Ok((ComponentKind::ClipVisionEncoder, "tensor names `vision_model.*`")),
        (false, false) => {}
    }
    // transformers 5 saves a bare tower without its prefix.
    match (has("embeddings.token_embedding.weight"), has("embeddings.patch_embedding.weight")) {
        (true, false) => Ok((ComponentKind::ClipTextEncoder, "tensor names `embeddings.token_embedding.*` (a bare text tower)")),
        (false, true) => Ok((ComponentKind::ClipVisionEncoder, "tensor names `embeddings.patch_embedding.*` (a bare vision tower)")),
        _ => {
            let first: Vec<&str> = names.iter().take(3).copied().collect();
            Err(if names.is_empty() {
                "the checkpoint holds no tensors".to_string()
            } else {
                format!("tensor names not recognised as any model ril-pipe has (first: {})", first.join(", "))
            })
        }
    }
}

/// One component: what it is, its config, its weights, and whether they load.
#[derive(Debug, Clone, Serialize)]
pub struct ComponentReport {
    /// The pipeline entry (`unet`, `text_encoder`, ...), for a pipeline folder.
    pub name: Option<String>,
    pub path: PathBuf,
    pub kind: Option<ComponentKind>,
    /// What the kind was recognised by.
    pub recognised_by: Vec<String>,
    pub config_file: Option<PathBuf>,
    /// Key config values.
    pub config: Map<String, Value>,
    pub weights: Option<WeightsSummary>,
    pub check: Option<TensorCheck>,
    /// What keeps it from loading.
    pub problems: Vec<String>,
    /// Worth knowing, not a problem.
    pub notes: Vec<String>,
    pub ok: bool,
    #[serde(skip)]
    model_config: Option<ModelConfig>,
    #[serde(skip)]
    tokenizer_vocab: Option<usize>,
}

impl ComponentReport {
    fn new(name: Option<String>, path: &Path) -> Self {
        Self {
            name,
            path: path.to_path_buf(),
            kind: None,
            recognised_by: Vec::new(),
            config_file: None,
            config: Map::new(),
            weights: None,
            check: None,
            problems: Vec::new(),
            notes: Vec::new(),
            ok: false,
            model_config: None,
            tokenizer_vocab: None,
        }
    }

    fn finish(mut self) -> Self {
        self.ok = self.problems.is_empty() && self.check.as_ref().is_none_or(TensorCheck::is_clean);
        self
    }

    fn fail(mut self, problem: String) -> Self {
        self.problems.push(problem);
        self.finish()
    }
}

/// A pipeline entry that ril-pipe does not use (safety checker, feature extractor, ...).
#[derive(Debug, Clone, Serialize)]
pub struct SkippedComponent {
    pub name: String,
    pub class: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct InspectReport {
    pub path: PathBuf,
    /// `_class_name` of `model_index.json`, for a pipeline folder.
    pub pipeline: Option<String>,
    pub components: Vec<ComponentReport>,
    pub skipped: Vec<SkippedComponent>,
    /// Pipeline-level problems: entries missing, components that do not fit together.
    pub problems: Vec<String>,
    pub notes: Vec<String>,
    pub ok: bool,
}

impl InspectReport {
    fn finish(mut self) -> Self {
        self.ok = self.problems.is_empty() && !self.components.is_empty() && self.components.iter().all(|c| c.ok);
        self
    }
}

/// The subfolders of a Stable Diffusion pipeline that ril-pipe loads.
pub const PIPELINE_PARTS: [&str; 5] = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"];

const WEIGHT_EXTENSIONS: [&str; 5] = ["safetensors", "pt", "pth", "bin", "ckpt"];

fn is_weight_file(path: &Path) -> bool {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    name.ends_with(".index.json") || path.extension().and_then(|e| e.to_str()).is_some_and(|e| WEIGHT_EXTENSIONS.contains(&e))
}

fn is_tokenizer_dir(dir: &Path) -> bool {
    dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file()
}

/// Inspects a file or folder. `config` (a config JSON) applies to a single component, e.g. an
/// open_clip checkpoint's model config.
pub fn inspect(path: &Path, config: Option<&Path>) -> Result<InspectReport, InspectError> {
    if !path.exists() {
        return Err(InspectError::NotFound(path.to_path_buf()));
    }
    let mut report = InspectReport {
        path: path.to_path_buf(),
        pipeline: None,
        components: Vec::new(),
        skipped: Vec::new(),
        problems: Vec::new(),
        notes: Vec::new(),
        ok: false,
    };
    let pipeline_dir = if path.is_file() && path.file_name().is_some_and(|n| n == "model_index.json") {
        path.parent().map(Path::to_path_buf)
    } else if path.is_dir() && path.join("model_index.json").is_file() {
        Some(path.to_path_buf())
    } else {
        None
    };
    if let Some(dir) = pipeline_dir {
        if config.is_some() {
            return Err(InspectError::ConfigWithPipeline(path.to_path_buf()));
        }
        inspect_pipeline(&dir, &mut report);
        return Ok(report.finish());
    }
    if path.is_dir() && !has_component_files(path) {
        if PIPELINE_PARTS.iter().any(|p| path.join(p).is_dir()) {
            if config.is_some() {
                return Err(InspectError::ConfigWithPipeline(path.to_path_buf()));
            }
            report.notes.push("no model_index.json: inspected the standard subfolders of a diffusers pipeline".to_string());
            let parts = PIPELINE_PARTS.iter().map(|p| (p.to_string(), None)).collect();
            inspect_parts(path, parts, &mut report);
            return Ok(report.finish());
        }
        let mut loose: Vec<PathBuf> = std::fs::read_dir(path)
            .map(|entries| entries.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_file() && is_weight_file(p)).collect())
            .unwrap_or_default();
        loose.sort();
        if !loose.is_empty() {
            report.notes.push("a folder of loose weight files: each file inspected on its own".to_string());
            for file in loose {
                let name = file.file_name().map(|n| n.to_string_lossy().into_owned());
                report.components.push(inspect_component(name, &file, config));
            }
            return Ok(report.finish());
        }
    }
    report.components.push(inspect_component(None, path, config));
    Ok(report.finish())
}

/// Whether a folder is a component by itself (a config, a tokenizer, or a usual weight file).
fn has_component_files(dir: &Path) -> bool {
    component::find_config(dir).is_some()
        || dir.join("scheduler_config.json").is_file()
        || is_tokenizer_dir(dir)
        || weights::find_weight_file(dir).is_ok()
}

/// The component kinds a `model_index.json` class maps to; `None` for classes ril-pipe skips.
fn kind_of_class(class: &str) -> Option<ComponentKind> {
    match class {
        "UNet2DConditionModel" => Some(ComponentKind::Unet),
        "AutoencoderKL" => Some(ComponentKind::Vae),
        "CLIPTextModel" | "CLIPTextModelWithProjection" => Some(ComponentKind::ClipTextEncoder),
        "CLIPTokenizer" | "CLIPTokenizerFast" => Some(ComponentKind::Tokenizer),
        c if c.ends_with("Scheduler") => Some(ComponentKind::Scheduler),
        _ => None,
    }
}

fn inspect_pipeline(dir: &Path, report: &mut InspectReport) {
    let index_path = dir.join("model_index.json");
    let index = match component::read_json(&index_path) {
        Ok(Value::Object(map)) => map,
        Ok(_) => {
            report.problems.push(format!("{}: not a JSON object", index_path.display()));
            return;
        }
        Err(e) => {
            report.problems.push(e.to_string());
            return;
        }
    };
    report.pipeline = Some(index.get("_class_name").and_then(Value::as_str).unwrap_or("(no `_class_name`)").to_string());
    let mut parts = Vec::new();
    for (name, entry) in index.iter().filter(|(k, _)| !k.starts_with('_')) {
        // Components are [library, class] pairs; other entries are pipeline settings
        // (`requires_safety_checker`, ...).
        let class = match entry.as_array().map(Vec::as_slice) {
            None => continue,
            Some([_, Value::Null]) | Some([Value::Null, _]) => continue,
            Some([_, Value::String(class)]) => class.clone(),
            Some(_) => {
                report.problems.push(format!("model_index.json: `{name}` is {entry}, expected [library, class]"));
                continue;
            }
        };
        match kind_of_class(&class) {
            Some(kind) => parts.push((name.clone(), Some((class, kind)))),
            None => report.skipped.push(SkippedComponent { name: name.clone(), class }),
        }
    }
    // The parts ril-pipe loads first, in loading order; then the rest as listed.
    parts.sort_by_key(|(name, _)| PIPELINE_PARTS.iter().position(|p| p == name).unwrap_or(PIPELINE_PARTS.len()));
    for part in PIPELINE_PARTS {
        if !parts.iter().any(|(name, _)| name == part) {
            report.problems.push(format!(
                "model_index.json has no `{part}`: ril-pipe needs {}",
                PIPELINE_PARTS.join(", ")
            ));
        }
    }
    inspect_parts(dir, parts, report);
}

/// Inspects each named subfolder (with the class `model_index.json` gives it), then checks
/// that the components fit together.
fn inspect_parts(dir: &Path, parts: Vec<(String, Option<(String, ComponentKind)>)>, report: &mut InspectReport) {
    for (name, class) in parts {
        let folder = dir.join(&name);
        if !folder.is_dir() {
            let what = class.as_ref().map(|(c, _)| format!(" ({c})")).unwrap_or_default();
            let r = ComponentReport::new(Some(name.clone()), &folder).fail(format!("no `{name}/` folder{what}"));
            report.components.push(r);
            continue;
        }
        let mut r = inspect_component(Some(name.clone()), &folder, None);
        if let (Some((class, expected)), Some(found)) = (&class, r.kind) {
            if !expected.same_family(found) {
                r.problems.push(format!("model_index.json says {class}, the folder holds a {}", found.describe()));
                r = r.finish();
            } else {
                r.recognised_by.push(format!("model_index.json: {class}"));
            }
        }
        report.components.push(r);
    }
    report.problems.extend(cross_checks(&report.components));
}

/// Problems between components: the UNet's channels against the VAE's latents, its
/// cross-attention width against the text encoder's, the tokenizer's ids against the text
/// encoder's vocabulary.
fn cross_checks(components: &[ComponentReport]) -> Vec<String> {
    let find = |kind: ComponentKind| components.iter().find(|c| c.kind == Some(kind));
    let unet = find(ComponentKind::Unet).and_then(|c| match &c.model_config {
        Some(ModelConfig::Unet(u)) => Some(u),
        _ => None,
    });
    let vae = find(ComponentKind::Vae).and_then(|c| match &c.model_config {
        Some(ModelConfig::Vae(v)) => Some(v),
        _ => None,
    });
    let text = find(ComponentKind::ClipTextEncoder).and_then(|c| match &c.model_config {
        Some(ModelConfig::Clip(ClipConfig { text: Some(t), .. })) => Some(t),
        _ => None,
    });
    let tokenizer = find(ComponentKind::Tokenizer).and_then(|c| c.tokenizer_vocab);
    let mut problems = Vec::new();
    if let (Some(u), Some(v)) = (unet, vae) {
        if u.in_channels != v.latent_channels || u.out_channels != v.latent_channels {
            problems.push(format!(
                "the UNet takes {} and gives {} channels, the VAE's latents have {} (latent_channels)",
                u.in_channels, u.out_channels, v.latent_channels
            ));
        }
    }
    if let (Some(u), Some(t)) = (unet, text) {
        if u.cross_attention_dim != t.transformer.width {
            problems.push(format!(
                "the UNet's cross_attention_dim is {}, the text encoder's hidden states are {} wide (hidden_size)",
                u.cross_attention_dim, t.transformer.width
            ));
        }
    }
    if let (Some(vocab), Some(t)) = (tokenizer, text) {
        if vocab as i64 > t.vocab_size {
            problems.push(format!(
                "the tokenizer has {vocab} tokens, the text encoder's vocab_size is {}: some ids would be out of range",
                t.vocab_size
            ));
        }
    }
    problems
}

/// Inspects one component: a folder, a weights file, or a config / tokenizer file.
pub fn inspect_component(name: Option<String>, path: &Path, explicit_config: Option<&Path>) -> ComponentReport {
    let mut r = ComponentReport::new(name, path);
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if path.is_file() && file_name.ends_with(".txt.gz") {
        return inspect_tokenizer(r, path, ClipTokenizer::from_bpe_gz(path));
    }
    if path.is_dir() && is_tokenizer_dir(path) && explicit_config.is_none() {
        return inspect_tokenizer(r, path, ClipTokenizer::from_hf_folder(path));
    }
    let dir = component::config_dir(path).to_path_buf();
    let scheduler_file = if path.is_dir() { dir.join("scheduler_config.json") } else { path.to_path_buf() };
    let is_config_file = path.is_file() && file_name.ends_with(".json") && !file_name.ends_with(".index.json");
    let scheduler_dir = path.is_dir() && explicit_config.is_none() && scheduler_file.is_file() && component::find_config(&dir).is_none();
    if scheduler_dir || is_config_file {
        match component::read_json(&scheduler_file).map(|j| component::config_kind(&j)) {
            Ok(Ok((ComponentKind::Scheduler, by))) => return inspect_scheduler(r, &scheduler_file, by),
            Ok(_) if is_config_file => {
                // A model config given as the path: inspect its folder with it.
                return inspect_component(r.name.take(), &dir, Some(path));
            }
            Ok(_) => {}
            Err(e) => return r.fail(e.to_string()),
        }
    }

    // The config: given, or beside the weights.
    let config_path = explicit_config.map(Path::to_path_buf).or_else(|| component::find_config(&dir));
    let mut config_kind = None;
    if let Some(cp) = &config_path {
        r.config_file = Some(cp.clone());
        match component::read_json(cp).map(|j| component::config_kind(&j)) {
            Ok(Ok((kind, by))) => {
                config_kind = Some(kind);
                r.recognised_by.push(format!("{}: {by}", file_label(cp)));
            }
            Ok(Err(reason)) => r.problems.push(format!("{}: {reason}", cp.display())),
            Err(e) => r.problems.push(e.to_string()),
        }
    }

    // The weights.
    let weights_path = if path.is_dir() { dir.clone() } else { path.to_path_buf() };
    let (file, infos) = match read_tensor_infos(&weights_path) {
        Ok(found) => found,
        Err(e) => {
            r.kind = config_kind;
            return r.fail(e.to_string());
        }
    };
    r.weights = Some(summarise(file, &infos));
    let names: Vec<&str> = infos.keys().map(String::as_str).collect();
    let tensor_kind = match recognise_tensors(&names) {
        Ok((kind, by)) => {
            r.recognised_by.push(by.to_string());
            Some(kind)
        }
        Err(reason) => {
            if config_kind.is_none() {
                return r.fail(reason);
            }
            r.notes.push(reason);
            None
        }
    };
    if let (Some(c), Some(t)) = (config_kind, tensor_kind) {
        if !c.same_family(t) {
            r.problems.push(format!("the config is for: {}; the tensors are those of: {}", c.describe(), t.describe()));
        }
    }
    let Some(kind) = config_kind.or(tensor_kind) else {
        return r.finish();
    };
    r.kind = Some(kind);

    let model_config = match (&config_path, config_kind) {
        (Some(cp), Some(kind)) => component::read_model_config(kind, cp),
        (Some(_), None) => return r.finish(),
        (None, _) => match kind {
            ComponentKind::InceptionFid => Ok(ModelConfig::Inception),
            ComponentKind::AestheticHead => {
                let shapes = infos.iter().map(|(k, v)| (k.clone(), v.shape.clone())).collect();
                r.notes.push("widths read off the tensor shapes".to_string());
                match component::infer_aesthetic_config(&shapes) {
                    Some(cfg) => cfg.validate().map(|_| ModelConfig::Aesthetic(cfg)).map_err(Into::into),
                    None => return r.fail("cannot read the head's widths off its tensors".to_string()),
                }
            }
            ComponentKind::OpenClip => {
                return r.fail(
                    "an open_clip checkpoint has no config of its own: pass its model config with --config FILE \
                     (open_clip's model_configs/<name>.json, e.g. ViT-H-14.json)"
                        .to_string(),
                )
            }
            _ => {
                return r.fail(format!(
                    "no config beside the weights (looked for {}): pass one with --config FILE",
                    component::CONFIG_FILES.join(", ")
                ))
            }
        },
    };
    let model_config = match model_config {
        Ok(c) => c,
        Err(e) => return r.fail(e.to_string()),
    };
    if config_kind.is_some() {
        // The config's towers decide the kind (e.g. a CLIP config with both towers).
        r.kind = Some(model_config.kind());
    }
    r.config = config_summary(&model_config);
    let expected = match component::model_variables(&model_config) {
        Ok(v) => v,
        Err(e) => return r.fail(e.to_string()),
    };
    let (view, set_aside) = component::loader_view(&model_config, infos.clone());
    if view.keys().any(|k| !infos.contains_key(k)) {
        r.notes.push(match &model_config {
            ModelConfig::Vae(_) => "old mid-block attention names (query/key/value/proj_attn), renamed as diffusers does".to_string(),
            _ => "names without the tower prefix (transformers 5), prefixed as transformers does".to_string(),
        });
    }
    let mut check = check_tensors(&expected, &view, model_config.extra_tensors());
    check.set_aside = set_aside;
    if !check.unexpected.is_empty() && check.unexpected_ignored {
        r.notes.push(format!("{} tensors the model does not use; ril-pipe's CLIP loader ignores them", check.unexpected.len()));
    }
    r.check = Some(check);
    r.model_config = Some(model_config);
    r.finish()
}

fn file_label(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| path.display().to_string())
}

fn inspect_tokenizer(
    mut r: ComponentReport,
    path: &Path,
    loaded: Result<ClipTokenizer, super::tokenizer::TokenizerError>,
) -> ComponentReport {
    r.kind = Some(ComponentKind::Tokenizer);
    r.recognised_by.push(if path.is_dir() { "vocab.json and merges.txt".to_string() } else { "CLIP BPE merges (.txt.gz)".to_string() });
    let tokenizer = match loaded {
        Ok(t) => t,
        Err(e) => return r.fail(e.to_string()),
    };
    r.config.insert("vocab_size".into(), json!(tokenizer.vocab_size()));
    r.config.insert("start_token".into(), json!(tokenizer.sot()));
    r.config.insert("end_token".into(), json!(tokenizer.eot()));
    let tokenizer_config = path.join("tokenizer_config.json");
    if path.is_dir() && tokenizer_config.is_file() {
        match component::read_json(&tokenizer_config) {
            Ok(j) => {
                if let Some(n) = j.get("model_max_length") {
                    r.config.insert("model_max_length".into(), n.clone());
                }
            }
            Err(e) => r.problems.push(e.to_string()),
        }
    }
    r.tokenizer_vocab = Some(tokenizer.vocab_size());
    r.finish()
}

fn inspect_scheduler(mut r: ComponentReport, file: &Path, by: String) -> ComponentReport {
    r.kind = Some(ComponentKind::Scheduler);
    r.config_file = Some(file.to_path_buf());
    r.recognised_by.push(format!("{}: {by}", file_label(file)));
    let class = component::read_json(file).ok().and_then(|j| j.get("_class_name").and_then(Value::as_str).map(str::to_string));
    let cfg = match DdimConfig::from_json_file(file) {
        Ok(c) => c,
        Err(e) => return r.fail(e.to_string()),
    };
    if let Some(class) = class.filter(|c| c != "DDIMScheduler") {
        r.notes.push(format!("written for {class}: ril-pipe samples with DDIM on this noise schedule"));
    }
    let beta_schedule = match cfg.beta_schedule {
        BetaSchedule::Linear => "linear",
        BetaSchedule::ScaledLinear => "scaled_linear",
        BetaSchedule::SquaredcosCapV2 => "squaredcos_cap_v2",
    };
    let prediction_type = match cfg.prediction_type {
        PredictionType::Epsilon => "epsilon",
        PredictionType::Sample => "sample",
        PredictionType::VPrediction => "v_prediction",
    };
    let spacing = match cfg.timestep_spacing {
        TimestepSpacing::Leading => "leading",
        TimestepSpacing::Trailing => "trailing",
        TimestepSpacing::Linspace => "linspace",
    };
    let c = &mut r.config;
    c.insert("num_train_timesteps".into(), json!(cfg.num_train_timesteps));
    c.insert("beta_schedule".into(), json!(beta_schedule));
    c.insert("beta_start".into(), json!(cfg.beta_start));
    c.insert("beta_end".into(), json!(cfg.beta_end));
    c.insert("prediction_type".into(), json!(prediction_type));
    c.insert("timestep_spacing".into(), json!(spacing));
    c.insert("steps_offset".into(), json!(cfg.steps_offset));
    c.insert("set_alpha_to_one".into(), json!(cfg.set_alpha_to_one));
    c.insert("clip_sample".into(), json!(cfg.clip_sample));
    r.finish()
}

/// The config values worth seeing at a glance.
pub fn config_summary(config: &ModelConfig) -> Map<String, Value> {
    let mut m = Map::new();
    let mut put = |k: &str, v: Value| {
        m.insert(k.to_string(), v);
    };
    match config {
        ModelConfig::Unet(c) => {
            put("in_channels", json!(c.in_channels));
            put("out_channels", json!(c.out_channels));
            put("block_out_channels", json!(c.block_out_channels));
            put("down_block_types", json!(c.down_block_types));
            put("up_block_types", json!(c.up_block_types));
            put("layers_per_block", json!(c.layers_per_block));
            put("attention_head_dim", json!(c.attention_head_dim));
            put("transformer_layers_per_block", json!(c.transformer_layers_per_block));
            put("cross_attention_dim", json!(c.cross_attention_dim));
            put("use_linear_projection", json!(c.use_linear_projection));
            put("norm_num_groups", json!(c.norm_num_groups));
            put("sample_size", json!(c.sample_size));
        }
        ModelConfig::Vae(c) => {
            put("in_channels", json!(c.in_channels));
            put("block_out_channels", json!(c.block_out_channels));
            put("layers_per_block", json!(c.layers_per_block));
            put("latent_channels", json!(c.latent_channels));
            put("norm_num_groups", json!(c.norm_num_groups));
            put("scaling_factor", json!(c.scaling_factor));
            put("mid_block_add_attention", json!(c.mid_block_add_attention));
            put("use_quant_conv", json!(c.use_quant_conv));
            put("sample_size", c.sample_size.clone().unwrap_or(Value::Null));
        }
        ModelConfig::Clip(c) => {
            put("layout", json!(if c.layout == Layout::OpenClip { "open_clip" } else { "transformers" }));
            if let Some(t) = &c.text {
                let tr = &t.transformer;
                let pooling = match t.pooling {
                    TextPooling::ArgmaxId => "argmax id".to_string(),
                    TextPooling::FirstOf(id) => format!("first id {id}"),
                };
                put(
                    "text",
                    json!({"width": tr.width, "layers": tr.layers, "heads": tr.heads, "mlp_width": tr.mlp_width,
                           "activation": format!("{:?}", tr.activation), "vocab_size": t.vocab_size,
                           "context_length": t.context_length, "pooling": pooling, "projection_dim": t.projection_dim}),
                );
            }
            if let Some(v) = &c.vision {
                let tr = &v.transformer;
                put(
                    "vision",
                    json!({"width": tr.width, "layers": tr.layers, "heads": tr.heads, "mlp_width": tr.mlp_width,
                           "activation": format!("{:?}", tr.activation), "image_size": v.image_size,
                           "patch_size": v.patch_size, "projection_dim": v.projection_dim}),
                );
            }
        }
        ModelConfig::Aesthetic(c) => put("dims", json!(c.dims)),
        ModelConfig::Inception => {
            put("features", json!(super::inception::InceptionV3::FEATURES));
            put("input_size", json!(super::inception::InceptionV3::INPUT_SIZE));
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(dtype: &str, shape: &[i64]) -> TensorInfo {
        TensorInfo { dtype: dtype.to_string(), shape: shape.to_vec() }
    }

    #[test]
    fn check_names_every_kind_of_problem() {
        let expected: BTreeMap<String, Vec<i64>> =
            [("a.weight", vec![4, 2]), ("a.bias", vec![4]), ("b.weight", vec![3, 3]), ("c.weight", vec![2])]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
        let found: BTreeMap<String, TensorInfo> = [
            ("a.weight", info("F16", &[4, 2])),
            ("a.bias", info("F32", &[5])),
            ("c.weight", info("I64", &[2])),
            ("x.weight", info("F32", &[1])),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let check = check_tensors(&expected, &found, Extra::Reject);
        assert_eq!(check.expected, 4);
        assert_eq!(check.matched, 1);
        assert_eq!(check.missing, [NamedShape { name: "b.weight".into(), shape: vec![3, 3] }]);
        assert_eq!(check.unexpected, [NamedShape { name: "x.weight".into(), shape: vec![1] }]);
        assert_eq!(check.wrong_shape, [ShapeMismatch { name: "a.bias".into(), found: vec![5], expected: vec![4] }]);
        assert_eq!(check.wrong_dtype, [DtypeMismatch { name: "c.weight".into(), dtype: "I64".into() }]);
        assert!(!check.is_clean());

        let clean: BTreeMap<String, TensorInfo> = expected.iter().map(|(k, v)| (k.clone(), info("BF16", v))).collect();
        assert!(check_tensors(&expected, &clean, Extra::Reject).is_clean());
        let mut extra = clean.clone();
        extra.insert("logit_scale".into(), info("F32", &[]));
        assert!(!check_tensors(&expected, &extra, Extra::Reject).is_clean());
        assert!(check_tensors(&expected, &extra, Extra::Ignore).is_clean());
    }

    #[test]
    fn tensor_names_tell_the_model_family() {
        let kind = |names: &[&str]| recognise_tensors(names).map(|(k, _)| k);
        assert_eq!(kind(&["conv_in.weight", "time_embedding.linear_1.weight", "down_blocks.0.resnets.0.conv1.weight"]), Ok(ComponentKind::Unet));
        assert_eq!(kind(&["encoder.down_blocks.0.resnets.0.conv1.weight", "decoder.up_blocks.0.resnets.0.conv1.weight"]), Ok(ComponentKind::Vae));
        assert_eq!(kind(&["text_model.embeddings.token_embedding.weight"]), Ok(ComponentKind::ClipTextEncoder));
        assert_eq!(kind(&["embeddings.patch_embedding.weight", "post_layernorm.weight"]), Ok(ComponentKind::ClipVisionEncoder));
        assert_eq!(kind(&["text_model.final_layer_norm.weight", "vision_model.pre_layrnorm.weight"]), Ok(ComponentKind::ClipModel));
        assert_eq!(kind(&["token_embedding.weight", "visual.conv1.weight", "logit_scale"]), Ok(ComponentKind::OpenClip));
        assert_eq!(kind(&["layers.0.weight", "layers.0.bias", "layers.7.weight"]), Ok(ComponentKind::AestheticHead));
        assert_eq!(kind(&["Conv2d_1a_3x3.conv.weight", "fc.weight"]), Ok(ComponentKind::InceptionFid));
        assert!(kind(&["model.diffusion_model.input_blocks.0.0.weight"]).unwrap_err().contains("from_single_file"));
        assert!(kind(&["sample", "out"]).unwrap_err().contains("first: sample, out"));
        assert!(kind(&[]).unwrap_err().contains("no tensors"));
    }
}
