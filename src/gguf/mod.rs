//! GGUF files (llama.cpp's format): one file holding a model's weights, its
//! hyper-parameters and its tokenizer.
//!
//! [`GgufFile`] maps the file and reads its header with candle's
//! `gguf_file` parser, then checks that every tensor's bytes lie inside the
//! file, so a truncated download is reported at open, naming the file and
//! the first tensor it cuts, rather than as a fault mid-load. The rest turns
//! what llama.cpp's converter (`convert_hf_to_gguf.py`) wrote back into
//! taper's own types:
//!
//! - [`config`]: `general.architecture` and `{arch}.*` metadata → the same
//!   runtime [`ModelConfig`](crate::config::ModelConfig) `config.json` gives;
//! - [`weights`]: GGUF tensors under the decoder's Hugging Face names, with
//!   the converter's changes undone (Llama's permuted Q/K rows, Gemma's
//!   `1 + w` norms), as a [`TensorSource`](crate::weights::TensorSource);
//! - [`tokenizer`]: `tokenizer.ggml.*` → a `tokenizers` tokenizer, for files
//!   that come without `tokenizer.json`.
//!
//! Talks to `hub` (which finds the file), `pipeline` (which loads from it)
//! and `models` (through `TensorSource`).

pub mod config;
pub mod tokenizer;
pub mod weights;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use memmap2::Mmap;

use crate::{Error, Result};

pub use config::model_config;
pub use weights::GgufWeights;

/// One tensor's entry in the file: its type, its shape in Hugging Face's
/// order (`[rows, cols]`: GGUF lists dimensions innermost first) and where
/// its bytes are.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub dtype: GgmlDType,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: usize,
    end: usize,
}

/// A memory-mapped GGUF file with its metadata and tensor index.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    metadata: HashMap<String, Value>,
    tensors: HashMap<String, TensorEntry>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish_non_exhaustive()
    }
}

impl GgufFile {
    /// Maps the file and reads its header, checking that every tensor's
    /// data lies inside the file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only private mapping; as in `weights.rs`, a file
        // truncated by another process while mapped could fault on read, a
        // risk every mmap-based loader accepts.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let corrupt = |message: String| Error::CorruptGguf {
            path: path.to_path_buf(),
            message,
        };
        let content = Content::read(&mut std::io::Cursor::new(&mmap[..]))
            .map_err(|e| corrupt(describe(&e)))?;
        let data_start = usize::try_from(content.tensor_data_offset)
            .map_err(|_| corrupt("the tensor data offset does not fit in memory".into()))?;
        let file_len = mmap.len();
        let mut tensors = HashMap::with_capacity(content.tensor_infos.len());
        // Sorted, so the tensor named in an error does not depend on hashing.
        let mut infos: Vec<_> = content.tensor_infos.iter().collect();
        infos.sort_by_key(|(_, info)| info.offset);
        for (name, info) in infos {
            let shape = info.shape.dims().to_vec();
            let elems: usize = shape.iter().product();
            let block = info.ggml_dtype.block_size();
            // Quantized rows are whole blocks: the innermost dimension must
            // be a multiple of the block, or rows would share blocks.
            if shape.last().is_some_and(|&cols| cols % block != 0) {
                return Err(corrupt(format!(
                    "tensor '{name}' of shape {shape:?} is {}, whose rows must be a multiple of {block}",
                    type_name(info.ggml_dtype)
                )));
            }
            let bytes = elems / block * info.ggml_dtype.type_size();
            let start = usize::try_from(info.offset)
                .ok()
                .and_then(|o| data_start.checked_add(o));
            let end = start.and_then(|s| s.checked_add(bytes));
            let (Some(start), Some(end)) = (start, end) else {
                return Err(corrupt(format!(
                    "tensor '{name}' has an offset beyond any file"
                )));
            };
            if end > file_len {
                return Err(corrupt(format!(
                    "tensor '{name}' needs bytes {start}..{end} but the file has {file_len} \
                     (truncated download?)"
                )));
            }
            tensors.insert(
                name.clone(),
                TensorEntry {
                    dtype: info.ggml_dtype,
                    shape,
                    start,
                    end,
                },
            );
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            mmap,
            metadata: content.metadata,
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A tensor's entry, by its GGUF name.
    pub fn tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.get(name)
    }

    /// A tensor's bytes as stored.
    pub(crate) fn bytes(&self, entry: &TensorEntry) -> &[u8] {
        &self.mmap[entry.start..entry.end]
    }

    /// Hands a tensor's pages back to the kernel once it has been copied
    /// out, as the safetensors loader does, so peak memory stays near the
    /// size of the loaded weights.
    pub(crate) fn release(&self, entry: &TensorEntry) {
        crate::weights::release_pages(&self.mmap, entry.start, entry.end - entry.start);
    }

    /// A metadata value, by key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// An error about this file's metadata.
    pub(crate) fn err(&self, message: String) -> Error {
        Error::Config {
            path: self.path.clone(),
            message,
        }
    }

    fn wrong_type(&self, key: &str, wanted: &str, found: &Value) -> Error {
        self.err(format!(
            "metadata '{key}' must be {wanted}, found {:?}",
            found.value_type()
        ))
    }

    /// A non-negative integer of any width.
    pub fn usize(&self, key: &str) -> Result<Option<usize>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        as_i128(v)
            .and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| self.wrong_type(key, "a non-negative integer", v))
    }

    /// A required non-negative integer.
    pub fn require_usize(&self, key: &str) -> Result<usize> {
        self.usize(key)?
            .ok_or_else(|| self.err(format!("required metadata '{key}' is missing")))
    }

    /// A number (float or integer).
    pub fn f64(&self, key: &str) -> Result<Option<f64>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        match v {
            Value::F32(x) => Ok(Some(f64::from(*x))),
            Value::F64(x) => Ok(Some(*x)),
            other => as_i128(other)
                .map(|n| Some(n as f64))
                .ok_or_else(|| self.wrong_type(key, "a number", v)),
        }
    }

    pub fn str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.wrong_type(key, "a string", v)),
        }
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.wrong_type(key, "true or false", v)),
        }
    }

    /// An array of strings.
    pub fn strings(&self, key: &str) -> Result<Option<Vec<&str>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let bad = || self.wrong_type(key, "an array of strings", v);
        match v {
            Value::Array(items) => items
                .iter()
                .map(|item| match item {
                    Value::String(s) => Ok(s.as_str()),
                    _ => Err(bad()),
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            _ => Err(bad()),
        }
    }

    /// An array of integers of any width.
    pub fn ints(&self, key: &str) -> Result<Option<Vec<i128>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let bad = || self.wrong_type(key, "an array of integers", v);
        match v {
            Value::Array(items) => items
                .iter()
                .map(|item| as_i128(item).ok_or_else(bad))
                .collect::<Result<Vec<_>>>()
                .map(Some),
            _ => Err(bad()),
        }
    }

    /// An array of numbers, as f32.
    pub fn floats(&self, key: &str) -> Result<Option<Vec<f32>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let bad = || self.wrong_type(key, "an array of numbers", v);
        match v {
            Value::Array(items) => items
                .iter()
                .map(|item| match item {
                    Value::F32(x) => Ok(*x),
                    Value::F64(x) => Ok(*x as f32),
                    other => as_i128(other).map(|n| n as f32).ok_or_else(bad),
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            _ => Err(bad()),
        }
    }

    /// A token id (`tokenizer.ggml.*_token_id`).
    pub fn token_id(&self, key: &str) -> Result<Option<u32>> {
        self.usize(key)?
            .map(|id| {
                u32::try_from(id)
                    .map_err(|_| self.err(format!("metadata '{key}' ({id}) is not a token id")))
            })
            .transpose()
    }
}

fn as_i128(v: &Value) -> Option<i128> {
    Some(match v {
        Value::U8(x) => i128::from(*x),
        Value::I8(x) => i128::from(*x),
        Value::U16(x) => i128::from(*x),
        Value::I16(x) => i128::from(*x),
        Value::U32(x) => i128::from(*x),
        Value::I32(x) => i128::from(*x),
        Value::U64(x) => i128::from(*x),
        Value::I64(x) => i128::from(*x),
        _ => return None,
    })
}

/// llama.cpp's name for a tensor type (`Q4_K`, not candle's `Q4K`).
pub fn type_name(dtype: GgmlDType) -> &'static str {
    match dtype {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// llama.cpp's name for a `ggml_type` id candle does not know.
fn ggml_type_name(id: u32) -> Option<&'static str> {
    Some(match id {
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return None,
    })
}

/// What went wrong reading the header, in the user's terms.
fn describe(e: &candle_core::Error) -> String {
    // The first line: with RUST_BACKTRACE set, candle appends a backtrace.
    let text = e.to_string();
    let text = text.lines().next().unwrap_or_default().trim().to_string();
    // candle stops at the first tensor of a type it does not know and names
    // only the type id.
    if let Some(id) = text
        .strip_prefix("unknown dtype for tensor ")
        .and_then(|rest| rest.trim().parse::<u32>().ok())
    {
        let name = ggml_type_name(id).unwrap_or("an unknown type");
        return format!(
            "a tensor is stored as {name} (ggml type {id}), which taper cannot load \
             (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K-Q6_K)"
        );
    }
    if text.contains("failed to fill whole buffer") || text.contains("remaining") {
        return format!("the header is cut short (truncated download?): {text}");
    }
    if text.contains("unknown magic") {
        return "it does not start with the GGUF magic number (not a GGUF file?)".into();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/gguf")
            .join(name)
    }

    #[test]
    fn reads_metadata_and_tensors() -> Result<()> {
        let f = GgufFile::open(&fixture("qwen2-q8_0.gguf"))?;
        assert_eq!(f.str("general.architecture")?, Some("qwen2"));
        assert_eq!(f.usize("qwen2.block_count")?, Some(3));
        assert_eq!(f.f64("qwen2.rope.freq_base")?, Some(1_000_000.0));
        let q = f.tensor("blk.0.attn_q.weight").expect("attn_q");
        assert_eq!(q.dtype, GgmlDType::Q8_0);
        assert_eq!(q.shape, [64, 64]);
        // 64 × 64 weights in blocks of 32, 34 bytes each.
        assert_eq!(f.bytes(q).len(), 64 * 2 * 34);
        let err = f.usize("general.architecture").unwrap_err().to_string();
        assert!(err.contains("general.architecture"), "{err}");
        Ok(())
    }

    /// A tensor in a type candle does not parse (the i-quants) is named by
    /// its type.
    #[test]
    fn an_unknown_tensor_type_is_named() -> Result<()> {
        let mut bytes =
            std::fs::read(fixture("qwen2-q8_0.gguf")).map_err(|e| Error::io("read", e))?;
        // The tensor info: name, n_dims (u32), dims (u64 each), type (u32).
        let name = b"blk.0.attn_q.weight";
        let at = bytes
            .windows(name.len())
            .position(|w| w == name)
            .expect("tensor info");
        let ty = at + name.len() + 4 + 2 * 8;
        assert_eq!(bytes[ty..ty + 4], 8u32.to_le_bytes(), "Q8_0's id");
        bytes[ty..ty + 4].copy_from_slice(&16u32.to_le_bytes());
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let path = dir.path().join("iq.gguf");
        std::fs::write(&path, &bytes).map_err(|e| Error::io(&path, e))?;
        let err = GgufFile::open(&path).unwrap_err().to_string();
        assert!(
            err.contains("iq.gguf") && err.contains("IQ2_XXS") && err.contains("cannot load"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn truncation_is_reported_with_the_file_and_tensor() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let bytes = std::fs::read(fixture("llama-f32.gguf")).map_err(|e| Error::io("read", e))?;
        for (cut, want) in [
            (bytes.len() - 100, "truncated download"),
            (bytes.len() / 2, "truncated download"),
            (200, "cut short"),
            (6, "cut short"),
        ] {
            let path = dir.path().join("cut.gguf");
            std::fs::write(&path, &bytes[..cut]).map_err(|e| Error::io(&path, e))?;
            let err = GgufFile::open(&path).unwrap_err().to_string();
            assert!(
                err.contains("cut.gguf") && err.contains("not a valid GGUF") && err.contains(want),
                "cut at {cut}: {err}"
            );
        }
        let path = dir.path().join("html.gguf");
        std::fs::write(&path, b"<html>not found</html>").map_err(|e| Error::io(&path, e))?;
        let err = GgufFile::open(&path).unwrap_err().to_string();
        assert!(err.contains("html.gguf") && err.contains("magic"), "{err}");
        Ok(())
    }
}
