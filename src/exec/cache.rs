//! The content-addressed cache of stage outputs.
//!
//! ```text
//! <root>/objects/<k0k1>/<key>/   finished outputs + MANIFEST.json (per-file sizes and blake3)
//! <root>/tmp/<key>.<pid>.<n>/    a stage being computed; renamed into objects/ when it succeeds
//! <root>/partial/<key>/          resumable checkpoints of an interrupted stage
//! <root>/locks/<key>             held while a process computes that object
//! <root>/lock                    shared by runs, exclusive for gc
//! <root>/runs/<pipeline>.json    the journal: what each stage id last produced
//! <root>/logs/                   logs of failed stages
//! ```
//!
//! An object counts as done only when its manifest exists, and the manifest is written last,
//! inside the temporary folder, before the one atomic rename. A crash at any point leaves either
//! no object or a complete one; temporary folders of dead processes are removed later.
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::filehash::{hash_file, FileHasher};
use super::key::{short_key, Ingredients};
use super::atomic_write;

pub const MANIFEST: &str = "MANIFEST.json";
const MANIFEST_FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache {root}: {context}: {source}")]
    Io {
        root: PathBuf,
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{0}` is not a cache key (64 hex digits)")]
    BadKey(String),
    #[error("stage output {path}: {reason}")]
    BadOutput { path: PathBuf, reason: String },
    #[error("the cache {root} is in use by {holder}; {advice}")]
    Busy { root: PathBuf, holder: String, advice: String },
    #[error("the cached object {key} of stage `{stage}` is damaged ({reason}); nothing was read from it: `ril-pipe verify --repair` removes it and `ril-pipe run` on the pipeline computes it again")]
    Damaged { stage: String, key: String, reason: String },
}

/// One output file as recorded in a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub size: u64,
    pub blake3: String,
}

/// The record of a finished object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub key: String,
    pub kind: String,
    /// The stage that computed it (other stages with the same key share it).
    pub stage_id: String,
    pub ingredients: Ingredients,
    /// Relative path -> entry, for every file of the object but the manifest.
    pub files: BTreeMap<String, FileEntry>,
    pub created_unix: u64,
    /// Wall-clock seconds the stage took.
    pub seconds: f64,
    pub tool_version: String,
}

/// What the cache holds for a key.
#[derive(Debug, Clone, PartialEq)]
pub enum ObjectState {
    Missing,
    Done(Box<Manifest>),
    /// A manifest exists but the object does not match it (reason given).
    Corrupt(String),
}

pub struct Cache {
    root: PathBuf,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

pub(super) fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn unique_suffix() -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("{}.{}{:09}", std::process::id(), TMP_COUNTER.fetch_add(1, Ordering::SeqCst), nanos)
}

/// Keys are hex digests; checking them keeps every cache path inside the cache.
pub fn check_key(key: &str) -> Result<(), CacheError> {
    if key.len() == 64 && key.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
        Ok(())
    } else {
        Err(CacheError::BadKey(key.to_string()))
    }
}

impl Cache {
    /// A cache rooted at `root`; nothing is created until something is written.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Cache { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub(super) fn io(&self, context: impl Into<String>) -> impl FnOnce(std::io::Error) -> CacheError + '_ {
        let context = context.into();
        move |source| CacheError::Io {
            root: self.root.clone(),
            context,
            source,
        }
    }

    pub(super) fn ensure(&self, dir: &Path) -> Result<(), CacheError> {
        std::fs::create_dir_all(dir).map_err(self.io(format!("cannot create {}", dir.display())))
    }

    pub fn object_dir(&self, key: &str) -> Result<PathBuf, CacheError> {
        check_key(key)?;
        Ok(self.root.join("objects").join(&key[..2]).join(key))
    }

    pub fn partial_dir(&self, key: &str) -> Result<PathBuf, CacheError> {
        check_key(key)?;
        Ok(self.root.join("partial").join(key))
    }

    pub fn journal_dir(&self) -> PathBuf {
        self.root.join("runs")
    }

    pub fn logs_dir(&self) -> PathBuf {
        self.root.join("logs")
    }

    pub fn file_hasher(&self) -> FileHasher {
        FileHasher::with_store(self.root.join("filehashes.json"))
    }

    /// The state of an object, checking that every file exists with its recorded size (hashes
    /// are checked by [`Cache::verify`]).
    pub fn lookup(&self, key: &str) -> Result<ObjectState, CacheError> {
        let dir = self.object_dir(key)?;
        let manifest_path = dir.join(MANIFEST);
        let bytes = match std::fs::read(&manifest_path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(if dir.exists() {
                    ObjectState::Corrupt("the object folder has no manifest".into())
                } else {
                    ObjectState::Missing
                })
            }
            Err(e) => return Ok(ObjectState::Corrupt(format!("cannot read its manifest: {e}"))),
        };
        let manifest: Manifest = match serde_json::from_slice(&bytes) {
            Ok(m) => m,
            Err(e) => return Ok(ObjectState::Corrupt(format!("its manifest is not valid: {e}"))),
        };
        if manifest.key != key {
            return Ok(ObjectState::Corrupt(format!("its manifest is for key {}", short_key(&manifest.key))));
        }
        for (name, entry) in &manifest.files {
            match std::fs::symlink_metadata(dir.join(name)) {
                Ok(m) if m.is_file() && m.len() == entry.size => {}
                Ok(m) if m.is_file() => {
                    return Ok(ObjectState::Corrupt(format!("file {name} has {} bytes, the manifest says {}", m.len(), entry.size)))
                }
                Ok(_) => return Ok(ObjectState::Corrupt(format!("{name} is not a regular file"))),
                Err(_) => return Ok(ObjectState::Corrupt(format!("file {name} is missing"))),
            }
        }
        Ok(ObjectState::Done(Box::new(manifest)))
    }

    /// Checks every file's hash against the manifest; `Err` describes the first mismatch.
    pub fn verify(&self, key: &str) -> Result<Result<Manifest, String>, CacheError> {
        let manifest = match self.lookup(key)? {
            ObjectState::Done(m) => *m,
            ObjectState::Corrupt(reason) => return Ok(Err(reason)),
            ObjectState::Missing => return Ok(Err("not in the cache".into())),
        };
        let dir = self.object_dir(key)?;
        for (name, entry) in &manifest.files {
            match hash_file(&dir.join(name)) {
                Ok(h) if h == entry.blake3 => {}
                Ok(_) => return Ok(Err(format!("file {name}: content does not match its hash"))),
                Err(e) => return Ok(Err(format!("file {name}: {e}"))),
            }
        }
        Ok(Ok(manifest))
    }

    /// The folder of the finished object `key` (of stage `stage`, for messages) once every file
    /// of it matches its manifest's hash: what a reader outside the runner (check, report,
    /// export, sample, lora export) reads, so that a changed byte is never taken for a result.
    pub fn verified_object(&self, key: &str, stage: &str) -> Result<PathBuf, CacheError> {
        match self.verify(key)? {
            Ok(_) => self.object_dir(key),
            Err(reason) => Err(CacheError::Damaged { stage: stage.to_string(), key: super::key::short_key(key).to_string(), reason }),
        }
    }

    /// A fresh temporary folder for computing `key`.
    pub fn begin(&self, key: &str) -> Result<PathBuf, CacheError> {
        check_key(key)?;
        let tmp = self.root.join("tmp");
        self.ensure(&tmp)?;
        let dir = tmp.join(format!("{key}.{}", unique_suffix()));
        std::fs::create_dir(&dir).map_err(self.io(format!("cannot create {}", dir.display())))?;
        Ok(dir)
    }

    /// Hashes the outputs in `tmp`, writes the manifest and moves the folder into place.
    /// Refuses symlinks and anything but regular files and folders (outputs stay inside).
    pub fn commit(&self, tmp: &Path, key: &str, stage_id: &str, ingredients: &Ingredients, seconds: f64) -> Result<Manifest, CacheError> {
        let mut files = BTreeMap::new();
        collect_outputs(tmp, tmp, &mut files)?;
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            key: key.to_string(),
            kind: ingredients.kind.clone(),
            stage_id: stage_id.to_string(),
            ingredients: ingredients.clone(),
            files,
            created_unix: now_unix(),
            seconds,
            tool_version: env!("CARGO_PKG_VERSION").to_string(),
        };
        let bytes = serde_json::to_vec_pretty(&manifest).map_err(|e| CacheError::BadOutput {
            path: tmp.to_path_buf(),
            reason: e.to_string(),
        })?;
        atomic_write(&tmp.join(MANIFEST), &bytes).map_err(self.io("cannot write the manifest"))?;
        sync_dir(tmp);
        let dest = self.object_dir(key)?;
        if let Some(parent) = dest.parent() {
            self.ensure(parent)?;
        }
        if dest.exists() {
            // Another process finished the same object first (or a corrupt one is in the way).
            match self.lookup(key)? {
                ObjectState::Done(existing) => {
                    self.discard(tmp);
                    return Ok(*existing);
                }
                _ => self.remove_object(key)?,
            }
        }
        std::fs::rename(tmp, &dest).map_err(self.io(format!("cannot move {} into place", tmp.display())))?;
        if let Some(parent) = dest.parent() {
            sync_dir(parent);
        }
        Ok(manifest)
    }

    /// Removes a temporary folder (best effort: a leftover is cleaned up later).
    pub fn discard(&self, tmp: &Path) {
        let _ = std::fs::remove_dir_all(tmp);
    }

    /// Removes an object: first renamed out of `objects/` (atomic), then deleted, so that a
    /// crash in between never leaves a half-deleted object that looks finished.
    pub fn remove_object(&self, key: &str) -> Result<(), CacheError> {
        let dir = self.object_dir(key)?;
        if !dir.exists() {
            return Ok(());
        }
        let trash = self.root.join("tmp");
        self.ensure(&trash)?;
        let doomed = trash.join(format!("trash.{key}.{}", unique_suffix()));
        std::fs::rename(&dir, &doomed).map_err(self.io(format!("cannot remove {}", dir.display())))?;
        std::fs::remove_dir_all(&doomed).map_err(self.io(format!("cannot delete {}", doomed.display())))?;
        Ok(())
    }

    /// Every key with a folder under `objects/`.
    pub fn list_objects(&self) -> Result<Vec<String>, CacheError> {
        let mut keys = Vec::new();
        let objects = self.root.join("objects");
        let Ok(shards) = std::fs::read_dir(&objects) else {
            return Ok(keys);
        };
        for shard in shards {
            let shard = shard.map_err(self.io("cannot list objects"))?;
            let Ok(entries) = std::fs::read_dir(shard.path()) else { continue };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if check_key(&name).is_ok() {
                    keys.push(name);
                }
            }
        }
        keys.sort();
        Ok(keys)
    }

    /// Total bytes of the files of an object (from its manifest).
    pub fn object_size(manifest: &Manifest) -> u64 {
        manifest.files.values().map(|f| f.size).sum()
    }

    /// Removes temporary folders whose computing process is gone (a run that was killed).
    /// Returns how many were removed.
    pub fn clean_stale_tmp(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(self.root.join("tmp")) else {
            return 0;
        };
        let mut removed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let stale = if name.starts_with("trash.") {
                true
            } else {
                let key = name.split('.').next().unwrap_or("");
                check_key(key).is_ok() && !self.object_locked(key)
            };
            if stale && std::fs::remove_dir_all(entry.path()).is_ok() {
                removed += 1;
            }
        }
        removed
    }

    /// Partial (resumable) folders in the cache, by key.
    pub fn list_partial(&self) -> Vec<String> {
        let mut keys: Vec<String> = std::fs::read_dir(self.root.join("partial"))
            .map(|entries| entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|k| check_key(k).is_ok()).collect())
            .unwrap_or_default();
        keys.sort();
        keys
    }

    /// Removes a partial folder unless its stage is being computed now.
    pub fn remove_partial(&self, key: &str) -> Result<bool, CacheError> {
        let dir = self.partial_dir(key)?;
        if !dir.exists() || self.object_locked(key) {
            return Ok(false);
        }
        std::fs::remove_dir_all(&dir).map_err(self.io(format!("cannot delete {}", dir.display())))?;
        Ok(true)
    }
}

/// Lists output files, refusing what could point outside the object.
fn collect_outputs(root: &Path, dir: &Path, out: &mut BTreeMap<String, FileEntry>) -> Result<(), CacheError> {
    let bad = |path: &Path, reason: String| CacheError::BadOutput {
        path: path.to_path_buf(),
        reason,
    };
    let entries = std::fs::read_dir(dir).map_err(|e| bad(dir, e.to_string()))?;
    for entry in entries {
        let entry = entry.map_err(|e| bad(dir, e.to_string()))?;
        let path = entry.path();
        let ty = entry.file_type().map_err(|e| bad(&path, e.to_string()))?;
        if ty.is_symlink() {
            return Err(bad(&path, "stage outputs may not be symbolic links".into()));
        }
        if ty.is_dir() {
            collect_outputs(root, &path, out)?;
            continue;
        }
        if !ty.is_file() {
            return Err(bad(&path, "stage outputs must be regular files".into()));
        }
        let rel = path
            .strip_prefix(root)
            .map_err(|e| bad(&path, e.to_string()))?
            .components()
            .map(|c| c.as_os_str().to_string_lossy())
            .collect::<Vec<_>>()
            .join("/");
        if rel == MANIFEST {
            continue;
        }
        let file = File::open(&path).map_err(|e| bad(&path, e.to_string()))?;
        // Outputs must be on disk before the rename publishes them.
        file.sync_all().map_err(|e| bad(&path, format!("cannot flush to disk: {e}")))?;
        let size = file.metadata().map_err(|e| bad(&path, e.to_string()))?.len();
        let blake3 = hash_file(&path).map_err(|e| bad(&path, e.to_string()))?;
        out.insert(rel, FileEntry { size, blake3 });
    }
    Ok(())
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// How long to sleep between polls elsewhere in the runner.
pub const POLL: Duration = Duration::from_millis(200);

#[cfg(test)]
mod tests {
    use super::*;

    fn ingredients() -> Ingredients {
        Ingredients {
            kind: "t".into(),
            version: 1,
            params: BTreeMap::new(),
            inputs: BTreeMap::new(),
            input_labels: None,
            files: BTreeMap::new(),
            rewards: BTreeMap::new(),
        }
    }

    #[test]
    fn commit_publishes_a_complete_object() {
        let root = tempfile::tempdir().unwrap();
        let cache = Cache::new(root.path());
        let key = ingredients().key();
        assert_eq!(cache.lookup(&key).unwrap(), ObjectState::Missing);
        let tmp = cache.begin(&key).unwrap();
        std::fs::create_dir(tmp.join("sub")).unwrap();
        std::fs::write(tmp.join("sub/a.txt"), b"hello").unwrap();
        let m = cache.commit(&tmp, &key, "s", &ingredients(), 0.1).unwrap();
        assert!(!tmp.exists());
        assert_eq!(m.files["sub/a.txt"].size, 5);
        assert!(matches!(cache.lookup(&key).unwrap(), ObjectState::Done(_)));
        assert!(cache.verify(&key).unwrap().is_ok());
        assert_eq!(cache.list_objects().unwrap(), vec![key.clone()]);
    }

    #[test]
    fn damage_is_detected() {
        let root = tempfile::tempdir().unwrap();
        let cache = Cache::new(root.path());
        let key = ingredients().key();
        let tmp = cache.begin(&key).unwrap();
        std::fs::write(tmp.join("a.bin"), b"0123456789").unwrap();
        cache.commit(&tmp, &key, "s", &ingredients(), 0.0).unwrap();
        let file = cache.object_dir(&key).unwrap().join("a.bin");
        // A flipped byte keeps the size: only verify sees it.
        std::fs::write(&file, b"0123456780").unwrap();
        assert!(matches!(cache.lookup(&key).unwrap(), ObjectState::Done(_)));
        assert!(cache.verify(&key).unwrap().unwrap_err().contains("does not match"));
        std::fs::write(&file, b"01234").unwrap();
        assert!(matches!(cache.lookup(&key).unwrap(), ObjectState::Corrupt(r) if r.contains("5 bytes")));
        std::fs::remove_file(&file).unwrap();
        assert!(matches!(cache.lookup(&key).unwrap(), ObjectState::Corrupt(r) if r.contains("missing")));
        cache.remove_object(&key).unwrap();
        assert_eq!(cache.lookup(&key).unwrap(), ObjectState::Missing);
    }

    #[test]
    fn symlinks_in_outputs_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let cache = Cache::new(root.path());
        let key = ingredients().key();
        let tmp = cache.begin(&key).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", tmp.join("x")).unwrap();
        assert!(matches!(cache.commit(&tmp, &key, "s", &ingredients(), 0.0), Err(CacheError::BadOutput { .. })));
    }

    #[test]
    fn keys_must_be_hex_digests() {
        let cache = Cache::new("/nonexistent");
        assert!(cache.object_dir("../../etc").is_err());
        assert!(cache.object_dir(&"A".repeat(64)).is_err());
    }

    #[test]
    fn stale_temporary_folders_are_cleaned() {
        let root = tempfile::tempdir().unwrap();
        let cache = Cache::new(root.path());
        let key = ingredients().key();
        let tmp = cache.begin(&key).unwrap();
        let _lock = cache.lock_object(&key, &mut || {}).unwrap();
        // flock locks belong to the open file: a second open in this process conflicts too,
        // so a held lock protects the folder.
        assert_eq!(cache.clean_stale_tmp(), 0);
        drop(_lock);
        assert_eq!(cache.clean_stale_tmp(), 1);
        assert!(!tmp.exists());
    }
}
