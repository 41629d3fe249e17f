//! Text files as people write them: a UTF-8 byte-order mark is not data, a byte that is not
//! UTF-8 is reported with its line, and a path that is a directory or a device says so.

use std::path::Path;

use dtl_core::{DtlError, Result};

/// The UTF-8 byte-order mark some editors put at the start of a file.
pub const BOM: &[u8] = b"\xEF\xBB\xBF";

/// `bytes` as text without a leading byte-order mark; a byte sequence that is not UTF-8 is an
/// error naming `path` and its 1-based line.
///
/// ```
/// use dtl_data::text::decode;
/// assert_eq!(decode("l.txt".as_ref(), b"\xEF\xBB\xBFa 1\n").unwrap(), "a 1\n");
/// let e = decode("l.txt".as_ref(), b"a 1\nb\xff 2\n").unwrap_err();
/// assert_eq!(e.to_string(), "l.txt: line 2: is not UTF-8 text (byte 0xff at column 2); save the file as UTF-8");
/// ```
pub fn decode(path: &Path, bytes: &[u8]) -> Result<String> {
    let bytes = bytes.strip_prefix(BOM).unwrap_or(bytes);
    match std::str::from_utf8(bytes) {
        Ok(s) => Ok(s.to_string()),
        Err(e) => {
            let at = e.valid_up_to();
            let before = &bytes[..at];
            let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
            let col = at
                - before
                    .iter()
                    .rposition(|&b| b == b'\n')
                    .map_or(0, |p| p + 1)
                + 1;
            Err(DtlError::file(
                path,
                format!(
                    "line {line}: is not UTF-8 text (byte 0x{:02x} at column {col}); save the file as UTF-8",
                    bytes[at]
                ),
            ))
        }
    }
}

/// Checks that `path` is a regular file, saying what it is otherwise.
///
/// ```
/// let e = dtl_data::text::regular_file(std::env::temp_dir().as_path()).unwrap_err();
/// assert!(e.to_string().ends_with("is a directory, not a file"));
/// ```
pub fn regular_file(path: &Path) -> Result<()> {
    match dtl_core::paths::not_a_file(path) {
        None => Ok(()),
        Some(why) => Err(DtlError::file(path, why)),
    }
}

/// Reads a text file: a regular file, BOM dropped, UTF-8 checked with the line named.
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// let p = dir.path().join("train.txt");
/// std::fs::write(&p, b"\xEF\xBB\xBFimages/a.png 0\n").unwrap();
/// assert_eq!(dtl_data::text::read(&p).unwrap(), "images/a.png 0\n");
/// ```
pub fn read(path: &Path) -> Result<String> {
    regular_file(path)?;
    let bytes = std::fs::read(path).map_err(|e| DtlError::io(path, e))?;
    decode(path, &bytes)
}

/// A label parsed from a data file, refused above the largest class count a head may have
/// ([`dtl_core::limits::MAX_CLASSES`]), naming the file and line.
///
/// ```
/// assert_eq!(dtl_data::text::label("t.csv".as_ref(), 3, 7).unwrap(), 7);
/// let e = dtl_data::text::label("t.csv".as_ref(), 3, 4_000_000_000).unwrap_err();
/// assert!(e.to_string().starts_with("t.csv: line 3: label 4000000000 is out of range"), "{e}");
/// ```
pub fn label(path: &Path, line: usize, label: usize) -> Result<usize> {
    let max = dtl_core::limits::MAX_CLASSES;
    if label >= max {
        return Err(DtlError::file(
            path,
            format!(
                "line {line}: label {label} is out of range: labels are class indices 0-{}",
                max - 1
            ),
        ));
    }
    Ok(label)
}
