//! The host agent (`relay agent ..`) as a child process.
//!
//! [`TestAgent`] runs the same `relay` binary as [`TestRelay`] with the
//! `agent` subcommand, in the same clean environment (no inherited `RELAY_*`
//! variables, `NO_COLOR=1`), and captures every stdout and stderr line. The
//! token goes through `RELAY_TOKEN` or a [`TokenFile`], never the command
//! line. The child is killed when the [`TestAgent`] is dropped; if the test
//! is panicking, the captured output is printed first. If the test passed but
//! the agent logged a panic, the drop fails the test.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;
use tokio::process::Child;
use tokio::task::JoinHandle;

use crate::DEADLINE;
use crate::client::HttpClient;
use crate::relay_process::{LogBuffer, TestRelay, relay_command, spawn_line_reader};
use crate::upstream::Upstream;
use crate::wait::{wait_until, wait_until_async, within};

/// How many trailing output lines to print when a test fails.
const LOG_TAIL_ON_PANIC: usize = 300;

/// What the agent logs each time a tunnel is up (the contract's log line).
pub const REGISTERED_LINE: &str = "tunnel registered";

/// What the agent logs on every scheduled retry.
pub const RECONNECTING_LINE: &str = "reconnecting in";

/// Where the agent reads its host token from.
#[derive(Debug, Clone)]
enum Credential {
    /// `RELAY_TOKEN` (a secret: never on the command line).
    Token(String),
    /// `--token-file`.
    File(PathBuf),
}

/// Configures and spawns a [`TestAgent`]; see [`TestAgent::builder`].
#[must_use = "call `spawn` to start the agent"]
pub struct AgentBuilder {
    host_id: String,
    relays: Vec<String>,
    credential: Option<Credential>,
    upstream: Option<String>,
    status_addr: Option<SocketAddr>,
    rust_log: String,
    extra_args: Vec<String>,
    extra_env: Vec<(String, String)>,
}

// === impl AgentBuilder ===

impl AgentBuilder {
    /// Adds a `--relay` base URL (several become the comma-separated list,
    /// in order).
    pub fn relay(mut self, url: &str) -> Self {
        self.relays.push(url.to_owned());
        self
    }

    /// The token itself, passed as `RELAY_TOKEN`.
    pub fn token(mut self, token: &str) -> Self {
        self.credential = Some(Credential::Token(token.to_owned()));
        self
    }

    /// `--token-file`.
    pub fn token_file(mut self, path: &Path) -> Self {
        self.credential = Some(Credential::File(path.to_owned()));
        self
    }

    /// `--to` (the upstream base URL, e.g. `http://127.0.0.1:3000`).
    pub fn to(mut self, url: &str) -> Self {
        self.upstream = Some(url.to_owned());
        self
    }

    /// `--to http://<upstream addr>`.
    pub fn upstream(self, upstream: &Upstream) -> Self {
        let url = format!("http://{}", upstream.addr());
        self.to(&url)
    }

    /// `--status-addr`.
    pub fn status_addr(mut self, addr: SocketAddr) -> Self {
        self.status_addr = Some(addr);
        self
    }

    /// `RUST_LOG` (default `info`).
    pub fn rust_log(mut self, filter: &str) -> Self {
        self.rust_log = filter.to_owned();
        self
    }

    /// Any extra `--flag value`.
    pub fn arg(mut self, flag: &str, value: &str) -> Self {
        self.extra_args.push(flag.to_owned());
        self.extra_args.push(value.to_owned());
        self
    }

    /// `--protocol v1`: for stub relays, which speak v1 only (with `auto`, the agent's
    /// first attempt on a v1-only relay asks for `h2` and is dropped).
    pub fn v1(self) -> Self {
        self.arg("--protocol", "v1")
    }

    /// `--protocol <protocol>` (`auto`, `h2` or `v1`).
    pub fn protocol(self, protocol: &str) -> Self {
        self.arg("--protocol", protocol)
    }

    /// An environment variable for the child.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.extra_env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// `--backoff-base` (humantime).
    pub fn backoff_base(self, delay: &str) -> Self {
        self.arg("--backoff-base", delay)
    }

    /// `--backoff-cap` (humantime).
    pub fn backoff_cap(self, delay: &str) -> Self {
        self.arg("--backoff-cap", delay)
    }

    /// `--auth-backoff-cap` (humantime).
    pub fn auth_backoff_cap(self, delay: &str) -> Self {
        self.arg("--auth-backoff-cap", delay)
    }

    /// `--drain-spread` (humantime).
    pub fn drain_spread(self, delay: &str) -> Self {
        self.arg("--drain-spread", delay)
    }

    /// `--silence-timeout` (humantime).
    pub fn silence_timeout(self, timeout: &str) -> Self {
        self.arg("--silence-timeout", timeout)
    }

    /// `--connect-timeout` (humantime).
    pub fn connect_timeout(self, timeout: &str) -> Self {
        self.arg("--connect-timeout", timeout)
    }

    /// `--stable-after` (humantime).
    pub fn stable_after(self, after: &str) -> Self {
        self.arg("--stable-after", after)
    }

    /// Spawns `relay agent ..`. Does not wait for anything: use
    /// [`TestAgent::wait_registered`] or the relay's
    /// [`wait_host_connected`](TestRelay::wait_host_connected).
    ///
    /// # Panics
    ///
    /// If no relay, credential or upstream was given, or the binary cannot
    /// be started.
    pub fn spawn(self) -> TestAgent {
        assert!(!self.relays.is_empty(), "TestAgent needs a relay URL");
        let upstream = self.upstream.expect("TestAgent needs an upstream (`to`)");
        let mut args: Vec<String> = vec![
            "agent".to_owned(),
            "--relay".to_owned(),
            self.relays.join(","),
            "--host-id".to_owned(),
            self.host_id.clone(),
            "--to".to_owned(),
            upstream,
        ];
        let mut env = vec![("RUST_LOG".to_owned(), self.rust_log.clone())];
        match self
            .credential
            .expect("TestAgent needs a token or token file")
        {
            Credential::Token(token) => env.push(("RELAY_TOKEN".to_owned(), token)),
            Credential::File(path) => {
                args.push("--token-file".to_owned());
                args.push(path.display().to_string());
            }
        }
        if let Some(addr) = self.status_addr {
            args.push("--status-addr".to_owned());
            args.push(addr.to_string());
        }
        args.extend(self.extra_args);
        env.extend(self.extra_env);

        let mut child = relay_command(&args, &env)
            .spawn()
            .expect("relay binary can be started");
        let logs = LogBuffer::default();
        let readers = vec![
            spawn_line_reader(child.stdout.take().expect("piped stdout"), logs.clone()),
            spawn_line_reader(child.stderr.take().expect("piped stderr"), logs.clone()),
        ];
        TestAgent {
            child,
            logs,
            readers,
            host_id: self.host_id,
            status_addr: self.status_addr,
            http: HttpClient::new(),
        }
    }
}

/// A running `relay agent` process.
pub struct TestAgent {
    /// `kill_on_drop` is set, and [`Drop`] kills it explicitly too.
    child: Child,
    logs: LogBuffer,
    readers: Vec<JoinHandle<()>>,
    host_id: String,
    status_addr: Option<SocketAddr>,
    http: HttpClient,
}

// === impl TestAgent ===

impl TestAgent {
    /// An agent for `host_id` with nothing else set; add at least a relay,
    /// a credential and an upstream. Default `RUST_LOG=info`.
    pub fn builder(host_id: &str) -> AgentBuilder {
        AgentBuilder {
            host_id: host_id.to_owned(),
            relays: Vec::new(),
            credential: None,
            upstream: None,
            status_addr: None,
            rust_log: "info".to_owned(),
            extra_args: Vec::new(),
            extra_env: Vec::new(),
        }
    }

    /// An agent for `host_id` connecting to `relay` (`ws://ADDR`) with a
    /// valid host token and forwarding to `upstream`.
    pub fn for_relay(relay: &TestRelay, host_id: &str, upstream: &Upstream) -> AgentBuilder {
        Self::builder(host_id)
            .relay(&relay.ws_url(""))
            .token(&relay.host_token(host_id))
            .upstream(upstream)
    }

    /// The host id it registers.
    pub fn host_id(&self) -> &str {
        &self.host_id
    }

    /// The process id.
    ///
    /// # Panics
    ///
    /// If it has exited and been waited for.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("agent is still running")
    }

    /// A copy of every output line so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().expect("log buffer poisoned").clone()
    }

    /// How many output lines contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.logs
            .lock()
            .expect("log buffer poisoned")
            .iter()
            .filter(|line| line.contains(needle))
            .count()
    }

    /// Waits until at least `n` output lines contain `needle`; returns the
    /// `n`th.
    ///
    /// # Panics
    ///
    /// If they do not appear within `timeout`.
    pub async fn wait_for_log_count(&self, needle: &str, n: usize, timeout: Duration) -> String {
        let mut found = None;
        wait_until(
            &format!("the agent logs {n} line(s) containing {needle:?}"),
            timeout,
            || {
                found = self
                    .logs
                    .lock()
                    .expect("log buffer poisoned")
                    .iter()
                    .filter(|line| line.contains(needle))
                    .nth(n - 1)
                    .cloned();
                found.is_some()
            },
        )
        .await;
        found.expect("set when the wait succeeded")
    }

    /// Waits for an output line containing `needle` and returns it.
    ///
    /// # Panics
    ///
    /// If none appears within `timeout`.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        self.wait_for_log_count(needle, 1, timeout).await
    }

    /// How many times it logged [`REGISTERED_LINE`].
    pub fn registered_count(&self) -> usize {
        self.log_count(REGISTERED_LINE)
    }

    /// Waits until it logged [`REGISTERED_LINE`] `n` times in all.
    ///
    /// # Panics
    ///
    /// If that does not happen within [`DEADLINE`].
    pub async fn wait_registered(&self, n: usize) -> String {
        self.wait_for_log_count(REGISTERED_LINE, n, DEADLINE).await
    }

    /// `GET http://<status addr>/status` as JSON, or the error text (not up
    /// yet, not JSON).
    ///
    /// # Errors
    ///
    /// Connection failure, non-200 status or a body that is not JSON.
    ///
    /// # Panics
    ///
    /// If it was started without `--status-addr`.
    pub async fn try_status(&self) -> Result<Value, String> {
        let addr = self
            .status_addr
            .expect("this agent was started without --status-addr");
        let resp = self
            .http
            .get(format!("http://{addr}/status"))
            .timeout(Duration::from_secs(2))
            .try_send()
            .await?;
        if resp.status != 200 {
            return Err(format!("status {}: {}", resp.status, resp.text()));
        }
        serde_json::from_slice(&resp.body).map_err(|err| format!("{err}: {:?}", resp.text()))
    }

    /// Polls the status endpoint until `cond` holds for its JSON; returns
    /// that JSON.
    ///
    /// # Panics
    ///
    /// If it does not within [`DEADLINE`]; the message shows the last answer.
    pub async fn wait_status(&self, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let status = self.try_status().await;
            if let Ok(json) = &status
                && cond(json)
            {
                return json.clone();
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "timed out after {DEADLINE:?} waiting until the agent status shows {what}; \
                     last answer: {status:?}"
                );
            }
            tokio::time::sleep(crate::wait::POLL_INTERVAL).await;
        }
    }

    /// The exit status, if the process has exited.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait on agent child")
    }

    /// Sends SIGTERM without waiting.
    ///
    /// # Panics
    ///
    /// If `kill -TERM` fails.
    pub fn send_sigterm(&self) {
        let pid = self.pid();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run `kill -TERM`");
        assert!(status.success(), "`kill -TERM {pid}` failed: {status}");
    }

    /// Waits for the process to exit and for its output to be fully
    /// captured.
    ///
    /// # Panics
    ///
    /// If it is still running after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let status = within("the agent process to exit", timeout, self.child.wait())
            .await
            .expect("wait on agent child");
        self.drain_readers().await;
        status
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = within("the killed agent to exit", DEADLINE, self.child.wait()).await;
        self.drain_readers().await;
    }

    /// Waits for the output readers to reach EOF (the child is gone).
    async fn drain_readers(&mut self) {
        for reader in self.readers.drain(..) {
            let _ = within("agent output to reach EOF", DEADLINE, reader).await;
        }
    }

    /// Waits until the relay answers `_whoowns` for this agent's host.
    pub async fn wait_connected_to(&self, relay: &TestRelay) {
        let host_id = self.host_id.clone();
        wait_until_async(
            &format!("host {host_id} is connected to {}", relay.addr()),
            DEADLINE,
            || async { relay.whoowns(&host_id).await.status == 200 },
        )
        .await;
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let logs = self.logs();
        if !std::thread::panicking() {
            let panics: Vec<&String> = logs
                .iter()
                .filter(|line| line.contains("panicked at"))
                .collect();
            assert!(
                panics.is_empty(),
                "the agent process panicked during this test:\n{}",
                panics
                    .iter()
                    .map(|line| line.as_str())
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        } else {
            let skip = logs.len().saturating_sub(LOG_TAIL_ON_PANIC);
            eprintln!(
                "---- agent {} output ({} lines, last {} shown) ----",
                self.host_id,
                logs.len(),
                logs.len() - skip
            );
            for line in &logs[skip..] {
                eprintln!("{line}");
            }
            eprintln!("---- end of agent output ----");
        }
    }
}

/// A token file in the system temp directory, removed on drop. Writes are
/// atomic (write a sibling, then rename), so an agent re-reading it never sees
/// a half-written token.
pub struct TokenFile {
    path: PathBuf,
}

// === impl TokenFile ===

impl TokenFile {
    /// Creates the file holding `contents`.
    pub fn new(contents: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!(
            "relay-agent-test-{}-{n}-{}.token",
            std::process::id(),
            crate::tokens::unix_now()
        ));
        let file = Self { path };
        file.write(contents);
        file
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces the contents atomically.
    ///
    /// # Panics
    ///
    /// On I/O errors.
    pub fn write(&self, contents: &str) {
        let tmp = self.path.with_extension("token.tmp");
        std::fs::write(&tmp, contents)
            .unwrap_or_else(|err| panic!("write {}: {err}", tmp.display()));
        std::fs::rename(&tmp, &self.path)
            .unwrap_or_else(|err| panic!("rename to {}: {err}", self.path.display()));
    }
}

impl Drop for TokenFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
