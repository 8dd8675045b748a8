//! `taper chat`: an interactive conversation in the terminal.
//!
//! The conversation is re-rendered with the chat template every turn; the
//! sequence's KV cache keeps the tokens of earlier turns, so only the new
//! message is computed. With stdin not a terminal, each input line is a
//! message and the replies go to stdout, for scripts.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use rustyline::error::ReadlineError;

use taper::chat_template::Message;
use taper::engine::{Engine, EngineLimits, Request};
use taper::pipeline::Pipeline;
use taper::stopping::FinishReason;

use super::{ModelArgs, SamplingArgs};

/// Flags of `taper chat`.
#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,

    #[command(flatten)]
    sampling: SamplingArgs,

    /// A system message to start the conversation with.
    #[arg(long)]
    system: Option<String>,
}

const HELP: &str = "\
commands:
  /help            this text
  /reset           forget the conversation (keeps the system message)
  /system TEXT     set the system message and reset
  /save FILE       save the conversation as JSON
  /load FILE       load a conversation saved with /save
  /exit            leave (or Ctrl-D)
a line ending in \\ continues on the next line; \"\"\" starts and ends a block.
Ctrl-C stops the reply being written.";

struct Chat<'p> {
    pipeline: &'p Arc<Pipeline>,
    sampling: SamplingArgs,
    system: Option<String>,
    messages: Vec<Message>,
    /// One engine for the whole session: its prefix cache keeps the last
    /// reply's KV, so the next turn computes only what is new.
    engine: Engine,
    cancel: Arc<AtomicBool>,
}

pub fn run(args: ChatArgs) -> anyhow::Result<()> {
    let pipeline = Arc::new(args.model.load()?);
    if pipeline.template.is_none() {
        anyhow::bail!(
            "{} has no chat template in tokenizer_config.json: pass one with --chat-template FILE, or use `taper generate` for raw prompts",
            args.model.model
        );
    }
    // Check the flags once, before the first message.
    args.sampling.params(&pipeline)?;
    let cancel = Arc::new(AtomicBool::new(false));
    super::cancel_on_ctrl_c(cancel.clone())?;
    let engine = Engine::new(
        Arc::clone(&pipeline),
        EngineLimits {
            max_batch: 1,
            ..EngineLimits::default()
        },
        Arc::default(),
    );
    let mut chat = Chat {
        engine,
        pipeline: &pipeline,
        sampling: args.sampling,
        system: args.system,
        messages: Vec::new(),
        cancel,
    };
    chat.reset();
    if std::io::stdin().is_terminal() {
        chat.interactive()
    } else {
        chat.piped()
    }
}

/// What one line of input asks for.
enum Input {
    Message(String),
    Command(String, String),
}

fn classify(line: &str) -> Option<Input> {
    let trimmed = line.trim();
    if trimmed.is_empty() {
        return None;
    }
    if let Some(rest) = trimmed.strip_prefix('/') {
        let (cmd, arg) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        return Some(Input::Command(
            cmd.to_ascii_lowercase(),
            arg.trim().to_owned(),
        ));
    }
    Some(Input::Message(line.to_owned()))
}

impl Chat<'_> {
    fn reset(&mut self) {
        self.messages.clear();
        if let Some(s) = &self.system {
            self.messages.push(Message::new("system", s));
        }
    }

    fn interactive(&mut self) -> anyhow::Result<()> {
        let mut editor = rustyline::DefaultEditor::new()?;
        let history = history_path();
        if let Some(h) = &history {
            let _ = editor.load_history(h);
        }
        eprintln!(
            "chatting with {} — /help for commands, Ctrl-D to leave",
            self.pipeline.model.config().architecture.class_name()
        );
        loop {
            let line = match read_message(&mut editor) {
                Ok(Some(line)) => line,
                Ok(None) => break,
                Err(e) => return Err(e),
            };
            let _ = editor.add_history_entry(line.as_str());
            if let Some(h) = &history {
                let _ = editor.save_history(h);
            }
            if !self.handle(&line)? {
                break;
            }
        }
        Ok(())
    }

    fn piped(&mut self) -> anyhow::Result<()> {
        for line in std::io::stdin().lock().lines() {
            let line = line.context("reading stdin")?;
            if !self.handle(&line)? {
                break;
            }
        }
        Ok(())
    }

    /// Runs one input; returns false to leave.
    fn handle(&mut self, line: &str) -> anyhow::Result<bool> {
        match classify(line) {
            None => {}
            Some(Input::Message(text)) => {
                self.messages.push(Message::new("user", &text));
                match self.reply() {
                    // Nobody reads the replies any more (`| head`): leave.
                    Ok(Replied::StdoutClosed) => return Ok(false),
                    Ok(Replied::Yes) => {}
                    Err(e) => {
                        // The message stays out of the conversation so the
                        // user can rephrase; the session goes on.
                        self.messages.pop();
                        eprintln!("error: {e:#}");
                    }
                }
            }
            Some(Input::Command(cmd, arg)) => match cmd.as_str() {
                "exit" | "quit" | "bye" => return Ok(false),
                "help" | "?" => eprintln!("{HELP}"),
                "reset" | "clear" => {
                    self.reset();
                    eprintln!("(conversation reset)");
                }
                "system" => {
                    self.system = (!arg.is_empty()).then_some(arg);
                    self.reset();
                    eprintln!("(system message set; conversation reset)");
                }
                "save" if !arg.is_empty() => match save(Path::new(&arg), &self.messages) {
                    Ok(()) => eprintln!("(saved {} messages to {arg})", self.messages.len()),
                    Err(e) => eprintln!("error: {e:#}"),
                },
                "load" if !arg.is_empty() => match load(Path::new(&arg)) {
                    Ok(messages) => {
                        eprintln!("(loaded {} messages from {arg})", messages.len());
                        self.system = messages
                            .iter()
                            .find(|m| m.role == "system")
                            .map(|m| m.content.clone());
                        self.messages = messages;
                    }
                    Err(e) => eprintln!("error: {e:#}"),
                },
                "save" | "load" => eprintln!("usage: /{cmd} FILE"),
                other => eprintln!("unknown command /{other}; /help lists them"),
            },
        }
        Ok(true)
    }

    /// Generates the assistant's reply to the conversation so far.
    fn reply(&mut self) -> anyhow::Result<Replied> {
        let p = self.pipeline;
        // An explicit --max-tokens must fit whole (`check_fits` refuses it
        // otherwise); the default shrinks to the room left, so it needs less.
        let reserve = self
            .sampling
            .max_tokens
            .unwrap_or(512.min(p.context_len() / 2));
        let prompt = loop {
            let prompt = p.chat_prompt(&self.messages, true)?;
            if prompt.len() + reserve <= p.context_len() {
                break prompt;
            }
            // Drop the oldest exchange after the system message.
            let first = usize::from(self.messages.first().is_some_and(|m| m.role == "system"));
            if self.messages.len() - first <= 1 {
                anyhow::bail!(
                    "the message is {} tokens; with {reserve} reserved for the reply it does not fit the context of {} tokens",
                    prompt.len(),
                    p.context_len()
                );
            }
            let removed = if self.messages.len() - first >= 3 {
                2
            } else {
                1
            };
            self.messages.drain(first..first + removed);
            eprintln!("(the conversation outgrew the context: dropped the oldest turn)");
        };
        let request = Request {
            sampling: self.sampling.params(p)?,
            stop: self.sampling.stop_conditions(p, prompt.len()),
            prompt,
            logprobs: None,
            prompt_logprobs: false,
            constraint: None,
        };
        p.check_fits(request.prompt.len(), request.stop.max_new_tokens)?;
        self.cancel.store(false, Ordering::SeqCst);
        let outcome = super::Outcome::default();
        let sink = super::stdout_sink(self.cancel.clone(), outcome.clone());
        let ran = self.engine.run_one(request, sink);
        self.cancel.store(false, Ordering::SeqCst);
        ran?;
        let gen = outcome.take()?;
        if gen.stdout_closed {
            return Ok(Replied::StdoutClosed);
        }
        let mut stdout = std::io::stdout().lock();
        if writeln!(stdout).and_then(|_| stdout.flush()).is_err() {
            return Ok(Replied::StdoutClosed);
        }
        drop(stdout);
        if gen.finish == FinishReason::Cancelled {
            eprintln!("(stopped)");
        } else {
            let u = gen.usage;
            eprintln!(
                "[{} prompt tokens ({} new) at {:.1} t/s, {} tokens at {:.1} t/s]",
                u.prompt_tokens,
                u.prompt_tokens - u.cached_tokens,
                gen.prefill_tps(),
                u.completion_tokens,
                gen.decode_tps()
            );
        }
        self.messages
            .push(Message::new("assistant", gen.text.trim()));
        Ok(Replied::Yes)
    }
}

/// How a reply went, when it did not fail.
enum Replied {
    Yes,
    StdoutClosed,
}

/// Reads one message, joining continuation lines (`\` at the end) and
/// `"""` blocks. `Ok(None)` on Ctrl-D.
fn read_message(editor: &mut rustyline::DefaultEditor) -> anyhow::Result<Option<String>> {
    let mut text = String::new();
    let mut in_block = false;
    loop {
        let prompt = if text.is_empty() && !in_block {
            ">>> "
        } else {
            "... "
        };
        match editor.readline(prompt) {
            Ok(line) => {
                if line.trim() == "\"\"\"" {
                    if in_block {
                        return Ok(Some(text));
                    }
                    in_block = true;
                    continue;
                }
                if in_block {
                    text.push_str(&line);
                    text.push('\n');
                    continue;
                }
                if let Some(head) = line.strip_suffix('\\') {
                    text.push_str(head);
                    text.push('\n');
                    continue;
                }
                text.push_str(&line);
                return Ok(Some(text));
            }
            // Ctrl-C at the prompt drops the line being typed.
            Err(ReadlineError::Interrupted) => {
                text.clear();
                in_block = false;
            }
            Err(ReadlineError::Eof) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    }
}

fn history_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))?;
    let dir = base.join("taper");
    std::fs::create_dir_all(&dir).ok()?;
    Some(dir.join("chat_history.txt"))
}

fn save(path: &Path, messages: &[Message]) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(messages)?;
    std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))
}

fn load(path: &Path) -> anyhow::Result<Vec<Message>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not a saved conversation", path.display()))
}
