//! The process's memory allocator: jemalloc, set up to give freed memory back.
//!
//! The `relay` binary installs [`Jemalloc`] as its global allocator and calls
//! [`configure`] before it starts any thread. A relay's memory follows its traffic in
//! bursts: a deploy moves a thousand tunnels at once, and their HTTP/2 connections
//! (~60 KiB of buffers each) come and go together. mimalloc, the allocator before this
//! one, kept the pages of such a burst for good, and spent more on bulk transfers;
//! glibc's costs ~15 % of the CPU under load. Side by side (BENCHMARKS.md, run 12):
//! jemalloc with these settings holds 16 KiB per idle h2 tunnel instead of 29, 22 KiB
//! instead of 80 once each tunnel has carried a request, peaks at 15–18 MiB instead of
//! 35–43 during a bulk transfer and moves it a third to three quarters faster, for
//! 1.5–2 % more instructions per small request (within the timed bench's noise).
//!
//! The settings, unless an operator gives jemalloc's own through [`OPERATOR_SETTINGS`]
//! (then theirs apply and these do not):
//! - freed pages go back to the system [`ALLOCATOR_DECAY`] after they were freed;
//! - they go back with `MADV_DONTNEED` (muzzy decay 0), not `MADV_FREE`, whose pages
//!   Linux keeps counting in the process's RSS until the machine runs short: RSS is
//!   what the OOM killer and the platform's memory graphs see;
//! - a background thread does that on a timer. Without it jemalloc purges only on its
//!   allocation path, so a relay that goes quiet after a burst would keep the burst.
//!
//! [`record`] publishes the allocator's own view (bytes the program holds, bytes
//! resident) as gauges when metrics are scraped.

use std::ffi::OsStr;
use std::time::Duration;

use tikv_jemalloc_ctl::{Access, AsName};

use crate::limits::ALLOCATOR_DECAY;

pub use tikv_jemallocator::Jemalloc;

/// jemalloc's own settings variable (this build's symbols carry the `_rjem_` prefix).
/// When set, [`configure`] leaves every setting to it.
pub const OPERATOR_SETTINGS: &str = "_RJEM_MALLOC_CONF";

/// What [`configure`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Configured {
    /// The relay's settings are in force.
    Applied,
    /// [`OPERATOR_SETTINGS`] is set: jemalloc read the operator's at start-up.
    LeftToOperator,
}

/// Applies the relay's allocator settings unless the operator gave their own. Call it
/// before any other thread starts: jemalloc's arenas created later take the settings
/// from their defaults, which this sets, and those created earlier are set one by one.
pub fn configure() -> Result<Configured, tikv_jemalloc_ctl::Error> {
    configure_with(
        std::env::var_os(OPERATOR_SETTINGS).as_deref(),
        ALLOCATOR_DECAY,
    )
}

fn configure_with(
    operator: Option<&OsStr>,
    decay: Duration,
) -> Result<Configured, tikv_jemalloc_ctl::Error> {
    if operator.is_some() {
        return Ok(Configured::LeftToOperator);
    }
    let dirty_ms = isize::try_from(decay.as_millis()).unwrap_or(isize::MAX);
    // Defaults of the arenas created from now on (a thread gets one on its first
    // allocation, up to four per CPU).
    b"arenas.dirty_decay_ms\0".name().write(dirty_ms)?;
    b"arenas.muzzy_decay_ms\0".name().write(0isize)?;
    // Arenas that exist already: before any thread starts, arena 0 alone. The others
    // refuse the setting (jemalloc answers EFAULT for an arena not yet created), and
    // there is nothing to set on them: they will take the defaults above.
    let arenas = tikv_jemalloc_ctl::arenas::narenas::read()?;
    for arena in 0..arenas {
        let dirty = format!("arena.{arena}.dirty_decay_ms\0");
        if dirty.as_bytes().name().write(dirty_ms).is_ok() {
            let muzzy = format!("arena.{arena}.muzzy_decay_ms\0");
            muzzy.as_bytes().name().write(0isize)?;
        }
    }
    tikv_jemalloc_ctl::background_thread::write(true)?;
    Ok(Configured::Applied)
}

/// Sets `relay_allocator_allocated_bytes` (what the program holds) and
/// `relay_allocator_resident_bytes` (what the allocator keeps in memory: that, its own
/// metadata, and freed pages not yet given back). Meaningful when [`Jemalloc`] is the
/// global allocator, as in the `relay` binary; an embedding program with another
/// allocator sees jemalloc's own few pages.
pub fn record() {
    // jemalloc's statistics are a snapshot refreshed by advancing its epoch.
    if tikv_jemalloc_ctl::epoch::advance().is_err() {
        return;
    }
    if let Ok(bytes) = tikv_jemalloc_ctl::stats::allocated::read() {
        metrics::gauge!("relay_allocator_allocated_bytes").set(bytes as f64);
    }
    if let Ok(bytes) = tikv_jemalloc_ctl::stats::resident::read() {
        metrics::gauge!("relay_allocator_resident_bytes").set(bytes as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// jemalloc's settings are the process's: tests that write or compare them take turns.
    static SETTINGS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn read(name: &str) -> isize {
        format!("{name}\0").as_bytes().name().read().unwrap()
    }

    #[test]
    fn settings_purge_freed_pages_after_the_decay_from_a_background_thread() {
        let _turn = SETTINGS
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // This test binary's global allocator is the system's, but jemalloc is linked
        // and answers its control interface all the same.
        let decay = Duration::from_millis(1_500);
        assert_eq!(configure_with(None, decay).unwrap(), Configured::Applied);
        assert_eq!(read("arenas.dirty_decay_ms"), 1_500);
        assert_eq!(read("arenas.muzzy_decay_ms"), 0);
        assert_eq!(read("arena.0.dirty_decay_ms"), 1_500);
        assert_eq!(read("arena.0.muzzy_decay_ms"), 0);
        assert!(tikv_jemalloc_ctl::background_thread::read().unwrap());
    }

    #[test]
    fn an_operators_jemalloc_settings_replace_the_relays() {
        let _turn = SETTINGS
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let before = read("arenas.dirty_decay_ms");
        let operator = OsStr::new("dirty_decay_ms:5000");
        assert_eq!(
            configure_with(Some(operator), Duration::from_millis(7)).unwrap(),
            Configured::LeftToOperator
        );
        assert_eq!(read("arenas.dirty_decay_ms"), before, "nothing was written");
    }
}
