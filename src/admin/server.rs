//! The admin socket: HTTP/1.1 over a Unix socket (mode 0600) that only keygate's own uid may
//! use. The peer uid of each connection is the person recorded as acting.
//!
//! `GET /status`, `GET /metrics`, `GET /approvals`, `POST /reload`, `POST /freeze`,
//! `POST /unfreeze`, `POST /approve`, `POST /deny`; bodies are small JSON objects.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio::net::UnixListener;
use tokio::sync::watch;

use super::peer::{Peer, Refusal};
use crate::authorize::approval::Verdict;
use crate::reload::Live;

/// Largest admin request body.
const MAX_BODY: usize = 64 * 1024;

/// Binds the admin socket, owner-only. A socket left by a keygate that is gone is replaced; one
/// a running keygate still answers on is not taken over.
pub fn bind(path: &Path) -> Result<UnixListener, String> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let fail = |e: &dyn std::fmt::Display| format!("admin socket {}: {e}", path.display());
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::create_dir_all(dir).map_err(|e| fail(&e))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| fail(&e))?;
        }
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(fail(&"a file that is not a socket is there"));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(fail(&"another keygate is listening there"));
        }
        std::fs::remove_file(path).map_err(|e| fail(&e))?;
    }
    // Created owner-only: the umask is narrowed around bind(2), so the socket is never, even
    // briefly, reachable by another user.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let l = bound.map_err(|e| fail(&e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|e| fail(&e))?;
    Ok(l)
}

/// Serves admin connections until `shutdown`, then removes the socket.
pub async fn run(
    listener: UnixListener,
    path: PathBuf,
    live: Arc<Live>,
    mut shutdown: watch::Receiver<bool>,
) {
    let own = nix::unistd::geteuid().as_raw();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            a = listener.accept() => a,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (uid, pid) = match stream.peer_cred() {
            Ok(c) => (c.uid(), c.pid()),
            Err(_) => continue,
        };
        // Checked when the connection is accepted (while the connecting process surely runs)
        // and again for each request: both must pass.
        let peer = Arc::new(Peer::of(&stream, pid));
        let at_accept = peer.check();
        let live = live.clone();
        let svc = service_fn(move |req| {
            let live = live.clone();
            let peer = peer.clone();
            async move {
                let verdict = at_accept.and_then(|()| peer.check());
                Ok::<_, Infallible>(answer(&live, uid, pid, verdict, own, req).await)
            }
        });
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades();
            // Approvals and reloads answer within seconds; nothing here streams.
            let _ = tokio::time::timeout(Duration::from_secs(120), conn).await;
        });
    }
    let _ = std::fs::remove_file(&path);
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string() + "\n")));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn refuse(status: StatusCode, message: impl Into<String>) -> Response<Full<Bytes>> {
    reply(status, json!({"ok": false, "error": message.into()}))
}

async fn answer(
    live: &Arc<Live>,
    uid: u32,
    pid: Option<i32>,
    peer: Result<(), Refusal>,
    own: u32,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    if uid != own {
        tracing::warn!(uid, "admin socket: refused a connection from another user");
        return refuse(
            StatusCode::FORBIDDEN,
            format!("uid {uid} may not use this keygate's admin socket; only uid {own} may"),
        );
    }
    // An agent sandboxed by `keygate run` runs as this uid; no_new_privs, which it can never
    // drop, tells it apart (Landlock checks connecting to a socket file only from ABI 9). A
    // peer that cannot be told apart is refused too.
    if let Err(why) = peer {
        tracing::warn!(?pid, ?why, "admin socket: refused a process");
        return refuse(StatusCode::FORBIDDEN, why.message());
    }
    let by = super::person(uid);
    let (mut head, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return refuse(StatusCode::PAYLOAD_TOO_LARGE, "admin request too large"),
    };
    let args: Value = if body.is_empty() {
        json!({})
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("not JSON: {e}")),
        }
    };
    let state = live.state.load_full();
    let control = state.control.clone();
    let event = |event: &str, extra: Value| {
        let mut rec = json!({
            "time": crate::audit::now_rfc3339(),
            "event": event,
            "by": by,
            "peer_uid": uid,
            "policy_version": state.policy_version,
        });
        if let Some(i) = &control.instance {
            rec["instance"] = i.clone().into();
        }
        if let (Some(m), Value::Object(x)) = (rec.as_object_mut(), extra) {
            m.extend(x);
        }
        rec
    };
    let audit = state.audit.clone();
    let write = |rec: Value| async move {
        let a = audit.clone();
        tokio::task::spawn_blocking(move || a.event(&rec))
            .await
            .unwrap_or_else(|e| Err(e.to_string()))
    };
    match (head.method.clone(), head.uri.path()) {
        (Method::POST, "/lease") => {
            let upgrade = head.extensions.remove::<hyper::upgrade::OnUpgrade>();
            crate::launcher::lease::open(live.clone(), upgrade, uid, pid, &args).await
        }
        (Method::GET, "/status") => reply(StatusCode::OK, super::client::status_json(&state)),
        (Method::GET, "/metrics") => {
            let budgets: Vec<(String, Option<(u64, u64)>)> = state
                .config
                .agents
                .iter()
                .map(|a| a.name.clone())
                .zip(state.policy.budget_usage())
                .collect();
            let text = control.metrics.render(
                &budgets,
                control.approvals.pending_count(),
                control.frozen().all.is_some(),
            );
            let mut r = Response::new(Full::new(Bytes::from(text)));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        (Method::GET, "/approvals") => {
            let approvals = control.approvals.clone();
            // Pending approvals of other keygates are read from a shared store (a blocking call).
            let pending = tokio::task::spawn_blocking(move || {
                let mut all = approvals.list();
                all.extend(approvals.list_elsewhere());
                all
            })
            .await
            .unwrap_or_default();
            reply(StatusCode::OK, json!({"ok": true, "pending": pending}))
        }
        (Method::POST, "/reload") => match live.reload(&by).await {
            Ok(v) => reply(StatusCode::OK, json!({"ok": true, "policy_version": v})),
            Err(e) => refuse(StatusCode::UNPROCESSABLE_ENTITY, e),
        },
        (Method::POST, p @ ("/freeze" | "/unfreeze")) => {
            let on = p == "/freeze";
            let agent = args["agent"].as_str().map(str::to_string);
            if let Some(a) = &agent {
                if !state.config.agents.iter().any(|x| &x.name == a) {
                    return refuse(StatusCode::NOT_FOUND, format!("no agent {a} in the config"));
                }
            }
            let saved = control.set_frozen(agent.as_deref(), on, &by);
            let name = if on { "freeze" } else { "unfreeze" };
            if let Err(e) = write(event(name, json!({"agent": agent}))).await {
                tracing::error!(error = %e, "cannot audit a freeze");
            }
            let mut v = json!({"ok": true, "frozen": *control.frozen()});
            if let Err(e) = saved {
                v["warning"] = e.into();
            }
            reply(StatusCode::OK, v)
        }
        (Method::POST, p @ ("/approve" | "/deny")) => {
            let Some(id) = args["id"].as_str() else {
                return refuse(StatusCode::BAD_REQUEST, "say which approval: {\"id\": …}");
            };
            let reason = args["reason"].as_str().map(str::to_string);
            let verdict = if p == "/approve" {
                Verdict::Approved { by: by.clone() }
            } else {
                Verdict::Denied {
                    by: by.clone(),
                    reason: reason.clone(),
                }
            };
            let decided = match control.approvals.decide(id, verdict.clone()) {
                Some(info) => Some(serde_json::to_value(&info).unwrap_or_default()),
                None => {
                    // Another keygate sharing the store may hold the request.
                    let (approvals, id2, v) =
                        (control.approvals.clone(), id.to_string(), verdict.clone());
                    match tokio::task::spawn_blocking(move || approvals.decide_elsewhere(&id2, &v))
                        .await
                    {
                        Ok(Ok(found)) => found,
                        Ok(Err(e)) => {
                            return refuse(
                                StatusCode::SERVICE_UNAVAILABLE,
                                format!("cannot reach the shared state store: {e}"),
                            )
                        }
                        Err(_) => None,
                    }
                }
            };
            match decided {
                Some(info) => {
                    let name = if p == "/approve" { "approve" } else { "deny" };
                    let rec = event(
                        name,
                        json!({"approval_id": id, "request_id": info["request_id"], "agent": info["agent"], "route": info["route"], "held_by": info["instance"], "reason": reason}),
                    );
                    // The request record carries `approved_by` too; this one says when.
                    let mut rec = rec;
                    if let Some(m) = rec.as_object_mut() {
                        // A control record must not look like a request record to readers that
                        // count records with a request_id.
                        if let Some(r) = m.remove("request_id") {
                            m.insert("for_request".into(), r);
                        }
                    }
                    if let Err(e) = write(rec).await {
                        tracing::error!(error = %e, "cannot audit a decision");
                    }
                    reply(StatusCode::OK, json!({"ok": true, "approval": info}))
                }
                None => refuse(
                    StatusCode::NOT_FOUND,
                    format!("no pending approval {id} (decided already, timed out, or its request went away)"),
                ),
            }
        }
        _ => refuse(StatusCode::NOT_FOUND, "unknown admin request"),
    }
}
