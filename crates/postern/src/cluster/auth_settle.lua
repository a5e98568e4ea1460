-- One checked AUTH attempt, settled (cluster/auth.rs): the locks are looked at first, so a
-- burst of parallel guesses checked before a lockout began cannot get past it; then a
-- failure is counted (and may start lockouts), or a success clears the user's failures.
-- Mirrors auth/limiter.rs: a failure counts for exactly `window`; the failure that brings
-- the count to max_failures starts a lockout of `lockout`; a success never clears the
-- address's count.
--
-- KEYS[1]: the address's failures (sorted set), KEYS[2]: its lock;
-- KEYS[3]: the user's failures, KEYS[4]: the user's lock.
-- ARGV[1]: "fail" or "ok"; ARGV[2]: window (us); ARGV[3]: max_failures;
-- ARGV[4]: marks kept per key; ARGV[5]: lockout (ms); ARGV[6]: a unique nonce;
-- ARGV[7]: "1" when the user's lock is checked (per_user_lockout);
-- ARGV[8]: "1" when the user's failures are counted (per_user_lockout, a known name).
--
-- Failures are members "<nonce>:<weight>" scored with the server time in microseconds.
-- At most ARGV[4] are kept: beyond it the two oldest merge into the later one (their
-- failures then count until it leaves the window: a little longer, never shorter).
--
-- Returns {1, scope, remaining_ms} when a lock is in force (scope 0: address, 1: user),
-- else {0, address_failures, address_lock_started, user_lock_started}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window = tonumber(ARGV[2])
local max = tonumber(ARGV[3])
local keep = tonumber(ARGV[4])
local nonce = ARGV[6]

local ip_left = redis.call('PTTL', KEYS[2])
if ip_left > 0 then
  return {1, 0, ip_left}
end
if ARGV[7] == '1' then
  local user_left = redis.call('PTTL', KEYS[4])
  if user_left > 0 then
    return {1, 1, user_left}
  end
end

local function weight(member)
  return tonumber(string.match(member, ':(%d+)$')) or 1
end

-- Count one failure under `key`; start `lock` when the count reaches max.
local function fail(key, lock)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%.0f', now - window))
  redis.call('ZADD', key, string.format('%.0f', now), nonce .. ':1')
  if redis.call('ZCARD', key) > keep then
    local two = redis.call('ZRANGE', key, 0, 1, 'WITHSCORES')
    redis.call('ZREM', key, two[1], two[3])
    redis.call('ZADD', key, two[4], nonce .. 'm:' .. (weight(two[1]) + weight(two[3])))
  end
  local count = 0
  for _, m in ipairs(redis.call('ZRANGE', key, 0, -1)) do
    count = count + weight(m)
  end
  redis.call('PEXPIRE', key, math.ceil(window / 1000) + 1)
  local started = 0
  if count >= max and redis.call('EXISTS', lock) == 0 then
    redis.call('SET', lock, string.format('%.0f', now), 'PX', ARGV[5])
    started = 1
  end
  return count, started
end

if ARGV[1] == 'ok' then
  redis.call('DEL', KEYS[3])
  return {0, 0, 0, 0}
end
local count, ip_started = fail(KEYS[1], KEYS[2])
local user_started = 0
if ARGV[8] == '1' then
  local _
  _, user_started = fail(KEYS[3], KEYS[4])
end
return {0, count, ip_started, user_started}
