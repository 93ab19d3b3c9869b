//! Every refusal keygate gives, in one catalogue: a stable code, the HTTP status that says why,
//! and who is to blame.
//!
//! Stages return a [`Rejection`] built from a [`Code`] and a message; nothing else chooses a
//! status or a blame. Architecture invariant: no `Rejection` carries a secret value; a secret
//! source is named by its label (`command:op read`), never by what it printed.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use serde::Serialize;

/// Who is to blame for a refusal, recorded in the audit record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Blame {
    /// The caller sent something keygate refuses.
    Agent,
    /// The upstream failed or timed out.
    Upstream,
    /// keygate could not do its part (secret source, audit).
    Keygate,
}

/// Declares [`Code`] with its wire name, status and blame side by side, so a code's meaning is
/// written once.
macro_rules! catalogue {
    ($( $(#[$doc:meta])* $variant:ident = $code:literal, $status:ident, $blame:ident; )*) => {
        /// A refusal code. Its string form is stable: scripts, SDK users and the audit match on it.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Code {
            $( $(#[$doc])* $variant, )*
        }

        impl Code {
            /// Every code, in catalogue order.
            pub const ALL: &'static [Code] = &[$(Code::$variant),*];

            /// The code as it appears in `error.code` and the audit's `reason`.
            pub fn as_str(self) -> &'static str {
                match self { $(Code::$variant => $code,)* }
            }

            /// The HTTP status this refusal is answered with.
            pub fn status(self) -> StatusCode {
                match self { $(Code::$variant => StatusCode::$status,)* }
            }

            /// Who is to blame.
            pub fn blame(self) -> Blame {
                match self { $(Code::$variant => Blame::$blame,)* }
            }
        }
    };
}

catalogue! {
    /// The path holds an ambiguous encoding or cannot be sent upstream.
    InvalidPath = "invalid_path", BAD_REQUEST, Agent;
    /// Absolute-form, authority-form or CONNECT request-targets.
    InvalidRequestTarget = "invalid_request_target", BAD_REQUEST, Agent;
    /// The route requires a JSON body and this one does not parse.
    InvalidJson = "invalid_json", BAD_REQUEST, Agent;
    /// The request is malformed in a way no other code names.
    BadRequest = "bad_request", BAD_REQUEST, Agent;
    /// A TCP request without a `Host` header.
    HostRequired = "host_required", BAD_REQUEST, Agent;
    /// A request `Transfer-Encoding` other than plain `chunked`, whose coding would be dropped.
    InvalidTransferEncoding = "invalid_transfer_encoding", BAD_REQUEST, Agent;
    /// A method-override header naming another method than the request's.
    MethodOverrideNotAllowed = "method_override_not_allowed", BAD_REQUEST, Agent;
    /// Different tokens in the credential headers of one request.
    AmbiguousCredentials = "ambiguous_credentials", BAD_REQUEST, Agent;
    /// A backend front end's request without the person header its agent names
    /// (`person_header`, the companion's `X-User-Id`), or with a value that is not a plain name.
    UserHeaderRequired = "user_header_required", BAD_REQUEST, Agent;
    /// The backend companion's config: no `X-Backend-Token` (or other token header).
    BackendTokenRequired = "backend_token_required", UNAUTHORIZED, Agent;
    /// No keygate token in any accepted header.
    MissingToken = "missing_token", UNAUTHORIZED, Agent;
    /// The token is unknown or revoked.
    InvalidToken = "invalid_token", UNAUTHORIZED, Agent;
    /// The token's lifetime is over.
    TokenExpired = "token_expired", UNAUTHORIZED, Agent;
    /// No allow rule of the route matches the method and path.
    PathNotAllowed = "path_not_allowed", FORBIDDEN, Agent;
    /// The agent may not use this route.
    RouteNotAllowed = "route_not_allowed", FORBIDDEN, Agent;
    /// `Host` does not name a loopback listener (DNS rebinding).
    HostNotAllowed = "host_not_allowed", FORBIDDEN, Agent;
    /// A browser origin that is not allowed.
    OriginNotAllowed = "origin_not_allowed", FORBIDDEN, Agent;
    /// The request carries a held secret or a credential (exfiltration scan).
    SecretInRequest = "secret_in_request", FORBIDDEN, Agent;
    /// A credential position holds neither the route's placeholder of the caller's run nor
    /// nothing (a foreign token, another run's or an ended run's placeholder).
    PlaceholderMismatch = "placeholder_mismatch", FORBIDDEN, Agent;
    /// No route prefix matches the path.
    RouteNotFound = "route_not_found", NOT_FOUND, Agent;
    /// The request body sent nothing for `request_body_timeout`.
    RequestBodyTimeout = "request_body_timeout", REQUEST_TIMEOUT, Agent;
    /// The body is larger than `max_request_bytes`.
    RequestTooLarge = "request_too_large", PAYLOAD_TOO_LARGE, Agent;
    /// A compressed request body, which the scan cannot read.
    RequestEncodingNotScannable = "request_encoding_not_scannable", UNSUPPORTED_MEDIA_TYPE, Agent;
    /// A person denied the request (`keygate deny`).
    ApprovalDenied = "approval_denied", FORBIDDEN, Agent;
    /// Nobody approved the request within the route's `approval_timeout`.
    ApprovalTimeout = "approval_timeout", FORBIDDEN, Agent;
    /// The agent is over its request rate.
    RateLimited = "rate_limited", TOO_MANY_REQUESTS, Agent;
    /// The request may cost more tokens than are left of the agent's budget for the period.
    BudgetExhausted = "budget_exhausted", TOO_MANY_REQUESTS, Agent;
    /// The upstream could not be reached or broke the connection.
    UpstreamUnreachable = "upstream_unreachable", BAD_GATEWAY, Upstream;
    /// The upstream answered in a form the redactor cannot read (compressed).
    UpstreamUnredactable = "upstream_unredactable", BAD_GATEWAY, Upstream;
    /// A 206 answer to a request that asked for no range.
    UpstreamUnexpectedPartial = "upstream_unexpected_partial", BAD_GATEWAY, Upstream;
    /// A 101 Switching Protocols: keygate proxies no upgrade, so none was asked for.
    UpstreamProtocolSwitch = "upstream_protocol_switch", BAD_GATEWAY, Upstream;
    /// The scan of a large request body did not complete (fail closed).
    RequestScanFailed = "request_scan_failed", SERVICE_UNAVAILABLE, Keygate;
    /// The route's secret could not be fetched.
    SecretUnavailable = "secret_unavailable", SERVICE_UNAVAILABLE, Keygate;
    /// The audit log cannot be written, so nothing is forwarded.
    AuditUnavailable = "audit_unavailable", SERVICE_UNAVAILABLE, Keygate;
    /// The listener holds `max_per_listener` connections and none is idle.
    TooManyConnections = "too_many_connections", SERVICE_UNAVAILABLE, Keygate;
    /// The route needs a person's approval and there is no channel to ask.
    ApprovalUnavailable = "approval_unavailable", SERVICE_UNAVAILABLE, Keygate;
    /// The shared state store (Redis/Valkey) cannot be reached, and the decision needs it.
    StateUnavailable = "state_unavailable", SERVICE_UNAVAILABLE, Keygate;
    /// keygate, or this agent, is frozen (`keygate freeze`).
    Frozen = "frozen", SERVICE_UNAVAILABLE, Keygate;
    /// The upstream sent no response head within the route's timeout.
    UpstreamTimeout = "upstream_timeout", GATEWAY_TIMEOUT, Upstream;
    /// Forward proxy: no valid keygate token in `Proxy-Authorization`.
    ProxyAuthRequired = "proxy_auth_required", PROXY_AUTHENTICATION_REQUIRED, Agent;
    /// Forward proxy: a CONNECT target that is not `host:port` with a DNS name.
    ConnectBadAuthority = "connect_bad_authority", BAD_REQUEST, Agent;
    /// Forward proxy: CONNECT to an IP address rather than a host name.
    ConnectIpLiteral = "connect_ip_literal", FORBIDDEN, Agent;
    /// Forward proxy: CONNECT to keygate itself (its addresses, loopback names).
    ConnectToKeygate = "connect_to_keygate", FORBIDDEN, Agent;
    /// Forward proxy: CONNECT to a port not in `proxy_ports` (443 by default).
    ConnectPortNotAllowed = "connect_port_not_allowed", FORBIDDEN, Agent;
    /// Forward proxy: a host no route names, with `egress = "deny"` and not in `egress_allow`.
    EgressDenied = "egress_denied", FORBIDDEN, Agent;
    /// Forward proxy: a request inside a tunnel names another host than the tunnel's.
    MisdirectedRequest = "misdirected_request", MISDIRECTED_REQUEST, Agent;
    /// Forward proxy: the caller holds as many open tunnels as keygate allows one caller.
    TooManyTunnels = "too_many_tunnels", TOO_MANY_REQUESTS, Agent;
    /// Forward proxy: the client's TLS handshake in a tunnel failed, timed out or named
    /// another host (SNI) than its CONNECT.
    TunnelHandshakeFailed = "tunnel_handshake_failed", BAD_REQUEST, Agent;
    /// The upstream's TLS certificate is not valid for the route's host.
    UpstreamCertificateInvalid = "upstream_certificate_invalid", BAD_GATEWAY, Upstream;
    /// Forward proxy: a tunnelled (uninspected) destination could not be reached.
    TunnelUnreachable = "tunnel_unreachable", BAD_GATEWAY, Upstream;
}

impl Serialize for Code {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal: a catalogued code and a message for the caller (never a secret).
#[derive(Debug, Clone)]
pub struct Rejection {
    /// What went wrong; fixes the status and the blame.
    pub code: Code,
    /// What the caller should know, in a sentence.
    pub message: String,
    /// Seconds after which the same request may succeed (`Retry-After`); every 429 has one.
    pub retry_after: Option<u64>,
}

impl Rejection {
    /// A refusal with its catalogued status and blame.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Rejection {
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// The limit refused for frees up after `secs` seconds (at least 1): sent as `Retry-After`.
    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs.max(1));
        self
    }

    /// The status the refusal is answered with.
    pub fn status(&self) -> StatusCode {
        self.code.status()
    }

    /// Who is to blame, for the audit record.
    pub fn blame(&self) -> Blame {
        self.code.blame()
    }

    /// A body over `limit` bytes.
    pub fn too_large(limit: u64) -> Self {
        Self::new(
            Code::RequestTooLarge,
            format!("request body is larger than the limit of {limit} bytes"),
        )
    }

    /// The JSON answer, in the shape the OpenAI and Anthropic SDKs show their users
    /// (`error.message`, `error.type`, `error.code`) plus the lab broker's `ok: false`.
    pub fn to_response(&self, request_id: &str) -> Response<Bytes> {
        #[derive(Serialize)]
        struct Body<'a> {
            ok: bool,
            error: Inner<'a>,
        }
        #[derive(Serialize)]
        struct Inner<'a> {
            code: &'a str,
            #[serde(rename = "type")]
            kind: &'a str,
            message: &'a str,
            request_id: &'a str,
        }
        let body = Body {
            ok: false,
            error: Inner {
                code: self.code.as_str(),
                kind: "keygate_error",
                message: &self.message,
                request_id,
            },
        };
        // Serializing a struct of strings cannot fail; fall back to a fixed body rather than panic.
        let bytes = serde_json::to_vec(&body).unwrap_or_else(|_| br#"{"ok":false}"#.to_vec());
        let mut resp = json_response(self.status(), Bytes::from(bytes));
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

/// A JSON answer with `status`.
pub fn json_response(status: StatusCode, body: Bytes) -> Response<Bytes> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status().as_u16(),
            self.code,
            self.message
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_the_sdk_error_shape() {
        let r = Rejection::new(Code::PathNotAllowed, "POST /v1/x is not allowed");
        let resp = r.to_response("req1");
        assert_eq!(resp.status(), 403);
        let v: serde_json::Value = serde_json::from_slice(resp.body()).unwrap();
        assert_eq!(v["ok"], false);
        assert_eq!(v["error"]["code"], "path_not_allowed");
        assert_eq!(v["error"]["type"], "keygate_error");
        assert_eq!(v["error"]["request_id"], "req1");
    }

    #[test]
    fn a_429_says_when_to_retry() {
        let resp = Rejection::new(Code::RateLimited, "slow down")
            .with_retry_after(7)
            .to_response("r");
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "7");
        let other = Rejection::new(Code::PathNotAllowed, "no").to_response("r");
        assert!(other.headers().get(header::RETRY_AFTER).is_none());
    }

    #[test]
    fn codes_are_unique_and_their_status_says_who_is_to_blame() {
        let mut seen = std::collections::HashSet::new();
        for code in Code::ALL {
            assert!(seen.insert(code.as_str()), "{code} twice");
            let status = code.status();
            assert!(status.is_client_error() || status.is_server_error());
            match code.blame() {
                Blame::Agent => assert!(status.is_client_error(), "{code}"),
                Blame::Upstream => assert!(matches!(status.as_u16(), 502 | 504), "{code}"),
                Blame::Keygate => assert_eq!(status.as_u16(), 503, "{code}"),
            }
        }
    }

    #[test]
    fn readme_documents_every_code() {
        let readme = include_str!("../README.md");
        for code in Code::ALL {
            assert!(
                readme.contains(&format!("`{code}`")),
                "README.md does not document `{code}`"
            );
        }
    }
}
