//! Content hashes of the external files and folders stages read (weights, prompt files), with a
//! stat cache so that multi-gigabyte checkpoints are hashed once, not at every `plan`.
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::atomic_write;

/// What a cached hash was computed for: a file changes its size or mtime when rewritten.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Stamp {
    size: u64,
    mtime_ns: i128,
    hash: String,
}

/// File hashes remembered across runs, stored in the cache folder.
pub struct FileHasher {
    store: Option<PathBuf>,
    known: Mutex<BTreeMap<String, Stamp>>,
    dirty: Mutex<bool>,
}

impl FileHasher {
    /// A hasher that remembers hashes in `store` (read now, written by [`FileHasher::save`]).
    pub fn with_store(store: PathBuf) -> Self {
        let known = std::fs::read(&store)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        FileHasher {
            store: Some(store),
            known: Mutex::new(known),
            dirty: Mutex::new(false),
        }
    }

    /// A hasher without memory (tests, read-only caches).
    pub fn ephemeral() -> Self {
        FileHasher {
            store: None,
            known: Mutex::new(BTreeMap::new()),
            dirty: Mutex::new(false),
        }
    }

    /// blake3 of a file, or of a folder (its relative file names and their hashes, sorted).
    pub fn hash(&self, path: &Path) -> std::io::Result<String> {
        let meta = std::fs::metadata(path)?;
        if meta.is_dir() {
            let mut entries = Vec::new();
            list_files(path, path, &mut entries)?;
            entries.sort();
            let mut hasher = blake3::Hasher::new();
            hasher.update(b"ril-pipe dir v1\0");
            for rel in entries {
                let h = self.hash(&path.join(&rel))?;
                hasher.update(rel.as_bytes());
                hasher.update(b"\0");
                hasher.update(h.as_bytes());
                hasher.update(b"\n");
            }
            return Ok(hasher.finalize().to_hex().to_string());
        }
        let name = path.to_string_lossy().into_owned();
        let mtime_ns = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(-1);
        if let Ok(known) = self.known.lock() {
            if let Some(s) = known.get(&name) {
                if s.size == meta.len() && s.mtime_ns == mtime_ns && mtime_ns >= 0 {
                    return Ok(s.hash.clone());
                }
            }
        }
        let hash = hash_file(path)?;
        if let (Ok(mut known), Ok(mut dirty)) = (self.known.lock(), self.dirty.lock()) {
            known.insert(
                name,
                Stamp {
                    size: meta.len(),
                    mtime_ns,
                    hash: hash.clone(),
                },
            );
            *dirty = true;
        }
        Ok(hash)
    }

    /// Writes remembered hashes back (atomically; losing them only costs time).
    pub fn save(&self) {
        let Some(store) = &self.store else { return };
        let dirty = self.dirty.lock().map(|d| *d).unwrap_or(false);
        if !dirty {
            return;
        }
        if let Ok(known) = self.known.lock() {
            if let Ok(bytes) = serde_json::to_vec(&*known) {
                let _ = atomic_write(store, &bytes);
            }
        }
    }
}

/// blake3 of one file's bytes.
pub fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().to_hex().to_string())
}

/// Relative paths (with `/`) of the regular files under `dir`, following no symlinks out.
pub fn list_files(root: &Path, dir: &Path, out: &mut Vec<String>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let ty = entry.file_type()?;
        let path = entry.path();
        if ty.is_dir() {
            list_files(root, &path, out)?;
        } else if ty.is_file() || (ty.is_symlink() && path.is_file()) {
            if let Ok(rel) = path.strip_prefix(root) {
                out.push(rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_hash_covers_names_and_contents() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("a.txt"), b"one").unwrap();
        std::fs::write(dir.path().join("sub/b.txt"), b"two").unwrap();
        let h = FileHasher::ephemeral();
        let first = h.hash(dir.path()).unwrap();
        assert_eq!(first, FileHasher::ephemeral().hash(dir.path()).unwrap());
        std::fs::write(dir.path().join("sub/b.txt"), b"tw0").unwrap();
        let second = FileHasher::ephemeral().hash(dir.path()).unwrap();
        assert_ne!(first, second);
        std::fs::rename(dir.path().join("a.txt"), dir.path().join("c.txt")).unwrap();
        assert_ne!(second, FileHasher::ephemeral().hash(dir.path()).unwrap());
    }

    #[test]
    fn remembered_hashes_follow_rewrites() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("w.bin");
        std::fs::write(&file, b"weights v1").unwrap();
        let store = dir.path().join("hashes.json");
        let h = FileHasher::with_store(store.clone());
        let v1 = h.hash(&file).unwrap();
        h.save();
        assert!(store.exists());
        std::fs::write(&file, b"weights v2 longer").unwrap();
        let again = FileHasher::with_store(store);
        assert_ne!(again.hash(&file).unwrap(), v1);
    }
}
