//! `evaluate`: sample held-out prompts x images per prompt from a model, with initial noise that
//! depends only on (seed, prompt, image) so every model evaluated sees the same z_N, and measure
//! aesthetic score, HPS, PNG and JPEG sizes, CLIP score and FID, PickScore when the world has
//! it, and every reward the pipeline declares (its own values, whichever its direction).
use std::io::Write as _;

use serde_json::json;
use tch::{Device, Kind, Tensor};

use crate::exec::kind::Estimate;
use crate::exec::{StageContext, StageError, StageKind};
use crate::method::sampling::{Sampler, SamplerConfig};
use crate::metrics::clip_score::clip_pair_scores;
use crate::metrics::fid::{frechet_distance, FeatureStats};
use crate::metrics::filesize::{jpeg_size, png_bytes, png_size, to_uint8_images, RgbImage};
use crate::models::inception::InceptionV3;
use crate::pipeline::params::StageParams;
use crate::pipeline::schema::KindSchema;
use crate::pipeline::{ResolvedPipeline, ResolvedStage};
use crate::rewards::aesthetic::AestheticReward;
use crate::rewards::clip_loader::FrozenClip;
use crate::rewards::hps::HpsReward;
use crate::rewards::Reward;
use crate::stage_params;

use crate::models::precision::Precision;
use crate::records::{EvaluationRecord, Metric, GRID_FILE, METRICS_FILE};

use super::estimate;
use super::finetune::model_input;
use super::memory::Job;
use super::params::{precision_param, SamplerParams};
use super::reward_set::{declared_info, declared_reward, pickscore};
use super::train::input_ranks;
use super::world::{read_prompts, FidFeatures, ModelRecord, WorldSpec};

pub const SCORES_FILE: &str = "scores.jsonl";

pub struct Evaluate;

/// How an evaluation samples its images: the seed, the sampler, the batches and the precision.
/// `ril-pipe sample` takes them from the pipeline's evaluation of the model, so that its image
/// `i` is the evaluation's image `i` (a batch computes the same bits only in the same company).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingSettings {
    pub seed: u64,
    pub sampler: SamplerConfig,
    /// Images sampled at once.
    pub batch_size: usize,
    pub precision: Precision,
}

stage_params! {
    /// The parameters of an `evaluate` stage.
    pub struct EvaluateParams {
        pub images_per_prompt: usize = param(4).min(1).doc("images per test prompt (paper: 200)"),
        pub max_prompts: usize = param(0).min(0).doc("use only the first N test prompts; 0 = all"),
        pub seed: u64 = param(1234).min(0).doc("seed of the initial noise, the same for every model evaluated"),
        pub batch_size: usize = param(16).min(1).doc("images sampled at once"),
        pub sampler: SamplerParams = flatten(),
        pub jpeg_quality: i64 = param(80).min(1).max(100).doc("JPEG quality of the file-size metric"),
        pub grid_prompts: usize = param(8).min(0).doc("prompts (columns) of the sample grid, first image of each"),
        pub precision: Precision = precision_param(),
    }
}

impl SamplingSettings {
    /// The settings of an `evaluate` stage's parameters.
    pub fn of_params(p: &EvaluateParams) -> Self {
        SamplingSettings { seed: p.seed, sampler: p.sampler.config(), batch_size: p.batch_size, precision: p.precision }
    }

    /// The settings with which `pipeline` evaluates the model of stage `model`: those of the
    /// first `evaluate` stage reading that model, else of the pipeline's first `evaluate` stage
    /// (its seed and sampler are usually the study's defaults), else the kind's defaults. Also
    /// returns the id of the stage they come from.
    pub fn of_pipeline(pipeline: &ResolvedPipeline, model: &str) -> Result<(Self, Option<String>), StageError> {
        let evaluations = || pipeline.stages.iter().filter(|s| s.kind == KIND);
        let of_model = evaluations().find(|s| s.inputs.get("model").is_some_and(|ids| ids.iter().any(|id| id == model)));
        match of_model.or_else(|| evaluations().next()) {
            Some(stage) => Ok((Self::of_params(&EvaluateParams::from_params(&stage.params)?), Some(stage.id.clone()))),
            None => {
                let defaults = EvaluateParams::defaults().ok_or_else(|| StageError::Failed("`evaluate` has a required parameter".into()))?;
                Ok((Self::of_params(&defaults), None))
            }
        }
    }
}

/// The kind's name in pipelines.
pub const KIND: &str = "evaluate";

impl StageKind for Evaluate {
    fn schema(&self) -> KindSchema {
        KindSchema {
            kind: KIND,
            version: 1,
            doc: "sample the world's test prompts with shared seeds and measure aesthetic, HPS, PNG/JPEG size, CLIP score, FID, PickScore (when the world names it) and every reward the pipeline declares",
            uses_input_labels: false,
            reads_declared_rewards: true,
            params: EvaluateParams::specs(),
            inputs: vec![model_input("the model to evaluate (a world, finetune, soup or joint)")],
        }
    }

    fn estimate(&self, stage: &crate::pipeline::ResolvedStage, pipeline: &crate::pipeline::ResolvedPipeline) -> crate::exec::kind::Estimate {
        match EvaluateParams::from_params(&stage.params) {
            Ok(p) => sampling_estimate(stage, pipeline, &p),
            Err(_) => Default::default(),
        }
    }

    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let p: EvaluateParams = ctx.typed_params()?;
        let device = super::device::tch_device(&ctx.device);
        tch::set_num_threads(ctx.threads.max(1) as i32);
        let (model, adapters) = ModelRecord::of_input(ctx.input("model")?)?;
        let world = &model.world;
        let settings = SamplingSettings::of_params(&p);
        let precision = settings.precision;
        let ranks = adapters.as_deref().map_or(0, |path| super::memory::adapter_file_ranks(path).unwrap_or(0));
        super::memory::check_fits(ctx, world, &model.lora_targets, &evaluation_job(&p, ranks), precision)?;
        let diffusion = model.load_diffusion(adapters.as_deref(), device, precision)?;
        let mut prompts = read_prompts(&world.test_prompts)?;
        if p.max_prompts > 0 {
            prompts.truncate(p.max_prompts);
        }
        let per_prompt = p.images_per_prompt;
        let (seed, batch) = (settings.seed, settings.batch_size);
        let quality = p.jpeg_quality as u8;
        let sampler = Sampler::new(diffusion.ddim.clone(), settings.sampler).map_err(StageError::failed)?;
        let kind = precision.kind();
        let aesthetic = AestheticReward::load(&world.aesthetic_clip, &world.aesthetic_head, device, kind).map_err(StageError::failed)?;
        let hps = HpsReward::load(&world.hps, device, kind).map_err(StageError::failed)?;
        let clip = FrozenClip::load(&world.clip_score, device, kind).map_err(StageError::failed)?;
        let fid = FidExtractor::load(world, device, precision)?;
        let pickscore = world.pickscore.as_ref().map(|_| pickscore(world, device, precision)).transpose()?;
        let declared = ctx.stage.rewards.keys().map(|name| Ok((name.clone(), declared_reward(name, &ctx.stage.rewards, world, device)?))).collect::<Result<Vec<_>, StageError>>()?;
        let uncond = diffusion.uncond()?;

        // Sample i is image k of prompt j, i = j * per_prompt + k.
        let total = prompts.len() * per_prompt;
        ctx.progress.set_length(total as u64);
        ctx.log(format!(
            "{} prompts x {per_prompt} images, N={}, guidance {}, {} models on {device:?}",
            prompts.len(),
            sampler.config.steps,
            sampler.config.guidance,
            precision.name()
        ));
        let mut scores = std::fs::File::create(ctx.out_dir().join(SCORES_FILE))?;
        let mut sums = [0.0f64; 4];
        let mut clip_sum = 0.0;
        let mut pickscore_sum = 0.0;
        let mut declared_sums = vec![0.0f64; declared.len()];
        let mut features = Vec::new();
        let grid_prompts = p.grid_prompts.min(prompts.len());
        let mut grid: Vec<RgbImage> = Vec::new();
        let mut start = 0;
        while start < total {
            ctx.check_cancelled()?;
            let end = (start + batch).min(total);
            let batch_prompts: Vec<String> = (start..end).map(|i| prompts[i / per_prompt].clone()).collect();
            let images = sampler.generate(&diffusion, &batch_prompts, &uncond, seed, start as u64)?;
            let (a, h, clip_scores, feats, own, pick) = tch::no_grad(|| -> Result<_, StageError> {
                let a = aesthetic.score(&images).map_err(StageError::failed)?;
                let h = hps.score(&images, &batch_prompts).map_err(StageError::failed)?;
                let img = clip.image_embeddings(&images).map_err(StageError::failed)?;
                let txt = clip.text_embeddings(&batch_prompts).map_err(StageError::failed)?;
                let c = clip_pair_scores(&img, &txt).map_err(StageError::failed)?;
                let f = fid.features(&images, &img)?;
                let own = declared.iter().map(|(_, r)| r.score(&images, &batch_prompts).map_err(StageError::failed)).collect::<Result<Vec<_>, _>>()?;
                let pick = pickscore.as_ref().map(|r| r.score(&images, &batch_prompts).map_err(StageError::failed)).transpose()?;
                Ok((a, h, c, f, own, pick))
            })?;
            features.push(feats.to_device(Device::Cpu).to_kind(Kind::Double));
            let u8_images = to_uint8_images(&images).map_err(StageError::failed)?;
            for (n, image) in u8_images.iter().enumerate() {
                let i = start + n;
                let (j, k) = (i / per_prompt, i % per_prompt);
                let png = png_size(image).map_err(StageError::failed)?;
                let jpg = jpeg_size(image, quality).map_err(StageError::failed)?;
                let (av, hv, cv) = (a.double_value(&[n as i64]), h.double_value(&[n as i64]), clip_scores.double_value(&[n as i64]));
                for v in [av, hv, cv] {
                    if !v.is_finite() {
                        return Err(StageError::Failed(format!("non-finite score {v} for prompt {j} image {k}")));
                    }
                }
                sums[0] += av;
                sums[1] += hv;
                sums[2] += png as f64 / 1000.0;
                sums[3] += jpg as f64 / 1000.0;
                clip_sum += cv;
                let mut line = json!({"prompt": j, "image": k, "text": prompts[j], "aesthetic": av, "hps": hv, "png_bytes": png, "jpeg_bytes": jpg, "clip_score": cv});
                for (d, ((name, _), scores)) in declared.iter().zip(&own).enumerate() {
                    let v = scores.double_value(&[n as i64]);
                    if !v.is_finite() {
                        return Err(StageError::Failed(format!("reward `{name}`: non-finite score {v} for prompt {j} image {k}")));
                    }
                    declared_sums[d] += v;
                    line[name.as_str()] = json!(v);
                }
                if let Some(scores) = &pick {
                    let v = scores.double_value(&[n as i64]);
                    if !v.is_finite() {
                        return Err(StageError::Failed(format!("non-finite PickScore {v} for prompt {j} image {k}")));
                    }
                    pickscore_sum += v;
                    line["pickscore"] = json!(v);
                }
                writeln!(scores, "{line}")?;
                if k == 0 && j < grid_prompts {
                    grid.push(image.clone());
                }
            }
            ctx.progress.inc((end - start) as u64);
            start = end;
        }
        let n = total as f64;
        let features = Tensor::cat(&features, 0);
        let stats = FeatureStats::from_features(&features).map_err(StageError::failed)?;
        let reference = FeatureStats::read(&world.fid_reference).map_err(StageError::failed)?;
        let fid_value = frechet_distance(&stats, &reference).map_err(StageError::failed)?;
        let mut metrics = vec![
            (Metric::Aesthetic, sums[0] / n),
            (Metric::Hps, sums[1] / n),
            (Metric::PngKb, sums[2] / n),
            (Metric::JpegKb, sums[3] / n),
            (Metric::ClipScore, (clip_sum / n).max(0.0)),
            (Metric::Fid, fid_value),
        ];
        if pickscore.is_some() {
            metrics.push((Metric::PickScore, pickscore_sum / n));
        }
        metrics.extend(declared.iter().zip(&declared_sums).map(|((name, _), sum)| (Metric::Declared(name.clone()), sum / n)));
        for (m, v) in &metrics {
            ctx.log(format!("{:<10} {v:.4}", m.key()));
        }
        let record = EvaluationRecord {
            tasks: model.tasks.clone(),
            origin: model.origin.clone(),
            metrics: metrics.into_iter().collect(),
            prompts: prompts.len(),
            images_per_prompt: per_prompt,
            seed,
            rewards: declared_info(&ctx.stage.rewards),
        };
        record.write(&ctx.out_dir().join(METRICS_FILE))?;
        if !grid.is_empty() {
            let row = grid_row(&grid, 2).map_err(StageError::failed)?;
            std::fs::write(ctx.out_dir().join(GRID_FILE), png_bytes(&row).map_err(StageError::failed)?)?;
        }
        Ok(())
    }
}

/// The memory-relevant settings of an `evaluate` stage.
pub fn evaluation_job(params: &EvaluateParams, ranks: i64) -> Job {
    Job::Evaluate { batch: params.batch_size as i64, guided: params.sampler.guided(), ranks }
}

/// Sampling for evaluation: N guided forwards per image.
pub fn sampling_estimate(stage: &ResolvedStage, pipeline: &ResolvedPipeline, p: &EvaluateParams) -> Estimate {
    let world = estimate::upstream_world(stage, pipeline);
    let Some((cfg, side)) = world.as_ref().ok().and_then(|(w, _)| w.unet_and_latent_side()) else {
        return Estimate::default();
    };
    let n = p.sampler.ddim_steps as f64;
    let guided = if p.sampler.guided() { 2.0 } else { 1.0 };
    let prompts = match p.max_prompts {
        0 => world.as_ref().map_err(Clone::clone).and_then(|(w, _)| estimate::prompt_count(&w.test_prompts)),
        m => Ok(m as i64),
    };
    let prompts = match prompts {
        Ok(n) => n,
        Err(reason) => return Estimate { note: Some(format!("prompts unknown: {reason}")), ..Estimate::default() },
    };
    let images = prompts * p.images_per_prompt as i64;
    let job = evaluation_job(p, input_ranks(stage, pipeline, "model", 0));
    let memory = estimate::peak_memory(&world, &job, p.precision);
    Estimate {
        flops: Some(estimate::unet_forward_flops(&cfg, side, 77) * n * guided * images as f64),
        peak_memory_bytes: memory.as_ref().ok().copied(),
        note: estimate::with_memory(format!("{images} images, N={n}"), &memory),
    }
}

/// The FID feature extractor of a world.
enum FidExtractor {
    /// pytorch-fid's Inception, with the dtype of its weights (the stage's precision).
    Inception(Box<InceptionV3>, Kind),
    /// The CLIP-score model's image embedding (already computed for the CLIP score).
    Clip,
}

impl FidExtractor {
    fn load(world: &WorldSpec, device: Device, precision: Precision) -> Result<Self, StageError> {
        match world.fid_features {
            FidFeatures::Clip => Ok(FidExtractor::Clip),
            FidFeatures::Inception => {
                let path = world.inception.as_ref().ok_or_else(|| StageError::Failed("the world names no Inception weights for FID".into()))?;
                let mut vs = precision.new_store(device);
                let model = InceptionV3::load(&vs, path).map_err(StageError::failed)?;
                precision.cast_store(&mut vs);
                Ok(FidExtractor::Inception(Box::new(model), precision.kind()))
            }
        }
    }

    /// fp32 features of images in [0, 1].
    fn features(&self, images: &Tensor, clip_embeddings: &Tensor) -> Result<Tensor, StageError> {
        match self {
            FidExtractor::Clip => Ok(clip_embeddings.shallow_clone()),
            FidExtractor::Inception(model, kind) => model.features(&images.to_kind(*kind)).map(|f| f.to_kind(Kind::Float)).map_err(StageError::failed),
        }
    }
}

/// FID reference statistics from a `.safetensors` holding `mu` and `sigma`.
/// Images side by side with `gap` white pixels between them.
pub fn grid_row(images: &[RgbImage], gap: u32) -> Result<RgbImage, crate::metrics::filesize::ImageCodecError> {
    let h = images.iter().map(RgbImage::height).max().unwrap_or(0);
    let w: u32 = images.iter().map(RgbImage::width).sum::<u32>() + gap * images.len().saturating_sub(1) as u32;
    let mut data = vec![255u8; (w * h * 3) as usize];
    let mut x0 = 0u32;
    for img in images {
        for y in 0..img.height() {
            let src = &img.data()[(y * img.width() * 3) as usize..((y + 1) * img.width() * 3) as usize];
            let dst = ((y * w + x0) * 3) as usize;
            data[dst..dst + src.len()].copy_from_slice(src);
        }
        x0 += img.width() + gap;
    }
    RgbImage::new(w, h, data)
}
