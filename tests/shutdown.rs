//! Graceful shutdown on SIGTERM (protocol v1, "Drain, in order"): tunnels
//! are told to `drain`, then closed with 4001; pending exchanges and client
//! channels end promptly; the process exits 0 well before a platform kill
//! timeout.

use std::time::Duration;

use relay_tests::{DEADLINE, HttpResponse, RawHost, Stack, TestRelay, WsClient, WsEnd, msg_type};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Fly's default `kill_timeout`: the relay must be gone before this.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads `host` until the relay closes the tunnel; returns the types of the
/// messages that came first and the close code.
async fn messages_until_close(host: &mut RawHost) -> (Vec<String>, u16) {
    let mut types = Vec::new();
    loop {
        match host.recv_raw(DEADLINE).await {
            Ok(msg) => types.push(msg_type(&msg).to_owned()),
            Err(WsEnd::Close(code)) => return (types, code),
            Err(WsEnd::Dropped(why)) => {
                panic!("tunnel ended without a Close frame after {types:?}: {why}")
            }
        }
    }
}

#[tokio::test]
async fn sigterm_closes_tunnels_with_4001_and_exits_0_before_kill_timeout() {
    let mut relay = TestRelay::spawn().await;
    let mut host = RawHost::connect(&relay, "h1").await;

    let signalled_at = Instant::now();
    relay.send_sigterm();
    let (_, code) = messages_until_close(&mut host).await;
    drop(host);
    let status = relay.wait_exit(DEADLINE).await;

    assert_eq!(code, 4001, "shutdown closes tunnels with 4001 (drain)");
    assert_eq!(
        status.code(),
        Some(0),
        "graceful shutdown exits 0, got {status}"
    );
    assert!(
        signalled_at.elapsed() < KILL_TIMEOUT,
        "shutdown took {:?}, longer than the platform kill timeout",
        signalled_at.elapsed()
    );
}

#[tokio::test]
async fn sighup_drains_like_sigterm_instead_of_dropping_every_tunnel() {
    let mut relay = TestRelay::spawn().await;
    let mut host = RawHost::connect(&relay, "h1").await;

    relay.send_signal("HUP");
    let (types, code) = messages_until_close(&mut host).await;
    drop(host);
    let status = relay.wait_exit(DEADLINE).await;

    assert!(
        types.iter().any(|t| t == "drain"),
        "a `drain` message precedes the close; got {types:?} then close {code}"
    );
    assert_eq!(code, 4001, "the tunnel is drained, not dropped");
    assert_eq!(
        status.code(),
        Some(0),
        "a drained stop exits 0, got {status}"
    );
    assert!(
        relay.logs().iter().any(|line| line.contains("SIGHUP")),
        "the log says which signal stopped it"
    );
}

#[tokio::test]
async fn sigterm_sends_drain_message_before_closing_tunnel() {
    let relay = TestRelay::spawn().await;
    let mut host = RawHost::connect(&relay, "h1").await;

    relay.send_sigterm();
    let (types, code) = messages_until_close(&mut host).await;

    assert!(
        types.iter().any(|t| t == "drain"),
        "a `drain` message precedes the close; got {types:?} then close {code}"
    );
    assert_eq!(code, 4001);
}

#[tokio::test]
async fn sigterm_fails_pending_exchange_and_closes_client_channels_promptly() {
    let mut stack = Stack::spawn_with(TestRelay::builder().exchange_timeout("30s"), "web-1").await;
    let token = stack.client_token();
    let mut channel = WsClient::connect_ok(&stack.ws_url("/ws/echo"), Some(&token)).await;
    channel.send_text("up").await;
    assert_eq!(channel.recv_text().await, "up");
    let client = stack.relay.http().clone();
    let url = stack.url("/slow?ms=60000");
    let pending: JoinHandle<Result<HttpResponse, String>> = tokio::spawn(async move {
        client
            .get(url)
            .bearer(&token)
            .timeout(Duration::from_secs(40))
            .try_send()
            .await
    });
    relay_tests::wait_until("the slow request reaches upstream", DEADLINE, || {
        stack.upstream.requests() == 1
    })
    .await;

    let signalled_at = Instant::now();
    stack.relay.send_sigterm();

    let code = channel.recv_close_code(KILL_TIMEOUT).await;
    assert_eq!(
        code, 1001,
        "client channels are told the relay is going away"
    );
    match pending.await.expect("client task") {
        Ok(resp) => assert_eq!(resp.status, 502, "pending exchange: body {:?}", resp.text()),
        Err(err) => panic!("pending exchange got no response during shutdown: {err}"),
    }
    let status = stack.relay.wait_exit(KILL_TIMEOUT).await;
    assert_eq!(
        status.code(),
        Some(0),
        "graceful shutdown exits 0, got {status}"
    );
    assert!(
        signalled_at.elapsed() < KILL_TIMEOUT,
        "shutdown took {:?}",
        signalled_at.elapsed()
    );
}
