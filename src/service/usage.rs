//! The UsageService rules: reported outcomes, per-key and per-session statistics, the live
//! rate-limit window, and alert evaluation. Built on [`KeyService`] for key and session
//! lookups, so both services share one clock, one plan table and one store.

use std::collections::HashMap;
use std::sync::Arc;

use super::keys::KeyService;
use super::{Error, Result};
use crate::domain::ratelimit;
use crate::domain::time::Millis;
use crate::domain::usage::{
    AlertKind, BASELINE_MINUTES, DayCounters, KeyActivity, MAX_CLOCK_SKEW_MS,
    MAX_OUTCOMES_PER_BATCH, Outcome, RECENT_MINUTES, Reading, baseline_start, evaluate,
    oldest_kept_day,
};
use crate::domain::{DomainError, KeyId, KeyRecord, SessionId, UtcDate, Violations};
use crate::store::{AlertChange, Store};

/// Longest date range of a usage query, in days (inclusive of both ends).
pub const MAX_RANGE_DAYS: i32 = 366;

/// Most entries one `GetSessionUsage` answers: keys × (days + 1), each key counted once more
/// for its own details. An entry is ~115 bytes on the wire (60 keys over 332 days encode to
/// 2.3 MB), so this keeps an answer near 2.3 MB, under the 4 MiB that gRPC clients accept by
/// default (grpc-go, grpc-java, grpcurl); a session with many keys (Pro and Enterprise have no
/// key limit, and revoked keys stay listed) asks for fewer days.
pub const MAX_SESSION_KEY_DAYS: usize = 20_000;

/// An outcome as reported, before the time window check.
#[derive(Clone, Debug)]
pub struct ReportedOutcome {
    pub key_id: KeyId,
    pub success: bool,
    /// Normalised already: empty on success, a valid code (or `UNKNOWN`) on failure.
    pub error_code: String,
    pub response_time_us: u64,
    /// `None`: now.
    pub time_ms: Option<Millis>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordResult {
    pub accepted: u32,
    pub rejected: u32,
}

/// One key's statistics over a date range.
#[derive(Clone, Debug)]
pub struct KeyUsageReport {
    pub key: KeyRecord,
    pub days: Vec<(UtcDate, DayCounters)>,
    pub total: DayCounters,
}

#[derive(Clone, Debug)]
pub struct SessionUsageReport {
    pub session_id: SessionId,
    pub keys: Vec<KeyUsageReport>,
    pub days: Vec<(UtcDate, DayCounters)>,
    pub total: DayCounters,
    pub last_used_ms: Option<Millis>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimitReport {
    pub limit: u32,
    pub used: u32,
    pub remaining: u32,
    pub reset_after_ms: Millis,
}

/// One alert reading of one key: firing or not, with what was measured.
#[derive(Clone, Debug, PartialEq)]
pub struct AlertReading {
    pub key_id: KeyId,
    pub session_id: SessionId,
    pub reading: Reading,
    /// When it started firing (set while firing).
    pub since: Option<Millis>,
    pub message: String,
}

pub struct UsageService<S> {
    keys: Arc<KeyService<S>>,
}

impl<S: Store> UsageService<S> {
    pub fn new(keys: Arc<KeyService<S>>) -> Self {
        UsageService { keys }
    }

    fn retention_days(&self) -> u32 {
        self.keys.settings().usage_retention_days
    }

    /// Stores the outcomes of known keys whose time lies in the retention window (and not in
    /// the future, give or take clock skew); the rest are counted as rejected.
    pub async fn record_outcomes(&self, outcomes: Vec<ReportedOutcome>) -> Result<RecordResult> {
        if outcomes.len() > MAX_OUTCOMES_PER_BATCH {
            return Err(DomainError::invalid(
                "outcomes",
                format!(
                    "at most {MAX_OUTCOMES_PER_BATCH} outcomes per call (got {}); split the batch",
                    outcomes.len()
                ),
            )
            .into());
        }
        let now = self.keys.now();
        let oldest = oldest_kept_day(now, self.retention_days()).start_millis();
        let total = outcomes.len() as u32;
        let in_window: Vec<Outcome> = outcomes
            .into_iter()
            .filter_map(|o| {
                let time_ms = o.time_ms.unwrap_or(now);
                (oldest..=now + MAX_CLOCK_SKEW_MS)
                    .contains(&time_ms)
                    .then_some(Outcome {
                        key_id: o.key_id,
                        success: o.success,
                        error_code: o.error_code,
                        response_time_us: o.response_time_us,
                        time_ms,
                    })
            })
            .collect();
        let accepted = if in_window.is_empty() {
            0
        } else {
            self.keys
                .store()
                .record_outcomes(&in_window, now, self.retention_days())
                .await?
        };
        metrics::counter!("sendable_keys_outcomes_total", "result" => "accepted")
            .increment(u64::from(accepted));
        metrics::counter!("sendable_keys_outcomes_total", "result" => "rejected")
            .increment(u64::from(total - accepted));
        Ok(RecordResult {
            accepted,
            rejected: total - accepted,
        })
    }

    /// Parses and checks an inclusive `YYYY-MM-DD` range.
    pub fn date_range(start: &str, end: &str) -> Result<(UtcDate, UtcDate)> {
        let mut v = Violations::new();
        let parse = |v: &mut Violations, field: &str, text: &str| {
            let date = UtcDate::parse(text);
            if date.is_none() {
                v.add(field, "must be a date written YYYY-MM-DD (UTC)");
            }
            date
        };
        let from = parse(&mut v, "start_date", start);
        let to = parse(&mut v, "end_date", end);
        if let (Some(from), Some(to)) = (from, to) {
            let days = to.days_since_epoch() - from.days_since_epoch() + 1;
            if days < 1 {
                v.add("end_date", "must not be before start_date");
            } else if days > MAX_RANGE_DAYS {
                v.add(
                    "end_date",
                    format!("the range may span at most {MAX_RANGE_DAYS} days"),
                );
            }
        }
        v.check()?;
        match (from, to) {
            (Some(from), Some(to)) => Ok((from, to)),
            _ => Err(DomainError::invalid("start_date", "is required").into()),
        }
    }

    pub async fn key_usage(&self, id: &KeyId, start: &str, end: &str) -> Result<KeyUsageReport> {
        let (from, to) = Self::date_range(start, end)?;
        let key = self.keys.get_key(id).await?;
        let mut reports = self.reports(vec![key], from, to).await?;
        reports.pop().ok_or_else(|| {
            Error::Store(crate::store::StoreError::permanent(
                "usage of one key missing",
            ))
        })
    }

    /// Every key of the session (revoked and expired ones included), summed.
    pub async fn session_usage(
        &self,
        session_id: &SessionId,
        start: &str,
        end: &str,
    ) -> Result<SessionUsageReport> {
        let (from, to) = Self::date_range(start, end)?;
        self.keys.get_session(session_id).await?;
        let keys = self.all_keys(session_id).await?;
        let span = usize::try_from(to.days_since_epoch() - from.days_since_epoch() + 1)
            .unwrap_or(usize::MAX);
        if let Some(why) = session_usage_too_large(keys.len(), span) {
            return Err(DomainError::invalid("end_date", why).into());
        }
        let reports = self.reports(keys, from, to).await?;
        let mut days: Vec<(UtcDate, DayCounters)> = dates(from, to)
            .into_iter()
            .map(|d| (d, DayCounters::default()))
            .collect();
        let mut total = DayCounters::default();
        let mut last_used_ms = None;
        for report in &reports {
            for (sum, (_, day)) in days.iter_mut().zip(&report.days) {
                sum.1.add(day);
            }
            total.add(&report.total);
            last_used_ms = last_used_ms.max(report.key.last_used_ms);
        }
        Ok(SessionUsageReport {
            session_id: session_id.clone(),
            keys: reports,
            days,
            total,
            last_used_ms,
        })
    }

    async fn reports(
        &self,
        keys: Vec<KeyRecord>,
        from: UtcDate,
        to: UtcDate,
    ) -> Result<Vec<KeyUsageReport>> {
        let ids: Vec<KeyId> = keys.iter().map(|k| k.id).collect();
        // Days past the retention count as empty on every store, whether or not the store
        // has dropped them yet (Redis TTLs run on Redis's clock, the memory store prunes on
        // write), so the answer depends only on the date and the retention setting.
        let oldest = oldest_kept_day(self.keys.now(), self.retention_days());
        let dates = dates(from, to);
        let kept_from = from.max(oldest);
        let counters = if kept_from <= to {
            self.keys.store().usage_days(&ids, kept_from, to).await?
        } else {
            vec![Vec::new(); ids.len()]
        };
        Ok(keys
            .into_iter()
            .zip(counters)
            .map(|(key, kept)| {
                let missing = dates.len() - kept.len();
                let per_day: Vec<DayCounters> =
                    std::iter::repeat_n(DayCounters::default(), missing)
                        .chain(kept)
                        .collect();
                let mut total = DayCounters::default();
                per_day.iter().for_each(|d| total.add(d));
                KeyUsageReport {
                    key,
                    days: dates.iter().copied().zip(per_day).collect(),
                    total,
                }
            })
            .collect())
    }

    async fn all_keys(&self, session_id: &SessionId) -> Result<Vec<KeyRecord>> {
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let page = self.keys.store().list_keys(session_id, after, 1000).await?;
            let done = page.len() < 1000;
            after = page.last().map(|k| crate::store::KeyCursor {
                create_ms: k.create_ms,
                key_id: k.id,
            });
            all.extend(page);
            if done {
                return Ok(all);
            }
        }
    }

    /// The current window, read without consuming anything.
    pub async fn rate_limit_status(&self, id: &KeyId) -> Result<RateLimitReport> {
        let key = self.keys.get_key(id).await?;
        let session = self.keys.get_session(&key.session_id).await?;
        let now = self.keys.now();
        let limit = self.limit_of(&session);
        let activity = self.keys.store().recent_activity(&[*id], now, 1).await?;
        let window = activity.first().map(|a| a.window).unwrap_or_default();
        let (used, remaining, reset_after_ms) = ratelimit::peek(window, now, limit);
        Ok(RateLimitReport {
            limit,
            used,
            remaining,
            reset_after_ms,
        })
    }

    fn limit_of(&self, session: &crate::domain::SessionRecord) -> u32 {
        self.keys
            .plans()
            .effective(
                session.plan,
                session.custom_rate_limit,
                session.custom_max_keys,
            )
            .map_or(0, |l| l.rate_limit_per_minute)
    }

    /// Evaluates every alert of every active key of the session, records state changes (so the
    /// hysteresis survives restarts and is shared by replicas) and returns all readings.
    pub async fn evaluate_alerts(&self, session_id: &SessionId) -> Result<Vec<AlertReading>> {
        let session = self.keys.get_session(session_id).await?;
        let now = self.keys.now();
        let limit = self.limit_of(&session);
        let mut keys = self.keys.store().live_keys(session_id, now).await?;
        // Readings in one order, whichever store answered.
        keys.sort_by_key(|k| (k.create_ms, k.id));
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<KeyId> = keys.iter().map(|k| k.id).collect();
        let activity = self
            .keys
            .store()
            .recent_activity(&ids, now, RECENT_MINUTES + BASELINE_MINUTES)
            .await?;
        let thresholds = &self.keys.settings().alerts;
        let mut readings = Vec::new();
        let mut changes = Vec::new();
        for (key, recent) in keys.iter().zip(activity) {
            let (used, _, _) = ratelimit::peek(recent.window, now, limit);
            let used_fraction = ratelimit::used_fraction(recent.window, now, limit);
            let measured = KeyActivity {
                no_baseline: key.create_ms > baseline_start(now),
                ..KeyActivity::from_minutes(used_fraction, &recent.minutes)
            };
            let firing: HashMap<AlertKind, Millis> = recent.firing.iter().copied().collect();
            for reading in evaluate(&measured, thresholds, |kind| firing.contains_key(&kind)) {
                let was = firing.get(&reading.kind).copied();
                let since = match (reading.firing, was) {
                    (true, Some(since)) => Some(since),
                    (true, None) => {
                        changes.push(AlertChange {
                            key_id: key.id,
                            kind: reading.kind,
                            since: Some(now),
                        });
                        Some(now)
                    }
                    (false, Some(_)) => {
                        changes.push(AlertChange {
                            key_id: key.id,
                            kind: reading.kind,
                            since: None,
                        });
                        None
                    }
                    (false, None) => None,
                };
                readings.push(AlertReading {
                    key_id: key.id,
                    session_id: session_id.clone(),
                    message: describe(key, &reading, &measured, used, limit),
                    reading,
                    since,
                });
            }
        }
        self.keys.store().update_alerts(&changes).await?;
        for change in &changes {
            let state = if change.since.is_some() {
                "firing"
            } else {
                "resolved"
            };
            metrics::counter!("sendable_keys_alert_transitions_total", "kind" => change.kind.code(), "state" => state)
                .increment(1);
        }
        Ok(readings)
    }

    /// The alerts firing now.
    pub async fn firing_alerts(&self, session_id: &SessionId) -> Result<Vec<AlertReading>> {
        Ok(self
            .evaluate_alerts(session_id)
            .await?
            .into_iter()
            .filter(|r| r.reading.firing)
            .collect())
    }
}

fn describe(key: &KeyRecord, r: &Reading, a: &KeyActivity, used: u32, limit: u32) -> String {
    let key = key.display_prefix();
    match r.kind {
        AlertKind::NearRateLimit => format!(
            "{key} used {used} of its {limit} requests per minute ({:.0}%; alert at {:.0}%)",
            r.value * 100.0,
            r.threshold * 100.0
        ),
        AlertKind::HighErrorRate => format!(
            "{key}: {} of {} outcomes reported in the last {RECENT_MINUTES} minutes failed ({:.1}%; alert at {:.1}%)",
            a.recent_errors,
            a.recent_outcomes,
            r.value * 100.0,
            r.threshold * 100.0
        ),
        AlertKind::TrafficSpike => format!(
            "{key}: {} requests in the last {RECENT_MINUTES} minutes, {:.1}x the rate of the hour before ({} requests; alert at {:.1}x)",
            a.recent_requests, r.value, a.baseline_requests, r.threshold
        ),
    }
}

fn dates(from: UtcDate, to: UtcDate) -> Vec<UtcDate> {
    UtcDate::range(from, to).collect()
}

/// Why one `GetSessionUsage` answer for `keys` keys over `span` days would be too large, if
/// it would (see [`MAX_SESSION_KEY_DAYS`]): how many days fit, or, for a session past the
/// bound's number of keys, where to read its usage instead.
fn session_usage_too_large(keys: usize, span: usize) -> Option<String> {
    let entries = keys.saturating_mul(span.saturating_add(1));
    if entries <= MAX_SESSION_KEY_DAYS {
        return None;
    }
    let most = (MAX_SESSION_KEY_DAYS / keys.max(1)).saturating_sub(1);
    Some(if most == 0 {
        format!(
            "the session has {keys} keys (revoked ones included), more than one answer holds \
             even for a single day: read its keys' usage with GetKeyUsage"
        )
    } else {
        format!(
            "the session has {keys} keys, more than one answer holds over {span} days: ask \
             for at most {most} days at a time"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bound, including the sessions the gRPC test cannot build cheaply: past 10 000 keys
    /// not even one day fits, and the answer says where to read the usage instead.
    #[test]
    fn session_usage_is_bounded_in_entries() {
        assert_eq!(session_usage_too_large(60, 332), None);
        assert_eq!(session_usage_too_large(10_000, 1), None);
        let days = session_usage_too_large(60, 366).expect("60 x 367 entries");
        assert!(days.contains("at most 332 days"), "{days}");
        let keys = session_usage_too_large(10_001, 1).expect("10 001 x 2 entries");
        assert!(keys.contains("GetKeyUsage"), "{keys}");
        assert!(session_usage_too_large(usize::MAX, usize::MAX).is_some());
    }
}
