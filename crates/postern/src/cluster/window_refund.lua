-- Takes back an amount added to one bucket earlier (cluster/mod.rs, Cluster::window_refund).
-- KEYS[1]: the hash of buckets; ARGV[1]: the bucket; ARGV[2]: the amount.
-- Never below zero; a bucket at zero is removed. Returns 1 if the bucket was there.
local c = tonumber(redis.call('HGET', KEYS[1], ARGV[1]))
if c == nil then
  return 0
end
local amount = tonumber(ARGV[2])
if c <= amount then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HINCRBY', KEYS[1], ARGV[1], -amount)
end
return 1
