//! Decoded pixels held in memory, the items of the `idx` and `csv` layouts, and the reading
//! of their (possibly gzip-compressed) files.

use std::io::Read;
use std::path::{Path, PathBuf};

use dtl_core::{Dataset, DtlError, Example, Result, RgbImage};

/// Decoded pixels held in memory (IDX and CSV): greyscale or RGB, all the same size.
/// Opened through the `idx` and `csv` layouts.
///
/// ```
/// use dtl_core::{config::DataConfig, Dataset, Split};
/// let tmp = tempfile::tempdir().unwrap();
/// std::fs::write(tmp.path().join("train.csv"), "label,a,b,c,d\n1,0,255,0,255\n").unwrap();
/// let cfg: DataConfig = toml::from_str(&format!("kind = \"csv\"\nroot = {:?}", tmp.path())).unwrap();
/// let ds = dtl_core::registry().unwrap().open_dataset(&cfg, Split::Train).unwrap();
/// assert_eq!(ds.get(0).unwrap().image.pixel(1, 0), [255, 255, 255]);
/// assert!(ds.describe(0).ends_with("train.csv:2"));
/// # let _ = dtl_data::DataPipeline::new;
/// ```
#[derive(Debug, Clone)]
pub struct PixelDataset {
    pub(super) source: PathBuf,
    pub(super) what: &'static str,
    pub(super) width: usize,
    pub(super) height: usize,
    pub(super) channels: usize,
    pub(super) pixels: Vec<u8>,
    pub(super) labels: Vec<usize>,
    pub(super) classes: usize,
    /// Row (CSV line) of each item, for messages.
    pub(super) rows: Option<Vec<usize>>,
}

impl PixelDataset {
    /// Keeps the items whose label is in `keep` and relabels them by their position in it.
    pub(super) fn keep_labels(mut self, keep: &[usize]) -> Result<Self> {
        let n = self.width * self.height * self.channels;
        let mut pixels = Vec::new();
        let mut labels = Vec::new();
        let mut rows = self.rows.as_ref().map(|_| Vec::new());
        for (i, &l) in self.labels.iter().enumerate() {
            if let Some(new) = keep.iter().position(|&k| k == l) {
                pixels.extend_from_slice(&self.pixels[i * n..(i + 1) * n]);
                labels.push(new);
                if let (Some(out), Some(src)) = (rows.as_mut(), self.rows.as_ref()) {
                    out.push(src[i]);
                }
            }
        }
        if labels.is_empty() {
            return Err(DtlError::file(
                &self.source,
                format!("the split is empty: no item has a label in data.options.keep_labels = {keep:?}"),
            ));
        }
        self.pixels = pixels;
        self.labels = labels;
        self.rows = rows;
        self.classes = keep.len();
        Ok(self)
    }
}

impl Dataset for PixelDataset {
    fn sources(&self) -> Vec<PathBuf> {
        vec![self.source.clone()]
    }
    fn label(&self, index: usize) -> Option<usize> {
        self.labels.get(index).copied()
    }
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn num_classes(&self) -> usize {
        self.classes
    }
    fn get(&self, index: usize) -> Result<Example> {
        let n = self.width * self.height * self.channels;
        let px = &self.pixels[index * n..(index + 1) * n];
        let data = if self.channels == 1 {
            px.iter().flat_map(|&v| [v, v, v]).collect()
        } else {
            px.to_vec()
        };
        Ok(Example {
            image: RgbImage::new(self.width as u32, self.height as u32, data)?,
            label: self.labels[index],
        })
    }
    fn describe(&self, index: usize) -> String {
        match &self.rows {
            Some(r) => format!("{}:{}", self.source.display(), r[index]),
            None => format!("{} {} {index}", self.source.display(), self.what),
        }
    }
}

/// The bytes of `path`, gunzipped when they start with the gzip magic number.
pub(super) fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| DtlError::io(path, e))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| DtlError::file(path, format!("cannot decompress gzip data: {e}")))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}
