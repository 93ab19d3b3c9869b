//! `keygate redact`: a stdin→stdout (or files) filter, and `--check` for git hooks and CI.
//!
//! Both modes stream through the engine with a 64 KiB read buffer, so memory stays constant
//! whatever the input size (the engine holds back at most `Redactor::hold_back_bound` bytes).
//!
//! `--check` prints `path:line:column: label` for each finding (never the value) and exits 1
//! when there is one, 0 when clean, 2 on a usage or I/O error. Directories are walked
//! recursively, skipping `.git`, `target` and `node_modules`, symbolic links, and files whose
//! first 64 KiB contain a NUL byte (binaries); files named on the command line are always read.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use super::{Redactor, Scanner};

const CHUNK: usize = 64 * 1024;
const SKIP_DIRS: &[&str] = &[
    ".git",
    "target",
    "node_modules",
    ".venv",
    "venv",
    "__pycache__",
];

/// `keygate redact [FILE…]`.
#[derive(clap::Args, Debug)]
pub struct RedactArgs {
    /// Files (or, with --check, directories) to read; stdin when none.
    pub files: Vec<PathBuf>,
    /// Print locations (never values) of what would be redacted and exit 1 if any.
    #[arg(long)]
    pub check: bool,
    /// Also redact the value of this environment variable, labelled by its name. Repeatable.
    #[arg(long = "known-env", value_name = "VAR")]
    pub known_env: Vec<String>,
    /// Also redact the secrets a keygate config names (each is fetched, as `serve` would).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Look for held values only, not for credential formats.
    #[arg(long)]
    pub no_detectors: bool,
}

/// Runs `keygate redact`.
pub fn main(args: RedactArgs) -> ExitCode {
    let redactor = match build(&args.known_env, args.config.as_deref(), !args.no_detectors) {
        Ok(r) => Arc::new(r),
        Err(e) => {
            eprintln!("keygate redact: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check {
        check_main(&redactor, &args.files)
    } else {
        filter_main(&redactor, &args.files)
    }
}

/// The redactor the CLI surfaces (`redact`, `hook`) use: detectors plus the held values named
/// on the command line. `--config` is the seam for loading a keygate config's secrets.
pub(crate) fn build(
    known_env: &[String],
    config: Option<&Path>,
    detectors: bool,
) -> Result<Redactor, String> {
    let mut builder = Redactor::builder().detectors(detectors);
    if let Some(path) = config {
        builder = with_config_secrets(builder, path)?;
    }
    for var in known_env {
        let value = std::env::var_os(var)
            .ok_or_else(|| format!("--known-env {var}: the variable is not set"))?;
        let value = value.as_encoded_bytes();
        if value.len() < super::MIN_KNOWN_LEN {
            eprintln!(
                "keygate: --known-env {var}: shorter than {} bytes, not looked for",
                super::MIN_KNOWN_LEN
            );
        }
        builder = builder.known(var, value);
    }
    Ok(builder.build())
}

/// Fetches every secret the config names, as `keygate serve` would, and adds each under its key
/// id. A secret that cannot be fetched is an error: redacting without it could pass a leak.
pub(crate) fn with_config_secrets(
    mut builder: super::RedactorBuilder,
    path: &Path,
) -> Result<super::RedactorBuilder, String> {
    let config = crate::config::Config::load(path).map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    for spec in &config.secrets {
        match rt.block_on(spec.fetch()) {
            Ok(Some(secret)) => builder = crate::credential::teach(builder, &secret),
            Ok(None) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(builder)
}

fn filter_main(redactor: &Arc<Redactor>, files: &[PathBuf]) -> ExitCode {
    let stdout = io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let result = if files.is_empty() {
        filter(redactor, io::stdin().lock(), &mut out)
    } else {
        files.iter().try_for_each(|path| {
            let file = File::open(path).map_err(|e| with_path(path, e))?;
            filter(redactor, file, &mut out).map_err(|e| with_path(path, e))
        })
    };
    match result.and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        // A closed pipe (`keygate redact | head`) is the reader's choice, not an error.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keygate redact: {e}");
            ExitCode::from(2)
        }
    }
}

fn filter(redactor: &Arc<Redactor>, mut input: impl Read, out: &mut impl Write) -> io::Result<()> {
    let mut stream = Arc::clone(redactor).stream();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        out.write_all(&stream.push(&buf[..n]))?;
    }
    out.write_all(&stream.finish())
}

fn check_main(redactor: &Arc<Redactor>, paths: &[PathBuf]) -> ExitCode {
    let stdout = io::stdout();
    let mut report = Report {
        out: BufWriter::new(stdout.lock()),
        found: false,
        failed: false,
    };
    if paths.is_empty() {
        report.scan(redactor, Path::new("-"), io::stdin().lock(), false);
    }
    for path in paths {
        report.visit(redactor, path, true);
    }
    if let Err(e) = report.out.flush() {
        if e.kind() != io::ErrorKind::BrokenPipe {
            eprintln!("keygate redact: {e}");
            return ExitCode::from(2);
        }
    }
    if report.failed {
        ExitCode::from(2)
    } else if report.found {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

struct Report<W: Write> {
    out: W,
    found: bool,
    failed: bool,
}

impl<W: Write> Report<W> {
    fn error(&mut self, path: &Path, e: impl std::fmt::Display) {
        eprintln!("keygate redact: {}: {e}", path.display());
        self.failed = true;
    }

    fn visit(&mut self, redactor: &Arc<Redactor>, path: &Path, named: bool) {
        let meta = match std::fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) => return self.error(path, e),
        };
        // A symlink named on the command line is followed; one met while walking is not, so
        // a walk cannot loop or leave the tree.
        let meta = if meta.file_type().is_symlink() && named {
            match std::fs::metadata(path) {
                Ok(m) => m,
                Err(e) => return self.error(path, e),
            }
        } else {
            meta
        };
        if meta.is_dir() {
            let mut entries: Vec<PathBuf> = match std::fs::read_dir(path) {
                Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
                Err(e) => return self.error(path, e),
            };
            entries.sort();
            for entry in entries {
                let skip = entry
                    .file_name()
                    .and_then(OsStr::to_str)
                    .is_some_and(|n| SKIP_DIRS.contains(&n));
                if !(skip && entry.is_dir()) {
                    self.visit(redactor, &entry, false);
                }
            }
        } else if meta.is_file() {
            match File::open(path) {
                Ok(f) => self.scan(redactor, path, f, !named),
                Err(e) => self.error(path, e),
            }
        }
    }

    fn scan(
        &mut self,
        redactor: &Arc<Redactor>,
        path: &Path,
        mut input: impl Read,
        skip_binary: bool,
    ) {
        let mut scanner = Scanner::new(Arc::clone(redactor));
        let mut lines = Lines::default();
        let mut buf = vec![0u8; CHUNK];
        let mut first = true;
        let mut write_err = None;
        let mut on_final = |bytes: &[u8], spans: &[super::Span], out: &mut W| {
            for s in spans {
                let (line, col) = lines.locate(bytes, s.start);
                let label = scanner_label(redactor, s.label);
                if let Err(e) = writeln!(out, "{}:{line}:{col}: {label}", path.display()) {
                    write_err.get_or_insert(e);
                }
            }
            lines.advance(bytes, bytes.len());
            lines.rebase(bytes.len());
        };
        loop {
            let n = match input.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return self.error(path, e),
            };
            if first && skip_binary && memchr::memchr(0, &buf[..n]).is_some() {
                return;
            }
            first = false;
            let mut found = Vec::new();
            scanner.push(&buf[..n], false, |bytes, spans| {
                found.push(spans.len());
                on_final(bytes, spans, &mut self.out);
            });
            self.found |= found.iter().any(|&n| n > 0);
        }
        let mut found = 0;
        scanner.push(&[], true, |bytes, spans| {
            found += spans.len();
            on_final(bytes, spans, &mut self.out);
        });
        self.found |= found > 0;
        if let Some(e) = write_err {
            if e.kind() != io::ErrorKind::BrokenPipe {
                self.error(path, e);
            }
        }
    }
}

fn scanner_label(redactor: &Redactor, label: super::engine::Label) -> &str {
    redactor.engine.label(label)
}

/// Line and column (1-based, in bytes) of offsets in a stream seen one finalized run at a
/// time.
#[derive(Default)]
struct Lines {
    /// Newlines before the current run's byte `done`.
    line: usize,
    /// Offset, relative to the current run, where the current line starts (may be negative
    /// when the line began in an earlier run, hence the separate carry).
    line_start: isize,
    /// How far into the current run we have counted.
    done: usize,
}

impl Lines {
    fn advance(&mut self, bytes: &[u8], to: usize) {
        if to <= self.done {
            return;
        }
        for i in memchr::memchr_iter(b'\n', &bytes[self.done..to]) {
            self.line += 1;
            self.line_start = (self.done + i + 1) as isize;
        }
        self.done = to;
    }

    fn locate(&mut self, bytes: &[u8], offset: usize) -> (usize, usize) {
        self.advance(bytes, offset);
        (
            self.line + 1,
            (offset as isize - self.line_start) as usize + 1,
        )
    }

    /// The next run starts after `len` bytes of this one.
    fn rebase(&mut self, len: usize) {
        self.line_start -= len as isize;
        self.done = 0;
    }
}

fn with_path(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_count_across_runs() {
        let mut l = Lines::default();
        let a = b"ab\ncd";
        assert_eq!(l.locate(a, 4), (2, 2));
        l.advance(a, a.len());
        l.rebase(a.len());
        let b = b"ef\nxyz";
        assert_eq!(l.locate(b, 1), (2, 4));
        assert_eq!(l.locate(b, 4), (3, 2));
    }
}
