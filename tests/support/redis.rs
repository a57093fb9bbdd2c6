//! A real `redis-server` per test, for relays that share a Redis directory.
//!
//! [`TestRedis::spawn`] starts `redis-server` on a free port of `127.0.0.1`
//! (Redis does not accept `--port 0`, so a port is picked by binding
//! `127.0.0.1:0` and releasing it), without persistence, and waits until it
//! answers `PING`. It can be killed ([`TestRedis::kill`]) and started again,
//! empty, on the same port ([`TestRedis::restart_empty`]) to play a Redis
//! outage. The process is killed when the [`TestRedis`] is dropped.
//!
//! The assertion helpers ([`TestRedis::get`], [`TestRedis::keys`],
//! [`TestRedis::smembers`], ..) open a fresh connection per call, so they
//! work the same before and after a restart; each is bounded by [`DEADLINE`].
//!
//! There is no skipping: without `redis-server` on `PATH` every test that
//! needs it fails with a message naming the binary.

use std::process::Stdio;
use std::time::Duration;

use ::redis::{Client, Cmd, FromRedisValue, cmd};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::DEADLINE;
use crate::relay_process::TestRelay;
use crate::wait::{POLL_INTERVAL, wait_until_async, within};

/// How many free ports to try when `redis-server` loses the race for one.
const SPAWN_ATTEMPTS: usize = 5;

/// Key prefix the relay uses unless `--redis-prefix` says otherwise.
pub const PREFIX: &str = "relay:";

/// `relay:host:<hostId>`: the owner (`region:machineId`) of a host.
pub fn host_key(host_id: &str) -> String {
    format!("{PREFIX}host:{host_id}")
}

/// `relay:owned:<owner>`: the set of hostIds an owner registered.
pub fn owned_key(owner: &str) -> String {
    format!("{PREFIX}owned:{owner}")
}

/// `relay:addr:<owner>`: the address peers forward an owner's requests to.
pub fn addr_key(owner: &str) -> String {
    format!("{PREFIX}addr:{owner}")
}

/// A port nothing listens on right now (bound on `127.0.0.1:0`, then
/// released). Also what a test uses for "Redis is down at this address".
pub fn unused_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0 to pick a free port")
        .local_addr()
        .expect("local address of the probe socket")
        .port()
}

/// The TLS listener of a test server.
struct TlsListener {
    port: u16,
    cert: String,
    key: String,
    ca: String,
}

/// Whether something on `127.0.0.1:port` answers `PING` with `+PONG`.
async fn answers_ping(port: u16) -> bool {
    let probe = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        stream.write_all(b"PING\r\n").await.ok()?;
        let mut reply = [0_u8; 5];
        stream.read_exact(&mut reply).await.ok()?;
        Some(&reply == b"+PONG")
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), probe).await,
        Ok(Some(true))
    )
}

/// A running `redis-server` child process.
pub struct TestRedis {
    /// The server; `None` while killed. `kill_on_drop` is set and [`Drop`]
    /// kills it explicitly too, so no server outlives its test.
    child: Option<Child>,
    port: u16,
    /// The TLS port, when started with [`TestRedis::spawn_tls`].
    tls_port: Option<u16>,
}

// === impl TestRedis ===

impl TestRedis {
    /// Starts an empty server on a free port and waits until it answers.
    ///
    /// # Panics
    ///
    /// If `redis-server` is not installed, or no server came up.
    pub async fn spawn() -> Self {
        for _ in 0..SPAWN_ATTEMPTS {
            // Another process may take the port between the probe and the
            // server's bind; then the server exits and another port is tried.
            if let Some(child) = start_server(unused_port(), None).await {
                return child;
            }
        }
        panic!("redis-server failed to start on {SPAWN_ATTEMPTS} free ports");
    }

    /// Starts an empty server that listens in plain text on [`port`](Self::port) (for
    /// the assertion helpers) and with TLS on a second port ([`tls_url`](Self::tls_url)),
    /// with the server certificate of `ca`. Clients need no certificate.
    ///
    /// # Panics
    ///
    /// As [`spawn`](Self::spawn); also if this `redis-server` was built without TLS.
    pub async fn spawn_tls(ca: &crate::tls::TestCa) -> Self {
        for _ in 0..SPAWN_ATTEMPTS {
            let tls = TlsListener {
                port: unused_port(),
                cert: ca.server_cert().display().to_string(),
                key: ca.server_key().display().to_string(),
                ca: ca.ca_file().display().to_string(),
            };
            if let Some(child) = start_server(unused_port(), Some(&tls)).await {
                return child;
            }
        }
        panic!("redis-server with TLS failed to start on {SPAWN_ATTEMPTS} pairs of free ports");
    }

    /// `rediss://127.0.0.1:TLS_PORT`.
    ///
    /// # Panics
    ///
    /// If the server was not started with [`spawn_tls`](Self::spawn_tls).
    pub fn tls_url(&self) -> String {
        let port = self.tls_port.expect("started with TestRedis::spawn_tls");
        format!("rediss://127.0.0.1:{port}")
    }

    /// Starts an empty server on `port` (e.g. one a relay was told to use
    /// while nothing listened there).
    ///
    /// # Panics
    ///
    /// If `redis-server` is not installed or does not come up on `port`
    /// within [`DEADLINE`].
    pub async fn spawn_on(port: u16) -> Self {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(redis) = start_server(port, None).await {
                return redis;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server could not listen on 127.0.0.1:{port} within {DEADLINE:?}"
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// The port it listens on (kept across [`restart_empty`](Self::restart_empty)).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL: no shutdown save, connections reset) and
    /// waits until the port refuses connections.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = within("the killed redis-server to exit", DEADLINE, child.wait()).await;
        }
        let port = self.port;
        wait_until_async(
            &format!("127.0.0.1:{port} refuses connections after killing redis-server"),
            DEADLINE,
            || async move { TcpStream::connect(("127.0.0.1", port)).await.is_err() },
        )
        .await;
    }

    /// Kills the server if it runs, then starts a new, empty one on the same
    /// port and waits until it answers.
    ///
    /// # Panics
    ///
    /// If the new server does not come up on the port within [`DEADLINE`].
    pub async fn restart_empty(&mut self) {
        self.kill().await;
        let fresh = Self::spawn_on(self.port).await;
        *self = fresh;
    }

    /// Runs one command on a fresh connection.
    ///
    /// # Panics
    ///
    /// If the server cannot be reached, the command fails, or the reply does
    /// not convert to `T`; each within [`DEADLINE`].
    pub async fn query<T: FromRedisValue>(&self, command: &Cmd) -> T {
        let url = self.url();
        within(
            &format!("redis-server at {url} to answer a command"),
            DEADLINE,
            async {
                let client = Client::open(url.as_str())
                    .unwrap_or_else(|err| panic!("bad redis url {url}: {err}"));
                let mut conn = client
                    .get_multiplexed_async_connection()
                    .await
                    .unwrap_or_else(|err| panic!("cannot connect to redis-server at {url}: {err}"));
                command
                    .query_async::<T>(&mut conn)
                    .await
                    .unwrap_or_else(|err| panic!("redis command failed on {url}: {err}"))
            },
        )
        .await
    }

    /// `GET key`.
    pub async fn get(&self, key: &str) -> Option<String> {
        self.query(cmd("GET").arg(key)).await
    }

    /// `SET key value` (no expiry).
    pub async fn set(&self, key: &str, value: &str) {
        let _: () = self.query(cmd("SET").arg(key).arg(value)).await;
    }

    /// `PTTL key`: milliseconds left, `-1` without expiry, `-2` when absent.
    pub async fn pttl(&self, key: &str) -> i64 {
        self.query(cmd("PTTL").arg(key)).await
    }

    /// `KEYS pattern`, sorted.
    pub async fn keys(&self, pattern: &str) -> Vec<String> {
        let mut keys: Vec<String> = self.query(cmd("KEYS").arg(pattern)).await;
        keys.sort();
        keys
    }

    /// `SMEMBERS key`, sorted.
    pub async fn smembers(&self, key: &str) -> Vec<String> {
        let mut members: Vec<String> = self.query(cmd("SMEMBERS").arg(key)).await;
        members.sort();
        members
    }

    /// Every key matching `pattern` with its string value, sorted by key.
    /// Keys that vanish (expire) between `KEYS` and `GET` are left out.
    pub async fn strings(&self, pattern: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for key in self.keys(pattern).await {
            if let Some(value) = self.get(&key).await {
                out.push((key, value));
            }
        }
        out
    }

    /// Waits until `GET key` is `expected`.
    ///
    /// # Panics
    ///
    /// After `timeout`, showing the last value seen.
    pub async fn wait_value(&self, key: &str, expected: &str, timeout: Duration) {
        let mut last = None;
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.try_get(key).await;
            if value.as_deref() == Some(expected) {
                return;
            }
            last = value.or(last);
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting until redis {key} = {expected:?}; \
                 last value seen: {last:?}"
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Waits until `relay` is the owner of `host_id` in the directory
    /// (`relay:host:<hostId>` = its `region:machineId`).
    ///
    /// # Panics
    ///
    /// After [`DEADLINE`], showing the last value seen.
    pub async fn wait_host_owner(&self, host_id: &str, relay: &TestRelay) {
        self.wait_value(&host_key(host_id), &relay.owner(), DEADLINE)
            .await;
    }

    /// Waits until `relay` has advertised an address
    /// (`relay:addr:<region>:<machineId>` exists), so that peers can forward
    /// to it.
    ///
    /// # Panics
    ///
    /// After [`DEADLINE`].
    pub async fn wait_advertised(&self, relay: &TestRelay) {
        let key = addr_key(&relay.owner());
        wait_until_async(
            &format!("redis has {key} (the relay advertised its address)"),
            DEADLINE,
            || async { self.try_get(&key).await.is_some() },
        )
        .await;
    }

    /// `GET key`, or `None` if the server cannot be reached (for polling
    /// across a restart).
    async fn try_get(&self, key: &str) -> Option<String> {
        let url = self.url();
        let attempt = async {
            let client = Client::open(url.as_str()).ok()?;
            let mut conn = client.get_multiplexed_async_connection().await.ok()?;
            cmd("GET")
                .arg(key)
                .query_async::<Option<String>>(&mut conn)
                .await
                .ok()?
        };
        tokio::time::timeout(Duration::from_secs(1), attempt)
            .await
            .ok()
            .flatten()
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}

/// Starts `redis-server` on `port` and waits until it answers `PING`;
/// `None` if it exited first (the port was taken).
///
/// # Panics
///
/// If `redis-server` cannot be run, or it neither answers nor exits within
/// [`DEADLINE`].
async fn start_server(port: u16, tls: Option<&TlsListener>) -> Option<TestRedis> {
    let mut command = Command::new("redis-server");
    command
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"]);
    if let Some(tls) = tls {
        command
            .args(["--tls-port", &tls.port.to_string()])
            .args(["--tls-cert-file", &tls.cert, "--tls-key-file", &tls.key])
            .args(["--tls-ca-cert-file", &tls.ca, "--tls-auth-clients", "no"]);
    }
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|err| {
            panic!(
                "cannot run `redis-server` ({err}): the cross-machine routing tests need the \
                 `redis-server` binary on PATH (scripts/setup.sh installs it; or \
                 `apt-get install redis-server`)"
            )
        });
    let mut redis = TestRedis {
        child: Some(child),
        port,
        tls_port: tls.map(|tls| tls.port),
    };
    let deadline = Instant::now() + DEADLINE;
    loop {
        let exited = redis
            .child
            .as_mut()
            .expect("just started")
            .try_wait()
            .expect("try_wait on redis-server")
            .is_some();
        if exited {
            redis.child = None;
            return None;
        }
        if answers_ping(port).await {
            return Some(redis);
        }
        assert!(
            Instant::now() < deadline,
            "redis-server on 127.0.0.1:{port} did not answer PING within {DEADLINE:?}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}
