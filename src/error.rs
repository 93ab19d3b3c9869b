//! Every refusal keygate gives, mapped to an HTTP status and a JSON body in one place.
//!
//! Stages return their own small error types; they convert into [`Rejection`], whose `code` is
//! stable (scripts and tests match on it), whose `status` says why, and whose `message` tells the
//! caller what was wrong. Architecture invariant: no `Rejection` carries a secret value; a secret
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

#[derive(Debug, Clone)]
pub struct Rejection {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub blame: Blame,
    /// Seconds after which the same request may succeed (`Retry-After`); every 429 has one.
    pub retry_after: Option<u64>,
}

impl Rejection {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        let blame = if status.is_server_error() {
            if matches!(status.as_u16(), 502 | 504) {
                Blame::Upstream
            } else {
                Blame::Keygate
            }
        } else {
            Blame::Agent
        };
        Rejection {
            status,
            code,
            message: message.into(),
            blame,
            retry_after: None,
        }
    }

    /// 429: the agent is over a limit that frees up after `retry_after` seconds.
    pub fn too_many_requests(
        code: &'static str,
        message: impl Into<String>,
        retry_after: u64,
    ) -> Self {
        let mut r = Self::new(StatusCode::TOO_MANY_REQUESTS, code, message);
        r.retry_after = Some(retry_after.max(1));
        r
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, code, message)
    }

    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code, message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn too_large(limit: u64) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            format!("request body is larger than the limit of {limit} bytes"),
        )
    }

    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
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
                code: self.code,
                kind: "keygate_error",
                message: &self.message,
                request_id,
            },
        };
        // Serializing a struct of strings cannot fail; fall back to a fixed body rather than panic.
        let bytes = serde_json::to_vec(&body).unwrap_or_else(|_| br#"{"ok":false}"#.to_vec());
        let mut resp = json_response(self.status, Bytes::from(bytes));
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

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
            self.status.as_u16(),
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
        let r = Rejection::forbidden("path_not_allowed", "POST /v1/x is not allowed");
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
        let resp = Rejection::too_many_requests("rate_limited", "slow down", 7).to_response("r");
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "7");
        let other = Rejection::forbidden("path_not_allowed", "no").to_response("r");
        assert!(other.headers().get(header::RETRY_AFTER).is_none());
    }

    #[test]
    fn blame_follows_the_status() {
        assert_eq!(
            Rejection::new(StatusCode::BAD_GATEWAY, "x", "").blame,
            Blame::Upstream
        );
        assert_eq!(Rejection::unavailable("x", "").blame, Blame::Keygate);
        assert_eq!(Rejection::forbidden("x", "").blame, Blame::Agent);
    }
}
