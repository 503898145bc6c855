//! Proto <-> domain conversions. Decoding collects problems into [`Violations`] named after the
//! proto fields, so one INVALID_ARGUMENT lists everything wrong with a request.

use prost_types::{Duration, Timestamp};

use super::pb;
use crate::domain::time::MILLIS_PER_DAY;
use crate::domain::{
    Decision, Environment, KeyId, KeyRecord, KeyStatus, Millis, Plan, RateLimitState, SessionId,
    SessionRecord, VerifyOutcome, Violations,
};

/// Latest instant accepted in a request: 9999-12-31.
const MAX_TIMESTAMP_MS: Millis = 2_932_896 * MILLIS_PER_DAY;

pub fn timestamp(ms: Millis) -> Timestamp {
    Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

pub fn duration(ms: Millis) -> Duration {
    Duration {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// A duration with microsecond precision.
pub fn duration_micros(us: u64) -> Duration {
    Duration {
        seconds: (us / 1_000_000) as i64,
        nanos: ((us % 1_000_000) * 1000) as i32,
    }
}

/// A request timestamp as milliseconds (sub-millisecond digits are dropped).
pub fn millis_of(v: &mut Violations, field: &str, t: &Timestamp) -> Option<Millis> {
    if !(0..1_000_000_000).contains(&t.nanos) {
        v.add(field, "nanos must be between 0 and 999,999,999");
        return None;
    }
    match t.seconds.checked_mul(1000) {
        Some(ms) if (0..=MAX_TIMESTAMP_MS).contains(&ms) => {
            Some(ms + i64::from(t.nanos) / 1_000_000)
        }
        _ => {
            v.add(field, "must lie between 1970-01-01 and 9999-12-31");
            None
        }
    }
}

/// A request duration as non-negative milliseconds, rounded up to the millisecond.
pub fn duration_millis(v: &mut Violations, field: &str, d: &Duration) -> Option<Millis> {
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        v.add(field, "must be a non-negative duration");
        return None;
    }
    match d.seconds.checked_mul(1000) {
        Some(ms) if ms < i64::MAX / 2 => Some(ms + (i64::from(d.nanos) + 999_999) / 1_000_000),
        _ => {
            v.add(field, "is too long");
            None
        }
    }
}

/// A request duration as non-negative microseconds.
pub fn duration_micros_of(v: &mut Violations, field: &str, d: &Duration) -> Option<u64> {
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 || d.seconds > 86_400 * 365 {
        v.add(field, "must be a non-negative duration of at most a year");
        return None;
    }
    Some(d.seconds as u64 * 1_000_000 + (d.nanos as u64).div_ceil(1000))
}

pub fn session_id(v: &mut Violations, field: &str, text: &str) -> Option<SessionId> {
    let id = SessionId::parse(text);
    if id.is_none() {
        v.add(
            field,
            if text.is_empty() {
                "is required".to_owned()
            } else {
                "must be 1-64 characters from [A-Za-z0-9._-]".to_owned()
            },
        );
    }
    id
}

pub fn key_id(v: &mut Violations, field: &str, text: &str) -> Option<KeyId> {
    let id = KeyId::parse(text);
    if id.is_none() {
        v.add(
            field,
            if text.is_empty() {
                "is required".to_owned()
            } else {
                "must be the 8-character key id (the characters after sk_<env>_)".to_owned()
            },
        );
    }
    id
}

/// An environment that must be given.
pub fn environment(v: &mut Violations, field: &str, value: i32) -> Option<Environment> {
    match optional_environment(v, field, value) {
        Some(Some(env)) => Some(env),
        Some(None) => {
            v.add(
                field,
                "is required (ENVIRONMENT_DEV, ENVIRONMENT_STAGING or ENVIRONMENT_LIVE)",
            );
            None
        }
        None => None,
    }
}

/// An environment where UNSPECIFIED means "none" (`Some(None)`); `None` if the value is
/// unknown, which is recorded as a violation.
pub fn optional_environment(
    v: &mut Violations,
    field: &str,
    value: i32,
) -> Option<Option<Environment>> {
    if value == 0 {
        return Some(None);
    }
    let env = Environment::from_code(i64::from(value));
    if env.is_none() {
        v.add(field, format!("unknown environment value {value}"));
        return None;
    }
    Some(env)
}

pub fn plan(v: &mut Violations, field: &str, value: i32) -> Option<Plan> {
    match Plan::from_code(i64::from(value)) {
        Some(plan) => Some(plan),
        None if value == 0 => {
            v.add(
                field,
                "is required (PLAN_FREE, PLAN_STARTER, PLAN_PRO or PLAN_ENTERPRISE)",
            );
            None
        }
        None => {
            v.add(field, format!("unknown plan value {value}"));
            None
        }
    }
}

pub fn environment_proto(env: Environment) -> pb::Environment {
    match env {
        Environment::Dev => pb::Environment::Dev,
        Environment::Staging => pb::Environment::Staging,
        Environment::Live => pb::Environment::Live,
    }
}

pub fn plan_proto(plan: Plan) -> pb::Plan {
    match plan {
        Plan::Free => pb::Plan::Free,
        Plan::Starter => pb::Plan::Starter,
        Plan::Pro => pb::Plan::Pro,
        Plan::Enterprise => pb::Plan::Enterprise,
    }
}

pub fn decision_proto(decision: Decision) -> pb::Decision {
    match decision {
        Decision::Valid => pb::Decision::Valid,
        Decision::Malformed => pb::Decision::Malformed,
        Decision::NotFound => pb::Decision::NotFound,
        Decision::Revoked => pb::Decision::Revoked,
        Decision::Expired => pb::Decision::Expired,
        Decision::SessionDisabled => pb::Decision::SessionDisabled,
        Decision::EnvironmentMismatch => pb::Decision::EnvironmentMismatch,
        Decision::RateLimited => pb::Decision::RateLimited,
    }
}

pub fn session_proto(
    s: &SessionRecord,
    limits: Option<crate::domain::EffectiveLimits>,
) -> pb::Session {
    pb::Session {
        session_id: s.id.to_string(),
        environment: environment_proto(s.environment) as i32,
        plan: plan_proto(s.plan) as i32,
        enabled: s.enabled,
        rate_limit_per_minute: limits.map_or(0, |l| l.rate_limit_per_minute),
        max_keys: limits.map_or(0, |l| l.max_keys),
        active_keys: s.active_keys,
        create_time: Some(timestamp(s.create_ms)),
        update_time: Some(timestamp(s.update_ms)),
        custom_rate_limit_per_minute: s.custom_rate_limit,
        custom_max_keys: s.custom_max_keys,
    }
}

pub fn key_proto(k: &KeyRecord, now: Millis) -> pb::ApiKey {
    let status = match k.status_at(now) {
        KeyStatus::Active => pb::KeyStatus::Active,
        KeyStatus::Revoked => pb::KeyStatus::Revoked,
        KeyStatus::Expired => pb::KeyStatus::Expired,
    };
    pb::ApiKey {
        key_id: k.id.to_string(),
        session_id: k.session_id.to_string(),
        environment: environment_proto(k.environment) as i32,
        name: k.name.clone(),
        display_prefix: k.display_prefix(),
        status: status as i32,
        create_time: Some(timestamp(k.create_ms)),
        last_used_time: k.last_used_ms.map(timestamp),
        expire_time: k.expire_ms.map(timestamp),
        revoke_time: k.revoke_ms.map(timestamp),
        revoke_reason: k.revoke_reason.clone(),
        replaced_by_key_id: k.replaced_by.map(|id| id.to_string()).unwrap_or_default(),
    }
}

pub fn rate_limit_proto(r: &RateLimitState) -> pb::RateLimit {
    pb::RateLimit {
        limit: r.limit,
        remaining: r.remaining,
        reset_after: Some(duration(r.reset_after_ms)),
        retry_after: r.retry_after_ms.map(duration),
    }
}

pub fn verify_proto(o: &VerifyOutcome) -> pb::VerifyKeyResponse {
    pb::VerifyKeyResponse {
        decision: decision_proto(o.decision) as i32,
        valid: o.decision == Decision::Valid,
        key_id: o.key_id.map(|id| id.to_string()).unwrap_or_default(),
        session_id: o
            .session_id
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default(),
        environment: o.environment.map_or(0, |e| environment_proto(e) as i32),
        plan: o.plan.map_or(0, |p| plan_proto(p) as i32),
        rate_limit: o.rate_limit.as_ref().map(rate_limit_proto),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_and_bad_ones_are_reported() {
        let mut v = Violations::new();
        assert_eq!(
            millis_of(&mut v, "t", &timestamp(1_795_737_600_123)),
            Some(1_795_737_600_123)
        );
        assert_eq!(
            millis_of(
                &mut v,
                "t",
                &Timestamp {
                    seconds: -5,
                    nanos: 0
                }
            ),
            None
        );
        assert_eq!(
            millis_of(
                &mut v,
                "t",
                &Timestamp {
                    seconds: i64::MAX,
                    nanos: 0
                }
            ),
            None
        );
        assert_eq!(
            millis_of(
                &mut v,
                "t",
                &Timestamp {
                    seconds: 1,
                    nanos: -1
                }
            ),
            None
        );
        assert!(!v.is_empty());
    }

    #[test]
    fn durations_are_non_negative_and_round_up() {
        let mut v = Violations::new();
        assert_eq!(
            duration_millis(
                &mut v,
                "d",
                &Duration {
                    seconds: 1,
                    nanos: 1
                }
            ),
            Some(1001)
        );
        assert_eq!(
            duration_millis(&mut v, "d", &duration(90_000)),
            Some(90_000)
        );
        assert!(v.is_empty());
        assert_eq!(
            duration_millis(
                &mut v,
                "d",
                &Duration {
                    seconds: -1,
                    nanos: 0
                }
            ),
            None
        );
        assert_eq!(
            duration_millis(
                &mut v,
                "d",
                &Duration {
                    seconds: i64::MAX,
                    nanos: 0
                }
            ),
            None
        );
        assert_eq!(
            duration_micros_of(
                &mut v,
                "d",
                &Duration {
                    seconds: 0,
                    nanos: 1_500
                }
            ),
            Some(2)
        );
    }
}
