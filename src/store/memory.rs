//! The embedded store: everything in process memory, nothing persisted.
//!
//! It has the same semantics as the Redis store (the conformance suite runs every behaviour on
//! both), and the same shape: state is split into [`SHARDS`] shards by the shard of the session
//! id, and a key id always falls in its session's shard (see `domain::shard`). One mutex per
//! shard therefore guards a session together with all of its keys, so every multi-record rule
//! (key limit, rotate, the verify check-and-count) is atomic, while unrelated sessions never
//! contend. Critical sections are short and never await, so `std::sync::Mutex` is right here.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::{
    AlertChange, Audit, AuditStore, InsertKey, KeyCursor, KeyStore, NewKey, RecentActivity,
    ReplaceSession, RevokeKey, RotateKey, SessionStore, Store, StoreResult, UsageStore,
    VerifyRequest,
};
use crate::domain::audit::parse_event_id;
use crate::domain::ratelimit::{self, WindowState};
use crate::domain::shard::SHARDS;
use crate::domain::usage::{
    AlertKind, DayCounters, MINUTE_RETENTION_MS, MinuteCounters, Outcome, minute_of,
    oldest_kept_day, recent_minutes,
};
use crate::domain::{
    AuditEvent, Decision, KeyHash, KeyId, KeyRecord, KeyState, KeyStatus, Millis, ROTATED_REASON,
    SessionId, SessionRecord, UtcDate, VerifyOutcome,
};

#[derive(Default)]
struct Shard {
    sessions: HashMap<SessionId, SessionEntry>,
    keys: HashMap<KeyId, KeyEntry>,
}

struct SessionEntry {
    record: SessionRecord,
    /// Every key of the session, in listing order.
    index: BTreeSet<(Millis, KeyId)>,
    /// The `Audit::call` of the call that last stored the record: tells its resend from
    /// another call storing the same, as in Redis.
    last_call: u64,
}

struct KeyEntry {
    record: KeyRecord,
    hash: KeyHash,
    hash_version: u8,
    window: WindowState,
    /// Usage per UTC day, pruned to the retention on write and filtered by it on read (the
    /// equivalent of the Redis TTLs).
    days: BTreeMap<UtcDate, DayCounters>,
    /// Per-minute counters for alerts (minute index -> counters), pruned to two hours.
    minutes: BTreeMap<i64, MinuteCounters>,
    /// Firing alerts and since when.
    alerts: BTreeMap<AlertKind, Millis>,
    /// The `Audit::call` of the call that revoked the key: tells its resend from another
    /// call, as the Redis record's `rc` does.
    revoked_by: Option<u64>,
}

impl KeyEntry {
    fn day(&mut self, at: Millis, now: Millis, retention_days: u32) -> &mut DayCounters {
        let oldest = oldest_kept_day(now, retention_days);
        while self
            .days
            .first_key_value()
            .is_some_and(|(d, _)| *d < oldest)
        {
            self.days.pop_first();
        }
        self.days.entry(UtcDate::from_millis(at)).or_default()
    }

    fn minute(&mut self, at: Millis, now: Millis) -> &mut MinuteCounters {
        let oldest = minute_of(now - MINUTE_RETENTION_MS);
        while self
            .minutes
            .first_key_value()
            .is_some_and(|(m, _)| *m < oldest)
        {
            self.minutes.pop_first();
        }
        self.minutes.entry(minute_of(at)).or_default()
    }

    /// Counts an attributed VerifyKey decision.
    fn count(&mut self, decision: Decision, now: Millis, retention_days: u32) {
        self.day(now, now, retention_days).decisions[usize::from(decision.code())] += 1;
        self.minute(now, now).requests += 1;
    }
}

/// Most audit events kept per session, whatever the retention: bounds memory.
const MAX_AUDIT_EVENTS: usize = 100_000;

#[derive(Default)]
struct AuditLog {
    /// (ms, seq) of the newest event, so ids stay strictly increasing.
    last: (u64, u64),
    events: VecDeque<AuditEvent>,
}

pub struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
    audit: Mutex<HashMap<SessionId, AuditLog>>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        MemoryStore {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            audit: Mutex::new(HashMap::new()),
        }
    }

    /// Appends to the entry's session log, trimming by age and count; returns the event id.
    /// Called with a shard's lock held when it records a change (lock order: shard, then
    /// audit), so the change and its entry are one step.
    fn append(&self, audit: Audit<'_>) -> String {
        let (entry, retention_ms) = (audit.entry, audit.retention_ms);
        let mut all = self.audit.lock().unwrap_or_else(PoisonError::into_inner);
        let log = all.entry(entry.session_id.clone()).or_default();
        let ms = u64::try_from(entry.time_ms).unwrap_or(0);
        log.last = if ms > log.last.0 {
            (ms, 0)
        } else {
            (log.last.0, log.last.1 + 1)
        };
        let id = format!("{}-{}", log.last.0, log.last.1);
        log.events.push_back(AuditEvent {
            id: id.clone(),
            entry: entry.clone(),
        });
        let oldest_kept = entry.time_ms - retention_ms;
        while log
            .events
            .front()
            .is_some_and(|e| e.entry.time_ms < oldest_kept)
            || log.events.len() > MAX_AUDIT_EVENTS
        {
            log.events.pop_front();
        }
        id
    }

    fn shard(&self, shard: u16) -> MutexGuard<'_, Shard> {
        // A panic while holding the lock cannot leave a half-applied change behind (every
        // mutation below completes before anything can fail), so a poisoned lock is safe to use.
        self.shards[usize::from(shard % SHARDS)]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Shard {
    /// Keys of `session` counting toward its limit at `now`.
    fn active_keys(&self, entry: &SessionEntry, now: Millis) -> u32 {
        entry
            .index
            .iter()
            .filter(|(_, id)| {
                self.keys
                    .get(id)
                    .is_some_and(|k| k.record.counts_toward_limit(now))
            })
            .count() as u32
    }

    fn insert_new(&mut self, key: NewKey<'_>) {
        self.keys.insert(
            key.record.id,
            KeyEntry {
                record: key.record.clone(),
                hash: key.hash,
                hash_version: key.hash_version,
                window: WindowState::default(),
                days: BTreeMap::new(),
                minutes: BTreeMap::new(),
                alerts: BTreeMap::new(),
                revoked_by: None,
            },
        );
        if let Some(entry) = self.sessions.get_mut(&key.record.session_id) {
            entry.index.insert((key.record.create_ms, key.record.id));
        }
    }
}

impl SessionStore for MemoryStore {
    async fn create_session(&self, session: &SessionRecord, audit: Audit<'_>) -> StoreResult<bool> {
        let mut shard = self.shard(session.id.shard());
        if let Some(existing) = shard.sessions.get(&session.id) {
            // This very call again (as a Redis client's resend would be): already created.
            let resent = existing.last_call == audit.call
                && existing.record
                    == SessionRecord {
                        active_keys: 0,
                        ..session.clone()
                    };
            return Ok(resent);
        }
        self.append(audit);
        shard.sessions.insert(
            session.id.clone(),
            SessionEntry {
                record: SessionRecord {
                    active_keys: 0,
                    ..session.clone()
                },
                index: BTreeSet::new(),
                last_call: audit.call,
            },
        );
        Ok(true)
    }

    async fn get_session(&self, id: &SessionId, now: Millis) -> StoreResult<Option<SessionRecord>> {
        let shard = self.shard(id.shard());
        Ok(shard.sessions.get(id).map(|entry| SessionRecord {
            active_keys: shard.active_keys(entry, now),
            ..entry.record.clone()
        }))
    }

    async fn replace_session(
        &self,
        session: &SessionRecord,
        expected_version: u64,
        audit: Audit<'_>,
    ) -> StoreResult<ReplaceSession> {
        let mut shard = self.shard(session.id.shard());
        let Some(entry) = shard.sessions.get_mut(&session.id) else {
            return Ok(ReplaceSession::NotFound);
        };
        let next = SessionRecord {
            active_keys: 0,
            ..session.clone()
        };
        // This very call again (as a Redis client's resend would be): already done.
        if entry.record == next && entry.last_call == audit.call {
            return Ok(ReplaceSession::Replaced);
        }
        if entry.record.version != expected_version {
            return Ok(ReplaceSession::VersionConflict);
        }
        self.append(audit);
        entry.record = next;
        entry.last_call = audit.call;
        Ok(ReplaceSession::Replaced)
    }
}

impl KeyStore for MemoryStore {
    async fn insert_key(
        &self,
        key: NewKey<'_>,
        plan_max_keys: [u32; 4],
        now: Millis,
        audit: Audit<'_>,
    ) -> StoreResult<InsertKey> {
        let mut shard = self.shard(key.record.id.shard());
        if let Some(existing) = shard.keys.get(&key.record.id) {
            // The same insert again (as a Redis client's resend would be): already done.
            if existing.hash_version == key.hash_version && existing.hash.matches(&key.hash) {
                let active = shard
                    .sessions
                    .get(&key.record.session_id)
                    .map_or(0, |entry| shard.active_keys(entry, now));
                return Ok(InsertKey::Created {
                    active_keys: active,
                });
            }
            return Ok(InsertKey::KeyIdTaken);
        }
        let Some(entry) = shard.sessions.get(&key.record.session_id) else {
            return Ok(InsertKey::SessionNotFound);
        };
        let session = &entry.record;
        let max_keys = session.max_keys(plan_max_keys);
        let active = shard.active_keys(entry, now);
        if max_keys > 0 && active >= max_keys {
            return Ok(InsertKey::LimitReached {
                max_keys,
                plan: session.plan,
            });
        }
        shard.insert_new(key);
        self.append(audit);
        Ok(InsertKey::Created {
            active_keys: active + 1,
        })
    }

    async fn get_key(&self, id: &KeyId) -> StoreResult<Option<KeyRecord>> {
        Ok(self
            .shard(id.shard())
            .keys
            .get(id)
            .map(|k| k.record.clone()))
    }

    async fn list_keys(
        &self,
        session: &SessionId,
        after: Option<KeyCursor>,
        limit: usize,
    ) -> StoreResult<Vec<KeyRecord>> {
        let shard = self.shard(session.shard());
        let Some(entry) = shard.sessions.get(session) else {
            return Ok(Vec::new());
        };
        let start = after.map(|c| (c.create_ms, c.key_id));
        Ok(entry
            .index
            .iter()
            .filter(|pos| start.is_none_or(|s| **pos > s))
            .take(limit)
            .filter_map(|(_, id)| shard.keys.get(id).map(|k| k.record.clone()))
            .collect())
    }

    async fn live_keys(&self, session: &SessionId, now: Millis) -> StoreResult<Vec<KeyRecord>> {
        let shard = self.shard(session.shard());
        let Some(entry) = shard.sessions.get(session) else {
            return Ok(Vec::new());
        };
        Ok(entry
            .index
            .iter()
            .filter_map(|(_, id)| shard.keys.get(id))
            .filter(|k| k.record.counts_toward_limit(now))
            .map(|k| k.record.clone())
            .collect())
    }

    async fn revoke_key(
        &self,
        id: &KeyId,
        session: &SessionId,
        reason: &str,
        now: Millis,
        audit: Audit<'_>,
    ) -> StoreResult<RevokeKey> {
        let mut shard = self.shard(id.shard());
        let Some(key) = shard.keys.get_mut(id) else {
            return Ok(RevokeKey::NotFound);
        };
        if key.record.session_id != *session {
            return Ok(RevokeKey::NotFound);
        }
        if key.record.state != KeyState::Active {
            let record = Box::new(key.record.clone());
            return Ok(if key.revoked_by == Some(audit.call) {
                RevokeKey::Revoked(record)
            } else {
                RevokeKey::AlreadyRevoked(record)
            });
        }
        key.record.state = KeyState::Revoked;
        key.record.revoke_ms = Some(now);
        key.record.revoke_reason = reason.to_owned();
        key.revoked_by = Some(audit.call);
        key.alerts.clear();
        self.append(audit);
        Ok(RevokeKey::Revoked(Box::new(key.record.clone())))
    }

    async fn rotate_key(
        &self,
        old: &KeyId,
        new: NewKey<'_>,
        old_expires_at: Option<Millis>,
        plan_max_keys: [u32; 4],
        now: Millis,
        audit: Audit<'_>,
    ) -> StoreResult<RotateKey> {
        let mut shard = self.shard(old.shard());
        let Some(current) = shard.keys.get(old) else {
            return Ok(RotateKey::NotFound);
        };
        if current.record.session_id != new.record.session_id {
            return Ok(RotateKey::NotFound);
        }
        // The same rotation again (as a Redis client's resend would be): answer as before.
        if current.record.replaced_by == Some(new.record.id)
            && let Some(replacement) = shard.keys.get(&new.record.id)
            && replacement.hash_version == new.hash_version
            && replacement.hash.matches(&new.hash)
        {
            return Ok(RotateKey::Rotated {
                old: Box::new(current.record.clone()),
                new: Box::new(replacement.record.clone()),
            });
        }
        if current.record.status_at(now) != KeyStatus::Active {
            return Ok(RotateKey::NotActive);
        }
        if current.record.replaced_by.is_some() {
            return Ok(RotateKey::AlreadyRotated);
        }
        if shard.keys.contains_key(&new.record.id) {
            return Ok(RotateKey::KeyIdTaken);
        }
        if old_expires_at.is_some() {
            let Some(entry) = shard.sessions.get(&new.record.session_id) else {
                return Ok(RotateKey::NotFound);
            };
            let session = &entry.record;
            let max_keys = session.max_keys(plan_max_keys);
            // The old key is among those counted: one over the limit after this rotation at
            // most.
            if max_keys > 0 && shard.active_keys(entry, now) > max_keys {
                return Ok(RotateKey::LimitReached {
                    max_keys,
                    plan: session.plan,
                });
            }
        }
        shard.insert_new(new);
        let Some(old_entry) = shard.keys.get_mut(old) else {
            return Ok(RotateKey::NotFound);
        };
        if old_expires_at.is_none() {
            old_entry.alerts.clear();
        }
        let record = &mut old_entry.record;
        record.replaced_by = Some(new.record.id);
        match old_expires_at {
            None => {
                record.state = KeyState::Revoked;
                record.revoke_ms = Some(now);
                record.revoke_reason = ROTATED_REASON.to_owned();
            }
            Some(at) => record.expire_ms = Some(record.expire_ms.map_or(at, |x| x.min(at))),
        }
        self.append(audit);
        Ok(RotateKey::Rotated {
            old: Box::new(record.clone()),
            new: Box::new(new.record.clone()),
        })
    }

    async fn verify(&self, request: &VerifyRequest) -> StoreResult<VerifyOutcome> {
        let mut guard = self.shard(request.key_id.shard());
        let shard = &mut *guard;
        let not_found = Ok(VerifyOutcome::unattributed(Decision::NotFound, None));
        let Some(key) = shard.keys.get_mut(&request.key_id) else {
            return not_found;
        };
        if key.hash_version != request.hash_version || !key.hash.matches(&request.hash) {
            return not_found;
        }
        let Some(session) = shard.sessions.get(&key.record.session_id) else {
            return not_found;
        };
        let session = &session.record;
        let now = request.now;
        key.record.last_used_ms = Some(now);
        let decision = match key.record.status_at(now) {
            KeyStatus::Revoked => Some(Decision::Revoked),
            KeyStatus::Expired => Some(Decision::Expired),
            KeyStatus::Active if !session.enabled => Some(Decision::SessionDisabled),
            KeyStatus::Active
                if request
                    .expected_environment
                    .is_some_and(|env| env != key.record.environment) =>
            {
                Some(Decision::EnvironmentMismatch)
            }
            KeyStatus::Active => None,
        };
        let mut outcome = VerifyOutcome {
            decision: decision.unwrap_or(Decision::Valid),
            key_id: None,
            session_id: Some(key.record.session_id.clone()),
            environment: Some(key.record.environment),
            plan: Some(session.plan),
            rate_limit: None,
        };
        if let Some(decision) = decision {
            key.count(decision, now, request.usage_retention_days);
            return Ok(outcome);
        }
        let limit = session
            .custom_rate_limit
            .unwrap_or(request.plan_rate_limits[usize::from(session.plan.code() - 1)]);
        let admission = ratelimit::admit(key.window, now, limit, request.cost);
        key.window = admission.state;
        outcome.decision = if admission.allowed {
            Decision::Valid
        } else {
            Decision::RateLimited
        };
        outcome.rate_limit = Some(admission.rate);
        key.count(outcome.decision, now, request.usage_retention_days);
        Ok(outcome)
    }
}

impl UsageStore for MemoryStore {
    async fn record_outcomes(
        &self,
        outcomes: &[Outcome],
        now: Millis,
        retention_days: u32,
    ) -> StoreResult<u32> {
        let mut accepted = 0;
        for outcome in outcomes {
            let mut shard = self.shard(outcome.key_id.shard());
            let Some(key) = shard.keys.get_mut(&outcome.key_id) else {
                continue;
            };
            accepted += 1;
            key.day(outcome.time_ms, now, retention_days)
                .record(outcome);
            if outcome.time_ms >= now - MINUTE_RETENTION_MS {
                let minute = key.minute(outcome.time_ms, now);
                minute.outcomes += 1;
                minute.errors += u64::from(!outcome.success);
            }
        }
        Ok(accepted)
    }

    async fn usage_days(
        &self,
        keys: &[KeyId],
        from: UtcDate,
        to: UtcDate,
    ) -> StoreResult<Vec<Vec<DayCounters>>> {
        Ok(keys
            .iter()
            .map(|id| {
                let shard = self.shard(id.shard());
                let entry = shard.keys.get(id);
                UtcDate::range(from, to)
                    .map(|day| {
                        entry
                            .and_then(|k| k.days.get(&day).cloned())
                            .unwrap_or_default()
                    })
                    .collect()
            })
            .collect())
    }

    async fn recent_activity(
        &self,
        keys: &[KeyId],
        now: Millis,
        minutes: usize,
    ) -> StoreResult<Vec<RecentActivity>> {
        Ok(keys
            .iter()
            .map(|id| {
                let shard = self.shard(id.shard());
                let Some(key) = shard.keys.get(id) else {
                    return RecentActivity {
                        minutes: vec![MinuteCounters::default(); minutes],
                        ..RecentActivity::default()
                    };
                };
                RecentActivity {
                    window: key.window,
                    minutes: recent_minutes(now, minutes, |m| key.minutes.get(&m).copied()),
                    firing: key.alerts.iter().map(|(k, since)| (*k, *since)).collect(),
                }
            })
            .collect())
    }

    async fn update_alerts(&self, changes: &[AlertChange]) -> StoreResult<()> {
        for change in changes {
            let mut shard = self.shard(change.key_id.shard());
            if let Some(key) = shard.keys.get_mut(&change.key_id) {
                match change.since {
                    Some(since) => {
                        key.alerts.entry(change.kind).or_insert(since);
                    }
                    None => {
                        key.alerts.remove(&change.kind);
                    }
                }
            }
        }
        Ok(())
    }
}

impl AuditStore for MemoryStore {
    async fn append_audit(&self, audit: Audit<'_>) -> StoreResult<String> {
        Ok(self.append(audit))
    }

    async fn list_audit(
        &self,
        session: &SessionId,
        before: Option<(u64, u64)>,
        limit: usize,
    ) -> StoreResult<Vec<AuditEvent>> {
        let all = self.audit.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(log) = all.get(session) else {
            return Ok(Vec::new());
        };
        Ok(log
            .events
            .iter()
            .rev()
            .filter(|e| before.is_none_or(|b| parse_event_id(&e.id).is_some_and(|id| id < b)))
            .take(limit)
            .cloned()
            .collect())
    }
}

impl Store for MemoryStore {
    async fn ping(&self) -> StoreResult<()> {
        Ok(())
    }

    fn describe(&self) -> String {
        "in-memory (nothing is persisted)".to_owned()
    }
}
