//! Where secrets come from. Each source fetches a fresh value; caching and rotation live in
//! `credential`, so a source stays a plain function of its config.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;

use super::github_app::GitHubApp;
use super::oauth2::OAuth2;
use super::Secret;

/// Validated settings for one named secret.
#[derive(Clone, Debug)]
pub struct SecretSpec {
    /// `NAME` in `[secrets.NAME]` (`default` for a lab config); errors and key ids name the
    /// secret by it, never by its value.
    pub name: String,
    /// Where the value is fetched from.
    pub source: SecretSource,
    /// How long a fetched value is used before it is fetched again; `None` keeps it until an
    /// upstream 401 or a reload says it is stale.
    pub ttl: Option<Duration>,
    /// Fetched at its first use instead of at start-up (`fetch = "first-use"`): the request scan
    /// does not know the value until then.
    pub lazy: bool,
}

/// Where a secret's value lives (`source`); the value itself is only ever in a [`Secret`].
#[derive(Clone, Debug)]
pub enum SecretSource {
    /// No credential: requests are forwarded without one (or shown as such in dry-run).
    None,
    /// An environment variable of keygate's own process.
    Env {
        /// The variable's name (`name`).
        var: String,
    },
    /// A file only its owner may read or write (mode 0600 or stricter), read whole.
    File {
        /// The file's path, `~/` expanded.
        path: PathBuf,
    },
    /// A program whose standard output is the value, run without a shell, with a cleared
    /// environment, in its own process group.
    Command {
        /// The program and its arguments, passed to execve as written; labels show only the
        /// first two, as later ones may name where the secret is kept.
        argv: Vec<String>,
        /// How long the command may run before its whole process group is killed (10 s by
        /// default).
        timeout: Duration,
        /// Variables passed from keygate's environment besides the base set (`PATH`, `HOME`,
        /// ...) and the tool's own prefix (`OP_*` for `op`, ...); every other one (agent tokens,
        /// env secrets) is not.
        env: Vec<String>,
    },
    /// A KV v2 field or a dynamic secret from OpenBao (or Vault), with the source's own state
    /// (keygate's token, the leases it holds), shared by every clone of the config.
    OpenBao(std::sync::Arc<super::openbao::Bao>),
    /// A secret in AWS Secrets Manager, read with GetSecretValue signed by keygate's own AWS
    /// credentials; its `VersionId` is the key id.
    AwsSecretsManager {
        /// The secret's name or ARN.
        secret_id: String,
        /// The AWS region it is kept in.
        region: String,
        /// An endpoint URL to call instead of the region's (a VPC endpoint or a local emulator).
        endpoint: Option<String>,
        /// A key of the secret's JSON string whose value is the credential; `None` uses the
        /// whole string.
        field: Option<String>,
        /// The shared-file profile keygate's own AWS credentials come from (`profile`).
        profile: Option<String>,
    },
    /// keygate's own AWS credentials from the standard chain, for `inject = "aws-sigv4"` routes
    /// (`source = "aws-credentials"`).
    AwsCredentials {
        /// The shared-file profile (`profile`); `None` tries the environment first.
        profile: Option<String>,
    },
    /// An access token from an OAuth 2.0 token endpoint (`oauth2`).
    OAuth2(std::sync::Arc<OAuth2>),
    /// A GitHub App installation token (`github-app`), possibly narrowed to a route's scope.
    GitHubApp(std::sync::Arc<GitHubApp>),
}

/// Why a secret could not be fetched. Every variant names the source; none carries the value,
/// and command stderr is withheld because a failing secret command may print the secret there.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The environment variable is unset or empty.
    #[error("secret {secret}: environment variable {var} is not set or empty")]
    EnvMissing {
        /// The secret's name.
        secret: String,
        /// The variable's name.
        var: String,
    },
    /// The file could not be read (missing, not permitted, ...).
    #[error("secret {secret}: cannot read {}: {reason}", path.display())]
    FileUnreadable {
        /// The secret's name.
        secret: String,
        /// The file's path.
        path: PathBuf,
        /// The operating system's error.
        reason: String,
    },
    /// The file grants group or others some access, so someone else may have read or replaced
    /// the secret; it is not read.
    #[error("secret {secret}: {} is readable by group or others (mode {mode:o}); run chmod 600 on it", path.display())]
    FileTooOpen {
        /// The secret's name.
        secret: String,
        /// The file's path.
        path: PathBuf,
        /// The file's permission bits (`0o644`).
        mode: u32,
    },
    /// The command could not be started, or its exit could not be waited for.
    #[error("secret {secret}: command `{command}` could not start: {reason}")]
    CommandSpawn {
        /// The secret's name.
        secret: String,
        /// The program and its first argument, as the source label shows them.
        command: String,
        /// The operating system's error.
        reason: String,
    },
    /// The command exited unsuccessfully.
    #[error("secret {secret}: command `{command}` failed ({status}); its stderr ({stderr_bytes} bytes) is not shown because it may hold the secret: run the command yourself to see it")]
    CommandFailed {
        /// The secret's name.
        secret: String,
        /// The program and its first argument, as the source label shows them.
        command: String,
        /// How it exited, as text (`exit status: 3`).
        status: String,
        /// How many bytes it wrote to stderr (counted up to 64 KiB); the bytes are withheld.
        stderr_bytes: usize,
    },
    /// The command ran past its timeout; its whole process group was killed.
    #[error(
        "secret {secret}: command `{command}` did not finish within {timeout:?} and was killed"
    )]
    CommandTimeout {
        /// The secret's name.
        secret: String,
        /// The program and its first argument, as the source label shows them.
        command: String,
        /// The timeout it ran past.
        timeout: Duration,
    },
    /// The source returned nothing but whitespace.
    #[error("secret {secret}: {origin} returned an empty value")]
    Empty {
        /// The secret's name.
        secret: String,
        /// The source's label (`env:NAME`, `command:op read`).
        origin: String,
    },
    /// The value is shorter than the redactor can look for without false hits, so keygate
    /// could not keep it out of responses.
    #[error("secret {secret}: {origin} returned a value shorter than {min} bytes, too short to be a credential keygate can keep out of responses")]
    TooShort {
        /// The secret's name.
        secret: String,
        /// The source's label (`env:NAME`, `command:op read`).
        origin: String,
        /// The shortest value accepted, in bytes.
        min: usize,
    },
    /// The value is larger than any credential (64 KiB), from whichever source.
    #[error(
        "secret {secret}: {origin} returned more than {limit} bytes, which is not a credential"
    )]
    ValueTooLarge {
        /// The secret's name.
        secret: String,
        /// The source's label (`env:NAME`, `command:op read`).
        origin: String,
        /// The largest value accepted, in bytes.
        limit: usize,
    },
    /// The command printed more than the limit; its output was not read further.
    #[error("secret {secret}: command `{command}` printed more than {limit} bytes")]
    TooLarge {
        /// The secret's name.
        secret: String,
        /// The program and its first argument, as the source label shows them.
        command: String,
        /// The most output read, in bytes.
        limit: usize,
    },
    /// A token endpoint (OAuth2, GitHub) could not be reached or did not answer in time.
    #[error("secret {secret}: cannot get a token: {reason}")]
    TokenUnreachable {
        /// The secret's name.
        secret: String,
        /// What failed (the URL without query, the transport error); never a body.
        reason: String,
    },
    /// A token endpoint refused: its status and its error *code* only, never its body (which
    /// may describe or echo what was sent).
    #[error(
        "secret {secret}: the {endpoint} refused to issue a token ({status}, error code {code})"
    )]
    TokenRefused {
        /// The secret's name.
        secret: String,
        /// Which endpoint (`token endpoint`, `GitHub installation token endpoint`).
        endpoint: &'static str,
        /// The HTTP status.
        status: u16,
        /// The provider's `error` field if it is a plain code, else `(none)`/`(unreadable)`.
        code: String,
    },
    /// A token could not be requested or read (a key that is not one, an answer without a
    /// token).
    #[error("secret {secret}: {what}")]
    TokenAnswer {
        /// The secret's name.
        secret: String,
        /// What was wrong, as fixed text.
        what: &'static str,
    },
    /// AWS answered with an error, or keygate's own AWS credentials could not be found. The
    /// reason carries a status and AWS's error code at most, never an answer's body.
    #[error("secret {secret}: {origin}: {reason}")]
    Aws {
        /// The secret's name.
        secret: String,
        /// The source's label.
        origin: String,
        /// What failed.
        reason: String,
    },
    /// OpenBao could not give the value: login, token renewal or the read failed. The reason
    /// names the endpoint and the answer's status, never the answer's body or a token.
    #[error("secret {secret}: openbao: {reason}")]
    OpenBao {
        /// The secret's name.
        secret: String,
        /// What failed.
        reason: String,
    },
    /// The source is valid config but this build cannot fetch from it.
    #[error("secret {secret}: source {kind} is not supported by this build of keygate")]
    Unsupported {
        /// The secret's name.
        secret: String,
        /// The source kind (`openbao`, `aws-secrets-manager`).
        kind: &'static str,
    },
}

/// A secret larger than this is not a credential: a command's output is not read past it, and a
/// value from any source over it is refused.
const MAX_COMMAND_OUTPUT: usize = 64 * 1024;

impl SecretSource {
    /// A label safe to show anywhere: `env:NAME`, `command:op read`, `file:/path` (the lab's
    /// `secret_source` label, which shows the first two words of a command).
    pub fn label(&self) -> String {
        match self {
            SecretSource::None => "none".into(),
            SecretSource::Env { var } => format!("env:{var}"),
            SecretSource::File { path } => format!("file:{}", path.display()),
            SecretSource::Command { argv, .. } => {
                format!(
                    "command:{}",
                    argv.iter().take(2).cloned().collect::<Vec<_>>().join(" ")
                )
            }
            SecretSource::OpenBao(bao) => bao.label(),
            SecretSource::AwsSecretsManager {
                secret_id, region, ..
            } => {
                format!("aws-secrets-manager:{region}/{secret_id}")
            }
            SecretSource::OAuth2(o) => o.label(),
            SecretSource::GitHubApp(g) => g.label(),
            SecretSource::AwsCredentials { profile } => match profile {
                Some(p) => format!("aws-credentials:profile {p}"),
                None => "aws-credentials".into(),
            },
        }
    }

    /// Whether this is the `none` source: requests go upstream with no credential attached.
    pub fn is_none(&self) -> bool {
        matches!(self, SecretSource::None)
    }

    /// Whether keygate fetches this source at start-up (see `Credentials::prefetch`).
    pub fn prefetchable(&self) -> bool {
        matches!(
            self,
            SecretSource::Env { .. }
                | SecretSource::File { .. }
                | SecretSource::Command { .. }
                | SecretSource::AwsSecretsManager { .. }
                | SecretSource::AwsCredentials { .. }
        ) || matches!(self, SecretSource::OpenBao(bao) if !bao.per_request())
    }
}

impl SecretSpec {
    /// Fetches a fresh value. `Ok(None)` only for the `none` source.
    pub async fn fetch(&self) -> Result<Option<Secret>, FetchError> {
        let secret = self.name.clone();
        let raw = match &self.source {
            SecretSource::None => return Ok(None),
            SecretSource::Env { var } => match std::env::var_os(var) {
                Some(v) if !v.is_empty() => v.into_encoded_bytes(),
                _ => {
                    return Err(FetchError::EnvMissing {
                        secret,
                        var: var.clone(),
                    })
                }
            },
            SecretSource::File { path } => read_private_file(&secret, path).await?,
            SecretSource::Command { argv, timeout, env } => {
                run_command(&secret, argv, *timeout, env).await?
            }
            SecretSource::OAuth2(o) => return checked(self, o.fetch(&self.name).await?),
            SecretSource::GitHubApp(g) => return checked(self, g.fetch(&self.name).await?),
            SecretSource::OpenBao(bao) => return checked(self, bao.fetch(&self.name).await?),
            SecretSource::AwsSecretsManager { .. } | SecretSource::AwsCredentials { .. } => {
                let value =
                    super::aws::fetch(&self.name, &self.source)
                        .await
                        .map_err(|reason| FetchError::Aws {
                            secret,
                            origin: self.source.label(),
                            reason,
                        })?;
                return checked(self, value);
            }
        };
        checked(self, Secret::new(&self.name, raw))
    }
}

/// The bounds every fetched value must meet, whichever its source.
fn checked(spec: &SecretSpec, value: Secret) -> Result<Option<Secret>, FetchError> {
    let secret = spec.name.clone();
    if value.is_empty() {
        return Err(FetchError::Empty {
            secret,
            origin: spec.source.label(),
        });
    }
    // Bounded for every source, not only commands: the redactor builds an automaton from every
    // spelling of every held value, and that must stay small enough never to fail.
    if value.len() > MAX_COMMAND_OUTPUT {
        return Err(FetchError::ValueTooLarge {
            secret,
            origin: spec.source.label(),
            limit: MAX_COMMAND_OUTPUT,
        });
    }
    // The redactor ignores values this short (they would match everywhere); a credential
    // keygate cannot keep out of responses is refused rather than used.
    if value.len() < crate::redact::MIN_KNOWN_LEN {
        return Err(FetchError::TooShort {
            secret,
            origin: spec.source.label(),
            min: crate::redact::MIN_KNOWN_LEN,
        });
    }
    Ok(Some(value))
}

async fn read_private_file(secret: &str, path: &PathBuf) -> Result<Vec<u8>, FetchError> {
    use std::os::unix::fs::PermissionsExt;
    let unreadable = |e: std::io::Error| FetchError::FileUnreadable {
        secret: secret.to_string(),
        path: path.clone(),
        reason: e.to_string(),
    };
    let meta = tokio::fs::metadata(path).await.map_err(unreadable)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(FetchError::FileTooOpen {
            secret: secret.to_string(),
            path: path.clone(),
            mode,
        });
    }
    tokio::fs::read(path).await.map_err(unreadable)
}

/// Variables every secret command gets: enough to find programs and the user's config.
pub(crate) const BASE_ENV: &[&str] = &["PATH", "HOME", "USER", "LOGNAME", "LANG", "TMPDIR"];

/// The variables a well-known secret CLI reads its own session and config from, by program
/// name, so the lab format (which cannot name variables) keeps working with them.
pub(crate) fn tool_env_prefixes(program: &str) -> &'static [&'static str] {
    let name = program.rsplit('/').next().unwrap_or(program);
    match name {
        "op" => &["OP_"],
        "az" => &["AZURE_"],
        "aws" => &["AWS_"],
        "gcloud" => &["CLOUDSDK_", "GOOGLE_"],
        "vault" => &["VAULT_"],
        "bao" => &["BAO_", "VAULT_"],
        "gh" => &["GH_"],
        "security" | "secret-tool" | "pass" => &["PASSWORD_STORE_", "DBUS_"],
        _ => &[],
    }
}

/// keygate's environment as the command sees it: cleared, then [`BASE_ENV`], the tool's prefix
/// variables and the ones config names.
fn command_env(program: &str, named: &[String]) -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
    let prefixes = tool_env_prefixes(program);
    std::env::vars_os()
        .filter(|(k, _)| {
            let Some(k) = k.to_str() else { return false };
            BASE_ENV.contains(&k)
                || named.iter().any(|n| n == k)
                || prefixes.iter().any(|p| k.starts_with(p))
        })
        .collect()
}

/// Kills the command's whole process group unless disarmed: on timeout, and when the fetch is
/// abandoned (the future dropped), so no grandchild outlives it.
struct GroupKiller(Option<nix::unistd::Pid>);

impl GroupKiller {
    fn kill(&mut self) {
        if let Some(pgid) = self.0.take() {
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn run_command(
    secret: &str,
    argv: &[String],
    timeout: Duration,
    named_env: &[String],
) -> Result<Vec<u8>, FetchError> {
    let command = argv.iter().take(2).cloned().collect::<Vec<_>>().join(" ");
    let (program, args) = match argv.split_first() {
        Some(split) => split,
        None => {
            return Err(FetchError::CommandSpawn {
                secret: secret.into(),
                command,
                reason: "argv is empty".into(),
            })
        }
    };
    // No shell: argv goes to execve as written, so nothing in config is ever re-parsed.
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .env_clear()
        .envs(command_env(program, named_env))
        // Its own process group, so a timeout can kill everything it started.
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| FetchError::CommandSpawn {
            secret: secret.into(),
            command: command.clone(),
            reason: e.to_string(),
        })?;

    // The group id is the child's pid: on timeout it is killed before the child is reaped, so
    // the id cannot have been reused.
    let mut group = GroupKiller(
        child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .map(nix::unistd::Pid::from_raw),
    );
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let work = async {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let read_out = async {
            if let Some(s) = stdout.as_mut() {
                // Read one byte past the limit to tell "exactly at the limit" from "over it".
                let _ = s
                    .take(MAX_COMMAND_OUTPUT as u64 + 1)
                    .read_to_end(&mut out)
                    .await;
            }
        };
        let read_err = async {
            if let Some(s) = stderr.as_mut() {
                let _ = s
                    .take(MAX_COMMAND_OUTPUT as u64)
                    .read_to_end(&mut err)
                    .await;
            }
        };
        tokio::join!(read_out, read_err);
        // The command may still be exiting after closing its output: reap it first, so the kill
        // below cannot turn a success into a failure. Then whatever it left running in its group
        // goes too (a group with members keeps its id from being reused).
        let status = child.wait().await;
        group.kill();
        (out, err.len(), status)
    };
    let (out, stderr_bytes, status) = match tokio::time::timeout(timeout, work).await {
        Ok(done) => done,
        Err(_) => {
            group.kill();
            return Err(FetchError::CommandTimeout {
                secret: secret.into(),
                command,
                timeout,
            });
        }
    };
    let out = zeroize::Zeroizing::new(out);
    let status = status.map_err(|e| FetchError::CommandSpawn {
        secret: secret.into(),
        command: command.clone(),
        reason: e.to_string(),
    })?;
    if !status.success() {
        return Err(FetchError::CommandFailed {
            secret: secret.into(),
            command,
            status: status.to_string(),
            stderr_bytes,
        });
    }
    if out.len() > MAX_COMMAND_OUTPUT {
        return Err(FetchError::TooLarge {
            secret: secret.into(),
            command,
            limit: MAX_COMMAND_OUTPUT,
        });
    }
    Ok(out.to_vec())
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests compare held values
mod tests {
    use super::*;

    fn spec(source: SecretSource) -> SecretSpec {
        SecretSpec {
            name: "t".into(),
            source,
            ttl: None,
            lazy: false,
        }
    }

    fn cmd(script: &str) -> SecretSource {
        SecretSource::Command {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            timeout: Duration::from_millis(500),
            env: Vec::new(),
        }
    }

    #[tokio::test]
    async fn command_output_is_the_secret_trimmed() {
        let s = spec(cmd("printf 'sk-abc-123456\\n'"))
            .fetch()
            .await
            .unwrap()
            .unwrap();
        assert_eq!(s.expose(), b"sk-abc-123456");
    }

    #[tokio::test]
    async fn failing_command_names_the_command_but_not_its_stderr() {
        let e = spec(cmd("echo sk-leaked-in-stderr >&2; exit 3"))
            .fetch()
            .await
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("`sh -c`") && msg.contains("exit status: 3"),
            "{msg}"
        );
        assert!(!msg.contains("sk-leaked"), "{msg}");
    }

    #[tokio::test]
    async fn oversized_value_from_any_source_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        std::fs::write(&path, "k".repeat(MAX_COMMAND_OUTPUT + 1)).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = spec(SecretSource::File { path }).fetch().await.unwrap_err();
        assert!(matches!(e, FetchError::ValueTooLarge { .. }), "{e}");
    }

    #[tokio::test]
    async fn value_too_short_to_redact_is_refused() {
        let e = spec(cmd("printf 1234567")).fetch().await.unwrap_err();
        assert!(matches!(e, FetchError::TooShort { .. }), "{e}");
    }

    #[tokio::test]
    async fn hanging_command_times_out() {
        let e = spec(cmd("sleep 5")).fetch().await.unwrap_err();
        assert!(matches!(e, FetchError::CommandTimeout { .. }), "{e}");
    }

    #[tokio::test]
    async fn empty_command_output_is_an_error() {
        let e = spec(cmd("printf '\\n'")).fetch().await.unwrap_err();
        assert!(matches!(e, FetchError::Empty { .. }), "{e}");
    }

    #[tokio::test]
    async fn world_readable_file_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "sk-file-123456").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = spec(SecretSource::File { path: path.clone() })
            .fetch()
            .await
            .unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let s = spec(SecretSource::File { path })
            .fetch()
            .await
            .unwrap()
            .unwrap();
        assert_eq!(s.expose(), b"sk-file-123456");
    }

    #[test]
    fn label_shows_the_first_two_words_of_a_command() {
        let s = SecretSource::Command {
            argv: vec![
                "op".into(),
                "read".into(),
                "op://Private/OpenAI/api key".into(),
            ],
            timeout: Duration::from_secs(1),
            env: Vec::new(),
        };
        assert_eq!(s.label(), "command:op read");
    }
}
