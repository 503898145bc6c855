//! The real `sendable-keys` binary as a platform runs it: credentials, JSON logs, the admin
//! listener and its metrics, OTLP export, and SIGTERM. Each test starts its own process on free
//! ports; the one that checks Redis metrics also starts a `redis-server` of its own.

mod common;

use std::collections::HashMap;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::process::{Process, http_get};
use common::relay::Relay;

use sendable_keys::cli::token_sha256;
use sendable_keys::grpc::pb;
use sendable_keys::grpc::pb::key_service_client::KeyServiceClient;
use sendable_keys::grpc::pb::usage_service_client::UsageServiceClient;
use tonic::metadata::MetadataValue;

const ADMIN_TOKEN: &str = "skt_ops-token-that-must-never-be-logged-42";
const SERVICE_TOKEN: &str = "skt_chat-token-that-must-never-be-logged-42";
const PEPPER: &str = "pepper-that-must-never-be-logged-0123456789";

/// The binary with two callers (an admin and a service), the test pepper, debug JSON logs.
fn start(extra_env: &[(&str, &str)]) -> Process {
    let mut env = vec![
        ("SENDABLE_KEYS_PEPPER", PEPPER),
        ("SENDABLE_KEYS_ALERT_POLL_INTERVAL", "50ms"),
        (
            "SENDABLE_KEYS_LOG",
            "debug,h2=info,hyper=info,tower=info,opentelemetry=info",
        ),
    ];
    env.extend_from_slice(extra_env);
    Process::start(
        &[
            ("ops", "admin", ADMIN_TOKEN),
            ("chat-service", "service", SERVICE_TOKEN),
        ],
        &env,
    )
}

fn authed<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let value: MetadataValue<_> = format!("Bearer {token}").parse().expect("metadata");
    request.metadata_mut().insert("authorization", value);
    request
}

/// Creates live session `id` on `plan`, as the admin.
async fn create_session(channel: &tonic::transport::Channel, id: &str, plan: pb::Plan) {
    KeyServiceClient::new(channel.clone())
        .create_session(authed(
            pb::CreateSessionRequest {
                session_id: id.into(),
                environment: pb::Environment::Live as i32,
                plan: plan as i32,
                ..Default::default()
            },
            ADMIN_TOKEN,
        ))
        .await
        .expect("session");
}

/// Creates a key named `name` in session `id`, as the admin.
async fn create_key(
    channel: &tonic::transport::Channel,
    id: &str,
    name: &str,
) -> pb::CreateKeyResponse {
    KeyServiceClient::new(channel.clone())
        .create_key(authed(
            pb::CreateKeyRequest {
                session_id: id.into(),
                name: name.into(),
                expire_time: None,
            },
            ADMIN_TOKEN,
        ))
        .await
        .expect("key")
        .into_inner()
}

/// VerifyKey of `key`, as the calling `service`.
async fn verify(
    mut keys: KeyServiceClient<tonic::transport::Channel>,
    key: String,
) -> pb::VerifyKeyResponse {
    keys.verify_key(authed(
        pb::VerifyKeyRequest {
            key,
            expected_environment: 0,
            cost: 0,
        },
        SERVICE_TOKEN,
    ))
    .await
    .expect("verify")
    .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_logs_or_the_metrics() {
    let mut process = start(&[]);
    let channel = process.channel().await;
    let mut keys = KeyServiceClient::new(channel.clone());
    let mut usage = UsageServiceClient::new(process.channel().await);
    create_session(&channel, "acme-logs", pb::Plan::Pro).await;
    let mut secrets = Vec::new();
    let created = create_key(&channel, "acme-logs", "n").await;
    secrets.push(created.secret.clone());
    let key_id = created.key.expect("key").key_id;
    for key in [
        created.secret.clone(),
        format!(" {} ", created.secret),
        created.secret.replace('a', "b"),
    ] {
        verify(keys.clone(), key).await;
    }
    let rotated = keys
        .rotate_key(authed(
            pb::RotateKeyRequest {
                key_id: key_id.clone(),
                grace_period: None,
            },
            ADMIN_TOKEN,
        ))
        .await
        .expect("rotate")
        .into_inner();
    secrets.push(rotated.secret.clone());
    keys.revoke_key(authed(
        pb::RevokeKeyRequest {
            key_id: rotated.new_key.expect("new").key_id,
            reason: "done".into(),
        },
        ADMIN_TOKEN,
    ))
    .await
    .expect("revoke");
    usage
        .record_outcomes(authed(
            pb::RecordOutcomesRequest {
                outcomes: vec![pb::Outcome {
                    key_id,
                    success: false,
                    error_code: "500".into(),
                    ..Default::default()
                }],
            },
            SERVICE_TOKEN,
        ))
        .await
        .expect("outcomes");
    // Refused calls log their refusal; they must not log the token they carried.
    let _ = keys
        .create_session(authed(pb::CreateSessionRequest::default(), SERVICE_TOKEN))
        .await;
    let _ = keys
        .get_session(authed(
            pb::GetSessionRequest {
                session_id: "x".into(),
            },
            "wrong-token-also-secret-1234",
        ))
        .await;

    let (status, metrics) = http_get(&process.admin, "/metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("sendable_keys_grpc_requests_total"),
        "{metrics}"
    );
    assert!(
        metrics.contains("caller=\"chat-service\""),
        "callers are labelled"
    );
    assert!(metrics.contains("sendable_keys_verify_decisions_total"));
    assert!(metrics.contains("decision=\"VALID\""));
    assert!(metrics.contains("sendable_keys_grpc_request_duration_seconds_bucket"));
    assert!(!metrics.contains("acme-logs"), "no session ids in labels");

    process.sigterm();
    let (exit, _) = process.wait(Duration::from_secs(30));
    assert!(exit.success(), "{exit:?}");
    let logs = process.logs();
    assert!(
        logs.contains("\"caller\":\"ops\""),
        "the caller's name is in the logs"
    );
    for secret in &secrets {
        let secret_part = &secret[secret.len() - 36..secret.len() - 6];
        for haystack in [&logs, &metrics] {
            assert!(!haystack.contains(secret_part), "a key's secret leaked");
        }
    }
    for needle in [
        ADMIN_TOKEN,
        SERVICE_TOKEN,
        "wrong-token-also-secret-1234",
        PEPPER,
        &token_sha256(ADMIN_TOKEN),
    ] {
        assert!(!logs.contains(needle), "{needle} leaked into the logs");
        assert!(
            !metrics.contains(needle),
            "{needle} leaked into the metrics"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_reports_not_serving_ends_streams_drains_and_exits_zero() {
    let mut process = start(&[("SENDABLE_KEYS_DRAIN_TIMEOUT", "2s")]);
    assert_eq!(http_get(&process.admin, "/readyz").0, 200);
    assert_eq!(http_get(&process.admin, "/livez").0, 200);
    let channel = process.channel().await;
    create_session(&channel, "acme-drain", pb::Plan::Free).await;
    // Three long-lived calls in flight: an alert stream and a readiness health watch (both end
    // on shutdown) and a watch of `liveness` (which stays registered while the pod drains, so
    // only the drain timeout ends it).
    let mut alerts = UsageServiceClient::new(channel.clone())
        .watch_alerts(authed(
            pb::WatchAlertsRequest {
                session_id: "acme-drain".into(),
            },
            ADMIN_TOKEN,
        ))
        .await
        .expect("watch alerts")
        .into_inner();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone())
        .watch(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("watch health")
        .into_inner();
    let first = health.message().await.expect("health").expect("status");
    assert_eq!(
        first.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let mut liveness = tonic_health::pb::health_client::HealthClient::new(channel.clone())
        .watch(tonic_health::pb::HealthCheckRequest {
            service: "liveness".into(),
        })
        .await
        .expect("watch liveness")
        .into_inner();
    liveness.message().await.expect("liveness").expect("status");

    let signalled = Instant::now();
    process.sigterm();
    // Health turns NOT_SERVING for those still watching.
    let next = health
        .message()
        .await
        .expect("health stream")
        .expect("status update");
    assert_eq!(
        next.status,
        tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
    );
    // Then that watch ends, and so does the alert stream, cleanly (an orderly end of stream,
    // not an error).
    let end = tokio::time::timeout(Duration::from_secs(10), health.message())
        .await
        .expect("health watch ends");
    assert!(matches!(end, Ok(None)), "{end:?}");
    let end = tokio::time::timeout(Duration::from_secs(10), alerts.message())
        .await
        .expect("stream ends");
    assert!(matches!(end, Ok(None)), "{end:?}");
    // The liveness watch keeps the server draining until the 2 s bound, then the process
    // exits with status 0.
    let (exit, _) = process.wait(Duration::from_secs(15));
    let took = signalled.elapsed();
    assert!(exit.success(), "{exit:?}");
    assert!(
        took >= Duration::from_millis(1900),
        "waited for the in-flight call: {took:?}"
    );
    assert!(
        took < Duration::from_secs(10),
        "bounded by the drain timeout: {took:?}"
    );
    // New connections are refused once it is gone.
    assert!(TcpStream::connect(&process.grpc).is_err());
    let logs = process.logs();
    assert!(logs.contains("SIGTERM received"), "{logs}");
    assert!(logs.contains("drain timeout"), "{logs}");
}

/// The server's count of open WatchAlerts streams, from /metrics.
fn watchers(admin: &str) -> f64 {
    let (_, metrics) = http_get(admin, "/metrics");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("sendable_keys_alert_watchers "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Creates session `id` and opens a WatchAlerts stream on it over `channel`, returning once
/// the server counts the watcher (it registers after its first evaluation).
async fn watch_new_session(
    process: &Process,
    channel: &tonic::transport::Channel,
    id: &str,
) -> tonic::Streaming<pb::AlertEvent> {
    create_session(channel, id, pb::Plan::Free).await;
    let stream = UsageServiceClient::new(channel.clone())
        .watch_alerts(authed(
            pb::WatchAlertsRequest {
                session_id: id.into(),
            },
            ADMIN_TOKEN,
        ))
        .await
        .expect("watch")
        .into_inner();
    wait_for_watchers(
        process,
        Duration::from_secs(10),
        |n| n >= 1.0,
        "the watcher never showed up in /metrics",
    )
    .await;
    stream
}

/// Polls /metrics until the watcher count satisfies `done`, failing with `why` after `within`.
async fn wait_for_watchers(
    process: &Process,
    within: Duration,
    done: impl Fn(f64) -> bool,
    why: &str,
) {
    let deadline = Instant::now() + within;
    while !done(watchers(&process.admin)) {
        assert!(Instant::now() < deadline, "{why}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_stream_ends_on_the_server_when_its_client_goes_away() {
    let process = start(&[]);
    let channel = process.channel().await;
    let stream = watch_new_session(&process, &channel, "acme-watch").await;
    drop(stream);
    drop(channel);
    // Gone within a few poll intervals (50 ms here), without waiting for an alert to send.
    wait_for_watchers(
        &process,
        Duration::from_secs(10),
        |n| n == 0.0,
        "the server kept evaluating for a client that left",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_peer_went_silent_is_closed_and_its_streams_end() {
    let process = start(&[
        ("SENDABLE_KEYS_KEEPALIVE_INTERVAL", "1s"),
        ("SENDABLE_KEYS_KEEPALIVE_TIMEOUT", "1s"),
    ]);
    let relay = Relay::to(&process.grpc).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", relay.addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect through the relay");
    let stream = watch_new_session(&process, &channel, "acme-silent").await;
    // The connection is alive and answering right up to the freeze (a call through it).
    let answered = tonic_health::pb::health_client::HealthClient::new(channel.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await;
    assert!(answered.is_ok(), "{answered:?}");
    assert_eq!(watchers(&process.admin), 1.0, "still watching");
    // Now the peer goes silent, without closing anything (the client keeps its stream and
    // channel).
    relay.freeze_existing();
    // Closed after a ping goes unanswered: within interval + timeout (2 s), with room to spare.
    wait_for_watchers(
        &process,
        Duration::from_secs(15),
        |n| n == 0.0,
        "the server kept a silent peer's connection and its watch stream",
    )
    .await;
    drop((stream, channel));
}

/// `(count, sum)` of the verify batch-size histogram on `/metrics`: script calls, and the
/// verifications they carried.
fn batch_histogram(admin: &str) -> (u64, u64) {
    let (status, metrics) = http_get(admin, "/metrics");
    assert_eq!(status, 200);
    let value = |suffix: &str| {
        let name = format!(
            "{}{suffix} ",
            sendable_keys::store::redis::BATCH_SIZE_METRIC
        );
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(name.as_str()))
            .map(|v| v.trim().parse::<f64>().expect("a number") as u64)
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{metrics}"))
    };
    // Its own buckets (powers of two up to the batch limit), not the latency buckets.
    let top = format!(
        "{}_bucket{{le=\"256\"}}",
        sendable_keys::store::redis::BATCH_SIZE_METRIC
    );
    assert!(metrics.contains(&top), "no {top} in /metrics:\n{metrics}");
    (value("_count"), value("_sum"))
}

/// A Redis that may delete data when full (any `maxmemory-policy` but `noeviction`) is named in
/// a startup warning; one that never does is not; one that comes up after the service is
/// checked when it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_may_evict_is_warned_about_at_startup() {
    const WARNING: &str = "set maxmemory-policy noeviction";
    let mut redis = common::redis::DedicatedRedis::start();
    let url = redis.server.url();
    let calm = start(&[("REDIS_URL", url.as_str())]);
    let logs = calm.logs();
    assert!(logs.contains("using Redis"), "{logs}");
    assert!(!logs.contains(WARNING), "{logs}");
    drop(calm);

    common::redis::config_set(&url, "maxmemory-policy", "allkeys-lru");
    let evicting = start(&[("REDIS_URL", url.as_str())]);
    let warning = evicting
        .logs()
        .lines()
        .find(|line| line.contains(WARNING))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no warning in {}", evicting.logs()));
    assert!(warning.contains("\"level\":\"WARN\""), "{warning}");
    assert!(
        warning.contains("\"maxmemory_policy\":\"allkeys-lru\""),
        "{warning}"
    );
    drop(evicting);

    redis.kill();
    let early = start(&[("REDIS_URL", url.as_str())]);
    assert!(early.logs().contains("Redis not reachable yet"));
    assert!(!early.logs().contains(WARNING));
    redis.restart_with(&["--maxmemory-policy", "volatile-ttl"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !early
        .logs()
        .contains("\"maxmemory_policy\":\"volatile-ttl\"")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no warning once Redis came up: {}",
            early.logs()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Operators can see batching at work: `/metrics` counts every VERIFY script call and the
/// verifications it carried, in agreement with Redis's own count of script calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_verifications_per_script_call() {
    let redis = common::redis::DedicatedRedis::start();
    let url = redis.server.url();
    // A generous store timeout: a debug build logging at debug level on two shared cores must
    // not turn a slow batch into a failed call.
    let process = start(&[
        ("REDIS_URL", url.as_str()),
        ("SENDABLE_KEYS_REDIS_TIMEOUT", "5s"),
    ]);
    let channel = process.channel().await;
    let keys = KeyServiceClient::new(channel.clone());
    create_session(&channel, "acme-batches", pb::Plan::Pro).await;
    let secret = create_key(&channel, "acme-batches", "").await.secret;
    // One call alone first: it loads the script, and is a script call of one.
    assert_eq!(
        verify(keys.clone(), secret.clone()).await.decision,
        pb::Decision::Valid as i32
    );
    let (count, sum) = batch_histogram(&process.admin);
    assert_eq!(
        (count, sum),
        (1, 1),
        "the first call, alone, is one script call of one"
    );
    let mut conn = ::redis::Client::open(url.as_str())
        .expect("url")
        .get_connection()
        .expect("connect");
    let _: () = ::redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query(&mut conn)
        .expect("resetstat");

    let n = 400;
    let answers =
        futures_util::future::join_all((0..n).map(|_| verify(keys.clone(), secret.clone()))).await;
    assert!(
        answers
            .iter()
            .all(|a| a.decision == pb::Decision::Valid as i32),
        "every call VALID: {answers:?}"
    );
    let script_calls = common::redis::commandstats(&mut conn)
        .get("evalsha")
        .copied()
        .unwrap_or(0);
    let (count_after, sum_after) = batch_histogram(&process.admin);
    assert_eq!(sum_after - sum, n, "every verification is counted once");
    assert_eq!(
        count_after - count,
        script_calls,
        "one count per script call Redis ran"
    );
    assert!(
        script_calls < n / 2,
        "{n} verifications in flight together shared script calls: {script_calls}"
    );
}

/// A minimal OTLP/gRPC collector that keeps the spans it receives.
mod collector {
    use std::sync::{Arc, Mutex};

    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    use opentelemetry_proto::tonic::trace::v1::Span;

    #[derive(Clone, Default)]
    pub struct Collector {
        pub spans: Arc<Mutex<Vec<Span>>>,
        pub notify: Arc<tokio::sync::Notify>,
    }

    #[tonic::async_trait]
    impl TraceService for Collector {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let mut spans = self.spans.lock().expect("spans");
            for resource in request.into_inner().resource_spans {
                for scope in resource.scope_spans {
                    spans.extend(scope.spans);
                }
            }
            self.notify.notify_waiters();
            Ok(tonic::Response::new(ExportTraceServiceResponse {
                partial_success: None,
            }))
        }
    }

    pub async fn start() -> (String, Collector) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let collector = Collector::default();
        let service = TraceServiceServer::new(collector.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .expect("collector serves");
        });
        (format!("http://{addr}"), collector)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_are_exported_over_otlp_and_continue_the_callers_trace() {
    let (endpoint, collector) = collector::start().await;
    let mut process = start(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_SERVICE_NAME", "sendable-keys-test"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ]);
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut request = authed(
        pb::VerifyKeyRequest {
            key: "sk_live_nonsense".into(),
            expected_environment: 0,
            cost: 0,
        },
        SERVICE_TOKEN,
    );
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01")
            .parse()
            .expect("metadata"),
    );
    KeyServiceClient::new(process.channel().await)
        .verify_key(request)
        .await
        .expect("verify");
    // SIGTERM flushes whatever the batch exporter still holds.
    process.sigterm();
    let (exit, _) = process.wait(Duration::from_secs(30));
    assert!(exit.success());
    let spans = collector.spans.lock().expect("spans").clone();
    let by_trace: HashMap<String, Vec<String>> = spans.iter().fold(HashMap::new(), |mut m, s| {
        m.entry(hex::encode(&s.trace_id))
            .or_default()
            .push(s.name.clone());
        m
    });
    let ours = by_trace
        .get(trace_id)
        .unwrap_or_else(|| panic!("no span continued the caller's trace: {by_trace:?}"));
    assert!(ours.iter().any(|name| name == "rpc"), "{ours:?}");
    let rpc = spans
        .iter()
        .find(|s| hex::encode(&s.trace_id) == trace_id && s.name == "rpc")
        .expect("rpc span");
    assert_eq!(hex::encode(&rpc.parent_span_id), "00f067aa0ba902b7");
    let method = rpc
        .attributes
        .iter()
        .find(|a| a.key == "rpc.method")
        .and_then(|a| a.value.as_ref())
        .map(|v| format!("{v:?}"));
    assert!(
        method.is_some_and(|m| m.contains("VerifyKey")),
        "{:?}",
        rpc.attributes
    );
}
