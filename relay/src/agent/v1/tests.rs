//! The agent's v1 session over an in-memory socket, and its conversions.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::DuplexStream;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_util::task::TaskTracker;

use super::*;
use crate::agent::config::{ProtocolChoice, TokenSource, UpstreamUrl};
use crate::agent::status::StatusHandle;
use crate::agent::tunnel::Event;
use crate::host_id::HostId;
use crate::limits::agent::REGISTRATION_GRACE;

type Ws = WebSocketStream<DuplexStream>;

/// A session over an in-memory socket; returns the relay's end of it.
struct Harness {
    relay: Ws,
    events: mpsc::UnboundedReceiver<Event>,
    newest: watch::Sender<u64>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<TunnelEnd>,
}

async fn spawn_session(silence: Duration, upstream: &str) -> Harness {
    spawn_session_with(silence, upstream, crate::limits::agent::ANSWER_BUDGET).await
}

async fn spawn_session_with(silence: Duration, upstream: &str, answer_budget: usize) -> Harness {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let agent_side = WebSocketStream::from_raw_socket(a, Role::Client, None).await;
    let relay = WebSocketStream::from_raw_socket(b, Role::Server, None).await;
    let shared = Arc::new(Shared {
        host_id: HostId::parse("demo").unwrap(),
        token: TokenSource::Inline("t".parse().unwrap()),
        upstream: Arc::new(Upstream::new(UpstreamUrl::parse(upstream).unwrap())),
        status: StatusHandle::new(HostId::parse("demo").unwrap(), "ws://test"),
        connect_timeout: Duration::from_secs(1),
        silence_timeout: silence,
        tls: None,
        tasks: TaskTracker::new(),
        protocol: ProtocolChoice::V1,
        v1_only: std::sync::Mutex::default(),
        answer_budget,
    });
    let (events_tx, events) = mpsc::unbounded_channel();
    let (newest, newest_rx) = watch::channel(0);
    let cancel = CancellationToken::new();
    let relay_url = RelayUrl::parse("ws://test").unwrap();
    let watchdogs = Watchdogs::new(
        &shared,
        1,
        crate::tunnel::Protocol::V1,
        relay_url.clone(),
        events_tx,
        newest_rx,
    );
    let session = Session::new(shared, relay_url, watchdogs);
    let task = tokio::spawn(session.serve(agent_side, cancel.clone()));
    Harness {
        relay,
        events,
        newest,
        cancel,
        task,
    }
}

async fn next_json(relay: &mut Ws) -> Value {
    loop {
        match relay.next().await.expect("socket open").expect("frame") {
            Message::Text(text) => return serde_json::from_str(text.as_str()).unwrap(),
            Message::Close(frame) => panic!("closed: {frame:?}"),
            _ => {}
        }
    }
}

async fn send(relay: &mut Ws, v: Value) {
    relay
        .send(Message::Text(v.to_string().into()))
        .await
        .unwrap();
}

fn closed_port() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", listener.local_addr().unwrap())
}

#[tokio::test(start_paused = true)]
async fn registers_after_the_grace_and_answers_pings() {
    let mut h = spawn_session(Duration::from_secs(75), &closed_port()).await;
    tokio::time::sleep(REGISTRATION_GRACE / 2).await;
    assert!(h.events.try_recv().is_err(), "registered too early");
    tokio::time::sleep(REGISTRATION_GRACE).await;
    assert_eq!(
        h.events.recv().await,
        Some(Event::Registered {
            generation: 1,
            protocol: crate::tunnel::Protocol::V1,
            base_domain: None,
        })
    );
    send(&mut h.relay, json!({"type":"ping"})).await;
    assert_eq!(next_json(&mut h.relay).await, json!({"type":"pong"}));
    h.cancel.cancel();
    let TunnelEnd::Ended {
        cause,
        registered_for,
    } = h.task.await.unwrap()
    else {
        panic!("not opened");
    };
    assert_eq!(cause, EndCause::Shutdown);
    assert!(registered_for.is_some());
}

#[tokio::test(start_paused = true)]
async fn a_close_within_the_grace_never_registers() {
    let mut h = spawn_session(Duration::from_secs(75), &closed_port()).await;
    h.relay
        .send(Message::Close(Some(CloseFrame {
            code: 1008.into(),
            reason: "token expired".into(),
        })))
        .await
        .unwrap();
    let TunnelEnd::Ended {
        cause,
        registered_for,
    } = h.task.await.unwrap()
    else {
        panic!("not opened");
    };
    assert_eq!(
        cause,
        EndCause::RelayClosed {
            code: Some(1008),
            reason: "token expired".into()
        }
    );
    assert_eq!(registered_for, None);
    assert!(h.events.try_recv().is_err());
}

#[tokio::test(start_paused = true)]
async fn silence_abandons_the_tunnel_and_pings_keep_it_alive() {
    let silence = Duration::from_secs(75);
    let mut h = spawn_session(silence, &closed_port()).await;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(30)).await;
        send(&mut h.relay, json!({"type":"ping"})).await;
        assert_eq!(next_json(&mut h.relay).await, json!({"type":"pong"}));
    }
    let started = Instant::now();
    let TunnelEnd::Ended { cause, .. } = h.task.await.unwrap() else {
        panic!("not opened");
    };
    assert_eq!(cause, EndCause::Silence(silence));
    let waited = started.elapsed();
    assert!(
        waited >= silence - Duration::from_millis(10) && waited <= silence + Duration::from_secs(1),
        "{waited:?}"
    );
}

#[tokio::test]
async fn exchanges_with_a_dead_upstream_get_502_and_the_tunnel_lives() {
    let mut h = spawn_session(Duration::from_secs(75), &closed_port()).await;
    for id in ["1", "2"] {
        send(
            &mut h.relay,
            json!({"type":"http","id":id,"method":"GET","path":"/","headers":{}}),
        )
        .await;
    }
    let mut ids = Vec::new();
    for _ in 0..2 {
        let v = next_json(&mut h.relay).await;
        assert_eq!(v["type"], "http:response");
        assert_eq!(v["status"], 502);
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    ids.sort();
    assert_eq!(ids, ["1", "2"]);
    // A channel that cannot be opened is closed with 1011.
    send(
        &mut h.relay,
        json!({"type":"ws:open","id":"3","path":"/ws"}),
    )
    .await;
    assert_eq!(
        next_json(&mut h.relay).await,
        json!({"type":"ws:close","id":"3","code":1011})
    );
    // Junk is ignored.
    send(&mut h.relay, json!({"type":"future:thing"})).await;
    h.relay.send(Message::Text("{oops".into())).await.unwrap();
    send(&mut h.relay, json!({"type":"ping"})).await;
    assert_eq!(next_json(&mut h.relay).await, json!({"type":"pong"}));
    h.cancel.cancel();
    // The agent closes with 1000.
    loop {
        match h.relay.next().await {
            Some(Ok(Message::Close(Some(frame)))) => {
                assert_eq!(u16::from(frame.code), 1000);
                break;
            }
            Some(Ok(_)) => {}
            other => panic!("no close frame: {other:?}"),
        }
    }
    assert!(matches!(
        h.task.await.unwrap(),
        TunnelEnd::Ended {
            cause: EndCause::Shutdown,
            ..
        }
    ));
}

/// An upstream that answers every request `done` after `delay`.
async fn slow_upstream(delay: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
                tokio::time::sleep(delay).await;
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\ndone")
                    .await;
            });
        }
    });
    url
}

#[tokio::test]
async fn a_drained_tunnel_answers_its_in_flight_exchange_before_closing() {
    let upstream = slow_upstream(Duration::from_millis(300)).await;
    let mut h = spawn_session(Duration::from_secs(75), &upstream).await;
    send(
        &mut h.relay,
        json!({"type":"http","id":"1","method":"GET","path":"/slow","headers":{}}),
    )
    .await;
    send(&mut h.relay, json!({"type":"drain"})).await;
    // Replaced at once, but the exchange is still in flight: the answer comes first,
    // then the Close.
    h.newest.send_replace(2);
    let v = next_json(&mut h.relay).await;
    assert_eq!(
        (v["id"].as_str(), v["status"].as_u64()),
        (Some("1"), Some(200))
    );
    assert_eq!(v["body"], "done");
    match h.relay.next().await {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 1000),
        other => panic!("expected Close 1000, got {other:?}"),
    }
    assert!(matches!(
        h.task.await.unwrap(),
        TunnelEnd::Ended {
            cause: EndCause::Drained,
            ..
        }
    ));
}

#[tokio::test(start_paused = true)]
async fn a_drained_tunnel_closes_once_idle_and_replaced() {
    let mut h = spawn_session(Duration::from_secs(75), &closed_port()).await;
    send(&mut h.relay, json!({"type":"drain","reason":"deploy"})).await;
    assert_eq!(
        h.events.recv().await,
        Some(Event::Registered {
            generation: 1,
            protocol: crate::tunnel::Protocol::V1,
            base_domain: None,
        })
    );
    assert_eq!(
        h.events.recv().await,
        Some(Event::Drain {
            generation: 1,
            reason: Some("deploy".into())
        })
    );
    // Idle, but no replacement yet: it keeps serving.
    tokio::time::sleep(Duration::from_secs(5)).await;
    send(&mut h.relay, json!({"type":"ping"})).await;
    assert_eq!(next_json(&mut h.relay).await, json!({"type":"pong"}));
    assert!(!h.task.is_finished());
    // A newer tunnel registered: this one closes with 1000.
    h.newest.send_replace(2);
    loop {
        match h.relay.next().await {
            Some(Ok(Message::Close(Some(frame)))) => {
                assert_eq!(u16::from(frame.code), 1000);
                break;
            }
            Some(Ok(_)) => {}
            other => panic!("no close frame: {other:?}"),
        }
    }
    assert!(matches!(
        h.task.await.unwrap(),
        TunnelEnd::Ended {
            cause: EndCause::Drained,
            ..
        }
    ));
}

#[test]
fn request_headers_drop_hop_by_hop_host_and_length() {
    let headers = Headers(vec![
        ("host".into(), "client.example".into()),
        ("connection".into(), "close".into()),
        ("content-length".into(), "3".into()),
        ("x-forwarded-for".into(), "1.2.3.4".into()),
        ("bad name".into(), "v".into()),
        ("accept".into(), "a".into()),
        ("accept".into(), "b".into()),
    ]);
    let built = build_request("POST", "/x?y=1", &headers, b"abc".to_vec()).unwrap();
    assert_eq!(built.uri(), "/x?y=1");
    assert_eq!(built.method(), "POST");
    let upstream = crate::headers::to_upstream(built.headers().clone());
    let names: Vec<_> = upstream.keys().map(|n| n.as_str()).collect();
    assert_eq!(names, ["x-forwarded-for", "accept"]);
    assert_eq!(upstream.get_all("accept").iter().count(), 2);
    assert!(build_request("GE T", "/", &Headers::default(), vec![]).is_err());
}

#[tokio::test]
async fn answers_keep_cookies_apart_and_drop_hop_by_hop_and_length() {
    let response = Response::builder()
        .status(200)
        .header("vary", "accept")
        .header("vary", "origin")
        .header("set-cookie", "a=1")
        .header("set-cookie", "b=2; Path=/")
        .header("content-length", "5")
        .header("transfer-encoding", "chunked")
        .body(Body::from("hello"))
        .unwrap();
    let answer = Answer::of(response).await;
    assert_eq!(
        answer.headers,
        Headers(vec![
            ("vary".into(), "accept, origin".into()),
            ("set-cookie".into(), "a=1".into()),
            ("set-cookie".into(), "b=2; Path=/".into()),
        ])
    );
    let v: Value = serde_json::from_str(&answer.to_json("1")).unwrap();
    assert_eq!(v["headers"]["set-cookie"], json!(["a=1", "b=2; Path=/"]));
}

#[test]
fn bodies_are_text_or_base64() {
    let mut answer = Answer::error(200, "hello");
    let v: Value = serde_json::from_str(&answer.to_json("1")).unwrap();
    assert_eq!(v["body"], r#"{"error":"hello"}"#);
    assert!(v.get("encoding").is_none());

    answer.body = Bytes::from_static(&[0xff, 0x00, 0x01]);
    let v: Value = serde_json::from_str(&answer.to_json("1")).unwrap();
    assert_eq!(v["body"], "/wAB");
    assert_eq!(v["encoding"], "base64");

    answer.body = Bytes::new();
    let v: Value = serde_json::from_str(&answer.to_json("1")).unwrap();
    assert!(v.get("body").is_none());
}

#[test]
fn an_answer_too_large_for_a_frame_becomes_502() {
    // Control characters are escaped as \u00XX: six bytes of JSON per body byte.
    let answer = Answer {
        status: 200,
        headers: Headers::default(),
        body: Bytes::from(vec![1u8; MAX_TUNNEL_MESSAGE / 4]),
    };
    let v: Value = serde_json::from_str(&answer.to_json("1")).unwrap();
    assert_eq!(v["status"], 502);
    assert_eq!(v["id"], "1");
}

/// A local WebSocket server that accepts one upgrade and then never reads from it.
async fn unread_websocket_upstream() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let _socket = tokio_tungstenite::accept_async(stream).await.unwrap();
        std::future::pending::<()>().await;
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn a_local_websocket_that_stops_reading_is_closed_1013_once_its_bytes_pass_the_budget() {
    let upstream = unread_websocket_upstream().await;
    let mut h = spawn_session(Duration::from_secs(60), &upstream).await;
    send(
        &mut h.relay,
        json!({"type": "ws:open", "id": "c1", "path": "/feed"}),
    )
    .await;
    // 1 MiB frames: the frame count (256) is never near its bound, the bytes are (4 MiB,
    // after what the local socket's buffers take).
    let frame = "x".repeat(1024 * 1024);
    let mut sent = 0;
    let close = loop {
        assert!(
            sent < 64,
            "{sent} frames of 1 MiB queued for a local socket that reads nothing"
        );
        send(
            &mut h.relay,
            json!({"type": "ws:frame", "id": "c1", "data": frame}),
        )
        .await;
        sent += 1;
        match tokio::time::timeout(Duration::from_millis(20), next_json(&mut h.relay)).await {
            Ok(msg) if msg["type"] == "ws:close" => break msg,
            _ => {}
        }
    };
    assert_eq!(close["id"], "c1");
    assert_eq!(close["code"], 1013);
    h.cancel.cancel();
}

/// An upstream that answers every request with `size` bytes of `x` (with its length), and
/// counts the answers it has written whole.
async fn big_upstream(size: usize) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let written = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = written.clone();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                loop {
                    let n = stream.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    head.extend_from_slice(&buf[..n]);
                    if head.windows(4).any(|w| w == b"\r\n\r\n") {
                        head.clear();
                        let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {size}\r\n\r\n");
                        let _ = stream.write_all(answer.as_bytes()).await;
                        if stream.write_all(&vec![b'x'; size]).await.is_ok() {
                            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                    }
                }
            });
        }
    });
    (format!("http://{addr}"), written)
}

#[tokio::test]
async fn answers_past_the_budget_wait_unread_at_the_upstream_until_the_relay_takes_the_first() {
    // Room for one 8 MiB answer (three times its length): while the relay reads nothing,
    // the agent holds the first answer and leaves the others unread at the upstream,
    // instead of reading them all into its queue.
    const SIZE: usize = 8 * 1024 * 1024;
    let (upstream, written) = big_upstream(SIZE).await;
    let mut h = spawn_session_with(Duration::from_secs(60), &upstream, 3 * SIZE).await;
    for id in ["1", "2", "3"] {
        send(
            &mut h.relay,
            json!({"type":"http","id":id,"method":"GET","path":"/big","headers":{}}),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = written.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        before <= 1,
        "{before} answers of 8 MiB were read while the relay read nothing, with room for one"
    );
    // The relay reads: every answer comes, whole and in turn.
    let mut ids = Vec::new();
    while ids.len() < 3 {
        let v = next_json(&mut h.relay).await;
        if v["type"] != "http:response" {
            continue;
        }
        assert_eq!(v["status"], 200, "{}", v["id"]);
        assert_eq!(v["body"].as_str().map(str::len), Some(SIZE));
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    ids.sort();
    assert_eq!(ids, ["1", "2", "3"]);
    h.cancel.cancel();
}
