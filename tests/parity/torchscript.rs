//! TorchScript rewards: the example rewards of examples/rewards/ loaded from their archives
//! against their eager PyTorch modules (scores and input gradients within 1e-5), and every
//! refusal case (fixtures by `fixtures_torchscript.py`).
use std::collections::HashMap;

use ril_pipe::rewards::torchscript::{validate, validate_with, Probe, TorchScriptError, TorchScriptReward};
use ril_pipe::rewards::{Reward, RewardError};
use tch::{Device, Kind, Tensor};

use crate::support::{fixtures, max_abs_diff};

fn index() -> serde_json::Value {
    let path = fixtures("torchscript").join("torchscript.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn load(case: &str) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(fixtures("torchscript").join(format!("{case}.safetensors"))).unwrap().into_iter().collect()
}

fn variant(e: &TorchScriptError) -> &'static str {
    match e {
        TorchScriptError::Read { .. } => "Read",
        TorchScriptError::NotTorchScript { .. } => "NotTorchScript",
        TorchScriptError::Signature { .. } => "Signature",
        TorchScriptError::Probe { .. } => "Probe",
        TorchScriptError::Output { .. } => "Output",
        TorchScriptError::NonFinite { .. } => "NonFinite",
        TorchScriptError::NotDifferentiable { .. } => "NotDifferentiable",
        TorchScriptError::Tch { .. } => "Tch",
    }
}

#[test]
fn example_rewards_match_pytorch() {
    let dir = fixtures("torchscript");
    let examples = index()["examples"].as_object().unwrap().clone();
    assert_eq!(examples.len(), 2, "a text-free and a prompt-aware example");
    let mut worst = (0.0f64, 0.0f64);
    for (name, info) in &examples {
        let reward = TorchScriptReward::load(name.as_str(), &dir.join(info["archive"].as_str().unwrap()), Device::Cpu).unwrap();
        assert_eq!(reward.name(), name);
        let parameters = reward.named_parameters().unwrap();
        let count: i64 = parameters.iter().map(|(_, t)| t.numel() as i64).sum();
        assert_eq!(count, info["parameters"].as_i64().unwrap(), "{name}: parameters");
        assert!(parameters.iter().all(|(_, t)| !t.requires_grad()), "{name}: parameters must be frozen");
        for case in info["cases"].as_array().unwrap() {
            let label = case["case"].as_str().unwrap();
            let prompts: Vec<String> = case["prompts"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect();
            let t = load(label);
            let images = t["images"].copy().set_requires_grad(true);
            let scores = reward.score(&images, &prompts).unwrap();
            assert_eq!(scores.kind(), Kind::Float);
            let score_diff = max_abs_diff(&scores, &t["scores"]);
            (&scores * &t["weight"]).sum(Kind::Float).backward();
            let grad = images.grad();
            let grad_diff = max_abs_diff(&grad, &t["grad"]);
            let grad_scale = t["grad"].abs().max().double_value(&[]);
            println!("{label}: scores {score_diff:.2e}, gradient {grad_diff:.2e} (largest gradient entry {grad_scale:.2e}, relative {:.2e})", grad_diff / grad_scale);
            assert!(score_diff < 1e-5, "{label}: scores differ by {score_diff}");
            assert!(grad_diff < 1e-5, "{label}: gradients differ by {grad_diff}");
            // Relative to the largest entry too: the saturation's gradients are about 1e-4.
            assert!(grad_diff < 1e-5 * grad_scale, "{label}: gradients differ by {grad_diff} of {grad_scale}");
            assert!(grad_scale > 1e-4, "{label}: the gradient checked is too small to tell anything");
            assert!(parameters.iter().all(|(_, p)| !p.grad().defined()), "{name}: a frozen parameter got a gradient");
            worst = (worst.0.max(score_diff), worst.1.max(grad_diff));
        }
        // One prompt per image, as every reward.
        let images = Tensor::rand([2, 3, 16, 16], (Kind::Float, Device::Cpu));
        assert!(matches!(reward.score(&images, &["only one".to_string()]), Err(RewardError::PromptCount { images: 2, prompts: 1 })));
    }
    println!("torchscript examples: worst scores {:.2e}, worst gradient {:.2e}", worst.0, worst.1);
}

/// Every archive of `refusals.json` is refused with its case, and the message names the file.
#[test]
fn every_refusal_names_the_file_and_what_is_wrong() {
    let dir = fixtures("torchscript");
    let refusals = index()["refusals"].as_object().unwrap().clone();
    let mut seen = std::collections::BTreeSet::new();
    for (file, expected) in &refusals {
        let path = dir.join(file);
        let err = match validate(&path, Device::Cpu) {
            Ok(()) => panic!("{file}: accepted, expected a {expected} refusal"),
            Err(e) => e,
        };
        let message = err.to_string();
        println!("{file}: {message}");
        assert_eq!(variant(&err), expected.as_str().unwrap(), "{file}: {message}");
        assert!(message.contains(&path.display().to_string()), "{file}: the message does not name the file: {message}");
        seen.insert(variant(&err));
    }
    for case in ["NotTorchScript", "Signature", "Output", "NonFinite", "NotDifferentiable", "Probe"] {
        assert!(seen.contains(case), "no fixture for the {case} refusal");
    }
}

/// What each message says, beyond its case.
#[test]
fn refusals_say_what_is_wrong() {
    let dir = fixtures("torchscript");
    let message = |file: &str| validate(&dir.join(file), Device::Cpu).unwrap_err().to_string();
    let m = message("signature_prompt_is_str.pt");
    assert!(m.contains("List[str]") && m.contains("Declaration: forward("), "{m}");
    let m = message("output_keepdim.pt");
    assert!(m.contains("[2, 1]") && m.contains("shape [2]"), "{m}");
    let m = message("output_tuple.pt");
    assert!(m.contains("a tuple"), "{m}");
    let m = message("nonfinite_gradient.pt");
    assert!(m.contains("non-finite gradient"), "{m}");
    let m = message("nondiff_rounded.pt");
    assert!(m.contains("zero everywhere"), "{m}");
    let m = message("nondiff_detached.pt");
    assert!(m.contains("not in the autograd graph"), "{m}");
    let m = message("not_ts_state_dict.pt");
    assert!(m.contains("torch.save checkpoint"), "{m}");
    let m = message("raises.pt");
    assert!(m.contains("only scores 512x512 images") && m.contains("64x64"), "{m}");
}

/// A module that changes its input in place works on its own copy: the caller's images (here
/// a non-leaf, as decoded samples are) keep their values and their gradient is the module's.
#[test]
fn in_place_changes_inside_the_module_do_not_reach_the_images() {
    let path = fixtures("torchscript").join(index()["accepted"][0].as_str().unwrap());
    let reward = TorchScriptReward::load("inplace", &path, Device::Cpu).unwrap();
    let leaf = Tensor::rand([2, 3, 4, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let images = &leaf * 1.0;
    let before = images.detach().copy();
    let scores = reward.score(&images, &["a".to_string(), "b".to_string()]).unwrap();
    assert_eq!(max_abs_diff(&images, &before), 0.0, "the module changed the caller's images");
    let expected = before.mean_dim([1i64, 2, 3].as_slice(), false, Kind::Float) * 0.5;
    assert!(max_abs_diff(&scores, &expected) < 1e-7);
    scores.sum(Kind::Float).backward();
    // d(0.5 mean)/dx = 0.5 / 48 everywhere.
    let grad = leaf.grad();
    assert!((grad - 0.5 / 48.0).abs().max().double_value(&[]) < 1e-9);
}

/// The probe batch is the caller's: a reward that only takes 512-wide images passes a probe of
/// that size.
#[test]
fn the_probe_batch_can_match_the_world() {
    let path = fixtures("torchscript").join("raises.pt");
    validate_with(&path, Device::Cpu, Probe { batch: 2, height: 8, width: 512 }).unwrap();
    let err = validate_with(&path, Device::Cpu, Probe { batch: 3, height: 8, width: 256 }).unwrap_err();
    assert!(matches!(err, TorchScriptError::Probe { batch: 3, width: 256, .. }), "{err}");
    let err = validate_with(&path, Device::Cpu, Probe { batch: 0, height: 8, width: 512 }).unwrap_err();
    assert!(matches!(err, TorchScriptError::Probe { batch: 0, .. }), "{err}");
}

/// On a GPU when there is one: the example rewards load there and give the CPU's scores.
#[test]
fn example_rewards_run_on_the_gpu_when_there_is_one() {
    if !tch::Cuda::is_available() {
        println!("no CUDA device: skipped the GPU half");
        return;
    }
    let dir = fixtures("torchscript");
    let gpu = Device::Cuda(0);
    for name in ["saturation", "clip_phrase"] {
        let reward = TorchScriptReward::load(name, &dir.join(format!("{name}.pt")), gpu).unwrap();
        let t = load(&format!("{name}_{}", if name == "saturation" { "3x32x32" } else { "4x32x32" }));
        let case = &index()["examples"][name]["cases"][0];
        let prompts: Vec<String> = case["prompts"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect();
        let images = t["images"].to_device(gpu).set_requires_grad(true);
        let scores = reward.score(&images, &prompts).unwrap();
        assert_eq!(scores.device(), gpu);
        let d = max_abs_diff(&scores.to_device(Device::Cpu), &t["scores"]);
        println!("{name} on {gpu:?}: scores {d:.2e}");
        assert!(d < 1e-4, "{name}: {d}");
    }
}
