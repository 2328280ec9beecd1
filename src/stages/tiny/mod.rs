//! The tiny world's pretraining stages (`pipelines/tiny_world.yaml`), one file per kind, each
//! writing its model in the upstream layout and its quality gates (`gates.json`, also printed):
//!
//! - `tiny_prompts`: the 750/50 prompt split and the small CLIP BPE tokenizer.
//! - `tiny_clip`: the small CLIP (`clip/`, a transformers `CLIPModel` folder) and its text tower
//!   as the diffusion model's `text_encoder/`; gate: text-to-image retrieval among the test
//!   prompts.
//! - `tiny_vae`: the small AutoencoderKL (`vae/`); gate: reconstruction PSNR on test renders.
//! - `tiny_aesthetic`: the LAION-style head on the CLIP image embedding; gate: Pearson r with
//!   the procedural rating on test renders.
//! - `tiny_preference`: the HPSv2-style preference model (`hps/`); gate: pairwise accuracy on
//!   pairs of test prompts.
//! - `tiny_unet`: the small UNet2DConditionModel (`unet/`, EMA weights).
//! - `tiny_export`: the shipped bundle (f16 weights, `world.json`, prompts, FID reference,
//!   `MANIFEST.txt` of blake3 hashes), loaded back through `tiny_world`'s manifest reader,
//!   `Diffusion::load` and the rewards, and every gate measured again on it, plus the sample
//!   gates (CLIP score with the own vs a shuffled prompt, FID vs pure noise) and a sample grid.
//!
//! Each kind is a [`TinyKind`]; [`Tiny`] makes it a stage kind with the schema and the typed
//! parameters written once. This module holds what the kinds share: the bundle's layout, the
//! trainers' schedule parameters, the device, the gate report, the prompts input.
pub mod aesthetic;
pub mod clip;
pub mod export;
pub mod preference;
pub mod prompts;
pub mod unet;
pub mod vae;

use std::path::{Path, PathBuf};

use tch::{Device, Kind};

use crate::exec::{InputObject, StageContext, StageError, StageKind};
use crate::models::tokenizer::ClipTokenizer;
use crate::pipeline::params::StageParams;
use crate::pipeline::schema::{InputSpec, KindSchema};
use crate::rewards::clip_loader::{ClipFiles, ClipLayout, FrozenClip};
use crate::stage_params;
use crate::tiny::train::Schedule;
use crate::tiny::train::data::Excluded;
use crate::tiny::train::gates::GateReport;
use crate::tiny::train::TrainError;

use super::device::tch_device;
use super::world::read_prompts;

const TOKENIZER_DIR: &str = "tokenizer";
const TRAIN_PROMPTS: &str = "prompts/train.txt";
const TEST_PROMPTS: &str = "prompts/test.txt";
const CLIP_DIR: &str = "clip";
const TEXT_ENCODER_DIR: &str = "text_encoder";
const VAE_DIR: &str = "vae";
const UNET_DIR: &str = "unet";
const HPS_DIR: &str = "hps";
const HEAD_FILE: &str = "aesthetic_head.safetensors";
const TRAIN_FILE: &str = "train.json";
/// Most look words of an alt-text (one per quality, see `tiny::train::data`).
const LOOK_WORDS_PER_TEXT: usize = 8;

fn input(name: &'static str, doc: &'static str) -> InputSpec {
    InputSpec { name, required: true, many: false, doc }
}

stage_params! {
    /// The optimisation parameters every trainer has (each kind gives its own defaults).
    pub struct ScheduleParams {
        pub seed: u64 = required().min(0).doc("seed of the initialisation and of every batch"),
        pub steps: usize = required().min(1).doc("optimizer steps"),
        pub batch: usize = required().min(1).doc("batch size"),
        pub lr: f64 = required().min(0).max(1).doc("peak learning rate (AdamW; linear warm-up, cosine decay to 10%)"),
        pub warmup: usize = required().min(0).doc("warm-up steps"),
        pub weight_decay: f64 = required().min(0).doc("AdamW weight decay"),
    }
}

/// A trainer's schedule defaults: seed 0 and these.
fn schedule_defaults(steps: usize, batch: usize, lr: f64, warmup: usize, weight_decay: f64) -> ScheduleParams {
    ScheduleParams { seed: 0, steps, batch, lr, warmup, weight_decay }
}

impl ScheduleParams {
    fn schedule(&self, checkpoint_every: usize) -> Schedule {
        Schedule { steps: self.steps, batch: self.batch, lr: self.lr, warmup: self.warmup, weight_decay: self.weight_decay, seed: self.seed, checkpoint_every }
    }
}

/// Errors of training as stage errors (a cancelled run stays a cancellation).
fn stage_error(e: TrainError) -> StageError {
    match e {
        TrainError::Cancelled => StageError::Cancelled,
        other => StageError::Failed(other.to_string()),
    }
}

/// The stage's device. On the CPU these models run one intra-op thread: their operations are
/// too small to split, and on a loaded 2-core machine a second thread costs up to 5x in
/// synchronisation (measured); run independent stages side by side instead (`-j 2`).
fn device_of(ctx: &StageContext) -> Device {
    tch::set_num_threads(1);
    ctx.log(format!("device {}, 1 intra-op thread (of {} offered)", ctx.device, ctx.threads));
    tch_device(&ctx.device)
}

/// Writes `gates.json` and prints every gate.
fn publish(ctx: &StageContext, report: &GateReport) -> Result<(), StageError> {
    for gate in &report.gates {
        let line = gate.line();
        ctx.log(&line);
        ctx.progress.println(&line);
    }
    report.write(ctx.out_dir()).map_err(stage_error)
}

/// A folder of an input's outputs (its files are checked against the input's manifest).
fn input_dir(object: &InputObject, dir: &str, marker: &str) -> Result<PathBuf, StageError> {
    object.file(&format!("{dir}/{marker}"))?;
    Ok(object.dir.join(dir))
}

/// What every training stage reads of `tiny_prompts`.
struct PromptsInput {
    tokenizer_dir: PathBuf,
    tokenizer: ClipTokenizer,
    test: Vec<String>,
    excluded: Excluded,
}

fn prompts_input(ctx: &StageContext) -> Result<PromptsInput, StageError> {
    let object = ctx.input("prompts")?;
    let tokenizer_dir = input_dir(object, TOKENIZER_DIR, "vocab.json")?;
    let tokenizer = ClipTokenizer::from_hf_folder(&tokenizer_dir).map_err(StageError::failed)?;
    let test = read_prompts(&object.file(TEST_PROMPTS)?)?;
    let excluded = Excluded::new(&test);
    Ok(PromptsInput { tokenizer_dir, tokenizer, test, excluded })
}

fn clip_files(dir: PathBuf, tokenizer: &Path) -> ClipFiles {
    ClipFiles { layout: ClipLayout::Transformers, weights: dir, config: None, tokenizer: tokenizer.to_path_buf() }
}

fn frozen_clip(files: &ClipFiles, device: Device) -> Result<FrozenClip, StageError> {
    FrozenClip::load(files, device, Kind::Float).map_err(StageError::failed)
}

/// A tiny-world pretraining kind: its name, doc, parameters and inputs, and how it runs.
pub trait TinyKind: Send + Sync {
    const KIND: &'static str;
    const DOC: &'static str;
    /// Algorithm version: bump it when a change of the kind's code changes its outputs.
    const VERSION: u32 = 1;
    type Params: StageParams;

    fn inputs() -> Vec<InputSpec>;

    fn run(&self, ctx: &mut StageContext, params: Self::Params) -> Result<(), StageError>;
}

/// A [`TinyKind`] as a stage kind.
pub struct Tiny<K>(pub K);

impl<K: TinyKind> StageKind for Tiny<K> {
    fn schema(&self) -> KindSchema {
        KindSchema { kind: K::KIND, version: K::VERSION, doc: K::DOC, uses_input_labels: false, reads_declared_rewards: false, params: K::Params::specs(), inputs: K::inputs() }
    }

    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let params = ctx.typed_params()?;
        self.0.run(ctx, params)
    }
}
