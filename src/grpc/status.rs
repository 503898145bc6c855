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

/// What prost's decode errors start with, in the `INTERNAL` status tonic makes of them.
const DECODE_FAILURE: &str = "failed to decode Protobuf message: ";

/// A refusal tonic makes before any handler runs, put in this service's error model; `None`
/// for any other status (the service's own carry their details already).
///
/// - A body that is not the method's message: tonic answers `INTERNAL`, as if the server had
///   failed. It is the caller's input, so `INVALID_ARGUMENT` with a `BadRequest` naming the
///   field prost could not read (its path from the request's top, `outcomes.error_code`), or
///   `request` when prost names none.
/// - A message over the size limit: `OUT_OF_RANGE` as tonic says, plus the `ErrorInfo`
///   (`MESSAGE_TOO_LARGE`) every error of this service carries.
pub fn from_transport_refusal(status: &Status) -> Option<Status> {
    if !status.details().is_empty() {
        return None;
    }
    match status.code() {
        Code::Internal => {
            let (field, description) = decode_failure(status.message())?;
            Some(invalid_argument(&DomainError::invalid(field, description)))
        }
        Code::OutOfRange
            if status
                .message()
                .contains("decoded message length too large") =>
        {
            Some(Status::with_error_details(
                Code::OutOfRange,
                status.message(),
                ErrorDetails::with_error_info("MESSAGE_TOO_LARGE", ERROR_DOMAIN, HashMap::new()),
            ))
        }
        _ => None,
    }
}

/// The field path and description in prost's decode error text: `Inner.field: Outer.field:
/// description`, innermost first (each `Message.field` pushed as the error rose).
fn decode_failure(message: &str) -> Option<(String, String)> {
    let rest = message.strip_prefix(DECODE_FAILURE)?;
    let mut fields = Vec::new();
    let mut remaining = rest;
    while let Some((frame, tail)) = remaining.split_once(": ") {
        let Some((message_name, field)) = frame.split_once('.') else {
            break;
        };
        let ident =
            |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !ident(message_name) || !ident(field) {
            break;
        }
        fields.push(field);
        remaining = tail;
    }
    fields.reverse();
    let field = if fields.is_empty() {
        "request".to_owned()
    } else {
        fields.join(".")
    };
    Some((
        field,
        format!("not readable as the method's message: {remaining}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad_fields(status: &Status) -> Vec<(String, String)> {
        status
            .get_details_bad_request()
            .map(|b| {
                b.field_violations
                    .into_iter()
                    .map(|v| (v.field, v.description))
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn undecodable_requests_are_invalid_arguments_naming_the_field() {
        use prost::Message;
        // outcomes[0].error_code (field 1, then field 3) holding bytes that are not UTF-8,
        // decoded by prost and wrapped as tonic-prost does, so a change of prost's wording
        // shows here.
        let body = [0x0a, 0x04, 0x1a, 0x02, 0xc3, 0x28];
        let error =
            crate::grpc::pb::RecordOutcomesRequest::decode(&body[..]).expect_err("not UTF-8");
        let tonic = Status::internal(error.to_string());
        let ours = from_transport_refusal(&tonic).expect("rewritten");
        assert_eq!(ours.code(), Code::InvalidArgument);
        assert_eq!(
            bad_fields(&ours),
            [(
                "outcomes.error_code".to_owned(),
                "not readable as the method's message: invalid string value: data is not UTF-8 \
                 encoded"
                    .to_owned()
            )]
        );
        let whole =
            Status::internal("failed to decode Protobuf message: invalid wire type value: 7");
        let ours = from_transport_refusal(&whole).expect("rewritten");
        assert_eq!(bad_fields(&ours)[0].0, "request");
    }

    #[test]
    fn oversized_messages_gain_an_error_info_and_other_statuses_stay() {
        let tonic = Status::out_of_range(
            "Error, decoded message length too large: found 1048581 bytes, the limit is: 524288 bytes",
        );
        let ours = from_transport_refusal(&tonic).expect("rewritten");
        assert_eq!(ours.code(), Code::OutOfRange);
        assert_eq!(ours.message(), tonic.message());
        assert_eq!(
            ours.get_details_error_info().map(|i| i.reason),
            Some("MESSAGE_TOO_LARGE".to_owned())
        );
        // The service's own errors, and other internal errors, are left alone.
        let own = to_status(&Error::Domain(DomainError::invalid("key", "too long")));
        assert!(from_transport_refusal(&own).is_none());
        assert!(from_transport_refusal(&Status::internal("internal error")).is_none());
        assert!(from_transport_refusal(&Status::out_of_range("page past the end")).is_none());
    }
}
