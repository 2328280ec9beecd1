//! One model component from its files: the config that describes it, the model built from
//! that config, its weights loaded under the loaders' own name rules, and one forward pass on
//! named input tensors (`ril-pipe model run`, so a user can compare with a PyTorch run).
//!
//! [`crate::models::inspect`] uses the same configs, builders and name rules to check a
//! checkpoint without running it.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Serialize;
use tch::nn::{self, VarStore};
use tch::{Device, Kind, Tensor};

use super::aesthetic::{AestheticConfig, AestheticError, AestheticHead};
use super::clip::{self, Clip, ClipConfig, ClipError, Layout, OpenClipModelConfig};
use super::inception::{InceptionError, InceptionV3};
use super::unet::{UNet2DConditionConfig, UNet2DConditionModel, UnetError};
use super::vae::{self, AutoencoderKL, AutoencoderKLConfig, VaeError};
use super::lora::LoraGroup;
use super::weights::{self, Extra, TensorMap, WeightsError};

#[derive(Debug, thiserror::Error)]
pub enum ComponentError {
    #[error("{path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("{path}: no config file beside the weights (looked for {looked_for}); pass one with --config FILE")]
    NoConfig { path: PathBuf, looked_for: String },
    #[error("{0}")]
    WrongComponent(String),
    #[error(transparent)]
    Unet(#[from] UnetError),
    #[error(transparent)]
    Vae(#[from] VaeError),
    #[error(transparent)]
    Clip(#[from] ClipError),
    #[error(transparent)]
    Aesthetic(#[from] AestheticError),
    #[error(transparent)]
    Inception(#[from] InceptionError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("the inputs have no tensor `{name}` ({what}); they hold: {available}")]
    MissingInput { name: String, what: String, available: String },
    #[error("input `{name}` has shape {shape:?} and dtype {dtype}: {expected}")]
    BadInput { name: String, shape: Vec<i64>, dtype: String, expected: String },
    #[error("{path}: cannot read the inputs: {reason}")]
    Inputs { path: PathBuf, reason: String },
    #[error("{path}: cannot write the outputs: {reason}")]
    Write { path: PathBuf, reason: String },
}

/// What a file or folder holds, as `model inspect` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ComponentKind {
    Unet,
    Vae,
    ClipTextEncoder,
    ClipVisionEncoder,
    ClipModel,
    OpenClip,
    AestheticHead,
    InceptionFid,
    Scheduler,
    Tokenizer,
}

impl ComponentKind {
    pub fn describe(self) -> &'static str {
        match self {
            ComponentKind::Unet => "UNet2DConditionModel (diffusers)",
            ComponentKind::Vae => "AutoencoderKL (diffusers)",
            ComponentKind::ClipTextEncoder => "CLIP text encoder (transformers)",
            ComponentKind::ClipVisionEncoder => "CLIP vision encoder (transformers)",
            ComponentKind::ClipModel => "CLIPModel (transformers)",
            ComponentKind::OpenClip => "CLIP (open_clip)",
            ComponentKind::AestheticHead => "LAION aesthetic head",
            ComponentKind::InceptionFid => "Inception v3 (pytorch-fid)",
            ComponentKind::Scheduler => "scheduler config (diffusers)",
            ComponentKind::Tokenizer => "CLIP tokenizer",
        }
    }

    /// Whether two kinds share checkpoint names: a transformers CLIP config of one tower with
    /// a checkpoint of both is a tower mismatch, which the tensor check names in detail.
    pub fn same_family(self, other: ComponentKind) -> bool {
        let transformers_clip =
            |k| matches!(k, ComponentKind::ClipTextEncoder | ComponentKind::ClipVisionEncoder | ComponentKind::ClipModel);
        self == other || (transformers_clip(self) && transformers_clip(other))
    }
}

/// The config of a model component.
// One or two live at a time: boxing the large variants would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum ModelConfig {
    Unet(UNet2DConditionConfig),
    Vae(AutoencoderKLConfig),
    Clip(ClipConfig),
    Aesthetic(AestheticConfig),
    /// pytorch-fid's network has no config.
    Inception,
}

impl ModelConfig {
    pub fn kind(&self) -> ComponentKind {
        match self {
            ModelConfig::Unet(_) => ComponentKind::Unet,
            ModelConfig::Vae(_) => ComponentKind::Vae,
            ModelConfig::Clip(c) => match (c.layout, &c.text, &c.vision) {
                (Layout::OpenClip, _, _) => ComponentKind::OpenClip,
                (Layout::Transformers, Some(_), Some(_)) => ComponentKind::ClipModel,
                (Layout::Transformers, None, Some(_)) => ComponentKind::ClipVisionEncoder,
                (Layout::Transformers, _, None) => ComponentKind::ClipTextEncoder,
            },
            ModelConfig::Aesthetic(_) => ComponentKind::AestheticHead,
            ModelConfig::Inception => ComponentKind::InceptionFid,
        }
    }

    /// Whether checkpoint tensors the model lacks are an error when loading. ril-pipe's CLIP
    /// loaders ignore them (full CLIP checkpoints feed single towers); the others reject them.
    pub fn extra_tensors(&self) -> Extra {
        match self {
            ModelConfig::Clip(_) => Extra::Ignore,
            _ => Extra::Reject,
        }
    }
}

/// Config files looked for beside a checkpoint, in order.
pub const CONFIG_FILES: [&str; 2] = ["config.json", "open_clip_config.json"];

/// The folder whose config files describe `weights` (the folder itself, or a file's folder).
pub fn config_dir(weights: &Path) -> &Path {
    if weights.is_dir() {
        weights
    } else {
        weights.parent().unwrap_or(Path::new("."))
    }
}

/// The first of [`CONFIG_FILES`] in `dir`.
pub fn find_config(dir: &Path) -> Option<PathBuf> {
    CONFIG_FILES.iter().map(|f| dir.join(f)).find(|p| p.is_file())
}

pub fn read_json(path: &Path) -> Result<serde_json::Value, ComponentError> {
    let err = |reason: String| ComponentError::Config { path: path.to_path_buf(), reason };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| err(format!("not JSON: {e}")))
}

/// What a config JSON describes, and the field that says so: diffusers' `_class_name`,
/// transformers' `model_type`, an open_clip model config (`embed_dim` with `vision_cfg` and
/// `text_cfg`, possibly under `model_cfg` as on the Hugging Face hub), or an aesthetic head's
/// `dims`.
pub fn config_kind(json: &serde_json::Value) -> Result<(ComponentKind, String), String> {
    let field = |name: &str| json.get(name).and_then(|v| v.as_str());
    if let Some(class) = field("_class_name") {
        return match class {
            "UNet2DConditionModel" => Ok((ComponentKind::Unet, format!("`_class_name` {class}"))),
            "AutoencoderKL" => Ok((ComponentKind::Vae, format!("`_class_name` {class}"))),
            c if c.ends_with("Scheduler") => Ok((ComponentKind::Scheduler, format!("`_class_name` {class}"))),
            other => Err(format!("`_class_name` {other} is not a model ril-pipe has")),
        };
    }
    if let Some(model_type) = field("model_type") {
        return match model_type {
            "clip" => Ok((ComponentKind::ClipModel, "`model_type` clip".to_string())),
            "clip_text_model" => Ok((ComponentKind::ClipTextEncoder, "`model_type` clip_text_model".to_string())),
            "clip_vision_model" => Ok((ComponentKind::ClipVisionEncoder, "`model_type` clip_vision_model".to_string())),
            other => Err(format!("`model_type` {other} is not a model ril-pipe has")),
        };
    }
    let open_clip = json.get("model_cfg").unwrap_or(json);
    if ["embed_dim", "vision_cfg", "text_cfg"].iter().all(|k| open_clip.get(k).is_some()) {
        return Ok((ComponentKind::OpenClip, "open_clip model config (`embed_dim`, `vision_cfg`, `text_cfg`)".to_string()));
    }
    if json.get("dims").is_some() {
        return Ok((ComponentKind::AestheticHead, "`dims` (aesthetic head widths)".to_string()));
    }
    Err("not a config ril-pipe knows (no `_class_name`, `model_type`, open_clip `embed_dim`/`vision_cfg`/`text_cfg` or `dims`)".to_string())
}

/// Reads the config of a model of `kind` from `path`, validated.
pub fn read_model_config(kind: ComponentKind, path: &Path) -> Result<ModelConfig, ComponentError> {
    let err = |reason: String| ComponentError::Config { path: path.to_path_buf(), reason };
    match kind {
        ComponentKind::Unet => Ok(ModelConfig::Unet(UNet2DConditionConfig::from_file(path)?)),
        ComponentKind::Vae => Ok(ModelConfig::Vae(AutoencoderKLConfig::from_file(path)?)),
        ComponentKind::ClipTextEncoder | ComponentKind::ClipVisionEncoder | ComponentKind::ClipModel => {
            Ok(ModelConfig::Clip(ClipConfig::from_transformers_json(path)?))
        }
        ComponentKind::OpenClip => {
            let json = read_json(path)?;
            let model = json.get("model_cfg").cloned().unwrap_or(json);
            let cfg: OpenClipModelConfig = serde_json::from_value(model).map_err(|e| err(e.to_string()))?;
            Ok(ModelConfig::Clip(cfg.to_clip_config()?))
        }
        ComponentKind::AestheticHead => {
            let cfg: AestheticConfig = serde_json::from_value(read_json(path)?).map_err(|e| err(e.to_string()))?;
            cfg.validate()?;
            Ok(ModelConfig::Aesthetic(cfg))
        }
        ComponentKind::InceptionFid => Ok(ModelConfig::Inception),
        ComponentKind::Scheduler | ComponentKind::Tokenizer => {
            Err(err(format!("describes a {}, not a model", kind.describe())))
        }
    }
}

/// The widths of a LAION-style head from its tensors' shapes: `layers.{i}.weight` is
/// `[out, in]`, in order of `i`. `None` when the names are not all `layers.{i}.{weight,bias}`.
pub fn infer_aesthetic_config(shapes: &BTreeMap<String, Vec<i64>>) -> Option<AestheticConfig> {
    let mut layers: Vec<(usize, &Vec<i64>)> = Vec::new();
    for (name, shape) in shapes {
        let (index, param) = name.strip_prefix("layers.")?.split_once('.')?;
        let index: usize = index.parse().ok()?;
        match param {
            "weight" if shape.len() == 2 => layers.push((index, shape)),
            "bias" => {}
            _ => return None,
        }
    }
    layers.sort_by_key(|(i, _)| *i);
    let first = layers.first()?;
    let mut dims = vec![first.1[1]];
    dims.extend(layers.iter().map(|(_, s)| s[0]));
    Some(AestheticConfig { dims })
}

/// A built model of any component kind.
#[allow(clippy::large_enum_variant)]
pub enum Model {
    Unet(UNet2DConditionModel),
    Vae(AutoencoderKL),
    Clip(Clip),
    Aesthetic(AestheticHead),
    Inception(InceptionV3),
}

/// Builds the model of `config` with fresh variables under `root`, with the upstream names; a
/// UNet with the LoRA adapters of `lora`, if given (other components take none).
pub fn build(root: &nn::Path, config: &ModelConfig, lora: Option<&LoraGroup>) -> Result<Model, ComponentError> {
    if lora.is_some() && !matches!(config, ModelConfig::Unet(_)) {
        return Err(ComponentError::WrongComponent(format!("LoRA adapters apply to a UNet, not to a {}", config.kind().describe())));
    }
    Ok(match config {
        ModelConfig::Unet(c) => Model::Unet(UNet2DConditionModel::new(root.clone(), c, lora)?),
        ModelConfig::Vae(c) => Model::Vae(AutoencoderKL::new(root.clone(), c)?),
        ModelConfig::Clip(c) => Model::Clip(Clip::new(root, c)),
        ModelConfig::Aesthetic(c) => Model::Aesthetic(AestheticHead::new(root, c)?),
        ModelConfig::Inception => Model::Inception(InceptionV3::new(root)),
    })
}

/// The variables (name and shape) of the model of `config`, built on the CPU and dropped.
pub fn model_variables(config: &ModelConfig) -> Result<BTreeMap<String, Vec<i64>>, ComponentError> {
    let mut vs = VarStore::new(Device::Cpu);
    // Only the shapes are wanted: half precision halves the memory and the initialisation time.
    vs.set_kind(Kind::Half);
    tch::no_grad(|| build(&vs.root(), config, None))?;
    Ok(vs.variables().into_iter().map(|(name, v)| (name, v.size())).collect())
}

/// The checkpoint's tensors as the component's loader sees them: old VAE attention names
/// renamed, transformers 5's bare CLIP tower names prefixed, and tensors that are not weights
/// (pytorch-fid's classifier and batch-norm counters, transformers' `position_ids` buffer) set
/// aside. Returns the tensors for the model and the names set aside.
pub fn loader_view<T>(config: &ModelConfig, tensors: BTreeMap<String, T>) -> (BTreeMap<String, T>, Vec<String>) {
    let tensors = match config {
        ModelConfig::Vae(_) => vae::rename_legacy_attention(tensors),
        ModelConfig::Clip(c) => clip::canonical_names(c, tensors),
        _ => tensors,
    };
    let not_weight = |name: &str| match config {
        ModelConfig::Inception => InceptionV3::is_unused_tensor(name),
        ModelConfig::Clip(c) => c.layout == Layout::Transformers && name.ends_with("embeddings.position_ids"),
        _ => false,
    };
    let (aside, kept): (BTreeMap<String, T>, BTreeMap<String, T>) = tensors.into_iter().partition(|(k, _)| not_weight(k));
    (kept, aside.into_keys().collect())
}

/// A model with its weights, frozen, on one device.
pub struct LoadedComponent {
    pub config: ModelConfig,
    pub model: Model,
    pub device: Device,
    _vs: VarStore,
}

impl LoadedComponent {
    /// Builds the model of `config` on `device` (a UNet with the adapters of `lora`) and loads
    /// `weights` (a file or a component folder) with the loader's rules; a missing or
    /// mis-shaped tensor is an error naming it.
    pub fn load(config: ModelConfig, weights: &Path, device: Device, lora: Option<&LoraGroup>) -> Result<Self, ComponentError> {
        let vs = VarStore::new(device);
        let model = tch::no_grad(|| build(&vs.root(), &config, lora))?;
        let (tensors, _) = loader_view(&config, weights::load_weights(weights)?);
        weights::assign(&vs, &tensors, config.extra_tensors(), weights)?;
        for (_, mut v) in vs.variables() {
            let _ = v.requires_grad_(false);
        }
        Ok(Self { config, model, device, _vs: vs })
    }
}

/// The forward passes `model run` offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Unet,
    VaeEncode,
    VaeDecode,
    ClipText,
    ClipVision,
    Aesthetic,
    Inception,
}

impl Operation {
    pub const ALL: [Operation; 7] = [
        Operation::Unet,
        Operation::VaeEncode,
        Operation::VaeDecode,
        Operation::ClipText,
        Operation::ClipVision,
        Operation::Aesthetic,
        Operation::Inception,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Operation::Unet => "unet",
            Operation::VaeEncode => "vae-encode",
            Operation::VaeDecode => "vae-decode",
            Operation::ClipText => "clip-text",
            Operation::ClipVision => "clip-vision",
            Operation::Aesthetic => "aesthetic",
            Operation::Inception => "inception",
        }
    }

    /// The input tensors (name, meaning) and the output tensors, for help texts.
    pub fn signature(self) -> (&'static [(&'static str, &'static str)], &'static [&'static str]) {
        match self {
            Operation::Unet => (
                &[
                    ("sample", "noisy latents [B, C, h, w]"),
                    ("timestep", "timesteps [B] or one [] / [1] (also accepted as `timesteps`)"),
                    ("encoder_hidden_states", "text-encoder hidden states [B, L, D]"),
                ],
                &["sample"],
            ),
            Operation::VaeEncode => (&[("sample", "images [B, 3, H, W] in [-1, 1]")], &["mean", "logvar"]),
            Operation::VaeDecode => (&[("latents", "unscaled latents [B, C, h, w] (divide by scaling_factor first)")], &["sample"]),
            Operation::ClipText => {
                (&[("input_ids", "token ids [B, L], integers")], &["last_hidden_state", "pooler_output", "text_embeds"])
            }
            Operation::ClipVision => {
                (&[("pixel_values", "normalised images [B, 3, S, S]")], &["pooler_output", "image_embeds"])
            }
            Operation::Aesthetic => (&[("embeddings", "L2-normalised image embeddings [B, D]")], &["scores"]),
            Operation::Inception => (&[("images", "images [B, 3, H, W] in [0, 1]")], &["features"]),
        }
    }

    /// Whether a component of `kind` can do this.
    fn accepts(self, config: &ModelConfig) -> bool {
        match (self, config) {
            (Operation::Unet, ModelConfig::Unet(_)) => true,
            (Operation::VaeEncode | Operation::VaeDecode, ModelConfig::Vae(_)) => true,
            (Operation::ClipText, ModelConfig::Clip(c)) => c.text.is_some(),
            (Operation::ClipVision, ModelConfig::Clip(c)) => c.vision.is_some(),
            (Operation::Aesthetic, ModelConfig::Aesthetic(_)) => true,
            (Operation::Inception, ModelConfig::Inception) => true,
            _ => false,
        }
    }
}

impl FromStr for Operation {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Operation::ALL.into_iter().find(|o| o.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Operation::ALL.iter().map(|o| o.name()).collect();
            format!("unknown component `{s}` (one of {})", names.join(", "))
        })
    }
}

/// The config for running `op` with `weights`: `explicit` if given, else the config file beside
/// the weights; an aesthetic head's widths are read off its tensors, Inception has none.
pub fn config_for(op: Operation, weights: &Path, explicit: Option<&Path>) -> Result<ModelConfig, ComponentError> {
    let config = match (op, explicit) {
        (Operation::Inception, _) => ModelConfig::Inception,
        (Operation::Aesthetic, None) => {
            let shapes = weights::load_weights(weights)?.into_iter().map(|(k, v)| (k, v.size())).collect();
            let cfg = infer_aesthetic_config(&shapes).ok_or_else(|| {
                ComponentError::WrongComponent(format!(
                    "{}: not an aesthetic head (its tensors are not `layers.N.weight` / `layers.N.bias`)",
                    weights.display()
                ))
            })?;
            cfg.validate()?;
            ModelConfig::Aesthetic(cfg)
        }
        (_, explicit) => {
            let path = match explicit {
                Some(p) => p.to_path_buf(),
                None => find_config(config_dir(weights)).ok_or_else(|| ComponentError::NoConfig {
                    path: weights.to_path_buf(),
                    looked_for: CONFIG_FILES.join(", "),
                })?,
            };
            let (kind, _) = config_kind(&read_json(&path)?).map_err(|reason| ComponentError::Config { path: path.clone(), reason })?;
            read_model_config(kind, &path)?
        }
    };
    if !op.accepts(&config) {
        return Err(ComponentError::WrongComponent(format!(
            "`{}` cannot run a {}{}",
            op.name(),
            config.kind().describe(),
            match (op, &config) {
                (Operation::ClipText, ModelConfig::Clip(_)) => " without a text tower",
                (Operation::ClipVision, ModelConfig::Clip(_)) => " without a vision tower",
                _ => "",
            }
        )));
    }
    Ok(config)
}

fn dtype_name(kind: Kind) -> String {
    format!("{kind:?}")
}

fn bad_input(name: &str, t: &Tensor, expected: String) -> ComponentError {
    ComponentError::BadInput { name: name.to_string(), shape: t.size(), dtype: dtype_name(t.kind()), expected }
}

/// The input called one of `names` (the first one present), with the name it was found under.
fn input<'a>(inputs: &'a TensorMap, names: &[&'static str], what: &str) -> Result<(&'static str, &'a Tensor), ComponentError> {
    if let Some((name, t)) = names.iter().find_map(|n| inputs.get(*n).map(|t| (*n, t))) {
        return Ok((name, t));
    }
    let available: Vec<String> = inputs.iter().map(|(k, v)| format!("{k} {:?}", v.size())).collect();
    Err(ComponentError::MissingInput {
        name: names.join("` or `"),
        what: what.to_string(),
        available: if available.is_empty() { "nothing".to_string() } else { available.join(", ") },
    })
}

fn is_float(kind: Kind) -> bool {
    matches!(kind, Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16)
}

fn is_integer(kind: Kind) -> bool {
    matches!(kind, Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8)
}

/// A floating-point input of `rank` dimensions, all non-empty, as f32 on `device`.
fn float_input(name: &str, t: &Tensor, rank: usize, layout: &str, device: Device) -> Result<Tensor, ComponentError> {
    let size = t.size();
    if !is_float(t.kind()) || size.len() != rank || size.iter().any(|&d| d < 1) {
        return Err(bad_input(name, t, format!("expected a non-empty floating-point tensor {layout}")));
    }
    Ok(t.to_kind(Kind::Float).to_device(device))
}

/// The size after one `Downsample2D` (3x3 conv, stride 2) with this padding; `None` when the
/// input is smaller than the kernel.
fn downsampled(size: i64, padding: i64) -> Option<i64> {
    // padding 0 means diffusers' asymmetric pad of one on the right and bottom.
    let padded = if padding == 0 { size + 1 } else { size + 2 * padding };
    (padded >= 3).then(|| (padded - 3) / 2 + 1)
}

fn check_downsampling(name: &str, t: &Tensor, steps: usize, padding: i64) -> Result<(), ComponentError> {
    let size = t.size();
    for (axis, &start) in size[2..].iter().enumerate() {
        let mut s = start;
        for _ in 0..steps {
            s = downsampled(s, padding).ok_or_else(|| {
                bad_input(name, t, format!("{} {start} is too small for {steps} downsampling steps", ["height", "width"][axis]))
            })?;
        }
    }
    Ok(())
}

/// Runs `op` on `inputs`; returns the named outputs as f32 CPU tensors.
pub fn run(op: Operation, component: &LoadedComponent, inputs: &TensorMap) -> Result<Vec<(String, Tensor)>, ComponentError> {
    if !op.accepts(&component.config) {
        return Err(ComponentError::WrongComponent(format!("`{}` cannot run a {}", op.name(), component.config.kind().describe())));
    }
    let device = component.device;
    let outputs: Vec<(&str, Option<Tensor>)> = tch::no_grad(|| -> Result<_, ComponentError> {
        Ok(match (op, &component.model) {
            (Operation::Unet, Model::Unet(unet)) => {
                let cfg = unet.config();
                let (name, sample) = input(inputs, &["sample"], "noisy latents [B, C, h, w]")?;
                let layout = format!("[B, {}, h, w]", cfg.in_channels);
                let sample = float_input(name, sample, 4, &layout, device)?;
                if sample.size()[1] != cfg.in_channels {
                    return Err(bad_input(name, &sample, format!("expected {layout} (the UNet's in_channels)")));
                }
                let batch = sample.size()[0];
                let (name, timesteps) = input(inputs, &["timestep", "timesteps"], "timesteps [B]")?;
                if !(is_float(timesteps.kind()) || is_integer(timesteps.kind()))
                    || timesteps.size().len() > 1
                    || (timesteps.numel() != 1 && timesteps.numel() as i64 != batch)
                {
                    return Err(bad_input(name, timesteps, format!("expected numbers of shape [{batch}], [1] or []")));
                }
                let (name, context) = input(inputs, &["encoder_hidden_states"], "text-encoder hidden states [B, L, D]")?;
                let layout = format!("[{batch}, L, {}]", cfg.cross_attention_dim);
                let context = float_input(name, context, 3, &layout, device)?;
                let c = context.size();
                if c[0] != batch || c[2] != cfg.cross_attention_dim {
                    return Err(bad_input(name, &context, format!("expected {layout} (the sample's batch, the UNet's cross_attention_dim)")));
                }
                vec![("sample", Some(unet.forward(&sample, timesteps, &context)))]
            }
            (Operation::VaeEncode, Model::Vae(vae)) => {
                let cfg = vae.config();
                let (name, images) = input(inputs, &["sample"], "images [B, 3, H, W] in [-1, 1]")?;
                let layout = format!("[B, {}, H, W]", cfg.in_channels);
                let images = float_input(name, images, 4, &layout, device)?;
                if images.size()[1] != cfg.in_channels {
                    return Err(bad_input(name, &images, format!("expected {layout} (the VAE's in_channels)")));
                }
                check_downsampling(name, &images, cfg.block_out_channels.len() - 1, 0)?;
                let (mean, logvar) = vae.encode(&images);
                vec![("mean", Some(mean)), ("logvar", Some(logvar))]
            }
            (Operation::VaeDecode, Model::Vae(vae)) => {
                let cfg = vae.config();
                let (name, latents) = input(inputs, &["latents"], "unscaled latents [B, C, h, w]")?;
                let layout = format!("[B, {}, h, w]", cfg.latent_channels);
                let latents = float_input(name, latents, 4, &layout, device)?;
                if latents.size()[1] != cfg.latent_channels {
                    return Err(bad_input(name, &latents, format!("expected {layout} (the VAE's latent_channels)")));
                }
                vec![("sample", Some(vae.decode(&latents)))]
            }
            (Operation::ClipText, Model::Clip(clip)) => {
                let text = clip.text.as_ref().ok_or_else(|| ComponentError::WrongComponent("this CLIP has no text tower".into()))?;
                let (name, ids) = input(inputs, &["input_ids"], "token ids [B, L]")?;
                let cfg = text.config();
                let vocab = cfg.vocab_size;
                let size = ids.size();
                let layout = format!("expected integer token ids [B, L] with 1 <= L <= {} and ids in [0, {vocab})", cfg.context_length);
                if !is_integer(ids.kind()) || size.len() != 2 || size.iter().any(|&d| d < 1) || size[1] > cfg.context_length {
                    return Err(bad_input(name, ids, layout));
                }
                let ids64 = ids.to_kind(Kind::Int64);
                let (lo, hi) = (ids64.min().int64_value(&[]), ids64.max().int64_value(&[]));
                if lo < 0 || hi >= vocab {
                    return Err(bad_input(name, ids, format!("{layout} (found ids from {lo} to {hi})")));
                }
                let out = text.forward(&ids64.to_device(device))?;
                vec![
                    ("last_hidden_state", Some(out.last_hidden_state)),
                    ("pooler_output", Some(out.pooled)),
                    ("text_embeds", out.embeds),
                ]
            }
            (Operation::ClipVision, Model::Clip(clip)) => {
                let vision = clip.vision.as_ref().ok_or_else(|| ComponentError::WrongComponent("this CLIP has no vision tower".into()))?;
                let cfg = vision.config();
                let (name, pixels) = input(inputs, &["pixel_values"], "normalised images [B, 3, S, S]")?;
                let s = cfg.image_size;
                let layout = format!("[B, {}, {s}, {s}]", cfg.num_channels);
                let pixels = float_input(name, pixels, 4, &layout, device)?;
                if pixels.size()[1..] != [cfg.num_channels, s, s] {
                    return Err(bad_input(name, &pixels, format!("expected {layout} (the model's image size)")));
                }
                let out = vision.forward(&pixels)?;
                vec![("pooler_output", Some(out.pooled)), ("image_embeds", out.embeds)]
            }
            (Operation::Aesthetic, Model::Aesthetic(head)) => {
                let (name, embeddings) = input(inputs, &["embeddings"], "image embeddings [B, D]")?;
                let embeddings = float_input(name, embeddings, 2, "[B, D]", device)?;
                vec![("scores", Some(head.forward(&embeddings)?))]
            }
            (Operation::Inception, Model::Inception(net)) => {
                let (name, images) = input(inputs, &["images"], "images [B, 3, H, W] in [0, 1]")?;
                let images = float_input(name, images, 4, "[B, 3, H, W]", device)?;
                vec![("features", Some(net.features(&images)?))]
            }
            _ => return Err(ComponentError::WrongComponent(format!("`{}` cannot run this component", op.name()))),
        })
    })?;
    Ok(outputs
        .into_iter()
        .filter_map(|(name, t)| t.map(|t| (name.to_string(), t.to_device(Device::Cpu).to_kind(Kind::Float).contiguous())))
        .collect())
}

/// Reads the input tensors of a run from a safetensors file.
pub fn read_inputs(path: &Path) -> Result<TensorMap, ComponentError> {
    weights::read_safetensors(path).map_err(|e| match e {
        WeightsError::Read { reason, .. } => ComponentError::Inputs { path: path.to_path_buf(), reason },
        other => other.into(),
    })
}

/// Writes named tensors as one safetensors file.
pub fn write_outputs(path: &Path, outputs: &[(String, Tensor)]) -> Result<(), ComponentError> {
    Tensor::write_safetensors(outputs, path).map_err(|e| ComponentError::Write { path: path.to_path_buf(), reason: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn config_kinds_come_from_the_upstream_fields() {
        let kind = |v: serde_json::Value| config_kind(&v).map(|(k, _)| k);
        assert_eq!(kind(json!({"_class_name": "UNet2DConditionModel"})), Ok(ComponentKind::Unet));
        assert_eq!(kind(json!({"_class_name": "AutoencoderKL"})), Ok(ComponentKind::Vae));
        assert_eq!(kind(json!({"_class_name": "PNDMScheduler"})), Ok(ComponentKind::Scheduler));
        assert_eq!(kind(json!({"model_type": "clip_text_model"})), Ok(ComponentKind::ClipTextEncoder));
        assert_eq!(kind(json!({"model_type": "clip"})), Ok(ComponentKind::ClipModel));
        let oc = json!({"embed_dim": 8, "vision_cfg": {}, "text_cfg": {}});
        assert_eq!(kind(oc.clone()), Ok(ComponentKind::OpenClip));
        assert_eq!(kind(json!({"model_cfg": oc, "preprocess_cfg": {}})), Ok(ComponentKind::OpenClip));
        assert_eq!(kind(json!({"dims": [8, 1]})), Ok(ComponentKind::AestheticHead));
        assert!(kind(json!({"_class_name": "ControlNetModel"})).unwrap_err().contains("ControlNetModel"));
        assert!(kind(json!({"model_type": "t5"})).unwrap_err().contains("t5"));
        assert!(kind(json!({"hello": 1})).is_err());
    }

    #[test]
    fn aesthetic_widths_are_read_off_the_shapes() {
        let shapes: BTreeMap<String, Vec<i64>> = [
            ("layers.0.weight", vec![24, 32]),
            ("layers.0.bias", vec![24]),
            ("layers.2.weight", vec![8, 24]),
            ("layers.2.bias", vec![8]),
            ("layers.10.weight", vec![1, 8]),
            ("layers.10.bias", vec![1]),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        assert_eq!(infer_aesthetic_config(&shapes), Some(AestheticConfig { dims: vec![32, 24, 8, 1] }));
        let mut other = shapes.clone();
        other.insert("conv_in.weight".into(), vec![1]);
        assert_eq!(infer_aesthetic_config(&other), None);
    }

    #[test]
    fn downsampling_sizes_follow_the_convolution() {
        assert_eq!(downsampled(1, 0), None);
        assert_eq!(downsampled(2, 0), Some(1));
        assert_eq!(downsampled(16, 0), Some(8));
        assert_eq!(downsampled(7, 0), Some(3));
        assert_eq!(downsampled(1, 1), Some(1));
        assert_eq!(downsampled(9, 1), Some(5));
    }

    #[test]
    fn loader_view_sets_non_weights_aside() {
        let names = ["fc.weight", "Mixed_5b.branch1x1.bn.num_batches_tracked", "Conv2d_1a_3x3.conv.weight"];
        let map: BTreeMap<String, ()> = names.iter().map(|n| (n.to_string(), ())).collect();
        let (kept, aside) = loader_view(&ModelConfig::Inception, map);
        assert_eq!(kept.into_keys().collect::<Vec<_>>(), ["Conv2d_1a_3x3.conv.weight"]);
        assert_eq!(aside, ["Mixed_5b.branch1x1.bn.num_batches_tracked", "fc.weight"]);
    }
}
