//! DDIM sampling with classifier-free guidance, split the way truncated backprop needs it:
//! steps N..2 without gradient, the last step (z_1 -> z_0) in the graph.
use tch::{Device, Kind, Tensor};

use crate::models::ddim::{Ddim, DdimError};
use crate::models::diffusion::{Diffusion, DiffusionError};
use crate::models::unet::UNet2DConditionModel;

use super::noise;

/// A noise-prediction network: UNet2DConditionModel, or a toy in tests.
pub trait EpsModel {
    /// eps(z_t, t, context); `timesteps` holds one timestep per sample.
    fn eps(&self, latents: &Tensor, timesteps: &Tensor, context: &Tensor) -> Tensor;
}

impl EpsModel for UNet2DConditionModel {
    fn eps(&self, latents: &Tensor, timesteps: &Tensor, context: &Tensor) -> Tensor {
        self.forward(latents, timesteps, context)
    }
}

/// A UNet whose frozen weights are in `compute` (fp16, bf16 or fp32): the latents and the
/// context are cast to it, the prediction back to the latents' dtype, so the sampler's updates
/// (and the last step's graph) stay in fp32. With `compute` fp32 every cast is a no-op.
pub struct CastUnet<'a> {
    pub unet: &'a UNet2DConditionModel,
    pub compute: Kind,
}

impl<'a> CastUnet<'a> {
    /// The UNet of a diffusion model as the sampler sees it: fp32 latents in, fp32 noise
    /// prediction out.
    pub fn of(diffusion: &'a Diffusion) -> Self {
        CastUnet { unet: &diffusion.unet, compute: diffusion.precision.kind() }
    }
}

impl EpsModel for CastUnet<'_> {
    fn eps(&self, latents: &Tensor, timesteps: &Tensor, context: &Tensor) -> Tensor {
        self.unet.forward(&latents.to_kind(self.compute), timesteps, &context.to_kind(self.compute)).to_kind(latents.kind())
    }
}

/// Sampling settings (paper: 50 steps, eta 0, guidance 7.5).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerConfig {
    pub steps: usize,
    pub eta: f64,
    pub guidance: f64,
}

/// A DDIM sampler for a fixed number of steps.
pub struct Sampler {
    pub ddim: Ddim,
    pub config: SamplerConfig,
}

/// Stream ids of [`noise::stream`]: per-purpose, so that no two uses of a seed share noise.
pub const STREAM_VARIANCE: u32 = 1;

impl Sampler {
    pub fn new(ddim_config: crate::models::ddim::DdimConfig, config: SamplerConfig) -> Result<Self, DdimError> {
        Ok(Sampler {
            ddim: Ddim::new(ddim_config, config.steps)?,
            config,
        })
    }

    /// Guided noise prediction: `eps_u + g (eps_c - eps_u)`, both halves in one batch.
    pub fn guided_eps(&self, model: &dyn EpsModel, z: &Tensor, t: i64, cond: &Tensor, uncond: &Tensor) -> Tensor {
        let b = z.size()[0];
        let ts = Tensor::full([2 * b], t, (tch::Kind::Int64, z.device()));
        if self.config.guidance == 1.0 {
            return model.eps(z, &ts.narrow(0, 0, b), cond);
        }
        let uncond = uncond.expand([b, uncond.size()[1], uncond.size()[2]], false);
        let both = model.eps(&Tensor::cat(&[z, z], 0), &ts, &Tensor::cat(&[&uncond, cond], 0));
        let parts = both.chunk(2, 0);
        &parts[0] + (&parts[1] - &parts[0]) * self.config.guidance
    }

    /// One DDIM step at index `i` of the schedule (variance noise drawn from `seed`).
    pub fn step(&self, model: &dyn EpsModel, z: &Tensor, i: usize, cond: &Tensor, uncond: &Tensor, seed: u64) -> Result<Tensor, DdimError> {
        let t = self.ddim.timesteps()[i];
        let eps = self.guided_eps(model, z, t, cond, uncond);
        let variance = (self.config.eta > 0.0).then(|| noise::gaussian(seed, noise::stream(STREAM_VARIANCE, i as u64), &z.size(), z.device()));
        Ok(self.ddim.step(&eps, t, z, self.config.eta, variance.as_ref())?.prev_sample)
    }

    /// Steps N..2 without gradient: z_N -> z_1.
    pub fn to_last_step(&self, model: &dyn EpsModel, z_n: &Tensor, cond: &Tensor, uncond: &Tensor, seed: u64) -> Result<Tensor, DdimError> {
        tch::no_grad(|| {
            let mut z = z_n.shallow_clone();
            for i in 0..self.config.steps - 1 {
                z = self.step(model, &z, i, cond, uncond, seed)?;
            }
            Ok(z)
        })
    }

    /// The last step z_1 -> z_0, recorded for autograd.
    pub fn last_step(&self, model: &dyn EpsModel, z_1: &Tensor, cond: &Tensor, uncond: &Tensor, seed: u64) -> Result<Tensor, DdimError> {
        self.step(model, z_1, self.config.steps - 1, cond, uncond, seed)
    }

    /// A whole sample without gradient: z_N -> z_0.
    pub fn sample(&self, model: &dyn EpsModel, z_n: &Tensor, cond: &Tensor, uncond: &Tensor, seed: u64) -> Result<Tensor, DdimError> {
        tch::no_grad(|| {
            let z_1 = self.to_last_step(model, z_n, cond, uncond, seed)?;
            self.last_step(model, &z_1, cond, uncond, seed)
        })
    }

    /// Every step in the graph (the untruncated reference used by tests).
    pub fn sample_with_full_graph(&self, model: &dyn EpsModel, z_n: &Tensor, cond: &Tensor, uncond: &Tensor, seed: u64) -> Result<Tensor, DdimError> {
        let mut z = z_n.shallow_clone();
        for i in 0..self.config.steps {
            z = self.step(model, &z, i, cond, uncond, seed)?;
        }
        Ok(z)
    }
}

impl Sampler {
    /// Images `[B, 3, H, W]` in [0, 1] of samples `first .. first + B` of a run, one per prompt,
    /// without graph: the evaluation's noise convention, shared by `evaluate` and `ril-pipe
    /// sample`. Sample `i` starts from `z_N` = noise stream `i` of `seed` (whatever the batch it
    /// falls in); DDIM's variance noise (eta > 0) is drawn for the batch from `seed ^ first`.
    pub fn generate(&self, diffusion: &Diffusion, prompts: &[String], uncond: &Tensor, seed: u64, first: u64) -> Result<Tensor, DiffusionError> {
        let cond = diffusion.encode_prompts(prompts)?;
        let z_n = initial_latents(seed, first, prompts.len() as i64, diffusion.latent_shape, diffusion.device);
        tch::no_grad(|| {
            let z_0 = self.sample(&CastUnet::of(diffusion), &z_n, &cond, uncond, seed ^ first).map_err(DiffusionError::model)?;
            Ok(diffusion.decode(&z_0))
        })
    }
}

/// Initial latents z_N for sample `index` of a seed: the same for every model evaluated.
pub fn initial_latents(seed: u64, first_index: u64, count: i64, shape: [i64; 3], device: Device) -> Tensor {
    let per: Vec<Tensor> = (0..count)
        .map(|k| noise::gaussian(seed, noise::stream(0, first_index + k as u64), &[1, shape[0], shape[1], shape[2]], device))
        .collect();
    Tensor::cat(&per, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_latents_depend_on_the_sample_index_only_not_on_the_batching() {
        let whole = initial_latents(7, 3, 5, [4, 2, 2], Device::Cpu);
        let parts = Tensor::cat(&[initial_latents(7, 3, 2, [4, 2, 2], Device::Cpu), initial_latents(7, 5, 3, [4, 2, 2], Device::Cpu)], 0);
        assert!(whole.equal(&parts));
        assert!(!whole.equal(&initial_latents(8, 3, 5, [4, 2, 2], Device::Cpu)), "another seed, other noise");
    }
}
