//! How the store's sockets to Redis are made: the TCP settings every one of them gets, and the
//! pool manager for Redis Cluster connections (deadpool-redis's own takes no TCP settings).
//!
//! Every socket turns Nagle's algorithm off (`TCP_NODELAY`). redis-rs 1.x leaves it on, and
//! the store's connections are multiplexed: while one script call is unanswered, Nagle holds
//! the next write back until the peer acknowledges the first, which across a real network adds
//! up to a round trip to every call that finds the socket busy (redis-rs issue #2195: over a
//! LAN, turning Nagle off gave one multiplexed connection 39–68 % more throughput and a 27–46 %
//! lower p50; redis-rs 2.0 turns it off by default). Here, with Redis 1–2 ms away each way
//! (the load generator's `--redis-delay 1ms`), Nagle off gave VerifyKey 39 % more throughput and
//! a 29 % lower p50 at 64 in flight. On plain loopback acknowledgements are immediate and it
//! makes no difference, so `tests/redis_connections.rs` checks the socket option itself.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use deadpool::managed::{self, Metrics, RecycleError, RecycleResult};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::io::tcp::TcpSettings;
use redis::{AsyncConnectionConfig, IntoConnectionInfo, RedisError, RedisResult};

/// What every socket to Redis is set up with.
fn tcp_settings() -> TcpSettings {
    TcpSettings::default().set_nodelay(true)
}

/// deadpool-redis's manager for one standalone server, with our TCP settings.
pub(super) fn standalone_manager(
    url: &str,
    connection: AsyncConnectionConfig,
) -> RedisResult<deadpool_redis::Manager> {
    let info = url.into_connection_info()?.set_tcp_settings(tcp_settings());
    deadpool_redis::Manager::new_with_config(info, connection)
}

/// Creates cluster connections (each one holds a socket to every node of the slot map, all
/// with our TCP settings). Would check a pooled one with a `PING` before handing it out again;
/// the store takes every connection out of the pool for a lane of its own, so none comes back.
pub(super) struct ClusterManager {
    client: ClusterClient,
    /// Each check's PING carries its own number, so an answer meant for another request (a
    /// connection out of step) fails the check instead of passing it.
    pings: AtomicU64,
}

pub(super) type ClusterPool = managed::Pool<ClusterManager>;

impl ClusterManager {
    /// `urls`: the seed nodes; `connect_timeout` bounds each node's connect, as it does the
    /// standalone server's. Builds the client only; nothing connects until the pool asks.
    pub(super) fn new(urls: &[String], connect_timeout: Duration) -> RedisResult<Self> {
        let client = ClusterClientBuilder::new(urls.iter().map(String::as_str))
            .tcp_settings(tcp_settings())
            .connection_timeout(connect_timeout)
            .build()?;
        Ok(ClusterManager {
            client,
            pings: AtomicU64::new(0),
        })
    }
}

impl managed::Manager for ClusterManager {
    type Type = ClusterConnection;
    type Error = RedisError;

    async fn create(&self) -> Result<ClusterConnection, RedisError> {
        self.client.get_async_connection().await
    }

    async fn recycle(
        &self,
        conn: &mut ClusterConnection,
        _: &Metrics,
    ) -> RecycleResult<RedisError> {
        let n = self.pings.fetch_add(1, Ordering::Relaxed).to_string();
        let echo: String = redis::cmd("PING").arg(&n).query_async(conn).await?;
        if echo == n {
            Ok(())
        } else {
            Err(RecycleError::message(
                "PING answered with another request's reply",
            ))
        }
    }
}
