//! Closed-loop HTTP load: `clients` keep-alive connections, each sending one GET and
//! waiting for its response before the next, for a warm-up and then a measured window.
//! Every latency in the window is kept, so percentiles are exact.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::relay_child::{Proc, cpu_time};

/// What to load.
#[derive(Clone)]
pub struct Target {
    /// Server address.
    pub addr: SocketAddr,
    /// Request target, path plus query.
    pub path: String,
    /// Bearer token, if any.
    pub bearer: Option<String>,
    /// Body every response must have.
    pub expect_body: &'static [u8],
}

/// How to load it.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Concurrent connections, one request in flight each.
    pub clients: usize,
    /// Unmeasured time first (connections opened, pools and caches warm).
    pub warmup: Duration,
    /// Measured window.
    pub measure: Duration,
}

/// The result of one run.
#[derive(Debug, Clone)]
pub struct Stats {
    /// Successful requests that started in the window.
    pub ok: u64,
    /// Failed requests (errors, wrong status or body) in the window.
    pub failed: u64,
    /// Length of the window.
    pub window: Duration,
    /// Every successful latency in the window, sorted.
    pub latencies: Vec<Duration>,
    /// CPU time each watched process used during the window.
    pub cpu: Vec<Option<Duration>>,
}

impl Stats {
    /// Successful requests per second.
    pub fn rps(&self) -> f64 {
        self.ok as f64 / self.window.as_secs_f64()
    }

    /// The `q` quantile (0..=1) of the latencies (nearest rank).
    pub fn quantile(&self, q: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let rank = (q * self.latencies.len() as f64).ceil() as usize;
        self.latencies[rank.clamp(1, self.latencies.len()) - 1]
    }

    /// Mean latency.
    pub fn mean(&self) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        self.latencies.iter().sum::<Duration>() / self.latencies.len() as u32
    }

    /// CPU time of watched process `i` per successful request, in microseconds.
    pub fn cpu_us_per_request(&self, i: usize) -> Option<f64> {
        let cpu = self.cpu.get(i).copied().flatten()?;
        (self.ok > 0).then(|| cpu.as_secs_f64() * 1e6 / self.ok as f64)
    }
}

/// Runs the load and returns its statistics. `watch` lists processes whose CPU time is
/// read at the start and end of the measured window.
///
/// # Errors
/// When no client can connect at all.
pub async fn run(target: Target, shape: Shape, watch: &[Proc]) -> Result<Stats> {
    let started = Instant::now();
    let window_start = started + shape.warmup;
    let window_end = window_start + shape.measure;
    let target = Arc::new(target);

    let mut clients = Vec::with_capacity(shape.clients);
    for _ in 0..shape.clients {
        let target = Arc::clone(&target);
        clients.push(tokio::spawn(async move {
            client(&target, window_start, window_end).await
        }));
    }

    tokio::time::sleep_until(window_start).await;
    let cpu_before: Vec<_> = watch.iter().map(|p| cpu_time(*p)).collect();
    tokio::time::sleep_until(window_end).await;
    let cpu_after: Vec<_> = watch.iter().map(|p| cpu_time(*p)).collect();

    let mut ok = 0;
    let mut failed = 0;
    let mut latencies = Vec::new();
    let mut first_error = None;
    for client in clients {
        let result = client.await?;
        ok += result.latencies.len() as u64;
        failed += result.failed;
        latencies.extend(result.latencies);
        if first_error.is_none() {
            first_error = result.error;
        }
    }
    if ok == 0 {
        anyhow::bail!(
            "no request succeeded against {}{}: {}",
            target.addr,
            target.path,
            first_error.unwrap_or_else(|| "no error recorded".into())
        );
    }
    if let Some(error) = first_error {
        eprintln!("  note: {failed} requests failed; first error: {error}");
    }
    latencies.sort_unstable();
    let cpu = cpu_before
        .into_iter()
        .zip(cpu_after)
        .map(|(b, a)| Some(a?.saturating_sub(b?)))
        .collect();
    Ok(Stats {
        ok,
        failed,
        window: shape.measure,
        latencies,
        cpu,
    })
}

struct ClientResult {
    latencies: Vec<Duration>,
    failed: u64,
    error: Option<String>,
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn open(addr: SocketAddr) -> Result<Sender> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// One client: request after request on one connection (reopened if it fails) until
/// the end of the window.
async fn client(target: &Target, window_start: Instant, window_end: Instant) -> ClientResult {
    let mut result = ClientResult {
        latencies: Vec::with_capacity(1 << 14),
        failed: 0,
        error: None,
    };
    let host = target.addr.to_string();
    let authorization = target.bearer.as_ref().map(|t| format!("Bearer {t}"));
    let mut sender: Option<Sender> = None;
    loop {
        let now = Instant::now();
        if now >= window_end {
            return result;
        }
        let in_window = now >= window_start;
        let outcome = async {
            if sender.is_none() {
                sender = Some(open(target.addr).await?);
            }
            let sender = sender.as_mut().expect("just opened");
            sender.ready().await?;
            let mut request =
                http::Request::get(target.path.as_str()).header(http::header::HOST, host.as_str());
            if let Some(auth) = &authorization {
                request = request.header(http::header::AUTHORIZATION, auth.as_str());
            }
            let request = request.body(Empty::new())?;
            let started = Instant::now();
            let response = sender.send_request(request).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            let elapsed = started.elapsed();
            if status != http::StatusCode::OK {
                anyhow::bail!("status {status}: {}", String::from_utf8_lossy(&body));
            }
            if body.as_ref() != target.expect_body {
                anyhow::bail!("unexpected body: {}", String::from_utf8_lossy(&body));
            }
            Ok(elapsed)
        }
        .await;
        match outcome {
            Ok(elapsed) if in_window => result.latencies.push(elapsed),
            Ok(_) => {}
            Err(err) => {
                if in_window {
                    result.failed += 1;
                }
                result.error.get_or_insert_with(|| format!("{err:#}"));
                // Start over on a new connection, without spinning on a dead server.
                sender = None;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}
