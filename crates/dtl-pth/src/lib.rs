//! Reads PyTorch `torch.save` checkpoints (the zip format PyTorch writes since 1.6) into an
//! ordered map of tensors, without executing anything.
//!
//! A `.pth` file is a zip archive holding `<name>/data.pkl` (a pickle describing the saved object),
//! one `<name>/data/<key>` record per tensor storage and a few small records (`version`,
//! `byteorder`). Loading the pickle with Python would run whatever callables it names; this crate
//! interprets it with its own restricted interpreter instead: only the globals a state dict needs
//! are recognised (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`,
//! `torch._utils._rebuild_parameter(_with_state)` and the `torch.*Storage` types), nothing is ever
//! called, and any other global (`os.system`, `builtins.eval`, a model class, a numpy scalar) is
//! refused with an error naming the file and the global.
//!
//! Tensors keep their dtype (f64, f32, f16, bf16, i64, i32, i16, i8, u8, bool); views are resolved
//! with their storage offset and strides, so every [`Tensor`] is contiguous (row-major) and
//! little-endian.
//!
//! ```
//! let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/model.pth");
//! // Microsoft's Swin releases keep the state dict under `model`.
//! let sd = dtl_pth::read(path, Some("model"))?;
//! let w = sd.get("patch_embed.proj.weight").unwrap();
//! assert_eq!(w.dtype, dtl_pth::DType::F32);
//! assert_eq!(w.shape, vec![4, 3, 2, 2]);
//! assert_eq!(w.to_f32().len(), 48);
//! for (name, t) in sd.iter() {
//!     assert!(!name.is_empty() && t.data.len() == t.numel() * t.dtype.size());
//! }
//! # Ok::<(), dtl_core::DtlError>(())
//! ```

mod pickle;

use std::collections::HashMap;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};

use dtl_core::DtlError;
use pickle::{PickleError, TensorRef, Unpickled, Value};

/// Element type of a [`Tensor`], as PyTorch stores it.
///
/// ```
/// use dtl_pth::DType;
/// assert_eq!(DType::BF16.size(), 2);
/// assert_eq!(DType::I64.name(), "int64");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// `torch.float64`
    F64,
    /// `torch.float32`
    F32,
    /// `torch.float16`
    F16,
    /// `torch.bfloat16`
    BF16,
    /// `torch.int64`
    I64,
    /// `torch.int32`
    I32,
    /// `torch.int16`
    I16,
    /// `torch.int8`
    I8,
    /// `torch.uint8`
    U8,
    /// `torch.bool` (one byte per element, 0 or 1)
    Bool,
}

impl DType {
    /// Bytes per element.
    ///
    /// ```
    /// assert_eq!(dtl_pth::DType::F64.size(), 8);
    /// ```
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    /// PyTorch's name of the dtype (`float32`, `bfloat16`, ...).
    ///
    /// ```
    /// assert_eq!(dtl_pth::DType::F16.name(), "float16");
    /// ```
    pub fn name(self) -> &'static str {
        match self {
            DType::F64 => "float64",
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::I64 => "int64",
            DType::I32 => "int32",
            DType::I16 => "int16",
            DType::I8 => "int8",
            DType::U8 => "uint8",
            DType::Bool => "bool",
        }
    }

    /// Whether the dtype is a floating-point type.
    ///
    /// ```
    /// assert!(dtl_pth::DType::BF16.is_float() && !dtl_pth::DType::I32.is_float());
    /// ```
    pub fn is_float(self) -> bool {
        matches!(self, DType::F64 | DType::F32 | DType::F16 | DType::BF16)
    }
}

/// One tensor of a checkpoint: contiguous row-major data, little-endian.
///
/// ```
/// use dtl_pth::{DType, Tensor};
/// let t = Tensor { dtype: DType::F32, shape: vec![2], data: [1.5f32, -2.0].iter().flat_map(|x| x.to_le_bytes()).collect() };
/// assert_eq!(t.numel(), 2);
/// assert_eq!(t.to_f32(), vec![1.5, -2.0]);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Element type.
    pub dtype: DType,
    /// Size of each dimension (empty for a 0-d tensor).
    pub shape: Vec<usize>,
    /// `numel() * dtype.size()` bytes, row-major, little-endian.
    pub data: Vec<u8>,
}

impl Tensor {
    /// Number of elements (1 for a 0-d tensor).
    ///
    /// ```
    /// let t = dtl_pth::Tensor { dtype: dtl_pth::DType::U8, shape: vec![2, 3], data: vec![0; 6] };
    /// assert_eq!(t.numel(), 6);
    /// ```
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The elements converted to f32 (integers and booleans by value; f64 rounded).
    ///
    /// ```
    /// let t = dtl_pth::Tensor { dtype: dtl_pth::DType::I16, shape: vec![2], data: vec![0xff, 0xff, 3, 0] };
    /// assert_eq!(t.to_f32(), vec![-1.0, 3.0]);
    /// ```
    pub fn to_f32(&self) -> Vec<f32> {
        let d = &self.data;
        match self.dtype {
            DType::F32 => d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::F64 => d
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(arr8(c)) as f32)
                .collect(),
            DType::F16 => d
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::BF16 => d
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            _ => self
                .to_i64()
                .unwrap_or_default()
                .into_iter()
                .map(|v| v as f32)
                .collect(),
        }
    }

    /// The elements as i64 for integer and boolean tensors; `None` for floating-point ones.
    ///
    /// ```
    /// let t = dtl_pth::Tensor { dtype: dtl_pth::DType::I8, shape: vec![2], data: vec![0xfe, 7] };
    /// assert_eq!(t.to_i64(), Some(vec![-2, 7]));
    /// ```
    pub fn to_i64(&self) -> Option<Vec<i64>> {
        let d = &self.data;
        Some(match self.dtype {
            DType::I64 => d
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(arr8(c)))
                .collect(),
            DType::I32 => d
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                .collect(),
            DType::I16 => d
                .chunks_exact(2)
                .map(|c| i16::from_le_bytes([c[0], c[1]]) as i64)
                .collect(),
            DType::I8 => d.iter().map(|&b| b as i8 as i64).collect(),
            DType::U8 | DType::Bool => d.iter().map(|&b| b as i64).collect(),
            _ => return None,
        })
    }
}

fn arr8(c: &[u8]) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.copy_from_slice(c);
    a
}

/// The tensors of a checkpoint entry, in the order the checkpoint lists them.
///
/// ```
/// let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/model.pth");
/// let sd = dtl_pth::read(path, Some("model"))?;
/// assert!(sd.len() > 100);
/// assert_eq!(sd.names().next(), Some("patch_embed.proj.weight"));
/// let owned: Vec<(String, dtl_pth::Tensor)> = sd.into_iter().collect();
/// assert_eq!(owned[0].0, "patch_embed.proj.weight");
/// # Ok::<(), dtl_core::DtlError>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct StateDict {
    entries: Vec<(String, Tensor)>,
    index: HashMap<String, usize>,
}

impl StateDict {
    /// Number of tensors.
    ///
    /// ```
    /// assert_eq!(dtl_pth::StateDict::default().len(), 0);
    /// ```
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there is no tensor.
    ///
    /// ```
    /// assert!(dtl_pth::StateDict::default().is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The tensor called `name`.
    ///
    /// ```
    /// assert!(dtl_pth::StateDict::default().get("head.weight").is_none());
    /// ```
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.index.get(name).map(|&i| &self.entries[i].1)
    }

    /// The tensor names, in checkpoint order.
    ///
    /// ```
    /// assert_eq!(dtl_pth::StateDict::default().names().count(), 0);
    /// ```
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(n, _)| n.as_str())
    }

    /// `(name, tensor)` pairs, in checkpoint order.
    ///
    /// ```
    /// for (name, t) in dtl_pth::StateDict::default().iter() {
    ///     println!("{name}: {:?}", t.shape);
    /// }
    /// ```
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.entries.iter().map(|(n, t)| (n.as_str(), t))
    }

    /// Removes and returns the tensor called `name`.
    ///
    /// ```
    /// assert!(dtl_pth::StateDict::default().remove("x").is_none());
    /// ```
    pub fn remove(&mut self, name: &str) -> Option<Tensor> {
        let i = self.index.remove(name)?;
        let (_, t) = self.entries.remove(i);
        for v in self.index.values_mut() {
            if *v > i {
                *v -= 1;
            }
        }
        Some(t)
    }

    fn push(&mut self, name: String, t: Tensor) {
        if let Some(&i) = self.index.get(&name) {
            self.entries[i].1 = t;
        } else {
            self.index.insert(name.clone(), self.entries.len());
            self.entries.push((name, t));
        }
    }
}

impl IntoIterator for StateDict {
    type Item = (String, Tensor);
    type IntoIter = std::vec::IntoIter<(String, Tensor)>;

    fn into_iter(self) -> Self::IntoIter {
        self.entries.into_iter()
    }
}

/// The entries [`read_state_dict`] tries, in order, before the top level.
pub const STATE_DICT_ENTRIES: &[&str] = &["model", "state_dict"];

/// Reads the tensors of `entry` of the `torch.save` checkpoint at `path`.
///
/// `entry` is a key path into the saved object: `Some("model")` for Microsoft's Swin releases,
/// `Some("state_dict")`, `Some("model.backbone")` for a nested dict (a key that itself contains
/// dots is matched whole first), or `None` (or `Some("")`) for a checkpoint that is the state dict
/// itself. The chosen entry must be a dict of tensors. Errors name the file and what is wrong: a
/// missing entry lists the keys that are there, a refused global names it, the legacy (non-zip)
/// format says how to convert.
///
/// ```
/// let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/views.pth");
/// let sd = dtl_pth::read(path, Some("state_dict"))?;
/// assert_eq!(sd.get("f32.transposed").unwrap().shape, vec![10, 6]);
/// let err = dtl_pth::read(path, Some("model")).unwrap_err().to_string();
/// assert!(err.contains("views.pth") && err.contains("state_dict"), "{err}");
/// # Ok::<(), dtl_core::DtlError>(())
/// ```
pub fn read(path: impl AsRef<Path>, entry: Option<&str>) -> Result<StateDict, DtlError> {
    let path = path.as_ref();
    let (reader, head) = open_file(path)?;
    read_from(reader, &head, path, entry)
}

/// The file and its first 512 bytes (to tell the legacy format from a zip archive).
fn open_file(path: &Path) -> Result<(std::io::BufReader<std::fs::File>, Vec<u8>), DtlError> {
    let io = |source| DtlError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut head = Vec::with_capacity(512);
    (&mut f).take(512).read_to_end(&mut head).map_err(io)?;
    f.rewind().map_err(io)?;
    Ok((std::io::BufReader::new(f), head))
}

/// [`read`] on a checkpoint already in memory; `name` is the file name used in error messages.
///
/// ```
/// let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/model.pth");
/// let bytes = std::fs::read(path).unwrap();
/// let sd = dtl_pth::read_bytes(&bytes, "model.pth", Some("model"))?;
/// assert!(sd.get("norm.weight").is_some());
/// let err = dtl_pth::read_bytes(&bytes[..100], "model.pth", None).unwrap_err();
/// assert!(err.to_string().starts_with("model.pth: "), "{err}");
/// # Ok::<(), dtl_core::DtlError>(())
/// ```
pub fn read_bytes(
    bytes: &[u8],
    name: impl AsRef<Path>,
    entry: Option<&str>,
) -> Result<StateDict, DtlError> {
    let head = &bytes[..bytes.len().min(512)];
    read_from(std::io::Cursor::new(bytes), head, name.as_ref(), entry)
}

/// Reads the state dict of a checkpoint wherever it usually is: under `model` (Microsoft's
/// releases, many training scripts), under `state_dict`, or at the top level.
///
/// ```
/// let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/model.pth");
/// let sd = dtl_pth::read_state_dict(path)?;
/// assert!(sd.get("layers.0.downsample.reduction.weight").is_some());
/// # Ok::<(), dtl_core::DtlError>(())
/// ```
pub fn read_state_dict(path: impl AsRef<Path>) -> Result<StateDict, DtlError> {
    let path = path.as_ref();
    let (reader, head) = open_file(path)?;
    let mut archive = Archive::open(reader, &head, path)?;
    let u = archive.unpickle()?;
    let top = archive.top_items(&u)?;
    let entry = STATE_DICT_ENTRIES
        .iter()
        .find(|e| {
            top.iter().any(|(k, v)| {
                matches!(k, Value::Str(s) if &**s == **e) && matches!(v, Value::Dict(_))
            })
        })
        .copied();
    archive.tensors(&u, entry)
}

fn read_from<R: Read + Seek>(
    reader: R,
    head: &[u8],
    path: &Path,
    entry: Option<&str>,
) -> Result<StateDict, DtlError> {
    let mut archive = Archive::open(reader, head, path)?;
    let u = archive.unpickle()?;
    archive.tensors(&u, entry)
}

/// How many times its stored bytes (plus [`VIEW_SLACK`]) a checkpoint's tensors may add up to.
const MAX_VIEW_FACTOR: u64 = 8;
/// Bytes of tensors allowed beyond `MAX_VIEW_FACTOR` times the stored data.
const VIEW_SLACK: u64 = 64 << 20;

/// The largest `data.pkl` accepted (a state dict's pickle is a few hundred bytes per tensor).
const MAX_PICKLE_BYTES: u64 = 1 << 30;

struct Archive<R> {
    zip: zip::ZipArchive<R>,
    prefix: String,
    big_endian: bool,
    path: PathBuf,
}

fn legacy_hint(path: &Path) -> String {
    let p = path.display();
    format!(
        "this is PyTorch's legacy (pre-1.6, non-zip) torch.save format, which is not supported; \
         convert it once with PyTorch: python -c \"import torch; torch.save(torch.load('{p}', \
         map_location='cpu', weights_only=True), 'converted.pth')\" (writes the zip format), or save \
         the state dict as safetensors"
    )
}

impl<R: Read + Seek> Archive<R> {
    fn fail(&self, message: impl Into<String>) -> DtlError {
        DtlError::File {
            path: self.path.clone(),
            message: message.into(),
        }
    }

    fn open(reader: R, head: &[u8], path: &Path) -> Result<Self, DtlError> {
        let fail = |message: String| DtlError::File {
            path: path.to_path_buf(),
            message,
        };
        if head.first() == Some(&0x80) || (head.len() >= 262 && &head[257..262] == b"ustar") {
            return Err(fail(legacy_hint(path)));
        }
        if !head.starts_with(b"PK") {
            return Err(fail(
                "not a torch.save checkpoint: PyTorch writes a zip archive (starting with `PK`); \
                 this file starts otherwise"
                    .into(),
            ));
        }
        let zip = zip::ZipArchive::new(reader).map_err(|e| {
            fail(format!(
                "not a readable zip archive ({e}); the file may be truncated or corrupt"
            ))
        })?;
        let pkl: Vec<&str> = zip
            .file_names()
            .filter(|n| {
                *n == "data.pkl" || (n.ends_with("/data.pkl") && n.matches('/').count() == 1)
            })
            .collect();
        let prefix = match pkl.as_slice() {
            [one] => one.strip_suffix("data.pkl").unwrap_or("").to_string(),
            [] => {
                let mut names: Vec<&str> = zip.file_names().take(8).collect();
                names.sort();
                return Err(fail(format!(
                    "no `<name>/data.pkl` record: not a torch.save checkpoint (its records include: {})",
                    if names.is_empty() { "none".to_string() } else { names.join(", ") }
                )));
            }
            many => {
                return Err(fail(format!(
                    "{} `data.pkl` records ({}): a torch.save archive has exactly one",
                    many.len(),
                    many.join(", ")
                )))
            }
        };
        let mut a = Archive {
            zip,
            prefix,
            big_endian: false,
            path: path.to_path_buf(),
        };
        let bo = format!("{}byteorder", a.prefix);
        if a.zip.index_for_name(&bo).is_some() {
            let order = a.record(&bo, 16)?;
            a.big_endian = match order.as_slice() {
                b"little" => false,
                b"big" => true,
                other => {
                    return Err(a.fail(format!(
                        "record `{bo}` says {:?}; expected `little` or `big`",
                        String::from_utf8_lossy(other)
                    )))
                }
            };
        }
        Ok(a)
    }

    /// The bytes of a record, refusing one larger than `limit`.
    fn record(&mut self, name: &str, limit: u64) -> Result<Vec<u8>, DtlError> {
        let path = self.path.clone();
        let fail = |message: String| DtlError::File {
            path: path.clone(),
            message,
        };
        let mut f = match self.zip.by_name(name) {
            Ok(f) => f,
            Err(zip::result::ZipError::FileNotFound) => {
                return Err(fail(format!(
                    "record `{name}` is missing: the archive is incomplete"
                )))
            }
            Err(e) => return Err(fail(format!("record `{name}`: {e}"))),
        };
        let size = f.size();
        if size > limit {
            return Err(fail(format!(
                "record `{name}` is {size} bytes, more than the {limit} expected"
            )));
        }
        let mut out = Vec::new();
        (&mut f).take(size).read_to_end(&mut out).map_err(|e| {
            fail(format!(
                "record `{name}` cannot be read ({e}); the file may be truncated"
            ))
        })?;
        if out.len() as u64 != size {
            return Err(fail(format!(
                "record `{name}` holds {} bytes, its header says {size}; the file is truncated",
                out.len()
            )));
        }
        Ok(out)
    }

    fn unpickle(&mut self) -> Result<Unpickled, DtlError> {
        let name = format!("{}data.pkl", self.prefix);
        let data = self.record(&name, MAX_PICKLE_BYTES)?;
        pickle::unpickle(&data).map_err(|e| match e {
            PickleError::Refused {
                module,
                name: global,
            } => self.fail(format!(
                "the checkpoint names the global `{module}.{global}`, which is refused: only the \
                 globals of a plain state dict are read ({}), and nothing is executed. Re-save the \
                 state dict alone, e.g. torch.save(model.state_dict(), 'weights.pth')",
                pickle::ALLOWED.join(", ")
            )),
            PickleError::Malformed { offset, message } => {
                self.fail(format!("`{name}` at byte {offset}: {message}"))
            }
        })
    }

    fn top_items(&self, u: &Unpickled) -> Result<Vec<(Value, Value)>, DtlError> {
        u.dict_items(&u.root).ok_or_else(|| {
            self.fail(format!(
                "the saved object is a {}, not a dict (of tensors, or holding a state dict)",
                u.root.type_name()
            ))
        })
    }

    fn tensors(&mut self, u: &Unpickled, entry: Option<&str>) -> Result<StateDict, DtlError> {
        let top = self.top_items(u)?;
        let (items, label) = match entry {
            None | Some("") => (top.clone(), String::new()),
            Some(e) => {
                let v = self.select(u, &top, e)?;
                let items = u.dict_items(&v).ok_or_else(|| {
                    self.fail(format!(
                        "entry `{e}` is a {}, not a dict of tensors",
                        v.type_name()
                    ))
                })?;
                (items, format!("{e}."))
            }
        };
        let mut refs: Vec<(String, std::rc::Rc<TensorRef>)> = Vec::with_capacity(items.len());
        for (k, v) in items {
            let Value::Str(name) = k else {
                return Err(self.fail(format!(
                    "a key of the {} is a {}, not a tensor name",
                    if label.is_empty() {
                        "top level".to_string()
                    } else {
                        format!("entry `{}`", label.trim_end_matches('.'))
                    },
                    k.type_name()
                )));
            };
            match v {
                Value::Tensor(t) => refs.push((name.to_string(), t)),
                other => {
                    let hint = if entry.is_none() {
                        format!(
                            "; pass the entry that holds the state dict (top-level keys: {})",
                            list_keys(&top)
                        )
                    } else {
                        String::new()
                    };
                    return Err(self.fail(format!(
                        "`{label}{name}` is a {}, not a tensor{hint}",
                        other.type_name()
                    )));
                }
            }
        }
        // Each storage is read once and dropped after its last tensor.
        let mut uses: HashMap<String, usize> = HashMap::new();
        for (_, t) in &refs {
            *uses.entry(t.storage.key.clone()).or_default() += 1;
        }
        let mut storages: HashMap<String, (std::rc::Rc<pickle::StorageRef>, Vec<u8>)> =
            HashMap::new();
        let mut out = StateDict::default();
        // Views of one storage may repeat (tied weights), but not without bound: a small pickle
        // naming one large storage a million times must not exhaust memory.
        let (mut stored, mut produced) = (0u64, 0u64);
        for (name, t) in refs {
            let key = t.storage.key.clone();
            if !storages.contains_key(&key) {
                let bytes = t
                    .storage
                    .numel
                    .checked_mul(t.storage.dtype.size() as u64)
                    .ok_or_else(|| {
                        self.fail(format!(
                            "storage {key} of `{label}{name}` is impossibly large"
                        ))
                    })?;
                let rec = format!("{}data/{key}", self.prefix);
                let data = self.record(&rec, bytes)?;
                if (data.len() as u64) < bytes {
                    return Err(self.fail(format!(
                        "record `{rec}` holds {} bytes, but `{label}{name}` needs {} {} elements ({bytes} bytes)",
                        data.len(),
                        t.storage.numel,
                        t.storage.dtype.name()
                    )));
                }
                stored += data.len() as u64;
                storages.insert(key.clone(), (t.storage.clone(), data));
            }
            let (s, data) = &storages[&key];
            if s.dtype != t.storage.dtype || s.numel != t.storage.numel {
                return Err(self.fail(format!(
                    "storage {key} is used as {} x {} and as {} x {} (by `{label}{name}`)",
                    s.numel,
                    s.dtype.name(),
                    t.storage.numel,
                    t.storage.dtype.name()
                )));
            }
            let mut tensor =
                gather(data, &t).map_err(|m| self.fail(format!("`{label}{name}`: {m}")))?;
            produced += tensor.data.len() as u64;
            if produced > MAX_VIEW_FACTOR * stored + VIEW_SLACK {
                return Err(self.fail(format!(
                    "its tensors add up to more than {MAX_VIEW_FACTOR} times the {stored} bytes of \
                     data it stores (at `{label}{name}`): refusing to expand them"
                )));
            }
            let left = uses.get_mut(&key).expect("counted above");
            *left -= 1;
            if *left == 0 {
                storages.remove(&key);
            }
            if self.big_endian {
                let n = tensor.dtype.size();
                tensor.data.chunks_exact_mut(n).for_each(|c| c.reverse());
            }
            out.push(name, tensor);
        }
        Ok(out)
    }

    fn select(
        &self,
        u: &Unpickled,
        top: &[(Value, Value)],
        entry: &str,
    ) -> Result<Value, DtlError> {
        let parts: Vec<&str> = entry.split('.').collect();
        let mut items = top.to_vec();
        let mut at = 0;
        let mut walked: Vec<String> = Vec::new();
        loop {
            // The longest run of parts that is a key at this level.
            let found = (at + 1..=parts.len()).rev().find_map(|end| {
                let k = parts[at..end].join(".");
                items
                    .iter()
                    .find(|(key, _)| matches!(key, Value::Str(s) if **s == *k))
                    .map(|(_, v)| (end, k, v.clone()))
            });
            let Some((end, k, v)) = found else {
                let level = if walked.is_empty() {
                    "top-level keys".to_string()
                } else {
                    format!("keys of `{}`", walked.join("."))
                };
                return Err(self.fail(format!(
                    "no entry `{entry}` in the checkpoint; {level}: {}",
                    list_keys(&items)
                )));
            };
            walked.push(k);
            at = end;
            if at == parts.len() {
                return Ok(v);
            }
            items = u.dict_items(&v).ok_or_else(|| {
                self.fail(format!(
                    "no entry `{entry}`: `{}` is a {}, not a dict",
                    walked.join("."),
                    v.type_name()
                ))
            })?;
        }
    }
}

fn list_keys(items: &[(Value, Value)]) -> String {
    if items.is_empty() {
        return "none (the dict is empty)".into();
    }
    let shown: Vec<String> = items
        .iter()
        .take(20)
        .map(|(k, v)| match k {
            Value::Str(s) if s.chars().count() > 100 => {
                format!(
                    "{}... ({})",
                    s.chars().take(100).collect::<String>(),
                    v.type_name()
                )
            }
            Value::Str(s) => format!("{s} ({})", v.type_name()),
            other => format!("<{}>", other.type_name()),
        })
        .collect();
    let more = items.len().saturating_sub(20);
    if more > 0 {
        format!("{}, ... ({more} more)", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

/// Copies a strided view out of its storage into a contiguous tensor.
fn gather(storage: &[u8], t: &TensorRef) -> Result<Tensor, String> {
    let dtype = t.storage.dtype;
    let es = dtype.size();
    let numel = t
        .shape
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .ok_or("its size overflows")?;
    let shape: Vec<usize> = t
        .shape
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| "its size does not fit in memory".to_string()))
        .collect::<Result<_, _>>()?;
    if numel == 0 {
        return Ok(Tensor {
            dtype,
            shape,
            data: Vec::new(),
        });
    }
    if numel > t.storage.numel {
        return Err(format!(
            "{numel} elements from a storage of {} (an expanded or overlapping view; save it with \
             .contiguous())",
            t.storage.numel
        ));
    }
    let last = t
        .shape
        .iter()
        .zip(&t.stride)
        .try_fold(t.offset, |a, (&d, &s)| {
            (d - 1).checked_mul(s).and_then(|x| a.checked_add(x))
        })
        .ok_or("its strides overflow")?;
    if last >= t.storage.numel {
        return Err(format!(
            "the view (offset {}, size {:?}, stride {:?}) reaches element {last} of a storage of {}",
            t.offset, t.shape, t.stride, t.storage.numel
        ));
    }
    // Both bounded by the storage size, which was read from the file.
    let (numel, offset) = (numel as usize, t.offset as usize);
    let mut row_major = true;
    let mut expect = 1u64;
    for (&d, &s) in t.shape.iter().zip(&t.stride).rev() {
        if d != 1 && s != expect {
            row_major = false;
            break;
        }
        expect *= d;
    }
    if row_major {
        let data = storage[offset * es..(offset + numel) * es].to_vec();
        return Ok(Tensor { dtype, shape, data });
    }
    // A dimension of size 1 never steps, whatever its stride says.
    let stride: Vec<usize> = t
        .shape
        .iter()
        .zip(&t.stride)
        .map(|(&d, &s)| if d == 1 { 0 } else { s as usize })
        .collect();
    let mut data = Vec::with_capacity(numel * es);
    let mut idx = vec![0usize; shape.len()];
    let mut pos = offset;
    for _ in 0..numel {
        data.extend_from_slice(&storage[pos * es..(pos + 1) * es]);
        for d in (0..shape.len()).rev() {
            idx[d] += 1;
            pos += stride[d];
            if idx[d] < shape[d] {
                break;
            }
            pos -= stride[d] * shape[d];
            idx[d] = 0;
        }
    }
    Ok(Tensor { dtype, shape, data })
}
