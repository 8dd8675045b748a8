//! The real `taper` binary on fixture models: greedy output equals the
//! `transformers` reference, and bad input gets a clear error and a
//! non-zero exit, never a panic.

use std::path::Path;
use std::process::Output;

use crate::common::{fixture, stderr, Reference};

fn taper(args: &[&str]) -> Output {
    crate::common::taper_with_env(args, &[])
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

/// A copy of fixture `name` damaged by `damage`, for the error tests.
fn damaged(name: &str, damage: impl FnOnce(&Path)) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("temp dir");
    copy_fixture(name, tmp.path());
    damage(tmp.path());
    tmp
}

/// Replaces `from` with `to` in `file`.
fn edit(file: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(file).expect("read");
    assert!(text.contains(from), "{from} is not in {}", file.display());
    std::fs::write(file, text.replace(from, to)).expect("write");
}

/// Runs `generate` on a damaged model: it must fail cleanly. Returns stderr.
fn generate_fails(dir: &Path) -> String {
    let o = taper(&[
        "generate",
        "--model",
        dir.to_str().expect("utf-8 path"),
        "--prompt",
        "hi",
    ]);
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn an_unknown_architecture_is_named() {
    let dir = damaged("qwen2", |d| {
        edit(
            &d.join("config.json"),
            "Qwen2ForCausalLM",
            "FalconForCausalLM",
        )
    });
    let err = generate_fails(dir.path());
    assert!(
        err.contains("unsupported architecture 'FalconForCausalLM'")
            && err.contains("Gemma3ForCausalLM"),
        "{err}"
    );
}

#[test]
fn a_truncated_weight_file_is_named() {
    let dir = damaged("qwen3", |d| {
        let w = d.join("model.safetensors");
        let bytes = std::fs::read(&w).expect("read");
        std::fs::write(&w, &bytes[..bytes.len() / 2]).expect("write");
    });
    let err = generate_fails(dir.path());
    assert!(
        err.contains("model.safetensors") && err.contains("not a valid safetensors"),
        "{err}"
    );
}

#[test]
fn a_tensor_of_the_wrong_shape_is_named() {
    let dir = damaged("mistral", |d| {
        edit(
            &d.join("config.json"),
            "\"intermediate_size\": 128",
            "\"intermediate_size\": 96",
        )
    });
    let err = generate_fails(dir.path());
    assert!(
        err.contains("gate_proj.weight") && err.contains("[128, 64]") && err.contains("[96, 64]"),
        "{err}"
    );
}

#[test]
fn a_missing_config_field_is_named() {
    let dir = damaged("phi3", |d| {
        edit(
            &d.join("config.json"),
            "\"num_hidden_layers\"",
            "\"num_hidden_layerz\"",
        )
    });
    let err = generate_fails(dir.path());
    assert!(err.contains("'num_hidden_layers'"), "{err}");
}

#[test]
fn a_missing_weight_file_is_named() {
    let dir = damaged("qwen2", |d| {
        std::fs::remove_file(d.join("model.safetensors")).expect("remove")
    });
    let err = generate_fails(dir.path());
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn a_model_without_a_tokenizer_says_so() {
    let dir = damaged("llama3", |d| {
        std::fs::remove_file(d.join("tokenizer.json")).expect("remove")
    });
    let err = generate_fails(dir.path());
    assert!(err.contains("tokenizer.json"), "{err}");
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

// ---- models that load but cannot compute (issue 12) ------------------------------

/// A copy of fixture `name` whose config.json has `field` set to `value`.
fn with_config(name: &str, field: &str, value: serde_json::Value) -> tempfile::TempDir {
    damaged(name, |d| {
        let path = d.join("config.json");
        let text = std::fs::read_to_string(&path).expect("read");
        let mut config: serde_json::Value = serde_json::from_str(&text).expect("json");
        config[field] = value;
        std::fs::write(&path, config.to_string()).expect("write");
    })
}

#[test]
fn config_values_a_model_cannot_compute_with_are_named() {
    // Each loaded and then failed every request (NaN logits), or was blamed
    // on --kv-cache-mem, or sized the KV budget from 10^15 positions.
    let cases = [
        (
            "rms_norm_eps",
            serde_json::json!(-1),
            "rms_norm_eps must be a positive finite number, found -1",
        ),
        (
            "rope_parameters",
            serde_json::json!({"rope_theta": 0, "rope_type": "default"}),
            "rope_theta must be a positive finite number, found 0",
        ),
        (
            "max_position_embeddings",
            serde_json::json!(0),
            "max_position_embeddings must be in [1, 16777216], found 0",
        ),
        (
            "max_position_embeddings",
            serde_json::json!(1_000_000_000_000_000u64),
            "found 1000000000000000",
        ),
    ];
    for (field, value, want) in cases {
        let dir = with_config("qwen2", field, value.clone());
        let err = generate_fails(dir.path());
        assert!(
            err.contains(want) && err.contains("config.json"),
            "{field}={value}: {err}"
        );
    }
}

#[test]
fn a_model_whose_logits_are_nan_fails_at_load() {
    let dir = damaged("qwen2", |d| {
        let path = d.join("model.safetensors");
        let mut tensors =
            candle_core::safetensors::load(&path, &candle_core::Device::Cpu).expect("weights load");
        let t = &tensors["model.norm.weight"];
        let nan = candle_core::Tensor::full(f32::NAN, t.shape(), t.device())
            .and_then(|n| n.to_dtype(t.dtype()))
            .expect("nan tensor");
        tensors.insert("model.norm.weight".into(), nan);
        candle_core::safetensors::save(&tensors, &path).expect("weights save");
    });
    let err = generate_fails(dir.path());
    assert!(
        err.contains("the model loads but does not compute") && err.contains("NaN"),
        "{err}"
    );
    // `taper serve` refuses to start with it instead of answering 500s.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_taper"))
        .args(["serve", "--port", "0", "--model"])
        .arg(dir.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("taper runs");
    assert!(!o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("does not compute"), "{}", stderr(&o));
}

#[test]
#[cfg(unix)]
fn a_gguf_path_that_is_not_a_file_is_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    let link = dir.path().join("model.gguf");
    std::os::unix::fs::symlink("/dev/zero", &link).expect("symlink");
    let err = generate_fails(&link);
    assert!(
        err.contains("is not a regular file (a character device; a symlink to /dev/zero)"),
        "{err}"
    );
}

/// Issue 13: `generate --chat --tools FILE` prints the reply as a JSON
/// message: calls or content, never nothing; a bad tools file is named.
#[test]
fn generate_with_tools_prints_a_json_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tools = dir.path().join("tools.json");
    std::fs::write(
        &tools,
        r#"[{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]"#,
    )
    .expect("write");
    let model = fixture("qwen2");
    let model = model.to_str().expect("utf-8 path");
    let tools_arg = tools.to_str().expect("utf-8 path");
    let out = taper(&[
        "generate",
        "--model",
        model,
        "--chat",
        "--tools",
        tools_arg,
        "--prompt",
        "Weather?",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("tool calls: generic"),
        "{}",
        stderr(&out)
    );
    let message: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("stdout is one JSON message");
    assert!(message["content"].is_string(), "{message}");
    assert!(message["tool_calls"].is_array(), "{message}");
    let called = !message["tool_calls"].as_array().is_some_and(Vec::is_empty);
    assert!(
        called || !message["content"].as_str().unwrap_or("").is_empty(),
        "{message}"
    );

    std::fs::write(
        &tools,
        r#"[{"type": "function", "function": {"name": "bad name"}}]"#,
    )
    .expect("write");
    let out = taper(&[
        "generate", "--model", model, "--chat", "--tools", tools_arg, "--prompt", "x",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("tools[0].function.name"),
        "{}",
        stderr(&out)
    );
}
