//! Page sizes and opaque page tokens for list methods (AIP-158): `page_size` 0 means the
//! default, larger than the maximum is coerced down, negative is an error; a token is the
//! base64url of a versioned, kind-tagged position, so a token from another list method or a
//! hand-edited one is refused instead of silently restarting the listing.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::domain::DomainError;

pub const DEFAULT_PAGE_SIZE: usize = 50;
pub const MAX_PAGE_SIZE: usize = 1000;
/// Longest token accepted before decoding.
const MAX_TOKEN_LEN: usize = 256;

pub fn page_size(requested: i32) -> Result<usize, DomainError> {
    match requested {
        n if n < 0 => Err(DomainError::invalid("page_size", "must not be negative")),
        0 => Ok(DEFAULT_PAGE_SIZE),
        n => Ok((n as usize).min(MAX_PAGE_SIZE)),
    }
}

/// Encodes a position of list `kind` (e.g. `keys`).
pub fn encode_token(kind: &str, position: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("v1|{kind}|{position}"))
}

/// Decodes a token of list `kind`; `Ok(None)` for the empty token (first page).
pub fn decode_token(kind: &str, token: &str) -> Result<Option<String>, DomainError> {
    if token.is_empty() {
        return Ok(None);
    }
    let invalid = || {
        DomainError::invalid(
            "page_token",
            "not a page token of this list; pass the next_page_token of a previous response unchanged",
        )
    };
    if token.len() > MAX_TOKEN_LEN {
        return Err(invalid());
    }
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let mut parts = text.splitn(3, '|');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("v1"), Some(k), Some(position)) if k == kind => Ok(Some(position.to_owned())),
        _ => Err(invalid()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_sizes_default_clamp_and_refuse_negatives() {
        assert_eq!(page_size(0).ok(), Some(DEFAULT_PAGE_SIZE));
        assert_eq!(page_size(7).ok(), Some(7));
        assert_eq!(page_size(i32::MAX).ok(), Some(MAX_PAGE_SIZE));
        assert!(page_size(-1).is_err());
    }

    #[test]
    fn tokens_round_trip_and_foreign_tokens_are_refused() {
        let t = encode_token("keys", "0000000000001:AbCd1234");
        assert_eq!(
            decode_token("keys", &t).ok().flatten().as_deref(),
            Some("0000000000001:AbCd1234")
        );
        assert_eq!(decode_token("keys", "").ok(), Some(None));
        assert!(decode_token("audit", &t).is_err());
        for bad in ["%%%", "bm90IGEgdG9rZW4", &"A".repeat(300)] {
            assert!(decode_token("keys", bad).is_err(), "{bad}");
        }
    }
}
