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
    /// Show the running keygate: listeners, routes, agents, secrets (ids only), approvals, freezes.
    Status {
        #[arg(long, env = "KEYGATE_CONFIG")]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Re-read the config and secrets in the running keygate (same as SIGHUP).
    Reload {
        #[arg(long, env = "KEYGATE_CONFIG")]
        config: PathBuf,
    },
    /// Refuse every request (or one agent's) with 503 `frozen` until unfrozen; survives restart.
    Freeze {
        #[arg(long, env = "KEYGATE_CONFIG")]
        config: PathBuf,
        #[arg(long)]
        agent: Option<String>,
    },
    /// Lift a freeze (without --agent: every freeze).
    Unfreeze {
        #[arg(long, env = "KEYGATE_CONFIG")]
        config: PathBuf,
        #[arg(long)]
        agent: Option<String>,
    },
    /// Requests waiting for a person's approval.
    #[command(subcommand)]
    Approvals(ApprovalsCommand),
    /// Let a pending request through.
    Approve {
        #[arg(long, env = "KEYGATE_CONFIG")]
        config: PathBuf,
        id: String,
    },
    /// Refuse a pending request (403 `approval_denied`).
    Deny {
        #[arg(long, env = "KEYGATE_CONFIG")]
        config: PathBuf,
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// What would break: rehearse a revocation without changing anything.
    #[command(subcommand)]
    Drill(DrillCommand),
}

#[derive(Subcommand, Debug)]
pub enum ApprovalsCommand {
    /// List pending approvals (id, agent, person, route, method, path, model, body size, age).
    List {
        #[arg(long, env = "KEYGATE_CONFIG")]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum DrillCommand {
    /// Which agents, routes and tokens would stop working if one agent, secret or route were
    /// revoked, and how many recent requests would have been refused.
    Revoke {
        #[arg(long, env = "KEYGATE_CONFIG")]
        config: PathBuf,
        #[arg(long)]
        agent: Option<String>,
        #[arg(long)]
        secret: Option<String>,
        #[arg(long)]
        route: Option<String>,
        /// How far back to read the audit log: 24h, 7d.
        #[arg(long, default_value = "24h")]
        since: String,
        #[arg(long)]
        json: bool,
        /// The audit log to read, instead of the config's.
        #[arg(long)]
        audit_log: Option<PathBuf>,
    },
}

/// `keygate drill ...` arguments.
pub type DrillArgs = DrillCommand;

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
        Command::Serve(args) => crate::serve::serve_main(args),
        Command::Check(args) => crate::serve::check_main(args),
        Command::Redact(args) => crate::redact::cli::main(args),
        Command::Hook(args) => crate::hook::main(args),
        Command::Token(cmd) => crate::serve::token_main(cmd),
        Command::Audit(AuditCommand::Verify { file, json }) => audit_verify(&file, json),
        Command::Drill(cmd) => crate::admin::drill::main(cmd),
        cmd => admin_command(cmd),
    }
}

/// The commands that talk to a running keygate over its admin socket.
fn admin_command(cmd: Command) -> ExitCode {
    use crate::admin::client::{print_approvals, print_status, run};
    use serde_json::json;
    match cmd {
        Command::Status { config, json } => {
            run(&config, "GET", "/status", None, json, print_status)
        }
        Command::Reload { config } => run(&config, "POST", "/reload", None, false, |v| {
            println!(
                "reloaded: policy {}",
                v["policy_version"].as_str().unwrap_or("")
            )
        }),
        Command::Freeze { config, agent } => {
            let what = agent
                .clone()
                .map_or("everything".to_string(), |a| format!("agent {a}"));
            run(
                &config,
                "POST",
                "/freeze",
                Some(json!({"agent": agent})),
                false,
                |v| {
                    println!("frozen: {what}");
                    if let Some(w) = v["warning"].as_str() {
                        eprintln!("keygate: warning: {w}");
                    }
                },
            )
        }
        Command::Unfreeze { config, agent } => {
            let what = agent
                .clone()
                .map_or("everything".to_string(), |a| format!("agent {a}"));
            run(
                &config,
                "POST",
                "/unfreeze",
                Some(json!({"agent": agent})),
                false,
                |_| println!("unfrozen: {what}"),
            )
        }
        Command::Approvals(ApprovalsCommand::List { config, json }) => {
            run(&config, "GET", "/approvals", None, false, |v| {
                if json {
                    println!("{}", v["pending"]);
                } else {
                    print_approvals(v)
                }
            })
        }
        Command::Approve { config, id } => run(
            &config,
            "POST",
            "/approve",
            Some(json!({"id": id})),
            false,
            |_| println!("approved {id}"),
        ),
        Command::Deny { config, id, reason } => run(
            &config,
            "POST",
            "/deny",
            Some(json!({"id": id, "reason": reason})),
            false,
            |_| println!("denied {id}"),
        ),
        _ => ExitCode::from(2),
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
