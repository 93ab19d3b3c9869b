//! Stage `credential`: the secret for the route, fetched or taken from cache, and attached to the
//! outbound request.
//!
//! Input: an [`Authorized`] request's route. Output: the request head with the credential added,
//! and the key id for audit. A secret is fetched at first use, then reused until its TTL ends or
//! an upstream rejects it (401), once. Concurrent requests share one fetch.
//!
//! Architecture invariant: this module is, with the redactor's builder, the only caller of
//! [`Secret::expose`]. Every value ever held (current and the one before a rotation) is taught to
//! the response redactor.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use base64::Engine;
use http::{header, HeaderMap, HeaderValue};

use crate::authorize::Authorized;
use crate::config::{Config, Inject, Route, SecretId};
use crate::error::{Code, Rejection};
use crate::lock;
use crate::redact::{Redactor, RedactorBuilder};
use crate::secret::{KeyId, Secret, SecretSource, SecretSpec};

/// After a failed fetch, callers within this window get the same error instead of each running the
/// secret command again (a locked password manager would otherwise be asked once per request).
const FAILURE_BACKOFF: Duration = Duration::from_secs(1);

/// How long before its source-given expiry a value is fetched afresh.
pub(crate) const EXPIRY_MARGIN: Duration = Duration::from_secs(30);

/// How many values of one secret stay known to the redactor after rotations.
const REMEMBERED_VALUES: usize = 2;

/// How many dynamic credentials (leases) of one secret stay known to the redactor.
const REMEMBERED_LEASES: usize = 256;

/// Every configured secret, fetched at first use and reused until its TTL ends; the only holder
/// that exposes a value.
pub struct Credentials {
    /// One per configured secret, indexed by [`SecretId`].
    entries: Vec<Entry>,
    /// Held values only: what is scrubbed from responses.
    redactor: ArcSwap<Redactor>,
    /// Held values and the strong credential-format detectors: what a request from an agent must
    /// not carry.
    scanner: ArcSwap<Redactor>,
    held: Mutex<Vec<Arc<Secret>>>,
    /// Bumped each time a value is added to `held`.
    generation: AtomicU64,
    /// The generation of `held` the installed redactor and scanner were built from.
    stored: Mutex<u64>,
    /// One rebuild at a time for [`Credentials::remember_coalesced`].
    building: tokio::sync::Mutex<()>,
    /// `jit = "run"`: the credential of each `keygate run`, by (secret, run id), until the run
    /// ends ([`Credentials::end_run`]).
    per_run: Mutex<std::collections::HashMap<(usize, String), Arc<Secret>>>,
}

struct Entry {
    spec: SecretSpec,
    cached: ArcSwapOption<Cached>,
    failed: ArcSwapOption<(Instant, String)>,
    fetch: tokio::sync::Mutex<()>,
}

struct Cached {
    secret: Arc<Secret>,
    fetched: Instant,
}

impl Credentials {
    /// Sets up a source for each configured secret; nothing is fetched yet.
    pub fn new(config: &Config) -> Credentials {
        let entries = config
            .secrets
            .iter()
            .map(|s| Entry {
                spec: s.clone(),
                cached: ArcSwapOption::empty(),
                failed: ArcSwapOption::empty(),
                fetch: tokio::sync::Mutex::new(()),
            })
            .collect();
        Credentials {
            entries,
            redactor: ArcSwap::from_pointee(Redactor::builder().build()),
            scanner: ArcSwap::from_pointee(scan_builder().build()),
            held: Mutex::new(Vec::new()),
            per_run: Mutex::new(std::collections::HashMap::new()),
            generation: AtomicU64::new(0),
            stored: Mutex::new(0),
            building: tokio::sync::Mutex::new(()),
        }
    }

    /// Gives the sources that keep state across restarts (an OAuth2 refresh token rotated by its
    /// provider) the store to keep it in.
    pub fn keep_state_in(self, store: Option<&Arc<dyn crate::state::StateStore>>) -> Credentials {
        if let Some(store) = store {
            for e in &self.entries {
                if let crate::secret::SecretSource::OAuth2(o) = &e.spec.source {
                    o.keep_in(store.clone());
                }
            }
        }
        self
    }

    /// Each secret as `keygate status` shows it: name, source, key id of the value held, when it
    /// was fetched and when it expires. Never a value.
    pub fn describe(&self) -> Vec<serde_json::Value> {
        let mut entries: Vec<&Entry> = self.entries.iter().collect();
        entries.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        entries
            .into_iter()
            .map(|e| {
                let name = &e.spec.name;
                let cached = e.cached.load();
                let (key_id, age) = match cached.as_ref() {
                    Some(c) => (
                        Some(c.secret.key_id().to_string()),
                        Some(c.fetched.elapsed()),
                    ),
                    None => (None, None),
                };
                let ago = |d: Duration| std::time::SystemTime::now().checked_sub(d);
                let last_fetch = age
                    .and_then(ago)
                    .map(|t| humantime::format_rfc3339_seconds(t).to_string());
                let by_ttl = match (age, e.spec.ttl) {
                    (Some(a), Some(ttl)) => {
                        std::time::SystemTime::now().checked_add(ttl.saturating_sub(a))
                    }
                    _ => None,
                };
                let by_source = cached.as_ref().and_then(|c| c.secret.expires());
                let expires = [by_ttl, by_source]
                    .into_iter()
                    .flatten()
                    .min()
                    .map(|t| humantime::format_rfc3339_seconds(t).to_string());
                let failed = e.failed.load().as_ref().map(|f| f.1.clone());
                serde_json::json!({
                    "name": name,
                    "source": e.spec.source.label(),
                    "key_id": key_id,
                    "last_fetch": last_fetch,
                    "expires": expires,
                    "last_error": failed,
                })
            })
            .collect()
    }

    /// Hex SHA-256 of every value held so far (trimmed), so `keygate run` can be told which of
    /// its variables hold one without any value crossing the admin socket.
    pub fn held_hashes(&self) -> Vec<String> {
        use sha2::{Digest, Sha256};
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.iter()
            .map(|s| {
                #[allow(clippy::disallowed_methods)] // credential stage: only a hash leaves
                let v = s.expose();
                hex::encode(Sha256::digest(v.trim_ascii()))
            })
            .collect()
    }

    /// The redactor for everything that flows back to an agent: every value held so far.
    pub fn redactor(&self) -> Arc<Redactor> {
        self.redactor.load_full()
    }

    /// The engine for the request exfiltration scan.
    pub fn scanner(&self) -> Arc<Redactor> {
        self.scanner.load_full()
    }

    /// The secret of the route `authorized` names, or `None` when the route attaches none.
    /// Only an [`Authorized`] request gets a credential. `run` is the `keygate run` the
    /// request's token was leased for: a `jit = "run"` secret gives each run its own value.
    pub async fn get(
        &self,
        config: &Config,
        authorized: &Authorized,
        run: Option<&str>,
    ) -> Result<Option<Arc<Secret>>, Rejection> {
        let route = &config.routes[authorized.route()];
        let Some(id) = route.secret else {
            return Ok(None);
        };
        let Some(entry) = self.entries.get(id.0) else {
            // Unreachable: config resolved the id against the same list.
            return Err(Rejection::new(
                Code::SecretUnavailable,
                "the route's secret is not configured",
            ));
        };
        let name = &entry.spec.name;
        if entry.spec.source.is_none() {
            return Ok(None);
        }
        if let (SecretSource::OpenBao(bao), Some(run)) = (&entry.spec.source, run) {
            if bao.per_run() {
                return Box::pin(self.get_for_run(id.0, entry, bao, run)).await;
            }
        }
        if let SecretSource::OpenBao(bao) = &entry.spec.source {
            if bao.per_request() {
                // `jit = "request"`: a credential of its own, never cached, revoked when the
                // request's `LeaseHold` is dropped. A failing server is asked at most once per
                // backoff window, as for cached sources.
                if let Some(f) = entry.failed.load().as_ref() {
                    if f.0.elapsed() < FAILURE_BACKOFF {
                        return Err(Rejection::new(Code::SecretUnavailable, f.1.clone()));
                    }
                }
                return match Box::pin(bao.fetch(name)).await {
                    Ok(s) => {
                        let s = Arc::new(s);
                        Box::pin(self.remember_coalesced(s.clone())).await;
                        Ok(Some(s))
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        tracing::warn!(secret = %name, error = %msg, "secret fetch failed");
                        // At `max_leases` the server is fine: the next request may find a lease
                        // come free, so this is not remembered as a failure.
                        if !matches!(e, crate::secret::FetchError::LeasesExhausted { .. }) {
                            entry
                                .failed
                                .store(Some(Arc::new((Instant::now(), msg.clone()))));
                        }
                        Err(Rejection::new(Code::SecretUnavailable, msg))
                    }
                };
            }
        }
        if let Some(c) = entry.fresh() {
            return Ok(Some(c));
        }
        let _one_fetch = entry.fetch.lock().await;
        if let Some(c) = entry.fresh() {
            return Ok(Some(c));
        }
        if let Some(f) = entry.failed.load().as_ref() {
            if f.0.elapsed() < FAILURE_BACKOFF {
                return Err(Rejection::new(Code::SecretUnavailable, f.1.clone()));
            }
        }
        // Fetching is boxed, as the other sources above: the cache hit is the hot path, and
        // the sources' futures (HTTP clients, commands) would make every request's future,
        // moved on each await, KBs larger.
        let fetched = Box::pin(entry.spec.fetch()).await;
        self.keep(name, entry, fetched)
    }

    /// `jit = "run"` for a request of a `keygate run`: the run's own credential, fetched once
    /// (one fetch at a time per secret) and kept until the run ends or its lease is gone.
    async fn get_for_run(
        &self,
        index: usize,
        entry: &Entry,
        bao: &Arc<crate::secret::openbao::Bao>,
        run: &str,
    ) -> Result<Option<Arc<Secret>>, Rejection> {
        let key = (index, run.to_string());
        let cached = || {
            let map = self.per_run.lock().unwrap_or_else(|p| p.into_inner());
            map.get(&key).filter(|s| !bao.lease_gone(s)).cloned()
        };
        if let Some(s) = cached() {
            return Ok(Some(s));
        }
        let _one_fetch = entry.fetch.lock().await;
        if let Some(s) = cached() {
            return Ok(Some(s));
        }
        match bao.fetch_for_run(&entry.spec.name).await {
            Ok(s) => {
                let s = Arc::new(s);
                self.remember_coalesced(s.clone()).await;
                let old = self
                    .per_run
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key, s.clone());
                if let Some(old) = old {
                    bao.retire(&old);
                }
                Ok(Some(s))
            }
            Err(e) => {
                let msg = e.to_string();
                tracing::warn!(secret = %entry.spec.name, error = %msg, "secret fetch failed");
                Err(Rejection::new(Code::SecretUnavailable, msg))
            }
        }
    }

    /// A `keygate run` ended: the credentials fetched for it are revoked once no request uses
    /// them.
    pub fn end_run(&self, run: &str) {
        let ended: Vec<(usize, Arc<Secret>)> = {
            let mut map = self.per_run.lock().unwrap_or_else(|p| p.into_inner());
            let keys: Vec<(usize, String)> = map.keys().filter(|k| k.1 == run).cloned().collect();
            keys.into_iter()
                .filter_map(|k| map.remove(&k).map(|s| (k.0, s)))
                .collect()
        };
        for (index, secret) in ended {
            if let Some(SecretSource::OpenBao(bao)) =
                self.entries.get(index).map(|e| &e.spec.source)
            {
                bao.retire(&secret);
            }
        }
    }

    /// Records the outcome of a fetch: a value is cached and taught to the redactor and the
    /// scanner; a failure is remembered for [`FAILURE_BACKOFF`].
    fn keep(
        &self,
        name: &str,
        entry: &Entry,
        fetched: Result<Option<Secret>, crate::secret::FetchError>,
    ) -> Result<Option<Arc<Secret>>, Rejection> {
        match fetched {
            Ok(Some(secret)) => {
                let secret = Arc::new(secret);
                entry.cached.store(Some(Arc::new(Cached {
                    secret: secret.clone(),
                    fetched: Instant::now(),
                })));
                entry.failed.store(None);
                self.remember(secret.clone());
                Ok(Some(secret))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                let msg = e.to_string();
                tracing::warn!(secret = %name, source = %entry.spec.source.label(), error = %msg, "secret fetch failed");
                entry
                    .failed
                    .store(Some(Arc::new((Instant::now(), msg.clone()))));
                Err(Rejection::new(Code::SecretUnavailable, msg))
            }
        }
    }

    /// Fetches every secret at once (env, file, command, OpenBao, AWS), so that the request scan
    /// knows every held value before the first request: a key of one route sent in another
    /// route's request is refused from the start. Returns the failures, as (secret name, message
    /// naming the source, never a value). OpenBao leases issued per request are left to their
    /// first use.
    pub async fn prefetch(&self) -> Vec<(String, String)> {
        let mut set = tokio::task::JoinSet::new();
        for (i, entry) in self.entries.iter().enumerate() {
            if entry.spec.lazy || !entry.spec.source.prefetchable() {
                continue;
            }
            let spec = entry.spec.clone();
            set.spawn(async move {
                let fetched = spec.fetch().await;
                (i, fetched)
            });
        }
        let mut failures = Vec::new();
        while let Some(joined) = set.join_next().await {
            let Ok((i, fetched)) = joined else {
                failures.push(("?".to_string(), "a secret fetch task failed".to_string()));
                continue;
            };
            if let Some(entry) = self.entries.get(i) {
                let name = entry.spec.name.clone();
                if let Err(r) = self.keep(&name, entry, fetched) {
                    failures.push((name, r.message));
                }
            }
        }
        failures.sort();
        failures
    }

    /// A request starts using `secret` (of the route `authorized` names): a dynamic credential's
    /// lease stays alive, renewed as needed, until the returned hold is dropped, when a lease no
    /// longer handed out is revoked. `None` for a secret without a lease.
    pub fn hold(
        &self,
        config: &Config,
        authorized: &Authorized,
        secret: &Secret,
    ) -> Option<crate::secret::openbao::LeaseHold> {
        let id = config.routes[authorized.route()].secret?;
        match &self.entries.get(id.0)?.spec.source {
            SecretSource::OpenBao(bao) => bao.hold(secret),
            _ => None,
        }
    }

    /// At shutdown: revokes every dynamic credential still held, within `deadline`.
    pub async fn shutdown(&self, deadline: Duration) {
        for e in &self.entries {
            if let SecretSource::OpenBao(bao) = &e.spec.source {
                bao.shutdown(deadline).await;
            }
        }
    }

    /// Looks at the upstream's answer: a 401 means the key may have been rotated at its source,
    /// so the next request fetches afresh.
    pub fn after_answer(&self, status: http::StatusCode, route: &Route, secret: Option<&Secret>) {
        if status != http::StatusCode::UNAUTHORIZED {
            return;
        }
        if let (Some(id), Some(secret)) = (route.secret, secret) {
            self.invalidate(id, secret.key_id());
        }
    }

    /// An upstream refused the credential: fetch afresh next time, unless it rotated meanwhile.
    pub fn invalidate(&self, secret: SecretId, key_id: &KeyId) {
        if let Some(entry) = self.entries.get(secret.0) {
            let current = entry.cached.load();
            if current
                .as_ref()
                .is_some_and(|c| c.secret.key_id() == key_id)
            {
                entry.cached.store(None);
            }
        }
    }

    fn remember(&self, secret: Arc<Secret>) {
        if let Some(held) = self.add(secret) {
            let (redactor, scanner) = build_engines(&held.0);
            self.store_engines(held.1, redactor, scanner);
        }
    }

    /// As [`Credentials::remember`], for a value per request (`jit = "request"`): the engines
    /// are rebuilt off the runtime's workers, and requests arriving while one rebuild runs share
    /// the next, so N concurrent fetches cost about two rebuilds, not N, each holding no lock.
    /// Returns once the redactor knows `secret`.
    async fn remember_coalesced(&self, secret: Arc<Secret>) {
        let Some((_, generation)) = self.add(secret) else {
            return;
        };
        let _one = self.building.lock().await;
        if *lock(&self.stored) >= generation {
            return; // a rebuild that started after this value was added has it
        }
        let (held, generation) = self.snapshot();
        let built = tokio::task::spawn_blocking(move || build_engines(&held)).await;
        let (redactor, scanner) = match built {
            Ok(engines) => engines,
            Err(_) => build_engines(&self.snapshot().0),
        };
        self.store_engines(generation, redactor, scanner);
    }

    /// Adds a value not held yet (dropping the oldest of its secret past the bound); returns
    /// what is held then, and its generation.
    fn add(&self, secret: Arc<Secret>) -> Option<(Vec<Arc<Secret>>, u64)> {
        let mut held = lock(&self.held);
        if held.iter().any(|s| s.key_id() == secret.key_id()) {
            return None;
        }
        held.push(secret.clone());
        let name = secret
            .key_id()
            .as_str()
            .split('#')
            .next()
            .unwrap_or("")
            .to_string();
        let same: Vec<usize> = held
            .iter()
            .enumerate()
            .filter(|(_, s)| s.key_id().as_str().split('#').next() == Some(name.as_str()))
            .map(|(i, _)| i)
            .collect();
        // A dynamic credential per request means many live values at once; they stay known
        // up to a larger bound, so none in use is forgotten while its answer streams.
        let keep = if secret.lease().is_some() {
            REMEMBERED_LEASES
        } else {
            REMEMBERED_VALUES
        };
        if same.len() > keep {
            held.remove(same[0]);
        }
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        Some((held.clone(), generation))
    }

    fn snapshot(&self) -> (Vec<Arc<Secret>>, u64) {
        let held = lock(&self.held);
        (held.clone(), self.generation.load(Ordering::Acquire))
    }

    /// Installs engines built from generation `generation`, unless newer ones are in place.
    fn store_engines(&self, generation: u64, redactor: Redactor, scanner: Redactor) {
        let mut stored = lock(&self.stored);
        if generation > *stored {
            self.redactor.store(Arc::new(redactor));
            self.scanner.store(Arc::new(scanner));
            *stored = generation;
        }
    }
}

/// The response redactor and the request scanner for `held`.
fn build_engines(held: &[Arc<Secret>]) -> (Redactor, Redactor) {
    let mut b = Redactor::builder();
    for s in held {
        b = teach(b, s);
    }
    // One build of the held values' searchers, shared by both engines.
    let redactor = b.build();
    let scanner = redactor.with_detector_set(scan_detectors());
    (redactor, scanner)
}

/// The request scan's strong half: held values are added to it; generic detectors run apart
/// (`scan::labels`).
fn scan_builder() -> crate::redact::RedactorBuilder {
    Redactor::builder().detector_set(scan_detectors())
}

fn scan_detectors() -> crate::redact::DetectorSet {
    crate::redact::DetectorSet::class(crate::redact::Class::Strong)
}

impl Entry {
    fn fresh(&self) -> Option<Arc<Secret>> {
        let c = self.cached.load();
        let c = c.as_ref()?;
        if let Some(ttl) = self.spec.ttl {
            if c.fetched.elapsed() >= ttl {
                return None;
            }
        }
        // A lease the server no longer knows (its renewal was refused) is fetched afresh.
        if let SecretSource::OpenBao(bao) = &self.spec.source {
            if bao.lease_gone(&c.secret) {
                return None;
            }
        }
        // A value its source says expires is replaced a little before, so a request in flight
        // does not reach the upstream with a credential that died on the way.
        if let Some(at) = c.secret.expires() {
            if std::time::SystemTime::now() + EXPIRY_MARGIN >= at {
                return None;
            }
        }
        Some(c.secret.clone())
    }
}

/// `keygate check --fetch`: fetches every secret of `config` once (lazy ones too) and reports
/// each as `describe` does, with `error` set where the fetch failed. Never a value.
pub fn fetch_report(config: &Config) -> Result<Vec<serde_json::Value>, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let creds = Credentials::new(config);
    rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for (i, entry) in creds.entries.iter().enumerate() {
            let spec = entry.spec.clone();
            set.spawn(async move { (i, spec.fetch().await) });
        }
        while let Some(joined) = set.join_next().await {
            if let Ok((i, fetched)) = joined {
                if let Some(entry) = creds.entries.get(i) {
                    let _ = creds.keep(&entry.spec.name.clone(), entry, fetched);
                }
            }
        }
        // A check leaves nothing behind: a dynamic credential it was issued is revoked now.
        creds.shutdown(Duration::from_secs(5)).await;
    });
    Ok(creds
        .describe()
        .into_iter()
        .map(|mut d| {
            d["error"] = d["last_error"].take();
            if let Some(m) = d.as_object_mut() {
                m.remove("last_error");
            }
            d
        })
        .collect())
}

/// The shared state store's password, fetched from its secret on a thread of its own (the
/// caller may be an admin command without a runtime, or `serve` inside one). It goes only into
/// the store's connection settings.
pub fn store_password(spec: &SecretSpec) -> Result<zeroize::Zeroizing<String>, String> {
    let fetched = std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(spec.fetch()).map_err(|e| e.to_string())
        })
        .join()
        .unwrap_or_else(|_| Err("fetching the store's password failed".into()))
    })?;
    let Some(secret) = fetched else {
        return Err(format!(
            "secret {} (source none) holds no password",
            spec.name
        ));
    };
    #[allow(clippy::disallowed_methods)] // credential stage: the store's connection needs it
    let value = secret.expose();
    String::from_utf8(value.to_vec())
        .map(zeroize::Zeroizing::new)
        .map_err(|_| format!("secret {}: the store's password is not UTF-8", spec.name))
}

/// A response body that keeps a dynamic credential's lease alive until the body is sent (or
/// abandoned): dropping it drops the [`LeaseHold`](crate::secret::openbao::LeaseHold).
pub struct HeldBody {
    inner: crate::forward::Body,
    _hold: Option<crate::secret::openbao::LeaseHold>,
}

impl HeldBody {
    /// Wraps `inner`; the hold goes when the body does.
    pub fn new(
        inner: crate::forward::Body,
        hold: Option<crate::secret::openbao::LeaseHold>,
    ) -> HeldBody {
        HeldBody { inner, _hold: hold }
    }
}

impl http_body::Body for HeldBody {
    type Data = bytes::Bytes;
    type Error = crate::forward::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Teaches a redactor a held value, labelled by its key id.
pub fn teach(builder: RedactorBuilder, secret: &Secret) -> RedactorBuilder {
    #[allow(clippy::disallowed_methods)] // credential stage: the redactor must know the value
    let value = secret.expose();
    let mut builder = builder.known(secret.key_id().as_str(), value);
    // An AWS key pair is held as one JSON value but its secret key and session token travel
    // (and could come back) on their own.
    if let Some(keys) = crate::secret::aws::Keys::from_json(value) {
        for part in keys.secret_parts() {
            builder = builder.known(secret.key_id().as_str(), part);
        }
    }
    builder
}

/// Attaches the credential as the route says. `query` is the request's query string, extended
/// for `query:NAME` injection. `body_sha256` is the hash of a body read whole, for a route that
/// signs requests (`aws-sigv4`); `None` when the body streams.
pub fn attach(
    config: &Config,
    authorized: &Authorized,
    secret: &Secret,
    method: &http::Method,
    body_sha256: Option<&str>,
    headers: &mut HeaderMap,
    query: &mut Option<String>,
) -> Result<(), Rejection> {
    let route = &config.routes[authorized.route()];
    if let Inject::AwsSigV4 { .. } = route.inject {
        return sign_aws(
            route,
            authorized,
            secret,
            method,
            body_sha256,
            headers,
            query,
        );
    }
    inject(route, secret, headers, query)
}

/// The header value made of `v`'s buffer itself (one allocation per request, not a second
/// copy of the key); a value a header may not hold is zeroized and refused.
fn value_from(mut v: zeroize::Zeroizing<Vec<u8>>) -> Option<HeaderValue> {
    // `HeaderValue`'s own rule: visible ASCII, space and tab, checked before the buffer is
    // handed over, so a refused value is still zeroized on drop.
    let valid = v.iter().all(|&b| (b >= 32 && b != 127) || b == b'\t');
    if !valid {
        return None;
    }
    let bytes = bytes::Bytes::from(std::mem::take(&mut *v));
    let mut value = HeaderValue::from_maybe_shared(bytes).ok()?;
    // Sensitive values are never put in HTTP/2's HPACK table, where they would outlive the request.
    value.set_sensitive(true);
    Some(value)
}

/// Puts the agent's placeholder headers back with the credential in place of the route's
/// placeholder, and replaces it in the query and body where the route opted in
/// (`placeholder::substitute`). Returns whether a header now carries the credential.
// credential stage: the value replaces its placeholder in the upstream request only.
#[allow(clippy::disallowed_methods)]
pub fn replace(
    secret: &Secret,
    route: &Route,
    lifted: crate::placeholder::Lifted,
    placeholder: Option<&str>,
    target: crate::placeholder::Target<'_>,
) -> Result<bool, Rejection> {
    crate::placeholder::substitute(route, lifted, placeholder, secret.expose(), target)
}

/// `inject = "aws-sigv4"`: the request is signed for exactly the URL `forward` sends it to.
// credential stage: the key pair signs the request (it never goes on the wire itself).
#[allow(clippy::disallowed_methods)]
fn sign_aws(
    route: &Route,
    authorized: &Authorized,
    secret: &Secret,
    method: &http::Method,
    body_sha256: Option<&str>,
    headers: &mut HeaderMap,
    query: &mut Option<String>,
) -> Result<(), Rejection> {
    use crate::secret::aws;
    let Inject::AwsSigV4 {
        region,
        service,
        unsigned_payload,
    } = &route.inject
    else {
        return Ok(());
    };
    let unavailable = |m: String| Rejection::new(Code::SecretUnavailable, m);
    let keys = aws::Keys::from_json(secret.expose()).ok_or_else(|| {
        unavailable(format!(
            "secret {} is not an AWS key pair (use source = \"aws-credentials\")",
            secret.key_id()
        ))
    })?;
    let payload = match body_sha256 {
        Some(h) => aws::Payload::Sha256(h),
        None if *unsigned_payload => aws::Payload::Unsigned,
        // Unreachable: the pipeline reads the body whole for such a route.
        None => {
            return Err(unavailable(
                "the request body was not read for signing".into(),
            ))
        }
    };
    // A presigned URL's parameters from the agent would sit beside keygate's signature.
    if let Some(q) = query.take() {
        let mut kept = q;
        for p in aws::PRESIGN_PARAMS {
            kept = without_param(&kept, p);
        }
        *query = (!kept.is_empty()).then_some(kept);
    }
    let up = &route.upstream;
    let mut url = format!(
        "{}://{}{}{}",
        up.scheme,
        up.authority,
        up.base_path,
        authorized.raw_path()
    );
    if let Some(q) = query.as_deref() {
        url.push('?');
        url.push_str(q);
    }
    aws::sign_headers(
        &keys,
        aws::Scope { region, service },
        aws::settings(service),
        method,
        &url,
        headers,
        payload,
        std::time::SystemTime::now(),
    )
    .map_err(|m| {
        Rejection::new(
            Code::SecretUnavailable,
            format!("route {}: cannot sign the request: {m}", route.name),
        )
    })
}

// credential stage: the one place a value goes on the wire.
#[allow(clippy::disallowed_methods)]
fn inject(
    route: &Route,
    secret: &Secret,
    headers: &mut HeaderMap,
    query: &mut Option<String>,
) -> Result<(), Rejection> {
    let bad = || {
        Rejection::new(
            Code::SecretUnavailable,
            format!(
                "secret {} cannot be sent in a header (it holds bytes a header may not)",
                secret.key_id()
            ),
        )
    };
    let value = |bytes: &[u8]| -> Result<HeaderValue, Rejection> {
        let mut v = HeaderValue::from_bytes(bytes).map_err(|_| bad())?;
        // Sensitive values are never put in HTTP/2's HPACK table, where they would outlive the request.
        v.set_sensitive(true);
        Ok(v)
    };
    match &route.inject {
        Inject::Bearer => {
            // Sized once: a regrown buffer would leave a copy of the key behind unzeroized.
            let mut v = zeroize::Zeroizing::new(Vec::with_capacity(7 + secret.len()));
            v.extend_from_slice(b"Bearer ");
            v.extend_from_slice(secret.expose());
            headers.insert(header::AUTHORIZATION, value_from(v).ok_or_else(bad)?);
        }
        Inject::Header { name, format } => {
            let (before, after) = format.split_once("{secret}").unwrap_or(("", ""));
            let mut v = zeroize::Zeroizing::new(Vec::with_capacity(
                before.len() + secret.len() + after.len(),
            ));
            v.extend_from_slice(before.as_bytes());
            v.extend_from_slice(secret.expose());
            v.extend_from_slice(after.as_bytes());
            headers.insert(name.clone(), value(&v)?);
        }
        Inject::Basic { username } => {
            let mut pair = zeroize::Zeroizing::new(Vec::new());
            if let Some(u) = username {
                pair.extend_from_slice(u.as_bytes());
                pair.push(b':');
            }
            pair.extend_from_slice(secret.expose());
            let mut v = zeroize::Zeroizing::new(b"Basic ".to_vec());
            v.extend_from_slice(
                base64::engine::general_purpose::STANDARD
                    .encode(&*pair)
                    .as_bytes(),
            );
            headers.insert(header::AUTHORIZATION, value(&v)?);
        }
        Inject::AwsSigV4 { .. } => {
            return Err(bad());
        }
        Inject::Query { name } => {
            // The RFC 3986 component set: what upstreams expect, and a spelling the redactor
            // knows (`redact::known`), so an upstream echoing its URL cannot leak the key.
            let enc = |s: &[u8]| {
                percent_encoding::percent_encode(s, crate::redact::QUERY_COMPONENT).to_string()
            };
            let pair = format!("{}={}", enc(name.as_bytes()), enc(secret.expose()));
            // The agent's own `NAME=` would otherwise travel next to the real one, and an upstream
            // that reads the first (or all) of them would act on the agent's value.
            let kept = query.take().map(|q| without_param(&q, name));
            *query = Some(match kept {
                Some(q) if !q.is_empty() => format!("{q}&{pair}"),
                _ => pair,
            });
        }
    }
    Ok(())
}

/// The query without any parameter an upstream could read as `name`: the exact name, any
/// percent-encoded or `+` spelling of it, any ASCII case of it, and `name[]` / `name[x]` (the
/// PHP and Rails array forms), and for a name with `_`, PHP's `.` or ` ` in its place. `;` is
/// treated as a separator too, as some servers do. Everything else is kept byte for byte,
/// separators included.
fn without_param(query: &str, name: &str) -> String {
    let mut out = String::with_capacity(query.len());
    let mut kept_any = false;
    let mut sep = "";
    let mut rest = query;
    loop {
        let end = rest.find(['&', ';']).unwrap_or(rest.len());
        let segment = &rest[..end];
        if !names_param(segment, name) {
            if kept_any {
                out.push_str(sep);
            }
            out.push_str(segment);
            kept_any = true;
        }
        if end == rest.len() {
            return out;
        }
        sep = &rest[end..=end];
        rest = &rest[end + 1..];
    }
}

/// Whether a `name=value` segment of a query or form names `name` as an upstream could read it.
pub(crate) fn names_param(segment: &str, name: &str) -> bool {
    let raw = segment.split_once('=').map_or(segment, |(k, _)| k);
    let plus = raw.replace('+', " ");
    let decoded = percent_encoding::percent_decode_str(&plus).decode_utf8_lossy();
    let base = decoded.split_once('[').map_or(&*decoded, |(b, _)| b);
    // PHP reads `.` and ` ` in a parameter name as `_`.
    let php = |c: char| if c == '.' || c == ' ' { '_' } else { c };
    base.len() == name.len()
        && base
            .chars()
            .map(php)
            .zip(name.chars().map(php))
            .all(|(a, b)| a.eq_ignore_ascii_case(&b))
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests compare held values
mod tests {
    use super::*;
    use std::path::Path;

    fn config(extra: &str) -> Config {
        let text = format!(
            "[secrets.k]\nsource = \"command\"\nargv = [\"sh\", \"-c\", \"echo sk-test-$$\"]\n{extra}\n[routes.r]\nprefix = \"/r\"\nupstream = \"http://127.0.0.1:1\"\nsecret = \"k\"\n"
        );
        Config::from_text(Path::new("c.toml"), &text).unwrap()
    }

    async fn fetch(creds: &Credentials, c: &Config) -> Arc<Secret> {
        let authorized = Authorized::for_test(0, 0);
        creds.get(c, &authorized, None).await.unwrap().unwrap()
    }

    #[tokio::test]
    async fn value_is_cached_and_taught_to_the_redactor() {
        let c = config("");
        let creds = Credentials::new(&c);
        let a = fetch(&creds, &c).await;
        let b = fetch(&creds, &c).await;
        assert_eq!(
            a.key_id(),
            b.key_id(),
            "second call must reuse the cached value"
        );
        let body = [b"echo: ".as_slice(), a.expose()].concat();
        let red = creds.redactor().redact(&body).into_owned();
        assert!(!red.windows(a.expose().len()).any(|w| w == a.expose()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_per_request_values_are_each_known_to_the_redactor_when_their_fetch_returns()
    {
        let c = config("");
        let creds = Arc::new(Credentials::new(&c));
        let values: Vec<Arc<Secret>> = (0..24)
            .map(|i| {
                let v = format!("pw-{i:04}-{}", "x".repeat(16)).into_bytes();
                Arc::new(
                    Secret::new("k", v)
                        .versioned("k", &format!("lease-{i}"))
                        .leased(format!("database/creds/agent/{i}")),
                )
            })
            .collect();
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for s in values.clone() {
            let creds = creds.clone();
            tasks.spawn(async move {
                creds.remember_coalesced(s.clone()).await;
                // What the request's answer will be redacted with, right after its fetch.
                let body = [b"echo: ".as_slice(), s.expose()].concat();
                let red = creds.redactor().redact(&body).into_owned();
                !red.windows(s.expose().len()).any(|w| w == s.expose())
            });
        }
        while let Some(known) = tasks.join_next().await {
            assert!(
                known.unwrap(),
                "a value was handed out before the redactor knew it"
            );
        }
        let coalesced = started.elapsed();
        let one_by_one = Credentials::new(&c);
        let started = Instant::now();
        for s in values {
            one_by_one.remember(s);
        }
        eprintln!(
            "24 per-request values: coalesced {coalesced:?}, one rebuild each {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn a_value_about_to_expire_is_not_fresh() {
        let c = config("");
        let entry = Entry {
            spec: c.secrets[0].clone(),
            cached: ArcSwapOption::empty(),
            failed: ArcSwapOption::empty(),
            fetch: tokio::sync::Mutex::new(()),
        };
        let soon = std::time::SystemTime::now() + EXPIRY_MARGIN / 2;
        let later = std::time::SystemTime::now() + EXPIRY_MARGIN * 4;
        for (at, fresh) in [(soon, false), (later, true)] {
            let secret = Arc::new(Secret::new("k", b"sk-expiring-123456".to_vec()).expiring(at));
            entry.cached.store(Some(Arc::new(Cached {
                secret,
                fetched: Instant::now(),
            })));
            assert_eq!(entry.fresh().is_some(), fresh);
        }
    }

    #[tokio::test]
    async fn ttl_and_invalidation_fetch_a_new_value() {
        let c = config("ttl = \"1ms\"");
        let creds = Credentials::new(&c);
        let a = fetch(&creds, &c).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
        let b = fetch(&creds, &c).await;
        assert_ne!(
            a.key_id(),
            b.key_id(),
            "each sh -c run prints a different pid"
        );
        // the old value stays known to the redactor after rotation
        let red = creds.redactor().redact(a.expose()).into_owned();
        assert_ne!(red, a.expose());
    }

    #[test]
    fn agent_spellings_of_the_injected_parameter_are_dropped_and_others_kept() {
        for (q, want) in [
            ("key=a", ""),
            ("a=1&key=a&b=2", "a=1&b=2"),
            ("key=a&a=1", "a=1"),
            ("k%65y=a&x", "x"),
            ("%6B%65%79=a", ""),
            ("key[]=a&key[0]=b&key%5B%5D=c", ""),
            ("KEY=a&Key", ""),
            ("a=1;key=a;b=2", "a=1;b=2"),
            (
                "keyword=x&monkey=1&key_id=3&apikey=4&q=a+b",
                "keyword=x&monkey=1&key_id=3&apikey=4&q=a+b",
            ),
            ("a=1&&b=2", "a=1&&b=2"),
            ("a=%ZZ&key+=1", "a=%ZZ&key+=1"),
        ] {
            assert_eq!(without_param(q, "key"), want, "{q}");
        }
        for (q, want) in [
            (
                "api.key=a&api+key=b&api%20key=c&API_KEY[x]=d&apikey=e",
                "apikey=e",
            ),
            ("api_keys=a", "api_keys=a"),
        ] {
            assert_eq!(without_param(q, "api_key"), want, "{q}");
        }
    }

    // Whatever bytes `attach` puts on the wire, the response redactor must know them: an
    // upstream that echoes its request (a 404 page, a redirect) would otherwise hand the key back.
    #[test]
    fn every_injected_spelling_is_one_the_redactor_knows() {
        let value = b"AIzaSyA-bc_DEF123-ghi_456JK.Lmno~789+/=pq rs";
        for kind in ["bearer", "header:x-goog-api-key", "basic", "query:key"] {
            let text = format!(
                "[secrets.k]\nsource = \"none\"\n[routes.r]\nprefix = \"/r\"\nupstream = \"http://127.0.0.1:1\"\nsecret = \"k\"\ninject = \"{kind}\"\n"
            );
            let c = Config::from_text(Path::new("c.toml"), &text).unwrap();
            let secret = Secret::new("k", value.to_vec());
            let redactor = Redactor::builder().known("k", secret.expose()).build();
            let mut headers = HeaderMap::new();
            let mut query = Some("a=1".to_string());
            inject(&c.routes[0], &secret, &mut headers, &mut query).unwrap();
            let mut wire: Vec<u8> = Vec::new();
            for v in headers.values() {
                wire.extend_from_slice(v.as_bytes());
                wire.push(b'\n');
            }
            wire.extend_from_slice(query.unwrap_or_default().as_bytes());
            let cleaned = redactor.redact(&wire).into_owned();
            let cleaned = String::from_utf8_lossy(&cleaned);
            assert!(
                cleaned.contains("[REDACTED:"),
                "{kind}: nothing injected? {cleaned}"
            );
            assert!(!cleaned.contains("456JK"), "{kind}: {cleaned}");
        }
    }
}
