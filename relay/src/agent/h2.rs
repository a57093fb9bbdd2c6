//! An `h2` tunnel, the agent's side: an HTTP/2 server in front of the local service, over
//! the tunnel's WebSocket ([`crate::protocol::h2`]); its connections and streams are
//! `super::streams`'s.
//!
//! Each stream the relay opens is one request to the local service, streamed both ways
//! under HTTP/2 flow control: a client that reads slowly slows the local service, and a
//! stream the relay resets (its client went away) drops the upstream request at once. A
//! WebSocket channel is an extended CONNECT (RFC 8441): the agent upgrades a connection
//! to the local service first, answers with its subprotocol (or passes its refusal on),
//! then splices the two byte streams: the relay's frames are client frames, which is what
//! the local service expects, and the service's frames are server frames, which is what
//! the relay expects, so nothing is parsed here and close codes pass through untouched.
//!
//! The control plane (text messages) is v1's: `ping` is answered with `pong`, `drain`
//! starts the move to a new tunnel; once that one is registered (and
//! [`crate::limits::agent::DRAINED_TUNNEL_LINGER`] later) this one says `GOAWAY`, so the
//! relay sends new requests elsewhere while the streams in flight finish.

use std::borrow::Cow;
use std::sync::Arc;

use tokio::time::sleep;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::config::RelayUrl;
use super::streams::Connection;
use super::tunnel::{Alarm, EndCause, Shared, TunnelEnd, Watchdogs};
use crate::limits::agent::CLOSE_GRACE;
use crate::protocol::close_code;
use crate::protocol::h2::{Ended, Gated, Idle, TunnelIo};
use crate::protocol::v1::{Decoded, HostMessage, RelayMessage};

/// Serves an open `h2` tunnel until it ends.
pub(super) async fn serve<S>(
    shared: Arc<Shared>,
    relay: RelayUrl,
    mut watchdogs: Watchdogs,
    socket: S,
    cancel: CancellationToken,
) -> TunnelEnd
where
    S: futures_util::Stream<Item = Result<Message, tungstenite::Error>>
        + futures_util::Sink<Message, Error = tungstenite::Error>
        + Unpin
        + Send
        + 'static,
{
    let (shared_io, control, mut inbox) = TunnelIo::new(socket, || {
        debug!("control messages from the relay arrive faster than they are read; dropped one");
    });
    // The HTTP/2 connection inside the tunnel, while one is up: the relay starts one for
    // its first stream and ends it when idle (see `crate::protocol::h2`).
    let start = || {
        let io = shared_io.start_connection();
        // However hyper ends a connection (the relay's GOAWAY, a protocol error), only the
        // connection ends, with [`crate::protocol::h2::END`]: the relay decides whether
        // the tunnel goes on. Ending the tunnel (shutdown, drain) says so explicitly.
        shared_io.end_on_shutdown();
        Connection::new(io, shared.clone())
    };
    let mut conn = None;
    // Set once this side started to end the tunnel (GOAWAY sent): how it ends then.
    let mut ending: Option<EndCause> = None;
    let shutdown_deadline = sleep(CLOSE_GRACE);
    tokio::pin!(shutdown_deadline);
    // The connection's wake-ups are most of this task's (several per request): the
    // branches that wait for something else are gated, polled again only once woken.
    let cause = loop {
        tokio::select! {
            biased;
            () = Gated::new(Box::pin(cancel.cancelled())), if ending.is_none() => {
                // Ending goes through a connection (started here if none is up), so the
                // relay learns from GOAWAY that no new stream will be taken.
                control.close_on_shutdown(close_code::NORMAL, "agent shutting down");
                if conn.is_none() && !shared_io.between_connections() {
                    // As for a drain, below.
                    control.close(close_code::NORMAL, "agent shutting down");
                } else {
                    conn.get_or_insert_with(start).graceful_shutdown();
                }
                shutdown_deadline
                    .as_mut()
                    .reset(tokio::time::Instant::now() + CLOSE_GRACE);
                ending = Some(EndCause::Shutdown);
            }
            () = &mut shutdown_deadline, if ending == Some(EndCause::Shutdown) => {
                break EndCause::Shutdown;
            }
            result = async { conn.as_mut().expect("polled only when set").await },
                if conn.is_some() =>
            {
                conn = None;
                if ending.is_none() && control.ended().is_none() && shared_io.sent_end() {
                    // The connection ended (the relay's idle GOAWAY); the tunnel goes on,
                    // and the relay's end is read while none is up.
                    continue;
                }
                if let Some(cause) = ending.take() {
                    break cause;
                }
                break end_cause(control.ended(), match result {
                    Ok(()) => "HTTP/2 connection ended".into(),
                    Err(err) => format!("HTTP/2 connection failed: {err}"),
                });
            }
            seen = shared_io.idle(), if conn.is_none() => match seen {
                // The relay's preface: a new connection.
                Idle::Started => conn = Some(start()),
                Idle::PeerEnded => {}
                Idle::Ended => {
                    if let Some(cause) = ending.take() {
                        break cause;
                    }
                    break end_cause(control.ended(), "tunnel WebSocket closed".into());
                }
            },
            text = Gated::new(Box::pin(inbox.recv())) => {
                let Some(text) = text else { continue };
                watchdogs.heard(true);
                match RelayMessage::parse(&text) {
                    Decoded::Message(RelayMessage::Ping) => {
                        control.send_text(HostMessage::Pong.to_json());
                    }
                    Decoded::Message(RelayMessage::Drain { reason }) => {
                        watchdogs.drain(reason.map(Cow::into_owned));
                    }
                    Decoded::Message(_) => debug!("ignored a v1 exchange message on an h2 tunnel"),
                    Decoded::UnknownType(kind) => debug!(%kind, "ignored a message of unknown type"),
                    Decoded::Malformed { reason, .. } => debug!(%reason, "ignored a malformed message"),
                }
            }
            alarm = Gated::new(Box::pin(watchdogs.next_alarm())), if ending.is_none() => match alarm {
                Alarm::Silence(after) => break EndCause::Silence(after),
                Alarm::Finish => {
                    // GOAWAY: the relay routes new requests to the newer tunnel; the
                    // connection ends (Close 1000) once the streams in flight are done.
                    control.close_on_shutdown(close_code::NORMAL, "drained");
                    if conn.is_none() && !shared_io.between_connections() {
                        // No connection up, and the relay's end of the last one is still
                        // on its way (a new one would read it as its own): nothing is in
                        // flight, so the tunnel closes at once.
                        control.close(close_code::NORMAL, "drained");
                    } else {
                        // Started here if none is up.
                        conn.get_or_insert_with(start).graceful_shutdown();
                    }
                    ending = Some(EndCause::Drained);
                }
            },
        }
    };
    debug!(relay = %relay, %cause, "tunnel closed");
    TunnelEnd::Ended {
        registered_for: watchdogs.registered_for(),
        cause,
    }
}

/// Why the tunnel ended, from how its WebSocket did; `otherwise` when it has not (or this
/// side closed it).
fn end_cause(ended: Option<Ended>, otherwise: String) -> EndCause {
    match ended {
        Some(Ended::PeerClosed(frame)) => {
            let (code, reason) = frame.map_or((None, String::new()), |(c, r)| (Some(c), r));
            EndCause::RelayClosed { code, reason }
        }
        Some(Ended::Gone(why)) => EndCause::Transport(why),
        Some(Ended::TooBig) => {
            EndCause::Transport("the relay sent a message over the size limit".into())
        }
        Some(Ended::Closed(_)) | None => EndCause::Transport(otherwise),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use tokio::sync::{mpsc, watch};
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_util::task::TaskTracker;

    use super::*;
    use axum::body::Body;
    use hyper_util::rt::TokioIo;

    use crate::agent::config::{ProtocolChoice, TokenSource, UpstreamUrl};
    use crate::agent::status::StatusHandle;
    use crate::agent::upstream::Upstream;
    use crate::host_id::HostId;
    use crate::tunnel::Protocol;

    type Ws = WebSocketStream<tokio::io::DuplexStream>;
    type RelaySide = TunnelIo<Ws>;

    /// An agent's h2 session over an in-memory WebSocket, its upstream a port nothing
    /// listens on (every exchange is answered 502): the relay's end of the socket, the
    /// session's task and its cancellation.
    async fn agent() -> (Ws, tokio::task::JoinHandle<TunnelEnd>, CancellationToken) {
        agent_silent_after(Duration::from_secs(75)).await
    }

    /// [`agent`], abandoning the tunnel after `silence` without a control message.
    async fn agent_silent_after(
        silence: Duration,
    ) -> (Ws, tokio::task::JoinHandle<TunnelEnd>, CancellationToken) {
        let (a, b) = tokio::io::duplex(1024 * 1024);
        let agent_side = WebSocketStream::from_raw_socket(a, Role::Client, None).await;
        let relay_side = WebSocketStream::from_raw_socket(b, Role::Server, None).await;
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let upstream = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let shared = Arc::new(Shared {
            host_id: HostId::parse("demo").unwrap(),
            token: TokenSource::Inline("t".parse().unwrap()),
            upstream: Arc::new(Upstream::new(UpstreamUrl::parse(&upstream).unwrap())),
            status: StatusHandle::new(HostId::parse("demo").unwrap(), "ws://test"),
            connect_timeout: Duration::from_secs(1),
            silence_timeout: silence,
            tls: None,
            tasks: TaskTracker::new(),
            protocol: ProtocolChoice::H2,
            v1_only: std::sync::Mutex::default(),
            answer_budget: crate::limits::agent::ANSWER_BUDGET,
        });
        let (events, _events_rx) = mpsc::unbounded_channel();
        let (_newest, newest_rx) = watch::channel(0);
        let relay = RelayUrl::parse("ws://test").unwrap();
        let watchdogs = Watchdogs::new(&shared, 1, Protocol::H2, relay.clone(), events, newest_rx);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(serve(shared, relay, watchdogs, agent_side, cancel.clone()));
        (relay_side, task, cancel)
    }

    /// [`agent`] with an HTTP/2 connection up: a plain h2 client on the relay's side.
    async fn session() -> (
        h2::client::SendRequest<Bytes>,
        tokio::task::JoinHandle<TunnelEnd>,
        CancellationToken,
    ) {
        let (relay_side, task, cancel) = agent().await;
        let (io, _control, _inbox) = crate::protocol::h2::WsIo::new(relay_side, || {});
        let (client, conn) = h2::client::handshake(io).await.expect("h2 handshake");
        tokio::spawn(conn);
        (client, task, cancel)
    }

    /// [`agent`] with no HTTP/2 connection yet: the relay's side of the tunnel.
    async fn tunnel() -> (
        RelaySide,
        tokio::task::JoinHandle<TunnelEnd>,
        CancellationToken,
    ) {
        let (relay_side, task, cancel) = agent().await;
        let (io, _control, _inbox) = TunnelIo::new(relay_side, || {});
        (io, task, cancel)
    }

    fn get(path: &str) -> http::Request<()> {
        http::Request::get(format!("http://tunnel{path}"))
            .body(())
            .unwrap()
    }

    #[tokio::test]
    async fn a_silent_relay_is_abandoned_while_streams_keep_the_connection_busy() {
        // The watchdogs' branch is gated (polled only once its timer wakes it): the
        // connection's many wake-ups must not hide that wake-up.
        let silence = Duration::from_millis(300);
        let (relay_side, task, _cancel) = agent_silent_after(silence).await;
        let (io, _control, _inbox) = crate::protocol::h2::WsIo::new(relay_side, || {});
        let (client, conn) = h2::client::handshake(io).await.expect("h2 handshake");
        tokio::spawn(conn);
        let started = tokio::time::Instant::now();
        let busy = tokio::spawn(async move {
            loop {
                let Ok(mut ready) = client.clone().ready().await else {
                    return;
                };
                let Ok((response, _)) = ready.send_request(get("/busy"), true) else {
                    return;
                };
                if response.await.is_err() {
                    return;
                }
            }
        });
        let end = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the silent tunnel was not abandoned")
            .unwrap();
        let took = started.elapsed();
        busy.abort();
        match end {
            TunnelEnd::Ended { cause, .. } => {
                assert_eq!(cause, EndCause::Silence(silence), "ended otherwise");
            }
            other => panic!("ended otherwise: {other:?}"),
        }
        assert!(
            took >= silence,
            "abandoned after {took:?}, before {silence:?}"
        );
    }

    #[tokio::test]
    async fn a_burst_of_streams_the_relay_resets_at_once_does_not_end_the_tunnel() {
        let (mut client, task, cancel) = session().await;
        // 300 requests, each reset as soon as sent: HEADERS and RST_STREAM leave
        // together, so the agent sees them reset before it has accepted them (what a
        // burst of clients going away looks like from the agent).
        for i in 0..300 {
            client = client.ready().await.expect("the tunnel takes streams");
            let (response, _) = client.send_request(get(&format!("/{i}")), true).unwrap();
            drop(response);
        }
        client = client.ready().await.expect("the tunnel takes streams");
        let (response, _) = client.send_request(get("/after"), true).unwrap();
        let response = tokio::time::timeout(Duration::from_secs(10), response)
            .await
            .expect("an answer in time")
            .expect("the tunnel is still up");
        assert_eq!(
            response.status(),
            502,
            "the agent answered (its upstream is down)"
        );
        assert!(!task.is_finished());
        cancel.cancel();
        let _ = task.await;
    }
    /// Starts an HTTP/2 connection on the relay's side of the tunnel, as the relay does:
    /// the sender, and hyper's dispatch task (it ends when the connection stops taking
    /// streams).
    async fn connect(
        relay: &RelaySide,
    ) -> (
        hyper::client::conn::http2::SendRequest<Body>,
        tokio::task::JoinHandle<hyper::Result<()>>,
    ) {
        let io = TokioIo::new(relay.start_connection());
        let executor = crate::protocol::h2::Executor(TaskTracker::new());
        let (client, conn) = hyper::client::conn::http2::Builder::new(executor)
            .handshake::<_, Body>(io)
            .await
            .expect("h2 handshake");
        (client, tokio::spawn(conn))
    }

    #[tokio::test]
    async fn a_connection_the_relay_ends_ends_alone_and_the_next_one_is_served() {
        let (relay, task, cancel) = tunnel().await;
        for round in 0..3 {
            // What the relay does for the first stream after an idle period.
            let (mut client, dispatch) = connect(&relay).await;
            let mut request = http::Request::new(Body::empty());
            *request.uri_mut() = format!("http://tunnel/{round}").parse().unwrap();
            let response =
                tokio::time::timeout(Duration::from_secs(10), client.send_request(request))
                    .await
                    .expect("an answer in time")
                    .expect("the connection is up");
            assert_eq!(response.status(), 502, "the agent answered (upstream down)");
            drop(response);

            // What the relay does when the connection is idle: GOAWAY, then its end.
            relay.end_on_shutdown();
            drop(client);
            dispatch.await.unwrap().unwrap();
            tokio::time::timeout(Duration::from_secs(10), async {
                while !relay.sent_end() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await
            .expect("the relay's end is sent");
            // The agent answers with its own end, and keeps the tunnel.
            let seen = tokio::time::timeout(Duration::from_secs(10), relay.idle())
                .await
                .expect("the agent ends its half");
            assert_eq!(seen, Idle::PeerEnded, "round {round}");
            assert!(relay.between_connections());
            assert!(!task.is_finished(), "the tunnel outlives its connections");
        }
        cancel.cancel();
        let _ = task.await;
    }
    #[tokio::test]
    async fn shutting_down_with_no_connection_up_starts_one_to_say_goaway_and_ends() {
        let (relay, task, cancel) = tunnel().await;
        cancel.cancel();
        // The agent speaks first (its SETTINGS and GOAWAY): the relay takes it up.
        let seen = tokio::time::timeout(Duration::from_secs(10), relay.idle())
            .await
            .expect("the agent starts a connection");
        assert_eq!(seen, Idle::Started);
        let (mut client, dispatch) = connect(&relay).await;
        // GOAWAY: no new stream is taken, and the request comes back unsent.
        let outcome = tokio::time::timeout(Duration::from_secs(10), dispatch)
            .await
            .expect("the agent says GOAWAY")
            .unwrap();
        assert!(outcome.is_ok(), "a graceful GOAWAY: {outcome:?}");
        let mut request = http::Request::new(Body::empty());
        *request.uri_mut() = "http://tunnel/late".parse().unwrap();
        let refused = client.try_send_request(request).await;
        assert!(
            refused.is_err_and(|mut err| err.take_message().is_some()),
            "a request after GOAWAY is handed back, never sent"
        );
        let end = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the tunnel ends")
            .unwrap();
        match end {
            TunnelEnd::Ended { cause, .. } => assert_eq!(cause, EndCause::Shutdown),
            other => panic!("unexpected end {other:?}"),
        }
    }
}
