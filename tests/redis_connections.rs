//! The store's sockets to Redis, standalone and Cluster: every one has Nagle's algorithm off
//! (`TCP_NODELAY`), also those that replace connections Redis dropped; working connections are
//! kept, and after a reconnect every lane again has a socket of its own.
//!
//! Nagle's cost shows only across a network (an acknowledgement a round trip away holds back
//! the next pipelined write; see `src/store/redis/connect.rs` and the load generator's
//! `--redis-delay`), never on plain loopback, so this reads the socket option itself. The
//! store's sockets are the ones to Redis's ports that appear in this process while the store
//! connects; that holds because this binary runs this one test, so nothing else opens
//! connections meanwhile.

mod common;

use std::collections::BTreeMap;
use std::os::fd::RawFd;

use common::{Backend, redis_config, unique_prefix};
use sendable_keys::domain::KeyId;
use sendable_keys::domain::usage::Outcome;
use sendable_keys::store::redis::RedisStore;
use sendable_keys::store::{Store, UsageStore};

/// This process's TCP sockets whose peer is 127.0.0.1 on one of `ports`: socket inode → fd.
fn sockets_to(ports: &[u16]) -> BTreeMap<u64, RawFd> {
    let mut found = BTreeMap::new();
    for entry in std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd") {
        let Ok(entry) = entry else { continue };
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<RawFd>() else {
            continue;
        };
        // A descriptor closed since the listing reads as an error: skipped.
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let Some(inode) = target
            .to_string_lossy()
            .strip_prefix("socket:[")
            .and_then(|rest| rest.strip_suffix(']'))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        if peer_port(fd).is_some_and(|port| ports.contains(&port)) {
            found.insert(inode, fd);
        }
    }
    found
}

/// The peer's port of an IPv4 socket connected to 127.0.0.1, if `fd` is one.
fn peer_port(fd: RawFd) -> Option<u16> {
    // SAFETY: all-zero bytes are a valid sockaddr_storage.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `addr` is a sockaddr_storage and `len` its size; getpeername writes at most
    // `len` bytes and fails harmlessly on a descriptor that is not a connected socket.
    let rc = unsafe { libc::getpeername(fd, (&raw mut addr).cast(), &mut len) };
    if rc != 0 || i32::from(addr.ss_family) != libc::AF_INET {
        return None;
    }
    // SAFETY: the family says the storage holds a sockaddr_in.
    let v4: libc::sockaddr_in = unsafe { std::ptr::read((&raw const addr).cast()) };
    (u32::from_be(v4.sin_addr.s_addr) == 0x7f00_0001).then(|| u16::from_be(v4.sin_port))
}

/// The socket's TCP_NODELAY.
fn nodelay(fd: RawFd) -> bool {
    let mut on: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `on` is a c_int and `len` its size, as TCP_NODELAY reads.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&raw mut on).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "getsockopt(TCP_NODELAY) on fd {fd}");
    on != 0
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a redis://host:port URL")
}

/// The sockets to `ports` open now that are in none of `known`.
fn new_sockets(ports: &[u16], known: &[&BTreeMap<u64, RawFd>]) -> BTreeMap<u64, RawFd> {
    sockets_to(ports)
        .into_iter()
        .filter(|(inode, _)| known.iter().all(|k| !k.contains_key(inode)))
        .collect()
}

/// The sockets among `sockets` that have Nagle's algorithm on.
fn with_nagle(sockets: &BTreeMap<u64, RawFd>) -> Vec<RawFd> {
    sockets
        .values()
        .copied()
        .filter(|&fd| !nodelay(fd))
        .collect()
}

/// Calls `op` until it succeeds (the first calls after Redis dropped its clients may fail on
/// the dead connection, which empties the lane), bounded at 10 s.
async fn until_ok<F, Fut, T>(what: &str, op: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = sendable_keys::store::StoreResult<T>>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while op().await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} still failing 10 s after Redis dropped its clients"
        );
    }
}

/// Connects a store to `backend`, and checks the sockets it opened: at least `at_least` of
/// them, all with Nagle off; a second warm-up leaves the working connections alone; then, with
/// Redis having dropped every client, calls on a hot lane (RecordOutcomes) and on a management
/// lane (PING, as health does) reconnect them, again with Nagle off, and on a standalone
/// server each lane on a socket of its own (a refill once could be handed the other lane's).
async fn check(backend: Backend, at_least: usize) {
    let config = redis_config(backend, &unique_prefix());
    let ports: Vec<u16> = config.urls.iter().map(|u| port_of(u)).collect();
    let before = sockets_to(&ports);
    let store = RedisStore::new(&config).expect("store");
    store.warm_up().await.expect("warm up");
    let opened = new_sockets(&ports, &[&before]);
    assert!(
        opened.len() >= at_least,
        "{backend:?}: the store opened {} sockets to Redis, expected at least {at_least}",
        opened.len()
    );
    let delayed = with_nagle(&opened);
    assert!(
        delayed.is_empty(),
        "{backend:?}: {} of the store's {} sockets to Redis have Nagle's algorithm on (fds {delayed:?})",
        delayed.len(),
        opened.len()
    );

    store.warm_up().await.expect("second warm up");
    let after = new_sockets(&ports, &[&before, &opened]);
    assert!(
        after.is_empty(),
        "{backend:?}: warming up again opened {} new sockets instead of keeping the working ones",
        after.len()
    );

    // Redis drops every client (a restart or failover looks the same from here).
    for url in &config.urls {
        let mut admin = ::redis::Client::open(url.as_str())
            .and_then(|c| c.get_connection())
            .expect("admin connection");
        let killed: i64 = ::redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("normal")
            .query(&mut admin)
            .expect("CLIENT KILL");
        assert!(killed >= 1, "{backend:?}: no client of {url} to drop");
    }
    let outcome = Outcome {
        key_id: KeyId::parse("AbCd1234").expect("key id"),
        success: true,
        error_code: String::new(),
        response_time_us: 1000,
        time_ms: 1_772_445_600_000,
    };
    until_ok("RecordOutcomes (a hot lane)", || {
        store.record_outcomes(std::slice::from_ref(&outcome), outcome.time_ms, 90)
    })
    .await;
    until_ok("PING (a management lane)", || store.ping()).await;
    let replacements = new_sockets(&ports, &[&before, &opened]);
    assert!(
        !replacements.is_empty(),
        "{backend:?}: Redis dropped the store's connections, yet calls succeeded with no new socket"
    );
    if backend == Backend::Redis {
        assert_eq!(
            replacements.len(),
            2,
            "{backend:?}: after the reconnect the hot and the management lane must each have a \
             socket of their own"
        );
    }
    let delayed = with_nagle(&replacements);
    assert!(
        delayed.is_empty(),
        "{backend:?}: {} of the {} sockets that replaced dropped ones have Nagle's algorithm on",
        delayed.len(),
        replacements.len()
    );
}

#[tokio::test]
async fn every_socket_to_redis_has_nagle_off_and_each_lane_its_own() {
    // Pool size 2 (the harness's): two connections to the one server; to the Cluster, each
    // connection reaches all three masters.
    check(Backend::Redis, 2).await;
    check(Backend::Cluster, 6).await;
}
