//! All integration tests, in one binary (`autotests = false`): topic modules
//! below, shared helpers in `common`.

mod common;
mod parity;
