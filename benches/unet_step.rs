//! One LoRA training step of a tiny UNet under tch against PyTorch eager.
//!
//! A step is the last-step recipe of the trainer: `no_grad_calls` UNet calls without gradient (a
//! stand-in denoising update), then one call with gradient, backward and an AdamW step on the
//! newest adapter. Both sides read `benches/unet_step.json` (model config, batch, rank, threads);
//! the PyTorch side is `benches/unet_step.py`, run with `$RIL_PYTHON` (default `python`).
//! Prints the median step time of each and their ratio (target: tch <= 0.9x PyTorch).
//! `cargo bench --bench unet_step -- <config.json>` runs another configuration.
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use ril_pipe::models::lora::{LoraGroup, LoraInit};
use ril_pipe::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use serde::Deserialize;
use tch::nn::VarStore;
use tch::{COptimizer, Device, Kind, Tensor};

#[derive(Deserialize)]
struct BenchConfig {
    unet: UNet2DConditionConfig,
    batch: i64,
    latent_size: i64,
    context_tokens: i64,
    rank: i64,
    targets: Vec<String>,
    no_grad_calls: i64,
    lr: f64,
    weight_decay: f64,
    threads: i32,
    warmup_steps: usize,
    timed_steps: usize,
}

/// Median and minimum step time in seconds (the minimum shows the cost without interference
/// from other processes, which on a shared machine can dominate the median).
#[derive(Debug, Clone, Copy, Deserialize)]
struct Timing {
    median_s: f64,
    min_s: f64,
}

impl Timing {
    fn of(mut times: Vec<f64>) -> Timing {
        times.sort_by(f64::total_cmp);
        let n = times.len();
        let median_s = if n % 2 == 1 { times[n / 2] } else { (times[n / 2 - 1] + times[n / 2]) / 2.0 };
        Timing { median_s, min_s: times[0] }
    }
}

fn tch_timing(cfg: &BenchConfig) -> anyhow::Result<(Timing, i64)> {
    tch::set_num_threads(cfg.threads);
    tch::manual_seed(0);
    let mut vs = VarStore::new(Device::Cpu);
    let group = LoraGroup::new(cfg.targets.clone());
    let unet = UNet2DConditionModel::new(vs.root(), &cfg.unet, Some(&group))?;
    vs.freeze();
    group.add_adapter(cfg.rank, LoraInit::KaimingUniform, 0)?;
    let mut optimizer = COptimizer::adamw(cfg.lr, 0.9, 0.999, cfg.weight_decay, 1e-8, false)?;
    let params = group.trainable_tensors();
    for p in &params {
        optimizer.add_parameters(p, 0)?;
    }
    let lora_params = params.iter().map(|p| p.numel() as i64).sum();

    let (b, s, n) = (cfg.batch, cfg.latent_size, cfg.no_grad_calls);
    let options = (Kind::Float, Device::Cpu);
    let context = Tensor::randn([b, cfg.context_tokens, cfg.unet.cross_attention_dim], options);
    let noise = Tensor::randn([b, cfg.unet.in_channels, s, s], options);
    let timesteps: Vec<Tensor> =
        (0..=n).map(|k| Tensor::full([b], 981 - 100 * k, (Kind::Int64, Device::Cpu))).collect();

    let step = |optimizer: &mut COptimizer| -> anyhow::Result<()> {
        let x = tch::no_grad(|| {
            let mut x = noise.shallow_clone();
            for t in &timesteps[..n as usize] {
                x = &x - unet.forward(&x, t, &context) * 0.1;
            }
            x
        });
        let eps = unet.forward(&x, &timesteps[n as usize], &context);
        eps.pow_tensor_scalar(2).mean(Kind::Float).backward();
        optimizer.step()?;
        optimizer.zero_grad()?;
        Ok(())
    };
    for _ in 0..cfg.warmup_steps {
        step(&mut optimizer)?;
    }
    let mut times = Vec::with_capacity(cfg.timed_steps);
    for _ in 0..cfg.timed_steps {
        let start = Instant::now();
        step(&mut optimizer)?;
        times.push(start.elapsed().as_secs_f64());
    }
    anyhow::ensure!(!times.is_empty(), "timed_steps must be positive");
    Ok((Timing::of(times), lora_params))
}

#[derive(Deserialize)]
struct PythonResult {
    #[serde(flatten)]
    timing: Timing,
    lora_params: i64,
}

fn pytorch_timing(config: &Path, script: &Path) -> anyhow::Result<PythonResult> {
    let python = std::env::var("RIL_PYTHON").unwrap_or_else(|_| "python".to_string());
    let output = Command::new(&python).arg(script).arg(config).output()?;
    if !output.status.success() {
        anyhow::bail!("{python} {} failed: {}", script.display(), String::from_utf8_lossy(&output.stderr));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    Ok(serde_json::from_str(line)?)
}

fn main() -> anyhow::Result<()> {
    let benches = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches");
    // cargo passes `--bench`; a further argument names another configuration.
    let config_path = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| benches.join("unet_step.json"));
    let cfg: BenchConfig = serde_json::from_str(&std::fs::read_to_string(&config_path)?)?;
    let (tch, tch_params) = tch_timing(&cfg)?;
    let report = |side: &str, t: Timing, params: i64| {
        println!(
            "unet_step {side:8} median {:8.2} ms, min {:8.2} ms per step ({params} LoRA parameters)",
            t.median_s * 1e3,
            t.min_s * 1e3
        )
    };
    report("tch", tch, tch_params);
    let torch = pytorch_timing(&config_path, &benches.join("unet_step.py"))?;
    report("pytorch", torch.timing, torch.lora_params);
    anyhow::ensure!(tch_params == torch.lora_params, "the two sides adapt different layers");
    println!(
        "unet_step ratio tch/pytorch: median {:.3}, min {:.3} (target <= 0.9; {} threads each, batch {}, {}x{} latents)",
        tch.median_s / torch.timing.median_s,
        tch.min_s / torch.timing.min_s,
        cfg.threads,
        cfg.batch,
        cfg.latent_size,
        cfg.latent_size
    );
    Ok(())
}
