//! Business rules, generic over the store traits: sessions and plans, key issuance, listing,
//! revocation and rotation, and the VerifyKey hot path. Knows nothing about gRPC or Redis.

pub mod clock;
pub mod keys;
pub mod paging;
pub mod usage;

pub use keys::KeyService;
pub use usage::UsageService;

use crate::domain::usage::AlertThresholds;
use crate::domain::{DomainError, PlanTable};
use crate::store::StoreError;

/// Policy the services apply; from config (plans file, retention flags).
#[derive(Clone, Debug)]
pub struct Settings {
    pub plans: PlanTable,
    /// How long audit events are kept.
    pub audit_retention_days: u32,
    /// How long usage counters are kept (days after the day they count).
    pub usage_retention_days: u32,
    pub alerts: AlertThresholds,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            plans: PlanTable::default(),
            audit_retention_days: 365,
            usage_retention_days: 90,
            alerts: AlertThresholds::default(),
        }
    }
}

/// A failed service call: a rule said no, or the store failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The gRPC code name this error maps to, for audit records and logs (the service layer
    /// names outcomes the way operators will read them in grpcurl).
    pub fn code_name(&self) -> &'static str {
        match self {
            Error::Domain(DomainError::InvalidArgument(_)) => "INVALID_ARGUMENT",
            Error::Domain(DomainError::NotFound { .. }) => "NOT_FOUND",
            Error::Domain(DomainError::AlreadyExists { .. }) => "ALREADY_EXISTS",
            Error::Domain(DomainError::KeyLimitReached { .. }) => "RESOURCE_EXHAUSTED",
            Error::Domain(DomainError::FailedPrecondition { .. }) => "FAILED_PRECONDITION",
            Error::Domain(DomainError::Aborted(_)) => "ABORTED",
            Error::Store(e) if e.transient => "UNAVAILABLE",
            Error::Store(_) => "INTERNAL",
        }
    }
}
