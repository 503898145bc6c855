//! Bad input gets a clear error: INVALID_ARGUMENT with a BadRequest naming each field, or the
//! MALFORMED decision for VerifyKey; a body that is not the method's message is an
//! INVALID_ARGUMENT too (not tonic's INTERNAL); oversized messages are refused with the
//! service's ErrorInfo; and nothing is written to the store by a refused request. Runs on
//! every store.

mod common;

use common::{
    Backend, TestServer, bad_fields, create_key, create_session, decision, reason, unique_session,
    verify,
};
use sendable_keys::grpc::pb;
use tonic::Code;

async fn garbage_keys_are_malformed_without_a_store_lookup(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.keys();
    let id = unique_session("garbage");
    create_session(&mut c, &id, pb::Plan::Free, pb::Environment::Live).await;
    let (_, secret) = create_key(&mut c, &id).await;
    // The right key with paste whitespace around it is fine (and creates today's counters).
    assert_eq!(
        decision(&verify(&mut c, &format!("\u{a0} {secret} \r\n")).await),
        pb::Decision::Valid
    );
    let before = server.redis_key_count();

    let mut wrong_checksum = secret.clone();
    let last = wrong_checksum.pop().expect("non-empty");
    wrong_checksum.push(if last == '0' { '1' } else { '0' });
    let cases = [
        String::new(),
        "   \t\n".to_owned(),
        "x".repeat(100_000),
        format!("{}é", &secret[..secret.len() - 1]),
        "sk_live_日本語のキー".to_owned(),
        wrong_checksum,
        secret.replacen("sk_live_", "pk_live_", 1),
        secret.replacen("sk_live_", "sk_prod_", 1),
        secret[..secret.len() - 3].to_owned(),
        format!("{secret}extra"),
        "Bearer sk_live_AbCd1234".to_owned(),
    ];
    for case in &cases {
        let response = verify(&mut c, case).await;
        assert_eq!(
            decision(&response),
            pb::Decision::Malformed,
            "{:?}",
            &case[..case.len().min(40)]
        );
        assert!(!response.valid && response.key_id.is_empty() && response.session_id.is_empty());
    }
    // Nothing was written for the malformed ones.
    assert_eq!(server.redis_key_count(), before);
}

async fn oversized_messages_are_refused(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.keys();
    let err = c
        .verify_key(pb::VerifyKeyRequest {
            key: "k".repeat(1 << 20),
            expected_environment: 0,
            cost: 0,
        })
        .await
        .expect_err("1 MiB message");
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert_eq!(reason(&err), "MESSAGE_TOO_LARGE");
    let err = c
        .create_session(pb::CreateSessionRequest {
            session_id: "s".repeat(1 << 20),
            environment: pb::Environment::Live as i32,
            plan: pb::Plan::Free as i32,
            ..Default::default()
        })
        .await
        .expect_err("1 MiB session id");
    assert_eq!(err.code(), Code::OutOfRange);
    assert_eq!(reason(&err), "MESSAGE_TOO_LARGE");
    assert_eq!(server.redis_key_count(), 0);
}

/// A `VerifyKeyRequest` as a client with a broken encoder might send it: the key as raw bytes.
#[derive(Clone, PartialEq, prost::Message)]
struct RawVerifyKeyRequest {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
}

/// A `RecordOutcomesRequest` whose outcomes carry their error code as raw bytes.
#[derive(Clone, PartialEq, prost::Message)]
struct RawRecordOutcomesRequest {
    #[prost(message, repeated, tag = "1")]
    outcomes: Vec<RawOutcome>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RawOutcome {
    #[prost(string, tag = "1")]
    key_id: String,
    #[prost(bytes = "vec", tag = "3")]
    error_code: Vec<u8>,
}

/// Sends `message` to `path` as if it were the method's own request.
async fn send_raw<M: prost::Message + Default + Send + Sync + 'static>(
    server: &TestServer,
    path: &'static str,
    message: M,
) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(server.channel.clone());
    grpc.ready().await.expect("ready");
    grpc.unary::<M, pb::VerifyKeyResponse, _>(
        tonic::Request::new(message),
        http::uri::PathAndQuery::from_static(path),
        tonic_prost::ProstCodec::default(),
    )
    .await
    .expect_err("not the method's message")
}

/// Bytes that are not the method's message (a string field that is not UTF-8, here) are the
/// caller's error: INVALID_ARGUMENT naming the field, from the request's top, not tonic's
/// INTERNAL, which would say the server failed.
async fn undecodable_requests_name_the_field_they_broke(backend: Backend) {
    let server = TestServer::start(backend).await;
    let err = send_raw(
        &server,
        "/sendable.keys.v1.KeyService/VerifyKey",
        RawVerifyKeyRequest {
            key: vec![b's', b'k', 0xff, 0xfe],
        },
    )
    .await;
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(reason(&err), "INVALID_ARGUMENT");
    assert_eq!(bad_fields(&err), ["key"]);
    let err = send_raw(
        &server,
        "/sendable.keys.v1.UsageService/RecordOutcomes",
        RawRecordOutcomesRequest {
            outcomes: vec![RawOutcome {
                key_id: "AbCd1234".to_owned(),
                error_code: vec![0xc3, 0x28],
            }],
        },
    )
    .await;
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(bad_fields(&err), ["outcomes.error_code"]);
    assert_eq!(server.redis_key_count(), 0);
}

async fn unknown_enum_values_and_bad_ids_name_their_fields(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.keys();
    let err = c
        .create_session(pb::CreateSessionRequest {
            session_id: "has spaces and {braces}".into(),
            environment: 9,
            plan: 42,
            custom_rate_limit_per_minute: Some(u32::MAX),
            custom_max_keys: None,
        })
        .await
        .expect_err("bad session");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(bad_fields(&err), ["session_id", "environment", "plan"]);

    let err = c
        .create_session(pb::CreateSessionRequest {
            session_id: unique_session("limits"),
            environment: pb::Environment::Live as i32,
            plan: pb::Plan::Pro as i32,
            custom_rate_limit_per_minute: Some(u32::MAX),
            custom_max_keys: Some(u32::MAX),
        })
        .await
        .expect_err("absurd custom limits");
    assert_eq!(
        bad_fields(&err),
        ["custom_rate_limit_per_minute", "custom_max_keys"]
    );

    let err = c
        .create_session(pb::CreateSessionRequest {
            session_id: String::new(),
            ..Default::default()
        })
        .await
        .expect_err("empty");
    assert_eq!(bad_fields(&err), ["session_id", "environment", "plan"]);

    let err = c
        .get_session(pb::GetSessionRequest {
            session_id: "x".repeat(65),
        })
        .await
        .expect_err("long id");
    assert_eq!(bad_fields(&err), ["session_id"]);

    let err = c
        .update_session(pb::UpdateSessionRequest {
            session_id: unique_session("u"),
            plan: Some(99),
            ..Default::default()
        })
        .await
        .expect_err("unknown plan");
    assert_eq!(bad_fields(&err), ["plan"]);

    let err = c
        .verify_key(pb::VerifyKeyRequest {
            key: "sk_live_x".into(),
            expected_environment: 7,
            cost: 0,
        })
        .await
        .expect_err("unknown environment");
    assert_eq!(bad_fields(&err), ["expected_environment"]);

    let err = c
        .verify_key(pb::VerifyKeyRequest {
            key: "sk_live_x".into(),
            expected_environment: 0,
            cost: 2_000_000,
        })
        .await
        .expect_err("absurd cost");
    assert_eq!(bad_fields(&err), ["cost"]);

    for bad in ["", "short", "AbCd12345", "AbCd-234", "sk_live_AbCd1234"] {
        let err = c
            .get_key(pb::GetKeyRequest { key_id: bad.into() })
            .await
            .expect_err("bad key id");
        assert_eq!(bad_fields(&err), ["key_id"], "{bad:?}");
        let err = c
            .revoke_key(pb::RevokeKeyRequest {
                key_id: bad.into(),
                reason: String::new(),
            })
            .await
            .expect_err("bad key id");
        assert_eq!(bad_fields(&err), ["key_id"]);
    }
    assert_eq!(
        server.redis_key_count(),
        0,
        "refused requests write nothing"
    );
}

async fn paging_parameters_are_checked(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.keys();
    let id = unique_session("paging");
    create_session(&mut c, &id, pb::Plan::Pro, pb::Environment::Live).await;
    create_key(&mut c, &id).await;
    create_key(&mut c, &id).await;
    let list = |page_size: i32, page_token: &str| pb::ListKeysRequest {
        session_id: id.clone(),
        page_size,
        page_token: page_token.to_owned(),
    };
    let err = c.list_keys(list(-1, "")).await.expect_err("negative");
    assert_eq!(bad_fields(&err), ["page_size"]);
    let huge = c
        .list_keys(list(i32::MAX, ""))
        .await
        .expect("huge is coerced")
        .into_inner();
    assert_eq!(huge.keys.len(), 2);
    for token in ["garbage", "%%%", "djF8a2V5c3w", &"A".repeat(1000)] {
        let err = c.list_keys(list(1, token)).await.expect_err("bad token");
        assert_eq!(bad_fields(&err), ["page_token"], "{token}");
    }
    // A token of the audit list is not a token of the key list.
    let audit_page = c
        .list_audit_events(pb::ListAuditEventsRequest {
            session_id: id.clone(),
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .expect("audit")
        .into_inner();
    assert!(!audit_page.next_page_token.is_empty());
    let err = c
        .list_keys(list(1, &audit_page.next_page_token))
        .await
        .expect_err("foreign token");
    assert_eq!(bad_fields(&err), ["page_token"]);
    let err = c
        .list_audit_events(pb::ListAuditEventsRequest {
            session_id: id,
            page_size: -5,
            page_token: String::new(),
        })
        .await
        .expect_err("negative");
    assert_eq!(bad_fields(&err), ["page_size"]);
}

async fn key_parameters_are_checked(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.keys();
    let id = unique_session("params");
    create_session(&mut c, &id, pb::Plan::Pro, pb::Environment::Live).await;
    let before = server.redis_key_count();
    let past = prost_types::Timestamp {
        seconds: common::T0 / 1000 - 1,
        nanos: 0,
    };
    let far = prost_types::Timestamp {
        seconds: common::T0 / 1000 + 20 * 365 * 86_400,
        nanos: 0,
    };
    for (name, expire, field) in [
        ("n".repeat(129), None, "name"),
        ("bell\u{7}".to_owned(), None, "name"),
        ("ok".to_owned(), Some(past), "expire_time"),
        ("ok".to_owned(), Some(far), "expire_time"),
        (
            "ok".to_owned(),
            Some(prost_types::Timestamp {
                seconds: 1,
                nanos: -3,
            }),
            "expire_time",
        ),
    ] {
        let err = c
            .create_key(pb::CreateKeyRequest {
                session_id: id.clone(),
                name,
                expire_time: expire,
            })
            .await
            .expect_err("bad key parameters");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(bad_fields(&err), [field]);
    }
    let (key, _) = create_key(&mut c, &id).await;
    let after_create = server.redis_key_count();
    for (grace, desc) in [
        (
            prost_types::Duration {
                seconds: -1,
                nanos: 0,
            },
            "negative",
        ),
        (
            prost_types::Duration {
                seconds: 31 * 86_400,
                nanos: 0,
            },
            "too long",
        ),
    ] {
        let err = c
            .rotate_key(pb::RotateKeyRequest {
                key_id: key.key_id.clone(),
                grace_period: Some(grace),
            })
            .await
            .expect_err(desc);
        assert_eq!(bad_fields(&err), ["grace_period"], "{desc}");
    }
    let err = c
        .revoke_key(pb::RevokeKeyRequest {
            key_id: key.key_id.clone(),
            reason: "r".repeat(257),
        })
        .await
        .expect_err("long reason");
    assert_eq!(bad_fields(&err), ["reason"]);
    assert!(after_create > before || backend == Backend::Memory);
    assert_eq!(
        server.redis_key_count(),
        after_create,
        "refused requests write nothing"
    );
    let key = c
        .get_key(pb::GetKeyRequest { key_id: key.key_id })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(key.status, pb::KeyStatus::Active as i32);
}

for_all_stores!(
    garbage_keys_are_malformed_without_a_store_lookup,
    oversized_messages_are_refused,
    undecodable_requests_name_the_field_they_broke,
    unknown_enum_values_and_bad_ids_name_their_fields,
    paging_parameters_are_checked,
    key_parameters_are_checked,
);
