//! The `relay` command line: `relay serve`, `relay token` and `relay agent`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tracing::error;

use crate::auth::{ANY_HOST, Role, Signer};
use crate::config::{EXIT_CONFIG, KeySource, MIN_SECRET_BYTES, Secret, ServeArgs};
use crate::host_id::HostId;
use crate::state::Relay;
use crate::{agent, ownership, server, telemetry};

/// WebSocket tunnel relay: reach hosts behind NAT over one outbound tunnel.
#[derive(Debug, Parser)]
#[command(name = "relay", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay server.
    Serve(Box<ServeArgs>),
    /// Mint a host or client token with the configured key.
    Token(TokenArgs),
    /// Run the host agent: keep a tunnel open to the relay and forward it to a local
    /// service.
    Agent(Box<agent::AgentArgs>),
}

/// Flags of `relay token`.
#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// `host` to register tunnels, `client` to reach hosts.
    #[arg(long, value_enum)]
    pub role: Role,

    /// A hostId the token allows (repeat for several; `*` for all).
    #[arg(long = "host", required = true)]
    pub hosts: Vec<String>,

    /// How long the token is valid (e.g. 1h, 24h, 30d).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
    pub ttl: Duration,

    /// The `sub` claim: who the token is for.
    #[arg(long, default_value = "relay-cli")]
    pub sub: String,

    /// HS256 secret to sign with.
    #[arg(long, env = "RELAY_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<Secret>,

    /// PEM private key to sign with (RS256, EdDSA or ES256) instead of a secret.
    #[arg(
        long,
        env = "RELAY_JWT_PRIVATE_KEY_FILE",
        conflicts_with = "jwt_secret"
    )]
    pub jwt_private_key_file: Option<PathBuf>,
}

/// Runs the command line; the binary's whole `main`.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            // --help and --version are not errors; every other parse failure is bad
            // configuration.
            return if err.use_stderr() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Token(args) => token(args),
        Command::Agent(args) => run_agent(*args),
    }
}

/// The runtime of `serve` and `agent`, or the exit code after saying why it could not
/// start. `workers`: worker threads unless `TOKIO_WORKER_THREADS` says otherwise (`None`:
/// one per CPU).
fn runtime(command: &str, workers: Option<usize>) -> Result<tokio::runtime::Runtime, ExitCode> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = workers
        && std::env::var_os("TOKIO_WORKER_THREADS").is_none()
    {
        builder.worker_threads(workers);
    }
    builder.enable_all().build().map_err(|err| {
        eprintln!("{command}: cannot start the runtime: {err}");
        ExitCode::FAILURE
    })
}

fn run_agent(args: agent::AgentArgs) -> ExitCode {
    let config = match args.into_config() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("relay agent: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    telemetry::init_tracing(config.log_format);
    // One worker: see the limit's reason.
    let runtime = match runtime("relay agent", Some(crate::limits::agent::WORKER_THREADS)) {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    match runtime.block_on(agent::run(config, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            error!("agent failed: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let config = match args.into_config() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("relay: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    telemetry::init_tracing(config.log_format);
    let runtime = match runtime("relay", None) {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    runtime.block_on(async move {
        let relay = match Relay::new(config) {
            Ok(relay) => relay,
            Err(err) => {
                eprintln!("relay: {err}");
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        // Every tunnel and client connection is a file descriptor: a default soft limit of
        // 1,024 would cap a relay far below what it can hold.
        match rlimit::increase_nofile_limit(u64::MAX) {
            Ok(limit) => tracing::debug!(limit, "open file limit raised"),
            Err(err) => tracing::warn!(%err, "could not raise the open file limit"),
        }
        // Before binding: nothing may be routed here for tunnels a previous process with
        // this identity held (a SIGKILL leaves them behind).
        ownership::clear_stale_entries(&relay).await;
        let listen = relay.config().listen;
        let listener = match server::bind(listen) {
            Ok(listener) => listener,
            Err(err) => {
                error!(addr = %listen, %err, "cannot listen");
                return ExitCode::FAILURE;
            }
        };
        if let KeySource::Dev(dev) = &relay.config().keys {
            let reach = crate::dev::Reach {
                port: listener.local_addr().map(|a| a.port()).unwrap_or(0),
                secure: relay.config().tls.is_some(),
                base_domain: relay.config().base_domain.as_deref(),
            };
            print_dev_tokens(dev, &reach);
        }
        match server::serve(listener, relay, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                error!("relay failed: {err:#}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Resolves on SIGINT or SIGTERM; a second signal exits at once.
async fn shutdown_signal() {
    crate::shutdown::signal_then_exit_on_second().await;
}

/// `--dev`: print a host and a client token for every host, and the commands that use
/// them (the agent command names this very binary).
fn print_dev_tokens(dev: &crate::dev::DevMode, reach: &crate::dev::Reach<'_>) {
    let signer = Signer::hs256(dev.secret.expose());
    let all = [ANY_HOST.to_owned()];
    let ttl = Duration::from_secs(30 * 24 * 3600);
    let [host_sub, client_sub] = crate::dev::DEV_SUBJECTS;
    let (Ok(host), Ok(client)) = (
        signer.mint(host_sub, Role::Host, &all, ttl),
        signer.mint(client_sub, Role::Client, &all, ttl),
    ) else {
        eprintln!("relay: could not mint dev tokens");
        return;
    };
    let exe = std::env::current_exe()
        .ok()
        .and_then(|path| path.to_str().map(str::to_owned))
        .unwrap_or_else(|| "relay".to_owned());
    let banner = crate::dev::banner(dev, &host, &client, reach, &exe);
    // Ignored when stdout is closed: the relay serves on.
    let _ = std::io::Write::write_all(&mut std::io::stdout(), banner.as_bytes());
}

fn token(args: TokenArgs) -> ExitCode {
    for host in &args.hosts {
        if host != ANY_HOST
            && let Err(err) = HostId::parse(host)
        {
            eprintln!("relay token: --host {host:?}: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    }
    let signer = match (&args.jwt_secret, &args.jwt_private_key_file) {
        (Some(secret), None) if secret.expose().len() < MIN_SECRET_BYTES => {
            eprintln!(
                "relay token: RELAY_JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes \
                 (as for relay serve)"
            );
            return ExitCode::from(EXIT_CONFIG);
        }
        (Some(secret), None) => Signer::hs256(secret.expose()),
        (None, Some(path)) => match std::fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|pem| Signer::from_private_pem(&pem))
        {
            Ok(signer) => signer,
            Err(err) => {
                eprintln!(
                    "relay token: RELAY_JWT_PRIVATE_KEY_FILE {}: {err}",
                    path.display()
                );
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        _ => {
            eprintln!("relay token: set RELAY_JWT_SECRET or RELAY_JWT_PRIVATE_KEY_FILE");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match signer.mint(&args.sub, args.role, &args.hosts, args.ttl) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("relay token: {err}");
            ExitCode::FAILURE
        }
    }
}
