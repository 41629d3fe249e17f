//! The reference tables of the unit tests (pixels computed with Pillow or torchvision),
//! kept as data files in `tests/data/`. Each file holds a `[pixels]` table of named byte
//! arrays; the test that reads a file shows the script that made it.

use std::collections::BTreeMap;

/// The named pixel arrays of one reference file.
pub(crate) struct Reference {
    file: &'static str,
    pixels: BTreeMap<String, Vec<u8>>,
}

impl Reference {
    /// Parses the reference file `file` (its text is `text`); a value that is not a list of
    /// bytes is a panic naming the file and the key, as a test failure should.
    pub(crate) fn parse(file: &'static str, text: &str) -> Self {
        let table: toml::Table =
            toml::from_str(text).unwrap_or_else(|e| panic!("tests/data/{file}: {e}"));
        let entries = table
            .get("pixels")
            .and_then(|v| v.as_table())
            .unwrap_or_else(|| panic!("tests/data/{file}: no [pixels] table"));
        let mut pixels = BTreeMap::new();
        for (name, value) in entries {
            let bytes = value
                .as_array()
                .into_iter()
                .flatten()
                .map(|v| v.as_integer().and_then(|i| u8::try_from(i).ok()))
                .collect::<Option<Vec<u8>>>()
                .filter(|b| !b.is_empty())
                .unwrap_or_else(|| {
                    panic!("tests/data/{file}: `{name}` is not a list of bytes (0-255)")
                });
            pixels.insert(name.clone(), bytes);
        }
        Reference { file, pixels }
    }

    /// The pixels stored under `name`.
    pub(crate) fn get(&self, name: &str) -> &[u8] {
        self.pixels
            .get(name)
            .unwrap_or_else(|| panic!("tests/data/{}: no `{name}` in [pixels]", self.file))
    }
}
