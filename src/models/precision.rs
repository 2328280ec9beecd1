//! Mixed precision of the training and evaluation stages (`precision` parameter).
//!
//! The frozen models (UNet base weights, VAE, text encoder, reward and metric models) are kept
//! in the chosen dtype; everything that is trained or accumulated stays in fp32: the LoRA
//! adapters, RID's EMA teacher, the AdamW moments, the sampler's arithmetic (the UNet's inputs
//! are cast to its dtype and its prediction back to fp32), the decoded images, the reward and
//! metric scores, the loss and its reductions.
//!
//! The adapted layers add `B A x` with `A` and `B` cast to the dtype of `x` for each call (see
//! [`crate::models::lora`]): the matmuls run at the frozen layer's precision and the gradient
//! flows back through the cast into the fp32 parameters.
//!
//! `fp32` changes nothing (every cast is a no-op), so fp32 results are bitwise those of the code
//! before this parameter existed. `fp16` is meant for CUDA; `bf16` runs on the CPU too.
use tch::nn::VarStore;
use tch::{Device, Kind};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Fp32,
    Fp16,
    Bf16,
}

impl Precision {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "fp32" => Some(Precision::Fp32),
            "fp16" => Some(Precision::Fp16),
            "bf16" => Some(Precision::Bf16),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Bf16 => "bf16",
        }
    }

    /// The dtype of the frozen weights and of the activations computed from them.
    pub fn kind(self) -> Kind {
        match self {
            Precision::Fp32 => Kind::Float,
            Precision::Fp16 => Kind::Half,
            Precision::Bf16 => Kind::BFloat16,
        }
    }

    /// Bytes per element of [`Self::kind`].
    pub fn bytes(self) -> u64 {
        match self {
            Precision::Fp32 => 4,
            Precision::Fp16 | Precision::Bf16 => 2,
        }
    }

    /// An empty variable store whose new variables are created in this precision (so random
    /// initialisation before loading never holds an fp32 copy of a large model).
    pub fn new_store(self, device: Device) -> VarStore {
        let mut vs = VarStore::new(device);
        if self != Precision::Fp32 {
            vs.set_kind(self.kind());
        }
        vs
    }

    /// Casts every floating-point variable of `vs` to this precision (catching variables a
    /// constructor created with an explicit dtype). A no-op for fp32.
    pub fn cast_store(self, vs: &mut VarStore) {
        tch::no_grad(|| match self {
            Precision::Fp32 => {}
            Precision::Fp16 => vs.half(),
            Precision::Bf16 => vs.bfloat16(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for p in [Precision::Fp32, Precision::Fp16, Precision::Bf16] {
            assert_eq!(Precision::parse(p.name()), Some(p));
        }
        assert_eq!(Precision::parse("fp8"), None);
    }

    #[test]
    fn stores_are_created_and_cast_in_the_precision() {
        let mut vs = Precision::Bf16.new_store(Device::Cpu);
        let lin = tch::nn::linear(vs.root() / "l", 3, 2, Default::default());
        assert_eq!(lin.ws.kind(), Kind::BFloat16);
        let explicit = vs.root().add("explicit", tch::Tensor::zeros([2], (Kind::Float, Device::Cpu)), false);
        assert_eq!(explicit.kind(), Kind::Float);
        Precision::Bf16.cast_store(&mut vs);
        assert_eq!(explicit.kind(), Kind::BFloat16);
        let mut fp32 = Precision::Fp32.new_store(Device::Cpu);
        let lin = tch::nn::linear(fp32.root() / "l", 3, 2, Default::default());
        Precision::Fp32.cast_store(&mut fp32);
        assert_eq!(lin.ws.kind(), Kind::Float);
    }
}
