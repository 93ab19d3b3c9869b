//! Who is on the other end of an admin connection: a process of keygate's uid that is not in
//! `keygate run`'s sandbox may act; anything else, or anything that cannot be told, may not.
//!
//! The peer is the process that called `connect`, pinned by a pidfd (`SO_PEERPIDFD`) taken at
//! accept time, so the check never lands on a recycled pid. A sandboxed process could connect,
//! fork a child that inherits the socket and exit: its child is not the peer, and with the
//! peer gone every request is refused (fail closed), as it is when the peer is sandboxed
//! (`no_new_privs`, which it cannot clear) or its status cannot be read. Kernels without
//! `SO_PEERPIDFD` (before 6.5) fall back to the connect-time pid, still failing closed.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use crate::launcher::sandbox::no_new_privs;

/// The process that connected to the admin socket.
#[derive(Debug)]
pub(crate) struct Peer {
    pid: Option<i32>,
    pidfd: Option<OwnedFd>,
}

/// Why a peer may not use the admin socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The peer has `no_new_privs` set: an agent in `keygate run`'s sandbox.
    Sandboxed,
    /// The peer's process cannot be found or read (it exited, or no pid came with it).
    Unknown,
}

impl Refusal {
    /// The message the refused caller reads.
    pub(crate) fn message(self) -> &'static str {
        match self {
            Refusal::Sandboxed => {
                "a process with no_new_privs set (an agent in keygate run's sandbox) may not use the admin socket"
            }
            Refusal::Unknown => {
                "the process that opened this admin connection is gone or cannot be checked; connect from the process that asks"
            }
        }
    }
}

impl Peer {
    /// The peer of an accepted connection, with `pid` from its credentials.
    pub(crate) fn of(stream: &impl AsFd, pid: Option<i32>) -> Peer {
        let pidfd = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerPidfd).ok();
        Peer { pid, pidfd }
    }

    /// Whether the peer may act now: still running, and not sandboxed.
    pub(crate) fn check(&self) -> Result<(), Refusal> {
        let sandboxed = match &self.pidfd {
            Some(fd) => {
                let pid = pidfd_pid(fd).ok_or(Refusal::Unknown)?;
                let nnp = no_new_privs(pid).ok_or(Refusal::Unknown)?;
                // Still the same live process after the read: the status read was its own.
                if pidfd_pid(fd) != Some(pid) {
                    return Err(Refusal::Unknown);
                }
                nnp
            }
            None => no_new_privs(self.pid.ok_or(Refusal::Unknown)?).ok_or(Refusal::Unknown)?,
        };
        if sandboxed {
            Err(Refusal::Sandboxed)
        } else {
            Ok(())
        }
    }
}

/// The pid a pidfd refers to, `None` once its process is gone (`Pid: -1`) or not visible.
fn pidfd_pid(fd: &OwnedFd) -> Option<i32> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
    let pid: i32 = info
        .lines()
        .find_map(|l| l.strip_prefix("Pid:"))?
        .trim()
        .parse()
        .ok()?;
    (pid > 0).then_some(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_whose_process_is_gone_or_unknown_is_refused_and_a_live_one_passes() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let me = Peer::of(&a, Some(std::process::id() as i32));
        // This test process may run with no_new_privs (a sandboxed CI); then it is refused as
        // sandboxed, never as unknown.
        match no_new_privs(std::process::id() as i32) {
            Some(false) => assert_eq!(me.check(), Ok(())),
            _ => assert_eq!(me.check(), Err(Refusal::Sandboxed)),
        }
        let nobody = Peer {
            pid: None,
            pidfd: None,
        };
        assert_eq!(nobody.check(), Err(Refusal::Unknown));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        child.wait().unwrap();
        let gone = Peer {
            pid: Some(pid),
            pidfd: None,
        };
        assert_eq!(gone.check(), Err(Refusal::Unknown));
    }
}
