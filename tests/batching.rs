//! Verification batching on Redis (`src/store/redis/batch.rs`): concurrent VerifyKey calls
//! share script calls, a batch spanning shards is split where a cluster requires it, and
//! sharing one never lets one call's failure reach another's answer, nor one call's minute
//! another's window or counters.
//! Exactness under concurrency (1000 parallel calls on a 60/min key) is in `key_service.rs`;
//! script calls per call on an otherwise idle Redis are in `redis_costs.rs`.

mod common;

use common::{
    Backend, T0, TestServer, create_key, create_session, decision, unique_prefix, unique_session,
};
use futures_util::future::join_all;
use sendable_keys::domain::{HASH_VERSION, KeyId, Plan, SessionRecord, UtcDate};
use sendable_keys::grpc::pb;
use sendable_keys::store::memory::MemoryStore;
use sendable_keys::store::redis::RedisStore;
use sendable_keys::store::{InsertKey, KeyStore, NewKey, SessionStore, UsageStore, VerifyRequest};
use tonic::Code;

/// Runs `change` on the Redis record of `key_id` (on whichever node holds it), as foreign or
/// corrupting writes would; returns how many records it found.
fn rewrite_key_record(
    server: &TestServer,
    key_id: &str,
    mut change: impl FnMut(&mut ::redis::Connection, &str),
) -> usize {
    let mut found = 0;
    for url in server.redis_urls() {
        let client = ::redis::Client::open(url).expect("url");
        let mut conn = client.get_connection().expect("connect");
        let names: Vec<String> = ::redis::cmd("KEYS")
            .arg(format!("{}:*:k:{key_id}", server.prefix))
            .query(&mut conn)
            .expect("keys");
        for name in names {
            change(&mut conn, &name);
            found += 1;
        }
    }
    found
}

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
    let corrupted = rewrite_key_record(&server, &bad_key.key_id, |conn, name| {
        let _: () = ::redis::cmd("DEL").arg(name).query(conn).expect("del");
        let _: () = ::redis::cmd("SET")
            .arg(name)
            .arg("not a hash")
            .query(conn)
            .expect("set");
    });
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

/// A key record missing a field every record has (its environment), or a session entry that
/// is not ours: the verification fails (INTERNAL) and writes nothing, neither last-used nor
/// the window, whether the key is active (counting) or revoked (last-used only).
async fn a_record_missing_a_field_fails_without_writing(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.keys();
    let id = unique_session("partial");
    create_session(&mut c, &id, pb::Plan::Pro, pb::Environment::Live).await;
    let (active, active_secret) = create_key(&mut c, &id).await;
    let (revoked, revoked_secret) = create_key(&mut c, &id).await;
    c.revoke_key(pb::RevokeKeyRequest {
        key_id: revoked.key_id.clone(),
        reason: String::new(),
    })
    .await
    .expect("revoke");
    for (key, secret) in [(&active, &active_secret), (&revoked, &revoked_secret)] {
        let fields = |server: &TestServer| {
            let mut seen = Vec::new();
            rewrite_key_record(server, &key.key_id, |conn, name| {
                let values: Vec<Option<String>> = ::redis::cmd("HMGET")
                    .arg(name)
                    .arg("lu")
                    .arg("w")
                    .query(conn)
                    .expect("hmget");
                seen = values;
            });
            seen
        };
        let stripped = rewrite_key_record(&server, &key.key_id, |conn, name| {
            let _: () = ::redis::cmd("HDEL")
                .arg(name)
                .arg("e")
                .query(conn)
                .expect("hdel");
        });
        assert_eq!(stripped, 1);
        let err = common::try_verify(&mut c, secret)
            .await
            .expect_err("a record without its environment");
        assert_eq!(err.code(), Code::Internal, "{err:?}");
        assert_eq!(fields(&server), vec![None, None], "nothing written");
    }
}

/// A key record's window field that is not ours (not three numbers, or a figure past 15
/// digits: foreign or corrupted data under our prefix) is counted afresh and overwritten by the
/// next verification, instead of failing that key's calls for ever.
async fn a_corrupt_window_is_counted_afresh(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.keys();
    let id = unique_session("window");
    create_session(&mut c, &id, pb::Plan::Pro, pb::Environment::Live).await;
    for corrupt in [
        "abc",
        "1:2",
        "99999999999999999999:5:5",
        "29544000:99999999999999999999:0",
    ] {
        let (key, secret) = create_key(&mut c, &id).await;
        let written = rewrite_key_record(&server, &key.key_id, |conn, name| {
            let _: () = ::redis::cmd("HSET")
                .arg(name)
                .arg("w")
                .arg(corrupt)
                .query(conn)
                .expect("hset");
        });
        assert_eq!(written, 1, "the key's record was found once");
        let answer = common::verify(&mut c, &secret).await;
        assert_eq!(decision(&answer), pb::Decision::Valid, "{corrupt}");
        assert_eq!(
            answer.rate_limit.expect("rate limit").remaining,
            999,
            "{corrupt}: counted from zero"
        );
        let status = server
            .usage()
            .get_rate_limit_status(pb::GetRateLimitStatusRequest {
                key_id: key.key_id.clone(),
            })
            .await
            .expect("the window reads again")
            .into_inner();
        assert_eq!(status.used, 1, "{corrupt}");
    }
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

/// The script reads the rate-limit window, the minute counters' field and the counters' TTLs
/// once per script call, so the verifications of one flush whose clocks fall in different
/// minutes (a flush across a minute boundary, or replicas whose clocks disagree) must go in
/// separate script calls. Twelve keys are verified once per round, all twelve in flight
/// together (one flush), each at its own time, spread over three minutes; a key's answers
/// depend only on its own calls, so every answer, and afterwards every key's window, minute
/// counters and day counters, must be the in-memory store's.
async fn verifications_of_different_minutes_in_one_flush_answer_for_their_own(backend: Backend) {
    let redis =
        RedisStore::new(&common::redis_config(backend, &unique_prefix())).expect("redis store");
    let memory = MemoryStore::new();
    let session = SessionRecord {
        custom_rate_limit: Some(7),
        ..common::session_record("minutes", Plan::Enterprise)
    };
    let created = common::audit_entry(&session, "CreateSession", None);
    assert!(
        redis
            .create_session(&session, common::audit(&created))
            .await
            .expect("session")
    );
    assert!(
        memory
            .create_session(&session, common::audit(&created))
            .await
            .expect("session")
    );
    let mut rng = rand::rng();
    let mut keys = Vec::new();
    for _ in 0..12 {
        let (record, hash) = common::key_record(&session, "", &mut rng);
        let new = NewKey {
            record: &record,
            hash,
            hash_version: HASH_VERSION,
        };
        let entry = common::audit_entry(&session, "CreateKey", Some(record.id));
        for inserted in [
            redis
                .insert_key(new, [0; 4], T0, common::audit(&entry))
                .await,
            memory
                .insert_key(new, [0; 4], T0, common::audit(&entry))
                .await,
        ] {
            assert!(
                matches!(inserted, Ok(InsertKey::Created { .. })),
                "{inserted:?}"
            );
        }
        keys.push((record.id, hash));
    }

    let mut next = common::xorshift(0x5eed_1234);
    let (mut valid, mut limited) = (0, 0);
    let mut last = T0;
    for round in 0..30_i64 {
        let requests: Vec<VerifyRequest> = keys
            .iter()
            .enumerate()
            .map(|(i, (id, hash))| VerifyRequest {
                key_id: *id,
                hash: *hash,
                hash_version: HASH_VERSION,
                expected_environment: None,
                cost: (next() % 3 + 1) as u32,
                // Rounds 20 s apart; within one, 9 s between keys: three minutes per flush.
                now: T0 + round * 20_000 + i as i64 * 9_000 + (next() % 1_000) as i64,
                plan_rate_limits: [60, 600, 6000, 0],
                usage_retention_days: 90,
            })
            .collect();
        last = last.max(requests.iter().map(|r| r.now).max().unwrap_or(T0));
        let mut expected = Vec::new();
        for request in &requests {
            expected.push(memory.verify(request).await.expect("memory verify"));
        }
        let got = join_all(requests.iter().map(|r| redis.verify(r))).await;
        for (i, (got, expected)) in got.into_iter().zip(expected).enumerate() {
            assert_eq!(
                got.expect("redis verify"),
                expected,
                "round {round}, key {i}"
            );
            match expected.decision {
                sendable_keys::domain::Decision::Valid => valid += 1,
                sendable_keys::domain::Decision::RateLimited => limited += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    assert!(
        valid > 50 && limited > 50,
        "valid {valid}, limited {limited}"
    );

    let ids: Vec<KeyId> = keys.into_iter().map(|(id, _)| id).collect();
    assert_eq!(
        redis
            .recent_activity(&ids, last, 65)
            .await
            .expect("redis activity"),
        memory
            .recent_activity(&ids, last, 65)
            .await
            .expect("memory activity"),
        "windows and minute counters"
    );
    let day = UtcDate::from_millis(T0);
    assert_eq!(
        redis.usage_days(&ids, day, day).await.expect("redis days"),
        memory
            .usage_days(&ids, day, day)
            .await
            .expect("memory days"),
        "day counters"
    );
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
    async fn a_record_missing_a_field_fails_without_writing() {
        super::a_record_missing_a_field_fails_without_writing(crate::common::Backend::Redis).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_corrupt_window_is_counted_afresh() {
        super::a_corrupt_window_is_counted_afresh(crate::common::Backend::Redis).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn verifications_of_different_minutes_in_one_flush_answer_for_their_own() {
        super::verifications_of_different_minutes_in_one_flush_answer_for_their_own(
            crate::common::Backend::Redis,
        )
        .await;
    }

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
    async fn a_record_missing_a_field_fails_without_writing() {
        super::a_record_missing_a_field_fails_without_writing(crate::common::Backend::Cluster)
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_corrupt_window_is_counted_afresh() {
        super::a_corrupt_window_is_counted_afresh(crate::common::Backend::Cluster).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn verifications_of_different_minutes_in_one_flush_answer_for_their_own() {
        super::verifications_of_different_minutes_in_one_flush_answer_for_their_own(
            crate::common::Backend::Cluster,
        )
        .await;
    }

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
