//! The real `sendable-keys` binary as a child process: started with credentials and free
//! ports, its JSON log lines collected, the addresses it announces parsed from them. Shared by
//! the process tests and the load generator.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use sendable_keys::cli::token_sha256;
use tonic::transport::Channel;

/// A running binary, its log lines, and the addresses it announced.
pub struct Process {
    pub child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    pub grpc: String,
    pub admin: String,
    _dir: tempfile::TempDir,
}

impl Process {
    /// Starts the binary with the given callers (name, role, token) in a credentials file,
    /// JSON logs, free ports for gRPC and admin, and `env` on top.
    pub fn start(callers: &[(&str, &str, &str)], env: &[(&str, &str)]) -> Self {
        Self::start_wrapped(&[], callers, env)
    }

    /// Like [`Process::start`], with the binary run under `wrapper` (e.g. valgrind).
    pub fn start_wrapped(
        wrapper: &[&str],
        callers: &[(&str, &str, &str)],
        env: &[(&str, &str)],
    ) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let credentials = dir.path().join("credentials.toml");
        let file: String = callers
            .iter()
            .map(|(name, role, token)| {
                format!(
                    "[[caller]]\nname = \"{name}\"\nrole = \"{role}\"\ntoken_sha256 = \"{}\"\n\n",
                    token_sha256(token)
                )
            })
            .collect();
        std::fs::write(&credentials, file).expect("write credentials");
        let binary = env!("CARGO_BIN_EXE_sendable-keys");
        let mut command = match wrapper.split_first() {
            None => Command::new(binary),
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(binary);
                c
            }
        };
        // The address announcements are info lines of the app module: a log filter in `env`
        // must keep `sendable_keys::app=info`.
        command
            .env_clear()
            .env("SENDABLE_KEYS_LISTEN", "127.0.0.1:0")
            .env("SENDABLE_KEYS_ADMIN_LISTEN", "127.0.0.1:0")
            .env("SENDABLE_KEYS_LOG_FORMAT", "json")
            .env("SENDABLE_KEYS_CREDENTIALS_FILE", &credentials)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("the binary starts");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel::<String>();
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let lines = lines.clone();
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let _ = tx.send(line.clone());
                    lines.lock().expect("lines").push(line);
                }
            });
        }
        let mut grpc = None;
        let mut admin = None;
        // Generous: under valgrind startup takes a while.
        let deadline = Instant::now() + Duration::from_secs(120);
        while grpc.is_none() || admin.is_none() {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("the server announces its addresses");
            let addr = || {
                let start = line.find("\"addr\":\"")? + 8;
                let end = line[start..].find('"')? + start;
                Some(line[start..end].to_owned())
            };
            if line.contains("gRPC listening") {
                grpc = addr();
            } else if line.contains("admin HTTP listening") {
                admin = addr();
            }
        }
        Process {
            child,
            lines,
            grpc: grpc.expect("grpc address"),
            admin: admin.expect("admin address"),
            _dir: dir,
        }
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.grpc))
            .expect("uri")
            .connect()
            .await
            .expect("connect")
    }

    pub fn sigterm(&self) {
        // SAFETY: kill(2) with a pid we spawned and own.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0, "SIGTERM delivered");
    }

    /// Waits for the exit (bounded), returning its status and how long it took.
    pub fn wait(&mut self, within: Duration) -> (ExitStatus, Duration) {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return (status, started.elapsed());
            }
            assert!(
                started.elapsed() < within,
                "the process did not exit within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn logs(&self) -> String {
        self.lines.lock().expect("lines").join("\n")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET on the admin listener: (status code, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("admin reachable");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}
