//! One RID training step of the study on the tiny world, through the study's code paths:
//! the bundle read by `tiny_world_spec`, `Diffusion::load`, the aesthetic reward, a rank-4 LoRA
//! adapter with its EMA teacher, `micro_batch_loss` (DDIM steps N..2 without gradient, the last
//! UNet call with gradient, the teacher's last call, VAE decode, reward), backward, gradient
//! clipping, AdamW and the EMA update.
//!
//! `cargo bench --bench tiny_rid_step [-- BUNDLE]` (default `tiny/weights`). Settings from the
//! environment: `RID_BATCH` (8), `RID_STEPS` (DDIM steps, 10), `RID_GUIDANCE` (3, the study's),
//! `RID_THREADS` (1: on the shared 2-core machine a second intra-op thread made the step several times slower), `RID_TASK` (aesthetic, hps or compress). Prints the median wall time and the median process CPU time per step
//! (on a shared machine the wall time also measures the other processes).
use std::path::PathBuf;
use std::time::Instant;

use ril_pipe::method::objective::{micro_batch_loss, Distill, Objective, Parts};
use ril_pipe::method::optim::{clip_grad_norm, AdamW, AdamWConfig};
use ril_pipe::method::sampling::{initial_latents, Sampler, SamplerConfig};
use ril_pipe::models::lora::LoraInit;
use ril_pipe::stages::diffusion::Diffusion;
use ril_pipe::stages::precision::Precision;
use ril_pipe::stages::records::Task;
use ril_pipe::stages::reward_set::task_reward;
use ril_pipe::stages::world::{read_prompts, tiny_world_spec, ModelRecord};
use tch::{Device, Tensor};

/// CPU seconds of this process (all threads), from /proc (Linux).
fn process_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let root = std::env::args().skip(1).find(|a| !a.starts_with('-')).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("tiny/weights"));
    let batch: i64 = env("RID_BATCH", 8);
    let steps: usize = env("RID_STEPS", 10);
    let guidance: f64 = env("RID_GUIDANCE", 3.0);
    tch::set_num_threads(env("RID_THREADS", 1));
    let device = Device::Cpu;

    let world = tiny_world_spec(&root)?;
    let prompts = read_prompts(&world.train_prompts)?;
    let record = ModelRecord { world: world.clone(), tasks: Vec::new(), origin: "base".into(), adapters: None, lora_targets: ril_pipe::models::lora::default_targets() };
    let diffusion = Diffusion::load(&record, None, device, Precision::Fp32)?;
    let task = match std::env::var("RID_TASK").as_deref() {
        Ok("hps") => Task::Hps,
        Ok("compress") => Task::Compress,
        _ => Task::Aesthetic,
    };
    let reward = task_reward(task, &world, device, Precision::Fp32)?;
    diffusion.lora.add_adapter(4, LoraInit::KaimingUniform, 0)?;
    diffusion.lora.init_teacher()?;
    let params = diffusion.lora.trainable_tensors();
    let trainable: i64 = params.iter().map(|t| t.numel() as i64).sum();
    let mut optimizer = AdamW::new(params.iter().map(Tensor::shallow_clone).collect(), AdamWConfig { lr: 2e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 });
    let sampler = Sampler::new(diffusion.ddim.clone(), SamplerConfig { steps, eta: 0.0, guidance })?;
    let uncond = diffusion.uncond()?;
    let objective = Objective::Rid { lambda: 0.1, distill: Distill::LastStep };
    let denoiser = diffusion.denoiser();
    let decode = |z: &Tensor| diffusion.decode(z);

    let (warmup, timed) = (3, 15);
    let (mut walls, mut cpus) = (Vec::new(), Vec::new());
    for step in 0..warmup + timed {
        let (t0, c0) = (Instant::now(), process_cpu_seconds());
        let chunk: Vec<String> = (0..batch as usize).map(|i| prompts[(step * batch as usize + i) % prompts.len()].clone()).collect();
        let score = |images: &Tensor| reward.score(images, &chunk).map_err(|e| e.to_string());
        let parts = Parts { model: &denoiser, lora: &diffusion.lora, decode: &decode, reward: &score };
        let cond = diffusion.encode_prompts(&chunk)?;
        let z_n = initial_latents(7, (step as i64 * batch) as u64, batch, diffusion.latent_shape, device);
        let out = micro_batch_loss(objective, &sampler, &parts, &z_n, &cond, &uncond, step as u64)?;
        optimizer.zero_grad();
        out.loss.backward();
        clip_grad_norm(&params, 5.0);
        optimizer.step();
        diffusion.lora.ema_update(0.9)?;
        if step >= warmup {
            walls.push(t0.elapsed().as_secs_f64());
            cpus.push(process_cpu_seconds() - c0);
        }
    }
    println!(
        "RID step ({task:?} reward, batch {batch}, DDIM {steps} steps, guidance {guidance}, {} threads, {trainable} LoRA parameters): median wall {:.3} s, median CPU {:.3} s over {timed} steps",
        tch::get_num_threads(),
        median(walls),
        median(cpus)
    );
    Ok(())
}
