//! The Redis directory over TLS (`rediss://`): a relay trusts the private CA it is given
//! with `RELAY_REDIS_CA_FILE`, and refuses a server that CA did not sign. Each test runs
//! its own `redis-server` with a TLS port and certificates made by `openssl`.

use relay_tests::{
    DEADLINE, TestCa, TestHost, TestRedis, TestRelay, Upstream, host_key, wait_until_async,
};

/// A relay on `redis` over TLS, trusting only `ca`.
async fn relay_trusting(redis: &TestRedis, ca: &TestCa) -> TestRelay {
    let ca_file = ca.ca_file();
    TestRelay::builder()
        .machine_id("relay-a")
        .redis(&redis.tls_url())
        .arg("--redis-ca-file", ca_file.to_str().expect("utf-8 path"))
        .spawn()
        .await
}

#[tokio::test]
async fn relay_publishes_hosts_over_tls_to_redis_signed_by_its_private_ca() {
    let ca = TestCa::generate();
    let redis = TestRedis::spawn_tls(&ca).await;
    let relay = relay_trusting(&redis, &ca).await;
    let upstream = Upstream::spawn().await;
    let host = TestHost::connect(&relay, "web-1", &upstream).await;

    // Written through the TLS connection, read here over the plain port.
    redis.wait_host_owner("web-1", &relay).await;
    let resp = relay
        .http()
        .get(relay.http_url("/hosts/web-1/echo/tls"))
        .bearer(&relay.client_token(&["web-1"]))
        .send()
        .await;
    resp.assert_status(200);

    host.close(1000);
    wait_until_async("the entry is removed over TLS", DEADLINE, || async {
        redis.get(&host_key("web-1")).await.is_none()
    })
    .await;
    assert_eq!(
        relay.counter("relay_directory_errors_total", &[]).await,
        0.0,
        "no directory operation failed"
    );
}

#[tokio::test]
async fn relay_refuses_redis_whose_certificate_its_ca_did_not_sign_and_serves_locally() {
    let ca = TestCa::generate();
    let other = TestCa::generate();
    let redis = TestRedis::spawn_tls(&ca).await;
    let relay = relay_trusting(&redis, &other).await;
    let upstream = Upstream::spawn().await;
    let _host = TestHost::connect(&relay, "web-1", &upstream).await;

    wait_until_async("the directory write fails", DEADLINE, || async {
        relay.counter("relay_directory_errors_total", &[]).await > 0.0
    })
    .await;
    assert_eq!(
        redis.get(&host_key("web-1")).await,
        None,
        "nothing was written to a server that failed verification"
    );
    // The tunnel is still served from this machine.
    let resp = relay
        .http()
        .get(relay.http_url("/hosts/web-1/echo/local"))
        .bearer(&relay.client_token(&["web-1"]))
        .send()
        .await;
    resp.assert_status(200);
}
