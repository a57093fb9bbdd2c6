//! `relay agent` end to end: the agent runs as a child process of the `relay`
//! binary, between a real relay (or a [`StubRelay`] whose every answer the
//! test picks) and a real upstream.
//!
//! Proxying: HTTP and WebSocket through relay + agent to the upstream, and
//! what a client sees when the upstream is down. Reconnects: after a relay
//! restart, after a drain (in-band message or close 4001), after 429/503 with
//! `Retry-After`, after inbound silence, after an auth failure with a rotated
//! token file. Operations: SIGTERM/SIGINT, the status endpoint, log hygiene,
//! bad flags.
//!
//! Timing assertions use timestamps taken where the event is observed (the
//! stub records each upgrade request as it arrives), with bounds derived from
//! the agent's flags; every wait polls a condition under a deadline.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use futures_util::future::join_all;
use http::Method;
use relay_tests::agent::RECONNECTING_LINE;
use relay_tests::{
    AgentBuilder, Claims, DEADLINE, StubRelay, StubReply, StubTunnel, TEST_SECRET, TestAgent,
    TestRelay, TokenFile, Upstream, WsClient, WsEnd, msg_type, rejection_status, run_relay_cli,
    unused_port, wait_until, within,
};
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{self, Message};

/// Scheduling slack on top of a computed bound: process wake-ups, a debug
/// build and parallel tests on a small CI machine.
const SLACK: Duration = Duration::from_millis(500);

/// How soon a drained agent must be back (the contract's default drain
/// spread is 250 ms).
const DRAIN_RECONNECT_BOUND: Duration = Duration::from_secs(1);

/// `http://127.0.0.1:<port>` where nothing listens: an upstream that is down.
fn down_upstream() -> (u16, String) {
    let port = unused_port();
    (port, format!("http://127.0.0.1:{port}"))
}

/// An agent for `host_id` pointed at `stub`, with a well-formed token (the
/// stub checks none) and an upstream that is down (stub tests send no
/// requests unless they bring their own upstream).
fn agent_for_stub(stub: &StubRelay, host_id: &str) -> AgentBuilder {
    TestAgent::builder(host_id)
        .relay(&stub.url())
        .v1()
        .token(&Claims::host(host_id).sign(TEST_SECRET))
        .to(&down_upstream().1)
}

/// Takes the stub's next tunnel and makes it live: a v1 `ping` must come back
/// as `pong`, and the agent must log the tunnel as registered.
async fn live_stub_tunnel(stub: &mut StubRelay, agent: &TestAgent, nth: usize) -> StubTunnel {
    let mut tunnel = stub.next_tunnel().await;
    tunnel.send_json(&json!({"type": "ping"})).await;
    match tunnel.try_recv(DEADLINE).await {
        Some(Ok(msg)) => assert_eq!(msg_type(&msg), "pong", "ping answered with {msg}"),
        other => panic!("expected a pong from the agent, got {other:?}"),
    }
    agent.wait_registered(nth).await;
    tunnel
}

/// A relay, an upstream and an agent for `host_id` registered with the relay.
async fn relay_with_agent(host_id: &str) -> (TestRelay, Upstream, TestAgent) {
    let relay = TestRelay::spawn().await;
    let upstream = Upstream::spawn().await;
    let agent = TestAgent::for_relay(&relay, host_id, &upstream).spawn();
    agent.wait_connected_to(&relay).await;
    (relay, upstream, agent)
}

/// `http://RELAY/hosts/{host_id}{path}`.
fn host_url(relay: &TestRelay, host_id: &str, path: &str) -> String {
    relay.http_url(&format!("/hosts/{host_id}{path}"))
}

/// Whole seconds since the epoch (rounded down).
fn unix_now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// An RFC 9110 IMF-fixdate, e.g. `Sun, 06 Nov 1994 08:49:37 GMT`.
fn http_date(unix_secs: u64) -> String {
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = unix_secs / 86_400;
    let secs = unix_secs % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = i64::try_from(days).expect("a sane date") + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
        WEEKDAYS[usize::try_from(days % 7).expect("< 7")],
        MONTHS[usize::try_from(month - 1).expect("1..=12")],
        secs / 3_600,
        secs % 3_600 / 60,
        secs % 60
    )
}

#[test]
fn http_date_helper_formats_rfc_9110_example() {
    assert_eq!(http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
    assert_eq!(http_date(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
    assert_eq!(http_date(1_709_208_000), "Thu, 29 Feb 2024 12:00:00 GMT");
}

/// The stub itself, so that an agent test failing is never the harness.
#[tokio::test]
async fn stub_relay_refuses_accepts_and_records_as_told() {
    let mut stub = StubRelay::spawn(|n| match n {
        0 => StubReply::refuse(429, &[("retry-after", "2")]),
        _ => StubReply::Accept,
    })
    .await;
    let refused = WsClient::connect(&format!("{}/tunnel?hostId=h1&token=abc", stub.url()), None)
        .await
        .err()
        .expect("the first upgrade is refused");
    match &refused {
        tungstenite::Error::Http(response) => {
            assert_eq!(response.status(), 429);
            assert_eq!(response.headers()["retry-after"], "2");
        }
        other => panic!("expected an HTTP refusal, got {other}"),
    }

    let mut ws =
        WsClient::connect_ok(&format!("{}/tunnel?hostId=h1", stub.url()), Some("tok")).await;
    let mut tunnel = stub.next_tunnel().await;
    tunnel.send_json(&json!({"type": "ping"})).await;
    assert_eq!(ws.recv_text().await, r#"{"type":"ping"}"#);
    ws.send_text(r#"{"type":"pong"}"#).await;
    match tunnel.try_recv(DEADLINE).await {
        Some(Ok(msg)) => assert_eq!(msg_type(&msg), "pong"),
        other => panic!("expected pong, got {other:?}"),
    }
    tunnel.close(4001).await;
    assert_eq!(ws.recv_close_code(DEADLINE).await, 4001);

    let attempts = stub.attempts();
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0].token().as_deref(), Some("abc"));
    assert_eq!(attempts[1].token().as_deref(), Some("tok"));
    assert_eq!(attempts[1].path(), "/tunnel");
    assert_eq!(attempts[1].query_param("hostId").as_deref(), Some("h1"));
    assert!(attempts[1].at >= attempts[0].at);
}

// ---------------------------------------------------------------------------
// Proxying through relay + agent
// ---------------------------------------------------------------------------

#[tokio::test]
async fn http_get_and_post_reach_upstream_through_relay_and_agent() {
    let (relay, upstream, _agent) = relay_with_agent("web-1").await;
    let token = relay.client_token(&["web-1"]);

    let get = relay
        .http()
        .get(host_url(&relay, "web-1", "/echo/a/b?x=1&y=two"))
        .bearer(&token)
        .header("x-status", "201")
        .send()
        .await;
    get.assert_status(201);
    assert_eq!(
        get.header("x-upstream"),
        Some("echo"),
        "upstream header lost"
    );
    let echo = get.json();
    assert_eq!(echo["method"], "GET");
    assert_eq!(echo["path"], "/echo/a/b");
    assert_eq!(echo["query"], "x=1&y=two");

    let payload = json!({"hello": "world", "n": [1, 2, 3], "unicode": "grüße ✓"});
    let post = relay
        .http()
        .request(Method::POST, host_url(&relay, "web-1", "/echo/items"))
        .bearer(&token)
        .json(&payload)
        .send()
        .await;
    post.assert_status(200);
    let echo = post.json();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["headers"]["content-type"], "application/json");
    let body: Value = serde_json::from_str(echo["body"].as_str().expect("body is a string"))
        .expect("the upstream got the JSON body intact");
    assert_eq!(body, payload);
    assert_eq!(upstream.requests(), 2);
}

#[tokio::test]
async fn http_exchanges_are_forwarded_concurrently() {
    let (relay, upstream, _agent) = relay_with_agent("web-1").await;
    let token = relay.client_token(&["web-1"]);
    let slow = Duration::from_millis(800);
    let n = 4_u32;

    let started = Instant::now();
    let responses = join_all((0..n).map(|_| {
        relay
            .http()
            .get(host_url(
                &relay,
                "web-1",
                &format!("/slow?ms={}", slow.as_millis()),
            ))
            .bearer(&token)
            .send()
    }))
    .await;
    let took = started.elapsed();
    eprintln!("measured: took = {took:?}");

    for resp in &responses {
        resp.assert_status(200);
        assert_eq!(resp.text(), "slow done");
    }
    assert_eq!(upstream.requests(), 4);
    assert!(
        took < slow * 2,
        "{n} requests of {slow:?} each took {took:?}: the agent serves exchanges one at a time"
    );
}

#[tokio::test]
async fn websocket_text_and_binary_frames_echo_through_agent() {
    let (relay, upstream, _agent) = relay_with_agent("web-1").await;
    let token = relay.client_token(&["web-1"]);
    let mut ws =
        WsClient::connect_ok(&relay.ws_url("/hosts/web-1/ws/echo?room=7"), Some(&token)).await;

    ws.send_text("hello ✓").await;
    assert_eq!(ws.recv_text().await, "hello ✓");
    let binary = [0_u8, 1, 2, 0x80, 0xfe, 0xff];
    ws.send_binary(&binary).await;
    match ws.recv_data().await {
        Message::Binary(data) => assert_eq!(&data[..], &binary[..], "binary frame altered"),
        other => panic!("a binary frame must come back binary, got {other:?}"),
    }
    ws.send_text("again").await;
    assert_eq!(ws.recv_text().await, "again");
    assert_eq!(upstream.ws_connections(), 1);
}

#[tokio::test]
async fn websocket_close_codes_propagate_both_ways_through_agent() {
    let (relay, upstream, _agent) = relay_with_agent("web-1").await;
    let token = relay.client_token(&["web-1"]);
    let url = relay.ws_url("/hosts/web-1/ws/echo");

    // Upstream closes with 4321: the client sees 4321.
    let mut ws = WsClient::connect_ok(&url, Some(&token)).await;
    ws.send_text("close:4321").await;
    assert_eq!(ws.recv_close_code(DEADLINE).await, 4321);

    // The client closes with its code: the upstream sees that code. Several
    // channels, one after the other, so that a race between the close and
    // the channel's teardown cannot hide behind one lucky run. (The upstream
    // also records the answer to its own close above.)
    wait_until("the upstream records the close of 4321", DEADLINE, || {
        upstream.ws_close_codes().len() == 1
    })
    .await;
    let seen_before = 1;
    for (i, code) in (4000..4008_u16).enumerate() {
        let mut ws = WsClient::connect_ok(&url, Some(&token)).await;
        ws.send_text("ping-me").await;
        assert_eq!(ws.recv_text().await, "ping-me");
        ws.close(code).await;
        wait_until(
            &format!("the upstream receives a close from the agent after client close {code}"),
            DEADLINE,
            || upstream.ws_close_codes().len() > seen_before + i,
        )
        .await;
        let got = upstream.ws_close_codes()[seen_before + i];
        assert_eq!(
            got, code,
            "the client closed with {code}, the upstream got {got}"
        );
    }
}

/// Collects agent messages of type `ty` for channel `id` from `tunnel`.
async fn next_of(tunnel: &mut StubTunnel, ty: &str, id: &str) -> Value {
    loop {
        match tunnel.try_recv(DEADLINE).await {
            Some(Ok(msg)) if msg_type(&msg) == ty && msg["id"] == id => return msg,
            Some(Ok(_)) => {}
            other => panic!("expected {ty} for {id} from the agent, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn v1_channel_messages_drive_local_websocket_with_base64_binary_and_close_code() {
    let upstream = Upstream::spawn().await;
    let mut stub = StubRelay::accepting().await;
    let agent = TestAgent::builder("h1")
        .relay(&stub.url())
        .v1()
        .token(&Claims::host("h1").sign(TEST_SECRET))
        .upstream(&upstream)
        .spawn();
    let mut tunnel = live_stub_tunnel(&mut stub, &agent, 1).await;
    let binary = [0_u8, 0xff, 0x10, 0x80];
    let encoded = BASE64.encode(binary);

    // Several channels in turn: the close code must survive every time.
    for (i, code) in (4000..4008_u16).enumerate() {
        let id = format!("c{i}");
        tunnel
            .send_json(&json!({"type": "ws:open", "id": id, "path": "/ws/echo", "query": "a=1"}))
            .await;
        tunnel
            .send_json(&json!({"type": "ws:frame", "id": id, "data": "hi"}))
            .await;
        let text = next_of(&mut tunnel, "ws:frame", &id).await;
        assert_eq!(text["data"], "hi", "{text}");
        assert!(
            text.get("encoding").is_none_or(Value::is_null),
            "a text frame travels as-is: {text}"
        );
        tunnel
            .send_json(
                &json!({"type": "ws:frame", "id": id, "data": encoded, "encoding": "base64"}),
            )
            .await;
        let bin = next_of(&mut tunnel, "ws:frame", &id).await;
        assert_eq!(bin["encoding"], "base64", "{bin}");
        assert_eq!(bin["data"], encoded.as_str(), "{bin}");

        tunnel
            .send_json(&json!({"type": "ws:close", "id": id, "code": code}))
            .await;
        wait_until(
            &format!("the upstream receives a close for channel {id}"),
            DEADLINE,
            || upstream.ws_close_codes().len() > i,
        )
        .await;
        let got = upstream.ws_close_codes()[i];
        assert_eq!(
            got, code,
            "ws:close with code {code} from the relay reached the upstream as {got}"
        );
    }
}

#[tokio::test]
async fn upstream_down_gives_502_and_tunnel_serves_again_when_upstream_returns() {
    let relay = TestRelay::spawn().await;
    let (port, upstream_url) = down_upstream();
    let agent = TestAgent::builder("web-1")
        .relay(&relay.ws_url(""))
        .token(&relay.host_token("web-1"))
        .to(&upstream_url)
        .spawn();
    agent.wait_connected_to(&relay).await;
    let token = relay.client_token(&["web-1"]);

    let resp = relay
        .http()
        .get(host_url(&relay, "web-1", "/back"))
        .bearer(&token)
        .send()
        .await;
    resp.assert_status(502);
    assert_eq!(
        resp.error(),
        "upstream unavailable",
        "the agent's own errors come in the relay's shape"
    );
    assert_eq!(resp.header("content-type"), Some("application/json"));

    // The upstream comes back on its port.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind the returning upstream");
    let app = axum::Router::new().route("/back", axum::routing::get(|| async { "back" }));
    let server = tokio::spawn(async move {
        axum::serve(listener, app).await.expect("upstream serve");
    });

    let resp = relay
        .http()
        .get(host_url(&relay, "web-1", "/back"))
        .bearer(&token)
        .send()
        .await;
    resp.assert_status(200);
    assert_eq!(resp.text(), "back");
    assert_eq!(
        agent.registered_count(),
        1,
        "the 502 must not have cost the tunnel; agent logs:\n{}",
        agent.logs().join("\n")
    );
    server.abort();
}

#[tokio::test]
async fn websocket_to_unreachable_upstream_closes_client_with_1011_over_v1() {
    let relay = TestRelay::spawn().await;
    let agent = TestAgent::builder("web-1")
        .relay(&relay.ws_url(""))
        .token(&relay.host_token("web-1"))
        .to(&down_upstream().1)
        .v1()
        .spawn();
    agent.wait_connected_to(&relay).await;

    // v1 cannot refuse a channel: it is opened, then closed with 1011.
    let mut ws = WsClient::connect_ok(
        &relay.ws_url("/hosts/web-1/ws/echo"),
        Some(&relay.client_token(&["web-1"])),
    )
    .await;
    assert_eq!(ws.recv_close_code(DEADLINE).await, 1011);
    // The agent may log its registration after the channel's close reached the client
    // (on a loaded machine): wait for it, then check it did not register again.
    agent.wait_registered(1).await;
    assert_eq!(agent.registered_count(), 1, "the tunnel stays up");
    // Said like a failed HTTP request: the operator sees the service is down.
    let warned = agent
        .wait_for_log(
            "upstream request failed; WebSocket channel closed 1011",
            DEADLINE,
        )
        .await;
    assert!(warned.contains("WARN"), "{warned}");
}

#[tokio::test]
async fn websocket_to_unreachable_upstream_is_refused_with_502_over_h2() {
    let relay = TestRelay::spawn().await;
    let agent = TestAgent::builder("web-1")
        .relay(&relay.ws_url(""))
        .token(&relay.host_token("web-1"))
        .to(&down_upstream().1)
        .protocol("h2")
        .spawn();
    agent.wait_connected_to(&relay).await;

    // h2 opens the local WebSocket before answering: the client's handshake fails with
    // the agent's 502 instead of opening a channel that closes at once.
    let err = WsClient::connect(
        &relay.ws_url("/hosts/web-1/ws/echo"),
        Some(&relay.client_token(&["web-1"])),
    )
    .await
    .err()
    .expect("the upgrade is refused");
    assert_eq!(rejection_status(&err), Some(502), "{err}");
    agent.wait_registered(1).await;
    assert_eq!(agent.registered_count(), 1, "the tunnel stays up");
    let warned = agent
        .wait_for_log("upstream request failed; answered 502", DEADLINE)
        .await;
    assert!(warned.contains("WARN"), "{warned}");
}

// ---------------------------------------------------------------------------
// Reconnecting
// ---------------------------------------------------------------------------

#[tokio::test]
async fn agent_reconnects_within_backoff_cap_after_relay_restarts_on_same_port() {
    let cap = Duration::from_secs(1);
    let mut relay = TestRelay::spawn().await;
    let port = relay.addr().port();
    let upstream = Upstream::spawn().await;
    let agent = TestAgent::for_relay(&relay, "h1", &upstream)
        .backoff_base("200ms")
        .backoff_cap("1s")
        .spawn();
    agent.wait_connected_to(&relay).await;
    agent.wait_registered(1).await;

    relay.kill().await;
    // Let the outage last a few retries so the backoff has grown.
    let retries_before = agent.log_count(RECONNECTING_LINE);
    agent
        .wait_for_log_count(RECONNECTING_LINE, retries_before + 3, DEADLINE)
        .await;

    let relay = TestRelay::builder().port(port).spawn().await;
    let back_at = Instant::now(); // just after its `listening` line
    agent.wait_connected_to(&relay).await;
    let took = back_at.elapsed();
    eprintln!("measured: took = {took:?}");

    assert!(
        took <= cap + SLACK,
        "the agent came back {took:?} after the relay's `listening` line; with \
         --backoff-cap 1s its pending retry is at most 1 s away"
    );
    agent.wait_registered(2).await;
    let resp = relay
        .http()
        .get(host_url(&relay, "h1", "/echo/after-restart"))
        .bearer(&relay.client_token(&["h1"]))
        .send()
        .await;
    resp.assert_status(200);
}

#[tokio::test]
async fn drain_message_makes_agent_reconnect_within_one_second() {
    let mut stub = StubRelay::accepting().await;
    // Normal backoff would wait 2.5 s to 5 s: a prompt reconnect is the drain path.
    let agent = agent_for_stub(&stub, "h1")
        .backoff_base("5s")
        .backoff_cap("10s")
        .spawn();
    let mut first = live_stub_tunnel(&mut stub, &agent, 1).await;

    let drained_at = Instant::now();
    first
        .send_json(&json!({"type": "drain", "reason": "deploy"}))
        .await;
    let attempts = stub.wait_attempts(2, DEADLINE).await;
    let gap = attempts[1].at - drained_at;
    eprintln!("measured: gap = {gap:?}");

    assert!(
        gap < DRAIN_RECONNECT_BOUND,
        "new tunnel attempt {gap:?} after the drain message"
    );
    assert_eq!(attempts[1].path(), "/tunnel");
    assert_eq!(attempts[1].query_param("hostId").as_deref(), Some("h1"));
}

#[tokio::test]
async fn close_4001_alone_makes_agent_reconnect_within_one_second() {
    let mut stub = StubRelay::accepting().await;
    let agent = agent_for_stub(&stub, "h1")
        .backoff_base("5s")
        .backoff_cap("10s")
        .spawn();
    let mut first = live_stub_tunnel(&mut stub, &agent, 1).await;

    let closed_at = Instant::now();
    first.close(4001).await;
    let attempts = stub.wait_attempts(2, DEADLINE).await;
    let gap = attempts[1].at - closed_at;
    eprintln!("measured: gap = {gap:?}");

    assert!(
        gap < DRAIN_RECONNECT_BOUND,
        "new tunnel attempt {gap:?} after close 4001"
    );
}

#[tokio::test]
async fn relay_sigterm_drain_moves_agent_to_next_relay_within_one_second() {
    let mut draining = TestRelay::spawn().await;
    let other = TestRelay::spawn().await;
    let upstream = Upstream::spawn().await;
    let agent = TestAgent::builder("h1")
        .relay(&draining.ws_url(""))
        .relay(&other.ws_url(""))
        .token(&draining.host_token("h1"))
        .upstream(&upstream)
        .backoff_base("200ms")
        .backoff_cap("1s")
        .spawn();
    agent.wait_connected_to(&draining).await;

    let signalled_at = Instant::now();
    draining.send_sigterm();
    agent.wait_connected_to(&other).await;
    let took = signalled_at.elapsed();
    eprintln!("measured: took = {took:?}");

    assert!(
        took < DRAIN_RECONNECT_BOUND,
        "the host was registered on the other relay {took:?} after the SIGTERM"
    );
    let line = agent.wait_registered(2).await;
    assert!(
        line.contains(&other.addr().to_string()),
        "the second `tunnel registered` line names the other relay: {line}"
    );
    let status = draining.wait_exit(DEADLINE).await;
    assert_eq!(status.code(), Some(0), "the drained relay exits 0");
    other
        .http()
        .get(host_url(&other, "h1", "/echo/moved"))
        .bearer(&other.client_token(&["h1"]))
        .send()
        .await
        .assert_status(200);
}

#[tokio::test]
async fn drain_keeps_old_tunnel_serving_in_flight_exchange_while_new_tunnel_opens() {
    let upstream = Upstream::spawn().await;
    let mut stub = StubRelay::accepting().await;
    let agent = TestAgent::builder("h1")
        .relay(&stub.url())
        .v1()
        .token(&Claims::host("h1").sign(TEST_SECRET))
        .upstream(&upstream)
        .backoff_base("5s")
        .backoff_cap("10s")
        .spawn();
    let mut old = live_stub_tunnel(&mut stub, &agent, 1).await;

    old.send_json(&json!({
        "type": "http", "id": "1", "method": "GET", "path": "/slow?ms=1000", "headers": {}
    }))
    .await;
    wait_until("the slow request reaches the upstream", DEADLINE, || {
        upstream.requests() == 1
    })
    .await;
    let drained_at = Instant::now();
    old.send_json(&json!({"type": "drain"})).await;

    // Make before break: the new tunnel opens at once, while the exchange is
    // still in flight on the old one.
    let _new = stub.next_tunnel().await;
    let opened = drained_at.elapsed();
    eprintln!("measured: opened = {opened:?}");
    assert!(
        opened < DRAIN_RECONNECT_BOUND,
        "new tunnel {opened:?} after drain"
    );
    let response = loop {
        match old.try_recv(DEADLINE).await {
            Some(Ok(msg)) if msg_type(&msg) == "http:response" => break msg,
            Some(Ok(_)) => {}
            other => {
                panic!("the old tunnel ended before answering the in-flight exchange: {other:?}")
            }
        }
    };
    assert_eq!(response["id"], "1");
    assert_eq!(response["status"], 200);
    assert_eq!(response["body"], "slow done");
}

#[tokio::test]
async fn close_1001_is_not_a_drain_and_waits_normal_backoff() {
    let mut stub = StubRelay::accepting().await;
    // Backoff for the first retry: jitter [0.5, 1.0] × 2 s = 1 s to 2 s.
    let agent = agent_for_stub(&stub, "h1")
        .backoff_base("2s")
        .backoff_cap("10s")
        .spawn();
    let mut first = live_stub_tunnel(&mut stub, &agent, 1).await;

    let closed_at = Instant::now();
    first.close(1001).await;
    let attempts = stub.wait_attempts(2, DEADLINE).await;
    let gap = attempts[1].at - closed_at;
    eprintln!("measured: gap = {gap:?}");

    assert!(
        gap >= Duration::from_secs(1),
        "reconnected {gap:?} after a ping-timeout close: a mass 1001 must not cause a \
         thundering herd"
    );
}

#[tokio::test]
async fn close_4002_replaced_backs_off_and_warns() {
    let mut stub = StubRelay::accepting().await;
    let agent = agent_for_stub(&stub, "h1")
        .backoff_base("100ms")
        .backoff_cap("2s")
        .spawn();
    let mut first = live_stub_tunnel(&mut stub, &agent, 1).await;

    let closed_at = Instant::now();
    first.close(4002).await;
    let attempts = stub.wait_attempts(2, DEADLINE).await;
    let gap = attempts[1].at - closed_at;
    eprintln!("measured: gap = {gap:?}");

    assert!(
        gap >= Duration::from_secs(1),
        "reconnected {gap:?} after being replaced: the agent waits the cap (2 s, at least half \
         of it with jitter), not the 100 ms base"
    );
    assert!(
        agent
            .logs()
            .iter()
            .any(|line| line.contains("WARN")
                && (line.contains("4002") || line.contains("replaced"))),
        "a WARN line says the tunnel was replaced; logs:\n{}",
        agent.logs().join("\n")
    );
}

/// The stub refuses every upgrade with `status` and `retry_after`; the agent's
/// own backoff is tiny, so only Retry-After can explain the gap.
async fn gap_between_refused_attempts(status: u16, retry_after: &str, extra: &[&str]) -> Duration {
    let stub = StubRelay::refusing(status, &[("retry-after", retry_after)]).await;
    let mut builder = agent_for_stub(&stub, "h1")
        .backoff_base("100ms")
        .backoff_cap("200ms");
    for pair in extra.chunks(2) {
        builder = builder.arg(pair[0], pair[1]);
    }
    let _agent = builder.spawn();
    let attempts = stub.wait_attempts(2, DEADLINE).await;
    attempts[1].at - attempts[0].at
}

#[tokio::test]
async fn http_429_with_retry_after_2_delays_next_attempt_at_least_2_seconds() {
    let gap = gap_between_refused_attempts(429, "2", &[]).await;
    eprintln!("measured: gap = {gap:?}");
    assert!(
        gap >= Duration::from_secs(2),
        "second attempt {gap:?} after a 429 with Retry-After: 2"
    );
    assert!(
        gap < Duration::from_secs(2) + SLACK * 2,
        "second attempt {gap:?} after a 429 with Retry-After: 2: waited far too long"
    );
}

#[tokio::test]
async fn http_503_with_retry_after_2_delays_next_attempt_at_least_2_seconds() {
    let gap = gap_between_refused_attempts(503, "2", &[]).await;
    eprintln!("measured: gap = {gap:?}");
    assert!(
        gap >= Duration::from_secs(2),
        "second attempt {gap:?} after a 503 with Retry-After: 2"
    );
    assert!(
        gap < Duration::from_secs(2) + SLACK * 2,
        "second attempt {gap:?} after a 503 with Retry-After: 2: waited far too long"
    );
}

#[tokio::test]
async fn retry_after_as_http_date_is_honoured() {
    // Three whole seconds after the current second: at least 2 s from now.
    let date = http_date(unix_now_secs() + 3);
    let gap = gap_between_refused_attempts(429, &date, &[]).await;
    eprintln!("measured: gap = {gap:?}");
    assert!(
        gap >= Duration::from_millis(1_900),
        "second attempt {gap:?} after a 429 with Retry-After: {date}"
    );
    assert!(gap < Duration::from_secs(3) + SLACK * 2, "waited {gap:?}");
}

#[tokio::test]
async fn retry_after_is_clamped_by_max_retry_after() {
    let gap = gap_between_refused_attempts(429, "3600", &["--max-retry-after", "1s"]).await;
    eprintln!("measured: gap = {gap:?}");
    assert!(
        gap < Duration::from_secs(1) + SLACK * 2,
        "Retry-After: 3600 with --max-retry-after 1s waited {gap:?}"
    );
}

#[tokio::test]
async fn http_503_retry_after_0_moves_to_next_relay_at_once() {
    let draining = StubRelay::refusing(503, &[("retry-after", "0")]).await;
    let other = StubRelay::accepting().await;
    // A backoff of its own would be 1 s to 2 s.
    let _agent = TestAgent::builder("h1")
        .relay(&draining.url())
        .relay(&other.url())
        .v1()
        .token(&Claims::host("h1").sign(TEST_SECRET))
        .to(&down_upstream().1)
        .backoff_base("2s")
        .backoff_cap("10s")
        .spawn();

    let refused = draining.wait_attempts(1, DEADLINE).await;
    let moved = other.wait_attempts(1, DEADLINE).await;
    let gap = moved[0].at - refused[0].at;
    eprintln!("measured: gap = {gap:?}");
    assert!(
        gap < Duration::from_secs(1),
        "503 Retry-After: 0 means try another relay now; the next relay saw the agent {gap:?} \
         later"
    );
}

#[tokio::test]
async fn agent_rotates_to_next_relay_url_after_a_failure() {
    let (_, nothing_there) = down_upstream();
    let other = StubRelay::accepting().await;
    let _agent = TestAgent::builder("h1")
        .relay(&nothing_there.replace("http://", "ws://"))
        .relay(&other.url())
        .token(&Claims::host("h1").sign(TEST_SECRET))
        .to(&down_upstream().1)
        .backoff_base("200ms")
        .backoff_cap("1s")
        .spawn();

    let attempts = other.wait_attempts(1, DEADLINE).await;
    assert_eq!(attempts[0].path(), "/tunnel");
}

#[tokio::test]
async fn inbound_silence_makes_agent_abandon_tunnel_and_reconnect_after_timeout() {
    let silence = Duration::from_secs(1);
    let mut stub = StubRelay::accepting().await;
    let _agent = agent_for_stub(&stub, "h1")
        .silence_timeout("1s")
        .backoff_base("200ms")
        .backoff_cap("1s")
        .spawn();
    let mut first = stub.next_tunnel().await;
    // The stub never sends a frame on `first`.

    let attempts = stub.wait_attempts(2, DEADLINE).await;
    let gap = attempts[1].at - first.accepted_at;
    eprintln!("measured: gap = {gap:?}");

    assert!(
        gap >= silence,
        "the agent gave up on a silent tunnel after {gap:?}, before --silence-timeout 1s"
    );
    assert!(
        gap < silence + Duration::from_millis(200) + SLACK * 2,
        "the agent reconnected {gap:?} after the silent tunnel opened: silence 1 s + backoff \
         at most 200 ms"
    );
    // The abandoned socket is closed (or dropped), not left open.
    let end = first.ended(DEADLINE).await;
    assert!(
        matches!(end, WsEnd::Close(_) | WsEnd::Dropped(_)),
        "abandoned tunnel: {end:?}"
    );
}

// ---------------------------------------------------------------------------
// Credentials
// ---------------------------------------------------------------------------

#[tokio::test]
async fn rotated_token_file_is_used_on_next_attempt_and_host_registers() {
    let relay = TestRelay::spawn().await;
    let upstream = Upstream::spawn().await;
    let file = TokenFile::new(&format!("{}\n", relay.host_token("someone-else")));
    let agent = TestAgent::builder("h1")
        .relay(&relay.ws_url(""))
        .token_file(file.path())
        .upstream(&upstream)
        .backoff_base("200ms")
        .auth_backoff_cap("1s")
        .spawn();
    relay.wait_for_log("tunnel refused", DEADLINE).await;

    file.write(&format!("  {}\n", relay.host_token("h1")));
    let rotated_at = Instant::now();
    agent.wait_connected_to(&relay).await;
    let took = rotated_at.elapsed();
    eprintln!("measured: took = {took:?}");

    assert!(
        took < Duration::from_secs(1) + SLACK,
        "registered {took:?} after the token file changed (--auth-backoff-cap 1s)"
    );
    agent.wait_registered(1).await;
}

#[tokio::test]
async fn auth_failure_is_logged_at_error_with_token_file_path_and_never_the_token() {
    let relay = TestRelay::spawn().await;
    let wrong = relay.host_token("someone-else");
    let file = TokenFile::new(&wrong);
    let path = file.path().display().to_string();
    let agent = TestAgent::builder("h1")
        .relay(&relay.ws_url(""))
        .token_file(file.path())
        .to(&down_upstream().1)
        .backoff_base("100ms")
        .auth_backoff_cap("300ms")
        .rust_log("debug")
        .spawn();

    wait_until(
        "the agent logs an ERROR line naming the token file",
        DEADLINE,
        || {
            agent
                .logs()
                .iter()
                .any(|line| line.contains("ERROR") && line.contains(&path))
        },
    )
    .await;
    // A few more refused attempts, so retries are logged too (the relay counts every
    // refusal but logs them as a summary).
    relay_tests::wait_until_async("the relay refuses the agent 3 times", DEADLINE, || async {
        relay
            .counter("relay_auth_failures_total", &[("endpoint", "tunnel")])
            .await
            >= 3.0
    })
    .await;

    assert_token_absent(&agent, &wrong);
}

#[tokio::test]
async fn token_never_appears_in_agent_logs_even_at_debug_level() {
    let mut relay = TestRelay::spawn().await;
    let port = relay.addr().port();
    let upstream = Upstream::spawn().await;
    let token = relay.host_token("h1");
    let agent = TestAgent::for_relay(&relay, "h1", &upstream)
        .backoff_base("100ms")
        .backoff_cap("300ms")
        .rust_log("debug")
        .spawn();
    agent.wait_connected_to(&relay).await;
    relay
        .http()
        .get(host_url(&relay, "h1", "/echo/x"))
        .bearer(&relay.client_token(&["h1"]))
        .send()
        .await
        .assert_status(200);
    // A reconnect: connect errors and retries are logged too.
    relay.kill().await;
    agent
        .wait_for_log_count(RECONNECTING_LINE, 2, DEADLINE)
        .await;
    let relay = TestRelay::builder().port(port).spawn().await;
    agent.wait_connected_to(&relay).await;

    assert_token_absent(&agent, &token);
}

/// Fails if any agent output line contains `token` or its signature.
fn assert_token_absent(agent: &TestAgent, token: &str) {
    let signature = token.rsplit('.').next().expect("a JWT has a signature");
    let leaks: Vec<String> = agent
        .logs()
        .into_iter()
        .filter(|line| line.contains(token) || line.contains(signature))
        .collect();
    assert!(
        leaks.is_empty(),
        "the token leaked into the agent's logs:\n{}",
        leaks.join("\n")
    );
}

// ---------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------

/// Starts an agent on a stub, sends `signal`, returns the close code the
/// stub saw and the exit status.
async fn close_code_and_exit_on(signal: &str) -> (WsEnd, std::process::ExitStatus, Duration) {
    let mut stub = StubRelay::accepting().await;
    let mut agent = agent_for_stub(&stub, "h1").spawn();
    let mut tunnel = live_stub_tunnel(&mut stub, &agent, 1).await;

    let signalled_at = Instant::now();
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &agent.pid().to_string()])
        .status()
        .expect("run `kill`");
    assert!(status.success());
    let end = tunnel.ended(DEADLINE).await;
    let status = agent.wait_exit(DEADLINE).await;
    (end, status, signalled_at.elapsed())
}

#[tokio::test]
async fn sigterm_closes_tunnel_with_1000_and_exits_0() {
    let (end, status, took) = close_code_and_exit_on("TERM").await;
    assert_eq!(end, WsEnd::Close(1000), "the tunnel is closed with 1000");
    assert_eq!(status.code(), Some(0), "SIGTERM exits 0, got {status}");
    assert!(took < Duration::from_secs(3), "shutdown took {took:?}");
}

#[tokio::test]
async fn sigint_closes_tunnel_with_1000_and_exits_0() {
    let (end, status, _) = close_code_and_exit_on("INT").await;
    assert_eq!(end, WsEnd::Close(1000), "the tunnel is closed with 1000");
    assert_eq!(status.code(), Some(0), "SIGINT exits 0, got {status}");
}

#[tokio::test]
async fn sigterm_unregisters_host_from_real_relay_at_once() {
    let (relay, _upstream, mut agent) = relay_with_agent("h1").await;
    agent.send_sigterm();
    let status = agent.wait_exit(DEADLINE).await;
    assert_eq!(status.code(), Some(0), "SIGTERM exits 0, got {status}");
    relay.wait_host_disconnected("h1").await;
    let closed = relay.wait_for_log("tunnel closed", DEADLINE).await;
    assert!(
        closed.contains("host_closed"),
        "the relay saw the host close the tunnel: {closed}"
    );
}

#[tokio::test]
async fn status_endpoint_shows_connected_then_failures_while_relay_is_down() {
    let mut relay = TestRelay::spawn().await;
    let upstream = Upstream::spawn().await;
    let status_addr: SocketAddr = ([127, 0, 0, 1], unused_port()).into();
    let agent = TestAgent::builder("h1")
        .relay(&relay.http_url("")) // the http:// form maps to ws://
        .token(&relay.host_token("h1"))
        .upstream(&upstream)
        .status_addr(status_addr)
        .backoff_base("200ms")
        .backoff_cap("1s")
        .spawn();
    let relay_addr = relay.addr().to_string();

    let up = agent
        .wait_status("state connected", |s| s["state"] == "connected")
        .await;
    assert!(
        up["relay"]
            .as_str()
            .is_some_and(|r| r.contains(&relay_addr)),
        "status names the relay {relay_addr}: {up}"
    );
    assert_eq!(up["consecutive_failures"], 0, "{up}");
    agent.wait_connected_to(&relay).await;
    // The root path serves the same document.
    let root = relay
        .http()
        .get(format!("http://{status_addr}/"))
        .send()
        .await;
    root.assert_status(200);
    assert_eq!(root.json()["state"], "connected");

    relay.kill().await;
    let down = agent
        .wait_status("failures and a last error", |s| {
            s["consecutive_failures"].as_u64().unwrap_or(0) >= 2 && s["last_error"].is_string()
        })
        .await;
    let state = down["state"].as_str().unwrap_or_default();
    assert!(
        ["backing_off", "connecting"].contains(&state),
        "state while the relay is down: {down}"
    );
    assert!(
        !down["last_error"].as_str().unwrap_or_default().is_empty(),
        "last_error explains the failure: {down}"
    );
    assert!(
        down["relay"]
            .as_str()
            .is_some_and(|r| r.contains(&relay_addr)),
        "status names the relay being tried: {down}"
    );
}

#[tokio::test]
async fn invalid_agent_flags_exit_64() {
    let token_env = [("RELAY_TOKEN", "t")];
    let cases: [(&str, Vec<&str>); 5] = [
        (
            "missing --relay",
            vec!["agent", "--host-id", "h1", "--to", "http://127.0.0.1:1"],
        ),
        (
            "bad relay scheme",
            vec![
                "agent",
                "--relay",
                "ftp://x",
                "--host-id",
                "h1",
                "--to",
                "http://127.0.0.1:1",
            ],
        ),
        (
            "bad host id",
            vec![
                "agent",
                "--relay",
                "ws://127.0.0.1:1",
                "--host-id",
                "no spaces",
                "--to",
                "http://127.0.0.1:1",
            ],
        ),
        (
            "bad duration",
            vec![
                "agent",
                "--relay",
                "ws://127.0.0.1:1",
                "--host-id",
                "h1",
                "--to",
                "http://127.0.0.1:1",
                "--backoff-base",
                "soon",
            ],
        ),
        (
            "missing --to",
            vec!["agent", "--relay", "ws://127.0.0.1:1", "--host-id", "h1"],
        ),
    ];
    for (what, args) in cases {
        let out = within(what, DEADLINE, run_relay_cli(&args, &token_env)).await;
        assert_eq!(
            out.code,
            Some(64),
            "{what}: expected exit 64; stderr:\n{}",
            out.stderr
        );
        assert!(!out.stderr.trim().is_empty(), "{what}: a message on stderr");
    }

    // Neither a token nor a token file.
    let out = run_relay_cli(
        &[
            "agent",
            "--relay",
            "ws://127.0.0.1:1",
            "--host-id",
            "h1",
            "--to",
            "http://127.0.0.1:1",
        ],
        &[],
    )
    .await;
    assert_eq!(out.code, Some(64), "no credential; stderr:\n{}", out.stderr);
    assert!(
        out.stderr
            .contains("--token-file (RELAY_TOKEN_FILE) or --token (RELAY_TOKEN)"),
        "the message names the flags and their variables: {}",
        out.stderr
    );
}

#[tokio::test]
async fn the_agent_prints_one_line_with_its_public_url_and_protocol_when_registered() {
    let (relay, _upstream, agent) = relay_with_agent("announce-1").await;
    let line = agent.wait_for_log("is reachable at", DEADLINE).await;
    let expected = format!(
        "relay agent: announce-1 is reachable at {} (tunnel protocol h2, to http://",
        relay.http_url("/hosts/announce-1/")
    );
    assert!(line.starts_with(&expected), "{line}");
    // The URL it prints works.
    let response = relay
        .http()
        .get(relay.http_url("/hosts/announce-1/echo"))
        .bearer(&relay.client_token(&["announce-1"]))
        .send()
        .await;
    assert_eq!(response.status, 200);
    assert_eq!(
        agent.log_count("is reachable at"),
        1,
        "one line, not one per ping"
    );
}

#[tokio::test]
async fn with_subdomains_the_agent_prints_its_hosts_own_name_too() {
    let relay = TestRelay::builder()
        .arg("--base-domain", "relay.test")
        .spawn()
        .await;
    let upstream = Upstream::spawn().await;
    let agent = TestAgent::for_relay(&relay, "sub-1", &upstream).spawn();
    let line = agent.wait_for_log("is reachable at", DEADLINE).await;
    let expected = format!(
        "relay agent: sub-1 is reachable at {} and http://sub-1.relay.test:{}/ (tunnel",
        relay.http_url("/hosts/sub-1/"),
        relay.addr().port()
    );
    assert!(line.starts_with(&expected), "{line}");
    // That name reaches it (sent as a browser would, by its Host).
    let response = relay
        .http()
        .get(relay.http_url("/echo"))
        .header("host", &format!("sub-1.relay.test:{}", relay.addr().port()))
        .bearer(&relay.client_token(&["sub-1"]))
        .send()
        .await;
    assert_eq!(response.status, 200, "{}", response.text());
}

#[tokio::test]
async fn an_agent_whose_stdout_and_stderr_are_closed_serves_on() {
    let relay = TestRelay::spawn().await;
    let upstream = Upstream::spawn().await;
    // `relay agent … | head -1`: the reader of its stdout is gone before it prints.
    let mut child = tokio::process::Command::new(relay_tests::relay_binary())
        .args([
            "agent",
            "--relay",
            &relay.ws_url(""),
            "--host-id",
            "closed-out",
            "--to",
            &format!("http://{}", upstream.addr()),
        ])
        .env("RELAY_TOKEN", relay.host_token("closed-out"))
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the agent starts");
    drop(child.stdout.take());
    drop(child.stderr.take());
    relay.wait_host_connected("closed-out").await;
    let response = relay
        .http()
        .get(relay.http_url("/hosts/closed-out/echo"))
        .bearer(&relay.client_token(&["closed-out"]))
        .send()
        .await;
    assert_eq!(response.status, 200);
    assert!(
        child.try_wait().unwrap().is_none(),
        "the agent is still running after writing to a closed stdout and stderr"
    );
}
