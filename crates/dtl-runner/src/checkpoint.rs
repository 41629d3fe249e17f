//! Checkpoints of the trainable tensors (side network and head only), as safetensors.
//!
//! Tensors keep their parameter names (`side.3.a`, `fusion.weight`, `head.bias`); the
//! optimizer state, when saved, sits under `optim.exp_avg.<name>` and
//! `optim.exp_avg_sq.<name>`. The metadata holds `format = "dtl-checkpoint"`, the resolved
//! pipeline TOML (`pipeline`) and the training position as JSON (`state`). Files are written
//! to a temporary name in the same folder and renamed, so a reader never sees half a file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use dtl_core::{DtlError, Param, Result};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::device::TrainDevice;
use crate::optim::AdamW;

/// The metadata value of `format`.
pub const FORMAT: &str = "dtl-checkpoint";

/// A checkpoint read from disk.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The file it was read from.
    pub path: PathBuf,
    /// Parameters: name, shape, values.
    pub params: Vec<(String, Vec<usize>, Vec<f32>)>,
    /// Optimizer moments by parameter name: (exp_avg, exp_avg_sq).
    pub optim: HashMap<String, (Vec<f32>, Vec<f32>)>,
    /// The resolved pipeline TOML it was trained with.
    pub pipeline: String,
    /// Training position and metrics (`epoch`, `batch`, `step`, `optim_steps`, `best_top1`, ...).
    pub state: serde_json::Value,
}

fn bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes `params` (and `optim`'s moments) to `path` atomically.
///
/// ```
/// use dfdx::prelude::*;
/// use dtl_core::Param;
/// let dev = Cpu::default();
/// let p = Param::from_vec(&dev, "head.bias", &[2], vec![1.0, 2.0]).unwrap();
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("last.safetensors");
/// dtl_runner::checkpoint::save(&path, &[&p], None, "[run]\n", &serde_json::json!({"epoch": 1})).unwrap();
/// let ck = dtl_runner::checkpoint::load(&path).unwrap();
/// assert_eq!(ck.params[0].2, vec![1.0, 2.0]);
/// assert_eq!(ck.state["epoch"], 1);
/// ```
pub fn save<D: TrainDevice>(
    path: &Path,
    params: &[&Param<D>],
    optim: Option<&AdamW<D>>,
    pipeline: &str,
    state: &serde_json::Value,
) -> Result<()> {
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = params
        .iter()
        .map(|p| (p.name.clone(), p.shape.clone(), bytes(&p.value.as_vec())))
        .collect();
    if let Some(opt) = optim {
        let (m, v) = opt.moments();
        for ((p, m), v) in params.iter().zip(&m).zip(&v) {
            data.push((
                format!("optim.exp_avg.{}", p.name),
                p.shape.clone(),
                bytes(m),
            ));
            data.push((
                format!("optim.exp_avg_sq.{}", p.name),
                p.shape.clone(),
                bytes(v),
            ));
        }
    }
    let views = data
        .iter()
        .map(|(n, s, b)| {
            TensorView::new(Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| DtlError::file(path, format!("tensor `{n}`: {e:?}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), FORMAT.to_string());
    meta.insert("pipeline".to_string(), pipeline.to_string());
    meta.insert("state".to_string(), state.to_string());
    let out = safetensors::serialize(views, &Some(meta))
        .map_err(|e| DtlError::file(path, format!("cannot serialise: {e:?}")))?;
    dtl_core::fsio::write_atomic(path, &out)
}

/// The keys whose values differ between two pipeline TOML texts, as
/// `key: stored -> current` lines, sorted (keys present on one side only show `-`).
///
/// A resumed run uses the current pipeline; the runner prints these so that a change made
/// between the runs (or the wrong run directory) is never silent.
///
/// ```
/// let a = "[optim]\nlr = 0.03\n[run]\nseed = 1\n";
/// let b = "[optim]\nlr = 0.01\n[run]\nseed = 1\n";
/// assert_eq!(dtl_runner::checkpoint::pipeline_changes(a, b), vec!["optim.lr: 0.03 -> 0.01"]);
/// ```
pub fn pipeline_changes(stored: &str, current: &str) -> Vec<String> {
    fn flatten(
        prefix: &str,
        v: &toml::Value,
        out: &mut std::collections::BTreeMap<String, String>,
    ) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flatten(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.to_string());
            }
        }
    }
    let parse = |s: &str| {
        let mut m = std::collections::BTreeMap::new();
        if let Ok(v) = s.parse::<toml::Value>() {
            flatten("", &v, &mut m);
        }
        m
    };
    let (a, b) = (parse(stored), parse(current));
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            let show = |m: &std::collections::BTreeMap<String, String>| {
                m.get(k).cloned().unwrap_or_else(|| "-".to_string())
            };
            format!("{k}: {} -> {}", show(&a), show(&b))
        })
        .collect()
}

/// Resolves a checkpoint argument: a file as is; a run directory to its `best.safetensors`
/// (`prefer_last = false`) or `last.safetensors`, falling back to the other.
pub fn resolve(path: &Path, prefer_last: bool) -> Result<PathBuf> {
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    if path.is_dir() {
        let (a, b) = if prefer_last {
            ("last", "best")
        } else {
            ("best", "last")
        };
        for name in [a, b] {
            let p = path.join(format!("{name}.safetensors"));
            if p.is_file() {
                return Ok(p);
            }
        }
        return Err(DtlError::file(
            path,
            "run directory holds neither best.safetensors nor last.safetensors",
        ));
    }
    Err(DtlError::file(
        path,
        "no such checkpoint file or run directory",
    ))
}

/// Reads a checkpoint written by [`save`].
pub fn load(path: &Path) -> Result<Checkpoint> {
    let raw = std::fs::read(path).map_err(|e| DtlError::io(path, e))?;
    let (_, meta) = SafeTensors::read_metadata(&raw)
        .map_err(|e| DtlError::file(path, format!("not a safetensors file: {e:?}")))?;
    let info = meta.metadata().clone().unwrap_or_default();
    if info.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(DtlError::file(path, "not a dtl checkpoint (metadata `format` is not \"dtl-checkpoint\"); pass a file written by `dtl run`"));
    }
    let st = SafeTensors::deserialize(&raw)
        .map_err(|e| DtlError::file(path, format!("not a safetensors file: {e:?}")))?;
    let mut params = Vec::new();
    let mut m1 = HashMap::new();
    let mut m2 = HashMap::new();
    let mut names: Vec<String> = st.names().into_iter().cloned().collect();
    names.sort();
    for name in names {
        let t = st
            .tensor(&name)
            .map_err(|e| DtlError::file(path, format!("tensor `{name}`: {e:?}")))?;
        if t.dtype() != Dtype::F32 {
            return Err(DtlError::file(
                path,
                format!("tensor `{name}` is {:?}; checkpoints hold f32", t.dtype()),
            ));
        }
        let v: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        crate::sanity::finite_tensor(path, "checkpoint", &name, &v)?;
        if let Some(n) = name.strip_prefix("optim.exp_avg_sq.") {
            m2.insert(n.to_string(), v);
        } else if let Some(n) = name.strip_prefix("optim.exp_avg.") {
            m1.insert(n.to_string(), v);
        } else {
            params.push((name.clone(), t.shape().to_vec(), v));
        }
    }
    let mut optim = HashMap::new();
    for (n, a) in m1 {
        if let Some(b) = m2.remove(&n) {
            optim.insert(n, (a, b));
        }
    }
    let state = match info.get("state") {
        Some(s) => serde_json::from_str(s)
            .map_err(|e| DtlError::file(path, format!("metadata `state` is not JSON: {e}")))?,
        None => serde_json::Value::Null,
    };
    Ok(Checkpoint {
        path: path.to_path_buf(),
        params,
        optim,
        pipeline: info.get("pipeline").cloned().unwrap_or_default(),
        state,
    })
}

impl Checkpoint {
    /// Copies the stored values into `params`; every parameter must be present with the
    /// same shape, and the checkpoint must hold no other parameter.
    pub fn apply<D: TrainDevice>(&self, params: Vec<&mut Param<D>>) -> Result<()> {
        let want: Vec<String> = params.iter().map(|p| p.name.clone()).collect();
        for (n, _, _) in &self.params {
            if !want.contains(n) {
                return Err(DtlError::file(&self.path, format!(
                    "tensor `{n}` is not a parameter of this pipeline's side network and head (expected: {})",
                    want.join(", ")
                )));
            }
        }
        for p in params {
            let (_, shape, v) = self.params.iter().find(|(n, _, _)| *n == p.name).ok_or_else(|| {
                DtlError::file(&self.path, format!("tensor `{}` is missing; was it trained with another side network or head?", p.name))
            })?;
            if *shape != p.shape {
                return Err(DtlError::file(
                    &self.path,
                    format!(
                        "tensor `{}` has shape {shape:?}, the pipeline needs {:?}",
                        p.name, p.shape
                    ),
                ));
            }
            p.value.copy_from(v);
        }
        Ok(())
    }

    /// Restores the optimizer moments for `names` (in the optimizer's order).
    pub fn apply_optim<D: TrainDevice>(&self, opt: &mut AdamW<D>, names: &[String]) -> Result<()> {
        for (i, n) in names.iter().enumerate() {
            let (a, b) = self.optim.get(n).ok_or_else(|| {
                DtlError::file(
                    &self.path,
                    format!(
                        "optimizer state of `{n}` is missing; resume from a `last.safetensors`"
                    ),
                )
            })?;
            opt.set_moments(i, a, b).map_err(|e| {
                DtlError::file(&self.path, format!("optimizer state of `{n}`: {e}"))
            })?;
        }
        opt.steps = self.state["optim_steps"].as_u64().unwrap_or(0);
        Ok(())
    }
}
