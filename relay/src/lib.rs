//! `relay`: a WebSocket tunnel relay.
//!
//! A host agent behind NAT opens one outbound WebSocket, its *tunnel*, to the relay.
//! Clients call `/hosts/<hostId>/...` over HTTP or WebSocket, and the relay carries each
//! exchange over that host's tunnel, in the protocol the tunnel negotiated: v1 (JSON
//! messages) or `h2` (HTTP/2 inside the tunnel); see `docs/protocol.md`.
//!
//! # Layout
//! - [`cli`]: the `relay` command line (`serve`, `token`, `agent`); the binary only calls it.
//!   [`dev`]: `relay serve --dev`'s kept secret and what it prints.
//! - [`config`]: flags and environment of `relay serve`, validated before binding.
//! - [`limits`]: every timeout and limit, with its default and why.
//! - [`protocol`]: what travels on a tunnel: close codes, and one codec per protocol
//!   (v1 JSON messages; `h2`'s WebSocket byte stream), shared by relay and agent.
//! - [`host_id`]: validated hostIds.
//! - [`auth`]: JWT claims, verification, the authorization policy and minting;
//!   [`jwks`]: an identity provider's key set; [`access`]: the access check against
//!   the deployment's API; [`fetch`]: the GETs the relay makes.
//! - [`admin`]: `GET /admin/tunnels`, for operators; [`access_log`]: one line per request.
//! - [`state`]: the shared state of one relay process ([`state::Relay`]).
//! - [`router`]: the HTTP routes; [`subdomain`]: `<hostId>.<base-domain>` routing and
//!   the token cookie.
//! - [`server`]: binding and the serve loop (then the drain).
//! - [`ownership`]: this machine's directory entries: publish, heartbeat, unpublish,
//!   and the reconciler that heals them.
//! - [`drain`]: the graceful drain sequence, in one place.
//! - [`listener`]: the listening socket, which a drain closes without dropping
//!   connections already accepted.
//! - [`shutdown`]: SIGINT/SIGTERM handling.
//! - [`host`]: the host side: `/tunnel` registrations (and superset's `/v2/control`);
//!   [`dial`]: the WebSockets superset's v2 hosts dial back for each stream.
//! - [`presence`]: `GET /presence`, which hosts are online.
//! - [`client`]: the client side: `/hosts/{hostId}/...` exchanges and channels.
//! - [`tunnel`]: the per-tunnel actor and its handle, protocol-blind outside the module:
//!   exchanges and channels over `http` types, v1 or `h2` inside.
//! - [`registry`]: the tunnels this process holds.
//! - [`routing`]: where a request goes, and reaching the machine that holds a host's
//!   tunnel (proxy, fly-replay).
//! - [`peers`]: pooled connections to peer relays.
//! - [`clients`]: who a client is (its IP) and what one client may hold at once.
//! - [`budget`]: byte budgets of what peers make the relay hold, per tunnel and in all.
//! - [`connections`]: the accept loop and the bounds every connection gets; [`tls`]:
//!   the listener's TLS, its certificate reloaded as its files change.
//! - [`query`]: query strings: the token parameter found, stripped and redacted.
//! - [`body`]: wrappers around streamed bodies (guards, end signals, hand-offs).
//! - [`headers`]: which headers cross which hop (client, host, peer, local service).
//! - [`websocket`]: WebSocket plumbing shared by tunnels, channels and bridges.
//! - [`directory`]: which machine owns each host (in memory by default).
//! - [`error`]: errors answered to clients, by whose fault they are.
//! - [`telemetry`]: logging, redaction and metrics.
//! - [`agent`]: `relay agent`, the host agent: keeps a tunnel open (reconnect, drain) and
//!   forwards its exchanges and channels to a local service.

#![warn(missing_docs)]

pub mod access;
pub mod access_log;
pub mod admin;
pub mod agent;
pub mod allocator;
pub mod auth;
pub mod body;
pub mod budget;
pub mod cli;
pub mod client;
pub mod client_socket;
pub mod clients;
pub mod config;
pub mod connections;
pub mod dev;
pub mod dial;
pub mod directory;
pub mod drain;
pub mod error;
pub mod fetch;
pub mod headers;
pub mod host;
pub mod host_id;
pub mod jwks;
pub mod limits;
pub mod listener;
pub mod ownership;
pub mod peers;
pub mod presence;
pub mod protocol;
pub mod query;
pub mod registry;
pub mod router;
pub mod routing;
pub mod server;
pub mod shutdown;
pub mod state;
pub mod subdomain;
pub mod telemetry;
pub mod tls;
pub mod tunnel;
pub mod websocket;
