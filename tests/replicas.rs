//! Several replicas of the service on one Redis (standalone and Cluster) behave as one:
//! revocation, session changes and rate limits hold across them at once, with no cache.

mod common;

use common::{
    Backend, TestServer, create_key, create_session, decision, unique_prefix, unique_session,
    verify,
};
use sendable_keys::grpc::pb;
use sendable_keys::service::Settings;
use sendable_keys::service::clock::ManualClock;

async fn two_replicas(backend: Backend) -> (TestServer, TestServer) {
    let prefix = unique_prefix();
    let clock = ManualClock::new(common::T0);
    let a = TestServer::start_shared(backend, &prefix, clock.clone(), Settings::default()).await;
    let b = TestServer::start_shared(backend, &prefix, clock, Settings::default()).await;
    (a, b)
}

async fn a_key_revoked_on_one_replica_is_revoked_on_the_other_at_once(backend: Backend) {
    let (a, b) = two_replicas(backend).await;
    let (mut ca, mut cb) = (a.keys(), b.keys());
    let id = unique_session("replicas");
    create_session(&mut ca, &id, pb::Plan::Pro, pb::Environment::Live).await;
    let (key, secret) = create_key(&mut ca, &id).await;
    assert_eq!(
        decision(&verify(&mut cb, &secret).await),
        pb::Decision::Valid
    );
    ca.revoke_key(pb::RevokeKeyRequest {
        key_id: key.key_id.clone(),
        reason: "leak".into(),
    })
    .await
    .expect("revoke on A");
    assert_eq!(
        decision(&verify(&mut cb, &secret).await),
        pb::Decision::Revoked
    );

    cb.update_session(pb::UpdateSessionRequest {
        session_id: id.clone(),
        enabled: Some(false),
        ..Default::default()
    })
    .await
    .expect("disable on B");
    let (_, other) = create_key(&mut cb, &id).await;
    assert_eq!(
        decision(&verify(&mut ca, &other).await),
        pb::Decision::SessionDisabled
    );
    let on_a = ca
        .get_key(pb::GetKeyRequest { key_id: key.key_id })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(on_a.status, pb::KeyStatus::Revoked as i32);
}

async fn rate_limits_hold_across_replicas(backend: Backend) {
    let (a, b) = two_replicas(backend).await;
    let mut ca = a.keys();
    let id = unique_session("shared-limit");
    create_session(&mut ca, &id, pb::Plan::Free, pb::Environment::Live).await;
    let (_, secret) = create_key(&mut ca, &id).await;
    let mut tasks = Vec::new();
    for i in 0..400 {
        let mut client = if i % 2 == 0 { a.keys() } else { b.keys() };
        let secret = secret.clone();
        tasks.push(tokio::spawn(
            async move { verify(&mut client, &secret).await },
        ));
    }
    let mut valid = 0;
    for task in tasks {
        if decision(&task.await.expect("task")) == pb::Decision::Valid {
            valid += 1;
        }
    }
    assert_eq!(valid, 60);
}

mod redis {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_key_revoked_on_one_replica_is_revoked_on_the_other_at_once() {
        super::a_key_revoked_on_one_replica_is_revoked_on_the_other_at_once(super::Backend::Redis)
            .await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rate_limits_hold_across_replicas() {
        super::rate_limits_hold_across_replicas(super::Backend::Redis).await;
    }
}

mod cluster {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_key_revoked_on_one_replica_is_revoked_on_the_other_at_once() {
        super::a_key_revoked_on_one_replica_is_revoked_on_the_other_at_once(
            super::Backend::Cluster,
        )
        .await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rate_limits_hold_across_replicas() {
        super::rate_limits_hold_across_replicas(super::Backend::Cluster).await;
    }
}
