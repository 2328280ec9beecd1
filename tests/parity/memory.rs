//! The activation count of the peak-memory estimate (`stages::memory`) against what PyTorch's
//! autograd actually keeps for the same networks (`fixtures_memory.py`, measured with saved
//! tensor hooks): the UNet's last call with a LoRA adapter, a VAE decode, CLIP vision towers.
use std::path::Path;

use ril_pipe::models::clip::ClipConfig;
use ril_pipe::models::lora::default_targets;
use ril_pipe::models::unet::UNet2DConditionConfig;
use ril_pipe::models::vae::AutoencoderKLConfig;
use ril_pipe::stages::memory::{unet_tally, vae_decoder_tally, vision_tally, Adapted};

use crate::support::fixtures;

/// PyTorch's saved bytes per sample and the case's latent or image side.
fn measured(dir: &Path) -> (f64, i64) {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("saved.json")).unwrap()).unwrap();
    (v["saved_bytes_per_sample"].as_f64().unwrap(), v["side"].as_i64().unwrap())
}

/// The estimate (fp32: 4 bytes an element) within 6% of the measurement.
fn check(case: &str, estimated_elements: f64, measured_bytes: f64) {
    let estimate = 4.0 * estimated_elements;
    let ratio = estimate / measured_bytes;
    println!("{case}: estimated {estimate:.0} B, PyTorch keeps {measured_bytes:.0} B per sample (ratio {ratio:.3})");
    assert!((0.94..=1.06).contains(&ratio), "{case}: estimate {estimate} vs measured {measured_bytes}");
}

#[test]
fn unet_activation_count_matches_autograd() {
    let root = fixtures("memory");
    let targets = default_targets();
    for case in ["unet_sd_layout", "unet_linear_two_layers"] {
        let dir = root.join(case);
        let (bytes, side) = measured(&dir);
        let cfg = UNet2DConditionConfig::from_file(&dir.join("config.json")).unwrap();
        let tally = unet_tally(&cfg, side, Adapted { targets: &targets, ranks: 4 }).unwrap();
        check(case, tally.saved, bytes);
    }
}

#[test]
fn vae_decode_activation_count_matches_autograd() {
    let dir = fixtures("memory").join("vae");
    let (bytes, side) = measured(&dir);
    let cfg = AutoencoderKLConfig::from_file(&dir.join("config.json")).unwrap();
    check("vae", vae_decoder_tally(&cfg, side).saved, bytes);
}

#[test]
fn clip_vision_activation_count_matches_autograd() {
    for case in ["clip_quick_gelu", "clip_gelu"] {
        let dir = fixtures("memory").join(case);
        let (bytes, _) = measured(&dir);
        let cfg = ClipConfig::from_transformers_json(&dir.join("config.json")).unwrap();
        check(case, vision_tally(&cfg.vision.unwrap()).saved, bytes);
    }
}

#[test]
fn checkpoint_headers_count_the_float_elements() {
    use ril_pipe::models::weights::load_weights;
    use ril_pipe::stages::memory::checkpoint_elements;
    let root = fixtures("weights");
    for name in ["ordered.pth", "plain_dict.pt", "fp16.bin", "bf16.bin", "views.pt", "sharded", "bin_only", "both"] {
        let path = root.join(name);
        let loaded: u64 = load_weights(&path)
            .unwrap()
            .values()
            .filter(|t| matches!(t.kind(), tch::Kind::Half | tch::Kind::BFloat16 | tch::Kind::Float | tch::Kind::Double))
            .map(|t| t.numel() as u64)
            .sum();
        assert!(loaded > 0, "{name}");
        assert_eq!(checkpoint_elements(&path).unwrap(), loaded, "{name}");
    }
}
