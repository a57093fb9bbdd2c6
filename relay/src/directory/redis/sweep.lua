-- sweep: one bounded step of a walk over the caller's index, dropping stale members.
--
-- KEYS[1]  <prefix>owned:<owner>        the caller's index
-- ARGV[1]  owner, "region:machineId"
-- ARGV[2]  key prefix, to name each host key (not declared in KEYS: no Redis Cluster)
-- ARGV[3]  SSCAN cursor ("0" starts a new walk)
-- ARGV[4]  limit: SSCAN COUNT hint and most members removed by this call
--
-- A member is stale when its host key expired or now belongs to another owner (set
-- members have no expiry of their own, so they outlive expired host keys).
-- Returns { next cursor ("0" when the walk is complete), members removed }. When the
-- limit stops the call inside a page, the same cursor is returned, so the rest of that
-- page is checked by the next call instead of being skipped until the next walk.
local limit = tonumber(ARGV[4])
local page = redis.call('SSCAN', KEYS[1], ARGV[3], 'COUNT', limit)
local removed = 0
for _, host in ipairs(page[2]) do
  if removed >= limit then
    return { ARGV[3], removed }
  end
  if redis.call('GET', ARGV[2] .. 'host:' .. host) ~= ARGV[1] then
    redis.call('SREM', KEYS[1], host)
    removed = removed + 1
  end
end
return { page[1], removed }
