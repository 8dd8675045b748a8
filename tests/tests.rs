//! All integration tests, in one binary (`autotests = false`): topic modules
//! below, shared helpers in `common`.

mod bench;
mod chat_pty;
mod chat_template;
mod cli;
mod common;
mod gguf;
mod hub;
mod invariance;
mod parity;
mod quant;
mod server;
mod streaming;
mod structured;
mod tools;
