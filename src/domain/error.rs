//! Errors the business rules can raise, independent of transport. `grpc::status` turns them
//! into `google.rpc.Status` with ErrorInfo and BadRequest details.

use std::fmt;

use super::plan::Plan;

/// Which kind of thing a NotFound/AlreadyExists is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource {
    Session,
    Key,
}

impl Resource {
    pub fn name(self) -> &'static str {
        match self {
            Resource::Session => "session",
            Resource::Key => "key",
        }
    }
}

/// One invalid request field, named the way the proto names it (`outcomes[3].key_id`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

/// Collects every problem of a request, so the caller learns about all of them at once.
#[derive(Debug, Default)]
pub struct Violations(Vec<FieldViolation>);

impl Violations {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(FieldViolation {
            field: field.into(),
            description: description.into(),
        });
    }

    /// Takes over every violation of `other`.
    pub fn extend(&mut self, other: Violations) {
        self.0.extend(other.0);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `Ok(())` if nothing was added, else the InvalidArgument error.
    pub fn check(self) -> Result<(), DomainError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(DomainError::InvalidArgument(self.0))
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error("invalid request: {}", describe(.0))]
    InvalidArgument(Vec<FieldViolation>),
    #[error("{} {id} not found", .resource.name())]
    NotFound { resource: Resource, id: String },
    #[error("{} {id} already exists", .resource.name())]
    AlreadyExists { resource: Resource, id: String },
    #[error(
        "session {session_id} is at its key limit: {max_keys} active keys on plan {plan}{}",
        if *.rotating {
            ", plus the one a rotation may add while the old key's grace period runs; revoke a \
             key (such as one still in its grace period), or rotate with grace_period 0"
        } else {
            "; revoke a key or move the session to a larger plan"
        }
    )]
    KeyLimitReached {
        session_id: String,
        plan: Plan,
        max_keys: u32,
        /// Refused a rotation with a grace period, not a new key.
        rotating: bool,
    },
    /// The request is valid but the resource is not in a state that allows it.
    #[error("{message}")]
    FailedPrecondition {
        /// UPPER_SNAKE machine-readable reason for ErrorInfo.
        reason: &'static str,
        message: String,
    },
    /// The operation lost a race too many times (e.g. concurrent session updates).
    #[error("{0}")]
    Aborted(String),
}

impl DomainError {
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        DomainError::InvalidArgument(vec![FieldViolation {
            field: field.into(),
            description: description.into(),
        }])
    }
}

fn describe(violations: &[FieldViolation]) -> String {
    struct List<'a>(&'a [FieldViolation]);
    impl fmt::Display for List<'_> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            for (i, v) in self.0.iter().enumerate() {
                if i > 0 {
                    f.write_str("; ")?;
                }
                write!(f, "{}: {}", v.field, v.description)?;
            }
            Ok(())
        }
    }
    List(violations).to_string()
}
