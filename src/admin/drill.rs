//! `keygate drill revoke`: what would stop working if an agent, a secret or a route were
//! revoked, read from the config, the token store and the recent audit log. Changes nothing.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};

use crate::config::Config;

/// What to revoke, in the drill.
#[derive(Clone, Debug)]
pub enum Target {
    /// The agent with this name in the config.
    Agent(String),
    /// The secret with this id in the config.
    Secret(String),
    /// The route with this name in the config.
    Route(String),
}

/// The drill's findings.
pub fn drill(
    config: &Config,
    target: &Target,
    audit_log: &Path,
    since: Duration,
) -> Result<Value, String> {
    let may_use = |agent: &crate::config::Agent, route: &str| {
        agent
            .routes
            .as_ref()
            .is_none_or(|rs| rs.iter().any(|r| config.routes[*r].name == route))
    };
    // The routes that stop working, and for whom.
    let (routes, agents): (Vec<String>, Vec<String>) = match target {
        Target::Agent(a) => {
            let Some(agent) = config.agents.iter().find(|x| &x.name == a) else {
                return Err(format!("no [agents.{a}] in {}", config.file.display()));
            };
            let routes = config
                .routes
                .iter()
                .filter(|r| may_use(agent, &r.name))
                .map(|r| r.name.clone())
                .collect();
            (routes, vec![a.clone()])
        }
        Target::Secret(s) => {
            if !config.secrets.iter().any(|x| &x.name == s) {
                return Err(format!("no [secrets.{s}] in {}", config.file.display()));
            }
            let routes: Vec<String> = config
                .routes
                .iter()
                .filter(|r| config.secret_of(r).is_some_and(|x| &x.name == s))
                .map(|r| r.name.clone())
                .collect();
            let agents = config
                .agents
                .iter()
                .filter(|a| routes.iter().any(|r| may_use(a, r)))
                .map(|a| a.name.clone())
                .collect();
            (routes, agents)
        }
        Target::Route(r) => {
            if !config.routes.iter().any(|x| &x.name == r) {
                return Err(format!("no [routes.{r}] in {}", config.file.display()));
            }
            let agents = config
                .agents
                .iter()
                .filter(|a| may_use(a, r))
                .map(|a| a.name.clone())
                .collect();
            (vec![r.clone()], agents)
        }
    };
    // Agents left with no route at all stop working entirely, and so do their tokens.
    let dead_agents: Vec<&String> = agents
        .iter()
        .filter(|a| match target {
            Target::Agent(_) => true,
            _ => config
                .agents
                .iter()
                .find(|x| &&x.name == a)
                .is_some_and(|x| {
                    config
                        .routes
                        .iter()
                        .filter(|r| may_use(x, &r.name))
                        .all(|r| routes.contains(&r.name))
                }),
        })
        .collect();
    let now = crate::authenticate::store::now();
    let shared = matches!(config.state, crate::config::StateBackend::Redis(_));
    let tokens: Vec<Value> = match &config.state_dir {
        _ if shared => crate::authenticate::store::open_for(config)
            .and_then(|s| Ok(s.tokens()?))
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter(|t| !t.revoked && t.expires > now && dead_agents.contains(&&t.agent))
            .map(|t| json!({"id": t.id, "agent": t.agent}))
            .collect(),
        Some(dir) => crate::authenticate::store::read(dir)
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter(|t| !t.revoked && t.expires > now && dead_agents.contains(&&t.agent))
            .map(|t| json!({"id": t.id, "agent": t.agent}))
            .collect(),
        None => Vec::new(),
    };
    let env_tokens: Vec<Value> = config
        .agents
        .iter()
        .filter(|a| dead_agents.contains(&&a.name))
        .filter_map(|a| {
            a.token_env
                .as_ref()
                .map(|e| json!({"agent": a.name, "token_env": e}))
        })
        .collect();

    // Requests in the recent audit that the revocation would have refused.
    let cutoff = SystemTime::now()
        .checked_sub(since)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let mut groups: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut total = 0u64;
    let mut scanned = 0u64;
    match std::fs::File::open(audit_log) {
        Ok(f) => {
            for line in std::io::BufReader::new(f).lines() {
                let Ok(line) = line else { break };
                let Ok(r) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if r.get("request_id").is_none() {
                    continue;
                }
                let recent = r["time"]
                    .as_str()
                    .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
                    .is_some_and(|t| t >= cutoff);
                if !recent {
                    continue;
                }
                scanned += 1;
                if r["decision"] != "allow" {
                    continue;
                }
                let (Some(agent), Some(route)) = (r["agent"].as_str(), r["route"].as_str()) else {
                    continue;
                };
                let hit = match target {
                    Target::Agent(a) => agent == a,
                    _ => routes.iter().any(|x| x == route) && agents.iter().any(|x| x == agent),
                };
                if hit {
                    *groups
                        .entry((agent.to_string(), route.to_string()))
                        .or_default() += 1;
                    total += 1;
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{}: {e}", audit_log.display())),
    }
    let (kind, name) = match target {
        Target::Agent(a) => ("agent", a),
        Target::Secret(s) => ("secret", s),
        Target::Route(r) => ("route", r),
    };
    Ok(json!({
        "ok": true,
        "drill": "revoke",
        "target": {"kind": kind, "name": name},
        "changes_made": false,
        "routes": routes,
        "agents": agents,
        "agents_stopped_entirely": dead_agents,
        "tokens": tokens,
        "env_tokens": env_tokens,
        "since": humantime::format_duration(since).to_string(),
        "audit_log": audit_log,
        "requests_scanned": scanned,
        "requests_would_be_refused": total,
        "by_agent_route": groups.iter().map(|((a, r), n)| json!({"agent": a, "route": r, "requests": n})).collect::<Vec<_>>(),
    }))
}

/// `keygate drill revoke`: prints what would break; exits 2 on a usage or config error.
pub fn main(args: crate::cli::DrillArgs) -> ExitCode {
    let crate::cli::DrillCommand::Revoke {
        config,
        agent,
        secret,
        route,
        since,
        json: json_out,
        audit_log,
    } = args;
    let target = match (agent, secret, route) {
        (Some(a), None, None) => Target::Agent(a),
        (None, Some(s), None) => Target::Secret(s),
        (None, None, Some(r)) => Target::Route(r),
        _ => {
            eprintln!("keygate: say exactly one of --agent A, --secret S, --route R");
            return ExitCode::from(2);
        }
    };
    let cfg = match Config::load(&config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("keygate: {e}");
            return ExitCode::from(2);
        }
    };
    let since = match crate::config::parse_duration(&since) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("keygate: --since: {e}");
            return ExitCode::from(2);
        }
    };
    let log = audit_log.unwrap_or_else(|| cfg.audit_log.clone());
    match drill(&cfg, &target, &log, since) {
        Ok(v) => {
            if json_out {
                println!("{v}");
            } else {
                print(&v);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("keygate: {e}");
            ExitCode::from(2)
        }
    }
}

fn print(v: &Value) {
    let list = |k: &str| -> String {
        let items: Vec<String> = v[k]
            .as_array()
            .into_iter()
            .flatten()
            .map(|x| x.as_str().unwrap_or("").to_string())
            .collect();
        if items.is_empty() {
            "(none)".into()
        } else {
            items.join(", ")
        }
    };
    println!(
        "drill: revoke {} {} (nothing was changed)",
        v["target"]["kind"].as_str().unwrap_or(""),
        v["target"]["name"].as_str().unwrap_or("")
    );
    println!("routes that stop working:   {}", list("routes"));
    println!("agents affected:            {}", list("agents"));
    println!(
        "agents stopped entirely:    {}",
        list("agents_stopped_entirely")
    );
    let tokens: Vec<String> = v["tokens"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            format!(
                "{} ({})",
                t["id"].as_str().unwrap_or(""),
                t["agent"].as_str().unwrap_or("")
            )
        })
        .collect();
    println!(
        "issued tokens that stop:    {}",
        if tokens.is_empty() {
            "(none)".into()
        } else {
            tokens.join(", ")
        }
    );
    println!(
        "in the last {}: {} of {} requests would have been refused",
        v["since"].as_str().unwrap_or(""),
        v["requests_would_be_refused"],
        v["requests_scanned"]
    );
    for g in v["by_agent_route"].as_array().into_iter().flatten() {
        println!(
            "  {:<16} {:<16} {}",
            g["agent"].as_str().unwrap_or(""),
            g["route"].as_str().unwrap_or(""),
            g["requests"]
        );
    }
}
