//! The command line. Each subcommand parses its arguments here and hands off to the module that
//! owns the behaviour; exit codes: 0 success, 1 a check found something, 2 usage or config error.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The parsed command line.
#[derive(Parser, Debug)]
#[command(
    name = "keygate",
    version,
    about = "Credential broker for AI agents: the agent gets a capability, never the key"
)]
pub struct Cli {
    /// The subcommand to run.
    #[command(subcommand)]
    pub command: Command,
}

/// keygate's subcommands.
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
    /// Protect the provider keys you have: find them (environment, .env, tools' files), move
    /// them into keygate and write a config with a route per provider.
    Init(crate::init::InitArgs),
    /// Find plaintext credentials in files, shell history and the environment (never shows
    /// a value); exit 1 when one is found.
    Scan(crate::findkeys::sweep::ScanArgs),
    /// Issue, list and revoke agent tokens (kept in the config's state_dir).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Work with audit logs.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Show the running keygate: listeners, routes, agents, secrets (ids only), approvals, freezes.
    Status {
        /// Config file of the keygate to act on.
        #[arg(long, env = "KEYGATE_CONFIG")]
        config: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Re-read the config and secrets in the running keygate (same as SIGHUP).
    Reload {
        /// Config file of the keygate to act on.
        #[arg(long, env = "KEYGATE_CONFIG")]
        config: PathBuf,
    },
    /// Refuse every request (or one agent's) with 503 `frozen` until unfrozen; survives restart.
    Freeze {
        /// Config file of the keygate to act on.
        #[arg(long, env = "KEYGATE_CONFIG")]
        config: PathBuf,
        /// Freeze only this agent.
        #[arg(long)]
        agent: Option<String>,
    },
    /// Lift a freeze (without --agent: every freeze).
    Unfreeze {
        /// Config file of the keygate to act on.
        #[arg(long, env = "KEYGATE_CONFIG")]
        config: PathBuf,
        /// Unfreeze only this agent.
        #[arg(long)]
        agent: Option<String>,
    },
    /// The forward proxy's local CA: `ca export` prints its certificate (PEM) for trust stores.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Requests waiting for a person's approval.
    #[command(subcommand)]
    Approvals(ApprovalsCommand),
    /// Let a pending request through.
    Approve {
        /// Config file of the keygate to act on.
        #[arg(long, env = "KEYGATE_CONFIG")]
        config: PathBuf,
        /// The approval id, as `approvals list` shows it.
        id: String,
    },
    /// Refuse a pending request (403 `approval_denied`).
    Deny {
        /// Config file of the keygate to act on.
        #[arg(long, env = "KEYGATE_CONFIG")]
        config: PathBuf,
        /// The approval id, as `approvals list` shows it.
        id: String,
        /// Why, shown to the agent in the refusal.
        #[arg(long)]
        reason: Option<String>,
    },
    /// What would break: rehearse a revocation without changing anything.
    #[command(subcommand)]
    Drill(DrillCommand),
    /// Check a setup: config, secret sources (fetched, never shown), upstreams, audit log, state
    /// directory, listen ports, admin socket, Landlock; a fix for each problem (exit 1).
    Doctor(crate::doctor::DoctorArgs),
    /// Run keygate as a hardened systemd user service.
    #[command(subcommand)]
    Service(crate::service::ServiceCommand),
    /// Print a shell completion script (e.g. `keygate completions bash > ~/.local/share/bash-completion/completions/keygate`).
    Completions {
        /// The shell to complete in.
        shell: clap_complete::Shell,
    },
    /// Print keygate's man page (roff), e.g. `keygate man | man -l -`.
    Man,
    /// Run an agent with a token minted for this run only (revoked when it ends), provider keys
    /// removed from its environment, SDK variables pointing at keygate, in a Landlock sandbox.
    Run {
        /// Config file of the keygate to act on.
        #[arg(long, env = "KEYGATE_CONFIG")]
        config: PathBuf,
        /// The agent the run's token is for (the config's only agent when omitted).
        #[arg(long)]
        agent: Option<String>,
        /// The token's lifetime, a backstop to the lease: 30m, 12h (default 12h).
        #[arg(long)]
        ttl: Option<String>,
        /// Require the sandbox: fail where the kernel has no Landlock (default: on where supported).
        #[arg(long, conflicts_with = "no_sandbox")]
        sandbox: bool,
        /// Run without the sandbox.
        #[arg(long)]
        no_sandbox: bool,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
}

/// `keygate ca ...`.
#[derive(Subcommand, Debug)]
pub enum CaCommand {
    /// Print the CA certificate (created on first use in the state directory), never its key.
    Export {
        /// Config file naming the state directory.
        #[arg(long, env = "KEYGATE_CONFIG")]
        config: PathBuf,
    },
}

/// `keygate approvals ...`.
#[derive(Subcommand, Debug)]
pub enum ApprovalsCommand {
    /// List pending approvals (id, agent, person, route, method, path, model, body size, age).
    List {
        /// Config file of the keygate to act on.
        #[arg(long, env = "KEYGATE_CONFIG")]
        config: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// `keygate drill ...`.
#[derive(Subcommand, Debug)]
pub enum DrillCommand {
    /// Which agents, routes and tokens would stop working if one agent, secret or route were
    /// revoked, and how many recent requests would have been refused.
    Revoke {
        /// Config file of the keygate to act on.
        #[arg(long, env = "KEYGATE_CONFIG")]
        config: PathBuf,
        /// Revoke this agent.
        #[arg(long)]
        agent: Option<String>,
        /// Revoke this secret (by its id in the config).
        #[arg(long)]
        secret: Option<String>,
        /// Revoke this route.
        #[arg(long)]
        route: Option<String>,
        /// How far back to read the audit log: 24h, 7d.
        #[arg(long, default_value = "24h")]
        since: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// The audit log to read, instead of the config's.
        #[arg(long)]
        audit_log: Option<PathBuf>,
    },
}

/// `keygate drill ...` arguments.
pub type DrillArgs = DrillCommand;

/// `keygate token ...`.
#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Print a new token for an agent, alone on stdout; details go to stderr.
    Issue {
        /// Config file of the keygate to act on.
        #[arg(long, env = "KEYGATE_CONFIG")]
        config: PathBuf,
        /// The agent the token is for (a name from the config).
        #[arg(long)]
        agent: String,
        /// How long the token is valid: 30m, 8h, 7d.
        #[arg(long, default_value = "8h")]
        ttl: String,
    },
    /// List issued tokens (ids, never values).
    List {
        /// Config file of the keygate to act on.
        #[arg(long, env = "KEYGATE_CONFIG")]
        config: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by id, or all of an agent's tokens; a running keygate stops accepting them
    /// within a second.
    Revoke {
        /// Config file of the keygate to act on.
        #[arg(long, env = "KEYGATE_CONFIG")]
        config: PathBuf,
        /// The token id, as `token list` shows it.
        id: Option<String>,
        /// Revoke every token of this agent.
        #[arg(long)]
        agent: Option<String>,
    },
}

/// `keygate audit ...`.
#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Check a hash-chained audit log: exit 0 when the chain holds, 1 with the first bad line.
    ///
    /// The chain must begin at a `start` record (or at --from-hash); a tail not closed by a
    /// `stop` record or a checkpoint is reported, and fails with --strict.
    Verify {
        /// The audit log(s) to check: several keygates sharing one state store each keep their
        /// own chained log; give them all to check each (one result per file).
        #[arg(required = true, num_args = 1..)]
        file: Vec<PathBuf>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// Also fail (exit 1) when the log is not whole: lines before its anchor, or a tail not
        /// closed by a stop record or a checkpoint.
        #[arg(long)]
        strict: bool,
        /// Begin the chain at this hash (a checkpoint's, noted earlier): for a log whose first
        /// lines were cut.
        #[arg(long, value_name = "HASH")]
        from_hash: Option<String>,
        /// Check the signatures of start, checkpoint and stop records with this public key
        /// (`keygate audit key` prints it).
        #[arg(long, value_name = "PUBLIC_KEY")]
        key: Option<String>,
        /// Require the log to reach the last signed record keygate wrote, as the head file
        /// (`state_dir/audit.head`, signed; needs --key) names it: a log cut at a checkpoint or
        /// stop record is found only this way.
        #[arg(
            long,
            value_name = "FILE",
            requires = "key",
            conflicts_with = "to_hash"
        )]
        head: Option<PathBuf>,
        /// Require the log to reach the line carrying this hash (a checkpoint's, noted earlier).
        #[arg(long, value_name = "HASH")]
        to_hash: Option<String>,
        /// Use the head file in this config's state_dir (as --head STATE_DIR/audit.head).
        #[arg(long, value_name = "FILE", requires = "key", conflicts_with_all = ["head", "to_hash"])]
        config: Option<PathBuf>,
    },
    /// Print the public key that signs this keygate's audit checkpoints (creating the key pair
    /// in the config's state_dir on first use).
    Key {
        /// Config file of the keygate to act on.
        #[arg(long, env = "KEYGATE_CONFIG")]
        config: PathBuf,
    },
}

/// `keygate serve` arguments.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Config file: `.toml` (native) or `.json` (the lab broker's format).
    #[arg(long, env = "KEYGATE_CONFIG")]
    pub config: PathBuf,
    /// Where audit records go, overriding the config.
    #[arg(long)]
    pub audit_log: Option<PathBuf>,
}

/// `keygate check` arguments.
#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// Config file to check.
    #[arg(long, env = "KEYGATE_CONFIG")]
    pub config: PathBuf,
    /// Print the effective policy as JSON.
    #[arg(long)]
    pub json: bool,
    /// Also fetch every secret once and report its key id, expiry and fetch time (never a
    /// value); exit 1 when one cannot be fetched.
    #[arg(long)]
    pub fetch: bool,
}

/// Rust ignores SIGPIPE, so once the reader of `keygate check | head` has gone, the next
/// `println!` panics. A reader that stops reading is its choice, not keygate's failure: end as a
/// tool killed by SIGPIPE would (status 128 + 13, no message), as every other output command
/// in a pipeline does. The message is std's own ("failed printing to stdout: …"); any other
/// panic still reaches the default hook.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failed printing to stdout")
            && msg.to_ascii_lowercase().contains("broken pipe")
        {
            std::process::exit(141);
        }
        default(info)
    }));
}

/// Parses the command line and runs the subcommand; returns its exit code.
pub fn main() -> ExitCode {
    // The sandbox helper restricts its own thread and execs: it runs before anything else could
    // start a thread (and is no command a person types).
    let mut raw = std::env::args_os().skip(1);
    if raw.next().as_deref() == Some(std::ffi::OsStr::new(crate::launcher::sandbox::SUBCOMMAND)) {
        return crate::launcher::sandbox::exec_main(raw.collect());
    }
    quiet_on_closed_stdout();
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
        Command::Check(args) => crate::serve::check_main(&args.config, args.json, args.fetch),
        Command::Redact(args) => crate::redact::cli::main(args),
        Command::Hook(args) => crate::hook::main(args),
        Command::Init(args) => crate::init::main(args),
        Command::Scan(args) => crate::findkeys::sweep::main(args),
        Command::Token(cmd) => token(cmd),
        Command::Ca(CaCommand::Export { config }) => ca_export(&config),
        Command::Audit(AuditCommand::Verify {
            file,
            json,
            strict,
            from_hash,
            key,
            head,
            to_hash,
            config,
        }) => {
            let head = match (head, config) {
                (None, Some(c)) => match head_of(&c) {
                    Ok(h) => Some(h),
                    Err(code) => return code,
                },
                (head, _) => head,
            };
            if file.len() > 1 && (head.is_some() || to_hash.is_some() || from_hash.is_some()) {
                return usage(
                    "--head, --config, --to-hash and --from-hash name one log's ends; give one file with them",
                );
            }
            // Each file is its own chain; the worst result is the exit code.
            let mut code = ExitCode::SUCCESS;
            for f in &file {
                let c = audit_verify(
                    f,
                    json,
                    strict,
                    from_hash.clone(),
                    key.as_deref(),
                    End {
                        head: head.clone(),
                        to_hash: to_hash.clone(),
                    },
                );
                if c != ExitCode::SUCCESS {
                    code = c;
                }
            }
            code
        }
        Command::Audit(AuditCommand::Key { config }) => audit_key(&config),
        Command::Drill(cmd) => crate::admin::drill::main(cmd),
        Command::Doctor(args) => crate::doctor::main(args),
        Command::Service(cmd) => crate::service::main(cmd),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "keygate",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
        Command::Man => {
            use clap::CommandFactory;
            match clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("keygate man: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Run {
            config,
            agent,
            ttl,
            sandbox,
            no_sandbox,
            command,
        } => crate::launcher::main(crate::launcher::RunArgs {
            config,
            agent,
            ttl,
            sandbox: if sandbox {
                Some(true)
            } else if no_sandbox {
                Some(false)
            } else {
                None
            },
            command,
        }),
        cmd => admin_command(cmd),
    }
}

/// `keygate freeze` / `unfreeze`, for everything or one agent.
fn freeze(config: &Path, agent: Option<String>, on: bool) -> ExitCode {
    let what = agent
        .clone()
        .map_or("everything".to_string(), |a| format!("agent {a}"));
    let (path, done) = if on {
        ("/freeze", "frozen")
    } else {
        ("/unfreeze", "unfrozen")
    };
    let body = serde_json::json!({ "agent": agent });
    crate::admin::client::run(config, "POST", path, Some(body), false, |v| {
        println!("{done}: {what}");
        if let Some(w) = v["warning"].as_str() {
            eprintln!("keygate: warning: {w}");
        }
    })
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
        Command::Freeze { config, agent } => freeze(&config, agent, true),
        Command::Unfreeze { config, agent } => freeze(&config, agent, false),
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

fn audit_key(config: &std::path::Path) -> ExitCode {
    let config = match crate::config::Config::load(config) {
        Ok(c) => c,
        Err(e) => return usage(&e.to_string()),
    };
    let Some(dir) = &config.state_dir else {
        return usage(&format!(
            "{}: no state_dir is configured, so audit checkpoints are not signed; add state_dir = \"~/.local/state/keygate\"",
            config.file.display()
        ));
    };
    match crate::audit::AuditKey::load_or_create(dir) {
        Ok(k) => {
            println!("{}", k.public_hex());
            ExitCode::SUCCESS
        }
        Err(e) => usage(&e.to_string()),
    }
}

/// The head file of a config's state_dir.
fn head_of(config: &std::path::Path) -> Result<PathBuf, ExitCode> {
    let config = crate::config::Config::load(config).map_err(|e| usage(&e.to_string()))?;
    match &config.state_dir {
        Some(dir) => Ok(dir.join(crate::audit::HEAD_FILE)),
        None => Err(usage(&format!(
            "{}: no state_dir is configured, so keygate keeps no audit head file",
            config.file.display()
        ))),
    }
}

fn usage(msg: &str) -> ExitCode {
    eprintln!("keygate: {msg}");
    ExitCode::from(2)
}

/// Where the log must reach: the head file's record, or a hash.
struct End {
    head: Option<PathBuf>,
    to_hash: Option<String>,
}

fn audit_verify(
    file: &std::path::Path,
    json: bool,
    strict: bool,
    from_hash: Option<String>,
    key: Option<&str>,
    end: End,
) -> ExitCode {
    let key = match key.map(read_public_key).transpose() {
        Ok(k) => k,
        Err(e) => return usage(&format!("--key: {e}")),
    };
    // The head names the log it was written for; a different file failing to reach it is worth
    // saying so (a rotated log, a copy).
    let mut head_log = None;
    let (to_hash, to_line) = match (&end.head, &key) {
        (Some(path), Some(pk)) => match crate::audit::Head::read(path, pk) {
            Ok(h) => {
                head_log = Some(h.log);
                (Some(h.hash), Some(h.line))
            }
            Err(e) => {
                // A head that does not hold is a failed check, not a usage error.
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"ok": false, "line": 0, "reason": e})
                    );
                } else {
                    println!("{e}");
                }
                return ExitCode::from(1);
            }
        },
        _ => (end.to_hash, None),
    };
    let opts = crate::audit::VerifyOptions {
        from_hash,
        key,
        to_hash,
        to_line,
    };
    match crate::audit::verify(file, &opts) {
        Ok(Ok(report)) => {
            let ok = !strict || report.complete();
            if json {
                let mut v = serde_json::to_value(&report).unwrap_or_default();
                v["ok"] = ok.into();
                println!("{v}");
            } else {
                print_report(file, &report, opts.key.is_some());
            }
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Ok(Err(b)) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"ok": false, "line": b.line, "reason": b.reason})
                );
            } else {
                println!("{}:{}: {}", file.display(), b.line, b.reason);
                let here = std::fs::canonicalize(file).ok();
                if let Some(log) = head_log.filter(|l| Some(l) != here.as_ref()) {
                    println!(
                        "{}: note: the head file was written for {}",
                        file.display(),
                        log.display()
                    );
                }
            }
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("keygate: {}: {e}", file.display());
            ExitCode::from(2)
        }
    }
}

/// `--key` takes the key itself or a file holding it.
fn read_public_key(arg: &str) -> Result<ed25519_dalek::VerifyingKey, String> {
    match crate::audit::key::parse_public(arg) {
        Ok(k) => Ok(k),
        Err(e) => match std::fs::read_to_string(arg) {
            Ok(text) => crate::audit::key::parse_public(&text),
            Err(_) => Err(e),
        },
    }
}

fn print_report(file: &std::path::Path, r: &crate::audit::Report, signed: bool) {
    let f = file.display();
    let sigs = if signed {
        format!(", {} signatures hold", r.signed)
    } else {
        String::new()
    };
    println!(
        "{f}: chain holds over {} records from line {}{sigs}",
        r.records, r.anchor_line
    );
    if r.before_anchor > 0 {
        println!(
            "{f}: {} lines before the anchor (line {}) were checked for consistency only",
            r.before_anchor, r.anchor_line
        );
    }
    for line in &r.torn {
        println!(
            "{f}:{line}: cut mid-write by a crash; the next run's start record continues the chain"
        );
    }
    if let Some((line, hash)) = &r.last_checkpoint {
        println!("{f}:{line}: last checkpoint, hash {hash}");
    }
    if let Some(line) = r.reached {
        println!("{f}:{line}: reaches the end anchor (the head's record)");
    }
    match &r.tail {
        Some(tail) => println!("{f}: not closed: {tail}"),
        None if r.closed => println!("{f}: closed by a stop record"),
        None => {}
    }
}

/// `keygate ca export`: the forward proxy's CA certificate on stdout.
fn ca_export(config: &std::path::Path) -> ExitCode {
    let config = match crate::config::Config::load(config) {
        Ok(c) => c,
        Err(e) => return usage(&e.to_string()),
    };
    let Some(dir) = crate::state::dir(&config) else {
        return usage("no state directory: set state_dir in the config (or HOME)");
    };
    match crate::proxy::ca::Ca::load_or_create(&dir) {
        Ok(ca) => {
            print!("{}", ca.pem());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("keygate: proxy CA: {e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod help_tests {
    use clap::CommandFactory;

    /// Every command, flag and argument a person can type, with its path (`token issue --ttl`).
    fn walk(cmd: &clap::Command, path: &str, out: &mut Vec<(String, Option<String>)>) {
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if matches!(id, "help" | "version") || arg.is_hide_set() {
                continue;
            }
            let help = arg.get_help().map(|h| h.to_string());
            out.push((format!("{path} --{id}"), help));
        }
        for sub in cmd.get_subcommands() {
            if sub.is_hide_set() || sub.get_name() == "help" {
                continue;
            }
            let name = format!("{path} {}", sub.get_name());
            out.push((name.clone(), sub.get_about().map(|h| h.to_string())));
            walk(sub, &name, out);
        }
    }

    #[test]
    fn every_command_and_flag_has_help_text_that_does_not_call_it_unavailable() {
        let mut all = Vec::new();
        walk(&super::Cli::command(), "keygate", &mut all);
        assert!(all.len() > 40, "walked too little: {all:?}");
        let bad: Vec<_> = all
            .iter()
            .filter(|(_, help)| {
                help.as_deref().is_none_or(|h| {
                    h.trim().is_empty() || h.contains("not available") || h.contains("not yet")
                })
            })
            .map(|(path, _)| path)
            .collect();
        assert!(bad.is_empty(), "without useful help text: {bad:?}");
    }
}
