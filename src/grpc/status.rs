//! The single mapping from service errors to `google.rpc.Status`: a gRPC code, a readable
//! message, an `ErrorInfo` (UPPER_SNAKE reason, domain `keys.sendable`, metadata) and, for bad
//! input, a `BadRequest` listing every invalid field. Store failures are logged here (at most
//! a few lines a second) with their detail and returned without it: callers learn *that* the
//! store failed and whether to retry, not its addresses or internals.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::domain::DomainError;
use crate::service::Error;
use crate::telemetry::{THROTTLED_LINES_PER_SECOND, Throttle};

/// The `ErrorInfo.domain` of every error this service returns.
pub const ERROR_DOMAIN: &str = "keys.sendable";

pub fn to_status(err: &Error) -> Status {
    let (code, message, details) = match err {
        Error::Domain(domain) => domain_status(domain),
        Error::Store(store) if store.transient => {
            static LOG: Throttle = Throttle::new(THROTTLED_LINES_PER_SECOND);
            if let Some(suppressed) = LOG.admit() {
                tracing::warn!(error = %store.message, suppressed, "store unavailable");
            }
            (
                Code::Unavailable,
                "the key store is unavailable; retry with backoff".to_owned(),
                ErrorDetails::with_error_info("STORE_UNAVAILABLE", ERROR_DOMAIN, HashMap::new()),
            )
        }
        Error::Store(store) => {
            static LOG: Throttle = Throttle::new(THROTTLED_LINES_PER_SECOND);
            if let Some(suppressed) = LOG.admit() {
                tracing::error!(error = %store.message, suppressed, "store failure");
            }
            (
                Code::Internal,
                "internal error".to_owned(),
                ErrorDetails::with_error_info("INTERNAL", ERROR_DOMAIN, HashMap::new()),
            )
        }
    };
    Status::with_error_details(code, message, details)
}

/// A refusal by the access policy (UNAUTHENTICATED or PERMISSION_DENIED), with the ErrorInfo
/// every error of this service carries.
pub fn access_denied(code: Code, message: impl Into<String>) -> Status {
    let reason = match code {
        Code::Unauthenticated => "UNAUTHENTICATED",
        _ => "PERMISSION_DENIED",
    };
    Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(reason, ERROR_DOMAIN, HashMap::new()),
    )
}

/// An INVALID_ARGUMENT status for violations found while decoding a request.
pub fn invalid_argument(err: &DomainError) -> Status {
    let (code, message, details) = domain_status(err);
    Status::with_error_details(code, message, details)
}

fn domain_status(err: &DomainError) -> (Code, String, ErrorDetails) {
    let message = err.to_string();
    match err {
        DomainError::InvalidArgument(violations) => {
            let mut details =
                ErrorDetails::with_error_info("INVALID_ARGUMENT", ERROR_DOMAIN, HashMap::new());
            for v in violations {
                details.add_bad_request_violation(&v.field, &v.description);
            }
            (Code::InvalidArgument, message, details)
        }
        DomainError::NotFound { resource, id } => (
            Code::NotFound,
            message,
            ErrorDetails::with_error_info(
                format!("{}_NOT_FOUND", resource.name().to_uppercase()),
                ERROR_DOMAIN,
                HashMap::from([(format!("{}_id", resource.name()), id.clone())]),
            ),
        ),
        DomainError::AlreadyExists { resource, id } => (
            Code::AlreadyExists,
            message,
            ErrorDetails::with_error_info(
                format!("{}_ALREADY_EXISTS", resource.name().to_uppercase()),
                ERROR_DOMAIN,
                HashMap::from([(format!("{}_id", resource.name()), id.clone())]),
            ),
        ),
        DomainError::KeyLimitReached {
            session_id,
            plan,
            max_keys,
            rotating,
        } => {
            let mut details = ErrorDetails::with_error_info(
                "KEY_LIMIT_REACHED",
                ERROR_DOMAIN,
                HashMap::from([
                    ("session_id".to_owned(), session_id.clone()),
                    ("plan".to_owned(), plan.name().to_owned()),
                    ("max_keys".to_owned(), max_keys.to_string()),
                ]),
            );
            details.add_quota_failure_violation(
                format!("sessions/{session_id}"),
                if *rotating {
                    format!(
                        "at most {max_keys} active keys on plan {plan}, one more while a \
                         rotation's grace period runs; revoke a key, rotate with no grace \
                         period, or upgrade the plan"
                    )
                } else {
                    format!(
                        "at most {max_keys} active keys on plan {plan}; revoke a key or upgrade \
                         the plan"
                    )
                },
            );
            (Code::ResourceExhausted, message, details)
        }
        DomainError::FailedPrecondition { reason, .. } => (
            Code::FailedPrecondition,
            message,
            ErrorDetails::with_error_info(*reason, ERROR_DOMAIN, HashMap::new()),
        ),
        DomainError::Aborted(_) => (
            Code::Aborted,
            message,
            ErrorDetails::with_error_info("CONCURRENT_MODIFICATION", ERROR_DOMAIN, HashMap::new()),
        ),
    }
}
