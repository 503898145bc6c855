//! A store write sent twice. redis-rs's cluster client resends a command whose connection
//! dropped before the reply arrived (a node restarting, a failover), so a CreateKey or
//! RotateKey script can run twice for one call. The second run must answer as the first did:
//! a "key id taken" would make the service mint a second key (the first one, whose secret
//! nobody got, would hold a slot of the key limit), and an "already rotated" would lose the new
//! key, whose secret the caller never sees, and with no grace period the old key too. A resent
//! CreateSession must not answer "already exists" to the call that created it, nor a resent
//! UpdateSession "conflict" (the service would apply the patch again), nor a resent RevokeKey
//! "already revoked" (the service would log a second call). Each change's
//! audit entry is written with it, so a replay adds none. Every store answers a replay the
//! same way, so this runs on all three.

mod common;

use common::{Backend, T0, redis_config, unique_prefix};
use rand::RngCore;
use sendable_keys::domain::{
    HASH_VERSION, KeyHash, KeyId, KeyRecord, KeyState, Plan, SessionRecord,
};
use sendable_keys::store::memory::MemoryStore;
use sendable_keys::store::redis::RedisStore;
use sendable_keys::store::{InsertKey, NewKey, ReplaceSession, RevokeKey, RotateKey, Store};

/// Free: 3 keys.
const PLAN_MAX_KEYS: [u32; 4] = [3, 10, 0, 0];

fn new_record(session: &SessionRecord, rng: &mut impl RngCore) -> (KeyRecord, KeyHash) {
    common::key_record(session, "replayed", rng)
}

fn new_key(record: &KeyRecord, hash: KeyHash) -> NewKey<'_> {
    NewKey {
        record,
        hash,
        hash_version: HASH_VERSION,
    }
}

async fn active_keys(store: &impl Store, session: &SessionRecord) -> u32 {
    store
        .get_session(&session.id, T0)
        .await
        .expect("get session")
        .expect("session")
        .active_keys
}

async fn replays_answer_as_the_first_call_did(store: &impl Store) {
    let session = common::session_record("replay", Plan::Free);
    // CreateSession, twice: created both times (its own session, to the millisecond).
    let created = common::audit_entry(&session, "CreateSession", None);
    for attempt in ["first", "resent"] {
        assert!(
            store
                .create_session(&session, common::audit(&created))
                .await
                .expect("session"),
            "{attempt}"
        );
    }
    // Another call creating the very same session is refused, as is another session.
    assert!(
        !store
            .create_session(&session, common::audit_call(&created, 2))
            .await
            .expect("session")
    );
    let other = SessionRecord {
        create_ms: T0 + 1,
        ..session.clone()
    };
    assert!(
        !store
            .create_session(&other, common::audit(&created))
            .await
            .expect("session")
    );

    // UpdateSession, twice: replaced both times, one version later, once on record.
    let updated = SessionRecord {
        custom_rate_limit: Some(100),
        update_ms: T0 + 1,
        version: 2,
        ..session.clone()
    };
    let update = common::audit_entry(&session, "UpdateSession", None);
    for attempt in ["first", "resent"] {
        let replaced = store
            .replace_session(&updated, 1, common::audit(&update))
            .await
            .expect("replace");
        assert!(
            matches!(replaced, ReplaceSession::Replaced),
            "{attempt}: {replaced:?}"
        );
    }
    // Another call making the very same update from the old version is a conflict (the
    // service retries it from the new version, and records it on its own); so is another
    // update.
    let same_elsewhere = store
        .replace_session(&updated, 1, common::audit_call(&update, 2))
        .await
        .expect("replace");
    assert!(
        matches!(same_elsewhere, ReplaceSession::VersionConflict),
        "{same_elsewhere:?}"
    );
    let stale = SessionRecord {
        custom_rate_limit: Some(200),
        ..updated.clone()
    };
    let conflict = store
        .replace_session(&stale, 1, common::audit(&update))
        .await
        .expect("replace");
    assert!(
        matches!(conflict, ReplaceSession::VersionConflict),
        "{conflict:?}"
    );
    let stored = store
        .get_session(&session.id, T0)
        .await
        .expect("get")
        .expect("session");
    assert_eq!((stored.version, stored.custom_rate_limit), (2, Some(100)));
    let mut rng = rand::rng();

    // CreateKey, twice: created both times, one key.
    let (a, a_hash) = new_record(&session, &mut rng);
    let a_created = common::audit_entry(&session, "CreateKey", Some(a.id));
    for attempt in ["first", "resent"] {
        let inserted = store
            .insert_key(
                new_key(&a, a_hash),
                PLAN_MAX_KEYS,
                T0,
                common::audit(&a_created),
            )
            .await
            .expect("insert");
        assert!(
            matches!(inserted, InsertKey::Created { active_keys: 1 }),
            "{attempt}: {inserted:?}"
        );
    }
    assert_eq!(active_keys(store, &session).await, 1);
    // The same id with another hash is another key: still refused.
    let (_, other_hash) = new_record(&session, &mut rng);
    let taken = store
        .insert_key(
            new_key(&a, other_hash),
            PLAN_MAX_KEYS,
            T0,
            common::audit(&a_created),
        )
        .await
        .expect("insert");
    assert!(matches!(taken, InsertKey::KeyIdTaken), "{taken:?}");

    // RotateKey with a grace period, twice: the same old and new key both times.
    let (mut b, b_hash) = new_record(&session, &mut rng);
    b.create_ms = T0 + 1;
    let grace_end = T0 + 3_600_000;
    let a_rotated = common::audit_entry(&session, "RotateKey", Some(a.id));
    let mut answers = Vec::new();
    for _ in 0..2 {
        match store
            .rotate_key(
                &a.id,
                new_key(&b, b_hash),
                Some(grace_end),
                PLAN_MAX_KEYS,
                T0 + 1,
                common::audit(&a_rotated),
            )
            .await
            .expect("rotate")
        {
            RotateKey::Rotated { old, new } => answers.push((*old, *new)),
            other => panic!("a resent rotation must succeed again: {other:?}"),
        }
    }
    assert_eq!(answers[0], answers[1]);
    let (old, new) = &answers[0];
    assert_eq!(old.replaced_by, Some(b.id));
    assert_eq!(old.expire_ms, Some(grace_end));
    assert_eq!(new.id, b.id);
    assert_eq!(
        active_keys(store, &session).await,
        2,
        "one new key, not two"
    );
    // Another rotation of the same key is still refused.
    let (c, c_hash) = new_record(&session, &mut rng);
    let again = store
        .rotate_key(
            &a.id,
            new_key(&c, c_hash),
            None,
            PLAN_MAX_KEYS,
            T0 + 2,
            common::audit(&a_rotated),
        )
        .await
        .expect("rotate");
    assert!(matches!(again, RotateKey::AlreadyRotated), "{again:?}");

    // RotateKey revoking at once, twice: the second run finds the old key revoked by the
    // first and still answers success, with the new key.
    let b_rotated = common::audit_entry(&session, "RotateKey", Some(b.id));
    for attempt in ["first", "resent"] {
        match store
            .rotate_key(
                &b.id,
                new_key(&c, c_hash),
                None,
                PLAN_MAX_KEYS,
                T0 + 3,
                common::audit(&b_rotated),
            )
            .await
            .expect("rotate")
        {
            RotateKey::Rotated { old, new } => {
                assert_eq!(old.state, KeyState::Revoked, "{attempt}");
                assert_eq!(new.id, c.id, "{attempt}");
            }
            other => panic!("{attempt}: {other:?}"),
        }
    }
    assert_eq!(
        active_keys(store, &session).await,
        2,
        "a, in its grace, and c"
    );

    // RevokeKey, twice: revoked by this call both times; another call finds it revoked.
    let c_revoked = common::audit_entry(&session, "RevokeKey", Some(c.id));
    for attempt in ["first", "resent"] {
        let revoked = store
            .revoke_key(
                &c.id,
                &session.id,
                "leaked",
                T0 + 4,
                common::audit(&c_revoked),
            )
            .await
            .expect("revoke");
        assert!(
            matches!(&revoked, RevokeKey::Revoked(k) if k.revoke_ms == Some(T0 + 4)),
            "{attempt}: {revoked:?}"
        );
    }
    let again = store
        .revoke_key(
            &c.id,
            &session.id,
            "again",
            T0 + 5,
            common::audit_call(&c_revoked, 2),
        )
        .await
        .expect("revoke");
    assert!(
        matches!(&again, RevokeKey::AlreadyRevoked(k) if k.revoke_reason == "leaked"),
        "{again:?}"
    );
    assert_eq!(active_keys(store, &session).await, 1, "a, in its grace");
    // Each change is in the audit log once: a resent one wrote nothing, its entry included,
    // and the refused ones none.
    let logged: Vec<(String, Option<KeyId>)> = store
        .list_audit(&session.id, None, 20)
        .await
        .expect("audit")
        .into_iter()
        .map(|e| (e.entry.action, e.entry.key_id))
        .collect();
    assert_eq!(
        logged,
        [
            ("RevokeKey".to_owned(), Some(c.id)),
            ("RotateKey".to_owned(), Some(b.id)),
            ("RotateKey".to_owned(), Some(a.id)),
            ("CreateKey".to_owned(), Some(a.id)),
            ("UpdateSession".to_owned(), None),
            ("CreateSession".to_owned(), None),
        ]
    );
}

async fn a_resent_change_answers_as_the_first(backend: Backend) {
    match backend {
        Backend::Memory => replays_answer_as_the_first_call_did(&MemoryStore::new()).await,
        Backend::Redis | Backend::Cluster => {
            let store =
                RedisStore::new(&redis_config(backend, &unique_prefix())).expect("redis store");
            store.warm_up().await.expect("redis reachable");
            replays_answer_as_the_first_call_did(&store).await;
        }
    }
}

for_all_stores!(a_resent_change_answers_as_the_first);
