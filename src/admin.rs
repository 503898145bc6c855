//! The admin HTTP listener (`SENDABLE_KEYS_ADMIN_LISTEN`, default 127.0.0.1:9090), for
//! Kubernetes and Prometheus: `/metrics` (Prometheus text format), `/livez` (200 while the
//! process runs) and `/readyz` (200 only while the gRPC health reports SERVING: the store
//! answers and the server is not shutting down). Kept off the gRPC port so probes and scrapes
//! need no credentials and never compete with VerifyKey's connection limits.
//!
//! Connections are served by hyper directly rather than `axum::serve`, which sets no timer: a
//! client that opens a connection and never finishes its request headers would hold a socket
//! and a task for as long as it liked. Here it has [`HEADER_READ_TIMEOUT`], which also closes
//! keep-alive connections left idle that long.

use std::io::ErrorKind;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::telemetry::Throttle;

/// How long a client has to send a request's headers (and how long a keep-alive connection may
/// sit idle) in production. Probes and scrapes send theirs at once; a Prometheus scrape
/// interval is longer, so a scraper reconnects per scrape, which costs little.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause after a failed accept (out of file descriptors, say) before the next, so a full
/// descriptor table does not turn the accept loop into a busy loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

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

/// Serves the admin endpoints until `shutdown` completes; a client must send each request's
/// headers within `header_read_timeout` ([`HEADER_READ_TIMEOUT`] in production).
pub async fn serve(
    listener: TcpListener,
    ready: Readiness,
    metrics_handle: Option<PrometheusHandle>,
    header_read_timeout: Duration,
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
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    let graceful = GracefulShutdown::new();
    // The connections' tasks belong to this future: if the caller gives up waiting for them
    // after shutdown and drops it, they end with it.
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let service = TowerToHyperService::new(app.clone());
                    let connection =
                        graceful.watch(http.serve_connection(TokioIo::new(stream), service));
                    // A connection's own error (reset, header timeout) concerns only that client.
                    connections.spawn(async move {
                        let _ = connection.await;
                    });
                }
                // The client gave up before we accepted: nothing wrong with the listener.
                Err(err) if matches!(
                    err.kind(),
                    ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::Interrupted
                ) => {}
                Err(err) => {
                    static LOG: Throttle = Throttle::new(1);
                    if let Some(suppressed) = LOG.admit() {
                        tracing::warn!(
                            error = %err,
                            suppressed,
                            "admin listener could not accept a connection"
                        );
                    }
                    tokio::select! {
                        () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                        () = &mut shutdown => break,
                    }
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            () = &mut shutdown => break,
        }
    }
    // No new connections; open ones finish the request they are serving, then close (the
    // caller bounds how long that may take).
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// An admin server on a free port with a short header timeout, and what stops it.
    async fn start(
        header_read_timeout: Duration,
    ) -> (
        std::net::SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let ready = Readiness::default();
        ready.set(true);
        let server = tokio::spawn(serve(listener, ready, None, header_read_timeout, async {
            let _ = stopped.await;
        }));
        (addr, stop, server)
    }

    /// Reads until the server closes the connection, by EOF or reset (`None` if it is still
    /// open after `limit`).
    async fn read_to_close(stream: &mut TcpStream, limit: Duration) -> Option<String> {
        let mut out = Vec::new();
        let _closed = tokio::time::timeout(limit, stream.read_to_end(&mut out))
            .await
            .ok()?;
        Some(String::from_utf8_lossy(&out).into_owned())
    }

    #[tokio::test]
    async fn a_client_that_never_finishes_its_headers_is_disconnected() {
        let timeout = Duration::from_millis(300);
        let (addr, _stop, _server) = start(timeout).await;
        let mut slow = TcpStream::connect(addr).await.expect("connect");
        let started = std::time::Instant::now();
        slow.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write");
        // Without a header timeout the server waits for the rest for ever.
        let answer = read_to_close(&mut slow, Duration::from_secs(10))
            .await
            .expect("connection still open after 10 s");
        // Closed by the timeout, unanswered: not by anything the half request caused.
        assert_eq!(answer, "");
        assert!(started.elapsed() >= timeout, "{:?}", started.elapsed());
        // A client that does send its request is served as before.
        let mut prompt = TcpStream::connect(addr).await.expect("connect");
        prompt
            .write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let answer = read_to_close(&mut prompt, Duration::from_secs(10))
            .await
            .expect("answered and closed");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("ready\n"), "{answer}");
    }

    #[tokio::test]
    async fn shutdown_closes_idle_keep_alive_connections_and_returns() {
        let (addr, stop, server) = start(HEADER_READ_TIMEOUT).await;
        let mut idle = TcpStream::connect(addr).await.expect("connect");
        idle.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let mut first = [0u8; 12];
        idle.read_exact(&mut first).await.expect("response");
        assert_eq!(&first, b"HTTP/1.1 200");
        // The connection stays open (keep-alive) until shutdown closes it.
        stop.send(()).expect("server running");
        let stopped = tokio::time::timeout(Duration::from_secs(5), server).await;
        assert!(
            matches!(stopped, Ok(Ok(Ok(())))),
            "server did not stop: {stopped:?}"
        );
        assert!(
            read_to_close(&mut idle, Duration::from_secs(5))
                .await
                .is_some()
        );
    }
}
