//! Finding provider keys where people leave them, for `keygate init` and `keygate scan`: outside
//! the request path.
//!
//! A key is recognised by the variable it is assigned to (`OPENAI_API_KEY`) or by its shape (an
//! `sk-ant-` prefix), through one provider table ([`PROVIDERS`]) that also says how keygate
//! reaches the provider (upstream, inject style, allow rules). Values are held in `Zeroizing`
//! strings and never printed: a [`Found`] shows itself by variable, origin and at most a short
//! prefix that every key of that provider shares.
//!
//! Also here: reading and rewriting `.env` lines (the rest of the file kept byte for byte) and
//! importing a value into a 0600 secret file, shared by `init` and `scan --fix`.

pub mod sweep;

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

/// How keygate talks to one provider.
#[derive(Debug)]
pub struct Provider {
    /// The secret and route id keygate's config uses.
    pub id: &'static str,
    /// Human name.
    pub name: &'static str,
    /// Variables that conventionally hold its key, most common first.
    pub vars: &'static [&'static str],
    /// Prefixes every key of this provider starts with (empty: no distinctive shape).
    pub prefixes: &'static [&'static str],
    /// The upstream base URL (`None`: read from `endpoint_var`).
    pub upstream: Option<&'static str>,
    /// The variable naming the upstream, for providers with per-customer endpoints (Azure).
    pub endpoint_var: Option<&'static str>,
    /// keygate's `inject` for the key.
    pub inject: &'static str,
    /// Headers the provider requires on every request, as `(name, value)`.
    pub extra_headers: &'static [(&'static str, &'static str)],
    /// The route's allow rules.
    pub allow: &'static [&'static str],
    /// Where the provider's OpenAI-style SDK base URL ends, under the route prefix (`/v1`); `None`
    /// when its SDKs take no base URL variable.
    pub base_var: Option<(&'static str, &'static str)>,
}

/// The providers `init` and `scan` know. Order matters for shape matching: longer, more
/// specific prefixes (`sk-ant-`, `sk-or-`) come before OpenAI's `sk-`.
pub static PROVIDERS: &[Provider] = &[
    Provider {
        id: "anthropic",
        name: "Anthropic",
        vars: &["ANTHROPIC_API_KEY", "CLAUDE_API_KEY"],
        prefixes: &["sk-ant-"],
        upstream: Some("https://api.anthropic.com"),
        endpoint_var: None,
        inject: "header:x-api-key",
        extra_headers: &[("anthropic-version", "2023-06-01")],
        allow: &[
            "POST /v1/messages",
            "POST /v1/messages/count_tokens",
            "GET /v1/models",
            "GET /v1/models/*",
        ],
        base_var: Some(("ANTHROPIC_BASE_URL", "")),
    },
    Provider {
        id: "openrouter",
        name: "OpenRouter",
        vars: &["OPENROUTER_API_KEY"],
        prefixes: &["sk-or-"],
        upstream: Some("https://openrouter.ai"),
        endpoint_var: None,
        inject: "bearer",
        extra_headers: &[],
        allow: &[
            "POST /api/v1/chat/completions",
            "POST /api/v1/completions",
            "GET /api/v1/models",
        ],
        base_var: Some(("OPENROUTER_BASE_URL", "/api/v1")),
    },
    Provider {
        id: "azure",
        name: "Azure OpenAI",
        vars: &["AZURE_OPENAI_API_KEY", "AZURE_API_KEY"],
        prefixes: &[],
        upstream: None,
        endpoint_var: Some("AZURE_OPENAI_ENDPOINT"),
        inject: "header:api-key",
        extra_headers: &[],
        allow: &[
            "POST /openai/deployments/*/chat/completions",
            "POST /openai/deployments/*/completions",
            "POST /openai/deployments/*/embeddings",
            "POST /openai/v1/chat/completions",
            "POST /openai/v1/responses",
            "GET /openai/v1/models",
        ],
        base_var: Some(("AZURE_OPENAI_ENDPOINT", "")),
    },
    Provider {
        id: "openai",
        name: "OpenAI",
        vars: &["OPENAI_API_KEY"],
        prefixes: &["sk-proj-", "sk-svcacct-", "sk-admin-", "sk-"],
        upstream: Some("https://api.openai.com"),
        endpoint_var: None,
        inject: "bearer",
        extra_headers: &[],
        allow: &[
            "POST /v1/chat/completions",
            "POST /v1/responses",
            "POST /v1/embeddings",
            "GET /v1/models",
            "GET /v1/models/*",
        ],
        base_var: Some(("OPENAI_BASE_URL", "/v1")),
    },
    Provider {
        id: "gemini",
        name: "Google Gemini",
        vars: &[
            "GEMINI_API_KEY",
            "GOOGLE_API_KEY",
            "GOOGLE_GENERATIVE_AI_API_KEY",
        ],
        prefixes: &["AIza"],
        upstream: Some("https://generativelanguage.googleapis.com"),
        endpoint_var: None,
        inject: "header:x-goog-api-key",
        extra_headers: &[],
        allow: &[
            "POST /v1beta/models/*",
            "GET /v1beta/models",
            "POST /v1/models/*",
            "GET /v1/models",
        ],
        base_var: Some(("GOOGLE_GEMINI_BASE_URL", "")),
    },
    Provider {
        id: "github",
        name: "GitHub",
        vars: &["GITHUB_TOKEN", "GH_TOKEN", "GITHUB_PAT"],
        prefixes: &["github_pat_", "ghp_", "gho_", "ghu_", "ghs_"],
        upstream: Some("https://api.github.com"),
        endpoint_var: None,
        inject: "bearer",
        extra_headers: &[],
        allow: &["GET /**", "POST /repos/**", "PATCH /repos/**"],
        base_var: None,
    },
    Provider {
        id: "mistral",
        name: "Mistral",
        vars: &["MISTRAL_API_KEY"],
        prefixes: &[],
        upstream: Some("https://api.mistral.ai"),
        endpoint_var: None,
        inject: "bearer",
        extra_headers: &[],
        allow: &[
            "POST /v1/chat/completions",
            "POST /v1/embeddings",
            "POST /v1/fim/completions",
            "GET /v1/models",
        ],
        base_var: None,
    },
    Provider {
        id: "groq",
        name: "Groq",
        vars: &["GROQ_API_KEY"],
        prefixes: &["gsk_"],
        upstream: Some("https://api.groq.com"),
        endpoint_var: None,
        inject: "bearer",
        extra_headers: &[],
        allow: &["POST /openai/v1/chat/completions", "GET /openai/v1/models"],
        base_var: Some(("GROQ_BASE_URL", "")),
    },
    Provider {
        id: "xai",
        name: "xAI",
        vars: &["XAI_API_KEY"],
        prefixes: &["xai-"],
        upstream: Some("https://api.x.ai"),
        endpoint_var: None,
        inject: "bearer",
        extra_headers: &[],
        allow: &[
            "POST /v1/chat/completions",
            "POST /v1/responses",
            "GET /v1/models",
        ],
        base_var: None,
    },
    Provider {
        id: "deepseek",
        name: "DeepSeek",
        vars: &["DEEPSEEK_API_KEY"],
        prefixes: &[],
        upstream: Some("https://api.deepseek.com"),
        endpoint_var: None,
        inject: "bearer",
        extra_headers: &[],
        allow: &[
            "POST /chat/completions",
            "POST /v1/chat/completions",
            "GET /models",
        ],
        base_var: None,
    },
];

/// The provider with this id.
pub fn provider(id: &str) -> Option<&'static Provider> {
    PROVIDERS.iter().find(|p| p.id == id)
}

/// The provider a variable and its value belong to: by the value's shape first (a key says
/// what it is, whatever it was assigned to), else by the variable's name.
pub fn recognize(var: &str, value: &str) -> Option<&'static Provider> {
    if !plausible_key(value) {
        return None;
    }
    let by_shape = PROVIDERS
        .iter()
        .find(|p| p.prefixes.iter().any(|pre| value.starts_with(pre)));
    let by_name = PROVIDERS.iter().find(|p| p.vars.contains(&var));
    match (by_shape, by_name) {
        // `sk-` also prefixes other providers' keys; a more specific variable name wins then.
        (Some(s), Some(n)) if s.id == "openai" && n.prefixes.is_empty() => Some(n),
        (Some(s), _) => Some(s),
        (None, Some(n)) => Some(n),
        (None, None) => None,
    }
}

/// Whether a value could be a real key rather than an empty setting, a reference
/// (`${OTHER}`, `$(cmd)`), a placeholder (`your-key-here`, `sk-...`), a keygate token or a
/// placeholder keygate wrote.
pub fn plausible_key(v: &str) -> bool {
    let len_ok = (16..=512).contains(&v.len());
    let charset = v
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.~+/=:".contains(&b));
    let lower = v.to_ascii_lowercase();
    let placeholder = [
        "your",
        "example",
        "xxxx",
        "placeholder",
        "changeme",
        "...",
        "<",
        "keygate",
    ]
    .iter()
    .any(|w| lower.contains(w));
    let letters = v.bytes().any(|b| b.is_ascii_alphabetic());
    let digits = v.bytes().any(|b| b.is_ascii_digit());
    len_ok && charset && !placeholder && letters && digits && !v.starts_with("kg_")
}

/// The masked prefix shown for a value: the provider's public prefix (at most 4 characters
/// of it) and an ellipsis; empty for a key without a distinctive prefix.
pub fn hint(value: &str) -> String {
    let public = PROVIDERS
        .iter()
        .flat_map(|p| p.prefixes.iter())
        .find(|pre| value.starts_with(*pre));
    match public {
        Some(pre) => format!("{}…", &pre[..pre.len().min(4)]),
        None => String::new(),
    }
}

/// Where a key was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// keygate's own environment.
    Env,
    /// A `NAME=value` line of a dotenv file (1-based line).
    DotEnv {
        /// The file.
        path: PathBuf,
        /// Its line.
        line: usize,
    },
    /// A tool's config file, left as it is (the tool still reads it).
    ToolFile {
        /// The file.
        path: PathBuf,
    },
    /// A secret file keygate already holds (an earlier `init` or `scan --fix`).
    Held {
        /// The file.
        path: PathBuf,
    },
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Env => write!(f, "environment"),
            Origin::DotEnv { path, line } => write!(f, "{}:{line}", path.display()),
            Origin::ToolFile { path } | Origin::Held { path } => write!(f, "{}", path.display()),
        }
    }
}

/// One key found. Its `Debug` leaves the value out.
pub struct Found {
    /// Its provider.
    pub provider: &'static Provider,
    /// The variable (or file key) it was assigned to.
    pub var: String,
    /// The value; never printed.
    pub value: Zeroizing<String>,
    /// Where.
    pub origin: Origin,
}

impl Found {
    /// `VAR (sk-p…)`, or `VAR` for a key without a public prefix.
    pub fn shown(&self) -> String {
        match hint(&self.value) {
            h if h.is_empty() => self.var.clone(),
            h => format!("{} ({h})", self.var),
        }
    }
}

impl std::fmt::Debug for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Found")
            .field("provider", &self.provider.id)
            .field("var", &self.var)
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

/// One `NAME=value` assignment on a line: the name and the byte range of the value (quotes
/// left out).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    /// The variable.
    pub name: String,
    /// The value's bytes within the line.
    pub value: std::ops::Range<usize>,
}

/// Every `NAME=value` on a line (`export A=b`, `A="b" cmd`, `: 1700000000:0;export A=b` from a
/// zsh history): names are shell identifiers preceded by a non-identifier byte.
pub fn assignments(line: &str) -> Vec<Assignment> {
    let b = line.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'=' {
            i += 1;
            continue;
        }
        let mut s = i;
        while s > 0 && ident(b[s - 1]) {
            s -= 1;
        }
        let name = &line[s..i];
        if name.is_empty() || name.as_bytes()[0].is_ascii_digit() {
            i += 1;
            continue;
        }
        let (mut vs, quote) = match b.get(i + 1) {
            Some(q @ (b'"' | b'\'')) => (i + 2, Some(*q)),
            _ => (i + 1, None),
        };
        vs = vs.min(b.len());
        let mut ve = vs;
        while ve < b.len() {
            let c = b[ve];
            let end = match quote {
                Some(q) => c == q,
                None => {
                    c.is_ascii_whitespace() || c == b';' || c == b'#' || c == b'"' || c == b'\''
                }
            };
            if end {
                break;
            }
            ve += 1;
        }
        out.push(Assignment {
            name: name.to_string(),
            value: vs..ve,
        });
        i = ve.max(i + 1);
    }
    out
}

/// Keys assigned in a dotenv file's text, with their 1-based lines.
pub fn dotenv_keys(path: &Path, text: &str) -> Vec<Found> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.starts_with('#') {
            continue;
        }
        // A dotenv line holds one assignment, at its start.
        let Some(a) = assignments(line).into_iter().next() else {
            continue;
        };
        let head = line[..a.value.start].trim_start();
        let head = head.strip_prefix("export").map_or(head, str::trim_start);
        if !head.starts_with(&a.name) {
            continue;
        }
        let value = &line[a.value.clone()];
        if let Some(p) = recognize(&a.name, value) {
            out.push(Found {
                provider: p,
                var: a.name.clone(),
                value: Zeroizing::new(value.to_string()),
                origin: Origin::DotEnv {
                    path: path.to_path_buf(),
                    line: n + 1,
                },
            });
        }
    }
    out
}

/// A plain (non-secret) setting from a dotenv text, such as `AZURE_OPENAI_ENDPOINT`.
pub fn dotenv_setting(text: &str, name: &str) -> Option<String> {
    text.lines().find_map(|line| {
        assignments(line)
            .into_iter()
            .find(|a| a.name == name)
            .map(|a| line[a.value].to_string())
    })
}

/// Where `init` and `scan` look, resolved once (tests point `home` at a sandbox).
#[derive(Clone, Debug)]
pub struct Places {
    /// The user's home.
    pub home: PathBuf,
    /// The project directory whose `.env` is read.
    pub project: PathBuf,
    /// keygate's config directory (`keygate.toml`, `secrets/`).
    pub config_dir: PathBuf,
}

impl Places {
    /// From `HOME`, `XDG_CONFIG_HOME` and the current directory, each overridable.
    pub fn resolve(
        home: Option<PathBuf>,
        project: Option<PathBuf>,
        config_dir: Option<PathBuf>,
    ) -> Result<Places, String> {
        let home = match home.or_else(|| std::env::var_os("HOME").map(PathBuf::from)) {
            Some(h) => h,
            None => return Err("HOME is not set; pass --home".into()),
        };
        let project = match project {
            Some(p) => p,
            None => std::env::current_dir()
                .map_err(|e| format!("cannot read the current directory: {e}"))?,
        };
        let config_dir = config_dir.unwrap_or_else(|| {
            std::env::var_os("XDG_CONFIG_HOME")
                .filter(|v| !v.is_empty())
                .map_or_else(|| home.join(".config"), PathBuf::from)
                .join("keygate")
        });
        Ok(Places {
            home,
            project,
            config_dir,
        })
    }

    /// The config `init` writes.
    pub fn config_file(&self) -> PathBuf {
        self.config_dir.join("keygate.toml")
    }

    /// The directory of the 0600 secret files.
    pub fn secrets_dir(&self) -> PathBuf {
        self.config_dir.join("secrets")
    }

    /// The project's `.env`.
    pub fn dotenv(&self) -> PathBuf {
        self.project.join(".env")
    }
}

/// Files larger than this are not read for keys.
const MAX_DOTFILE: u64 = 1024 * 1024;

fn read_small(path: &Path) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() || meta.len() > MAX_DOTFILE {
        return None;
    }
    std::fs::read_to_string(path).ok()
}

/// Every key `init` can offer, in order of preference: keygate's own secret files, the
/// project's `.env`, the environment, then tools' files. `env` is the environment to read (the
/// process's in production).
pub fn discover(places: &Places, env: &[(String, String)]) -> Vec<Found> {
    let mut out = Vec::new();
    // Keys already held: an earlier run moved them here, so a second run keeps their routes.
    if let Ok(rd) = std::fs::read_dir(places.secrets_dir()) {
        let mut held: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        held.sort();
        for path in held {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let Some(p) = provider(name) else { continue };
            if let Some(text) = read_small(&path) {
                let value = text.trim_end_matches(['\n', '\r']);
                out.push(Found {
                    provider: p,
                    var: p.vars[0].to_string(),
                    value: Zeroizing::new(value.to_string()),
                    origin: Origin::Held { path },
                });
            }
        }
    }
    let dotenv = places.dotenv();
    if let Some(text) = read_small(&dotenv) {
        out.extend(dotenv_keys(&dotenv, &text));
    }
    for (name, value) in env {
        if let Some(p) = recognize(name, value) {
            // Only variables that name a key: a shaped value in `PS1` is not offered.
            if p.vars.contains(&name.as_str()) || name.contains("KEY") || name.contains("TOKEN") {
                out.push(Found {
                    provider: p,
                    var: name.clone(),
                    value: Zeroizing::new(value.clone()),
                    origin: Origin::Env,
                });
            }
        }
    }
    out.extend(tool_files(&places.home));
    out
}

/// Keys in tools' own config files that hold a plain key (not an OAuth session): the GitHub
/// CLI's `hosts.yml` and the Codex CLI's `auth.json` in API-key mode.
fn tool_files(home: &Path) -> Vec<Found> {
    let mut out = Vec::new();
    let gh = home.join(".config/gh/hosts.yml");
    if let Some(text) = read_small(&gh) {
        for line in text.lines() {
            let t = line.trim();
            if let Some(v) = t.strip_prefix("oauth_token:") {
                let v = v.trim().trim_matches(['"', '\'']);
                if let Some(p) = recognize("GH_TOKEN", v) {
                    out.push(Found {
                        provider: p,
                        var: "GH_TOKEN".into(),
                        value: Zeroizing::new(v.to_string()),
                        origin: Origin::ToolFile { path: gh.clone() },
                    });
                }
            }
        }
    }
    let codex = home.join(".codex/auth.json");
    if let Some(text) = read_small(&codex) {
        if let Ok(serde_json::Value::Object(map)) = serde_json::from_str(&text) {
            if let Some(v) = map.get("OPENAI_API_KEY").and_then(|v| v.as_str()) {
                if let Some(p) = recognize("OPENAI_API_KEY", v) {
                    out.push(Found {
                        provider: p,
                        var: "OPENAI_API_KEY".into(),
                        value: Zeroizing::new(v.to_string()),
                        origin: Origin::ToolFile {
                            path: codex.clone(),
                        },
                    });
                }
            }
        }
    }
    out
}

/// Writes `value` to `dir/name`, mode 0600 (the directory 0700), atomically. An existing file
/// with the same value is left alone; one with another value is an error, so no key is ever
/// overwritten. Returns the path.
pub fn import(dir: &Path, name: &str, value: &str) -> Result<PathBuf, String> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(format!("{name:?} cannot name a secret file"));
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let path = dir.join(name);
    if let Ok(existing) = std::fs::read(&path) {
        let same = existing.strip_suffix(b"\n").unwrap_or(&existing) == value.as_bytes();
        let zeroed = Zeroizing::new(existing);
        drop(zeroed);
        return if same {
            Ok(path)
        } else {
            Err(format!(
                "{} already holds another key; keeping both as they are",
                path.display()
            ))
        };
    }
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(value.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("{}: {e}", path.display())
    })?;
    Ok(path)
}

/// Rewrites the lines (1-based) of a file through `edit`, keeping every other byte as it was
/// and the file's permissions; atomic (a temporary file renamed over it).
pub fn rewrite_lines(
    path: &Path,
    edit: &dyn Fn(usize, &str) -> Option<String>,
) -> Result<usize, String> {
    let text = Zeroizing::new(
        std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?,
    );
    let mut out = Zeroizing::new(String::with_capacity(text.len()));
    let mut changed = 0;
    // split_inclusive keeps each line's own ending (`\n`, `\r\n`, none at EOF).
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let body = line.trim_end_matches(['\n', '\r']);
        let ending = &line[body.len()..];
        match edit(i + 1, body) {
            Some(new) => {
                out.push_str(&new);
                out.push_str(ending);
                changed += 1;
            }
            None => out.push_str(line),
        }
    }
    if changed == 0 {
        return Ok(0);
    }
    let mode = std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o600);
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("env");
    let tmp = dir.join(format!(".{name}.keygate{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(out.as_bytes())?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("{}: {e}", path.display())
    })?;
    Ok(changed)
}

/// Whether a file name is a dotenv file (`.env`, `.env.local`, `prod.env`, `.envrc`).
pub fn is_dotenv(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name == ".env" || name.starts_with(".env.") || name.ends_with(".env") || name == ".envrc"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(prefix: &str) -> String {
        // Built at run time: the repository holds no key-shaped literal.
        format!("{prefix}{}", "Ab3".repeat(12))
    }

    #[test]
    fn recognizes_by_shape_before_name_and_by_name_without_shape() {
        assert_eq!(
            recognize("MY_KEY", &key("sk-ant-api03-")).map(|p| p.id),
            Some("anthropic")
        );
        assert_eq!(
            recognize("OPENAI_API_KEY", &key("sk-proj-")).map(|p| p.id),
            Some("openai")
        );
        assert_eq!(
            recognize("OPENROUTER_API_KEY", &key("sk-or-v1-")).map(|p| p.id),
            Some("openrouter")
        );
        assert_eq!(
            recognize("MISTRAL_API_KEY", &key("")).map(|p| p.id),
            Some("mistral")
        );
        // A DeepSeek key is `sk-` shaped: the variable says whose it is.
        assert_eq!(
            recognize("DEEPSEEK_API_KEY", &key("sk-")).map(|p| p.id),
            Some("deepseek")
        );
        assert!(recognize("PATH", "/usr/bin:/bin").is_none());
    }

    #[test]
    fn placeholders_references_and_keygate_tokens_are_not_keys() {
        for v in [
            "",
            "sk-...",
            "your-api-key-here",
            "${OPENAI_API_KEY}",
            "$(op read x)",
            "changeme1234567890",
        ] {
            assert!(recognize("OPENAI_API_KEY", v).is_none(), "{v}");
        }
        assert!(recognize("OPENAI_API_KEY", &key("kg_")).is_none());
        assert!(recognize("OPENAI_API_KEY", &key("sk-proj-")).is_some());
    }

    #[test]
    fn hint_shows_only_a_shared_prefix() {
        assert_eq!(hint(&key("sk-proj-")), "sk-p…");
        assert_eq!(hint(&key("")), "");
    }

    #[test]
    fn assignments_are_found_in_dotenv_and_history_lines() {
        let v = key("sk-proj-");
        let line = format!(": 1700000000:0;export OPENAI_API_KEY=\"{v}\" && run");
        let a = assignments(&line);
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].name, "OPENAI_API_KEY");
        assert_eq!(&line[a[0].value.clone()], v);
        assert!(assignments("x == y").iter().all(|a| a.name != "x"));
    }

    #[test]
    fn dotenv_keys_skip_comments_and_references() {
        let v = key("sk-ant-api03-");
        let text = format!("# ANTHROPIC_API_KEY={v}\nDEBUG=1\nexport ANTHROPIC_API_KEY={v}\nOPENAI_API_KEY=${{X}}\n");
        let found = dotenv_keys(Path::new(".env"), &text);
        assert_eq!(found.len(), 1);
        assert_eq!(
            found[0].origin,
            Origin::DotEnv {
                path: ".env".into(),
                line: 3
            }
        );
        assert!(!format!("{:?}", found[0]).contains(&v));
    }

    #[test]
    fn rewrite_keeps_every_other_byte_and_import_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let env = dir.path().join(".env");
        std::fs::write(&env, "A=1\r\nB=2\nC=3").unwrap();
        let n = rewrite_lines(&env, &|i, _| (i == 2).then(|| "# gone".to_string())).unwrap();
        assert_eq!(n, 1);
        assert_eq!(std::fs::read_to_string(&env).unwrap(), "A=1\r\n# gone\nC=3");

        let secrets = dir.path().join("secrets");
        let p = import(&secrets, "openai", "first-value-123456").unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(import(&secrets, "openai", "first-value-123456").is_ok());
        assert!(import(&secrets, "openai", "other-value-123456").is_err());
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "first-value-123456\n");
    }
}
