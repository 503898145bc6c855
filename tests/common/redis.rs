//! Real Redis for the tests: one standalone `redis-server` and one 3-master Redis Cluster per
//! test binary, each on free loopback ports, started on first use and shared by every test of
//! the binary (tests isolate themselves with their own key prefix, so they run in parallel);
//! and, for fault tests, servers and a replicated cluster that one test owns and can kill.
//!
//! The servers never outlive the test process: they are spawned from a thread that lives until
//! the process exits, with `PR_SET_PDEATHSIG`, so the kernel kills them when it does — even if
//! a test panics or the run is interrupted. Startup waits for redis-server's own "Ready to
//! accept connections" line instead of sleeping.
//!
//! Also used by the load generator (`benches/loadgen.rs`), which needs only part of it.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A running redis-server.
pub struct RedisServer {
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }
}

fn require_binary(name: &str) {
    let found = Command::new(name)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "`{name}` was not found on PATH. The tests run against a real Redis 7: install it with \
         `sudo apt-get install -y redis-server` (Debian/Ubuntu; it provides redis-server and \
         redis-cli) or `brew install redis` (macOS), then run the tests again."
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Spawns `command` from a thread that parks forever, with PDEATHSIG set: the child dies with
/// the test process (PDEATHSIG fires when the *spawning thread* exits, so that thread must
/// outlive every test).
fn spawn_tied_to_process(mut command: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<mpsc::Sender<(Command, mpsc::Sender<std::io::Result<Child>>)>> =
        OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<(Command, mpsc::Sender<std::io::Result<Child>>)>();
        std::thread::Builder::new()
            .name("redis-spawner".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
                    unsafe {
                        command.pre_exec(|| {
                            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                                return Err(std::io::Error::last_os_error());
                            }
                            Ok(())
                        });
                    }
                    let _ = reply.send(command.spawn());
                }
                // The sender lives in a static, so this loop never ends: the thread (and with
                // it the children's PDEATHSIG link) lasts until the process exits.
            })
            .expect("spawner thread");
        tx
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    command.stdout(Stdio::piped()).stderr(Stdio::inherit());
    spawner
        .send((command, reply_tx))
        .expect("spawner thread alive");
    reply_rx.recv().expect("spawner replies")
}

/// Starts redis-server with `extra` arguments on a free port; retries on a port race.
fn start_server(extra: &[&str]) -> RedisServer {
    let (server, _child) = start_server_on(None, extra);
    server
}

/// A redis-server owned by one test, which it can kill and restart (fault tests).
pub struct DedicatedRedis {
    pub server: RedisServer,
    child: Option<Child>,
}

impl DedicatedRedis {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a server with `extra` redis-server arguments.
    pub fn start_with(extra: &[&str]) -> Self {
        let (server, child) = start_server_on(None, extra);
        DedicatedRedis {
            server,
            child: Some(child),
        }
    }

    /// Whether the server is still running (not killed by the test).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the server (SIGKILL: no graceful goodbye to clients, like a crashed node).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a fresh, empty standalone server on the same port (not for cluster nodes, whose
    /// identity lives in a nodes.conf that a restart does not keep).
    pub fn restart(&mut self) {
        self.restart_with(&[]);
    }

    /// [`DedicatedRedis::restart`] with `extra` redis-server arguments.
    pub fn restart_with(&mut self, extra: &[&str]) {
        self.kill();
        let (server, child) = start_server_on(Some(self.server.port), extra);
        self.server = server;
        self.child = Some(child);
    }
}

impl Drop for DedicatedRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

fn start_server_on(fixed_port: Option<u16>, extra: &[&str]) -> (RedisServer, Child) {
    require_binary("redis-server");
    for _ in 0..5 {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = fixed_port.unwrap_or_else(free_port);
        let mut command = Command::new("redis-server");
        command
            .arg("--port")
            .arg(port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args([
                "--daemonize",
                "no",
                "--logfile",
                "",
                "--protected-mode",
                "no",
            ])
            .arg("--dir")
            .arg(dir.path())
            .args(extra);
        let mut child = spawn_tied_to_process(command).expect("redis-server starts");
        if wait_ready(&mut child) {
            // Dropping a Child neither kills nor waits; the process lives until ours ends.
            return (RedisServer { port, _dir: dir }, child);
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("redis-server did not start after 5 attempts (see its output above)");
}

/// Reads redis-server's log until it is ready (true) or exits (false, e.g. port taken).
fn wait_ready(child: &mut Child) -> bool {
    let Some(stdout) = child.stdout.take() else {
        return false;
    };
    let mut lines = BufReader::new(stdout).lines();
    let mut ready = false;
    for line in lines.by_ref() {
        let Ok(line) = line else { break };
        if line.contains("Ready to accept connections") {
            ready = true;
            break;
        }
        if line.contains("# ")
            && (line.contains("Address already in use") || line.contains("Failed"))
        {
            eprintln!("redis-server: {line}");
        }
    }
    // Drain the rest of the log in the background.
    std::thread::spawn(move || for _ in lines {});
    ready
}

pub fn standalone() -> &'static RedisServer {
    static SERVER: OnceLock<RedisServer> = OnceLock::new();
    SERVER.get_or_init(|| start_server(&[]))
}

pub fn cluster() -> &'static RedisCluster {
    static CLUSTER: OnceLock<RedisCluster> = OnceLock::new();
    CLUSTER.get_or_init(start_cluster)
}

/// Cluster-mode arguments for a node; `node_timeout_ms` is how long a silent node takes to be
/// marked failed (and its replica promoted).
fn cluster_node_args(node_timeout_ms: &str) -> [&str; 6] {
    [
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
        "--cluster-node-timeout",
        node_timeout_ms,
    ]
}

fn start_cluster() -> RedisCluster {
    require_binary("redis-cli");
    let nodes: Vec<RedisServer> = (0..3)
        .map(|_| start_server(&cluster_node_args("2000")))
        .collect();
    create_cluster(&nodes.iter().map(|n| n.port).collect::<Vec<_>>(), 0);
    let cluster = RedisCluster { nodes };
    wait_cluster_ok(&cluster.urls());
    cluster
}

/// `redis-cli --cluster create` over the nodes on `ports`, `replicas` replicas per master.
fn create_cluster(ports: &[u16], replicas: usize) {
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let output = Command::new("redis-cli")
        .arg("--cluster")
        .arg("create")
        .args(&addrs)
        .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
        .output()
        .expect("redis-cli runs");
    assert!(
        output.status.success(),
        "redis-cli --cluster create failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A Redis Cluster owned by one test: 3 masters with `replicas` replicas each, on a 1 s node
/// timeout and without `cluster-require-full-coverage`, so the test can reconfigure its nodes
/// (or fail a master over, by hand or by killing it) and watch the service follow.
pub struct OwnedCluster {
    pub nodes: Vec<DedicatedRedis>,
}

impl OwnedCluster {
    /// 3 masters with a replica each (failover tests).
    pub fn replicated() -> Self {
        Self::start(1)
    }

    /// 3 masters alone, like the shared cluster, but this test's to reconfigure.
    pub fn masters_only() -> Self {
        Self::start(0)
    }

    fn start(replicas: usize) -> Self {
        require_binary("redis-cli");
        let nodes: Vec<DedicatedRedis> = (0..3 * (1 + replicas))
            .map(|_| {
                let mut args = cluster_node_args("1000").to_vec();
                // The setting the README recommends: the other masters keep serving while a
                // failed one's replica takes over (Redis's default stops the whole cluster).
                args.extend(["--cluster-require-full-coverage", "no"]);
                DedicatedRedis::start_with(&args)
            })
            .collect();
        create_cluster(
            &nodes.iter().map(|n| n.server.port).collect::<Vec<_>>(),
            replicas,
        );
        let cluster = OwnedCluster { nodes };
        wait_cluster_ok(&cluster.urls());
        for node in &cluster.nodes {
            if node_role(&node.server.url()) == "slave" {
                wait_replica_in_sync(&node.server.url());
            }
        }
        cluster
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.server.url()).collect()
    }

    /// Kills (SIGKILL) the node on `port`, as a crash would.
    pub fn kill(&mut self, port: u16) {
        if let Some(node) = self.nodes.iter_mut().find(|n| n.server.port == port) {
            node.kill();
        }
    }
}

/// `master` or `slave`: the first word of the node's `ROLE` reply.
pub fn node_role(url: &str) -> String {
    let client = redis::Client::open(url).expect("url");
    let mut conn = client.get_connection().expect("connect");
    let role: Vec<redis::Value> = redis::cmd("ROLE").query(&mut conn).expect("ROLE");
    match role.first() {
        Some(redis::Value::BulkString(bytes)) => String::from_utf8_lossy(bytes).into_owned(),
        other => panic!("unexpected ROLE reply: {other:?}"),
    }
}

/// The port of the replica that follows the master at `url`.
pub fn replica_of(url: &str) -> u16 {
    let client = redis::Client::open(url).expect("url");
    let mut conn = client.get_connection().expect("connect");
    let info: String = redis::cmd("INFO")
        .arg("replication")
        .query(&mut conn)
        .expect("INFO replication");
    // slave0:ip=127.0.0.1,port=40000,state=online,offset=..,lag=..
    info.lines()
        .find_map(|line| {
            let rest = line.strip_prefix("slave0:")?;
            rest.split(',')
                .find_map(|kv| kv.strip_prefix("port="))?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no replica reported by {url}: {info}"))
}

/// Polls a replica until its link to the master is up and it has applied everything the
/// master reported at that moment (the replica's own offset reaches the master's), bounded at
/// 30 s: after this, a crash of the master loses nothing written before the call.
pub fn wait_replica_in_sync(replica_url: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let client = redis::Client::open(replica_url).expect("url");
    let mut conn = client.get_connection().expect("connect to replica");
    let field = |info: &str, name: &str| -> Option<String> {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':').map(str::to_owned))
    };
    let mut target: Option<u64> = None;
    loop {
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query(&mut conn)
            .expect("INFO replication");
        let up = field(&info, "master_link_status").as_deref() == Some("up");
        if up && target.is_none() {
            let host = field(&info, "master_host").expect("master_host");
            let port = field(&info, "master_port").expect("master_port");
            let master = redis::Client::open(format!("redis://{host}:{port}")).expect("url");
            let mut m = master.get_connection().expect("connect to master");
            let minfo: String = redis::cmd("INFO")
                .arg("replication")
                .query(&mut m)
                .expect("INFO replication");
            target = field(&minfo, "master_repl_offset").and_then(|v| v.parse().ok());
        }
        let applied: Option<u64> = field(&info, "slave_repl_offset").and_then(|v| v.parse().ok());
        if let (true, Some(t), Some(a)) = (up, target, applied)
            && a >= t
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "replica {replica_url} never caught up: {info}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Gossip needs a moment after `--cluster create` before every node reports the cluster as
/// ok. This polls each node's own view (a state change, not a server that is already
/// listening), bounded at 30 s.
pub fn wait_cluster_ok(urls: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    for url in urls {
        let client = redis::Client::open(url.as_str()).expect("url");
        let mut conn = client.get_connection().expect("connect to cluster node");
        loop {
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query(&mut conn)
                .expect("CLUSTER INFO");
            if info.contains("cluster_state:ok") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "cluster never reached state ok: {info}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Counts keys under `prefix` on a server (SCAN, so it works on any node).
/// `CONFIG SET parameter value` on the server at `url` (a test's own server: it changes it).
pub fn config_set(url: &str, parameter: &str, value: &str) {
    let mut conn = redis::Client::open(url)
        .expect("url")
        .get_connection()
        .expect("connect");
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg(parameter)
        .arg(value)
        .query(&mut conn)
        .expect("config set");
}

pub fn count_keys(url: &str, prefix: &str) -> usize {
    let client = redis::Client::open(url).expect("url");
    let mut conn = client.get_connection().expect("connect");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query(&mut conn)
        .expect("KEYS");
    keys.len()
}

/// Path of a file in the crate (for fixtures).
#[allow(dead_code)]
pub fn crate_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// Calls per command from `INFO commandstats`, without the commands a health checker or the
/// measurement itself issues (PING, INFO, CONFIG).
pub fn commandstats(conn: &mut ::redis::Connection) -> std::collections::BTreeMap<String, u64> {
    let info: String = ::redis::cmd("INFO")
        .arg("commandstats")
        .query(conn)
        .expect("info");
    info.lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
            Some((name.to_owned(), calls.parse().ok()?))
        })
        .filter(|(name, _)| {
            !name.starts_with("ping") && !name.starts_with("info") && !name.starts_with("config")
        })
        .collect()
}
