-- Semaphore acquire: admits the caller when there is room and nobody waits, else queues it.
-- Runs after semaphore_common.lua, which defines KEYS[1..3] and ARGV[1..4].
--
-- ARGV[5]  token of this acquire
--
-- Returns {status, next deadline, own admitted token...}: status 1 when the token holds a slot,
-- 0 when it waits; the next deadline is that of next_deadline(); then the tokens of other waiters
-- of the caller that were admitted on the way. A retry with the same token changes nothing.
local token = ARGV[5]
local own = admit()
local status

if redis.call('ZSCORE', holders, token) then
  status = 1
elseif redis.call('ZSCORE', waiters, token) then
  status = 0
elseif redis.call('ZCARD', holders) < capacity then
  -- admit() stops only when the holders set is full or no live waiter is left, so room here
  -- means that nobody waits ahead of this token.
  redis.call('ZADD', holders, deadline, token)
  status = 1
else
  redis.call('ZADD', waiters, redis.call('INCR', tickets), token)
  status = 0
end

if status == 0 then
  redis.call('SET', alive_key(caller), 1, 'PX', ARGV[3])
end
touch()

local reply = {status, next_deadline()}
for _, t in ipairs(own) do
  if t ~= token then
    reply[#reply + 1] = t
  end
end
return reply
