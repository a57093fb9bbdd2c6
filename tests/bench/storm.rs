//! Reconnect-storm benchmark: a fleet of `relay agent` processes loses its relay.
//!
//! 200 agents (child processes of the release `relay` binary, default backoff: base
//! 1 s, cap 5 s) register with one relay. The relay is killed (SIGKILL) and a plain
//! TCP listener takes its port for 10 s, accepting and at once closing every
//! connection while counting them: what a relay that is up but failing looks like to
//! the fleet. Then the real relay restarts on the same port, and the bench polls its
//! `/metrics` gauge `relay_tunnels_connected` until every agent is back.
//!
//! Reported: connection attempts during the outage (total, per second, per agent)
//! against the naive one attempt per second per agent, and the time from the restarted
//! relay's `listening` line until all agents are registered, against the target of
//! backoff cap + 1 s. A measurement: it fails only when something does not work
//! (binary missing, agents not registering within a minute), never on timing.
//!
//! Run with `scripts/storm.sh` (or `cargo build --release -p relay` then
//! `cargo bench -p relay-tests --bench storm`).
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `STORM_AGENTS` | 200 | agent processes |
//! | `STORM_OUTAGE_SECS` | 10 | how long the accept-and-close listener holds the port |
//! | `STORM_AGENT_WORKERS` | 1 | each agent's `TOKIO_WORKER_THREADS` |
//! | `RELAY_BIN` | `<target>/release/relay` | the binary for the relay and the agents |
//! | `STORM_KEEP_LOGS` | unset | keep the relay's and agents' logs after a successful run |
//!
//! Logs go to a temporary directory (printed at the start); a failed run keeps them.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use relay_tests::{Claims, HttpClient, counter_value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// The HS256 secret of the bench relay.
const SECRET: &str = "relay-storm-secret-0123456789abcdef";

/// The agents' default backoff cap (the contract's `--backoff-cap` default).
const BACKOFF_CAP: Duration = Duration::from_secs(5);

/// Target: every agent is back within the cap plus this after the relay returns.
const RETURN_SLACK: Duration = Duration::from_secs(1);

/// How long the fleet may take to register at the start, and again at the end.
const REGISTER_DEADLINE: Duration = Duration::from_secs(60);

/// How long the relay may take to log `listening`.
const STARTUP_DEADLINE: Duration = Duration::from_secs(15);

/// How often the gauge is read.
const GAUGE_POLL: Duration = Duration::from_millis(20);

struct Settings {
    agents: usize,
    outage: Duration,
    agent_workers: String,
}

fn env_u64(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .with_context(|| format!("{name}={v:?} is not a whole number")),
        _ => Ok(default),
    }
}

impl Settings {
    fn from_env() -> Result<Settings> {
        Ok(Settings {
            agents: usize::try_from(env_u64("STORM_AGENTS", 200)?.max(1))?,
            outage: Duration::from_secs(env_u64("STORM_OUTAGE_SECS", 10)?.max(1)),
            agent_workers: env_u64("STORM_AGENT_WORKERS", 1)?.max(1).to_string(),
        })
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("storm bench failed: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let settings = Settings::from_env()?;
    let binary = relay_tests::release_relay_binary("scripts/storm.sh")?;
    let soft = rlimit::increase_nofile_limit(u64::MAX).context("cannot raise RLIMIT_NOFILE")?;
    let needed = settings.agents as u64 * 4 + 256;
    if soft < needed {
        bail!("RLIMIT_NOFILE is {soft}, {needed} descriptors are needed: lower STORM_AGENTS");
    }
    println!("binary: {}", binary.display());
    println!(
        "{} agents, outage {:?}, agent TOKIO_WORKER_THREADS={}, RLIMIT_NOFILE {soft}",
        settings.agents, settings.outage, settings.agent_workers
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(storm(&binary, &settings))
}

/// A command for `binary` with no inherited `RELAY_*`/`FLY_*` settings.
fn clean_command(binary: &Path) -> Command {
    let mut cmd = Command::new(binary);
    for (key, _) in std::env::vars_os() {
        let name = key.to_string_lossy();
        if name.starts_with("RELAY_")
            || name.starts_with("FLY_")
            || name == "REDIS_URL"
            || name == "TOKIO_WORKER_THREADS"
        {
            cmd.env_remove(&key);
        }
    }
    cmd.env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// A relay child on `127.0.0.1:port` (0 for any).
struct Relay {
    child: Child,
    addr: SocketAddr,
    /// When its `listening` line was read.
    listening_at: Instant,
}

impl Relay {
    async fn start(binary: &Path, port: u16, log: &Path) -> Result<Relay> {
        let mut cmd = clean_command(binary);
        cmd.args([
            "serve",
            "--bind",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--machine-id",
            "storm",
        ])
        .env("RELAY_JWT_SECRET", SECRET)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let mut lines = BufReader::new(stderr).lines();
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .await
            .with_context(|| format!("cannot open {}", log.display()))?;
        let mut seen = Vec::new();
        let found = tokio::time::timeout(STARTUP_DEADLINE, async {
            while let Some(line) = lines.next_line().await? {
                let addr = line
                    .contains("listening")
                    .then(|| parse_addr(&line))
                    .flatten();
                seen.push(line);
                if let Some(addr) = addr {
                    return Ok(addr);
                }
            }
            Err(anyhow!("the relay exited before listening"))
        })
        .await;
        let listening_at = Instant::now();
        let addr = match found {
            Ok(Ok(addr)) => addr,
            Ok(Err(err)) => bail!("{err}; its output:\n{}", seen.join("\n")),
            Err(_) => bail!(
                "the relay did not log `listening` within {STARTUP_DEADLINE:?}; output:\n{}",
                seen.join("\n")
            ),
        };
        // Keep draining stderr into the log file: a full pipe would block the relay.
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for line in seen {
                let _ = file.write_all(format!("{line}\n").as_bytes()).await;
            }
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = file.write_all(format!("{line}\n").as_bytes()).await;
            }
        });
        Ok(Relay {
            child,
            addr,
            listening_at,
        })
    }

    async fn kill(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}

fn parse_addr(line: &str) -> Option<SocketAddr> {
    let start = line.find("addr=")? + "addr=".len();
    let rest = &line[start..];
    let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
    rest[..end].trim_matches('"').parse().ok()
}

/// The relay's `relay_tunnels_connected` gauge, or `None` when it does not answer.
async fn tunnels_connected(http: &HttpClient, addr: SocketAddr) -> Option<u64> {
    let resp = http
        .get(format!("http://{addr}/metrics"))
        .timeout(Duration::from_secs(2))
        .try_send()
        .await
        .ok()?;
    if resp.status != 200 {
        return None;
    }
    let value = counter_value(&resp.text(), "relay_tunnels_connected", &[]);
    // A gauge of whole tunnels.
    Some(value.max(0.0) as u64)
}

/// Polls the gauge until it reaches `n`; returns when it first reached each of the
/// `marks` (fractions of `n`), measured from `since`.
async fn wait_gauge(
    http: &HttpClient,
    addr: SocketAddr,
    n: usize,
    since: Instant,
    marks: &[f64],
) -> Result<Vec<Duration>> {
    let mut reached: Vec<Option<Duration>> = vec![None; marks.len()];
    let deadline = since + REGISTER_DEADLINE;
    let mut last = 0;
    loop {
        if let Some(value) = tunnels_connected(http, addr).await {
            last = value;
            for (mark, slot) in marks.iter().zip(reached.iter_mut()) {
                let goal = (mark * n as f64).ceil() as u64;
                if slot.is_none() && value >= goal {
                    *slot = Some(since.elapsed());
                }
            }
            if reached.iter().all(Option::is_some) {
                return Ok(reached.into_iter().flatten().collect());
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "only {last} of {n} agents registered within {REGISTER_DEADLINE:?} \
                 (relay {addr})"
            );
        }
        tokio::time::sleep(GAUGE_POLL).await;
    }
}

async fn storm(binary: &Path, settings: &Settings) -> Result<()> {
    let n = settings.agents;
    let logs_dir = std::env::temp_dir().join(format!("relay-storm-{}", std::process::id()));
    std::fs::create_dir_all(&logs_dir)
        .with_context(|| format!("cannot create {}", logs_dir.display()))?;
    println!("logs: {}", logs_dir.display());
    let relay_log = logs_dir.join("relay.log");
    let http = HttpClient::new();

    let relay = Relay::start(binary, 0, &relay_log).await?;
    let port = relay.addr.port();
    let relay_url = format!("ws://127.0.0.1:{port}");
    let token = Claims::host("*").sign(SECRET);
    // Nothing is requested through the tunnels; the upstream may as well be down.
    let upstream = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
        format!("http://{}", probe.local_addr()?)
    };

    let mut agents = Vec::with_capacity(n);
    let spawn_started = Instant::now();
    for i in 0..n {
        let log = std::fs::File::create(logs_dir.join(format!("agent-{i:03}.log")))?;
        let child = clean_command(binary)
            .args([
                "agent",
                "--relay",
                &relay_url,
                "--host-id",
                &format!("storm-{i:03}"),
                "--to",
                &upstream,
            ])
            .env("RELAY_TOKEN", &token)
            .env("RUST_LOG", "info")
            .env("TOKIO_WORKER_THREADS", &settings.agent_workers)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("cannot start agent {i}"))?;
        agents.push(child);
    }
    let initial = wait_gauge(&http, relay.addr, n, spawn_started, &[1.0]).await?;
    println!(
        "{n} agents registered {:.2} s after the first was started",
        initial[0].as_secs_f64()
    );

    // The outage: SIGKILL, then a listener that accepts and closes everything.
    relay.kill().await;
    let killed_at = Instant::now();
    let listener = bind_with_retry(port).await?;
    let bound_after = killed_at.elapsed();
    let outage_secs = usize::try_from(settings.outage.as_secs())?;
    let mut per_second = vec![0_u64; outage_secs];
    let outage_started = Instant::now();
    let outage_end = outage_started + settings.outage;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    drop(stream);
                    let second = usize::try_from(outage_started.elapsed().as_secs())?;
                    per_second[second.min(outage_secs - 1)] += 1;
                }
            }
            () = tokio::time::sleep_until(outage_end) => break,
        }
    }
    drop(listener);
    let attempts: u64 = per_second.iter().sum();

    let mut exited = 0;
    for agent in &mut agents {
        if matches!(agent.try_wait(), Ok(Some(_))) {
            exited += 1;
        }
    }
    if exited > 0 {
        bail!(
            "{exited} agents exited during the outage; see {}",
            logs_dir.display()
        );
    }

    // The relay returns on the same port.
    let relay = Relay::start(binary, port, &relay_log).await?;
    let marks = [0.01, 0.5, 0.9, 1.0];
    let back = wait_gauge(&http, relay.addr, n, relay.listening_at, &marks).await?;
    let all_back = back[3];

    let retries = retries_per_agent(&logs_dir, n);

    // Results.
    let rate = attempts as f64 / settings.outage.as_secs_f64();
    let naive = n as u64 * settings.outage.as_secs();
    let target = BACKOFF_CAP + RETURN_SLACK;
    println!();
    println!("## Reconnect storm: {n} agents, {outage_secs} s accept-and-close outage");
    println!();
    println!("| figure | value |");
    println!("|---|---|");
    println!("| agents | {n} |");
    println!("| agent backoff | default: base 1 s, cap 5 s, jitter per the agent |");
    println!(
        "| port taken over by the counting listener | {:.0} ms after SIGKILL |",
        bound_after.as_secs_f64() * 1e3
    );
    println!("| connection attempts during the outage | {attempts} |");
    println!("| attempts per second | {rate:.1} |");
    let per_agent = attempts as f64 / n as f64;
    println!("| attempts per agent | {per_agent:.2} |");
    println!(
        "| naive 1/s/agent would be | {naive} ({:.0}/s) |",
        naive as f64 / settings.outage.as_secs_f64()
    );
    let share = 100.0 * attempts as f64 / naive as f64;
    println!("| share of naive | {share:.0} % |");
    if let Some((min, median, max)) = retries {
        println!(
            "| `reconnecting in` lines per agent, whole run (min / median / max) | \
             {min} / {median} / {max} |"
        );
    }
    for (mark, took) in marks.iter().zip(&back) {
        println!(
            "| {:.0} % registered again after `listening` | {:.2} s |",
            mark * 100.0,
            took.as_secs_f64()
        );
    }
    println!(
        "| target: all back within cap + 1 s ({:.0} s) | {} |",
        target.as_secs_f64(),
        if all_back <= target { "met" } else { "MISSED" }
    );
    println!();
    println!("attempts per second of the outage:");
    println!();
    println!("| second | attempts |");
    println!("|---|---|");
    for (second, count) in per_second.iter().enumerate() {
        println!("| {second}–{} | {count} |", second + 1);
    }

    for agent in &mut agents {
        let _ = agent.start_kill();
    }
    for agent in &mut agents {
        let _ = agent.wait().await;
    }
    relay.kill().await;
    if std::env::var_os("STORM_KEEP_LOGS").is_none() {
        let _ = std::fs::remove_dir_all(&logs_dir);
    }
    Ok(())
}

/// Binds `127.0.0.1:port`, retrying briefly while the killed relay's socket goes away.
async fn bind_with_retry(port: u16) -> Result<TcpListener> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpListener::bind(("127.0.0.1", port)).await {
            Ok(listener) => return Ok(listener),
            Err(err) if Instant::now() >= deadline => {
                return Err(err).with_context(|| format!("cannot bind 127.0.0.1:{port}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// Min, median and max count of `reconnecting in` lines in the agents' logs.
fn retries_per_agent(dir: &Path, n: usize) -> Option<(usize, usize, usize)> {
    let mut counts: Vec<usize> = (0..n)
        .map(|i| {
            std::fs::read_to_string(dir.join(format!("agent-{i:03}.log")))
                .map(|text| {
                    text.lines()
                        .filter(|l| l.contains("reconnecting in"))
                        .count()
                })
                .unwrap_or(0)
        })
        .collect();
    counts.sort_unstable();
    Some((*counts.first()?, counts[counts.len() / 2], *counts.last()?))
}
