//! Inception v3 (FID) against pytorch-fid's InceptionV3([3]) with random weights.
use std::collections::HashMap;

use ril_pipe::models::inception::InceptionV3;
use tch::{nn, Device, Kind, Tensor};

use crate::support::{fixtures, max_abs_diff};

#[test]
fn inception_matches_pytorch_fid() {
    let dir = fixtures("inception");
    let vs = nn::VarStore::new(Device::Cpu);
    let model = InceptionV3::load(&vs, &dir.join("pt_inception_random.pth")).unwrap();
    let r: HashMap<String, Tensor> = Tensor::read_safetensors(dir.join("reference.safetensors")).unwrap().into_iter().collect();
    for size in ["299x299", "64x64", "100x150"] {
        let theirs = &r[&format!("features_{size}")];
        let ours = tch::no_grad(|| model.features(&r[&format!("images_{size}")]).unwrap());
        assert_eq!(ours.size(), [2, InceptionV3::FEATURES]);
        let scale = theirs.abs().mean(Kind::Double).double_value(&[]);
        let d = max_abs_diff(&ours, theirs);
        eprintln!("inception {size}: max abs diff {d:.2e} (mean |feature| {scale:.3})");
        assert!(scale > 0.05, "reference features are degenerate ({scale})");
        assert!(d < 1e-4, "{size}: features differ by {d}");
    }
}
