//! HTTP through the tunnel: `ANY /hosts/{hostId}/{*path}` reaches the host as
//! a v1 `http` message and the host's `http:response` reaches the client.

use futures_util::future::join_all;
use http::Method;
use relay_tests::{
    DEADLINE, HttpClient, HttpResponse, RawHost, Stack, TestRelay, msg_id, msg_type,
};
use serde_json::{Value, json};

#[tokio::test]
async fn get_path_query_and_status_round_trip_through_tunnel() {
    let stack = Stack::spawn("web-1").await;

    let resp = stack
        .relay
        .http()
        .get(stack.url("/echo/a/b?x=1&y=two"))
        .bearer(&stack.client_token())
        .header("x-status", "201")
        .send()
        .await;

    resp.assert_status(201);
    assert_eq!(
        resp.header("x-upstream"),
        Some("echo"),
        "upstream response header lost"
    );
    let echo = resp.json();
    assert_eq!(echo["method"], "GET");
    assert_eq!(echo["path"], "/echo/a/b");
    assert_eq!(echo["query"], "x=1&y=two");
    assert_eq!(echo["body"], "");
}

#[tokio::test]
async fn post_body_and_status_round_trip_through_tunnel() {
    let stack = Stack::spawn("web-1").await;
    let payload = json!({"hello": "world", "n": [1, 2, 3], "unicode": "grüße ✓"});

    let resp = stack
        .relay
        .http()
        .request(Method::POST, stack.url("/echo/items"))
        .bearer(&stack.client_token())
        .json(&payload)
        .send()
        .await;

    resp.assert_status(200);
    let echo = resp.json();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/echo/items");
    assert_eq!(echo["headers"]["content-type"], "application/json");
    let body: Value = serde_json::from_str(echo["body"].as_str().expect("body is a string"))
        .expect("upstream received the JSON body intact");
    assert_eq!(body, payload);
}

#[tokio::test]
async fn put_and_delete_preserve_method_body_and_status() {
    let stack = Stack::spawn("web-1").await;
    let client = stack.relay.http();
    let token = stack.client_token();

    let put = client
        .request(Method::PUT, stack.url("/echo/doc/7"))
        .bearer(&token)
        .header("content-type", "text/plain")
        .header("x-status", "202")
        .body("new contents\nline two")
        .send()
        .await;
    put.assert_status(202);
    let echo = put.json();
    assert_eq!(echo["method"], "PUT");
    assert_eq!(echo["path"], "/echo/doc/7");
    assert_eq!(echo["body"], "new contents\nline two");

    let delete = client
        .request(Method::DELETE, stack.url("/echo/doc/7?hard=true"))
        .bearer(&token)
        .send()
        .await;
    delete.assert_status(200);
    let echo = delete.json();
    assert_eq!(echo["method"], "DELETE");
    assert_eq!(echo["query"], "hard=true");
    assert_eq!(echo["body"], "");
}

#[tokio::test]
async fn upstream_error_statuses_reach_client_unchanged() {
    let stack = Stack::spawn("web-1").await;
    let token = stack.client_token();

    for status in [400_u16, 404, 418, 500, 503] {
        let resp = stack
            .relay
            .http()
            .get(stack.url("/echo/status"))
            .bearer(&token)
            .header("x-status", &status.to_string())
            .send()
            .await;
        resp.assert_status(status);
        // The body is the upstream's, not a relay error.
        assert_eq!(resp.json()["path"], "/echo/status", "status {status}");
    }
}

#[tokio::test]
async fn http_message_has_lowercase_headers_forwarded_headers_and_no_hop_by_hop_or_credentials() {
    let relay = TestRelay::spawn().await;
    let mut host = RawHost::connect(&relay, "raw-1").await;
    let token = relay.client_token(&["raw-1"]);

    let client = relay.http().clone();
    let url = relay.http_url("/hosts/raw-1/api/items?a=1&b=two");
    let bearer = token.clone();
    let request = tokio::spawn(async move {
        client
            .request(Method::POST, url)
            .bearer(&bearer)
            .header("X-Custom-Header", "kept")
            .header("content-type", "text/plain")
            .header("connection", "keep-alive")
            .header("keep-alive", "timeout=5")
            .header("te", "trailers")
            .header("proxy-authorization", "Basic Zm9vOmJhcg==")
            .body("payload")
            .send()
            .await
    });

    let msg = host.expect("http").await;
    let id = msg_id(&msg);
    assert_eq!(msg["method"], "POST");
    assert_eq!(msg["path"], "/api/items?a=1&b=two");
    assert_eq!(msg["body"], "payload");
    let headers = msg["headers"].as_object().expect("headers is an object");
    for (name, value) in headers {
        assert_eq!(
            name,
            &name.to_ascii_lowercase(),
            "header names are lowercase"
        );
        assert!(value.is_string(), "header {name} is a string, got {value}");
    }
    assert_eq!(headers.get("x-custom-header"), Some(&json!("kept")));
    assert_eq!(headers.get("content-type"), Some(&json!("text/plain")));
    for stripped in [
        "authorization",
        "host",
        "connection",
        "keep-alive",
        "te",
        "proxy-authorization",
    ] {
        assert!(
            !headers.contains_key(stripped),
            "{stripped} must not reach the host: {msg}"
        );
    }
    let xff = headers["x-forwarded-for"]
        .as_str()
        .expect("x-forwarded-for added");
    assert!(
        xff.contains("127.0.0.1"),
        "x-forwarded-for is the client address, got {xff:?}"
    );
    assert_eq!(headers.get("x-forwarded-proto"), Some(&json!("http")));
    assert!(
        !msg.to_string().contains(&token),
        "the client token reached the host: {msg}"
    );

    host.respond(
        &id,
        207,
        json!({"x-from-host": "yes", "content-type": "text/plain"}),
        "multi-status body",
    )
    .await;
    let resp = request.await.expect("client task");
    resp.assert_status(207);
    assert_eq!(resp.header("x-from-host"), Some("yes"));
    assert_eq!(resp.header("content-type"), Some("text/plain"));
    assert_eq!(resp.text(), "multi-status body");
}

#[tokio::test]
async fn forwarded_headers_reach_upstream_through_test_host() {
    let stack = Stack::spawn("web-1").await;

    let resp = stack
        .relay
        .http()
        .get(stack.url("/echo"))
        .bearer(&stack.client_token())
        .send()
        .await;

    resp.assert_status(200);
    let headers = &resp.json()["headers"];
    assert!(
        headers["x-forwarded-for"]
            .as_str()
            .is_some_and(|v| v.contains("127.0.0.1")),
        "x-forwarded-for missing upstream: {headers}"
    );
    assert_eq!(headers["x-forwarded-proto"], "http");
    assert!(
        headers.get("authorization").is_none(),
        "authorization reached upstream: {headers}"
    );
    assert_ne!(
        headers["host"],
        json!(stack.relay.addr().to_string()),
        "the client's Host header (the relay address) reached upstream"
    );
}

#[tokio::test]
async fn token_query_param_is_stripped_and_other_params_kept_verbatim() {
    let relay = TestRelay::spawn().await;
    let mut host = RawHost::connect(&relay, "raw-1").await;
    let token = relay.client_token(&["raw-1"]);

    for (client_path, host_path) in [
        (
            format!("/hosts/raw-1/search?q=a%20b%2Fc&token={token}&page=2"),
            "/search?q=a%20b%2Fc&page=2",
        ),
        (
            format!("/hosts/raw-1/first?token={token}&z=9"),
            "/first?z=9",
        ),
        (format!("/hosts/raw-1/only?token={token}"), "/only"),
    ] {
        let client = relay.http().clone();
        let url = relay.http_url(&client_path);
        let request = tokio::spawn(async move { client.get(url).send().await });

        let msg = host.expect("http").await;
        assert_eq!(msg["method"], "GET");
        assert_eq!(msg["path"], host_path);
        assert!(msg.get("body").is_none(), "an empty body is omitted: {msg}");
        assert!(
            !msg.to_string().contains(&token),
            "the token reached the host: {msg}"
        );
        host.respond(&msg_id(&msg), 200, json!({}), "ok").await;

        let resp = request.await.expect("client task");
        resp.assert_status(200);
        assert_eq!(resp.text(), "ok");
    }
}

#[tokio::test]
async fn percent_encoded_path_is_forwarded_verbatim() {
    let relay = TestRelay::spawn().await;
    let mut host = RawHost::connect(&relay, "raw-1").await;
    let token = relay.client_token(&["raw-1"]);

    let client = relay.http().clone();
    let url = relay.http_url("/hosts/raw-1/files/a%20b%3F.txt");
    let request = tokio::spawn(async move { client.get(url).bearer(&token).send().await });

    let msg = host.expect("http").await;
    assert_eq!(
        msg["path"], "/files/a%20b%3F.txt",
        "path must not be decoded: {msg}"
    );
    host.respond(&msg_id(&msg), 200, json!({}), "").await;
    request.await.expect("client task").assert_status(200);
}

#[tokio::test]
async fn responses_answered_out_of_order_reach_the_right_clients() {
    let relay = TestRelay::spawn().await;
    let mut host = RawHost::connect(&relay, "raw-1").await;
    let token = relay.client_token(&["raw-1"]);

    let mut requests = Vec::new();
    for i in 0..3 {
        let client = relay.http().clone();
        let url = relay.http_url(&format!("/hosts/raw-1/item/{i}"));
        let token = token.clone();
        requests.push(tokio::spawn(async move {
            client.get(url).bearer(&token).send().await
        }));
    }
    let mut pending = Vec::new();
    for _ in 0..3 {
        let msg = host.expect("http").await;
        pending.push((msg_id(&msg), msg["path"].as_str().expect("path").to_owned()));
    }
    let ids: std::collections::HashSet<_> = pending.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(ids.len(), 3, "each exchange has its own id: {pending:?}");

    // Answer in reverse arrival order; each body names the path it answers.
    for (id, path) in pending.iter().rev() {
        host.respond(id, 200, json!({}), &format!("answer for {path}"))
            .await;
    }
    for (i, request) in requests.into_iter().enumerate() {
        let resp = request.await.expect("client task");
        resp.assert_status(200);
        assert_eq!(resp.text(), format!("answer for /item/{i}"));
    }
}

#[tokio::test]
async fn concurrent_requests_each_get_their_own_response() {
    let stack = Stack::spawn("web-1").await;
    let token = stack.client_token();

    let responses = join_all((0..20).map(|i| {
        stack
            .relay
            .http()
            .request(Method::POST, stack.url(&format!("/echo/n?i={i}")))
            .bearer(&token)
            .body(format!("body-{i}"))
            .send()
    }))
    .await;

    for (i, resp) in responses.iter().enumerate() {
        resp.assert_status(200);
        let echo = resp.json();
        assert_eq!(echo["query"], format!("i={i}"));
        assert_eq!(echo["body"], format!("body-{i}"));
    }
    assert_eq!(stack.host.seen_of_type("http"), 20);
}

#[tokio::test]
async fn request_body_over_max_body_bytes_is_rejected_with_413() {
    let stack = Stack::spawn_with(TestRelay::builder().max_body_bytes(1024), "web-1").await;
    let token = stack.client_token();

    let at_limit = stack
        .relay
        .http()
        .request(Method::POST, stack.url("/echo"))
        .bearer(&token)
        .body("a".repeat(1024))
        .send()
        .await;
    at_limit.assert_status(200);
    assert_eq!(at_limit.json()["body"].as_str().map(str::len), Some(1024));

    let over = stack
        .relay
        .http()
        .request(Method::POST, stack.url("/echo"))
        .bearer(&token)
        .body("a".repeat(1025))
        .send()
        .await;
    over.assert_status(413);
    assert!(!over.error().is_empty());
    assert_eq!(
        stack.upstream.requests(),
        1,
        "the oversized request must not reach upstream"
    );
    assert_eq!(
        stack.host.seen_of_type("http"),
        1,
        "the oversized request must not reach the host"
    );
}

#[tokio::test]
async fn request_to_host_without_tunnel_returns_503_host_not_connected() {
    let relay = TestRelay::spawn().await;
    let token = relay.client_token(&["ghost"]);

    let resp = relay
        .http()
        .get(relay.http_url("/hosts/ghost/anything"))
        .bearer(&token)
        .send()
        .await;

    resp.assert_status(503);
    assert_eq!(resp.json(), json!({"error": "host not connected"}));
}

#[tokio::test]
async fn paths_that_name_no_host_get_404_an_empty_host_id_400_and_the_rest_the_client_side() {
    let relay = TestRelay::spawn().await;
    let token = relay.client_token(&["ghost"]);

    let cases = [
        (Method::GET, "/hosts", 404, "not found"),
        (Method::GET, "/hosts/", 404, "not found"),
        (Method::GET, "/elsewhere", 404, "not found"),
        (Method::GET, "/hosts//anything", 400, "hostId is empty"),
        (Method::GET, "/hosts//", 400, "hostId is empty"),
        // Without a trailing slash, with one, and with a path: the client side, every
        // method.
        (Method::GET, "/hosts/ghost", 503, "host not connected"),
        (Method::POST, "/hosts/ghost/", 503, "host not connected"),
        (
            Method::DELETE,
            "/hosts/ghost/a/b",
            503,
            "host not connected",
        ),
    ];
    for (method, path, status, error) in cases {
        let resp = relay
            .http()
            .request(method.clone(), relay.http_url(path))
            .bearer(&token)
            .send()
            .await;
        resp.assert_status(status);
        assert_eq!(resp.error(), error, "{method} {path}");
    }
}

#[tokio::test]
async fn request_after_host_disconnects_returns_503() {
    let stack = Stack::spawn("web-1").await;
    let token = stack.client_token();
    stack
        .relay
        .http()
        .get(stack.url("/echo"))
        .bearer(&token)
        .send()
        .await
        .assert_status(200);

    stack.host.close(1000);
    stack.relay.wait_host_disconnected("web-1").await;

    let resp = stack
        .relay
        .http()
        .get(stack.url("/echo"))
        .bearer(&token)
        .send()
        .await;
    resp.assert_status(503);
    assert_eq!(resp.error(), "host not connected");
}

#[tokio::test]
async fn whoowns_reports_region_while_tunnel_is_here_and_503_after() {
    let stack = Stack::spawn_with(TestRelay::builder().region("eu-west"), "web-1").await;
    let token = stack.client_token();

    let here = stack.relay.whoowns_with("web-1", &token).await;
    here.assert_status(200);
    let body = here.json();
    assert_eq!(body["ok"], json!(true), "{body}");
    assert_eq!(body["region"], "eu-west", "{body}");
    assert_eq!(
        stack.host.seen_of_type("http"),
        0,
        "_whoowns must not reach the host"
    );

    let other = stack.relay.whoowns("elsewhere").await;
    other.assert_status(503);

    stack.host.close(1000);
    stack.host.wait_ended(DEADLINE).await;
    stack.relay.wait_host_disconnected("web-1").await;
    let gone = stack.relay.whoowns_with("web-1", &token).await;
    gone.assert_status(503);
    assert!(!gone.error().is_empty());
}

#[tokio::test]
async fn health_reports_ok_region_and_machine() {
    let relay = TestRelay::builder()
        .region("ap-south")
        .machine_id("machine-42")
        .spawn()
        .await;

    let resp = HttpClient::new()
        .get(relay.http_url("/health"))
        .send()
        .await;

    resp.assert_status(200);
    assert_eq!(
        resp.json(),
        json!({"ok": true, "region": "ap-south", "machine": "machine-42", "proto": 2})
    );
}

#[tokio::test]
async fn invalid_host_ids_in_path_are_rejected_with_400() {
    let relay = TestRelay::spawn().await;
    let token = relay.client_token(&["*"]);
    let too_long = "a".repeat(129);

    for bad in ["bad!id", "bad%20id", "b%C3%A4d", too_long.as_str()] {
        let resp = relay
            .http()
            .get(relay.http_url(&format!("/hosts/{bad}/x")))
            .bearer(&token)
            .send()
            .await;
        assert_eq!(resp.status, 400, "hostId {bad:?}: body {:?}", resp.text());
        assert!(!resp.error().is_empty());
    }
}

#[tokio::test]
async fn host_ids_at_the_edge_of_the_allowed_charset_and_length_work() {
    let relay = TestRelay::spawn().await;
    let longest = format!("A.b_c-9{}", "x".repeat(121));
    assert_eq!(longest.len(), 128);

    for host_id in ["A.b_c-9", longest.as_str()] {
        let mut host = RawHost::connect(&relay, host_id).await;
        let client = relay.http().clone();
        let url = relay.http_url(&format!("/hosts/{host_id}/p"));
        let token = relay.client_token(&[host_id]);
        let request = tokio::spawn(async move { client.get(url).bearer(&token).send().await });
        let msg = host.expect("http").await;
        assert_eq!(msg_type(&msg), "http");
        assert_eq!(msg["path"], "/p");
        host.respond(&msg_id(&msg), 200, json!({}), host_id).await;
        let resp = request.await.expect("client task");
        resp.assert_status(200);
        assert_eq!(resp.text(), host_id);
    }
}

// ---- documented in docs/protocol.md beyond the v1 contract ----

/// Starts a request built by `build` in the background.
fn spawn_request<F>(relay: &TestRelay, build: F) -> tokio::task::JoinHandle<HttpResponse>
where
    F: FnOnce(&HttpClient) -> relay_tests::client::RequestBuilder<'_> + Send + 'static,
{
    let client = relay.http().clone();
    tokio::spawn(async move { build(&client).send().await })
}

#[tokio::test]
async fn repeated_headers_are_joined_and_forwarded_headers_extend_existing_ones() {
    let relay = TestRelay::spawn().await;
    let mut host = RawHost::connect(&relay, "raw-1").await;
    let token = relay.client_token(&["raw-1"]);
    let url = relay.http_url("/hosts/raw-1/h");
    let request = spawn_request(&relay, move |client| {
        client
            .get(url)
            .bearer(&token)
            .header("x-multi", "a")
            .header("x-multi", "b")
            .header("cookie", "c1=1")
            .header("cookie", "c2=2")
            .header("x-forwarded-for", "10.0.0.1")
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-host", "evil.example")
            .header("x-forwarded-prefix", "/elsewhere")
    });

    let msg = host.expect("http").await;
    let headers = &msg["headers"];
    assert_eq!(headers["x-multi"], "a, b", "{msg}");
    assert_eq!(headers["cookie"], "c1=1; c2=2", "{msg}");
    assert_eq!(headers["x-forwarded-for"], "10.0.0.1, 127.0.0.1", "{msg}");
    assert_eq!(
        headers["x-forwarded-proto"], "http",
        "a client's own proto is replaced, not trusted: {msg}"
    );
    assert_eq!(
        headers["x-forwarded-host"],
        json!(relay.addr().to_string()),
        "a client's own forwarded host is replaced by its Host: {msg}"
    );
    assert_eq!(
        headers["x-forwarded-prefix"], "/hosts/raw-1",
        "where the host's paths start on the relay: {msg}"
    );
    assert!(headers.get("content-length").is_none(), "{msg}");
    host.respond(&msg_id(&msg), 200, json!({}), "").await;
    request.await.expect("client task").assert_status(200);
}

#[tokio::test]
async fn response_header_arrays_numbers_and_booleans_reach_the_client() {
    let relay = TestRelay::spawn().await;
    let mut host = RawHost::connect(&relay, "raw-1").await;
    let token = relay.client_token(&["raw-1"]);
    let url = relay.http_url("/hosts/raw-1/cookies");
    let request = spawn_request(&relay, move |client| client.get(url).bearer(&token));

    let msg = host.expect("http").await;
    host.respond(
        &msg_id(&msg),
        200,
        json!({"set-cookie": ["a=1", "b=2"], "x-count": 5, "x-flag": true}),
        "cookies",
    )
    .await;

    let resp = request.await.expect("client task");
    resp.assert_status(200);
    let cookies: Vec<&str> = resp
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().expect("ascii"))
        .collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
    assert_eq!(resp.header("x-count"), Some("5"));
    assert_eq!(resp.header("x-flag"), Some("true"));
}

#[tokio::test]
async fn base64_encoded_response_body_reaches_client_as_bytes() {
    use base64::Engine as _;
    let relay = TestRelay::spawn().await;
    let mut host = RawHost::connect(&relay, "raw-1").await;
    let token = relay.client_token(&["raw-1"]);
    let url = relay.http_url("/hosts/raw-1/blob");
    let request = spawn_request(&relay, move |client| client.get(url).bearer(&token));
    let bytes: &[u8] = &[0, 159, 146, 150, 255];

    let msg = host.expect("http").await;
    host.send_json(&json!({
        "type": "http:response",
        "id": msg_id(&msg),
        "status": 200,
        "headers": {"content-type": "application/octet-stream"},
        "body": base64::engine::general_purpose::STANDARD.encode(bytes),
        "encoding": "base64",
    }))
    .await;

    let resp = request.await.expect("client task");
    resp.assert_status(200);
    assert_eq!(&resp.body[..], bytes);
}

#[tokio::test]
async fn non_utf8_request_body_is_rejected_with_415() {
    let stack = Stack::spawn("web-1").await;

    let resp = stack
        .relay
        .http()
        .request(Method::POST, stack.url("/echo"))
        .bearer(&stack.client_token())
        .body(vec![0xff_u8, 0xfe, 0x00, 0x80])
        .send()
        .await;

    resp.assert_status(415);
    assert!(!resp.error().is_empty());
    assert_eq!(stack.upstream.requests(), 0);
}

#[tokio::test]
async fn host_response_with_invalid_status_gives_502() {
    let relay = TestRelay::spawn().await;
    let mut host = RawHost::connect(&relay, "raw-1").await;
    let token = relay.client_token(&["raw-1"]);

    for status in [99_u16, 600, 1000] {
        let url = relay.http_url("/hosts/raw-1/bad-status");
        let token = token.clone();
        let request = spawn_request(&relay, move |client| client.get(url).bearer(&token));
        let msg = host.expect("http").await;
        host.respond(&msg_id(&msg), status, json!({}), "nope").await;
        let resp = request.await.expect("client task");
        assert_eq!(
            resp.status,
            502,
            "host status {status}: body {:?}",
            resp.text()
        );
        assert!(!resp.error().is_empty());
    }
}

#[tokio::test]
async fn bare_host_path_reaches_host_root() {
    let relay = TestRelay::spawn().await;
    let mut host = RawHost::connect(&relay, "raw-1").await;
    let token = relay.client_token(&["raw-1"]);

    for (client_path, host_path) in [("/hosts/raw-1", "/"), ("/hosts/raw-1/?a=1", "/?a=1")] {
        let url = relay.http_url(client_path);
        let token = token.clone();
        let request = spawn_request(&relay, move |client| client.get(url).bearer(&token));
        let msg = host.expect("http").await;
        assert_eq!(msg["path"], host_path, "client path {client_path}");
        host.respond(&msg_id(&msg), 200, json!({}), "root").await;
        request.await.expect("client task").assert_status(200);
    }
}

#[tokio::test]
async fn plain_http_request_to_tunnel_endpoint_gets_426() {
    let relay = TestRelay::spawn().await;
    let token = relay.host_token("h1");

    let resp = relay
        .http()
        .get(relay.http_url(&format!("/tunnel?hostId=h1&token={token}")))
        .send()
        .await;

    resp.assert_status(426);
    relay.whoowns("h1").await.assert_status(503);
}

#[tokio::test]
async fn behind_a_trusted_proxy_its_forwarded_proto_and_host_are_kept() {
    // --client-ip-header says a platform proxy (Fly's, a TLS terminator) fronts the relay.
    let relay = TestRelay::builder()
        .env("RELAY_CLIENT_IP_HEADER", "fly-client-ip")
        .spawn()
        .await;
    let mut host = RawHost::connect(&relay, "raw-1").await;
    let token = relay.client_token(&["raw-1"]);
    let url = relay.http_url("/hosts/raw-1/h");
    let request = spawn_request(&relay, move |client| {
        client
            .get(url)
            .bearer(&token)
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-host", "relay.example.com")
            .header("x-forwarded-prefix", "/ignored")
    });
    let msg = host.expect("http").await;
    let headers = &msg["headers"];
    assert_eq!(headers["x-forwarded-proto"], "https", "{msg}");
    assert_eq!(headers["x-forwarded-host"], "relay.example.com", "{msg}");
    assert_eq!(
        headers["x-forwarded-prefix"], "/hosts/raw-1",
        "always the relay's: {msg}"
    );
    host.respond(&msg_id(&msg), 200, json!({}), "").await;
    request.await.expect("client task").assert_status(200);
}

// ---- per-host subdomains (`--base-domain`) ----

/// A relay serving hosts on subdomains of `relay.test` as well.
async fn subdomain_relay() -> TestRelay {
    TestRelay::builder()
        .arg("--base-domain", "relay.test")
        .spawn()
        .await
}

#[tokio::test]
async fn a_host_is_reached_at_the_root_of_its_subdomain_and_its_absolute_redirects_work() {
    let relay = subdomain_relay().await;
    let mut host = RawHost::connect(&relay, "raw-1").await;
    let token = relay.client_token(&["raw-1"]);
    let name = format!("raw-1.relay.test:{}", relay.addr().port());
    let url = relay.http_url("/login?next=%2Fhome");
    let request = spawn_request(&relay, {
        let name = name.clone();
        move |client| {
            client
                .get(url)
                .header("host", &name)
                .bearer(&token)
                .header("x-forwarded-prefix", "/forged")
        }
    });
    let msg = host.expect("http").await;
    assert_eq!(msg["path"], "/login?next=%2Fhome", "at the root: {msg}");
    let headers = &msg["headers"];
    assert_eq!(headers["x-forwarded-host"], json!(name), "{msg}");
    assert_eq!(headers["x-forwarded-proto"], "http", "{msg}");
    assert!(
        headers.get("x-forwarded-prefix").is_none(),
        "no prefix at the root, and a client's is dropped: {msg}"
    );
    let location = format!("http://{name}/home");
    host.respond(&msg_id(&msg), 302, json!({ "location": location }), "")
        .await;
    let resp = request.await.expect("client task");
    resp.assert_status(302);
    assert_eq!(resp.header("location"), Some(location.as_str()));

    // Every path on the subdomain is the host's, the relay's own included; the relay's
    // are served on its other names.
    let token = relay.client_token(&["raw-1"]);
    let url = relay.http_url("/health");
    let request = spawn_request(&relay, {
        let name = name.clone();
        move |client| client.get(url).header("host", &name).bearer(&token)
    });
    let msg = host.expect("http").await;
    assert_eq!(msg["path"], "/health");
    host.respond(&msg_id(&msg), 200, json!({}), "the host's")
        .await;
    assert_eq!(request.await.expect("client task").text(), "the host's");
    let own = relay
        .http()
        .get(relay.http_url("/health"))
        .header("host", "relay.test")
        .send()
        .await;
    assert_eq!(own.json()["ok"], true, "the base domain is the relay's own");
}

#[tokio::test]
async fn a_subdomain_that_is_not_a_host_id_is_refused_and_reaches_no_host() {
    let relay = subdomain_relay().await;
    let _host = RawHost::connect(&relay, "raw-1").await;
    for name in ["raw-1/x.relay.test", "a%2Fb.relay.test", "a!.relay.test"] {
        let resp = relay
            .http()
            .get(relay.http_url("/p"))
            .header("host", name)
            .bearer(&relay.client_token(&["*"]))
            .send()
            .await;
        assert_eq!(resp.status, 400, "{name}: {}", resp.text());
    }
}

#[tokio::test]
async fn a_token_visit_on_a_subdomain_sets_a_host_only_cookie_that_later_requests_use_and_the_host_never_sees()
 {
    let relay = subdomain_relay().await;
    let mut host = RawHost::connect(&relay, "raw-1").await;
    let token = relay.client_token(&["raw-1"]);
    let name = "raw-1.relay.test";

    // A browser's first visit: `?token=`, no header.
    let url = relay.http_url(&format!("/app?a=1&token={token}"));
    let request = spawn_request(&relay, move |client| client.get(url).header("host", name));
    let msg = host.expect("http").await;
    assert_eq!(msg["path"], "/app?a=1", "the token never reaches the host");
    host.respond(&msg_id(&msg), 200, json!({}), "").await;
    let resp = request.await.expect("client task");
    resp.assert_status(200);
    let cookie = resp
        .header("set-cookie")
        .expect("a cookie is set")
        .to_owned();
    assert_eq!(
        cookie,
        format!("__Host-relay_token={token}; Path=/; HttpOnly; Secure; SameSite=Lax"),
        "host-only (no Domain), not readable by scripts"
    );

    // Later requests carry the cookie and nothing else; the host sees the app's own
    // cookies only.
    let url = relay.http_url("/next");
    let jar = format!("theme=dark; __Host-relay_token={token}; lang=en");
    let request = spawn_request(&relay, move |client| {
        client.get(url).header("host", name).header("cookie", &jar)
    });
    let msg = host.expect("http").await;
    assert_eq!(msg["headers"]["cookie"], "theme=dark; lang=en", "{msg}");
    host.respond(&msg_id(&msg), 200, json!({}), "").await;
    let resp = request.await.expect("client task");
    resp.assert_status(200);
    assert_eq!(
        resp.header("set-cookie"),
        None,
        "set once, by the token visit"
    );

    // A cookie with a token that does not verify, or none, is refused.
    for jar in ["__Host-relay_token=not-a-token", "theme=dark"] {
        let resp = relay
            .http()
            .get(relay.http_url("/next"))
            .header("host", name)
            .header("cookie", jar)
            .send()
            .await;
        assert_eq!(resp.status, 401, "{jar}");
    }
    // Path routing sets no cookie: its origin is every host's.
    let url = relay.http_url(&format!("/hosts/raw-1/p?token={token}"));
    let request = spawn_request(&relay, move |client| client.get(url));
    let msg = host.expect("http").await;
    host.respond(&msg_id(&msg), 200, json!({}), "").await;
    assert_eq!(
        request.await.expect("client task").header("set-cookie"),
        None
    );
    assert!(
        relay.logs().iter().all(|line| !line.contains(&token)),
        "the token is in no log line"
    );
}

#[tokio::test]
async fn a_websocket_on_a_subdomain_reaches_the_host_with_the_cookie_alone() {
    let stack = Stack::spawn_with(
        TestRelay::builder().arg("--base-domain", "relay.test"),
        "web-1",
    )
    .await;
    let token = stack.client_token();
    let jar = format!("__Host-relay_token={token}");
    let (mut ws, _) = relay_tests::WsClient::connect_with_headers(
        &stack.relay.ws_url("/ws/echo"),
        None,
        &[],
        &[("host", "web-1.relay.test"), ("cookie", &jar)],
    )
    .await
    .expect("the upgrade is authorized by the cookie");
    ws.send_text("hello").await;
    assert_eq!(ws.recv_text().await, "hello");
    ws.close(1000).await;

    let refused = relay_tests::WsClient::connect_with_headers(
        &stack.relay.ws_url("/ws/echo"),
        None,
        &[],
        &[("host", "web-1.relay.test")],
    )
    .await
    .err()
    .expect("no token, no channel");
    assert_eq!(relay_tests::rejection_status(&refused), Some(401));
}
