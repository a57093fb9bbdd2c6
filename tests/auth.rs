//! Authentication and authorization on the tunnel endpoint (failures are an
//! upgrade followed by Close 1008) and on the client endpoints (401 / 403).

use relay_tests::{
    Claims, DEADLINE, HttpResponse, RawHost, Stack, TEST_SECRET, TestRelay, WsClient, WsEnd,
    rejection_status,
};
use serde_json::json;

/// Opens `/tunnel?{query}` (optionally with a bearer token) and asserts the
/// relay upgrades, then closes with 1008, and registers nothing for
/// `host_id`.
async fn assert_tunnel_refused(
    relay: &TestRelay,
    query: &str,
    bearer: Option<&str>,
    host_id: &str,
) {
    let url = relay.ws_url(&format!("/tunnel?{query}"));
    let mut host = RawHost::connect_url(&url, bearer).await;
    let code = host.recv_close_code(DEADLINE).await;
    assert_eq!(
        code,
        1008,
        "tunnel /tunnel?{} must be closed with 1008",
        redact(query)
    );
    relay.whoowns(host_id).await.assert_status(503);
}

/// `query` with token values hidden, for failure messages.
fn redact(query: &str) -> String {
    relay_tests::ws::redact_url(&format!("?{query}"))
}

// ---- tunnel: refused ----

#[tokio::test]
async fn tunnel_without_token_is_closed_with_1008() {
    let relay = TestRelay::spawn().await;
    assert_tunnel_refused(&relay, "hostId=h1", None, "h1").await;
}

#[tokio::test]
async fn tunnel_without_host_id_is_closed_with_1008() {
    let relay = TestRelay::spawn().await;
    let token = Claims::host("*").sign(TEST_SECRET);
    assert_tunnel_refused(&relay, &format!("token={token}"), None, "h1").await;
}

#[tokio::test]
async fn tunnel_with_token_signed_by_another_secret_is_closed_with_1008() {
    let relay = TestRelay::spawn().await;
    let token = Claims::host("h1").sign("not-the-relay-secret");
    assert_tunnel_refused(&relay, &format!("hostId=h1&token={token}"), None, "h1").await;
}

#[tokio::test]
async fn tunnel_with_expired_token_is_closed_with_1008() {
    let relay = TestRelay::spawn().await;
    let token = Claims::host("h1").expired().sign(TEST_SECRET);
    assert_tunnel_refused(&relay, &format!("hostId=h1&token={token}"), None, "h1").await;
}

#[tokio::test]
async fn tunnel_with_a_token_not_valid_yet_is_closed_with_1008() {
    let relay = TestRelay::spawn().await;
    let token = Claims::host("h1").not_yet_valid().sign(TEST_SECRET);
    assert_tunnel_refused(&relay, &format!("hostId=h1&token={token}"), None, "h1").await;
}

#[tokio::test]
async fn tunnel_with_client_role_token_is_closed_with_1008() {
    let relay = TestRelay::spawn().await;
    let token = Claims::client(&["h1"]).sign(TEST_SECRET);
    assert_tunnel_refused(&relay, &format!("hostId=h1&token={token}"), None, "h1").await;
}

#[tokio::test]
async fn tunnel_for_host_not_in_token_hosts_is_closed_with_1008() {
    let relay = TestRelay::spawn().await;
    let token = Claims::host("h2").sign(TEST_SECRET);
    assert_tunnel_refused(&relay, &format!("hostId=h1&token={token}"), None, "h1").await;
}

#[tokio::test]
async fn tunnel_with_garbage_token_is_closed_with_1008() {
    let relay = TestRelay::spawn().await;
    assert_tunnel_refused(&relay, "hostId=h1&token=not-a-jwt", None, "h1").await;
}

#[tokio::test]
async fn tunnel_with_bad_bearer_header_is_closed_with_1008() {
    let relay = TestRelay::spawn().await;
    let token = Claims::host("h1").sign("not-the-relay-secret");
    assert_tunnel_refused(&relay, "hostId=h1", Some(&token), "h1").await;
}

#[tokio::test]
async fn tunnel_with_invalid_host_id_is_closed_with_1008() {
    let relay = TestRelay::spawn().await;
    let token = Claims::host("*").sign(TEST_SECRET);
    let too_long = "a".repeat(129);

    for (bad, lookup) in [
        ("bad!id", "x"),
        ("bad%20id", "x"),
        ("", "x"),
        (too_long.as_str(), "x"),
    ] {
        assert_tunnel_refused(&relay, &format!("hostId={bad}&token={token}"), None, lookup).await;
    }
}

// ---- tunnel: accepted ----

#[tokio::test]
async fn tunnel_accepts_host_token_in_query() {
    let relay = TestRelay::spawn().await;
    let token = relay.host_token("h1");
    let _host = RawHost::connect_url(&relay.tunnel_url("h1", &token), None).await;
    relay.wait_host_connected("h1").await;
}

#[tokio::test]
async fn tunnel_accepts_host_token_in_authorization_header() {
    let relay = TestRelay::spawn().await;
    let token = relay.host_token("h1");
    let _host = RawHost::connect_url(&relay.ws_url("/tunnel?hostId=h1"), Some(&token)).await;
    relay.wait_host_connected("h1").await;
}

#[tokio::test]
async fn host_token_with_wildcard_or_host_list_may_open_those_hosts() {
    let relay = TestRelay::spawn().await;
    let wildcard = Claims::host("*").sign(TEST_SECRET);
    let listed = Claims {
        hosts: vec!["a".to_owned(), "b".to_owned()],
        ..Claims::host("a")
    }
    .sign(TEST_SECRET);

    let _any = RawHost::connect_url(&relay.tunnel_url("anything-1", &wildcard), None).await;
    let _b = RawHost::connect_url(&relay.tunnel_url("b", &listed), None).await;

    relay.wait_host_connected("anything-1").await;
    relay.wait_host_connected("b").await;
}

// ---- HTTP ----

/// `GET /hosts/web-1/echo` with an optional raw Authorization header value.
async fn get_with_authorization(stack: &Stack, authorization: Option<&str>) -> HttpResponse {
    let mut request = stack.relay.http().get(stack.url("/echo"));
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    request.send().await
}

#[track_caller]
fn assert_error(resp: &HttpResponse, status: u16, case: &str) {
    assert_eq!(resp.status, status, "{case}: body {:?}", resp.text());
    assert!(!resp.error().is_empty(), "{case}: error message is empty");
}

#[tokio::test]
async fn http_without_or_with_invalid_token_returns_401() {
    let stack = Stack::spawn("web-1").await;
    let wrong_secret = Claims::client(&["web-1"]).sign("not-the-relay-secret");
    let expired = Claims::client(&["web-1"]).expired().sign(TEST_SECRET);

    let cases = [
        ("no token", None),
        ("wrong secret", Some(format!("Bearer {wrong_secret}"))),
        ("expired", Some(format!("Bearer {expired}"))),
        ("garbage bearer", Some("Bearer not-a-jwt".to_owned())),
        ("empty bearer", Some("Bearer ".to_owned())),
        ("basic auth", Some("Basic d2ViOnNlY3JldA==".to_owned())),
    ];
    for (case, authorization) in &cases {
        let resp = get_with_authorization(&stack, authorization.as_deref()).await;
        assert_error(&resp, 401, case);
    }

    let resp = stack
        .relay
        .http()
        .get(stack.url(&format!("/echo?token={wrong_secret}")))
        .send()
        .await;
    assert_error(&resp, 401, "wrong secret in query");
    assert_eq!(
        stack.upstream.requests(),
        0,
        "no refused request reaches upstream"
    );
}

#[tokio::test]
async fn http_with_a_token_not_valid_yet_returns_401_and_reaches_nothing() {
    let stack = Stack::spawn("web-1").await;
    let early = Claims::client(&["web-1"]).not_yet_valid().sign(TEST_SECRET);
    let resp = get_with_authorization(&stack, Some(&format!("Bearer {early}"))).await;
    assert_error(&resp, 401, "nbf in an hour");
    assert_eq!(stack.upstream.requests(), 0);
    // The same claims without nbf pass: only nbf made the difference.
    let now = Claims::client(&["web-1"]).sign(TEST_SECRET);
    get_with_authorization(&stack, Some(&format!("Bearer {now}")))
        .await
        .assert_status(200);
}

#[tokio::test]
async fn http_with_wrong_role_or_other_host_returns_403() {
    let stack = Stack::spawn("web-1").await;
    let host_role = Claims::host("web-1").sign(TEST_SECRET);
    let other_host = Claims::client(&["web-2", "web-10"]).sign(TEST_SECRET);

    let resp = get_with_authorization(&stack, Some(&format!("Bearer {host_role}"))).await;
    assert_error(&resp, 403, "host role");
    let resp = get_with_authorization(&stack, Some(&format!("Bearer {other_host}"))).await;
    assert_error(&resp, 403, "other host");
    let resp = stack
        .relay
        .http()
        .get(stack.url(&format!("/echo?token={other_host}")))
        .send()
        .await;
    assert_error(&resp, 403, "other host in query");
    assert_eq!(
        stack.upstream.requests(),
        0,
        "no refused request reaches upstream"
    );
}

#[tokio::test]
async fn http_accepts_client_token_in_header_or_query_and_wildcard_hosts() {
    let stack = Stack::spawn("web-1").await;
    let exact = stack.client_token();
    let wildcard = Claims::client(&["*"]).sign(TEST_SECRET);
    let listed = Claims::client(&["web-0", "web-1"]).sign(TEST_SECRET);

    for (case, token) in [
        ("exact", &exact),
        ("wildcard", &wildcard),
        ("list", &listed),
    ] {
        let resp = get_with_authorization(&stack, Some(&format!("Bearer {token}"))).await;
        assert_eq!(resp.status, 200, "{case} in header: {:?}", resp.text());
    }
    let resp = stack
        .relay
        .http()
        .get(stack.url(&format!("/echo?token={exact}")))
        .send()
        .await;
    resp.assert_status(200);
    assert_eq!(stack.upstream.requests(), 4);
}

#[tokio::test]
async fn unauthenticated_request_gets_401_even_when_host_is_offline() {
    let relay = TestRelay::spawn().await;

    let resp = relay
        .http()
        .get(relay.http_url("/hosts/offline/x"))
        .send()
        .await;

    assert_error(&resp, 401, "no token, host offline");
}

#[tokio::test]
async fn whoowns_requires_a_client_token_for_that_host() {
    let stack = Stack::spawn("web-1").await;
    let other_host = Claims::client(&["web-2"]).sign(TEST_SECRET);
    let host_role = Claims::host("web-1").sign(TEST_SECRET);
    let expired = Claims::client(&["web-1"]).expired().sign(TEST_SECRET);

    let no_token = stack.relay.http().get(stack.url("/_whoowns")).send().await;
    assert_error(&no_token, 401, "_whoowns without token");
    let expired = stack.relay.whoowns_with("web-1", &expired).await;
    assert_error(&expired, 401, "_whoowns with expired token");
    let other = stack.relay.whoowns_with("web-1", &other_host).await;
    assert_error(&other, 403, "_whoowns for another host");
    let role = stack.relay.whoowns_with("web-1", &host_role).await;
    assert_error(&role, 403, "_whoowns with host role");

    let ok = stack
        .relay
        .http()
        .get(stack.url(&format!("/_whoowns?token={}", stack.client_token())))
        .send()
        .await;
    ok.assert_status(200);
    assert_eq!(ok.json()["ok"], json!(true));
}

#[tokio::test]
async fn client_websocket_with_bad_token_never_reaches_host() {
    let relay = TestRelay::spawn().await;
    let mut host = RawHost::connect(&relay, "raw-1").await;
    let bad_tokens = [
        (
            "wrong secret",
            Claims::client(&["raw-1"]).sign("not-the-relay-secret"),
        ),
        (
            "expired",
            Claims::client(&["raw-1"]).expired().sign(TEST_SECRET),
        ),
        ("host role", Claims::host("raw-1").sign(TEST_SECRET)),
        ("other host", Claims::client(&["raw-2"]).sign(TEST_SECRET)),
    ];

    for (case, token) in &bad_tokens {
        let url = relay.ws_url(&format!("/hosts/raw-1/refused/{}", case.replace(' ', "-")));
        match WsClient::connect(&url, Some(token)).await {
            Err(err) => {
                let status = rejection_status(&err);
                assert!(
                    matches!(status, Some(401 | 403)),
                    "{case}: upgrade refused with {status:?} ({err}); expected 401 or 403"
                );
            }
            Ok(mut ws) => match ws.recv(DEADLINE).await {
                Err(WsEnd::Close(code)) => assert_eq!(code, 1008, "{case}"),
                other => panic!("{case}: unauthorized channel got {other:?}"),
            },
        }
    }

    // Had any refused attempt reached the host, its ws:open would come first.
    let token = relay.client_token(&["raw-1"]);
    let _ok = WsClient::connect_ok(&relay.ws_url("/hosts/raw-1/allowed"), Some(&token)).await;
    let open = host.expect("ws:open").await;
    assert_eq!(open["path"], "/allowed");
}

// ---- documented in docs/protocol.md beyond the v1 contract ----

#[tokio::test]
async fn http_401_carries_www_authenticate_bearer() {
    let stack = Stack::spawn("web-1").await;

    let resp = get_with_authorization(&stack, None).await;

    resp.assert_status(401);
    let challenge = resp.header("www-authenticate").unwrap_or_default();
    assert!(
        challenge.starts_with("Bearer"),
        "401 carries `WWW-Authenticate: Bearer`, got {challenge:?}"
    );
}

#[tokio::test]
async fn authorization_header_wins_over_token_query_param() {
    let stack = Stack::spawn("web-1").await;
    let good = stack.client_token();
    let bad = Claims::client(&["web-1"]).sign("not-the-relay-secret");

    let header_good = stack
        .relay
        .http()
        .get(stack.url(&format!("/echo?token={bad}&k=v")))
        .bearer(&good)
        .send()
        .await;
    header_good.assert_status(200);
    assert_eq!(
        header_good.json()["query"],
        "k=v",
        "the token param is still removed"
    );

    let header_bad = stack
        .relay
        .http()
        .get(stack.url(&format!("/echo?token={good}")))
        .bearer(&bad)
        .send()
        .await;
    assert_error(&header_bad, 401, "bad header, good query");

    let tunnel_token = Claims::host("h2").sign(TEST_SECRET);
    let url = stack.relay.ws_url("/tunnel?hostId=h2&token=not-a-jwt");
    let _host = RawHost::connect_url(&url, Some(&tunnel_token)).await;
    stack.relay.wait_host_connected("h2").await;
}
