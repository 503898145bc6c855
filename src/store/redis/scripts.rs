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
//! Under `maxmemory` (a full Redis with `noeviction`), Redis refuses a script at its first
//! write of a command that can add memory (HSET, HINCRBY, ZADD, XADD), unless the script has
//! already written something, after which it cannot stop half-way. So the order of the first
//! write decides what a full Redis does: scripts that add records (CreateKey, RotateKey) and
//! VerifyKey, which must count what it admits, write such a command first and are refused
//! whole (`OOM`, a transient `UNAVAILABLE`, nothing written); RevokeKey writes a `ZREM` first
//! and goes through, so a key can be revoked at any time, as the product promises, with its
//! audit entry, which is written by the same script. `tests/full_redis.rs` holds this.
//!
//! Every management change writes its audit entry in its own script ([`AUDIT_LUA`]), so a
//! change is never without its record, whatever happens to the connection or the service
//! after it.
//!
//! `redis::Script` sends EVALSHA and falls back to loading the script on NOSCRIPT, so a Redis
//! restart, a failover to a replica that never saw SCRIPT LOAD, or a SCRIPT FLUSH costs one
//! extra round trip, once, on that node.
//!
//! Key record fields: `h` hash (one version byte, then the 32-byte hash, so one comparison
//! checks both), `s` session id, `e` environment code, `n` name (absent if empty), `st` state
//! (absent = active, `r` = revoked), `ct` created ms, `lu` last used ms, `x` expire ms, `rt`
//! revoked ms, `rr` revoke reason, `rc` the revoking call's random number (tells its resend),
//! `rb` replaced by (key id), and the sliding window `w` =
//! `<window index>:<current count>:<previous count>`. Short names, optional fields left out and
//! the window packed into one field keep a key record near 200 bytes in Redis.

use std::sync::LazyLock;

use redis::Script;

/// Record fields returned to Rust, in this order, by HMGET and by the scripts' replies.
pub const RECORD_FIELDS: [&str; 10] = ["s", "e", "n", "st", "ct", "lu", "x", "rt", "rr", "rb"];

/// VerifyKey, for one verification or a batch of them in one call.
///
/// ARGV[1..4] the default rate limit of plans 1..4 (0 = none); ARGV[5] TTL (s) of the usage
/// hashes for today; ARGV[6] minute of the hour; ARGV[7] TTL (s) of this hour's minute
/// counters; ARGV[8] the current window's index (minutes since the epoch). Those are shared by
/// every verification in the call (the caller groups verifications by minute). Then, per
/// verification `i` (from 0), four KEYS from `4i + 1`: the key record, the shard's session
/// table, the key's usage hash for today, its per-minute request counters for this hour; and
/// four ARGV from `8 + 4i + 1`: presented hash (version byte + 32 bytes), now (ms), cost,
/// expected environment code (0 = any).
///
/// Reply: one string per verification, joined by `\n` (session ids cannot contain `:` or a
/// newline; one bulk string parses far cheaper on the client than an array): `decision` for
/// NOT_FOUND; `decision:session id:env:plan` for decisions that consume nothing;
/// `decision:session id:env:plan:limit:window` for VALID and RATE_LIMITED, where `window` is
/// the key's window field as it was *before* this call (`index:current:previous`; empty for a
/// key never counted, and for a field the script could not read (not three numbers, or one
/// past 15 digits), which it counts from zero and overwrites);
/// in a batch, `E<message>` for a verification that failed (a corrupt record), so one bad
/// record fails only its own call. A single verification's error is the script's error.
///
/// The script decides and counts; the caller derives remaining, reset and retry-after from
/// the window it read, its own `now` and cost, with `domain::ratelimit::admit`, whose
/// admission test the script mirrors line by line (the conformance tests hold them together).
///
/// Verifications in one call run one after the other, exactly as separate calls would, so a
/// batch changes nothing about limits: two verifications of one key in a batch see each
/// other's consumption.
///
/// Every decision about a found key is counted (per day and decision, per minute); the
/// TTLs are set only when a counter is created (HINCRBY answered 1), so a busy key pays for
/// EXPIRE a handful of times a day, not per call.
///
/// Where Redis's instructions go, and why the script is written the way it is (callgrind on
/// `redis-server`, BENCHMARKS.md): every Lua string is interned (hashed, looked up, maybe
/// allocated), every KEYS/ARGV entry is one, every `tonumber` is a glibc `strtod` (~800
/// instructions), and Lua 5.1 turns numbers into text through `sprintf` (`%.14g` for `..`,
/// `%.17g` for a numeric `redis.call` argument: glibc's floating-point printing once topped a
/// perf profile of this script). So:
/// - what is the same for the whole call (TTLs, minute, window) is sent and parsed once;
/// - the stored window's index is compared as text with the current one, and parsed only when
///   it differs (a key's first call in a minute, or a clock behind the stored window);
/// - a cost of 1, nearly every call's, is recognised as text, not parsed;
/// - decisions stay strings, increments are `'1'`, and the new window is built from the
///   texts read plus one `%d` for the new count;
/// - the limit and the window go back as the strings read: the caller does the arithmetic for
///   remaining, reset and retry-after (formatting four figures here was ~7 % of Redis's
///   instructions).
pub static VERIFY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local W = 60000
local ws = ARGV[8]
local window = tonumber(ws)
local base = window * W
local dayttl, minute, minttl = ARGV[5], ARGV[6], ARGV[7]
local function one(kb, ab)
  local rec = KEYS[kb + 1]
  local k = redis.call('HMGET', rec, 'h', 's', 'e', 'st', 'x', 'w')
  if k[1] ~= ARGV[ab + 1] then return '3' end
  local packed = redis.call('HGET', KEYS[kb + 2], k[2])
  if not packed then return '3' end
  local plan, enabled, crl = string.match(packed, '^%d+:(%d+):(%d+):(%d*):')
  -- Checked before the first write: a corrupt record or session fails its call, unchanged.
  if not plan or not k[3] then error('corrupt key record or session') end
  local nows = ARGV[ab + 2]
  local env = ARGV[ab + 4]
  local d
  if k[4] == 'r' then d = '4'
  elseif k[5] and tonumber(k[5]) <= tonumber(nows) then d = '5'
  elseif enabled ~= '1' then d = '6'
  elseif env ~= '0' and env ~= k[3] then d = '7' end
  local reply
  if d then
    redis.call('HSET', rec, 'lu', nows)
    reply = d .. ':' .. k[2] .. ':' .. k[3] .. ':' .. plan
  else
    local ls = crl
    if ls == '' then
      -- Interned strings compare by pointer: the plan's text picks its limit without strtod.
      if plan == '1' then ls = ARGV[1]
      elseif plan == '2' then ls = ARGV[2]
      elseif plan == '3' then ls = ARGV[3]
      elseif plan == '4' then ls = ARGV[4]
      else
        local p = tonumber(plan)
        ls = p and p >= 1 and p <= 4 and ARGV[p] or '0'
      end
    end
    local limit = tonumber(ls)
    local cs = ARGV[ab + 3]
    local cost = cs == '1' and 1 or tonumber(cs)
    local w = k[6]
    local rw, rc, rp
    if w then rw, rc, rp = string.match(w, '^(%d+):(%d+):(%d+)$') end
    -- Figures past 15 digits are not ours (a corrupt field): counted afresh, not kept for ever.
    if rw and (#rw > 15 or #rc > 15 or #rp > 15) then rw = nil end
    local elapsed = tonumber(nows) - base
    -- cur, prev: counts; cw, ps: the texts of the window index and previous count to store.
    local cur, prev, cw, ps
    if rw == ws then cur, prev, cw, ps = tonumber(rc), tonumber(rp), ws, rp
    elseif not rw then cur, prev, cw, ps = 0, 0, ws, '0'
    else
      local n = tonumber(rw)
      if n > window then cur, prev, cw, ps, elapsed = tonumber(rc), tonumber(rp), rw, rp, 0
      elseif n == window then cur, prev, cw, ps = tonumber(rc), tonumber(rp), ws, rp
      elseif n == window - 1 then cur, prev, cw, ps = 0, tonumber(rc), ws, rc
      else cur, prev, cw, ps = 0, 0, ws, '0' end
    end
    d = '8'
    if (cur + cost) * W + prev * (W - elapsed) <= limit * W then
      cur = cur + cost
      d = '1'
    end
    redis.call('HSET', rec, 'lu', nows, 'w', cw .. ':' .. string.format('%d', cur) .. ':' .. ps)
    -- The window as read, if it was one (digits and colons only); else nothing counted yet.
    reply = d .. ':' .. k[2] .. ':' .. k[3] .. ':' .. plan .. ':' .. ls .. ':' .. (rw and w or '')
  end
  if redis.call('HINCRBY', KEYS[kb + 3], 'd' .. d, '1') == 1 then
    redis.call('EXPIRE', KEYS[kb + 3], dayttl)
  end
  if redis.call('HINCRBY', KEYS[kb + 4], minute, '1') == 1 then
    redis.call('EXPIRE', KEYS[kb + 4], minttl)
  end
  return reply
end
local n = #KEYS / 4
if n == 1 then return one(0, 8) end
local out = {}
for i = 0, n - 1 do
  local ok, r = pcall(one, i * 4, 8 + i * 4)
  if ok then
    out[i + 1] = r
  else
    if type(r) == 'table' then r = r.err end
    out[i + 1] = 'E' .. string.gsub(tostring(r), '\n', ' ')
  end
end
return table.concat(out, '\n')
"#,
    )
});

/// RecordOutcomes for the keys of one shard.
///
/// KEYS: the distinct key records, usage-day hashes and minute-outcome hashes the batch
/// touches. ARGV[1] the number of outcomes, then 9 values per outcome: index in KEYS of its key
/// record, of its day hash, of its minute hash (0 = too old for minute counters), the day
/// hash's TTL (s), the minute hash's TTL (s), the error code ('' = success), the response time
/// (us), its histogram bucket, its minute of the hour.
///
/// Reply: how many outcomes were stored. Outcomes of unknown keys are skipped (each key is
/// checked once), so nothing is ever written for a key that does not exist.
///
/// A day keeps at most `usage::MAX_ERROR_CODES` (100) distinct error codes: its field `nc`
/// counts the codes it has seen, and a failure with a code first seen past that counts under
/// `OTHER`, exactly as `DayCounters::record` does for the in-memory store.
pub static RECORD_OUTCOMES: LazyLock<Script> = LazyLock::new(|| {
    let source = r#"
local accepted, known = 0, {}
for i = 0, tonumber(ARGV[1]) - 1 do
  local b = 2 + i * 9
  local rec = tonumber(ARGV[b])
  if known[rec] == nil then known[rec] = redis.call('EXISTS', KEYS[rec]) == 1 end
  if known[rec] then
    accepted = accepted + 1
    local day = KEYS[tonumber(ARGV[b + 1])]
    local code = ARGV[b + 5]
    local rt = tonumber(ARGV[b + 6])
    if code == '' then
      redis.call('HINCRBY', day, 's', 1)
    else
      redis.call('HINCRBY', day, 'e', 1)
      local field = 'c:' .. code
      if redis.call('HEXISTS', day, field) == 0
          and redis.call('HINCRBY', day, 'nc', 1) > MAX_ERROR_CODES then
        field = 'c:OTHER'
      end
      redis.call('HINCRBY', day, field, 1)
    end
    redis.call('HINCRBY', day, 'rt', rt)
    redis.call('HINCRBY', day, 'h' .. ARGV[b + 7], 1)
    if rt > (tonumber(redis.call('HGET', day, 'mx')) or -1) then
      redis.call('HSET', day, 'mx', rt)
    end
    redis.call('EXPIRE', day, ARGV[b + 3])
    local mi = tonumber(ARGV[b + 2])
    if mi > 0 then
      redis.call('HINCRBY', KEYS[mi], 't' .. ARGV[b + 8], 1)
      if code ~= '' then redis.call('HINCRBY', KEYS[mi], 'e' .. ARGV[b + 8], 1) end
      redis.call('EXPIRE', KEYS[mi], ARGV[b + 4])
    end
  end
end
return accepted
"#;
    // The cap is the in-memory store's constant, so the two cannot drift apart.
    Script::new(&source.replace(
        "MAX_ERROR_CODES",
        &crate::domain::usage::MAX_ERROR_CODES.to_string(),
    ))
});

/// CreateKey: insert a key if its session is below its key limit.
///
/// KEYS[1] new key record, KEYS[2] session table, KEYS[3] session index, KEYS[4] session
/// active set, KEYS[5] the session's audit stream.
/// ARGV[1] now, ARGV[2] session id, ARGV[3] key id, ARGV[4] env code, ARGV[5] hash (version
/// byte + 32 bytes), ARGV[6] name, ARGV[7] create ms, ARGV[8] expire ms ('' = never),
/// ARGV[9] index member, ARGV[10..13] default key limit of plans 1..4 (0 = unlimited),
/// ARGV[14..26] the audit entry ([`AUDIT_LUA`]), written with the key.
///
/// Reply: `{1, active keys}` created; `{-1}` key id taken; `{-2}` no such session; `{-3}`
/// environment differs from the session's; `{-4, max keys, plan}` limit reached.
///
/// Expired members of the active set (their score is their expiry) are not counted, and are
/// dropped once the key is written, so expired keys stop counting without any background job.
///
/// The same call sent twice (redis-rs's cluster client resends a command whose connection
/// dropped before the reply came back) is recognised by the stored hash, 178 random bits that
/// only this call knows, and answered as created again: no second key, no key nobody got.
pub static INSERT_KEY: LazyLock<Script> = LazyLock::new(|| {
    with_audit(
        r#"
local live = '(' .. ARGV[1]
local h = redis.call('HGET', KEYS[1], 'h')
if h == ARGV[5] then return {1, redis.call('ZCOUNT', KEYS[4], live, '+inf')} end
if h or redis.call('EXISTS', KEYS[1]) == 1 then return {-1} end
local packed = redis.call('HGET', KEYS[2], ARGV[2])
if not packed then return {-2} end
local env, plan, _, _, cmk = string.match(packed, '^(%d+):(%d+):(%d+):(%d*):(%d*):')
if env ~= ARGV[4] then return {-3} end
local max = tonumber(cmk) or tonumber(ARGV[9 + tonumber(plan)]) or 0
local n = redis.call('ZCOUNT', KEYS[4], live, '+inf')
if max > 0 and n >= max then return {-4, max, tonumber(plan)} end
-- The first write (see the module header on maxmemory): refused when Redis is full.
redis.call('HSET', KEYS[1], 'h', ARGV[5], 's', ARGV[2], 'e', ARGV[4], 'ct', ARGV[7])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', ARGV[1])
if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'n', ARGV[6]) end
local score = '+inf'
if ARGV[8] ~= '' then
  redis.call('HSET', KEYS[1], 'x', ARGV[8])
  score = ARGV[8]
end
redis.call('ZADD', KEYS[3], 0, ARGV[9])
redis.call('ZADD', KEYS[4], score, ARGV[3])
audit()
return {1, n + 1}
"#,
    )
});

/// RevokeKey.
///
/// KEYS[1] key record, KEYS[2] its session's active set, KEYS[3] its alert state, KEYS[4] the
/// session's audit stream.
/// ARGV[1] now, ARGV[2] reason, ARGV[3] key id, ARGV[4] session id, ARGV[5] the call's random
/// number, ARGV[6..18] the audit entry ([`AUDIT_LUA`]), written only if the key is revoked
/// now.
///
/// Reply: `0` if no such key in that session; else `{1, fields}` revoked by this call or
/// `{2, fields}` already revoked (nothing changes: the first reason stays), with the record
/// fields ([`RECORD_FIELDS`]) as they now are. The revoking call's number is kept in the
/// record (`rc`), so its resend (a cluster client's) answers `1` again, writing nothing, while
/// another call gets `2`.
///
/// Revocation works when Redis is full (see the module header on maxmemory): a leaked key can
/// be revoked at any time, with its audit entry, and stays revoked once Redis has room again.
pub static REVOKE_KEY: LazyLock<Script> = LazyLock::new(|| {
    with_audit(
        r#"
local cur = redis.call('HMGET', KEYS[1], 'st', 's', 'rc')
if not cur[2] or cur[2] ~= ARGV[4] then return 0 end
local outcome = 2
if cur[1] ~= 'r' then
  -- ZREM first: a write Redis never refuses, so a full Redis still takes the HSET after it.
  redis.call('ZREM', KEYS[2], ARGV[3])
  redis.call('HSET', KEYS[1], 'st', 'r', 'rt', ARGV[1], 'rr', ARGV[2], 'rc', ARGV[5])
  redis.call('DEL', KEYS[3])
  audit()
  outcome = 1
elseif cur[3] == ARGV[5] then
  outcome = 1
end
return {outcome, redis.call('HMGET', KEYS[1], 's', 'e', 'n', 'st', 'ct', 'lu', 'x', 'rt', 'rr', 'rb')}
"#,
    )
});

/// RotateKey: create the replacement and retire the old key, atomically.
///
/// KEYS[1] old key record, KEYS[2] new key record, KEYS[3] session index, KEYS[4] session
/// active set, KEYS[5] the old key's alert state, KEYS[6] the shard's session table, KEYS[7]
/// the session's audit stream.
/// ARGV[1] now, ARGV[2] old key id, ARGV[3] new key id, ARGV[4] session id, ARGV[5] env code,
/// ARGV[6] new hash (version byte + 32 bytes), ARGV[7] name, ARGV[8] new expire ms ('' =
/// never), ARGV[9] new index member, ARGV[10] old key's new expiry ('' = revoke now),
/// ARGV[11] revoke reason used when revoking now, ARGV[12..15] default key limit of plans
/// 1..4 (0 = unlimited), ARGV[16..28] the audit entry ([`AUDIT_LUA`]), written with the
/// rotation.
///
/// Reply: `{1, old fields, new fields}`; `{-1}` no such key in that session; `{-2}` old key
/// not active; `{-3}` old key already rotated; `{-4}` new key id taken; `{-5, max keys,
/// plan}` the session is already over its key limit (a rotation's grace period running, or
/// a move to a smaller plan).
///
/// With a grace period the old key stays in the active set until it expires (its score
/// becomes its new expiry), so it keeps counting while it works; the new key may take the
/// session one over its limit (a session at its limit can still rotate), never further.
/// Revoking the old key at once swaps the two and is never refused for the key limit. A full
/// Redis refuses either kind whole: the new record is the first write.
///
/// The same call sent twice (a cluster client's resend after a dropped connection) finds the
/// old key replaced by this call's new key, whose hash only this call knows, and answers as
/// it did the first time instead of "already rotated", which would lose the new key.
pub static ROTATE_KEY: LazyLock<Script> = LazyLock::new(|| {
    with_audit(
        r#"
local f = {'s', 'e', 'n', 'st', 'ct', 'lu', 'x', 'rt', 'rr', 'rb'}
local o = redis.call('HMGET', KEYS[1], 'st', 's', 'x', 'rb')
if not o[2] or o[2] ~= ARGV[4] then return {-1} end
if o[4] == ARGV[3] and redis.call('HGET', KEYS[2], 'h') == ARGV[6] then
  return {1, redis.call('HMGET', KEYS[1], unpack(f)), redis.call('HMGET', KEYS[2], unpack(f))}
end
if o[1] == 'r' or (o[3] and tonumber(o[3]) <= tonumber(ARGV[1])) then return {-2} end
if o[4] then return {-3} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {-4} end
if ARGV[10] ~= '' then
  local packed = redis.call('HGET', KEYS[6], ARGV[4])
  if not packed then return {-1} end
  local plan, cmk = string.match(packed, '^%d+:(%d+):%d+:%d*:(%d*):')
  local max = tonumber(cmk) or tonumber(ARGV[11 + tonumber(plan)]) or 0
  local n = redis.call('ZCOUNT', KEYS[4], '(' .. ARGV[1], '+inf')
  if max > 0 and n > max then return {-5, max, tonumber(plan)} end
end
-- The first write (see the module header on maxmemory): refused when Redis is full.
redis.call('HSET', KEYS[2], 'h', ARGV[6], 's', ARGV[4], 'e', ARGV[5], 'ct', ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', ARGV[1])
if ARGV[7] ~= '' then redis.call('HSET', KEYS[2], 'n', ARGV[7]) end
local score = '+inf'
if ARGV[8] ~= '' then
  redis.call('HSET', KEYS[2], 'x', ARGV[8])
  score = ARGV[8]
end
redis.call('ZADD', KEYS[3], 0, ARGV[9])
redis.call('ZADD', KEYS[4], score, ARGV[3])
if ARGV[10] == '' then
  redis.call('ZREM', KEYS[4], ARGV[2])
  redis.call('HSET', KEYS[1], 'st', 'r', 'rt', ARGV[1], 'rr', ARGV[11], 'rb', ARGV[3])
  redis.call('DEL', KEYS[5])
else
  local x = ARGV[10]
  if o[3] and tonumber(o[3]) < tonumber(x) then x = o[3] end
  redis.call('HSET', KEYS[1], 'x', x, 'rb', ARGV[3])
  redis.call('ZADD', KEYS[4], x, ARGV[2])
end
audit()
return {1, redis.call('HMGET', KEYS[1], unpack(f)), redis.call('HMGET', KEYS[2], unpack(f))}
"#,
    )
});

/// CreateSession: the session and its audit entry.
///
/// KEYS[1] session table, KEYS[2] the session's audit stream. ARGV[1] session id, ARGV[2]
/// packed session, ARGV[3] the call's random number, ARGV[4..16] the audit entry
/// ([`AUDIT_LUA`]).
///
/// Reply: `1` created, `0` the id is taken. The same call sent twice (a cluster client's
/// resend) finds its own session and its call number (field `<session id>:c` of the table;
/// session ids have no `:`), and answers `1` again, writing nothing: "already exists" would
/// tell the caller its create failed. Another call creating the very same session gets `0`.
pub static CREATE_SESSION: LazyLock<Script> = LazyLock::new(|| {
    with_audit(
        r#"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  return (cur == ARGV[2] and redis.call('HGET', KEYS[1], ARGV[1] .. ':c') == ARGV[3]) and 1 or 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2], ARGV[1] .. ':c', ARGV[3])
audit()
return 1
"#,
    )
});

/// UpdateSession: compare-and-set on the session's version, with the audit entry.
///
/// KEYS[1] session table, KEYS[2] the session's audit stream. ARGV[1] session id, ARGV[2]
/// expected version, ARGV[3] new packed session, ARGV[4] the call's random number,
/// ARGV[5..17] the audit entry ([`AUDIT_LUA`]).
///
/// Reply: `1` replaced, `0` no such session, `-1` version conflict. The same call sent twice
/// (a cluster client's resend) finds the session it stored and its call number, and answers
/// `1` again, writing nothing: a conflict would make the service apply the patch a second
/// time, with a second audit entry. Another call making the very same change at the same
/// moment is a conflict, retried and recorded on its own.
pub static REPLACE_SESSION: LazyLock<Script> = LazyLock::new(|| {
    with_audit(
        r#"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then return 0 end
if cur == ARGV[3] and redis.call('HGET', KEYS[1], ARGV[1] .. ':c') == ARGV[4] then return 1 end
if string.match(cur, ':(%d+)$') ~= ARGV[2] then return -1 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3], ARGV[1] .. ':c', ARGV[4])
audit()
return 1
"#,
    )
});

/// An alert evaluation's state changes, together.
///
/// KEYS: one key's alert state per change. ARGV[1] the state's TTL (s), then per change `i`
/// (from 0) its kind at `2 + 2i` and when it started firing at `3 + 2i` (`''` = resolved).
///
/// A firing alert's start is kept (HSETNX); a state hash expires if nothing touches it for
/// its TTL, which collects the state of keys that expired while an alert was firing. New
/// firings are written first: on a full Redis (see the module header on maxmemory) an
/// evaluation with one is refused whole, resolutions included, while one that only resolves
/// goes through (it frees memory).
pub static UPDATE_ALERTS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
for pass = 1, 2 do
  for i = 1, #KEYS do
    local kind, since = ARGV[2 * i], ARGV[2 * i + 1]
    if pass == 1 and since ~= '' then
      redis.call('HSETNX', KEYS[i], kind, since)
      redis.call('EXPIRE', KEYS[i], ARGV[1])
    elseif pass == 2 and since == '' then
      redis.call('HDEL', KEYS[i], kind)
    end
  end
end
return 0
"#,
    )
});

/// An audit entry for what changed nothing (a refused or failed call, a repeated revocation,
/// an update with nothing to change); a change's own entry is written by the change's script.
///
/// KEYS[1] the session's audit stream. ARGV[1..13] the entry ([`AUDIT_LUA`]).
///
/// Reply: the new entry's id.
pub static APPEND_AUDIT: LazyLock<Script> = LazyLock::new(|| with_audit("return audit()"));

/// The Lua function `audit()` that the scripts above start with: it appends the entry in the
/// last 13 ARGV (the log's retention in ms, then the field/value pairs `t` time, `c` caller,
/// `a` action, `k` key id, `r` result, `d` detail) to the stream named by the last KEYS
/// entry, drops entries older than the retention and renews the stream's TTL; it returns the
/// new entry's id. A change and its entry are one script, so there is never one without the
/// other. Ids and trimming use the Redis server's clock (`TIME`), the same clock as the
/// stream's TTL, so "older than the retention" means one thing everywhere.
pub const AUDIT_LUA: &str = r#"
local function audit()
  local stream, a = KEYS[#KEYS], #ARGV - 12
  local t = redis.call('TIME')
  local id = redis.call('XADD', stream, '*', unpack(ARGV, a + 1, a + 12))
  local oldest = math.max(tonumber(t[1]) * 1000 - tonumber(ARGV[a]), 0)
  redis.call('XTRIM', stream, 'MINID', '~', oldest)
  redis.call('PEXPIRE', stream, ARGV[a])
  return id
end
"#;

/// A script whose `body` may call `audit()` ([`AUDIT_LUA`]).
fn with_audit(body: &str) -> Script {
    Script::new(&format!("{AUDIT_LUA}{body}"))
}
