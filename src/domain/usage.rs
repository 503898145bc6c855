//! Usage statistics and alerts: what is counted per key and UTC day, how reported outcomes
//! become averages and percentiles, and when an alert fires or resolves. Pure arithmetic; the
//! stores keep the counters and the services read them through these types.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::decision::Decision;
use super::key::KeyId;
use super::time::{MILLIS_PER_HOUR, MILLIS_PER_MINUTE, Millis, UtcDate};

/// Upper bounds (ms) of the response-time histogram buckets; a last bucket holds everything
/// slower than 10 s. Fixed, so buckets from different days and keys add up.
pub const BUCKET_BOUNDS_MS: [u64; 13] =
    [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000];
pub const BUCKETS: usize = BUCKET_BOUNDS_MS.len() + 1;

/// Longest error code a caller may report.
pub const MAX_ERROR_CODE_LEN: usize = 64;
/// Code recorded for a failure reported without one.
pub const UNKNOWN_ERROR_CODE: &str = "UNKNOWN";
/// Distinct error codes kept per key and UTC day, and per usage answer. A caller that puts
/// request ids or timestamps in its codes would otherwise add a stored field per failure
/// (~120 bytes each in Redis, kept for the whole retention) and an entry per failure to every
/// usage answer. The Redis script holds the same number.
pub const MAX_ERROR_CODES: usize = 100;
/// Where failures past [`MAX_ERROR_CODES`] are counted.
pub const OTHER_ERROR_CODE: &str = "OTHER";
/// Outcomes per RecordOutcomes call.
pub const MAX_OUTCOMES_PER_BATCH: usize = 1000;
/// Reported times may run this far ahead of our clock (the callers' clocks drift too).
pub const MAX_CLOCK_SKEW_MS: Millis = 5 * MILLIS_PER_MINUTE;
/// Longest response time accepted (one hour); anything slower is a reporting bug.
pub const MAX_RESPONSE_TIME_US: u64 = 3_600_000_000;

/// Per-minute counters are kept this long: the alert with the longest look-back (traffic
/// spike: 5 + 60 minutes) needs 65 minutes; two hours leaves room.
pub const MINUTE_RETENTION_MS: Millis = 2 * MILLIS_PER_HOUR;
/// Minutes of the "recent" alert window.
pub const RECENT_MINUTES: usize = 5;
/// Minutes of the traffic-spike baseline before the recent window.
pub const BASELINE_MINUTES: usize = 60;

/// The oldest day whose usage is kept at `now`: counters live `retention_days` past the end
/// of their day (the Redis TTL), so today and the `retention_days` days before it.
pub fn oldest_kept_day(now: Millis, retention_days: u32) -> UtcDate {
    UtcDate::from_days(UtcDate::from_millis(now).days_since_epoch() - retention_days as i32)
}

/// The histogram bucket of a response time.
pub fn bucket_of(response_time_us: u64) -> usize {
    BUCKET_BOUNDS_MS
        .iter()
        .position(|bound| response_time_us <= bound * 1000)
        .unwrap_or(BUCKETS - 1)
}

/// An error code is short and from `[A-Za-z0-9._:-]` (HTTP statuses, gRPC codes, `TIMEOUT`):
/// it becomes part of a storage field name and a map key in responses.
pub fn valid_error_code(code: &str) -> bool {
    code.len() <= MAX_ERROR_CODE_LEN
        && code
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// One reported outcome, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub key_id: KeyId,
    pub success: bool,
    /// Empty for successes; the reported code (or `UNKNOWN`) for failures.
    pub error_code: String,
    pub response_time_us: u64,
    pub time_ms: Millis,
}

/// Everything counted for one key on one UTC day.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DayCounters {
    /// VerifyKey calls per decision code (index = `Decision::code()`).
    pub decisions: [u64; 9],
    pub successes: u64,
    pub errors: u64,
    pub response_time_sum_us: u64,
    pub response_time_max_us: u64,
    pub buckets: [u64; BUCKETS],
    pub error_codes: BTreeMap<String, u64>,
}

impl DayCounters {
    pub fn add(&mut self, other: &DayCounters) {
        for (a, b) in self.decisions.iter_mut().zip(other.decisions) {
            *a += b;
        }
        self.successes += other.successes;
        self.errors += other.errors;
        self.response_time_sum_us += other.response_time_sum_us;
        self.response_time_max_us = self.response_time_max_us.max(other.response_time_max_us);
        for (a, b) in self.buckets.iter_mut().zip(other.buckets) {
            *a += b;
        }
        for (code, n) in &other.error_codes {
            *self.error_codes.entry(code.clone()).or_default() += n;
        }
    }

    /// Counts one outcome (the in-memory store's write path; Redis does the same in Lua).
    pub fn record(&mut self, outcome: &Outcome) {
        if outcome.success {
            self.successes += 1;
        } else {
            self.errors += 1;
            let known = self.error_codes.contains_key(&outcome.error_code);
            let code = if known || self.error_codes.len() < MAX_ERROR_CODES {
                outcome.error_code.clone()
            } else {
                OTHER_ERROR_CODE.to_owned()
            };
            *self.error_codes.entry(code).or_default() += 1;
        }
        self.response_time_sum_us += outcome.response_time_us;
        self.response_time_max_us = self.response_time_max_us.max(outcome.response_time_us);
        self.buckets[bucket_of(outcome.response_time_us)] += 1;
    }

    /// The error codes to report: all of them, or, when days or keys added up to more than
    /// [`MAX_ERROR_CODES`] codes, the most frequent ones with the rest summed under
    /// [`OTHER_ERROR_CODE`] (as one day keeps them). The counts always add up to the failures
    /// recorded.
    pub fn error_breakdown(&self) -> BTreeMap<String, u64> {
        let named =
            self.error_codes.len() - usize::from(self.error_codes.contains_key(OTHER_ERROR_CODE));
        if named <= MAX_ERROR_CODES {
            return self.error_codes.clone();
        }
        let mut by_count: Vec<(&String, u64)> = self
            .error_codes
            .iter()
            .filter(|(code, _)| code.as_str() != OTHER_ERROR_CODE)
            .map(|(code, n)| (code, *n))
            .collect();
        // Most frequent first; ties by name, so the answer does not depend on map order.
        by_count.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        let mut out = BTreeMap::new();
        let mut other = self.error_codes.get(OTHER_ERROR_CODE).copied().unwrap_or(0);
        for (i, (code, n)) in by_count.into_iter().enumerate() {
            if i < MAX_ERROR_CODES {
                out.insert(code.clone(), n);
            } else {
                other += n;
            }
        }
        out.insert(OTHER_ERROR_CODE.to_owned(), other);
        out
    }

    /// VerifyKey calls attributed to the key (every decision but MALFORMED and NOT_FOUND).
    pub fn requests(&self) -> u64 {
        self.decisions.iter().sum()
    }

    pub fn outcomes(&self) -> u64 {
        self.successes + self.errors
    }

    /// successes / (successes + errors); 0 when nothing was reported.
    pub fn success_rate(&self) -> f64 {
        ratio(self.successes, self.outcomes())
    }

    pub fn error_rate(&self) -> f64 {
        ratio(self.errors, self.outcomes())
    }

    /// Mean reported response time in microseconds (0 without outcomes).
    pub fn average_response_time_us(&self) -> u64 {
        self.response_time_sum_us
            .checked_div(self.outcomes())
            .unwrap_or(0)
    }

    /// The `q`-quantile (0 < q <= 1) of reported response times, as the upper bound of the
    /// bucket holding it (the slowest observed time for the open-ended last bucket, and never
    /// more than it); 0 without outcomes.
    pub fn percentile_us(&self, q: f64) -> u64 {
        let total: u64 = self.buckets.iter().sum();
        if total == 0 {
            return 0;
        }
        // The rank of the quantile, 1-based: the smallest n with n >= q * total.
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, count) in self.buckets.iter().enumerate() {
            seen += count;
            if seen >= rank {
                let upper = BUCKET_BOUNDS_MS
                    .get(i)
                    .map_or(self.response_time_max_us, |b| b * 1000);
                return upper.min(self.response_time_max_us.max(1));
            }
        }
        self.response_time_max_us
    }

    /// Count of one decision.
    pub fn decision(&self, decision: Decision) -> u64 {
        self.decisions[usize::from(decision.code())]
    }
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// Counters of one minute, for alerts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MinuteCounters {
    pub requests: u64,
    pub outcomes: u64,
    pub errors: u64,
}

/// The minute index (minutes since the epoch) of an instant.
pub fn minute_of(ms: Millis) -> i64 {
    ms.div_euclid(MILLIS_PER_MINUTE)
}

/// The minute indices of the last `minutes` minutes up to `now` (oldest first).
pub fn recent_minute_range(now: Millis, minutes: usize) -> std::ops::RangeInclusive<i64> {
    let last = minute_of(now);
    (last - minutes as i64 + 1)..=last
}

/// The counters of the last `minutes` minutes up to `now`, oldest first, from `lookup`;
/// minutes older than [`MINUTE_RETENTION_MS`] read as zero whatever a store still holds, so
/// both stores answer alike.
pub fn recent_minutes(
    now: Millis,
    minutes: usize,
    lookup: impl Fn(i64) -> Option<MinuteCounters>,
) -> Vec<MinuteCounters> {
    let oldest = minute_of(now - MINUTE_RETENTION_MS);
    recent_minute_range(now, minutes)
        .map(|m| if m < oldest { None } else { lookup(m) }.unwrap_or_default())
        .collect()
}

/// The kinds of alert.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AlertKind {
    TrafficSpike,
    HighErrorRate,
    NearRateLimit,
}

impl AlertKind {
    pub const ALL: [AlertKind; 3] = [
        AlertKind::TrafficSpike,
        AlertKind::HighErrorRate,
        AlertKind::NearRateLimit,
    ];

    /// Stable short name used in storage.
    pub fn code(self) -> &'static str {
        match self {
            AlertKind::TrafficSpike => "spike",
            AlertKind::HighErrorRate => "errors",
            AlertKind::NearRateLimit => "near",
        }
    }

    pub fn from_code(code: &str) -> Option<Self> {
        AlertKind::ALL.into_iter().find(|k| k.code() == code)
    }
}

/// A firing threshold and the lower one that resolves it (hysteresis: between the two an alert
/// keeps its state, so a value hovering around the line does not flap).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hysteresis {
    pub fire: f64,
    pub resolve: f64,
}

/// NEAR_RATE_LIMIT: fraction of the limit used in the current window.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NearRateLimit {
    pub fire: f64,
    pub resolve: f64,
}

/// HIGH_ERROR_RATE: failed share of the outcomes reported over the last 5 minutes.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HighErrorRate {
    pub fire: f64,
    pub resolve: f64,
    /// Outcomes needed in the last 5 minutes before the rate means anything.
    pub min_outcomes: u64,
}

/// TRAFFIC_SPIKE: the last 5 minutes' request rate over the preceding hour's.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficSpike {
    pub fire: f64,
    pub resolve: f64,
    /// Requests needed in the last 5 minutes.
    pub min_requests: u64,
}

impl NearRateLimit {
    pub fn levels(&self) -> Hysteresis {
        Hysteresis {
            fire: self.fire,
            resolve: self.resolve,
        }
    }
}

impl HighErrorRate {
    pub fn levels(&self) -> Hysteresis {
        Hysteresis {
            fire: self.fire,
            resolve: self.resolve,
        }
    }
}

impl TrafficSpike {
    pub fn levels(&self) -> Hysteresis {
        Hysteresis {
            fire: self.fire,
            resolve: self.resolve,
        }
    }
}

/// Alert thresholds (`SENDABLE_KEYS_ALERTS_FILE` overrides any of them).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AlertThresholds {
    pub near_rate_limit: NearRateLimit,
    pub high_error_rate: HighErrorRate,
    pub traffic_spike: TrafficSpike,
}

impl Default for AlertThresholds {
    fn default() -> Self {
        AlertThresholds {
            near_rate_limit: NearRateLimit {
                fire: 0.8,
                resolve: 0.7,
            },
            high_error_rate: HighErrorRate {
                fire: 0.10,
                resolve: 0.05,
                min_outcomes: 20,
            },
            traffic_spike: TrafficSpike {
                fire: 3.0,
                resolve: 2.0,
                min_requests: 100,
            },
        }
    }
}

impl AlertThresholds {
    /// Reads an alerts file: optional `[near_rate_limit]`, `[high_error_rate]` and
    /// `[traffic_spike]` tables, each complete (`fire`, `resolve` and the minimum count where
    /// there is one).
    pub fn from_toml(text: &str) -> Result<Self, String> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            near_rate_limit: Option<NearRateLimit>,
            high_error_rate: Option<HighErrorRate>,
            traffic_spike: Option<TrafficSpike>,
        }
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut t = AlertThresholds::default();
        if let Some(v) = file.near_rate_limit {
            t.near_rate_limit = v;
        }
        if let Some(v) = file.high_error_rate {
            t.high_error_rate = v;
        }
        if let Some(v) = file.traffic_spike {
            t.traffic_spike = v;
        }
        for (name, levels) in [
            ("near_rate_limit", t.near_rate_limit.levels()),
            ("high_error_rate", t.high_error_rate.levels()),
            ("traffic_spike", t.traffic_spike.levels()),
        ] {
            if !(levels.fire.is_finite() && levels.resolve.is_finite())
                || levels.resolve <= 0.0
                || levels.resolve >= levels.fire
            {
                return Err(format!(
                    "[{name}] needs 0 < resolve < fire (got fire = {}, resolve = {})",
                    levels.fire, levels.resolve
                ));
            }
        }
        Ok(t)
    }
}

/// What one key did recently, as the alerts need it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KeyActivity {
    /// Fraction of its rate limit the key uses in the current window.
    pub limit_used: f64,
    /// Attributed VerifyKey calls in the last [`RECENT_MINUTES`] minutes (current one included).
    pub recent_requests: u64,
    /// Calls in the [`BASELINE_MINUTES`] minutes before those.
    pub baseline_requests: u64,
    /// Outcomes and failed outcomes in the last [`RECENT_MINUTES`] minutes.
    pub recent_outcomes: u64,
    pub recent_errors: u64,
    /// The key did not exist yet when the baseline began ([`baseline_start`]): with no hour
    /// of its own to compare with, a new key (a rotation's replacement included) taking its
    /// traffic is not a spike, so TRAFFIC_SPIKE is not judged.
    pub no_baseline: bool,
}

/// When the traffic-spike baseline of an evaluation at `now` begins: the start of the minute
/// [`RECENT_MINUTES`] + [`BASELINE_MINUTES`] - 1 minutes before the current one.
pub fn baseline_start(now: Millis) -> Millis {
    (minute_of(now) - (RECENT_MINUTES + BASELINE_MINUTES) as i64 + 1) * MILLIS_PER_MINUTE
}

impl KeyActivity {
    /// Sums per-minute counters: `minutes[i]` is the minute `now_minute - (len - 1) + i`, the
    /// last being the current minute.
    pub fn from_minutes(limit_used: f64, minutes: &[MinuteCounters]) -> Self {
        let recent_start = minutes.len().saturating_sub(RECENT_MINUTES);
        let baseline_from = recent_start.saturating_sub(BASELINE_MINUTES);
        let recent = &minutes[recent_start..];
        KeyActivity {
            limit_used,
            recent_requests: recent.iter().map(|m| m.requests).sum(),
            baseline_requests: minutes[baseline_from..recent_start]
                .iter()
                .map(|m| m.requests)
                .sum(),
            recent_outcomes: recent.iter().map(|m| m.outcomes).sum(),
            recent_errors: recent.iter().map(|m| m.errors).sum(),
            no_baseline: false,
        }
    }

    /// The recent request rate over the baseline rate, both per minute. The baseline is floored
    /// at one request per minute, so a key waking from silence compares with a token baseline
    /// rather than dividing by zero.
    pub fn spike_factor(&self) -> f64 {
        let recent = self.recent_requests as f64 / RECENT_MINUTES as f64;
        let baseline = (self.baseline_requests as f64 / BASELINE_MINUTES as f64).max(1.0);
        recent / baseline
    }

    pub fn error_rate(&self) -> f64 {
        ratio(self.recent_errors, self.recent_outcomes)
    }
}

/// One alert's reading for one key: its value, its firing threshold, and whether it fires now
/// given whether it fired before.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Reading {
    pub kind: AlertKind,
    pub value: f64,
    pub threshold: f64,
    pub firing: bool,
}

/// Applies the thresholds with hysteresis. `was_firing(kind)` is the stored state.
///
/// - NEAR_RATE_LIMIT fires at `limit_used >= fire`, resolves below `resolve`.
/// - HIGH_ERROR_RATE fires at `error_rate >= fire` with at least `min_outcomes` outcomes;
///   resolves below `resolve`, or when fewer than half the minimum remain (too little to judge).
/// - TRAFFIC_SPIKE fires at `spike_factor >= fire` with at least `min_requests` recent
///   requests; resolves below `resolve`, or below half the minimum; never for a key with no
///   baseline yet (`KeyActivity::no_baseline`).
pub fn evaluate(
    activity: &KeyActivity,
    thresholds: &AlertThresholds,
    was_firing: impl Fn(AlertKind) -> bool,
) -> [Reading; 3] {
    let decide = |kind: AlertKind, value: f64, levels: Hysteresis, count: u64, min: u64| {
        let judged = kind != AlertKind::TrafficSpike || !activity.no_baseline;
        let firing = judged
            && if was_firing(kind) {
                value >= levels.resolve && count * 2 >= min
            } else {
                value >= levels.fire && count >= min
            };
        Reading {
            kind,
            value,
            threshold: levels.fire,
            firing,
        }
    };
    let t = thresholds;
    [
        decide(
            AlertKind::TrafficSpike,
            activity.spike_factor(),
            t.traffic_spike.levels(),
            activity.recent_requests,
            t.traffic_spike.min_requests,
        ),
        decide(
            AlertKind::HighErrorRate,
            activity.error_rate(),
            t.high_error_rate.levels(),
            activity.recent_outcomes,
            t.high_error_rate.min_outcomes,
        ),
        decide(
            AlertKind::NearRateLimit,
            activity.limit_used,
            t.near_rate_limit.levels(),
            1,
            0,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(success: bool, ms: u64, code: &str) -> Outcome {
        Outcome {
            key_id: KeyId::parse("AbCd1234").expect("valid"),
            success,
            error_code: code.to_owned(),
            response_time_us: ms * 1000,
            time_ms: 0,
        }
    }

    #[test]
    fn averages_rates_and_percentiles_from_known_outcomes() {
        let mut day = DayCounters::default();
        // 90 fast successes (3 ms), 10 slow failures (700 ms).
        for _ in 0..90 {
            day.record(&outcome(true, 3, ""));
        }
        for i in 0..10 {
            day.record(&outcome(false, 700, if i < 7 { "500" } else { "TIMEOUT" }));
        }
        assert_eq!((day.successes, day.errors, day.outcomes()), (90, 10, 100));
        assert_eq!(day.success_rate(), 0.9);
        assert_eq!(day.error_rate(), 0.1);
        assert_eq!(
            day.average_response_time_us(),
            (90 * 3_000 + 10 * 700_000) / 100
        );
        assert_eq!(
            day.percentile_us(0.50),
            5_000,
            "3 ms falls in the (2, 5] ms bucket"
        );
        assert_eq!(day.percentile_us(0.90), 5_000);
        assert_eq!(
            day.percentile_us(0.95),
            700_000,
            "capped by the slowest observed"
        );
        assert_eq!(day.percentile_us(0.99), 700_000);
        assert_eq!(day.error_codes.get("500"), Some(&7));
        assert_eq!(day.error_codes.get("TIMEOUT"), Some(&3));
        let mut sum = day.clone();
        sum.add(&day);
        assert_eq!((sum.outcomes(), sum.percentile_us(0.5)), (200, 5_000));
        assert_eq!(DayCounters::default().percentile_us(0.99), 0);
    }

    #[test]
    fn buckets_cover_every_time() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(1_000), 0);
        assert_eq!(bucket_of(1_001), 1);
        assert_eq!(bucket_of(10_000_000), BUCKETS - 2);
        assert_eq!(bucket_of(10_000_001), BUCKETS - 1);
        let mut slow = DayCounters::default();
        slow.record(&outcome(true, 42_000, ""));
        assert_eq!(slow.percentile_us(0.5), 42_000_000);
    }

    #[test]
    fn a_day_keeps_a_bounded_number_of_error_codes() {
        let mut day = DayCounters::default();
        for i in 0..150 {
            day.record(&outcome(false, 1, &format!("E{i:03}")));
        }
        // A code first seen past the cap stays in OTHER, however frequent it becomes.
        for _ in 0..50 {
            day.record(&outcome(false, 1, "E149"));
        }
        day.record(&outcome(false, 1, "E000"));
        assert_eq!(day.error_codes.len(), MAX_ERROR_CODES + 1);
        assert_eq!(day.error_codes.get("E000"), Some(&2));
        assert_eq!(day.error_codes.get("E099"), Some(&1));
        assert_eq!(day.error_codes.get("E100"), None);
        assert_eq!(day.error_codes.get(OTHER_ERROR_CODE), Some(&100));
        assert_eq!(day.error_codes.values().sum::<u64>(), day.errors);
        assert_eq!(day.error_breakdown(), day.error_codes);
    }

    #[test]
    fn an_answer_over_many_days_reports_the_most_frequent_codes() {
        let mut total = DayCounters::default();
        for (prefix, times) in [("A", 1), ("B", 2)] {
            let mut day = DayCounters::default();
            for i in 0..100 {
                for _ in 0..times {
                    day.record(&outcome(false, 1, &format!("{prefix}{i:03}")));
                }
            }
            total.add(&day);
        }
        assert_eq!(total.error_codes.len(), 200);
        let breakdown = total.error_breakdown();
        assert_eq!(breakdown.len(), MAX_ERROR_CODES + 1);
        // The 100 most frequent (B000..B099, twice each) by name; the A codes in OTHER.
        assert_eq!(breakdown.get("B000"), Some(&2));
        assert_eq!(breakdown.get("B099"), Some(&2));
        assert_eq!(breakdown.get("A000"), None);
        assert_eq!(breakdown.get(OTHER_ERROR_CODE), Some(&100));
        assert_eq!(breakdown.values().sum::<u64>(), total.errors);
    }

    #[test]
    fn error_codes_are_restricted() {
        for ok in ["500", "TIMEOUT", "grpc:UNAVAILABLE", "x.y-z_1"] {
            assert!(valid_error_code(ok), "{ok}");
        }
        for bad in ["with space", "é", "a{b}", &"x".repeat(65)] {
            assert!(!valid_error_code(bad), "{bad}");
        }
    }

    #[test]
    fn alerts_fire_at_their_thresholds_and_resolve_with_hysteresis() {
        let t = AlertThresholds::default();
        let near = |used: f64, before: bool| {
            let a = KeyActivity {
                limit_used: used,
                ..Default::default()
            };
            evaluate(&a, &t, |k| before && k == AlertKind::NearRateLimit)[2].firing
        };
        assert!(!near(0.79, false));
        assert!(near(0.80, false));
        assert!(near(0.75, true), "stays firing between resolve and fire");
        assert!(!near(0.69, true));

        let errors = |errors: u64, outcomes: u64, before: bool| {
            let a = KeyActivity {
                recent_outcomes: outcomes,
                recent_errors: errors,
                ..Default::default()
            };
            evaluate(&a, &t, |k| before && k == AlertKind::HighErrorRate)[1].firing
        };
        assert!(!errors(2, 19, false), "too few outcomes");
        assert!(errors(2, 20, false));
        assert!(!errors(1, 20, false));
        assert!(errors(1, 20, true), "5% still firing once fired");
        assert!(!errors(0, 20, true));
        assert!(!errors(5, 9, true), "too few outcomes left to judge");

        let spike = |recent: u64, baseline: u64, before: bool| {
            let a = KeyActivity {
                recent_requests: recent,
                baseline_requests: baseline,
                ..Default::default()
            };
            evaluate(&a, &t, |k| before && k == AlertKind::TrafficSpike)[0].firing
        };
        // Baseline 1200/h = 20/min; 5 min at 60/min = 300 -> factor 3.
        assert!(spike(300, 1200, false));
        assert!(!spike(299, 1200, false));
        assert!(spike(200, 1200, true), "factor 2 keeps it");
        assert!(!spike(199, 1200, true));
        assert!(!spike(99, 0, false), "needs 100 requests");
        assert!(
            spike(100, 0, false),
            "from silence: baseline floored at 1/min"
        );
        let new_key = KeyActivity {
            recent_requests: 10_000,
            no_baseline: true,
            ..Default::default()
        };
        assert!(
            !evaluate(&new_key, &t, |_| false)[0].firing,
            "a key with no baseline has no spike"
        );
    }

    #[test]
    fn the_baseline_begins_sixty_four_minutes_before_the_current_minute() {
        let minute = MILLIS_PER_MINUTE;
        let now = 1_000 * minute + 59_999;
        assert_eq!(baseline_start(now), 936 * minute);
        assert_eq!(baseline_start(1_000 * minute), 936 * minute);
    }

    #[test]
    fn activity_sums_the_right_minutes() {
        let mut minutes = vec![MinuteCounters::default(); 65];
        for (i, m) in minutes.iter_mut().enumerate() {
            m.requests = i as u64;
            m.outcomes = 2;
            m.errors = u64::from(i >= 60);
        }
        let a = KeyActivity::from_minutes(0.5, &minutes);
        assert_eq!(a.recent_requests, (60..65).sum::<u64>());
        assert_eq!(a.baseline_requests, (0..60).sum::<u64>());
        assert_eq!((a.recent_outcomes, a.recent_errors), (10, 5));
    }

    #[test]
    fn alerts_file_is_validated() {
        let t = AlertThresholds::from_toml(
            "[high_error_rate]\nfire = 0.2\nresolve = 0.1\nmin_outcomes = 50\n",
        )
        .expect("valid");
        assert_eq!(t.high_error_rate.min_outcomes, 50);
        assert_eq!(
            t.near_rate_limit,
            AlertThresholds::default().near_rate_limit
        );
        for bad in [
            "[near_rate_limit]\nfire = 0.5\nresolve = 0.6\n",
            "[traffic_spike]\nfire = 3.0\nresolve = 2.0\n",
            "[other]\nx = 1\n",
        ] {
            assert!(AlertThresholds::from_toml(bad).is_err(), "{bad}");
        }
    }
}
