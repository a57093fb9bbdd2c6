//! Where the benchmarks find the optimized `relay` binary.

use std::path::PathBuf;
use std::sync::OnceLock;

use anyhow::{Result, anyhow, bail};

use crate::cargo_build::{BuildProfile, RelayBuild, build_relay};

/// The binary a benchmark's environment variable `var` names, if it names one. Cargo runs
/// benchmarks in their package's directory (`tests/`), not where it was started, so a
/// relative path is taken from the shell's directory (`PWD`) when it is not a file from
/// `tests/`: `RELAY_BIN=target/release/relay` works from the workspace root.
///
/// # Errors
/// When `var` is set but names no file, saying where it looked.
pub fn binary_from_env(var: &str) -> Result<Option<PathBuf>> {
    let Some(given) = std::env::var_os(var).map(PathBuf::from) else {
        return Ok(None);
    };
    if given.is_file() {
        return Ok(Some(given));
    }
    let from_shell = std::env::var_os("PWD")
        .filter(|_| given.is_relative())
        .map(|pwd| PathBuf::from(pwd).join(&given));
    match from_shell {
        Some(path) if path.is_file() => Ok(Some(path)),
        Some(path) => bail!(
            "{var}={} is not a file (looked in {} and at {})",
            given.display(),
            std::env::current_dir().map_or_else(|_| "?".into(), |d| d.display().to_string()),
            path.display()
        ),
        None => bail!("{var}={} is not a file", given.display()),
    }
}

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
    if let Some(path) = binary_from_env("RELAY_BIN")? {
        return Ok(path);
    }
    static BUILT: OnceLock<Result<RelayBuild, String>> = OnceLock::new();
    match BUILT.get_or_init(|| build_relay(BuildProfile::Release)) {
        Ok(build) => Ok(build.path.clone()),
        Err(err) => Err(anyhow!(
            "{err}\n(benchmarks are meant to run through {script})"
        )),
    }
}
