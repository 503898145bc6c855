//! The service surface operators and Kubernetes rely on: gRPC health that tells the truth about
//! the store, reflection (v1 and v1alpha), failing closed when Redis goes away, and riding out a
//! Redis stall shorter than the store timeout.

mod common;

use std::sync::Arc;

use common::redis::{DedicatedRedis, config_set};
use common::relay::Relay;
use common::{
    Backend, TestServer, create_key, create_session, decision, reason, try_verify, unique_prefix,
    unique_session, verify, verify_until_answered,
};
use sendable_keys::grpc::pb;
use sendable_keys::store::redis::{RedisConfig, RedisStore};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;

async fn health_reports_serving_for_the_server_and_its_services(backend: Backend) {
    let server = TestServer::start(backend).await;
    for service in ["", "sendable.keys.v1.KeyService"] {
        server.wait_health(service, ServingStatus::Serving).await;
        let status = server
            .health()
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .expect("check")
            .into_inner();
        assert_eq!(status.status, ServingStatus::Serving as i32, "{service:?}");
    }
    let unknown = server
        .health()
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .expect_err("unknown service");
    assert_eq!(unknown.code(), Code::NotFound);
    // Health answers anyone, so it reads only small requests (a service name).
    let huge = server
        .health()
        .check(HealthCheckRequest {
            service: "x".repeat(64 * 1024),
        })
        .await
        .expect_err("a 64 KiB service name");
    assert_eq!(huge.code(), Code::OutOfRange, "{huge:?}");
}

async fn reflection_lists_the_services(backend: Backend) {
    use tokio_stream::StreamExt;
    let server = TestServer::start(backend).await;
    // v1
    {
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        let mut client = ServerReflectionClient::new(server.channel.clone());
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = client
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .expect("reflection v1")
            .into_inner();
        let response = responses.next().await.expect("a response").expect("ok");
        let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
            panic!("unexpected reflection response");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for expected in ["sendable.keys.v1.KeyService", "grpc.health.v1.Health"] {
            assert!(
                names.iter().any(|n| n == expected),
                "{expected} missing from {names:?}"
            );
        }
    }
    // v1alpha (older grpcurl and grpcio releases)
    {
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        let mut client = ServerReflectionClient::new(server.channel.clone());
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "sendable.keys.v1.KeyService".into(),
            )),
        };
        let mut responses = client
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .expect("reflection v1alpha")
            .into_inner();
        let response = responses.next().await.expect("a response").expect("ok");
        let Some(MessageResponse::FileDescriptorResponse(files)) = response.message_response else {
            panic!("unexpected reflection response");
        };
        assert!(!files.file_descriptor_proto.is_empty());
    }
    // Reflection answers anyone too, so it reads only small requests (a symbol, a file name).
    {
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        let mut client = ServerReflectionClient::new(server.channel.clone());
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol("x".repeat(64 * 1024))),
        };
        // Refused unread: an error, or (tonic-reflection ends its stream on a request it cannot
        // decode) no answer at all. Read, it would get a reflection answer (an error response
        // saying the symbol is unknown).
        match client
            .server_reflection_info(tokio_stream::iter([request]))
            .await
        {
            Err(status) => assert_eq!(status.code(), Code::OutOfRange, "{status:?}"),
            Ok(responses) => match responses.into_inner().next().await {
                None => {}
                Some(Err(status)) => assert_eq!(status.code(), Code::OutOfRange, "{status:?}"),
                Some(Ok(answer)) => panic!("a 64 KiB request was read and answered: {answer:?}"),
            },
        }
    }
}

for_all_stores!(
    health_reports_serving_for_the_server_and_its_services,
    reflection_lists_the_services
);

/// A server on the standalone Redis at `url` (with `timeout` per store call), serving, with
/// a session and one key that verifies VALID; returns the server, the session id and the
/// key's secret.
async fn server_with_a_key(
    url: String,
    timeout: std::time::Duration,
    label: &str,
) -> (TestServer, String, String) {
    let prefix = unique_prefix();
    let store = RedisStore::new(&RedisConfig {
        urls: vec![url],
        cluster: false,
        pool_size: 2,
        batching: true,
        prefix: prefix.clone(),
        timeout,
    })
    .expect("store");
    let server = TestServer::start_on_store(Arc::new(store), Backend::Redis, &prefix).await;
    server.wait_health("", ServingStatus::Serving).await;
    let mut c = server.keys();
    let id = unique_session(label);
    create_session(&mut c, &id, pb::Plan::Pro, pb::Environment::Live).await;
    let (_, secret) = create_key(&mut c, &id).await;
    assert_eq!(
        decision(&verify(&mut c, &secret).await),
        pb::Decision::Valid
    );
    (server, id, secret)
}

/// A dedicated Redis, a relay in front of it (to count and freeze connections) and a server
/// with a 1 s store timeout on the relay, with a session and one VALID key: returns all of
/// them, the session id and the key's secret.
async fn server_behind_a_relay(label: &str) -> (DedicatedRedis, Relay, TestServer, String, String) {
    let redis = DedicatedRedis::start();
    let target = redis
        .server
        .url()
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_owned();
    let relay = Relay::to(&target).await;
    let (server, id, secret) = server_with_a_key(
        format!("redis://{}", relay.addr),
        std::time::Duration::from_secs(1),
        label,
    )
    .await;
    (redis, relay, server, id, secret)
}

/// A client watching health (gRPC client-side health checking uses `Watch`) must not hold
/// the server's drain open: on shutdown its stream gets NOT_SERVING and then ends, and the
/// server stops without waiting out its (here two-minute) drain timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_watchers_see_not_serving_and_do_not_hold_the_drain() {
    let server = TestServer::start_with_options(
        sendable_keys::app::ServeOptions {
            drain_timeout: std::time::Duration::from_secs(120),
            ..sendable_keys::app::ServeOptions::default()
        },
        None,
    )
    .await;
    let mut stream = server
        .health()
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("watch")
        .into_inner();
    let first = stream.message().await.expect("stream").expect("a status");
    assert_eq!(first.status, ServingStatus::Serving as i32);
    let stopping = tokio::spawn(server.stop());
    let ending = async {
        let mut last = None;
        while let Some(update) = stream.message().await.expect("the stream ends cleanly") {
            last = Some(update.status);
        }
        last
    };
    let last = tokio::time::timeout(std::time::Duration::from_secs(30), ending)
        .await
        .expect("the Watch stream ended while the server drained");
    assert_eq!(last, Some(ServingStatus::NotServing as i32));
    tokio::time::timeout(std::time::Duration::from_secs(30), stopping)
        .await
        .expect("the server stopped without waiting out its drain timeout")
        .expect("server task");
}

/// Redis refuses for a while without going away: busy with another client's long script
/// (`BUSY`), or out of memory under `maxmemory` (`OOM`). Those states pass, so calls fail
/// `UNAVAILABLE` (retry with backoff), never `INTERNAL`, and work again once they do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_or_full_redis_is_unavailable_not_internal() {
    let redis = DedicatedRedis::start();
    let (server, _, secret) = server_with_a_key(
        redis.server.url(),
        std::time::Duration::from_secs(2),
        "busy",
    )
    .await;
    let mut c = server.keys();
    let admin = || {
        ::redis::Client::open(redis.server.url())
            .expect("url")
            .get_connection()
            .expect("connect")
    };
    let unavailable = |result: Result<pb::VerifyKeyResponse, tonic::Status>| {
        let err = result.expect_err("Redis is refusing");
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        assert_eq!(reason(&err), "STORE_UNAVAILABLE");
    };

    // BUSY: a script that never ends, past a 50 ms busy threshold.
    let url = redis.server.url();
    config_set(&url, "busy-reply-threshold", "50");
    let mut looping = admin();
    let runaway = std::thread::spawn(move || {
        ::redis::cmd("EVAL")
            .arg("while true do end")
            .arg(0)
            .query::<()>(&mut looping)
            .expect_err("killed")
    });
    // Wait until the server reports the script as running (a state change, not a sleep),
    // bounded: the runaway script's thread could have failed to start it.
    let mut probe = admin();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match ::redis::cmd("PING").query::<String>(&mut probe) {
            Err(err) if err.code() == Some("BUSY") => break,
            _ => assert!(
                std::time::Instant::now() < deadline,
                "Redis never reported the runaway script as BUSY"
            ),
        }
    }
    unavailable(try_verify(&mut c, &secret).await);
    let _: () = ::redis::cmd("SCRIPT")
        .arg("KILL")
        .query(&mut probe)
        .expect("script kill");
    runaway.join().expect("runaway script ended");
    assert_eq!(
        decision(&verify(&mut c, &secret).await),
        pb::Decision::Valid
    );

    // OOM: under a memory limit below what Redis already uses, the VERIFY script's first
    // write (the window) is refused, so the call cannot be counted and fails closed; alone,
    // and inside a batch, where the script catches each verification's error on its own.
    config_set(&url, "maxmemory", "1");
    unavailable(try_verify(&mut c, &secret).await);
    let _: () = ::redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query(&mut admin())
        .expect("resetstat");
    let together = (0..32).map(|_| {
        let mut c = c.clone();
        let key = secret.clone();
        async move { try_verify(&mut c, &key).await }
    });
    for result in futures_util::future::join_all(together).await {
        unavailable(result);
    }
    let script_calls = common::redis::commandstats(&mut admin())
        .get("evalsha")
        .copied()
        .unwrap_or(0);
    assert!(
        script_calls < 32,
        "32 verifications at once shared script calls ({script_calls})"
    );
    config_set(&url, "maxmemory", "0");
    assert_eq!(
        decision(&verify(&mut c, &secret).await),
        pb::Decision::Valid
    );
}

/// Redis dies: health flips to NOT_SERVING, VerifyKey fails closed with UNAVAILABLE (never a
/// VALID it cannot vouch for); Redis comes back: serving again, new data works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_redis_fails_closed_and_recovers() {
    let mut redis = DedicatedRedis::start();
    let (server, _, secret) = server_with_a_key(
        redis.server.url(),
        std::time::Duration::from_millis(500),
        "fault",
    )
    .await;
    let mut c = server.keys();

    redis.kill();
    let err = try_verify(&mut c, &secret)
        .await
        .expect_err("no store, no answer");
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(reason(&err), "STORE_UNAVAILABLE");
    assert!(
        !err.message().contains("127.0.0.1"),
        "no internals in the message: {}",
        err.message()
    );
    server.wait_health("", ServingStatus::NotServing).await;
    // A malformed key still gets its answer: that needs no store.
    assert_eq!(
        decision(&verify(&mut c, "nonsense").await),
        pb::Decision::Malformed
    );

    // A fresh (empty) Redis on the same address: the service reconnects by itself.
    redis.restart();
    server.wait_health("", ServingStatus::Serving).await;
    let id = unique_session("after");
    create_session(&mut c, &id, pb::Plan::Pro, pb::Environment::Live).await;
    let (_, secret) = create_key(&mut c, &id).await;
    assert_eq!(
        decision(&verify(&mut c, &secret).await),
        pb::Decision::Valid
    );
}

/// The Redis connections go silent without closing (a failover whose old sockets never get
/// an RST, a dropped flow): calls time out for a moment, then the service replaces its
/// connections by itself, instead of failing until the kernel gives up on the sockets (~15
/// minutes). Standalone only: a cluster client follows the nodes' own addresses, which a
/// relay cannot stand in for (and redis-rs's cluster client reconnects on its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_connections_that_went_silent_are_replaced() {
    let (_redis, relay, server, id, secret) = server_behind_a_relay("silent").await;
    let mut c = server.keys();
    let before = relay.accepted();

    relay.freeze_existing();
    // Each call now either times out (UNAVAILABLE, never a guess) or runs on a new
    // connection; the service must get there by itself, within a few timeouts.
    let (answer, timed_out) =
        verify_until_answered(&mut c, &secret, std::time::Duration::from_secs(20)).await;
    assert_eq!(decision(&answer), pb::Decision::Valid);
    assert!(timed_out >= 1, "the silenced connection was the one in use");
    assert!(relay.accepted() > before, "a new connection was opened");
    // Management calls (on their own connection) recover the same way.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let created = c
            .create_key(pb::CreateKeyRequest {
                session_id: id.clone(),
                ..Default::default()
            })
            .await;
        match created {
            Ok(_) => break,
            Err(err) => assert_eq!(err.code(), Code::Unavailable, "{err:?}"),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "CreateKey still failing on a silent connection"
        );
    }
    server.wait_health("", ServingStatus::Serving).await;
}

/// A change whose reply is lost (the connection dies between the script and its answer) still
/// happened, and its audit entry with it: the entry is written by the change's own script,
/// never by a second call that a lost connection, or a crash, could keep from running. The
/// caller saw the call fail, which the log also records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_whose_reply_is_lost_is_still_in_the_audit_log() {
    let (_redis, relay, server, id, secret) = server_behind_a_relay("lost-reply").await;
    let mut c = server.keys();
    let listed = |c: &mut pb::key_service_client::KeyServiceClient<_>| {
        let mut c = c.clone();
        let id = id.clone();
        async move {
            c.list_keys(pb::ListKeysRequest {
                session_id: id,
                page_size: 10,
                page_token: String::new(),
            })
            .await
            .expect("list")
            .into_inner()
            .keys
        }
    };
    let before: Vec<String> = listed(&mut c).await.into_iter().map(|k| k.key_id).collect();

    // The next script call (CreateKey's, after its session read) runs; its reply is lost.
    relay.freeze_replies_after("EVALSHA");
    let err = c
        .create_key(pb::CreateKeyRequest {
            session_id: id.clone(),
            name: "reply lost".to_owned(),
            expire_time: None,
        })
        .await
        .expect_err("no reply came back");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    // The key was created all the same (Redis ran the script)...
    let created: Vec<String> = listed(&mut c)
        .await
        .into_iter()
        .map(|k| k.key_id)
        .filter(|k| !before.contains(k))
        .collect();
    assert_eq!(created.len(), 1, "the script ran: {created:?}");
    // ...and is on record, as is the failure the caller saw.
    let events = common::audit_events(&mut c, &id).await;
    let logged: Vec<(&str, &str, &str)> = events
        .iter()
        .take(2)
        .map(|e| (e.action.as_str(), e.result.as_str(), e.key_id.as_str()))
        .collect();
    assert_eq!(
        logged,
        [
            ("CreateKey", "UNAVAILABLE", ""),
            ("CreateKey", "OK", created[0].as_str()),
        ]
    );
    assert_eq!(
        decision(&verify(&mut c, &secret).await),
        pb::Decision::Valid
    );
}

/// Redis stalls for less than the store timeout (a fork for a snapshot, a slow command of
/// another client, `CLIENT PAUSE` during a failover): VerifyKey calls in flight wait and then
/// answer; none fails and no connection is replaced, so a hiccup costs latency, never errors
/// or a reconnect storm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_stall_shorter_than_the_timeout_costs_latency_only() {
    let (redis, relay, server, _, secret) = server_behind_a_relay("stall").await;
    let c = server.keys();
    let connections = relay.accepted();
    let stall = std::time::Duration::from_millis(600);
    let started = std::time::Instant::now();
    let until = started + std::time::Duration::from_millis(300) + stall + stall;
    let callers = (0..32).map(|_| {
        let mut c = c.clone();
        let secret = secret.clone();
        tokio::spawn(async move {
            let (mut calls, mut slowest) = (0, std::time::Duration::ZERO);
            while std::time::Instant::now() < until {
                let sent = std::time::Instant::now();
                // Panics on any error: no call may fail during a short stall.
                let answer = verify(&mut c, &secret).await;
                // The Pro plan's 1000 a minute run out here: a refusal is an answer too.
                assert!(
                    matches!(
                        decision(&answer),
                        pb::Decision::Valid | pb::Decision::RateLimited
                    ),
                    "{answer:?}"
                );
                slowest = slowest.max(sent.elapsed());
                calls += 1;
            }
            (calls, slowest)
        })
    });
    let callers: Vec<_> = callers.collect();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let mut admin = ::redis::Client::open(redis.server.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let _: () = ::redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(stall.as_millis() as u64)
        .arg("ALL")
        .query_async(&mut admin)
        .await
        .expect("pause");
    let (mut calls, mut slowest) = (0, std::time::Duration::ZERO);
    for caller in callers {
        let (n, slow) = caller.await.expect("caller");
        calls += n;
        slowest = slowest.max(slow);
    }
    assert!(
        slowest >= stall * 3 / 4,
        "the stall reached calls in flight (slowest call {slowest:?})"
    );
    assert!(calls > 64, "calls kept flowing around the stall ({calls})");
    assert_eq!(
        relay.accepted(),
        connections,
        "no connection was replaced over a stall shorter than the timeout"
    );
}

/// Redis forgets its scripts (a restart, a failover to a replica that never loaded them,
/// SCRIPT FLUSH): the next call reloads the script and succeeds, on standalone and cluster.
async fn scripts_are_reloaded_after_a_flush(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.keys();
    let id = unique_session("noscript");
    create_session(&mut c, &id, pb::Plan::Pro, pb::Environment::Live).await;
    let (key, secret) = create_key(&mut c, &id).await;
    assert_eq!(
        decision(&verify(&mut c, &secret).await),
        pb::Decision::Valid
    );
    for url in server.redis_urls() {
        let mut conn = ::redis::Client::open(url)
            .expect("url")
            .get_connection()
            .expect("connect");
        let _: () = ::redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query(&mut conn)
            .expect("flush");
    }
    assert_eq!(
        decision(&verify(&mut c, &secret).await),
        pb::Decision::Valid
    );
    let revoked = c
        .revoke_key(pb::RevokeKeyRequest {
            key_id: key.key_id,
            reason: "after flush".into(),
        })
        .await
        .expect("revoke after flush")
        .into_inner();
    assert_eq!(revoked.status, pb::KeyStatus::Revoked as i32);
    assert_eq!(
        decision(&verify(&mut c, &secret).await),
        pb::Decision::Revoked
    );
}

mod noscript {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis() {
        super::scripts_are_reloaded_after_a_flush(super::Backend::Redis).await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cluster() {
        super::scripts_are_reloaded_after_a_flush(super::Backend::Cluster).await;
    }
}
