//! Where the benchmarks find the optimized `relay` binary.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};

/// The release relay binary: `RELAY_BIN`, or `relay` in the `release` directory of the
/// target directory the running executable lives in (`<target>/<profile>/deps/<bench>-*`
/// → `<target>/release/relay`, which also follows `CARGO_TARGET_DIR`). Benchmarks always
/// measure the optimized build, whatever profile they were built with.
///
/// # Errors
/// When the binary is missing, naming the command that builds it and `script`, the
/// script that builds it and runs the benchmark.
pub fn release_relay_binary(script: &str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("RELAY_BIN") {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        bail!("RELAY_BIN={} is not a file", path.display());
    }
    let exe = std::env::current_exe().context("the bench executable has no path")?;
    let target_dir = exe
        .parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .ok_or_else(|| anyhow!("unexpected bench executable location {}", exe.display()))?;
    let path = target_dir
        .join("release")
        .join(format!("relay{}", std::env::consts::EXE_SUFFIX));
    if !path.is_file() {
        bail!(
            "release relay binary not found at {}: run `cargo build --release -p relay` \
             first, or {script}",
            path.display()
        );
    }
    Ok(path)
}
