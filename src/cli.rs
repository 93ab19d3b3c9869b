//! The command line. Each subcommand parses its arguments here and hands off to the module that
//! owns the behaviour; exit codes: 0 success, 1 a check found something, 2 usage or config error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "keygate",
    version,
    about = "Credential broker for AI agents: the agent gets a capability, never the key"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the broker.
    Serve(ServeArgs),
    /// Validate a config and print the effective policy (no secret values).
    Check(CheckArgs),
    /// Remove secrets and credentials from text: stdin to stdout, or files.
    Redact(crate::redact::cli::RedactArgs),
    /// Agent-tool hooks (Claude Code PreToolUse/PostToolUse).
    Hook(crate::hook::HookArgs),
    /// Issue, list and revoke agent tokens (kept in the config's state_dir).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Work with audit logs.
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Print a new token for an agent, alone on stdout; details go to stderr.
    Issue {
        #[arg(long, env = "KEYGATE_CONFIG")]
        config: PathBuf,
        #[arg(long)]
        agent: String,
        /// How long the token is valid: 30m, 8h, 7d.
        #[arg(long, default_value = "8h")]
        ttl: String,
    },
    /// List issued tokens (ids, never values).
    List {
        #[arg(long, env = "KEYGATE_CONFIG")]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by id, or all of an agent's tokens; a running keygate stops accepting them
    /// within a second.
    Revoke {
        #[arg(long, env = "KEYGATE_CONFIG")]
        config: PathBuf,
        id: Option<String>,
        #[arg(long)]
        agent: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Check a hash-chained audit log: exit 0 when the chain holds, 1 with the first bad line.
    Verify {
        file: PathBuf,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Config file: `.toml` (native) or `.json` (the lab broker's format).
    #[arg(long, env = "KEYGATE_CONFIG")]
    pub config: PathBuf,
    /// Where audit records go, overriding the config.
    #[arg(long)]
    pub audit_log: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    #[arg(long, env = "KEYGATE_CONFIG")]
    pub config: PathBuf,
    /// Print the effective policy as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        Command::Serve(args) => crate::serve::serve_main(&args.config, args.audit_log.as_deref()),
        Command::Check(args) => crate::serve::check_main(&args.config, args.json),
        Command::Redact(args) => crate::redact::cli::main(args),
        Command::Hook(args) => crate::hook::main(args),
        Command::Token(cmd) => token(cmd),
        Command::Audit(AuditCommand::Verify { file, json }) => audit_verify(&file, json),
    }
}

fn token(cmd: TokenCommand) -> ExitCode {
    use crate::serve::{token_main, TokenAction};
    match cmd {
        TokenCommand::Issue { config, agent, ttl } => {
            token_main(&config, TokenAction::Issue { agent, ttl })
        }
        TokenCommand::List { config, json } => token_main(&config, TokenAction::List { json }),
        TokenCommand::Revoke { config, id, agent } => {
            token_main(&config, TokenAction::Revoke { id, agent })
        }
    }
}

fn audit_verify(file: &std::path::Path, json: bool) -> ExitCode {
    match crate::audit::verify(file) {
        Ok(Ok(n)) => {
            if json {
                println!("{}", serde_json::json!({"ok": true, "records": n}));
            } else {
                println!("{}: chain holds over {n} records", file.display());
            }
            ExitCode::SUCCESS
        }
        Ok(Err((line, why))) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"ok": false, "line": line, "reason": why})
                );
            } else {
                println!("{}:{line}: {why}", file.display());
            }
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("keygate: {}: {e}", file.display());
            ExitCode::from(2)
        }
    }
}
