//! An API key's record: everything about a key except its secret. Stores keep the secret's hash
//! beside it, never inside this type, so nothing that handles a `KeyRecord` can leak the hash.

use super::key::{Environment, KeyId};
use super::session::SessionId;
use super::time::Millis;

/// Longest key name.
pub const MAX_KEY_NAME_LEN: usize = 128;
/// Longest revoke reason.
pub const MAX_REVOKE_REASON_LEN: usize = 256;
/// The revoke reason recorded when a rotation without grace period revokes the old key.
pub const ROTATED_REASON: &str = "rotated";

/// What is stored: a key is active until revoked. Expiry is not stored as a state because it
/// happens by the clock, not by a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyState {
    Active,
    Revoked,
}

/// What a reader sees at a given instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyStatus {
    Active,
    Revoked,
    Expired,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRecord {
    pub id: KeyId,
    pub session_id: SessionId,
    pub environment: Environment,
    pub name: String,
    pub state: KeyState,
    pub create_ms: Millis,
    pub last_used_ms: Option<Millis>,
    pub expire_ms: Option<Millis>,
    pub revoke_ms: Option<Millis>,
    pub revoke_reason: String,
    /// Set when the key was rotated: its replacement.
    pub replaced_by: Option<KeyId>,
}

impl KeyRecord {
    pub fn status_at(&self, now: Millis) -> KeyStatus {
        match self.state {
            KeyState::Revoked => KeyStatus::Revoked,
            KeyState::Active if self.expire_ms.is_some_and(|x| x <= now) => KeyStatus::Expired,
            KeyState::Active => KeyStatus::Active,
        }
    }

    /// Whether the key counts toward its session's key limit: whenever it works, so also
    /// while it is on its way out after a rotation (its grace period). Otherwise rotating the
    /// replacement again and again would give a session any number of working keys.
    pub fn counts_toward_limit(&self, now: Millis) -> bool {
        self.status_at(now) == KeyStatus::Active
    }

    /// `sk_live_AbCd1234`: safe to show and log.
    pub fn display_prefix(&self) -> String {
        format!("{}{}", self.environment.key_prefix(), self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_follows_state_and_clock() {
        let mut key = KeyRecord {
            id: KeyId::parse("AbCd1234").expect("valid"),
            session_id: SessionId::parse("s").expect("valid"),
            environment: Environment::Live,
            name: String::new(),
            state: KeyState::Active,
            create_ms: 0,
            last_used_ms: None,
            expire_ms: Some(100),
            revoke_ms: None,
            revoke_reason: String::new(),
            replaced_by: None,
        };
        assert_eq!(key.display_prefix(), "sk_live_AbCd1234");
        assert_eq!(key.status_at(99), KeyStatus::Active);
        assert!(key.counts_toward_limit(99));
        assert_eq!(key.status_at(100), KeyStatus::Expired);
        assert!(!key.counts_toward_limit(100));
        // In its rotation grace period a key still works, so it still counts.
        key.replaced_by = KeyId::parse("Zz990000");
        assert!(key.counts_toward_limit(50));
        key.state = KeyState::Revoked;
        assert_eq!(key.status_at(0), KeyStatus::Revoked);
    }
}
