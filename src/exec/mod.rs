//! The runner: content-hashed cache, journal, planning and execution. Runs any stage kind
//! through one trait ([`kind::StageKind`]); knows nothing of tensors.
pub mod cache;
pub mod filehash;
pub mod journal;
pub mod key;
pub mod kind;
pub mod plan;
pub mod progress;
pub mod run;
pub mod slurm;

use std::io::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

pub use cache::{Cache, CacheError};
pub use kind::{InputObject, Registry, StageContext, StageError, StageKind};
pub use plan::{Plan, PlannedStage, Status};
pub use run::{run, Executor, RunOptions, RunSummary};

/// Writes `bytes` to `path` so that readers see the old file or the new one, never a part:
/// a temporary file beside it, flushed to disk, then renamed over it.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(".{name}.tmp.{}.{}", std::process::id(), COUNTER.fetch_add(1, Ordering::SeqCst)));
    let written = std::fs::File::create(&tmp).and_then(|mut file| {
        file.write_all(bytes)?;
        file.sync_all()
    });
    // A part written before a failure (a full disk) must not stay behind.
    written.and_then(|()| std::fs::rename(&tmp, path)).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Copies the files of a cache object (all but its manifest and log) into `dest`, replacing
/// `dest` as a whole: the copy is made beside it and renamed into place, so `dest` is always
/// either the old folder or the complete new one. Returns the number of files copied.
pub fn publish(object: &Path, dest: &Path) -> std::io::Result<usize> {
    let parent = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(parent)?;
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    let staging = parent.join(format!(".{name}.new.{}", std::process::id()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    let mut files = Vec::new();
    filehash::list_files(object, object, &mut files)?;
    let mut copied = 0;
    for rel in files {
        if rel == cache::MANIFEST || rel == kind::LOG_FILE {
            continue;
        }
        let target = staging.join(&rel);
        if let Some(dir) = target.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::copy(object.join(&rel), &target)?;
        copied += 1;
    }
    let old = parent.join(format!(".{name}.old.{}", std::process::id()));
    if dest.exists() {
        std::fs::rename(dest, &old)?;
    }
    std::fs::rename(&staging, dest)?;
    if old.exists() {
        std::fs::remove_dir_all(&old)?;
    }
    Ok(copied)
}
