//! The state of one relay process, shared by every handler: [`Relay`].
//!
//! Only state and its accessors live here. What acts on it lives with its concern:
//! directory ownership in [`crate::ownership`], routing in [`crate::routing`], the drain
//! in [`crate::drain`], the HTTP routes in [`crate::router`] and the serve loop in
//! [`crate::server`]. This module imports none of them, so none of them import each other
//! through it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Verifier;
use crate::budget::{Budget, Tenants};
use crate::clients::{PerIp, Refusals};
use crate::config::{Config, ConfigError, DirectoryConfig};
use crate::directory::{Directory, Instrumented, MemoryDirectory, RedisDirectory};
use crate::peers::Peers;
use crate::registry::Registry;

/// The state of one relay process, shared by every handler. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Relay {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: Config,
    verifier: Verifier,
    registry: Registry,
    directory: Arc<dyn Directory>,
    /// Every long-lived task (tunnel sessions, client channels, background loops): axum's
    /// graceful shutdown does not see upgraded sockets, so shutdown waits on this.
    tracker: TaskTracker,
    /// Cancelled when the relay shuts down; every tunnel's token is a child of it.
    shutdown: CancellationToken,
    /// The address peers forward to; known once the listener is bound.
    advertise_addr: OnceLock<String>,
    /// Connections to peer relays (proxy routing).
    peers: Peers,
    /// Set at drain step 1: refuse new tunnels, answer `/ready` with 503, route hosts that
    /// moved to their new owner.
    draining: AtomicBool,
    /// Set at drain step 4: the directory was cleared in one call, so tunnels closing
    /// afterwards need not unregister one by one.
    directory_cleared: AtomicBool,
    /// Token bucket of tunnel registrations.
    admission: DefaultDirectRateLimiter,
    /// Woken when a tunnel's directory write failed: the reconciler retries soon.
    unsynced: Notify,
    /// What all tunnels' buffers may hold together ([`crate::budget`]).
    memory: Budget,
    /// What each tenant's tunnels may hold together, inside `memory`.
    tenants: Tenants,
    /// Channels open per client IP ([`crate::clients`]).
    channels_per_client: Arc<PerIp>,
    /// Refused tunnel registrations per client IP.
    refusals: Refusals,
    /// The relays' shared hop key, once the directory gave it.
    hop_key: tokio::sync::OnceCell<String>,
    /// Where v2 tunnels live: the dials this relay waits for, and this machine.
    v2: crate::tunnel::v2::Place,
    /// Requests held for moving hosts ([`crate::limits::MAX_HELD_REQUESTS`]).
    holds: Arc<tokio::sync::Semaphore>,
}

impl Relay {
    /// A relay for `config`, with the directory it names (embedded, or Redis). Never
    /// touches the network: a Redis that is down is found out, and healed from, later.
    /// Must be called within a Tokio runtime.
    ///
    /// # Errors
    /// When the token key or the Redis URL in `config` is unusable.
    pub fn new(config: Config) -> Result<Relay, ConfigError> {
        let directory: Arc<dyn Directory> = match &config.directory {
            DirectoryConfig::Memory => Arc::new(MemoryDirectory::new(config.limits.directory_ttl)),
            DirectoryConfig::Redis {
                url,
                prefix,
                tls_ca,
            } => {
                let url = String::from_utf8_lossy(url.expose()).into_owned();
                Arc::new(
                    RedisDirectory::with_tls_ca(
                        &url,
                        prefix,
                        config.limits.directory_ttl,
                        tls_ca.as_deref(),
                    )
                    .map_err(|e| ConfigError(format!("REDIS_URL: {e}")))?,
                )
            }
        };
        Relay::with_directory(config, Arc::new(Instrumented::new(directory)))
    }

    /// A relay for `config` with the given directory.
    ///
    /// # Errors
    /// When the token key in `config` is unusable.
    pub fn with_directory(
        config: Config,
        directory: Arc<dyn Directory>,
    ) -> Result<Relay, ConfigError> {
        let memory = crate::limits::memory_budget(config.limits.memory_budget);
        if let Some(pem) = &config.fetch_ca {
            crate::fetch::trust(pem);
        }
        Ok(Relay {
            inner: Arc::new(Inner {
                verifier: config.verifier()?,
                registry: Registry::default(),
                v2: crate::tunnel::v2::Place {
                    dials: Arc::default(),
                    issuer: config.owner.clone(),
                },
                holds: Arc::new(tokio::sync::Semaphore::new(
                    crate::limits::MAX_HELD_REQUESTS,
                )),
                directory,
                tracker: TaskTracker::new(),
                shutdown: CancellationToken::new(),
                advertise_addr: OnceLock::new(),
                peers: Peers::new(),
                draining: AtomicBool::new(false),
                directory_cleared: AtomicBool::new(false),
                admission: RateLimiter::direct(
                    Quota::per_second(config.admission_rate).allow_burst(config.admission_burst),
                ),
                unsynced: Notify::new(),
                memory: Budget::new(memory),
                tenants: Tenants::new(crate::limits::tenant_budget(
                    config.limits.tenant_budget,
                    memory,
                    config.limits.tunnel_budget,
                )),
                channels_per_client: PerIp::new(config.limits.max_channels_per_client),
                hop_key: tokio::sync::OnceCell::new(),
                refusals: Refusals::new(
                    std::num::NonZeroU32::new(crate::limits::REFUSALS_PER_IP)
                        .unwrap_or(std::num::NonZeroU32::MIN),
                    std::num::NonZeroU32::new(crate::limits::REFUSALS_BURST)
                        .unwrap_or(std::num::NonZeroU32::MIN),
                ),
                config,
            }),
        })
    }

    /// The process-wide byte budget every tunnel's buffers are charged against.
    pub fn memory(&self) -> &Budget {
        &self.inner.memory
    }

    /// Every tenant's share of [`Relay::memory`].
    pub fn tenants(&self) -> &Tenants {
        &self.inner.tenants
    }

    /// Channels open per client IP.
    pub fn channels_per_client(&self) -> &Arc<PerIp> {
        &self.inner.channels_per_client
    }

    /// The key relays of this directory prove their hops with
    /// ([`crate::directory::Directory::hop_key`]): read once, then kept. `None` while
    /// the directory cannot give it (asked again next time).
    pub async fn hop_key(&self) -> Option<String> {
        let key = self
            .inner
            .hop_key
            .get_or_try_init(|| async {
                match tokio::time::timeout(
                    crate::limits::DIRECTORY_TIMEOUT,
                    self.inner.directory.hop_key(),
                )
                .await
                {
                    Ok(Ok(key)) => Ok(key),
                    Ok(Err(err)) => Err(err.to_string()),
                    Err(_) => Err("timed out".to_owned()),
                }
            })
            .await;
        match key {
            Ok(key) => Some(key.clone()),
            Err(err) => {
                crate::telemetry::directory_error("hop_key", &"this relay", &err);
                None
            }
        }
    }

    /// Refused tunnel registrations per client IP.
    pub fn refusals(&self) -> &Refusals {
        &self.inner.refusals
    }

    /// The client's IP address for `headers` arriving from `peer` (see
    /// [`crate::clients::client_ip`]).
    pub fn client_ip(
        &self,
        headers: &http::HeaderMap,
        peer: std::net::SocketAddr,
    ) -> std::net::IpAddr {
        crate::clients::client_ip(headers, peer, self.inner.config.client_ip_header.as_ref())
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The token verifier.
    pub fn verifier(&self) -> &Verifier {
        &self.inner.verifier
    }

    /// Where v2 tunnels live: the dials this relay waits for, and this machine.
    pub fn v2(&self) -> &crate::tunnel::v2::Place {
        &self.inner.v2
    }

    /// A place to hold a request for a moving host, if one is free.
    pub fn hold_place(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        Arc::clone(&self.inner.holds).try_acquire_owned().ok()
    }

    /// The local tunnels.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// The directory.
    pub fn directory(&self) -> &Arc<dyn Directory> {
        &self.inner.directory
    }

    /// The tracker of long-lived tasks.
    pub fn tracker(&self) -> &TaskTracker {
        &self.inner.tracker
    }

    /// The token cancelled at shutdown.
    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    /// Drain step 1: from now on, refuse new tunnels and report not ready.
    pub fn begin_draining(&self) {
        self.inner.draining.store(true, Ordering::Relaxed);
    }

    /// Whether the relay is draining.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Relaxed)
    }

    /// Drain step 4 is done: this machine's directory entries were cleared at once.
    pub(crate) fn mark_directory_cleared(&self) {
        self.inner.directory_cleared.store(true, Ordering::Relaxed);
    }

    /// Whether [`Relay::mark_directory_cleared`] was called.
    pub(crate) fn is_directory_cleared(&self) -> bool {
        self.inner.directory_cleared.load(Ordering::Relaxed)
    }

    /// Woken when a tunnel's directory write failed, so the reconciler retries soon.
    pub(crate) fn unsynced(&self) -> &Notify {
        &self.inner.unsynced
    }

    /// Admits one tunnel registration, or says how long to wait (the token bucket is
    /// empty).
    pub(crate) fn admit(&self) -> Result<(), std::time::Duration> {
        use governor::clock::{Clock as _, DefaultClock};
        self.inner
            .admission
            .check()
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }

    /// Connections to peer relays.
    pub fn peers(&self) -> &Peers {
        &self.inner.peers
    }

    /// The address peers forward to (set when the listener is bound).
    pub fn advertise_addr(&self) -> Option<&str> {
        self.inner.advertise_addr.get().map(String::as_str)
    }

    /// Records the address peers forward to; the first call wins.
    pub(crate) fn set_advertise_addr(&self, addr: String) {
        let _ = self.inner.advertise_addr.set(addr);
    }
}
