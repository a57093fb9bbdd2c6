//! Tunnel comparison: the same upstream and the same load generator, straight (`direct`),
//! through rathole, through the release relay with a real `relay agent` (`v1`; with
//! `--protocol v1` when the agent has that flag, whose default picks h2 when the relay
//! offers it), and the same with `relay agent --protocol h2` (`h2`, skipped when this
//! relay build has no such flag). The paths are measured interleaved (A B C D, A B C D,
//! … one set after another) and reported as medians with their min–max over the sets.
//!
//! Run with `scripts/bench.sh tunnels`, which installs wrk and rathole when missing and
//! builds the release relay. Figures only: it fails when something does not work, never
//! on timing.
//!
//! Parts (`BENCH_ONLY`, comma-separated; all but `loadgen` by default):
//!
//! - `small`: GETs of a 64-byte body on keep-alive connections, at `BENCH_CLIENTS`
//!   connections and at 1: requests/s, p50/p99, and the tunnel's CPU per request
//!   (utime + stime of each tunnel process from /proc/<pid>/stat, and their sum; and
//!   the sum's user-space part, utime alone: the kernel's part is about the same for
//!   every tunnel, so that is where they differ); at 1 connection also the p50 added
//!   over direct in the same set.
//! - `bulk`: a download and an upload of `BENCH_DOWN_BYTES` / `BENCH_UP_BYTES` (1 GiB),
//!   and a download of `BENCH_MEDIUM_BYTES` (8 MiB, within v1's 10 MiB limit): MB/s
//!   (10^6 bytes/s) and the peak RSS (VmHWM, reset before each transfer) of each tunnel
//!   process. What fails is reported with the status it got, never skipped.
//! - `sse`: the upstream writes one event `BENCH_SSE_DELAY_MS` after the request and
//!   holds the stream open `BENCH_SSE_HOLD_MS` more; the figure is the time from its
//!   writing to its arrival at the client, `BENCH_SSE_COUNT` per path and set.
//! - `idle`: the relay's memory per idle tunnel at `BENCH_TUNNELS` tunnels: v1, h2 (never
//!   used, so no HTTP/2 connection yet) and `h2-used` (h2 tunnels that each carried one
//!   request, then stayed idle past the relay's `RELAY_H2_IDLE_CONNECTION`, set to 1 s).
//! - `loadgen`: the two load generators against direct, side by side (how the default
//!   generator was chosen).
//!
//! Other knobs:
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `BENCH_SECS` | 10 | measured seconds of each run at `BENCH_CLIENTS` connections (half, at least 1, at 1 connection) |
//! | `BENCH_WARMUP_SECS` | 2 (1 when `BENCH_SECS` < 5) | one unmeasured run per path before the first set |
//! | `BENCH_SETS` | 6 | interleaved sets |
//! | `BENCH_CLIENTS` | 64 | connections of the loaded runs |
//! | `BENCH_PATHS` | `direct,rathole,v1,h2` | what to measure |
//! | `BENCH_LOADGEN` | `wrk` | `wrk` or `builtin` (tests/bench/load.rs) |
//! | `BENCH_BULK_TIMEOUT_SECS` | 120 | deadline of one bulk transfer |
//! | `BENCH_TUNNELS` | `1000,5000` | idle tunnel counts |
//! | `BENCH_SETTLE_SECS` | 3 (1 when `BENCH_SECS` < 5) | wait before the idle RSS reading |
//! | `BENCH_RELAY_WORKERS` | relay default | the relay children's `TOKIO_WORKER_THREADS` |
//! | `BENCH_AGENT_WORKERS` | agent default | the agent children's `TOKIO_WORKER_THREADS` |
//! | `BENCH_RATHOLE_WORKERS` | rathole default (one per CPU) | the rathole children's `TOKIO_WORKER_THREADS` |
//! | `RELAY_BIN`, `RATHOLE_BIN`, `WRK_BIN` | see `scripts/bench.sh` | binaries to run |
//!
//! Sizes take a binary suffix: `8M`, `1G`. Quick smoke run:
//! `BENCH_SECS=2 BENCH_SETS=2 BENCH_TUNNELS=200 BENCH_DOWN_BYTES=256M BENCH_UP_BYTES=256M scripts/bench.sh tunnels`.

mod idle;
mod knobs;
#[allow(
    dead_code,
    reason = "shared with the proxy bench, whose report reads the parts this one does not"
)]
mod load;
#[allow(
    dead_code,
    reason = "shared with the proxy bench, whose report reads the parts this one does not"
)]
mod relay_child;
mod transfer;
mod tunnel_procs;
mod upstream;
#[allow(
    dead_code,
    reason = "the forwarding host is the proxy bench's; this one only opens idle tunnels"
)]
mod v1_host;
mod wrk;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Result, bail};

use knobs::{env_bytes, env_list, env_u64, env_words};
use transfer::Endpoint;
use tunnel_procs::{Rathole, RelayTunnel, cpu_ticks, user_ticks};
use upstream::{BODY, Upstream};
use v1_host::IdleProtocol;
use wrk::Wrk;

/// The paths, in the order of every set.
const PATHS: [&str; 4] = ["direct", "rathole", "v1", "h2"];
const PARTS: [&str; 5] = ["small", "bulk", "sse", "idle", "loadgen"];

/// v1 carries bodies up to the relay's `--max-body-bytes` (requests) and the agent's
/// response limit, both 10 MiB by default: a failure above it is v1's limit.
const V1_MAX_BODY: u64 = 10 * 1024 * 1024;

/// Target: an idle h2 tunnel costs the relay at most this.
const TARGET_IDLE_KIB: f64 = 32.0;
/// Target: h2's first SSE event at most this much later than rathole's.
const TARGET_SSE_SLACK_MS: f64 = 2.0;

struct Settings {
    secs: u64,
    single_secs: u64,
    warmup_secs: u64,
    sets: usize,
    clients: usize,
    parts: Vec<String>,
    paths: Vec<String>,
    builtin_load: bool,
    down_bytes: u64,
    up_bytes: u64,
    medium_bytes: u64,
    bulk_timeout: Duration,
    sse_delay: Duration,
    sse_hold: Duration,
    sse_count: usize,
    tunnels: Vec<usize>,
    settle: Duration,
}

impl Settings {
    fn from_env() -> Result<Settings> {
        let secs = env_u64("BENCH_SECS")?.unwrap_or(10).max(1);
        let quick = secs < 5;
        let default_parts = PARTS.iter().filter(|p| **p != "loadgen");
        let loadgen = env_words("BENCH_LOADGEN", &["wrk", "builtin"])?.unwrap_or_default();
        if loadgen.len() > 1 {
            bail!("BENCH_LOADGEN: one generator, `wrk` or `builtin`");
        }
        Ok(Settings {
            secs,
            single_secs: (secs / 2).max(1),
            warmup_secs: env_u64("BENCH_WARMUP_SECS")?.unwrap_or(if quick { 1 } else { 2 }),
            sets: usize::try_from(env_u64("BENCH_SETS")?.unwrap_or(6).max(1))?,
            clients: usize::try_from(env_u64("BENCH_CLIENTS")?.unwrap_or(64).max(1))?,
            parts: env_words("BENCH_ONLY", &PARTS)?
                .unwrap_or_else(|| default_parts.map(|p| (*p).to_owned()).collect()),
            paths: env_words("BENCH_PATHS", &PATHS)?
                .unwrap_or_else(|| PATHS.iter().map(|p| (*p).to_owned()).collect()),
            builtin_load: loadgen.first().is_some_and(|g| g == "builtin"),
            down_bytes: env_bytes("BENCH_DOWN_BYTES")?.unwrap_or(1 << 30),
            up_bytes: env_bytes("BENCH_UP_BYTES")?.unwrap_or(1 << 30),
            medium_bytes: env_bytes("BENCH_MEDIUM_BYTES")?.unwrap_or(8 << 20),
            bulk_timeout: Duration::from_secs(env_u64("BENCH_BULK_TIMEOUT_SECS")?.unwrap_or(120)),
            sse_delay: Duration::from_millis(env_u64("BENCH_SSE_DELAY_MS")?.unwrap_or(200)),
            sse_hold: Duration::from_millis(env_u64("BENCH_SSE_HOLD_MS")?.unwrap_or(1_000)),
            sse_count: usize::try_from(env_u64("BENCH_SSE_COUNT")?.unwrap_or(3).max(1))?,
            tunnels: env_list("BENCH_TUNNELS")?.unwrap_or_else(|| vec![1_000, 5_000]),
            settle: Duration::from_secs(env_u64("BENCH_SETTLE_SECS")?.unwrap_or(if quick {
                1
            } else {
                3
            })),
        })
    }

    fn part(&self, name: &str) -> bool {
        self.parts.iter().any(|p| p == name)
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("bench failed: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let settings = Settings::from_env()?;
    let binary = relay_tests::release_relay_binary("scripts/bench.sh tunnels")?;
    let (soft, hard) = idle::raise_nofile()?;
    let needed = settings.tunnels.iter().copied().max().unwrap_or(0) as u64 + 512;
    if settings.part("idle") && soft < needed {
        bail!(
            "RLIMIT_NOFILE is {soft} (hard {hard}) but {needed} descriptors are needed for \
             the idle tunnels: raise the hard limit or lower BENCH_TUNNELS"
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(bench(&binary, &settings))
}

// === what is measured ===

/// A path under test: where to send requests and which processes make up the tunnel.
struct Subject {
    name: &'static str,
    endpoint: Endpoint,
    /// The tunnel's processes, each with its role: what CPU and memory are read of.
    procs: Vec<(&'static str, u32)>,
    /// Held so that the processes live as long as the subject.
    _running: Running,
}

enum Running {
    Nothing,
    Rathole { _tunnel: Rathole },
    Relay { _tunnel: RelayTunnel },
}

/// A scratch directory for the rathole configurations and wrk's Lua hook; removed when
/// dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Scratch> {
        let dir = std::env::temp_dir().join(format!("relay-bench-tunnels-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn start_subjects(
    binary: &Path,
    settings: &Settings,
    upstream: &Upstream,
    scratch: &Path,
) -> Result<Vec<Subject>> {
    let client_token = relay_child::token("client");
    let mut subjects = Vec::new();
    for name in PATHS {
        if !settings.paths.iter().any(|p| p == name) {
            continue;
        }
        let subject = match name {
            "direct" => Subject {
                name,
                endpoint: Endpoint {
                    addr: upstream.addr,
                    prefix: String::new(),
                    bearer: None,
                },
                procs: Vec::new(),
                _running: Running::Nothing,
            },
            "rathole" => {
                let bin = tunnel_procs::rathole_binary()?;
                let rathole = Rathole::start(&bin, scratch, upstream.addr).await?;
                eprintln!(
                    "rathole: {} (server pid {}, client pid {}) on {}",
                    bin.display(),
                    rathole.server.pid,
                    rathole.client.pid,
                    rathole.addr
                );
                Subject {
                    name,
                    endpoint: Endpoint {
                        addr: rathole.addr,
                        prefix: String::new(),
                        bearer: None,
                    },
                    procs: vec![
                        ("server", rathole.server.pid),
                        ("client", rathole.client.pid),
                    ],
                    _running: Running::Rathole { _tunnel: rathole },
                }
            }
            _ => {
                // An agent with `--protocol` picks h2 by itself when the relay offers it
                // (`auto`), so v1 must then be asked for by name; an agent without the
                // flag speaks only v1, and h2 cannot be measured.
                let has_flag = tunnel_procs::agent_has_protocol_flag(binary).await?;
                if name == "h2" && !has_flag {
                    println!("h2: this relay build has no --protocol flag; skipped");
                    continue;
                }
                let protocol = has_flag.then_some(name);
                let host_id = format!("bench-{name}");
                let started =
                    RelayTunnel::start(binary, upstream.addr, &host_id, protocol, &client_token)
                        .await;
                let tunnel = match started {
                    Ok(tunnel) => tunnel,
                    // h2 is new: its failing to start must not cost the other paths' run.
                    Err(err) if name == "h2" => {
                        println!("h2: did not start ({err:#}); skipped");
                        continue;
                    }
                    Err(err) => return Err(err),
                };
                eprintln!(
                    "{name}: relay pid {} on {}, agent pid {}",
                    tunnel.relay.pid(),
                    tunnel.relay.addr,
                    tunnel.agent.pid
                );
                Subject {
                    name,
                    endpoint: Endpoint {
                        addr: tunnel.relay.addr,
                        prefix: format!("/hosts/{}", tunnel.host_id),
                        bearer: Some(client_token.clone()),
                    },
                    procs: vec![("relay", tunnel.relay.pid()), ("agent", tunnel.agent.pid)],
                    _running: Running::Relay { _tunnel: tunnel },
                }
            }
        };
        subjects.push(subject);
    }
    Ok(subjects)
}

// === the figures ===

/// Every sample of the run: `(figure, path)` → values, one per set (or per event), and
/// the failures of attempts that produced no value.
#[derive(Default)]
struct Report {
    values: BTreeMap<(String, String), Vec<f64>>,
    failures: BTreeMap<(String, String), Vec<String>>,
}

impl Report {
    fn add(&mut self, figure: &str, path: &str, value: f64) {
        self.values
            .entry((figure.to_owned(), path.to_owned()))
            .or_default()
            .push(value);
    }

    fn fail(&mut self, figure: &str, path: &str, why: String) {
        self.failures
            .entry((figure.to_owned(), path.to_owned()))
            .or_default()
            .push(why);
    }

    fn samples(&self, figure: &str, path: &str) -> Option<&[f64]> {
        self.values
            .get(&(figure.to_owned(), path.to_owned()))
            .map(Vec::as_slice)
            .filter(|v| !v.is_empty())
    }

    fn median(&self, figure: &str, path: &str) -> Option<f64> {
        let mut v = self.samples(figure, path)?.to_vec();
        v.sort_by(f64::total_cmp);
        let mid = v.len() / 2;
        Some(if v.len() % 2 == 1 {
            v[mid]
        } else {
            (v[mid - 1] + v[mid]) / 2.0
        })
    }

    /// "median (min–max)", or what failed, or "–".
    fn cell(&self, figure: &str, path: &str, decimals: usize) -> String {
        let mut text = match self.samples(figure, path) {
            Some(v) => {
                let median = self.median(figure, path).expect("samples exist");
                let min = v.iter().copied().fold(f64::INFINITY, f64::min);
                let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                if v.len() == 1 {
                    format!("{median:.decimals$}")
                } else {
                    format!("{median:.decimals$} ({min:.decimals$}–{max:.decimals$})")
                }
            }
            None => String::new(),
        };
        if let Some(failures) = self.failures.get(&(figure.to_owned(), path.to_owned())) {
            let mut distinct: Vec<&str> = failures.iter().map(String::as_str).collect();
            distinct.sort_unstable();
            distinct.dedup();
            let what = distinct.join("; ");
            if text.is_empty() {
                text = what;
            } else {
                text = format!("{text}; {} failed: {what}", failures.len());
            }
        }
        if text.is_empty() {
            "–".to_owned()
        } else {
            text
        }
    }
}

/// The scheduler's exact run time of the tunnel's processes, summed (a cross-check of
/// utime + stime, which is tick-sampled and reads high when a process runs often and
/// briefly, as at one connection).
fn sched_time(procs: &[(&str, u32)]) -> Duration {
    procs
        .iter()
        .filter_map(|(_, pid)| relay_child::cpu_time(relay_child::Proc::Pid(*pid)))
        .sum()
}

/// CPU per request in µs from a tick delta.
fn us_per_request(ticks: u64, tck: u64, requests: u64) -> f64 {
    ticks as f64 * 1e6 / tck as f64 / requests.max(1) as f64
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// What the machine did during a part: its busy share, the share of it that was not this
/// bench (its processes, its tunnels, what it reaped), and steal. Other sessions' builds
/// make figures noisy; this says how much.
struct MachineWatch {
    stat: [u64; 3],
    ours: u64,
}

/// (busy, total, steal) ticks of all CPUs, from the first line of /proc/stat.
fn machine_ticks() -> [u64; 3] {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return [0; 3];
    };
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = f.iter().take(8).sum();
    let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
    [
        total.saturating_sub(idle),
        total,
        f.get(7).copied().unwrap_or(0),
    ]
}

fn our_ticks(subjects: &[Subject]) -> u64 {
    let procs: u64 = subjects
        .iter()
        .flat_map(|s| &s.procs)
        .filter_map(|(_, pid)| cpu_ticks(Some(*pid)).ok())
        .sum();
    procs + cpu_ticks(None).unwrap_or(0) + tunnel_procs::reaped_children_ticks().unwrap_or(0)
}

impl MachineWatch {
    fn start(subjects: &[Subject]) -> MachineWatch {
        MachineWatch {
            stat: machine_ticks(),
            ours: our_ticks(subjects),
        }
    }

    fn summary(&self, subjects: &[Subject]) -> String {
        let now = machine_ticks();
        let busy = now[0].saturating_sub(self.stat[0]);
        let total = now[1].saturating_sub(self.stat[1]).max(1);
        let steal = now[2].saturating_sub(self.stat[2]);
        let ours = our_ticks(subjects).saturating_sub(self.ours);
        let pct = |t: u64| t as f64 * 100.0 / total as f64;
        format!(
            "machine busy {:.0} %, of which other processes {:.0} %, steal {:.1} % (of both CPUs)",
            pct(busy),
            pct(busy.saturating_sub(ours)),
            pct(steal)
        )
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

// === the load generators ===

/// One closed-loop run of GETs of the small body.
struct LoadRun {
    ok: u64,
    failed: u64,
    rps: f64,
    p50: Duration,
    p99: Duration,
    /// The load side's CPU: the bench process (upstream, and the built-in generator when
    /// it is the one) plus wrk, in clock ticks.
    load_ticks: u64,
    /// wrk's part of it (0 for the built-in generator).
    wrk_ticks: u64,
}

enum Generator {
    Wrk(Wrk),
    Builtin,
}

impl Generator {
    fn name(&self) -> &'static str {
        match self {
            Generator::Wrk(_) => "wrk",
            Generator::Builtin => "builtin",
        }
    }

    async fn run(&self, endpoint: &Endpoint, connections: usize, secs: u64) -> Result<LoadRun> {
        let path = format!("{}/small", endpoint.prefix);
        let before = cpu_ticks(None)?;
        let run = match self {
            Generator::Wrk(wrk) => {
                let url = format!("http://{}{path}", endpoint.addr);
                let r = wrk
                    .run(&url, endpoint.bearer.as_deref(), connections, secs)
                    .await?;
                LoadRun {
                    ok: r.ok,
                    failed: r.failed,
                    rps: r.rps(),
                    p50: r.p50,
                    p99: r.p99,
                    load_ticks: r.cpu_ticks,
                    wrk_ticks: r.cpu_ticks,
                }
            }
            Generator::Builtin => {
                let target = load::Target {
                    addr: endpoint.addr,
                    path,
                    bearer: endpoint.bearer.clone(),
                    expect_body: BODY,
                };
                // No warm-up inside the run: like wrk, the connections open in the window
                // (the bench warms every path up once before the first set).
                let shape = load::Shape {
                    clients: connections,
                    warmup: Duration::ZERO,
                    measure: Duration::from_secs(secs),
                };
                let s = load::run(target, shape, &[]).await?;
                LoadRun {
                    ok: s.ok,
                    failed: s.failed,
                    rps: s.rps(),
                    p50: s.quantile(0.50),
                    p99: s.quantile(0.99),
                    load_ticks: 0,
                    wrk_ticks: 0,
                }
            }
        };
        Ok(LoadRun {
            load_ticks: run.load_ticks + cpu_ticks(None)?.saturating_sub(before),
            ..run
        })
    }
}

// === the run ===

async fn bench(binary: &Path, settings: &Settings) -> Result<()> {
    let tck = tunnel_procs::clock_ticks();
    let scratch = Scratch::new()?;
    let generator = if settings.builtin_load {
        Generator::Builtin
    } else {
        Generator::Wrk(Wrk::new(&scratch.0)?)
    };
    println!("relay binary: {}", binary.display());
    println!(
        "load generator: {}; {} sets; load average at start: {}",
        generator.name(),
        settings.sets,
        load_average()
    );

    let upstream = Upstream::start().await?;
    let subjects = start_subjects(binary, settings, &upstream, &scratch.0).await?;
    let mut report = Report::default();

    if settings.part("loadgen") {
        let watch = MachineWatch::start(&subjects);
        loadgen_part(settings, &scratch.0, &subjects, &mut report, tck).await?;
        println!(
            "during the load-generator part: {}",
            watch.summary(&subjects)
        );
    }
    if settings.part("small") {
        let watch = MachineWatch::start(&subjects);
        small_part(settings, &generator, &subjects, &mut report, tck).await?;
        println!(
            "during the small-request part: {}",
            watch.summary(&subjects)
        );
    }
    if settings.part("bulk") {
        let watch = MachineWatch::start(&subjects);
        bulk_part(settings, &subjects, &mut report).await;
        println!("during the bulk part: {}", watch.summary(&subjects));
    }
    if settings.part("sse") {
        let watch = MachineWatch::start(&subjects);
        sse_part(settings, &subjects, &upstream, &mut report).await;
        println!("during the SSE part: {}", watch.summary(&subjects));
    }
    let names: Vec<&str> = subjects.iter().map(|s| s.name).collect();
    // The tunnels' processes go before the idle part, which starts relays of its own.
    drop(subjects);
    if settings.part("idle") {
        idle_part(binary, settings, &names, &mut report).await?;
    }
    println!("load average at the end: {}", load_average());
    print_report(settings, &generator, &names, &report);
    Ok(())
}

async fn loadgen_part(
    settings: &Settings,
    scratch: &Path,
    subjects: &[Subject],
    report: &mut Report,
    tck: u64,
) -> Result<()> {
    let Some(direct) = subjects.iter().find(|s| s.name == "direct") else {
        bail!("BENCH_ONLY=loadgen compares the generators against direct: add it to BENCH_PATHS");
    };
    let generators = [Generator::Wrk(Wrk::new(scratch)?), Generator::Builtin];
    for g in &generators {
        g.run(
            &direct.endpoint,
            settings.clients,
            settings.warmup_secs.max(1),
        )
        .await?;
    }
    for set in 1..=settings.sets {
        for g in &generators {
            let run = g
                .run(&direct.endpoint, settings.clients, settings.secs)
                .await?;
            eprintln!(
                "loadgen set {set}: {} {:.0} req/s, load side {:.1} µs/req",
                g.name(),
                run.rps,
                us_per_request(run.load_ticks, tck, run.ok)
            );
            report.add("loadgen.rps", g.name(), run.rps);
            report.add("loadgen.p50", g.name(), run.p50.as_secs_f64() * 1e6);
            report.add(
                "loadgen.cpu",
                g.name(),
                us_per_request(run.load_ticks, tck, run.ok),
            );
            report.add(
                "loadgen.bench",
                g.name(),
                us_per_request(run.load_ticks - run.wrk_ticks, tck, run.ok),
            );
        }
    }
    Ok(())
}

async fn small_part(
    settings: &Settings,
    generator: &Generator,
    subjects: &[Subject],
    report: &mut Report,
    tck: u64,
) -> Result<()> {
    for s in subjects {
        eprintln!("small: warming up {} ...", s.name);
        generator
            .run(&s.endpoint, settings.clients, settings.warmup_secs.max(1))
            .await?;
    }
    let shapes = [(settings.clients, settings.secs), (1, settings.single_secs)];
    for set in 1..=settings.sets {
        for (connections, secs) in shapes {
            let mut direct_p50 = None;
            for s in subjects {
                let figure = format!("small.{connections}");
                let before: Vec<u64> = s
                    .procs
                    .iter()
                    .map(|(_, pid)| cpu_ticks(Some(*pid)))
                    .collect::<Result<_>>()?;
                let user_before: u64 = s
                    .procs
                    .iter()
                    .map(|(_, pid)| user_ticks(*pid))
                    .sum::<Result<_>>()?;
                let sched_before = sched_time(&s.procs);
                let run = match generator.run(&s.endpoint, connections, secs).await {
                    Ok(run) if run.ok > 0 => run,
                    Ok(run) => {
                        report.fail(
                            &figure,
                            s.name,
                            format!("no request succeeded ({} failed)", run.failed),
                        );
                        continue;
                    }
                    Err(err) => {
                        report.fail(&figure, s.name, format!("{err:#}"));
                        continue;
                    }
                };
                let sched = sched_time(&s.procs).saturating_sub(sched_before);
                let user = s
                    .procs
                    .iter()
                    .map(|(_, pid)| user_ticks(*pid))
                    .sum::<Result<u64>>()?
                    .saturating_sub(user_before);
                let mut tunnel_ticks = 0;
                for ((role, pid), before) in s.procs.iter().zip(before) {
                    let ticks = cpu_ticks(Some(*pid))?.saturating_sub(before);
                    tunnel_ticks += ticks;
                    report.add(
                        &format!("{figure}.cpu.{role}"),
                        s.name,
                        us_per_request(ticks, tck, run.ok),
                    );
                }
                let p50 = run.p50.as_secs_f64() * 1e6;
                report.add(&format!("{figure}.rps"), s.name, run.rps);
                report.add(&format!("{figure}.p50"), s.name, p50);
                report.add(
                    &format!("{figure}.p99"),
                    s.name,
                    run.p99.as_secs_f64() * 1e6,
                );
                report.add(&format!("{figure}.failed"), s.name, run.failed as f64);
                report.add(
                    &format!("{figure}.load_cpu"),
                    s.name,
                    us_per_request(run.load_ticks, tck, run.ok),
                );
                if !s.procs.is_empty() {
                    report.add(
                        &format!("{figure}.cpu"),
                        s.name,
                        us_per_request(tunnel_ticks, tck, run.ok),
                    );
                    report.add(
                        &format!("{figure}.user"),
                        s.name,
                        us_per_request(user, tck, run.ok),
                    );
                    report.add(
                        &format!("{figure}.sched"),
                        s.name,
                        sched.as_secs_f64() * 1e6 / run.ok as f64,
                    );
                }
                if s.name == "direct" {
                    direct_p50 = Some(p50);
                } else if let Some(direct) = direct_p50 {
                    report.add(&format!("{figure}.added_p50"), s.name, p50 - direct);
                }
                eprintln!(
                    "small set {set}/{}: {} at {connections} conn: {:.0} req/s, p50 {:.0} µs, tunnel CPU {:.1} µs/req",
                    settings.sets,
                    s.name,
                    run.rps,
                    p50,
                    us_per_request(tunnel_ticks, tck, run.ok)
                );
            }
        }
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum Direction {
    Down,
    Up,
}

async fn bulk_part(settings: &Settings, subjects: &[Subject], report: &mut Report) {
    let transfers = [
        ("bulk.down", Direction::Down, settings.down_bytes),
        ("bulk.up", Direction::Up, settings.up_bytes),
        ("bulk.medium", Direction::Down, settings.medium_bytes),
    ];
    for set in 1..=settings.sets {
        for s in subjects {
            for (figure, direction, size) in transfers {
                for (role, pid) in &s.procs {
                    if let Err(err) = tunnel_procs::reset_peak_rss(*pid) {
                        // The peak then covers the process's whole life: say so once.
                        if set == 1 {
                            eprintln!("bulk: {} {role}: {err:#}; peak RSS is since start", s.name);
                        }
                    }
                }
                let outcome = match direction {
                    Direction::Down => {
                        transfer::download(&s.endpoint, size, settings.bulk_timeout).await
                    }
                    Direction::Up => {
                        transfer::upload(&s.endpoint, size, settings.bulk_timeout).await
                    }
                };
                match outcome {
                    Ok(elapsed) => {
                        let mbps = size as f64 / 1e6 / elapsed.as_secs_f64();
                        report.add(&format!("{figure}.mbps"), s.name, mbps);
                        eprintln!(
                            "bulk set {set}/{}: {} {figure} {size} B: {mbps:.0} MB/s",
                            settings.sets, s.name
                        );
                    }
                    Err(why) => {
                        let why = if s.name == "v1" && size > V1_MAX_BODY {
                            format!("fails (v1 limit): {why}")
                        } else {
                            format!("fails: {why}")
                        };
                        eprintln!(
                            "bulk set {set}/{}: {} {figure} {size} B: {why}",
                            settings.sets, s.name
                        );
                        report.fail(&format!("{figure}.mbps"), s.name, why);
                    }
                }
                for (role, pid) in &s.procs {
                    match tunnel_procs::peak_rss_kib(*pid) {
                        Ok(kib) => {
                            report.add(
                                &format!("{figure}.hwm.{role}"),
                                s.name,
                                kib as f64 / 1024.0,
                            );
                        }
                        Err(err) => {
                            report.fail(
                                &format!("{figure}.hwm.{role}"),
                                s.name,
                                format!("{err:#}"),
                            );
                        }
                    }
                }
            }
        }
    }
}

async fn sse_part(
    settings: &Settings,
    subjects: &[Subject],
    upstream: &Upstream,
    report: &mut Report,
) {
    let deadline = settings.sse_delay + settings.sse_hold + Duration::from_secs(10);
    for set in 1..=settings.sets {
        for s in subjects {
            for _ in 0..settings.sse_count {
                match transfer::sse_first_event(
                    &s.endpoint,
                    upstream.epoch,
                    settings.sse_delay,
                    settings.sse_hold,
                    deadline,
                )
                .await
                {
                    Ok(latency) => report.add("sse.first", s.name, ms(latency)),
                    Err(err) => report.fail("sse.first", s.name, format!("fails: {err:#}")),
                }
            }
            eprintln!(
                "sse set {set}/{}: {} first event {} ms",
                settings.sets,
                s.name,
                report.cell("sse.first", s.name, 2)
            );
        }
    }
}

async fn idle_part(
    binary: &Path,
    settings: &Settings,
    names: &[&str],
    report: &mut Report,
) -> Result<()> {
    for &n in &settings.tunnels {
        if names.contains(&"v1") {
            let row = idle::measure_v1(binary, n, settings.settle).await?;
            report.add(&format!("idle.{n}"), "v1", row.kib_per_tunnel());
            report.add(&format!("idle.{n}.anon"), "v1", row.anon_kib_per_tunnel());
            report.add(
                &format!("idle.{n}.baseline"),
                "v1",
                row.baseline.rss_kib as f64,
            );
            report.add(&format!("idle.{n}.open"), "v1", row.open_time.as_secs_f64());
        }
        if names.contains(&"h2") {
            let row = idle::measure(binary, n, settings.settle, IdleProtocol::H2).await?;
            report.add(&format!("idle.{n}"), "h2", row.kib_per_tunnel());
            report.add(&format!("idle.{n}.anon"), "h2", row.anon_kib_per_tunnel());
            report.add(
                &format!("idle.{n}.baseline"),
                "h2",
                row.baseline.rss_kib as f64,
            );
            report.add(&format!("idle.{n}.open"), "h2", row.open_time.as_secs_f64());
            let row = idle::measure_used(binary, n, settings.settle).await?;
            report.add(&format!("idle.{n}"), "h2-used", row.kib_per_tunnel());
            report.add(
                &format!("idle.{n}.anon"),
                "h2-used",
                row.anon_kib_per_tunnel(),
            );
            report.add(
                &format!("idle.{n}.open"),
                "h2-used",
                row.open_time.as_secs_f64(),
            );
        }
    }
    Ok(())
}

// === the report ===

fn print_report(settings: &Settings, generator: &Generator, names: &[&str], r: &Report) {
    let row = |cells: Vec<String>| println!("| {} |", cells.join(" | "));
    let shown = |figure: &str| {
        names.iter().any(|n| {
            r.samples(figure, n).is_some()
                || r.failures
                    .contains_key(&(figure.to_owned(), (*n).to_owned()))
        })
    };

    if settings.part("loadgen") {
        println!();
        println!(
            "== load generators against direct, {} connections, {} s runs: median (min–max) of {} sets ==",
            settings.clients, settings.secs, settings.sets
        );
        println!(
            "| generator | req/s | p50 µs | load-side CPU µs/req | of which the bench process (upstream, builtin generator) |"
        );
        println!("|---|---:|---:|---:|---:|");
        for g in ["wrk", "builtin"] {
            row(vec![
                g.to_owned(),
                r.cell("loadgen.rps", g, 0),
                r.cell("loadgen.p50", g, 0),
                r.cell("loadgen.cpu", g, 1),
                r.cell("loadgen.bench", g, 1),
            ]);
        }
    }

    if settings.part("small") {
        for (connections, secs) in [(settings.clients, settings.secs), (1, settings.single_secs)] {
            let f = format!("small.{connections}");
            println!();
            println!(
                "== {}-byte GETs, {connections} keep-alive connection(s), {secs} s runs, {}: median (min–max) of {} sets ==",
                BODY.len(),
                generator.name(),
                settings.sets
            );
            println!(
                "| path | req/s | p50 µs | p99 µs | added p50 µs | tunnel CPU µs/req | of it user space | per process µs/req | tunnel CPU µs/req (schedstat) | load-side CPU µs/req | failed requests |"
            );
            println!("|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|");
            for name in names {
                let per_process = ["server", "client", "relay", "agent"]
                    .iter()
                    .filter(|role| r.samples(&format!("{f}.cpu.{role}"), name).is_some())
                    .map(|role| format!("{role} {}", r.cell(&format!("{f}.cpu.{role}"), name, 1)))
                    .collect::<Vec<_>>()
                    .join(" + ");
                if r.samples(&format!("{f}.rps"), name).is_none() {
                    row(vec![(*name).to_owned(), r.cell(&f, name, 0)]);
                    continue;
                }
                row(vec![
                    (*name).to_owned(),
                    r.cell(&format!("{f}.rps"), name, 0),
                    r.cell(&format!("{f}.p50"), name, 0),
                    r.cell(&format!("{f}.p99"), name, 0),
                    r.cell(&format!("{f}.added_p50"), name, 0),
                    r.cell(&format!("{f}.cpu"), name, 1),
                    r.cell(&format!("{f}.user"), name, 1),
                    if per_process.is_empty() {
                        "–".into()
                    } else {
                        per_process
                    },
                    r.cell(&format!("{f}.sched"), name, 1),
                    r.cell(&format!("{f}.load_cpu"), name, 1),
                    r.cell(&format!("{f}.failed"), name, 0),
                ]);
            }
        }
    }

    if settings.part("bulk") {
        println!();
        println!(
            "== bulk transfers, one at a time on a fresh connection: MB/s (10^6 B/s) and peak RSS (VmHWM, MiB) per tunnel process, median (min–max) of {} sets ==",
            settings.sets
        );
        let size = |b: u64| format!("{:.0} MiB", b as f64 / 1_048_576.0);
        println!(
            "| path | down {} MB/s | peak RSS down | up {} MB/s | peak RSS up | down {} MB/s | peak RSS |",
            size(settings.down_bytes),
            size(settings.up_bytes),
            size(settings.medium_bytes)
        );
        println!("|---|---:|---|---:|---|---:|---|");
        for name in names {
            let peaks = |figure: &str| {
                let cells: Vec<String> = ["server", "client", "relay", "agent"]
                    .iter()
                    .filter(|role| r.samples(&format!("{figure}.hwm.{role}"), name).is_some())
                    .map(|role| {
                        format!(
                            "{role} {}",
                            r.cell(&format!("{figure}.hwm.{role}"), name, 0)
                        )
                    })
                    .collect();
                if cells.is_empty() {
                    "–".to_owned()
                } else {
                    cells.join(", ")
                }
            };
            row(vec![
                (*name).to_owned(),
                r.cell("bulk.down.mbps", name, 0),
                peaks("bulk.down"),
                r.cell("bulk.up.mbps", name, 0),
                peaks("bulk.up"),
                r.cell("bulk.medium.mbps", name, 0),
                peaks("bulk.medium"),
            ]);
        }
    }

    if settings.part("sse") {
        println!();
        println!(
            "== Server-Sent Events: upstream writes one event {} ms after the request, holds the stream {} ms more; first event latency (written → received), ms, median (min–max) of {} × {} ==",
            settings.sse_delay.as_millis(),
            settings.sse_hold.as_millis(),
            settings.sets,
            settings.sse_count
        );
        println!("| path | first event ms |");
        println!("|---|---:|");
        for name in names {
            row(vec![(*name).to_owned(), r.cell("sse.first", name, 2)]);
        }
    }

    if settings.part("idle") && settings.tunnels.iter().any(|n| shown(&format!("idle.{n}"))) {
        println!();
        println!(
            "== relay memory per idle tunnel (VmRSS growth over a fresh relay's baseline, {} s settle), KiB ==",
            settings.settle.as_secs()
        );
        println!(
            "| path | {} |",
            settings
                .tunnels
                .iter()
                .map(|n| format!("{n} tunnels (RssAnon)"))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        println!("|---|{}", "---:|".repeat(settings.tunnels.len()));
        let rows = names
            .iter()
            .filter(|n| **n == "v1" || **n == "h2")
            .copied()
            .chain(names.contains(&"h2").then_some("h2-used"));
        for name in rows {
            let cells = settings.tunnels.iter().map(|n| {
                let f = format!("idle.{n}");
                match r.samples(&f, name) {
                    Some(_) => format!(
                        "{} ({}), opened in {} s",
                        r.cell(&f, name, 1),
                        r.cell(&format!("{f}.anon"), name, 1),
                        r.cell(&format!("{f}.open"), name, 2)
                    ),
                    None => r.cell(&f, name, 1),
                }
            });
            row(std::iter::once(name.to_owned()).chain(cells).collect());
        }
    }

    print_targets(settings, names, r);
}

/// The targets, as ratios of medians against rathole: for h2 when it ran, and for v1 as
/// a reference point.
fn print_targets(settings: &Settings, names: &[&str], r: &Report) {
    if !["small", "bulk", "sse", "idle"]
        .iter()
        .any(|p| settings.part(p))
    {
        return;
    }
    println!();
    if !names.contains(&"rathole") {
        println!("targets: not computed (they compare against rathole, which did not run)");
    }
    for candidate in ["h2", "v1"] {
        if !names.contains(&candidate) {
            if candidate == "h2" {
                println!("== targets for h2: h2 did not run ==");
            }
            continue;
        }
        println!(
            "== targets for {candidate}{} ==",
            if candidate == "v1" {
                " (for reference: the targets are h2's)"
            } else {
                ""
            }
        );
        let ratio =
            |figure: &str| Some(r.median(figure, candidate)? / r.median(figure, "rathole")?);
        let line =
            |what: &str, value: Option<f64>, want: &str, met: fn(f64) -> bool, unit: &str| {
                match value {
                    Some(v) => println!(
                        "{what}: {v:.2}{unit} (target {want}): {}",
                        if met(v) { "met" } else { "MISSED" }
                    ),
                    None => println!("{what}: not measured or failed (target {want}): MISSED"),
                }
            };
        if names.contains(&"rathole") {
            for connections in [settings.clients, 1] {
                if settings.part("small") {
                    line(
                        &format!("req/s at {connections} conn, {candidate} / rathole"),
                        ratio(&format!("small.{connections}.rps")),
                        "≥ 1.00",
                        |v| v >= 1.0,
                        "",
                    );
                    line(
                        &format!(
                            "tunnel CPU per request at {connections} conn, {candidate} / rathole"
                        ),
                        ratio(&format!("small.{connections}.cpu")),
                        "≤ 1.00",
                        |v| v <= 1.0,
                        "",
                    );
                }
            }
            if settings.part("bulk") {
                for (figure, what) in [
                    ("bulk.down.mbps", "bulk download MB/s"),
                    ("bulk.up.mbps", "bulk upload MB/s"),
                ] {
                    line(
                        &format!("{what}, {candidate} / rathole"),
                        ratio(figure),
                        "≥ 1.00",
                        |v| v >= 1.0,
                        "",
                    );
                }
            }
            if settings.part("sse") {
                let diff = r
                    .median("sse.first", candidate)
                    .zip(r.median("sse.first", "rathole"))
                    .map(|(c, b)| c - b);
                line(
                    &format!("SSE first event, {candidate} − rathole"),
                    diff,
                    &format!("≤ +{TARGET_SSE_SLACK_MS:.0} ms"),
                    |v| v <= TARGET_SSE_SLACK_MS,
                    " ms",
                );
            }
        }
        if settings.part("idle") {
            for n in &settings.tunnels {
                line(
                    &format!("idle {candidate} tunnel at {n} tunnels"),
                    r.median(&format!("idle.{n}"), candidate),
                    &format!("≤ {TARGET_IDLE_KIB:.0} KiB"),
                    |v| v <= TARGET_IDLE_KIB,
                    " KiB",
                );
                if candidate == "h2" {
                    line(
                        &format!("idle h2 tunnel at {n} tunnels, after one request each"),
                        r.median(&format!("idle.{n}"), "h2-used"),
                        &format!("≤ {TARGET_IDLE_KIB:.0} KiB"),
                        |v| v <= TARGET_IDLE_KIB,
                        " KiB",
                    );
                }
            }
        }
    }
}
