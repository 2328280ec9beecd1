//! Launchers: where the units of a run execute, behind one trait. [`local`] runs them on
//! threads of this process; [`slurm`] submits each as a Slurm job that runs `ril-pipe
//! exec-stage` on a [`FrozenStage`] against the shared cache.
pub mod local;
pub mod slurm;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::pipeline::ResolvedStage;

use super::key::Ingredients;
use super::plan::{Plan, PlannedStage};
use super::progress::StageProgress;

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Computed in this run.
    Executed { seconds: f64 },
    /// Found in the cache (also: finished meanwhile by another process).
    Cached,
    Failed { error: String, log: Option<PathBuf> },
    /// Not run because an input failed or the run stopped.
    Skipped { reason: String },
    Cancelled,
}

/// A unit that finished (or could not start).
pub struct Finished {
    pub unit: usize,
    pub outcome: Outcome,
    pub note: Option<String>,
}

/// Starts units and reports when they finish: threads here, or jobs of a batch system.
pub trait Launcher {
    fn start(&mut self, unit: usize, frozen: &FrozenStage, device: String, threads: usize, progress: StageProgress) -> Result<(), String>;
    /// Units finished since the last call, waiting at most `timeout` for the first.
    fn wait(&mut self, timeout: std::time::Duration) -> Vec<Finished>;
    /// Asks every running unit to stop.
    fn cancel(&mut self);
    /// Whether devices are assigned by the launcher (a batch system) rather than the run.
    fn assigns_devices(&self) -> bool;
}

/// A frozen stage: everything needed to compute one object without the pipeline file
/// (`ril-pipe exec-stage`, e.g. as a Slurm job on another node).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FrozenStage {
    pub stage: ResolvedStage,
    pub key: String,
    pub ingredients: Ingredients,
    /// Input name -> (stage id, key) of each upstream object.
    pub inputs: BTreeMap<String, Vec<(String, String)>>,
    pub input_meta: BTreeMap<String, BTreeMap<String, String>>,
}

impl FrozenStage {
    fn from_plan(p: &PlannedStage, key_of: &HashMap<&str, &str>, meta_of: &HashMap<&str, &BTreeMap<String, String>>) -> Self {
        let mut inputs = BTreeMap::new();
        let mut input_meta = BTreeMap::new();
        for (name, ids) in &p.stage.inputs {
            let mut list = Vec::new();
            for id in ids {
                if let Some(k) = key_of.get(id.as_str()) {
                    list.push((id.clone(), k.to_string()));
                }
                if let Some(m) = meta_of.get(id.as_str()) {
                    input_meta.insert(id.clone(), (*m).clone());
                }
            }
            inputs.insert(name.clone(), list);
        }
        FrozenStage {
            stage: p.stage.clone(),
            key: p.key.clone(),
            ingredients: p.ingredients.clone(),
            inputs,
            input_meta,
        }
    }

    /// The frozen form of every unique stage of a plan, by key.
    pub fn all(plan: &Plan) -> BTreeMap<String, FrozenStage> {
        let key_of: HashMap<&str, &str> = plan.stages.iter().map(|s| (s.stage.id.as_str(), s.key.as_str())).collect();
        let meta_of: HashMap<&str, &BTreeMap<String, String>> = plan.stages.iter().map(|s| (s.stage.id.as_str(), &s.stage.meta)).collect();
        plan.unique().map(|p| (p.key.clone(), FrozenStage::from_plan(p, &key_of, &meta_of))).collect()
    }
}

