//! `keygate init`: protect the provider keys a person already has, in one step. Outside the
//! request path.
//!
//! Finds keys ([`crate::findkeys::discover`]), asks which to protect (or takes all with
//! `--yes`), moves each into a 0600 file under the config directory (or names a `command`
//! source), writes a native config with a route per provider, and only then removes the keys
//! from the project's `.env` — and only those that keygate, loading the new config as `serve`
//! would, fetched back unchanged. So a failed write, a wrong `--source-command` or a vault that
//! does not hold the key yet leaves the `.env` as it was: no key is ever lost.
//!
//! No key value is printed, in output or in errors; a key is named by its variable, where it
//! was found and its provider's public prefix.

use std::collections::BTreeMap;
use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::findkeys::{self, Found, Origin, Places, Provider};

/// The marker on the first line of a config `init` wrote.
const MARKER: &str = "# Written by `keygate init`";

/// `keygate init` arguments.
#[derive(clap::Args, Debug)]
pub struct InitArgs {
    /// Protect every key found without asking.
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// The project directory whose `.env` is read and cleaned (default: the current directory).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Where keygate.toml and secrets/ go (default: $XDG_CONFIG_HOME/keygate or ~/.config/keygate).
    #[arg(long, value_name = "DIR")]
    pub config_dir: Option<PathBuf>,
    /// The home directory to search (default: $HOME).
    #[arg(long, value_name = "DIR")]
    pub home: Option<PathBuf>,
    /// The listener the config gets.
    #[arg(long, default_value = "127.0.0.1:8791", value_name = "HOST:PORT")]
    pub listen: String,
    /// Fetch keys with this command instead of keeping them in files; `{name}` becomes the
    /// provider (openai, anthropic, …), e.g. 'op read op://Private/{name}/credential'. Store
    /// each key there first: a `.env` line is removed only once the command returns its key.
    #[arg(long, value_name = "COMMAND")]
    pub source_command: Option<String>,
    /// Rewrite an existing keygate.toml (the old one is kept as keygate.toml.bak).
    #[arg(long)]
    pub force: bool,
    /// Keep a copy of the original `.env` (with the keys in it, mode 0600) as .env.keygate-backup.
    #[arg(long)]
    pub backup: bool,
    /// Do not read keys from the environment.
    #[arg(long)]
    pub no_env: bool,
}

/// Runs `keygate init`.
pub fn main(args: InitArgs) -> ExitCode {
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("keygate init: {e}");
            ExitCode::from(2)
        }
    }
}

/// A provider chosen to protect, with every place its key was found.
struct Chosen {
    key: Found,
    /// Other places holding the same value (a `.env` line among them is removed too).
    same: Vec<Origin>,
    /// Where keygate fetches it: a secret file or the command.
    source: Source,
    /// The upstream (Azure's comes from its endpoint variable).
    upstream: String,
}

enum Source {
    File(PathBuf),
    Command(Vec<String>),
}

fn run(args: &InitArgs) -> Result<ExitCode, String> {
    let places = Places::resolve(args.home.clone(), args.dir.clone(), args.config_dir.clone())?;
    let config_path = places.config_file();
    if config_path.exists() && !args.force {
        return Err(format!(
            "{} exists; pass --force to rewrite it (keys it holds in {} are kept)",
            config_path.display(),
            places.secrets_dir().display()
        ));
    }
    let command = match &args.source_command {
        Some(c) => {
            let argv = shlex::split(c).filter(|a| !a.is_empty()).ok_or_else(|| {
                "--source-command: cannot split it into words (check its quotes)".to_string()
            })?;
            Some(argv)
        }
        None => None,
    };
    let env: Vec<(String, String)> = if args.no_env {
        Vec::new()
    } else {
        std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .collect()
    };
    let found = findkeys::discover(&places, &env);
    let (chosen_keys, skipped) = pick_one_per_provider(found);
    for (f, why) in &skipped {
        eprintln!(
            "keygate init: not taking {} from {}: {why}",
            f.shown(),
            f.origin
        );
    }
    if chosen_keys.is_empty() {
        eprintln!(
            "keygate init: no provider key found in {}, the environment, ~/.config/gh/hosts.yml or ~/.codex/auth.json",
            places.dotenv().display()
        );
        eprintln!(
            "keygate init: nothing written; `keygate scan` looks further (files, shell history)"
        );
        return Ok(ExitCode::SUCCESS);
    }
    let chosen_keys = if args.yes {
        chosen_keys
    } else {
        ask(chosen_keys)?
    };
    if chosen_keys.is_empty() {
        eprintln!("keygate init: nothing chosen, nothing written");
        return Ok(ExitCode::SUCCESS);
    }
    let endpoint_of = |var: &str| -> Option<String> {
        env.iter()
            .find(|(k, _)| k == var)
            .map(|(_, v)| v.clone())
            .or_else(|| {
                std::fs::read_to_string(places.dotenv())
                    .ok()
                    .and_then(|t| findkeys::dotenv_setting(&t, var))
            })
            .filter(|v| v.starts_with("https://") || v.starts_with("http://"))
    };

    let mut chosen = Vec::new();
    for (key, same) in chosen_keys {
        let p = key.provider;
        let upstream = match (p.upstream, p.endpoint_var) {
            (Some(u), _) => u.to_string(),
            (None, Some(var)) => match endpoint_of(var) {
                Some(u) => u.trim_end_matches('/').to_string(),
                None => {
                    eprintln!(
                        "keygate init: {} needs its endpoint: set {var} (in the environment or .env) and run init again; its key stays where it is",
                        p.name
                    );
                    continue;
                }
            },
            (None, None) => continue,
        };
        let source = match (&command, &key.origin) {
            (_, Origin::Held { path }) => Source::File(path.clone()),
            (Some(argv), _) => {
                Source::Command(argv.iter().map(|a| a.replace("{name}", p.id)).collect())
            }
            (None, _) => Source::File(findkeys::import(&places.secrets_dir(), p.id, &key.value)?),
        };
        chosen.push(Chosen {
            key,
            same,
            source,
            upstream,
        });
    }
    if chosen.is_empty() {
        return Ok(ExitCode::from(2));
    }
    // The same keys give the same config, whatever order they were found in.
    chosen.sort_by_key(|c| c.key.provider.id);

    let state_dir = state_dir(&places.home);
    let text = config_text(&chosen, &args.listen, &state_dir);
    write_config(&config_path, &text, args.force)?;
    println!("keygate init: wrote {}", config_path.display());

    let verified = verify(&config_path, &chosen);
    clean_dotenv(&places, &chosen, &verified, args.backup)?;
    for (c, ok) in chosen.iter().zip(&verified) {
        let origin = match &c.source {
            Source::File(p) => format!("file {}", p.display()),
            Source::Command(argv) => format!("command `{}`", argv.join(" ")),
        };
        if *ok {
            println!(
                "  {:<10} {} from {} -> {origin}",
                c.key.provider.id,
                c.key.shown(),
                c.key.origin
            );
        } else {
            println!(
                "  {:<10} {} from {}: keygate could not fetch it back from {origin}; it stays where it was",
                c.key.provider.id, c.key.var, c.key.origin
            );
        }
    }
    print_next(&config_path, &chosen, &args.listen);
    Ok(if verified.iter().all(|v| *v) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// One key per provider, the first found (keygate's own files, then `.env`, environment,
/// tools' files). A different key for a provider already taken is left where it is.
#[allow(clippy::type_complexity)]
fn pick_one_per_provider(found: Vec<Found>) -> (Vec<(Found, Vec<Origin>)>, Vec<(Found, String)>) {
    let mut by: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut chosen: Vec<(Found, Vec<Origin>)> = Vec::new();
    let mut skipped = Vec::new();
    for f in found {
        match by.get(f.provider.id) {
            Some(&i) => {
                if chosen[i].0.value == f.value {
                    chosen[i].1.push(f.origin);
                } else {
                    let why = format!(
                        "another {} key, from {}, is protected; run init again for this one after removing that",
                        f.provider.name, chosen[i].0.origin
                    );
                    skipped.push((f, why));
                }
            }
            None => {
                by.insert(f.provider.id, chosen.len());
                chosen.push((f, Vec::new()));
            }
        }
    }
    (chosen, skipped)
}

/// Asks on the terminal, one key at a time (Enter means yes).
fn ask(keys: Vec<(Found, Vec<Origin>)>) -> Result<Vec<(Found, Vec<Origin>)>, String> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(
            "no terminal to ask which keys to protect; pass --yes to protect every key found"
                .into(),
        );
    }
    let mut out = Vec::new();
    let mut lines = stdin.lock().lines();
    for k in keys {
        eprint!(
            "Protect {} {} from {}? [Y/n] ",
            k.0.provider.name,
            k.0.shown(),
            k.0.origin
        );
        let _ = std::io::stderr().flush();
        let answer = match lines.next() {
            Some(Ok(a)) => a,
            _ => return Err("no answer on the terminal; nothing written".into()),
        };
        let a = answer.trim().to_ascii_lowercase();
        if a.is_empty() || a == "y" || a == "yes" {
            out.push(k);
        }
    }
    Ok(out)
}

fn state_dir(home: &Path) -> PathBuf {
    std::env::var_os("XDG_STATE_HOME")
        .filter(|v| !v.is_empty())
        .map_or_else(|| home.join(".local/state"), PathBuf::from)
        .join("keygate")
}

/// A TOML string literal.
fn q(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn config_text(chosen: &[Chosen], listen: &str, state_dir: &Path) -> String {
    let mut t = String::new();
    t.push_str(MARKER);
    t.push_str("; edit freely. Every key: docs/config.md\n");
    t.push_str(&format!("listen = [{}]\n", q(listen)));
    t.push_str("mode = \"proxy\"\n");
    t.push_str(&format!(
        "state_dir = {}  # tokens, revocations, admin.sock\n",
        q(&state_dir.to_string_lossy())
    ));
    t.push_str(&format!(
        "audit_log = {}\n",
        q(&state_dir.join("audit.jsonl").to_string_lossy())
    ));
    for c in chosen {
        let p = c.key.provider;
        t.push_str(&format!("\n[secrets.{}]\n", p.id));
        match &c.source {
            Source::File(path) => {
                t.push_str("source = \"file\"\n");
                t.push_str(&format!("path = {}\n", q(&path.to_string_lossy())));
            }
            Source::Command(argv) => {
                t.push_str("source = \"command\"\n");
                let words: Vec<String> = argv.iter().map(|a| q(a)).collect();
                t.push_str(&format!("argv = [{}]\n", words.join(", ")));
                t.push_str("ttl = \"15m\"\n");
            }
        }
    }
    for c in chosen {
        route_text(&mut t, c.key.provider, &c.upstream);
    }
    let ids: Vec<String> = chosen.iter().map(|c| q(c.key.provider.id)).collect();
    t.push_str("\n[agents.coder]\n");
    t.push_str(&format!("routes = [{}]\n", ids.join(", ")));
    t.push_str("rate = \"120/min\"\n");
    t
}

fn route_text(t: &mut String, p: &Provider, upstream: &str) {
    t.push_str(&format!("\n[routes.{}]\n", p.id));
    t.push_str(&format!("prefix = {}\n", q(&format!("/{}", p.id))));
    t.push_str(&format!("upstream = {}\n", q(upstream)));
    t.push_str(&format!("secret = {}\n", q(p.id)));
    t.push_str(&format!("inject = {}\n", q(p.inject)));
    let allow: Vec<String> = p.allow.iter().map(|a| q(a)).collect();
    t.push_str(&format!("allow = [{}]\n", allow.join(", ")));
    if !p.extra_headers.is_empty() {
        t.push_str(&format!("\n[routes.{}.extra_headers]\n", p.id));
        for (k, v) in p.extra_headers {
            t.push_str(&format!("{k} = {}\n", q(v)));
        }
    }
    // `keygate run` sets OpenAI's and Anthropic's variables itself; the others are named here.
    if let (Some((base, suffix)), false) = (p.base_var, matches!(p.id, "openai" | "anthropic")) {
        t.push_str(&format!("\n[routes.{}.env]\n", p.id));
        t.push_str(&format!("{} = \"{{token}}\"\n", p.vars[0]));
        t.push_str(&format!("{base} = \"{{base_url}}{suffix}\"\n"));
    }
}

fn write_config(path: &Path, text: &str, force: bool) -> Result<(), String> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if force && path.exists() {
        let bak = path.with_extension("toml.bak");
        std::fs::rename(path, &bak).map_err(|e| format!("{}: {e}", bak.display()))?;
        eprintln!("keygate init: the old config is now {}", bak.display());
    }
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Loads the written config as `serve` would and fetches every secret; a key counts as safely
/// moved when keygate got back exactly that value (compared through the redactor, so no value
/// is exposed here).
fn verify(config: &Path, chosen: &[Chosen]) -> Vec<bool> {
    let none = || vec![false; chosen.len()];
    let cfg = match crate::config::Config::load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("keygate init: the written config does not load: {e}");
            return none();
        }
    };
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return none();
    };
    chosen
        .iter()
        .map(|c| {
            let Some(spec) = cfg.secrets.iter().find(|s| s.name == c.key.provider.id) else {
                return false;
            };
            match rt.block_on(spec.fetch()) {
                Ok(Some(secret)) => {
                    let r = crate::credential::teach(crate::redact::Redactor::builder(), &secret)
                        .build();
                    let v = c.key.value.as_bytes();
                    r.find(v).iter().any(|f| f.offset == 0 && f.len == v.len())
                }
                Ok(None) => false,
                Err(e) => {
                    eprintln!("keygate init: {e}");
                    false
                }
            }
        })
        .collect()
}

/// Replaces each moved key's `.env` line with a comment saying where it went.
fn clean_dotenv(
    places: &Places,
    chosen: &[Chosen],
    verified: &[bool],
    backup: bool,
) -> Result<(), String> {
    let dotenv = places.dotenv();
    let mut lines: BTreeMap<usize, (String, &'static str)> = BTreeMap::new();
    for (c, ok) in chosen.iter().zip(verified) {
        if !ok {
            continue;
        }
        for o in std::iter::once(&c.key.origin).chain(&c.same) {
            if let Origin::DotEnv { path, line } = o {
                if *path == dotenv {
                    lines.insert(*line, (c.key.var.clone(), c.key.provider.id));
                }
            }
        }
    }
    if lines.is_empty() {
        return Ok(());
    }
    if backup {
        let bak = dotenv.with_file_name(".env.keygate-backup");
        let text = zeroize::Zeroizing::new(
            std::fs::read(&dotenv).map_err(|e| format!("{}: {e}", dotenv.display()))?,
        );
        write_private(&bak, &text)?;
        eprintln!(
            "keygate init: the original .env (keys included) is in {}",
            bak.display()
        );
    }
    let values: BTreeMap<usize, String> = chosen
        .iter()
        .filter(|c| lines.values().any(|(_, id)| *id == c.key.provider.id))
        .flat_map(|c| {
            std::iter::once(&c.key.origin)
                .chain(&c.same)
                .filter_map(|o| match o {
                    Origin::DotEnv { line, .. } => Some((*line, c.key.value.to_string())),
                    _ => None,
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let n = findkeys::rewrite_lines(&dotenv, &|i, line| {
        let (var, id) = lines.get(&i)?;
        // Only the line still holding that very key: the file may have changed meanwhile.
        let value = values.get(&i)?;
        line.contains(value.as_str())
            .then(|| format!("# {var}: held by keygate now (secret \"{id}\"; keygate init)"))
    })?;
    println!(
        "keygate init: removed {n} key line(s) from {}",
        dotenv.display()
    );
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(bytes)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The lines an agent needs.
fn print_next(config: &Path, chosen: &[Chosen], listen: &str) {
    let cfg = config.display();
    let base = format!("http://{listen}");
    println!();
    println!("Next:");
    println!("  keygate serve --config {cfg}");
    println!("Start an agent with a token for that run only (SDK variables set, keys dropped):");
    println!("  keygate run --config {cfg} -- YOUR-AGENT");
    println!("Or point an agent you start yourself at keygate:");
    println!("  export KEYGATE_TOKEN=$(keygate token issue --config {cfg} --agent coder --ttl 8h)");
    for c in chosen {
        let p = c.key.provider;
        let route = format!("{base}/{}", p.id);
        match p.base_var {
            Some((var, suffix)) => {
                println!("  export {var}={route}{suffix}");
                println!("  export {}=$KEYGATE_TOKEN", p.vars[0]);
            }
            None => println!("  # {}: base URL {route}, token $KEYGATE_TOKEN", p.name),
        }
    }
    let in_env: Vec<&str> = chosen
        .iter()
        .filter(|c| c.key.origin == Origin::Env || c.same.contains(&Origin::Env))
        .map(|c| c.key.var.as_str())
        .collect();
    if !in_env.is_empty() {
        println!(
            "Your shell still holds {}: remove it where it is set (`keygate scan ~/.bashrc ~/.profile` finds it) and run `unset {}`.",
            in_env.join(", "),
            in_env.join(" ")
        );
    }
    let tools: Vec<String> = chosen
        .iter()
        .flat_map(|c| std::iter::once(&c.key.origin).chain(&c.same))
        .filter_map(|o| match o {
            Origin::ToolFile { path } => Some(path.display().to_string()),
            _ => None,
        })
        .collect();
    if !tools.is_empty() {
        println!(
            "Still in tools' own files (left as they are, the tool reads them): {}",
            tools.join(", ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_with_every_known_provider_passes_validation() {
        let dir = tempfile::tempdir().unwrap();
        let chosen: Vec<Chosen> = findkeys::PROVIDERS
            .iter()
            .map(|p| Chosen {
                key: Found {
                    provider: p,
                    var: p.vars[0].to_string(),
                    value: zeroize::Zeroizing::new(String::new()),
                    origin: Origin::Env,
                },
                same: Vec::new(),
                source: Source::File(dir.path().join(p.id)),
                upstream: p
                    .upstream
                    .unwrap_or("https://example.openai.azure.com")
                    .to_string(),
            })
            .collect();
        let path = dir.path().join("keygate.toml");
        std::fs::write(&path, config_text(&chosen, "127.0.0.1:8791", dir.path())).unwrap();
        let config = crate::config::Config::load(&path).unwrap();
        assert_eq!(config.routes.len(), findkeys::PROVIDERS.len());
    }
}
