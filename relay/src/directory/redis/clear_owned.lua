-- clear_owned: remove every host key the caller still owns, in one atomic call.
--
-- KEYS[1]  <prefix>owned:<owner>        the caller's index
-- ARGV[1]  owner, "region:machineId"
-- ARGV[2]  key prefix, to name each host key (not declared in KEYS: no Redis Cluster)
--
-- Costs O(members of the caller's index): the rest of the directory is never read.
-- Each host key is compare-and-deleted, so a host another machine took over stays.
-- The index itself is dropped (UNLINK: freed off the main thread).
-- Returns how many host keys were deleted.
local removed = 0
for _, host in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ARGV[2] .. 'host:' .. host
  if redis.call('GET', key) == ARGV[1] then
    redis.call('DEL', key)
    removed = removed + 1
  end
end
redis.call('UNLINK', KEYS[1])
return removed
