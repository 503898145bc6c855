//! Test harness: real stores, the real gRPC server on `127.0.0.1:0`, tonic clients.
//!
//! `Backend` names the three stores every behaviour runs on; [`TestServer::start`] builds a
//! fresh, isolated server for one test (own key prefix on the shared Redis servers, own
//! in-memory store, own manual clock), and stops it when dropped.

#![allow(dead_code)]

pub mod process;
pub mod redis;
pub mod relay;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sendable_keys::app::{self, ServeOptions};
use sendable_keys::domain::{
    KeyHash, KeyHasher, KeyId, KeyRecord, KeyState, Pepper, SessionId, SessionRecord,
};
use sendable_keys::grpc::pb;
use sendable_keys::grpc::pb::key_service_client::KeyServiceClient;
use sendable_keys::service::clock::{Clock, ManualClock};
use sendable_keys::service::{KeyService, Settings};
use sendable_keys::store::Store;
use sendable_keys::store::memory::MemoryStore;
use sendable_keys::store::redis::{RedisConfig, RedisStore};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Channel;

/// 2026-03-02T10:00:00Z: a window boundary, well inside a UTC day, so tests that step through
/// windows start from a known place.
pub const T0: i64 = 1_772_445_600_000;

/// A fixed pepper for tests (never a production value).
pub const TEST_PEPPER: &[u8] = b"test-pepper-0123456789abcdef-0123456789";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Memory,
    Redis,
    Cluster,
}

/// A small deterministic random sequence (xorshift64; `seed` must not be 0), so a randomized
/// test replays the same calls on every store and every run.
pub fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut state = seed;
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}

/// A key prefix no other test uses.
pub fn unique_prefix() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "t{}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        rand::random::<u32>()
    )
}

/// A session id no other test uses.
pub fn unique_session(label: &str) -> String {
    format!("{label}-{}", unique_prefix())
}

pub fn redis_config(backend: Backend, prefix: &str) -> RedisConfig {
    let urls = match backend {
        Backend::Redis => vec![redis::standalone().url()],
        Backend::Cluster => redis::cluster().urls(),
        Backend::Memory => unreachable!("memory has no Redis config"),
    };
    RedisConfig {
        urls,
        cluster: backend == Backend::Cluster,
        pool_size: 2,
        batching: true,
        prefix: prefix.to_owned(),
        timeout: Duration::from_secs(5),
    }
}

/// A running server and a client for it.
pub struct TestServer {
    pub addr: SocketAddr,
    pub channel: Channel,
    pub clock: ManualClock,
    pub backend: Backend,
    pub prefix: String,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    /// A fresh server on its own prefix, with a manual clock at [`T0`].
    pub async fn start(backend: Backend) -> Self {
        Self::start_shared(
            backend,
            &unique_prefix(),
            ManualClock::new(T0),
            Settings::default(),
        )
        .await
    }

    pub async fn start_with(backend: Backend, settings: Settings) -> Self {
        Self::start_shared(backend, &unique_prefix(), ManualClock::new(T0), settings).await
    }

    /// A server on the given prefix and clock: two servers on one prefix are two replicas of
    /// one deployment.
    pub async fn start_shared(
        backend: Backend,
        prefix: &str,
        clock: ManualClock,
        settings: Settings,
    ) -> Self {
        match backend {
            Backend::Memory => {
                Self::spawn(
                    Arc::new(MemoryStore::new()),
                    backend,
                    prefix,
                    clock,
                    settings,
                )
                .await
            }
            Backend::Redis | Backend::Cluster => {
                let store = RedisStore::new(&redis_config(backend, prefix)).expect("redis store");
                store.warm_up().await.expect("redis reachable");
                Self::spawn(Arc::new(store), backend, prefix, clock, settings).await
            }
        }
    }

    /// A server on any store (e.g. a Redis the test owns and can kill).
    pub async fn start_on_store<S: Store>(store: Arc<S>, backend: Backend, prefix: &str) -> Self {
        Self::spawn(
            store,
            backend,
            prefix,
            ManualClock::new(T0),
            Settings::default(),
        )
        .await
    }

    async fn spawn<S: Store>(
        store: Arc<S>,
        backend: Backend,
        prefix: &str,
        clock: ManualClock,
        settings: Settings,
    ) -> Self {
        Self::spawn_with(
            store,
            backend,
            prefix,
            clock,
            settings,
            ServeOptions::default(),
            None,
        )
        .await
    }

    /// A memory-backed server with the given serve options (credentials, TLS, ...); the
    /// client connects with `client_tls` (and then to `localhost`, the name in test certs).
    pub async fn start_with_options(
        options: ServeOptions,
        client_tls: Option<tonic::transport::ClientTlsConfig>,
    ) -> Self {
        Self::spawn_with(
            Arc::new(MemoryStore::new()),
            Backend::Memory,
            &unique_prefix(),
            ManualClock::new(T0),
            Settings::default(),
            options,
            client_tls,
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn spawn_with<S: Store>(
        store: Arc<S>,
        backend: Backend,
        prefix: &str,
        clock: ManualClock,
        settings: Settings,
        options: ServeOptions,
        client_tls: Option<tonic::transport::ClientTlsConfig>,
    ) -> Self {
        let pepper = Pepper::new(TEST_PEPPER.to_vec()).expect("pepper");
        let shared_clock: Arc<dyn Clock> = Arc::new(clock.clone());
        let keys = Arc::new(KeyService::new(
            store,
            KeyHasher::new(&pepper),
            settings,
            shared_clock,
        ));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = oneshot::channel::<()>();
        let options = ServeOptions {
            health_interval: Duration::from_millis(100),
            alert_poll_interval: Duration::from_millis(20),
            ..options
        };
        let handle = tokio::spawn(async move {
            app::serve(keys, listener, options, async {
                let _ = rx.await;
            })
            .await
            .expect("server runs");
        });
        // The listener is already bound, so connecting cannot race the server's startup.
        let channel = match client_tls {
            None => Channel::from_shared(format!("http://{addr}"))
                .expect("uri")
                .connect()
                .await
                .expect("connect"),
            // TLS clients connect lazily: a test may expect the handshake to fail.
            Some(tls) => Channel::from_shared(format!("https://localhost:{}", addr.port()))
                .expect("uri")
                .tls_config(tls)
                .expect("client tls")
                .connect_lazy(),
        };
        TestServer {
            addr,
            channel,
            clock,
            backend,
            prefix: prefix.to_owned(),
            shutdown: Some(tx),
            handle: Some(handle),
        }
    }

    pub fn health(&self) -> tonic_health::pb::health_client::HealthClient<Channel> {
        tonic_health::pb::health_client::HealthClient::new(self.channel.clone())
    }

    /// Waits (on the health Watch stream, no polling) until `service` reports `status`.
    pub async fn wait_health(
        &self,
        service: &str,
        status: tonic_health::pb::health_check_response::ServingStatus,
    ) {
        let mut stream = self
            .health()
            .watch(tonic_health::pb::HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .expect("watch")
            .into_inner();
        let wait = async {
            while let Some(update) = stream.message().await.expect("health stream") {
                if update.status == status as i32 {
                    return;
                }
            }
            panic!("health stream ended before {status:?}");
        };
        tokio::time::timeout(Duration::from_secs(30), wait)
            .await
            .expect("health status reached in time");
    }

    pub fn usage(&self) -> pb::usage_service_client::UsageServiceClient<Channel> {
        pb::usage_service_client::UsageServiceClient::new(self.channel.clone())
    }

    pub fn keys(&self) -> KeyServiceClient<Channel> {
        KeyServiceClient::new(self.channel.clone())
    }

    /// Stops the server and waits for it to finish.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(handle) = self.handle.take() {
            let _ = handle.await;
        }
    }

    /// A redis-rs connection to (one node of) this server's Redis, for white-box checks.
    pub fn redis_urls(&self) -> Vec<String> {
        match self.backend {
            Backend::Memory => Vec::new(),
            Backend::Redis => vec![redis::standalone().url()],
            Backend::Cluster => redis::cluster().urls(),
        }
    }

    /// Redis keys under this server's prefix (0 for the memory store).
    pub fn redis_key_count(&self) -> usize {
        match self.backend {
            Backend::Memory => 0,
            Backend::Redis => redis::count_keys(&redis::standalone().url(), &self.prefix),
            Backend::Cluster => redis::cluster()
                .urls()
                .iter()
                .map(|u| redis::count_keys(u, &self.prefix))
                .sum(),
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Expands one async test function per backend: `mod memory`, `mod redis`, `mod cluster`,
/// each with a test named like the function, so `cargo test cluster::` runs one store.
#[macro_export]
macro_rules! for_all_stores {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Memory).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Redis).await;
                }
            )*
        }
        mod cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Cluster).await;
                }
            )*
        }
    };
}

// ---- request helpers -------------------------------------------------------------------

pub async fn create_session(
    client: &mut KeyServiceClient<Channel>,
    id: &str,
    plan: pb::Plan,
    environment: pb::Environment,
) -> pb::Session {
    client
        .create_session(pb::CreateSessionRequest {
            session_id: id.to_owned(),
            environment: environment as i32,
            plan: plan as i32,
            custom_rate_limit_per_minute: None,
            custom_max_keys: None,
        })
        .await
        .expect("create session")
        .into_inner()
}

/// A live Enterprise session with its own rate limit (and the plan's key limit).
pub async fn create_enterprise_session(
    client: &mut KeyServiceClient<Channel>,
    id: &str,
    rate_limit_per_minute: u32,
) -> pb::Session {
    client
        .create_session(pb::CreateSessionRequest {
            session_id: id.to_owned(),
            environment: pb::Environment::Live as i32,
            plan: pb::Plan::Enterprise as i32,
            custom_rate_limit_per_minute: Some(rate_limit_per_minute),
            custom_max_keys: None,
        })
        .await
        .expect("create enterprise session")
        .into_inner()
}

pub async fn create_key(
    client: &mut KeyServiceClient<Channel>,
    session: &str,
) -> (pb::ApiKey, String) {
    let response = client
        .create_key(pb::CreateKeyRequest {
            session_id: session.to_owned(),
            name: "test key".to_owned(),
            expire_time: None,
        })
        .await
        .expect("create key")
        .into_inner();
    (response.key.expect("key in response"), response.secret)
}

/// The session's newest audit events (up to 100), newest first.
pub async fn audit_events(
    client: &mut KeyServiceClient<Channel>,
    session: &str,
) -> Vec<pb::AuditEvent> {
    client
        .list_audit_events(pb::ListAuditEventsRequest {
            session_id: session.to_owned(),
            page_size: 100,
            page_token: String::new(),
        })
        .await
        .expect("audit")
        .into_inner()
        .events
}

/// VerifyKey with no expected environment and the default cost, failure included: for tests
/// that expect the call itself to fail.
pub async fn try_verify(
    client: &mut KeyServiceClient<Channel>,
    key: &str,
) -> Result<pb::VerifyKeyResponse, tonic::Status> {
    client
        .verify_key(pb::VerifyKeyRequest {
            key: key.to_owned(),
            expected_environment: 0,
            cost: 0,
        })
        .await
        .map(tonic::Response::into_inner)
}

pub async fn verify(client: &mut KeyServiceClient<Channel>, key: &str) -> pb::VerifyKeyResponse {
    try_verify(client, key).await.expect("verify")
}

/// Verifies `key` until an answer comes, for at most `within`; every failure on the way must
/// be UNAVAILABLE, the store's "no answer" (never another code, never a guess). Returns the
/// answer and how many calls failed first.
pub async fn verify_until_answered(
    client: &mut KeyServiceClient<Channel>,
    key: &str,
    within: Duration,
) -> (pb::VerifyKeyResponse, usize) {
    let deadline = std::time::Instant::now() + within;
    let mut failed = 0;
    loop {
        match try_verify(client, key).await {
            Ok(answer) => return (answer, failed),
            Err(err) => {
                assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
                failed += 1;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "VerifyKey still failing after {failed} calls"
        );
    }
}

// ---- store-level records ---------------------------------------------------------------

/// A live, enabled session record at [`T0`], on `plan`, with no custom limits, for tests that
/// talk to a store directly.
pub fn session_record(label: &str, plan: sendable_keys::domain::Plan) -> SessionRecord {
    SessionRecord {
        id: SessionId::parse(&unique_session(label)).expect("session id"),
        environment: sendable_keys::domain::Environment::Live,
        plan,
        enabled: true,
        custom_rate_limit: None,
        custom_max_keys: None,
        create_ms: T0,
        update_ms: T0,
        version: 1,
        active_keys: 0,
    }
}

/// The audit entry of a change to `session` (at [`T0`], by `store-test`), for tests that
/// call a store's changes directly; [`audit`] hands it over.
pub fn audit_entry(
    session: &SessionRecord,
    action: &str,
    key_id: Option<KeyId>,
) -> sendable_keys::domain::AuditEntry {
    sendable_keys::domain::AuditEntry {
        time_ms: T0,
        actor: "store-test".to_owned(),
        action: action.to_owned(),
        session_id: session.id.clone(),
        key_id,
        result: "OK".to_owned(),
        detail: String::new(),
    }
}

/// `entry` with a 90-day retention, as a store's change takes it, as call number 1: passing
/// the same again is a resend of the command ([`audit_call`] for another call).
pub fn audit(entry: &sendable_keys::domain::AuditEntry) -> sendable_keys::store::Audit<'_> {
    audit_call(entry, 1)
}

/// [`audit`] as call number `call`.
pub fn audit_call(
    entry: &sendable_keys::domain::AuditEntry,
    call: u64,
) -> sendable_keys::store::Audit<'_> {
    sendable_keys::store::Audit {
        entry,
        retention_ms: 90 * 86_400_000,
        call,
    }
}

/// A new active key record of `session` (an id in its shard, created at [`T0`]) with a
/// random hash, for tests that insert keys into a store directly.
pub fn key_record(
    session: &SessionRecord,
    name: &str,
    rng: &mut impl rand::RngCore,
) -> (KeyRecord, KeyHash) {
    let record = KeyRecord {
        id: KeyId::generate_in_shard(session.id.shard(), rng),
        session_id: session.id.clone(),
        environment: session.environment,
        name: name.to_owned(),
        state: KeyState::Active,
        create_ms: T0,
        last_used_ms: None,
        expire_ms: None,
        revoke_ms: None,
        revoke_reason: String::new(),
        replaced_by: None,
    };
    let mut hash = [0u8; 32];
    rng.fill_bytes(&mut hash);
    (record, KeyHash(hash))
}

pub fn decision(response: &pb::VerifyKeyResponse) -> pb::Decision {
    pb::Decision::try_from(response.decision).expect("known decision")
}

/// The ErrorInfo reason of a failed call.
pub fn reason(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
        .unwrap_or_default()
}

/// The BadRequest fields of a failed call.
pub fn bad_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default()
}
