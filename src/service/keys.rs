//! Sessions, keys and VerifyKey: the rules of the KeyService, over any [`Store`].

use std::sync::Arc;

use super::clock::Clock;
use super::paging;
use super::{Error, Result, Settings};
use crate::domain::apikey::{MAX_KEY_NAME_LEN, MAX_REVOKE_REASON_LEN};
use crate::domain::audit::parse_event_id;
use crate::domain::key::{self, Malformed};
use crate::domain::plan::{MAX_KEYS_LIMIT, MAX_RATE_LIMIT_PER_MINUTE};
use crate::domain::time::{MILLIS_PER_DAY, rfc3339};
use crate::domain::{
    Actor, AuditAction, AuditEntry, AuditEvent, Decision, DomainError, Environment, HASH_VERSION,
    IssuedKey, KeyHasher, KeyId, KeyRecord, KeyState, KeyStatus, Millis, Plan, PlanTable, Resource,
    SessionId, SessionPatch, SessionRecord, VerifyOutcome, Violations,
};
use crate::store::{
    Audit, InsertKey, KeyCursor, NewKey, ReplaceSession, RevokeKey, RotateKey, Store, VerifyRequest,
};

/// Highest `cost` of one VerifyKey call.
pub const MAX_COST: u32 = 1_000_000;
/// Longest rotation grace period.
pub const MAX_GRACE_MS: Millis = 30 * MILLIS_PER_DAY;
/// Furthest a key's expiry may lie in the future (ten years).
pub const MAX_EXPIRY_MS: Millis = 3653 * MILLIS_PER_DAY;
/// Attempts at drawing an unused key id before giving up (a collision is a 1-in-10^10 event
/// per attempt, so needing more than one means something else is wrong).
const KEY_ID_ATTEMPTS: usize = 8;
/// Attempts at a compare-and-set session update under contention.
const UPDATE_ATTEMPTS: usize = 8;

/// A new session's parameters, already parsed from the request.
#[derive(Clone, Debug)]
pub struct NewSession {
    pub id: SessionId,
    pub environment: Environment,
    pub plan: Plan,
    /// 0 or `None`: use the plan's.
    pub custom_rate_limit: Option<u32>,
    pub custom_max_keys: Option<u32>,
}

/// What a successful verification answers, plus the reason when the key was malformed
/// (for logs and metrics; never contains the input).
#[derive(Clone, Debug)]
pub struct Verified {
    pub outcome: VerifyOutcome,
    pub malformed: Option<Malformed>,
}

/// A page of audit events.
#[derive(Clone, Debug)]
pub struct AuditPage {
    pub events: Vec<AuditEvent>,
    pub next_page_token: String,
}

/// A page of keys.
#[derive(Clone, Debug)]
pub struct KeyPage {
    pub keys: Vec<KeyRecord>,
    pub next_page_token: String,
}

pub struct KeyService<S> {
    store: Arc<S>,
    hasher: KeyHasher,
    settings: Settings,
    clock: Arc<dyn Clock>,
}

/// Custom limits: 0 means "no override".
fn custom(value: Option<u32>) -> Option<u32> {
    value.filter(|v| *v > 0)
}

fn check_custom_limits(
    violations: &mut Violations,
    rate_limit: Option<u32>,
    max_keys: Option<u32>,
) {
    if rate_limit.is_some_and(|v| v > MAX_RATE_LIMIT_PER_MINUTE) {
        violations.add(
            "custom_rate_limit_per_minute",
            format!("must be at most {MAX_RATE_LIMIT_PER_MINUTE}"),
        );
    }
    if max_keys.is_some_and(|v| v > MAX_KEYS_LIMIT) {
        violations.add(
            "custom_max_keys",
            format!("must be at most {MAX_KEYS_LIMIT}"),
        );
    }
}

/// Free text (names, reasons): bounded, and no control characters, which would garble logs
/// and dashboards.
fn check_text(violations: &mut Violations, field: &str, text: &str, max_chars: usize) {
    if text.chars().count() > max_chars {
        violations.add(field, format!("must be at most {max_chars} characters"));
    } else if text.chars().any(char::is_control) {
        violations.add(field, "must not contain control characters");
    }
}

impl<S: Store> KeyService<S> {
    pub fn new(
        store: Arc<S>,
        hasher: KeyHasher,
        settings: Settings,
        clock: Arc<dyn Clock>,
    ) -> Self {
        KeyService {
            store,
            hasher,
            settings,
            clock,
        }
    }

    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    pub fn plans(&self) -> &PlanTable {
        &self.settings.plans
    }

    pub fn now(&self) -> Millis {
        self.clock.now_ms()
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Refuses limits that leave a session without a rate limit.
    fn check_effective(&self, session: &SessionRecord) -> Result<()> {
        if self
            .plans()
            .effective(
                session.plan,
                session.custom_rate_limit,
                session.custom_max_keys,
            )
            .is_none()
        {
            return Err(DomainError::invalid(
                "custom_rate_limit_per_minute",
                format!(
                    "required for plan {}: the plan table gives it no default rate limit",
                    session.plan
                ),
            )
            .into());
        }
        Ok(())
    }

    /// The audit entry of a change by `actor`, result `OK`, stamped now.
    fn change_entry(
        &self,
        actor: &Actor,
        action: AuditAction,
        session_id: &SessionId,
        key_id: Option<KeyId>,
        detail: String,
    ) -> AuditEntry {
        AuditEntry {
            time_ms: self.now(),
            actor: actor.name().to_owned(),
            action: action.name().to_owned(),
            session_id: session_id.clone(),
            key_id,
            result: "OK".to_owned(),
            detail,
        }
    }

    /// `entry` with the log's retention and a fresh call number: what a change hands its
    /// store call, which writes the entry with the change, atomically. One per store call:
    /// only a resend of that very command carries the same number.
    fn audit<'a>(&self, entry: &'a AuditEntry) -> Audit<'a> {
        Audit {
            entry,
            retention_ms: i64::from(self.settings.audit_retention_days) * MILLIS_PER_DAY,
            call: rand::random(),
        }
    }

    /// Appends the audit entry of a management call that changed nothing: refused, failed,
    /// or a repeat (a change's own entry is written by the store with the change). A failure
    /// to write it is logged, not returned: the caller must learn how its call ended.
    async fn record_unchanged<T>(
        &self,
        actor: &Actor,
        action: AuditAction,
        session_id: &SessionId,
        key_id: Option<KeyId>,
        result: &Result<T>,
        detail: String,
    ) {
        // Requests refused for their form change nothing and only add noise to the log. A
        // session that does not exist has no log: nobody could read one (ListAuditEvents needs
        // the session), and each unknown id would start a new one.
        if matches!(
            result,
            Err(Error::Domain(
                DomainError::InvalidArgument(_)
                    | DomainError::NotFound {
                        resource: Resource::Session,
                        ..
                    }
            ))
        ) {
            return;
        }
        let entry = AuditEntry {
            result: result
                .as_ref()
                .map_or_else(Error::code_name, |_| "OK")
                .to_owned(),
            ..self.change_entry(actor, action, session_id, key_id, detail)
        };
        if let Err(err) = self.store.append_audit(self.audit(&entry)).await {
            metrics::counter!("sendable_keys_audit_write_failures_total").increment(1);
            tracing::error!(
                error = %err,
                action = entry.action,
                session_id = %session_id,
                "could not write the audit log"
            );
        }
    }

    pub async fn create_session(&self, actor: &Actor, new: NewSession) -> Result<SessionRecord> {
        let id = new.id.clone();
        let detail = format!(
            "environment={} plan={} custom_rate_limit_per_minute={} custom_max_keys={}",
            new.environment,
            new.plan,
            custom(new.custom_rate_limit).map_or("-".to_owned(), |v| v.to_string()),
            custom(new.custom_max_keys).map_or("-".to_owned(), |v| v.to_string()),
        );
        let entry = self.change_entry(actor, AuditAction::CreateSession, &id, None, detail);
        let result = self.create_session_inner(new, &entry).await;
        if result.is_err() {
            self.record_unchanged(
                actor,
                AuditAction::CreateSession,
                &id,
                None,
                &result,
                entry.detail,
            )
            .await;
        }
        result
    }

    async fn create_session_inner(
        &self,
        new: NewSession,
        entry: &AuditEntry,
    ) -> Result<SessionRecord> {
        let (rate, max) = (custom(new.custom_rate_limit), custom(new.custom_max_keys));
        let mut violations = Violations::new();
        check_custom_limits(&mut violations, rate, max);
        violations.check()?;
        let now = self.now();
        let record = SessionRecord {
            id: new.id,
            environment: new.environment,
            plan: new.plan,
            enabled: true,
            custom_rate_limit: rate,
            custom_max_keys: max,
            create_ms: now,
            update_ms: now,
            version: 1,
            active_keys: 0,
        };
        self.check_effective(&record)?;
        if !self
            .store
            .create_session(&record, self.audit(entry))
            .await?
        {
            return Err(DomainError::AlreadyExists {
                resource: Resource::Session,
                id: record.id.to_string(),
            }
            .into());
        }
        Ok(record)
    }

    pub async fn get_session(&self, id: &SessionId) -> Result<SessionRecord> {
        self.store
            .get_session(id, self.now())
            .await?
            .ok_or_else(|| session_not_found(id))
    }

    pub async fn update_session(
        &self,
        actor: &Actor,
        id: &SessionId,
        patch: SessionPatch,
    ) -> Result<SessionRecord> {
        // 0 in a custom field means "remove the override".
        let patch = SessionPatch {
            custom_rate_limit: patch.custom_rate_limit.map(custom),
            custom_max_keys: patch.custom_max_keys.map(custom),
            ..patch
        };
        let requested = describe_patch(&patch);
        let result = self
            .update_session_inner(actor, id, patch, &requested)
            .await;
        match &result {
            // Stored with its entry.
            Ok((_, true)) => {}
            // An empty patch: nothing to store, but the call is on record.
            Ok((s, false)) => {
                let detail = updated_detail(&requested, s);
                self.record_unchanged(actor, AuditAction::UpdateSession, id, None, &result, detail)
                    .await;
            }
            Err(_) => {
                self.record_unchanged(
                    actor,
                    AuditAction::UpdateSession,
                    id,
                    None,
                    &result,
                    requested,
                )
                .await;
            }
        }
        result.map(|(session, _)| session)
    }

    /// Applies `patch` with compare-and-set, retrying if another update lands in between;
    /// the session and whether anything was stored (with its audit entry).
    async fn update_session_inner(
        &self,
        actor: &Actor,
        id: &SessionId,
        patch: SessionPatch,
        requested: &str,
    ) -> Result<(SessionRecord, bool)> {
        let mut violations = Violations::new();
        check_custom_limits(
            &mut violations,
            patch.custom_rate_limit.flatten(),
            patch.custom_max_keys.flatten(),
        );
        violations.check()?;
        for _ in 0..UPDATE_ATTEMPTS {
            let current = self.get_session(id).await?;
            if patch == SessionPatch::default() {
                return Ok((current, false));
            }
            let next = patch.apply(&current, self.now().max(current.update_ms));
            self.check_effective(&next)?;
            let entry = self.change_entry(
                actor,
                AuditAction::UpdateSession,
                id,
                None,
                updated_detail(requested, &next),
            );
            match self
                .store
                .replace_session(&next, current.version, self.audit(&entry))
                .await?
            {
                ReplaceSession::Replaced => {
                    let updated = SessionRecord {
                        active_keys: current.active_keys,
                        ..next
                    };
                    return Ok((updated, true));
                }
                ReplaceSession::NotFound => return Err(session_not_found(id)),
                ReplaceSession::VersionConflict => continue,
            }
        }
        Err(DomainError::Aborted(format!(
            "session {id} is being updated concurrently; try again"
        ))
        .into())
    }

    /// Mints and stores a key; returns its record and the full key (shown once).
    pub async fn create_key(
        &self,
        actor: &Actor,
        session_id: &SessionId,
        name: &str,
        expire_ms: Option<Millis>,
    ) -> Result<(KeyRecord, IssuedKey)> {
        let result = self
            .create_key_inner(actor, session_id, name, expire_ms)
            .await;
        if result.is_err() {
            let detail = format!("name={name:?}");
            self.record_unchanged(
                actor,
                AuditAction::CreateKey,
                session_id,
                None,
                &result,
                detail,
            )
            .await;
        }
        result
    }

    async fn create_key_inner(
        &self,
        actor: &Actor,
        session_id: &SessionId,
        name: &str,
        expire_ms: Option<Millis>,
    ) -> Result<(KeyRecord, IssuedKey)> {
        let now = self.now();
        let mut violations = Violations::new();
        check_text(&mut violations, "name", name, MAX_KEY_NAME_LEN);
        if let Some(at) = expire_ms {
            if at <= now {
                violations.add("expire_time", "must be in the future");
            } else if at - now > MAX_EXPIRY_MS {
                violations.add("expire_time", "must be at most ten years ahead");
            }
        }
        violations.check()?;
        let session = self.get_session(session_id).await?;
        for _ in 0..KEY_ID_ATTEMPTS {
            let (record, issued) =
                self.mint(&session.id, session.environment, name, now, expire_ms);
            let hash = self.hasher.hash(issued.expose());
            let new = NewKey {
                record: &record,
                hash,
                hash_version: HASH_VERSION,
            };
            let detail = format!(
                "created {} name={:?} expire_time={}",
                record.display_prefix(),
                record.name,
                record.expire_ms.map_or("never".to_owned(), rfc3339)
            );
            let entry = self.change_entry(
                actor,
                AuditAction::CreateKey,
                session_id,
                Some(record.id),
                detail,
            );
            match self
                .store
                .insert_key(new, self.plans().max_keys(), now, self.audit(&entry))
                .await?
            {
                InsertKey::Created { .. } => return Ok((record, issued)),
                InsertKey::KeyIdTaken => continue,
                InsertKey::SessionNotFound => return Err(session_not_found(session_id)),
                InsertKey::LimitReached { max_keys, plan } => {
                    return Err(DomainError::KeyLimitReached {
                        session_id: session_id.to_string(),
                        plan,
                        max_keys,
                        rotating: false,
                    }
                    .into());
                }
            }
        }
        Err(DomainError::Aborted("could not draw an unused key id; try again".into()).into())
    }

    fn mint(
        &self,
        session_id: &SessionId,
        environment: Environment,
        name: &str,
        now: Millis,
        expire_ms: Option<Millis>,
    ) -> (KeyRecord, IssuedKey) {
        let mut rng = rand::rng();
        let key_id = KeyId::generate_in_shard(session_id.shard(), &mut rng);
        let issued = IssuedKey::generate(environment, key_id, &mut rng);
        let record = KeyRecord {
            id: key_id,
            session_id: session_id.clone(),
            environment,
            name: name.to_owned(),
            state: KeyState::Active,
            create_ms: now,
            last_used_ms: None,
            expire_ms,
            revoke_ms: None,
            revoke_reason: String::new(),
            replaced_by: None,
        };
        (record, issued)
    }

    pub async fn get_key(&self, id: &KeyId) -> Result<KeyRecord> {
        self.store
            .get_key(id)
            .await?
            .ok_or_else(|| key_not_found(id))
    }

    pub async fn list_keys(
        &self,
        session_id: &SessionId,
        page_size: i32,
        page_token: &str,
    ) -> Result<KeyPage> {
        let limit = paging::page_size(page_size)?;
        let after = paging::decode_token("keys", page_token)?
            .map(|position| {
                parse_cursor(&position).ok_or_else(|| {
                    DomainError::invalid("page_token", "not a page token of this list")
                })
            })
            .transpose()?;
        // The session must exist: an empty page for a typo'd id would hide the mistake.
        self.get_session(session_id).await?;
        // One extra record tells whether another page follows.
        let mut keys = self.store.list_keys(session_id, after, limit + 1).await?;
        let next_page_token = if keys.len() > limit {
            keys.truncate(limit);
            keys.last()
                .map(|k| paging::encode_token("keys", &format!("{}:{}", k.create_ms, k.id)))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(KeyPage {
            keys,
            next_page_token,
        })
    }

    /// Revokes a key now and for good. Revoking a revoked key returns it unchanged.
    pub async fn revoke_key(&self, actor: &Actor, id: &KeyId, reason: &str) -> Result<KeyRecord> {
        let mut violations = Violations::new();
        check_text(&mut violations, "reason", reason, MAX_REVOKE_REASON_LEN);
        violations.check()?;
        let key = self.get_key(id).await?;
        let now = self.now();
        let entry = self.change_entry(
            actor,
            AuditAction::RevokeKey,
            &key.session_id,
            Some(*id),
            format!("reason={reason:?}"),
        );
        let outcome = self
            .store
            .revoke_key(id, &key.session_id, reason, now, self.audit(&entry))
            .await;
        // Revoked by this call: its entry was written with the revocation.
        let (result, detail) = match outcome {
            Ok(RevokeKey::Revoked(k)) => return Ok(*k),
            Ok(RevokeKey::AlreadyRevoked(k)) => (
                Ok(*k),
                format!("already revoked; reason={reason:?} ignored"),
            ),
            Ok(RevokeKey::NotFound) => (Err(key_not_found(id)), entry.detail),
            Err(err) => (Err(Error::from(err)), entry.detail),
        };
        self.record_unchanged(
            actor,
            AuditAction::RevokeKey,
            &key.session_id,
            Some(*id),
            &result,
            detail,
        )
        .await;
        result
    }

    /// Issues a replacement for `id` with the same session, name and lifetime; the old key
    /// stays valid for `grace_ms` (0 revokes it now). Returns (old, new, new full key).
    pub async fn rotate_key(
        &self,
        actor: &Actor,
        id: &KeyId,
        grace_ms: Millis,
    ) -> Result<(KeyRecord, KeyRecord, IssuedKey)> {
        if !(0..=MAX_GRACE_MS).contains(&grace_ms) {
            return Err(
                DomainError::invalid("grace_period", "must be between 0 and 30 days").into(),
            );
        }
        let old = self.get_key(id).await?;
        let result = self.rotate_key_inner(actor, &old, grace_ms).await;
        if result.is_err() {
            self.record_unchanged(
                actor,
                AuditAction::RotateKey,
                &old.session_id,
                Some(*id),
                &result,
                format!("grace_period_ms={grace_ms}"),
            )
            .await;
        }
        result
    }

    async fn rotate_key_inner(
        &self,
        actor: &Actor,
        old: &KeyRecord,
        grace_ms: Millis,
    ) -> Result<(KeyRecord, KeyRecord, IssuedKey)> {
        let id = &old.id;
        let now = self.now();
        check_rotatable(old, now)?;
        // The replacement keeps the old key's lifetime, counted from now.
        let expire_ms = old.expire_ms.map(|x| now + (x - old.create_ms));
        let old_expires_at = (grace_ms > 0).then_some(now + grace_ms);
        for _ in 0..KEY_ID_ATTEMPTS {
            let (record, issued) =
                self.mint(&old.session_id, old.environment, &old.name, now, expire_ms);
            let hash = self.hasher.hash(issued.expose());
            let new = NewKey {
                record: &record,
                hash,
                hash_version: HASH_VERSION,
            };
            // The old key's end as the store sets it: the grace period's, or its own if
            // sooner.
            let detail = match old_expires_at.map(|at| old.expire_ms.map_or(at, |x| x.min(at))) {
                Some(x) => format!(
                    "replaced by {}; old key expires at {}",
                    record.display_prefix(),
                    rfc3339(x)
                ),
                None => format!("replaced by {}; old key revoked", record.display_prefix()),
            };
            let entry = self.change_entry(
                actor,
                AuditAction::RotateKey,
                &old.session_id,
                Some(*id),
                detail,
            );
            match self
                .store
                .rotate_key(
                    id,
                    new,
                    old_expires_at,
                    self.plans().max_keys(),
                    now,
                    self.audit(&entry),
                )
                .await?
            {
                RotateKey::Rotated { old, new } => return Ok((*old, *new, issued)),
                RotateKey::KeyIdTaken => continue,
                RotateKey::LimitReached { max_keys, plan } => {
                    return Err(DomainError::KeyLimitReached {
                        session_id: old.session_id.to_string(),
                        plan,
                        max_keys,
                        rotating: true,
                    }
                    .into());
                }
                RotateKey::NotFound => return Err(key_not_found(id)),
                // Lost a race with a concurrent revoke or rotate: report what happened.
                RotateKey::NotActive | RotateKey::AlreadyRotated => {
                    let current = self.get_key(id).await?;
                    check_rotatable(&current, now)?;
                    return Err(DomainError::Aborted(format!(
                        "key {id} changed during rotation; try again"
                    ))
                    .into());
                }
            }
        }
        Err(DomainError::Aborted("could not draw an unused key id; try again".into()).into())
    }

    /// A session's audit events, newest first.
    pub async fn list_audit_events(
        &self,
        session_id: &SessionId,
        page_size: i32,
        page_token: &str,
    ) -> Result<AuditPage> {
        let limit = paging::page_size(page_size)?;
        let before = paging::decode_token("audit", page_token)?
            .map(|position| {
                parse_event_id(&position).ok_or_else(|| {
                    DomainError::invalid("page_token", "not a page token of this list")
                })
            })
            .transpose()?;
        self.get_session(session_id).await?;
        let mut events = self.store.list_audit(session_id, before, limit + 1).await?;
        let next_page_token = if events.len() > limit {
            events.truncate(limit);
            events
                .last()
                .map(|e| paging::encode_token("audit", &e.id))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(AuditPage {
            events,
            next_page_token,
        })
    }

    /// The hot path: local format and checksum check, then one store call.
    pub async fn verify(
        &self,
        presented: &str,
        expected_environment: Option<Environment>,
        cost: u32,
    ) -> Result<Verified> {
        if cost > MAX_COST {
            return Err(DomainError::invalid("cost", format!("must be at most {MAX_COST}")).into());
        }
        let parsed = match key::parse(presented) {
            Ok(parsed) => parsed,
            Err(reason) => {
                count_decision(Decision::Malformed);
                return Ok(Verified {
                    outcome: VerifyOutcome::unattributed(Decision::Malformed, None),
                    malformed: Some(reason),
                });
            }
        };
        let request = VerifyRequest {
            key_id: parsed.key_id,
            hash: self.hasher.hash(parsed.expose()),
            hash_version: HASH_VERSION,
            expected_environment,
            cost: cost.max(1),
            now: self.now(),
            plan_rate_limits: self.plans().rate_limits(),
            usage_retention_days: self.settings.usage_retention_days,
        };
        let mut outcome = self.store.verify(&request).await?;
        outcome.key_id = Some(parsed.key_id);
        count_decision(outcome.decision);
        Ok(Verified {
            outcome,
            malformed: None,
        })
    }
}

/// An UpdateSession entry's detail: what was asked, then the session as it now stands.
fn updated_detail(requested: &str, s: &SessionRecord) -> String {
    format!(
        "{requested}; now plan={} enabled={} custom_rate_limit_per_minute={} custom_max_keys={}",
        s.plan,
        s.enabled,
        s.custom_rate_limit
            .map_or("-".to_owned(), |v| v.to_string()),
        s.custom_max_keys.map_or("-".to_owned(), |v| v.to_string()),
    )
}

fn describe_patch(patch: &SessionPatch) -> String {
    let mut parts = Vec::new();
    if let Some(plan) = patch.plan {
        parts.push(format!("plan={plan}"));
    }
    if let Some(enabled) = patch.enabled {
        parts.push(format!("enabled={enabled}"));
    }
    if let Some(v) = patch.custom_rate_limit {
        parts.push(format!(
            "custom_rate_limit_per_minute={}",
            v.map_or("cleared".to_owned(), |v| v.to_string())
        ));
    }
    if let Some(v) = patch.custom_max_keys {
        parts.push(format!(
            "custom_max_keys={}",
            v.map_or("cleared".to_owned(), |v| v.to_string())
        ));
    }
    if parts.is_empty() {
        "no change requested".to_owned()
    } else {
        format!("requested {}", parts.join(" "))
    }
}

fn check_rotatable(key: &KeyRecord, now: Millis) -> Result<()> {
    match key.status_at(now) {
        KeyStatus::Active if key.replaced_by.is_some() => Err(DomainError::FailedPrecondition {
            reason: "KEY_ALREADY_ROTATED",
            message: format!(
                "key {} was already rotated; rotate its replacement {} instead",
                key.id,
                key.replaced_by.map(|k| k.to_string()).unwrap_or_default()
            ),
        }
        .into()),
        KeyStatus::Active => Ok(()),
        status => Err(DomainError::FailedPrecondition {
            reason: "KEY_NOT_ACTIVE",
            message: format!(
                "key {} is {}; only active keys can be rotated",
                key.id,
                if status == KeyStatus::Revoked {
                    "revoked"
                } else {
                    "expired"
                }
            ),
        }
        .into()),
    }
}

/// A key listing position, `<create ms>:<key id>`, as written into page tokens.
fn parse_cursor(position: &str) -> Option<KeyCursor> {
    let (ms, id) = position.split_once(':')?;
    Some(KeyCursor {
        create_ms: ms.parse().ok().filter(|ms: &Millis| *ms >= 0)?,
        key_id: KeyId::parse(id)?,
    })
}

fn session_not_found(id: &SessionId) -> Error {
    DomainError::NotFound {
        resource: Resource::Session,
        id: id.to_string(),
    }
    .into()
}

fn key_not_found(id: &KeyId) -> Error {
    DomainError::NotFound {
        resource: Resource::Key,
        id: id.to_string(),
    }
    .into()
}

/// Counts a VerifyKey decision. The counter of each decision is looked up in the metrics
/// registry once (a lookup per call showed in the VerifyKey profile).
fn count_decision(decision: Decision) {
    static COUNTERS: std::sync::OnceLock<[metrics::Counter; 8]> = std::sync::OnceLock::new();
    let counters = COUNTERS.get_or_init(|| {
        Decision::ALL.map(
            |d| metrics::counter!("sendable_keys_verify_decisions_total", "decision" => d.name()),
        )
    });
    // `ALL` lists the decisions in code order, from 1.
    counters[usize::from(decision.code() - 1)].increment(1);
}
