//! Protocol h2 end to end: negotiation, side by side with v1, WebSocket channels as
//! HTTP/2 streams, many streams on one tunnel, and hostile agents speaking broken
//! HTTP/2. Streamed bodies (large, slow, binary, cancelled, SSE, gRPC) are in
//! `tests/streaming.rs`.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use relay_tests::raw_h2::{
    DATA, END_HEADERS, HEADERS, PUSH_PROMISE, RawTunnel, frame, huge_windows,
};
use relay_tests::{
    DEADLINE, StubRelay, TestAgent, TestRelay, Upstream, WsClient, rejection_status, wait_until,
    within,
};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

const ADMIN_TOKEN: &str = "admin-token-for-h2-tests-01";

/// `GET /admin/tunnels` on `relay`, as JSON.
async fn admin_tunnels(relay: &TestRelay) -> Value {
    let response = relay
        .http()
        .get(relay.http_url("/admin/tunnels"))
        .bearer(ADMIN_TOKEN)
        .send()
        .await;
    response.assert_status(200);
    response.json()
}

/// The `protocol` of `host`'s tunnel in `/admin/tunnels`.
async fn protocol_of(relay: &TestRelay, host: &str) -> String {
    let body = admin_tunnels(relay).await;
    body["tunnels"]
        .as_array()
        .expect("tunnels is a list")
        .iter()
        .find(|t| t["hostId"] == host)
        .unwrap_or_else(|| panic!("{host} is not listed: {body}"))["protocol"]
        .as_str()
        .expect("protocol is a string")
        .to_owned()
}

async fn admin_relay() -> TestRelay {
    TestRelay::builder()
        .env("RELAY_ADMIN_TOKEN", ADMIN_TOKEN)
        .spawn()
        .await
}

#[tokio::test]
async fn agent_asks_for_h2_and_the_relay_grants_it_as_admin_metrics_and_agent_say() {
    let relay = admin_relay().await;
    let upstream = Upstream::spawn().await;
    let agent = TestAgent::for_relay(&relay, "web-h2", &upstream).spawn();
    agent.wait_connected_to(&relay).await;

    assert_eq!(protocol_of(&relay, "web-h2").await, "h2");
    assert_eq!(
        relay
            .counter("relay_tunnels_connected", &[("protocol", "h2")])
            .await,
        1.0
    );
    let registered = agent.wait_registered(1).await;
    assert!(
        registered.contains("protocol=\"h2\"") || registered.contains("protocol=h2"),
        "the agent says which protocol it speaks: {registered}"
    );

    let response = relay
        .http()
        .get(relay.http_url("/hosts/web-h2/echo/a?b=1"))
        .bearer(&relay.client_token(&["web-h2"]))
        .header("x-custom", "kept")
        .send()
        .await;
    response.assert_status(200);
    assert_eq!(response.header("x-upstream"), Some("echo"));
    let echo = response.json();
    assert_eq!(echo["path"], "/echo/a");
    assert_eq!(echo["query"], "b=1");
    assert_eq!(echo["headers"]["x-custom"], "kept");
    assert!(echo["headers"].get("authorization").is_none(), "{echo}");
    assert!(
        echo["headers"]["x-forwarded-for"]
            .as_str()
            .is_some_and(|xff| xff.contains("127.0.0.1")),
        "{echo}"
    );
}

#[tokio::test]
async fn v1_and_h2_agents_serve_side_by_side_on_one_relay() {
    let relay = admin_relay().await;
    let upstream = Upstream::spawn().await;
    let v1 = TestAgent::for_relay(&relay, "old-agent", &upstream)
        .v1()
        .spawn();
    let h2 = TestAgent::for_relay(&relay, "new-agent", &upstream).spawn();
    v1.wait_connected_to(&relay).await;
    h2.wait_connected_to(&relay).await;

    assert_eq!(protocol_of(&relay, "old-agent").await, "v1");
    assert_eq!(protocol_of(&relay, "new-agent").await, "h2");
    let token = relay.client_token(&["old-agent", "new-agent"]);
    for host in ["old-agent", "new-agent"] {
        for i in 0..5 {
            let response = relay
                .http()
                .request(
                    http::Method::POST,
                    relay.http_url(&format!("/hosts/{host}/echo/{i}")),
                )
                .bearer(&token)
                .body(format!("body {i} for {host}"))
                .send()
                .await;
            response.assert_status(200);
            assert_eq!(response.json()["body"], format!("body {i} for {host}"));
        }
    }
    // A binary body: v1 cannot carry it (415), h2 can.
    let binary = Bytes::from_static(&[0xff, 0xfe, 0x00, 0x01]);
    let over_v1 = relay
        .http()
        .request(http::Method::POST, relay.http_url("/hosts/old-agent/echo"))
        .bearer(&token)
        .body(binary.clone())
        .send()
        .await;
    over_v1.assert_status(415);
    let over_h2 = relay
        .http()
        .request(http::Method::POST, relay.http_url("/hosts/new-agent/echo"))
        .bearer(&token)
        .body(binary)
        .send()
        .await;
    over_h2.assert_status(200);
}

#[tokio::test]
async fn auto_agent_falls_back_to_v1_on_a_relay_without_h2_and_remembers_it() {
    let mut stub = StubRelay::accepting().await;
    let agent = TestAgent::builder("h1")
        .relay(&stub.url())
        .token("not-checked-by-the-stub")
        .to("http://127.0.0.1:9")
        .backoff_base("100ms")
        .backoff_cap("200ms")
        .spawn();

    // First the agent asks for h2; the stub (a v1 relay) grants nothing, so the
    // handshake fails on the agent's side and it asks again for v1 at once.
    let attempts = stub.wait_attempts(2, DEADLINE).await;
    assert_eq!(attempts[0].subprotocol.as_deref(), Some("relay-h2"));
    assert_eq!(attempts[1].subprotocol, None);
    let _dropped = stub.next_tunnel().await;
    let mut tunnel = stub.next_tunnel().await;
    tunnel.send_json(&serde_json::json!({"type": "ping"})).await;
    assert!(
        matches!(tunnel.try_recv(DEADLINE).await, Some(Ok(msg)) if msg["type"] == "pong"),
        "the v1 tunnel answers pings"
    );
    let registered = agent.wait_registered(1).await;
    assert!(registered.contains("v1"), "{registered}");

    // The relay ends the tunnel: the next attempt asks for v1 straight away.
    tunnel.close(1001).await;
    let attempts = stub.wait_attempts(3, DEADLINE).await;
    assert_eq!(
        attempts[2].subprotocol, None,
        "a relay found without h2 is asked for v1 from then on"
    );
}

#[tokio::test]
async fn agent_with_protocol_h2_refuses_a_relay_without_h2_and_keeps_trying() {
    let stub = StubRelay::accepting().await;
    let agent = TestAgent::builder("h1")
        .relay(&stub.url())
        .token("not-checked-by-the-stub")
        .to("http://127.0.0.1:9")
        .protocol("h2")
        .backoff_base("100ms")
        .backoff_cap("200ms")
        .spawn();
    let attempts = stub.wait_attempts(3, DEADLINE).await;
    assert!(
        attempts
            .iter()
            .all(|a| a.subprotocol.as_deref() == Some("relay-h2")),
        "every attempt asks for h2: {attempts:?}"
    );
    agent
        .wait_for_log_count("does not offer protocol h2", 1, DEADLINE)
        .await;
    assert_eq!(agent.registered_count(), 0);
}

#[tokio::test]
async fn websocket_over_h2_carries_text_binary_close_codes_and_the_chosen_subprotocol() {
    let relay = TestRelay::spawn().await;
    let upstream = Upstream::spawn().await;
    let agent = TestAgent::for_relay(&relay, "ws-h2", &upstream)
        .protocol("h2")
        .spawn();
    agent.wait_connected_to(&relay).await;
    let token = relay.client_token(&["ws-h2"]);
    let url = relay.ws_url("/hosts/ws-h2/ws/echo");

    // The local service picks among what the client offers; the client hears its pick.
    let (mut ws, chosen) = WsClient::connect_with_protocols(&url, Some(&token), &["chat.v1"])
        .await
        .expect("the channel opens");
    assert_eq!(chosen.as_deref(), Some("chat.v1"));
    ws.send_text("protocol?").await;
    assert_eq!(ws.recv_text().await, "chat.v1");
    ws.send_text("héllo").await;
    assert_eq!(ws.recv_text().await, "héllo");
    let binary: Vec<u8> = (0..=255u8).collect();
    ws.send_binary(&binary).await;
    assert_eq!(ws.recv_data().await, Message::Binary(binary.into()));
    // The local service closes with its code: the client gets it.
    ws.send_text("close:4321").await;
    assert_eq!(ws.recv_close_code(DEADLINE).await, 4321);

    // No subprotocol offered: none chosen.
    let (mut ws, chosen) = WsClient::connect_with_protocols(&url, Some(&token), &[])
        .await
        .expect("the channel opens");
    assert_eq!(chosen, None);
    ws.send_text("protocol?").await;
    assert_eq!(ws.recv_text().await, "none");

    // The client closes with its code: the local service gets it.
    let before = upstream.ws_close_codes().len();
    ws.close(4007).await;
    wait_until(
        "the local service sees the client's close",
        DEADLINE,
        || upstream.ws_close_codes().len() > before,
    )
    .await;
    assert_eq!(upstream.ws_close_codes()[before], 4007);
}

#[tokio::test]
async fn websocket_refused_by_the_local_service_reaches_the_client_as_its_status() {
    let relay = TestRelay::spawn().await;
    let upstream = Upstream::spawn().await;
    let agent = TestAgent::for_relay(&relay, "ws-h2", &upstream)
        .protocol("h2")
        .spawn();
    agent.wait_connected_to(&relay).await;
    let err = WsClient::connect(
        &relay.ws_url("/hosts/ws-h2/no/such/socket"),
        Some(&relay.client_token(&["ws-h2"])),
    )
    .await
    .err()
    .expect("the upgrade is refused");
    assert_eq!(rejection_status(&err), Some(404), "{err}");
}

/// RSS of a process in KiB, from /proc.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

#[tokio::test]
async fn a_websocket_client_that_stops_reading_holds_back_its_sender_instead_of_being_closed() {
    // 160 messages of 1 MiB: far more than every buffer on the way together.
    const MESSAGES: usize = 160;
    const SIZE: usize = 1024 * 1024;
    let relay = TestRelay::spawn().await;
    let upstream = Upstream::spawn().await;
    let agent = TestAgent::for_relay(&relay, "flood", &upstream)
        .protocol("h2")
        .spawn();
    agent.wait_connected_to(&relay).await;
    let rss_before = rss_kib(relay.pid());

    let mut ws = WsClient::connect_ok(
        &relay.ws_url(&format!("/hosts/flood/ws/flood?n={MESSAGES}&size={SIZE}")),
        Some(&relay.client_token(&["flood"])),
    )
    .await;
    // The client reads nothing: the local service must stall well before the end, held
    // back by flow control (v1 would have closed the channel with 1013 instead).
    wait_until("the local service starts sending", DEADLINE, || {
        upstream.flood_sent() > 0
    })
    .await;
    let mut stalled_at = upstream.flood_sent();
    within("the local service stalls", DEADLINE, async {
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let now = upstream.flood_sent();
            if now == stalled_at {
                break;
            }
            stalled_at = now;
        }
    })
    .await;
    assert!(
        stalled_at < MESSAGES / 2,
        "the local service sent {stalled_at} of {MESSAGES} MiB to a client that reads nothing"
    );
    let grown = rss_kib(relay.pid()).saturating_sub(rss_before);
    assert!(
        grown < 64 * 1024,
        "the relay holds {grown} KiB for a client that reads nothing"
    );

    // Now the client reads everything, in order, and nothing was lost or closed.
    for k in 0..MESSAGES {
        match ws.recv(DEADLINE).await {
            Ok(Message::Binary(data)) => {
                assert_eq!(data.len(), SIZE);
                assert_eq!(data[0], (k % 251) as u8, "message {k} in order");
                assert_eq!(data[SIZE - 1], ((k + SIZE - 1) % 251) as u8);
            }
            other => panic!("message {k}: expected binary data, got {other:?}"),
        }
    }
    assert_eq!(ws.recv_text().await, "done");
}

#[tokio::test]
async fn a_thousand_concurrent_streams_share_one_tunnel() {
    const STREAMS: usize = 1_000;
    // A thousand clients from one address (the test's): the per-address connection
    // limit (1,000, the tunnel included) is not what this test is about.
    let relay = TestRelay::builder()
        .env("RELAY_MAX_CONNECTIONS_PER_IP", "0")
        .spawn()
        .await;
    let upstream = Upstream::spawn().await;
    let agent = TestAgent::for_relay(&relay, "busy", &upstream)
        .protocol("h2")
        .spawn();
    agent.wait_connected_to(&relay).await;
    let token = relay.client_token(&["busy"]);
    let url = relay.http_url("/hosts/busy/slow?ms=1500");

    // Every request is held 1.5 s by the local service, so all of them are in flight
    // on the tunnel at once.
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..STREAMS {
        let client = relay_tests::HttpClient::new();
        let (url, token) = (url.clone(), token.clone());
        requests.spawn(async move {
            client
                .get(url)
                .bearer(&token)
                .timeout(Duration::from_secs(60))
                .try_send()
                .await
        });
    }
    let mut ok = 0;
    while let Some(joined) = requests.join_next().await {
        match joined.expect("request task") {
            Ok(response) if response.status == 200 && response.text() == "slow done" => ok += 1,
            Ok(response) => panic!("status {}: {}", response.status, response.text()),
            Err(err) => panic!("request failed: {err}"),
        }
    }
    assert_eq!(ok, STREAMS);
    assert_eq!(upstream.requests(), STREAMS);
}

// ---------------------------------------------------------------------------
// Hostile agents: broken HTTP/2 cannot take the relay down
// ---------------------------------------------------------------------------

/// A tunnel that asked for (and got) h2, with the HTTP/2 handshake done by hand.
async fn hostile_agent(relay: &TestRelay, host: &str) -> RawTunnel {
    relay_tests::raw_h2::agent(
        &relay.ws_url(&format!("/tunnel?hostId={host}")),
        &relay.host_token(host),
    )
    .await
}

/// Reads from a hostile tunnel until the relay closes it; returns the bytes seen.
async fn read_until_closed(ws: &mut RawTunnel) -> Vec<u8> {
    let mut seen = Vec::new();
    within("the relay closes the broken tunnel", DEADLINE, async {
        while let Some(Ok(message)) = ws.next().await {
            match message {
                Message::Binary(data) => seen.extend_from_slice(&data),
                Message::Close(_) => break,
                _ => {}
            }
        }
    })
    .await;
    seen
}

/// A host whose tunnel is healthy, to show the relay kept serving everyone else.
async fn assert_relay_still_serves(relay: &TestRelay, upstream: &Upstream) {
    let agent = TestAgent::for_relay(relay, "healthy", upstream).spawn();
    agent.wait_connected_to(relay).await;
    relay
        .http()
        .get(relay.http_url("/hosts/healthy/echo"))
        .bearer(&relay.client_token(&["healthy"]))
        .send()
        .await
        .assert_status(200);
    relay
        .http()
        .get(relay.http_url("/health"))
        .send()
        .await
        .assert_status(200);
}

/// An h2 tunnel whose agent sends `bytes` is closed; the relay serves everyone else.
async fn broken_http2_closes_that_tunnel_only(host: &str, bytes: Vec<u8>) {
    let relay = TestRelay::spawn().await;
    let upstream = Upstream::spawn().await;
    let mut ws = hostile_agent(&relay, host).await;
    relay.wait_host_connected(host).await;
    ws.send(Message::Binary(bytes.into())).await.unwrap();
    let _ = read_until_closed(&mut ws).await;
    relay.wait_host_disconnected(host).await;
    assert_relay_still_serves(&relay, &upstream).await;
}

#[tokio::test]
async fn garbage_on_an_h2_tunnel_closes_that_tunnel_only() {
    // A frame header announcing 16 MiB of an unknown type: over any frame size.
    broken_http2_closes_that_tunnel_only("garbage", vec![0xff; 32]).await;
}

#[tokio::test]
async fn a_push_promise_from_the_agent_closes_the_tunnel() {
    // Push is disabled by the relay: a PUSH_PROMISE is a connection error.
    let push = frame(PUSH_PROMISE, END_HEADERS, 1, &[0, 0, 0, 2, 0x82]);
    broken_http2_closes_that_tunnel_only("pusher", push).await;
}

#[tokio::test]
async fn an_agent_sending_past_the_window_gets_its_stream_reset_and_costs_the_relay_little() {
    let relay = TestRelay::spawn().await;
    let upstream = Upstream::spawn().await;
    let mut ws = hostile_agent(&relay, "flooder").await;
    relay.wait_host_connected("flooder").await;
    let rss_before = rss_kib(relay.pid());

    // A client asks for something and never reads the body.
    let url = relay.http_url("/hosts/flooder/big");
    let token = relay.client_token(&["flooder"]);
    let stalled_client = tokio::spawn(async move {
        let stream = tokio::net::TcpStream::connect(
            url.trim_start_matches("http://").split('/').next().unwrap(),
        )
        .await
        .unwrap();
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let request = http::Request::get(url)
            .header("authorization", format!("Bearer {token}"))
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let response = send.send_request(request).await;
        // Hold the response without reading it, until the test ends.
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(response);
    });

    // The relay's request arrives as HEADERS on stream 1; answer 200, then 32 MiB of
    // DATA regardless of any window (the relay allows 1 MiB per stream).
    within("the relay's request reaches the agent", DEADLINE, async {
        let mut seen = Vec::new();
        loop {
            match ws.next().await {
                Some(Ok(Message::Binary(data))) => {
                    seen.extend_from_slice(&data);
                    // Any HEADERS frame on stream 1 will do.
                    if seen
                        .windows(9)
                        .any(|h| h[3] == HEADERS && h[5..9] == [0, 0, 0, 1])
                    {
                        break;
                    }
                }
                Some(Ok(_)) => {}
                other => panic!("tunnel ended: {other:?}"),
            }
        }
    })
    .await;
    ws.send(Message::Binary(
        frame(HEADERS, END_HEADERS, 1, &[0x88]).into(),
    ))
    .await
    .unwrap();
    let chunk = vec![b'x'; 16 * 1024];
    for _ in 0..(32 * 64) {
        let data = frame(DATA, 0, 1, &chunk);
        if ws.send(Message::Binary(data.into())).await.is_err() {
            break;
        }
    }
    let grown = rss_kib(relay.pid()).saturating_sub(rss_before);
    assert!(
        grown < 24 * 1024,
        "an agent ignoring flow control made the relay hold {grown} KiB"
    );
    stalled_client.abort();
    assert_relay_still_serves(&relay, &upstream).await;
}

#[tokio::test]
async fn uploads_to_an_agent_that_opens_huge_windows_and_stops_reading_wait_within_the_tunnel_budget()
 {
    const UPLOADS: usize = 96;
    const EACH: usize = 2 * 1024 * 1024;
    const TUNNEL_BUDGET: usize = 4 * 1024 * 1024;
    let relay = TestRelay::builder()
        .env("RELAY_TUNNEL_BUDGET", &TUNNEL_BUDGET.to_string())
        .spawn()
        .await;
    let upstream = Upstream::spawn().await;
    // The agent lets the relay send 2 GiB on every stream and on the connection, then
    // reads nothing more: HTTP/2's flow control holds nothing back, so only the relay's
    // own accounting does.
    let mut ws = hostile_agent(&relay, "sponge").await;
    ws.send(Message::Binary(huge_windows().into()))
        .await
        .unwrap();
    relay.wait_host_connected("sponge").await;
    let rss_before = rss_kib(relay.pid());

    let token = relay.client_token(&["sponge"]);
    let mut uploads = Vec::new();
    for _ in 0..UPLOADS {
        let addr = relay.addr();
        let token = token.clone();
        uploads.push(tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let head = format!(
                "POST /hosts/sponge/upload HTTP/1.1\r\nHost: relay\r\n\
                 Authorization: Bearer {token}\r\nContent-Length: {EACH}\r\n\r\n"
            );
            stream.write_all(head.as_bytes()).await.unwrap();
            let _ = stream.write_all(&vec![b'u'; EACH]).await;
            std::future::pending::<()>().await;
        }));
    }

    // What the relay handed HTTP/2 and the tunnel's socket has not taken reaches the
    // tunnel's budget (on top of the 8 MiB window the connection reserves)...
    let in_use = || async { relay.counter("relay_budget_bytes_in_use", &[]).await };
    let full = (8 * 1024 * 1024 + TUNNEL_BUDGET - 256 * 1024) as f64;
    relay_tests::wait_until_async("the tunnel's budget fills", DEADLINE, || async {
        in_use().await >= full
    })
    .await;
    // ...and stops there: the uploads wait, unread, in their clients' sockets.
    for _ in 0..5 {
        let now = in_use().await;
        assert!(
            now <= (8 * 1024 * 1024 + TUNNEL_BUDGET) as f64,
            "{now} bytes charged"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // 192 MiB offered: before the relay charged what it hands HTTP/2, it took them all
    // (121 MiB for half as many). Now the growth is the tunnel's 4 MiB and what passing
    // the socket's buffers' worth through the relay costs once (~25 MiB here, as for 8
    // uploads: it does not grow with them).
    let grown = rss_kib(relay.pid()).saturating_sub(rss_before);
    assert!(
        grown < 48 * 1024,
        "{UPLOADS} uploads of {EACH} bytes to a stalled agent grew the relay {grown} KiB"
    );
    drop(ws);
    for upload in uploads {
        upload.abort();
    }
    assert_relay_still_serves(&relay, &upstream).await;
}

#[tokio::test]
async fn expect_100_continue_is_answered_by_the_relay_and_not_passed_on_over_either_protocol() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let relay = TestRelay::spawn().await;
    let upstream = Upstream::spawn().await;
    let v1 = TestAgent::for_relay(&relay, "exp-v1", &upstream)
        .v1()
        .spawn();
    let h2 = TestAgent::for_relay(&relay, "exp-h2", &upstream)
        .protocol("h2")
        .spawn();
    v1.wait_connected_to(&relay).await;
    h2.wait_connected_to(&relay).await;
    for host in ["exp-v1", "exp-h2"] {
        let mut socket = tokio::net::TcpStream::connect(relay.addr()).await.unwrap();
        let head = format!(
            "POST /hosts/{host}/echo HTTP/1.1\r\nhost: relay\r\nauthorization: Bearer {}\r\n\
             content-length: 5\r\nexpect: 100-continue\r\nconnection: close\r\n\r\n",
            relay.client_token(&[host])
        );
        socket.write_all(head.as_bytes()).await.unwrap();
        // The body is held back until the relay says to go on.
        let mut interim = vec![0u8; 25];
        within("100 Continue", DEADLINE, socket.read_exact(&mut interim))
            .await
            .unwrap();
        assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n", "{host}");
        socket.write_all(b"hello").await.unwrap();
        let mut response = Vec::new();
        within("the response", DEADLINE, socket.read_to_end(&mut response))
            .await
            .unwrap();
        let response = String::from_utf8_lossy(&response);
        assert!(response.starts_with("HTTP/1.1 200"), "{host}: {response}");
        let json: Value =
            serde_json::from_str(response.split("\r\n\r\n").nth(1).expect("a body").trim())
                .unwrap_or_else(|e| panic!("{host}: {e}: {response}"));
        assert_eq!(json["body"], "hello", "{host}");
        assert!(json["headers"].get("expect").is_none(), "{host}: {json}");
    }
}

#[tokio::test]
async fn a_message_over_the_h2_tunnel_limit_closes_that_tunnel_with_1009() {
    let relay = TestRelay::spawn().await;
    let upstream = Upstream::spawn().await;
    let mut ws = hostile_agent(&relay, "bloater").await;
    relay.wait_host_connected("bloater").await;
    // 2 MiB in one message: h2 tunnels take at most 128 KiB per message.
    let _ = ws
        .send(Message::Binary(vec![0u8; 2 * 1024 * 1024].into()))
        .await;
    let code = within("the relay's Close", DEADLINE, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => {}
                other => panic!("no Close frame: {other:?}"),
            }
        }
    })
    .await;
    assert_eq!(code, Some(1009));
    relay.wait_host_disconnected("bloater").await;
    let closed = relay.wait_for_log("tunnel closed", DEADLINE).await;
    assert!(closed.contains("frame_too_big"), "{closed}");
    assert_relay_still_serves(&relay, &upstream).await;
}

#[tokio::test]
async fn a_client_opening_thousands_of_http2_streams_at_once_gets_limits_not_a_fallen_relay() {
    const STREAMS: usize = 3_000;
    let relay = TestRelay::spawn().await;
    let upstream = Upstream::spawn().await;
    let agent = TestAgent::for_relay(&relay, "flooded", &upstream)
        .protocol("h2")
        .spawn();
    agent.wait_connected_to(&relay).await;
    let rss_before = rss_kib(relay.pid());
    // One h2c connection to the relay, as many streams as the client can open at once,
    // each a slow request: the relay's own HTTP/2 server bounds the streams of one
    // connection (the client waits for room), and the tunnel bounds the exchanges in
    // flight (503 beyond).
    let tcp = tokio::net::TcpStream::connect(relay.addr()).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.expect("h2c handshake");
    tokio::spawn(conn);
    let token = relay.client_token(&["flooded"]);
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..STREAMS {
        let client = client.clone();
        let request = http::Request::get(relay.http_url("/hosts/flooded/slow?ms=300"))
            .header("authorization", format!("Bearer {token}"))
            .body(())
            .unwrap();
        calls.spawn(async move {
            let client = client.ready().await.ok()?;
            let mut client = client;
            let (response, _) = client.send_request(request, true).ok()?;
            let response = response.await.ok()?;
            Some(response.status().as_u16())
        });
    }
    let mut statuses = std::collections::BTreeMap::new();
    within("every stream ends", Duration::from_secs(60), async {
        while let Some(joined) = calls.join_next().await {
            *statuses.entry(joined.unwrap()).or_insert(0usize) += 1;
        }
    })
    .await;
    let ok = statuses.get(&Some(200)).copied().unwrap_or(0);
    assert!(ok > 0, "some streams were served: {statuses:?}");
    assert!(
        statuses
            .keys()
            .all(|s| matches!(s, Some(200) | Some(503) | None)),
        "served, refused as overloaded, or refused by HTTP/2: {statuses:?}"
    );
    let grown = rss_kib(relay.pid()).saturating_sub(rss_before);
    assert!(grown < 64 * 1024, "the relay grew {grown} KiB");
    assert_relay_still_serves(&relay, &upstream).await;
}

/// `relay_h2_connections_total{event}` on `relay`.
async fn h2_connections(relay: &TestRelay, event: &str) -> f64 {
    relay
        .counter("relay_h2_connections_total", &[("event", event)])
        .await
}

#[tokio::test]
async fn an_idle_h2_tunnel_ends_its_http2_connection_and_the_next_stream_starts_another() {
    let relay = TestRelay::builder()
        .env("RELAY_H2_IDLE_CONNECTION", "200ms")
        .spawn()
        .await;
    let upstream = Upstream::spawn().await;
    let agent = TestAgent::for_relay(&relay, "web-idle", &upstream).spawn();
    agent.wait_connected_to(&relay).await;
    let token = relay.client_token(&["web-idle"]);
    // Registered, no stream yet: no HTTP/2 connection inside the tunnel.
    assert_eq!(h2_connections(&relay, "started").await, 0.0);

    let get = |path: String| {
        let relay = &relay;
        let token = &token;
        async move {
            let response = relay
                .http()
                .get(relay.http_url(&format!("/hosts/web-idle{path}")))
                .bearer(token)
                .send()
                .await;
            response.assert_status(200);
            response
        }
    };
    for round in 1..=3 {
        let echo = get(format!("/echo/{round}")).await.json();
        assert_eq!(echo["path"], format!("/echo/{round}"));
        assert_eq!(h2_connections(&relay, "started").await, f64::from(round));
        // Nothing more on it: the relay ends the connection, and the tunnel stays.
        relay
            .wait_counter(
                "relay_h2_connections_total",
                &[("event", "ended")],
                f64::from(round),
            )
            .await;
    }

    // A stream that lasts longer than the idle period keeps its connection.
    let slow = get("/slow?ms=700".into()).await;
    assert_eq!(slow.text(), "slow done");

    // A WebSocket channel on a connection started for it.
    relay
        .wait_counter("relay_h2_connections_total", &[("event", "ended")], 4.0)
        .await;
    let (mut ws, _) = WsClient::connect_with_protocols(
        &relay.ws_url("/hosts/web-idle/ws/echo"),
        Some(&token),
        &[],
    )
    .await
    .expect("the channel opens");
    ws.send_text("after a restart").await;
    assert_eq!(ws.recv_text().await, "after a restart");
    ws.close(1000).await;

    // Requests that land just before, during and after the end of a connection all
    // get their answer (gaps around the idle period).
    for gap_ms in [150, 250, 320, 400, 480, 560, 650] {
        tokio::time::sleep(Duration::from_millis(gap_ms)).await;
        let echo = get(format!("/echo/gap-{gap_ms}")).await.json();
        assert_eq!(echo["path"], format!("/echo/gap-{gap_ms}"));
    }

    // All of it on the one tunnel the agent opened.
    assert_eq!(
        relay
            .counter("relay_tunnel_registrations_total", &[("protocol", "h2")])
            .await,
        1.0
    );
    assert!(h2_connections(&relay, "started").await >= 6.0);
}
