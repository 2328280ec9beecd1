//! The training objectives of the paper, for one micro-batch.
//!
//! - Baseline (Eq. 5): loss = -mean R(decode(z_0)), with z_0 from the last step only in the graph.
//! - RID (Eq. 6-9): loss = -mean R(decode(z_0)) + lambda * mean ||z_0 - z_0^T||^2, where the EMA
//!   teacher denoises the student's own z_1 (last-step distillation) or follows its own
//!   trajectory from z_N (the full-step ablation, Eq. 7). The squared distance is averaged over
//!   latent elements and samples (so lambda does not depend on the latent size).
use tch::{Kind, Tensor};

use crate::models::lora::LoraGroup;

use super::sampling::{EpsModel, Sampler};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Distill {
    LastStep,
    FullStep,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Objective {
    Baseline,
    Rid { lambda: f64, distill: Distill },
}

/// The loss of one micro-batch and what the training log reports.
pub struct MicroBatchLoss {
    /// Scalar, in the graph of the newest adapter.
    pub loss: Tensor,
    /// Mean reward of the micro-batch.
    pub reward: f64,
    /// Mean distillation distance (RID only).
    pub distill: Option<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ObjectiveError {
    #[error("sampling: {0}")]
    Sampling(String),
    #[error("reward: {0}")]
    Reward(String),
    #[error("EMA teacher: {0}")]
    Teacher(String),
}

/// What the objective needs of a model: the denoiser, its adapter group (for the teacher), the
/// decoder from latents to images in [0, 1], and the reward of images.
pub struct Parts<'a> {
    pub model: &'a dyn EpsModel,
    pub lora: &'a LoraGroup,
    pub decode: &'a dyn Fn(&Tensor) -> Tensor,
    pub reward: &'a dyn Fn(&Tensor) -> Result<Tensor, String>,
}

/// Loss of one micro-batch. `cond`/`uncond` are the text contexts, `z_n` the initial latents,
/// `seed` the variance-noise seed of this micro-batch.
pub fn micro_batch_loss(objective: Objective, sampler: &Sampler, parts: &Parts, z_n: &Tensor, cond: &Tensor, uncond: &Tensor, seed: u64) -> Result<MicroBatchLoss, ObjectiveError> {
    let sampling = |e: crate::models::ddim::DdimError| ObjectiveError::Sampling(e.to_string());
    let z_1 = sampler.to_last_step(parts.model, z_n, cond, uncond, seed).map_err(sampling)?;
    let z_0 = sampler.last_step(parts.model, &z_1, cond, uncond, seed).map_err(sampling)?;
    let images = (parts.decode)(&z_0);
    let rewards = (parts.reward)(&images).map_err(ObjectiveError::Reward)?;
    let mean_reward = rewards.mean(Kind::Float);
    let reward_value = mean_reward.double_value(&[]);
    match objective {
        Objective::Baseline => Ok(MicroBatchLoss {
            loss: -mean_reward,
            reward: reward_value,
            distill: None,
        }),
        Objective::Rid { lambda, distill } => {
            let z_0_teacher = with_teacher(parts.lora, || {
                tch::no_grad(|| match distill {
                    Distill::LastStep => sampler.last_step(parts.model, &z_1, cond, uncond, seed),
                    Distill::FullStep => sampler.sample(parts.model, z_n, cond, uncond, seed),
                })
            })?
            .map_err(sampling)?;
            let distance = (&z_0 - z_0_teacher.detach()).square().mean(Kind::Float);
            let distill_value = distance.double_value(&[]);
            Ok(MicroBatchLoss {
                loss: -mean_reward + distance * lambda,
                reward: reward_value,
                distill: Some(distill_value),
            })
        }
    }
}

/// Runs `f` with the adapter group's newest adapter replaced by its EMA teacher copy.
pub fn with_teacher<T>(lora: &LoraGroup, f: impl FnOnce() -> T) -> Result<T, ObjectiveError> {
    let teacher = |e: crate::models::lora::LoraError| ObjectiveError::Teacher(e.to_string());
    lora.set_use_teacher(true).map_err(teacher)?;
    let out = f();
    lora.set_use_teacher(false).map_err(teacher)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::method::sampling::SamplerConfig;
    use crate::models::ddim::DdimConfig;
    use crate::models::lora::{linear, LoraInit, Linear};
    use tch::nn::{self, Module};
    use tch::Device;

    /// eps(z, t, c) = to_q(flatten(z)) + mean(c): one adapted layer, fast.
    struct Toy {
        _vs: nn::VarStore,
        to_q: Linear,
    }

    const SHAPE: [i64; 4] = [2, 4, 2, 2];

    impl Toy {
        fn new(lora: &LoraGroup) -> Toy {
            let vs = nn::VarStore::new(Device::Cpu);
            let to_q = linear(&vs.root() / "attn" / "to_q", 16, 16, true, Some(lora)).unwrap();
            tch::no_grad(|| {
                for (i, (_, mut v)) in vs.variables().into_iter().enumerate() {
                    let n = v.numel() as i64;
                    let vals = (Tensor::arange(n, (Kind::Float, Device::Cpu)) * 0.7 + i as f64).sin() * 0.2;
                    v.copy_(&vals.view(v.size().as_slice()));
                }
            });
            lora.add_adapter(2, LoraInit::KaimingUniform, 3).unwrap();
            // B starts at zero; make it non-zero so gradients of A are not trivially zero.
            for t in lora.trainable_tensors().iter().skip(1).step_by(2) {
                tch::no_grad(|| {
                    let mut t = t.shallow_clone();
                    let vals = (Tensor::arange(t.numel() as i64, (Kind::Float, Device::Cpu)) * 1.3).cos() * 0.1;
                    t.copy_(&vals.view(t.size().as_slice()));
                });
            }
            Toy { _vs: vs, to_q }
        }
    }

    impl EpsModel for Toy {
        fn eps(&self, z: &Tensor, _t: &Tensor, ctx: &Tensor) -> Tensor {
            let b = z.size()[0];
            let flat = self.to_q.forward(&z.reshape([b, -1]));
            flat.reshape(z.size().as_slice()) + ctx.mean_dim(&[1i64, 2][..], true, Kind::Float).unsqueeze(-1)
        }
    }

    fn setup() -> (LoraGroup, Toy, Sampler, Tensor, Tensor, Tensor) {
        let lora = LoraGroup::new(vec!["to_q".into()]);
        let toy = Toy::new(&lora);
        let sampler = Sampler::new(DdimConfig::default(), SamplerConfig { steps: 4, eta: 0.0, guidance: 2.0 }).unwrap();
        let z_n = crate::method::noise::gaussian(1, 0, &SHAPE, Device::Cpu);
        let cond = crate::method::noise::gaussian(1, 1, &[2, 3, 5], Device::Cpu);
        let uncond = crate::method::noise::gaussian(1, 2, &[1, 3, 5], Device::Cpu);
        (lora, toy, sampler, z_n, cond, uncond)
    }

    fn decode(z: &Tensor) -> Tensor {
        z.narrow(1, 0, 3).sigmoid()
    }

    fn reward(images: &Tensor) -> Result<Tensor, String> {
        Ok(images.square().mean_dim(&[1i64, 2, 3][..], false, Kind::Float))
    }

    fn grads(lora: &LoraGroup) -> Vec<Tensor> {
        lora.trainable_tensors().iter().map(|t| t.grad().copy()).collect()
    }

    fn zero(lora: &LoraGroup) {
        for mut t in lora.trainable_tensors() {
            t.zero_grad();
        }
    }

    #[test]
    fn rid_with_lambda_zero_gives_the_baseline_update() {
        let (lora, toy, sampler, z_n, cond, uncond) = setup();
        lora.init_teacher().unwrap();
        let parts = Parts { model: &toy, lora: &lora, decode: &decode, reward: &reward };
        micro_batch_loss(Objective::Baseline, &sampler, &parts, &z_n, &cond, &uncond, 5).unwrap().loss.backward();
        let base = grads(&lora);
        zero(&lora);
        let rid = Objective::Rid { lambda: 0.0, distill: Distill::LastStep };
        micro_batch_loss(rid, &sampler, &parts, &z_n, &cond, &uncond, 5).unwrap().loss.backward();
        for (a, b) in base.iter().zip(grads(&lora)) {
            assert!(a.equal(&b), "gradients differ");
            assert!(a.abs().sum(Kind::Float).double_value(&[]) > 0.0);
        }
    }

    #[test]
    fn no_gradient_reaches_the_steps_before_the_last() {
        let (lora, toy, sampler, z_n, cond, uncond) = setup();
        let z_1 = sampler.to_last_step(&toy, &z_n, &cond, &uncond, 5).unwrap();
        assert!(!z_1.requires_grad(), "steps N..2 are outside the graph");
        let parts = Parts { model: &toy, lora: &lora, decode: &decode, reward: &reward };
        micro_batch_loss(Objective::Baseline, &sampler, &parts, &z_n, &cond, &uncond, 5).unwrap().loss.backward();
        let truncated = grads(&lora);
        zero(&lora);
        // Reference that keeps every step in the graph: its gradient is different...
        let z_0 = sampler.sample_with_full_graph(&toy, &z_n, &cond, &uncond, 5).unwrap();
        (-reward(&decode(&z_0)).unwrap().mean(Kind::Float)).backward();
        let full = grads(&lora);
        assert!(truncated.iter().zip(&full).any(|(a, b)| !a.allclose(b, 1e-6, 1e-9, false)));
        zero(&lora);
        // ...and cutting its graph at z_1 by hand gives the truncated gradient exactly.
        let z_1_cut = {
            let mut z = z_n.shallow_clone();
            for i in 0..3 {
                z = sampler.step(&toy, &z, i, &cond, &uncond, 5).unwrap();
            }
            z.detach()
        };
        let z_0 = sampler.last_step(&toy, &z_1_cut, &cond, &uncond, 5).unwrap();
        (-reward(&decode(&z_0)).unwrap().mean(Kind::Float)).backward();
        for (a, b) in truncated.iter().zip(grads(&lora)) {
            assert!(a.equal(&b));
        }
    }

    #[test]
    fn distillation_pulls_towards_the_teacher_and_the_teacher_gets_no_gradient() {
        let (lora, toy, sampler, z_n, cond, uncond) = setup();
        lora.init_teacher().unwrap();
        let parts = Parts { model: &toy, lora: &lora, decode: &decode, reward: &reward };
        let rid = Objective::Rid { lambda: 0.1, distill: Distill::LastStep };
        // Teacher == student: the distance is exactly zero.
        let out = micro_batch_loss(rid, &sampler, &parts, &z_n, &cond, &uncond, 5).unwrap();
        assert_eq!(out.distill, Some(0.0));
        // Move the student: now the distance is positive, and only the student gets gradients.
        tch::no_grad(|| {
            for mut t in lora.trainable_tensors() {
                let _ = t.g_add_scalar_(0.05);
            }
        });
        let out = micro_batch_loss(rid, &sampler, &parts, &z_n, &cond, &uncond, 5).unwrap();
        assert!(out.distill.unwrap() > 0.0);
        // Deep copies: named tensors share storage with the live adapters.
        let teacher_of = |lora: &LoraGroup| -> Vec<(String, Tensor)> { lora.named_tensors().into_iter().filter(|(n, _)| n.contains("teacher")).map(|(n, t)| (n, t.copy())).collect() };
        let before = teacher_of(&lora);
        assert!(!before.is_empty());
        out.loss.backward();
        let mut opt = crate::method::optim::AdamW::new(
            lora.trainable_tensors(),
            crate::method::optim::AdamWConfig { lr: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 },
        );
        opt.step();
        // The optimizer moved the student, not the teacher: it received no gradient.
        for ((_, a), (_, b)) in before.iter().zip(teacher_of(&lora)) {
            assert!(a.equal(&b));
        }
        assert!(!lora.trainable_tensors()[0].equal(&before.iter().find(|(n, _)| n.contains("lora_A")).unwrap().1), "the student did move");
        // Only the EMA update moves the teacher, by Eq. 6.
        let student_a = lora.named_tensors().into_iter().find(|(n, _)| n.ends_with("to_q.lora_A.0.weight")).unwrap().1.copy();
        lora.ema_update(0.9).unwrap();
        let teacher_a = teacher_of(&lora).into_iter().find(|(n, _)| n.contains("lora_A")).unwrap().1;
        let expected = &before.iter().find(|(n, _)| n.contains("lora_A")).unwrap().1 * 0.9 + student_a * 0.1;
        assert!(teacher_a.allclose(&expected, 1e-6, 1e-7, false));
        assert!(!lora.use_teacher(), "the switch is reset after the teacher's pass");
        // The full-step variant runs the teacher from z_N on its own trajectory.
        let full = Objective::Rid { lambda: 0.1, distill: Distill::FullStep };
        let out_full = micro_batch_loss(full, &sampler, &parts, &z_n, &cond, &uncond, 5).unwrap();
        assert!(out_full.distill.unwrap() > 0.0 && out_full.distill != out.distill);
    }
}
