//! Keys are stored only as a keyed BLAKE3 hash. The hashing key is derived from a server-side
//! pepper (a secret from config), so a dump of the store alone cannot be used to test guesses
//! offline. Each stored hash carries [`HASH_VERSION`]. A record whose version is not the one this
//! server computes is answered NOT_FOUND rather than compared with the wrong scheme, so a future
//! migration (dual hashing, then re-issuing) is an explicit step and never a silent mismatch.
//!
//! A slow password hash is not needed: the secret has 178 bits of entropy, so brute force is
//! hopeless whatever the hash speed, and VerifyKey must stay sub-millisecond.

use std::fmt;

/// Version of the hashing scheme written into every key record.
pub const HASH_VERSION: u8 = 1;

/// Context string for BLAKE3's key derivation; changing it changes every hash.
const DERIVE_CONTEXT: &str = "sendable-keys 2026-11 api key hash v1";

/// The server-side secret. `Debug` is redacted so it can never reach a log by accident.
#[derive(Clone)]
pub struct Pepper(Vec<u8>);

/// The shortest pepper accepted: 32 bytes, so it carries at least as much entropy as a
/// 256-bit key when generated randomly (e.g. `openssl rand -base64 32`).
pub const MIN_PEPPER_LEN: usize = 32;

impl Pepper {
    pub fn new(bytes: Vec<u8>) -> Result<Self, String> {
        if bytes.len() < MIN_PEPPER_LEN {
            return Err(format!(
                "the pepper must be at least {MIN_PEPPER_LEN} bytes (got {})",
                bytes.len()
            ));
        }
        Ok(Pepper(bytes))
    }

    /// A random pepper for the in-memory store, whose keys do not outlive the process anyway.
    pub fn random() -> Self {
        let mut bytes = vec![0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
        Pepper(bytes)
    }
}

impl fmt::Debug for Pepper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pepper(<redacted>)")
    }
}

/// A stored key hash.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyHash(pub [u8; 32]);

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyHash(<redacted>)")
    }
}

impl KeyHash {
    /// Constant-time comparison, for the in-memory store (Redis compares inside its script; a
    /// timing difference there reveals nothing usable about a 178-bit secret's keyed hash).
    pub fn matches(&self, other: &KeyHash) -> bool {
        subtle::ConstantTimeEq::ct_eq(&self.0[..], &other.0[..]).into()
    }
}

/// Hashes full keys with the pepper-derived key.
#[derive(Clone)]
pub struct KeyHasher {
    key: [u8; 32],
}

impl KeyHasher {
    pub fn new(pepper: &Pepper) -> Self {
        KeyHasher {
            key: blake3::derive_key(DERIVE_CONTEXT, &pepper.0),
        }
    }

    /// The hash of a full key string (prefix, id, secret and checksum).
    pub fn hash(&self, full_key: &str) -> KeyHash {
        KeyHash(*blake3::keyed_hash(&self.key, full_key.as_bytes()).as_bytes())
    }
}

impl fmt::Debug for KeyHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyHasher(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_depends_on_pepper_and_key() {
        let a = KeyHasher::new(&Pepper::new(vec![1; 32]).expect("long enough"));
        let b = KeyHasher::new(&Pepper::new(vec![2; 32]).expect("long enough"));
        assert_eq!(a.hash("sk_live_x"), a.hash("sk_live_x"));
        assert_ne!(a.hash("sk_live_x"), a.hash("sk_live_y"));
        assert_ne!(a.hash("sk_live_x"), b.hash("sk_live_x"));
        assert!(a.hash("k").matches(&a.hash("k")));
        assert!(!a.hash("k").matches(&b.hash("k")));
    }

    #[test]
    fn short_peppers_are_refused_and_debug_is_redacted() {
        assert!(Pepper::new(b"short".to_vec()).is_err());
        let pepper = Pepper::new(b"0123456789abcdef0123456789abcdef".to_vec()).expect("32 bytes");
        assert_eq!(format!("{pepper:?}"), "Pepper(<redacted>)");
        assert!(!format!("{:?}", KeyHasher::new(&pepper)).contains("0123"));
    }
}
