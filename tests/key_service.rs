//! KeyService behaviour, end to end through gRPC, on the in-memory store, standalone Redis and
//! a 3-master Redis Cluster.

mod common;

use std::collections::HashSet;

use common::{
    Backend, T0, TestServer, bad_fields, create_enterprise_session, create_key, create_session,
    decision, reason, unique_session, verify,
};
use sendable_keys::grpc::pb;
use tonic::Code;

const MINUTE: i64 = 60_000;

fn ts(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms / 1000,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

fn ms_of(t: &Option<prost_types::Timestamp>) -> Option<i64> {
    t.as_ref()
        .map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
}

async fn sessions_are_created_read_and_updated(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.keys();
    let id = unique_session("crud");
    let created = create_session(&mut c, &id, pb::Plan::Free, pb::Environment::Live).await;
    assert_eq!(created.session_id, id);
    assert_eq!(
        (
            created.rate_limit_per_minute,
            created.max_keys,
            created.active_keys
        ),
        (60, 3, 0)
    );
    assert!(created.enabled);
    assert_eq!(ms_of(&created.create_time), Some(T0));

    let again = c
        .create_session(pb::CreateSessionRequest {
            session_id: id.clone(),
            environment: pb::Environment::Live as i32,
            plan: pb::Plan::Pro as i32,
            ..Default::default()
        })
        .await
        .expect_err("duplicate");
    assert_eq!(again.code(), Code::AlreadyExists);
    assert_eq!(reason(&again), "SESSION_ALREADY_EXISTS");

    let missing = c
        .get_session(pb::GetSessionRequest {
            session_id: unique_session("nope"),
        })
        .await
        .expect_err("unknown session");
    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(reason(&missing), "SESSION_NOT_FOUND");

    server.clock.advance(5_000);
    let updated = c
        .update_session(pb::UpdateSessionRequest {
            session_id: id.clone(),
            plan: Some(pb::Plan::Starter as i32),
            enabled: Some(false),
            ..Default::default()
        })
        .await
        .expect("update")
        .into_inner();
    assert_eq!(updated.plan, pb::Plan::Starter as i32);
    assert_eq!(
        (
            updated.rate_limit_per_minute,
            updated.max_keys,
            updated.enabled
        ),
        (300, 10, false)
    );
    assert_eq!(ms_of(&updated.update_time), Some(T0 + 5_000));
    let read = c
        .get_session(pb::GetSessionRequest {
            session_id: id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(read, updated);
}

async fn enterprise_needs_a_custom_rate_limit(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.keys();
    let err = c
        .create_session(pb::CreateSessionRequest {
            session_id: unique_session("ent"),
            environment: pb::Environment::Live as i32,
            plan: pb::Plan::Enterprise as i32,
            ..Default::default()
        })
        .await
        .expect_err("enterprise without custom limit");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(bad_fields(&err), ["custom_rate_limit_per_minute"]);

    let id = unique_session("ent");
    let s = c
        .create_session(pb::CreateSessionRequest {
            session_id: id.clone(),
            environment: pb::Environment::Live as i32,
            plan: pb::Plan::Enterprise as i32,
            custom_rate_limit_per_minute: Some(5000),
            custom_max_keys: Some(25),
        })
        .await
        .expect("enterprise with custom limits")
        .into_inner();
    assert_eq!((s.rate_limit_per_minute, s.max_keys), (5000, 25));
    assert_eq!(
        (s.custom_rate_limit_per_minute, s.custom_max_keys),
        (Some(5000), Some(25))
    );

    // Removing the custom limit of an Enterprise session would leave it without one.
    let err = c
        .update_session(pb::UpdateSessionRequest {
            session_id: id.clone(),
            custom_rate_limit_per_minute: Some(0),
            ..Default::default()
        })
        .await
        .expect_err("clearing the only limit");
    assert_eq!(bad_fields(&err), ["custom_rate_limit_per_minute"]);

    // Moving to Pro drops the Enterprise deal: Pro's limits apply.
    let pro = c
        .update_session(pb::UpdateSessionRequest {
            session_id: id,
            plan: Some(pb::Plan::Pro as i32),
            ..Default::default()
        })
        .await
        .expect("to pro")
        .into_inner();
    assert_eq!(
        (
            pro.rate_limit_per_minute,
            pro.max_keys,
            pro.custom_rate_limit_per_minute
        ),
        (1000, 0, None)
    );
}

async fn free_plan_allows_three_active_keys(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.keys();
    let id = unique_session("free");
    create_session(&mut c, &id, pb::Plan::Free, pb::Environment::Live).await;
    let mut keys = Vec::new();
    for _ in 0..3 {
        keys.push(create_key(&mut c, &id).await.0);
    }
    let err = c
        .create_key(pb::CreateKeyRequest {
            session_id: id.clone(),
            name: "fourth".into(),
            expire_time: None,
        })
        .await
        .expect_err("fourth key on Free");
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(reason(&err), "KEY_LIMIT_REACHED");
    // The message says what to do.
    assert!(
        err.message()
            .contains("revoke a key or move the session to a larger plan"),
        "{}",
        err.message()
    );
    assert_eq!(
        c.get_session(pb::GetSessionRequest {
            session_id: id.clone()
        })
        .await
        .expect("get")
        .into_inner()
        .active_keys,
        3
    );

    // A revoked key stops counting.
    c.revoke_key(pb::RevokeKeyRequest {
        key_id: keys[0].key_id.clone(),
        reason: "compromised".into(),
    })
    .await
    .expect("revoke");
    let (short_lived, _) = {
        let r = c
            .create_key(pb::CreateKeyRequest {
                session_id: id.clone(),
                name: "short".into(),
                expire_time: Some(ts(T0 + MINUTE)),
            })
            .await
            .expect("room after revoke")
            .into_inner();
        (r.key.expect("key"), r.secret)
    };
    assert!(
        c.create_key(pb::CreateKeyRequest {
            session_id: id.clone(),
            name: "x".into(),
            expire_time: None
        })
        .await
        .is_err()
    );
    // An expired key stops counting too.
    server.clock.advance(MINUTE);
    let key = c
        .get_key(pb::GetKeyRequest {
            key_id: short_lived.key_id,
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(key.status, pb::KeyStatus::Expired as i32);
    create_key(&mut c, &id).await;
    let err = c
        .create_key(pb::CreateKeyRequest {
            session_id: id.clone(),
            name: "x".into(),
            expire_time: None,
        })
        .await
        .expect_err("full again");
    assert_eq!(err.code(), Code::ResourceExhausted);
}

async fn fifty_parallel_creates_on_free_make_exactly_three_keys(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.keys();
    let id = unique_session("race");
    create_session(&mut c, &id, pb::Plan::Free, pb::Environment::Live).await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let mut client = server.keys();
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            client
                .create_key(pb::CreateKeyRequest {
                    session_id: id,
                    name: format!("k{i}"),
                    expire_time: None,
                })
                .await
        }));
    }
    let mut created = 0;
    let mut refused = 0;
    for task in tasks {
        match task.await.expect("task") {
            Ok(_) => created += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                refused += 1;
            }
        }
    }
    assert_eq!((created, refused), (3, 47));
    let listed = c
        .list_keys(pb::ListKeysRequest {
            session_id: id,
            page_size: 100,
            page_token: String::new(),
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.keys.len(), 3);
}

async fn keys_list_in_creation_order_across_pages(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.keys();
    let id = unique_session("pages");
    create_session(&mut c, &id, pb::Plan::Pro, pb::Environment::Dev).await;
    let mut created = Vec::new();
    for i in 0..7 {
        // Two keys share each millisecond, so the order must also be stable within one.
        if i % 2 == 0 {
            server.clock.advance(1);
        }
        created.push(create_key(&mut c, &id).await.0.key_id);
    }
    let mut expected = created.clone();
    // Within one millisecond keys are ordered by key id.
    expected.chunks_mut(2).for_each(|pair| pair.sort());
    // Revoked keys stay listed.
    c.revoke_key(pb::RevokeKeyRequest {
        key_id: created[3].clone(),
        reason: String::new(),
    })
    .await
    .expect("revoke");

    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = c
            .list_keys(pb::ListKeysRequest {
                session_id: id.clone(),
                page_size: 3,
                page_token: token.clone(),
            })
            .await
            .expect("page")
            .into_inner();
        pages += 1;
        assert!(page.keys.len() <= 3);
        for key in &page.keys {
            assert_eq!(key.display_prefix, format!("sk_dev_{}", key.key_id));
            assert_eq!(key.session_id, id);
        }
        seen.extend(page.keys.into_iter().map(|k| k.key_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, expected);

    // A page of exactly the remaining size ends the listing with an empty token.
    let all = c
        .list_keys(pb::ListKeysRequest {
            session_id: id.clone(),
            page_size: 7,
            page_token: String::new(),
        })
        .await
        .expect("one page")
        .into_inner();
    assert_eq!((all.keys.len(), all.next_page_token.as_str()), (7, ""));

    let unknown = c
        .list_keys(pb::ListKeysRequest {
            session_id: unique_session("none"),
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .expect_err("unknown session");
    assert_eq!(unknown.code(), Code::NotFound);
}

async fn every_decision_is_reported(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.keys();
    let id = unique_session("decide");
    create_session(&mut c, &id, pb::Plan::Starter, pb::Environment::Staging).await;
    let (key, secret) = create_key(&mut c, &id).await;

    let valid = verify(&mut c, &secret).await;
    assert_eq!(decision(&valid), pb::Decision::Valid);
    assert!(valid.valid);
    assert_eq!(
        (valid.key_id.as_str(), valid.session_id.as_str()),
        (key.key_id.as_str(), id.as_str())
    );
    assert_eq!(valid.environment, pb::Environment::Staging as i32);
    assert_eq!(valid.plan, pb::Plan::Starter as i32);
    let rl = valid.rate_limit.expect("rate limit state");
    assert_eq!((rl.limit, rl.remaining), (300, 299));
    assert_eq!(rl.reset_after.map(|d| d.seconds), Some(60));
    assert_eq!(rl.retry_after, None);

    // Surrounding whitespace is a paste error, not a different key.
    assert_eq!(
        decision(&verify(&mut c, &format!("  {secret}\n")).await),
        pb::Decision::Valid
    );

    // MALFORMED: a typo breaks the checksum; decided locally, no key id leaks back.
    let mut typo = secret.clone().into_bytes();
    let last = typo.len() - 10;
    typo[last] = if typo[last] == b'a' { b'b' } else { b'a' };
    let malformed = verify(&mut c, &String::from_utf8(typo).expect("ascii")).await;
    assert_eq!(decision(&malformed), pb::Decision::Malformed);
    assert!(!malformed.valid && malformed.key_id.is_empty() && malformed.rate_limit.is_none());

    // NOT_FOUND: a well-formed key with a real key id but another secret.
    let forged = forge_same_id(&secret);
    let not_found = verify(&mut c, &forged).await;
    assert_eq!(decision(&not_found), pb::Decision::NotFound);
    assert!(
        not_found.session_id.is_empty(),
        "nothing about the real key leaks"
    );

    // ENVIRONMENT_MISMATCH when the caller expects live.
    let mismatch = c
        .verify_key(pb::VerifyKeyRequest {
            key: secret.clone(),
            expected_environment: pb::Environment::Live as i32,
            cost: 0,
        })
        .await
        .expect("verify")
        .into_inner();
    assert_eq!(decision(&mismatch), pb::Decision::EnvironmentMismatch);
    assert_eq!(mismatch.environment, pb::Environment::Staging as i32);

    // SESSION_DISABLED, then VALID again once re-enabled.
    c.update_session(pb::UpdateSessionRequest {
        session_id: id.clone(),
        enabled: Some(false),
        ..Default::default()
    })
    .await
    .expect("disable");
    assert_eq!(
        decision(&verify(&mut c, &secret).await),
        pb::Decision::SessionDisabled
    );
    c.update_session(pb::UpdateSessionRequest {
        session_id: id.clone(),
        enabled: Some(true),
        ..Default::default()
    })
    .await
    .expect("enable");
    assert_eq!(
        decision(&verify(&mut c, &secret).await),
        pb::Decision::Valid
    );

    // EXPIRED.
    let expiring = c
        .create_key(pb::CreateKeyRequest {
            session_id: id.clone(),
            name: "exp".into(),
            expire_time: Some(ts(T0 + 10_000)),
        })
        .await
        .expect("create")
        .into_inner();
    assert_eq!(
        decision(&verify(&mut c, &expiring.secret).await),
        pb::Decision::Valid
    );
    server.clock.advance(10_000);
    assert_eq!(
        decision(&verify(&mut c, &expiring.secret).await),
        pb::Decision::Expired
    );

    // REVOKED.
    c.revoke_key(pb::RevokeKeyRequest {
        key_id: key.key_id.clone(),
        reason: "leaked".into(),
    })
    .await
    .expect("revoke");
    let revoked = verify(&mut c, &secret).await;
    assert_eq!(decision(&revoked), pb::Decision::Revoked);
    assert!(revoked.rate_limit.is_none());

    // RATE_LIMITED (with a cost that exhausts the window in one call).
    let (_, fresh) = create_key(&mut c, &id).await;
    let big = c
        .verify_key(pb::VerifyKeyRequest {
            key: fresh.clone(),
            expected_environment: 0,
            cost: 300,
        })
        .await
        .expect("verify")
        .into_inner();
    assert_eq!(decision(&big), pb::Decision::Valid);
    assert_eq!(big.rate_limit.map(|r| r.remaining), Some(0));
    let limited = verify(&mut c, &fresh).await;
    assert_eq!(decision(&limited), pb::Decision::RateLimited);
    let rl = limited.rate_limit.expect("state");
    assert_eq!((rl.limit, rl.remaining), (300, 0));
    assert!(rl.retry_after.is_some_and(|d| d.seconds > 0));
}

/// The same key id and environment with a different secret and a correct checksum.
fn forge_same_id(real: &str) -> String {
    use sendable_keys::domain::IssuedKey;
    use sendable_keys::domain::key::parse;
    let parsed = parse(real).expect("real key parses");
    let forged = IssuedKey::generate(parsed.environment, parsed.key_id, &mut rand::rng());
    assert!(parse(forged.expose()).is_ok());
    forged.into_exposed()
}

async fn revocation_is_immediate_and_final(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.keys();
    let id = unique_session("revoke");
    create_session(&mut c, &id, pb::Plan::Pro, pb::Environment::Live).await;
    let (key, secret) = create_key(&mut c, &id).await;
    assert_eq!(
        decision(&verify(&mut c, &secret).await),
        pb::Decision::Valid
    );
    server.clock.advance(1_234);
    let revoked = c
        .revoke_key(pb::RevokeKeyRequest {
            key_id: key.key_id.clone(),
            reason: "leaked in a gist".into(),
        })
        .await
        .expect("revoke")
        .into_inner();
    assert_eq!(revoked.status, pb::KeyStatus::Revoked as i32);
    assert_eq!(revoked.revoke_reason, "leaked in a gist");
    assert_eq!(ms_of(&revoked.revoke_time), Some(T0 + 1_234));
    assert_eq!(
        decision(&verify(&mut c, &secret).await),
        pb::Decision::Revoked
    );
    // Idempotent: the first reason and time stay.
    server.clock.advance(1_000);
    let again = c
        .revoke_key(pb::RevokeKeyRequest {
            key_id: key.key_id.clone(),
            reason: "second".into(),
        })
        .await
        .expect("revoke again")
        .into_inner();
    assert_eq!(
        (again.revoke_reason.as_str(), ms_of(&again.revoke_time)),
        ("leaked in a gist", Some(T0 + 1_234))
    );
    // Last used records the attempt with the revoked key (useful after a leak).
    let read = c
        .get_key(pb::GetKeyRequest {
            key_id: key.key_id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(ms_of(&read.last_used_time), Some(T0 + 1_234));
    // Rotating a revoked key is refused.
    let err = c
        .rotate_key(pb::RotateKeyRequest {
            key_id: key.key_id,
            grace_period: None,
        })
        .await
        .expect_err("rotate revoked");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(reason(&err), "KEY_NOT_ACTIVE");
    let unknown = c
        .revoke_key(pb::RevokeKeyRequest {
            key_id: "ZZZZ0000".into(),
            reason: String::new(),
        })
        .await
        .expect_err("unknown key");
    assert_eq!(unknown.code(), Code::NotFound);
    assert_eq!(reason(&unknown), "KEY_NOT_FOUND");
}

async fn rotation_with_grace_keeps_both_keys_working(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.keys();
    let id = unique_session("rotate");
    create_session(&mut c, &id, pb::Plan::Free, pb::Environment::Live).await;
    // A Free session at its limit can still rotate: a rotation may go one key over.
    let (old, old_secret) = create_key(&mut c, &id).await;
    create_key(&mut c, &id).await;
    create_key(&mut c, &id).await;
    let rotated = c
        .rotate_key(pb::RotateKeyRequest {
            key_id: old.key_id.clone(),
            grace_period: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
        })
        .await
        .expect("rotate")
        .into_inner();
    let new = rotated.new_key.expect("new key");
    let old_after = rotated.old_key.expect("old key");
    assert_ne!(new.key_id, old.key_id);
    assert_eq!(
        (new.name.as_str(), new.session_id.as_str()),
        (old.name.as_str(), id.as_str())
    );
    assert_eq!(old_after.replaced_by_key_id, new.key_id);
    assert_eq!(old_after.status, pb::KeyStatus::Active as i32);
    assert_eq!(ms_of(&old_after.expire_time), Some(T0 + 3_600_000));
    assert_eq!(
        decision(&verify(&mut c, &old_secret).await),
        pb::Decision::Valid
    );
    assert_eq!(
        decision(&verify(&mut c, &rotated.secret).await),
        pb::Decision::Valid
    );
    let session = c
        .get_session(pb::GetSessionRequest {
            session_id: id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(
        session.active_keys, 4,
        "the old key counts while it works, one over the limit"
    );

    // Rotating the old key again is refused: rotate the replacement instead.
    let err = c
        .rotate_key(pb::RotateKeyRequest {
            key_id: old.key_id.clone(),
            grace_period: None,
        })
        .await
        .expect_err("second rotation");
    assert_eq!(reason(&err), "KEY_ALREADY_ROTATED");

    server.clock.advance(3_600_000);
    assert_eq!(
        decision(&verify(&mut c, &old_secret).await),
        pb::Decision::Expired
    );
    assert_eq!(
        decision(&verify(&mut c, &rotated.secret).await),
        pb::Decision::Valid
    );
    let session = c
        .get_session(pb::GetSessionRequest {
            session_id: id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(
        session.active_keys, 3,
        "the old key stopped counting as it expired"
    );
}

/// Rotating the replacement again and again, each time with a grace period, must not give a
/// session more working keys than its limit plus the one a rotation in progress may add:
/// otherwise a Free session (3 keys, 60/min each) could run any number of keys at once.
async fn chained_rotations_stop_one_key_over_the_limit(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.keys();
    let id = unique_session("chain");
    create_session(&mut c, &id, pb::Plan::Free, pb::Environment::Live).await;
    let mut secrets = Vec::new();
    let mut newest = String::new();
    for _ in 0..3 {
        let (key, secret) = create_key(&mut c, &id).await;
        newest = key.key_id;
        secrets.push(secret);
    }
    let rotate = |key_id: String, grace_s: i64| pb::RotateKeyRequest {
        key_id,
        grace_period: Some(prost_types::Duration {
            seconds: grace_s,
            nanos: 0,
        }),
    };
    let first = c
        .rotate_key(rotate(newest.clone(), 86_400))
        .await
        .expect("a session at its limit can rotate")
        .into_inner();
    secrets.push(first.secret.clone());
    let replacement = first.new_key.expect("new").key_id;
    // A second rotation with a grace period would make five working keys: refused, and
    // nothing is written.
    let err = c
        .rotate_key(rotate(replacement.clone(), 86_400))
        .await
        .expect_err("two over the limit");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(reason(&err), "KEY_LIMIT_REACHED");
    assert!(err.message().contains("grace period"), "{}", err.message());
    let listed = c
        .list_keys(pb::ListKeysRequest {
            session_id: id.clone(),
            page_size: 100,
            page_token: String::new(),
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.keys.len(), 4, "the refused rotation created no key");
    let err = c
        .create_key(pb::CreateKeyRequest {
            session_id: id.clone(),
            name: "extra".into(),
            expire_time: None,
        })
        .await
        .expect_err("no new key while over the limit");
    assert_eq!(reason(&err), "KEY_LIMIT_REACHED");
    let mut working = 0;
    for secret in &secrets {
        working += usize::from(decision(&verify(&mut c, secret).await) == pb::Decision::Valid);
    }
    assert_eq!(working, 4, "the limit plus the key in its grace period");

    // Rotating with no grace period swaps two keys and is always allowed.
    let swapped = c
        .rotate_key(pb::RotateKeyRequest {
            key_id: replacement,
            grace_period: None,
        })
        .await
        .expect("rotation that revokes at once")
        .into_inner();
    assert_eq!(
        swapped.old_key.expect("old").status,
        pb::KeyStatus::Revoked as i32
    );
    // Once the first rotation's grace ends, the session is back at its limit and can rotate
    // with a grace period again.
    server.clock.advance(86_400_000);
    assert_eq!(
        decision(&verify(&mut c, &secrets[2]).await),
        pb::Decision::Expired
    );
    c.rotate_key(rotate(swapped.new_key.expect("new").key_id, 3600))
        .await
        .expect("rotation after the grace period ended");
}

async fn rotation_without_grace_revokes_at_once(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.keys();
    let id = unique_session("rotate0");
    create_session(&mut c, &id, pb::Plan::Starter, pb::Environment::Dev).await;
    let expiring = c
        .create_key(pb::CreateKeyRequest {
            session_id: id.clone(),
            name: "ci".into(),
            expire_time: Some(ts(T0 + 30 * 86_400_000)),
        })
        .await
        .expect("create")
        .into_inner();
    let old = expiring.key.expect("key");
    server.clock.advance(86_400_000);
    let rotated = c
        .rotate_key(pb::RotateKeyRequest {
            key_id: old.key_id.clone(),
            grace_period: None,
        })
        .await
        .expect("rotate")
        .into_inner();
    let old_after = rotated.old_key.expect("old");
    assert_eq!(old_after.status, pb::KeyStatus::Revoked as i32);
    assert_eq!(old_after.revoke_reason, "rotated");
    assert_eq!(
        decision(&verify(&mut c, &expiring.secret).await),
        pb::Decision::Revoked
    );
    assert_eq!(
        decision(&verify(&mut c, &rotated.secret).await),
        pb::Decision::Valid
    );
    // The replacement keeps the old key's 30-day lifetime, counted from the rotation.
    let new = rotated.new_key.expect("new");
    assert_eq!(
        ms_of(&new.expire_time),
        Some(T0 + 86_400_000 + 30 * 86_400_000)
    );
    assert!(rotated.secret.starts_with("sk_dev_"));
}

async fn a_thousand_concurrent_verifies_admit_exactly_sixty(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.keys();
    let id = unique_session("exact");
    create_session(&mut c, &id, pb::Plan::Free, pb::Environment::Live).await;
    let (_, secret) = create_key(&mut c, &id).await;
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let mut client = server.keys();
        let secret = secret.clone();
        tasks.push(tokio::spawn(
            async move { verify(&mut client, &secret).await },
        ));
    }
    let mut valid = 0;
    let mut limited = 0;
    let mut remaining_seen = HashSet::new();
    for task in tasks {
        let response = task.await.expect("task");
        match decision(&response) {
            pb::Decision::Valid => {
                valid += 1;
                remaining_seen.insert(response.rate_limit.expect("state").remaining);
            }
            pb::Decision::RateLimited => limited += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((valid, limited), (60, 940));
    // Each admitted call saw a distinct remaining count: 59, 58, ..., 0.
    assert_eq!(remaining_seen, (0..60).collect::<HashSet<u32>>());
}

async fn the_window_slides_with_the_clock(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.keys();
    let id = unique_session("slide");
    create_session(&mut c, &id, pb::Plan::Free, pb::Environment::Live).await;
    let (_, secret) = create_key(&mut c, &id).await;
    for _ in 0..60 {
        assert_eq!(
            decision(&verify(&mut c, &secret).await),
            pb::Decision::Valid
        );
    }
    let limited = verify(&mut c, &secret).await;
    assert_eq!(decision(&limited), pb::Decision::RateLimited);
    // 60 used at the very start of the window: one more fits 1 s into the next window.
    let retry = limited
        .rate_limit
        .and_then(|r| r.retry_after)
        .expect("retry after");
    assert_eq!((retry.seconds, retry.nanos), (61, 0));
    // 15 s into the next window the previous minute still weighs 45/60: 15 more fit.
    server.clock.set(T0 + MINUTE + 15_000);
    let mut admitted = 0;
    for _ in 0..30 {
        if decision(&verify(&mut c, &secret).await) == pb::Decision::Valid {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 15);
    // Two idle minutes later the key has its whole limit back.
    server.clock.set(T0 + 3 * MINUTE);
    let fresh = verify(&mut c, &secret).await;
    assert_eq!(fresh.rate_limit.map(|r| r.remaining), Some(59));
}

/// Replays random traffic and compares the limiter with an exact sliding log of admitted
/// requests. Documented bounds (domain::ratelimit): no fixed window admits more than the limit,
/// and a trailing 60 s window admits at most limit + previous * elapsed / 60 s.
async fn sliding_window_error_against_an_exact_log_is_bounded(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.keys();
    let id = unique_session("log");
    create_session(&mut c, &id, pb::Plan::Free, pb::Environment::Live).await;
    let (_, secret) = create_key(&mut c, &id).await;
    let limit = 60i64;
    let mut admitted: Vec<i64> = Vec::new();
    let mut now = T0;
    let mut worst_excess = 0i64;
    // Bursty traffic over 5 minutes: gaps of 0-3 s, about 2.5x the limit.
    let mut next = common::xorshift(0x5eed);
    while now < T0 + 5 * MINUTE {
        now += (next() % 800) as i64;
        server.clock.set(now);
        let response = verify(&mut c, &secret).await;
        if decision(&response) != pb::Decision::Valid {
            continue;
        }
        admitted.push(now);
        let window_start = now - now.rem_euclid(MINUTE);
        let in_fixed = admitted.iter().filter(|t| **t >= window_start).count() as i64;
        assert!(in_fixed <= limit, "fixed window over its limit: {in_fixed}");
        let previous = admitted
            .iter()
            .filter(|t| **t >= window_start - MINUTE && **t < window_start)
            .count() as i64;
        let trailing = admitted.iter().filter(|t| **t > now - MINUTE).count() as i64;
        let elapsed = now - window_start;
        let bound = limit + (previous * elapsed).div_euclid(MINUTE) + 1;
        assert!(
            trailing <= bound,
            "trailing {trailing} > bound {bound} at +{} ms",
            now - T0
        );
        worst_excess = worst_excess.max(trailing - limit);
    }
    assert!(
        admitted.len() > 200,
        "traffic exercised the limiter: {}",
        admitted.len()
    );
    // With this traffic the approximation stays close to exact.
    assert!(worst_excess <= limit / 4, "worst excess {worst_excess}");
}

async fn plan_changes_apply_to_the_next_request(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.keys();
    let id = unique_session("upgrade");
    create_session(&mut c, &id, pb::Plan::Free, pb::Environment::Live).await;
    let (_, secret) = create_key(&mut c, &id).await;
    for _ in 0..60 {
        verify(&mut c, &secret).await;
    }
    assert_eq!(
        decision(&verify(&mut c, &secret).await),
        pb::Decision::RateLimited
    );
    c.update_session(pb::UpdateSessionRequest {
        session_id: id.clone(),
        plan: Some(pb::Plan::Pro as i32),
        ..Default::default()
    })
    .await
    .expect("upgrade");
    let after = verify(&mut c, &secret).await;
    assert_eq!(decision(&after), pb::Decision::Valid);
    assert_eq!(after.plan, pb::Plan::Pro as i32);
    assert_eq!(
        after.rate_limit.map(|r| (r.limit, r.remaining)),
        Some((1000, 939))
    );
    // A custom limit applies at once too.
    c.update_session(pb::UpdateSessionRequest {
        session_id: id,
        custom_rate_limit_per_minute: Some(61),
        ..Default::default()
    })
    .await
    .expect("custom");
    let custom = verify(&mut c, &secret).await;
    assert_eq!(decision(&custom), pb::Decision::RateLimited);
    assert_eq!(custom.rate_limit.map(|r| r.limit), Some(61));
}

async fn management_changes_are_audited(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.keys();
    let id = unique_session("audit");
    create_session(&mut c, &id, pb::Plan::Free, pb::Environment::Live).await;
    let (key, secret) = create_key(&mut c, &id).await;
    c.rotate_key(pb::RotateKeyRequest {
        key_id: key.key_id.clone(),
        grace_period: Some(prost_types::Duration {
            seconds: 60,
            nanos: 0,
        }),
    })
    .await
    .expect("rotate");
    c.revoke_key(pb::RevokeKeyRequest {
        key_id: key.key_id.clone(),
        reason: "done".into(),
    })
    .await
    .expect("revoke");
    c.update_session(pb::UpdateSessionRequest {
        session_id: id.clone(),
        enabled: Some(false),
        ..Default::default()
    })
    .await
    .expect("disable");
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_audit_events(pb::ListAuditEventsRequest {
                session_id: id.clone(),
                page_size: 2,
                page_token: token,
            })
            .await
            .expect("audit")
            .into_inner();
        all.extend(page.events);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let actions: Vec<&str> = all.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "UpdateSession",
            "RevokeKey",
            "RotateKey",
            "CreateKey",
            "CreateSession"
        ]
    );
    assert!(
        all.iter()
            .all(|e| e.result == "OK" && e.caller == "anonymous-loopback" && e.session_id == id)
    );
    assert_eq!(all[1].key_id, key.key_id);
    let text = format!("{all:?}");
    assert!(
        !text.contains(&secret[secret.len() - 30..]),
        "no secret in the audit log"
    );
}

/// Management calls naming a session that does not exist answer NOT_FOUND and write nothing,
/// not even an audit entry: nobody could read it (ListAuditEvents needs the session), and each
/// unknown id would start a log of its own.
async fn calls_on_an_unknown_session_write_nothing(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.keys();
    let ghost = unique_session("ghost");
    let created = c
        .create_key(pb::CreateKeyRequest {
            session_id: ghost.clone(),
            name: "k".into(),
            expire_time: None,
        })
        .await
        .expect_err("no such session");
    assert_eq!(reason(&created), "SESSION_NOT_FOUND");
    let updated = c
        .update_session(pb::UpdateSessionRequest {
            session_id: ghost.clone(),
            enabled: Some(false),
            ..Default::default()
        })
        .await
        .expect_err("no such session");
    assert_eq!(reason(&updated), "SESSION_NOT_FOUND");
    let audit = c
        .list_audit_events(pb::ListAuditEventsRequest {
            session_id: ghost.clone(),
            page_size: 10,
            page_token: String::new(),
        })
        .await
        .expect_err("no such session");
    assert_eq!(audit.code(), Code::NotFound);
    assert_eq!(server.redis_key_count(), 0, "nothing written to Redis");
    // Had anything been logged under that id, a session created with it now would show it.
    create_session(&mut c, &ghost, pb::Plan::Free, pb::Environment::Live).await;
    let events = common::audit_events(&mut c, &ghost).await;
    let actions: Vec<&str> = events.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions, ["CreateSession"]);
}

/// The in-memory store decides and counts in Rust; Redis decides in its script, and the service
/// derives the remaining count, reset and retry-after from the window the script read. Random
/// traffic must get the very same answers from all three stores, figure for figure: two keys
/// (a plan's default limit of 60, a custom limit of 7), costs 1-5 and now and then above the
/// limit, the clock mostly stepping forward, sometimes by windows, and sometimes back across a
/// window boundary (replicas' clocks differ), so the stored window is ahead of `now`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_store_gives_the_same_rate_limit_answers() {
    let mut servers = Vec::new();
    for backend in [Backend::Memory, Backend::Redis, Backend::Cluster] {
        let server = TestServer::start(backend).await;
        let mut c = server.keys();
        let free = unique_session("same-free");
        create_session(&mut c, &free, pb::Plan::Free, pb::Environment::Live).await;
        let custom = unique_session("same-custom");
        create_enterprise_session(&mut c, &custom, 7).await;
        let secrets = [
            create_key(&mut c, &free).await.1,
            create_key(&mut c, &custom).await.1,
        ];
        servers.push((server, c, secrets));
    }
    let mut next = common::xorshift(0x0dd5_eed5);
    let (mut now, mut latest) = (T0, T0);
    let (mut valid, mut limited, mut behind, mut too_costly) = (0, 0, 0, 0);
    for step in 0..600 {
        now += match next() % 20 {
            0 => -((next() % 90_000) as i64),
            1 => (next() % 150_000) as i64,
            _ => (next() % 3_000) as i64,
        };
        let key = (next() % 2) as usize;
        let limit = [60, 7][key];
        let cost = match next() % 25 {
            0 => limit + 1 + (next() % 5) as u32,
            _ => (next() % 5 + 1) as u32,
        };
        behind += usize::from(now.div_euclid(MINUTE) < latest.div_euclid(MINUTE));
        too_costly += usize::from(cost > limit);
        latest = latest.max(now);
        let mut answers = Vec::new();
        for (server, c, secrets) in &mut servers {
            server.clock.set(now);
            let response = c
                .verify_key(pb::VerifyKeyRequest {
                    key: secrets[key].clone(),
                    expected_environment: 0,
                    cost,
                })
                .await
                .expect("verify")
                .into_inner();
            answers.push((decision(&response), response.rate_limit));
        }
        assert_eq!(answers[0], answers[1], "memory vs redis at step {step}");
        assert_eq!(answers[0], answers[2], "memory vs cluster at step {step}");
        match answers[0].0 {
            pb::Decision::Valid => valid += 1,
            pb::Decision::RateLimited => limited += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    // The traffic exercised both sides of the limit, a clock behind a stored window, and costs
    // no window can ever admit.
    assert!(
        valid > 50 && limited > 50,
        "valid {valid}, limited {limited}"
    );
    assert!(behind >= 5, "clock behind a window only {behind} times");
    assert!(
        too_costly >= 5,
        "cost above the limit only {too_costly} times"
    );
}

/// Two revocations of one key at the same moment, with the same reason: one revokes it, the
/// other finds it revoked, and the log says exactly that, once each.
async fn concurrent_revocations_are_each_on_record(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.keys();
    let id = unique_session("revoke-race");
    create_session(&mut c, &id, pb::Plan::Pro, pb::Environment::Live).await;
    let (key, _) = create_key(&mut c, &id).await;
    let revoke = || {
        let mut c = c.clone();
        let key_id = key.key_id.clone();
        async move {
            c.revoke_key(pb::RevokeKeyRequest {
                key_id,
                reason: "leaked".to_owned(),
            })
            .await
            .expect("revoke")
            .into_inner()
        }
    };
    let (a, b) = tokio::join!(revoke(), revoke());
    assert_eq!(a, b, "both answer the key as revoked once");
    let events = common::audit_events(&mut c, &id).await;
    let mut revocations: Vec<&str> = events
        .iter()
        .filter(|e| e.action == "RevokeKey")
        .map(|e| e.detail.as_str())
        .collect();
    revocations.sort_unstable();
    assert_eq!(
        revocations,
        [
            "already revoked; reason=\"leaked\" ignored",
            "reason=\"leaked\""
        ]
    );
}

for_all_stores!(
    concurrent_revocations_are_each_on_record,
    sessions_are_created_read_and_updated,
    enterprise_needs_a_custom_rate_limit,
    free_plan_allows_three_active_keys,
    fifty_parallel_creates_on_free_make_exactly_three_keys,
    keys_list_in_creation_order_across_pages,
    every_decision_is_reported,
    revocation_is_immediate_and_final,
    rotation_with_grace_keeps_both_keys_working,
    rotation_without_grace_revokes_at_once,
    chained_rotations_stop_one_key_over_the_limit,
    a_thousand_concurrent_verifies_admit_exactly_sixty,
    the_window_slides_with_the_clock,
    sliding_window_error_against_an_exact_log_is_bounded,
    plan_changes_apply_to_the_next_request,
    management_changes_are_audited,
    calls_on_an_unknown_session_write_nothing,
);
