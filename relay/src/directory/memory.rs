//! The embedded, in-process directory: the default when no Redis is configured.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::{Directory, DirectoryError, DirectoryPage, Owner};
use crate::host_id::HostId;

/// An in-memory directory with the same semantics as the shared one: TTL per entry,
/// compare-and-delete, no resurrection by heartbeat, no stealing by reassert, and a
/// per-owner index so that clearing an owner costs what it owns.
#[derive(Debug)]
pub struct MemoryDirectory {
    ttl: Duration,
    /// See [`Directory::hop_key`]: one per process.
    hop_key: String,
    /// std Mutex: every critical section is a few map operations and never awaits.
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<HostId, Entry>,
    /// hostIds each owner holds. An owner whose set becomes empty is removed.
    by_owner: HashMap<Owner, HashSet<HostId>>,
    /// Advertised address of each owner, with its expiry. Expired ones are dropped when
    /// read or overwritten; there is one per machine, so they never pile up.
    addresses: HashMap<Owner, (String, Instant)>,
    /// Hosts let go while draining, until when ([`Directory::retire`]). Pruned by the
    /// sweep (and when read).
    moving: HashMap<HostId, Instant>,
    /// When each host was last seen: ms since the epoch, and when to forget it. Pruned
    /// by the sweep.
    seen: HashMap<HostId, (u64, Instant)>,
}

#[derive(Debug)]
struct Entry {
    owner: Owner,
    expires_at: Instant,
}

impl MemoryDirectory {
    /// An empty directory whose entries live `ttl` without a heartbeat.
    pub fn new(ttl: Duration) -> MemoryDirectory {
        MemoryDirectory {
            ttl,
            hop_key: super::new_hop_key(),
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the maps inconsistent in a way
        // that matters more than losing the directory, so recover the guard.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl State {
    fn remove(&mut self, host: &HostId) -> Option<Entry> {
        let entry = self.entries.remove(host)?;
        if let Some(hosts) = self.by_owner.get_mut(&entry.owner) {
            hosts.remove(host);
            if hosts.is_empty() {
                self.by_owner.remove(&entry.owner);
            }
        }
        Some(entry)
    }

    /// Writes `host` as `owner`'s, expiring at `expires_at`, replacing any entry.
    fn insert(&mut self, host: &HostId, owner: &Owner, expires_at: Instant) {
        self.remove(host);
        self.entries.insert(
            host.clone(),
            Entry {
                owner: owner.clone(),
                expires_at,
            },
        );
        self.by_owner
            .entry(owner.clone())
            .or_default()
            .insert(host.clone());
    }

    fn saw(&mut self, host: &HostId, now: Instant) {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.seen
            .insert(host.clone(), (ms, now + crate::limits::SEEN_TTL));
    }

    fn live_owner(&self, host: &HostId, now: Instant) -> Option<&Owner> {
        self.entries
            .get(host)
            .filter(|e| e.expires_at > now)
            .map(|e| &e.owner)
    }
}

#[async_trait]
impl Directory for MemoryDirectory {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn register(
        &self,
        host: &HostId,
        owner: &Owner,
    ) -> Result<Option<Owner>, DirectoryError> {
        let now = Instant::now();
        let mut state = self.state();
        let previous = state
            .live_owner(host, now)
            .filter(|prev| *prev != owner)
            .cloned();
        state.insert(host, owner, now + self.ttl);
        state.saw(host, now);
        Ok(previous)
    }

    async fn unregister(&self, host: &HostId, owner: &Owner) -> Result<bool, DirectoryError> {
        let now = Instant::now();
        let mut state = self.state();
        if state.entries.get(host).is_some_and(|e| e.owner == *owner) {
            // An expired entry goes too, but (as in Redis) it was no longer there to remove.
            return Ok(state.remove(host).is_some_and(|e| e.expires_at > now));
        }
        Ok(false)
    }

    async fn lookup(&self, host: &HostId) -> Result<Option<Owner>, DirectoryError> {
        Ok(self.state().live_owner(host, Instant::now()).cloned())
    }

    async fn lookup_many(&self, hosts: &[HostId]) -> Result<Vec<Option<Owner>>, DirectoryError> {
        let now = Instant::now();
        let state = self.state();
        Ok(hosts
            .iter()
            .map(|host| state.live_owner(host, now).cloned())
            .collect())
    }

    /// The cursor is an offset in hostId order.
    async fn list(&self, cursor: u64, count: usize) -> Result<DirectoryPage, DirectoryError> {
        let now = Instant::now();
        let state = self.state();
        let mut live: Vec<(&HostId, &Owner)> = state
            .entries
            .iter()
            .filter(|(_, entry)| entry.expires_at > now)
            .map(|(host, entry)| (host, &entry.owner))
            .collect();
        live.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let start = usize::try_from(cursor)
            .unwrap_or(usize::MAX)
            .min(live.len());
        let end = start.saturating_add(count.max(1)).min(live.len());
        Ok(DirectoryPage {
            entries: live[start..end]
                .iter()
                .map(|(host, owner)| ((*host).clone(), (*owner).clone()))
                .collect(),
            next: if end < live.len() { end as u64 } else { 0 },
        })
    }

    async fn heartbeat(&self, host: &HostId, owner: &Owner) -> Result<bool, DirectoryError> {
        let now = Instant::now();
        let mut state = self.state();
        match state.entries.get_mut(host) {
            Some(entry) if entry.owner == *owner && entry.expires_at > now => {
                entry.expires_at = now + self.ttl;
                state.saw(host, now);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn clear_owned(&self, owner: &Owner) -> Result<usize, DirectoryError> {
        let mut state = self.state();
        let Some(hosts) = state.by_owner.remove(owner) else {
            return Ok(0);
        };
        let now = Instant::now();
        let mut removed = 0;
        for host in hosts {
            if state.entries.get(&host).is_some_and(|e| e.owner == *owner) {
                // Expired entries go too, but only live ones count (as in Redis, where an
                // expired entry is already gone).
                if state
                    .entries
                    .remove(&host)
                    .is_some_and(|e| e.expires_at > now)
                {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    async fn retire(
        &self,
        owner: &Owner,
        hosts: Option<&[HostId]>,
        mark_for: Duration,
    ) -> Result<usize, DirectoryError> {
        let now = Instant::now();
        let mut state = self.state();
        let hosts: Vec<HostId> = match hosts {
            Some(hosts) => hosts.to_vec(),
            None => state
                .by_owner
                .get(owner)
                .map(|hosts| hosts.iter().cloned().collect())
                .unwrap_or_default(),
        };
        let mut removed = 0;
        for host in hosts {
            if state.live_owner(&host, now) == Some(owner) {
                state.remove(&host);
                state.moving.insert(host, now + mark_for);
                removed += 1;
            }
        }
        Ok(removed)
    }

    async fn is_moving(&self, host: &HostId) -> Result<bool, DirectoryError> {
        let now = Instant::now();
        let mut state = self.state();
        match state.moving.get(host) {
            Some(until) if *until > now => Ok(true),
            Some(_) => {
                state.moving.remove(host);
                Ok(false)
            }
            None => Ok(false),
        }
    }

    async fn last_seen_many(&self, hosts: &[HostId]) -> Result<Vec<Option<u64>>, DirectoryError> {
        let now = Instant::now();
        let state = self.state();
        Ok(hosts
            .iter()
            .map(|host| {
                state
                    .seen
                    .get(host)
                    .filter(|(_, until)| *until > now)
                    .map(|(ms, _)| *ms)
            })
            .collect())
    }

    /// Drops at most `limit` expired entries, whoever owns them: in one process every
    /// entry is this machine's. Expired moving marks and last-seen times go too.
    async fn sweep(&self, _owner: &Owner, limit: usize) -> Result<usize, DirectoryError> {
        let now = Instant::now();
        let mut state = self.state();
        state.moving.retain(|_, until| *until > now);
        state.seen.retain(|_, (_, until)| *until > now);
        let expired: Vec<HostId> = state
            .entries
            .iter()
            .filter(|(_, e)| e.expires_at <= now)
            .map(|(host, _)| host.clone())
            .take(limit)
            .collect();
        for host in &expired {
            state.remove(host);
        }
        Ok(expired.len())
    }

    async fn reassert(&self, hosts: &[HostId], owner: &Owner) -> Result<usize, DirectoryError> {
        let now = Instant::now();
        let mut state = self.state();
        let mut written = 0;
        for host in hosts {
            let taken_by_other = state
                .live_owner(host, now)
                .is_some_and(|current| current != owner);
            if !taken_by_other {
                state.insert(host, owner, now + self.ttl);
                written += 1;
            }
        }
        Ok(written)
    }

    async fn advertise(
        &self,
        owner: &Owner,
        addr: &str,
        ttl: Duration,
    ) -> Result<(), DirectoryError> {
        let expires_at = Instant::now() + ttl;
        self.state()
            .addresses
            .insert(owner.clone(), (addr.to_owned(), expires_at));
        Ok(())
    }

    async fn take_over(
        &self,
        host: &HostId,
        from: &Owner,
        to: &Owner,
    ) -> Result<bool, DirectoryError> {
        let now = Instant::now();
        let mut state = self.state();
        if state.live_owner(host, now) != Some(from) {
            return Ok(false);
        }
        state.insert(host, to, now + self.ttl);
        Ok(true)
    }

    async fn hop_key(&self) -> Result<String, DirectoryError> {
        Ok(self.hop_key.clone())
    }

    async fn address_of(&self, owner: &Owner) -> Result<Option<String>, DirectoryError> {
        let now = Instant::now();
        let mut state = self.state();
        match state.addresses.get(owner) {
            Some((addr, expires_at)) if *expires_at > now => Ok(Some(addr.clone())),
            Some(_) => {
                state.addresses.remove(owner);
                Ok(None)
            }
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(s: &str) -> HostId {
        HostId::parse(s).unwrap()
    }
    fn owner(s: &str) -> Owner {
        s.parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn retired_hosts_are_marked_moving_until_the_mark_expires() {
        let dir = MemoryDirectory::new(Duration::from_secs(60));
        let (a, b) = (owner("ams:a"), owner("fra:b"));
        for h in ["h1", "h2", "h3"] {
            dir.register(&host(h), &a).await.unwrap();
        }
        dir.register(&host("h2"), &b).await.unwrap();
        let mark = Duration::from_secs(10);
        assert_eq!(
            dir.retire(&a, Some(&[host("h1"), host("h2")]), mark)
                .await
                .unwrap(),
            1
        );
        assert!(dir.is_moving(&host("h1")).await.unwrap());
        assert!(
            !dir.is_moving(&host("h2")).await.unwrap(),
            "taken over: arrived"
        );
        assert_eq!(dir.lookup(&host("h2")).await.unwrap(), Some(b));
        assert_eq!(dir.retire(&a, None, mark).await.unwrap(), 1);
        assert!(dir.is_moving(&host("h3")).await.unwrap());
        tokio::time::advance(mark).await;
        assert!(!dir.is_moving(&host("h1")).await.unwrap());
        let seen = dir.last_seen_many(&[host("h1"), host("x")]).await.unwrap();
        assert!(seen[0].is_some() && seen[1].is_none(), "{seen:?}");
    }

    #[tokio::test]
    async fn take_over_moves_only_an_entry_that_still_names_the_previous_owner() {
        let dir = MemoryDirectory::new(Duration::from_secs(60));
        let (a, b, c) = (owner("ams:a"), owner("fra:b"), owner("syd:c"));
        dir.register(&host("h"), &a).await.unwrap();
        assert!(!dir.take_over(&host("h"), &c, &b).await.unwrap());
        assert_eq!(dir.lookup(&host("h")).await.unwrap(), Some(a.clone()));
        assert!(dir.take_over(&host("h"), &a, &b).await.unwrap());
        assert_eq!(dir.lookup(&host("h")).await.unwrap(), Some(b.clone()));
        assert!(!dir.take_over(&host("nobody"), &a, &b).await.unwrap());
    }

    #[tokio::test]
    async fn unregister_is_compare_and_delete() {
        let dir = MemoryDirectory::new(Duration::from_secs(60));
        let (a, b) = (owner("ams:a"), owner("fra:b"));
        assert_eq!(dir.register(&host("h"), &a).await.unwrap(), None);
        assert_eq!(dir.register(&host("h"), &b).await.unwrap(), Some(a.clone()));
        assert!(!dir.unregister(&host("h"), &a).await.unwrap());
        assert_eq!(dir.lookup(&host("h")).await.unwrap(), Some(b.clone()));
        assert!(dir.unregister(&host("h"), &b).await.unwrap());
        assert_eq!(dir.lookup(&host("h")).await.unwrap(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn lookup_many_answers_each_host_in_order_without_expired_entries() {
        let dir = MemoryDirectory::new(Duration::from_secs(10));
        let (a, b) = (owner("ams:a"), owner("fra:b"));
        dir.register(&host("old"), &a).await.unwrap();
        tokio::time::advance(Duration::from_secs(6)).await;
        dir.register(&host("h1"), &a).await.unwrap();
        dir.register(&host("h2"), &b).await.unwrap();
        tokio::time::advance(Duration::from_secs(5)).await;
        let hosts = [host("h2"), host("old"), host("missing"), host("h1")];
        assert_eq!(
            dir.lookup_many(&hosts).await.unwrap(),
            vec![Some(b), None, None, Some(a)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn list_walks_every_live_entry_in_pages_and_skips_expired_ones() {
        let dir = MemoryDirectory::new(Duration::from_secs(10));
        let (a, b) = (owner("ams:a"), owner("fra:b"));
        dir.register(&host("old"), &a).await.unwrap();
        tokio::time::advance(Duration::from_secs(11)).await;
        for i in 0..5 {
            dir.register(&host(&format!("h{i}")), if i % 2 == 0 { &a } else { &b })
                .await
                .unwrap();
        }
        let mut seen = Vec::new();
        let mut cursor = 0;
        loop {
            let page = dir.list(cursor, 2).await.unwrap();
            assert!(page.entries.len() <= 2);
            seen.extend(page.entries);
            cursor = page.next;
            if cursor == 0 {
                break;
            }
        }
        let hosts: Vec<&str> = seen.iter().map(|(h, _)| h.as_str()).collect();
        assert_eq!(hosts, ["h0", "h1", "h2", "h3", "h4"]);
        assert_eq!(seen[1].1, b);
    }

    #[tokio::test]
    async fn heartbeat_after_unregister_resurrects_nothing() {
        let dir = MemoryDirectory::new(Duration::from_secs(60));
        let a = owner("ams:a");
        dir.register(&host("h"), &a).await.unwrap();
        dir.unregister(&host("h"), &a).await.unwrap();
        assert!(!dir.heartbeat(&host("h"), &a).await.unwrap());
        assert_eq!(dir.lookup(&host("h")).await.unwrap(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn entries_expire_without_heartbeat_and_live_with_one() {
        let dir = MemoryDirectory::new(Duration::from_secs(10));
        let a = owner("ams:a");
        dir.register(&host("kept"), &a).await.unwrap();
        dir.register(&host("lost"), &a).await.unwrap();
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(dir.heartbeat(&host("kept"), &a).await.unwrap());
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(dir.lookup(&host("kept")).await.unwrap(), Some(a.clone()));
        assert_eq!(dir.lookup(&host("lost")).await.unwrap(), None);
        assert!(!dir.heartbeat(&host("lost"), &a).await.unwrap());
        assert_eq!(dir.sweep(&a, 100).await.unwrap(), 1);
        assert_eq!(dir.sweep(&a, 100).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn clear_owned_removes_only_own_entries() {
        let dir = MemoryDirectory::new(Duration::from_secs(60));
        let (a, b) = (owner("ams:a"), owner("fra:b"));
        for i in 0..100 {
            dir.register(&host(&format!("a{i}")), &a).await.unwrap();
            dir.register(&host(&format!("b{i}")), &b).await.unwrap();
        }
        // b takes over one of a's hosts: clearing a must leave it alone.
        dir.register(&host("a0"), &b).await.unwrap();
        assert_eq!(dir.clear_owned(&a).await.unwrap(), 99);
        assert_eq!(dir.lookup(&host("a0")).await.unwrap(), Some(b.clone()));
        assert_eq!(dir.lookup(&host("a5")).await.unwrap(), None);
        assert_eq!(dir.clear_owned(&a).await.unwrap(), 0);
        assert_eq!(dir.clear_owned(&b).await.unwrap(), 101);
    }

    #[tokio::test(start_paused = true)]
    async fn sweep_is_bounded_by_its_limit() {
        let dir = MemoryDirectory::new(Duration::from_secs(10));
        let a = owner("ams:a");
        for i in 0..25 {
            dir.register(&host(&format!("h{i}")), &a).await.unwrap();
        }
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(dir.sweep(&a, 10).await.unwrap(), 10);
        assert_eq!(dir.sweep(&a, 10).await.unwrap(), 10);
        assert_eq!(dir.sweep(&a, 10).await.unwrap(), 5);
        assert_eq!(dir.sweep(&a, 10).await.unwrap(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn reassert_writes_absent_and_own_entries_but_never_steals() {
        let dir = MemoryDirectory::new(Duration::from_secs(10));
        let (a, b) = (owner("ams:a"), owner("fra:b"));
        dir.register(&host("mine"), &a).await.unwrap();
        dir.register(&host("taken"), &a).await.unwrap();
        dir.register(&host("taken"), &b).await.unwrap();
        dir.register(&host("expired"), &b).await.unwrap();
        tokio::time::advance(Duration::from_secs(6)).await;
        dir.heartbeat(&host("taken"), &b).await.unwrap();
        tokio::time::advance(Duration::from_secs(6)).await;
        // "mine" has expired by now too: absent, so it is written again.
        let hosts = [host("mine"), host("absent"), host("taken"), host("expired")];
        assert_eq!(dir.reassert(&hosts, &a).await.unwrap(), 3);
        assert_eq!(dir.lookup(&host("mine")).await.unwrap(), Some(a.clone()));
        assert_eq!(dir.lookup(&host("absent")).await.unwrap(), Some(a.clone()));
        assert_eq!(dir.lookup(&host("expired")).await.unwrap(), Some(a.clone()));
        assert_eq!(dir.lookup(&host("taken")).await.unwrap(), Some(b.clone()));
        // Reasserting refreshes the TTL of what it wrote.
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(dir.reassert(&hosts[..1], &a).await.unwrap(), 1);
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(dir.lookup(&host("mine")).await.unwrap(), Some(a.clone()));
        assert_eq!(dir.lookup(&host("absent")).await.unwrap(), None);
        // What it wrote is in a's index; clearing a counts the entries that were live.
        assert_eq!(dir.clear_owned(&a).await.unwrap(), 1);
        assert_eq!(dir.lookup(&host("mine")).await.unwrap(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn advertised_addresses_expire() {
        let dir = MemoryDirectory::new(Duration::from_secs(60));
        let (a, b) = (owner("ams:a"), owner("fra:b"));
        dir.advertise(&a, "10.0.0.1:8080", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(
            dir.address_of(&a).await.unwrap().as_deref(),
            Some("10.0.0.1:8080")
        );
        assert_eq!(dir.address_of(&b).await.unwrap(), None);
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(dir.address_of(&a).await.unwrap(), None);
    }
}
