//! What a constraint needs to enforce tool calls: per [`ToolFormat`], a
//! Lark grammar (llguidance's dialect, the call's JSON embedded with
//! `%json { schema }`) and, for `tool_choice: auto`, the triggers at which
//! it takes over (a lazy grammar: free text until a trigger, then the rest
//! of the call constrained, as llama.cpp's grammar triggers do).
//!
//! `required` and a named tool constrain the whole output to calls (the
//! generic format's to its envelope). `parallel_tool_calls: false` allows one.
//! The engine consumes [`ToolGrammar::lark`] as a `ConstraintSpec::Lark`;
//! nothing here depends on llguidance.

use serde_json::{json, Value};

use super::{Tool, ToolChoice, ToolFormat};

/// Where a lazy grammar starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrammarTrigger {
    /// The text that starts a call (the grammar's first terminal matches it).
    pub text: String,
    /// Its token id when the tokenizer holds it as one special token: the
    /// engine should watch for the id, since the text of a special token is
    /// not in the detokenized output.
    pub token: Option<u32>,
    /// Only at the start of the output (Llama 3's bare `{`, the generic
    /// envelope), not after text.
    pub at_start: bool,
}

/// A tool-calling constraint.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolGrammar {
    /// The grammar, in llguidance's Lark syntax.
    pub lark: String,
    /// Empty: the grammar holds from the first generated token. Otherwise
    /// the output is free until one of these appears, and the grammar
    /// applies from it on.
    pub triggers: Vec<GrammarTrigger>,
}

impl ToolGrammar {
    /// Whether the grammar waits for a trigger.
    pub fn is_lazy(&self) -> bool {
        !self.triggers.is_empty()
    }
}

/// The grammar enforcing `choice` over `tools` in `format`; `None` when
/// nothing is to be enforced (`none`, no tools, or a named tool that is not
/// offered, which validation refuses before this is called).
/// `trigger_token`: the format's trigger as a special token's id
/// (`OutputSyntax::trigger_token`), so the grammar names it by id
/// (`<[id]>`), the way llguidance matches special tokens.
pub fn tool_grammar(
    format: ToolFormat,
    trigger_token: Option<u32>,
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
    let tag = |text: &str| match trigger_token {
        Some(id) => format!("<[{id}]>"),
        None => lit(text),
    };
    let (lark, triggers) = match format {
        ToolFormat::Hermes => {
            let schema = one_of(&offered, "arguments");
            let start = if parallel {
                "start: call (\"\\n\" call)*"
            } else {
                "start: call"
            };
            let lark = format!(
                "{start}\ncall: {} \"\\n\" call_json \"\\n\" \"</tool_call>\"\ncall_json: %json {}\n",
                tag("<tool_call>"),
                compact(&schema)
            );
            (
                lark,
                trigger_list(forced, &[("<tool_call>", false)], trigger_token),
            )
        }
        ToolFormat::Llama3Json => {
            let schema = one_of(&offered, "parameters");
            let start = if parallel {
                "start: tag? call (\"; \" call)*"
            } else {
                "start: tag? call"
            };
            let lark = format!(
                "{start}\ntag: {}\ncall: %json {}\n",
                tag("<|python_tag|>"),
                compact(&schema)
            );
            (
                lark,
                trigger_list(
                    forced,
                    &[("<|python_tag|>", false), ("{", true)],
                    trigger_token,
                ),
            )
        }
        ToolFormat::Mistral => {
            let mut array =
                json!({"type": "array", "items": one_of(&offered, "arguments"), "minItems": 1});
            if !parallel {
                array["maxItems"] = json!(1);
            }
            let lark = format!(
                "start: {} \" \"? calls\ncalls: %json {}\n",
                tag("[TOOL_CALLS]"),
                compact(&array)
            );
            (
                lark,
                trigger_list(forced, &[("[TOOL_CALLS]", false)], trigger_token),
            )
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

fn trigger_list(
    forced: bool,
    triggers: &[(&str, bool)],
    first_token: Option<u32>,
) -> Vec<GrammarTrigger> {
    if forced {
        return Vec::new();
    }
    triggers
        .iter()
        .enumerate()
        .map(|(i, &(text, at_start))| GrammarTrigger {
            text: text.to_owned(),
            token: if i == 0 { first_token } else { None },
            at_start,
        })
        .collect()
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

    #[test]
    fn none_and_unknown_names_give_no_grammar() {
        let t = tools();
        assert!(tool_grammar(ToolFormat::Hermes, None, &t, &ToolChoice::None, true).is_none());
        assert!(tool_grammar(ToolFormat::Hermes, None, &[], &ToolChoice::Auto, true).is_none());
        assert!(tool_grammar(
            ToolFormat::Hermes,
            None,
            &t,
            &ToolChoice::Named("nope".into()),
            true
        )
        .is_none());
    }

    #[test]
    fn hermes_auto_is_lazy_at_its_tag_and_required_is_not() {
        let t = tools();
        let g = tool_grammar(ToolFormat::Hermes, None, &t, &ToolChoice::Auto, true).expect("g");
        assert!(g.is_lazy());
        assert_eq!(g.triggers[0].text, "<tool_call>");
        assert!(
            g.lark.starts_with("start: call (\"\\n\" call)*\n"),
            "{}",
            g.lark
        );
        assert!(
            g.lark.contains("call: \"<tool_call>\" \"\\n\" call_json"),
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

        let g =
            tool_grammar(ToolFormat::Hermes, None, &t, &ToolChoice::Required, false).expect("g");
        assert!(!g.is_lazy());
        assert!(g.lark.starts_with("start: call\n"), "{}", g.lark);
    }

    #[test]
    fn a_named_tool_is_the_only_one_allowed() {
        let t = tools();
        let g = tool_grammar(
            ToolFormat::Hermes,
            None,
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
    fn llama3_uses_parameters_and_both_triggers() {
        let g = tool_grammar(
            ToolFormat::Llama3Json,
            Some(128010),
            &tools(),
            &ToolChoice::Auto,
            true,
        )
        .expect("g");
        assert!(g.lark.contains("tag: <[128010]>"), "{}", g.lark);
        let schema = embedded(&g.lark, "call");
        assert!(schema["anyOf"][0]["properties"]["parameters"].is_object());
        assert_eq!(g.triggers.len(), 2);
        assert_eq!(g.triggers[0].token, Some(128010));
        assert!(g.triggers[1].at_start && g.triggers[1].text == "{");
    }

    #[test]
    fn mistral_is_an_array_after_its_token() {
        let g = tool_grammar(
            ToolFormat::Mistral,
            Some(5),
            &tools(),
            &ToolChoice::Required,
            false,
        )
        .expect("g");
        assert!(
            g.lark.starts_with("start: <[5]> \" \"? calls"),
            "{}",
            g.lark
        );
        let schema = embedded(&g.lark, "calls");
        assert_eq!(schema["type"], "array");
        assert_eq!(schema["maxItems"], 1);
        assert!(!g.is_lazy());
    }

    #[test]
    fn the_generic_envelope_allows_an_answer_only_under_auto() {
        let t = tools();
        let g = tool_grammar(ToolFormat::Generic, None, &t, &ToolChoice::Auto, true).expect("g");
        assert!(!g.is_lazy());
        let schema = embedded(&g.lark, "envelope");
        assert_eq!(schema["anyOf"][1]["required"], json!(["response"]));
        let g =
            tool_grammar(ToolFormat::Generic, None, &t, &ToolChoice::Required, false).expect("g");
        let schema = embedded(&g.lark, "envelope");
        assert_eq!(schema["required"], json!(["tool_calls"]));
        assert_eq!(schema["properties"]["tool_calls"]["maxItems"], 1);
    }
}
