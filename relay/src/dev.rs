//! `relay serve --dev`: try the relay locally in one command.
//!
//! Its secret and admin token are kept in a state file (`--dev-state-file`, by default
//! `$XDG_STATE_HOME/relay/dev.json` or `~/.local/state/relay/dev.json`), so the tokens it
//! prints keep working across restarts; `RELAY_JWT_SECRET`, when set, is used instead.
//! At startup it prints, ready to paste, the agent command, the client's `curl` and the
//! browser URL.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::Secret;

/// The hostId the printed commands use.
pub const DEMO_HOST: &str = "demo";

/// The subjects of the tokens `--dev` mints: a token whose signature does not check
/// under a dev relay's secret but whose subject is one of these was minted by an earlier
/// dev run whose secret is gone ([`crate::auth::AuthError`] says so).
pub const DEV_SUBJECTS: [&str; 2] = ["dev-host", "dev-client"];

/// Where `--dev`'s secret came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretFrom {
    /// `RELAY_JWT_SECRET`.
    Environment,
    /// The state file, at this path (created on the first run).
    StateFile(PathBuf),
}

/// What `--dev` runs with.
#[derive(Debug, Clone)]
pub struct DevMode {
    /// Signs and verifies tokens.
    pub secret: Secret,
    /// The admin endpoint's token (`RELAY_ADMIN_TOKEN` when set).
    pub admin_token: Secret,
    /// Where the secret came from.
    pub from: SecretFrom,
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    secret: String,
    admin_token: String,
}

/// The default state file: under `$XDG_STATE_HOME`, else `~/.local/state`, else the
/// working directory.
pub fn default_state_file() -> PathBuf {
    let base = std::env::var_os("XDG_STATE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|home| PathBuf::from(home).join(".local").join("state"))
        });
    match base {
        Some(base) => base.join("relay").join("dev.json"),
        None => PathBuf::from(".relay-dev.json"),
    }
}

/// The dev secret and admin token: `secret` / `admin_token` when given (from the
/// environment), else those kept in `state_file`, made (and the file written, mode
/// 0600) on the first run.
///
/// # Errors
/// When the state file cannot be read, parsed or written: the message names it.
pub fn load(
    secret: Option<Secret>,
    admin_token: Option<Secret>,
    state_file: &Path,
) -> Result<DevMode, String> {
    if let Some(secret) = secret {
        return Ok(DevMode {
            secret,
            admin_token: admin_token.unwrap_or_else(|| Secret::new(random_hex())),
            from: SecretFrom::Environment,
        });
    }
    let named = |what: &str, err: &dyn std::fmt::Display| {
        format!(
            "--dev state file (RELAY_DEV_STATE_FILE) {}: {what}: {err}",
            state_file.display()
        )
    };
    let state = match std::fs::read(state_file) {
        Ok(bytes) => serde_json::from_slice::<StateFile>(&bytes)
            .map_err(|e| named("not a relay dev state file (delete it to start over)", &e))?,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let state = StateFile {
                secret: random_hex(),
                admin_token: random_hex(),
            };
            write_private(
                state_file,
                &serde_json::to_vec_pretty(&state).unwrap_or_default(),
            )
            .map_err(|e| named("cannot write it", &e))?;
            state
        }
        Err(err) => return Err(named("cannot read it", &err)),
    };
    if state.secret.len() < crate::config::MIN_SECRET_BYTES {
        return Err(named(
            "its secret is too short (delete it to start over)",
            &state.secret.len(),
        ));
    }
    Ok(DevMode {
        secret: Secret::new(state.secret),
        admin_token: admin_token.unwrap_or(Secret::new(state.admin_token)),
        from: SecretFrom::StateFile(state_file.to_owned()),
    })
}

/// Writes `bytes` to `path` (creating its directory), readable by its owner only.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// 32 random bytes, hex.
fn random_hex() -> String {
    use rand::Rng as _;
    let bytes: [u8; 32] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where the dev relay is reached.
pub struct Reach<'a> {
    /// The port it listens on.
    pub port: u16,
    /// It serves TLS (`https`, `wss`).
    pub secure: bool,
    /// Hosts are on subdomains of this domain too.
    pub base_domain: Option<&'a str>,
}

/// What `--dev` prints at startup: the tokens, and the commands that use them.
pub fn banner(dev: &DevMode, host: &str, client: &str, reach: &Reach<'_>, exe: &str) -> String {
    let port = reach.port;
    let (http, ws) = if reach.secure {
        ("https", "wss")
    } else {
        ("http", "ws")
    };
    let base = format!("{http}://localhost:{port}");
    // `*.localhost` names the loopback address in browsers and curl alike.
    let subdomain = match reach.base_domain {
        Some(domain) => format!(
            "\x20  browser, at the root of its own origin: {http}://{DEMO_HOST}.{domain}:{port}/?token={client}\n"
        ),
        None => String::new(),
    };
    let kept = match &dev.from {
        SecretFrom::Environment => "secret from RELAY_JWT_SECRET".to_owned(),
        SecretFrom::StateFile(path) => format!(
            "secret kept in {} (tokens keep working across restarts; delete it to start over)",
            path.display()
        ),
    };
    let admin = dev.admin_token.expose();
    let admin = String::from_utf8_lossy(admin);
    format!(
        "relay dev mode: {kept}\n\
         host token:   {host}\n\
         client token: {client}\n\
         admin token:  {admin}\n\
         \n\
         1. Put an agent in front of your local service (here one on port 3000):\n\
         \x20  {exe} agent --relay {ws}://localhost:{port} --host-id {DEMO_HOST} --token {host} --to http://127.0.0.1:3000\n\
         2. Reach it through the relay:\n\
         \x20  curl -H \"Authorization: Bearer {client}\" {base}/hosts/{DEMO_HOST}/\n\
         \x20  browser: {base}/hosts/{DEMO_HOST}/?token={client}\n\
         {subdomain}\
         3. See the tunnels:\n\
         \x20  curl -H \"Authorization: Bearer {admin}\" {base}/admin/tunnels\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("relay-dev-test-{}-{name}", std::process::id()))
    }

    #[test]
    fn the_first_run_keeps_its_secret_and_later_runs_reuse_it() {
        let dir = temp("keep");
        let path = dir.join("nested").join("dev.json");
        let first = load(None, None, &path).unwrap();
        assert_eq!(first.from, SecretFrom::StateFile(path.clone()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "the secret is its owner's only");
        }
        let second = load(None, None, &path).unwrap();
        assert_eq!(first.secret.expose(), second.secret.expose());
        assert_eq!(first.admin_token.expose(), second.admin_token.expose());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_environment_wins_and_a_broken_state_file_is_named() {
        let path = temp("env.json");
        let dev = load(
            Some(Secret::new("0123456789abcdef0123".into())),
            None,
            &path,
        )
        .unwrap();
        assert_eq!(dev.from, SecretFrom::Environment);
        assert!(!path.exists(), "nothing written when the secret is given");
        std::fs::write(&path, "{not json").unwrap();
        let err = load(None, None, &path).unwrap_err();
        assert!(
            err.contains("RELAY_DEV_STATE_FILE") && err.contains("delete it"),
            "{err}"
        );
        std::fs::remove_file(&path).unwrap();
    }
}
