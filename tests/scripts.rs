//! The deploy side: `scripts/smoke-test.sh`, `scripts/deploy.sh` /
//! `scripts/deploy-staging.sh`, the Fly configs, the Dockerfile and the
//! training run of `scripts/pgo-build.sh`.
//!
//! The smoke test runs for real, with curl, against real relay processes.
//! Each local relay has its own port, so a small HTTP front ([`FlyFront`])
//! stands in for Fly's proxy: it routes every request to the relay of the
//! region named by its `fly-prefer-region` header, and can be told to
//! misroute, to answer with another status, or to stand in for a region that
//! has no machine, which is how each failure the smoke test must catch is
//! produced.
//!
//! The deploy scripts run with a fake `fly` first on `PATH`: one that fails
//! loudly (the dry run must not call it), or one that records its arguments
//! (a real run calls exactly what the dry run prints, in order, and stops at
//! the first failure).
//!
//! The Fly configs are parsed as TOML and held to the rules a deploy depends
//! on; their `[env]` is fed to the real binary. The Dockerfile is checked for
//! its structure and its dependency-caching stage is replayed in a scratch
//! directory and loaded with `cargo metadata`. No image is built here: these
//! machines have no Docker engine. The replay of the whole builder stage (a
//! release build, minutes) is `#[ignore]`d; run it with
//! `cargo test -p relay-tests --test scripts -- --ignored`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use relay_tests::{
    DEADLINE, HttpClient, TEST_SECRET, TestHost, TestRedis, TestRelay, Upstream, relay_binary,
    run_relay_cli, within,
};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::Command;
use tokio::task::JoinHandle;

/// Bound on one script run. The smoke test makes a handful of loopback
/// requests; the deploy dry run runs nothing.
const SCRIPT_DEADLINE: Duration = Duration::from_secs(60);

/// The relay's default drain deadline, which fly.toml's `kill_timeout` must
/// exceed.
const DRAIN_DEADLINE: Duration = relay::limits::DRAIN_DEADLINE;

// === the repository and its scripts ===

/// The repository root (the workspace).
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the repository")
        .to_path_buf()
}

fn script(name: &str) -> PathBuf {
    repo().join("scripts").join(name)
}

fn read_repo_file(name: &str) -> String {
    let path = repo().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("read {}: {err}", path.display()))
}

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(what: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "relay-scripts-{what}-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).expect("create a scratch directory");
        Self(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes an executable shell script.
fn write_executable(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, text).unwrap_or_else(|err| panic!("write {}: {err}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .expect("make the script executable");
}

/// The outcome of one script run.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Both streams, for assertion messages.
    fn both(&self) -> String {
        format!(
            "exit {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }

    /// The `ok   <region>: ...` or `FAIL <region>: ...` lines of `region`.
    fn region_lines(&self, region: &str) -> Vec<&str> {
        let ok = format!("ok   {region}: ");
        let fail = format!("FAIL {region}: ");
        self.stdout
            .lines()
            .filter(|l| l.starts_with(&ok) || l.starts_with(&fail))
            .collect()
    }

    /// The one health line of `region`.
    #[track_caller]
    fn health_line(&self, region: &str) -> &str {
        let lines: Vec<&str> = self
            .region_lines(region)
            .into_iter()
            .filter(|l| l.contains(": health "))
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "one health line for {region}:\n{}",
            self.both()
        );
        lines[0]
    }

    /// The `+ ` command lines, without the prefix.
    fn commands(&self) -> Vec<&str> {
        self.stdout
            .lines()
            .filter_map(|l| l.strip_prefix("+ "))
            .collect()
    }
}

/// Runs `program args` from `cwd` with the developer's smoke-test and fly
/// settings removed from the environment and `env` added.
async fn run(program: &Path, args: &[&str], env: &[(&str, &str)], cwd: &Path) -> Run {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .current_dir(cwd)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    for name in [
        "SMOKE_PROBE_TOKEN",
        "SMOKE_PROBE_HOST",
        "SMOKE_PROBE_PATH",
        "FLYCTL",
        "FLY_API_TOKEN",
        "FLY_ACCESS_TOKEN",
    ] {
        cmd.env_remove(name);
    }
    for (key, value) in env {
        cmd.env(key, value);
    }
    let output = within(
        &format!("{} {args:?} to exit", program.display()),
        SCRIPT_DEADLINE,
        cmd.output(),
    )
    .await
    .unwrap_or_else(|err| panic!("start {}: {err}", program.display()));
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// `scripts/smoke-test.sh --scheme http --port <front> [extra..] 127.0.0.1 <regions..>`.
async fn smoke(port: u16, extra: &[&str], regions: &[&str], env: &[(&str, &str)]) -> Run {
    let port = port.to_string();
    let mut args = vec!["--scheme", "http", "--port", &port];
    args.extend_from_slice(extra);
    args.push("127.0.0.1");
    args.extend_from_slice(regions);
    run(&script("smoke-test.sh"), &args, env, &repo()).await
}

// === a stand-in for Fly's proxy ===

/// What [`FlyFront`] does with a request that prefers one region.
#[derive(Clone)]
enum Route {
    /// Forward it to this relay.
    To(SocketAddr),
    /// Forward it to this relay, then answer with this status and the
    /// relay's body: a machine whose health check fails but whose body still
    /// names its region.
    ToWithStatus(SocketAddr, u16),
    /// Answer 503 to the first `failures` requests, then forward: a machine
    /// still starting.
    Flaky {
        relay: SocketAddr,
        failures: usize,
        seen: Arc<AtomicUsize>,
    },
    /// Answer this status and body without any relay.
    Fixed(u16, &'static str),
}

impl Route {
    fn flaky(relay: SocketAddr, failures: usize) -> Self {
        Route::Flaky {
            relay,
            failures,
            seen: Arc::default(),
        }
    }
}

/// One request the front received.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    region: Option<String>,
    authorization: Option<String>,
}

struct FrontState {
    routes: HashMap<String, Route>,
    /// Where a request goes when its region has no route (or it names
    /// none): like Fly's proxy, the nearest machine of another region.
    fallback: SocketAddr,
    http: HttpClient,
    /// A std mutex: held for one push or copy, never across an await.
    seen: Mutex<Vec<Seen>>,
}

/// A local HTTP server in front of several relays, routing by the
/// `fly-prefer-region` header as Fly's proxy does; stops on drop.
struct FlyFront {
    addr: SocketAddr,
    state: Arc<FrontState>,
    task: JoinHandle<()>,
}

impl FlyFront {
    async fn spawn(routes: Vec<(&str, Route)>, fallback: SocketAddr) -> Self {
        let state = Arc::new(FrontState {
            routes: routes
                .into_iter()
                .map(|(region, route)| (region.to_owned(), route))
                .collect(),
            fallback,
            http: HttpClient::new(),
            seen: Mutex::default(),
        });
        let app = Router::new()
            .fallback(front_request)
            .with_state(state.clone());
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the front on 127.0.0.1:0");
        let addr = listener.local_addr().expect("front local addr");
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("front serve");
        });
        Self { addr, state, task }
    }

    /// A front where each relay serves its own region, and regions without a
    /// relay fall back to the first one.
    async fn over(relays: &[&TestRelay]) -> Self {
        let routes = relays
            .iter()
            .map(|r| (r.region(), Route::To(r.addr())))
            .collect();
        Self::spawn(routes, relays[0].addr()).await
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().expect("front log poisoned").clone()
    }
}

impl Drop for FlyFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn front_request(
    State(front): State<Arc<FrontState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let text = |name| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let region = text("fly-prefer-region");
    front.seen.lock().expect("front log poisoned").push(Seen {
        path: uri.path().to_owned(),
        region: region.clone(),
        authorization: text("authorization"),
    });
    let route = region
        .as_deref()
        .and_then(|r| front.routes.get(r))
        .cloned()
        .unwrap_or(Route::To(front.fallback));
    let (relay, status) = match route {
        Route::To(relay) => (relay, None),
        Route::ToWithStatus(relay, status) => (relay, Some(status)),
        Route::Flaky {
            relay,
            failures,
            seen,
        } => {
            if seen.fetch_add(1, Ordering::SeqCst) < failures {
                return (StatusCode::SERVICE_UNAVAILABLE, "machine starting").into_response();
            }
            (relay, None)
        }
        Route::Fixed(status, body) => {
            return (StatusCode::from_u16(status).expect("a valid status"), body).into_response();
        }
    };

    let target = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let mut request = front
        .http
        .request(method, format!("http://{relay}{target}"))
        .body(body);
    for (name, value) in &headers {
        if name == header::HOST || name == header::CONTENT_LENGTH || name == header::CONNECTION {
            continue;
        }
        if let Ok(value) = value.to_str() {
            request = request.header(name.as_str(), value);
        }
    }
    match request.try_send().await {
        Ok(resp) => {
            let status = status.map_or(resp.status, |s| {
                StatusCode::from_u16(s).expect("a valid status")
            });
            let mut out = (status, resp.body).into_response();
            if let Some(ct) = resp.headers.get(header::CONTENT_TYPE) {
                out.headers_mut().insert(header::CONTENT_TYPE, ct.clone());
            }
            out
        }
        Err(err) => (StatusCode::BAD_GATEWAY, err).into_response(),
    }
}

async fn relay_in(region: &str) -> TestRelay {
    TestRelay::builder()
        .region(region)
        .machine_id(&format!("m-{region}"))
        .spawn()
        .await
}

// === smoke test: health ===

#[tokio::test]
async fn smoke_test_passes_when_every_region_answers_for_itself() {
    let ams = relay_in("ams").await;
    let fra = relay_in("fra").await;
    let iad = relay_in("iad").await;
    let front = FlyFront::over(&[&ams, &fra, &iad]).await;

    let out = smoke(front.port(), &[], &["ams", "fra", "iad"], &[]).await;

    assert_eq!(out.code, Some(0), "{}", out.both());
    for region in ["ams", "fra", "iad"] {
        assert_eq!(
            out.health_line(region),
            format!("ok   {region}: health 200, region {region}, machine m-{region}"),
            "{}",
            out.both()
        );
    }
    assert!(
        out.stdout.contains("PASS: 3 of 3 regions ok (ams fra iad)"),
        "{}",
        out.both()
    );
    assert!(!out.stdout.contains("FAIL"), "{}", out.both());
    let asked: Vec<(String, Option<String>)> = front
        .seen()
        .into_iter()
        .map(|s| (s.path, s.region))
        .collect();
    assert_eq!(
        asked,
        ["ams", "fra", "iad"].map(|r| ("/health".to_owned(), Some(r.to_owned()))),
        "one GET /health per region, each with fly-prefer-region"
    );
}

#[tokio::test]
async fn smoke_test_fails_a_region_that_has_no_machine() {
    // No relay in iad: the front answers from ams, as Fly's proxy answers
    // from the nearest other region.
    let ams = relay_in("ams").await;
    let fra = relay_in("fra").await;
    let front = FlyFront::over(&[&ams, &fra]).await;

    let out = smoke(front.port(), &[], &["ams", "fra", "iad"], &[]).await;

    assert_eq!(out.code, Some(1), "{}", out.both());
    assert!(
        out.health_line("ams")
            .starts_with("ok   ams: health 200, region ams")
    );
    assert!(
        out.health_line("fra")
            .starts_with("ok   fra: health 200, region fra")
    );
    let iad = out.health_line("iad");
    assert!(
        iad.starts_with("FAIL iad: health 200, region ams (want iad"),
        "{}",
        out.both()
    );
    assert!(
        out.stdout.contains("FAIL: 1 of 3 regions failed (iad)"),
        "{}",
        out.both()
    );
}

#[tokio::test]
async fn smoke_test_fails_a_region_answered_by_a_machine_of_another_region() {
    // The machine behind "fra" says it is in iad (a misconfigured region, or
    // a machine placed in the wrong one).
    let ams = relay_in("ams").await;
    let misplaced = relay_in("iad").await;
    let front = FlyFront::spawn(
        vec![
            ("ams", Route::To(ams.addr())),
            ("fra", Route::To(misplaced.addr())),
        ],
        ams.addr(),
    )
    .await;

    let out = smoke(front.port(), &[], &["ams", "fra"], &[]).await;

    assert_eq!(out.code, Some(1), "{}", out.both());
    assert!(
        out.health_line("fra")
            .starts_with("FAIL fra: health 200, region iad (want fra"),
        "{}",
        out.both()
    );
    assert!(
        out.stdout.contains("FAIL: 1 of 2 regions failed (fra)"),
        "{}",
        out.both()
    );
}

#[tokio::test]
async fn smoke_test_fails_a_non_200_even_when_its_body_names_the_region() {
    // The regression this script exists for: the one it replaces passed a
    // region whose body matched whatever the status was. The body here is
    // fra's own /health body; only the status is 503.
    let ams = relay_in("ams").await;
    let fra = relay_in("fra").await;
    let front = FlyFront::spawn(
        vec![
            ("ams", Route::To(ams.addr())),
            ("fra", Route::ToWithStatus(fra.addr(), 503)),
        ],
        ams.addr(),
    )
    .await;

    // Retrying does not turn a persistent failure into a pass.
    let out = smoke(
        front.port(),
        &["--attempts", "2", "--retry-delay", "0"],
        &["ams", "fra"],
        &[],
    )
    .await;

    assert_eq!(out.code, Some(1), "{}", out.both());
    assert_eq!(
        out.health_line("fra"),
        "FAIL fra: health 503 (want 200), region fra (all 2 tries)",
        "{}",
        out.both()
    );
    assert!(out.health_line("ams").starts_with("ok   ams:"));
    assert!(
        out.stdout.contains("FAIL: 1 of 2 regions failed (fra)"),
        "{}",
        out.both()
    );
}

#[tokio::test]
async fn smoke_test_fails_a_body_that_is_not_the_relays_json() {
    let ams = relay_in("ams").await;
    let front = FlyFront::spawn(
        vec![
            ("fra", Route::Fixed(200, "<html>maintenance</html>")),
            ("iad", Route::Fixed(200, r#"{"ok":true}"#)),
        ],
        ams.addr(),
    )
    .await;

    let out = smoke(front.port(), &[], &["fra", "iad"], &[]).await;

    assert_eq!(out.code, Some(1), "{}", out.both());
    assert_eq!(
        out.health_line("fra"),
        "FAIL fra: health 200, body is not JSON: <html>maintenance</html>"
    );
    assert_eq!(
        out.health_line("iad"),
        r#"FAIL iad: health 200, no region in the body: {"ok":true}"#
    );
    assert!(out.stdout.contains("FAIL: 2 of 2 regions failed (fra iad)"));
}

#[tokio::test]
async fn smoke_test_retries_a_region_that_is_still_starting() {
    let ams = relay_in("ams").await;
    let front = FlyFront::spawn(vec![("ams", Route::flaky(ams.addr(), 1))], ams.addr()).await;

    let once = smoke(front.port(), &[], &["ams"], &[]).await;
    assert_eq!(once.code, Some(1), "one try sees the 503: {}", once.both());
    assert_eq!(
        once.health_line("ams"),
        "FAIL ams: health 503 (want 200), body is not JSON: machine starting"
    );

    let front = FlyFront::spawn(vec![("ams", Route::flaky(ams.addr(), 1))], ams.addr()).await;
    let twice = smoke(
        front.port(),
        &["--attempts", "2", "--retry-delay", "0"],
        &["ams"],
        &[],
    )
    .await;
    assert_eq!(twice.code, Some(0), "{}", twice.both());
    assert_eq!(
        twice.health_line("ams"),
        "ok   ams: health 200, region ams, machine m-ams (try 2 of 2)"
    );
}

#[tokio::test]
async fn smoke_test_fails_clearly_when_nothing_answers() {
    // A port nothing listens on: bind one, then free it.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let out = smoke(port, &[], &["ams"], &[]).await;
    assert_eq!(out.code, Some(1), "{}", out.both());
    let line = out.health_line("ams");
    assert!(
        line.starts_with("FAIL ams: health request failed: curl: (7)"),
        "{}",
        out.both()
    );
}

#[tokio::test]
async fn smoke_test_works_against_one_local_relay_directly() {
    // Without a front, the relay ignores fly-prefer-region and answers its
    // own region: usable against `relay serve` on a laptop.
    let relay = relay_in("local").await;

    let out = smoke(relay.addr().port(), &[], &["local"], &[]).await;
    assert_eq!(out.code, Some(0), "{}", out.both());
    assert!(
        out.health_line("local")
            .starts_with("ok   local: health 200, region local")
    );

    let out = smoke(relay.addr().port(), &[], &["ams"], &[]).await;
    assert_eq!(out.code, Some(1), "{}", out.both());
    assert!(
        out.health_line("ams")
            .starts_with("FAIL ams: health 200, region local (want ams")
    );
}

// === smoke test: the tunnel probe ===

#[tokio::test]
async fn smoke_test_probe_reaches_the_host_through_every_region() {
    // Two relays sharing a Redis directory; the probe host's tunnel is held in
    // ams, so the request that lands in fra is routed across to ams.
    let redis = TestRedis::spawn().await;
    let spawn = |region: &'static str| {
        TestRelay::builder()
            .region(region)
            .machine_id(&format!("m-{region}"))
            .redis(&redis.url())
            .routing("proxy")
            .spawn()
    };
    let ams = spawn("ams").await;
    let fra = spawn("fra").await;
    let upstream = Upstream::spawn().await;
    let _host = TestHost::connect(&ams, "probe-host", &upstream).await;
    redis.wait_host_owner("probe-host", &ams).await;
    redis.wait_advertised(&ams).await;
    let front = FlyFront::over(&[&ams, &fra]).await;
    let token = ams.client_token(&["probe-host"]);

    let out = smoke(
        front.port(),
        &[],
        &["ams", "fra"],
        &[
            ("SMOKE_PROBE_TOKEN", &token),
            ("SMOKE_PROBE_HOST", "probe-host"),
            ("SMOKE_PROBE_PATH", "/echo"),
        ],
    )
    .await;

    assert_eq!(out.code, Some(0), "{}", out.both());
    for region in ["ams", "fra"] {
        assert_eq!(
            out.region_lines(region),
            [
                format!("ok   {region}: health 200, region {region}, machine m-{region}"),
                format!("ok   {region}: probe GET /hosts/probe-host/echo 200"),
            ],
            "{}",
            out.both()
        );
    }
    assert_eq!(
        upstream.requests(),
        2,
        "one probe per region reached the host"
    );
    let probes: Vec<Seen> = front
        .seen()
        .into_iter()
        .filter(|s| s.path.starts_with("/hosts/"))
        .collect();
    assert_eq!(probes.len(), 2, "{probes:?}");
    for (probe, region) in probes.iter().zip(["ams", "fra"]) {
        assert_eq!(probe.path, "/hosts/probe-host/echo");
        assert_eq!(probe.region.as_deref(), Some(region));
        assert_eq!(
            probe.authorization.as_deref(),
            Some(format!("Bearer {token}").as_str())
        );
    }
    assert!(
        !out.stdout.contains(&token) && !out.stderr.contains(&token),
        "the token is never printed"
    );
}

#[tokio::test]
async fn smoke_test_probe_fails_a_region_that_cannot_reach_the_host() {
    // No shared directory: fra does not know the host held in ams.
    let ams = relay_in("ams").await;
    let fra = relay_in("fra").await;
    let upstream = Upstream::spawn().await;
    let _host = TestHost::connect(&ams, "probe-host", &upstream).await;
    let front = FlyFront::over(&[&ams, &fra]).await;
    let token = ams.client_token(&["probe-host"]);

    let out = smoke(
        front.port(),
        &[],
        &["ams", "fra"],
        &[
            ("SMOKE_PROBE_TOKEN", &token),
            ("SMOKE_PROBE_HOST", "probe-host"),
            ("SMOKE_PROBE_PATH", "/echo"),
        ],
    )
    .await;

    assert_eq!(out.code, Some(1), "{}", out.both());
    assert!(
        out.region_lines("ams")
            .iter()
            .all(|l| l.starts_with("ok   ams:"))
    );
    assert_eq!(
        out.region_lines("fra"),
        [
            "ok   fra: health 200, region fra, machine m-fra",
            r#"FAIL fra: probe GET /hosts/probe-host/echo 503 (want 2xx): {"error":"host not connected"}"#,
        ],
        "{}",
        out.both()
    );
    assert!(out.stdout.contains("FAIL: 1 of 2 regions failed (fra)"));
}

/// Arguments, environment, and what the refusal must say.
type UsageCase<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);

#[tokio::test]
async fn smoke_test_refuses_a_half_configured_probe_and_bad_arguments() {
    let cases: &[UsageCase] = &[
        (
            &["127.0.0.1", "ams"],
            &[("SMOKE_PROBE_TOKEN", "t")],
            "needs both SMOKE_PROBE_TOKEN and SMOKE_PROBE_HOST",
        ),
        (&["127.0.0.1"], &[], "at least one region"),
        (&["--scheme", "ftp", "127.0.0.1", "ams"], &[], "--scheme"),
        (&["--port", "99999", "127.0.0.1", "ams"], &[], "--port"),
        (&["127.0.0.1", "a:b"], &[], "not a region name"),
        (&["--bogus", "127.0.0.1", "ams"], &[], "unknown option"),
    ];
    for (args, env, message) in cases {
        let out = run(&script("smoke-test.sh"), args, env, &repo()).await;
        assert_eq!(out.code, Some(2), "{args:?}: {}", out.both());
        assert!(out.stderr.contains(message), "{args:?}: {}", out.both());
        assert!(
            out.stdout.is_empty(),
            "{args:?} sends nothing: {}",
            out.both()
        );
    }
}

// === smoke test: the JSON tool ===

/// A directory of symlinks to the given commands (as found on this
/// machine's `PATH`), to run a script with nothing else available.
fn bin_dir_with(scratch: &Scratch, commands: &[&str]) -> PathBuf {
    let dir = scratch.path().join("bin");
    std::fs::create_dir_all(&dir).expect("create bin dir");
    for command in commands {
        let found = which(command).unwrap_or_else(|| panic!("{command} is not on PATH"));
        std::os::unix::fs::symlink(&found, dir.join(command)).expect("symlink a command");
    }
    dir
}

fn which(command: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(command))
        .find(|candidate| candidate.is_file())
}

/// The real python3 interpreter (not a version manager's shim, which needs
/// more of `PATH` than the restricted one has).
fn real_python3() -> PathBuf {
    let out = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3 runs");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

#[tokio::test]
async fn smoke_test_reads_json_with_python3_when_jq_is_missing() {
    let ams = relay_in("ams").await;
    let fra = relay_in("fra").await;
    let front = FlyFront::spawn(
        vec![
            ("ams", Route::To(ams.addr())),
            ("fra", Route::ToWithStatus(fra.addr(), 503)),
            ("iad", Route::Fixed(200, "not json")),
        ],
        ams.addr(),
    )
    .await;
    let scratch = Scratch::new("python3");
    let bin = bin_dir_with(&scratch, &["bash", "curl", "mktemp", "rm", "sleep", "tr"]);
    std::os::unix::fs::symlink(real_python3(), bin.join("python3")).expect("symlink python3");
    let path = bin.to_string_lossy().into_owned();

    let port = front.port().to_string();
    let out = run(
        &script("smoke-test.sh"),
        &[
            "--scheme",
            "http",
            "--port",
            &port,
            "127.0.0.1",
            "ams",
            "fra",
            "iad",
        ],
        &[("PATH", &path)],
        &repo(),
    )
    .await;

    assert_eq!(out.code, Some(1), "{}", out.both());
    assert_eq!(
        out.health_line("ams"),
        "ok   ams: health 200, region ams, machine m-ams"
    );
    assert_eq!(
        out.health_line("fra"),
        "FAIL fra: health 503 (want 200), region fra"
    );
    assert_eq!(
        out.health_line("iad"),
        "FAIL iad: health 200, body is not JSON: not json"
    );
    assert!(out.stderr.is_empty(), "{}", out.both());
}

#[tokio::test]
async fn smoke_test_says_so_when_neither_jq_nor_python3_is_installed() {
    let scratch = Scratch::new("nojson");
    let bin = bin_dir_with(&scratch, &["bash", "curl", "mktemp", "rm", "sleep", "tr"]);
    let path = bin.to_string_lossy().into_owned();

    let out = run(
        &script("smoke-test.sh"),
        &["127.0.0.1", "ams"],
        &[("PATH", &path)],
        &repo(),
    )
    .await;

    assert_eq!(out.code, Some(2), "{}", out.both());
    assert!(
        out.stderr.contains("neither jq nor python3 is installed"),
        "{}",
        out.both()
    );
    assert!(
        out.stdout.is_empty(),
        "nothing was requested: {}",
        out.both()
    );
}

// === deploy scripts ===

/// A fake `fly` (also installed as `flyctl`, `curl` and `docker`) that logs
/// each call to `$FAKE_FLY_LOG`. With `FAKE_FLY=refuse` it fails loudly;
/// otherwise it succeeds, except for the subcommand named by
/// `FAKE_FLY_FAIL_ON`.
const FAKE_FLY: &str = r#"#!/bin/sh
echo "$(basename "$0") $*" >> "$FAKE_FLY_LOG"
if [ "${FAKE_FLY:-}" = refuse ]; then
  echo "FAKE $(basename "$0") CALLED: $* (nothing may run in a dry run)" >&2
  exit 97
fi
if [ -n "${FAKE_FLY_FAIL_ON:-}" ] && [ "$1" = "$FAKE_FLY_FAIL_ON" ]; then
  echo "fake fly: $1 failed" >&2
  exit 1
fi
exit 0
"#;

/// A scratch directory with the fake commands, and the `PATH` that puts
/// them first. With `everything`, curl and docker are fakes too (a dry run
/// must not reach the network either); otherwise only fly and flyctl.
fn fake_fly(scratch: &Scratch, everything: bool) -> (String, PathBuf) {
    let bin = scratch.path().join("fakebin");
    std::fs::create_dir_all(&bin).expect("create fakebin");
    let names: &[&str] = if everything {
        &["fly", "flyctl", "curl", "docker"]
    } else {
        &["fly", "flyctl"]
    };
    for name in names {
        write_executable(&bin.join(name), FAKE_FLY);
    }
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    (path, scratch.path().join("fly.log"))
}

/// The argument after `flag` in a command line.
fn flag_value<'a>(command: &'a str, flag: &str) -> &'a str {
    let words: Vec<&str> = command.split(' ').collect();
    let at = words
        .iter()
        .position(|w| *w == flag)
        .unwrap_or_else(|| panic!("{flag} in {command:?}"));
    words[at + 1]
}

/// A dry run of `script`: checks that nothing ran and returns the printed
/// commands.
async fn dry_run(script_name: &str, extra: &[&str]) -> Vec<String> {
    let scratch = Scratch::new("dry-run");
    let (path, log) = fake_fly(&scratch, true);
    let log_str = log.to_string_lossy().into_owned();
    let mut args = vec!["--dry-run"];
    args.extend_from_slice(extra);
    // From a directory other than the repository: the script finds its way.
    let out = run(
        &script(script_name),
        &args,
        &[
            ("PATH", &path),
            ("FAKE_FLY", "refuse"),
            ("FAKE_FLY_LOG", &log_str),
        ],
        scratch.path(),
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.both());
    assert!(
        !log.exists(),
        "the dry run called {:?}",
        std::fs::read_to_string(&log)
    );
    assert!(!out.stderr.contains("FAKE"), "{}", out.both());
    let commands: Vec<String> = out.commands().into_iter().map(str::to_owned).collect();
    assert_eq!(
        commands.len(),
        out.stdout.lines().count(),
        "stdout is the commands, one per line: {}",
        out.both()
    );
    commands
}

/// The regions a dry run deploys to, from its scale command.
fn regions_of(commands: &[String]) -> Vec<String> {
    flag_value(&commands[0], "--region")
        .split(',')
        .map(str::to_owned)
        .collect()
}

/// Checks the four commands of a deploy of `app` with `config`, and returns
/// its regions.
#[track_caller]
fn assert_deploy_commands(commands: &[String], app: &str, config: &str) -> Vec<String> {
    assert_eq!(commands.len(), 4, "{commands:#?}");
    let regions = regions_of(commands);
    assert!(!regions.is_empty() && regions.iter().all(|r| !r.is_empty()));
    let mut unique = regions.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), regions.len(), "no region twice: {regions:?}");
    assert_eq!(
        commands,
        [
            format!(
                "fly scale count {} --max-per-region 1 --region {} --app {app} --yes",
                regions.len(),
                regions.join(",")
            ),
            format!("fly deploy --strategy rolling --config {config} --app {app}"),
            format!("fly status --app {app}"),
            format!(
                "scripts/smoke-test.sh --attempts 3 {app}.fly.dev {}",
                regions.join(" ")
            ),
        ]
    );
    regions
}

#[tokio::test]
async fn deploy_dry_run_prints_the_fly_commands_in_order_and_runs_nothing() {
    let commands = dry_run("deploy.sh", &[]).await;
    let regions = assert_deploy_commands(&commands, "relay", "fly.toml");
    let fly = fly_config("fly.toml");
    let primary = fly["primary_region"].as_str().expect("primary_region");
    assert!(
        regions.iter().any(|r| r == primary),
        "the primary region {primary} is one of the regions {regions:?}"
    );
}

#[tokio::test]
async fn deploy_staging_dry_run_uses_the_staging_app_config_and_regions() {
    let commands = dry_run("deploy-staging.sh", &[]).await;
    let regions = assert_deploy_commands(&commands, "relay-staging", "fly.staging.toml");
    let fly = fly_config("fly.staging.toml");
    let primary = fly["primary_region"].as_str().expect("primary_region");
    assert!(regions.iter().any(|r| r == primary), "{regions:?}");

    // One procedure: both scripts only call the shared library.
    for name in ["deploy.sh", "deploy-staging.sh"] {
        let text = read_repo_file(&format!("scripts/{name}"));
        assert!(text.contains("lib-deploy.sh"), "{name} sources the library");
        for duplicated in ["scale count", "--strategy", "smoke-test.sh", "status"] {
            assert!(
                !text
                    .lines()
                    .any(|l| !l.starts_with('#') && l.contains(duplicated)),
                "{name} repeats `{duplicated}` instead of sharing lib-deploy.sh"
            );
        }
    }
}

#[tokio::test]
async fn deploy_dry_run_takes_regions_app_hostname_and_smoke_options() {
    let commands = dry_run(
        "deploy.sh",
        &[
            "--regions",
            "fra,sjc",
            "--app",
            "relay-canary",
            "--hostname",
            "canary.example.com",
            "--",
            "--timeout",
            "5",
        ],
    )
    .await;
    assert_eq!(
        commands,
        [
            "fly scale count 2 --max-per-region 1 --region fra,sjc --app relay-canary --yes",
            "fly deploy --strategy rolling --config fly.toml --app relay-canary",
            "fly status --app relay-canary",
            "scripts/smoke-test.sh --attempts 3 --timeout 5 canary.example.com fra sjc",
        ]
    );
}

#[tokio::test]
async fn deploy_refuses_bad_arguments_before_running_anything() {
    let scratch = Scratch::new("deploy-usage");
    let (path, log) = fake_fly(&scratch, true);
    let log_str = log.to_string_lossy().into_owned();
    for args in [
        &["--bogus"][..],
        &["--regions"],
        &["--regions", "ams,Not_A_Region"],
        &["--app", "Relay!"],
    ] {
        let out = run(
            &script("deploy.sh"),
            args,
            &[
                ("PATH", &path),
                ("FAKE_FLY", "refuse"),
                ("FAKE_FLY_LOG", &log_str),
            ],
            &repo(),
        )
        .await;
        assert_eq!(out.code, Some(2), "{args:?}: {}", out.both());
        assert!(out.stderr.contains("usage:"), "{args:?}: {}", out.both());
        assert!(!log.exists(), "{args:?} ran fly");
    }
}

#[tokio::test]
async fn deploy_runs_what_the_dry_run_prints_then_the_smoke_test() {
    let ams = relay_in("ams").await;
    let fra = relay_in("fra").await;
    let front = FlyFront::over(&[&ams, &fra]).await;
    let port = front.port().to_string();
    let args = [
        "--regions",
        "ams,fra",
        "--hostname",
        "127.0.0.1",
        "--",
        "--scheme",
        "http",
        "--port",
        &port,
    ];
    let printed = dry_run("deploy.sh", &args).await;

    let scratch = Scratch::new("deploy");
    let (path, log) = fake_fly(&scratch, false);
    let log_str = log.to_string_lossy().into_owned();
    let out = run(
        &script("deploy.sh"),
        &args,
        &[("PATH", &path), ("FAKE_FLY_LOG", &log_str)],
        scratch.path(),
    )
    .await;

    assert_eq!(out.code, Some(0), "{}", out.both());
    assert_eq!(
        out.commands(),
        printed,
        "a real run runs what the dry run printed"
    );
    let called = std::fs::read_to_string(&log).expect("fly was called");
    let fly_commands: Vec<&String> = printed.iter().filter(|c| c.starts_with("fly ")).collect();
    assert_eq!(
        called.lines().collect::<Vec<_>>(),
        fly_commands,
        "fly got exactly the printed arguments, in order"
    );
    assert!(out.stdout.contains("ok   ams: health 200, region ams"));
    assert!(out.stdout.contains("ok   fra: health 200, region fra"));
    assert!(out.stdout.contains("PASS: 2 of 2 regions ok"));
}

#[tokio::test]
async fn deploy_stops_at_the_first_failing_step() {
    let scratch = Scratch::new("deploy-fail");
    let (path, log) = fake_fly(&scratch, true);
    let log_str = log.to_string_lossy().into_owned();
    let out = run(
        &script("deploy.sh"),
        &["--regions", "ams"],
        &[
            ("PATH", &path),
            ("FAKE_FLY_LOG", &log_str),
            ("FAKE_FLY_FAIL_ON", "deploy"),
        ],
        scratch.path(),
    )
    .await;

    assert_eq!(out.code, Some(1), "{}", out.both());
    let called = std::fs::read_to_string(&log).expect("fly was called");
    let subcommands: Vec<&str> = called
        .lines()
        .map(|l| l.split(' ').nth(1).unwrap_or_default())
        .collect();
    assert_eq!(
        subcommands,
        ["scale", "deploy"],
        "nothing after the failed deploy"
    );
    assert!(!out.stdout.contains("smoke-test.sh"), "{}", out.both());
}

// === Fly configs ===

fn fly_config(name: &str) -> toml::Table {
    read_repo_file(name)
        .parse::<toml::Table>()
        .unwrap_or_else(|err| panic!("{name} is not valid TOML: {err}"))
}

/// `8s`, `500ms`, `1m`: the subset of humantime the configs use.
fn duration(text: &str) -> Duration {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or_else(|| panic!("duration {text:?} has no unit"));
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .unwrap_or_else(|_| panic!("duration {text:?}"));
    match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(60 * n),
        _ => panic!("duration {text:?}: unknown unit"),
    }
}

fn table<'a>(parent: &'a toml::Table, key: &str) -> &'a toml::Table {
    parent
        .get(key)
        .and_then(toml::Value::as_table)
        .unwrap_or_else(|| panic!("missing table [{key}]"))
}

fn string<'a>(parent: &'a toml::Table, key: &str) -> &'a str {
    parent
        .get(key)
        .and_then(toml::Value::as_str)
        .unwrap_or_else(|| panic!("missing string {key}"))
}

fn integer(parent: &toml::Table, key: &str) -> i64 {
    parent
        .get(key)
        .and_then(toml::Value::as_integer)
        .unwrap_or_else(|| panic!("missing integer {key}"))
}

/// The rules every Fly config is held to.
fn check_fly_config(name: &str) {
    let text = read_repo_file(name);
    let fly = fly_config(name);
    let env = table(&fly, "env");

    // Shutdown: SIGINT starts the drain, and Fly waits longer than the drain.
    assert_eq!(string(&fly, "kill_signal"), "SIGINT", "{name}");
    let kill_timeout = match &fly["kill_timeout"] {
        toml::Value::Integer(secs) => Duration::from_secs((*secs).try_into().expect("positive")),
        toml::Value::String(text) => duration(text),
        other => panic!("{name}: kill_timeout {other:?}"),
    };
    let deadline = duration(string(env, "RELAY_DRAIN_DEADLINE"));
    assert!(
        kill_timeout > deadline && kill_timeout > DRAIN_DEADLINE,
        "{name}: kill_timeout {kill_timeout:?} must exceed the drain deadline \
         ({deadline:?} in [env], {DRAIN_DEADLINE:?} by default)"
    );

    // The service.
    let service = table(&fly, "http_service");
    assert_eq!(integer(service, "internal_port"), 8080, "{name}");
    assert_eq!(
        string(env, "RELAY_PORT"),
        "8080",
        "{name}: the relay listens where Fly sends"
    );
    assert_eq!(
        service.get("force_https"),
        Some(&toml::Value::Boolean(true)),
        "{name}"
    );
    assert!(
        matches!(
            service.get("auto_stop_machines"),
            Some(toml::Value::String(s)) if s == "off"
        ) || service.get("auto_stop_machines") == Some(&toml::Value::Boolean(false)),
        "{name}: machines holding tunnels must never be auto-stopped"
    );
    assert!(
        service
            .get("auto_start_machines")
            .is_some_and(toml::Value::is_bool)
    );
    assert!(integer(service, "min_machines_running") >= 1, "{name}");

    let concurrency = table(service, "concurrency");
    assert_eq!(string(concurrency, "type"), "connections", "{name}");
    let soft = integer(concurrency, "soft_limit");
    let hard = integer(concurrency, "hard_limit");
    assert!(
        0 < soft && soft < hard,
        "{name}: soft_limit {soft} below hard_limit {hard}"
    );
    assert!(
        hard >= 1000,
        "{name}: every tunnel is a connection; Fly's default limits (20/25) would starve them"
    );

    let checks = service
        .get("checks")
        .and_then(toml::Value::as_array)
        .unwrap_or_else(|| panic!("{name}: no [[http_service.checks]]"));
    let health = checks
        .iter()
        .filter_map(toml::Value::as_table)
        .find(|c| c.get("path").and_then(toml::Value::as_str) == Some("/health"))
        .unwrap_or_else(|| panic!("{name}: no check on /health"));
    assert!(
        string(health, "method").eq_ignore_ascii_case("GET"),
        "{name}"
    );
    let interval = duration(string(health, "interval"));
    let timeout = duration(string(health, "timeout"));
    let grace = duration(string(health, "grace_period"));
    assert!(
        timeout < interval && !grace.is_zero(),
        "{name}: check timings"
    );

    // Deploys and machines.
    assert_eq!(
        string(table(&fly, "deploy"), "strategy"),
        "rolling",
        "{name}"
    );
    let vm = fly
        .get("vm")
        .and_then(toml::Value::as_array)
        .and_then(|vms| vms.first())
        .and_then(toml::Value::as_table)
        .unwrap_or_else(|| panic!("{name}: no [[vm]]"));
    assert!(
        vm.contains_key("size") || vm.contains_key("memory"),
        "{name}"
    );

    // Settings, and no secrets.
    assert_eq!(string(env, "RELAY_LOG_FORMAT"), "json", "{name}");
    assert_eq!(string(env, "RELAY_ROUTING"), "fly-replay", "{name}");
    assert!(env.contains_key("RUST_LOG"), "{name}");
    for secret in ["REDIS_URL", "RELAY_JWT_SECRET", "RELAY_ADMIN_TOKEN"] {
        assert!(
            !env.contains_key(secret)
                && !text
                    .lines()
                    .any(|l| !l.trim_start().starts_with('#') && l.contains(secret)),
            "{name}: {secret} is a secret (`fly secrets set`), never in the config"
        );
        assert!(
            text.contains(&format!("#   {secret}")),
            "{name}: the comments document the secret {secret}"
        );
    }
}

#[test]
fn fly_configs_keep_the_rules_a_deploy_depends_on() {
    check_fly_config("fly.toml");
    check_fly_config("fly.staging.toml");

    let production = fly_config("fly.toml");
    let staging = fly_config("fly.staging.toml");
    assert_eq!(string(&production, "app"), "relay");
    assert_eq!(string(&staging, "app"), "relay-staging");
    assert_ne!(
        string(table(&production, "env"), "RELAY_REDIS_PREFIX"),
        string(table(&staging, "env"), "RELAY_REDIS_PREFIX"),
        "staging and production keep distinct Redis keys"
    );

    // Staging is production under another name: nothing else may differ.
    let comparable = |mut t: toml::Table| {
        t.remove("app");
        if let Some(toml::Value::Table(env)) = t.get_mut("env") {
            env.remove("RELAY_REDIS_PREFIX");
        }
        t
    };
    assert_eq!(
        comparable(production),
        comparable(staging),
        "fly.staging.toml differs from fly.toml in more than app and Redis prefix"
    );
}

#[tokio::test]
async fn fly_env_names_only_settings_the_relay_has() {
    let help = run_relay_cli(&["serve", "--help"], &[]).await;
    assert_eq!(help.code, Some(0), "{}", help.stderr);
    for name in ["fly.toml", "fly.staging.toml"] {
        for key in table(&fly_config(name), "env").keys() {
            if key == "RUST_LOG" {
                continue;
            }
            assert!(
                help.stdout.contains(&format!("[env: {key}=")),
                "{name}: [env] {key} is not a setting of `relay serve`"
            );
        }
    }
}

/// Runs `relay serve` with exactly `env`, on a free loopback port, and
/// returns its address once it logs (in JSON) that it listens.
async fn serve_with_env(
    env: &[(String, String)],
) -> (tokio::process::Child, SocketAddr, Vec<Value>) {
    let mut child = Command::new(relay_binary())
        .args(["serve", "--bind", "127.0.0.1", "--port", "0"])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start relay");
    // The relay logs on stderr.
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let mut seen = Vec::new();
    let addr = within("the relay to log `listening` in JSON", DEADLINE, async {
        loop {
            let line = lines
                .next_line()
                .await
                .expect("read relay output")
                .unwrap_or_else(|| panic!("relay exited before listening; logs: {seen:#?}"));
            let entry: Value = serde_json::from_str(&line)
                .unwrap_or_else(|err| panic!("RELAY_LOG_FORMAT=json, got {line:?}: {err}"));
            let fields = entry["fields"].clone();
            seen.push(entry);
            if fields["message"] == "listening" {
                let addr = fields["addr"].as_str().expect("addr field");
                break addr.parse::<SocketAddr>().expect("addr parses");
            }
        }
    })
    .await;
    (child, addr, seen)
}

#[tokio::test]
async fn the_relay_starts_with_each_fly_config_env_as_fly_runs_it() {
    for name in ["fly.toml", "fly.staging.toml"] {
        let fly = fly_config(name);
        let app = string(&fly, "app");
        let mut env: Vec<(String, String)> = table(&fly, "env")
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.as_str().expect("[env] values are strings").to_owned(),
                )
            })
            .collect();
        // What Fly and `fly secrets set` add on a machine.
        for (key, value) in [
            ("FLY_APP_NAME", app),
            ("FLY_REGION", "ams"),
            ("FLY_MACHINE_ID", "148e21ea"),
            ("RELAY_JWT_SECRET", TEST_SECRET),
            ("RELAY_ADMIN_TOKEN", "admin-token-0123456789"),
        ] {
            env.push((key.to_owned(), value.to_owned()));
        }

        let (mut child, addr, logs) = serve_with_env(&env).await;
        let health = HttpClient::new()
            .get(format!("http://{addr}/health"))
            .send()
            .await;
        health.assert_status(200);
        assert_eq!(health.json()["region"], "ams", "{name}");
        let listening = &logs.last().expect("the listening line")["fields"];
        assert_eq!(listening["routing"], "FlyReplay", "{name}: {listening}");
        assert_eq!(
            listening["advertise"],
            format!("148e21ea.vm.{app}.internal:{}", addr.port()),
            "{name}: peers reach this machine over Fly's private network"
        );
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
}

// === Dockerfile ===

/// One instruction: keyword (upper case) and its arguments, continuation
/// lines joined.
#[derive(Debug, Clone)]
struct Instruction {
    keyword: String,
    args: String,
}

/// One `FROM` and what follows it.
#[derive(Debug)]
struct Stage {
    from: String,
    name: Option<String>,
    instructions: Vec<Instruction>,
}

impl Stage {
    fn all(&self, keyword: &str) -> Vec<&str> {
        self.instructions
            .iter()
            .filter(|i| i.keyword == keyword)
            .map(|i| i.args.as_str())
            .collect()
    }

    fn position(&self, what: impl Fn(&Instruction) -> bool) -> Option<usize> {
        self.instructions.iter().position(what)
    }
}

fn parse_dockerfile(text: &str) -> Vec<Stage> {
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head.trim_end());
            current.push(' ');
        } else {
            current.push_str(trimmed);
            logical.push(std::mem::take(&mut current));
        }
    }
    let mut stages: Vec<Stage> = Vec::new();
    for line in logical {
        let (keyword, args) = line.split_once(' ').unwrap_or((&line, ""));
        let keyword = keyword.to_ascii_uppercase();
        let args = args.split_whitespace().collect::<Vec<_>>().join(" ");
        if keyword == "FROM" {
            let words: Vec<&str> = args.split(' ').collect();
            let name = match words.as_slice() {
                [_, as_kw, name] if as_kw.eq_ignore_ascii_case("AS") => Some((*name).to_owned()),
                _ => None,
            };
            stages.push(Stage {
                from: words[0].to_owned(),
                name,
                instructions: Vec::new(),
            });
        } else if let Some(stage) = stages.last_mut() {
            stage.instructions.push(Instruction { keyword, args });
        }
    }
    stages
}

fn is_cargo_build(i: &Instruction) -> bool {
    i.keyword == "RUN" && i.args.contains("cargo build")
}

#[test]
fn dockerfile_builds_in_two_stages_and_runs_relay_serve_as_non_root_on_8080() {
    let stages = parse_dockerfile(&read_repo_file("Dockerfile"));
    assert_eq!(
        stages.len(),
        2,
        "a builder and a runtime stage: {stages:#?}"
    );
    let (builder, runtime) = (&stages[0], &stages[1]);

    // Builder: dependencies in their own layer, before the relay's sources.
    assert_eq!(builder.name.as_deref(), Some("builder"));
    assert!(builder.from.starts_with("rust:") && builder.from.ends_with("-bookworm"));
    let manifests = builder
        .position(|i| i.keyword == "COPY" && i.args.contains("Cargo.lock"))
        .expect("COPY of Cargo.lock");
    let deps = builder
        .position(is_cargo_build)
        .expect("a dependency build");
    let sources = builder
        .position(|i| i.keyword == "COPY" && i.args == "relay relay")
        .expect("COPY of the relay's sources");
    let build = builder
        .instructions
        .iter()
        .rposition(is_cargo_build)
        .expect("the final build");
    assert!(
        manifests < deps && deps < sources && sources < build,
        "manifests, dependency build, sources, build: in this order"
    );
    assert!(
        builder
            .all("RUN")
            .iter()
            .any(|r| r.contains("install") && r.contains(" make")),
        "the builder installs make, which building jemalloc needs"
    );
    for run in builder.instructions.iter().filter(|i| is_cargo_build(i)) {
        assert!(
            run.args.contains("--release") && run.args.contains("--locked"),
            "{run:?}"
        );
    }

    // Runtime: slim Debian with CA certificates and the binary only.
    assert_eq!(runtime.from, "debian:bookworm-slim");
    assert!(
        runtime
            .all("RUN")
            .iter()
            .any(|r| r.contains("ca-certificates")
                && r.contains("--no-install-recommends")
                && r.contains("rm -rf /var/lib/apt/lists"))
    );
    assert_eq!(
        runtime.all("COPY"),
        ["--from=builder /app/target/release/relay /usr/local/bin/relay"]
    );

    // Non-root, by number (so a runtime can verify it without /etc/passwd),
    // and the user exists.
    let users = runtime.all("USER");
    assert_eq!(users.len(), 1, "{users:?}");
    let uid = users[0].split(':').next().expect("a user");
    assert!(
        uid.parse::<u32>().is_ok_and(|n| n != 0),
        "USER {uid} must be a non-zero uid"
    );
    assert!(
        runtime
            .all("RUN")
            .iter()
            .any(|r| r.contains("useradd") && r.contains(&format!("--uid {uid}"))),
        "the image creates user {uid}"
    );
    let user_at = runtime.position(|i| i.keyword == "USER").expect("USER");
    let cmd_at = runtime.position(|i| i.keyword == "CMD").expect("CMD");
    assert!(user_at < cmd_at);

    assert_eq!(runtime.all("EXPOSE"), ["8080"]);
    assert!(
        runtime.all("ENTRYPOINT").is_empty(),
        "CMD is the whole command"
    );
    let cmd: Vec<String> =
        serde_json::from_str(runtime.all("CMD")[0]).expect("CMD in exec (JSON) form");
    assert_eq!(cmd, ["relay", "serve"]);
    assert_eq!(
        runtime.all("STOPSIGNAL"),
        [string(&fly_config("fly.toml"), "kill_signal")],
        "docker stop sends what Fly sends"
    );
}

/// Whether `.dockerignore` leaves `path` out of the build context: the last
/// pattern matching the path or one of its parent directories decides
/// (patterns relative to the context root, `*` within a path segment, `**`
/// across segments, `!` re-includes).
fn docker_ignores(dockerignore: &str, path: &str) -> bool {
    fn matches(pattern: &[&str], path: &[&str]) -> bool {
        match (pattern.first(), path.first()) {
            (None, None) => true,
            (Some(&"**"), _) => {
                matches(&pattern[1..], path) || (!path.is_empty() && matches(pattern, &path[1..]))
            }
            (Some(p), Some(s)) => segment_matches(p, s) && matches(&pattern[1..], &path[1..]),
            _ => false,
        }
    }
    fn segment_matches(pattern: &str, segment: &str) -> bool {
        match pattern.split_once('*') {
            None => pattern == segment,
            Some((head, tail)) => {
                segment.starts_with(head)
                    && (head.len()..=segment.len()).any(|i| segment_matches(tail, &segment[i..]))
            }
        }
    }
    let segments: Vec<&str> = path.split('/').collect();
    let mut ignored = false;
    for line in dockerignore.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (negated, pattern) = match line.strip_prefix('!') {
            Some(rest) => (true, rest),
            None => (false, line),
        };
        let pattern: Vec<&str> = pattern.trim_start_matches('/').split('/').collect();
        if (1..=segments.len()).any(|n| matches(&pattern, &segments[..n])) {
            ignored = !negated;
        }
    }
    ignored
}

#[test]
fn dockerignore_keeps_what_the_build_copies_and_drops_local_state() {
    let dockerignore = read_repo_file(".dockerignore");
    let stages = parse_dockerfile(&read_repo_file("Dockerfile"));
    let mut copied = Vec::new();
    for copy in stages[0].all("COPY") {
        let words: Vec<&str> = copy.split(' ').collect();
        copied.extend_from_slice(&words[..words.len() - 1]);
    }
    copied.push("relay/src/lib.rs");
    copied.push("relay/src/directory/redis/register.lua");
    for path in &copied {
        assert!(
            !docker_ignores(&dockerignore, path),
            "{path} is copied by the Dockerfile but left out of the context"
        );
        assert!(repo().join(path).exists(), "{path} exists");
    }
    for path in [
        "target/debug/relay",
        ".git/HEAD",
        "tests/scripts.rs",
        "tests/support/lib.rs",
        "dump.rdb",
    ] {
        assert!(docker_ignores(&dockerignore, path), "{path} is kept out");
    }
}

/// Replays the builder stage's `WORKDIR`, `COPY` and `RUN` instructions in
/// `dir` (the stage's WORKDIR mapped onto it), from the first one up to (not
/// including) instruction `end`. Files copied get an old modification time,
/// as a COPY of a long-ago checkout has.
fn replay_builder(builder: &Stage, dir: &Path, range: std::ops::Range<usize>) {
    for instruction in &builder.instructions[range] {
        match instruction.keyword.as_str() {
            "WORKDIR" | "ARG" | "ENV" => {}
            "COPY" => {
                let words: Vec<&str> = instruction.args.split(' ').collect();
                let (sources, dest) = words.split_at(words.len() - 1);
                assert!(
                    !sources.iter().any(|s| s.starts_with("--")),
                    "{instruction:?}"
                );
                // Several sources, or a destination ending in `/`: a directory
                // to copy into. A directory source: its contents are copied.
                let into_dir = sources.len() > 1 || dest[0].ends_with('/');
                let dest = dir.join(dest[0]);
                for source in sources {
                    let from = repo().join(source);
                    let to = if into_dir && !from.is_dir() {
                        dest.join(Path::new(source).file_name().expect("a file name"))
                    } else {
                        dest.clone()
                    };
                    copy_tree(&from, &to);
                }
            }
            "RUN" => {
                let status = std::process::Command::new("sh")
                    .args(["-c", &instruction.args])
                    .current_dir(dir)
                    .status()
                    .expect("run sh");
                assert!(status.success(), "{instruction:?} failed: {status}");
            }
            other => {
                panic!("the builder stage has an instruction this replay does not know: {other}")
            }
        }
    }
}

/// Copies a file or directory tree, with an old modification time.
fn copy_tree(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).expect("create dir");
        for entry in std::fs::read_dir(from).expect("read dir") {
            let entry = entry.expect("dir entry");
            copy_tree(&entry.path(), &to.join(entry.file_name()));
        }
    } else {
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).expect("create parent");
        }
        std::fs::copy(from, to).unwrap_or_else(|err| panic!("copy {}: {err}", from.display()));
        let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        std::fs::File::options()
            .write(true)
            .open(to)
            .and_then(|f| f.set_modified(old))
            .expect("set an old mtime");
    }
}

fn host_triple() -> String {
    let out = std::process::Command::new("rustc")
        .arg("-vV")
        .output()
        .expect("rustc runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("rustc -vV names the host")
        .to_owned()
}

#[test]
fn dockerfile_dependency_layer_is_a_workspace_cargo_can_build() {
    let stages = parse_dockerfile(&read_repo_file("Dockerfile"));
    let builder = &stages[0];
    let deps = builder
        .position(is_cargo_build)
        .expect("a dependency build");
    let scratch = Scratch::new("docker-deps");
    replay_builder(builder, scratch.path(), 0..deps);

    // What the dependency build will see: the workspace loads, Cargo.lock
    // is up to date (--locked), and every target of the relay has a file.
    let out = std::process::Command::new("cargo")
        .args(["metadata", "--locked", "--offline", "--format-version", "1"])
        .args(["--filter-platform", &host_triple()])
        .current_dir(scratch.path())
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "cargo metadata in the stub workspace: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metadata: Value = serde_json::from_slice(&out.stdout).expect("metadata JSON");
    let relay = metadata["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .find(|p| p["name"] == "relay")
        .expect("the relay package");
    let targets = relay["targets"].as_array().expect("targets");
    assert!(
        targets
            .iter()
            .any(|t| t["name"] == "relay" && t["kind"][0] == "bin")
    );
    for target in targets {
        let src = target["src_path"].as_str().expect("src_path");
        assert!(
            Path::new(src).is_file(),
            "the stub layer has no file for target {} ({src})",
            target["name"]
        );
    }
    let stub_bin = std::fs::read_to_string(scratch.path().join("relay/src/bin/relay.rs"))
        .expect("stub binary");
    assert_eq!(stub_bin.trim(), "fn main() {}", "the stub is a stub");
}

#[test]
#[ignore = "a full release build in a scratch workspace: several minutes"]
fn dockerfile_builder_stage_builds_the_real_relay_binary() {
    let stages = parse_dockerfile(&read_repo_file("Dockerfile"));
    let builder = &stages[0];
    let scratch = Scratch::new("docker-build");
    replay_builder(builder, scratch.path(), 0..builder.instructions.len());

    let copy = stages[1].all("COPY")[0];
    let built = copy
        .split(' ')
        .nth(1)
        .and_then(|p| p.strip_prefix("/app/"))
        .expect("COPY --from=builder /app/<path> ..");
    let out = std::process::Command::new(scratch.path().join(built))
        .arg("--help")
        .output()
        .expect("the built binary runs");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && help.contains("serve"),
        "the image would ship the stub, not the relay: {help}"
    );
}

// === scripts/pgo-build.sh ===

/// The profile-guided build is three builds long, too long for the suite, but its training
/// is what rots when the CLI changes: run it, briefly, through the test build of the relay.
/// It must drive real traffic through both protocols (a profile of failed requests would
/// optimize the error paths) and end every process it started.
#[tokio::test]
async fn pgo_training_drives_both_protocols_through_the_relay_and_ends_cleanly() {
    let relay = relay_binary();
    let relay = relay.to_str().expect("utf-8 path");
    let run = run(
        &script("pgo-build.sh"),
        &["--train", relay],
        &[("PGO_SECS", "1"), ("PGO_BULK_MIB", "4")],
        &repo(),
    )
    .await;
    assert_eq!(run.code, Some(0), "{}", run.both());
    for step in [
        "h2, 64 connections",
        "h2, 1 connection",
        "v1, 64 connections",
        "v1, 1 connection",
    ] {
        let requests: u64 = run
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{step}: ")))
            .and_then(|rest| rest.strip_suffix(" requests"))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no '{step}: <n> requests' line:\n{}", run.both()));
        assert!(requests > 0, "{step} sent nothing:\n{}", run.both());
    }
    let bytes = (4 * 1024 * 1024).to_string();
    for transfer in ["h2 download", "h2 upload"] {
        assert_eq!(
            run.stdout
                .lines()
                .filter(|l| *l == format!("{transfer}: {bytes} bytes"))
                .count(),
            2,
            "{}",
            run.both()
        );
    }
    assert!(run.stdout.contains("training done"), "{}", run.both());
}

#[tokio::test]
async fn pgo_build_refuses_a_training_binary_that_is_not_there() {
    let run = run(
        &script("pgo-build.sh"),
        &["--train", "/nonexistent/relay"],
        &[],
        &repo(),
    )
    .await;
    assert_eq!(run.code, Some(2), "{}", run.both());
    assert!(run.stderr.contains("usage:"), "{}", run.both());
}
