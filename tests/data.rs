//! The public data the repository carries (`data/`): every file listed in its manifest with its
//! hash, and the paper-scale pipeline reads its prompts, BPE vocabulary and aesthetic head from
//! there, never from outside the repository.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use ril_pipe::pipeline::{load_for_plan, Override};
use ril_pipe::stages::world::{verify_bundle, BUNDLE_MANIFEST};
use crate::support::repo;

fn files_under(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files_under(root, &path, out);
        } else {
            out.insert(path.strip_prefix(root).unwrap().to_string_lossy().into_owned());
        }
    }
}

#[test]
fn data_files_match_their_manifest_and_every_data_file_is_listed() {
    let data = repo().join("data");
    assert_eq!(verify_bundle(&data).unwrap(), 5, "data/MANIFEST.txt should list the 5 data files");
    let listed: BTreeSet<String> = std::fs::read_to_string(data.join(BUNDLE_MANIFEST))
        .unwrap()
        .lines()
        .map(|l| l.split_once("  ").unwrap().1.to_string())
        .collect();
    let mut present = BTreeSet::new();
    files_under(&data, &data, &mut present);
    let documentation: BTreeSet<String> = present.iter().filter(|f| f.starts_with("LICENSES/") || *f == "README.md" || *f == BUNDLE_MANIFEST).cloned().collect();
    let unlisted: Vec<&String> = present.difference(&listed).filter(|f| !documentation.contains(*f)).collect();
    assert!(unlisted.is_empty(), "files in data/ missing from MANIFEST.txt (and from data/README.md?): {unlisted:?}");
    let readme = std::fs::read_to_string(data.join("README.md")).unwrap();
    for file in &listed {
        assert!(readme.contains(&format!("`{file}`")), "data/README.md does not name `{file}` (its origin and licence)");
    }
}

#[test]
fn a_damaged_data_file_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let data = repo().join("data");
    for line in std::fs::read_to_string(data.join(BUNDLE_MANIFEST)).unwrap().lines() {
        let rel = line.split_once("  ").unwrap().1;
        std::fs::create_dir_all(tmp.path().join(rel).parent().unwrap()).unwrap();
        std::fs::copy(data.join(rel), tmp.path().join(rel)).unwrap();
    }
    std::fs::copy(data.join(BUNDLE_MANIFEST), tmp.path().join(BUNDLE_MANIFEST)).unwrap();
    let prompts = tmp.path().join("hpd_photo/test.txt");
    let mut text = std::fs::read_to_string(&prompts).unwrap();
    text.push_str("one more prompt\n");
    std::fs::write(&prompts, text).unwrap();
    let err = verify_bundle(tmp.path()).unwrap_err();
    assert!(err.contains("hpd_photo/test.txt"), "{err}");
}

#[test]
fn paper_pipeline_reads_the_repository_data_and_only_the_weights_from_outside() {
    let file = repo().join("pipelines/paper/all_orders_sd15.yaml");
    let overrides = [Override::parse("vars.weights=/nonexistent/ril-weights").unwrap()];
    let pipeline = load_for_plan(&file, &ril_pipe::stages::registry().schemas(), &overrides).unwrap();
    let base = pipeline.stages.iter().find(|s| s.id == "base").unwrap();
    let missing: BTreeSet<&str> = base.missing_files.iter().map(|m| m.param.as_str()).collect();
    assert_eq!(missing, BTreeSet::from(["sd15", "clip_l14", "hpsv2", "hpsv2_config", "inception"]));
    // The FID reference comes from MS-COCO images through a `fid_stats` stage.
    let fid = pipeline.stages.iter().find(|s| s.id == "fid/coco").unwrap();
    let missing: BTreeSet<&str> = fid.missing_files.iter().map(|m| m.param.as_str()).collect();
    assert_eq!(missing, BTreeSet::from(["images", "inception"]));
    assert!(pipeline.stages.iter().any(|s| s.kind == "report" && s.params["paper_numbers"] == serde_json::json!(true)), "the study ends in its report, with the paper's numbers");
    let data = repo().join("data").canonicalize().unwrap();
    for param in ["aesthetic_head", "bpe", "train_prompts", "test_prompts"] {
        let path = PathBuf::from(base.params[param].as_str().unwrap());
        let path = path.canonicalize().unwrap_or_else(|e| panic!("{param}: {} ({e})", path.display()));
        assert!(path.starts_with(&data), "{param}: {} is not in the repository's data/", path.display());
    }
    let prompts = ril_pipe::stages::world::read_prompts(&PathBuf::from(base.params["train_prompts"].as_str().unwrap())).unwrap();
    let test = ril_pipe::stages::world::read_prompts(&PathBuf::from(base.params["test_prompts"].as_str().unwrap())).unwrap();
    assert_eq!((prompts.len(), test.len()), (750, 50));
}
