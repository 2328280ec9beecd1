//! The Slurm executor: each ready stage becomes an `sbatch` job that runs one frozen stage
//! (`ril-pipe exec-stage`) against the cache, which all nodes share. Job states come from one
//! batched `squeue` query per poll (rate-limited); a stage counts as done only when its object
//! is in the cache, whatever the batch system says. Ctrl-C cancels the run's jobs.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::exec::atomic_write;
use crate::exec::cache::{Cache, ObjectState};
use crate::exec::progress::StageProgress;

use super::{Finished, FrozenStage, Launcher, Outcome};

/// The commands used to talk to Slurm (replaceable for tests and unusual installations).
#[derive(Debug, Clone)]
pub struct SlurmCommands {
    pub sbatch: String,
    pub squeue: String,
    pub scancel: String,
}

impl Default for SlurmCommands {
    fn default() -> Self {
        SlurmCommands {
            sbatch: "sbatch".into(),
            squeue: "squeue".into(),
            scancel: "scancel".into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SlurmConfig {
    /// The `ril-pipe` binary the jobs run (it must be reachable from the nodes).
    pub binary: PathBuf,
    /// Partition for stages that name none.
    pub partition: Option<String>,
    /// Least time between two `squeue` queries.
    pub poll_interval: Duration,
    /// `--device` for `exec-stage` on the nodes.
    pub device: String,
    /// Extra `sbatch` arguments for every job (e.g. `--account=...`).
    pub extra_args: Vec<String>,
    pub commands: SlurmCommands,
}

impl SlurmConfig {
    /// Defaults: this binary, Slurm's default partition, a poll every 2 s.
    pub fn new(binary: PathBuf) -> Self {
        SlurmConfig {
            binary,
            partition: None,
            poll_interval: Duration::from_secs(2),
            device: "auto".into(),
            extra_args: Vec::new(),
            commands: SlurmCommands::default(),
        }
    }
}

struct Job {
    unit: usize,
    key: String,
    stage_id: String,
    log: PathBuf,
    last_state: String,
}

pub struct SlurmLauncher {
    config: SlurmConfig,
    cache_root: PathBuf,
    run_dir: PathBuf,
    jobs: BTreeMap<String, Job>,
    last_poll: Option<Instant>,
}

/// Job states after which a job runs no more.
const TERMINAL: &[&str] = &["COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE"];

impl SlurmLauncher {
    /// A launcher for the cache `cache` (its job scripts and logs go into the cache), or why
    /// there is none.
    pub fn new(config: SlurmConfig, cache: &Cache) -> Result<Self, String> {
        std::fs::create_dir_all(cache.root()).map_err(|e| format!("cannot create the cache {}: {e}", cache.root().display()))?;
        let cache_root = cache
            .root()
            .canonicalize()
            .map_err(|e| format!("cache {}: {e}", cache.root().display()))?;
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let run_dir = cache_root.join("slurm").join(format!("{stamp}-{}", std::process::id()));
        std::fs::create_dir_all(&run_dir).map_err(|e| format!("cannot create {}: {e}", run_dir.display()))?;
        let binary = config.binary.canonicalize().map_err(|e| format!("ril-pipe binary {}: {e}", config.binary.display()))?;
        Ok(SlurmLauncher {
            config: SlurmConfig { binary, ..config },
            cache_root,
            run_dir,
            jobs: BTreeMap::new(),
            last_poll: None,
        })
    }

    fn sbatch_args(&self, frozen: &FrozenStage, log: &Path) -> Vec<String> {
        let r = &frozen.stage.resources;
        let name: String = frozen.stage.id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
        let mut args = vec!["--parsable".to_string(), format!("--job-name=ril-{name}"), format!("--output={}", log.display())];
        if let Some(p) = r.partition.as_ref().or(self.config.partition.as_ref()) {
            args.push(format!("--partition={p}"));
        }
        if let Some(c) = r.cpus {
            args.push(format!("--cpus-per-task={c}"));
        }
        if let Some(m) = r.mem_gb {
            args.push(format!("--mem={}M", (m * 1024.0).ceil() as u64));
        }
        if let Some(t) = r.time_min {
            args.push(format!("--time={t}"));
        }
        if let Some(g) = r.gpus.filter(|g| *g > 0) {
            args.push(format!("--gres=gpu:{g}"));
        }
        args.extend(self.config.extra_args.iter().cloned());
        args
    }

    /// One batched query: job id -> state, for the jobs still listed.
    fn query(&self) -> Result<BTreeMap<String, String>, String> {
        let ids: Vec<&str> = self.jobs.keys().map(String::as_str).collect();
        let output = Command::new(&self.config.commands.squeue)
            .args(["--noheader", "--format=%i %T", &format!("--jobs={}", ids.join(","))])
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.config.commands.squeue))?;
        // squeue fails for job ids it no longer knows; that means they ended.
        let text = String::from_utf8_lossy(&output.stdout);
        Ok(text
            .lines()
            .filter_map(|l| {
                let mut parts = l.split_whitespace();
                Some((parts.next()?.to_string(), parts.next()?.to_string()))
            })
            .collect())
    }

    fn outcome_of(&self, job_id: &str, job: &Job) -> Outcome {
        let cache = Cache::new(&self.cache_root);
        match cache.lookup(&job.key) {
            Ok(ObjectState::Done(m)) => Outcome::Executed { seconds: m.seconds },
            _ => Outcome::Failed {
                error: format!(
                    "Slurm job {job_id} ended{} without producing the stage's output",
                    if job.last_state.is_empty() { String::new() } else { format!(" ({})", job.last_state) }
                ),
                log: Some(job.log.clone()),
            },
        }
    }
}

impl Launcher for SlurmLauncher {
    fn start(&mut self, unit: usize, frozen: &FrozenStage, _device: String, _threads: usize, _progress: StageProgress) -> Result<(), String> {
        let spec = self.run_dir.join(format!("{}.json", frozen.key));
        let bytes = serde_json::to_vec_pretty(frozen).map_err(|e| e.to_string())?;
        atomic_write(&spec, &bytes).map_err(|e| format!("cannot write {}: {e}", spec.display()))?;
        let log = self.run_dir.join(format!("{}.log", frozen.key));
        let script = self.run_dir.join(format!("{}.sh", frozen.key));
        let threads = frozen.stage.resources.cpus.map(|c| format!(" --threads {c}")).unwrap_or_default();
        let text = format!(
            "#!/bin/sh\n# ril-pipe stage {id}\nexec {bin} exec-stage {spec} --cache {cache} --device {device}{threads}\n",
            id = frozen.stage.id,
            bin = shell_quote(&self.config.binary.to_string_lossy()),
            spec = shell_quote(&spec.to_string_lossy()),
            cache = shell_quote(&self.cache_root.to_string_lossy()),
            device = shell_quote(&self.config.device),
        );
        atomic_write(&script, text.as_bytes()).map_err(|e| format!("cannot write {}: {e}", script.display()))?;
        let output = Command::new(&self.config.commands.sbatch)
            .args(self.sbatch_args(frozen, &log))
            .arg(&script)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.config.commands.sbatch))?;
        if !output.status.success() {
            return Err(format!("sbatch refused stage {}: {}", frozen.stage.id, String::from_utf8_lossy(&output.stderr).trim()));
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let job_id = stdout.trim().split(';').next().unwrap_or("").to_string();
        if job_id.is_empty() || !job_id.chars().all(|c| c.is_ascii_digit() || c == '_') {
            return Err(format!("sbatch gave no job id for stage {} (output: {})", frozen.stage.id, stdout.trim()));
        }
        eprintln!("  submit  {} as Slurm job {job_id}", frozen.stage.id);
        self.jobs.insert(
            job_id,
            Job {
                unit,
                key: frozen.key.clone(),
                stage_id: frozen.stage.id.clone(),
                log,
                last_state: String::new(),
            },
        );
        Ok(())
    }

    fn wait(&mut self, timeout: Duration) -> Vec<Finished> {
        if self.jobs.is_empty() {
            std::thread::sleep(timeout);
            return Vec::new();
        }
        if let Some(last) = self.last_poll {
            let due = last + self.config.poll_interval;
            let now = Instant::now();
            if now < due {
                std::thread::sleep(timeout.min(due - now));
                if Instant::now() < due {
                    return Vec::new();
                }
            }
        }
        self.last_poll = Some(Instant::now());
        let states = match self.query() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("  warning: {e}; retrying");
                return Vec::new();
            }
        };
        let mut ended = Vec::new();
        for (id, job) in self.jobs.iter_mut() {
            match states.get(id) {
                Some(state) if !TERMINAL.contains(&state.as_str()) => job.last_state = state.clone(),
                Some(state) => {
                    job.last_state = state.clone();
                    ended.push(id.clone());
                }
                None => ended.push(id.clone()),
            }
        }
        let mut finished = Vec::new();
        for id in ended {
            if let Some(job) = self.jobs.remove(&id) {
                let outcome = self.outcome_of(&id, &job);
                let note = matches!(outcome, Outcome::Failed { .. }).then(|| format!("  job {id} of {} failed; its log: {}", job.stage_id, job.log.display()));
                finished.push(Finished { unit: job.unit, outcome, note });
            }
        }
        finished
    }

    fn cancel(&mut self) {
        if self.jobs.is_empty() {
            return;
        }
        let ids: Vec<String> = self.jobs.keys().cloned().collect();
        eprintln!("  cancelling {} Slurm job(s): {}", ids.len(), ids.join(" "));
        if let Err(e) = Command::new(&self.config.commands.scancel).args(&ids).status() {
            eprintln!("  warning: cannot run {}: {e}", self.config.commands.scancel);
        }
    }

    fn assigns_devices(&self) -> bool {
        true
    }
}

/// Single-quotes a word for /bin/sh.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::shell_quote;

    #[test]
    fn quoting_survives_spaces_and_quotes() {
        assert_eq!(shell_quote("/a b/c"), "'/a b/c'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }
}
