//! Stage `listen`: accepts connections and hands each request to the pipeline.
//!
//! Input: the configured listeners. Output: requests, each with what is known of its peer
//! ([`Peer`]: the TCP address, or a Unix socket peer's uid and pid from `SO_PEERCRED`).
//! Speaks HTTP/1.1 with keep-alive and HTTP/2 with prior knowledge (h2c), detected per
//! connection. Header size and header read time are bounded, so a slow or huge head cannot tie
//! keygate up.
//!
//! Architecture invariant: TCP listeners are loopback unless config says otherwise (checked in
//! `config`); Unix sockets are created mode 0600.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;

use crate::config::Listen;
use crate::guard::Peer;
use crate::pipeline;
use crate::reload::Live;

/// Largest request head accepted (HTTP/1 buffer, HTTP/2 header list).
const MAX_HEAD_BYTES: usize = 64 * 1024;

pub enum Bound {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Bound {
    pub fn url(&self) -> String {
        match self {
            Bound::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("http://{a}"),
                Err(_) => "http://(unknown)".into(),
            },
            Bound::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }
}

/// Binds every listener, or says which one could not be bound.
pub async fn bind(listen: &[Listen]) -> Result<Vec<Bound>, String> {
    let mut out = Vec::new();
    for l in listen {
        match l {
            Listen::Tcp(addr) => {
                let tl = TcpListener::bind(addr)
                    .await
                    .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
                out.push(Bound::Tcp(tl));
            }
            Listen::Unix(path) => out.push(bind_unix(path)?),
        }
    }
    Ok(out)
}

fn bind_unix(path: &PathBuf) -> Result<Bound, String> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let fail = |e: std::io::Error| format!("cannot listen on unix:{}: {e}", path.display());
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::create_dir_all(dir).map_err(fail)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(fail)?;
        }
    }
    // A socket left by an earlier run is replaced; any other file at that path is not ours.
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path).map_err(fail)?;
        } else {
            return Err(format!(
                "cannot listen on unix:{}: a file that is not a socket is there",
                path.display()
            ));
        }
    }
    let l = UnixListener::bind(path).map_err(fail)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(fail)?;
    Ok(Bound::Unix(l, path.clone()))
}

/// Accepts on every listener until `shutdown` turns true, then lets open connections finish
/// their requests (up to `grace`).
pub async fn run(
    bound: Vec<Bound>,
    state: Arc<Live>,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let graceful = Arc::new(hyper_util::server::graceful::GracefulShutdown::new());
    let mut tasks = tokio::task::JoinSet::new();
    for b in bound {
        let state = state.clone();
        let graceful = graceful.clone();
        let mut stop = shutdown.clone();
        tasks.spawn(async move {
            let name: Arc<str> = b.url().into();
            loop {
                let accepted = tokio::select! {
                    _ = stop.changed() => break,
                    a = accept(&b) => a,
                };
                match accepted {
                    Ok((io, peer)) => {
                        serve_conn(io, Arc::new(peer), name.clone(), state.clone(), &graceful)
                    }
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tracing::warn!(listener = %name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            if let Bound::Unix(_, path) = &b {
                let _ = std::fs::remove_file(path);
            }
        });
    }
    let _ = shutdown.wait_for(|s| *s).await;
    while tasks.join_next().await.is_some() {}
    if let Ok(g) = Arc::try_unwrap(graceful) {
        let _ = tokio::time::timeout(grace, g.shutdown()).await;
    }
}

enum Io {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(b: &Bound) -> std::io::Result<(Io, Peer)> {
    match b {
        Bound::Tcp(l) => {
            let (s, addr) = l.accept().await?;
            let _ = s.set_nodelay(true);
            Ok((Io::Tcp(s), Peer::Tcp(addr)))
        }
        Bound::Unix(l, _) => {
            let (s, _) = l.accept().await?;
            let cred = s.peer_cred()?;
            Ok((
                Io::Unix(s),
                Peer::Unix {
                    uid: cred.uid(),
                    pid: cred.pid(),
                },
            ))
        }
    }
}

fn serve_conn(
    io: Io,
    peer: Arc<Peer>,
    listener: Arc<str>,
    live: Arc<Live>,
    graceful: &hyper_util::server::graceful::GracefulShutdown,
) {
    // Each request takes the state of the moment it arrives and keeps it to its end, so a
    // reload never changes the policy under a request or stream already running.
    let svc = service_fn(move |req| {
        pipeline::handle(live.state.load_full(), peer.clone(), listener.clone(), req)
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .keep_alive(true)
        .max_buf_size(MAX_HEAD_BYTES.max(8192))
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    builder
        .http2()
        .max_header_list_size(MAX_HEAD_BYTES as u32)
        .timer(TokioTimer::new());
    macro_rules! spawn_conn {
        ($stream:expr) => {{
            let conn = builder
                .serve_connection(TokioIo::new($stream), svc)
                .into_owned();
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                // A connection error is the client's (reset, bad framing); nothing to report.
                let _ = conn.await;
            });
        }};
    }
    match io {
        Io::Tcp(s) => spawn_conn!(s),
        Io::Unix(s) => spawn_conn!(s),
    }
}
