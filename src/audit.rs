//! Stage `audit`: one JSON line per request, allowed or refused, hash-chained.
//!
//! Input: a [`Record`] filled in along the pipeline. Output: a line in the audit log.
//!
//! Group commit: the task that finishes a request serializes its record (into a buffer its thread
//! reuses) and appends the bytes to a shared batch; one writer thread, woken once per batch (not
//! per record), chains each record to the line before (`prev_hash`, `hash`) in the order they
//! were appended and writes the batch with one `write(2)`. A request never waits on the disk
//! nor on a hash. A failed write is kept and retried; while the log cannot be written,
//! [`AuditLog::healthy`] is false and the pipeline refuses new requests with 503
//! (`audit_unavailable`), so keygate never serves unaudited traffic for longer than it takes to
//! notice one failed write.
//!
//! Architecture invariant: exactly one record per request. [`Pending`] owns a request's record
//! from the start; finishing it sends it, and dropping it unfinished (client gone, task
//! cancelled) sends it with `reason: "aborted"`.
//!
//! Checkpoints: the writer closes a stretch of the chain with a `checkpoint` record after 1,000
//! records or 10 s (never when nothing was written since the last one); `start`, `checkpoint` and
//! `stop` records are signed with the ed25519 key in the state dir (`key`), in the writer thread.
//! [`verify`] checks a log from its `start` record (or a hash the user trusts) to its end.

pub mod head;
pub mod key;
mod verify;
mod wake;

pub use wake::on_park;

pub use head::{Head, HEAD_FILE};
pub use key::AuditKey;
pub use verify::{verify, Broken, Report, VerifyOptions};

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::{Code, Rejection};
use crate::lock;

mod json;
mod request;
pub use request::{ms, Finishing, MAX_PATH};

/// What happened to a request. Field names are the interface scripts read.
#[derive(Debug, Default, Serialize, Clone)]
pub struct Record {
    /// When keygate received the request, RFC 3339 UTC.
    pub time: Stamp,
    /// Keygate's id for the request, also sent to the client as `x-request-id` and in error bodies.
    pub request_id: String,
    /// The authenticated agent's name; absent when the request was refused before authentication.
    pub agent: Option<Arc<str>>,
    /// The person the agent acts for (the agent's `person`, else the config's default).
    pub person: Option<Arc<str>>,
    /// The route's name; absent when no route matched.
    pub route: Option<Arc<str>>,
    /// The upstream host the route forwards to (not the full URL).
    pub destination: Option<Arc<str>>,
    /// The request's HTTP method (kept as the method: a standard one costs no allocation).
    #[serde(serialize_with = "method_str")]
    pub method: http::Method,
    /// The request path without its query, cut to [`MAX_PATH`] characters.
    pub path: String,
    /// The path was longer than [`MAX_PATH`] characters and `path` holds its start.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub path_truncated: bool,
    /// SHA-256 of the whole request target (path and query), when `path` was cut.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_sha256: Option<String>,
    /// The query string's parameter names, never their values (a value can hold a secret).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<String>,
    /// The route's data classification label, as configured.
    pub classification: Option<Arc<str>>,
    /// Which policy decided: a hash of everything in the config that decides requests.
    pub policy_version: Arc<str>,
    /// Whether the request was allowed, denied, answered by dry-run, or ended in error.
    pub decision: Decision,
    /// The refusal code, or how an allowed exchange ended (`allowed`, `client_disconnected`, ...).
    pub reason: Reason,
    /// The HTTP status keygate answered with (0 if the request ended before one was chosen).
    pub status: u16,
    /// The key id (`name#fingerprint`) of the credential attached, never its value.
    pub key_id: Option<Arc<str>>,
    /// Milliseconds keygate spent on the request, from its arrival to the end of the answer.
    pub latency_ms: f64,
    /// Request body bytes read from the client.
    pub bytes_in: u64,
    /// Response body bytes sent to the client, after redaction.
    pub bytes_out: u64,
    /// Tokens the upstream reported using, when its answer carried usage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
    /// The listener the request came in on, as its URL (`http://addr:port` or `unix:path`).
    pub listener: Arc<str>,
    /// The connecting process, on a Unix socket listener.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<PeerRecord>,
    /// Who caused a refusal or failure: the agent, the upstream or keygate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blame: Option<crate::error::Blame>,
    /// The id of the token the agent presented (`tok_…`), never the token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_id: Option<std::sync::Arc<str>>,
    /// The `keygate run` the token was leased for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// The approval this request waited for, and who decided it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval_id: Option<String>,
    /// The person who approved or denied it (the user at the admin socket).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approved_by: Option<String>,
    /// What the request exfiltration scan found (labels: detector names and key ids, never
    /// values), refused or only reported.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub scan_findings: Vec<String>,
    /// The keygate that decided (`instance`), where several share one state store.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// A decision made without the shared state store: `rate_fail_open` (allowed while the
    /// store was unreachable, as `rate_limits = "fail-open"` says).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<&'static str>,
}

fn method_str<S: serde::Serializer>(m: &http::Method, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(m.as_str())
}

/// What keygate decided. `Error` is also the value of a record nobody finished.
#[derive(Debug, Default, Serialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Forwarded, or answered locally.
    Allow,
    /// Refused; the reason is the refusal's code.
    Deny,
    /// Answered by dry-run mode; nothing was sent upstream.
    DryRun,
    /// The request ended before keygate decided.
    #[default]
    Error,
}

impl Decision {
    /// The name the audit record and the metrics use.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
            Decision::DryRun => "dry_run",
            Decision::Error => "error",
        }
    }
}

/// Why a request ended the way it did: a refusal code, or how an allowed exchange finished.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub enum Reason {
    /// Not set yet.
    #[default]
    Unset,
    /// Forwarded and answered in full.
    Allowed,
    /// Forwarded with credentials in the request redacted by the scan.
    AllowedRequestRedacted,
    /// `/healthz`.
    Healthz,
    /// Answered by dry-run mode.
    DryRun,
    /// The upstream went quiet mid-body.
    UpstreamIdleTimeout,
    /// The upstream broke the body.
    UpstreamBodyError,
    /// The client went away before the answer ended.
    ClientDisconnected,
    /// The client stopped reading the answer for the route's idle time and was disconnected.
    ClientStalled,
    /// The answer ran past the route's `max_response_time`.
    MaxResponseTimeExceeded,
    /// A CONNECT whose tunnel keygate terminates: each request in it has its own record.
    TunnelTerminated,
    /// A CONNECT tunnelled without inspection (`egress_allow`, `egress = "tunnel"`).
    TunnelPassed,
    /// Refused with this code.
    Refused(crate::error::Code),
    /// The record was dropped unfinished; the reason it had so far.
    Aborted(Box<Reason>),
}

impl Reason {
    fn as_str(&self) -> &'static str {
        match self {
            Reason::Unset => "",
            Reason::Allowed => "allowed",
            Reason::AllowedRequestRedacted => "allowed_request_redacted",
            Reason::Healthz => "healthz",
            Reason::DryRun => "dry_run",
            Reason::UpstreamIdleTimeout => "upstream_idle_timeout",
            Reason::UpstreamBodyError => "upstream_body_error",
            Reason::ClientDisconnected => "client_disconnected",
            Reason::ClientStalled => "client_stalled",
            Reason::MaxResponseTimeExceeded => "max_response_time_exceeded",
            Reason::TunnelTerminated => "tunnel_terminated",
            Reason::TunnelPassed => "tunnel_passed",
            Reason::Refused(code) => code.as_str(),
            Reason::Aborted(_) => "aborted",
        }
    }
}

impl Serialize for Reason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Reason::Aborted(before) if **before != Reason::Unset => {
                s.collect_str(&format_args!("{} (aborted)", before.as_str()))
            }
            other => s.serialize_str(other.as_str()),
        }
    }
}

/// A record of keygate itself (`event: "start"` / `"stop"`), chained with the request records.
/// It has no `request_id`, so a reader counting requests skips it.
#[derive(Debug, Serialize, Clone)]
pub struct Lifecycle {
    /// When the event happened, RFC 3339 UTC.
    pub time: String,
    /// `start` or `stop`.
    pub event: &'static str,
    /// Keygate's process id.
    pub pid: u32,
    /// Keygate's version (the crate version).
    pub version: &'static str,
    /// The config file keygate runs with.
    pub config: String,
    /// The policy version in force, as in the request records that follow.
    pub policy_version: String,
    /// The keygate that wrote the log (`instance`), where several share one state store.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
}

/// The process on the other end of a Unix socket, from the socket's peer credentials.
#[derive(Debug, Serialize, Clone)]
pub struct PeerRecord {
    /// The peer's user id.
    pub uid: u32,
    /// The peer's process id, where the platform reports it.
    pub pid: Option<i32>,
}

/// Sees every request record as it is sent (metrics).
pub type Observer = Box<dyn Fn(&Record) + Send + Sync>;

/// The append-only audit log: records are chained and written by one writer thread, so a
/// request never waits on the disk.
pub struct AuditLog {
    observer: std::sync::OnceLock<Observer>,
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
    path: PathBuf,
}

/// What request tasks and the writer thread share. A record is serialized by the task that
/// finishes it and appended under `pending`'s lock; the writer takes whole batches and chains
/// them: the chain order is the order records were appended (the lock's order, as when tasks
/// chained them), and the writer is woken once per batch, not per record (a wake-up per record
/// cost more than the rest of a request).
struct Shared {
    pending: Mutex<Batch>,
    wake: Condvar,
    healthy: AtomicBool,
    chain: bool,
    key: Option<Arc<AuditKey>>,
    /// Where the writer keeps the end anchor, and the log path it names.
    head: Option<(PathBuf, PathBuf)>,
    checkpoint_every: usize,
    checkpoint_interval: Duration,
    /// A runtime thread owes the writer the wake-up for the current batch (see `wake`).
    owed: AtomicBool,
}

struct Batch {
    /// Serialized records (JSON objects, no `prev_hash`/`hash`), back to back.
    bodies: Vec<u8>,
    /// Where each record in `bodies` ends, and whether the writer signs it.
    entries: Vec<Entry>,
    /// Lifecycle writers waiting to hear whether their batch reached the file.
    acks: Vec<mpsc::Sender<Result<(), String>>>,
    closed: bool,
    /// Records queued since the last `start`, `checkpoint` or `stop`.
    since_checkpoint: usize,
    last_checkpoint: Instant,
    /// When the batch got its first record: a wake-up owed for longer is paid by the next
    /// record appended.
    first_at: Instant,
}

/// One record in a batch: the end of its bytes in `Batch::bodies`.
#[derive(Clone, Copy)]
struct Entry {
    end: usize,
    /// `start`, `checkpoint` and `stop` records are signed (when there is a key).
    signed: bool,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.acks.is_empty()
    }

    fn push(&mut self, body: &[u8], signed: bool) {
        self.bodies.extend_from_slice(body);
        self.entries.push(Entry {
            end: self.bodies.len(),
            signed,
        });
    }
}

/// How the log is written; [`Options::new`] has keygate's settings.
#[derive(Clone)]
pub struct Options {
    /// Hash-chain the records (`prev`/`hash` fields), so an edit or a removed line is detected.
    pub chain: bool,
    /// Signs `start`, `checkpoint` and `stop` records.
    pub key: Option<Arc<AuditKey>>,
    /// With a key: the head file ([`head`]) naming the last signed record written.
    pub head: Option<PathBuf>,
    /// A checkpoint after this many records...
    pub checkpoint_every: usize,
    /// ...or this long after the last one, whichever comes first.
    pub checkpoint_interval: Duration,
}

impl Options {
    /// Keygate's defaults: no signing key, a checkpoint every [`CHECKPOINT_EVERY`] records or 10 s.
    pub fn new(chain: bool) -> Options {
        Options {
            chain,
            key: None,
            head: None,
            checkpoint_every: CHECKPOINT_EVERY,
            checkpoint_interval: Duration::from_secs(10),
        }
    }
}

/// Records between checkpoints; `verify` treats a longer stretch as a removed checkpoint.
pub const CHECKPOINT_EVERY: usize = 1000;

/// A `checkpoint` record: how many records it closes since the one before.
#[derive(Serialize)]
struct Checkpoint<'a> {
    time: &'a str,
    event: &'static str,
    records: usize,
}

/// How long the writer lets records gather after the first one of a batch arrives.
const BATCH_WINDOW: Duration = Duration::from_millis(1);
/// How long the writer waits before retrying a failed write.
const RETRY_AFTER: Duration = Duration::from_millis(250);
/// Failed writes retried at exit before records are given up (and said to be).
const RETRIES_AT_EXIT: usize = 8;

/// The audit log could not be opened at start-up.
#[derive(Debug, thiserror::Error)]
#[error("audit log {}: {source}", path.display())]
pub struct OpenError {
    path: PathBuf,
    source: io::Error,
}

impl AuditLog {
    /// Opens (creating, mode 0600) the log for appending and starts the writer. An existing chain
    /// is continued from its last line.
    pub fn open(path: &Path, chain: bool) -> Result<Arc<AuditLog>, OpenError> {
        Self::open_with(path, Options::new(chain))
    }

    /// [`open`](AuditLog::open) with explicit options (signing key, checkpoint spacing).
    pub fn open_with(path: &Path, options: Options) -> Result<Arc<AuditLog>, OpenError> {
        use std::os::unix::fs::OpenOptionsExt;
        let chain = options.chain;
        let err = |source| OpenError {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(err)?;
        let (prev, torn) = if chain {
            last_hash(path).unwrap_or((None, false))
        } else {
            (None, false)
        };
        let head = match (&options.head, &options.key) {
            (Some(h), Some(_)) if chain => {
                let log = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
                Some((h.clone(), log))
            }
            _ => None,
        };
        // The head names its record by line, so the lines already there are counted once.
        let lines_before = match &head {
            Some(_) => count_lines(path).map_err(err)?,
            None => 0,
        };
        let shared = Arc::new(Shared {
            pending: Mutex::new(Batch {
                bodies: Vec::new(),
                entries: Vec::new(),
                acks: Vec::new(),
                closed: false,
                since_checkpoint: 0,
                last_checkpoint: Instant::now(),
                first_at: Instant::now(),
            }),
            wake: Condvar::new(),
            healthy: AtomicBool::new(true),
            chain,
            key: options.key,
            head,
            checkpoint_every: options.checkpoint_every.max(1),
            checkpoint_interval: options.checkpoint_interval,
            owed: AtomicBool::new(false),
        });
        let s = shared.clone();
        let writer = std::thread::Builder::new()
            .name("keygate-audit".into())
            .spawn(move || {
                let chain = Chain {
                    prev: prev.unwrap_or_else(|| GENESIS.to_string()),
                    hex: String::with_capacity(64),
                };
                write_loop(file, &s, lines_before, torn, chain)
            })
            .map_err(err)?;
        Ok(Arc::new(AuditLog {
            observer: std::sync::OnceLock::new(),
            shared,
            writer: Mutex::new(Some(writer)),
            path: path.to_path_buf(),
        }))
    }

    /// Refuses while the log cannot be written, so nothing is served unaudited (when the config
    /// fails closed, the default).
    pub fn check_writable(&self, fail_closed: bool) -> Result<(), Rejection> {
        if fail_closed && !self.healthy() {
            return Err(Rejection::new(
                Code::AuditUnavailable,
                "the audit log cannot be written; requests are refused until it can",
            ));
        }
        Ok(())
    }

    /// False while the log cannot be written; [`check_writable`](AuditLog::check_writable) then
    /// refuses requests when the config fails closed.
    pub fn healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::Relaxed)
    }

    /// The log file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts a request's record; it is written once, when the [`Pending`] finishes or drops.
    pub fn begin(self: &Arc<Self>, record: Record) -> Pending {
        Pending {
            record: Some(record),
            log: self.clone(),
        }
    }

    /// Shows every request record to `f` as it is sent; the first observer set stays.
    pub fn observe(&self, f: Observer) {
        let _ = self.observer.set(f);
    }

    fn send(&self, record: Record) {
        if let Some(o) = self.observer.get() {
            o(&record);
        }
        let appended = with_buffer(|buf| {
            json::write_record(buf, &record);
            self.append(buf, None, false)
        });
        if let Err(()) = appended {
            // After close (shutdown): say so where an operator sees it, with the id only.
            tracing::error!(request_id = %record.request_id, "audit log closed; record not written");
        }
    }

    /// Queues `body` (a JSON object without `prev_hash`/`hash`) for the writer, which chains it
    /// to the record queued before it. A `lifecycle` record (start, stop) closes a stretch of the
    /// chain as a checkpoint does.
    fn append(
        &self,
        body: &[u8],
        ack: Option<mpsc::Sender<Result<(), String>>>,
        lifecycle: bool,
    ) -> Result<(), ()> {
        let shared = &*self.shared;
        let mut batch = lock(&shared.pending);
        if batch.closed {
            return Err(());
        }
        let was_empty = batch.is_empty();
        // Someone waits for this batch to reach the file: no reason to let it gather.
        let urgent = ack.is_some() || lifecycle;
        // Decided under the lock, so a record appended next by another thread sees the debt.
        let owed = shared.owed.load(Ordering::Acquire);
        let pay_now = !was_empty && owed && (urgent || batch.first_at.elapsed() >= BATCH_WINDOW);
        let defer = was_empty && !urgent && wake::parks();
        if was_empty {
            batch.first_at = Instant::now();
            if defer {
                shared.owed.store(true, Ordering::Release);
            }
        }
        batch.push(body, lifecycle && shared.chain);
        if shared.chain {
            if lifecycle {
                batch.since_checkpoint = 0;
                batch.last_checkpoint = Instant::now();
            } else {
                batch.since_checkpoint += 1;
                if batch.since_checkpoint >= shared.checkpoint_every {
                    push_checkpoint(shared, &mut batch);
                }
            }
        }
        if let Some(ack) = ack {
            batch.acks.push(ack);
        }
        drop(batch);
        if defer {
            wake::owe(&self.shared);
        } else if was_empty {
            self.shared.wake.notify_one();
        } else if pay_now {
            wake::fire(shared);
        }
        Ok(())
    }

    /// Writes a lifecycle record and waits until it is on file (or failed). keygate writes one
    /// at start-up, so an unwritable log is known, and requests refused, before any is served.
    pub fn lifecycle(&self, record: Lifecycle) -> Result<(), String> {
        let (ack, done) = mpsc::channel();
        let body = serialize(&record, record.event);
        self.append(body.as_bytes(), Some(ack), true)
            .map_err(|()| "audit log closed".to_string())?;
        done.recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| Err("audit writer did not answer".into()))
    }

    /// Writes a control-plane record (reload, freeze, a person's decision) and waits until it
    /// is on file. Like lifecycle records it has no `request_id`.
    pub fn event<T: Serialize>(&self, record: &T) -> Result<(), String> {
        let (ack, done) = mpsc::channel();
        let body = serialize(record, "event");
        self.append(body.as_bytes(), Some(ack), false)
            .map_err(|()| "audit log closed".to_string())?;
        done.recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| Err("audit writer did not answer".into()))
    }

    /// Stops accepting records, writes everything queued (closed by a checkpoint if no `stop`
    /// record closed it), and waits for the writer.
    pub fn close(&self) {
        lock(&self.shared.pending).closed = true;
        self.shared.wake.notify_one();
        if let Ok(mut w) = self.writer.lock() {
            if let Some(w) = w.take() {
                let _ = w.join();
            }
        }
    }
}

/// Closes the records since the last checkpoint with a new one; nothing when there are none.
fn push_checkpoint(shared: &Shared, batch: &mut Batch) {
    if !shared.chain || batch.since_checkpoint == 0 {
        return;
    }
    let time = now_rfc3339();
    let body = serialize(
        &Checkpoint {
            time: &time,
            event: "checkpoint",
            records: batch.since_checkpoint,
        },
        "checkpoint",
    );
    batch.push(body.as_bytes(), true);
    batch.since_checkpoint = 0;
    batch.last_checkpoint = Instant::now();
}

/// The writer's end of the chain: the hash of the last record queued for the file.
struct Chain {
    prev: String,
    /// Reused for each record's hash in hex.
    hex: String,
}

impl Chain {
    /// Appends `body` to `out` as a line: chained when `chain` (`prev_hash`, then `hash` over
    /// the line up to and including `prev_hash`, as `chain_line` in the tests makes it) and signed when
    /// `sign`. Returns whether the line is signed.
    fn line(
        &mut self,
        out: &mut Vec<u8>,
        body: &[u8],
        chain: bool,
        sign: Option<&AuditKey>,
    ) -> bool {
        let Some(open) = body.strip_suffix(b"}").filter(|_| chain) else {
            out.extend_from_slice(body);
            out.push(b'\n');
            return false;
        };
        let start = out.len();
        out.extend_from_slice(open);
        out.extend_from_slice(b",\"prev_hash\":\"");
        out.extend_from_slice(self.prev.as_bytes());
        out.extend_from_slice(b"\"}");
        let digest = Sha256::digest(&out[start..]);
        out.pop();
        self.hex.clear();
        for b in digest {
            self.hex.push(char::from(HEX[usize::from(b >> 4)]));
            self.hex.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        out.extend_from_slice(b",\"hash\":\"");
        out.extend_from_slice(self.hex.as_bytes());
        out.push(b'"');
        if let Some(key) = sign {
            out.extend_from_slice(b",\"sig\":\"");
            out.extend_from_slice(key.sign_hash(&self.hex).as_bytes());
            out.push(b'"');
        }
        out.extend_from_slice(b"}\n");
        std::mem::swap(&mut self.prev, &mut self.hex);
        sign.is_some()
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

thread_local! {
    /// Each thread's buffer for serializing the records it finishes, so a record costs no
    /// allocation for its JSON.
    static BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's empty serialization buffer.
fn with_buffer<R>(f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    BUFFER.with(|b| match b.try_borrow_mut() {
        Ok(mut buf) => {
            buf.clear();
            let r = f(&mut buf);
            // One unusually large record does not keep its memory on every thread.
            if buf.capacity() > 64 * 1024 {
                *buf = Vec::new();
            }
            r
        }
        // Only reachable if `f` re-entered (an observer that writes a record); a buffer of its own.
        Err(_) => f(&mut Vec::new()),
    })
}

/// A request's record, written exactly once: by [`Pending::finish`], or on drop.
pub struct Pending {
    record: Option<Record>,
    log: Arc<AuditLog>,
}

impl Pending {
    /// Moves the record into a new owner (a task that finishes it later); this one is spent.
    pub fn take(&mut self) -> Pending {
        Pending {
            record: self.record.take(),
            log: self.log.clone(),
        }
    }

    /// Whether the record is still to be written by this owner.
    pub fn is_open(&self) -> bool {
        self.record.is_some()
    }

    /// Drops the record unwritten: only for a request handed on whole to a stage that writes
    /// its own record for it (the forward proxy's absolute-form requests go to the pipeline).
    pub fn handed_over(mut self) {
        self.record = None;
    }

    /// The record being filled in, to set fields as the request goes through the stages.
    pub fn record(&mut self) -> &mut Record {
        // `record` is Some until it is sent, and nothing writes to a sent record (its owner is
        // done with the request), so the default is never used.
        self.record.get_or_insert_with(Record::default)
    }

    /// Sends the record as it is now.
    pub fn finish(mut self) {
        self.send();
    }

    /// Sends the record now, for an owner that cannot give up `self`; later calls do nothing.
    pub fn send(&mut self) {
        if let Some(r) = self.record.take() {
            self.log.send(r);
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(mut r) = self.record.take() {
            if r.status == 0 {
                r.decision = Decision::Error;
            }
            r.reason = Reason::Aborted(Box::new(std::mem::take(&mut r.reason)));
            self.log.send(r);
        }
    }
}

#[allow(clippy::disallowed_methods)] // the writer's own thread waits, never a runtime worker
fn write_loop(mut file: File, shared: &Shared, lines_before: u64, torn: bool, mut chain: Chain) {
    // Bytes taken from the batch but not yet on file; retried until they are. A last line cut
    // mid-write (a crash) stays as it was; the next record starts on a line of its own.
    let mut unwritten: Vec<u8> = if torn { b"\n".to_vec() } else { Vec::new() };
    // The batch's buffers are swapped with these, so none is reallocated per batch.
    let mut taken: Vec<u8> = Vec::new();
    let mut entries: Vec<Entry> = Vec::new();
    let mut failures_at_exit = 0;
    // Lines on file or queued for it, and the last signed record queued (hash, line), which
    // the head file names once it is on file.
    let mut lines_queued = lines_before + u64::from(torn);
    let mut head_due: Option<(String, u64)> = None;
    // Ends a torn line now; if that fails, the loop retries it before any record.
    let _ = write_out(&mut file, &mut unwritten);
    loop {
        let (acks, closed) = {
            let mut batch = lock(&shared.pending);
            if unwritten.is_empty() {
                while batch.is_empty() && !batch.closed {
                    // Idle with records since the last checkpoint: wake when one is due.
                    let due = (batch.since_checkpoint > 0)
                        .then(|| batch.last_checkpoint + shared.checkpoint_interval);
                    match due {
                        Some(due) if Instant::now() >= due => push_checkpoint(shared, &mut batch),
                        Some(due) => {
                            let wait = due.saturating_duration_since(Instant::now());
                            batch = match shared.wake.wait_timeout(batch, wait) {
                                Ok((b, _)) => b,
                                Err(p) => p.into_inner().0,
                            };
                        }
                        None => {
                            batch = match shared.wake.wait(batch) {
                                Ok(b) => b,
                                Err(p) => p.into_inner(),
                            };
                        }
                    }
                }
                // Let a batch gather, unless someone waits on it or keygate is stopping.
                if batch.acks.is_empty() && !batch.closed {
                    drop(batch);
                    std::thread::sleep(BATCH_WINDOW);
                    batch = lock(&shared.pending);
                }
            } else {
                // A write failed: retry soon, with whatever arrived meanwhile.
                drop(batch);
                std::thread::sleep(RETRY_AFTER);
                batch = lock(&shared.pending);
            }
            // A busy log gets its checkpoint on time too; a closing one gets a last one unless
            // a `stop` record closed it.
            if batch.closed || batch.last_checkpoint.elapsed() >= shared.checkpoint_interval {
                push_checkpoint(shared, &mut batch);
            }
            // Whatever wake-up was owed for this batch is moot now (see `wake`).
            shared.owed.store(false, Ordering::Release);
            std::mem::swap(&mut batch.bodies, &mut taken);
            std::mem::swap(&mut batch.entries, &mut entries);
            (std::mem::take(&mut batch.acks), batch.closed)
        };
        // Chained here, off the requests' path, in the order the records were queued.
        let mut from = 0;
        for entry in &entries {
            let key = shared.key.as_deref().filter(|_| entry.signed);
            lines_queued += 1;
            if chain.line(&mut unwritten, &taken[from..entry.end], shared.chain, key)
                && shared.head.is_some()
            {
                head_due = Some((chain.prev.clone(), lines_queued));
            }
            from = entry.end;
        }
        taken.clear();
        entries.clear();
        let result = write_out(&mut file, &mut unwritten);
        // Health first, then the acks: whoever waited on this batch (the start record) must
        // find a failed write already refusing requests, or one could be forwarded unaudited
        // before this thread got back to marking the log unhealthy.
        let was_healthy = shared.healthy.swap(result.is_ok(), Ordering::Relaxed);
        for ack in acks {
            let _ = ack.send(result.as_ref().map(|_| ()).map_err(|e| e.to_string()));
        }
        match result {
            Ok(()) => {
                if let Some((hash, line)) = head_due.take() {
                    if let Err(e) = write_head(&file, shared, &hash, line) {
                        tracing::error!(error = %e, "audit head file could not be written; retried with the next signed record");
                    }
                }
            }
            Err(e) => {
                if was_healthy {
                    tracing::error!(error = %e, "audit log write failed; refusing requests until it succeeds");
                }
                if closed {
                    failures_at_exit += 1;
                    if failures_at_exit >= RETRIES_AT_EXIT {
                        let lines = unwritten.iter().filter(|&&b| b == b'\n').count();
                        tracing::error!(lines, "audit records could not be written before exit");
                        return;
                    }
                }
            }
        }
        if closed && unwritten.is_empty() && lock(&shared.pending).entries.is_empty() {
            let _ = file.sync_data();
            return;
        }
    }
}

/// Points the head file at a signed record now on file. The log is synced first, so the head
/// never names a line a power cut could still take back.
fn write_head(file: &File, shared: &Shared, hash: &str, line: u64) -> io::Result<()> {
    let (Some((head, log)), Some(key)) = (&shared.head, &shared.key) else {
        return Ok(());
    };
    file.sync_data()?;
    Head::new(key, log, hash, line).write(head)
}

fn newlines(bytes: &[u8]) -> u64 {
    bytes.iter().filter(|&&b| b == b'\n').count() as u64
}

/// Lines in the file (a last line without its newline is not counted: the writer ends it).
fn count_lines(path: &Path) -> io::Result<u64> {
    let f = File::open(path)?;
    if !f.metadata()?.is_file() {
        return Ok(0);
    }
    let mut reader = io::BufReader::with_capacity(1 << 16, f);
    let mut n = 0;
    loop {
        let buf = io::BufRead::fill_buf(&mut reader)?;
        if buf.is_empty() {
            return Ok(n);
        }
        n += newlines(buf);
        let len = buf.len();
        io::BufRead::consume(&mut reader, len);
    }
}

/// Writes the buffer, removing what reached the file, so a retry after a failure neither repeats
/// nor skips a byte.
fn write_out(file: &mut File, buf: &mut Vec<u8>) -> io::Result<()> {
    while !buf.is_empty() {
        match file.write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                buf.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `prev_hash` of the first record in a new chain.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// A record as JSON without `prev_hash` and `hash`, which the writer adds in chain order.
fn serialize<T: Serialize>(r: &T, id: &str) -> String {
    // Serializing plain strings and numbers cannot fail; keep a line (and the chain) if it does.
    serde_json::to_string(r)
        .unwrap_or_else(|e| serde_json::json!({"id": id, "error": e.to_string()}).to_string())
}

#[cfg(test)]
/// Appends `"prev_hash"` and then `"hash"` (SHA-256 of the line up to and including
/// `prev_hash`, closed with `}`) to a serialized record; returns the line and its hash.
fn chain_line(mut body: String, prev: &str) -> (String, String) {
    body.pop(); // the closing brace
    body.push_str(",\"prev_hash\":\"");
    body.push_str(prev);
    body.push_str("\"}");
    let hash = hex::encode(Sha256::digest(body.as_bytes()));
    body.pop();
    body.push_str(",\"hash\":\"");
    body.push_str(&hash);
    body.push_str("\"}");
    (body, hash)
}

/// The `hash` a chained line carries, checked against its content: `None` if it does not hold.
pub fn line_hash(line: &str) -> Option<String> {
    split_line(line).map(|(hash, _)| hash.to_string())
}

/// A chained line's checked `hash` and, on signed records, its `sig`: `None` if the hash does
/// not hold. A signed line ends `…,"hash":"H","sig":"S"}`; the signature is outside what is
/// hashed, since it is made over the hash.
pub(crate) fn split_line(line: &str) -> Option<(&str, Option<&str>)> {
    const HASH_TAIL: usize = ",\"hash\":\"".len() + 64 + "\"".len();
    const SIG_TAIL: usize = ",\"sig\":\"".len() + 128 + "\"".len();
    let inner = line.strip_suffix('}')?;
    let (inner, sig) = match inner.len().checked_sub(SIG_TAIL) {
        Some(at) if inner.is_char_boundary(at) && inner[at..].starts_with(",\"sig\":\"") => {
            let sig = inner[at..].strip_prefix(",\"sig\":\"")?.strip_suffix('"')?;
            (&inner[..at], Some(sig))
        }
        _ => (inner, None),
    };
    let at = inner.len().checked_sub(HASH_TAIL)?;
    if !inner.is_char_boundary(at) {
        return None;
    }
    let (body, tail) = inner.split_at(at);
    let hash = tail.strip_prefix(",\"hash\":\"")?.strip_suffix('"')?;
    let mut hasher = Sha256::new();
    hasher.update(body.as_bytes());
    hasher.update(b"}");
    let want = hex::encode(hasher.finalize());
    (want == hash).then_some((hash, sig))
}

/// The hash of the log's last intact line, and whether the file ends mid-line (a write cut by a
/// crash), so the next record must begin on a new line.
fn last_hash(path: &Path) -> io::Result<(Option<String>, bool)> {
    let mut f = File::open(path)?;
    // A device (/dev/full, a FIFO) has no last line, and reading one may never end.
    if !f.metadata()?.is_file() {
        return Ok((None, false));
    }
    let len = f.seek(SeekFrom::End(0))?;
    let start = len.saturating_sub(64 * 1024);
    f.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::new();
    f.take(64 * 1024).read_to_end(&mut tail)?;
    let torn = tail.last().is_some_and(|b| *b != b'\n');
    let tail = String::from_utf8_lossy(&tail);
    let hash = tail
        .lines()
        .rev()
        .filter(|l| !l.trim().is_empty())
        .find_map(line_hash);
    Ok((hash, torn))
}

/// A record's time, taken when the request arrives and written as RFC 3339 UTC (milliseconds)
/// only when the record is serialized: straight into the record's buffer, with no string of
/// its own per request.
#[derive(Debug, Clone, Copy)]
pub struct Stamp(pub SystemTime);

impl Stamp {
    /// This moment.
    pub fn now() -> Stamp {
        Stamp(SystemTime::now())
    }
}

impl Default for Stamp {
    fn default() -> Stamp {
        Stamp(SystemTime::UNIX_EPOCH)
    }
}

impl Serialize for Stamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_millis(self.0))
    }
}

/// RFC 3339 UTC with milliseconds.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests wait on plain threads
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn rec(id: &str) -> Record {
        Record {
            request_id: id.into(),
            decision: Decision::Allow,
            status: 200,
            time: Stamp::now(),
            ..Default::default()
        }
    }

    #[test]
    fn record_time_is_written_as_rfc3339_utc_with_milliseconds() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let r = Record {
            time: Stamp(t),
            ..Default::default()
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["time"], "2023-11-14T22:13:20.123Z");
    }

    fn lifecycle(event: &'static str) -> Lifecycle {
        Lifecycle {
            time: now_rfc3339(),
            event,
            pid: 1,
            version: "test",
            config: "test.toml".into(),
            policy_version: "p".into(),
            instance: None,
        }
    }

    fn check(path: &Path) -> Result<Report, Broken> {
        verify(path, &VerifyOptions::default()).unwrap()
    }

    fn check_with(path: &Path, key: &AuditKey) -> Result<Report, Broken> {
        let opts = VerifyOptions {
            key: Some(key.public()),
            ..Default::default()
        };
        verify(path, &opts).unwrap()
    }

    fn signed(every: usize, key: &Arc<AuditKey>) -> Options {
        Options {
            key: Some(key.clone()),
            checkpoint_every: every,
            ..Options::new(true)
        }
    }

    /// A run as keygate makes it: start, `n` request records, stop.
    fn run(path: &Path, options: Options, ids: std::ops::Range<usize>) {
        let log = AuditLog::open_with(path, options).unwrap();
        log.lifecycle(lifecycle("start")).unwrap();
        for i in ids {
            log.begin(rec(&format!("r{i}"))).finish();
        }
        log.lifecycle(lifecycle("stop")).unwrap();
        log.close();
    }

    fn lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Changes a line and recomputes every hash after it, as someone without the key would.
    fn rewrite_with_recomputed_hashes(path: &Path, lineno: usize, from: &str, to: &str) {
        let text = std::fs::read_to_string(path).unwrap();
        let mut prev = GENESIS.to_string();
        let mut out = String::new();
        for (i, line) in text.lines().enumerate() {
            let (_, sig) = split_line(line).unwrap();
            let mut body = line[..line.rfind(",\"prev_hash\":").unwrap()].to_string() + "}";
            if i + 1 == lineno {
                body = body.replace(from, to);
            }
            let (mut line, hash) = chain_line(body, &prev);
            if let Some(sig) = sig {
                line.pop();
                line.push_str(&format!(",\"sig\":\"{sig}\"}}"));
            }
            out.push_str(&line);
            out.push('\n');
            prev = hash;
        }
        std::fs::write(path, out).unwrap();
    }

    #[test]
    fn writer_chains_and_signs_lines_as_chain_line_defines_them() {
        let key = AuditKey::from_seed([3; 32]);
        let mut chain = Chain {
            prev: GENESIS.to_string(),
            hex: String::new(),
        };
        let mut out = Vec::new();
        let one = serialize(&rec("one"), "one");
        let two = serialize(&lifecycle("stop"), "stop");
        assert!(!chain.line(&mut out, one.as_bytes(), true, None));
        assert!(chain.line(&mut out, two.as_bytes(), true, Some(&key)));
        let (line_one, hash_one) = chain_line(one, GENESIS);
        let (mut line_two, hash_two) = chain_line(two, &hash_one);
        line_two.pop();
        line_two.push_str(&format!(",\"sig\":\"{}\"}}", key.sign_hash(&hash_two)));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("{line_one}\n{line_two}\n")
        );
        assert_eq!(chain.prev, hash_two);
        // Unchained, a record is its body on a line.
        let mut plain = Vec::new();
        assert!(!chain.line(&mut plain, b"{\"a\":1}", false, Some(&key)));
        assert_eq!(plain, b"{\"a\":1}\n");
    }

    #[test]
    fn decision_names_are_the_ones_records_carry() {
        for d in [
            Decision::Allow,
            Decision::Deny,
            Decision::DryRun,
            Decision::Error,
        ] {
            assert_eq!(serde_json::to_value(d).unwrap(), d.as_str());
        }
    }

    #[test]
    fn every_pending_record_is_written_once_and_chained() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let log = AuditLog::open(&path, true).unwrap();
        log.lifecycle(lifecycle("start")).unwrap();
        log.begin(rec("one")).finish();
        drop(log.begin(rec("two"))); // dropped unfinished
        log.close();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "start, two records, closing checkpoint");
        assert!(lines[2].contains("\"aborted\""), "{}", lines[2]);
        assert!(
            lines[3].contains("\"event\":\"checkpoint\""),
            "{}",
            lines[3]
        );
        let report = check(&path).unwrap();
        assert_eq!((report.records, report.tail), (4, None));
    }

    #[test]
    fn chain_continues_across_restarts_and_tampering_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        run(&path, Options::new(true), 0..2);
        run(&path, Options::new(true), 2..4);
        let report = check(&path).unwrap();
        assert_eq!((report.records, report.closed), (8, true));
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("\"r3\"", "\"r9\"");
        std::fs::write(&path, text).unwrap();
        assert_eq!(check(&path).unwrap_err().line, 7);
    }

    #[test]
    fn log_whose_first_lines_were_cut_needs_an_anchor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        run(&path, Options::new(true), 0..5);
        let full = std::fs::read_to_string(&path).unwrap();
        let hashes: Vec<String> = lines(&path)
            .iter()
            .map(|v| v["hash"].as_str().unwrap().to_string())
            .collect();
        let cut = dir.path().join("cut.jsonl");
        let rest: Vec<&str> = full.lines().skip(3).collect();
        std::fs::write(&cut, rest.join("\n") + "\n").unwrap();

        let err = check(&cut).unwrap_err();
        assert_eq!(err.line, 1);
        assert!(err.reason.contains("start record"), "{}", err.reason);

        // The hash of the last line before the cut anchors the rest.
        let opts = VerifyOptions {
            from_hash: Some(hashes[2].clone()),
            ..Default::default()
        };
        let r = verify(&cut, &opts).unwrap().unwrap();
        assert_eq!((r.records, r.anchor_line, r.before_anchor), (4, 1, 0));
        assert!(r.complete());
        // A hash inside the file anchors there; the lines before it are reported.
        let opts = VerifyOptions {
            from_hash: Some(hashes[4].clone()),
            ..Default::default()
        };
        let r = verify(&cut, &opts).unwrap().unwrap();
        assert_eq!((r.anchor_line, r.before_anchor), (2, 1));
        assert!(!r.complete());
        let opts = VerifyOptions {
            from_hash: Some("ab".repeat(32)),
            ..Default::default()
        };
        assert_eq!(verify(&cut, &opts).unwrap().unwrap_err().line, 1);
    }

    #[test]
    fn cut_tail_is_reported_not_broken() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        run(&path, Options::new(true), 0..4);
        let full = std::fs::read_to_string(&path).unwrap();
        let whole: Vec<&str> = full.lines().collect();

        // Cut after a record: lines 2..4 follow the start and nothing closes them.
        std::fs::write(&path, whole[..4].join("\n") + "\n").unwrap();
        let r = check(&path).unwrap();
        assert!(!r.closed && !r.complete());
        assert!(r.tail.as_deref().unwrap().contains("lines 2..4"), "{r:?}");

        // Cut mid-line, as a crash during a write leaves it.
        let text = whole[..4].join("\n") + "\n" + &whole[4][..40];
        std::fs::write(&path, &text).unwrap();
        let r = check(&path).unwrap();
        assert!(
            r.tail.as_deref().unwrap().contains("line 5 is incomplete"),
            "{r:?}"
        );

        // keygate reopening that log starts its records on a new line and the chain goes on
        // from the last intact line: the torn line is reported, and only --strict fails on it.
        run(&path, Options::new(true), 9..10);
        let r = check(&path).unwrap();
        assert_eq!((r.torn.clone(), r.closed), (vec![5], true));
        assert!(!r.complete());

        // A damaged line that no restart follows is a broken log.
        let text = std::fs::read_to_string(&path).unwrap();
        let damaged: Vec<&str> = text.lines().filter(|l| !l.contains("\"start\"")).collect();
        std::fs::write(
            &path,
            whole[0].to_string() + "\n" + &damaged.join("\n") + "\n",
        )
        .unwrap();
        assert_eq!(check(&path).unwrap_err().line, 5);
    }

    #[test]
    fn rotated_logs_verify_each_on_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        run(&path, Options::new(true), 0..3);
        let old = dir.path().join("a.jsonl.1");
        std::fs::rename(&path, &old).unwrap();
        run(&path, Options::new(true), 3..6);
        for p in [&old, &path] {
            let r = check(p).unwrap();
            assert!(r.complete() && r.closed, "{}: {r:?}", p.display());
        }
    }

    #[test]
    fn checkpoints_come_every_n_records_and_close_adds_a_last_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let log = AuditLog::open_with(
            &path,
            Options {
                checkpoint_every: 3,
                ..Options::new(true)
            },
        )
        .unwrap();
        log.lifecycle(lifecycle("start")).unwrap();
        for i in 0..7 {
            log.begin(rec(&format!("r{i}"))).finish();
        }
        log.close();
        let events: Vec<Option<String>> = lines(&path)
            .iter()
            .map(|v| v["event"].as_str().map(str::to_string))
            .collect();
        let cp = Some("checkpoint".to_string());
        let st = Some("start".to_string());
        assert_eq!(
            events,
            [
                st,
                None,
                None,
                None,
                cp.clone(),
                None,
                None,
                None,
                cp.clone(),
                None,
                cp
            ]
        );
        assert_eq!(lines(&path)[4]["records"], 3);
    }

    #[test]
    fn more_records_than_a_checkpoint_interval_without_one_fail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let n = CHECKPOINT_EVERY + 1;
        let log = AuditLog::open_with(
            &path,
            Options {
                checkpoint_every: n + 1,
                ..Options::new(true)
            },
        )
        .unwrap();
        log.lifecycle(lifecycle("start")).unwrap();
        for i in 0..n {
            log.begin(rec(&format!("r{i}"))).finish();
        }
        log.close();
        let err = check(&path).unwrap_err();
        assert_eq!(err.line, CHECKPOINT_EVERY + 2);
        assert!(
            err.reason.contains("checkpoint record was removed"),
            "{}",
            err.reason
        );
    }

    #[test]
    fn checkpoint_is_written_after_the_interval_only_when_records_were_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let log = AuditLog::open_with(
            &path,
            Options {
                checkpoint_interval: Duration::from_millis(50),
                ..Options::new(true)
            },
        )
        .unwrap();
        log.lifecycle(lifecycle("start")).unwrap();
        std::thread::sleep(Duration::from_millis(200)); // idle: no checkpoint
        log.begin(rec("one")).finish();
        let deadline = Instant::now() + Duration::from_secs(10);
        while lines(&path).len() < 3 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(200)); // idle again: no second checkpoint
        let events: Vec<serde_json::Value> =
            lines(&path).iter().map(|v| v["event"].clone()).collect();
        assert_eq!(
            events,
            ["start".into(), serde_json::Value::Null, "checkpoint".into()]
        );
        log.close();
        assert_eq!(
            lines(&path).len(),
            3,
            "close adds nothing when all is covered"
        );
    }

    #[test]
    fn signed_log_verifies_and_an_edit_with_recomputed_hashes_fails_at_the_next_signature() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let key = Arc::new(AuditKey::from_seed([3; 32]));
        run(&path, signed(4, &key), 0..10);
        let r = check_with(&path, &key).unwrap();
        // start, checkpoints after records 4 and 8, stop
        assert_eq!((r.signed, r.closed, r.tail), (4, true, None));

        // Without the key, the rewritten log still looks whole...
        rewrite_with_recomputed_hashes(&path, 3, "\"r1\"", "\"r7\"");
        assert!(check(&path).is_ok());
        // ...with it, the checkpoint after the edit names the stretch that changed.
        let err = check_with(&path, &key).unwrap_err();
        assert_eq!(err.line, 6, "{}", err.reason);
        assert!(err.reason.contains("2..6"), "{}", err.reason);
        let other = AuditKey::from_seed([4; 32]);
        let path2 = dir.path().join("b.jsonl");
        run(&path2, signed(4, &key), 0..2);
        assert_eq!(check_with(&path2, &other).unwrap_err().line, 1);
    }

    #[test]
    fn log_cut_at_a_checkpoint_or_run_boundary_fails_only_against_the_head_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let head_path = dir.path().join(HEAD_FILE);
        let key = Arc::new(AuditKey::from_seed([6; 32]));
        let opts = Options {
            head: Some(head_path.clone()),
            ..signed(4, &key)
        };
        run(&path, opts.clone(), 0..10);
        run(&path, opts, 10..15);
        let all = lines(&path);
        let head = Head::read(&head_path, &key.public()).unwrap();
        assert_eq!(
            head.line as usize,
            all.len(),
            "the head names the last line"
        );
        assert_eq!(head.hash, all.last().unwrap()["hash"].as_str().unwrap());
        let mode = std::fs::metadata(&head_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let to_head = VerifyOptions {
            key: Some(key.public()),
            to_hash: Some(head.hash.clone()),
            to_line: Some(head.line),
            ..Default::default()
        };
        let whole = verify(&path, &to_head).unwrap().unwrap();
        assert_eq!(whole.reached, Some(all.len()));
        assert!(whole.complete() && whole.closed);

        let text = std::fs::read_to_string(&path).unwrap();
        let first_stop = all.iter().position(|v| v["event"] == "stop").unwrap() + 1;
        let first_checkpoint = all.iter().position(|v| v["event"] == "checkpoint").unwrap() + 1;
        let cut = dir.path().join("cut.jsonl");
        for at in [first_checkpoint, first_stop] {
            let kept: Vec<&str> = text.lines().take(at).collect();
            std::fs::write(&cut, kept.join("\n") + "\n").unwrap();
            // Every line left holds and is signed where it should be...
            let r = check_with(&cut, &key).unwrap();
            assert!(r.tail.is_none(), "cut at {at}: {r:?}");
            // ...only the head knows more was written.
            let err = verify(&cut, &to_head).unwrap().unwrap_err();
            assert_eq!(err.line, at + 1);
            let want = format!("lines {}..{} are missing", at + 1, all.len());
            assert!(err.reason.contains(&want), "{}", err.reason);
        }
    }

    #[test]
    fn head_counts_lines_already_in_the_log_and_a_torn_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let head_path = dir.path().join(HEAD_FILE);
        let key = Arc::new(AuditKey::from_seed([6; 32]));
        run(&path, signed(4, &key), 0..3);
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"time\":\"2026");
        std::fs::write(&path, text).unwrap();
        let opts = Options {
            head: Some(head_path.clone()),
            ..signed(4, &key)
        };
        run(&path, opts, 3..5);
        let head = Head::read(&head_path, &key.public()).unwrap();
        let n = std::fs::read_to_string(&path).unwrap().lines().count();
        assert_eq!(head.line as usize, n);
    }

    #[test]
    fn well_formed_record_with_a_wrong_hash_is_broken_not_a_crash_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let key = Arc::new(AuditKey::from_seed([3; 32]));
        run(&path, signed(4, &key), 0..3);
        run(&path, signed(4, &key), 3..5);
        let text = std::fs::read_to_string(&path).unwrap();
        let mut kept: Vec<String> = text.lines().map(str::to_string).collect();
        let second_start = kept.iter().rposition(|l| l.contains("\"start\"")).unwrap();
        let forged = format!(
            "{{\"request_id\":\"forged\",\"decision\":\"allow\",\"prev_hash\":\"{}\",\"hash\":\"{}\"}}",
            "00".repeat(32),
            "11".repeat(32)
        );
        kept.insert(second_start, forged.clone());
        std::fs::write(&path, kept.join("\n") + "\n").unwrap();
        let err = check_with(&path, &key).unwrap_err();
        assert_eq!(err.line, second_start + 1, "{}", err.reason);
        assert!(err.reason.contains("hash does not match"), "{}", err.reason);

        // The same record appended without its newline is not a cut tail either.
        kept.remove(second_start);
        std::fs::write(&path, kept.join("\n") + "\n" + &forged).unwrap();
        assert_eq!(check(&path).unwrap_err().line, kept.len() + 1);
        // A line cut mid-write still is.
        let cut = &forged[..forged.len() - 40];
        std::fs::write(&path, kept.join("\n") + "\n" + cut).unwrap();
        assert!(check(&path).unwrap().tail.unwrap().contains("incomplete"));
    }

    #[test]
    fn unsigned_or_stripped_checkpoints_fail_with_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let key = Arc::new(AuditKey::from_seed([3; 32]));
        run(&path, Options::new(true), 0..2);
        let err = check_with(&path, &key).unwrap_err();
        assert_eq!(err.line, 1);
        assert!(err.reason.contains("not signed"), "{}", err.reason);
    }

    #[test]
    fn close_writes_every_record_from_many_threads_and_a_closing_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let key = Arc::new(AuditKey::from_seed([5; 32]));
        let log = AuditLog::open_with(&path, signed(CHECKPOINT_EVERY, &key)).unwrap();
        log.lifecycle(lifecycle("start")).unwrap();
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for i in 0..500 {
                        log.begin(rec(&format!("t{t}-{i}"))).finish();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        log.close();
        let all = lines(&path);
        let ids: std::collections::HashSet<&str> = all
            .iter()
            .filter_map(|v| v["request_id"].as_str())
            .collect();
        assert_eq!(ids.len(), 4000);
        assert_eq!(all.last().unwrap()["event"], "checkpoint");
        let r = check_with(&path, &key).unwrap();
        assert!(r.complete(), "{r:?}");
        assert!(r.signed >= 5, "{r:?}");
    }

    #[test]
    fn long_path_is_marked_cut_with_a_hash_and_query_keeps_names_only() {
        let scanner = crate::redact::Redactor::builder().build();
        let long = format!("/v1/{}", "a".repeat(3000));
        let uri: http::Uri = format!("{long}?limit=5&after=tok_9&flag").parse().unwrap();
        let mut r = Record::default();
        r.set_target(&uri, &scanner);
        assert_eq!(r.path.len(), MAX_PATH);
        assert!(r.path_truncated);
        let want = hex::encode(Sha256::digest(format!("{long}?limit=5&after=tok_9&flag")));
        assert_eq!(r.target_sha256.as_deref(), Some(want.as_str()));
        assert_eq!(r.query_params, ["limit", "after", "flag"]);
        let json = serde_json::to_string(&r).unwrap();
        assert!(!json.contains("tok_9"), "{json}");

        // A bare `?<secret>` makes the secret a name: it is redacted before it is recorded.
        let held = format!("held-{}", "x7Q".repeat(10));
        let shaped = format!("sk-proj-{}", "Ab3dE".repeat(9));
        let scanner = crate::redact::Redactor::builder()
            .known("openai#1234", held.as_bytes())
            .detectors(true)
            .build();
        let uri: http::Uri = format!("/v1/{held}/x?{held}&{shaped}=1&api_key_name=2")
            .parse()
            .unwrap();
        let mut r = Record::default();
        r.set_target(&uri, &scanner);
        let json = serde_json::to_string(&r).unwrap();
        assert!(!json.contains(&held) && !json.contains(&shaped), "{json}");
        assert_eq!(r.query_params.len(), 3);
        assert_eq!(r.query_params[2], "api_key_name");
        assert_eq!(r.path, "/v1/[REDACTED:openai#1234]/x");
        assert!(!r.path_truncated && r.target_sha256.is_none());

        let mut short = Record::default();
        short.set_target(&"/v1/models".parse().unwrap(), &scanner);
        let json = serde_json::to_string(&short).unwrap();
        assert!(
            !json.contains("path_truncated") && !json.contains("query_params"),
            "{json}"
        );
    }

    #[test]
    fn write_failure_marks_the_log_unhealthy() {
        let log = AuditLog::open(Path::new("/dev/full"), true).unwrap();
        assert!(log.healthy());
        log.begin(rec("x")).finish();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while log.healthy() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!log.healthy());
    }

    /// serve refuses before its first request when the start record failed: the failure must be
    /// visible the moment `lifecycle` returns, not once the writer gets back to it (a request
    /// was once forwarded unaudited under load in that gap).
    #[test]
    fn a_failed_start_record_is_already_refusing_when_lifecycle_returns() {
        let log = AuditLog::open(Path::new("/dev/full"), true).unwrap();
        assert!(log.lifecycle(lifecycle("start")).is_err());
        assert!(!log.healthy());
        assert!(log.check_writable(true).is_err());
        log.close();
    }

    /// Waits (bounded) until the log holds `n` lines.
    fn wait_lines(path: &Path, n: usize) -> usize {
        for _ in 0..500 {
            let have = std::fs::read_to_string(path).map_or(0, |t| t.lines().count());
            if have >= n {
                return have;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        std::fs::read_to_string(path).map_or(0, |t| t.lines().count())
    }

    /// Lets the writer get back to waiting after the `start` record's batch: a record appended
    /// before that is found by the writer itself, with no wake-up to owe.
    fn settle() {
        std::thread::sleep(Duration::from_millis(100));
    }

    /// An open log in a temporary directory that has written its start record.
    fn started_log() -> (tempfile::TempDir, std::path::PathBuf, Arc<AuditLog>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path, true).unwrap();
        log.lifecycle(lifecycle("start")).unwrap();
        (dir, path, log)
    }

    #[test]
    fn a_runtime_thread_owes_the_writer_its_wake_up_until_it_parks() {
        let (_dir, path, log) = started_log();
        // This thread now runs as a tokio worker does: it parks, and says so first.
        settle();
        on_park();
        log.begin(rec("r1")).finish();
        assert!(
            log.shared.owed.load(Ordering::Acquire),
            "the wake-up is left for the park, not paid while the answer is still going out"
        );
        on_park();
        assert!(!log.shared.owed.load(Ordering::Acquire));
        assert_eq!(
            wait_lines(&path, 2),
            2,
            "the record reached the file after the park"
        );
        log.close();
    }

    #[test]
    fn a_thread_that_never_parks_wakes_the_writer_at_once() {
        let (_dir, path, log) = started_log();
        // A blocking-pool thread (or a test thread) has no park hook.
        std::thread::scope(|s| {
            s.spawn(|| log.begin(rec("r1")).finish());
        });
        assert!(!log.shared.owed.load(Ordering::Acquire));
        assert_eq!(wait_lines(&path, 2), 2);
        log.close();
    }

    #[test]
    fn an_owed_wake_up_is_paid_by_a_later_record_once_the_batch_is_a_window_old() {
        let (_dir, path, log) = started_log();
        settle();
        on_park();
        log.begin(rec("r1")).finish();
        assert!(log.shared.owed.load(Ordering::Acquire));
        // This thread stays busy (never parks again); another one keeps appending.
        std::thread::sleep(BATCH_WINDOW * 2);
        std::thread::scope(|s| {
            s.spawn(|| log.begin(rec("r2")).finish());
        });
        assert!(!log.shared.owed.load(Ordering::Acquire));
        assert_eq!(
            wait_lines(&path, 3),
            3,
            "both records reached the file without a park"
        );
        log.close();
    }

    #[test]
    fn a_record_someone_waits_for_pays_an_owed_wake_up() {
        let (_dir, path, log) = started_log();
        settle();
        on_park();
        log.begin(rec("r1")).finish();
        // keygate stopping: the `stop` record waits for its batch, which holds r1.
        log.lifecycle(lifecycle("stop")).unwrap();
        assert!(!log.shared.owed.load(Ordering::Acquire));
        assert_eq!(lines(&path).len(), 3);
        log.close();
    }
}
