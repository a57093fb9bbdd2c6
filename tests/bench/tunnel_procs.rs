//! The tunnels the comparison bench measures, as child processes: rathole (server and
//! client) and the release relay with a real `relay agent`; and what the bench reads of
//! any process from /proc (utime + stime, peak RSS).

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::relay_child::{self, RelayChild};
use crate::upstream::BODY;

/// How long a tunnel may take from its processes' start to carrying a request.
const READY_DEADLINE: Duration = Duration::from_secs(30);

/// Poll step while waiting for a tunnel to carry its first request.
const READY_POLL: Duration = Duration::from_millis(50);

// === /proc readings ===

/// Clock ticks per second of utime/stime (`getconf CLK_TCK`; 100 on every Linux the bench
/// is likely to meet, and the fallback when `getconf` is missing).
pub fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

/// The fields of /proc/<pid>/stat after the command name (which may hold spaces and
/// parentheses, so the split is at the last `)`); index 0 is field 3, `state`.
fn stat_fields(pid: Option<u32>) -> Result<Vec<u64>> {
    let path = pid.map_or_else(
        || "/proc/self/stat".to_owned(),
        |p| format!("/proc/{p}/stat"),
    );
    let stat = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow!("{path}: no `)` after the command name"))?;
    // `state` is a letter: keep positions by mapping what does not parse to 0.
    Ok(rest
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect())
}

/// utime + stime of a process (`None`: this process), in clock ticks.
///
/// # Errors
/// When /proc cannot be read (the process is gone, or not Linux).
pub fn cpu_ticks(pid: Option<u32>) -> Result<u64> {
    let f = stat_fields(pid)?;
    // utime and stime are fields 14 and 15.
    Ok(f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0))
}

/// utime alone of a process, in clock ticks: the CPU it spent in its own code (the rest
/// of [`cpu_ticks`] is the kernel's, on its behalf).
///
/// # Errors
/// When /proc cannot be read (the process is gone, or not Linux).
pub fn user_ticks(pid: u32) -> Result<u64> {
    Ok(stat_fields(Some(pid))?.get(11).copied().unwrap_or(0))
}

/// cutime + cstime of this process: the CPU of the children it has reaped, in clock
/// ticks. Read before and after a `wrk` run, it is what that run cost (wrk cannot be
/// read from /proc once it has exited).
///
/// # Errors
/// When /proc/self/stat cannot be read.
pub fn reaped_children_ticks() -> Result<u64> {
    let f = stat_fields(None)?;
    // cutime and cstime are fields 16 and 17.
    Ok(f.get(13).copied().unwrap_or(0) + f.get(14).copied().unwrap_or(0))
}

/// Peak RSS (VmHWM) of `pid`, KiB.
///
/// # Errors
/// When /proc/<pid>/status cannot be read or has no VmHWM.
pub fn peak_rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no VmHWM in {path}"))
}

/// Resets the peak RSS of `pid` to its current RSS (`5` to /proc/<pid>/clear_refs, Linux
/// 4.0 and later), so that the next [`peak_rss_kib`] is the peak of what came after.
///
/// # Errors
/// When the kernel refuses (another user's process, or an old kernel).
pub fn reset_peak_rss(pid: u32) -> Result<()> {
    let path = format!("/proc/{pid}/clear_refs");
    std::fs::write(&path, "5").with_context(|| format!("cannot write 5 to {path}"))
}

// === child processes ===

/// A child process whose stderr is echoed with a prefix (a full pipe would block its
/// logging). Killed when dropped.
pub struct Logged {
    /// Held so that dropping it kills the process.
    _child: Child,
    /// Its process id.
    pub pid: u32,
}

impl Logged {
    fn spawn(mut cmd: Command, label: &str) -> Result<Logged> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start the {label}"))?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow!("the {label} exited at once"))?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let label = label.to_owned();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("[{label} {pid}] {line}");
            }
        });
        Ok(Logged { _child: child, pid })
    }
}

/// A free port on 127.0.0.1 for a program that cannot be told to pick one and report it
/// (rathole). Another process could take it before the program binds it; on a bench
/// machine that is unlikely, and the program then fails to start, loudly.
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Waits until a GET of `path` through `addr` answers 200 with the small body.
async fn wait_carrying(
    addr: SocketAddr,
    path: &str,
    bearer: Option<&str>,
    what: &str,
) -> Result<()> {
    let started = tokio::time::Instant::now();
    let mut last = String::from("no attempt");
    while started.elapsed() < READY_DEADLINE {
        match relay_child::get(addr, path, bearer).await {
            Ok((200, body)) if body.as_ref() == BODY => return Ok(()),
            Ok((status, body)) => {
                last = format!("HTTP {status}: {}", String::from_utf8_lossy(&body));
            }
            Err(err) => last = format!("{err:#}"),
        }
        tokio::time::sleep(READY_POLL).await;
    }
    bail!("{what} did not carry GET {path} within {READY_DEADLINE:?}; last attempt: {last}")
}

/// rathole, a TCP tunnel: the server exposes a port for the service, the client connects
/// out to the server and to the local service.
pub struct Rathole {
    /// The rathole server process.
    pub server: Logged,
    /// The rathole client process.
    pub client: Logged,
    /// Where clients connect (the server's service port).
    pub addr: SocketAddr,
}

impl Rathole {
    /// Writes the two configurations into `dir`, starts `rathole --server` and
    /// `rathole --client` (plain TCP transport, the defaults otherwise: TCP_NODELAY on),
    /// and waits until a request reaches `upstream` through the tunnel.
    ///
    /// # Errors
    /// When a process cannot start or the tunnel never carries a request.
    pub async fn start(binary: &Path, dir: &Path, upstream: SocketAddr) -> Result<Rathole> {
        let control = free_port()?;
        let service = free_port()?;
        // Only these two processes see it, on loopback.
        let token = format!("bench-{}", std::process::id());
        let server_toml = format!(
            "[server]\nbind_addr = \"127.0.0.1:{control}\"\n\n\
             [server.services.bench]\ntoken = \"{token}\"\nbind_addr = \"127.0.0.1:{service}\"\n"
        );
        let client_toml = format!(
            "[client]\nremote_addr = \"127.0.0.1:{control}\"\n\n\
             [client.services.bench]\ntoken = \"{token}\"\nlocal_addr = \"{upstream}\"\n"
        );
        let server_path = dir.join("rathole-server.toml");
        let client_path = dir.join("rathole-client.toml");
        std::fs::write(&server_path, server_toml)
            .with_context(|| format!("cannot write {}", server_path.display()))?;
        std::fs::write(&client_path, client_toml)
            .with_context(|| format!("cannot write {}", client_path.display()))?;

        let rathole = |mode: &str, config: &Path| {
            let mut cmd = Command::new(binary);
            cmd.arg(mode).arg(config).env("RUST_LOG", "warn");
            // rathole's `#[tokio::main]` runtime sizes itself from this variable, as the
            // relay's and the agent's do: the same knob for each tunnel's processes.
            cmd.env_remove("TOKIO_WORKER_THREADS");
            if let Ok(workers) = std::env::var("BENCH_RATHOLE_WORKERS") {
                cmd.env("TOKIO_WORKER_THREADS", workers);
            }
            cmd
        };
        let server = Logged::spawn(rathole("--server", &server_path), "rathole server")?;
        let client = Logged::spawn(rathole("--client", &client_path), "rathole client")?;
        let addr = SocketAddr::from(([127, 0, 0, 1], service));
        wait_carrying(addr, "/small", None, "rathole").await?;
        Ok(Rathole {
            server,
            client,
            addr,
        })
    }
}

/// The release relay with one real `relay agent` forwarding to the upstream.
pub struct RelayTunnel {
    /// The relay (`relay serve`, admission lifted as in every bench).
    pub relay: RelayChild,
    /// The agent process.
    pub agent: Logged,
    /// The hostId the agent registered.
    pub host_id: String,
}

impl RelayTunnel {
    /// Starts a relay and `relay agent --relay ws://… --host-id <host_id> --to
    /// http://<upstream>` (plus `--protocol <p>` when given), the host token in
    /// `RELAY_TOKEN`; waits until a request with `client_token` reaches the upstream.
    ///
    /// # Errors
    /// When a process cannot start or the tunnel never carries a request.
    pub async fn start(
        binary: &Path,
        upstream: SocketAddr,
        host_id: &str,
        protocol: Option<&str>,
        client_token: &str,
    ) -> Result<RelayTunnel> {
        let relay = RelayChild::start(binary).await?;
        let mut cmd = Command::new(binary);
        relay_child::clear_relay_env(&mut cmd);
        cmd.args(["agent", "--relay"])
            .arg(format!("ws://{}", relay.addr))
            .args(["--host-id", host_id, "--to"])
            .arg(format!("http://{upstream}"));
        if let Some(protocol) = protocol {
            cmd.args(["--protocol", protocol]);
        }
        cmd.env("RELAY_TOKEN", relay_child::token("host"))
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1");
        if let Ok(workers) = std::env::var("BENCH_AGENT_WORKERS") {
            cmd.env("TOKIO_WORKER_THREADS", workers);
        }
        let label = format!("agent {}", protocol.unwrap_or("v1"));
        let agent = Logged::spawn(cmd, &label)?;
        relay_child::wait_tunnels(relay.addr, 1, READY_DEADLINE)
            .await
            .with_context(|| format!("the {label} did not register"))?;
        let probe = format!("/hosts/{host_id}/small");
        wait_carrying(relay.addr, &probe, Some(client_token), &label).await?;
        Ok(RelayTunnel {
            relay,
            agent,
            host_id: host_id.to_owned(),
        })
    }
}

/// Whether this relay build's agent has a `--protocol` flag (`relay agent --help`).
///
/// # Errors
/// When the binary cannot be run.
pub async fn agent_has_protocol_flag(binary: &Path) -> Result<bool> {
    let out = Command::new(binary)
        .args(["agent", "--help"])
        .output()
        .await
        .with_context(|| format!("cannot run {} agent --help", binary.display()))?;
    let help = String::from_utf8_lossy(&out.stdout);
    Ok(help.contains("--protocol"))
}

/// The rathole binary: `RATHOLE_BIN`, or `bench-tools/bin/rathole` in the target directory
/// the bench executable lives in (where `scripts/bench.sh tunnels` installs it).
///
/// # Errors
/// When it is missing, naming the script that installs it.
pub fn rathole_binary() -> Result<PathBuf> {
    if let Some(path) = relay_tests::binary_from_env("RATHOLE_BIN")? {
        return Ok(path);
    }
    let exe = std::env::current_exe().context("the bench executable has no path")?;
    // <target>/<profile>/deps/<bench>-<hash>
    let target_dir = exe
        .parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .ok_or_else(|| anyhow!("unexpected bench executable location {}", exe.display()))?;
    let path = target_dir.join("bench-tools").join("bin").join("rathole");
    if !path.is_file() {
        bail!(
            "rathole not found at {}: `scripts/bench.sh tunnels` installs it, or set \
             RATHOLE_BIN, or leave it out with BENCH_PATHS=direct,v1,h2",
            path.display()
        );
    }
    Ok(path)
}
