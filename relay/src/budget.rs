//! Byte budgets: how much memory the relay may hold for its peers, per tunnel and for the
//! whole process.
//!
//! v1 buffers every body whole and has no flow control, so what the relay holds is
//! decided by its peers: a client uploading, a host answering, a host flooding a channel.
//! Every such buffer is charged, while it is held, against two budgets at once:
//! - the tunnel's ([`crate::limits::TUNNEL_BUDGET`]): one host and its clients cannot
//!   take more than their share, whatever they do;
//! - the process's ([`crate::limits::memory_budget`]): the relay as a whole stays within
//!   its machine's memory, however many tunnels there are.
//!
//! A [`Charge`] gives its bytes back when dropped, so a charge travels with what it pays
//! for (a request body into the tunnel queue, a response body into the client's
//! response) and ends when that is written or dropped. Over a budget, the request is
//! refused (503) or the channel closed (1013), never queued: the other tenants go on.
//! `h2` tunnels are not charged: HTTP/2 flow control bounds them (see
//! [`crate::limits::h2`]).

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
    /// The whole process's budget: the relay is short of memory.
    Process,
}

impl Scope {
    /// `"tunnel"` or `"process"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Tunnel => "tunnel",
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
        Held(Arc::clone(&self.bytes).acquire_many_owned(bytes).await.ok())
    }

    /// `bytes` from this pool alone if there is room now.
    pub fn try_take_now(&self, bytes: usize) -> Option<Held> {
        if bytes == 0 {
            return Some(Held(None));
        }
        self.try_take(bytes).map(|permit| Held(Some(permit)))
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

/// The budgets one tunnel's buffers are charged against: its own and the process's.
#[derive(Debug, Clone)]
pub struct TunnelBudget {
    tunnel: Budget,
    process: Budget,
}

impl TunnelBudget {
    /// A tunnel's own budget of `size` bytes, inside `process`.
    pub fn new(size: usize, process: &Budget) -> TunnelBudget {
        TunnelBudget {
            tunnel: Budget::new(size),
            process: process.clone(),
        }
    }

    /// Bytes this tunnel holds now.
    pub fn in_use(&self) -> usize {
        self.tunnel.in_use()
    }

    /// Charges `bytes` against both budgets, or neither: `Err` names the one that is
    /// full (and the refusal is counted).
    pub fn try_charge(&self, bytes: usize) -> Result<Charge, Scope> {
        if bytes == 0 {
            return Ok(Charge::default());
        }
        let Some(tunnel) = self.tunnel.try_take(bytes) else {
            telemetry::budget_refused(Scope::Tunnel);
            return Err(Scope::Tunnel);
        };
        let Some(process) = self.process.try_take(bytes) else {
            telemetry::budget_refused(Scope::Process);
            return Err(Scope::Process);
        };
        telemetry::budget_in_use(bytes as f64);
        Ok(Charge {
            held: Some((tunnel, process)),
        })
    }
}

impl TunnelBudget {
    /// Charges `bytes` against both budgets, waiting until both have room: the
    /// backpressure of a client writing faster than its host reads. A charge larger than
    /// a budget takes the whole budget (it could never fit otherwise).
    ///
    /// # Cancel safety
    /// Cancel safe: nothing is charged until it returns.
    pub async fn charge(&self, bytes: usize) -> Charge {
        let bytes = bytes.min(self.tunnel.size).min(self.process.size);
        let Ok(bytes) = u32::try_from(bytes) else {
            return Charge::default();
        };
        if bytes == 0 {
            return Charge::default();
        }
        // Never closed, so acquiring cannot fail.
        let Ok(tunnel) = Arc::clone(&self.tunnel.bytes)
            .acquire_many_owned(bytes)
            .await
        else {
            return Charge::default();
        };
        let Ok(process) = Arc::clone(&self.process.bytes)
            .acquire_many_owned(bytes)
            .await
        else {
            return Charge::default();
        };
        telemetry::budget_in_use(f64::from(bytes));
        Charge {
            held: Some((tunnel, process)),
        }
    }
}

/// Bytes held against a [`TunnelBudget`], given back on drop.
#[derive(Debug, Default)]
pub struct Charge {
    held: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
}

impl Charge {
    /// Bytes charged.
    pub fn bytes(&self) -> usize {
        self.held
            .as_ref()
            .map_or(0, |(tunnel, _)| tunnel.num_permits())
    }

    /// Adds `other` to this charge (both given back together).
    pub fn merge(&mut self, mut other: Charge) {
        // `other` gives nothing back on drop now; this charge gives back both.
        let more = other.held.take();
        match (&mut self.held, more) {
            (_, None) => {}
            (None, Some(held)) => self.held = Some(held),
            (Some((tunnel, process)), Some((more_tunnel, more_process))) => {
                tunnel.merge(more_tunnel);
                process.merge(more_process);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_charge_takes_from_both_budgets_and_gives_back_on_drop() {
        let process = Budget::new(100);
        let tunnel = TunnelBudget::new(60, &process);
        let charge = tunnel.try_charge(40).unwrap();
        assert_eq!((tunnel.in_use(), process.in_use()), (40, 40));
        drop(charge);
        assert_eq!((tunnel.in_use(), process.in_use()), (0, 0));
    }

    #[test]
    fn the_tunnel_budget_caps_one_tunnel_and_the_process_budget_all_of_them() {
        let process = Budget::new(100);
        let first = TunnelBudget::new(60, &process);
        let second = TunnelBudget::new(60, &process);
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
        let tunnel = TunnelBudget::new(50, &process);
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
    fn merged_charges_are_given_back_together() {
        let process = Budget::new(100);
        let tunnel = TunnelBudget::new(100, &process);
        let mut charge = Charge::default();
        charge.merge(tunnel.try_charge(10).unwrap());
        charge.merge(tunnel.try_charge(15).unwrap());
        assert_eq!(charge.bytes(), 25);
        drop(charge);
        assert_eq!(process.in_use(), 0);
    }
}
