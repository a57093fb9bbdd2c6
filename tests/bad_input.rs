//! Bad input from a host: ignored, counted, and the tunnel keeps serving;
//! only an oversized frame closes it (1009).

use relay_tests::{DEADLINE, RawHost, TestRelay, msg_id};
use serde_json::json;

const IGNORED: &str = "relay_tunnel_messages_ignored_total";

/// Proves the tunnel still works: one full HTTP exchange through `host`.
async fn assert_tunnel_serves(relay: &TestRelay, host: &mut RawHost, host_id: &str) {
    let client = relay.http().clone();
    let url = relay.http_url(&format!("/hosts/{host_id}/still-there"));
    let token = relay.client_token(&[host_id]);
    let request = tokio::spawn(async move { client.get(url).bearer(&token).send().await });
    let msg = host.expect("http").await;
    assert_eq!(msg["path"], "/still-there");
    host.respond(&msg_id(&msg), 200, json!({}), "served").await;
    let resp = request.await.expect("client task");
    resp.assert_status(200);
    assert_eq!(resp.text(), "served");
}

#[tokio::test]
async fn malformed_json_from_host_is_ignored_counted_and_tunnel_still_serves() {
    let relay = TestRelay::spawn().await;
    let mut host = RawHost::connect(&relay, "bad-1").await;
    let before = relay.counter(IGNORED, &[("reason", "malformed")]).await;

    host.send_text("{not json").await;
    host.send_text("").await;

    relay
        .wait_counter(IGNORED, &[("reason", "malformed")], before + 2.0)
        .await;
    assert_tunnel_serves(&relay, &mut host, "bad-1").await;
}

#[tokio::test]
async fn unknown_message_type_is_ignored_counted_and_tunnel_still_serves() {
    let relay = TestRelay::spawn().await;
    let mut host = RawHost::connect(&relay, "bad-1").await;
    let before = relay.counter(IGNORED, &[("reason", "unknown_type")]).await;

    host.send_json(&json!({"type": "telemetry", "cpu": 0.5}))
        .await;

    relay
        .wait_counter(IGNORED, &[("reason", "unknown_type")], before + 1.0)
        .await;
    assert_tunnel_serves(&relay, &mut host, "bad-1").await;
}

#[tokio::test]
async fn messages_with_unknown_ids_are_ignored_counted_and_tunnel_still_serves() {
    let relay = TestRelay::spawn().await;
    let mut host = RawHost::connect(&relay, "bad-1").await;
    let before = relay.counter(IGNORED, &[("reason", "unknown_id")]).await;

    host.send_json(&json!({
        "type": "http:response",
        "id": "no-such-exchange",
        "status": 200,
        "headers": {},
        "body": "nobody asked",
    }))
    .await;
    host.send_json(&json!({"type": "ws:frame", "id": "no-such-channel", "data": "x"}))
        .await;
    host.send_json(&json!({"type": "ws:close", "id": "no-such-channel", "code": 1000}))
        .await;

    relay
        .wait_counter(IGNORED, &[("reason", "unknown_id")], before + 3.0)
        .await;
    assert_tunnel_serves(&relay, &mut host, "bad-1").await;
}

#[tokio::test]
async fn non_object_or_untyped_json_does_not_kill_tunnel_and_is_counted_once_each() {
    let relay = TestRelay::spawn().await;
    let mut host = RawHost::connect(&relay, "bad-1").await;
    let before = relay.counter(IGNORED, &[]).await;

    host.send_json(&json!([1, 2, 3])).await;
    host.send_json(&json!("just a string")).await;
    host.send_json(&json!({"id": "x", "status": 200})).await;

    relay.wait_counter(IGNORED, &[], before + 3.0).await;
    assert_tunnel_serves(&relay, &mut host, "bad-1").await;
}

#[tokio::test]
async fn unknown_fields_in_known_messages_are_ignored() {
    let relay = TestRelay::spawn().await;
    let mut host = RawHost::connect(&relay, "bad-1").await;
    let client = relay.http().clone();
    let url = relay.http_url("/hosts/bad-1/future");
    let token = relay.client_token(&["bad-1"]);
    let request = tokio::spawn(async move { client.get(url).bearer(&token).send().await });

    let msg = host.expect("http").await;
    host.send_json(&json!({
        "type": "http:response",
        "id": msg_id(&msg),
        "status": 200,
        "headers": {"x-a": "b"},
        "body": "forward compatible",
        "streaming": {"chunk": 1},
        "v": 2,
    }))
    .await;

    let resp = request.await.expect("client task");
    resp.assert_status(200);
    assert_eq!(resp.text(), "forward compatible");
    assert_eq!(resp.header("x-a"), Some("b"));
}

#[tokio::test]
async fn oversized_frame_over_a_small_limit_closes_tunnel_with_1009() {
    let relay = TestRelay::builder().max_frame_bytes(4096).spawn().await;
    let mut host = RawHost::connect(&relay, "big-1").await;

    // Under the limit: ignored as an unknown type, tunnel unharmed.
    let small = json!({"type": "padding", "data": "x".repeat(3000)});
    host.send_json(&small).await;
    assert_tunnel_serves(&relay, &mut host, "big-1").await;

    let big = json!({"type": "padding", "data": "x".repeat(8192)});
    host.send_json(&big).await;

    assert_eq!(host.recv_close_code(DEADLINE).await, 1009);
    relay.wait_host_disconnected("big-1").await;
}

#[tokio::test]
async fn oversized_frame_over_a_large_limit_closes_tunnel_with_1009() {
    const LIMIT: usize = 256 * 1024;
    let relay = TestRelay::builder().max_frame_bytes(LIMIT).spawn().await;
    let mut host = RawHost::connect(&relay, "big-1").await;

    let small = json!({"type": "padding", "data": "x".repeat(LIMIT - 1024)});
    host.send_json(&small).await;
    assert_tunnel_serves(&relay, &mut host, "big-1").await;

    let big = json!({"type": "padding", "data": "x".repeat(2 * LIMIT)});
    host.send_json(&big).await;

    assert_eq!(host.recv_close_code(DEADLINE).await, 1009);
    relay.wait_host_disconnected("big-1").await;
}

// ---- documented in docs/protocol.md beyond the v1 contract ----

#[tokio::test]
async fn binary_frames_from_host_are_ignored_and_counted() {
    let relay = TestRelay::spawn().await;
    let mut host = RawHost::connect(&relay, "bad-1").await;
    let before = relay.counter(IGNORED, &[("reason", "binary")]).await;

    host.ws_mut().send_binary(b"{\"type\":\"pong\"}").await;

    relay
        .wait_counter(IGNORED, &[("reason", "binary")], before + 1.0)
        .await;
    assert_tunnel_serves(&relay, &mut host, "bad-1").await;
}

#[tokio::test]
async fn malformed_response_naming_a_pending_exchange_fails_it_fast_with_502() {
    let relay = TestRelay::builder().exchange_timeout("30s").spawn().await;
    let mut host = RawHost::connect(&relay, "bad-1").await;
    let before = relay.counter(IGNORED, &[("reason", "malformed")]).await;
    let client = relay.http().clone();
    let url = relay.http_url("/hosts/bad-1/half");
    let token = relay.client_token(&["bad-1"]);
    let request = tokio::spawn(async move { client.get(url).bearer(&token).send().await });
    let msg = host.expect("http").await;

    let answered_at = tokio::time::Instant::now();
    host.send_json(&json!({"type": "http:response", "id": msg_id(&msg)}))
        .await;
    let resp = request.await.expect("client task");

    resp.assert_status(502);
    assert!(
        answered_at.elapsed() < std::time::Duration::from_secs(5),
        "502 took {:?}; it must not wait for the exchange timeout",
        answered_at.elapsed()
    );
    relay
        .wait_counter(IGNORED, &[("reason", "malformed")], before + 1.0)
        .await;
    assert_tunnel_serves(&relay, &mut host, "bad-1").await;
}

#[tokio::test]
async fn invalid_response_headers_are_dropped_and_counted_but_response_delivered() {
    let relay = TestRelay::spawn().await;
    let mut host = RawHost::connect(&relay, "bad-1").await;
    let before = relay.counter(IGNORED, &[("reason", "bad_header")]).await;
    let client = relay.http().clone();
    let url = relay.http_url("/hosts/bad-1/headers");
    let token = relay.client_token(&["bad-1"]);
    let request = tokio::spawn(async move { client.get(url).bearer(&token).send().await });
    let msg = host.expect("http").await;

    host.respond(
        &msg_id(&msg),
        200,
        json!({"bad name": "x", "x-bad-value": "line\nbreak", "x-good": "kept"}),
        "delivered",
    )
    .await;

    let resp = request.await.expect("client task");
    resp.assert_status(200);
    assert_eq!(resp.text(), "delivered");
    assert_eq!(resp.header("x-good"), Some("kept"));
    assert!(resp.headers.get("x-bad-value").is_none());
    relay
        .wait_counter(IGNORED, &[("reason", "bad_header")], before + 2.0)
        .await;
}

#[tokio::test]
async fn an_answer_with_a_wrongly_typed_field_fails_its_exchange_with_502_not_the_timeouts_504() {
    let relay = TestRelay::builder().exchange_timeout("30s").spawn().await;
    let mut host = RawHost::connect(&relay, "bad-1").await;
    let token = relay.client_token(&["bad-1"]);
    let cases: [(&str, serde_json::Value); 5] = [
        ("status", json!(65536)),
        ("status", json!("200")),
        ("status", json!(200.5)),
        ("headers", serde_json::Value::Null),
        ("id", serde_json::Value::Null), // replaced by the numeric id below
    ];
    for (field, value) in cases {
        let client = relay.http().clone();
        let url = relay.http_url("/hosts/bad-1/typed");
        let bearer = token.clone();
        let request = tokio::spawn(async move { client.get(url).bearer(&bearer).send().await });
        let msg = host.expect("http").await;
        let id = msg_id(&msg);
        let mut answer =
            json!({"type": "http:response", "id": id, "status": 200, "headers": {}, "body": "x"});
        answer[field] = if field == "id" {
            json!(
                id.parse::<u64>()
                    .expect("stream ids are numbers in strings")
            )
        } else {
            value
        };
        host.send_json(&answer).await;
        let resp = request.await.expect("client task");
        // 504 would mean the exchange waited for the timeout.
        assert_eq!(resp.status, 502, "{field}: {answer}");
    }
    assert_tunnel_serves(&relay, &mut host, "bad-1").await;
}

#[tokio::test]
async fn a_204_or_304_from_the_host_goes_out_without_a_body_or_content_length() {
    let relay = TestRelay::spawn().await;
    let mut host = RawHost::connect(&relay, "bad-1").await;
    let token = relay.client_token(&["bad-1"]);
    for status in [204u16, 304] {
        let client = relay.http().clone();
        let url = relay.http_url("/hosts/bad-1/empty");
        let bearer = token.clone();
        let request = tokio::spawn(async move { client.get(url).bearer(&bearer).send().await });
        let msg = host.expect("http").await;
        // A body (and its length) the status forbids.
        host.respond(
            &msg_id(&msg),
            status,
            json!({"content-length": "23", "x-kept": "yes"}),
            "a body it may not carry",
        )
        .await;
        let resp = request.await.expect("client task");
        resp.assert_status(status);
        assert_eq!(resp.header("x-kept"), Some("yes"));
        assert!(
            resp.headers.get("content-length").is_none(),
            "{status} went out with content-length: {:?}",
            resp.headers.get("content-length")
        );
        assert!(resp.body.is_empty(), "{status} carried a body");
    }
    assert_tunnel_serves(&relay, &mut host, "bad-1").await;
}

#[tokio::test]
async fn a_flood_of_unsolicited_pongs_costs_the_directory_at_most_one_heartbeat_per_half_ping_interval()
 {
    const HEARTBEATS: &str = "relay_directory_ops_total";
    let relay = TestRelay::builder().ping_interval("30s").spawn().await;
    let mut host = RawHost::connect(&relay, "bad-1").await;
    for _ in 0..2_000 {
        host.send_json(&json!({"type": "pong"})).await;
    }
    // The tunnel read them all (it answers a request sent after them), and the one
    // heartbeat they are worth is written.
    assert_tunnel_serves(&relay, &mut host, "bad-1").await;
    relay_tests::wait_until_async("a heartbeat is written", DEADLINE, || async {
        relay.counter(HEARTBEATS, &[("op", "heartbeat")]).await >= 1.0
    })
    .await;
    assert_eq!(
        relay.counter(HEARTBEATS, &[("op", "heartbeat")]).await,
        1.0,
        "2,000 pongs within 15 s refresh the directory entry once, not 2,000 times"
    );
}

#[tokio::test]
async fn a_body_whose_v1_message_would_pass_the_frame_limit_once_escaped_gets_413_and_the_tunnel_lives()
 {
    const FRAME: usize = 1024 * 1024;
    let relay = TestRelay::builder().max_frame_bytes(FRAME).spawn().await;
    let mut host = RawHost::connect(&relay, "bad-1").await;
    let token = relay.client_token(&["bad-1"]);
    // 300 KB of control characters: within the 10 MiB body limit, but 1.8 MB as JSON.
    let escaped_large = "\u{1}".repeat(300 * 1024);
    let response = relay
        .http()
        .request(http::Method::POST, relay.http_url("/hosts/bad-1/upload"))
        .bearer(&token)
        .body(escaped_large)
        .send()
        .await;
    response.assert_status(413);
    assert!(
        response.error().contains("once encoded"),
        "the error says why: {}",
        response.error()
    );
    // Nothing was sent: the next message the host sees is the next request, and the
    // tunnel (with every other exchange on it) is alive.
    assert_tunnel_serves(&relay, &mut host, "bad-1").await;

    // The same number of plain bytes fits.
    let client = relay.http().clone();
    let url = relay.http_url("/hosts/bad-1/upload");
    let bearer = token.clone();
    let plain = "a".repeat(300 * 1024);
    let request = tokio::spawn(async move {
        client
            .request(http::Method::POST, url)
            .bearer(&bearer)
            .body(plain)
            .send()
            .await
    });
    let msg = host.expect("http").await;
    assert_eq!(msg["body"].as_str().map(str::len), Some(300 * 1024));
    host.respond(&msg_id(&msg), 200, json!({}), "stored").await;
    request.await.expect("client task").assert_status(200);
}
