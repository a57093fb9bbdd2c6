//! Tests against a real `redis-server` that each test starts on a free port (never the
//! shared one on 6379). They fail, never skip, when `redis-server` is not installed.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ::redis::aio::MultiplexedConnection;
use ::redis::{AsyncConnectionConfig, Client};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::*;

/// How long to wait for something that should happen (server start, expiry, reconnect).
const DEADLINE: Duration = Duration::from_secs(10);
/// How often to re-check while waiting.
const POLL: Duration = Duration::from_millis(10);
/// The bound the relay relies on for an operation against a Redis that is down.
const FAIL_FAST: Duration = Duration::from_secs(2);

/// A `redis-server` child process, killed when dropped.
struct TestRedis {
    child: Child,
    port: u16,
}

impl TestRedis {
    /// A fresh server on a free port.
    async fn spawn() -> TestRedis {
        // Another process may grab the port between the probe and the server's bind:
        // then the server exits and we try another one.
        for _ in 0..5 {
            if let Some(redis) = TestRedis::spawn_on(free_port()).await {
                return redis;
            }
        }
        panic!("redis-server failed to start on 5 free ports");
    }

    /// A fresh server on `port`, or `None` if it exited (port taken).
    async fn spawn_on(port: u16) -> Option<TestRedis> {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| {
                panic!(
                    "cannot run `redis-server` ({err}): the Redis directory tests need the \
                     `redis-server` binary on PATH (e.g. `apt-get install redis-server`)"
                )
            });
        let mut redis = TestRedis { child, port };
        let deadline = Instant::now() + DEADLINE;
        while Instant::now() < deadline {
            if redis
                .child
                .try_wait()
                .expect("redis-server status")
                .is_some()
            {
                return None;
            }
            if ping(port).await {
                return Some(redis);
            }
            tokio::time::sleep(POLL).await;
        }
        panic!("redis-server on port {port} did not answer PING within {DEADLINE:?}");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A directory on this server with the test prefix.
    fn directory(&self, ttl: Duration) -> RedisDirectory {
        RedisDirectory::new(&self.url(), "test:", ttl).expect("valid URL")
    }

    /// A plain connection without a response timeout, to set up and inspect state.
    async fn raw(&self) -> MultiplexedConnection {
        Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection_with_config(
                &AsyncConnectionConfig::new().set_response_timeout(None),
            )
            .await
            .expect("raw connection to the test redis-server")
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port nothing listens on (bound then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether a Redis on `port` answers PING.
async fn ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    let mut reply = [0; 5];
    stream.write_all(b"PING\r\n").await.is_ok()
        && stream.read_exact(&mut reply).await.is_ok()
        && &reply == b"+PONG"
}

/// Polls `check` until it returns true, failing the test after [`DEADLINE`].
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + DEADLINE;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within {DEADLINE:?}");
        tokio::time::sleep(POLL).await;
    }
}

fn host(s: &str) -> HostId {
    HostId::parse(s).unwrap()
}

fn owner(s: &str) -> Owner {
    s.parse().unwrap()
}

async fn is_member(conn: &mut MultiplexedConnection, owner: &str, host: &str) -> bool {
    ::redis::cmd("SISMEMBER")
        .arg(format!("test:owned:{owner}"))
        .arg(host)
        .query_async(conn)
        .await
        .unwrap()
}

async fn exists(conn: &mut MultiplexedConnection, key: &str) -> bool {
    ::redis::cmd("EXISTS")
        .arg(key)
        .query_async(conn)
        .await
        .unwrap()
}

async fn pttl(conn: &mut MultiplexedConnection, key: &str) -> i64 {
    ::redis::cmd("PTTL")
        .arg(key)
        .query_async(conn)
        .await
        .unwrap()
}

async fn set(conn: &mut MultiplexedConnection, key: &str, value: &str) {
    ::redis::cmd("SET")
        .arg(key)
        .arg(value)
        .exec_async(conn)
        .await
        .unwrap();
}

async fn dbsize(conn: &mut MultiplexedConnection) -> usize {
    ::redis::cmd("DBSIZE").query_async(conn).await.unwrap()
}

#[tokio::test]
async fn register_then_lookup() {
    let redis = TestRedis::spawn().await;
    let mut raw = redis.raw().await;
    let dir = redis.directory(Duration::from_secs(60));
    let a = owner("ams:a");
    assert_eq!(dir.register(&host("h"), &a).await.unwrap(), None);
    assert_eq!(dir.lookup(&host("h")).await.unwrap(), Some(a.clone()));
    assert_eq!(dir.lookup(&host("other")).await.unwrap(), None);
    // Registering again is not a takeover.
    assert_eq!(dir.register(&host("h"), &a).await.unwrap(), None);
    let ttl = pttl(&mut raw, "test:host:h").await;
    assert!(0 < ttl && ttl <= 60_000, "PTTL {ttl}");
    assert!(is_member(&mut raw, "ams:a", "h").await);
    dir.ping().await.unwrap();
}

#[tokio::test]
async fn lookup_many_answers_each_host_in_order_and_reads_a_corrupt_entry_as_none() {
    let redis = TestRedis::spawn().await;
    let mut raw = redis.raw().await;
    let dir = redis.directory(Duration::from_secs(60));
    let (a, b) = (owner("ams:a"), owner("fra:b"));
    dir.register(&host("h1"), &a).await.unwrap();
    dir.register(&host("h2"), &b).await.unwrap();
    set(&mut raw, "test:host:bad", "no owner here").await;
    let hosts = [host("h2"), host("missing"), host("bad"), host("h1")];
    assert_eq!(
        dir.lookup_many(&hosts).await.unwrap(),
        vec![Some(b), None, None, Some(a)]
    );
    assert_eq!(dir.lookup_many(&[]).await.unwrap(), vec![]);
}

#[tokio::test]
async fn list_walks_every_host_of_its_prefix_only_whatever_glob_characters_it_holds() {
    let redis = TestRedis::spawn().await;
    let mut raw = redis.raw().await;
    let url = format!("redis://127.0.0.1:{}", redis.port);
    let ttl = Duration::from_secs(60);
    let dir = RedisDirectory::new(&url, "t*[1]:", ttl).unwrap();
    let other = RedisDirectory::new(&url, "t1:", ttl).unwrap();
    let (a, b) = (owner("ams:a"), owner("fra:b"));
    let mut expected = Vec::new();
    for i in 0..25 {
        let (h, o) = (host(&format!("h{i:02}")), if i % 3 == 0 { &b } else { &a });
        dir.register(&h, o).await.unwrap();
        expected.push((h, o.clone()));
    }
    // Would match an unescaped `t*[1]:host:*`.
    other.register(&host("intruder"), &a).await.unwrap();
    set(&mut raw, "t*[1]:host:corrupt", "not an owner").await;

    let mut seen = Vec::new();
    let mut cursor = 0;
    loop {
        let page = dir.list(cursor, 4).await.unwrap();
        seen.extend(page.entries);
        cursor = page.next;
        if cursor == 0 {
            break;
        }
    }
    seen.sort();
    seen.dedup();
    expected.sort();
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn unregister_is_compare_and_delete() {
    let redis = TestRedis::spawn().await;
    let mut raw = redis.raw().await;
    let dir = redis.directory(Duration::from_secs(60));
    let (a, b) = (owner("ams:a"), owner("fra:b"));
    assert_eq!(dir.register(&host("h"), &a).await.unwrap(), None);
    assert_eq!(dir.register(&host("h"), &b).await.unwrap(), Some(a.clone()));
    assert!(!dir.unregister(&host("h"), &a).await.unwrap());
    assert_eq!(dir.lookup(&host("h")).await.unwrap(), Some(b.clone()));
    assert!(dir.unregister(&host("h"), &b).await.unwrap());
    assert_eq!(dir.lookup(&host("h")).await.unwrap(), None);
    assert!(!is_member(&mut raw, "fra:b", "h").await);
}

#[tokio::test]
async fn heartbeat_after_unregister_resurrects_nothing() {
    let redis = TestRedis::spawn().await;
    let mut raw = redis.raw().await;
    let dir = redis.directory(Duration::from_secs(60));
    let (a, b) = (owner("ams:a"), owner("fra:b"));
    dir.register(&host("h"), &a).await.unwrap();
    assert!(dir.heartbeat(&host("h"), &a).await.unwrap());
    assert!(dir.unregister(&host("h"), &a).await.unwrap());
    assert!(!dir.heartbeat(&host("h"), &a).await.unwrap());
    assert_eq!(dir.lookup(&host("h")).await.unwrap(), None);
    assert!(!exists(&mut raw, "test:host:h").await);

    // A heartbeat of a host another machine took refreshes nothing and drops the host
    // from the late machine's index.
    dir.register(&host("g"), &a).await.unwrap();
    set(&mut raw, "test:host:g", "fra:b").await;
    assert!(!dir.heartbeat(&host("g"), &a).await.unwrap());
    assert_eq!(dir.lookup(&host("g")).await.unwrap(), Some(b));
    assert!(!is_member(&mut raw, "ams:a", "g").await);
}

#[tokio::test]
async fn register_moves_the_host_out_of_the_previous_owners_index() {
    let redis = TestRedis::spawn().await;
    let mut raw = redis.raw().await;
    let dir = redis.directory(Duration::from_secs(60));
    let (a, b) = (owner("ams:a"), owner("fra:b"));
    dir.register(&host("h"), &a).await.unwrap();
    assert!(is_member(&mut raw, "ams:a", "h").await);
    assert_eq!(dir.register(&host("h"), &b).await.unwrap(), Some(a.clone()));
    assert!(!is_member(&mut raw, "ams:a", "h").await);
    assert!(is_member(&mut raw, "fra:b", "h").await);
    assert_eq!(dir.clear_owned(&a).await.unwrap(), 0);
    assert_eq!(dir.lookup(&host("h")).await.unwrap(), Some(b));
}

#[tokio::test]
async fn clear_owned_removes_exactly_its_1000_entries_among_100000_others() {
    let redis = TestRedis::spawn().await;
    let mut raw = redis.raw().await;
    let dir = redis.directory(Duration::from_secs(600));
    let (a, b) = (owner("ams:a"), owner("fra:b"));
    // 100,000 entries of 10 other machines, written by one server-side loop.
    ::redis::Script::new(
        r"
        for i = 1, tonumber(ARGV[1]) do
          local owner = 'other:m' .. (i % 10)
          redis.call('SET', 'test:host:other' .. i, owner, 'PX', 600000)
          redis.call('SADD', 'test:owned:' .. owner, 'other' .. i)
        end",
    )
    .arg(100_000)
    .invoke_async::<()>(&mut raw)
    .await
    .unwrap();
    for i in 0..=1_000 {
        dir.register(&host(&format!("a{i}")), &a).await.unwrap();
    }
    // b takes one of a's hosts over: a owns exactly 1,000 now.
    dir.register(&host("a0"), &b).await.unwrap();
    let before = dbsize(&mut raw).await;

    assert_eq!(dir.clear_owned(&a).await.unwrap(), 1_000);

    // 1,000 host keys and a's index are gone, nothing else.
    assert_eq!(before - dbsize(&mut raw).await, 1_001);
    assert!(!exists(&mut raw, "test:owned:ams:a").await);
    assert_eq!(dir.lookup(&host("a0")).await.unwrap(), Some(b));
    assert_eq!(dir.lookup(&host("a1000")).await.unwrap(), None);
    assert_eq!(
        dir.lookup(&host("other77")).await.unwrap(),
        Some(owner("other:m7"))
    );
    assert_eq!(dir.clear_owned(&a).await.unwrap(), 0);
}

#[tokio::test]
async fn entries_expire_without_heartbeat_and_live_with_one() {
    let redis = TestRedis::spawn().await;
    let mut raw = redis.raw().await;
    let dir = redis.directory(Duration::from_secs(1));
    let a = owner("ams:a");
    dir.register(&host("kept"), &a).await.unwrap();
    dir.register(&host("lost"), &a).await.unwrap();
    eventually("the entry without heartbeats expires", || async {
        assert!(dir.heartbeat(&host("kept"), &a).await.unwrap());
        dir.lookup(&host("lost")).await.unwrap().is_none()
    })
    .await;
    assert_eq!(dir.lookup(&host("kept")).await.unwrap(), Some(a.clone()));
    // The expired host is still in a's index until the sweep (or a heartbeat) finds it.
    assert!(is_member(&mut raw, "ams:a", "lost").await);
    assert_eq!(dir.sweep(&a, 100).await.unwrap(), 1);
    assert!(!is_member(&mut raw, "ams:a", "lost").await);
    assert!(is_member(&mut raw, "ams:a", "kept").await);
    assert!(!dir.heartbeat(&host("lost"), &a).await.unwrap());
    assert!(!exists(&mut raw, "test:host:lost").await);
}

#[tokio::test]
async fn reassert_writes_absent_and_own_entries_but_never_steals() {
    let redis = TestRedis::spawn().await;
    let mut raw = redis.raw().await;
    let dir = redis.directory(Duration::from_secs(60));
    let (a, b) = (owner("ams:a"), owner("fra:b"));
    dir.register(&host("mine"), &a).await.unwrap();
    dir.register(&host("taken"), &a).await.unwrap();
    dir.register(&host("taken"), &b).await.unwrap();
    ::redis::cmd("PEXPIRE")
        .arg("test:host:mine")
        .arg(1_000)
        .exec_async(&mut raw)
        .await
        .unwrap();

    let hosts = [host("mine"), host("absent"), host("taken")];
    assert_eq!(dir.reassert(&hosts, &a).await.unwrap(), 2);
    assert_eq!(dir.lookup(&host("mine")).await.unwrap(), Some(a.clone()));
    assert_eq!(dir.lookup(&host("absent")).await.unwrap(), Some(a.clone()));
    assert_eq!(dir.lookup(&host("taken")).await.unwrap(), Some(b.clone()));
    assert!(
        pttl(&mut raw, "test:host:mine").await > 1_000,
        "TTL refreshed"
    );
    assert!(is_member(&mut raw, "ams:a", "absent").await);
    assert!(!is_member(&mut raw, "ams:a", "taken").await);
    assert!(is_member(&mut raw, "fra:b", "taken").await);

    // A reconciler batch: 500 hosts in one call, some of them b's.
    let batch: Vec<HostId> = (0..500).map(|i| host(&format!("r{i}"))).collect();
    for h in batch.iter().take(50) {
        dir.register(h, &b).await.unwrap();
    }
    assert_eq!(dir.reassert(&batch, &a).await.unwrap(), 450);
    assert_eq!(dir.reassert(&batch, &a).await.unwrap(), 450);
    assert_eq!(dir.lookup(&batch[0]).await.unwrap(), Some(b.clone()));
    assert_eq!(dir.lookup(&batch[499]).await.unwrap(), Some(a.clone()));
    assert_eq!(dir.reassert(&[], &a).await.unwrap(), 0);
    // Everything a wrote is in its index.
    assert_eq!(dir.clear_owned(&a).await.unwrap(), 452);
    assert_eq!(dir.clear_owned(&b).await.unwrap(), 51);
}

#[tokio::test]
async fn sweep_drops_stale_index_members_at_most_limit_per_call() {
    let redis = TestRedis::spawn().await;
    let mut raw = redis.raw().await;
    let dir = redis.directory(Duration::from_secs(60));
    let a = owner("ams:a");
    let hosts: Vec<HostId> = (0..1_500).map(|i| host(&format!("h{i}"))).collect();
    assert_eq!(dir.reassert(&hosts, &a).await.unwrap(), 1_500);
    // 1,000 expired (deleted behind the directory's back), 200 taken by b without going
    // through register (so a's index still lists them), 300 still a's.
    for (i, h) in hosts.iter().enumerate() {
        let key = format!("test:host:{h}");
        if i < 1_000 {
            ::redis::cmd("DEL")
                .arg(&key)
                .exec_async(&mut raw)
                .await
                .unwrap();
        } else if i < 1_200 {
            set(&mut raw, &key, "fra:b").await;
        }
    }

    let mut removed = 0;
    let mut calls = 0;
    while removed < 1_200 {
        let n = dir.sweep(&a, 100).await.unwrap();
        assert!(n <= 100, "sweep removed {n} > limit");
        removed += n;
        calls += 1;
        assert!(
            calls <= 100,
            "sweep made no progress: {removed} removed in {calls} calls"
        );
    }
    assert_eq!(removed, 1_200);
    let members: usize = ::redis::cmd("SCARD")
        .arg("test:owned:ams:a")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(members, 300);
    // A full walk more finds nothing left to drop.
    for _ in 0..20 {
        assert_eq!(dir.sweep(&a, 100).await.unwrap(), 0);
    }
    assert_eq!(dir.clear_owned(&a).await.unwrap(), 300);
    assert_eq!(dir.sweep(&a, 0).await.unwrap(), 0);
}

/// Runs `op`, expecting an error within [`FAIL_FAST`].
async fn fails_fast<T: fmt::Debug>(
    what: &str,
    op: impl Future<Output = Result<T, DirectoryError>>,
) -> DirectoryError {
    let started = Instant::now();
    let result = op.await;
    let elapsed = started.elapsed();
    assert!(elapsed < FAIL_FAST, "{what} took {elapsed:?}");
    match result {
        Ok(value) => panic!("{what} succeeded against a dead Redis: {value:?}"),
        Err(err) => err,
    }
}

/// Every operation, each expected to fail within [`FAIL_FAST`].
async fn every_operation_fails_fast(dir: &RedisDirectory) {
    let (a, h) = (owner("ams:a"), host("h"));
    fails_fast("ping", dir.ping()).await;
    fails_fast("register", dir.register(&h, &a)).await;
    fails_fast("lookup", dir.lookup(&h)).await;
    fails_fast("heartbeat", dir.heartbeat(&h, &a)).await;
    fails_fast("unregister", dir.unregister(&h, &a)).await;
    fails_fast("clear_owned", dir.clear_owned(&a)).await;
    fails_fast("sweep", dir.sweep(&a, 10)).await;
    fails_fast("reassert", dir.reassert(std::slice::from_ref(&h), &a)).await;
    let ttl = Duration::from_secs(1);
    fails_fast("advertise", dir.advertise(&a, "x:1", ttl)).await;
    fails_fast("address_of", dir.address_of(&a)).await;
}

#[tokio::test]
async fn operations_fail_fast_when_redis_is_down() {
    let url = format!("redis://127.0.0.1:{}", free_port());
    let dir = RedisDirectory::new(&url, "test:", Duration::from_secs(60)).unwrap();
    every_operation_fails_fast(&dir).await;
    let connect = RedisDirectory::connect(&url, "test:", Duration::from_secs(60));
    let err = fails_fast("connect", connect).await;
    assert!(matches!(err, DirectoryError::Unavailable(_)), "{err}");
}

#[tokio::test]
async fn operations_time_out_when_redis_does_not_answer() {
    // Accepts connections and never answers: a hung server or a black-holed path.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("redis://{}", listener.local_addr().unwrap());
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let dir = RedisDirectory::new(&url, "test:", Duration::from_secs(60)).unwrap();
    let (a, h) = (owner("ams:a"), host("h"));
    let err = fails_fast("lookup", dir.lookup(&h)).await;
    assert!(matches!(err, DirectoryError::Timeout(_)), "{err}");
    let err = fails_fast("register", dir.register(&h, &a)).await;
    assert!(matches!(err, DirectoryError::Timeout(_)), "{err}");
    let err = fails_fast("clear_owned", dir.clear_owned(&a)).await;
    assert!(matches!(err, DirectoryError::Timeout(_)), "{err}");
    silent.abort();
}

#[tokio::test]
async fn a_redis_started_later_is_used_without_a_restart() {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let dir = RedisDirectory::new(&url, "test:", Duration::from_secs(60)).unwrap();
    let a = owner("ams:a");
    assert!(dir.register(&host("h"), &a).await.is_err());
    let _redis = TestRedis::spawn_on(port)
        .await
        .expect("redis-server on the probed port");
    eventually("the directory reaches the new server", || async {
        dir.register(&host("h"), &a).await.is_ok()
    })
    .await;
    assert_eq!(dir.lookup(&host("h")).await.unwrap(), Some(a));
}

#[tokio::test]
async fn a_redis_restart_is_survived_and_scripts_are_reloaded() {
    let mut redis = TestRedis::spawn().await;
    let port = redis.port;
    let dir = redis.directory(Duration::from_secs(60));
    let a = owner("ams:a");
    dir.register(&host("h"), &a).await.unwrap();
    redis.kill();
    assert!(dir.heartbeat(&host("h"), &a).await.is_err());
    // Same port, empty data set and script cache: EVALSHA gets NOSCRIPT and reloads.
    let _redis = TestRedis::spawn_on(port)
        .await
        .expect("restart on the same port");
    eventually("the directory reconnects", || async {
        dir.register(&host("h"), &a).await.is_ok()
    })
    .await;
    assert_eq!(dir.lookup(&host("h")).await.unwrap(), Some(a.clone()));
    assert!(dir.heartbeat(&host("h"), &a).await.unwrap());
    assert_eq!(dir.clear_owned(&a).await.unwrap(), 1);
}

#[tokio::test]
async fn a_value_that_is_not_an_owner_is_corrupt() {
    let redis = TestRedis::spawn().await;
    let mut raw = redis.raw().await;
    let dir = redis.directory(Duration::from_secs(60));
    let a = owner("ams:a");
    set(&mut raw, "test:host:h", "not an owner").await;
    let err = dir.lookup(&host("h")).await.unwrap_err();
    assert!(matches!(err, DirectoryError::Corrupt(_)), "{err}");
    // Compare-and-act operations just see "not mine".
    assert!(!dir.heartbeat(&host("h"), &a).await.unwrap());
    assert!(!dir.unregister(&host("h"), &a).await.unwrap());
    // Registering overwrites it.
    assert_eq!(dir.register(&host("h"), &a).await.unwrap(), None);
    assert_eq!(dir.lookup(&host("h")).await.unwrap(), Some(a));
    // A key of the wrong type.
    ::redis::cmd("SADD")
        .arg("test:host:set")
        .arg("x")
        .exec_async(&mut raw)
        .await
        .unwrap();
    let err = dir.lookup(&host("set")).await.unwrap_err();
    assert!(matches!(err, DirectoryError::Corrupt(_)), "{err}");
}

#[tokio::test]
async fn advertised_addresses_expire() {
    let redis = TestRedis::spawn().await;
    let mut raw = redis.raw().await;
    let dir = redis.directory(Duration::from_secs(60));
    let (a, b) = (owner("ams:a"), owner("fra:b"));
    dir.advertise(&a, "[fdaa::1]:8080", Duration::from_millis(500))
        .await
        .unwrap();
    assert_eq!(
        dir.address_of(&a).await.unwrap().as_deref(),
        Some("[fdaa::1]:8080")
    );
    assert_eq!(dir.address_of(&b).await.unwrap(), None);
    let ttl = pttl(&mut raw, "test:addr:ams:a").await;
    assert!(0 < ttl && ttl <= 500, "PTTL {ttl}");
    eventually("the advertisement expires", || async {
        dir.address_of(&a).await.unwrap().is_none()
    })
    .await;
}

#[tokio::test]
async fn prefixes_keep_directories_apart() {
    let redis = TestRedis::spawn().await;
    let one = RedisDirectory::new(&redis.url(), "one:", Duration::from_secs(60)).unwrap();
    let two = RedisDirectory::new(&redis.url(), "two:", Duration::from_secs(60)).unwrap();
    let a = owner("ams:a");
    one.register(&host("h"), &a).await.unwrap();
    assert_eq!(two.lookup(&host("h")).await.unwrap(), None);
    assert_eq!(two.clear_owned(&a).await.unwrap(), 0);
    assert_eq!(one.lookup(&host("h")).await.unwrap(), Some(a));
    assert_eq!(one.prefix(), "one:");
    assert!(format!("{one:?}").contains("127.0.0.1"));
}

#[tokio::test]
async fn invalid_urls_are_rejected_up_front() {
    let ttl = Duration::from_secs(60);
    for url in ["not a url", "http://127.0.0.1:6379"] {
        let err = RedisDirectory::new(url, "test:", ttl).unwrap_err();
        assert!(
            matches!(err, DirectoryError::Unavailable(_)),
            "{url}: {err}"
        );
    }
    // TLS is built in; a CA is only for a TLS URL.
    RedisDirectory::new("rediss://127.0.0.1:6379", "test:", ttl).unwrap();
    let err = RedisDirectory::with_tls_ca("redis://127.0.0.1:6379", "test:", ttl, Some(b"x"))
        .unwrap_err();
    assert!(matches!(err, DirectoryError::Unavailable(_)), "{err}");
}

#[tokio::test]
async fn every_relay_of_one_directory_gets_the_same_hop_key_and_another_prefix_its_own() {
    let redis = TestRedis::spawn().await;
    let ttl = Duration::from_secs(60);
    let first = redis.directory(ttl);
    let second = redis.directory(ttl);
    let key = first.hop_key().await.unwrap();
    assert_eq!(key.len(), 64, "32 random bytes, hex: {key}");
    assert_eq!(second.hop_key().await.unwrap(), key);
    assert_eq!(first.hop_key().await.unwrap(), key, "made once, then kept");
    let other = RedisDirectory::new(&redis.url(), "other:", ttl).unwrap();
    assert_ne!(other.hop_key().await.unwrap(), key);
}

#[tokio::test]
async fn take_over_moves_only_an_entry_that_still_names_the_previous_owner_and_both_indexes() {
    let redis = TestRedis::spawn().await;
    let dir = redis.directory(Duration::from_secs(60));
    let mut conn = redis.raw().await;
    let (a, b, c) = (owner("ams:a"), owner("fra:b"), owner("syd:c"));
    dir.register(&host("h"), &a).await.unwrap();
    assert!(!dir.take_over(&host("h"), &c, &b).await.unwrap());
    assert_eq!(dir.lookup(&host("h")).await.unwrap(), Some(a.clone()));
    assert!(dir.take_over(&host("h"), &a, &b).await.unwrap());
    assert_eq!(dir.lookup(&host("h")).await.unwrap(), Some(b.clone()));
    assert!(is_member(&mut conn, "fra:b", "h").await);
    assert!(!is_member(&mut conn, "ams:a", "h").await);
    assert!(
        pttl(&mut conn, "test:host:h").await > 0,
        "it expires like any entry"
    );
}

#[tokio::test]
async fn retire_removes_only_its_own_hosts_and_marks_them_moving_for_a_while() {
    let redis = TestRedis::spawn().await;
    let mut raw = redis.raw().await;
    let dir = redis.directory(Duration::from_secs(60));
    let (a, b) = (owner("ams:a"), owner("fra:b"));
    for h in ["h1", "h2", "h3", "org:m4"] {
        dir.register(&host(h), &a).await.unwrap();
    }
    // b took h2 over: it has already arrived, so it is neither removed nor marked.
    dir.register(&host("h2"), &b).await.unwrap();

    let some = [host("h1"), host("h2")];
    assert_eq!(
        dir.retire(&a, Some(&some), Duration::from_millis(300))
            .await
            .unwrap(),
        1
    );
    assert_eq!(dir.lookup(&host("h1")).await.unwrap(), None);
    assert!(dir.is_moving(&host("h1")).await.unwrap());
    assert!(!dir.is_moving(&host("h2")).await.unwrap());
    assert_eq!(dir.lookup(&host("h2")).await.unwrap(), Some(b.clone()));
    assert!(!is_member(&mut raw, "ams:a", "h1").await);
    assert!(
        !dir.is_moving(&host("h3")).await.unwrap(),
        "not retired yet"
    );

    // Every host still owned: h3 and org:m4; the index goes.
    assert_eq!(
        dir.retire(&a, None, Duration::from_secs(60)).await.unwrap(),
        2
    );
    assert!(dir.is_moving(&host("org:m4")).await.unwrap());
    assert!(!exists(&mut raw, "test:owned:ams:a").await);

    // Marks expire on their own.
    let deadline = Instant::now() + DEADLINE;
    while dir.is_moving(&host("h1")).await.unwrap() {
        assert!(Instant::now() < deadline, "the moving mark never expired");
        tokio::time::sleep(POLL).await;
    }
}

#[tokio::test]
async fn registration_and_heartbeats_record_when_a_host_was_last_seen() {
    let redis = TestRedis::spawn().await;
    let dir = redis.directory(Duration::from_secs(60));
    let a = owner("ams:a");
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    dir.register(&host("h1"), &a).await.unwrap();
    let seen = dir
        .last_seen_many(&[host("h1"), host("never")])
        .await
        .unwrap();
    assert!(seen[0].is_some_and(|ms| ms >= before), "{seen:?}");
    assert_eq!(seen[1], None);
    // Still known once the host is gone: that is what "last seen" is for.
    dir.unregister(&host("h1"), &a).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    dir.register(&host("h1"), &a).await.unwrap();
    assert!(dir.heartbeat(&host("h1"), &a).await.unwrap());
    let again = dir.last_seen_many(&[host("h1")]).await.unwrap();
    assert!(again[0] > seen[0], "{again:?} after {seen:?}");
}
