//! The tunnel directory: which relay machine owns the tunnel of each host.
//!
//! Every machine keeps its tunnels in process (the [`crate::registry`]) and publishes
//! ownership here, so a request that lands on another machine can be routed to the
//! owner. Entries live by TTL and are refreshed by heartbeats (pongs); writes that remove
//! or refresh an entry are compare-and-act on the owner, so a machine can never remove or
//! resurrect an entry another machine has taken since.
//!
//! [`MemoryDirectory`] is the embedded default (one machine, no Redis);
//! [`RedisDirectory`] is the shared one, for a fleet of machines (see its module docs for
//! the key layout, the liveness design and what Redis deployments it supports).

mod instrumented;
mod memory;
pub mod redis;

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;

use crate::host_id::HostId;

pub use self::redis::RedisDirectory;
pub use instrumented::Instrumented;
pub use memory::MemoryDirectory;

/// One relay machine, as written in the directory: `region:machineId`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Owner {
    /// Fly region (or `local`).
    pub region: String,
    /// Machine id, unique within the app.
    pub machine_id: String,
}

/// Why a region or machine id is not usable in an owner value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {value:?} must be 1-64 characters from [A-Za-z0-9_.-]")]
pub struct InvalidOwner {
    what: &'static str,
    value: String,
}

impl Owner {
    /// An owner from a region and a machine id, both checked so that the encoded form
    /// `region:machineId` decodes back unambiguously.
    ///
    /// # Errors
    /// When either part is empty, too long or has a character outside `[A-Za-z0-9_.-]`.
    pub fn new(region: &str, machine_id: &str) -> Result<Owner, InvalidOwner> {
        fn check(what: &'static str, value: &str) -> Result<(), InvalidOwner> {
            let ok = !value.is_empty()
                && value.len() <= 64
                && value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
            if ok {
                Ok(())
            } else {
                Err(InvalidOwner {
                    what,
                    value: value.to_owned(),
                })
            }
        }
        check("region", region)?;
        check("machine id", machine_id)?;
        Ok(Owner {
            region: region.to_owned(),
            machine_id: machine_id.to_owned(),
        })
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.region, self.machine_id)
    }
}

impl FromStr for Owner {
    type Err = InvalidOwner;

    /// ```
    /// use relay::directory::Owner;
    /// let owner: Owner = "ams:e7843d4f".parse().unwrap();
    /// assert_eq!((owner.region.as_str(), owner.machine_id.as_str()), ("ams", "e7843d4f"));
    /// assert_eq!(owner.to_string(), "ams:e7843d4f");
    /// ```
    fn from_str(s: &str) -> Result<Owner, InvalidOwner> {
        let (region, machine) = s.split_once(':').unwrap_or((s, ""));
        Owner::new(region, machine)
    }
}

/// One page of [`Directory::list`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirectoryPage {
    /// Hosts and their owners.
    pub entries: Vec<(HostId, Owner)>,
    /// Where the next page starts; 0 when this was the last.
    pub next: u64,
}

/// A directory operation failed. The relay's infrastructure (not a host or client) is at
/// fault; callers log it and carry on with what they hold locally.
#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    /// The backend could not be reached or answered with an error.
    #[error("directory unavailable: {0}")]
    Unavailable(String),
    /// The backend did not answer in time.
    #[error("directory timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// The backend holds a value the relay cannot decode.
    #[error("directory holds a corrupt entry: {0}")]
    Corrupt(String),
}

/// Where each host's tunnel is. All operations are safe against concurrent machines.
///
/// # Cancel safety
/// Every method is one atomic request to the backend (multi-step writes are one script;
/// the Redis directory may send it twice when the connection drops, and every write is
/// idempotent in effect): dropping the future leaves the operation undone or done, never
/// half-done.
#[async_trait]
pub trait Directory: Send + Sync + fmt::Debug + 'static {
    /// A short name of the backend for logs (`memory`, `redis`).
    fn kind(&self) -> &'static str;

    /// Makes `owner` the owner of `host` with a fresh TTL, whoever owned it before.
    /// Returns the previous owner, if another one was live.
    async fn register(&self, host: &HostId, owner: &Owner)
    -> Result<Option<Owner>, DirectoryError>;

    /// Removes `host` only if `owner` still owns it (compare-and-delete). Returns whether
    /// an entry was removed.
    async fn unregister(&self, host: &HostId, owner: &Owner) -> Result<bool, DirectoryError>;

    /// The live owner of `host`, if any.
    async fn lookup(&self, host: &HostId) -> Result<Option<Owner>, DirectoryError>;

    /// The live owner of each of `hosts`, in order, in one backend request (a draining
    /// relay asks which of its hosts have registered elsewhere). Callers bound the batch
    /// ([`crate::limits::LOOKUP_BATCH`]). A corrupt entry reads as no owner (logged).
    async fn lookup_many(&self, hosts: &[HostId]) -> Result<Vec<Option<Owner>>, DirectoryError>;

    /// One page of the whole directory (every owner), for operators: about `count` live
    /// entries from `cursor` (0 starts a walk), and the cursor of the next page (0: the
    /// walk is done). As with Redis `SCAN`, an entry may show on two pages of one walk,
    /// and entries that come or go during it may or may not show.
    async fn list(&self, cursor: u64, count: usize) -> Result<DirectoryPage, DirectoryError>;

    /// Refreshes the TTL of `host` only if `owner` still owns it; never recreates an entry
    /// that was removed. Returns whether the entry was refreshed.
    async fn heartbeat(&self, host: &HostId, owner: &Owner) -> Result<bool, DirectoryError>;

    /// Removes every entry `owner` still owns (compare-and-delete each), at a cost
    /// proportional to what it owns. Returns how many were removed.
    async fn clear_owned(&self, owner: &Owner) -> Result<usize, DirectoryError>;

    /// Lets hosts go while draining: removes each of `hosts` (`None`: every host) that
    /// `owner` still owns (compare-and-delete) and leaves for each a mark that it is
    /// *moving*, for `mark_for`: relays hold requests for a moving host a little while
    /// it registers again ([`Directory::is_moving`]) instead of answering that it is not
    /// connected. Hosts another machine took over stay, unmarked. Returns how many were
    /// removed. One backend request.
    async fn retire(
        &self,
        owner: &Owner,
        hosts: Option<&[HostId]>,
        mark_for: Duration,
    ) -> Result<usize, DirectoryError>;

    /// Whether a draining relay let `host` go less than its mark's lifetime ago
    /// ([`Directory::retire`]).
    async fn is_moving(&self, host: &HostId) -> Result<bool, DirectoryError>;

    /// When each of `hosts` was last seen (registered, or heartbeat), in milliseconds
    /// since the Unix epoch, if within [`crate::limits::SEEN_TTL`]; one backend request.
    async fn last_seen_many(&self, hosts: &[HostId]) -> Result<Vec<Option<u64>>, DirectoryError>;

    /// Tidies up after `owner`, a bounded amount of work per call: drops at most `limit`
    /// stale records. Returns how many were dropped; call it periodically.
    ///
    /// In Redis this walks `owner`'s index (a cursor is kept between calls) and drops the
    /// members whose entry expired or now belongs to another owner. In memory it drops
    /// expired entries (of any owner: the process is the only machine).
    async fn sweep(&self, owner: &Owner, limit: usize) -> Result<usize, DirectoryError>;

    /// Rewrites, for a batch of hosts whose tunnels `owner` holds, each entry that is
    /// absent or already `owner`'s (fresh TTL, back in `owner`'s index); never takes a host
    /// back from an owner that registered it later. Returns how many entries were
    /// (re)written. One backend request per call, whatever the batch size: a reconciler
    /// calls it periodically to repair entries lost to an outage or a flush.
    async fn reassert(&self, hosts: &[HostId], owner: &Owner) -> Result<usize, DirectoryError>;

    /// Publishes `addr`, the address peers forward requests for `owner`'s hosts to, for
    /// `ttl` (call it again before `ttl` runs out to keep it).
    async fn advertise(
        &self,
        owner: &Owner,
        addr: &str,
        ttl: Duration,
    ) -> Result<(), DirectoryError>;

    /// Writes `to` as the owner of `host` if, and only if, `from` is the owner recorded
    /// (compare-and-set): for a machine that holds the host's tunnel while the entry still
    /// names one that said it no longer does (its removal was lost to an outage). Returns
    /// whether it was written.
    async fn take_over(
        &self,
        host: &HostId,
        from: &Owner,
        to: &Owner,
    ) -> Result<bool, DirectoryError>;

    /// The address `owner` advertised, if it has not expired.
    async fn address_of(&self, owner: &Owner) -> Result<Option<String>, DirectoryError>;

    /// The secret every relay sharing this directory puts on the requests it forwards to
    /// another ([`crate::headers::HOP_AUTH`]), so that a client cannot pass for a relay:
    /// made (at random) by the first relay that asks, then the same for all. Embedded: one
    /// per process (there are no peers).
    async fn hop_key(&self) -> Result<String, DirectoryError>;
}

/// A new random hop key: 32 bytes, hex.
pub(crate) fn new_hop_key() -> String {
    use rand::RngCore as _;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
