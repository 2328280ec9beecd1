//! `ril-pipe lora export`: the adapter group of a finished stage's model (a fine-tune, a soup,
//! joint tuning) as LoRA files that diffusers loads. Not a stage kind: it reads a cache object
//! and writes a folder. The file format is [`crate::models::lora::peft`]'s.
use std::collections::BTreeMap;
use std::path::Path;

use crate::exec::StageError;
use crate::models::lora::peft::{AdapterEntry, AdapterIndex, PeftLora, SetAdapters, INDEX_FILE};
use crate::models::lora::LoraGroup;

use super::world::ModelRecord;

/// The file of the merged form (`--merged`).
pub const MERGED_FILE: &str = "merged.safetensors";

/// What an export wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportSummary {
    pub index: AdapterIndex,
    /// Every file written, [`INDEX_FILE`] last.
    pub files: Vec<String>,
}

/// Writes the adapters of the model in `model_dir` (the object of stage `stage`) to `out`: one
/// file per adapter (`adapter<i>.safetensors`), with `merged`, [`MERGED_FILE`] too, and
/// [`INDEX_FILE`]. `out` is replaced as a whole: the files are made beside it and renamed into
/// place, so it is always the old folder or the complete new one.
pub fn export_lora(model_dir: &Path, stage: &str, out: &Path, merged: bool) -> Result<ExportSummary, StageError> {
    let (record, adapters) = ModelRecord::of_object(model_dir, stage)?;
    let adapters = adapters.ok_or_else(|| StageError::Failed(format!("stage `{stage}` is the base model ({}): it has no LoRA adapters to export", record.origin)))?;
    let group = LoraGroup::new(record.lora_targets.clone());
    group.load(&adapters).map_err(|e| StageError::Failed(format!("adapters of `{stage}`: {e}")))?;
    let loras = group.to_peft();
    // A fine-tune chain adds one adapter per task, in order.
    let tasks: Vec<String> = record.tasks.iter().map(|t| t.name().to_string()).collect();
    let per_task = record.origin == "finetune" && tasks.len() == loras.len();

    crate::exec::publish::replace_folder(out, |staging| -> Result<ExportSummary, StageError> {
        let mut files = Vec::new();
        let mut entries = Vec::new();
        for (i, (lora, weight)) in loras.iter().enumerate() {
            let name = format!("adapter{i}");
            let file = format!("{name}.safetensors");
            lora.write(&staging.join(&file), &provenance(stage, &name, *weight)).map_err(StageError::failed)?;
            entries.push(entry(&name, &file, *weight, lora, per_task.then(|| tasks[i].clone())));
            files.push(file);
        }
        let merged = if merged {
            let lora = group.to_peft_merged().map_err(StageError::failed)?;
            lora.write(&staging.join(MERGED_FILE), &provenance(stage, "merged", 1.0)).map_err(StageError::failed)?;
            files.push(MERGED_FILE.to_string());
            Some(entry("merged", MERGED_FILE, 1.0, &lora, None))
        } else {
            None
        };
        let index = AdapterIndex {
            usage: vec![
                "pipe = StableDiffusionPipeline.from_pretrained(<the world's diffusers folder>)".into(),
                "for a in adapters: pipe.load_lora_weights(DIR, weight_name=a.weight_name, adapter_name=a.name)".into(),
                "pipe.set_adapters(set_adapters.adapter_names, adapter_weights=set_adapters.adapter_weights)".into(),
                "or, for tools that take one LoRA: pipe.load_lora_weights(DIR, weight_name=merged.weight_name) (with --merged)".into(),
            ],
            stage: stage.to_string(),
            origin: record.origin.clone(),
            tasks,
            set_adapters: SetAdapters { adapter_names: entries.iter().map(|e| e.name.clone()).collect(), adapter_weights: entries.iter().map(|e| e.weight).collect() },
            adapters: entries,
            merged,
        };
        let mut bytes = serde_json::to_vec_pretty(&index).map_err(StageError::failed)?;
        bytes.push(b'\n');
        crate::exec::atomic_write(&staging.join(INDEX_FILE), &bytes).map_err(|e| StageError::io("cannot write the adapter index", e))?;
        files.push(INDEX_FILE.to_string());
        Ok(ExportSummary { index, files })
    })
}

fn entry(name: &str, file: &str, weight: f64, lora: &PeftLora, task: Option<String>) -> AdapterEntry {
    AdapterEntry { name: name.to_string(), weight_name: file.to_string(), weight, rank: lora.rank, alpha: lora.alpha, task }
}

/// Metadata entries that say where a file comes from (diffusers ignores them).
fn provenance(stage: &str, adapter: &str, weight: f64) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("ril_pipe.stage".to_string(), stage.to_string()),
        ("ril_pipe.adapter".to_string(), adapter.to_string()),
        ("ril_pipe.set_adapters_weight".to_string(), weight.to_string()),
    ])
}
