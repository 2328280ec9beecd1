//! `ril-pipe sample`: images from the model of a finished stage (a world, a fine-tune, a soup,
//! joint tuning) for any prompts. Not a stage kind: it reads a cache object and writes a folder.
//!
//! It samples as `evaluate` does ([`Diffusion::generate`], with the evaluation's
//! [`SamplingSettings`]): image `i = j * n + k` (prompt `j`, sample `k` of `n`) starts from the
//! noise of image `i` of an evaluation with the same seed, and batches are cut at the same
//! indices. So the test prompts, in order, with `n` = the evaluation's `images_per_prompt`,
//! give the evaluation's very images, bitwise on the CPU.
use std::path::{Path, PathBuf};

use serde::Serialize;
use tch::Device;

use crate::exec::progress::StageProgress;
use crate::exec::StageError;
use crate::method::sampling::Sampler;
use crate::metrics::filesize::{png_bytes, to_uint8_images, RgbImage};
use crate::report::montage::{compose, Rgb};

use super::evaluate::{grid_row, SamplingSettings};
use super::world::ModelRecord;

/// The grid's rows (prompts) and columns (samples) at most; the PNGs hold every image.
pub const GRID_ROWS: usize = 64;
pub const GRID_COLUMNS: usize = 16;
pub const GRID_FILE: &str = "grid.png";
pub const MANIFEST_FILE: &str = "samples.json";

/// What to sample.
pub struct SampleRequest<'a> {
    /// The stage whose model is sampled (for the grid's title and the manifest).
    pub stage: &'a str,
    pub prompts: &'a [String],
    /// Images per prompt.
    pub per_prompt: usize,
    pub settings: SamplingSettings,
    pub device: Device,
}

/// One image written.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SampledImage {
    /// File name in the output folder.
    pub file: String,
    /// Index of the prompt in the request, and of the sample for that prompt.
    pub prompt_index: usize,
    pub sample: usize,
    /// `prompt_index * per_prompt + sample`: the evaluation image with the same initial noise.
    pub index: usize,
    pub prompt: String,
}

/// What a request wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleSummary {
    pub images: Vec<SampledImage>,
    pub grid: PathBuf,
    /// Set when the grid shows only part of the images.
    pub grid_note: Option<String>,
}

/// The file of image `k` of prompt `j`.
pub fn image_file(prompt_index: usize, sample: usize) -> String {
    format!("p{prompt_index:03}_s{sample:03}.png")
}

/// Samples the model of the finished stage in `model_dir` and writes one PNG per image, a grid
/// with the prompts as captions ([`GRID_FILE`]) and a manifest of settings and files
/// ([`MANIFEST_FILE`]) into `out` (created if needed). Every file is written atomically.
pub fn sample_model(model_dir: &Path, request: &SampleRequest, out: &Path, progress: &StageProgress) -> Result<SampleSummary, StageError> {
    if request.prompts.is_empty() {
        return Err(StageError::Failed("no prompts to sample".into()));
    }
    let (record, adapters) = ModelRecord::of_object(model_dir, request.stage)?;
    let settings = &request.settings;
    let diffusion = record.load_diffusion(adapters.as_deref(), request.device, settings.precision)?;
    let sampler = Sampler::new(diffusion.ddim.clone(), settings.sampler).map_err(StageError::failed)?;
    let uncond = diffusion.uncond()?;
    std::fs::create_dir_all(out).map_err(|e| StageError::io(format!("cannot create {}", out.display()), e))?;

    let n = request.per_prompt.max(1);
    let total = request.prompts.len() * n;
    progress.set_length(total as u64);
    let mut images = Vec::with_capacity(total);
    let mut grid: Vec<Vec<RgbImage>> = vec![Vec::new(); request.prompts.len().min(GRID_ROWS)];
    let mut start = 0;
    while start < total {
        // Batches end where the evaluation's end (multiples of its batch size).
        let end = ((start / settings.batch_size + 1) * settings.batch_size).min(total);
        let prompts: Vec<String> = (start..end).map(|i| request.prompts[i / n].clone()).collect();
        let decoded = sampler.generate(&diffusion, &prompts, &uncond, settings.seed, start as u64)?;
        for (offset, image) in to_uint8_images(&decoded).map_err(StageError::failed)?.into_iter().enumerate() {
            let index = start + offset;
            let (j, k) = (index / n, index % n);
            let file = image_file(j, k);
            write(&out.join(&file), &png_bytes(&image).map_err(StageError::failed)?)?;
            if j < GRID_ROWS && k < GRID_COLUMNS {
                grid[j].push(image);
            }
            images.push(SampledImage { file, prompt_index: j, sample: k, index, prompt: request.prompts[j].clone() });
        }
        progress.inc((end - start) as u64);
        start = end;
    }
    progress.finish();

    let rows = grid
        .iter()
        .zip(request.prompts)
        .map(|(row, prompt)| {
            let row = grid_row(row, 2).map_err(StageError::failed)?;
            Ok((prompt.clone(), Rgb { width: row.width(), height: row.height(), pixels: row.data().to_vec() }))
        })
        .collect::<Result<Vec<_>, StageError>>()?;
    let s = &settings.sampler;
    let title = format!("{}: seed {}, {} DDIM steps, guidance {}", request.stage, settings.seed, s.steps, s.guidance);
    let grid_path = out.join(GRID_FILE);
    compose(&title, &rows, &grid_path).map_err(StageError::failed)?;
    let grid_note = (request.prompts.len() > GRID_ROWS || n > GRID_COLUMNS)
        .then(|| format!("the grid shows the first {} prompts and {} images of each; the PNGs hold all", GRID_ROWS.min(request.prompts.len()), GRID_COLUMNS.min(n)));

    let manifest = serde_json::json!({
        "stage": request.stage,
        "origin": record.origin,
        "tasks": record.tasks,
        "seed": settings.seed,
        "ddim_steps": s.steps,
        "eta": s.eta,
        "guidance": s.guidance,
        "batch_size": settings.batch_size,
        "precision": settings.precision.name(),
        "images_per_prompt": n,
        "images": images,
    });
    let mut bytes = serde_json::to_vec_pretty(&manifest).map_err(StageError::failed)?;
    bytes.push(b'\n');
    write(&out.join(MANIFEST_FILE), &bytes)?;
    Ok(SampleSummary { images, grid: grid_path, grid_note })
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), StageError> {
    crate::exec::atomic_write(path, bytes).map_err(|e| StageError::io(format!("cannot write {}", path.display()), e))
}
