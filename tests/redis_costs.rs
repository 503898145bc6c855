//! What VerifyKey and usage cost in Redis, measured on a Redis of the test's own (so
//! `INFO commandstats` counts only our calls): round trips and commands per decision, and the
//! bytes a key record and a key-day of usage take. Printed for the README and BENCHMARKS.md,
//! and held to the promises: one round trip per attributed call, none for MALFORMED.

mod common;

use std::sync::Arc;

use common::redis::{DedicatedRedis, commandstats};
use common::{Backend, TestServer, create_key, create_session, decision, verify};
use sendable_keys::grpc::pb;
use sendable_keys::store::redis::{RedisConfig, RedisStore};

fn reset(conn: &mut ::redis::Connection) {
    let _: () = ::redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query(conn)
        .expect("resetstat");
}

/// A server on a Redis of its own (so `INFO commandstats` counts only its calls), with the
/// production prefix; returns the Redis (kept alive by the caller), the server and the prefix.
async fn server_on_own_redis(batching: bool) -> (DedicatedRedis, TestServer, String) {
    let redis = DedicatedRedis::start();
    let prefix = "sk".to_owned();
    let store = RedisStore::new(&RedisConfig {
        urls: vec![redis.server.url()],
        cluster: false,
        pool_size: 2,
        batching,
        prefix: prefix.clone(),
        timeout: std::time::Duration::from_secs(5),
    })
    .expect("store");
    let server = TestServer::start_on_store(Arc::new(store), Backend::Redis, &prefix).await;
    (redis, server, prefix)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_costs_one_round_trip_and_malformed_none() {
    // This Redis is ours alone, so the production prefix and a realistic session id give the
    // sizes a deployment sees.
    let (redis, server, prefix) = server_on_own_redis(true).await;
    let mut c = server.keys();
    let id = "acme-prod-eu".to_owned();
    create_session(&mut c, &id, pb::Plan::Free, pb::Environment::Live).await;
    let (key, secret) = create_key(&mut c, &id).await;
    // Load the script once so the measurement is of the steady state.
    verify(&mut c, &secret).await;

    let client = ::redis::Client::open(redis.server.url()).expect("url");
    let mut conn = client.get_connection().expect("connect");

    reset(&mut conn);
    for _ in 0..100 {
        assert_eq!(
            decision(&verify(&mut c, "sk_live_typo").await),
            pb::Decision::Malformed
        );
    }
    let malformed = commandstats(&mut conn);
    assert!(
        malformed.is_empty(),
        "MALFORMED touched Redis: {malformed:?}"
    );

    reset(&mut conn);
    let n = 59; // 59 more VALID (one was spent loading the script)
    for _ in 0..n {
        assert_eq!(
            decision(&verify(&mut c, &secret).await),
            pb::Decision::Valid
        );
    }
    let valid = commandstats(&mut conn);
    reset(&mut conn);
    for _ in 0..n {
        assert_eq!(
            decision(&verify(&mut c, &secret).await),
            pb::Decision::RateLimited
        );
    }
    let limited = commandstats(&mut conn);
    for (what, stats) in [("VALID", &valid), ("RATE_LIMITED", &limited)] {
        let round_trips: u64 = ["evalsha", "eval", "script|load"]
            .iter()
            .map(|c| stats.get(*c).copied().unwrap_or(0))
            .sum();
        assert_eq!(
            round_trips, n,
            "{what}: one script call per verification: {stats:?}"
        );
        let per_call = |cmd: &str| stats.get(cmd).copied().unwrap_or(0) as f64 / n as f64;
        // Inside the script: read the key and its session, write the window and last-used,
        // count the decision per day and per minute (EXPIRE only when a counter is new).
        assert_eq!(
            (
                per_call("hmget"),
                per_call("hget"),
                per_call("hset"),
                per_call("hincrby")
            ),
            (1.0, 1.0, 1.0, 2.0),
            "{what}: {stats:?}"
        );
        assert!(
            stats.get("expire").copied().unwrap_or(0) <= 2,
            "{what}: {stats:?}"
        );
        let inside: u64 = stats
            .iter()
            .filter(|(k, _)| !["evalsha", "eval"].contains(&k.as_str()))
            .map(|(_, v)| v)
            .sum();
        println!(
            "{what}: 1 round trip (EVALSHA), {:.2} Redis commands inside the script per call: {stats:?}",
            inside as f64 / n as f64
        );
    }

    // Bytes: a key record after use, and one key-day of usage with every kind of counter.
    let records: Vec<String> = ::redis::cmd("KEYS")
        .arg(format!("{prefix}:*:k:{}", key.key_id))
        .query(&mut conn)
        .expect("keys");
    let record_bytes: u64 = ::redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(&records[0])
        .arg("SAMPLES")
        .arg(0)
        .query(&mut conn)
        .expect("memory usage");
    let mut usage = server.usage();
    let mut outcomes = Vec::new();
    for i in 0..200u32 {
        outcomes.push(pb::Outcome {
            key_id: key.key_id.clone(),
            success: i % 10 != 0,
            error_code: ["500", "503", "TIMEOUT", "429"][(i % 4) as usize].into(),
            response_time: Some(prost_types::Duration {
                seconds: 0,
                nanos: ((i % 13) * 37_000_000) as i32,
            }),
            time: None,
        });
    }
    usage
        .record_outcomes(pb::RecordOutcomesRequest { outcomes })
        .await
        .expect("outcomes");
    let days: Vec<String> = ::redis::cmd("KEYS")
        .arg(format!("{prefix}:*:u:{}:*", key.key_id))
        .query(&mut conn)
        .expect("keys");
    assert_eq!(days.len(), 1);
    let day_bytes: u64 = ::redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(&days[0])
        .arg("SAMPLES")
        .arg(0)
        .query(&mut conn)
        .expect("memory usage");
    let fields: u64 = ::redis::cmd("HLEN")
        .arg(&days[0])
        .query(&mut conn)
        .expect("hlen");
    println!(
        "key record: {record_bytes} bytes; one key-day of usage: {day_bytes} bytes ({fields} fields)"
    );
    assert!(
        record_bytes < 250,
        "a key record costs {record_bytes} bytes"
    );
    assert!(day_bytes < 512, "a key-day costs {day_bytes} bytes");
}

/// 400 verifications of one key in flight at once, on a Redis of their own, with batching on or
/// off: every answer must be its own (remaining counts down through every value exactly once,
/// as with one call at a time). Returns the script calls they took.
async fn concurrent_script_calls(batching: bool) -> u64 {
    let (redis, server, _) = server_on_own_redis(batching).await;
    let mut c = server.keys();
    create_session(&mut c, "acme-batch", pb::Plan::Pro, pb::Environment::Live).await;
    let (_, secret) = create_key(&mut c, "acme-batch").await;
    verify(&mut c, &secret).await; // loads the script

    let client = ::redis::Client::open(redis.server.url()).expect("url");
    let mut conn = client.get_connection().expect("connect");
    reset(&mut conn);
    let n = 400u32;
    let calls = (0..n).map(|_| {
        let mut c = c.clone();
        let secret = secret.clone();
        async move { verify(&mut c, &secret).await }
    });
    let answers = futures_util::future::join_all(calls).await;
    let mut remaining: Vec<u32> = answers
        .iter()
        .map(|a| {
            assert_eq!(decision(a), pb::Decision::Valid);
            a.rate_limit.as_ref().expect("rate limit").remaining
        })
        .collect();
    remaining.sort_unstable();
    // 1000/min and one call before: the answers are 998 down to 999 - n, each once.
    assert_eq!(remaining, ((999 - n)..=998).collect::<Vec<u32>>());
    let stats = commandstats(&mut conn);
    assert_eq!(stats.get("hmget").copied(), Some(u64::from(n)), "{stats:?}");
    let script_calls = stats.get("evalsha").copied().unwrap_or(0);
    println!(
        "batching {batching}: {n} concurrent verifications took {script_calls} script calls ({:.1} per call)",
        f64::from(n) / script_calls as f64
    );
    script_calls
}

/// With batching (the default), verifications in flight together share script calls; with
/// `SENDABLE_KEYS_REDIS_BATCHING=false` each takes its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_verifications_share_script_calls_unless_batching_is_off() {
    let batched = concurrent_script_calls(true).await;
    assert!(
        batched < 200,
        "400 concurrent verifications took {batched} script calls"
    );
    assert_eq!(concurrent_script_calls(false).await, 400);
}

/// On a standalone Redis, a RecordOutcomes batch over keys of many sessions (so many shards)
/// is stored by one script call: one round trip, and no call that stored part of its outcomes
/// before failing on another part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_outcomes_is_one_script_call_on_a_standalone_server() {
    let (redis, server, _) = server_on_own_redis(true).await;
    let mut c = server.keys();
    let mut outcomes = Vec::new();
    for n in 0..8 {
        let id = format!("outcomes-{n}");
        create_session(&mut c, &id, pb::Plan::Pro, pb::Environment::Live).await;
        let (key, _) = create_key(&mut c, &id).await;
        outcomes.push(pb::Outcome {
            key_id: key.key_id,
            success: n % 2 == 0,
            error_code: if n % 2 == 0 {
                String::new()
            } else {
                "503".into()
            },
            response_time: Some(prost_types::Duration {
                seconds: 0,
                nanos: 2_000_000,
            }),
            time: None,
        });
    }
    let shards: std::collections::HashSet<u16> = outcomes
        .iter()
        .map(|o| {
            sendable_keys::domain::KeyId::parse(&o.key_id)
                .expect("key id")
                .shard()
        })
        .collect();
    assert!(shards.len() > 1, "the keys span several shards");
    let client = ::redis::Client::open(redis.server.url()).expect("url");
    let mut conn = client.get_connection().expect("connect");
    // Once, so the script is loaded; then measure.
    let usage = || server.usage();
    usage()
        .record_outcomes(pb::RecordOutcomesRequest {
            outcomes: outcomes.clone(),
        })
        .await
        .expect("record");
    reset(&mut conn);
    let answer = usage()
        .record_outcomes(pb::RecordOutcomesRequest { outcomes })
        .await
        .expect("record")
        .into_inner();
    assert_eq!((answer.accepted, answer.rejected), (8, 0));
    let stats = commandstats(&mut conn);
    assert_eq!(stats.get("evalsha").copied(), Some(1), "{stats:?}");
}

/// Alert evaluation (ListAlerts, and every WatchAlerts tick) reads the keys that work, not the
/// session's whole key history: after 30 keys created and revoked, one live key costs one
/// record read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_read_only_the_live_keys() {
    let (redis, server, _) = server_on_own_redis(true).await;
    let mut c = server.keys();
    let id = "acme-rotating".to_owned();
    create_session(&mut c, &id, pb::Plan::Free, pb::Environment::Live).await;
    for _ in 0..30 {
        let (key, _) = create_key(&mut c, &id).await;
        c.revoke_key(pb::RevokeKeyRequest {
            key_id: key.key_id,
            reason: String::new(),
        })
        .await
        .expect("revoke");
    }
    let (_, secret) = create_key(&mut c, &id).await;
    verify(&mut c, &secret).await;
    let client = ::redis::Client::open(redis.server.url()).expect("url");
    let mut conn = client.get_connection().expect("connect");

    reset(&mut conn);
    server
        .usage()
        .list_alerts(pb::ListAlertsRequest {
            session_id: id.clone(),
        })
        .await
        .expect("alerts");
    let stats = commandstats(&mut conn);
    println!("ListAlerts with 1 live key of 31: {stats:?}");
    assert_eq!(
        stats.get("hmget").copied(),
        Some(1),
        "one key record read: {stats:?}"
    );
}
