//! The relay's memory with idle tunnels: a fresh relay, its baseline RSS, then N idle v1
//! or h2 tunnels (lightweight clients in the bench process), then its RSS again. Shared by the
//! proxy and tunnel-comparison benches.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::relay_child::{self, Memory, RelayChild};
use crate::v1_host::{IdleProtocol, IdleTunnels};

/// Concurrent tunnel handshakes while opening idle tunnels.
const HANDSHAKE_CONCURRENCY: usize = 128;

/// One measurement: a fresh relay before and after `tunnels` idle tunnels.
pub struct IdleRow {
    /// Idle tunnels open during the second reading.
    pub tunnels: usize,
    /// The relay with no tunnel.
    pub baseline: Memory,
    /// The relay with the tunnels.
    pub loaded: Memory,
    /// From the first handshake until the relay reported every tunnel.
    pub open_time: Duration,
}

impl IdleRow {
    /// VmRSS growth per tunnel, KiB.
    pub fn kib_per_tunnel(&self) -> f64 {
        self.loaded.rss_kib.saturating_sub(self.baseline.rss_kib) as f64 / self.tunnels as f64
    }

    /// RssAnon growth per tunnel, KiB.
    pub fn anon_kib_per_tunnel(&self) -> f64 {
        self.loaded.anon_kib.saturating_sub(self.baseline.anon_kib) as f64 / self.tunnels as f64
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns (soft, hard). Thousands of
/// idle tunnels need as many descriptors in the bench and in the relay (which inherits it).
///
/// # Errors
/// When the limit cannot be read or raised.
pub fn raise_nofile() -> Result<(u64, u64)> {
    let soft = rlimit::increase_nofile_limit(u64::MAX).context("cannot raise RLIMIT_NOFILE")?;
    let (_, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE)?;
    Ok((soft, hard))
}

/// [`measure`] with v1 tunnels.
///
/// # Errors
/// See [`measure`].
pub async fn measure_v1(binary: &Path, n: usize, settle: Duration) -> Result<IdleRow> {
    measure(binary, n, settle, IdleProtocol::V1).await
}

/// Starts a fresh relay, reads its baseline, opens `n` idle tunnels speaking `protocol`
/// with distinct hostIds, waits until the relay reports them all and one request to the
/// last host succeeds, waits `settle`, and reads the relay's memory again.
///
/// # Errors
/// When the relay does not start, a tunnel cannot be opened, or the last host does not
/// answer.
pub async fn measure(
    binary: &Path,
    n: usize,
    settle: Duration,
    protocol: IdleProtocol,
) -> Result<IdleRow> {
    measure_with(binary, n, settle, protocol, false).await
}

/// How long an HTTP/2 connection inside a tunnel stays without streams in
/// [`measure_used`] (`RELAY_H2_IDLE_CONNECTION`; 15 s by default).
const USED_IDLE_CONNECTION: Duration = Duration::from_secs(1);

/// [`measure`] of h2 tunnels that have each carried one request and then stayed idle past
/// `RELAY_H2_IDLE_CONNECTION`: what a fleet's tunnels cost between bursts of use.
///
/// # Errors
/// See [`measure`]; also when the relay has not ended every tunnel's HTTP/2 connection.
#[allow(
    dead_code,
    reason = "the tunnel comparison's; the proxy bench shares this module"
)]
pub async fn measure_used(binary: &Path, n: usize, settle: Duration) -> Result<IdleRow> {
    measure_with(binary, n, settle, IdleProtocol::H2, true).await
}

async fn measure_with(
    binary: &Path,
    n: usize,
    settle: Duration,
    protocol: IdleProtocol,
    used: bool,
) -> Result<IdleRow> {
    let host_token = relay_child::token("host");
    let client_token = relay_child::token("client");
    let idle_connection = format!("{}ms", USED_IDLE_CONNECTION.as_millis());
    let relay = if used {
        RelayChild::start_with(binary, &[("RELAY_H2_IDLE_CONNECTION", &idle_connection)]).await?
    } else {
        RelayChild::start(binary).await?
    };
    let pid = relay.pid();
    // Baseline: the relay has served HTTP once (so the server's lazily built parts
    // exist) and has no tunnel.
    relay_child::tunnels_connected(relay.addr).await?;
    relay_child::get(relay.addr, "/health", None).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let baseline = relay_child::memory(pid)?;

    eprintln!("rss: relay pid {pid}: opening {n} idle tunnels ...");
    let started = tokio::time::Instant::now();
    let ids: Vec<String> = (0..n).map(|i| format!("idle-{i:05}")).collect();
    let last = ids.last().cloned();
    let tunnels = IdleTunnels::open(
        relay.addr,
        ids,
        &host_token,
        HANDSHAKE_CONCURRENCY,
        protocol,
    )
    .await
    .with_context(|| format!("opening {n} idle tunnels"))?;
    relay_child::wait_tunnels(relay.addr, n as u64, Duration::from_secs(120)).await?;
    let open_time = started.elapsed();
    if let Some(last) = last {
        let path = format!("/hosts/{last}/probe");
        let (status, body) = relay_child::get(relay.addr, &path, Some(&client_token)).await?;
        if status != 200 || body.as_ref() != b"idle" {
            bail!(
                "request to the last idle host answered {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
    }
    if used {
        use futures_util::StreamExt;
        let addr = relay.addr;
        let failures = futures_util::stream::iter(0..n)
            .map(|i| {
                let token = &client_token;
                async move {
                    let path = format!("/hosts/idle-{i:05}/probe");
                    matches!(
                        relay_child::get(addr, &path, Some(token)).await,
                        Ok((200, _))
                    )
                }
            })
            .buffer_unordered(HANDSHAKE_CONCURRENCY)
            .filter(|ok| std::future::ready(!ok))
            .count()
            .await;
        if failures > 0 {
            bail!("{failures} of {n} requests to the idle hosts failed");
        }
        // Every connection ends within two idle periods of its last stream.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let ended =
                relay_child::counter(addr, "relay_h2_connections_total", "event=\"ended\"").await?;
            if ended >= n as f64 {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the relay ended {ended} of {n} idle HTTP/2 connections in 60 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    tokio::time::sleep(settle).await;
    let loaded = relay_child::memory(pid)?;
    eprintln!(
        "rss: {} tunnels registered in {:.2} s; VmRSS {} -> {} KiB",
        tunnels.len(),
        open_time.as_secs_f64(),
        baseline.rss_kib,
        loaded.rss_kib
    );
    drop(tunnels);
    relay.stop().await;
    Ok(IdleRow {
        tunnels: n,
        baseline,
        loaded,
        open_time,
    })
}
