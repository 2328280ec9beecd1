//! Units on threads of this process, and the computation of one object in this process (also
//! what `ril-pipe exec-stage` runs on a node).
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc};
use std::time::Instant;

use crate::exec::cache::{Cache, Manifest, ObjectState};
use crate::exec::key::short_key;
use crate::exec::kind::{InputObject, Registry, StageContext, StageError, StageKind, LOG_FILE};
use crate::exec::progress::{format_seconds, StageProgress};

use super::{Finished, FrozenStage, Launcher, Outcome};

/// Runs units on threads of this process.
pub struct LocalLauncher {
    kinds: HashMap<String, Arc<dyn StageKind>>,
    cache_root: PathBuf,
    cancel: Arc<AtomicBool>,
    tx: mpsc::Sender<Finished>,
    rx: mpsc::Receiver<Finished>,
}

impl LocalLauncher {
    pub fn new(registry: &Registry, cache: &Cache, cancel: Arc<AtomicBool>) -> Self {
        let (tx, rx) = mpsc::channel();
        let kinds = registry.schemas().keys().filter_map(|k| registry.get(k).map(|kind| (k.clone(), kind.clone()))).collect();
        LocalLauncher {
            kinds,
            cache_root: cache.root().to_path_buf(),
            cancel,
            tx,
            rx,
        }
    }
}

impl Launcher for LocalLauncher {
    fn start(&mut self, unit: usize, frozen: &FrozenStage, device: String, threads: usize, progress: StageProgress) -> Result<(), String> {
        let kind = self.kinds.get(&frozen.stage.kind).cloned().ok_or_else(|| format!("unknown kind `{}`", frozen.stage.kind))?;
        let frozen = frozen.clone();
        let tx = self.tx.clone();
        let cancel = self.cancel.clone();
        let cache = Cache::new(&self.cache_root);
        std::thread::spawn(move || {
            let (outcome, note) = execute_object(&cache, kind.as_ref(), &frozen, &device, threads, cancel, progress.clone());
            progress.finish();
            let _ = tx.send(Finished { unit, outcome, note });
        });
        Ok(())
    }

    fn wait(&mut self, timeout: std::time::Duration) -> Vec<Finished> {
        let mut done: Vec<Finished> = self.rx.recv_timeout(timeout).into_iter().collect();
        done.extend(self.rx.try_iter());
        done
    }

    fn cancel(&mut self) {
        // Stages poll the shared flag; nothing more to do here.
    }

    fn assigns_devices(&self) -> bool {
        false
    }
}

/// Computes one object (or finds it done by another process), holding its lock. Returns the
/// outcome and an optional note for the user.
pub fn execute_object(
    cache: &Cache,
    kind: &dyn StageKind,
    frozen: &FrozenStage,
    device: &str,
    threads: usize,
    cancel: Arc<AtomicBool>,
    progress: StageProgress,
) -> (Outcome, Option<String>) {
    let id = frozen.stage.id.clone();
    let failed = |error: String| Outcome::Failed { error, log: None };
    let mut note = None;
    let lock = cache.lock_object(&frozen.key, &mut || {
        eprintln!("  waiting {id}: another process is computing it");
    });
    let _lock = match lock {
        Ok(l) => l,
        Err(e) => return (failed(e.to_string()), None),
    };
    match cache.lookup(&frozen.key) {
        Ok(ObjectState::Done(_)) => return (Outcome::Cached, None),
        Ok(ObjectState::Corrupt(reason)) => {
            note = Some(format!("  damaged {id} ({}): {reason}; removing it and computing again", short_key(&frozen.key)));
            if let Err(e) = cache.remove_object(&frozen.key) {
                return (failed(e.to_string()), note);
            }
        }
        Ok(ObjectState::Missing) => {}
        Err(e) => return (failed(e.to_string()), None),
    }
    let mut inputs = BTreeMap::new();
    for (name, list) in &frozen.inputs {
        let mut objects = Vec::new();
        for (upstream, key) in list {
            let manifest = match checked_input(cache, upstream, key) {
                Ok(m) => m,
                Err(error) => return (failed(error), note),
            };
            let dir = match cache.object_dir(key) {
                Ok(d) => d,
                Err(e) => return (failed(e.to_string()), note),
            };
            objects.push(InputObject {
                stage_id: upstream.clone(),
                kind: manifest.kind.clone(),
                key: key.clone(),
                dir,
                meta: frozen.input_meta.get(upstream).cloned().unwrap_or_default(),
                manifest,
            });
        }
        inputs.insert(name.clone(), objects);
    }
    let tmp = match cache.begin(&frozen.key) {
        Ok(t) => t,
        Err(e) => return (failed(e.to_string()), note),
    };
    let resume = match cache.partial_dir(&frozen.key) {
        Ok(r) => r,
        Err(e) => return (failed(e.to_string()), note),
    };
    let mut ctx = match StageContext::new(frozen.stage.clone(), frozen.key.clone(), inputs, device.to_string(), threads, tmp.clone(), resume.clone(), cancel, progress) {
        Ok(c) => c,
        Err(e) => {
            cache.discard(&tmp);
            return (failed(e.to_string()), note);
        }
    };
    let started = Instant::now();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| kind.run(&mut ctx)));
    let seconds = started.elapsed().as_secs_f64();
    let result = result.unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        Err(StageError::Failed(format!("internal error (panic): {what}")))
    });
    match result {
        Ok(()) => {
            ctx.log(format!("finished in {}", format_seconds(seconds)));
            ctx.close_log();
            match cache.commit(&tmp, &frozen.key, &id, &frozen.ingredients, seconds) {
                Ok(_) => {
                    if resume.exists() {
                        let _ = std::fs::remove_dir_all(&resume);
                    }
                    (Outcome::Executed { seconds }, note)
                }
                Err(e) => {
                    cache.discard(&tmp);
                    (failed(format!("cannot store the outputs: {e}")), note)
                }
            }
        }
        Err(StageError::Cancelled) => {
            ctx.close_log();
            cache.discard(&tmp);
            (Outcome::Cancelled, note)
        }
        Err(e) => {
            ctx.log(format!("error: {e}"));
            ctx.close_log();
            let log = keep_failed_log(cache, &id, &frozen.key, &tmp);
            cache.discard(&tmp);
            (Outcome::Failed { error: e.to_string(), log }, note)
        }
    }
}

/// The manifest of an input object after checking every file's hash: a stage never reads a
/// damaged input. A damaged input is removed (so the next run recomputes it) and named.
fn checked_input(cache: &Cache, upstream: &str, key: &str) -> Result<Manifest, String> {
    match cache.verify(key) {
        Ok(Ok(manifest)) => Ok(manifest),
        Ok(Err(_)) if matches!(cache.lookup(key), Ok(ObjectState::Missing)) => Err(format!("input {upstream} ({}) is not in the cache", short_key(key))),
        Ok(Err(reason)) => {
            // Under the object's lock, so that a process recomputing it right now is not undone.
            let removed = cache.lock_object(key, &mut || {}).and_then(|_lock| match cache.verify(key)? {
                Ok(manifest) => Ok(Some(manifest)),
                Err(_) => cache.remove_object(key).map(|()| None),
            });
            match removed {
                Ok(Some(manifest)) => Ok(manifest),
                Ok(None) => Err(format!(
                    "input {upstream} ({}) is damaged in the cache: {reason}; it was removed, run again to recompute it",
                    short_key(key)
                )),
                Err(e) => Err(format!("input {upstream} ({}) is damaged in the cache: {reason}; cannot remove it: {e}", short_key(key))),
            }
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Moves a failed stage's log to `<cache>/logs/` so the user can read it; the outputs go.
fn keep_failed_log(cache: &Cache, id: &str, key: &str, tmp: &std::path::Path) -> Option<PathBuf> {
    let dir = cache.logs_dir();
    std::fs::create_dir_all(&dir).ok()?;
    let safe: String = id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    let dest = dir.join(format!("{safe}.{}.failed.log", short_key(key)));
    std::fs::rename(tmp.join(LOG_FILE), &dest).ok()?;
    Some(dest)
}
