//! Chat-template parity with transformers' `apply_chat_template`, on five real
//! tokenizers.
//!
//! Fixtures: tests/fixtures/templates/<name>/{tokenizer_config.json, refs.json}
//! from scripts/make_template_refs.py. The tokenizer.json files are too big to
//! commit; scripts/fetch_tokenizers.sh puts them in target/test-tokenizers (or
//! the folder named by TAPER_TEST_TOKENIZERS). Without them these tests fail
//! and say how to fetch them: a parity test that skips itself proves nothing.

use std::path::{Path, PathBuf};

use taper::chat_template::{ChatTemplate, Message, RenderOptions};
use taper::Error;

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/templates")
        .join(name)
}

/// DEST/<name> as filled by scripts/fetch_tokenizers.sh.
fn tokenizer_dir(name: &str) -> PathBuf {
    crate::common::real_tokenizer_dir(name)
}

fn read_json(path: &Path) -> serde_json::Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// The fixture config must be the fetched one minus `added_tokens_decoder`
/// (what make_template_refs.py writes); otherwise the refs were made from
/// another package version than the tokenizer.json the ids are checked with.
fn assert_same_config(name: &str, fetched: &Path) {
    let mut fetched = read_json(&fetched.join("tokenizer_config.json"));
    if let Some(map) = fetched.as_object_mut() {
        map.remove("added_tokens_decoder");
    }
    let fixture = read_json(&fixture_dir(name).join("tokenizer_config.json"));
    assert!(
        fetched == fixture,
        "{name}: target tokenizer_config.json differs from the fixture; \
         re-run scripts/fetch_tokenizers.sh and scripts/make_template_refs.py"
    );
}

/// Index of the first differing character, for a readable failure.
fn first_difference(a: &str, b: &str) -> String {
    let at = a.chars().zip(b.chars()).take_while(|(x, y)| x == y).count();
    let tail = |s: &str| {
        s.chars()
            .skip(at.saturating_sub(10))
            .take(40)
            .collect::<String>()
    };
    format!(
        "first difference at char {at}: ours {:?} vs transformers {:?}",
        tail(a),
        tail(b)
    )
}

/// Fixtures whose package config has no chat template: the template comes
/// from this file instead (see scripts/make_template_refs.py).
fn template_file(name: &str) -> Option<&'static str> {
    match name {
        "llama2" => Some("llama-2-chat.jinja"),
        _ => None,
    }
}

fn check(name: &str) {
    let dir = tokenizer_dir(name);
    assert_same_config(name, &dir);
    let fixtures = fixture_dir(name);
    let config = fixtures.join("tokenizer_config.json");

    let template = if let Some(file) = template_file(name) {
        let template_file = fixtures.join(file);
        // The package's config has no template (Llama 2 base): the
        // --chat-template route, with special tokens from the config.
        assert!(
            ChatTemplate::from_tokenizer_config(&config)
                .expect("config loads")
                .is_none(),
            "{name}: config unexpectedly has a chat_template"
        );
        ChatTemplate::from_file(&template_file, Some(&config)).expect("template file compiles")
    } else {
        ChatTemplate::from_tokenizer_config(&config)
            .expect("config loads")
            .unwrap_or_else(|| panic!("{name}: no chat_template in {}", config.display()))
    };
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))
        .unwrap_or_else(|e| panic!("{name}: loading tokenizer.json: {e}"));

    let refs = read_json(&fixtures.join("refs.json"));
    let refs = refs.as_array().expect("refs.json is a list");
    assert!(!refs.is_empty());
    let mut failures = Vec::new();
    for entry in refs {
        let case = format!(
            "{name}/{} add_generation_prompt={}",
            entry["case"].as_str().unwrap_or("?"),
            entry["add_generation_prompt"]
        );
        let messages: Vec<Message> =
            serde_json::from_value(entry["messages"].clone()).expect("messages parse");
        let opts = RenderOptions {
            add_generation_prompt: entry["add_generation_prompt"].as_bool().unwrap_or(false),
            tools: entry.get("tools"),
            documents: entry.get("documents"),
            extra: entry.get("extra"),
        };
        let rendered = template.render(&messages, &opts);

        if let Some(expected) = entry.get("error").and_then(|e| e.as_str()) {
            match rendered {
                Err(Error::ChatTemplateRaised { message }) if message == expected => {}
                other => failures.push(format!(
                    "{case}: expected raise_exception({expected:?}), got {other:?}"
                )),
            }
            continue;
        }

        let text = entry["text"].as_str().expect("text");
        let ours = match rendered {
            Ok(ours) => ours,
            Err(e) => {
                failures.push(format!("{case}: render failed: {e}"));
                continue;
            }
        };
        if ours != text {
            failures.push(format!(
                "{case}: text differs; {}",
                first_difference(&ours, text)
            ));
            continue;
        }
        let expected_ids: Vec<u32> =
            serde_json::from_value(entry["ids"].clone()).expect("ids parse");
        let encoding = tokenizer
            .encode(text, false)
            .unwrap_or_else(|e| panic!("{case}: encode: {e}"));
        if encoding.get_ids() != expected_ids.as_slice() {
            let at = encoding
                .get_ids()
                .iter()
                .zip(&expected_ids)
                .take_while(|(a, b)| a == b)
                .count();
            failures.push(format!(
                "{case}: ids differ at position {at} (ours {} ids, transformers {})",
                encoding.get_ids().len(),
                expected_ids.len()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from transformers:\n{}",
        failures.len(),
        refs.len(),
        failures.join("\n")
    );
}

#[test]
fn qwen3_matches_transformers() {
    check("qwen3");
}

#[test]
fn llama3_1_matches_transformers() {
    check("llama3_1");
}

#[test]
fn gemma3_matches_transformers() {
    check("gemma3");
}

#[test]
fn llama2_matches_transformers() {
    check("llama2");
}

#[test]
fn deepseek_v3_matches_transformers() {
    check("deepseek_v3");
}

/// transformers refuses to render an empty conversation; so does taper.
#[test]
fn empty_conversation_is_an_invalid_request() {
    let template =
        ChatTemplate::from_tokenizer_config(&fixture_dir("qwen3").join("tokenizer_config.json"))
            .expect("config loads")
            .expect("qwen3 has a template");
    assert!(matches!(
        template.render(&[], &RenderOptions::default()),
        Err(Error::InvalidRequest(_))
    ));
}

/// The render budget, sized to bound a hostile template's memory (issue 12),
/// still fits a conversation far beyond any context: 1,000 alternating
/// messages of 4 kB (4 MB of prompt) through every real template.
#[test]
fn a_4_mb_conversation_renders_within_the_budget() {
    let content = "word ".repeat(800);
    let messages: Vec<Message> = (0..1000)
        .map(|i| Message::new(if i % 2 == 0 { "user" } else { "assistant" }, &*content))
        .collect();
    for name in ["qwen3", "llama3_1", "gemma3", "llama2", "deepseek_v3"] {
        let config = fixture_dir(name).join("tokenizer_config.json");
        let template = match template_file(name) {
            Some(file) => ChatTemplate::from_file(&fixture_dir(name).join(file), Some(&config))
                .expect("template file compiles"),
            None => ChatTemplate::from_tokenizer_config(&config)
                .expect("config loads")
                .expect("a template"),
        };
        let opts = RenderOptions {
            add_generation_prompt: true,
            ..Default::default()
        };
        let text = template
            .render(&messages, &opts)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(text.len() > 4_000_000, "{name}: {} bytes", text.len());
    }
}
