//! Cross-machine routing: several relay processes share one Redis directory,
//! and a request that lands on a relay which does not hold the host's tunnel
//! reaches the owner (proxied, or answered with `fly-replay`).
//!
//! Every test runs its own `redis-server` and two or three relays on
//! `127.0.0.1`, with distinct machine ids. The relays advertise their bound
//! address, so nothing but `--redis-url` is needed to make them peers.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::Method;
use relay_tests::{
    Claims, DEADLINE, RawHost, RelayBuilder, TestHost, TestRedis, TestRelay, Upstream, WsClient,
    addr_key, host_key, owned_key, rejection_status, unused_port, wait_until, wait_until_async,
    within,
};
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// An answer the relay can give without any network wait beyond loopback;
/// far below every timeout involved (directory, exchange, connect retries).
const QUICK: Duration = Duration::from_secs(2);

/// Bound for "the owner is unreachable": a refused connect, one more lookup,
/// one retry. Generous against a loaded machine, far below the 30 s
/// exchange timeout.
const UNREACHABLE_BOUND: Duration = Duration::from_secs(5);

const CLIENT_REQUESTS: &str = "relay_client_requests_total";

/// A relay in `region` named `machine`, on the Redis directory, proxying; for a test to
/// set more before it spawns.
fn proxying(redis: &TestRedis, region: &str, machine: &str) -> RelayBuilder {
    TestRelay::builder()
        .region(region)
        .machine_id(machine)
        .redis(&redis.url())
        .routing("proxy")
}

/// [`proxying`], spawned.
async fn relay_on(redis: &TestRedis, region: &str, machine: &str) -> TestRelay {
    proxying(redis, region, machine).spawn().await
}

/// Connects a [`TestHost`] for `host_id` to `owner` and waits until the
/// directory names `owner` and `owner` has advertised its address, so any
/// peer can route to it.
async fn host_on(
    redis: &TestRedis,
    owner: &TestRelay,
    host_id: &str,
    upstream: &Upstream,
) -> TestHost {
    let host = TestHost::connect(owner, host_id, upstream).await;
    redis.wait_host_owner(host_id, owner).await;
    redis.wait_advertised(owner).await;
    host
}

/// `url` on `relay` for `host_id`: `/hosts/{host_id}{path}`.
fn host_url(relay: &TestRelay, host_id: &str, path: &str) -> String {
    relay.http_url(&format!("/hosts/{host_id}{path}"))
}

#[tokio::test]
async fn relays_publish_hosts_and_advertise_bound_address_in_redis_layout() {
    let redis = TestRedis::spawn().await;
    let a = relay_on(&redis, "ams", "relay-a").await;
    let upstream = Upstream::spawn().await;
    let _host = host_on(&redis, &a, "web-1", &upstream).await;

    assert_eq!(
        redis.get(&host_key("web-1")).await.as_deref(),
        Some("ams:relay-a")
    );
    let ttl = redis.pttl(&host_key("web-1")).await;
    assert!(
        ttl > 0 && ttl <= 90_000,
        "the host entry expires on its own within the 90 s directory TTL, PTTL {ttl}"
    );
    assert_eq!(
        redis.smembers(&owned_key("ams:relay-a")).await,
        vec!["web-1".to_owned()],
        "the owner's index lists its host"
    );
    assert_eq!(
        redis.get(&addr_key("ams:relay-a")).await,
        Some(a.addr().to_string()),
        "without --advertise-addr the relay advertises its bound address"
    );
    let ttl = redis.pttl(&addr_key("ams:relay-a")).await;
    assert!(
        ttl > 0 && ttl <= 30_000,
        "the advertisement expires on its own within 3 reconcile intervals (10 s), PTTL {ttl}"
    );
}

#[tokio::test]
async fn redis_prefix_namespaces_every_key_and_peers_with_same_prefix_route() {
    let redis = TestRedis::spawn().await;
    let spawn = |machine: &'static str| {
        TestRelay::builder()
            .region("ams")
            .machine_id(machine)
            .redis(&redis.url())
            .redis_prefix("t1:")
            .routing("proxy")
            .spawn()
    };
    let a = spawn("relay-a").await;
    let b = spawn("relay-b").await;
    let upstream = Upstream::spawn().await;
    let _host = TestHost::connect(&a, "web-1", &upstream).await;

    redis
        .wait_value("t1:host:web-1", "ams:relay-a", DEADLINE)
        .await;
    redis
        .wait_value("t1:addr:ams:relay-a", &a.addr().to_string(), DEADLINE)
        .await;
    assert_eq!(
        redis.keys("relay:*").await,
        Vec::<String>::new(),
        "nothing is written under the default prefix"
    );

    let resp = b
        .http()
        .get(host_url(&b, "web-1", "/echo/prefixed"))
        .bearer(&b.client_token(&["web-1"]))
        .send()
        .await;
    resp.assert_status(200);
    assert_eq!(resp.json()["path"], "/echo/prefixed");
}

#[tokio::test]
async fn http_get_and_post_for_host_on_another_relay_are_proxied_to_owner() {
    let redis = TestRedis::spawn().await;
    let a = relay_on(&redis, "ams", "relay-a").await;
    let b = relay_on(&redis, "fra", "relay-b").await;
    let upstream = Upstream::spawn().await;
    let _host = host_on(&redis, &a, "web-1", &upstream).await;
    let token = b.client_token(&["web-1"]);

    let get = b
        .http()
        .get(host_url(&b, "web-1", "/echo/a/b?x=1&y=two"))
        .bearer(&token)
        .header("x-status", "201")
        .header("x-custom", "kept")
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
    assert_eq!(echo["headers"]["x-custom"], "kept");
    assert!(
        echo["headers"].get("authorization").is_none(),
        "the client's token reached the upstream: {echo}"
    );

    let payload = json!({"hello": "world", "n": [1, 2, 3], "unicode": "grüße ✓"});
    let post = b
        .http()
        .request(Method::POST, host_url(&b, "web-1", "/echo/items"))
        .bearer(&token)
        .json(&payload)
        .send()
        .await;
    post.assert_status(200);
    let echo = post.json();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/echo/items");
    assert_eq!(echo["headers"]["content-type"], "application/json");
    let body: Value = serde_json::from_str(echo["body"].as_str().expect("body is a string"))
        .expect("the upstream received the JSON body intact");
    assert_eq!(body, payload);

    // Browser-style clients put the token in the query: it is honoured on
    // both relays and never reaches the host.
    let query_token = b
        .http()
        .get(host_url(
            &b,
            "web-1",
            &format!("/echo/q?token={token}&page=2"),
        ))
        .send()
        .await;
    query_token.assert_status(200);
    let echo = query_token.json();
    assert_eq!(
        echo["query"], "page=2",
        "the token query parameter reached the host"
    );

    assert_eq!(upstream.requests(), 3, "each request reached the host once");
}

#[tokio::test]
async fn three_relays_route_each_way_to_whichever_holds_the_host() {
    let redis = TestRedis::spawn().await;
    let a = relay_on(&redis, "ams", "relay-a").await;
    let b = relay_on(&redis, "fra", "relay-b").await;
    let c = relay_on(&redis, "syd", "relay-c").await;
    let upstream = Upstream::spawn().await;
    let _on_a = host_on(&redis, &a, "web-a", &upstream).await;
    let _on_c = host_on(&redis, &c, "web-c", &upstream).await;
    let token = Claims::client(&["*"]).sign(a.secret());

    for (relay, host_id) in [(&b, "web-a"), (&c, "web-a"), (&a, "web-c"), (&b, "web-c")] {
        let resp = relay
            .http()
            .get(host_url(relay, host_id, &format!("/echo/{host_id}")))
            .bearer(&token)
            .send()
            .await;
        resp.assert_status(200);
        assert_eq!(
            resp.json()["path"],
            format!("/echo/{host_id}"),
            "{host_id} through {}",
            relay.machine_id()
        );
    }
}

#[tokio::test]
async fn large_body_is_forwarded_whole_and_oversized_body_is_refused_on_first_relay() {
    let redis = TestRedis::spawn().await;
    let a = relay_on(&redis, "ams", "relay-a").await;
    let b = proxying(&redis, "fra", "relay-b")
        .max_body_bytes(2 * 1024 * 1024)
        .spawn()
        .await;
    let upstream = Upstream::spawn().await;
    let _host = host_on(&redis, &a, "web-1", &upstream).await;
    let token = b.client_token(&["web-1"]);

    let big: String = "0123456789abcdef".repeat(64 * 1024);
    let resp = b
        .http()
        .request(Method::PUT, host_url(&b, "web-1", "/echo/big"))
        .bearer(&token)
        .header("content-type", "text/plain")
        .body(big.clone())
        .send()
        .await;
    resp.assert_status(200);
    assert!(
        resp.json()["body"] == big.as_str(),
        "the 1 MiB body did not arrive whole"
    );

    let too_big = "x".repeat(2 * 1024 * 1024 + 1);
    let resp = b
        .http()
        .request(Method::POST, host_url(&b, "web-1", "/echo/too-big"))
        .bearer(&token)
        .body(too_big)
        .send()
        .await;
    resp.assert_status(413);
    assert_eq!(
        upstream.requests(),
        1,
        "the oversized body reached the host"
    );
}

#[tokio::test]
async fn pending_request_through_non_owner_fails_fast_with_502_when_owner_relay_dies() {
    let redis = TestRedis::spawn().await;
    let mut a = relay_on(&redis, "ams", "relay-a").await;
    let b = relay_on(&redis, "fra", "relay-b").await;
    let upstream = Upstream::spawn().await;
    let _host = host_on(&redis, &a, "web-1", &upstream).await;
    let client = b.http().clone();
    let url = host_url(&b, "web-1", "/slow?ms=60000");
    let token = b.client_token(&["web-1"]);
    let request = tokio::spawn(async move {
        client
            .get(url)
            .bearer(&token)
            .timeout(Duration::from_secs(40))
            .send()
            .await
    });
    wait_until("the slow request reaches the upstream", DEADLINE, || {
        upstream.requests() == 1
    })
    .await;

    let killed_at = Instant::now();
    a.kill().await;
    let resp = request.await.expect("client task");
    let elapsed = killed_at.elapsed();

    resp.assert_status(502);
    assert!(
        elapsed < UNREACHABLE_BOUND,
        "the client waited {elapsed:?} after the owner died; it must not wait for a timeout"
    );
}

#[tokio::test]
async fn bridged_websocket_closes_with_1001_when_owner_relay_dies() {
    let redis = TestRedis::spawn().await;
    let mut a = relay_on(&redis, "ams", "relay-a").await;
    let b = relay_on(&redis, "fra", "relay-b").await;
    let upstream = Upstream::spawn().await;
    let _host = host_on(&redis, &a, "web-1", &upstream).await;
    let url = b.ws_url("/hosts/web-1/ws/echo");
    let mut client = WsClient::connect_ok(&url, Some(&b.client_token(&["web-1"]))).await;
    client.send_text("ready?").await;
    assert_eq!(client.recv_text().await, "ready?");

    a.kill().await;

    assert_eq!(
        client.recv_close_code(DEADLINE).await,
        1001,
        "the client learns that the tunnel went away, as on the owner itself"
    );
}

#[tokio::test]
async fn websocket_text_and_binary_frames_are_bridged_through_non_owner_relay() {
    let redis = TestRedis::spawn().await;
    let a = relay_on(&redis, "ams", "relay-a").await;
    let b = relay_on(&redis, "fra", "relay-b").await;
    let upstream = Upstream::spawn().await;
    let _host = host_on(&redis, &a, "web-1", &upstream).await;

    // Token in the query, as browser WebSocket clients must send it.
    let token = b.client_token(&["web-1"]);
    let url = b.ws_url(&format!("/hosts/web-1/ws/echo?token={token}"));
    let mut client = WsClient::connect_ok(&url, None).await;
    client.send_text("hello through two relays ✓").await;
    assert_eq!(client.recv_text().await, "hello through two relays ✓");
    let bytes: Vec<u8> = (0..=255).collect();
    client.send_binary(&bytes).await;
    assert_eq!(client.recv_data().await, Message::binary(bytes));
    client.send_text("second text").await;
    assert_eq!(client.recv_text().await, "second text");
    assert_eq!(upstream.ws_connections(), 1);
}

#[tokio::test]
async fn host_close_code_reaches_client_through_bridge() {
    let redis = TestRedis::spawn().await;
    let a = relay_on(&redis, "ams", "relay-a").await;
    let b = relay_on(&redis, "fra", "relay-b").await;
    let upstream = Upstream::spawn().await;
    let _host = host_on(&redis, &a, "web-1", &upstream).await;

    let url = b.ws_url("/hosts/web-1/ws/echo");
    let mut client = WsClient::connect_ok(&url, Some(&b.client_token(&["web-1"]))).await;
    client.send_text("close:4321").await;

    assert_eq!(
        client.recv_close_code(DEADLINE).await,
        4321,
        "the upstream's close code crosses host, owner relay and bridge"
    );
}

#[tokio::test]
async fn client_close_code_reaches_upstream_through_bridge() {
    let redis = TestRedis::spawn().await;
    let a = relay_on(&redis, "ams", "relay-a").await;
    let b = relay_on(&redis, "fra", "relay-b").await;
    let upstream = Upstream::spawn().await;
    let _host = host_on(&redis, &a, "web-1", &upstream).await;

    let url = b.ws_url("/hosts/web-1/ws/echo");
    let mut client = WsClient::connect_ok(&url, Some(&b.client_token(&["web-1"]))).await;
    // A round trip first, so the whole path (bridge, channel, local socket)
    // is open before the close.
    client.send_text("ready?").await;
    assert_eq!(client.recv_text().await, "ready?");
    client.close(4100).await;

    wait_until("the upstream receives close code 4100", DEADLINE, || {
        upstream.ws_close_codes().contains(&4100)
    })
    .await;
}

#[tokio::test]
async fn fly_replay_mode_answers_http_for_remote_host_with_owner_instance_header() {
    let redis = TestRedis::spawn().await;
    let fly = |region: &'static str, machine: &'static str| {
        TestRelay::builder()
            .region(region)
            .machine_id(machine)
            .redis(&redis.url())
            .routing("fly-replay")
            .app_name("relay-test-app")
            .spawn()
    };
    let a = fly("ams", "e7843d4f0a1b").await;
    let b = fly("fra", "91857e2c3d4e").await;
    let upstream = Upstream::spawn().await;
    let _host = host_on(&redis, &a, "web-1", &upstream).await;
    let token = b.client_token(&["web-1"]);

    let resp = b
        .http()
        .request(Method::POST, host_url(&b, "web-1", "/echo/replayed"))
        .bearer(&token)
        .body("payload")
        .send()
        .await;
    resp.assert_status(200);
    assert_eq!(
        resp.header("fly-replay"),
        Some("instance=e7843d4f0a1b"),
        "headers: {:?}",
        resp.headers
    );
    assert!(resp.body.is_empty(), "body: {:?}", resp.text());

    let whoowns = b.whoowns_with("web-1", &token).await;
    assert_eq!(
        whoowns.header("fly-replay"),
        Some("instance=e7843d4f0a1b"),
        "_whoowns on a non-owner is replayed too; status {} body {:?}",
        whoowns.status,
        whoowns.text()
    );
    assert_eq!(
        upstream.requests(),
        0,
        "a replayed request never reaches the host"
    );

    let local = a
        .http()
        .get(host_url(&a, "web-1", "/echo/local"))
        .bearer(&token)
        .send()
        .await;
    local.assert_status(200);
    assert_eq!(
        local.header("fly-replay"),
        None,
        "the owner serves its own host"
    );
    assert_eq!(local.json()["path"], "/echo/local");

    // A request Fly already replayed is never replayed again.
    let replayed_twice = b
        .http()
        .get(host_url(&b, "web-1", "/echo"))
        .bearer(&token)
        .header("fly-replay-src", "instance=e7843d4f0a1b;region=ams;t=1")
        .send()
        .await;
    replayed_twice.assert_status(503);
    assert_eq!(replayed_twice.header("fly-replay"), None);

    let forged = Claims::client(&["web-1"]).sign("not-the-relay-secret-0123456789");
    let refused = b
        .http()
        .get(host_url(&b, "web-1", "/echo"))
        .bearer(&forged)
        .send()
        .await;
    refused.assert_status(401);
    assert_eq!(
        refused.header("fly-replay"),
        None,
        "a bad token is refused on the first machine, not replayed"
    );
}

#[tokio::test]
async fn whoowns_on_non_owner_reports_owner_region_in_proxy_mode() {
    let redis = TestRedis::spawn().await;
    let a = relay_on(&redis, "ams", "relay-a").await;
    let b = relay_on(&redis, "fra", "relay-b").await;
    let upstream = Upstream::spawn().await;
    let _host = host_on(&redis, &a, "web-1", &upstream).await;

    let resp = b.whoowns("web-1").await;

    resp.assert_status(200);
    let body = resp.json();
    assert_eq!(body["ok"], true, "{body}");
    assert_eq!(body["region"], "ams", "the owner's region, not B's: {body}");
    if let Some(machine) = body.get("machine") {
        assert_eq!(machine, "relay-a", "the owner's machine, not B's: {body}");
    }
}

#[tokio::test]
async fn stale_self_ownership_answers_503_at_once_without_forwarding() {
    let redis = TestRedis::spawn().await;
    // Debug level makes the relay log one `request finished` line per HTTP
    // request it serves, so a request it forwarded to itself would show twice.
    let b = proxying(&redis, "fra", "relay-b")
        .rust_log("info,relay=debug")
        .spawn()
        .await;
    redis.wait_advertised(&b).await;
    redis.set(&host_key("ghost"), &b.owner()).await;

    let started = Instant::now();
    let resp = b
        .http()
        .get(host_url(&b, "ghost", "/probe-stale"))
        .bearer(&b.client_token(&["ghost"]))
        .send()
        .await;
    let elapsed = started.elapsed();

    resp.assert_status(503);
    assert_eq!(resp.error(), "host not connected");
    assert!(
        elapsed < QUICK,
        "a stale entry naming this relay must be answered at once, took {elapsed:?}"
    );
    let served = |logs: &[String]| {
        logs.iter()
            .filter(|line| line.contains("/hosts/ghost/probe-stale") && line.contains("finished"))
            .count()
    };
    wait_until("the relay logs the finished request", DEADLINE, || {
        served(&b.logs()) >= 1
    })
    .await;
    assert_eq!(
        served(&b.logs()),
        1,
        "the relay served the request more than once (forwarded to itself)"
    );
}

/// Where the relays of a directory keep their hop key, and one a test sets there.
const HOP_KEY_NAME: &str = "relay:hop-key";
const HOP_KEY: &str = "7e57e57e57e57e57e57e57e57e57e57e57e57e57e57e57e57e57e57e57e57e57e";

/// Two relays on one Redis whose hop key the test set (so it can pass for a relay), and
/// `web-1` held on A.
struct HeldOnA {
    a: TestRelay,
    b: TestRelay,
    upstream: Upstream,
    _redis: TestRedis,
    _host: TestHost,
}

async fn held_on_a_with_known_hop_key() -> HeldOnA {
    let redis = TestRedis::spawn().await;
    // Set before the relays make one: the first key written wins.
    redis.set(HOP_KEY_NAME, HOP_KEY).await;
    let a = relay_on(&redis, "ams", "relay-a").await;
    let b = relay_on(&redis, "fra", "relay-b").await;
    let upstream = Upstream::spawn().await;
    let host = host_on(&redis, &a, "web-1", &upstream).await;
    HeldOnA {
        a,
        b,
        upstream,
        _redis: redis,
        _host: host,
    }
}

#[tokio::test]
async fn request_carrying_hop_marker_for_host_held_elsewhere_is_refused_not_forwarded() {
    let HeldOnA {
        a,
        b,
        upstream,
        _redis,
        _host,
    } = held_on_a_with_known_hop_key().await;
    let a_requests = a.counter(CLIENT_REQUESTS, &[]).await;

    let resp = b
        .http()
        .get(host_url(&b, "web-1", "/echo/hop"))
        .bearer(&b.client_token(&["web-1"]))
        .header("x-relay-hop", "test")
        .header("x-relay-hop-auth", HOP_KEY)
        .send()
        .await;

    resp.assert_status(503);
    assert_eq!(
        resp.header("x-relay-not-here"),
        Some("1"),
        "a peer-forwarded request for a host not held here is marked so the peer may retry"
    );
    let direct = b
        .http()
        .get(host_url(&b, "nobody", "/x"))
        .bearer(&b.client_token(&["nobody"]))
        .send()
        .await;
    direct.assert_status(503);
    assert_eq!(
        direct.header("x-relay-not-here"),
        None,
        "clients never see the marker"
    );
    let mut upgrade = b
        .ws_url("/hosts/web-1/ws/echo")
        .into_client_request()
        .expect("valid WebSocket url");
    let headers = upgrade.headers_mut();
    let bearer = format!("Bearer {}", b.client_token(&["web-1"]));
    headers.insert("authorization", bearer.parse().expect("header value"));
    headers.insert("x-relay-hop", "test".parse().expect("header value"));
    headers.insert("x-relay-hop-auth", HOP_KEY.parse().expect("header value"));
    let refused = within(
        "B to answer a hopped WebSocket upgrade",
        DEADLINE,
        tokio_tungstenite::connect_async(upgrade),
    )
    .await;
    assert_eq!(
        refused.err().as_ref().and_then(rejection_status),
        Some(503),
        "a hopped WebSocket upgrade for a host held elsewhere is refused"
    );

    assert_eq!(upstream.requests(), 0, "the request reached the host");
    assert_eq!(
        upstream.ws_connections(),
        0,
        "the WebSocket reached the host"
    );
    assert_eq!(
        a.counter(CLIENT_REQUESTS, &[]).await,
        a_requests,
        "B forwarded a request that had already made its one hop"
    );
}

#[tokio::test]
async fn a_hop_marker_without_the_relays_key_is_ignored_and_the_request_served_as_a_clients() {
    // Everything bound, not `..`: A, its upstream and the host must live to the end.
    let HeldOnA {
        a: _a,
        b,
        upstream: _upstream,
        _redis,
        _host,
    } = held_on_a_with_known_hop_key().await;

    for forged in [None, Some("guessed"), Some(&HOP_KEY[1..])] {
        let mut request = b
            .http()
            .get(host_url(&b, "web-1", "/echo/forged"))
            .bearer(&b.client_token(&["web-1"]))
            .header("x-relay-hop", "ams:relay-a");
        if let Some(auth) = forged {
            request = request.header("x-relay-hop-auth", auth);
        }
        let resp = request.send().await;
        // Taken for a client's request: routed to the owner and served.
        resp.assert_status(200);
        assert_eq!(resp.header("x-relay-not-here"), None);
        // Nothing the relays say to one another reaches the host either.
        let seen = resp.json();
        let headers = seen["headers"].as_object().expect("echoed headers");
        assert!(
            headers.keys().all(|name| !name.starts_with("x-relay-")),
            "relay-only headers reached the host: {headers:?}"
        );
    }
    // For a host nobody holds, a forged marker gets what any client gets.
    let resp = b
        .http()
        .get(host_url(&b, "nobody", "/x"))
        .bearer(&b.client_token(&["nobody"]))
        .header("x-relay-hop", "ams:relay-a")
        .send()
        .await;
    resp.assert_status(503);
    assert_eq!(
        resp.header("x-relay-not-here"),
        None,
        "clients never see the marker"
    );
    assert!(
        b.counter(
            "relay_hops_total",
            &[("mode", "peer"), ("outcome", "forged")]
        )
        .await
            >= 4.0
    );
}

/// A stand-in for a relay that the directory still names for `web-1` but that no
/// longer holds it (the agent moved between the lookup and the hop): it answers 503 with
/// the not-here marker, and by then the directory names the real owner.
async fn stale_owner_stub(
    redis: &TestRedis,
    real_owner: String,
) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let redis_url = redis.url();
    let app = axum::Router::new().fallback({
        let hits = hits.clone();
        move || {
            let hits = hits.clone();
            let redis_url = redis_url.clone();
            let real_owner = real_owner.clone();
            async move {
                hits.fetch_add(1, Ordering::SeqCst);
                let client = redis::Client::open(redis_url).expect("redis url");
                let mut conn = client
                    .get_multiplexed_async_connection()
                    .await
                    .expect("redis connection");
                let _: () = redis::cmd("SET")
                    .arg(host_key("web-1"))
                    .arg(&real_owner)
                    .query_async(&mut conn)
                    .await
                    .expect("SET");
                (
                    http::StatusCode::SERVICE_UNAVAILABLE,
                    [("x-relay-not-here", "1")],
                    r#"{"error":"host not connected"}"#,
                )
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the stub");
    let addr = listener.local_addr().expect("stub address");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, hits)
}

#[tokio::test]
async fn request_forwarded_to_relay_that_no_longer_holds_host_is_retried_on_new_owner() {
    let redis = TestRedis::spawn().await;
    let b = relay_on(&redis, "fra", "relay-b").await;
    let c = relay_on(&redis, "cdg", "relay-c").await;
    let upstream = Upstream::spawn().await;
    let _host = host_on(&redis, &b, "web-1", &upstream).await;

    // The directory still names relay-a, which advertises the stub's address.
    let (stub, stub_hits) = stale_owner_stub(&redis, b.owner()).await;
    redis.set(&addr_key("ams:relay-a"), &stub.to_string()).await;
    redis.set(&host_key("web-1"), "ams:relay-a").await;

    let resp = c
        .http()
        .request(Method::POST, host_url(&c, "web-1", "/echo/moved"))
        .bearer(&c.client_token(&["web-1"]))
        .body("order 66")
        .send()
        .await;
    resp.assert_status(200);
    assert_eq!(resp.json()["path"], "/echo/moved");
    assert_eq!(resp.json()["body"], "order 66");
    assert_eq!(resp.header("x-relay-not-here"), None);
    assert_eq!(
        stub_hits.load(Ordering::SeqCst),
        1,
        "the stale owner was tried first"
    );
    assert_eq!(
        upstream.requests(),
        1,
        "the host got the request exactly once"
    );
    assert_eq!(
        c.counter(
            "relay_hops_total",
            &[("mode", "proxy"), ("outcome", "not_here")]
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn request_forwarded_to_relay_that_no_longer_holds_host_gets_503_when_no_one_else_does() {
    let redis = TestRedis::spawn().await;
    let c = relay_on(&redis, "cdg", "relay-c").await;
    // The stub moves the entry to relay-a itself: a second lookup names the same
    // machine, so there is nobody else to try.
    let (stub, stub_hits) = stale_owner_stub(&redis, "ams:relay-a".to_owned()).await;
    redis.set(&addr_key("ams:relay-a"), &stub.to_string()).await;
    redis.set(&host_key("web-1"), "ams:relay-a").await;

    let resp = c
        .http()
        .get(host_url(&c, "web-1", "/echo/nowhere"))
        .bearer(&c.client_token(&["web-1"]))
        .send()
        .await;
    resp.assert_status(503);
    assert_eq!(
        resp.header("x-relay-not-here"),
        None,
        "the marker stays between relays"
    );
    assert_eq!(
        stub_hits.load(Ordering::SeqCst),
        1,
        "no second try on the same machine"
    );
}

#[tokio::test]
async fn owner_with_unreachable_address_gives_503_within_seconds() {
    let redis = TestRedis::spawn().await;
    let b = relay_on(&redis, "fra", "relay-b").await;
    let closed = format!("127.0.0.1:{}", unused_port());
    redis.set(&host_key("lost"), "iad:vanished-machine").await;
    redis.set(&addr_key("iad:vanished-machine"), &closed).await;

    let started = Instant::now();
    let resp = b
        .http()
        .get(host_url(&b, "lost", "/echo"))
        .bearer(&b.client_token(&["lost"]))
        .send()
        .await;
    let elapsed = started.elapsed();

    resp.assert_status(503);
    assert!(
        elapsed < UNREACHABLE_BOUND,
        "a refused owner address must fail fast, took {elapsed:?}"
    );

    let started = Instant::now();
    let ws = WsClient::connect(
        &b.ws_url("/hosts/lost/ws"),
        Some(&b.client_token(&["lost"])),
    )
    .await;
    let elapsed = started.elapsed();
    assert_eq!(
        ws.err().as_ref().and_then(rejection_status),
        Some(503),
        "a WebSocket for an unreachable owner is refused"
    );
    assert!(
        elapsed < UNREACHABLE_BOUND,
        "a WebSocket for an unreachable owner must fail fast, took {elapsed:?}"
    );
}

#[tokio::test]
async fn host_without_directory_entry_gives_503_host_not_connected() {
    let redis = TestRedis::spawn().await;
    let _a = relay_on(&redis, "ams", "relay-a").await;
    let b = relay_on(&redis, "fra", "relay-b").await;

    let resp = b
        .http()
        .get(host_url(&b, "nobody", "/echo"))
        .bearer(&b.client_token(&["nobody"]))
        .send()
        .await;

    resp.assert_status(503);
    assert_eq!(resp.error(), "host not connected");
}

#[tokio::test]
async fn bad_client_tokens_on_non_owner_are_refused_there_and_never_forwarded() {
    let redis = TestRedis::spawn().await;
    let a = relay_on(&redis, "ams", "relay-a").await;
    let b = relay_on(&redis, "fra", "relay-b").await;
    let upstream = Upstream::spawn().await;
    let _host = host_on(&redis, &a, "web-1", &upstream).await;
    let a_requests = a.counter(CLIENT_REQUESTS, &[]).await;
    let url = host_url(&b, "web-1", "/echo/secret");

    let forged = Claims::client(&["web-1"]).sign("not-the-relay-secret-0123456789");
    let expired = Claims::client(&["web-1"]).expired().sign(b.secret());
    let other_host = b.client_token(&["web-2"]);
    let host_role = b.host_token("web-1");
    for (what, token, status) in [
        ("no token", None, 401),
        ("wrong secret", Some(&forged), 401),
        ("expired", Some(&expired), 401),
        ("another host", Some(&other_host), 403),
        ("host role", Some(&host_role), 403),
    ] {
        let mut request = b.http().get(url.clone());
        if let Some(token) = token {
            request = request.bearer(token);
        }
        let resp = request.send().await;
        assert_eq!(resp.status.as_u16(), status, "{what}: {:?}", resp.text());
    }

    let ws = WsClient::connect(&b.ws_url("/hosts/web-1/ws/echo"), Some(&forged)).await;
    let status = ws.err().as_ref().and_then(rejection_status);
    assert_eq!(
        status,
        Some(401),
        "a WebSocket with a forged token is refused on B"
    );

    assert_eq!(upstream.requests(), 0, "a refused request reached the host");
    assert_eq!(
        upstream.ws_connections(),
        0,
        "a refused WebSocket reached the host"
    );
    assert_eq!(
        a.counter(CLIENT_REQUESTS, &[]).await,
        a_requests,
        "B forwarded a request it should have refused"
    );

    // The same path with a good token does reach the host through A.
    b.http()
        .get(url)
        .bearer(&b.client_token(&["web-1"]))
        .send()
        .await
        .assert_status(200);
    assert_eq!(upstream.requests(), 1);
}

#[tokio::test]
async fn owner_rechecks_client_token_that_the_first_relay_accepted() {
    // A and B verify with different secrets: a token good on B is forwarded,
    // and A's own check refuses it.
    let redis = TestRedis::spawn().await;
    let a = proxying(&redis, "ams", "relay-a")
        .secret("secret-of-relay-a-only-0123456789")
        .spawn()
        .await;
    let b = relay_on(&redis, "fra", "relay-b").await;
    let upstream = Upstream::spawn().await;
    let _host = host_on(&redis, &a, "web-1", &upstream).await;
    let good_on_b_only = b.client_token(&["web-1"]);

    let resp = b
        .http()
        .get(host_url(&b, "web-1", "/echo"))
        .bearer(&good_on_b_only)
        .send()
        .await;
    resp.assert_status(401);

    let ws = WsClient::connect(&b.ws_url("/hosts/web-1/ws/echo"), Some(&good_on_b_only)).await;
    assert_eq!(
        ws.err().as_ref().and_then(rejection_status),
        Some(401),
        "the owner's refusal of the bridged WebSocket reaches the client"
    );
    assert_eq!(upstream.requests(), 0, "the owner let a bad token through");
    assert_eq!(
        upstream.ws_connections(),
        0,
        "the owner let a bad token through"
    );
}

#[tokio::test]
async fn routing_settings_are_read_from_environment() {
    let redis = TestRedis::spawn().await;
    let env_relay = |region: &'static str, machine: &'static str| {
        TestRelay::builder()
            .region(region)
            .machine_id(machine)
            .env("REDIS_URL", &redis.url())
            .env("RELAY_REDIS_PREFIX", "envp:")
            .env("RELAY_RECONCILE_INTERVAL", "1s")
    };
    let a = env_relay("ams", "relay-a")
        .env("RELAY_ADVERTISE_ADDR", "relay-a.internal:8080")
        .spawn()
        .await;
    // FLY_APP_NAME alone makes fly-replay the default routing.
    let b = env_relay("fra", "relay-b")
        .env("FLY_APP_NAME", "relay-test-app")
        .spawn()
        .await;
    // RELAY_ROUTING overrides that default.
    let c = env_relay("syd", "relay-c")
        .env("FLY_APP_NAME", "relay-test-app")
        .env("RELAY_ROUTING", "proxy")
        .spawn()
        .await;
    let _host = RawHost::connect(&a, "web-1").await;

    redis
        .wait_value("envp:host:web-1", "ams:relay-a", DEADLINE)
        .await;
    redis
        .wait_value("envp:addr:ams:relay-a", "relay-a.internal:8080", DEADLINE)
        .await;
    assert_eq!(redis.keys("relay:*").await, Vec::<String>::new());

    let replayed = b
        .http()
        .get(host_url(&b, "web-1", "/anything"))
        .bearer(&b.client_token(&["web-1"]))
        .send()
        .await;
    assert_eq!(
        replayed.header("fly-replay"),
        Some("instance=relay-a"),
        "with FLY_APP_NAME the default routing is fly-replay; status {} body {:?}",
        replayed.status,
        replayed.text()
    );
    let whoowns = c.whoowns("web-1").await;
    whoowns.assert_status(200);
    assert_eq!(whoowns.header("fly-replay"), None, "RELAY_ROUTING=proxy");
    assert_eq!(whoowns.json()["region"], "ams");

    // RELAY_RECONCILE_INTERVAL=1s (not the 10 s default): a lost entry is back soon.
    let _: i64 = redis.query(redis::cmd("DEL").arg("envp:host:web-1")).await;
    redis
        .wait_value("envp:host:web-1", "ams:relay-a", Duration::from_secs(5))
        .await;
}

#[tokio::test]
async fn restarted_relay_clears_entries_of_its_killed_predecessor_before_listening() {
    let redis = TestRedis::spawn().await;
    let mut a = relay_on(&redis, "ams", "relay-a").await;
    let b = relay_on(&redis, "fra", "relay-b").await;
    let h1 = RawHost::connect(&a, "old-1").await;
    let h2 = RawHost::connect(&a, "old-2").await;
    let _h3 = RawHost::connect(&b, "kept-b").await;
    redis.wait_host_owner("old-1", &a).await;
    redis.wait_host_owner("old-2", &a).await;
    redis.wait_host_owner("kept-b", &b).await;

    a.kill().await;
    drop((h1, h2));
    let left: Vec<String> = owned_by(&redis, &a.owner()).await;
    assert_eq!(
        left,
        vec![host_key("old-1"), host_key("old-2")],
        "a SIGKILLed relay leaves its entries behind (what the restart must clean)"
    );

    let a2 = relay_on(&redis, "ams", "relay-a").await;
    // `spawn` returns as soon as the `listening` line appears.
    let left = owned_by(&redis, &a2.owner()).await;
    assert!(
        left.is_empty(),
        "entries of the previous process remain after `listening`: {left:?}"
    );
    assert_eq!(
        redis.get(&host_key("kept-b")).await.as_deref(),
        Some("fra:relay-b"),
        "the restart removed another machine's entry"
    );

    let resp = b
        .http()
        .get(host_url(&b, "old-1", "/echo"))
        .bearer(&b.client_token(&["old-1"]))
        .send()
        .await;
    resp.assert_status(503);
    assert_eq!(resp.error(), "host not connected");

    // The restarted relay serves new hosts through its peers.
    let upstream = Upstream::spawn().await;
    let _fresh = TestHost::connect(&a2, "new-1", &upstream).await;
    redis.wait_host_owner("new-1", &a2).await;
    redis
        .wait_value(&addr_key(&a2.owner()), &a2.addr().to_string(), DEADLINE)
        .await;
    b.http()
        .get(host_url(&b, "new-1", "/echo"))
        .bearer(&b.client_token(&["new-1"]))
        .send()
        .await
        .assert_status(200);
}

/// The `relay:host:*` keys whose value is `owner`, sorted.
async fn owned_by(redis: &TestRedis, owner: &str) -> Vec<String> {
    redis
        .strings(&host_key("*"))
        .await
        .into_iter()
        .filter(|(_, value)| value == owner)
        .map(|(key, _)| key)
        .collect()
}

#[tokio::test]
async fn routing_follows_host_to_its_new_owner_after_old_owner_dies() {
    let redis = TestRedis::spawn().await;
    let mut a = relay_on(&redis, "ams", "relay-a").await;
    let b = relay_on(&redis, "fra", "relay-b").await;
    let c = relay_on(&redis, "syd", "relay-c").await;
    let upstream = Upstream::spawn().await;
    let first = host_on(&redis, &a, "web-1", &upstream).await;
    let token = b.client_token(&["web-1"]);
    b.http()
        .get(host_url(&b, "web-1", "/echo"))
        .bearer(&token)
        .send()
        .await
        .assert_status(200);

    a.kill().await;
    drop(first);
    let _moved = host_on(&redis, &c, "web-1", &upstream).await;

    wait_until_async("B routes web-1 to its new owner C", DEADLINE, || async {
        b.http()
            .get(host_url(&b, "web-1", "/echo/moved"))
            .bearer(&token)
            .send()
            .await
            .status
            == 200
    })
    .await;
}

#[tokio::test]
async fn channels_bridged_from_a_peer_relay_do_not_count_against_its_address() {
    const CHANNELS: usize = 4;
    let redis = TestRedis::spawn().await;
    // The owner allows 3 connections per address, and everything here comes from
    // 127.0.0.1: the host's tunnel, the test's own HTTP client, and every channel B
    // bridges (one connection each).
    let a = proxying(&redis, "ams", "relay-a")
        .env("RELAY_MAX_CONNECTIONS_PER_IP", "3")
        .spawn()
        .await;
    let b = relay_on(&redis, "fra", "relay-b").await;
    let upstream = Upstream::spawn().await;
    let _host = host_on(&redis, &a, "web-1", &upstream).await;
    let token = b.client_token(&["web-1"]);

    let mut channels = Vec::new();
    for i in 0..CHANNELS {
        let mut ws = WsClient::connect_ok(&b.ws_url("/hosts/web-1/ws/echo"), Some(&token)).await;
        ws.send_text(&format!("bridged {i}")).await;
        assert_eq!(ws.recv_text().await, format!("bridged {i}"));
        channels.push(ws);
    }
    assert_eq!(
        a.counter(
            "relay_connections_refused_total",
            &[("reason", "per_ip_limit")]
        )
        .await,
        0.0,
        "the owner refused a bridge from its peer as a client's connection"
    );
    // The bridges (and the tunnel) are open connections of A's, counted as such.
    assert!(a.counter("relay_connections_open", &[]).await >= (CHANNELS + 1) as f64);
}

#[tokio::test]
async fn a_bridged_message_past_the_budget_of_the_relay_in_between_ends_that_bridge_and_others_go_on()
 {
    // The relay in between holds what each side's codec assembles, unseen until whole:
    // a client's message on its way in, the owner's on its way out. Both are charged.
    const BUDGET: usize = 2 * 1024 * 1024;
    let redis = TestRedis::spawn().await;
    let a = relay_on(&redis, "ams", "relay-a").await;
    let b = proxying(&redis, "fra", "relay-b")
        .env("RELAY_MEMORY_BUDGET", &BUDGET.to_string())
        .spawn()
        .await;
    let upstream = Upstream::spawn().await;
    let _host = host_on(&redis, &a, "web-1", &upstream).await;
    let token = b.client_token(&["web-1"]);
    let refusals = || async {
        b.counter("relay_budget_refusals_total", &[("scope", "process")])
            .await
    };

    // The owner's side: a 3 MiB message from the upstream, through A, to B.
    let url = b.ws_url(&format!(
        "/hosts/web-1/ws/flood?n=1&size={}",
        3 * 1024 * 1024
    ));
    let mut flooded = WsClient::connect_ok(&url, Some(&token)).await;
    match flooded.recv(DEADLINE).await {
        Err(relay_tests::WsEnd::Close(code)) => assert_eq!(code, 1001),
        Err(end) => panic!("expected the bridge to end with 1001, got {end:?}"),
        // Not printed: it is megabytes.
        Ok(message) => panic!("the {}-byte message got through", message.len()),
    }
    assert!(refusals().await >= 1.0);

    // The client's side: 2.5 MiB of a 3 MiB message, masked with a zero key, then
    // nothing: B drops the client's socket.
    let before = refusals().await;
    let client = WsClient::connect_ok(&b.ws_url("/hosts/web-1/ws/echo"), Some(&token)).await;
    let mut stream = client.into_stream();
    let tokio_tungstenite::MaybeTlsStream::Plain(tcp) = stream.get_mut() else {
        panic!("the test socket is plain TCP");
    };
    let head = relay_tests::ws::masked_frame_head(false, 3 * 1024 * 1024);
    use tokio::io::AsyncWriteExt;
    tcp.write_all(&head).await.unwrap();
    let _ = tcp.write_all(&vec![0u8; 5 * 1024 * 1024 / 2]).await;
    wait_until_async("B refuses the client's message", DEADLINE, || async {
        refusals().await > before
    })
    .await;

    // Others go on through the same two relays.
    let mut other = WsClient::connect_ok(&b.ws_url("/hosts/web-1/ws/echo"), Some(&token)).await;
    other.send_text("still bridged").await;
    assert_eq!(other.recv_text().await, "still bridged");
}

#[tokio::test]
async fn org_machine_host_ids_register_publish_and_route_escaped_or_not() {
    let redis = TestRedis::spawn().await;
    let a = relay_on(&redis, "ams", "relay-a").await;
    let b = relay_on(&redis, "fra", "relay-b").await;
    let upstream = Upstream::spawn().await;
    // Superset's hostIds: `<organizationId>:<machineId>`, registered as they are.
    let host_id = "org_8f2c:machine-01";
    let _host = host_on(&redis, &a, host_id, &upstream).await;
    let token = b.client_token(&[host_id]);

    // On the owner and on a peer; the colon as it is, and as encodeURIComponent writes it.
    for relay in [&a, &b] {
        for segment in [host_id, "org_8f2c%3Amachine-01", "org_8f2c%3amachine-01"] {
            let resp = relay
                .http()
                .get(host_url(relay, segment, "/echo/x?y=1"))
                .bearer(&token)
                .send()
                .await;
            resp.assert_status(200);
            assert_eq!(resp.json()["path"], "/echo/x", "{segment}");
        }
    }
    // Still strict: one colon, between two parts.
    for bad in ["org:machine:extra", ":machine", "org:"] {
        let resp = b
            .http()
            .get(host_url(&b, bad, "/echo/x"))
            .bearer(&b.client_token(&[bad]))
            .send()
            .await;
        resp.assert_status(400);
    }
}

#[tokio::test]
async fn a_subdomain_request_with_its_cookie_on_another_relay_is_proxied_at_the_root() {
    let redis = TestRedis::spawn().await;
    let a = proxying(&redis, "ams", "relay-a")
        .arg("--base-domain", "relay.test")
        .spawn()
        .await;
    let b = proxying(&redis, "fra", "relay-b")
        .arg("--base-domain", "relay.test")
        .spawn()
        .await;
    let upstream = Upstream::spawn().await;
    let _host = host_on(&redis, &a, "web-1", &upstream).await;
    let jar = format!("app=1; __Host-relay_token={}", b.client_token(&["web-1"]));
    let echo = b
        .http()
        .get(b.http_url("/echo/x?q=1"))
        .header("host", "web-1.relay.test")
        .header("cookie", &jar)
        .send()
        .await;
    echo.assert_status(200);
    let echo = echo.json();
    assert_eq!(echo["path"], "/echo/x", "{echo}");
    assert_eq!(echo["query"], "q=1");
    assert_eq!(
        echo["headers"]["cookie"], "app=1",
        "the token cookie stays with the relays"
    );
    assert_eq!(echo["headers"]["x-forwarded-host"], "web-1.relay.test");
    assert!(
        echo["headers"].get("x-forwarded-prefix").is_none(),
        "the owner keeps the first relay's view, a subdomain's root: {echo}"
    );
    // Path routing through the same two relays keeps its prefix.
    let echo = b
        .http()
        .get(host_url(&b, "web-1", "/echo/x"))
        .bearer(&b.client_token(&["web-1"]))
        .send()
        .await
        .json();
    assert_eq!(
        echo["headers"]["x-forwarded-prefix"], "/hosts/web-1",
        "{echo}"
    );
}

#[tokio::test]
async fn a_host_that_moves_to_the_forwarding_relay_during_the_hop_is_served_there() {
    let redis = TestRedis::spawn().await;
    let c = relay_on(&redis, "cdg", "relay-c").await;
    let upstream = Upstream::spawn().await;
    // The directory names relay-a (a stub), which answers "not here" only once the host
    // has registered on relay-c, the very relay that forwarded the request: a deploy's
    // race, where the host moved to the machine the client happened to reach.
    let hits = Arc::new(AtomicUsize::new(0));
    let moved = Arc::new(tokio::sync::Notify::new());
    let app = axum::Router::new().fallback({
        let (hits, moved) = (hits.clone(), moved.clone());
        move || {
            let (hits, moved) = (hits.clone(), moved.clone());
            async move {
                hits.fetch_add(1, Ordering::SeqCst);
                let _ = tokio::time::timeout(DEADLINE, moved.notified()).await;
                (
                    http::StatusCode::SERVICE_UNAVAILABLE,
                    [("x-relay-not-here", "1")],
                    r#"{"error":"host not connected"}"#,
                )
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stub = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    redis.set(&addr_key("ams:relay-a"), &stub.to_string()).await;
    redis.set(&host_key("web-1"), "ams:relay-a").await;

    let request = {
        let (client, url, token) = (
            c.http().clone(),
            host_url(&c, "web-1", "/echo/here-now"),
            c.client_token(&["web-1"]),
        );
        tokio::spawn(async move { client.get(url).bearer(&token).send().await })
    };
    wait_until("the stale owner is asked", DEADLINE, || {
        hits.load(Ordering::SeqCst) == 1
    })
    .await;
    let _host = host_on(&redis, &c, "web-1", &upstream).await;
    moved.notify_one();
    let resp = request.await.unwrap();
    resp.assert_status(200);
    assert_eq!(resp.json()["path"], "/echo/here-now");
    assert_eq!(upstream.requests(), 1, "served once, here");
}
