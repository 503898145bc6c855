//! # sendable-keys
//!
//! The API-key control plane of Sendable: issues, verifies, revokes and rotates API keys,
//! enforces per-plan sliding-window rate limits, records usage and raises alerts.
//!
//! # Layout
//!
//! Imports flow one way: `grpc -> service -> store -> domain`; only [`app`] sees all of them.
//!
//! - [`domain`]: key format and checksum, hashing, sessions, plans, decisions, the
//!   sliding-window arithmetic, dates. Pure; no tonic, no Redis.
//! - [`store`]: the storage traits the services need ([`store::Store`]), the embedded
//!   [`store::memory`] store and the Redis store ([`store::redis`], standalone or Cluster).
//! - [`service`]: the business rules (sessions, keys, VerifyKey), generic over the store and
//!   given an injectable [`service::clock::Clock`].
//! - [`grpc`]: tonic implementations: proto -> domain, call the service, domain -> proto;
//!   [`grpc::status`] is the only place errors become `tonic::Status`.
//! - [`config`]: command line and environment; [`cli`]: the operator subcommands.
//! - [`telemetry`] sets up logging.
//! - [`app`]: wiring: store from config, services, health, reflection; `serve(listener,
//!   shutdown)` for tests and `run(config)` for the binary.

pub mod admin;
pub mod app;
pub mod auth;
pub mod cli;
pub mod config;
pub mod domain;
pub mod grpc;
pub mod service;
pub mod store;
pub mod telemetry;
