-- unregister: compare-and-delete one host key.
--
-- KEYS[1]  <prefix>host:<hostId>
-- KEYS[2]  <prefix>owned:<owner>        the caller's index
-- ARGV[1]  owner, "region:machineId"
-- ARGV[2]  hostId
--
-- Deletes the host key only if ARGV[1] still owns it. The hostId leaves the caller's
-- index either way: if the key is someone else's (or gone), the member was stale.
-- Returns 1 if the key was deleted, else 0.
redis.call('SREM', KEYS[2], ARGV[2])
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
