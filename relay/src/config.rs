//! Configuration of `relay serve`: flags, their environment variables, and validation.
//!
//! Everything is checked before anything binds; a bad value is the operator's fault and
//! ends the process with exit code 64 (EX_USAGE) and a message naming the setting.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::access::AccessCheck;
use crate::auth::{Policy, Verifier};
use crate::directory::Owner;
use crate::limits::{self, Limits};
use crate::telemetry::LogFormat;

/// Exit code for invalid configuration (BSD `EX_USAGE`).
pub const EXIT_CONFIG: u8 = 64;

/// Shortest HS256 secret accepted: shorter ones are guessable offline from one token.
pub const MIN_SECRET_BYTES: usize = 16;

/// A secret from the command line or environment. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// A secret.
    pub fn new(secret: String) -> Secret {
        Secret(secret)
    }

    /// The secret's bytes.
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MASKED")
    }
}

impl std::str::FromStr for Secret {
    type Err = String;
    fn from_str(s: &str) -> Result<Secret, String> {
        Ok(Secret(s.to_owned()))
    }
}

/// What a valid token allows (`--auth-policy`); see [`crate::auth::Policy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthPolicy {
    /// The token's `role` and `hosts` claims.
    Claims,
    /// hostIds `<org>:<machine>`, allowed when `<org>` is in the token's org claim.
    Org,
}

/// JWT algorithms a public key file may be used with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyAlgorithm {
    /// RSA PKCS#1 v1.5 with SHA-256.
    #[value(name = "RS256")]
    Rs256,
    /// Ed25519.
    #[value(name = "EdDSA")]
    EdDsa,
    /// ECDSA P-256 with SHA-256.
    #[value(name = "ES256")]
    Es256,
}

impl From<KeyAlgorithm> for jsonwebtoken::Algorithm {
    fn from(alg: KeyAlgorithm) -> Self {
        match alg {
            KeyAlgorithm::Rs256 => jsonwebtoken::Algorithm::RS256,
            KeyAlgorithm::EdDsa => jsonwebtoken::Algorithm::EdDSA,
            KeyAlgorithm::Es256 => jsonwebtoken::Algorithm::ES256,
        }
    }
}

/// How a request for a host owned by another machine reaches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RoutingMode {
    /// Forward HTTP and WebSocket to the owner's advertised address.
    Proxy,
    /// HTTP: answer with `fly-replay: instance=<owner>` so Fly's proxy replays the request
    /// on the owner; WebSocket (which cannot be replayed): bridge over Fly's private
    /// network.
    #[value(name = "fly-replay")]
    FlyReplay,
}

/// Where the directory lives.
#[derive(Debug, Clone)]
pub enum DirectoryConfig {
    /// In this process: one machine, no Redis.
    Memory,
    /// In Redis, shared by the fleet.
    Redis {
        /// Connection URL (may hold a password: masked).
        url: Secret,
        /// Prefix of every key.
        prefix: String,
        /// PEM certificates a `rediss://` server must chain to; `None`: the web roots.
        tls_ca: Option<Vec<u8>>,
    },
}

/// Reads a PEM file of CA certificates (the setting `name`), checking that it holds at
/// least one.
pub(crate) fn read_ca_file(name: &str, path: &std::path::Path) -> Result<Vec<u8>, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;

    let pem =
        std::fs::read(path).map_err(|e| format!("cannot read {name} {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{name} {} is not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{name} {} holds no certificate", path.display()));
    }
    Ok(pem)
}

/// Flags of `relay serve`. Every flag can also be set from the environment variable
/// named in its help.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on; the default `::` accepts IPv4 and IPv6.
    #[arg(long, env = "RELAY_BIND", default_value_t = IpAddr::V6(Ipv6Addr::UNSPECIFIED))]
    pub bind: IpAddr,

    /// Port to listen on (0 picks a free one and logs it).
    #[arg(long, env = "RELAY_PORT", default_value_t = 8080)]
    pub port: u16,

    /// Region of this machine (Fly sets FLY_REGION).
    #[arg(long, env = "FLY_REGION", default_value = "local")]
    pub region: String,

    /// Id of this machine (Fly sets FLY_MACHINE_ID). Default: derived from the hostname,
    /// so a restarted process keeps its identity.
    #[arg(long, env = "FLY_MACHINE_ID")]
    pub machine_id: Option<String>,

    /// Fly app name (Fly sets FLY_APP_NAME).
    #[arg(long, env = "FLY_APP_NAME")]
    pub app_name: Option<String>,

    /// HS256 secret that host and client tokens are signed with.
    #[arg(long, env = "RELAY_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<Secret>,

    /// PEM public key file for RS256, EdDSA or ES256 tokens (instead of a secret).
    #[arg(long, env = "RELAY_JWT_PUBLIC_KEY_FILE", conflicts_with = "jwt_secret")]
    pub jwt_public_key_file: Option<PathBuf>,

    /// Algorithm of the public key file. Default: taken from the key.
    #[arg(long, env = "RELAY_JWT_ALGORITHM", requires = "jwt_public_key_file")]
    pub jwt_algorithm: Option<KeyAlgorithm>,

    /// An identity provider's key set (JWKS URL, http or https) that tokens are signed
    /// with (RS256, ES256, EdDSA), instead of a secret or a key file.
    #[arg(long, env = "RELAY_JWKS_URL", conflicts_with_all = ["jwt_secret", "jwt_public_key_file"])]
    pub jwks_url: Option<String>,

    /// The `iss` every token must carry.
    #[arg(long, env = "RELAY_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// The `aud` every token must carry (or list).
    #[arg(long, env = "RELAY_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// What a valid token allows: `claims` (its `role` and `hosts` claims) or `org`
    /// (hostIds `<org>:<machine>`, allowed when `<org>` is in the org claim).
    #[arg(long, env = "RELAY_AUTH_POLICY", value_enum, default_value = "claims")]
    pub auth_policy: AuthPolicy,

    /// With `--auth-policy org`: the array claim that lists the bearer's orgs.
    #[arg(long, env = "RELAY_ORG_CLAIM", default_value = "organizationIds")]
    pub org_claim: String,

    /// After the policy allows, ask this URL whether the bearer may use the host: GET
    /// with the bearer's token, `{hostId}` replaced by the (percent-encoded) hostId;
    /// allowed on 2xx. Cached per (sub, hostId): allowed 15 min, denied 30 s.
    #[arg(long, env = "RELAY_ACCESS_CHECK_URL")]
    pub access_check_url: Option<String>,

    /// With `--access-check-url`: a 2xx allows only if this JSON pointer in the answer
    /// is `true` (e.g. `/result/data/json/allowed`).
    #[arg(
        long,
        env = "RELAY_ACCESS_CHECK_ALLOW_POINTER",
        requires = "access_check_url"
    )]
    pub access_check_allow_pointer: Option<String>,

    /// Try the relay locally: tokens and the commands that use them printed on stdout;
    /// the secret (RELAY_JWT_SECRET, or one kept in --dev-state-file) survives restarts.
    /// The variable takes 1/0, true/false, yes/no.
    #[arg(long, env = "RELAY_DEV", value_parser = clap::builder::BoolishValueParser::new())]
    pub dev: bool,

    /// Where `--dev` keeps its secret and admin token (default
    /// `$XDG_STATE_HOME/relay/dev.json`, else `~/.local/state/relay/dev.json`).
    #[arg(long, env = "RELAY_DEV_STATE_FILE")]
    pub dev_state_file: Option<PathBuf>,

    /// Interval between pings on every tunnel.
    #[arg(long, env = "RELAY_PING_INTERVAL", value_parser = humantime::parse_duration,
          default_value = "30s")]
    pub ping_interval: Duration,

    /// Unanswered pings after which a tunnel is closed (1001).
    #[arg(long, env = "RELAY_MAX_MISSED_PONGS", default_value_t = limits::MAX_MISSED_PONGS)]
    pub max_missed_pongs: u32,

    /// How long a stream for a superset v2 host waits for the host to dial back before
    /// 504.
    #[arg(long, env = "RELAY_DIAL_TIMEOUT", value_parser = humantime::parse_duration,
          default_value = "10s")]
    pub dial_timeout: Duration,

    /// How long a client HTTP exchange waits for the host before 504.
    #[arg(long, env = "RELAY_EXCHANGE_TIMEOUT", value_parser = humantime::parse_duration,
          default_value = "30s")]
    pub exchange_timeout: Duration,

    /// Exchanges in flight per tunnel before 503 "host overloaded".
    #[arg(long, env = "RELAY_MAX_PENDING", default_value_t = limits::MAX_PENDING_EXCHANGES)]
    pub max_pending: usize,

    /// Largest client request body, in bytes (413 above).
    #[arg(long, env = "RELAY_MAX_BODY_BYTES", default_value_t = limits::MAX_BODY_BYTES)]
    pub max_body_bytes: usize,

    /// Largest WebSocket message on any socket, in bytes (close 1009 above).
    #[arg(long, env = "RELAY_MAX_FRAME_BYTES", default_value_t = limits::MAX_FRAME_BYTES)]
    pub max_frame_bytes: usize,

    /// Messages that may wait in one tunnel's outbound queue.
    #[arg(long, env = "RELAY_TUNNEL_QUEUE", default_value_t = limits::TUNNEL_QUEUE)]
    pub tunnel_queue: usize,

    /// Host frames that may wait for one slow client channel before it is closed (1013).
    #[arg(long, env = "RELAY_CHANNEL_QUEUE", default_value_t = limits::CHANNEL_QUEUE)]
    pub channel_queue: usize,

    /// Bytes of host frames queued per client channel (v1) before it is closed (1013).
    #[arg(long, env = "RELAY_CHANNEL_QUEUE_BYTES", default_value_t = limits::CHANNEL_QUEUE_BYTES)]
    pub channel_queue_bytes: usize,

    /// How long a client connection may take to send a whole request head (also how long
    /// an idle keep-alive connection is kept).
    #[arg(long, env = "RELAY_HEADER_READ_TIMEOUT", value_parser = humantime::parse_duration,
          default_value = "20s")]
    pub header_read_timeout: Duration,

    /// Connections one client IP may hold at once (0: no limit). Not applied when
    /// `--client-ip-header` is set (every connection comes from the proxy then).
    #[arg(long, env = "RELAY_MAX_CONNECTIONS_PER_IP", default_value_t = limits::MAX_CONNECTIONS_PER_IP)]
    pub max_connections_per_ip: usize,

    /// WebSocket channels one tunnel carries at once (503 above).
    #[arg(long, env = "RELAY_MAX_CHANNELS", default_value_t = limits::MAX_CHANNELS)]
    pub max_channels: usize,

    /// WebSocket channels one client IP may hold open at once (429 above; 0: no limit).
    #[arg(long, env = "RELAY_MAX_CHANNELS_PER_CLIENT", default_value_t = limits::MAX_CHANNELS_PER_CLIENT)]
    pub max_channels_per_client: usize,

    /// Header that carries the client's IP address, set by the platform's proxy in
    /// front of the relay (on Fly: `Fly-Client-IP`). Only set it behind such a proxy:
    /// anyone can send the header to a relay that is reached directly.
    #[arg(long, env = "RELAY_CLIENT_IP_HEADER")]
    pub client_ip_header: Option<String>,

    /// Serve each host on its own subdomain of this domain as well:
    /// `<hostId>.<base-domain>/…` reaches host `<hostId>` at `/…` (`--dev`: `localhost`).
    #[arg(long, env = "RELAY_BASE_DOMAIN")]
    pub base_domain: Option<String>,

    /// PEM certificate chain to serve TLS with (with `--tls-key`); re-read when it
    /// changes. Without it the relay serves plain HTTP.
    #[arg(long, env = "RELAY_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "RELAY_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// How long in all a client's request body may arrive slower than the minimum rate
    /// before it is cut.
    #[arg(long, env = "RELAY_UPLOAD_GRACE", value_parser = humantime::parse_duration,
          default_value = "10s")]
    pub upload_grace: Duration,

    /// Slowest average rate of a client's request body, in bytes a second, past the
    /// grace (408 / stream reset below it). 0: no minimum.
    #[arg(long, env = "RELAY_MIN_UPLOAD_RATE", default_value_t = limits::MIN_UPLOAD_RATE)]
    pub min_upload_rate: u64,

    /// Bytes one tunnel's buffers may hold: v1 bodies and queued frames (503 / close
    /// 1013 above); h2 bytes waiting for the tunnel's socket (senders wait) and channel
    /// messages being read (close 1013 above).
    #[arg(long, env = "RELAY_TUNNEL_BUDGET", default_value_t = limits::TUNNEL_BUDGET)]
    pub tunnel_budget: usize,

    /// Bytes all tunnels' buffers may hold together, with the receive windows of the h2
    /// connections that are up. 0: half the machine's (or the cgroup's) memory.
    #[arg(long, env = "RELAY_MEMORY_BUDGET", default_value_t = 0)]
    pub memory_budget: usize,

    /// Bytes the tunnels of one tenant (one token subject) may hold together. 0: half
    /// the memory budget, and at least the tunnel budget.
    #[arg(long, env = "RELAY_TENANT_BUDGET", default_value_t = 0)]
    pub tenant_budget: usize,

    /// How long a write to a peer (client, channel, tunnel) may make no progress before
    /// the connection is dropped.
    #[arg(long, env = "RELAY_WRITE_TIMEOUT", value_parser = humantime::parse_duration,
          default_value = "30s")]
    pub write_timeout: Duration,

    /// Connections held at once (tunnels and clients); over it new ones are closed at once.
    /// 0: the open file limit less a reserve.
    #[arg(long, env = "RELAY_MAX_CONNECTIONS", default_value_t = 0)]
    pub max_connections: usize,

    /// How long an HTTP/2 connection inside an `h2` tunnel may carry no stream before it
    /// is ended to save its buffers (the tunnel stays; the next stream starts a new one).
    #[arg(long, env = "RELAY_H2_IDLE_CONNECTION", value_parser = humantime::parse_duration,
          default_value = "15s")]
    pub h2_idle_connection: Duration,

    /// Lifetime of a directory entry without a heartbeat (heartbeats ride on pongs).
    #[arg(long, env = "RELAY_DIRECTORY_TTL", value_parser = humantime::parse_duration,
          default_value = "90s")]
    pub directory_ttl: Duration,

    /// Redis URL of the shared directory (`redis://[:password@]host:port[/db]`, or
    /// `rediss://` for TLS, verified against the public web roots). Without it the
    /// directory is embedded (one machine).
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<Secret>,

    /// PEM file of the certificate authorities a `rediss://` server must chain to, instead
    /// of the public web roots (a private or self-signed CA).
    #[arg(long, env = "RELAY_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,

    /// PEM CA certificates the identity provider's key set (`--jwks-url`) and the access
    /// check (`--access-check-url`) may chain to over HTTPS, besides the public web
    /// roots (an internal API behind a private CA).
    #[arg(long, env = "RELAY_FETCH_CA_FILE")]
    pub fetch_ca_file: Option<PathBuf>,

    /// Prefix of every Redis key.
    #[arg(long, env = "RELAY_REDIS_PREFIX", default_value = "relay:")]
    pub redis_prefix: String,

    /// Address (`host:port`) other relays forward requests to. Default: on Fly,
    /// `<machine>.vm.<app>.internal:<port>`; elsewhere the bound address, with a
    /// loopback address in place of an unspecified one (`[::1]` for `::`, 127.0.0.1 for
    /// 0.0.0.0): set it whenever peers run on other hosts.
    #[arg(long, env = "RELAY_ADVERTISE_ADDR")]
    pub advertise_addr: Option<String>,

    /// How requests for hosts held by another machine are routed. Default: `fly-replay`
    /// on Fly (FLY_APP_NAME set), `proxy` elsewhere.
    #[arg(long, env = "RELAY_ROUTING", value_enum)]
    pub routing: Option<RoutingMode>,

    /// How often this machine re-asserts its tunnels in the directory (heals a Redis
    /// restart, flush or failover without any host reconnecting).
    #[arg(long, env = "RELAY_RECONCILE_INTERVAL", value_parser = humantime::parse_duration,
          default_value = "10s")]
    pub reconcile_interval: Duration,

    /// Bearer token of `GET /admin/tunnels` (at least 16 bytes); the endpoint is off
    /// without it.
    #[arg(long, env = "RELAY_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<Secret>,

    /// After a drain notice, how long tunnels may stay while their agents move.
    #[arg(long, env = "RELAY_DRAIN_GRACE", value_parser = humantime::parse_duration,
          default_value = "3s")]
    pub drain_grace: Duration,

    /// Hard deadline of a drain, from the signal to exit (keep it below the platform's
    /// kill timeout).
    #[arg(long, env = "RELAY_DRAIN_DEADLINE", value_parser = humantime::parse_duration,
          default_value = "8s")]
    pub drain_deadline: Duration,

    /// Tunnel registrations admitted per second (token bucket); over it → 429.
    #[arg(long, env = "RELAY_ADMISSION_RATE", default_value_t = limits::ADMISSION_RATE)]
    pub admission_rate: u32,

    /// Burst of tunnel registrations admitted at once.
    #[arg(long, env = "RELAY_ADMISSION_BURST", default_value_t = limits::ADMISSION_BURST)]
    pub admission_burst: u32,

    /// Log format.
    #[arg(long, env = "RELAY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// An access log on stdout, one line per client request and per WebSocket channel
    /// (host, method, path without query, status, bytes each way, duration, route): `text`
    /// or `json`. Off by default.
    #[arg(long, env = "RELAY_ACCESS_LOG", value_enum)]
    pub access_log: Option<crate::access_log::Format>,
}

/// How the relay verifies tokens.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// HS256 with a shared secret.
    Secret(Secret),
    /// An identity provider's key set.
    Jwks(http::Uri),
    /// A public key (PEM) and its algorithm (None: from the key).
    PublicKey {
        /// Where the key was read from, for messages.
        path: PathBuf,
        /// The PEM.
        pem: Vec<u8>,
        /// The algorithm, if given.
        algorithm: Option<KeyAlgorithm>,
    },
    /// `--dev`: a secret kept across restarts (or `RELAY_JWT_SECRET`), and what to print.
    Dev(crate::dev::DevMode),
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to listen.
    pub listen: SocketAddr,
    /// The `iss` and `aud` tokens must carry, when set.
    pub jwt_issuer: Option<String>,
    /// See `jwt_issuer`.
    pub jwt_audience: Option<String>,
    /// What a valid token allows.
    pub policy: Policy,
    /// The access check asked after the policy, if any.
    pub access_check: Option<AccessCheck>,
    /// PEM CA certificates trusted for the relay's own HTTPS requests, besides the web
    /// roots (`--fetch-ca-file`).
    pub fetch_ca: Option<Vec<u8>>,
    /// This machine, as written in the directory.
    pub owner: Owner,
    /// Fly app name, when on Fly.
    pub app_name: Option<String>,
    /// How tokens are verified.
    pub keys: KeySource,
    /// Timeouts and limits.
    pub limits: Limits,
    /// Log format.
    pub log_format: LogFormat,
    /// The access log, when on.
    pub access_log: Option<crate::access_log::Format>,
    /// Where the directory lives.
    pub directory: DirectoryConfig,
    /// How requests for other machines' hosts are routed.
    pub routing: RoutingMode,
    /// The address peers forward to, when set explicitly (otherwise derived at bind).
    pub advertise_addr: Option<String>,
    /// Interval of the directory reconciler.
    pub reconcile_interval: Duration,
    /// How long tunnels may stay after a drain notice.
    pub drain_grace: Duration,
    /// Hard deadline of a drain.
    pub drain_deadline: Duration,
    /// Tunnel registrations per second.
    pub admission_rate: std::num::NonZeroU32,
    /// Burst of tunnel registrations.
    pub admission_burst: std::num::NonZeroU32,
    /// Bearer token of the admin endpoint; `None` disables it.
    pub admin_token: Option<Secret>,
    /// The header the platform's proxy sets to the client's IP, if trusted
    /// ([`crate::clients`]).
    pub client_ip_header: Option<http::HeaderName>,
    /// Hosts are served on subdomains of this domain too (lowercase, no dots at either
    /// end); see [`crate::subdomain`].
    pub base_domain: Option<std::sync::Arc<str>>,
    /// The certificate and key to serve TLS with; plain HTTP without.
    pub tls: Option<crate::tls::TlsFiles>,
}

/// A configuration error: the operator's fault; exits 64.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl ServeArgs {
    /// Validates the flags into a [`Config`].
    ///
    /// # Errors
    /// A [`ConfigError`] naming the setting (the flag a user types and its environment
    /// variable) and what is wrong with it.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        use clap::Args as _;
        let command = ServeArgs::augment_args(clap::Command::new("serve"));
        self.validate()
            .map_err(|ConfigError(msg)| ConfigError(name_flags(&command, &msg)))
    }

    fn validate(self) -> Result<Config, ConfigError> {
        let err = |msg: String| Err(ConfigError(msg));
        let machine_id = match self.machine_id {
            Some(id) => id,
            None => default_machine_id(),
        };
        let owner = Owner::new(&self.region, &machine_id)
            .map_err(|e| ConfigError(format!("{e} (FLY_REGION / FLY_MACHINE_ID)")))?;

        let jwks = match self.jwks_url.as_deref() {
            Some(url) => match url.parse::<http::Uri>() {
                Ok(uri)
                    if matches!(uri.scheme_str(), Some("http" | "https"))
                        && uri.host().is_some() =>
                {
                    Some(uri)
                }
                _ => {
                    return err(format!(
                        "RELAY_JWKS_URL {url:?} must be an http:// or https:// URL"
                    ));
                }
            },
            None => None,
        };
        let keys = match (self.dev, self.jwt_secret, self.jwt_public_key_file) {
            (true, secret, None) if jwks.is_none() => {
                if let Some(secret) = &secret
                    && secret.0.len() < MIN_SECRET_BYTES
                {
                    return err(format!(
                        "RELAY_JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes"
                    ));
                }
                let state_file = self
                    .dev_state_file
                    .clone()
                    .unwrap_or_else(crate::dev::default_state_file);
                let admin = self.admin_token.clone().filter(|t| !t.0.is_empty());
                KeySource::Dev(crate::dev::load(secret, admin, &state_file).map_err(ConfigError)?)
            }
            (false, None, None) if let Some(url) = jwks => KeySource::Jwks(url),
            (true, _, _) => {
                return err(
                    "--dev signs its own tokens (with RELAY_JWT_SECRET, or a secret it keeps): \
                     unset RELAY_JWT_PUBLIC_KEY_FILE / RELAY_JWKS_URL, or drop --dev"
                        .into(),
                );
            }
            (false, Some(secret), None) => {
                if secret.0.len() < MIN_SECRET_BYTES {
                    return err(format!(
                        "RELAY_JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes"
                    ));
                }
                KeySource::Secret(secret)
            }
            (false, None, Some(path)) => {
                let pem = std::fs::read(&path).map_err(|e| {
                    ConfigError(format!(
                        "cannot read RELAY_JWT_PUBLIC_KEY_FILE {}: {e}",
                        path.display()
                    ))
                })?;
                KeySource::PublicKey {
                    path,
                    pem,
                    algorithm: self.jwt_algorithm,
                }
            }
            (false, None, None) => {
                return err("no token key: set RELAY_JWT_SECRET (HS256), \
                            RELAY_JWT_PUBLIC_KEY_FILE (RS256/EdDSA/ES256) or RELAY_JWKS_URL \
                            (an identity provider's key set), or run \
                            `relay serve --dev` to try it locally"
                    .into());
            }
            (false, Some(_), Some(_)) => {
                return err("set RELAY_JWT_SECRET or RELAY_JWT_PUBLIC_KEY_FILE, not both".into());
            }
        };

        let positive = |name: &str, d: Duration| {
            if d.is_zero() {
                Err(ConfigError(format!("{name} must be greater than zero")))
            } else {
                Ok(d)
            }
        };
        let at_least = |name: &str, v: usize, min: usize| {
            if v < min {
                Err(ConfigError(format!("{name} must be at least {min}")))
            } else {
                Ok(v)
            }
        };
        let client_ip_header = match self.client_ip_header.filter(|h| !h.is_empty()) {
            Some(name) => Some(http::HeaderName::try_from(name.as_str()).map_err(|_| {
                ConfigError(format!(
                    "RELAY_CLIENT_IP_HEADER {name:?} is not a header name"
                ))
            })?),
            None => None,
        };
        let limits = Limits {
            ping_interval: positive("RELAY_PING_INTERVAL", self.ping_interval)?,
            max_missed_pongs: at_least("RELAY_MAX_MISSED_PONGS", self.max_missed_pongs as usize, 1)?
                as u32,
            exchange_timeout: positive("RELAY_EXCHANGE_TIMEOUT", self.exchange_timeout)?,
            max_pending: at_least("RELAY_MAX_PENDING", self.max_pending, 1)?,
            max_body_bytes: self.max_body_bytes,
            max_frame_bytes: at_least("RELAY_MAX_FRAME_BYTES", self.max_frame_bytes, 1024)?,
            tunnel_queue: at_least("RELAY_TUNNEL_QUEUE", self.tunnel_queue, 1)?,
            channel_queue: at_least("RELAY_CHANNEL_QUEUE", self.channel_queue, 1)?,
            channel_queue_bytes: at_least(
                "RELAY_CHANNEL_QUEUE_BYTES",
                self.channel_queue_bytes,
                limits::QUEUED_FRAME_OVERHEAD,
            )?,
            directory_ttl: positive("RELAY_DIRECTORY_TTL", self.directory_ttl)?,
            h2_idle_connection: positive("RELAY_H2_IDLE_CONNECTION", self.h2_idle_connection)?,
            header_read_timeout: positive("RELAY_HEADER_READ_TIMEOUT", self.header_read_timeout)?,
            max_connections: self.max_connections,
            write_timeout: positive("RELAY_WRITE_TIMEOUT", self.write_timeout)?,
            tunnel_budget: at_least("RELAY_TUNNEL_BUDGET", self.tunnel_budget, 64 * 1024)?,
            memory_budget: self.memory_budget,
            tenant_budget: self.tenant_budget,
            max_connections_per_ip: if client_ip_header.is_some() {
                0
            } else {
                self.max_connections_per_ip
            },
            max_channels: at_least("RELAY_MAX_CHANNELS", self.max_channels, 1)?,
            max_channels_per_client: self.max_channels_per_client,
            upload_grace: self.upload_grace,
            min_upload_rate: self.min_upload_rate,
            dial_timeout: positive("RELAY_DIAL_TIMEOUT", self.dial_timeout)?,
        };
        if limits.directory_ttl <= limits.ping_interval {
            return err(format!(
                "RELAY_DIRECTORY_TTL ({:?}) must be longer than RELAY_PING_INTERVAL ({:?}): \
                 heartbeats ride on pongs",
                limits.directory_ttl, limits.ping_interval
            ));
        }

        let app_name = self.app_name.filter(|s| !s.is_empty());
        let routing = self.routing.unwrap_or(if app_name.is_some() {
            RoutingMode::FlyReplay
        } else {
            RoutingMode::Proxy
        });
        if routing == RoutingMode::FlyReplay && app_name.is_none() {
            return err(
                "--routing fly-replay needs FLY_APP_NAME (the private network \
                        name of the app)"
                    .into(),
            );
        }
        let directory = match self.redis_url {
            Some(url) if !url.0.is_empty() => {
                if self.redis_prefix.is_empty() {
                    return err("RELAY_REDIS_PREFIX must not be empty".into());
                }
                let tls_ca = match &self.redis_ca_file {
                    Some(path) if !url.0.starts_with("rediss://") => {
                        return err(format!(
                            "RELAY_REDIS_CA_FILE ({}) needs a rediss:// REDIS_URL",
                            path.display()
                        ));
                    }
                    Some(path) => {
                        Some(read_ca_file("RELAY_REDIS_CA_FILE", path).map_err(ConfigError)?)
                    }
                    None => None,
                };
                DirectoryConfig::Redis {
                    url,
                    prefix: self.redis_prefix,
                    tls_ca,
                }
            }
            _ if self.redis_ca_file.is_some() => {
                return err("RELAY_REDIS_CA_FILE is set but REDIS_URL is not".into());
            }
            _ => DirectoryConfig::Memory,
        };
        if let Some(addr) = &self.advertise_addr
            && addr
                .rsplit_once(':')
                .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
        {
            return err(format!("RELAY_ADVERTISE_ADDR {addr:?} must be host:port"));
        }
        let policy = match self.auth_policy {
            AuthPolicy::Claims => Policy::Claims,
            AuthPolicy::Org if self.org_claim.is_empty() => {
                return err("RELAY_ORG_CLAIM must name a claim".into());
            }
            AuthPolicy::Org => Policy::Org {
                claim: self.org_claim,
            },
        };
        let access_check = match self.access_check_url.filter(|u| !u.is_empty()) {
            None => None,
            Some(template) => {
                let sample = template.replace("{hostId}", "org%3Amachine");
                let usable = sample.parse::<http::Uri>().is_ok_and(|uri| {
                    matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some()
                });
                if !usable || !template.contains("{hostId}") {
                    return err(format!(
                        "RELAY_ACCESS_CHECK_URL {template:?} must be an http:// or https:// URL \
                         with {{hostId}} where the hostId goes"
                    ));
                }
                let allow_pointer = self.access_check_allow_pointer.filter(|p| !p.is_empty());
                if let Some(pointer) = &allow_pointer
                    && !pointer.starts_with('/')
                {
                    return err(format!(
                        "RELAY_ACCESS_CHECK_ALLOW_POINTER {pointer:?} must be a JSON pointer \
                         (starting with /)"
                    ));
                }
                Some(AccessCheck {
                    url_template: template,
                    allow_pointer,
                })
            }
        };
        let base_domain = match self.base_domain.filter(|d| !d.is_empty()) {
            Some(domain) => Some(parse_base_domain(&domain).map_err(ConfigError)?),
            None if self.dev => Some(std::sync::Arc::from("localhost")),
            None => None,
        };
        let tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => {
                let files = crate::tls::TlsFiles { cert, key };
                // Fail now, not at the first handshake.
                files.load().map_err(ConfigError)?;
                Some(files)
            }
            (None, None) => None,
            _ => {
                return err(
                    "RELAY_TLS_CERT and RELAY_TLS_KEY go together: set both, or neither".to_owned(),
                );
            }
        };
        let fetch_ca = match &self.fetch_ca_file {
            Some(path) => Some(read_ca_file("RELAY_FETCH_CA_FILE", path).map_err(ConfigError)?),
            None => None,
        };
        // `--dev` makes (and keeps) an admin token unless one is given.
        let keys_admin = match &keys {
            KeySource::Dev(dev) => Some(dev.admin_token.clone()),
            _ => None,
        };
        let config = Config {
            listen: SocketAddr::new(self.bind, self.port),
            access_check,
            fetch_ca,
            owner,
            app_name,
            keys,
            jwt_issuer: self.jwt_issuer.filter(|s| !s.is_empty()),
            jwt_audience: self.jwt_audience.filter(|s| !s.is_empty()),
            policy,
            limits,
            log_format: self.log_format,
            access_log: self.access_log,
            directory,
            routing,
            advertise_addr: self.advertise_addr,
            reconcile_interval: positive("RELAY_RECONCILE_INTERVAL", self.reconcile_interval)?,
            drain_grace: self.drain_grace,
            drain_deadline: positive("RELAY_DRAIN_DEADLINE", self.drain_deadline)?,
            admission_rate: std::num::NonZeroU32::new(self.admission_rate)
                .ok_or_else(|| ConfigError("RELAY_ADMISSION_RATE must be at least 1".into()))?,
            admission_burst: std::num::NonZeroU32::new(self.admission_burst)
                .ok_or_else(|| ConfigError("RELAY_ADMISSION_BURST must be at least 1".into()))?,
            admin_token: match &keys_admin {
                Some(dev) => Some(dev.clone()),
                None => self.admin_token.filter(|t| !t.0.is_empty()),
            },
            client_ip_header,
            base_domain,
            tls,
        };
        if let Some(token) = &config.admin_token
            && token.0.len() < MIN_SECRET_BYTES
        {
            return err(format!(
                "RELAY_ADMIN_TOKEN must be at least {MIN_SECRET_BYTES} bytes"
            ));
        }
        if config.drain_grace + crate::limits::DRAIN_CLOSE_WAIT >= config.drain_deadline {
            return err(format!(
                "RELAY_DRAIN_GRACE ({:?}) plus the close wait ({:?}) must fit in \
                 RELAY_DRAIN_DEADLINE ({:?})",
                config.drain_grace,
                crate::limits::DRAIN_CLOSE_WAIT,
                config.drain_deadline
            ));
        }
        // Fail now, not on the first request, if the key is unusable.
        config.verifier()?;
        Ok(config)
    }
}

/// `--base-domain`, lowercase, without dots at either end: a DNS name (letters, digits,
/// `-`, labels separated by dots).
fn parse_base_domain(domain: &str) -> Result<std::sync::Arc<str>, String> {
    let domain = domain.trim_matches('.').to_ascii_lowercase();
    let label_ok = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if domain.is_empty() || domain.len() > 253 || !domain.split('.').all(label_ok) {
        return Err(format!(
            "RELAY_BASE_DOMAIN {domain:?} is not a domain name (letters, digits and '-' in \
             dot-separated labels, e.g. relay.example.com)"
        ));
    }
    Ok(std::sync::Arc::from(domain))
}

impl Config {
    /// The address peers forward to, given the address actually bound.
    pub fn advertise_addr(&self, bound: SocketAddr) -> String {
        if let Some(addr) = &self.advertise_addr {
            return addr.clone();
        }
        if let Some(app) = &self.app_name {
            return format!(
                "{}.vm.{app}.internal:{}",
                self.owner.machine_id,
                bound.port()
            );
        }
        let ip = match bound.ip() {
            ip if ip.is_unspecified() && ip.is_ipv6() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip if ip.is_unspecified() => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            ip => ip,
        };
        SocketAddr::new(ip, bound.port()).to_string()
    }

    /// The token verifier for this configuration.
    ///
    /// # Errors
    /// When a public key file does not hold a usable key.
    pub fn verifier(&self) -> Result<Verifier, ConfigError> {
        let verifier = match &self.keys {
            KeySource::Secret(secret) => Ok(Verifier::hs256(secret.expose())),
            KeySource::Dev(dev) => Ok(Verifier::hs256(dev.secret.expose()).in_dev_mode()),
            KeySource::Jwks(url) => Ok(Verifier::jwks(url.clone())),
            KeySource::PublicKey {
                path,
                pem,
                algorithm,
            } => Verifier::from_public_pem(pem, algorithm.map(Into::into)).map_err(|e| {
                ConfigError(format!("RELAY_JWT_PUBLIC_KEY_FILE {}: {e}", path.display()))
            }),
        }?;
        Ok(verifier
            .expecting(self.jwt_issuer.clone(), self.jwt_audience.clone())
            .with_policy(self.policy.clone())
            .with_access_check(self.access_check.clone()))
    }
}

/// `msg` with each environment variable of `command`'s flags it names written as the
/// flag and the variable, since a user may have typed either: `RELAY_PING_INTERVAL must be
/// greater than zero` → `--ping-interval (RELAY_PING_INTERVAL) must be greater than zero`.
pub(crate) fn name_flags(command: &clap::Command, msg: &str) -> String {
    let flags: std::collections::HashMap<String, String> = command
        .get_arguments()
        .filter_map(|arg| {
            let env = arg.get_env()?.to_str()?.to_owned();
            Some((env, arg.get_long()?.to_owned()))
        })
        .collect();
    let mut out = String::with_capacity(msg.len() + 32);
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        match flags.get(word.as_str()) {
            Some(long) => {
                out.push_str("--");
                out.push_str(long);
                out.push_str(" (");
                out.push_str(word);
                out.push(')');
            }
            None => out.push_str(word),
        }
        word.clear();
    };
    for c in msg.chars() {
        if c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_' {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

/// A machine id derived from the hostname: stable across restarts of the same machine,
/// restricted to the characters an owner value allows.
fn default_machine_id() -> String {
    let hostname = gethostname::gethostname().to_string_lossy().to_lowercase();
    let id: String = hostname
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    let id = id.trim_matches('-').to_owned();
    if id.is_empty() { "relay".into() } else { id }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: ServeArgs,
    }

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["relay"];
        argv.extend_from_slice(args);
        Wrapper::try_parse_from(argv).unwrap().args.into_config()
    }

    #[test]
    fn errors_name_the_flag_and_its_variable() {
        let err = parse(&[
            "--jwt-secret",
            "0123456789abcdef",
            "--machine-id",
            "m1",
            "--ping-interval",
            "0s",
        ])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("--ping-interval (RELAY_PING_INTERVAL) must be greater than zero"),
            "{err}"
        );
        use clap::Args as _;
        let command = ServeArgs::augment_args(clap::Command::new("serve"));
        assert_eq!(
            name_flags(
                &command,
                "REDIS_URL and RELAY_REDIS_CA_FILE; RELAY_NOT_A_FLAG"
            ),
            "--redis-url (REDIS_URL) and --redis-ca-file (RELAY_REDIS_CA_FILE); RELAY_NOT_A_FLAG"
        );
    }

    #[test]
    fn a_base_domain_is_a_lowercased_dns_name_or_a_named_error() {
        let base = |domain: &str| {
            parse(&[
                "--jwt-secret",
                "0123456789abcdef",
                "--machine-id",
                "m1",
                "--base-domain",
                domain,
            ])
        };
        let config = base(".Relay.Example.COM.").unwrap();
        assert_eq!(config.base_domain.as_deref(), Some("relay.example.com"));
        for bad in [
            "relay..example.com",
            "relay_x.com",
            "*.relay.com",
            "a/b",
            ".",
        ] {
            let err = base(bad).unwrap_err().to_string();
            assert!(
                err.contains("--base-domain (RELAY_BASE_DOMAIN)") && err.contains("domain name"),
                "{bad}: {err}"
            );
        }
        let config = parse(&["--jwt-secret", "0123456789abcdef", "--machine-id", "m1"]).unwrap();
        assert_eq!(config.base_domain, None, "off unless asked for (or --dev)");
    }

    #[test]
    fn defaults_listen_dual_stack_on_8080() {
        let config = parse(&["--jwt-secret", "0123456789abcdef", "--machine-id", "m1"]).unwrap();
        assert_eq!(config.listen.to_string(), "[::]:8080");
        assert_eq!(config.owner.to_string(), "local:m1");
        assert_eq!(config.limits, Limits::default());
    }

    #[test]
    fn ca_files_need_a_readable_pem_with_a_certificate_and_redis_a_tls_url() {
        let dir = std::env::temp_dir().join(format!("relay-ca-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "no certificate in here\n").unwrap();
        let missing = dir.join("missing.pem");
        let base = ["--jwt-secret", "0123456789abcdef", "--machine-id", "m1"];
        let cases: [(&[&str], &str); 6] = [
            (
                &["--fetch-ca-file", empty.to_str().unwrap()],
                "RELAY_FETCH_CA_FILE",
            ),
            (
                &["--fetch-ca-file", missing.to_str().unwrap()],
                "cannot read --fetch-ca-file (RELAY_FETCH_CA_FILE)",
            ),
            (
                &[
                    "--redis-url",
                    "redis://r:6379",
                    "--redis-ca-file",
                    empty.to_str().unwrap(),
                ],
                "needs a rediss:// --redis-url (REDIS_URL)",
            ),
            (
                &["--redis-ca-file", empty.to_str().unwrap()],
                "--redis-url (REDIS_URL) is not",
            ),
            (
                &[
                    "--redis-url",
                    "rediss://r:6379",
                    "--redis-ca-file",
                    missing.to_str().unwrap(),
                ],
                "cannot read --redis-ca-file (RELAY_REDIS_CA_FILE)",
            ),
            (
                &[
                    "--redis-url",
                    "rediss://r:6379",
                    "--redis-ca-file",
                    empty.to_str().unwrap(),
                ],
                "holds no certificate",
            ),
        ];
        for (extra, expected) in cases {
            let args: Vec<&str> = base.iter().chain(extra).copied().collect();
            let err = parse(&args).unwrap_err().to_string();
            assert!(err.contains(expected), "{extra:?}: {err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn no_key_and_no_dev_is_refused_with_the_reason() {
        let err = parse(&["--machine-id", "m1"]).unwrap_err().to_string();
        assert!(err.contains("RELAY_JWT_SECRET"), "{err}");
        assert!(err.contains("--dev"), "{err}");
    }

    #[test]
    fn zero_durations_and_bad_identities_are_refused() {
        let base = ["--jwt-secret", "0123456789abcdef", "--machine-id", "m1"];
        for extra in [
            &["--ping-interval", "0s"][..],
            &["--exchange-timeout", "0s"],
            &["--max-pending", "0"],
            &["--region", "a:b"],
            &["--directory-ttl", "10s", "--ping-interval", "30s"],
        ] {
            let mut args = base.to_vec();
            args.extend_from_slice(extra);
            assert!(parse(&args).is_err(), "{extra:?} accepted");
        }
    }

    #[test]
    fn secret_is_masked_in_debug_output() {
        let config = parse(&["--jwt-secret", "0123456789abcdef-very-secret"]).unwrap();
        assert!(!format!("{config:?}").contains("very-secret"));
    }
}
