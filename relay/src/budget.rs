//! Byte budgets: how much memory the relay may hold for its peers, per tunnel, per tenant
//! and for the whole process.
//!
//! v1 buffers every body whole and has no flow control, so what the relay holds is
//! decided by its peers: a client uploading, a host answering, a host flooding a channel.
//! Every such buffer is charged, while it is held, against three budgets at once:
//! - the tunnel's ([`crate::limits::TUNNEL_BUDGET`]): one host and its clients cannot
//!   take more than their share, whatever they do;
//! - its tenant's ([`Tenant`]: every tunnel registered with tokens of one subject,
//!   [`crate::limits::tenant_budget`]): one tenant cannot take the relay's memory from
//!   the others by opening many tunnels;
//! - the process's ([`crate::limits::memory_budget`]): the relay as a whole stays within
//!   its machine's memory, however many tunnels there are.
//!
//! A [`Charge`] gives its bytes back when dropped, so a charge travels with what it pays
//! for (a request body into the tunnel queue, a response body into the client's
//! response) and ends when that is written or dropped. Over a budget, the request is
//! refused (503) or the channel closed (1013), never queued: the other tenants go on.
//!
//! `h2` tunnels stream instead of buffering, and are charged for what HTTP/2 and the
//! WebSocket codecs may hold for them ([`crate::tunnel`]'s `h2` module): the receive
//! window an HTTP/2 connection grants the agent, reserved while the connection is up;
//! what the relay has handed HTTP/2 to send and the tunnel's socket has not yet taken
//! (a [`Debt`]); and a channel message being assembled.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::telemetry;

/// One pool of bytes. Cheap to clone; clones share the pool.
#[derive(Debug, Clone)]
pub struct Budget {
    bytes: Arc<Semaphore>,
    size: usize,
}

/// Which budget refused a charge, for the error and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The tunnel's own budget: this host and its clients hold their share already.
    Tunnel,
    /// The tenant's share: the hosts of this tenant (the subject of their token) and
    /// their clients hold it all already.
    Tenant,
    /// The whole process's budget: the relay is short of memory.
    Process,
}

impl Scope {
    /// `"tunnel"`, `"tenant"` or `"process"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Tunnel => "tunnel",
            Scope::Tenant => "tenant",
            Scope::Process => "process",
        }
    }
}

impl Budget {
    /// A pool of `size` bytes.
    pub fn new(size: usize) -> Budget {
        let size = size.min(Semaphore::MAX_PERMITS);
        Budget {
            bytes: Arc::new(Semaphore::new(size)),
            size,
        }
    }

    /// The pool's size.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Bytes charged now.
    pub fn in_use(&self) -> usize {
        self.size - self.bytes.available_permits()
    }

    /// `bytes` from this pool, waiting for room; `None` only if the pool were closed
    /// (never).
    async fn acquire(&self, bytes: u32) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.bytes).acquire_many_owned(bytes).await.ok()
    }

    fn try_take(&self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        let bytes = u32::try_from(bytes).ok()?;
        Arc::clone(&self.bytes).try_acquire_many_owned(bytes).ok()
    }

    /// `bytes` from this pool alone, waiting until there is room; a request larger than
    /// the pool takes all of it. (`relay agent` budgets its tunnel this way: one pool.)
    ///
    /// # Cancel safety
    /// Cancel safe: nothing is taken until it returns.
    pub async fn take(&self, bytes: usize) -> Held {
        let bytes = u32::try_from(bytes.min(self.size)).unwrap_or(u32::MAX);
        if bytes == 0 {
            return Held(None);
        }
        Held(self.acquire(bytes).await)
    }

    /// `bytes` from this pool alone if there is room now.
    pub fn try_take_now(&self, bytes: usize) -> Option<Held> {
        if bytes == 0 {
            return Some(Held(None));
        }
        self.try_take(bytes).map(|permit| Held(Some(permit)))
    }
}

/// Bytes reserved from a tenant's and the process's budgets, not from the tunnel's own
/// (counted with the charges in `relay_budget_bytes_in_use`), given back on drop: what
/// protects the relay and the other tenants, for a buffer whose size one tunnel's own
/// budget need not cap (it is bounded per tunnel already).
#[derive(Debug, Default)]
pub struct Reserved {
    tenant: Held,
    process: Held,
}

impl Reserved {
    /// Bytes reserved.
    pub fn bytes(&self) -> usize {
        self.process.bytes()
    }

    /// Gives back `bytes` of this reservation (all of it, if it holds less).
    pub fn release(&mut self, bytes: usize) {
        let given = bytes.min(self.bytes());
        self.tenant.release(given);
        self.process.release(given);
        if given > 0 {
            telemetry::budget_in_use(-(given as f64));
        }
    }

    /// Adds `other` to this reservation (both given back together).
    pub fn merge(&mut self, mut other: Reserved) {
        // `other` gives nothing back on drop now; this one gives back both.
        self.tenant.merge(std::mem::take(&mut other.tenant));
        self.process.merge(std::mem::take(&mut other.process));
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        let bytes = self.bytes();
        if bytes > 0 {
            telemetry::budget_in_use(-(bytes as f64));
        }
    }
}

/// Bytes held from one [`Budget`], given back on drop.
#[derive(Debug, Default)]
pub struct Held(Option<OwnedSemaphorePermit>);

impl Held {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.0.as_ref().map_or(0, OwnedSemaphorePermit::num_permits)
    }

    /// Gives back `bytes` of what this holds (all of it, if it holds less).
    pub fn release(&mut self, bytes: usize) {
        let Some(held) = &mut self.0 else {
            return;
        };
        if bytes >= held.num_permits() {
            self.0 = None;
        } else {
            drop(held.split(bytes));
        }
    }

    /// Adds `other` to what this holds (both given back together).
    pub fn merge(&mut self, other: Held) {
        match (&mut self.0, other.0) {
            (_, None) => {}
            (None, Some(more)) => self.0 = Some(more),
            (Some(held), Some(more)) => held.merge(more),
        }
    }
}

/// One tenant's share of the process's budget, shared by all its tunnels: what the
/// buffers of every host it runs may hold together, so that one tenant (an agent and its
/// clients, however many tunnels it opens) cannot fill the relay for everyone.
#[derive(Debug, Clone)]
pub struct Tenant {
    share: Arc<Share>,
}

#[derive(Debug)]
struct Share {
    budget: Budget,
    key: Arc<str>,
    /// Where the share is listed, to unlist it when its last tunnel goes.
    registry: std::sync::Weak<Registry>,
}

type Registry = std::sync::Mutex<std::collections::HashMap<Arc<str>, std::sync::Weak<Share>>>;

impl Drop for Share {
    fn drop(&mut self) {
        let Some(registry) = self.registry.upgrade() else {
            return;
        };
        let mut shares = registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Only if the entry is this dead share, not a newer one for the same tenant.
        if shares
            .get(&self.key)
            .is_some_and(|share| share.strong_count() == 0)
        {
            shares.remove(&self.key);
        }
    }
}

impl Tenant {
    /// A tenant of `size` bytes listed nowhere (one-off tunnels, tests).
    pub fn alone(size: usize) -> Tenant {
        Tenant {
            share: Arc::new(Share {
                budget: Budget::new(size),
                key: Arc::from(""),
                registry: std::sync::Weak::new(),
            }),
        }
    }

    /// Bytes this tenant's tunnels hold now.
    pub fn in_use(&self) -> usize {
        self.share.budget.in_use()
    }
}

/// Every tenant with a tunnel here, by the subject of its host token: each gets a share
/// of `size` bytes, listed while one of its tunnels holds it.
#[derive(Debug, Clone)]
pub struct Tenants {
    size: usize,
    shares: Arc<Registry>,
}

impl Tenants {
    /// Shares of `size` bytes each.
    pub fn new(size: usize) -> Tenants {
        Tenants {
            size,
            shares: Arc::default(),
        }
    }

    /// The share of the tenant named `subject`: the one its other tunnels hold, or a new
    /// one.
    pub fn of(&self, subject: &str) -> Tenant {
        let mut shares = self
            .shares
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(share) = shares.get(subject).and_then(std::sync::Weak::upgrade) {
            return Tenant { share };
        }
        let key: Arc<str> = Arc::from(subject);
        let share = Arc::new(Share {
            budget: Budget::new(self.size),
            key: key.clone(),
            registry: Arc::downgrade(&self.shares),
        });
        shares.insert(key, Arc::downgrade(&share));
        Tenant { share }
    }

    /// Tenants listed now.
    pub fn len(&self) -> usize {
        self.shares
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// Whether no tenant is listed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The budgets one tunnel's buffers are charged against: its own, its tenant's and the
/// process's.
#[derive(Debug, Clone)]
pub struct TunnelBudget {
    tunnel: Budget,
    tenant: Tenant,
    process: Budget,
}

impl TunnelBudget {
    /// A tunnel's own budget of `size` bytes, inside `tenant`'s share and `process`.
    pub fn new(size: usize, tenant: &Tenant, process: &Budget) -> TunnelBudget {
        TunnelBudget {
            tunnel: Budget::new(size),
            tenant: tenant.clone(),
            process: process.clone(),
        }
    }

    /// Charges against `process` alone (its own pools are as large): for buffers that
    /// belong to a client's connection rather than to a tunnel.
    pub fn process_only(process: &Budget) -> TunnelBudget {
        TunnelBudget::new(process.size(), &Tenant::alone(process.size()), process)
    }

    /// A tunnel whose tenant is itself (tests, one-off tunnels).
    pub fn alone(size: usize, process: &Budget) -> TunnelBudget {
        TunnelBudget::new(size, &Tenant::alone(size), process)
    }

    /// Bytes this tunnel holds now.
    pub fn in_use(&self) -> usize {
        self.tunnel.in_use()
    }

    fn tenant(&self) -> &Budget {
        &self.tenant.share.budget
    }

    /// The most one charge can ever hold: the smallest of the three budgets.
    pub fn most(&self) -> usize {
        self.tunnel
            .size
            .min(self.tenant().size)
            .min(self.process.size)
    }

    /// Charges `bytes` against all three budgets, or none: `Err` names the one that is
    /// full (and the refusal is counted).
    pub fn try_charge(&self, bytes: usize) -> Result<Charge, Scope> {
        if bytes == 0 {
            return Ok(Charge::default());
        }
        let Some(tunnel) = self.tunnel.try_take(bytes) else {
            telemetry::budget_refused(Scope::Tunnel);
            return Err(Scope::Tunnel);
        };
        let Some(tenant) = self.tenant().try_take(bytes) else {
            telemetry::budget_refused(Scope::Tenant);
            return Err(Scope::Tenant);
        };
        let Some(process) = self.process.try_take(bytes) else {
            telemetry::budget_refused(Scope::Process);
            return Err(Scope::Process);
        };
        telemetry::budget_in_use(bytes as f64);
        Ok(Charge {
            held: Some(Permits {
                tunnel,
                tenant,
                process,
            }),
        })
    }

    /// As much of `most` bytes as the tenant's and the process's budgets have room for
    /// now, halving from `most` down to `least`: a reservation that can make do with less
    /// (an HTTP/2 receive window; not against the tunnel's own budget, which one window
    /// fits in many times over). `None` (a refusal, counted) when not even `least` fits.
    pub fn try_reserve_up_to(&self, most: usize, least: usize) -> Option<Reserved> {
        let mut bytes = most.max(least);
        loop {
            if let (Some(tenant), Some(process)) =
                (self.tenant().try_take(bytes), self.process.try_take(bytes))
            {
                telemetry::budget_in_use(bytes as f64);
                return Some(Reserved {
                    tenant: Held(Some(tenant)),
                    process: Held(Some(process)),
                });
            }
            if bytes <= least {
                telemetry::budget_refused(Scope::Process);
                return None;
            }
            bytes = (bytes / 2).max(least);
        }
    }

    /// The most one reservation can ever hold: the smaller of the tenant's and the
    /// process's budgets.
    pub fn most_shared(&self) -> usize {
        self.tenant().size.min(self.process.size)
    }

    /// Reserves `bytes` from the tenant's and the process's budgets, or neither: `Err`
    /// names the one that is full (and the refusal is counted).
    pub fn try_reserve(&self, bytes: usize) -> Result<Reserved, Scope> {
        if bytes == 0 {
            return Ok(Reserved::default());
        }
        let Some(tenant) = self.tenant().try_take(bytes) else {
            telemetry::budget_refused(Scope::Tenant);
            return Err(Scope::Tenant);
        };
        let Some(process) = self.process.try_take(bytes) else {
            telemetry::budget_refused(Scope::Process);
            return Err(Scope::Process);
        };
        telemetry::budget_in_use(bytes as f64);
        Ok(Reserved {
            tenant: Held(Some(tenant)),
            process: Held(Some(process)),
        })
    }

    /// Reserves `bytes` from the tenant's and the process's budgets, waiting until both
    /// have room (at most [`TunnelBudget::most_shared`]).
    ///
    /// # Cancel safety
    /// Cancel safe: nothing is reserved until it returns.
    pub async fn reserve(&self, bytes: usize) -> Reserved {
        let Ok(bytes) = u32::try_from(bytes.min(self.most_shared())) else {
            return Reserved::default();
        };
        if bytes == 0 {
            return Reserved::default();
        }
        // Tenant before process, as charges take them.
        let Some(tenant) = self.tenant().acquire(bytes).await else {
            return Reserved::default();
        };
        let Some(process) = self.process.acquire(bytes).await else {
            return Reserved::default();
        };
        telemetry::budget_in_use(f64::from(bytes));
        Reserved {
            tenant: Held(Some(tenant)),
            process: Held(Some(process)),
        }
    }

    /// Charges `bytes` against all three budgets, waiting until they have room: the
    /// backpressure of a client writing faster than its host reads. A charge larger than
    /// a budget takes the whole budget (it could never fit otherwise).
    ///
    /// # Cancel safety
    /// Cancel safe: nothing is charged until it returns.
    pub async fn charge(&self, bytes: usize) -> Charge {
        let Ok(bytes) = u32::try_from(bytes.min(self.most())) else {
            return Charge::default();
        };
        if bytes == 0 {
            return Charge::default();
        }
        // Always in this order (tunnel, tenant, process), so that no two waiting charges
        // can each hold what the other waits for.
        let (Some(tunnel), Some(tenant), Some(process)) = (
            self.tunnel.acquire(bytes).await,
            self.tenant().acquire(bytes).await,
            self.process.acquire(bytes).await,
        ) else {
            return Charge::default();
        };
        telemetry::budget_in_use(f64::from(bytes));
        Charge {
            held: Some(Permits {
                tunnel,
                tenant,
                process,
            }),
        }
    }
}

/// Bytes held against a [`TunnelBudget`], given back on drop.
#[derive(Debug, Default)]
pub struct Charge {
    held: Option<Permits>,
}

/// The same bytes from each of a tunnel's three budgets.
#[derive(Debug)]
struct Permits {
    tunnel: OwnedSemaphorePermit,
    tenant: OwnedSemaphorePermit,
    process: OwnedSemaphorePermit,
}

impl Charge {
    /// Bytes charged.
    pub fn bytes(&self) -> usize {
        self.held
            .as_ref()
            .map_or(0, |held| held.tunnel.num_permits())
    }

    /// Gives back `bytes` of this charge (all of it, if it holds less).
    pub fn release(&mut self, bytes: usize) {
        let Some(held) = &mut self.held else {
            return;
        };
        let holding = held.tunnel.num_permits();
        if bytes >= holding {
            drop(self.held.take());
            telemetry::budget_in_use(-(holding as f64));
            return;
        }
        drop(held.tunnel.split(bytes));
        drop(held.tenant.split(bytes));
        drop(held.process.split(bytes));
        telemetry::budget_in_use(-(bytes as f64));
    }

    /// Adds `other` to this charge (both given back together).
    pub fn merge(&mut self, mut other: Charge) {
        // `other` gives nothing back on drop now; this charge gives back both.
        let more = other.held.take();
        match (&mut self.held, more) {
            (_, None) => {}
            (None, Some(held)) => self.held = Some(held),
            (Some(held), Some(more)) => {
                held.tunnel.merge(more.tunnel);
                held.tenant.merge(more.tenant);
                held.process.merge(more.process);
            }
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        let bytes = self.bytes();
        if bytes > 0 {
            telemetry::budget_in_use(-(bytes as f64));
        }
    }
}

/// What a tunnel has handed to a sender that buffers (HTTP/2's send buffers) and the
/// socket has not yet taken, charged against the tunnel's budgets: incurred as bytes are
/// handed over, paid as the socket takes bytes, whichever stream they belong to. It
/// over-counts rather than under-counts: bytes a reset stream dropped unsent stay charged
/// until as many more have been written, or the connection ends
/// ([`Debt::forgive`]).
#[derive(Debug)]
pub struct Debt {
    budget: TunnelBudget,
    /// Held only to merge or release, never across an await.
    owed: std::sync::Mutex<Charge>,
    /// The sender is gone: nothing handed to it is held any more, and nothing more is.
    forgiven: std::sync::atomic::AtomicBool,
    /// Whether anything may be owed: a write on a connection that owes nothing (most of
    /// them: plain HTTP/1.1) takes no lock.
    owing: std::sync::atomic::AtomicBool,
}

impl Debt {
    /// No debt yet, charged against `budget`.
    pub fn new(budget: &TunnelBudget) -> Debt {
        Debt {
            budget: budget.clone(),
            owed: std::sync::Mutex::new(Charge::default()),
            forgiven: std::sync::atomic::AtomicBool::new(false),
            owing: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn owed(&self) -> std::sync::MutexGuard<'_, Charge> {
        self.owed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Charges `bytes` about to be handed over, waiting for room (the backpressure of a
    /// sender faster than the tunnel's socket).
    ///
    /// # Cancel safety
    /// Cancel safe: nothing is charged until it returns.
    pub async fn incur(&self, bytes: usize) {
        if self.is_forgiven() {
            return;
        }
        let charge = self.budget.charge(bytes).await;
        if !self.is_forgiven() {
            self.owed().merge(charge);
            self.owing.store(true, std::sync::atomic::Ordering::Release);
        }
    }

    fn is_forgiven(&self) -> bool {
        self.forgiven.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The socket took `bytes`.
    pub fn paid(&self, bytes: usize) {
        if !self.owing.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let mut owed = self.owed();
        owed.release(bytes);
        if owed.bytes() == 0 {
            // Under the lock: an `incur` merging now sets it again after this.
            self.owing
                .store(false, std::sync::atomic::Ordering::Release);
        }
    }

    /// Bytes owed now.
    pub fn owed_bytes(&self) -> usize {
        self.owed().bytes()
    }

    /// The sender is gone with all it held: nothing is owed any more, and what is
    /// handed over later (to a sender that no longer exists) is not charged.
    pub fn forgive(&self) {
        self.forgiven
            .store(true, std::sync::atomic::Ordering::Release);
        drop(std::mem::take(&mut *self.owed()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_charge_takes_from_both_budgets_and_gives_back_on_drop() {
        let process = Budget::new(100);
        let tunnel = TunnelBudget::alone(60, &process);
        let charge = tunnel.try_charge(40).unwrap();
        assert_eq!((tunnel.in_use(), process.in_use()), (40, 40));
        drop(charge);
        assert_eq!((tunnel.in_use(), process.in_use()), (0, 0));
    }

    #[test]
    fn the_tunnel_budget_caps_one_tunnel_and_the_process_budget_all_of_them() {
        let process = Budget::new(100);
        let first = TunnelBudget::alone(60, &process);
        let second = TunnelBudget::alone(60, &process);
        let _a = first.try_charge(50).unwrap();
        assert_eq!(first.try_charge(20).unwrap_err(), Scope::Tunnel);
        let _b = second.try_charge(40).unwrap();
        // The second tunnel is within its own budget, but the process is full; and a
        // refused charge takes nothing from either.
        assert_eq!(second.try_charge(20).unwrap_err(), Scope::Process);
        assert_eq!((second.in_use(), process.in_use()), (40, 90));
    }

    #[tokio::test]
    async fn a_waiting_charge_goes_through_once_room_is_given_back() {
        let process = Budget::new(100);
        let tunnel = TunnelBudget::alone(50, &process);
        let held = tunnel.try_charge(40).unwrap();
        let waiting = tokio::spawn({
            let tunnel = tunnel.clone();
            async move { tunnel.charge(30).await.bytes() }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "40 + 30 is over the tunnel's 50");
        drop(held);
        assert_eq!(waiting.await.unwrap(), 30);
        // Larger than the budget: takes all of it rather than waiting for ever.
        assert_eq!(tunnel.charge(500).await.bytes(), 50);
    }

    #[test]
    fn a_reservation_that_can_make_do_with_less_takes_what_there_is_room_for() {
        let process = Budget::new(100);
        let tunnel = TunnelBudget::new(10, &Tenant::alone(1_000), &process);
        // Not against the tunnel's own 10: a window is a share of the tenant's and the
        // process's budgets.
        let first = tunnel.try_reserve_up_to(64, 8).unwrap();
        assert_eq!(first.bytes(), 64);
        drop(first);
        let _others = process.try_take_now(64).unwrap();
        // 36 left: 64 does not fit, 32 does (and is given back at once here).
        assert_eq!(tunnel.try_reserve_up_to(64, 8).unwrap().bytes(), 32);
        let _more = process.try_take_now(30).unwrap();
        assert!(
            tunnel.try_reserve_up_to(64, 8).is_none(),
            "6 left, less than the least"
        );
        assert_eq!(process.in_use(), 94);
    }

    #[test]
    fn one_tenant_holds_no_more_than_its_share_however_many_tunnels_it_opens() {
        let process = Budget::new(1_000);
        let tenants = Tenants::new(100);
        let hoarder = tenants.of("hoarder");
        let tunnels: Vec<_> = (0..5)
            .map(|_| TunnelBudget::new(60, &tenants.of("hoarder"), &process))
            .collect();
        let _held: Vec<_> = tunnels[..2]
            .iter()
            .map(|tunnel| tunnel.try_charge(50).unwrap())
            .collect();
        assert_eq!(hoarder.in_use(), 100);
        assert_eq!(tunnels[2].try_charge(1).unwrap_err(), Scope::Tenant);
        // Another tenant is served from the rest of the process's budget.
        let other = TunnelBudget::new(60, &tenants.of("other"), &process);
        assert_eq!(other.try_charge(60).unwrap().bytes(), 60);
        assert_eq!(tenants.len(), 2);
    }

    #[test]
    fn a_tenant_is_unlisted_when_its_last_tunnel_goes() {
        let process = Budget::new(1_000);
        let tenants = Tenants::new(100);
        let first = TunnelBudget::new(60, &tenants.of("a"), &process);
        let second = TunnelBudget::new(60, &tenants.of("a"), &process);
        assert_eq!(tenants.len(), 1);
        drop(first);
        assert_eq!(tenants.len(), 1, "its other tunnel still holds the share");
        drop(second);
        assert!(tenants.is_empty());
        // A tenant that comes back gets a share again.
        let _again = tenants.of("a");
        assert_eq!(tenants.len(), 1);
    }

    #[test]
    fn part_of_a_charge_is_given_back_to_both_budgets() {
        let process = Budget::new(100);
        let tunnel = TunnelBudget::alone(100, &process);
        let mut charge = tunnel.try_charge(40).unwrap();
        charge.release(15);
        assert_eq!(
            (charge.bytes(), tunnel.in_use(), process.in_use()),
            (25, 25, 25)
        );
        charge.release(1_000);
        assert_eq!(
            (charge.bytes(), tunnel.in_use(), process.in_use()),
            (0, 0, 0)
        );
    }

    #[tokio::test]
    async fn a_debt_is_charged_as_bytes_are_handed_over_and_given_back_as_they_are_written() {
        let process = Budget::new(100);
        let tunnel = TunnelBudget::alone(60, &process);
        let debt = Debt::new(&tunnel);
        debt.incur(30).await;
        debt.incur(20).await;
        assert_eq!((debt.owed_bytes(), process.in_use()), (50, 50));
        debt.paid(35);
        assert_eq!((debt.owed_bytes(), tunnel.in_use()), (15, 15));
        // Frame headers are written too: paying more than is owed owes nothing.
        debt.paid(100);
        assert_eq!((debt.owed_bytes(), process.in_use()), (0, 0));
        let debt = std::sync::Arc::new(debt);
        debt.incur(60).await;
        let waiting = tokio::spawn({
            let debt = debt.clone();
            async move { debt.incur(10).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "the tunnel's 60 are owed");
        // Nothing more is written; the connection ends, and with it what it held.
        debt.forgive();
        waiting.await.unwrap();
        assert_eq!((debt.owed_bytes(), tunnel.in_use()), (0, 0));
        debt.incur(50).await;
        assert_eq!(
            tunnel.in_use(),
            0,
            "nothing is charged to a sender that is gone"
        );
    }

    #[test]
    fn merged_charges_are_given_back_together() {
        let process = Budget::new(100);
        let tunnel = TunnelBudget::alone(100, &process);
        let mut charge = Charge::default();
        charge.merge(tunnel.try_charge(10).unwrap());
        charge.merge(tunnel.try_charge(15).unwrap());
        assert_eq!(charge.bytes(), 25);
        drop(charge);
        assert_eq!(process.in_use(), 0);
    }
}
