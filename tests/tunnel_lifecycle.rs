//! Tunnel lifecycle: pending exchanges when the tunnel goes, ping timeouts,
//! re-registration, the pending-exchange limit and the exchange timeout.

use std::time::Duration;

use relay_tests::{
    DEADLINE, HttpResponse, RawHost, Stack, TestHost, TestRelay, Upstream, msg_id, msg_type,
    wait_until,
};
use serde_json::json;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Exchange timeout used where a test proves something fails *fast*: any
/// answer that arrives well before it cannot be the timeout.
const LONG_EXCHANGE_TIMEOUT: &str = "30s";

/// "Fast": far below [`LONG_EXCHANGE_TIMEOUT`], far above loopback latency.
const FAST: Duration = Duration::from_secs(5);

/// Starts `GET /hosts/{host_id}{path}` in the background.
fn spawn_get(relay: &TestRelay, host_id: &str, path: &str) -> JoinHandle<HttpResponse> {
    let client = relay.http().clone();
    let url = relay.http_url(&format!("/hosts/{host_id}{path}"));
    let token = relay.client_token(&[host_id]);
    tokio::spawn(async move {
        client
            .get(url)
            .bearer(&token)
            .timeout(Duration::from_secs(40))
            .send()
            .await
    })
}

#[tokio::test]
async fn graceful_tunnel_close_fails_pending_exchange_fast_with_502() {
    let stack = Stack::spawn_with(
        TestRelay::builder().exchange_timeout(LONG_EXCHANGE_TIMEOUT),
        "web-1",
    )
    .await;
    let request = spawn_get(&stack.relay, "web-1", "/slow?ms=60000");
    wait_until("the slow request reaches upstream", DEADLINE, || {
        stack.upstream.requests() == 1
    })
    .await;

    let closed_at = Instant::now();
    stack.host.close(1000);
    let resp = request.await.expect("client task");

    resp.assert_status(502);
    assert!(!resp.error().is_empty());
    assert!(
        closed_at.elapsed() < FAST,
        "502 took {:?}; it must not wait for the exchange timeout",
        closed_at.elapsed()
    );
}

#[tokio::test]
async fn abrupt_tunnel_loss_fails_pending_exchange_fast_with_502() {
    let relay = TestRelay::builder()
        .exchange_timeout(LONG_EXCHANGE_TIMEOUT)
        .spawn()
        .await;
    let mut host = RawHost::connect(&relay, "raw-1").await;
    let request = spawn_get(&relay, "raw-1", "/pending");
    host.expect("http").await;

    let dropped_at = Instant::now();
    drop(host);
    let resp = request.await.expect("client task");

    resp.assert_status(502);
    assert!(!resp.error().is_empty());
    assert!(
        dropped_at.elapsed() < FAST,
        "502 took {:?}; it must not wait for the exchange timeout",
        dropped_at.elapsed()
    );
}

#[tokio::test]
async fn unanswered_pings_close_tunnel_with_1001_and_deregister_host() {
    let relay = TestRelay::builder()
        .ping_interval("100ms")
        .max_missed_pongs(2)
        .spawn()
        .await;
    let token = relay.host_token("quiet");
    let mut host = RawHost::connect_url(&relay.tunnel_url("quiet", &token), None).await;
    host.set_auto_pong(false);
    let started = Instant::now();

    let first = host
        .recv_raw(DEADLINE)
        .await
        .expect("a ping before any close");
    assert_eq!(msg_type(&first), "ping", "first relay message: {first}");
    let code = host.recv_close_code(DEADLINE).await;

    assert_eq!(
        code, 1001,
        "ping timeout closes with 1001 (never a drain code)"
    );
    assert!(
        host.pings_seen() >= 2,
        "closed after only {} ping(s); max-missed-pongs is 2",
        host.pings_seen()
    );
    assert!(
        started.elapsed() < FAST,
        "ping timeout took {:?} with 100ms pings",
        started.elapsed()
    );
    relay.wait_host_disconnected("quiet").await;
}

#[tokio::test]
async fn answered_pings_keep_tunnel_alive_and_serving() {
    let relay = TestRelay::builder()
        .ping_interval("100ms")
        .max_missed_pongs(2)
        .spawn()
        .await;
    let token = relay.host_token("chatty");
    let mut host = RawHost::connect_url(&relay.tunnel_url("chatty", &token), None).await;

    // Eight intervals is four times the missed-pong budget.
    while host.pings_seen() < 8 {
        let msg = host
            .recv_raw(DEADLINE)
            .await
            .expect("tunnel stays open while pongs flow");
        assert_eq!(msg_type(&msg), "ping", "unexpected message: {msg}");
        host.send_json(&json!({"type": "pong"})).await;
    }

    relay.whoowns("chatty").await.assert_status(200);
    let request = spawn_get(&relay, "chatty", "/alive");
    let msg = host.recv_json().await;
    assert_eq!(msg_type(&msg), "http");
    host.respond(&msg_id(&msg), 200, json!({}), "still alive")
        .await;
    let resp = request.await.expect("client task");
    resp.assert_status(200);
    assert_eq!(resp.text(), "still alive");
}

#[tokio::test]
async fn test_host_answering_pings_stays_connected() {
    let stack = Stack::spawn_with(
        TestRelay::builder()
            .ping_interval("100ms")
            .max_missed_pongs(3),
        "web-1",
    )
    .await;

    // Eight answered pings is well past the missed-pong budget of three.
    wait_until("the test host has answered 8 pings", DEADLINE, || {
        stack.host.pings_answered() >= 8 || stack.host.ended().is_some()
    })
    .await;

    assert!(
        stack.host.ended().is_none(),
        "tunnel ended: {:?}",
        stack.host.ended()
    );
    stack
        .relay
        .http()
        .get(stack.url("/echo"))
        .bearer(&stack.client_token())
        .send()
        .await
        .assert_status(200);
}

#[tokio::test]
async fn reregistration_replaces_old_tunnel_with_4002_and_new_tunnel_serves() {
    let relay = TestRelay::spawn().await;
    let mut old = RawHost::connect(&relay, "dup").await;

    let token = relay.host_token("dup");
    let mut new = RawHost::connect_url(&relay.tunnel_url("dup", &token), None).await;

    assert_eq!(
        old.recv_close_code(DEADLINE).await,
        4002,
        "old tunnel is told it was replaced"
    );
    relay.wait_host_connected("dup").await;
    let request = spawn_get(&relay, "dup", "/who");
    let msg = new.expect("http").await;
    assert_eq!(msg["path"], "/who");
    new.respond(&msg_id(&msg), 200, json!({}), "new tunnel")
        .await;
    let resp = request.await.expect("client task");
    resp.assert_status(200);
    assert_eq!(resp.text(), "new tunnel");
}

#[tokio::test]
async fn reregistration_fails_old_tunnels_pending_exchanges_fast_with_502() {
    let relay = TestRelay::builder()
        .exchange_timeout(LONG_EXCHANGE_TIMEOUT)
        .spawn()
        .await;
    let mut old = RawHost::connect(&relay, "dup").await;
    let request = spawn_get(&relay, "dup", "/pending");
    old.expect("http").await;

    let replaced_at = Instant::now();
    let token = relay.host_token("dup");
    let _new = RawHost::connect_url(&relay.tunnel_url("dup", &token), None).await;
    let resp = request.await.expect("client task");

    resp.assert_status(502);
    assert!(
        replaced_at.elapsed() < FAST,
        "502 took {:?}; it must not wait for the exchange timeout",
        replaced_at.elapsed()
    );
    assert_eq!(old.recv_close_code(DEADLINE).await, 4002);
}

#[tokio::test]
async fn pending_limit_rejects_extra_exchanges_with_503_overloaded_until_one_completes() {
    let relay = TestRelay::builder().max_pending(2).spawn().await;
    let mut host = RawHost::connect(&relay, "busy").await;
    let first = spawn_get(&relay, "busy", "/1");
    let first_msg = host.expect("http").await;
    let second = spawn_get(&relay, "busy", "/2");
    let second_msg = host.expect("http").await;

    let third = spawn_get(&relay, "busy", "/3").await.expect("client task");
    third.assert_status(503);
    let error = third.error();
    assert!(
        error.contains("overloaded"),
        "error {error:?} should say overloaded"
    );

    host.respond(&msg_id(&first_msg), 200, json!({}), "one")
        .await;
    let first = first.await.expect("client task");
    first.assert_status(200);
    assert_eq!(first.text(), "one");

    // A slot is free again.
    let fourth = spawn_get(&relay, "busy", "/4");
    let fourth_msg = host.expect("http").await;
    assert_eq!(
        fourth_msg["path"], "/4",
        "the rejected /3 never reached the host"
    );
    host.respond(&msg_id(&fourth_msg), 200, json!({}), "four")
        .await;
    host.respond(&msg_id(&second_msg), 200, json!({}), "two")
        .await;
    assert_eq!(fourth.await.expect("client task").text(), "four");
    assert_eq!(second.await.expect("client task").text(), "two");
}

#[tokio::test]
async fn unanswered_exchange_times_out_with_504_and_late_answer_is_ignored() {
    let relay = TestRelay::builder().exchange_timeout("300ms").spawn().await;
    let mut host = RawHost::connect(&relay, "slow").await;
    let ignored_before = relay
        .counter(
            "relay_tunnel_messages_ignored_total",
            &[("reason", "unknown_id")],
        )
        .await;

    let sent_at = Instant::now();
    let request = spawn_get(&relay, "slow", "/never");
    let msg = host.expect("http").await;
    let resp = request.await.expect("client task");

    resp.assert_status(504);
    assert!(!resp.error().is_empty());
    let took = sent_at.elapsed();
    assert!(
        took >= Duration::from_millis(300),
        "504 after only {took:?}"
    );
    assert!(
        took < FAST,
        "504 took {took:?} with a 300ms exchange timeout"
    );

    // The late answer has nobody to go to: ignored, counted, tunnel unharmed.
    host.respond(&msg_id(&msg), 200, json!({}), "too late")
        .await;
    relay
        .wait_counter(
            "relay_tunnel_messages_ignored_total",
            &[("reason", "unknown_id")],
            ignored_before + 1.0,
        )
        .await;
    let request = spawn_get(&relay, "slow", "/again");
    let msg = host.expect("http").await;
    host.respond(&msg_id(&msg), 200, json!({}), "on time").await;
    assert_eq!(request.await.expect("client task").text(), "on time");
}

#[tokio::test]
async fn host_that_reconnects_after_disconnect_serves_again() {
    let relay = TestRelay::spawn().await;
    let upstream = Upstream::spawn().await;
    let token = relay.client_token(&["web-1"]);
    let get = || async {
        relay
            .http()
            .get(relay.http_url("/hosts/web-1/echo"))
            .bearer(&token)
            .send()
            .await
    };

    let host = TestHost::connect(&relay, "web-1", &upstream).await;
    get().await.assert_status(200);
    host.close(1000);
    host.wait_ended(DEADLINE).await;
    relay.wait_host_disconnected("web-1").await;
    get().await.assert_status(503);

    let _host = TestHost::connect(&relay, "web-1", &upstream).await;
    get().await.assert_status(200);
    assert_eq!(upstream.requests(), 2);
}
