//! Helpers shared by the integration tests: fixture paths and reference data.

#![allow(dead_code)]

pub mod hub_server;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};

/// The folder of a fixture model made by `scripts/make_fixtures.py`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name)
}

/// Every fixture model.
pub const MODELS: [&str; 16] = [
    "llama",
    "llama3",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "gemma2",
    "gemma3",
    "qwen3_moe",
    "mixtral",
    "llama_yarn",
    "phi3_longrope",
    "granite",
    "smollm3",
    "olmo2",
    "olmoe",
];

/// The safetensors weight files of a fixture (sharded or single), found the
/// way `--model DIR` finds them.
pub fn weight_files(dir: &std::path::Path) -> Vec<PathBuf> {
    let source = taper::hub::ModelSource::Local(dir.to_path_buf());
    let opts = taper::hub::HubOptions::from_env();
    taper::hub::resolve(&source, &opts)
        .expect("fixture resolves")
        .weights
}

/// Reference outputs from `transformers` for one fixture.
pub struct Reference {
    pub prompts: Vec<Vec<u32>>,
    pub greedy: Vec<Vec<u32>>,
    pub tensors: HashMap<String, Tensor>,
    pub json: serde_json::Value,
}

impl Reference {
    pub fn load(name: &str) -> Reference {
        let dir = fixture(name);
        let text = std::fs::read_to_string(dir.join("reference.json")).expect("reference.json");
        let json: serde_json::Value = serde_json::from_str(&text).expect("reference.json parses");
        let ids = |key: &str| -> Vec<Vec<u32>> {
            json[key]
                .as_array()
                .expect("list of lists")
                .iter()
                .map(|p| {
                    p.as_array()
                        .expect("list")
                        .iter()
                        .map(|t| t.as_u64().expect("id") as u32)
                        .collect()
                })
                .collect()
        };
        let tensors =
            candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)
                .expect("reference.safetensors loads");
        Reference {
            prompts: ids("prompts"),
            greedy: ids("greedy"),
            tensors,
            json,
        }
    }

    pub fn prompt_logits(&self, i: usize) -> &Tensor {
        &self.tensors[&format!("prompt_logits_{i}")]
    }

    pub fn decode_logits(&self, i: usize) -> &Tensor {
        &self.tensors[&format!("decode_logits_{i}")]
    }
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("diff computes")
}

/// Index of the largest value in a 1-D f32 tensor.
pub fn argmax(row: &Tensor) -> u32 {
    row.argmax(0)
        .and_then(|t| t.to_scalar::<u32>())
        .expect("argmax")
}

/// A real tokenizer unpacked by `scripts/fetch_tokenizers.sh` (into
/// `target/test-tokenizers`, or the folder in `TAPER_TEST_TOKENIZERS`).
/// Fails, saying how to fetch it, when it is missing.
pub fn real_tokenizer_dir(name: &str) -> PathBuf {
    let root = std::env::var_os("TAPER_TEST_TOKENIZERS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-tokenizers")
        });
    let dir = root.join(name);
    assert!(
        dir.join("tokenizer.json").is_file(),
        "{} is missing: run `scripts/fetch_tokenizers.sh target/test-tokenizers` \
         (or point TAPER_TEST_TOKENIZERS at a folder filled by it)",
        dir.join("tokenizer.json").display()
    );
    dir
}

/// Runs the real binary offline (`HF_HUB_OFFLINE=1`) with extra variables.
pub fn taper_with_env(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_taper"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .envs(env.iter().copied())
        .output()
        .expect("taper runs")
}

/// A finished process's stderr as text.
pub fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
