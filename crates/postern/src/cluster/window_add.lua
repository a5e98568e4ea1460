-- Sliding-window counters: check and add to several in one step, all or none
-- (cluster/mod.rs, Cluster::window_take).
-- KEYS[i]: the hash of buckets of counter i (field: bucket index, value: count).
-- ARGV[4i-3]: its bucket width in microseconds (>= 1); ARGV[4i-2]: its limit;
-- ARGV[4i-1]: the amount to add; ARGV[4i]: PEXPIRE in milliseconds (window + one bucket).
-- Returns {1, bucket_1, ..., bucket_n} when every amount was added, or {0, i, count}
-- when counter i (the first, in order) would exceed its limit: then nothing is added.
-- The clock is the server's (TIME), so every node agrees on the buckets.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local buckets = {}
for i = 1, #KEYS do
  local width = tonumber(ARGV[4 * i - 3])
  local limit = tonumber(ARGV[4 * i - 2])
  local amount = tonumber(ARGV[4 * i - 1])
  local n = math.floor(now / width)
  local fields = redis.call('HGETALL', KEYS[i])
  local count = 0
  local old = {}
  for j = 1, #fields, 2 do
    local b = tonumber(fields[j])
    local c = tonumber(fields[j + 1])
    if b == nil or c == nil or b < n - 16 then
      old[#old + 1] = fields[j]
    else
      -- Buckets after n (the server's clock went back) still count: err towards refusing.
      count = count + c
    end
  end
  if #old > 0 then
    redis.call('HDEL', KEYS[i], unpack(old))
  end
  if count + amount > limit then
    return {0, i, count}
  end
  buckets[i] = n
end
for i = 1, #KEYS do
  redis.call('HINCRBY', KEYS[i], string.format('%.0f', buckets[i]), ARGV[4 * i - 1])
  redis.call('PEXPIRE', KEYS[i], ARGV[4 * i])
end
local out = {1}
for i = 1, #KEYS do
  out[i + 1] = buckets[i]
end
return out
