//! What peers make the relay hold is budgeted in bytes (per tunnel and for the whole
//! process), and a client's upload must keep arriving: a tenant that uploads to a host
//! that never answers, answers with more than there is room for, or trickles its bodies
//! gets 503 / 408 for its own requests while every other host is served.
//!
//! Memory each case may cost the relay: at most the budget set for it here (a few MiB),
//! plus socket buffers; the default budgets are 64 MiB per tunnel and half the machine's
//! memory in all (BENCHMARKS.md has the peak RSS of each attack at the defaults).

use std::time::Duration;

use relay_tests::{DEADLINE, HttpResponse, RawHost, TestRelay, close_code_of, msg_id, within};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MIB: usize = 1024 * 1024;

/// POSTs `body` to `/hosts/<host>/<path>` and returns the answer (without panicking on
/// a refusal).
async fn post(relay: &TestRelay, host: &str, path: &str, body: String) -> HttpResponse {
    relay
        .http()
        .request(
            http::Method::POST,
            relay.http_url(&format!("/hosts/{host}/{path}")),
        )
        .bearer(&relay.client_token(&[host]))
        .body(body)
        .timeout(DEADLINE)
        .send()
        .await
}

/// One request through `host`, answered with `body`: proves the host is served.
async fn served(relay: &TestRelay, host: &mut RawHost, host_id: &str, body: &str) -> HttpResponse {
    let request = post(relay, host_id, "ping", "hello".into());
    let answer = async {
        let msg = host.expect("http").await;
        host.respond(&msg_id(&msg), 200, json!({}), body).await;
    };
    let (response, ()) = tokio::join!(request, answer);
    response
}

#[tokio::test]
async fn uploads_to_a_host_that_stops_reading_get_503_past_its_tunnel_budget_while_other_hosts_are_served()
 {
    const UPLOADS: usize = 24;
    let relay = TestRelay::builder()
        .env("RELAY_TUNNEL_BUDGET", &(4 * MIB).to_string())
        .spawn()
        .await;
    // `stuck` reads nothing once registered: what is sent to it piles up in the relay.
    let _stuck = RawHost::connect(&relay, "stuck-1").await;
    let mut other = RawHost::connect(&relay, "other-1").await;

    // 24 MiB of uploads at once: more than the socket buffers between relay and host
    // can take, and far more than the 4 MiB the host may make the relay hold.
    let token = relay.client_token(&["stuck-1"]);
    let uploads = (0..UPLOADS).map(|i| {
        relay
            .http()
            .request(http::Method::POST, relay.http_url("/hosts/stuck-1/upload"))
            .bearer(&token)
            .body(format!("{i:x}").repeat(MIB / 2))
            .timeout(Duration::from_secs(3))
            .try_send()
    });
    let answers = futures_util::future::join_all(uploads).await;
    let refused: Vec<_> = answers
        .iter()
        .filter_map(|answer| answer.as_ref().ok())
        .filter(|response| response.status == 503)
        .collect();
    assert!(
        !refused.is_empty(),
        "all {UPLOADS} uploads were taken in for a host that reads nothing"
    );
    assert!(
        refused[0].error().contains("budget"),
        "{}",
        refused[0].error()
    );
    assert!(
        relay
            .counter("relay_budget_refusals_total", &[("scope", "tunnel")])
            .await
            >= 1.0
    );
    let in_use = relay.counter("relay_budget_bytes_in_use", &[]).await;
    assert!(in_use <= (4 * MIB) as f64, "{in_use} bytes held");

    // Another tenant's host is untouched by it.
    let response = served(&relay, &mut other, "other-1", "fine").await;
    response.assert_status(200);
    assert_eq!(response.text(), "fine");
}

/// A client that asks `host_id` for `/download` and reads nothing of the answer.
async fn stalled_download(
    relay: &TestRelay,
    host: &mut RawHost,
    host_id: &str,
    size: usize,
) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(relay.addr()).await.unwrap();
    let head = format!(
        "GET /hosts/{host_id}/download HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer {}\r\n\r\n",
        relay.client_token(&[host_id])
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let msg = host.expect("http").await;
    host.respond(&msg_id(&msg), 200, json!({}), &"d".repeat(size))
        .await;
    stream
}

#[tokio::test]
async fn past_the_process_budget_an_answer_waits_unread_in_its_tunnel_until_room_comes_back_and_arrives_whole()
 {
    // Each answer is larger than the socket buffers can take off the relay's hands, so
    // it stays charged while its client reads nothing.
    const ANSWER: usize = 8 * MIB;
    const BUDGET: usize = 20 * MIB;
    let relay = TestRelay::builder()
        .env("RELAY_MEMORY_BUDGET", &BUDGET.to_string())
        .spawn()
        .await;
    let mut first = RawHost::connect(&relay, "first-1").await;
    let mut second = RawHost::connect(&relay, "second-1").await;

    let stalled_first = stalled_download(&relay, &mut first, "first-1", ANSWER).await;
    let stalled_second = stalled_download(&relay, &mut second, "second-1", ANSWER).await;
    within("both answers are held", DEADLINE, async {
        while relay.counter("relay_budget_bytes_in_use", &[]).await < (2 * ANSWER) as f64 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    // A third answer of that size does not fit. The relay reads its message as far as
    // there is room, charged (the codec holds a message whole before the relay sees
    // it), then reads that tunnel no further: nothing past the budget, nothing lost.
    let answered = std::sync::atomic::AtomicBool::new(false);
    let third = async {
        let response = served(&relay, &mut second, "second-1", &"x".repeat(ANSWER)).await;
        answered.store(true, std::sync::atomic::Ordering::SeqCst);
        response
    };
    let room_comes_back = async {
        within("the third answer fills the budget", DEADLINE, async {
            while relay.counter("relay_budget_bytes_in_use", &[]).await
                < (BUDGET - 64 * 1024) as f64
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(
            relay
                .counter("relay_budget_refusals_total", &[("scope", "process")])
                .await
                >= 1.0
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(relay.counter("relay_budget_bytes_in_use", &[]).await <= BUDGET as f64);
        assert!(
            !answered.load(std::sync::atomic::Ordering::SeqCst),
            "the answer waits for room"
        );
        // The stalled clients go: their answers are dropped and the room comes back.
        drop((stalled_first, stalled_second));
    };
    let (response, ()) = tokio::join!(third, room_comes_back);
    response.assert_status(200);
    assert_eq!(response.text().len(), ANSWER);
    within("the budget is given back", DEADLINE, async {
        while relay.counter("relay_budget_bytes_in_use", &[]).await > 0.0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let response = served(&relay, &mut first, "first-1", "after").await;
    response.assert_status(200);
}

#[tokio::test]
async fn a_tenant_whose_hosts_start_large_messages_and_never_end_them_holds_its_share_and_others_are_served()
 {
    // Memory this may cost the relay: the tenant's share here (4 MiB), plus 64 KiB per
    // tunnel read for free, plus socket buffers. Before messages in progress were
    // charged, each of these hosts held its whole 12 MiB in the relay (96 MiB here),
    // and before tenants had shares, charging them would have filled the relay for
    // everyone. What grows besides the share is the codec's buffers growing by doubling
    // and the allocator keeping what they left (~25 MiB, as with 4 hosts).
    const HOSTS: usize = 8;
    const MESSAGE: usize = 12 * MIB;
    const SHARE: usize = 4 * MIB;
    let relay = TestRelay::builder()
        .env("RELAY_MEMORY_BUDGET", &(8 * MIB).to_string())
        .env("RELAY_TENANT_BUDGET", &SHARE.to_string())
        .spawn()
        .await;
    let rss_before = relay_tests::rss_kib(relay.pid()).unwrap();
    let mut writers = Vec::new();
    for n in 0..HOSTS {
        // Every host token of the test relay has the same subject: one tenant.
        let host_id = format!("hoarder-{n}");
        let mut host = RawHost::connect(&relay, &host_id).await;
        writers.push(tokio::spawn(async move {
            // A text message announced at 12 MiB, masked (with a zero key) as a host's
            // frames must be; all of it but the last byte is sent, the rest never.
            let tokio_tungstenite::MaybeTlsStream::Plain(tcp) =
                host.ws_mut().stream_mut().get_mut()
            else {
                panic!("the test socket is plain TCP");
            };
            let head = relay_tests::ws::masked_frame_head(true, MESSAGE as u64);
            tcp.write_all(&head).await.unwrap();
            let _ = tcp.write_all(&vec![b' '; MESSAGE - 1]).await;
            std::future::pending::<()>().await;
        }));
    }
    relay_tests::wait_until_async(
        "the messages in progress fill the tenant's share",
        DEADLINE,
        || async {
            relay.counter("relay_budget_bytes_in_use", &[]).await >= (SHARE - 64 * 1024) as f64
        },
    )
    .await;
    assert!(
        relay
            .counter("relay_budget_refusals_total", &[("scope", "tenant")])
            .await
            >= 1.0
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(relay.counter("relay_budget_bytes_in_use", &[]).await <= SHARE as f64);
    let grown = relay_tests::rss_kib(relay.pid())
        .unwrap()
        .saturating_sub(rss_before);
    assert!(
        grown < 40 * 1024,
        "{HOSTS} hosts each holding most of a {MESSAGE}-byte message grew the relay {grown} KiB"
    );

    // Another tenant's host is served, large answers included (charged, within the
    // rest of the process's budget).
    let token = relay_tests::Claims::host("other-1")
        .with_sub("another-tenant")
        .sign(relay.secret());
    let mut other = RawHost::connect_url(&relay.tunnel_url("other-1", &token), None).await;
    relay.wait_host_connected("other-1").await;
    let answer = "o".repeat(2 * MIB);
    let response = served(&relay, &mut other, "other-1", &answer).await;
    response.assert_status(200);
    assert_eq!(response.text().len(), answer.len());
    for writer in writers {
        writer.abort();
    }
}

#[tokio::test]
async fn an_answer_there_is_no_room_for_gets_503_and_the_tunnel_keeps_serving() {
    let relay = TestRelay::builder()
        .env("RELAY_TUNNEL_BUDGET", &(2 * MIB).to_string())
        .spawn()
        .await;
    let mut host = RawHost::connect(&relay, "big-1").await;

    let response = served(&relay, &mut host, "big-1", &"x".repeat(3 * MIB)).await;
    response.assert_status(503);
    assert!(response.error().contains("budget"), "{}", response.error());

    // Nothing else on the tunnel failed with it.
    let response = served(&relay, &mut host, "big-1", "small").await;
    response.assert_status(200);
    assert_eq!(response.text(), "small");
}

#[tokio::test]
async fn a_channel_whose_frames_pass_the_tunnel_budget_is_closed_1013_and_others_stay_open() {
    let relay = TestRelay::builder()
        .env("RELAY_TUNNEL_BUDGET", &(MIB).to_string())
        // The channel's own queue would take it all: the tunnel's budget is what ends it.
        .env("RELAY_CHANNEL_QUEUE_BYTES", &(64 * MIB).to_string())
        .spawn()
        .await;
    let mut host = RawHost::connect(&relay, "raw-1").await;
    let token = relay.client_token(&["raw-1"]);
    let _stalled =
        relay_tests::WsClient::connect_ok(&relay.ws_url("/hosts/raw-1/stalled"), Some(&token))
            .await;
    let stalled = host.expect("ws:open").await;
    let mut reading =
        relay_tests::WsClient::connect_ok(&relay.ws_url("/hosts/raw-1/reading"), Some(&token))
            .await;
    let open = host.expect("ws:open").await;

    let chunk = "s".repeat(64 * 1024);
    let close = loop {
        host.send_json(&json!({"type": "ws:frame", "id": stalled["id"], "data": chunk}))
            .await;
        if let Some(msg) = host.try_recv_json(Duration::from_millis(1)).await {
            break msg;
        }
    };
    assert_eq!(close["type"], "ws:close", "{close}");
    assert_eq!(close["id"], stalled["id"]);
    assert_eq!(close_code_of(&close), 1013, "{close}");

    host.send_json(&json!({"type": "ws:frame", "id": open["id"], "data": "still here"}))
        .await;
    assert_eq!(reading.recv_text().await, "still here");
}

/// Sends a request head announcing a 1,000-byte body, then one byte of it every 300 ms;
/// what the relay answered, once it closes or answers.
async fn trickle(relay: &TestRelay, host: &str) -> String {
    let mut stream = TcpStream::connect(relay.addr()).await.unwrap();
    let head = format!(
        "POST /hosts/{host}/upload HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer {}\r\n\
         Content-Length: 1000\r\n\r\n",
        relay.client_token(&[host])
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    for _ in 0..1000 {
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    answer.extend_from_slice(&buf[..n]);
                    break;
                }
            },
            () = tokio::time::sleep(Duration::from_millis(300)) => {
                if stream.write_all(b"t").await.is_err() {
                    break;
                }
            }
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn trickling_uploads_hold_no_place_of_the_host_and_are_cut_with_408() {
    let relay = TestRelay::builder()
        .max_pending(2)
        .env("RELAY_UPLOAD_GRACE", "1s")
        .spawn()
        .await;
    let mut host = RawHost::connect(&relay, "slow-1").await;

    // Five uploads trickling at 3 bytes a second, against a host with two places.
    let tricklers: Vec<_> = (0..5)
        .map(|_| {
            let relay = &relay;
            async move { trickle(relay, "slow-1").await }
        })
        .collect();
    let tricklers = futures_util::future::join_all(tricklers);
    let others = async {
        // Meanwhile a client with its whole request is served at once.
        tokio::time::sleep(Duration::from_millis(300)).await;
        served(&relay, &mut host, "slow-1", "not blocked").await
    };
    let (answers, response) = within("the trickling uploads are cut", DEADLINE, async {
        tokio::join!(tricklers, others)
    })
    .await;
    response.assert_status(200);
    assert_eq!(response.text(), "not blocked");
    for answer in answers {
        assert!(
            answer.starts_with("HTTP/1.1 408"),
            "a trickling upload was answered: {answer}"
        );
    }
    // The host never saw them.
    assert!(
        host.try_recv_json(Duration::from_millis(200))
            .await
            .is_none()
    );
}

#[tokio::test]
async fn a_websocket_message_in_progress_past_the_process_budget_drops_its_socket_and_others_go_on()
{
    let relay = TestRelay::builder()
        .env("RELAY_MEMORY_BUDGET", &(2 * MIB).to_string())
        .spawn()
        .await;
    let mut host = RawHost::connect(&relay, "raw-1").await;
    let token = relay.client_token(&["raw-1"]);
    let url = relay.ws_url("/hosts/raw-1/feed");
    let client = relay_tests::WsClient::connect_ok(&url, Some(&token)).await;
    let open = host.expect("ws:open").await;

    // A 3 MiB binary message, masked as a client's must be (with a zero key), of which
    // 2.5 MiB are sent and the rest never: the relay would hold it all, unseen.
    let mut stream = client.into_stream();
    let tokio_tungstenite::MaybeTlsStream::Plain(tcp) = stream.get_mut() else {
        panic!("the test socket is plain TCP");
    };
    let head = relay_tests::ws::masked_frame_head(false, 3 * MIB as u64);
    tcp.write_all(&head).await.unwrap();
    let _ = tcp.write_all(&vec![0u8; 5 * MIB / 2]).await;

    let close = host.expect("ws:close").await;
    assert_eq!(close["id"], open["id"], "{close}");
    assert!(
        relay
            .counter("relay_budget_refusals_total", &[("scope", "process")])
            .await
            >= 1.0
    );
    // Others go on: a new channel carries a message whole.
    let mut other = relay_tests::WsClient::connect_ok(&url, Some(&token)).await;
    let other_open = host.expect("ws:open").await;
    other.send_text("small").await;
    let frame = host.expect("ws:frame").await;
    assert_eq!(frame["id"], other_open["id"]);
    assert_eq!(frame["data"], "small");
}

// ---------------------------------------------------------------------------
// h2 tunnels: HTTP/2 streams instead of buffering; what it and the channels' codecs may
// hold is charged all the same.
// ---------------------------------------------------------------------------

/// `relay_budget_bytes_in_use` on `relay`.
async fn budget_in_use(relay: &TestRelay) -> f64 {
    relay.counter("relay_budget_bytes_in_use", &[]).await
}

/// An `h2` agent for `host` on `relay`, in front of `upstream_url`, connected.
async fn h2_agent(relay: &TestRelay, host: &str, upstream_url: &str) -> relay_tests::TestAgent {
    let agent = relay_tests::TestAgent::builder(host)
        .relay(&relay.ws_url(""))
        .token(&relay.host_token(host))
        .to(upstream_url)
        .protocol("h2")
        .spawn();
    agent.wait_connected_to(relay).await;
    agent
}

#[tokio::test]
async fn an_h2_connection_reserves_its_receive_window_as_the_process_budget_allows_and_gives_it_back()
 {
    // 3 MiB in all: the 8 MiB window does not fit, nor 4; 2 does.
    let relay = TestRelay::builder()
        .env("RELAY_MEMORY_BUDGET", &(3 * MIB).to_string())
        .env("RELAY_H2_IDLE_CONNECTION", "300ms")
        .spawn()
        .await;
    let bulk = relay_tests::BulkUpstream::spawn().await;
    let _agent = h2_agent(&relay, "windowed", &bulk.url("")).await;
    assert_eq!(budget_in_use(&relay).await, 0.0, "no HTTP/2 connection yet");

    // A download larger than the window streams through it whole.
    let n = 5 * MIB as u64 + 3;
    let got = relay_tests::stream_client::download(
        &relay.http_url(&format!("/hosts/windowed/bytes?n={n}&seed=11")),
        &[(
            "authorization",
            format!("Bearer {}", relay.client_token(&["windowed"])).as_str(),
        )],
        relay_tests::stream_client::DownloadOptions::default(),
    )
    .await
    .expect("download");
    assert_eq!(got.status, 200);
    assert_eq!(got.sha256, relay_tests::expected_sha256(n, 11));
    assert_eq!(
        budget_in_use(&relay).await,
        (2 * MIB) as f64,
        "the connection holds the window it was granted"
    );

    // Idle past its period, the connection ends and gives its window back.
    relay
        .wait_counter("relay_h2_connections_total", &[("event", "ended")], 1.0)
        .await;
    relay_tests::wait_until_async("the window is given back", DEADLINE, || async {
        budget_in_use(&relay).await == 0.0
    })
    .await;
}

#[tokio::test]
async fn an_h2_channel_message_past_the_tunnel_budget_closes_that_channel_1013_and_others_stay_open()
 {
    let relay = TestRelay::builder()
        .env("RELAY_TUNNEL_BUDGET", &(2 * MIB).to_string())
        .spawn()
        .await;
    let upstream = relay_tests::Upstream::spawn().await;
    let _agent = h2_agent(&relay, "echoes", &format!("http://{}", upstream.addr())).await;
    let token = relay.client_token(&["echoes"]);
    let url = relay.ws_url("/hosts/echoes/ws/echo");
    let mut big = relay_tests::WsClient::connect_ok(&url, Some(&token)).await;
    let mut small = relay_tests::WsClient::connect_ok(&url, Some(&token)).await;

    // 3 MiB goes out (the relay passes it on as the tunnel takes it) and comes back
    // echoed: the relay would have to hold it whole for the client, past the 2 MiB the
    // host may make it hold.
    big.send_binary(&vec![7u8; 3 * MIB]).await;
    assert_eq!(big.recv_close_code(DEADLINE).await, 1013);
    assert!(
        relay
            .counter("relay_budget_refusals_total", &[("scope", "tunnel")])
            .await
            >= 1.0
    );

    small.send_text("still here").await;
    assert_eq!(small.recv_text().await, "still here");
    // What the channels held is given back; the connection's window stays reserved
    // while it is up.
    relay_tests::wait_until_async("only the window is left charged", DEADLINE, || async {
        budget_in_use(&relay).await == (8 * MIB) as f64
    })
    .await;
}

#[tokio::test]
async fn a_websocket_message_in_progress_over_http2_past_the_process_budget_drops_its_stream_and_others_go_on()
 {
    let relay = TestRelay::builder()
        .env("RELAY_MEMORY_BUDGET", &(2 * MIB).to_string())
        .spawn()
        .await;
    let mut host = RawHost::connect(&relay, "raw-1").await;
    let token = relay.client_token(&["raw-1"]);
    let client = relay_tests::ws::connect_h2c(relay.addr(), "/hosts/raw-1/feed", Some(&token))
        .await
        .expect("the channel opens");
    let open = host.expect("ws:open").await;

    // A 3 MiB binary message, masked with a zero key, of which 2.5 MiB are sent on the
    // stream and the rest never: an HTTP/2 connection carries other streams, so the
    // relay charges the stream itself.
    let mut stream = client.into_inner();
    let head = relay_tests::ws::masked_frame_head(false, 3 * MIB as u64);
    stream.write_all(&head).await.unwrap();
    let writing = tokio::spawn(async move {
        let _ = stream.write_all(&vec![0u8; 5 * MIB / 2]).await;
        std::future::pending::<()>().await;
    });

    let close = host.expect("ws:close").await;
    assert_eq!(close["id"], open["id"], "{close}");
    assert!(
        relay
            .counter("relay_budget_refusals_total", &[("scope", "process")])
            .await
            >= 1.0
    );
    writing.abort();
    // Others go on: a new channel carries a message whole.
    let mut other =
        relay_tests::WsClient::connect_ok(&relay.ws_url("/hosts/raw-1/feed"), Some(&token)).await;
    let other_open = host.expect("ws:open").await;
    other.send_text("small").await;
    let frame = host.expect("ws:frame").await;
    assert_eq!(frame["id"], other_open["id"]);
    assert_eq!(frame["data"], "small");
}

#[tokio::test]
async fn an_http2_client_that_opens_huge_windows_and_stops_reading_holds_no_more_than_the_budget() {
    // Memory this may cost the relay: the process budget (16 MiB here) and what passing
    // the socket buffers' worth through it costs once (+37 MiB measured). Before
    // responses to HTTP/2 clients were charged, hyper's send buffer of every stream
    // filled (400 KiB each: 60 MiB for these 150 streams of one connection; +77 MiB).
    const STREAMS: usize = 150;
    const EACH: u64 = 8 * MIB as u64;
    let relay = TestRelay::builder()
        .env("RELAY_MEMORY_BUDGET", &(16 * MIB).to_string())
        .spawn()
        .await;
    let bulk = relay_tests::BulkUpstream::spawn().await;
    let _agent = h2_agent(&relay, "bulk", &bulk.url("")).await;
    let rss_before = relay_tests::rss_kib(relay.pid()).unwrap();

    let (io, stall) =
        relay_tests::StallingReads::new(TcpStream::connect(relay.addr()).await.unwrap());
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(0x7fff_ffff)
        .initial_connection_window_size(0x7fff_ffff)
        .handshake::<_, bytes::Bytes>(io)
        .await
        .expect("HTTP/2 handshake");
    let connection = tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let token = relay.client_token(&["bulk"]);
    let mut responses = Vec::new();
    for seed in 0..STREAMS {
        let request = http::Request::get(format!(
            "http://{}/hosts/bulk/bytes?n={EACH}&seed={seed}",
            relay.addr()
        ))
        .header("authorization", format!("Bearer {token}"))
        .body(())
        .unwrap();
        let (response, _) = client.send_request(request, true).unwrap();
        responses.push(response);
        client = client.ready().await.unwrap();
    }
    // The first answers arrive; then the client reads nothing more.
    let first = responses.remove(0).await.expect("an answer");
    assert_eq!(first.status(), 200);
    stall.stall();

    relay_tests::wait_until_async("the answers fill the budget", DEADLINE, || async {
        relay.counter("relay_budget_bytes_in_use", &[]).await >= (15 * MIB) as f64
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(relay.counter("relay_budget_bytes_in_use", &[]).await <= (16 * MIB) as f64);
    let grown = relay_tests::rss_kib(relay.pid())
        .unwrap()
        .saturating_sub(rss_before);
    assert!(
        grown < 48 * 1024,
        "{STREAMS} answers to a client that stopped reading grew the relay {grown} KiB"
    );
    connection.abort();
}
