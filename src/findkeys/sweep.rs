//! `keygate scan`: where plaintext credentials lie around — files, shell history, the
//! environment. Outside the request path.
//!
//! What counts as a credential is what the request scan refuses: the redaction engine's
//! *strong* detectors (provider prefixes, checksummed tokens, private key blocks) and the
//! values a keygate config holds, plus a provider key variable assigned a plausible key
//! (`MISTRAL_API_KEY=…`, whose keys have no prefix). Generic findings (`password = …` in code,
//! JWTs) are left out, so code mentioning `api_key`, documented example keys and lock-file
//! hashes are not reported.
//!
//! A finding names its place (`file:line:column`, `env:NAME`) and kind, and at most the
//! provider's public prefix (`sk-p…`), never the value. Exit 0 clean, 1 found, 2 on an error.
//! `--fix` moves a key found in a dotenv file into a 0600 secret file that `keygate init`
//! picks up, and leaves a placeholder in its place.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde_json::json;

use super::{assignments, import, is_dotenv, recognize, Places};
use crate::redact::{Class, DetectorSet, Redactor};

/// Directories never entered.
const SKIP_DIRS: &[&str] = &[
    ".git",
    "target",
    "node_modules",
    ".venv",
    "venv",
    "__pycache__",
];
/// Files larger than this are listed as skipped, not read.
const MAX_FILE: u64 = 8 * 1024 * 1024;
/// At most this many files are read per run.
const MAX_FILES: usize = 200_000;
/// How deep a walk goes.
const MAX_DEPTH: usize = 64;
/// Bytes sniffed for a NUL (a binary file).
const SNIFF: usize = 8 * 1024;
/// Detectors whose format starts with a public prefix, which may be shown.
const PREFIXED: &[&str] = &[
    "anthropic_key",
    "openai_key",
    "github_token",
    "aws_access_key_id",
    "slack_token",
    "google_api_key",
    "stripe_live_key",
    "keygate_token",
];

/// `keygate scan` arguments.
#[derive(clap::Args, Debug)]
pub struct ScanArgs {
    /// Files and directories to search (default: the current directory). Directories are
    /// walked, skipping .git, target, node_modules, virtualenvs, symbolic links and binaries.
    pub paths: Vec<PathBuf>,
    /// Print the findings as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Move each key found in a dotenv file (.env, .env.*, *.env, .envrc) into a 0600 file in
    /// keygate's secrets directory and leave a placeholder in its place.
    #[arg(long)]
    pub fix: bool,
    /// Do not search shell history (~/.bash_history, ~/.zsh_history, fish history, $HISTFILE).
    #[arg(long)]
    pub no_history: bool,
    /// Do not search the environment.
    #[arg(long)]
    pub no_env: bool,
    /// Also look for the values this keygate config holds (default: ~/.config/keygate/keygate.toml
    /// when it exists).
    #[arg(long, env = "KEYGATE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// keygate's config directory, where --fix puts secret files (default: ~/.config/keygate).
    #[arg(long, value_name = "DIR")]
    pub config_dir: Option<PathBuf>,
    /// The home directory whose shell history is read (default: $HOME).
    #[arg(long, value_name = "DIR")]
    pub home: Option<PathBuf>,
}

/// Where a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    File,
    History,
}

/// One credential found.
#[derive(Debug)]
struct Hit {
    /// `file`, `history` or `env`.
    source: &'static str,
    /// The file, or `env:NAME`.
    place: String,
    line: usize,
    column: usize,
    kind: String,
    hint: String,
    fixed: Option<String>,
}

struct Sweep {
    redactor: Redactor,
    hits: Vec<Hit>,
    skipped: Vec<(String, String)>,
    errors: Vec<String>,
    files: usize,
    /// Never entered: keygate's own secret files hold keys on purpose.
    keep_out: Vec<PathBuf>,
}

/// Runs `keygate scan`.
pub fn main(args: ScanArgs) -> ExitCode {
    let places = match Places::resolve(args.home.clone(), None, args.config_dir.clone()) {
        Ok(p) => p,
        Err(e) => return fail(&e),
    };
    let mut builder = Redactor::builder().detector_set(DetectorSet::class(Class::Strong));
    let default_config = places.config_file();
    let config = args
        .config
        .clone()
        .or_else(|| default_config.exists().then_some(default_config));
    let errors = Vec::new();
    if let Some(cfg) = &config {
        match crate::redact::cli::with_config_secrets(builder, cfg) {
            Ok(b) => builder = b,
            Err(e) => {
                // Searching without the held values could pass a key keygate holds.
                if args.config.is_some() {
                    return fail(&format!("{}: {e}", cfg.display()));
                }
                eprintln!(
                    "keygate scan: {}: {e} (searching without its held values)",
                    cfg.display()
                );
                builder = Redactor::builder().detector_set(DetectorSet::class(Class::Strong));
            }
        }
    }
    let keep_out = [places.secrets_dir()]
        .iter()
        .filter_map(|p| std::fs::canonicalize(p).ok())
        .collect();
    let mut sweep = Sweep {
        redactor: builder.build(),
        hits: Vec::new(),
        skipped: Vec::new(),
        errors,
        files: 0,
        keep_out,
    };
    let paths = if args.paths.is_empty() {
        vec![PathBuf::from(".")]
    } else {
        args.paths.clone()
    };
    for p in &paths {
        sweep.visit(p, true, 0);
    }
    if !args.no_history {
        for h in history_files(&places.home) {
            if std::fs::symlink_metadata(&h).is_ok_and(|m| m.is_file()) {
                sweep.file(&h, Kind::History);
            }
        }
    }
    if !args.no_env {
        sweep.env();
    }
    if args.fix {
        sweep.fix(&places.secrets_dir());
    }
    report(&sweep, args.json, args.fix)
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("keygate scan: {msg}");
    ExitCode::from(2)
}

/// The shell histories of `home` (and `$HISTFILE`), deduplicated.
fn history_files(home: &Path) -> Vec<PathBuf> {
    let data = std::env::var_os("XDG_DATA_HOME")
        .filter(|v| !v.is_empty())
        .map_or_else(|| home.join(".local/share"), PathBuf::from);
    let mut out = vec![
        home.join(".bash_history"),
        home.join(".zsh_history"),
        home.join(".histfile"),
        data.join("fish/fish_history"),
    ];
    if let Some(h) = std::env::var_os("HISTFILE") {
        out.push(PathBuf::from(h));
    }
    let mut seen = Vec::new();
    out.retain(|p| {
        let c = std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
        if seen.contains(&c) {
            false
        } else {
            seen.push(c);
            true
        }
    });
    out
}

impl Sweep {
    fn visit(&mut self, path: &Path, named: bool, depth: usize) {
        let meta = match std::fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) => return self.errors.push(format!("{}: {e}", path.display())),
        };
        // A symlink named on the command line is followed; one met while walking is not, so
        // a walk cannot loop or leave the tree.
        let meta = if meta.file_type().is_symlink() {
            if !named {
                return;
            }
            match std::fs::metadata(path) {
                Ok(m) => m,
                Err(e) => return self.errors.push(format!("{}: {e}", path.display())),
            }
        } else {
            meta
        };
        if std::fs::canonicalize(path).is_ok_and(|c| self.keep_out.iter().any(|k| c.starts_with(k)))
        {
            return;
        }
        if meta.is_dir() {
            if depth >= MAX_DEPTH {
                self.skipped
                    .push((path.display().to_string(), "nested too deep".into()));
                return;
            }
            let mut entries: Vec<PathBuf> = match std::fs::read_dir(path) {
                Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
                Err(e) => return self.errors.push(format!("{}: {e}", path.display())),
            };
            entries.sort();
            for entry in entries {
                let skip = entry
                    .file_name()
                    .and_then(OsStr::to_str)
                    .is_some_and(|n| SKIP_DIRS.contains(&n));
                if !(skip && entry.is_dir()) {
                    self.visit(&entry, false, depth + 1);
                }
            }
        } else if meta.is_file() {
            if meta.len() > MAX_FILE {
                self.skipped.push((
                    path.display().to_string(),
                    format!("larger than {} MiB", MAX_FILE / (1024 * 1024)),
                ));
                return;
            }
            self.file(path, Kind::File);
        }
    }

    fn file(&mut self, path: &Path, kind: Kind) {
        if self.files >= MAX_FILES {
            if self.files == MAX_FILES {
                self.skipped.push((
                    path.display().to_string(),
                    format!("stopped after {MAX_FILES} files"),
                ));
                self.files += 1;
            }
            return;
        }
        self.files += 1;
        // Read through the cap here too: shell histories come straight to this function, and a
        // file may grow between `visit`'s look and the read.
        let read = || -> std::io::Result<zeroize::Zeroizing<Vec<u8>>> {
            use std::io::Read as _;
            let mut b = zeroize::Zeroizing::new(Vec::new());
            std::fs::File::open(path)?
                .take(MAX_FILE + 1)
                .read_to_end(&mut b)?;
            Ok(b)
        };
        let bytes = match read() {
            Ok(b) if b.len() as u64 > MAX_FILE => {
                return self.skipped.push((
                    path.display().to_string(),
                    format!("larger than {} MiB", MAX_FILE / (1024 * 1024)),
                ));
            }
            Ok(b) => b,
            Err(e) => return self.errors.push(format!("{}: {e}", path.display())),
        };
        if memchr::memchr(0, &bytes[..bytes.len().min(SNIFF)]).is_some() {
            return;
        }
        let source = match kind {
            Kind::File => "file",
            Kind::History => "history",
        };
        let place = path.display().to_string();
        let lines = LineIndex::new(&bytes);
        let mut spans = Vec::new();
        for f in self.redactor.find(&bytes) {
            let (line, column) = lines.locate(f.offset);
            spans.push(f.offset..f.offset + f.len);
            let hint = detector_hint(&f.label, &bytes[f.offset..f.offset + f.len]);
            self.hits.push(Hit {
                source,
                place: place.clone(),
                line,
                column,
                kind: kind_of(&f.label),
                hint,
                fixed: None,
            });
        }
        // Provider variables assigned a key with no distinctive shape.
        let text = String::from_utf8_lossy(&bytes);
        let mut start = 0;
        for (n, line) in text.split('\n').enumerate() {
            for a in assignments(line) {
                let value = &line[a.value.clone()];
                let Some(p) = recognize(&a.name, value) else {
                    continue;
                };
                let at = start + a.value.start;
                let covered = spans
                    .iter()
                    .any(|s| s.start < at + value.len() && at < s.end);
                if !p.vars.contains(&a.name.as_str()) || covered {
                    continue;
                }
                self.hits.push(Hit {
                    source,
                    place: place.clone(),
                    line: n + 1,
                    column: a.value.start + 1,
                    kind: format!("{}_key", p.id),
                    hint: super::hint(value),
                    fixed: None,
                });
            }
            start += line.len() + 1;
        }
    }

    fn env(&mut self) {
        let mut vars: Vec<(String, String)> = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .collect();
        vars.sort();
        for (name, value) in vars {
            // A keygate token in the environment is how an agent is meant to hold access.
            let found: Vec<_> = self
                .redactor
                .find(value.as_bytes())
                .into_iter()
                .filter(|f| f.label != "keygate_token")
                .collect();
            let kind = match found.first() {
                Some(f) => Some((
                    kind_of(&f.label),
                    detector_hint(&f.label, &value.as_bytes()[f.offset..f.offset + f.len]),
                )),
                None => recognize(&name, &value)
                    .filter(|p| p.vars.contains(&name.as_str()))
                    .map(|p| (format!("{}_key", p.id), super::hint(&value))),
            };
            if let Some((kind, hint)) = kind {
                self.hits.push(Hit {
                    source: "env",
                    place: format!("env:{name}"),
                    line: 0,
                    column: 0,
                    kind,
                    hint,
                    fixed: None,
                });
            }
        }
    }

    /// Moves keys found in dotenv files into secret files.
    fn fix(&mut self, secrets: &Path) {
        let mut files: Vec<String> = self
            .hits
            .iter()
            .filter(|h| h.source == "file" && is_dotenv(Path::new(&h.place)))
            .map(|h| h.place.clone())
            .collect();
        files.sort();
        files.dedup();
        for file in files {
            let path = PathBuf::from(&file);
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => zeroize::Zeroizing::new(t),
                Err(e) => {
                    self.errors.push(format!("{file}: {e}"));
                    continue;
                }
            };
            // line -> (value range, secret id) of each key to move.
            let mut moves: std::collections::BTreeMap<
                usize,
                Vec<(std::ops::Range<usize>, String)>,
            > = Default::default();
            for h in self.hits.iter_mut().filter(|h| h.place == file) {
                let Some(line) = text.split('\n').nth(h.line - 1) else {
                    continue;
                };
                let col = h.column - 1;
                let Some(a) = assignments(line)
                    .into_iter()
                    .find(|a| a.value.start <= col && col < a.value.end.max(a.value.start + 1))
                else {
                    continue;
                };
                let value = &line[a.value.clone()];
                let base = recognize(&a.name, value)
                    .map_or_else(|| secret_name(&a.name), |p| p.id.to_string());
                match import_somewhere(secrets, &base, value) {
                    Ok(id) => {
                        h.fixed = Some(id.clone());
                        moves.entry(h.line).or_default().push((a.value, id));
                    }
                    Err(e) => self
                        .errors
                        .push(format!("{file}:{}: not fixed: {e}", h.line)),
                }
            }
            let result = super::rewrite_lines(&path, &|n, line| {
                let m = moves.get(&n)?;
                let mut out = line.to_string();
                let mut m = m.clone();
                m.sort_by_key(|(r, _)| std::cmp::Reverse(r.start));
                for (r, id) in m {
                    if r.end <= out.len() {
                        out.replace_range(r, &format!("keygate-held:{id}"));
                    }
                }
                Some(out)
            });
            if let Err(e) = result {
                self.errors.push(format!("{file}: {e}"));
                for h in self.hits.iter_mut().filter(|h| h.place == file) {
                    h.fixed = None;
                }
            }
        }
    }
}

/// Writes the value under `base`, or `base_2`, `base_3`, … when another key holds that name:
/// a key is never overwritten. Returns the name used.
fn import_somewhere(dir: &Path, base: &str, value: &str) -> Result<String, String> {
    let mut last = String::new();
    for n in 1..=9 {
        let name = if n == 1 {
            base.to_string()
        } else {
            format!("{base}_{n}")
        };
        match import(dir, &name, value) {
            Ok(_) => return Ok(name),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// A secret file name from a variable name: `MY_API_KEY` -> `my_api_key`.
fn secret_name(var: &str) -> String {
    var.to_ascii_lowercase()
}

/// A finding's kind: the detector's name, or `held:<secret>` for a value keygate holds.
fn kind_of(label: &str) -> String {
    match label.split_once('#') {
        Some((secret, _)) => format!("held:{secret}"),
        None => label.to_string(),
    }
}

/// The public prefix of a detector's format (4 characters at most); nothing for a held value or
/// a format without a prefix.
fn detector_hint(label: &str, span: &[u8]) -> String {
    if !PREFIXED.contains(&label) {
        return String::new();
    }
    let pre: String = span.iter().take(4).map(|&b| b as char).collect();
    format!("{pre}…")
}

fn report(s: &Sweep, json: bool, fix: bool) -> ExitCode {
    if json {
        let findings: Vec<_> = s
            .hits
            .iter()
            .map(|h| {
                json!({
                    "source": h.source,
                    "path": (h.source != "env").then_some(&h.place),
                    "variable": h.place.strip_prefix("env:").filter(|_| h.source == "env"),
                    "line": (h.line > 0).then_some(h.line),
                    "column": (h.column > 0).then_some(h.column),
                    "kind": h.kind,
                    "hint": h.hint,
                    "fixed": h.fixed,
                })
            })
            .collect();
        let skipped: Vec<_> = s
            .skipped
            .iter()
            .map(|(p, r)| json!({"path": p, "reason": r}))
            .collect();
        println!(
            "{}",
            json!({
                "found": s.hits.len(),
                "findings": findings,
                "skipped": skipped,
                "errors": s.errors,
                "files_read": s.files.min(MAX_FILES),
            })
        );
    } else {
        for h in &s.hits {
            let at = if h.line > 0 {
                format!("{}:{}:{}", h.place, h.line, h.column)
            } else {
                h.place.clone()
            };
            let hint = if h.hint.is_empty() {
                String::new()
            } else {
                format!(" ({})", h.hint)
            };
            let fixed = match &h.fixed {
                Some(id) => format!(" -> moved to keygate secret file {id:?}"),
                None => String::new(),
            };
            println!("{at}: {}{hint}{fixed}", h.kind);
        }
        for (p, r) in &s.skipped {
            eprintln!("keygate scan: skipped {p}: {r}");
        }
        for e in &s.errors {
            eprintln!("keygate scan: {e}");
        }
        if s.hits.is_empty() {
            eprintln!(
                "keygate scan: no credentials found ({} files)",
                s.files.min(MAX_FILES)
            );
        } else if fix {
            let n = s.hits.iter().filter(|h| h.fixed.is_some()).count();
            eprintln!(
                "keygate scan: {} found, {n} moved; `keygate init --force` adds routes for the moved keys",
                s.hits.len()
            );
        } else {
            eprintln!(
                "keygate scan: {} found; `keygate init` (or `scan --fix` for dotenv files) moves them into keygate",
                s.hits.len()
            );
        }
    }
    if !s.errors.is_empty() {
        ExitCode::from(2)
    } else if s.hits.iter().any(|h| h.fixed.is_none()) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// 1-based line and column (in bytes) of offsets.
struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    fn new(bytes: &[u8]) -> LineIndex {
        let mut starts = vec![0];
        starts.extend(memchr::memchr_iter(b'\n', bytes).map(|i| i + 1));
        LineIndex { starts }
    }

    fn locate(&self, offset: usize) -> (usize, usize) {
        let i = self.starts.partition_point(|&s| s <= offset);
        let line_start = self.starts[i.saturating_sub(1)];
        (i.max(1), offset - line_start + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_index_is_one_based() {
        let l = LineIndex::new(b"ab\ncd\n\nx");
        assert_eq!(l.locate(0), (1, 1));
        assert_eq!(l.locate(4), (2, 2));
        assert_eq!(l.locate(7), (4, 1));
    }

    #[test]
    fn kinds_name_held_secrets_by_id_not_fingerprint() {
        assert_eq!(kind_of("openai#3f2a9c1d"), "held:openai");
        assert_eq!(kind_of("openai_key"), "openai_key");
        assert_eq!(detector_hint("private_key", b"-----BEGIN"), "");
    }
}
