//! Who may call what.
//!
//! Callers present `authorization: Bearer <token>`. The credentials file
//! (`SENDABLE_KEYS_CREDENTIALS_FILE`, TOML) lists one `[[caller]]` per calling service or
//! operator with its `name`, `role` and `token_sha256` — the hex SHA-256 of the token, so the
//! file holds no usable secret. Roles:
//!
//! - `admin`: everything;
//! - `service`: the calls a microservice makes per request: `VerifyKey` and `RecordOutcomes`.
//!
//! Health and reflection are open to everyone (probes and grpcurl need no token). Without a
//! credentials file the server serves only loopback peers (anything else may reach health and
//! reflection, nothing more), so a forgotten file cannot expose an open control plane.

use std::fmt;
use std::path::Path;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Service,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Service => "service",
        }
    }
}

/// The token as the server compares it: surrounding whitespace is not part of it (HTTP drops
/// it from header values anyway). `hash-token` hashes the same text, so a token pasted with a
/// stray space or tab hashes to what the server will see.
pub fn presented_token(raw: &str) -> &str {
    raw.trim()
}

/// gRPC paths anyone may call.
pub fn is_open(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/")
        || path.starts_with("/grpc.reflection.v1.ServerReflection/")
        || path.starts_with("/grpc.reflection.v1alpha.ServerReflection/")
}

/// The role a gRPC path needs: a calling service may verify keys and report outcomes (SPEC,
/// "Access to the service itself"); everything else, reads of a key's usage or window
/// included, is the dashboard's, so admin. A service has what it needs per request in
/// VerifyKey's answer, and a service token must not read other tenants' keys by id.
pub fn required_role(path: &str) -> Role {
    match path {
        "/sendable.keys.v1.KeyService/VerifyKey"
        | "/sendable.keys.v1.UsageService/RecordOutcomes" => Role::Service,
        _ => Role::Admin,
    }
}

/// One configured caller.
#[derive(Clone)]
pub struct Caller {
    pub name: String,
    pub role: Role,
    token_sha256: [u8; 32],
}

impl fmt::Debug for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Caller")
            .field("name", &self.name)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// A TOML error as "message (line N)", without the excerpt of the file that the error's own
/// `Display` quotes: the offending line may hold a plain token (`token = "..."` instead of
/// `token_sha256`, the very mistake `deny_unknown_fields` catches), and this message is logged.
fn parse_error(text: &str, err: &toml::de::Error) -> String {
    match err.span() {
        Some(span) => {
            let line = text
                .get(..span.start)
                .map_or(0, |before| before.matches('\n').count())
                + 1;
            format!("{} (line {line})", err.message().trim_end())
        }
        None => err.message().trim_end().to_owned(),
    }
}

/// The configured callers.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    callers: Vec<Caller>,
}

impl Credentials {
    pub fn from_toml(text: &str) -> Result<Self, String> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Entry {
            name: String,
            role: Role,
            token_sha256: String,
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            #[serde(default)]
            caller: Vec<Entry>,
        }
        let file: File = toml::from_str(text).map_err(|e| parse_error(text, &e))?;
        if file.caller.is_empty() {
            return Err("no [[caller]] entries: list at least one caller, or remove the file to serve loopback callers only".into());
        }
        let mut callers: Vec<Caller> = Vec::with_capacity(file.caller.len());
        for (i, entry) in file.caller.into_iter().enumerate() {
            let ok_name = !entry.name.is_empty()
                && entry.name.len() <= 64
                && entry
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
            if !ok_name {
                return Err(format!(
                    "caller #{}: name must be 1-64 characters from [A-Za-z0-9._-]",
                    i + 1
                ));
            }
            if callers.iter().any(|c| c.name == entry.name) {
                return Err(format!("caller {:?} is listed twice", entry.name));
            }
            let mut hash = [0u8; 32];
            if hex::decode_to_slice(entry.token_sha256.trim(), &mut hash).is_err() {
                return Err(format!(
                    "caller {:?}: token_sha256 must be 64 hex characters (`sendable-keys hash-token` prints it)",
                    entry.name
                ));
            }
            if callers.iter().any(|c| c.token_sha256 == hash) {
                return Err(format!(
                    "caller {:?} shares its token with another caller; give each caller its own",
                    entry.name
                ));
            }
            callers.push(Caller {
                name: entry.name,
                role: entry.role,
                token_sha256: hash,
            });
        }
        Ok(Credentials { callers })
    }

    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::from_toml(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn is_empty(&self) -> bool {
        self.callers.is_empty()
    }

    pub fn len(&self) -> usize {
        self.callers.len()
    }

    /// The caller holding `token`. Every configured hash is compared, in constant time, so the
    /// answer's timing tells nothing about which (or how much of a) hash matched.
    pub fn authenticate(&self, token: &str) -> Option<&Caller> {
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for caller in &self.callers {
            if bool::from(caller.token_sha256.ct_eq(&presented)) {
                found = Some(caller);
            }
        }
        found
    }
}

/// Whether `role` may call `path`.
pub fn allows(role: Role, path: &str) -> bool {
    role == Role::Admin || required_role(path) == Role::Service
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(token: &str) -> String {
        hex::encode(Sha256::digest(token.as_bytes()))
    }

    fn creds() -> Credentials {
        Credentials::from_toml(&format!(
            "[[caller]]\nname = \"ops\"\nrole = \"admin\"\ntoken_sha256 = \"{}\"\n\n[[caller]]\nname = \"chat\"\nrole = \"service\"\ntoken_sha256 = \"{}\"\n",
            sha("admin-token"),
            sha("chat-token")
        ))
        .expect("valid")
    }

    #[test]
    fn tokens_map_to_their_callers() {
        let c = creds();
        assert_eq!(
            c.authenticate("admin-token").map(|c| c.name.as_str()),
            Some("ops")
        );
        assert_eq!(
            c.authenticate("chat-token").map(|c| c.role),
            Some(Role::Service)
        );
        assert!(c.authenticate("chat-token ").is_none());
        assert!(c.authenticate("").is_none());
        assert!(
            !format!("{c:?}").contains(&sha("chat-token")),
            "Debug hides hashes"
        );
    }

    #[test]
    fn roles_cover_the_right_methods() {
        for path in [
            "/sendable.keys.v1.KeyService/VerifyKey",
            "/sendable.keys.v1.UsageService/RecordOutcomes",
        ] {
            assert!(allows(Role::Service, path));
            assert!(allows(Role::Admin, path));
        }
        for path in [
            "/sendable.keys.v1.KeyService/CreateKey",
            "/sendable.keys.v1.KeyService/RevokeKey",
            "/sendable.keys.v1.UsageService/GetKeyUsage",
            "/sendable.keys.v1.UsageService/GetRateLimitStatus",
            "/sendable.keys.v1.UsageService/WatchAlerts",
            "/sendable.keys.v1.KeyService/Unknown",
        ] {
            assert!(!allows(Role::Service, path), "{path}");
            assert!(allows(Role::Admin, path));
        }
        assert!(is_open("/grpc.health.v1.Health/Check"));
        assert!(is_open(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
        ));
        assert!(!is_open("/sendable.keys.v1.KeyService/VerifyKey"));
    }

    #[test]
    fn bad_credentials_files_are_refused() {
        let h = sha("t");
        for (text, needle) in [
            ("", "no [[caller]]"),
            (
                "[[caller]]\nname = \"a b\"\nrole = \"admin\"\ntoken_sha256 = \"00\"\n",
                "name",
            ),
            (
                &format!("[[caller]]\nname = \"a\"\nrole = \"root\"\ntoken_sha256 = \"{h}\"\n"),
                "root",
            ),
            (
                "[[caller]]\nname = \"a\"\nrole = \"admin\"\ntoken_sha256 = \"xyz\"\n",
                "64 hex",
            ),
            (
                &format!(
                    "[[caller]]\nname = \"a\"\nrole = \"admin\"\ntoken_sha256 = \"{h}\"\n[[caller]]\nname = \"a\"\nrole = \"service\"\ntoken_sha256 = \"{}\"\n",
                    sha("u")
                ),
                "twice",
            ),
            (
                &format!(
                    "[[caller]]\nname = \"a\"\nrole = \"admin\"\ntoken_sha256 = \"{h}\"\n[[caller]]\nname = \"b\"\nrole = \"service\"\ntoken_sha256 = \"{h}\"\n"
                ),
                "shares",
            ),
            (
                &format!(
                    "[[caller]]\nname = \"a\"\nrole = \"admin\"\ntoken = \"plain\"\ntoken_sha256 = \"{h}\"\n"
                ),
                "token",
            ),
        ] {
            let err = Credentials::from_toml(text).expect_err(text);
            assert!(err.contains(needle), "{err} (wanted {needle})");
        }
    }

    /// The error is logged at startup, and the offending line may be a plain token.
    #[test]
    fn a_bad_line_is_named_not_quoted() {
        for text in [
            "[[caller]]\nname = \"a\"\nrole = \"admin\"\ntoken = \"skt_do-not-log-me\"\n",
            "[[caller]]\nname = \"a\"\nrole = \"admin\"\ntoken_sha256 = \"skt_do-not-log-me\n",
        ] {
            let err = Credentials::from_toml(text).expect_err(text);
            assert!(!err.contains("do-not-log-me"), "{err}");
            assert!(err.contains("line 4"), "{err}");
        }
    }
}
