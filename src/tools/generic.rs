//! The generic tool format, for chat templates that ignore `tools`: the
//! tools are described in a system message taper adds, the model is asked
//! for one JSON envelope (`{"tool_calls": [...]}` or `{"response": "..."}`,
//! the shape llama.cpp's generic handler uses), and the conversation's
//! earlier calls and results are rewritten into text the template can
//! print (a template that ignores tools usually ignores `tool_calls` and
//! may refuse the `tool` role).

use serde_json::{json, Value};

use super::{Tool, ToolChoice};
use crate::chat_template::Message;

/// The instructions for the envelope, listing the tools.
pub fn system_prompt(tools: &[Tool], choice: &ToolChoice, parallel: bool) -> String {
    let listed: Vec<Value> = tools
        .iter()
        .filter(|t| match choice {
            ToolChoice::Named(name) => &t.name == name,
            _ => true,
        })
        .map(|t| {
            let mut v = serde_json::Map::new();
            v.insert("name".into(), t.name.clone().into());
            if let Some(d) = &t.description {
                v.insert("description".into(), d.clone().into());
            }
            v.insert("parameters".into(), t.parameters.clone());
            Value::Object(v)
        })
        .collect();
    let list = serde_json::to_string_pretty(&listed).unwrap_or_else(|_| "[]".into());
    let calls = if parallel {
        "one or more calls"
    } else {
        "exactly one call"
    };
    let call_form = format!(
        "{{\"tool_calls\": [{{\"name\": \"<tool name>\", \"arguments\": {{<arguments matching the tool's parameters>}}}}]}}   ({calls})"
    );
    let rule = match choice {
        ToolChoice::Required => format!(
            "You must call a tool. Respond with one JSON object and nothing else:\n{call_form}"
        ),
        ToolChoice::Named(name) => format!(
            "You must call the tool `{name}`. Respond with one JSON object and nothing else:\n{call_form}"
        ),
        _ => format!(
            "Respond with one JSON object and nothing else, in one of these forms:\n{call_form}\n{{\"response\": \"<your answer to the user>\"}}"
        ),
    };
    format!("You can call these tools:\n{list}\n\n{rule}")
}

/// Adds the tools' system prompt: appended to the conversation's system
/// message when it has one (templates print only the first), else first.
pub fn add_system_prompt(messages: &mut Vec<Message>, prompt: &str) {
    match messages.first_mut() {
        Some(first) if first.role == "system" || first.role == "developer" => {
            if !first.content.is_empty() {
                first.content.push_str("\n\n");
            }
            first.content.push_str(prompt);
        }
        _ => messages.insert(0, Message::new("system", prompt)),
    }
}

/// Rewrites earlier calls and results as text: an assistant turn's calls
/// become the envelope it would have written, and each run of `tool`
/// results becomes one user turn (so user and assistant still alternate).
pub fn flatten_history(messages: Vec<Message>) -> Vec<Message> {
    let mut out: Vec<Message> = Vec::with_capacity(messages.len());
    let mut results_open = false;
    for m in messages {
        if m.role == "tool" {
            let result = json!({"tool_response": {
                "tool_call_id": m.tool_call_id,
                "name": m.name,
                "content": m.content,
            }});
            let line = result.to_string();
            match out.last_mut() {
                Some(prev) if results_open => {
                    prev.content.push('\n');
                    prev.content.push_str(&line);
                }
                _ => out.push(Message::new("user", line)),
            }
            results_open = true;
            continue;
        }
        results_open = false;
        match m.tool_calls {
            Some(calls) if m.role == "assistant" => {
                let calls: Vec<Value> = calls
                    .iter()
                    .map(|c| {
                        let f = c.get("function").unwrap_or(c);
                        json!({
                            "name": f.get("name").cloned().unwrap_or(Value::Null),
                            "arguments": f.get("arguments").cloned().unwrap_or(json!({})),
                        })
                    })
                    .collect();
                let envelope = json!({"tool_calls": calls}).to_string();
                let content = if m.content.trim().is_empty() {
                    envelope
                } else {
                    format!("{}\n{envelope}", m.content)
                };
                out.push(Message {
                    reasoning_content: m.reasoning_content,
                    ..Message::new("assistant", content)
                });
            }
            _ => out.push(m),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tool(name: &str) -> Tool {
        Tool {
            name: name.into(),
            description: Some(format!("does {name}")),
            parameters: json!({"type": "object", "properties": {"x": {"type": "integer"}}}),
        }
    }

    #[test]
    fn the_prompt_lists_the_tools_and_the_envelope() {
        let p = system_prompt(&[tool("a"), tool("b")], &ToolChoice::Auto, true);
        assert!(
            p.contains("\"name\": \"a\"") && p.contains("\"name\": \"b\""),
            "{p}"
        );
        assert!(p.contains("\"response\""), "{p}");
        let p = system_prompt(
            &[tool("a"), tool("b")],
            &ToolChoice::Named("b".into()),
            false,
        );
        assert!(!p.contains("\"name\": \"a\""), "{p}");
        assert!(p.contains("`b`") && p.contains("exactly one call"), "{p}");
        assert!(!p.contains("\"response\""), "{p}");
    }

    #[test]
    fn the_prompt_joins_an_existing_system_message() {
        let mut m = vec![
            Message::new("system", "Be brief."),
            Message::new("user", "hi"),
        ];
        add_system_prompt(&mut m, "TOOLS");
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].content, "Be brief.\n\nTOOLS");
        let mut m = vec![Message::new("user", "hi")];
        add_system_prompt(&mut m, "TOOLS");
        assert_eq!((m[0].role.as_str(), m.len()), ("system", 2));
    }

    #[test]
    fn history_is_flattened_to_text() {
        let call = json!({"id": "call_1", "type": "function",
            "function": {"name": "a", "arguments": {"x": 1}}});
        let m = vec![
            Message::new("user", "q"),
            Message {
                tool_calls: Some(vec![call]),
                ..Message::new("assistant", "")
            },
            Message {
                tool_call_id: Some("call_1".into()),
                ..Message::new("tool", "42")
            },
            Message {
                tool_call_id: Some("call_2".into()),
                ..Message::new("tool", "43")
            },
        ];
        let out = flatten_history(m);
        assert_eq!(out.len(), 3);
        assert_eq!(
            out[1].content,
            r#"{"tool_calls":[{"name":"a","arguments":{"x":1}}]}"#
        );
        assert!(out[1].tool_calls.is_none());
        assert_eq!(out[2].role, "user");
        assert_eq!(out[2].content.lines().count(), 2);
        assert!(out[2].content.contains("\"call_2\""));
    }
}
