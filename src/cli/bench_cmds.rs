//! `ril-pipe bench-step` (hidden): times the last-step training update of the trainer at an
//! upstream size with random weights (by default SD1.5's UNet and VAE at 512x512 pixels and the
//! aesthetic reward's CLIP ViT-L/14 with the LAION head's shape), for `scripts/gpu_check.sh`,
//! which runs the same step in PyTorch eager (`scripts/gpu_step_torch.py`) and compares.
//!
//! A step is the method's own ([`Step::last_step_backward`]): the guided last UNet call
//! z_1 -> z_0 with gradient (frozen models in `--precision`, the new LoRA adapter fp32), the
//! DDIM update in fp32, the VAE decode and the reward, for RID the EMA teacher's pass and decode
//! without gradient and `lambda mse(D(z_0), D(z_0^T))` (lambda 0.1), backward (with
//! `--checkpointing`, decode and reward `--decode-chunk` samples at a time), gradient clipping
//! at 5, AdamW, and for RID the EMA update. It also times one guided UNet call without gradient
//! (a sampling step N..2). Prints one JSON line: median and minimum seconds, the peak memory
//! measured (CUDA: device memory in use, `cudaMemGetInfo`, which includes libtorch's cache;
//! CPU: growth of the peak resident set) and the estimate of `stages::memory`.
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use ril_pipe::method::objective::{Backprop, Distill, DistillSpace, MicroBatch, Objective, Parts, Step};
use ril_pipe::method::optim::{clip_grad_norm, AdamW, AdamWConfig};
use ril_pipe::method::sampling::{CastUnet, EpsModel, Sampler, SamplerConfig};
use ril_pipe::models::clip::{ClipConfig, VisionConfig};
use ril_pipe::models::ddim::DdimConfig;
use ril_pipe::models::lora::{default_targets, LoraGroup, LoraInit};
use ril_pipe::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use ril_pipe::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use ril_pipe::rewards::aesthetic::AestheticReward;
use ril_pipe::rewards::Reward;
use ril_pipe::stages::device::{cuda_memory, gpus_for, tch_device};
use ril_pipe::stages::memory::{training_estimate, TrainShapes, TrainStep};
use ril_pipe::models::precision::Precision;
use serde_json::json;
use tch::{Device, Kind, Tensor};

#[derive(Args)]
pub struct BenchStepArgs {
    /// The UNet: `sd15` (Stable Diffusion v1.5's config) or a diffusers config.json.
    #[arg(long, default_value = "sd15")]
    unet: String,
    /// The VAE: `sd15` or a diffusers config.json.
    #[arg(long, default_value = "sd15")]
    vae: String,
    /// The aesthetic reward's CLIP image tower: `vit-l14` or a transformers CLIP config.json.
    #[arg(long, default_value = "vit-l14")]
    clip: String,
    /// Image side in pixels (SD1.5: 512, 64x64 latents).
    #[arg(long, default_value_t = 512)]
    resolution: i64,
    /// Prompts per micro-batch; the UNet sees twice as many samples with guidance.
    #[arg(long, default_value_t = 4)]
    micro: i64,
    #[arg(long, default_value_t = 7.5)]
    guidance: f64,
    #[arg(long, default_value = "fp32", value_parser = ["fp32", "fp16", "bf16"])]
    precision: String,
    /// One method per process: libtorch keeps what its CUDA allocator reserved, so a second
    /// run in the same process would measure less than it uses.
    #[arg(long, default_value = "baseline", value_parser = ["baseline", "rid"])]
    method: String,
    /// Gradient checkpointing of the decode and the reward.
    #[arg(long)]
    checkpointing: bool,
    /// Samples decoded at once with `--checkpointing`.
    #[arg(long, default_value_t = 1)]
    decode_chunk: usize,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value_t = 4)]
    rank: i64,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Intra-op CPU threads (0: libtorch's default).
    #[arg(long, default_value_t = 0)]
    threads: i32,
}

/// Peak resident set (VmHWM) and current resident set (VmRSS) in bytes, from /proc.
fn rss() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

/// Resets the peak resident set to the current one (Linux: `5` into /proc/self/clear_refs).
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

struct Memory {
    device: Device,
    /// Memory in use at the start; `None` when it cannot be read (nothing is measured then).
    baseline: Option<u64>,
}

impl Memory {
    /// Memory in use before anything of the benchmark is allocated.
    fn start(device: Device) -> Memory {
        let baseline = match device {
            Device::Cuda(i) => match cuda_memory(i) {
                Ok((free, total)) => Some(total - free),
                Err(reason) => {
                    eprintln!("bench-step: device memory not measured ({reason})");
                    None
                }
            },
            _ => {
                reset_peak_rss();
                rss().map(|(_, now)| now)
            }
        };
        Memory { device, baseline }
    }

    /// The growth of memory in use since `start`, at its peak (CUDA: the allocator keeps what
    /// it reserved, so the memory in use now is its peak).
    fn peak_growth(&self) -> Option<u64> {
        let baseline = self.baseline?;
        match self.device {
            Device::Cuda(i) => cuda_memory(i).ok().map(|(free, total)| (total - free).saturating_sub(baseline)),
            _ => rss().map(|(peak, _)| peak.saturating_sub(baseline)),
        }
    }
}

fn synchronize(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

pub fn bench_step(args: BenchStepArgs) -> anyhow::Result<i32> {
    let device = match args.device.as_str() {
        "cpu" => Device::Cpu,
        spec => tch_device(gpus_for(spec)?.first().map(String::as_str).unwrap_or("cpu")),
    };
    if args.threads > 0 {
        tch::set_num_threads(args.threads);
    }
    let precision = Precision::parse(&args.precision).ok_or_else(|| anyhow::anyhow!("precision {}", args.precision))?;
    let unet = match args.unet.as_str() {
        "sd15" => UNet2DConditionConfig::sd15(),
        path => UNet2DConditionConfig::from_file(&PathBuf::from(path))?,
    };
    let vae = match args.vae.as_str() {
        "sd15" => AutoencoderKLConfig::sd15(),
        path => AutoencoderKLConfig::from_file(&PathBuf::from(path))?,
    };
    let vision = match args.clip.as_str() {
        "vit-l14" => VisionConfig::vit_l14(),
        path => ClipConfig::from_transformers_json(&PathBuf::from(path))?.vision.ok_or_else(|| anyhow::anyhow!("{path}: no vision tower"))?,
    };
    let line = run_method(&args, &unet, &vae, &vision, device, precision)?;
    println!("{line}");
    Ok(0)
}

/// Median and minimum of `times` (seconds).
fn median_min(mut times: Vec<f64>) -> (f64, f64) {
    times.sort_by(f64::total_cmp);
    (times[times.len() / 2], times[0])
}

fn run_method(args: &BenchStepArgs, cfg: &UNet2DConditionConfig, vae_cfg: &AutoencoderKLConfig, vision: &VisionConfig, device: Device, precision: Precision) -> anyhow::Result<serde_json::Value> {
    let memory = Memory::start(device);
    let rid = args.method == "rid";
    tch::manual_seed(0);
    let targets = default_targets();
    let mut vs = precision.new_store(device);
    let lora = LoraGroup::new(targets.clone());
    let unet = tch::no_grad(|| UNet2DConditionModel::new(vs.root(), cfg, Some(&lora)))?;
    let mut vae_vs = precision.new_store(device);
    let vae = tch::no_grad(|| AutoencoderKL::new(vae_vs.root(), vae_cfg))?;
    for store in [&mut vs, &mut vae_vs] {
        precision.cast_store(store);
        store.freeze();
    }
    let reward = AestheticReward::random(vision, device, precision.kind())?;
    let frozen_elements: u64 = [&vs, &vae_vs].iter().flat_map(|s| s.variables().into_values()).map(|t| t.numel() as u64).sum::<u64>() + reward.parameters();
    lora.add_adapter(args.rank, LoraInit::KaimingUniform, 0)?;
    // B starts at zero; a non-zero B makes A's gradient (and the teacher's pass) real work.
    tch::no_grad(|| {
        for mut t in lora.trainable_tensors().into_iter().skip(1).step_by(2) {
            t.copy_(&(Tensor::randn(t.size(), (Kind::Float, device)) * 1e-3));
        }
    });
    if rid {
        lora.init_teacher()?;
    }
    let mut opt = AdamW::new(lora.trainable_tensors(), AdamWConfig { lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 });
    let sampler = Sampler::new(DdimConfig::default(), SamplerConfig { steps: 50, eta: 0.0, guidance: args.guidance })?;
    let denoiser = CastUnet { unet: &unet, compute: precision.kind() };
    let decode = |z: &Tensor| vae.decode_images(z, precision.kind());
    let score = |images: &Tensor, prompts: &[String]| Reward::score(&reward, images, prompts).map_err(|e| e.to_string());
    let objective = if rid { Objective::Rid { lambda: 0.1, distill: Distill::LastStep, space: DistillSpace::Image } } else { Objective::Baseline };
    let backprop = if args.checkpointing { Backprop::Checkpointed { chunk: args.decode_chunk.max(1) } } else { Backprop::Whole };
    let step = Step { objective, backprop, sampler: &sampler, parts: Parts { model: &denoiser, lora: &lora, decode: &decode, reward: &score } };
    let m = args.micro.max(1);
    let context = |b: i64| (Tensor::randn([b, 77, cfg.cross_attention_dim], (Kind::Float, device)) * 0.5).to_kind(precision.kind());
    let (cond, uncond) = (context(m), context(1));
    let side = vae_cfg.latent_side(args.resolution);
    let z_1 = Tensor::randn([m, cfg.in_channels, side, side], (Kind::Float, device));
    let prompts: Vec<String> = (0..m).map(|i| format!("prompt {i}")).collect();
    let batch = MicroBatch { cond: &cond, uncond: &uncond, prompts: &prompts, seed: 0 };

    let mut finite = true;
    let mut update = |opt: &mut AdamW| -> anyhow::Result<()> {
        let teacher = step.teacher_target(&batch, &z_1, &z_1)?;
        let out = step.last_step_backward(&batch, &z_1, teacher.as_ref(), 1.0)?;
        // Random weights in half precision may overflow; the work is the same, so it is timed
        // and reported rather than refused.
        let norm = clip_grad_norm(opt.params(), 5.0);
        finite &= norm.is_finite() && out.loss.is_finite();
        opt.step();
        opt.zero_grad();
        if rid {
            lora.ema_update(0.99)?;
        }
        Ok(())
    };
    for _ in 0..args.warmup {
        update(&mut opt)?;
    }
    synchronize(device);
    let mut times = Vec::with_capacity(args.steps);
    for _ in 0..args.steps.max(1) {
        let start = Instant::now();
        update(&mut opt)?;
        synchronize(device);
        times.push(start.elapsed().as_secs_f64());
    }
    // A sampling step N..2: one guided UNet call without gradient.
    let mut sample_times = Vec::with_capacity(args.steps);
    for _ in 0..args.steps.max(1) {
        let start = Instant::now();
        let _z = tch::no_grad(|| sampler.step(&denoiser as &dyn EpsModel, &z_1, 10, &cond, &uncond, 0))?;
        synchronize(device);
        sample_times.push(start.elapsed().as_secs_f64());
    }
    let (median, min) = median_min(times);
    let (sample_median, _) = median_min(sample_times);
    let shapes = TrainShapes { unet: cfg, vae: vae_cfg, resolution: args.resolution, reward_towers: vec![vision.clone()], reward_fp32_images: 0.0 };
    let train_step = TrainStep {
        micro: m,
        guided: args.guidance != 1.0,
        rank: args.rank,
        earlier_ranks: 0,
        teacher: rid.then_some(DistillSpace::Image),
        decode_chunk: args.checkpointing.then_some(args.decode_chunk.max(1) as i64),
    };
    let mut estimate = training_estimate(&shapes, &targets, &train_step, precision)?;
    estimate.weights = frozen_elements * precision.bytes();
    let measured = memory.peak_growth();
    Ok(json!({
        "side": "ril-pipe",
        "method": if rid { "rid" } else { "baseline" },
        "device": format!("{device:?}"),
        "precision": precision.name(),
        "micro_batch": m,
        "checkpointing": args.checkpointing,
        "decode_chunk": args.checkpointing.then_some(args.decode_chunk.max(1)),
        "resolution": args.resolution,
        "median_s": median,
        "min_s": min,
        "sample_step_s": sample_median,
        "steps": args.steps.max(1),
        "finite": finite,
        "frozen_parameters": frozen_elements,
        "lora_parameters": lora.trainable_tensors().iter().map(|t| t.numel() as u64).sum::<u64>(),
        "peak_memory_bytes": measured,
        "peak_memory_measure": if matches!(device, Device::Cuda(_)) { "cudaMemGetInfo used - baseline (includes the caching allocator's reserve)" } else { "VmHWM growth" },
        "estimate_bytes": estimate.peak(),
        "estimate": estimate.describe(),
    }))
}
