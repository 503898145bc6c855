//! Every Redis key name this service uses, in one place.
//!
//! # Layout
//!
//! ```text
//! <prefix>:{<shard>}:sessions          HASH  session id -> packed session (see below), and
//!                                            `<session id>:c` -> the random number of the
//!                                            call that last stored it (tells a resent
//!                                            command from another call)
//! <prefix>:{<shard>}:k:<key id>        HASH  one API key: hash, status, window counters, ...
//! <prefix>:{<shard>}:i:<session id>    ZSET  the session's keys, for listing (score 0, member
//!                                            "<13-digit create ms>:<key id>", so lexical order
//!                                            is creation order and pages resume by member)
//! <prefix>:{<shard>}:a:<session id>    ZSET  keys counting toward the key limit (member key id,
//!                                            score expire ms or +inf)
//! <prefix>:{<shard>}:audit:<session id> STREAM the session's audit log (trimmed by age, with
//!                                            a TTL of the retention period)
//! <prefix>:{<shard>}:u:<key id>:<YYYYMMDD> HASH one key's usage on one UTC day: `d<code>` calls
//!                                            per decision, `s`/`e` successes/errors, `rt` sum
//!                                            and `mx` max of response times (us), `h<i>`
//!                                            histogram buckets, `c:<code>` errors per code.
//!                                            TTL: the retention after the day ends
//! <prefix>:{<shard>}:m:<key id>:<hour>  HASH  attributed calls per minute of that hour (field
//!                                            = minute 0-59), kept two hours past the hour
//! <prefix>:{<shard>}:o:<key id>:<hour>  HASH  outcomes `t<minute>` and failed ones `e<minute>`
//! <prefix>:{<shard>}:al:<key id>        HASH  firing alerts: kind -> since (ms)
//! ```
//!
//! `<hour>` is hours since the epoch. Minute counters are split from day counters because
//! alerts need minute resolution only for about an hour; keeping 1440 fields per day for 90
//! days would cost far more than the day hash itself. Requests and outcomes use separate hashes
//! so each stays under 128 fields, the limit of Redis's compact listpack encoding.
//!
//! `<shard>` is `shard_of(id) = CRC16(id) mod 1024`, in decimal, used as the **hash tag**: Redis
//! Cluster places a key by the text between `{` and `}`, so everything that carries the same
//! shard number lives on one hash slot. Key ids are drawn so that a key's shard equals its
//! session's shard (see `domain::shard`), hence:
//!
//! - VerifyKey computes the key record's name *and* its session table's name from the key id
//!   alone, declares both in KEYS, and runs one script on one slot: key lookup, hash compare,
//!   status, expiry, session policy, sliding window and last-used in a single round trip;
//! - create, revoke and rotate touch the key records, the session and its sets in one script,
//!   which is what makes the key limit exact under concurrency.
//!
//! Sessions are fields of a per-shard hash rather than keys of their own so that VerifyKey can
//! *declare* the session's location in KEYS (the name depends only on the shard), as Redis
//! Cluster requires, instead of building a key name from data inside the script. The packed
//! value is `env:plan:enabled:custom_rate_limit:custom_max_keys:create_ms:update_ms:version`
//! (empty custom fields mean "use the plan's").
//!
//! `<prefix>` (default `sk`, `SENDABLE_KEYS_REDIS_PREFIX`) lets several deployments or test
//! runs share one Redis without seeing each other's data.

use crate::domain::{KeyId, Millis, SessionId};

/// Builds key names under one prefix.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_owned(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<prefix>:{<shard>}:<kind>[:<part>...]`, written directly: these names are built on
    /// every VerifyKey, where `format!`'s machinery showed up in the instruction profile.
    fn name(&self, shard: u16, kind: &str, parts: &[&str]) -> String {
        let mut name = String::with_capacity(self.prefix.len() + 40);
        name.push_str(&self.prefix);
        name.push_str(":{");
        push_number(&mut name, u64::from(shard));
        name.push_str("}:");
        name.push_str(kind);
        for part in parts {
            name.push(':');
            name.push_str(part);
        }
        name
    }

    /// The per-shard session table.
    pub fn sessions(&self, shard: u16) -> String {
        self.name(shard, "sessions", &[])
    }

    /// A key's record.
    pub fn key(&self, id: &KeyId) -> String {
        self.name(id.shard(), "k", &[id.as_str()])
    }

    /// A session's key index (every key, for listing).
    pub fn index(&self, session: &SessionId) -> String {
        self.name(session.shard(), "i", &[session.as_str()])
    }

    /// A session's keys that count toward its key limit.
    pub fn active(&self, session: &SessionId) -> String {
        self.name(session.shard(), "a", &[session.as_str()])
    }

    /// A key's usage counters for one UTC day.
    pub fn usage_day(&self, id: &KeyId, day: crate::domain::UtcDate) -> String {
        let mut date = String::with_capacity(8);
        day.push_compact(&mut date);
        self.name(id.shard(), "u", &[id.as_str(), &date])
    }

    /// A key's per-minute request counters for one hour (hours since the epoch).
    pub fn minute_requests(&self, id: &KeyId, hour: i64) -> String {
        let mut h = String::with_capacity(8);
        push_number(&mut h, hour.max(0) as u64);
        self.name(id.shard(), "m", &[id.as_str(), &h])
    }

    /// A key's per-minute outcome counters for one hour.
    pub fn minute_outcomes(&self, id: &KeyId, hour: i64) -> String {
        let mut h = String::with_capacity(8);
        push_number(&mut h, hour.max(0) as u64);
        self.name(id.shard(), "o", &[id.as_str(), &h])
    }

    /// A key's firing alerts.
    pub fn alerts(&self, id: &KeyId) -> String {
        self.name(id.shard(), "al", &[id.as_str()])
    }

    /// A session's audit log.
    pub fn audit(&self, session: &SessionId) -> String {
        self.name(session.shard(), "audit", &[session.as_str()])
    }
}

/// Appends the decimal digits of `n`.
fn push_number(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &d in &digits[i..] {
        out.push(char::from(d));
    }
}

/// The index member of a key: 13-digit creation time then key id, so that lexical order is
/// listing order.
pub fn index_member(create_ms: Millis, id: &KeyId) -> String {
    format!("{create_ms:013}:{id}")
}

/// Parses an index member back into (create ms, key id).
pub fn parse_index_member(member: &str) -> Option<(Millis, KeyId)> {
    let (ms, id) = member.split_once(':')?;
    if ms.len() != 13 || !ms.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((ms.parse().ok()?, KeyId::parse(id)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_and_its_session_share_one_hash_tag() {
        let keys = Keys::new("sk");
        let session = SessionId::parse("acme-prod").expect("valid");
        let id = KeyId::generate_in_shard(session.shard(), &mut rand::rng());
        let tag = |name: &str| {
            let open = name.find('{').expect("has a tag");
            let close = name.find('}').expect("has a tag");
            name[open + 1..close].to_owned()
        };
        let expected = session.shard().to_string();
        for name in [
            keys.key(&id),
            keys.sessions(id.shard()),
            keys.index(&session),
            keys.active(&session),
        ] {
            assert_eq!(tag(&name), expected, "{name}");
            assert!(name.starts_with("sk:{"), "{name}");
        }
    }

    #[test]
    fn names_are_exact() {
        let keys = Keys::new("sk");
        let id = KeyId::parse("AbCd1234").expect("valid");
        let shard = id.shard();
        let day = crate::domain::UtcDate::parse("2026-03-02").expect("date");
        assert_eq!(keys.key(&id), format!("sk:{{{shard}}}:k:AbCd1234"));
        assert_eq!(
            keys.usage_day(&id, day),
            format!("sk:{{{shard}}}:u:AbCd1234:20260302")
        );
        assert_eq!(
            keys.minute_requests(&id, 492_345),
            format!("sk:{{{shard}}}:m:AbCd1234:492345")
        );
        assert_eq!(keys.sessions(0), "sk:{0}:sessions");
        let mut n = String::new();
        push_number(&mut n, u64::MAX);
        assert_eq!(n, u64::MAX.to_string());
    }

    #[test]
    fn index_members_sort_in_creation_order_and_round_trip() {
        let a = KeyId::parse("zzzzzzzz").expect("valid");
        let b = KeyId::parse("00000000").expect("valid");
        assert!(index_member(999, &a) < index_member(1000, &b));
        assert_eq!(
            parse_index_member(&index_member(1_795_737_600_000, &a)),
            Some((1_795_737_600_000, a))
        );
        assert_eq!(parse_index_member("12:abc"), None);
    }
}
