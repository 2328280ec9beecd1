//! `ril-pipe lora export` through the built binary, on models trained for the test on the
//! committed tiny world (a RID chain of two tasks, a soup with unequal coefficients): the files
//! and weights it lists, and the exported adapters read back give the model's own UNet output.
//! (The comparison with diffusers itself is the parity test `tests/parity/lora_export.rs`.)

use std::path::Path;

use ril_pipe::exec::filehash::FileHasher;
use ril_pipe::exec::plan::plan;
use ril_pipe::exec::Cache;
use ril_pipe::models::component::{self, LoadedComponent, Operation};
use ril_pipe::models::lora::peft::AdapterIndex;
use ril_pipe::models::lora::LoraGroup;
use ril_pipe::models::weights::TensorMap;
use ril_pipe::pipeline::{load_resolved, Override};
use ril_pipe::models::precision::Precision;
use ril_pipe::stages::world::ModelRecord;
use crate::support::{max_abs_diff, output_text, ril_in, tiny_weights};
use ril_pipe::method::noise::gaussian;
use tch::{Device, Tensor};

const PIPELINE: &str = r#"
defaults:
  finetune: {epochs: 1, prompts_per_epoch: 4, batch_size: 2, ddim_steps: 2, guidance: 3.0, lr: 1.0e-2, lora_rank: 2}
stages:
  - id: base
    kind: tiny_world
    params: {root: ROOT}
  - id: ft/rid/${step}
    kind: finetune
    chain: {over: [aesthetic, hps], as: task, link: model, first: base}
    params: {task: "${task}", method: rid}
  - id: ft/compress
    kind: finetune
    inputs: {model: base}
    params: {task: compress, method: baseline}
  - id: soup
    kind: soup
    inputs: {models: [ft/rid/1, ft/compress]}
    params: {coefficients: [0.7, 0.3]}
"#;

/// The model's own UNet output (as the stages load it) and the output with the exported files.
fn outputs(dir: &Path, stage: &str, exported: &Path) -> (Tensor, Tensor) {
    let file = dir.join("p.yaml");
    let registry = ril_pipe::stages::registry();
    let pipeline = load_resolved(&file, &registry.schemas(), &[] as &[Override]).unwrap();
    let cache = Cache::new(dir.join("cache"));
    let object = plan(&pipeline, &registry, &cache, &FileHasher::ephemeral()).unwrap().cached_object(&cache, stage, &[]).unwrap();
    let (record, adapters) = ModelRecord::of_object(&object, stage).unwrap();
    let diffusion = record.load_diffusion(adapters.as_deref(), Device::Cpu, Precision::Fp32).unwrap();
    // Seeded ChaCha noise rather than torch's global generator, which the tests running beside
    // this one in the process draw from between a `manual_seed` and the draws that follow it.
    let sample = gaussian(3, 0, &[2, 4, 8, 8], Device::Cpu);
    let timesteps = Tensor::from_slice(&[901i64, 21]);
    let context = gaussian(3, 1, &[2, 28, 64], Device::Cpu);
    let own = tch::no_grad(|| diffusion.unet.forward(&sample, &timesteps, &context));
    let unet_dir = tiny_weights().join("diffusion/unet");
    let config = component::config_for(Operation::Unet, &unet_dir, None).unwrap();
    let group = LoraGroup::from_peft_path(exported).unwrap();
    let loaded = LoadedComponent::load(config, &unet_dir, Device::Cpu, Some(&group)).unwrap();
    let inputs: TensorMap = [("sample", sample), ("timestep", timesteps), ("encoder_hidden_states", context)].into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    let theirs = component::run(Operation::Unet, &loaded, &inputs).unwrap().into_iter().find(|(n, _)| n == "sample").unwrap().1;
    (own, theirs)
}

#[test]
fn lora_export_writes_the_adapters_and_weights_of_a_cached_model() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("p.yaml"), PIPELINE.replace("ROOT", &tiny_weights().display().to_string())).unwrap();

    // Nothing is cached yet: refused, nothing computed, nothing written.
    let out = ril_in(dir, &["lora", "export", "p.yaml", "ft/rid/2", "--out", "rid"]);
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    assert!(output_text(&out).contains("stage `ft/rid/2` is not in the cache") && output_text(&out).contains("`ril-pipe run p.yaml` computes it and the 2 missing stages it needs (`base`, `ft/rid/1`)"), "{}", output_text(&out));
    assert!(!dir.join("rid").exists() && !dir.join("cache/objects").exists());

    let out = ril_in(dir, &["run", "p.yaml", "--device", "cpu", "--no-progress"]);
    assert!(out.status.success(), "{}", output_text(&out));

    let out = ril_in(dir, &["lora", "export", "p.yaml", "ft/rid/2", "--out", "rid", "--merged"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let index = AdapterIndex::read(&dir.join("rid/adapters.json")).unwrap();
    assert_eq!(index.set_adapters.adapter_names, ["adapter0", "adapter1"]);
    assert_eq!(index.set_adapters.adapter_weights, [1.0, 1.0]);
    assert_eq!(index.adapters.iter().map(|a| a.task.clone().unwrap()).collect::<Vec<_>>(), ["aesthetic", "hps"]);
    assert!(index.adapters.iter().all(|a| a.rank == 2 && a.alpha == 2.0));
    let merged = index.merged.as_ref().unwrap();
    assert_eq!((merged.rank, merged.weight), (4, 1.0));
    let mut files: Vec<String> = std::fs::read_dir(dir.join("rid")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    files.sort();
    assert_eq!(files, ["adapter0.safetensors", "adapter1.safetensors", "adapters.json", "merged.safetensors"]);
    let (own, exported) = outputs(dir, "ft/rid/2", &dir.join("rid"));
    let (own_again, merged) = outputs(dir, "ft/rid/2", &dir.join("rid/merged.safetensors"));
    assert!(max_abs_diff(&own, &exported) <= 1e-6, "{}", max_abs_diff(&own, &exported));
    assert!(max_abs_diff(&own_again, &merged) <= 1e-5, "{}", max_abs_diff(&own_again, &merged));

    // A soup: its members' adapters with their coefficients as the weights; a second export
    // replaces the folder as a whole.
    let out = ril_in(dir, &["lora", "export", "p.yaml", "soup", "--out", "rid"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let index = AdapterIndex::read(&dir.join("rid/adapters.json")).unwrap();
    assert_eq!(index.origin, "soup");
    assert_eq!(index.set_adapters.adapter_weights, [0.7, 0.3]);
    assert!(index.merged.is_none() && !dir.join("rid/merged.safetensors").exists());
    let (own, exported) = outputs(dir, "soup", &dir.join("rid"));
    assert!(max_abs_diff(&own, &exported) <= 1e-6, "{}", max_abs_diff(&own, &exported));

    // The base model has nothing to export.
    let out = ril_in(dir, &["lora", "export", "p.yaml", "base", "--out", "base"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(output_text(&out).contains("no LoRA adapters to export"), "{}", output_text(&out));
}
