//! `ril-pipe bench-step` (hidden): times the last-step training update of the trainer on a
//! UNet with random weights (the full SD1.5 config by default), for `scripts/gpu_check.sh`,
//! which runs the same step in PyTorch eager (`scripts/gpu_step_torch.py`) and compares.
//!
//! A step, as in `stages::train` and `method::objective`: the guided last UNet call z_1 -> z_0
//! with gradient (the frozen UNet in `--precision`, the new LoRA adapter fp32), the DDIM update
//! in fp32, a stand-in reward `-mean(z_0^2)` (no VAE, no reward model: the UNet is what both
//! sides share), for RID the EMA teacher's pass without gradient and the distillation term
//! `0.1 mean((z_0 - z_0^T)^2)`, backward, gradient clipping at 5, AdamW, and for RID the EMA
//! update. Prints one JSON line: median and minimum seconds per step, the peak memory
//! measured (CUDA: device memory in use, `cudaMemGetInfo`, which includes libtorch's cache and
//! the context; CPU: growth of the peak resident set) and the estimate of `stages::memory`.
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use ril_pipe::method::objective::with_teacher;
use ril_pipe::method::optim::{clip_grad_norm, AdamW, AdamWConfig};
use ril_pipe::method::sampling::{CastUnet, EpsModel, Sampler, SamplerConfig};
use ril_pipe::models::ddim::DdimConfig;
use ril_pipe::models::lora::{default_targets, LoraGroup, LoraInit};
use ril_pipe::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use ril_pipe::stages::device::{cuda_memory, gpus_for, tch_device};
use ril_pipe::stages::memory::unet_step_estimate;
use ril_pipe::stages::precision::Precision;
use serde_json::json;
use tch::{Device, Kind, Tensor};

#[derive(Args)]
pub struct BenchStepArgs {
    /// The UNet: `sd15` (Stable Diffusion v1.5's config) or a diffusers config.json.
    #[arg(long, default_value = "sd15")]
    unet: String,
    /// Latent side (SD1.5 at 512x512 pixels: 64).
    #[arg(long, default_value_t = 64)]
    latent: i64,
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
    baseline: u64,
}

impl Memory {
    /// Memory in use before anything of the benchmark is allocated.
    fn start(device: Device) -> anyhow::Result<Memory> {
        let baseline = match device {
            Device::Cuda(i) => {
                let (free, total) = cuda_memory(i).map_err(anyhow::Error::msg)?;
                total - free
            }
            _ => {
                reset_peak_rss();
                rss().map_or(0, |(_, now)| now)
            }
        };
        Ok(Memory { device, baseline })
    }

    /// The growth of memory in use since `start`, at its peak (CUDA: the allocator keeps what
    /// it reserved, so the memory in use now is its peak).
    fn peak_growth(&self) -> Option<u64> {
        match self.device {
            Device::Cuda(i) => cuda_memory(i).ok().map(|(free, total)| (total - free).saturating_sub(self.baseline)),
            _ => rss().map(|(peak, _)| peak.saturating_sub(self.baseline)),
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
    let cfg = match args.unet.as_str() {
        "sd15" => UNet2DConditionConfig::sd15(),
        path => UNet2DConditionConfig::from_file(&PathBuf::from(path))?,
    };
    let line = run_method(&args, &cfg, device, precision, args.method == "rid")?;
    println!("{line}");
    Ok(0)
}

fn run_method(args: &BenchStepArgs, cfg: &UNet2DConditionConfig, device: Device, precision: Precision, rid: bool) -> anyhow::Result<serde_json::Value> {
    let memory = Memory::start(device)?;
    tch::manual_seed(0);
    let targets = default_targets();
    let mut vs = precision.new_store(device);
    let lora = LoraGroup::new(targets.clone());
    let unet = tch::no_grad(|| UNet2DConditionModel::new(vs.root(), cfg, Some(&lora)))?;
    precision.cast_store(&mut vs);
    vs.freeze();
    let unet_elements: u64 = vs.variables().values().map(|t| t.numel() as u64).sum();
    lora.add_adapter(args.rank, LoraInit::KaimingUniform, 0)?;
    // B starts at zero; a non-zero B makes A's gradient (and the teacher's pass) real work.
    tch::no_grad(|| {
        for mut t in lora.trainable_tensors().into_iter().skip(1).step_by(2) {
            let _ = t.copy_(&(Tensor::randn(t.size(), (Kind::Float, device)) * 1e-3));
        }
    });
    if rid {
        lora.init_teacher()?;
    }
    let mut opt = AdamW::new(lora.trainable_tensors(), AdamWConfig { lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 });
    let sampler = Sampler::new(DdimConfig::default(), SamplerConfig { steps: 50, eta: 0.0, guidance: args.guidance })?;
    let denoiser = CastUnet { unet: &unet, compute: precision.kind() };
    let m = args.micro.max(1);
    let context = |b: i64| (Tensor::randn([b, 77, cfg.cross_attention_dim], (Kind::Float, device)) * 0.5).to_kind(precision.kind());
    let (cond, uncond) = (context(m), context(1));
    let z_1 = Tensor::randn([m, cfg.in_channels, args.latent, args.latent], (Kind::Float, device));

    let step = |opt: &mut AdamW| -> anyhow::Result<()> {
        let z_0 = sampler.last_step(&denoiser as &dyn EpsModel, &z_1, &cond, &uncond, 0)?;
        let mut loss = z_0.square().mean(Kind::Float);
        if rid {
            let teacher = with_teacher(&lora, || tch::no_grad(|| sampler.last_step(&denoiser, &z_1, &cond, &uncond, 0)))??;
            loss = loss + (&z_0 - teacher.detach()).square().mean(Kind::Float) * 0.1;
        }
        loss.backward();
        let norm = clip_grad_norm(opt.params(), 5.0);
        anyhow::ensure!(norm.is_finite(), "non-finite gradient norm {norm}");
        opt.step();
        opt.zero_grad();
        if rid {
            lora.ema_update(0.99)?;
        }
        Ok(())
    };
    for _ in 0..args.warmup {
        step(&mut opt)?;
    }
    synchronize(device);
    let mut times = Vec::with_capacity(args.steps);
    for _ in 0..args.steps.max(1) {
        let start = Instant::now();
        step(&mut opt)?;
        synchronize(device);
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let estimate = unet_step_estimate(cfg, args.latent, &targets, m, args.guidance != 1.0, args.rank, rid, precision, unet_elements)?;
    let measured = memory.peak_growth();
    Ok(json!({
        "side": "tch",
        "method": if rid { "rid" } else { "baseline" },
        "device": format!("{device:?}"),
        "precision": precision.name(),
        "micro_batch": m,
        "latent": args.latent,
        "median_s": median,
        "min_s": times[0],
        "steps": times.len(),
        "unet_parameters": unet_elements,
        "lora_parameters": lora.trainable_tensors().iter().map(|t| t.numel() as u64).sum::<u64>(),
        "peak_memory_bytes": measured,
        "peak_memory_measure": if matches!(device, Device::Cuda(_)) { "cudaMemGetInfo used - baseline (includes the caching allocator's reserve)" } else { "VmHWM growth" },
        "estimate_bytes": estimate.peak(),
        "estimate_tensors_bytes": estimate.weights + estimate.adapters + estimate.activations + estimate.buffers,
        "estimate": estimate.describe(),
    }))
}
