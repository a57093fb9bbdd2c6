//! The `relay` command line: config validation (exit 64), `serve --dev` and
//! `relay token`, plus the log format contract the harness relies on.

use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode};
use relay_tests::{
    DEADLINE, TEST_SECRET, TestHost, TestRelay, Upstream, claims_of, run_relay_cli, unix_now,
};
use serde_json::{Value, json};

/// `EX_USAGE` from sysexits.h.
const EX_USAGE: i32 = 64;

fn serve_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "serve",
        "--bind",
        "127.0.0.1",
        "--port",
        "0",
        "--region",
        "cli",
        "--machine-id",
        "m1",
    ];
    args.extend_from_slice(extra);
    args
}

#[tokio::test]
async fn non_numeric_port_exits_64_without_listening() {
    let args = [
        "serve",
        "--bind",
        "127.0.0.1",
        "--port",
        "notanumber",
        "--region",
        "cli",
        "--machine-id",
        "m1",
    ];
    let out = run_relay_cli(
        &args,
        &[("RELAY_JWT_SECRET", TEST_SECRET), ("RUST_LOG", "info")],
    )
    .await;

    assert_eq!(out.code, Some(EX_USAGE), "stderr: {}", out.stderr);
    assert!(
        !out.stderr.trim().is_empty(),
        "a bad config is explained on stderr"
    );
    assert!(!out.stderr.contains("listening") && !out.stdout.contains("listening"));
}

#[tokio::test]
async fn zero_ping_interval_exits_64_without_listening() {
    let out = run_relay_cli(
        &serve_args(&["--ping-interval", "0s"]),
        &[("RELAY_JWT_SECRET", TEST_SECRET), ("RUST_LOG", "info")],
    )
    .await;

    assert_eq!(out.code, Some(EX_USAGE), "stderr: {}", out.stderr);
    assert!(
        !out.stderr.trim().is_empty(),
        "a bad config is explained on stderr"
    );
    assert!(!out.stderr.contains("listening") && !out.stdout.contains("listening"));
}

#[tokio::test]
async fn missing_secret_without_dev_exits_64_naming_the_variable() {
    let out = run_relay_cli(&serve_args(&[]), &[("RUST_LOG", "info")]).await;

    assert_eq!(out.code, Some(EX_USAGE), "stderr: {}", out.stderr);
    assert!(
        out.stderr.contains("RELAY_JWT_SECRET"),
        "stderr should name RELAY_JWT_SECRET: {}",
        out.stderr
    );
    assert!(!out.stderr.contains("listening") && !out.stdout.contains("listening"));
}

/// The token printed after `label` (e.g. `host token:`).
async fn printed_token(relay: &TestRelay, label: &str) -> String {
    let line = relay.wait_for_log(label, DEADLINE).await;
    let (_, token) = line.split_once(label).expect("label is in the line");
    token.trim().to_owned()
}

#[tokio::test]
async fn dev_mode_prints_wildcard_tokens_that_complete_a_request() {
    let relay = TestRelay::builder().dev().spawn().await;
    let upstream = Upstream::spawn().await;

    let host_token = printed_token(&relay, "host token:").await;
    let client_token = printed_token(&relay, "client token:").await;
    let host_claims = claims_of(&host_token);
    assert_eq!(host_claims["role"], "host", "{host_claims}");
    assert_eq!(host_claims["hosts"], json!(["*"]), "{host_claims}");
    let client_claims = claims_of(&client_token);
    assert_eq!(client_claims["role"], "client", "{client_claims}");
    assert_eq!(client_claims["hosts"], json!(["*"]), "{client_claims}");

    let _host = TestHost::connect_url(
        &relay.tunnel_url("dev-host", &host_token),
        None,
        upstream.addr(),
    )
    .await;
    relay
        .wait_host_connected_with("dev-host", &client_token)
        .await;
    let resp = relay
        .http()
        .get(relay.http_url("/hosts/dev-host/echo?from=dev"))
        .bearer(&client_token)
        .send()
        .await;
    resp.assert_status(200);
    assert_eq!(resp.json()["query"], "from=dev");
}

/// Runs `relay token ..` with `secret` and returns the one printed token.
async fn mint_with_cli(args: &[&str], secret: &str) -> String {
    let mut full = vec!["token"];
    full.extend_from_slice(args);
    let out = run_relay_cli(&full, &[("RELAY_JWT_SECRET", secret), ("RUST_LOG", "info")]).await;
    assert_eq!(
        out.code,
        Some(0),
        "relay {full:?} failed; stderr: {}",
        out.stderr
    );
    let lines: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "stdout is just the JWT: {:?}", out.stdout);
    lines[0].trim().to_owned()
}

/// Verifies `token` as HS256 with `secret` and returns its claims.
fn verified_claims(token: &str, secret: &str) -> Value {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_required_spec_claims(&["exp"]);
    decode::<Value>(
        token,
        &DecodingKey::from_secret(secret.as_bytes()),
        &validation,
    )
    .unwrap_or_else(|err| panic!("relay token is not a valid HS256 JWT for the secret: {err}"))
    .claims
}

#[tokio::test]
async fn token_subcommand_mints_hs256_tokens_with_requested_claims() {
    let secret = "cli-secret-3b7d-0123456789";

    let host = mint_with_cli(
        &[
            "--role", "host", "--host", "h-a", "--host", "h-b", "--ttl", "1h",
        ],
        secret,
    )
    .await;
    let claims = verified_claims(&host, secret);
    assert_eq!(claims["role"], "host");
    assert_eq!(claims["hosts"], json!(["h-a", "h-b"]));
    let exp = claims["exp"].as_u64().expect("exp is a number");
    let expected = unix_now() + 3600;
    assert!(
        exp.abs_diff(expected) <= 120,
        "exp {exp} is not about now + 1h ({expected})"
    );
    assert!(claims["sub"].is_string(), "sub is a string: {claims}");

    let client = mint_with_cli(
        &["--role", "client", "--host", "h-a", "--ttl", "1h"],
        secret,
    )
    .await;
    let claims = verified_claims(&client, secret);
    assert_eq!(claims["role"], "client");
    assert_eq!(claims["hosts"], json!(["h-a"]));
}

#[tokio::test]
async fn token_subcommand_tokens_open_a_tunnel_and_complete_a_request() {
    let secret = "cli-secret-9f21-0123456789";
    let host_token = mint_with_cli(
        &["--role", "host", "--host", "cli-host", "--ttl", "1h"],
        secret,
    )
    .await;
    let client_token = mint_with_cli(
        &["--role", "client", "--host", "cli-host", "--ttl", "1h"],
        secret,
    )
    .await;
    let relay = TestRelay::builder().secret(secret).spawn().await;
    let upstream = Upstream::spawn().await;

    let _host = TestHost::connect_url(
        &relay.tunnel_url("cli-host", &host_token),
        None,
        upstream.addr(),
    )
    .await;
    relay
        .wait_host_connected_with("cli-host", &client_token)
        .await;
    let resp = relay
        .http()
        .get(relay.http_url("/hosts/cli-host/echo"))
        .bearer(&client_token)
        .send()
        .await;

    resp.assert_status(200);
    assert_eq!(resp.json()["path"], "/echo");
}

#[tokio::test]
async fn serve_logs_one_uncolored_listening_line_with_the_bound_address() {
    let relay = TestRelay::spawn().await;

    let logs = relay.logs();
    let listening: Vec<&String> = logs.iter().filter(|l| l.contains("listening")).collect();
    assert_eq!(
        listening.len(),
        1,
        "exactly one `listening` line: {listening:?}"
    );
    assert!(
        listening[0].contains(&format!("addr={}", relay.addr())),
        "the listening line carries addr=IP:PORT: {:?}",
        listening[0]
    );
    assert!(
        logs.iter().all(|l| !l.contains('\u{1b}')),
        "no ANSI escapes when stderr is not a terminal: {logs:?}"
    );
}

#[tokio::test]
async fn dev_mode_keeps_its_secret_across_restarts_and_prints_what_to_paste() {
    let state = std::env::temp_dir().join(format!("relay-dev-restart-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&state);
    let dev = || {
        TestRelay::builder()
            .dev()
            .env("RELAY_DEV_STATE_FILE", state.to_str().unwrap())
            .spawn()
    };
    let mut first = dev().await;
    let client_token = printed_token(&first, "client token:").await;
    let admin_token = printed_token(&first, "admin token:").await;
    let logs = first.logs().join("\n");
    assert!(
        logs.contains(&format!("{}", state.display())),
        "names its state file"
    );
    assert!(
        logs.contains(" agent --relay ws://localhost:")
            && logs.contains("--to http://127.0.0.1:3000"),
        "prints the agent command: {logs}"
    );
    assert!(
        logs.contains("/hosts/demo/?token="),
        "prints the browser URL"
    );
    first.terminate().await;

    let second = dev().await;
    // A token printed by the first run still works: the secret was kept.
    let resp = second.whoowns_with("demo", &client_token).await;
    assert_eq!(
        resp.status,
        503,
        "authorized (no such host yet): {}",
        resp.text()
    );
    let admin = second
        .http()
        .get(second.http_url("/admin/tunnels"))
        .bearer(&admin_token)
        .send()
        .await;
    assert_eq!(
        admin.status, 200,
        "the printed admin token works across restarts too"
    );

    // A dev token from a run whose secret is gone is told so.
    drop(second);
    std::fs::remove_file(&state).unwrap();
    let third = dev().await;
    let resp = third.whoowns_with("demo", &client_token).await;
    assert_eq!(resp.status, 401);
    assert!(
        resp.error().contains("earlier `relay serve --dev`"),
        "{}",
        resp.error()
    );
    std::fs::remove_file(&state).unwrap();
}

#[tokio::test]
async fn boolean_variables_take_1_and_yes_as_well_as_true() {
    for value in ["1", "yes", "true"] {
        let state = std::env::temp_dir().join(format!(
            "relay-dev-bool-{}-{value}.json",
            std::process::id()
        ));
        let relay = TestRelay::builder()
            .no_secret()
            .env("RELAY_DEV", value)
            .env("RELAY_DEV_STATE_FILE", state.to_str().unwrap())
            .spawn()
            .await;
        assert!(
            !printed_token(&relay, "client token:").await.is_empty(),
            "RELAY_DEV={value} turns dev mode on"
        );
        let _ = std::fs::remove_file(&state);
    }
}

#[tokio::test]
async fn tls_files_that_do_not_load_or_come_alone_exit_64_naming_the_flag() {
    let missing = std::env::temp_dir().join("relay-test-no-such-cert.pem");
    let missing = missing.to_str().unwrap();
    for (args, names) in [
        (
            vec!["--tls-cert", missing, "--tls-key", missing],
            "--tls-cert",
        ),
        (vec!["--tls-cert", missing], "--tls-key"),
    ] {
        let out = run_relay_cli(
            &serve_args(&args),
            &[("RELAY_JWT_SECRET", TEST_SECRET), ("RUST_LOG", "info")],
        )
        .await;
        assert_eq!(out.code, Some(EX_USAGE), "stderr: {}", out.stderr);
        assert!(out.stderr.contains(names), "{}", out.stderr);
        assert!(!out.stderr.contains("listening") && !out.stdout.contains("listening"));
    }
}

/// A local service answering `GET /` with 200, where the printed agent command's
/// `--to` points (on port 3000 in the banner; here wherever it could bind).
async fn local_service() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route(
        "/",
        axum::routing::get(|| async { "hello from the local service" }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// Starts the agent command line the dev banner printed, as printed (the local
/// service's address put in for port 3000); its stdout is piped.
fn run_printed_agent(banner: &str, service: std::net::SocketAddr) -> tokio::process::Child {
    let line = banner
        .lines()
        .find(|l| l.contains(" agent --relay "))
        .unwrap_or_else(|| panic!("no agent command printed: {banner}"));
    let words: Vec<String> = line
        .split_whitespace()
        .map(|w| {
            if w == "http://127.0.0.1:3000" {
                format!("http://{service}")
            } else {
                w.to_owned()
            }
        })
        .collect();
    tokio::process::Command::new(&words[0])
        .args(&words[1..])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the printed agent command runs")
}

/// The printed `curl -H "Authorization: Bearer …" <url>`, sent: its status and body.
async fn run_printed_curl(relay: &TestRelay, banner: &str) -> (u16, String) {
    let line = banner
        .lines()
        .find(|l| l.trim_start().starts_with("curl ") && l.contains("/hosts/demo/"))
        .unwrap_or_else(|| panic!("no curl printed: {banner}"));
    let (_, rest) = line.split_once("Bearer ").unwrap();
    let (token, url) = rest.split_once("\" ").unwrap();
    let response = relay.http().get(url.trim()).bearer(token).send().await;
    (response.status.as_u16(), response.text())
}

#[tokio::test]
async fn the_try_it_commands_work_as_printed_and_the_agent_stays_through_a_dev_restart() {
    let state = std::env::temp_dir().join(format!("relay-dev-try-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&state);
    let port = relay_tests::unused_port();
    let dev = || {
        TestRelay::builder()
            .dev()
            .port(port)
            .env("RELAY_DEV_STATE_FILE", state.to_str().unwrap())
            .spawn()
    };
    let service = local_service().await;
    let mut relay = dev().await;
    let banner = relay.logs().join("\n");
    let mut agent = run_printed_agent(&banner, service);
    let mut announced = tokio::io::BufReader::new(agent.stdout.take().unwrap());
    let line = relay_tests::within("the agent announces its URL", DEADLINE, async {
        let mut line = String::new();
        tokio::io::AsyncBufReadExt::read_line(&mut announced, &mut line)
            .await
            .unwrap();
        line
    })
    .await;
    assert!(line.contains("/hosts/demo/"), "{line}");
    assert_eq!(
        run_printed_curl(&relay, &banner).await,
        (200, "hello from the local service".to_owned())
    );
    // The browser URL at the root of the host's own origin (`demo.localhost`).
    let browser = banner
        .lines()
        .find_map(|l| {
            l.split_once("root of its own origin: ")
                .map(|(_, url)| url.trim())
        })
        .expect("the subdomain URL is printed");
    let query = browser.split_once('?').unwrap().1;
    let response = relay
        .http()
        .get(relay.http_url(&format!("/?{query}")))
        .header("host", &format!("demo.localhost:{port}"))
        .send()
        .await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert!(response.header("set-cookie").is_some());

    // A restart: the agent's token still works, so it is back without anyone's help.
    relay.terminate().await;
    let relay = dev().await;
    relay_tests::wait_until_async("the agent is back after the restart", DEADLINE, || async {
        run_printed_curl(&relay, &banner).await.0 == 200
    })
    .await;
    assert!(
        agent.try_wait().unwrap().is_none(),
        "the agent never stopped"
    );
    let _ = std::fs::remove_file(&state);
}
