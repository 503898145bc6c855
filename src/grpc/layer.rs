//! The request layer every gRPC call passes through, once, in front of every service: it
//! authenticates the caller and checks its role ([`crate::auth`]), hands the caller's name to
//! the handlers (for the audit log), opens the request's tracing span (continuing a W3C
//! `traceparent` from the metadata when OTLP export is on), and records the request metrics
//! (`sendable_keys_grpc_requests_total{method,code,caller}` and the latency histogram
//! `sendable_keys_grpc_request_duration_seconds{method}`). It also puts tonic's own refusals
//! (a body that is not the method's message, one over the size limit) in the service's error
//! model ([`super::status::from_transport_refusal`]). Handlers keep none of this bookkeeping.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, LazyLock, RwLock};
use std::task::{Context, Poll};
use std::time::Instant;

use metrics::{Counter, Histogram};
use tonic::Code;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tower::{Layer, Service};
use tracing::Instrument;

use super::status::{self, access_denied};
use crate::auth::{self, Credentials};
use crate::domain::Actor;
use crate::telemetry::{THROTTLED_LINES_PER_SECOND, Throttle};

/// Every method this server knows, by path, with its metrics label. Unknown paths share the
/// label `other`, so a scanner probing random paths cannot blow up the label set.
const METHODS: [(&str, &str); 20] = [
    (
        "/sendable.keys.v1.KeyService/CreateSession",
        "CreateSession",
    ),
    ("/sendable.keys.v1.KeyService/GetSession", "GetSession"),
    (
        "/sendable.keys.v1.KeyService/UpdateSession",
        "UpdateSession",
    ),
    ("/sendable.keys.v1.KeyService/CreateKey", "CreateKey"),
    ("/sendable.keys.v1.KeyService/GetKey", "GetKey"),
    ("/sendable.keys.v1.KeyService/ListKeys", "ListKeys"),
    ("/sendable.keys.v1.KeyService/RevokeKey", "RevokeKey"),
    ("/sendable.keys.v1.KeyService/RotateKey", "RotateKey"),
    ("/sendable.keys.v1.KeyService/VerifyKey", "VerifyKey"),
    (
        "/sendable.keys.v1.KeyService/ListAuditEvents",
        "ListAuditEvents",
    ),
    (
        "/sendable.keys.v1.UsageService/RecordOutcomes",
        "RecordOutcomes",
    ),
    ("/sendable.keys.v1.UsageService/GetKeyUsage", "GetKeyUsage"),
    (
        "/sendable.keys.v1.UsageService/GetSessionUsage",
        "GetSessionUsage",
    ),
    (
        "/sendable.keys.v1.UsageService/GetRateLimitStatus",
        "GetRateLimitStatus",
    ),
    ("/sendable.keys.v1.UsageService/ListAlerts", "ListAlerts"),
    ("/sendable.keys.v1.UsageService/WatchAlerts", "WatchAlerts"),
    ("/grpc.health.v1.Health/Check", "health.Check"),
    ("/grpc.health.v1.Health/Watch", "health.Watch"),
    (
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "reflection.v1",
    ),
    (
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "reflection.v1alpha",
    ),
];

fn method_label(path: &str) -> &'static str {
    METHODS
        .iter()
        .find(|(p, _)| *p == path)
        .map_or("other", |(_, label)| label)
}

/// gRPC code names as Prometheus label values.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Who may call: configured credentials, or (without them) loopback peers only.
#[derive(Clone, Debug)]
pub struct AccessPolicy {
    credentials: Option<Credentials>,
    /// Continue incoming W3C trace contexts (only worth the work when spans are exported).
    propagate_traces: bool,
}

impl AccessPolicy {
    pub fn new(credentials: Option<Credentials>, propagate_traces: bool) -> Self {
        AccessPolicy {
            credentials: credentials.filter(|c| !c.is_empty()),
            propagate_traces,
        }
    }

    /// Decides a request: the caller (name for logs, audit and metrics) or the refusal, with
    /// the name of the caller when it was known but lacked the role.
    fn check(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        peer: Option<SocketAddr>,
    ) -> Result<Actor, (tonic::Status, Option<String>)> {
        let Some(credentials) = &self.credentials else {
            // Canonical: on a dual-stack `[::]` listener a local IPv4 client arrives as
            // `::ffff:127.0.0.1`, which `Ipv6Addr::is_loopback` alone does not accept.
            if auth::is_open(path) || peer.is_some_and(|p| p.ip().to_canonical().is_loopback()) {
                return Ok(Actor::anonymous());
            }
            return Err((
                access_denied(
                    Code::PermissionDenied,
                    "this server has no credentials configured and serves only loopback callers; \
                     set SENDABLE_KEYS_CREDENTIALS_FILE",
                ),
                None,
            ));
        };
        let token = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(auth::presented_token);
        let caller = token.and_then(|t| credentials.authenticate(t));
        if auth::is_open(path) {
            return Ok(caller.map_or_else(Actor::anonymous, |c| Actor(c.name.clone())));
        }
        let Some(caller) = caller else {
            let message = if token.is_none() {
                "missing credentials: send `authorization: Bearer <token>`"
            } else {
                "invalid token"
            };
            return Err((access_denied(Code::Unauthenticated, message), None));
        };
        if !auth::allows(caller.role, path) {
            let message = format!(
                "caller {} (role {}) may not call {}; it needs role admin",
                caller.name,
                caller.role.name(),
                method_label(path)
            );
            return Err((
                access_denied(Code::PermissionDenied, message),
                Some(caller.name.clone()),
            ));
        }
        Ok(Actor(caller.name.clone()))
    }
}

/// The peer's address, whether the connection is plain TCP or TLS.
fn peer_of<B>(request: &http::Request<B>) -> Option<SocketAddr> {
    let ext = request.extensions();
    ext.get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            ext.get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|tls| tls.get_ref().remote_addr())
        })
}

#[derive(Clone, Debug)]
pub struct RequestLayer {
    policy: Arc<AccessPolicy>,
}

impl RequestLayer {
    pub fn new(policy: AccessPolicy) -> Self {
        RequestLayer {
            policy: Arc::new(policy),
        }
    }
}

impl<S> Layer<S> for RequestLayer {
    type Service = RequestService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestService {
            inner,
            policy: self.policy.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct RequestService<S> {
    inner: S,
    policy: Arc<AccessPolicy>,
}

/// Reads a W3C trace context from request metadata.
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// A request's metric handles, by method, code and caller.
type Handles = HashMap<(&'static str, &'static str, String), (Counter, Histogram)>;

/// Looking a labelled metric up in the registry builds, hashes and compares its key: ~2k
/// instructions per request in the VerifyKey profile. The label sets are few (methods × codes ×
/// configured callers), so each is looked up once and its handles kept.
static HANDLES: LazyLock<RwLock<Handles>> = LazyLock::new(RwLock::default);

fn record(method: &'static str, code: &'static str, caller: String, started: Instant) {
    let elapsed = started.elapsed().as_secs_f64();
    let key = (method, code, caller);
    let known = HANDLES
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(&key)
        .cloned();
    let (requests, duration) = known.unwrap_or_else(|| {
        let handles = (
            metrics::counter!("sendable_keys_grpc_requests_total", "method" => method, "code" => code, "caller" => key.2.clone()),
            metrics::histogram!("sendable_keys_grpc_request_duration_seconds", "method" => method),
        );
        HANDLES
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key, handles.clone());
        handles
    });
    requests.increment(1);
    duration.record(elapsed);
}

impl<S, B, RB> Service<http::Request<B>> for RequestService<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let started = Instant::now();
        let method = method_label(request.uri().path());
        let actor = match self.policy.check(
            request.uri().path(),
            request.headers(),
            peer_of(&request),
        ) {
            Ok(actor) => actor,
            Err((status, caller)) => {
                let code = code_name(status.code());
                // A client without a token can send these as fast as it likes; it gets its own
                // budget, so it cannot crowd out a known caller's refusals.
                static ANONYMOUS: Throttle = Throttle::new(THROTTLED_LINES_PER_SECOND);
                static KNOWN: Throttle = Throttle::new(THROTTLED_LINES_PER_SECOND);
                let log = if caller.is_some() { &KNOWN } else { &ANONYMOUS };
                let caller = caller.unwrap_or_else(|| "unauthenticated".to_owned());
                if let Some(suppressed) = log.admit() {
                    tracing::warn!(method, code, %caller, peer = ?peer_of(&request), suppressed, "request refused: {}", status.message());
                }
                record(method, code, caller, started);
                return Box::pin(std::future::ready(Ok(status.into_http())));
            }
        };
        let span = tracing::info_span!("rpc", rpc.method = method, caller = actor.name());
        if self.policy.propagate_traces {
            use tracing_opentelemetry::OpenTelemetrySpanExt;
            let parent = opentelemetry::global::get_text_map_propagator(|p| {
                p.extract(&HeaderExtractor(request.headers()))
            });
            let _ = span.set_parent(parent);
        }
        let caller = actor.name().to_owned();
        request.extensions_mut().insert(actor);
        // The clone is the service that is ready (tower's readiness contract).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(
            async move {
                let mut response = inner.call(request).await;
                // Handler errors are trailers-only responses: the status is in the headers.
                // A response without one succeeded (for streams: at least started).
                let mut code = match &response {
                    Ok(r) => r
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i32>().ok())
                        .map_or("OK", |c| code_name(Code::from_i32(c))),
                    Err(_) => "INTERNAL",
                };
                // An error without details is tonic's own refusal (an undecodable or oversized
                // message): answered in this service's error model instead.
                if let Ok(r) = &response
                    && code != "OK"
                    && !r.headers().contains_key("grpc-status-details-bin")
                    && let Some(ours) = tonic::Status::from_header_map(r.headers())
                        .as_ref()
                        .and_then(status::from_transport_refusal)
                {
                    code = code_name(ours.code());
                    response = Ok(ours.into_http());
                }
                record(method, code, caller, started);
                if code != "OK" {
                    tracing::debug!(code, "request failed");
                }
                response
            }
            .instrument(span),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    fn policy() -> AccessPolicy {
        let text = format!(
            "[[caller]]\nname = \"ops\"\nrole = \"admin\"\ntoken_sha256 = \"{}\"\n[[caller]]\nname = \"chat\"\nrole = \"service\"\ntoken_sha256 = \"{}\"\n",
            hex::encode(Sha256::digest(b"admin-token")),
            hex::encode(Sha256::digest(b"chat-token"))
        );
        AccessPolicy::new(Some(Credentials::from_toml(&text).expect("valid")), false)
    }

    fn headers(token: Option<&str>) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        if let Some(t) = token {
            h.insert(
                http::header::AUTHORIZATION,
                format!("Bearer {t}").parse().expect("header"),
            );
        }
        h
    }

    const VERIFY: &str = "/sendable.keys.v1.KeyService/VerifyKey";
    const CREATE: &str = "/sendable.keys.v1.KeyService/CreateKey";
    const HEALTH: &str = "/grpc.health.v1.Health/Check";

    #[test]
    fn credentials_and_roles_decide() {
        let p = policy();
        let remote: Option<SocketAddr> = "10.1.2.3:5555".parse().ok();
        assert_eq!(
            p.check(VERIFY, &headers(Some("chat-token")), remote)
                .ok()
                .map(|a| a.0),
            Some("chat".into())
        );
        assert_eq!(
            p.check(CREATE, &headers(Some("admin-token")), remote)
                .ok()
                .map(|a| a.0),
            Some("ops".into())
        );
        let (denied, who) = p
            .check(CREATE, &headers(Some("chat-token")), remote)
            .expect_err("service may not create");
        assert_eq!(denied.code(), Code::PermissionDenied);
        assert_eq!(
            who.as_deref(),
            Some("chat"),
            "metrics name the refused caller"
        );
        for token in [None, Some("wrong"), Some("")] {
            let (err, who) = p
                .check(VERIFY, &headers(token), remote)
                .expect_err("no valid token");
            assert_eq!(err.code(), Code::Unauthenticated, "{token:?}");
            assert_eq!(who, None);
        }
        assert!(
            p.check(HEALTH, &headers(None), remote).is_ok(),
            "health is open"
        );
    }

    #[test]
    fn without_credentials_only_loopback_peers_are_served() {
        let p = AccessPolicy::new(None, false);
        let loopback = "127.0.0.1:4000".parse().ok();
        let loopback6 = "[::1]:4000".parse().ok();
        let remote = "192.168.1.9:4000".parse().ok();
        assert_eq!(
            p.check(CREATE, &headers(None), loopback).ok().map(|a| a.0),
            Some(Actor::ANONYMOUS.into())
        );
        assert!(p.check(CREATE, &headers(None), loopback6).is_ok());
        // A local IPv4 client on a dual-stack `[::]` listener.
        let mapped = "[::ffff:127.0.0.1]:4000".parse().ok();
        assert!(p.check(CREATE, &headers(None), mapped).is_ok());
        let mapped_remote = "[::ffff:192.168.1.9]:4000".parse().ok();
        assert!(p.check(CREATE, &headers(None), mapped_remote).is_err());
        let (err, _) = p
            .check(VERIFY, &headers(None), remote)
            .expect_err("remote peer");
        assert_eq!(err.code(), Code::PermissionDenied);
        assert!(err.message().contains("SENDABLE_KEYS_CREDENTIALS_FILE"));
        assert!(
            p.check(VERIFY, &headers(None), None).is_err(),
            "unknown peer is not loopback"
        );
        assert!(
            p.check(HEALTH, &headers(None), remote).is_ok(),
            "probes still work"
        );
    }

    #[test]
    fn unknown_paths_share_one_label() {
        assert_eq!(method_label(VERIFY), "VerifyKey");
        assert_eq!(method_label("/x.Y/Z"), "other");
    }
}
