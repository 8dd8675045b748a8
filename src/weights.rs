//! Where a model's tensors come from ([`TensorSource`]), and its
//! safetensors implementation: memory-mapped files, the index of every tensor
//! in them, and loading one tensor at a time with its shape and dtype checked.
//! GGUF files are the other source (`crate::gguf`).
//!
//! Each tensor is copied out of the mapping into the device's storage and its
//! pages are then handed back to the kernel (`MADV_DONTNEED`), so loading a
//! model never holds the file's bytes and the loaded weights in memory at the
//! same time: peak RSS stays near the size of the weights in the target dtype.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, SafeTensors};

use crate::quant::QMatrix;
use crate::{Error, Result};

/// Where the decoder's tensors come from, named by their Hugging Face
/// checkpoint names (`model.layers.0.self_attn.q_proj.weight`), with
/// Hugging Face's shapes (`[out, in]`) and values: a source that stores them
/// otherwise (GGUF's names, permuted rows, Gemma's `1 + w` norms) translates,
/// so `Decoder::load` is one function for every format.
pub trait TensorSource {
    /// Loads `name`, checking it has `shape`, converting it to `dtype` on
    /// `device` (dequantizing it if it is stored quantized).
    fn load(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor>;

    /// Rows `rows` of the 2-D weight `name` (of `shape`) in the quantized
    /// format it is stored in, when the CPU kernels run that format, so a
    /// quantized file is used without a dense copy; `Ok(None)` when it is
    /// stored dense (then [`load`](Self::load) it).
    fn load_quantized(
        &self,
        name: &str,
        shape: &[usize],
        rows: Range<usize>,
    ) -> Result<Option<QMatrix>> {
        let _ = (name, shape, rows);
        Ok(None)
    }
}

struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
    /// Offset of the data section: 8 bytes of header length plus the header.
    data_start: usize,
}

#[derive(Clone)]
struct TensorEntry {
    file: usize,
    dtype: StDtype,
    shape: Vec<usize>,
    /// Byte range inside the data section.
    start: usize,
    end: usize,
}

/// Every tensor in a set of safetensors files, by name.
pub struct WeightStore {
    files: Vec<MappedFile>,
    tensors: HashMap<String, TensorEntry>,
}

impl WeightStore {
    /// Maps and indexes the files, validating each header: a truncated or
    /// corrupt file is reported here, naming it, before any tensor is read.
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut tensors = HashMap::new();
        for (file_idx, path) in paths.iter().enumerate() {
            let file = File::open(path).map_err(|e| Error::io(path, e))?;
            // SAFETY: the mapping is read-only and private; if another process
            // truncates the file while we run, reads may fault, a risk every
            // mmap-based loader (candle, llama.cpp) accepts for zero-copy I/O.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            let corrupt = |message: String| Error::CorruptWeights {
                path: path.clone(),
                message,
            };
            let (header_len, metadata) =
                SafeTensors::read_metadata(&mmap).map_err(|e| corrupt(describe(&e)))?;
            let data_start = 8 + header_len;
            let data_len = mmap.len() - data_start.min(mmap.len());
            for (name, info) in metadata.tensors() {
                let (start, end) = info.data_offsets;
                let expected = info
                    .shape
                    .iter()
                    .try_fold(info.dtype.bitsize(), |acc, &d| acc.checked_mul(d))
                    .map(|bits| bits.div_ceil(8));
                if end < start || end > data_len || expected != Some(end - start) {
                    return Err(corrupt(format!(
                        "tensor '{name}' declares bytes {start}..{end} for shape {:?} {:?}, which the file's {data_len} data bytes do not hold",
                        info.shape, info.dtype
                    )));
                }
                tensors.insert(
                    name,
                    TensorEntry {
                        file: file_idx,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        start,
                        end,
                    },
                );
            }
            files.push(MappedFile {
                path: path.clone(),
                mmap,
                data_start,
            });
        }
        Ok(WeightStore { files, tensors })
    }

    /// Whether a tensor exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Total bytes of tensor data across the files.
    pub fn total_bytes(&self) -> usize {
        self.tensors.values().map(|t| t.end - t.start).sum()
    }

    fn file_list(&self) -> String {
        self.files
            .iter()
            .map(|f| f.path.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl TensorSource for WeightStore {
    fn load(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let entry = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_owned(),
            files: self.file_list(),
        })?;
        let file = &self.files[entry.file];
        if entry.shape != shape {
            return Err(Error::TensorShape {
                name: name.to_owned(),
                path: file.path.clone(),
                found: entry.shape.clone(),
                expected: shape.to_vec(),
            });
        }
        let file_dtype = match entry.dtype {
            StDtype::F32 => DType::F32,
            StDtype::F16 => DType::F16,
            StDtype::BF16 => DType::BF16,
            other => {
                return Err(Error::TensorDtype {
                    name: name.to_owned(),
                    path: file.path.clone(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        let start = file.data_start + entry.start;
        let end = file.data_start + entry.end;
        let bytes = &file.mmap[start..end];
        let tensor = Tensor::from_raw_buffer(bytes, file_dtype, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?;
        release_pages(&file.mmap, start, end - start);
        Ok(tensor)
    }
}

/// Gives a copied range's pages back to the kernel so they stop counting
/// towards RSS; they are re-read from the file if ever touched again.
#[cfg(unix)]
pub(crate) fn release_pages(mmap: &Mmap, offset: usize, len: usize) {
    // SAFETY: the mapping is private and read-only, so dropping its pages
    // loses nothing: later reads fault them back in from the file. No slice
    // into this range outlives the copy made just before.
    let _ = unsafe { mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len) };
}

#[cfg(not(unix))]
pub(crate) fn release_pages(_mmap: &Mmap, _offset: usize, _len: usize) {}

fn describe(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall | E::InvalidHeaderLength => {
            "the header length is invalid (the file is truncated or not safetensors)".into()
        }
        E::MetadataIncompleteBuffer => {
            "the file is shorter than its header says (truncated download?)".into()
        }
        E::InvalidHeaderDeserialization(err) => format!("the header is not valid JSON: {err}"),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::path::Path;

    fn write_file(dir: &Path, name: &str, tensors: &[(&str, Vec<f32>, Vec<usize>)]) -> PathBuf {
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
            .iter()
            .map(|(n, data, shape)| {
                let bytes: &[u8] = bytemuck_f32(data);
                (
                    n.to_string(),
                    safetensors::tensor::TensorView::new(StDtype::F32, shape.clone(), bytes)
                        .unwrap(),
                )
            })
            .collect();
        let path = dir.join(name);
        safetensors::serialize_to_file(views, None::<HashMap<String, String>>, &path).unwrap();
        path
    }

    fn bytemuck_f32(v: &[f32]) -> &[u8] {
        // SAFETY: f32 has no padding and any byte pattern is a valid u8.
        unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
    }

    #[test]
    fn loads_and_checks_shapes() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let p = write_file(
            dir.path(),
            "a.safetensors",
            &[("w", vec![1., 2., 3., 4., 5., 6.], vec![2, 3])],
        );
        let store = WeightStore::open(&[p])?;
        let t = store.load("w", &[2, 3], DType::F32, &Device::Cpu)?;
        assert_eq!(
            t.to_vec2::<f32>()?,
            vec![vec![1., 2., 3.], vec![4., 5., 6.]]
        );
        let err = store
            .load("w", &[3, 2], DType::F32, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("'w'") && err.contains("[2, 3]"), "{err}");
        let err = store
            .load("nope", &[1], DType::F32, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("'nope'") && err.contains("a.safetensors"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn truncated_file_is_reported_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_file(
            dir.path(),
            "b.safetensors",
            &[("w", vec![0.5; 64], vec![8, 8])],
        );
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 10]).unwrap();
        let err = WeightStore::open(&[p])
            .err()
            .expect("truncated file must fail")
            .to_string();
        assert!(err.contains("b.safetensors"), "{err}");
    }

    #[test]
    fn garbage_file_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.safetensors");
        std::fs::write(&p, b"<html>not found</html>").unwrap();
        let err = WeightStore::open(&[p])
            .err()
            .expect("garbage must fail")
            .to_string();
        assert!(
            err.contains("c.safetensors") && err.contains("not a valid safetensors"),
            "{err}"
        );
    }
}
