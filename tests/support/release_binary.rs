//! Where the benchmarks find the optimized `relay` binary.

use std::path::PathBuf;
use std::sync::OnceLock;

use anyhow::{Result, anyhow, bail};

use crate::cargo_build::{BuildProfile, RelayBuild, build_relay};

/// The release relay binary: `RELAY_BIN`, or the `relay` that
/// `cargo build --release -p relay --bin relay` leaves in the target directory the running
/// executable lives in (which also follows `CARGO_TARGET_DIR`). Benchmarks always measure
/// the optimized build, whatever profile they were built with.
///
/// Cargo is asked once per process, as for [`relay_binary`](crate::relay_binary), so a
/// benchmark never measures a stale binary; after `script` (which runs that same command
/// first) it only checks fingerprints.
///
/// # Errors
/// When `RELAY_BIN` is not a file, or the build fails (with cargo's output, and `script`,
/// the script that builds the binary and runs the benchmark).
pub fn release_relay_binary(script: &str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("RELAY_BIN") {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        bail!("RELAY_BIN={} is not a file", path.display());
    }
    static BUILT: OnceLock<Result<RelayBuild, String>> = OnceLock::new();
    match BUILT.get_or_init(|| build_relay(BuildProfile::Release)) {
        Ok(build) => Ok(build.path.clone()),
        Err(err) => Err(anyhow!(
            "{err}\n(benchmarks are meant to run through {script})"
        )),
    }
}
