//! Tokens never reach the logs, not even at `RUST_LOG=trace`, whether they
//! come in a `token=` query or an `Authorization` header, on the tunnel, HTTP
//! and WebSocket paths, accepted or refused.

use relay_tests::{
    Claims, DEADLINE, RawHost, TEST_SECRET, TestAgent, TestHost, TestRelay, Upstream, WsClient,
};

/// A token the test used, and the distinctive pieces of it that must not be
/// logged either (a truncating "redaction" would leak those).
struct Secret {
    case: &'static str,
    needles: Vec<String>,
}

impl Secret {
    fn new(case: &'static str, token: &str) -> Self {
        let mut needles = vec![token.to_owned()];
        let parts: Vec<&str> = token.split('.').collect();
        if parts.len() == 3 {
            // Payload (unique per token thanks to `sub`) and signature.
            needles.push(parts[1].to_owned());
            needles.push(parts[2].to_owned());
        }
        Self { case, needles }
    }
}

/// A distinct token per use, so a leak names the path that leaked it.
fn client(sub: &str, hosts: &[&str]) -> String {
    Claims::client(hosts).with_sub(sub).sign(TEST_SECRET)
}

#[tokio::test]
async fn tokens_never_appear_in_logs_even_at_trace_level() {
    let mut relay = TestRelay::builder().rust_log("trace").spawn().await;
    let upstream = Upstream::spawn().await;
    let mut secrets = Vec::new();
    let http = relay.http().clone();

    // Tunnels: accepted via query and via header.
    let host_q = Claims::host("red-q")
        .with_sub("tunnel-query-ok")
        .sign(TEST_SECRET);
    secrets.push(Secret::new("tunnel query accepted", &host_q));
    let host =
        TestHost::connect_url(&relay.tunnel_url("red-q", &host_q), None, upstream.addr()).await;
    let host_h = Claims::host("red-h")
        .with_sub("tunnel-header-ok")
        .sign(TEST_SECRET);
    secrets.push(Secret::new("tunnel header accepted", &host_h));
    let raw = RawHost::connect_url(&relay.ws_url("/tunnel?hostId=red-h"), Some(&host_h)).await;
    relay.wait_host_connected("red-q").await;
    relay.wait_host_connected("red-h").await;

    // Tunnels: refused via query and via header.
    let wrong = Claims::host("red-x")
        .with_sub("tunnel-wrong-secret")
        .sign("other-secret");
    secrets.push(Secret::new("tunnel query refused", &wrong));
    let mut refused = RawHost::connect_url(&relay.tunnel_url("red-x", &wrong), None).await;
    assert_eq!(refused.recv_close_code(DEADLINE).await, 1008);
    let expired = Claims::host("red-x")
        .with_sub("tunnel-expired")
        .expired()
        .sign(TEST_SECRET);
    secrets.push(Secret::new("tunnel header refused", &expired));
    let mut refused =
        RawHost::connect_url(&relay.ws_url("/tunnel?hostId=red-x"), Some(&expired)).await;
    assert_eq!(refused.recv_close_code(DEADLINE).await, 1008);
    let garbage = "garbage-token-ZQ8x7Kp2vN";
    secrets.push(Secret::new("tunnel garbage refused", garbage));
    let mut refused = RawHost::connect_url(&relay.tunnel_url("red-x", garbage), None).await;
    assert_eq!(refused.recv_close_code(DEADLINE).await, 1008);

    // HTTP: accepted via header and via query.
    let ok_h = client("http-header-ok", &["red-q"]);
    secrets.push(Secret::new("http header accepted", &ok_h));
    http.get(relay.http_url("/hosts/red-q/echo?x=1"))
        .bearer(&ok_h)
        .send()
        .await
        .assert_status(200);
    let ok_q = client("http-query-ok", &["red-q"]);
    secrets.push(Secret::new("http query accepted", &ok_q));
    http.get(relay.http_url(&format!("/hosts/red-q/echo?token={ok_q}&y=2")))
        .send()
        .await
        .assert_status(200);
    let who = client("whoowns-query", &["red-q"]);
    secrets.push(Secret::new("whoowns query", &who));
    http.get(relay.http_url(&format!("/hosts/red-q/_whoowns?token={who}")))
        .send()
        .await
        .assert_status(200);

    // HTTP: refused via query and via header (401 and 403).
    let bad_q = Claims::client(&["red-q"])
        .with_sub("http-query-401")
        .sign("other-secret");
    secrets.push(Secret::new("http query 401", &bad_q));
    http.get(relay.http_url(&format!("/hosts/red-q/echo?token={bad_q}")))
        .send()
        .await
        .assert_status(401);
    let garbage_h = "garbage-bearer-Hq3Lm9Tz";
    secrets.push(Secret::new("http header 401", garbage_h));
    http.get(relay.http_url("/hosts/red-q/echo"))
        .bearer(garbage_h)
        .send()
        .await
        .assert_status(401);
    let other = client("http-header-403", &["someone-else"]);
    secrets.push(Secret::new("http header 403", &other));
    http.get(relay.http_url("/hosts/red-q/echo"))
        .bearer(&other)
        .send()
        .await
        .assert_status(403);
    let role = Claims::host("red-q")
        .with_sub("http-query-403")
        .sign(TEST_SECRET);
    secrets.push(Secret::new("http query 403", &role));
    http.get(relay.http_url(&format!("/hosts/red-q/echo?token={role}")))
        .send()
        .await
        .assert_status(403);

    // WebSocket channels: accepted via query and header, refused via query.
    let ws_q = client("ws-query-ok", &["red-q"]);
    secrets.push(Secret::new("ws query accepted", &ws_q));
    let mut ws = WsClient::connect_ok(
        &relay.ws_url(&format!("/hosts/red-q/ws/echo?token={ws_q}")),
        None,
    )
    .await;
    ws.send_text("q").await;
    assert_eq!(ws.recv_text().await, "q");
    ws.close(1000).await;
    let ws_h = client("ws-header-ok", &["red-q"]);
    secrets.push(Secret::new("ws header accepted", &ws_h));
    let mut ws = WsClient::connect_ok(&relay.ws_url("/hosts/red-q/ws/echo"), Some(&ws_h)).await;
    ws.send_text("h").await;
    assert_eq!(ws.recv_text().await, "h");
    ws.close(1000).await;
    let ws_bad = Claims::client(&["red-q"])
        .with_sub("ws-query-refused")
        .sign("other-secret");
    secrets.push(Secret::new("ws query refused", &ws_bad));
    // Refused either as an HTTP error or as a close; both are fine here.
    let _ = WsClient::connect(
        &relay.ws_url(&format!("/hosts/red-q/ws/echo?token={ws_bad}")),
        None,
    )
    .await;

    // Let every connection end, then stop the relay so its output is complete.
    drop((host, raw, refused, ws));
    let status = relay.terminate().await;
    let logs = relay.logs();

    assert!(
        logs.len() > 20 && logs.iter().any(|l| l.contains("listening")),
        "expected a full trace log, got {} lines (exit {status})",
        logs.len()
    );
    for secret in &secrets {
        for needle in &secret.needles {
            if let Some(line) = logs.iter().find(|line| line.contains(needle.as_str())) {
                panic!("token from `{}` leaked into the log:\n{line}", secret.case);
            }
        }
    }
    if let Some(line) = logs.iter().find(|line| line.contains(TEST_SECRET)) {
        panic!("the JWT secret leaked into the log:\n{line}");
    }
}

#[tokio::test]
async fn a_percent_encoded_token_key_is_stripped_before_the_host_and_redacted_at_trace_level() {
    let mut relay = TestRelay::builder().rust_log("trace").spawn().await;
    let upstream = Upstream::spawn().await;
    let host = TestHost::connect(&relay, "red-e", &upstream).await;
    let mut secrets = Vec::new();
    for (i, key) in ["%74oken", "t%6Fk%65n"].into_iter().enumerate() {
        let token = client(&format!("percent-encoded-key-{i}"), &["red-e"]);
        secrets.push(Secret::new("percent-encoded token key", &token));
        let response = relay
            .http()
            .get(relay.http_url(&format!("/hosts/red-e/echo/p?{key}={token}&a=1")))
            .send()
            .await;
        response.assert_status(200);
        let echo = response.json();
        assert_eq!(
            echo["query"], "a=1",
            "the token never reaches the host: {echo}"
        );
    }
    drop(host);
    relay.terminate().await;
    let logs = relay.logs();
    assert!(
        logs.iter().any(|line| line.contains("DEBUG")),
        "expected a debug-and-finer log"
    );
    for secret in &secrets {
        for needle in &secret.needles {
            if let Some(line) = logs.iter().find(|line| line.contains(needle.as_str())) {
                panic!("token from `{}` leaked into the log:\n{line}", secret.case);
            }
        }
    }
}

#[tokio::test]
async fn agent_and_relay_trace_logs_carry_no_token_cookie_or_body() {
    const COOKIE: &str = "session=cookie-secret-Zr8Kq";
    const BODY: &str = "body-secret-Qw4Lp";
    let mut relay = TestRelay::builder().rust_log("trace").spawn().await;
    let upstream = Upstream::spawn().await;
    let host_token = Claims::host("red-a")
        .with_sub("agent-own-token")
        .sign(TEST_SECRET);
    for protocol in ["h2", "v1"] {
        let mut agent = TestAgent::for_relay(&relay, "red-a", &upstream)
            .token(&host_token)
            .protocol(protocol)
            .rust_log("trace")
            .spawn();
        agent.wait_connected_to(&relay).await;
        let bearer = client(&format!("trace-{protocol}"), &["red-a"]);
        let response = relay
            .http()
            .request(http::Method::POST, relay.http_url("/hosts/red-a/echo/t"))
            .bearer(&bearer)
            .header("cookie", COOKIE)
            .body(BODY)
            .send()
            .await;
        response.assert_status(200);
        assert_eq!(response.json()["body"], BODY, "the request went through");
        agent.send_sigterm();
        agent.wait_exit(DEADLINE).await;
        let logs = agent.logs();
        assert!(logs.len() > 10, "expected a trace log from the agent");
        for needle in Secret::new("the agent's own host token", &host_token)
            .needles
            .iter()
            .map(String::as_str)
            .chain(
                Secret::new("client token", &bearer)
                    .needles
                    .iter()
                    .map(String::as_str),
            )
            .chain(["cookie-secret-Zr8Kq", BODY])
        {
            if let Some(line) = logs.iter().find(|line| line.contains(needle)) {
                panic!("`{needle}` leaked into the {protocol} agent's trace log:\n{line}");
            }
        }
    }
    relay.terminate().await;
    let logs = relay.logs();
    for needle in ["cookie-secret-Zr8Kq", BODY] {
        if let Some(line) = logs.iter().find(|line| line.contains(needle)) {
            panic!("`{needle}` leaked into the relay's trace log:\n{line}");
        }
    }
}
