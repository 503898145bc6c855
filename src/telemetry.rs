//! Logs, traces and metrics.
//!
//! - Logs: `tracing` with JSON lines (containers) or human-readable output (terminals).
//! - Traces: when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set, spans are
//!   exported over OTLP/gRPC, and the request layer continues a W3C `traceparent` from the
//!   incoming metadata. `OTEL_SERVICE_NAME` names the service (default `sendable-keys`).
//! - Metrics: a Prometheus recorder, rendered by the admin listener's `/metrics`, with a
//!   thread that folds histogram samples into buckets every second. Labels are
//!   low-cardinality by construction: method, code, decision, caller name, store operation;
//!   never a key, key id or session id.
//!
//! Nothing here ever receives a secret: keys, tokens and the pepper are not logged anywhere in
//! the crate, and the types that hold them redact themselves in `Debug`.

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogFormat;
use crate::store::redis::{BATCH_SIZE_METRIC, MAX_BATCH};

/// Latency buckets (seconds) for every `*_duration_seconds` histogram: dense below a
/// millisecond, where VerifyKey lives, and up to 5 s for the slow tail. They are the default,
/// so a histogram of anything else is given its own buckets.
const LATENCY_BUCKETS: [f64; 16] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0,
];

/// Buckets of [`BATCH_SIZE_METRIC`] (verifications per VERIFY script call): powers of two up
/// to the batch limit.
const BATCH_SIZE_BUCKETS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
const _: () = assert!(BATCH_SIZE_BUCKETS[BATCH_SIZE_BUCKETS.len() - 1] == MAX_BATCH as f64);

/// How often the recorder's histogram samples are folded into their buckets.
pub const METRICS_UPKEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Installs the process-wide Prometheus recorder (once; later calls return the same handle),
/// with its upkeep thread.
///
/// Why the thread: the recorder keeps every histogram sample (one or two per request: its duration,
/// and on Redis the store call's; plus one per VERIFY script call) in a lock-free list until upkeep
/// folds them into the buckets. `install_recorder` does not schedule upkeep, and a scrape of
/// `/metrics` is the only other thing that runs it, so a service nobody scrapes grew by ~20 bytes
/// per request without bound (measured: +2 MB/s at 98k VerifyKey/s). A plain thread, not a tokio
/// task, so it runs whatever the runtime is busy with and needs no runtime to be started.
pub fn metrics() -> Result<PrometheusHandle, String> {
    static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets(&LATENCY_BUCKETS)
                .map_err(|e| e.to_string())?
                .set_buckets_for_metric(
                    Matcher::Full(BATCH_SIZE_METRIC.to_owned()),
                    &BATCH_SIZE_BUCKETS,
                )
                .map_err(|e| e.to_string())?
                .install_recorder()
                .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(METRICS_UPKEEP_INTERVAL);
                        upkeep.run_upkeep();
                    }
                })
                .map_err(|e| format!("cannot start the metrics upkeep thread: {e}"))?;
            Ok(handle)
        })
        .clone()
}

/// Lines a throttled site writes per second.
pub const THROTTLED_LINES_PER_SECOND: u64 = 10;

/// Bounds how often a log line is written that every failing request would otherwise write.
///
/// During a Redis outage every VerifyKey fails, and a scanner without a token is refused as
/// fast as it can send: one line per request would be tens of MB of logs per second, with the
/// workers contending for stdout. A throttled site writes at most `per_second` lines in each
/// second and counts the rest; the next line written carries that count (`suppressed`). The
/// metrics count every request regardless.
pub struct Throttle {
    per_second: u64,
    /// The second (since the process's first throttled line) the count belongs to.
    second: AtomicU64,
    written: AtomicU64,
    suppressed: AtomicU64,
}

impl Throttle {
    pub const fn new(per_second: u64) -> Self {
        Throttle {
            per_second,
            second: AtomicU64::new(0),
            written: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(lines suppressed since the last one written)` if this line may be written now.
    pub fn admit(&self) -> Option<u64> {
        static EPOCH: OnceLock<Instant> = OnceLock::new();
        self.admit_at(EPOCH.get_or_init(Instant::now).elapsed().as_secs())
    }

    fn admit_at(&self, second: u64) -> Option<u64> {
        let current = self.second.load(Ordering::Relaxed);
        if second > current
            && self
                .second
                .compare_exchange(current, second, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.written.store(0, Ordering::Relaxed);
        }
        if self.written.fetch_add(1, Ordering::Relaxed) < self.per_second {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Whether the environment asks for OTLP trace export.
pub fn otlp_requested() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|v| !v.trim().is_empty()))
}

/// Flushes exported spans when dropped.
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    pub fn tracing_exported(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(err) = provider.shutdown()
        {
            eprintln!("sendable-keys: flushing traces failed: {err}");
        }
    }
}

/// Installs the global subscriber (logs, and OTLP export when requested). Must run inside the
/// tokio runtime: the OTLP exporter's gRPC client lives on it.
pub fn init(format: LogFormat, filter: &str) -> Result<TelemetryGuard, String> {
    let filter = EnvFilter::try_new(filter).map_err(|e| format!("invalid log filter: {e}"))?;
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stdout().is_terminal(),
    };
    let provider = if otlp_requested() {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
            .map_err(|e| format!("OTLP exporter: {e}"))?;
        let service_name = std::env::var("OTEL_SERVICE_NAME")
            .ok()
            .filter(|s| !s.trim().is_empty())
            .unwrap_or_else(|| "sendable-keys".to_owned());
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(service_name)
                    .build(),
            )
            .build();
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        Some(provider)
    } else {
        None
    };
    let otel_layer = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("sendable-keys")));
    let registry = tracing_subscriber::registry().with(filter).with(otel_layer);
    let result = if json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .try_init()
    } else {
        registry.with(tracing_subscriber::fmt::layer()).try_init()
    };
    result.map_err(|e| format!("could not install the log subscriber: {e}"))?;
    Ok(TelemetryGuard { provider })
}

#[cfg(test)]
mod tests {
    use super::Throttle;

    #[test]
    fn a_throttled_line_is_written_a_few_times_a_second_and_reports_what_it_skipped() {
        let throttle = Throttle::new(3);
        let first: Vec<Option<u64>> = (0..10).map(|_| throttle.admit_at(5)).collect();
        assert_eq!(
            first,
            [
                Some(0),
                Some(0),
                Some(0),
                None,
                None,
                None,
                None,
                None,
                None,
                None
            ]
        );
        // The next second: the first line tells how many were skipped, then counting restarts.
        assert_eq!(throttle.admit_at(6), Some(7));
        assert_eq!(throttle.admit_at(6), Some(0));
        assert_eq!(throttle.admit_at(6), Some(0));
        assert_eq!(throttle.admit_at(6), None);
        // A late caller with an older second does not reopen the window.
        assert_eq!(throttle.admit_at(5), None);
        assert_eq!(throttle.admit_at(9), Some(2));
    }
}
