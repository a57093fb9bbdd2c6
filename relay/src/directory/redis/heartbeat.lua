-- heartbeat: refresh the expiry of one host key, only if the caller still owns it.
--
-- KEYS[1]  <prefix>host:<hostId>
-- KEYS[2]  <prefix>owned:<owner>        the caller's index
-- ARGV[1]  owner, "region:machineId"
-- ARGV[2]  TTL in milliseconds
-- ARGV[3]  hostId
-- KEYS[3]  <prefix>seen:<hostId>        when the host was last seen (presence)
-- ARGV[4]  now, in milliseconds since the Unix epoch
-- ARGV[5]  lifetime of the seen key, in milliseconds
--
-- Never writes the host key when it is absent (no resurrection after an unregister or an
-- expiry) nor when another owner holds it; in those cases the hostId is stale in the
-- caller's index and is dropped from it. Returns 1 if refreshed, else 0.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('SET', KEYS[3], ARGV[4], 'PX', ARGV[5])
  return 1
end
redis.call('SREM', KEYS[2], ARGV[3])
return 0
