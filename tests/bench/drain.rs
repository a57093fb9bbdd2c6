//! Graceful-drain benchmark: how fast a relay with thousands of tunnels hands them over
//! to its peers, and how many registrations per second one relay accepts.
//!
//! Everything runs on 127.0.0.1: one `redis-server` (the shared directory), release
//! `relay serve` children, and the v1 host fleet in worker processes of this executable
//! (see `drain_clients.rs`; workers exist because 10,000 hosts hold 20,000 sockets at
//! the peak of a make-before-break move, over a typical hard `RLIMIT_NOFILE`).
//!
//! **Drain.** Relay A (machine `a`, admission opened wide so the setup is not throttled)
//! holds N tunnels. Relays B and C run with the relay's default admission
//! (`limits::ADMISSION_RATE` / `ADMISSION_BURST`). A gets SIGTERM (`kill -TERM`); each
//! host reads `drain`, opens a new tunnel to B (even hosts) or C (odd hosts) at once,
//! honours 429 `Retry-After`, and closes its old tunnel `DRAINED_TUNNEL_LINGER` after the
//! new one is registered, as `relay agent` does with an idle tunnel (or, in the
//! "kept until A closes it" run, never: a v1 agent that waits for the 4001). Reported: A's own step timings (its
//! `drain k/6 … elapsed=` log lines), the wall time from the signal to A's exit, the
//! re-home time per host (`drain` read → first message on the new tunnel, which the
//! relay sends once the directory write is done), 429s, hosts not re-homed within 10 s,
//! and the directory at the end (`relay:host:<id>` must name B or C for every host).
//!
//! **Registration rate.** 5,000 hosts connect to one relay (with Redis, admission
//! effectively off) as fast as a window of concurrent handshakes allows; the rate is
//! hosts / (first connect → last host's first `ping`).
//!
//! A measurement: it fails only when something does not work (binary missing, the fleet
//! not registering), never on timing; targets are printed as met or MISSED.
//!
//! Run with `scripts/drain-bench.sh` (or `cargo build --release -p relay` then
//! `cargo bench -p relay-tests --bench drain`).
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `DRAIN_BENCH_SIZES` | `1000,5000,10000` | tunnels on A, one drain run each, default admission on B and C |
//! | `DRAIN_BENCH_KEEP_OLD` | largest size | tunnels for the extra run whose hosts keep their old tunnel until A closes it (0: skip) |
//! | `DRAIN_BENCH_REGISTER` | 5000 | hosts of the registration-rate run (0: skip) |
//! | `DRAIN_BENCH_WINDOW` | 256 | concurrent connection attempts while a fleet registers |
//! | `RELAY_BIN` | `<target>/release/relay` | the relay binary |
//! | `DRAIN_BENCH_KEEP_LOGS` | unset | keep the relays' logs after a successful run |

mod drain_clients;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use drain_clients::{
    DrainReport, MAX_SHARD, Role, SetupReport, WORKER_ENV, WorkerConfig, WorkerEvent, now_us,
};
use relay_tests::{Claims, HttpClient, counter_value, unused_port};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The HS256 secret of the bench relays.
const SECRET: &str = "relay-drain-bench-secret-0123456789";

/// Region of every bench relay; owners are `bench:a`, `bench:b`, `bench:c`, `bench:r`.
const REGION: &str = "bench";

/// Admission that never throttles (A's setup, the registration-rate run).
const WIDE_OPEN: u32 = 1_000_000;

/// The relay's defaults, so the "default admission" runs follow them.
const DEFAULT_RATE: u32 = relay::limits::ADMISSION_RATE;
const DEFAULT_BURST: u32 = relay::limits::ADMISSION_BURST;

/// Targets from the issue (reported, not asserted).
const TARGET_NOTIFY: Duration = Duration::from_millis(250);
const TARGET_TOTAL: Duration = Duration::from_secs(3);
const TARGET_P99_REHOME: Duration = Duration::from_secs(1);

/// A host not re-homed within this long counts as "never re-homed".
const REHOME_DEADLINE: Duration = Duration::from_secs(10);

/// How long a relay may take to log `listening`.
const STARTUP_DEADLINE: Duration = Duration::from_secs(15);

/// How long a fleet may take to report ready (its own deadline is 120 s).
const READY_DEADLINE: Duration = Duration::from_secs(150);

/// How long the drained relay may take to exit (its drain deadline is 8 s).
const EXIT_DEADLINE: Duration = Duration::from_secs(20);

/// How long the workers may take to report after the signal.
const REPORT_DEADLINE: Duration = Duration::from_secs(30);

struct Settings {
    sizes: Vec<usize>,
    keep_old: usize,
    register: usize,
    window: usize,
}

fn env_list(name: &str, default: &str) -> Result<Vec<usize>> {
    let raw = std::env::var(name).unwrap_or_default();
    let raw = if raw.trim().is_empty() {
        default
    } else {
        raw.as_str()
    };
    raw.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.replace('_', "")
                .parse()
                .with_context(|| format!("{name}: {s:?} is not a whole number"))
        })
        .collect()
}

fn env_usize(name: &str, default: usize) -> Result<usize> {
    Ok(env_list(name, &default.to_string())?
        .first()
        .copied()
        .unwrap_or(default))
}

impl Settings {
    fn from_env() -> Result<Settings> {
        let sizes: Vec<usize> = env_list("DRAIN_BENCH_SIZES", "1000,5000,10000")?
            .into_iter()
            .filter(|&n| n > 0)
            .collect();
        let largest = sizes.iter().copied().max().unwrap_or(0);
        Ok(Settings {
            keep_old: env_usize("DRAIN_BENCH_KEEP_OLD", largest)?,
            register: env_usize("DRAIN_BENCH_REGISTER", 5_000)?,
            window: env_usize("DRAIN_BENCH_WINDOW", 256)?.max(1),
            sizes,
        })
    }
}

fn main() -> ExitCode {
    if let Some(config) = std::env::var_os(WORKER_ENV) {
        return match drain_clients::worker_main(&config.to_string_lossy()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("drain bench worker failed: {err:#}");
                ExitCode::FAILURE
            }
        };
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("drain bench failed: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let settings = Settings::from_env()?;
    let binary = relay_tests::release_relay_binary("scripts/drain-bench.sh")?;
    let soft = rlimit::increase_nofile_limit(u64::MAX).context("cannot raise RLIMIT_NOFILE")?;
    if soft < 1_024 {
        bail!("RLIMIT_NOFILE is {soft}; at least 1,024 descriptors are needed");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(bench(&binary, &settings, soft))
}

// ---------------------------------------------------------------------------------------
// The machine.

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".to_owned())
}

fn cpu_model() -> String {
    std::process::Command::new("lscpu")
        .output()
        .ok()
        .and_then(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .find(|l| l.starts_with("Model name:"))
                .map(|l| l["Model name:".len()..].trim().to_owned())
        })
        .unwrap_or_else(|| "?".to_owned())
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `rest` starts at field 3.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// `VmHWM` (peak resident set) of `pid` in MiB.
fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn mib(value: Option<f64>) -> String {
    value.map_or_else(|| "?".to_owned(), |v| format!("{v:.0}"))
}

/// CPU time of a few processes over a window: sampled every 50 ms, so a process that
/// exits in the window still counts (up to its last sample).
struct CpuWatch {
    start: HashMap<String, u64>,
    latest: Arc<Mutex<HashMap<String, u64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl CpuWatch {
    fn start(pids: Vec<(String, u32)>) -> CpuWatch {
        let start: HashMap<String, u64> = pids
            .iter()
            .filter_map(|(name, pid)| Some((name.clone(), cpu_ticks(*pid)?)))
            .collect();
        let latest = Arc::new(Mutex::new(start.clone()));
        let task = tokio::spawn({
            let latest = latest.clone();
            async move {
                loop {
                    for (name, pid) in &pids {
                        if let Some(ticks) = cpu_ticks(*pid) {
                            latest
                                .lock()
                                .expect("cpu samples poisoned")
                                .insert(name.clone(), ticks);
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        });
        CpuWatch {
            start,
            latest,
            task,
        }
    }

    /// CPU seconds per process name since the start.
    fn stop(self, ticks_per_second: f64) -> BTreeMap<String, f64> {
        self.task.abort();
        let latest = self.latest.lock().expect("cpu samples poisoned");
        latest
            .iter()
            .map(|(name, &now)| {
                let then = self.start.get(name).copied().unwrap_or(now);
                (
                    name.clone(),
                    now.saturating_sub(then) as f64 / ticks_per_second,
                )
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------
// Redis.

/// A `redis-server` child on a free port, no persistence.
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    async fn start() -> Result<Redis> {
        for _ in 0..5 {
            let port = unused_port();
            let mut child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .context("cannot run redis-server (apt-get install redis-server)")?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if child.try_wait()?.is_some() {
                    break;
                }
                let redis = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
                if let Ok(Ok(mut conn)) = tokio::time::timeout(
                    Duration::from_secs(1),
                    redis.get_multiplexed_async_connection(),
                )
                .await
                    && redis::cmd("PING")
                        .query_async::<String>(&mut conn)
                        .await
                        .is_ok()
                {
                    return Ok(Redis { child, port });
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = child.start_kill();
        }
        bail!("redis-server did not come up on 5 free ports")
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// `GET relay:host:<id>` for every host, by `MGET` batches.
    async fn owners(&self, hosts: usize) -> Result<Vec<Option<String>>> {
        let client = redis::Client::open(self.url())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let mut owners = Vec::with_capacity(hosts);
        let ids: Vec<usize> = (0..hosts).collect();
        for batch in ids.chunks(1_000) {
            let keys: Vec<String> = batch
                .iter()
                .map(|i| format!("relay:host:h{i:05}"))
                .collect();
            let values: Vec<Option<String>> =
                redis::cmd("MGET").arg(&keys).query_async(&mut conn).await?;
            owners.extend(values);
        }
        Ok(owners)
    }
}

// ---------------------------------------------------------------------------------------
// Relays.

/// A command for `binary` with no inherited `RELAY_*`/`FLY_*` settings.
fn clean_command(binary: &Path) -> Command {
    let mut cmd = Command::new(binary);
    for (key, _) in std::env::vars_os() {
        let name = key.to_string_lossy();
        if name.starts_with("RELAY_")
            || name.starts_with("FLY_")
            || name == "REDIS_URL"
            || name == "TOKIO_WORKER_THREADS"
            || name == WORKER_ENV
        {
            cmd.env_remove(&key);
        }
    }
    cmd.env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// A `relay serve` child on `127.0.0.1:0`. Every output line goes to its log file; the
/// drain lines (and warnings) are also kept in memory.
struct Relay {
    child: Child,
    addr: SocketAddr,
    pid: u32,
    kept: Arc<Mutex<Vec<String>>>,
}

impl Relay {
    async fn start(
        binary: &Path,
        machine: &str,
        redis: &Redis,
        rate: u32,
        burst: u32,
        log: &Path,
    ) -> Result<Relay> {
        let mut cmd = clean_command(binary);
        cmd.args(["serve", "--bind", "127.0.0.1", "--port", "0"])
            .args(["--region", REGION, "--machine-id", machine])
            .args(["--redis-url", &redis.url()])
            .args(["--admission-rate", &rate.to_string()])
            .args(["--admission-burst", &burst.to_string()])
            .env("RELAY_JWT_SECRET", SECRET)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let pid = child.id().context("the relay has no pid")?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let mut lines = BufReader::new(stderr).lines();
        let mut file = tokio::fs::File::create(log)
            .await
            .with_context(|| format!("cannot create {}", log.display()))?;
        let mut seen = Vec::new();
        let found = tokio::time::timeout(STARTUP_DEADLINE, async {
            while let Some(line) = lines.next_line().await? {
                let addr = line
                    .contains("listening")
                    .then(|| field(&line, "addr"))
                    .flatten()
                    .and_then(|a| a.parse::<SocketAddr>().ok());
                seen.push(line);
                if let Some(addr) = addr {
                    return Ok(addr);
                }
            }
            Err(anyhow!("relay {machine} exited before listening"))
        })
        .await;
        let addr = match found {
            Ok(Ok(addr)) => addr,
            Ok(Err(err)) => bail!("{err}; its output:\n{}", seen.join("\n")),
            Err(_) => bail!(
                "relay {machine} did not log `listening` within {STARTUP_DEADLINE:?}; \
                 output:\n{}",
                seen.join("\n")
            ),
        };
        let kept = Arc::new(Mutex::new(Vec::new()));
        // Keep reading stderr into the log: a full pipe would block the relay.
        tokio::spawn({
            let kept = kept.clone();
            async move {
                for line in seen {
                    let _ = file.write_all(format!("{line}\n").as_bytes()).await;
                }
                while let Ok(Some(line)) = lines.next_line().await {
                    if line.contains("/6:")
                        || line.contains(" WARN ")
                        || line.contains(" ERROR ")
                        || line.contains("stopped")
                    {
                        kept.lock().expect("log lines poisoned").push(line.clone());
                    }
                    let _ = file.write_all(format!("{line}\n").as_bytes()).await;
                }
                let _ = file.flush().await;
            }
        });
        Ok(Relay {
            child,
            addr,
            pid,
            kept,
        })
    }

    fn kept_lines(&self) -> Vec<String> {
        self.kept.lock().expect("log lines poisoned").clone()
    }

    async fn metrics(&self, http: &HttpClient) -> Result<String> {
        let resp = http
            .get(format!("http://{}/metrics", self.addr))
            .timeout(Duration::from_secs(5))
            .try_send()
            .await
            .map_err(|e| anyhow!("GET /metrics of {}: {e}", self.addr))?;
        Ok(resp.text())
    }

    async fn gauge(&self, http: &HttpClient, name: &str) -> Option<f64> {
        self.metrics(http)
            .await
            .ok()
            .map(|text| counter_value(&text, name, &[]))
    }

    /// Polls `relay_tunnels_connected` until it is `n`.
    async fn wait_tunnels(&self, http: &HttpClient, n: usize, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        let mut last = None;
        loop {
            last = self.gauge(http, "relay_tunnels_connected").await.or(last);
            if last == Some(n as f64) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "relay {} holds {last:?} tunnels, not {n}, after {within:?}",
                    self.addr
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn kill(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}

/// The value of `key=` in a log line (quotes trimmed).
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let needle = format!(" {key}=");
    let start = line.find(&needle)? + needle.len();
    let rest = &line[start..];
    let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
    Some(rest[..end].trim_matches('"'))
}

/// A `Debug`-formatted duration (`1.5ms`, `3.000201s`, `812.1µs`, `40ns`).
fn parse_debug_duration(text: &str) -> Option<Duration> {
    let (number, scale) = if let Some(n) = text.strip_suffix("ns") {
        (n, 1e-9)
    } else if let Some(n) = text.strip_suffix("µs") {
        (n, 1e-6)
    } else if let Some(n) = text.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else {
        return None;
    };
    number
        .parse::<f64>()
        .ok()
        .map(|v| Duration::from_secs_f64(v * scale))
}

/// A's `drain k/6` line: its `elapsed=` and the other fields.
#[derive(Debug, Default, Clone)]
struct Step {
    elapsed: Option<Duration>,
    line: String,
}

impl Step {
    fn get(&self, key: &str) -> Option<&str> {
        field(&self.line, key)
    }
}

fn drain_steps(lines: &[String]) -> Vec<Step> {
    (1..=6)
        .map(|k| {
            let marker = format!("drain {k}/6:");
            lines
                .iter()
                .find(|l| l.contains(&marker))
                .map(|line| Step {
                    elapsed: field(line, "elapsed").and_then(parse_debug_duration),
                    line: line.clone(),
                })
                .unwrap_or_default()
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Worker processes.

/// Worker events, tagged with the worker's number.
type Events = mpsc::UnboundedReceiver<(usize, WorkerEvent)>;

struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    pid: u32,
}

/// Starts the fleet: workers of at most [`MAX_SHARD`] hosts. Their events arrive on the
/// returned channel, tagged with the worker's number.
fn start_fleet(configs: Vec<WorkerConfig>) -> Result<(Vec<Worker>, Events)> {
    let exe = std::env::current_exe().context("the bench executable has no path")?;
    let (tx, rx) = mpsc::unbounded_channel();
    let mut workers = Vec::new();
    for (n, config) in configs.into_iter().enumerate() {
        let mut child = Command::new(&exe)
            .env(WORKER_ENV, serde_json::to_string(&config)?)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start a worker process")?;
        let pid = child.id().context("the worker has no pid")?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout is piped");
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<WorkerEvent>(&line) {
                    Ok(event) => {
                        let _ = tx.send((n, event));
                    }
                    Err(err) => eprintln!(
                        "worker {n}: unreadable line ({err}): {}",
                        line.chars().take(200).collect::<String>()
                    ),
                }
            }
        });
        workers.push(Worker { child, stdin, pid });
    }
    Ok((workers, rx))
}

fn shards(count: usize) -> Vec<(usize, usize)> {
    let workers = count.div_ceil(MAX_SHARD).max(1);
    let per = count.div_ceil(workers);
    (0..workers)
        .map(|w| (w * per, per.min(count - w * per)))
        .filter(|&(_, n)| n > 0)
        .collect()
}

async fn stop_fleet(workers: Vec<Worker>) {
    for mut worker in workers {
        drop(worker.stdin.take());
        if tokio::time::timeout(Duration::from_secs(5), worker.child.wait())
            .await
            .is_err()
        {
            let _ = worker.child.start_kill();
            let _ = worker.child.wait().await;
        }
    }
}

/// Waits for one `Ready` per worker.
async fn wait_ready(events: &mut Events, workers: usize) -> Result<Vec<SetupReport>> {
    let mut reports: Vec<Option<SetupReport>> = (0..workers).map(|_| None).collect();
    let deadline = Instant::now() + READY_DEADLINE;
    while reports.iter().any(Option::is_none) {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some((n, WorkerEvent::Ready(report)))) => reports[n] = Some(report),
            Ok(Some(_)) => {}
            Ok(None) => bail!("the workers exited before registering their hosts"),
            Err(_) => bail!("the fleet did not register within {READY_DEADLINE:?}"),
        }
    }
    Ok(reports.into_iter().flatten().collect())
}

// ---------------------------------------------------------------------------------------
// Statistics.

fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn ms(d: Duration) -> String {
    if d < Duration::from_millis(1) {
        format!("{} µs", d.as_micros())
    } else {
        format!("{:.1} ms", d.as_secs_f64() * 1e3)
    }
}

fn ms_us(us: u64) -> String {
    format!("{:.1} ms", us as f64 / 1e3)
}

fn opt_ms(d: Option<Duration>) -> String {
    d.map_or_else(|| "?".to_owned(), ms)
}

fn since(us: u64, origin_us: u64) -> String {
    if us == 0 || us == u64::MAX {
        return "–".to_owned();
    }
    if us >= origin_us {
        ms_us(us - origin_us)
    } else {
        format!("-{}", ms_us(origin_us - us))
    }
}

fn verdict(value: Option<Duration>, target: Duration) -> &'static str {
    match value {
        Some(v) if v <= target => "met",
        Some(_) => "MISSED",
        None => "?",
    }
}

// ---------------------------------------------------------------------------------------
// The drain run.

struct DrainCase {
    label: String,
    tunnels: usize,
    rate: u32,
    burst: u32,
    /// See `WorkerConfig::close_old_after_ms`.
    close_old_after_ms: Option<u64>,
}

struct DrainResult {
    case: DrainCase,
    rows: Vec<(String, String)>,
    load_before: String,
}

async fn drain_run(
    binary: &Path,
    settings: &Settings,
    case: DrainCase,
    logs: &Path,
    ticks: f64,
) -> Result<DrainResult> {
    let n = case.tunnels;
    let load_before = load_average();
    println!("\n### {} (load average before: {load_before})", case.label);
    let http = HttpClient::new();
    let redis = Redis::start().await?;
    let tag = case.label.replace([' ', ',', '/', '(', ')'], "_");
    let a = Relay::start(
        binary,
        "a",
        &redis,
        WIDE_OPEN,
        WIDE_OPEN,
        &logs.join(format!("{tag}-a.log")),
    )
    .await?;
    let b = Relay::start(
        binary,
        "b",
        &redis,
        case.rate,
        case.burst,
        &logs.join(format!("{tag}-b.log")),
    )
    .await?;
    let c = Relay::start(
        binary,
        "c",
        &redis,
        case.rate,
        case.burst,
        &logs.join(format!("{tag}-c.log")),
    )
    .await?;
    let token = Claims::host("*").sign(SECRET);

    let configs: Vec<WorkerConfig> = shards(n)
        .into_iter()
        .map(|(first, count)| WorkerConfig {
            role: Role::Drain,
            first,
            count,
            home: a.addr,
            targets: vec![b.addr, c.addr],
            token: token.clone(),
            connect_window: settings.window,
            close_old_after_ms: case.close_old_after_ms,
            rehome_deadline_ms: REHOME_DEADLINE.as_secs() * 1_000,
        })
        .collect();
    let (workers, mut events) = start_fleet(configs)?;
    let setups = wait_ready(&mut events, workers.len()).await?;
    let registered: usize = setups.iter().map(|s| s.registered).sum();
    if registered != n {
        bail!("only {registered} of {n} hosts registered with A");
    }
    a.wait_tunnels(&http, n, Duration::from_secs(10)).await?;
    let setup_first = setups.iter().map(|s| s.first_connect_us).min().unwrap_or(0);
    let setup_last = setups
        .iter()
        .map(|s| s.last_registered_us)
        .max()
        .unwrap_or(0);
    let setup_secs = setup_last.saturating_sub(setup_first) as f64 / 1e6;
    println!(
        "{n} tunnels registered with A in {setup_secs:.2} s ({:.0} hosts/s)",
        n as f64 / setup_secs.max(1e-9)
    );

    // The drain.
    let mut pids = vec![
        ("A".to_owned(), a.pid),
        ("B".to_owned(), b.pid),
        ("C".to_owned(), c.pid),
    ];
    if let Some(pid) = redis.pid() {
        pids.push(("redis".to_owned(), pid));
    }
    for (i, w) in workers.iter().enumerate() {
        pids.push((format!("client worker {i}"), w.pid));
    }
    let a_rss = peak_rss_mib(a.pid);
    let cpu = CpuWatch::start(pids);
    let Relay {
        child: mut a_child,
        pid: a_pid,
        kept: a_kept,
        ..
    } = a;
    let signal_us = now_us();
    let signalled = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &a_pid.to_string()])
        .status()
        .await
        .context("cannot run kill")?;
    if !status.success() {
        bail!("kill -TERM {a_pid} failed: {status}");
    }
    let (exit, reports) = tokio::join!(
        async {
            match tokio::time::timeout(EXIT_DEADLINE, a_child.wait()).await {
                Ok(Ok(status)) => Some((signalled.elapsed(), status)),
                _ => {
                    let _ = a_child.start_kill();
                    let _ = a_child.wait().await;
                    None
                }
            }
        },
        async {
            let mut reports: Vec<Option<DrainReport>> = (0..workers.len()).map(|_| None).collect();
            let deadline = Instant::now() + REPORT_DEADLINE;
            while reports.iter().any(Option::is_none) {
                match tokio::time::timeout_at(deadline, events.recv()).await {
                    Ok(Some((i, WorkerEvent::Drained(report)))) => reports[i] = Some(report),
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
            reports
        }
    );
    let cpu = cpu.stop(ticks);
    // Give the log reader a moment to see A's last lines after its exit.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let a_lines = a_kept.lock().expect("log lines poisoned").clone();
    let missing = reports.iter().filter(|r| r.is_none()).count();
    if missing > 0 {
        bail!("{missing} client workers did not report within {REPORT_DEADLINE:?}");
    }
    let reports: Vec<DrainReport> = reports.into_iter().flatten().collect();

    // What B and C counted, and the directory at the end.
    let mut rejected = 0.0;
    let mut on_bc = 0.0;
    for relay in [&b, &c] {
        let text = relay.metrics(&http).await?;
        rejected += counter_value(
            &text,
            "relay_admission_rejections_total",
            &[("reason", "rate")],
        );
        on_bc += counter_value(&text, "relay_tunnels_connected", &[]);
    }
    let owners = redis.owners(n).await?;
    let mut owner_counts: BTreeMap<String, usize> = BTreeMap::new();
    for owner in &owners {
        let key = match owner.as_deref() {
            Some("bench:b") => "B".to_owned(),
            Some("bench:c") => "C".to_owned(),
            Some(other) => format!("other ({other})"),
            None => "missing".to_owned(),
        };
        *owner_counts.entry(key).or_default() += 1;
    }
    let b_rss = peak_rss_mib(b.pid);
    let c_rss = peak_rss_mib(c.pid);
    let workers_rss: Option<f64> = workers.iter().map(|w| peak_rss_mib(w.pid)).sum();
    let mut b_lines = b.kept_lines();
    b_lines.extend(c.kept_lines());

    stop_fleet(workers).await;
    b.kill().await;
    c.kill().await;
    drop(redis);

    // Figures.
    let steps = drain_steps(&a_lines);
    let mut rehome: Vec<u64> = reports
        .iter()
        .flat_map(|r| r.rehome_us.iter().flatten().copied())
        .collect();
    rehome.sort_unstable();
    let deadline_us = u64::try_from(REHOME_DEADLINE.as_micros())?;
    let never = n - rehome.iter().filter(|&&us| us <= deadline_us).count();
    let drained: usize = reports.iter().map(|r| r.drained).sum();
    let first_drain = reports.iter().map(|r| r.first_drain_us).min().unwrap_or(0);
    let last_drain = reports.iter().map(|r| r.last_drain_us).max().unwrap_or(0);
    let last_rehome = reports.iter().map(|r| r.last_rehome_us).max().unwrap_or(0);
    let last_old_end = reports.iter().map(|r| r.last_old_end_us).max().unwrap_or(0);
    let http_429: u64 = reports.iter().map(|r| r.http_429).sum();
    let transport: u64 = reports.iter().map(|r| r.transport_errors).sum();
    let mut retry_after: BTreeMap<u64, u64> = BTreeMap::new();
    let mut other_status: BTreeMap<u16, u64> = BTreeMap::new();
    let mut old_ends: BTreeMap<String, usize> = BTreeMap::new();
    for r in &reports {
        for (k, v) in &r.retry_after {
            *retry_after.entry(*k).or_default() += v;
        }
        for (k, v) in &r.http_other {
            *other_status.entry(*k).or_default() += v;
        }
        for (k, v) in &r.old_ends {
            *old_ends.entry(k.clone()).or_default() += v;
        }
    }
    let p = |q: f64| percentile(&rehome, q).map(Duration::from_micros);

    let mut rows: Vec<(String, String)> = Vec::new();
    let mut row = |k: &str, v: String| rows.push((k.to_owned(), v));
    row("tunnels on A", n.to_string());
    row(
        "admission on B and C (rate/s, burst)",
        format!("{} /s, {}", case.rate, case.burst),
    );
    row(
        "old tunnel",
        match case.close_old_after_ms {
            Some(0) => "closed by the host once replaced".to_owned(),
            Some(ms) => format!("closed by the host {ms} ms after it was replaced"),
            None => "kept until A closes it".to_owned(),
        },
    );
    row(
        "setup: A registered all (hosts/s)",
        format!(
            "{setup_secs:.2} s ({:.0}/s)",
            n as f64 / setup_secs.max(1e-9)
        ),
    );
    row("drain 1/6 mark draining", opt_ms(steps[0].elapsed));
    row(
        "**drain 2/6 drain sent to every tunnel** (target ≤ 250 ms)",
        format!(
            "{} ({}; notified {} of {})",
            opt_ms(steps[1].elapsed),
            verdict(steps[1].elapsed, TARGET_NOTIFY),
            steps[1].get("notified").unwrap_or("?"),
            steps[1].get("tunnels").unwrap_or("?"),
        ),
    );
    row(
        "clients read `drain`: first / last, after SIGTERM",
        format!(
            "{} / {} ({drained} of {n})",
            since(first_drain, signal_us),
            since(last_drain, signal_us)
        ),
    );
    row(
        "drain 3/6 agents moved or grace over",
        format!(
            "{} (ended={}, remaining={})",
            opt_ms(steps[2].elapsed),
            steps[2].get("ended").unwrap_or("?"),
            steps[2].get("remaining").unwrap_or("?")
        ),
    );
    row(
        "**drain 4/6 clear-owned**",
        format!(
            "{} (removed={})",
            opt_ms(steps[3].elapsed),
            steps[3].get("removed").unwrap_or("?")
        ),
    );
    row(
        "drain 5/6 close remaining with 4001",
        format!(
            "{} (tunnels={}, all_closed={})",
            opt_ms(steps[4].elapsed),
            steps[4].get("tunnels").unwrap_or("?"),
            steps[4].get("all_closed").unwrap_or("?")
        ),
    );
    row(
        "**drain 6/6 total** (target < 3 s)",
        format!(
            "{} ({})",
            opt_ms(steps[5].elapsed),
            verdict(steps[5].elapsed, TARGET_TOTAL)
        ),
    );
    row(
        "wall: SIGTERM → A exited",
        match &exit {
            Some((took, status)) => format!("{} ({status})", ms(*took)),
            None => format!("did not exit within {EXIT_DEADLINE:?} (killed)"),
        },
    );
    row(
        "**re-home p50 / p99 / max** (p99 target < 1 s)",
        format!(
            "{} / {} / {} ({})",
            opt_ms(p(50.0)),
            opt_ms(p(99.0)),
            opt_ms(rehome.last().copied().map(Duration::from_micros)),
            verdict(p(99.0), TARGET_P99_REHOME)
        ),
    );
    row("re-home p90", opt_ms(p(90.0)));
    row(
        "last host re-homed, after SIGTERM",
        since(last_rehome, signal_us),
    );
    row(
        "**429s seen by hosts** (Retry-After s: count)",
        format!(
            "{http_429} ({})",
            if retry_after.is_empty() {
                "–".to_owned()
            } else {
                retry_after
                    .iter()
                    .map(|(s, c)| format!("{s}s: {c}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ),
    );
    row(
        "`relay_admission_rejections_total{reason=\"rate\"}` B + C",
        format!("{rejected:.0}"),
    );
    row(
        "other refusals / transport failures on re-home",
        format!(
            "{} / {transport}",
            if other_status.is_empty() {
                "0".to_owned()
            } else {
                other_status
                    .iter()
                    .map(|(s, c)| format!("{s}: {c}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ),
    );
    row("**hosts not re-homed within 10 s**", never.to_string());
    let mut gaps: Vec<u64> = reports
        .iter()
        .flat_map(|r| r.gaps_us.iter().copied())
        .collect();
    gaps.sort_unstable();
    row(
        "hosts with no tunnel for a while (old closed before new registered): count, max",
        format!(
            "{}, {}",
            gaps.len(),
            gaps.last().map_or_else(|| "–".to_owned(), |&us| ms_us(us))
        ),
    );
    row(
        "directory at the end (`relay:host:<id>`)",
        owner_counts
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    row("tunnels on B + C at the end", format!("{on_bc:.0}"));
    row(
        "old tunnels ended (how: count), last after SIGTERM",
        format!(
            "{}; {}",
            old_ends
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join(", "),
            since(last_old_end, signal_us)
        ),
    );
    row(
        "CPU s from SIGTERM to report: A / B / C / redis / clients",
        format!(
            "{:.2} / {:.2} / {:.2} / {:.2} / {:.2}",
            cpu.get("A").copied().unwrap_or(0.0),
            cpu.get("B").copied().unwrap_or(0.0),
            cpu.get("C").copied().unwrap_or(0.0),
            cpu.get("redis").copied().unwrap_or(0.0),
            cpu.iter()
                .filter(|(k, _)| k.starts_with("client"))
                .map(|(_, v)| v)
                .sum::<f64>()
        ),
    );
    row(
        "peak RSS MiB: A (before SIGTERM) / B / C / client workers",
        format!(
            "{} / {} / {} / {}",
            mib(a_rss),
            mib(b_rss),
            mib(c_rss),
            mib(workers_rss)
        ),
    );
    let warnings: Vec<&String> = a_lines
        .iter()
        .chain(b_lines.iter())
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .filter(|l| !l.contains("stop requested"))
        .collect();
    row("relay warnings/errors logged", warnings.len().to_string());

    for (k, v) in &rows {
        println!("- {k}: {v}");
    }
    for line in warnings.iter().take(5) {
        println!("  warning: {line}");
    }
    Ok(DrainResult {
        case,
        rows,
        load_before,
    })
}

// ---------------------------------------------------------------------------------------
// The registration-rate run.

async fn register_run(
    binary: &Path,
    settings: &Settings,
    logs: &Path,
    ticks: f64,
) -> Result<Vec<(String, String)>> {
    let n = settings.register;
    let load_before = load_average();
    println!(
        "\n### Registration rate: {n} hosts, one relay with Redis (load average before: {load_before})"
    );
    let http = HttpClient::new();
    let redis = Redis::start().await?;
    let relay = Relay::start(
        binary,
        "r",
        &redis,
        WIDE_OPEN,
        WIDE_OPEN,
        &logs.join("register-r.log"),
    )
    .await?;
    let token = Claims::host("*").sign(SECRET);
    let configs: Vec<WorkerConfig> = shards(n)
        .into_iter()
        .map(|(first, count)| WorkerConfig {
            role: Role::Register,
            first,
            count,
            home: relay.addr,
            targets: vec![relay.addr],
            token: token.clone(),
            connect_window: settings.window,
            close_old_after_ms: None,
            rehome_deadline_ms: 0,
        })
        .collect();
    let mut pids = vec![("relay".to_owned(), relay.pid)];
    if let Some(pid) = redis.pid() {
        pids.push(("redis".to_owned(), pid));
    }
    let cpu = CpuWatch::start(pids);
    let (workers, mut events) = start_fleet(configs)?;
    let setups = wait_ready(&mut events, workers.len()).await?;
    let cpu = cpu.stop(ticks);
    let registered: usize = setups.iter().map(|s| s.registered).sum();
    if registered != n {
        bail!("only {registered} of {n} hosts registered");
    }
    relay
        .wait_tunnels(&http, n, Duration::from_secs(10))
        .await?;
    let owners = redis.owners(n).await?;
    let in_directory = owners
        .iter()
        .filter(|o| o.as_deref() == Some("bench:r"))
        .count();
    let relay_rss = peak_rss_mib(relay.pid);
    stop_fleet(workers).await;
    relay.kill().await;
    drop(redis);

    let first = setups.iter().map(|s| s.first_connect_us).min().unwrap_or(0);
    let last = setups
        .iter()
        .map(|s| s.last_registered_us)
        .max()
        .unwrap_or(0);
    let secs = last.saturating_sub(first) as f64 / 1e6;
    let mut latencies: Vec<u64> = setups
        .iter()
        .flat_map(|s| s.latencies_us.iter().copied())
        .collect();
    latencies.sort_unstable();
    let failed_attempts: u64 = setups.iter().map(|s| s.failed_attempts).sum();
    let relay_cpu = cpu.get("relay").copied().unwrap_or(0.0);
    let redis_cpu = cpu.get("redis").copied().unwrap_or(0.0);
    let p = |q: f64| percentile(&latencies, q).map_or_else(|| "?".to_owned(), ms_us);
    let rows = vec![
        ("hosts".to_owned(), n.to_string()),
        (
            "concurrent handshakes (window)".to_owned(),
            settings.window.to_string(),
        ),
        (
            "first connect → last host's first `ping`".to_owned(),
            format!("{secs:.2} s"),
        ),
        (
            "**registrations per second**".to_owned(),
            format!("{:.0}", n as f64 / secs.max(1e-9)),
        ),
        (
            "per host: connect → first `ping` p50 / p99 / max".to_owned(),
            format!("{} / {} / {}", p(50.0), p(99.0), p(100.0)),
        ),
        (
            "failed attempts (retried)".to_owned(),
            failed_attempts.to_string(),
        ),
        (
            "directory entries naming the relay".to_owned(),
            format!("{in_directory} of {n}"),
        ),
        (
            "CPU s: relay / redis (clients share the same 2 cores)".to_owned(),
            format!("{relay_cpu:.2} / {redis_cpu:.2}"),
        ),
        (
            "relay CPU per 1,000 registrations".to_owned(),
            format!("{:.0} ms", relay_cpu * 1e3 * 1_000.0 / n as f64),
        ),
        (
            "relay peak RSS".to_owned(),
            format!("{} MiB", mib(relay_rss)),
        ),
        ("load average before".to_owned(), load_before),
    ];
    for (k, v) in &rows {
        println!("- {k}: {v}");
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------------------

async fn bench(binary: &Path, settings: &Settings, nofile: u64) -> Result<()> {
    let logs = std::env::temp_dir().join(format!("relay-drain-bench-{}", std::process::id()));
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let ticks = clock_ticks();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = cpu_model();
    let load_start = load_average();
    println!("binary: {}", binary.display());
    println!("logs: {}", logs.display());
    println!(
        "machine: {cores} cores, {model}; load average at start {load_start}; \
         RLIMIT_NOFILE {nofile}; client workers of at most {MAX_SHARD} hosts"
    );

    // The hosts behave as `relay agent` does with an idle drained tunnel: closed once the
    // agent's linger after the replacement is over.
    let linger = u64::try_from(relay::limits::agent::DRAINED_TUNNEL_LINGER.as_millis())?;
    let mut cases = Vec::new();
    for &n in &settings.sizes {
        cases.push(DrainCase {
            label: format!("{n} tunnels, default admission"),
            tunnels: n,
            rate: DEFAULT_RATE,
            burst: DEFAULT_BURST,
            close_old_after_ms: Some(linger),
        });
    }
    // A v1 agent that never closes its old tunnel: A must close it (4001).
    if settings.keep_old > 0 {
        cases.push(DrainCase {
            label: format!(
                "{} tunnels, default admission, old tunnel kept until A closes it",
                settings.keep_old
            ),
            tunnels: settings.keep_old,
            rate: DEFAULT_RATE,
            burst: DEFAULT_BURST,
            close_old_after_ms: None,
        });
    }

    let mut results = Vec::new();
    for case in cases {
        results.push(drain_run(binary, settings, case, &logs, ticks).await?);
    }
    let register = if settings.register > 0 {
        Some(register_run(binary, settings, &logs, ticks).await?)
    } else {
        None
    };

    // The summary.
    println!();
    println!("## Graceful drain (A → B + C, shared Redis, release relay, 127.0.0.1)");
    println!();
    println!(
        "Machine: {cores} cores ({model}); load average at start {load_start}, at end {}.",
        load_average()
    );
    if !results.is_empty() {
        println!();
        let header: Vec<String> = (1..=results.len()).map(|i| format!("run {i}")).collect();
        println!("| figure | {} |", header.join(" | "));
        println!("|---|{}", "---|".repeat(results.len()));
        for (i, (label, _)) in results[0].rows.iter().enumerate() {
            let values: Vec<&str> = results
                .iter()
                .map(|r| r.rows.get(i).map_or("?", |(_, v)| v.as_str()))
                .collect();
            println!("| {label} | {} |", values.join(" | "));
        }
        let loads: Vec<&str> = results.iter().map(|r| r.load_before.as_str()).collect();
        println!("| load average before the run | {} |", loads.join(" | "));
        println!();
        for (i, r) in results.iter().enumerate() {
            println!("- run {}: {}", i + 1, r.case.label);
        }
    }
    if let Some(rows) = register {
        println!();
        println!("## Registration rate (one relay with Redis, admission off)");
        println!();
        println!("| figure | value |");
        println!("|---|---|");
        for (k, v) in rows {
            println!("| {k} | {v} |");
        }
    }
    if std::env::var_os("DRAIN_BENCH_KEEP_LOGS").is_none() {
        let _ = std::fs::remove_dir_all(&logs);
    }
    Ok(())
}
