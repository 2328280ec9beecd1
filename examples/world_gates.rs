//! The shape gates and the aesthetic gate of `tiny_export`, measured on an exported bundle with
//! the same instruments, seeds and settings (for a bundle exported before the shape gates, such
//! as the committed weights): `cargo run --release --example world_gates -- tiny/weights`.
use std::path::Path;

use ril_pipe::method::sampling::{initial_latents, CastUnet, Sampler, SamplerConfig};
use ril_pipe::method::monitor::Quiet;
use ril_pipe::models::precision::Precision;
use ril_pipe::rewards::aesthetic::AestheticReward;
use ril_pipe::stages::world::{read_prompts, tiny_world_spec, ModelRecord};
use ril_pipe::tiny::train::data::Excluded;
use ril_pipe::tiny::train::gates::GateReport;
use ril_pipe::tiny::train::{aesthetic as taesthetic, shape_probe, vae as tvae, Schedule};
use tch::{Device, Kind, Tensor};

/// `tiny_export`'s defaults (pipelines/tiny_world.yaml keeps them): sample seed, samples per
/// test prompt, DDIM steps, guidance; the shape probe's schedule; the Pearson gate's renders.
const SEED: u64 = 0;
const PER_PROMPT: usize = 8;

fn main() -> anyhow::Result<()> {
    let root = std::env::args().nth(1).ok_or_else(|| anyhow::anyhow!("usage: world_gates BUNDLE_DIR"))?;
    let device = Device::Cpu;
    let world = tiny_world_spec(Path::new(&root))?;
    let test = read_prompts(&world.test_prompts)?;
    let t = std::time::Instant::now();
    let aesthetic = AestheticReward::load(&world.aesthetic_clip, &world.aesthetic_head, device, Kind::Float)?;
    let r = taesthetic::rating_correlation(&aesthetic, &test, 20, 1002, device)?;
    println!("aesthetic.pearson_r (20 renders of each test prompt, seed 1002): {r:.4}  [{:.0}s]", t.elapsed().as_secs_f64());
    let record = ModelRecord { world: world.clone(), tasks: Vec::new(), origin: "base".into(), adapters: None, lora_targets: ril_pipe::models::lora::default_targets() };
    let diffusion = record.load_diffusion(None, device, Precision::Fp32)?;
    let (seed, per) = (SEED, PER_PROMPT);
    let sampler = Sampler::new(diffusion.ddim.clone(), SamplerConfig { steps: 10, eta: 0.0, guidance: 3.0 })?;
    let uncond = diffusion.uncond()?;
    let all: Vec<String> = test.iter().flat_map(|p| std::iter::repeat_n(p.clone(), per)).collect();
    let mut images = Vec::new();
    for (k, chunk) in all.chunks(64).enumerate() {
        let cond = diffusion.encode_prompts(chunk)?;
        let z = initial_latents(seed, (k * 64) as u64, chunk.len() as i64, diffusion.latent_shape, device);
        let z0 = sampler.sample(&CastUnet::of(&diffusion), &z, &cond, &uncond, seed)?;
        images.push(tch::no_grad(|| diffusion.decode(&z0)));
    }
    let samples = Tensor::cat(&images, 0);
    println!("samples [{:.0}s]", t.elapsed().as_secs_f64());
    let schedule = Schedule { steps: 600, batch: 128, lr: 2e-3, warmup: 50, weight_decay: 0.0, seed, checkpoint_every: 0 };
    let (probe, summary) = shape_probe::train(&schedule, &Excluded::new(&test), device, &mut Quiet::default())?;
    println!("probe {summary:?} [{:.0}s]", t.elapsed().as_secs_f64());
    let mut report = GateReport::default();
    let reconstruct = |x: &Tensor| tvae::reconstruct(&diffusion.vae, x);
    shape_probe::shape_gates(&mut report, &probe, &test, &samples, per, seed + 4000, &reconstruct)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
