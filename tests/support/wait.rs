//! Waiting on conditions, never on time.
//!
//! [`wait_until`] and [`wait_until_async`] poll a condition every
//! [`POLL_INTERVAL`] until it holds or the deadline passes; [`within`] bounds a
//! single future. All of them panic with a message naming what was awaited.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// How often conditions are re-checked. Short, so waits end soon after the
/// condition becomes true; this is a polling period, not a settling delay.
pub const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Polls `cond` until it returns `true`.
///
/// # Panics
///
/// When `timeout` passes first; the message names `what`.
pub async fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting until {what}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Polls the async condition `cond` until it returns `true`.
///
/// # Panics
///
/// When `timeout` passes first (including while a check is in flight).
pub async fn wait_until_async<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, cond()).await {
            Ok(true) => return,
            Ok(false) => {}
            Err(_) => panic!("timed out after {timeout:?} waiting until {what}"),
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting until {what}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Awaits `fut`, failing the test if it takes longer than `timeout`.
///
/// # Panics
///
/// When `timeout` passes first; the message names `what`.
pub async fn within<T>(what: &str, timeout: Duration, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(timeout, fut).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {timeout:?} waiting for {what}"),
    }
}
