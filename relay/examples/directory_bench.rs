//! Benchmark of the Redis directory against its own `redis-server` (started on a free
//! port, killed at the end; never the shared one on 6379).
//!
//! 1. `clear_owned` for 1,000 and 10,000 own entries among 1,000,000 others: the one
//!    script call over the per-machine index, side by side with the design it replaces
//!    (one hash `hostId → owner` for the whole fleet, cleared by a script that reads the
//!    whole hash with `HGETALL` and deletes the matching fields), both over the same
//!    1,000,000 other entries.
//! 2. Latency (p50/p99) of `lookup`, `register` and `heartbeat`, one at a time.
//!
//! Run: `cargo run --release -p relay --example directory_bench`

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, Script};
use relay::directory::{Directory, Owner, RedisDirectory};
use relay::host_id::HostId;
use tokio::time::Instant;

/// Entries of other machines, in both designs.
const OTHERS: usize = 1_000_000;
/// Machines the other entries are spread over.
const OTHER_MACHINES: usize = 100;
/// Own entries cleared, one run per size.
const OWN_SIZES: [usize; 2] = [1_000, 10_000];
/// Runs of each clear, reported as the median (and the min).
const CLEAR_RUNS: usize = 5;
/// Operations per latency measurement.
const LATENCY_OPS: usize = 10_000;
/// Entries written per server-side fill script, so no single call blocks for long.
const FILL_CHUNK: usize = 100_000;
const PREFIX: &str = "bench:";
const LEGACY_HASH: &str = "bench:legacy:hosts";

/// The design being replaced: scan the fleet-wide hash, delete the caller's fields.
const LEGACY_CLEAR: &str = r"
local all = redis.call('HGETALL', KEYS[1])
local removed = 0
for i = 1, #all, 2 do
  if all[i + 1] == ARGV[1] then
    redis.call('HDEL', KEYS[1], all[i])
    removed = removed + 1
  end
end
return removed
";

/// Writes entries `from..to` of other machines in both designs.
const FILL_OTHERS: &str = r"
local prefix, hash = ARGV[1], ARGV[2]
for i = tonumber(ARGV[3]), tonumber(ARGV[4]) - 1 do
  local owner = 'fra:m' .. (i % tonumber(ARGV[5]))
  local host = 'other' .. i
  redis.call('SET', prefix .. 'host:' .. host, owner, 'PX', 3600000)
  redis.call('SADD', prefix .. 'owned:' .. owner, host)
  redis.call('HSET', hash, host, owner)
end
";

/// Writes `n` entries of one owner in the legacy hash.
const FILL_LEGACY_OWN: &str = r"
for i = 0, tonumber(ARGV[2]) - 1 do
  redis.call('HSET', KEYS[1], 'own' .. i, ARGV[1])
end
";

#[tokio::main]
async fn main() {
    let redis = BenchRedis::spawn().await;
    let mut raw = redis.raw().await;
    let dir =
        RedisDirectory::new(&redis.url(), PREFIX, Duration::from_secs(3600)).expect("valid URL");
    let me: Owner = "ams:bench".parse().unwrap();

    machine_info();

    let started = Instant::now();
    let fill = Script::new(FILL_OTHERS);
    for from in (0..OTHERS).step_by(FILL_CHUNK) {
        let to = (from + FILL_CHUNK).min(OTHERS);
        fill.arg(PREFIX)
            .arg(LEGACY_HASH)
            .arg(from)
            .arg(to)
            .arg(OTHER_MACHINES)
            .invoke_async::<()>(&mut raw)
            .await
            .expect("fill");
    }
    let keys: usize = redis::cmd("DBSIZE").query_async(&mut raw).await.unwrap();
    println!(
        "filled {OTHERS} other entries ({OTHER_MACHINES} machines) in both designs in {:.1?} \
         ({keys} keys)\n",
        started.elapsed()
    );

    println!("clear_owned: one script call, median (min) of {CLEAR_RUNS} runs");
    println!("| own entries | others | index (this design) | HGETALL scan (replaced) | ratio |");
    println!("|---:|---:|---:|---:|---:|");
    let legacy_clear = Script::new(LEGACY_CLEAR);
    let legacy_fill = Script::new(FILL_LEGACY_OWN);
    for own in OWN_SIZES {
        let hosts: Vec<HostId> = (0..own)
            .map(|i| HostId::parse(&format!("own{i}")).unwrap())
            .collect();
        let mut index = Vec::new();
        let mut scan = Vec::new();
        for _ in 0..CLEAR_RUNS {
            for batch in hosts.chunks(500) {
                dir.reassert(batch, &me).await.expect("reassert");
            }
            let started = Instant::now();
            let removed = dir.clear_owned(&me).await.expect("clear_owned");
            index.push(started.elapsed());
            assert_eq!(removed, own);

            legacy_fill
                .key(LEGACY_HASH)
                .arg(me.to_string())
                .arg(own)
                .invoke_async::<()>(&mut raw)
                .await
                .expect("legacy fill");
            let started = Instant::now();
            let removed: usize = legacy_clear
                .key(LEGACY_HASH)
                .arg(me.to_string())
                .invoke_async(&mut raw)
                .await
                .expect("legacy clear");
            scan.push(started.elapsed());
            assert_eq!(removed, own);
        }
        index.sort();
        scan.sort();
        let (index_med, scan_med) = (index[CLEAR_RUNS / 2], scan[CLEAR_RUNS / 2]);
        println!(
            "| {own} | {OTHERS} | {} ({}) | {} ({}) | {:.0}x |",
            ms(index_med),
            ms(index[0]),
            ms(scan_med),
            ms(scan[0]),
            scan_med.as_secs_f64() / index_med.as_secs_f64()
        );
    }

    println!("\nlatency: {LATENCY_OPS} operations each, one at a time, over TCP on 127.0.0.1");
    println!("| operation | p50 | p99 | max |");
    println!("|---|---:|---:|---:|");
    let hosts: Vec<HostId> = (0..LATENCY_OPS)
        .map(|i| HostId::parse(&format!("lat{i}")).unwrap())
        .collect();
    // Warm up: connect and load the scripts.
    dir.register(&hosts[0], &me).await.unwrap();
    dir.heartbeat(&hosts[0], &me).await.unwrap();

    let mut times = Vec::with_capacity(LATENCY_OPS);
    for host in &hosts {
        let started = Instant::now();
        dir.register(host, &me).await.expect("register");
        times.push(started.elapsed());
    }
    report("register", &mut times);
    for (i, own) in hosts.iter().enumerate() {
        // Half our hosts, half the million others.
        let host = if i % 2 == 0 {
            own.clone()
        } else {
            HostId::parse(&format!("other{}", i * 97 % OTHERS)).unwrap()
        };
        let started = Instant::now();
        let owner = dir.lookup(&host).await.expect("lookup");
        times.push(started.elapsed());
        assert!(owner.is_some());
    }
    report("lookup", &mut times);
    for host in &hosts {
        let started = Instant::now();
        assert!(dir.heartbeat(host, &me).await.expect("heartbeat"));
        times.push(started.elapsed());
    }
    report("heartbeat", &mut times);
    for batch in hosts.chunks(500) {
        let started = Instant::now();
        dir.reassert(batch, &me).await.expect("reassert");
        times.push(started.elapsed());
    }
    report("reassert (500 hosts)", &mut times);
}

fn report(what: &str, times: &mut Vec<Duration>) {
    times.sort();
    let p = |q: usize| times[(times.len() * q / 100).min(times.len() - 1)];
    println!(
        "| {what} | {} | {} | {} |",
        us(p(50)),
        us(p(99)),
        us(times[times.len() - 1])
    );
    times.clear();
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

fn machine_info() {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let version = Command::new("redis-server")
        .arg("--version")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .unwrap_or_default();
    println!("machine: {cpus} CPUs, {cpu}\nserver: {version}\n");
}

/// A `redis-server` child process on a free port, killed when dropped.
struct BenchRedis {
    child: Child,
    port: u16,
}

impl BenchRedis {
    async fn spawn() -> BenchRedis {
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|err| {
                    panic!("cannot run `redis-server` ({err}): the benchmark needs it on PATH")
                });
            let mut redis = BenchRedis { child, port };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if redis.child.try_wait().unwrap().is_some() {
                    break; // port taken: try another
                }
                if let Ok(mut conn) = Client::open(redis.url())
                    .unwrap()
                    .get_multiplexed_async_connection()
                    .await
                    && redis::cmd("PING")
                        .query_async::<String>(&mut conn)
                        .await
                        .is_ok()
                {
                    return redis;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        panic!("redis-server did not start");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A connection without a response timeout, for the fills and the legacy script.
    async fn raw(&self) -> MultiplexedConnection {
        Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection_with_config(
                &AsyncConnectionConfig::new().set_response_timeout(None),
            )
            .await
            .expect("connection to the benchmark redis-server")
    }
}

impl Drop for BenchRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
