//! Stage `guard`: cheap checks on the request's shape before anyone is trusted.
//!
//! Input: the request head and what the listener knows of the connection. Output: `Ok` or a
//! refusal. Refuses: a `Host` that does not name a loopback listener (DNS rebinding), a browser
//! `Origin` not allowed by config (a web page calling keygate), any request-target that is not
//! origin-form (absolute-form, authority-form/CONNECT, `*`), and a declared body over the limit.
//! Also drops hop-by-hop headers, which describe the agent's connection, not the upstream's.

use http::header::{self, HeaderMap, HeaderName};
use http::request::Parts;
use http::{Method, Version};

use crate::error::{Code, Rejection};

pub struct Guard {
    pub allowed_origins: Vec<String>,
    pub max_request_bytes: u64,
}

/// What the listener knows about the connection a request came on.
#[derive(Clone, Debug)]
pub enum Peer {
    Tcp(std::net::SocketAddr),
    Unix { uid: u32, pid: Option<i32> },
}

impl Guard {
    pub fn check(&self, head: &Parts, peer: &Peer) -> Result<(), Rejection> {
        if head.method == Method::CONNECT {
            return Err(Rejection::new(
                Code::InvalidRequestTarget,
                "CONNECT is not served here; use the route's base URL",
            ));
        }
        let uri = &head.uri;
        // HTTP/2 carries :scheme and :authority on every request, so only HTTP/1 can tell
        // origin-form from absolute-form by the presence of a scheme.
        let authority_in_target =
            head.version < Version::HTTP_2 && (uri.scheme().is_some() || uri.authority().is_some());
        if authority_in_target || !uri.path().starts_with('/') {
            return Err(Rejection::new(
                Code::InvalidRequestTarget,
                "the request-target must be a path (origin-form), not a URL or authority",
            ));
        }
        if matches!(peer, Peer::Tcp(_)) {
            let host = match (head.headers.get(header::HOST), uri.authority()) {
                (Some(h), _) => h.to_str().ok().map(str::to_string),
                (None, Some(a)) => Some(a.as_str().to_string()),
                (None, None) => None,
            };
            match host {
                Some(h) if is_loopback_host(&h) => {}
                Some(h) => {
                    return Err(Rejection::new(
                        Code::HostNotAllowed,
                        format!("Host {h:?} does not name this local listener"),
                    ))
                }
                None => {
                    return Err(Rejection::new(
                        Code::HostRequired,
                        "a Host header is required",
                    ))
                }
            }
        }
        if let Some(origin) = head.headers.get(header::ORIGIN) {
            let o = origin.to_str().unwrap_or("");
            if !self.allowed_origins.iter().any(|a| a == o) {
                return Err(Rejection::new(
                    Code::OriginNotAllowed,
                    format!("browser origin {o:?} may not call keygate"),
                ));
            }
        }
        if let Some(len) = head.headers.get(header::CONTENT_LENGTH) {
            let len: u64 = len
                .to_str()
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| {
                    Rejection::new(Code::BadRequest, "Content-Length is not a number")
                })?;
            if len > self.max_request_bytes {
                return Err(Rejection::too_large(self.max_request_bytes));
            }
        }
        Ok(())
    }
}

/// `localhost`, `127.x.y.z` and `[::1]`, with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((ip, port)) if port.is_empty() || port.starts_with(':') => ip,
            _ => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            Some(_) => return false,
            None => host,
        }
    };
    if name.eq_ignore_ascii_case("localhost") {
        return true;
    }
    name.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

/// Drops hop-by-hop headers (RFC 9110 §7.6.1), including any the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(n);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

/// Reads a whole request body, refusing one over `limit` (413) or one that breaks (400).
pub async fn read_body(body: hyper::body::Incoming, limit: u64) -> Result<bytes::Bytes, Rejection> {
    use http_body_util::BodyExt;
    let limited = http_body_util::Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Rejection::too_large(limit)),
        Err(_) => Err(Rejection::new(
            Code::BadRequest,
            "the request body could not be read",
        )),
    }
}

/// The lab broker's rule: a route that takes JSON refuses a body that does not parse.
pub fn check_json(body: &[u8]) -> Result<(), Rejection> {
    if body.is_empty() || serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok() {
        return Ok(());
    }
    Err(Rejection::new(
        Code::InvalidJson,
        "the request body is not valid JSON",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(method: &str, uri: &str, hdrs: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().method(method).uri(uri);
        for (k, v) in hdrs {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn guard() -> Guard {
        Guard {
            allowed_origins: vec!["http://localhost:3000".into()],
            max_request_bytes: 10,
        }
    }

    fn tcp() -> Peer {
        Peer::Tcp("127.0.0.1:5555".parse().unwrap())
    }

    fn code(p: Parts) -> &'static str {
        guard()
            .check(&p, &tcp())
            .map(|_| "ok")
            .unwrap_or_else(|e| e.code.as_str())
    }

    #[test]
    fn loopback_hosts_pass_and_others_are_refused() {
        for h in [
            "127.0.0.1:8791",
            "localhost",
            "LOCALHOST:1",
            "[::1]:8791",
            "127.1.2.3",
        ] {
            assert_eq!(code(parts("POST", "/v1/x", &[("host", h)])), "ok", "{h}");
        }
        for h in [
            "evil.example",
            "evil.example:8791",
            "127.0.0.1.nip.io",
            "[::1]x",
            "localhost:80:80",
            "0.0.0.0",
        ] {
            assert_eq!(
                code(parts("POST", "/v1/x", &[("host", h)])),
                "host_not_allowed",
                "{h}"
            );
        }
    }

    #[test]
    fn absolute_form_and_connect_are_refused() {
        assert_eq!(
            code(parts(
                "POST",
                "http://evil.example/v1/x",
                &[("host", "localhost")]
            )),
            "invalid_request_target"
        );
        assert_eq!(
            code(parts(
                "CONNECT",
                "evil.example:443",
                &[("host", "localhost")]
            )),
            "invalid_request_target"
        );
    }

    #[test]
    fn foreign_origin_is_refused_and_configured_origin_passes() {
        assert_eq!(
            code(parts(
                "POST",
                "/x",
                &[("host", "localhost"), ("origin", "https://evil.example")]
            )),
            "origin_not_allowed"
        );
        assert_eq!(
            code(parts(
                "POST",
                "/x",
                &[("host", "localhost"), ("origin", "http://localhost:3000")]
            )),
            "ok"
        );
    }

    #[test]
    fn declared_oversize_body_is_refused_before_reading_it() {
        assert_eq!(
            code(parts(
                "POST",
                "/x",
                &[("host", "localhost"), ("content-length", "11")]
            )),
            "request_too_large"
        );
        assert_eq!(
            code(parts(
                "POST",
                "/x",
                &[("host", "localhost"), ("content-length", "10")]
            )),
            "ok"
        );
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_dropped() {
        let mut p = parts(
            "POST",
            "/x",
            &[
                ("connection", "keep-alive, x-secret-hop"),
                ("x-secret-hop", "1"),
                ("te", "trailers"),
                ("keep-alive", "5"),
                ("accept", "a"),
            ],
        );
        strip_hop_by_hop(&mut p.headers);
        assert_eq!(p.headers.len(), 1, "{:?}", p.headers);
    }
}
