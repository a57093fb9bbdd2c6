-- register: make ARGV[1] the owner of one host, atomically.
--
-- KEYS[1]  <prefix>host:<hostId>        the host key (value: owner, native expiry)
-- KEYS[2]  <prefix>owned:<owner>        the caller's index (SET of hostIds)
-- ARGV[1]  owner, "region:machineId"
-- ARGV[2]  TTL in milliseconds
-- ARGV[3]  hostId
-- ARGV[4]  key prefix, to name the previous owner's index (not declared in KEYS:
--          this is why Redis Cluster is not supported)
-- KEYS[3]  <prefix>seen:<hostId>        when the host was last seen (presence)
-- ARGV[5]  now, in milliseconds since the Unix epoch
-- ARGV[6]  lifetime of the seen key, in milliseconds
--
-- Returns the previous live owner when it is another one, else nil.
local previous = redis.call('GET', KEYS[1])
if previous and previous ~= ARGV[1] then
  redis.call('SREM', ARGV[4] .. 'owned:' .. previous, ARGV[3])
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('SET', KEYS[3], ARGV[5], 'PX', ARGV[6])
if previous == ARGV[1] then
  return false
end
return previous
