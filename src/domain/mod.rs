//! The domain: what an API key, a session, a plan, a decision and a rate-limit window *are*, and
//! the pure rules about them (key format and checksum, keyed hashing, effective plan limits, the
//! sliding-window arithmetic, UTC dates). Nothing here knows about tonic, Redis or tokio, so every
//! rule can be unit-tested in isolation and shared by both stores.

pub mod apikey;
pub mod audit;
pub mod decision;
pub mod error;
pub mod hash;
pub mod key;
pub mod plan;
pub mod ratelimit;
pub mod session;
pub mod shard;
pub mod time;
pub mod usage;

pub use apikey::{KeyRecord, KeyState, KeyStatus, ROTATED_REASON};
pub use audit::{Actor, AuditAction, AuditEntry, AuditEvent};
pub use decision::{Decision, RateLimitState, VerifyOutcome};
pub use error::{DomainError, FieldViolation, Resource, Violations};
pub use hash::{HASH_VERSION, KeyHash, KeyHasher, Pepper};
pub use key::{Environment, IssuedKey, KeyId, ParsedKey};
pub use plan::{EffectiveLimits, Plan, PlanLimits, PlanTable};
pub use session::{SessionId, SessionPatch, SessionRecord};
pub use time::{Millis, UtcDate};
