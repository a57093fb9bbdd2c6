//! What each attack of issue 11 costs the relay, at its default limits: peak RSS (and its
//! growth over the idle relay), and whether another tenant's host kept being served
//! meanwhile. One fresh release relay per attack; the attacker controls its own host
//! (a raw v1 tunnel) and clients; the victim is another host on the same relay, asked
//! every 200 ms.
//!
//! Run with `scripts/bench.sh attacks`. Figures only, no pass/fail; they are recorded in
//! BENCHMARKS.md. `BENCH_ATTACKS` picks some (comma-separated names from the table);
//! `BENCH_RELAY_ENV` (`NAME=value,...`) sets relay settings, e.g. the budgets.

#[allow(
    dead_code,
    reason = "shared with the proxy and tunnels benches, which read parts this one does not"
)]
mod relay_child;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Result;
use futures_util::SinkExt as _;
use relay_child::{RelayChild, token};
use relay_tests::{HttpClient, RawHost, RssSampler, WsClient, msg_id, msg_type};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

const MIB: usize = 1024 * 1024;

/// One attack: its name, what it does, and the run.
struct Attack {
    name: &'static str,
    what: &'static str,
}

const ATTACKS: &[Attack] = &[
    Attack {
        name: "channel-unread",
        what: "a client WebSocket never reads; its host sends 64 frames of 4 MiB",
    },
    Attack {
        name: "tunnel-unread",
        what: "a host stops reading its tunnel; 20 clients send 2 MiB messages for 10 s",
    },
    Attack {
        name: "slow-readers",
        what: "60 clients read a 15 MiB answer at 1 KB/s for 15 s",
    },
    Attack {
        name: "uploads-unanswered",
        what: "150 clients POST 10 MiB each to a host that never answers",
    },
    Attack {
        name: "silent-upgrades",
        what: "2,000 client WebSocket upgrades that then say nothing",
    },
    Attack {
        name: "trickle-uploads",
        what: "1,000 POSTs trickling a byte every 5 s",
    },
    Attack {
        name: "slowloris",
        what: "800 connections sending their head a byte a second, for 25 s",
    },
    Attack {
        name: "hoarded-messages",
        what: "40 v1 hosts of one tenant each send 12 MiB of a 16 MiB message, never the rest, for 10 s",
    },
    Attack {
        name: "h2-client-unread",
        what: "one HTTP/2 client grants 2 GiB windows, asks 150 streams for 1 MiB answers each, and stops reading, for 10 s",
    },
    Attack {
        name: "h2-sponge",
        what: "an h2 agent grants 2 GiB windows and reads nothing; 96 clients upload 4 MiB each, for 10 s",
    },
];

/// The victim: another tenant's host that answers every request, and a prober that asks
/// it every 200 ms.
struct Victim {
    answered: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    tasks: Vec<JoinHandle<()>>,
}

impl Victim {
    async fn start(addr: SocketAddr) -> Victim {
        // Another tenant: its host token has a subject of its own.
        let url = format!(
            "ws://{addr}/tunnel?hostId=victim&token={}",
            relay_child::token_as("host", "bench-victim")
        );
        let mut host = RawHost::connect_url(&url, None).await;
        let serve = tokio::spawn(async move {
            while let Some(msg) = host.try_recv_json(Duration::from_secs(3600)).await {
                if msg_type(&msg) == "http" {
                    host.respond(&msg_id(&msg), 200, json!({}), "ok").await;
                }
            }
        });
        let (answered, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let probe = tokio::spawn({
            let (answered, failed) = (answered.clone(), failed.clone());
            async move {
                let http = HttpClient::new();
                let url = format!("http://{addr}/hosts/victim/probe");
                let bearer = token("client");
                loop {
                    let outcome = http
                        .get(url.clone())
                        .bearer(&bearer)
                        .timeout(Duration::from_secs(5))
                        .try_send()
                        .await;
                    match outcome {
                        Ok(response) if response.status == 200 => &answered,
                        _ => &failed,
                    }
                    .fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        });
        Victim {
            answered,
            failed,
            tasks: vec![serve, probe],
        }
    }

    fn stop(self) -> (usize, usize) {
        for task in &self.tasks {
            task.abort();
        }
        (
            self.answered.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

fn host_url(addr: SocketAddr, host: &str) -> String {
    format!("ws://{addr}/tunnel?hostId={host}&token={}", token("host"))
}

/// A connection whose receive buffer stays small, so what the relay sends it piles up in
/// the relay rather than in the kernel.
async fn small_window(addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    socket.connect(addr).await.expect("connect")
}

/// Runs `name` against `addr`; what it saw, in a few words.
async fn run(name: &str, addr: SocketAddr) -> String {
    let client = token("client");
    match name {
        "channel-unread" => {
            let mut host = RawHost::connect_url(&host_url(addr, "attacker"), None).await;
            let url = format!("ws://{addr}/hosts/attacker/feed");
            let _unread = WsClient::connect_ok(&url, Some(&client)).await;
            let open = host.expect("ws:open").await;
            let frame = "f".repeat(4 * MIB);
            let mut closed = None;
            for _ in 0..64 {
                host.send_json(&json!({"type": "ws:frame", "id": open["id"], "data": frame}))
                    .await;
                if let Some(msg) = host.try_recv_json(Duration::from_millis(1)).await {
                    closed = Some(msg);
                    break;
                }
            }
            match closed {
                // A v1 host gets codes its WebSocket.close() cannot take (1013) as
                // 1000 with the original in `reason` (docs/protocol.md).
                Some(msg) => match msg["reason"].as_str() {
                    Some(reason) => format!("host told ws:close {} ({reason})", msg["code"]),
                    None => format!("host told ws:close {}", msg["code"]),
                },
                None => "never closed".into(),
            }
        }
        "tunnel-unread" => {
            let _stuck = RawHost::connect_url(&host_url(addr, "attacker"), None).await;
            let url = format!("ws://{addr}/hosts/attacker/feed");
            let sent = Arc::new(AtomicUsize::new(0));
            let mut clients = Vec::new();
            for _ in 0..20 {
                let (url, client, sent) = (url.clone(), client.clone(), sent.clone());
                clients.push(tokio::spawn(async move {
                    let Ok(mut ws) = WsClient::connect(&url, Some(&client)).await else {
                        return;
                    };
                    let message = vec![b'm'; 2 * MIB];
                    loop {
                        let send = ws
                            .stream_mut()
                            .send(Message::Binary(message.clone().into()));
                        if send.await.is_err() {
                            return;
                        }
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                }));
            }
            tokio::time::sleep(Duration::from_secs(10)).await;
            for client in clients {
                client.abort();
            }
            format!(
                "{} messages of 2 MiB taken in",
                sent.load(Ordering::Relaxed)
            )
        }
        "slow-readers" => {
            let mut host = RawHost::connect_url(&host_url(addr, "attacker"), None).await;
            let body = "s".repeat(15 * MIB);
            let refused = Arc::new(AtomicUsize::new(0));
            let mut readers = Vec::new();
            for _ in 0..60 {
                let mut stream = small_window(addr).await;
                let head = format!(
                    "GET /hosts/attacker/big HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer {client}\r\n\r\n"
                );
                stream.write_all(head.as_bytes()).await.expect("head");
                let refused = refused.clone();
                readers.push(tokio::spawn(async move {
                    let mut buf = [0u8; 1000];
                    let mut first = true;
                    loop {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if first && buf[..n].starts_with(b"HTTP/1.1 503") {
                                    refused.fetch_add(1, Ordering::Relaxed);
                                    return;
                                }
                                first = false;
                            }
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }));
            }
            let deadline = Instant::now() + Duration::from_secs(15);
            while let Ok(Some(msg)) =
                tokio::time::timeout_at(deadline, host.try_recv_json(Duration::from_secs(3600)))
                    .await
            {
                if msg_type(&msg) == "http" {
                    host.respond(&msg_id(&msg), 200, json!({}), &body).await;
                }
            }
            for reader in readers {
                reader.abort();
            }
            format!(
                "{} of 60 answered 503 (budget)",
                refused.load(Ordering::Relaxed)
            )
        }
        "uploads-unanswered" => {
            let mut host = RawHost::connect_url(&host_url(addr, "attacker"), None).await;
            let seen = tokio::spawn(async move {
                let mut seen = 0;
                while let Some(msg) = host.try_recv_json(Duration::from_secs(20)).await {
                    if msg_type(&msg) == "http" {
                        seen += 1;
                    }
                }
                seen
            });
            let http = HttpClient::new();
            let uploads = (0..150).map(|_| {
                http.request(
                    http::Method::POST,
                    format!("http://{addr}/hosts/attacker/upload"),
                )
                .bearer(&client)
                .body("u".repeat(10 * MIB))
                .timeout(Duration::from_secs(40))
                .try_send()
            });
            let answers = futures_util::future::join_all(uploads).await;
            seen.abort();
            let count = |status: u16| {
                answers
                    .iter()
                    .filter(|a| a.as_ref().is_ok_and(|r| r.status == status))
                    .count()
            };
            format!("{} got 503 (budget), {} got 504", count(503), count(504))
        }
        "silent-upgrades" => {
            let mut host = RawHost::connect_url(&host_url(addr, "attacker"), None).await;
            let opened = tokio::spawn(async move {
                let mut opened = 0;
                while let Some(msg) = host.try_recv_json(Duration::from_secs(5)).await {
                    if msg_type(&msg) == "ws:open" {
                        opened += 1;
                    }
                }
                opened
            });
            let url = format!("ws://{addr}/hosts/attacker/silent");
            let mut held = Vec::new();
            let mut refused = 0;
            for _ in 0..2_000 {
                match WsClient::connect(&url, Some(&client)).await {
                    Ok(ws) => held.push(ws),
                    Err(_) => refused += 1,
                }
            }
            let opened = opened.await.unwrap_or(0);
            format!(
                "{} kept, {refused} refused; the host saw {opened} ws:open",
                held.len()
            )
        }
        "trickle-uploads" => {
            let mut host = RawHost::connect_url(&host_url(addr, "attacker"), None).await;
            let serve = tokio::spawn(async move {
                while let Some(msg) = host.try_recv_json(Duration::from_secs(3600)).await {
                    if msg_type(&msg) == "http" {
                        host.respond(&msg_id(&msg), 200, json!({}), "ok").await;
                    }
                }
            });
            let mut tricklers = Vec::new();
            for _ in 0..1_000 {
                let client = client.clone();
                tricklers.push(tokio::spawn(async move {
                    let Ok(mut stream) = TcpStream::connect(addr).await else {
                        return false;
                    };
                    let head = format!(
                        "POST /hosts/attacker/upload HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer {client}\r\nContent-Length: 1000\r\n\r\n"
                    );
                    if stream.write_all(head.as_bytes()).await.is_err() {
                        return false;
                    }
                    let mut buf = [0u8; 64];
                    for _ in 0..6 {
                        tokio::select! {
                            read = stream.read(&mut buf) => {
                                return matches!(read, Ok(n) if n > 0 && buf.starts_with(b"HTTP/1.1 408"));
                            }
                            () = tokio::time::sleep(Duration::from_secs(5)) => {
                                if stream.write_all(b"t").await.is_err() {
                                    return false;
                                }
                            }
                        }
                    }
                    false
                }));
            }
            // Meanwhile the attacker's own host still serves a whole request.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let direct = HttpClient::new()
                .get(format!("http://{addr}/hosts/attacker/ok"))
                .bearer(&client)
                .timeout(Duration::from_secs(5))
                .try_send()
                .await;
            let mut cut = 0;
            for trickler in tricklers {
                cut += usize::from(trickler.await.unwrap_or(false));
            }
            // Before the relay stops: the host would take the end of its tunnel for a
            // failure (and say so, panicking in its task).
            serve.abort();
            format!(
                "{cut} of 1000 cut with 408; a whole request meanwhile: {}",
                direct.map_or_else(|e| e, |r| r.status.to_string())
            )
        }
        "hoarded-messages" => {
            let mut writers = Vec::new();
            for n in 0..40 {
                let mut host =
                    RawHost::connect_url(&host_url(addr, &format!("attacker-{n}")), None).await;
                writers.push(tokio::spawn(async move {
                    let tokio_tungstenite::MaybeTlsStream::Plain(tcp) =
                        host.ws_mut().stream_mut().get_mut()
                    else {
                        return;
                    };
                    // A text message announced at 16 MiB (the frame limit), masked with a
                    // zero key as a host's must be; 12 MiB of it, then nothing.
                    let head = relay_tests::ws::masked_frame_head(true, 16 * MIB as u64);
                    let _ = tcp.write_all(&head).await;
                    let _ = tcp.write_all(&vec![b' '; 12 * MIB]).await;
                    std::future::pending::<()>().await;
                }));
            }
            tokio::time::sleep(Duration::from_secs(10)).await;
            for writer in writers {
                writer.abort();
            }
            "held them, charged".into()
        }
        "h2-client-unread" => {
            let mut host = RawHost::connect_url(&host_url(addr, "attacker"), None).await;
            let answers = tokio::spawn(async move {
                let body = "a".repeat(MIB);
                let mut answered = 0;
                while let Some(msg) = host.try_recv_json(Duration::from_secs(12)).await {
                    if msg_type(&msg) == "http" {
                        host.respond(&msg_id(&msg), 200, json!({}), &body).await;
                        answered += 1;
                    }
                }
                answered
            });
            let Ok(tcp) = TcpStream::connect(addr).await else {
                return "could not connect".into();
            };
            let (io, stall) = relay_tests::StallingReads::new(tcp);
            let bearer = format!("Bearer {client}");
            let Ok((client, connection)) = h2::client::Builder::new()
                .initial_window_size(0x7fff_ffff)
                .initial_connection_window_size(0x7fff_ffff)
                .handshake::<_, bytes::Bytes>(io)
                .await
            else {
                return "no HTTP/2 handshake".into();
            };
            let connection = tokio::spawn(connection);
            let mut statuses = Vec::new();
            if let Ok(mut client) = client.ready().await {
                for _ in 0..150 {
                    let request = http::Request::get(format!("http://{addr}/hosts/attacker/big"))
                        .header("authorization", bearer.as_str())
                        .body(())
                        .expect("a request");
                    let Ok((response, _)) = client.send_request(request, true) else {
                        break;
                    };
                    statuses.push(response);
                    match client.ready().await {
                        Ok(ready) => client = ready,
                        Err(_) => break,
                    }
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            stall.stall();
            tokio::time::sleep(Duration::from_secs(9)).await;
            connection.abort();
            let answered = answers.await.unwrap_or(0);
            format!(
                "{} streams opened, the host answered {answered}",
                statuses.len()
            )
        }
        "h2-sponge" => {
            let url = format!("ws://{addr}/tunnel?hostId=attacker");
            let mut agent = relay_tests::raw_h2::agent(&url, &token("host")).await;
            agent
                .send(Message::Binary(relay_tests::raw_h2::huge_windows().into()))
                .await
                .expect("the windows go out");
            // Registered once the relay answers anything on the tunnel.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let taken = Arc::new(AtomicUsize::new(0));
            let mut uploads = Vec::new();
            for _ in 0..96 {
                let (client, taken) = (client.clone(), taken.clone());
                uploads.push(tokio::spawn(async move {
                    let Ok(mut stream) = TcpStream::connect(addr).await else {
                        return;
                    };
                    let body = 4 * MIB;
                    let head = format!(
                        "POST /hosts/attacker/upload HTTP/1.1\r\nHost: relay\r\n\
                         Authorization: Bearer {client}\r\nContent-Length: {body}\r\n\r\n"
                    );
                    if stream.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    let chunk = vec![b'u'; 64 * 1024];
                    for _ in 0..body / chunk.len() {
                        if stream.write_all(&chunk).await.is_err() {
                            return;
                        }
                        taken.fetch_add(chunk.len(), Ordering::Relaxed);
                    }
                    std::future::pending::<()>().await;
                }));
            }
            tokio::time::sleep(Duration::from_secs(10)).await;
            for upload in uploads {
                upload.abort();
            }
            drop(agent);
            format!(
                "{} MiB of 384 MiB taken in (relay and socket buffers)",
                taken.load(Ordering::Relaxed) / MIB
            )
        }
        "slowloris" => {
            let mut streams = Vec::new();
            for _ in 0..800 {
                if let Ok(stream) = TcpStream::connect(addr).await {
                    streams.push(stream);
                }
            }
            let head = b"GET /health HTTP/1.1\r\nHost: relay\r\nX-Padding: slowloris-slowloris-slowloris\r\n\r\n";
            for byte in head.iter().take(25) {
                for stream in &mut streams {
                    let _ = stream.write_all(&[*byte]).await;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            let mut closed = 0;
            for stream in &mut streams {
                let mut buf = [0u8; 64];
                if let Ok(Ok(0) | Err(_)) =
                    tokio::time::timeout(Duration::from_millis(10), stream.read(&mut buf)).await
                {
                    closed += 1;
                }
            }
            format!("{closed} of {} closed by the relay", streams.len())
        }
        other => format!("unknown attack {other}"),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    match bench().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("attacks bench failed: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn bench() -> Result<()> {
    let binary = relay_tests::release_relay_binary("scripts/bench.sh attacks")?;
    let only = std::env::var("BENCH_ATTACKS").ok();
    // `BENCH_RELAY_ENV="RELAY_TUNNEL_BUDGET=33554432,..."`: settings for every relay.
    let extra_env: Vec<(String, String)> = std::env::var("BENCH_RELAY_ENV")
        .unwrap_or_default()
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    println!("| attack | what the relay did | peak RSS | growth | victim answered / failed |");
    println!("|---|---|---|---|---|");
    for attack in ATTACKS {
        if only
            .as_deref()
            .is_some_and(|only| !only.split(',').any(|n| n == attack.name))
        {
            continue;
        }
        // (The per-address limits are lifted by `RelayChild`: one address plays every
        // client here.)
        let env: Vec<(&str, &str)> = extra_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let relay = RelayChild::start_with(&binary, &env).await?;
        let sampler = RssSampler::start(relay.pid());
        let victim = Victim::start(relay.addr).await;
        let started = Instant::now();
        let outcome = run(attack.name, relay.addr).await;
        let took = started.elapsed();
        let (answered, failed) = victim.stop();
        let samples = sampler.finish();
        println!(
            "| {} ({}) | {outcome} ({:.0} s) | {:.0} MiB | +{:.0} MiB | {answered} / {failed} |",
            attack.name,
            attack.what,
            took.as_secs_f64(),
            samples.max_kib() as f64 / 1024.0,
            (samples.max_kib() - samples.first_kib()) as f64 / 1024.0,
        );
        relay.stop().await;
    }
    Ok(())
}
