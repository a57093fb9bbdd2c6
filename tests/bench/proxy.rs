//! Benchmark of the relay binary: HTTP proxying throughput and latency through a v1
//! tunnel, and the relay's memory per idle tunnel.
//!
//! Run with `scripts/bench.sh` (or `cargo build --release -p relay` then
//! `cargo bench -p relay-tests --bench proxy`). It reports figures and whether each
//! target is met; it never fails on timing, only when something does not work.
//!
//! Environment knobs (all optional):
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `BENCH_SECS` | 10 | measured window of each 64-client run |
//! | `BENCH_WARMUP_SECS` | 2 (1 when `BENCH_SECS` < 5) | unmeasured warm-up before each run |
//! | `BENCH_CLIENTS` | 64 | concurrent keep-alive clients |
//! | `BENCH_TUNNELS` | `1000,5000` | idle tunnel counts for the RSS part |
//! | `BENCH_SETTLE_SECS` | 3 (1 when `BENCH_SECS` < 5) | wait before the RSS reading |
//! | `BENCH_ONLY` | both | `proxy` or `rss` to run one part |
//! | `BENCH_RELAY_WORKERS` | relay default (one per CPU) | the relay child's `TOKIO_WORKER_THREADS` |
//! | `RELAY_BIN` | `<target>/release/relay` | relay binary to measure |
//!
//! Quick smoke run: `BENCH_SECS=3 BENCH_TUNNELS=200 scripts/bench.sh`.

mod idle;
mod load;
mod relay_child;
mod upstream;
mod v1_host;

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use load::{Shape, Stats, Target};
use relay_child::{Proc, RelayChild};
use upstream::{BODY, Upstream};
use v1_host::ForwardingHost;

/// Target: through-tunnel throughput at least this share of direct.
const TARGET_RATIO: f64 = 0.40;
/// Target: p50 added by the tunnel at most this.
const TARGET_ADDED_P50: Duration = Duration::from_micros(200);
/// Target: relay memory per idle tunnel at most this.
const TARGET_KIB_PER_TUNNEL: f64 = 32.0;

struct Settings {
    measure: Duration,
    warmup: Duration,
    clients: usize,
    tunnels: Vec<usize>,
    settle: Duration,
    proxy: bool,
    rss: bool,
}

fn env_u64(name: &str) -> Result<Option<u64>> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .map(Some)
            .with_context(|| format!("{name}={v:?} is not a whole number")),
        _ => Ok(None),
    }
}

impl Settings {
    fn from_env() -> Result<Settings> {
        let secs = env_u64("BENCH_SECS")?.unwrap_or(10).max(1);
        let quick = secs < 5;
        let tunnels = match std::env::var("BENCH_TUNNELS") {
            Ok(list) if !list.trim().is_empty() => list
                .split(',')
                .map(|n| n.trim().parse::<usize>())
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("BENCH_TUNNELS={list:?} is not a list of numbers"))?,
            _ => vec![1_000, 5_000],
        };
        let only = std::env::var("BENCH_ONLY").unwrap_or_default();
        let (proxy, rss) = match only.as_str() {
            "" => (true, true),
            "proxy" => (true, false),
            "rss" => (false, true),
            other => bail!("BENCH_ONLY={other:?}: expected `proxy` or `rss`"),
        };
        Ok(Settings {
            measure: Duration::from_secs(secs),
            warmup: Duration::from_secs(env_u64("BENCH_WARMUP_SECS")?.unwrap_or(if quick {
                1
            } else {
                2
            })),
            clients: usize::try_from(env_u64("BENCH_CLIENTS")?.unwrap_or(64).max(1))?,
            tunnels,
            settle: Duration::from_secs(env_u64("BENCH_SETTLE_SECS")?.unwrap_or(if quick {
                1
            } else {
                3
            })),
            proxy,
            rss,
        })
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
    let binary = relay_tests::release_relay_binary("scripts/bench.sh")?;
    let (soft, hard) = idle::raise_nofile()?;
    let needed = settings.tunnels.iter().copied().max().unwrap_or(0) as u64 + 512;
    if settings.rss && soft < needed {
        bail!(
            "RLIMIT_NOFILE is {soft} (hard {hard}) but {needed} descriptors are needed for \
             the idle tunnels: raise the hard limit or lower BENCH_TUNNELS"
        );
    }
    println!("relay binary: {}", binary.display());
    println!("RLIMIT_NOFILE: soft {soft}, hard {hard} (the relay child inherits it)");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        if settings.proxy {
            proxy_bench(&binary, &settings).await?;
        }
        if settings.rss {
            rss_bench(&binary, &settings).await?;
        }
        Ok(())
    })
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

async fn proxy_bench(binary: &Path, settings: &Settings) -> Result<()> {
    let upstream = Upstream::start().await?;
    let relay = RelayChild::start(binary).await?;
    eprintln!(
        "proxy: relay pid {} on {}, upstream on {}",
        relay.pid(),
        relay.addr,
        upstream.addr
    );
    let _host = ForwardingHost::connect(
        relay.addr,
        "bench",
        &relay_child::token("host"),
        upstream.addr,
    )
    .await?;
    relay_child::wait_tunnels(relay.addr, 1, Duration::from_secs(10)).await?;

    let client_token = relay_child::token("client");
    let (status, body) =
        relay_child::get(relay.addr, "/hosts/bench/probe", Some(&client_token)).await?;
    if status != 200 || body.as_ref() != BODY {
        bail!(
            "probe through the tunnel answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }

    let direct = Target {
        addr: upstream.addr,
        path: "/bench?q=1".into(),
        bearer: None,
        expect_body: BODY,
    };
    let through = Target {
        addr: relay.addr,
        path: "/hosts/bench/bench?q=1".into(),
        bearer: Some(client_token),
        expect_body: BODY,
    };
    let watch = [Proc::SelfProc, Proc::Pid(relay.pid())];
    let loaded = Shape {
        clients: settings.clients,
        warmup: settings.warmup,
        measure: settings.measure,
    };
    let single = Shape {
        clients: 1,
        warmup: settings.warmup.min(Duration::from_secs(1)),
        measure: (settings.measure / 2).max(Duration::from_secs(1)),
    };

    let mut rows: Vec<(&str, usize, Stats)> = Vec::new();
    for (name, target, shape) in [
        ("direct", &direct, loaded),
        ("through relay", &through, loaded),
        ("direct", &direct, single),
        ("through relay", &through, single),
    ] {
        eprintln!(
            "proxy: {name}, {} client(s), {:?} warm-up + {:?} measured ...",
            shape.clients, shape.warmup, shape.measure
        );
        let stats = load::run(target.clone(), shape, &watch).await?;
        rows.push((name, shape.clients, stats));
    }
    relay.stop().await;

    println!();
    println!(
        "== HTTP GET, {}-byte body: {:.1} s warm-up, {:.1} s measured ({:.1} s + {:.1} s for 1 client) ==",
        BODY.len(),
        loaded.warmup.as_secs_f64(),
        loaded.measure.as_secs_f64(),
        single.warmup.as_secs_f64(),
        single.measure.as_secs_f64()
    );
    println!(
        "| path | clients | req/s | mean µs | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs | errors | bench CPU µs/req | relay CPU µs/req |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (name, clients, s) in &rows {
        let cpu = |i| {
            s.cpu_us_per_request(i)
                .map_or("-".into(), |v| format!("{v:.1}"))
        };
        let relay_cpu = if name.starts_with("through") {
            cpu(1)
        } else {
            "-".into()
        };
        println!(
            "| {name} | {clients} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {} |",
            s.rps(),
            us(s.mean()),
            us(s.quantile(0.50)),
            us(s.quantile(0.90)),
            us(s.quantile(0.99)),
            us(s.quantile(0.999)),
            us(s.latencies.last().copied().unwrap_or_default()),
            s.failed,
            cpu(0),
            relay_cpu,
        );
    }
    let (d, t) = (&rows[0].2, &rows[1].2);
    let ratio = t.rps() / d.rps();
    let added = t.quantile(0.5).saturating_sub(d.quantile(0.5));
    let (d1, t1) = (&rows[2].2, &rows[3].2);
    let added1 = t1.quantile(0.5).saturating_sub(d1.quantile(0.5));
    println!();
    println!(
        "throughput through/direct ({} clients): {:.1} % (target >= {:.0} %): {}",
        settings.clients,
        ratio * 100.0,
        TARGET_RATIO * 100.0,
        verdict(ratio >= TARGET_RATIO)
    );
    println!(
        "added p50 ({} clients): {:.0} µs (target <= {} µs): {}",
        settings.clients,
        us(added),
        TARGET_ADDED_P50.as_micros(),
        verdict(added <= TARGET_ADDED_P50)
    );
    println!(
        "added p50 (1 client, unloaded, for reference): {:.0} µs",
        us(added1)
    );
    println!();
    Ok(())
}

async fn rss_bench(binary: &Path, settings: &Settings) -> Result<()> {
    let mut rows = Vec::new();
    for &n in &settings.tunnels {
        rows.push(idle::measure_v1(binary, n, settings.settle).await?);
    }

    println!(
        "== relay memory with idle v1 tunnels ({} s settle, fresh relay per row) ==",
        settings.settle.as_secs()
    );
    println!(
        "| tunnels | baseline VmRSS KiB | VmRSS KiB | delta KiB | KiB/tunnel (VmRSS) | KiB/tunnel (RssAnon) | open time s |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let mut worst: f64 = 0.0;
    for row in &rows {
        let delta = row.loaded.rss_kib.saturating_sub(row.baseline.rss_kib);
        let per = row.kib_per_tunnel();
        worst = worst.max(per);
        println!(
            "| {} | {} | {} | {delta} | {per:.1} | {:.1} | {:.2} |",
            row.tunnels,
            row.baseline.rss_kib,
            row.loaded.rss_kib,
            row.anon_kib_per_tunnel(),
            row.open_time.as_secs_f64()
        );
    }
    if !rows.is_empty() {
        println!();
        println!(
            "worst KiB per idle tunnel: {worst:.1} (target <= {TARGET_KIB_PER_TUNNEL:.0}): {}",
            verdict(worst <= TARGET_KIB_PER_TUNNEL)
        );
    }
    Ok(())
}
