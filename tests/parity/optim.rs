//! AdamW and gradient clipping against torch.optim.AdamW / clip_grad_norm_.
use ril_pipe::method::optim::{clip_grad_norm, AdamW, AdamWConfig};
use tch::Tensor;

use crate::support::{fixtures, max_abs_diff};

#[test]
fn adamw_with_clipping_matches_pytorch_step_by_step() {
    let dir = fixtures("optim");
    let t: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(dir.join("adamw.safetensors")).unwrap().into_iter().collect();
    let params: Vec<Tensor> = (0..3).map(|i| t[&format!("init.{i}")].copy().set_requires_grad(true)).collect();
    let mut opt = AdamW::new(
        params.iter().map(Tensor::shallow_clone).collect(),
        AdamWConfig {
            lr: 3e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        },
    );
    for step in 0..6 {
        for (i, p) in params.iter().enumerate() {
            // Give each parameter the recorded gradient through a linear surrogate loss.
            let loss = (p * &t[&format!("grad.{step}.{i}")]).sum(tch::Kind::Float);
            loss.backward();
        }
        let norm = clip_grad_norm(&params, 5.0);
        let expected_norm = t[&format!("norm.{step}")].double_value(&[0]);
        assert!((norm - expected_norm).abs() < 1e-4 * expected_norm.max(1.0), "step {step}: norm {norm} vs {expected_norm}");
        opt.step();
        opt.zero_grad();
        for (i, p) in params.iter().enumerate() {
            let d = max_abs_diff(&p.detach(), &t[&format!("after.{step}.{i}")]);
            assert!(d < 1e-6, "step {step} param {i}: max abs diff {d}");
        }
    }
}
