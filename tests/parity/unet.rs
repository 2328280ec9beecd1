//! UNet2DConditionModel against diffusers: small random configs, and the full SD1.5 config with
//! weights both sides generate through libtorch's generator.
use std::collections::BTreeMap;
use std::path::Path;

use ril_pipe::models::lora::{default_targets, LoraGroup, LoraInit};
use ril_pipe::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use ril_pipe::models::weights::{self, Extra, TensorMap};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::support::{fixtures, max_abs_diff};

fn io(dir: &Path) -> TensorMap {
    weights::read_safetensors(&dir.join("io.safetensors")).unwrap()
}

/// Builds the case's model from its config.json and diffusers checkpoint.
pub fn load_case(dir: &Path, lora: Option<&LoraGroup>) -> (VarStore, UNet2DConditionModel) {
    let cfg = UNet2DConditionConfig::from_file(&dir.join("config.json")).unwrap();
    let vs = VarStore::new(Device::Cpu);
    let unet = UNet2DConditionModel::new(vs.root(), &cfg, lora).unwrap();
    let file = dir.join("diffusion_pytorch_model.safetensors");
    weights::assign(&vs, &weights::read_safetensors(&file).unwrap(), Extra::Reject, &file).unwrap();
    (vs, unet)
}

fn small_case(name: &str) {
    let dir = fixtures("unet").join(name);
    let (_vs, unet) = load_case(&dir, None);
    let io = io(&dir);
    let out = tch::no_grad(|| unet.forward(&io["sample"], &io["timesteps"], &io["context"]));
    let diff = max_abs_diff(&out, &io["out"]);
    println!("unet {name}: max abs diff {diff:.3e}");
    assert!(diff <= 1e-4, "{name}: max abs diff {diff}");
}

#[test]
fn unet_cross_attention_then_plain_block() {
    small_case("xattn_plain");
}

#[test]
fn unet_three_blocks_linear_projection_head_list() {
    small_case("three_blocks_linear");
}

#[test]
fn unet_all_cross_attention_odd_latents_centred_input() {
    small_case("all_xattn_odd");
}

#[test]
fn unet_plain_then_cross_attention_block() {
    small_case("plain_xattn");
}

/// The fixture's weight recipe (see `deterministic_parameter` in fixtures_unet.py).
fn deterministic_parameter(index: usize, name: &str, shape: &[i64]) -> Tensor {
    tch::manual_seed(index as i64);
    let t = Tensor::randn(shape, (Kind::Float, Device::Cpu));
    if name.ends_with("weight") && shape.len() >= 2 {
        let fan_in: i64 = shape[1..].iter().product();
        t * (1.0 / (fan_in as f64).sqrt())
    } else if name.ends_with("weight") {
        t * 0.1 + 1.0
    } else {
        t * 0.1
    }
}

#[test]
fn unet_sd15_full_config() {
    let dir = fixtures("unet").join("sd15");
    let io = io(&dir);
    // Both sides must draw the same numbers from the same seeds.
    tch::manual_seed(0);
    assert!(
        Tensor::randn([1000], (Kind::Float, Device::Cpu)).equal(&io["randn_check"]),
        "tch randn differs from torch"
    );
    tch::manual_seed(3);
    assert!(Tensor::randn([320, 4, 3, 3], (Kind::Float, Device::Cpu)).equal(&io["randn_check_4d"]));

    let cfg = UNet2DConditionConfig::from_file(&dir.join("config.json")).unwrap();
    assert_eq!(cfg, UNet2DConditionConfig::sd15(), "the SD1.5 constructor differs from diffusers' config");
    let vs = VarStore::new(Device::Cpu);
    let group = LoraGroup::new(default_targets());
    let unet = UNet2DConditionModel::new(vs.root(), &cfg, Some(&group)).unwrap();
    let variables: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    let count: i64 = variables.values().map(|v| v.numel() as i64).sum();
    assert_eq!(count, io["param_count"].int64_value(&[0]));
    let expected_sums = Vec::<f64>::try_from(&io["param_sums"]).unwrap();
    assert_eq!(expected_sums.len(), variables.len());
    tch::no_grad(|| {
        for (index, (name, var)) in variables.into_iter().enumerate() {
            let value = deterministic_parameter(index, &name, &var.size());
            let sum = value.sum(Kind::Double).double_value(&[]);
            assert_eq!(sum, expected_sums[index], "parameter {index} `{name}` generated differently");
            let mut var = var;
            var.copy_(&value);
        }
    });

    // SPEC: the 32 attention modules of SD1.5, four projections each, ~0.8 M parameters at r=4.
    assert_eq!(group.layer_names().len(), 128);
    group.add_adapter(4, LoraInit::KaimingUniform, 0).unwrap();
    let trainable: i64 = group.trainable_tensors().iter().map(|t| t.numel() as i64).sum();
    assert!((700_000..900_000).contains(&trainable), "{trainable} LoRA parameters");

    // A fresh adapter (B = 0) leaves the output of the base model.
    let out = tch::no_grad(|| unet.forward(&io["sample"], &io["timesteps"], &io["context"]));
    let diff = max_abs_diff(&out, &io["out"]);
    println!("unet sd15 ({count} parameters, {trainable} LoRA): max abs diff {diff:.3e}");
    assert!(diff <= 1e-4, "sd15: max abs diff {diff}");
}
