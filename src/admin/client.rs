//! The admin commands' side of the admin socket, and what `status` reports.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

use crate::config::Config;
use crate::pipeline::State;

/// How long an admin command waits for keygate (a reload re-reads the config; nothing takes
/// longer).
const TIMEOUT: Duration = Duration::from_secs(30);

/// What `keygate status` shows. Secrets by name, source and key id; never a value.
pub fn status_json(state: &State) -> Value {
    let config = &state.config;
    let control = &state.control;
    let frozen = control.frozen();
    let usage = state.policy.budget_usage();
    let agents: Vec<Value> = config
        .agents
        .iter()
        .zip(usage)
        .map(|(a, b)| {
            json!({
                "name": a.name,
                "person": a.person,
                "routes": a.routes.as_ref().map(|rs| rs.iter().map(|r| &config.routes[*r].name).collect::<Vec<_>>()),
                "unix_uids": a.unix_uids,
                "frozen": frozen.all.is_some() || frozen.agents.contains_key(&a.name),
                "budget": b.map(|(spent, limit)| json!({"spent": spent, "limit": limit})),
            })
        })
        .collect();
    let routes: Vec<Value> = config
        .routes
        .iter()
        .map(|r| {
            json!({
                "name": r.name,
                "prefix": r.prefix,
                "upstream": r.upstream.url,
                "secret": config.secret_of(r).map(|s| &s.name),
                "approval": r.approval,
            })
        })
        .collect();
    json!({
        "ok": true,
        "pid": std::process::id(),
        "version": env!("CARGO_PKG_VERSION"),
        "config": config.file,
        "policy_version": state.policy_version,
        "mode": config.mode,
        "listeners": state.listen_urls,
        "admin_socket": control.admin_socket.get(),
        "state_store": control.store.as_ref().map(|s| s.location()),
        "state": control.store.as_ref().map(|s| {
            let mut h = serde_json::to_value(s.health()).unwrap_or_default();
            h["location"] = s.location().into();
            h["shared"] = s.shared().into();
            h["instance"] = s.instance().into();
            h
        }),
        "instance": control.instance,
        "frozen": *frozen,
        "routes": routes,
        "agents": agents,
        "secrets": state.credentials.describe(),
        "pending_approvals": control.approvals.list(),
        "audit": {"path": state.audit.path(), "healthy": state.audit.healthy()},
    })
}

/// Why an admin command could not get an answer.
#[derive(Debug)]
pub enum CallError {
    /// No keygate listens on the admin socket.
    NotRunning(PathBuf),
    /// Anything else (socket I/O, a malformed answer), described for the person.
    Other(String),
}

/// Sends one admin request to the keygate running with `config`; returns its status and JSON.
pub fn call(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<(u16, Bytes), CallError> {
    let sock = sock.to_path_buf();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CallError::Other(e.to_string()))?;
    let method: http::Method = method
        .parse()
        .map_err(|_| CallError::Other("bad method".into()))?;
    rt.block_on(async {
        let stream = match tokio::net::UnixStream::connect(&sock).await {
            Ok(s) => s,
            Err(e) => {
                return Err(match e.kind() {
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                        CallError::NotRunning(sock.clone())
                    }
                    _ => CallError::Other(format!("admin socket {}: {e}", sock.display())),
                })
            }
        };
        let exchange = async {
            let (mut send, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            let bytes = body.map(|b| b.to_string()).unwrap_or_default();
            let req = http::Request::builder()
                .method(method)
                .uri(path)
                .header(http::header::HOST, "keygate-admin")
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(bytes)))
                .map_err(|e| CallError::Other(e.to_string()));
            let req = match req {
                Ok(r) => r,
                Err(e) => return Ok(Err(e)),
            };
            let resp = send.send_request(req).await?;
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>(Ok((status, body)))
        };
        match tokio::time::timeout(TIMEOUT, exchange).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(CallError::Other(format!(
                "admin socket {}: {e}",
                sock.display()
            ))),
            Err(_) => Err(CallError::Other(format!(
                "keygate did not answer on {} within {}s",
                sock.display(),
                TIMEOUT.as_secs()
            ))),
        }
    })
}

fn fail(code: u8, msg: &str) -> ExitCode {
    eprintln!("keygate: {msg}");
    ExitCode::from(code)
}

/// Runs one admin request and prints the answer; `show` renders a successful answer as text.
pub fn run(
    config_path: &Path,
    method: &str,
    path: &str,
    body: Option<Value>,
    json_out: bool,
    show: impl FnOnce(&Value),
) -> ExitCode {
    let loaded = Config::load(config_path);
    let sock = match &loaded {
        Ok(c) => super::socket_path(c),
        // A config being edited may not load; the running keygate is still reachable (and a
        // `reload` of it reaches keygate, which refuses it there and audits that).
        Err(e) => match super::socket_path_lenient(config_path) {
            Some(s) => Some(s),
            None => return fail(2, &e.to_string()),
        },
    };
    let Some(sock) = sock else {
        return fail(
            2,
            "no state directory: set state_dir or admin_socket in the config",
        );
    };
    let freeze = matches!(path, "/freeze" | "/unfreeze");
    let args = body.clone();
    match call(&sock, method, path, body) {
        Err(CallError::NotRunning(_)) if freeze && loaded.is_ok() => {
            // A freeze is wanted most when something is wrong; with keygate stopped it is saved
            // in the store and holds from its next start.
            let Ok(config) = &loaded else {
                return fail(2, "config");
            };
            offline_freeze(config, path == "/freeze", args.unwrap_or_default())
        }
        Ok((status, bytes)) => {
            let v: Value = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                json!({"ok": (200..300).contains(&status), "text": String::from_utf8_lossy(&bytes)})
            });
            if !(200..300).contains(&status) {
                if json_out {
                    println!("{v}");
                }
                let msg = v["error"].as_str().unwrap_or("admin request refused");
                return fail(1, msg);
            }
            if json_out {
                println!("{v}");
            } else {
                show(&v);
            }
            ExitCode::SUCCESS
        }
        Err(CallError::NotRunning(sock)) => fail(
            1,
            &format!(
                "keygate is not running for {} (nothing listens on its admin socket {}); start it with `keygate serve --config {}`",
                config_path.display(),
                sock.display(),
                config_path.display()
            ),
        ),
        Err(CallError::Other(e)) => fail(1, &e),
    }
}

fn offline_freeze(config: &Config, on: bool, args: Value) -> ExitCode {
    let store = match crate::state::open_configured(config) {
        Ok(Some(s)) => s,
        Ok(None) => return fail(2, "no state directory: set state_dir in the config"),
        Err(e) => return fail(1, &e.to_string()),
    };
    let dir = store.location();
    let agent = args["agent"].as_str();
    let by = super::person(nix::unistd::geteuid().as_raw());
    match store.set_freeze(agent, on, &by) {
        Ok(()) => {
            let what = agent.map_or("everything".to_string(), |a| format!("agent {a}"));
            let verb = if on { "frozen" } else { "unfrozen" };
            println!("{verb}: {what}");
            eprintln!(
                "keygate: keygate is not running; saved in {dir}, it holds from the next start (at once for keygates sharing that store)"

            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, &e.to_string()),
    }
}

/// Human-readable `status`.
pub fn print_status(v: &Value) {
    let s = |v: &Value| v.as_str().unwrap_or("-").to_string();
    println!(
        "keygate {} (pid {}), policy {}",
        s(&v["version"]),
        v["pid"],
        s(&v["policy_version"])
    );
    println!("config      {}", s(&v["config"]));
    let listeners: Vec<String> = v["listeners"]
        .as_array()
        .map(|a| a.iter().map(s).collect())
        .unwrap_or_default();
    println!("listeners   {}", listeners.join(", "));
    println!("admin       {}", s(&v["admin_socket"]));
    println!("state       {}", s(&v["state_store"]));
    if v["state"]["shared"].as_bool() == Some(true) {
        let st = &v["state"];
        let link = if st["connected"].as_bool() == Some(true) {
            "connected".to_string()
        } else {
            format!(
                "UNREACHABLE, reconnecting by itself (last error: {})",
                s(&st["last_error"])
            )
        };
        println!(
            "            instance {}, {link}, reconnected {} time(s)",
            s(&st["instance"]),
            st["reconnects"]
        );
    }
    let audit_ok = v["audit"]["healthy"].as_bool().unwrap_or(false);
    println!(
        "audit       {} ({})",
        s(&v["audit"]["path"]),
        if audit_ok { "healthy" } else { "FAILING" }
    );
    let frozen_all = !v["frozen"]["all"].is_null();
    println!(
        "frozen      {}",
        if frozen_all { "EVERYTHING" } else { "no" }
    );
    println!("routes:");
    for r in v["routes"].as_array().into_iter().flatten() {
        println!(
            "  {:<12} {:<14} -> {}  secret {}",
            s(&r["name"]),
            s(&r["prefix"]),
            s(&r["upstream"]),
            s(&r["secret"])
        );
    }
    println!("agents:");
    for a in v["agents"].as_array().into_iter().flatten() {
        let budget = match a["budget"].as_object() {
            Some(b) => format!("  budget {}/{}", b["spent"], b["limit"]),
            None => String::new(),
        };
        let fz = if a["frozen"].as_bool().unwrap_or(false) {
            "  FROZEN"
        } else {
            ""
        };
        println!("  {}{fz}{budget}", s(&a["name"]));
    }
    println!("secrets:");
    for x in v["secrets"].as_array().into_iter().flatten() {
        println!(
            "  {:<12} {:<24} key {}  fetched {}  expires {}",
            s(&x["name"]),
            s(&x["source"]),
            s(&x["key_id"]),
            s(&x["last_fetch"]),
            s(&x["expires"])
        );
    }
    let pending = v["pending_approvals"].as_array().map(Vec::len).unwrap_or(0);
    println!("pending approvals: {pending}");
}

/// Human-readable `approvals list`.
pub fn print_approvals(v: &Value) {
    let rows = v["pending"].as_array().cloned().unwrap_or_default();
    if rows.is_empty() {
        println!("no pending approvals");
        return;
    }
    for r in rows {
        let s = |k: &str| match &r[k] {
            Value::Null => "-".to_string(),
            Value::String(x) => x.clone(),
            other => other.to_string(),
        };
        println!(
            "{}  {} ({})  {}  {} {}  model {}  {} bytes  {}s",
            s("id"),
            s("agent"),
            s("person"),
            s("route"),
            s("method"),
            s("path"),
            s("model"),
            s("body_bytes"),
            s("age_seconds")
        );
    }
}
