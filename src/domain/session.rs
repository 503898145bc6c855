//! Sessions: Sendable owns them elsewhere; this service keeps what it needs to govern their
//! keys (environment, plan, enabled flag, custom limits).

use std::fmt;

use super::key::Environment;
use super::plan::Plan;
use super::shard::shard_of;
use super::time::Millis;

/// Longest accepted session id.
pub const MAX_SESSION_ID_LEN: usize = 64;

/// A session id: 1-64 characters from `[A-Za-z0-9._-]`. The alphabet keeps ids safe inside
/// storage key names (no `:`, `{` or `}`) and in logs.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(String);

impl SessionId {
    pub fn parse(text: &str) -> Option<Self> {
        let ok = !text.is_empty()
            && text.len() <= MAX_SESSION_ID_LEN
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        ok.then(|| SessionId(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The shard holding this session and all of its keys.
    pub fn shard(&self) -> u16 {
        shard_of(self.0.as_bytes())
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({})", self.0)
    }
}

/// A session as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRecord {
    pub id: SessionId,
    pub environment: Environment,
    pub plan: Plan,
    pub enabled: bool,
    pub custom_rate_limit: Option<u32>,
    pub custom_max_keys: Option<u32>,
    pub create_ms: Millis,
    pub update_ms: Millis,
    /// Bumped on every update; updates are compare-and-set on it.
    pub version: u64,
    /// Keys counting toward the key limit at read time (filled by the store on reads).
    pub active_keys: u32,
}

impl SessionRecord {
    /// The session's key limit: its custom value, else its plan's from `plan_max_keys` (in
    /// plan-code order, as the stores take it); 0 = unlimited.
    pub fn max_keys(&self, plan_max_keys: [u32; 4]) -> u32 {
        self.custom_max_keys
            .unwrap_or(plan_max_keys[usize::from(self.plan.code() - 1)])
    }
}

/// A requested change. `Some(None)` in a custom field removes the override.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionPatch {
    pub plan: Option<Plan>,
    pub enabled: Option<bool>,
    pub custom_rate_limit: Option<Option<u32>>,
    pub custom_max_keys: Option<Option<u32>>,
}

impl SessionPatch {
    /// The session after the patch. A plan change drops custom limits the patch does not
    /// restate: a custom deal belongs to the plan it was made for.
    pub fn apply(&self, current: &SessionRecord, now: Millis) -> SessionRecord {
        let mut next = current.clone();
        if let Some(plan) = self.plan
            && plan != current.plan
        {
            next.plan = plan;
            next.custom_rate_limit = None;
            next.custom_max_keys = None;
        }
        if let Some(enabled) = self.enabled {
            next.enabled = enabled;
        }
        if let Some(custom) = self.custom_rate_limit {
            next.custom_rate_limit = custom;
        }
        if let Some(custom) = self.custom_max_keys {
            next.custom_max_keys = custom;
        }
        next.update_ms = now;
        next.version = current.version + 1;
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> SessionRecord {
        SessionRecord {
            id: SessionId::parse("s-1").expect("valid"),
            environment: Environment::Live,
            plan: Plan::Enterprise,
            enabled: true,
            custom_rate_limit: Some(5000),
            custom_max_keys: Some(20),
            create_ms: 1,
            update_ms: 1,
            version: 1,
            active_keys: 0,
        }
    }

    #[test]
    fn session_ids_are_restricted_to_a_safe_alphabet() {
        for ok in ["a", "sess_01.prod-2", &"x".repeat(64)] {
            assert!(SessionId::parse(ok).is_some(), "{ok}");
        }
        for bad in ["", "a:b", "a{b}", "a b", "é", &"x".repeat(65)] {
            assert!(SessionId::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn plan_change_clears_custom_limits_unless_restated() {
        let to_pro = SessionPatch {
            plan: Some(Plan::Pro),
            ..Default::default()
        }
        .apply(&session(), 9);
        assert_eq!(
            (
                to_pro.plan,
                to_pro.custom_rate_limit,
                to_pro.custom_max_keys
            ),
            (Plan::Pro, None, None)
        );
        assert_eq!((to_pro.update_ms, to_pro.version), (9, 2));

        let restated = SessionPatch {
            plan: Some(Plan::Pro),
            custom_rate_limit: Some(Some(2000)),
            ..Default::default()
        }
        .apply(&session(), 9);
        assert_eq!(restated.custom_rate_limit, Some(2000));

        let same_plan = SessionPatch {
            plan: Some(Plan::Enterprise),
            enabled: Some(false),
            ..Default::default()
        }
        .apply(&session(), 9);
        assert_eq!(
            (same_plan.enabled, same_plan.custom_rate_limit),
            (false, Some(5000))
        );

        let cleared = SessionPatch {
            custom_max_keys: Some(None),
            ..Default::default()
        }
        .apply(&session(), 9);
        assert_eq!(cleared.custom_max_keys, None);
    }
}
