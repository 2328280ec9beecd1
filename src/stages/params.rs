//! Parameter groups and parameter types several stage kinds share: the DDIM sampler's settings,
//! the precision of the frozen models, the LoRA target layers, and the enums of other layers
//! (task, precision, reduction, adapter initialisation, distillation space) as parameters.
use crate::method::objective::DistillSpace;
use crate::models::precision::Precision;
use crate::method::sampling::SamplerConfig;
use crate::models::lora::LoraInit;
use crate::pipeline::params::{param, Field};
use crate::rewards::compressibility::Reduction;
use crate::stage_params;

use std::collections::BTreeMap;

use serde_json::Value;

use crate::pipeline::params::{Numeric, ParamValue};
use crate::pipeline::schema::ParamType;
use crate::records::Task;

/// A reward task by name: a built-in one or one the pipeline declares (validation checks which).
impl ParamValue for Task {
    fn param_type() -> ParamType {
        ParamType::Reward
    }
    fn from_value(value: &Value) -> Option<Self> {
        value.as_str().map(Task::from_name)
    }
    fn to_value(&self) -> Value {
        Value::String(self.name().to_string())
    }
}

/// Weights by reward task (joint tuning's mixture).
impl ParamValue for BTreeMap<Task, f64> {
    fn param_type() -> ParamType {
        ParamType::RewardMap(Box::new(ParamType::Float))
    }
    fn from_value(value: &Value) -> Option<Self> {
        value.as_object()?.iter().map(|(k, v)| Some((Task::from_name(k), v.as_f64()?))).collect()
    }
    fn to_value(&self) -> Value {
        Value::Object(self.iter().map(|(k, v)| (k.name().to_string(), Value::from(*v))).collect())
    }
}

impl Numeric for BTreeMap<Task, f64> {}
crate::enum_param!(Precision { Fp32, Fp16, Bf16 });
crate::enum_param!(Reduction { Sum, Mean });
crate::enum_param!(LoraInit { KaimingUniform, Normal });
crate::enum_param!(DistillSpace { Image, Latent });

stage_params! {
    /// DDIM sampling with classifier-free guidance, as training and evaluation sample.
    pub struct SamplerParams {
        pub ddim_steps: usize = param(50).min(1).max(1000).doc("DDIM steps N of sampling (paper: 50; at most the scheduler's 1000 training timesteps)"),
        pub eta: f64 = param(0.0).min(0).max(1).doc("DDIM eta"),
        pub guidance: f64 = param(7.5).min(0).doc("classifier-free guidance scale (1: no guidance)"),
    }
}

impl SamplerParams {
    pub fn config(&self) -> SamplerConfig {
        SamplerConfig { steps: self.ddim_steps, eta: self.eta, guidance: self.guidance }
    }

    /// Whether the UNet runs twice per step (conditional and unconditional).
    pub fn guided(&self) -> bool {
        self.guidance != 1.0
    }
}

/// The `precision` parameter of the kinds that load models.
pub fn precision_param() -> Field<Precision> {
    param(Precision::Fp32).doc("dtype of the frozen models (UNet base, VAE, text encoder, reward and metric models); LoRA adapters, EMA teacher, optimizer state, loss and scores stay fp32. fp16 is for CUDA")
}

/// The `lora_targets` parameter of the worlds.
pub fn lora_targets_param() -> Field<Vec<String>> {
    param(crate::models::lora::default_targets()).doc("suffixes of the layers the LoRA adapters wrap (AlignProp: the attention projections)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::params::{FieldDef, ParamValue};
    use serde_json::json;

    #[test]
    fn the_precision_parameter_defaults_to_fp32_and_reads_its_names() {
        assert_eq!(precision_param().specs("precision")[0].default, Some(json!("fp32")));
        assert_eq!(Precision::from_value(&json!("bf16")), Some(Precision::Bf16));
    }
}
