//! The Lua scripts of the Redis lock, the part of the protocol that runs inside
//! Redis, atomically.
//!
//! Why public: the deterministic simulation (`crates/payguard-sim`) runs these
//! very texts in an embedded Lua 5.1 over its simulated Redis, so a change here
//! is what the simulation checks, with no re-statement to keep in step. Each
//! script uses only commands that model implements (`SET` with `NX`/`PX`, `GET`,
//! `DEL`, `EXISTS`, `PTTL`, `HINCRBY`, `HSET`, `HGET`, `PUBLISH`); one that
//! calls anything else fails there loudly, so extend the model with it.

/// Takes every free lock of `KEYS` (after the fence hash, triples of an order's
/// lock key, its waiter marker and its settled hint) in one step. The counter and
/// the epoch live in one hash (`fence`), so a flush, a restart or an eviction
/// loses both together: a counter can never restart under an epoch that already
/// handed out higher numbers. Answers `{epoch, incarnation, r1, r2, ...}`:
/// `ri >= 1` is the grant counter of lock i; `ri = 0` means its settled hint is
/// set and `ARGV[3 + i]` asked for it (nothing was taken); `ri < 0` means it is
/// held elsewhere for `-ri - 1` more ms (its waiter marker is then set, so the
/// holder's release publishes).
pub const ACQUIRE_MANY: &str = r#"
local out = {false, false}
local k = 0
for i = 2, #KEYS, 3 do
  k = k + 1
  if ARGV[3 + k] == '1' and redis.call('EXISTS', KEYS[i + 2]) == 1 then
    out[#out + 1] = 0
  elseif redis.call('SET', KEYS[i], ARGV[1], 'NX', 'PX', ARGV[2]) then
    local n = redis.call('HINCRBY', KEYS[1], 'n', 1)
    if n == 1 then
      redis.call('HSET', KEYS[1], 'inc', ARGV[1])
    end
    out[#out + 1] = n
  else
    local left = redis.call('PTTL', KEYS[i])
    if left < 0 then left = 0 end
    redis.call('SET', KEYS[i + 1], '1', 'PX', left + tonumber(ARGV[3]))
    out[#out + 1] = -left - 1
  end
end
out[1] = redis.call('HGET', KEYS[1], 'epoch') or false
out[2] = redis.call('HGET', KEYS[1], 'inc') or false
return out
"#;

/// Sets the epoch only upward, never touching the counter (resetting it would
/// race with grants already made under the new epoch); returns the epoch in force,
/// or nothing when the hash is not the incarnation the caller's grant saw.
pub const RAISE_EPOCH: &str = r#"
if (redis.call('HGET', KEYS[1], 'inc') or '') ~= ARGV[2] then
  return false
end
local cur = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')
if tonumber(ARGV[1]) > cur then
  redis.call('HSET', KEYS[1], 'epoch', ARGV[1])
  return tonumber(ARGV[1])
end
return cur
"#;

/// Compare-and-delete of every `(lock, waiter marker, settled hint)` triple of
/// `KEYS` held by `ARGV[1]`. Lease j's order id is `ARGV[4 + 2j]` and its
/// settled flag `ARGV[5 + 2j]`: a flagged lock leaves its settled hint for
/// `ARGV[3]` ms, set before the lock goes; a freed lock that somebody waits for
/// publishes its order id on channel `ARGV[2]`. Answers 1 per lock freed, 0 per
/// lock no longer ours (its lease expired; no hint is left then).
pub const RELEASE_MANY: &str = r#"
local out = {}
local j = 0
for i = 1, #KEYS, 3 do
  local order = ARGV[4 + 2 * j]
  local settled = ARGV[5 + 2 * j]
  j = j + 1
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    if settled == '1' then
      redis.call('SET', KEYS[i + 2], '1', 'PX', ARGV[3])
    end
    redis.call('DEL', KEYS[i])
    if redis.call('DEL', KEYS[i + 1]) == 1 then
      redis.call('PUBLISH', ARGV[2], order)
    end
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"#;

/// Every script the client sends (the production transport loads each once).
pub const LOCK_SCRIPTS: [&str; 3] = [ACQUIRE_MANY, RAISE_EPOCH, RELEASE_MANY];
