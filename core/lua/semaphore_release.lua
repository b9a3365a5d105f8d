-- Semaphore release: gives up a token's slot or its place in the queue, then admits waiters.
-- Runs after semaphore_common.lua, which defines KEYS[1..3] and ARGV[1..4].
--
-- ARGV[5]  token to release
--
-- Returns {released, next deadline, own admitted token...}: released is 1 when the token held a
-- slot, 0 when its lease had already expired or it never held one. Releasing twice is harmless,
-- because tokens are never reused.
local token = ARGV[5]
local released = redis.call('ZREM', holders, token)
redis.call('ZREM', waiters, token)
local own = admit()
touch()

local reply = {released, next_deadline()}
for _, t in ipairs(own) do
  reply[#reply + 1] = t
end
return reply
