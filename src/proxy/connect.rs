//! What a CONNECT (or an absolute-form request) asks for, checked before anything is opened:
//! a well-formed `host:port`, a DNS name (never an IP literal), not keygate itself, a port the
//! config allows. Pure functions, so config load and the listener apply the same rules.

use crate::error::{Code, Rejection};

/// A host name as keygate compares it: lower case, no trailing dot, no port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The DNS name.
    pub host: String,
    /// The port asked for.
    pub port: u16,
}

/// Why a name is not a host keygate serves or tunnels to.
#[derive(Debug, PartialEq, Eq)]
pub enum NameError {
    /// Not a DNS name at all.
    Malformed,
    /// An IPv4 or IPv6 literal, or a name every resolver reads as one (`127.1`, `0x7f.1`).
    IpLiteral,
    /// A name for this machine (`localhost`, `*.localhost`).
    Loopback,
}

/// Checks a host name and returns it in the form keygate compares: lower case, one trailing
/// dot removed.
pub fn host_name(raw: &str) -> Result<String, NameError> {
    if raw.starts_with('[') || raw.contains(':') {
        return Err(NameError::IpLiteral);
    }
    let name = raw.strip_suffix('.').unwrap_or(raw).to_ascii_lowercase();
    if name.is_empty() || name.len() > 253 {
        return Err(NameError::Malformed);
    }
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(NameError::Malformed);
        }
    }
    // WHATWG URL parsing (and inet_aton) read a name whose last label is a number as IPv4.
    let last = name.rsplit('.').next().unwrap_or("");
    let numeric = last.bytes().all(|b| b.is_ascii_digit())
        || (last.starts_with("0x") && last[2..].bytes().all(|b| b.is_ascii_hexdigit()));
    if numeric {
        return Err(NameError::IpLiteral);
    }
    if is_loopback_name(&name) {
        return Err(NameError::Loopback);
    }
    Ok(name)
}

fn is_loopback_name(name: &str) -> bool {
    matches!(
        name,
        "localhost" | "localhost.localdomain" | "ip6-localhost" | "ip6-loopback"
    ) || name.ends_with(".localhost")
}

/// Parses a CONNECT request-target (`host:port`, port required) and refuses what keygate never
/// connects to: a malformed authority, an IP literal, keygate's own names, a port not in
/// `ports`.
pub fn authority(raw: &str, ports: &[u16]) -> Result<Target, Rejection> {
    let refuse = |code, why: &str| Err(Rejection::new(code, why.to_string()));
    let Some((host, port)) = raw.rsplit_once(':') else {
        return refuse(
            Code::ConnectBadAuthority,
            "the CONNECT target must be host:port",
        );
    };
    if host.starts_with('[') || host.contains(':') {
        return refuse(
            Code::ConnectIpLiteral,
            "CONNECT to an IP address is refused; name the host",
        );
    }
    let port: u16 = match port.parse() {
        Ok(p) if p != 0 && !port.starts_with('+') => p,
        _ => {
            return refuse(
                Code::ConnectBadAuthority,
                "the CONNECT target's port is not a number from 1 to 65535",
            )
        }
    };
    let host = match host_name(host) {
        Ok(h) => h,
        Err(NameError::Malformed) => {
            return refuse(
                Code::ConnectBadAuthority,
                "the CONNECT target is not a DNS host name",
            )
        }
        Err(NameError::IpLiteral) => {
            return refuse(
                Code::ConnectIpLiteral,
                "CONNECT to an IP address is refused; name the host",
            )
        }
        Err(NameError::Loopback) => {
            return refuse(
                Code::ConnectToKeygate,
                "CONNECT to this machine (keygate itself) is refused",
            )
        }
    };
    if !ports.contains(&port) {
        return Err(Rejection::new(
            Code::ConnectPortNotAllowed,
            format!("CONNECT to port {port} is refused; allowed: {ports:?} (proxy_ports)"),
        ));
    }
    Ok(Target { host, port })
}

/// Whether `host` is on the egress allowlist: an exact name, or `*.suffix` for any name below
/// the suffix (not the suffix itself).
pub fn allowed(list: &[String], host: &str) -> bool {
    list.iter().any(|a| match a.strip_prefix("*.") {
        Some(suffix) => host
            .strip_suffix(suffix)
            .is_some_and(|rest| rest.len() > 1 && rest.ends_with('.')),
        None => a == host,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_targets_that_are_not_a_named_host_on_an_allowed_port_are_refused() {
        let code = |s: &str| authority(s, &[443]).map_err(|e| e.code);
        assert_eq!(
            code("API.GitHub.com.:443"),
            Ok(Target {
                host: "api.github.com".into(),
                port: 443
            })
            .map_err(|_: Rejection| Code::BadRequest)
        );
        for ip in [
            "127.0.0.1:443",
            "[::1]:443",
            "127.1:443",
            "2130706433:443",
            "0x7f.1:443",
            "10.0.0.1:443",
        ] {
            assert_eq!(code(ip), Err(Code::ConnectIpLiteral), "{ip}");
        }
        for me in ["localhost:443", "LOCALHOST:443", "a.localhost:443"] {
            assert_eq!(code(me), Err(Code::ConnectToKeygate), "{me}");
        }
        for bad in [
            "api.github.com",
            "api.github.com:",
            "api.github.com:0",
            "api.github.com:65536",
            "api.github.com:+443",
            "a..b:443",
            "-a.b:443",
            "a b:443",
            ":443",
            "user@host:443",
        ] {
            assert_eq!(code(bad), Err(Code::ConnectBadAuthority), "{bad}");
        }
        assert_eq!(code("api.github.com:22"), Err(Code::ConnectPortNotAllowed));
        assert!(authority("api.github.com:8443", &[443, 8443]).is_ok());
    }

    #[test]
    fn egress_allowlist_wildcards_match_names_below_the_suffix_only() {
        let list = vec!["pypi.org".to_string(), "*.npmjs.org".to_string()];
        assert!(allowed(&list, "pypi.org"));
        assert!(allowed(&list, "registry.npmjs.org"));
        assert!(!allowed(&list, "npmjs.org"));
        assert!(!allowed(&list, "evilnpmjs.org"));
        assert!(!allowed(&list, "pypi.org.evil.com"));
        assert!(!allowed(&list, "files.pypi.org"));
    }
}
