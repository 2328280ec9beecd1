//! LoRA files for diffusers and PEFT: an adapter group as the files `pipe.load_lora_weights`
//! reads, and such files back into a group.
//!
//! A diffusers LoRA file holds, for each adapted UNet layer `<layer>` (its module path, e.g.
//! `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`), `unet.<layer>.lora_A.weight`
//! `[r, in]` and `unet.<layer>.lora_B.weight` `[out, r]`, and in its safetensors metadata
//! `lora_adapter_metadata`, a JSON object whose `unet.r`, `unet.lora_alpha` and
//! `unet.target_modules` become the adapter's PEFT `LoraConfig`. PEFT adds
//! `w * (alpha / r) * B A x`, `w` the adapter's weight in `pipe.set_adapters(names, weights)`.
//!
//! ril-pipe's group adds `sum_i s_i B_i A_i x`. So each adapter `i` is written with alpha = r
//! (PEFT's scale is then 1, as in ril-pipe) and listed with the weight `s_i` (1 for the adapters
//! of a fine-tune, the coefficient for a soup's). The merged form is one LoRA of rank
//! `sum_i r_i` with `A = cat_i(s_i A_i)`, `B = cat_i(B_i)`, so that `B A = sum_i s_i B_i A_i`.
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::{Layer, LoraError, LoraGroup, Pair, State};
use crate::models::weights::{self, FloatStorage};

/// The prefix of the UNet's tensors in a diffusers pipeline's LoRA file.
pub const UNET_PREFIX: &str = "unet.";
/// The safetensors metadata entry that diffusers reads the `LoraConfig` from.
pub const METADATA_KEY: &str = "lora_adapter_metadata";
/// The index of an exported set of adapters (see [`AdapterIndex`]).
pub const INDEX_FILE: &str = "adapters.json";

/// One LoRA as a diffusers file holds it.
#[derive(Debug)]
pub struct PeftLora {
    /// `(A [r, in], B [out, r])` by layer name (without the `unet.` prefix).
    pub layers: BTreeMap<String, (Tensor, Tensor)>,
    pub rank: i64,
    /// PEFT scales `B A x` by `alpha / rank`.
    pub alpha: f64,
}

/// `adapters.json`: the files of an exported group, in order, with what `pipe.set_adapters`
/// needs, and the merged file when there is one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterIndex {
    /// How to load the files (for a reader of the file).
    #[serde(default)]
    pub usage: Vec<String>,
    /// The stage the adapters come from, its origin (`finetune`, `soup`, `joint`) and tasks.
    #[serde(default)]
    pub stage: String,
    #[serde(default)]
    pub origin: String,
    #[serde(default)]
    pub tasks: Vec<String>,
    pub adapters: Vec<AdapterEntry>,
    pub set_adapters: SetAdapters,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged: Option<AdapterEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterEntry {
    /// The adapter name to give `load_lora_weights(..., adapter_name=...)`.
    pub name: String,
    /// The file, for `load_lora_weights(DIR, weight_name=...)`.
    pub weight_name: String,
    /// Its weight in `set_adapters`.
    pub weight: f64,
    pub rank: i64,
    pub alpha: f64,
    /// The task the adapter was trained on, when the model says (one adapter per task).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
}

/// The arguments of `pipe.set_adapters(adapter_names, adapter_weights=...)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SetAdapters {
    pub adapter_names: Vec<String>,
    pub adapter_weights: Vec<f64>,
}

impl AdapterIndex {
    pub fn read(path: &Path) -> Result<Self, LoraError> {
        let file_err = |reason: String| LoraError::File { path: path.to_path_buf(), reason };
        let bytes = std::fs::read(path).map_err(|e| file_err(e.to_string()))?;
        serde_json::from_slice(&bytes).map_err(|e| file_err(format!("not an adapter index: {e}")))
    }
}

impl PeftLora {
    /// The tensors under their diffusers names, `unet.<layer>.lora_A.weight` and `.lora_B.weight`.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.layers
            .iter()
            .flat_map(|(name, (a, b))| {
                [(format!("{UNET_PREFIX}{name}.lora_A.weight"), a.shallow_clone()), (format!("{UNET_PREFIX}{name}.lora_B.weight"), b.shallow_clone())]
            })
            .collect()
    }

    /// The `LoraConfig` arguments diffusers reads: rank, alpha and the adapted layers.
    pub fn adapter_metadata(&self) -> serde_json::Value {
        let alpha = if self.alpha.fract() == 0.0 { serde_json::json!(self.alpha as i64) } else { serde_json::json!(self.alpha) };
        serde_json::json!({
            format!("{UNET_PREFIX}r"): self.rank,
            format!("{UNET_PREFIX}lora_alpha"): alpha,
            format!("{UNET_PREFIX}target_modules"): self.layers.keys().collect::<Vec<_>>(),
        })
    }

    /// Writes the file (fp32), with [`METADATA_KEY`] and the `extra` metadata entries.
    pub fn write(&self, path: &Path, extra: &BTreeMap<String, String>) -> Result<(), LoraError> {
        let mut metadata = extra.clone();
        metadata.insert(METADATA_KEY.to_string(), self.adapter_metadata().to_string());
        let bytes = weights::safetensors_bytes(&self.named_tensors(), FloatStorage::F32, &metadata)
            .map_err(|e| LoraError::File { path: path.to_path_buf(), reason: e.to_string() })?;
        crate::exec::atomic_write(path, &bytes).map_err(|e| LoraError::File { path: path.to_path_buf(), reason: e.to_string() })
    }

    /// Reads a diffusers LoRA file of a UNet: tensor names with the `unet.` prefix or none; the
    /// rank from the tensors, alpha from the metadata (`unet.lora_alpha`), else the rank, as
    /// diffusers does. Text-encoder tensors, per-layer ranks or alphas (`rank_pattern`,
    /// `alpha_pattern`) and other layouts are refused by name.
    pub fn read(path: &Path) -> Result<Self, LoraError> {
        let file_err = |reason: String| LoraError::File { path: path.to_path_buf(), reason };
        let tensors = weights::read_safetensors(path)?;
        let metadata = weights::read_safetensors_metadata(path)?;
        let mut halves: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
        for (key, tensor) in tensors {
            let bare = key.strip_prefix(UNET_PREFIX).unwrap_or(&key);
            let (layer, which) = bare
                .strip_suffix(".lora_A.weight")
                .map(|l| (l, 0))
                .or_else(|| bare.strip_suffix(".lora_B.weight").map(|l| (l, 1)))
                .ok_or_else(|| file_err(format!("tensor `{key}` is not a UNet LoRA tensor (`unet.<layer>.lora_A.weight` or `.lora_B.weight`)")))?;
            if layer.starts_with("text_encoder") {
                return Err(file_err(format!("tensor `{key}` adapts the text encoder; only UNet LoRAs are supported")));
            }
            let entry = halves.entry(layer.to_string()).or_default();
            let slot = if which == 0 { &mut entry.0 } else { &mut entry.1 };
            *slot = Some(tensor.to_kind(Kind::Float));
        }
        let mut layers = BTreeMap::new();
        let mut rank = None;
        for (name, (a, b)) in halves {
            let (Some(a), Some(b)) = (a, b) else {
                return Err(file_err(format!("layer `{name}` lacks lora_A or lora_B")));
            };
            let r = match (a.size().as_slice(), b.size().as_slice()) {
                (&[r, _], &[_, r2]) if r == r2 && r > 0 => r,
                (sa, sb) => return Err(file_err(format!("layer `{name}`: lora_A {sa:?} and lora_B {sb:?} are not [r, in] and [out, r]"))),
            };
            if rank.is_some_and(|known| known != r) {
                return Err(file_err(format!("layer `{name}` has rank {r}, others {}: per-layer ranks are not supported", rank.unwrap_or(0))));
            }
            rank = Some(r);
            layers.insert(name, (a, b));
        }
        let rank = rank.ok_or_else(|| file_err("no LoRA tensors".into()))?;
        let alpha = match metadata.get(METADATA_KEY) {
            None => rank as f64,
            Some(text) => {
                let config: serde_json::Value = serde_json::from_str(text).map_err(|e| file_err(format!("{METADATA_KEY} is not JSON: {e}")))?;
                for pattern in ["rank_pattern", "alpha_pattern"] {
                    if config.get(format!("{UNET_PREFIX}{pattern}")).is_some_and(|p| p.as_object().is_some_and(|m| !m.is_empty())) {
                        return Err(file_err(format!("{METADATA_KEY} sets a {pattern}: per-layer ranks or alphas are not supported")));
                    }
                }
                if let Some(r) = config.get(format!("{UNET_PREFIX}r")).and_then(|r| r.as_i64()) {
                    if r != rank {
                        return Err(file_err(format!("{METADATA_KEY} says rank {r}, the tensors have rank {rank}")));
                    }
                }
                config.get(format!("{UNET_PREFIX}lora_alpha")).and_then(|a| a.as_f64()).unwrap_or(rank as f64)
            }
        };
        Ok(PeftLora { layers, rank, alpha })
    }
}

impl LoraGroup {
    /// Each adapter of the group as a LoRA of its own, with alpha = rank (PEFT's `alpha / r` is
    /// then 1) and its scale `s_i`, the weight `set_adapters` must give it. Loaded one by one and
    /// weighted so, they compute what the group computes. The EMA teacher is not exported.
    pub fn to_peft(&self) -> Vec<(PeftLora, f64)> {
        let state = self.state();
        (0..state.num_adapters())
            .map(|i| {
                let layers: BTreeMap<String, (Tensor, Tensor)> =
                    state.layers.iter().map(|(name, l)| (name.clone(), (l.adapters[i].a.detach().to_device(Device::Cpu), l.adapters[i].b.detach().to_device(Device::Cpu)))).collect();
                let rank = layers.values().next().map_or(0, |(a, _)| a.size()[0]);
                (PeftLora { layers, rank, alpha: rank as f64 }, state.scales[i])
            })
            .collect()
    }

    /// The whole group as one LoRA (weight 1): per layer `A = cat_i(s_i A_i)` and
    /// `B = cat_i(B_i)`, of rank `sum_i r_i` with alpha = rank, so that `B A = sum_i s_i B_i A_i`.
    pub fn to_peft_merged(&self) -> Result<PeftLora, LoraError> {
        let state = self.state();
        if state.num_adapters() == 0 {
            return Err(LoraError::NoAdapter { index: 0, count: 0 });
        }
        let layers: BTreeMap<String, (Tensor, Tensor)> = tch::no_grad(|| {
            state
                .layers
                .iter()
                .map(|(name, l)| {
                    let a: Vec<Tensor> = l.adapters.iter().zip(&state.scales).map(|(p, s)| p.a.detach().to_device(Device::Cpu) * *s).collect();
                    let b: Vec<Tensor> = l.adapters.iter().map(|p| p.b.detach().to_device(Device::Cpu)).collect();
                    (name.clone(), (Tensor::cat(&a, 0), Tensor::cat(&b, 1)))
                })
                .collect()
        });
        let rank = layers.values().next().map_or(0, |(a, _)| a.size()[0]);
        Ok(PeftLora { layers, rank, alpha: rank as f64 })
    }

    /// An unbound group (for a model to bind when it is built) holding `loras`, each with the
    /// scale `weight * alpha / rank` that PEFT gives it; its targets are the layers the LoRAs
    /// adapt. A layer that some LoRAs leave out gets zero matrices for them.
    pub fn from_peft(loras: &[(PeftLora, f64)]) -> Result<LoraGroup, LoraError> {
        let names: BTreeSet<&String> = loras.iter().flat_map(|(l, _)| l.layers.keys()).collect();
        let mut layers = BTreeMap::new();
        for name in names {
            let (in_dim, out_dim) = loras
                .iter()
                .find_map(|(l, _)| l.layers.get(name))
                .map(|(a, b)| (a.size()[1], b.size()[0]))
                .ok_or_else(|| LoraError::NoLayer(name.clone()))?;
            let mut adapters = Vec::with_capacity(loras.len());
            for (lora, _) in loras {
                let pair = match lora.layers.get(name) {
                    Some((a, b)) => {
                        if (a.size()[1], b.size()[0]) != (in_dim, out_dim) {
                            return Err(LoraError::LayerShape { name: name.clone(), in_dim: a.size()[1], out_dim: b.size()[0], group_in: in_dim, group_out: out_dim });
                        }
                        Pair { a: a.to_kind(Kind::Float), b: b.to_kind(Kind::Float) }
                    }
                    None => Pair { a: Tensor::zeros([lora.rank, in_dim], (Kind::Float, Device::Cpu)), b: Tensor::zeros([out_dim, lora.rank], (Kind::Float, Device::Cpu)) },
                };
                adapters.push(pair);
            }
            layers.insert(name.clone(), Layer { in_dim, out_dim, device: Device::Cpu, bound: false, adapters, teacher: None });
        }
        if layers.is_empty() {
            return Err(LoraError::NoLayers(Vec::new()));
        }
        let scales = loras.iter().map(|(l, w)| w * l.alpha / l.rank as f64).collect();
        let targets = layers.keys().cloned().collect();
        let mut state = State { targets, layers, slots: Vec::new(), scales, use_teacher: false };
        state.refresh_trainable();
        Ok(LoraGroup(std::sync::Arc::new(std::sync::Mutex::new(state))))
    }

    /// The group of an exported folder (its [`INDEX_FILE`]: every adapter listed, with its
    /// weight) or of one LoRA file (weight 1).
    pub fn from_peft_path(path: &Path) -> Result<LoraGroup, LoraError> {
        if path.is_dir() {
            let index = AdapterIndex::read(&path.join(INDEX_FILE))?;
            let loras = index.adapters.iter().map(|a| Ok((PeftLora::read(&path.join(&a.weight_name))?, a.weight))).collect::<Result<Vec<_>, LoraError>>()?;
            Self::from_peft(&loras)
        } else {
            Self::from_peft(&[(PeftLora::read(path)?, 1.0)])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two layers, two adapters of ranks 2 and 3 with B moved away from zero, scales 1 and 0.4.
    fn group() -> LoraGroup {
        let group = LoraGroup::new(vec!["to_q".into(), "to_k".into()]);
        group.register("blk.to_q", 6, 5, Device::Cpu).unwrap();
        group.register("blk.to_k", 6, 4, Device::Cpu).unwrap();
        group.add_adapter(2, crate::models::lora::LoraInit::KaimingUniform, 1).unwrap();
        group.add_adapter(3, crate::models::lora::LoraInit::KaimingUniform, 2).unwrap();
        group.set_scale(1, 0.4).unwrap();
        let state = group.state();
        tch::no_grad(|| {
            for (k, layer) in state.layers.values().enumerate() {
                for (i, pair) in layer.adapters.iter().enumerate() {
                    let mut b = pair.b.shallow_clone();
                    let n = b.numel() as i64;
                    b.copy_(&(Tensor::arange(n, (Kind::Float, Device::Cpu)) * 0.3 + (k * 10 + i) as f64).sin().view(b.size().as_slice()));
                }
            }
        });
        drop(state);
        group
    }

    fn deltas(group: &LoraGroup) -> Vec<Tensor> {
        group.layer_names().iter().map(|n| group.effective_delta(n).unwrap()).collect()
    }

    fn close(a: &[Tensor], b: &[Tensor]) -> bool {
        a.iter().zip(b).all(|(x, y)| (x - y).abs().max().double_value(&[]) < 1e-6)
    }

    #[test]
    fn adapters_and_the_merged_form_keep_the_groups_effective_weights() {
        let group = group();
        let loras = group.to_peft();
        assert_eq!(loras.iter().map(|(l, w)| (l.rank, l.alpha, *w)).collect::<Vec<_>>(), [(2, 2.0, 1.0), (3, 3.0, 0.4)]);
        assert!(close(&deltas(&LoraGroup::from_peft(&loras).unwrap()), &deltas(&group)));
        let merged = group.to_peft_merged().unwrap();
        assert_eq!((merged.rank, merged.alpha), (5, 5.0));
        assert!(close(&deltas(&LoraGroup::from_peft(&[(merged, 1.0)]).unwrap()), &deltas(&group)));
        // PEFT's scale: the weight times alpha / r.
        let (lora, _) = &loras[1];
        let half_alpha = PeftLora { layers: lora.layers.iter().map(|(k, (a, b))| (k.clone(), (a.shallow_clone(), b.shallow_clone()))).collect(), rank: 3, alpha: 1.5 };
        let scales = LoraGroup::from_peft(&[(half_alpha, 0.4)]).unwrap().scales();
        assert!(scales.len() == 1 && (scales[0] - 0.4 * 1.5 / 3.0).abs() < 1e-15, "{scales:?}");
    }

    #[test]
    fn files_round_trip_and_foreign_files_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let (lora, _) = &group().to_peft()[1];
        let path = dir.path().join("a.safetensors");
        lora.write(&path, &BTreeMap::new()).unwrap();
        let back = PeftLora::read(&path).unwrap();
        assert_eq!((back.rank, back.alpha), (3, 3.0));
        assert!(back.layers.iter().all(|(k, (a, b))| a.equal(&lora.layers[k].0) && b.equal(&lora.layers[k].1)));

        let write = |tensors: Vec<(&str, Tensor)>, meta: Option<&str>| {
            let named: Vec<(String, Tensor)> = tensors.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            let metadata = meta.map(|m| BTreeMap::from([(METADATA_KEY.to_string(), m.to_string())])).unwrap_or_default();
            std::fs::write(&path, weights::safetensors_bytes(&named, FloatStorage::F32, &metadata).unwrap()).unwrap();
            PeftLora::read(&path).map(|l| (l.rank, l.alpha)).map_err(|e| e.to_string())
        };
        let a = || Tensor::zeros([2, 6], (Kind::Float, Device::Cpu));
        let b = || Tensor::zeros([5, 2], (Kind::Float, Device::Cpu));
        // Bare PEFT names, no metadata: alpha is the rank, as diffusers assumes.
        assert_eq!(write(vec![("blk.to_q.lora_A.weight", a()), ("blk.to_q.lora_B.weight", b())], None), Ok((2, 2.0)));
        assert_eq!(write(vec![("unet.blk.to_q.lora_A.weight", a()), ("unet.blk.to_q.lora_B.weight", b())], Some(r#"{"unet.r": 2, "unet.lora_alpha": 8}"#)), Ok((2, 8.0)));
        let err = write(vec![("text_encoder.x.lora_A.weight", a()), ("text_encoder.x.lora_B.weight", b())], None).unwrap_err();
        assert!(err.contains("adapts the text encoder"), "{err}");
        let err = write(vec![("unet.blk.to_q.lora_A.weight", a())], None).unwrap_err();
        assert!(err.contains("layer `blk.to_q` lacks lora_A or lora_B"), "{err}");
        let err = write(vec![("unet.blk.to_q.alpha", Tensor::from_slice(&[1.0f32]))], None).unwrap_err();
        assert!(err.contains("is not a UNet LoRA tensor"), "{err}");
        let err = write(vec![("unet.blk.to_q.lora_A.weight", a()), ("unet.blk.to_q.lora_B.weight", b())], Some(r#"{"unet.r": 4}"#)).unwrap_err();
        assert!(err.contains("says rank 4, the tensors have rank 2"), "{err}");
        let err = write(vec![("unet.blk.to_q.lora_A.weight", a()), ("unet.blk.to_q.lora_B.weight", b())], Some(r#"{"unet.rank_pattern": {"^blk": 8}}"#)).unwrap_err();
        assert!(err.contains("rank_pattern"), "{err}");
    }
}
