//! Agent-tool hooks: keygate as a Claude Code PreToolUse / PostToolUse hook, and the command
//! that installs it.
//!
//! - `keygate hook claude-code pre-tool-use`: denies a tool call that carries a credential in
//!   its arguments, reads a file that holds credentials, or dumps the environment.
//! - `keygate hook claude-code post-tool-use`: replaces credentials in a tool's output with
//!   `[REDACTED:…]` before the model sees it.
//! - `keygate hook install claude-code [--project|--user]`: merges both into settings.json.
//!
//! Both hooks fail closed: input they cannot parse blocks the call (exit 2, reason on stderr,
//! which Claude Code shows to the model) rather than letting it through unchecked.

mod claude_code;
mod install;
mod rules;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Subcommand, ValueEnum};

/// `keygate hook …`.
#[derive(clap::Args, Debug)]
pub struct HookArgs {
    /// Which hook to run, or to install.
    #[command(subcommand)]
    pub command: HookCommand,
}

/// The hook commands.
#[derive(Subcommand, Debug)]
pub enum HookCommand {
    /// Run as a Claude Code hook: event JSON on stdin, decision JSON on stdout.
    ClaudeCode(ClaudeCodeArgs),
    /// Add keygate's hooks to an agent's settings, keeping everything already there.
    Install(InstallArgs),
}

/// `keygate hook claude-code EVENT`.
#[derive(clap::Args, Debug)]
pub struct ClaudeCodeArgs {
    /// The hook event Claude Code runs this for.
    pub event: Event,
    /// Also look for the value of this environment variable, labelled by its name. Repeatable.
    #[arg(long = "known-env", value_name = "VAR")]
    pub known_env: Vec<String>,
    /// Also look for the secrets this keygate config holds (each fetched once, as `serve` would).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// The Claude Code hook events keygate answers.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// Before a tool runs: refuse a command that would read a secret.
    PreToolUse,
    /// After a tool ran: redact secrets from its output.
    PostToolUse,
}

/// `keygate hook install AGENT`.
#[derive(clap::Args, Debug)]
pub struct InstallArgs {
    /// The agent whose settings get keygate's hooks.
    pub agent: Agent,
    /// `./.claude/settings.json` (the default).
    #[arg(long, conflicts_with = "user")]
    pub project: bool,
    /// `~/.claude/settings.json`.
    #[arg(long)]
    pub user: bool,
}

/// Agents keygate can install hooks for.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Agent {
    /// Claude Code (`.claude/settings.json`).
    ClaudeCode,
}

/// Runs a hook command.
pub fn main(args: HookArgs) -> ExitCode {
    match args.command {
        HookCommand::ClaudeCode(args) => claude_code::main(args),
        HookCommand::Install(args) => install::main(args),
    }
}
