//! Worlds: where a study's models come from. A world names the diffusion model (a diffusers
//! folder), the reward and metric models, and the prompt files. `tiny_world` reads the embedded
//! tiny world's manifest; `sd15_world` takes the paper-scale files one by one, so that a
//! pipeline without them fails validation with every missing file listed.
//!
//! Both write `model.json` (a [`ModelRecord`] with no adapters): the base model every fine-tune
//! chain starts from.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::exec::{Params, StageContext, StageError, StageKind};
use crate::pipeline::schema::{InputSpec, KindSchema, ParamSpec, ParamType};

use crate::rewards::clip_loader::{ClipFiles, ClipLayout};
use crate::rewards::compressibility::Reduction;

use super::fid_stats::FID_STATS_FILE;
use super::records::Task;

/// How FID features are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FidFeatures {
    /// pytorch-fid's Inception v3 pool features (paper scale).
    Inception,
    /// The CLIP score model's image embedding (tiny world).
    Clip,
}

/// `model.json`'s description of a world: absolute paths to everything the stages load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorldSpec {
    /// `tiny` or `sd15`.
    pub name: String,
    /// A diffusers folder: unet/, vae/, text_encoder/, tokenizer/, scheduler/.
    pub diffusion: PathBuf,
    /// Image side in pixels (SD1.5: 512).
    pub resolution: i64,
    /// CLIP whose image embedding the aesthetic head reads.
    pub aesthetic_clip: ClipFiles,
    /// The LAION-style MLP head (widths from its tensors).
    pub aesthetic_head: PathBuf,
    /// The human-preference model (HPSv2 at paper scale).
    pub hps: ClipFiles,
    /// CLIP of the CLIP score (and of FID in the tiny world).
    pub clip_score: ClipFiles,
    pub fid_features: FidFeatures,
    /// Inception weights (pt_inception-2015-12-05) for `fid_features: inception`.
    #[serde(default)]
    pub inception: Option<PathBuf>,
    /// FID reference: a `.safetensors` with `mu` and `sigma`, or a folder of images.
    pub fid_reference: PathBuf,
    pub train_prompts: PathBuf,
    pub test_prompts: PathBuf,
    /// JPEG quality of the compressibility reward.
    pub jpeg_quality: f64,
    /// Reduction of the compressibility reward over channels and pixels (Eq. 2: sum).
    #[serde(default)]
    pub compress_reduction: Reduction,
}

/// `model.json`: a diffusion model as stages pass it along.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRecord {
    pub world: WorldSpec,
    /// Tasks fine-tuned so far, in order.
    pub tasks: Vec<Task>,
    /// `base`, `finetune`, `soup` or `joint`.
    pub origin: String,
    /// The adapter group (a file of the same object), absent for the base model.
    pub adapters: Option<String>,
    /// LoRA target layer suffixes.
    pub lora_targets: Vec<String>,
}

pub const MODEL_FILE: &str = "model.json";
pub const ADAPTERS_FILE: &str = "adapters.safetensors";

impl ModelRecord {
    pub fn write(&self, dir: &Path) -> Result<(), StageError> {
        let bytes = serde_json::to_vec_pretty(self).map_err(StageError::failed)?;
        std::fs::write(dir.join(MODEL_FILE), bytes).map_err(|e| StageError::io("cannot write model.json", e))
    }

    /// The model of an input stage, with the path of its adapters.
    pub fn of_input(input: &crate::exec::InputObject) -> Result<(ModelRecord, Option<PathBuf>), StageError> {
        let record = Self::read(&input.file(MODEL_FILE)?, &format!("input `{}`", input.stage_id))?;
        let adapters = match &record.adapters {
            Some(name) => Some(input.file(name)?),
            None => None,
        };
        Ok((record, adapters))
    }

    /// The model of a finished stage's folder (a cache object), with the path of its adapters;
    /// `stage` names it in errors. A stage that makes no model (an evaluation) is refused.
    pub fn of_object(dir: &Path, stage: &str) -> Result<(ModelRecord, Option<PathBuf>), StageError> {
        let path = dir.join(MODEL_FILE);
        if !path.is_file() {
            return Err(StageError::Failed(format!("stage `{stage}` makes no model ({MODEL_FILE}): give a world, finetune, soup or joint stage")));
        }
        let record = Self::read(&path, &format!("stage `{stage}`"))?;
        let adapters = record.adapters.as_ref().map(|name| dir.join(name));
        Ok((record, adapters))
    }

    fn read(path: &Path, what: &str) -> Result<ModelRecord, StageError> {
        let bytes = std::fs::read(path).map_err(|e| StageError::io(format!("cannot read {}", path.display()), e))?;
        serde_json::from_slice(&bytes).map_err(|e| StageError::Failed(format!("{what}: {} is not a model record: {e}", path.display())))
    }
}

/// The manifest of the embedded tiny world (`tiny/weights/world.json`): paths relative to it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TinyManifest {
    diffusion: PathBuf,
    resolution: i64,
    aesthetic_clip: PathBuf,
    aesthetic_head: PathBuf,
    hps: PathBuf,
    clip_score: PathBuf,
    tokenizer: PathBuf,
    fid_reference: PathBuf,
    train_prompts: PathBuf,
    test_prompts: PathBuf,
    jpeg_quality: f64,
}

fn path_param(name: &'static str, doc: &'static str) -> ParamSpec {
    ParamSpec {
        name,
        ty: ParamType::Path,
        default: None,
        doc,
    }
}

fn lora_targets_param() -> ParamSpec {
    ParamSpec {
        name: "lora_targets",
        ty: ParamType::List(Box::new(ParamType::String)),
        default: Some(json!(["to_q", "to_k", "to_v", "to_out.0"])),
        doc: "suffixes of the layers the LoRA adapters wrap (AlignProp: the attention projections)",
    }
}

/// The `compress_reduction` parameter; `default` is the world's.
fn reduction_param(default: &'static str, doc: &'static str) -> ParamSpec {
    ParamSpec {
        name: "compress_reduction",
        ty: ParamType::Enum(vec!["sum", "mean"]),
        default: Some(json!(default)),
        doc,
    }
}

fn reduction_of(p: &serde_json::Map<String, serde_json::Value>) -> Result<Reduction, StageError> {
    let name = p.str_of("compress_reduction")?;
    Reduction::parse(name).ok_or_else(|| StageError::Failed(format!("compress_reduction `{name}`: expected sum or mean")))
}

fn lora_targets(ctx: &StageContext) -> Vec<String> {
    ctx.params()
        .get("lora_targets")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

fn check_exists(path: &Path, what: &str) -> Result<PathBuf, StageError> {
    path.canonicalize().map_err(|e| StageError::Failed(format!("{what}: {} ({e})", path.display())))
}

/// `tiny_world`: the embedded tiny world, from its manifest.
pub struct TinyWorld;

impl StageKind for TinyWorld {
    fn schema(&self) -> KindSchema {
        KindSchema {
            kind: "tiny_world",
            version: 1,
            doc: "the embedded tiny world (its models, rewards and prompts) as the base model of a study",
            uses_input_labels: false,
            params: vec![
                path_param("root", "the tiny world's folder with world.json (the repo's tiny/weights, or a pretrain pipeline's export)"),
                reduction_param("mean", "reduction of the compressibility reward's squared JPEG error over channels and pixels: mean (the tiny world's recipe was set with it; docs/tiny-world.md) or sum (Eq. 2)"),
                lora_targets_param(),
            ],
            inputs: Vec::new(),
        }
    }

    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let root = PathBuf::from(ctx.params().str_of("root")?);
        let world = WorldSpec { compress_reduction: reduction_of(ctx.params())?, ..tiny_world_spec(&root)? };
        // A shipped bundle lists its files' blake3 hashes: a damaged or edited file stops the
        // study here rather than skewing its numbers.
        if root.join(BUNDLE_MANIFEST).is_file() {
            let files = verify_bundle(&root).map_err(|e| StageError::Failed(format!("tiny world {}: {e} (regenerate it: docs/tiny-world.md, \"Regenerating the weights\")", root.display())))?;
            ctx.log(format!("tiny world from {}: {files} files match MANIFEST.txt", root.display()));
        } else {
            ctx.log(format!("tiny world from {}", root.display()));
        }
        base_record(world, lora_targets(ctx)).write(ctx.out_dir())
    }
}

/// The bundle's own manifest, in `b3sum` format (`b3sum --check MANIFEST.txt` verifies it).
pub const BUNDLE_MANIFEST: &str = "MANIFEST.txt";

/// Checks a bundle against its `MANIFEST.txt`: every listed file present with its hash.
pub fn verify_bundle(root: &Path) -> Result<usize, String> {
    let text = std::fs::read_to_string(root.join(BUNDLE_MANIFEST)).map_err(|e| format!("{}: {e}", root.join(BUNDLE_MANIFEST).display()))?;
    let mut count = 0;
    for line in text.lines() {
        let (hash, rel) = line.split_once("  ").ok_or_else(|| format!("malformed manifest line `{line}`"))?;
        let bytes = std::fs::read(root.join(rel)).map_err(|e| format!("{rel}: {e}"))?;
        if blake3::hash(&bytes).to_hex().as_str() != hash {
            return Err(format!("{rel}: content differs from the manifest"));
        }
        count += 1;
    }
    Ok(count)
}

/// The world a `tiny_world` stage with this `root` describes (its files must exist).
pub fn tiny_world_spec(root: &Path) -> Result<WorldSpec, StageError> {
    let manifest_path = root.join("world.json");
    let bytes = std::fs::read(&manifest_path).map_err(|e| StageError::io(format!("cannot read {}", manifest_path.display()), e))?;
    let m: TinyManifest = serde_json::from_slice(&bytes).map_err(|e| StageError::Failed(format!("{}: {e}", manifest_path.display())))?;
    let at = |p: &Path, what: &str| check_exists(&root.join(p), what);
    let tokenizer = at(&m.tokenizer, "tokenizer")?;
    let clip = |p: &Path, what: &str| -> Result<ClipFiles, StageError> {
        Ok(ClipFiles {
            layout: ClipLayout::Transformers,
            weights: at(p, what)?,
            config: None,
            tokenizer: tokenizer.clone(),
        })
    };
    let world = WorldSpec {
        name: "tiny".into(),
        diffusion: at(&m.diffusion, "diffusion model")?,
        resolution: m.resolution,
        aesthetic_clip: clip(&m.aesthetic_clip, "aesthetic CLIP")?,
        aesthetic_head: at(&m.aesthetic_head, "aesthetic head")?,
        hps: clip(&m.hps, "preference model")?,
        clip_score: clip(&m.clip_score, "CLIP-score model")?,
        fid_features: FidFeatures::Clip,
        inception: None,
        fid_reference: at(&m.fid_reference, "FID reference")?,
        train_prompts: at(&m.train_prompts, "training prompts")?,
        test_prompts: at(&m.test_prompts, "test prompts")?,
        jpeg_quality: m.jpeg_quality,
        compress_reduction: Reduction::Mean,
    };
    Ok(world)
}

fn base_record(world: WorldSpec, lora_targets: Vec<String>) -> ModelRecord {
    ModelRecord {
        world,
        tasks: Vec::new(),
        origin: "base".into(),
        adapters: None,
        lora_targets,
    }
}

/// `sd15_world`: the paper scale, every file given by the pipeline.
pub struct Sd15World;

impl StageKind for Sd15World {
    fn schema(&self) -> KindSchema {
        KindSchema {
            kind: "sd15_world",
            version: 1,
            doc: "the paper scale: Stable Diffusion v1.5 with CLIP ViT-L/14, the LAION aesthetic head, HPSv2 and Inception, from local files",
            uses_input_labels: false,
            params: vec![
                path_param("sd15", "Stable Diffusion v1.5 in the diffusers layout (unet/, vae/, text_encoder/, tokenizer/, scheduler/); public original: https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5"),
                path_param("clip_l14", "CLIP ViT-L/14, a transformers folder (config.json, model.safetensors, tokenizer files); public original: https://huggingface.co/openai/clip-vit-large-patch14"),
                path_param("aesthetic_head", "the LAION aesthetic predictor v2 head sac+logos+ava1-l14-linearMSE.pth; public original: https://github.com/christophschuhmann/improved-aesthetic-predictor"),
                path_param("hpsv2", "the HPSv2 checkpoint HPS_v2_compressed.pt (open_clip ViT-H-14); public original: https://huggingface.co/xswu/HPSv2"),
                path_param("hpsv2_config", "open_clip's ViT-H-14.json model config; public original: src/open_clip/model_configs/ViT-H-14.json in https://github.com/mlfoundations/open_clip"),
                path_param("bpe", "the CLIP BPE vocabulary bpe_simple_vocab_16e6.txt.gz; public original: https://github.com/openai/CLIP (also in the open_clip_torch wheel)"),
                path_param("inception", "pytorch-fid's Inception weights pt_inception-2015-12-05-6726825d.pth; public original: https://github.com/mseitzer/pytorch-fid/releases"),
                ParamSpec {
                    name: "fid_reference",
                    ty: ParamType::Path,
                    default: Some(serde_json::Value::Null),
                    doc: "FID reference statistics: a .safetensors with mu and sigma, or pytorch-fid's --save-stats .npz; or instead give a `fid_stats` stage (e.g. over MS-COCO val2014 images, https://cocodataset.org) as the input `fid_stats`",
                },
                path_param("train_prompts", "training prompts, one a line (the 750 HPD photo prompts); public original: assets/hps_v2_all.txt in https://github.com/mihirp1998/AlignProp"),
                path_param("test_prompts", "test prompts, one a line (the 50 held-out HPD photo prompts); public original: assets/hps_v2_all_eval.txt in https://github.com/mihirp1998/AlignProp"),
                ParamSpec {
                    name: "resolution",
                    ty: ParamType::Int,
                    default: Some(json!(512)),
                    doc: "image side in pixels",
                },
                ParamSpec {
                    name: "jpeg_quality",
                    ty: ParamType::Float,
                    default: Some(json!(80.0)),
                    doc: "JPEG quality of the differentiable JPEG in the compressibility reward",
                },
                reduction_param("sum", "reduction of the compressibility reward's squared JPEG error over channels and pixels: sum (the paper's Eq. 2) or mean"),
                lora_targets_param(),
            ],
            inputs: vec![InputSpec {
                name: "fid_stats",
                required: false,
                many: false,
                doc: "a `fid_stats` stage: the FID reference statistics of a folder of images (instead of `fid_reference`)",
            }],
        }
    }

    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let given = ctx.params().get("fid_reference").is_some_and(|v| !v.is_null());
        let fid_reference = match (ctx.input_list("fid_stats").first(), given) {
            (Some(_), true) => return Err(StageError::Failed("give the FID reference once: the input `fid_stats` or the parameter `fid_reference`, not both".into())),
            (Some(stats), false) => stats.file(FID_STATS_FILE)?,
            (None, true) => PathBuf::from(ctx.params().str_of("fid_reference")?),
            (None, false) => return Err(StageError::Failed("no FID reference: give a `fid_stats` stage over reference images (MS-COCO) as the input `fid_stats`, or a statistics file as `fid_reference`".into())),
        };
        crate::metrics::fid::FeatureStats::read(&fid_reference).map_err(StageError::failed)?;
        let world = WorldSpec { fid_reference, ..sd15_world_spec(ctx.params())? };
        for (what, dir) in [("sd15", &world.diffusion)] {
            for sub in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
                if !dir.join(sub).is_dir() {
                    return Err(StageError::Failed(format!("{what}: {} has no {sub}/ folder: is it the diffusers layout?", dir.display())));
                }
            }
        }
        base_record(world, lora_targets(ctx)).write(ctx.out_dir())
    }
}

/// The world an `sd15_world` stage with these parameters describes.
pub fn sd15_world_spec(p: &serde_json::Map<String, serde_json::Value>) -> Result<WorldSpec, StageError> {
    let path = |name: &str| -> Result<PathBuf, StageError> { Ok(PathBuf::from(p.str_of(name)?)) };
    let clip_l14 = path("clip_l14")?;
    let clip_l14_spec = ClipFiles {
        layout: ClipLayout::Transformers,
        weights: clip_l14.clone(),
        config: None,
        tokenizer: clip_l14.clone(),
    };
    let world = WorldSpec {
        name: "sd15".into(),
        diffusion: path("sd15")?,
        resolution: p.i64_of("resolution")?,
        aesthetic_clip: clip_l14_spec.clone(),
        aesthetic_head: path("aesthetic_head")?,
        hps: ClipFiles {
            layout: ClipLayout::OpenClip,
            weights: path("hpsv2")?,
            config: Some(path("hpsv2_config")?),
            tokenizer: path("bpe")?,
        },
        clip_score: clip_l14_spec,
        fid_features: FidFeatures::Inception,
        inception: Some(path("inception")?),
        // Set by the stage from its input or parameter; absent when only estimating.
        fid_reference: PathBuf::new(),
        train_prompts: path("train_prompts")?,
        test_prompts: path("test_prompts")?,
        jpeg_quality: p.f64_of("jpeg_quality")?,
        compress_reduction: reduction_of(p)?,
    };
    Ok(world)
}

/// Prompts of a file: one a line, blank lines dropped (AlignProp's file has two).
pub fn read_prompts(path: &Path) -> Result<Vec<String>, StageError> {
    let text = std::fs::read_to_string(path).map_err(|e| StageError::io(format!("cannot read prompts {}", path.display()), e))?;
    let prompts: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect();
    if prompts.is_empty() {
        return Err(StageError::Failed(format!("{} holds no prompts", path.display())));
    }
    Ok(prompts)
}
