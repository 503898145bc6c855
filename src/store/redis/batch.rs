//! Verification batching on a hot lane: the VerifyKey calls waiting at the same moment go
//! to Redis as one `EVALSHA` of the VERIFY script instead of one each.
//!
//! Why: under load, Redis spends a fixed ~2 µs per script call (finding the script, setting
//! up Lua, building the KEYS/ARGV tables) plus its command parsing and socket work, and the
//! service pays redis-rs's per-command channel hop, reply parsing and wake-up. A batch pays
//! those once. Verifications in a batch still run one after the other inside one atomic
//! script, so limits stay exact, and each call still waits for exactly one round trip.
//!
//! How a batch forms, without timers: when the lane is idle (nothing queued, no script call on
//! the wire), a call sends its own job at once, so one call in flight costs what it did before
//! batching. Otherwise it puts its job in the lane's queue, and the call that finds the queue
//! empty spawns a *flush* task; the flush first yields to the scheduler, so
//! every request already runnable on this worker (the rest of the HTTP/2 frames that arrived
//! in the same read) joins the queue, then takes the whole queue and sends it. The next call
//! finds the queue empty again and starts the next flush, so batches are pipelined on the
//! socket rather than waiting for each other. Under load the spawn and the yield are shared by
//! the whole batch.
//!
//! The flush is a spawned task rather than work done by the first caller, so a caller that
//! goes away (its client cancelled) cannot strand the jobs queued behind it.
//!
//! In a Redis Cluster a script may only touch one slot, so a batch is split by shard (the
//! hash tag of every name a verification touches); on a standalone server a batch is one call.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use redis::Cmd;
use tokio::sync::oneshot;

use super::{Conn, StoreError, eval, gives_up_connection, scripts, store_error, transient_code};
use crate::domain::Millis;

/// Most verifications in one script call: bounds the time Redis spends in one script (a batch
/// of 256 runs for ~2.5 ms at ~10 µs each) and the size of one command.
pub(crate) const MAX_BATCH: usize = 256;

/// One verification's arguments (see the VERIFY script) and where its answer goes.
pub(super) struct Job {
    /// Key record, session table, usage day, minute counters.
    pub names: [String; 4],
    /// Version byte + hash.
    pub hash: Vec<u8>,
    pub now: Millis,
    pub cost: u32,
    pub environment: u8,
    /// The minute `now` falls in (minutes since the epoch): the rate-limit window, and which
    /// usage-day and minute hashes `names` are. Shared by a script call.
    pub window: i64,
    /// Usage retention, which the day hash's TTL derives from. Shared by a script call.
    pub retention_days: u32,
    /// TTLs (s) from `now` of the day hash and the minute hash, if this call creates them.
    /// A script call uses the shortest in its group: that of its latest `now`.
    pub day_ttl: i64,
    pub minute_ttl: i64,
    /// The plan table's default limits: shared by a script call, so jobs with different
    /// tables (a plans reload between two calls) never share one.
    pub plan_limits: [u32; 4],
    /// Cluster slot group: jobs of different shards never share a call in a cluster.
    pub shard: u16,
    pub reply: oneshot::Sender<Result<String, Failure>>,
}

impl Job {
    /// What every job of one script call must have in common (besides its shard in a
    /// cluster): the script reads these once per call.
    fn call_key(&self) -> ([u32; 4], i64, u32) {
        (self.plan_limits, self.window, self.retention_days)
    }

    fn shares_call(&self, other: &Job, cluster: bool) -> bool {
        self.call_key() == other.call_key() && (!cluster || self.shard == other.shard)
    }
}

/// Why a job got no answer.
#[derive(Clone, Debug)]
pub(super) struct Failure {
    pub error: StoreError,
    /// The connection failed: the caller empties its lane so the next call reconnects.
    pub reset_lane: bool,
}

/// The histogram of verifications per script call: its count is the script calls sent (one whose
/// caller was cancelled before it reached Redis included), its sum the verifications, so
/// operators see how much batching saves (a lane near one per call has no load to batch, or
/// calls too spread out to meet).
pub const BATCH_SIZE_METRIC: &str = "sendable_keys_redis_verify_batch_size";

/// A hot lane's queue of verifications waiting to be sent.
#[derive(Default)]
pub(super) struct Batcher {
    queue: Mutex<Vec<Job>>,
    /// Script calls of this lane on the wire.
    in_flight: AtomicUsize,
    /// [`BATCH_SIZE_METRIC`], looked up once, as `RedisStore::observe_verify` does its
    /// histogram (a registry look-up per call showed in the VerifyKey profile); taken on first
    /// use, when the process's recorder is installed.
    batch_size: OnceLock<metrics::Histogram>,
}

impl Batcher {
    /// Sends `job`, alone or with others. When the lane is idle (nothing queued, nothing on
    /// the wire) there is nothing to batch with: the job goes out at once, from the caller's
    /// own task, so a lightly loaded service pays nothing for batching; so does every job when
    /// batching is off. Otherwise it is queued; if it is the first in the queue, a flush task
    /// is spawned that sends it and whatever joins it.
    pub async fn submit(
        self: &Arc<Self>,
        job: Job,
        conn: Conn,
        cluster: bool,
        batching: bool,
        timeout: Duration,
    ) {
        let (direct, first) = {
            let mut queue = self.lock();
            if !batching || (queue.is_empty() && self.in_flight.load(Ordering::Acquire) == 0) {
                (Some(job), false)
            } else {
                queue.push(job);
                (None, queue.len() == 1)
            }
        };
        if let Some(job) = direct {
            // The caller's own timeout bounds this call: no second timer.
            call(vec![job], conn, None, self).await;
            return;
        }
        if first {
            let batcher = Arc::clone(self);
            tokio::spawn(async move {
                // Let the requests that are already runnable join this batch.
                tokio::task::yield_now().await;
                let jobs = std::mem::take(&mut *batcher.lock());
                flush(jobs, conn, cluster, timeout, &batcher).await;
            });
        }
    }

    fn batch_size(&self) -> &metrics::Histogram {
        self.batch_size
            .get_or_init(|| metrics::histogram!(BATCH_SIZE_METRIC))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Job>> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Counts a script call as on the wire while it lives (also if its future is dropped).
struct OnTheWire<'a>(&'a AtomicUsize);

impl<'a> OnTheWire<'a> {
    fn new(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::AcqRel);
        OnTheWire(counter)
    }
}

impl Drop for OnTheWire<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Sends `jobs` as as few script calls as the topology allows, all at once.
async fn flush(
    mut jobs: Vec<Job>,
    conn: Conn,
    cluster: bool,
    timeout: Duration,
    batcher: &Batcher,
) {
    // A caller that gave up while its job waited (its timeout, a cancelled request: the flush
    // task may have waited for a busy runtime) has already been answered; running its
    // verification anyway would spend its quota and add load when the service is behind.
    jobs.retain(|job| !job.reply.is_closed());
    // Group jobs that may share a call (see `Job::shares_call`); a stable sort keeps each
    // key's calls in arrival order within a group. Groups go out in sort order on one
    // connection, so a key's calls of two minutes still run in time order; only calls made
    // across a plans reload may run out of arrival order.
    jobs.sort_by_key(|j| (if cluster { j.shard } else { 0 }, j.call_key()));
    let mut calls = Vec::new();
    let mut rest = jobs.into_iter().peekable();
    while let Some(first) = rest.next() {
        let mut group = vec![first];
        while group.len() < MAX_BATCH
            && rest
                .peek()
                .is_some_and(|next| next.shares_call(&group[0], cluster))
        {
            group.extend(rest.next());
        }
        calls.push(call(group, conn.clone(), Some(timeout), batcher));
    }
    futures_util::future::join_all(calls).await;
}

/// One script call for `jobs`, given up after `timeout` if one is set; every job gets its own
/// answer.
async fn call(jobs: Vec<Job>, mut conn: Conn, timeout: Option<Duration>, batcher: &Batcher) {
    let _on_the_wire = OnTheWire::new(&batcher.in_flight);
    batcher.batch_size().record(jobs.len() as f64);
    let cmd = command(&jobs);
    let work = eval::<String>(&mut conn, &scripts::VERIFY, &cmd);
    let outcome = match timeout {
        Some(limit) => tokio::time::timeout(limit, work).await.ok(),
        None => Some(work.await),
    };
    match outcome {
        Some(Ok(reply)) => {
            let mut answers = reply.split('\n');
            for job in jobs {
                let answer = match answers.next() {
                    Some(a) if a.starts_with('E') => Err(failure_in_batch(&a[1..])),
                    Some(a) => Ok(a.to_owned()),
                    None => Err(Failure {
                        error: StoreError::permanent("redis: short reply to a verify batch"),
                        reset_lane: false,
                    }),
                };
                // The caller may have given up (timeout, cancelled); nothing to do then.
                let _ = job.reply.send(answer);
            }
        }
        Some(Err(err)) => {
            let failure = Failure {
                error: store_error(&err),
                reset_lane: gives_up_connection(&err),
            };
            for job in jobs {
                let _ = job.reply.send(Err(failure.clone()));
            }
        }
        // The callers time out on their own clocks; dropping the senders tells any that
        // are still waiting.
        None => {}
    }
}

/// A verification's error caught inside a batch (the script's `pcall` turns it into a line),
/// classified by its Redis error code as the same error outside a batch would be
/// ([`transient_code`]); READONLY also means the lane's connection reaches a replica and should
/// go. Anything else (a corrupt record) is this verification's own.
fn failure_in_batch(message: &str) -> Failure {
    let code = message.split_whitespace().next().unwrap_or_default();
    let message = format!("redis: {message}");
    Failure {
        error: if transient_code(code) {
            StoreError::transient(message)
        } else {
            StoreError::permanent(message)
        },
        reset_lane: code == "READONLY",
    }
}

/// The EVALSHA for `jobs` (non-empty, all sharing a call: `Job::shares_call`): see the VERIFY
/// script's layout.
fn command(jobs: &[Job]) -> Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(scripts::VERIFY.get_hash()).arg(jobs.len() * 4);
    for job in jobs {
        cmd.arg(&job.names[..]);
    }
    let day_ttl = jobs.iter().map(|j| j.day_ttl).min().unwrap_or(1);
    let minute_ttl = jobs.iter().map(|j| j.minute_ttl).min().unwrap_or(1);
    let window = jobs.first().map_or(0, |j| j.window);
    cmd.arg(jobs.first().map_or(&[0; 4][..], |j| &j.plan_limits[..]))
        .arg(day_ttl)
        .arg(window.rem_euclid(60))
        .arg(minute_ttl)
        .arg(window);
    for job in jobs {
        cmd.arg(&job.hash[..])
            .arg(job.now)
            .arg(job.cost)
            .arg(job.environment);
    }
    cmd
}
