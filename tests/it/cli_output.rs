//! Output commands in a pipeline whose reader has gone.

use std::process::Stdio;

use crate::support::*;

#[test]
fn check_into_a_closed_pipe_ends_quietly_instead_of_panicking() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("k.toml");
    std::fs::write(
        &config,
        "listen = [\"127.0.0.1:0\"]\nmode = \"dry_run\"\n\n[routes.r]\nprefix = \"/r\"\nupstream = \"http://127.0.0.1:9\"\nallow = [\"POST /v1/x\"]\n",
    )
    .unwrap();
    // Both pipeline ends exist before keygate starts and the reading end is closed first, so
    // keygate's first write meets EPIPE every time (no race with a reader that exits later).
    let (read, write) = nix::unistd::pipe().unwrap();
    drop(read);
    let out = keygate()
        .args(["check", "--json", "--config"])
        .arg(&config)
        .stdout(Stdio::from(write))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(141), "{stderr}");

    // Benign neighbour: the same command into a reader that stays prints its policy.
    let out = keygate()
        .args(["check", "--json", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.stdout.is_empty());
}
