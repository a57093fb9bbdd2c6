//! `wrk` as the load generator: keep-alive HTTP/1.1 connections in a closed loop, one
//! thread. A Lua `done` hook prints the request count, errors and exact percentiles in a
//! form the bench parses (wrk's own report rounds them).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use tokio::process::Command;

use crate::tunnel_procs::reaped_children_ticks;

/// Printed by wrk at the end of a run, one `bench <name> <value>` line each.
const SCRIPT: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("bench requests %d\n", summary.requests))
  io.write(string.format("bench duration_us %d\n", summary.duration))
  io.write(string.format("bench bad_status %d\n", e.status))
  io.write(string.format("bench io_errors %d\n", e.connect + e.read + e.write + e.timeout))
  io.write(string.format("bench p50_us %d\n", latency:percentile(50)))
  io.write(string.format("bench p99_us %d\n", latency:percentile(99)))
end
"#;

/// The result of one wrk run.
#[derive(Debug, Clone, Copy)]
pub struct WrkRun {
    /// Requests answered with a 2xx or 3xx status.
    pub ok: u64,
    /// Connect, read, write and timeout errors, and other statuses.
    pub failed: u64,
    /// How long wrk ran, by its own clock.
    pub duration: Duration,
    /// Median latency.
    pub p50: Duration,
    /// 99th percentile latency.
    pub p99: Duration,
    /// wrk's own CPU time (utime + stime), in clock ticks.
    pub cpu_ticks: u64,
}

impl WrkRun {
    /// Successful requests per second.
    pub fn rps(&self) -> f64 {
        self.ok as f64 / self.duration.as_secs_f64()
    }
}

/// wrk and its Lua hook.
pub struct Wrk {
    binary: PathBuf,
    script: PathBuf,
}

impl Wrk {
    /// Finds wrk (`WRK_BIN`, else `wrk` on the PATH) and writes the hook into `dir`.
    ///
    /// # Errors
    /// When wrk is missing (naming the ways to get it) or the hook cannot be written.
    pub fn new(dir: &Path) -> Result<Wrk> {
        let binary = match relay_tests::binary_from_env("WRK_BIN")? {
            Some(path) => path,
            None => std::env::var_os("PATH")
                .and_then(|paths| {
                    std::env::split_paths(&paths)
                        .map(|p| p.join("wrk"))
                        .find(|p| p.is_file())
                })
                .ok_or_else(|| {
                    anyhow!(
                        "wrk not found on the PATH: `scripts/bench.sh tunnels` installs it \
                         (apt-get install wrk), or set BENCH_LOADGEN=builtin"
                    )
                })?,
        };
        let script = dir.join("wrk-report.lua");
        std::fs::write(&script, SCRIPT)
            .with_context(|| format!("cannot write {}", script.display()))?;
        Ok(Wrk { binary, script })
    }

    /// Runs `connections` connections for `secs` seconds against `url`.
    ///
    /// # Errors
    /// When wrk cannot run, fails, or prints no report.
    pub async fn run(
        &self,
        url: &str,
        bearer: Option<&str>,
        connections: usize,
        secs: u64,
    ) -> Result<WrkRun> {
        let mut cmd = Command::new(&self.binary);
        cmd.args(["-t1", "--timeout", "10s"])
            .arg(format!("-c{connections}"))
            .arg(format!("-d{secs}s"))
            .arg("-s")
            .arg(&self.script);
        if let Some(token) = bearer {
            cmd.arg("-H").arg(format!("Authorization: Bearer {token}"));
        }
        cmd.arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let before = reaped_children_ticks()?;
        let out = cmd
            .output()
            .await
            .with_context(|| format!("cannot run {}", self.binary.display()))?;
        let cpu_ticks = reaped_children_ticks()?.saturating_sub(before);
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "wrk {url} exited with {}: {}{}",
                out.status,
                stdout,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let field = |name: &str| -> Result<u64> {
            stdout
                .lines()
                .find_map(|l| {
                    l.strip_prefix("bench ")?
                        .strip_prefix(name)?
                        .strip_prefix(' ')
                })
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| anyhow!("wrk printed no `bench {name}` line:\n{stdout}"))
        };
        // `requests` counts every response, whatever its status; I/O errors are not in it.
        let requests = field("requests")?;
        let bad_status = field("bad_status")?.min(requests);
        Ok(WrkRun {
            ok: requests - bad_status,
            failed: bad_status + field("io_errors")?,
            duration: Duration::from_micros(field("duration_us")?.max(1)),
            p50: Duration::from_micros(field("p50_us")?),
            p99: Duration::from_micros(field("p99_us")?),
            cpu_ticks,
        })
    }
}
