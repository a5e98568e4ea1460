-- Takes back amounts added to buckets earlier (cluster/mod.rs, Cluster::window_give_back).
-- KEYS[i]: the hash of buckets of counter i; ARGV[2i-1]: its bucket; ARGV[2i]: the amount.
-- Never below zero; a bucket at zero is removed. Returns how many buckets were there.
local found = 0
for i = 1, #KEYS do
  local field = ARGV[2 * i - 1]
  local c = tonumber(redis.call('HGET', KEYS[i], field))
  if c ~= nil then
    found = found + 1
    local amount = tonumber(ARGV[2 * i])
    if c <= amount then
      redis.call('HDEL', KEYS[i], field)
    else
      redis.call('HINCRBY', KEYS[i], field, -amount)
    end
  end
end
return found
