//! `fid_stats`: FID reference statistics of a folder of images (the paper's zero-shot MS-COCO
//! FID), as pytorch-fid's `compute_statistics_of_path` computes them: each image read as RGB in
//! [0, 1], bilinear-resized to 299, Inception v3 pool features (`pt_inception-2015-12-05`
//! weights), their mean and unbiased covariance in f64. The images are streamed in batches, so
//! a set of 30,000 is never held in memory at once.
use std::path::PathBuf;

use tch::{nn, Tensor};

use crate::exec::{StageContext, StageError, StageKind};
use crate::metrics::fid::StatsAccumulator;
use crate::metrics::image_folder::{list_images, read_rgb};
use crate::models::inception::InceptionV3;
use crate::pipeline::params::StageParams;
use crate::pipeline::schema::KindSchema;
use crate::stage_params;

/// The file the stage writes: `mu` [2048] and `sigma` [2048, 2048], f64.
pub const FID_STATS_FILE: &str = "fid_stats.safetensors";

pub struct FidStats;

stage_params! {
    /// The parameters of a `fid_stats` stage.
    pub struct FidStatsParams {
        pub images: PathBuf = required().doc("a folder of images (png, jpg, jpeg, webp; recursive, sorted by path); its content hash enters the cache key"),
        pub inception: PathBuf = required().doc("pytorch-fid's Inception weights pt_inception-2015-12-05-6726825d.pth; public original: https://github.com/mseitzer/pytorch-fid/releases"),
        pub batch_size: usize = param(50).min(1).max(4096).doc("images per Inception batch (pytorch-fid's default: 50)"),
    }
}

impl StageKind for FidStats {
    fn schema(&self) -> KindSchema {
        KindSchema {
            kind: "fid_stats",
            version: 1,
            doc: "FID reference statistics (mean and covariance of Inception pool features) of a folder of images, e.g. MS-COCO",
            uses_input_labels: false,
            reads_declared_rewards: false,
            params: FidStatsParams::specs(),
            inputs: Vec::new(),
        }
    }

    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let p: FidStatsParams = ctx.typed_params()?;
        let device = super::device::tch_device(&ctx.device);
        tch::set_num_threads(ctx.threads.max(1) as i32);
        let (folder, batch) = (&p.images, p.batch_size);
        let files = list_images(folder).map_err(StageError::failed)?;
        if files.len() < 2 {
            return Err(StageError::Failed(format!("{}: {} image(s) found; FID statistics need at least 2", folder.display(), files.len())));
        }
        let weights = &p.inception;
        let vs = nn::VarStore::new(device);
        let inception = InceptionV3::load(&vs, weights).map_err(|e| StageError::Failed(format!("Inception weights {}: {e}", weights.display())))?;
        ctx.log(format!("{} images under {} on {device:?}, batches of {batch}", files.len(), folder.display()));
        ctx.progress.set_length(files.len() as u64);
        let side = InceptionV3::INPUT_SIZE;
        let mut stats = StatsAccumulator::default();
        for chunk in files.chunks(batch) {
            ctx.check_cancelled()?;
            // Each image is resized on its own, so images of different sizes batch together
            // (pytorch-fid resizes a batch of equal-sized images: the same arithmetic).
            let images = chunk
                .iter()
                .map(|path| read_rgb(path).map(|x| x.unsqueeze(0).upsample_bilinear2d([side, side], false, None, None)))
                .collect::<Result<Vec<Tensor>, _>>()
                .map_err(StageError::failed)?;
            let features = tch::no_grad(|| inception.features(&Tensor::cat(&images, 0).to_device(device))).map_err(StageError::failed)?;
            stats.push(&features.to_device(tch::Device::Cpu)).map_err(StageError::failed)?;
            ctx.progress.inc(chunk.len() as u64);
        }
        let count = stats.count();
        let stats = stats.finish().map_err(StageError::failed)?;
        stats.write(&ctx.out_dir().join(FID_STATS_FILE)).map_err(StageError::failed)?;
        ctx.log(format!("statistics of {count} images written to {FID_STATS_FILE}"));
        Ok(())
    }
}
