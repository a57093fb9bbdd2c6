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

/// Frames from the host that may wait for one client channel (v1 tunnels): 4,096. v1 has
/// no flow control, so a client that falls this far behind is closed (1013) rather than
/// letting it stall every other stream on the tunnel or grow memory without bound. The
/// bound that matters is [`CHANNEL_QUEUE_BYTES`]; this one only caps the per-frame
/// overhead of floods of tiny frames, and is high enough that a burst a reading client
/// keeps up with never hits it (256 closed one after 326 of 1,000 tiny frames).
pub const CHANNEL_QUEUE: usize = 4_096;

/// Bytes of host frames that may wait for one client channel (v1 tunnels): 1 MiB, each
/// frame counted with [`QUEUED_FRAME_OVERHEAD`]. A client that falls this far behind is
/// closed (1013); a single larger frame still goes to an empty queue. So a channel whose
/// client stops reading costs the relay at most 1 MiB + 4,096 × 64 B ≈ 1.25 MiB, or one
/// frame, and a healthy client absorbs bursts of that size.
pub const CHANNEL_QUEUE_BYTES: usize = 1024 * 1024;

/// What a queued frame costs besides its payload, in [`CHANNEL_QUEUE_BYTES`]: its slot
/// and allocation, so a flood of empty frames is bounded too.
pub const QUEUED_FRAME_OVERHEAD: usize = 64;

/// A client's request body may arrive slower than [`MIN_UPLOAD_RATE`] for this long in
/// all before it is cut: 10 s, so a client that pauses (a phone between cells, a user
/// picking the next file) is not, while one trickling a byte every few seconds holds
/// its connection, stream and buffered bytes for seconds, not for ever.
/// `--upload-grace`.
pub const UPLOAD_GRACE: Duration = Duration::from_secs(10);

/// Slowest average a client's request body may arrive at, past [`UPLOAD_GRACE`]: 8 KiB
/// a second (a 64 kbit/s link; a 10 MiB body in 21 minutes). A body that falls behind
/// is cut: 408 before the host saw anything (v1 reads it whole first), a reset stream on
/// `h2`. Only time spent waiting for the client counts, not time the host's side takes
/// to read. `--min-upload-rate` (0: off).
pub const MIN_UPLOAD_RATE: u64 = 8 * 1024;

/// Bytes one tunnel's buffers may hold in the relay at once (see [`crate::budget`]). v1:
/// request bodies read and waiting to be written to the host, the host's answers until
/// their clients have them, and WebSocket frames queued either way. `h2`: bytes handed
/// to HTTP/2 to send that the tunnel's socket has not taken, and channel messages being
/// read whole. 64 MiB: six maximal v1 bodies at once, which no host carrying ordinary
/// traffic reaches, and eight times an `h2` connection's window, while one tenant that
/// uploads, answers or floods without end holds no more than this, and the others go
/// on. Over it a v1 request gets 503, a channel is closed (1013), and an `h2` sender
/// waits. `--tunnel-budget`.
pub const TUNNEL_BUDGET: usize = 64 * 1024 * 1024;

/// What a v1 tunnel may have read towards a message not yet whole before the rest is
/// charged against its tenant's and the process's byte budgets: 64 KiB. A v1 message carries a whole body (up to
/// ~13.4 MiB once base64-encoded) and the WebSocket codec holds it all before the relay
/// sees any of it, so a host that starts large messages and never ends them would hold
/// that much per tunnel, uncounted. Most messages are far smaller and are never charged;
/// past the allowance a read there is no room for makes the next wait (the tunnel slows
/// down, nothing is lost). See [`crate::connections::ReadCharge`].
pub const TUNNEL_READ_ALLOWANCE: usize = 64 * 1024;

/// How long the allocator keeps pages freed by the program before it gives them back
/// to the system: 1 s. Long enough that a busy relay reuses what it has just freed
/// without a round trip through the kernel; short enough that the ~60 KiB per tunnel of
/// a burst (a deploy moving a thousand tunnels, each carrying requests, whose HTTP/2
/// connections then end together) leaves within seconds instead of staying as the
/// relay's footprint (BENCHMARKS.md, run 12). Operators may replace every allocator
/// setting: [`crate::allocator::OPERATOR_SETTINGS`].
pub const ALLOCATOR_DECAY: Duration = Duration::from_secs(1);

/// Share of the machine's memory the relay may hold in peers' buffers, when
/// [`memory_budget`] derives it: a half, leaving the rest for the process itself (an
/// idle tunnel's ~20 KiB, socket buffers, the allocator's slack).
pub const MEMORY_SHARE: f64 = 0.5;

/// Bytes all tunnels' buffers together may hold ([`crate::budget`]): the configured
/// value, or [`MEMORY_SHARE`] of the machine's memory (the cgroup's limit when there
/// is one, else the memory the kernel reports): 256 MiB on Fly's 512 MB machine.
/// `--memory-budget` sets it (0: this).
pub fn memory_budget(configured: usize) -> usize {
    if configured > 0 {
        return configured;
    }
    let memory = machine_memory().unwrap_or(512 * 1024 * 1024);
    ((memory as f64) * MEMORY_SHARE) as usize
}

/// Share of [`memory_budget`] one tenant's tunnels may hold together, by default: a half.
/// A tenant (the subject of the host tokens its agents register with) may open many
/// tunnels, each within [`TUNNEL_BUDGET`]; together they could fill the relay for every
/// other tenant. Half leaves the other half to the others whatever one tenant does,
/// while a tenant with many busy hosts still has room for several tunnels' worth.
pub const TENANT_SHARE: f64 = 0.5;

/// Bytes the tunnels of one tenant may hold together: the configured value, or
/// [`TENANT_SHARE`] of `memory_budget`, and never less than one tunnel's `tunnel_budget`
/// (a tenant with one tunnel is limited by that alone). `--tenant-budget` (0: this).
pub fn tenant_budget(configured: usize, memory_budget: usize, tunnel_budget: usize) -> usize {
    if configured > 0 {
        return configured;
    }
    (((memory_budget as f64) * TENANT_SHARE) as usize).max(tunnel_budget)
}

/// The memory this process may use: its cgroup's limit (v2, then v1), or the machine's.
fn machine_memory() -> Option<usize> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let cgroup = read("/sys/fs/cgroup/memory.max")
        .or_else(|| read("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
        .and_then(|limit| limit.trim().parse::<usize>().ok());
    let total = read("/proc/meminfo").and_then(|info| {
        let line = info.lines().find(|line| line.starts_with("MemTotal:"))?;
        let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    });
    match (cgroup, total) {
        // cgroup v1 reports "no limit" as a huge number.
        (Some(limit), Some(total)) => Some(limit.min(total)),
        (limit, total) => limit.or(total),
    }
}

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

/// Read buffer of every WebSocket, the agent's tunnel included. Small, because most
/// tunnels are idle most of the time and the buffer is per socket (see BENCHMARKS.md for
/// the RSS per idle tunnel), and because tungstenite zero-fills this much before every
/// read, including each one that finds nothing. Tunnels are read ahead of it
/// ([`TUNNEL_READ_AHEAD`]), so it does not limit how much one system call takes.
pub const WS_READ_BUFFER: usize = 4 * 1024;

/// Charged for each chunk of a body handed to a buffering sender (an `h2` tunnel's
/// HTTP/2, an HTTP/2 client's connection) before the chunk is even read: 16 KiB, the size
/// of most chunks of a client's body (hyper reads 8–16 KiB at a time until a transfer
/// runs fast), so that while a budget is full nothing more is read from the producer at
/// all. The rest of a larger chunk is charged once it is read. See [`crate::body::Indebted`].
pub const DEBT_PREPAID: usize = 16 * 1024;

/// Responses to an HTTP/2 client this small (of a known length) are not charged as they
/// are handed to hyper: `/health`, errors and small answers are written at once even
/// while the process's budget is full. 64 KiB: what a handful of frames carry. See
/// [`crate::connections::SendDebt`].
pub const UNCHARGED_RESPONSE: u64 = 64 * 1024;

/// Most a tunnel's socket is read at once, ahead of its codec, by the relay and by the
/// agent: 64 KiB. The codec's own read buffer ([`WS_READ_BUFFER`]) is kept small for idle
/// tunnels, and it is also the most it reads per system call: a bulk transfer would cost
/// a system call per 4 KiB. Read ahead into a buffer that is given back once the codec
/// has taken it, a busy tunnel reads 64 KiB per call and an idle one holds nothing. See
/// [`crate::websocket::ReadAhead`].
pub const TUNNEL_READ_AHEAD: usize = 64 * 1024;

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
    /// See [`CHANNEL_QUEUE_BYTES`].
    pub channel_queue_bytes: usize,
    /// See [`DIRECTORY_TTL`].
    pub directory_ttl: Duration,
    /// See [`h2::IDLE_CONNECTION`].
    pub h2_idle_connection: Duration,
    /// See [`HEADER_READ_TIMEOUT`].
    pub header_read_timeout: Duration,
    /// See [`max_connections`]; 0 derives it from the open file limit.
    pub max_connections: usize,
    /// See [`WRITE_TIMEOUT`].
    pub write_timeout: Duration,
    /// See [`TUNNEL_BUDGET`].
    pub tunnel_budget: usize,
    /// See [`MAX_CONNECTIONS_PER_IP`]; 0: no limit (forced when a client-IP header is
    /// configured).
    pub max_connections_per_ip: usize,
    /// See [`MAX_CHANNELS`].
    pub max_channels: usize,
    /// See [`MAX_CHANNELS_PER_CLIENT`]; 0: no limit.
    pub max_channels_per_client: usize,
    /// See [`UPLOAD_GRACE`].
    pub upload_grace: Duration,
    /// See [`MIN_UPLOAD_RATE`].
    pub min_upload_rate: u64,
    /// See [`memory_budget`]; 0 derives it from the machine's memory.
    pub memory_budget: usize,
    /// See [`tenant_budget`]; 0 derives it from the memory budget.
    pub tenant_budget: usize,
    /// See [`v2::DIAL_TIMEOUT`].
    pub dial_timeout: Duration,
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
            channel_queue_bytes: CHANNEL_QUEUE_BYTES,
            directory_ttl: DIRECTORY_TTL,
            h2_idle_connection: h2::IDLE_CONNECTION,
            header_read_timeout: HEADER_READ_TIMEOUT,
            max_connections: 0,
            write_timeout: WRITE_TIMEOUT,
            tunnel_budget: TUNNEL_BUDGET,
            max_connections_per_ip: MAX_CONNECTIONS_PER_IP,
            max_channels: MAX_CHANNELS,
            max_channels_per_client: MAX_CHANNELS_PER_CLIENT,
            upload_grace: UPLOAD_GRACE,
            min_upload_rate: MIN_UPLOAD_RATE,
            memory_budget: 0,
            tenant_budget: 0,
            dial_timeout: v2::DIAL_TIMEOUT,
        }
    }
}

/// The access check (`--access-check-url`).
pub mod access {
    use std::time::Duration;

    /// How long an "allowed" answer is trusted: 15 min (superset's relay's figure), so
    /// a revoked member loses a host within minutes at one API call per user and host.
    pub const ALLOWED_FOR: Duration = Duration::from_secs(15 * 60);

    /// How long a "denied" answer is trusted: 30 s, so a member just added gets in
    /// soon, while a client retrying in a loop costs the API one call per 30 s.
    pub const DENIED_FOR: Duration = Duration::from_secs(30);

    /// Answers remembered, least recently used dropped first: 10,000 (~200 B each).
    pub const CACHE_ENTRIES: usize = 10_000;

    /// How long one check may take before the request gets 503: 5 s.
    pub const TIMEOUT: Duration = Duration::from_secs(5);

    /// Largest answer read: 64 KiB.
    pub const MAX_ANSWER_BYTES: usize = 64 * 1024;
}

/// The identity provider's key set (`--jwks-url`).
pub mod jwks {
    use std::time::Duration;

    /// How long one fetch of the key set may take: 5 s. A token with a key the relay
    /// does not know yet waits for it, so this is also the longest such a request waits.
    pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

    /// Largest key set accepted: 1 MiB (real ones are a few KiB; a provider answering
    /// with something endless must not fill the relay).
    pub const MAX_BYTES: usize = 1024 * 1024;

    /// The key set is fetched again this long after the last success: 10 min, so keys a
    /// provider withdraws stop working within minutes, at one request per relay.
    pub const REFRESH_INTERVAL: Duration = Duration::from_secs(10 * 60);

    /// At most one fetch in this long, whatever asks for it (a token naming an unknown
    /// key, a failed fetch being retried): 5 s, so tokens with made-up key ids cannot
    /// turn the relay into a flood of requests to the provider, while a rotated key is
    /// picked up within seconds.
    pub const MIN_REFETCH_INTERVAL: Duration = Duration::from_secs(5);
}

/// Flow control and buffers of `h2` tunnels (HTTP/2 inside the tunnel), on both sides:
/// the relay is the HTTP/2 client, the agent the server, and each advertises these for
/// what it receives.
///
/// Memory: what one side holds for a tunnel is bounded by the windows it advertises
/// (data the peer may send before it is read) plus its send buffers. A client that stops
/// reading a download stops the agent after [`h2::STREAM_WINDOW`] (and the relay's
/// socket buffers); every stream of a tunnel together stops at
/// [`h2::CONNECTION_WINDOW`]. Throughput of one stream is at most its window per round
/// trip between relay and agent.
pub mod h2 {
    use std::time::Duration;

    /// How much of one body the peer may send before it is read: 1 MiB. That is what a
    /// slow client of a download (or a slow local service of an upload) can cost on each
    /// side, and it lets one stream move 10 MB/s over a 100 ms relay–agent round trip
    /// (hyper's own default is 2 MiB; HTTP/2's 64 KiB would cap it at 0.6 MB/s).
    pub const STREAM_WINDOW: u32 = 1024 * 1024;

    /// How much of all bodies of one tunnel together the peer may send before they are
    /// read: 8 MiB, so a few slow streams never stall the others (each has its own
    /// window inside it), while a tunnel of hundreds of stalled streams still costs at
    /// most 8 MiB.
    pub const CONNECTION_WINDOW: u32 = 8 * 1024 * 1024;

    /// Least receive window the relay grants an HTTP/2 connection inside a tunnel: 64 KiB,
    /// HTTP/2's own initial window. The relay reserves a connection's window against the
    /// process's byte budget while the connection is up (what the agent may send unread
    /// is memory; one window is well inside a tunnel's own budget), halving from
    /// [`CONNECTION_WINDOW`] while it has no room; this much is granted even then, the fixed cost of a connection like its
    /// codec buffers, so a busy relay slows new connections down rather than refusing
    /// them.
    pub const MIN_CONNECTION_WINDOW: u32 = 64 * 1024;

    /// Largest HTTP/2 frame the peer may send: 64 KiB rather than HTTP/2's 16 KiB, so a
    /// bulk transfer costs a quarter of the frames, while one frame still holds the
    /// tunnel for well under a millisecond at the speeds it runs.
    pub const MAX_FRAME: u32 = 64 * 1024;

    /// Largest header block (request or response head, decoded) accepted: 64 KiB. hyper's
    /// default (16 KiB) refuses some real applications' cookies; more is a memory lever
    /// for a hostile peer.
    pub const MAX_HEADER_LIST: u32 = 64 * 1024;

    /// Body bytes buffered per stream on the sending side before the peer's window lets
    /// them out: 1 MiB (hyper's default), so a fast producer waits instead of queueing.
    pub const MAX_SEND_BUFFER: usize = 1024 * 1024;

    /// Streams the agent accepts at once: every exchange the relay may have in flight
    /// plus every channel the agent accepts, so the agent's limit never refuses what the
    /// relay's admitted.
    pub const MAX_CONCURRENT_STREAMS: u32 =
        (super::MAX_PENDING_EXCHANGES + super::agent::MAX_CHANNELS) as u32;

    /// Streams the relay opens on a new connection before the agent's SETTINGS say how
    /// many it takes ([`MAX_CONCURRENT_STREAMS`]): 100, hyper's default and the floor
    /// RFC 9113 §6.5.2 recommends a peer allow. More wait in `h2`'s queue meanwhile.
    pub const INITIAL_MAX_SEND_STREAMS: usize = 100;

    /// Streams the relay may reset before the agent has picked them up, before the agent
    /// ends the tunnel (`ENHANCE_YOUR_CALM`). The relay resets a stream for every client
    /// that goes away before its answer, so a burst of clients leaving at once (a load
    /// balancer closing connections, a benchmark ending) resets hundreds together; h2's
    /// default of 20, a guard against rapid-reset attacks by untrusted clients, would end
    /// the whole tunnel. The relay never has more than [`super::MAX_PENDING_EXCHANGES`]
    /// exchanges in flight on a tunnel, so that bounds it too.
    pub const MAX_PENDING_ACCEPT_RESETS: usize = super::MAX_PENDING_EXCHANGES;

    /// Most HTTP/2 bytes sent as one binary WebSocket message: one largest frame
    /// ([`MAX_FRAME`] and its 9-byte header) and 1 KiB for the small frames written
    /// before it. `h2` hands over frames as it encodes them; they are gathered up to this
    /// size (or until it flushes) so that a bulk transfer costs one WebSocket message per
    /// HTTP/2 frame, while a single small response still leaves at once. (At exactly
    /// 64 KiB, every full DATA frame left as two messages, the second of 9 bytes: a
    /// system call more per 64 KiB each way; BENCHMARKS.md, run 11.)
    pub const MAX_MESSAGE: usize = MAX_FRAME as usize + 9 + 1024;

    /// Text messages that may wait to be sent, or to be read by the tunnel's task. The
    /// control plane is a ping every 30 s, its pong and one drain: a peer that floods text
    /// messages has the excess dropped (and counted), never queued without bound.
    pub const CONTROL_QUEUE: usize = 64;

    /// From the start of its close handshake (its Close frame queued), how long a side
    /// waits for the frame to leave and the peer's Close to come back before ending the
    /// byte stream anyway: long enough for the peer to read the code rather than a reset,
    /// short enough that a peer that reads nothing cannot hold the socket.
    pub const CLOSE_WAIT: Duration = Duration::from_secs(1);

    /// Largest WebSocket message on an `h2` tunnel: 128 KiB. Both sides send at most
    /// [`MAX_MESSAGE`] (a little over 64 KiB) per message; twice 64 KiB leaves room, and
    /// it is all a message being assembled can make the relay hold per tunnel, uncounted
    /// (the WebSocket codec holds a message whole before HTTP/2 sees any of it).
    pub const MAX_TUNNEL_MESSAGE: usize = 128 * 1024;

    /// How long an HTTP/2 connection inside a tunnel may carry no stream before the
    /// relay ends it (the tunnel stays; see [`crate::protocol::h2`]): 15 s. An open
    /// connection holds ~40 KiB of hyper's and h2's buffers per tunnel on each side
    /// whether it carries streams or not, and a fleet is mostly idle tunnels. Starting the
    /// next one costs a preface and two SETTINGS frames and no round trip, so even a
    /// host asked once every 20 s pays nothing a client can see; 15 s keeps a host that
    /// is in use (a page load, a burst of API calls) on one connection.
    /// `--h2-idle-connection`.
    pub const IDLE_CONNECTION: Duration = Duration::from_secs(15);

    /// Bound on writing the HTTP/2 preface of a new connection into a tunnel: 5 s. A
    /// tunnel whose socket cannot take 100 bytes in that time is dead, and the stream
    /// that asked for the connection fails instead of waiting for the ping timeout.
    pub const START_TIMEOUT: Duration = Duration::from_secs(5);
}

/// Superset's dial-back tunnels ("v2", [`crate::protocol::v2`]).
///
/// A v2 host is stale (closed 4408) after `ping_interval` × `max_missed_pongs` without a
/// message on its control channel: 90 s by default, the three missed 30 s keepalives of
/// superset's own relay. The HTTP exchange over a dial is bounded by `exchange_timeout`
/// (30 s, superset's too).
pub mod v2 {
    use std::time::Duration;

    /// How long a stream waits for the host to dial back before it fails (504): 10 s,
    /// superset's `DIAL_TIMEOUT_MS`. `--dial-timeout`.
    pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

    /// Largest message on a control channel: 64 KiB. The host only ever sends
    /// `{"type":"ping"}`; anything bigger is not a v2 host.
    pub const MAX_CONTROL_MESSAGE: usize = 64 * 1024;

    /// Dial messages that may wait to be written to one control channel: a burst of
    /// this many streams opening at once is queued, more fail at once (503) instead of
    /// queueing without bound behind a host that stopped reading.
    pub const CONTROL_QUEUE: usize = 1_024;

    /// Most hostIds one `GET /presence` may ask about: 50, as superset's relay.
    pub const MAX_PRESENCE_HOSTS: usize = 50;
}

/// How long a request for a *moving* host (its relay let it go while draining; see
/// `crate::ownership::retire`) waits for the host to register again before it is
/// answered 503: 5 s. Superset's v2 hosts reconnect within 1-5 s of their control channel
/// closing; v1 and `h2` agents that ignored the drain message come back as fast.
pub const HOLD_FOR_MOVING_HOST: Duration = Duration::from_secs(5);

/// How long a draining relay's mark that a host is moving lives in the directory: 10 s,
/// a host's reconnect plus a request's whole hold. Past it a request for a host that
/// never came back is answered 503 at once, as for any unknown host.
pub const MOVING_MARK_TTL: Duration = Duration::from_secs(10);

/// Requests one relay holds at once for moving hosts: 1,024. Each holds a task and its
/// unread request (a few KiB); past this, a request for a moving host gets 503 at once.
pub const MAX_HELD_REQUESTS: usize = 1_024;

/// How long the directory remembers when a host was last seen (`GET /presence`'s
/// `lastSeenAt`): 30 days. One small key per host that registered in that time.
pub const SEEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// How often a held request looks for its host again (the local registry, then the
/// directory): 100 ms, so a host is used within a tenth of a second of registering.
pub const HOLD_POLL: Duration = Duration::from_millis(100);

/// How long a client connection may take to send a whole request head once the relay
/// is ready for one: 20 s. Also how long an idle keep-alive connection is kept (hyper
/// times the wait for the next head the same way). Far longer than any real client
/// needs on a slow link, short enough that a slowloris client (a byte a second) or a
/// socket that connects and says nothing holds its descriptor for seconds, not forever.
/// An HTTP/2 client connection is pinged this often, and closed when a ping goes
/// unanswered this long. `--header-read-timeout`.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(20);

/// How often the TLS certificate and key files (`--tls-cert`, `--tls-key`) are read
/// again to see whether they changed: 2 s. Two small files; a renewed certificate is
/// served seconds after certbot or a secret mount writes it, with no inotify (which
/// misses the symlink swaps of mounted secrets) and no restart.
pub const TLS_RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// How long a write to any peer (a client, a client's WebSocket, a host's tunnel) may
/// make no progress before the connection is dropped: 30 s. A peer that stops reading
/// would otherwise hold what the relay has for it (a buffered response, queued frames)
/// and its descriptor for ever, and a tunnel whose socket takes no bytes is dead whether
/// or not its pongs are due yet (the ping check alone takes 90 s). A slow reader that
/// keeps reading, however slowly, is not cut; the byte budgets bound what it can hold.
/// 30 s is the exchange timeout: no answer a client waits for outlives it anyway.
/// `--write-timeout`.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// File descriptors kept free below the open file limit when deriving
/// [`max_connections`]: 256, for Redis, peer relays, the listener's own accepts and the
/// log, so that a flood of connections is refused at the limit instead of starving them.
pub const FD_RESERVE: usize = 256;

/// Connections one client IP may hold at once: 1,000, a tenth of [`MAX_CONNECTIONS`],
/// so one address cannot take every connection of the relay, while an office or a
/// carrier NAT with hundreds of users (or a fleet of agents behind one address) fits.
/// Counted at accept from the socket's address, so only when no client-IP header is
/// configured: behind a proxy every connection comes from the proxy.
/// `--max-connections-per-ip` (0: no limit).
pub const MAX_CONNECTIONS_PER_IP: usize = 1_000;

/// WebSocket channels one tunnel carries at once: 1,024. Each holds a client socket and,
/// at the host, a local one; past this a new channel is refused (503) before the
/// client's upgrade, instead of silent upgrades piling up at the host (whose agent
/// refuses past 4,096 anyway). `--max-channels`.
pub const MAX_CHANNELS: usize = 1_024;

/// WebSocket channels one client IP may hold open at once, over all hosts: 256. Past it
/// the upgrade is refused with 429. `--max-channels-per-client` (0: no limit).
pub const MAX_CHANNELS_PER_CLIENT: usize = 256;

/// Refused tunnel registrations (bad token, bad hostId) per client IP and second, and
/// the burst: 10 and 50. A refusal within the rate gets the whole answer (an upgrade,
/// then close 1008 with the reason, which agents read); past it, a bare 429 that costs
/// the relay no upgrade and no log line. An agent with a bad token retries far slower.
pub const REFUSALS_PER_IP: u32 = 10;
/// See [`REFUSALS_PER_IP`].
pub const REFUSALS_BURST: u32 = 50;

/// Pause after a failed accept (out of file descriptors, most often): 50 ms, so the
/// accept loop does not spin while connections end and free descriptors.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Default ceiling of [`max_connections`]: 10,000. An idle tunnel costs the relay
/// 15–24 KiB plus a few KiB of kernel socket memory (BENCHMARKS.md), so 10,000 take
/// ~300 MB, which a 512 MB machine holds with room for traffic; Fly's proxy is set to
/// send new connections elsewhere at 8,000 (fly.toml) before this is reached.
pub const MAX_CONNECTIONS: usize = 10_000;

/// Connections (tunnels, client connections, channels) the relay holds at once:
/// [`MAX_CONNECTIONS`], or what the open file limit allows less [`FD_RESERVE`] when that
/// is lower (at least 64). Over it a new connection is closed at once.
/// `--max-connections` sets it (0: this).
pub fn max_connections(configured: usize) -> usize {
    if configured > 0 {
        return configured;
    }
    let (soft, _) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap_or((1024, 1024));
    usize::try_from(soft)
        .unwrap_or(usize::MAX)
        .saturating_sub(FD_RESERVE)
        .clamp(64, MAX_CONNECTIONS)
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

/// After a directory write of a new tunnel fails (Redis down or slow), the reconciler
/// retries the tunnels not yet published this soon, then after twice as long each time,
/// up to the reconcile interval: a hiccup costs a host its cross-machine reachability
/// for about a second, not a whole interval.
pub const RESYNC_FIRST_RETRY: Duration = Duration::from_secs(1);

/// Entries per page of the whole directory on `GET /admin/tunnels?all=1`, by default
/// and at most: a page is one `SCAN` step and one `MGET`, kept short so an operator's
/// walk never holds up Redis.
pub const ADMIN_DIRECTORY_PAGE: usize = 1_000;
/// See [`ADMIN_DIRECTORY_PAGE`].
pub const ADMIN_DIRECTORY_PAGE_MAX: usize = 10_000;

/// How long a startup clean-up of this machine's stale directory entries may delay
/// binding: best effort, the relay boots without it.
pub const STARTUP_CLEAR_TIMEOUT: Duration = Duration::from_secs(2);

/// Connect deadline towards a peer relay. Peers are on the same private network: a
/// connect that takes longer means the peer is gone, and the request is retried once
/// after a fresh lookup.
pub const PEER_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Bound on asking a peer relay whether it still holds a host (the reconciler's
/// take-over, [`crate::ownership`]): connect and answer, on the private network.
pub const PEER_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Peers asked per reconcile pass about entries that name them for hosts held here: a
/// partition that left thousands of such entries heals over a few passes, without one
/// pass taking minutes.
pub const CLAIMS_PER_PASS: usize = 100;

/// Longest a reconcile pass spends asking peers about such entries (see
/// [`CLAIMS_PER_PASS`]); a peer that cannot be asked is not asked again in that pass.
/// The rest waits for the next pass: publishing this machine's own tunnels comes first.
pub const CLAIMS_PASS_TIME: Duration = Duration::from_secs(5);

/// Largest request body a relay keeps while forwarding it to a peer relay, so that a hop
/// that found the host gone (or its connection refused after the body was read) can be
/// tried again on the new owner: 64 KiB covers the requests of ordinary API calls.
/// Larger bodies stream, and are tried again only when the failed hop never read them.
pub const PEER_REPLAY_BODY: usize = 64 * 1024;

/// Extra time a forwarded exchange may take beyond the owner's own exchange timeout, so
/// the owner's 504 (not ours) reaches the client.
pub const PEER_EXCHANGE_MARGIN: Duration = Duration::from_secs(2);

/// At most one log line per operation per this interval for directory errors (they are
/// all counted): a Redis outage must not flood the logs.
pub const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(30);

/// How long a draining relay keeps serving its tunnels after telling them to move, unless
/// every agent has moved sooner. Agents reconnect within the drain spread (250 ms), so
/// three seconds also lets exchanges already in flight (a 2 s upstream call) finish.
pub const DRAIN_GRACE: Duration = Duration::from_secs(3);

/// During the drain grace, how often the relay asks the directory which of its hosts have
/// registered elsewhere. Once every tunnel still here belongs to a host that has, and
/// carries nothing (no exchange, no channel), the grace ends early: an agent that keeps
/// its old tunnel open after moving (`relay agent` lingers 1 s; other v1 agents may wait
/// for the 4001) no longer holds the drain for the whole grace. Each poll costs one
/// batched lookup per [`LOOKUP_BATCH`] hosts not yet known to have moved.
pub const DRAIN_MOVED_POLL: Duration = Duration::from_millis(100);

/// Hosts per batched directory lookup (one Redis `MGET`): 1,000 keys answer in about a
/// millisecond, short enough not to hold up other clients of Redis.
pub const LOOKUP_BATCH: usize = 1_000;

/// Hard deadline of the whole drain, from the signal to exit: below Fly's 10 s
/// `kill_timeout`, so the relay always leaves by itself with its entries removed.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(8);

/// At the end of a drain, how long a tunnel waits for answers to exchanges already in
/// flight (and for its channels to end) before its Close 4001; then the close handshake
/// takes at most [`CLOSE_TIMEOUT`] more. The wait is before the Close because an agent's
/// WebSocket library sends nothing after it has read one.
pub const DRAIN_CLOSE_WAIT: Duration = Duration::from_millis(1_500);

/// Tunnel registrations admitted per second (token bucket refill), and the bucket size.
/// Measured (BENCHMARKS.md, `scripts/drain-bench.sh`): one relay registers 4,700 to
/// 6,000 tunnels a second on 2 loaded cores, CPU-bound (~0.13 CPU-s per 1,000). The rate
/// is half of that, leaving the other half to the tunnels already here; the burst takes
/// a drained peer's whole share at once (10,000 hosts re-homing onto two relays is 5,000
/// each), so a deploy is never throttled and only a storm beyond it is paced by 429s.
pub const ADMISSION_RATE: u32 = 2_500;
/// See [`ADMISSION_RATE`].
pub const ADMISSION_BURST: u32 = 5_000;

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

/// Defaults of `relay agent`, the host agent (see [`crate::agent`]). Each duration can be
/// overridden from the command line or the environment (`RELAY_AGENT_*`).
pub mod agent {
    use std::time::Duration;

    /// Worker threads of `relay agent` (`TOKIO_WORKER_THREADS` overrides it): one.
    /// Everything an agent carries crosses its one tunnel socket, so a second thread adds
    /// no throughput, only hand-offs between threads: on the 2-CPU bench machine one
    /// worker cut the agent's CPU per small request by a quarter (64 connections) to a
    /// half (one), and carried bulk transfers as fast or faster in less memory
    /// (BENCHMARKS.md, run 6).
    pub const WORKER_THREADS: usize = 1;

    /// First step of the reconnect backoff. A second is long enough not to hammer a relay
    /// that is restarting, short enough that a blip costs users little.
    pub const BACKOFF_BASE: Duration = Duration::from_secs(1);

    /// Longest wait after transport failures. Low, because a relay deploy or a network blip
    /// should cost seconds, and the jitter already spreads a fleet reconnecting at once.
    pub const BACKOFF_CAP: Duration = Duration::from_secs(5);

    /// Longest wait after the relay refused the credential (HTTP 401/403, close 1008):
    /// retrying fast cannot help until an operator fixes the token, and a fleet with an
    /// expired key must not load the relays with doomed handshakes.
    pub const AUTH_BACKOFF_CAP: Duration = Duration::from_secs(60);

    /// Longest random delay before reconnecting after a drain notice, so the agents of a
    /// draining relay (thousands of them) do not all arrive at the next relay in the same
    /// millisecond. Short, because the old tunnel keeps serving meanwhile.
    pub const DRAIN_SPREAD: Duration = Duration::from_millis(250);

    /// How long a registered tunnel must live before the backoff starts over. A relay
    /// that accepts tunnels and drops them at once must not reset the backoff each time.
    pub const STABLE_AFTER: Duration = Duration::from_secs(10);

    /// Deadline of TCP connect + TLS + WebSocket upgrade. Generous for a cross-continent
    /// TLS handshake on a bad link, bounded so a black-holed SYN cannot stall the agent.
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

    /// Inbound silence after which an open tunnel is abandoned. The relay pings every
    /// 30 s (`PING_INTERVAL`), so this is two pings plus slack: a socket that missed two
    /// pings is dead (a NAT dropped it, the relay vanished without a FIN).
    pub const SILENCE_TIMEOUT: Duration = Duration::from_secs(75);

    /// Clamp on a relay's `Retry-After`: a misconfigured (or hostile) value must not park
    /// the agent for days.
    pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

    /// An open tunnel that is neither closed nor sent a frame within this long counts as
    /// registered. A relay refuses a registration by closing (1008) right after the upgrade,
    /// so surviving this long means the relay kept it; any message from the relay before
    /// that proves it sooner.
    pub const REGISTRATION_GRACE: Duration = Duration::from_millis(200);

    /// After a drain, how long the old tunnel stays open once the new one is registered,
    /// even when idle. Another relay may have looked the host up just before the new
    /// registration and forwarded a request to the draining relay, which serves it on the
    /// old tunnel. Once the tunnel is gone the relays route such a request on, but one
    /// written to the old tunnel in the instant the agent closes it would fail (502): one
    /// second covers a lookup-and-forward many times over, and costs the relay's drain
    /// nothing (it ends once every host has moved and its old tunnel is idle).
    pub const DRAINED_TUNNEL_LINGER: Duration = Duration::from_secs(1);

    /// Bound on a WebSocket close handshake (tunnel or local channel): a peer that never
    /// answers our Close is abandoned after this, never waited on forever.
    pub const CLOSE_GRACE: Duration = Duration::from_secs(2);

    /// Bound on the whole shutdown after SIGINT/SIGTERM: below Fly's default 5 s
    /// `kill_timeout`, so the agent exits 0 on its own.
    pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

    /// HTTP exchanges one tunnel forwards to the upstream at once; the relay never has more
    /// pending on a tunnel (`MAX_PENDING_EXCHANGES`), so the agent answers 503 only to a
    /// relay configured above it.
    pub const MAX_IN_FLIGHT: usize = super::MAX_PENDING_EXCHANGES;

    /// WebSocket channels one tunnel carries at once; one more is refused with `ws:close`
    /// 1013. Bounds the agent's sockets and memory against a runaway client.
    pub const MAX_CHANNELS: usize = 4_096;

    /// Relay frames that may wait for one slow local WebSocket: 256. v1 has no flow
    /// control, so a channel this far behind is closed (1013), as the relay does the
    /// other way. (The relay's own queue is larger; the agent's local service is on the
    /// same machine and reads at memory speed.)
    pub const CHANNEL_QUEUE: usize = 256;

    /// Bytes of relay frames that may wait for one slow local WebSocket: 4 MiB, each
    /// frame counted with [`super::QUEUED_FRAME_OVERHEAD`]; a single larger frame still
    /// goes to an empty queue. Past it the channel is closed (1013). Without it, 256
    /// frames of up to 12 MiB each (a maximal v1 message, decoded) could wait for a local
    /// service that stopped reading: 3 GiB of the host's memory, sent by a client.
    pub const CHANNEL_QUEUE_BYTES: usize = 4 * 1024 * 1024;

    /// Bytes a v1 tunnel of the agent may hold for the relay at once: answers being read
    /// from the upstream and their messages until written to the tunnel, and local
    /// WebSocket frames until written: 128 MiB, five maximal answers (a 10 MiB binary
    /// body and its base64 message) at once. An answer of known length is charged (three
    /// times its length: body and message) before it is read, waiting its turn; one of
    /// unknown length chunk by chunk, and gets 502 if there is no room. Local frames wait
    /// (backpressure onto the local socket).
    pub const ANSWER_BUDGET: usize = 128 * 1024 * 1024;

    /// Messages that may wait for the tunnel's writer. When full, upstream readers wait
    /// (backpressure), and the reader drops a `pong` rather than stall.
    pub const TUNNEL_QUEUE: usize = super::TUNNEL_QUEUE;

    /// Deadline of one upstream HTTP exchange, connect to last body byte. The relay answers
    /// its client 504 after its own 30 s `EXCHANGE_TIMEOUT`; a later answer is useless.
    pub const UPSTREAM_TIMEOUT: Duration = super::EXCHANGE_TIMEOUT;

    /// Connect deadline towards the local upstream (HTTP or WebSocket). It is local: a
    /// connect slower than this means it is down or overloaded, and the client gets 502.
    pub const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

    /// Largest upstream response body forwarded; above it the client gets 502. v1 carries
    /// a body in one frame, and the relay's frame limit (16 MiB) must hold it as base64.
    pub const MAX_RESPONSE_BYTES: usize = super::MAX_BODY_BYTES;

    /// Largest message a local WebSocket may send on a channel (same reasoning: it must fit
    /// one relay frame as base64); above it the channel is closed with 1009.
    pub const MAX_CHANNEL_MESSAGE: usize = super::MAX_BODY_BYTES;

    /// Largest message the agent writes on a tunnel: the relay's default frame limit. A
    /// larger one would make the relay close the whole tunnel (1009), so it is replaced by
    /// a 502 (exchange) or a 1009 close (channel) instead.
    pub const MAX_TUNNEL_MESSAGE: usize = super::MAX_FRAME_BYTES;

    /// Largest message the agent accepts from the relay: a maximal 10 MiB body may grow
    /// when JSON escapes it, so allow 4× the relay's own frame limit.
    pub const MAX_INBOUND_MESSAGE: usize = 4 * super::MAX_FRAME_BYTES;

    /// Old tunnels kept serving their in-flight work after a drain (make before break). A
    /// flapping fleet of draining relays could otherwise pile them up; past this the oldest
    /// is closed.
    pub const MAX_DRAINING_TUNNELS: usize = 4;

    /// Largest body of a local service's refusal of a WebSocket upgrade (its 403 or 404
    /// page) passed on to the client: an error page, not a download.
    pub const UPSTREAM_WS_REFUSAL_BODY: usize = 64 * 1024;

    /// Idle pooled connections kept per upstream (the pool is for one local service).
    pub const UPSTREAM_POOL_IDLE: usize = 64;
}
