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

/// Free and total memory of CUDA device `index` in bytes, as `cudaMemGetInfo` reports it (the
/// CUDA runtime that libtorch loaded), else as `nvidia-smi` does; `Err` says why neither could.
pub fn cuda_memory(index: usize) -> Result<(u64, u64), String> {
    match cudart::mem_get_info(index) {
        Ok(info) => Ok(info),
        Err(runtime) => nvidia_smi_memory(index).map_err(|smi| format!("{runtime}; {smi}")),
    }
}

/// `nvidia-smi` numbers GPUs by PCI order and ignores `CUDA_VISIBLE_DEVICES`: device `index` of
/// this process is the `index`-th entry of that list (an index or a UUID) when it is set.
fn nvidia_smi_memory(index: usize) -> Result<(u64, u64), String> {
    let id = match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(list) if !list.trim().is_empty() => list
            .split(',')
            .nth(index)
            .map(|s| s.trim().to_string())
            .ok_or_else(|| format!("CUDA_VISIBLE_DEVICES={list} has no device {index}"))?,
        _ => index.to_string(),
    };
    let output = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=memory.free,memory.total", "--format=csv,noheader,nounits", "-i", &id])
        .output()
        .map_err(|e| format!("nvidia-smi: {e}"))?;
    if !output.status.success() {
        return Err(format!("nvidia-smi -i {id}: {}", String::from_utf8_lossy(&output.stderr).trim()));
    }
    parse_smi_memory(&String::from_utf8_lossy(&output.stdout)).ok_or_else(|| format!("nvidia-smi -i {id}: unexpected output"))
}

/// `free, total` in MiB (one line of `--format=csv,noheader,nounits`) to bytes.
fn parse_smi_memory(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().next()?;
    let (free, total) = line.split_once(',')?;
    let mib = |s: &str| s.trim().parse::<u64>().ok().map(|v| v << 20);
    Some((mib(free)?, mib(total)?))
}

/// `cudaMemGetInfo` of the CUDA runtime libtorch_cuda links (looked up in the process, so a
/// binary without CUDA libraries simply reports it missing).
mod cudart {
    use std::ffi::{c_char, c_int, c_void, CStr};

    extern "C" {
        fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
    }

    type GetDevice = unsafe extern "C" fn(*mut c_int) -> c_int;
    type SetDevice = unsafe extern "C" fn(c_int) -> c_int;
    type MemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> c_int;

    fn symbol(name: &CStr) -> Result<*mut c_void, String> {
        // SAFETY: dlsym with RTLD_DEFAULT (a null handle on glibc) only looks the name up.
        let ptr = unsafe { dlsym(std::ptr::null_mut(), name.as_ptr()) };
        if ptr.is_null() {
            Err(format!("the CUDA runtime is not loaded ({} not found)", name.to_string_lossy()))
        } else {
            Ok(ptr)
        }
    }

    pub fn mem_get_info(index: usize) -> Result<(u64, u64), String> {
        let get_device = symbol(c"cudaGetDevice")?;
        let set_device = symbol(c"cudaSetDevice")?;
        let mem_get_info = symbol(c"cudaMemGetInfo")?;
        // SAFETY: the symbols are the CUDA runtime's functions of these signatures; the current
        // device of the thread is restored before returning.
        unsafe {
            let get_device: GetDevice = std::mem::transmute(get_device);
            let set_device: SetDevice = std::mem::transmute(set_device);
            let mem_get_info: MemGetInfo = std::mem::transmute(mem_get_info);
            let mut previous: c_int = 0;
            let had_device = get_device(&mut previous) == 0;
            let status = set_device(index as c_int);
            if status != 0 {
                return Err(format!("cudaSetDevice({index}) failed with CUDA error {status}"));
            }
            let (mut free, mut total) = (0usize, 0usize);
            let status = mem_get_info(&mut free, &mut total);
            if had_device && previous != index as c_int {
                set_device(previous);
            }
            if status != 0 {
                return Err(format!("cudaMemGetInfo failed with CUDA error {status}"));
            }
            Ok((free as u64, total as u64))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvidia_smi_lines_parse_to_bytes() {
        assert_eq!(parse_smi_memory("81000, 81559\n"), Some((81000 << 20, 81559 << 20)));
        assert_eq!(parse_smi_memory("[N/A], 81559"), None);
        assert_eq!(parse_smi_memory(""), None);
    }

    #[test]
    fn cuda_memory_is_read_or_refused_with_a_reason() {
        match cuda_memory(0) {
            Ok((free, total)) => assert!(tch::Cuda::is_available() && free <= total && total > 0),
            Err(reason) => assert!(!reason.is_empty()),
        }
    }

    #[test]
    fn device_strings() {
        assert_eq!(tch_device("cuda:1"), tch::Device::Cuda(1));
        assert_eq!(tch_device("cpu"), tch::Device::Cpu);
        assert!(matches!(gpus_for("gpu"), Err(DeviceError::Syntax(_))));
        assert_eq!(gpus_for("cpu").unwrap(), Vec::<String>::new());
    }
}
