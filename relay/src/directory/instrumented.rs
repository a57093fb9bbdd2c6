//! A [`Directory`] decorator that counts every operation, its errors and its latency.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::{Directory, DirectoryError, DirectoryPage, Owner};
use crate::host_id::HostId;

/// Wraps a directory and records `relay_directory_ops_total{op,outcome}` and
/// `relay_directory_op_seconds{op}` for each call.
#[derive(Debug)]
pub struct Instrumented {
    inner: Arc<dyn Directory>,
}

impl Instrumented {
    /// Instruments `inner`.
    pub fn new(inner: Arc<dyn Directory>) -> Instrumented {
        Instrumented { inner }
    }
}

async fn measured<T>(
    op: &'static str,
    call: impl Future<Output = Result<T, DirectoryError>>,
) -> Result<T, DirectoryError> {
    let started = Instant::now();
    let result = call.await;
    let outcome = if result.is_ok() { "ok" } else { "error" };
    metrics::counter!("relay_directory_ops_total", "op" => op, "outcome" => outcome).increment(1);
    metrics::histogram!("relay_directory_op_seconds", "op" => op)
        .record(started.elapsed().as_secs_f64());
    result
}

#[async_trait]
impl Directory for Instrumented {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    async fn register(
        &self,
        host: &HostId,
        owner: &Owner,
    ) -> Result<Option<Owner>, DirectoryError> {
        measured("register", self.inner.register(host, owner)).await
    }

    async fn unregister(&self, host: &HostId, owner: &Owner) -> Result<bool, DirectoryError> {
        measured("unregister", self.inner.unregister(host, owner)).await
    }

    async fn lookup(&self, host: &HostId) -> Result<Option<Owner>, DirectoryError> {
        measured("lookup", self.inner.lookup(host)).await
    }

    async fn lookup_many(&self, hosts: &[HostId]) -> Result<Vec<Option<Owner>>, DirectoryError> {
        measured("lookup_many", self.inner.lookup_many(hosts)).await
    }

    async fn list(&self, cursor: u64, count: usize) -> Result<DirectoryPage, DirectoryError> {
        measured("list", self.inner.list(cursor, count)).await
    }

    async fn heartbeat(&self, host: &HostId, owner: &Owner) -> Result<bool, DirectoryError> {
        measured("heartbeat", self.inner.heartbeat(host, owner)).await
    }

    async fn clear_owned(&self, owner: &Owner) -> Result<usize, DirectoryError> {
        measured("clear_owned", self.inner.clear_owned(owner)).await
    }

    async fn retire(
        &self,
        owner: &Owner,
        hosts: Option<&[HostId]>,
        mark_for: Duration,
    ) -> Result<usize, DirectoryError> {
        measured("retire", self.inner.retire(owner, hosts, mark_for)).await
    }

    async fn is_moving(&self, host: &HostId) -> Result<bool, DirectoryError> {
        measured("is_moving", self.inner.is_moving(host)).await
    }

    async fn last_seen_many(&self, hosts: &[HostId]) -> Result<Vec<Option<u64>>, DirectoryError> {
        measured("last_seen_many", self.inner.last_seen_many(hosts)).await
    }

    async fn sweep(&self, owner: &Owner, limit: usize) -> Result<usize, DirectoryError> {
        measured("sweep", self.inner.sweep(owner, limit)).await
    }

    async fn reassert(&self, hosts: &[HostId], owner: &Owner) -> Result<usize, DirectoryError> {
        measured("reassert", self.inner.reassert(hosts, owner)).await
    }

    async fn advertise(
        &self,
        owner: &Owner,
        addr: &str,
        ttl: Duration,
    ) -> Result<(), DirectoryError> {
        measured("advertise", self.inner.advertise(owner, addr, ttl)).await
    }

    async fn address_of(&self, owner: &Owner) -> Result<Option<String>, DirectoryError> {
        measured("address_of", self.inner.address_of(owner)).await
    }

    async fn take_over(
        &self,
        host: &HostId,
        from: &Owner,
        to: &Owner,
    ) -> Result<bool, DirectoryError> {
        measured("take_over", self.inner.take_over(host, from, to)).await
    }

    async fn hop_key(&self) -> Result<String, DirectoryError> {
        measured("hop_key", self.inner.hop_key()).await
    }
}
