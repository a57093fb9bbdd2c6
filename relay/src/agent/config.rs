//! Configuration of `relay agent`: flags, their environment variables, and validation.
//!
//! As for `relay serve`, everything is checked before the agent starts; a bad value ends
//! the process with exit code 64 and a message naming the setting. The token itself is
//! never printed: `Debug` masks it and messages name the token *file*.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::backoff::Policy;
use crate::config::{ConfigError, Secret};
use crate::host_id::HostId;
use crate::telemetry::LogFormat;

/// Flags of `relay agent`. Every flag can also be set from the environment variable
/// named in its help.
#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    /// Relay base URL(s), comma-separated: `ws://`, `wss://`, `http://` (→ ws) or
    /// `https://` (→ wss), then `host[:port][/prefix]`. The agent connects to
    /// `<base>/tunnel?hostId=<id>` and moves to the next URL after each failure.
    #[arg(
        long = "relay",
        env = "RELAY_URL",
        value_delimiter = ',',
        required = true
    )]
    pub relays: Vec<String>,

    /// The hostId to register ([A-Za-z0-9._-], 1 to 128 characters).
    #[arg(long, env = "RELAY_HOST_ID")]
    pub host_id: String,

    /// File holding the host token (surrounding whitespace ignored). Read again before
    /// every connect attempt, so a rotated token is picked up without a restart.
    #[arg(long, env = "RELAY_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,

    /// The host token itself (prefer --token-file: a command line is visible to every
    /// local user).
    #[arg(
        long,
        env = "RELAY_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    pub token: Option<Secret>,

    /// Base URL of the local service, e.g. `http://127.0.0.1:3000`, or `h2c://host:port`
    /// for a service that speaks HTTP/2 without TLS (gRPC). WebSocket channels go to the
    /// same host:port over `ws://`.
    #[arg(long = "to", env = "RELAY_UPSTREAM")]
    pub upstream: String,

    /// Tunnel protocol: `auto` (h2 when the relay offers it, else v1), `h2` (HTTP/2 in
    /// the tunnel: streamed bodies, flow control; refuse a relay without it) or `v1`
    /// (JSON messages, bodies whole).
    #[arg(long, env = "RELAY_AGENT_PROTOCOL", value_enum, default_value_t = ProtocolChoice::Auto)]
    pub protocol: ProtocolChoice,

    /// Serve the agent's status as JSON at GET /status on this address: `port` or
    /// `:port` (loopback), or `ip:port`.
    #[arg(long, env = "RELAY_AGENT_STATUS_ADDR")]
    pub status_addr: Option<String>,

    /// First step of the exponential reconnect backoff.
    #[arg(long, env = "RELAY_AGENT_BACKOFF_BASE", value_parser = humantime::parse_duration,
          default_value = "1s")]
    pub backoff_base: Duration,

    /// Longest reconnect wait after transport failures.
    #[arg(long, env = "RELAY_AGENT_BACKOFF_CAP", value_parser = humantime::parse_duration,
          default_value = "5s")]
    pub backoff_cap: Duration,

    /// Longest reconnect wait after the relay refused the token (401/403, close 1008).
    #[arg(long, env = "RELAY_AGENT_AUTH_BACKOFF_CAP", value_parser = humantime::parse_duration,
          default_value = "60s")]
    pub auth_backoff_cap: Duration,

    /// Longest random delay before reconnecting after a relay drains.
    #[arg(long, env = "RELAY_AGENT_DRAIN_SPREAD", value_parser = humantime::parse_duration,
          default_value = "250ms")]
    pub drain_spread: Duration,

    /// A tunnel registered this long resets the reconnect backoff.
    #[arg(long, env = "RELAY_AGENT_STABLE_AFTER", value_parser = humantime::parse_duration,
          default_value = "10s")]
    pub stable_after: Duration,

    /// PEM CA certificates a `wss://` relay's certificate may chain to, besides the
    /// public web roots (a self-hosted relay with a private or self-signed CA).
    #[arg(long, env = "RELAY_AGENT_CA_FILE")]
    pub ca_file: Option<std::path::PathBuf>,

    /// Deadline of TCP connect + TLS + WebSocket upgrade.
    #[arg(long, env = "RELAY_AGENT_CONNECT_TIMEOUT", value_parser = humantime::parse_duration,
          default_value = "20s")]
    pub connect_timeout: Duration,

    /// Inbound silence (not even a ping) after which a tunnel is abandoned and replaced.
    #[arg(long, env = "RELAY_AGENT_SILENCE_TIMEOUT", value_parser = humantime::parse_duration,
          default_value = "75s")]
    pub silence_timeout: Duration,

    /// Longest Retry-After honoured (longer ones are clamped).
    #[arg(long, env = "RELAY_AGENT_MAX_RETRY_AFTER", value_parser = humantime::parse_duration,
          default_value = "1h")]
    pub max_retry_after: Duration,

    /// Log format.
    #[arg(long, env = "RELAY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Which tunnel protocol the agent asks for (`--protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProtocolChoice {
    /// `h2` when the relay offers it, else v1.
    Auto,
    /// `h2` only: a relay that does not offer it is a failed attempt.
    H2,
    /// v1 only.
    V1,
}

/// A validated agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The relays to rotate over, in order; never empty.
    pub relays: Vec<RelayUrl>,
    /// The hostId registered.
    pub host_id: HostId,
    /// Where the host token comes from.
    pub token: TokenSource,
    /// The local service.
    pub upstream: UpstreamUrl,
    /// The tunnel protocol asked for.
    pub protocol: ProtocolChoice,
    /// Where the status endpoint listens, if anywhere.
    pub status_addr: Option<SocketAddr>,
    /// The reconnect schedule.
    pub backoff: Policy,
    /// See [`crate::limits::agent::CONNECT_TIMEOUT`].
    pub connect_timeout: Duration,
    /// See [`crate::limits::agent::SILENCE_TIMEOUT`].
    pub silence_timeout: Duration,
    /// See [`crate::limits::agent::MAX_RETRY_AFTER`].
    pub max_retry_after: Duration,
    /// Log format.
    pub log_format: LogFormat,
    /// PEM CA certificates trusted for `wss://` relays besides the web roots.
    pub ca: Option<Vec<u8>>,
}

// === impl AgentArgs ===

impl AgentArgs {
    /// Validates the flags into an [`AgentConfig`].
    ///
    /// # Errors
    /// A [`ConfigError`] naming the setting (the flag and its environment variable) and
    /// what is wrong with it.
    pub fn into_config(self) -> Result<AgentConfig, ConfigError> {
        use clap::Args as _;
        let command = AgentArgs::augment_args(clap::Command::new("agent"));
        self.validate()
            .map_err(|ConfigError(msg)| ConfigError(crate::config::name_flags(&command, &msg)))
    }

    fn validate(self) -> Result<AgentConfig, ConfigError> {
        let err = |msg: String| ConfigError(msg);
        let relays = self
            .relays
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .map(|s| RelayUrl::parse(s).map_err(|e| err(format!("RELAY_URL {s:?}: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        if relays.is_empty() {
            return Err(err("RELAY_URL: give at least one relay URL".into()));
        }
        let host_id = HostId::parse(&self.host_id)
            .map_err(|e| err(format!("RELAY_HOST_ID {:?}: {e}", self.host_id)))?;
        let token = match (self.token, self.token_file) {
            (Some(token), None) => {
                if std::str::from_utf8(token.expose()).is_ok_and(|t| t.trim().is_empty()) {
                    return Err(err("RELAY_TOKEN is empty".into()));
                }
                TokenSource::Inline(token)
            }
            (None, Some(path)) => {
                // Fail fast on a typo; the file is read again before every attempt.
                std::fs::metadata(&path).map_err(|e| {
                    err(format!(
                        "cannot read RELAY_TOKEN_FILE {}: {e}",
                        path.display()
                    ))
                })?;
                TokenSource::File(path)
            }
            (None, None) => {
                return Err(err(
                    "no host token: set RELAY_TOKEN_FILE or RELAY_TOKEN".into()
                ));
            }
            (Some(_), Some(_)) => {
                return Err(err("set RELAY_TOKEN_FILE or RELAY_TOKEN, not both".into()));
            }
        };
        let upstream = UpstreamUrl::parse(&self.upstream)
            .map_err(|e| err(format!("RELAY_UPSTREAM {:?}: {e}", self.upstream)))?;
        let status_addr = self
            .status_addr
            .as_deref()
            .map(|s| {
                parse_status_addr(s).ok_or_else(|| {
                    err(format!(
                        "RELAY_AGENT_STATUS_ADDR {s:?}: expected port, :port or ip:port"
                    ))
                })
            })
            .transpose()?;

        let positive = |name: &str, d: Duration| {
            if d.is_zero() {
                Err(err(format!("{name} must be greater than zero")))
            } else {
                Ok(d)
            }
        };
        let base = positive("RELAY_AGENT_BACKOFF_BASE", self.backoff_base)?;
        let at_least_base = |name: &str, d: Duration| {
            if d < base {
                Err(err(format!(
                    "{name} ({d:?}) must not be below RELAY_AGENT_BACKOFF_BASE ({base:?})"
                )))
            } else {
                Ok(d)
            }
        };
        let backoff = Policy {
            base,
            cap: at_least_base("RELAY_AGENT_BACKOFF_CAP", self.backoff_cap)?,
            auth_cap: at_least_base("RELAY_AGENT_AUTH_BACKOFF_CAP", self.auth_backoff_cap)?,
            drain_spread: self.drain_spread,
            stable_after: positive("RELAY_AGENT_STABLE_AFTER", self.stable_after)?,
            relays: u32::try_from(relays.len()).unwrap_or(u32::MAX),
        };
        Ok(AgentConfig {
            relays,
            host_id,
            token,
            upstream,
            protocol: self.protocol,
            status_addr,
            backoff,
            connect_timeout: positive("RELAY_AGENT_CONNECT_TIMEOUT", self.connect_timeout)?,
            silence_timeout: positive("RELAY_AGENT_SILENCE_TIMEOUT", self.silence_timeout)?,
            max_retry_after: self.max_retry_after,
            log_format: self.log_format,
            ca: match &self.ca_file {
                Some(path) => Some(
                    crate::config::read_ca_file("RELAY_AGENT_CA_FILE", path)
                        .map_err(ConfigError)?,
                ),
                None => None,
            },
        })
    }
}

/// `port`, `:port` (both on loopback: the status is for the operator of this machine) or
/// an explicit `ip:port`.
fn parse_status_addr(s: &str) -> Option<SocketAddr> {
    let s = s.trim();
    let port = s.strip_prefix(':').unwrap_or(s);
    if let Ok(port) = port.parse::<u16>() {
        return Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    s.parse().ok()
}

/// Where the host token comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `--token`: fixed for the life of the process.
    Inline(Secret),
    /// `--token-file`: read again before every connect attempt.
    File(PathBuf),
}

/// Why the token could not be had. Names the file, never the content.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The file could not be read.
    #[error("cannot read token file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file (or flag) holds nothing but whitespace.
    #[error("token {0} is empty")]
    Empty(String),
    /// The token has characters an HTTP header cannot carry.
    #[error("token {0} holds characters not allowed in an Authorization header")]
    Invalid(String),
}

// === impl TokenSource ===

impl TokenSource {
    /// The current token, trimmed.
    ///
    /// # Errors
    /// When the file cannot be read or holds no token.
    pub async fn read(&self) -> Result<Secret, TokenError> {
        let text = match self {
            TokenSource::Inline(secret) => String::from_utf8_lossy(secret.expose()).into_owned(),
            TokenSource::File(path) => {
                tokio::fs::read_to_string(path)
                    .await
                    .map_err(|source| TokenError::Read {
                        path: path.clone(),
                        source,
                    })?
            }
        };
        let token = text.trim();
        if token.is_empty() {
            return Err(TokenError::Empty(self.to_string()));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenError::Invalid(self.to_string()));
        }
        token
            .parse()
            .map_err(|_: String| TokenError::Invalid(self.to_string()))
    }
}

/// How logs name the token: the file path, or "from RELAY_TOKEN"; never its content.
impl fmt::Display for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::Inline(_) => f.write_str("from RELAY_TOKEN/--token"),
            TokenSource::File(path) => write!(f, "file {}", path.display()),
        }
    }
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::Inline(_) => f.write_str("Inline(MASKED)"),
            TokenSource::File(path) => f.debug_tuple("File").field(path).finish(),
        }
    }
}

/// A relay base URL, normalized to `ws://` or `wss://` without a trailing slash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayUrl {
    base: String,
}

// === impl RelayUrl ===

impl RelayUrl {
    /// Parses `ws://`, `wss://`, `http://` (→ ws) or `https://` (→ wss) `host[:port][/prefix]`.
    ///
    /// ```
    /// use relay::agent::config::RelayUrl;
    /// let url = RelayUrl::parse("https://relay.example.com/").unwrap();
    /// assert_eq!(url.to_string(), "wss://relay.example.com");
    /// ```
    ///
    /// # Errors
    /// When the scheme is not one of those, the host is missing, or there is a query or
    /// fragment (the agent adds its own query).
    pub fn parse(s: &str) -> Result<RelayUrl, String> {
        let (scheme, rest) = s
            .split_once("://")
            .ok_or("expected ws://, wss://, http:// or https://")?;
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "ws" | "http" => "ws",
            "wss" | "https" => "wss",
            other => return Err(format!("unsupported scheme {other:?}")),
        };
        if rest.contains(['?', '#']) {
            return Err("a relay URL takes no query or fragment".into());
        }
        let base = format!("{scheme}://{}", rest.trim_end_matches('/'));
        let uri: http::Uri = base.parse().map_err(|e| format!("{e}"))?;
        let authority = uri.authority().ok_or("no host")?;
        if authority.host().is_empty() {
            return Err("no host".into());
        }
        if authority.as_str().contains('@') {
            return Err("credentials in the URL are not supported: use the token".into());
        }
        Ok(RelayUrl { base })
    }

    /// Where clients reach `host` through this relay: `http(s)://<relay>[/prefix]/hosts/<host>/`.
    ///
    /// ```
    /// use relay::agent::config::RelayUrl;
    /// use relay::host_id::HostId;
    /// let url = RelayUrl::parse("wss://relay.example.com/r").unwrap();
    /// let host = HostId::parse("demo").unwrap();
    /// assert_eq!(url.public_url(&host), "https://relay.example.com/r/hosts/demo/");
    /// ```
    pub fn public_url(&self, host: &HostId) -> String {
        let http = match self.base.strip_prefix("wss://") {
            Some(rest) => format!("https://{rest}"),
            None => format!("http://{}", self.base.trim_start_matches("ws://")),
        };
        format!("{http}/hosts/{host}/")
    }

    /// Where `host` is reached at the root of its own name when the relay serves hosts
    /// on subdomains of `domain`: `http(s)://<host>.<domain>[:port]/`, the scheme and
    /// port this relay URL's. `None` for a hostId that browsers cannot ask for in a host
    /// name (capitals, `_`, `:`, `.`; see README "Subdomains").
    ///
    /// ```
    /// use relay::agent::config::RelayUrl;
    /// use relay::host_id::HostId;
    /// let demo = HostId::parse("demo").unwrap();
    /// let fly = RelayUrl::parse("wss://relay.example.com").unwrap();
    /// assert_eq!(
    ///     fly.subdomain_url(&demo, "relay.example.com").as_deref(),
    ///     Some("https://demo.relay.example.com/")
    /// );
    /// let local = RelayUrl::parse("ws://127.0.0.1:8080").unwrap();
    /// assert_eq!(
    ///     local.subdomain_url(&demo, "localhost").as_deref(),
    ///     Some("http://demo.localhost:8080/")
    /// );
    /// let org = HostId::parse("org:m1").unwrap();
    /// assert_eq!(fly.subdomain_url(&org, "relay.example.com"), None);
    /// let caps = HostId::parse("Demo").unwrap();
    /// assert_eq!(fly.subdomain_url(&caps, "relay.example.com"), None);
    /// ```
    pub fn subdomain_url(&self, host: &HostId, domain: &str) -> Option<String> {
        let label = host.as_str();
        let dns_label = label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !dns_label || domain.is_empty() {
            return None;
        }
        let (scheme, rest) = match self.base.strip_prefix("wss://") {
            Some(rest) => ("https", rest),
            None => ("http", self.base.trim_start_matches("ws://")),
        };
        let authority = rest.split('/').next().unwrap_or(rest);
        let port = match authority.rsplit_once(':') {
            Some((_, port)) if port.bytes().all(|b| b.is_ascii_digit()) => format!(":{port}"),
            _ => String::new(),
        };
        Some(format!("{scheme}://{label}.{domain}{port}/"))
    }

    /// The tunnel endpoint for `host`: `<base>/tunnel?hostId=<host>`. A valid hostId needs
    /// no escaping.
    pub fn tunnel_url(&self, host: &HostId) -> String {
        format!("{}/tunnel?hostId={host}", self.base)
    }
}

impl fmt::Display for RelayUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.base)
    }
}

/// The local service: `http://host:port[/prefix]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    authority: String,
    prefix: String,
    /// `h2c://`: the service speaks HTTP/2 with prior knowledge.
    h2c: bool,
}

// === impl UpstreamUrl ===

impl UpstreamUrl {
    /// Parses an `http://` or `h2c://` base URL (a prefix path is kept; trailing slashes
    /// are not).
    ///
    /// # Errors
    /// When it is not `http://host[:port][/prefix]` or `h2c://host[:port][/prefix]`.
    pub fn parse(s: &str) -> Result<UpstreamUrl, String> {
        let uri: http::Uri = s.trim().parse().map_err(|e| format!("{e}"))?;
        let h2c = match uri.scheme_str() {
            Some(scheme) if scheme.eq_ignore_ascii_case("http") => false,
            Some(scheme) if scheme.eq_ignore_ascii_case("h2c") => true,
            Some(scheme) if scheme.eq_ignore_ascii_case("https") => {
                return Err(
                    "https upstreams are not supported: the upstream is local, use http://".into(),
                );
            }
            _ => return Err("expected http://host:port or h2c://host:port".into()),
        };
        let authority = uri.authority().ok_or("no host")?;
        if authority.host().is_empty() || authority.as_str().contains('@') {
            return Err("expected http://host:port".into());
        }
        if uri.query().is_some() {
            return Err("an upstream URL takes no query".into());
        }
        Ok(UpstreamUrl {
            authority: authority.as_str().to_owned(),
            prefix: uri.path().trim_end_matches('/').to_owned(),
            h2c,
        })
    }

    /// Whether the service speaks HTTP/2 with prior knowledge (`h2c://`).
    pub fn is_h2c(&self) -> bool {
        self.h2c
    }

    /// `host:port` of the service.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// The path every request's path goes under (`""` when there is none).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The URL of a request for `path` (host-local path plus `?query`, as the relay sent it).
    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{}{}", self.authority, self.prefix, rooted(path))
    }

    /// The URL of a WebSocket channel for `path` and `query` (without `?`).
    pub fn ws_url(&self, path: &str, query: Option<&str>) -> String {
        let mut url = format!("ws://{}{}{}", self.authority, self.prefix, rooted(path));
        if let Some(query) = query.filter(|q| !q.is_empty()) {
            url.push('?');
            url.push_str(query);
        }
        url
    }
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.h2c { "h2c" } else { "http" };
        write!(f, "{scheme}://{}{}", self.authority, self.prefix)
    }
}

/// `path` with a leading slash (the relay always sends one; be safe anyway).
fn rooted(path: &str) -> std::borrow::Cow<'_, str> {
    if path.starts_with('/') {
        path.into()
    } else {
        format!("/{path}").into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::agent as limits;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: AgentArgs,
    }

    /// Parses a minimal valid command line with `extra` added; a flag in `extra` replaces
    /// the minimal one (`--token-file` replaces `--token`).
    fn parse(extra: &[&str]) -> Result<AgentConfig, String> {
        let base = [
            ("--relay", "ws://127.0.0.1:1"),
            ("--host-id", "h1"),
            ("--to", "http://127.0.0.1:2"),
            ("--token", "t0ken"),
        ];
        let mut argv = vec!["agent"];
        for (flag, value) in base {
            let overridden =
                extra.contains(&flag) || (flag == "--token" && extra.contains(&"--token-file"));
            if !overridden {
                argv.extend([flag, value]);
            }
        }
        argv.extend_from_slice(extra);
        Wrapper::try_parse_from(argv)
            .map_err(|e| e.to_string())?
            .args
            .into_config()
            .map_err(|e| e.to_string())
    }

    fn host() -> HostId {
        HostId::parse("demo").unwrap()
    }

    #[test]
    fn http_becomes_ws_and_https_becomes_wss() {
        let cases = [
            ("http://relay:8080", "ws://relay:8080/tunnel?hostId=demo"),
            (
                "https://relay.example.com",
                "wss://relay.example.com/tunnel?hostId=demo",
            ),
            ("ws://relay", "ws://relay/tunnel?hostId=demo"),
            ("WSS://relay:443", "wss://relay:443/tunnel?hostId=demo"),
            ("HTTPS://relay", "wss://relay/tunnel?hostId=demo"),
        ];
        for (input, want) in cases {
            assert_eq!(
                RelayUrl::parse(input).unwrap().tunnel_url(&host()),
                want,
                "{input}"
            );
        }
    }

    #[test]
    fn trailing_slashes_and_prefixes() {
        let cases = [
            ("http://relay/", "ws://relay/tunnel?hostId=demo"),
            ("http://relay///", "ws://relay/tunnel?hostId=demo"),
            ("https://edge/relay/", "wss://edge/relay/tunnel?hostId=demo"),
            ("ws://[::1]:9000/", "ws://[::1]:9000/tunnel?hostId=demo"),
        ];
        for (input, want) in cases {
            assert_eq!(
                RelayUrl::parse(input).unwrap().tunnel_url(&host()),
                want,
                "{input}"
            );
        }
    }

    #[test]
    fn bad_relay_urls_are_refused() {
        for bad in [
            "relay:8080",
            "ftp://relay",
            "http://",
            "ws://relay/?x=1",
            "ws://relay/#f",
            "ws://user:pw@relay",
        ] {
            assert!(RelayUrl::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn several_relays_comma_separated() {
        let config = parse(&["--relay", "http://a:1, https://b/,ws://c:3"]).unwrap();
        let urls: Vec<String> = config.relays.iter().map(ToString::to_string).collect();
        assert_eq!(urls, ["ws://a:1", "wss://b", "ws://c:3"]);
        assert_eq!(config.backoff.relays, 3);
    }

    #[test]
    fn upstream_urls() {
        let up = UpstreamUrl::parse("http://127.0.0.1:3000/").unwrap();
        assert_eq!(up.http_url("/a?b=1"), "http://127.0.0.1:3000/a?b=1");
        assert_eq!(up.ws_url("/ws", Some("x=1")), "ws://127.0.0.1:3000/ws?x=1");
        assert_eq!(up.ws_url("/ws", Some("")), "ws://127.0.0.1:3000/ws");
        let up = UpstreamUrl::parse("http://svc:80/app/").unwrap();
        assert_eq!(up.http_url("/"), "http://svc:80/app/");
        assert_eq!(up.ws_url("ws", None), "ws://svc:80/app/ws");
        for bad in ["https://x", "127.0.0.1:3000", "http://x?y", "ws://x"] {
            assert!(UpstreamUrl::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn defaults_match_the_limits() {
        let config = parse(&[]).unwrap();
        assert_eq!(config.backoff.base, limits::BACKOFF_BASE);
        assert_eq!(config.backoff.cap, limits::BACKOFF_CAP);
        assert_eq!(config.backoff.auth_cap, limits::AUTH_BACKOFF_CAP);
        assert_eq!(config.backoff.drain_spread, limits::DRAIN_SPREAD);
        assert_eq!(config.backoff.stable_after, limits::STABLE_AFTER);
        assert_eq!(config.connect_timeout, limits::CONNECT_TIMEOUT);
        assert_eq!(config.silence_timeout, limits::SILENCE_TIMEOUT);
        assert_eq!(config.max_retry_after, limits::MAX_RETRY_AFTER);
        assert_eq!(config.status_addr, None);
    }

    #[test]
    fn status_addr_is_loopback_unless_an_ip_is_given() {
        let at = |s: &str| parse(&["--status-addr", s]).unwrap().status_addr.unwrap();
        assert_eq!(at("9100").to_string(), "127.0.0.1:9100");
        assert_eq!(at(":9100").to_string(), "127.0.0.1:9100");
        assert_eq!(at("0.0.0.0:9100").to_string(), "0.0.0.0:9100");
        assert_eq!(at("[::1]:0").to_string(), "[::1]:0");
        assert!(parse(&["--status-addr", "nope"]).is_err());
    }

    #[test]
    fn invalid_settings_are_refused() {
        for extra in [
            &["--host-id", "a/b"][..],
            &["--backoff-base", "0s"],
            &["--backoff-cap", "500ms"],
            &["--auth-backoff-cap", "1ms"],
            &["--connect-timeout", "0s"],
            &["--silence-timeout", "0s"],
            &["--stable-after", "0s"],
            &["--to", "https://x"],
            &["--relay", " , "],
            &["--token-file", "/nonexistent/token"],
        ] {
            assert!(parse(extra).is_err(), "{extra:?} accepted");
        }
    }

    #[test]
    fn token_is_never_shown() {
        let config = parse(&["--token", "very-secret-token"]).unwrap();
        assert!(!format!("{config:?}").contains("very-secret"));
        assert!(!config.token.to_string().contains("very-secret"));
    }

    #[tokio::test]
    async fn token_file_is_trimmed_and_reread() {
        let dir = std::env::temp_dir().join(format!("relay-agent-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "  first\n").unwrap();
        let source = TokenSource::File(path.clone());
        assert_eq!(source.read().await.unwrap().expose(), b"first");
        std::fs::write(&path, "second\n").unwrap();
        assert_eq!(source.read().await.unwrap().expose(), b"second");
        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(source.read().await, Err(TokenError::Empty(_))));
        std::fs::remove_file(&path).unwrap();
        let err = source.read().await.unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        let _ = std::fs::remove_dir(&dir);
    }
}
