//! Client connections are bounded: a request head must arrive whole in time (slowloris,
//! silent sockets and idle keep-alive connections are closed), connections over the
//! limit are closed at once while the others are served, and a peer that stops reading
//! (a client, a client WebSocket, a host's tunnel) is dropped after the write timeout.

use std::time::Duration;

use relay_tests::{DEADLINE, RawHost, TestRelay, WsClient, close_code_of, msg_id, within};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// More than the kernel buffers between relay and a peer that reads nothing can hold
/// (send buffers grow to 4 MiB here; an unread receive buffer stays small).
const MORE_THAN_SOCKET_BUFFERS: usize = 12 * 1024 * 1024;

/// Reads until the relay closes `stream` (EOF or reset); what it sent before that.
async fn until_closed(stream: &mut TcpStream, what: &str) -> Vec<u8> {
    within(what, DEADLINE, async {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return seen,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
}

/// Whether `GET /health` on a new connection answers 200.
async fn health_answers(relay: &TestRelay) -> bool {
    relay
        .http()
        .get(relay.http_url("/health"))
        .try_send()
        .await
        .is_ok_and(|response| response.status == 200)
}

#[tokio::test]
async fn silent_slow_and_idle_keep_alive_connections_are_closed_after_the_head_timeout() {
    let relay = TestRelay::builder()
        .env("RELAY_HEADER_READ_TIMEOUT", "500ms")
        .spawn()
        .await;

    // Connects and says nothing.
    let mut silent = TcpStream::connect(relay.addr()).await.unwrap();
    until_closed(&mut silent, "the silent connection is closed").await;

    // Sends its head a byte every 100 ms: still incomplete when the time is up.
    let mut slow = TcpStream::connect(relay.addr()).await.unwrap();
    let head = b"GET /health HTTP/1.1\r\nHost: relay\r\nX-Padding: slowloris-slowloris\r\n\r\n";
    let trickle = async {
        for byte in head {
            if slow.write_all(&[*byte]).await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    };
    let cut_off = within("the slow head is cut off", DEADLINE, trickle).await;
    let answer = until_closed(&mut slow, "the slow connection is closed").await;
    assert!(
        cut_off || !String::from_utf8_lossy(&answer).contains("200 OK"),
        "a head sent over {} ms was served",
        head.len() * 100
    );

    // One request, then idle on a keep-alive connection.
    let mut idle = TcpStream::connect(relay.addr()).await.unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: relay\r\n\r\n")
        .await
        .unwrap();
    let answer = until_closed(&mut idle, "the idle keep-alive connection is closed").await;
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"),
        "the request before the idle time was served: {}",
        String::from_utf8_lossy(&answer)
    );

    // A client that sends its request at once is served as ever.
    assert!(health_answers(&relay).await);
}

#[tokio::test]
async fn connections_over_the_limit_are_closed_at_once_and_counted_while_the_others_are_served() {
    let relay = TestRelay::builder()
        .env("RELAY_MAX_CONNECTIONS", "4")
        .spawn()
        .await;
    // Wait until the harness's own readiness connections are gone.
    within("a free connection slot", DEADLINE, async {
        while !health_answers(&relay).await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    // Connections that send half a head hold a slot each (for up to the head timeout)
    // until one is refused: closed at once, with no answer. An accepted one stays open,
    // silent, waiting for the rest of its head.
    let mut held = Vec::new();
    within("a connection over the limit is refused", DEADLINE, async {
        loop {
            assert!(held.len() <= 4, "more than 4 connections were held open");
            let mut stream = TcpStream::connect(relay.addr()).await.unwrap();
            let _ = stream.write_all(b"GET /health HTTP/1.1\r\n").await;
            let mut buf = [0u8; 64];
            match tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf)).await {
                Err(_) => held.push(stream),
                Ok(Ok(0) | Err(_)) => return,
                Ok(Ok(n)) => panic!(
                    "half a head was answered: {}",
                    String::from_utf8_lossy(&buf[..n])
                ),
            }
        }
    })
    .await;
    // The test's own HTTP client may keep pooled connections open, and a connection that
    // just ended may not have given its slot back yet: at most 4, at least one.
    assert!(
        (1..=4).contains(&held.len()),
        "{} connections held before the refusal, with a limit of 4",
        held.len()
    );

    // The held ones are still served.
    let mut first = held.remove(0);
    first.write_all(b"Host: relay\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 64];
    let n = within(
        "the held connection is answered",
        DEADLINE,
        first.read(&mut buf),
    )
    .await
    .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    drop(first);
    drop(held);
    within("a slot frees up", DEADLINE, async {
        while !health_answers(&relay).await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        relay
            .counter("relay_connections_refused_total", &[("reason", "limit")])
            .await
            >= 1.0
    );
}

/// A connection to the relay whose receive buffer stays small (set before connecting).
async fn small_window_connection(relay: &TestRelay) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(relay.addr()).await.unwrap()
}

#[tokio::test]
async fn a_client_that_stops_reading_its_response_is_dropped_after_the_write_timeout() {
    let relay = TestRelay::builder()
        .env("RELAY_WRITE_TIMEOUT", "500ms")
        .spawn()
        .await;
    let mut host = RawHost::connect(&relay, "raw-1").await;
    let token = relay.client_token(&["raw-1"]);

    let mut client = small_window_connection(&relay).await;
    client
        .write_all(
            format!(
                "GET /hosts/raw-1/big HTTP/1.1\r\nHost: relay\r\n\
                 Authorization: Bearer {token}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let request = host.expect("http").await;
    let body = "z".repeat(MORE_THAN_SOCKET_BUFFERS);
    host.respond(&msg_id(&request), 200, json!({}), &body).await;

    // The client reads nothing; the relay gives up on it instead of holding the body.
    relay
        .wait_counter("relay_write_timeouts_total", &[], 1.0)
        .await;
    let received = within("the dropped connection ends", DEADLINE, async {
        let mut total = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match client.read(&mut buf).await {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n,
            }
        }
    })
    .await;
    assert!(
        received < MORE_THAN_SOCKET_BUFFERS,
        "the whole response ({received} bytes) reached a client dropped for not reading"
    );

    // The tunnel and other clients are unaffected.
    let ok = relay
        .http()
        .get(relay.http_url("/hosts/raw-1/small"))
        .bearer(&token)
        .send();
    let answer = async {
        let request = host.expect("http").await;
        host.respond(&msg_id(&request), 200, json!({}), "fine")
            .await;
    };
    let (response, ()) = tokio::join!(ok, answer);
    response.assert_status(200);
    assert_eq!(response.text(), "fine");
}

#[tokio::test]
async fn a_client_websocket_that_stops_reading_is_dropped_after_the_write_timeout_and_its_host_hears_1013()
 {
    let relay = TestRelay::builder()
        .env("RELAY_WRITE_TIMEOUT", "500ms")
        // Room for everything the host sends: only the write timeout can end the channel.
        .env("RELAY_CHANNEL_QUEUE_BYTES", &(64 * 1024 * 1024).to_string())
        .spawn()
        .await;
    let mut host = RawHost::connect(&relay, "raw-1").await;
    let token = relay.client_token(&["raw-1"]);
    let _client = WsClient::connect_ok(&relay.ws_url("/hosts/raw-1/feed"), Some(&token)).await;
    let open = host.expect("ws:open").await;

    let chunk = "w".repeat(256 * 1024);
    for _ in 0..MORE_THAN_SOCKET_BUFFERS / chunk.len() {
        host.send_json(&json!({"type": "ws:frame", "id": open["id"], "data": chunk}))
            .await;
    }
    // The client never reads: the relay closes the channel at the host's side with 1013
    // (as for a full queue) and drops the client's connection.
    let close = host.expect("ws:close").await;
    assert_eq!(close["id"], open["id"]);
    assert_eq!(close_code_of(&close), 1013, "{close}");
    assert!(relay.counter("relay_write_timeouts_total", &[]).await >= 1.0);
    within("the channel is gone", DEADLINE, async {
        while relay.counter("relay_channels_open", &[]).await > 0.0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_tunnel_whose_host_stops_reading_ends_after_the_write_timeout_before_any_ping_is_due() {
    const BODY: usize = 1024 * 1024;
    let relay = TestRelay::builder()
        .env("RELAY_WRITE_TIMEOUT", "500ms")
        // No ping is due for the whole test: only the write timeout can end the tunnel.
        .ping_interval("300s")
        .env("RELAY_DIRECTORY_TTL", "900s")
        .spawn()
        .await;
    // Connected, then never read from again.
    let _host = RawHost::connect(&relay, "raw-1").await;
    let token = relay.client_token(&["raw-1"]);

    let uploads = (0..MORE_THAN_SOCKET_BUFFERS / BODY).map(|_| {
        relay
            .http()
            .request(http::Method::POST, relay.http_url("/hosts/raw-1/upload"))
            .bearer(&token)
            .body("u".repeat(BODY))
            .timeout(DEADLINE)
            .try_send()
    });
    let waiting = futures_util::future::join_all(uploads);
    let (_, ()) = tokio::join!(waiting, relay.wait_host_disconnected("raw-1"));
    assert!(relay.counter("relay_write_timeouts_total", &[]).await >= 1.0);
}

/// A connection from `source` (any 127/8 address) that sends half a head, so it stays
/// open and silent; `None` when the relay closed it at once.
async fn hold_connection_from(relay: &TestRelay, source: &str) -> Option<TcpStream> {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let mut stream = socket.connect(relay.addr()).await.unwrap();
    let _ = stream.write_all(b"GET /health HTTP/1.1\r\n").await;
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_millis(500), stream.read(&mut buf)).await {
        Err(_) => Some(stream),
        Ok(Ok(0) | Err(_)) => None,
        Ok(Ok(n)) => panic!(
            "half a head was answered: {}",
            String::from_utf8_lossy(&buf[..n])
        ),
    }
}

#[tokio::test]
async fn one_address_holding_its_connection_limit_is_refused_while_other_addresses_are_served() {
    let relay = TestRelay::builder()
        .env("RELAY_MAX_CONNECTIONS_PER_IP", "3")
        .spawn()
        .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            hold_connection_from(&relay, "127.0.0.2")
                .await
                .expect("within the address's limit"),
        );
    }
    assert!(
        hold_connection_from(&relay, "127.0.0.2").await.is_none(),
        "a fourth connection from the same address was kept"
    );
    assert!(
        relay
            .counter(
                "relay_connections_refused_total",
                &[("reason", "per_ip_limit")]
            )
            .await
            >= 1.0
    );
    // Another address is served.
    assert!(hold_connection_from(&relay, "127.0.0.3").await.is_some());
    // Once one closes, the address has room again.
    drop(held.pop());
    within("the address gets its place back", DEADLINE, async {
        while hold_connection_from(&relay, "127.0.0.2").await.is_none() {}
    })
    .await;
}

#[tokio::test]
async fn a_silent_http2_connection_that_answers_no_ping_is_closed() {
    let relay = TestRelay::builder()
        .env("RELAY_HEADER_READ_TIMEOUT", "500ms")
        .spawn()
        .await;
    // The HTTP/2 preface and an empty SETTINGS frame, then silence: no ACK of anything,
    // as a peer that vanished without a FIN (or one holding the socket on purpose) does.
    let mut stream = TcpStream::connect(relay.addr()).await.unwrap();
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    until_closed(&mut stream, "the silent HTTP/2 connection is closed").await;
}

#[tokio::test]
async fn tunnels_and_channels_hold_their_connection_places_after_the_upgrade() {
    let relay = TestRelay::spawn().await;
    let mut host = RawHost::connect(&relay, "raw-1").await;
    let token = relay.client_token(&["raw-1"]);
    let _channel = WsClient::connect_ok(&relay.ws_url("/hosts/raw-1/feed"), Some(&token)).await;
    host.expect("ws:open").await;
    // The tunnel and the channel, and the connection that asks: an upgraded connection
    // still counts (the limits hold its place until it ends).
    let open = relay.counter("relay_connections_open", &[]).await;
    assert!(
        open >= 3.0,
        "{open} connections counted open with a tunnel and a channel up"
    );
}

// ---- TLS on the relay's own listener (`--tls-cert`, `--tls-key`) ----

/// A directory holding the certificate and key the relay is given, which a test
/// rewrites as a renewal would.
struct CertFiles {
    dir: std::path::PathBuf,
}

impl CertFiles {
    fn of(ca: &relay_tests::TestCa) -> CertFiles {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "relay-test-tls-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let files = CertFiles { dir };
        files.put_cert(ca);
        files.put_key(ca);
        files
    }
    fn cert(&self) -> std::path::PathBuf {
        self.dir.join("cert.pem")
    }
    fn key(&self) -> std::path::PathBuf {
        self.dir.join("key.pem")
    }
    fn put_cert(&self, ca: &relay_tests::TestCa) {
        std::fs::copy(ca.server_cert(), self.cert()).unwrap();
    }
    fn put_key(&self, ca: &relay_tests::TestCa) {
        std::fs::copy(ca.server_key(), self.key()).unwrap();
    }
    fn relay(&self) -> relay_tests::RelayBuilder {
        TestRelay::builder()
            .arg("--tls-cert", self.cert().to_str().unwrap())
            .arg("--tls-key", self.key().to_str().unwrap())
    }
}

impl Drop for CertFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn tls_offers_http2_and_http11_by_alpn_and_serves_a_renewed_certificate_without_a_restart() {
    let (first, second) = (
        relay_tests::TestCa::generate(),
        relay_tests::TestCa::generate(),
    );
    let files = CertFiles::of(&first);
    let relay = files
        .relay()
        .arg("--header-read-timeout", "2s")
        .spawn()
        .await;
    for (offered, chosen) in [
        (&["h2", "http/1.1"][..], "h2"),
        (&["http/1.1"][..], "http/1.1"),
    ] {
        let answer =
            relay_tests::https_get(relay.addr(), &first.ca_file(), offered, "/health", &[])
                .await
                .unwrap();
        assert_eq!(answer.status, 200, "{answer:?}");
        assert_eq!(answer.alpn.as_deref(), Some(chosen), "{answer:?}");
    }
    assert!(
        !health_answers(&relay).await,
        "a TLS listener does not serve plain HTTP"
    );
    // A TLS connection that says nothing after the handshake is closed too.
    let mut silent = relay_tests::tls_connect(relay.addr(), &first.ca_file(), &["http/1.1"])
        .await
        .unwrap();
    drop(
        relay_tests::within("the silent connection is closed", DEADLINE, async {
            let mut buf = [0u8; 64];
            silent.read(&mut buf).await
        })
        .await,
    );

    // A renewal half written (the new key beside the old certificate) does not load: the
    // old pair is kept and served.
    files.put_key(&second);
    relay
        .wait_for_log(
            "do not load; the certificate loaded before is kept",
            DEADLINE,
        )
        .await;
    let answer = relay_tests::https_get(relay.addr(), &first.ca_file(), &["h2"], "/health", &[])
        .await
        .unwrap();
    assert_eq!(answer.status, 200);

    // The renewal completes: new handshakes get the new certificate.
    files.put_cert(&second);
    relay
        .wait_for_log("TLS certificate reloaded", DEADLINE)
        .await;
    let answer = relay_tests::https_get(relay.addr(), &second.ca_file(), &["h2"], "/health", &[])
        .await
        .unwrap();
    assert_eq!(answer.status, 200);
    let refused =
        relay_tests::https_get(relay.addr(), &first.ca_file(), &["h2"], "/health", &[]).await;
    assert!(refused.is_err(), "the old certificate is gone: {refused:?}");
}

#[tokio::test]
async fn over_tls_an_agent_trusting_a_private_ca_serves_and_the_host_is_told_https() {
    let ca = relay_tests::TestCa::generate();
    let files = CertFiles::of(&ca);
    let relay = files.relay().spawn().await;
    let upstream = relay_tests::Upstream::spawn().await;
    let agent = relay_tests::TestAgent::builder("tls-1")
        .relay(&format!("wss://{}", relay.addr()))
        .token(&relay.host_token("tls-1"))
        .upstream(&upstream)
        .arg("--ca-file", ca.ca_file().to_str().unwrap())
        .spawn();
    agent.wait_registered(1).await;
    let bearer = format!("Bearer {}", relay.client_token(&["tls-1"]));
    for offered in ["h2", "http/1.1"] {
        let answer = relay_tests::https_get(
            relay.addr(),
            &ca.ca_file(),
            &[offered],
            "/hosts/tls-1/echo/x",
            &[("authorization", &bearer), ("x-forwarded-proto", "http")],
        )
        .await
        .unwrap();
        assert_eq!(answer.status, 200, "{answer:?}");
        let echo: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
        assert_eq!(echo["path"], "/echo/x");
        assert_eq!(
            echo["headers"]["x-forwarded-proto"], "https",
            "the relay terminated TLS; a client's value is replaced: {echo}"
        );
        assert_eq!(
            echo["headers"]["x-forwarded-host"],
            relay.addr().to_string(),
            "from `Host`, or HTTP/2's `:authority`: {echo}"
        );
    }
}
