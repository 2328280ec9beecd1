//! AutoencoderKL against diffusers: posterior parameters and decodings, with both mid-block
//! attention namings.
use ril_pipe::models::vae::{self, AutoencoderKL, AutoencoderKLConfig};
use ril_pipe::models::weights::{self, Extra};
use tch::nn::VarStore;
use tch::Device;

use crate::support::{fixtures, max_abs_diff};

fn case(name: &str) {
    let dir = fixtures("vae").join(name);
    let cfg = AutoencoderKLConfig::from_file(&dir.join("config.json")).unwrap();
    let vs = VarStore::new(Device::Cpu);
    let model = AutoencoderKL::new(vs.root(), &cfg).unwrap();
    vae::load_weights(&vs, &dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    let io = weights::read_safetensors(&dir.join("io.safetensors")).unwrap();
    let ((mean, logvar), decoded) = tch::no_grad(|| (model.encode(&io["image"]), model.decode(&io["latent"])));
    let diffs = [
        ("mean", max_abs_diff(&mean, &io["mean"])),
        ("logvar", max_abs_diff(&logvar, &io["logvar"])),
        ("decoded", max_abs_diff(&decoded, &io["decoded"])),
    ];
    println!("vae {name}: {diffs:?}");
    for (what, diff) in diffs {
        assert!(diff <= 1e-4, "{name} {what}: max abs diff {diff}");
    }
}

#[test]
fn vae_two_blocks() {
    case("two_blocks");
}

#[test]
fn vae_three_blocks_legacy_attention_names() {
    case("three_blocks_legacy_names");
}

#[test]
fn vae_without_attention_and_quant_convs() {
    case("no_attention_no_quant");
}

#[test]
fn vae_legacy_names_need_the_rename() {
    let dir = fixtures("vae").join("three_blocks_legacy_names");
    let cfg = AutoencoderKLConfig::from_file(&dir.join("config.json")).unwrap();
    let vs = VarStore::new(Device::Cpu);
    let _model = AutoencoderKL::new(vs.root(), &cfg).unwrap();
    let file = dir.join("diffusion_pytorch_model.safetensors");
    let err = weights::assign(&vs, &weights::read_safetensors(&file).unwrap(), Extra::Reject, &file).unwrap_err();
    assert!(err.to_string().contains("mid_block.attentions.0.to_"), "{err}");
}
