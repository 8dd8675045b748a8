//! `tools`, `tool_choice`, `parallel_tool_calls` and the tool turns of
//! `messages`, checked: every tool a function with a name OpenAI would
//! accept and an object schema for its parameters, the choice one of
//! OpenAI's four forms naming an offered function.

use serde_json::Value;

use crate::chat_template::Message;
use crate::server::error::AppError;
use crate::server::request::WireToolCall;
use crate::tools::{Tool, ToolChoice};

/// Tools one request may offer (OpenAI's limit).
pub const MAX_TOOLS: usize = 128;

/// The checked tool fields of a request.
#[derive(Debug, Clone)]
pub struct ValidTools {
    pub tools: Vec<Tool>,
    pub choice: ToolChoice,
    pub parallel: bool,
}

impl ValidTools {
    /// Whether the model is to be shown the tools and its output read for
    /// calls (`tool_choice: none` hides them, as the brief of issue 13 and
    /// OpenAI's own behaviour have it).
    pub fn active(&self) -> bool {
        !self.tools.is_empty() && self.choice != ToolChoice::None
    }
}

pub fn check(
    tools: Option<Vec<Value>>,
    choice: Option<Value>,
    parallel: Option<bool>,
) -> Result<ValidTools, AppError> {
    let raw = tools.unwrap_or_default();
    if raw.len() > MAX_TOOLS {
        return Err(AppError::invalid(
            "tools",
            format!(
                "`tools` may hold at most {MAX_TOOLS} tools. Given: {}",
                raw.len()
            ),
        ));
    }
    let mut checked: Vec<Tool> = Vec::with_capacity(raw.len());
    for (i, t) in raw.iter().enumerate() {
        let tool = tool(i, t)?;
        if checked.iter().any(|c| c.name == tool.name) {
            return Err(AppError::invalid(
                &format!("tools[{i}].function.name"),
                format!(
                    "`tools[{i}].function.name`: {:?} is offered twice.",
                    tool.name
                ),
            ));
        }
        checked.push(tool);
    }
    let choice = match choice {
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => return Err(bad_choice(&format!("{other:?}"))),
        },
        Some(v @ Value::Object(_)) => {
            let kind = v.get("type").and_then(Value::as_str);
            let name = v.pointer("/function/name").and_then(Value::as_str);
            match (kind, name) {
                (Some("function"), Some(name)) => ToolChoice::Named(name.to_owned()),
                _ => return Err(bad_choice(&v.to_string())),
            }
        }
        Some(other) => return Err(bad_choice(&other.to_string())),
    };
    match &choice {
        ToolChoice::Required if checked.is_empty() => {
            return Err(AppError::invalid(
                "tool_choice",
                "`tool_choice` \"required\" needs at least one tool in `tools`.",
            ))
        }
        ToolChoice::Named(name) if !checked.iter().any(|t| &t.name == name) => {
            let offered: Vec<&str> = checked.iter().map(|t| t.name.as_str()).collect();
            return Err(AppError::invalid(
                "tool_choice",
                format!(
                    "`tool_choice` names the function {name:?}, which is not in `tools` (offered: {}).",
                    if offered.is_empty() {
                        "none".to_owned()
                    } else {
                        offered.join(", ")
                    }
                ),
            ));
        }
        _ => {}
    }
    Ok(ValidTools {
        tools: checked,
        choice,
        parallel: parallel.unwrap_or(true),
    })
}

fn bad_choice(given: &str) -> AppError {
    AppError::invalid(
        "tool_choice",
        format!(
            "`tool_choice` must be \"none\", \"auto\", \"required\" or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}. Given: {given}"
        ),
    )
}

fn tool(i: usize, t: &Value) -> Result<Tool, AppError> {
    let kind = t.get("type").and_then(Value::as_str);
    if kind != Some("function") {
        return Err(AppError::invalid(
            &format!("tools[{i}].type"),
            format!(
                "`tools[{i}].type` must be \"function\" (the only kind of tool taper runs). Given: {}",
                t.get("type").map_or("nothing".to_owned(), Value::to_string)
            ),
        ));
    }
    let Some(f) = t.get("function").and_then(Value::as_object) else {
        return Err(AppError::invalid(
            &format!("tools[{i}].function"),
            format!("`tools[{i}].function` must be an object with a `name`."),
        ));
    };
    let param = format!("tools[{i}].function.name");
    let name = match f.get("name") {
        Some(Value::String(n)) => n.clone(),
        _ => {
            return Err(AppError::invalid(
                &param,
                format!("`{param}` must be a string."),
            ))
        }
    };
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
    {
        return Err(AppError::invalid(
            &param,
            format!(
                "`{param}` must be 1 to 64 letters, digits, underscores, dashes or dots. Given: {name:?}"
            ),
        ));
    }
    let description = match f.get("description") {
        None | Some(Value::Null) => None,
        Some(Value::String(d)) => Some(d.clone()),
        Some(_) => {
            return Err(AppError::invalid(
                &format!("tools[{i}].function.description"),
                format!("`tools[{i}].function.description` must be a string."),
            ))
        }
    };
    let param = format!("tools[{i}].function.parameters");
    let parameters = match f.get("parameters") {
        // OpenAI: leaving them out means a function without arguments.
        None | Some(Value::Null) => serde_json::json!({"type": "object", "properties": {}}),
        Some(p @ Value::Object(o)) => {
            match o.get("type") {
                None => {}
                Some(Value::String(t)) if t == "object" => {}
                Some(other) => {
                    return Err(AppError::invalid(
                        &param,
                        format!(
                            "`{param}` must be a JSON schema of an object (`\"type\": \"object\"`). Given type: {other}"
                        ),
                    ))
                }
            }
            p.clone()
        }
        Some(other) => {
            return Err(AppError::invalid(
                &param,
                format!("`{param}` must be a JSON schema object. Given: {other}"),
            ))
        }
    };
    Ok(Tool {
        name,
        description,
        parameters,
    })
}

/// An assistant turn's calls as templates read them (`function.arguments`
/// parsed into JSON when it parses: templates `tojson` it).
pub fn calls_for_template(i: usize, calls: Vec<WireToolCall>) -> Result<Vec<Value>, AppError> {
    calls
        .into_iter()
        .enumerate()
        .map(|(j, c)| {
            if let Some(kind) = c.kind.as_deref().filter(|k| *k != "function") {
                let param = format!("messages[{i}].tool_calls[{j}].type");
                return Err(AppError::invalid(
                    &param,
                    format!("`{param}` must be \"function\". Given: {kind:?}"),
                ));
            }
            let arguments = serde_json::from_str::<Value>(&c.function.arguments)
                .unwrap_or(Value::String(c.function.arguments));
            let mut call = serde_json::Map::new();
            if let Some(id) = c.id {
                call.insert("id".into(), id.into());
            }
            call.insert("type".into(), "function".into());
            call.insert(
                "function".into(),
                serde_json::json!({"name": c.function.name, "arguments": arguments}),
            );
            Ok(Value::Object(call))
        })
        .collect()
}

/// The checks of a message's tool fields, beside [`super::to_message`]'s.
pub fn check_message(i: usize, m: &Message) -> Result<(), AppError> {
    if m.tool_calls.is_some() && m.role != "assistant" {
        return Err(AppError::invalid(
            &format!("messages[{i}].tool_calls"),
            format!(
                "`messages[{i}].tool_calls` is only allowed on assistant messages. Given role: {:?}",
                m.role
            ),
        ));
    }
    if m.role == "tool" && m.tool_call_id.is_none() {
        return Err(AppError::invalid(
            &format!("messages[{i}].tool_call_id"),
            format!("`messages[{i}].tool_call_id` is required on a tool message: the id of the call it answers."),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn weather() -> Value {
        json!({"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}})
    }

    fn param(e: &AppError) -> &str {
        e.detail.param.as_deref().unwrap_or("")
    }

    #[test]
    fn good_tools_and_choices_pass() {
        let v = check(Some(vec![weather()]), None, None).expect("ok");
        assert_eq!(v.choice, ToolChoice::Auto);
        assert!(v.parallel && v.active());
        let v = check(
            Some(vec![weather()]),
            Some(json!({"type": "function", "function": {"name": "get_weather"}})),
            Some(false),
        )
        .expect("ok");
        assert_eq!(v.choice, ToolChoice::Named("get_weather".into()));
        let v = check(Some(vec![weather()]), Some(json!("none")), None).expect("ok");
        assert!(!v.active());
        // No parameters: a function without arguments.
        let v = check(
            Some(vec![
                json!({"type": "function", "function": {"name": "now"}}),
            ]),
            None,
            None,
        )
        .expect("ok");
        assert_eq!(v.tools[0].parameters["type"], "object");
    }

    #[test]
    fn bad_tools_are_named() {
        let cases = [
            (json!({"type": "custom", "custom": {}}), "tools[0].type"),
            (json!({"type": "function"}), "tools[0].function"),
            (
                json!({"type": "function", "function": {"name": "has space"}}),
                "tools[0].function.name",
            ),
            (
                json!({"type": "function", "function": {"name": "f", "parameters": "x"}}),
                "tools[0].function.parameters",
            ),
            (
                json!({"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}),
                "tools[0].function.parameters",
            ),
        ];
        for (tool, want) in cases {
            let e = check(Some(vec![tool.clone()]), None, None).expect_err("refused");
            assert_eq!(param(&e), want, "{tool}");
        }
        let e = check(Some(vec![weather(), weather()]), None, None).expect_err("twice");
        assert_eq!(param(&e), "tools[1].function.name");
    }

    #[test]
    fn bad_choices_are_named() {
        for choice in [
            json!("sometimes"),
            json!({"type": "function", "function": {"name": "other"}}),
            json!({"type": "function"}),
            json!(3),
        ] {
            let e = check(Some(vec![weather()]), Some(choice.clone()), None).expect_err("refused");
            assert_eq!(param(&e), "tool_choice", "{choice}");
        }
        let e = check(None, Some(json!("required")), None).expect_err("no tools");
        assert_eq!(param(&e), "tool_choice");
        let e = check(
            Some(vec![weather()]),
            Some(json!({"type": "function", "function": {"name": "nope"}})),
            None,
        )
        .expect_err("unknown");
        assert!(e.detail.message.contains("get_weather"), "{e:?}");
    }
}
