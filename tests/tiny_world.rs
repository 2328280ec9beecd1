//! The tiny world's pretraining pipeline (`pipelines/tiny_world.yaml`) end to end in miniature
//! (few steps, small models), and the committed weights (`tiny/weights`) read through the
//! study's code: `tiny_world`, `Diffusion::load`, the rewards and the CLIP-score model.
use std::path::{Path, PathBuf};

use ril_pipe::exec::launch::Outcome;
use ril_pipe::exec::{run, Cache, RunOptions};
use ril_pipe::method::sampling::{initial_latents, CastUnet, Sampler, SamplerConfig};
use ril_pipe::pipeline::{load_resolved, Override};
use ril_pipe::rewards::aesthetic::AestheticReward;
use ril_pipe::rewards::clip_loader::FrozenClip;
use ril_pipe::rewards::hps::HpsReward;
use ril_pipe::models::precision::Precision;
use ril_pipe::stages::registry;
use ril_pipe::stages::world::{read_prompts, verify_bundle, ModelRecord, MODEL_FILE};
use ril_pipe::tiny::train::gates::GateReport;
use tch::{Device, Kind};
use crate::support::repo;

/// The gates `tiny_export` records.
const GATES: [&str; 9] = [
    "clip.retrieval_top1",
    "clip.retrieval_top5",
    "vae.psnr_db",
    "aesthetic.pearson_r",
    "preference.pairwise_accuracy",
    "samples.clip_score_margin",
    "samples.fid_vs_noise",
    "shape_probe.renders",
    "samples.shape_agreement",
];

/// Runs a pipeline file with overrides; returns the cache and the object folder of each stage.
fn run_pipeline(file: &Path, sets: &[String], cache_dir: &Path) -> Vec<(String, PathBuf)> {
    let overrides: Vec<Override> = sets.iter().map(|s| Override::parse(s).unwrap()).collect();
    let pipeline = load_resolved(file, &registry().schemas(), &overrides).unwrap();
    let cache = Cache::new(cache_dir);
    let summary = run(&pipeline, &registry(), &cache, &RunOptions::default()).unwrap();
    for outcome in &summary.outcomes {
        assert!(matches!(outcome.outcome, Outcome::Executed { .. } | Outcome::Cached), "{}: {:?}", outcome.id, outcome.outcome);
    }
    summary.outcomes.iter().map(|o| (o.id.clone(), cache.object_dir(&o.key).unwrap())).collect()
}

/// Loads a bundle the way a study does and runs every model once; its `gates.json` must hold
/// each of the `expected` gates.
fn check_bundle_loads(bundle: &Path, work: &Path, expected: &[&str]) {
    assert!(verify_bundle(bundle).unwrap() > 20, "the manifest lists every file");
    // `tiny_world` on the bundle, as `pipelines/all_orders.yaml` starts.
    let file = work.join("world.yaml");
    std::fs::write(&file, format!("stages:\n  - id: base\n    kind: tiny_world\n    params: {{root: {:?}}}\n", bundle.display().to_string())).unwrap();
    let objects = run_pipeline(&file, &[], &work.join("cache"));
    let record: ModelRecord = serde_json::from_slice(&std::fs::read(objects[0].1.join(MODEL_FILE)).unwrap()).unwrap();
    let world = &record.world;
    let prompts = read_prompts(&world.test_prompts).unwrap();
    assert_eq!(prompts.len(), 50);
    assert_eq!(read_prompts(&world.train_prompts).unwrap().len(), 750);

    let diffusion = record.load_diffusion(None, Device::Cpu, Precision::Fp32).unwrap();
    assert_eq!(diffusion.latent_shape, [4, 8, 8]);
    let cond = diffusion.encode_prompts(&prompts[..2]).unwrap();
    let uncond = diffusion.uncond().unwrap();
    let sampler = Sampler::new(diffusion.ddim.clone(), SamplerConfig { steps: 4, eta: 0.0, guidance: 3.0 }).unwrap();
    let z = initial_latents(0, 0, 2, diffusion.latent_shape, Device::Cpu);
    let z0 = sampler.sample(&CastUnet::of(&diffusion), &z, &cond, &uncond, 0).unwrap();
    let images = tch::no_grad(|| diffusion.decode(&z0));
    assert_eq!(images.size(), vec![2, 3, 32, 32]);
    assert!(images.isfinite().all().int64_value(&[]) == 1);

    let aesthetic = AestheticReward::load(&world.aesthetic_clip, &world.aesthetic_head, Device::Cpu, Kind::Float).unwrap();
    let scores = tch::no_grad(|| aesthetic.score(&images)).unwrap();
    assert_eq!(scores.size(), vec![2]);
    let hps = HpsReward::load(&world.hps, Device::Cpu, Kind::Float).unwrap();
    let prefs = tch::no_grad(|| hps.score(&images, &prompts[..2])).unwrap();
    assert!(prefs.abs().max().double_value(&[]) <= 1.0 + 1e-5, "cosines");
    let clip = FrozenClip::load(&world.clip_score, Device::Cpu, Kind::Float).unwrap();
    let emb = clip.image_embeddings(&images).unwrap();
    let reference = ril_pipe::tiny::train::io::read_safetensors(&world.fid_reference).unwrap();
    assert_eq!(reference["mu"].size(), vec![emb.size()[1]]);
    assert_eq!(reference["sigma"].size(), vec![emb.size()[1], emb.size()[1]]);
    assert_eq!(reference["sigma"].kind(), Kind::Double);

    let gates = GateReport::read(&bundle.join("gates.json")).unwrap();
    for &name in expected {
        let gate = gates.gates.iter().find(|g| g.name == name).unwrap_or_else(|| panic!("no gate {name}"));
        assert!(gate.value.is_finite(), "{name}");
    }
    assert!(bundle.join("samples.png").is_file());
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[test]
fn miniature_pretraining_pipeline_runs_end_to_end_and_its_bundle_loads() {
    let dir = tempfile::tempdir().unwrap();
    let small = [
        "clip.steps=12", "clip.batch=16", "clip.text_width=32", "clip.text_layers=1", "clip.vision_width=32", "clip.vision_layers=1", "clip.embed_dim=16", "clip.eval_sets=1",
        "vae.steps=6", "vae.batch=4", "vae.block_out_channels=[8, 8, 8]", "vae.eval_renders=1",
        "aesthetic.pool=256", "aesthetic.steps=20", "aesthetic.eval_renders=1",
        "preference.steps=4", "preference.batch=4", "preference.eval_pairs=1",
        "unet.steps=6", "unet.batch=8", "unet.pool=64", "unet.block_out_channels=[16, 32, 32]",
        "export.samples_per_prompt=2", "export.fid_renders=2", "export.retrieval_sets=1", "export.psnr_renders=1", "export.rating_renders=1", "export.preference_pairs=1",
        "export.probe_steps=3", "export.probe_batch=8",
    ];
    let sets: Vec<String> = small.iter().map(|s| s.to_string()).collect();
    let objects = run_pipeline(&repo().join("pipelines/tiny_world.yaml"), &sets, &dir.path().join("cache"));
    let ids: Vec<&str> = objects.iter().map(|(id, _)| id.as_str()).collect();
    for id in ["prompts", "clip", "vae", "aesthetic", "preference", "unet", "export"] {
        assert!(ids.contains(&id), "{id} did not run: {ids:?}");
    }
    for (id, dir) in &objects {
        if id != "prompts" && id != "unet" {
            assert!(dir.join("gates.json").is_file(), "{id} writes its gates");
        }
    }
    let export = &objects.iter().find(|(id, _)| id == "export").unwrap().1;
    check_bundle_loads(export, dir.path(), &GATES);

    // A damaged copy of the bundle is refused by `tiny_world`, naming the file.
    let damaged = dir.path().join("damaged");
    copy_dir(export, &damaged);
    let victim = damaged.join("diffusion/unet/diffusion_pytorch_model.safetensors");
    let mut bytes = std::fs::read(&victim).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&victim, bytes).unwrap();
    let file = dir.path().join("damaged.yaml");
    std::fs::write(&file, format!("stages:\n  - id: base\n    kind: tiny_world\n    params: {{root: {:?}}}\n", damaged.display().to_string())).unwrap();
    let pipeline = load_resolved(&file, &registry().schemas(), &[]).unwrap();
    let summary = run(&pipeline, &registry(), &Cache::new(dir.path().join("cache-damaged")), &RunOptions::default()).unwrap();
    match &summary.outcomes[0].outcome {
        Outcome::Failed { error, .. } => assert!(error.contains("diffusion/unet/diffusion_pytorch_model.safetensors") && error.contains("differs from the manifest"), "{error}"),
        other => panic!("a damaged bundle was accepted: {other:?}"),
    }

    // A second run finds everything cached.
    let again = run_pipeline(&repo().join("pipelines/tiny_world.yaml"), &sets, &dir.path().join("cache"));
    assert_eq!(again.len(), objects.len());
}

#[test]
fn committed_weights_load_through_the_study_code() {
    let bundle = repo().join("tiny/weights");
    let dir = tempfile::tempdir().unwrap();
    check_bundle_loads(&bundle, dir.path(), &GATES);
    let size: u64 = std::fs::read_to_string(bundle.join("MANIFEST.txt"))
        .unwrap()
        .lines()
        .map(|l| std::fs::metadata(bundle.join(l.split_once("  ").unwrap().1)).unwrap().len())
        .sum();
    assert!(size <= 20 * 1024 * 1024, "the shipped weights are {size} bytes");
}
