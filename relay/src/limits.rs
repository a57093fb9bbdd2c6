//! Every timeout and limit the relay applies, with its default and the reason for it.
//!
//! The defaults live here as constants so that the whole policy can be read in one
//! place; [`Limits`] carries the values actually in force (each one can be overridden
//! from the command line or the environment, see [`crate::config`]).

use std::time::Duration;

/// How often the relay sends a v1 `ping` on every tunnel.
pub const PING_INTERVAL: Duration = Duration::from_secs(30);

/// Unanswered pings after which a tunnel is declared dead and closed with 1001.
/// Three gives a dead socket ~90 s, below the 75 s + ping interval a host waits on its side.
pub const MAX_MISSED_PONGS: u32 = 3;

/// How long one HTTP exchange may wait for the host's `http:response` before the client
/// gets 504.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);

/// Exchanges that may be in flight on one tunnel at once; one more gets 503 "host
/// overloaded" at once instead of queueing without bound.
pub const MAX_PENDING_EXCHANGES: usize = 1_000;

/// Largest request body the relay accepts from a client. v1 carries bodies inside one
/// JSON frame, so the relay has to buffer them whole.
pub const MAX_BODY_BYTES: usize = 10 * 1024 * 1024;

/// Largest WebSocket message the relay accepts on any socket (tunnel or client channel).
/// Must leave room for a maximal body plus JSON escaping.
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// Capacity of a tunnel's outbound queue (messages waiting to be written to the host).
/// When full, senders wait: that is the backpressure a slow host exerts on its clients.
pub const TUNNEL_QUEUE: usize = 1_024;

/// Frames from the host that may wait for one slow client channel. v1 has no flow
/// control, so a client that falls this far behind is closed (1013) rather than letting
/// it stall every other stream on the tunnel or grow memory without bound.
pub const CHANNEL_QUEUE: usize = 256;

/// Lifetime of a directory entry without a heartbeat. Heartbeats ride on pongs, so the
/// default lets three ping rounds go missing before a host is forgotten.
pub const DIRECTORY_TTL: Duration = Duration::from_secs(90);

/// How often the embedded directory drops expired entries.
pub const DIRECTORY_SWEEP_INTERVAL: Duration = Duration::from_secs(30);

/// Most stale records one sweep removes: bounds how long one sweep holds the embedded
/// directory's lock, or runs as one script in Redis (~1 ms per 1,000 in Redis).
pub const DIRECTORY_SWEEP_BATCH: usize = 1_000;

/// How long the relay waits for a Close frame to be written before giving up on a socket.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a WebSocket close handshake may take on shutdown before the task is abandoned.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Read buffer of every WebSocket. Small, because most tunnels are idle most of the time
/// and the buffer is per socket (see BENCHMARKS.md for the RSS per idle tunnel).
pub const WS_READ_BUFFER: usize = 4 * 1024;

/// Write buffer of every WebSocket: frames are batched up to this size before a write.
pub const WS_WRITE_BUFFER: usize = 8 * 1024;

/// Longest reason text in a WebSocket Close frame (RFC 6455 allows 123 bytes).
pub const MAX_CLOSE_REASON: usize = 123;

/// The limits in force for one relay process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// See [`PING_INTERVAL`].
    pub ping_interval: Duration,
    /// See [`MAX_MISSED_PONGS`].
    pub max_missed_pongs: u32,
    /// See [`EXCHANGE_TIMEOUT`].
    pub exchange_timeout: Duration,
    /// See [`MAX_PENDING_EXCHANGES`].
    pub max_pending: usize,
    /// See [`MAX_BODY_BYTES`].
    pub max_body_bytes: usize,
    /// See [`MAX_FRAME_BYTES`].
    pub max_frame_bytes: usize,
    /// See [`TUNNEL_QUEUE`].
    pub tunnel_queue: usize,
    /// See [`CHANNEL_QUEUE`].
    pub channel_queue: usize,
    /// See [`DIRECTORY_TTL`].
    pub directory_ttl: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            ping_interval: PING_INTERVAL,
            max_missed_pongs: MAX_MISSED_PONGS,
            exchange_timeout: EXCHANGE_TIMEOUT,
            max_pending: MAX_PENDING_EXCHANGES,
            max_body_bytes: MAX_BODY_BYTES,
            max_frame_bytes: MAX_FRAME_BYTES,
            tunnel_queue: TUNNEL_QUEUE,
            channel_queue: CHANNEL_QUEUE,
            directory_ttl: DIRECTORY_TTL,
        }
    }
}

/// Deadline of one directory operation on the request path, so a slow directory degrades
/// to "serve what is local" instead of stalling registrations.
pub const DIRECTORY_TIMEOUT: Duration = Duration::from_secs(2);

/// Backlog of the listening socket: room for a fleet of agents reconnecting at once.
pub const LISTEN_BACKLOG: i32 = 4_096;

/// Hosts re-asserted per directory call by the reconciler: one script call per batch
/// keeps Redis responsive (a batch of 500 runs in ~2 ms) while a machine with 10,000
/// tunnels still heals in 20 calls.
pub const RECONCILE_BATCH: usize = 500;

/// How long a startup clean-up of this machine's stale directory entries may delay
/// binding: best effort, the relay boots without it.
pub const STARTUP_CLEAR_TIMEOUT: Duration = Duration::from_secs(2);

/// Connect deadline towards a peer relay. Peers are on the same private network: a
/// connect that takes longer means the peer is gone, and the request is retried once
/// after a fresh lookup.
pub const PEER_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Extra time a forwarded exchange may take beyond the owner's own exchange timeout, so
/// the owner's 504 (not ours) reaches the client.
pub const PEER_EXCHANGE_MARGIN: Duration = Duration::from_secs(2);

/// At most one log line per operation per this interval for directory errors (they are
/// all counted): a Redis outage must not flood the logs.
pub const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(30);

/// Limits of the Redis directory ([`crate::directory::RedisDirectory`]).
pub mod redis {
    use std::time::Duration;

    /// Key prefix when none is configured. Every key of the directory starts with it, so
    /// several relays (or other applications) can share one Redis with distinct prefixes.
    pub const DEFAULT_PREFIX: &str = "relay:";

    /// Bound on one TCP connect + handshake to Redis. A Redis in the same region answers in
    /// a few milliseconds; a second covers a cross-region hop and TLS, and keeps a dead host
    /// from stalling the operation that triggered the connection.
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

    /// Bound on one request/response on an established connection. Every request is O(1) or
    /// O(entries of one machine) (`clear_owned` of 10,000 entries runs in a few ms), so a
    /// second means Redis or the path to it is in trouble.
    pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);

    /// Retries of a failed connection attempt (after the first), with jittered exponential
    /// backoff from [`RECONNECT_MIN_DELAY`]. Few: the operation waiting on it is on a
    /// request path, and the next operation triggers a new round anyway.
    pub const CONNECT_RETRIES: usize = 2;

    /// First backoff delay between connection attempts.
    pub const RECONNECT_MIN_DELAY: Duration = Duration::from_millis(50);

    /// Longest backoff delay between connection attempts.
    pub const RECONNECT_MAX_DELAY: Duration = Duration::from_millis(500);

    /// Deadline of a whole directory operation (connecting, the retry after a dropped
    /// connection, a script reload after `NOSCRIPT`). Below the relay's own
    /// `DIRECTORY_TIMEOUT` (2 s), so callers see this typed error rather than their own
    /// timeout.
    pub const OP_TIMEOUT: Duration = Duration::from_millis(1_500);

    /// Idle time before the kernel probes the Redis connection, then the interval and count
    /// of unanswered probes before it drops it: an idle connection to a vanished peer is
    /// noticed within ~25 s, not the kernel's default of over two hours.
    pub const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
    /// See [`TCP_KEEPALIVE_IDLE`].
    pub const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
    /// See [`TCP_KEEPALIVE_IDLE`].
    pub const TCP_KEEPALIVE_PROBES: u32 = 3;

    /// How long sent data may stay unacknowledged before the kernel drops the connection
    /// (`TCP_USER_TIMEOUT`, Linux). Response timeouts do not replace a connection, so
    /// without this a black-holed connection (peer gone without a RST) would keep failing
    /// every request for the ~15 minutes of TCP retransmissions.
    pub const TCP_USER_TIMEOUT: Duration = Duration::from_secs(5);
}

// A Redis operation must give up before the caller's own deadline does, so the caller
// sees the typed error.
const _: () = assert!(redis::OP_TIMEOUT.as_millis() < DIRECTORY_TIMEOUT.as_millis());
