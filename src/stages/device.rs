//! Devices: from `--device` to the GPUs a run may use, and from a stage's device string to tch.

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("--device {0}: expected cpu, cuda, cuda:N or auto")]
    Syntax(String),
    #[error("--device {asked}: CUDA is not available here ({reason})")]
    NoCuda { asked: String, reason: String },
    #[error("--device {asked}: this machine has {count} CUDA device(s)")]
    NoSuchGpu { asked: String, count: i64 },
}

fn cuda_count() -> i64 {
    if tch::Cuda::is_available() {
        tch::Cuda::device_count()
    } else {
        0
    }
}

/// The GPU devices of a run: empty for `cpu` (and for `auto` without CUDA).
pub fn gpus_for(spec: &str) -> Result<Vec<String>, DeviceError> {
    let count = cuda_count();
    let all = || (0..count).map(|i| format!("cuda:{i}")).collect::<Vec<_>>();
    match spec {
        "cpu" => Ok(Vec::new()),
        "auto" => Ok(all()),
        "cuda" if count > 0 => Ok(all()),
        "cuda" => Err(DeviceError::NoCuda {
            asked: spec.into(),
            reason: "no CUDA device or driver found, or libtorch_cuda was not linked".into(),
        }),
        other => {
            let index: i64 = other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| DeviceError::Syntax(other.into()))?;
            if count == 0 {
                Err(DeviceError::NoCuda {
                    asked: spec.into(),
                    reason: "no CUDA device or driver found".into(),
                })
            } else if index >= count || index < 0 {
                Err(DeviceError::NoSuchGpu { asked: spec.into(), count })
            } else {
                Ok(vec![other.to_string()])
            }
        }
    }
}

/// A stage's device string as a tch device.
pub fn tch_device(device: &str) -> tch::Device {
    match device.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
        Some(i) => tch::Device::Cuda(i),
        None => tch::Device::Cpu,
    }
}
