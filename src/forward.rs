//! Stage `forward`: sends an authorized request to its upstream and returns the response head
//! with the body still streaming.
//!
//! Input: an [`Authorized`] (only `authorize` makes one), the route, the request head with the
//! credential attached, and the body. Output: the upstream's response, or a refusal (502, 504,
//! 413). One pooled hyper client serves every route: HTTP/1.1 and HTTP/2 (ALPN) over rustls
//! with the webpki and native roots. Redirects are never followed: a 3xx goes back to the agent,
//! and the credential is never sent to a second host.
//!
//! Range requests are not sent unless the route allows them (`allow_range`): an upstream that
//! echoes its request could otherwise hand a key back in two halves, each too short for the
//! redactor to know. A 206 to a request that asked for no range is refused for the same reason.
//! A 101 is refused too: keygate proxies no upgrade.
//!
//! Requests from an HTTP/1 downstream connection go over that connection's own upstream
//! HTTP/1.1 connection ([`Affinity`], see [`affinity`]), spoken by keygate's own client (`h1`);
//! the pooled client serves HTTP/2 downstream connections, routes with their own TLS and
//! upstreams that choose h2.

pub mod affinity;
mod h1;

pub use affinity::Affinity;

use std::error::Error as StdError;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{HeaderMap, Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::authorize::Authorized;
use crate::config::Config;
use crate::error::{Code, Rejection};
use crate::redact::body::{find_body_error, BodyError};
use crate::redact::Redactor;

/// The request headers that ask for part of a body.
static RANGE_HEADERS: [http::HeaderName; 3] = [
    header::RANGE,
    header::IF_RANGE,
    http::HeaderName::from_static("request-range"),
];

/// Any error a forwarded body can fail with.
pub type BoxError = Box<dyn StdError + Send + Sync>;
/// The body type sent upstream and back: boxed, so adapters (timeouts, redaction) can wrap it.
pub type Body = BoxBody<Bytes, BoxError>;

/// An upstream answer's body: read by keygate's own HTTP/1.1 client (the affine connection) or
/// by hyper's pooled client (h2, routes with their own TLS, HTTP/2 downstream connections).
pub enum Incoming {
    /// From the downstream connection's own upstream connection.
    Own(affinity::Answer),
    /// From the pooled client.
    Pooled(hyper::body::Incoming),
}

impl http_body::Body for Incoming {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Incoming::Own(b) => std::pin::Pin::new(b).poll_frame(cx),
            Incoming::Pooled(b) => std::pin::Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Incoming::Own(b) => b.is_end_stream(),
            Incoming::Pooled(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            Incoming::Own(b) => b.size_hint(),
            Incoming::Pooled(b) => b.size_hint(),
        }
    }
}

/// Reads `pieces` as an upstream's HTTP/1.1 answer the way keygate's own client does: its
/// status, its body, and whether the connection could carry another request. For the fuzz
/// target (`fuzz/fuzz_targets/h1_answer.rs`).
#[doc(hidden)]
pub fn read_h1_answer<'a>(
    pieces: impl IntoIterator<Item = &'a [u8]>,
    head_request: bool,
) -> Result<(u16, Vec<u8>, bool), String> {
    h1::read_answer(pieces, head_request)
        .map(|(head, body, reusable)| (head.status.as_u16(), body, reusable))
        .map_err(|e| e.to_string())
}

/// How upstream connections are made: TCP (with the connect timeout), then TLS for `https`.
type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// The HTTP client to upstreams (TLS with webpki and native roots, HTTP/1.1 and HTTP/2).
pub struct Forwarder {
    client: Client<Connector, Body>,
    connector: Connector,
    pool: Arc<affinity::Pool>,
    /// Forward-proxy routes with their own TLS (`upstream_ca`, SNI = `host`).
    routes: crate::proxy::upstream::RouteClients,
    /// Each route's `Host` value, made once: a clone is a reference count, not a copy.
    hosts: Vec<Option<HeaderValue>>,
}

impl Forwarder {
    /// A client whose connection attempts give up after `connect_timeout`.
    pub fn new(connect_timeout: Duration) -> Result<Forwarder, rustls::Error> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        // A missing or unreadable system store is not fatal: the webpki roots still apply.
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map(|b| b.with_root_certificates(roots).with_no_client_auth());
        let tls = tls?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .build(https.clone());
        Ok(Forwarder {
            client,
            connector: https,
            pool: Arc::default(),
            routes: Default::default(),
            hosts: Vec::new(),
        })
    }

    /// Gives forward-proxy routes that need it their own TLS client (see `proxy::upstream`).
    pub fn with_routes(mut self, config: &Config) -> Result<Forwarder, String> {
        self.routes = crate::proxy::upstream::RouteClients::build(config, config.connect_timeout)?;
        self.hosts = config
            .routes
            .iter()
            .map(|r| HeaderValue::from_str(host_of(r)).ok())
            .collect();
        Ok(self)
    }

    /// Sends the request to the route `authorized` names; a request body that broke its limit
    /// on the way is reported as 413.
    ///
    /// There is no way to send without an [`Authorized`], which only `authorize` makes:
    ///
    /// ```compile_fail,E0308
    /// use keygate::{config::Config, forward::{Body, Forwarder}};
    /// async fn skip_authorize(f: &Forwarder, c: &Config, head: http::request::Parts, body: Body) {
    ///     let _ = f.send(c, (), head, None, body, None).await;
    /// }
    /// ```
    pub async fn send(
        &self,
        config: &Config,
        authorized: Authorized,
        mut head: Parts,
        query: Option<&str>,
        body: Body,
        affinity: Option<&Affinity>,
    ) -> Result<Response<Incoming>, Rejection> {
        let route = &config.routes[authorized.route()];
        let up = &route.upstream;
        // Sized exactly: `Uri` takes the buffer over as it is only when nothing is spare.
        let len =
            up.base_path.len() + authorized.raw_path().len() + query.map_or(0, |q| q.len() + 1);
        let mut path_and_query = String::with_capacity(len);
        path_and_query.push_str(&up.base_path);
        path_and_query.push_str(authorized.raw_path());
        if let Some(q) = query {
            path_and_query.push('?');
            path_and_query.push_str(q);
        }
        head.uri = Uri::builder()
            .scheme(up.scheme.clone())
            .authority(up.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .map_err(|_| Rejection::new(Code::InvalidPath, "the path cannot be sent upstream"))?;
        // hyper's client speaks HTTP/1.1 or negotiates h2 itself; the agent's version is its own.
        head.version = http::Version::HTTP_11;
        let host = match self.hosts.get(authorized.route().0) {
            Some(v) => v.clone(),
            None => HeaderValue::from_str(host_of(route)).ok(),
        };
        if let Some(v) = host {
            head.headers.insert(header::HOST, v);
        }
        // Redaction reads the response bytes; a compressed body would hide a secret from it.
        head.headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        if !route.allow_range {
            crate::headerset::remove_all(&mut head.headers, &RANGE_HEADERS);
        }
        for (k, v) in &route.extra_headers {
            head.headers.insert(k.clone(), v.clone());
        }
        let ranged = head.headers.contains_key(header::RANGE);
        let req = Request::from_parts(head, body);
        // A route with its own TLS (`upstream_ca`) keeps its own pooled client: the affine
        // connector trusts only the default roots.
        let sent = match (self.routes.get(authorized.route()), affinity) {
            (Some(own), _) => {
                let sent = async {
                    own.request(req)
                        .await
                        .map(|r| r.map(Incoming::Pooled))
                        .map_err(legacy_error)
                };
                tokio::time::timeout(route.timeout, sent)
                    .await
                    .map_err(|_| affinity::TimedOut)
            }
            // The connection's own timer, re-armed per request (see `within`).
            (None, Some(a)) => {
                let sent = std::pin::pin!(self.request(req, affinity));
                a.within(route.timeout, sent).await
            }
            (None, None) => tokio::time::timeout(route.timeout, self.request(req, affinity))
                .await
                .map_err(|_| affinity::TimedOut),
        };
        match sent {
            Ok(Ok(resp)) if resp.status() == StatusCode::PARTIAL_CONTENT && !ranged => {
                Err(Rejection::new(
                    Code::UpstreamUnexpectedPartial,
                    format!(
                        "upstream {} answered 206 Partial Content to a request for the whole body; a part cannot be checked for secrets",
                        route.upstream.host
                    ),
                ))
            }
            // keygate proxies no upgrade (it drops `Upgrade` as hop-by-hop), so a switch is
            // one the agent never asked for, onto a protocol no later stage can read.
            Ok(Ok(resp)) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
                Err(Rejection::new(
                    Code::UpstreamProtocolSwitch,
                    format!(
                        "upstream {} answered 101 Switching Protocols; keygate does not proxy protocol upgrades",
                        route.upstream.host
                    ),
                ))
            }
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err((connect, e))) => match find_body_error(&*e) {
                Some(BodyError::TooLarge(max)) => Err(Rejection::too_large(*max)),
                _ => Err(upstream_error(&route.upstream.host, connect, &*e)),
            },
            Err(_) => Err(Rejection::new(
                Code::UpstreamTimeout,
                format!(
                    "upstream {} did not answer within {:?}",
                    route.upstream.host, route.timeout
                ),
            )),
        }
    }
}

/// The `Host` a route's upstream is sent: a forward-proxy route's upstream serves the host the
/// agent asked for.
fn host_of(route: &crate::config::Route) -> &str {
    route
        .host
        .as_deref()
        .unwrap_or(route.upstream.authority.as_str())
}

impl Forwarder {
    /// Sends over the downstream connection's own upstream connection when there is an
    /// [`Affinity`] and the upstream speaks HTTP/1.1, else through the pooled client. An error
    /// says whether it happened while connecting.
    async fn request(
        &self,
        mut req: Request<Body>,
        affinity: Option<&Affinity>,
    ) -> Result<Response<Incoming>, (bool, BoxError)> {
        if let (Some(a), Some(scheme), Some(authority)) =
            (affinity, req.uri().scheme(), req.uri().authority())
        {
            let key = (scheme.clone(), authority.clone());
            if !self.pool.is_h2(&key) {
                // A connection of its own is sent origin-form, as the pooled client does. The
                // path moves into it rather than being cloned: a clone makes its buffer shared,
                // an allocation per request.
                let mut parts = std::mem::take(req.uri_mut()).into_parts();
                if let Some(pq) = parts.path_and_query.take() {
                    *req.uri_mut() = Uri::from(pq);
                }
                match affinity::send(&self.pool, &self.connector, a, key, req).await {
                    Ok(resp) => return Ok(resp.map(Incoming::Own)),
                    Err(affinity::Failed::Connect(e)) => return Err((true, e)),
                    Err(affinity::Failed::Request(e)) => return Err((false, e)),
                    Err(affinity::Failed::H2(unsent)) => {
                        req = *unsent;
                        parts.path_and_query = req.uri().path_and_query().cloned();
                        *req.uri_mut() = Uri::from_parts(parts).map_err(|e| (false, e.into()))?;
                    }
                }
            }
        }
        self.client
            .request(req)
            .await
            .map(|r| r.map(Incoming::Pooled))
            .map_err(legacy_error)
    }
}

/// The pooled client's error, and whether it happened while connecting.
fn legacy_error(e: hyper_util::client::legacy::Error) -> (bool, BoxError) {
    (e.is_connect(), e.into())
}

/// Refuses an answer whose body keygate would pass on without being able to read it: a
/// `Content-Encoding` other than `identity` in any instance or list place (when there is anything
/// to redact; keygate asks for `identity`, so an upstream or a proxy before it compressed anyway),
/// or a `Transfer-Encoding` other than plain `chunked`. hyper decodes only `chunked` and the header
/// is dropped as hop-by-hop, so a gzip transfer coding would reach the agent as unlabelled
/// compressed bytes the redactor never saw as text.
pub fn passable<B>(resp: &Response<B>, redactor: &Redactor, host: &str) -> Result<(), Rejection> {
    check_codings(resp.headers(), host, !redactor.is_empty())
}

fn check_codings(headers: &HeaderMap, host: &str, redacting: bool) -> Result<(), Rejection> {
    let tokens = |name| crate::guard::codings(headers, name);
    let mut bad_te = tokens(header::TRANSFER_ENCODING).filter(|t| t != "chunked");
    let bad_ce = if redacting {
        tokens(header::CONTENT_ENCODING).find(|t| t != "identity")
    } else {
        None
    };
    let Some(coding) = bad_te.next().or(bad_ce) else {
        return Ok(());
    };
    // The header is the upstream's to fill, with anything, a key included: only a registered
    // coding's name is repeated.
    let named = [
        "gzip",
        "x-gzip",
        "deflate",
        "br",
        "zstd",
        "compress",
        "x-compress",
        "dcb",
        "dcz",
        "aes128gcm",
        "exi",
        "pack200-gzip",
    ]
    .into_iter()
    .find(|n| *n == coding)
    .unwrap_or("unknown");
    Err(Rejection::new(
        Code::UpstreamUnredactable,
        format!(
            "upstream {host} answered with a body in the {named} coding, which keygate cannot scan for secrets"
        ),
    ))
}

/// A 502 that says what went wrong without echoing the request (whose URL may hold a query
/// credential): only the host and the innermost I/O error.
fn upstream_error(host: &str, connect: bool, e: &(dyn StdError + 'static)) -> Rejection {
    if crate::proxy::upstream::is_certificate_error(e) {
        return Rejection::new(
            Code::UpstreamCertificateInvalid,
            format!("upstream {host}: its TLS certificate is not valid for the host"),
        );
    }
    let mut cause: Option<&(dyn StdError + 'static)> = Some(e);
    let mut io = None;
    while let Some(c) = cause {
        if let Some(ioe) = c.downcast_ref::<std::io::Error>() {
            io = Some(ioe.kind());
        }
        cause = c.source();
    }
    let what = if connect {
        match io {
            Some(std::io::ErrorKind::ConnectionRefused) => "connection refused".to_string(),
            Some(std::io::ErrorKind::TimedOut) => "connect timed out".to_string(),
            Some(k) => format!("connect failed ({k})"),
            None => "connect failed (TLS or DNS)".to_string(),
        }
    } else {
        match io {
            Some(k) => format!("connection failed ({k})"),
            None => "the upstream closed the connection or sent an invalid response".to_string(),
        }
    };
    Rejection::new(
        Code::UpstreamUnreachable,
        format!("upstream {host}: {what}"),
    )
}
#[cfg(test)]
mod tests {
    use super::*;

    fn check(pairs: &[(&str, &str)], redacting: bool) -> Result<(), Rejection> {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        check_codings(&h, "up.example", redacting)
    }

    #[test]
    fn answer_codings_are_checked_in_every_instance_and_list_place() {
        for ok in [
            &[][..],
            &[("content-encoding", "identity")],
            &[
                ("content-encoding", "identity"),
                ("content-encoding", "Identity"),
            ],
            &[("transfer-encoding", "chunked")],
        ] {
            assert!(check(ok, true).is_ok(), "{ok:?}");
        }
        for bad in [
            &[
                ("content-encoding", "identity"),
                ("content-encoding", "gzip"),
            ][..],
            &[("content-encoding", "identity, br")],
            &[("transfer-encoding", "gzip, chunked")],
            &[
                ("transfer-encoding", "gzip"),
                ("transfer-encoding", "chunked"),
            ],
        ] {
            assert_eq!(
                check(bad, true).unwrap_err().code,
                Code::UpstreamUnredactable,
                "{bad:?}"
            );
        }
        // With nothing held there is nothing to hide; a transfer coding is still refused, as its
        // header is dropped and the agent would get bytes it cannot decode.
        assert!(check(&[("content-encoding", "gzip")], false).is_ok());
        assert!(check(&[("transfer-encoding", "gzip, chunked")], false).is_err());
    }

    #[test]
    fn the_upstream_coding_header_is_never_echoed_unless_it_names_a_registered_coding() {
        let e = check(&[("content-encoding", "sk-proj-abcdefgh12345678")], true).unwrap_err();
        assert!(!e.message.contains("sk-proj"), "{}", e.message);
        assert!(e.message.contains("unknown"), "{}", e.message);
        let e = check(&[("content-encoding", "GZIP")], true).unwrap_err();
        assert!(e.message.contains("gzip"), "{}", e.message);
    }
}
