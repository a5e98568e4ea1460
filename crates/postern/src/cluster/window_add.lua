-- Sliding-window counter: check and add in one step (cluster/mod.rs, Cluster::window_add).
-- KEYS[1]: the hash of buckets (field: bucket index, value: count).
-- ARGV[1]: bucket width in microseconds (>= 1); ARGV[2]: limit; ARGV[3]: amount;
-- ARGV[4]: PEXPIRE in milliseconds (window + one bucket).
-- Returns {1, bucket} when added, {0, count} when count + amount would exceed the limit.
-- The clock is the server's (TIME), so every node agrees on the buckets.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local width = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local amount = tonumber(ARGV[3])
local n = math.floor(now / width)
local fields = redis.call('HGETALL', KEYS[1])
local count = 0
local old = {}
for i = 1, #fields, 2 do
  local b = tonumber(fields[i])
  local c = tonumber(fields[i + 1])
  if b == nil or c == nil or b < n - 16 then
    old[#old + 1] = fields[i]
  else
    -- Buckets after n (the server's clock went back) still count: err towards refusing.
    count = count + c
  end
end
if #old > 0 then
  redis.call('HDEL', KEYS[1], unpack(old))
end
if count + amount > limit then
  return {0, count}
end
local field = string.format('%.0f', n)
redis.call('HINCRBY', KEYS[1], field, amount)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {1, n}
