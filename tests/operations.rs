//! What an operator sees: metrics that move with traffic, the admin endpoint, and
//! structured logs without tokens.

use relay_tests::{DEADLINE, Stack, TestHost, TestRedis, TestRelay, Upstream, wait_until_async};
use serde_json::Value;

const ADMIN_TOKEN: &str = "admin-token-for-tests-0001";

#[tokio::test]
async fn request_counter_and_tunnel_gauge_move_with_traffic() {
    let relay = TestRelay::spawn().await;
    let upstream = Upstream::spawn().await;
    let labels = [("status", "2xx"), ("route", "local")];
    assert_eq!(relay.counter("relay_tunnels_connected", &[]).await, 0.0);
    let before = relay.counter("relay_client_requests_total", &labels).await;

    let host = TestHost::connect(&relay, "ops-1", &upstream).await;
    relay.wait_host_connected("ops-1").await;
    relay
        .wait_counter("relay_tunnels_connected", &[], 1.0)
        .await;
    let bytes_before = relay
        .counter("relay_bytes_total", &[("direction", "to_host")])
        .await;

    let token = relay.client_token(&["ops-1"]);
    for _ in 0..3 {
        relay
            .http()
            .request(http::Method::POST, relay.http_url("/hosts/ops-1/echo"))
            .bearer(&token)
            .header("content-type", "text/plain")
            .body("twelve bytes")
            .send()
            .await
            .assert_status(200);
    }
    // wait_host_connected made requests too; count at least the three of ours.
    let after = relay.counter("relay_client_requests_total", &labels).await;
    assert!(
        after >= before + 3.0,
        "requests counted {before} -> {after}"
    );
    let bytes_after = relay
        .counter("relay_bytes_total", &[("direction", "to_host")])
        .await;
    assert!(
        bytes_after >= bytes_before + 36.0,
        "bytes {bytes_before} -> {bytes_after}"
    );
    assert!(
        relay
            .counter(
                "relay_directory_ops_total",
                &[("op", "register"), ("outcome", "ok")]
            )
            .await
            >= 1.0,
        "directory operations are counted"
    );

    drop(host);
    relay
        .wait_counter("relay_tunnels_connected", &[], 0.0)
        .await;
    assert!(
        relay
            .counter("relay_tunnel_unregistrations_total", &[])
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn the_allocators_view_of_memory_is_published_as_metrics() {
    let relay = TestRelay::spawn().await;
    let allocated = relay.counter("relay_allocator_allocated_bytes", &[]).await;
    let resident = relay.counter("relay_allocator_resident_bytes", &[]).await;
    // The relay's own state at rest (runtime, listener, metrics) is well over 64 KiB;
    // a binary whose global allocator is not jemalloc would show jemalloc's few bytes.
    assert!(
        allocated > 64.0 * 1024.0,
        "allocated {allocated} bytes: is jemalloc the relay's allocator?"
    );
    assert!(
        resident >= allocated,
        "resident {resident} bytes below allocated {allocated}"
    );
}

#[tokio::test]
async fn admin_tunnels_rejects_missing_and_wrong_tokens_and_lists_real_tunnels() {
    let stack = Stack::spawn_with(
        TestRelay::builder().env("RELAY_ADMIN_TOKEN", ADMIN_TOKEN),
        "admin-1",
    )
    .await;
    let url = stack.relay.http_url("/admin/tunnels");

    stack
        .relay
        .http()
        .get(url.clone())
        .send()
        .await
        .assert_status(401);
    stack
        .relay
        .http()
        .get(url.clone())
        .bearer("admin-token-for-tests-0002")
        .send()
        .await
        .assert_status(401);
    // A valid client token is not an admin token.
    stack
        .relay
        .http()
        .get(url.clone())
        .bearer(&stack.client_token())
        .send()
        .await
        .assert_status(401);

    let resp = stack.relay.http().get(url).bearer(ADMIN_TOKEN).send().await;
    resp.assert_status(200);
    let body = resp.json();
    assert_eq!(body["region"], stack.relay.region());
    assert_eq!(body["machine"], stack.relay.machine_id());
    let tunnels = body["tunnels"].as_array().expect("tunnels is a list");
    assert_eq!(tunnels.len(), 1, "{body}");
    let tunnel = &tunnels[0];
    assert_eq!(tunnel["hostId"], "admin-1");
    assert_eq!(tunnel["protocol"], "v1");
    assert_eq!(tunnel["pendingExchanges"], 0);
    assert_eq!(tunnel["openChannels"], 0);
    assert!(
        tunnel["connectedSince"].as_f64().unwrap() > 1.7e9,
        "{tunnel}"
    );
    assert!(!stack.relay.logs().iter().any(|l| l.contains(ADMIN_TOKEN)));
}

#[tokio::test]
async fn admin_tunnels_all_walks_the_whole_directory_in_pages() {
    let redis = TestRedis::spawn().await;
    let spawn = |region: &'static str, machine: &'static str| {
        TestRelay::builder()
            .region(region)
            .machine_id(machine)
            .redis(&redis.url())
            .env("RELAY_ADMIN_TOKEN", ADMIN_TOKEN)
            .spawn()
    };
    let a = spawn("ams", "relay-a").await;
    let b = spawn("fra", "relay-b").await;
    let upstream = Upstream::spawn().await;
    let mut hosts = Vec::new();
    for (relay, host) in [(&a, "web-1"), (&a, "web-2"), (&b, "web-3")] {
        hosts.push(TestHost::connect(relay, host, &upstream).await);
        redis.wait_host_owner(host, relay).await;
    }
    let admin = |query: &str| {
        a.http()
            .get(a.http_url(&format!("/admin/tunnels{query}")))
            .bearer(ADMIN_TOKEN)
            .send()
    };

    let local = admin("").await;
    local.assert_status(200);
    assert!(local.json().get("directory").is_none(), "only with ?all=1");

    let all = admin("?all=1").await;
    all.assert_status(200);
    let body = all.json();
    assert_eq!(body["count"], 2, "the local part is unchanged: {body}");
    assert_eq!(body["directory"]["kind"], "redis");
    let owners: Vec<(String, String)> = entries(&body);
    assert_eq!(
        owners,
        [
            ("web-1".to_owned(), "ams:relay-a".to_owned()),
            ("web-2".to_owned(), "ams:relay-a".to_owned()),
            ("web-3".to_owned(), "fra:relay-b".to_owned()),
        ]
    );

    // A page at a time, following nextCursor until it is null.
    let mut walked = Vec::new();
    let mut cursor = String::from("0");
    for _ in 0..100 {
        let page = admin(&format!("?all=1&count=1&cursor={cursor}")).await;
        page.assert_status(200);
        let page = page.json();
        walked.extend(entries(&page));
        match page["directory"]["nextCursor"].as_str() {
            Some(next) => cursor = next.to_owned(),
            None => break,
        }
    }
    walked.sort();
    walked.dedup();
    assert_eq!(walked, owners);

    admin("?all=1&cursor=minus-one").await.assert_status(400);
    admin("?all=1&count=lots").await.assert_status(400);
    a.http()
        .get(a.http_url("/admin/tunnels?all=1"))
        .send()
        .await
        .assert_status(401);
}

/// The directory entries of an admin answer, as (hostId, owner), sorted.
fn entries(body: &Value) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = body["directory"]["entries"]
        .as_array()
        .unwrap_or_else(|| panic!("no directory entries in {body}"))
        .iter()
        .map(|e| {
            (
                e["hostId"].as_str().unwrap().to_owned(),
                e["owner"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn admin_endpoint_is_off_without_a_configured_token() {
    let relay = TestRelay::spawn().await;
    relay
        .http()
        .get(relay.http_url("/admin/tunnels"))
        .bearer(ADMIN_TOKEN)
        .send()
        .await
        .assert_status(404);
}

#[tokio::test]
async fn json_log_lines_parse_as_json_and_contain_no_token() {
    let relay = TestRelay::builder()
        .env("RELAY_LOG_FORMAT", "json")
        .rust_log("debug")
        .spawn()
        .await;
    let upstream = Upstream::spawn().await;
    let host_token = relay.host_token("json-1");
    let _host = TestHost::connect_url(
        &relay.tunnel_url("json-1", &host_token),
        None,
        upstream.addr(),
    )
    .await;
    let client_token = relay.client_token(&["json-1"]);
    relay
        .wait_host_connected_with("json-1", &client_token)
        .await;
    relay
        .http()
        .get(relay.http_url(&format!("/hosts/json-1/echo?token={client_token}")))
        .send()
        .await
        .assert_status(200);
    // A refused request logs too.
    relay
        .http()
        .get(relay.http_url("/hosts/json-1/echo?token=not-a-jwt-but-secret"))
        .send()
        .await
        .assert_status(401);

    wait_until_async("a debug line for the refused request", DEADLINE, || async {
        relay
            .logs()
            .iter()
            .any(|l| l.contains("client request refused"))
    })
    .await;
    let logs = relay.logs();
    let json_lines: Vec<&String> = logs.iter().filter(|l| l.starts_with('{')).collect();
    assert!(
        json_lines.len() >= 3,
        "expected JSON log lines, got {logs:#?}"
    );
    for line in &json_lines {
        let value: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
        assert!(
            value["level"].is_string() && value["fields"].is_object(),
            "{line}"
        );
        for secret in [
            &host_token,
            &client_token,
            &"not-a-jwt-but-secret".to_owned(),
        ] {
            assert!(!line.contains(secret.as_str()), "token in log line: {line}");
        }
    }
    assert!(
        json_lines
            .iter()
            .any(|l| l.contains("\"message\":\"listening\"")),
        "the listening line is JSON too"
    );
}

/// The access log lines in `relay`'s output (JSON objects with a `kind`).
fn access_lines(relay: &TestRelay) -> Vec<Value> {
    relay
        .logs()
        .iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|v| v.get("kind").is_some() && v.get("bytes_out").is_some())
        .collect()
}

#[tokio::test]
async fn the_access_log_has_one_line_per_request_and_channel_without_tokens() {
    let relay = TestRelay::builder()
        .arg("--access-log", "json")
        .spawn()
        .await;
    let upstream = Upstream::spawn().await;
    let _host = TestHost::connect(&relay, "log-1", &upstream).await;
    relay.wait_host_connected("log-1").await;
    let token = relay.client_token(&["log-1"]);
    let before = access_lines(&relay).len();
    let response = relay
        .http()
        .request(
            http::Method::POST,
            relay.http_url(&format!("/hosts/log-1/echo/a?token={token}&q=1")),
        )
        .header("cookie", "session=very-secret-cookie")
        .body("0123456789")
        .send()
        .await;
    assert_eq!(response.status, 200);
    let body_len = response.text().len() as u64;
    let mut ws = relay_tests::WsClient::connect_ok(
        &relay.ws_url(&format!("/hosts/log-1/ws/echo?token={token}")),
        None,
    )
    .await;
    ws.send_text("hello").await;
    let _ = ws.recv_data().await;
    ws.close(1000).await;
    wait_until_async(
        "the request's and the channel's lines",
        DEADLINE,
        || async { access_lines(&relay).len() >= before + 2 },
    )
    .await;
    let lines = access_lines(&relay);
    let http = lines
        .iter()
        .find(|l| l["kind"] == "http" && l["path"] == "/hosts/log-1/echo/a")
        .unwrap_or_else(|| panic!("no line for the request: {lines:?}"));
    assert_eq!(http["host"], "log-1");
    assert_eq!(http["method"], "POST");
    assert_eq!(http["status"], 200);
    assert_eq!(http["bytes_in"], 10);
    assert_eq!(http["bytes_out"], body_len);
    assert_eq!(http["route"], "local");
    assert!(http["duration_ms"].as_f64().is_some_and(|ms| ms > 0.0));
    let ws_line = lines
        .iter()
        .find(|l| l["kind"] == "ws")
        .unwrap_or_else(|| panic!("no line for the channel: {lines:?}"));
    assert_eq!(ws_line["path"], "/hosts/log-1/ws/echo");
    assert_eq!(ws_line["status"], 101);
    assert_eq!(
        (ws_line["bytes_in"].as_u64(), ws_line["bytes_out"].as_u64()),
        (Some(5), Some(5))
    );
    let all = relay.logs().join("\n");
    assert!(!all.contains(&token), "the token is never logged");
    assert!(!all.contains("very-secret-cookie"), "nor a cookie");
}

#[tokio::test]
async fn the_access_log_is_off_by_default_and_plain_text_on_request() {
    let quiet = Stack::spawn("quiet-1").await;
    let response = quiet
        .relay
        .http()
        .get(quiet.url("/echo"))
        .bearer(&quiet.client_token())
        .send()
        .await;
    assert_eq!(response.status, 200);
    assert!(
        !quiet
            .relay
            .logs()
            .iter()
            .any(|l| l.contains("/hosts/quiet-1/echo")),
        "no access line without --access-log"
    );

    let relay = TestRelay::builder()
        .arg("--access-log", "text")
        .spawn()
        .await;
    let token = relay.client_token(&["nobody"]);
    let response = relay
        .http()
        .get(relay.http_url("/hosts/nobody/x"))
        .bearer(&token)
        .send()
        .await;
    assert_eq!(response.status, 503);
    let line = relay
        .wait_for_log(" nobody GET /hosts/nobody/x 503 ", DEADLINE)
        .await;
    assert!(line.ends_with(" none"), "{line}");
}
