//! Redis outages: relays keep serving the tunnels they hold while the shared
//! directory is down, accept new tunnels locally, boot without it, and their
//! reconcilers rebuild an empty directory once Redis is back, without any
//! host reconnecting.
//!
//! Every test runs its own `redis-server`, kills it and starts an empty one
//! on the same port. Relays run with `--reconcile-interval 1s`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use relay_tests::{
    DEADLINE, FaultyProxy, HttpClient, RawHost, TestHost, TestRedis, TestRelay, Upstream, WsClient,
    addr_key, host_key, owned_key, unused_port, wait_until, wait_until_async, within,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// The reconcile interval every relay here runs with.
const RECONCILE_INTERVAL: &str = "1s";

/// How long the directory may take to be whole again once Redis is back: one
/// reconcile interval plus the Redis client's reconnect backoff, with room
/// for a loaded machine.
const RESTORE_DEADLINE: Duration = Duration::from_secs(5);

/// How long anything that needs a Redis that is down or hangs may take: a
/// boot (its startup clean-up is best effort under a short timeout) or a
/// lookup for a host held elsewhere. The relay bounds each directory call by
/// 2 s; the rest is room for a loaded machine.
const DEAD_REDIS_BOUND: Duration = Duration::from_secs(5);

const REGISTRATIONS: &str = "relay_tunnel_registrations_total";
const DIRECTORY_ERRORS: &str = "relay_directory_errors_total";

/// A proxying relay on `redis` that reconciles every [`RECONCILE_INTERVAL`].
async fn relay_on(redis: &TestRedis, region: &str, machine: &str) -> TestRelay {
    TestRelay::builder()
        .region(region)
        .machine_id(machine)
        .redis(&redis.url())
        .routing("proxy")
        .reconcile_interval(RECONCILE_INTERVAL)
        .spawn()
        .await
}

/// Asserts that `GET /hosts/{host_id}/echo/{tag}` through `relay` answers 200
/// from the upstream.
async fn assert_served(relay: &TestRelay, host_id: &str, tag: &str) {
    let resp = relay
        .http()
        .get(relay.http_url(&format!("/hosts/{host_id}/echo/{tag}")))
        .bearer(&relay.client_token(&[host_id]))
        .send()
        .await;
    assert_eq!(
        resp.status.as_u16(),
        200,
        "{host_id} through {} ({tag}): {:?}",
        relay.machine_id(),
        resp.text()
    );
    assert_eq!(resp.json()["path"], format!("/echo/{tag}"));
}

/// Requests sent in a loop in the background until stopped.
struct Traffic {
    stop_tx: watch::Sender<bool>,
    ok: Arc<AtomicUsize>,
    task: JoinHandle<Vec<String>>,
}

impl Traffic {
    /// Sends `GET url` with `token` for each target in turn, over and over.
    fn spawn(targets: Vec<(String, String)>) -> Self {
        let (stop_tx, mut stop_rx) = watch::channel(false);
        let ok = Arc::new(AtomicUsize::new(0));
        let counter = ok.clone();
        let task = tokio::spawn(async move {
            let http = HttpClient::new();
            let mut failures = Vec::new();
            while !*stop_rx.borrow_and_update() {
                for (url, token) in &targets {
                    match http.get(url.clone()).bearer(token).try_send().await {
                        Ok(resp) if resp.status == 200 => {
                            counter.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(resp) => {
                            failures.push(format!("{url}: {} {:?}", resp.status, resp.text()));
                        }
                        Err(err) => failures.push(err),
                    }
                }
            }
            failures
        });
        Self { stop_tx, ok, task }
    }

    /// Successful requests so far.
    fn ok(&self) -> usize {
        self.ok.load(Ordering::SeqCst)
    }

    /// Stops the loop and returns every failure it saw.
    async fn stop(self) -> Vec<String> {
        let _ = self.stop_tx.send(true);
        within("the traffic loop to stop", DEADLINE, self.task)
            .await
            .expect("traffic task")
    }
}

#[tokio::test]
async fn local_tunnels_keep_serving_and_new_host_registers_while_redis_is_down() {
    let mut redis = TestRedis::spawn().await;
    let a = relay_on(&redis, "ams", "relay-a").await;
    let b = relay_on(&redis, "fra", "relay-b").await;
    let upstream = Upstream::spawn().await;
    let _ha = TestHost::connect(&a, "host-a", &upstream).await;
    let _hb = TestHost::connect(&b, "host-b", &upstream).await;
    redis.wait_host_owner("host-a", &a).await;
    redis.wait_host_owner("host-b", &b).await;
    redis.wait_advertised(&a).await;

    // An established cross-relay WebSocket needs no directory.
    let mut bridged = WsClient::connect_ok(
        &b.ws_url("/hosts/host-a/ws/echo"),
        Some(&b.client_token(&["host-a"])),
    )
    .await;
    bridged.send_text("before").await;
    assert_eq!(bridged.recv_text().await, "before");

    let traffic = Traffic::spawn(vec![
        (
            a.http_url("/hosts/host-a/echo/traffic"),
            a.client_token(&["host-a"]),
        ),
        (
            b.http_url("/hosts/host-b/echo/traffic"),
            b.client_token(&["host-b"]),
        ),
    ]);
    wait_until("traffic flows before the outage", DEADLINE, || {
        traffic.ok() >= 10
    })
    .await;

    redis.kill().await;
    let ok_at_kill = traffic.ok();

    let _hc = TestHost::connect(&a, "host-c", &upstream).await;
    assert_served(&a, "host-c", "registered-during-outage").await;
    // Only requests for hosts held elsewhere degrade, to a prompt 503.
    let started = Instant::now();
    let remote = b
        .http()
        .get(b.http_url("/hosts/host-a/echo/remote"))
        .bearer(&b.client_token(&["host-a"]))
        .send()
        .await;
    let elapsed = started.elapsed();
    remote.assert_status(503);
    assert!(
        elapsed < DEAD_REDIS_BOUND,
        "a lookup against a dead Redis must give up within seconds, took {elapsed:?}"
    );
    // B registers nothing during the outage: its errors come from its
    // background directory work (the reconciler), which must not disturb
    // serving either.
    wait_until_async(
        "both relays count directory errors during the outage",
        DEADLINE,
        || async {
            a.counter(DIRECTORY_ERRORS, &[]).await > 0.0
                && b.counter(DIRECTORY_ERRORS, &[]).await > 0.0
        },
    )
    .await;
    let ok_after_errors = traffic.ok();
    assert!(
        ok_after_errors > ok_at_kill,
        "no request succeeded between the kill and the directory errors"
    );
    wait_until(
        "50 more requests succeed after the directory errors",
        DEADLINE,
        || traffic.ok() >= ok_after_errors + 50,
    )
    .await;

    bridged.send_text("during").await;
    assert_eq!(bridged.recv_text().await, "during");
    bridged.send_binary(b"\x00\x01 binary during").await;
    assert_eq!(
        bridged.recv_data().await,
        Message::binary(b"\x00\x01 binary during".to_vec())
    );

    let failures = traffic.stop().await;
    assert!(
        failures.is_empty(),
        "requests to locally held hosts failed during the outage: {failures:#?}"
    );
    assert_served(&a, "host-a", "after-outage").await;
    assert_served(&b, "host-b", "after-outage").await;
}

#[tokio::test]
async fn reconcilers_repopulate_empty_redis_after_outage_without_any_host_reconnecting() {
    let mut redis = TestRedis::spawn().await;
    let a = relay_on(&redis, "ams", "relay-a").await;
    let b = relay_on(&redis, "fra", "relay-b").await;
    let upstream = Upstream::spawn().await;
    let ha = TestHost::connect(&a, "host-a", &upstream).await;
    let hb = TestHost::connect(&b, "host-b", &upstream).await;
    redis.wait_host_owner("host-a", &a).await;
    redis.wait_host_owner("host-b", &b).await;
    redis.wait_advertised(&a).await;
    redis.wait_advertised(&b).await;
    assert_served(&b, "host-a", "before").await;
    assert_served(&a, "host-b", "before").await;

    redis.kill().await;
    let hc = TestHost::connect(&a, "host-c", &upstream).await;
    assert_served(&a, "host-c", "during").await;
    let a_registrations = a.counter(REGISTRATIONS, &[]).await;
    let b_registrations = b.counter(REGISTRATIONS, &[]).await;
    assert_eq!(
        (a_registrations, b_registrations),
        (2.0, 1.0),
        "registrations so far: A holds host-a and host-c, B holds host-b"
    );

    redis.restart_empty().await;
    let restarted = Instant::now();
    for (host_id, owner) in [("host-a", &a), ("host-b", &b), ("host-c", &a)] {
        redis
            .wait_value(&host_key(host_id), &owner.owner(), RESTORE_DEADLINE)
            .await;
    }
    for relay in [&a, &b] {
        redis
            .wait_value(
                &addr_key(&relay.owner()),
                &relay.addr().to_string(),
                RESTORE_DEADLINE,
            )
            .await;
    }
    let restored_in = restarted.elapsed();
    assert!(
        restored_in < RESTORE_DEADLINE,
        "directory restored in {restored_in:?}"
    );
    assert_eq!(
        redis.smembers(&owned_key(&a.owner())).await,
        vec!["host-a".to_owned(), "host-c".to_owned()],
        "A's index is rebuilt too"
    );
    assert!(
        redis.pttl(&host_key("host-a")).await > 0,
        "restored entries expire on their own"
    );

    assert_served(&b, "host-a", "after").await;
    assert_served(&b, "host-c", "after").await;
    assert_served(&a, "host-b", "after").await;

    assert_eq!(
        a.counter(REGISTRATIONS, &[]).await,
        a_registrations,
        "a host reconnected to A"
    );
    assert_eq!(
        b.counter(REGISTRATIONS, &[]).await,
        b_registrations,
        "a host reconnected to B"
    );
    for (name, host) in [("host-a", &ha), ("host-b", &hb), ("host-c", &hc)] {
        assert_eq!(host.ended(), None, "the tunnel of {name} ended");
    }
}

#[tokio::test]
async fn relay_boots_while_redis_is_down_serves_locally_and_publishes_once_redis_appears() {
    let port = unused_port();
    let started = Instant::now();
    let a = TestRelay::builder()
        .region("ams")
        .machine_id("relay-a")
        .env("REDIS_URL", &format!("redis://127.0.0.1:{port}"))
        .routing("proxy")
        .reconcile_interval(RECONCILE_INTERVAL)
        .spawn()
        .await;
    let boot = started.elapsed();
    assert!(
        boot < DEAD_REDIS_BOUND,
        "booting with Redis down took {boot:?}"
    );
    a.wait_for_log("WARN", DEADLINE).await;

    let upstream = Upstream::spawn().await;
    let _host = TestHost::connect(&a, "web-1", &upstream).await;
    assert_served(&a, "web-1", "without-redis").await;

    let redis = TestRedis::spawn_on(port).await;
    redis
        .wait_value(&host_key("web-1"), &a.owner(), RESTORE_DEADLINE)
        .await;
    redis
        .wait_value(
            &addr_key(&a.owner()),
            &a.addr().to_string(),
            RESTORE_DEADLINE,
        )
        .await;
    assert_eq!(
        a.counter(REGISTRATIONS, &[]).await,
        1.0,
        "the host did not need to reconnect to be published"
    );
}

#[tokio::test]
async fn tunnel_whose_directory_write_failed_is_published_within_seconds_not_at_next_reconcile() {
    let mut redis = TestRedis::spawn().await;
    // A reconcile interval far beyond the test: only the prompt retry can publish.
    let a = TestRelay::builder()
        .region("ams")
        .machine_id("relay-a")
        .redis(&redis.url())
        .routing("proxy")
        .reconcile_interval("10m")
        .spawn()
        .await;
    redis.wait_advertised(&a).await;
    redis.kill().await;

    let upstream = Upstream::spawn().await;
    let _host = TestHost::connect(&a, "web-1", &upstream).await;
    wait_until_async("the directory write fails", DEADLINE, || async {
        a.counter(DIRECTORY_ERRORS, &[("op", "register")]).await > 0.0
    })
    .await;
    assert_served(&a, "web-1", "unpublished").await;

    let restarted = Instant::now();
    redis.restart_empty().await;
    redis
        .wait_value(&host_key("web-1"), &a.owner(), RESTORE_DEADLINE)
        .await;
    assert!(
        restarted.elapsed() < RESTORE_DEADLINE,
        "published {:?} after Redis came back",
        restarted.elapsed()
    );
    assert_eq!(
        a.counter(REGISTRATIONS, &[]).await,
        1.0,
        "the host did not need to reconnect to be published"
    );
}

#[tokio::test]
async fn relays_boot_and_serve_locally_when_redis_accepts_connections_but_never_answers() {
    // The kernel completes TCP handshakes into the backlog of a socket that
    // never accepts: a Redis that hangs rather than refuses.
    let black_hole = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a black hole");
    let url = format!(
        "redis://{}",
        black_hole.local_addr().expect("black hole address")
    );
    let spawn = |region: &'static str, machine: &'static str| {
        TestRelay::builder()
            .region(region)
            .machine_id(machine)
            .redis(&url)
            .routing("proxy")
            .reconcile_interval(RECONCILE_INTERVAL)
            .spawn()
    };
    let started = Instant::now();
    let (a, b) = tokio::join!(spawn("ams", "relay-a"), spawn("fra", "relay-b"));
    let boot = started.elapsed();
    assert!(
        boot < DEAD_REDIS_BOUND,
        "booting against a hanging Redis took {boot:?}"
    );

    let upstream = Upstream::spawn().await;
    let _host = TestHost::connect(&a, "web-1", &upstream).await;
    assert_served(&a, "web-1", "first").await;
    let started = Instant::now();
    assert_served(&a, "web-1", "second").await;
    let local = started.elapsed();
    assert!(
        local < Duration::from_millis(1500),
        "a locally held host must not wait on the hanging directory, took {local:?}"
    );

    let started = Instant::now();
    let resp = b
        .http()
        .get(b.http_url("/hosts/web-1/echo"))
        .bearer(&b.client_token(&["web-1"]))
        .send()
        .await;
    let elapsed = started.elapsed();
    resp.assert_status(503);
    assert!(
        elapsed < DEAD_REDIS_BOUND,
        "a lookup against a hanging Redis must give up within seconds, took {elapsed:?}"
    );
    drop(black_hole);
}

#[tokio::test]
async fn reconciler_restores_lost_entries_but_never_takes_a_host_back_from_another_owner() {
    let redis = TestRedis::spawn().await;
    let a = relay_on(&redis, "ams", "relay-a").await;
    let _lost = RawHost::connect(&a, "lost-entry").await;
    let _taken = RawHost::connect(&a, "taken-over").await;
    redis.wait_host_owner("lost-entry", &a).await;
    redis.wait_host_owner("taken-over", &a).await;

    // Another machine registers `taken-over` later; then `lost-entry`
    // vanishes (a flush, an eviction). The next reconcile pass sees both.
    redis.set(&host_key("taken-over"), "syd:newer-owner").await;
    let _: i64 = redis
        .query(redis::cmd("DEL").arg(host_key("lost-entry")))
        .await;

    redis
        .wait_value(&host_key("lost-entry"), &a.owner(), RESTORE_DEADLINE)
        .await;
    assert_eq!(
        redis.get(&host_key("taken-over")).await.as_deref(),
        Some("syd:newer-owner"),
        "the reconciler took a host back from the machine that registered it later"
    );
}

#[tokio::test]
async fn a_host_that_moved_while_redis_connections_were_reset_is_found_on_its_new_relay_within_seconds_not_the_ttl()
 {
    let redis = TestRedis::spawn().await;
    // The relays reach Redis through a proxy that can reset their connections.
    let link = FaultyProxy::spawn(([127, 0, 0, 1], redis.port()).into()).await;
    let through_link = format!("redis://{}", link.addr());
    let on = |region: &'static str, machine: &'static str| {
        TestRelay::builder()
            .region(region)
            .machine_id(machine)
            .redis(&through_link)
            .routing("proxy")
            .reconcile_interval(RECONCILE_INTERVAL)
            .spawn()
    };
    let a = on("ams", "relay-a").await;
    let b = on("fra", "relay-b").await;
    redis.wait_advertised(&a).await;
    redis.wait_advertised(&b).await;
    let upstream = Upstream::spawn().await;
    let on_a = TestHost::connect(&a, "web-1", &upstream).await;
    redis.wait_host_owner("web-1", &a).await;

    // For 3.5 s every Redis connection is reset and new ones fail, and meanwhile the host
    // moves from A to B: A's removal of its entry and B's registration are both lost.
    link.cut();
    let cut_at = Instant::now();
    drop(on_a);
    a.wait_host_disconnected("web-1").await;
    let _on_b = TestHost::connect(&b, "web-1", &upstream).await;
    tokio::time::sleep_until(cut_at + Duration::from_millis(3_500)).await;
    link.restore();
    assert_eq!(
        redis.get(&host_key("web-1")).await.as_deref(),
        Some(a.owner().as_str()),
        "the fault left the entry naming A"
    );

    // Within seconds, not the entry's 90 s: B's reconciler asks A, which says it no
    // longer holds the host, and takes the entry over; clients of either relay are served.
    redis
        .wait_value(&host_key("web-1"), &b.owner(), RESTORE_DEADLINE)
        .await;
    // Redis shows the write before B has read its reply and counted it: wait for both.
    b.wait_counter(
        "relay_stale_entries_total",
        &[("action", "taken_over")],
        1.0,
    )
    .await;
    assert_served(&a, "web-1", "after-a").await;
    assert_served(&b, "web-1", "after-b").await;
}

#[tokio::test]
async fn a_relay_asked_for_a_host_the_directory_wrongly_says_it_holds_removes_that_entry() {
    let redis = TestRedis::spawn().await;
    let a = relay_on(&redis, "ams", "relay-a").await;
    // What an outage can leave behind: an entry naming A, which holds no such tunnel.
    redis.set(&host_key("ghost"), &a.owner()).await;

    let resp = a
        .http()
        .get(a.http_url("/hosts/ghost/x"))
        .bearer(&a.client_token(&["ghost"]))
        .send()
        .await;
    resp.assert_status(503);
    wait_until_async("A removes the stale entry", DEADLINE, || async {
        redis.get(&host_key("ghost")).await.is_none()
    })
    .await;
    // Redis shows the removal before A has read its reply and counted it.
    a.wait_counter("relay_stale_entries_total", &[("action", "removed")], 1.0)
        .await;
}

#[tokio::test]
async fn a_peer_that_accepts_but_never_answers_does_not_hold_up_the_reconciler() {
    const HOSTS: usize = 20;
    let redis = TestRedis::spawn().await;
    let a = relay_on(&redis, "ams", "relay-a").await;
    // A "peer" whose address takes connections and answers nothing: each question to it
    // costs the whole probe timeout.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let _held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            held.push(stream);
        }
    });
    redis
        .set(&addr_key("syd:silent"), &silent_addr.to_string())
        .await;
    let mut hosts = Vec::new();
    for i in 0..HOSTS {
        let host_id = format!("taken-{i}");
        hosts.push(RawHost::connect(&a, &host_id).await);
        redis.wait_host_owner(&host_id, &a).await;
    }
    let _canary = RawHost::connect(&a, "canary").await;
    redis.wait_host_owner("canary", &a).await;

    // Every entry but the canary's now names the silent peer, which the reconciler asks
    // about each of them...
    for i in 0..HOSTS {
        redis
            .set(&host_key(&format!("taken-{i}")), "syd:silent")
            .await;
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    // ...and meanwhile the canary's entry is lost: the next pass must still come soon.
    let _: i64 = redis.query(redis::cmd("DEL").arg(host_key("canary"))).await;
    redis
        .wait_value(&host_key("canary"), &a.owner(), Duration::from_secs(8))
        .await;
}
