//! Who a client is, and what one client may hold at once.
//!
//! A client is its IP address: the socket's peer, or, behind a platform proxy that says
//! who the client is (Fly's `Fly-Client-IP`), that header when the operator names it
//! (`--client-ip-header`). A header is never trusted unless named: anyone can send one.
//!
//! Per client IP the relay bounds:
//! - connections held at once ([`crate::limits::MAX_CONNECTIONS_PER_IP`]), at accept,
//!   only when no client-IP header is configured (behind a proxy every connection comes
//!   from the proxy's address, so only the header tells clients apart, per request);
//! - WebSocket channels open at once ([`crate::limits::MAX_CHANNELS_PER_CLIENT`]);
//! - refused tunnel registrations ([`crate::limits::REFUSALS_PER_IP`]): past the rate,
//!   a refusal is a bare 429 instead of a WebSocket upgrade closed with 1008.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use http::{HeaderMap, HeaderName};

/// The client's address: the configured header's (its first valid address), or the
/// socket peer's, with IPv4-mapped IPv6 (from the dual-stack socket) unmapped.
pub fn client_ip(headers: &HeaderMap, peer: SocketAddr, header: Option<&HeaderName>) -> IpAddr {
    let from_header = header
        .and_then(|name| headers.get(name))
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(',').next())
        .and_then(|value| value.trim().parse::<IpAddr>().ok());
    from_header.map_or_else(|| peer_ip(peer), unmapped)
}

/// The socket peer's address, with IPv4-mapped IPv6 (from the dual-stack socket)
/// unmapped.
pub fn peer_ip(peer: SocketAddr) -> IpAddr {
    unmapped(peer.ip())
}

fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// Counts of something each client IP holds (connections, channels), each capped.
/// An entry exists only while its count is above zero.
#[derive(Debug)]
pub struct PerIp {
    counts: Mutex<HashMap<IpAddr, usize>>,
    max: usize,
}

/// One of a client's places in a [`PerIp`]; given back on drop.
#[derive(Debug)]
pub struct IpSlot {
    /// `None` when the table has no limit (nothing was counted).
    table: Option<Arc<PerIp>>,
    ip: IpAddr,
}

/// A connection's [`IpSlot`], shared with the requests it carries so that one found to
/// come from a peer relay (an authenticated hop) can give its place back: a relay's
/// connections to another are not a client's, and in proxy routing each bridged
/// channel is one.
#[derive(Debug, Clone)]
pub struct ConnectionPlace(Arc<Mutex<Option<IpSlot>>>);

impl ConnectionPlace {
    /// The connection's `slot`.
    pub fn new(slot: IpSlot) -> ConnectionPlace {
        ConnectionPlace(Arc::new(Mutex::new(Some(slot))))
    }

    /// Gives the connection's place back (it carries a peer relay's requests).
    pub fn give_back(&self) {
        let slot = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        drop(slot);
    }
}

impl IpSlot {
    /// A place counted nowhere: for what another relay counted already.
    pub fn uncounted() -> IpSlot {
        IpSlot {
            table: None,
            ip: IpAddr::from([0, 0, 0, 0]),
        }
    }
}

impl PerIp {
    /// A table allowing `max` per IP (0: no limit, nothing counted).
    pub fn new(max: usize) -> Arc<PerIp> {
        Arc::new(PerIp {
            counts: Mutex::new(HashMap::new()),
            max,
        })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A place for `ip`, or `None` when it holds `max` already.
    pub fn try_take(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        if self.max == 0 {
            return Some(IpSlot { table: None, ip });
        }
        let mut counts = self.counts();
        let count = counts.entry(ip).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(IpSlot {
            table: Some(Arc::clone(self)),
            ip,
        })
    }

    /// How many places `ip` holds.
    pub fn held(&self, ip: IpAddr) -> usize {
        self.counts().get(&ip).copied().unwrap_or(0)
    }

    /// How many IPs hold a place.
    pub fn clients(&self) -> usize {
        self.counts().len()
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let Some(table) = &self.table else {
            return;
        };
        let mut counts = table.counts();
        if let Some(count) = counts.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// Refused tunnel registrations per client IP: a rate, past which refusals are cheap.
#[derive(Debug)]
pub struct Refusals {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
}

/// Keys kept by [`Refusals`] before the ones that have recovered their burst are pruned.
const REFUSALS_PRUNE_AT: usize = 10_000;

impl Refusals {
    /// `per_second` refusals per IP, in bursts of `burst`.
    pub fn new(per_second: NonZeroU32, burst: NonZeroU32) -> Refusals {
        Refusals {
            limiter: RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)),
        }
    }

    /// Records a refusal for `ip`: whether it is still within the rate (answer it in
    /// full) or past it (answer it as cheaply as possible).
    pub fn record(&self, ip: IpAddr) -> bool {
        if self.limiter.len() >= REFUSALS_PRUNE_AT {
            // IPs whose state is back to a full burst say nothing the default does.
            self.limiter.retain_recent();
        }
        self.limiter.check_key(&ip).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn each_ip_holds_at_most_max_places_and_an_emptied_entry_is_removed() {
        let table = PerIp::new(2);
        let a = table.try_take(ip("192.0.2.1")).unwrap();
        let b = table.try_take(ip("192.0.2.1")).unwrap();
        assert!(table.try_take(ip("192.0.2.1")).is_none());
        let other = table.try_take(ip("192.0.2.2")).unwrap();
        assert_eq!((table.held(ip("192.0.2.1")), table.clients()), (2, 2));
        drop((a, b));
        assert_eq!(table.held(ip("192.0.2.1")), 0);
        assert_eq!(table.clients(), 1, "the emptied entry is gone");
        drop(other);
        assert_eq!(table.clients(), 0);
    }

    #[test]
    fn a_connection_place_given_back_frees_the_address_at_once() {
        let table = PerIp::new(1);
        let place = ConnectionPlace::new(table.try_take(ip("192.0.2.1")).unwrap());
        assert!(table.try_take(ip("192.0.2.1")).is_none());
        place.clone().give_back();
        assert_eq!(table.held(ip("192.0.2.1")), 0);
        assert!(table.try_take(ip("192.0.2.1")).is_some());
        place.give_back();
    }

    #[test]
    fn no_limit_counts_nothing() {
        let table = PerIp::new(0);
        let held: Vec<_> = (0..10)
            .map(|_| table.try_take(ip("192.0.2.1")).expect("no limit"))
            .collect();
        assert_eq!((table.held(ip("192.0.2.1")), table.clients()), (0, 0));
        drop(held);
    }

    #[test]
    fn the_header_names_the_client_only_when_configured() {
        let peer: SocketAddr = "[::ffff:10.0.0.9]:4000".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("fly-client-ip", "203.0.113.5".parse().unwrap());
        assert_eq!(client_ip(&headers, peer, None), ip("10.0.0.9"));
        let name = HeaderName::from_static("fly-client-ip");
        assert_eq!(client_ip(&headers, peer, Some(&name)), ip("203.0.113.5"));
        headers.insert("fly-client-ip", "not an address".parse().unwrap());
        assert_eq!(client_ip(&headers, peer, Some(&name)), ip("10.0.0.9"));
    }

    #[test]
    fn refusals_past_the_burst_are_reported_per_ip() {
        let refusals = Refusals::new(NonZeroU32::new(1).unwrap(), NonZeroU32::new(3).unwrap());
        let flood = ip("198.51.100.1");
        assert!((0..3).all(|_| refusals.record(flood)));
        assert!(!refusals.record(flood));
        assert!(
            refusals.record(ip("198.51.100.2")),
            "another IP is not affected"
        );
    }
}
