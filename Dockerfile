# sendable-keys container image.
#
#   docker build -t sendable-keys:dev .
#   docker run --rm -p 50051:50051 -p 9090:9090 sendable-keys:dev
#
# Two stages: a full Rust toolchain builds the release binary; the runtime image is distroless
# (glibc + libgcc, CA certificates, no shell, no package manager) and runs as uid 65532.

ARG RUST_VERSION=1.95

# ---- builder ---------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src

# Dependencies first, in their own layers: a stub crate with the real manifest and lockfile
# (and a stub build script, so the build-dependencies protox and tonic-prost-build are compiled
# too). These layers are rebuilt only when Cargo.toml or Cargo.lock change, so a source edit
# recompiles the crate alone. Targets Cargo.toml lists ([[bench]]) get stub files.
COPY Cargo.toml Cargo.lock ./
# The manifest names two benchmark targets; cargo wants their files to exist even though a
# release build never compiles them, so both stages get empty stand-ins.
RUN mkdir -p src benches \
 && echo 'fn main() {}' > build.rs \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs benches/loadgen.rs benches/micro.rs \
 && cargo fetch --locked \
 && cargo build --release --locked \
 && rm -rf build.rs src \
      target/release/sendable-keys* \
      target/release/.fingerprint/sendable-keys-* \
      target/release/build/sendable-keys-* \
      target/release/deps/sendable_keys-* \
      target/release/deps/libsendable_keys-*

# The crate itself. build.rs compiles the protos with protox (pure Rust: no protoc needed).
# The stub's fingerprints were removed above, so cargo cannot mistake it for this source.
COPY build.rs ./
COPY proto ./proto
COPY src ./src
RUN mkdir -p benches && touch benches/loadgen.rs benches/micro.rs \
 && cargo build --release --locked \
 && cp target/release/sendable-keys /sendable-keys

# ---- runtime ---------------------------------------------------------------------------------
# cc-debian12 matches the builder's glibc (bookworm = Debian 12); :nonroot runs as 65532.
FROM gcr.io/distroless/cc-debian12:nonroot

LABEL org.opencontainers.image.title="sendable-keys" \
      org.opencontainers.image.description="API-key control plane of Sendable (gRPC)" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --from=builder /sendable-keys /usr/local/bin/sendable-keys

# The binary defaults to 127.0.0.1; in a container it must listen on every interface.
# Containers log JSON for the log collector.
ENV SENDABLE_KEYS_LISTEN=0.0.0.0:50051 \
    SENDABLE_KEYS_ADMIN_LISTEN=0.0.0.0:9090 \
    SENDABLE_KEYS_LOG_FORMAT=json

# 50051: gRPC (KeyService, UsageService, grpc.health.v1, reflection).
# 9090: admin HTTP (/metrics, /livez, /readyz).
EXPOSE 50051 9090

USER 65532:65532

# For docker run / compose; Kubernetes ignores it and uses the chart's native gRPC probes.
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 \
  CMD ["/usr/local/bin/sendable-keys", "health", "--addr", "http://127.0.0.1:50051"]

# No subcommand runs the server; `health` and `hash-token` are the operator subcommands.
ENTRYPOINT ["/usr/local/bin/sendable-keys"]
