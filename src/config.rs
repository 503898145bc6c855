//! Command line and environment. Every flag has an environment variable, because containers
//! are configured by environment; secrets (the pepper, Redis URLs that may carry a password)
//! are never printed: clap's help hides their values and `Debug` redacts them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "sendable-keys",
    version,
    about = "The API-key control plane of Sendable: issue, verify, revoke and rotate API keys.",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Server options (when no subcommand is given, the server runs).
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the gRPC server (the default).
    Serve(Box<ServeArgs>),
    /// Ask a running server for its gRPC health (exit 0 when SERVING); for probes and
    /// `helm test`.
    Health(HealthArgs),
    /// Print the SHA-256 of a bearer token read from stdin, for the credentials file; with
    /// `--generate`, make a new random token and print both.
    HashToken(HashTokenArgs),
}

#[derive(Args, Debug, Clone)]
pub struct HealthArgs {
    /// Server address (`https://` for a TLS server).
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    /// PEM CA that signed a TLS server's certificate.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Name to verify the server certificate against (default: the address's host).
    #[arg(long)]
    pub tls_domain: Option<String>,
    /// Health service name ("" = the whole server).
    #[arg(long, default_value = "")]
    pub service: String,
    /// Give up after this long.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
}

#[derive(Args, Debug, Clone)]
pub struct HashTokenArgs {
    /// Generate a new random token instead of reading one.
    #[arg(long)]
    pub generate: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// JSON when stdout is not a terminal (containers), human-readable otherwise.
    Auto,
    Json,
    Pretty,
}

/// Parses `250ms`, `2s`, `5m`, `1h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} needs a unit: ms, s, m or h"))?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 500ms, 2s, 5m or 1h"))?;
    let ms = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => return Err(format!("{text:?} has an unknown unit; use ms, s, m or h")),
    };
    match ms {
        None => Err(format!("{text:?} is too long")),
        // Every duration here is a timeout or an interval: zero would time out every Redis
        // call, or make a ticker panic (health, alerts), never mean "off".
        Some(0) => Err(format!("{text:?} must be longer than zero")),
        Some(ms) => Ok(Duration::from_millis(ms)),
    }
}

#[derive(Args, Clone)]
pub struct ServeArgs {
    /// gRPC listen address.
    #[arg(long, env = "SENDABLE_KEYS_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Admin HTTP listen address: /metrics, /livez, /readyz.
    #[arg(
        long,
        env = "SENDABLE_KEYS_ADMIN_LISTEN",
        default_value = "127.0.0.1:9090"
    )]
    pub admin_listen: SocketAddr,

    /// TOML file of callers and their token hashes. Unset: only loopback peers are served.
    #[arg(long, env = "SENDABLE_KEYS_CREDENTIALS_FILE")]
    pub credentials_file: Option<PathBuf>,

    /// PEM certificate chain for TLS on the gRPC port (with --tls-key).
    #[arg(long, env = "SENDABLE_KEYS_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for TLS on the gRPC port (with --tls-cert).
    #[arg(long, env = "SENDABLE_KEYS_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA bundle: when set, clients must present a certificate it signed (mTLS).
    #[arg(long, env = "SENDABLE_KEYS_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// After SIGTERM, how long in-flight calls may take before connections are closed.
    #[arg(long, env = "SENDABLE_KEYS_DRAIN_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// HTTP/2 keepalive: how often the server pings each gRPC connection (and the TCP
    /// keepalive idle time). A peer that vanished without closing (a crashed node, a load
    /// balancer that dropped the flow) is found and its calls and streams end.
    #[arg(long, env = "SENDABLE_KEYS_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub keepalive_interval: Duration,

    /// How long a keepalive ping may go unanswered before the connection is closed.
    #[arg(long, env = "SENDABLE_KEYS_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub keepalive_timeout: Duration,

    /// Most calls in flight on one HTTP/2 connection (SETTINGS_MAX_CONCURRENT_STREAMS).
    #[arg(long, env = "SENDABLE_KEYS_MAX_CONCURRENT_STREAMS", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_concurrent_streams: u32,

    /// Redis: one redis:// or rediss:// URL for a standalone server, or several
    /// (comma-separated) seed nodes of a Redis Cluster. Unset: the in-memory store.
    #[arg(long, env = "REDIS_URL", hide_env_values = true, value_delimiter = ',')]
    pub redis_url: Vec<String>,

    /// Treat a single REDIS_URL as the seed of a Redis Cluster.
    #[arg(long, env = "SENDABLE_KEYS_REDIS_CLUSTER", default_value_t = false)]
    pub redis_cluster: bool,

    /// Redis connections kept open (each is multiplexed); half of them (at least one) carry
    /// VerifyKey and RecordOutcomes, the rest everything else.
    #[arg(long, env = "SENDABLE_KEYS_REDIS_POOL_SIZE", default_value_t = 2,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    pub redis_pool_size: u16,

    /// Let the VerifyKey calls waiting on a hot lane at the same moment share one script call
    /// (README, "Verification batching"); `false` sends every verification on its own.
    #[arg(long, env = "SENDABLE_KEYS_REDIS_BATCHING", default_value_t = true,
          action = clap::ArgAction::Set)]
    pub redis_batching: bool,

    /// Prefix of every Redis key name.
    #[arg(long, env = "SENDABLE_KEYS_REDIS_PREFIX", default_value = "sk")]
    pub redis_prefix: String,

    /// Upper bound for one Redis operation (and for connecting).
    #[arg(long, env = "SENDABLE_KEYS_REDIS_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub redis_timeout: Duration,

    /// Server-side secret mixed into every key hash (at least 32 bytes). Required with Redis.
    #[arg(
        long,
        env = "SENDABLE_KEYS_PEPPER",
        hide_env_values = true,
        conflicts_with = "pepper_file"
    )]
    pub pepper: Option<String>,

    /// File holding the pepper (trailing newline ignored), e.g. a mounted Kubernetes Secret.
    #[arg(long, env = "SENDABLE_KEYS_PEPPER_FILE")]
    pub pepper_file: Option<PathBuf>,

    /// TOML file overriding plan limits.
    #[arg(long, env = "SENDABLE_KEYS_PLANS_FILE")]
    pub plans_file: Option<PathBuf>,

    /// Days usage statistics are kept (after the day they count).
    #[arg(long, env = "SENDABLE_KEYS_USAGE_RETENTION_DAYS", default_value_t = 90,
          value_parser = clap::value_parser!(u32).range(1..=3650))]
    pub usage_retention_days: u32,

    /// TOML file with alert thresholds.
    #[arg(long, env = "SENDABLE_KEYS_ALERTS_FILE")]
    pub alerts_file: Option<PathBuf>,

    /// How often a WatchAlerts stream re-evaluates its session's alerts.
    #[arg(long, env = "SENDABLE_KEYS_ALERT_POLL_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub alert_poll_interval: Duration,

    /// Days audit events are kept.
    #[arg(long, env = "SENDABLE_KEYS_AUDIT_RETENTION_DAYS", default_value_t = 365,
          value_parser = clap::value_parser!(u32).range(1..=3650))]
    pub audit_retention_days: u32,

    /// Largest request message accepted, in bytes.
    #[arg(long, env = "SENDABLE_KEYS_MAX_MESSAGE_BYTES", default_value_t = 524_288,
          value_parser = clap::value_parser!(u32).range(4096..=16_777_216))]
    pub max_message_bytes: u32,

    /// How often the store is probed for the health service.
    #[arg(long, env = "SENDABLE_KEYS_HEALTH_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub health_interval: Duration,

    /// Async runtime worker threads (default: one per CPU).
    #[arg(long, env = "SENDABLE_KEYS_WORKER_THREADS",
          value_parser = clap::value_parser!(u16).range(1..=512))]
    pub worker_threads: Option<u16>,

    /// Log format.
    #[arg(long, env = "SENDABLE_KEYS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,

    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `sendable_keys=debug,info`.
    #[arg(long, env = "SENDABLE_KEYS_LOG", default_value = "info")]
    pub log: String,
}

impl std::fmt::Debug for ServeArgs {
    /// Secrets and URLs (which may carry a password) are redacted.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeArgs")
            .field("listen", &self.listen)
            .field("admin_listen", &self.admin_listen)
            .field("credentials_file", &self.credentials_file)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("tls_client_ca", &self.tls_client_ca)
            .field("drain_timeout", &self.drain_timeout)
            .field("keepalive_interval", &self.keepalive_interval)
            .field("keepalive_timeout", &self.keepalive_timeout)
            .field("max_concurrent_streams", &self.max_concurrent_streams)
            .field(
                "redis_url",
                &format_args!("<{} url(s) redacted>", self.redis_url.len()),
            )
            .field("redis_cluster", &self.redis_cluster)
            .field("redis_pool_size", &self.redis_pool_size)
            .field("redis_batching", &self.redis_batching)
            .field("redis_prefix", &self.redis_prefix)
            .field("redis_timeout", &self.redis_timeout)
            .field("pepper", &self.pepper.as_ref().map(|_| "<redacted>"))
            .field("pepper_file", &self.pepper_file)
            .field("plans_file", &self.plans_file)
            .field("usage_retention_days", &self.usage_retention_days)
            .field("alerts_file", &self.alerts_file)
            .field("alert_poll_interval", &self.alert_poll_interval)
            .field("audit_retention_days", &self.audit_retention_days)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("health_interval", &self.health_interval)
            .field("worker_threads", &self.worker_threads)
            .field("log_format", &self.log_format)
            .field("log", &self.log)
            .finish()
    }
}

impl ServeArgs {
    /// The options with every default, for tests and embedding.
    pub fn defaults() -> Self {
        Cli::parse_from(["sendable-keys"]).serve
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_a_unit() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["", "5", "s", "5d", "-1s", "99999999999999999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        for zero in ["0s", "0ms", "000m"] {
            let err = parse_duration(zero).expect_err(zero);
            assert!(err.contains("longer than zero"), "{err}");
        }
    }

    #[test]
    fn connection_limits_have_safe_defaults_and_bounds() {
        let args = ServeArgs::defaults();
        assert_eq!(args.keepalive_interval, Duration::from_secs(30));
        assert_eq!(args.keepalive_timeout, Duration::from_secs(10));
        assert_eq!(args.max_concurrent_streams, 1000);
        let parse = |flag: &str, value: &str| {
            Cli::try_parse_from(["sendable-keys", flag, value]).map(|cli| cli.serve)
        };
        let args = parse("--keepalive-interval", "5s").expect("valid");
        assert_eq!(args.keepalive_interval, Duration::from_secs(5));
        for (flag, bad) in [
            ("--keepalive-interval", "0s"),
            ("--keepalive-timeout", "0ms"),
            ("--max-concurrent-streams", "0"),
            ("--max-concurrent-streams", "100001"),
        ] {
            assert!(parse(flag, bad).is_err(), "{flag} {bad}");
        }
    }

    #[test]
    fn debug_redacts_secrets() {
        let mut args = ServeArgs::defaults();
        args.pepper = Some("pepper-that-must-not-leak-0123456789".into());
        args.redis_url = vec!["redis://:hunter2@redis:6379".into()];
        let shown = format!("{args:?}");
        assert!(!shown.contains("must-not-leak"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn several_redis_urls_split_on_commas() {
        let cli = Cli::parse_from(["sendable-keys", "--redis-url", "redis://a:1,redis://b:2"]);
        assert_eq!(cli.serve.redis_url, ["redis://a:1", "redis://b:2"]);
    }

    #[test]
    fn batching_is_on_unless_turned_off() {
        assert!(Cli::parse_from(["sendable-keys"]).serve.redis_batching);
        let off = Cli::parse_from(["sendable-keys", "--redis-batching", "false"]);
        assert!(!off.serve.redis_batching);
        assert!(Cli::try_parse_from(["sendable-keys", "--redis-batching", "maybe"]).is_err());
    }
}
