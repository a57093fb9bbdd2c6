//! Building the `relay` binary that tests and benchmarks run, so that they
//! never run a stale one.
//!
//! `cargo test` builds the test executables and the libraries they link, but
//! not the binaries of other packages: the `relay` binary in the target
//! directory is whatever the last `cargo build` left there, possibly from
//! before the latest edit. [`build_relay`] asks cargo itself to bring it up to
//! date: `cargo build -p relay --bin relay` with the profile and target
//! directory of the running executable, reading the executable's path from
//! cargo's `compiler-artifact` message instead of guessing it. When the binary
//! is already up to date (`scripts/test.sh` builds it first with the very same
//! command) cargo only checks fingerprints, a fraction of a second.
//!
//! Features: a release binary is built as it ships (`-p relay` alone, as the
//! Dockerfile and the bench scripts build it). A debug binary is built with the
//! relay's dev-dependency features too (`--examples`, which selects no target:
//! the relay has no examples, but it makes cargo resolve features as for tests),
//! the feature set `cargo test --workspace` builds every dependency with: one
//! build of the dependency graph serves the binary and the tests, instead of two
//! (the only difference is tokio's `test-util`, whose clock the binary never
//! pauses).
//!
//! Callers cache the result once per process
//! ([`relay_binary`](crate::relay_binary),
//! [`release_relay_binary`](crate::release_relay_binary)).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Which profile to build the relay binary with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildProfile {
    /// The profile the running executable was built with (`debug` →
    /// `dev`, `release` → `release`, any other directory → that custom
    /// profile).
    SameAsCurrentExe,
    /// `--release`, whatever the running executable was built with.
    Release,
}

/// A `relay` binary cargo has just confirmed to be up to date.
#[derive(Debug, Clone)]
pub struct RelayBuild {
    /// The executable, as cargo reported it.
    pub path: PathBuf,
    /// `true` when cargo found it up to date and compiled nothing.
    pub fresh: bool,
    /// How long the `cargo build` took (mostly fingerprint checks when
    /// `fresh`).
    pub took: Duration,
}

/// Where an executable built by cargo lives:
/// `<target dir>[/<triple>]/<profile dir>/deps/<name>` (test and bench
/// executables) or `<target dir>[/<triple>]/<profile dir>/<name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildLayout {
    /// The target directory (the one holding `CACHEDIR.TAG`).
    pub target_dir: PathBuf,
    /// `Some(triple)` when built with `--target <triple>`.
    pub triple: Option<String>,
    /// `debug`, `release` or a custom profile's name.
    pub profile_dir: String,
}

// === impl BuildLayout ===

impl BuildLayout {
    /// The layout of the running executable.
    ///
    /// # Errors
    ///
    /// When its path does not look like cargo's target directory layout.
    pub fn of_current_exe() -> Result<Self, String> {
        let exe = std::env::current_exe()
            .map_err(|err| format!("the running executable has no path: {err}"))?;
        Self::of_exe(&exe, |dir| dir.join("CACHEDIR.TAG").is_file())
    }

    /// The layout of `exe`; `is_target_dir` tells whether a directory is a
    /// target directory (cargo writes `CACHEDIR.TAG` at its root, which is
    /// how a `<triple>` level is told apart from the target directory).
    ///
    /// # Errors
    ///
    /// When `exe` is not inside a `<profile dir>` of a target directory.
    pub fn of_exe(exe: &Path, is_target_dir: impl Fn(&Path) -> bool) -> Result<Self, String> {
        let unexpected = || {
            format!(
                "{} is not inside a cargo target directory \
                 (<target>[/<triple>]/<profile>[/deps]/<exe>)",
                exe.display()
            )
        };
        let mut dir = exe.parent().ok_or_else(unexpected)?;
        if dir.file_name().is_some_and(|name| name == "deps") {
            dir = dir.parent().ok_or_else(unexpected)?;
        }
        let profile_dir = dir
            .file_name()
            .and_then(|name| name.to_str())
            .ok_or_else(unexpected)?
            .to_owned();
        let above = dir.parent().ok_or_else(unexpected)?;
        if is_target_dir(above) {
            return Ok(Self {
                target_dir: above.to_owned(),
                triple: None,
                profile_dir,
            });
        }
        let target_dir = above.parent().ok_or_else(unexpected)?;
        if !is_target_dir(target_dir) {
            return Err(unexpected());
        }
        let triple = above
            .file_name()
            .and_then(|name| name.to_str())
            .ok_or_else(unexpected)?
            .to_owned();
        Ok(Self {
            target_dir: target_dir.to_owned(),
            triple: Some(triple),
            profile_dir,
        })
    }

    /// The `cargo build` arguments that select this target directory,
    /// target triple and `profile`.
    pub fn cargo_args(&self, profile: BuildProfile) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["--target-dir".into(), self.target_dir.clone().into()];
        if let Some(triple) = &self.triple {
            args.push("--target".into());
            args.push(triple.into());
        }
        match (profile, self.profile_dir.as_str()) {
            (BuildProfile::Release, _) | (BuildProfile::SameAsCurrentExe, "release") => {
                args.push("--release".into());
            }
            // `debug` is the directory of the `dev` (and `test`) profile: the default.
            (BuildProfile::SameAsCurrentExe, "debug") => {}
            (BuildProfile::SameAsCurrentExe, custom) => {
                args.push("--profile".into());
                args.push(custom.into());
            }
        }
        args
    }

    /// The arguments that choose the binary's features (see the module's
    /// documentation): `--examples` for the `dev` profile, nothing for another.
    pub fn feature_args(&self, profile: BuildProfile) -> Vec<OsString> {
        match (profile, self.profile_dir.as_str()) {
            (BuildProfile::SameAsCurrentExe, "debug") => vec!["--examples".into()],
            _ => Vec::new(),
        }
    }
}

/// Runs `cargo build -p relay --bin relay` for `profile` in the target
/// directory of the running executable and returns the binary cargo built or
/// found up to date.
///
/// Uses the `CARGO` variable cargo sets for the tests it runs (so the same
/// toolchain), else `cargo` from `PATH`.
///
/// # Errors
///
/// When cargo cannot be started, the build fails (the message carries
/// cargo's rendered diagnostics) or cargo reports no `relay` executable.
pub fn build_relay(profile: BuildProfile) -> Result<RelayBuild, String> {
    let layout = BuildLayout::of_current_exe()?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // The workspace this support library belongs to, wherever the tests run from.
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let mut cmd = Command::new(&cargo);
    cmd.args(["build", "-p", "relay", "--bin", "relay"])
        .args(layout.feature_args(profile))
        // JSON artifact messages on stdout; diagnostics rendered as text on
        // stderr, so a failure can be shown as a developer would see it.
        .arg("--message-format=json-render-diagnostics")
        .arg("--manifest-path")
        .arg(&manifest)
        .args(layout.cargo_args(profile))
        .stdin(Stdio::null());
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(is_per_package_variable) {
            cmd.env_remove(key);
        }
    }
    let shown = format!("{cmd:?}");
    let started = Instant::now();
    let output = cmd
        .output()
        .map_err(|err| format!("could not run {shown}: {err}"))?;
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(format!(
            "building the relay binary failed ({shown} exited with {}); tests never run a \
             stale binary, so they stop here. cargo said:\n{stderr}",
            output.status
        ));
    }
    let (path, fresh) = relay_artifact(&stdout).ok_or_else(|| {
        format!(
            "{shown} succeeded but reported no `relay` executable; stdout:\n{stdout}\n\
             stderr:\n{stderr}"
        )
    })?;
    Ok(RelayBuild { path, fresh, took })
}

/// Whether `key` is one of the variables cargo sets for the package whose
/// test it runs (`CARGO_PKG_NAME=relay-tests`, `CARGO_MANIFEST_DIR`, ..).
///
/// They must not reach the nested `cargo build`: some build scripts (ring's)
/// declare `rerun-if-env-changed` on them, so inheriting the test's values
/// would rerun those scripts and recompile everything above them, on every
/// test process, instead of finding the binary up to date.
fn is_per_package_variable(key: &str) -> bool {
    key.starts_with("CARGO_PKG_")
        || key.starts_with("CARGO_BIN_EXE_")
        || matches!(
            key,
            "CARGO_MANIFEST_DIR"
                | "CARGO_MANIFEST_PATH"
                | "CARGO_MANIFEST_LINKS"
                | "CARGO_CRATE_NAME"
                | "CARGO_BIN_NAME"
                | "CARGO_PRIMARY_PACKAGE"
                | "CARGO_TARGET_TMPDIR"
                | "CARGO_RUSTC_CURRENT_DIR"
                | "OUT_DIR"
        )
}

/// The executable path and `fresh` flag of the `relay` binary in cargo's
/// JSON messages (one per line).
pub fn relay_artifact(messages: &str) -> Option<(PathBuf, bool)> {
    messages
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|msg| msg["reason"] == "compiler-artifact")
        .filter(|msg| msg["target"]["name"] == "relay")
        .filter(|msg| {
            msg["target"]["kind"]
                .as_array()
                .is_some_and(|kinds| kinds.iter().any(|kind| kind == "bin"))
        })
        .find_map(|msg| {
            let path = PathBuf::from(msg["executable"].as_str()?);
            Some((path, msg["fresh"].as_bool().unwrap_or(false)))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(exe: &str, target_dirs: &[&str]) -> Result<BuildLayout, String> {
        BuildLayout::of_exe(Path::new(exe), |dir| {
            target_dirs.iter().any(|target| dir == Path::new(target))
        })
    }

    fn args(layout: &BuildLayout, profile: BuildProfile) -> Vec<String> {
        layout
            .cargo_args(profile)
            .into_iter()
            .map(|arg| arg.into_string().expect("utf-8 argument"))
            .collect()
    }

    #[test]
    fn a_debug_test_executable_builds_the_dev_profile_in_its_target_dir() {
        let layout = layout("/w/target/debug/deps/http_proxy-0123", &["/w/target"]).unwrap();
        assert_eq!(layout.target_dir, Path::new("/w/target"));
        assert_eq!(layout.triple, None);
        assert_eq!(
            args(&layout, BuildProfile::SameAsCurrentExe),
            ["--target-dir", "/w/target"]
        );
        assert_eq!(
            args(&layout, BuildProfile::Release),
            ["--target-dir", "/w/target", "--release"]
        );
        // Debug: the tests' features (one dependency build for both); release: as shipped.
        assert_eq!(
            layout.feature_args(BuildProfile::SameAsCurrentExe),
            ["--examples"]
        );
        assert!(layout.feature_args(BuildProfile::Release).is_empty());
    }

    #[test]
    fn release_and_custom_profiles_are_followed() {
        let release = layout("/t/release/deps/proxy-1", &["/t"]).unwrap();
        assert_eq!(
            args(&release, BuildProfile::SameAsCurrentExe),
            ["--target-dir", "/t", "--release"]
        );
        let custom = layout("/t/ci/deps/auth-2", &["/t"]).unwrap();
        assert_eq!(
            args(&custom, BuildProfile::SameAsCurrentExe),
            ["--target-dir", "/t", "--profile", "ci"]
        );
    }

    #[test]
    fn a_cross_compiled_executable_keeps_its_triple() {
        let layout = layout("/t/x86_64-unknown-linux-musl/debug/deps/cli-3", &["/t"]).unwrap();
        assert_eq!(layout.target_dir, Path::new("/t"));
        assert_eq!(
            args(&layout, BuildProfile::SameAsCurrentExe),
            [
                "--target-dir",
                "/t",
                "--target",
                "x86_64-unknown-linux-musl"
            ]
        );
    }

    #[test]
    fn an_executable_outside_a_target_dir_is_refused() {
        let err = layout("/usr/local/bin/some-test", &["/t"]).unwrap_err();
        assert!(err.contains("not inside a cargo target directory"), "{err}");
    }

    #[test]
    fn only_the_per_package_variables_are_withheld_from_cargo() {
        for key in [
            "CARGO_PKG_NAME",
            "CARGO_PKG_VERSION_MAJOR",
            "CARGO_MANIFEST_DIR",
            "OUT_DIR",
        ] {
            assert!(is_per_package_variable(key), "{key}");
        }
        // What configures cargo itself must pass through.
        for key in [
            "CARGO",
            "CARGO_HOME",
            "CARGO_TARGET_DIR",
            "CARGO_INCREMENTAL",
            "RUSTFLAGS",
        ] {
            assert!(!is_per_package_variable(key), "{key}");
        }
    }

    #[test]
    fn the_relay_executable_is_read_from_the_artifact_messages() {
        let messages = concat!(
            r#"{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"relay"},"executable":null,"fresh":true}"#,
            "\n",
            r#"{"reason":"compiler-artifact","target":{"kind":["bin"],"name":"other"},"executable":"/t/debug/other","fresh":true}"#,
            "\n",
            "not json\n",
            r#"{"reason":"compiler-artifact","target":{"kind":["bin"],"name":"relay"},"executable":"/t/debug/relay","fresh":false}"#,
            "\n",
            r#"{"reason":"build-finished","success":true}"#,
        );
        assert_eq!(
            relay_artifact(messages),
            Some((PathBuf::from("/t/debug/relay"), false))
        );
        assert_eq!(relay_artifact(r#"{"reason":"build-finished"}"#), None);
    }
}
