//! The load generator and benchmark harness: `cargo bench --bench loadgen`.
//!
//! It starts its own `redis-server` and the release-built `sendable-keys` (one process on the
//! in-memory store, one on Redis; two more on Redis for the exactness check), creates sessions
//! and keys, then drives closed-loop gRPC load: `--concurrency` requests in flight over
//! `--connections` HTTP/2 connections for `--duration` per scenario, after a warm-up. For each
//! scenario it prints throughput, p50/p90/p99/p99.9 latency, the service's CPU microseconds per
//! call (from /proc), Redis's and its own, Redis commands and round trips per call (from INFO
//! commandstats), and how much of the machine's CPU sat idle (from /proc/stat): idle time with
//! calls in flight means the three processes were waiting on one another, not on the CPU.
//!
//! Every ratio is measured within the same run: VerifyKey's throughput is divided by the
//! throughput of the same server's empty RPC (`grpc.health.v1.Health/Check`), the gRPC ceiling
//! of this machine under this load generator. The machines are shared and noisy, so absolute
//! numbers move between runs; the ratios much less.
//!
//! The empty RPC and VerifyKey VALID of each server (and, on Redis, VerifyKey VALID with
//! batching off) are measured in alternating slices
//! (`--slices`, default 5 of each), so the noise of a shared machine falls on both sides of
//! their ratio.
//!
//! Options (after `--`): `--duration 10s --warmup 2s --concurrency 64 --connections 4
//! --keys 1000 --memory-keys 100000 --slices 5 --redis-pool-size 2 --worker-threads 0
//! --loadgen-threads 0 --only <scenario substring, or =exact name; several separated by ;>`,
//! and `--redis-delay 1ms` (off unless given).
//!
//! `--redis-delay` puts Redis a network hop away from the throughput scenarios' services: a
//! relay in this process holds every chunk that long in each direction (tokio's timer rounds
//! up to whole milliseconds), as a LAN or another zone would. Loopback acknowledges every
//! segment at once, which hides what a socket's settings cost across a real network (Nagle's
//! algorithm, for one: README, Connections). The relay's work counts in the load generator's
//! CPU column.

#[path = "../tests/common/process.rs"]
mod process;
#[path = "../tests/common/redis.rs"]
mod redis_harness;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use process::Process;
use sendable_keys::grpc::pb;
use sendable_keys::grpc::pb::key_service_client::KeyServiceClient;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

const ADMIN: &str = "skt_bench-admin-token-0123456789abcdef";
const SERVICE: &str = "skt_bench-service-token-0123456789abcd";
const PEPPER: &str = "bench-pepper-0123456789abcdef-0123456789";
/// A string shaped like a live key whose checksum is wrong: answered MALFORMED locally.
const MALFORMED_KEY: &str = "sk_live_notAKeyAtAll0000000000000000000000000000";

#[derive(Parser, Debug)]
#[command(about = "sendable-keys load generator")]
struct Args {
    #[arg(long, default_value = "10s", value_parser = sendable_keys::config::parse_duration)]
    duration: Duration,
    #[arg(long, default_value = "2s", value_parser = sendable_keys::config::parse_duration)]
    warmup: Duration,
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Keys verified in the throughput scenarios.
    #[arg(long, default_value_t = 1000)]
    keys: usize,
    /// Keys created to measure Redis memory per key (0 skips it).
    #[arg(long, default_value_t = 100_000)]
    memory_keys: usize,
    /// Redis connections of the service (SENDABLE_KEYS_REDIS_POOL_SIZE).
    #[arg(long, default_value_t = 2)]
    redis_pool_size: u16,
    /// Worker threads of the service (SENDABLE_KEYS_WORKER_THREADS; 0 = one per core).
    #[arg(long, default_value_t = 0)]
    worker_threads: usize,
    /// Instead of load: count the service's instructions per call under valgrind (callgrind)
    /// over this many sequential calls per kind. Deterministic, unlike timings on a shared
    /// machine, so it is what optimizations are judged by.
    #[arg(long)]
    instructions: Option<u64>,
    /// The empty RPC and VerifyKey VALID alternate in this many slices each (see `main`).
    #[arg(long, default_value_t = 5)]
    slices: u32,
    /// Run only scenarios whose name contains this (several: separated by `;`; `=name`
    /// for exactly that name).
    #[arg(long)]
    only: Option<String>,
    /// Worker threads of the load generator's own runtime (0 = one per core).
    #[arg(long, default_value_t = 0)]
    loadgen_threads: usize,
    /// Redis this far away, each way, for the throughput scenarios' services (see above; none
    /// when not given).
    #[arg(long, value_parser = sendable_keys::config::parse_duration)]
    redis_delay: Option<Duration>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn authed<T>(message: T, token: &str) -> tonic::Request<T> {
    let value: MetadataValue<_> = format!("Bearer {token}").parse().expect("metadata");
    with_auth(message, value)
}

/// A request with a prepared `authorization` value (what a real client does: build it once).
fn with_auth<T>(message: T, value: MetadataValue<tonic::metadata::Ascii>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", value);
    request
}

/// A service process and what the harness knows about it.
struct Service {
    process: Process,
    name: &'static str,
}

impl Service {
    fn start(name: &'static str, redis_url: Option<&str>, pool_size: u16, workers: usize) -> Self {
        Self::start_with(name, redis_url, pool_size, workers, &[])
    }

    fn start_with(
        name: &'static str,
        redis_url: Option<&str>,
        pool_size: u16,
        workers: usize,
        extra_env: &[(&str, &str)],
    ) -> Self {
        let pool_size = pool_size.to_string();
        let workers = workers.to_string();
        let mut env = vec![("SENDABLE_KEYS_REDIS_POOL_SIZE", pool_size.as_str())];
        env.extend_from_slice(extra_env);
        if workers != "0" {
            env.push(("SENDABLE_KEYS_WORKER_THREADS", workers.as_str()));
        }
        env.extend([
            ("SENDABLE_KEYS_PEPPER", PEPPER),
            // Production-like logging: warnings, plus the app's startup lines.
            ("SENDABLE_KEYS_LOG", "warn,sendable_keys::app=info"),
        ]);
        if let Some(url) = redis_url {
            env.push(("REDIS_URL", url));
        }
        let process = Process::start(
            &[("ops", "admin", ADMIN), ("bench", "service", SERVICE)],
            &env,
        );
        Service { process, name }
    }

    fn pid(&self) -> i32 {
        self.process.child.id() as i32
    }

    async fn channels(&self, n: usize) -> Vec<Channel> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.process.channel().await);
        }
        out
    }
}

/// CPU time (user + system) a process has used.
fn cpu_time(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_micros(ticks * 1_000_000 / hz)
}

/// The whole machine's CPU time so far: (idle, total), from /proc/stat's first line.
fn machine_cpu() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").expect("proc stat");
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .expect("cpu line")
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user already).
    let total = ticks.iter().take(8).sum();
    (ticks[3] + ticks[4], total)
}

fn rss_mib(pid: i32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn redis_conn(url: &str) -> ::redis::Connection {
    ::redis::Client::open(url)
        .expect("url")
        .get_connection()
        .expect("redis")
}

/// Microseconds Redis has spent running scripts (INFO commandstats, EVALSHA and EVAL).
fn script_usec(conn: &mut ::redis::Connection) -> u64 {
    let info: String = ::redis::cmd("INFO")
        .arg("commandstats")
        .query(conn)
        .expect("info");
    info.lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .filter_map(|l| l.split(',').find_map(|f| f.strip_prefix("usec=")))
        .filter_map(|v| v.parse::<u64>().ok())
        .sum()
}

/// Redis's own CPU time (INFO cpu: used_cpu_user + used_cpu_sys of the main thread and all).
fn redis_cpu(conn: &mut ::redis::Connection) -> Duration {
    let info: String = ::redis::cmd("INFO").arg("cpu").query(conn).expect("info");
    let field = |name: &str| -> f64 {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    Duration::from_secs_f64(field("used_cpu_user:") + field("used_cpu_sys:"))
}

struct Measured {
    calls: u64,
    errors: u64,
    elapsed: Duration,
    latencies_us: Vec<u32>,
    /// CPU time of the service, of Redis (if used) and of this load generator.
    cpu: Duration,
    redis_cpu: Option<Duration>,
    loadgen_cpu: Duration,
    /// Per measured call: script calls (EVALSHA), commands inside scripts, and Redis's time
    /// running scripts (µs, INFO commandstats).
    redis: Option<(f64, f64, f64)>,
    /// The machine's idle CPU time and all its CPU time (ticks) while measuring.
    idle: (u64, u64),
}

impl Measured {
    /// Two measurements of the same scenario as one (interleaved slices).
    fn merge(mut self, other: Measured) -> Measured {
        let weighted = |a: f64, b: f64| {
            let total = (self.calls + other.calls).max(1) as f64;
            (a * self.calls as f64 + b * other.calls as f64) / total
        };
        let redis = match (self.redis, other.redis) {
            (Some((r1, c1, u1)), Some((r2, c2, u2))) => {
                Some((weighted(r1, r2), weighted(c1, c2), weighted(u1, u2)))
            }
            (one, other) => one.or(other),
        };
        let redis_cpu = match (self.redis_cpu, other.redis_cpu) {
            (Some(a), Some(b)) => Some(a + b),
            (one, other) => one.or(other),
        };
        self.latencies_us.extend(other.latencies_us);
        self.latencies_us.sort_unstable();
        Measured {
            calls: self.calls + other.calls,
            errors: self.errors + other.errors,
            elapsed: self.elapsed + other.elapsed,
            latencies_us: self.latencies_us,
            cpu: self.cpu + other.cpu,
            redis_cpu,
            loadgen_cpu: self.loadgen_cpu + other.loadgen_cpu,
            redis,
            idle: (self.idle.0 + other.idle.0, self.idle.1 + other.idle.1),
        }
    }

    fn rate(&self) -> f64 {
        self.calls as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&self, q: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        let i = ((q * self.latencies_us.len() as f64).ceil() as usize)
            .clamp(1, self.latencies_us.len())
            - 1;
        f64::from(self.latencies_us[i]) / 1000.0
    }
}

/// Closed-loop load: `concurrency` workers over the channels, each calling `call` back to back
/// for `warmup` + `duration`; only the measured part counts.
#[allow(clippy::too_many_arguments)]
async fn drive<F, Fut>(
    warmup: Duration,
    duration: Duration,
    concurrency: usize,
    channels: &[Channel],
    service: &Service,
    redis: Option<&str>,
    call: F,
) -> Measured
where
    F: Fn(Channel, u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = bool> + Send,
{
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..concurrency {
        let channel = channels[w % channels.len()].clone();
        let call = call.clone();
        let (measuring, stop) = (measuring.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(1 << 16);
            let mut errors = 0u64;
            let mut n = w as u64 * 7919;
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let ok = call(channel.clone(), n).await;
                n += 1;
                if measuring.load(Ordering::Relaxed) {
                    latencies.push(started.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                    errors += u64::from(!ok);
                }
            }
            (latencies, errors)
        }));
    }
    tokio::time::sleep(warmup).await;
    let mut conn = redis.map(redis_conn);
    let before_stats = conn.as_mut().map(redis_harness::commandstats);
    let script_before = conn.as_mut().map(script_usec);
    let redis_cpu_before = conn.as_mut().map(redis_cpu);
    let own = std::process::id() as i32;
    let loadgen_before = cpu_time(own);
    let cpu_before = cpu_time(service.pid());
    let machine_before = machine_cpu();
    let started = Instant::now();
    measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(duration).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed();
    let machine_after = machine_cpu();
    let cpu = cpu_time(service.pid()) - cpu_before;
    let loadgen_cpu = cpu_time(own) - loadgen_before;
    let redis_cpu = match (redis_cpu_before, conn.as_mut().map(redis_cpu)) {
        (Some(before), Some(after)) => Some(after.saturating_sub(before)),
        _ => None,
    };
    let after_stats = conn.as_mut().map(redis_harness::commandstats);
    let script_after = conn.as_mut().map(script_usec);
    stop.store(true, Ordering::Relaxed);
    let mut latencies_us = Vec::new();
    let mut errors = 0;
    for worker in workers {
        let (l, e) = worker.await.expect("worker");
        latencies_us.extend(l);
        errors += e;
    }
    latencies_us.sort_unstable();
    let calls = latencies_us.len() as u64;
    let redis = match (before_stats, after_stats) {
        (Some(before), Some(after)) => {
            let delta = |name: &str| {
                after.get(name).copied().unwrap_or(0) - before.get(name).copied().unwrap_or(0)
            };
            let total: u64 = after.keys().map(|k| delta(k)).sum();
            let script_calls = delta("evalsha") + delta("eval");
            let inside = total - script_calls;
            let script = script_after.unwrap_or(0) - script_before.unwrap_or(0);
            let per = calls.max(1) as f64;
            Some((
                script_calls as f64 / per,
                inside as f64 / per,
                script as f64 / per,
            ))
        }
        _ => None,
    };
    Measured {
        calls,
        errors,
        elapsed,
        latencies_us,
        cpu,
        redis_cpu,
        loadgen_cpu,
        redis,
        // The kernel's idle counters can step back a little; never wrap.
        idle: (
            machine_after.0.saturating_sub(machine_before.0),
            machine_after.1.saturating_sub(machine_before.1),
        ),
    }
}

struct Report {
    rows: Vec<(String, usize, usize, Measured)>,
}

impl Report {
    fn print_header() {
        println!(
            "| scenario | in flight | conns | calls/s | p50 ms | p90 ms | p99 ms | p99.9 ms | errors | service CPU µs/call | Redis CPU µs/call | loadgen CPU µs/call | Redis script calls/call | Redis cmds in script/call | Redis script µs/call | machine idle |"
        );
        println!(
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
    }

    fn add(&mut self, name: String, concurrency: usize, connections: usize, m: Measured) {
        let (rt, cmds, script) = m.redis.map_or(
            ("—".to_owned(), "—".to_owned(), "—".to_owned()),
            |(rt, c, u)| (format!("{rt:.3}"), format!("{c:.2}"), format!("{u:.1}")),
        );
        let per_call = |d: Duration| d.as_micros() as f64 / m.calls.max(1) as f64;
        let redis_cpu = m
            .redis_cpu
            .map_or("—".to_owned(), |d| format!("{:.1}", per_call(d)));
        let idle = 100.0 * m.idle.0 as f64 / m.idle.1.max(1) as f64;
        println!(
            "| {name} | {concurrency} | {connections} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {:.1} | {redis_cpu} | {:.1} | {rt} | {cmds} | {script} | {idle:.0} % |",
            m.rate(),
            m.percentile(0.50),
            m.percentile(0.90),
            m.percentile(0.99),
            m.percentile(0.999),
            m.errors,
            per_call(m.cpu),
            per_call(m.loadgen_cpu),
        );
        self.rows.push((name, concurrency, connections, m));
    }

    fn rate(&self, name: &str) -> Option<f64> {
        self.rows.iter().find(|r| r.0 == name).map(|r| r.3.rate())
    }

    /// CPU µs per call of the service, Redis and this load generator together.
    fn cpu_per_call(&self, name: &str) -> Option<f64> {
        self.parts(name).map(|p| p.service + p.redis + p.loadgen)
    }

    /// A scenario's CPU µs per call, process by process, and the machine's busy share.
    fn parts(&self, name: &str) -> Option<Parts> {
        self.rows.iter().find(|r| r.0 == name).map(|r| {
            let m = &r.3;
            let per_call = |d: Duration| d.as_micros() as f64 / m.calls.max(1) as f64;
            Parts {
                service: per_call(m.cpu),
                redis: per_call(m.redis_cpu.unwrap_or_default()),
                loadgen: per_call(m.loadgen_cpu),
                busy: 1.0 - m.idle.0 as f64 / m.idle.1.max(1) as f64,
            }
        })
    }
}

/// Where a scenario's calls spent the machine: CPU µs per call of each process, and the share
/// of the two cores that was busy (1 − the "machine idle" column).
struct Parts {
    service: f64,
    redis: f64,
    loadgen: f64,
    busy: f64,
}

/// Two cores shared by every process run as many calls a second as their busy share of the
/// cores divided by the CPU all processes spend per call; so one scenario's throughput over
/// another's is (CPU per call, b over a) × (busy share, a over b). For the measured parts it
/// reproduces the measured ratio (to within the CPU the machine's other tenants and the
/// kernel's own threads spend), which is what makes the same estimate worth printing for
/// parts changed on paper.
fn estimated_ratio(a: &Parts, b: &Parts) -> f64 {
    let cpu = |p: &Parts| p.service + p.redis + p.loadgen;
    (cpu(b) / cpu(a)) * (a.busy / b.busy.max(f64::EPSILON))
}

async fn create_session(channel: &Channel, id: &str, plan: pb::Plan, custom: Option<u32>) {
    KeyServiceClient::new(channel.clone())
        .create_session(authed(
            pb::CreateSessionRequest {
                session_id: id.to_owned(),
                environment: pb::Environment::Live as i32,
                plan: plan as i32,
                custom_rate_limit_per_minute: custom,
                custom_max_keys: None,
            },
            ADMIN,
        ))
        .await
        .expect("create session");
}

/// Creates `n` keys spread over `sessions`, 64 in flight; returns the full keys.
async fn create_keys(channel: &Channel, sessions: &[String], n: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    let mut pending = tokio::task::JoinSet::new();
    for i in 0..n {
        let mut client = KeyServiceClient::new(channel.clone());
        let session = sessions[i % sessions.len()].clone();
        pending.spawn(async move {
            client
                .create_key(authed(
                    pb::CreateKeyRequest {
                        session_id: session,
                        name: format!("bench key {i}"),
                        expire_time: None,
                    },
                    ADMIN,
                ))
                .await
                .expect("create key")
                .into_inner()
                .secret
        });
        if pending.len() >= 64
            && let Some(done) = pending.join_next().await
        {
            out.push(done.expect("task"));
        }
    }
    while let Some(done) = pending.join_next().await {
        out.push(done.expect("task"));
    }
    out
}

/// A load generator call, as a shareable object (scenarios of different call types alternate).
type Call =
    Arc<dyn Fn(Channel, u64) -> std::pin::Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync>;

fn health_call()
-> impl Fn(Channel, u64) -> std::pin::Pin<Box<dyn Future<Output = bool> + Send>> + Clone + Send + 'static
{
    |channel, _| {
        Box::pin(async move {
            tonic_health::pb::health_client::HealthClient::new(channel)
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .is_ok()
        })
    }
}

/// VerifyKey on the keys in turn; a call counts as an error unless its decision is one of
/// `expect`.
fn verify_call(
    keys: Arc<Vec<String>>,
    expect: &'static [pb::Decision],
) -> impl Fn(Channel, u64) -> std::pin::Pin<Box<dyn Future<Output = bool> + Send>> + Clone + Send + 'static
{
    let auth: MetadataValue<_> = format!("Bearer {SERVICE}").parse().expect("metadata");
    move |channel, n| {
        let key = keys[(n as usize) % keys.len()].clone();
        let auth = auth.clone();
        Box::pin(async move {
            KeyServiceClient::new(channel)
                .verify_key(with_auth(
                    pb::VerifyKeyRequest {
                        key,
                        expected_environment: 0,
                        cost: 0,
                    },
                    auth,
                ))
                .await
                .is_ok_and(|r| {
                    let decision = r.into_inner().decision;
                    expect.iter().any(|&d| decision == d as i32)
                })
        })
    }
}

fn wanted(args: &Args, name: &str) -> bool {
    args.only.as_deref().is_none_or(|only| {
        only.split(';')
            .filter(|part| !part.is_empty())
            .any(|part| match part.strip_prefix('=') {
                Some(exact) => name == exact,
                None => name.contains(part),
            })
    })
}

/// A relay to the Redis at `url` that holds every chunk for `delay` in each direction, in
/// order, as if Redis were a network hop away; returns the URL to use instead. Its own sockets
/// have Nagle off, so how the service's writes coalesce is up to the service's socket alone.
async fn delay_relay(url: &str, delay: Duration) -> String {
    let target = url
        .strip_prefix("redis://")
        .expect("a redis:// URL")
        .to_owned();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the delay relay");
    let addr = listener.local_addr().expect("relay address");
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(&target).await else {
                continue;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            tokio::spawn(delayed_pipe(client_read, server_write, delay));
            tokio::spawn(delayed_pipe(server_read, client_write, delay));
        }
    });
    format!("redis://{addr}")
}

/// Copies `from` to `to`, each chunk `delay` after it arrived.
async fn delayed_pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
    });
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0
            || tx
                .send((tokio::time::Instant::now() + delay, buf[..n].to_vec()))
                .is_err()
        {
            break;
        }
    }
    // The writer drains what is queued, then dropping its half closes the other side.
    drop(tx);
    let _ = writer.await;
}

fn main() {
    let args = Args::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if args.loadgen_threads > 0 {
        runtime.worker_threads(args.loadgen_threads);
    }
    runtime
        .enable_all()
        .build()
        .expect("load generator runtime")
        .block_on(run(args));
}

async fn run(args: Args) {
    if let Some(n) = args.instructions {
        instructions(n).await;
        return;
    }
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let redis = redis_harness::DedicatedRedis::start();
    let url = redis.server.url();
    let version: String = ::redis::cmd("INFO")
        .arg("server")
        .query::<String>(&mut redis_conn(&url))
        .expect("info")
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap_or("?")
        .trim()
        .to_owned();
    println!("# sendable-keys load test");
    println!();
    println!(
        "machine: {cores} cores shared by the load generator, the service and Redis; redis-server {version}; \
         {} per scenario after {} warm-up (empty RPC, VerifyKey VALID and VerifyKey VALID with batching off alternating in {} slices each); {} keys",
        humantime(args.duration),
        humantime(args.warmup),
        args.slices,
        args.keys
    );
    println!();

    // The services measured under load reach Redis through the delay relay, if asked for; the
    // harness's own connections (commandstats) and the exactness and memory checks go direct.
    let service_url = match args.redis_delay {
        None => url.clone(),
        Some(delay) => {
            println!(
                "Redis is {delay:?} away (rounded up to whole milliseconds), each way, from the \
                 throughput scenarios' services (--redis-delay)"
            );
            println!();
            delay_relay(&url, delay).await
        }
    };
    let memory = Service::start("memory", None, args.redis_pool_size, args.worker_threads);
    let on_redis = Service::start(
        "redis",
        Some(&service_url),
        args.redis_pool_size,
        args.worker_threads,
    );
    // The same, with verification batching off: measured beside the default, to show what
    // batching is worth on this machine.
    let unbatched = Service::start_with(
        "redis, batching off",
        Some(&service_url),
        args.redis_pool_size,
        args.worker_threads,
        &[("SENDABLE_KEYS_REDIS_BATCHING", "false")],
    );
    let unbatched_channels = unbatched.channels(args.connections).await;
    let unbatched_sessions: Vec<String> =
        (0..100).map(|i| format!("bench-unbatched-{i}")).collect();
    for s in &unbatched_sessions {
        create_session(
            &unbatched_channels[0],
            s,
            pb::Plan::Enterprise,
            Some(100_000_000),
        )
        .await;
    }
    let unbatched_keys =
        Arc::new(create_keys(&unbatched_channels[0], &unbatched_sessions, args.keys).await);
    let mut report = Report { rows: Vec::new() };
    Report::print_header();

    for service in [&memory, &on_redis] {
        let channels = service.channels(args.connections).await;
        let redis_url = (service.name == "redis").then_some(url.as_str());
        // 1000 keys in 100 Enterprise sessions whose limit never bites: every call is VALID.
        let sessions: Vec<String> = (0..100)
            .map(|i| format!("bench-{}-{i}", service.name))
            .collect();
        for s in &sessions {
            create_session(&channels[0], s, pb::Plan::Enterprise, Some(100_000_000)).await;
        }
        let keys = Arc::new(create_keys(&channels[0], &sessions, args.keys).await);
        // The ceiling and VerifyKey (on Redis also VerifyKey with batching off) are measured in
        // alternating slices (`--slices` of each, together `--duration` per scenario), so a
        // change in what else this shared machine is doing falls on every side of a comparison
        // instead of on one.
        let ceiling = format!("empty RPC (health), {} server", service.name);
        let verify = format!("VerifyKey VALID, {} store", service.name);
        let health: Call = Arc::new(health_call());
        let valid: Call = Arc::new(verify_call(keys.clone(), &[pb::Decision::Valid]));
        let mut pair: Vec<(String, Call, &Service, &[Channel])> = vec![
            (ceiling, health, service, &channels),
            (verify, valid, service, &channels),
        ];
        if service.name == "redis" {
            pair.push((
                "VerifyKey VALID, redis store, batching off".to_owned(),
                Arc::new(verify_call(unbatched_keys.clone(), &[pb::Decision::Valid])),
                &unbatched,
                &unbatched_channels,
            ));
        }
        pair.retain(|(name, ..)| wanted(&args, name));
        let slices = args.slices.max(1);
        let slice = args.duration / slices;
        let mut merged: Vec<Option<Measured>> = pair.iter().map(|_| None).collect();
        for round in 0..slices {
            // Full warm-up before the first slice; a short one (new workers) before the others.
            let warmup = if round == 0 {
                args.warmup
            } else {
                Duration::from_millis(300)
            };
            for ((_, call, on, channels), total) in pair.iter().zip(merged.iter_mut()) {
                let call = Arc::clone(call);
                let m = drive(
                    warmup,
                    slice,
                    args.concurrency,
                    channels,
                    on,
                    redis_url,
                    move |channel, n| call(channel, n),
                )
                .await;
                *total = Some(match total.take() {
                    Some(before) => before.merge(m),
                    None => m,
                });
            }
        }
        for ((name, ..), m) in pair.into_iter().zip(merged) {
            if let Some(m) = m {
                report.add(name, args.concurrency, args.connections, m);
            }
        }
        if service.name == "redis" {
            let single = "VerifyKey VALID, redis store, 1 in flight".to_owned();
            if wanted(&args, &single) {
                let m = drive(
                    args.warmup,
                    args.duration,
                    1,
                    &channels[..1],
                    service,
                    redis_url,
                    verify_call(keys.clone(), &[pb::Decision::Valid]),
                )
                .await;
                report.add(single, 1, 1, m);
            }
            // Free keys, hammered: almost every call is RATE_LIMITED. As the window slides a
            // few are let through (about one per key per second), which is right, not an error.
            let limited = "VerifyKey RATE_LIMITED, redis store".to_owned();
            if wanted(&args, &limited) {
                create_session(&channels[0], "bench-free", pb::Plan::Free, None).await;
                let free = Arc::new(create_keys(&channels[0], &["bench-free".to_owned()], 3).await);
                for key in free.iter() {
                    for _ in 0..60 {
                        verify_call(Arc::new(vec![key.clone()]), &[pb::Decision::Valid])(
                            channels[0].clone(),
                            0,
                        )
                        .await;
                    }
                }
                let m = drive(
                    args.warmup,
                    args.duration,
                    args.concurrency,
                    &channels,
                    service,
                    redis_url,
                    verify_call(free, &[pb::Decision::RateLimited, pb::Decision::Valid]),
                )
                .await;
                report.add(limited, args.concurrency, args.connections, m);
            }
            let malformed = "VerifyKey MALFORMED (no store call)".to_owned();
            if wanted(&args, &malformed) {
                let junk = Arc::new(vec![MALFORMED_KEY.to_owned()]);
                let m = drive(
                    args.warmup,
                    args.duration,
                    args.concurrency,
                    &channels,
                    service,
                    redis_url,
                    verify_call(junk, &[pb::Decision::Malformed]),
                )
                .await;
                report.add(malformed, args.concurrency, args.connections, m);
            }
        }
        println!(
            "<!-- {} service resident memory after load: {:.1} MiB -->",
            service.name,
            rss_mib(service.pid())
        );
    }
    println!();
    let ratio = |a: &str, b: &str| match (report.rate(a), report.rate(b)) {
        (Some(a), Some(b)) => format!("{:.2}x", a / b),
        _ => "—".to_owned(),
    };
    println!("| ratio (same run) | value | target |");
    println!("| --- | ---: | ---: |");
    println!(
        "| VerifyKey on Redis / empty RPC | {} | ≥ 0.60x |",
        ratio(
            "VerifyKey VALID, redis store",
            "empty RPC (health), redis server"
        )
    );
    // What the ratio would be if the cores never idled: the three processes' CPU per call,
    // empty RPC over VerifyKey. The gap to the measured ratio is time they spent waiting on
    // one another (the "machine idle" column).
    println!(
        "| the same from CPU per call alone (service + Redis + load generator), as if no core ever idled | {} | |",
        match (
            report.cpu_per_call("empty RPC (health), redis server"),
            report.cpu_per_call("VerifyKey VALID, redis store"),
        ) {
            (Some(empty), Some(verify)) => format!("{:.2}x", empty / verify),
            _ => "—".to_owned(),
        }
    );
    // The same ratio estimated from where the CPU went (see `estimated_ratio`): first for the
    // parts as measured, a check of the estimate against the measured ratio above; then for a
    // service that spent no more CPU per VerifyKey than per empty RPC, with Redis, the load
    // generator and the idle share as measured: what a service whose VerifyKey cost no more
    // than an empty RPC would get on this machine, as far as the estimate holds.
    let empty = report.parts("empty RPC (health), redis server");
    let verify = report.parts("VerifyKey VALID, redis store");
    let estimate = |f: &dyn Fn(&Parts, &Parts) -> f64| match (&empty, &verify) {
        (Some(e), Some(v)) => format!("{:.2}x", f(v, e)),
        _ => "—".to_owned(),
    };
    println!(
        "| the same estimated from CPU per call and idle share (a check of the estimate) | {} | |",
        estimate(&|v, e| estimated_ratio(v, e))
    );
    println!(
        "| the same estimated for a service spending no more CPU per VerifyKey than per empty RPC (Redis, load generator, idle as measured) | {} | |",
        estimate(&|v, e| estimated_ratio(
            &Parts {
                service: e.service,
                ..*v
            },
            e
        ))
    );
    println!(
        "| VerifyKey on Redis, batching off / empty RPC | {} | |",
        ratio(
            "VerifyKey VALID, redis store, batching off",
            "empty RPC (health), redis server"
        )
    );
    println!(
        "| VerifyKey in memory / empty RPC | {} | ≥ 0.85x |",
        ratio(
            "VerifyKey VALID, memory store",
            "empty RPC (health), memory server"
        )
    );
    println!();
    println!("| service resident memory after load | MiB |");
    println!("| --- | ---: |");
    println!(
        "| in-memory store ({} keys) | {:.1} |",
        args.keys,
        rss_mib(memory.pid())
    );
    println!("| Redis store | {:.1} |", rss_mib(on_redis.pid()));
    println!();

    if wanted(&args, "exactness") {
        exactness(&args, &url).await;
    }
    if args.memory_keys > 0 && wanted(&args, "memory per key") {
        memory_per_key(&args).await;
    }
}

fn humantime(d: Duration) -> String {
    format!("{:.0} s", d.as_secs_f64())
}

/// Two service instances on one Redis, Free keys (60/min) hammered through both: counts the
/// VALID answers per key and per one-minute window (from each answer's reset_after) and checks
/// none exceeds the limit.
async fn exactness(args: &Args, url: &str) {
    let a = Service::start(
        "redis-a",
        Some(url),
        args.redis_pool_size,
        args.worker_threads,
    );
    let b = Service::start(
        "redis-b",
        Some(url),
        args.redis_pool_size,
        args.worker_threads,
    );
    let ca = a.channels(args.connections).await;
    let cb = b.channels(args.connections).await;
    let mut sessions = Vec::new();
    for i in 0..20 {
        let id = format!("exact-{i}");
        create_session(&ca[0], &id, pb::Plan::Free, None).await;
        sessions.push(id);
    }
    let keys = Arc::new(create_keys(&ca[0], &sessions, 60).await);
    let channels: Vec<Channel> = ca.into_iter().chain(cb).collect();
    let counts: Arc<std::sync::Mutex<HashMap<(usize, i64), u32>>> = Arc::default();
    let deadline = Instant::now() + args.duration;
    let mut workers = Vec::new();
    for w in 0..args.concurrency {
        let channel = channels[w % channels.len()].clone();
        let keys = keys.clone();
        let counts = counts.clone();
        workers.push(tokio::spawn(async move {
            let mut n = w;
            let mut calls = 0u64;
            while Instant::now() < deadline {
                let k = n % keys.len();
                n += 1;
                let response = KeyServiceClient::new(channel.clone())
                    .verify_key(authed(
                        pb::VerifyKeyRequest {
                            key: keys[k].clone(),
                            expected_environment: 0,
                            cost: 0,
                        },
                        SERVICE,
                    ))
                    .await
                    .expect("verify")
                    .into_inner();
                calls += 1;
                if response.valid {
                    let reset = response
                        .rate_limit
                        .and_then(|r| r.reset_after)
                        .map_or(0, |d| d.seconds * 1000 + i64::from(d.nanos) / 1_000_000);
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as i64);
                    // The window ends `reset` from now: its index is the minute that ends then.
                    let window = (now + reset - 1).div_euclid(60_000);
                    *counts
                        .lock()
                        .expect("counts")
                        .entry((k, window))
                        .or_default() += 1;
                }
            }
            calls
        }));
    }
    let mut calls = 0;
    for w in workers {
        calls += w.await.expect("worker");
    }
    let counts = counts.lock().expect("counts");
    let max = counts.values().copied().max().unwrap_or(0);
    let valid: u32 = counts.values().sum();
    println!("| exactness: 2 instances on one Redis, 60 Free keys (60/min) | value |");
    println!("| --- | ---: |");
    println!("| calls | {calls} |");
    println!("| VALID answers | {valid} |");
    println!("| most VALID for one key in one window | {max} (limit 60) |");
    println!();
    assert!(max <= 60, "a key was admitted {max} times in one window");
}

/// Redis memory per stored key, on a Redis of its own: INFO used_memory before and after
/// creating the keys through the API, and MEMORY USAGE of each kind of Redis key, so the key
/// records and the per-session sets show apart; the rest of the growth is the audit events.
async fn memory_per_key(args: &Args) {
    let redis = redis_harness::DedicatedRedis::start();
    let url = redis.server.url();
    let service = Service::start(
        "memory-per-key",
        Some(&url),
        args.redis_pool_size,
        args.worker_threads,
    );
    let channel = service.process.channel().await;
    let mut conn = redis_conn(&url);
    let used = |conn: &mut ::redis::Connection| -> i64 {
        let info: String = ::redis::cmd("INFO")
            .arg("memory")
            .query(conn)
            .expect("info");
        info.lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("used_memory")
    };
    // Starter-sized sessions: 10 keys each, short names.
    let sessions: Vec<String> = (0..args.memory_keys.div_ceil(10))
        .map(|i| format!("acme-{i:06}"))
        .collect();
    for chunk in sessions.chunks(256) {
        let mut set = tokio::task::JoinSet::new();
        for s in chunk {
            let channel = channel.clone();
            let s = s.clone();
            set.spawn(async move { create_session(&channel, &s, pb::Plan::Pro, None).await });
        }
        while set.join_next().await.is_some() {}
    }
    let before = used(&mut conn);
    let started = Instant::now();
    let keys = create_keys(&channel, &sessions, args.memory_keys).await;
    let took = started.elapsed();
    let after = used(&mut conn);
    let n = keys.len() as f64;
    let records = usage_of(&mut conn, "*:k:*");
    let sets = usage_of(&mut conn, "*:i:*") + usage_of(&mut conn, "*:a:*");
    println!(
        "| Redis memory per stored key ({} keys in {} sessions, created in {:.1} s) | bytes per key |",
        keys.len(),
        sessions.len(),
        took.as_secs_f64()
    );
    println!("| --- | ---: |");
    println!("| key record (MEMORY USAGE) | {:.0} |", records as f64 / n);
    println!(
        "| its entries in the session's index and active set (MEMORY USAGE of the sets / keys) | {:.0} |",
        sets as f64 / n
    );
    let growth = (after - before) as f64 / n;
    println!(
        "| the CreateKey audit event (used_memory growth minus the lines above) | {:.0} |",
        growth - (records + sets) as f64 / n
    );
    println!(
        "| used_memory growth while creating the keys, per key | {:.0} |",
        growth
    );
    println!();
}

/// Sum of MEMORY USAGE over the keys matching `pattern`.
fn usage_of(conn: &mut ::redis::Connection, pattern: &str) -> i64 {
    let mut cursor = 0u64;
    let mut total = 0i64;
    loop {
        let (next, keys): (u64, Vec<String>) = ::redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query(conn)
            .expect("scan");
        for key in keys {
            let bytes: Option<i64> = ::redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(&key)
                .arg("SAMPLES")
                .arg(0)
                .query(conn)
                .expect("memory usage");
            total += bytes.unwrap_or(0);
        }
        cursor = next;
        if cursor == 0 {
            return total;
        }
    }
}

/// Instructions the service executes per call, from callgrind: zero the counters, make `n`
/// sequential calls, dump, read the total. The service runs on Redis with one worker thread
/// (valgrind runs threads one at a time anyway).
async fn instructions(n: u64) {
    let redis = redis_harness::DedicatedRedis::start();
    let url = redis.server.url();
    println!("| call | service instructions per call (callgrind, {n} sequential calls) |");
    println!("| --- | ---: |");
    instructions_of(n, Some(&url)).await;
    instructions_of(n, None).await;
}

/// Counts, on one service under callgrind (on Redis at `redis_url`, else in memory), the
/// instructions per call of each kind of call.
async fn instructions_of(n: u64, redis_url: Option<&str>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("callgrind.out");
    let out_arg = format!("--callgrind-out-file={}", out.display());
    let mut env = vec![
        ("SENDABLE_KEYS_PEPPER", PEPPER),
        ("SENDABLE_KEYS_LOG", "warn,sendable_keys::app=info"),
        ("SENDABLE_KEYS_WORKER_THREADS", "1"),
    ];
    if let Some(url) = redis_url {
        env.push(("REDIS_URL", url));
    }
    let process = Process::start_wrapped(
        &["/usr/bin/valgrind", "--tool=callgrind", "--quiet", &out_arg],
        &[("ops", "admin", ADMIN), ("bench", "service", SERVICE)],
        &env,
    );
    let pid = process.child.id();
    let channel = process.channel().await;
    create_session(&channel, "instr", pb::Plan::Enterprise, Some(100_000_000)).await;
    let keys = Arc::new(create_keys(&channel, &["instr".to_owned()], 1).await);
    let junk = Arc::new(vec![MALFORMED_KEY.to_owned()]);
    let valid = Arc::new(verify_call(keys, &[pb::Decision::Valid]));
    let kinds: Vec<(&str, Call)> = if redis_url.is_some() {
        vec![
            ("empty RPC (health)", Arc::new(health_call())),
            (
                "VerifyKey MALFORMED",
                Arc::new(verify_call(junk, &[pb::Decision::Malformed])),
            ),
            ("VerifyKey VALID (Redis)", valid),
        ]
    } else {
        vec![
            (
                "empty RPC (health), in-memory server",
                Arc::new(health_call()),
            ),
            ("VerifyKey VALID (in memory)", valid),
        ]
    };
    for (name, call) in kinds {
        for i in 0..50 {
            call(channel.clone(), i).await;
        }
        let control = |flag: &str| {
            let status = std::process::Command::new("callgrind_control")
                .arg(flag)
                .arg(pid.to_string())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .expect("callgrind_control");
            assert!(status.success(), "callgrind_control {flag}");
        };
        control("-z");
        for i in 0..n {
            assert!(call(channel.clone(), i).await, "{name} failed");
        }
        control("-d");
        let (total, dump) = newest_dump_total(dir.path());
        // Kept for `callgrind_annotate target/callgrind/<kind>.out`.
        let keep = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("../callgrind");
        let _ = std::fs::create_dir_all(&keep);
        let slug: String = name.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
        let _ = std::fs::copy(&dump, keep.join(format!("{slug}.out")));
        println!("| {name} | {:.0} |", total as f64 / n as f64);
    }
}

/// The `totals:` (instructions) of the most recent callgrind dump in `dir`, and its path.
fn newest_dump_total(dir: &std::path::Path) -> (u64, std::path::PathBuf) {
    let newest = std::fs::read_dir(dir)
        .expect("dumps")
        .filter_map(Result::ok)
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .expect("a dump");
    let text = std::fs::read_to_string(newest.path()).expect("read dump");
    let total = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("totals:")
                .or_else(|| l.strip_prefix("summary:"))
        })
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("totals line");
    (total, newest.path())
}
