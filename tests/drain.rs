//! The graceful drain (relay/src/drain.rs) seen from outside: real relay
//! processes, real signals, real tunnels and a real `redis-server`.
//!
//! On the first SIGTERM or SIGINT the relay marks itself draining (`/ready`
//! 503, new tunnels refused with 503 `Retry-After: 0`), tells every tunnel
//! `drain`, keeps serving for the drain grace (or until every agent left),
//! stops accepting, removes its directory entries, closes what is left with
//! 4001 and exits 0, logging each of the 6 steps. A second signal exits at once
//! with 130. Around it: the admission token bucket (429 with `Retry-After`) and
//! the ping sent as soon as a tunnel is registered.
//!
//! Every wait polls a condition under a deadline. Timing bounds are far from
//! the configured values they check (a 20 s grace against an exit within
//! 10 s, say), so a loaded machine does not flake them.

use std::time::Duration;

use futures_util::future::join_all;
use relay_tests::{
    DEADLINE, RawHost, Stack, TestAgent, TestHost, TestRedis, TestRelay, Upstream, WsClient, WsEnd,
    counter_value, host_key, msg_id, msg_type, owned_key, rejection_status, wait_until,
    wait_until_async, within,
};
use serde_json::json;
use tokio::time::Instant;
use tokio_tungstenite::MaybeTlsStream;
use tokio_tungstenite::tungstenite;

/// The relay's default hard deadline from the signal to exit (`--drain-deadline`).
const DRAIN_DEADLINE: Duration = Duration::from_secs(8);

/// A grace long enough that "the relay is still draining" is observable for
/// as long as a test needs, and that an early exit is clearly not the grace
/// running out.
const LONG_GRACE: &str = "20s";

/// The hard deadline that goes with [`LONG_GRACE`] (it must exceed the grace
/// plus the 1.5 s close wait).
const LONG_DEADLINE: &str = "30s";

/// The 6 step lines of a drain, in order, then the last line of the process
/// (`stopped`; step 4 says "stopped accepting", hence the `elapsed=`).
const STEP_LINES: [&str; 7] = [
    "drain 1/6",
    "drain 2/6",
    "drain 3/6",
    "drain 4/6",
    "drain 5/6",
    "drain 6/6",
    "stopped elapsed=",
];

/// What a host saw on its tunnel from the signal on.
#[derive(Debug)]
struct TunnelEnd {
    host_id: String,
    /// Types of the v1 messages before the Close frame, pings excluded.
    types: Vec<String>,
    /// The code of the Close frame that ended the tunnel.
    code: u16,
}

/// Reads `host` until its tunnel ends with a Close frame, answering pings.
/// With `leave_on_drain` the host behaves like an agent that moved: on the
/// `drain` message it closes its tunnel with 1000 itself.
///
/// # Panics
///
/// If the tunnel ends without a Close frame, or nothing ends it within
/// [`DEADLINE`].
async fn read_until_close(mut host: RawHost, host_id: String, leave_on_drain: bool) -> TunnelEnd {
    let mut types = Vec::new();
    loop {
        match host.recv_raw(DEADLINE).await {
            Ok(msg) if msg_type(&msg) == "ping" => {
                // The relay may be closing already; a lost pong is fine.
                let _ = host
                    .ws_mut()
                    .try_send(tungstenite::Message::text(
                        json!({"type": "pong"}).to_string(),
                    ))
                    .await;
            }
            Ok(msg) => {
                let ty = msg_type(&msg).to_owned();
                types.push(ty.clone());
                if ty == "drain" && leave_on_drain {
                    host.close(1000).await;
                }
            }
            Err(WsEnd::Close(code)) => {
                return TunnelEnd {
                    host_id,
                    types,
                    code,
                };
            }
            Err(WsEnd::Dropped(why)) => {
                panic!("tunnel of {host_id} ended without a Close frame after {types:?}: {why}")
            }
        }
    }
}

/// A relay named `machine` on `redis`, in proxy mode, with this drain grace and deadline.
async fn proxy_relay(redis: &TestRedis, machine: &str, grace: &str, deadline: &str) -> TestRelay {
    TestRelay::builder()
        .machine_id(machine)
        .redis(&redis.url())
        .routing("proxy")
        .arg("--drain-grace", grace)
        .arg("--drain-deadline", deadline)
        .spawn()
        .await
}

/// Asserts that the 6 drain steps and `stopped` were logged, once each, in
/// order, each step with its duration (`elapsed=`).
fn assert_steps_logged_in_order(logs: &[String]) {
    let mut positions = Vec::new();
    for needle in STEP_LINES {
        let hits: Vec<usize> = logs
            .iter()
            .enumerate()
            .filter(|(_, line)| line.contains(needle))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(
            hits.len(),
            1,
            "expected exactly one log line containing {needle:?}; log:\n{}",
            logs.join("\n")
        );
        assert!(
            logs[hits[0]].contains("elapsed="),
            "the {needle:?} line carries its duration: {}",
            logs[hits[0]]
        );
        positions.push(hits[0]);
    }
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "drain steps logged out of order (line numbers {positions:?} for {STEP_LINES:?})"
    );
}

/// Asserts that the drain ran to its end rather than being cut by the hard
/// deadline.
fn assert_not_cut_by_deadline(logs: &[String]) {
    let cut: Vec<&String> = logs
        .iter()
        .filter(|line| line.contains("drain deadline reached") || line.contains("still running"))
        .collect();
    assert!(cut.is_empty(), "the drain hit its hard deadline: {cut:?}");
}

/// `/ready`'s status code.
async fn ready_status(relay: &TestRelay) -> u16 {
    relay
        .http()
        .get(relay.http_url("/ready"))
        .send()
        .await
        .status
        .as_u16()
}

/// Tries to open a tunnel for `host_id`; returns the refusal (status and
/// `Retry-After`, `fly-replay` headers) or panics if the upgrade succeeded.
async fn refused_upgrade(
    relay: &TestRelay,
    host_id: &str,
) -> (u16, Option<String>, Option<String>) {
    let url = relay.tunnel_url(host_id, &relay.host_token(host_id));
    match WsClient::connect(&url, None).await {
        Ok(_) => panic!("the tunnel upgrade for {host_id} succeeded; expected a refusal"),
        Err(tungstenite::Error::Http(response)) => {
            let header = |name: &str| {
                response
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            (
                response.status().as_u16(),
                header("retry-after"),
                header("fly-replay"),
            )
        }
        Err(err) => panic!("the tunnel upgrade for {host_id} failed without an HTTP status: {err}"),
    }
}

/// `count` hosts on a relay with Redis (proxy mode) and `--drain-grace 500ms`;
/// every fifth host leaves on its `drain` like a moving agent, the others
/// stay. `signal` (`TERM` or `INT`) starts the drain.
async fn drain_many_tunnels_on(signal: &str, count: usize) {
    let redis = TestRedis::spawn().await;
    let mut relay = TestRelay::builder()
        .redis(&redis.url())
        .routing("proxy")
        .arg("--drain-grace", "500ms")
        .spawn()
        .await;
    let owner = relay.owner();
    let host_ids: Vec<String> = (0..count).map(|i| format!("h{i:02}")).collect();
    let mut hosts = Vec::new();
    for host_id in &host_ids {
        hosts.push(RawHost::connect(&relay, host_id).await);
    }
    wait_until_async(
        &format!("the directory names {owner} for all {count} hosts"),
        DEADLINE,
        || async {
            redis
                .strings("relay:host:*")
                .await
                .iter()
                .filter(|(_, value)| *value == owner)
                .count()
                == count
        },
    )
    .await;
    let readers: Vec<_> = hosts
        .into_iter()
        .zip(&host_ids)
        .enumerate()
        .map(|(i, (host, host_id))| {
            tokio::spawn(read_until_close(host, host_id.clone(), i % 5 == 0))
        })
        .collect();

    let signalled_at = Instant::now();
    relay.send_signal(signal);
    let ends = within("every tunnel to end", DEADLINE, join_all(readers)).await;
    let status = relay.wait_exit(DEADLINE).await;
    let took = signalled_at.elapsed();

    for (i, end) in ends.into_iter().enumerate() {
        let end = end.expect("tunnel reader task");
        let drains = end.types.iter().filter(|t| *t == "drain").count();
        assert_eq!(
            drains, 1,
            "{} gets exactly one `drain` before its Close; got {:?} then close {}",
            end.host_id, end.types, end.code
        );
        if i % 5 == 0 {
            assert_eq!(
                end.code, 1000,
                "{} left on its drain: the relay completes its close handshake",
                end.host_id
            );
        } else {
            assert_eq!(
                end.code, 4001,
                "{} stayed past the grace and is closed with 4001 (draining)",
                end.host_id
            );
        }
    }
    assert_eq!(
        status.code(),
        Some(0),
        "a drained relay exits 0, got {status}"
    );
    assert!(
        took < DRAIN_DEADLINE,
        "the drain took {took:?}, past its {DRAIN_DEADLINE:?} hard deadline"
    );
    let logs = relay.logs();
    assert_steps_logged_in_order(&logs);
    assert_not_cut_by_deadline(&logs);
    let left: Vec<(String, String)> = redis
        .strings("relay:host:*")
        .await
        .into_iter()
        .filter(|(_, value)| *value == owner)
        .collect();
    assert!(
        left.is_empty(),
        "directory entries of the drained relay {owner} remain: {left:?}"
    );
    assert_eq!(
        redis.smembers(&owned_key(&owner)).await,
        Vec::<String>::new(),
        "the drained relay's index is gone"
    );
}

#[tokio::test]
async fn sigterm_drains_50_tunnels_drain_before_4001_clears_directory_and_exits_0_in_order() {
    drain_many_tunnels_on("TERM", 50).await;
}

#[tokio::test]
async fn sigint_drains_like_sigterm() {
    drain_many_tunnels_on("INT", 10).await;
}

/// A request to `host` (a [`RawHost`] that never answers it) in flight: a relay on the
/// embedded directory ends its drain's keep-serving step as soon as nothing is in flight,
/// so a test that watches that step holds something.
async fn hold_a_request(relay: &TestRelay, host: &mut RawHost) -> tokio::task::JoinHandle<()> {
    let http = relay.http().clone();
    let url = relay.http_url("/hosts/stays/held");
    let token = relay.client_token(&["stays"]);
    let request = tokio::spawn(async move {
        let _ = http.get(url).bearer(&token).try_send().await;
    });
    host.expect("http").await;
    request
}

#[tokio::test]
async fn draining_relay_reports_not_ready_refuses_new_tunnels_with_503_retry_after_0_and_still_serves()
 {
    let mut relay = TestRelay::builder()
        .arg("--drain-grace", LONG_GRACE)
        .arg("--drain-deadline", LONG_DEADLINE)
        .spawn()
        .await;
    let mut host = RawHost::connect(&relay, "stays").await;
    assert_eq!(ready_status(&relay).await, 200, "ready before the drain");
    let _held = hold_a_request(&relay, &mut host).await;

    let signalled_at = Instant::now();
    relay.send_sigterm();
    host.expect("drain").await;
    wait_until_async("/ready answers 503", DEADLINE, || async {
        ready_status(&relay).await == 503
    })
    .await;
    let (status, retry_after, fly_replay) = refused_upgrade(&relay, "late").await;
    assert_eq!(status, 503, "a new tunnel is refused while draining");
    assert_eq!(
        retry_after.as_deref(),
        Some("0"),
        "`Retry-After: 0`: try another relay now"
    );
    assert_eq!(fly_replay, None, "no fly-replay header in proxy mode");
    assert_eq!(
        relay
            .counter(
                "relay_admission_rejections_total",
                &[("reason", "draining")]
            )
            .await,
        1.0
    );

    // Step 3: the tunnel that stays keeps serving.
    let client = relay.http().clone();
    let url = relay.http_url("/hosts/stays/echo");
    let token = relay.client_token(&["stays"]);
    let request = tokio::spawn(async move { client.get(url).bearer(&token).send().await });
    let msg = host.expect("http").await;
    host.respond(&msg_id(&msg), 200, json!({}), "still here")
        .await;
    let resp = within("the response during the drain", DEADLINE, request)
        .await
        .expect("client task");
    resp.assert_status(200);
    assert_eq!(resp.text(), "still here");

    // The last agent leaves: the drain goes on at once instead of waiting
    // out the 20 s grace.
    host.close(1000).await;
    let status = relay.wait_exit(DEADLINE).await;
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(
        signalled_at.elapsed() < Duration::from_secs(10),
        "the relay waited {:?} although every agent had left",
        signalled_at.elapsed()
    );
    let logs = relay.logs();
    assert!(
        logs.iter()
            .any(|line| line.contains("drain 3/6") && line.contains("ended=all_closed")),
        "step 3 ends because every agent left"
    );
    assert_steps_logged_in_order(&logs);
}

#[tokio::test]
async fn draining_relay_in_fly_replay_mode_points_new_tunnels_elsewhere_with_fly_replay() {
    let relay = TestRelay::builder()
        .app_name("relay-test")
        .routing("fly-replay")
        .arg("--drain-grace", LONG_GRACE)
        .arg("--drain-deadline", LONG_DEADLINE)
        .spawn()
        .await;
    let mut host = RawHost::connect(&relay, "stays").await;
    let _held = hold_a_request(&relay, &mut host).await;

    relay.send_sigterm();
    host.expect("drain").await;
    let (status, retry_after, fly_replay) = refused_upgrade(&relay, "late").await;
    assert_eq!(status, 503);
    assert_eq!(retry_after.as_deref(), Some("0"));
    assert_eq!(
        fly_replay.as_deref(),
        Some("elsewhere=true"),
        "Fly's proxy retries the upgrade on another machine"
    );
}

#[tokio::test]
async fn request_in_flight_at_the_signal_completes_with_200_within_the_grace() {
    // Default grace (3 s): the host (a TestHost, which ignores `drain`) stays
    // and the 2 s answer arrives while its tunnel is still served.
    let mut stack = Stack::spawn("web-1").await;
    let token = stack.client_token();
    let client = stack.relay.http().clone();
    let url = stack.url("/slow?ms=2000");
    let request = tokio::spawn(async move { client.get(url).bearer(&token).try_send().await });
    wait_until("the slow request reaches the upstream", DEADLINE, || {
        stack.upstream.requests() == 1
    })
    .await;

    stack.relay.send_sigterm();
    let resp = within("the in-flight response", DEADLINE, request)
        .await
        .expect("client task")
        .unwrap_or_else(|err| panic!("the in-flight request failed during the drain: {err}"));
    resp.assert_status(200);
    assert_eq!(resp.text(), "slow done");
    assert_eq!(stack.host.seen_of_type("drain"), 1, "the host was told");
    let status = stack.relay.wait_exit(DEADLINE).await;
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert_eq!(
        stack.host.wait_ended(DEADLINE).await,
        WsEnd::Close(4001),
        "the host stayed past the grace"
    );
}

#[tokio::test]
async fn answer_arriving_after_close_4001_within_close_wait_still_reaches_client() {
    let mut relay = TestRelay::builder()
        .arg("--drain-grace", "300ms")
        .spawn()
        .await;
    let mut host = RawHost::connect(&relay, "h1").await;
    let client = relay.http().clone();
    let url = relay.http_url("/hosts/h1/echo");
    let token = relay.client_token(&["h1"]);
    let request = tokio::spawn(async move { client.get(url).bearer(&token).try_send().await });
    let id = msg_id(&host.expect("http").await);

    relay.send_sigterm();
    host.expect("drain").await;
    relay.wait_for_log("drain 4/6", DEADLINE).await;
    // The Close frame (4001) is on its way: wait until its bytes are in the
    // socket, without reading them (a WebSocket that has read the peer's
    // Close may not send any more), then answer.
    let MaybeTlsStream::Plain(tcp) = host.ws_mut().stream_mut().get_ref() else {
        panic!("the test tunnel is plain TCP");
    };
    let mut peeked = [0_u8; 2];
    let n = within(
        "the relay's Close frame to arrive",
        DEADLINE,
        tcp.peek(&mut peeked),
    )
    .await
    .expect("peek on the tunnel socket");
    assert!(
        n > 0,
        "the relay closed the TCP connection without a Close frame"
    );
    assert_eq!(
        peeked[0] & 0x0f,
        0x8,
        "the next frame on the tunnel is a Close frame"
    );
    host.respond(&id, 200, json!({}), "late answer").await;

    let resp = within("the late answer", DEADLINE, request)
        .await
        .expect("client task")
        .unwrap_or_else(|err| panic!("the late answer was lost: {err}"));
    resp.assert_status(200);
    assert_eq!(resp.text(), "late answer");
    assert_eq!(host.recv_close_code(DEADLINE).await, 4001);
    let status = relay.wait_exit(DEADLINE).await;
    assert_eq!(status.code(), Some(0), "exit status {status}");
}

#[tokio::test]
async fn draining_relay_forwards_requests_to_new_owner_once_agent_moved_and_leaves_its_entry() {
    let redis = TestRedis::spawn().await;
    let spawn = |machine, grace, deadline| proxy_relay(&redis, machine, grace, deadline);
    let mut old_relay = spawn("relay-a", LONG_GRACE, LONG_DEADLINE).await;
    let new_relay = spawn("relay-b", "3s", "8s").await;
    let upstream = Upstream::spawn().await;
    let old = TestHost::connect(&old_relay, "web-1", &upstream).await;
    redis.wait_host_owner("web-1", &old_relay).await;
    redis.wait_advertised(&new_relay).await;
    let token = old_relay.client_token(&["web-1"]);
    let get = |path: &str| {
        old_relay
            .http()
            .get(old_relay.http_url(&format!("/hosts/web-1{path}")))
            .bearer(&token)
            .send()
    };

    old_relay.send_sigterm();
    wait_until("the old tunnel is told to drain", DEADLINE, || {
        old.seen_of_type("drain") == 1
    })
    .await;
    get("/echo/before-move").await.assert_status(200);
    assert_eq!(
        old.seen_of_type("http"),
        1,
        "before the agent moved, the draining relay serves over its own tunnel"
    );

    // A channel open on the old tunnel keeps it busy: the drain may not end on an idle
    // moved tunnel while this test still talks to the old relay.
    let mut channel =
        WsClient::connect_ok(&old_relay.ws_url("/hosts/web-1/ws/echo"), Some(&token)).await;

    // The agent opens its new tunnel on another relay and keeps the old one.
    let new = TestHost::connect(&new_relay, "web-1", &upstream).await;
    redis.wait_host_owner("web-1", &new_relay).await;
    let resp = get("/echo/after-move").await;
    resp.assert_status(200);
    assert_eq!(resp.json()["path"], "/echo/after-move");
    assert_eq!(
        (old.seen_of_type("http"), new.seen_of_type("http")),
        (1, 1),
        "once the host registered elsewhere, new requests go to its new owner"
    );

    // The channel ends and the agent lets the old tunnel go: the old relay finishes.
    channel.close(1000).await;
    old.close(1000);
    let status = old_relay.wait_exit(DEADLINE).await;
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert_eq!(
        redis.get(&host_key("web-1")).await,
        Some(new_relay.owner()),
        "the entry the new owner wrote survives the old relay's clear"
    );
    let resp = new_relay
        .http()
        .get(new_relay.http_url("/hosts/web-1/echo/later"))
        .bearer(&token)
        .send()
        .await;
    resp.assert_status(200);
}

#[tokio::test]
async fn drain_ends_once_every_host_registered_elsewhere_and_its_old_tunnel_is_idle() {
    let redis = TestRedis::spawn().await;
    let spawn = |machine, grace, deadline| proxy_relay(&redis, machine, grace, deadline);
    let mut a = spawn("relay-a", LONG_GRACE, LONG_DEADLINE).await;
    let b = spawn("relay-b", "3s", "8s").await;
    let upstream = Upstream::spawn().await;
    let hosts = ["web-1", "web-2", "web-3"];
    let mut old = Vec::new();
    for host in hosts {
        old.push(TestHost::connect(&a, host, &upstream).await);
        redis.wait_host_owner(host, &a).await;
    }

    let signalled_at = Instant::now();
    a.send_sigterm();
    wait_until("every old tunnel is told to drain", DEADLINE, || {
        old.iter().all(|host| host.seen_of_type("drain") == 1)
    })
    .await;
    // Two hosts move, like agents that keep their old tunnel open (v1 agents may wait
    // for the 4001). The third has not moved: the drain must wait for it.
    let mut new = Vec::new();
    for host in &hosts[..2] {
        new.push(TestHost::connect(&b, host, &upstream).await);
        redis.wait_host_owner(host, &b).await;
    }
    // Three more of the relay's directory polls, each seeing two hosts moved and one
    // not: it must still be draining.
    let polls = |metrics: &str| {
        counter_value(
            metrics,
            "relay_directory_ops_total",
            &[("op", "lookup_many"), ("outcome", "ok")],
        )
    };
    let before = polls(&a.metrics().await);
    wait_until_async(
        "the relay polls the directory 3 more times",
        DEADLINE,
        || async { polls(&a.metrics().await) >= before + 3.0 },
    )
    .await;
    assert!(
        a.try_exit_status().is_none(),
        "the relay ended its drain while web-3 had not moved"
    );
    assert!(old.iter().all(|host| host.ended().is_none()));

    new.push(TestHost::connect(&b, hosts[2], &upstream).await);
    redis.wait_host_owner(hosts[2], &b).await;
    let moved_at = signalled_at.elapsed();
    let status = a.wait_exit(DEADLINE).await;
    let took = signalled_at.elapsed();
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(
        took < Duration::from_secs(10),
        "the relay took {took:?} to exit (every host moved after {moved_at:?}): it must not \
         wait out the 20 s grace for old tunnels that are idle and replaced"
    );
    for host in &old {
        assert_eq!(
            host.wait_ended(DEADLINE).await,
            WsEnd::Close(4001),
            "an old tunnel still open at the end is closed with 4001"
        );
    }
    let logs = a.logs();
    assert!(
        logs.iter()
            .any(|line| line.contains("drain 3/6") && line.contains("ended=all_moved")),
        "step 3 says it ended because every host moved"
    );
    assert_steps_logged_in_order(&logs);
    for host in hosts {
        assert_eq!(
            redis.get(&host_key(host)).await,
            Some(b.owner()),
            "{host}'s new entry survives the old relay's clear"
        );
    }
    drop(new);
}

#[tokio::test]
async fn in_flight_request_finishes_on_old_h2_tunnel_while_agent_moves_and_relay_exits_once_it_left()
 {
    in_flight_request_finishes_while_agent_moves("h2").await;
}

#[tokio::test]
async fn in_flight_request_finishes_on_old_v1_tunnel_while_agent_moves_and_relay_exits_once_it_left()
 {
    in_flight_request_finishes_while_agent_moves("v1").await;
}

/// Relays a and b on one Redis (6 s grace, 10 s deadline) and a `protocol` agent for
/// web-1, registered on a, that moves to b when a drains.
async fn agent_ready_to_move(
    protocol: &str,
) -> (TestRedis, TestRelay, TestRelay, Upstream, TestAgent) {
    let redis = TestRedis::spawn().await;
    let a = proxy_relay(&redis, "relay-a", "6s", "10s").await;
    let b = proxy_relay(&redis, "relay-b", "6s", "10s").await;
    let upstream = Upstream::spawn().await;
    let agent = TestAgent::for_relay(&a, "web-1", &upstream)
        .relay(&b.ws_url(""))
        .drain_spread("50ms")
        .protocol(protocol)
        .spawn();
    agent.wait_connected_to(&a).await;
    redis.wait_host_owner("web-1", &a).await;
    (redis, a, b, upstream, agent)
}

/// A slow request is in flight on a `protocol` tunnel when its relay drains: it
/// completes on the old tunnel while the agent moves to the other relay.
async fn in_flight_request_finishes_while_agent_moves(protocol: &str) {
    let (redis, mut a, b, upstream, agent) = agent_ready_to_move(protocol).await;
    let token = a.client_token(&["web-1"]);
    let client = a.http().clone();
    let url = a.http_url("/hosts/web-1/slow?ms=2000");
    let request = tokio::spawn(async move { client.get(url).bearer(&token).try_send().await });
    wait_until("the slow request reaches the upstream", DEADLINE, || {
        upstream.requests() == 1
    })
    .await;

    let signalled_at = Instant::now();
    a.send_sigterm();
    agent.wait_connected_to(&b).await;
    redis.wait_host_owner("web-1", &b).await;
    let resp = within("the in-flight response", DEADLINE, request)
        .await
        .expect("client task")
        .unwrap_or_else(|err| panic!("the in-flight request failed while the agent moved: {err}"));
    resp.assert_status(200);
    assert_eq!(resp.text(), "slow done");
    let status = a.wait_exit(DEADLINE).await;
    let took = signalled_at.elapsed();
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(
        took < Duration::from_secs(5),
        "the relay took {took:?} to exit: it should go as soon as the agent let its old tunnel \
         go (~2 s, when the slow answer was in), not at the end of the 6 s grace"
    );
    assert!(
        a.logs().iter().any(|line| line.contains("drain 3/6")
            && (line.contains("ended=all_closed") || line.contains("ended=all_moved"))),
        "step 3 ends because the agent moved, not at the end of the grace"
    );
}

#[tokio::test]
async fn an_h2_tunnel_with_no_http2_connection_up_moves_off_a_draining_relay_at_once() {
    let (redis, mut a, b, _upstream, agent) = agent_ready_to_move("h2").await;
    // No stream ever: the tunnel has no HTTP/2 connection. Moving it must not need one.

    let signalled_at = Instant::now();
    a.send_sigterm();
    agent.wait_connected_to(&b).await;
    redis.wait_host_owner("web-1", &b).await;
    let status = a.wait_exit(DEADLINE).await;
    let took = signalled_at.elapsed();
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(
        took < Duration::from_secs(5),
        "the relay took {took:?} to exit: it should go once the agent moved, not at the end of \
         the 6 s grace"
    );
    assert!(
        a.logs()
            .iter()
            .any(|line| line.contains("drain 3/6") && line.contains("ended=all_moved")),
        "step 3 ends because the agent moved: {:#?}",
        a.logs()
    );
    let response = b
        .http()
        .get(b.http_url("/hosts/web-1/echo/after"))
        .bearer(&b.client_token(&["web-1"]))
        .send()
        .await;
    response.assert_status(200);
}

#[tokio::test]
async fn drain_with_redis_down_finishes_before_deadline_exits_0_and_warns_about_directory() {
    let mut redis = TestRedis::spawn().await;
    let mut relay = TestRelay::builder()
        .redis(&redis.url())
        .routing("proxy")
        .arg("--drain-grace", "500ms")
        .spawn()
        .await;
    let host = RawHost::connect(&relay, "h1").await;
    redis.wait_host_owner("h1", &relay).await;
    let reader = tokio::spawn(read_until_close(host, "h1".to_owned(), false));
    redis.kill().await;

    let signalled_at = Instant::now();
    relay.send_sigterm();
    let end = within("the tunnel to end", DEADLINE, reader)
        .await
        .expect("tunnel reader task");
    let status = relay.wait_exit(DEADLINE).await;
    let took = signalled_at.elapsed();

    assert_eq!(
        end.types,
        vec!["drain".to_owned()],
        "drain before the close"
    );
    assert_eq!(end.code, 4001);
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(
        took < DRAIN_DEADLINE,
        "the drain took {took:?}, past its {DRAIN_DEADLINE:?} deadline"
    );
    let logs = relay.logs();
    assert_steps_logged_in_order(&logs);
    assert_not_cut_by_deadline(&logs);
    let warnings: Vec<&String> = logs
        .iter()
        .filter(|line| line.contains("WARN") && line.contains(r#"op="retire""#))
        .collect();
    assert!(
        !warnings.is_empty(),
        "a WARN line says the drain's retire (removing this machine's entries) failed; log:\n{}",
        logs.join("\n")
    );
    assert!(
        logs.iter()
            .any(|line| line.contains("WARN") && line.contains("drain 4/6")),
        "step 4 is logged as a warning when the entries could not be removed"
    );
}

#[tokio::test]
async fn second_signal_during_the_drain_exits_at_once_with_130() {
    let mut relay = TestRelay::builder()
        .arg("--drain-grace", LONG_GRACE)
        .arg("--drain-deadline", LONG_DEADLINE)
        .spawn()
        .await;
    let mut host = RawHost::connect(&relay, "stays").await;
    let _held = hold_a_request(&relay, &mut host).await;

    relay.send_sigterm();
    relay.wait_for_log("drain 2/6", DEADLINE).await;
    let second_at = Instant::now();
    relay.send_signal("INT");
    let status = relay.wait_exit(DEADLINE).await;
    let took = second_at.elapsed();

    assert_eq!(
        status.code(),
        Some(130),
        "a second signal exits with 130, got {status}"
    );
    assert!(
        took < Duration::from_secs(2),
        "exit took {took:?} after the second signal; the grace was {LONG_GRACE}"
    );
    let logs = relay.logs();
    assert!(
        logs.iter().any(|line| line.contains("second signal")),
        "the early exit is logged"
    );
    assert!(
        !logs.iter().any(|line| line.contains("drain 3/6")),
        "the drain did not get past its grace"
    );
}

#[tokio::test]
async fn admission_over_rate_gets_429_with_retry_after_seconds_then_admits_after_that_wait() {
    let relay = TestRelay::builder()
        .arg("--admission-rate", "1")
        .arg("--admission-burst", "3")
        .spawn()
        .await;
    let mut admitted = Vec::new();
    for host_id in ["h1", "h2", "h3"] {
        let url = relay.tunnel_url(host_id, &relay.host_token(host_id));
        admitted.push(RawHost::connect_url(&url, None).await);
    }
    let url = relay.tunnel_url("h4", &relay.host_token("h4"));
    let err = match WsClient::connect(&url, None).await {
        Ok(_) => panic!("a 4th upgrade at once is admitted beyond the burst of 3"),
        Err(err) => err,
    };
    assert_eq!(rejection_status(&err), Some(429), "{err}");
    let tungstenite::Error::Http(response) = &err else {
        unreachable!("rejection_status found a status")
    };
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("429 without Retry-After: {response:?}"));
    let seconds: u64 = retry_after.parse().unwrap_or_else(|err| {
        panic!("Retry-After {retry_after:?} is not a whole number of seconds: {err}")
    });
    assert!(seconds >= 1, "Retry-After is at least 1 s, got {seconds}");
    for host_id in ["h1", "h2", "h3"] {
        relay.wait_host_connected(host_id).await;
    }
    assert_eq!(
        relay
            .counter("relay_admission_rejections_total", &[("reason", "rate")])
            .await,
        1.0
    );

    // Doing what the 429 says is the behaviour under test: wait exactly
    // Retry-After, then come back.
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let _late = RawHost::connect_url(&url, None).await;
    relay.wait_host_connected("h4").await;
}

#[tokio::test]
async fn a_flood_of_bad_token_upgrades_spends_no_admission_and_is_logged_as_one_summary() {
    let relay = TestRelay::builder()
        .arg("--admission-rate", "1")
        .arg("--admission-burst", "2")
        .spawn()
        .await;
    let forged = relay_tests::Claims::host("h1").sign("not-the-relay-secret");
    for _ in 0..30 {
        let mut refused = RawHost::connect_url(&relay.tunnel_url("h1", &forged), None).await;
        assert_eq!(refused.recv_close_code(DEADLINE).await, 1008);
    }
    // The burst of 2 is still there for agents with good tokens.
    let mut admitted = Vec::new();
    for host_id in ["h1", "h2"] {
        let url = relay.tunnel_url(host_id, &relay.host_token(host_id));
        admitted.push(RawHost::connect_url(&url, None).await);
        relay.wait_host_connected(host_id).await;
    }
    assert_eq!(
        relay
            .counter("relay_admission_rejections_total", &[("reason", "rate")])
            .await,
        0.0
    );
    assert_eq!(
        relay
            .counter("relay_auth_failures_total", &[("endpoint", "tunnel")])
            .await,
        30.0,
        "every refusal is counted"
    );
    let lines = relay
        .logs()
        .iter()
        .filter(|line| line.contains("tunnel refused"))
        .count();
    assert_eq!(
        lines, 1,
        "30 refusals make one log line within the interval, not 30"
    );
}

#[tokio::test]
async fn refused_registrations_from_one_address_past_its_rate_get_a_bare_429_and_a_good_agent_still_registers()
 {
    let relay = TestRelay::spawn().await;
    let forged = relay_tests::Claims::host("h1").sign("not-the-relay-secret");
    let url = relay.tunnel_url("h1", &forged);
    let mut closed_1008 = 0;
    let mut bare_429 = 0;
    // The burst (50) gets the full answer, an upgrade closed with the reason; past it,
    // refusals from this address cost the relay no upgrade.
    for _ in 0..60 {
        match relay_tests::WsClient::connect(&url, None).await {
            Ok(mut ws) => {
                assert_eq!(ws.recv_close_code(DEADLINE).await, 1008);
                closed_1008 += 1;
            }
            Err(err) => {
                assert_eq!(rejection_status(&err), Some(429), "{err}");
                bare_429 += 1;
            }
        }
    }
    assert!(
        (50..60).contains(&closed_1008) && bare_429 > 0,
        "{closed_1008} closed with 1008, {bare_429} answered 429"
    );
    assert!(
        relay
            .counter(
                "relay_admission_rejections_total",
                &[("reason", "refusals")]
            )
            .await
            >= 1.0
    );
    // A good token from the same address is not refused: only refusals are limited.
    let _agent = RawHost::connect(&relay, "h1").await;
}

/// A relay with a 300 ms drain grace and `relay agent` on a `protocol` tunnel, and a
/// request for an upstream answer `ms` milliseconds away, in flight at the upstream.
struct SlowRequest {
    relay: TestRelay,
    _agent: TestAgent,
    _upstream: Upstream,
    request: tokio::task::JoinHandle<Result<relay_tests::HttpResponse, String>>,
}

async fn slow_request_through_agent(protocol: &str, ms: u64) -> SlowRequest {
    let relay = TestRelay::builder()
        .arg("--drain-grace", "300ms")
        .spawn()
        .await;
    let upstream = Upstream::spawn().await;
    let agent = TestAgent::for_relay(&relay, "web-1", &upstream)
        .protocol(protocol)
        .spawn();
    agent.wait_connected_to(&relay).await;
    let client = relay.http().clone();
    let url = relay.http_url(&format!("/hosts/web-1/slow?ms={ms}"));
    let token = relay.client_token(&["web-1"]);
    let request = tokio::spawn(async move { client.get(url).bearer(&token).try_send().await });
    wait_until("the slow request reaches the upstream", DEADLINE, || {
        upstream.requests() == 1
    })
    .await;
    SlowRequest {
        relay,
        _agent: agent,
        _upstream: upstream,
        request,
    }
}

#[tokio::test]
async fn an_answer_that_comes_within_the_close_wait_after_the_grace_reaches_its_client_through_relay_agent()
 {
    for protocol in ["v1", "h2"] {
        // Answered 1.2 s after it starts: after the 300 ms grace, within the 1.5 s the
        // relay then waits for answers in flight.
        // The agent and upstream are bound, not `..`: they must live to the end.
        let SlowRequest {
            mut relay,
            request,
            _agent,
            _upstream,
        } = slow_request_through_agent(protocol, 1_200).await;
        relay.send_sigterm();
        let answer = within("the slow answer", DEADLINE, request)
            .await
            .expect("client task")
            .unwrap_or_else(|err| panic!("{protocol}: the answer was lost: {err}"));
        assert_eq!(answer.status, 200, "{protocol}: {}", answer.text());
        assert_eq!(answer.text(), "slow done");
        let status = relay.wait_exit(DEADLINE).await;
        assert_eq!(status.code(), Some(0), "{protocol}: exit status {status}");
    }
}

#[tokio::test]
async fn streams_cut_at_the_end_of_a_drain_are_counted_and_logged_and_the_relay_still_exits_0() {
    for protocol in ["h2", "v1"] {
        let SlowRequest {
            mut relay,
            request,
            _agent,
            _upstream,
        } = slow_request_through_agent(protocol, 30_000).await;
        relay.send_sigterm();
        let status = relay.wait_exit(DEADLINE).await;
        assert_eq!(status.code(), Some(0), "{protocol}: exit status {status}");
        let answer = within("the cut request ends", DEADLINE, request)
            .await
            .expect("client task");
        assert!(
            answer
                .as_ref()
                .map_or(true, |response| response.status != 200),
            "{protocol}: a request the drain cut cannot have succeeded: {answer:?}"
        );
        assert!(
            relay.logs().iter().any(|line| line.contains("drain cut")
                && line.contains("exchanges=1")
                && line.contains("channels=0")),
            "{protocol}: the cut is logged with what was cut: {:#?}",
            relay.logs()
        );
    }
}

#[tokio::test]
async fn tunnel_gets_a_ping_right_after_its_directory_entry_is_written() {
    let redis = TestRedis::spawn().await;
    let relay = TestRelay::builder()
        .redis(&redis.url())
        .routing("proxy")
        .spawn()
        .await;
    let connected_at = Instant::now();
    let mut host =
        RawHost::connect_url(&relay.tunnel_url("h1", &relay.host_token("h1")), None).await;
    let first = within(
        "a ping right after registration (the periodic one is 30 s away)",
        Duration::from_secs(1),
        host.recv_raw(DEADLINE),
    )
    .await
    .unwrap_or_else(|end| panic!("the tunnel ended instead: {end:?}"));
    let took = connected_at.elapsed();

    assert_eq!(msg_type(&first), "ping", "first message: {first}");
    assert_eq!(
        redis.get(&host_key("h1")).await,
        Some(relay.owner()),
        "by the time of the ping, the host is routable: its directory entry is written"
    );
    println!("first ping {took:?} after the upgrade");
}

#[tokio::test]
async fn client_websocket_bridged_through_a_draining_relay_is_closed_with_1001_without_holding_the_exit()
 {
    let redis = TestRedis::spawn().await;
    let spawn = |machine: &'static str| {
        TestRelay::builder()
            .machine_id(machine)
            .redis(&redis.url())
            .routing("proxy")
            .spawn()
    };
    let mut entry = spawn("relay-a").await;
    let owner = spawn("relay-b").await;
    let upstream = Upstream::spawn().await;
    let _host = TestHost::connect(&owner, "web-1", &upstream).await;
    redis.wait_host_owner("web-1", &owner).await;
    redis.wait_advertised(&owner).await;
    let token = entry.client_token(&["web-1"]);
    let mut channel =
        WsClient::connect_ok(&entry.ws_url("/hosts/web-1/ws/echo"), Some(&token)).await;
    channel.send_text("bridged").await;
    assert_eq!(channel.recv_text().await, "bridged");

    // The entry relay holds no tunnel: its drain has nothing to wait for.
    let signalled_at = Instant::now();
    entry.send_sigterm();
    let code = channel.recv_close_code(DRAIN_DEADLINE).await;
    let status = entry.wait_exit(DEADLINE).await;
    let took = signalled_at.elapsed();

    assert_eq!(
        code, 1001,
        "a client WebSocket on a relay that goes away is closed with 1001"
    );
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(
        took < Duration::from_secs(4),
        "the relay took {took:?} to exit with a bridged WebSocket open (its drain had no \
         tunnel to wait for; the hard deadline is {DRAIN_DEADLINE:?})"
    );
    assert_not_cut_by_deadline(&entry.logs());
}

#[tokio::test]
async fn connection_accepted_before_the_relay_stops_accepting_is_still_served_after_step_4() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    // The relay's debug line for each accepted connection names the peer.
    let mut relay = TestRelay::builder()
        .arg("--drain-grace", "300ms")
        .rust_log("info,relay::connections=debug")
        .spawn()
        .await;
    // A host with an exchange in flight keeps the drain in step 5 (the relay
    // waits up to 1.5 s for its answer) until the test answers.
    let mut host = RawHost::connect(&relay, "h1").await;
    let client = relay.http().clone();
    let url = relay.http_url("/hosts/h1/echo");
    let token = relay.client_token(&["h1"]);
    let pending = tokio::spawn(async move { client.get(url).bearer(&token).try_send().await });
    let id = msg_id(&host.expect("http").await);
    let mut conn = tokio::net::TcpStream::connect(relay.addr())
        .await
        .expect("connect to the relay");
    let local = conn.local_addr().expect("local address");
    relay
        .wait_for_log(&format!("connection {local} accepted"), DEADLINE)
        .await;

    relay.send_sigterm();
    host.expect("drain").await;
    relay.wait_for_log("drain 4/6", DEADLINE).await;
    // The request of a client whose connection was accepted a moment before
    // (a balancer's, or a slow client's), arriving after step 4.
    conn.write_all(b"GET /health HTTP/1.1\r\nhost: relay\r\nconnection: close\r\n\r\n")
        .await
        .expect("write the request");
    let mut response = Vec::new();
    let read = within(
        "the response (or the connection's end)",
        DEADLINE,
        conn.read_to_end(&mut response),
    )
    .await;
    let response = String::from_utf8_lossy(&response);
    assert!(
        response.starts_with("HTTP/1.1 200"),
        "a connection the relay accepted before it stopped accepting was closed without an \
         answer to its first request: read {read:?}, got {response:?}"
    );
    assert!(
        !relay.logs().iter().any(|line| line.contains("drain 6/6")),
        "the drain was still in step 5 when the request was answered"
    );

    host.respond(&id, 200, json!({}), "answered").await;
    let resp = within("the pending exchange", DEADLINE, pending)
        .await
        .expect("client task")
        .unwrap_or_else(|err| panic!("the pending exchange failed: {err}"));
    resp.assert_status(200);
    let status = relay.wait_exit(DEADLINE).await;
    assert_eq!(status.code(), Some(0), "exit status {status}");
}

#[tokio::test]
async fn a_relay_alone_with_nothing_in_flight_skips_the_drain_grace() {
    // The embedded directory: no other relay for agents to move to.
    let mut relay = TestRelay::builder()
        .arg("--drain-grace", LONG_GRACE)
        .arg("--drain-deadline", LONG_DEADLINE)
        .spawn()
        .await;
    let _host = RawHost::connect(&relay, "idle").await;
    let signalled_at = Instant::now();
    relay.send_sigterm();
    let status = relay.wait_exit(DEADLINE).await;
    assert_eq!(status.code(), Some(0));
    let took = signalled_at.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "exited {took:?} after the signal, without waiting the {LONG_GRACE} grace"
    );
    assert!(
        relay
            .logs()
            .iter()
            .any(|line| line.contains("drain 3/6") && line.contains("ended=alone_idle")),
        "step 3 says why it ended"
    );
}
