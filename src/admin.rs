//! The admin HTTP listener (`SENDABLE_KEYS_ADMIN_LISTEN`, default 127.0.0.1:9090), for
//! Kubernetes and Prometheus: `/metrics` (Prometheus text format), `/livez` (200 while the
//! process runs) and `/readyz` (200 only while the gRPC health reports SERVING: the store
//! answers and the server is not shutting down). Kept off the gRPC port so probes and scrapes
//! need no credentials and never compete with VerifyKey's connection limits.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

/// Readiness as the admin endpoints see it; written by the health watcher.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }

    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
struct AdminState {
    ready: Readiness,
    metrics: Option<PrometheusHandle>,
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    match &state.metrics {
        Some(handle) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        ),
        None => (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "text/plain")],
            "metrics are not enabled in this process\n".to_owned(),
        ),
    }
}

async fn livez() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    if state.ready.get() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// Serves the admin endpoints until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    ready: Readiness,
    metrics_handle: Option<PrometheusHandle>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .with_state(AdminState {
            ready,
            metrics: metrics_handle,
        });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
