//! Structured output on the wire → a [`ConstraintSpec`], compiled for the
//! served model.
//!
//! Three spellings ask for the same thing: OpenAI's `response_format`
//! (`text`, `json_object`, `json_schema` with `schema`, `name`, `strict`),
//! vLLM's `structured_outputs` (`json`, `regex`, `choice`, `grammar`,
//! `json_object`) and vLLM's older `guided_json` / `guided_regex` /
//! `guided_choice` / `guided_grammar`. At most one constraint may be given;
//! two are a 400 naming both (vLLM refuses them too). `strict` is accepted
//! either way: the schema is always enforced. vLLM's schemas may come as a
//! JSON string; its grammars are read as llguidance's Lark.
//!
//! Compiling runs here, on the validation thread, so a slow schema never
//! holds up the engine; its error is a 400 on the field that carried it.

use serde_json::{Map, Value};

use crate::constraint::{Constraint, ConstraintSpec};
use crate::server::error::AppError;
use crate::server::request::StructuredFields;
use crate::server::state::Ready;

/// The constraint the request asks for, compiled; `None` for free text.
pub(super) fn constraint(
    fields: StructuredFields,
    ready: &Ready,
) -> Result<Option<Constraint>, AppError> {
    let Some((spec, param)) = spec(fields)? else {
        return Ok(None);
    };
    let compiled = ready
        .pipeline()
        .compile_constraint(&spec)
        .map_err(|e| AppError::invalid(param, format!("`{param}`: {e}")))?;
    tracing::debug!(
        "compiled a {} in {:.1} ms",
        compiled.kind(),
        compiled.compile_time().as_secs_f64() * 1e3
    );
    Ok(Some(compiled))
}

/// The one spec the fields ask for, with the field that asked; refuses two.
fn spec(fields: StructuredFields) -> Result<Option<(ConstraintSpec, &'static str)>, AppError> {
    let StructuredFields {
        response_format,
        structured_outputs,
        guided_json,
        guided_regex,
        guided_choice,
        guided_grammar,
    } = fields;
    let mut found: Vec<(ConstraintSpec, &'static str)> = Vec::new();
    if let Some(v) = response_format {
        found.extend(response_format_spec(v)?.map(|s| (s, "response_format")));
    }
    if let Some(v) = structured_outputs {
        found.extend(structured_outputs_spec(v)?);
    }
    for (param, value) in [
        ("guided_json", guided_json),
        ("guided_regex", guided_regex),
        ("guided_choice", guided_choice),
        ("guided_grammar", guided_grammar),
    ] {
        if let Some(v) = value.filter(|v| !v.is_null()) {
            found.push((vllm_spec(param, v)?, param));
        }
    }
    if found.len() > 1 {
        let names: Vec<&str> = found.iter().map(|(_, p)| *p).collect();
        return Err(AppError::invalid(
            found[1].1,
            format!(
                "Only one structured-output constraint may be given. Given: {}",
                names.join(", ")
            ),
        ));
    }
    Ok(found.pop())
}

/// OpenAI's `response_format`.
fn response_format_spec(v: Value) -> Result<Option<ConstraintSpec>, AppError> {
    const P: &str = "response_format";
    let Value::Object(mut o) = v else {
        return Err(AppError::invalid(
            P,
            "`response_format` must be an object with a `type`.",
        ));
    };
    let kind = o.get("type").and_then(Value::as_str).unwrap_or_default();
    match kind {
        "text" => Ok(None),
        "json_object" => Ok(Some(ConstraintSpec::JsonObject)),
        "json_schema" => {
            let Some(Value::Object(mut js)) = o.remove("json_schema") else {
                return Err(AppError::invalid(
                    "response_format.json_schema",
                    "`response_format.json_schema` must be an object holding `name` and `schema`.",
                ));
            };
            if let Some(strict) = js.get("strict") {
                if !(strict.is_boolean() || strict.is_null()) {
                    return Err(AppError::invalid(
                        "response_format.json_schema.strict",
                        "`response_format.json_schema.strict` must be a boolean.",
                    ));
                }
            }
            // OpenAI requires a name; clients always send one, and it
            // changes nothing here, so a missing one is let through.
            if js.get("name").is_some_and(|n| !n.is_string()) {
                return Err(AppError::invalid(
                    "response_format.json_schema.name",
                    "`response_format.json_schema.name` must be a string.",
                ));
            }
            let schema = js.remove("schema").unwrap_or_else(|| Value::Object(Map::new()));
            Ok(Some(ConstraintSpec::JsonSchema(schema)))
        }
        other => Err(AppError::invalid(
            "response_format.type",
            format!(
                "`response_format.type` must be one of \"text\", \"json_object\", \"json_schema\". Given: {other:?}"
            ),
        )),
    }
}

/// vLLM's `structured_outputs`: one of its constraint fields set. Its
/// other fields (`disable_any_whitespace`, `whitespace_pattern`,
/// `disable_fallback`, ...) are accepted and ignored.
fn structured_outputs_spec(v: Value) -> Result<Vec<(ConstraintSpec, &'static str)>, AppError> {
    let Value::Object(o) = v else {
        return Err(AppError::invalid(
            "structured_outputs",
            "`structured_outputs` must be an object.",
        ));
    };
    let mut found = Vec::new();
    for (key, param) in [
        ("json", "structured_outputs.json"),
        ("regex", "structured_outputs.regex"),
        ("choice", "structured_outputs.choice"),
        ("grammar", "structured_outputs.grammar"),
        ("json_object", "structured_outputs.json_object"),
    ] {
        match o.get(key) {
            None | Some(Value::Null) | Some(Value::Bool(false)) if key == "json_object" => {}
            None | Some(Value::Null) => {}
            Some(v) => found.push((vllm_spec(param, v.clone())?, param)),
        }
    }
    if o.get("structural_tag").is_some_and(|v| !v.is_null()) {
        return Err(AppError::invalid(
            "structured_outputs.structural_tag",
            "`structured_outputs.structural_tag` is not supported; use `json`, `regex`, `choice` or `grammar`.",
        ));
    }
    Ok(found)
}

/// One vLLM constraint field: `…json` (a schema, or a JSON string of one),
/// `…regex`, `…choice` (a list of strings), `…grammar` (Lark),
/// `…json_object` (true).
fn vllm_spec(param: &'static str, v: Value) -> Result<ConstraintSpec, AppError> {
    let kind = param.rsplit(['.', '_']).next().unwrap_or(param);
    match kind {
        "json" => match v {
            Value::String(s) => serde_json::from_str(&s)
                .map(ConstraintSpec::JsonSchema)
                .map_err(|e| {
                    AppError::invalid(
                        param,
                        format!("`{param}` must be a JSON schema (an object, or a string holding one); the string is not JSON: {e}"),
                    )
                }),
            v => Ok(ConstraintSpec::JsonSchema(v)),
        },
        "regex" => match v {
            Value::String(s) => Ok(ConstraintSpec::Regex(s)),
            _ => Err(AppError::invalid(param, format!("`{param}` must be a string."))),
        },
        "choice" => {
            let choices: Option<Vec<String>> = v.as_array().and_then(|a| {
                a.iter()
                    .map(|c| c.as_str().map(str::to_owned))
                    .collect()
            });
            choices.map(ConstraintSpec::Choice).ok_or_else(|| {
                AppError::invalid(param, format!("`{param}` must be a list of strings."))
            })
        }
        "grammar" => match v {
            Value::String(s) => Ok(ConstraintSpec::Lark(s)),
            _ => Err(AppError::invalid(
                param,
                format!("`{param}` must be a string holding a Lark grammar."),
            )),
        },
        // `structured_outputs.json_object` (the split above leaves "object").
        _ => match v {
            Value::Bool(true) => Ok(ConstraintSpec::JsonObject),
            _ => Err(AppError::invalid(param, format!("`{param}` must be true."))),
        },
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn fields(v: Value) -> StructuredFields {
        serde_json::from_value(v).expect("parses")
    }

    fn spec_of(v: Value) -> Result<Option<(ConstraintSpec, &'static str)>, AppError> {
        spec(fields(v))
    }

    #[test]
    fn every_spelling_gives_its_spec() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let cases = [
            (json!({}), None),
            (json!({"response_format": {"type": "text"}}), None),
            (
                json!({"response_format": {"type": "json_object"}}),
                Some((ConstraintSpec::JsonObject, "response_format")),
            ),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": true, "schema": schema}}}),
                Some((
                    ConstraintSpec::JsonSchema(schema.clone()),
                    "response_format",
                )),
            ),
            (
                json!({"structured_outputs": {"json": schema}}),
                Some((
                    ConstraintSpec::JsonSchema(schema.clone()),
                    "structured_outputs.json",
                )),
            ),
            (
                json!({"structured_outputs": {"regex": "a+", "disable_any_whitespace": true}}),
                Some((
                    ConstraintSpec::Regex("a+".into()),
                    "structured_outputs.regex",
                )),
            ),
            (
                json!({"structured_outputs": {"choice": ["a", "b"]}}),
                Some((
                    ConstraintSpec::Choice(vec!["a".into(), "b".into()]),
                    "structured_outputs.choice",
                )),
            ),
            (
                json!({"structured_outputs": {"grammar": "start: \"x\""}}),
                Some((
                    ConstraintSpec::Lark("start: \"x\"".into()),
                    "structured_outputs.grammar",
                )),
            ),
            (
                json!({"structured_outputs": {"json_object": true}}),
                Some((ConstraintSpec::JsonObject, "structured_outputs.json_object")),
            ),
            (
                json!({"guided_json": schema.to_string()}),
                Some((ConstraintSpec::JsonSchema(schema.clone()), "guided_json")),
            ),
            (
                json!({"guided_regex": "[0-9]+"}),
                Some((ConstraintSpec::Regex("[0-9]+".into()), "guided_regex")),
            ),
            (
                json!({"guided_choice": ["x"]}),
                Some((ConstraintSpec::Choice(vec!["x".into()]), "guided_choice")),
            ),
            (
                json!({"guided_grammar": "start: \"y\""}),
                Some((
                    ConstraintSpec::Lark("start: \"y\"".into()),
                    "guided_grammar",
                )),
            ),
        ];
        for (body, want) in cases {
            let got = spec_of(body.clone()).unwrap_or_else(|e| panic!("{body}: {e:?}"));
            assert_eq!(got, want, "{body}");
        }
    }

    #[test]
    fn bad_or_double_constraints_name_the_field() {
        let cases = [
            (
                json!({"response_format": {"type": "json_object"}, "guided_regex": "a"}),
                "guided_regex",
                "response_format, guided_regex",
            ),
            (
                json!({"structured_outputs": {"regex": "a", "choice": ["b"]}}),
                "structured_outputs.choice",
                "Only one",
            ),
            (
                json!({"response_format": {"type": "yaml"}}),
                "response_format.type",
                "yaml",
            ),
            (
                json!({"response_format": "json"}),
                "response_format",
                "object",
            ),
            (
                json!({"response_format": {"type": "json_schema"}}),
                "response_format.json_schema",
                "name",
            ),
            (
                json!({"guided_choice": "a"}),
                "guided_choice",
                "list of strings",
            ),
            (
                json!({"guided_json": "{not json"}),
                "guided_json",
                "not JSON",
            ),
            (json!({"guided_regex": 3}), "guided_regex", "string"),
        ];
        for (body, param, text) in cases {
            let e = spec_of(body.clone()).expect_err("refused");
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(e.detail.param.as_deref(), Some(param), "{body}");
            assert!(
                e.detail.message.contains(text),
                "{body}: {}",
                e.detail.message
            );
        }
    }
}
