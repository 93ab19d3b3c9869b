//! `keygate audit verify`: checks a log line by line, in bounded memory.
//!
//! - Every line's `hash` must hold and its `prev_hash` must be the hash of the line before.
//! - The chain is anchored at a `start` record (keygate writes one whenever it opens the log, so
//!   a rotated file verifies on its own), or at a hash the user trusts (`--from-hash`, e.g. a
//!   checkpoint's hash noted earlier): lines before the anchor were cut from their start and are
//!   only checked for consistency, and a log with no anchor at all fails at line 1.
//! - More than [`CHECKPOINT_EVERY`] records without a checkpoint means one was removed.
//! - With a public key, every `start`, `checkpoint` and `stop` record must carry a signature
//!   that holds: a line edited and all hashes recomputed without the key fails at the next
//!   signed record.
//! - A tail not closed by `stop` or a checkpoint (keygate still running, killed, or the file
//!   cut) is reported, and is a failure only with `strict`.

use std::fs::File;
use std::io::{self, BufRead, Read};
use std::path::Path;

use ed25519_dalek::VerifyingKey;

use super::{key, split_line, CHECKPOINT_EVERY};

/// Lines longer than this are not audit records (a record is a few hundred bytes; a path is cut
/// at 2,048 characters).
const MAX_LINE: u64 = 1 << 20;

/// How [`verify`] checks a log: where the chain starts and which key signs it.
#[derive(Default)]
pub struct VerifyOptions {
    /// Anchor the chain at this hash: the line carrying it, or the line continuing from it.
    pub from_hash: Option<String>,
    /// Require valid signatures on `start`, `checkpoint` and `stop` records.
    pub key: Option<VerifyingKey>,
    /// The end anchor: the log must reach the line carrying this hash (the head file's record,
    /// or a hash noted earlier); a log cut before it is broken.
    pub to_hash: Option<String>,
    /// The line the head file says carries `to_hash`, for the message when it is missing.
    pub to_line: Option<u64>,
}

/// What a log that verified looks like.
#[derive(Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    /// Lines verified from the anchor on.
    pub records: usize,
    /// The anchor's line number (0 for an empty log).
    pub anchor_line: usize,
    /// Lines before the anchor: checked for consistency only.
    pub before_anchor: usize,
    /// Signed records whose signature held (with a key).
    pub signed: usize,
    /// The last `checkpoint`, `start` or `stop` record (signed, with a key): line and hash.
    pub last_checkpoint: Option<(usize, String)>,
    /// The log ends with a `stop` record.
    pub closed: bool,
    /// What is not covered at the end, in words; `None` when the end is covered.
    pub tail: Option<String>,
    /// Lines cut mid-write by a crash, each followed by the `start` record of the next run,
    /// which continues the chain from the line before it.
    pub torn: Vec<usize>,
    /// The line carrying the end anchor's hash (with `to_hash`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reached: Option<usize>,
}

impl Report {
    /// Whether the log is whole at both ends (what `--strict` asks).
    pub fn complete(&self) -> bool {
        self.before_anchor == 0 && self.tail.is_none() && self.torn.is_empty()
    }
}

/// The first line that does not verify, and why.
#[derive(Debug, PartialEq, Eq)]
pub struct Broken {
    /// The line number, counting from 1.
    pub line: usize,
    /// What is wrong with it, for a person to read.
    pub reason: String,
}

fn broken(line: usize, reason: impl Into<String>) -> Result<Report, Broken> {
    Err(Broken {
        line,
        reason: reason.into(),
    })
}

/// Whether a line that does not hold could be a record cut mid-write: a strict prefix of a
/// record never parses as JSON, and ends with `}` only by the rarest chance (right after a
/// nested object), which is refused rather than excused.
fn could_be_cut(line: &str) -> bool {
    !line.trim_end().ends_with('}') && serde_json::from_str::<serde::de::IgnoredAny>(line).is_err()
}

/// Checks a log's hash chain and checkpoint signatures. The outer error is a failure to read
/// the file; the inner one the first line that does not verify.
pub fn verify(path: &Path, opts: &VerifyOptions) -> io::Result<Result<Report, Broken>> {
    let mut reader = io::BufReader::new(File::open(path)?);
    let mut report = Report::default();
    let mut raw = Vec::new();
    let mut prev: Option<String> = None;
    let mut anchored = false;
    // Lines since the last start/checkpoint/stop, and whether one has been seen at all (before
    // it, a cut head's stretch has an unknown length).
    let mut since_covering = 0usize;
    let mut seen_covering = false;
    // The last line covered by a checkpoint (a signed one, with a key).
    let mut covered_to = 0usize;
    let mut last_event: Option<String> = None;
    let mut lineno = 0usize;
    let mut cut_line = None;
    // A line that did not hold, waiting to see whether a restart follows it.
    let mut torn: Option<usize> = None;
    loop {
        raw.clear();
        let n = (&mut reader)
            .take(MAX_LINE + 1)
            .read_until(b'\n', &mut raw)?;
        if n == 0 {
            break;
        }
        lineno += 1;
        let complete = raw.last() == Some(&b'\n');
        if !complete && n as u64 > MAX_LINE {
            return Ok(broken(lineno, "line longer than any audit record"));
        }
        let text = std::str::from_utf8(&raw).unwrap_or("");
        let line = text.trim_end_matches('\n');
        let Some((hash, sig)) = split_line(line) else {
            // Only what could be the start of a record counts as cut: a line that parses (or
            // ends like a record) is a record, and a record whose hash is wrong is forged or
            // edited, wherever it stands.
            if !could_be_cut(line) {
                return Ok(broken(lineno, "hash does not match the line's content"));
            }
            if !complete {
                // The last write was cut (a crash, or the file cut mid-line).
                cut_line = Some(lineno);
                break;
            }
            if torn.is_some() || prev.is_none() {
                return Ok(broken(
                    torn.unwrap_or(lineno),
                    "hash does not match the line's content",
                ));
            }
            torn = Some(lineno);
            continue;
        };
        let v: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => return Ok(broken(lineno, format!("not JSON: {e}"))),
        };
        let claimed = v.get("prev_hash").and_then(|p| p.as_str()).unwrap_or("");
        let event = v.get("event").and_then(|e| e.as_str());
        if let Some(t) = torn.take() {
            // keygate reopening a log whose last write was cut begins a new line and chains its
            // start record to the last intact one; anything else is a broken line.
            if event != Some("start") || prev.as_deref() != Some(claimed) {
                return Ok(broken(t, "hash does not match the line's content"));
            }
            report.torn.push(t);
        }
        if !anchored {
            anchored = match &opts.from_hash {
                Some(h) => h == hash || h == claimed,
                None => event == Some("start"),
            };
            if anchored {
                report.anchor_line = lineno;
            } else {
                report.before_anchor += 1;
            }
        }
        if let Some(p) = &prev {
            // The anchor line carrying the trusted hash vouches for itself; every other line
            // must link to the one before.
            let anchor_by_own_hash = report.anchor_line == lineno
                && opts.from_hash.as_deref() == Some(hash)
                && claimed != p;
            if claimed != p && !anchor_by_own_hash {
                return Ok(broken(
                    lineno,
                    "prev_hash does not match the hash of the line before",
                ));
            }
        }
        if anchored {
            report.records += 1;
        }
        let covering = matches!(event, Some("start" | "checkpoint" | "stop"));
        if covering {
            if let Some(pk) = &opts.key {
                let Some(sig) = sig else {
                    return Ok(broken(
                        lineno,
                        format!(
                            "the {} record is not signed (written without a key, or its signature removed)",
                            event.unwrap_or("")
                        ),
                    ));
                };
                if !key::holds(pk, hash, sig) {
                    return Ok(broken(
                        lineno,
                        format!(
                            "the signature of this {} record does not hold: a line in {}..{lineno} was changed and the hashes recomputed without the key, or another key signed it",
                            event.unwrap_or(""),
                            covered_to + 1
                        ),
                    ));
                }
                report.signed += 1;
            }
            since_covering = 0;
            seen_covering = true;
            covered_to = lineno;
            report.last_checkpoint = Some((lineno, hash.to_string()));
        } else {
            since_covering += 1;
            if seen_covering && since_covering > CHECKPOINT_EVERY {
                return Ok(broken(
                    lineno,
                    format!(
                        "{CHECKPOINT_EVERY} records without a checkpoint since line {covered_to}: a checkpoint record was removed"
                    ),
                ));
            }
        }
        if opts.to_hash.as_deref() == Some(hash) {
            report.reached = Some(lineno);
        }
        last_event = event.map(str::to_string);
        prev = Some(hash.to_string());
    }
    if let Some(t) = torn {
        return Ok(broken(t, "hash does not match the line's content"));
    }
    if !anchored && lineno > 0 && cut_line != Some(1) {
        return Ok(match &opts.from_hash {
            Some(h) => broken(1, format!("no line carries or continues from --from-hash {h}")),
            None => broken(
                1,
                "the log does not begin at a start record (its first lines were cut?); verify from a checkpoint you trust with --from-hash HASH",
            ),
        });
    }
    if let (Some(h), None) = (&opts.to_hash, report.reached) {
        let last = lineno - usize::from(cut_line.is_some());
        let missing = match opts.to_line {
            Some(n) if n > last as u64 => format!("lines {}..{n} are missing", last + 1),
            _ => "the lines after it are missing".to_string(),
        };
        return Ok(broken(
            last + 1,
            format!(
                "the log ends at line {last} without reaching the record {h} the head names: {missing} (the log was cut, or it is not the log the head describes)"
            ),
        ));
    }
    report.closed = last_event.as_deref() == Some("stop") && cut_line.is_none();
    let last_full = lineno - usize::from(cut_line.is_some());
    let mut tail = Vec::new();
    if last_full > covered_to {
        tail.push(format!(
            "lines {}..{last_full} follow the last checkpoint{} and no stop record closes them (keygate still running or killed, or the tail was cut)",
            covered_to + 1,
            if covered_to > 0 { format!(" (line {covered_to})") } else { String::new() },
        ));
    }
    if let Some(l) = cut_line {
        tail.push(format!(
            "line {l} is incomplete (the tail was cut mid-line)"
        ));
    }
    if !tail.is_empty() {
        report.tail = Some(tail.join("; "));
    }
    Ok(Ok(report))
}
