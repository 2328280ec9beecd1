//! A safe reader for PyTorch zip-pickle checkpoints: tensors only, no code.
//!
//! `torch.save` (PyTorch >= 1.6) writes a zip archive `<archive>/data.pkl` + one entry
//! `<archive>/data/<key>` per storage. The pickle is interpreted here by a small virtual machine
//! that knows only the opcodes `torch.save` emits and only a fixed allow-list of globals
//! (`collections.OrderedDict`, the tensor/parameter rebuild functions, the storage types);
//! any other global is refused before anything is built, so nothing in the file can run code.
//! Every length and size read from the file is checked before it is used.
use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use tch::{Kind, Tensor};

use super::weights::TensorMap;

#[derive(Debug, thiserror::Error)]
pub enum PickleError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(
        "not a zip archive: legacy (pre-1.6, non-zip) torch.save files are not supported; \
         re-save it with a recent PyTorch or convert it to safetensors"
    )]
    LegacyFormat,
    #[error("not a PyTorch checkpoint (neither a zip archive nor a legacy pickle)")]
    NotACheckpoint,
    #[error("zip archive: {0}")]
    Zip(String),
    #[error("pickle, byte {pos}: {reason}")]
    Malformed { pos: usize, reason: String },
    #[error("pickle, byte {pos}: unsupported opcode 0x{op:02x}")]
    Opcode { pos: usize, op: u8 },
    #[error("refused global `{module}.{name}`: only tensors and state dicts are read from pickles")]
    ForbiddenGlobal { module: String, name: String },
    #[error("storage `{key}`: {reason}")]
    Storage { key: String, reason: String },
    #[error("tensor `{name}`: {reason}")]
    Tensor { name: String, reason: String },
    #[error("not a state dict: {0}")]
    NotStateDict(String),
}

type Id = usize;

/// The callables a checkpoint may name.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    RebuildParameterWithState,
    StorageType(Kind),
}

impl Global {
    fn resolve(module: &str, name: &str) -> Option<Self> {
        let storage = |kind| Some(Global::StorageType(kind));
        match (module, name) {
            ("collections", "OrderedDict") => Some(Global::OrderedDict),
            ("torch._utils", "_rebuild_tensor_v2") => Some(Global::RebuildTensorV2),
            ("torch._utils", "_rebuild_parameter") => Some(Global::RebuildParameter),
            ("torch._utils", "_rebuild_parameter_with_state") => Some(Global::RebuildParameterWithState),
            ("torch", "FloatStorage") => storage(Kind::Float),
            ("torch", "HalfStorage") => storage(Kind::Half),
            ("torch", "BFloat16Storage") => storage(Kind::BFloat16),
            ("torch", "DoubleStorage") => storage(Kind::Double),
            ("torch", "LongStorage") => storage(Kind::Int64),
            ("torch", "IntStorage") => storage(Kind::Int),
            ("torch", "ShortStorage") => storage(Kind::Int16),
            ("torch", "CharStorage") => storage(Kind::Int8),
            ("torch", "ByteStorage") => storage(Kind::Uint8),
            ("torch", "BoolStorage") => storage(Kind::Bool),
            _ => None,
        }
    }
}

/// A tensor as the pickle describes it; its data is read from the archive only when needed.
#[derive(Debug, Clone)]
struct TensorRef {
    kind: Kind,
    key: String,
    storage_numel: i64,
    offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
}

#[derive(Debug, Clone)]
enum Obj {
    None,
    Bool(bool),
    Int(i64),
    // Floats and bytes occur in metadata only; their values are never needed.
    Float,
    Str(String),
    Bytes,
    Tuple(Vec<Id>),
    List(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    Global(Global),
    Storage { kind: Kind, key: String, numel: i64 },
    Tensor(TensorRef),
}

impl Obj {
    fn type_name(&self) -> &'static str {
        match self {
            Obj::None => "None",
            Obj::Bool(_) => "bool",
            Obj::Int(_) => "int",
            Obj::Float => "float",
            Obj::Str(_) => "str",
            Obj::Bytes => "bytes",
            Obj::Tuple(_) => "tuple",
            Obj::List(_) => "list",
            Obj::Dict(_) => "dict",
            Obj::Global(_) => "global",
            Obj::Storage { .. } => "storage",
            Obj::Tensor(_) => "tensor",
        }
    }
}

/// The unpickled object graph: every object lives in `objects`, containers refer to ids, so a
/// memoised object fetched twice is the same object (as in Python).
struct Unpickled {
    objects: Vec<Obj>,
    root: Id,
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    objects: Vec<Obj>,
    stack: Vec<Id>,
    marks: Vec<usize>,
    memo: HashMap<u64, Id>,
    /// Position of each key in its dict, so that filling a dict of n entries costs O(n) (a
    /// crafted file with millions of entries must not take hours).
    dict_index: HashMap<(Id, DictKey), usize>,
}

/// Dict keys as Python compares them here: str and int by value, anything else by identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum DictKey {
    Str(String),
    Int(i64),
    Object(Id),
}

impl<'a> Machine<'a> {
    fn err<T>(&self, reason: impl Into<String>) -> Result<T, PickleError> {
        Err(PickleError::Malformed { pos: self.pos, reason: reason.into() })
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        if n > self.data.len() - self.pos {
            return self.err(format!("needs {n} bytes, {} left (truncated file?)", self.data.len() - self.pos));
        }
        let bytes = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(bytes)
    }

    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }

    fn le_uint(&mut self, n: usize) -> Result<u64, PickleError> {
        let bytes = self.take(n)?;
        Ok(bytes.iter().rev().fold(0u64, |acc, &b| (acc << 8) | b as u64))
    }

    fn line(&mut self) -> Result<String, PickleError> {
        let rest = &self.data[self.pos..];
        let Some(end) = rest.iter().take(256).position(|&b| b == b'\n') else {
            return self.err("unterminated or over-long global name");
        };
        let text = std::str::from_utf8(&rest[..end]).map_err(|_| PickleError::Malformed {
            pos: self.pos,
            reason: "global name is not UTF-8".into(),
        })?;
        self.pos += end + 1;
        Ok(text.to_string())
    }

    fn string(&mut self, n: u64) -> Result<String, PickleError> {
        let n = usize::try_from(n).or_else(|_| self.err("string length overflows"))?;
        let bytes = self.take(n)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_string()),
            Err(_) => self.err("string is not UTF-8"),
        }
    }

    fn new_obj(&mut self, obj: Obj) -> Id {
        self.objects.push(obj);
        self.objects.len() - 1
    }

    fn push(&mut self, obj: Obj) {
        let id = self.new_obj(obj);
        self.stack.push(id);
    }

    fn pop(&mut self) -> Result<Id, PickleError> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return self.err("stack underflow (pop past a mark)");
        }
        match self.stack.pop() {
            Some(id) => Ok(id),
            None => self.err("stack underflow"),
        }
    }

    fn top(&self) -> Result<Id, PickleError> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return self.err("stack underflow (no object above the mark)");
        }
        match self.stack.last() {
            Some(&id) => Ok(id),
            None => self.err("stack underflow"),
        }
    }

    fn pop_mark(&mut self) -> Result<Vec<Id>, PickleError> {
        let Some(mark) = self.marks.pop() else {
            return self.err("no mark on the stack");
        };
        Ok(self.stack.split_off(mark))
    }

    fn memo_put(&mut self, key: u64) -> Result<(), PickleError> {
        let id = self.top()?;
        self.memo.insert(key, id);
        Ok(())
    }

    fn memo_get(&mut self, key: u64) -> Result<(), PickleError> {
        match self.memo.get(&key) {
            Some(&id) => {
                self.stack.push(id);
                Ok(())
            }
            None => self.err(format!("memo key {key} not found")),
        }
    }

    fn int_of(&self, id: Id, what: &str) -> Result<i64, PickleError> {
        match &self.objects[id] {
            Obj::Int(v) => Ok(*v),
            Obj::Bool(b) => Ok(*b as i64),
            other => self.err(format!("{what}: expected an int, found {}", other.type_name())),
        }
    }

    fn ints_of(&self, id: Id, what: &str) -> Result<Vec<i64>, PickleError> {
        match &self.objects[id] {
            Obj::Tuple(items) | Obj::List(items) => items.iter().map(|&i| self.int_of(i, what)).collect(),
            other => self.err(format!("{what}: expected a tuple of ints, found {}", other.type_name())),
        }
    }

    fn str_of(&self, id: Id, what: &str) -> Result<String, PickleError> {
        match &self.objects[id] {
            Obj::Str(s) => Ok(s.clone()),
            other => self.err(format!("{what}: expected a str, found {}", other.type_name())),
        }
    }

    fn set_items(&mut self, dict: Id, items: &[Id]) -> Result<(), PickleError> {
        if !items.len().is_multiple_of(2) {
            return self.err("odd number of items for a dict");
        }
        if !matches!(self.objects[dict], Obj::Dict(_)) {
            return self.err(format!("SETITEM on a {}", self.objects[dict].type_name()));
        }
        for kv in items.chunks(2) {
            let (k, v) = (kv[0], kv[1]);
            let index_key = (dict, self.dict_key(k));
            let Obj::Dict(entries) = &mut self.objects[dict] else { continue };
            match self.dict_index.get(&index_key) {
                Some(&i) => entries[i].1 = v,
                None => {
                    self.dict_index.insert(index_key, entries.len());
                    entries.push((k, v));
                }
            }
        }
        Ok(())
    }

    fn dict_key(&self, id: Id) -> DictKey {
        match &self.objects[id] {
            Obj::Str(s) => DictKey::Str(s.clone()),
            Obj::Int(i) => DictKey::Int(*i),
            _ => DictKey::Object(id),
        }
    }

    fn append(&mut self, list: Id, items: Vec<Id>) -> Result<(), PickleError> {
        match &mut self.objects[list] {
            Obj::List(v) => {
                v.extend(items);
                Ok(())
            }
            other => {
                let name = other.type_name();
                self.err(format!("APPEND on a {name}"))
            }
        }
    }

    fn reduce(&mut self, callable: Id, args: Id) -> Result<Id, PickleError> {
        let Obj::Global(global) = self.objects[callable] else {
            return self.err(format!("REDUCE on a {}", self.objects[callable].type_name()));
        };
        let args = match &self.objects[args] {
            Obj::Tuple(items) => items.clone(),
            other => return self.err(format!("REDUCE arguments are a {}, not a tuple", other.type_name())),
        };
        match global {
            Global::OrderedDict => {
                if !args.is_empty() {
                    return self.err("OrderedDict called with arguments");
                }
                Ok(self.new_obj(Obj::Dict(Vec::new())))
            }
            Global::RebuildTensorV2 => {
                if !(6..=7).contains(&args.len()) {
                    return self.err(format!("_rebuild_tensor_v2 with {} arguments", args.len()));
                }
                let Obj::Storage { kind, key, numel } = self.objects[args[0]].clone() else {
                    return self.err("_rebuild_tensor_v2: first argument is not a storage");
                };
                let offset = self.int_of(args[1], "storage offset")?;
                let size = self.ints_of(args[2], "tensor size")?;
                let stride = self.ints_of(args[3], "tensor stride")?;
                let tensor = TensorRef { kind, key, storage_numel: numel, offset, size, stride };
                Ok(self.new_obj(Obj::Tensor(tensor)))
            }
            Global::RebuildParameter | Global::RebuildParameterWithState => {
                let expected = if global == Global::RebuildParameter { 3 } else { 4 };
                if args.len() != expected {
                    return self.err(format!("parameter rebuild with {} arguments", args.len()));
                }
                match self.objects[args[0]] {
                    Obj::Tensor(_) => Ok(args[0]),
                    ref other => self.err(format!("parameter data is a {}", other.type_name())),
                }
            }
            Global::StorageType(_) => self.err("a storage type cannot be called"),
        }
    }

    /// `('storage', StorageType, key, location, numel)`: the only persistent id torch.save writes.
    fn persistent_load(&mut self, pid: Id) -> Result<Id, PickleError> {
        let items = match &self.objects[pid] {
            Obj::Tuple(items) if items.len() == 5 => items.clone(),
            _ => return self.err("persistent id is not a 5-tuple ('storage', type, key, location, numel)"),
        };
        if self.str_of(items[0], "persistent id tag")? != "storage" {
            return self.err("persistent id is not a storage");
        }
        let Obj::Global(Global::StorageType(kind)) = self.objects[items[1]] else {
            return self.err("persistent id: second item is not a storage type");
        };
        let key = self.str_of(items[2], "storage key")?;
        let numel = self.int_of(items[4], "storage size")?;
        if numel < 0 {
            return self.err(format!("storage `{key}` has negative size {numel}"));
        }
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return self.err(format!("storage key `{key}` is not a plain name"));
        }
        Ok(self.new_obj(Obj::Storage { kind, key, numel }))
    }

    fn run(mut self) -> Result<Unpickled, PickleError> {
        loop {
            let op_pos = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        return self.err(format!("pickle protocol {proto}"));
                    }
                }
                0x95 => {
                    self.take(8)?; // FRAME: a length hint only
                }
                b'.' => {
                    let root = self.pop()?;
                    return Ok(Unpickled { objects: self.objects, root });
                }
                b'(' => self.marks.push(self.stack.len()),
                b'}' => self.push(Obj::Dict(Vec::new())),
                b']' => self.push(Obj::List(Vec::new())),
                b')' => self.push(Obj::Tuple(Vec::new())),
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Obj::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push(Obj::Tuple(items));
                }
                b'X' => {
                    let n = self.le_uint(4)?;
                    let s = self.string(n)?;
                    self.push(Obj::Str(s));
                }
                0x8c => {
                    let n = self.le_uint(1)?;
                    let s = self.string(n)?;
                    self.push(Obj::Str(s));
                }
                0x8d => {
                    let n = self.le_uint(8)?;
                    let s = self.string(n)?;
                    self.push(Obj::Str(s));
                }
                b'B' | b'C' => {
                    let n = self.le_uint(if op == b'B' { 4 } else { 1 })? as usize;
                    self.take(n)?;
                    self.push(Obj::Bytes);
                }
                b'J' => {
                    let v = self.le_uint(4)? as u32 as i32 as i64;
                    self.push(Obj::Int(v));
                }
                b'K' => {
                    let v = self.le_uint(1)? as i64;
                    self.push(Obj::Int(v));
                }
                b'M' => {
                    let v = self.le_uint(2)? as i64;
                    self.push(Obj::Int(v));
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    if n > 8 {
                        return self.err(format!("integer of {n} bytes does not fit in 64 bits"));
                    }
                    let raw = self.le_uint(n)?;
                    let v = if n == 0 {
                        0
                    } else {
                        let shift = 64 - 8 * n as u32;
                        ((raw << shift) as i64) >> shift
                    };
                    self.push(Obj::Int(v));
                }
                b'N' => self.push(Obj::None),
                0x88 => self.push(Obj::Bool(true)),
                0x89 => self.push(Obj::Bool(false)),
                b'G' => {
                    self.take(8)?;
                    self.push(Obj::Float);
                }
                b'q' => {
                    let k = self.le_uint(1)?;
                    self.memo_put(k)?;
                }
                b'r' => {
                    let k = self.le_uint(4)?;
                    self.memo_put(k)?;
                }
                0x94 => {
                    let k = self.memo.len() as u64;
                    self.memo_put(k)?;
                }
                b'h' => {
                    let k = self.le_uint(1)?;
                    self.memo_get(k)?;
                }
                b'j' => {
                    let k = self.le_uint(4)?;
                    self.memo_get(k)?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push_global(&module, &name)?;
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (module, name) = (self.str_of(module, "global module")?, self.str_of(name, "global name")?);
                    self.push_global(&module, &name)?;
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let id = self.reduce(callable, args)?;
                    self.stack.push(id);
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let id = self.persistent_load(pid)?;
                    self.stack.push(id);
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let dict = self.top()?;
                    self.set_items(dict, &[k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let dict = self.top()?;
                    self.set_items(dict, &items)?;
                }
                b'a' => {
                    let v = self.pop()?;
                    let list = self.top()?;
                    self.append(list, vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let list = self.top()?;
                    self.append(list, items)?;
                }
                b'b' => {
                    // BUILD sets attributes; torch.save uses it only for an OrderedDict's
                    // `_metadata` (module versions), which carries no tensors.
                    let _state = self.pop()?;
                    let target = self.top()?;
                    if !matches!(self.objects[target], Obj::Dict(_)) {
                        return self.err(format!("BUILD on a {}", self.objects[target].type_name()));
                    }
                }
                _ => return Err(PickleError::Opcode { pos: op_pos, op }),
            }
        }
    }

    fn push_global(&mut self, module: &str, name: &str) -> Result<(), PickleError> {
        match Global::resolve(module, name) {
            Some(global) => {
                self.push(Obj::Global(global));
                Ok(())
            }
            None => Err(PickleError::ForbiddenGlobal { module: module.to_string(), name: name.to_string() }),
        }
    }
}

fn unpickle(data: &[u8]) -> Result<Unpickled, PickleError> {
    let machine = Machine {
        data,
        pos: 0,
        objects: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        dict_index: HashMap::new(),
    };
    machine.run()
}

/// Reads the state dict of a `torch.save` zip archive: a dict (or OrderedDict) of tensors, or
/// a dict holding one under `state_dict`. Tensors keep their stored dtype; views (offsets,
/// strides) are materialised as contiguous tensors.
pub fn read_state_dict(path: &Path) -> Result<TensorMap, PickleError> {
    let (mut archive, prefix, file_len, entries) = open_state_dict(path)?;
    // Each tensor becomes a contiguous copy of its view. Views may share a storage (tied
    // weights) or repeat elements (stride 0), so a small file could ask for terabytes: the
    // copies may take at most a few times the file's size, checked before each is made.
    let mut budget = file_len.saturating_mul(MAX_TENSOR_BYTES_PER_FILE_BYTE);
    let mut storages: HashMap<String, (Kind, i64, Tensor)> = HashMap::new();
    let mut out = TensorMap::new();
    for (name, tensor) in entries {
        let t = materialise(&mut archive, &prefix, file_len, &mut budget, &mut storages, &name, &tensor)?;
        out.insert(name, t);
    }
    Ok(out)
}

/// The dtype and shape of every tensor of a `torch.save` state dict, read from its pickle alone
/// (the tensor data is not loaded).
pub fn read_state_dict_shapes(path: &Path) -> Result<Vec<(String, Kind, Vec<i64>)>, PickleError> {
    let (_, _, _, entries) = open_state_dict(path)?;
    Ok(entries.into_iter().map(|(name, t)| (name, t.kind, t.size)).collect())
}

type OpenedStateDict = (zip::ZipArchive<File>, String, u64, Vec<(String, TensorRef)>);

/// The archive, its folder prefix, the file length and the state dict's tensor references.
fn open_state_dict(path: &Path) -> Result<OpenedStateDict, PickleError> {
    let mut file = File::open(path)?;
    let file_len = file.metadata()?.len();
    let mut magic = [0u8; 4];
    let got = file.read(&mut magic)?;
    if got < 4 || magic != *b"PK\x03\x04" {
        return Err(if got >= 1 && magic[0] == 0x80 { PickleError::LegacyFormat } else { PickleError::NotACheckpoint });
    }
    let mut archive = zip::ZipArchive::new(File::open(path)?).map_err(|e| PickleError::Zip(format!("{e} (truncated or corrupt file?)")))?;
    let pickles: Vec<String> = archive
        .file_names()
        .filter(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .map(str::to_string)
        .collect();
    let [pickle_name] = pickles.as_slice() else {
        return Err(PickleError::Zip(format!("expected one `<archive>/data.pkl`, found {}", pickles.len())));
    };
    let prefix = pickle_name.trim_end_matches("data.pkl").to_string();
    if let Ok(mut entry) = archive.by_name(&format!("{prefix}byteorder")) {
        let mut order = String::new();
        entry.by_ref().take(16).read_to_string(&mut order)?;
        if order.trim() != "little" {
            return Err(PickleError::Zip(format!("byte order `{}` is not supported", order.trim())));
        }
    }
    let pickle_bytes = read_entry(&mut archive, pickle_name, None, file_len)?;
    let unpickled = unpickle(&pickle_bytes)?;
    let entries = state_dict_entries(&unpickled)?;
    Ok((archive, prefix, file_len, entries))
}

/// How many bytes of tensors a checkpoint may expand to per byte of file (see `read_state_dict`).
const MAX_TENSOR_BYTES_PER_FILE_BYTE: u64 = 4;

fn state_dict_entries(unpickled: &Unpickled) -> Result<Vec<(String, TensorRef)>, PickleError> {
    let objects = &unpickled.objects;
    let Obj::Dict(root) = &objects[unpickled.root] else {
        return Err(PickleError::NotStateDict(format!("the file holds a {}", objects[unpickled.root].type_name())));
    };
    let nested = root.iter().find_map(|&(k, v)| match (&objects[k], &objects[v]) {
        (Obj::Str(s), Obj::Dict(d)) if s == "state_dict" => Some(d),
        _ => None,
    });
    let dict = nested.unwrap_or(root);
    dict.iter()
        .map(|&(k, v)| {
            let Obj::Str(name) = &objects[k] else {
                return Err(PickleError::NotStateDict(format!("a key is a {}, not a str", objects[k].type_name())));
            };
            match &objects[v] {
                Obj::Tensor(t) => Ok((name.clone(), t.clone())),
                other => Err(PickleError::NotStateDict(format!("entry `{name}` is a {}, not a tensor", other.type_name()))),
            }
        })
        .collect()
}

/// Reads one archive entry, checking its size (`expected`, when known) before allocating.
fn read_entry(
    archive: &mut zip::ZipArchive<File>,
    name: &str,
    expected: Option<u64>,
    file_len: u64,
) -> Result<Vec<u8>, PickleError> {
    let entry = archive.by_name(name).map_err(|e| PickleError::Zip(format!("entry `{name}`: {e}")))?;
    let size = entry.size();
    if let Some(expected) = expected {
        if size != expected {
            return Err(PickleError::Zip(format!("entry `{name}` holds {size} bytes, {expected} expected")));
        }
    }
    let capacity = usize::try_from(size.min(file_len)).map_err(|_| PickleError::Zip(format!("entry `{name}` too large")))?;
    let mut bytes = Vec::with_capacity(capacity);
    entry.take(size).read_to_end(&mut bytes)?;
    if bytes.len() as u64 != size {
        return Err(PickleError::Zip(format!("entry `{name}` is truncated ({} of {size} bytes)", bytes.len())));
    }
    Ok(bytes)
}

/// Makes the contiguous tensor of a view; `budget` is what the tensors made so far may still
/// add (bytes), checked before anything is allocated.
fn materialise(
    archive: &mut zip::ZipArchive<File>,
    prefix: &str,
    file_len: u64,
    budget: &mut u64,
    storages: &mut HashMap<String, (Kind, i64, Tensor)>,
    name: &str,
    t: &TensorRef,
) -> Result<Tensor, PickleError> {
    let bad = |reason: String| PickleError::Tensor { name: name.to_string(), reason };
    if t.size.len() != t.stride.len() {
        return Err(bad(format!("size {:?} and stride {:?} differ in rank", t.size, t.stride)));
    }
    if t.offset < 0 || t.size.iter().chain(&t.stride).any(|&v| v < 0) {
        return Err(bad(format!("negative offset, size or stride ({}, {:?}, {:?})", t.offset, t.size, t.stride)));
    }
    let numel = t.size.iter().try_fold(1i64, |acc, &s| acc.checked_mul(s)).ok_or_else(|| bad("size overflows".into()))?;
    // The highest element index the view touches must lie inside the storage.
    let end = if numel == 0 {
        Some(t.offset)
    } else {
        t.offset.checked_add(1).and_then(|first| {
            t.size.iter().zip(&t.stride).try_fold(first, |acc, (&s, &st)| (s - 1).checked_mul(st).and_then(|x| acc.checked_add(x)))
        })
    };
    match end {
        Some(end) if end <= t.storage_numel => {}
        _ => {
            return Err(bad(format!(
                "view (offset {}, size {:?}, stride {:?}) exceeds its storage of {} elements",
                t.offset, t.size, t.stride, t.storage_numel
            )))
        }
    }
    let bytes = (numel as u64).saturating_mul(t.kind.elt_size_in_bytes() as u64);
    *budget = budget.checked_sub(bytes).ok_or_else(|| {
        bad(format!(
            "the tensors would take more than {MAX_TENSOR_BYTES_PER_FILE_BYTE} times the file's {file_len} bytes (views that repeat their storage?)"
        ))
    })?;
    if !storages.contains_key(&t.key) {
        let elt = t.kind.elt_size_in_bytes() as u64;
        let nbytes = (t.storage_numel as u64)
            .checked_mul(elt)
            .ok_or_else(|| PickleError::Storage { key: t.key.clone(), reason: "size overflows".into() })?;
        let bytes = read_entry(archive, &format!("{prefix}data/{}", t.key), Some(nbytes), file_len)?;
        let storage = Tensor::f_from_data_size(&bytes, &[t.storage_numel], t.kind)
            .map_err(|e| PickleError::Storage { key: t.key.clone(), reason: e.to_string() })?;
        storages.insert(t.key.clone(), (t.kind, t.storage_numel, storage));
    }
    let (kind, storage_numel, storage) = &storages[&t.key];
    if *kind != t.kind || *storage_numel != t.storage_numel {
        return Err(PickleError::Storage {
            key: t.key.clone(),
            reason: format!("used as {:?}[{}] and as {:?}[{}]", kind, storage_numel, t.kind, t.storage_numel),
        });
    }
    storage
        .f_as_strided(t.size.as_slice(), t.stride.as_slice(), Some(t.offset))
        .and_then(|v| v.f_contiguous())
        .map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(bytes: &[u8]) -> Result<Unpickled, PickleError> {
        unpickle(bytes)
    }

    #[test]
    fn refuses_unknown_global_by_name() {
        let err = run(b"\x80\x02cos\nsystem\nq\x00X\x02\x00\x00\x00lsq\x01\x85R.").err().unwrap();
        assert!(err.to_string().contains("`os.system`"), "{err}");
    }

    #[test]
    fn refuses_stack_global_too() {
        let err = run(b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93.").err().unwrap();
        assert!(matches!(err, PickleError::ForbiddenGlobal { .. }), "{err}");
    }

    #[test]
    fn rejects_lengths_beyond_the_data() {
        let err = run(b"\x80\x02X\xff\xff\xff\x7fabc").err().unwrap();
        assert!(err.to_string().contains("truncated"), "{err}");
    }

    #[test]
    fn rejects_unknown_opcodes_and_underflow() {
        assert!(matches!(run(b"\x80\x02\x81.").err().unwrap(), PickleError::Opcode { op: 0x81, .. }));
        assert!(run(b"\x80\x02t.").is_err());
        assert!(run(b"\x80\x02(.").is_err());
        assert!(run(b"\x80\x02h\x05.").is_err());
    }

    #[test]
    fn memo_shares_objects() {
        // d = {}; {'a': d, 'b': d} with d filled after being memoised.
        let p = b"\x80\x02}q\x00(X\x01\x00\x00\x00a}q\x01X\x01\x00\x00\x00bh\x01u.";
        let u = run(p).unwrap();
        let Obj::Dict(entries) = &u.objects[u.root] else { panic!() };
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].1, entries[1].1);
    }

    #[test]
    fn long1_is_signed() {
        let u = run(b"\x80\x02\x8a\x02\xff\xfe.").unwrap();
        assert!(matches!(u.objects[u.root], Obj::Int(-257)));
    }
}
