//! The API key string: `sk_<env>_<key id><secret><checksum>`.
//!
//! - `<env>` is `dev`, `staging` or `live`, from the session; it tells people and secret
//!   scanners what a leaked string is.
//! - `<key id>`: 8 base62 characters, the product page's "Key ID (first 8 characters)". Not
//!   secret; shown in listings and logs as `sk_live_AbCd1234`.
//! - `<secret>`: 30 base62 characters from the OS CSPRNG, 178.6 bits of entropy (the spec asks
//!   for at least 160).
//! - `<checksum>`: CRC32 (IEEE) of everything before it, as 6 base62 characters. A typo or a
//!   random string fails here, so VerifyKey answers MALFORMED without touching the store, and a
//!   scanner can tell a real key from a look-alike with no network call.

use std::fmt;

use rand::{Rng, RngCore};

use super::shard::{SHARDS, shard_of};

pub const KEY_ID_LEN: usize = 8;
pub const SECRET_LEN: usize = 30;
pub const CHECKSUM_LEN: usize = 6;
/// Characters after `sk_<env>_`.
pub const BODY_LEN: usize = KEY_ID_LEN + SECRET_LEN + CHECKSUM_LEN;
/// Longest possible key (`sk_staging_` + body); anything longer is malformed without parsing.
pub const MAX_KEY_LEN: usize = "sk_staging_".len() + BODY_LEN;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// The environment of a session and of its keys. The discriminants are the wire values of the
/// proto enum and of the stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Environment {
    Dev = 1,
    Staging = 2,
    Live = 3,
}

impl Environment {
    pub const ALL: [Environment; 3] = [Environment::Dev, Environment::Staging, Environment::Live];

    pub fn name(self) -> &'static str {
        match self {
            Environment::Dev => "dev",
            Environment::Staging => "staging",
            Environment::Live => "live",
        }
    }

    /// `sk_<env>_`.
    pub fn key_prefix(self) -> &'static str {
        match self {
            Environment::Dev => "sk_dev_",
            Environment::Staging => "sk_staging_",
            Environment::Live => "sk_live_",
        }
    }

    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: i64) -> Option<Self> {
        match code {
            1 => Some(Environment::Dev),
            2 => Some(Environment::Staging),
            3 => Some(Environment::Live),
            _ => None,
        }
    }
}

impl fmt::Display for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

fn is_base62(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}

/// The 8-character public identifier of a key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId([u8; KEY_ID_LEN]);

impl KeyId {
    /// Accepts exactly 8 base62 characters.
    pub fn parse(text: &str) -> Option<Self> {
        let bytes = text.as_bytes();
        if bytes.len() != KEY_ID_LEN || !bytes.iter().copied().all(is_base62) {
            return None;
        }
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(bytes);
        Some(KeyId(id))
    }

    pub fn as_str(&self) -> &str {
        // Only ever built from base62 ASCII (parse and generate), so this cannot fail.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The shard this key lives in; equal to its session's shard by construction.
    pub fn shard(&self) -> u16 {
        shard_of(&self.0)
    }

    /// Draws random key ids until one falls in `shard` (see [`super::shard`]). Key ids are not
    /// secrets, so any RNG will do; uniqueness is enforced by the store, which refuses an id
    /// that is taken.
    pub fn generate_in_shard(shard: u16, rng: &mut impl RngCore) -> Self {
        debug_assert!(shard < SHARDS);
        loop {
            // One u64 gives 8 base62 digits (62^8 < 2^48); the modulo bias is irrelevant here.
            let mut n = rng.next_u64();
            let mut id = [0u8; KEY_ID_LEN];
            for slot in id.iter_mut() {
                *slot = BASE62[(n % 62) as usize];
                n /= 62;
            }
            if shard_of(&id) == shard {
                return KeyId(id);
            }
        }
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", self.as_str())
    }
}

/// A freshly minted key. The full string leaves the process exactly once, in the CreateKey or
/// RotateKey response; `Debug` never shows it.
pub struct IssuedKey {
    pub key_id: KeyId,
    pub environment: Environment,
    full: String,
}

impl IssuedKey {
    /// Mints a key with a secret from `rng`, which must be a CSPRNG (the OS-seeded thread RNG
    /// in production).
    pub fn generate(
        environment: Environment,
        key_id: KeyId,
        rng: &mut impl rand::CryptoRng,
    ) -> Self {
        let mut full = String::with_capacity(MAX_KEY_LEN);
        full.push_str(environment.key_prefix());
        full.push_str(key_id.as_str());
        let mut produced = 0;
        while produced < SECRET_LEN {
            // Rejection sampling keeps every character uniform: 248 = 4 * 62.
            let byte: u8 = rng.random();
            if byte < 248 {
                full.push(char::from(BASE62[usize::from(byte % 62)]));
                produced += 1;
            }
        }
        let checksum = checksum(full.as_bytes());
        full.push_str(&checksum);
        IssuedKey {
            key_id,
            environment,
            full,
        }
    }

    /// The full key. Call only to hash it or to put it in the one response that returns it.
    pub fn expose(&self) -> &str {
        &self.full
    }

    pub fn into_exposed(self) -> String {
        self.full
    }
}

impl fmt::Debug for IssuedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "IssuedKey({}{}…)",
            self.environment.key_prefix(),
            self.key_id
        )
    }
}

/// CRC32 of `data` as 6 base62 digits, most significant first (62^6 > 2^32).
fn checksum(data: &[u8]) -> String {
    let mut n = crc32fast::hash(data);
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    out.iter().map(|&b| char::from(b)).collect()
}

/// A presented key that passed the local checks. Borrowing the input keeps VerifyKey free of
/// allocations until the store call.
#[derive(Clone, Copy)]
pub struct ParsedKey<'a> {
    pub environment: Environment,
    pub key_id: KeyId,
    full: &'a str,
}

impl ParsedKey<'_> {
    /// The full key, for hashing only.
    pub fn expose(&self) -> &str {
        self.full
    }
}

impl fmt::Debug for ParsedKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ParsedKey({}{}…)",
            self.environment.key_prefix(),
            self.key_id
        )
    }
}

/// Why a string is not a Sendable key. Safe to log: it never contains the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Malformed {
    Empty,
    TooLong,
    NotAscii,
    WrongPrefix,
    WrongLength,
    BadCharacter,
    BadChecksum,
}

impl Malformed {
    pub fn as_str(self) -> &'static str {
        match self {
            Malformed::Empty => "empty",
            Malformed::TooLong => "too_long",
            Malformed::NotAscii => "not_ascii",
            Malformed::WrongPrefix => "wrong_prefix",
            Malformed::WrongLength => "wrong_length",
            Malformed::BadCharacter => "bad_character",
            Malformed::BadChecksum => "bad_checksum",
        }
    }
}

/// Checks a presented key locally. Surrounding whitespace (a common paste error) is ignored.
pub fn parse(input: &str) -> Result<ParsedKey<'_>, Malformed> {
    let key = input.trim();
    if key.is_empty() {
        return Err(Malformed::Empty);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(Malformed::TooLong);
    }
    if !key.is_ascii() {
        return Err(Malformed::NotAscii);
    }
    let environment = Environment::ALL
        .into_iter()
        .find(|env| key.starts_with(env.key_prefix()))
        .ok_or(Malformed::WrongPrefix)?;
    let body = &key.as_bytes()[environment.key_prefix().len()..];
    if body.len() != BODY_LEN {
        return Err(Malformed::WrongLength);
    }
    if !body.iter().copied().all(is_base62) {
        return Err(Malformed::BadCharacter);
    }
    let (signed, sum) = key.split_at(key.len() - CHECKSUM_LEN);
    if checksum(signed.as_bytes()) != sum {
        return Err(Malformed::BadChecksum);
    }
    let key_id = KeyId::parse(&key[environment.key_prefix().len()..][..KEY_ID_LEN])
        .ok_or(Malformed::BadCharacter)?;
    Ok(ParsedKey {
        environment,
        key_id,
        full: key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mint(env: Environment) -> IssuedKey {
        let mut rng = rand::rng();
        let id = KeyId::generate_in_shard(7, &mut rng);
        IssuedKey::generate(env, id, &mut rng)
    }

    #[test]
    fn minted_keys_parse_back_to_their_id_and_environment() {
        for env in Environment::ALL {
            let key = mint(env);
            let parsed = parse(key.expose()).expect("a minted key parses");
            assert_eq!(parsed.environment, env);
            assert_eq!(parsed.key_id, key.key_id);
            assert_eq!(parsed.key_id.shard(), 7);
            assert_eq!(key.expose().len(), env.key_prefix().len() + BODY_LEN);
        }
    }

    #[test]
    fn whitespace_around_the_key_is_ignored() {
        let key = mint(Environment::Live);
        let padded = format!(" \t{}\n ", key.expose());
        assert_eq!(parse(&padded).map(|p| p.key_id), Ok(key.key_id));
    }

    #[test]
    fn every_single_character_typo_is_caught() {
        let key = mint(Environment::Live);
        let text = key.expose();
        let prefix = Environment::Live.key_prefix().len();
        for i in prefix..text.len() {
            let mut bytes = text.as_bytes().to_vec();
            bytes[i] = if bytes[i] == b'a' { b'b' } else { b'a' };
            let typo = String::from_utf8(bytes).expect("ascii");
            assert_eq!(
                parse(&typo).err(),
                Some(Malformed::BadChecksum),
                "position {i}"
            );
        }
    }

    #[test]
    fn malformed_inputs_say_why() {
        let key = mint(Environment::Dev);
        let text = key.expose();
        assert_eq!(parse("").err(), Some(Malformed::Empty));
        assert_eq!(parse("   ").err(), Some(Malformed::Empty));
        assert_eq!(parse(&"x".repeat(1 << 20)).err(), Some(Malformed::TooLong));
        assert_eq!(parse("sk_live_é").err(), Some(Malformed::NotAscii));
        assert_eq!(
            parse(&text.replacen("sk_dev_", "pk_dev_", 1)).err(),
            Some(Malformed::WrongPrefix)
        );
        assert_eq!(
            parse(&text.replacen("sk_dev_", "sk_prod_", 1)).err(),
            Some(Malformed::WrongPrefix)
        );
        assert_eq!(
            parse(&text[..text.len() - 1]).err(),
            Some(Malformed::WrongLength)
        );
        let mut bad = text.to_string();
        bad.replace_range(10..11, "-");
        assert_eq!(parse(&bad).err(), Some(Malformed::BadCharacter));
        // The environment is covered by the checksum: relabelling a dev key as live fails.
        let relabelled = text.replacen("sk_dev_", "sk_live_", 1);
        assert_eq!(parse(&relabelled).err(), Some(Malformed::BadChecksum));
    }

    #[test]
    fn debug_output_never_contains_the_secret() {
        let key = mint(Environment::Live);
        let shown = format!("{key:?} {:?}", parse(key.expose()).expect("parses"));
        assert!(!shown.contains(&key.expose()[16..]), "{shown}");
    }

    #[test]
    fn key_id_parsing_is_strict() {
        assert!(KeyId::parse("AbCd1234").is_some());
        for bad in ["", "AbCd123", "AbCd12345", "AbCd-234", "AbCd123é"] {
            assert!(KeyId::parse(bad).is_none(), "{bad:?}");
        }
    }
}
