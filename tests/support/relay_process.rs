//! The `relay` binary as a child process.
//!
//! [`TestRelay`] runs `relay serve --bind 127.0.0.1 --port 0 ..`, captures
//! every stdout and stderr line into a shared buffer, and learns its address
//! from the one `listening .. addr=127.0.0.1:PORT` log line. The child is
//! killed when the [`TestRelay`] is dropped; if the test is panicking, the
//! captured output is printed first so the failure comes with the relay's
//! side of the story. If the test passed but the relay logged a panic (a task
//! panic does not stop the process), the drop fails the test.
//!
//! [`run_relay_cli`] runs one-shot commands (`relay token ..`, invalid
//! configs) to completion.
//!
//! Both run [`relay_binary`], which cargo brings up to date once per test
//! process, so a test never runs a binary older than the relay's sources.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

use crate::cargo_build::{BuildProfile, RelayBuild, build_relay};
use crate::client::{HttpClient, HttpResponse};
use crate::metrics::counter_value;
use crate::tokens::Claims;
use crate::wait::{wait_until, wait_until_async, within};
use crate::{DEADLINE, TEST_SECRET};

/// How long the relay may take to print its `listening` line.
const STARTUP_DEADLINE: Duration = Duration::from_secs(10);

/// How many trailing output lines to print when a test fails.
const LOG_TAIL_ON_PANIC: usize = 300;

/// The `relay` binary, brought up to date by cargo before its first use in
/// this process (see [`cargo_build`](crate::cargo_build)): `cargo test` alone
/// does not rebuild it, and an end-to-end test must never run a stale one.
///
/// The first call runs `cargo build -p relay --bin relay` with the running
/// test executable's profile and target directory and blocks until it ends
/// (a fraction of a second when nothing changed, as after `scripts/test.sh`,
/// which builds it with the same command first); later calls return the
/// cached path. A failed build is cached too, so every test of the process
/// fails at once with the same message instead of rebuilding in turn.
///
/// # Panics
///
/// If the build fails, with cargo's diagnostics.
pub fn relay_binary() -> PathBuf {
    relay_build().path.clone()
}

/// The build behind [`relay_binary`]: its path, whether cargo found it up to
/// date, and how long asking took.
///
/// # Panics
///
/// As [`relay_binary`].
pub fn relay_build() -> &'static RelayBuild {
    static BUILT: OnceLock<Result<RelayBuild, String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let build = build_relay(BuildProfile::SameAsCurrentExe);
        if let Ok(build) = &build {
            // Captured with the first test's output: says why it was slow if it was.
            eprintln!(
                "relay binary {}: cargo build took {:?} (up to date: {})",
                build.path.display(),
                build.took,
                build.fresh
            );
        }
        build
    });
    match built {
        Ok(build) => build,
        Err(err) => panic!("{err}"),
    }
}

/// A `relay` command with a clean environment: inherited `RELAY_*` and `FLY_*`
/// variables and `REDIS_URL` (the relay reads all of them) are removed so the
/// developer's shell cannot change what a test means.
pub(crate) fn relay_command(args: &[String], env: &[(String, String)]) -> Command {
    let mut cmd = Command::new(relay_binary());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (key, _) in std::env::vars_os() {
        let key_str = key.to_string_lossy();
        if key_str.starts_with("RELAY_") || key_str.starts_with("FLY_") || key_str == "REDIS_URL" {
            cmd.env_remove(key);
        }
    }
    cmd.env_remove("RUST_LOG").env("NO_COLOR", "1");
    for (key, value) in env {
        cmd.env(key, value);
    }
    cmd
}

/// Output of a one-shot `relay` run.
#[derive(Debug)]
pub struct CliOutput {
    /// Exit code; `None` if killed by a signal.
    pub code: Option<i32>,
    /// Everything written to stdout.
    pub stdout: String,
    /// Everything written to stderr.
    pub stderr: String,
}

/// Runs `relay <args>` with `env` to completion.
///
/// # Panics
///
/// If it does not exit within [`DEADLINE`] (it is killed then).
pub async fn run_relay_cli(args: &[&str], env: &[(&str, &str)]) -> CliOutput {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let output = within(
        &format!("`relay {}` to exit", args.join(" ")),
        DEADLINE,
        relay_command(&args, &env).output(),
    )
    .await
    .expect("relay binary can be started");
    CliOutput {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Shared, append-only capture of the child's output lines. A std mutex: it
/// is only held for pushes and copies, never across an await.
pub(crate) type LogBuffer = Arc<Mutex<Vec<String>>>;

/// Copies every line of `reader` into `logs` until EOF.
pub(crate) fn spawn_line_reader(
    reader: impl AsyncRead + Unpin + Send + 'static,
    logs: LogBuffer,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut reader = BufReader::new(reader);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line)
                        .trim_end_matches(['\r', '\n'])
                        .to_owned();
                    logs.lock().expect("log buffer poisoned").push(text);
                }
            }
        }
    })
}

/// Configures and spawns a [`TestRelay`]; see [`TestRelay::builder`].
#[must_use = "call `spawn` to start the relay"]
pub struct RelayBuilder {
    secret: Option<String>,
    dev: bool,
    region: String,
    machine_id: String,
    rust_log: String,
    extra_args: Vec<String>,
    extra_env: Vec<(String, String)>,
    port: u16,
}

// === impl RelayBuilder ===

impl RelayBuilder {
    /// Signs tokens with `secret` instead of [`TEST_SECRET`].
    pub fn secret(mut self, secret: &str) -> Self {
        self.secret = Some(secret.to_owned());
        self
    }

    /// Starts without `RELAY_JWT_SECRET`.
    pub fn no_secret(mut self) -> Self {
        self.secret = None;
        self
    }

    /// Adds `--dev` (and drops the secret: dev mode needs none).
    pub fn dev(mut self) -> Self {
        self.dev = true;
        self.secret = None;
        self
    }

    /// `--region`.
    pub fn region(mut self, region: &str) -> Self {
        self.region = region.to_owned();
        self
    }

    /// `--machine-id`.
    pub fn machine_id(mut self, machine_id: &str) -> Self {
        self.machine_id = machine_id.to_owned();
        self
    }

    /// `RUST_LOG` (default `info`).
    pub fn rust_log(mut self, filter: &str) -> Self {
        self.rust_log = filter.to_owned();
        self
    }

    /// `--port` (default 0, an ephemeral port). To restart a relay where its
    /// agents expect it, pass the port of the previous run
    /// ([`TestRelay::addr`]) after it was killed.
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Any extra `--flag value`.
    pub fn arg(mut self, flag: &str, value: &str) -> Self {
        self.extra_args.push(flag.to_owned());
        self.extra_args.push(value.to_owned());
        self
    }

    /// `--ping-interval` (humantime, e.g. `100ms`).
    pub fn ping_interval(self, interval: &str) -> Self {
        self.arg("--ping-interval", interval)
    }

    /// `--max-missed-pongs`.
    pub fn max_missed_pongs(self, n: u32) -> Self {
        self.arg("--max-missed-pongs", &n.to_string())
    }

    /// `--exchange-timeout` (humantime).
    pub fn exchange_timeout(self, timeout: &str) -> Self {
        self.arg("--exchange-timeout", timeout)
    }

    /// `--max-pending`.
    pub fn max_pending(self, n: usize) -> Self {
        self.arg("--max-pending", &n.to_string())
    }

    /// `--max-body-bytes`.
    pub fn max_body_bytes(self, n: usize) -> Self {
        self.arg("--max-body-bytes", &n.to_string())
    }

    /// `--max-frame-bytes`.
    pub fn max_frame_bytes(self, n: usize) -> Self {
        self.arg("--max-frame-bytes", &n.to_string())
    }

    /// `--channel-queue`.
    pub fn channel_queue(self, n: usize) -> Self {
        self.arg("--channel-queue", &n.to_string())
    }

    /// An environment variable for the child (set after the defaults, so it
    /// can override `RUST_LOG` or `RELAY_JWT_SECRET`).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.extra_env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// `--redis-url`: share the Redis directory at `url` (e.g.
    /// [`TestRedis::url`](crate::TestRedis::url)).
    pub fn redis(self, url: &str) -> Self {
        self.arg("--redis-url", url)
    }

    /// `--redis-prefix`.
    pub fn redis_prefix(self, prefix: &str) -> Self {
        self.arg("--redis-prefix", prefix)
    }

    /// `--routing` (`proxy` or `fly-replay`).
    pub fn routing(self, mode: &str) -> Self {
        self.arg("--routing", mode)
    }

    /// `--app-name` (what `FLY_APP_NAME` sets on Fly).
    pub fn app_name(self, name: &str) -> Self {
        self.arg("--app-name", name)
    }

    /// `--advertise-addr`.
    pub fn advertise_addr(self, addr: &str) -> Self {
        self.arg("--advertise-addr", addr)
    }

    /// `--reconcile-interval` (humantime, e.g. `1s`).
    pub fn reconcile_interval(self, interval: &str) -> Self {
        self.arg("--reconcile-interval", interval)
    }

    /// Spawns the relay and waits for its `listening` line.
    ///
    /// # Panics
    ///
    /// If the process exits or stays silent for [`STARTUP_DEADLINE`]; the
    /// message includes everything it printed.
    pub async fn spawn(self) -> TestRelay {
        let port = self.port.to_string();
        let mut args: Vec<String> = [
            "serve",
            "--bind",
            "127.0.0.1",
            "--port",
            &port,
            "--region",
            &self.region,
            "--machine-id",
            &self.machine_id,
        ]
        .iter()
        .map(|a| (*a).to_owned())
        .collect();
        if self.dev {
            args.push("--dev".to_owned());
            // Never the developer's own state file: one per relay, in the temp directory,
            // unless the test names one (to restart a dev relay on the same secret).
            if !self
                .extra_env
                .iter()
                .any(|(k, _)| k == "RELAY_DEV_STATE_FILE")
            {
                static NEXT: std::sync::atomic::AtomicUsize =
                    std::sync::atomic::AtomicUsize::new(0);
                let path = std::env::temp_dir().join(format!(
                    "relay-test-dev-{}-{}.json",
                    std::process::id(),
                    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                ));
                let _ = std::fs::remove_file(&path);
                args.push("--dev-state-file".to_owned());
                args.push(path.to_string_lossy().into_owned());
            }
        }
        args.extend(self.extra_args.iter().cloned());
        let mut env = vec![("RUST_LOG".to_owned(), self.rust_log.clone())];
        if let Some(secret) = &self.secret {
            env.push(("RELAY_JWT_SECRET".to_owned(), secret.clone()));
        }
        env.extend(self.extra_env.iter().cloned());

        let mut child = relay_command(&args, &env)
            .spawn()
            .expect("relay binary can be started");
        let logs = LogBuffer::default();
        let readers = vec![
            spawn_line_reader(child.stdout.take().expect("piped stdout"), logs.clone()),
            spawn_line_reader(child.stderr.take().expect("piped stderr"), logs.clone()),
        ];

        let deadline = tokio::time::Instant::now() + STARTUP_DEADLINE;
        let addr = loop {
            let found = logs
                .lock()
                .expect("log buffer poisoned")
                .iter()
                .find_map(|line| parse_listening_addr(line));
            if let Some(addr) = found {
                break addr;
            }
            if let Ok(Some(status)) = child.try_wait() {
                // Let the readers drain what the process printed before dying.
                for reader in readers {
                    let _ = tokio::time::timeout(DEADLINE, reader).await;
                }
                panic!(
                    "relay exited with {status} before listening; args {args:?}; output:\n{}",
                    logs.lock().expect("log buffer poisoned").join("\n")
                );
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "relay printed no `listening .. addr=..` line within {STARTUP_DEADLINE:?}; \
                     args {args:?}; output so far:\n{}",
                    logs.lock().expect("log buffer poisoned").join("\n")
                );
            }
            tokio::time::sleep(crate::wait::POLL_INTERVAL).await;
        };

        TestRelay {
            child,
            addr,
            logs,
            readers,
            secret: self.secret,
            region: self.region,
            machine_id: self.machine_id,
            http: HttpClient::new(),
        }
    }
}

/// Removes ANSI escape sequences (`ESC [ .. letter`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The `addr=IP:PORT` of a line that mentions `listening`.
fn parse_listening_addr(line: &str) -> Option<SocketAddr> {
    let line = strip_ansi(line);
    if !line.contains("listening") {
        return None;
    }
    // Text logs say `addr=IP:PORT`; JSON logs (RELAY_LOG_FORMAT=json) say `"addr":"IP:PORT"`.
    let start = line
        .find("addr=")
        .map(|i| i + "addr=".len())
        .or_else(|| line.find("\"addr\":\"").map(|i| i + "\"addr\":\"".len()))?;
    let rest = &line[start..];
    rest.split(|c: char| c.is_whitespace() || c == ',')
        .next()?
        .trim_matches('"')
        .parse()
        .ok()
}

/// A running `relay serve` child process.
pub struct TestRelay {
    /// The process. `kill_on_drop` is set, and [`Drop`] also kills it
    /// explicitly so no relay outlives its test.
    child: Child,
    addr: SocketAddr,
    logs: LogBuffer,
    /// Reader tasks; they finish at EOF, i.e. when the child is gone.
    readers: Vec<JoinHandle<()>>,
    secret: Option<String>,
    region: String,
    machine_id: String,
    http: HttpClient,
}

// === impl TestRelay ===

impl TestRelay {
    /// Defaults: secret [`TEST_SECRET`], region `test-region`, machine
    /// `test-machine`, `RUST_LOG=info`.
    pub fn builder() -> RelayBuilder {
        RelayBuilder {
            secret: Some(TEST_SECRET.to_owned()),
            dev: false,
            region: "test-region".to_owned(),
            machine_id: "test-machine".to_owned(),
            rust_log: "info".to_owned(),
            extra_args: Vec::new(),
            extra_env: Vec::new(),
            port: 0,
        }
    }

    /// Spawns a relay with the defaults.
    pub async fn spawn() -> Self {
        Self::builder().spawn().await
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR{path}`.
    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `ws://ADDR{path}`.
    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// `ws://ADDR/tunnel?hostId={host_id}&token={token}`.
    pub fn tunnel_url(&self, host_id: &str, token: &str) -> String {
        self.ws_url(&format!("/tunnel?hostId={host_id}&token={token}"))
    }

    /// The region it was started with.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// The machine id it was started with.
    pub fn machine_id(&self) -> &str {
        &self.machine_id
    }

    /// `region:machineId`, how the directory names this relay (the value of
    /// its `relay:host:<hostId>` entries).
    pub fn owner(&self) -> String {
        format!("{}:{}", self.region, self.machine_id)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("relay is still running")
    }

    /// The JWT secret it verifies with.
    ///
    /// # Panics
    ///
    /// If it was started without one (dev mode).
    pub fn secret(&self) -> &str {
        self.secret
            .as_deref()
            .expect("this relay was started without RELAY_JWT_SECRET")
    }

    /// A valid host token for `host_id`.
    pub fn host_token(&self, host_id: &str) -> String {
        Claims::host(host_id).sign(self.secret())
    }

    /// A valid client token for `hosts`.
    pub fn client_token(&self, hosts: &[&str]) -> String {
        Claims::client(hosts).sign(self.secret())
    }

    /// A copy of every output line so far (stdout and stderr interleaved in
    /// arrival order).
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().expect("log buffer poisoned").clone()
    }

    /// Waits for an output line containing `needle` and returns it.
    ///
    /// # Panics
    ///
    /// If none appears within `timeout`.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        let mut found = None;
        wait_until(
            &format!("the relay logs a line containing {needle:?}"),
            timeout,
            || {
                found = self
                    .logs
                    .lock()
                    .expect("log buffer poisoned")
                    .iter()
                    .find(|line| line.contains(needle))
                    .cloned();
                found.is_some()
            },
        )
        .await;
        found.expect("set when the wait succeeded")
    }

    /// A shared HTTP client.
    pub fn http(&self) -> &HttpClient {
        &self.http
    }

    /// `GET /metrics` as text.
    ///
    /// # Panics
    ///
    /// Unless it answers 200.
    pub async fn metrics(&self) -> String {
        let resp = self.http.get(self.http_url("/metrics")).send().await;
        resp.assert_status(200);
        resp.text()
    }

    /// The current value of a counter (absent reads as 0).
    pub async fn counter(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        counter_value(&self.metrics().await, name, labels)
    }

    /// Waits until the counter reaches `expected`, then asserts it did not
    /// overshoot.
    ///
    /// # Panics
    ///
    /// On deadline, or if it ends up above `expected`.
    pub async fn wait_counter(&self, name: &str, labels: &[(&str, &str)], expected: f64) {
        let what = format!("{name}{labels:?} reaches {expected}");
        wait_until_async(&what, DEADLINE, || async {
            self.counter(name, labels).await >= expected
        })
        .await;
        let value = self.counter(name, labels).await;
        assert_eq!(value, expected, "{name}{labels:?} went past {expected}");
    }

    /// `GET /hosts/{host_id}/_whoowns` with a wildcard client token.
    pub async fn whoowns(&self, host_id: &str) -> HttpResponse {
        let token = self.client_token(&["*"]);
        self.whoowns_with(host_id, &token).await
    }

    /// `GET /hosts/{host_id}/_whoowns` with `token`.
    pub async fn whoowns_with(&self, host_id: &str, token: &str) -> HttpResponse {
        self.http
            .get(self.http_url(&format!("/hosts/{host_id}/_whoowns")))
            .bearer(token)
            .send()
            .await
    }

    /// Waits until a tunnel for `host_id` is registered here.
    pub async fn wait_host_connected(&self, host_id: &str) {
        let token = self.client_token(&["*"]);
        self.wait_host_connected_with(host_id, &token).await;
    }

    /// Like [`wait_host_connected`](Self::wait_host_connected), asking with
    /// `client_token` (for relays whose secret the harness does not know).
    pub async fn wait_host_connected_with(&self, host_id: &str, client_token: &str) {
        wait_until_async(
            &format!("host {host_id} is connected (_whoowns answers 200)"),
            DEADLINE,
            || async { self.whoowns_with(host_id, client_token).await.status == 200 },
        )
        .await;
    }

    /// Waits until no tunnel for `host_id` is registered here.
    pub async fn wait_host_disconnected(&self, host_id: &str) {
        wait_until_async(
            &format!("host {host_id} is disconnected (_whoowns answers 503)"),
            DEADLINE,
            || async { self.whoowns(host_id).await.status == 503 },
        )
        .await;
    }

    /// The exit status, if the process has exited.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait on relay child")
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = within("the killed relay to exit", DEADLINE, self.child.wait()).await;
        self.drain_readers().await;
    }

    /// Sends SIGTERM (graceful shutdown) without waiting.
    pub fn send_sigterm(&self) {
        self.send_signal("TERM");
    }

    /// Sends the signal named `signal` (as `kill -<signal>` spells it:
    /// `TERM`, `INT`, ..) without waiting.
    ///
    /// # Panics
    ///
    /// If `kill` fails (the process is gone, say).
    pub fn send_signal(&self, signal: &str) {
        let pid = self.pid();
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .unwrap_or_else(|err| panic!("run `kill -{signal}`: {err}"));
        assert!(status.success(), "`kill -{signal} {pid}` failed: {status}");
    }

    /// Waits for the process to exit and for its output to be fully captured.
    ///
    /// # Panics
    ///
    /// If it is still running after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let status = within("the relay process to exit", timeout, self.child.wait())
            .await
            .expect("wait on relay child");
        self.drain_readers().await;
        status
    }

    /// Asks the process to stop with SIGTERM, waits for it to exit (killing
    /// it if it takes longer than [`DEADLINE`]) and for its output to be fully
    /// captured. Returns the exit status.
    pub async fn terminate(&mut self) -> ExitStatus {
        self.send_sigterm();
        let status = match tokio::time::timeout(DEADLINE, self.child.wait()).await {
            Ok(status) => status.expect("wait on relay child"),
            Err(_) => {
                let _ = self.child.start_kill();
                self.child.wait().await.expect("wait on relay child")
            }
        };
        self.drain_readers().await;
        status
    }

    /// Waits for the output readers to reach EOF (the child is gone).
    async fn drain_readers(&mut self) {
        for reader in self.readers.drain(..) {
            let _ = within("relay output to reach EOF", DEADLINE, reader).await;
        }
    }
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if !std::thread::panicking() {
            // A panic in a relay task is caught by its runtime and the process
            // carries on; a test that passed anyway must not hide it.
            let panics: Vec<String> = self
                .logs()
                .into_iter()
                .filter(|line| line.contains("panicked at"))
                .collect();
            assert!(
                panics.is_empty(),
                "the relay process panicked during this test:\n{}",
                panics.join("\n")
            );
        } else {
            let logs = self.logs();
            let skip = logs.len().saturating_sub(LOG_TAIL_ON_PANIC);
            eprintln!(
                "---- relay {} output ({} lines, last {} shown) ----",
                self.addr,
                logs.len(),
                logs.len() - skip
            );
            for line in &logs[skip..] {
                eprintln!("{line}");
            }
            eprintln!("---- end of relay output ----");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::SystemTime;

    use super::*;

    fn mtime(path: &Path) -> SystemTime {
        std::fs::metadata(path)
            .and_then(|meta| meta.modified())
            .unwrap_or_else(|err| panic!("mtime of {}: {err}", path.display()))
    }

    /// The inputs listed in a Makefile-style dep-info file (`target: a b\ c`).
    fn dep_info_inputs(text: &str) -> Vec<PathBuf> {
        let (_, inputs) = text
            .split_once(": ")
            .expect("dep-info starts with `target: `");
        let mut paths = Vec::new();
        let mut current = String::new();
        for token in inputs.lines().next().unwrap_or("").split(' ') {
            // `\ ` escapes a space inside a path.
            if let Some(part) = token.strip_suffix('\\') {
                current.push_str(part);
                current.push(' ');
            } else {
                current.push_str(token);
                if !current.is_empty() {
                    paths.push(PathBuf::from(std::mem::take(&mut current)));
                }
            }
        }
        paths
    }

    /// The guarantee itself: the binary a test runs is at least as new as
    /// every source file it was compiled from (cargo's dep-info next to it
    /// lists them: the relay library's and the binary's). Before
    /// `relay_binary` built anything, editing a relay source and running
    /// `cargo test` alone made this fail.
    #[test]
    fn relay_binary_is_at_least_as_new_as_every_source_it_was_built_from() {
        let binary = relay_binary();
        let built = mtime(&binary);
        let dep_info = binary.with_extension("d");
        let text = std::fs::read_to_string(&dep_info)
            .unwrap_or_else(|err| panic!("read {}: {err}", dep_info.display()));
        let inputs = dep_info_inputs(&text);
        for expected in ["relay/src/lib.rs", "relay/src/bin/relay.rs"] {
            assert!(
                inputs.iter().any(|input| input.ends_with(expected)),
                "{} does not list {expected}: {inputs:?}",
                dep_info.display()
            );
        }
        for input in &inputs {
            let edited = mtime(input);
            assert!(
                built >= edited,
                "{} ({built:?}) is older than its source {} ({edited:?})",
                binary.display(),
                input.display()
            );
        }
        // Once per process: the second call neither builds nor asks cargo.
        let first = relay_build() as *const RelayBuild;
        assert!(std::ptr::eq(first, relay_build()));
        assert_eq!(relay_binary(), binary);
    }

    #[test]
    fn dep_info_paths_may_contain_escaped_spaces() {
        let inputs = dep_info_inputs("/t/relay: /w/a.rs /w/my\\ dir/b.rs /w/c.lua\n\n/w/a.rs:\n");
        assert_eq!(
            inputs,
            [
                PathBuf::from("/w/a.rs"),
                PathBuf::from("/w/my dir/b.rs"),
                PathBuf::from("/w/c.lua")
            ]
        );
    }

    #[test]
    fn relay_binary_is_the_relay_cli() {
        let output = std::process::Command::new(relay_binary())
            .arg("--help")
            .output()
            .expect("run relay --help");
        assert!(output.status.success(), "relay --help: {output:?}");
        let help = String::from_utf8_lossy(&output.stdout);
        for subcommand in ["serve", "agent", "token"] {
            assert!(help.contains(subcommand), "no `{subcommand}` in:\n{help}");
        }
    }
}
