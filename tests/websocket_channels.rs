//! WebSocket channels through the tunnel: a client WebSocket under
//! `/hosts/{hostId}/..` becomes `ws:open` / `ws:frame` / `ws:close` messages
//! on the host's tunnel, and back.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use relay_tests::{
    DEADLINE, RawHost, Stack, TestRelay, WsClient, close_code_of, msg_id, wait_until,
};
use serde_json::json;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

const IGNORED: &str = "relay_tunnel_messages_ignored_total";

/// Opens a client channel to `raw-1` and returns it with the host's view of
/// its `ws:open`.
async fn open_raw_channel(
    relay: &TestRelay,
    host: &mut RawHost,
    path_and_query: &str,
) -> (WsClient, serde_json::Value) {
    let token = relay.client_token(&["raw-1"]);
    let url = relay.ws_url(&format!("/hosts/raw-1{path_and_query}"));
    let client = WsClient::connect_ok(&url, Some(&token)).await;
    let open = host.expect("ws:open").await;
    (client, open)
}

#[tokio::test]
async fn ws_open_carries_path_and_query_without_token() {
    let relay = TestRelay::spawn().await;
    let mut host = RawHost::connect(&relay, "raw-1").await;
    let token = relay.client_token(&["raw-1"]);

    let url = relay.ws_url(&format!("/hosts/raw-1/chat/room?room=5&token={token}&x=y"));
    let _with_query = WsClient::connect_ok(&url, None).await;
    let open = host.expect("ws:open").await;
    msg_id(&open);
    assert_eq!(open["path"], "/chat/room");
    assert_eq!(open["query"], "room=5&x=y");
    assert!(
        !open.to_string().contains(&token),
        "the token reached the host: {open}"
    );

    let url = relay.ws_url(&format!("/hosts/raw-1/plain?token={token}"));
    let _token_only = WsClient::connect_ok(&url, None).await;
    let open = host.expect("ws:open").await;
    assert_eq!(open["path"], "/plain");
    assert!(
        open.get("query").is_none(),
        "an empty query is omitted: {open}"
    );
}

#[tokio::test]
async fn text_frames_travel_both_ways_as_plain_data() {
    let relay = TestRelay::spawn().await;
    let mut host = RawHost::connect(&relay, "raw-1").await;
    let (mut client, open) = open_raw_channel(&relay, &mut host, "/chat").await;
    let id = msg_id(&open);

    client.send_text("hello from client ✓").await;
    let frame = host.expect("ws:frame").await;
    assert_eq!(frame["id"], json!(id));
    assert_eq!(frame["data"], "hello from client ✓");
    assert!(
        frame.get("encoding").is_none(),
        "text frames carry no encoding: {frame}"
    );

    host.send_json(&json!({"type": "ws:frame", "id": id, "data": "hello from host"}))
        .await;
    assert_eq!(client.recv_data().await, Message::text("hello from host"));
}

#[tokio::test]
async fn binary_frames_travel_both_ways_as_base64() {
    let relay = TestRelay::spawn().await;
    let mut host = RawHost::connect(&relay, "raw-1").await;
    let (mut client, open) = open_raw_channel(&relay, &mut host, "/bin").await;
    let id = msg_id(&open);

    let up: &[u8] = &[0, 1, 2, 0x7f, 0x80, 0xfe, 0xff];
    client.send_binary(up).await;
    let frame = host.expect("ws:frame").await;
    assert_eq!(frame["id"], json!(id));
    assert_eq!(frame["encoding"], "base64");
    let data = frame["data"].as_str().expect("data is a string");
    assert_eq!(BASE64.decode(data).expect("standard base64"), up);

    let down: &[u8] = &[9, 8, 7, 0, 255];
    host.send_json(&json!({
        "type": "ws:frame",
        "id": id,
        "data": BASE64.encode(down),
        "encoding": "base64",
    }))
    .await;
    assert_eq!(client.recv_data().await, Message::binary(down.to_vec()));
}

#[tokio::test]
async fn client_close_code_reaches_host_as_ws_close() {
    let relay = TestRelay::spawn().await;
    let mut host = RawHost::connect(&relay, "raw-1").await;
    let (mut client, open) = open_raw_channel(&relay, &mut host, "/c").await;

    client.close(4321).await;

    let close = host.expect("ws:close").await;
    assert_eq!(close["id"], open["id"]);
    assert_eq!(close["code"], 4321);
}

/// What a WHATWG `WebSocket.close(code)` (superset's host client passes the code of a
/// `ws:close` to one) accepts without throwing.
fn whatwg_close_accepts(code: u64) -> bool {
    code == 1000 || (3000..=4999).contains(&code)
}

#[tokio::test]
async fn a_v1_host_is_sent_only_close_codes_a_whatwg_websocket_can_close_with() {
    let relay = TestRelay::spawn().await;
    let mut host = RawHost::connect(&relay, "raw-1").await;
    // A browser leaving a page closes with 1001; the others are what clients send on
    // errors. Each reaches the host as a code its close() takes, the original named.
    for code in [1001u16, 1002, 1003, 1007, 1008, 1011, 1000, 4000] {
        let (mut client, open) = open_raw_channel(&relay, &mut host, "/c").await;
        client.close(code).await;
        let close = host.expect("ws:close").await;
        assert_eq!(close["id"], open["id"]);
        let sent = close["code"].as_u64().expect("a code");
        assert!(
            whatwg_close_accepts(sent),
            "client code {code} reached the host as {close}, which close() rejects"
        );
        assert_eq!(close_code_of(&close), u64::from(code), "{close}");
    }
}

#[tokio::test]
async fn host_ws_close_closes_client_with_that_code() {
    let relay = TestRelay::spawn().await;
    let mut host = RawHost::connect(&relay, "raw-1").await;
    let (mut client, open) = open_raw_channel(&relay, &mut host, "/c").await;

    host.send_json(&json!({"type": "ws:close", "id": open["id"], "code": 4005}))
        .await;

    assert_eq!(client.recv_close_code(DEADLINE).await, 4005);
}

#[tokio::test]
async fn text_and_binary_echo_end_to_end_through_test_host() {
    let stack = Stack::spawn("ws-1").await;
    let mut client =
        WsClient::connect_ok(&stack.ws_url("/ws/echo"), Some(&stack.client_token())).await;

    client.send_text("first").await;
    assert_eq!(client.recv_text().await, "first");

    client.send_binary(&[1, 2, 3, 0, 255]).await;
    assert_eq!(
        client.recv_data().await,
        Message::binary(vec![1, 2, 3, 0, 255])
    );

    let big: Vec<u8> = (0..16 * 1024).map(|i| (i % 251) as u8).collect();
    client.send_binary(&big).await;
    assert_eq!(client.recv_data().await, Message::binary(big));

    client.send_text("last").await;
    assert_eq!(client.recv_text().await, "last");
    assert_eq!(stack.upstream.ws_connections(), 1);
}

#[tokio::test]
async fn client_close_code_reaches_upstream_socket() {
    let stack = Stack::spawn("ws-1").await;
    let mut client =
        WsClient::connect_ok(&stack.ws_url("/ws/echo"), Some(&stack.client_token())).await;
    client.send_text("up?").await;
    assert_eq!(client.recv_text().await, "up?");

    client.close(4321).await;

    wait_until(
        "the upstream socket receives close code 4321",
        DEADLINE,
        || stack.upstream.ws_close_codes().contains(&4321),
    )
    .await;
}

#[tokio::test]
async fn upstream_close_code_reaches_client() {
    let stack = Stack::spawn("ws-1").await;
    let mut client =
        WsClient::connect_ok(&stack.ws_url("/ws/echo"), Some(&stack.client_token())).await;
    client.send_text("still here").await;
    assert_eq!(client.recv_text().await, "still here");

    client.send_text("close:4006").await;

    assert_eq!(client.recv_close_code(DEADLINE).await, 4006);
}

#[tokio::test]
async fn channels_of_one_host_are_isolated() {
    let stack = Stack::spawn("ws-1").await;
    let token = stack.client_token();
    let mut a = WsClient::connect_ok(&stack.ws_url("/ws/echo"), Some(&token)).await;
    let mut b = WsClient::connect_ok(&stack.ws_url("/ws/echo"), Some(&token)).await;

    a.send_text("for a").await;
    b.send_text("for b").await;
    b.send_text("for b again").await;
    a.send_text("for a again").await;

    assert_eq!(a.recv_text().await, "for a");
    assert_eq!(a.recv_text().await, "for a again");
    assert_eq!(b.recv_text().await, "for b");
    assert_eq!(b.recv_text().await, "for b again");
}

#[tokio::test]
async fn tunnel_close_closes_every_client_channel_with_1001() {
    let stack = Stack::spawn("ws-1").await;
    let token = stack.client_token();
    let mut clients = Vec::new();
    for i in 0..3 {
        let mut client = WsClient::connect_ok(&stack.ws_url("/ws/echo"), Some(&token)).await;
        client.send_text(&format!("client {i}")).await;
        assert_eq!(client.recv_text().await, format!("client {i}"));
        clients.push(client);
    }

    stack.host.close(1000);

    for (i, client) in clients.iter_mut().enumerate() {
        assert_eq!(client.recv_close_code(DEADLINE).await, 1001, "client {i}");
    }
}

#[tokio::test]
async fn abrupt_tunnel_loss_closes_every_client_channel_with_1001() {
    let relay = TestRelay::spawn().await;
    let mut host = RawHost::connect(&relay, "raw-1").await;
    let mut clients = Vec::new();
    for i in 0..2 {
        let (client, _open) = open_raw_channel(&relay, &mut host, &format!("/c/{i}")).await;
        clients.push(client);
    }

    // No close frame: the TCP connection just goes away.
    drop(host);

    for (i, client) in clients.iter_mut().enumerate() {
        assert_eq!(client.recv_close_code(DEADLINE).await, 1001, "client {i}");
    }
    relay.wait_host_disconnected("raw-1").await;
}

#[tokio::test]
async fn reregistration_closes_old_tunnels_channels_with_1001() {
    let relay = TestRelay::spawn().await;
    let mut old = RawHost::connect(&relay, "raw-1").await;
    let (mut client, _open) = open_raw_channel(&relay, &mut old, "/c").await;

    let token = relay.host_token("raw-1");
    let _new = RawHost::connect_url(&relay.tunnel_url("raw-1", &token), None).await;

    assert_eq!(client.recv_close_code(DEADLINE).await, 1001);
    assert_eq!(old.recv_close_code(DEADLINE).await, 4002);
}

// ---- documented in docs/protocol.md beyond the v1 contract ----

#[tokio::test]
async fn host_ws_close_without_code_or_with_reserved_code_closes_client_without_code() {
    let relay = TestRelay::spawn().await;
    let mut host = RawHost::connect(&relay, "raw-1").await;

    let (mut no_code, open) = open_raw_channel(&relay, &mut host, "/a").await;
    host.send_json(&json!({"type": "ws:close", "id": open["id"]}))
        .await;
    assert_eq!(
        no_code.recv_close_code(DEADLINE).await,
        1005,
        "1005 = no code"
    );

    let (mut reserved, open) = open_raw_channel(&relay, &mut host, "/b").await;
    host.send_json(&json!({"type": "ws:close", "id": open["id"], "code": 1006}))
        .await;
    assert_eq!(
        reserved.recv_close_code(DEADLINE).await,
        1005,
        "1006 may not be sent"
    );
}

#[tokio::test]
async fn host_ws_close_with_an_unusable_code_closes_the_channel_with_1011_instead_of_leaving_it_open()
 {
    let relay = TestRelay::spawn().await;
    let mut host = RawHost::connect(&relay, "raw-1").await;
    for (i, code) in [json!(70000), json!(-1), json!("1000"), json!(1000.5)]
        .into_iter()
        .enumerate()
    {
        let (mut client, open) = open_raw_channel(&relay, &mut host, &format!("/bad-{i}")).await;
        host.send_json(&json!({"type": "ws:close", "id": open["id"], "code": code}))
            .await;
        assert_eq!(
            client.recv_close_code(DEADLINE).await,
            1011,
            "ws:close with code {code}"
        );
    }
    // A broken frame for a channel closes it too, rather than losing the frame.
    let (mut client, open) = open_raw_channel(&relay, &mut host, "/bad-frame").await;
    host.send_json(
        &json!({"type": "ws:frame", "id": open["id"], "data": "!!", "encoding": "base64"}),
    )
    .await;
    assert_eq!(client.recv_close_code(DEADLINE).await, 1011);
}

#[tokio::test]
async fn client_message_over_max_frame_bytes_closes_channel_with_1009_both_ways() {
    const LIMIT: usize = 256 * 1024;
    let relay = TestRelay::builder().max_frame_bytes(LIMIT).spawn().await;
    let mut host = RawHost::connect(&relay, "raw-1").await;
    let (mut client, open) = open_raw_channel(&relay, &mut host, "/big").await;

    client.send_text(&"x".repeat(LIMIT + 1024)).await;

    assert_eq!(client.recv_close_code(DEADLINE).await, 1009);
    let close = host.expect("ws:close").await;
    assert_eq!(close["id"], open["id"]);
    assert_eq!(close_code_of(&close), 1009, "{close}");
    relay.whoowns("raw-1").await.assert_status(200);
}

#[tokio::test]
async fn slow_client_is_closed_with_1013_without_stalling_other_channels() {
    const CHUNK: usize = 64 * 1024;
    /// 64 MiB: far more than any socket buffers can hide.
    const MAX_FRAMES: usize = 1024;
    let relay = TestRelay::builder().channel_queue(4).spawn().await;
    let mut host = RawHost::connect(&relay, "raw-1").await;
    let (_slow, slow_open) = open_raw_channel(&relay, &mut host, "/slow").await;
    let (mut other, other_open) = open_raw_channel(&relay, &mut host, "/other").await;
    let chunk = "x".repeat(CHUNK);

    // Flood the channel whose client never reads until the relay gives up on
    // it: either the host hears about it, or frames for it become unknown ids.
    let unknown_id = [("reason", "unknown_id")];
    let unknown_before = relay.counter(IGNORED, &unknown_id).await;
    let mut sent = 0;
    let mut heard = None;
    while heard.is_none() && relay.counter(IGNORED, &unknown_id).await == unknown_before {
        assert!(
            sent < MAX_FRAMES,
            "the relay kept queueing for a client that never reads ({sent} frames of 64 KiB)"
        );
        for _ in 0..8 {
            host.send_json(&json!({"type": "ws:frame", "id": slow_open["id"], "data": chunk}))
                .await;
            sent += 1;
        }
        heard = host.try_recv_json(Duration::from_millis(1)).await;
    }
    let close = match heard {
        Some(msg) => msg,
        None => host.try_recv_json(DEADLINE).await.unwrap_or_else(|| {
            panic!(
                "the relay dropped the slow channel (frames for it are now unknown ids) \
                 but never sent the host a ws:close"
            )
        }),
    };

    assert_eq!(close["type"], "ws:close", "unexpected message: {close}");
    assert_eq!(close["id"], slow_open["id"]);
    assert_eq!(close_code_of(&close), 1013, "{close}");
    host.send_json(&json!({"type": "ws:frame", "id": other_open["id"], "data": "still flowing"}))
        .await;
    assert_eq!(other.recv_text().await, "still flowing");
}

#[tokio::test]
async fn a_burst_of_a_thousand_tiny_frames_reaches_a_client_that_reads_as_fast_as_it_can() {
    let relay = TestRelay::spawn().await;
    let mut host = RawHost::connect(&relay, "raw-1").await;
    let (mut client, open) = open_raw_channel(&relay, &mut host, "/burst").await;
    for i in 0..1_000 {
        host.send_json(&json!({"type": "ws:frame", "id": open["id"], "data": format!("f{i}")}))
            .await;
    }
    for i in 0..1_000 {
        assert_eq!(client.recv_text().await, format!("f{i}"), "frame {i}");
    }
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_1013_once_its_bytes_not_its_frames_pass_the_budget()
{
    const BUDGET: usize = 256 * 1024;
    let relay = TestRelay::builder()
        .env("RELAY_CHANNEL_QUEUE_BYTES", &BUDGET.to_string())
        .spawn()
        .await;
    let mut host = RawHost::connect(&relay, "raw-1").await;
    let (_stalled, open) = open_raw_channel(&relay, &mut host, "/stalled").await;
    // 32 KiB frames: the frame count (4,096 by default) never comes near its bound; the
    // bytes do, after socket buffers between relay and client have filled.
    let chunk = "y".repeat(32 * 1024);
    let mut sent = 0usize;
    let close = loop {
        assert!(
            sent < 4_096,
            "the relay kept queueing {sent} frames of 32 KiB for a client that never reads"
        );
        host.send_json(&json!({"type": "ws:frame", "id": open["id"], "data": chunk}))
            .await;
        sent += 1;
        if let Some(msg) = host.try_recv_json(Duration::from_millis(1)).await {
            break msg;
        }
    };
    assert_eq!(close["type"], "ws:close", "unexpected message: {close}");
    assert_eq!(close_code_of(&close), 1013, "{close}");
}

#[tokio::test]
async fn a_tunnel_carries_at_most_its_channel_limit_and_refuses_more_with_503_before_the_upgrade() {
    let relay = TestRelay::builder()
        .env("RELAY_MAX_CHANNELS", "2")
        .spawn()
        .await;
    let mut host = RawHost::connect(&relay, "raw-1").await;
    let (first, _) = open_raw_channel(&relay, &mut host, "/a").await;
    let (_second, _) = open_raw_channel(&relay, &mut host, "/b").await;

    let token = relay.client_token(&["raw-1"]);
    let err = WsClient::connect(&relay.ws_url("/hosts/raw-1/c"), Some(&token))
        .await
        .err()
        .expect("a third channel is refused");
    assert_eq!(relay_tests::rejection_status(&err), Some(503), "{err}");
    // The host never heard of it.
    assert!(
        host.try_recv_json(Duration::from_millis(200))
            .await
            .is_none()
    );

    // One closes: there is room again.
    drop(first);
    let closed = host.expect("ws:close").await;
    assert_eq!(closed["type"], "ws:close");
    let (_third, open) = open_raw_channel(&relay, &mut host, "/c").await;
    assert_eq!(open["path"], "/c");
}

#[tokio::test]
async fn one_client_address_holds_at_most_its_channel_limit_and_gets_429_while_others_are_served() {
    let relay = TestRelay::builder()
        .env("RELAY_MAX_CHANNELS_PER_CLIENT", "2")
        // The test's clients are all on 127.0.0.1: the header tells them apart.
        .env("RELAY_CLIENT_IP_HEADER", "x-client-ip")
        .spawn()
        .await;
    let mut host = RawHost::connect(&relay, "raw-1").await;
    let token = relay.client_token(&["raw-1"]);
    let url = relay.ws_url("/hosts/raw-1/feed");
    let from = |ip: &'static str| {
        let url = url.clone();
        let token = token.clone();
        async move {
            WsClient::connect_with_headers(&url, Some(&token), &[], &[("x-client-ip", ip)])
                .await
                .map(|(ws, _)| ws)
        }
    };

    let _a = from("203.0.113.1").await.expect("first channel");
    host.expect("ws:open").await;
    let _b = from("203.0.113.1").await.expect("second channel");
    host.expect("ws:open").await;
    let err = from("203.0.113.1").await.err().expect("a third is refused");
    assert_eq!(relay_tests::rejection_status(&err), Some(429), "{err}");

    let _c = from("203.0.113.2").await.expect("another client is served");
    host.expect("ws:open").await;
}

#[tokio::test]
async fn one_frame_larger_than_the_channel_budget_still_reaches_a_client_that_reads() {
    let relay = TestRelay::builder()
        .env("RELAY_CHANNEL_QUEUE_BYTES", &(256 * 1024).to_string())
        .spawn()
        .await;
    let mut host = RawHost::connect(&relay, "raw-1").await;
    let (mut client, open) = open_raw_channel(&relay, &mut host, "/big").await;
    let big = "b".repeat(1024 * 1024);
    host.send_json(&json!({"type": "ws:frame", "id": open["id"], "data": big}))
        .await;
    assert_eq!(client.recv_text().await.len(), big.len());
    // And the channel is still open.
    host.send_json(&json!({"type": "ws:frame", "id": open["id"], "data": "after"}))
        .await;
    assert_eq!(client.recv_text().await, "after");
}

#[tokio::test]
async fn a_client_that_answers_no_ping_for_two_intervals_is_closed_and_its_host_told_1001() {
    let relay = TestRelay::builder()
        .ping_interval("300ms")
        // The test's host reads only now and then: its tunnel must outlive its pings.
        .max_missed_pongs(100)
        .spawn()
        .await;
    let mut host = RawHost::connect(&relay, "raw-1").await;
    // A client that reads (and so answers pings) stays, however long it is silent.
    let (mut alive, alive_open) = open_raw_channel(&relay, &mut host, "/alive").await;
    // A client that never reads answers no ping: from the relay's side, a half-open
    // socket whose peer vanished.
    let (_gone, gone_open) = open_raw_channel(&relay, &mut host, "/gone").await;

    assert!(alive.try_recv(Duration::from_millis(1_500)).await.is_none());
    let close = host.expect("ws:close").await;
    assert_eq!(close["id"], gone_open["id"], "{close}");
    assert_eq!(close_code_of(&close), 1001, "{close}");

    host.send_json(&json!({"type": "ws:frame", "id": alive_open["id"], "data": "still here"}))
        .await;
    assert_eq!(alive.recv_text().await, "still here");
    assert!(
        host.try_recv_json(Duration::from_millis(200))
            .await
            .is_none(),
        "the client that answers pings was closed too"
    );
}

#[tokio::test]
async fn a_client_websocket_over_http2_carries_frames_both_ways_and_close_codes() {
    use futures_util::{SinkExt, StreamExt};
    let relay = TestRelay::spawn().await;
    let mut host = RawHost::connect(&relay, "raw-1").await;
    let token = relay.client_token(&["raw-1"]);
    let mut client =
        relay_tests::ws::connect_h2c(relay.addr(), "/hosts/raw-1/h2?x=1", Some(&token))
            .await
            .expect("the relay accepts a WebSocket over HTTP/2");
    let open = host.expect("ws:open").await;
    assert_eq!(open["path"], "/h2");

    client.send(Message::Text("up".into())).await.unwrap();
    let frame = host.expect("ws:frame").await;
    assert_eq!((&frame["id"], &frame["data"]), (&open["id"], &json!("up")));
    client
        .send(Message::Binary(vec![0, 1, 255].into()))
        .await
        .unwrap();
    let frame = host.expect("ws:frame").await;
    assert_eq!(frame["encoding"], "base64");
    assert_eq!(
        BASE64.decode(frame["data"].as_str().unwrap()).unwrap(),
        [0, 1, 255]
    );

    host.send_json(&json!({"type": "ws:frame", "id": open["id"], "data": "down"}))
        .await;
    match client.next().await {
        Some(Ok(Message::Text(text))) => assert_eq!(text.as_str(), "down"),
        other => panic!("expected the host's text, got {other:?}"),
    }

    client
        .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
            code: 4321.into(),
            reason: "".into(),
        }))
        .await
        .unwrap();
    let close = host.expect("ws:close").await;
    assert_eq!((&close["id"], &close["code"]), (&open["id"], &json!(4321)));
}

#[tokio::test]
async fn a_websocket_over_http2_to_a_host_that_is_not_here_is_refused_with_its_status() {
    let relay = TestRelay::spawn().await;
    let token = relay.client_token(&["nobody-1"]);
    let refused = relay_tests::ws::connect_h2c(relay.addr(), "/hosts/nobody-1/ws", Some(&token))
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(refused, 503, "host not connected");
}
