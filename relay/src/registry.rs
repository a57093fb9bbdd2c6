//! The tunnels held by this process, by hostId.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::Notify;

use crate::host_id::HostId;
use crate::tunnel::{TunnelHandle, TunnelId};

/// The local tunnel table. At most one tunnel per hostId: the newest wins.
///
/// A std Mutex with synchronous methods only: each critical section is one map operation,
/// and callers clone the handle out before awaiting anything.
#[derive(Debug, Default)]
pub struct Registry {
    tunnels: Mutex<HashMap<HostId, TunnelHandle>>,
    /// Woken whenever a removal leaves the registry empty (the drain waits on it).
    emptied: Notify,
}

impl Registry {
    fn tunnels(&self) -> std::sync::MutexGuard<'_, HashMap<HostId, TunnelHandle>> {
        self.tunnels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers `handle` for its host. Returns the tunnel it replaced, which the caller
    /// must close.
    pub fn insert(&self, handle: TunnelHandle) -> Option<TunnelHandle> {
        self.tunnels().insert(handle.host().clone(), handle)
    }

    /// The live tunnel for `host`. A tunnel whose session has ended but has not yet
    /// unregistered is not returned; it stays in the map so that its own compare-and-remove
    /// (and the directory clean-up that follows it) still happens.
    pub fn get(&self, host: &HostId) -> Option<TunnelHandle> {
        self.tunnels()
            .get(host)
            .filter(|handle| !handle.is_closed())
            .cloned()
    }

    /// Removes the tunnel for `host` only if it is still `id` (a newer tunnel for the same
    /// host stays). Returns whether it was removed.
    pub fn remove(&self, host: &HostId, id: TunnelId) -> bool {
        let mut tunnels = self.tunnels();
        if tunnels.get(host).is_some_and(|h| h.id() == id) {
            tunnels.remove(host);
            if tunnels.is_empty() {
                self.emptied.notify_waiters();
            }
            return true;
        }
        false
    }

    /// Resolves once no tunnel is registered.
    ///
    /// # Cancel safety
    /// Cancel safe: it only waits.
    pub async fn wait_empty(&self) {
        loop {
            // Created before the check: a removal between the check and the await still
            // wakes it.
            let emptied = self.emptied.notified();
            if self.is_empty() {
                return;
            }
            emptied.await;
        }
    }

    /// Whether a tunnel for `host` is registered.
    pub fn contains(&self, host: &HostId) -> bool {
        self.tunnels().contains_key(host)
    }

    /// Number of tunnels.
    pub fn len(&self) -> usize {
        self.tunnels().len()
    }

    /// Whether no tunnel is registered.
    pub fn is_empty(&self) -> bool {
        self.tunnels().is_empty()
    }

    /// Whether any tunnel satisfies `test`, which runs under the registry's lock (it must
    /// be quick and must not block).
    pub fn any(&self, test: impl Fn(&TunnelHandle) -> bool) -> bool {
        self.tunnels().values().any(test)
    }

    /// Every handle, for operations that act on all tunnels (drain, shutdown).
    pub fn handles(&self) -> Vec<TunnelHandle> {
        self.tunnels().values().cloned().collect()
    }

    /// The handles for which `keep` holds: only those are cloned. `keep` runs under the
    /// registry's lock, so it must be quick and must not block.
    pub fn handles_where(&self, keep: impl Fn(&TunnelHandle) -> bool) -> Vec<TunnelHandle> {
        self.tunnels()
            .values()
            .filter(|handle| keep(handle))
            .cloned()
            .collect()
    }
}
