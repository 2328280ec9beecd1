//! The one trait every stage kind implements, the registry of kinds, and what a running stage
//! sees of the runner ([`StageContext`]).
use std::collections::BTreeMap;
use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};

use crate::pipeline::schema::KindSchema;
use crate::pipeline::{ResolvedStage, Schemas};

use super::cache::Manifest;
use super::progress::StageProgress;

/// Estimates shown by `plan` before anything runs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Estimate {
    /// Rough compute, in floating-point operations.
    pub flops: Option<f64>,
    /// Peak accelerator memory, in bytes.
    pub peak_memory_bytes: Option<u64>,
    /// A one-line human summary (e.g. "15 epochs x 94 steps").
    pub note: Option<String>,
}

/// A stage kind: what it accepts ([`KindSchema`]) and how it runs.
pub trait StageKind: Send + Sync {
    fn schema(&self) -> KindSchema;

    /// Runs the stage: reads `ctx.inputs`, writes its outputs under `ctx.out_dir()`.
    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError>;

    /// Compute and memory estimates for `plan` (the whole pipeline is given so a stage can look
    /// at its upstream stages); kinds that can say nothing return the default.
    fn estimate(&self, _stage: &ResolvedStage, _pipeline: &crate::pipeline::ResolvedPipeline) -> Estimate {
        Estimate::default()
    }
}

/// Why a stage failed.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("cancelled")]
    Cancelled,
    #[error("{0}")]
    Failed(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl StageError {
    /// A failure described by any displayable error.
    pub fn failed(e: impl fmt::Display) -> Self {
        StageError::Failed(e.to_string())
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        StageError::Io {
            context: context.into(),
            source,
        }
    }
}

impl From<crate::pipeline::params::ParamError> for StageError {
    fn from(e: crate::pipeline::params::ParamError) -> Self {
        StageError::Failed(format!("{e} (the kind's schema and its parameters disagree: a bug)"))
    }
}

impl From<crate::records::RecordError> for StageError {
    fn from(e: crate::records::RecordError) -> Self {
        match e {
            crate::records::RecordError::Io { context, source } => StageError::Io { context, source },
            crate::records::RecordError::Format(message) => StageError::Failed(message),
        }
    }
}

impl From<std::io::Error> for StageError {
    fn from(source: std::io::Error) -> Self {
        StageError::Io {
            context: "I/O error".into(),
            source,
        }
    }
}

/// The kinds a binary (or a test) knows, by name.
#[derive(Default)]
pub struct Registry {
    kinds: BTreeMap<String, Arc<dyn StageKind>>,
}

impl Registry {
    pub fn new() -> Self {
        Registry::default()
    }

    /// Adds a kind; a second kind of the same name replaces the first.
    pub fn register(&mut self, kind: impl StageKind + 'static) -> &mut Self {
        let name = kind.schema().kind.to_string();
        self.kinds.insert(name, Arc::new(kind));
        self
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn StageKind>> {
        self.kinds.get(name)
    }

    /// What the pipeline layer validates against.
    pub fn schemas(&self) -> Schemas {
        self.kinds.iter().map(|(k, v)| (k.clone(), v.schema())).collect()
    }
}

/// One upstream stage's finished output, as a stage reads it.
#[derive(Debug, Clone)]
pub struct InputObject {
    pub stage_id: String,
    pub kind: String,
    pub key: String,
    /// The object's folder in the cache (read-only by convention).
    pub dir: PathBuf,
    pub meta: BTreeMap<String, String>,
    pub manifest: Manifest,
}

impl InputObject {
    /// A file of this object, checked to be listed in its manifest.
    pub fn file(&self, name: &str) -> Result<PathBuf, StageError> {
        if self.manifest.files.contains_key(name) {
            Ok(self.dir.join(name))
        } else {
            Err(StageError::Failed(format!(
                "input `{}` (kind `{}`) has no output file `{name}`",
                self.stage_id, self.kind
            )))
        }
    }
}

/// What a running stage sees of the runner.
pub struct StageContext {
    pub stage: ResolvedStage,
    pub key: String,
    /// Upstream outputs by input name, in the order the pipeline lists them.
    pub inputs: BTreeMap<String, Vec<InputObject>>,
    /// Where to run: `cpu` or `cuda:N`.
    pub device: String,
    /// Intra-op threads this stage may use.
    pub threads: usize,
    out_dir: PathBuf,
    resume_dir: PathBuf,
    cancel: Arc<AtomicBool>,
    log: Mutex<Option<std::fs::File>>,
    pub progress: StageProgress,
}

impl StageContext {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        stage: ResolvedStage,
        key: String,
        inputs: BTreeMap<String, Vec<InputObject>>,
        device: String,
        threads: usize,
        out_dir: PathBuf,
        resume_dir: PathBuf,
        cancel: Arc<AtomicBool>,
        progress: StageProgress,
    ) -> Result<Self, StageError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(out_dir.join(LOG_FILE))
            .map_err(|e| StageError::io(format!("cannot create the stage log in {}", out_dir.display()), e))?;
        Ok(StageContext {
            stage,
            key,
            inputs,
            device,
            threads,
            out_dir,
            resume_dir,
            cancel,
            log: Mutex::new(Some(log)),
            progress,
        })
    }

    /// The folder the stage writes its outputs to (a temporary folder inside the cache, renamed
    /// into place when the stage succeeds).
    pub fn out_dir(&self) -> &Path {
        &self.out_dir
    }

    /// A folder that survives an interrupted run of this exact stage (same key), for resumable
    /// checkpoints; removed once the stage succeeds. Write into it with [`super::atomic_write`].
    pub fn resume_dir(&self) -> Result<&Path, StageError> {
        std::fs::create_dir_all(&self.resume_dir).map_err(|e| StageError::io(format!("cannot create {}", self.resume_dir.display()), e))?;
        Ok(&self.resume_dir)
    }

    pub fn params(&self) -> &Map<String, Value> {
        &self.stage.params
    }

    /// The stage's parameters as its kind's typed struct.
    pub fn typed_params<P: crate::pipeline::params::StageParams>(&self) -> Result<P, StageError> {
        Ok(P::from_params(&self.stage.params)?)
    }

    /// The single stage of input `name`.
    pub fn input(&self, name: &str) -> Result<&InputObject, StageError> {
        match self.inputs.get(name).map(Vec::as_slice) {
            Some([one]) => Ok(one),
            Some([]) | None => Err(StageError::Failed(format!("stage `{}` has no input `{name}`", self.stage.id))),
            Some(many) => Err(StageError::Failed(format!("stage `{}`: input `{name}` has {} stages, expected one", self.stage.id, many.len()))),
        }
    }

    /// All stages of input `name` (empty when the input is optional and absent).
    pub fn input_list(&self, name: &str) -> &[InputObject] {
        self.inputs.get(name).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Err(Cancelled) once the run was interrupted; long stages call this between steps.
    pub fn check_cancelled(&self) -> Result<(), StageError> {
        if self.cancel.load(Ordering::SeqCst) {
            Err(StageError::Cancelled)
        } else {
            Ok(())
        }
    }

    /// Appends a line to the stage's log (kept with its outputs) and shows it as the stage's
    /// progress message.
    pub fn log(&self, line: impl AsRef<str>) {
        let line = line.as_ref();
        if let Ok(mut guard) = self.log.lock() {
            if let Some(file) = guard.as_mut() {
                // A log line that cannot be written must not fail the stage.
                let _ = writeln!(file, "{line}");
            }
        }
        self.progress.message(line);
    }

    /// Closes the log file (before the output folder is hashed).
    pub(crate) fn close_log(&self) {
        if let Ok(mut guard) = self.log.lock() {
            if let Some(file) = guard.take() {
                let _ = file.sync_all();
            }
        }
    }
}

/// The log every stage keeps with its outputs.
pub const LOG_FILE: &str = "log.txt";
