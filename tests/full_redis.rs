//! A full Redis (`maxmemory` reached, no eviction), on a standalone server and on a Redis
//! Cluster this binary owns, since the tests change the servers' memory settings: revocation
//! still works, as the product page promises ("can be revoked at any time"), and its audit
//! entry is kept; calls that would add data fail `UNAVAILABLE` and leave nothing behind. Also
//! the eviction policy the startup warning reads, from every node. The in-memory store has no
//! memory limit to reach, so it has no counterpart here.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::redis::{DedicatedRedis, OwnedCluster, config_set, count_keys};
use common::{
    Backend, TestServer, audit_events, create_enterprise_session, create_key, create_session,
    decision, reason, try_verify, unique_prefix, unique_session, verify,
};
use sendable_keys::grpc::pb;
use sendable_keys::store::redis::{RedisConfig, RedisStore};
use tonic::Code;

async fn server_on(urls: Vec<String>, cluster: bool) -> TestServer {
    let prefix = unique_prefix();
    let store = RedisStore::new(&RedisConfig {
        urls,
        cluster,
        pool_size: 2,
        batching: true,
        prefix: prefix.clone(),
        timeout: Duration::from_secs(5),
    })
    .expect("store");
    store.warm_up().await.expect("redis reachable");
    let backend = if cluster {
        Backend::Cluster
    } else {
        Backend::Redis
    };
    TestServer::start_on_store(Arc::new(store), backend, &prefix).await
}

fn set_maxmemory(urls: &[String], bytes: &str) {
    for url in urls {
        config_set(url, "maxmemory", bytes);
    }
}

/// The key's usage totals for the test clock's day.
async fn usage_today(
    usage: &mut pb::usage_service_client::UsageServiceClient<tonic::transport::Channel>,
    key_id: &str,
) -> pb::UsageTotals {
    usage
        .get_key_usage(pb::GetKeyUsageRequest {
            key_id: key_id.to_owned(),
            start_date: "2026-03-02".to_owned(),
            end_date: "2026-03-02".to_owned(),
        })
        .await
        .expect("usage")
        .into_inner()
        .total
        .expect("totals")
}

fn stored_names(urls: &[String], prefix: &str) -> usize {
    urls.iter().map(|url| count_keys(url, prefix)).sum()
}

fn assert_unavailable<T: std::fmt::Debug>(result: Result<T, tonic::Status>, call: &str) {
    let err = result.expect_err(call);
    assert_eq!(err.code(), Code::Unavailable, "{call}: {err:?}");
    assert_eq!(reason(&err), "STORE_UNAVAILABLE", "{call}");
}

async fn a_full_redis_still_revokes_and_adds_nothing(urls: Vec<String>, cluster: bool) {
    let server = server_on(urls.clone(), cluster).await;
    let mut c = server.keys();
    let id = unique_session("full");
    create_session(&mut c, &id, pb::Plan::Pro, pb::Environment::Live).await;
    let (leaked, leaked_secret) = create_key(&mut c, &id).await;
    let (kept, kept_secret) = create_key(&mut c, &id).await;
    for secret in [&leaked_secret, &kept_secret] {
        assert_eq!(decision(&verify(&mut c, secret).await), pb::Decision::Valid);
    }
    let names_before = stored_names(&urls, &server.prefix);

    set_maxmemory(&urls, "1");
    assert_unavailable(
        c.create_key(pb::CreateKeyRequest {
            session_id: id.clone(),
            name: "while full".to_owned(),
            expire_time: None,
        })
        .await,
        "CreateKey on a full Redis",
    );
    for grace in [
        Some(prost_types::Duration {
            seconds: 3600,
            nanos: 0,
        }),
        None,
    ] {
        assert_unavailable(
            c.rotate_key(pb::RotateKeyRequest {
                key_id: kept.key_id.clone(),
                grace_period: grace,
            })
            .await,
            "RotateKey on a full Redis",
        );
    }
    assert_unavailable(
        c.create_session(pb::CreateSessionRequest {
            session_id: unique_session("full-new"),
            environment: pb::Environment::Live as i32,
            plan: pb::Plan::Free as i32,
            custom_rate_limit_per_minute: None,
            custom_max_keys: None,
        })
        .await,
        "CreateSession on a full Redis",
    );
    assert_unavailable(
        c.update_session(pb::UpdateSessionRequest {
            session_id: id.clone(),
            enabled: Some(false),
            ..Default::default()
        })
        .await,
        "UpdateSession on a full Redis",
    );
    let mut usage = server.usage();
    assert_unavailable(
        usage
            .record_outcomes(pb::RecordOutcomesRequest {
                outcomes: vec![pb::Outcome {
                    key_id: kept.key_id.clone(),
                    success: true,
                    error_code: String::new(),
                    response_time: None,
                    time: None,
                }],
            })
            .await,
        "RecordOutcomes on a full Redis",
    );
    assert_unavailable(try_verify(&mut c, &kept_secret).await, "VerifyKey");
    // Reads answer.
    c.get_key(pb::GetKeyRequest {
        key_id: kept.key_id.clone(),
    })
    .await
    .expect("GetKey on a full Redis");
    assert_eq!(usage_today(&mut usage, &kept.key_id).await.requests, 1);
    let revoked = c
        .revoke_key(pb::RevokeKeyRequest {
            key_id: leaked.key_id.clone(),
            reason: "leaked".to_owned(),
        })
        .await
        .expect("a full Redis still revokes")
        .into_inner();
    assert_eq!(revoked.status, pb::KeyStatus::Revoked as i32);
    // Revoking it again changes nothing, so nothing more is written past the limit: its audit
    // entry ("already revoked") is refused like any other.
    c.revoke_key(pb::RevokeKeyRequest {
        key_id: leaked.key_id.clone(),
        reason: "again".to_owned(),
    })
    .await
    .expect("revoking a revoked key answers");
    // Alerts with no state to change answer.
    let alerts = usage
        .list_alerts(pb::ListAlertsRequest {
            session_id: id.clone(),
        })
        .await
        .expect("ListAlerts on a full Redis")
        .into_inner();
    assert!(alerts.alerts.is_empty(), "{alerts:?}");
    assert_eq!(
        stored_names(&urls, &server.prefix),
        names_before,
        "nothing was added while Redis was full"
    );
    set_maxmemory(&urls, "0");

    assert_eq!(
        decision(&verify(&mut c, &leaked_secret).await),
        pb::Decision::Revoked
    );
    // The refused rotations changed nothing: the key works, unreplaced, and is the only one.
    assert_eq!(
        decision(&verify(&mut c, &kept_secret).await),
        pb::Decision::Valid
    );
    let keys = c
        .list_keys(pb::ListKeysRequest {
            session_id: id.clone(),
            page_size: 10,
            page_token: String::new(),
        })
        .await
        .expect("list")
        .into_inner()
        .keys;
    let mut listed: Vec<(String, i32, String)> = keys
        .into_iter()
        .map(|k| (k.key_id, k.status, k.replaced_by_key_id))
        .collect();
    listed.sort();
    let mut expected = vec![
        (
            leaked.key_id.clone(),
            pb::KeyStatus::Revoked as i32,
            String::new(),
        ),
        (
            kept.key_id.clone(),
            pb::KeyStatus::Active as i32,
            String::new(),
        ),
    ];
    expected.sort();
    assert_eq!(listed, expected);
    let session = c
        .get_session(pb::GetSessionRequest {
            session_id: id.clone(),
        })
        .await
        .expect("session")
        .into_inner();
    assert_eq!(session.active_keys, 1);
    // The refused RecordOutcomes counted nothing.
    let counted = usage_today(&mut usage, &kept.key_id).await;
    assert_eq!((counted.successes, counted.errors), (0, 0), "{counted:?}");
    // The revocation is in the audit log; the refused calls' entries were refused with them.
    let events = audit_events(&mut c, &id).await;
    let logged: Vec<(&str, &str, &str)> = events
        .iter()
        .map(|e| (e.action.as_str(), e.result.as_str(), e.key_id.as_str()))
        .collect();
    assert_eq!(
        logged,
        [
            ("RevokeKey", "OK", leaked.key_id.as_str()),
            ("CreateKey", "OK", kept.key_id.as_str()),
            ("CreateKey", "OK", leaked.key_id.as_str()),
            ("CreateSession", "OK", ""),
        ]
    );
    // Redis has room again: what was refused now goes through.
    let (_, again) = create_key(&mut c, &id).await;
    assert_eq!(decision(&verify(&mut c, &again).await), pb::Decision::Valid);
    assert!(try_verify(&mut c, &kept_secret).await.is_ok());

    // Alerts: an evaluation that must record a new firing is refused whole on a full Redis,
    // the resolutions in it included; one that only resolves goes through.
    let busy = unique_session("full-alerts");
    create_enterprise_session(&mut c, &busy, 5).await;
    let (first, first_secret) = create_key(&mut c, &busy).await;
    // Created a moment later, so it comes second in the evaluation: the first key's
    // resolution is its first change, the order a script writing in turn would let through.
    server.clock.set(common::T0 + 1);
    let (second, second_secret) = create_key(&mut c, &busy).await;
    let list = |mut usage: pb::usage_service_client::UsageServiceClient<_>| {
        let busy = busy.clone();
        async move {
            usage
                .list_alerts(pb::ListAlertsRequest { session_id: busy })
                .await
                .map(|r| {
                    let mut keys: Vec<String> = r
                        .into_inner()
                        .alerts
                        .into_iter()
                        .map(|a| a.key_id)
                        .collect();
                    keys.sort();
                    keys
                })
        }
    };
    // The alert states stored for a key, read from Redis itself.
    let stored_states = |key_id: &str| -> usize {
        urls.iter()
            .map(|url| {
                let mut conn = ::redis::Client::open(url.as_str())
                    .expect("url")
                    .get_connection()
                    .expect("connect");
                let names: Vec<String> = ::redis::cmd("KEYS")
                    .arg(format!("{}:*:al:{key_id}", server.prefix))
                    .query(&mut conn)
                    .expect("keys");
                names
                    .iter()
                    .map(|name| {
                        ::redis::cmd("HLEN")
                            .arg(name)
                            .query::<usize>(&mut conn)
                            .expect("hlen")
                    })
                    .sum::<usize>()
            })
            .sum()
    };
    for _ in 0..4 {
        verify(&mut c, &first_secret).await; // 4 of 5: past the 80% alert
    }
    assert_eq!(
        list(server.usage()).await.expect("alerts"),
        std::slice::from_ref(&first.key_id)
    );
    // Two minutes on: the first key's window is empty (its alert resolves) and the second
    // key is at 4 of 5 (its alert fires), in one evaluation.
    server.clock.set(common::T0 + 120_000);
    for _ in 0..4 {
        verify(&mut c, &second_secret).await;
    }
    set_maxmemory(&urls, "1");
    assert_unavailable(list(server.usage()).await, "a new firing on a full Redis");
    assert_eq!(
        (stored_states(&first.key_id), stored_states(&second.key_id)),
        (1, 0),
        "nothing of that evaluation stored"
    );
    set_maxmemory(&urls, "0");
    assert_eq!(
        list(server.usage()).await.expect("alerts"),
        std::slice::from_ref(&second.key_id)
    );
    // Two minutes more: the second one resolves too, full Redis or not.
    server.clock.set(common::T0 + 240_000);
    set_maxmemory(&urls, "1");
    assert!(list(server.usage()).await.expect("resolving").is_empty());
    set_maxmemory(&urls, "0");
    assert_eq!(
        (stored_states(&first.key_id), stored_states(&second.key_id)),
        (0, 0)
    );
}

/// The store reads every node's eviction policy (the startup warning's source): all of a
/// Cluster's masters, so one node set to evict is not missed.
async fn every_nodes_eviction_policy_is_read(urls: Vec<String>, cluster: bool) {
    let store = RedisStore::new(&RedisConfig {
        urls: urls.clone(),
        cluster,
        pool_size: 2,
        batching: true,
        prefix: unique_prefix(),
        timeout: Duration::from_secs(5),
    })
    .expect("store");
    let policies = store.eviction_policies().await.expect("policies");
    assert_eq!(policies, vec![Some("noeviction".to_owned()); urls.len()]);
    config_set(&urls[urls.len() - 1], "maxmemory-policy", "volatile-lru");
    let mut policies = store.eviction_policies().await.expect("policies");
    policies.sort();
    let mut expected = vec![Some("noeviction".to_owned()); urls.len() - 1];
    expected.push(Some("volatile-lru".to_owned()));
    assert_eq!(policies, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_redis_still_revokes_and_adds_nothing_standalone() {
    let redis = DedicatedRedis::start();
    a_full_redis_still_revokes_and_adds_nothing(vec![redis.server.url()], false).await;
    every_nodes_eviction_policy_is_read(vec![redis.server.url()], false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_redis_still_revokes_and_adds_nothing_cluster() {
    let cluster = tokio::task::spawn_blocking(OwnedCluster::masters_only)
        .await
        .expect("cluster starts");
    a_full_redis_still_revokes_and_adds_nothing(cluster.urls(), true).await;
    every_nodes_eviction_policy_is_read(cluster.urls(), true).await;
}
