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
//! secrets; programs keygate runs are granted read and execute only. Symlinks met on the walk
//! are never granted (a rule's path is opened following links, so it would grant the target),
//! and each granted descriptor's real path is checked against the held paths. `--sandbox`
//! (`--require` here) demands ABI 4 (filesystem and TCP rules). Limits: the grants are made when the run starts, so a new entry created later
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
    /// Paths CMD may read and run but not change: programs keygate runs (a `command` secret,
    /// `approval_notify`, keygate itself), which CMD could otherwise rewrite to escape.
    pub read_only: Vec<PathBuf>,
    /// TCP ports CMD may connect to.
    pub ports: Vec<u16>,
    /// Fail rather than run CMD unsandboxed when the kernel has no Landlock.
    pub require: bool,
}

/// Whether a process has `no_new_privs` set: every sandboxed process has, and it can never be
/// unset, so the admin socket refuses such peers (before ABI 9, Landlock cannot stop a
/// sandboxed process from connecting to the socket file). `None` when it cannot be told (the
/// process is gone): callers refuse then.
pub fn no_new_privs(pid: i32) -> Option<bool> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("NoNewPrivs:"))?;
    Some(line.trim_end().ends_with('1'))
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
            Some("--read-only") => plan.read_only.extend(it.next().map(PathBuf::from)),
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
        Err(e) if plan.require => {
            eprintln!("keygate run: --sandbox: {e}; not running {:?}", cmd[0]);
            return ExitCode::from(2);
        }
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

/// The Landlock ABI `--sandbox` demands: filesystem rules (with `Refer` and `Truncate`) and TCP
/// `connect` rules, which the plan relies on.
const REQUIRED_ABI: ABI = ABI::V4;

/// Restricts the calling thread (and what it execs) as `plan` says.
pub fn apply(plan: &Plan) -> Result<RulesetStatus, String> {
    let abi = ABI::V10;
    let all = AccessFs::from_all(abi);
    if plan.require {
        demand(REQUIRED_ABI)?;
    }
    let deny: Vec<PathBuf> = plan.deny.iter().map(|p| resolve(p)).collect();
    let read_only: Vec<PathBuf> = plan.read_only.iter().map(|p| resolve(p)).collect();
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
    let g = grants(&deny, &read_only);
    let mut held = deny.clone();
    held.extend(read_only.iter().cloned());
    // Every grant is checked at the path its descriptor really opened: an entry swapped for a
    // symlink after the walk must not carry a grant to a denied path or one of its ancestors.
    for dir in &g.ancestors {
        let Ok(fd) = PathFd::new(dir) else { continue };
        if real_path(&fd).as_deref() != Some(dir.as_path()) {
            continue;
        }
        ruleset = ruleset
            .add_rule(PathBeneath::new(fd, AccessFs::ReadDir))
            .map_err(|e| e.to_string())?;
    }
    for p in &g.read_only {
        let Ok(fd) = PathFd::new(p) else { continue };
        if real_path(&fd).as_deref() != Some(p.as_path()) {
            continue;
        }
        let access = if p.is_dir() {
            AccessFs::from_read(abi)
        } else {
            AccessFs::from_read(abi) & AccessFs::from_file(abi)
        };
        ruleset = ruleset
            .add_rule(PathBeneath::new(fd, access))
            .map_err(|e| e.to_string())?;
    }
    for p in &g.whole {
        let Ok(fd) = PathFd::new(p) else { continue };
        match real_path(&fd) {
            Some(real) if safe_to_grant(&real, &held) => {}
            _ => continue,
        }
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

/// Fails unless the kernel enforces everything up to `abi` (filesystem and TCP rules).
fn demand(abi: ABI) -> Result<(), String> {
    Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(AccessFs::from_all(abi))
        .and_then(|r| r.handle_access(AccessNet::ConnectTcp))
        .and_then(|r| r.create())
        .map(drop)
        .map_err(|e| {
            format!(
                "this kernel does not support Landlock {abi:?} (filesystem and TCP connect rules), \
                 which --sandbox needs ({e}); run without --sandbox for a best-effort sandbox"
            )
        })
}

/// Where a descriptor really points (`/proc/self/fd`), whatever path opened it.
fn real_path(fd: &PathFd) -> Option<PathBuf> {
    use std::os::fd::{AsFd, AsRawFd};
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd())).ok()
}

/// Whether granting `real` whole would leave every held path alone: it is none of them, holds
/// none of them and is inside none of them.
fn safe_to_grant(real: &Path, held: &[PathBuf]) -> bool {
    !held
        .iter()
        .any(|h| h.starts_with(real) || real.starts_with(h))
}

/// `p` made absolute with its symlinks resolved; a path that does not exist (yet) keeps its
/// missing tail under its nearest existing ancestor, so it stays denied once created.
pub fn resolve(p: &Path) -> PathBuf {
    let p = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut base = p.as_path();
    let mut tail = Vec::new();
    loop {
        if let Ok(real) = std::fs::canonicalize(base) {
            let mut out = real;
            out.extend(tail.iter().rev());
            return out;
        }
        match (base.parent(), base.file_name()) {
            (Some(parent), Some(name)) => {
                tail.push(name.to_os_string());
                base = parent;
            }
            _ => return p.clone(),
        }
    }
}

/// What the walk grants.
#[derive(Debug, Default)]
pub struct Grants {
    /// Paths granted whole.
    pub whole: Vec<PathBuf>,
    /// Directories on the way to a held path, granted `ReadDir` only.
    pub ancestors: Vec<PathBuf>,
    /// Paths granted read and execute only.
    pub read_only: Vec<PathBuf>,
}

/// Everything under `/` except `deny` (nothing) and `read_only` (read and run), as grants.
/// Symlinks met on the way are never granted: Landlock opens a rule's path following links, so
/// a link would grant its target (`~/kg -> .config/keygate`); access through a link is checked
/// at the real location instead, which is covered on its own.
pub fn grants(deny: &[PathBuf], read_only: &[PathBuf]) -> Grants {
    let mut g = Grants::default();
    if deny.is_empty() && read_only.is_empty() {
        g.whole.push(PathBuf::from("/"));
        return g;
    }
    walk(Path::new("/"), deny, read_only, &mut g);
    g
}

fn walk(dir: &Path, deny: &[PathBuf], read_only: &[PathBuf], g: &mut Grants) {
    g.ancestors.push(dir.to_path_buf());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if deny.iter().any(|d| d == &p) {
            continue;
        }
        let Ok(kind) = e.file_type() else { continue };
        if kind.is_symlink() {
            continue;
        }
        let holds = |list: &[PathBuf]| list.iter().any(|d| d.starts_with(&p) && d != &p);
        if kind.is_dir() && (holds(deny) || holds(read_only)) {
            walk(&p, deny, read_only, g);
        } else if read_only.iter().any(|r| r == &p) {
            g.read_only.push(p);
        } else {
            g.whole.push(p);
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
        let g = grants(&[root.join("cfg/keygate/k.toml")], &[]);
        assert!(g.whole.contains(&root.join("work")));
        assert!(g.whole.contains(&root.join("cfg/keygate/other")));
        assert!(!g
            .whole
            .iter()
            .any(|p| p == &root.join("cfg/keygate/k.toml")));
        assert!(g.ancestors.contains(&root.join("cfg/keygate")));
        assert!(g.ancestors.contains(&PathBuf::from("/")));
        assert!(!g.whole.iter().any(|p| root.join("cfg").starts_with(p)));
    }

    #[test]
    fn grants_never_go_through_a_symlink_to_a_denied_path() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir_all(root.join("cfg")).unwrap();
        std::fs::write(root.join("cfg/k.toml"), "").unwrap();
        std::fs::write(root.join("plain"), "").unwrap();
        std::os::unix::fs::symlink(root.join("cfg"), root.join("link")).unwrap();
        let deny = [root.join("cfg/k.toml")];
        let g = grants(&deny, &[]);
        assert!(!g.whole.contains(&root.join("link")), "{g:?}");
        assert!(g.whole.contains(&root.join("plain")));
        // Whatever the walk said, no granted path really is (or holds) a denied one.
        for p in &g.whole {
            let real = std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
            assert!(safe_to_grant(&real, &deny), "{p:?} -> {real:?}");
        }
        assert!(!safe_to_grant(&root.join("cfg"), &deny));
        assert!(!safe_to_grant(&root.join("cfg/k.toml"), &deny));
        assert!(safe_to_grant(&root.join("plain"), &deny));
    }

    #[test]
    fn a_denied_path_that_does_not_exist_yet_stays_denied_and_its_parent_listable_only() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir(root.join("state")).unwrap();
        std::fs::write(root.join("state/other"), "").unwrap();
        let missing = dir.path().join("state/audit/events.jsonl");
        let resolved = resolve(&missing);
        assert_eq!(resolved, root.join("state/audit/events.jsonl"));
        let g = grants(&[resolved], &[]);
        assert!(g.ancestors.contains(&root.join("state")));
        assert!(!g.whole.contains(&root.join("state")));
        assert!(g.whole.contains(&root.join("state/other")));
    }

    #[test]
    fn programs_keygate_runs_are_granted_read_only_and_their_neighbours_whole() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir(root.join("bin")).unwrap();
        std::fs::write(root.join("bin/fetch-key"), "").unwrap();
        std::fs::write(root.join("bin/tool"), "").unwrap();
        let g = grants(&[], &[root.join("bin/fetch-key")]);
        assert_eq!(g.read_only, vec![root.join("bin/fetch-key")]);
        assert!(!g.whole.contains(&root.join("bin/fetch-key")));
        assert!(g.whole.contains(&root.join("bin/tool")));
        assert!(g.ancestors.contains(&root.join("bin")));
    }

    #[test]
    fn explicit_sandbox_demands_filesystem_and_tcp_rules_and_names_them_when_missing() {
        assert!(REQUIRED_ABI >= ABI::V4, "TCP connect rules came with ABI 4");
        // Each level demanded either holds or is refused with a message that says what is
        // missing; once one is refused, every higher one is too.
        let levels = [ABI::V1, ABI::V4, ABI::V6, ABI::V9, ABI::V10];
        let mut refused = false;
        for abi in levels {
            match demand(abi) {
                Ok(()) => assert!(!refused, "{abi:?} held after a lower level was refused"),
                Err(m) => {
                    refused = true;
                    assert!(m.contains("does not support Landlock"), "{m}");
                    assert!(m.contains("--sandbox"), "{m}");
                }
            }
        }
    }
}
