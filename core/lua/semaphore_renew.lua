-- Semaphore check-in of one owner: extends its leases, keeps its waiters alive, reclaims expired
-- leases and admits waiters. Runs after semaphore_common.lua, which defines KEYS[1..3] and ARGV[1..4].
--
-- ARGV[5]           number n of lease tokens that follow
-- ARGV[6..5+n]      tokens of the owner's holders
-- ARGV[6+n..]       tokens of the owner's waiters
--
-- Returns {next deadline, token, code, token, code, ...} listing only the tokens that need action:
--   code 0: a holder's lease had expired, so its slot is lost
--   code 1: a waiter holds a slot now and must be woken
--   code 2: a waiter is in neither set (it was dropped while its owner stopped checking in), so it
--           must enqueue again
local n = tonumber(ARGV[5])
local reply = {0}

for i = 6, 5 + n do
  local t = ARGV[i]
  if redis.call('ZSCORE', holders, t) then
    redis.call('ZADD', holders, deadline, t)
  else
    reply[#reply + 1] = t
    reply[#reply + 1] = 0
  end
end

if #ARGV > 5 + n then
  redis.call('SET', alive_key(caller), 1, 'PX', ARGV[3])
end

local woken = {}
for _, t in ipairs(admit()) do
  woken[t] = true
  reply[#reply + 1] = t
  reply[#reply + 1] = 1
end

for i = 6 + n, #ARGV do
  local t = ARGV[i]
  if not woken[t] then
    if redis.call('ZSCORE', holders, t) then
      -- Admitted earlier, but the wake-up has not reached the owner yet (or was lost).
      reply[#reply + 1] = t
      reply[#reply + 1] = 1
    elseif not redis.call('ZSCORE', waiters, t) then
      reply[#reply + 1] = t
      reply[#reply + 1] = 2
    end
  end
end

touch()
reply[1] = next_deadline()
return reply
