//! The cache's locks (flock on files under the cache root): one per object, held while a
//! process computes it, and the cache-wide lock that runs share and `gc` takes alone, with the
//! holders named for those who wait. Methods of [`Cache`], kept here apart from the objects.
use std::fs::File;
use std::path::{Path, PathBuf};

use super::cache::{check_key, now_unix, Cache, CacheError};

impl Cache {
    fn lock_file(&self, path: &Path) -> Result<File, CacheError> {
        if let Some(parent) = path.parent() {
            self.ensure(parent)?;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .map_err(self.io(format!("cannot open lock {}", path.display())))
    }

    /// Held while this process computes `key`; `on_wait` is called once if another process
    /// holds it (so the user learns why nothing moves).
    pub fn lock_object(&self, key: &str, on_wait: &mut dyn FnMut()) -> Result<ObjectLock, CacheError> {
        check_key(key)?;
        let file = self.lock_file(&self.root().join("locks").join(key))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                on_wait();
                file.lock().map_err(self.io("cannot lock an object"))?;
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(self.io("cannot lock an object")(e)),
        }
        Ok(ObjectLock { _file: file })
    }

    /// Whether some process holds the lock of `key` right now.
    pub(super) fn object_locked(&self, key: &str) -> bool {
        let path = self.root().join("locks").join(key);
        let Ok(file) = std::fs::OpenOptions::new().read(true).write(true).open(path) else {
            return false;
        };
        matches!(file.try_lock(), Err(std::fs::TryLockError::WouldBlock))
    }

    /// The lock every run holds (shared): `gc` needs it exclusively. When `wait` is false and
    /// gc holds it, fails with a message naming the holder.
    pub fn run_lock(&self, wait: bool, on_wait: &mut dyn FnMut(&str)) -> Result<CacheLock, CacheError> {
        self.cache_lock(LockMode::Shared, wait, on_wait)
    }

    /// The exclusive lock of `gc`: no run may be active.
    pub fn gc_lock(&self, wait: bool, on_wait: &mut dyn FnMut(&str)) -> Result<CacheLock, CacheError> {
        self.cache_lock(LockMode::Exclusive, wait, on_wait)
    }

    fn cache_lock(&self, mode: LockMode, wait: bool, on_wait: &mut dyn FnMut(&str)) -> Result<CacheLock, CacheError> {
        self.ensure(self.root())?;
        let file = self.lock_file(&self.root().join("lock"))?;
        let attempt = match mode {
            LockMode::Shared => file.try_lock_shared(),
            LockMode::Exclusive => file.try_lock(),
        };
        match attempt {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = self.holder_description();
                if !wait {
                    return Err(CacheError::Busy { root: self.root().to_path_buf(), holder, advice: mode.busy_advice().into() });
                }
                on_wait(&holder);
                let blocking = match mode {
                    LockMode::Shared => file.lock_shared(),
                    LockMode::Exclusive => file.lock(),
                };
                blocking.map_err(self.io("cannot lock the cache"))?;
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(self.io("cannot lock the cache")(e)),
        }
        let marker = self.register_holder(mode.holder())?;
        Ok(CacheLock { _file: file, marker })
    }

    /// Records who holds the cache lock, for the messages of those who wait.
    fn register_holder(&self, what: &str) -> Result<PathBuf, CacheError> {
        let dir = self.root().join("holders");
        self.ensure(&dir)?;
        let path = dir.join(format!("{}.{what}", std::process::id()));
        let text = format!("ril-pipe {what} (pid {}, since unix time {})", std::process::id(), now_unix());
        std::fs::write(&path, text).map_err(self.io("cannot record the lock holder"))?;
        Ok(path)
    }

    fn holder_description(&self) -> String {
        let mut holders = Vec::new();
        if let Ok(entries) = std::fs::read_dir(self.root().join("holders")) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let pid_alive = name
                    .split('.')
                    .next()
                    .and_then(|p| p.parse::<u32>().ok())
                    .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
                if pid_alive {
                    if let Ok(text) = std::fs::read_to_string(entry.path()) {
                        holders.push(text);
                    }
                } else {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        if holders.is_empty() {
            "another ril-pipe process".to_string()
        } else {
            holders.join(", ")
        }
    }
}

/// Held while a process computes an object.
pub struct ObjectLock {
    _file: File,
}

/// How the cache-wide lock is taken: shared by runs, exclusive for `gc`.
#[derive(Clone, Copy)]
enum LockMode {
    Shared,
    Exclusive,
}

impl LockMode {
    /// Who holds the lock in this mode, as the holder files name it.
    fn holder(self) -> &'static str {
        match self {
            LockMode::Shared => "run",
            LockMode::Exclusive => "gc",
        }
    }

    /// What to tell someone who finds the lock taken and would not wait.
    fn busy_advice(self) -> &'static str {
        match self {
            LockMode::Shared => "try again when it has finished",
            LockMode::Exclusive => "gc removes nothing while a run is active; try again when it has finished, or pass --wait",
        }
    }
}

/// The cache-wide lock of a run (shared) or of gc (exclusive); released on drop.
pub struct CacheLock {
    _file: File,
    marker: PathBuf,
}

impl Drop for CacheLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.marker);
    }
}
