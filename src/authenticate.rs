//! Stage `authenticate`: who is calling.
//!
//! Input: request headers. Output: the index of the calling agent, or a refusal (401).
//!
//! A keygate token may arrive in `X-Broker-Token` (the lab broker's header) or in the header an
//! SDK puts its api key in (`Authorization: Bearer`, `x-api-key`, `api-key`), so an SDK's
//! `api_key` can simply be the token. Tokens are kept only as SHA-256 hashes; a presented token is
//! hashed and looked up, and the final comparison is constant-time.
//!
//! Architecture invariant: [`strip_caller_credentials`] runs on every forwarded request, so the
//! agent's token never reaches an upstream.

pub mod caller;
pub mod store;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use http::{HeaderMap, HeaderName};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{AgentId, Config, Mode};
use crate::error::{Code, Rejection};

pub use caller::{CALLER_CREDENTIAL_HEADERS, CALLER_CREDENTIAL_NAMES};

type TokenMap<V> = HashMap<[u8; 32], V, foldhash::fast::RandomState>;

/// The agents' tokens, matched in constant time; a request's token names its agent.
pub struct Tokens {
    /// Tokens from the environment (`token_env`), for the life of the process. Keyed by SHA-256
    /// digests, looked up once per request: foldhash (seeded per process) instead of SipHash,
    /// which cost a request ~250 instructions; nothing an agent sends is ever inserted.
    by_hash: TokenMap<usize>,
    /// Tokens issued with `keygate token issue`: hash -> (agent, expiry in Unix seconds).
    issued: ArcSwap<TokenMap<(usize, u64)>>,
    state_dir: Option<PathBuf>,
    /// The state store (opened at the first refresh) and the token revision last read from it.
    seen: Mutex<(Option<SharedStore>, Option<u64>)>,
    agent_names: Vec<String>,
    /// The lab broker without `client_token_env` admits every local caller as this agent.
    open_agent: Option<usize>,
    /// Unix-socket peers known by uid (`[agents.A] unix_uids`).
    by_uid: HashMap<u32, usize>,
    /// Token ids revoked in memory (ended leases), refused whether or not the store took the
    /// revocation; shared by every reloaded state.
    revoked: Arc<RevokedIds>,
    /// Verified client certificates known by subject (`[agents.A] client_cert_subject`).
    by_subject: Vec<(String, usize)>,
    /// Each agent's `person_header`, read only once that agent has authenticated.
    person_headers: Vec<Option<HeaderName>>,
    /// The refusal for a request with no token: the backend companion's config answers as
    /// the companion did (`backend_token_required`).
    missing: Code,
    /// Issued tokens live in a shared store, handed over by [`Tokens::use_store`].
    shared: bool,
}

/// Token ids refused at once, whatever the store says: a lease that ended is dead even when
/// the store could not record it (the token would otherwise live to its TTL).
#[derive(Debug, Default)]
pub struct RevokedIds(Mutex<HashSet<String>>);

impl RevokedIds {
    /// Refuses this token id from now on.
    pub fn insert(&self, token_id: &str) {
        self.lock().insert(token_id.to_string());
    }

    /// Whether this token id was revoked in memory.
    pub fn contains(&self, token_id: &str) -> bool {
        let set = self.lock();
        !set.is_empty() && set.contains(token_id)
    }

    /// Forgets ids the store no longer lists as live: it refuses them by itself now.
    fn keep_only(&self, live: &HashSet<&str>) {
        self.lock().retain(|id| live.contains(id.as_str()));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}
/// Longest person name a front end may send; longer is refused, not cut.
const MAX_PERSON: usize = 128;

type SharedStore = Arc<dyn crate::state::StateStore>;

/// Who is calling: the agent, and the id of the token it presented (never the token).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The configured agent the token belongs to.
    pub agent: AgentId,
    /// `tok_` + the first 12 hex digits of the token's SHA-256, as `token list` shows it;
    /// shared with the audit record (a reference count, not a copy).
    pub token_id: Option<Arc<str>>,
    /// The person a trusted front end named (`person_header`); `None` for other agents.
    pub person: Option<String>,
}

/// A start-up problem with tokens: the lab broker refuses to start when `client_token_env` names
/// an unset variable, and so does keygate.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("agent {agent}: token environment variable {var} is not set or empty")]
    /// An agent's `token_env` names a variable that is unset or empty.
    EnvMissing {
        /// The agent's name.
        agent: String,
        /// The environment variable's name.
        var: String,
    },
    #[error("agents {a} and {b} have the same token; give each agent its own")]
    /// Two agents have the same token, so a request could not say which one it is.
    Shared {
        /// One agent's name.
        a: String,
        /// The other agent's name.
        b: String,
    },
}

impl Tokens {
    /// Reads each agent's token from the environment, once, and keeps its hash.
    pub fn from_config(config: &Config) -> Result<Tokens, TokenError> {
        let mut by_hash = TokenMap::default();
        let mut open_agent = None;
        let mut by_uid = HashMap::new();
        let mut by_subject = Vec::new();
        for (i, agent) in config.agents.iter().enumerate() {
            if let Some(subject) = &agent.client_cert_subject {
                by_subject.push((subject.clone(), i));
            }
            for uid in &agent.unix_uids {
                by_uid.insert(*uid, i);
            }
            if agent.open {
                open_agent = Some(i);
            }
            if let Some(var) = &agent.token_env {
                let value = std::env::var(var).unwrap_or_default();
                let value = zeroize::Zeroizing::new(value.trim().to_string());
                // A dry run fetches no secret and contacts no upstream, so it needs no token
                // either: with the variable unset, the (first such) agent takes callers without
                // one, as the lab's dry-run config without `client_token_env` does.
                if value.is_empty() && config.mode == Mode::DryRun && open_agent.is_none() {
                    tracing::warn!(
                        agent = %agent.name,
                        var = %var,
                        "dry run: token variable unset, so callers need no token and act as this agent"
                    );
                    open_agent = Some(i);
                    continue;
                }
                if value.is_empty() {
                    return Err(TokenError::EnvMissing {
                        agent: agent.name.clone(),
                        var: var.clone(),
                    });
                }
                if let Some(prev) = by_hash.insert(hash(value.as_bytes()), i) {
                    return Err(TokenError::Shared {
                        a: config.agents[prev].name.clone(),
                        b: agent.name.clone(),
                    });
                }
            }
        }
        let tokens = Tokens {
            by_hash,
            issued: ArcSwap::from_pointee(TokenMap::default()),
            state_dir: config.state_dir.clone(),
            seen: Mutex::new((None, None)),
            agent_names: config.agents.iter().map(|a| a.name.clone()).collect(),
            open_agent,
            by_uid,
            revoked: Arc::default(),
            by_subject,
            person_headers: config
                .agents
                .iter()
                .map(|a| a.person_header.clone())
                .collect(),
            missing: match config.seed.as_ref().and_then(|s| s.backend.as_ref()) {
                Some(_) => Code::BackendTokenRequired,
                None => Code::MissingToken,
            },
            shared: matches!(config.state, crate::config::StateBackend::Redis(_)),
        };
        tokens.refresh();
        Ok(tokens)
    }

    /// Shares an in-memory revocation set (kept across reloads by the caller).
    pub fn with_revoked(mut self, revoked: Arc<RevokedIds>) -> Tokens {
        self.revoked = revoked;
        self
    }

    /// Reads issued tokens from `store` (a shared store, opened once by `serve`) from now on.
    pub fn use_store(&self, store: SharedStore) {
        {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            *seen = (Some(store), None);
        }
        self.refresh();
    }

    /// Re-reads issued tokens if they changed (the store's token revision; one small query when
    /// they did not). A store that cannot be read keeps the previous set and is reported, and
    /// the revision is recorded only once its tokens were read, so the next refresh tries again.
    pub fn refresh(&self) {
        // Held for the whole refresh: two refreshes racing could otherwise install an older set
        // over a newer one. Refreshes run off the request path.
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.0.is_none() {
            // A shared store is handed over by `use_store`; the embedded one is opened here.
            let Some(dir) = self.state_dir.as_ref().filter(|_| !self.shared) else {
                return;
            };
            match store::open(dir) {
                Ok(s) => seen.0 = Some(s),
                Err(e) => {
                    tracing::error!(error = %e, "cannot open the token store; keeping the previous set");
                    return;
                }
            }
        }
        let Some(store) = seen.0.clone() else { return };
        let last = seen.1;
        seen.1 = self.refresh_from(
            last,
            || store.tokens_revision().map_err(|e| e.to_string()),
            || {
                store
                    .tokens()
                    .map_err(store::StoreError::from)
                    .map_err(|e| e.to_string())
            },
        );
    }

    /// One refresh against `revision` and `read`; returns the revision now installed.
    fn refresh_from(
        &self,
        last: Option<u64>,
        revision: impl FnOnce() -> Result<u64, String>,
        read: impl FnOnce() -> Result<Vec<store::Issued>, String>,
    ) -> Option<u64> {
        let rev = match revision() {
            Ok(rev) if last == Some(rev) => return last,
            Ok(rev) => rev,
            Err(e) => {
                tracing::error!(error = %e, "cannot read issued tokens; keeping the previous set");
                return last;
            }
        };
        match read() {
            Ok(list) => {
                let map = list
                    .iter()
                    .filter(|t| !t.revoked)
                    .filter_map(|t| {
                        let agent = self.agent_names.iter().position(|n| n == &t.agent)?;
                        let mut h = [0u8; 32];
                        hex::decode_to_slice(&t.sha256, &mut h).ok()?;
                        Some((h, (agent, t.expires)))
                    })
                    .collect();
                self.issued.store(Arc::new(map));
                let live: HashSet<&str> = list
                    .iter()
                    .filter(|t| !t.revoked)
                    .map(|t| t.id.as_str())
                    .collect();
                self.revoked.keep_only(&live);
                Some(rev)
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read issued tokens; keeping the previous set");
                last
            }
        }
    }

    /// Whether issued tokens can change while running (a state_dir is configured).
    pub fn has_store(&self) -> bool {
        self.state_dir.is_some() || self.shared
    }

    /// The agent whose token the request carries, or a 401.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<AgentId, Rejection> {
        self.by_token(headers).map(|(agent, _)| AgentId(agent))
    }

    /// The caller's identity: a valid token, else a Unix-socket peer uid or a verified client
    /// certificate mapped to an agent (no token needed; whatever the SDK sent as its key is
    /// stripped like any caller credential). Then, for an agent that is a trusted front end,
    /// the person it names in its `person_header`, which it then removes.
    pub fn identify(
        &self,
        head: &mut http::request::Parts,
        peer: &crate::guard::Peer,
    ) -> Result<Identity, Rejection> {
        if let Some(via) = head.extensions.get::<crate::proxy::Via>() {
            return self.proxied(via);
        }
        let mut who = self.agent_of(head, peer)?;
        if let Some(Some(name)) = self.person_headers.get(who.agent.0) {
            who.person = Some(person_in(&head.headers, name)?);
            head.headers.remove(name);
        }
        Ok(who)
    }

    /// The caller of a request that came through the forward proxy: the keygate token its
    /// `Proxy-Authorization` carried (checked again for each request in a tunnel, so a revoked
    /// token stops a tunnel's next request). The request's own headers are the upstream's and
    /// name no caller.
    ///
    /// The seam for callers that cannot send proxy credentials: a live per-run placeholder in
    /// the inner request would identify its run here.
    pub fn proxied(&self, via: &crate::proxy::Via) -> Result<Identity, Rejection> {
        let mut headers = HeaderMap::new();
        if let Some(v) = via
            .token()
            .and_then(|t| http::HeaderValue::from_bytes(t).ok())
        {
            headers.insert(HeaderName::from_static("x-broker-token"), v);
        }
        let (agent, hash) = self.by_token(&headers)?;
        Ok(Identity {
            agent: AgentId(agent),
            token_id: hash.map(|h| shared_token_id(&h)),
            person: None,
        })
    }

    fn agent_of(
        &self,
        head: &http::request::Parts,
        peer: &crate::guard::Peer,
    ) -> Result<Identity, Rejection> {
        let found = |agent| Identity {
            agent: AgentId(agent),
            token_id: None,
            person: None,
        };
        match self.by_token(&head.headers) {
            Ok((agent, hash)) => Ok(Identity {
                token_id: hash.map(|h| shared_token_id(&h)),
                ..found(agent)
            }),
            // A refusal that is not about a missing or unknown token (two different tokens)
            // stands; only the absence of a valid token falls back to the peer's uid or
            // certificate.
            Err(e) if e.code == Code::AmbiguousCredentials => Err(e),
            Err(e) => {
                if let crate::guard::Peer::Unix { uid, .. } = peer {
                    if let Some(&agent) = self.by_uid.get(uid) {
                        return Ok(found(agent));
                    }
                }
                let subject = head
                    .extensions
                    .get::<crate::listen::ConnInfo>()
                    .and_then(|c| c.client_subject.as_deref());
                let Some(subject) = subject else {
                    return Err(e);
                };
                let mut matching = self
                    .by_subject
                    .iter()
                    .filter(|(want, _)| crate::listen::tls::subject_matches(want, subject));
                // A certificate that two agents' subjects both describe names neither.
                match (matching.next(), matching.next()) {
                    (Some(&(_, agent)), None) => Ok(found(agent)),
                    _ => Err(e),
                }
            }
        }
    }

    fn by_token(&self, headers: &HeaderMap) -> Result<(usize, Option<[u8; 32]>), Rejection> {
        // Two different tokens: which one is the caller? Taking whichever is valid would let a
        // request ride on a token found anywhere next to its own (and leave the audit guessing).
        // The same token twice is what SDKs do (Anthropic's sends `Authorization` and `x-api-key`).
        // An open lab broker (no client token) takes whatever an SDK sends as its key: nothing
        // is a token there, so nothing is ambiguous.
        let open = self.open_agent.is_some();
        let mut first: Option<&[u8]> = None;
        for value in candidates(headers).filter(|_| !open) {
            match first {
                None => first = Some(value),
                Some(f) if f != value => {
                    return Err(Rejection::new(
                        Code::AmbiguousCredentials,
                        "the request carries different tokens in its credential headers (X-Broker-Token, Authorization, x-api-key, api-key, x-goog-api-key); send one token",
                    ))
                }
                Some(_) => {}
            }
        }
        let mut presented = false;
        let mut expired = false;
        let issued = self.issued.load();
        // Past the check above every candidate equals the first: it is hashed and looked up
        // once, not once per header that repeats it. An open broker tries each in turn.
        let every = open.then(|| candidates(headers));
        for value in first.into_iter().chain(every.into_iter().flatten()) {
            presented = true;
            let h = hash(value);
            if let Some((stored, &agent)) = self.by_hash.get_key_value(&h) {
                // The map lookup found the entry by hash; confirming in constant time keeps the
                // comparison itself from being a timing oracle should the lookup ever change.
                if same_hash(stored, &h) {
                    return Ok((agent, Some(h)));
                }
            }
            if let Some((stored, &(agent, expires))) = issued.get_key_value(&h) {
                if same_hash(stored, &h) && !self.revoked.contains(&token_id(&h)) {
                    if store::now() < expires {
                        return Ok((agent, Some(h)));
                    }
                    expired = true;
                }
            }
        }
        if expired {
            return Err(Rejection::new(
                Code::TokenExpired,
                "the keygate token has expired; ask for a new one",
            ));
        }
        if let Some(agent) = self.open_agent {
            return Ok((agent, None));
        }
        if presented {
            Err(Rejection::new(
                Code::InvalidToken,
                "the keygate token is not valid",
            ))
        } else {
            Err(Rejection::new(
                self.missing,
                "a keygate token is required: send it as the SDK api key (Authorization: Bearer, x-api-key) or in X-Broker-Token or X-Backend-Token",
            ))
        }
    }
}

/// A token's public id: `tok_` + the first 12 hex digits of its SHA-256.
pub(crate) fn token_id(hash: &[u8; 32]) -> String {
    String::from_utf8_lossy(&token_id_bytes(hash)).into_owned()
}

/// [`token_id`] in one allocation that the audit record then shares.
fn shared_token_id(hash: &[u8; 32]) -> Arc<str> {
    Arc::from(String::from_utf8_lossy(&token_id_bytes(hash)).as_ref())
}

fn token_id_bytes(hash: &[u8; 32]) -> [u8; 16] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = *b"tok_000000000000";
    for (i, &b) in hash[..6].iter().enumerate() {
        id[4 + 2 * i] = HEX[usize::from(b >> 4)];
        id[5 + 2 * i] = HEX[usize::from(b & 0xf)];
    }
    id
}

/// The person a front end names: one header instance, printable ASCII without spaces at the
/// ends, at most [`MAX_PERSON`] bytes, so the audit `person` is one unambiguous name.
fn person_in(headers: &HeaderMap, name: &HeaderName) -> Result<String, Rejection> {
    let refuse = |why: &str| {
        Err(Rejection::new(
            Code::UserHeaderRequired,
            format!("this caller must name the person in one {name} header: {why}"),
        ))
    };
    let mut values = headers.get_all(name).iter();
    let (Some(v), None) = (values.next(), values.next()) else {
        return refuse("it is missing or sent more than once");
    };
    let Ok(v) = v.to_str() else {
        return refuse("it is not printable ASCII");
    };
    let v = v.trim();
    if v.is_empty() || v.len() > MAX_PERSON || v.bytes().any(|b| b.is_ascii_control()) {
        return refuse("it is empty, too long or holds control characters");
    }
    Ok(v.to_string())
}

/// Two token hashes compared in constant time: every byte is looked at, and the one decision is
/// `subtle`'s (a byte-wise `ct_eq` makes one opaque choice per byte, 32 per request).
fn same_hash(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    bool::from(diff.ct_eq(&0))
}

fn hash(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// Token candidates in the order of precedence.
fn candidates(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    crate::headerset::held(headers, &CALLER_CREDENTIAL_NAMES).flat_map(move |name| {
        headers.get_all(name).iter().filter_map(move |v| {
            let v = v.as_bytes();
            let v = if name == http::header::AUTHORIZATION {
                strip_scheme(v)?
            } else {
                v
            };
            let v = v.trim_ascii();
            (!v.is_empty()).then_some(v)
        })
    })
}

fn strip_scheme(v: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = v.split_at(v.iter().position(|&b| b == b' ')?);
    scheme.eq_ignore_ascii_case(b"bearer").then_some(rest)
}

/// Removes every header that could carry the caller's own credential.
pub fn strip_caller_credentials(headers: &mut HeaderMap) {
    crate::headerset::remove_all(headers, &CALLER_CREDENTIAL_NAMES);
    headers.remove(http::header::PROXY_AUTHORIZATION);
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests wait on plain threads
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn token_hashes_are_equal_only_when_every_byte_is() {
        let a = hash(b"kg_one");
        assert!(same_hash(&a, &a.clone()));
        for i in 0..32 {
            let mut b = a;
            b[i] ^= 0x80;
            assert!(!same_hash(&a, &b), "byte {i}");
        }
    }

    #[test]
    fn token_id_is_tok_and_the_first_twelve_hex_digits_of_the_hash() {
        for token in ["a", "kg_example", ""] {
            let h = hash(token.as_bytes());
            assert_eq!(token_id(&h), format!("tok_{}", &hex::encode(h)[..12]));
        }
    }

    fn tokens(token: &str) -> Tokens {
        let mut by_hash = TokenMap::default();
        by_hash.insert(hash(token.as_bytes()), 0);
        Tokens {
            by_hash,
            issued: ArcSwap::from_pointee(TokenMap::default()),
            state_dir: None,
            seen: Mutex::new((None, None)),
            agent_names: vec!["a".into()],
            open_agent: None,
            by_uid: HashMap::from([(4242, 0)]),
            revoked: Arc::default(),
            by_subject: vec![("CN=ci".to_string(), 0)],
            person_headers: vec![None],
            missing: Code::MissingToken,
            shared: false,
        }
    }

    fn parts(pairs: &[(&str, &str)]) -> http::request::Parts {
        let mut req = http::Request::new(());
        *req.headers_mut() = headers(pairs);
        req.into_parts().0
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn token_is_accepted_from_every_sdk_header() {
        let t = tokens("kg_abc");
        for h in [
            headers(&[("x-broker-token", "kg_abc")]),
            headers(&[("authorization", "Bearer kg_abc")]),
            headers(&[("authorization", "bearer  kg_abc")]),
            headers(&[("x-api-key", "kg_abc")]),
            headers(&[("api-key", "kg_abc")]),
            headers(&[("x-goog-api-key", "kg_abc")]),
            // Anthropic SDKs may send the same key in both.
            headers(&[("authorization", "Bearer kg_abc"), ("x-api-key", "kg_abc")]),
            headers(&[("x-broker-token", "kg_abc"), ("x-broker-token", " kg_abc")]),
            headers(&[("authorization", "Basic eDp5"), ("x-api-key", "kg_abc")]),
        ] {
            assert_eq!(t.authenticate(&h).unwrap(), AgentId(0), "{h:?}");
        }
    }

    #[test]
    fn different_tokens_in_one_request_are_ambiguous_even_when_one_is_valid() {
        let t = tokens("kg_abc");
        for h in [
            headers(&[("x-broker-token", "kg_abc"), ("x-broker-token", "kg_x")]),
            headers(&[
                ("x-broker-token", "kg_x"),
                ("authorization", "Bearer kg_abc"),
            ]),
            headers(&[("authorization", "Bearer other"), ("x-api-key", "kg_abc")]),
            headers(&[("api-key", "kg_abc"), ("x-api-key", "kg_abd")]),
        ] {
            assert_eq!(
                t.authenticate(&h).unwrap_err().code,
                Code::AmbiguousCredentials,
                "{h:?}"
            );
        }
    }

    #[test]
    fn missing_and_wrong_tokens_are_told_apart() {
        let t = tokens("kg_abc");
        assert_eq!(
            t.authenticate(&headers(&[])).unwrap_err().code.as_str(),
            "missing_token"
        );
        assert_eq!(
            t.authenticate(&headers(&[("x-api-key", "kg_abd")]))
                .unwrap_err()
                .code
                .as_str(),
            "invalid_token"
        );
        assert_eq!(
            t.authenticate(&headers(&[("authorization", "Basic kg_abc")]))
                .unwrap_err()
                .code
                .as_str(),
            "missing_token"
        );
    }

    #[test]
    fn a_mapped_unix_uid_needs_no_token_and_an_unmapped_one_does() {
        let t = tokens("kg_abc");
        let mapped = crate::guard::Peer::Unix {
            uid: 4242,
            pid: None,
        };
        let other = crate::guard::Peer::Unix {
            uid: 4243,
            pid: None,
        };
        let id = t
            .identify(&mut parts(&[("x-api-key", "dummy")]), &mapped)
            .unwrap();
        assert_eq!(
            id,
            Identity {
                agent: AgentId(0),
                token_id: None,
                person: None,
            }
        );
        let e = t.identify(&mut parts(&[]), &other).unwrap_err();
        assert_eq!(e.code.as_str(), "missing_token");
        let id = t
            .identify(&mut parts(&[("x-api-key", "kg_abc")]), &other)
            .unwrap();
        let want = format!("tok_{}", &store::hash_hex(b"kg_abc")[..12]);
        assert_eq!(id.token_id.as_deref(), Some(want.as_str()));
    }

    #[test]
    fn a_front_end_names_the_person_only_after_it_authenticated() {
        let mut t = tokens("kg_abc");
        t.person_headers = vec![Some(HeaderName::from_static("x-user-id"))];
        let tcp = crate::guard::Peer::Tcp(([127, 0, 0, 1], 9).into());
        let mut head = parts(&[("x-api-key", "kg_abc"), ("x-user-id", " alice ")]);
        let who = t.identify(&mut head, &tcp).unwrap();
        assert_eq!(who.person.as_deref(), Some("alice"));
        assert!(head.headers.get("x-user-id").is_none(), "stripped");
        let e = t
            .identify(&mut parts(&[("x-user-id", "alice")]), &tcp)
            .unwrap_err();
        assert_eq!(e.code.as_str(), "missing_token");
        for bad in [
            vec![("x-api-key", "kg_abc")],
            vec![("x-api-key", "kg_abc"), ("x-user-id", "")],
            vec![
                ("x-api-key", "kg_abc"),
                ("x-user-id", "a"),
                ("x-user-id", "b"),
            ],
        ] {
            let e = t.identify(&mut parts(&bad), &tcp).unwrap_err();
            assert_eq!(e.code.as_str(), "user_header_required", "{bad:?}");
        }
        let long = "a".repeat(MAX_PERSON + 1);
        let e = t
            .identify(
                &mut parts(&[("x-api-key", "kg_abc"), ("x-user-id", &long)]),
                &tcp,
            )
            .unwrap_err();
        assert_eq!(e.code.as_str(), "user_header_required");
    }

    #[test]
    fn a_verified_certificate_subject_is_its_agent() {
        let t = tokens("kg_abc");
        let tcp = crate::guard::Peer::Tcp(([127, 0, 0, 1], 9).into());
        let with = |subject: &str| {
            let mut p = parts(&[]);
            p.extensions.insert(crate::listen::ConnInfo {
                client_subject: Some(subject.into()),
                exposed: false,
            });
            p
        };
        assert_eq!(
            t.identify(&mut with("CN=ci"), &tcp).unwrap().agent,
            AgentId(0)
        );
        let e = t.identify(&mut with("CN=other"), &tcp).unwrap_err();
        assert_eq!(e.code.as_str(), "missing_token");
    }

    #[test]
    fn caller_credentials_are_stripped() {
        let mut h = headers(&[
            ("authorization", "Bearer x"),
            ("x-api-key", "y"),
            ("api-key", "z"),
            ("x-broker-token", "w"),
            ("x-backend-token", "v"),
            ("accept", "*/*"),
        ]);
        strip_caller_credentials(&mut h);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn issued_tokens_authenticate_until_revoked_or_expired() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!("state_dir = \"{}\"\n[agents.coder]\n", dir.path().display());
        let c = crate::config::Config::from_text(Path::new("a.toml"), &text).unwrap();
        let (token, rec) =
            store::issue(dir.path(), "coder", std::time::Duration::from_secs(60)).unwrap();
        let t = Tokens::from_config(&c).unwrap();
        let h = headers(&[("x-api-key", &token)]);
        assert_eq!(t.authenticate(&h).unwrap(), AgentId(0));
        store::revoke(dir.path(), Some(&rec.id), None).unwrap();
        t.refresh();
        assert_eq!(
            t.authenticate(&h).unwrap_err().code.as_str(),
            "invalid_token"
        );
        let (old, _) =
            store::issue(dir.path(), "coder", std::time::Duration::from_secs(1)).unwrap();
        t.refresh();
        std::thread::sleep(std::time::Duration::from_millis(2100));
        assert_eq!(
            t.authenticate(&headers(&[("x-api-key", &old)]))
                .unwrap_err()
                .code
                .as_str(),
            "token_expired"
        );
    }

    #[test]
    fn unset_token_env_stops_start_up_naming_the_variable() {
        let c = crate::config::Config::from_text(
            Path::new("a.toml"),
            "[agents.a]\ntoken_env = \"KEYGATE_TEST_SURELY_UNSET_VAR\"\n",
        )
        .unwrap();
        let e = Tokens::from_config(&c).err().unwrap();
        assert!(
            e.to_string().contains("KEYGATE_TEST_SURELY_UNSET_VAR"),
            "{e}"
        );
    }

    fn issued(token: &str, revoked: bool) -> store::Issued {
        let sha = hex::encode(hash(token.as_bytes()));
        store::Issued {
            id: format!("tok_{}", &sha[..12]),
            agent: "a".into(),
            sha256: sha,
            created: 0,
            expires: u64::MAX,
            revoked,
            lease: true,
        }
    }

    fn bearer(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("authorization", format!("Bearer {token}").parse().unwrap());
        h
    }

    #[test]
    fn a_token_revoked_in_memory_is_refused_though_the_store_still_lists_it() {
        let run = format!("kg_{}", "r".repeat(32));
        let t = tokens("other-token-for-env");
        let rev = t.refresh_from(None, || Ok(1), || Ok(vec![issued(&run, false)]));
        assert_eq!(rev, Some(1));
        assert!(t.authenticate(&bearer(&run)).is_ok());
        t.revoked.insert(&issued(&run, false).id);
        let e = t.authenticate(&bearer(&run)).unwrap_err();
        assert_eq!(e.code, Code::InvalidToken);
        // Its neighbour: the environment token is untouched.
        assert!(t.authenticate(&bearer("other-token-for-env")).is_ok());
        // Once the store says revoked too, the in-memory entry is no longer needed.
        t.refresh_from(rev, || Ok(2), || Ok(vec![issued(&run, true)]));
        assert!(t.revoked.0.lock().unwrap().is_empty());
        assert!(t.authenticate(&bearer(&run)).is_err());
    }

    #[test]
    fn a_failed_token_read_does_not_freeze_the_old_set() {
        let run = format!("kg_{}", "s".repeat(32));
        let t = tokens("other-token-for-env");
        t.refresh_from(None, || Ok(1), || Ok(vec![issued(&run, false)]));
        assert!(t.authenticate(&bearer(&run)).is_ok());
        // The revision moved (the token was revoked) but the read failed: nothing is recorded…
        let rev = t.refresh_from(Some(1), || Ok(2), || Err("database is locked".into()));
        assert_eq!(rev, Some(1));
        // …so the next refresh at the same revision reads again and sees the revocation.
        let rev = t.refresh_from(rev, || Ok(2), || Ok(vec![issued(&run, true)]));
        assert_eq!(rev, Some(2));
        assert!(t.authenticate(&bearer(&run)).is_err());
    }
}
