//! Worlds: where a study's models come from. A world names the diffusion model (a diffusers
//! folder), the reward and metric models, and the prompt files. `tiny_world` reads the embedded
//! tiny world's manifest; `sd15_world` takes the paper-scale files one by one, so that a
//! pipeline without them fails validation with every missing file listed.
//!
//! Both write `model.json` (a [`ModelRecord`] with no adapters): the base model every fine-tune
//! chain starts from.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::exec::{StageContext, StageError, StageKind};
use crate::models::diffusion::Diffusion;
use crate::models::precision::Precision;
use crate::models::unet::UNet2DConditionConfig;
use crate::models::vae::AutoencoderKLConfig;
use crate::pipeline::params::StageParams;
use crate::pipeline::schema::{InputSpec, KindSchema};
use crate::pipeline::ResolvedStage;
use crate::stage_params;

use crate::rewards::clip_loader::{ClipFiles, ClipLayout};
use crate::rewards::compressibility::Reduction;

use super::fid_stats::FID_STATS_FILE;
use super::params::lora_targets_param;
use crate::records::Task;

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
    /// PickScore, a transformers `CLIPModel` folder with its processor and tokenizer files:
    /// the task `pickscore` and its metric; absent when the world has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pickscore: Option<PathBuf>,
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

    /// The record's diffusion model with the adapters of the file `adapters` (see
    /// [`ModelRecord::of_input`]).
    pub fn load_diffusion(&self, adapters: Option<&Path>, device: tch::Device, precision: Precision) -> Result<Diffusion, StageError> {
        Ok(Diffusion::load(&self.world.diffusion, self.world.resolution, self.lora_targets.clone(), adapters, device, precision)?)
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

stage_params! {
    /// The parameters of a `tiny_world` stage.
    pub struct TinyWorldParams {
        pub root: PathBuf = required().doc("the tiny world's folder with world.json (the repo's tiny/weights, or a pretrain pipeline's export)"),
        pub compress_reduction: Reduction = param(Reduction::Mean).doc("reduction of the compressibility reward's squared JPEG error over channels and pixels: mean (the tiny world's recipe was set with it; docs/tiny-world.md) or sum (Eq. 2)"),
        pub lora_targets: Vec<String> = lora_targets_param(),
        pub pickscore: Option<PathBuf> = pickscore_param(),
    }
}

stage_params! {
    /// The parameters of an `sd15_world` stage: every file of the paper scale.
    pub struct Sd15WorldParams {
        pub sd15: PathBuf = required().doc("Stable Diffusion v1.5 in the diffusers layout (unet/, vae/, text_encoder/, tokenizer/, scheduler/); public original: https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5"),
        pub clip_l14: PathBuf = required().doc("CLIP ViT-L/14, a transformers folder (config.json, model.safetensors, tokenizer files); public original: https://huggingface.co/openai/clip-vit-large-patch14"),
        pub aesthetic_head: PathBuf = required().doc("the LAION aesthetic predictor v2 head sac+logos+ava1-l14-linearMSE.pth; public original: https://github.com/christophschuhmann/improved-aesthetic-predictor"),
        pub hpsv2: PathBuf = required().doc("the HPSv2 checkpoint HPS_v2_compressed.pt (open_clip ViT-H-14); public original: https://huggingface.co/xswu/HPSv2"),
        pub hpsv2_config: PathBuf = required().doc("open_clip's ViT-H-14.json model config; public original: src/open_clip/model_configs/ViT-H-14.json in https://github.com/mlfoundations/open_clip"),
        pub bpe: PathBuf = required().doc("the CLIP BPE vocabulary bpe_simple_vocab_16e6.txt.gz; public original: https://github.com/openai/CLIP (also in the open_clip_torch wheel)"),
        pub inception: PathBuf = required().doc("pytorch-fid's Inception weights pt_inception-2015-12-05-6726825d.pth; public original: https://github.com/mseitzer/pytorch-fid/releases"),
        pub fid_reference: Option<PathBuf> = param(None).doc("FID reference statistics: a .safetensors with mu and sigma, or pytorch-fid's --save-stats .npz; or instead give a `fid_stats` stage (e.g. over MS-COCO val2014 images, https://cocodataset.org) as the input `fid_stats`"),
        pub train_prompts: PathBuf = required().doc("training prompts, one a line (the 750 HPD photo prompts); public original: assets/hps_v2_all.txt in https://github.com/mihirp1998/AlignProp"),
        pub test_prompts: PathBuf = required().doc("test prompts, one a line (the 50 held-out HPD photo prompts); public original: assets/hps_v2_all_eval.txt in https://github.com/mihirp1998/AlignProp"),
        pub resolution: i64 = param(512).min(64).max(4096).doc("image side in pixels"),
        pub jpeg_quality: f64 = param(80.0).min(1).max(100).doc("JPEG quality of the differentiable JPEG in the compressibility reward"),
        pub compress_reduction: Reduction = param(Reduction::Sum).doc("reduction of the compressibility reward's squared JPEG error over channels and pixels: sum (the paper's Eq. 2) or mean"),
        pub lora_targets: Vec<String> = lora_targets_param(),
        pub pickscore: Option<PathBuf> = pickscore_param(),
    }
}

/// The `pickscore` parameter of the worlds (in the cache key only when given, so studies cached
/// before it keep their keys).
fn pickscore_param() -> crate::pipeline::params::Field<Option<PathBuf>> {
    crate::pipeline::params::param(None)
        .keyed_when_set()
        .doc("PickScore (docs/rewards.md): a transformers CLIPModel folder (config.json, model.safetensors, preprocessor_config.json, vocab.json, merges.txt); gives the task `pickscore` and the evaluation metric of that name. Public original: https://huggingface.co/yuvalkirstain/PickScore_v1, with the processor and tokenizer files of https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
}

/// The kinds' names in pipelines.
pub const TINY_WORLD: &str = "tiny_world";
pub const SD15_WORLD: &str = "sd15_world";

/// The world a world stage describes, with its LoRA targets, from its parameters alone (for
/// estimates before anything runs); `None` when the stage is not a world.
pub fn world_of_stage(stage: &ResolvedStage) -> Option<Result<(WorldSpec, Vec<String>), StageError>> {
    let world = match stage.kind.as_str() {
        TINY_WORLD => TinyWorldParams::from_params(&stage.params).map_err(StageError::from).and_then(|p| Ok((p.world()?, p.lora_targets))),
        SD15_WORLD => Sd15WorldParams::from_params(&stage.params).map(|p| (p.world(), p.lora_targets)).map_err(StageError::from),
        _ => return None,
    };
    Some(world)
}

impl WorldSpec {
    /// The UNet config of the world's diffusion model and the side of its latents, from the
    /// diffusers folder's configs. While the paper-scale files are not there yet (a study is
    /// planned before the download), SD1.5's published configs stand in for them.
    pub fn unet_and_latent_side(&self) -> Option<(UNet2DConditionConfig, i64)> {
        let unet = UNet2DConditionConfig::from_file(&self.diffusion.join("unet/config.json"));
        let vae = AutoencoderKLConfig::from_file(&self.diffusion.join("vae/config.json"));
        let (unet, vae) = match (unet, vae) {
            (Ok(unet), Ok(vae)) => (unet, vae),
            _ if self.name == "sd15" => (UNet2DConditionConfig::sd15(), AutoencoderKLConfig::sd15()),
            _ => return None,
        };
        Some((unet, vae.latent_side(self.resolution)))
    }
}

fn check_exists(path: &Path, what: &str) -> Result<PathBuf, StageError> {
    path.canonicalize().map_err(|e| StageError::Failed(format!("{what}: {} ({e})", path.display())))
}

/// `tiny_world`: the embedded tiny world, from its manifest.
pub struct TinyWorld;

impl StageKind for TinyWorld {
    fn schema(&self) -> KindSchema {
        KindSchema {
            kind: TINY_WORLD,
            version: 1,
            doc: "the embedded tiny world (its models, rewards and prompts) as the base model of a study",
            uses_input_labels: false,
            reads_declared_rewards: false,
            params: TinyWorldParams::specs(),
            inputs: Vec::new(),
        }
    }

    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let p: TinyWorldParams = ctx.typed_params()?;
        let root = p.root.clone();
        let world = p.world()?;
        // A shipped bundle lists its files' blake3 hashes: a damaged or edited file stops the
        // study here rather than skewing its numbers.
        if root.join(BUNDLE_MANIFEST).is_file() {
            let files = verify_bundle(&root).map_err(|e| StageError::Failed(format!("tiny world {}: {e} (regenerate it: docs/tiny-world.md, \"Regenerating the weights\")", root.display())))?;
            ctx.log(format!("tiny world from {}: {files} files match MANIFEST.txt", root.display()));
        } else {
            ctx.log(format!("tiny world from {}", root.display()));
        }
        base_record(world, p.lora_targets).write(ctx.out_dir())
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
        pickscore: None,
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
            kind: SD15_WORLD,
            version: 1,
            doc: "the paper scale: Stable Diffusion v1.5 with CLIP ViT-L/14, the LAION aesthetic head, HPSv2 (and PickScore when given) and Inception, from local files",
            uses_input_labels: false,
            reads_declared_rewards: false,
            params: Sd15WorldParams::specs(),
            inputs: vec![InputSpec {
                name: "fid_stats",
                required: false,
                many: false,
                doc: "a `fid_stats` stage: the FID reference statistics of a folder of images (instead of `fid_reference`)",
            }],
        }
    }

    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let p: Sd15WorldParams = ctx.typed_params()?;
        let fid_reference = match (ctx.input_list("fid_stats").first(), &p.fid_reference) {
            (Some(_), Some(_)) => return Err(StageError::Failed("give the FID reference once: the input `fid_stats` or the parameter `fid_reference`, not both".into())),
            (Some(stats), None) => stats.file(FID_STATS_FILE)?,
            (None, Some(path)) => path.clone(),
            (None, None) => return Err(StageError::Failed("no FID reference: give a `fid_stats` stage over reference images (MS-COCO) as the input `fid_stats`, or a statistics file as `fid_reference`".into())),
        };
        crate::metrics::fid::FeatureStats::read(&fid_reference).map_err(StageError::failed)?;
        let world = WorldSpec { fid_reference, ..p.world() };
        for (what, dir) in [("sd15", &world.diffusion)] {
            for sub in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
                if !dir.join(sub).is_dir() {
                    return Err(StageError::Failed(format!("{what}: {} has no {sub}/ folder: is it the diffusers layout?", dir.display())));
                }
            }
        }
        base_record(world, p.lora_targets).write(ctx.out_dir())
    }
}

impl TinyWorldParams {
    /// The world these parameters describe (its files must exist).
    pub fn world(&self) -> Result<WorldSpec, StageError> {
        Ok(WorldSpec { compress_reduction: self.compress_reduction, pickscore: self.pickscore.clone(), ..tiny_world_spec(&self.root)? })
    }
}

impl Sd15WorldParams {
    /// The world these parameters describe.
    pub fn world(&self) -> WorldSpec {
        let clip_l14 = ClipFiles {
            layout: ClipLayout::Transformers,
            weights: self.clip_l14.clone(),
            config: None,
            tokenizer: self.clip_l14.clone(),
        };
        WorldSpec {
            name: "sd15".into(),
            diffusion: self.sd15.clone(),
            resolution: self.resolution,
            aesthetic_clip: clip_l14.clone(),
            aesthetic_head: self.aesthetic_head.clone(),
            hps: ClipFiles {
                layout: ClipLayout::OpenClip,
                weights: self.hpsv2.clone(),
                config: Some(self.hpsv2_config.clone()),
                tokenizer: self.bpe.clone(),
            },
            pickscore: self.pickscore.clone(),
            clip_score: clip_l14,
            fid_features: FidFeatures::Inception,
            inception: Some(self.inception.clone()),
            // The stage sets it from its input or parameter; estimates do not need it.
            fid_reference: self.fid_reference.clone().unwrap_or_default(),
            train_prompts: self.train_prompts.clone(),
            test_prompts: self.test_prompts.clone(),
            jpeg_quality: self.jpeg_quality,
            compress_reduction: self.compress_reduction,
        }
    }
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
