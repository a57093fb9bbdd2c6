-- retire: let hosts go while draining: remove each host key the caller still owns and
-- leave a mark that the host is moving, in one atomic call.
--
-- KEYS[1]  <prefix>owned:<owner>        the caller's index
-- ARGV[1]  owner, "region:machineId"
-- ARGV[2]  key prefix, to name host and mark keys (not declared in KEYS: no Redis Cluster)
-- ARGV[3]  lifetime of each mark, in milliseconds
-- ARGV[4]  "all": every host in the caller's index (the index is dropped too);
--          "some": the hostIds in ARGV[5..]
--
-- Each host key is compare-and-deleted, so a host another machine took over stays (and
-- gets no mark: it has already arrived). A mark (`<prefix>moving:<hostId>`, value the
-- owner that let it go) tells every relay to hold requests for the host a little while
-- it registers again, instead of answering that it is not connected.
-- Returns how many host keys were deleted.
local hosts
if ARGV[4] == 'all' then
  hosts = redis.call('SMEMBERS', KEYS[1])
else
  hosts = {unpack(ARGV, 5)}
end
local removed = 0
for _, host in ipairs(hosts) do
  local key = ARGV[2] .. 'host:' .. host
  if redis.call('GET', key) == ARGV[1] then
    redis.call('DEL', key)
    redis.call('SET', ARGV[2] .. 'moving:' .. host, ARGV[1], 'PX', ARGV[3])
    removed = removed + 1
  end
  if ARGV[4] ~= 'all' then
    redis.call('SREM', KEYS[1], host)
  end
end
if ARGV[4] == 'all' then
  redis.call('UNLINK', KEYS[1])
end
return removed
