//! What a constraint needs to enforce tool calls: per [`ToolFormat`], a
//! Lark grammar (llguidance's dialect, the call's JSON embedded with
//! `%json { schema }`), for every `tool_choice` that enforces something.
//!
//! `required` and a named tool constrain the whole output to calls (the
//! generic format's to its envelope); `auto` allows free text and
//! constrains a call from its trigger on, so a client never receives
//! malformed arguments (llama.cpp's lazy grammars do this by buffering
//! until a trigger; here the free text is part of the grammar).
//! `parallel_tool_calls: false` allows one call.
//! The engine consumes [`ToolGrammar::lark`] as a `ConstraintSpec::Lark`;
//! nothing here depends on llguidance.

use serde_json::{json, Value};

use super::{Tool, ToolChoice, ToolFormat};

/// Where an unenforced `auto` grammar would start (see [`ToolGrammar::triggers`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrammarTrigger {
    /// The text that starts a call.
    pub text: String,
    /// Only at the start of the output, not after text.
    pub at_start: bool,
}

/// A format's markers that the model's vocabulary holds as single tokens
/// (special or not: Qwen's `<tool_call>` is an ordinary added token,
/// Llama's `<|python_tag|>` a special one). A grammar names them by id
/// (`<[id]>`, llguidance's syntax for one token), which is what lets
/// `auto` be enforced: free tokens are "any token but the trigger".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CallTokens {
    /// The format's (first) trigger: `<tool_call>`, `<|python_tag|>`,
    /// `[TOOL_CALLS]`.
    pub open: Option<u32>,
    /// Hermes' closing `</tool_call>`.
    pub close: Option<u32>,
}

/// A tool-calling constraint.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolGrammar {
    /// The grammar, in llguidance's Lark syntax.
    pub lark: String,
    /// Empty: the grammar holds from the first generated token (free text
    /// where `auto` allows it is part of the grammar). Otherwise the
    /// grammar is the call alone and nothing enforces it: `auto` in a
    /// format whose trigger is several tokens of this vocabulary, where
    /// "free text until the trigger" cannot be said by token and
    /// llguidance's lexer cannot end free text at a multi-token trigger.
    /// The calls are still parsed.
    pub triggers: Vec<GrammarTrigger>,
}

impl ToolGrammar {
    /// Whether the grammar waits for a trigger (and so is not enforced).
    pub fn is_lazy(&self) -> bool {
        !self.triggers.is_empty()
    }
}

/// The grammar enforcing `choice` over `tools` in `format`; `None` when
/// nothing is to be enforced (`none`, no tools, or a named tool that is not
/// offered, which validation refuses before this is called).
///
/// `required` and a named tool: the output is calls from its first token.
/// `auto`: free text (any token but the trigger), optionally followed by
/// calls that are constrained from their trigger on; EOS is allowed after
/// the free text or after a complete call, never inside one. Llama 3's
/// bare-JSON calls are recognised at the start only, as its parser does:
/// the free text is then text that does not start with `{`.
pub fn tool_grammar(
    format: ToolFormat,
    tokens: CallTokens,
    tools: &[Tool],
    choice: &ToolChoice,
    parallel: bool,
) -> Option<ToolGrammar> {
    let offered: Vec<&Tool> = match choice {
        ToolChoice::None => return None,
        ToolChoice::Named(name) => tools.iter().filter(|t| &t.name == name).collect(),
        ToolChoice::Auto | ToolChoice::Required => tools.iter().collect(),
    };
    if offered.is_empty() {
        return None;
    }
    let forced = !matches!(choice, ToolChoice::Auto);
    let lit = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
    let tag = |id: Option<u32>, text: &str| match id {
        Some(id) => format!("<[{id}]>"),
        None => lit(text),
    };
    // `auto` with the trigger as one token: free tokens before the calls.
    let free = |open: Option<u32>| -> Option<String> {
        open.map(|id| format!("start: free_tok* calls?\nfree_tok: <[^{id}]>\n"))
    };
    let lazy = |text: &str, at_start: bool| {
        vec![GrammarTrigger {
            text: text.to_owned(),
            at_start,
        }]
    };
    let forced_start = "start: calls\n".to_owned();
    let (lark, triggers) = match format {
        ToolFormat::Hermes => {
            let schema = one_of(&offered, "arguments");
            let calls = if parallel {
                "calls: call (\"\\n\" call)*"
            } else {
                "calls: call"
            };
            let body = format!(
                "{calls}\ncall: {} \"\\n\" call_json \"\\n\" {}\ncall_json: %json {}\n",
                tag(tokens.open, "<tool_call>"),
                tag(tokens.close, "</tool_call>"),
                compact(&schema)
            );
            match (forced, free(tokens.open)) {
                (true, _) => (forced_start + &body, Vec::new()),
                (false, Some(start)) => (start + &body, Vec::new()),
                (false, None) => (forced_start + &body, lazy("<tool_call>", false)),
            }
        }
        ToolFormat::Llama3Json => {
            let schema = one_of(&offered, "parameters");
            let calls = if parallel {
                "calls: call (\"; \" call)*"
            } else {
                "calls: call"
            };
            let body = format!(
                "{calls}\ncall: %json {}\n",
                compact(&schema)
            );
            let tag_rule = tokens
                .open
                .map(|id| format!("tag: <[{id}]>\n"))
                .unwrap_or_default();
            let tagged = if tokens.open.is_some() { "tag? calls" } else { "calls" };
            let start = if forced {
                format!("start: {tagged}\n")
            } else {
                // Text is anything that does not open with `{` (or is
                // empty): a call can only start the output.
                format!("start: TEXT? | {tagged}\nTEXT: /[^{{](.|\\n)*/\n")
            };
            (start + &tag_rule + &body, Vec::new())
        }
        ToolFormat::Mistral => {
            let mut array =
                json!({"type": "array", "items": one_of(&offered, "arguments"), "minItems": 1});
            if !parallel {
                array["maxItems"] = json!(1);
            }
            let body = format!(
                "calls: {} \" \"? calls_json\ncalls_json: %json {}\n",
                tag(tokens.open, "[TOOL_CALLS]"),
                compact(&array)
            );
            match (forced, free(tokens.open)) {
                (true, _) => (forced_start + &body, Vec::new()),
                (false, Some(start)) => (start + &body, Vec::new()),
                (false, None) => (forced_start + &body, lazy("[TOOL_CALLS]", false)),
            }
        }
        ToolFormat::Generic => {
            // The whole output is the envelope, whatever the choice: the
            // model was asked for it.
            let lark = format!(
                "start: envelope\nenvelope: %json {}\n",
                compact(&envelope_schema(&offered, forced, parallel))
            );
            (lark, Vec::new())
        }
    };
    Some(ToolGrammar { lark, triggers })
}

/// The generic format's envelope: `{"tool_calls": [call, ...]}`, or also
/// `{"response": "..."}` when the model may answer instead.
pub fn envelope_schema(offered: &[&Tool], forced: bool, parallel: bool) -> Value {
    let mut calls = json!({"type": "array", "items": one_of(offered, "arguments"), "minItems": 1});
    if !parallel {
        calls["maxItems"] = json!(1);
    }
    let call_form = json!({
        "type": "object",
        "properties": {"tool_calls": calls},
        "required": ["tool_calls"],
        "additionalProperties": false,
    });
    if forced {
        return call_form;
    }
    json!({"anyOf": [
        call_form,
        {
            "type": "object",
            "properties": {"response": {"type": "string"}},
            "required": ["response"],
            "additionalProperties": false,
        },
    ]})
}

/// One call of one of `tools`: `{"name": <const>, args_key: <parameters>}`.
pub fn one_of(tools: &[&Tool], args_key: &str) -> Value {
    let mut each: Vec<Value> = tools
        .iter()
        .map(|t| {
            json!({
                "type": "object",
                "properties": {
                    "name": {"const": t.name},
                    args_key: t.parameters,
                },
                "required": ["name", args_key],
                "additionalProperties": false,
            })
        })
        .collect();
    if each.len() == 1 {
        each.remove(0)
    } else {
        json!({ "anyOf": each })
    }
}

/// An embedded `%json` schema, with the whitespace between JSON tokens
/// bounded as for `response_format` schemas
/// ([`crate::constraint::JSON_WHITESPACE`]): llguidance's default inside
/// Lark allows any run of it, and small models loop on newlines.
fn compact(v: &Value) -> String {
    let mut v = v.clone();
    if let Value::Object(map) = &mut v {
        map.entry("x-guidance")
            .or_insert_with(|| json!({"whitespace_pattern": crate::constraint::JSON_WHITESPACE}));
    }
    serde_json::to_string(&v).unwrap_or_else(|_| "{}".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools() -> Vec<Tool> {
        vec![
            Tool {
                name: "get_weather".into(),
                description: None,
                parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
            },
            Tool {
                name: "get_time".into(),
                description: None,
                parameters: json!({"type": "object", "properties": {}}),
            },
        ]
    }

    /// The JSON schema embedded after `%json` on the line of `rule`.
    fn embedded(lark: &str, rule: &str) -> Value {
        let line = lark
            .lines()
            .find(|l| l.starts_with(&format!("{rule}: %json ")))
            .unwrap_or_else(|| panic!("no {rule} in {lark}"));
        serde_json::from_str(&line[rule.len() + 8..]).expect("embedded schema parses")
    }

    const NONE: CallTokens = CallTokens {
        open: None,
        close: None,
    };

    #[test]
    fn none_and_unknown_names_give_no_grammar() {
        let t = tools();
        assert!(tool_grammar(ToolFormat::Hermes, NONE, &t, &ToolChoice::None, true).is_none());
        assert!(tool_grammar(ToolFormat::Hermes, NONE, &[], &ToolChoice::Auto, true).is_none());
        assert!(tool_grammar(
            ToolFormat::Hermes,
            NONE,
            &t,
            &ToolChoice::Named("nope".into()),
            true
        )
        .is_none());
    }

    #[test]
    fn hermes_auto_is_free_tokens_then_calls_when_its_tag_is_one_token() {
        let t = tools();
        let tokens = CallTokens {
            open: Some(151657),
            close: Some(151658),
        };
        let g = tool_grammar(ToolFormat::Hermes, tokens, &t, &ToolChoice::Auto, true).expect("g");
        assert!(!g.is_lazy());
        assert!(
            g.lark
                .starts_with("start: free_tok* calls?\nfree_tok: <[^151657]>\n"),
            "{}",
            g.lark
        );
        assert!(g.lark.contains("calls: call (\"\\n\" call)*"), "{}", g.lark);
        assert!(
            g.lark
                .contains("call: <[151657]> \"\\n\" call_json \"\\n\" <[151658]>"),
            "{}",
            g.lark
        );
        let schema = embedded(&g.lark, "call_json");
        assert_eq!(schema["anyOf"].as_array().map(Vec::len), Some(2));
        assert_eq!(
            schema["anyOf"][0]["properties"]["name"]["const"],
            "get_weather"
        );
        assert_eq!(
            schema["anyOf"][0]["properties"]["arguments"]["required"],
            json!(["city"])
        );

        let g = tool_grammar(ToolFormat::Hermes, tokens, &t, &ToolChoice::Required, false)
            .expect("g");
        assert!(g.lark.starts_with("start: calls\ncalls: call\n"), "{}", g.lark);
    }

    #[test]
    fn hermes_auto_is_lazy_when_its_tag_is_several_tokens() {
        let t = tools();
        let g = tool_grammar(ToolFormat::Hermes, NONE, &t, &ToolChoice::Auto, true).expect("g");
        assert!(g.is_lazy());
        assert_eq!(g.triggers[0].text, "<tool_call>");
        assert!(
            g.lark
                .contains("call: \"<tool_call>\" \"\\n\" call_json \"\\n\" \"</tool_call>\""),
            "{}",
            g.lark
        );
        let g =
            tool_grammar(ToolFormat::Hermes, NONE, &t, &ToolChoice::Required, false).expect("g");
        assert!(!g.is_lazy());
    }

    #[test]
    fn a_named_tool_is_the_only_one_allowed() {
        let t = tools();
        let g = tool_grammar(
            ToolFormat::Hermes,
            NONE,
            &t,
            &ToolChoice::Named("get_time".into()),
            true,
        )
        .expect("g");
        let schema = embedded(&g.lark, "call_json");
        assert_eq!(schema["properties"]["name"]["const"], "get_time");
        assert!(schema.get("anyOf").is_none());
    }

    #[test]
    fn llama3_uses_parameters_and_calls_only_at_the_start() {
        let tokens = CallTokens {
            open: Some(128010),
            close: None,
        };
        let g = tool_grammar(ToolFormat::Llama3Json, tokens, &tools(), &ToolChoice::Auto, true)
            .expect("g");
        assert!(!g.is_lazy());
        assert!(g.lark.starts_with("start: TEXT? | tag? calls\n"), "{}", g.lark);
        assert!(g.lark.contains("tag: <[128010]>"), "{}", g.lark);
        let schema = embedded(&g.lark, "call");
        assert!(schema["anyOf"][0]["properties"]["parameters"].is_object());
        let g = tool_grammar(ToolFormat::Llama3Json, NONE, &tools(), &ToolChoice::Required, true)
            .expect("g");
        assert!(g.lark.starts_with("start: calls\n"), "{}", g.lark);
    }

    #[test]
    fn mistral_is_an_array_after_its_token() {
        let tokens = CallTokens {
            open: Some(5),
            close: None,
        };
        let g = tool_grammar(ToolFormat::Mistral, tokens, &tools(), &ToolChoice::Required, false)
            .expect("g");
        assert!(
            g.lark.starts_with("start: calls\ncalls: <[5]> \" \"? calls_json"),
            "{}",
            g.lark
        );
        let schema = embedded(&g.lark, "calls_json");
        assert_eq!(schema["type"], "array");
        assert_eq!(schema["maxItems"], 1);
        assert!(!g.is_lazy());
        let g = tool_grammar(ToolFormat::Mistral, tokens, &tools(), &ToolChoice::Auto, true)
            .expect("g");
        assert!(g.lark.starts_with("start: free_tok* calls?\nfree_tok: <[^5]>"), "{}", g.lark);
    }

    #[test]
    fn the_generic_envelope_allows_an_answer_only_under_auto() {
        let t = tools();
        let g = tool_grammar(ToolFormat::Generic, NONE, &t, &ToolChoice::Auto, true).expect("g");
        assert!(!g.is_lazy());
        let schema = embedded(&g.lark, "envelope");
        assert_eq!(schema["anyOf"][1]["required"], json!(["response"]));
        let g =
            tool_grammar(ToolFormat::Generic, NONE, &t, &ToolChoice::Required, false).expect("g");
        let schema = embedded(&g.lark, "envelope");
        assert_eq!(schema["required"], json!(["tool_calls"]));
        assert_eq!(schema["properties"]["tool_calls"]["maxItems"], 1);
    }
}
