//! Verification batching on Redis (`src/store/redis/batch.rs`): concurrent VerifyKey calls
//! share script calls, a batch spanning shards is split where a cluster requires it, and
//! sharing one never lets one call's failure reach another's answer.
//! Exactness under concurrency (1000 parallel calls on a 60/min key) is in `key_service.rs`;
//! script calls per call on an otherwise idle Redis are in `redis_costs.rs`.

mod common;

use common::{Backend, TestServer, create_key, create_session, decision, unique_session};
use futures_util::future::join_all;
use sendable_keys::grpc::pb;
use tonic::Code;

/// A key record overwritten with a string (a corrupt or foreign value under our prefix) makes
/// Redis refuse that key's script work (WRONGTYPE). The good keys verified at the same moment,
/// which may travel in the same script call, still get their own right answers.
async fn a_corrupt_record_fails_only_its_own_verifications(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.keys();
    let id = unique_session("batch");
    create_session(&mut c, &id, pb::Plan::Pro, pb::Environment::Live).await;
    let (good_key, good) = create_key(&mut c, &id).await;
    let (bad_key, bad) = create_key(&mut c, &id).await;
    // Both keys are in the session's shard, so in a cluster too they can share a script call.
    let mut corrupted = 0;
    for url in server.redis_urls() {
        let client = ::redis::Client::open(url).expect("url");
        let mut conn = client.get_connection().expect("connect");
        let names: Vec<String> = ::redis::cmd("KEYS")
            .arg(format!("{}:*:k:{}", server.prefix, bad_key.key_id))
            .query(&mut conn)
            .expect("keys");
        for name in names {
            let _: () = ::redis::cmd("DEL")
                .arg(&name)
                .query(&mut conn)
                .expect("del");
            let _: () = ::redis::cmd("SET")
                .arg(&name)
                .arg("not a hash")
                .query(&mut conn)
                .expect("set");
            corrupted += 1;
        }
    }
    assert_eq!(corrupted, 1, "the bad key's record was found once");

    let calls = (0..240).map(|i| {
        let mut c = c.clone();
        let key = if i % 8 == 0 {
            bad.clone()
        } else {
            good.clone()
        };
        async move {
            let result = c
                .verify_key(pb::VerifyKeyRequest {
                    key,
                    expected_environment: 0,
                    cost: 0,
                })
                .await;
            (i % 8 == 0, result)
        }
    });
    let mut good_valid = 0;
    let mut bad_failed = 0;
    for (is_bad, result) in join_all(calls).await {
        match (is_bad, result) {
            (false, Ok(r)) if decision(r.get_ref()) == pb::Decision::Valid => good_valid += 1,
            (true, Err(status)) if status.code() == Code::Internal => bad_failed += 1,
            (is_bad, other) => panic!("bad key: {is_bad}, answer: {other:?}"),
        }
    }
    assert_eq!((good_valid, bad_failed), (210, 30));
    // The good key's window counted exactly its own 210 calls (the test clock stands still).
    let status = server
        .usage()
        .get_rate_limit_status(pb::GetRateLimitStatusRequest {
            key_id: good_key.key_id.clone(),
        })
        .await
        .expect("status")
        .into_inner();
    assert_eq!((status.used, status.remaining), (210, 1000 - 210));
}

/// Verifications of keys in many sessions (so, in a cluster, many shards and nodes) in flight
/// together: a batch must be split wherever a script call could not span it, and every call
/// must get its own key's answer. Each key is verified 20 times; its answers must be exactly
/// 999 down to 980 remaining.
async fn verifications_across_sessions_in_flight_together_all_answer(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.keys();
    let mut keys = Vec::new();
    for s in 0..8 {
        let id = unique_session(&format!("spread{s}"));
        create_session(&mut c, &id, pb::Plan::Pro, pb::Environment::Live).await;
        for _ in 0..2 {
            keys.push(create_key(&mut c, &id).await);
        }
    }
    let calls = (0..keys.len() * 20).map(|i| {
        let mut c = c.clone();
        let (key, secret) = keys[i % keys.len()].clone();
        async move {
            let answer = common::verify(&mut c, &secret).await;
            (key.key_id, answer)
        }
    });
    let mut remaining: std::collections::HashMap<String, Vec<u32>> = Default::default();
    for (key_id, answer) in join_all(calls).await {
        assert_eq!(decision(&answer), pb::Decision::Valid, "{key_id}");
        let r = answer.rate_limit.expect("rate limit").remaining;
        remaining.entry(key_id).or_default().push(r);
    }
    assert_eq!(remaining.len(), keys.len());
    for (key_id, mut values) in remaining {
        values.sort_unstable();
        assert_eq!(values, (980..=999).collect::<Vec<u32>>(), "{key_id}");
    }
}

mod memory {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn verifications_across_sessions_in_flight_together_all_answer() {
        super::verifications_across_sessions_in_flight_together_all_answer(
            crate::common::Backend::Memory,
        )
        .await;
    }
}

mod redis {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn verifications_across_sessions_in_flight_together_all_answer() {
        super::verifications_across_sessions_in_flight_together_all_answer(
            crate::common::Backend::Redis,
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_corrupt_record_fails_only_its_own_verifications() {
        super::a_corrupt_record_fails_only_its_own_verifications(crate::common::Backend::Redis)
            .await;
    }
}

mod cluster {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn verifications_across_sessions_in_flight_together_all_answer() {
        super::verifications_across_sessions_in_flight_together_all_answer(
            crate::common::Backend::Cluster,
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_corrupt_record_fails_only_its_own_verifications() {
        super::a_corrupt_record_fails_only_its_own_verifications(crate::common::Backend::Cluster)
            .await;
    }
}
