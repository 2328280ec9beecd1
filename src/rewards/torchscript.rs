//! A reward from a TorchScript archive: any differentiable scorer a researcher exports with
//! `torch.jit.script(module).save("reward.pt")`.
//!
//! The contract (docs/rewards.md): `forward(images: Tensor, prompts: List[str]) -> Tensor`, with
//! `images` `[B, 3, H, W]` float32 in [0, 1] (in the autograd graph) and one prompt per image,
//! returning one score per image, `[B]`. The module runs on the device it is loaded on, in eval
//! mode, with its parameters frozen.
//!
//! Loading is checked: the file must be a TorchScript archive (not a `torch.save` checkpoint or
//! anything else), and a probe batch ([`Probe`], 2 images by default) must go through `forward`
//! with the right signature, give a float `[B]` of finite scores, and a backward pass from the
//! scores must reach the images with a finite gradient that is not zero everywhere. Each refusal
//! is a [`TorchScriptError`] naming the file and what is wrong.
use std::io::Read;
use std::path::{Path, PathBuf};

use tch::{CModule, Device, IValue, Kind, Tensor};

use super::{check_images, check_prompts, Reward, RewardError};

/// Why a TorchScript reward was refused; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum TorchScriptError {
    #[error("reward {}: cannot read the file: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "reward {}: not a TorchScript archive: {reason} (export the reward with \
         `torch.jit.script(module).save(path)`)",
        path.display()
    )]
    NotTorchScript { path: PathBuf, reason: String },
    #[error(
        "reward {}: wrong signature: `forward` must take (images: Tensor, prompts: List[str]) and \
         return a Tensor: {reason}",
        path.display()
    )]
    Signature { path: PathBuf, reason: String },
    #[error("reward {}: `forward` failed on {batch} probe images of {height}x{width}: {reason}", path.display())]
    Probe {
        path: PathBuf,
        batch: i64,
        height: i64,
        width: i64,
        reason: String,
    },
    #[error("reward {}: wrong output: `forward` returned {found} for {batch} images, expected a float tensor of shape [{batch}] (one score per image)", path.display())]
    Output {
        path: PathBuf,
        batch: i64,
        found: String,
    },
    #[error("reward {}: non-finite {what} on the probe batch: {values}", path.display())]
    NonFinite {
        path: PathBuf,
        /// `scores` or `gradient`.
        what: &'static str,
        values: String,
    },
    #[error("reward {}: not differentiable in the images: {reason}", path.display())]
    NotDifferentiable { path: PathBuf, reason: String },
    #[error("reward {}: {source}", path.display())]
    Tch {
        path: PathBuf,
        #[source]
        source: tch::TchError,
    },
}

/// The batch a TorchScript reward is tried on when it is loaded: `batch` smooth colour images
/// of `height` x `width` (values in [0.15, 0.85]) with distinct prompts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub batch: i64,
    pub height: i64,
    pub width: i64,
}

impl Default for Probe {
    /// Two 64x64 images; the integration passes the world's image size instead.
    fn default() -> Self {
        Probe { batch: 2, height: 64, width: 64 }
    }
}

/// The prompts of the probe batch, used in turn.
pub const PROBE_PROMPTS: [&str; 3] = [
    "a photograph of a red apple on a wooden table",
    "a watercolour painting of a lighthouse at dusk",
    "a city street at night, neon signs reflected in the rain",
];

impl Probe {
    /// The probe images `[batch, 3, height, width]` in [0.15, 0.85] on `device`: a smooth
    /// pattern of a different phase per image and channel, so no two images or channels agree.
    pub fn images(&self, device: Device) -> Tensor {
        let opts = (Kind::Float, device);
        let y = Tensor::arange(self.height, opts).view([1, 1, self.height, 1]) / (self.height.max(2) - 1) as f64;
        let x = Tensor::arange(self.width, opts).view([1, 1, 1, self.width]) / (self.width.max(2) - 1) as f64;
        let b = Tensor::arange(self.batch, opts).view([self.batch, 1, 1, 1]);
        let c = Tensor::arange(3, opts).view([1, 3, 1, 1]);
        let phase = b * 0.9 + c * 2.1;
        (x * 5.0 + y * 3.0 + phase).sin() * 0.35 + 0.5
    }

    /// One prompt per probe image.
    pub fn prompts(&self) -> Vec<String> {
        (0..self.batch as usize).map(|i| PROBE_PROMPTS[i % PROBE_PROMPTS.len()].to_string()).collect()
    }
}

/// A reward computed by a TorchScript module (see the module docs for the contract).
pub struct TorchScriptReward {
    name: String,
    path: PathBuf,
    module: CModule,
    device: Device,
}

impl std::fmt::Debug for TorchScriptReward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchScriptReward").field("name", &self.name).field("path", &self.path).field("device", &self.device).finish()
    }
}

/// Checks that `path` is a loadable, well-behaved TorchScript reward on `device` (the default
/// [`Probe`]); what a pipeline validator calls once the file exists.
pub fn validate(path: &Path, device: Device) -> Result<(), TorchScriptError> {
    validate_with(path, device, Probe::default())
}

/// [`validate`] with a chosen probe batch (e.g. the world's image size).
pub fn validate_with(path: &Path, device: Device, probe: Probe) -> Result<(), TorchScriptError> {
    TorchScriptReward::load_with(path.display().to_string(), path, device, probe).map(|_| ())
}

impl TorchScriptReward {
    /// Loads the archive at `path` on `device`, freezes it and checks it on the default
    /// [`Probe`]. `name` is how logs and reports call the reward.
    pub fn load(name: impl Into<String>, path: &Path, device: Device) -> Result<Self, TorchScriptError> {
        Self::load_with(name, path, device, Probe::default())
    }

    /// [`TorchScriptReward::load`] with a chosen probe batch.
    pub fn load_with(name: impl Into<String>, path: &Path, device: Device, probe: Probe) -> Result<Self, TorchScriptError> {
        check_archive(path)?;
        let tch_err = |source| TorchScriptError::Tch { path: path.to_path_buf(), source };
        let mut module = CModule::load_on_device(path, device).map_err(|e| TorchScriptError::NotTorchScript {
            path: path.to_path_buf(),
            reason: format!("libtorch cannot load it: {}", torch_message(&e)),
        })?;
        module.f_set_eval().map_err(tch_err)?;
        for (_, mut parameter) in module.named_parameters().map_err(tch_err)? {
            let _ = parameter.f_requires_grad_(false).map_err(tch_err)?;
        }
        let reward = TorchScriptReward { name: name.into(), path: path.to_path_buf(), module, device };
        tch::with_grad(|| reward.check_on(probe))?;
        Ok(reward)
    }

    /// The archive this reward was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// The module's parameters (all frozen), by their TorchScript names.
    pub fn named_parameters(&self) -> Result<Vec<(String, Tensor)>, TorchScriptError> {
        self.module.named_parameters().map_err(|source| TorchScriptError::Tch { path: self.path.clone(), source })
    }

    /// Scores `[B]` (fp32, on the images' device) of `images` `[B, 3, H, W]` (converted to fp32
    /// and moved to the reward's device, in the graph) with one prompt per image. The module
    /// gets its own copy of the images, so an in-place operation inside it cannot change the
    /// caller's tensor.
    pub fn forward(&self, images: &Tensor, prompts: &[String]) -> Result<Tensor, TorchScriptError> {
        let batch = images.size().first().copied().unwrap_or(0);
        let input = images.to_kind(Kind::Float).to_device(self.device).copy();
        let args = [IValue::Tensor(input), IValue::StringList(prompts.to_vec())];
        let output = self.module.forward_is(&args).map_err(|e| self.call_error(&e, batch, images))?;
        let scores = match output {
            IValue::Tensor(t) => t,
            other => return Err(self.output_error(batch, ivalue_kind(&other).to_string())),
        };
        let floating = matches!(scores.kind(), Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16);
        if scores.size() != [batch] || !floating {
            return Err(self.output_error(batch, format!("a tensor of dtype {:?} and shape {:?}", scores.kind(), scores.size())));
        }
        Ok(scores.to_kind(Kind::Float).to_device(images.device()))
    }

    fn output_error(&self, batch: i64, found: String) -> TorchScriptError {
        TorchScriptError::Output { path: self.path.clone(), batch, found }
    }

    /// A failed call: the arguments did not fit `forward`'s schema (a signature error), or the
    /// module raised while running.
    fn call_error(&self, error: &tch::TchError, batch: i64, images: &Tensor) -> TorchScriptError {
        let message = torch_message(error);
        if is_signature_error(&message) {
            return TorchScriptError::Signature { path: self.path.clone(), reason: message };
        }
        let size = images.size();
        TorchScriptError::Probe {
            path: self.path.clone(),
            batch,
            height: size.get(2).copied().unwrap_or(0),
            width: size.get(3).copied().unwrap_or(0),
            reason: message,
        }
    }

    /// The probe: forward on `probe`'s batch, then a backward pass to the images.
    fn check_on(&self, probe: Probe) -> Result<(), TorchScriptError> {
        let path = || self.path.clone();
        if probe.batch < 1 || probe.height < 1 || probe.width < 1 {
            return Err(TorchScriptError::Probe {
                path: path(),
                batch: probe.batch,
                height: probe.height,
                width: probe.width,
                reason: "the probe batch must hold at least one image of at least 1x1".into(),
            });
        }
        let images = probe.images(self.device).set_requires_grad(true);
        let scores = self.forward(&images, &probe.prompts())?;
        let finite = |t: &Tensor| t.isfinite().all().int64_value(&[]) != 0;
        if !finite(&scores) {
            return Err(TorchScriptError::NonFinite { path: path(), what: "scores", values: format!("{:?}", Vec::<f64>::try_from(&scores.detach().to_device(Device::Cpu).to_kind(Kind::Double)).unwrap_or_default()) });
        }
        if !scores.requires_grad() {
            return Err(TorchScriptError::NotDifferentiable {
                path: path(),
                reason: "the scores are not in the autograd graph (detached, computed under no_grad, or not computed from the images)".into(),
            });
        }
        let grads = Tensor::f_run_backward(&[scores.sum(Kind::Float)], &[&images], false, false).map_err(|e| TorchScriptError::NotDifferentiable {
            path: path(),
            reason: format!("a backward pass from the scores does not reach the images: {}", torch_message(&e)),
        })?;
        let grad = match grads.into_iter().next() {
            Some(g) if g.defined() => g,
            _ => return Err(TorchScriptError::NotDifferentiable { path: path(), reason: "no gradient reaches the images".into() }),
        };
        if !finite(&grad) {
            let bad = grad.isfinite().logical_not().sum(Kind::Int64).int64_value(&[]);
            return Err(TorchScriptError::NonFinite { path: path(), what: "gradient", values: format!("{bad} of {} gradient entries are NaN or infinite", grad.numel()) });
        }
        if grad.abs().max().double_value(&[]) == 0.0 {
            return Err(TorchScriptError::NotDifferentiable {
                path: path(),
                reason: "the gradient of the scores with respect to the images is zero everywhere on the probe batch (rounding, thresholds or argmax cut the graph)".into(),
            });
        }
        Ok(())
    }
}

impl Reward for TorchScriptReward {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&self, images: &Tensor, prompts: &[String]) -> Result<Tensor, RewardError> {
        let (batch, _, _) = check_images(images)?;
        check_prompts(batch, prompts)?;
        self.forward(images, prompts).map_err(|e| RewardError::Model(Box::new(e)))
    }
}

/// The checks made before libtorch sees the file: it exists, is a zip archive, and holds
/// TorchScript code (`<archive>/code/`), unlike a `torch.save` checkpoint.
fn check_archive(path: &Path) -> Result<(), TorchScriptError> {
    let read_err = |source| TorchScriptError::Read { path: path.to_path_buf(), source };
    let not_ts = |reason: &str| TorchScriptError::NotTorchScript { path: path.to_path_buf(), reason: reason.to_string() };
    let mut file = std::fs::File::open(path).map_err(read_err)?;
    if file.metadata().map_err(read_err)?.is_dir() {
        return Err(not_ts("a directory, not a file"));
    }
    let mut magic = [0u8; 4];
    let got = file.read(&mut magic).map_err(read_err)?;
    if got < 4 || magic != *b"PK\x03\x04" {
        return Err(not_ts("not a zip archive"));
    }
    let archive = zip::ZipArchive::new(file).map_err(|e| not_ts(&format!("a damaged zip archive ({e})")))?;
    let names: Vec<&str> = archive.file_names().collect();
    let has = |suffix: &str| names.iter().any(|n| n.split_once('/').is_some_and(|(_, rest)| rest.starts_with(suffix)));
    if !has("code/") {
        return Err(not_ts(if has("data.pkl") {
            "a torch.save checkpoint (weights or a pickled module) without TorchScript code"
        } else {
            "a zip archive without TorchScript code"
        }));
    }
    Ok(())
}

/// libtorch's message without the C++ backtrace that follows it.
fn torch_message(error: &tch::TchError) -> String {
    let text = match error {
        tch::TchError::Torch(s) => s.clone(),
        other => other.to_string(),
    };
    let kept: Vec<&str> = text
        .lines()
        .take_while(|l| !l.starts_with("Exception raised from") && !l.starts_with("frame #"))
        .filter(|l| !l.trim().is_empty())
        .collect();
    kept.join("\n")
}

/// Whether libtorch refused the arguments against `forward`'s schema rather than the module
/// failing inside: `checkAndNormalizeInputs` (too many arguments, a missing one, a type
/// mismatch) ends its message with the schema, `Declaration: forward(...)`; a module without
/// `forward` says so.
fn is_signature_error(message: &str) -> bool {
    message.contains("Declaration: forward(") || message.contains("Method 'forward' is not defined")
}

fn ivalue_kind(value: &IValue) -> &'static str {
    match value {
        IValue::None => "None",
        IValue::Tensor(_) => "a tensor",
        IValue::Double(_) => "a float",
        IValue::Int(_) => "an int",
        IValue::Bool(_) => "a bool",
        IValue::Tuple(_) => "a tuple",
        IValue::IntList(_) | IValue::DoubleList(_) | IValue::BoolList(_) | IValue::GenericList(_) => "a list",
        IValue::TensorList(_) => "a list of tensors",
        IValue::String(_) => "a string",
        IValue::StringList(_) => "a list of strings",
        IValue::GenericDict(_) => "a dict",
        IValue::Object(_) => "an object",
        IValue::Device(_) => "a device",
        _ => "a value of another type",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn files_that_are_not_torchscript_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let text = temp_file(&dir, "notes.pt", b"not a model at all");
        let err = validate(&text, Device::Cpu).unwrap_err();
        assert!(matches!(&err, TorchScriptError::NotTorchScript { reason, .. } if reason == "not a zip archive"), "{err}");
        assert!(err.to_string().contains("notes.pt"), "{err}");

        let missing = dir.path().join("missing.pt");
        let err = validate(&missing, Device::Cpu).unwrap_err();
        assert!(matches!(err, TorchScriptError::Read { .. }), "{err}");
        assert!(err.to_string().contains("missing.pt"), "{err}");

        let err = validate(dir.path(), Device::Cpu).unwrap_err();
        assert!(matches!(err, TorchScriptError::NotTorchScript { .. }), "{err}");

        // A safetensors file (weights, no code).
        let weights = dir.path().join("weights.pt");
        Tensor::write_safetensors(&[("w", Tensor::ones([2], (Kind::Float, Device::Cpu)))], &weights).unwrap();
        let err = validate(&weights, Device::Cpu).unwrap_err();
        assert!(matches!(err, TorchScriptError::NotTorchScript { .. }), "{err}");
        assert!(err.to_string().contains("weights.pt"), "{err}");

        // A zip archive cut short.
        let mut zip = b"PK\x03\x04".to_vec();
        zip.extend_from_slice(&[0u8; 40]);
        let cut = temp_file(&dir, "cut.pt", &zip);
        let err = validate(&cut, Device::Cpu).unwrap_err();
        assert!(matches!(&err, TorchScriptError::NotTorchScript { reason, .. } if reason.contains("damaged")), "{err}");
    }

    /// tch traces a closure into a TorchScript module whose forward takes one tensor: the probe
    /// calls it with (images, prompts) and gets a signature error, not a crash.
    #[test]
    fn a_module_with_one_input_is_a_signature_error() {
        let dir = tempfile::tempdir().unwrap();
        let x = Tensor::zeros([2, 3, 8, 8], (Kind::Float, Device::Cpu));
        let module = CModule::create_by_tracing("OneInput", "forward", &[x], &mut |xs| vec![xs[0].mean_dim([1i64, 2, 3].as_slice(), false, Kind::Float)]).unwrap();
        let path = dir.path().join("one_input.pt");
        module.save(&path).unwrap();
        let err = validate(&path, Device::Cpu).unwrap_err();
        assert!(matches!(err, TorchScriptError::Signature { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("one_input.pt") && text.contains("List[str]"), "{text}");
    }

    #[test]
    fn probe_images_are_distinct_and_in_range() {
        let probe = Probe { batch: 3, height: 5, width: 7 };
        let images = probe.images(Device::Cpu);
        assert_eq!(images.size(), [3, 3, 5, 7]);
        let (lo, hi) = (images.min().double_value(&[]), images.max().double_value(&[]));
        assert!((0.15 - 1e-6..=0.85 + 1e-6).contains(&lo) && hi <= 0.85 + 1e-6 && hi > lo, "{lo} {hi}");
        let a = images.get(0);
        let b = images.get(1);
        assert!((a - b).abs().max().double_value(&[]) > 0.1);
        assert_eq!(probe.prompts().len(), 3);
        assert_ne!(probe.prompts()[0], probe.prompts()[1]);
    }

    #[test]
    fn signature_errors_are_told_from_failures_inside() {
        assert!(is_signature_error("Expected at most 2 argument(s) for operator 'forward', but received 3 argument(s). Declaration: forward(__torch__.M self, Tensor images) -> Tensor"));
        assert!(is_signature_error("Method 'forward' is not defined."));
        assert!(!is_signature_error("The following operation failed in the TorchScript interpreter.\nRuntimeError: size mismatch"));
        let error = tch::TchError::Torch("bad thing\nException raised from foo at bar.cpp:1\nframe #0: baz".into());
        assert_eq!(torch_message(&error), "bad thing");
    }
}
