//! AdamW and gradient-norm clipping with PyTorch's exact update rules, on a plain list of
//! parameters (LoRA adapters live outside any `VarStore`).
use tch::{Kind, Tensor};

/// AdamW hyper-parameters. PyTorch's defaults except the weight decay, which callers set
/// explicitly (AlignProp uses 0.1; `tch::nn::AdamW` would silently use 0.01).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// AdamW state for a fixed list of parameters.
pub struct AdamW {
    pub config: AdamWConfig,
    params: Vec<Tensor>,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    step: i64,
}

impl AdamW {
    pub fn new(params: Vec<Tensor>, config: AdamWConfig) -> Self {
        let zeros = |p: &Tensor| p.zeros_like().detach();
        let exp_avg = params.iter().map(zeros).collect();
        let exp_avg_sq = params.iter().map(zeros).collect();
        AdamW {
            config,
            params,
            exp_avg,
            exp_avg_sq,
            step: 0,
        }
    }

    pub fn params(&self) -> &[Tensor] {
        &self.params
    }

    pub fn steps_taken(&self) -> i64 {
        self.step
    }

    /// Sets every gradient to zero (or drops it).
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.zero_grad();
        }
    }

    /// One update from the current gradients (parameters without a gradient are left alone),
    /// as `torch.optim.AdamW` (non-amsgrad, single-tensor path) computes it.
    pub fn step(&mut self) {
        self.step += 1;
        let c = self.config;
        let bias1 = 1.0 - c.beta1.powi(self.step as i32);
        let bias2 = 1.0 - c.beta2.powi(self.step as i32);
        tch::no_grad(|| {
            for ((p, m), v) in self.params.iter().zip(&mut self.exp_avg).zip(&mut self.exp_avg_sq) {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let mut p = p.shallow_clone();
                let _ = p.g_mul_scalar_(1.0 - c.lr * c.weight_decay);
                let _ = m.lerp_(&g, 1.0 - c.beta1);
                let _ = v.g_mul_scalar_(c.beta2);
                let _ = v.addcmul_(&g, &g.g_mul_scalar(1.0 - c.beta2));
                let denom = v.sqrt().g_div_scalar(bias2.sqrt()).g_add_scalar(c.eps);
                let update = (&*m / denom).g_mul_scalar(c.lr / bias1);
                let _ = p.g_sub_(&update);
            }
        });
    }

    /// The optimizer state as named tensors (for resumable checkpoints).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("step".to_string(), Tensor::from_slice(&[self.step]))];
        for (i, (m, v)) in self.exp_avg.iter().zip(&self.exp_avg_sq).enumerate() {
            out.push((format!("exp_avg.{i}"), m.shallow_clone()));
            out.push((format!("exp_avg_sq.{i}"), v.shallow_clone()));
        }
        out
    }

    /// Restores [`AdamW::state`]; `None` when the tensors do not fit these parameters.
    pub fn load_state(&mut self, named: &std::collections::HashMap<String, Tensor>) -> Option<()> {
        let step = named.get("step")?.int64_value(&[0]);
        tch::no_grad(|| {
            for (i, (m, v)) in self.exp_avg.iter_mut().zip(&mut self.exp_avg_sq).enumerate() {
                let nm = named.get(&format!("exp_avg.{i}"))?;
                let nv = named.get(&format!("exp_avg_sq.{i}"))?;
                if nm.size() != m.size() || nv.size() != v.size() {
                    return None;
                }
                m.copy_(nm);
                v.copy_(nv);
            }
            Some(())
        })?;
        self.step = step;
        Some(())
    }
}

/// Scales the gradients so their global L2 norm is at most `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_` does; returns the norm before clipping.
pub fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> f64 {
    tch::no_grad(|| {
        let grads: Vec<Tensor> = params.iter().map(Tensor::grad).filter(Tensor::defined).collect();
        if grads.is_empty() {
            return 0.0;
        }
        let norms: Vec<Tensor> = grads.iter().map(|g| g.to_kind(Kind::Float).norm()).collect();
        let total = Tensor::stack(&norms, 0).norm().double_value(&[]);
        let coef = (max_norm / (total + 1e-6)).min(1.0);
        for g in &grads {
            let mut g = g.shallow_clone();
            let _ = g.g_mul_scalar_(coef);
        }
        total
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_decay_alone_shrinks_parameters() {
        let p = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        let mut opt = AdamW::new(
            vec![p.shallow_clone()],
            AdamWConfig {
                lr: 0.1,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.5,
            },
        );
        // Zero gradient: only the decoupled decay acts.
        let loss = (&p * 0.0).sum(Kind::Float);
        loss.backward();
        opt.step();
        let v: Vec<f32> = Vec::try_from(&p.detach()).unwrap();
        assert!((v[0] - 0.95).abs() < 1e-6 && (v[1] + 1.9).abs() < 1e-6, "{v:?}");
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let a = Tensor::from_slice(&[3.0f32]).set_requires_grad(true);
        let b = Tensor::from_slice(&[4.0f32]).set_requires_grad(true);
        ((&a * &a + &b * &b) * 0.5).sum(Kind::Float).backward();
        let norm = clip_grad_norm(&[a.shallow_clone(), b.shallow_clone()], 1.0);
        assert!((norm - 5.0).abs() < 1e-5);
        let ga = a.grad().double_value(&[0]);
        let gb = b.grad().double_value(&[0]);
        assert!(((ga * ga + gb * gb).sqrt() - 1.0).abs() < 1e-5);
    }
}
