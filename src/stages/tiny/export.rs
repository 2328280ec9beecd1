//! `tiny_export`: the shipped bundle (f16 weights, `world.json`, prompts, FID reference,
//! `MANIFEST.txt` of blake3 hashes), loaded back through `tiny_world`'s manifest reader, the
//! diffusion model's loader and the rewards, and every gate measured again on it, plus the
//! sample gates (CLIP score with the own vs a shuffled prompt, FID vs pure noise), the shape
//! gates (a shape probe trained on renders reads the samples of the one-object test prompts) and
//! a sample grid.
use std::path::Path;

use serde_json::json;
use tch::{Kind, Tensor};

use crate::exec::{StageContext, StageError};
use crate::method::sampling::{initial_latents, CastUnet, Sampler, SamplerConfig};
use crate::models::diffusion::Diffusion;
use crate::models::precision::Precision as ComputePrecision;
use crate::pipeline::schema::InputSpec;
use crate::rewards::aesthetic::AestheticReward;
use crate::rewards::clip_loader::FrozenClip;
use crate::rewards::hps::HpsReward;
use crate::stage_params;
use crate::tiny::train::data::{prompt_scenes, tensor_images, Excluded};
use crate::tiny::train::gates::{clip_score, feature_stats, frechet_distance, Comparison, Gate, GateReport};
use crate::tiny::train::io::{read_safetensors, write_file, write_json, write_safetensors, Precision};
use crate::tiny::train::unet as tunet;
use crate::tiny::train::vae as tvae;
use crate::tiny::train::{shape_probe, Schedule};
use crate::tiny::{write_png_grid, IMAGE_SIZE};

use crate::stages::monitor::StageMonitor;
use crate::stages::world::{read_prompts, tiny_world_spec, BUNDLE_MANIFEST, ModelRecord};
use super::clip::retrieval_gates;
use super::vae::psnr_gate;
use super::aesthetic::pearson_gate;
use super::preference::preference_gate;
use super::{TOKENIZER_DIR, TRAIN_PROMPTS, TEST_PROMPTS, CLIP_DIR, TEXT_ENCODER_DIR, VAE_DIR, UNET_DIR, HPS_DIR, HEAD_FILE, input, stage_error, device_of, publish, input_dir, clip_files, frozen_clip, TinyKind};

/// `tiny_export`: the shipped bundle, checked through the study's loaders.
pub struct TinyExport;

stage_params! {
    /// The parameters of a `tiny_export` stage.
    pub struct TinyExportParams {
        pub seed: u64 = param(0).min(0).doc("seed of the samples and of the evaluation renders"),
        pub sample_steps: usize = param(10).min(1).max(1000).doc("DDIM steps of the sample gates (the study's)"),
        pub guidance: f64 = param(3.0).min(0).doc("classifier-free guidance of the sample gates (the study's, pipelines/all_orders.yaml)"),
        pub guidance_sweep: Vec<f64> = param(vec![1.0, 5.0, 7.5]).min(0).doc("further guidance scales whose sample measurements gates.json records"),
        pub samples_per_prompt: usize = param(8).min(1).doc("samples of each test prompt for the sample gates"),
        pub fid_renders: usize = param(40).min(2).doc("renders of each test prompt for the FID reference"),
        pub grid_prompts: usize = param(10).min(0).doc("test prompts shown in samples.png"),
        pub retrieval_sets: usize = param(4).min(1).doc("render sets of the test prompts for the retrieval gate"),
        pub psnr_renders: usize = param(8).min(1).doc("renders per test prompt for the PSNR gate"),
        pub rating_renders: usize = param(20).min(1).doc("renders per test prompt for the Pearson gate"),
        pub preference_pairs: usize = param(20).min(1).doc("labelled pairs per test prompt for the preference gate"),
        pub jpeg_quality: f64 = param(80.0).min(1).max(100).doc("JPEG quality of the compressibility reward (world.json)"),
        pub probe_steps: usize = param(600).min(1).doc("training steps of the shape probe (the shape gates' instrument, not shipped)"),
        pub probe_batch: usize = param(128).min(1).doc("renders per step of the shape probe"),
    }
}

impl TinyKind for TinyExport {
    const KIND: &'static str = "tiny_export";
    const DOC: &'static str = "the tiny world's bundle (f16 weights, world.json, prompts, FID reference, MANIFEST.txt of blake3 hashes), loaded back through tiny_world, Diffusion::load and the rewards, with every quality gate measured on it";
    type Params = TinyExportParams;

    fn inputs() -> Vec<InputSpec> {
        vec![
            input("prompts", "a tiny_prompts stage"),
            input("clip", "a tiny_clip stage"),
            input("vae", "a tiny_vae stage"),
            input("aesthetic", "a tiny_aesthetic stage"),
            input("preference", "a tiny_preference stage"),
            input("unet", "a tiny_unet stage"),
        ]
    }

    fn run(&self, ctx: &mut StageContext, p: TinyExportParams) -> Result<(), StageError> {
        let device = device_of(ctx);
        let out = ctx.out_dir().to_path_buf();
        write_bundle(ctx, &out, p.jpeg_quality)?;

        // The FID reference: the CLIP-score model's embeddings of renders of the test prompts.
        let test = read_prompts(&out.join(TEST_PROMPTS))?;
        let seed = p.seed;
        let clip = frozen_clip(&clip_files(out.join(CLIP_DIR), &out.join("diffusion").join(TOKENIZER_DIR)), device)?;
        let renders = prompt_scenes(&test, p.fid_renders, seed + 2000, device).map_err(stage_error)?;
        let (mu, sigma) = feature_stats(&embed_images(&clip, &renders.images)?).map_err(stage_error)?;
        write_safetensors(&out.join("fid_reference.safetensors"), &[("mu".into(), mu.shallow_clone()), ("sigma".into(), sigma.shallow_clone())], Precision::F32).map_err(stage_error)?;
        drop(clip);

        // Everything below reads the bundle as a study does.
        let world = tiny_world_spec(&out)?;
        let record = ModelRecord { world: world.clone(), tasks: Vec::new(), origin: "base".into(), adapters: None, lora_targets: crate::models::lora::default_targets() };
        let diffusion = record.load_diffusion(None, device, ComputePrecision::Fp32)?;
        let clip = frozen_clip(&world.clip_score, device)?;
        let mut report = GateReport::default();
        retrieval_gates(&mut report, &clip, &test, p.retrieval_sets)?;
        psnr_gate(&mut report, &diffusion.vae, &test, p.psnr_renders, device)?;
        let aesthetic = AestheticReward::load(&world.aesthetic_clip, &world.aesthetic_head, device, Kind::Float).map_err(StageError::failed)?;
        pearson_gate(&mut report, &aesthetic, &test, p.rating_renders, device)?;
        let hps = HpsReward::load(&world.hps, device, Kind::Float).map_err(StageError::failed)?;
        preference_gate(&mut report, &hps, &test, p.preference_pairs, device)?;
        let reference = read_safetensors(&world.fid_reference).map_err(stage_error)?;
        let reference = (reference.get("mu").map(Tensor::shallow_clone), reference.get("sigma").map(Tensor::shallow_clone));
        let (Some(mu), Some(sigma)) = reference else {
            return Err(StageError::Failed("fid_reference.safetensors lacks mu or sigma".into()));
        };
        let settings = SampleSettings {
            steps: p.sample_steps,
            guidance: p.guidance,
            per_prompt: p.samples_per_prompt,
            seed,
            sweep: p.guidance_sweep.clone(),
        };
        let samples = sample_gates(ctx, &mut report, &diffusion, &clip, &test, &settings, (&mu, &sigma), p.grid_prompts)?;
        let probe_schedule = Schedule { steps: p.probe_steps, batch: p.probe_batch, lr: 2e-3, warmup: 50, weight_decay: 0.0, seed, checkpoint_every: 0 };
        let (probe, _) = {
            let mut monitor = StageMonitor::new(ctx, probe_schedule.steps);
            shape_probe::train(&probe_schedule, &Excluded::new(&test), device, &mut monitor).map_err(stage_error)?
        };
        let reconstruct = |images: &Tensor| tvae::reconstruct(&diffusion.vae, images);
        shape_probe::shape_gates(&mut report, &probe, &test, &samples, settings.per_prompt, seed + 4000, &reconstruct).map_err(stage_error)?;
        publish(ctx, &report)?;
        write_manifest(&out)
    }
}

/// Writes the bundle's files (f16 weights, configs, tokenizer, prompts, world.json) from the
/// inputs.
fn write_bundle(ctx: &StageContext, out: &Path, jpeg_quality: f64) -> Result<(), StageError> {
    let prompts = ctx.input("prompts")?;
    let diffusion = out.join("diffusion");
    copy_folder(&input_dir(prompts, TOKENIZER_DIR, "vocab.json")?, &diffusion.join(TOKENIZER_DIR))?;
    for name in [TRAIN_PROMPTS, TEST_PROMPTS] {
        copy_file(&prompts.file(name)?, &out.join(name))?;
    }
    let clip = ctx.input("clip")?;
    half_folder(&input_dir(clip, CLIP_DIR, "model.safetensors")?, &out.join(CLIP_DIR))?;
    half_folder(&input_dir(clip, TEXT_ENCODER_DIR, "model.safetensors")?, &diffusion.join(TEXT_ENCODER_DIR))?;
    half_folder(&input_dir(ctx.input("vae")?, VAE_DIR, "diffusion_pytorch_model.safetensors")?, &diffusion.join(VAE_DIR))?;
    half_folder(&input_dir(ctx.input("unet")?, UNET_DIR, "diffusion_pytorch_model.safetensors")?, &diffusion.join(UNET_DIR))?;
    half_folder(&input_dir(ctx.input("preference")?, HPS_DIR, "model.safetensors")?, &out.join(HPS_DIR))?;
    half_file(&ctx.input("aesthetic")?.file(HEAD_FILE)?, &out.join(HEAD_FILE))?;
    write_json(&diffusion.join("scheduler").join("scheduler_config.json"), &tunet::sd15_scheduler_json()).map_err(stage_error)?;
    let model_index = json!({
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.30.0",
        "feature_extractor": [null, null],
        "image_encoder": [null, null],
        "requires_safety_checker": false,
        "safety_checker": [null, null],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    });
    write_json(&diffusion.join("model_index.json"), &model_index).map_err(stage_error)?;
    let world = json!({
        "diffusion": "diffusion",
        "resolution": IMAGE_SIZE,
        "aesthetic_clip": CLIP_DIR,
        "aesthetic_head": HEAD_FILE,
        "hps": HPS_DIR,
        "clip_score": CLIP_DIR,
        "tokenizer": format!("diffusion/{TOKENIZER_DIR}"),
        "fid_reference": "fid_reference.safetensors",
        "train_prompts": TRAIN_PROMPTS,
        "test_prompts": TEST_PROMPTS,
        "jpeg_quality": jpeg_quality,
    });
    write_json(&out.join("world.json"), &world).map_err(stage_error)
}

fn copy_file(from: &Path, to: &Path) -> Result<(), StageError> {
    let bytes = std::fs::read(from).map_err(|e| StageError::io(format!("cannot read {}", from.display()), e))?;
    write_file(to, &bytes).map_err(stage_error)
}

fn copy_folder(from: &Path, to: &Path) -> Result<(), StageError> {
    for entry in std::fs::read_dir(from).map_err(|e| StageError::io(format!("cannot list {}", from.display()), e))? {
        let path = entry?.path();
        if let Some(name) = path.file_name() {
            copy_file(&path, &to.join(name))?;
        }
    }
    Ok(())
}

/// A model folder with its `.safetensors` in f16 and its other files as they are.
fn half_folder(from: &Path, to: &Path) -> Result<(), StageError> {
    for entry in std::fs::read_dir(from).map_err(|e| StageError::io(format!("cannot list {}", from.display()), e))? {
        let path = entry?.path();
        let Some(name) = path.file_name() else { continue };
        if path.extension().is_some_and(|e| e == "safetensors") {
            half_file(&path, &to.join(name))?;
        } else {
            copy_file(&path, &to.join(name))?;
        }
    }
    Ok(())
}

fn half_file(from: &Path, to: &Path) -> Result<(), StageError> {
    let tensors: Vec<(String, Tensor)> = read_safetensors(from).map_err(stage_error)?.into_iter().collect();
    write_safetensors(to, &tensors, Precision::F16).map_err(stage_error)
}

/// L2-normalised CLIP image embeddings of images, in chunks, without graph.
fn embed_images(clip: &FrozenClip, images: &Tensor) -> Result<Tensor, StageError> {
    let n = images.size()[0];
    let mut out = Vec::new();
    for start in (0..n).step_by(256) {
        let chunk = images.narrow(0, start, (n - start).min(256));
        out.push(tch::no_grad(|| clip.image_embeddings(&chunk)).map_err(StageError::failed)?);
    }
    Ok(Tensor::cat(&out, 0))
}

struct SampleSettings {
    steps: usize,
    guidance: f64,
    per_prompt: usize,
    seed: u64,
    /// Further guidance scales whose sample measurements are recorded (not gated).
    sweep: Vec<f64>,
}

/// Samples `[N, 3, H, W]` in [0, 1] of each prompt (prompt-major), DDIM with guidance, with the
/// initial latents of `initial_latents(seed, i)` for sample i.
fn sample(diffusion: &Diffusion, prompts: &[String], settings: &SampleSettings) -> Result<Tensor, StageError> {
    let sampler = Sampler::new(diffusion.ddim.clone(), SamplerConfig { steps: settings.steps, eta: 0.0, guidance: settings.guidance }).map_err(StageError::failed)?;
    let uncond = diffusion.uncond()?;
    let all: Vec<String> = prompts.iter().flat_map(|p| std::iter::repeat_n(p.clone(), settings.per_prompt)).collect();
    let mut images = Vec::new();
    for (k, chunk) in all.chunks(64).enumerate() {
        let cond = diffusion.encode_prompts(chunk)?;
        let z = initial_latents(settings.seed, (k * 64) as u64, chunk.len() as i64, diffusion.latent_shape, diffusion.device);
        let z0 = sampler.sample(&CastUnet::of(diffusion), &z, &cond, &uncond, settings.seed).map_err(StageError::failed)?;
        images.push(tch::no_grad(|| diffusion.decode(&z0)));
    }
    Ok(Tensor::cat(&images, 0))
}

/// The sample gates: CLIP score with the own prompt vs a shuffled one (each sample scored
/// against the next prompt's text), FID of the samples vs that of pure-noise images (and of
/// fresh renders, the floor); the sample grid. Returns the samples (for the shape gates).
#[allow(clippy::too_many_arguments)]
fn sample_gates(ctx: &StageContext, report: &mut GateReport, diffusion: &Diffusion, clip: &FrozenClip, test: &[String], settings: &SampleSettings, reference: (&Tensor, &Tensor), grid_prompts: usize) -> Result<Tensor, StageError> {
    let device = diffusion.device;
    let per = settings.per_prompt;
    let samples = sample(diffusion, test, settings)?;
    let n = samples.size()[0];
    let own: Vec<String> = test.iter().flat_map(|p| std::iter::repeat_n(p.clone(), per)).collect();
    let shuffled: Vec<String> = (0..test.len()).flat_map(|i| std::iter::repeat_n(test[(i + 1) % test.len()].clone(), per)).collect();
    let text_of = |prompts: &[String]| -> Result<Tensor, StageError> {
        let mut out = Vec::new();
        for chunk in prompts.chunks(256) {
            out.push(clip.text_embeddings(chunk).map_err(StageError::failed)?);
        }
        Ok(Tensor::cat(&out, 0))
    };
    let (own_text, shuffled_text) = (text_of(&own)?, text_of(&shuffled)?);
    let sample_emb = embed_images(clip, &samples)?;
    let renders = prompt_scenes(test, per, settings.seed + 3000, device).map_err(stage_error)?;
    let render_emb = embed_images(clip, &renders.images)?;
    let noise = crate::tiny::train::data::images_tensor(&noise_images(n as usize, settings.seed), device).map_err(stage_error)?;
    let noise_emb = embed_images(clip, &noise)?;

    let score_own = clip_score(&sample_emb, &own_text);
    let score_shuffled = clip_score(&sample_emb, &shuffled_text);
    let (mu, sigma) = reference;
    let fid = |emb: &Tensor| -> Result<f64, StageError> {
        let (m, s) = feature_stats(emb).map_err(stage_error)?;
        Ok(frechet_distance(&m, &s, mu, sigma))
    };
    let (fid_samples, fid_noise, fid_renders) = (fid(&sample_emb)?, fid(&noise_emb)?, fid(&render_emb)?);
    let how = format!("{per} samples of each test prompt, DDIM {} steps, guidance {}", settings.steps, settings.guidance);
    report.push(Gate::new("samples.clip_score_margin", score_own - score_shuffled, Comparison::AtLeast, 10.0, format!("CLIP score with the own prompt ({score_own:.2}) minus with a shuffled prompt ({score_shuffled:.2}); {how}")));
    report.push(Gate::new("samples.fid_vs_noise", fid_samples / fid_noise, Comparison::AtMost, 0.25, format!("FID of the samples ({fid_samples:.4}) over that of uniform-noise images ({fid_noise:.4}); {how}")));
    report.measure("samples.clip_score_own", score_own);
    report.measure("samples.clip_score_shuffled", score_shuffled);
    report.measure("renders.clip_score_own", clip_score(&render_emb, &own_text));
    report.measure("renders.clip_score_shuffled", clip_score(&render_emb, &shuffled_text));
    report.measure("samples.fid", fid_samples);
    report.measure("noise.fid", fid_noise);
    report.measure("renders.fid", fid_renders);
    let mut sweep = Vec::new();
    for &guidance in &settings.sweep {
        let other = SampleSettings { guidance, sweep: Vec::new(), ..*settings };
        let emb = embed_images(clip, &sample(diffusion, test, &other)?)?;
        let (own, shuffled, fid) = (clip_score(&emb, &own_text), clip_score(&emb, &shuffled_text), fid(&emb)?);
        sweep.push(json!({"guidance": guidance, "clip_score_own": own, "clip_score_margin": own - shuffled, "fid": fid, "fid_vs_noise": fid / fid_noise}));
    }
    report.measure("samples.guidance_sweep", sweep);

    // The grid: per row, a render of the prompt then its first samples.
    let shown = grid_prompts.min(test.len());
    let columns = per.min(5) + 1;
    let sample_images = tensor_images(&samples).map_err(stage_error)?;
    let render_images = tensor_images(&renders.images).map_err(stage_error)?;
    let mut grid = Vec::new();
    for i in 0..shown {
        grid.push(render_images[i * per].clone());
        grid.extend(sample_images[i * per..i * per + columns - 1].iter().cloned());
    }
    write_png_grid(&ctx.out_dir().join("samples.png"), &grid, columns, 4).map_err(StageError::failed)?;
    let legend: String = test[..shown].iter().enumerate().map(|(i, p)| format!("row {}: {p}\n", i + 1)).collect();
    write_file(&ctx.out_dir().join("samples.txt"), format!("first column: a render of the prompt; then base-model samples ({how})\n{legend}").as_bytes()).map_err(stage_error)?;
    Ok(samples)
}

/// Images of independent uniform pixels, seeded.
fn noise_images(count: usize, seed: u64) -> Vec<crate::tiny::RgbImage> {
    let mut r = crate::tiny::train::rng(seed, crate::tiny::train::Purpose::Eval, u64::MAX);
    (0..count)
        .map(|_| crate::tiny::RgbImage { width: IMAGE_SIZE, height: IMAGE_SIZE, data: (0..IMAGE_SIZE * IMAGE_SIZE * 3).map(|_| rand::Rng::random::<u8>(&mut r)).collect() })
        .collect()
}

/// `MANIFEST.txt`: `<blake3>  <path>` of every bundle file (not the stage log), sorted.
fn write_manifest(out: &Path) -> Result<(), StageError> {
    let mut files = Vec::new();
    collect_files(out, out, &mut files)?;
    files.sort();
    let mut text = String::new();
    for rel in files {
        if rel == BUNDLE_MANIFEST || rel == crate::exec::kind::LOG_FILE {
            continue;
        }
        let bytes = std::fs::read(out.join(&rel))?;
        text.push_str(&format!("{}  {rel}\n", blake3::hash(&bytes).to_hex()));
    }
    write_file(&out.join(BUNDLE_MANIFEST), text.as_bytes()).map_err(stage_error)
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<(), StageError> {
    for entry in std::fs::read_dir(dir).map_err(|e| StageError::io(format!("cannot list {}", dir.display()), e))? {
        let path = entry?.path();
        if path.is_dir() {
            collect_files(root, &path, out)?;
        } else if let Ok(rel) = path.strip_prefix(root) {
            out.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::ddim::DdimConfig;

    #[test]
    fn scheduler_json_is_sd15s() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scheduler_config.json");
        write_json(&path, &tunet::sd15_scheduler_json()).unwrap();
        assert_eq!(DdimConfig::from_json_file(&path).unwrap(), DdimConfig::default());
    }
}
