//! Generated text → thinking, answer and tool calls, piece by piece.
//!
//! [`OutputParser`] takes the text of each new token and returns what is
//! now known: [`Delta::Reasoning`] (inside `<think>…</think>`),
//! [`Delta::Content`] (the answer) and [`Delta::Call`] (a whole call), or,
//! where a grammar enforces the calls, [`Delta::CallStart`] and
//! [`Delta::CallArguments`] (a call's name, then its arguments as they
//! come). The
//! server streams the deltas and, for a non-streamed response, folds the
//! same deltas ([`Parsed::fold`]), so a client concatenating a stream gets
//! exactly the non-streamed message whatever the token boundaries were.
//!
//! Text that might be the start of a marker (`<tool_call>`, `</think>`, a
//! leading `{` of a Llama 3 call) is held back until it is known not to be
//! one. Unless a grammar enforces the calls, a call is held until it is
//! complete and its JSON parses: then its name and arguments go out
//! together, so no client ever sees arguments that do not parse, and text
//! that looked like a call but does not parse is given back as content,
//! never dropped. Where a grammar enforces them
//! ([`ParserConfig::stream_arguments`]), a started call can only end as a
//! valid one, so its arguments go out piece by piece as OpenAI streams
//! them, and the non-streamed message holds the same text.

use serde_json::Value;

use super::{ToolFormat, Trigger, THINK_CLOSE, THINK_OPEN};

/// How to read one choice's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParserConfig {
    /// Calls are parsed only when the request offered tools.
    pub tools: Option<ToolFormat>,
    /// Split `<think>…</think>` off into reasoning.
    pub reasoning: bool,
    /// The prompt opened `<think>`: the output starts inside the thinking.
    pub starts_in_reasoning: bool,
    /// `parallel_tool_calls`: false keeps the first call only.
    pub parallel: bool,
    /// A grammar enforces the calls (name before arguments, arguments that
    /// validate): give the arguments out as they come. Only the formats
    /// whose call is one JSON object (Hermes, Llama 3) use it.
    pub stream_arguments: bool,
}

impl ParserConfig {
    /// Whether the parser changes anything (else the text is all content).
    pub fn is_passthrough(&self) -> bool {
        self.tools.is_none() && !self.reasoning
    }
}

/// A parsed tool call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    /// `call_` and 24 random characters.
    pub id: String,
    pub name: String,
    /// A JSON object, as compact text.
    pub arguments: String,
}

/// What a piece of output turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delta {
    Reasoning(String),
    Content(String),
    /// The `index`-th call of the choice, complete.
    Call {
        index: usize,
        call: ToolCall,
    },
    /// The `index`-th call starts: its id and name (arguments follow).
    CallStart {
        index: usize,
        id: String,
        name: String,
    },
    /// More of the `index`-th call's arguments.
    CallArguments {
        index: usize,
        text: String,
    },
}

/// A call whose arguments are given out as they come.
#[derive(Debug, Clone, Copy)]
struct Streaming {
    index: usize,
    /// Where the arguments' value starts in `buf`.
    start: usize,
    /// Bytes of the value already given out.
    sent: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Thinking,
    Answer,
    /// `buf` starts with a call's trigger (or its leading `{`).
    Call,
}

/// The streaming parser of one choice.
#[derive(Debug, Clone)]
pub struct OutputParser {
    cfg: ParserConfig,
    state: State,
    /// Text received and not yet given out.
    buf: String,
    /// Nothing but whitespace has been given out as content since the
    /// answer began (where `<think>` and anchored triggers may still come).
    at_start: bool,
    /// Drop whitespace at the start of the answer (after `</think>`) or of
    /// the thinking (after `<think>`).
    trim_start: bool,
    calls: usize,
    streaming: Option<Streaming>,
}

impl OutputParser {
    pub fn new(cfg: ParserConfig) -> Self {
        let starts_thinking = cfg.reasoning && cfg.starts_in_reasoning;
        OutputParser {
            state: if starts_thinking {
                State::Thinking
            } else {
                State::Answer
            },
            cfg,
            buf: String::new(),
            at_start: true,
            trim_start: starts_thinking,
            calls: 0,
            streaming: None,
        }
    }

    /// Calls given out so far.
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// Feeds the next piece of text.
    pub fn push(&mut self, text: &str) -> Vec<Delta> {
        if self.cfg.is_passthrough() {
            return content(text);
        }
        self.buf.push_str(text);
        self.run(false)
    }

    /// The output ended: gives out what was held back.
    pub fn finish(&mut self) -> Vec<Delta> {
        if self.cfg.is_passthrough() {
            return Vec::new();
        }
        self.run(true)
    }

    fn run(&mut self, last: bool) -> Vec<Delta> {
        let mut out = Vec::new();
        loop {
            let progressed = match self.state {
                State::Thinking => self.step_thinking(last, &mut out),
                State::Answer => self.step_answer(last, &mut out),
                State::Call => self.step_call(last, &mut out),
            };
            if !progressed || self.buf.is_empty() && self.state != State::Call {
                break;
            }
        }
        if last && !self.buf.is_empty() {
            // Whatever a final pass could not place is the model's text.
            let rest = std::mem::take(&mut self.buf);
            push_content(&mut out, &rest);
        }
        merge(out)
    }

    fn step_thinking(&mut self, last: bool, out: &mut Vec<Delta>) -> bool {
        if self.trim_start {
            let trimmed = self.buf.trim_start().len();
            self.buf.drain(..self.buf.len() - trimmed);
            if self.buf.is_empty() && !last {
                return false;
            }
            self.trim_start = false;
        }
        // A call may start before the thinking is closed (a model that
        // skips `</think>`): it ends the thinking there.
        let floating = self.floating_triggers();
        let call_at = floating.iter().filter_map(|t| self.buf.find(t)).min();
        let close_at = self.buf.find(THINK_CLOSE);
        match (close_at, call_at) {
            (Some(close), call) if call.is_none_or(|c| close < c) => {
                let thought = self.buf[..close].trim_end().to_owned();
                self.buf.drain(..close + THINK_CLOSE.len());
                push_reasoning(out, &thought);
                self.state = State::Answer;
                self.at_start = true;
                self.trim_start = true;
                return true;
            }
            (_, Some(call)) => {
                let thought = self.buf[..call].trim_end().to_owned();
                self.buf.drain(..call);
                push_reasoning(out, &thought);
                self.state = State::Call;
                self.at_start = false;
                return true;
            }
            _ => {}
        }
        let end = if last {
            self.buf.trim_end().len()
        } else {
            // Hold a possible start of `</think>` (or of a call), and
            // trailing whitespace (dropped if the tag follows).
            let mut markers = floating;
            markers.push(THINK_CLOSE);
            let partial = self.buf.len() - partial_suffix(&self.buf, &markers);
            self.buf[..partial].trim_end().len()
        };
        let thought: String = self.buf.drain(..end).collect();
        push_reasoning(out, &thought);
        if last {
            self.buf.clear();
        }
        false
    }

    fn step_answer(&mut self, last: bool, out: &mut Vec<Delta>) -> bool {
        let triggers = self.cfg.tools.map(ToolFormat::triggers).unwrap_or(&[]);
        if self.trim_start && !self.at_start {
            // After a call: whitespace until the next text or call is
            // layout, not content.
            let lead = self.buf.len() - self.buf.trim_start().len();
            self.buf.drain(..lead);
            if self.buf.is_empty() {
                return false;
            }
        }
        if self.at_start {
            let lead = self.buf.len() - self.buf.trim_start().len();
            let rest = &self.buf[lead..];
            if rest.is_empty() && !last {
                return false;
            }
            if self.cfg.reasoning && rest.starts_with(THINK_OPEN) {
                self.buf.drain(..lead + THINK_OPEN.len());
                self.state = State::Thinking;
                self.trim_start = true;
                return true;
            }
            let anchored: Vec<&Trigger> = triggers.iter().filter(|t| t.at_start).collect();
            if let Some(_t) = anchored.iter().find(|t| rest.starts_with(t.text)) {
                self.buf.drain(..lead);
                self.state = State::Call;
                return true;
            }
            let may_become = |marker: &str| marker.starts_with(rest) && marker.len() > rest.len();
            let waiting = (self.cfg.reasoning && may_become(THINK_OPEN))
                || anchored.iter().any(|t| may_become(t.text));
            if waiting && !last {
                return false;
            }
            if self.trim_start {
                self.buf.drain(..lead);
            }
        }
        let floating = self.floating_triggers();
        let found = floating.iter().filter_map(|t| self.buf.find(t)).min();
        if let Some(pos) = found {
            let text: String = self.buf.drain(..pos).collect();
            self.emit_answer(out, &text);
            self.state = State::Call;
            return true;
        }
        let end = if last {
            self.buf.len()
        } else {
            self.buf.len() - partial_suffix(&self.buf, &floating)
        };
        let text: String = self.buf.drain(..end).collect();
        self.emit_answer(out, &text);
        false
    }

    /// The triggers that may come anywhere in the answer.
    fn floating_triggers(&self) -> Vec<&'static str> {
        self.cfg
            .tools
            .map(ToolFormat::triggers)
            .unwrap_or(&[])
            .iter()
            .filter(|t| !t.at_start)
            .map(|t| t.text)
            .collect()
    }

    fn emit_answer(&mut self, out: &mut Vec<Delta>, text: &str) {
        if text.is_empty() {
            return;
        }
        if !text.trim().is_empty() {
            self.at_start = false;
            self.trim_start = false;
        }
        push_content(out, text);
    }

    /// `buf` starts a call: waits for all of it, then gives out the calls,
    /// or the text as content when it is not one.
    fn step_call(&mut self, last: bool, out: &mut Vec<Delta>) -> bool {
        let Some(format) = self.cfg.tools else {
            self.state = State::Answer;
            return true;
        };
        if self.cfg.stream_arguments
            && matches!(format, ToolFormat::Hermes | ToolFormat::Llama3Json)
        {
            if self.streaming.is_none() {
                match call_head(format, &self.buf) {
                    Head::Short if !last => return false,
                    // Not the shape the grammar writes: read it whole.
                    Head::Short | Head::No => {}
                    Head::Args { name, at } => {
                        let index = self.calls;
                        self.calls += 1;
                        out.push(Delta::CallStart {
                            index,
                            id: new_call_id(),
                            name,
                        });
                        self.streaming = Some(Streaming {
                            index,
                            start: at,
                            sent: 0,
                        });
                    }
                }
            }
            if let Some(s) = self.streaming {
                return self.step_streaming(format, s, last, out);
            }
        }
        match read_calls(format, &self.buf, last) {
            Scan::Incomplete if !last => false,
            Scan::Incomplete | Scan::NotACall => {
                // Not a call after all: the trigger goes out as the model's
                // text, and what follows it is read as the answer again
                // (where a real call may still come).
                let skip = format
                    .triggers()
                    .iter()
                    .find(|t| self.buf.starts_with(t.text))
                    .map_or(self.buf.len(), |t| t.text.len());
                let text: String = self.buf.drain(..skip).collect();
                self.at_start = false;
                self.trim_start = false;
                push_content(out, &text);
                self.state = State::Answer;
                true
            }
            Scan::Calls {
                calls,
                consumed,
                response,
            } => {
                self.buf.drain(..consumed);
                for (name, arguments) in calls {
                    if !self.cfg.parallel && self.calls >= 1 {
                        continue;
                    }
                    out.push(Delta::Call {
                        index: self.calls,
                        call: ToolCall {
                            id: new_call_id(),
                            name,
                            arguments,
                        },
                    });
                    self.calls += 1;
                }
                if let Some(text) = response {
                    self.emit_answer(out, &text);
                }
                self.state = State::Answer;
                // What follows a call is no longer the answer's start.
                if self.calls > 0 {
                    self.at_start = false;
                    self.trim_start = true;
                }
                true
            }
        }
    }
}

impl OutputParser {
    /// Gives out what has come of a streaming call's arguments; at their
    /// end, consumes the rest of the call.
    fn step_streaming(
        &mut self,
        format: ToolFormat,
        mut s: Streaming,
        last: bool,
        out: &mut Vec<Delta>,
    ) -> bool {
        let value = &self.buf[s.start..];
        let end = json_value_end(value);
        let upto = end.unwrap_or(value.len());
        if upto > s.sent {
            out.push(Delta::CallArguments {
                index: s.index,
                text: value[s.sent..upto].to_owned(),
            });
            s.sent = upto;
        }
        let Some(end) = end else {
            if last {
                // Cut off inside the arguments (`max_tokens`): the call
                // ends with what came, as the non-streamed message does.
                self.buf.clear();
                self.streaming = None;
                self.state = State::Answer;
            } else {
                self.streaming = Some(s);
            }
            return false;
        };
        let after = s.start + end;
        match call_tail(format, &self.buf[after..], last) {
            None => {
                self.streaming = Some(s);
                false
            }
            Some((consumed, more)) => {
                self.buf.drain(..after + consumed);
                self.streaming = None;
                if !more {
                    self.state = State::Answer;
                }
                self.at_start = false;
                self.trim_start = true;
                true
            }
        }
    }
}

/// How far a streaming call's opening has come.
enum Head {
    /// `buf` may still become a call's opening.
    Short,
    /// Not the opening the grammar writes.
    No,
    /// The call's name, and where its arguments' object starts.
    Args { name: String, at: usize },
}

/// Reads `<tool_call>{"name": "…", "arguments": ` (Hermes) or
/// `[<|python_tag|>]{"name": "…", "parameters": ` (Llama 3), with any
/// whitespace between JSON tokens, up to the arguments' `{`.
fn call_head(format: ToolFormat, buf: &str) -> Head {
    let mut c = Cursor {
        s: buf,
        pos: 0,
        last_string: None,
    };
    let key = match format {
        ToolFormat::Hermes => {
            match c.lit(HERMES_OPEN) {
                Step::Ok => {}
                Step::Short => return Head::Short,
                Step::No => return Head::No,
            }
            "\"arguments\""
        }
        _ => {
            if c.lit(PYTHON_TAG) == Step::Short {
                return Head::Short;
            }
            "\"parameters\""
        }
    };
    // `{ "name" : "…" , <key> :`, whitespace anywhere between.
    let shape = [
        Some("{"),
        Some("\"name\""),
        Some(":"),
        None,
        Some(","),
        Some(key),
        Some(":"),
    ];
    for expected in shape {
        c.ws();
        let step = match expected {
            Some(text) => c.lit(text),
            None => c.string(),
        };
        match step {
            Step::Ok => {}
            Step::Short => return Head::Short,
            Step::No => return Head::No,
        }
    }
    let name = c.last_string.take();
    c.ws();
    match (c.rest().chars().next(), name) {
        (None, _) => Head::Short,
        (Some('{'), Some(name)) => Head::Args { name, at: c.pos },
        _ => Head::No,
    }
}

/// What follows a streaming call's arguments: the object's `}` and, for
/// Hermes, `</tool_call>`; for Llama 3, a `;` before another call. Returns
/// the bytes it takes and whether another call follows in the same block;
/// `None` while more text is needed.
fn call_tail(format: ToolFormat, after: &str, last: bool) -> Option<(usize, bool)> {
    let mut c = Cursor {
        s: after,
        pos: 0,
        last_string: None,
    };
    c.ws();
    let closers: &[&str] = match format {
        ToolFormat::Hermes => &["}", HERMES_CLOSE],
        _ => &["}"],
    };
    for closer in closers {
        c.ws();
        match c.lit(closer) {
            Step::Ok => {}
            Step::Short if !last => return None,
            // Cut short inside the closing: it goes with the call.
            Step::Short => return Some((after.len(), false)),
            // Not what the grammar writes: the call ends here and the rest
            // is the answer's.
            Step::No => return Some((c.pos, false)),
        }
    }
    if format == ToolFormat::Llama3Json {
        let lead = c.rest().len() - c.rest().trim_start().len();
        match c.rest()[lead..].chars().next() {
            Some(';') => return Some((c.pos + lead + 1, true)),
            None if !last => return None,
            _ => {}
        }
    }
    Some((c.pos, false))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Ok,
    /// The text ends before it could tell.
    Short,
    No,
}

/// A position in text being matched against a call's fixed shape.
struct Cursor<'a> {
    s: &'a str,
    pos: usize,
    last_string: Option<String>,
}

impl Cursor<'_> {
    fn rest(&self) -> &str {
        &self.s[self.pos..]
    }

    fn ws(&mut self) {
        let rest = self.rest();
        self.pos += rest.len() - rest.trim_start().len();
    }

    fn lit(&mut self, text: &str) -> Step {
        let rest = self.rest();
        if rest.starts_with(text) {
            self.pos += text.len();
            Step::Ok
        } else if text.starts_with(rest) {
            Step::Short
        } else {
            Step::No
        }
    }

    /// A JSON string, kept in `last_string`.
    fn string(&mut self) -> Step {
        let rest = self.rest();
        if !rest.starts_with('"') {
            return if rest.is_empty() { Step::Short } else { Step::No };
        }
        let mut escaped = false;
        for (i, b) in rest.bytes().enumerate().skip(1) {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => {
                    return match serde_json::from_str::<String>(&rest[..=i]) {
                        Ok(v) => {
                            self.last_string = Some(v);
                            self.pos += i + 1;
                            Step::Ok
                        }
                        Err(_) => Step::No,
                    };
                }
                _ => {}
            }
        }
        Step::Short
    }
}

/// A fresh call id: OpenAI's `call_` prefix and 24 random alphanumerics.
pub fn new_call_id() -> String {
    use rand::distr::{Alphanumeric, SampleString};
    format!("call_{}", Alphanumeric.sample_string(&mut rand::rng(), 24))
}

enum Scan {
    /// More text is needed.
    Incomplete,
    /// The text is not a call.
    NotACall,
    /// Calls (name, arguments) read from the first `consumed` bytes, and the
    /// generic envelope's answer when it held one.
    Calls {
        calls: Vec<(String, String)>,
        consumed: usize,
        response: Option<String>,
    },
}

/// Reads the calls at the start of `text` (which starts with a trigger).
fn read_calls(format: ToolFormat, text: &str, last: bool) -> Scan {
    match format {
        ToolFormat::Hermes => read_hermes(text, last),
        ToolFormat::Mistral => read_mistral(text),
        ToolFormat::Llama3Json => read_llama3(text, last),
        ToolFormat::Generic => read_generic(text, last),
    }
}

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";

fn read_hermes(text: &str, last: bool) -> Scan {
    let Some(body) = text.strip_prefix(HERMES_OPEN) else {
        return Scan::NotACall;
    };
    let (body, consumed) = match body.find(HERMES_CLOSE) {
        Some(end) => (&body[..end], HERMES_OPEN.len() + end + HERMES_CLOSE.len()),
        // Some fine-tunes end the output without the closing tag.
        None if last => (body, text.len()),
        None => return Scan::Incomplete,
    };
    match serde_json::from_str::<Value>(body.trim())
        .ok()
        .and_then(|v| call_of(&v, &["arguments", "parameters"]))
    {
        Some(call) => Scan::Calls {
            calls: vec![call],
            consumed,
            response: None,
        },
        None => Scan::NotACall,
    }
}

const MISTRAL_OPEN: &str = "[TOOL_CALLS]";
const MISTRAL_ARGS: &str = "[ARGS]";

fn read_mistral(text: &str) -> Scan {
    let Some(body) = text.strip_prefix(MISTRAL_OPEN) else {
        return Scan::NotACall;
    };
    let lead = body.len() - body.trim_start().len();
    let rest = &body[lead..];
    let start = MISTRAL_OPEN.len() + lead;
    if rest.is_empty() {
        return Scan::Incomplete;
    }
    if rest.starts_with('[') || rest.starts_with('{') {
        let Some(end) = json_value_end(rest) else {
            return Scan::Incomplete;
        };
        let Ok(value) = serde_json::from_str::<Value>(&rest[..end]) else {
            return Scan::NotACall;
        };
        let items = match &value {
            Value::Array(items) => items.iter().collect(),
            single => vec![single],
        };
        let calls: Option<Vec<_>> = items
            .into_iter()
            .map(|v| call_of(v, &["arguments", "parameters"]))
            .collect();
        return match calls {
            Some(calls) if !calls.is_empty() => Scan::Calls {
                calls,
                consumed: start + end,
                response: None,
            },
            _ => Scan::NotACall,
        };
    }
    // The newer form: `NAME[ARGS]{...}`, where a name is a short
    // identifier; anything else is not this form.
    let Some(at) = rest.find(MISTRAL_ARGS) else {
        let held = partial_suffix(rest, &[MISTRAL_ARGS]);
        let head = &rest[..rest.len() - held];
        return if head.len() <= MAX_NAME_LEN && head.chars().all(is_name_char) {
            Scan::Incomplete
        } else {
            Scan::NotACall
        };
    };
    let name = &rest[..at];
    if name.is_empty() || name.len() > MAX_NAME_LEN || !name.chars().all(is_name_char) {
        return Scan::NotACall;
    }
    let args = &rest[at + MISTRAL_ARGS.len()..];
    let args_lead = args.len() - args.trim_start().len();
    let Some(end) = json_value_end(&args[args_lead..]) else {
        return Scan::Incomplete;
    };
    let json = &args[args_lead..args_lead + end];
    match serde_json::from_str::<Value>(json) {
        Ok(v @ Value::Object(_)) if !name.is_empty() => Scan::Calls {
            calls: vec![(name.to_owned(), compact(&v))],
            consumed: start + at + MISTRAL_ARGS.len() + args_lead + end,
            response: None,
        },
        _ => Scan::NotACall,
    }
}

/// The longest function name OpenAI allows.
const MAX_NAME_LEN: usize = 64;

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.'
}

const PYTHON_TAG: &str = "<|python_tag|>";

fn read_llama3(text: &str, last: bool) -> Scan {
    let mut calls = Vec::new();
    let mut pos = text
        .strip_prefix(PYTHON_TAG)
        .map_or(0, |_| PYTHON_TAG.len());
    loop {
        let rest = &text[pos..];
        let lead = rest.len() - rest.trim_start().len();
        let rest = &rest[lead..];
        if rest.is_empty() && (!last || calls.is_empty()) {
            return Scan::Incomplete;
        }
        if !rest.starts_with('{') {
            return if calls.is_empty() {
                Scan::NotACall
            } else {
                // A trailing `;` with nothing after it.
                Scan::Calls {
                    calls,
                    consumed: pos,
                    response: None,
                }
            };
        }
        let Some(end) = json_value_end(rest) else {
            return Scan::Incomplete;
        };
        let Some(call) = serde_json::from_str::<Value>(&rest[..end])
            .ok()
            .and_then(|v| call_of(&v, &["parameters", "arguments"]))
        else {
            return Scan::NotACall;
        };
        calls.push(call);
        pos += lead + end;
        // Several calls are separated by `;`.
        let after = &text[pos..];
        let gap = after.len() - after.trim_start().len();
        if after[gap..].starts_with(';') {
            pos += gap + 1;
            continue;
        }
        if after[gap..].is_empty() && !last {
            // A `;` and another call may still come.
            return Scan::Incomplete;
        }
        return Scan::Calls {
            calls,
            consumed: pos,
            response: None,
        };
    }
}

fn read_generic(text: &str, last: bool) -> Scan {
    // Small models often fence their JSON in Markdown.
    let (json_start, fenced) = if let Some(fence) = text.strip_prefix("```") {
        let Some(newline) = fence.find('\n') else {
            return Scan::Incomplete;
        };
        let lang = fence[..newline].trim();
        if !(lang.is_empty() || lang.eq_ignore_ascii_case("json")) {
            return Scan::NotACall;
        }
        (3 + newline + 1, true)
    } else {
        (0, false)
    };
    let body = &text[json_start..];
    let lead = body.len() - body.trim_start().len();
    let body = &body[lead..];
    if body.is_empty() {
        return Scan::Incomplete;
    }
    if !body.starts_with('{') {
        return Scan::NotACall;
    }
    let Some(end) = json_value_end(body) else {
        return Scan::Incomplete;
    };
    let mut consumed = json_start + lead + end;
    if fenced {
        let after = &text[consumed..];
        let trimmed = after.trim_start();
        if trimmed.starts_with("```") {
            consumed += after.len() - trimmed.len() + 3;
        } else if !last && (trimmed.is_empty() || "```".starts_with(trimmed)) {
            // The closing fence may still come.
            return Scan::Incomplete;
        }
    }
    let Ok(Value::Object(envelope)) = serde_json::from_str::<Value>(&body[..end]) else {
        return Scan::NotACall;
    };
    let calls: Option<Vec<_>> = match (envelope.get("tool_calls"), envelope.get("tool_call")) {
        (Some(Value::Array(items)), _) => items
            .iter()
            .map(|v| call_of(v, &["arguments", "parameters"]))
            .collect(),
        (None, Some(one)) => call_of(one, &["arguments", "parameters"]).map(|c| vec![c]),
        _ => None,
    };
    if let Some(calls) = calls.filter(|c| !c.is_empty()) {
        return Scan::Calls {
            calls,
            consumed,
            response: None,
        };
    }
    match envelope.get("response") {
        Some(Value::String(answer)) => Scan::Calls {
            calls: Vec::new(),
            consumed,
            response: Some(answer.clone()),
        },
        _ => Scan::NotACall,
    }
}

/// `{"name": ..., "<args>": {...}}` → (name, arguments as compact JSON).
/// Arguments given as a string holding a JSON object are accepted; missing
/// arguments are `{}`.
fn call_of(value: &Value, args_keys: &[&str]) -> Option<(String, String)> {
    let obj = value.as_object()?;
    // Some models wrap the call: `{"function": {"name": ..., ...}}`.
    if let (None, Some(inner @ Value::Object(_))) = (obj.get("name"), obj.get("function")) {
        return call_of(inner, args_keys);
    }
    let name = obj.get("name")?.as_str()?.trim();
    if name.is_empty() {
        return None;
    }
    let args = args_keys.iter().find_map(|k| obj.get(*k));
    let arguments = match args {
        None | Some(Value::Null) => "{}".to_owned(),
        Some(v @ Value::Object(_)) => compact(v),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(v @ Value::Object(_)) => compact(&v),
            _ => return None,
        },
        Some(_) => return None,
    };
    Some((name.to_owned(), arguments))
}

fn compact(v: &Value) -> String {
    // Serializing a parsed value cannot fail.
    serde_json::to_string(v).unwrap_or_else(|_| "{}".to_owned())
}

/// The byte just past the JSON object or array `s` starts with, once it is
/// complete (brackets balanced outside strings); `None` while it is not.
pub fn json_value_end(s: &str) -> Option<usize> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for (i, b) in s.bytes().enumerate() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
            _ => {}
        }
    }
    None
}

/// The length of the longest suffix of `text` that is a proper prefix of
/// one of `markers`: text to hold back until the next piece decides.
fn partial_suffix(text: &str, markers: &[&str]) -> usize {
    let mut best = 0;
    for m in markers {
        for n in (1..m.len().min(text.len() + 1)).rev() {
            if n <= best {
                break;
            }
            if text.is_char_boundary(text.len() - n) && m.starts_with(&text[text.len() - n..]) {
                best = n;
                break;
            }
        }
    }
    best
}

fn content(text: &str) -> Vec<Delta> {
    if text.is_empty() {
        Vec::new()
    } else {
        vec![Delta::Content(text.to_owned())]
    }
}

fn push_content(out: &mut Vec<Delta>, text: &str) {
    if !text.is_empty() {
        out.push(Delta::Content(text.to_owned()));
    }
}

fn push_reasoning(out: &mut Vec<Delta>, text: &str) {
    if !text.is_empty() {
        out.push(Delta::Reasoning(text.to_owned()));
    }
}

/// Joins neighbouring deltas of the same kind.
fn merge(deltas: Vec<Delta>) -> Vec<Delta> {
    let mut out: Vec<Delta> = Vec::with_capacity(deltas.len());
    for d in deltas {
        match (out.last_mut(), d) {
            (Some(Delta::Content(a)), Delta::Content(b)) => a.push_str(&b),
            (Some(Delta::Reasoning(a)), Delta::Reasoning(b)) => a.push_str(&b),
            (
                Some(Delta::CallArguments { index: i, text: a }),
                Delta::CallArguments { index: j, text: b },
            ) if *i == j => a.push_str(&b),
            (_, d) => out.push(d),
        }
    }
    out
}

/// A token's text as the parser must see it: a special marker the
/// detokenizer left out is put back after whatever text the token released.
pub fn with_marker(markers: &[(u32, String)], id: u32, text: String) -> String {
    match markers.iter().find(|(m, _)| *m == id) {
        Some((_, marker)) => text + marker,
        None => text,
    }
}

/// A whole choice's output: what a non-streamed response holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parsed {
    pub reasoning: String,
    pub content: String,
    pub calls: Vec<ToolCall>,
}

impl Parsed {
    /// Folds deltas, in order.
    pub fn fold(deltas: impl IntoIterator<Item = Delta>) -> Parsed {
        let mut p = Parsed::default();
        for d in deltas {
            match d {
                Delta::Reasoning(t) => p.reasoning.push_str(&t),
                Delta::Content(t) => p.content.push_str(&t),
                Delta::Call { call, .. } => p.calls.push(call),
                Delta::CallStart { id, name, .. } => p.calls.push(ToolCall {
                    id,
                    name,
                    arguments: String::new(),
                }),
                Delta::CallArguments { index, text } => {
                    if let Some(call) = p.calls.get_mut(index) {
                        call.arguments.push_str(&text);
                    }
                }
            }
        }
        p
    }

    /// Parses a whole output from its tokens: each token's id and the text
    /// it completed, with the text of special `markers` the detokenizer
    /// left out put back ([`with_marker`]).
    pub fn from_tokens(
        cfg: ParserConfig,
        markers: &[(u32, String)],
        pieces: &[(u32, String)],
    ) -> Parsed {
        let mut parser = OutputParser::new(cfg);
        let mut deltas = Vec::new();
        for (id, text) in pieces {
            deltas.extend(parser.push(&with_marker(markers, *id, text.clone())));
        }
        deltas.extend(parser.finish());
        Parsed::fold(deltas)
    }

    /// Parses a whole output at once.
    pub fn parse(cfg: ParserConfig, text: &str) -> Parsed {
        let mut parser = OutputParser::new(cfg);
        let mut deltas = parser.push(text);
        deltas.extend(parser.finish());
        Parsed::fold(deltas)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(tools: Option<ToolFormat>, reasoning: bool) -> ParserConfig {
        ParserConfig {
            tools,
            reasoning,
            starts_in_reasoning: false,
            parallel: true,
            stream_arguments: false,
        }
    }

    /// Ids are random: compare everything else.
    fn shape(p: &Parsed) -> (String, String, Vec<(String, String)>) {
        (
            p.reasoning.clone(),
            p.content.clone(),
            p.calls
                .iter()
                .map(|c| (c.name.clone(), c.arguments.clone()))
                .collect(),
        )
    }

    /// Splits `text` at every char boundary into two pieces, and into
    /// one-character pieces, and checks each stream folds to the whole.
    fn check_streams(c: &ParserConfig, text: &str) -> Parsed {
        let whole = Parsed::parse(c.clone(), text);
        let bounds: Vec<usize> = (0..=text.len())
            .filter(|&i| text.is_char_boundary(i))
            .collect();
        for &at in &bounds {
            let mut p = OutputParser::new(c.clone());
            let mut d = p.push(&text[..at]);
            d.extend(p.push(&text[at..]));
            d.extend(p.finish());
            assert_eq!(
                shape(&Parsed::fold(d)),
                shape(&whole),
                "split at {at} of {text:?}"
            );
        }
        let mut p = OutputParser::new(c.clone());
        let mut d = Vec::new();
        for w in bounds.windows(2) {
            d.extend(p.push(&text[w[0]..w[1]]));
        }
        d.extend(p.finish());
        assert_eq!(shape(&Parsed::fold(d)), shape(&whole), "chars of {text:?}");
        whole
    }

    fn call(name: &str, args: &str) -> (String, String) {
        (name.to_owned(), args.to_owned())
    }

    /// Where a grammar enforces the calls, a call's name goes out as soon
    /// as it is known and its arguments as they come, as their own text;
    /// every split of the stream folds to the same message.
    #[test]
    fn enforced_calls_stream_their_arguments_as_they_come() {
        let mut c = cfg(Some(ToolFormat::Hermes), true);
        c.stream_arguments = true;
        let text = "<think>\nCheck.\n</think>\n\nLet me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Pa}ris\", \"n\": [1, {\"a\": 2}]}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>";
        let p = check_streams(&c, text);
        assert_eq!(p.reasoning, "Check.");
        assert_eq!(p.content, "Let me check.\n");
        assert_eq!(
            shape(&p).2,
            vec![
                call("get_weather", r#"{"city": "Pa}ris", "n": [1, {"a": 2}]}"#),
                call("get_time", "{}")
            ]
        );
        // Mid-arguments, the call has started and part of them is out.
        let cut = text.find("ris").expect("in text");
        let mut parser = OutputParser::new(c.clone());
        let d = parser.push(&text[..cut]);
        assert!(
            d.iter().any(|d| matches!(d, Delta::CallStart { index: 0, name, .. } if name == "get_weather")),
            "{d:?}"
        );
        assert!(
            d.contains(&Delta::CallArguments {
                index: 0,
                text: r#"{"city": "Pa}"#.into()
            }),
            "{d:?}"
        );

        let mut c = cfg(Some(ToolFormat::Llama3Json), false);
        c.stream_arguments = true;
        for text in [
            "{\"name\": \"a\", \"parameters\": {\"x\": 1}}; {\"name\": \"b\", \"parameters\": {}}",
            "<|python_tag|>{\"name\": \"a\", \"parameters\": {\"x\": 1}}; {\"name\": \"b\", \"parameters\": {}}",
        ] {
            let p = check_streams(&c, text);
            assert_eq!(p.content, "", "{text}");
            assert_eq!(
                shape(&p).2,
                vec![call("a", r#"{"x": 1}"#), call("b", "{}")],
                "{text}"
            );
        }
        // Cut off by `max_tokens` inside the arguments: the call holds what
        // came, streamed or not.
        let p = check_streams(&c, "{\"name\": \"a\", \"parameters\": {\"x\": ");
        assert_eq!(shape(&p).2, vec![call("a", r#"{"x": "#)]);
        // Text that is not a call stays text.
        let p = check_streams(&c, "Sunny.");
        assert_eq!((p.content.as_str(), p.calls.len()), ("Sunny.", 0));
    }

    #[test]
    fn hermes_calls_parse_with_text_before_them() {
        let c = cfg(Some(ToolFormat::Hermes), false);
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>";
        let p = check_streams(&c, text);
        assert_eq!(p.content, "Let me check.\n");
        assert_eq!(
            shape(&p).2,
            vec![
                call("get_weather", r#"{"city":"Paris"}"#),
                call("get_time", "{}")
            ]
        );
        assert!(p
            .calls
            .iter()
            .all(|c| c.id.starts_with("call_") && c.id.len() == 29));
    }

    #[test]
    fn parallel_false_keeps_the_first_call() {
        let mut c = cfg(Some(ToolFormat::Hermes), false);
        c.parallel = false;
        let text = "<tool_call>{\"name\": \"a\", \"arguments\": {}}</tool_call><tool_call>{\"name\": \"b\", \"arguments\": {}}</tool_call>";
        let p = check_streams(&c, text);
        assert_eq!(shape(&p).2, vec![call("a", "{}")]);
    }

    #[test]
    fn a_malformed_call_is_content_not_dropped() {
        let c = cfg(Some(ToolFormat::Hermes), false);
        for text in [
            "<tool_call>{\"name\": \"a\", \"arguments\": {oops}}</tool_call>",
            "<tool_call>{\"name\": \"a\"",
            "say <tool_ca",
        ] {
            let p = check_streams(&c, text);
            assert!(p.calls.is_empty(), "{text}");
            assert_eq!(p.content, text);
        }
    }

    #[test]
    fn a_missing_closing_tag_at_the_end_still_parses() {
        let c = cfg(Some(ToolFormat::Hermes), false);
        let p = check_streams(
            &c,
            "<tool_call>\n{\"name\": \"a\", \"arguments\": {\"x\": 1}}\n",
        );
        assert_eq!(shape(&p).2, vec![call("a", r#"{"x":1}"#)]);
    }

    #[test]
    fn llama3_calls_parse_bare_and_after_the_python_tag() {
        let c = cfg(Some(ToolFormat::Llama3Json), false);
        let p = check_streams(
            &c,
            "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}",
        );
        assert_eq!(
            shape(&p).2,
            vec![call("get_weather", r#"{"city":"Paris"}"#)]
        );
        assert_eq!(p.content, "");
        let p = check_streams(
            &c,
            "<|python_tag|>{\"name\": \"a\", \"parameters\": {}}; {\"name\": \"b\", \"parameters\": {\"k\": \"v\"}}",
        );
        assert_eq!(
            shape(&p).2,
            vec![call("a", "{}"), call("b", r#"{"k":"v"}"#)]
        );
        // A JSON answer that is not a call is the answer.
        let p = check_streams(&c, "{\"answer\": 42}");
        assert!(p.calls.is_empty());
        assert_eq!(p.content, "{\"answer\": 42}");
        // Braces after text are not a call.
        let p = check_streams(&c, "Use {\"name\": \"a\", \"parameters\": {}}");
        assert!(p.calls.is_empty());
    }

    #[test]
    fn mistral_calls_parse_in_both_forms() {
        let c = cfg(Some(ToolFormat::Mistral), false);
        let p = check_streams(
            &c,
            "[TOOL_CALLS] [{\"name\": \"a\", \"arguments\": {\"x\": [1, 2]}}, {\"name\": \"b\", \"arguments\": {}}]",
        );
        assert_eq!(
            shape(&p).2,
            vec![call("a", r#"{"x":[1,2]}"#), call("b", "{}")]
        );
        let p = check_streams(&c, "[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Paris\"}");
        assert_eq!(
            shape(&p).2,
            vec![call("get_weather", r#"{"city":"Paris"}"#)]
        );
        let p = check_streams(&c, "Sure. [TOOL_CALLS] not json at all, sorry");
        assert!(p.calls.is_empty());
        assert_eq!(p.content, "Sure. [TOOL_CALLS] not json at all, sorry");
    }

    #[test]
    fn the_generic_envelope_gives_calls_or_an_answer() {
        let c = cfg(Some(ToolFormat::Generic), false);
        let p = check_streams(
            &c,
            "{\"tool_calls\": [{\"name\": \"a\", \"arguments\": {\"q\": \"x}\"}}]}",
        );
        assert_eq!(shape(&p).2, vec![call("a", r#"{"q":"x}"}"#)]);
        let p = check_streams(
            &c,
            "```json\n{\"tool_call\": {\"name\": \"a\", \"arguments\": {}}}\n```",
        );
        assert_eq!(shape(&p).2, vec![call("a", "{}")]);
        assert_eq!(p.content, "");
        let p = check_streams(&c, "{\"response\": \"Hello there\"}");
        assert!(p.calls.is_empty());
        assert_eq!(p.content, "Hello there");
        // A model that ignores the instructions still answers.
        let p = check_streams(&c, "Hello! How can I help?");
        assert_eq!(p.content, "Hello! How can I help?");
        let p = check_streams(&c, "{\"something\": \"else\"} trailing");
        assert_eq!(p.content, "{\"something\": \"else\"} trailing");
    }

    #[test]
    fn thinking_goes_to_reasoning() {
        let c = cfg(None, true);
        let p = check_streams(&c, "<think>\nLet me think.\n</think>\n\nThe answer is 4.");
        assert_eq!(p.reasoning, "Let me think.");
        assert_eq!(p.content, "The answer is 4.");
        // The template opened the tag: only the closing one comes.
        let mut c2 = c.clone();
        c2.starts_in_reasoning = true;
        let p = check_streams(&c2, "Hmm, 2+2.\n</think>\n\n4");
        assert_eq!(
            (p.reasoning.as_str(), p.content.as_str()),
            ("Hmm, 2+2.", "4")
        );
        // Unfinished thinking is all reasoning.
        let p = check_streams(&c2, "still thinking <");
        assert_eq!(
            (p.reasoning.as_str(), p.content.as_str()),
            ("still thinking <", "")
        );
        // No tags: all content.
        let p = check_streams(&c, "Just an answer with </thi in it");
        assert_eq!(p.content, "Just an answer with </thi in it");
        assert_eq!(p.reasoning, "");
    }

    #[test]
    fn calls_after_and_inside_thinking_parse() {
        let c = cfg(Some(ToolFormat::Hermes), true);
        let p = check_streams(
            &c,
            "<think>I need the weather.</think>\n\n<tool_call>\n{\"name\": \"w\", \"arguments\": {}}\n</tool_call>",
        );
        assert_eq!(p.reasoning, "I need the weather.");
        assert_eq!(p.content, "");
        assert_eq!(shape(&p).2, vec![call("w", "{}")]);
        let g = cfg(Some(ToolFormat::Generic), true);
        let p = check_streams(
            &g,
            "<think>ok</think>{\"tool_calls\": [{\"name\": \"w\", \"arguments\": {\"a\": 1}}]}",
        );
        assert_eq!(p.reasoning, "ok");
        assert_eq!(shape(&p).2, vec![call("w", r#"{"a":1}"#)]);
    }

    #[test]
    fn passthrough_changes_nothing() {
        let c = cfg(None, false);
        let p = check_streams(&c, "<think>x</think> <tool_call>{}</tool_call>");
        assert_eq!(p.content, "<think>x</think> <tool_call>{}</tool_call>");
    }

    #[test]
    fn json_ends_are_found_outside_strings() {
        assert_eq!(json_value_end(r#"{"a": "}"} x"#), Some(10));
        assert_eq!(json_value_end(r#"[{"a": "\"]"}]"#), Some(14));
        assert_eq!(json_value_end(r#"{"a": {"#), None);
        assert_eq!(json_value_end("}"), None);
    }
}
