//! `POST /v1/completions`: raw prompts (text or token ids, one or several),
//! `echo`, and the legacy logprobs format; one `text_completion` or a stream
//! of them.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::engine::Event;

use super::error::AppError;
use super::generation;
use super::logprobs::CompletionLogprobsBuilder;
use super::request::CompletionRequest;
use super::response::{
    finish_reason, Completion, CompletionChoice, CompletionLogprobs, Meta, Usage,
};
use super::sse::{self, to_json, Chunker};
use super::state::AppState;
use super::validate::{self, ValidPrompt};

pub async fn handler(
    State(state): State<AppState>,
    req: CompletionRequest,
) -> Result<Response, AppError> {
    let ready = state.ready()?;
    let served = state.config().served_model_name.clone();
    let meta = Meta::new("cmpl", &served);
    let mut valid = {
        let ready = ready.clone();
        super::off_runtime(&state, move || validate::completion(req, &ready, &served)).await?
    };
    let receivers = generation::submit_all(&ready.engine, std::mem::take(&mut valid.requests))?;
    let choices = receivers.len();
    let prompt_tokens = valid.prompt_tokens();
    if valid.stream {
        let chunker = CompletionChunker {
            meta,
            builders: (0..choices).map(|_| Default::default()).collect(),
            prompts: valid.prompts,
            n: valid.n,
            echo: valid.echo,
            logprobs: valid.logprobs.is_some(),
            include_usage: valid.include_usage,
            prompt_tokens,
            completion_tokens: 0,
            choices,
            finished: 0,
        };
        return Ok(sse::respond(
            generation::merge(receivers),
            chunker,
            state.stop_signal(),
        ));
    }
    let outputs = generation::collect_all(receivers, state.stop_signal()).await?;
    let completion_tokens = outputs.iter().map(|o| o.usage.completion_tokens).sum();
    let choices = outputs
        .into_iter()
        .enumerate()
        .map(|(index, o)| {
            let prompt = valid.prompt_of(index);
            let logprobs = valid.logprobs.map(|_| {
                let mut b = CompletionLogprobsBuilder::default();
                if valid.echo {
                    b.push_prompt(
                        &prompt.token_texts,
                        o.prompt_logprobs.as_deref().unwrap_or(&[]),
                    );
                }
                for lp in &o.logprobs {
                    b.push_generated(lp);
                }
                b.take()
            });
            let text = if valid.echo {
                format!("{}{}", prompt.text, o.text)
            } else {
                o.text
            };
            CompletionChoice {
                index,
                text,
                logprobs,
                finish_reason: Some(finish_reason(o.finish)),
            }
        })
        .collect();
    let body = Completion {
        id: meta.id,
        object: "text_completion",
        created: meta.created,
        model: meta.model,
        choices,
        usage: Some(Usage::new(prompt_tokens, completion_tokens)),
    };
    Ok(Json(body).into_response())
}

/// Completions' stream chunks.
struct CompletionChunker {
    meta: Meta,
    prompts: Vec<ValidPrompt>,
    /// Per choice: logprobs since its last chunk, with running offsets.
    builders: Vec<CompletionLogprobsBuilder>,
    n: usize,
    echo: bool,
    logprobs: bool,
    include_usage: bool,
    prompt_tokens: usize,
    completion_tokens: usize,
    choices: usize,
    finished: usize,
}

impl CompletionChunker {
    fn chunk(&self, choices: Vec<CompletionChoice>, usage: Option<Usage>) -> String {
        to_json(&Completion {
            id: self.meta.id.clone(),
            object: "text_completion",
            created: self.meta.created,
            model: self.meta.model.clone(),
            choices,
            usage,
        })
    }

    fn text(
        &self,
        index: usize,
        text: String,
        logprobs: Option<CompletionLogprobs>,
        finish: Option<&'static str>,
    ) -> String {
        self.chunk(
            vec![CompletionChoice {
                index,
                text,
                logprobs,
                finish_reason: finish,
            }],
            None,
        )
    }

    fn prompt(&self, choice: usize) -> Option<&ValidPrompt> {
        self.prompts.get(choice / self.n.max(1))
    }
}

impl Chunker for CompletionChunker {
    fn start(&mut self) -> Vec<String> {
        // With logprobs the echo waits for the prompt's logprobs.
        if !self.echo || self.logprobs {
            return Vec::new();
        }
        (0..self.choices)
            .filter_map(|i| {
                let text = self.prompt(i)?.text.clone();
                Some(self.text(i, text, None, None))
            })
            .collect()
    }

    fn event(&mut self, choice: usize, event: Event) -> Result<Vec<String>, AppError> {
        Ok(match event {
            Event::PromptLogprobs(entries) => {
                if !self.echo {
                    return Ok(Vec::new());
                }
                let Some(prompt) = self.prompts.get(choice / self.n.max(1)) else {
                    return Ok(Vec::new());
                };
                let text = prompt.text.clone();
                let logprobs = self.builders.get_mut(choice).map(|b| {
                    b.push_prompt(&prompt.token_texts, &entries);
                    b.take()
                });
                vec![self.text(choice, text, logprobs, None)]
            }
            Event::Token { text, logprob, .. } => {
                if text.is_empty() && logprob.is_none() {
                    return Ok(Vec::new());
                }
                let logprobs = if self.logprobs {
                    self.builders.get_mut(choice).map(|b| {
                        if let Some(lp) = &logprob {
                            b.push_generated(lp);
                        }
                        b.take()
                    })
                } else {
                    None
                };
                vec![self.text(choice, text, logprobs, None)]
            }
            Event::Done { finish, usage, .. } => {
                self.finished += 1;
                self.completion_tokens += usage.completion_tokens;
                vec![self.text(choice, String::new(), None, Some(finish_reason(finish)))]
            }
            Event::Error(message) => return Err(AppError::internal(message)),
        })
    }

    fn finished(&self) -> bool {
        self.finished == self.choices
    }

    fn end(&mut self) -> Vec<String> {
        if !self.include_usage {
            return Vec::new();
        }
        let usage = Usage::new(self.prompt_tokens, self.completion_tokens);
        vec![self.chunk(Vec::new(), Some(usage))]
    }
}
