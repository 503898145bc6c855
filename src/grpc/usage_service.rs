//! `sendable.keys.v1.UsageService` over tonic, including the WatchAlerts stream.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::convert::{self, duration_micros, timestamp};
use super::pb;
use super::pb::usage_service_server::UsageService as UsageServiceApi;
use super::status::{invalid_argument, to_status};
use crate::domain::usage::{
    AlertKind, DayCounters, MAX_OUTCOMES_PER_BATCH, MAX_RESPONSE_TIME_US, UNKNOWN_ERROR_CODE,
    valid_error_code,
};
use crate::domain::{Decision, DomainError, KeyId, UtcDate, Violations};
use crate::service::UsageService;
use crate::service::usage::{AlertReading, KeyUsageReport, ReportedOutcome};
use crate::store::Store;
use crate::telemetry::{THROTTLED_LINES_PER_SECOND, Throttle};

/// Violations listed per RecordOutcomes call; past it, one summary entry (a 1000-entry
/// BadRequest helps nobody).
const MAX_LISTED_VIOLATIONS: usize = 20;

pub struct UsageGrpc<S> {
    service: Arc<UsageService<S>>,
    poll_interval: Duration,
    shutdown: watch::Receiver<bool>,
}

impl<S> UsageGrpc<S> {
    /// `shutdown` flips to true when the server stops: open WatchAlerts streams then end.
    pub fn new(
        service: Arc<UsageService<S>>,
        poll_interval: Duration,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        UsageGrpc {
            service,
            poll_interval,
            shutdown,
        }
    }
}

fn totals_proto(c: &DayCounters) -> pb::UsageTotals {
    pb::UsageTotals {
        requests: c.requests(),
        successes: c.successes,
        errors: c.errors,
        success_rate: c.success_rate(),
        error_rate: c.error_rate(),
        average_response_time: Some(duration_micros(c.average_response_time_us())),
        decisions: decisions(c),
        error_breakdown: c.error_breakdown().into_iter().collect(),
        p50_response_time: Some(duration_micros(c.percentile_us(0.50))),
        p95_response_time: Some(duration_micros(c.percentile_us(0.95))),
        p99_response_time: Some(duration_micros(c.percentile_us(0.99))),
        outcomes: c.outcomes(),
    }
}

/// Every decision that can be attributed to a key, zeros included, so dashboards see a
/// stable set of series.
fn decisions(c: &DayCounters) -> HashMap<String, u64> {
    Decision::ALL
        .into_iter()
        .filter(|d| d.is_attributed())
        .map(|d| (d.name().to_owned(), c.decision(d)))
        .collect()
}

fn daily_proto(date: UtcDate, c: &DayCounters) -> pb::DailyUsage {
    let t = totals_proto(c);
    pb::DailyUsage {
        date: date.to_string(),
        requests: t.requests,
        successes: t.successes,
        errors: t.errors,
        success_rate: t.success_rate,
        error_rate: t.error_rate,
        average_response_time: t.average_response_time,
        decisions: t.decisions,
        error_breakdown: t.error_breakdown,
        p50_response_time: t.p50_response_time,
        p95_response_time: t.p95_response_time,
        p99_response_time: t.p99_response_time,
        outcomes: t.outcomes,
    }
}

fn key_usage_proto(r: &KeyUsageReport) -> pb::KeyUsage {
    pb::KeyUsage {
        key_id: r.key.id.to_string(),
        last_used_time: r.key.last_used_ms.map(timestamp),
        total: Some(totals_proto(&r.total)),
        days: r.days.iter().map(|(d, c)| daily_proto(*d, c)).collect(),
    }
}

fn alert_kind_proto(kind: AlertKind) -> pb::AlertKind {
    match kind {
        AlertKind::TrafficSpike => pb::AlertKind::TrafficSpike,
        AlertKind::HighErrorRate => pb::AlertKind::HighErrorRate,
        AlertKind::NearRateLimit => pb::AlertKind::NearRateLimit,
    }
}

fn alert_proto(a: &AlertReading) -> pb::Alert {
    pb::Alert {
        kind: alert_kind_proto(a.reading.kind) as i32,
        session_id: a.session_id.to_string(),
        key_id: a.key_id.to_string(),
        value: a.reading.value,
        threshold: a.reading.threshold,
        since: a.since.map(timestamp),
        message: a.message.clone(),
    }
}

fn decode_outcomes(outcomes: Vec<pb::Outcome>) -> Result<Vec<ReportedOutcome>, Status> {
    if outcomes.len() > MAX_OUTCOMES_PER_BATCH {
        return Err(invalid_argument(&DomainError::invalid(
            "outcomes",
            format!(
                "at most {MAX_OUTCOMES_PER_BATCH} outcomes per call (got {}); split the batch",
                outcomes.len()
            ),
        )));
    }
    let mut v = Violations::new();
    let mut bad = 0usize;
    let mut decoded = Vec::with_capacity(outcomes.len());
    for (i, o) in outcomes.into_iter().enumerate() {
        let mut mine = Violations::new();
        let key_id = convert::key_id(&mut mine, &format!("outcomes[{i}].key_id"), &o.key_id);
        let response_time_us = match &o.response_time {
            Some(d) => {
                convert::duration_micros_of(&mut mine, &format!("outcomes[{i}].response_time"), d)
                    .filter(|us| {
                        let ok = *us <= MAX_RESPONSE_TIME_US;
                        if !ok {
                            mine.add(
                                format!("outcomes[{i}].response_time"),
                                "must be at most one hour",
                            );
                        }
                        ok
                    })
            }
            None => Some(0),
        };
        let time_ms = match &o.time {
            Some(t) => convert::millis_of(&mut mine, &format!("outcomes[{i}].time"), t).map(Some),
            None => Some(None),
        };
        let error_code = if o.success {
            String::new()
        } else if o.error_code.is_empty() {
            UNKNOWN_ERROR_CODE.to_owned()
        } else {
            if !valid_error_code(&o.error_code) {
                mine.add(
                    format!("outcomes[{i}].error_code"),
                    "must be at most 64 characters from [A-Za-z0-9._:-]",
                );
            }
            o.error_code
        };
        if mine.is_empty() {
            if let (Some(key_id), Some(response_time_us), Some(time_ms)) =
                (key_id, response_time_us, time_ms)
            {
                decoded.push(ReportedOutcome {
                    key_id,
                    success: o.success,
                    error_code,
                    response_time_us,
                    time_ms,
                });
            }
        } else {
            bad += 1;
            if bad <= MAX_LISTED_VIOLATIONS {
                v.extend(mine);
            }
        }
    }
    if bad > MAX_LISTED_VIOLATIONS {
        v.add(
            "outcomes",
            format!("{bad} outcomes are invalid; the first {MAX_LISTED_VIOLATIONS} are listed"),
        );
    }
    v.check().map_err(|e| invalid_argument(&e))?;
    Ok(decoded)
}

fn key_id(field: &str, text: &str) -> Result<KeyId, Status> {
    let mut v = Violations::new();
    let id = convert::key_id(&mut v, field, text);
    v.check().map_err(|e| invalid_argument(&e))?;
    id.ok_or_else(|| invalid_argument(&DomainError::invalid(field, "is required")))
}

fn session_id(text: &str) -> Result<crate::domain::SessionId, Status> {
    let mut v = Violations::new();
    let id = convert::session_id(&mut v, "session_id", text);
    v.check().map_err(|e| invalid_argument(&e))?;
    id.ok_or_else(|| invalid_argument(&DomainError::invalid("session_id", "is required")))
}

type AlertStream = Pin<Box<dyn Stream<Item = Result<pb::AlertEvent, Status>> + Send>>;

#[tonic::async_trait]
impl<S: Store> UsageServiceApi for UsageGrpc<S> {
    async fn record_outcomes(
        &self,
        request: Request<pb::RecordOutcomesRequest>,
    ) -> Result<Response<pb::RecordOutcomesResponse>, Status> {
        let outcomes = decode_outcomes(request.into_inner().outcomes)?;
        let result = self
            .service
            .record_outcomes(outcomes)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::RecordOutcomesResponse {
            accepted: result.accepted,
            rejected: result.rejected,
        }))
    }

    async fn get_key_usage(
        &self,
        request: Request<pb::GetKeyUsageRequest>,
    ) -> Result<Response<pb::KeyUsage>, Status> {
        let req = request.into_inner();
        let id = key_id("key_id", &req.key_id)?;
        let report = self
            .service
            .key_usage(&id, &req.start_date, &req.end_date)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(key_usage_proto(&report)))
    }

    async fn get_session_usage(
        &self,
        request: Request<pb::GetSessionUsageRequest>,
    ) -> Result<Response<pb::SessionUsage>, Status> {
        let req = request.into_inner();
        let id = session_id(&req.session_id)?;
        let report = self
            .service
            .session_usage(&id, &req.start_date, &req.end_date)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::SessionUsage {
            session_id: report.session_id.to_string(),
            total: Some(totals_proto(&report.total)),
            days: report
                .days
                .iter()
                .map(|(d, c)| daily_proto(*d, c))
                .collect(),
            keys: report.keys.iter().map(key_usage_proto).collect(),
            last_used_time: report.last_used_ms.map(timestamp),
        }))
    }

    async fn get_rate_limit_status(
        &self,
        request: Request<pb::GetRateLimitStatusRequest>,
    ) -> Result<Response<pb::RateLimitStatus>, Status> {
        let req = request.into_inner();
        let id = key_id("key_id", &req.key_id)?;
        let status = self
            .service
            .rate_limit_status(&id)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::RateLimitStatus {
            key_id: id.to_string(),
            limit: status.limit,
            used: status.used,
            remaining: status.remaining,
            reset_after: Some(convert::duration(status.reset_after_ms)),
        }))
    }

    async fn list_alerts(
        &self,
        request: Request<pb::ListAlertsRequest>,
    ) -> Result<Response<pb::ListAlertsResponse>, Status> {
        let id = session_id(&request.into_inner().session_id)?;
        let alerts = self
            .service
            .firing_alerts(&id)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::ListAlertsResponse {
            alerts: alerts.iter().map(alert_proto).collect(),
        }))
    }

    type WatchAlertsStream = AlertStream;

    async fn watch_alerts(
        &self,
        request: Request<pb::WatchAlertsRequest>,
    ) -> Result<Response<Self::WatchAlertsStream>, Status> {
        let id = session_id(&request.into_inner().session_id)?;
        // The first evaluation happens before the stream opens, so a bad session is a plain
        // NOT_FOUND and the client starts with the alerts already firing.
        let first = self
            .service
            .evaluate_alerts(&id)
            .await
            .map_err(|e| to_status(&e))?;
        let (tx, rx) = mpsc::channel(64);
        let service = self.service.clone();
        let poll = self.poll_interval;
        let mut shutdown = self.shutdown.clone();
        // A stream opened while the server is already draining ends at once.
        if *shutdown.borrow_and_update() {
            return Err(Status::unavailable("the server is shutting down"));
        }
        tokio::spawn(async move {
            let mut firing: HashMap<(KeyId, AlertKind), AlertReading> = HashMap::new();
            let mut readings = first;
            let mut ticker = tokio::time::interval(poll);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker.tick().await;
            metrics::gauge!("sendable_keys_alert_watchers").increment(1.0);
            'watch: loop {
                let now_firing: HashMap<(KeyId, AlertKind), AlertReading> = readings
                    .iter()
                    .filter(|r| r.reading.firing)
                    .map(|r| ((r.key_id, r.reading.kind), r.clone()))
                    .collect();
                let current: HashMap<(KeyId, AlertKind), &AlertReading> = readings
                    .iter()
                    .map(|r| ((r.key_id, r.reading.kind), r))
                    .collect();
                let mut events = Vec::new();
                for (k, alert) in &now_firing {
                    if !firing.contains_key(k) {
                        events.push((alert_proto(alert), pb::AlertState::Firing));
                    }
                }
                for (k, last) in &firing {
                    if !now_firing.contains_key(k) {
                        // Report the value that resolved it (or the last one seen, if the
                        // key went away: revoked or expired).
                        let mut alert = alert_proto(current.get(k).copied().unwrap_or(last));
                        alert.since = last.since.map(timestamp);
                        events.push((alert, pb::AlertState::Resolved));
                    }
                }
                firing = now_firing;
                for (alert, state) in events {
                    let event = pb::AlertEvent {
                        alert: Some(alert),
                        state: state as i32,
                    };
                    // A client that stopped reading blocks this send once the stream's
                    // buffers fill; shutdown must still end the stream, not wait for it.
                    let sent = tokio::select! {
                        sent = tx.send(Ok(event)) => sent.is_ok(),
                        _ = shutdown.changed() => false,
                    };
                    if !sent {
                        break 'watch;
                    }
                }
                tokio::select! {
                    _ = tx.closed() => break,
                    _ = shutdown.changed() => break,
                    _ = ticker.tick() => {}
                }
                readings = match service.evaluate_alerts(&id).await {
                    Ok(readings) => readings,
                    Err(crate::service::Error::Store(err)) if err.transient => {
                        // A blip: keep the stream and the known state, try at the next tick.
                        // Every open stream hits this on every tick of an outage.
                        static LOG: Throttle = Throttle::new(THROTTLED_LINES_PER_SECOND);
                        if let Some(suppressed) = LOG.admit() {
                            tracing::warn!(error = %err, session_id = %id, suppressed, "alert evaluation failed; retrying");
                        }
                        continue;
                    }
                    Err(err) => {
                        let _ = tx.send(Err(to_status(&err))).await;
                        break;
                    }
                };
            }
            metrics::gauge!("sendable_keys_alert_watchers").decrement(1.0);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
