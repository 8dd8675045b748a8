//! The decoder models and loading them from resolved files.
//!
//! [`load`] is the one entry point: config, weights, dtype and device in, a
//! [`Decoder`] out ([`load_quantized`]: the same with the projections
//! quantized). The decoder itself is architecture-generic ([`decoder`]); its
//! building blocks live in [`layers`].

pub mod decoder;
pub mod layers;
pub mod moe;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

pub use decoder::{Decoder, Logits, SeqInput};

use crate::config::ModelConfig;
use crate::quant::Quant;
use crate::weights::WeightStore;
use crate::Result;

/// Loads a model from its `config.json` and safetensors files, dense.
pub fn load(
    config_path: &Path,
    weights: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<Decoder> {
    load_quantized(config_path, weights, dtype, device, Quant::None)
}

/// [`load`], with the linear projections stored as `quant` says (quantized
/// one tensor at a time as they are read).
pub fn load_quantized(
    config_path: &Path,
    weights: &[PathBuf],
    dtype: DType,
    device: &Device,
    quant: Quant,
) -> Result<Decoder> {
    let config = ModelConfig::from_file(config_path)?;
    let store = WeightStore::open(weights)?;
    // The store (and its mappings) is dropped on return: the model owns
    // copies of every tensor it uses.
    Decoder::load(config, &store, dtype, device, quant)
}
