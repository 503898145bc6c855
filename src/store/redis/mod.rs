//! The Redis store: standalone Redis or Redis Cluster, through a deadpool pool (deadpool-redis's
//! manager for a standalone server, `connect::ClusterManager` for a Cluster).
//!
//! # Connections
//!
//! The pool creates connections, with the connect timeout and TCP settings. Its checkout,
//! though, recycles the connection with a `PING` round trip every time, which would double the
//! cost of VerifyKey. redis-rs connections are multiplexed (many requests in flight on one
//! socket, answers matched in order) and cheap to clone, so instead of checking a connection out
//! per call we keep `pool_size` *lanes*, each owning a connection taken out of the pool, and
//! spread calls over them round-robin. A lane whose connection fails (an I/O error, a timeout,
//! READONLY: see `gives_up_connection`) is emptied, which closes its socket once the calls still
//! on it finish, and the next call on it takes a new connection. Net effect: one round trip per
//! operation, one socket per lane, never shared.
//!
//! VerifyKey goes through the lane's batcher (`batch.rs`): calls waiting at the same moment
//! share one script call.
//!
//! Every operation is bounded by `timeout`; a timeout, refused or dropped connection, or a
//! cluster in reconfiguration is a *transient* [`StoreError`] (UNAVAILABLE to callers).

mod batch;
mod connect;
pub mod keys;
pub use batch::BATCH_SIZE_METRIC;
pub(crate) use batch::MAX_BATCH;
pub mod scripts;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_redis::{PoolConfig, Runtime, Timeouts};
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncConnectionConfig, Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult,
    ServerErrorKind, Value,
};

use self::keys::{Keys, index_member, parse_index_member};
use super::{
    AlertChange, Audit, AuditStore, InsertKey, KeyCursor, KeyStore, NewKey, RecentActivity,
    ReplaceSession, RevokeKey, RotateKey, SessionStore, Store, StoreError, StoreResult, UsageStore,
    VerifyRequest,
};
use crate::domain::ratelimit::{self, WindowState};
use crate::domain::time::{MILLIS_PER_DAY, MILLIS_PER_HOUR};
use crate::domain::usage::{
    AlertKind, DayCounters, MINUTE_RETENTION_MS, MinuteCounters, Outcome, bucket_of, minute_of,
    recent_minute_range, recent_minutes,
};
use crate::domain::{
    AuditEntry, AuditEvent, Decision, Environment, KeyId, KeyRecord, KeyState, Millis, Plan,
    ROTATED_REASON, SessionId, SessionRecord, UtcDate, VerifyOutcome,
};

/// How to reach Redis.
#[derive(Clone)]
pub struct RedisConfig {
    /// One URL for a standalone server; several (seed nodes) for a cluster.
    pub urls: Vec<String>,
    /// Treat a single URL as a cluster seed.
    pub cluster: bool,
    /// Connections (lanes) kept open.
    pub pool_size: usize,
    /// Concurrent verifications on a lane share script calls (`batch.rs`).
    pub batching: bool,
    /// Key name prefix.
    pub prefix: String,
    /// Upper bound for any single operation, and for establishing a connection.
    pub timeout: Duration,
}

impl std::fmt::Debug for RedisConfig {
    /// URLs may carry a password; show only how many there are.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("urls", &format_args!("<{} redacted>", self.urls.len()))
            .field("cluster", &self.cluster)
            .field("pool_size", &self.pool_size)
            .field("batching", &self.batching)
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish()
    }
}

enum Pool {
    Standalone(deadpool_redis::Pool),
    Cluster(connect::ClusterPool),
}

/// A connection taken from the pool; clones share the underlying multiplexed socket(s).
#[derive(Clone)]
enum Conn {
    Standalone(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Standalone(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Standalone(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Standalone(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Which lanes an operation uses: the per-request path or everything else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Hot,
    Management,
}

/// A generation no connection has: releasing it releases nothing.
const NO_GENERATION: u64 = 0;

/// One lane: the connection it holds, numbered so that a call that failed on it lets go of
/// that connection only, never of a newer one another call has just installed.
#[derive(Default)]
struct Lane {
    slot: Mutex<LaneSlot>,
    /// Held by the one caller refilling an empty lane.
    refill: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct LaneSlot {
    conn: Option<Conn>,
    /// Of the connection in `conn`, or of the last one there; starts at 1 with the first.
    generation: u64,
}

impl Lane {
    fn slot(&self) -> std::sync::MutexGuard<'_, LaneSlot> {
        self.slot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn current(&self) -> Option<(u64, Conn)> {
        let slot = self.slot();
        slot.conn.clone().map(|conn| (slot.generation, conn))
    }

    fn install(&self, conn: Conn) -> (u64, Conn) {
        let mut slot = self.slot();
        slot.generation += 1;
        slot.conn = Some(conn.clone());
        (slot.generation, conn)
    }

    /// Empties the lane if it still holds connection `generation`.
    fn release(&self, generation: u64) {
        let mut slot = self.slot();
        if slot.generation == generation {
            slot.conn = None;
        }
    }
}

pub struct RedisStore {
    pool: Pool,
    cluster: bool,
    batching: bool,
    lanes: Box<[Lane]>,
    /// One verification batcher per lane (only the hot lanes' are used).
    batchers: Box<[Arc<batch::Batcher>]>,
    verify_latency: std::sync::OnceLock<metrics::Histogram>,
    next_lane: AtomicUsize,
    keys: Keys,
    timeout: Duration,
}

/// Maps a redis-rs error to a [`StoreError`], deciding whether it is worth retrying. The
/// message is redis-rs's, which names the failure but never the command's arguments.
fn store_error(err: &RedisError) -> StoreError {
    let transient = err.is_io_error()
        || err.is_timeout()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_cluster_error()
        || err.kind() == ErrorKind::ClusterConnectionNotFound
        || err.code().is_some_and(transient_code);
    StoreError {
        transient,
        message: format!("redis: {err}"),
    }
}

/// Redis error codes for states that pass, so worth a retry: loading its dataset, busy with
/// another client's long script, out of memory under `maxmemory`, short of replicas for
/// `min-replicas-to-write`, a master down or demoted to replica, a cluster reconfiguring. One
/// list for errors met directly ([`store_error`]) and those a batch's script caught per
/// verification (`batch.rs`).
fn transient_code(code: &str) -> bool {
    matches!(
        code,
        "LOADING"
            | "BUSY"
            | "OOM"
            | "NOREPLICAS"
            | "MASTERDOWN"
            | "READONLY"
            | "TRYAGAIN"
            | "CLUSTERDOWN"
    )
}

impl RedisStore {
    /// Builds the pool. Does not need Redis to be up: connections are made on first use, so
    /// the service can start (NOT_SERVING) and become ready when Redis appears.
    pub fn new(config: &RedisConfig) -> StoreResult<Self> {
        if config.urls.is_empty() {
            return Err(StoreError::permanent("no Redis URL given"));
        }
        let pool_size = config.pool_size.max(1);
        let pool_config = PoolConfig {
            max_size: pool_size,
            timeouts: Timeouts {
                wait: Some(config.timeout),
                create: Some(config.timeout),
                recycle: Some(config.timeout),
            },
            ..PoolConfig::default()
        };
        let cluster = config.cluster || config.urls.len() > 1;
        let pool = if cluster {
            let invalid = |text: String| {
                StoreError::permanent(format!("invalid Redis Cluster configuration: {text}"))
            };
            let manager = connect::ClusterManager::new(&config.urls, config.timeout)
                .map_err(|e| invalid(redact(&e)))?;
            Pool::Cluster(
                connect::ClusterPool::builder(manager)
                    .config(pool_config)
                    .runtime(Runtime::Tokio1)
                    .build()
                    .map_err(|e| invalid(redact(&e)))?,
            )
        } else {
            // redis-rs gives a multiplexed connection a 500 ms response timeout of its own,
            // which would fail calls (and drop the connection) on a Redis stall shorter than
            // the configured timeout. Every store call runs under `config.timeout` already
            // (and a cluster connection has no such default), so the connection gets none,
            // and no timer per command either.
            let connection = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(config.timeout))
                .set_response_timeout(None);
            let invalid = |text: String| {
                StoreError::permanent(format!("invalid Redis configuration: {text}"))
            };
            let manager = connect::standalone_manager(&config.urls[0], connection)
                .map_err(|e| invalid(redact(&e)))?;
            Pool::Standalone(
                deadpool_redis::Pool::builder(manager)
                    .config(pool_config)
                    .runtime(Runtime::Tokio1)
                    .build()
                    .map_err(|e| invalid(redact(&e)))?,
            )
        };
        Ok(RedisStore {
            pool,
            cluster,
            batching: config.batching,
            lanes: (0..pool_size).map(|_| Lane::default()).collect(),
            batchers: (0..pool_size).map(|_| Arc::default()).collect(),
            verify_latency: std::sync::OnceLock::new(),
            next_lane: AtomicUsize::new(0),
            keys: Keys::new(&config.prefix),
            timeout: config.timeout,
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// A connection of the lane's own: taken out of the pool for good (`take`), so the pool
    /// opens a new one for the next refill and no two lanes ever share a socket (were the
    /// object handed back, a refill after a reset could be given another lane's connection,
    /// and a verification would queue behind a management pipeline again). A lane drops its
    /// connection when it fails, which closes the socket; the replacement is a new connection,
    /// not a pooled one that might be the same dead or silent socket.
    async fn checkout(&self) -> RedisResult<Conn> {
        Ok(match &self.pool {
            Pool::Standalone(p) => Conn::Standalone(deadpool_redis::Connection::take(
                p.get().await.map_err(pool_error)?,
            )),
            Pool::Cluster(p) => Conn::Cluster(deadpool::managed::Object::take(
                p.get().await.map_err(pool_error)?,
            )),
        })
    }

    /// Fills every empty lane with a connection of its own, so the service is ready before its
    /// first call. Lanes that hold a connection keep it. Best effort: if Redis is not up yet,
    /// lanes fill lazily on first use.
    pub async fn warm_up(&self) -> StoreResult<()> {
        let work = async {
            for lane in self.lanes.iter() {
                if lane.current().is_none() {
                    let _refilling = lane.refill.lock().await;
                    if lane.current().is_none() {
                        lane.install(self.checkout().await?);
                    }
                }
            }
            Ok::<_, RedisError>(())
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| StoreError::transient("redis: no answer while connecting"))?
            .map_err(|e| store_error(&e))
    }

    /// The `maxmemory-policy` of the server (each master of a Cluster; `None` for one whose
    /// reply had none, e.g. an error), read from `INFO memory`, which managed Redis services
    /// answer even where they disable `CONFIG`. Anything but `noeviction` lets a full Redis
    /// delete this service's data to make room (`app` warns at startup).
    pub async fn eviction_policies(&self) -> StoreResult<Vec<Option<String>>> {
        let reply: Value = self
            .run("eviction_policy", |mut c| async move {
                redis::cmd("INFO").arg("memory").query_async(&mut c).await
            })
            .await?;
        Ok(eviction_policies_in(&reply))
    }

    /// The records of `ids` (keys of one session, so one slot), in one pipelined round trip;
    /// ids without a record are left out.
    async fn records(&self, ids: &[KeyId], op: &'static str) -> StoreResult<Vec<KeyRecord>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let names: Vec<String> = ids.iter().map(|id| self.keys.key(id)).collect();
        let replies: Vec<Vec<Option<String>>> = self
            .run(op, |mut c| async move {
                let mut pipe = redis::pipe();
                for name in &names {
                    pipe.cmd("HMGET").arg(name).arg(&scripts::RECORD_FIELDS[..]);
                }
                pipe.query_async(&mut c).await
            })
            .await?;
        let mut out = Vec::with_capacity(ids.len());
        for (id, fields) in ids.iter().zip(replies) {
            if let Some(record) = parse_record(*id, &fields)? {
                out.push(record);
            }
        }
        Ok(out)
    }

    /// The lane for an operation. The per-request operations (VerifyKey, RecordOutcomes) use
    /// the first half of the lanes ("hot"), everything else the other half, so a large
    /// management pipeline (a year of a big session's usage) never queues in front of a
    /// verification on the same multiplexed socket. Within a half, round-robin. Fewer sockets
    /// carry more requests per write, which is what makes the hot path cheap (BENCHMARKS.md).
    fn lane_for(&self, path: Path) -> usize {
        let lanes = self.lanes.len();
        let hot = (lanes / 2).max(1);
        let n = self.next_lane.fetch_add(1, Ordering::Relaxed);
        match path {
            Path::Hot => n % hot,
            Path::Management if lanes > hot => hot + n % (lanes - hot),
            Path::Management => n % lanes,
        }
    }

    /// The connection of lane `index` and its generation, taking a new one if the lane is
    /// empty. One caller refills an empty lane; the others wait for it and share its
    /// connection, instead of each opening one at once.
    async fn lane_conn(&self, index: usize) -> RedisResult<(u64, Conn)> {
        let lane = &self.lanes[index];
        if let Some(found) = lane.current() {
            return Ok(found);
        }
        let _refilling = lane.refill.lock().await;
        if let Some(found) = lane.current() {
            return Ok(found);
        }
        // Boxed: the pool's checkout is a large future, and every caller's future would
        // otherwise carry (and copy) its space on every call, not just the rare ones that
        // reconnect.
        let conn = Box::pin(self.checkout()).await?;
        Ok(lane.install(conn))
    }

    /// Records an operation's latency, and its error if it failed.
    fn observe<T>(name: &'static str, started: std::time::Instant, result: &StoreResult<T>) {
        Self::record_latency(
            &metrics::histogram!("sendable_keys_store_duration_seconds", "op" => name),
            name,
            started,
            result,
        );
    }

    /// [`RedisStore::observe`] for VerifyKey, with its histogram looked up once (a lookup in
    /// the metrics registry per call showed in the VerifyKey profile). Taken on first use, when
    /// the process's recorder is installed.
    fn observe_verify<T>(&self, started: std::time::Instant, result: &StoreResult<T>) {
        let histogram = self.verify_latency.get_or_init(
            || metrics::histogram!("sendable_keys_store_duration_seconds", "op" => "verify"),
        );
        Self::record_latency(histogram, "verify", started, result);
    }

    fn record_latency<T>(
        histogram: &metrics::Histogram,
        name: &'static str,
        started: std::time::Instant,
        result: &StoreResult<T>,
    ) {
        histogram.record(started.elapsed().as_secs_f64());
        if let Err(err) = result {
            let kind = if err.transient {
                "transient"
            } else {
                "permanent"
            };
            metrics::counter!("sendable_keys_store_errors_total", "op" => name, "kind" => kind)
                .increment(1);
        }
    }

    /// No answer from Redis in time.
    fn timed_out(&self) -> StoreError {
        StoreError::transient(format!(
            "redis: no answer within {} ms",
            self.timeout.as_millis()
        ))
    }

    /// Runs a management operation (see [`RedisStore::run_on`]).
    async fn run<T, F, Fut>(&self, name: &'static str, op: F) -> StoreResult<T>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        self.run_on(Path::Management, name, op).await
    }

    /// Runs `op` on a lane of `path`, within the timeout; `name` labels the operation's
    /// latency and error metrics.
    async fn run_on<T, F, Fut>(&self, path: Path, name: &'static str, op: F) -> StoreResult<T>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let index = self.lane_for(path);
        let used = AtomicU64::new(NO_GENERATION);
        let work = async {
            let (generation, conn) = self.lane_conn(index).await?;
            used.store(generation, Ordering::Relaxed);
            op(conn).await
        };
        let started = std::time::Instant::now();
        let outcome = tokio::time::timeout(self.timeout, work).await;
        let result = match outcome {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => {
                if gives_up_connection(&err) {
                    self.lanes[index].release(used.load(Ordering::Relaxed));
                }
                Err(store_error(&err))
            }
            Err(_) => {
                self.lanes[index].release(used.load(Ordering::Relaxed));
                Err(self.timed_out())
            }
        };
        Self::observe(name, started, &result);
        result
    }
}

/// Whether a lane should let go of its connection after `err`: the next call on the lane then
/// opens a new one.
///
/// Not only errors that say the socket is gone: a timeout may be a socket that went silent
/// without closing (a failover whose RST never arrived, a dropped flow), where the kernel
/// would take ~15 minutes to give up; and READONLY means the node behind the address became a
/// replica, where a new connection reaches whatever the address now resolves to. A healthy
/// but slow connection loses little: a reconnect, once per timeout, by one caller per lane.
fn gives_up_connection(err: &RedisError) -> bool {
    err.is_io_error()
        || err.is_connection_dropped()
        || err.is_unrecoverable_error()
        || err.is_timeout()
        || err.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly)
}

/// A pool failure as a redis error, so one mapping decides what is transient.
fn pool_error(err: deadpool_redis::PoolError) -> RedisError {
    match err {
        deadpool_redis::PoolError::Backend(e) => e,
        other => RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("connection pool: {other}"),
        )),
    }
}

/// Pool configuration errors can echo the URL; keep only the kind of problem.
fn redact(err: &impl std::fmt::Display) -> String {
    let text = err.to_string();
    if text.contains('@') || text.contains("://") {
        "the Redis URL could not be parsed (expected redis://[user:password@]host:port[/db] or rediss://...)".to_owned()
    } else {
        text
    }
}

fn pack_session(s: &SessionRecord) -> String {
    let opt = |v: Option<u32>| v.map(|v| v.to_string()).unwrap_or_default();
    format!(
        "{}:{}:{}:{}:{}:{}:{}:{}",
        s.environment.code(),
        s.plan.code(),
        u8::from(s.enabled),
        opt(s.custom_rate_limit),
        opt(s.custom_max_keys),
        s.create_ms,
        s.update_ms,
        s.version
    )
}

fn corrupt(what: &str) -> StoreError {
    StoreError::permanent(format!("redis: unreadable {what} record"))
}

fn unpack_session(id: &SessionId, packed: &str, active_keys: u32) -> StoreResult<SessionRecord> {
    let bad = || corrupt("session");
    let parts: Vec<&str> = packed.split(':').collect();
    let [env, plan, enabled, crl, cmk, ct, ut, version] = parts[..] else {
        return Err(bad());
    };
    let num = |s: &str| s.parse::<i64>().map_err(|_| bad());
    let opt = |s: &str| -> StoreResult<Option<u32>> {
        if s.is_empty() {
            Ok(None)
        } else {
            s.parse().map(Some).map_err(|_| bad())
        }
    };
    Ok(SessionRecord {
        id: id.clone(),
        environment: Environment::from_code(num(env)?).ok_or_else(bad)?,
        plan: Plan::from_code(num(plan)?).ok_or_else(bad)?,
        enabled: enabled == "1",
        custom_rate_limit: opt(crl)?,
        custom_max_keys: opt(cmk)?,
        create_ms: num(ct)?,
        update_ms: num(ut)?,
        version: version.parse().map_err(|_| bad())?,
        active_keys,
    })
}

/// Builds a record from the [`scripts::RECORD_FIELDS`] values; `None` if the key does not
/// exist (no session field).
fn parse_record(id: KeyId, fields: &[Option<String>]) -> StoreResult<Option<KeyRecord>> {
    let bad = || corrupt("key");
    let [s, e, n, st, ct, lu, x, rt, rr, rb] = fields else {
        return Err(bad());
    };
    let Some(session) = s else { return Ok(None) };
    let num = |v: &Option<String>| -> StoreResult<Option<Millis>> {
        v.as_deref()
            .map(|v| v.parse::<Millis>().map_err(|_| bad()))
            .transpose()
    };
    Ok(Some(KeyRecord {
        id,
        session_id: SessionId::parse(session).ok_or_else(bad)?,
        environment: e
            .as_deref()
            .and_then(|e| e.parse().ok())
            .and_then(Environment::from_code)
            .ok_or_else(bad)?,
        name: n.clone().unwrap_or_default(),
        state: match st.as_deref() {
            None => KeyState::Active,
            Some("r") => KeyState::Revoked,
            _ => return Err(bad()),
        },
        create_ms: num(ct)?.ok_or_else(bad)?,
        last_used_ms: num(lu)?,
        expire_ms: num(x)?,
        revoke_ms: num(rt)?,
        revoke_reason: rr.clone().unwrap_or_default(),
        replaced_by: rb
            .as_deref()
            .map(|v| KeyId::parse(v).ok_or_else(bad))
            .transpose()?,
    }))
}

/// Runs an EVALSHA command; if the server does not know the script (a restart, a failover,
/// SCRIPT FLUSH), loads it and tries once more. Commands are built with `redis::cmd`, one
/// buffer for all arguments, not through `redis::Script`'s invocation (a vector per argument),
/// which the VerifyKey profile showed as allocation and copying on every call.
async fn eval<T: redis::FromRedisValue>(
    conn: &mut Conn,
    script: &redis::Script,
    cmd: &Cmd,
) -> RedisResult<T> {
    match cmd.query_async(conn).await {
        Err(err) if err.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
            script.load_async(conn).await?;
            cmd.query_async(conn).await
        }
        other => other,
    }
}

/// The stored hash: the version byte, then the hash, so the script compares both at once.
fn versioned(version: u8, hash: &crate::domain::KeyHash) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(33);
    bytes.push(version);
    bytes.extend_from_slice(&hash.0);
    bytes
}

/// The packed window `<index>:<current>:<previous>` (absent: a key never admitted).
fn parse_window(packed: Option<&str>) -> StoreResult<WindowState> {
    let Some(packed) = packed else {
        return Ok(WindowState::default());
    };
    let mut parts = packed.split(':').map(str::parse::<u64>);
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(Ok(window)), Some(Ok(current)), Some(Ok(previous)), None) => Ok(WindowState {
            window: i64::try_from(window).map_err(|_| corrupt("window"))?,
            current,
            previous,
        }),
        _ => Err(corrupt("window")),
    }
}

/// The texts of an `INFO` reply: one from a server, or one per node from a Cluster (which
/// answers a map of node address to reply); `None` for a node that answered something else
/// (its error).
fn info_replies(value: &Value) -> Vec<Option<String>> {
    match value {
        Value::Map(nodes) => nodes.iter().flat_map(|(_, v)| info_replies(v)).collect(),
        Value::BulkString(bytes) => vec![Some(String::from_utf8_lossy(bytes).into_owned())],
        Value::VerbatimString { text, .. } => vec![Some(text.clone())],
        Value::SimpleString(text) => vec![Some(text.clone())],
        _ => vec![None],
    }
}

/// Each node's `maxmemory_policy` in an `INFO memory` reply.
fn eviction_policies_in(reply: &Value) -> Vec<Option<String>> {
    info_replies(reply)
        .into_iter()
        .map(|text| {
            text.as_deref()
                .and_then(maxmemory_policy)
                .map(str::to_owned)
        })
        .collect()
}

/// The value of `maxmemory_policy` in an `INFO memory` text.
fn maxmemory_policy(info: &str) -> Option<&str> {
    info.lines()
        .find_map(|line| line.strip_prefix("maxmemory_policy:"))
        .map(str::trim)
}

/// Appends an audit entry's ARGV to a script call: the retention (ms), then the field/value
/// pairs [`scripts::AUDIT_LUA`] reads from the end of ARGV.
fn audit_args(inv: &mut redis::ScriptInvocation<'_>, audit: Audit<'_>) {
    let entry = audit.entry;
    inv.arg(audit.retention_ms.max(1))
        .arg("t")
        .arg(entry.time_ms)
        .arg("c")
        .arg(&entry.actor)
        .arg("a")
        .arg(&entry.action)
        .arg("k")
        .arg(entry.key_id.map(|k| k.to_string()).unwrap_or_default())
        .arg("r")
        .arg(&entry.result)
        .arg("d")
        .arg(&entry.detail);
}

/// Decodes a script reply array of (possibly nil) bulk strings.
fn strings(value: &Value) -> StoreResult<Vec<Option<String>>> {
    let Value::Array(items) = value else {
        return Err(corrupt("script reply"));
    };
    items
        .iter()
        .map(|item| match item {
            Value::Nil => Ok(None),
            other => redis::from_redis_value_ref::<String>(other)
                .map(Some)
                .map_err(|_| corrupt("script reply")),
        })
        .collect()
}

fn int(value: Option<&Value>) -> StoreResult<i64> {
    value
        .and_then(|v| redis::from_redis_value_ref::<i64>(v).ok())
        .ok_or_else(|| corrupt("script reply"))
}

impl SessionStore for RedisStore {
    async fn create_session(&self, session: &SessionRecord, audit: Audit<'_>) -> StoreResult<bool> {
        let names = [
            self.keys.sessions(session.id.shard()),
            self.keys.audit(&session.id),
        ];
        let packed = pack_session(session);
        let created: i64 = self
            .run("create_session", |mut c| async move {
                let mut inv = scripts::CREATE_SESSION.prepare_invoke();
                inv.key(&names[..])
                    .arg(session.id.as_str())
                    .arg(&packed)
                    .arg(audit.call.to_string());
                audit_args(&mut inv, audit);
                inv.invoke_async(&mut c).await
            })
            .await?;
        Ok(created == 1)
    }

    async fn get_session(&self, id: &SessionId, now: Millis) -> StoreResult<Option<SessionRecord>> {
        let table = self.keys.sessions(id.shard());
        let active = self.keys.active(id);
        let (packed, count): (Option<String>, u32) = self
            .run("get_session", |mut c| async move {
                redis::pipe()
                    .cmd("HGET")
                    .arg(&table)
                    .arg(id.as_str())
                    .cmd("ZCOUNT")
                    .arg(&active)
                    .arg(format!("({now}"))
                    .arg("+inf")
                    .query_async(&mut c)
                    .await
            })
            .await?;
        packed.map(|p| unpack_session(id, &p, count)).transpose()
    }

    async fn replace_session(
        &self,
        session: &SessionRecord,
        expected_version: u64,
        audit: Audit<'_>,
    ) -> StoreResult<ReplaceSession> {
        let names = [
            self.keys.sessions(session.id.shard()),
            self.keys.audit(&session.id),
        ];
        let packed = pack_session(session);
        let reply: i64 = self
            .run("replace_session", |mut c| async move {
                let mut inv = scripts::REPLACE_SESSION.prepare_invoke();
                inv.key(&names[..])
                    .arg(session.id.as_str())
                    .arg(expected_version)
                    .arg(&packed)
                    .arg(audit.call.to_string());
                audit_args(&mut inv, audit);
                inv.invoke_async(&mut c).await
            })
            .await?;
        Ok(match reply {
            1 => ReplaceSession::Replaced,
            0 => ReplaceSession::NotFound,
            _ => ReplaceSession::VersionConflict,
        })
    }
}

impl KeyStore for RedisStore {
    async fn insert_key(
        &self,
        key: NewKey<'_>,
        plan_max_keys: [u32; 4],
        now: Millis,
        audit: Audit<'_>,
    ) -> StoreResult<InsertKey> {
        let r = key.record;
        let names = [
            self.keys.key(&r.id),
            self.keys.sessions(r.session_id.shard()),
            self.keys.index(&r.session_id),
            self.keys.active(&r.session_id),
            self.keys.audit(&r.session_id),
        ];
        let reply: Vec<i64> = self
            .run("insert_key", |mut c| async move {
                let mut inv = scripts::INSERT_KEY.prepare_invoke();
                inv.key(&names[..])
                    .arg(now)
                    .arg(r.session_id.as_str())
                    .arg(r.id.as_str())
                    .arg(r.environment.code())
                    .arg(versioned(key.hash_version, &key.hash))
                    .arg(&r.name)
                    .arg(r.create_ms)
                    .arg(r.expire_ms.map(|x| x.to_string()).unwrap_or_default())
                    .arg(index_member(r.create_ms, &r.id))
                    .arg(&plan_max_keys[..]);
                audit_args(&mut inv, audit);
                inv.invoke_async(&mut c).await
            })
            .await?;
        match reply.as_slice() {
            [1, active] => Ok(InsertKey::Created {
                active_keys: u32::try_from(*active).unwrap_or(u32::MAX),
            }),
            [-1] => Ok(InsertKey::KeyIdTaken),
            [-2] => Ok(InsertKey::SessionNotFound),
            [-4, max, plan] => Ok(InsertKey::LimitReached {
                max_keys: u32::try_from(*max).unwrap_or(u32::MAX),
                plan: Plan::from_code(*plan).ok_or_else(|| corrupt("session"))?,
            }),
            _ => Err(StoreError::permanent(
                "redis: the key's environment differs from its session's",
            )),
        }
    }

    async fn get_key(&self, id: &KeyId) -> StoreResult<Option<KeyRecord>> {
        let name = self.keys.key(id);
        let fields: Vec<Option<String>> = self
            .run("get_key", |mut c| async move {
                redis::cmd("HMGET")
                    .arg(&name)
                    .arg(&scripts::RECORD_FIELDS[..])
                    .query_async(&mut c)
                    .await
            })
            .await?;
        parse_record(*id, &fields)
    }

    async fn list_keys(
        &self,
        session: &SessionId,
        after: Option<KeyCursor>,
        limit: usize,
    ) -> StoreResult<Vec<KeyRecord>> {
        let index = self.keys.index(session);
        let min = after.map_or_else(
            || "-".to_owned(),
            |c| format!("({}", index_member(c.create_ms, &c.key_id)),
        );
        let members: Vec<String> = self
            .run("list_keys", |mut c| async move {
                redis::cmd("ZRANGE")
                    .arg(&index)
                    .arg(&min)
                    .arg("+")
                    .arg("BYLEX")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(limit)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        let ids = members
            .iter()
            .map(|m| parse_index_member(m).map(|(_, id)| id))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| corrupt("key index"))?;
        self.records(&ids, "list_keys").await
    }

    async fn live_keys(&self, session: &SessionId, now: Millis) -> StoreResult<Vec<KeyRecord>> {
        // The active set holds exactly these, scored by expiry (`+inf` for none): no need to
        // read the session's whole key history.
        let active = self.keys.active(session);
        let members: Vec<String> = self
            .run("live_keys", |mut c| async move {
                redis::cmd("ZRANGE")
                    .arg(&active)
                    .arg(format!("({now}"))
                    .arg("+inf")
                    .arg("BYSCORE")
                    .query_async(&mut c)
                    .await
            })
            .await?;
        let ids = members
            .iter()
            .map(|m| KeyId::parse(m))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| corrupt("active key set"))?;
        let records = self.records(&ids, "live_keys").await?;
        Ok(records
            .into_iter()
            .filter(|k| k.counts_toward_limit(now))
            .collect())
    }

    async fn revoke_key(
        &self,
        id: &KeyId,
        session: &SessionId,
        reason: &str,
        now: Millis,
        audit: Audit<'_>,
    ) -> StoreResult<RevokeKey> {
        let names = [
            self.keys.key(id),
            self.keys.active(session),
            self.keys.alerts(id),
            self.keys.audit(session),
        ];
        let reply: Value = self
            .run("revoke_key", |mut c| async move {
                let mut inv = scripts::REVOKE_KEY.prepare_invoke();
                inv.key(&names[..])
                    .arg(now)
                    .arg(reason)
                    .arg(id.as_str())
                    .arg(session.as_str())
                    .arg(audit.call.to_string());
                audit_args(&mut inv, audit);
                inv.invoke_async(&mut c).await
            })
            .await?;
        let parts = match reply {
            Value::Int(0) => return Ok(RevokeKey::NotFound),
            Value::Array(parts) => parts,
            _ => return Err(corrupt("script reply")),
        };
        let record = parse_record(*id, &strings(parts.get(1).unwrap_or(&Value::Nil))?)?
            .ok_or_else(|| corrupt("key"))?;
        match int(parts.first())? {
            1 => Ok(RevokeKey::Revoked(Box::new(record))),
            2 => Ok(RevokeKey::AlreadyRevoked(Box::new(record))),
            _ => Err(corrupt("script reply")),
        }
    }

    async fn rotate_key(
        &self,
        old: &KeyId,
        new: NewKey<'_>,
        old_expires_at: Option<Millis>,
        plan_max_keys: [u32; 4],
        now: Millis,
        audit: Audit<'_>,
    ) -> StoreResult<RotateKey> {
        let r = new.record;
        let names = [
            self.keys.key(old),
            self.keys.key(&r.id),
            self.keys.index(&r.session_id),
            self.keys.active(&r.session_id),
            self.keys.alerts(old),
            self.keys.sessions(r.session_id.shard()),
            self.keys.audit(&r.session_id),
        ];
        let reply: Vec<Value> = self
            .run("rotate_key", |mut c| async move {
                let mut inv = scripts::ROTATE_KEY.prepare_invoke();
                inv.key(&names[..])
                    .arg(now)
                    .arg(old.as_str())
                    .arg(r.id.as_str())
                    .arg(r.session_id.as_str())
                    .arg(r.environment.code())
                    .arg(versioned(new.hash_version, &new.hash))
                    .arg(&r.name)
                    .arg(r.expire_ms.map(|x| x.to_string()).unwrap_or_default())
                    .arg(index_member(r.create_ms, &r.id))
                    .arg(old_expires_at.map(|x| x.to_string()).unwrap_or_default())
                    .arg(ROTATED_REASON)
                    .arg(&plan_max_keys[..]);
                audit_args(&mut inv, audit);
                inv.invoke_async(&mut c).await
            })
            .await?;
        match int(reply.first())? {
            1 => {
                let old_record =
                    parse_record(*old, &strings(reply.get(1).unwrap_or(&Value::Nil))?)?;
                let new_record =
                    parse_record(r.id, &strings(reply.get(2).unwrap_or(&Value::Nil))?)?;
                match (old_record, new_record) {
                    (Some(old), Some(new)) => Ok(RotateKey::Rotated {
                        old: Box::new(old),
                        new: Box::new(new),
                    }),
                    _ => Err(corrupt("key")),
                }
            }
            -1 => Ok(RotateKey::NotFound),
            -2 => Ok(RotateKey::NotActive),
            -3 => Ok(RotateKey::AlreadyRotated),
            -4 => Ok(RotateKey::KeyIdTaken),
            -5 => Ok(RotateKey::LimitReached {
                max_keys: u32::try_from(int(reply.get(1))?).unwrap_or(u32::MAX),
                plan: Plan::from_code(int(reply.get(2))?).ok_or_else(|| corrupt("session"))?,
            }),
            _ => Err(StoreError::permanent("redis: unexpected RotateKey reply")),
        }
    }

    /// One verification, batched with the others waiting on the same hot lane (see
    /// `batch.rs`): one script call, one round trip.
    async fn verify(&self, request: &VerifyRequest) -> StoreResult<VerifyOutcome> {
        let id = &request.key_id;
        let now = request.now;
        let today = UtcDate::from_millis(now);
        let hour = now.div_euclid(MILLIS_PER_HOUR);
        let started = std::time::Instant::now();
        let index = self.lane_for(Path::Hot);
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = batch::Job {
            names: [
                self.keys.key(id),
                self.keys.sessions(id.shard()),
                self.keys.usage_day(id, today),
                self.keys.minute_requests(id, hour),
            ],
            hash: versioned(request.hash_version, &request.hash),
            now,
            cost: request.cost,
            environment: request.expected_environment.map_or(0, Environment::code),
            window: minute_of(now),
            retention_days: request.usage_retention_days,
            day_ttl: day_ttl_secs(today, now, request.usage_retention_days),
            minute_ttl: minute_ttl_secs(hour, now),
            plan_limits: request.plan_rate_limits,
            shard: id.shard(),
            reply,
        };
        let used = AtomicU64::new(NO_GENERATION);
        let work = async {
            let (generation, conn) = self.lane_conn(index).await.map_err(|e| batch::Failure {
                error: store_error(&e),
                reset_lane: false,
            })?;
            used.store(generation, Ordering::Relaxed);
            self.batchers[index]
                .submit(job, conn, self.cluster, self.batching, self.timeout)
                .await;
            match answer.await {
                Ok(answer) => answer,
                // The batch timed out (its senders dropped) a moment before our own clock.
                Err(_) => Err(batch::Failure {
                    error: self.timed_out(),
                    reset_lane: true,
                }),
            }
        };
        let result = match tokio::time::timeout(self.timeout, work).await {
            Ok(Ok(reply)) => decode_verify(&reply, now, request.cost),
            Ok(Err(failure)) => {
                if failure.reset_lane {
                    self.lanes[index].release(used.load(Ordering::Relaxed));
                }
                Err(failure.error)
            }
            // A silent connection, maybe: see `gives_up_connection`.
            Err(_) => {
                self.lanes[index].release(used.load(Ordering::Relaxed));
                Err(self.timed_out())
            }
        };
        self.observe_verify(started, &result);
        result
    }
}

/// Seconds a usage-day hash lives from `now`: until `retention_days` after its day ends.
fn day_ttl_secs(day: UtcDate, now: Millis, retention_days: u32) -> i64 {
    let end = day.start_millis() + (i64::from(retention_days) + 1) * MILLIS_PER_DAY;
    ((end - now) / 1000).max(1)
}

/// Seconds an hour's minute counters live from `now`: two hours past the hour's end.
fn minute_ttl_secs(hour: i64, now: Millis) -> i64 {
    (((hour + 1) * MILLIS_PER_HOUR + MINUTE_RETENTION_MS - now) / 1000).max(1)
}

/// Reads a usage-day hash (HGETALL pairs).
fn parse_day(pairs: &[(String, String)]) -> StoreResult<DayCounters> {
    let bad = || corrupt("usage");
    let mut day = DayCounters::default();
    for (field, value) in pairs {
        let n: u64 = value.parse().map_err(|_| bad())?;
        if let Some(code) = field.strip_prefix("c:") {
            day.error_codes.insert(code.to_owned(), n);
        } else if let Some(i) = field.strip_prefix('d') {
            let i: usize = i.parse().map_err(|_| bad())?;
            *day.decisions.get_mut(i).ok_or_else(bad)? = n;
        } else if let Some(i) = field.strip_prefix('h') {
            let i: usize = i.parse().map_err(|_| bad())?;
            *day.buckets.get_mut(i).ok_or_else(bad)? = n;
        } else {
            match field.as_str() {
                "s" => day.successes = n,
                "e" => day.errors = n,
                "rt" => day.response_time_sum_us = n,
                "mx" => day.response_time_max_us = n,
                // `nc`: how many distinct codes the day has seen (the script's cap), not a
                // counter to report. Other names: a newer release's counters, which this one
                // does not report but must not fail on during a rolling upgrade.
                _ => {}
            }
        }
    }
    Ok(day)
}

fn pairs(value: &Value) -> StoreResult<Vec<(String, String)>> {
    redis::from_redis_value_ref(value).map_err(|_| corrupt("hash"))
}

/// Commands per pipeline when reading many keys' usage: large enough to amortise round
/// trips, small enough not to stall Redis for other clients.
const PIPELINE_CHUNK: usize = 512;

/// Reads the VERIFY script's answer for a call made at `now` with `cost`. For VALID and
/// RATE_LIMITED the script sends the window as it read it; `admit` from that state at the same
/// `now` and cost is the script's own arithmetic, so it gives the remaining count, reset and
/// retry-after of exactly the decision the script made.
fn decode_verify(reply: &str, now: Millis, cost: u32) -> StoreResult<VerifyOutcome> {
    let bad = || corrupt("verify reply");
    let mut fields = reply.splitn(6, ':');
    let mut next = || fields.next().ok_or_else(bad);
    let number = |text: &str| text.parse::<i64>().map_err(|_| bad());
    let decision = Decision::from_code(number(next()?)?).ok_or_else(bad)?;
    let Ok(session) = next() else {
        return Ok(VerifyOutcome::unattributed(decision, None));
    };
    let session_id = SessionId::parse(session).ok_or_else(bad)?;
    let environment = Environment::from_code(number(next()?)?).ok_or_else(bad)?;
    let plan = Plan::from_code(number(next()?)?).ok_or_else(bad)?;
    let rate_limit = match next() {
        Err(_) => None,
        Ok(limit) => {
            let limit = limit.parse::<u32>().map_err(|_| bad())?;
            // Empty: a key never counted, or a field the script could not read (it counted
            // from zero). A window the script read but this side cannot is an error, never a
            // decision paired with figures from another state.
            let field = next()?;
            let window = if field.is_empty() {
                WindowState::default()
            } else if field.bytes().all(|b| b.is_ascii_digit() || b == b':') {
                parse_window(Some(field))?
            } else {
                return Err(bad());
            };
            let mut rate = ratelimit::admit(window, now, limit, cost).rate;
            if decision != Decision::RateLimited {
                rate.retry_after_ms = None;
            }
            Some(rate)
        }
    };
    Ok(VerifyOutcome {
        decision,
        key_id: None,
        session_id: Some(session_id),
        environment: Some(environment),
        plan: Some(plan),
        rate_limit,
    })
}

impl UsageStore for RedisStore {
    async fn record_outcomes(
        &self,
        outcomes: &[Outcome],
        now: Millis,
        retention_days: u32,
    ) -> StoreResult<u32> {
        // A standalone server takes the whole batch in one script call (one round trip). A
        // cluster needs one per shard (everything a script touches must share its slot), so
        // there a failed call may have stored the other shards' outcomes (README, Usage
        // statistics).
        let mut by_shard: BTreeMap<u16, Vec<&Outcome>> = BTreeMap::new();
        for outcome in outcomes {
            let group = if self.cluster {
                outcome.key_id.shard()
            } else {
                0
            };
            by_shard.entry(group).or_default().push(outcome);
        }
        let mut calls = Vec::with_capacity(by_shard.len());
        for group in by_shard.values() {
            let mut names: Vec<String> = Vec::new();
            let mut index: HashMap<String, usize> = HashMap::new();
            let mut intern = |name: String| -> usize {
                *index.entry(name.clone()).or_insert_with(|| {
                    names.push(name);
                    names.len()
                })
            };
            let mut args: Vec<String> = vec![group.len().to_string()];
            for o in group {
                let day = UtcDate::from_millis(o.time_ms);
                let hour = o.time_ms.div_euclid(MILLIS_PER_HOUR);
                let record = intern(self.keys.key(&o.key_id));
                let day_hash = intern(self.keys.usage_day(&o.key_id, day));
                let minute_hash = if o.time_ms >= now - MINUTE_RETENTION_MS {
                    intern(self.keys.minute_outcomes(&o.key_id, hour))
                } else {
                    0
                };
                args.extend([
                    record.to_string(),
                    day_hash.to_string(),
                    minute_hash.to_string(),
                    day_ttl_secs(day, now, retention_days).to_string(),
                    minute_ttl_secs(hour, now).to_string(),
                    if o.success {
                        String::new()
                    } else {
                        o.error_code.clone()
                    },
                    o.response_time_us.to_string(),
                    bucket_of(o.response_time_us).to_string(),
                    minute_of(o.time_ms).rem_euclid(60).to_string(),
                ]);
            }
            calls.push((names, args));
        }
        // The shards' scripts go out together; the multiplexed connections pipeline them.
        let results = futures_util::future::join_all(calls.iter().map(|(names, args)| {
            self.run_on(Path::Hot, "record_outcomes", move |mut c| async move {
                let mut inv = scripts::RECORD_OUTCOMES.prepare_invoke();
                inv.key(&names[..]).arg(&args[..]);
                inv.invoke_async::<u32>(&mut c).await
            })
        }))
        .await;
        let mut accepted = 0;
        for result in results {
            accepted += result?;
        }
        Ok(accepted)
    }

    async fn usage_days(
        &self,
        keys: &[KeyId],
        from: UtcDate,
        to: UtcDate,
    ) -> StoreResult<Vec<Vec<DayCounters>>> {
        let days: Vec<UtcDate> = UtcDate::range(from, to).collect();
        let names: Vec<String> = keys
            .iter()
            .flat_map(|id| days.iter().map(|d| self.keys.usage_day(id, *d)))
            .collect();
        let mut counters = Vec::with_capacity(names.len());
        for chunk in names.chunks(PIPELINE_CHUNK) {
            let replies: Vec<Value> = self
                .run("usage_days", |mut c| async move {
                    let mut pipe = redis::pipe();
                    for name in chunk {
                        pipe.cmd("HGETALL").arg(name);
                    }
                    pipe.query_async(&mut c).await
                })
                .await?;
            for reply in &replies {
                counters.push(parse_day(&pairs(reply)?)?);
            }
        }
        let per_key = days.len().max(1);
        let mut out = Vec::with_capacity(keys.len());
        let mut rest = counters.into_iter();
        for _ in keys {
            out.push(rest.by_ref().take(per_key).collect());
        }
        Ok(out)
    }

    async fn recent_activity(
        &self,
        keys: &[KeyId],
        now: Millis,
        minutes: usize,
    ) -> StoreResult<Vec<RecentActivity>> {
        let range = recent_minute_range(now, minutes);
        let hours: Vec<i64> =
            ((range.start().div_euclid(60))..=(range.end().div_euclid(60))).collect();
        let mut out = Vec::with_capacity(keys.len());
        // Per key: HGET window, HGETALL alerts, then HGETALL requests + outcomes per hour.
        let per_key = 2 + 2 * hours.len();
        let hours = &hours;
        for chunk in keys.chunks((PIPELINE_CHUNK / per_key).max(1)) {
            let replies: Vec<Value> = self
                .run("recent_activity", |mut c| async move {
                    let mut pipe = redis::pipe();
                    for id in chunk {
                        pipe.cmd("HGET").arg(self.keys.key(id)).arg("w");
                        pipe.cmd("HGETALL").arg(self.keys.alerts(id));
                        for hour in hours {
                            pipe.cmd("HGETALL")
                                .arg(self.keys.minute_requests(id, *hour));
                            pipe.cmd("HGETALL")
                                .arg(self.keys.minute_outcomes(id, *hour));
                        }
                    }
                    pipe.query_async(&mut c).await
                })
                .await?;
            for replies in replies.chunks(per_key) {
                let window = match redis::from_redis_value_ref::<Option<String>>(&replies[0]) {
                    Ok(packed) => parse_window(packed.as_deref())?,
                    Err(_) => return Err(corrupt("window")),
                };
                let firing = pairs(&replies[1])?
                    .into_iter()
                    .filter_map(|(kind, since)| {
                        Some((AlertKind::from_code(&kind)?, since.parse().ok()?))
                    })
                    .collect();
                let mut by_minute: HashMap<i64, MinuteCounters> = HashMap::new();
                for (i, hour) in hours.iter().enumerate() {
                    for (field, value) in pairs(&replies[2 + 2 * i])? {
                        let minute =
                            hour * 60 + field.parse::<i64>().map_err(|_| corrupt("minutes"))?;
                        by_minute.entry(minute).or_default().requests =
                            value.parse().map_err(|_| corrupt("minutes"))?;
                    }
                    for (field, value) in pairs(&replies[3 + 2 * i])? {
                        let (kind, m) = field.split_at(1);
                        let minute =
                            hour * 60 + m.parse::<i64>().map_err(|_| corrupt("minutes"))?;
                        let n: u64 = value.parse().map_err(|_| corrupt("minutes"))?;
                        let entry = by_minute.entry(minute).or_default();
                        match kind {
                            "t" => entry.outcomes = n,
                            "e" => entry.errors = n,
                            _ => return Err(corrupt("minutes")),
                        }
                    }
                }
                out.push(RecentActivity {
                    window,
                    minutes: recent_minutes(now, minutes, |m| by_minute.get(&m).copied()),
                    firing,
                });
            }
        }
        Ok(out)
    }

    async fn update_alerts(&self, changes: &[AlertChange]) -> StoreResult<()> {
        if changes.is_empty() {
            return Ok(());
        }
        // One script, so an evaluation's changes land together (the alert states of one
        // session's keys share its slot).
        let names: Vec<String> = changes
            .iter()
            .map(|c| self.keys.alerts(&c.key_id))
            .collect();
        self.run("update_alerts", |mut c| async move {
            let mut inv = scripts::UPDATE_ALERTS.prepare_invoke();
            inv.key(&names[..]).arg(ALERT_STATE_TTL_SECS);
            for change in changes {
                inv.arg(change.kind.code())
                    .arg(change.since.map(|s| s.to_string()).unwrap_or_default());
            }
            inv.invoke_async::<()>(&mut c).await
        })
        .await
    }
}

/// How long an untouched alert state hash lives.
const ALERT_STATE_TTL_SECS: i64 = 30 * 86_400;

impl AuditStore for RedisStore {
    async fn append_audit(&self, audit: Audit<'_>) -> StoreResult<String> {
        let name = self.keys.audit(&audit.entry.session_id);
        self.run("append_audit", |mut c| async move {
            let mut inv = scripts::APPEND_AUDIT.prepare_invoke();
            inv.key(&name);
            audit_args(&mut inv, audit);
            inv.invoke_async(&mut c).await
        })
        .await
    }

    async fn list_audit(
        &self,
        session: &SessionId,
        before: Option<(u64, u64)>,
        limit: usize,
    ) -> StoreResult<Vec<AuditEvent>> {
        let name = self.keys.audit(session);
        let end = before.map_or_else(|| "+".to_owned(), |(ms, seq)| format!("({ms}-{seq}"));
        let rows: Vec<(String, Vec<String>)> = self
            .run("list_audit", |mut c| async move {
                redis::cmd("XREVRANGE")
                    .arg(&name)
                    .arg(&end)
                    .arg("-")
                    .arg("COUNT")
                    .arg(limit)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        rows.into_iter()
            .map(|(id, fields)| {
                let get = |name: &str| {
                    fields
                        .chunks(2)
                        .find(|pair| pair[0] == name)
                        .and_then(|pair| pair.get(1))
                        .cloned()
                        .unwrap_or_default()
                };
                Ok(AuditEvent {
                    id,
                    entry: AuditEntry {
                        time_ms: get("t").parse().map_err(|_| corrupt("audit"))?,
                        actor: get("c"),
                        action: get("a"),
                        session_id: session.clone(),
                        key_id: KeyId::parse(&get("k")),
                        result: get("r"),
                        detail: get("d"),
                    },
                })
            })
            .collect()
    }
}

impl Store for RedisStore {
    async fn ping(&self) -> StoreResult<()> {
        let pong: String = self
            .run("ping", |mut c| async move {
                redis::cmd("PING").query_async(&mut c).await
            })
            .await?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(StoreError::permanent("redis: unexpected PING reply"))
        }
    }

    fn report_metrics(&self) {
        let connected = self
            .lanes
            .iter()
            .filter(|lane| lane.current().is_some())
            .count();
        metrics::gauge!("sendable_keys_redis_lanes_connected").set(connected as f64);
    }

    fn describe(&self) -> String {
        let mode = match self.pool {
            Pool::Standalone(_) => "standalone",
            Pool::Cluster(_) => "cluster",
        };
        format!(
            "redis {mode} ({} connections, key prefix {:?})",
            self.lanes.len(),
            self.keys.prefix()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eviction_policies_are_read_from_server_and_cluster_info_replies() {
        let info = |policy: &str| {
            format!("# Memory\r\nused_memory:1000\r\nmaxmemory:0\r\nmaxmemory_policy:{policy}\r\n")
        };
        let standalone = Value::BulkString(info("allkeys-lru").into_bytes());
        assert_eq!(
            eviction_policies_in(&standalone),
            [Some("allkeys-lru".to_owned())]
        );
        let cluster = Value::Map(vec![
            (
                Value::BulkString(b"10.0.0.1:6379".to_vec()),
                Value::VerbatimString {
                    format: redis::VerbatimFormat::Text,
                    text: info("noeviction"),
                },
            ),
            (
                Value::BulkString(b"10.0.0.2:6379".to_vec()),
                Value::BulkString(info("volatile-ttl").into_bytes()),
            ),
            // A node's error: the test cannot build a `ServerError`, any other value does.
            (Value::BulkString(b"10.0.0.3:6379".to_vec()), Value::Nil),
        ]);
        assert_eq!(
            eviction_policies_in(&cluster),
            [
                Some("noeviction".to_owned()),
                Some("volatile-ttl".to_owned()),
                None
            ]
        );
        assert_eq!(maxmemory_policy("# Memory\r\nused_memory:1\r\n"), None);
    }

    #[test]
    fn sessions_round_trip_through_their_packed_form() {
        let s = SessionRecord {
            id: SessionId::parse("acme").expect("valid"),
            environment: Environment::Staging,
            plan: Plan::Enterprise,
            enabled: false,
            custom_rate_limit: Some(5000),
            custom_max_keys: None,
            create_ms: 1_795_737_600_000,
            update_ms: 1_795_737_600_123,
            version: 7,
            active_keys: 2,
        };
        let packed = pack_session(&s);
        assert_eq!(packed, "2:4:0:5000::1795737600000:1795737600123:7");
        assert_eq!(unpack_session(&s.id, &packed, 2).expect("parses"), s);
        assert!(unpack_session(&s.id, "2:4:0", 0).is_err());
        assert!(unpack_session(&s.id, "9:4:0:::1:1:1", 0).is_err());
    }

    #[test]
    fn usage_days_read_what_they_know_and_skip_newer_counters() {
        let pairs = |list: &[(&str, &str)]| -> Vec<(String, String)> {
            list.iter()
                .map(|(f, v)| ((*f).to_owned(), (*v).to_owned()))
                .collect()
        };
        let day = parse_day(&pairs(&[
            ("s", "3"),
            ("e", "2"),
            ("c:503", "2"),
            ("d1", "5"),
            ("nc", "1"),
            ("a-future-counter", "9"),
        ]))
        .expect("parses");
        assert_eq!((day.successes, day.errors), (3, 2));
        assert_eq!(day.error_codes.get("503"), Some(&2));
        assert_eq!(day.decisions[1], 5);
        assert_eq!(day.error_codes.len(), 1, "nc is not an error code");
        // A value that is not a count is still corruption, whatever its field.
        assert!(parse_day(&pairs(&[("s", "x")])).is_err());
        assert!(parse_day(&pairs(&[("a-future-counter", "x")])).is_err());
        assert!(parse_day(&pairs(&[("d99", "1")])).is_err());
    }

    #[test]
    fn verify_replies_decode() {
        // A window boundary, as in `domain::ratelimit`'s tests.
        const T0: Millis = 1_800_000_000_000;
        let window = T0 / 60_000;
        assert_eq!(
            decode_verify("3", T0, 1).map(|o| o.decision).ok(),
            Some(Decision::NotFound)
        );
        let revoked = decode_verify("4:acme:3:1", T0, 1).expect("revoked");
        assert_eq!(
            (revoked.decision, revoked.plan, revoked.rate_limit),
            (Decision::Revoked, Some(Plan::Free), None)
        );
        // 60 of 60 used at the start of this window, asked 1 s later: the figures are
        // `admit`'s from the window the script read.
        let full = format!("8:acme:3:1:60:{window}:60:0");
        let limited = decode_verify(&full, T0 + 1_000, 1).expect("limited");
        assert_eq!(
            limited
                .rate_limit
                .map(|r| (r.limit, r.remaining, r.reset_after_ms, r.retry_after_ms)),
            Some((60, 0, 59_000, Some(60_000)))
        );
        // A key never counted, or one whose window the script could not read (it sends an
        // empty window then), starts from nothing.
        let valid = decode_verify("1:acme:3:3:1000:", T0, 1).expect("valid");
        assert_eq!(
            valid
                .rate_limit
                .map(|r| (r.limit, r.remaining, r.retry_after_ms)),
            Some((1000, 999, None))
        );
        for bad in [
            "",
            "x",
            "9",
            "1:acme",
            "1:a b:3:3",
            "1:acme:3:3:1000",
            "1:acme:3:3:-5:",
            "1:acme:3:3:x:",
            // Windows the script would never send back.
            "1:acme:3:3:1000:junk",
            "1:acme:3:3:1000:+1:2:3",
            "1:acme:3:3:1000:1:2",
            "1:acme:3:3:1000:99999999999999999999:1:1",
            "1:acme:3:3:1000:9223372036854775808:1:1",
        ] {
            assert!(decode_verify(bad, T0, 1).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn config_debug_hides_urls() {
        let cfg = RedisConfig {
            urls: vec!["redis://:hunter2@10.0.0.1:6379".into()],
            cluster: false,
            pool_size: 4,
            batching: true,
            prefix: "sk".into(),
            timeout: Duration::from_secs(1),
        };
        assert!(!format!("{cfg:?}").contains("hunter2"));
        assert!(!redact(&"bad url redis://:hunter2@x").contains("hunter2"));
    }
}
