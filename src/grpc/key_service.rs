//! `sendable.keys.v1.KeyService` over tonic.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert::{self, key_proto, session_proto, timestamp, verify_proto};
use super::pb;
use super::pb::key_service_server::KeyService as KeyServiceApi;
use super::status::{invalid_argument, to_status};
use crate::domain::key::MAX_KEY_LEN;
use crate::domain::{Actor, SessionPatch, Violations};
use crate::service::KeyService;
use crate::service::keys::NewSession;
use crate::store::Store;

/// The caller of a request, as established by the auth layer (anonymous without one).
pub fn actor<T>(request: &Request<T>) -> Actor {
    request
        .extensions()
        .get::<Actor>()
        .cloned()
        .unwrap_or_else(Actor::anonymous)
}

pub struct KeyGrpc<S> {
    service: Arc<KeyService<S>>,
}

impl<S> KeyGrpc<S> {
    pub fn new(service: Arc<KeyService<S>>) -> Self {
        KeyGrpc { service }
    }
}

/// Turns collected violations into INVALID_ARGUMENT, else passes the decoded values on.
fn decoded<T>(violations: Violations, value: impl FnOnce() -> Option<T>) -> Result<T, Status> {
    violations.check().map_err(|e| invalid_argument(&e))?;
    // Every decoder that returns None also records a violation, so this is reached only when a
    // field was missing without one: still a bad request, never a panic.
    value().ok_or_else(|| {
        invalid_argument(&crate::domain::DomainError::invalid(
            "request",
            "is incomplete",
        ))
    })
}

#[tonic::async_trait]
impl<S: Store> KeyServiceApi for KeyGrpc<S> {
    async fn create_session(
        &self,
        request: Request<pb::CreateSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let actor = actor(&request);
        let req = request.into_inner();
        let mut v = Violations::new();
        let id = convert::session_id(&mut v, "session_id", &req.session_id);
        let environment = convert::environment(&mut v, "environment", req.environment);
        let plan = convert::plan(&mut v, "plan", req.plan);
        let new = decoded(v, || {
            Some(NewSession {
                id: id?,
                environment: environment?,
                plan: plan?,
                custom_rate_limit: req.custom_rate_limit_per_minute,
                custom_max_keys: req.custom_max_keys,
            })
        })?;
        let session = self
            .service
            .create_session(&actor, new)
            .await
            .map_err(|e| to_status(&e))?;
        tracing::info!(session_id = %session.id, plan = %session.plan, environment = %session.environment, "session created");
        Ok(Response::new(self.session(&session)))
    }

    async fn get_session(
        &self,
        request: Request<pb::GetSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let req = request.into_inner();
        let mut v = Violations::new();
        let id = convert::session_id(&mut v, "session_id", &req.session_id);
        let id = decoded(v, || id)?;
        let session = self
            .service
            .get_session(&id)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(self.session(&session)))
    }

    async fn update_session(
        &self,
        request: Request<pb::UpdateSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let actor = actor(&request);
        let req = request.into_inner();
        let mut v = Violations::new();
        let id = convert::session_id(&mut v, "session_id", &req.session_id);
        let plan = req.plan.and_then(|p| convert::plan(&mut v, "plan", p));
        let id = decoded(v, || id)?;
        let patch = SessionPatch {
            plan,
            enabled: req.enabled,
            custom_rate_limit: req.custom_rate_limit_per_minute.map(Some),
            custom_max_keys: req.custom_max_keys.map(Some),
        };
        let session = self
            .service
            .update_session(&actor, &id, patch)
            .await
            .map_err(|e| to_status(&e))?;
        tracing::info!(session_id = %session.id, plan = %session.plan, enabled = session.enabled, "session updated");
        Ok(Response::new(self.session(&session)))
    }

    async fn create_key(
        &self,
        request: Request<pb::CreateKeyRequest>,
    ) -> Result<Response<pb::CreateKeyResponse>, Status> {
        let actor = actor(&request);
        let req = request.into_inner();
        let mut v = Violations::new();
        let session_id = convert::session_id(&mut v, "session_id", &req.session_id);
        let expire = req
            .expire_time
            .as_ref()
            .map(|t| convert::millis_of(&mut v, "expire_time", t));
        let (session_id, expire_ms) = decoded(v, || Some((session_id?, expire.flatten())))?;
        let (record, issued) = self
            .service
            .create_key(&actor, &session_id, &req.name, expire_ms)
            .await
            .map_err(|e| to_status(&e))?;
        tracing::info!(session_id = %session_id, key = %record.display_prefix(), "key created");
        Ok(Response::new(pb::CreateKeyResponse {
            key: Some(key_proto(&record, self.service.now())),
            secret: issued.into_exposed(),
        }))
    }

    async fn get_key(
        &self,
        request: Request<pb::GetKeyRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        let req = request.into_inner();
        let mut v = Violations::new();
        let id = convert::key_id(&mut v, "key_id", &req.key_id);
        let id = decoded(v, || id)?;
        let key = self.service.get_key(&id).await.map_err(|e| to_status(&e))?;
        Ok(Response::new(key_proto(&key, self.service.now())))
    }

    async fn list_keys(
        &self,
        request: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        let req = request.into_inner();
        let mut v = Violations::new();
        let id = convert::session_id(&mut v, "session_id", &req.session_id);
        let id = decoded(v, || id)?;
        let page = self
            .service
            .list_keys(&id, req.page_size, &req.page_token)
            .await
            .map_err(|e| to_status(&e))?;
        let now = self.service.now();
        Ok(Response::new(pb::ListKeysResponse {
            keys: page.keys.iter().map(|k| key_proto(k, now)).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn revoke_key(
        &self,
        request: Request<pb::RevokeKeyRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        let actor = actor(&request);
        let req = request.into_inner();
        let mut v = Violations::new();
        let id = convert::key_id(&mut v, "key_id", &req.key_id);
        let id = decoded(v, || id)?;
        let key = self
            .service
            .revoke_key(&actor, &id, &req.reason)
            .await
            .map_err(|e| to_status(&e))?;
        tracing::info!(session_id = %key.session_id, key = %key.display_prefix(), "key revoked");
        Ok(Response::new(key_proto(&key, self.service.now())))
    }

    async fn rotate_key(
        &self,
        request: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::RotateKeyResponse>, Status> {
        let actor = actor(&request);
        let req = request.into_inner();
        let mut v = Violations::new();
        let id = convert::key_id(&mut v, "key_id", &req.key_id);
        let grace = match &req.grace_period {
            Some(d) => convert::duration_millis(&mut v, "grace_period", d),
            None => Some(0),
        };
        let (id, grace_ms) = decoded(v, || Some((id?, grace?)))?;
        let (old, new, issued) = self
            .service
            .rotate_key(&actor, &id, grace_ms)
            .await
            .map_err(|e| to_status(&e))?;
        tracing::info!(session_id = %new.session_id, old = %old.display_prefix(), new = %new.display_prefix(), grace_ms, "key rotated");
        let now = self.service.now();
        Ok(Response::new(pb::RotateKeyResponse {
            new_key: Some(key_proto(&new, now)),
            secret: issued.into_exposed(),
            old_key: Some(key_proto(&old, now)),
        }))
    }

    async fn verify_key(
        &self,
        request: Request<pb::VerifyKeyRequest>,
    ) -> Result<Response<pb::VerifyKeyResponse>, Status> {
        let req = request.into_inner();
        let mut v = Violations::new();
        let expected =
            convert::optional_environment(&mut v, "expected_environment", req.expected_environment);
        let expected = decoded(v, || expected)?;
        // Reject absurd inputs before even trimming: a key is at most MAX_KEY_LEN characters,
        // and leading/trailing whitespace of a pasted key is never kilobytes long.
        let presented = if req.key.len() > MAX_KEY_LEN + 1024 {
            ""
        } else {
            req.key.as_str()
        };
        let verified = self
            .service
            .verify(presented, expected, req.cost)
            .await
            .map_err(|e| to_status(&e))?;
        if let Some(reason) = verified.malformed {
            tracing::debug!(reason = reason.as_str(), "malformed key presented");
        }
        Ok(Response::new(verify_proto(&verified.outcome)))
    }

    async fn list_audit_events(
        &self,
        request: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        let req = request.into_inner();
        let mut v = Violations::new();
        let id = convert::session_id(&mut v, "session_id", &req.session_id);
        let id = decoded(v, || id)?;
        let page = self
            .service
            .list_audit_events(&id, req.page_size, &req.page_token)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::ListAuditEventsResponse {
            events: page
                .events
                .into_iter()
                .map(|e| pb::AuditEvent {
                    event_id: e.id,
                    time: Some(timestamp(e.entry.time_ms)),
                    caller: e.entry.actor,
                    action: e.entry.action,
                    session_id: e.entry.session_id.to_string(),
                    key_id: e.entry.key_id.map(|k| k.to_string()).unwrap_or_default(),
                    result: e.entry.result,
                    detail: e.entry.detail,
                })
                .collect(),
            next_page_token: page.next_page_token,
        }))
    }
}

impl<S: Store> KeyGrpc<S> {
    fn session(&self, s: &crate::domain::SessionRecord) -> pb::Session {
        let limits = self
            .service
            .plans()
            .effective(s.plan, s.custom_rate_limit, s.custom_max_keys);
        session_proto(s, limits)
    }
}
