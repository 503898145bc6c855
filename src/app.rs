//! Wiring: picks the store from config, builds the services, and serves them with health and
//! reflection. [`serve`] takes a bound listener and a shutdown future so tests can run the real
//! server on `127.0.0.1:0` and own its lifetime; [`run`] is what the binary calls.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::admin::Readiness;
use crate::auth::Credentials;
use crate::config::ServeArgs;
use crate::domain::usage::AlertThresholds;
use crate::domain::{KeyHasher, Pepper, PlanTable};
use crate::grpc::layer::{AccessPolicy, RequestLayer};
use crate::grpc::pb::key_service_server::KeyServiceServer;
use crate::grpc::pb::usage_service_server::UsageServiceServer;
use crate::grpc::{KeyGrpc, UsageGrpc};
use crate::service::clock::{Clock, SystemClock};
use crate::service::{KeyService, Settings, UsageService};
use crate::store::Store;
use crate::store::memory::MemoryStore;
use crate::store::redis::{RedisConfig, RedisStore};

/// Health service names reported besides the overall "" entry (readiness: SERVING only while
/// the store answers and the server is not shutting down).
pub const HEALTH_SERVICES: [&str; 2] = [
    "sendable.keys.v1.KeyService",
    "sendable.keys.v1.UsageService",
];
/// Health service name for liveness probes: SERVING for as long as the process runs.
pub const LIVENESS_SERVICE: &str = "liveness";

/// How long open admin HTTP connections may finish after the gRPC server has stopped.
const ADMIN_SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Largest request the open services (health, reflection) read.
const OPEN_SERVICE_MAX_MESSAGE_BYTES: usize = 16 * 1024;

/// How long a TLS handshake on the gRPC port may take.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How the gRPC server behaves (the parts of config that are not the store).
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub max_message_bytes: usize,
    pub health_interval: Duration,
    /// How often a WatchAlerts stream re-evaluates.
    pub alert_poll_interval: Duration,
    /// Who may call (credentials, or loopback only).
    pub access: AccessPolicy,
    /// TLS (and mTLS) for the gRPC port.
    pub tls: Option<ServerTlsConfig>,
    /// After shutdown begins, how long in-flight calls may run before connections close.
    pub drain_timeout: Duration,
    /// Mirrors the health status for the admin listener's /readyz.
    pub readiness: Readiness,
    /// HTTP/2 ping interval (and TCP keepalive idle time) on gRPC connections.
    pub keepalive_interval: Duration,
    /// An unanswered ping closes the connection after this long.
    pub keepalive_timeout: Duration,
    /// Most calls in flight on one connection.
    pub max_concurrent_streams: u32,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            max_message_bytes: 512 * 1024,
            health_interval: Duration::from_secs(2),
            alert_poll_interval: Duration::from_secs(10),
            access: AccessPolicy::new(None, false),
            tls: None,
            drain_timeout: Duration::from_secs(20),
            readiness: Readiness::default(),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            max_concurrent_streams: 1000,
        }
    }
}

/// Startup failures, with messages meant for the operator reading the log.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

async fn set_health(reporter: &HealthReporter, readiness: &Readiness, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    for name in HEALTH_SERVICES {
        reporter.set_service_status(name, status).await;
    }
    readiness.set(status == ServingStatus::Serving);
}

/// Keeps the health service truthful: SERVING only while the store answers a ping, until
/// `stop` flips, then NOT_SERVING for good. Also refreshes the store's gauges.
async fn watch_health<S: Store>(
    store: Arc<S>,
    mut reporter: HealthReporter,
    readiness: Readiness,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<bool> = None;
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let up = store.ping().await;
                store.report_metrics();
                let healthy = up.is_ok();
                if last != Some(healthy) {
                    match &up {
                        Ok(()) => tracing::info!("store reachable: serving"),
                        Err(err) => tracing::warn!(error = %err, "store unreachable: not serving"),
                    }
                    let status = if healthy { ServingStatus::Serving } else { ServingStatus::NotServing };
                    set_health(&reporter, &readiness, status).await;
                    last = Some(healthy);
                }
            }
            _ = stop.changed() => break,
        }
    }
    set_health(&reporter, &readiness, ServingStatus::NotServing).await;
    // Health `Watch` streams (gRPC client-side health checking) end only when their service
    // leaves the registry; one left open would hold the drain for its whole timeout. Watchers
    // have been sent NOT_SERVING above; removing the readiness services ends their streams.
    // `liveness` stays: the kubelet's liveness probe must not fail while the pod drains.
    reporter.clear_service_status("").await;
    for name in HEALTH_SERVICES {
        reporter.clear_service_status(name).await;
    }
}

/// Serves the KeyService, UsageService, health and reflection on `listener` until `shutdown`
/// completes, then drains: health turns NOT_SERVING, open WatchAlerts streams end, no new
/// connections or streams are accepted, and in-flight calls get up to `drain_timeout` to
/// finish.
pub async fn serve<S: Store>(
    keys: Arc<KeyService<S>>,
    listener: TcpListener,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AppError> {
    let (reporter, health_service) = tonic_health::server::health_reporter();
    // Health and reflection answer anyone, token or not: keep what they will read small (a
    // service name, a symbol), so an anonymous client cannot make the server hold megabytes
    // per stream.
    let health_service = health_service.max_decoding_message_size(OPEN_SERVICE_MAX_MESSAGE_BYTES);
    let readiness = options.readiness.clone();
    set_health(&reporter, &readiness, ServingStatus::NotServing).await;
    // Liveness is about the process, not its dependencies: a Redis outage must not make
    // Kubernetes restart every replica.
    reporter
        .set_service_status(LIVENESS_SERVICE, ServingStatus::Serving)
        .await;
    // Know the store's state before the first call can arrive, so a client that checks health
    // right after connecting never sees a stale NOT_SERVING.
    if keys.store().ping().await.is_ok() {
        set_health(&reporter, &readiness, ServingStatus::Serving).await;
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let health_task = tokio::spawn(watch_health(
        keys.store().clone(),
        reporter,
        readiness,
        options.health_interval,
        stop_rx.clone(),
    ));

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::grpc::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| AppError::Config(format!("reflection: {e}")))?
        .max_decoding_message_size(OPEN_SERVICE_MAX_MESSAGE_BYTES);
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::grpc::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| AppError::Config(format!("reflection: {e}")))?
        .max_decoding_message_size(OPEN_SERVICE_MAX_MESSAGE_BYTES);

    let usage = Arc::new(UsageService::new(keys.clone()));
    let key_service = KeyServiceServer::new(KeyGrpc::new(keys))
        .max_decoding_message_size(options.max_message_bytes);
    let usage_service = UsageServiceServer::new(UsageGrpc::new(
        usage,
        options.alert_poll_interval,
        stop_rx.clone(),
    ))
    .max_decoding_message_size(options.max_message_bytes);

    // Announced only now, with health already known: whoever waits for this line (scripts,
    // tests) can call at once.
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, tls = options.tls.is_some(), "gRPC listening");
    }
    // TCP keepalive as well: a connection still in its TLS handshake has no HTTP/2 to ping,
    // and a peer whose machine is gone (not just its process) stops answering probes. The
    // kernel takes whole seconds, and its defaults would probe for 11 minutes.
    let whole_seconds = |d: Duration| Duration::from_secs(d.as_secs().max(1));
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(whole_seconds(options.keepalive_interval)))
        .with_keepalive_interval(Some(whole_seconds(options.keepalive_timeout)))
        .with_keepalive_retries(Some(3));
    let shutdown = async move {
        shutdown.await;
        tracing::info!("draining: health NOT_SERVING, no new calls, in-flight calls finishing");
        let _ = stop_tx.send(true);
    };
    // Without pings, a connection whose peer vanished without a FIN or RST (a crashed node,
    // a load balancer that dropped an idle flow) stays open for ever, and so do its
    // WatchAlerts streams, each polling the store. tonic leaves HTTP/2 concurrency and
    // hyper's guard against a flood of stream errors unlimited unless they are set.
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(options.keepalive_interval))
        .http2_keepalive_timeout(Some(options.keepalive_timeout))
        .max_concurrent_streams(options.max_concurrent_streams)
        .http2_max_local_error_reset_streams(Some(1024));
    if let Some(tls) = options.tls {
        builder = builder.tls_config(tls)?;
    }
    let server = builder
        .layer(RequestLayer::new(options.access))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(key_service)
        .add_service(usage_service)
        .serve_with_incoming_shutdown(incoming, shutdown);
    let mut draining = stop_rx;
    let drain_timeout = options.drain_timeout;
    let result = tokio::select! {
        result = server => result.map_err(AppError::from),
        _ = async {
            while !*draining.borrow_and_update() {
                if draining.changed().await.is_err() {
                    // The sender is gone only once serving ended, which the other arm sees.
                    std::future::pending::<()>().await;
                }
            }
            tokio::time::sleep(drain_timeout).await;
        } => {
            tracing::warn!(timeout = ?drain_timeout, "drain timeout: closing the connections still open");
            Ok(())
        }
    };
    let _ = health_task.await;
    result
}

/// TLS for the gRPC port from PEM files; a client CA turns on mutual TLS.
fn load_tls(args: &ServeArgs) -> Result<Option<ServerTlsConfig>, AppError> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    let read = |path: &std::path::Path, what: &str| {
        std::fs::read(path).map_err(|e| {
            AppError::Config(format!(
                "cannot read the TLS {what} {}: {e}",
                path.display()
            ))
        })
    };
    // A peer that opens a connection and never finishes the handshake is dropped.
    let mut tls = ServerTlsConfig::new()
        .timeout(TLS_HANDSHAKE_TIMEOUT)
        .identity(Identity::from_pem(
            read(cert, "certificate")?,
            read(key, "key")?,
        ));
    if let Some(ca) = &args.tls_client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read(ca, "client CA")?));
    }
    Ok(Some(tls))
}

fn load_credentials(args: &ServeArgs) -> Result<Option<Credentials>, AppError> {
    args.credentials_file
        .as_deref()
        .map(Credentials::load)
        .transpose()
        .map_err(AppError::Config)
}

/// Reads the pepper from the flag/env or the file.
fn load_pepper(args: &ServeArgs) -> Result<Option<Pepper>, AppError> {
    let bytes = match (&args.pepper, &args.pepper_file) {
        (Some(p), _) => p.as_bytes().to_vec(),
        (None, Some(path)) => {
            let mut bytes = std::fs::read(path).map_err(|e| {
                AppError::Config(format!(
                    "cannot read the pepper file {}: {e}",
                    path.display()
                ))
            })?;
            while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                bytes.pop();
            }
            bytes
        }
        (None, None) => return Ok(None),
    };
    Pepper::new(bytes).map(Some).map_err(AppError::Config)
}

fn load_alerts(args: &ServeArgs) -> Result<AlertThresholds, AppError> {
    match &args.alerts_file {
        None => Ok(AlertThresholds::default()),
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                AppError::Config(format!(
                    "cannot read the alerts file {}: {e}",
                    path.display()
                ))
            })?;
            AlertThresholds::from_toml(&text)
                .map_err(|e| AppError::Config(format!("alerts file {}: {e}", path.display())))
        }
    }
}

fn load_plans(args: &ServeArgs) -> Result<PlanTable, AppError> {
    match &args.plans_file {
        None => Ok(PlanTable::default()),
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                AppError::Config(format!(
                    "cannot read the plans file {}: {e}",
                    path.display()
                ))
            })?;
            PlanTable::from_toml(&text)
                .map_err(|e| AppError::Config(format!("plans file {}: {e}", path.display())))
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("interrupt received: shutting down"),
        _ = term => tracing::info!("SIGTERM received: shutting down"),
    }
}

/// Warns when a Redis master may evict (redis-rs sends `INFO` to every master of a Cluster,
/// not to replicas): a full Redis with any `maxmemory-policy` but
/// `noeviction` deletes keys to make room, and here those are key records (a working key turns
/// NOT_FOUND), session tables, rate-limit windows (a limit stops being exact), usage and audit
/// history. Checked once, when Redis first answers, like Sidekiq's warning of the same kind.
async fn warn_if_redis_evicts(store: &RedisStore) {
    match store.eviction_policies().await {
        Ok(policies) => {
            let unread = policies.iter().filter(|p| p.is_none()).count();
            if unread > 0 {
                tracing::info!(
                    nodes = unread,
                    "could not read the maxmemory-policy of some Redis nodes (INFO memory); \
                     noeviction is recommended"
                );
            }
            let evicting: std::collections::BTreeSet<&str> = policies
                .iter()
                .flatten()
                .map(String::as_str)
                .filter(|p| *p != "noeviction")
                .collect();
            if !evicting.is_empty() {
                let policies = evicting.into_iter().collect::<Vec<_>>().join(", ");
                tracing::warn!(
                    maxmemory_policy = %policies,
                    "Redis may delete this service's data when it is full (key records, sessions, \
                     rate-limit windows, usage, audit): set maxmemory-policy noeviction"
                );
            }
        }
        Err(err) => tracing::info!(
            error = %err,
            "could not read Redis's maxmemory-policy (INFO memory); noeviction is recommended"
        ),
    }
}

async fn run_with<S: Store>(
    store: Arc<S>,
    hasher: KeyHasher,
    settings: Settings,
    args: &ServeArgs,
    tracing_exported: bool,
) -> Result<(), AppError> {
    let credentials = load_credentials(args)?;
    let tls = load_tls(args)?;
    match &credentials {
        Some(c) => tracing::info!(callers = c.len(), "caller credentials loaded"),
        None => tracing::warn!(
            "no SENDABLE_KEYS_CREDENTIALS_FILE: only loopback peers are served (health and reflection stay open)"
        ),
    }
    let metrics_handle = match crate::telemetry::metrics() {
        Ok(handle) => Some(handle),
        Err(err) => {
            tracing::warn!(error = %err, "metrics disabled");
            None
        }
    };
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let keys = Arc::new(KeyService::new(store, hasher, settings, clock));
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|source| AppError::Listen {
            addr: args.listen,
            source,
        })?;
    let admin_listener = TcpListener::bind(args.admin_listen)
        .await
        .map_err(|source| AppError::Listen {
            addr: args.admin_listen,
            source,
        })?;
    // The bound address, not the requested one: with port 0 this is how callers find us.
    let admin_addr = admin_listener.local_addr().unwrap_or(args.admin_listen);
    tracing::info!(addr = %admin_addr, "admin HTTP listening (/metrics, /livez, /readyz)");

    let readiness = Readiness::default();
    let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    let admin = tokio::spawn(crate::admin::serve(
        admin_listener,
        readiness.clone(),
        metrics_handle,
        crate::admin::HEADER_READ_TIMEOUT,
        async {
            let _ = admin_stopped.await;
        },
    ));
    let options = ServeOptions {
        max_message_bytes: args.max_message_bytes as usize,
        health_interval: args.health_interval,
        alert_poll_interval: args.alert_poll_interval,
        access: AccessPolicy::new(credentials, tracing_exported),
        tls,
        drain_timeout: args.drain_timeout,
        readiness,
        keepalive_interval: args.keepalive_interval,
        keepalive_timeout: args.keepalive_timeout,
        max_concurrent_streams: args.max_concurrent_streams,
    };
    let result = serve(keys, listener, options, shutdown_signal()).await;
    // The admin listener outlives the drain, so probes read NOT_SERVING until the end.
    let _ = admin_stop.send(());
    // The admin server's graceful shutdown waits for responses in progress; a scraper that stopped
    // reading one would keep the process alive until SIGKILL. The drain is over by now.
    let mut admin = admin;
    if tokio::time::timeout(ADMIN_SHUTDOWN_GRACE, &mut admin)
        .await
        .is_err()
    {
        // Aborting the server's task drops its connections' tasks with it.
        tracing::warn!("admin HTTP connections still open after shutdown; closing them");
        admin.abort();
    }
    result?;
    tracing::info!("stopped");
    Ok(())
}

/// Runs the server described by `args` until SIGTERM.
pub async fn run(args: ServeArgs, tracing_exported: bool) -> Result<(), AppError> {
    let plans = load_plans(&args)?;
    let settings = Settings {
        plans,
        audit_retention_days: args.audit_retention_days,
        usage_retention_days: args.usage_retention_days,
        alerts: load_alerts(&args)?,
    };
    let pepper = load_pepper(&args)?;
    if args.redis_url.is_empty() {
        let pepper = pepper.unwrap_or_else(|| {
            tracing::warn!("no pepper configured: using a random one (fine for the in-memory store, whose keys die with the process)");
            Pepper::random()
        });
        tracing::warn!(
            "no REDIS_URL: serving from the in-memory store; nothing is persisted and replicas do not share state"
        );
        let store = Arc::new(MemoryStore::new());
        return run_with(
            store,
            KeyHasher::new(&pepper),
            settings,
            &args,
            tracing_exported,
        )
        .await;
    }
    let pepper = pepper.ok_or_else(|| {
        AppError::Config(
            "REDIS_URL is set but no pepper is: set SENDABLE_KEYS_PEPPER or SENDABLE_KEYS_PEPPER_FILE \
             (a random pepper would make every stored key unverifiable after a restart)"
                .to_owned(),
        )
    })?;
    let redis = RedisConfig {
        urls: args.redis_url.clone(),
        cluster: args.redis_cluster,
        pool_size: usize::from(args.redis_pool_size),
        batching: args.redis_batching,
        prefix: args.redis_prefix.clone(),
        timeout: args.redis_timeout,
    };
    let store = RedisStore::new(&redis).map_err(|e| AppError::Config(e.message))?;
    let store = Arc::new(store);
    match store.warm_up().await {
        Ok(()) => warn_if_redis_evicts(&store).await,
        Err(err) => {
            tracing::warn!(
                error = %err,
                "Redis not reachable yet; will keep trying (NOT_SERVING until then)"
            );
            // The eviction check waits for Redis, so a Redis started after us is checked too.
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                while store.ping().await.is_err() {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                warn_if_redis_evicts(&store).await;
            });
        }
    }
    tracing::info!(store = %store.describe(), "using Redis");
    run_with(
        store,
        KeyHasher::new(&pepper),
        settings,
        &args,
        tracing_exported,
    )
    .await
}
