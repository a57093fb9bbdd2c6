//! Superset's tunnel "v2" (dial-back), end to end: a test host written from superset's
//! wire contract ([`V2Host`], or the control channel and dials driven by hand), real
//! relays, real sockets. Control channel, pings, close codes, `ws` and `http` dials,
//! tickets (once, only while waited for, only for their host), presence, tRPC-shaped
//! errors, v1 and v2 hosts side by side.

use relay_tests::v2_host::{V2Control, V2Host, dial_raw};
use relay_tests::{
    DEADLINE, TestHost, TestRelay, Upstream, WsClient, rejection_status, wait_until, within,
};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const HOST: &str = "org1:m1";

/// `http://127.0.0.1:<port>` of a relay, as superset's host client is given it.
fn base(relay: &TestRelay) -> String {
    relay.http_url("")
}

/// A v2 host for `host_id` on `relay`, forwarding to `upstream`, registered.
async fn v2_host(relay: &TestRelay, host_id: &str, upstream: &Upstream) -> V2Host {
    let host = V2Host::builder(host_id, &relay.host_token(host_id), upstream.addr())
        .relay(&base(relay))
        .spawn();
    host.wait_connected(DEADLINE).await;
    relay.wait_host_connected(host_id).await;
    host
}

/// `GET /hosts/HOST{path}` on `relay` with `token`, in the background: the answer comes
/// once the test, playing the host, has answered the dial.
fn spawn_get(
    relay: &TestRelay,
    path: &str,
    token: &str,
) -> tokio::task::JoinHandle<relay_tests::HttpResponse> {
    let http = relay.http().clone();
    let url = relay.http_url(&format!("/hosts/{HOST}{path}"));
    let token = token.to_owned();
    tokio::spawn(async move { http.get(url).bearer(&token).send().await })
}

#[tokio::test]
async fn health_says_proto_2_so_supersets_host_client_picks_v2() {
    let relay = TestRelay::spawn().await;
    let health = relay.http().get(relay.http_url("/health")).send().await;
    assert_eq!(health.status, 200);
    let health = health.json();
    assert_eq!(health["proto"], 2, "{health}");
    assert_eq!(health["ok"], true, "existing fields stay: {health}");
    assert!(health["region"].is_string(), "{health}");
}

#[tokio::test]
async fn http_over_dials_carries_method_path_headers_and_bodies_in_256_kib_chunks() {
    let relay = TestRelay::spawn().await;
    let upstream = Upstream::spawn().await;
    let host = v2_host(&relay, HOST, &upstream).await;
    // 600 KiB: three chunks each way.
    let body = "x".repeat(600 * 1024);
    let response = relay
        .http()
        .request(
            http::Method::POST,
            relay.http_url(&format!("/hosts/{HOST}/echo/a%20b?q=1&token=secret")),
        )
        .bearer(&relay.client_token(&[HOST]))
        .header("x-custom", "one")
        .header("content-type", "text/plain")
        .body(body.clone())
        .send()
        .await;
    assert_eq!(response.status, 200, "{}", response.text().len());
    assert_eq!(response.header("x-upstream"), Some("echo"));
    let echo = response.json();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/echo/a%20b");
    assert_eq!(echo["query"], "q=1", "the relay's token is not forwarded");
    assert_eq!(echo["headers"]["x-custom"], "one");
    assert_eq!(
        echo["headers"]["authorization"], "Bearer v2-host-secret",
        "the host's own secret, never the client's token"
    );
    assert_eq!(echo["body"].as_str().map(str::len), Some(body.len()));
    assert_eq!(host.dials("http"), 1);
    wait_until(
        "the relay closes the dial 1000 after http:end",
        DEADLINE,
        || host.dial_close_codes() == vec![1000],
    )
    .await;

    // The upstream's status and an empty body come through too.
    let response = relay
        .http()
        .get(relay.http_url(&format!("/hosts/{HOST}/echo")))
        .bearer(&relay.client_token(&[HOST]))
        .header("x-status", "404")
        .send()
        .await;
    assert_eq!(response.status, 404);
}

#[tokio::test]
async fn websockets_over_dials_keep_frame_types_and_close_codes() {
    let relay = TestRelay::spawn().await;
    let upstream = Upstream::spawn().await;
    let host = v2_host(&relay, HOST, &upstream).await;
    let token = relay.client_token(&[HOST]);
    let mut ws = WsClient::connect_ok(
        &relay.ws_url(&format!("/hosts/{HOST}/ws/echo?room=7")),
        Some(&token),
    )
    .await;
    ws.send_text("hello").await;
    assert_eq!(ws.recv_data().await, Message::Text("hello".into()));
    ws.send_binary(&[0, 1, 2, 255]).await;
    assert_eq!(
        ws.recv_data().await,
        Message::Binary(vec![0u8, 1, 2, 255].into())
    );
    let dial = host.last_dial().expect("a stream:dial");
    assert_eq!(dial["kind"], "ws");
    assert_eq!(dial["path"], "/ws/echo");
    assert_eq!(dial["query"], "room=7", "without the relay's token: {dial}");

    // The client's close code reaches the local service through the dial.
    ws.close(4321).await;
    wait_until("the upstream sees the client's 4321", DEADLINE, || {
        upstream.ws_close_codes().contains(&4321)
    })
    .await;

    // And the service's reaches the client.
    let mut ws = WsClient::connect_ok(
        &relay.ws_url(&format!("/hosts/{HOST}/ws/echo")),
        Some(&token),
    )
    .await;
    ws.send_text("close:4100").await;
    assert_eq!(ws.recv_close_code(DEADLINE).await, 4100);
}

#[tokio::test]
async fn the_control_channel_answers_pings_and_closes_a_silent_host_4408() {
    // Stale after ping interval × missed pongs: 2 × 500 ms.
    let relay = TestRelay::builder()
        .ping_interval("500ms")
        .max_missed_pongs(2)
        .spawn()
        .await;
    let mut control = V2Control::connect(&base(&relay), HOST, &relay.host_token(HOST))
        .await
        .expect("control opens");
    control.ping().await;
    let pong = control.recv_json(DEADLINE).await.expect("a pong");
    assert_eq!(pong, json!({"type": "pong"}));
    relay.wait_host_connected(HOST).await;
    // Now silent.
    let code = control.ws_mut().recv_close_code(DEADLINE).await;
    assert_eq!(code, 4408);
    relay.wait_host_disconnected(HOST).await;
}

#[tokio::test]
async fn refused_control_channels_close_with_supersets_codes_and_say_why() {
    let relay = TestRelay::spawn().await;
    let url = |query: &str| relay.ws_url(&format!("/v2/control?{query}"));
    let cases = [
        (
            url(&format!("token={}", relay.host_token(HOST))),
            4400,
            "missing hostId",
        ),
        (url("hostId=a%2Fb&token=x"), 4400, "hostId"),
        (url(&format!("hostId={HOST}&token=garbage")), 4401, "token"),
        (url(&format!("hostId={HOST}")), 4401, "missing"),
        (
            url(&format!(
                "hostId={HOST}&token={}",
                relay.host_token("org1:other")
            )),
            4403,
            "org1:m1",
        ),
        (
            url(&format!(
                "hostId={HOST}&token={}",
                relay.client_token(&[HOST])
            )),
            4403,
            "role",
        ),
    ];
    for (url, code, why) in cases {
        let mut ws = WsClient::connect(&url, None)
            .await
            .expect("a refusal still completes the upgrade");
        let (got, reason) = ws.recv_close(DEADLINE).await;
        assert_eq!(got, code, "{}", relay_tests::ws::redact_url(&url));
        assert!(
            reason.contains(why),
            "reason {reason:?} should mention {why:?}"
        );
        assert!(reason.len() <= 123);
    }
    // Not an upgrade at all.
    let plain = relay
        .http()
        .get(relay.http_url("/v2/control?hostId=h"))
        .send()
        .await;
    assert_eq!(plain.status, 426);
}

/// Plays the host by hand: waits for the client's request's `stream:dial`, dials back
/// and answers it; returns the ticket.
async fn answer_http_dial(relay_base: &str, control: &mut V2Control, status: u16) -> String {
    let dial = control.expect_dial(DEADLINE).await;
    assert_eq!(dial["kind"], "http", "{dial}");
    let ticket = dial["ticket"].as_str().expect("a ticket").to_owned();
    let mut ws = dial_raw(relay_base, HOST, &ticket)
        .await
        .expect("the dial opens");
    let head: Value = serde_json::from_str(&ws.recv_text().await).unwrap();
    assert_eq!(head["type"], "http:request");
    assert_eq!(ws.recv_text().await, r#"{"type":"http:end"}"#);
    ws.send_text(
        &json!({"type":"http:response","status":status,"headers":{"x-by":"hand"}}).to_string(),
    )
    .await;
    ws.send_binary(b"hand").await;
    ws.send_text(r#"{"type":"http:end"}"#).await;
    assert_eq!(ws.recv_close_code(DEADLINE).await, 1000);
    ticket
}

#[tokio::test]
async fn a_ticket_is_good_once_only_for_its_host_and_only_while_its_stream_waits() {
    let relay = TestRelay::spawn().await;
    let mut control = V2Control::connect(&base(&relay), HOST, &relay.host_token(HOST))
        .await
        .expect("control opens");
    relay.wait_host_connected(HOST).await;
    let token = relay.client_token(&[HOST]);
    let client = spawn_get(&relay, "/anything", &token);
    let dial = control.expect_dial(DEADLINE).await;
    let ticket = dial["ticket"].as_str().unwrap().to_owned();
    // Presented for another host: refused, and the ticket still good for its own.
    let mut wrong = dial_raw(&base(&relay), "org1:m2", &ticket).await.unwrap();
    assert_eq!(wrong.recv_close_code(DEADLINE).await, 4404);
    let mut ws = dial_raw(&base(&relay), HOST, &ticket).await.unwrap();
    let _head = ws.recv_text().await;
    let _end = ws.recv_text().await;
    ws.send_text(r#"{"type":"http:response","status":201,"headers":{}}"#)
        .await;
    ws.send_text(r#"{"type":"http:end"}"#).await;
    let response = within("the client's answer", DEADLINE, client)
        .await
        .unwrap();
    assert_eq!(response.status, 201);
    // Used: a second dial with it is refused.
    let mut again = dial_raw(&base(&relay), HOST, &ticket).await.unwrap();
    let (code, reason) = again.recv_close(DEADLINE).await;
    assert_eq!((code, reason.as_str()), (4404, "Unknown or expired ticket"));
    // Made up, or missing.
    let mut forged = dial_raw(&base(&relay), HOST, &format!("{}.local:x", "a".repeat(32)))
        .await
        .unwrap();
    assert_eq!(forged.recv_close_code(DEADLINE).await, 4404);
    let mut missing = WsClient::connect(&relay.ws_url(&format!("/v2/dial?hostId={HOST}")), None)
        .await
        .unwrap();
    assert_eq!(missing.recv_close_code(DEADLINE).await, 4400);

    // By hand, with the helper, once more: the tunnel still serves.
    let client = spawn_get(&relay, "/again", &token);
    answer_http_dial(&base(&relay), &mut control, 200).await;
    let response = within("the client's answer", DEADLINE, client)
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.text(), "hand");
    assert_eq!(response.header("x-by"), Some("hand"));
}

#[tokio::test]
async fn a_host_that_does_not_dial_back_fails_the_stream_504_and_the_ticket_expires() {
    let relay = TestRelay::builder()
        .arg("--dial-timeout", "1s")
        .spawn()
        .await;
    let upstream = Upstream::spawn().await;
    let host = v2_host(&relay, HOST, &upstream).await;
    host.set_dialing(false);
    let token = relay.client_token(&[HOST]);
    let response = relay
        .http()
        .get(relay.http_url(&format!("/hosts/{HOST}/echo")))
        .bearer(&token)
        .send()
        .await;
    assert_eq!(response.status, 504, "{}", response.text());
    // The client's WebSocket is refused before its 101: the answer is deferred until
    // the host dials.
    let Err(err) = WsClient::connect(
        &relay.ws_url(&format!("/hosts/{HOST}/ws/echo")),
        Some(&token),
    )
    .await
    else {
        panic!("no 101 without a dial")
    };
    assert_eq!(rejection_status(&err), Some(504));
    // A dial that comes too late finds its ticket gone.
    let ticket = host.last_ticket().expect("the host was sent tickets");
    let mut late = dial_raw(&base(&relay), HOST, &ticket).await.unwrap();
    assert_eq!(late.recv_close_code(DEADLINE).await, 4404);
}

#[tokio::test]
async fn a_newer_control_channel_replaces_the_old_one_with_4409() {
    let relay = TestRelay::spawn().await;
    let mut old = V2Control::connect(&base(&relay), HOST, &relay.host_token(HOST))
        .await
        .unwrap();
    relay.wait_host_connected(HOST).await;
    let upstream = Upstream::spawn().await;
    let new = V2Host::builder(HOST, &relay.host_token(HOST), upstream.addr())
        .relay(&base(&relay))
        .spawn();
    let (code, reason) = old.ws_mut().recv_close(DEADLINE).await;
    assert_eq!(code, 4409);
    assert!(reason.contains("Replaced"), "{reason}");
    new.wait_connected(DEADLINE).await;
    let response = relay
        .http()
        .get(relay.http_url(&format!("/hosts/{HOST}/echo")))
        .bearer(&relay.client_token(&[HOST]))
        .send()
        .await;
    assert_eq!(response.status, 200, "the new control serves");
}

#[tokio::test]
async fn streams_end_with_4410_when_their_control_channel_dies() {
    let relay = TestRelay::spawn().await;
    let mut control = V2Control::connect(&base(&relay), HOST, &relay.host_token(HOST))
        .await
        .unwrap();
    relay.wait_host_connected(HOST).await;
    let token = relay.client_token(&[HOST]);
    let client = {
        let url = relay.ws_url(&format!("/hosts/{HOST}/ws/echo"));
        tokio::spawn(async move { WsClient::connect_ok(&url, Some(&token)).await })
    };
    let dial = control.expect_dial(DEADLINE).await;
    let mut dial_ws = dial_raw(&base(&relay), HOST, dial["ticket"].as_str().unwrap())
        .await
        .unwrap();
    let mut client = within("the client's 101 once the host dialed", DEADLINE, client)
        .await
        .unwrap();
    client.send_text("through").await;
    assert_eq!(dial_ws.recv_text().await, "through");
    dial_ws.send_binary(b"back").await;
    assert_eq!(
        client.recv_data().await,
        Message::Binary(b"back".to_vec().into())
    );

    // The control channel goes without a Close (the host's process died).
    drop(control);
    assert_eq!(client.recv_close_code(DEADLINE).await, 4410);
    assert_eq!(dial_ws.recv_close_code(DEADLINE).await, 4410);
}

#[tokio::test]
async fn v1_and_v2_hosts_serve_side_by_side_on_one_relay() {
    let relay = TestRelay::spawn().await;
    let upstream = Upstream::spawn().await;
    let _v1 = TestHost::connect(&relay, "web-1", &upstream).await;
    let _v2 = v2_host(&relay, HOST, &upstream).await;
    let token = relay.client_token(&["web-1", HOST]);
    for host in ["web-1", HOST] {
        let response = relay
            .http()
            .get(relay.http_url(&format!("/hosts/{host}/echo/{host}")))
            .bearer(&token)
            .send()
            .await;
        assert_eq!(response.status, 200, "{host}");
        assert_eq!(response.json()["path"], format!("/echo/{host}"));
        let mut ws = WsClient::connect_ok(
            &relay.ws_url(&format!("/hosts/{host}/ws/echo")),
            Some(&token),
        )
        .await;
        ws.send_text(host).await;
        assert_eq!(ws.recv_data().await, Message::Text(host.into()));
    }
    let metrics = relay.metrics().await;
    assert!(
        metrics.contains(r#"protocol="v2""#) && metrics.contains(r#"protocol="v1""#),
        "both protocols are labelled in the metrics"
    );
}

#[tokio::test]
async fn presence_reports_the_hosts_a_caller_may_reach_and_leaves_out_the_others() {
    let relay = TestRelay::spawn().await;
    let upstream = Upstream::spawn().await;
    let host = v2_host(&relay, HOST, &upstream).await;
    let other = v2_host(&relay, "org1:m3", &upstream).await;
    drop(other);
    relay.wait_host_disconnected("org1:m3").await;
    let token = relay.client_token(&[HOST, "org1:m3", "org1:never"]);
    let presence = |query: &str, token: Option<&str>| {
        let mut request = relay
            .http()
            .get(relay.http_url(&format!("/presence?{query}")));
        if let Some(token) = token {
            request = request.bearer(token);
        }
        request.send()
    };
    let answer = presence(
        "hostIds=org1:m1,org1:m3,org1:never,org2:hidden,bad/id",
        Some(&token),
    )
    .await;
    assert_eq!(answer.status, 200);
    let hosts = &answer.json()["hosts"];
    assert_eq!(hosts[HOST]["online"], true, "{hosts}");
    assert!(hosts[HOST]["lastSeenAt"].is_u64(), "{hosts}");
    assert_eq!(hosts["org1:m3"]["online"], false, "{hosts}");
    assert!(
        hosts["org1:m3"]["lastSeenAt"].is_u64(),
        "still known once gone: {hosts}"
    );
    assert_eq!(
        hosts["org1:never"],
        json!({"online": false, "lastSeenAt": null})
    );
    assert!(
        hosts.get("org2:hidden").is_none(),
        "not the caller's: {hosts}"
    );
    assert_eq!(hosts.as_object().unwrap().len(), 3, "{hosts}");

    let many = (0..51)
        .map(|i| format!("h{i}"))
        .collect::<Vec<_>>()
        .join(",");
    assert_eq!(
        presence(&format!("hostIds={many}"), Some(&token))
            .await
            .status,
        400
    );
    assert_eq!(presence("hostIds=", Some(&token)).await.status, 400);
    assert_eq!(presence("hostIds=org1:m1", None).await.status, 401);
    assert_eq!(
        presence("hostIds=org1:m1", Some("garbage")).await.status,
        401
    );
    drop(host);
}

#[tokio::test]
async fn errors_on_trpc_paths_come_in_trpcs_shape() {
    let relay = TestRelay::spawn().await;
    let token = relay.client_token(&[HOST]);
    let response = relay
        .http()
        .get(relay.http_url(&format!("/hosts/{HOST}/trpc/host.info")))
        .bearer(&token)
        .send()
        .await;
    assert_eq!(response.status, 503);
    let error = &response.json()["error"]["json"];
    assert_eq!(error["code"], -32603, "{error}");
    assert_eq!(error["data"]["code"], "SERVICE_UNAVAILABLE");
    assert_eq!(error["data"]["httpStatus"], 503);
    assert!(error["message"].as_str().unwrap().contains("not connected"));

    let response = relay
        .http()
        .get(relay.http_url(&format!("/hosts/{HOST}/trpc/host.info")))
        .bearer("garbage")
        .send()
        .await;
    assert_eq!(response.status, 401);
    let error = &response.json()["error"]["json"];
    assert_eq!(error["code"], -32001, "{error}");
    assert_eq!(error["data"]["code"], "UNAUTHORIZED");

    // Elsewhere, the relay's own shape.
    let response = relay
        .http()
        .get(relay.http_url(&format!("/hosts/{HOST}/other")))
        .bearer(&token)
        .send()
        .await;
    assert_eq!(response.status, 503);
    assert!(response.json()["error"].is_string());
}

#[tokio::test]
async fn a_v2_hosts_control_traffic_goes_without_a_leak_of_its_token() {
    let relay = TestRelay::spawn().await;
    let upstream = Upstream::spawn().await;
    let token = relay.host_token(HOST);
    let host = v2_host(&relay, HOST, &upstream).await;
    let response = relay
        .http()
        .get(relay.http_url(&format!("/hosts/{HOST}/echo")))
        .bearer(&relay.client_token(&[HOST]))
        .send()
        .await;
    assert_eq!(response.status, 200);
    drop(host);
    relay.wait_host_disconnected(HOST).await;
    let logs = relay.logs().join("\n");
    assert!(
        !logs.contains(&token),
        "the control channel's token is never logged"
    );
    let ticket_secret_logged = logs
        .split(|c: char| !c.is_ascii_hexdigit())
        .any(|word| word.len() == 32);
    assert!(
        !ticket_secret_logged,
        "dial tickets are credentials: never logged"
    );
}

#[tokio::test]
async fn a_request_body_reaches_the_host_in_chunks_of_at_most_256_kib() {
    let relay = TestRelay::spawn().await;
    let mut control = V2Control::connect(&base(&relay), HOST, &relay.host_token(HOST))
        .await
        .unwrap();
    relay.wait_host_connected(HOST).await;
    let client = {
        let http = relay.http().clone();
        let url = relay.http_url(&format!("/hosts/{HOST}/upload"));
        let token = relay.client_token(&[HOST]);
        tokio::spawn(async move {
            http.request(http::Method::PUT, url)
                .bearer(&token)
                .body(vec![7u8; 600 * 1024])
                .send()
                .await
        })
    };
    let dial = control.expect_dial(DEADLINE).await;
    let mut ws = dial_raw(&base(&relay), HOST, dial["ticket"].as_str().unwrap())
        .await
        .unwrap();
    let head: Value = serde_json::from_str(&ws.recv_text().await).unwrap();
    assert_eq!(
        (head["method"].as_str(), head["path"].as_str()),
        (Some("PUT"), Some("/upload"))
    );
    let mut chunks = Vec::new();
    loop {
        match ws.recv_data().await {
            Message::Binary(bytes) => chunks.push(bytes.len()),
            Message::Text(text) => {
                assert_eq!(text.as_str(), r#"{"type":"http:end"}"#);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(chunks.iter().all(|&n| n <= 256 * 1024), "{chunks:?}");
    assert_eq!(chunks.iter().sum::<usize>(), 600 * 1024);
    ws.send_text(r#"{"type":"http:response","status":204,"headers":{}}"#)
        .await;
    ws.send_text(r#"{"type":"http:end"}"#).await;
    let response = within("the client's answer", DEADLINE, client)
        .await
        .unwrap();
    assert_eq!(response.status, 204);
}

#[tokio::test]
async fn a_dial_landing_on_another_relay_reaches_the_one_that_issued_its_ticket() {
    let redis = relay_tests::TestRedis::spawn().await;
    let relay_on = |machine: &str| {
        TestRelay::builder()
            .machine_id(machine)
            .redis(&redis.url())
            .routing("proxy")
            .spawn()
    };
    let (a, b) = (relay_on("relay-a").await, relay_on("relay-b").await);
    redis.wait_advertised(&a).await;
    redis.wait_advertised(&b).await;
    let mut control = V2Control::connect(&base(&a), HOST, &a.host_token(HOST))
        .await
        .unwrap();
    redis.wait_host_owner(HOST, &a).await;
    let token = a.client_token(&[HOST]);

    // HTTP asked of b (proxied to a, which holds the control), dialed back to b.
    let client = spawn_get(&b, "/x", &token);
    answer_http_dial(&base(&b), &mut control, 200).await;
    let response = within("the client's answer", DEADLINE, client)
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.text(), "hand");

    // A WebSocket asked of b, dialed back to b too: both legs bridged to a.
    let client = {
        let url = b.ws_url(&format!("/hosts/{HOST}/ws"));
        let token = token.clone();
        tokio::spawn(async move { WsClient::connect_ok(&url, Some(&token)).await })
    };
    let dial = control.expect_dial(DEADLINE).await;
    let ticket = dial["ticket"].as_str().unwrap().to_owned();
    assert!(
        ticket.ends_with(&a.owner()),
        "the ticket names its issuer: {ticket}"
    );
    let mut dial_ws = dial_raw(&base(&b), HOST, &ticket).await.unwrap();
    let mut client = within("the client's 101", DEADLINE, client).await.unwrap();
    client.send_binary(b"over two relays").await;
    assert_eq!(
        dial_ws.recv_data().await,
        Message::Binary(b"over two relays".to_vec().into())
    );
    dial_ws.send_text("and back").await;
    assert_eq!(client.recv_data().await, Message::Text("and back".into()));
    client.close(4000).await;
    assert_eq!(dial_ws.recv_close_code(DEADLINE).await, 4000);
    assert_eq!(
        b.counter("relay_v2_dials_total", &[("outcome", "forwarded")])
            .await,
        2.0
    );
}

/// One `GET path` on a new connection to `addr` (as a load balancer's client would make
/// it; no keep-alive race); the status and body, or what went wrong.
async fn get_fresh(
    addr: std::net::SocketAddr,
    path: &str,
    token: &str,
) -> Result<(u16, String), String> {
    use http_body_util::{BodyExt, Empty};
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|err| format!("connect: {err}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|err| format!("handshake: {err}"))?;
        let driver = tokio::spawn(conn);
        let request = http::Request::get(path)
            .header(http::header::HOST, addr.to_string())
            .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Empty::<bytes::Bytes>::new())
            .expect("a valid request");
        let response = sender
            .send_request(request)
            .await
            .map_err(|err| format!("request: {err}"))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|err| format!("status {status}, body: {err}"))?
            .to_bytes();
        driver.abort();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(DEADLINE, exchange)
        .await
        .unwrap_or_else(|_| Err("no answer in time".to_owned()))
}

#[tokio::test]
async fn a_request_for_a_host_whose_relay_let_it_go_is_held_until_it_registers_again() {
    // A v1 host that ignores the drain message: the relay closes it (4001) at the end of
    // its drain, and it comes back on another relay a moment later.
    let redis = relay_tests::TestRedis::spawn().await;
    let relay_on = |machine: &str| {
        TestRelay::builder()
            .machine_id(machine)
            .redis(&redis.url())
            .routing("proxy")
            .rust_log("info,relay::routing=debug")
            .spawn()
    };
    let (mut a, b) = (relay_on("relay-a").await, relay_on("relay-b").await);
    redis.wait_advertised(&b).await;
    let upstream = Upstream::spawn().await;
    let old = TestHost::connect(&a, "web-1", &upstream).await;
    redis.wait_host_owner("web-1", &a).await;
    a.send_sigterm();
    assert_eq!(a.wait_exit(DEADLINE).await.code(), Some(0));
    old.wait_ended(DEADLINE).await;
    let token = b.client_token(&["web-1"]);
    let request = {
        let addr = b.addr();
        let token = token.clone();
        tokio::spawn(async move { get_fresh(addr, "/hosts/web-1/echo/held", &token).await })
    };
    b.wait_for_log("holding the request", DEADLINE).await;
    let _new = TestHost::connect(&b, "web-1", &upstream).await;
    let (status, body) = within("the held request's answer", DEADLINE, request)
        .await
        .unwrap()
        .expect("an answer");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        b.counter("relay_held_requests_total", &[("outcome", "found")])
            .await,
        1.0
    );
    // A host that was never let go is answered at once, as before.
    let (status, _) = get_fresh(b.addr(), "/hosts/web-2/echo", &b.client_token(&["web-2"]))
        .await
        .expect("an answer");
    assert_eq!(status, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_fails_no_request_to_v2_hosts_and_lets_their_streams_finish() {
    const HOSTS: usize = 3;
    let redis = relay_tests::TestRedis::spawn().await;
    let builder = |machine: &str, port: u16| {
        TestRelay::builder()
            .machine_id(machine)
            .redis(&redis.url())
            .routing("proxy")
            .port(port)
    };
    let mut relays = vec![
        builder("relay-a", 0).spawn().await,
        builder("relay-b", 0).spawn().await,
    ];
    for relay in &relays {
        redis.wait_advertised(relay).await;
    }
    let addrs: Vec<_> = relays.iter().map(TestRelay::addr).collect();
    let front = std::sync::Arc::new(relay_tests::FrontDoor::spawn(&addrs).await);
    let front_base = format!("http://{}", front.addr());
    let upstream = Upstream::spawn().await;
    let ids: Vec<String> = (0..HOSTS).map(|i| format!("org1:m{i}")).collect();
    // Superset's client: the public URL, reconnecting 1 s after a close.
    let hosts: Vec<V2Host> = ids
        .iter()
        .map(|id| {
            V2Host::builder(id, &relays[0].host_token(id), upstream.addr())
                .relay(&front_base)
                .reconnect_delay(std::time::Duration::from_secs(1))
                .spawn()
        })
        .collect();
    let token = relays[0].client_token(&["*"]);
    for id in &ids {
        let path = format!("/hosts/{id}/echo/warm-up");
        relay_tests::wait_until_async(&format!("{id} answers"), DEADLINE, || async {
            matches!(get_fresh(front.addr(), &path, &token).await, Ok((200, _)))
        })
        .await;
    }

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let failures = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let load: Vec<_> = ids
        .iter()
        .map(|id| {
            let (front, token, id) = (front.clone(), token.clone(), id.clone());
            let (stop, failures, served) = (stop.clone(), failures.clone(), served.clone());
            tokio::spawn(async move {
                let mut seq = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    seq += 1;
                    let path = format!("/hosts/{id}/echo/{seq}");
                    match get_fresh(front.addr(), &path, &token).await {
                        Ok((200, _)) => {
                            served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        other => failures.lock().unwrap().push(format!("{path}: {other:?}")),
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            })
        })
        .collect();

    for (i, machine) in ["relay-a", "relay-b"].into_iter().enumerate() {
        // A channel to a host whose control channel is on the relay about to drain: its
        // dial runs on during the drain.
        let mut holder = None;
        for id in &ids {
            if redis.get(&relay_tests::host_key(id)).await.as_deref()
                == Some(relays[i].owner().as_str())
            {
                holder = Some(id.clone());
            }
        }
        let holder = holder.unwrap_or_else(|| panic!("no host is on {machine}"));
        let mut channel = WsClient::connect_ok(
            &relays[i].ws_url(&format!("/hosts/{holder}/ws/echo")),
            Some(&token),
        )
        .await;
        let before = served.load(std::sync::atomic::Ordering::Relaxed);
        let port = relays[i].addr().port();
        relays[i].send_sigterm();
        for n in 0..5 {
            let text = format!("during the drain {n}");
            channel.send_text(&text).await;
            assert_eq!(channel.recv_data().await, Message::Text(text.into()));
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert_eq!(relays[i].wait_exit(DEADLINE).await.code(), Some(0));
        relays[i] = builder(machine, port).spawn().await;
        redis.wait_advertised(&relays[i]).await;
        wait_until("requests are served again", DEADLINE, || {
            served.load(std::sync::atomic::Ordering::Relaxed) >= before + 3 * HOSTS
        })
        .await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in load {
        within("a load task to stop", DEADLINE, task).await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    let served = served.load(std::sync::atomic::Ordering::Relaxed);
    println!("served {served}, failed {}", failures.len());
    assert!(
        failures.is_empty(),
        "{} of {} requests failed during the rolling restart: {failures:#?}",
        failures.len(),
        served + failures.len()
    );
    for host in &hosts {
        assert!(
            host.control_closes().iter().any(|(code, _)| *code == 4001),
            "each host was moved by its control channel closing 4001: {:?}",
            host.control_closes()
        );
    }
}

#[tokio::test]
async fn a_host_that_breaks_the_contract_is_told_so_and_its_clients_get_502_or_504() {
    let relay = TestRelay::builder().exchange_timeout("1s").spawn().await;
    let token = relay.client_token(&[HOST]);
    let mut control = V2Control::connect(&base(&relay), HOST, &relay.host_token(HOST))
        .await
        .unwrap();
    relay.wait_host_connected(HOST).await;
    let get = |path: &str| spawn_get(&relay, path, &token);
    // Dials, reads the request, answers `reply` (if any).
    async fn dial_and(
        relay: &TestRelay,
        control: &mut V2Control,
        reply: Option<Message>,
    ) -> WsClient {
        let dial = control.expect_dial(DEADLINE).await;
        let mut ws = dial_raw(&relay.http_url(""), HOST, dial["ticket"].as_str().unwrap())
            .await
            .unwrap();
        let _head = ws.recv_text().await;
        let _end = ws.recv_text().await;
        if let Some(reply) = reply {
            ws.send(reply).await;
        }
        ws
    }

    // Silent after the request: 504 once the exchange timeout passes.
    let client = get("/silent");
    let _silent = dial_and(&relay, &mut control, None).await;
    let response = within("the answer", DEADLINE, client).await.unwrap();
    assert_eq!(response.status, 504);

    // Not JSON where the head should be: 502, and the dial closed 4400.
    let client = get("/garbage");
    let mut ws = dial_and(&relay, &mut control, Some(Message::Text("{oops".into()))).await;
    let response = within("the answer", DEADLINE, client).await.unwrap();
    assert_eq!(response.status, 502);
    assert!(
        response.error().contains("not a JSON message"),
        "{}",
        response.error()
    );
    assert_eq!(ws.recv_close_code(DEADLINE).await, 4400);

    // Body before the head, and a status out of range: 502 too.
    for reply in [
        Message::Binary(b"early".to_vec().into()),
        Message::Text(r#"{"type":"http:response","status":1000,"headers":{}}"#.into()),
    ] {
        let client = get("/bad");
        let _ws = dial_and(&relay, &mut control, Some(reply)).await;
        let response = within("the answer", DEADLINE, client).await.unwrap();
        assert_eq!(response.status, 502);
    }

    // A control channel that sends something other than JSON text is closed 4400.
    control.ws_mut().send_binary(b"\x00").await;
    let (code, reason) = control.ws_mut().recv_close(DEADLINE).await;
    assert_eq!(code, 4400);
    assert!(reason.contains("text"), "{reason}");
    let mut control = V2Control::connect(&base(&relay), HOST, &relay.host_token(HOST))
        .await
        .unwrap();
    control.ws_mut().send_text("hello?").await;
    assert_eq!(control.ws_mut().recv_close_code(DEADLINE).await, 4400);
}

#[tokio::test]
async fn v1_and_v2_registrations_of_one_host_take_it_over_from_each_other() {
    let relay = TestRelay::spawn().await;
    let upstream = Upstream::spawn().await;
    let v1 = TestHost::connect(&relay, HOST, &upstream).await;
    let mut v2 = V2Control::connect(&base(&relay), HOST, &relay.host_token(HOST))
        .await
        .unwrap();
    // The v1 tunnel is replaced as by any newer tunnel (4002); the v2 control serves.
    assert_eq!(
        v1.wait_ended(DEADLINE).await,
        relay_tests::WsEnd::Close(4002)
    );
    let client = spawn_get(&relay, "/to-v2", &relay.client_token(&[HOST]));
    answer_http_dial(&base(&relay), &mut v2, 200).await;
    assert_eq!(
        within("the answer", DEADLINE, client).await.unwrap().status,
        200
    );
    // And back: a v1 registration replaces the v2 control (4409, in its codes).
    let _v1_again = TestHost::connect(&relay, HOST, &upstream).await;
    assert_eq!(v2.ws_mut().recv_close_code(DEADLINE).await, 4409);
    let response = relay
        .http()
        .get(relay.http_url(&format!("/hosts/{HOST}/echo/v1")))
        .bearer(&relay.client_token(&[HOST]))
        .send()
        .await;
    assert_eq!(response.status, 200);
    assert_eq!(response.json()["path"], "/echo/v1");
}
