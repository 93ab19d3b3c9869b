//! Answers keygate gives itself, without an upstream: `/healthz` and dry-run mode.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Response, StatusCode};

use crate::authorize::Authorized;
use crate::config::{Config, Healthz, Inject};
use crate::error::json_response;

/// Whether the request asks for `/healthz`, which needs no token.
pub fn is_healthz(head: &Parts) -> bool {
    head.uri.path() == "/healthz" && matches!(head.method, http::Method::GET | http::Method::HEAD)
}

/// `GET /healthz`: no token needed, nothing secret said; the lab's fields for a lab config.
pub fn healthz(
    c: &Config,
    policy_version: &str,
    audit_ok: bool,
    listen_urls: &[String],
    listen_port: u16,
) -> Response<Bytes> {
    let v = match &c.seed {
        Some(seed) => serde_json::json!({
            "ok": true,
            "listen": {"host": seed.listen_host, "port": listen_port},
            "mode": c.mode,
            "upstream_base_url": seed.upstream_base_url,
            "allowed_paths": seed.allowed_paths,
            "client_auth": seed.client_auth,
            "secret_source": seed.secret_source,
            "audit": audit_ok,
            "policy_version": policy_version,
        }),
        // Unauthenticated: by default only that keygate is up, never which upstreams and
        // secret sources it holds; `healthz = "detail"` opts in to the routes.
        None if c.healthz == Healthz::Brief => serde_json::json!({
            "ok": true,
            "version": env!("CARGO_PKG_VERSION"),
            "mode": c.mode,
            "audit": audit_ok,
            "policy_version": policy_version,
        }),
        None => {
            let routes: serde_json::Map<String, serde_json::Value> = c
                .routes
                .iter()
                .map(|r| {
                    let source = c.secret_of(r).map(|s| s.source.label()).unwrap_or_else(|| "none".into());
                    (r.name.clone(), serde_json::json!({"prefix": r.prefix, "upstream": r.upstream.url, "secret_source": source, "allow": r.allow}))
                })
                .collect();
            serde_json::json!({
                "ok": true,
                "version": env!("CARGO_PKG_VERSION"),
                "listen": listen_urls,
                "mode": c.mode,
                "routes": routes,
                "client_auth": true,
                "audit": audit_ok,
                "policy_version": policy_version,
            })
        }
    };
    json_response(StatusCode::OK, Bytes::from(v.to_string()))
}

/// What would have been sent, with the credential named by its id; no secret is fetched. The
/// backend companion's config adds its fields (`user_id`, `forward.upstream_base_url`,
/// `forward.secret_source_env`, `forward.would_attach_provider_token`).
pub fn dry_run(
    c: &Config,
    authorized: &Authorized,
    head: &Parts,
    body: &[u8],
    person: Option<&str>,
) -> Response<Bytes> {
    let route = &c.routes[authorized.route()];
    let up = &route.upstream;
    let base = up.url.trim_end_matches('/');
    let mut url = format!("{base}{}", authorized.raw_path());
    if let Some(q) = head.uri.query() {
        url.push('?');
        url.push_str(q);
    }
    let secret = c.secret_of(route);
    let source = secret.map(|s| s.source.clone());
    let label = source
        .as_ref()
        .map(|s| s.label())
        .unwrap_or_else(|| "none".into());
    let attaches = source.as_ref().is_some_and(|s| !s.is_none());
    let parsed: serde_json::Value = serde_json::from_slice(body).unwrap_or(serde_json::Value::Null);
    let stream = parsed
        .get("stream")
        .and_then(|s| s.as_bool())
        .unwrap_or(false);
    let mut headers: Vec<&str> = head.headers.keys().map(|k| k.as_str()).collect();
    headers.sort_unstable();
    let mut answer = serde_json::json!({
        "ok": true,
        "mode": "dry_run",
        "forward": {
            "url": url,
            "method": head.method.as_str(),
            "path": authorized.raw_path(),
            "route": route.name,
            "secret_source": label,
            "key_id": secret.map(|s| &s.name),
            "inject": if attaches { serde_json::to_value(&route.inject).unwrap_or_default() } else { serde_json::Value::Null },
            "would_attach_bearer_token": attaches && route.inject == Inject::Bearer,
            "would_attach_credential": attaches,
            "headers": headers,
        },
        "request": parsed,
        "request_bytes": body.len(),
    });
    if let Some(secret_env) = c.seed.as_ref().and_then(|s| s.backend.as_ref()) {
        answer["user_id"] = person.into();
        answer["forward"]["upstream_base_url"] = up.url.clone().into();
        answer["forward"]["secret_source_env"] = secret_env.clone().into();
        answer["forward"]["would_attach_provider_token"] = attaches.into();
    }
    if stream {
        let text = format!("data: {answer}\n\ndata: [DONE]\n\n");
        let mut resp = Response::new(Bytes::from(text));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        return resp;
    }
    json_response(StatusCode::OK, Bytes::from(answer.to_string()))
}
