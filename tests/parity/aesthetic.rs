//! Aesthetic head: the real LAION weights against the PyTorch MLP, and a small head.
use std::collections::HashMap;
use std::path::Path;

use ril_pipe::models::aesthetic::{AestheticConfig, AestheticHead};
use ril_pipe::models::weights::{assign, load_weights, Extra};
use tch::{nn, Device, Tensor};

use crate::support::{data_dir, fixtures, max_abs_diff};

fn check(weights: &Path, config: &AestheticConfig, reference: &str) -> f64 {
    let vs = nn::VarStore::new(Device::Cpu);
    let head = AestheticHead::new(&vs.root(), config).unwrap();
    assign(&vs, &load_weights(weights).unwrap(), Extra::Reject, weights).unwrap();
    let r: HashMap<String, Tensor> =
        Tensor::read_safetensors(fixtures("aesthetic").join(reference)).unwrap().into_iter().collect();
    let scores = tch::no_grad(|| head.forward(&r["embeddings"]).unwrap());
    let d = max_abs_diff(&scores, &r["scores"]);
    eprintln!("{reference}: max abs diff {d:.2e}");
    d
}

#[test]
fn aesthetic_real_laion_head_matches_pytorch() {
    let data = data_dir().join("weights");
    for file in ["laion_aesthetic_v2_sac_logos_ava1_l14_linearMSE.pth", "laion_aesthetic_v2_sac_logos_ava1_l14_linearMSE.safetensors"] {
        let d = check(&data.join(file), &AestheticConfig::default(), "laion.safetensors");
        assert!(d < 1e-4, "{file}: {d}");
    }
}

#[test]
fn aesthetic_small_head_matches_pytorch() {
    let config = AestheticConfig { dims: vec![32, 24, 8, 1] };
    let d = check(&fixtures("aesthetic").join("small_head.safetensors"), &config, "small.safetensors");
    assert!(d < 1e-4, "{d}");
}
