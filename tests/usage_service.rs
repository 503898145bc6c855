//! UsageService behaviour on the in-memory store, standalone Redis and Redis Cluster, driven by
//! an injected clock: per-decision counts, reported outcomes and their statistics, date ranges,
//! the live rate-limit window, and every alert firing and resolving at its thresholds.

mod common;

use common::{
    Backend, T0, TestServer, bad_fields, create_enterprise_session, create_key, create_session,
    unique_session, verify,
};
use sendable_keys::grpc::pb;
use sendable_keys::service::Settings;
use tonic::Code;

const MINUTE: i64 = 60_000;
/// 2026-03-02 (the day of T0) and its neighbours.
const DAY: &str = "2026-03-02";
const MIDNIGHT: i64 = 1_772_496_000_000; // 2026-03-03T00:00:00Z

fn micros(us: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: us / 1_000_000,
        nanos: ((us % 1_000_000) * 1000) as i32,
    }
}

fn ts(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

fn us_of(d: &Option<prost_types::Duration>) -> i64 {
    d.as_ref()
        .map_or(0, |d| d.seconds * 1_000_000 + i64::from(d.nanos) / 1000)
}

fn outcome(
    key_id: &str,
    success: bool,
    code: &str,
    response_us: i64,
    time: Option<i64>,
) -> pb::Outcome {
    pb::Outcome {
        key_id: key_id.to_owned(),
        success,
        error_code: code.to_owned(),
        response_time: Some(micros(response_us)),
        time: time.map(ts),
    }
}

async fn key_usage(server: &TestServer, key_id: &str, start: &str, end: &str) -> pb::KeyUsage {
    server
        .usage()
        .get_key_usage(pb::GetKeyUsageRequest {
            key_id: key_id.into(),
            start_date: start.into(),
            end_date: end.into(),
        })
        .await
        .expect("key usage")
        .into_inner()
}

async fn verifications_are_counted_per_decision(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.keys();
    let id = unique_session("counts");
    create_enterprise_session(&mut c, &id, 5).await;
    let (key, secret) = create_key(&mut c, &id).await;
    for _ in 0..7 {
        verify(&mut c, &secret).await; // 5 VALID, 2 RATE_LIMITED
    }
    c.verify_key(pb::VerifyKeyRequest {
        key: secret.clone(),
        expected_environment: pb::Environment::Dev as i32,
        cost: 0,
    })
    .await
    .expect("mismatch");
    verify(&mut c, "sk_live_not-a-key").await; // MALFORMED: not attributable
    c.update_session(pb::UpdateSessionRequest {
        session_id: id.clone(),
        enabled: Some(false),
        ..Default::default()
    })
    .await
    .expect("disable");
    verify(&mut c, &secret).await;
    server.clock.advance(1_500);
    let usage = key_usage(&server, &key.key_id, DAY, DAY).await;
    let total = usage.total.expect("totals");
    assert_eq!(total.requests, 9);
    let d = &total.decisions;
    assert_eq!(
        (
            d["VALID"],
            d["RATE_LIMITED"],
            d["ENVIRONMENT_MISMATCH"],
            d["SESSION_DISABLED"],
            d["REVOKED"],
            d["EXPIRED"]
        ),
        (5, 2, 1, 1, 0, 0)
    );
    assert!(!d.contains_key("MALFORMED") && !d.contains_key("NOT_FOUND"));
    assert_eq!(usage.days.len(), 1);
    assert_eq!(usage.days[0].date, DAY);
    assert_eq!(usage.days[0].requests, 9);
    // Last used is exact to the millisecond.
    let last = usage.last_used_time.expect("last used");
    assert_eq!(
        (last.seconds * 1000 + i64::from(last.nanos) / 1_000_000),
        T0
    );
}

async fn outcomes_give_exact_averages_percentiles_and_rates(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.keys();
    let id = unique_session("outcomes");
    create_session(&mut c, &id, pb::Plan::Pro, pb::Environment::Live).await;
    let (key, _) = create_key(&mut c, &id).await;
    let k = key.key_id.as_str();
    let mut batch = Vec::new();
    // 90 successes at 3 ms, 7 failures "503" at 700 ms, 2 "TIMEOUT" at 12 s, 1 failure with no code.
    for _ in 0..90 {
        batch.push(outcome(k, true, "", 3_000, None));
    }
    for _ in 0..7 {
        batch.push(outcome(k, false, "503", 700_000, None));
    }
    for _ in 0..2 {
        batch.push(outcome(k, false, "TIMEOUT", 12_000_000, Some(T0 - 1_000)));
    }
    batch.push(outcome(k, false, "", 40_000, None));
    // Rejected: an unknown key, a time past the retention, a time too far ahead.
    batch.push(outcome("ZZZZ9999", true, "", 1_000, None));
    batch.push(outcome(k, true, "", 1_000, Some(T0 - 91 * 86_400_000)));
    batch.push(outcome(k, true, "", 1_000, Some(T0 + 10 * MINUTE)));
    let result = server
        .usage()
        .record_outcomes(pb::RecordOutcomesRequest { outcomes: batch })
        .await
        .expect("record")
        .into_inner();
    assert_eq!((result.accepted, result.rejected), (100, 3));

    let t = key_usage(&server, k, DAY, DAY).await.total.expect("totals");
    assert_eq!((t.successes, t.errors, t.outcomes), (90, 10, 100));
    assert_eq!((t.success_rate, t.error_rate), (0.9, 0.1));
    let average = (90 * 3_000 + 7 * 700_000 + 2 * 12_000_000 + 40_000) / 100;
    assert_eq!(us_of(&t.average_response_time), average);
    // Bucket upper bounds: 3 ms is in (2, 5], 700 ms in (500, 1000], 12 s above 10 s (the
    // slowest observed is reported for that open bucket).
    assert_eq!(us_of(&t.p50_response_time), 5_000);
    assert_eq!(us_of(&t.p95_response_time), 1_000_000);
    assert_eq!(us_of(&t.p99_response_time), 12_000_000);
    assert_eq!(t.error_breakdown.get("503"), Some(&7));
    assert_eq!(t.error_breakdown.get("TIMEOUT"), Some(&2));
    assert_eq!(t.error_breakdown.get("UNKNOWN"), Some(&1));
    assert_eq!(t.error_breakdown.len(), 3);
}

/// A caller that puts ever-new values in its error codes (request ids, say) cannot grow a
/// key's usage without bound: a day keeps 100 distinct codes and counts failures with codes
/// first seen after that as OTHER, however frequent they become; an answer over several days
/// names the 100 most frequent. Counts always add up to the failures.
async fn error_codes_per_key_and_day_are_bounded(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.keys();
    let id = unique_session("codes");
    create_session(&mut c, &id, pb::Plan::Pro, pb::Environment::Live).await;
    let (key, _) = create_key(&mut c, &id).await;
    let k = key.key_id.as_str();
    let record = |batch: Vec<pb::Outcome>| {
        let mut usage = server.usage();
        async move {
            usage
                .record_outcomes(pb::RecordOutcomesRequest { outcomes: batch })
                .await
                .expect("record")
                .into_inner()
                .accepted
        }
    };
    // A caller's own "OTHER" is a code like any other until the cap; after it, OTHER also
    // holds everything new.
    let mut batch = vec![outcome(k, false, "OTHER", 1_000, None)];
    batch.extend((0..150).map(|i| outcome(k, false, &format!("E{i:03}"), 1_000, None)));
    batch.extend((0..50).map(|_| outcome(k, false, "E149", 1_000, None)));
    assert_eq!(record(batch).await, 201);
    let t = key_usage(&server, k, DAY, DAY).await.total.expect("totals");
    assert_eq!(t.errors, 201);
    assert_eq!(t.error_breakdown.len(), 100);
    assert_eq!(t.error_breakdown.get("E000"), Some(&1));
    assert_eq!(t.error_breakdown.get("E098"), Some(&1));
    assert_eq!(t.error_breakdown.get("E099"), None, "the 101st code");
    assert_eq!(
        t.error_breakdown.get("E149"),
        None,
        "first seen past the cap"
    );
    assert_eq!(t.error_breakdown.get("OTHER"), Some(&(1 + 51 + 50)));
    assert_eq!(t.error_breakdown.values().sum::<u64>(), 201);

    // The next day, 100 new codes twice each: over both days the 100 most frequent are named.
    server.clock.set(MIDNIGHT + MINUTE);
    let batch: Vec<pb::Outcome> = (0..200)
        .map(|i| outcome(k, false, &format!("N{:03}", i % 100), 1_000, None))
        .collect();
    assert_eq!(record(batch).await, 200);
    let t = key_usage(&server, k, DAY, "2026-03-03")
        .await
        .total
        .expect("totals");
    assert_eq!(t.errors, 401);
    assert_eq!(t.error_breakdown.len(), 101);
    assert_eq!(t.error_breakdown.get("N000"), Some(&2));
    assert_eq!(t.error_breakdown.get("N099"), Some(&2));
    assert_eq!(t.error_breakdown.get("E000"), None);
    assert_eq!(t.error_breakdown.get("OTHER"), Some(&(102 + 99)));
    assert_eq!(t.error_breakdown.values().sum::<u64>(), 401);
}

async fn date_ranges_split_at_utc_midnight(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.keys();
    let id = unique_session("midnight");
    create_session(&mut c, &id, pb::Plan::Pro, pb::Environment::Live).await;
    let (key, secret) = create_key(&mut c, &id).await;
    let (other, other_secret) = create_key(&mut c, &id).await;
    server.clock.set(MIDNIGHT - 30_000);
    for _ in 0..3 {
        verify(&mut c, &secret).await;
    }
    server
        .usage()
        .record_outcomes(pb::RecordOutcomesRequest {
            outcomes: vec![outcome(
                &key.key_id,
                false,
                "500",
                10_000,
                Some(MIDNIGHT - 1),
            )],
        })
        .await
        .expect("record");
    server.clock.set(MIDNIGHT + 30_000);
    for _ in 0..2 {
        verify(&mut c, &secret).await;
    }
    verify(&mut c, &other_secret).await;
    c.revoke_key(pb::RevokeKeyRequest {
        key_id: other.key_id.clone(),
        reason: String::new(),
    })
    .await
    .expect("revoke");

    let usage = key_usage(&server, &key.key_id, "2026-03-01", "2026-03-03").await;
    let per_day: Vec<(String, u64, u64)> = usage
        .days
        .iter()
        .map(|d| (d.date.clone(), d.requests, d.errors))
        .collect();
    assert_eq!(
        per_day,
        [
            ("2026-03-01".into(), 0, 0),
            ("2026-03-02".into(), 3, 1),
            ("2026-03-03".into(), 2, 0)
        ]
    );
    assert_eq!(usage.total.expect("total").requests, 5);

    // The session view sums every key, the revoked one included.
    let session = server
        .usage()
        .get_session_usage(pb::GetSessionUsageRequest {
            session_id: id.clone(),
            start_date: "2026-03-02".into(),
            end_date: "2026-03-03".into(),
        })
        .await
        .expect("session usage")
        .into_inner();
    assert_eq!(session.total.as_ref().map(|t| t.requests), Some(6));
    assert_eq!(
        session.days.iter().map(|d| d.requests).collect::<Vec<_>>(),
        [3, 3]
    );
    assert_eq!(session.keys.len(), 2);
    let revoked = session
        .keys
        .iter()
        .find(|k| k.key_id == other.key_id)
        .expect("revoked key listed");
    assert_eq!(revoked.total.as_ref().map(|t| t.requests), Some(1));

    // Bad ranges are refused with the offending field named.
    for (start, end, field) in [
        ("2026-03-03", "2026-03-02", "end_date"),
        ("2025-01-01", "2026-03-02", "end_date"),
        ("2026-3-1", "2026-03-02", "start_date"),
        ("2026-03-01", "2026-02-30", "end_date"),
        ("", "", "start_date"),
    ] {
        let err = server
            .usage()
            .get_key_usage(pb::GetKeyUsageRequest {
                key_id: key.key_id.clone(),
                start_date: start.into(),
                end_date: end.into(),
            })
            .await
            .expect_err("bad range");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(
            bad_fields(&err).first().map(String::as_str),
            Some(field),
            "{start}..{end}"
        );
    }
    // 366 days is the longest range.
    key_usage(&server, &key.key_id, "2025-03-03", "2026-03-03").await;
}

async fn usage_past_the_retention_reads_as_zero(backend: Backend) {
    let settings = Settings {
        usage_retention_days: 2,
        ..Settings::default()
    };
    let server = TestServer::start_with(backend, settings).await;
    let mut c = server.keys();
    let id = unique_session("retention");
    create_session(&mut c, &id, pb::Plan::Pro, pb::Environment::Live).await;
    let (key, secret) = create_key(&mut c, &id).await;
    verify(&mut c, &secret).await;
    assert_eq!(
        key_usage(&server, &key.key_id, DAY, DAY).await.days[0].requests,
        1
    );
    server.clock.advance(2 * 86_400_000);
    assert_eq!(
        key_usage(&server, &key.key_id, DAY, DAY).await.days[0].requests,
        1,
        "still within 2 days"
    );
    server.clock.advance(86_400_000);
    assert_eq!(
        key_usage(&server, &key.key_id, DAY, DAY).await.days[0].requests,
        0,
        "past the retention"
    );
    // On Redis the day hash carries a TTL of the retention after the day ends.
    for url in server.redis_urls() {
        let client = ::redis::Client::open(url).expect("url");
        let mut conn = client.get_connection().expect("connect");
        let names: Vec<String> = ::redis::cmd("KEYS")
            .arg(format!("{}:*:u:{}:20260302", server.prefix, key.key_id))
            .query(&mut conn)
            .expect("keys");
        for name in names {
            let ttl: i64 = ::redis::cmd("TTL")
                .arg(&name)
                .query(&mut conn)
                .expect("ttl");
            // Day ends at MIDNIGHT; + 2 days; minus T0 (14 h before midnight).
            let expected = (MIDNIGHT + 2 * 86_400_000 - T0) / 1000;
            assert!(
                (expected - 5..=expected).contains(&ttl),
                "ttl {ttl}, expected {expected}"
            );
        }
    }
}

async fn rate_limit_status_reads_without_consuming(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.keys();
    let id = unique_session("status");
    create_session(&mut c, &id, pb::Plan::Free, pb::Environment::Live).await;
    let (key, secret) = create_key(&mut c, &id).await;
    for _ in 0..10 {
        verify(&mut c, &secret).await;
    }
    server.clock.advance(20_000);
    let status = || async {
        server
            .usage()
            .get_rate_limit_status(pb::GetRateLimitStatusRequest {
                key_id: key.key_id.clone(),
            })
            .await
            .expect("status")
            .into_inner()
    };
    let first = status().await;
    let second = status().await;
    assert_eq!(first, second, "reading does not consume");
    assert_eq!((first.limit, first.used, first.remaining), (60, 10, 50));
    assert_eq!(first.reset_after.map(|d| d.seconds), Some(40));
    // Half a window later the previous minute's 10 weigh 30/60.
    server.clock.advance(MINUTE + 10_000);
    let later = status().await;
    assert_eq!((later.used, later.remaining), (5, 55));
    let err = server
        .usage()
        .get_rate_limit_status(pb::GetRateLimitStatusRequest {
            key_id: "nope".into(),
        })
        .await
        .expect_err("bad id");
    assert_eq!(bad_fields(&err), ["key_id"]);
}

async fn firing(server: &TestServer, session: &str) -> Vec<(i32, String, f64)> {
    let mut alerts: Vec<(i32, String, f64)> = server
        .usage()
        .list_alerts(pb::ListAlertsRequest {
            session_id: session.into(),
        })
        .await
        .expect("alerts")
        .into_inner()
        .alerts
        .into_iter()
        .map(|a| (a.kind, a.key_id, a.value))
        .collect();
    alerts.sort_by_key(|a| a.0);
    alerts
}

const NEAR: i32 = pb::AlertKind::NearRateLimit as i32;
const ERRORS: i32 = pb::AlertKind::HighErrorRate as i32;
const SPIKE: i32 = pb::AlertKind::TrafficSpike as i32;

async fn near_rate_limit_fires_at_eighty_percent_and_resolves_below_seventy(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.keys();
    let id = unique_session("near");
    create_session(&mut c, &id, pb::Plan::Free, pb::Environment::Live).await;
    let (key, secret) = create_key(&mut c, &id).await;
    for _ in 0..47 {
        verify(&mut c, &secret).await;
    }
    assert!(
        firing(&server, &id).await.is_empty(),
        "47/60 = 78% is below 80%"
    );
    verify(&mut c, &secret).await;
    let alerts = firing(&server, &id).await;
    assert_eq!(alerts, [(NEAR, key.key_id.clone(), 0.8)]);
    // 48 used at the window start. 15 s into the next window they weigh 36 (60%): resolved;
    // at 7.5 s they weigh 42 (70%): still firing (between resolve and fire).
    server.clock.set(T0 + MINUTE + 7_500);
    assert_eq!(
        firing(&server, &id).await.len(),
        1,
        "70% keeps a firing alert"
    );
    server.clock.set(T0 + MINUTE + 7_501);
    assert!(firing(&server, &id).await.is_empty(), "below 70% resolves");
}

/// Alerts watch the keys that work now: an active key, and a rotated key still in its grace
/// period; not a revoked key, nor an expired one, however busy they were.
async fn alerts_watch_only_keys_that_work(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.keys();
    let id = unique_session("live");
    create_enterprise_session(&mut c, &id, 5).await;
    let mut busy = Vec::new();
    for expires in [None, None, None, Some(30)] {
        let response = c
            .create_key(pb::CreateKeyRequest {
                session_id: id.clone(),
                name: "busy".to_owned(),
                expire_time: expires.map(|s| prost_types::Timestamp {
                    seconds: T0 / 1000 + s,
                    nanos: 0,
                }),
            })
            .await
            .expect("create key")
            .into_inner();
        // 5 of 5 per minute: each key is at its limit, past the 80% alert.
        for _ in 0..5 {
            verify(&mut c, &response.secret).await;
        }
        busy.push(response.key.expect("key").key_id);
    }
    let [plain, graced, revoked, expiring] = <[String; 4]>::try_from(busy).expect("four keys");
    c.rotate_key(pb::RotateKeyRequest {
        key_id: graced.clone(),
        grace_period: Some(prost_types::Duration {
            seconds: 3600,
            nanos: 0,
        }),
    })
    .await
    .expect("rotate");
    c.revoke_key(pb::RevokeKeyRequest {
        key_id: revoked.clone(),
        reason: String::new(),
    })
    .await
    .expect("revoke");
    // Still in the same window: the expiring key is past its expiry, its count unchanged.
    server.clock.set(T0 + 31_000);
    let mut near: Vec<String> = firing(&server, &id)
        .await
        .into_iter()
        .map(|(kind, key, _)| {
            assert_eq!(kind, NEAR);
            key
        })
        .collect();
    near.sort();
    let mut expected = vec![plain, graced];
    expected.sort();
    assert_eq!(
        near, expected,
        "not {revoked} (revoked), not {expiring} (expired)"
    );
}

async fn high_error_rate_needs_twenty_outcomes_and_ten_percent(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.keys();
    let id = unique_session("errors");
    create_session(&mut c, &id, pb::Plan::Pro, pb::Environment::Live).await;
    let (key, _) = create_key(&mut c, &id).await;
    let k = key.key_id.as_str();
    let record = |outcomes: Vec<pb::Outcome>| {
        let mut usage = server.usage();
        async move {
            usage
                .record_outcomes(pb::RecordOutcomesRequest { outcomes })
                .await
                .expect("record")
        }
    };
    // 17 successes and 2 failures: 10.5% but only 19 outcomes.
    let mut batch: Vec<pb::Outcome> = (0..17).map(|_| outcome(k, true, "", 1_000, None)).collect();
    batch.extend((0..2).map(|_| outcome(k, false, "500", 1_000, None)));
    record(batch).await;
    assert!(firing(&server, &id).await.is_empty());
    record(vec![outcome(k, true, "", 1_000, None)]).await; // 2/20 = 10%
    assert_eq!(
        firing(&server, &id).await,
        [(ERRORS, key.key_id.clone(), 0.1)]
    );
    // 20 more successes: 2/40 = 5%, still firing; one more: 2/41 < 5%, resolved.
    record((0..20).map(|_| outcome(k, true, "", 1_000, None)).collect()).await;
    assert_eq!(firing(&server, &id).await.len(), 1);
    record(vec![outcome(k, true, "", 1_000, None)]).await;
    assert!(firing(&server, &id).await.is_empty());
    // Five minutes later the old outcomes have left the window.
    record(
        (0..20)
            .map(|_| outcome(k, false, "500", 1_000, None))
            .collect(),
    )
    .await;
    assert_eq!(firing(&server, &id).await.len(), 1);
    server.clock.advance(5 * MINUTE);
    assert!(
        firing(&server, &id).await.is_empty(),
        "nothing left to judge"
    );
}

async fn traffic_spike_compares_five_minutes_with_the_hour_before(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.keys();
    let id = unique_session("spike");
    create_enterprise_session(&mut c, &id, 100_000).await;
    let (key, secret) = create_key(&mut c, &id).await;
    // Baseline: 20 requests a minute for an hour (minutes 0-59).
    for minute in 0..60 {
        server.clock.set(T0 + minute * MINUTE);
        for _ in 0..20 {
            verify(&mut c, &secret).await;
        }
    }
    // Minutes 60-64: 60, 60, 60, 60, 59 = 299 -> 59.8/min against 20/min = 2.99x.
    for (minute, n) in [(60, 60), (61, 60), (62, 60), (63, 60), (64, 59)] {
        server.clock.set(T0 + minute * MINUTE);
        for _ in 0..n {
            verify(&mut c, &secret).await;
        }
    }
    assert!(
        firing(&server, &id).await.iter().all(|a| a.0 != SPIKE),
        "2.99x does not fire"
    );
    verify(&mut c, &secret).await;
    let alerts = firing(&server, &id).await;
    assert_eq!(alerts, [(SPIKE, key.key_id.clone(), 3.0)]);
    // A quiet minute: recent 240 (48/min) against 1240/60 = 20.67/min = 2.32x: still firing.
    server.clock.set(T0 + 65 * MINUTE);
    assert_eq!(firing(&server, &id).await.len(), 1);
    // Another: 180 (36/min) against 1280/60 = 21.3/min = 1.69x: resolved.
    server.clock.set(T0 + 66 * MINUTE);
    assert!(firing(&server, &id).await.is_empty());
}

/// A key that did not exist when the spike baseline began (a new key, or a rotation's
/// replacement taking over its predecessor's traffic) has no hour to compare with: no spike.
/// A key that did, silent through it, does spike.
async fn a_key_newer_than_the_baseline_has_no_spike(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.keys();
    let id = unique_session("young");
    create_enterprise_session(&mut c, &id, 100_000).await;
    let (old, old_secret) = create_key(&mut c, &id).await;
    server.clock.set(T0 + 30 * MINUTE);
    let (_, young_secret) = create_key(&mut c, &id).await;
    // Minutes 65-69: 30 a minute each, 150 recent requests against a silent hour (30x the
    // 1/min floor). At minute 69 the baseline began at minute 5: the old key was there.
    for minute in 65..70 {
        server.clock.set(T0 + minute * MINUTE);
        for _ in 0..30 {
            verify(&mut c, &old_secret).await;
            verify(&mut c, &young_secret).await;
        }
    }
    assert_eq!(
        firing(&server, &id).await,
        [(SPIKE, old.key_id.clone(), 30.0)]
    );
}

async fn watch_alerts_streams_firing_and_resolved(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.keys();
    let id = unique_session("watch");
    create_session(&mut c, &id, pb::Plan::Free, pb::Environment::Live).await;
    let (key, secret) = create_key(&mut c, &id).await;
    let mut stream = server
        .usage()
        .watch_alerts(pb::WatchAlertsRequest {
            session_id: id.clone(),
        })
        .await
        .expect("watch")
        .into_inner();
    for _ in 0..50 {
        verify(&mut c, &secret).await;
    }
    let event = stream
        .message()
        .await
        .expect("stream ok")
        .expect("an event");
    assert_eq!(event.state, pb::AlertState::Firing as i32);
    let alert = event.alert.expect("alert");
    assert_eq!(
        (alert.kind, alert.key_id.as_str(), alert.session_id.as_str()),
        (NEAR, key.key_id.as_str(), id.as_str())
    );
    assert!(alert.message.contains(&key.key_id), "{}", alert.message);
    assert!(alert.since.is_some());
    server.clock.advance(2 * MINUTE);
    let event = stream
        .message()
        .await
        .expect("stream ok")
        .expect("an event");
    assert_eq!(event.state, pb::AlertState::Resolved as i32);
    assert_eq!(event.alert.map(|a| a.kind), Some(NEAR));
    drop(stream);

    let err = server
        .usage()
        .watch_alerts(pb::WatchAlertsRequest {
            session_id: unique_session("none"),
        })
        .await
        .expect_err("unknown session");
    assert_eq!(err.code(), Code::NotFound);
}

async fn bad_usage_requests_name_their_fields(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut usage = server.usage();
    let many: Vec<pb::Outcome> = (0..1001)
        .map(|_| outcome("AbCd1234", true, "", 1, None))
        .collect();
    let err = usage
        .record_outcomes(pb::RecordOutcomesRequest { outcomes: many })
        .await
        .expect_err("1001");
    assert_eq!(bad_fields(&err), ["outcomes"]);
    let err = usage
        .record_outcomes(pb::RecordOutcomesRequest {
            outcomes: vec![
                outcome("AbCd1234", true, "", 1, None),
                outcome("bad id", true, "", 1, None),
                outcome("AbCd1234", false, "has spaces", 1, None),
                pb::Outcome {
                    response_time: Some(prost_types::Duration {
                        seconds: -1,
                        nanos: 0,
                    }),
                    ..outcome("AbCd1234", true, "", 1, None)
                },
                outcome("AbCd1234", true, "", 2 * 3_600_000_000, None),
            ],
        })
        .await
        .expect_err("bad outcomes");
    assert_eq!(
        bad_fields(&err),
        [
            "outcomes[1].key_id",
            "outcomes[2].error_code",
            "outcomes[3].response_time",
            "outcomes[4].response_time"
        ]
    );
    let err = usage
        .list_alerts(pb::ListAlertsRequest {
            session_id: String::new(),
        })
        .await
        .expect_err("no session");
    assert_eq!(bad_fields(&err), ["session_id"]);
    let err = usage
        .get_session_usage(pb::GetSessionUsageRequest {
            session_id: unique_session("none"),
            start_date: DAY.into(),
            end_date: DAY.into(),
        })
        .await
        .expect_err("unknown session");
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(server.redis_key_count(), 0, "nothing written");
}

/// A session with many keys asks for fewer days at a time: 60 keys over 366 days are past the
/// bound of 20 000 entries, keys x (days + 1); the call says how many days fit instead, and 332
/// days are answered in full, in under 2.5 MB, well under the 4 MiB default gRPC clients take.
async fn session_usage_is_bounded_by_keys_times_days(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut c = server.keys();
    let id = unique_session("manykeys");
    create_session(&mut c, &id, pb::Plan::Pro, pb::Environment::Live).await;
    for _ in 0..60 {
        create_key(&mut c, &id).await;
    }
    let ask = |end: &str| pb::GetSessionUsageRequest {
        session_id: id.clone(),
        start_date: "2026-01-01".into(),
        end_date: end.into(),
    };
    // 2026-01-01 + 365 days: 366 days.
    let err = server
        .usage()
        .get_session_usage(ask("2027-01-01"))
        .await
        .expect_err("60 x 367 entries");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(bad_fields(&err), ["end_date"]);
    assert!(
        err.message().contains("at most 332 days"),
        "{}",
        err.message()
    );
    // 2026-01-01 + 331 days: 332 days.
    let answer = server
        .usage()
        .get_session_usage(ask("2026-11-28"))
        .await
        .expect("60 x 333 entries")
        .into_inner();
    assert_eq!(answer.keys.len(), 60);
    assert_eq!(answer.days.len(), 332);
    assert!(answer.keys.iter().all(|k| k.days.len() == 332));
    let bytes = prost::Message::encoded_len(&answer);
    assert!(bytes < 2_500_000, "{bytes} bytes on the wire");
}

for_all_stores!(
    session_usage_is_bounded_by_keys_times_days,
    verifications_are_counted_per_decision,
    outcomes_give_exact_averages_percentiles_and_rates,
    error_codes_per_key_and_day_are_bounded,
    date_ranges_split_at_utc_midnight,
    usage_past_the_retention_reads_as_zero,
    rate_limit_status_reads_without_consuming,
    near_rate_limit_fires_at_eighty_percent_and_resolves_below_seventy,
    alerts_watch_only_keys_that_work,
    high_error_rate_needs_twenty_outcomes_and_ten_percent,
    traffic_spike_compares_five_minutes_with_the_hour_before,
    a_key_newer_than_the_baseline_has_no_spike,
    watch_alerts_streams_firing_and_resolved,
    bad_usage_requests_name_their_fields,
);
