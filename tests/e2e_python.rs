//! An operator's session through a client that is not tonic: Python grpcio, with message
//! types taken from the server's reflection service (no .proto files), against the real
//! `sendable-keys` binary serving from its embedded store.
//!
//! The Python packages (grpcio, grpcio-reflection, grpcio-health-checking, grpcio-status) are
//! used from the system if present; otherwise they are installed once into
//! `target/e2e-python` from PyPI.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

const MODULES: &str = "import grpc, grpc_reflection, grpc_health, grpc_status, google.protobuf";
const PACKAGES: [&str; 5] = [
    "grpcio",
    "grpcio-reflection",
    "grpcio-health-checking",
    "grpcio-status",
    "protobuf",
];

/// A PYTHONPATH under which the grpcio packages import (empty = the system has them).
fn python_path() -> String {
    let python_ok = |path: &str| {
        Command::new("python3")
            .args(["-c", MODULES])
            .env("PYTHONPATH", path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let python = Command::new("python3").arg("--version").output();
    assert!(
        python.is_ok_and(|o| o.status.success()),
        "python3 is needed for the cross-client test: install it (e.g. `apt-get install -y python3 python3-pip`)"
    );
    if python_ok("") {
        return String::new();
    }
    let target: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/e2e-python");
    let target = target.to_string_lossy().into_owned();
    if python_ok(&target) {
        return target;
    }
    eprintln!("installing {PACKAGES:?} into {target} (once)");
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--target",
            &target,
        ])
        .args(PACKAGES)
        .status()
        .expect("pip runs");
    assert!(
        status.success() && python_ok(&target),
        "could not install the Python gRPC packages; install them with `python3 -m pip install {}`",
        PACKAGES.join(" ")
    );
    target
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the binary on a free port and returns it with the address it logged.
fn start_binary() -> (Server, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sendable-keys"))
        .env_clear()
        .env("SENDABLE_KEYS_LISTEN", "127.0.0.1:0")
        .env("SENDABLE_KEYS_ADMIN_LISTEN", "127.0.0.1:0")
        .env("SENDABLE_KEYS_LOG_FORMAT", "json")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the sendable-keys binary starts");
    let stdout = child.stdout.take().expect("stdout");
    let server = Server(child);
    let mut lines = BufReader::new(stdout).lines();
    let mut addr = None;
    let mut saw_memory_notice = false;
    for line in lines.by_ref() {
        let line = line.expect("log line");
        saw_memory_notice |= line.contains("in-memory store");
        if line.contains("gRPC listening") {
            let start = line.find("\"addr\":\"").expect("addr field") + 8;
            let end = line[start..].find('"').expect("addr end") + start;
            addr = Some(line[start..end].to_owned());
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    assert!(
        saw_memory_notice,
        "with no REDIS_URL the server says it uses the in-memory store"
    );
    (server, addr.expect("the server logged its address"))
}

#[test]
fn an_operator_session_through_python_grpcio_and_reflection() {
    let python_path = python_path();
    let (_server, addr) = start_binary();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/operator.py");
    let output = Command::new("python3")
        .arg(&script)
        .arg(&addr)
        .env("PYTHONPATH", &python_path)
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "the Python operator session failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("python operator session: ok"));
}
