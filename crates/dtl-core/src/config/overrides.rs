//! `key=value` overrides from the command line, merged into the pipeline's TOML table before
//! it is parsed.

use crate::{DtlError, Result};

/// Parses a `key=value` override into a dotted key and a TOML value. Values are read as
/// TOML (`3e-4`, `true`, `[1, 2]`, `"x"`); anything that is not valid TOML is a string.
///
/// ```
/// let (k, v) = dtl_core::config::parse_override("optim.lr=3e-4").unwrap();
/// assert_eq!(k, "optim.lr");
/// assert_eq!(v.as_float(), Some(3e-4));
/// let (_, v) = dtl_core::config::parse_override("side.taps=0-11").unwrap();
/// assert_eq!(v.as_str(), Some("0-11"));
/// ```
pub fn parse_override(text: &str) -> Result<(String, toml::Value)> {
    let (key, value) = text.split_once('=').ok_or_else(|| {
        DtlError::config(
            "command line",
            text,
            None,
            "an override must look like `section.key=value`, e.g. `optim.lr=3e-4`",
        )
    })?;
    let key = key.trim().to_string();
    if key.is_empty() || key.split('.').any(|p| p.is_empty()) {
        return Err(DtlError::config(
            "command line",
            text,
            None,
            "an override key must be dotted like `optim.lr`",
        ));
    }
    let value = value.trim();
    let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    Ok((key, parsed))
}

/// Sets the dotted `key` of `table` to `value`, creating the tables on the way.
pub(super) fn apply_override(table: &mut toml::Table, key: &str, value: toml::Value) -> Result<()> {
    let parts: Vec<&str> = key.split('.').collect();
    let mut cur = table;
    for (i, p) in parts.iter().enumerate() {
        if i + 1 == parts.len() {
            cur.insert(p.to_string(), value);
            return Ok(());
        }
        let entry = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry.as_table_mut().ok_or_else(|| {
            DtlError::config(
                "command line",
                key,
                None,
                format!(
                    "`{}` is not a table, so `{key}` cannot be set",
                    parts[..=i].join(".")
                ),
            )
        })?;
    }
    Ok(())
}
