//! LoRA export to diffusers, diffusers as the oracle (`fixtures_lora_export.py`): on the tiny
//! world's diffusers folder, the adapters of a RID model after two tasks and of a soup, as
//! diffusers loads and weights them (`load_lora_weights` + `set_adapters`), give the UNet output
//! of ril-pipe's model within 1e-5 (fp32) and a full DDIM sample from the same z_N within 1e-4;
//! `lora export` writes those very files (same tensors, same rank, alpha and layers, the same
//! set_adapters weights), and reading them back (`model run unet --lora`) gives diffusers'
//! output again.
use std::path::{Path, PathBuf};

use ril_pipe::method::sampling::{CastUnet, Sampler, SamplerConfig};
use ril_pipe::models::component::{self, LoadedComponent, Operation};
use ril_pipe::models::lora::peft::{AdapterIndex, METADATA_KEY};
use ril_pipe::models::lora::{default_targets, LoraGroup};
use ril_pipe::models::weights::{self, read_safetensors_metadata, TensorMap};
use ril_pipe::stages::lora_export::export_lora;
use ril_pipe::models::precision::Precision;
use ril_pipe::records::Task;
use ril_pipe::stages::world::{tiny_world_spec, ModelRecord, ADAPTERS_FILE};
use tch::{Device, Tensor};

use crate::support::{fixtures, max_abs_diff, tiny_weights};

const UNET_TOLERANCE: f64 = 1e-5;
const SAMPLE_TOLERANCE: f64 = 1e-4;

/// The fixtures, checked to be made from the committed tiny world.
fn lora_fixtures() -> PathBuf {
    let dir = fixtures("lora_export");
    let made_for = std::fs::read(dir.join("world_manifest.txt")).unwrap();
    assert!(
        made_for == std::fs::read(tiny_weights().join("MANIFEST.txt")).unwrap(),
        "the lora_export fixtures were made for another tiny world: remove {} and run `make fixtures`",
        dir.display()
    );
    dir
}

/// A model as a cache object holds it: `model.json` and the adapter group of the case.
fn model_object(case: &Path, origin: &str, tasks: Vec<Task>, into: &Path) -> ModelRecord {
    let record = ModelRecord {
        world: tiny_world_spec(&tiny_weights()).unwrap(),
        tasks,
        origin: origin.into(),
        adapters: Some(ADAPTERS_FILE.into()),
        lora_targets: default_targets(),
    };
    record.write(into).unwrap();
    std::fs::copy(case.join("ril_adapters.safetensors"), into.join(ADAPTERS_FILE)).unwrap();
    record
}

fn unet_with(group: &LoraGroup, io: &TensorMap) -> Tensor {
    let unet_dir = tiny_weights().join("diffusion/unet");
    let config = component::config_for(Operation::Unet, &unet_dir, None).unwrap();
    let loaded = LoadedComponent::load(config, &unet_dir, Device::Cpu, Some(group)).unwrap();
    let inputs: TensorMap = [("sample", "sample"), ("timestep", "timesteps"), ("encoder_hidden_states", "context")]
        .into_iter()
        .map(|(name, key)| (name.to_string(), io[key].shallow_clone()))
        .collect();
    let outputs = component::run(Operation::Unet, &loaded, &inputs).unwrap();
    outputs.into_iter().find(|(n, _)| n == "sample").unwrap().1
}

fn check_case(case_name: &str, origin: &str, tasks: Vec<Task>) {
    let root = lora_fixtures();
    let case = root.join(case_name);
    let io = weights::read_safetensors(&case.join("io.safetensors")).unwrap();
    let object = tempfile::tempdir().unwrap();
    let record = model_object(&case, origin, tasks, object.path());

    // ril-pipe's model (as the stages load it) against diffusers with the exported files.
    let diffusion = record.load_diffusion(Some(&object.path().join(ADAPTERS_FILE)), Device::Cpu, Precision::Fp32).unwrap();
    let out = tch::no_grad(|| diffusion.unet.forward(&io["sample"], &io["timesteps"], &io["context"]));
    let lora_effect = max_abs_diff(&io["out"], &io["base"]);
    let unet_diff = max_abs_diff(&out, &io["out"]);
    assert!(lora_effect > 1000.0 * UNET_TOLERANCE, "{case_name}: the adapters change the UNet's output by only {lora_effect}");
    assert!(unet_diff <= UNET_TOLERANCE, "{case_name}: UNet output differs from diffusers' by {unet_diff:e}");

    let prompts: Vec<String> = std::fs::read_to_string(root.join("prompts.txt")).unwrap().lines().map(str::to_string).collect();
    let sampler = Sampler::new(diffusion.ddim.clone(), SamplerConfig { steps: 10, eta: 0.0, guidance: 3.0 }).unwrap();
    let cond = diffusion.encode_prompts(&prompts).unwrap();
    let uncond = diffusion.uncond().unwrap();
    let z_0 = sampler.sample(&CastUnet::of(&diffusion), &io["z_n"], &cond, &uncond, 0).unwrap();
    let sample_diff = max_abs_diff(&z_0, &io["z_0"]);
    assert!(sample_diff <= SAMPLE_TOLERANCE, "{case_name}: DDIM sample differs from diffusers' by {sample_diff:e}");

    // `lora export` writes the files diffusers was given.
    let out_dir = object.path().join("exported");
    let summary = export_lora(object.path(), case_name, &out_dir, true).unwrap();
    let expected = AdapterIndex::read(&case.join("peft/adapters.json")).unwrap();
    let strip = |e: &ril_pipe::models::lora::peft::AdapterEntry| (e.name.clone(), e.weight_name.clone(), e.weight, e.rank, e.alpha);
    assert_eq!(summary.index.adapters.iter().map(strip).collect::<Vec<_>>(), expected.adapters.iter().map(strip).collect::<Vec<_>>());
    assert_eq!(summary.index.set_adapters, expected.set_adapters);
    assert_eq!(summary.index.merged.as_ref().map(strip), expected.merged.as_ref().map(strip));
    assert_eq!(AdapterIndex::read(&out_dir.join("adapters.json")).unwrap(), summary.index);
    for entry in summary.index.adapters.iter().chain(&summary.index.merged) {
        let ours = weights::read_safetensors(&out_dir.join(&entry.weight_name)).unwrap();
        let theirs = weights::read_safetensors(&case.join("peft").join(&entry.weight_name)).unwrap();
        assert_eq!(ours.keys().collect::<Vec<_>>(), theirs.keys().collect::<Vec<_>>(), "{}", entry.weight_name);
        for (name, t) in &ours {
            assert!(t.equal(&theirs[name]), "{}: tensor {name} differs", entry.weight_name);
        }
        let meta = |dir: &Path| -> serde_json::Value {
            serde_json::from_str(&read_safetensors_metadata(&dir.join(&entry.weight_name)).unwrap()[METADATA_KEY]).unwrap()
        };
        assert_eq!(meta(&out_dir), meta(&case.join("peft")), "{}: LoRA config", entry.weight_name);
    }

    // Read back, as `model run unet --lora` does: diffusers' outputs again.
    let imported = unet_with(&LoraGroup::from_peft_path(&out_dir).unwrap(), &io);
    let imported_diff = max_abs_diff(&imported, &io["out"]);
    assert!(imported_diff <= UNET_TOLERANCE, "{case_name}: imported adapters: {imported_diff:e}");
    let merged = unet_with(&LoraGroup::from_peft_path(&out_dir.join("merged.safetensors")).unwrap(), &io);
    let merged_diff = max_abs_diff(&merged, &io["out_merged"]);
    assert!(merged_diff <= UNET_TOLERANCE, "{case_name}: merged file: {merged_diff:e}");
    println!(
        "lora export {case_name}: LoRA effect {lora_effect:.3e}; UNet {unet_diff:.2e}, DDIM z_0 {sample_diff:.2e}, imported {imported_diff:.2e}, merged {merged_diff:.2e}"
    );
}

#[test]
fn lora_export_of_a_rid_model_after_two_tasks_matches_diffusers() {
    check_case("rid", "finetune", vec![Task::Aesthetic, Task::Hps]);
}

#[test]
fn lora_export_of_a_soup_matches_diffusers() {
    check_case("soup", "soup", vec![Task::Aesthetic, Task::Hps, Task::Compress]);
}
