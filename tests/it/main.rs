//! keygate's integration tests: one binary, each module driving the real `keygate` binary.
//! `support` starts it (serve, or a one-shot command with stdin) next to an in-process
//! recording upstream.

#![allow(clippy::unwrap_used)]
// Tests wait on plain threads and set up their own processes' environments.
#![allow(clippy::disallowed_methods)]

mod support;

mod affinity;
mod cli_output;
mod dos;
mod forward_proxy;
mod h1;
mod hook_claude_code;
mod launcher;
mod placeholder;
mod proxy;
mod redact_cli;
mod redact_response;
