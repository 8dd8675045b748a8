//! Structured output (issue 13) through the real binary: `response_format`,
//! vLLM's `structured_outputs` and `guided_*` on both endpoints, streamed
//! and not, beside free requests in one batch, on a GGUF vocabulary, and
//! `taper generate --json-schema | --regex | --grammar`. The fixtures'
//! random weights write noise when free, so output that parses and
//! validates can only come from the grammar.

use std::process::Command;

use serde_json::{json, Value};

use crate::common::fixture;
use crate::server::{chat, completion, error_of, text_of, Server, NAME};

// ---- a small JSON-schema validator (the keywords the tests use) ----------

/// Checks `v` against `schema`: type, properties, required,
/// additionalProperties: false, items, minItems/maxItems, enum, const,
/// anyOf, minimum/maximum (and exclusive), minLength/maxLength, $ref to
/// `#/$defs/...`. Returns what is wrong.
fn validate(v: &Value, schema: &Value, root: &Value, path: &str) -> Result<(), String> {
    let fail = |what: String| Err(format!("{path}: {what} (value {v})"));
    if let Some(r) = schema["$ref"].as_str() {
        let name = r.strip_prefix("#/$defs/").expect("local $ref");
        return validate(v, &root["$defs"][name], root, path);
    }
    if let Some(options) = schema["anyOf"].as_array() {
        if !options.iter().any(|o| validate(v, o, root, path).is_ok()) {
            return fail("matches no anyOf branch".into());
        }
    }
    if let Some(values) = schema["enum"].as_array() {
        if !values.contains(v) {
            return fail(format!("not in enum {values:?}"));
        }
    }
    if let Some(c) = schema.get("const") {
        if v != c {
            return fail(format!("not the const {c}"));
        }
    }
    if let Some(t) = schema["type"].as_str() {
        let ok = match t {
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            "integer" => v.is_i64() || v.is_u64(),
            "number" => v.is_number(),
            "boolean" => v.is_boolean(),
            "null" => v.is_null(),
            _ => panic!("unknown type {t}"),
        };
        if !ok {
            return fail(format!("not of type {t}"));
        }
    }
    if let Some(x) = v.as_f64() {
        let bound = |k: &str| schema[k].as_f64();
        if bound("minimum").is_some_and(|m| x < m)
            || bound("maximum").is_some_and(|m| x > m)
            || bound("exclusiveMinimum").is_some_and(|m| x <= m)
            || bound("exclusiveMaximum").is_some_and(|m| x >= m)
        {
            return fail("out of bounds".into());
        }
    }
    if let Some(s) = v.as_str() {
        let n = s.chars().count() as u64;
        if schema["minLength"].as_u64().is_some_and(|m| n < m)
            || schema["maxLength"].as_u64().is_some_and(|m| n > m)
        {
            return fail("length out of bounds".into());
        }
    }
    if let Some(items) = v.as_array() {
        let n = items.len() as u64;
        if schema["minItems"].as_u64().is_some_and(|m| n < m)
            || schema["maxItems"].as_u64().is_some_and(|m| n > m)
        {
            return fail("item count out of bounds".into());
        }
        if schema.get("items").is_some() {
            for (i, item) in items.iter().enumerate() {
                validate(item, &schema["items"], root, &format!("{path}[{i}]"))?;
            }
        }
    }
    if let Some(o) = v.as_object() {
        for r in schema["required"].as_array().into_iter().flatten() {
            let key = r.as_str().expect("required names");
            if !o.contains_key(key) {
                return fail(format!("lacks required {key}"));
            }
        }
        let props = schema["properties"].as_object();
        for (k, value) in o {
            match props.and_then(|p| p.get(k)) {
                Some(s) => validate(value, s, root, &format!("{path}.{k}"))?,
                None if schema["additionalProperties"] == json!(false) => {
                    return fail(format!("has unexpected key {k}"))
                }
                None => {}
            }
        }
    }
    Ok(())
}

fn assert_valid(text: &str, schema: &Value) -> Value {
    let v: Value =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"));
    if let Err(e) = validate(&v, schema, schema, "$") {
        panic!("{e}\nschema: {schema}\noutput: {text}");
    }
    v
}

#[test]
fn the_test_validator_refuses_what_it_should() {
    let schema = json!({"type": "object", "properties": {"a": {"type": "integer", "maximum": 3}},
        "required": ["a"], "additionalProperties": false});
    let root = &schema;
    assert!(validate(&json!({"a": 2}), &schema, root, "$").is_ok());
    for bad in [
        json!({"a": 4}),
        json!({}),
        json!({"a": 1, "b": 2}),
        json!([1]),
        json!({"a": "x"}),
    ] {
        assert!(validate(&bad, &schema, root, "$").is_err(), "{bad}");
    }
}

/// Schemas whose outputs terminate on noise: strings bounded, numbers
/// bounded, arrays bounded.
fn schemas() -> Vec<Value> {
    vec![
        // Nested objects, arrays, enums, required, integer and number bounds.
        json!({
            "type": "object",
            "properties": {
                "name": {"type": "string", "minLength": 1, "maxLength": 12},
                "age": {"type": "integer", "minimum": 18, "maximum": 99},
                "score": {"type": "number", "minimum": -1.5, "exclusiveMaximum": 2},
                "address": {
                    "type": "object",
                    "properties": {
                        "city": {"enum": ["Paris", "Oslo", "Lima"]},
                        "zip": {"type": "string", "maxLength": 5}
                    },
                    "required": ["city", "zip"],
                    "additionalProperties": false
                },
                "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "minItems": 1, "maxItems": 3}
            },
            "required": ["name", "age", "score", "address", "tags"],
            "additionalProperties": false
        }),
        // anyOf, const, booleans, null, $defs.
        json!({
            "$defs": {
                "point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9}, "y": {"type": "integer", "minimum": -9, "maximum": 9}}, "required": ["x", "y"], "additionalProperties": false}
            },
            "type": "object",
            "properties": {
                "kind": {"const": "shape"},
                "at": {"anyOf": [{"$ref": "#/$defs/point"}, {"type": "null"}]},
                "size": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 5}, {"enum": ["small", "large"]}]},
                "filled": {"type": "boolean"},
                "points": {"type": "array", "items": {"$ref": "#/$defs/point"}, "maxItems": 2}
            },
            "required": ["kind", "at", "size", "filled", "points"],
            "additionalProperties": false
        }),
        // A top-level array of enums.
        json!({"type": "array", "items": {"enum": ["a", "bb", "ccc"]}, "minItems": 2, "maxItems": 4}),
    ]
}

fn json_schema_format(schema: &Value) -> Value {
    json!({"response_format": {"type": "json_schema", "json_schema": {"name": "out", "strict": true, "schema": schema}}})
}

/// The text of a streamed response: every delta joined, and the finish
/// reason.
fn streamed_text(events: &[Value]) -> (String, Option<String>) {
    let mut text = String::new();
    let mut finish = None;
    for e in events {
        let Some(c) = e["choices"].get(0) else {
            continue;
        };
        if let Some(t) = c["delta"]["content"]
            .as_str()
            .or_else(|| c["text"].as_str())
        {
            text.push_str(t);
        }
        if let Some(f) = c["finish_reason"].as_str() {
            finish = Some(f.to_owned());
        }
    }
    (text, finish)
}

#[test]
fn json_schema_output_validates_streamed_and_not_on_both_endpoints() {
    let s = Server::start(&[]);
    for (i, schema) in schemas().iter().enumerate() {
        for sampling in [
            json!({"temperature": 0}),
            json!({"temperature": 1.0, "seed": i}),
        ] {
            let mut extra = json_schema_format(schema);
            extra["max_tokens"] = json!(400);
            for (k, v) in sampling.as_object().into_iter().flatten() {
                extra[k] = v.clone();
            }
            let body = chat("Describe someone.", extra.clone());
            let r = s.ok("/v1/chat/completions", &body);
            let text = text_of(&r["choices"][0]);
            assert_valid(&text, schema);
            assert_eq!(r["choices"][0]["finish_reason"], "stop", "{r}");

            let mut streamed = body.clone();
            streamed["stream"] = json!(true);
            let (text2, finish) = streamed_text(&s.stream("/v1/chat/completions", &streamed));
            assert_eq!(text2, text, "streamed and whole agree");
            assert_eq!(finish.as_deref(), Some("stop"));

            let body = completion(json!("Once upon a time"), extra);
            let r = s.ok("/v1/completions", &body);
            assert_valid(&text_of(&r["choices"][0]), schema);
        }
    }
}

#[test]
fn json_object_regex_choice_and_grammar_in_every_spelling() {
    let s = Server::start(&[]);
    let on_both = |extra: Value, check: &dyn Fn(&str)| {
        for (path, body) in [
            ("/v1/chat/completions", chat("Go.", extra.clone())),
            ("/v1/completions", completion(json!("Go."), extra.clone())),
        ] {
            let r = s.ok(path, &body);
            check(&text_of(&r["choices"][0]));
            let mut streamed = body.clone();
            streamed["stream"] = json!(true);
            let (text, finish) = streamed_text(&s.stream(path, &streamed));
            check(&text);
            assert_eq!(finish.as_deref(), Some("stop"), "{path} {extra}");
        }
    };
    let object = |t: &str| {
        let v: Value = serde_json::from_str(t).unwrap_or_else(|e| panic!("{e}: {t:?}"));
        assert!(v.is_object(), "{t:?}");
    };
    // Any object may hold strings without end, which noise seldom closes:
    // a bias towards `"` and `}` (ids 1 and 92 in the fixture) lets it
    // close while the grammar alone decides what is valid.
    for extra in [
        json!({"response_format": {"type": "json_object"}}),
        json!({"structured_outputs": {"json_object": true}}),
    ] {
        let mut extra = extra;
        extra["max_tokens"] = json!(400);
        extra["temperature"] = json!(0);
        extra["logit_bias"] = json!({"1": 8, "92": 8});
        on_both(extra, &object);
    }
    let digits = |t: &str| {
        let (a, b) = t.split_once('-').unwrap_or_else(|| panic!("{t:?}"));
        assert!(
            a.len() == 3 && a.bytes().all(|c| c.is_ascii_digit()),
            "{t:?}"
        );
        assert!(
            (2..=5).contains(&b.len()) && b.bytes().all(|c| c.is_ascii_lowercase()),
            "{t:?}"
        );
    };
    for extra in [
        json!({"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2,5}"}}),
        json!({"guided_regex": "[0-9]{3}-[a-z]{2,5}", "temperature": 1, "seed": 5}),
    ] {
        on_both(extra, &digits);
    }
    let colours = ["red", "green", "dark blue"];
    for extra in [
        json!({"structured_outputs": {"choice": colours}}),
        json!({"guided_choice": colours, "temperature": 1, "seed": 9}),
    ] {
        on_both(extra, &|t: &str| assert!(colours.contains(&t), "{t:?}"));
    }
    let grammar =
        "start: greeting \" \" NAME \"!\"\ngreeting: \"hi\" | \"hello\"\nNAME: /[A-Z][a-z]{1,6}/\n";
    for extra in [
        json!({"structured_outputs": {"grammar": grammar}}),
        json!({"guided_grammar": grammar}),
    ] {
        on_both(extra, &|t: &str| {
            let rest = t.strip_prefix("hi ").or_else(|| t.strip_prefix("hello "));
            let name = rest
                .and_then(|r| r.strip_suffix('!'))
                .unwrap_or_else(|| panic!("{t:?}"));
            assert!(
                name.chars().next().is_some_and(|c| c.is_ascii_uppercase()),
                "{t:?}"
            );
        });
    }
    // `text` is no constraint; a schema given as vLLM's JSON string works.
    let r = s.ok(
        "/v1/chat/completions",
        &chat(
            "Go.",
            json!({"response_format": {"type": "text"}, "max_tokens": 3}),
        ),
    );
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    let schema = json!({"type": "object", "properties": {"k": {"enum": [1, 2]}}, "required": ["k"], "additionalProperties": false});
    let r = s.ok(
        "/v1/chat/completions",
        &chat(
            "Go.",
            json!({"guided_json": schema.to_string(), "max_tokens": 100}),
        ),
    );
    assert_valid(&text_of(&r["choices"][0]), &schema);
}

#[test]
fn sixteen_concurrent_requests_half_constrained_each_get_what_they_should() {
    let s = Server::start(&["--max-batch", "16"]);
    let schemas = schemas();
    let free = |i: usize| {
        let sampling = if i.is_multiple_of(2) {
            json!({"temperature": 0})
        } else {
            json!({"temperature": 0.9, "top_p": 0.9, "seed": i})
        };
        let mut extra = sampling;
        extra["max_tokens"] = json!(30 + i);
        chat(&format!("Free request {i}, some words."), extra)
    };
    let constrained = |i: usize| {
        let schema = &schemas[i % schemas.len()];
        let mut extra = json_schema_format(schema);
        extra["max_tokens"] = json!(400);
        extra["temperature"] = json!(if i.is_multiple_of(2) { 0.0 } else { 0.8 });
        extra["seed"] = json!(i);
        (chat(&format!("Constrained {i}."), extra), schema.clone())
    };
    // Each free request alone first.
    let alone: Vec<String> = (0..8)
        .map(|i| text_of(&s.ok("/v1/chat/completions", &free(i))["choices"][0]))
        .collect();
    let together: Vec<(usize, String)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..16usize)
            .map(|i| {
                let s = &s;
                let body = if i.is_multiple_of(2) {
                    free(i / 2)
                } else {
                    constrained(i / 2).0
                };
                scope.spawn(move || {
                    (
                        i,
                        text_of(&s.ok("/v1/chat/completions", &body)["choices"][0]),
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    for (i, text) in together {
        if i.is_multiple_of(2) {
            assert_eq!(
                text,
                alone[i / 2],
                "free request {} changed in the batch",
                i / 2
            );
        } else {
            assert_valid(&text, &constrained(i / 2).1);
        }
    }
}

#[test]
fn bad_constraints_are_400_naming_the_problem_and_the_server_goes_on() {
    let mut s = Server::start(&[]);
    let cases = [
        (
            json_schema_format(&json!({"type": "array", "uniqueItems": true})),
            "response_format",
            "uniqueItems",
        ),
        (
            json!({"guided_grammar": "start: a\na: \"x\" |\nb: (((\n"}),
            "guided_grammar",
            "line 3",
        ),
        (
            json!({"structured_outputs": {"regex": "a(b"}}),
            "structured_outputs.regex",
            "regular expression",
        ),
        (
            json!({"response_format": {"type": "json_object"}, "guided_choice": ["a"]}),
            "guided_choice",
            "Only one",
        ),
        (
            json!({"guided_regex": "a".repeat(300_000)}),
            "guided_regex",
            "262144 bytes",
        ),
        (
            json!({"guided_choice": []}),
            "guided_choice",
            "at least one",
        ),
        (
            json!({"response_format": {"type": "xml"}}),
            "response_format.type",
            "xml",
        ),
    ];
    for (extra, param, text) in cases {
        for (path, body) in [
            ("/v1/chat/completions", chat("Go.", extra.clone())),
            ("/v1/completions", completion(json!("Go."), extra.clone())),
        ] {
            let (status, r) = s.post(path, &body);
            let e = error_of(status, &r, 400);
            assert_eq!(e["param"], param, "{r}");
            let message = e["message"].as_str().unwrap_or_default();
            assert!(message.contains(text), "{path}: {message:?} lacks {text:?}");
        }
    }
    assert!(s.alive());
    let r = s.ok(
        "/v1/chat/completions",
        &chat("Still there?", json!({"guided_choice": ["yes"]})),
    );
    assert_eq!(text_of(&r["choices"][0]), "yes");
}

#[test]
fn a_gguf_vocabulary_is_constrained_too() {
    let gguf = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf/qwen2-q8_0.gguf");
    let s = Server::launch(&gguf, &["--served-model-name", NAME], &[], None);
    let schema = &schemas()[0];
    let mut extra = json_schema_format(schema);
    extra["max_tokens"] = json!(400);
    let r = s.ok("/v1/chat/completions", &chat("Describe someone.", extra));
    assert_valid(&text_of(&r["choices"][0]), schema);
    let r = s.ok(
        "/v1/completions",
        &completion(
            json!("x"),
            json!({"guided_choice": ["alpha", "beta"], "temperature": 1, "seed": 3}),
        ),
    );
    assert!(["alpha", "beta"].contains(&text_of(&r["choices"][0]).as_str()));
}

#[test]
fn generate_takes_a_json_schema_a_regex_or_a_grammar() {
    let dir = tempfile::tempdir().expect("temp dir");
    let schema = &schemas()[0];
    let schema_path = dir.path().join("schema.json");
    std::fs::write(&schema_path, schema.to_string()).expect("writes");
    let grammar_path = dir.path().join("g.lark");
    std::fs::write(&grammar_path, "start: \"a\" (\",\" \"a\")* \".\"\n").expect("writes");
    let run = |args: &[&str]| -> (bool, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_taper"))
            .args(["generate", "--model"])
            .arg(fixture("qwen2"))
            .args(["--prompt", "Hello", "--max-tokens", "400"])
            .args(args)
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .expect("taper runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim_end().to_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let schema_arg = schema_path.to_string_lossy().into_owned();
    let (ok, stdout, stderr) = run(&["--json-schema", &schema_arg]);
    assert!(ok, "{stderr}");
    assert_valid(&stdout, schema);
    assert!(stderr.contains("finish: stop"), "{stderr}");
    let (ok, stdout, stderr) = run(&["--regex", "[0-9]{4}", "--temperature", "1", "--seed", "3"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.len() == 4 && stdout.bytes().all(|b| b.is_ascii_digit()),
        "{stdout:?}"
    );
    let grammar_arg = grammar_path.to_string_lossy().into_owned();
    let (ok, stdout, stderr) = run(&["--grammar", &grammar_arg]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.ends_with('.') && stdout.trim_end_matches('.').split(',').all(|p| p == "a"),
        "{stdout:?}"
    );
    // Two at once, and a bad schema: errors that say so.
    let (ok, _, stderr) = run(&["--regex", "a", "--grammar", &grammar_arg]);
    assert!(!ok && stderr.contains("cannot be used with"), "{stderr}");
    std::fs::write(&schema_path, r#"{"type": "array", "uniqueItems": true}"#).expect("writes");
    let (ok, _, stderr) = run(&["--json-schema", &schema_arg]);
    assert!(!ok && stderr.contains("uniqueItems"), "{stderr}");
}

/// `tool_choice: required` or a named tool: the calls' grammar built by
/// the tool-calling half (Hermes form here) compiles and holds from the
/// first token, so the fixture's noise becomes a call whose arguments
/// validate. Driven through the engine: with the tools described in the
/// prompt the fixture's 512-token context holds no HTTP request.
#[test]
fn a_forced_tool_call_grammar_gives_a_valid_call() {
    use std::sync::{Arc, Mutex};
    use taper::constraint::ConstraintSpec;
    use taper::engine::{self, Event, Request};
    use taper::tools::grammar::tool_grammar;
    use taper::tools::{Tool, ToolChoice, ToolFormat};

    let files = taper::hub::resolve(
        &taper::hub::ModelSource::Local(fixture("qwen2")),
        &taper::hub::HubOptions::from_env(),
    )
    .expect("fixture resolves");
    let pipeline = Arc::new(
        taper::pipeline::Pipeline::load(
            &files,
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
            taper::quant::Quant::None,
            None,
        )
        .expect("loads"),
    );
    let parameters = json!({"type": "object", "properties": {
        "city": {"enum": ["Paris", "Oslo"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}
    }, "required": ["city", "days"], "additionalProperties": false});
    let tool = Tool {
        name: "get_weather".into(),
        description: None,
        parameters: parameters.clone(),
    };
    // Every format's forced grammar compiles (a failure would be a 400 on
    // every such request).
    for format in [
        ToolFormat::Hermes,
        ToolFormat::Llama3Json,
        ToolFormat::Mistral,
        ToolFormat::Generic,
    ] {
        for parallel in [true, false] {
            let choice = ToolChoice::Required;
            let g = tool_grammar(format, Default::default(), std::slice::from_ref(&tool), &choice, parallel)
                .expect("a grammar");
            if !g.is_lazy() {
                pipeline
                    .compile_constraint(&ConstraintSpec::Lark(g.lark.clone()))
                    .unwrap_or_else(|e| panic!("{format:?}: {e}\n{}", g.lark));
            }
        }
    }
    for choice in [
        ToolChoice::Required,
        ToolChoice::Named("get_weather".into()),
    ] {
        let grammar = tool_grammar(
            ToolFormat::Hermes,
            Default::default(),
            std::slice::from_ref(&tool),
            &choice,
            false,
        )
        .expect("a grammar");
        assert!(!grammar.is_lazy());
        let constraint = pipeline
            .compile_constraint(&ConstraintSpec::Lark(grammar.lark.clone()))
            .unwrap_or_else(|e| panic!("{e}\n{}", grammar.lark));
        let mut request = Request {
            prompt: pipeline
                .tokenizer
                .encode_plain("Weather?")
                .expect("encodes"),
            sampling: taper::sampling::SamplingParams {
                temperature: 0.0,
                ..Default::default()
            },
            stop: taper::stopping::StopConditions {
                max_new_tokens: 300,
                eos_ids: pipeline.eos_ids.clone(),
                ..Default::default()
            },
            logprobs: None,
            prompt_logprobs: false,
            constraint: Some(constraint),
        };
        request.stop.ignore_eos = false;
        let text = Arc::new(Mutex::new(String::new()));
        let out = text.clone();
        let sink = move |e: Event| {
            if let Event::Token { text, .. } = e {
                out.lock().expect("lock").push_str(&text);
            }
            true
        };
        engine::run_one(pipeline.clone(), request, Box::new(sink)).expect("runs");
        let text = text.lock().expect("lock").clone();
        let body = text
            .strip_prefix("<tool_call>\n")
            .and_then(|t| t.strip_suffix("\n</tool_call>"))
            .unwrap_or_else(|| panic!("{text:?}"));
        let call: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
        assert_eq!(call["name"], "get_weather", "{call}");
        assert_valid(&call["arguments"].to_string(), &parameters);
    }
}
