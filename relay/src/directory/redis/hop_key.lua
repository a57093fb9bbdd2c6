-- hop_key: the secret relays sharing this directory put on requests they forward to one
-- another. The first relay to ask makes it; every relay reads the one that won.
--
-- KEYS[1]  <prefix>hop-key
-- ARGV[1]  a new random key, used only if none exists
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('GET', KEYS[1])
