//! The shared directory, in Redis: every machine of the fleet publishes the hosts whose
//! tunnels it holds, so a request landing anywhere can be routed to the owner.
//!
//! # Key layout
//! With the default prefix [`DEFAULT_PREFIX`] (`relay:`):
//!
//! | Key | Type | Value | Expiry |
//! |---|---|---|---|
//! | `relay:host:<hostId>` | string | owner, `region:machineId` | `PX ttl`, refreshed by heartbeats |
//! | `relay:owned:<region:machineId>` | set | hostIds that owner registered | none (see the sweep) |
//! | `relay:addr:<region:machineId>` | string | address peers forward to | `PX ttl` of the advertisement |
//! | `relay:hop-key` | string | the relays' hop key ([`Directory::hop_key`]) | none |
//! | `relay:moving:<hostId>` | string | owner that let the host go while draining ([`Directory::retire`]) | `PX` the mark's lifetime |
//! | `relay:seen:<hostId>` | string | when the host was last seen, ms since the epoch (presence) | `PX` [`crate::limits::SEEN_TTL`] |
//!
//! hostIds and owners are restricted to `[A-Za-z0-9._-]` (plus the one `:` of an owner),
//! so keys need no escaping.
//!
//! # Liveness: one key per host with a native expiry
//! Each host is one string key whose value is its owner, written with `SET .. PX ttl` and
//! kept alive by heartbeats (`PEXPIRE`, only while the caller still owns it). The
//! alternative, one hash `hostId → owner` plus a sorted set of deadlines swept against a
//! client clock, is worse on every count that matters here:
//! - **No clock skew.** Redis expires the key on its own clock. With deadlines written as
//!   `now + ttl` by each machine and compared by a sweeper on another machine, a clock
//!   30 s ahead kills live entries early and one 30 s behind keeps dead ones.
//! - **Redis does the expiring.** An expired key is invisible at once (a `GET` never
//!   returns it) and its memory is reclaimed by Redis's own expiry cycle; a hash entry
//!   stays visible until someone sweeps it, so every lookup would also have to check the
//!   deadline.
//! - **Every operation is O(1)**: lookup is one `GET`, register/heartbeat touch one key and
//!   one set member. A sorted set makes each heartbeat an O(log N) `ZADD` on one key
//!   shared by the whole fleet.
//! - **No fleet-wide sweep.** Nobody has to scan the deadlines of every host of every
//!   machine (nor elect who does it): each machine only ever tidies its own index.
//!
//! # The per-machine index
//! `owned:<owner>` lists the hostIds an owner registered, so that clearing a machine
//! (shutdown, or a machine that restarted under the same id) costs O(entries it owns) and
//! never reads the rest of the directory. Set members cannot expire on their own (hash
//! field expiry only exists from Redis 7.4, not in every hosted Redis), so a member can
//! outlive its host key (expired, or taken by another machine). Such stale members are
//! harmless: every script re-checks the host key before acting on a member. They are
//! dropped by `register` (a host leaves the previous owner's index), `unregister`,
//! `heartbeat` and `reassert` (a host that is not the caller's leaves its index), and by
//! [`Directory::sweep`], a bounded walk of the caller's own index.
//!
//! # Scripts
//! Every write that touches more than one key is one Lua script (in a `.lua` file next
//! to this one), run by `EVALSHA` and reloaded automatically on `NOSCRIPT` (after a Redis
//! restart or `SCRIPT FLUSH`). A script runs atomically, so a future dropped half-way
//! leaves an operation done or not done, never half-done.
//!
//! # Deployments: one primary, no Redis Cluster
//! Scripts name some keys they compute from the prefix (the previous owner's index, the
//! host keys listed in an index) instead of declaring them in `KEYS`. That is only
//! correct when every key lives on one server: a single primary, with or without
//! replicas (Upstash, Fly Redis, a self-hosted Redis or Valkey). Redis Cluster is not
//! supported. Making it work would take a hash tag in the prefix (e.g. `{relay}:`), which
//! puts every key in one slot, hence on one shard: the cluster would add failure modes
//! and no capacity. One primary is plenty: the directory holds ~100 bytes per host and
//! each tunnel costs one heartbeat per ping interval.
//!
//! # Connections, timeouts and outages
//! One multiplexed connection, through a `redis` [`ConnectionManager`] built *lazily*:
//! [`RedisDirectory::new`] never touches the network, so the relay boots whether Redis is
//! up or not. The first operation connects (each attempt bounded by [`CONNECT_TIMEOUT`],
//! retried [`CONNECT_RETRIES`] times). When a connection attempt fails or the connection
//! drops, that operation fails and the manager starts a new connection in the background
//! for the next ones; so a Redis that starts (or comes back) later is picked up without
//! restarting the relay. An operation that fails because the connection had dropped is
//! retried once on the new connection (all writes are idempotent in effect). Every
//! operation is bounded by [`OP_TIMEOUT`] as a whole, and each request by
//! [`RESPONSE_TIMEOUT`]; TCP keepalive and `TCP_USER_TIMEOUT` make the kernel drop a
//! connection to a peer that vanished (a response timeout alone does not replace the
//! connection). Failures map to [`DirectoryError::Unavailable`] or
//! [`DirectoryError::Timeout`]; a value that does not decode (not an owner, or a key of
//! the wrong type) to [`DirectoryError::Corrupt`].
//!
//! Not handled: a primary that becomes a replica behind the same address (writes fail
//! with `READONLY` until the connection drops).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::io::tcp::TcpSettings;
use ::redis::io::tcp::socket2::TcpKeepalive;
use ::redis::{
    Client, Cmd, FromRedisValue, IntoConnectionInfo, RedisError, RedisResult, Script,
    ScriptInvocation,
};
use async_trait::async_trait;
use tokio::time::timeout;
use tracing::{debug, warn};

use super::{Directory, DirectoryError, DirectoryPage, Owner};
use crate::host_id::HostId;

#[cfg(test)]
mod tests;

pub use crate::limits::redis::*;

/// The Lua scripts, hashed once.
struct Scripts {
    register: Script,
    unregister: Script,
    heartbeat: Script,
    clear_owned: Script,
    reassert: Script,
    sweep: Script,
    hop_key: Script,
    take_over: Script,
    retire: Script,
}

impl Scripts {
    fn load() -> Scripts {
        Scripts {
            register: Script::new(include_str!("register.lua")),
            unregister: Script::new(include_str!("unregister.lua")),
            heartbeat: Script::new(include_str!("heartbeat.lua")),
            clear_owned: Script::new(include_str!("clear_owned.lua")),
            reassert: Script::new(include_str!("reassert.lua")),
            sweep: Script::new(include_str!("sweep.lua")),
            hop_key: Script::new(include_str!("hop_key.lua")),
            take_over: Script::new(include_str!("take_over.lua")),
            retire: Script::new(include_str!("retire.lua")),
        }
    }
}

/// The directory in Redis, shared by every machine of the fleet. See the [module
/// docs](self) for the key layout and the design.
pub struct RedisDirectory {
    /// Cloned per operation (an `Arc` inside): all operations share one multiplexed
    /// connection, which the manager replaces when it drops.
    conn: ConnectionManager,
    /// Scripts, with their SHA1 for `EVALSHA`.
    scripts: Scripts,
    /// Prefix of every key; passed to scripts that compute key names.
    prefix: String,
    /// Lifetime of a host key without a heartbeat, in milliseconds (for `PX`/`PEXPIRE`).
    ttl_ms: u64,
    /// `host:port` of the server, for `Debug` (the URL may hold a password).
    server: String,
    /// The `SSCAN` cursor of the sweep of each owner's index, between calls. std Mutex:
    /// only read and written around an await, never held across one. Lost on restart,
    /// which only restarts the walk.
    sweep_cursors: Mutex<HashMap<Owner, String>>,
}

// === impl RedisDirectory ===

impl RedisDirectory {
    /// A directory in the Redis at `url` (`redis://[[user]:password@]host[:port][/db]`,
    /// or `rediss://` for TLS verified against the public web roots), keys starting with
    /// `prefix`, host entries living `ttl` without a heartbeat.
    ///
    /// Lazy: nothing is sent until the first operation, so this returns at once whether
    /// Redis is up or not, and a Redis that starts later is used without a restart (see
    /// the [module docs](self)). Use [`RedisDirectory::ping`] to check it at boot.
    ///
    /// # Errors
    /// [`DirectoryError::Unavailable`] when `url` is not a valid Redis URL.
    ///
    /// # Panics
    /// Outside a Tokio runtime (the connection manager spawns a task).
    pub fn new(url: &str, prefix: &str, ttl: Duration) -> Result<RedisDirectory, DirectoryError> {
        RedisDirectory::with_tls_ca(url, prefix, ttl, None)
    }

    /// [`RedisDirectory::new`], where a `rediss://` server must chain to one of the
    /// certificates in `tls_ca` (PEM) instead of the public web roots, when given.
    ///
    /// # Errors
    /// [`DirectoryError::Unavailable`] when `url` is not a valid Redis URL, or `tls_ca`
    /// is given for a `redis://` URL or holds no usable certificate.
    ///
    /// # Panics
    /// Outside a Tokio runtime (the connection manager spawns a task).
    pub fn with_tls_ca(
        url: &str,
        prefix: &str,
        ttl: Duration,
        tls_ca: Option<&[u8]>,
    ) -> Result<RedisDirectory, DirectoryError> {
        let invalid =
            |err: RedisError| DirectoryError::Unavailable(format!("invalid Redis URL: {err}"));
        let info = url.into_connection_info().map_err(invalid)?;
        let server = info.addr().to_string();
        let info = info.set_tcp_settings(tcp_settings());
        let client = match tls_ca {
            None => Client::open(info).map_err(invalid)?,
            Some(pem) => {
                let certificates = ::redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.to_vec()),
                };
                Client::build_with_tls(info, certificates).map_err(|err| {
                    DirectoryError::Unavailable(format!("cannot use the Redis TLS CA: {err}"))
                })?
            }
        };
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(CONNECT_RETRIES)
            .set_min_delay(RECONNECT_MIN_DELAY)
            .set_max_delay(RECONNECT_MAX_DELAY);
        let conn = ConnectionManager::new_lazy_with_config(client, config).map_err(|err| {
            DirectoryError::Unavailable(format!("cannot set up the Redis connection: {err}"))
        })?;
        Ok(RedisDirectory {
            conn,
            scripts: Scripts::load(),
            prefix: prefix.to_owned(),
            ttl_ms: millis(ttl),
            server,
            sweep_cursors: Mutex::new(HashMap::new()),
        })
    }

    /// [`RedisDirectory::new`], then a [`RedisDirectory::ping`]: an error within
    /// [`OP_TIMEOUT`] when Redis cannot be reached. The caller that wants to boot anyway
    /// (and heal when Redis comes up) should use `new` and log a failed `ping` instead.
    ///
    /// # Errors
    /// When `url` is invalid or Redis does not answer.
    ///
    /// # Cancel safety
    /// Safe: dropping it drops the directory.
    pub async fn connect(
        url: &str,
        prefix: &str,
        ttl: Duration,
    ) -> Result<RedisDirectory, DirectoryError> {
        let directory = RedisDirectory::new(url, prefix, ttl)?;
        directory.ping().await?;
        Ok(directory)
    }

    /// Checks that Redis answers (connecting if needed), within [`OP_TIMEOUT`].
    ///
    /// # Errors
    /// [`DirectoryError::Unavailable`] or [`DirectoryError::Timeout`].
    ///
    /// # Cancel safety
    /// Safe: it only reads.
    pub async fn ping(&self) -> Result<(), DirectoryError> {
        let reply: String = self.query("ping", &::redis::cmd("PING")).await?;
        if reply == "PONG" {
            Ok(())
        } else {
            Err(DirectoryError::Unavailable(format!(
                "unexpected PING reply {reply:?}"
            )))
        }
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn host_key(&self, host: &HostId) -> String {
        format!("{}host:{host}", self.prefix)
    }

    fn owned_key(&self, owner: &Owner) -> String {
        format!("{}owned:{owner}", self.prefix)
    }

    fn seen_key(&self, host: &HostId) -> String {
        format!("{}seen:{host}", self.prefix)
    }

    fn moving_key(&self, host: &HostId) -> String {
        format!("{}moving:{host}", self.prefix)
    }

    fn addr_key(&self, owner: &Owner) -> String {
        format!("{}addr:{owner}", self.prefix)
    }

    /// Runs `attempt` on the shared connection, once more if an established connection
    /// had dropped (the manager is already reconnecting by then), all within
    /// [`OP_TIMEOUT`].
    async fn run<T, F, Fut>(&self, op: &'static str, attempt: F) -> Result<T, DirectoryError>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let attempts = async {
            match attempt(self.conn.clone()).await {
                // Not when the connection was refused: the server is down, and the
                // manager has just tried (and retried) to connect.
                Err(err) if err.is_connection_dropped() && !err.is_connection_refusal() => {
                    debug!(op, %err, "Redis connection dropped; retrying once");
                    attempt(self.conn.clone()).await
                }
                result => result,
            }
        };
        match timeout(OP_TIMEOUT, attempts).await {
            Ok(result) => result.map_err(directory_error),
            Err(_) => Err(DirectoryError::Timeout(OP_TIMEOUT)),
        }
    }

    async fn query<T: FromRedisValue>(
        &self,
        op: &'static str,
        cmd: &Cmd,
    ) -> Result<T, DirectoryError> {
        self.run(
            op,
            |mut conn| async move { cmd.query_async(&mut conn).await },
        )
        .await
    }

    async fn eval<T: FromRedisValue>(
        &self,
        op: &'static str,
        script: &ScriptInvocation<'_>,
    ) -> Result<T, DirectoryError> {
        self.run(op, |mut conn| async move {
            script.invoke_async(&mut conn).await
        })
        .await
    }
}

impl fmt::Debug for RedisDirectory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisDirectory")
            .field("server", &self.server)
            .field("prefix", &self.prefix)
            .field("ttl_ms", &self.ttl_ms)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Directory for RedisDirectory {
    fn kind(&self) -> &'static str {
        "redis"
    }

    /// A previous value that is not an owner is overwritten and reported as no previous
    /// owner (with a warning): the write itself succeeded.
    async fn register(
        &self,
        host: &HostId,
        owner: &Owner,
    ) -> Result<Option<Owner>, DirectoryError> {
        let mut script = self.scripts.register.prepare_invoke();
        script
            .key(self.host_key(host))
            .key(self.owned_key(owner))
            .arg(owner.to_string())
            .arg(self.ttl_ms)
            .arg(host.as_str())
            .arg(&self.prefix)
            .key(self.seen_key(host))
            .arg(now_ms())
            .arg(millis(crate::limits::SEEN_TTL));
        let previous: Option<Vec<u8>> = self.eval("register", &script).await?;
        match previous.map(|value| decode_owner(&self.host_key(host), value)) {
            None => Ok(None),
            Some(Ok(previous)) => Ok(Some(previous)),
            Some(Err(err)) => {
                warn!(%host, error = %err, "overwrote a corrupt directory entry");
                Ok(None)
            }
        }
    }

    async fn unregister(&self, host: &HostId, owner: &Owner) -> Result<bool, DirectoryError> {
        let mut script = self.scripts.unregister.prepare_invoke();
        script
            .key(self.host_key(host))
            .key(self.owned_key(owner))
            .arg(owner.to_string())
            .arg(host.as_str());
        self.eval("unregister", &script).await
    }

    async fn lookup(&self, host: &HostId) -> Result<Option<Owner>, DirectoryError> {
        let key = self.host_key(host);
        let value: Option<Vec<u8>> = self.query("lookup", ::redis::cmd("GET").arg(&key)).await?;
        value.map(|value| decode_owner(&key, value)).transpose()
    }

    async fn lookup_many(&self, hosts: &[HostId]) -> Result<Vec<Option<Owner>>, DirectoryError> {
        if hosts.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = hosts.iter().map(|host| self.host_key(host)).collect();
        let values: Vec<Option<Vec<u8>>> = self
            .query("lookup_many", ::redis::cmd("MGET").arg(&keys))
            .await?;
        if values.len() != keys.len() {
            return Err(DirectoryError::Unavailable(format!(
                "MGET of {} keys answered {} values",
                keys.len(),
                values.len()
            )));
        }
        Ok(keys
            .iter()
            .zip(values)
            .map(|(key, value)| {
                value.and_then(|value| {
                    decode_owner(key, value)
                        .inspect_err(|err| warn!(error = %err, "ignored a corrupt directory entry"))
                        .ok()
                })
            })
            .collect())
    }

    /// One `SCAN` step over the host keys (`MATCH <prefix>host:*`), then one `MGET`.
    async fn list(&self, cursor: u64, count: usize) -> Result<DirectoryPage, DirectoryError> {
        let pattern = format!("{}host:*", glob_escape(&self.prefix));
        let (next, keys): (u64, Vec<String>) = self
            .query(
                "list",
                ::redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(count.max(1)),
            )
            .await?;
        if keys.is_empty() {
            return Ok(DirectoryPage {
                entries: Vec::new(),
                next,
            });
        }
        let values: Vec<Option<Vec<u8>>> =
            self.query("list", ::redis::cmd("MGET").arg(&keys)).await?;
        let host_prefix = format!("{}host:", self.prefix);
        let mut entries = Vec::with_capacity(keys.len());
        for (key, value) in keys.iter().zip(values) {
            // Gone since the SCAN (expired, removed): skipped.
            let Some(value) = value else { continue };
            let host = key
                .strip_prefix(&host_prefix)
                .and_then(|id| HostId::parse(id).ok());
            match (host, decode_owner(key, value)) {
                (Some(host), Ok(owner)) => entries.push((host, owner)),
                _ => warn!(%key, "ignored a corrupt directory entry"),
            }
        }
        Ok(DirectoryPage { entries, next })
    }

    async fn heartbeat(&self, host: &HostId, owner: &Owner) -> Result<bool, DirectoryError> {
        let mut script = self.scripts.heartbeat.prepare_invoke();
        script
            .key(self.host_key(host))
            .key(self.owned_key(owner))
            .arg(owner.to_string())
            .arg(self.ttl_ms)
            .arg(host.as_str())
            .key(self.seen_key(host))
            .arg(now_ms())
            .arg(millis(crate::limits::SEEN_TTL));
        self.eval("heartbeat", &script).await
    }

    async fn clear_owned(&self, owner: &Owner) -> Result<usize, DirectoryError> {
        let mut script = self.scripts.clear_owned.prepare_invoke();
        script
            .key(self.owned_key(owner))
            .arg(owner.to_string())
            .arg(&self.prefix);
        self.eval("clear_owned", &script).await
    }

    async fn retire(
        &self,
        owner: &Owner,
        hosts: Option<&[HostId]>,
        mark_for: Duration,
    ) -> Result<usize, DirectoryError> {
        if hosts.is_some_and(<[HostId]>::is_empty) {
            return Ok(0);
        }
        let mut script = self.scripts.retire.prepare_invoke();
        script
            .key(self.owned_key(owner))
            .arg(owner.to_string())
            .arg(&self.prefix)
            .arg(millis(mark_for));
        match hosts {
            None => {
                script.arg("all");
            }
            Some(hosts) => {
                script.arg("some");
                for host in hosts {
                    script.arg(host.as_str());
                }
            }
        }
        self.eval("retire", &script).await
    }

    async fn is_moving(&self, host: &HostId) -> Result<bool, DirectoryError> {
        let key = self.moving_key(host);
        self.query("is_moving", ::redis::cmd("EXISTS").arg(&key))
            .await
    }

    async fn last_seen_many(&self, hosts: &[HostId]) -> Result<Vec<Option<u64>>, DirectoryError> {
        if hosts.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = hosts.iter().map(|host| self.seen_key(host)).collect();
        let values: Vec<Option<String>> = self
            .query("last_seen_many", ::redis::cmd("MGET").arg(&keys))
            .await?;
        Ok(values
            .into_iter()
            .map(|value| value.and_then(|v| v.parse().ok()))
            .collect())
    }

    /// One step of an `SSCAN` walk over `owner`'s index: looks at about `limit` members
    /// and drops at most `limit` stale ones. The cursor is kept here between calls, so
    /// successive calls cover the whole index: a stale member is gone within
    /// `members / limit` calls. (`SRANDMEMBER` sampling would recheck the same members
    /// and give no such bound.)
    async fn sweep(&self, owner: &Owner, limit: usize) -> Result<usize, DirectoryError> {
        if limit == 0 {
            return Ok(0);
        }
        let cursor = self
            .sweep_cursors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(owner)
            .cloned()
            .unwrap_or_else(|| "0".to_owned());
        let mut script = self.scripts.sweep.prepare_invoke();
        script
            .key(self.owned_key(owner))
            .arg(owner.to_string())
            .arg(&self.prefix)
            .arg(cursor)
            .arg(limit);
        let (next, removed): (String, usize) = self.eval("sweep", &script).await?;
        self.sweep_cursors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(owner.clone(), next);
        Ok(removed)
    }

    async fn reassert(&self, hosts: &[HostId], owner: &Owner) -> Result<usize, DirectoryError> {
        if hosts.is_empty() {
            return Ok(0);
        }
        let mut script = self.scripts.reassert.prepare_invoke();
        script
            .key(self.owned_key(owner))
            .arg(owner.to_string())
            .arg(self.ttl_ms)
            .arg(&self.prefix);
        for host in hosts {
            script.arg(host.as_str());
        }
        self.eval("reassert", &script).await
    }

    async fn advertise(
        &self,
        owner: &Owner,
        addr: &str,
        ttl: Duration,
    ) -> Result<(), DirectoryError> {
        let mut cmd = ::redis::cmd("SET");
        cmd.arg(self.addr_key(owner))
            .arg(addr)
            .arg("PX")
            .arg(millis(ttl));
        self.query("advertise", &cmd).await
    }

    async fn take_over(
        &self,
        host: &HostId,
        from: &Owner,
        to: &Owner,
    ) -> Result<bool, DirectoryError> {
        let mut script = self.scripts.take_over.prepare_invoke();
        script
            .key(self.host_key(host))
            .key(self.owned_key(to))
            .key(self.owned_key(from))
            .arg(from.to_string())
            .arg(to.to_string())
            .arg(self.ttl_ms)
            .arg(host.as_str());
        self.eval("take_over", &script).await
    }

    async fn hop_key(&self) -> Result<String, DirectoryError> {
        let key = format!("{}hop-key", self.prefix);
        let mut script = self.scripts.hop_key.prepare_invoke();
        script.key(&key).arg(super::new_hop_key());
        let value: Option<Vec<u8>> = self.eval("hop_key", &script).await?;
        let value = value.ok_or_else(|| DirectoryError::Corrupt(format!("{key}: missing")))?;
        String::from_utf8(value)
            .ok()
            .filter(|key| key.len() >= 32)
            .ok_or_else(|| DirectoryError::Corrupt(format!("{key}: not a hop key")))
    }

    async fn address_of(&self, owner: &Owner) -> Result<Option<String>, DirectoryError> {
        let key = self.addr_key(owner);
        let value: Option<Vec<u8>> = self
            .query("address_of", ::redis::cmd("GET").arg(&key))
            .await?;
        value
            .map(|value| {
                String::from_utf8(value)
                    .map_err(|err| DirectoryError::Corrupt(format!("{key}: {err}")))
            })
            .transpose()
    }
}

/// TCP options of the Redis connection: no Nagle delay (small requests, latency-bound),
/// keepalive and `TCP_USER_TIMEOUT` so a vanished peer is noticed.
fn tcp_settings() -> TcpSettings {
    let keepalive = TcpKeepalive::new()
        .with_time(TCP_KEEPALIVE_IDLE)
        .with_interval(TCP_KEEPALIVE_INTERVAL)
        .with_retries(TCP_KEEPALIVE_PROBES);
    let settings = TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(keepalive);
    #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
    let settings = settings.set_user_timeout(TCP_USER_TIMEOUT);
    settings
}

/// `d` in whole milliseconds for `PX`/`PEXPIRE`: at least 1 (0 is an error in Redis),
/// at most what Redis accepts (it adds the current time to a signed 64-bit value; half
/// of that range leaves room for any clock).
fn millis(d: Duration) -> u64 {
    const MAX: u64 = i64::MAX as u64 / 2;
    u64::try_from(d.as_millis()).unwrap_or(MAX).clamp(1, MAX)
}

/// Now, in milliseconds since the Unix epoch (this machine's clock: last-seen times are
/// for display, never compared across machines).
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `s` with the glob characters of a Redis `MATCH` pattern escaped, so that a key prefix
/// matches only itself.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// An owner read from `key`.
fn decode_owner(key: &str, value: Vec<u8>) -> Result<Owner, DirectoryError> {
    let text =
        String::from_utf8(value).map_err(|err| DirectoryError::Corrupt(format!("{key}: {err}")))?;
    text.parse()
        .map_err(|err| DirectoryError::Corrupt(format!("{key} = {text:?}: {err}")))
}

/// What a `redis` error means for the caller.
fn directory_error(err: RedisError) -> DirectoryError {
    if err.is_timeout() {
        // A connect or a response timed out; both bounds are one second.
        DirectoryError::Timeout(RESPONSE_TIMEOUT)
    } else if err.code() == Some("WRONGTYPE") {
        DirectoryError::Corrupt(err.to_string())
    } else {
        DirectoryError::Unavailable(err.to_string())
    }
}
