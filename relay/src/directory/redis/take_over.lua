-- take_over: move a host's entry to the caller from an owner that said it no longer
-- holds the host, only if that owner is still the one recorded (compare-and-set).
--
-- KEYS[1]  <prefix>host:<hostId>
-- KEYS[2]  <prefix>owned:<caller>      the caller's index
-- KEYS[3]  <prefix>owned:<previous>    the previous owner's index
-- ARGV[1]  previous owner, "region:machineId"
-- ARGV[2]  caller, "region:machineId"
-- ARGV[3]  TTL in milliseconds
-- ARGV[4]  hostId
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('SADD', KEYS[2], ARGV[4])
redis.call('SREM', KEYS[3], ARGV[4])
return 1
