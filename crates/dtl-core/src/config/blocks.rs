//! Block ranges: `side.taps` and `side.injects` written as `"0-11"`, `"0-3,8"`, `"all"`,
//! `"none"` or a list of indices.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A set of block indices written as `"0-11"`, `"0-3,6,8-11"`, `"all"`, `"none"` or a list.
///
/// ```
/// use dtl_core::config::Blocks;
/// let b: Blocks = "0-2,5".parse().unwrap();
/// assert_eq!(b.resolve(12), vec![0, 1, 2, 5]);
/// assert_eq!("all".parse::<Blocks>().unwrap().resolve(3), vec![0, 1, 2]);
/// assert!("3-1".parse::<Blocks>().is_err());
/// // No backbone has 4 billion blocks: an index past MAX_BLOCK is refused, never expanded.
/// assert!("0-4000000000".parse::<Blocks>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Blocks {
    /// Every block.
    All,
    /// Explicit indices, sorted and deduplicated.
    List(Vec<usize>),
}

impl Blocks {
    /// The largest block index a pipeline may name (backbones have tens of blocks).
    pub const MAX_BLOCK: usize = 4095;

    fn too_far(i: impl fmt::Display) -> String {
        format!(
            "block {i} is past the largest block index, {}",
            Blocks::MAX_BLOCK
        )
    }

    /// The indices for a backbone of `depth` blocks (indices past the depth are kept, so
    /// that validation can report them).
    pub fn resolve(&self, depth: usize) -> Vec<usize> {
        match self {
            Blocks::All => (0..depth).collect(),
            Blocks::List(v) => v.clone(),
        }
    }
}

impl std::str::FromStr for Blocks {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let t = s.trim();
        if t == "all" {
            return Ok(Blocks::All);
        }
        if t == "none" || t.is_empty() {
            return Ok(Blocks::List(vec![]));
        }
        let mut out = Vec::new();
        for part in t.split(',') {
            let part = part.trim();
            let bad = || {
                format!("`{part}` is not a block index or range; write e.g. \"0-11\", \"0-3,8\", \"all\" or [0, 1, 2]")
            };
            if let Some((a, b)) = part.split_once('-') {
                let a: usize = a.trim().parse().map_err(|_| bad())?;
                let b: usize = b.trim().parse().map_err(|_| bad())?;
                if a > b {
                    return Err(format!(
                        "range `{part}` is empty: its start is after its end"
                    ));
                }
                if b > Blocks::MAX_BLOCK {
                    return Err(Blocks::too_far(b));
                }
                out.extend(a..=b);
            } else {
                let i: usize = part.parse().map_err(|_| bad())?;
                if i > Blocks::MAX_BLOCK {
                    return Err(Blocks::too_far(i));
                }
                out.push(i);
            }
        }
        out.sort_unstable();
        out.dedup();
        Ok(Blocks::List(out))
    }
}

impl fmt::Display for Blocks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Blocks::All => write!(f, "all"),
            Blocks::List(v) => {
                let mut parts = Vec::new();
                let mut i = 0;
                while i < v.len() {
                    let mut j = i;
                    while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
                        j += 1;
                    }
                    parts.push(if i == j {
                        v[i].to_string()
                    } else {
                        format!("{}-{}", v[i], v[j])
                    });
                    i = j + 1;
                }
                if parts.is_empty() {
                    write!(f, "none")
                } else {
                    write!(f, "{}", parts.join(","))
                }
            }
        }
    }
}

impl Serialize for Blocks {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Blocks {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            List(Vec<i64>),
        }
        match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "expected block indices: a string like \"0-11\" or \"0-3,8\" or \"all\", or a list like [0, 1, 2]",
            )
        })? {
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
            Raw::List(v) => {
                let mut out = Vec::new();
                for i in v {
                    if i < 0 {
                        return Err(serde::de::Error::custom(format!(
                            "block index {i} is negative"
                        )));
                    }
                    if i as u64 > Blocks::MAX_BLOCK as u64 {
                        return Err(serde::de::Error::custom(Blocks::too_far(i)));
                    }
                    out.push(i as usize);
                }
                out.sort_unstable();
                out.dedup();
                Ok(Blocks::List(out))
            }
        }
    }
}
