//! LoRA on the UNet against a reference PyTorch wrapper (`W x + b + B A x` on to_q, to_k, to_v,
//! to_out.0): the output and the gradients of every A and B.
use ril_pipe::models::lora::{default_targets, LoraGroup};
use ril_pipe::models::weights;

use crate::support::{fixtures, max_abs_diff};
use super::unet::load_case;

#[test]
fn lora_output_and_gradients_match_pytorch() {
    let dir = fixtures("unet").join("lora_grad");
    let group = LoraGroup::new(default_targets());
    let (mut vs, unet) = load_case(&dir, Some(&group));
    vs.freeze();
    group.load(&dir.join("lora.safetensors")).unwrap();
    let io = weights::read_safetensors(&dir.join("io.safetensors")).unwrap();

    let out = unet.forward(&io["sample"], &io["timesteps"], &io["context"]);
    let diff = max_abs_diff(&out, &io["out"]);
    assert!(diff <= 1e-4, "output with LoRA: max abs diff {diff}");
    (&out * &io["weights"]).sum(tch::Kind::Float).backward();

    let trainable = group.trainable_named_tensors();
    let expected = io.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(trainable.len(), expected);
    assert_eq!(trainable.len(), 64, "8 attention modules x 4 projections x (A, B)");
    let mut worst = 0f64;
    for (name, tensor) in &trainable {
        let reference = &io[&format!("grad.{name}")];
        let grad = tensor.grad();
        assert!(grad.defined(), "{name} got no gradient");
        let diff = max_abs_diff(&grad, reference);
        assert!(diff <= 1e-4, "gradient of {name}: max abs diff {diff}");
        worst = worst.max(diff);
    }
    println!("lora: output diff {diff:.3e}, worst gradient diff {worst:.3e} over {} tensors", trainable.len());
}
