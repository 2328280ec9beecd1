//! The `fid_stats` stage against pytorch-fid's `compute_statistics_of_path` on the same folders
//! with the same (random, FID-layout) Inception weights.
use std::collections::HashMap;
use std::path::Path;

use ril_pipe::exec::filehash::FileHasher;
use ril_pipe::exec::plan::plan;
use ril_pipe::exec::launch::Outcome;
use ril_pipe::exec::{run, Cache, RunOptions};
use ril_pipe::metrics::fid::FeatureStats;
use ril_pipe::pipeline::load_resolved;
use ril_pipe::stages::fid_stats::FID_STATS_FILE;
use ril_pipe::stages::registry;
use tch::{Kind, Tensor};

use crate::support::fixtures;

fn relative(ours: &Tensor, theirs: &Tensor) -> f64 {
    (ours - theirs).abs().max().double_value(&[]) / theirs.abs().max().double_value(&[])
}

/// Runs one `fid_stats` stage per folder and returns each stage's statistics.
fn stage_statistics(dir: &Path, folders: &[&str]) -> HashMap<String, FeatureStats> {
    let stages: String = folders
        .iter()
        .map(|f| format!("  - id: {f}\n    kind: fid_stats\n    params: {{images: {}, inception: {}, batch_size: 5}}\n", dir.join(f).display(), dir.join("pt_inception_random.pth").display()))
        .collect();
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("p.yaml");
    std::fs::write(&file, format!("stages:\n{stages}")).unwrap();
    let p = load_resolved(&file, &registry().schemas(), &[]).unwrap();
    let cache = Cache::new(work.path().join("cache"));
    let summary = run(&p, &registry(), &cache, &RunOptions::default()).unwrap();
    for o in &summary.outcomes {
        assert!(!matches!(o.outcome, Outcome::Failed { .. }), "stage {} failed: {:?}", o.id, o.outcome);
    }
    let pl = plan(&p, &registry(), &cache, &FileHasher::ephemeral()).unwrap();
    pl.stages
        .iter()
        .map(|s| (s.stage.id.clone(), FeatureStats::read(&cache.object_dir(&s.key).unwrap().join(FID_STATS_FILE)).unwrap()))
        .collect()
}

#[test]
fn fid_statistics_of_a_folder_match_pytorch_fid() {
    let dir = fixtures("fid_stats");
    let r: HashMap<String, Tensor> = Tensor::read_safetensors(dir.join("reference.safetensors")).unwrap().into_iter().collect();
    let ours = stage_statistics(&dir, &["png", "jpg"]);
    for folder in ["png", "jpg"] {
        let stats = &ours[folder];
        assert_eq!(stats.mean().kind(), Kind::Double);
        assert_eq!(stats.covariance().size(), [2048, 2048]);
        let (mu, sigma) = (relative(stats.mean(), &r[&format!("mu_{folder}")]), relative(stats.covariance(), &r[&format!("sigma_{folder}")]));
        eprintln!("fid_stats {folder}: mu {mu:.2e}, sigma {sigma:.2e} (relative to the largest element)");
        // PNG decodes identically everywhere; JPEG decoders differ (below), and twelve images
        // give a covariance of rank 11 that follows every pixel.
        let bound = if folder == "png" { 1e-6 } else { 0.05 };
        assert!(mu < bound && sigma < bound, "{folder}: mu {mu:e}, sigma {sigma:e} beyond {bound:e}");
    }
    // How far our JPEG decoder (jpeg-decoder) lands from Pillow's (libjpeg-turbo), in levels of 255.
    let files = ril_pipe::metrics::image_folder::list_images(&dir.join("jpg")).unwrap();
    let ours = Tensor::stack(&files.iter().map(|f| ril_pipe::metrics::image_folder::read_rgb(f).unwrap()).collect::<Vec<_>>(), 0);
    let pillow = r["pillow_jpg"].permute([0, 3, 1, 2]).to_kind(Kind::Float) / 255.0;
    let levels = (ours - pillow).abs() * 255.0;
    let (max, mean) = (levels.max().double_value(&[]), levels.mean(Kind::Double).double_value(&[]));
    eprintln!("JPEG decode against Pillow: max {max:.0} levels, mean {mean:.3} levels");
    assert!(max <= 4.0 && mean < 0.25, "JPEG decode differs from Pillow's by {max} levels (mean {mean})");
    // pytorch-fid's `--save-stats` file reads as the same statistics.
    let npz = FeatureStats::read(&dir.join("stats_png.npz")).unwrap();
    assert!(npz.mean().equal(&r["mu_png"]) && npz.covariance().equal(&r["sigma_png"]));
}
