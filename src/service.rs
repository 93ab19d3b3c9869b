//! `keygate service install|uninstall`: keygate as a hardened systemd user service. Outside the
//! request path. The unit runs `keygate serve --config FILE` with the filesystem read-only except
//! for the paths the config writes (state, audit log, Unix sockets), and reloads on SIGHUP.
//!
//! Every `systemctl` it runs has a deadline; where the user manager cannot be reached (no
//! session bus, a container), the unit is still written and the commands are printed.

use std::fmt::Write as _;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use crate::config::{Config, Listen};
use crate::secret::SecretSource;

/// The unit's file name.
const UNIT: &str = "keygate.service";
/// How long one `systemctl` call may take.
const SYSTEMCTL_DEADLINE: Duration = Duration::from_secs(30);
/// How long finding out whether the user manager answers may take.
const PROBE_DEADLINE: Duration = Duration::from_secs(5);

/// `keygate service ...`.
#[derive(clap::Subcommand, Debug)]
pub enum ServiceCommand {
    /// Write a hardened systemd unit that runs `keygate serve`, then enable and start it (with
    /// --user, when the user manager answers; otherwise print the commands).
    Install(InstallArgs),
    /// Stop and disable the unit and remove its file.
    Uninstall(UninstallArgs),
}

/// `keygate service install` arguments.
#[derive(clap::Args, Debug)]
pub struct InstallArgs {
    /// A user unit in $XDG_CONFIG_HOME/systemd/user (the default).
    #[arg(long, conflicts_with = "system")]
    pub user: bool,
    /// A system unit: printed with the commands to install it as root (nothing is written).
    #[arg(long)]
    pub system: bool,
    /// The config the service runs (made absolute).
    #[arg(long, env = "KEYGATE_CONFIG")]
    pub config: PathBuf,
    /// Print the unit and the commands; write, enable and start nothing.
    #[arg(long, visible_alias = "dry-run")]
    pub print: bool,
    /// Write the unit but do not enable or start it (print the commands instead).
    #[arg(long)]
    pub no_start: bool,
}

/// `keygate service uninstall` arguments.
#[derive(clap::Args, Debug)]
pub struct UninstallArgs {
    /// The user unit (the default; the only one keygate installs itself).
    #[arg(long)]
    pub user: bool,
    /// Remove the file but do not call systemctl (print the commands instead).
    #[arg(long)]
    pub no_start: bool,
}

/// Runs `keygate service ...`.
pub fn main(cmd: ServiceCommand) -> ExitCode {
    match cmd {
        ServiceCommand::Install(args) => install(&args),
        ServiceCommand::Uninstall(args) => uninstall(&args),
    }
}

fn install(args: &InstallArgs) -> ExitCode {
    let config_path = match std::path::absolute(&args.config) {
        Ok(p) => p,
        Err(e) => return fail(2, &format!("{}: {e}", args.config.display())),
    };
    let config = match Config::load(&config_path) {
        Ok(c) => c,
        Err(e) => return fail(2, &e.to_string()),
    };
    let exe = match std::env::current_exe().and_then(std::fs::canonicalize) {
        Ok(p) => p,
        Err(e) => return fail(2, &format!("cannot find keygate's own binary: {e}")),
    };
    let Some(env_file) = config_home().map(|c| c.join("keygate/service.env")) else {
        return fail(2, "neither XDG_CONFIG_HOME nor HOME is set");
    };
    let workdir = config_path
        .parent()
        .map_or_else(|| PathBuf::from("/"), Path::to_path_buf);
    let plan = Plan::of(&config, &workdir);
    let user = if args.system { Some(whoami()) } else { None };
    let unit = render(
        &exe,
        &config_path,
        &workdir,
        &env_file,
        &plan,
        user.as_deref(),
    );
    let env_vars = env_vars(&config);

    if args.system {
        print!("{unit}");
        eprintln!("keygate: a system unit is not written by keygate; as root:");
        eprintln!(
            "  keygate service install --system --config {} --print > /etc/systemd/system/{UNIT}",
            config_path.display()
        );
        eprintln!("  systemctl daemon-reload && systemctl enable --now {UNIT}");
        return ExitCode::SUCCESS;
    }
    let Some(unit_path) = unit_path() else {
        return fail(2, "neither XDG_CONFIG_HOME nor HOME is set");
    };
    if args.print {
        print!("{unit}");
        eprintln!("keygate: would write {}", unit_path.display());
        print_env_note(&env_file, &env_vars);
        return ExitCode::SUCCESS;
    }
    // ReadWritePaths must exist when the service starts: the directories keygate would create
    // itself are made now, owner-only as keygate makes them.
    for dir in &plan.create {
        if let Err(e) = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
        {
            return fail(1, &format!("cannot create {}: {e}", dir.display()));
        }
    }
    if let Err(e) = write_unit(&unit_path, &unit) {
        return fail(1, &format!("cannot write {}: {e}", unit_path.display()));
    }
    println!("wrote {}", unit_path.display());
    print_env_note(&env_file, &env_vars);
    let commands = [
        vec!["systemctl", "--user", "daemon-reload"],
        vec!["systemctl", "--user", "enable", "--now", UNIT],
    ];
    if args.no_start || !user_manager_answers() {
        if !args.no_start {
            println!(
                "the systemd user manager does not answer here; run these in your login session:"
            );
        } else {
            println!("to enable and start it:");
        }
        for c in &commands {
            println!("  {}", c.join(" "));
        }
    } else {
        for c in &commands {
            if let Err(e) = run_bounded(c) {
                return fail(1, &format!("`{}` failed: {e}", c.join(" ")));
            }
        }
        println!(
            "keygate.service is enabled and started; `systemctl --user status keygate` shows it"
        );
    }
    println!(
        "to keep it running while you are logged out: loginctl enable-linger {}",
        whoami()
    );
    println!(
        "to reload the config: systemctl --user reload keygate (or keygate reload --config {})",
        config_path.display()
    );
    ExitCode::SUCCESS
}

fn uninstall(args: &UninstallArgs) -> ExitCode {
    let Some(unit_path) = unit_path() else {
        return fail(2, "neither XDG_CONFIG_HOME nor HOME is set");
    };
    if !unit_path.exists() {
        println!(
            "{} is not installed ({} does not exist)",
            UNIT,
            unit_path.display()
        );
        return ExitCode::SUCCESS;
    }
    let talk = !args.no_start && user_manager_answers();
    if talk {
        // Stopping may fail for a unit that never started; removal goes on either way.
        let _ = run_bounded(&["systemctl", "--user", "disable", "--now", UNIT]);
    }
    // `enable` links the unit from the target's wants directory; a link left behind would dangle.
    if let Some(dir) = unit_path.parent() {
        let wants = dir.join("default.target.wants").join(UNIT);
        if std::fs::read_link(&wants).is_ok() {
            let _ = std::fs::remove_file(&wants);
        }
    }
    if let Err(e) = std::fs::remove_file(&unit_path) {
        return fail(1, &format!("cannot remove {}: {e}", unit_path.display()));
    }
    println!("removed {}", unit_path.display());
    if talk {
        let _ = run_bounded(&["systemctl", "--user", "daemon-reload"]);
    } else {
        println!("if keygate.service is still running, in your login session:");
        println!("  systemctl --user stop {UNIT}");
        println!("  systemctl --user daemon-reload");
    }
    ExitCode::SUCCESS
}

/// What the config writes, so the unit grants exactly that.
struct Plan {
    /// Directories the service may write (ReadWritePaths).
    writable: Vec<PathBuf>,
    /// Of those, the ones keygate would create itself (state dir, socket dirs); made at install.
    create: Vec<PathBuf>,
    /// A path keygate writes (a socket agents connect to, the audit log) is under /tmp: a
    /// private /tmp would hide it, so the unit has no PrivateTmp then.
    in_tmp: bool,
}

impl Plan {
    fn of(config: &Config, workdir: &Path) -> Plan {
        // `std::path::absolute` also drops `.` components, so the unit reads cleanly.
        let abs = |p: &Path| {
            let joined = if p.is_absolute() {
                p.to_path_buf()
            } else {
                workdir.join(p)
            };
            std::path::absolute(&joined).unwrap_or(joined)
        };
        let mut writable = Vec::new();
        let mut create = Vec::new();
        let mut add = |p: PathBuf, make: bool, w: &mut Vec<PathBuf>| {
            if !w.contains(&p) {
                w.push(p.clone());
            }
            if make && !create.contains(&p) {
                create.push(p);
            }
        };
        if let Some(dir) = crate::state::dir(config) {
            add(abs(&dir), true, &mut writable);
        }
        let audit = abs(&config.audit_log);
        if let Some(dir) = audit.parent() {
            add(dir.to_path_buf(), false, &mut writable);
        }
        let mut sockets: Vec<PathBuf> = config
            .listen
            .iter()
            .filter_map(|l| match l {
                Listen::Unix(p) => Some(abs(p)),
                _ => None,
            })
            .collect();
        if let Some(admin) = crate::admin::socket_path(config) {
            sockets.push(abs(&admin));
        }
        for s in &sockets {
            if let Some(dir) = s.parent() {
                add(dir.to_path_buf(), true, &mut writable);
            }
        }
        let in_tmp = writable
            .iter()
            .any(|p| p.starts_with("/tmp") || p.starts_with("/var/tmp"));
        Plan {
            writable,
            create,
            in_tmp,
        }
    }
}

/// The unit's text. `user` is set for a system unit, which runs as that user.
fn render(
    exe: &Path,
    config: &Path,
    workdir: &Path,
    env_file: &Path,
    plan: &Plan,
    user: Option<&str>,
) -> String {
    let mut u = String::new();
    let _ = writeln!(
        u,
        "# Written by `keygate service install`; `keygate service uninstall` removes it."
    );
    let _ = writeln!(
        u,
        "# Add your own settings with `systemctl --user edit keygate` (a drop-in), not here."
    );
    let _ = writeln!(u, "[Unit]");
    let _ = writeln!(u, "Description=keygate credential broker for AI agents");
    let _ = writeln!(u);
    let _ = writeln!(u, "[Service]");
    let _ = writeln!(u, "Type=exec");
    if let Some(user) = user {
        let _ = writeln!(u, "User={user}");
    }
    let _ = writeln!(
        u,
        "ExecStart={} serve --config {}",
        quote(&exe.display().to_string()),
        quote(&config.display().to_string())
    );
    let _ = writeln!(u, "# keygate re-reads its config and secrets on SIGHUP");
    let _ = writeln!(u, "ExecReload=/bin/kill -HUP $MAINPID");
    let _ = writeln!(
        u,
        "WorkingDirectory={}",
        quote(&workdir.display().to_string())
    );
    let _ = writeln!(
        u,
        "# variables for source = \"env\" secrets and agents' token_env (create it, mode 0600)"
    );
    let _ = writeln!(
        u,
        "EnvironmentFile=-{}",
        quote(&env_file.display().to_string())
    );
    let _ = writeln!(u, "Restart=on-failure");
    let _ = writeln!(u, "RestartSec=2s");
    let _ = writeln!(u, "TimeoutStopSec=45s");
    let _ = writeln!(u, "UMask=0077");
    let _ = writeln!(u, "NoNewPrivileges=yes");
    let _ = writeln!(u, "ProtectSystem=strict");
    let _ = writeln!(u, "ProtectHome=read-only");
    for p in &plan.writable {
        let _ = writeln!(u, "ReadWritePaths={}", quote(&p.display().to_string()));
    }
    if plan.in_tmp {
        let _ = writeln!(
            u,
            "# no PrivateTmp: keygate writes under /tmp (a socket, its state or audit log)"
        );
    } else {
        let _ = writeln!(u, "PrivateTmp=yes");
    }
    for line in [
        "PrivateDevices=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "MemoryDenyWriteExecute=yes",
        "SystemCallArchitectures=native",
        "SystemCallFilter=@system-service",
        "SystemCallErrorNumber=EPERM",
        "CapabilityBoundingSet=",
    ] {
        let _ = writeln!(u, "{line}");
    }
    let _ = writeln!(u);
    let _ = writeln!(u, "[Install]");
    let _ = writeln!(u, "WantedBy=default.target");
    u
}

/// A unit-file word: `%` doubled (specifiers), quoted when it holds space, quote or backslash.
fn quote(s: &str) -> String {
    let s = s.replace('%', "%%");
    if s.contains(|c: char| c.is_whitespace() || c == '"' || c == '\\' || c == '\'') {
        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        s
    }
}

/// The variables the service needs from its EnvironmentFile: `env` secrets and agent tokens.
fn env_vars(config: &Config) -> Vec<String> {
    let mut vars: Vec<String> = config
        .secrets
        .iter()
        .filter_map(|s| match &s.source {
            SecretSource::Env { var } => Some(var.clone()),
            _ => None,
        })
        .chain(config.agents.iter().filter_map(|a| a.token_env.clone()))
        .collect();
    vars.sort();
    vars.dedup();
    vars
}

fn print_env_note(env_file: &Path, vars: &[String]) {
    if vars.is_empty() {
        return;
    }
    eprintln!(
        "keygate: a service does not get your shell's environment: put {} in {} (chmod 600), as NAME=value lines",
        vars.join(", "),
        env_file.display()
    );
}

fn write_unit(path: &Path, unit: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // Written whole, then renamed: systemd never reads half a unit.
    let tmp = path.with_extension("service.tmp");
    std::fs::write(&tmp, unit)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
    std::fs::rename(&tmp, path)
}

/// `$XDG_CONFIG_HOME`, else `~/.config`.
pub(crate) fn config_home() -> Option<PathBuf> {
    std::env::var_os("XDG_CONFIG_HOME")
        .filter(|x| !x.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|h| !h.is_empty())
                .map(|h| PathBuf::from(h).join(".config"))
        })
}

fn unit_path() -> Option<PathBuf> {
    config_home().map(|c| c.join("systemd/user").join(UNIT))
}

/// Whether `systemctl --user` reaches a user manager (a login session with its bus).
fn user_manager_answers() -> bool {
    run_bounded_for(&["systemctl", "--user", "show-environment"], PROBE_DEADLINE).is_ok()
}

fn run_bounded(argv: &[&str]) -> Result<(), String> {
    run_bounded_for(argv, SYSTEMCTL_DEADLINE)
}

/// Runs `argv` with no input and its output discarded; killed at `deadline`.
fn run_bounded_for(argv: &[&str], deadline: Duration) -> Result<(), String> {
    let Some((prog, rest)) = argv.split_first() else {
        return Err("no command".into());
    };
    let mut child = Command::new(prog)
        .args(rest)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let end = Instant::now() + deadline;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => return Err(status.to_string()),
            Ok(None) if Instant::now() >= end => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no answer within {}s", deadline.as_secs()));
            }
            Ok(None) => {
                #[allow(clippy::disallowed_methods)] // a CLI command: no runtime on this thread
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

fn whoami() -> String {
    nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map_or_else(|| nix::unistd::getuid().to_string(), |u| u.name)
}

fn fail(code: u8, msg: &str) -> ExitCode {
    eprintln!("keygate service: {msg}");
    ExitCode::from(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit_for(toml: &str) -> String {
        let config = Config::from_text(Path::new("/home/u/kg/keygate.toml"), toml).unwrap();
        let workdir = Path::new("/home/u/kg");
        let plan = Plan::of(&config, workdir);
        render(
            Path::new("/usr/bin/keygate"),
            Path::new("/home/u/kg/keygate.toml"),
            workdir,
            Path::new("/home/u/.config/keygate/service.env"),
            &plan,
            None,
        )
    }

    const ROUTE: &str = "[routes.r]\nprefix = \"/r\"\nupstream = \"https://example.com\"\n";

    #[test]
    fn the_unit_grants_writes_only_to_state_audit_and_socket_dirs() {
        let unit = unit_for(&format!(
            "listen = [\"unix:/run/user/1000/kg/keygate.sock\"]\nstate_dir = \"/home/u/.local/state/keygate\"\naudit_log = \"logs/audit.jsonl\"\n{ROUTE}"
        ));
        let rw: Vec<&str> = unit
            .lines()
            .filter_map(|l| l.strip_prefix("ReadWritePaths="))
            .collect();
        assert_eq!(
            rw,
            [
                "/home/u/.local/state/keygate",
                "/home/u/kg/logs",
                "/run/user/1000/kg"
            ]
        );
        assert!(unit.lines().any(|l| l == "PrivateTmp=yes"));
        assert!(
            unit.contains("ExecStart=/usr/bin/keygate serve --config /home/u/kg/keygate.toml\n")
        );
    }

    #[test]
    fn a_socket_under_tmp_drops_private_tmp() {
        let unit = unit_for(&format!(
            "listen = [\"unix:/tmp/kg/keygate.sock\"]\nstate_dir = \"/home/u/.local/state/keygate\"\n{ROUTE}"
        ));
        assert!(!unit.lines().any(|l| l == "PrivateTmp=yes"));
        assert!(unit.lines().any(|l| l == "ReadWritePaths=/tmp/kg"));
    }

    #[test]
    fn unit_words_with_spaces_or_percent_are_quoted_and_escaped() {
        assert_eq!(quote("/usr/bin/keygate"), "/usr/bin/keygate");
        assert_eq!(quote("/home/a b/k.toml"), "\"/home/a b/k.toml\"");
        assert_eq!(quote("/x/100%"), "/x/100%%");
    }
}
