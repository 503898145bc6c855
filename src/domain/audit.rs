//! The audit log's entries: who changed what, when, and how it ended. Never a secret: details
//! name key ids and settings, not keys.

use super::key::KeyId;
use super::session::SessionId;
use super::time::Millis;

/// The name of whoever made a call: the credential's name, or `anonymous-loopback` when the
/// server runs without credentials (and then only accepts loopback peers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Actor(pub String);

impl Actor {
    pub const ANONYMOUS: &'static str = "anonymous-loopback";

    pub fn anonymous() -> Self {
        Actor(Self::ANONYMOUS.to_owned())
    }

    pub fn name(&self) -> &str {
        &self.0
    }
}

/// The management actions that are audited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuditAction {
    CreateSession,
    UpdateSession,
    CreateKey,
    RevokeKey,
    RotateKey,
}

impl AuditAction {
    pub fn name(self) -> &'static str {
        match self {
            AuditAction::CreateSession => "CreateSession",
            AuditAction::UpdateSession => "UpdateSession",
            AuditAction::CreateKey => "CreateKey",
            AuditAction::RevokeKey => "RevokeKey",
            AuditAction::RotateKey => "RotateKey",
        }
    }
}

/// One entry to append.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEntry {
    pub time_ms: Millis,
    pub actor: String,
    pub action: String,
    pub session_id: SessionId,
    pub key_id: Option<KeyId>,
    /// `OK` or the failure's gRPC code name (e.g. `RESOURCE_EXHAUSTED`).
    pub result: String,
    pub detail: String,
}

/// A stored entry with its id (`<ms>-<seq>`, ordered within a session).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEvent {
    pub id: String,
    pub entry: AuditEntry,
}

/// Parses an event id `<ms>-<seq>` into its ordering pair.
pub fn parse_event_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(ms) || !digits(seq) {
        return None;
    }
    Some((ms.parse().ok()?, seq.parse().ok()?))
}
