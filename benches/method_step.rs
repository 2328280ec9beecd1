//! RID's training-step time over the baseline's at the same batch and N (target: at most
//! 1 + 1.5/N, the paper's under-1% overhead at N = 50), and the evaluation throughput.
//!
//! RID does strictly more work per step (one teacher UNet call and one VAE decode, both without
//! gradient), so its ratio is at least 1 up to noise: the steps are interleaved, and the median
//! ratio of each pair is printed with the spread (minimum and maximum) of the pairs.
//!
//! Runs on the tiny world (`tiny/weights`) when it exists, else on the random-world fixture
//! (`$RIL_FIXTURES/world/random`). `cargo bench --profile dev --bench method_step [-- ROOT]`.
use std::path::PathBuf;
use std::time::Instant;

use ril_pipe::method::noise;
use ril_pipe::method::objective::{Backprop, Distill, DistillSpace, MicroBatch, Objective, Parts, Step};
use ril_pipe::method::optim::{AdamW, AdamWConfig};
use ril_pipe::method::sampling::{initial_latents, Sampler, SamplerConfig};
use ril_pipe::models::lora::LoraInit;
use ril_pipe::models::precision::Precision;
use ril_pipe::stages::reward_set::task_reward;
use ril_pipe::records::Task;
use ril_pipe::stages::world::{read_prompts, ModelRecord, WorldSpec};
use tch::{Device, Tensor};

const BATCH: usize = 8;
const STEPS: usize = 10;
const REPEATS: usize = 21;

fn world_root() -> PathBuf {
    if let Some(arg) = std::env::args().skip(1).find(|a| !a.starts_with('-')) {
        return PathBuf::from(arg);
    }
    let tiny = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tiny/weights");
    if tiny.join("world.json").exists() {
        return tiny;
    }
    PathBuf::from(std::env::var("RIL_FIXTURES").expect("set RIL_FIXTURES or pass a world root")).join("world/random")
}

/// The world record as the `tiny_world` stage would write it.
fn record(root: &std::path::Path) -> ModelRecord {
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(root.join("world.json")).expect("world.json")).expect("manifest");
    let at = |k: &str| root.join(m[k].as_str().expect(k));
    let clip = |k: &str| ril_pipe::rewards::clip_loader::ClipFiles {
        layout: ril_pipe::rewards::clip_loader::ClipLayout::Transformers,
        weights: at(k),
        config: None,
        tokenizer: at("tokenizer"),
    };
    ModelRecord {
        world: WorldSpec {
            name: "bench".into(),
            diffusion: at("diffusion"),
            resolution: m["resolution"].as_i64().expect("resolution"),
            aesthetic_clip: clip("aesthetic_clip"),
            aesthetic_head: at("aesthetic_head"),
            hps: clip("hps"),
            pickscore: None,
            clip_score: clip("clip_score"),
            fid_features: ril_pipe::stages::world::FidFeatures::Clip,
            inception: None,
            fid_reference: at("fid_reference"),
            train_prompts: at("train_prompts"),
            test_prompts: at("test_prompts"),
            jpeg_quality: m["jpeg_quality"].as_f64().unwrap_or(80.0),
            compress_reduction: Default::default(),
        },
        tasks: Vec::new(),
        origin: "base".into(),
        adapters: None,
        lora_targets: ["to_q", "to_k", "to_v", "to_out.0"].map(String::from).to_vec(),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let root = world_root();
    let threads = std::env::var("RIL_BENCH_THREADS").ok().and_then(|t| t.parse().ok()).unwrap_or(2);
    tch::set_num_threads(threads);
    let device = Device::Cpu;
    let model = record(&root);
    let diffusion = model.load_diffusion(None, device, Precision::Fp32).expect("load the world");
    diffusion.lora.add_adapter(4, LoraInit::KaimingUniform, 0).expect("adapter");
    diffusion.lora.init_teacher().expect("teacher");
    let reward = task_reward(&Task::Aesthetic, &model.world, &Default::default(), device, Precision::Fp32).expect("reward");
    let sampler = Sampler::new(diffusion.ddim.clone(), SamplerConfig { steps: STEPS, eta: 0.0, guidance: 3.0 }).expect("sampler");
    let prompts: Vec<String> = read_prompts(&model.world.train_prompts).expect("prompts").into_iter().take(BATCH).collect();
    let cond = diffusion.encode_prompts(&prompts).expect("encode");
    let uncond = diffusion.uncond().expect("uncond");
    let [c, h, w] = diffusion.latent_shape;
    let mut opt = AdamW::new(diffusion.lora.trainable_tensors(), AdamWConfig { lr: 1e-5, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 });
    let decode = |z: &Tensor| diffusion.decode(z);
    let reward_fn = |images: &Tensor, prompts: &[String]| reward.score(images, prompts).map_err(|e| e.to_string());
    let parts = || Parts { model: &diffusion.unet, lora: &diffusion.lora, decode: &decode, reward: &reward_fn };
    let baseline = Step { objective: Objective::Baseline, backprop: Backprop::Whole, sampler: &sampler, parts: parts() };
    let rid = Step { objective: Objective::Rid { lambda: 0.1, distill: Distill::LastStep, space: DistillSpace::Image }, backprop: Backprop::Whole, sampler: &sampler, parts: parts() };
    let mut step = |method: &Step, i: usize| -> f64 {
        let z_n = noise::gaussian(0, i as u64, &[BATCH as i64, c, h, w], device);
        let batch = MicroBatch { cond: &cond, uncond: &uncond, prompts: &prompts, seed: i as u64 };
        let start = Instant::now();
        method.micro_batch_backward(&batch, &z_n, 1.0).expect("step");
        opt.step();
        opt.zero_grad();
        if matches!(method.objective, Objective::Rid { .. }) {
            diffusion.lora.ema_update(0.99).expect("ema");
        }
        start.elapsed().as_secs_f64()
    };
    step(&baseline, 0);
    step(&rid, 0);
    let (mut base_t, mut rid_t, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    // Interleaved, so that load changes on a shared machine hit both alike.
    for i in 0..REPEATS {
        let b = step(&baseline, i + 1);
        let r = step(&rid, i + 1);
        base_t.push(b);
        rid_t.push(r);
        ratios.push(r / b);
    }
    let spread = (ratios.iter().copied().fold(f64::INFINITY, f64::min), ratios.iter().copied().fold(0.0, f64::max));
    let (b, r, ratio) = (median(base_t), median(rid_t), median(ratios));
    println!("world: {}  threads: {threads}  batch {BATCH}, N = {STEPS}, {REPEATS} interleaved pairs", root.display());
    println!("training step (median): baseline {:.1} ms, RID {:.1} ms", b * 1e3, r * 1e3);
    println!(
        "RID / baseline, median of the pairs = {ratio:.3} (pairs from {:.3} to {:.3}; target <= {:.3} = 1 + 1.5/N)",
        spread.0,
        spread.1,
        1.0 + 1.5 / STEPS as f64
    );

    let images = 32usize;
    let test: Vec<String> = read_prompts(&model.world.test_prompts).expect("test prompts");
    let batch_prompts: Vec<String> = (0..images).map(|i| test[i % test.len()].clone()).collect();
    let start = Instant::now();
    tch::no_grad(|| {
        let cond = diffusion.encode_prompts(&batch_prompts).expect("encode");
        let z_n = initial_latents(1, 0, images as i64, diffusion.latent_shape, device);
        let z_0 = sampler.sample(&diffusion.unet, &z_n, &cond, &uncond, 1).expect("sample");
        let x = diffusion.decode(&z_0);
        let _scores = reward.score(&x, &batch_prompts).expect("score");
    });
    let seconds = start.elapsed().as_secs_f64();
    println!("evaluation sampling + aesthetic score: {:.1} images/s ({images} images, N = {STEPS})", images as f64 / seconds);
}
