//! Reading an op's parameter table with messages that name the key path.

use std::cell::RefCell;
use std::collections::BTreeSet;

use dtl_core::{DtlError, Result};

/// The parameters of one `[augment]` op, read key by key.
///
/// Every error names the full key path (`augment.train[1].size: ...`), and [`Params::finish`]
/// rejects keys the op does not know, listing the ones it does.
///
/// ```
/// use dtl_data::params::Params;
/// let mut t = toml::Table::new();
/// t.insert("p".into(), toml::Value::Float(0.25));
/// let p = Params::new("hflip", &t, "augment.train[0]");
/// assert_eq!(p.f64_or("p", 0.5).unwrap(), 0.25);
/// p.finish().unwrap();
/// ```
pub struct Params<'a> {
    op: &'a str,
    table: &'a toml::Table,
    path: &'a str,
    known: RefCell<BTreeSet<&'static str>>,
}

impl<'a> Params<'a> {
    /// Wraps `table`, the parameters of op `op` found at `path`.
    pub fn new(op: &'a str, table: &'a toml::Table, path: &'a str) -> Self {
        Params {
            op,
            table,
            path,
            known: RefCell::new(BTreeSet::new()),
        }
    }

    /// An error about `key`.
    pub fn err(&self, key: &str, msg: impl std::fmt::Display) -> DtlError {
        DtlError::setting(format!("{}.{key}", self.path), msg.to_string())
    }

    fn get(&self, key: &'static str) -> Option<&'a toml::Value> {
        self.known.borrow_mut().insert(key);
        self.table.get(key)
    }

    /// Whether `key` is present.
    pub fn has(&self, key: &'static str) -> bool {
        self.get(key).is_some()
    }

    /// A number (integer or float), if present.
    pub fn f64_opt(&self, key: &'static str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(toml::Value::Float(f)) => Ok(Some(*f)),
            Some(toml::Value::Integer(i)) => Ok(Some(*i as f64)),
            Some(v) => Err(self.err(key, format!("expected a number, got {v}"))),
        }
    }

    /// A number with a default.
    pub fn f64_or(&self, key: &'static str, default: f64) -> Result<f64> {
        Ok(self.f64_opt(key)?.unwrap_or(default))
    }

    /// A probability in `[0, 1]` with a default.
    pub fn prob_or(&self, key: &'static str, default: f64) -> Result<f64> {
        let p = self.f64_or(key, default)?;
        if !(0.0..=1.0).contains(&p) {
            return Err(self.err(key, format!("must be a probability in [0, 1], got {p}")));
        }
        Ok(p)
    }

    /// A non-negative integer, if present.
    pub fn usize_opt(&self, key: &'static str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(toml::Value::Integer(i)) if *i >= 0 => Ok(Some(*i as usize)),
            Some(v) => Err(self.err(key, format!("expected a non-negative integer, got {v}"))),
        }
    }

    /// A string, if present.
    pub fn str_opt(&self, key: &'static str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok(Some(s.as_str())),
            Some(v) => Err(self.err(key, format!("expected a string, got {v}"))),
        }
    }

    /// A boolean with a default.
    pub fn bool_or(&self, key: &'static str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(toml::Value::Boolean(b)) => Ok(*b),
            Some(v) => Err(self.err(key, format!("expected true or false, got {v}"))),
        }
    }

    /// A list of `n` numbers, if present.
    pub fn f64s_opt(&self, key: &'static str, n: usize) -> Result<Option<Vec<f64>>> {
        match self.get(key) {
            None => Ok(None),
            Some(toml::Value::Array(a)) if a.len() == n => a
                .iter()
                .map(|v| match v {
                    toml::Value::Float(f) => Ok(*f),
                    toml::Value::Integer(i) => Ok(*i as f64),
                    _ => Err(self.err(key, format!("expected {n} numbers, got {v}"))),
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => Err(self.err(key, format!("expected a list of {n} numbers, got {v}"))),
        }
    }

    /// A size: an integer (`224`) or `[height, width]`; `None` when absent.
    pub fn size_opt(&self, key: &'static str) -> Result<Option<Size>> {
        let bad = |v: &toml::Value| {
            self.err(
                key,
                format!("expected a positive integer or [height, width], got {v}"),
            )
        };
        const MAX_SIDE: usize = dtl_core::limits::MAX_IMAGE_SIDE;
        let too_big = |i: i64| {
            self.err(
                key,
                format!("{i} px is more than the largest image side, {MAX_SIDE} px"),
            )
        };
        match self.get(key) {
            None => Ok(None),
            Some(toml::Value::Integer(i)) if *i > MAX_SIDE as i64 => Err(too_big(*i)),
            Some(toml::Value::Integer(i)) if *i > 0 => Ok(Some(Size::Short(*i as usize))),
            Some(v @ toml::Value::Array(a)) => {
                if a.len() != 2 {
                    return Err(bad(v));
                }
                let mut hw = [0usize; 2];
                for (slot, item) in hw.iter_mut().zip(a) {
                    match item {
                        toml::Value::Integer(i) if *i > MAX_SIDE as i64 => return Err(too_big(*i)),
                        toml::Value::Integer(i) if *i > 0 => *slot = *i as usize,
                        _ => return Err(bad(v)),
                    }
                }
                Ok(Some(Size::Exact(hw[0], hw[1])))
            }
            Some(v) => Err(bad(v)),
        }
    }

    /// A required size.
    pub fn size(&self, key: &'static str) -> Result<Size> {
        self.size_opt(key)?
            .ok_or_else(|| self.missing(key, "give an integer (e.g. 224) or [height, width]"))
    }

    /// The error for a missing required key, pointing at a misspelt one if there is one.
    pub fn missing(&self, key: &str, what: &str) -> DtlError {
        let near = dtl_core::error::closest(
            key,
            self.table.keys().map(|k| k.as_str()).filter(|k| *k != "op"),
        );
        match near {
            Some(k) => self.err(
                key,
                format!("is required: {what}; found `{k}`, did you mean `{key}`?"),
            ),
            None => self.err(key, format!("is required: {what}")),
        }
    }

    /// Fails on keys the op never asked for.
    pub fn finish(self) -> Result<()> {
        let known = self.known.into_inner();
        for k in self.table.keys() {
            if k != "op" && !known.contains(k.as_str()) {
                let valid: Vec<&str> = known.iter().copied().collect();
                return Err(DtlError::setting(
                    format!("{}.{k}", self.path),
                    format!(
                        "unknown key for op `{}`; valid keys: {}",
                        self.op,
                        names_or_none(&valid)
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// A target size: a single integer or an explicit `[height, width]`.
///
/// ```
/// use dtl_data::params::Size;
/// // An integer sets the shorter side (torchvision `Resize(int)`), keeping the aspect ratio.
/// assert_eq!(Size::Short(224).resolve(640, 480), (298, 224));
/// assert_eq!(Size::Exact(10, 20).resolve(640, 480), (20, 10));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    /// The shorter side (resize) or the side of a square (crops).
    Short(usize),
    /// `[height, width]`.
    Exact(usize, usize),
}

impl Size {
    /// `(width, height)` for an image of `width x height`, torchvision `Resize` semantics.
    pub fn resolve(self, width: usize, height: usize) -> (usize, usize) {
        match self {
            Size::Exact(h, w) => (w, h),
            Size::Short(s) => {
                if width <= height {
                    (s, (s as f64 * height as f64 / width.max(1) as f64) as usize)
                } else {
                    ((s as f64 * width as f64 / height.max(1) as f64) as usize, s)
                }
            }
        }
    }

    /// `(width, height)` of a crop: a square for an integer.
    pub fn square(self) -> (usize, usize) {
        match self {
            Size::Short(s) => (s, s),
            Size::Exact(h, w) => (w, h),
        }
    }
}

/// `names` joined by commas, or `none` when there are none: the list of valid keys in an error.
pub(crate) fn names_or_none(names: &[&str]) -> String {
    if names.is_empty() {
        "none".to_string()
    } else {
        names.join(", ")
    }
}
