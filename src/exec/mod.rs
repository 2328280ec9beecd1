//! The runner: content-hashed cache, journal, planning and execution. Runs any stage kind
//! through one trait ([`kind::StageKind`]); knows nothing of tensors.
pub mod cache;
pub mod filehash;
pub mod journal;
pub mod key;
pub mod kind;
pub mod launch;
pub mod lock;
pub mod plan;
pub mod progress;
pub mod publish;
pub mod run;

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
