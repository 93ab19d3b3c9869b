//! Stage `guard`: cheap checks on the request's shape before anyone is trusted.
//!
//! Input: the request head and what the listener knows of the connection. Output: `Ok` or a
//! refusal. Refuses: a `Host` that does not name a loopback listener (DNS rebinding), a browser
//! `Origin` not allowed by config (a web page calling keygate), any request-target that is not
//! origin-form (absolute-form, authority-form/CONNECT, `*`), a declared body over the limit, a
//! `Transfer-Encoding` other than plain `chunked`, and a method-override header naming another
//! method. Also drops hop-by-hop headers, which describe the agent's connection, not the
//! upstream's, and method-override headers that name the request's own method.

pub mod timeout;

use http::header::{self, HeaderMap, HeaderName};
use http::request::Parts;
use http::{Method, Version};

use crate::error::{Code, Rejection};

/// Checks a request's head before anything else reads it: method, target, host, origin and declared size.
pub struct Guard {
    /// Origins a browser request may come from (`Origin` header); any other is refused.
    pub allowed_origins: Vec<String>,
    /// The largest request body accepted, in bytes.
    pub max_request_bytes: u64,
}

/// What the listener knows about the connection a request came on.
#[derive(Clone, Debug)]
pub enum Peer {
    /// A TCP client's address.
    Tcp(std::net::SocketAddr),
    /// A Unix socket peer, from the socket's peer credentials.
    Unix {
        /// The peer's user id.
        uid: u32,
        /// The peer's process id, where the platform reports it.
        pid: Option<i32>,
    },
}

impl Guard {
    /// Refuses `CONNECT`, a bad target, a foreign host or origin and a bad or oversized
    /// `Content-Length`, each with its own code.
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
        let exposed = head
            .extensions
            .get::<crate::listen::ConnInfo>()
            .is_some_and(|c| c.exposed);
        // A listener bound to a public address is reached by whatever name other machines use
        // for it; the loopback-name check stops DNS rebinding only for local listeners. Through
        // the forward proxy, `Host` must name the tunnel's host instead.
        let via = head.extensions.get::<crate::proxy::Via>();
        if let Some(via) = via {
            via.check_host(head)?;
        } else if matches!(peer, Peer::Tcp(_)) && !exposed {
            let host = match (head.headers.get(header::HOST), uri.authority()) {
                (Some(h), _) => h.to_str().ok(),
                (None, Some(a)) => Some(a.as_str()),
                (None, None) => None,
            };
            match host {
                Some(h) if is_loopback_host(h) => {}
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
        check_transfer_encoding(&head.headers)?;
        check_method_override(&head.headers, &head.method)?;
        if let Some(q) = head.uri.query() {
            check_override_params(q.as_bytes(), &head.method, "query parameter")?;
        }
        Ok(())
    }
}

/// Headers some upstreams (and frameworks in front of them) read as the real method, so a request
/// authorized as `POST` could act as `DELETE`.
static METHOD_OVERRIDE_HEADERS: [HeaderName; 3] = [
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
];

/// Every coding named in every instance of a coding header, trimmed and lower-cased; a value that
/// is not text yields one token no check accepts.
pub fn codings(headers: &HeaderMap, name: HeaderName) -> impl Iterator<Item = String> + '_ {
    headers.get_all(name).into_iter().flat_map(|v| {
        let tokens: Vec<String> = match v.to_str() {
            Ok(s) => s
                .split(',')
                .map(|t| t.trim().to_ascii_lowercase())
                .filter(|t| !t.is_empty())
                .collect(),
            Err(_) => vec!["\u{fffd}".to_string()],
        };
        tokens
    })
}

/// hyper decodes `chunked` when it is the last coding and hands on whatever is under it; that
/// body would then go upstream (hop-by-hop headers are dropped) with its coding forgotten: a
/// gzipped key would pass the request scan. Only `chunked`, alone, is accepted.
fn check_transfer_encoding(headers: &HeaderMap) -> Result<(), Rejection> {
    if !headers.contains_key(header::TRANSFER_ENCODING) {
        return Ok(());
    }
    let all: Vec<String> = codings(headers, header::TRANSFER_ENCODING).collect();
    if all.len() == 1 && all[0] == "chunked" {
        return Ok(());
    }
    Err(Rejection::new(
        Code::InvalidTransferEncoding,
        "Transfer-Encoding may only be `chunked`; send the body uncompressed",
    ))
}

/// A request body the scan could not read: any `Content-Encoding` but `identity`, in any
/// instance of the header or any place in its list. Called only where the route scans requests.
pub fn check_content_encoding(headers: &HeaderMap) -> Result<(), Rejection> {
    if codings(headers, header::CONTENT_ENCODING).any(|c| c != "identity") {
        return Err(Rejection::new(
            Code::RequestEncodingNotScannable,
            "a Content-Encoding'd request body cannot be scanned for credentials; send it uncompressed",
        ));
    }
    Ok(())
}

/// The one rule for every method override, header or parameter: it may only name the request's
/// own method (in any case), which changes nothing.
fn override_refused(value: Option<&str>, method: &Method, what: &str) -> Result<(), Rejection> {
    if value.is_some_and(|s| s.trim().eq_ignore_ascii_case(method.as_str())) {
        return Ok(());
    }
    Err(Rejection::new(
        Code::MethodOverrideNotAllowed,
        format!(
            "{what} may not change the method: policy is checked for {method}, so send the request with the method you mean"
        ),
    ))
}

/// Refuses a method-override header unless every instance names the request's own method;
/// [`strip_request`] then drops it.
fn check_method_override(headers: &HeaderMap, method: &Method) -> Result<(), Rejection> {
    for name in crate::headerset::held(headers, &METHOD_OVERRIDE_HEADERS) {
        for v in headers.get_all(name) {
            override_refused(v.to_str().ok(), method, name.as_str())?;
        }
    }
    Ok(())
}

/// The parameters frameworks read as the real method of a POST: `_method` (Rails, Laravel,
/// Symfony) and the override header's name as a parameter (some Java and .NET stacks).
const METHOD_PARAMS: [&str; 2] = ["_method", "x-http-method-override"];

/// Refuses a `_method` parameter (in a query string or a form body) naming another method than
/// the request's: any spelling a framework reads as `_method` (case, percent-encoding, `+`,
/// PHP's `.` and ` ` for `_`, `_method[]`). One naming the request's own method changes nothing
/// and is passed on as it is.
fn check_override_params(pairs: &[u8], method: &Method, place: &str) -> Result<(), Rejection> {
    for pair in pairs.split(|b| *b == b'&' || *b == b';') {
        let pair = String::from_utf8_lossy(pair);
        let Some(param) = METHOD_PARAMS
            .iter()
            .find(|p| crate::credential::names_param(&pair, p))
        else {
            continue;
        };
        let value = pair
            .split_once('=')
            .map_or("", |(_, v)| v)
            .replace('+', " ");
        let value = percent_encoding::percent_decode_str(&value)
            .decode_utf8()
            .ok();
        override_refused(value.as_deref(), method, &format!("the {param} {place}"))?;
    }
    Ok(())
}

/// A form body (`application/x-www-form-urlencoded`): the pipeline reads it whole, so its
/// `_method` field is checked as a query's is.
pub fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| {
            t.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
}

/// Refuses a form body whose `_method` field names another method than the request's.
pub fn check_form_override(head: &Parts, body: &[u8]) -> Result<(), Rejection> {
    if !is_form(&head.headers) {
        return Ok(());
    }
    check_override_params(body, &head.method, "form field")
}

/// What a checked request must not carry upstream: hop-by-hop headers and method overrides.
pub fn strip_request(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    crate::headerset::remove_all(headers, &METHOD_OVERRIDE_HEADERS);
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
    // The usual names first: parsing an address costs more than the rest of the check.
    if name == "127.0.0.1" || name.eq_ignore_ascii_case("localhost") {
        return true;
    }
    name.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

/// Drops hop-by-hop headers (RFC 9110 §7.6.1), including any the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let found = crate::headerset::present(headers, &HOP_BY_HOP);
    if found == 0 {
        return;
    }
    if found & 1 != 0 {
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
    }
    crate::headerset::remove_all(headers, &HOP_BY_HOP);
}

/// The hop-by-hop headers, `Connection` (which may name more) first.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// Reads a whole request body, refusing one over `limit` (413) or one that breaks (400).
pub async fn read_body<B>(body: B, limit: u64) -> Result<bytes::Bytes, Rejection>
where
    B: http_body::Body<Data = bytes::Bytes>,
    B::Error: Into<crate::forward::BoxError>,
{
    use http_body_util::BodyExt;
    let limited = http_body_util::Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
    let mut limited = std::pin::pin!(limited);
    // A body of one frame (nearly every request) is that frame's bytes, neither queued nor
    // copied; more frames are joined in one buffer.
    let mut first = bytes::Bytes::new();
    let mut joined: Option<bytes::BytesMut> = None;
    while let Some(frame) = limited.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(Rejection::too_large(limit))
            }
            Err(_) => {
                return Err(Rejection::new(
                    Code::BadRequest,
                    "the request body could not be read",
                ))
            }
        };
        // Trailers carry no body bytes.
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        match &mut joined {
            Some(buf) => buf.extend_from_slice(&data),
            None if first.is_empty() => first = data,
            None => {
                let mut buf = bytes::BytesMut::with_capacity(first.len() + data.len());
                buf.extend_from_slice(&first);
                buf.extend_from_slice(&data);
                joined = Some(buf);
            }
        }
    }
    Ok(joined.map_or(first, bytes::BytesMut::freeze))
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
    fn only_plain_chunked_transfer_encoding_is_accepted() {
        let te = |vals: &[&str]| {
            let mut h: Vec<(&str, &str)> = vec![("host", "localhost")];
            h.extend(vals.iter().map(|v| ("transfer-encoding", *v)));
            code(parts("POST", "/x", &h))
        };
        // `chunked,` lists one coding once the empty list element is dropped (RFC 9110 §5.6.1).
        for ok in [&[][..], &["chunked"], &["Chunked "], &["chunked,"]] {
            assert_eq!(te(ok), "ok", "{ok:?}");
        }
        for bad in [
            &["gzip, chunked"][..],
            &["identity, chunked"],
            &["gzip", "chunked"],
            &["chunked", "chunked"],
            &["gzip"],
        ] {
            assert_eq!(te(bad), "invalid_transfer_encoding", "{bad:?}");
        }
    }

    #[test]
    fn any_content_coding_but_identity_in_any_instance_is_refused() {
        let ce = |vals: &[&str]| {
            let mut h = HeaderMap::new();
            for v in vals {
                h.append(header::CONTENT_ENCODING, v.parse().unwrap());
            }
            check_content_encoding(&h)
                .map(|_| "ok")
                .unwrap_or_else(|e| e.code.as_str())
        };
        for ok in [
            &[][..],
            &["identity"],
            &["IDENTITY", " identity"],
            &["identity, identity"],
        ] {
            assert_eq!(ce(ok), "ok", "{ok:?}");
        }
        for bad in [
            &["identity", "gzip"][..],
            &["identity, gzip"],
            &["br"],
            &["gzip, identity"],
        ] {
            assert_eq!(ce(bad), "request_encoding_not_scannable", "{bad:?}");
        }
    }

    #[test]
    fn method_override_is_refused_unless_it_names_the_request_method_then_dropped() {
        let with = |method: &str, hdrs: &[(&str, &str)]| {
            let mut h = vec![("host", "localhost")];
            h.extend_from_slice(hdrs);
            code(parts(method, "/x", &h))
        };
        for name in METHOD_OVERRIDE_HEADERS.iter().map(HeaderName::as_str) {
            assert_eq!(
                with("POST", &[(name, "DELETE")]),
                "method_override_not_allowed"
            );
            assert_eq!(with("POST", &[(name, "post")]), "ok");
            assert_eq!(
                with("POST", &[(name, "POST"), (name, "PUT")]),
                "method_override_not_allowed"
            );
        }
        let mut p = parts(
            "POST",
            "/x",
            &[("x-http-method-override", "POST"), ("accept", "a")],
        );
        strip_request(&mut p.headers);
        assert_eq!(p.headers.len(), 1, "{:?}", p.headers);
    }

    #[test]
    fn method_param_in_query_or_form_is_refused_unless_it_names_the_request_method() {
        let q = |method: &str, uri: &str| code(parts(method, uri, &[("host", "localhost")]));
        for bad in [
            "/x?_method=DELETE",
            "/x?a=1&_METHOD=delete",
            "/x?%5Fmethod=PUT",
            "/x?_m%65thod=PATCH",
            "/x?.method=DELETE",
            "/x?_method[]=DELETE",
            "/x?a=1;_method=DELETE",
            "/x?_method=%44ELETE",
            "/x?_method",
            "/x?_method=POST&_method=DELETE",
        ] {
            assert_eq!(q("POST", bad), "method_override_not_allowed", "{bad}");
        }
        for ok in [
            "/x?_method=POST",
            "/x?_method=post",
            "/x?_method=+POST",
            "/x?method=DELETE",
            "/x?my_method=DELETE",
            "/x?_methods=DELETE",
            "/x?q=_method%3DDELETE",
        ] {
            assert_eq!(q("POST", ok), "ok", "{ok}");
        }
        assert_eq!(q("DELETE", "/x?_method=delete"), "ok");

        let form = |ct: &str, body: &str| {
            let p = parts("POST", "/x", &[("host", "localhost"), ("content-type", ct)]);
            check_form_override(&p, body.as_bytes())
                .map(|_| "ok")
                .unwrap_or_else(|e| e.code.as_str())
        };
        let ct = "application/x-www-form-urlencoded";
        assert_eq!(
            form(ct, "a=1&_method=DELETE"),
            "method_override_not_allowed"
        );
        assert_eq!(
            form(
                "Application/X-WWW-Form-Urlencoded; charset=utf-8",
                "_method=put"
            ),
            "method_override_not_allowed"
        );
        assert_eq!(form(ct, "a=1&_method=POST"), "ok");
        assert_eq!(form(ct, "text=please+set+_method%3DDELETE"), "ok");
        // JSON is not read as a form: a `_method` key there is an upstream's business.
        assert_eq!(form("application/json", "{\"_method\":\"DELETE\"}"), "ok");
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

    proptest::proptest! {
        /// However a body is cut into frames (empty ones and trailers included), `read_body`
        /// gives its bytes joined, or 413 past the limit.
        #[test]
        fn read_body_joins_any_framing_and_refuses_past_the_limit(
            chunks in proptest::collection::vec(proptest::collection::vec(0u8..=255, 0..40), 0..8),
            trailers in proptest::prelude::any::<bool>(),
            limit in 0u64..200,
        ) {
            use http_body_util::StreamBody;
            let whole: Vec<u8> = chunks.concat();
            let mut frames: Vec<Result<http_body::Frame<bytes::Bytes>, std::convert::Infallible>> =
                chunks
                    .iter()
                    .map(|c| Ok(http_body::Frame::data(bytes::Bytes::from(c.clone()))))
                    .collect();
            if trailers {
                frames.push(Ok(http_body::Frame::trailers(HeaderMap::new())));
            }
            let body = StreamBody::new(futures_util::stream::iter(frames));
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let got = rt.block_on(read_body(body, limit));
            if whole.len() as u64 > limit {
                proptest::prop_assert_eq!(got.unwrap_err().code, Code::RequestTooLarge);
            } else {
                proptest::prop_assert_eq!(got.unwrap(), bytes::Bytes::from(whole));
            }
        }
    }
}
