//! Tool calling and reasoning, independent of HTTP: the tools a request
//! offers ([`Tool`], [`ToolChoice`]), the tool-call syntax a model was
//! trained on ([`ToolFormat`], read from its chat template), the prompt
//! changes a template that ignores tools needs ([`generic`]), the parser
//! that splits generated text into reasoning, content and calls
//! ([`parse::OutputParser`], streaming), and the grammar a constraint needs
//! to enforce a call ([`grammar::tool_grammar`]).
//!
//! The server's validation builds these from a request; its chat chunker
//! feeds engine tokens to the parser. Nothing here knows about tensors.

pub mod generic;
pub mod grammar;
pub mod parse;

use crate::chat_template::ChatTemplate;
use crate::tokenizer::Tokenizer;

/// One function a request offers the model.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// The arguments' JSON schema (an object schema).
    pub parameters: serde_json::Value,
}

impl Tool {
    /// The tool as OpenAI's wire format and transformers' templates spell
    /// it: `{"type": "function", "function": {name, description, parameters}}`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut function = serde_json::Map::new();
        function.insert("name".into(), self.name.clone().into());
        if let Some(d) = &self.description {
            function.insert("description".into(), d.clone().into());
        }
        function.insert("parameters".into(), self.parameters.clone());
        serde_json::json!({"type": "function", "function": function})
    }
}

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ToolChoice {
    /// No call: the tools are not shown to the model.
    None,
    /// The model chooses between answering and calling.
    #[default]
    Auto,
    /// The model must call at least one tool.
    Required,
    /// The model must call this tool.
    Named(String),
}

/// How a model writes a tool call, recognised from what its chat template
/// writes for an assistant turn with `tool_calls` (never from its name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    /// `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`
    /// (Qwen2.5, Qwen3, Hermes and their many fine-tunes).
    Hermes,
    /// Llama 3.1/3.2/3.3: `{"name": ..., "parameters": {...}}`, bare or after
    /// `<|python_tag|>`, several separated by `;`.
    Llama3Json,
    /// Mistral: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`
    /// (and the newer `[TOOL_CALLS]name[ARGS]{...}`).
    Mistral,
    /// A template that ignores tools: taper describes them in a system
    /// message and asks for a JSON envelope, `{"tool_calls": [...]}` or
    /// `{"response": "..."}` (llama.cpp's generic handler does the same).
    Generic,
}

impl std::fmt::Display for ToolFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ToolFormat::Hermes => "hermes (<tool_call> JSON)",
            ToolFormat::Llama3Json => "llama3 JSON ({\"name\", \"parameters\"})",
            ToolFormat::Mistral => "mistral ([TOOL_CALLS])",
            ToolFormat::Generic => "generic (tools in a system message, JSON envelope)",
        })
    }
}

/// The text that starts a call in a format, where it may appear.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trigger {
    pub text: &'static str,
    /// Only at the start of the answer (after any thinking), not after text.
    pub at_start: bool,
}

impl ToolFormat {
    /// Reads the format off a chat template; no template is the generic
    /// format.
    pub fn detect(template: Option<&ChatTemplate>) -> ToolFormat {
        let Some(t) = template else {
            return ToolFormat::Generic;
        };
        if t.mentions("<tool_call>") {
            ToolFormat::Hermes
        } else if t.mentions("[TOOL_CALLS]") {
            ToolFormat::Mistral
        } else if t.mentions("<|python_tag|>")
            || (t.mentions("ipython") && t.mentions("parameters"))
        {
            // Llama 3.1's template writes `<|python_tag|>`; 3.2's writes
            // calls as `{"name": ..., "parameters": ...}` and results under
            // the `ipython` role.
            ToolFormat::Llama3Json
        } else {
            ToolFormat::Generic
        }
    }

    /// Where calls start in the output.
    pub fn triggers(self) -> &'static [Trigger] {
        match self {
            ToolFormat::Hermes => &[Trigger {
                text: "<tool_call>",
                at_start: false,
            }],
            ToolFormat::Mistral => &[Trigger {
                text: "[TOOL_CALLS]",
                at_start: false,
            }],
            ToolFormat::Llama3Json => &[
                Trigger {
                    text: "<|python_tag|>",
                    at_start: false,
                },
                Trigger {
                    text: "{",
                    at_start: true,
                },
            ],
            ToolFormat::Generic => &[
                Trigger {
                    text: "{",
                    at_start: true,
                },
                Trigger {
                    text: "```",
                    at_start: true,
                },
            ],
        }
    }
}

/// The opening and closing tags of a model's thinking.
pub const THINK_OPEN: &str = "<think>";
pub const THINK_CLOSE: &str = "</think>";

/// What a model's output may hold besides its answer, known at load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputSyntax {
    pub tool_format: ToolFormat,
    /// The template prints an assistant turn's `tool_calls` itself (else
    /// the generic format rewrites earlier calls and results as text).
    pub template_renders_calls: bool,
    /// The model thinks in `<think>…</think>` (Qwen3, DeepSeek-R1 and its
    /// distills): its template or vocabulary has the closing tag.
    pub reasoning: bool,
    /// Markers the tokenizer holds as special tokens, which the engine's
    /// detokenizer leaves out of the text (Llama's `<|python_tag|>`,
    /// Mistral's `[TOOL_CALLS]`): the parser is given their text when their
    /// id comes by.
    pub special_markers: Vec<(u32, String)>,
    /// The format's markers that are single tokens of the vocabulary, for
    /// the grammars that enforce calls.
    pub call_tokens: grammar::CallTokens,
}

impl OutputSyntax {
    pub fn detect(template: Option<&ChatTemplate>, tokenizer: &Tokenizer) -> OutputSyntax {
        let tool_format = ToolFormat::detect(template);
        let reasoning = template.is_some_and(|t| t.mentions(THINK_CLOSE))
            || tokenizer.token_id(THINK_CLOSE).is_some();
        let mut markers: Vec<&str> = tool_format
            .triggers()
            .iter()
            .filter(|t| !t.at_start)
            .map(|t| t.text)
            .collect();
        if reasoning {
            markers.extend([THINK_OPEN, THINK_CLOSE]);
        }
        let special_markers = markers
            .into_iter()
            .filter_map(|m| {
                let id = tokenizer.token_id(m)?;
                tokenizer.is_special(id).then(|| (id, m.to_owned()))
            })
            .collect();
        let single = |text: &str| tokenizer.token_id(text);
        let call_tokens = grammar::CallTokens {
            open: tool_format
                .triggers()
                .iter()
                .find(|t| !t.at_start)
                .and_then(|t| single(t.text)),
            close: match tool_format {
                ToolFormat::Hermes => single("</tool_call>"),
                _ => None,
            },
        };
        OutputSyntax {
            tool_format,
            template_renders_calls: template.is_some_and(|t| t.mentions("tool_calls")),
            reasoning,
            special_markers,
            call_tokens,
        }
    }

    /// The conversation and the template's `tools` variable for a request:
    /// the tools go to a template that shows them (`None` otherwise, and
    /// when `active` is false: `tool_choice: none` or no tools); a
    /// template that ignores them gets the generic format's system prompt,
    /// and, when it cannot print calls either, the history as text.
    pub fn prepare(
        &self,
        mut messages: Vec<crate::chat_template::Message>,
        tools: &[Tool],
        choice: &ToolChoice,
        parallel: bool,
    ) -> (
        Vec<crate::chat_template::Message>,
        Option<serde_json::Value>,
    ) {
        let active = !tools.is_empty() && *choice != ToolChoice::None;
        if self.tool_format != ToolFormat::Generic {
            let listed =
                active.then(|| serde_json::Value::Array(tools.iter().map(Tool::to_json).collect()));
            return (messages, listed);
        }
        if !self.template_renders_calls {
            messages = generic::flatten_history(messages);
        }
        if active {
            generic::add_system_prompt(
                &mut messages,
                &generic::system_prompt(tools, choice, parallel),
            );
        }
        (messages, None)
    }
}

impl Default for OutputSyntax {
    fn default() -> Self {
        OutputSyntax {
            tool_format: ToolFormat::Generic,
            template_renders_calls: false,
            reasoning: false,
            special_markers: Vec::new(),
            call_tokens: grammar::CallTokens::default(),
        }
    }
}

/// Whether a rendered prompt leaves the model inside its thinking: the
/// template opened `<think>` for it (DeepSeek-R1's, Qwen3-Thinking's), so
/// the output starts with thoughts and has only the closing tag.
pub fn prompt_opens_thinking(prompt: &str) -> bool {
    prompt.trim_end().ends_with(THINK_OPEN)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn template(source: &str) -> ChatTemplate {
        ChatTemplate::from_source(source, BTreeMap::new(), "test").expect("compiles")
    }

    #[test]
    fn formats_are_read_from_the_template() {
        let cases = [
            ("{{ '<tool_call>' }}", ToolFormat::Hermes),
            ("{{ '[TOOL_CALLS] ' }}", ToolFormat::Mistral),
            ("{{ '<|python_tag|>' }}", ToolFormat::Llama3Json),
            (
                "{{ 'ipython' }}{{ '\"parameters\": ' }}",
                ToolFormat::Llama3Json,
            ),
            ("{{ messages[0].content }}", ToolFormat::Generic),
        ];
        for (source, want) in cases {
            assert_eq!(
                ToolFormat::detect(Some(&template(source))),
                want,
                "{source}"
            );
        }
        assert_eq!(ToolFormat::detect(None), ToolFormat::Generic);
    }

    #[test]
    fn an_opened_think_tag_is_seen_at_the_prompts_end() {
        assert!(prompt_opens_thinking("<|Assistant|><think>\n"));
        assert!(!prompt_opens_thinking(
            "<|im_start|>assistant\n<think>\n\n</think>\n\n"
        ));
        assert!(!prompt_opens_thinking("<|im_start|>assistant\n"));
    }

    #[test]
    fn tools_serialize_as_openai_spells_them() {
        let t = Tool {
            name: "f".into(),
            description: None,
            parameters: serde_json::json!({"type": "object"}),
        };
        assert_eq!(
            t.to_json(),
            serde_json::json!({"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}})
        );
    }
}
