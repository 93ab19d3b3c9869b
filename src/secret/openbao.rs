//! The `openbao` source: a field of a KV v2 secret, or a dynamic secret with a lease, read from
//! OpenBao (or Vault, whose API it shares).
//!
//! Plain typed requests over [`BackendClient`] rather than the `vaultrs` crate: vaultrs brings
//! reqwest, a second HTTP stack with its own TLS and redirect policy, and the handful of
//! endpoints used here (login, token lookup/renew, KV read, lease renew/revoke) are small.
//!
//! State kept per source (an `Arc<Bao>` in the validated config): keygate's own OpenBao token,
//! renewed before it expires and replaced by a fresh login when it cannot be; and the dynamic
//! leases it holds, renewed while a request uses them and revoked when none needs them any more
//! (after its request for `jit = "request"`, once replaced and unused for `jit = "ttl"`, at
//! shutdown for every one). A token and a lease id are only ever held in `Zeroizing` strings,
//! never shown: errors name the source, the endpoint and the answer's status.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use crate::lock;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use serde::Deserialize;
use zeroize::Zeroizing;

#[cfg(test)]
pub(crate) mod fake;

use super::http::{BackendClient, HttpError, DEFAULT_TIMEOUT};
use super::{FetchError, Secret, SecretSpec};

/// The validated settings of one `openbao` source.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The server's base URL (`address`), without a trailing `/`.
    pub address: String,
    /// A PEM file with the CA that signed the server's certificate (`ca_file`).
    pub ca_file: Option<PathBuf>,
    /// How keygate gets its own token.
    pub auth: Auth,
    /// What is read.
    pub read: Read,
    /// How long a dynamic secret's lease serves (the routes' `jit`).
    pub jit: Jit,
    /// How many of its leases may be outstanding (issued, not yet revoked) at once
    /// (`max_leases`); past it a fetch waits [`LEASE_WAIT`], then is refused.
    pub max_leases: usize,
}

/// How keygate gets its own OpenBao token.
#[derive(Clone, Debug)]
pub enum Auth {
    /// A token kept in keygate's environment or in a file (`token_env`, `token_file`), read
    /// again whenever a new one is needed.
    Token(BaoToken),
    /// AppRole login (`auth = "approle"`): `role_id`, and the secret id from another secret.
    AppRole {
        /// The auth mount (`auth_mount`, `approle` by default).
        mount: String,
        /// The role id (not a secret by itself).
        role_id: String,
        /// The secret that holds the secret id (`secret_id_from`).
        secret_id: Box<SecretSpec>,
    },
    /// JWT login (`auth = "jwt"`): a role, and the JWT from another secret.
    Jwt {
        /// The auth mount (`auth_mount`, `jwt` by default).
        mount: String,
        /// The role (`role`).
        role: String,
        /// The secret that holds the JWT (`jwt_from`).
        jwt: Box<SecretSpec>,
    },
}

/// Where keygate reads its own OpenBao token from (`token_env` or `token_file`, exactly one).
#[derive(Clone, Debug)]
pub enum BaoToken {
    /// An environment variable, by name.
    Env(String),
    /// A file, `~/` expanded.
    File(PathBuf),
}

/// What the source reads.
#[derive(Clone, Debug)]
pub enum Read {
    /// A field of a KV v2 secret; the secret's version is the key id (`name#vN`).
    Kv {
        /// The KV mount (`mount`, `secret` by default).
        mount: String,
        /// The secret's path inside the mount (`path`).
        path: String,
        /// The field (`field`).
        field: String,
    },
    /// A dynamic secret (`dynamic = "database/creds/agent"`): each read issues a new credential
    /// with its own lease.
    Dynamic {
        /// The path read (GET), or written with `params` (POST, e.g. `pki/issue/ROLE`).
        path: String,
        /// The field of the answer's data that is the credential (`field`).
        field: String,
        /// Parameters of a write (`params`); none means a read.
        params: BTreeMap<String, String>,
    },
}

/// How long one dynamic credential serves (`jit` on the routes that use it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Jit {
    /// A fresh credential per request, revoked when its answer has been sent.
    Request,
    /// One credential for the whole run of keygate, renewed while it runs, revoked at shutdown.
    Run,
    /// One credential cached for its lease; fetched afresh shortly before the lease ends, the
    /// old one revoked once no request uses it.
    Ttl,
}

/// One `openbao` source: its settings and its runtime state (token, leases).
pub struct Bao {
    settings: Settings,
    client: OnceLock<Result<BackendClient, String>>,
    token: tokio::sync::Mutex<Option<Arc<Token>>>,
    leases: Mutex<Vec<Arc<Lease>>>,
    /// The lease the cache hands out (`ttl`, `run`); replaced by the next fetch.
    current: Mutex<Option<Arc<Lease>>>,
    /// Set once [`Bao::shutdown`] ran: nothing is renewed after.
    closed: AtomicBool,
    /// One permit per outstanding lease (`max_leases`).
    slots: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for Bao {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Settings hold no value; the token and leases are left out on purpose.
        f.debug_struct("Bao")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// keygate's own token.
struct Token {
    value: Zeroizing<String>,
    /// When it stops working; `None` for a token without a TTL (a root token).
    expires: Mutex<Option<Instant>>,
    /// Its TTL when issued, the increment asked for at each renewal.
    ttl: Duration,
    renewable: bool,
}

/// A dynamic credential's lease.
pub(crate) struct Lease {
    id: Zeroizing<String>,
    renewable: bool,
    ttl: Duration,
    expires: Mutex<Instant>,
    /// Requests using it right now.
    users: AtomicUsize,
    /// No longer handed out: revoked as soon as `users` is zero.
    retired: AtomicBool,
    revoked: AtomicBool,
    /// The server no longer knows it (renewal refused as expired or unknown): not handed out.
    dead: AtomicBool,
    jit: Jit,
    /// Its place under `max_leases`, given back once it is revoked or gone.
    slot: Mutex<Option<tokio::sync::OwnedSemaphorePermit>>,
}

impl Lease {
    fn new(id: Zeroizing<String>, renewable: bool, ttl: Duration, jit: Jit) -> Lease {
        Lease {
            id,
            renewable,
            ttl,
            expires: Mutex::new(Instant::now() + ttl),
            users: AtomicUsize::new(0),
            retired: AtomicBool::new(jit == Jit::Request),
            revoked: AtomicBool::new(false),
            dead: AtomicBool::new(false),
            jit,
            slot: Mutex::new(None),
        }
    }
}

/// A request's use of a dynamic credential: while it lives the lease is renewed as needed; when
/// it is dropped (the answer sent, or the request refused or abandoned) a lease no longer handed
/// out is revoked.
pub struct LeaseHold {
    // Strong: a reload that replaces the source must not revoke a lease an answer still streams
    // with; the old source's drop revokes what is left once the last hold is gone.
    bao: Arc<Bao>,
    lease: Arc<Lease>,
}

impl std::fmt::Debug for LeaseHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LeaseHold")
    }
}

impl Drop for LeaseHold {
    fn drop(&mut self) {
        let left = self.lease.users.fetch_sub(1, Ordering::AcqRel) - 1;
        if left == 0 && self.lease.retired.load(Ordering::Acquire) {
            self.bao.revoke_later(self.lease.clone());
        }
    }
}

#[derive(Deserialize)]
struct KvAnswer {
    data: KvData,
}

#[derive(Deserialize)]
struct KvData {
    data: BTreeMap<String, serde_json::Value>,
    metadata: KvMetadata,
}

#[derive(Deserialize)]
struct KvMetadata {
    version: u64,
}

#[derive(Deserialize)]
struct DynamicAnswer {
    #[serde(default)]
    lease_id: String,
    #[serde(default)]
    lease_duration: u64,
    #[serde(default)]
    renewable: bool,
    data: BTreeMap<String, serde_json::Value>,
}

/// Only the lease of an answer otherwise unreadable, so that it can still be revoked.
#[derive(Deserialize)]
struct LeaseOnly {
    #[serde(default)]
    lease_id: String,
}

#[derive(Deserialize)]
struct LoginAnswer {
    auth: LoginAuth,
}

#[derive(Deserialize)]
struct LoginAuth {
    client_token: String,
    #[serde(default)]
    lease_duration: u64,
    #[serde(default)]
    renewable: bool,
}

#[derive(Deserialize)]
struct LookupAnswer {
    data: LookupData,
}

#[derive(Deserialize)]
struct LookupData {
    #[serde(default)]
    ttl: u64,
    #[serde(default)]
    renewable: bool,
}

#[derive(Deserialize)]
struct RenewAnswer {
    #[serde(default)]
    lease_duration: u64,
}

/// Why a step failed, before the secret's name is added.
struct Failed(String);

impl From<HttpError> for Failed {
    fn from(e: HttpError) -> Failed {
        Failed(e.to_string())
    }
}

/// A renewal starts when this share of the TTL is left, so a slow server or a missed beat still
/// leaves time before expiry.
const RENEW_AT_LEFT: u32 = 3;

impl Bao {
    /// A source with nothing fetched yet.
    pub fn new(settings: Settings) -> Bao {
        Bao {
            client: OnceLock::new(),
            token: tokio::sync::Mutex::new(None),
            leases: Mutex::new(Vec::new()),
            current: Mutex::new(None),
            closed: AtomicBool::new(false),
            slots: Arc::new(tokio::sync::Semaphore::new(settings.max_leases.max(1))),
            settings,
        }
    }

    /// The settings, for labels and `check`.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// `openbao:ADDRESS/PATH`, safe to show anywhere.
    pub fn label(&self) -> String {
        let path = match &self.settings.read {
            Read::Kv { mount, path, .. } => format!("{mount}/{path}"),
            Read::Dynamic { path, .. } => path.clone(),
        };
        format!("openbao:{}/{path}", self.settings.address)
    }

    /// Whether each request gets its own credential (nothing to cache or fetch at start-up).
    pub fn per_request(&self) -> bool {
        matches!(self.settings.read, Read::Dynamic { .. }) && self.settings.jit == Jit::Request
    }

    /// Whether each `keygate run` gets a credential of its own (`jit = "run"` on a dynamic
    /// secret), revoked when the run ends.
    pub fn per_run(&self) -> bool {
        matches!(self.settings.read, Read::Dynamic { .. }) && self.settings.jit == Jit::Run
    }

    /// Reads the value: a KV field (key id `name#vN`) or a new dynamic credential (key id
    /// `name#lease-FINGERPRINT`, its lease tracked here).
    pub async fn fetch(self: &Arc<Self>, name: &str) -> Result<Secret, FetchError> {
        self.fetch_scoped(name, false).await
    }

    /// A new dynamic credential for one `keygate run`: renewed while the run lasts and revoked
    /// by [`Bao::retire`] when it ends; it never replaces the credential shared by requests
    /// that belong to no run.
    pub async fn fetch_for_run(self: &Arc<Self>, name: &str) -> Result<Secret, FetchError> {
        self.fetch_scoped(name, true).await
    }

    /// The value `secret` is no longer handed out: its lease is revoked once no request uses it.
    pub fn retire(self: &Arc<Self>, secret: &Secret) {
        let Some(id) = secret.lease() else { return };
        let lease = lock(&self.leases)
            .iter()
            .find(|l| l.id.as_str() == id)
            .cloned();
        if let Some(lease) = lease {
            lease.retired.store(true, Ordering::Release);
            if lease.users.load(Ordering::Acquire) == 0 {
                self.revoke_later(lease);
            }
        }
    }

    async fn fetch_scoped(self: &Arc<Self>, name: &str, own: bool) -> Result<Secret, FetchError> {
        let mut slot = match self.settings.read {
            Read::Dynamic { .. } => {
                let wait = tokio::time::timeout(LEASE_WAIT, self.slots.clone().acquire_owned());
                match wait.await {
                    Ok(Ok(permit)) => Some(permit),
                    _ => {
                        return Err(FetchError::LeasesExhausted {
                            secret: name.to_string(),
                            max: self.settings.max_leases,
                            waited_s: LEASE_WAIT.as_secs(),
                        })
                    }
                }
            }
            Read::Kv { .. } => None,
        };
        self.fetch_inner(name, &mut slot, own)
            .await
            .map_err(|Failed(reason)| FetchError::OpenBao {
                secret: name.to_string(),
                reason,
            })
    }

    async fn fetch_inner(
        self: &Arc<Self>,
        name: &str,
        slot: &mut Slot,
        own: bool,
    ) -> Result<Secret, Failed> {
        // A token the server no longer accepts (revoked, expired early) gets one fresh login.
        match self.read(name, slot, own).await {
            Err(Denied(_)) => {
                self.forget_token().await;
                self.read(name, slot, own).await.map_err(|Denied(path)| {
                    Failed(format!(
                        "{path} answered 403 (permission denied), also after a fresh login"
                    ))
                })?
            }
            Ok(r) => r,
        }
    }

    async fn read(
        self: &Arc<Self>,
        name: &str,
        slot: &mut Slot,
        own: bool,
    ) -> Result<Result<Secret, Failed>, Denied> {
        let token = match self.token().await {
            Ok(t) => t,
            Err(f) => return Ok(Err(f)),
        };
        let (method, path, body) = match &self.settings.read {
            Read::Kv { mount, path, .. } => (Method::GET, format!("{mount}/data/{path}"), None),
            Read::Dynamic { path, params, .. } if params.is_empty() => {
                (Method::GET, path.clone(), None)
            }
            Read::Dynamic { path, params, .. } => (
                Method::POST,
                path.clone(),
                Some(serde_json::to_vec(params).unwrap_or_default()),
            ),
        };
        let answer = match self.call(method, &path, Some(&token), body).await {
            Ok(a) => a,
            Err(f) => return Ok(Err(f)),
        };
        if answer.status == StatusCode::FORBIDDEN {
            return Err(Denied(path));
        }
        Ok(self.parse(name, &path, answer, slot, own))
    }

    fn parse(
        self: &Arc<Self>,
        name: &str,
        path: &str,
        answer: super::http::Answer,
        slot: &mut Slot,
        own: bool,
    ) -> Result<Secret, Failed> {
        if !answer.status.is_success() {
            return Err(status_failure(path, answer.status));
        }
        let malformed = || Failed(format!("{path}: the answer is not what OpenBao sends"));
        match &self.settings.read {
            Read::Kv { field, .. } => {
                let kv: KvAnswer = serde_json::from_slice(&answer.body).map_err(|_| malformed())?;
                let value = field_bytes(&kv.data.data, field, path)?;
                let version = format!("v{}", kv.data.metadata.version);
                Ok(Secret::new(name, value.to_vec()).versioned(name, &version))
            }
            Read::Dynamic { field, .. } => {
                let d: DynamicAnswer = match serde_json::from_slice(&answer.body) {
                    Ok(d) => d,
                    Err(_) => {
                        // Unreadable as a whole, it may still have issued a lease: revoke it,
                        // or every retry would leave one more behind.
                        if let Ok(l) = serde_json::from_slice::<LeaseOnly>(&answer.body) {
                            self.discard(Zeroizing::new(l.lease_id), false, 0, slot.take());
                        }
                        return Err(malformed());
                    }
                };
                let lease_id = Zeroizing::new(d.lease_id);
                let value = match field_bytes(&d.data, field, path) {
                    Ok(v) => v,
                    Err(f) => {
                        self.discard(lease_id, d.renewable, d.lease_duration, slot.take());
                        return Err(f);
                    }
                };
                if lease_id.is_empty() {
                    return Err(Failed(format!(
                        "{path}: the answer has no lease; use a KV secret for a static value"
                    )));
                }
                let ttl = Duration::from_secs(d.lease_duration);
                let version = format!("lease-{}", lease_fingerprint(&lease_id));
                let mut secret = Secret::new(name, value.to_vec())
                    .versioned(name, &version)
                    .leased(lease_id.to_string());
                // `run` renews its lease for as long as keygate runs, so the cache keeps it;
                // one that cannot be renewed is cached only for its TTL.
                let renewed = self.settings.jit == Jit::Run && d.renewable;
                if self.settings.jit != Jit::Request && !renewed && d.lease_duration > 0 {
                    secret = secret.expiring(SystemTime::now() + ttl);
                }
                let lease = Lease::new(lease_id, d.renewable, ttl, self.settings.jit);
                *lock(&lease.slot) = slot.take();
                self.track(lease, !own);
                Ok(secret)
            }
        }
    }

    /// A request starts using `secret`: its lease (if it has one from this source) stays alive,
    /// renewed as needed, until the returned hold is dropped.
    pub fn hold(self: &Arc<Self>, secret: &Secret) -> Option<LeaseHold> {
        let id = secret.lease()?;
        let leases = lock(&self.leases);
        let lease = leases.iter().find(|l| l.id.as_str() == id)?.clone();
        drop(leases);
        lease.users.fetch_add(1, Ordering::AcqRel);
        Some(LeaseHold {
            bao: self.clone(),
            lease,
        })
    }

    /// Whether the lease of `secret` (from this source) is known to be gone at the server
    /// (renewal refused as expired or unknown): such a value is no longer handed out.
    pub fn lease_gone(&self, secret: &Secret) -> bool {
        let Some(id) = secret.lease() else {
            return false;
        };
        !lock(&self.leases)
            .iter()
            .any(|l| l.id.as_str() == id && !l.dead.load(Ordering::Acquire))
    }

    /// Revokes every lease still held, within `deadline`; called at shutdown. Nothing is
    /// renewed afterwards.
    pub async fn shutdown(self: &Arc<Self>, deadline: Duration) {
        self.closed.store(true, Ordering::Release);
        let live: Vec<Arc<Lease>> = lock(&self.leases).drain(..).collect();
        let all = async {
            for lease in live {
                self.revoke(&lease).await;
            }
            self.revoke_own_token().await;
        };
        if tokio::time::timeout(deadline, all).await.is_err() {
            tracing::warn!(source = %self.label(), "not every lease was revoked before the shutdown deadline; the rest end with their TTL");
        }
    }

    /// A token keygate got by logging in (AppRole, JWT) is keygate's alone: revoked when it
    /// stops. One given to it (`token_env`, `token_file`) belongs to whoever gave it, and is kept.
    async fn revoke_own_token(&self) {
        if matches!(self.settings.auth, Auth::Token(_)) {
            return;
        }
        let Some(token) = self.token.lock().await.take() else {
            return;
        };
        match self
            .call(
                Method::POST,
                "auth/token/revoke-self",
                Some(&token.value),
                None,
            )
            .await
        {
            Ok(a) if a.status.is_success() => {
                tracing::debug!(source = %self.label(), "keygate's OpenBao token revoked")
            }
            Ok(a) => {
                tracing::warn!(source = %self.label(), status = %a.status, "keygate's OpenBao token could not be revoked; it ends with its TTL")
            }
            Err(Failed(reason)) => {
                tracing::warn!(source = %self.label(), error = %reason, "keygate's OpenBao token could not be revoked; it ends with its TTL")
            }
        }
    }

    /// A lease the server no longer knows: not handed out again, nothing to revoke.
    fn bury(&self, lease: &Arc<Lease>) {
        lease.dead.store(true, Ordering::Release);
        lease.retired.store(true, Ordering::Release);
        lease.revoked.store(true, Ordering::Release);
        lock(&self.leases).retain(|l| !Arc::ptr_eq(l, lease));
        lock(&lease.slot).take();
        let mut current = lock(&self.current);
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, lease)) {
            *current = None;
        }
    }

    /// Tracks a new lease; `shared` makes it the one cached for every request (`run`, `ttl`),
    /// replacing (and retiring) the one before.
    fn track(self: &Arc<Self>, lease: Lease, shared: bool) {
        let lease = Arc::new(lease);
        lock(&self.leases).push(lease.clone());
        if shared && lease.jit != Jit::Request {
            let old = lock(&self.current).replace(lease.clone());
            if let Some(old) = old {
                old.retired.store(true, Ordering::Release);
                if old.users.load(Ordering::Acquire) == 0 {
                    self.revoke_later(old);
                }
            }
        }
        if lease.renewable && !lease.ttl.is_zero() {
            let weak = Arc::downgrade(self);
            let l = lease.clone();
            tokio::spawn(renew_while_needed(weak, l));
        }
    }

    /// A lease the server issued with an answer keygate cannot use: tracked (so shutdown
    /// still sees it) and revoked at once.
    fn discard(self: &Arc<Self>, id: Zeroizing<String>, renewable: bool, ttl_s: u64, slot: Slot) {
        if id.is_empty() {
            return;
        }
        let lease = Arc::new(Lease::new(
            id,
            renewable,
            Duration::from_secs(ttl_s),
            Jit::Request,
        ));
        *lock(&lease.slot) = slot;
        lease.retired.store(true, Ordering::Release);
        lock(&self.leases).push(lease.clone());
        self.revoke_later(lease);
    }

    /// Revokes in the background; a failed revocation is tried again a few times, then left
    /// tracked for shutdown's last attempt.
    fn revoke_later(self: &Arc<Self>, lease: Arc<Lease>) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let bao = self.clone();
        rt.spawn(async move {
            let mut wait = REVOKE_RETRY_FIRST;
            for _ in 0..REVOKE_ATTEMPTS {
                if bao.revoke(&lease).await != Revoked::Retry
                    || bao.closed.load(Ordering::Acquire)
                {
                    return;
                }
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
            tracing::warn!(source = %bao.label(), "lease revocation kept failing; trying again at shutdown, else it ends with its TTL");
            // Once its TTL is over the server has let it go: its place under `max_leases` too.
            let end = *lock(&lease.expires);
            tokio::time::sleep_until(end.into()).await;
            bao.bury(&lease);
        });
    }

    /// One attempt. The lease stays tracked until the server confirmed it (or said it has no
    /// such lease), so a failure can be retried.
    async fn revoke(self: &Arc<Self>, lease: &Arc<Lease>) -> Revoked {
        if lease.revoked.swap(true, Ordering::AcqRel) {
            return Revoked::Done;
        }
        let body = serde_json::json!({ "lease_id": lease.id.as_str() });
        let result = match self.token().await {
            Ok(token) => {
                self.call(
                    Method::PUT,
                    "sys/leases/revoke",
                    Some(&token),
                    Some(body.to_string().into_bytes()),
                )
                .await
            }
            Err(f) => Err(f),
        };
        let outcome = match result {
            Ok(a) if a.status.is_success() => {
                tracing::debug!(source = %self.label(), "lease revoked");
                Revoked::Done
            }
            Ok(a) if matches!(a.status.as_u16(), 400 | 404) => {
                // Expired or unknown: nothing is left to revoke, and asking again cannot help.
                tracing::debug!(source = %self.label(), status = %a.status, "lease already gone");
                Revoked::Done
            }
            Ok(a) => {
                tracing::warn!(source = %self.label(), status = %a.status, "lease revocation refused; will try again");
                Revoked::Retry
            }
            Err(Failed(reason)) => {
                tracing::warn!(source = %self.label(), error = %reason, "lease revocation failed; will try again");
                Revoked::Retry
            }
        };
        match outcome {
            Revoked::Done => {
                lock(&self.leases).retain(|l| !Arc::ptr_eq(l, lease));
                lock(&lease.slot).take();
            }
            Revoked::Retry => lease.revoked.store(false, Ordering::Release),
        }
        outcome
    }

    async fn renew_lease(self: &Arc<Self>, lease: &Lease) -> Result<(), Renewal> {
        let token = self.token().await.map_err(Renewal::Later)?;
        let body = serde_json::json!({
            "lease_id": lease.id.as_str(),
            "increment": lease.ttl.as_secs(),
        });
        let a = self
            .call(
                Method::PUT,
                "sys/leases/renew",
                Some(&token),
                Some(body.to_string().into_bytes()),
            )
            .await
            .map_err(Renewal::Later)?;
        if matches!(a.status.as_u16(), 400 | 404) {
            // OpenBao's answer for a lease that expired, was revoked or never existed.
            return Err(Renewal::Gone(status_failure("sys/leases/renew", a.status)));
        }
        if !a.status.is_success() {
            return Err(Renewal::Later(status_failure("sys/leases/renew", a.status)));
        }
        let r: RenewAnswer = serde_json::from_slice(&a.body)
            .map_err(|_| Renewal::Later(Failed("sys/leases/renew: unexpected answer".into())))?;
        *lock(&lease.expires) = Instant::now() + Duration::from_secs(r.lease_duration);
        Ok(())
    }

    /// keygate's token: the held one while it has time left, else renewed, else a new login.
    async fn token(self: &Arc<Self>) -> Result<Zeroizing<String>, Failed> {
        let mut held = self.token.lock().await;
        if let Some(t) = held.as_ref() {
            match t.left() {
                None => return Ok(t.value.clone()),
                Some(left) if left > t.ttl / RENEW_AT_LEFT => return Ok(t.value.clone()),
                Some(_) if t.renewable => {
                    // A renewal capped by the token's max TTL leaves it short-lived: log in.
                    if self.renew_self(t).await.is_ok() && !t.expiring() {
                        return Ok(t.value.clone());
                    }
                }
                Some(_) => {}
            }
        }
        let fresh = Arc::new(self.login().await?);
        let value = fresh.value.clone();
        if fresh.renewable && !fresh.ttl.is_zero() {
            tokio::spawn(renew_token(Arc::downgrade(self), Arc::downgrade(&fresh)));
        }
        *held = Some(fresh);
        Ok(value)
    }

    async fn forget_token(&self) {
        *self.token.lock().await = None;
    }

    async fn renew_self(&self, t: &Token) -> Result<(), Failed> {
        let body = serde_json::json!({ "increment": t.ttl.as_secs() });
        let a = self
            .call(
                Method::POST,
                "auth/token/renew-self",
                Some(&t.value),
                Some(body.to_string().into_bytes()),
            )
            .await?;
        if !a.status.is_success() {
            return Err(status_failure("auth/token/renew-self", a.status));
        }
        let r: LoginAnswer = serde_json::from_slice(&a.body)
            .map_err(|_| Failed("auth/token/renew-self: unexpected answer".into()))?;
        *lock(&t.expires) = Some(Instant::now() + Duration::from_secs(r.auth.lease_duration));
        tracing::debug!(source = %self.label(), ttl_s = r.auth.lease_duration, "keygate's OpenBao token renewed");
        Ok(())
    }

    async fn login(&self) -> Result<Token, Failed> {
        match &self.settings.auth {
            Auth::Token(from) => {
                let value = read_token(from).await?;
                let a = self
                    .call(Method::GET, "auth/token/lookup-self", Some(&value), None)
                    .await?;
                if !a.status.is_success() {
                    return Err(status_failure("auth/token/lookup-self", a.status));
                }
                let l: LookupAnswer = serde_json::from_slice(&a.body)
                    .map_err(|_| Failed("auth/token/lookup-self: unexpected answer".into()))?;
                Ok(Token::new(value, l.data.ttl, l.data.renewable))
            }
            Auth::AppRole {
                mount,
                role_id,
                secret_id,
            } => {
                let sid = other_secret(secret_id).await?;
                #[allow(clippy::disallowed_methods)] // sent only in the login it was fetched for
                let sid = String::from_utf8_lossy(sid.expose()).into_owned();
                let body = Zeroizing::new(
                    serde_json::json!({ "role_id": role_id, "secret_id": sid }).to_string(),
                );
                drop(Zeroizing::new(sid));
                self.log_in(&format!("auth/{mount}/login"), &body).await
            }
            Auth::Jwt { mount, role, jwt } => {
                let token = other_secret(jwt).await?;
                #[allow(clippy::disallowed_methods)] // sent only in the login it was fetched for
                let jwt = Zeroizing::new(String::from_utf8_lossy(token.expose()).into_owned());
                let body = Zeroizing::new(
                    serde_json::json!({ "role": role, "jwt": jwt.as_str() }).to_string(),
                );
                self.log_in(&format!("auth/{mount}/login"), &body).await
            }
        }
    }

    async fn log_in(&self, path: &str, body: &str) -> Result<Token, Failed> {
        let a = self
            .call(Method::POST, path, None, Some(body.as_bytes().to_vec()))
            .await?;
        if !a.status.is_success() {
            return Err(status_failure(path, a.status));
        }
        let l: LoginAnswer = serde_json::from_slice(&a.body)
            .map_err(|_| Failed(format!("{path}: unexpected answer")))?;
        tracing::debug!(source = %self.label(), ttl_s = l.auth.lease_duration, "logged in to OpenBao");
        Ok(Token::new(
            Zeroizing::new(l.auth.client_token),
            l.auth.lease_duration,
            l.auth.renewable,
        ))
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&Zeroizing<String>>,
        body: Option<Vec<u8>>,
    ) -> Result<super::http::Answer, Failed> {
        let client = self
            .client
            .get_or_init(|| {
                BackendClient::new(self.settings.ca_file.as_deref(), DEFAULT_TIMEOUT)
                    .map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| Failed(e.clone()))?;
        let mut headers = HeaderMap::new();
        headers.insert("x-vault-request", HeaderValue::from_static("true"));
        if let Some(t) = token {
            let mut v = HeaderValue::from_str(t)
                .map_err(|_| Failed("keygate's token holds bytes a header may not".into()))?;
            v.set_sensitive(true);
            headers.insert("x-vault-token", v);
        }
        let body = match body {
            Some(b) => {
                headers.insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                // The body may hold a secret id or a JWT: it is zeroized after the copy is sent.
                let b = Zeroizing::new(b);
                Bytes::copy_from_slice(&b)
            }
            None => Bytes::new(),
        };
        let url = format!("{}/v1/{}", self.settings.address, path);
        Ok(client.send(method, &url, headers, body).await?)
    }
}

impl Drop for Bao {
    fn drop(&mut self) {
        // A reload replaced this source: whatever it still holds (leases, a token it logged in
        // for) is no longer used. `&mut self` means no renewal or request holds a lock now (each
        // holds an `Arc` while it does), so both are taken without waiting.
        if *self.closed.get_mut() {
            return;
        }
        let live: Vec<Arc<Lease>> = match self.leases.get_mut() {
            Ok(l) => std::mem::take(l),
            Err(p) => std::mem::take(p.into_inner()),
        };
        let token = self.token.get_mut().take();
        let own_token = token.is_some() && !matches!(self.settings.auth, Auth::Token(_));
        if live.is_empty() && !own_token {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(source = %self.label(), "a replaced OpenBao source could not revoke what it held; it ends with its TTL");
            return;
        };
        // A stand-in with the same settings (so it can log in again if it must) revokes the
        // leases, then the token if keygate logged in for it.
        let mut heir = Bao::new(self.settings.clone());
        *heir.token.get_mut() = token;
        match heir.leases.get_mut() {
            Ok(l) => l.extend(live),
            Err(p) => p.into_inner().extend(live),
        }
        let heir = Arc::new(heir);
        rt.spawn(async move { heir.shutdown(HANDOVER_DEADLINE).await });
    }
}

/// The outcome of one revocation attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Revoked {
    /// Revoked, or the server has no such lease: no longer tracked.
    Done,
    /// Failed (network, server error): still tracked, tried again.
    Retry,
}

/// Why a renewal failed.
enum Renewal {
    /// The server no longer knows the lease (expired, revoked): its value is dead.
    Gone(Failed),
    /// The server could not be asked or failed: try again while the lease has time left.
    Later(Failed),
}

/// A failed revocation is tried again after this, then twice as long each time.
const REVOKE_RETRY_FIRST: Duration = Duration::from_millis(500);

/// How many times a revocation is tried before it is left for shutdown (about 15 s in all).
const REVOKE_ATTEMPTS: u32 = 5;

/// How long a dynamic fetch waits for a lease to come free under `max_leases`.
pub const LEASE_WAIT: Duration = Duration::from_secs(3);

/// A fetch's place under `max_leases`, moved into the lease it gets.
type Slot = Option<tokio::sync::OwnedSemaphorePermit>;

/// How long a replaced source's stand-in has to revoke what it held.
const HANDOVER_DEADLINE: Duration = Duration::from_secs(10);

/// The server refused the token for this path: the caller logs in again, once.
struct Denied(String);

impl Token {
    fn new(value: Zeroizing<String>, ttl_s: u64, renewable: bool) -> Token {
        let ttl = Duration::from_secs(ttl_s);
        Token {
            value,
            expires: Mutex::new((ttl_s > 0).then(|| Instant::now() + ttl)),
            ttl,
            renewable,
        }
    }

    /// Whether less than the renewal share of its TTL is left.
    fn expiring(&self) -> bool {
        self.left().is_some_and(|l| l <= self.ttl / RENEW_AT_LEFT)
    }

    fn left(&self) -> Option<Duration> {
        lock(&self.expires).map(|e| e.saturating_duration_since(Instant::now()))
    }
}

/// Renews keygate's token before it expires, for as long as it is the held one, so an idle
/// keygate does not lose it; a failed renewal leaves the next use to log in afresh.
async fn renew_token(bao: Weak<Bao>, token: Weak<Token>) {
    loop {
        let Some(left) = token.upgrade().and_then(|t| t.left()) else {
            return;
        };
        let Some(t) = token.upgrade() else { return };
        let wait = left.saturating_sub(t.ttl / RENEW_AT_LEFT);
        drop(t);
        tokio::time::sleep(wait.max(Duration::from_millis(500))).await;
        let (Some(b), Some(t)) = (bao.upgrade(), token.upgrade()) else {
            return;
        };
        if b.closed.load(Ordering::Acquire) {
            return;
        }
        let current = b
            .token
            .lock()
            .await
            .as_ref()
            .is_some_and(|h| Arc::ptr_eq(h, &t));
        if !current {
            return;
        }
        if let Err(Failed(reason)) = b.renew_self(&t).await {
            tracing::warn!(source = %b.label(), error = %reason, "keygate's OpenBao token could not be renewed; logging in afresh at next use");
            b.forget_token().await;
            return;
        }
        if t.expiring() {
            // At its max TTL: renewing no longer extends it, so the next use logs in afresh.
            tracing::debug!(source = %b.label(), "keygate's OpenBao token reached its max TTL; logging in afresh at next use");
            b.forget_token().await;
            return;
        }
    }
}

/// After a failed renewal, the next attempt waits at least this long.
const RENEW_RETRY: Duration = Duration::from_secs(2);

/// Renews a lease while it is needed: while a request uses it, or for `run` until shutdown.
async fn renew_while_needed(bao: Weak<Bao>, lease: Arc<Lease>) {
    loop {
        let left = lock(&lease.expires).saturating_duration_since(Instant::now());
        let wait = left.saturating_sub(lease.ttl / RENEW_AT_LEFT);
        tokio::time::sleep(wait.max(Duration::from_millis(500))).await;
        if lease.revoked.load(Ordering::Acquire) {
            return;
        }
        let Some(b) = bao.upgrade() else { return };
        if b.closed.load(Ordering::Acquire) {
            return;
        }
        let in_use = lease.users.load(Ordering::Acquire) > 0
            || (lease.jit == Jit::Run && !lease.retired.load(Ordering::Acquire));
        if !in_use {
            return;
        }
        match b.renew_lease(&lease).await {
            Ok(()) => {}
            Err(Renewal::Gone(Failed(reason))) => {
                tracing::warn!(source = %b.label(), error = %reason, "lease is gone at the server; its value is dropped and fetched afresh");
                b.bury(&lease);
                return;
            }
            Err(Renewal::Later(Failed(reason))) => {
                if Instant::now() >= *lock(&lease.expires) {
                    tracing::warn!(source = %b.label(), error = %reason, "lease expired before it could be renewed; its value is dropped");
                    b.bury(&lease);
                    return;
                }
                tracing::warn!(source = %b.label(), error = %reason, "lease could not be renewed; trying again");
                drop(b);
                tokio::time::sleep(RENEW_RETRY).await;
            }
        }
    }
}

async fn read_token(from: &BaoToken) -> Result<Zeroizing<String>, Failed> {
    let raw = match from {
        BaoToken::Env(var) => match std::env::var(var) {
            Ok(v) if !v.trim().is_empty() => Zeroizing::new(v),
            _ => {
                return Err(Failed(format!(
                    "token_env: environment variable {var} is not set or empty"
                )))
            }
        },
        BaoToken::File(path) => {
            use std::os::unix::fs::PermissionsExt;
            let shown = path.display();
            let meta = tokio::fs::metadata(path)
                .await
                .map_err(|e| Failed(format!("token_file {shown}: {e}")))?;
            if meta.permissions().mode() & 0o077 != 0 {
                return Err(Failed(format!(
                    "token_file {shown} is readable by group or others; run chmod 600 on it"
                )));
            }
            let bytes = Zeroizing::new(
                tokio::fs::read(path)
                    .await
                    .map_err(|e| Failed(format!("token_file {shown}: {e}")))?,
            );
            Zeroizing::new(String::from_utf8_lossy(&bytes).into_owned())
        }
    };
    Ok(Zeroizing::new(raw.trim().to_string()))
}

/// The value of another configured secret (a secret id, a JWT), fetched for one login.
async fn other_secret(spec: &SecretSpec) -> Result<Secret, Failed> {
    match Box::pin(spec.fetch()).await {
        Ok(Some(s)) => Ok(s),
        Ok(None) => Err(Failed(format!("secret {} has no value", spec.name))),
        Err(e) => Err(Failed(e.to_string())),
    }
}

fn field_bytes<'a>(
    data: &'a BTreeMap<String, serde_json::Value>,
    field: &str,
    path: &str,
) -> Result<&'a [u8], Failed> {
    match data.get(field) {
        Some(serde_json::Value::String(s)) => Ok(s.as_bytes()),
        Some(_) => Err(Failed(format!("{path}: field {field} is not a string"))),
        None => Err(Failed(format!("{path}: no field {field}"))),
    }
}

/// An answer's status, in words; OpenBao's error text is not shown (it is the body).
fn status_failure(path: &str, status: StatusCode) -> Failed {
    let what = match status.as_u16() {
        400 => "bad request",
        403 => "permission denied",
        404 => "not found",
        429 => "rate limited",
        503 => "sealed or unavailable",
        500..=599 => "server error",
        _ => "refused",
    };
    Failed(format!("{path} answered {} ({what})", status.as_u16()))
}

/// What audit records show for a lease: a short fingerprint of its id, never the id (which
/// some policies accept, alone, to revoke the credential).
pub fn lease_fingerprint(lease_id: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"keygate lease-id v1\0");
    h.update(lease_id.as_bytes());
    hex::encode(&h.finalize()[..4])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_answer_names_the_status_not_the_body() {
        let Failed(m) = status_failure("secret/data/x", StatusCode::FORBIDDEN);
        assert_eq!(m, "secret/data/x answered 403 (permission denied)");
    }

    #[test]
    fn a_lease_fingerprint_is_stable_short_and_not_the_id() {
        let id = "pki/issue/agent/Xy12AbCdEfGh";
        let f = lease_fingerprint(id);
        assert_eq!(f.len(), 8);
        assert_eq!(f, lease_fingerprint(id));
        assert!(!id.contains(&f));
        assert_ne!(f, lease_fingerprint("pki/issue/agent/other"));
    }

    fn load(secrets: &str, route_extra: &str) -> Result<crate::config::Config, String> {
        let text = format!(
            "{secrets}\n[routes.r]\nprefix = \"/r\"\nupstream = \"http://127.0.0.1:1\"\nsecret = \"v\"\n{route_extra}"
        );
        crate::config::Config::from_text(std::path::Path::new("c.toml"), &text)
            .map_err(|e| e.to_string())
    }

    const DYNAMIC: &str = "[secrets.v]\nsource = \"openbao\"\naddress = \"http://127.0.0.1:8200\"\ntoken_env = \"T\"\ndynamic = \"database/creds/agent\"\nfield = \"password\"\n";
    const KV: &str = "[secrets.v]\nsource = \"openbao\"\naddress = \"http://127.0.0.1:8200\"\ntoken_env = \"T\"\npath = \"openai\"\nfield = \"api_key\"\n";

    fn jit_of(c: &crate::config::Config) -> Option<Jit> {
        match &c.secrets[0].source {
            crate::secret::SecretSource::OpenBao(b) => Some(b.settings().jit),
            _ => None,
        }
    }

    #[test]
    fn a_routes_jit_sets_its_dynamic_secrets_lease_lifetime() {
        for (line, want) in [
            ("jit = \"request\"", Jit::Request),
            ("jit = \"run\"", Jit::Run),
            ("", Jit::Ttl),
        ] {
            let c = load(DYNAMIC, line).unwrap();
            assert_eq!(jit_of(&c), Some(want), "{line}");
        }
        let c = load(DYNAMIC, "jit = \"request\"").unwrap();
        assert!(
            !c.secrets[0].source.prefetchable(),
            "a per-request lease is not prefetched"
        );
        assert!(load(DYNAMIC, "jit = \"run\"").unwrap().secrets[0]
            .source
            .prefetchable());
    }

    #[test]
    fn jit_on_a_kv_secret_or_an_unknown_jit_is_refused_at_load() {
        let e = load(KV, "jit = \"request\"").unwrap_err();
        assert!(e.contains("routes.r.jit") && e.contains("dynamic"), "{e}");
        let e = load(DYNAMIC, "jit = \"forever\"").unwrap_err();
        assert!(e.contains("unknown jit"), "{e}");
    }

    #[test]
    fn routes_sharing_a_dynamic_secret_must_agree_on_jit() {
        let second = "jit = \"run\"\n[routes.s]\nprefix = \"/s\"\nupstream = \"http://127.0.0.1:1\"\nsecret = \"v\"\njit = \"request\"\n";
        let e = load(DYNAMIC, second).unwrap_err();
        assert!(e.contains("different jit"), "{e}");
    }

    #[test]
    fn a_login_secret_must_exist_and_not_be_an_openbao_one() {
        let approle = |from: &str| {
            format!("[secrets.v]\nsource = \"openbao\"\naddress = \"http://127.0.0.1:8200\"\nauth = \"approle\"\nrole_id = \"r\"\nsecret_id_from = \"{from}\"\npath = \"p\"\nfield = \"f\"\n[secrets.sid]\nsource = \"env\"\nname = \"SID\"\n")
        };
        assert!(load(&approle("sid"), "").is_ok());
        let e = load(&approle("nope"), "").unwrap_err();
        assert!(e.contains("no [secrets.nope]"), "{e}");
        let e = load(&approle("v"), "").unwrap_err();
        assert!(e.contains("an openbao source"), "{e}");
        let e = load(&KV.replace("token_env = \"T\"\n", ""), "").unwrap_err();
        assert!(e.contains("token_env"), "{e}");
        let e = load(&KV.replace("http://", "ftp://"), "").unwrap_err();
        assert!(e.contains("address"), "{e}");
    }

    #[test]
    fn debug_of_the_source_shows_settings_and_never_the_token() {
        let c = load(KV, "").unwrap();
        let crate::secret::SecretSource::OpenBao(bao) = &c.secrets[0].source else {
            panic!("not openbao")
        };
        *bao.token.try_lock().unwrap() = Some(Arc::new(Token::new(
            Zeroizing::new("hvs.not-a-real-token-000".into()),
            60,
            true,
        )));
        let dbg = format!("{:?}", c.secrets[0]);
        assert!(
            dbg.contains("openai") && !dbg.contains("not-a-real-token"),
            "{dbg}"
        );
    }

    fn token_file() -> tempfile::NamedTempFile {
        // NamedTempFile is created 0600, as token_file demands.
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), "fake-bao-token").unwrap();
        f
    }

    fn dynamic_source(address: &str, jit: Jit, token: &std::path::Path) -> Arc<Bao> {
        Arc::new(Bao::new(Settings {
            address: address.into(),
            ca_file: None,
            auth: Auth::Token(BaoToken::File(token.into())),
            read: Read::Dynamic {
                path: "database/creds/agent".into(),
                field: "password".into(),
                params: BTreeMap::new(),
            },
            jit,
            max_leases: 64,
        }))
    }

    fn creds(lease: &str, ttl_s: u64, data: &str) -> (u16, String) {
        let body = format!(
            r#"{{"lease_id":"database/creds/agent/{lease}","lease_duration":{ttl_s},"renewable":true,"data":{data}}}"#
        );
        (200, body)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lease_issued_with_an_unusable_answer_is_revoked_not_leaked() {
        let fake = fake::FakeBao::start(|c, n| match c.path.as_str() {
            // First the field is missing, then the data is not even a map.
            "database/creds/agent" if n == 0 => creds("first", 60, r#"{"username":"u"}"#),
            "database/creds/agent" => creds("second", 60, r#""not a map""#),
            "sys/leases/revoke" => (204, String::new()),
            _ => (404, "{}".into()),
        })
        .await;
        let token = token_file();
        let bao = dynamic_source(&fake.address, Jit::Request, token.path());
        let e = bao.fetch("v").await.unwrap_err().to_string();
        assert!(e.contains("no field password"), "{e}");
        let e = bao.fetch("v").await.unwrap_err().to_string();
        assert!(e.contains("not what OpenBao sends"), "{e}");
        let revoked = fake.wait_for("sys/leases/revoke", 2).await;
        let bodies: Vec<&str> = revoked.iter().map(|c| c.body.as_str()).collect();
        assert_eq!(bodies.len(), 2, "{bodies:?}");
        assert!(
            bodies.iter().any(|b| b.contains("agent/first")),
            "{bodies:?}"
        );
        assert!(
            bodies.iter().any(|b| b.contains("agent/second")),
            "{bodies:?}"
        );
        assert!(lock(&bao.leases).is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_usable_answer_keeps_its_lease_until_its_request_is_done() {
        let fake = fake::FakeBao::start(|c, _| match c.path.as_str() {
            "database/creds/agent" => creds("one", 60, r#"{"password":"pw-1"}"#),
            "sys/leases/revoke" => (204, String::new()),
            _ => (404, "{}".into()),
        })
        .await;
        let token = token_file();
        let bao = dynamic_source(&fake.address, Jit::Request, token.path());
        let secret = bao.fetch("v").await.unwrap();
        let hold = bao.hold(&secret).unwrap();
        assert!(fake.calls_to("sys/leases/revoke").is_empty());
        drop(hold);
        assert_eq!(fake.wait_for("sys/leases/revoke", 1).await.len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_revocation_is_tried_again_and_the_lease_tracked_until_it_succeeds() {
        let fake = fake::FakeBao::start(|c, n| match c.path.as_str() {
            "database/creds/agent" => creds("one", 60, r#"{"password":"pw-1"}"#),
            "sys/leases/revoke" if n == 0 => (500, "{}".into()),
            "sys/leases/revoke" => (204, String::new()),
            _ => (404, "{}".into()),
        })
        .await;
        let token = token_file();
        let bao = dynamic_source(&fake.address, Jit::Request, token.path());
        let secret = bao.fetch("v").await.unwrap();
        drop(bao.hold(&secret));
        let calls = fake.wait_for("sys/leases/revoke", 2).await;
        assert_eq!(calls.len(), 2, "the failed revocation was not tried again");
        assert!(calls[1].method == "PUT" && calls[1].body.contains("agent/one"));
        for _ in 0..100 {
            if lock(&bao.leases).is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the lease is still tracked after its revocation succeeded");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lease_whose_renewal_is_refused_as_gone_is_no_longer_handed_out() {
        let fake = fake::FakeBao::start(|c, _| match c.path.as_str() {
            "database/creds/agent" => creds("one", 2, r#"{"password":"pw-1"}"#),
            "sys/leases/renew" => (400, r#"{"errors":["lease not found"]}"#.into()),
            _ => (404, "{}".into()),
        })
        .await;
        let token = token_file();
        let bao = dynamic_source(&fake.address, Jit::Run, token.path());
        let secret = bao.fetch("v").await.unwrap();
        assert!(!bao.lease_gone(&secret));
        fake.wait_for("sys/leases/renew", 1).await;
        for _ in 0..250 {
            if bao.lease_gone(&secret) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("a lease the server refused to renew is still handed out");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replaced_approle_source_revokes_its_own_token_even_with_no_lease() {
        let fake = fake::FakeBao::start(|c, _| match c.path.as_str() {
            "auth/approle/login" => (
                200,
                // Built at run time: the repository self-check refuses key-like literals.
                format!(
                    r#"{{"auth":{{"client_token":"{}","lease_duration":300,"renewable":true}}}}"#,
                    ["logged", "in", "1"].join("-")
                ),
            ),
            "secret/data/openai" => (
                200,
                r#"{"data":{"data":{"api_key":"v1"},"metadata":{"version":1}}}"#.into(),
            ),
            "auth/token/revoke-self" => (204, String::new()),
            _ => (404, "{}".into()),
        })
        .await;
        let text = format!("[secrets.v]\nsource = \"openbao\"\naddress = \"{}\"\nauth = \"approle\"\nrole_id = \"r\"\nsecret_id_from = \"sid\"\npath = \"openai\"\nfield = \"api_key\"\n[secrets.sid]\nsource = \"command\"\nargv = [\"echo\", \"role-secret-id-1\"]\n", fake.address);
        let c = load(&text, "").unwrap();
        let v = c.secrets.iter().find(|s| s.name == "v").unwrap();
        let crate::secret::SecretSource::OpenBao(bao) = v.source.clone() else {
            panic!("not openbao")
        };
        bao.fetch("v").await.unwrap();
        // A renewal of the token may be running: the hand-over must not depend on it.
        drop(bao);
        drop(c);
        let revoked = fake.wait_for("auth/token/revoke-self", 1).await;
        assert_eq!(
            revoked.len(),
            1,
            "the replaced source's token was left behind"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn past_max_leases_a_fetch_waits_then_is_refused_and_a_freed_lease_lets_the_next_one_in()
    {
        let fake = fake::FakeBao::start(|c, n| match c.path.as_str() {
            "database/creds/agent" => creds(&format!("l{n}"), 60, r#"{"password":"pw-long-1"}"#),
            "sys/leases/revoke" => (204, String::new()),
            _ => (404, "{}".into()),
        })
        .await;
        let token = token_file();
        let mut settings =
            Arc::into_inner(dynamic_source(&fake.address, Jit::Request, token.path()))
                .unwrap()
                .settings
                .clone();
        settings.max_leases = 1;
        let bao = Arc::new(Bao::new(settings));
        let first = bao.fetch("v").await.unwrap();
        let hold = bao.hold(&first).unwrap();
        let e = bao.fetch("v").await.unwrap_err();
        assert!(
            matches!(e, FetchError::LeasesExhausted { max: 1, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("max_leases"), "{e}");
        assert_eq!(
            fake.calls_to("database/creds/agent").len(),
            1,
            "no lease past the bound"
        );
        drop(hold);
        let second = bao.fetch("v").await.unwrap();
        assert_ne!(first.key_id(), second.key_id());
    }

    #[test]
    fn max_leases_is_for_dynamic_secrets_and_at_least_one() {
        assert!(load(&format!("{DYNAMIC}max_leases = 8\n"), "").is_ok());
        let e = load(&format!("{DYNAMIC}max_leases = 0\n"), "").unwrap_err();
        assert!(e.contains("max_leases must be between"), "{e}");
        let e = load(&format!("{KV}max_leases = 8\n"), "").unwrap_err();
        assert!(e.contains("only to a dynamic secret"), "{e}");
    }

    #[test]
    fn a_kv_field_that_is_not_a_string_is_refused() {
        let mut data = BTreeMap::new();
        data.insert("n".to_string(), serde_json::json!(3));
        assert!(field_bytes(&data, "n", "p").is_err());
        assert!(field_bytes(&data, "missing", "p").is_err());
    }
}
