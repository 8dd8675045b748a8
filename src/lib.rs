//! taper: a Hugging Face-compatible LLM inference runtime on candle.
//!
//! Data flows one way: a model source ([`hub`]) resolves to files, [`config`]
//! turns `config.json` into one runtime [`config::ModelConfig`], [`weights`]
//! memory-maps the safetensors (or [`gguf`] reads a GGUF file's metadata and
//! tensors into the same two), and [`models`] builds the decoder whose forward
//! pass takes a batch of sequences with their own positions and KV caches
//! ([`kv_cache`]), owned outside the model so a scheduler can batch them.

pub mod bench;
pub mod bench_serve;
pub mod chat_template;
pub mod config;
pub mod constraint;
pub mod cpu_attention;
pub mod cpu_ops;
pub mod dense;
pub mod device;
pub mod engine;
pub mod error;
pub mod gguf;
pub mod hub;
pub mod kv_cache;
pub mod metrics;
pub mod models;
pub mod pipeline;
pub mod quant;
pub mod sampling;
pub mod server;
pub mod stopping;
#[cfg(test)]
mod test_values;
pub mod tokenizer;
pub mod tools;
pub mod weights;

pub use error::{Error, Result};
