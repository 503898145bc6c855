//! The outcome of VerifyKey.

use super::key::{Environment, KeyId};
use super::plan::Plan;
use super::session::SessionId;
use super::time::Millis;

/// VerifyKey's answer. Discriminants are the proto enum's values and the stores' wire codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Decision {
    Valid = 1,
    Malformed = 2,
    NotFound = 3,
    Revoked = 4,
    Expired = 5,
    SessionDisabled = 6,
    EnvironmentMismatch = 7,
    RateLimited = 8,
}

impl Decision {
    pub const ALL: [Decision; 8] = [
        Decision::Valid,
        Decision::Malformed,
        Decision::NotFound,
        Decision::Revoked,
        Decision::Expired,
        Decision::SessionDisabled,
        Decision::EnvironmentMismatch,
        Decision::RateLimited,
    ];

    /// The name used in usage maps and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            Decision::Valid => "VALID",
            Decision::Malformed => "MALFORMED",
            Decision::NotFound => "NOT_FOUND",
            Decision::Revoked => "REVOKED",
            Decision::Expired => "EXPIRED",
            Decision::SessionDisabled => "SESSION_DISABLED",
            Decision::EnvironmentMismatch => "ENVIRONMENT_MISMATCH",
            Decision::RateLimited => "RATE_LIMITED",
        }
    }

    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: i64) -> Option<Self> {
        Decision::ALL
            .into_iter()
            .find(|d| i64::from(d.code()) == code)
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Decision::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Whether the decision is about a known key (and so counted in that key's usage).
    pub fn is_attributed(self) -> bool {
        !matches!(self, Decision::Malformed | Decision::NotFound)
    }
}

/// Rate-limit figures for the caller's response headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimitState {
    pub limit: u32,
    pub remaining: u32,
    /// Until the current one-minute window ends.
    pub reset_after_ms: Millis,
    /// Only when rate limited: the earliest time a retry of the same cost can pass; `None`
    /// when the cost alone exceeds the limit.
    pub retry_after_ms: Option<Millis>,
}

/// Everything VerifyKey answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyOutcome {
    pub decision: Decision,
    pub key_id: Option<KeyId>,
    /// Set when the key was found (its hash matched).
    pub session_id: Option<SessionId>,
    pub environment: Option<Environment>,
    pub plan: Option<Plan>,
    /// Set for VALID and RATE_LIMITED.
    pub rate_limit: Option<RateLimitState>,
}

impl VerifyOutcome {
    /// An answer about a key that was not found or not even parsed.
    pub fn unattributed(decision: Decision, key_id: Option<KeyId>) -> Self {
        VerifyOutcome {
            decision,
            key_id,
            session_id: None,
            environment: None,
            plan: None,
            rate_limit: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Decision;

    #[test]
    fn all_lists_the_decisions_in_code_order_from_one() {
        // Per-decision tables (the metrics counters) are indexed by `code() - 1`.
        for (i, d) in Decision::ALL.into_iter().enumerate() {
            assert_eq!(usize::from(d.code()), i + 1, "{d:?}");
        }
    }
}
