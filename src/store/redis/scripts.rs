//! The Lua scripts, each with its KEYS and ARGV.
//!
//! Why Lua and not MULTI/EXEC: every operation here is read-decide-write (is the key limit
//! reached? is the hash right? does the window have room?). MULTI cannot branch on what it
//! reads, and WATCH-based optimistic retries would turn 1000 concurrent VerifyKey calls on one
//! key into a retry storm. A script runs atomically on the server in one round trip.
//!
//! Every key a script touches is declared in KEYS and carries the same hash tag (see
//! `keys.rs`), so each script runs on one Redis Cluster slot. Scripts validate everything
//! before their first write: a script that fails half-way cannot leave a half-written record,
//! because nothing is written before the last check.
//!
//! `redis::Script` sends EVALSHA and falls back to loading the script on NOSCRIPT, so a Redis
//! restart, a failover to a replica that never saw SCRIPT LOAD, or a SCRIPT FLUSH costs one
//! extra round trip, once, on that node.
//!
//! Key record fields: `h` hash (32 raw bytes), `hv` hash version, `s` session id, `e`
//! environment code, `n` name, `st` state (`a` active / `r` revoked), `ct` created ms, `lu` last
//! used ms, `x` expire ms, `rt` revoked ms, `rr` revoke reason, `rb` replaced by (key id), and
//! the sliding window: `rw` window index, `rc` current count, `rp` previous count.

use std::sync::LazyLock;

use redis::Script;

/// Record fields returned to Rust, in this order, by HMGET and by the scripts' replies.
pub const RECORD_FIELDS: [&str; 10] = ["s", "e", "n", "st", "ct", "lu", "x", "rt", "rr", "rb"];

/// VerifyKey. One call, one slot.
///
/// KEYS[1] key record, KEYS[2] the shard's session table.
/// ARGV[1] presented hash, ARGV[2] hash version, ARGV[3] now (ms), ARGV[4] cost,
/// ARGV[5] expected environment code (0 = any), ARGV[6..9] default rate limit of plans 1..4
/// (0 = none).
///
/// Reply: `{decision}` for NOT_FOUND; `{decision, session id, env, plan}` for decisions that
/// consume nothing; `{decision, session id, env, plan, limit, remaining, reset_after_ms,
/// retry_after_ms (-1 = never)}` for VALID and RATE_LIMITED. The window arithmetic mirrors
/// `domain::ratelimit::admit` line by line (the conformance tests hold them together).
pub static VERIFY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local k = redis.call('HMGET', KEYS[1], 'h', 'hv', 's', 'e', 'st', 'x', 'rw', 'rc', 'rp')
if k[1] ~= ARGV[1] or k[2] ~= ARGV[2] then return {3} end
local packed = redis.call('HGET', KEYS[2], k[3])
if not packed then return {3} end
local _, plan, enabled, crl = string.match(packed, '^(%d+):(%d+):(%d+):(%d*):')
local now = tonumber(ARGV[3])
local d = 0
if k[5] == 'r' then d = 4
elseif k[6] and tonumber(k[6]) <= now then d = 5
elseif enabled ~= '1' then d = 6
elseif ARGV[5] ~= '0' and ARGV[5] ~= k[4] then d = 7 end
if d ~= 0 then
  redis.call('HSET', KEYS[1], 'lu', ARGV[3])
  return {d, k[3], k[4], plan}
end
local limit = tonumber(crl) or tonumber(ARGV[5 + tonumber(plan)]) or 0
local W = 60000
local window = math.floor(now / W)
local rw, rc, rp = tonumber(k[7]), tonumber(k[8]) or 0, tonumber(k[9]) or 0
local elapsed, cur, prev
if rw and rw > window then
  window, elapsed, cur, prev = rw, 0, rc, rp
else
  elapsed = now - window * W
  if rw == window then cur, prev = rc, rp
  elseif rw == window - 1 then cur, prev = 0, rc
  else cur, prev = 0, 0 end
end
local weight = W - elapsed
local cost = tonumber(ARGV[4])
local ps = prev * weight
local retry = -1
local decision = 8
if (cur + cost) * W + ps <= limit * W then
  cur = cur + cost
  decision = 1
elseif cur + cost <= limit and prev > 0 then
  retry = weight - math.floor((limit - cur - cost) * W / prev)
elseif cost <= limit then
  local t = 0
  if cur > 0 then
    t = W - math.floor((limit - cost) * W / cur)
    if t < 0 then t = 0 end
  end
  retry = weight + t
end
local remaining = math.floor((limit * W - cur * W - ps) / W)
if remaining < 0 then remaining = 0 end
redis.call('HSET', KEYS[1], 'lu', ARGV[3], 'rw', window, 'rc', cur, 'rp', prev)
return {decision, k[3], k[4], plan, limit, remaining, weight, retry}
"#,
    )
});

/// CreateKey: insert a key if its session is below its key limit.
///
/// KEYS[1] new key record, KEYS[2] session table, KEYS[3] session index, KEYS[4] session
/// active set.
/// ARGV[1] now, ARGV[2] session id, ARGV[3] key id, ARGV[4] env code, ARGV[5] hash,
/// ARGV[6] hash version, ARGV[7] name, ARGV[8] create ms, ARGV[9] expire ms ('' = never),
/// ARGV[10] index member, ARGV[11..14] default key limit of plans 1..4 (0 = unlimited).
///
/// Reply: `{1, active keys}` created; `{-1}` key id taken; `{-2}` no such session; `{-3}`
/// environment differs from the session's; `{-4, max keys, plan}` limit reached.
///
/// Expired members of the active set are dropped first (their score is their expiry), so
/// expired keys stop counting without any background job.
pub static INSERT_KEY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return {-1} end
local packed = redis.call('HGET', KEYS[2], ARGV[2])
if not packed then return {-2} end
local env, plan, _, _, cmk = string.match(packed, '^(%d+):(%d+):(%d+):(%d*):(%d*):')
if env ~= ARGV[4] then return {-3} end
local max = tonumber(cmk) or tonumber(ARGV[10 + tonumber(plan)]) or 0
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', ARGV[1])
local n = redis.call('ZCARD', KEYS[4])
if max > 0 and n >= max then return {-4, max, tonumber(plan)} end
redis.call('HSET', KEYS[1], 'h', ARGV[5], 'hv', ARGV[6], 's', ARGV[2], 'e', ARGV[4],
  'n', ARGV[7], 'st', 'a', 'ct', ARGV[8])
local score = '+inf'
if ARGV[9] ~= '' then
  redis.call('HSET', KEYS[1], 'x', ARGV[9])
  score = ARGV[9]
end
redis.call('ZADD', KEYS[3], 0, ARGV[10])
redis.call('ZADD', KEYS[4], score, ARGV[3])
return {1, n + 1}
"#,
    )
});

/// RevokeKey.
///
/// KEYS[1] key record, KEYS[2] its session's active set.
/// ARGV[1] now, ARGV[2] reason, ARGV[3] key id, ARGV[4] session id.
///
/// Reply: `0` if no such key in that session; else the record fields ([`RECORD_FIELDS`])
/// after the change. Revoking a revoked key changes nothing (the first reason stays).
pub static REVOKE_KEY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local cur = redis.call('HMGET', KEYS[1], 'st', 's')
if not cur[1] or cur[2] ~= ARGV[4] then return 0 end
if cur[1] == 'a' then
  redis.call('HSET', KEYS[1], 'st', 'r', 'rt', ARGV[1], 'rr', ARGV[2])
  redis.call('ZREM', KEYS[2], ARGV[3])
end
return redis.call('HMGET', KEYS[1], 's', 'e', 'n', 'st', 'ct', 'lu', 'x', 'rt', 'rr', 'rb')
"#,
    )
});

/// RotateKey: create the replacement and retire the old key, atomically.
///
/// KEYS[1] old key record, KEYS[2] new key record, KEYS[3] session index, KEYS[4] session
/// active set.
/// ARGV[1] now, ARGV[2] old key id, ARGV[3] new key id, ARGV[4] session id, ARGV[5] env code,
/// ARGV[6] new hash, ARGV[7] hash version, ARGV[8] name, ARGV[9] new expire ms ('' = never),
/// ARGV[10] new index member, ARGV[11] old key's new expiry ('' = revoke now),
/// ARGV[12] revoke reason used when revoking now.
///
/// Reply: `{1, old fields, new fields}`; `{-1}` no such key in that session; `{-2}` old key
/// not active; `{-3}` old key already rotated; `{-4}` new key id taken.
///
/// The new key replaces the old one in the active set: a rotation never needs a free slot
/// under the key limit, so a session at its limit can still rotate.
pub static ROTATE_KEY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local o = redis.call('HMGET', KEYS[1], 'st', 's', 'x', 'rb')
if not o[1] or o[2] ~= ARGV[4] then return {-1} end
if o[1] ~= 'a' or (o[3] and tonumber(o[3]) <= tonumber(ARGV[1])) then return {-2} end
if o[4] then return {-3} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {-4} end
redis.call('HSET', KEYS[2], 'h', ARGV[6], 'hv', ARGV[7], 's', ARGV[4], 'e', ARGV[5],
  'n', ARGV[8], 'st', 'a', 'ct', ARGV[1])
local score = '+inf'
if ARGV[9] ~= '' then
  redis.call('HSET', KEYS[2], 'x', ARGV[9])
  score = ARGV[9]
end
redis.call('ZADD', KEYS[3], 0, ARGV[10])
redis.call('ZADD', KEYS[4], score, ARGV[3])
redis.call('ZREM', KEYS[4], ARGV[2])
if ARGV[11] == '' then
  redis.call('HSET', KEYS[1], 'st', 'r', 'rt', ARGV[1], 'rr', ARGV[12], 'rb', ARGV[3])
else
  local x = tonumber(ARGV[11])
  if o[3] and tonumber(o[3]) < x then x = tonumber(o[3]) end
  redis.call('HSET', KEYS[1], 'x', x, 'rb', ARGV[3])
end
local f = {'s', 'e', 'n', 'st', 'ct', 'lu', 'x', 'rt', 'rr', 'rb'}
return {1, redis.call('HMGET', KEYS[1], unpack(f)), redis.call('HMGET', KEYS[2], unpack(f))}
"#,
    )
});

/// UpdateSession: compare-and-set on the session's version.
///
/// KEYS[1] session table. ARGV[1] session id, ARGV[2] expected version, ARGV[3] new packed
/// session.
///
/// Reply: `1` replaced, `0` no such session, `-1` version conflict.
pub static REPLACE_SESSION: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then return 0 end
if string.match(cur, ':(%d+)$') ~= ARGV[2] then return -1 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"#,
    )
});

/// Audit log append with age-based trimming.
///
/// KEYS[1] the session's audit stream. ARGV[1] retention (ms), then the entry's field/value
/// pairs.
///
/// Reply: the new entry's id. Ids and trimming use the Redis server's clock (`TIME`), the same
/// clock as the key's TTL, so "older than the retention" means one thing everywhere.
pub static APPEND_AUDIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
local t = redis.call('TIME')
local oldest = tonumber(t[1]) * 1000 - tonumber(ARGV[1])
if oldest > 0 then
  redis.call('XTRIM', KEYS[1], 'MINID', '~', oldest)
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return id
"#,
    )
});
