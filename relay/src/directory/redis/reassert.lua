-- reassert: rewrite a batch of entries the caller holds, never taking one back.
--
-- KEYS[1]  <prefix>owned:<owner>        the caller's index
-- ARGV[1]  owner, "region:machineId"
-- ARGV[2]  TTL in milliseconds
-- ARGV[3]  key prefix, to name each host key (not declared in KEYS: no Redis Cluster)
-- ARGV[4..] hostIds
--
-- A host key that is absent or already the caller's is (re)written with a fresh expiry
-- and its hostId added to the caller's index. A host key another owner holds is left
-- alone (that owner registered it later) and the hostId leaves the caller's index.
-- Returns how many host keys were written.
local written = 0
for i = 4, #ARGV do
  local host = ARGV[i]
  local key = ARGV[3] .. 'host:' .. host
  local current = redis.call('GET', key)
  if (not current) or current == ARGV[1] then
    redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
    redis.call('SADD', KEYS[1], host)
    written = written + 1
  else
    redis.call('SREM', KEYS[1], host)
  end
end
return written
