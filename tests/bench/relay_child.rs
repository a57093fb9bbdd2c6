//! The release `relay` binary as a child process of the benchmark, plus what the bench
//! reads from the outside: the port it logged, its RSS and CPU time from /proc, and a
//! few plain HTTP calls (`/metrics`, one request through a tunnel).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use jsonwebtoken::{EncodingKey, Header, encode};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// The HS256 secret the bench relays are started with.
pub const SECRET: &str = "relay-bench-secret-0123456789abcdef";

/// How long the relay may take to log its `listening` line.
const STARTUP_DEADLINE: Duration = Duration::from_secs(15);

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: u64,
    role: &'a str,
    hosts: [&'a str; 1],
}

/// A token for `role` (`host` or `client`) valid for every host for an hour.
pub fn token(role: &str) -> String {
    token_as(role, &format!("bench-{role}"))
}

/// [`token`] with subject `sub` (another tenant).
pub fn token_as(role: &str, sub: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let claims = Claims {
        sub,
        exp: now + 3600,
        role,
        hosts: ["*"],
    };
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("HS256 encoding of plain claims cannot fail")
}

/// A running relay. Killed when dropped.
pub struct RelayChild {
    child: Child,
    pid: u32,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl RelayChild {
    /// Starts `relay serve` on an ephemeral port of 127.0.0.1 and waits for its
    /// `listening` line. Its later stderr lines are echoed with a `[relay]` prefix
    /// (the log level keeps them to warnings and the server's own lines).
    ///
    /// # Errors
    /// When the process cannot start or never logs its address.
    pub async fn start(binary: &Path) -> Result<RelayChild> {
        RelayChild::start_with(binary, &[]).await
    }

    /// [`RelayChild::start`] with extra environment (`RELAY_*` settings).
    ///
    /// # Errors
    /// See [`RelayChild::start`].
    pub async fn start_with(binary: &Path, env: &[(&str, &str)]) -> Result<RelayChild> {
        let mut cmd = Command::new(binary);
        cmd.args([
            "serve",
            "--bind",
            "127.0.0.1",
            "--port",
            "0",
            "--machine-id",
            "bench",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
        clear_relay_env(&mut cmd);
        if let Ok(workers) = std::env::var("BENCH_RELAY_WORKERS") {
            cmd.env("TOKIO_WORKER_THREADS", workers);
        }
        // Tunnel admission (token bucket, 500/s after a burst of 2,000 by default) is
        // lifted: the bench measures memory and proxying, not the registration pacing.
        cmd.env("RELAY_ADMISSION_RATE", "1000000")
            .env("RELAY_ADMISSION_BURST", "1000000");
        // Every client, tunnel and channel of a bench comes from 127.0.0.1: the limit per
        // address (which counts tunnels and channels too) would refuse the thousands of
        // idle tunnels and the load generator's connections.
        cmd.env("RELAY_MAX_CONNECTIONS_PER_IP", "0")
            .env("RELAY_MAX_CHANNELS_PER_CLIENT", "0");
        cmd.envs(env.iter().copied());
        cmd.env("RELAY_JWT_SECRET", SECRET)
            .env("RUST_LOG", "warn,relay::server=info")
            .env("NO_COLOR", "1");
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let pid = child.id().ok_or_else(|| anyhow!("relay exited at once"))?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let mut lines = BufReader::new(stderr).lines();

        let mut seen = Vec::new();
        let addr = tokio::time::timeout(STARTUP_DEADLINE, async {
            while let Some(line) = lines.next_line().await? {
                if line.contains("listening")
                    && let Some(addr) = parse_addr(&line)
                {
                    return Ok(addr);
                }
                seen.push(line);
            }
            Err(anyhow!("relay exited before listening"))
        })
        .await
        .map_err(|_| anyhow!("relay did not log `listening` within {STARTUP_DEADLINE:?}"))
        .and_then(|r| r)
        .map_err(|err| anyhow!("{err}; its output:\n{}", seen.join("\n")))?;

        // Keep draining stderr: a full pipe would block the relay's logging.
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("[relay {pid}] {line}");
            }
        });
        Ok(RelayChild { child, pid, addr })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Kills the relay and waits for it.
    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}

/// Removes from a relay or agent child's environment whatever configures it, so that
/// the developer's shell does not change what the bench measures: `RELAY_*`, `FLY_*`,
/// and `TOKIO_WORKER_THREADS` (the runtime sizes itself from it; only the bench's own
/// knobs may set it, so that the bench process's runtime is not changed too).
pub fn clear_relay_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        let name = key.to_string_lossy();
        if name.starts_with("RELAY_") || name.starts_with("FLY_") {
            cmd.env_remove(&key);
        }
    }
    cmd.env_remove("TOKIO_WORKER_THREADS");
}

fn parse_addr(line: &str) -> Option<SocketAddr> {
    let start = line.find("addr=")? + "addr=".len();
    let rest = &line[start..];
    let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
    rest[..end].trim_matches('"').parse().ok()
}

/// Memory figures of a process, from /proc/<pid>/status, in KiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    /// Resident set size.
    pub rss_kib: u64,
    /// The anonymous part of it (heap, stacks): what tunnels cost.
    pub anon_kib: u64,
}

/// Reads VmRSS and RssAnon of `pid`.
///
/// # Errors
/// When /proc cannot be read (not Linux, or the process is gone).
pub fn memory(pid: u32) -> Result<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    Ok(Memory {
        rss_kib: field("VmRSS:").ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))?,
        anon_kib: field("RssAnon:").unwrap_or(0),
    })
}

/// Which process a CPU reading is for.
#[derive(Debug, Clone, Copy)]
pub enum Proc {
    /// The bench process itself (load generator, upstream, bench host).
    SelfProc,
    /// Another process.
    Pid(u32),
}

/// CPU time a process has used so far, all threads: the sum of the scheduler's exact
/// run time of each live thread (/proc/<pid>/task/*/schedstat, nanoseconds). Tick-based
/// utime/stime is not used: with many short runs per request it is biased (here it read
/// about twice the `perf stat` task-clock at low load).
pub fn cpu_time(proc: Proc) -> Option<Duration> {
    let dir = match proc {
        Proc::SelfProc => "/proc/self/task".to_owned(),
        Proc::Pid(pid) => format!("/proc/{pid}/task"),
    };
    let mut total: u64 = 0;
    for entry in std::fs::read_dir(dir).ok()? {
        let Ok(entry) = entry else { continue };
        // A thread may exit between the listing and the read: skip it.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("schedstat")) else {
            continue;
        };
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(Duration::from_nanos(total))
}

/// One GET on a fresh connection: status and body.
///
/// # Errors
/// When the connection or the exchange fails.
pub async fn get(addr: SocketAddr, path: &str, bearer: Option<&str>) -> Result<(u16, Bytes)> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let conn = tokio::spawn(conn);
    let mut request = http::Request::get(path).header(http::header::HOST, addr.to_string());
    if let Some(token) = bearer {
        request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let response = sender
        .send_request(request.body(Empty::<Bytes>::new())?)
        .await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    drop(sender);
    conn.abort();
    Ok((status, body))
}

/// The value of the `relay_tunnels_connected` gauge (0 before any tunnel registered),
/// summed over its labels: relays that speak h2 label it by protocol.
///
/// # Errors
/// When `/metrics` cannot be fetched.
pub async fn tunnels_connected(addr: SocketAddr) -> Result<u64> {
    let (status, body) = get(addr, "/metrics", None).await?;
    if status != 200 {
        bail!("GET /metrics answered {status}");
    }
    let text = String::from_utf8_lossy(&body);
    let total: f64 = text
        .lines()
        .filter_map(|l| l.strip_prefix("relay_tunnels_connected"))
        .filter(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        .filter_map(|rest| rest.rsplit(' ').next()?.trim().parse::<f64>().ok())
        .sum();
    Ok(total as u64)
}

/// The value of counter `name` with the label `label` (`key="value"`), 0 when absent.
///
/// # Errors
/// When `/metrics` cannot be fetched.
pub async fn counter(addr: SocketAddr, name: &str, label: &str) -> Result<f64> {
    let (status, body) = get(addr, "/metrics", None).await?;
    if status != 200 {
        bail!("GET /metrics answered {status}");
    }
    let text = String::from_utf8_lossy(&body);
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix(name))
        .filter(|rest| rest.starts_with('{') && rest.contains(label))
        .filter_map(|rest| rest.rsplit(' ').next()?.trim().parse::<f64>().ok())
        .sum())
}

/// Waits until the relay reports at least `n` tunnels, at most `deadline`.
///
/// # Errors
/// When the count is not reached in time (with the last count seen).
pub async fn wait_tunnels(addr: SocketAddr, n: u64, deadline: Duration) -> Result<()> {
    let started = tokio::time::Instant::now();
    let mut last = 0;
    while started.elapsed() < deadline {
        last = tunnels_connected(addr).await?;
        if last >= n {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("relay reports {last} tunnels after {deadline:?}, expected {n}")
}
