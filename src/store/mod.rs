//! Storage ports: what the services need from storage, as traits, plus the two adapters.
//!
//! - [`memory::MemoryStore`]: the embedded store, used when no Redis is configured and as the
//!   reference every conformance test compares against. Same semantics, not a toy.
//! - [`redis::RedisStore`]: Redis standalone or Redis Cluster, pooled with deadpool.
//!
//! Every operation that must be atomic (the key limit on create, revoke, rotate, the VerifyKey
//! check-and-count) is one call here, so each adapter can make it atomic its own way (one
//! mutex-guarded shard in memory, one Lua script on one hash slot in Redis). The caller passes
//! `now` in, so tests can drive every time-dependent rule with a manual clock.
//!
//! A management change carries its audit entry ([`Audit`]), which the store writes in the
//! same atomic step as the change, and only if the change happens: no change without its
//! record, however the call ends (a dropped connection, a crash right after).

use std::future::Future;

use crate::domain::ratelimit::WindowState;
use crate::domain::usage::{AlertKind, DayCounters, MinuteCounters, Outcome};
use crate::domain::{
    AuditEntry, AuditEvent, Environment, KeyHash, KeyId, KeyRecord, Millis, Plan, SessionId,
    SessionRecord, UtcDate, VerifyOutcome,
};

pub mod memory;
pub mod redis;

/// A storage failure. `transient` failures (timeouts, refused or dropped connections, a
/// cluster in reconfiguration) are worth retrying and become UNAVAILABLE; anything else is a
/// bug or corrupt data and becomes INTERNAL. The message never contains key material.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct StoreError {
    pub transient: bool,
    pub message: String,
}

impl StoreError {
    pub fn transient(message: impl Into<String>) -> Self {
        StoreError {
            transient: true,
            message: message.into(),
        }
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        StoreError {
            transient: false,
            message: message.into(),
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Result of [`KeyStore::insert_key`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InsertKey {
    /// Stored; the session now has this many keys counting toward its limit.
    Created {
        active_keys: u32,
    },
    /// The key id is taken (draw another one and retry).
    KeyIdTaken,
    SessionNotFound,
    LimitReached {
        max_keys: u32,
        plan: Plan,
    },
}

/// Result of [`KeyStore::rotate_key`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RotateKey {
    /// Boxed: two records dwarf the other variants.
    Rotated {
        old: Box<KeyRecord>,
        new: Box<KeyRecord>,
    },
    NotFound,
    /// The old key is revoked or expired.
    NotActive,
    /// The old key was rotated before; rotate its replacement instead.
    AlreadyRotated,
    /// The new key id is taken (draw another one and retry).
    KeyIdTaken,
    /// A rotation with a grace period would take the session more than one key over its key
    /// limit: it is over the limit already (a rotation's grace period running, or a move to a
    /// smaller plan).
    LimitReached {
        max_keys: u32,
        plan: Plan,
    },
}

/// Result of [`KeyStore::revoke_key`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RevokeKey {
    /// Revoked by this call (its audit entry written with it).
    Revoked(Box<KeyRecord>),
    /// Already revoked before; the record as it is, nothing written.
    AlreadyRevoked(Box<KeyRecord>),
    /// No such key in that session.
    NotFound,
}

/// Result of [`SessionStore::replace_session`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplaceSession {
    Replaced,
    NotFound,
    /// Someone else updated the session first; re-read and try again.
    VersionConflict,
}

/// Where a key listing resumes: after this (create time, key id).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyCursor {
    pub create_ms: Millis,
    pub key_id: KeyId,
}

/// Everything the VerifyKey check needs besides the key record.
#[derive(Clone, Copy, Debug)]
pub struct VerifyRequest {
    pub key_id: KeyId,
    pub hash: KeyHash,
    pub hash_version: u8,
    pub expected_environment: Option<Environment>,
    pub cost: u32,
    pub now: Millis,
    /// Per-plan default rate limits (plan-code order, 0 = none), from the live plan table.
    pub plan_rate_limits: [u32; 4],
    /// Days usage counters are kept (the counting happens in the same atomic step).
    pub usage_retention_days: u32,
}

/// A key to insert, with its hash.
#[derive(Clone, Copy, Debug)]
pub struct NewKey<'a> {
    pub record: &'a KeyRecord,
    pub hash: KeyHash,
    pub hash_version: u8,
}

/// The audit entry of a management change, to be written with it (to the log of the entry's
/// session), and how long the log keeps entries.
#[derive(Clone, Copy, Debug)]
pub struct Audit<'a> {
    pub entry: &'a AuditEntry,
    pub retention_ms: Millis,
    /// Drawn at random for each store call: a resent command carries the same number, another
    /// call another. Session changes and revocations have nothing else that tells a resend
    /// from another call making the very same change (new keys have their hash), so they store
    /// it.
    pub call: u64,
}

pub trait SessionStore: Send + Sync + 'static {
    /// Stores a new session and its audit entry; `Ok(false)` (nothing written) if the id is
    /// taken, except by this very call (a resent command: same record, same `audit.call`):
    /// `Ok(true)`, nothing written.
    fn create_session(
        &self,
        session: &SessionRecord,
        audit: Audit<'_>,
    ) -> impl Future<Output = StoreResult<bool>> + Send;

    /// The session with `active_keys` counted at `now`.
    fn get_session(
        &self,
        id: &SessionId,
        now: Millis,
    ) -> impl Future<Output = StoreResult<Option<SessionRecord>>> + Send;

    /// Replaces the session, and writes its audit entry, if its stored version is still
    /// `expected_version`. This very call again (a resent command: the stored session equal to
    /// `session` and stored by the same `audit.call`) answers `Replaced` and writes nothing.
    fn replace_session(
        &self,
        session: &SessionRecord,
        expected_version: u64,
        audit: Audit<'_>,
    ) -> impl Future<Output = StoreResult<ReplaceSession>> + Send;
}

pub trait KeyStore: Send + Sync + 'static {
    /// Stores a key if its session exists and, counting the keys that are active at `now`
    /// (keys in a rotation's grace period included), is below its key limit (custom value,
    /// else `plan_max_keys` by plan code; 0 = unlimited). Atomic with respect to concurrent
    /// inserts; the audit entry is written with the key. The same key again (same id and
    /// hash: a resent command) answers `Created` and changes nothing, its entry included.
    fn insert_key(
        &self,
        key: NewKey<'_>,
        plan_max_keys: [u32; 4],
        now: Millis,
        audit: Audit<'_>,
    ) -> impl Future<Output = StoreResult<InsertKey>> + Send;

    fn get_key(&self, id: &KeyId) -> impl Future<Output = StoreResult<Option<KeyRecord>>> + Send;

    /// Up to `limit` keys of the session in (create time, key id) order, after `after`.
    fn list_keys(
        &self,
        session: &SessionId,
        after: Option<KeyCursor>,
        limit: usize,
    ) -> impl Future<Output = StoreResult<Vec<KeyRecord>>> + Send;

    /// The session's keys that count toward its key limit at `now` (active and unexpired, a
    /// rotated key in its grace period included), in no set order: what alert evaluation
    /// watches on every tick. Redis reads only those records (from the session's active set),
    /// however many keys the session has had; the in-memory store filters its index.
    fn live_keys(
        &self,
        session: &SessionId,
        now: Millis,
    ) -> impl Future<Output = StoreResult<Vec<KeyRecord>>> + Send;

    /// Revokes an active key and writes the audit entry; a revoked key is returned unchanged,
    /// nothing written (`Revoked` again for this very call's resend, by `audit.call`). Works on a full store (a full Redis): a key can be revoked at any
    /// time, and its entry is kept.
    fn revoke_key(
        &self,
        id: &KeyId,
        session: &SessionId,
        reason: &str,
        now: Millis,
        audit: Audit<'_>,
    ) -> impl Future<Output = StoreResult<RevokeKey>> + Send;

    /// Atomically: stores `new` and marks `old` as replaced by it; the old key then expires at
    /// `old_expires_at` (or earlier if it already had an earlier expiry), or is revoked now
    /// when that is `None`. The old key counts toward the key limit until it expires, and a
    /// rotation may take a session one key over its limit (so a session at its limit can
    /// rotate without downtime) but no further: with `old_expires_at` set, the rotation is
    /// refused (`LimitReached`) when the keys counting now, the old one included, already
    /// exceed the limit. A rotation that revokes the old key at once is never refused for the
    /// limit. The audit entry is written with the rotation. The same rotation again (the old
    /// key already replaced by this `new`, same hash) answers `Rotated` with the records as
    /// they are and changes nothing.
    #[allow(clippy::too_many_arguments)]
    fn rotate_key(
        &self,
        old: &KeyId,
        new: NewKey<'_>,
        old_expires_at: Option<Millis>,
        plan_max_keys: [u32; 4],
        now: Millis,
        audit: Audit<'_>,
    ) -> impl Future<Output = StoreResult<RotateKey>> + Send;

    /// The VerifyKey check, atomically: find the key, compare the hash, check status, expiry,
    /// session and environment, apply the sliding-window limit and record last-used.
    /// `key_id` in the outcome is left for the caller to fill.
    fn verify(
        &self,
        request: &VerifyRequest,
    ) -> impl Future<Output = StoreResult<VerifyOutcome>> + Send;
}

/// What the alerts need to know about one key, read in one go.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecentActivity {
    pub window: WindowState,
    /// Per-minute counters, oldest first, the last being the current minute.
    pub minutes: Vec<MinuteCounters>,
    /// Alerts recorded as firing, with the time they started.
    pub firing: Vec<(AlertKind, Millis)>,
}

/// An alert state change to store: `Some(since)` fires, `None` resolves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AlertChange {
    pub key_id: KeyId,
    pub kind: AlertKind,
    pub since: Option<Millis>,
}

pub trait UsageStore: Send + Sync + 'static {
    /// Counts outcomes whose key exists (others are skipped) into their key's day and, when
    /// recent enough, minute counters. Returns how many were stored.
    fn record_outcomes(
        &self,
        outcomes: &[Outcome],
        now: Millis,
        retention_days: u32,
    ) -> impl Future<Output = StoreResult<u32>> + Send;

    /// For each key, the counters of each day in `from..=to` (zeros where nothing is kept).
    fn usage_days(
        &self,
        keys: &[KeyId],
        from: UtcDate,
        to: UtcDate,
    ) -> impl Future<Output = StoreResult<Vec<Vec<DayCounters>>>> + Send;

    /// For each key: its window, the last `minutes` minutes of counters, its firing alerts.
    fn recent_activity(
        &self,
        keys: &[KeyId],
        now: Millis,
        minutes: usize,
    ) -> impl Future<Output = StoreResult<Vec<RecentActivity>>> + Send;

    /// Records one alert evaluation's state changes, together. They must all be of one
    /// session's keys (one Redis Cluster slot), each (key, kind) at most once (Redis applies
    /// the new firings before the resolutions, the memory store in order).
    fn update_alerts(
        &self,
        changes: &[AlertChange],
    ) -> impl Future<Output = StoreResult<()>> + Send;
}

pub trait AuditStore: Send + Sync + 'static {
    /// Appends an entry to its session's log and drops entries older than its retention;
    /// returns the new event's id. For what changed nothing (a refused or failed call, a
    /// repeated revocation, an update with nothing to change): a change's own entry goes with
    /// the change.
    fn append_audit(&self, audit: Audit<'_>) -> impl Future<Output = StoreResult<String>> + Send;

    /// Up to `limit` events of the session, newest first, strictly older than `before`
    /// (an event id's (ms, seq) pair).
    fn list_audit(
        &self,
        session: &SessionId,
        before: Option<(u64, u64)>,
        limit: usize,
    ) -> impl Future<Output = StoreResult<Vec<AuditEvent>>> + Send;
}

/// Everything the service needs, plus a liveness probe for the health service.
pub trait Store: SessionStore + KeyStore + UsageStore + AuditStore {
    /// Cheap round trip proving the store answers.
    fn ping(&self) -> impl Future<Output = StoreResult<()>> + Send;

    /// Refreshes gauges about the store's connections (called on every health tick).
    fn report_metrics(&self) {}

    /// A short description for the startup log ("in-memory", "redis standalone", ...); never
    /// contains credentials.
    fn describe(&self) -> String;
}
