-- Semaphore release: gives up a token's slot or its place in the queue, then admits waiters.
-- Runs after semaphore_common.lua, which defines KEYS[1..3] and ARGV[1..4].
--
-- ARGV[5]  token to release
--
-- Returns {released, next deadline, own admitted token...}: released is 0 when the token's lease
-- had expired, else 1, also when an earlier run of this release gave the slot back (go-redis sends
-- a script again after a dropped connection, even when Redis already ran it) or when the token
-- only waited. Releasing twice is harmless, because tokens are never reused.
local token = ARGV[5]
local released = redis.call('ZREM', holders, token)
if released == 0 and redis.call('ZREM', lost, token) == 0 then
  released = 1
end
redis.call('ZREM', waiters, token)
local own = admit()
touch()

local reply = {released, next_deadline()}
for _, t in ipairs(own) do
  reply[#reply + 1] = t
end
return reply
