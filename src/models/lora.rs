//! LoRA adapter group (Eq. 4): per-task adapter pairs on chosen linear layers.
//!
//! Every adapted layer computes `W x + b + sum_i s_i B_i (A_i x)`. Task `t` adds pair `t`
//! (`A_t [r, in]` random, `B_t [out, r]` zero), which becomes the only trainable one: the base
//! `W, b` and the earlier pairs are frozen. The adapter tensors live in the group, outside the base
//! model's `VarStore`, so base checkpoints load strictly and adapters are saved on their own;
//! freeze that `VarStore` (`vs.freeze()`) before training so only the adapter gets gradients.
//!
//! RID's EMA teacher (Eq. 6) is a copy of the newest pair kept beside it; a switch makes the
//! same model run with the teacher's copy. A model soup is a group holding the adapters of several
//! groups with their scales multiplied by the soup coefficients: as all share the frozen base,
//! this equals the merged weights `W + sum_k c_k dW_k` (averaging A and B would not).
//!
//! Adapter files (safetensors), for each adapted layer `<layer>` (its full upstream name, e.g.
//! `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`) and adapter index `<i>`:
//! `<layer>.lora_A.<i>.weight` `[r_i, in]`, `<layer>.lora_B.<i>.weight` `[out, r_i]`, the EMA
//! teacher of the newest pair (if any) as `<layer>.lora_A.teacher.weight` and
//! `<layer>.lora_B.teacher.weight`, and `lora_scales`, the f64 vector of the `s_i`.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

pub mod peft;

use rand::{Rng, SeedableRng};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

/// Name of the scale vector in adapter files.
pub const SCALES_NAME: &str = "lora_scales";

#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("layer `{name}` is [{out_dim}, {in_dim}] but the adapter group holds it as [{group_out}, {group_in}]")]
    LayerShape { name: String, in_dim: i64, out_dim: i64, group_in: i64, group_out: i64 },
    #[error("layer `{0}` has no adapters in this group, which already holds adapters (it was made for another model)")]
    UnknownLayer(String),
    #[error("the adapter group holds layer `{name}` that the model does not have (first of {count})")]
    Unbound { name: String, count: usize },
    #[error("the adapter group has no layer: its targets {0:?} match no linear layer of the model")]
    NoLayers(Vec<String>),
    #[error("adapter {index} does not exist (the group has {count})")]
    NoAdapter { index: usize, count: usize },
    #[error("no adapter layer named `{0}`")]
    NoLayer(String),
    #[error("LoRA rank must be positive, got {0}")]
    Rank(i64),
    #[error("the EMA teacher is not initialised (call init_teacher after adding an adapter)")]
    NoTeacher,
    #[error("EMA momentum must be in [0, 1], got {0}")]
    Momentum(f64),
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("cannot make a soup: {0}")]
    Soup(String),
    #[error(transparent)]
    Weights(#[from] crate::models::weights::WeightsError),
}

/// How the down projection `A` of a new adapter is initialised (`B` is always zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraInit {
    /// As `torch.nn.Linear` and peft's default: Kaiming-uniform with `a = sqrt(5)`, i.e.
    /// `U(-1/sqrt(in), 1/sqrt(in))`.
    KaimingUniform,
    /// `N(0, sigma = 1/r)`, peft's `init_lora_weights="gaussian"`.
    Normal,
}

impl LoraInit {
    pub fn name(self) -> &'static str {
        match self {
            LoraInit::KaimingUniform => "kaiming_uniform",
            LoraInit::Normal => "normal",
        }
    }
}

/// Which layers get adapters and how new adapters are made.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    pub rank: i64,
    /// Layer-name suffixes on dotted-component boundaries: `to_out.0` matches
    /// `...attn1.to_out.0` but not `...attn1.proj_to_out.0`.
    pub targets: Vec<String>,
    pub init: LoraInit,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self { rank: 4, targets: default_targets(), init: LoraInit::KaimingUniform }
    }
}

/// AlignProp's adapted layers: the projections of every attention module.
pub fn default_targets() -> Vec<String> {
    ["to_q", "to_k", "to_v", "to_out.0"].iter().map(|s| s.to_string()).collect()
}

#[derive(Debug)]
struct Pair {
    a: Tensor,
    b: Tensor,
}

impl Pair {
    fn detached_copy(&self) -> Pair {
        tch::no_grad(|| Pair { a: self.a.detach().copy(), b: self.b.detach().copy() })
    }

    fn delta(&self) -> Tensor {
        self.b.detach().mm(&self.a.detach())
    }
}

#[derive(Debug)]
struct Layer {
    in_dim: i64,
    out_dim: i64,
    device: Device,
    /// Whether a model layer uses this entry (a group loaded from a file or souped starts unbound).
    bound: bool,
    adapters: Vec<Pair>,
    teacher: Option<Pair>,
}

#[derive(Debug)]
struct State {
    targets: Vec<String>,
    /// By full layer name; the sorted order fixes the order of initialisation and of tensors.
    layers: BTreeMap<String, Layer>,
    /// Layer names by the index handed to [`Linear`] at registration.
    slots: Vec<String>,
    scales: Vec<f64>,
    use_teacher: bool,
}

impl State {
    fn matches(&self, name: &str) -> bool {
        self.targets.iter().any(|t| name == t || name.strip_suffix(t.as_str()).is_some_and(|p| p.ends_with('.')))
    }

    /// Keeps the invariant: the newest pair requires grad, every other pair and the teacher do not.
    fn refresh_trainable(&mut self) {
        for layer in self.layers.values_mut() {
            let newest = layer.adapters.len().saturating_sub(1);
            for (i, pair) in layer.adapters.iter_mut().enumerate() {
                let trainable = i == newest;
                pair.a = pair.a.detach().set_requires_grad(trainable);
                pair.b = pair.b.detach().set_requires_grad(trainable);
            }
        }
    }

    fn num_adapters(&self) -> usize {
        self.scales.len()
    }
}

/// A shared handle on the adapter group of one model (clones share the same group). The lock
/// only makes models `Send`; it is uncontended, as a model runs on one thread at a time.
#[derive(Debug, Clone)]
pub struct LoraGroup(Arc<Mutex<State>>);

impl LoraGroup {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-updated in a way later
        // calls rely on, so a poisoned lock is taken over.
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// An empty group adapting the layers whose names end with one of `targets`.
    pub fn new(targets: Vec<String>) -> Self {
        LoraGroup(Arc::new(Mutex::new(State {
            targets,
            layers: BTreeMap::new(),
            slots: Vec::new(),
            scales: Vec::new(),
            use_teacher: false,
        })))
    }

    pub fn targets(&self) -> Vec<String> {
        self.state().targets.clone()
    }

    /// Full names of the adapted layers, sorted.
    pub fn layer_names(&self) -> Vec<String> {
        self.state().layers.keys().cloned().collect()
    }

    pub fn num_adapters(&self) -> usize {
        self.state().num_adapters()
    }

    pub fn scales(&self) -> Vec<f64> {
        self.state().scales.clone()
    }

    /// Called by [`linear`] for every linear layer of a model. Returns the slot of the layer
    /// when it is a target. A layer already in the group (loaded from a file or souped) must have
    /// the same shape; its tensors move to the layer's device.
    fn register(&self, name: &str, in_dim: i64, out_dim: i64, device: Device) -> Result<Option<usize>, LoraError> {
        let mut state = self.state();
        if !state.matches(name) {
            return Ok(None);
        }
        let has_adapters = state.num_adapters() > 0;
        match state.layers.get_mut(name) {
            Some(layer) => {
                if (layer.in_dim, layer.out_dim) != (in_dim, out_dim) {
                    return Err(LoraError::LayerShape {
                        name: name.to_string(),
                        in_dim,
                        out_dim,
                        group_in: layer.in_dim,
                        group_out: layer.out_dim,
                    });
                }
                if layer.device != device {
                    layer.device = device;
                    for pair in layer.adapters.iter_mut().chain(layer.teacher.iter_mut()) {
                        let requires_grad = pair.a.requires_grad();
                        pair.a = pair.a.detach().to_device(device).set_requires_grad(requires_grad);
                        pair.b = pair.b.detach().to_device(device).set_requires_grad(requires_grad);
                    }
                }
                layer.bound = true;
            }
            None if has_adapters => return Err(LoraError::UnknownLayer(name.to_string())),
            None => {
                let layer = Layer { in_dim, out_dim, device, bound: true, adapters: Vec::new(), teacher: None };
                state.layers.insert(name.to_string(), layer);
            }
        }
        state.slots.push(name.to_string());
        Ok(Some(state.slots.len() - 1))
    }

    /// Fails when the group holds layers no model layer registered (a group loaded for another
    /// model). Model constructors call it after building every layer.
    pub fn check_bound(&self) -> Result<(), LoraError> {
        let state = self.state();
        let unbound: Vec<&String> = state.layers.iter().filter(|(_, l)| !l.bound).map(|(n, _)| n).collect();
        match unbound.first() {
            Some(name) => Err(LoraError::Unbound { name: (*name).clone(), count: unbound.len() }),
            None => Ok(()),
        }
    }

    /// Adds pair `rank`-wide to every layer (A from `init` with a generator seeded by `seed`, in
    /// sorted layer order; B zero), with scale 1. It becomes the only trainable pair; a teacher
    /// of the previous pair is dropped. Returns the new adapter's index.
    pub fn add_adapter(&self, rank: i64, init: LoraInit, seed: u64) -> Result<usize, LoraError> {
        if rank <= 0 {
            return Err(LoraError::Rank(rank));
        }
        let mut state = self.state();
        if state.layers.is_empty() {
            return Err(LoraError::NoLayers(state.targets.clone()));
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        for layer in state.layers.values_mut() {
            let n = (rank * layer.in_dim) as usize;
            let values: Vec<f32> = match init {
                LoraInit::KaimingUniform => {
                    let bound = 1.0 / (layer.in_dim as f64).sqrt();
                    (0..n).map(|_| (bound * (2.0 * rng.random::<f64>() - 1.0)) as f32).collect()
                }
                LoraInit::Normal => {
                    let sigma = 1.0 / rank as f64;
                    (0..n).map(|_| (sigma * standard_normal(&mut rng)) as f32).collect()
                }
            };
            let a = Tensor::from_slice(&values).view([rank, layer.in_dim]).to_device(layer.device);
            let b = Tensor::zeros([layer.out_dim, rank], (Kind::Float, layer.device));
            layer.adapters.push(Pair { a, b });
            layer.teacher = None;
        }
        state.scales.push(1.0);
        state.use_teacher = false;
        state.refresh_trainable();
        Ok(state.num_adapters() - 1)
    }

    pub fn set_scale(&self, index: usize, scale: f64) -> Result<(), LoraError> {
        let mut state = self.state();
        let count = state.num_adapters();
        match state.scales.get_mut(index) {
            Some(s) => {
                *s = scale;
                Ok(())
            }
            None => Err(LoraError::NoAdapter { index, count }),
        }
    }

    /// The newest adapter's `A` and `B` of every layer (sorted by layer name, A before B): the
    /// parameters to hand to the optimizer. They share storage and gradients with the group's.
    pub fn trainable_tensors(&self) -> Vec<Tensor> {
        self.trainable_named_tensors().into_iter().map(|(_, t)| t).collect()
    }

    /// [`Self::trainable_tensors`] with their file names (`<layer>.lora_A.<i>.weight`, ...).
    pub fn trainable_named_tensors(&self) -> Vec<(String, Tensor)> {
        let state = self.state();
        let Some(newest) = state.num_adapters().checked_sub(1) else {
            return Vec::new();
        };
        state
            .layers
            .iter()
            .flat_map(|(name, l)| {
                let pair = &l.adapters[newest];
                [
                    (format!("{name}.lora_A.{newest}.weight"), pair.a.shallow_clone()),
                    (format!("{name}.lora_B.{newest}.weight"), pair.b.shallow_clone()),
                ]
            })
            .collect()
    }

    /// `(name, tensor)` of every adapter tensor, teacher and scales, as written by [`Self::save`].
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let state = self.state();
        let mut named = Vec::new();
        for (name, layer) in &state.layers {
            for (i, pair) in layer.adapters.iter().enumerate() {
                named.push((format!("{name}.lora_A.{i}.weight"), pair.a.detach()));
                named.push((format!("{name}.lora_B.{i}.weight"), pair.b.detach()));
            }
            if let Some(teacher) = &layer.teacher {
                named.push((format!("{name}.lora_A.teacher.weight"), teacher.a.detach()));
                named.push((format!("{name}.lora_B.teacher.weight"), teacher.b.detach()));
            }
        }
        named.push((SCALES_NAME.to_string(), Tensor::from_slice(&state.scales)));
        named
    }

    /// Writes the adapters, the scales and the teacher (if any) to a safetensors file.
    pub fn save(&self, path: &Path) -> Result<(), LoraError> {
        let named: Vec<(String, Tensor)> =
            self.named_tensors().into_iter().map(|(n, t)| (n, t.to_device(Device::Cpu).contiguous())).collect();
        Tensor::write_safetensors(&named, path)
            .map_err(|e| LoraError::File { path: path.to_path_buf(), reason: e.to_string() })
    }

    /// Replaces the group's adapters, scales and teacher with those of a file written by
    /// [`Self::save`]. A group bound to a model must get exactly its layers, shapes included; an
    /// empty group takes the file's layers (they must match the targets) and binds them later.
    pub fn load(&self, path: &Path) -> Result<(), LoraError> {
        let tensors: BTreeMap<String, Tensor> = Tensor::read_safetensors(path)
            .map_err(|e| LoraError::File { path: path.to_path_buf(), reason: e.to_string() })?
            .into_iter()
            .collect();
        self.load_tensors(&tensors, path)
    }

    /// [`Self::load`] of tensors named as [`Self::named_tensors`] names them, read from `path`
    /// (named in errors).
    pub fn load_tensors(&self, tensors: &BTreeMap<String, Tensor>, path: &Path) -> Result<(), LoraError> {
        let file_err = |reason: String| LoraError::File { path: path.to_path_buf(), reason };
        let scales_tensor = tensors.get(SCALES_NAME).ok_or_else(|| file_err(format!("no `{SCALES_NAME}` tensor")))?;
        let scales: Vec<f64> = Vec::<f64>::try_from(&scales_tensor.to_kind(Kind::Double).flatten(0, -1))
            .map_err(|e| file_err(e.to_string()))?;
        let count = scales.len();

        let mut parsed: BTreeMap<String, FileLayer> = BTreeMap::new();
        for (key, tensor) in tensors {
            if key == SCALES_NAME {
                continue;
            }
            let (layer, slot) =
                parse_adapter_name(key).ok_or_else(|| file_err(format!("unexpected tensor `{key}`")))?;
            let entry = parsed.entry(layer.to_string()).or_insert_with(|| FileLayer::new(count));
            let target = match slot {
                Slot::A(i) if i < count => &mut entry.a[i],
                Slot::B(i) if i < count => &mut entry.b[i],
                Slot::TeacherA => &mut entry.teacher_a,
                Slot::TeacherB => &mut entry.teacher_b,
                Slot::A(i) | Slot::B(i) => {
                    return Err(file_err(format!("`{key}`: adapter {i} beyond the {count} scales")));
                }
            };
            *target = Some(tensor.to_kind(Kind::Float));
        }

        let mut state = self.state();
        for name in parsed.keys() {
            if !state.matches(name) {
                return Err(file_err(format!("layer `{name}` is not among the targets {:?}", state.targets)));
            }
        }
        if !state.layers.is_empty() && count > 0 {
            if let Some(missing) = state.layers.keys().find(|n| !parsed.contains_key(*n)) {
                return Err(file_err(format!("no adapters for layer `{missing}`")));
            }
            if let Some(extra) = parsed.keys().find(|n| !state.layers.contains_key(*n)) {
                return Err(file_err(format!("layer `{extra}` is not in the model")));
            }
        }

        let mut layers = BTreeMap::new();
        let mut any_teacher = None;
        for (name, FileLayer { a: a_list, b: b_list, teacher_a, teacher_b }) in parsed {
            let mut adapters = Vec::with_capacity(count);
            let mut dims: Option<(i64, i64)> = None;
            for (i, (a, b)) in a_list.into_iter().zip(b_list).enumerate() {
                let (a, b) = match (a, b) {
                    (Some(a), Some(b)) => (a, b),
                    _ => return Err(file_err(format!("layer `{name}`: adapter {i} lacks lora_A or lora_B"))),
                };
                let pair_dims = pair_dims(&a, &b).ok_or_else(|| {
                    file_err(format!(
                        "layer `{name}` adapter {i}: A {:?} and B {:?} are not [r, in] and [out, r]",
                        a.size(),
                        b.size()
                    ))
                })?;
                if dims.is_some_and(|d| d != pair_dims) {
                    return Err(file_err(format!("layer `{name}`: adapters of different shapes")));
                }
                dims = Some(pair_dims);
                adapters.push(Pair { a, b });
            }
            let teacher = match (teacher_a, teacher_b) {
                (Some(a), Some(b)) => {
                    let newest =
                        adapters.last().ok_or_else(|| file_err(format!("layer `{name}`: teacher without adapters")))?;
                    if a.size() != newest.a.size() || b.size() != newest.b.size() {
                        return Err(file_err(format!("layer `{name}`: teacher shape differs from the newest adapter")));
                    }
                    Some(Pair { a, b })
                }
                (None, None) => None,
                _ => return Err(file_err(format!("layer `{name}`: teacher lacks lora_A or lora_B"))),
            };
            if any_teacher.is_some_and(|t| t != teacher.is_some()) {
                return Err(file_err("the teacher covers only some layers".to_string()));
            }
            any_teacher = Some(teacher.is_some());
            let (in_dim, out_dim) = dims.ok_or_else(|| file_err(format!("layer `{name}` has no adapters")))?;
            let (device, bound) = match state.layers.get(&name) {
                Some(existing) => {
                    if (existing.in_dim, existing.out_dim) != (in_dim, out_dim) {
                        return Err(LoraError::LayerShape {
                            name,
                            in_dim,
                            out_dim,
                            group_in: existing.in_dim,
                            group_out: existing.out_dim,
                        });
                    }
                    (existing.device, existing.bound)
                }
                None => (Device::Cpu, false),
            };
            let to_device = |p: Pair| Pair { a: p.a.to_device(device), b: p.b.to_device(device) };
            let layer = Layer {
                in_dim,
                out_dim,
                device,
                bound,
                adapters: adapters.into_iter().map(to_device).collect(),
                teacher: teacher.map(to_device),
            };
            layers.insert(name, layer);
        }
        if count > 0 {
            state.layers = layers;
        } else {
            for layer in state.layers.values_mut() {
                layer.adapters.clear();
                layer.teacher = None;
            }
        }
        state.scales = scales;
        state.use_teacher = false;
        state.refresh_trainable();
        Ok(())
    }

    /// `sum_i s_i B_i A_i` of one layer, `[out, in]` (the student's pairs; no graph).
    pub fn effective_delta(&self, layer: &str) -> Result<Tensor, LoraError> {
        let state = self.state();
        let entry = state.layers.get(layer).ok_or_else(|| LoraError::NoLayer(layer.to_string()))?;
        Ok(tch::no_grad(|| {
            let zero = Tensor::zeros([entry.out_dim, entry.in_dim], (Kind::Float, entry.device));
            entry.adapters.iter().zip(&state.scales).fold(zero, |acc, (pair, s)| acc + pair.delta() * *s)
        }))
    }

    /// Teacher := copy of the newest adapter (RID, Eq. 6). The teacher never requires grad.
    pub fn init_teacher(&self) -> Result<(), LoraError> {
        let mut state = self.state();
        if state.num_adapters() == 0 {
            return Err(LoraError::NoAdapter { index: 0, count: 0 });
        }
        for layer in state.layers.values_mut() {
            layer.teacher = layer.adapters.last().map(Pair::detached_copy);
        }
        Ok(())
    }

    /// `teacher <- m teacher + (1 - m) student` for the newest adapter, without graph.
    pub fn ema_update(&self, momentum: f64) -> Result<(), LoraError> {
        if !(0.0..=1.0).contains(&momentum) {
            return Err(LoraError::Momentum(momentum));
        }
        let mut state = self.state();
        tch::no_grad(|| {
            for layer in state.layers.values_mut() {
                let (Some(student), Some(teacher)) = (layer.adapters.last(), layer.teacher.as_mut()) else {
                    return Err(LoraError::NoTeacher);
                };
                let a = &teacher.a * momentum + student.a.detach() * (1.0 - momentum);
                let b = &teacher.b * momentum + student.b.detach() * (1.0 - momentum);
                teacher.a.copy_(&a);
                teacher.b.copy_(&b);
            }
            Ok(())
        })
    }

    /// While on, forward passes use the teacher's copy of the newest adapter.
    pub fn set_use_teacher(&self, on: bool) -> Result<(), LoraError> {
        let mut state = self.state();
        if on && state.layers.values().any(|l| l.teacher.is_none()) {
            return Err(LoraError::NoTeacher);
        }
        state.use_teacher = on;
        Ok(())
    }

    pub fn use_teacher(&self) -> bool {
        self.state().use_teacher
    }

    /// A new unbound group holding every adapter of each member, its scale multiplied by the
    /// member's coefficient (copies: the members stay independent). Members must adapt the same
    /// layers with the same shapes; teachers are not carried over.
    pub fn soup(members: &[(&LoraGroup, f64)]) -> Result<LoraGroup, LoraError> {
        let (first, _) = members.first().ok_or_else(|| LoraError::Soup("no member groups".to_string()))?;
        // Copy what is needed of the first member and release it: a group may be listed twice.
        let (targets, mut layers) = {
            let first = first.state();
            let layers: BTreeMap<String, Layer> = first
                .layers
                .iter()
                .map(|(name, l)| {
                    let layer = Layer {
                        in_dim: l.in_dim,
                        out_dim: l.out_dim,
                        device: l.device,
                        bound: false,
                        adapters: Vec::new(),
                        teacher: None,
                    };
                    (name.clone(), layer)
                })
                .collect();
            (first.targets.clone(), layers)
        };
        let mut scales = Vec::new();
        for (k, (member, coefficient)) in members.iter().enumerate() {
            let member = member.state();
            let same_layers = member.layers.len() == layers.len()
                && member
                    .layers
                    .iter()
                    .all(|(n, l)| layers.get(n).is_some_and(|m| (m.in_dim, m.out_dim) == (l.in_dim, l.out_dim)));
            if !same_layers {
                return Err(LoraError::Soup(format!("member {k} adapts other layers than member 0")));
            }
            for (name, layer) in &member.layers {
                let target = layers.get_mut(name).ok_or_else(|| LoraError::NoLayer(name.clone()))?;
                let device = target.device;
                target.adapters.extend(layer.adapters.iter().map(|p| {
                    let copy = p.detached_copy();
                    Pair { a: copy.a.to_device(device), b: copy.b.to_device(device) }
                }));
            }
            scales.extend(member.scales.iter().map(|s| s * coefficient));
        }
        let mut state = State { targets, layers, slots: Vec::new(), scales, use_teacher: false };
        state.refresh_trainable();
        Ok(LoraGroup(Arc::new(Mutex::new(state))))
    }

    /// `sum_i s_i B_i (A_i x)` for the layer in `slot`, `None` when the group adds nothing.
    ///
    /// The adapters are fp32 whatever the model's precision. When `x` is half precision (the
    /// frozen layer's dtype), `A` and `B` are cast to it for this call: the two small matmuls
    /// run at the layer's precision and the result adds to `W x` without a cast, while the
    /// gradient flows back through the casts into the fp32 tensors. (Casting `x` to fp32
    /// instead would keep an fp32 copy of every adapted layer's input for the backward pass.)
    fn delta(&self, slot: usize, xs: &Tensor) -> Option<Tensor> {
        let state = self.state();
        let layer = &state.layers[&state.slots[slot]];
        let newest = layer.adapters.len().checked_sub(1)?;
        let mut total: Option<Tensor> = None;
        for (i, (pair, &scale)) in layer.adapters.iter().zip(&state.scales).enumerate() {
            if scale == 0.0 {
                continue;
            }
            let pair = match (&layer.teacher, state.use_teacher && i == newest) {
                (Some(teacher), true) => teacher,
                _ => pair,
            };
            let (a, b) = if xs.kind() == pair.a.kind() {
                (pair.a.shallow_clone(), pair.b.shallow_clone())
            } else {
                (pair.a.to_kind(xs.kind()), pair.b.to_kind(xs.kind()))
            };
            let down = xs.linear(&a, None::<Tensor>);
            let down = if scale == 1.0 { down } else { down * scale };
            let term = down.linear(&b, None::<Tensor>);
            total = Some(match total {
                Some(t) => t + term,
                None => term,
            });
        }
        total
    }
}

/// The tensors of one layer found in an adapter file, by slot.
struct FileLayer {
    a: Vec<Option<Tensor>>,
    b: Vec<Option<Tensor>>,
    teacher_a: Option<Tensor>,
    teacher_b: Option<Tensor>,
}

impl FileLayer {
    fn new(count: usize) -> Self {
        Self {
            a: (0..count).map(|_| None).collect(),
            b: (0..count).map(|_| None).collect(),
            teacher_a: None,
            teacher_b: None,
        }
    }
}

enum Slot {
    A(usize),
    B(usize),
    TeacherA,
    TeacherB,
}

/// Splits `<layer>.lora_{A,B}.<i|teacher>.weight` into the layer name and the slot.
fn parse_adapter_name(key: &str) -> Option<(&str, Slot)> {
    let rest = key.strip_suffix(".weight")?;
    let (rest, index) = rest.rsplit_once('.')?;
    let (layer, which) = rest.rsplit_once('.')?;
    let slot = match (which, index) {
        ("lora_A", "teacher") => Slot::TeacherA,
        ("lora_B", "teacher") => Slot::TeacherB,
        ("lora_A", i) => Slot::A(i.parse().ok()?),
        ("lora_B", i) => Slot::B(i.parse().ok()?),
        _ => return None,
    };
    Some((layer, slot))
}

/// `(in, out)` when `a` is `[r, in]` and `b` is `[out, r]`.
fn pair_dims(a: &Tensor, b: &Tensor) -> Option<(i64, i64)> {
    match (a.size().as_slice(), b.size().as_slice()) {
        (&[r, in_dim], &[out_dim, r2]) if r == r2 && r > 0 => Some((in_dim, out_dim)),
        _ => None,
    }
}

/// Box-Muller: one standard normal from two uniforms.
fn standard_normal(rng: &mut impl Rng) -> f64 {
    let u1 = 1.0 - rng.random::<f64>();
    let u2 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A `torch.nn.Linear` (weights `weight [out, in]`, `bias [out]`) that an adapter group may adapt.
#[derive(Debug)]
pub struct Linear {
    base: nn::Linear,
    adapter: Option<(LoraGroup, usize)>,
}

/// Creates the linear layer at `path` and registers it with `lora` (if it is a target there).
pub fn linear(
    path: nn::Path,
    in_dim: i64,
    out_dim: i64,
    bias: bool,
    lora: Option<&LoraGroup>,
) -> Result<Linear, LoraError> {
    let base = nn::linear(&path, in_dim, out_dim, nn::LinearConfig { bias, ..Default::default() });
    let adapter = match lora {
        Some(group) => {
            let name = path.components().collect::<Vec<_>>().join(".");
            group.register(&name, in_dim, out_dim, path.device())?.map(|slot| (group.clone(), slot))
        }
        None => None,
    };
    Ok(Linear { base, adapter })
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let out = self.base.forward(xs);
        match self.adapter.as_ref().and_then(|(group, slot)| group.delta(*slot, xs)) {
            Some(delta) => out + delta,
            None => out,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy "model": three linear layers, two of which are targets.
    struct Toy {
        _vs: nn::VarStore,
        q: Linear,
        out: Linear,
        ff: Linear,
    }

    impl Toy {
        /// Base weights are a fixed function of `seed` (tests run in parallel and share torch's
        /// generator, so equal bases must not come from it).
        fn new(group: &LoraGroup, seed: i64) -> Toy {
            let vs = nn::VarStore::new(Device::Cpu);
            let root = vs.root();
            let q = linear(&root / "blk" / "attn1" / "to_q", 6, 5, false, Some(group)).unwrap();
            let out = linear(&root / "blk" / "attn1" / "to_out" / 0, 5, 6, true, Some(group)).unwrap();
            let ff = linear(&root / "blk" / "ff", 6, 6, true, Some(group)).unwrap();
            group.check_bound().unwrap();
            tch::no_grad(|| {
                let sorted: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
                for (i, (_, mut var)) in sorted.into_iter().enumerate() {
                    let n = var.numel() as i64;
                    let values =
                        (Tensor::arange(n, (Kind::Float, Device::Cpu)) * 0.37 + (seed + i as i64) as f64).sin() * 0.5;
                    var.copy_(&values.view(var.size().as_slice()));
                }
            });
            Toy { _vs: vs, q, out, ff }
        }

        fn forward(&self, xs: &Tensor) -> Tensor {
            self.ff.forward(&self.out.forward(&self.q.forward(xs)))
        }
    }

    /// Fills every B with random values drawn after seeding torch with `seed`.
    fn randomise_b(group: &LoraGroup, seed: i64) {
        tch::manual_seed(seed);
        let state = group.state();
        tch::no_grad(|| {
            for layer in state.layers.values() {
                for pair in &layer.adapters {
                    let mut b = pair.b.shallow_clone();
                    b.copy_(&(Tensor::randn(b.size(), (Kind::Float, Device::Cpu)) * 0.3));
                }
            }
        });
    }

    fn input() -> Tensor {
        Tensor::randn([3, 6], (Kind::Float, Device::Cpu))
    }

    #[test]
    fn only_targets_are_adapted() {
        let group = LoraGroup::new(default_targets());
        let _toy = Toy::new(&group, 0);
        assert_eq!(group.layer_names(), vec!["blk.attn1.to_out.0", "blk.attn1.to_q"]);
    }

    #[test]
    fn only_the_newest_adapter_is_trainable() {
        let group = LoraGroup::new(default_targets());
        let _toy = Toy::new(&group, 0);
        group.add_adapter(4, LoraInit::KaimingUniform, 1).unwrap();
        group.add_adapter(2, LoraInit::Normal, 2).unwrap();
        let state = group.state();
        for layer in state.layers.values() {
            assert!(!layer.adapters[0].a.requires_grad() && !layer.adapters[0].b.requires_grad());
            assert!(layer.adapters[1].a.requires_grad() && layer.adapters[1].b.requires_grad());
        }
        drop(state);
        let trainable = group.trainable_tensors();
        assert_eq!(trainable.len(), 4);
        assert!(trainable.iter().all(|t| t.requires_grad() && (t.size()[0] == 2 || t.size()[1] == 2)));
    }

    #[test]
    fn zero_b_leaves_the_output_unchanged() {
        let group = LoraGroup::new(default_targets());
        let toy = Toy::new(&group, 0);
        let xs = input();
        let before = toy.forward(&xs);
        group.add_adapter(4, LoraInit::KaimingUniform, 7).unwrap();
        assert!(toy.forward(&xs).equal(&before));
        randomise_b(&group, 101);
        assert!(toy.forward(&xs).abs_diff(&before) > 1e-3);
    }

    trait AbsDiff {
        fn abs_diff(&self, other: &Tensor) -> f64;
    }

    impl AbsDiff for Tensor {
        fn abs_diff(&self, other: &Tensor) -> f64 {
            (self - other).abs().max().double_value(&[])
        }
    }

    #[test]
    fn init_is_deterministic_and_scaled() {
        let make = |init, seed| {
            let group = LoraGroup::new(default_targets());
            let _toy = Toy::new(&group, 0);
            group.add_adapter(4, init, seed).unwrap();
            group.trainable_tensors()[0].copy()
        };
        let a = make(LoraInit::KaimingUniform, 3);
        assert!(a.equal(&make(LoraInit::KaimingUniform, 3)));
        assert!(!a.equal(&make(LoraInit::KaimingUniform, 4)));
        // Layer `blk.attn1.to_out.0` (in = 5) comes first in sorted order.
        assert!(a.abs().max().double_value(&[]) <= 1.0 / 5f64.sqrt());
        let normal = make(LoraInit::Normal, 3);
        assert!(normal.abs().max().double_value(&[]) > 1.0 / 5f64.sqrt() * 0.1);
    }

    #[test]
    fn save_and_load_round_trip_bitwise() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("lora.safetensors");
        let group = LoraGroup::new(default_targets());
        let toy = Toy::new(&group, 0);
        group.add_adapter(4, LoraInit::KaimingUniform, 1).unwrap();
        group.add_adapter(3, LoraInit::Normal, 2).unwrap();
        randomise_b(&group, 102);
        group.set_scale(0, 0.25).unwrap();
        group.init_teacher().unwrap();
        group.save(&file).unwrap();

        let loaded = LoraGroup::new(default_targets());
        loaded.load(&file).unwrap();
        let toy2 = Toy::new(&loaded, 0);
        assert_eq!(loaded.scales(), vec![0.25, 1.0]);
        let (saved, restored) = (group.named_tensors(), loaded.named_tensors());
        assert_eq!(saved.len(), restored.len());
        for ((n1, t1), (n2, t2)) in saved.iter().zip(&restored) {
            assert_eq!(n1, n2);
            assert!(t1.equal(t2), "{n1} differs");
        }
        let xs = input();
        assert!(toy.forward(&xs).equal(&toy2.forward(&xs)));
        assert_eq!(loaded.trainable_tensors().iter().filter(|t| t.requires_grad()).count(), 4);

        // Loading into a group bound to a model replaces its adapters in place.
        let bound = LoraGroup::new(default_targets());
        let toy3 = Toy::new(&bound, 0);
        bound.load(&file).unwrap();
        assert!(toy.forward(&xs).equal(&toy3.forward(&xs)));
    }

    #[test]
    fn mismatched_models_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("lora.safetensors");
        let group = LoraGroup::new(default_targets());
        let _toy = Toy::new(&group, 0);
        group.add_adapter(4, LoraInit::KaimingUniform, 1).unwrap();
        group.save(&file).unwrap();

        let loaded = LoraGroup::new(default_targets());
        loaded.load(&file).unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let err = linear(&vs.root() / "blk" / "attn1" / "to_q", 7, 5, false, Some(&loaded)).unwrap_err();
        assert!(matches!(err, LoraError::LayerShape { .. }), "{err}");
        assert!(matches!(loaded.check_bound(), Err(LoraError::Unbound { .. })));
        let err = linear(&vs.root() / "other" / "to_k", 6, 5, false, Some(&loaded)).unwrap_err();
        assert!(matches!(err, LoraError::UnknownLayer(_)), "{err}");
    }

    #[test]
    fn ema_follows_the_formula() {
        let group = LoraGroup::new(default_targets());
        let _toy = Toy::new(&group, 0);
        group.add_adapter(4, LoraInit::KaimingUniform, 1).unwrap();
        assert!(matches!(group.ema_update(0.9), Err(LoraError::NoTeacher)));
        group.init_teacher().unwrap();
        let teacher_before: Vec<Tensor> = teacher_tensors(&group);
        randomise_b(&group, 103);
        let student = group.trainable_tensors();
        group.ema_update(0.9).unwrap();
        let teacher_after = teacher_tensors(&group);
        for ((old, new), s) in teacher_before.iter().zip(&teacher_after).zip(&student) {
            let expected = old * 0.9 + s.detach() * 0.1;
            assert!(new.abs_diff(&expected) < 1e-7);
            assert!(!new.requires_grad());
        }
        // B was zero in the teacher and random in the student: the update moved it.
        assert!(teacher_after[1].abs().max().double_value(&[]) > 0.0);
    }

    fn teacher_tensors(group: &LoraGroup) -> Vec<Tensor> {
        let state = group.state();
        state
            .layers
            .values()
            .flat_map(|l| {
                let t = l.teacher.as_ref().unwrap();
                [t.a.copy(), t.b.copy()]
            })
            .collect()
    }

    #[test]
    fn teacher_switch_changes_output_only_when_teacher_differs() {
        let group = LoraGroup::new(default_targets());
        let toy = Toy::new(&group, 0);
        group.add_adapter(4, LoraInit::KaimingUniform, 1).unwrap();
        assert!(matches!(group.set_use_teacher(true), Err(LoraError::NoTeacher)));
        randomise_b(&group, 104);
        group.init_teacher().unwrap();
        let xs = input();
        let student = toy.forward(&xs);
        group.set_use_teacher(true).unwrap();
        assert!(toy.forward(&xs).equal(&student));
        group.set_use_teacher(false).unwrap();
        randomise_b(&group, 105);
        let student = toy.forward(&xs);
        group.set_use_teacher(true).unwrap();
        let teacher = toy.forward(&xs);
        assert!(teacher.abs_diff(&student) > 1e-3);
        group.set_use_teacher(false).unwrap();
        assert!(toy.forward(&xs).equal(&student));
    }

    #[test]
    fn soup_equals_the_merge_of_effective_weights() {
        let members: Vec<(LoraGroup, Toy)> = (0..3)
            .map(|k| {
                let group = LoraGroup::new(default_targets());
                let toy = Toy::new(&group, 0);
                group.add_adapter(4, LoraInit::KaimingUniform, k).unwrap();
                randomise_b(&group, 200 + k as i64);
                (group, toy)
            })
            .collect();
        members[2].0.add_adapter(2, LoraInit::Normal, 9).unwrap();
        randomise_b(&members[2].0, 107);
        members[2].0.set_scale(0, 0.5).unwrap();
        let coefficients = [0.2, 0.3, 0.5];
        let pairs: Vec<(&LoraGroup, f64)> = members.iter().map(|(g, _)| g).zip(coefficients).collect();
        let soup = LoraGroup::soup(&pairs).unwrap();
        assert_eq!(soup.num_adapters(), 4);
        let toy = Toy::new(&soup, 0);

        for name in soup.layer_names() {
            let merged = members
                .iter()
                .zip(coefficients)
                .fold(Tensor::zeros([1], (Kind::Float, Device::Cpu)), |acc, ((g, _), c)| {
                    acc + g.effective_delta(&name).unwrap() * c
                });
            assert!(soup.effective_delta(&name).unwrap().abs_diff(&merged) < 1e-6);
        }
        // The souped model equals a plain model with merged weights W + sum_k c_k dW_k.
        let xs = input();
        let merged = |layer: &Linear, name: &str, x: &Tensor| {
            let delta = members
                .iter()
                .zip(coefficients)
                .fold(Tensor::zeros([1], (Kind::Float, Device::Cpu)), |acc, ((g, _), c)| {
                    acc + g.effective_delta(name).unwrap() * c
                });
            x.linear(&(&layer.base.ws + delta), layer.base.bs.as_ref())
        };
        let hidden = merged(&toy.q, "blk.attn1.to_q", &xs);
        let hidden = merged(&toy.out, "blk.attn1.to_out.0", &hidden);
        let expected = toy.ff.forward(&hidden);
        assert!(tch::no_grad(|| toy.forward(&xs)).abs_diff(&expected) < 1e-5);
        // Averaging A and B separately is a different model.
        let halves = [(&members[0].0, 0.5), (&members[1].0, 0.5)];
        let mean = |i: usize| &halves[0].0.trainable_tensors()[i] * 0.5 + &halves[1].0.trainable_tensors()[i] * 0.5;
        let naive = tch::no_grad(|| mean(1).mm(&mean(0)));
        let souped = LoraGroup::soup(&halves).unwrap();
        assert!(naive.abs_diff(&souped.effective_delta("blk.attn1.to_out.0").unwrap()) > 1e-4);
    }
}
