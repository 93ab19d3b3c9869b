//! Placeholders: a harmless string the agent holds where a tool expects its key.
//!
//! Each run (`keygate run`) gets, for every route that asks for one (`placeholder_env`,
//! `placeholder_in`), a placeholder `kgph_<route>_<32 base62>`, minted with the run's lease and
//! forgotten when the lease ends, like the run's token. keygate replaces it, in the credential
//! stage and only for its own route, with the real credential; nothing else is rewritten.
//!
//! Identity: a live placeholder is a capability of its run. A request that carries one and no
//! keygate token is the run's request (tools that only know `HTTPS_PROXY` and cannot send proxy
//! credentials are identified by it); one that carries a token and a placeholder must carry the
//! placeholder of the token's own run. A placeholder of an ended run, or a `kgph_` string that
//! was never minted, in a credential position is refused (403 `placeholder_mismatch`).
//!
//! Stages: [`lift`] runs before `authenticate` (which strips credential headers and would take a
//! placeholder for a token); [`identify`] completes `authenticate`; [`check_foreign`] and
//! [`substitute`] run in the credential stage, the latter called from `credential::replace`, the
//! one place the value is exposed.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::authenticate::Identity;
use crate::config::{AgentId, Config, Inject, Route};
use crate::error::{Code, Rejection};

/// What every placeholder starts with.
pub const PREFIX: &str = "kgph_";

/// Length of a placeholder's random part: 190 bits, unguessable like a token.
const RANDOM_LEN: usize = 32;

/// Headers a tool puts its key in, beyond the route's own inject header: a placeholder there is
/// replaced, any other value refused on a placeholder route.
pub const TOKEN_HEADERS: [&str; 6] = [
    "authorization",
    "x-api-key",
    "api-key",
    "x-goog-api-key",
    "private-token",
    "x-auth-token",
];

/// Where, beyond credential headers, a route takes its placeholder (`placeholder_in`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Positions {
    /// `"query"`: in the query string (replaced by the percent-encoded value).
    pub query: bool,
    /// `"body"`: in the request body, read whole up to `max_request_bytes` (replaced by the
    /// value, JSON- or percent-escaped when the body is JSON or a form).
    pub body: bool,
}

impl Positions {
    /// Whether the route opted into any position beyond headers.
    pub fn is_empty(&self) -> bool {
        !self.query && !self.body
    }

    /// Parses `placeholder_in` entries.
    pub fn parse(items: &[String]) -> Result<Positions, String> {
        let mut p = Positions::default();
        for item in items {
            match item.as_str() {
                "query" => p.query = true,
                "body" => p.body = true,
                // Always on: listed for people who write it out.
                "header" | "headers" => {}
                "websocket" => {
                    return Err(
                        "keygate does not forward WebSockets, so there are no frames to replace a placeholder in"
                            .into(),
                    )
                }
                other => {
                    return Err(format!(
                        "placeholder_in: {other:?} is not a position (use \"query\", \"body\")"
                    ))
                }
            }
        }
        Ok(p)
    }
}

/// Whether a route hands out placeholders, and so checks its credential positions: one that
/// asks for them, and every forward-proxy route (`host`), whose tools send their own
/// credential headers.
pub fn enabled(route: &Route) -> bool {
    route.placeholder_env.is_some() || !route.placeholder_in.is_empty() || route.host.is_some()
}

/// A fresh placeholder for `route`.
pub fn mint(route: &str) -> String {
    use rand::distr::{Alphanumeric, SampleString};
    let random = Alphanumeric.sample_string(&mut rand::rng(), RANDOM_LEN);
    format!("{PREFIX}{route}_{random}")
}

/// Whose a live placeholder is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    /// The run's token id.
    pub token_id: String,
    /// The run's agent, by name (indices change with a reload).
    pub agent: String,
    /// The route the placeholder stands in for.
    pub route: String,
}

/// The live placeholders of every run, shared by every reloaded state; a placeholder is known by
/// its SHA-256, as tokens are.
#[derive(Default)]
pub struct Registry(Mutex<Inner>);

#[derive(Default)]
struct Inner {
    by_hash: HashMap<[u8; 32], Owner>,
    /// token id -> (route, placeholder), to find the run's placeholder for a route.
    by_run: HashMap<String, Vec<(String, String)>>,
}

impl Registry {
    /// Mints the run's placeholders for `routes`, registers them and returns (route, value).
    pub fn mint_for_run(
        &self,
        token_id: &str,
        agent: &str,
        routes: &[&Route],
    ) -> Vec<(String, String)> {
        let made: Vec<(String, String)> = routes
            .iter()
            .filter(|r| enabled(r))
            .map(|r| (r.name.clone(), mint(&r.name)))
            .collect();
        let mut inner = self.lock();
        for (route, value) in &made {
            inner.by_hash.insert(
                hash(value.as_bytes()),
                Owner {
                    token_id: token_id.to_string(),
                    agent: agent.to_string(),
                    route: route.clone(),
                },
            );
        }
        inner.by_run.insert(token_id.to_string(), made.clone());
        made
    }

    /// Forgets a run's placeholders: its lease ended.
    pub fn forget_run(&self, token_id: &str) {
        let mut inner = self.lock();
        if let Some(list) = inner.by_run.remove(token_id) {
            for (_, value) in list {
                inner.by_hash.remove(&hash(value.as_bytes()));
            }
        }
    }

    /// The owner of a live placeholder.
    pub fn owner(&self, value: &[u8]) -> Option<Owner> {
        self.lock().by_hash.get(&hash(value)).cloned()
    }

    /// The run's placeholder for a route.
    pub fn of_run(&self, token_id: &str, route: &str) -> Option<String> {
        self.lock()
            .by_run
            .get(token_id)?
            .iter()
            .find(|(r, _)| r == route)
            .map(|(_, v)| v.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn hash(v: &[u8]) -> [u8; 32] {
    Sha256::digest(v).into()
}

/// What [`lift`] took off the request.
#[derive(Debug, Default)]
pub struct Lifted {
    /// Headers holding a live placeholder, all their values, to be put back (replaced) later.
    headers: Vec<(HeaderName, Vec<HeaderValue>)>,
    /// The run the placeholders belong to.
    owner: Option<Owner>,
    /// Every other value in a caller-credential header (`Authorization` and the SDK key
    /// headers), which `authenticate` strips: on a placeholder route each must be the caller's
    /// own token. Hashed only there ([`check_foreign`]), not on every request.
    others: Vec<HeaderValue>,
}

impl Lifted {
    /// The run the request's placeholders belong to.
    pub fn owner(&self) -> Option<&Owner> {
        self.owner.as_ref()
    }

    /// What the lifted headers say beyond their placeholders, for the request scan: each value
    /// with every `kgph_…` blanked, and a Basic value's decoded pair too. The scan must see
    /// these, or a secret next to a placeholder would ride past it.
    pub fn masked(&self) -> Vec<(&HeaderName, Vec<u8>)> {
        let mut out = Vec::new();
        for (name, values) in &self.headers {
            for v in values {
                // A Basic value is judged by its decoded pair: its base64 is opaque text.
                match basic_decoded(v.as_bytes()) {
                    Some(decoded) => out.push((name, mask(&decoded))),
                    None => out.push((name, mask(v.as_bytes()))),
                }
            }
        }
        out
    }
}

/// `text` with every `kgph_…` string replaced by a space, where it stands: a global replace of
/// each string would also cut into longer words around it and leave others whole.
fn mask(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut from = 0;
    for span in spans(text) {
        out.extend_from_slice(&text[from..span.start]);
        out.push(b' ');
        from = span.end;
    }
    out.extend_from_slice(&text[from..]);
    out
}

/// Whether a credential header's value is the placeholder and nothing else a tool would not
/// put there: `P`, `<scheme> P`, or `Basic base64(user:P)` / `Basic base64(P:)`.
fn credential_form(value: &[u8], p: &[u8]) -> bool {
    let v = value.trim_ascii();
    if v == p {
        return true;
    }
    if let Some(decoded) = basic_decoded(v) {
        let Some(colon) = decoded.iter().position(|&b| b == b':') else {
            return false;
        };
        let (user, pass) = (&decoded[..colon], &decoded[colon + 1..]);
        return (pass == p && find(user, PREFIX.as_bytes()).is_none())
            || (user == p && pass.is_empty());
    }
    match v.iter().position(|&b| b == b' ') {
        Some(i) => {
            let scheme = &v[..i];
            !scheme.is_empty()
                && scheme
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
                && v[i..].trim_ascii() == p
        }
        None => false,
    }
}

fn mismatch(message: impl Into<String>) -> Rejection {
    Rejection::new(Code::PlaceholderMismatch, message)
}

/// Takes every header holding a live placeholder off the request (so `authenticate` neither
/// mistakes it for a token nor strips it), and notes the other values of caller-credential
/// headers. A `kgph_` string in a credential position that is no live placeholder is refused; in
/// any other header it is ordinary text.
///
/// `foreign_check`: the request's route takes placeholders, so [`check_foreign`] will judge the
/// caller-credential values; on any other route they are not kept (no copy per request).
pub fn lift(
    headers: &mut HeaderMap,
    registry: &Registry,
    foreign_check: bool,
) -> Result<Lifted, Rejection> {
    let mut lifted = Lifted::default();
    // Nearly every request holds no `kgph_` and no Basic credential: one search per value says
    // so, and then nothing is looked up, hashed or copied.
    if !headers.values().any(|v| may_hold_placeholder(v.as_bytes())) {
        if foreign_check {
            lifted.others = caller_credentials(headers);
        }
        return Ok(lifted);
    }
    // Names are read in place and only live ones taken off afterwards: a request without
    // placeholders (nearly all) costs no copy of its header names.
    let mut live_names: Vec<HeaderName> = Vec::new();
    for name in headers.keys() {
        let credential_position = TOKEN_HEADERS.contains(&name.as_str());
        let mut live = false;
        for value in headers.get_all(name) {
            for candidate in candidates(value.as_bytes()) {
                match registry.owner(&candidate) {
                    Some(owner) => {
                        if lifted.owner.as_ref().is_some_and(|o| o.token_id != owner.token_id) {
                            return Err(mismatch(
                                "the request carries placeholders of two different runs",
                            ));
                        }
                        lifted.owner = Some(owner);
                        live = true;
                    }
                    None if credential_position => {
                        return Err(mismatch(format!(
                            "the {name} header holds a placeholder of no live run (its run ended, or it was never issued)"
                        )))
                    }
                    None => {}
                }
            }
        }
        if live {
            live_names.push(name.clone());
        } else if foreign_check
            && crate::authenticate::CALLER_CREDENTIAL_HEADERS.contains(&name.as_str())
        {
            lifted
                .others
                .extend(headers.get_all(name).iter().map(sensitive));
        }
    }
    for name in live_names {
        let values = headers.get_all(&name).iter().cloned().collect();
        headers.remove(&name);
        lifted.headers.push((name, values));
    }
    Ok(lifted)
}

/// Whether [`candidates`] could find anything in a header value: it holds `kgph_`, or it is a
/// Basic credential (whose decoded pair may).
fn may_hold_placeholder(value: &[u8]) -> bool {
    find(value, PREFIX.as_bytes()).is_some() || basic_scheme(value).is_some()
}

/// Every value of the caller-credential headers, as [`lift`] keeps them for [`check_foreign`].
fn caller_credentials(headers: &HeaderMap) -> Vec<HeaderValue> {
    headers
        .iter()
        .filter(|(name, _)| crate::authenticate::CALLER_CREDENTIAL_NAMES.contains(name))
        .map(|(_, v)| sensitive(v))
        .collect()
}

/// A caller's token, marked so that `Debug` of a `Lifted` never prints it.
fn sensitive(v: &HeaderValue) -> HeaderValue {
    let mut v = v.clone();
    v.set_sensitive(true);
    v
}

/// A credential header's token, as `authenticate` reads it: a Bearer value without its scheme.
fn credential_of(v: &[u8]) -> &[u8] {
    let v = v.trim_ascii();
    match v.iter().position(|&b| b == b' ') {
        Some(i) if v[..i].eq_ignore_ascii_case(b"bearer") => v[i..].trim_ascii(),
        _ => v,
    }
}

/// The `kgph_…` strings in a header value, also inside `Basic base64(user:pass)`.
fn candidates(value: &[u8]) -> Vec<Vec<u8>> {
    let mut found = find_all(value);
    if let Some(decoded) = basic_decoded(value) {
        found.extend(find_all(&decoded));
    }
    found
}

fn basic_decoded(value: &[u8]) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(basic_scheme(value)?)
        .ok()
}

/// The credential of a `Basic …` value, still encoded.
fn basic_scheme(value: &[u8]) -> Option<&[u8]> {
    let v = value.trim_ascii();
    let i = v.iter().position(|&b| b == b' ')?;
    v[..i]
        .eq_ignore_ascii_case(b"basic")
        .then(|| v[i..].trim_ascii())
}

/// Every maximal `kgph_[A-Za-z0-9_-]+` in `text`.
fn find_all(text: &[u8]) -> Vec<Vec<u8>> {
    spans(text).into_iter().map(|r| text[r].to_vec()).collect()
}

/// Where each maximal `kgph_[A-Za-z0-9_-]+` of `text` stands.
fn spans(text: &[u8]) -> Vec<std::ops::Range<usize>> {
    let word = |b: &u8| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'-';
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(at) = find(&text[i..], PREFIX.as_bytes()) {
        let start = i + at;
        // A `kgph_` inside a longer word is not a placeholder's start.
        if start > 0 && word(&text[start - 1]) {
            i = start + PREFIX.len();
            continue;
        }
        let len = text[start..].iter().take_while(|b| word(b)).count();
        out.push(start..start + len);
        i = start + len;
    }
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    // The prefix is searched in every header value of every request: its searcher is built once.
    static PREFIX_FINDER: LazyLock<memchr::memmem::Finder<'static>> =
        LazyLock::new(|| memchr::memmem::Finder::new(PREFIX.as_bytes()));
    if needle == PREFIX.as_bytes() {
        return PREFIX_FINDER.find(hay);
    }
    memchr::memmem::find(hay, needle)
}

/// Completes `authenticate`: a request with no token is its placeholder's run; one with a token
/// and a placeholder must carry its own run's. On a placeholder route (`placeholder_route`), a
/// second credential next to the token, or one next to a placeholder, is a foreign credential:
/// 403 `placeholder_mismatch` says so rather than 401.
pub fn identify(
    found: Result<Identity, Rejection>,
    lifted: &Lifted,
    config: &Config,
    placeholder_route: bool,
    live_run: impl Fn(&str) -> bool,
) -> Result<Identity, Rejection> {
    let foreign = |e: &Rejection| {
        e.code == Code::AmbiguousCredentials
            || (lifted.owner.is_some() && e.code == Code::InvalidToken)
    };
    if let Err(e) = &found {
        if placeholder_route && foreign(e) {
            return Err(mismatch(
                "this route takes its placeholder or no credential; the request carries another credential",
            ));
        }
    }
    let Some(owner) = &lifted.owner else {
        return found;
    };
    match found {
        Ok(who) if who.token_id.as_deref() == Some(owner.token_id.as_str()) => Ok(who),
        Ok(_) => Err(mismatch(
            "the placeholder belongs to another run than the caller's token",
        )),
        Err(e) if matches!(e.code, Code::MissingToken) => {
            let agent = config
                .agents
                .iter()
                .position(|a| a.name == owner.agent)
                .filter(|_| live_run(&owner.token_id))
                .ok_or_else(|| mismatch("the placeholder's run has ended"))?;
            Ok(Identity {
                agent: AgentId(agent),
                token_id: Some(owner.token_id.as_str().into()),
                person: None,
            })
        }
        Err(e) => Err(e),
    }
}

/// On a placeholder route, refuses a credential the agent sent that is neither the route's
/// placeholder nor the caller's own token: it is never overwritten, never forwarded.
pub fn check_foreign(
    route: &Route,
    lifted: &Lifted,
    caller_token_id: Option<&str>,
    headers: &HeaderMap,
) -> Result<(), Rejection> {
    if !enabled(route) {
        return Ok(());
    }
    for v in &lifted.others {
        let id = crate::authenticate::token_id(&hash(credential_of(v.as_bytes())));
        if caller_token_id != Some(id.as_str()) {
            return Err(mismatch(format!(
                "route {} takes its placeholder or no credential; the request carries another credential",
                route.name
            )));
        }
    }
    let inject = match &route.inject {
        Inject::Header { name, .. } => Some(name.as_str()),
        _ => None,
    };
    for name in TOKEN_HEADERS.iter().copied().chain(inject) {
        if crate::authenticate::CALLER_CREDENTIAL_HEADERS.contains(&name) {
            // Stripped by `authenticate`; judged above.
            continue;
        }
        if headers.contains_key(name) {
            return Err(mismatch(format!(
                "route {} takes its placeholder or no credential in {name}; the request carries another value",
                route.name
            )));
        }
    }
    Ok(())
}

/// The request parts a placeholder may be replaced in.
pub struct Target<'a> {
    /// The request headers (credential headers already stripped by `authenticate`).
    pub headers: &'a mut HeaderMap,
    /// The query string.
    pub query: &'a mut Option<String>,
    /// The body, when the route opted in and it was read whole.
    pub body: Option<&'a mut Bytes>,
    /// `max_request_bytes`: the body after replacement stays within it (413 past it).
    pub max_body: usize,
}

/// Puts the lifted headers back with the route's placeholder replaced by `value` in credential
/// positions, and replaces it in the query and body where the route opted in. Returns whether a
/// header now carries the credential (then `attach` leaves the agent's header as it is).
pub fn substitute(
    route: &Route,
    lifted: Lifted,
    placeholder: Option<&str>,
    value: &[u8],
    target: Target<'_>,
) -> Result<bool, Rejection> {
    let inject = match &route.inject {
        Inject::Header { name, .. } => Some(name.clone()),
        _ => None,
    };
    let signs = matches!(route.inject, Inject::AwsSigV4 { .. });
    let mut in_header = false;
    for (name, values) in lifted.headers {
        let credential_position =
            TOKEN_HEADERS.contains(&name.as_str()) || inject.as_ref() == Some(&name);
        if !credential_position {
            // A placeholder in an ordinary header is text the agent wrote: it goes on unchanged.
            for v in values {
                target.headers.append(name.clone(), v);
            }
            continue;
        }
        let Some(p) = placeholder else {
            return Err(mismatch(format!(
                "the placeholder in {name} is not one of route {}",
                route.name
            )));
        };
        for v in &values {
            let own = candidates(v.as_bytes()).iter().all(|c| c == p.as_bytes());
            if own && !credential_form(v.as_bytes(), p.as_bytes()) {
                return Err(mismatch(format!(
                    "the {name} header holds more than a scheme, a Basic user name and the placeholder"
                )));
            }
            if !own {
                return Err(mismatch(format!(
                    "the placeholder in {name} is not one of route {}",
                    route.name
                )));
            }
        }
        if signs {
            // The tool signed with the placeholder; keygate signs anew with the real keys.
            continue;
        }
        for v in values {
            let mut replaced =
                replace_header(v.as_bytes(), p.as_bytes(), value).ok_or_else(|| {
                    Rejection::new(
                    Code::SecretUnavailable,
                    "the credential cannot be put in that header (it holds bytes a header may not)",
                )
                })?;
            replaced.set_sensitive(true);
            target.headers.append(name.clone(), replaced);
            in_header = true;
        }
    }
    let Some(p) = placeholder else {
        return Ok(in_header);
    };
    if signs {
        // The value is the signing key pair, which never goes on the wire (config refuses
        // `placeholder_in` here; this holds also if that check is ever lost).
        return Ok(in_header);
    }
    if route.placeholder_in.query {
        if let Some(q) = target.query.as_mut() {
            if q.contains(p) {
                let enc = percent_encoding::percent_encode(value, crate::redact::QUERY_COMPONENT)
                    .to_string();
                *q = q.replace(p, &enc);
            }
        }
    }
    if let Some(body) = target.body.filter(|_| route.placeholder_in.body) {
        if find(body, p.as_bytes()).is_some() {
            let escaped = escape_for_body(target.headers, value);
            // Each placeholder grows into the escaped value: bound the result before building it.
            let count = memchr::memmem::find_iter(body, p.as_bytes()).count();
            let grown = body
                .len()
                .saturating_add(count.saturating_mul(escaped.len().saturating_sub(p.len())));
            if grown > target.max_body {
                return Err(Rejection::new(
                    Code::RequestTooLarge,
                    format!(
                        "with its placeholders replaced the body would be {grown} bytes, over max_request_bytes ({})",
                        target.max_body
                    ),
                ));
            }
            *body = Bytes::from(replace_bytes(body, p.as_bytes(), &escaped));
        }
    }
    Ok(in_header)
}

/// A header value with `placeholder` replaced by `value`, also inside `Basic base64(…)`.
fn replace_header(v: &[u8], placeholder: &[u8], value: &[u8]) -> Option<HeaderValue> {
    let out = match basic_decoded(v) {
        Some(decoded) if find(&decoded, placeholder).is_some() => {
            let pair = zeroize::Zeroizing::new(replace_bytes(&decoded, placeholder, value));
            let mut out = b"Basic ".to_vec();
            out.extend_from_slice(
                base64::engine::general_purpose::STANDARD
                    .encode(&*pair)
                    .as_bytes(),
            );
            out
        }
        _ => replace_bytes(v, placeholder, value),
    };
    let out = zeroize::Zeroizing::new(out);
    HeaderValue::from_bytes(&out).ok()
}

fn replace_bytes(hay: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(hay.len() + with.len());
    let mut rest = hay;
    while let Some(i) = find(rest, needle) {
        out.extend_from_slice(&rest[..i]);
        out.extend_from_slice(with);
        rest = &rest[i + needle.len()..];
    }
    out.extend_from_slice(rest);
    out
}

/// The value as the body's format spells it: inside a JSON string, or a form field.
fn escape_for_body(headers: &HeaderMap, value: &[u8]) -> Vec<u8> {
    let ct = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if ct.contains("json") {
        let s = String::from_utf8_lossy(value);
        let quoted = serde_json::to_string(&s).unwrap_or_default();
        // Always `"…"`: the quotes are the placeholder's string's own.
        let inner = quoted
            .strip_prefix('"')
            .and_then(|q| q.strip_suffix('"'))
            .unwrap_or("");
        return inner.as_bytes().to_vec();
    }
    if ct.starts_with("application/x-www-form-urlencoded") {
        return percent_encoding::percent_encode(value, crate::redact::QUERY_COMPONENT)
            .to_string()
            .into_bytes();
    }
    value.to_vec()
}

#[cfg(test)]
mod tests;
