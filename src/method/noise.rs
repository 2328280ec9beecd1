//! Deterministic Gaussian noise from a seed, independent of libtorch's global generator, so
//! results do not depend on which other stages run in the same process at the same time.
//!
//! The samples are drawn on the CPU (ChaCha20 + Box-Muller in f64, rounded to f32) and only then
//! moved to the requested device, so a seed gives bit-identical noise on the CPU and on every
//! GPU, whatever the stage's precision (noise and latents are always fp32): runs on different
//! devices differ only by the devices' arithmetic, never by their random numbers.
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use tch::{Device, Kind, Tensor};

/// Standard normal fp32 samples of `shape` on `device`, from stream `stream` of `seed`
/// (Box-Muller on ChaCha20, computed on the CPU: the same values on every device).
pub fn gaussian(seed: u64, stream: u64, shape: &[i64], device: Device) -> Tensor {
    let n: usize = shape.iter().map(|&d| d.max(0) as usize).product();
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    let mut values = Vec::with_capacity(n + 1);
    while values.len() < n {
        let u1: f64 = 1.0 - rng.random::<f64>();
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = std::f64::consts::TAU * u2;
        values.push((r * theta.cos()) as f32);
        values.push((r * theta.sin()) as f32);
    }
    values.truncate(n);
    Tensor::from_slice(&values).reshape(shape).to_kind(Kind::Float).to_device(device)
}

/// The seed of a stage's random streams from its `seed` parameter and its place in the study
/// (`context`, e.g. the tasks its input model has learnt), so that consecutive tasks of a
/// sequence differ (adapter initialisation, prompt order, initial noise) while a rerun of the
/// same stage draws the same numbers.
pub fn derive_seed(seed: u64, context: &str) -> u64 {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"ril-pipe stage seed\0");
    hasher.update(&seed.to_le_bytes());
    hasher.update(context.as_bytes());
    let digest = hasher.finalize();
    u64::from_le_bytes(digest.as_bytes()[..8].try_into().expect("a blake3 digest has 32 bytes"))
}

/// A derived stream id for (purpose, index) pairs, so different uses of one seed never overlap.
pub fn stream(purpose: u32, index: u64) -> u64 {
    (u64::from(purpose) << 40) ^ index
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_seeds_differ_by_seed_and_context_and_repeat() {
        assert_eq!(derive_seed(0, "abc"), derive_seed(0, "abc"));
        assert_ne!(derive_seed(0, "abc"), derive_seed(0, "abd"));
        assert_ne!(derive_seed(0, "abc"), derive_seed(1, "abc"));
    }

    #[test]
    fn same_seed_same_noise_and_roughly_standard() {
        let a = gaussian(7, 1, &[4, 1000], Device::Cpu);
        let b = gaussian(7, 1, &[4, 1000], Device::Cpu);
        assert!(a.equal(&b));
        assert!(!a.equal(&gaussian(7, 2, &[4, 1000], Device::Cpu)));
        let mean = a.mean(Kind::Double).double_value(&[]);
        let std = a.std(true).double_value(&[]);
        assert!(mean.abs() < 0.05 && (std - 1.0).abs() < 0.05, "{mean} {std}");
        assert_eq!(gaussian(1, 0, &[3], Device::Cpu).size(), vec![3]);
    }

    #[test]
    fn the_noise_is_the_same_on_every_device() {
        let cpu = gaussian(11, 3, &[2, 4, 8, 8], Device::Cpu);
        assert_eq!(cpu.kind(), Kind::Float);
        // On a machine without CUDA only the CPU is checked; with one, each GPU too.
        for i in 0..tch::Cuda::device_count().max(0) as usize {
            let gpu = gaussian(11, 3, &[2, 4, 8, 8], Device::Cuda(i));
            assert_eq!(gpu.device(), Device::Cuda(i));
            assert!(gpu.to_device(Device::Cpu).equal(&cpu), "cuda:{i} noise differs from the CPU's");
        }
    }
}
