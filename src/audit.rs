//! Stage `audit`: one JSON line per request, allowed or refused, hash-chained.
//!
//! Input: a [`Record`] filled in along the pipeline. Output: a line in the audit log.
//!
//! Group commit: the task that finishes a request serializes its record and chains it to the line
//! before (`prev_hash`, `hash`) into a shared batch; one writer thread, woken once per batch (not
//! per record), writes the batch with one `write(2)`. A request never waits on the disk. A failed write is kept and retried; while the log cannot be written,
//! [`AuditLog::healthy`] is false and the pipeline refuses new requests with 503
//! (`audit_unavailable`), so keygate never serves unaudited traffic for longer than it takes to
//! notice one failed write.
//!
//! Architecture invariant: exactly one record per request. [`Pending`] owns a request's record
//! from the start; finishing it sends it, and dropping it unfinished (client gone, task
//! cancelled) sends it with `reason: "aborted"`.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::{Code, Rejection};

mod request;
pub use request::{ms, Finishing};

/// What happened to a request. Field names are the interface scripts read.
#[derive(Debug, Default, Serialize, Clone)]
pub struct Record {
    pub time: String,
    pub request_id: String,
    pub agent: Option<String>,
    pub person: Option<String>,
    pub route: Option<String>,
    pub destination: Option<String>,
    pub method: String,
    pub path: String,
    pub classification: Option<String>,
    pub policy_version: String,
    pub decision: Decision,
    pub reason: Reason,
    pub status: u16,
    pub key_id: Option<String>,
    pub latency_ms: f64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
    pub listener: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<PeerRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blame: Option<crate::error::Blame>,
    /// The id of the token the agent presented (`tok_…`), never the token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_id: Option<String>,
    /// The approval this request waited for, and who decided it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approved_by: Option<String>,
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
    pub time: String,
    pub event: &'static str,
    pub pid: u32,
    pub version: &'static str,
    pub config: String,
    pub policy_version: String,
}

#[derive(Debug, Serialize, Clone)]
pub struct PeerRecord {
    pub uid: u32,
    pub pid: Option<i32>,
}

/// Sees every request record as it is sent (metrics).
pub type Observer = Box<dyn Fn(&Record) + Send + Sync>;

pub struct AuditLog {
    observer: std::sync::OnceLock<Observer>,
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
    path: PathBuf,
}

/// What request tasks and the writer thread share. A record is serialized and chained by the
/// task that finishes it, under `pending`'s lock, and the writer takes whole batches: the chain
/// order is the order records were appended, and the writer is woken once per batch, not per
/// record (a wake-up per record cost more than the rest of a request).
struct Shared {
    pending: Mutex<Batch>,
    wake: Condvar,
    healthy: AtomicBool,
    chain: bool,
}

#[derive(Default)]
struct Batch {
    lines: Vec<u8>,
    prev: Option<String>,
    /// Lifecycle writers waiting to hear whether their batch reached the file.
    acks: Vec<mpsc::Sender<Result<(), String>>>,
    closed: bool,
}

/// How long the writer lets records gather after the first one of a batch arrives.
const BATCH_WINDOW: Duration = Duration::from_millis(1);
/// How long the writer waits before retrying a failed write.
const RETRY_AFTER: Duration = Duration::from_millis(250);

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
        use std::os::unix::fs::OpenOptionsExt;
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
        let prev = if chain {
            last_hash(path).unwrap_or(None)
        } else {
            None
        };
        let shared = Arc::new(Shared {
            pending: Mutex::new(Batch {
                prev,
                ..Batch::default()
            }),
            wake: Condvar::new(),
            healthy: AtomicBool::new(true),
            chain,
        });
        let s = shared.clone();
        let writer = std::thread::Builder::new()
            .name("keygate-audit".into())
            .spawn(move || write_loop(file, &s))
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

    pub fn healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::Relaxed)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

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
        let body = serialize(&record, &record.request_id);
        if let Err(()) = self.append(body, None) {
            // After close (shutdown): say so where an operator sees it, with the id only.
            tracing::error!(request_id = %record.request_id, "audit log closed; record not written");
        }
    }

    /// Chains `body` (a JSON object without `prev_hash`/`hash`) to the line before and queues it.
    fn append(
        &self,
        body: String,
        ack: Option<mpsc::Sender<Result<(), String>>>,
    ) -> Result<(), ()> {
        let mut batch = lock(&self.shared.pending);
        if batch.closed {
            return Err(());
        }
        let was_empty = batch.lines.is_empty() && batch.acks.is_empty();
        if self.shared.chain {
            let prev = batch.prev.take().unwrap_or_else(|| GENESIS.to_string());
            let line = chain_line(body, &prev);
            batch.prev = Some(line.1);
            batch.lines.extend_from_slice(line.0.as_bytes());
        } else {
            batch.lines.extend_from_slice(body.as_bytes());
        }
        batch.lines.push(b'\n');
        if let Some(ack) = ack {
            batch.acks.push(ack);
        }
        drop(batch);
        if was_empty {
            self.shared.wake.notify_one();
        }
        Ok(())
    }

    /// Writes a lifecycle record and waits until it is on file (or failed). keygate writes one
    /// at start-up, so an unwritable log is known, and requests refused, before any is served.
    pub fn lifecycle(&self, record: Lifecycle) -> Result<(), String> {
        let (ack, done) = mpsc::channel();
        let body = serialize(&record, record.event);
        self.append(body, Some(ack))
            .map_err(|()| "audit log closed".to_string())?;
        done.recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| Err("audit writer did not answer".into()))
    }

    /// Writes a control-plane record (reload, freeze, a person's decision) and waits until it
    /// is on file. Like lifecycle records it has no `request_id`.
    pub fn event<T: Serialize>(&self, record: &T) -> Result<(), String> {
        let (ack, done) = mpsc::channel();
        let body = serialize(record, "event");
        self.append(body, Some(ack))
            .map_err(|()| "audit log closed".to_string())?;
        done.recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| Err("audit writer did not answer".into()))
    }

    /// Stops accepting records, writes everything queued, and waits for the writer.
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// A request's record, written exactly once: by [`Pending::finish`], or on drop.
pub struct Pending {
    record: Option<Record>,
    log: Arc<AuditLog>,
}

impl Pending {
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
fn write_loop(mut file: File, shared: &Shared) {
    // Bytes taken from the batch but not yet on file; retried until they are.
    let mut unwritten: Vec<u8> = Vec::new();
    loop {
        let (acks, closed) = {
            let mut batch = lock(&shared.pending);
            if unwritten.is_empty() {
                while batch.lines.is_empty() && batch.acks.is_empty() && !batch.closed {
                    batch = match shared.wake.wait(batch) {
                        Ok(b) => b,
                        Err(p) => p.into_inner(),
                    };
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
            unwritten.append(&mut batch.lines);
            (std::mem::take(&mut batch.acks), batch.closed)
        };
        let result = write_out(&mut file, &mut unwritten);
        for ack in acks {
            let _ = ack.send(result.as_ref().map(|_| ()).map_err(|e| e.to_string()));
        }
        match result {
            Ok(()) => shared.healthy.store(true, Ordering::Relaxed),
            Err(e) => {
                if shared.healthy.swap(false, Ordering::Relaxed) {
                    tracing::error!(error = %e, "audit log write failed; refusing requests until it succeeds");
                }
                if closed {
                    let lines = unwritten.iter().filter(|&&b| b == b'\n').count();
                    tracing::error!(lines, "audit records could not be written before exit");
                    return;
                }
            }
        }
        if closed && lock(&shared.pending).lines.is_empty() {
            return;
        }
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

/// A record as JSON without `prev_hash` and `hash`, which [`chain_line`] adds in chain order.
fn serialize<T: Serialize>(r: &T, id: &str) -> String {
    // Serializing plain strings and numbers cannot fail; keep a line (and the chain) if it does.
    serde_json::to_string(r)
        .unwrap_or_else(|e| serde_json::json!({"id": id, "error": e.to_string()}).to_string())
}

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
    const TAIL: usize = ",\"hash\":\"".len() + 64 + "\"}".len();
    if line.len() < TAIL || !line.ends_with("\"}") {
        return None;
    }
    let (body, tail) = line.split_at(line.len() - TAIL);
    let hash = tail.strip_prefix(",\"hash\":\"")?.strip_suffix("\"}")?;
    let mut unhashed = String::with_capacity(body.len() + 1);
    unhashed.push_str(body);
    unhashed.push('}');
    let want = hex::encode(Sha256::digest(unhashed.as_bytes()));
    (want == hash).then(|| hash.to_string())
}

fn last_hash(path: &Path) -> io::Result<Option<String>> {
    let mut f = File::open(path)?;
    // A device (/dev/full, a FIFO) has no last line, and reading one may never end.
    if !f.metadata()?.is_file() {
        return Ok(None);
    }
    let len = f.seek(SeekFrom::End(0))?;
    let start = len.saturating_sub(64 * 1024);
    f.seek(SeekFrom::Start(start))?;
    let mut tail = String::new();
    f.take(64 * 1024).read_to_string(&mut tail)?;
    Ok(tail
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .and_then(line_hash))
}

/// `keygate audit verify`: Ok(count) when every line's hash holds and links to the line before;
/// Err(line number) of the first that does not.
pub fn verify(path: &Path) -> io::Result<Result<usize, (usize, String)>> {
    let f = io::BufReader::new(File::open(path)?);
    let mut prev: Option<String> = None;
    let mut n = 0;
    for (i, line) in f.lines().enumerate() {
        let line = line?;
        let lineno = i + 1;
        let Some(hash) = line_hash(&line) else {
            return Ok(Err((
                lineno,
                "hash does not match the line's content".into(),
            )));
        };
        let v: serde_json::Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => return Ok(Err((lineno, format!("not JSON: {e}")))),
        };
        let claimed = v.get("prev_hash").and_then(|p| p.as_str()).unwrap_or("");
        let expected = prev.as_deref().unwrap_or(claimed);
        if claimed != expected {
            return Ok(Err((
                lineno,
                "prev_hash does not match the hash of the line before".into(),
            )));
        }
        prev = Some(hash);
        n += 1;
    }
    Ok(Ok(n))
}

/// RFC 3339 UTC with milliseconds.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests wait on plain threads
mod tests {
    use super::*;

    fn rec(id: &str) -> Record {
        Record {
            request_id: id.into(),
            decision: Decision::Allow,
            status: 200,
            time: now_rfc3339(),
            ..Default::default()
        }
    }

    #[test]
    fn every_pending_record_is_written_once_and_chained() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let log = AuditLog::open(&path, true).unwrap();
        log.begin(rec("one")).finish();
        drop(log.begin(rec("two"))); // dropped unfinished
        log.close();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[1].contains("\"aborted\""), "{}", lines[1]);
        assert_eq!(verify(&path).unwrap(), Ok(2));
    }

    #[test]
    fn chain_continues_across_restarts_and_tampering_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        for id in ["a", "b"] {
            let log = AuditLog::open(&path, true).unwrap();
            log.begin(rec(id)).finish();
            log.close();
        }
        assert_eq!(verify(&path).unwrap(), Ok(2));
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("\"b\"", "\"c\"");
        std::fs::write(&path, text).unwrap();
        assert_eq!(verify(&path).unwrap().unwrap_err().0, 2);
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
}
