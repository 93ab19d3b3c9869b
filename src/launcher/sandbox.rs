//! The sandbox `keygate run` puts CMD in: Landlock (best effort by the kernel's ABI) and
//! `PR_SET_NO_NEW_PRIVS`.
//!
//! The crate forbids `unsafe`, so there is no `pre_exec`: the launcher starts keygate itself
//! with the hidden subcommand [`SUBCOMMAND`], which restricts its own (single) thread and then
//! `exec`s CMD; a Landlock domain is kept across `execve` and inherited by every child.
//!
//! Landlock only grants, so "everything but keygate's files" is built as grants: walking from
//! `/` towards each denied path, every sibling entry is granted whole; the directories on the
//! way (the denied paths' ancestors) get only `ReadDir`, and the denied paths nothing. So CMD
//! can read, write and run everything else, but cannot open keygate's config, state dir, admin
//! socket (from ABI 9, where connecting to a socket file is checked), audit log or `file`
//! secrets. Limits: the grants are made when the run starts, so a new entry created later
//! directly inside an ancestor directory (say `~` when the config is in `~/.config/keygate`) is
//! not usable by CMD, and entries cannot be renamed into or out of an ancestor; keep keygate's
//! files in directories of their own. With ABI >= 4, TCP `connect` is allowed only to
//! keygate's ports and `[run] allow_ports`; UDP (DNS) and binding are left alone. With ABI >= 6
//! CMD cannot signal processes outside the sandbox or reach abstract Unix sockets.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use landlock::{
    Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, NetPort, PathBeneath, PathFd,
    Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};

/// The hidden subcommand that sandboxes itself and execs CMD.
pub const SUBCOMMAND: &str = "__exec-sandboxed";

/// What the sandbox denies and allows.
#[derive(Debug, Default)]
pub struct Plan {
    /// Paths CMD may not open (files or whole directories).
    pub deny: Vec<PathBuf>,
    /// TCP ports CMD may connect to.
    pub ports: Vec<u16>,
    /// Fail rather than run CMD unsandboxed when the kernel has no Landlock.
    pub require: bool,
}

/// Whether a process has `no_new_privs` set: every sandboxed process has, and it can never be
/// unset, so the admin socket refuses such peers (before ABI 9, Landlock cannot stop a
/// sandboxed process from connecting to the socket file).
pub fn no_new_privs(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("NoNewPrivs:") && l.trim_end().ends_with('1'))
        })
        .unwrap_or(false)
}

/// `keygate __exec-sandboxed [--require] [--deny P]… [--port N]… -- CMD ARGS…`: restricts itself
/// and becomes CMD. Returns only on failure.
pub fn exec_main(args: Vec<OsString>) -> ExitCode {
    let mut plan = Plan::default();
    let mut it = args.into_iter();
    let mut cmd = Vec::new();
    while let Some(a) = it.next() {
        match a.to_str() {
            Some("--require") => plan.require = true,
            Some("--deny") => plan.deny.extend(it.next().map(PathBuf::from)),
            Some("--port") => match it.next().and_then(|p| p.to_str()?.parse().ok()) {
                Some(p) => plan.ports.push(p),
                None => return usage("--port needs a port number"),
            },
            Some("--") => {
                cmd.extend(it.by_ref());
                break;
            }
            _ => return usage(&format!("unexpected argument {a:?}")),
        }
    }
    if cmd.is_empty() {
        return usage("nothing to run after --");
    }
    match apply(&plan) {
        Ok(RulesetStatus::NotEnforced) => {
            if plan.require {
                eprintln!("keygate run: --sandbox: this kernel does not support Landlock; not running {:?}", cmd[0]);
                return ExitCode::from(2);
            }
            eprintln!("keygate run: sandbox: this kernel does not support Landlock; running without it (no_new_privs only)");
        }
        Ok(_) => {}
        Err(e) => {
            eprintln!("keygate run: sandbox: {e}; not running {:?}", cmd[0]);
            return ExitCode::from(2);
        }
    }
    let e = std::process::Command::new(&cmd[0]).args(&cmd[1..]).exec();
    eprintln!("keygate run: cannot run {:?}: {e}", cmd[0]);
    ExitCode::from(127)
}

fn usage(msg: &str) -> ExitCode {
    eprintln!("keygate {SUBCOMMAND}: {msg}");
    ExitCode::from(2)
}

/// Restricts the calling thread (and what it execs) as `plan` says.
pub fn apply(plan: &Plan) -> Result<RulesetStatus, String> {
    let abi = ABI::V10;
    let all = AccessFs::from_all(abi);
    let deny: Vec<PathBuf> = plan
        .deny
        .iter()
        .filter_map(|p| std::fs::canonicalize(p).ok())
        .collect();
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(all)
        .map_err(|e| e.to_string())?
        .handle_access(AccessNet::ConnectTcp)
        .map_err(|e| e.to_string())?
        .scope(Scope::from_all(abi))
        .map_err(|e| e.to_string())?
        .create()
        .map_err(|e| e.to_string())?;
    let (whole, ancestors) = grants(&deny);
    for dir in &ancestors {
        if let Ok(fd) = PathFd::new(dir) {
            ruleset = ruleset
                .add_rule(PathBeneath::new(fd, AccessFs::ReadDir))
                .map_err(|e| e.to_string())?;
        }
    }
    for p in &whole {
        let Ok(fd) = PathFd::new(p) else { continue };
        let access: BitFlags<AccessFs> = if p.is_dir() {
            all
        } else {
            all & AccessFs::from_file(abi)
        };
        ruleset = ruleset
            .add_rule(PathBeneath::new(fd, access))
            .map_err(|e| e.to_string())?;
    }
    for port in &plan.ports {
        ruleset = ruleset
            .add_rule(NetPort::new(*port, AccessNet::ConnectTcp))
            .map_err(|e| e.to_string())?;
    }
    let status = ruleset.restrict_self().map_err(|e| e.to_string())?;
    if !status.no_new_privs {
        nix::sys::prctl::set_no_new_privs().map_err(|e| format!("no_new_privs: {e}"))?;
    }
    Ok(status.ruleset)
}

/// The paths granted whole, and the directories on the way to a denied path (granted
/// `ReadDir` only): everything under `/` except `deny`.
pub fn grants(deny: &[PathBuf]) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let mut whole = Vec::new();
    let mut ancestors = Vec::new();
    if deny.is_empty() {
        whole.push(PathBuf::from("/"));
        return (whole, ancestors);
    }
    walk(Path::new("/"), deny, &mut whole, &mut ancestors);
    (whole, ancestors)
}

fn walk(dir: &Path, deny: &[PathBuf], whole: &mut Vec<PathBuf>, ancestors: &mut Vec<PathBuf>) {
    ancestors.push(dir.to_path_buf());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if deny.iter().any(|d| d == &p) {
            continue;
        }
        let holds_denied = deny.iter().any(|d| d.starts_with(&p));
        // A symlink is granted as itself; opening through it is checked at its target.
        let is_real_dir = e.file_type().is_ok_and(|t| t.is_dir());
        if holds_denied && is_real_dir {
            walk(&p, deny, whole, ancestors);
        } else {
            whole.push(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_cover_everything_but_the_denied_paths_and_their_ancestors() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir_all(root.join("cfg/keygate")).unwrap();
        std::fs::write(root.join("cfg/keygate/k.toml"), "").unwrap();
        std::fs::write(root.join("cfg/keygate/other"), "").unwrap();
        std::fs::create_dir(root.join("work")).unwrap();
        let (whole, ancestors) = grants(&[root.join("cfg/keygate/k.toml")]);
        assert!(whole.contains(&root.join("work")));
        assert!(whole.contains(&root.join("cfg/keygate/other")));
        assert!(!whole.iter().any(|p| p == &root.join("cfg/keygate/k.toml")));
        assert!(ancestors.contains(&root.join("cfg/keygate")));
        assert!(ancestors.contains(&PathBuf::from("/")));
        assert!(!whole.iter().any(|p| root.join("cfg").starts_with(p)));
    }
}
