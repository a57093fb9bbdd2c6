//! End-to-end test support for `relay`: real processes, real sockets.
//!
//! Every test starts its own `relay` child process on `127.0.0.1:0`, its own
//! upstream HTTP/WebSocket server and its own v1 host agents, then drives them
//! over real TCP connections. Nothing here sleeps to "let things settle": every
//! wait polls a condition under a deadline and fails with a message that says
//! what it was waiting for.
//!
//! # Layout
//!
//! - [`relay_process`]: [`TestRelay`] (spawn the `relay` binary, parse its
//!   address from the `listening` log line, capture every output line, scrape
//!   metrics, kill on drop) and [`run_relay_cli`] for one-shot CLI runs.
//! - [`cargo_build`]: brings the `relay` binary up to date before a test
//!   process first runs it ([`relay_binary`], [`release_relay_binary`]), so no
//!   test ever runs a stale binary.
//! - [`tokens`]: HS256 JWT [`Claims`] and minting, including expired,
//!   wrong-secret, wrong-role and other-host tokens.
//! - [`client`]: a small HTTP client ([`HttpClient`]) for talking to the relay.
//! - [`ws`]: a WebSocket wrapper ([`WsClient`]) with deadline-bound receive and
//!   close-code helpers, used by visitors and by [`RawHost`].
//! - [`host`]: v1 host agents. [`RawHost`] gives message-level control;
//!   [`TestHost`] runs in the background and forwards to an [`Upstream`].
//! - [`v2_host`]: tunnel v2 (dial-back) hosts as superset's
//!   `tunnel-client-v2.ts` speaks it: [`V2Host`](v2_host::V2Host) (control
//!   with pings and reconnects over a list of relays, ws and http dials to an
//!   [`Upstream`], observers and knobs), [`V2Control`](v2_host::V2Control)
//!   and [`dial_raw`](v2_host::dial_raw) for playing the host by hand.
//! - [`upstream`]: a real local HTTP + WebSocket server ([`Upstream`]) with
//!   `/echo`, `/slow` and `/ws/echo`.
//! - [`stack`]: [`Stack`], the usual relay + upstream + connected host fixture.
//! - [`metrics`]: reading counter values from Prometheus text.
//! - [`redis`]: [`TestRedis`], a real `redis-server` per test on a free port
//!   (kill it, restart it empty on the same port, inspect keys), for relays
//!   that share a Redis directory.
//! - [`agent`]: [`TestAgent`], the `relay agent` subcommand as a child
//!   process (builder for its flags, captured output, status endpoint,
//!   SIGTERM), and [`TokenFile`] for rotating its credential.
//! - [`stub_relay`]: [`StubRelay`], a raw WebSocket server standing in for
//!   the relay in agent tests: refuses upgrades with any status and headers
//!   or hands accepted tunnels to the test, and records every attempt.
//! - [`tls`]: [`TestCa`], a private CA and a certificate for 127.0.0.1.
//! - [`bulk`]: [`BulkUpstream`], an HTTP/1.1 + h2c upstream for large
//!   bodies: deterministic downloads (`/bytes`, from [`Pattern`], checked
//!   with [`expected_sha256`]) that record whether the peer aborted them,
//!   hashed uploads, timed server-sent events and trailers.
//! - [`stream_client`]: [`download`] and [`upload`], HTTP/1.1 or h2c
//!   clients that stream bodies (hash as they go, throttle reads, abort
//!   after `k` bytes, time every chunk).
//! - [`grpc`]: [`GrpcServer`] and [`GrpcClient`], a unary and a
//!   server-streaming gRPC method over h2c with a JSON codec (no protoc);
//!   the client takes a path prefix and a bearer token, as through the relay.
//! - [`memory`]: [`rss_kib`], [`peak_rss_kib`] and [`RssSampler`], a
//!   process's resident memory from `/proc`, sampled over a test's window.
//! - [`raw_h2`]: an `h2` agent speaking HTTP/2 frame by frame, for hostile agents.
//! - [`stall`]: [`StallingReads`], a socket that stops reading on cue.
//! - [`wait`]: [`wait_until`] and friends.

pub mod agent;
pub mod bulk;
pub mod cargo_build;
pub mod client;
pub mod fault;
pub mod front_door;
pub mod grpc;
pub mod host;
pub mod keys;
pub mod memory;
pub mod metrics;
pub mod raw_h2;
pub mod redis;
pub mod relay_process;
pub mod release_binary;
pub mod stack;
pub mod stall;
pub mod stream_client;
pub mod stub_relay;
pub mod tls;
pub mod tokens;
pub mod upstream;
pub mod v2_host;
pub mod wait;
pub mod ws;

use std::time::Duration;

pub use self::redis::{TestRedis, addr_key, host_key, owned_key, unused_port};
pub use agent::{AgentBuilder, TestAgent, TokenFile};
pub use bulk::{BulkUpstream, DownloadOutcome, Pattern, expected_sha256};
pub use client::{HttpClient, HttpResponse};
pub use fault::FaultyProxy;
pub use front_door::FrontDoor;
pub use grpc::{GrpcClient, GrpcServer};
pub use host::{RawHost, TestHost, close_code_of, msg_id, msg_type};
pub use keys::KeyPair;
pub use memory::{RssSampler, peak_rss_kib, rss_kib};
pub use metrics::counter_value;
pub use relay_process::{
    CliOutput, RelayBuilder, TestRelay, relay_binary, relay_build, run_relay_cli,
};
pub use release_binary::{binary_from_env, release_relay_binary};
pub use stack::Stack;
pub use stall::{Stall, StallingReads};
pub use stream_client::{DownloadOptions, Protocol, UploadOptions, download, upload};
pub use stub_relay::{Attempt, StubRelay, StubReply, StubTunnel};
pub use tls::{HttpsAnswer, TestCa, https_get, tls_connect};
pub use tokens::{Claims, claims_of, mint, unix_now};
pub use upstream::Upstream;
pub use wait::{wait_until, wait_until_async, within};
pub use ws::{WsClient, WsEnd, rejection_status};

/// Default deadline for anything that should happen "promptly" on a loopback
/// connection (a response, a frame, a close). Generous so that a loaded CI
/// machine does not flake, yet a hang still fails in bounded time.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// The HS256 secret [`TestRelay`] uses unless a test picks another one.
pub const TEST_SECRET: &str = "relay-tests-secret-5c1e0a9f";
