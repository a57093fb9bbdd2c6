//! Process memory, from `/proc/<pid>/status` (Linux only).
//!
//! [`rss_kib`] is the resident set now (`VmRSS`), [`peak_rss_kib`] the
//! kernel's high-water mark (`VmHWM`). The peak alone cannot show that memory
//! stayed flat *during* one transfer, since it also covers start-up and every
//! earlier test step; [`RssSampler`] records the maximum and the samples of a
//! window the test chooses, e.g. from before a 1 GB download to its end:
//!
//! ```no_run
//! # async fn example(relay: &relay_tests::TestRelay) {
//! let sampler = relay_tests::RssSampler::start(relay.pid());
//! // ... push a gigabyte through the relay ...
//! let samples = sampler.finish();
//! assert!(samples.growth_kib() < 64 * 1024, "{} KiB", samples.growth_kib());
//! # }
//! ```

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How often [`RssSampler`] reads `VmRSS`: often enough to catch a buffer
/// that balloons for a fraction of a second, rarely enough to cost nothing.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(20);

/// A `kB` field of `/proc/<pid>/status`.
fn status_field_kib(pid: u32, field: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    parse_status_field_kib(&status, field).with_context(|| format!("{field} in {path}"))
}

/// `field` (e.g. `VmRSS`) of a `/proc/<pid>/status` text, in KiB.
///
/// # Errors
///
/// When the field is missing or not `<number> kB`.
pub fn parse_status_field_kib(status: &str, field: &str) -> Result<u64> {
    let Some(line) = status
        .lines()
        .find(|line| line.split(':').next() == Some(field))
    else {
        bail!("no {field} line");
    };
    let value = line[field.len() + 1..].trim();
    let Some(number) = value.strip_suffix("kB") else {
        bail!("{field} is {value:?}, not in kB");
    };
    number
        .trim()
        .parse()
        .with_context(|| format!("{field} is {value:?}"))
}

/// The resident set size of `pid` now, in KiB (`VmRSS`).
///
/// # Errors
///
/// When the process does not exist (any more) or `/proc` is unreadable.
pub fn rss_kib(pid: u32) -> Result<u64> {
    status_field_kib(pid, "VmRSS")
}

/// The peak resident set size of `pid` since it started, in KiB (`VmHWM`).
///
/// # Errors
///
/// As [`rss_kib`].
pub fn peak_rss_kib(pid: u32) -> Result<u64> {
    status_field_kib(pid, "VmHWM")
}

/// What an [`RssSampler`] saw.
#[derive(Debug, Clone)]
pub struct RssSamples {
    /// The process sampled.
    pub pid: u32,
    /// Every reading, in order: when, and `VmRSS` in KiB.
    pub samples: Vec<(Instant, u64)>,
    /// Set when a read failed (typically: the process exited); sampling
    /// stopped there.
    pub error: Option<String>,
}

// === impl RssSamples ===

impl RssSamples {
    /// The largest reading, in KiB (0 without readings).
    pub fn max_kib(&self) -> u64 {
        self.samples.iter().map(|&(_, kib)| kib).max().unwrap_or(0)
    }

    /// The first reading, in KiB: the baseline of the window.
    pub fn first_kib(&self) -> u64 {
        self.samples.first().map_or(0, |&(_, kib)| kib)
    }

    /// The last reading, in KiB.
    pub fn last_kib(&self) -> u64 {
        self.samples.last().map_or(0, |&(_, kib)| kib)
    }

    /// How far the maximum rose above the first reading, in KiB.
    pub fn growth_kib(&self) -> u64 {
        self.max_kib().saturating_sub(self.first_kib())
    }
}

/// Samples `VmRSS` of a process every [`SAMPLE_INTERVAL`] on a thread of its
/// own (so a busy or blocked test runtime cannot delay it) until
/// [`finish`](RssSampler::finish) or drop.
pub struct RssSampler {
    /// The readings so far, shared with the thread. A std mutex: held only to
    /// push or copy.
    samples: Arc<Mutex<RssSamples>>,
    /// Dropping it wakes the thread at once and stops it.
    stop_tx: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

// === impl RssSampler ===

impl RssSampler {
    /// Starts sampling `pid`, taking the first reading before returning, so
    /// the baseline predates whatever the test does next.
    ///
    /// # Panics
    ///
    /// If the first reading fails (no such process) or the thread cannot be
    /// spawned.
    pub fn start(pid: u32) -> Self {
        let first = rss_kib(pid).unwrap_or_else(|err| panic!("sample RSS of pid {pid}: {err:#}"));
        let samples = Arc::new(Mutex::new(RssSamples {
            pid,
            samples: vec![(Instant::now(), first)],
            error: None,
        }));
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let shared = samples.clone();
        let thread = std::thread::Builder::new()
            .name(format!("rss-sampler-{pid}"))
            .spawn(move || {
                let push = |reading: Result<u64>| {
                    let mut out = shared.lock().expect("samples poisoned");
                    match reading {
                        Ok(kib) => out.samples.push((Instant::now(), kib)),
                        Err(err) => out.error = Some(format!("{err:#}")),
                    }
                };
                // The interval doubles as the stop signal's wait: a stop (or
                // the sender's drop) ends the wait at once.
                while let Err(RecvTimeoutError::Timeout) = stop_rx.recv_timeout(SAMPLE_INTERVAL) {
                    let reading = rss_kib(pid);
                    let failed = reading.is_err();
                    push(reading);
                    if failed {
                        return;
                    }
                }
                // A last reading at the moment of the stop.
                push(rss_kib(pid));
            })
            .expect("spawn the RSS sampler thread");
        Self {
            samples,
            stop_tx: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// The readings so far, while sampling goes on.
    pub fn snapshot(&self) -> RssSamples {
        self.samples.lock().expect("samples poisoned").clone()
    }

    /// The largest reading so far, in KiB.
    pub fn max_kib(&self) -> u64 {
        self.samples.lock().expect("samples poisoned").max_kib()
    }

    /// Stops sampling and returns every reading.
    ///
    /// # Panics
    ///
    /// If the sampler thread panicked.
    pub fn finish(mut self) -> RssSamples {
        self.stop_and_join();
        self.snapshot()
    }

    fn stop_and_join(&mut self) {
        drop(self.stop_tx.take());
        if let Some(thread) = self.thread.take() {
            thread.join().expect("the RSS sampler thread panicked");
        }
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Stop it, but do not risk turning a test failure into a double panic.
            drop(self.stop_tx.take());
        } else {
            self.stop_and_join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Polls `cond` until it holds; these tests are synchronous, as is the
    /// sampler.
    fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + crate::DEADLINE;
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn status_fields_are_parsed_in_kib() {
        let status = "Name:\trelay\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\nThreads:\t4\n";
        assert_eq!(parse_status_field_kib(status, "VmRSS").unwrap(), 10240);
        assert_eq!(parse_status_field_kib(status, "VmHWM").unwrap(), 20480);
        assert!(parse_status_field_kib(status, "VmSwap").is_err());
        assert!(parse_status_field_kib(status, "Threads").is_err());
    }

    #[test]
    fn rss_of_this_process_is_plausible_and_below_its_peak() {
        let pid = std::process::id();
        let rss = rss_kib(pid).unwrap();
        let peak = peak_rss_kib(pid).unwrap();
        assert!(rss > 1024, "a test process uses more than 1 MiB: {rss} KiB");
        assert!(peak >= rss, "peak {peak} KiB below current {rss} KiB");
        assert!(rss_kib(u32::MAX).is_err(), "no such process");
    }

    /// The sampler must see a transient allocation that is gone by the time
    /// it stops, which comparing a reading before with one after would miss.
    #[test]
    fn the_sampler_catches_a_transient_allocation() {
        const EXTRA_KIB: u64 = 64 * 1024;
        let sampler = RssSampler::start(std::process::id());
        // Every byte written, so every page is resident.
        let extra = vec![1u8; (EXTRA_KIB * 1024) as usize];
        let resident_since = Instant::now();
        wait_until("a sample is taken while the allocation is resident", || {
            sampler
                .snapshot()
                .samples
                .iter()
                .any(|&(at, _)| at > resident_since)
        });
        drop(std::hint::black_box(extra));
        let samples = sampler.finish();
        assert!(samples.error.is_none(), "{:?}", samples.error);
        assert!(
            samples.growth_kib() >= EXTRA_KIB / 2,
            "max {} KiB vs first {} KiB: the 64 MiB allocation was not seen",
            samples.max_kib(),
            samples.first_kib()
        );
    }

    #[test]
    fn sampling_a_process_that_exits_stops_with_an_error() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let sampler = RssSampler::start(child.id());
        wait_until("a second sample of the live child", || {
            sampler.snapshot().samples.len() >= 2
        });
        child.kill().expect("kill sleep");
        child.wait().expect("reap sleep");
        wait_until("the sampler notices the child is gone", || {
            sampler.snapshot().error.is_some()
        });
        let samples = sampler.finish();
        assert!(samples.samples.len() >= 2, "{samples:?}");
        assert!(samples.max_kib() > 0);
    }
}
