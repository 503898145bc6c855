//! A Redis Cluster fails over under the service: first by hand (`CLUSTER FAILOVER`, what an
//! operator or an orchestrator does for maintenance), then by a crash (the master is killed and
//! the cluster promotes its replica). The service must follow both by itself: same answers,
//! same rate-limit counts, revoked keys still revoked, scripts working on a master that may
//! never have loaded them, and, while no master owns the key's slot, failing closed
//! (UNAVAILABLE), never answering a guess, while keys on the other masters and the readiness
//! probe carry on undisturbed.
//!
//! Its own binary, because it owns a six-node cluster whose topology it changes.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::redis::{OwnedCluster, node_role, replica_of, wait_replica_in_sync};
use common::{
    Backend, TestServer, create_enterprise_session, create_key, decision, unique_prefix,
    unique_session, verify,
};
use sendable_keys::grpc::pb;
use sendable_keys::grpc::pb::key_service_client::KeyServiceClient;
use sendable_keys::store::redis::{RedisConfig, RedisStore};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;

/// Requests a minute for the test's session: small, so the counts are easy to follow.
const LIMIT: u32 = 20;

/// The port of the master that holds everything stored under `prefix` (a session and its keys
/// share one hash tag, so one slot, so one master).
fn master_holding(cluster: &OwnedCluster, prefix: &str) -> u16 {
    let holders: Vec<u16> = cluster
        .nodes
        .iter()
        .filter(|n| n.is_running() && node_role(&n.server.url()) == "master")
        .filter(|n| common::redis::count_keys(&n.server.url(), prefix) > 0)
        .map(|n| n.server.port)
        .collect();
    assert_eq!(holders.len(), 1, "the session's data on one master");
    holders[0]
}

/// The port of the master holding `session`'s data (its key index lives in its shard's slot).
fn master_of_session(cluster: &OwnedCluster, prefix: &str, session: &str) -> Option<u16> {
    cluster
        .nodes
        .iter()
        .filter(|n| n.is_running() && node_role(&n.server.url()) == "master")
        .find(|n| {
            let client = ::redis::Client::open(n.server.url()).expect("url");
            let mut conn = client.get_connection().expect("connect");
            let found: Vec<String> = ::redis::cmd("KEYS")
                .arg(format!("{prefix}:*:i:{session}"))
                .query(&mut conn)
                .expect("KEYS");
            !found.is_empty()
        })
        .map(|n| n.server.port)
}

/// Polls `port`'s role until it is `master`, bounded at 30 s (a state change the cluster makes
/// on its own schedule, not a server that is already listening).
fn wait_until_master(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while node_role(&format!("redis://127.0.0.1:{port}")) != "master" {
        assert!(Instant::now() < deadline, "node {port} never became master");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// [`common::verify_until_answered`], bounded at 30 s.
async fn verify_until_answered(
    c: &mut KeyServiceClient<Channel>,
    secret: &str,
) -> (pb::VerifyKeyResponse, usize) {
    common::verify_until_answered(c, secret, Duration::from_secs(30)).await
}

fn remaining(answer: &pb::VerifyKeyResponse) -> u32 {
    answer.rate_limit.as_ref().expect("rate limit").remaining
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_follows_a_manual_and_a_crash_failover() {
    let mut cluster = tokio::task::spawn_blocking(OwnedCluster::replicated)
        .await
        .expect("cluster");
    let prefix = unique_prefix();
    let store = RedisStore::new(&RedisConfig {
        urls: cluster.urls(),
        cluster: true,
        pool_size: 2,
        batching: true,
        prefix: prefix.clone(),
        timeout: Duration::from_secs(1),
    })
    .expect("store");
    store.warm_up().await.expect("cluster reachable");
    let server = TestServer::start_on_store(Arc::new(store), Backend::Cluster, &prefix).await;
    let mut c = server.keys();
    let session = unique_session("failover");
    create_enterprise_session(&mut c, &session, LIMIT).await;
    let (_, secret) = create_key(&mut c, &session).await;
    let (revoked, revoked_secret) = create_key(&mut c, &session).await;
    c.revoke_key(pb::RevokeKeyRequest {
        key_id: revoked.key_id,
        reason: "before the failover".into(),
    })
    .await
    .expect("revoke");
    // The test's clock stands still, so every call below falls in one window.
    for used in 1..=3 {
        let answer = verify(&mut c, &secret).await;
        assert_eq!(decision(&answer), pb::Decision::Valid);
        assert_eq!(remaining(&answer), LIMIT - used);
    }

    // 1. By hand: the replica takes over once it has everything (Redis's manual failover waits
    // for the replica to catch up), so nothing is lost and no call should fail.
    let first = master_holding(&cluster, &prefix);
    let promoted = replica_of(&format!("redis://127.0.0.1:{first}"));
    {
        let client = ::redis::Client::open(format!("redis://127.0.0.1:{promoted}")).expect("url");
        let mut conn = client.get_connection().expect("connect to replica");
        let _: () = ::redis::cmd("CLUSTER")
            .arg("FAILOVER")
            .query(&mut conn)
            .expect("CLUSTER FAILOVER");
    }
    tokio::task::spawn_blocking(move || wait_until_master(promoted))
        .await
        .expect("wait");
    let (answer, failed) = verify_until_answered(&mut c, &secret).await;
    assert_eq!(failed, 0, "a planned failover fails no call");
    assert_eq!(decision(&answer), pb::Decision::Valid);
    assert_eq!(
        remaining(&answer),
        LIMIT - 4,
        "the count moved with the slot"
    );
    assert_eq!(
        decision(&verify(&mut c, &revoked_secret).await),
        pb::Decision::Revoked
    );
    assert_eq!(master_holding(&cluster, &prefix), promoted);

    // A key on another master, which the crash below must not disturb.
    let mut bystander = None;
    for n in 0..64 {
        let other = unique_session(&format!("bystander{n}"));
        // A limit the watcher below cannot reach while the test's clock stands still.
        create_enterprise_session(&mut c, &other, 1_000_000).await;
        let (_, other_secret) = create_key(&mut c, &other).await;
        let holder = master_of_session(&cluster, &prefix, &other);
        if let Some(port) = holder.filter(|&port| port != promoted) {
            bystander = Some((other_secret, port));
            break;
        }
    }
    let (bystander_secret, bystander_master) =
        bystander.expect("a session on another master among 64");

    // 2. A crash: the new master dies without a word, after its replica (the old master) has
    // everything; the cluster notices within its 1 s node timeout and promotes the replica.
    tokio::task::spawn_blocking(move || {
        wait_replica_in_sync(&format!("redis://127.0.0.1:{first}"))
    })
    .await
    .expect("sync");
    // Meanwhile a caller of the other master's key, and a readiness probe.
    let stop = Arc::new(AtomicBool::new(false));
    let bystander = {
        let mut c = server.keys();
        let mut health = server.health();
        let stop = stop.clone();
        let bystander = bystander_secret.clone();
        tokio::spawn(async move {
            let (mut answered, mut failures) = (0, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match common::try_verify(&mut c, &bystander).await {
                    Ok(answer) => {
                        assert_eq!(decision(&answer), pb::Decision::Valid);
                        answered += 1;
                    }
                    Err(err) => failures.push(format!("VerifyKey: {:?}", err.code())),
                }
                let status = health
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .map(|r| r.into_inner().status);
                if !matches!(status, Ok(s) if s == ServingStatus::Serving as i32) {
                    failures.push(format!("health: {status:?}"));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (answered, failures)
        })
    };
    cluster.kill(promoted);
    let (answer, failed) = verify_until_answered(&mut c, &secret).await;
    stop.store(true, Ordering::Relaxed);
    let (answered, failures) = bystander.await.expect("bystander");
    assert!(
        answered > 0,
        "the other master's key was verified during the outage"
    );
    assert!(
        failures.is_empty(),
        "a crash of one master disturbed a key on another, or readiness: {failures:?}"
    );
    assert_eq!(decision(&answer), pb::Decision::Valid, "{answer:?}");
    assert_eq!(remaining(&answer), LIMIT - 5, "no count lost or doubled");
    assert!(
        failed >= 1,
        "while no master owned the slot, calls failed closed"
    );
    assert_eq!(node_role(&format!("redis://127.0.0.1:{first}")), "master");
    assert_eq!(
        decision(&verify(&mut c, &revoked_secret).await),
        pb::Decision::Revoked
    );
    // Management follows too: a new key on the new master verifies.
    let (_, fresh) = create_key(&mut c, &session).await;
    let answer = verify(&mut c, &fresh).await;
    assert_eq!(decision(&answer), pb::Decision::Valid);
    assert_eq!(remaining(&answer), LIMIT - 1);

    // 3. Another crash, of the other key's master, whose replica has never run a script, while
    // the node killed above is still in the cluster's view: the script must reach the new
    // master all the same (a SCRIPT LOAD sent to every node would fail on the dead one).
    let its_replica = replica_of(&format!("redis://127.0.0.1:{bystander_master}"));
    tokio::task::spawn_blocking(move || {
        wait_replica_in_sync(&format!("redis://127.0.0.1:{its_replica}"))
    })
    .await
    .expect("sync");
    cluster.kill(bystander_master);
    let (answer, _) = verify_until_answered(&mut c, &bystander_secret).await;
    assert_eq!(decision(&answer), pb::Decision::Valid, "{answer:?}");
    assert_eq!(
        node_role(&format!("redis://127.0.0.1:{its_replica}")),
        "master"
    );
    // The path this phase is for: the new master had no script and was sent one.
    let client = ::redis::Client::open(format!("redis://127.0.0.1:{its_replica}")).expect("url");
    let mut conn = client.get_connection().expect("connect");
    let errors: String = ::redis::cmd("INFO")
        .arg("errorstats")
        .query(&mut conn)
        .expect("INFO errorstats");
    assert!(errors.contains("errorstat_NOSCRIPT"), "{errors}");
    server.stop().await;
}
