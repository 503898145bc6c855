//! `Debug` for the messages that carry a full API key (`CreateKeyResponse.secret`,
//! `RotateKeyResponse.secret`, `VerifyKeyRequest.key`), with the key replaced by a marker.
//!
//! prost derives `Debug` for every message; for these three the build skips it (`build.rs`) and
//! this module supplies one, so a `{:?}` anywhere (a log line, a trace field, a failing test's
//! message, a client's debug print) shows everything but the key.

use std::fmt;

use super::pb;

/// What a key field prints as.
const REDACTED: &str = "<redacted>";

/// A string field that may hold a key: empty stays visibly empty, anything else is redacted.
struct Secret<'a>(&'a str);

impl fmt::Debug for Secret<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("\"\"")
        } else {
            f.write_str(REDACTED)
        }
    }
}

impl fmt::Debug for pb::CreateKeyResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreateKeyResponse")
            .field("key", &self.key)
            .field("secret", &Secret(&self.secret))
            .finish()
    }
}

impl fmt::Debug for pb::RotateKeyResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RotateKeyResponse")
            .field("new_key", &self.new_key)
            .field("secret", &Secret(&self.secret))
            .field("old_key", &self.old_key)
            .finish()
    }
}

impl fmt::Debug for pb::VerifyKeyRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyKeyRequest")
            .field("key", &Secret(&self.key))
            .field(
                "expected_environment",
                &pb::Environment::try_from(self.expected_environment)
                    .map_err(|_| self.expected_environment),
            )
            .field("cost", &self.cost)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "sk_live_AbCd1234Xq3secretsecretsecretsecret0aZ9Kp";

    #[test]
    fn debug_output_never_shows_a_key() {
        let created = format!(
            "{:?}",
            pb::CreateKeyResponse {
                key: Some(pb::ApiKey {
                    key_id: "AbCd1234".into(),
                    ..Default::default()
                }),
                secret: KEY.into(),
            }
        );
        let rotated = format!(
            "{:?}",
            pb::RotateKeyResponse {
                new_key: None,
                secret: KEY.into(),
                old_key: None,
            }
        );
        let verify = format!(
            "{:?}",
            pb::VerifyKeyRequest {
                key: KEY.into(),
                expected_environment: pb::Environment::Live as i32,
                cost: 2,
            }
        );
        for text in [&created, &rotated, &verify] {
            assert!(!text.contains("secretsecret"), "{text}");
            assert!(text.contains(REDACTED), "{text}");
        }
        // Everything else is still there to debug with.
        assert!(created.contains("AbCd1234"), "{created}");
        assert!(
            verify.contains("Live") && verify.contains("cost: 2"),
            "{verify}"
        );
        let empty = format!("{:?}", pb::VerifyKeyRequest::default());
        assert!(empty.contains("key: \"\""), "{empty}");
    }
}
