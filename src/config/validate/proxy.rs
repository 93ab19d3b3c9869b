//! The forward proxy's keys: `proxy_listen` (loopback only), `egress`, `egress_allow`,
//! `egress_connect`, `proxy_ports`, and a route's `host` and `upstream_ca`.

use std::net::SocketAddr;
use std::path::PathBuf;

use super::Cx;
use crate::config::spec::{ProxySpec, RouteSpec};
use crate::config::{ConfigError, Egress, ProxySettings, Route};
use crate::proxy::connect::{host_name, NameError};

pub(super) fn settings(cx: &Cx, p: &ProxySpec) -> Result<ProxySettings, ConfigError> {
    let mut listen = Vec::new();
    if let Some(l) = &p.listen {
        for a in &l.value {
            match a.parse::<SocketAddr>() {
                Ok(addr) if addr.ip().is_loopback() => listen.push(addr),
                Ok(addr) => {
                    return cx.err(
                        &l.pos,
                        format!(
                            "{addr}: the forward proxy listens on loopback only (127.0.0.1:PORT)"
                        ),
                    )
                }
                Err(_) => {
                    return cx.err(&l.pos, format!("{a:?} is not IP:PORT, e.g. 127.0.0.1:8792"))
                }
            }
        }
    }
    let egress = match &p.egress {
        None => Egress::Deny,
        Some(e) if e.value == "deny" => Egress::Deny,
        Some(e) if e.value == "tunnel" => Egress::Tunnel,
        Some(e) => return cx.err(&e.pos, "egress must be \"deny\" or \"tunnel\""),
    };
    let mut egress_allow = Vec::new();
    for a in &p.egress_allow {
        let (wild, name) = match a.value.strip_prefix("*.") {
            Some(rest) => ("*.", rest),
            None => ("", a.value.as_str()),
        };
        match host_name(name) {
            Ok(h) => egress_allow.push(format!("{wild}{h}")),
            Err(why) => return cx.err(&a.pos, format!("{:?}: {}", a.value, name_problem(&why))),
        }
    }
    let mut egress_connect = Vec::new();
    for c in &p.egress_connect {
        let (host, addr) = &c.value;
        let host = host_name(host)
            .or_else(|why| cx.err(&c.pos, format!("{host:?}: {}", name_problem(&why))))?;
        let addr: SocketAddr = addr
            .parse()
            .or_else(|_| cx.err(&c.pos, format!("{addr:?} is not IP:PORT")))?;
        egress_connect.push((host, addr));
    }
    let ports = match &p.ports {
        Some(ports) if ports.value.is_empty() || ports.value.contains(&0) => {
            return cx.err(&ports.pos, "proxy_ports lists ports from 1 to 65535")
        }
        Some(ports) => ports.value.clone(),
        None => vec![443],
    };
    Ok(ProxySettings {
        listen,
        egress,
        egress_allow,
        egress_connect,
        ports,
    })
}

fn name_problem(why: &NameError) -> &'static str {
    match why {
        NameError::Malformed => "not a DNS host name",
        NameError::IpLiteral => "an IP address; name the host",
        NameError::Loopback => "a name for this machine, which keygate never proxies to",
    }
}

/// A route's `host` (checked, lower case) and `upstream_ca`; a route needs a prefix, a host,
/// or both.
pub(super) fn route_keys(
    cx: &Cx,
    r: &RouteSpec,
) -> Result<(Option<String>, Option<PathBuf>), ConfigError> {
    let host = match &r.proxy.host {
        Some(h) => Some(
            host_name(&h.value)
                .or_else(|why| cx.err(&h.pos, format!("{:?}: {}", h.value, name_problem(&why))))?,
        ),
        None => None,
    };
    if host.is_none() && r.prefix.value.is_empty() {
        return cx.err(
            &r.prefix.pos,
            "a route needs prefix = \"/name\" (base URL) or host = \"api.example.com\" (forward proxy)",
        );
    }
    if r.upstream.value.is_empty() {
        return cx.err(&r.upstream.pos, "a route needs upstream = \"https://…\"");
    }
    let ca = r.proxy.upstream_ca.as_ref().map(|c| c.value.clone());
    if let (Some(ca), Some(pos)) = (&ca, r.proxy.upstream_ca.as_ref().map(|c| &c.pos)) {
        if !ca.is_file() {
            return cx.err(pos, format!("{} is not a readable file", ca.display()));
        }
    }
    Ok((host, ca))
}

/// Two routes for one host would make the forward proxy guess.
pub(super) fn unique_host(
    cx: &Cx,
    spec: &RouteSpec,
    route: &Route,
    before: &[Route],
) -> Result<(), ConfigError> {
    let Some(host) = &route.host else {
        return Ok(());
    };
    match (
        before.iter().find(|b| b.host.as_ref() == Some(host)),
        &spec.proxy.host,
    ) {
        (Some(b), Some(h)) => cx.err(
            &h.pos,
            format!("host {host} is already served by route {}", b.name),
        ),
        _ => Ok(()),
    }
}
