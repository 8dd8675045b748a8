//! The real `taper` binary on fixture models: greedy output equals the
//! `transformers` reference, and bad input gets a clear error and a
//! non-zero exit, never a panic.

use std::path::Path;
use std::process::{Command, Output};

use crate::common::{fixture, Reference};

fn taper(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_taper"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("taper runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Copies a fixture so a test can damage it.
fn copy_fixture(name: &str, to: &Path) {
    for entry in std::fs::read_dir(fixture(name)).expect("fixture dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
    }
}

#[test]
fn generate_greedy_equals_the_transformers_reference() {
    for name in ["qwen2", "llama", "gemma2"] {
        let r = Reference::load(name);
        let want = r.json["greedy_text_0"].as_str().expect("greedy_text_0");
        let dir = fixture(name);
        let prompt = "The quick b";
        let o = taper(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            prompt,
            "--temperature",
            "0",
            "--max-tokens",
            "32",
            "--ignore-eos",
        ]);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let out = String::from_utf8_lossy(&o.stdout);
        // The binary ends the output with a newline.
        assert_eq!(out.strip_suffix('\n'), Some(want), "{name}: greedy text");
        let err = stderr(&o);
        assert!(
            err.contains("prompt: 5 tokens") && err.contains("generated: 32 tokens"),
            "{err}"
        );
    }
}

#[test]
fn the_same_seed_gives_the_same_text() {
    let dir = fixture("mistral");
    let run = |seed: &str| {
        let o = taper(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            "Once",
            "--temperature",
            "1.0",
            "--max-tokens",
            "24",
            "--ignore-eos",
            "--seed",
            seed,
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        o.stdout
    };
    assert_eq!(run("7"), run("7"));
    assert_ne!(run("7"), run("8"));
}

#[test]
fn a_request_longer_than_the_context_is_refused() {
    let dir = fixture("qwen2");
    let o = taper(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "hi",
        "--max-tokens",
        "100000",
    ]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("exceeds the model's context of 512 tokens"),
        "{err}"
    );
}

#[test]
fn an_unknown_architecture_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    copy_fixture("qwen2", tmp.path());
    let cfg = tmp.path().join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("Qwen2ForCausalLM", "FalconForCausalLM");
    std::fs::write(&cfg, text).unwrap();
    let o = taper(&[
        "generate",
        "--model",
        tmp.path().to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("unsupported architecture 'FalconForCausalLM'")
            && err.contains("Gemma3ForCausalLM"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_truncated_weight_file_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    copy_fixture("qwen3", tmp.path());
    let w = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    let o = taper(&[
        "generate",
        "--model",
        tmp.path().to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("model.safetensors") && err.contains("not a valid safetensors"),
        "{err}"
    );
}

#[test]
fn a_tensor_of_the_wrong_shape_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    copy_fixture("mistral", tmp.path());
    let cfg = tmp.path().join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"intermediate_size\": 128", "\"intermediate_size\": 96");
    std::fs::write(&cfg, text).unwrap();
    let o = taper(&[
        "generate",
        "--model",
        tmp.path().to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("gate_proj.weight") && err.contains("[128, 64]") && err.contains("[96, 64]"),
        "{err}"
    );
}

#[test]
fn a_missing_config_field_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    copy_fixture("phi3", tmp.path());
    let cfg = tmp.path().join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"num_hidden_layers\"", "\"num_hidden_layerz\"");
    std::fs::write(&cfg, text).unwrap();
    let o = taper(&[
        "generate",
        "--model",
        tmp.path().to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("'num_hidden_layers'"), "{}", stderr(&o));
}

#[test]
fn a_missing_weight_file_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    copy_fixture("qwen2", tmp.path());
    std::fs::remove_file(tmp.path().join("model.safetensors")).unwrap();
    let o = taper(&[
        "generate",
        "--model",
        tmp.path().to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("model.safetensors"), "{}", stderr(&o));
}

#[test]
fn cuda_without_the_feature_is_explained() {
    if cfg!(feature = "cuda") {
        return;
    }
    let dir = fixture("qwen2");
    let o = taper(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "hi",
        "--device",
        "cuda",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--features cuda"), "{}", stderr(&o));
}

#[test]
fn a_stop_string_ends_the_text_before_it() {
    let dir = fixture("qwen2");
    let full = taper(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "The quick b",
        "--temperature",
        "0",
        "--max-tokens",
        "32",
        "--ignore-eos",
    ]);
    let text = String::from_utf8_lossy(&full.stdout)
        .trim_end_matches('\n')
        .to_string();
    // Stop at a short piece from the middle of the reference continuation.
    let mid: String = text
        .chars()
        .skip(text.chars().count() / 2)
        .take(2)
        .collect();
    let cut = text.find(&mid).expect("piece is in the text");
    let o = taper(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "The quick b",
        "--temperature",
        "0",
        "--max-tokens",
        "32",
        "--ignore-eos",
        "--stop",
        &mid,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let got = String::from_utf8_lossy(&o.stdout);
    assert_eq!(got.trim_end_matches('\n'), &text[..cut]);
    assert!(stderr(&o).contains("finish: stop"), "{}", stderr(&o));
}
